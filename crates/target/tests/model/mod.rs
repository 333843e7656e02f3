//! The protocol-free harness's rig, requests and model (plan #12, step 6).
//!
//! # What runs
//! Real reactor threads (a [`ReactorPool`] of two) and volumes opened directly with
//! `Volume::open` (mem or null backends, no server, no protocol). Every request goes
//! through the block layer's API: `Bdev::channel(r)` on the reactor that submits it,
//! `Channel::submit` with a [`Done`] that sends the result to the test thread. Buffers
//! are built and read on the reactor (they are not `Send`); only plain descriptions
//! ([`Req`]) and summaries ([`Outcome`]) cross threads.
//!
//! # The model
//! [`Model`] holds the bytes a volume must read back, which bytes an unmap has made
//! "old or zeros" (the contract allows either until the range is written again), and
//! per backup the chunks written since it was taken (what `ChangedSince` must report).
//!
//! Every wait on the test thread is bounded by [`BOUND`]: a hang fails the test;
//! nothing here measures speed.
#![allow(dead_code)] // each test uses a different subset

use std::collections::BTreeSet;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use ringblk_reactor::{Reactor, ReactorConfig, ReactorHandle, ReactorPool};
use ringblk_target::bdev::{
    BackupId, Bdev, BlockOp, Channel, DataBuf, Done, IoOutput, IoResult, OwnBuf, Pressure,
    ReadData, StatusKind, View,
};
use ringblk_target::error::BlockError;
use ringblk_target::extent::{Extent, ExtentFlags};
use ringblk_target::spec::BackendKind;
use ringblk_target::stats::Label;
use ringblk_target::volume::{Volume, VolumeSpec};

/// Liveness bound of every wait (never a speed assertion).
pub const BOUND: Duration = Duration::from_secs(60);
pub const SIZE: u64 = 4 << 20;
pub const CHUNK: u64 = 16 << 10;
pub const BLOCK: u64 = 512;
pub const REACTORS: usize = 2;

// ---------------------------------------------------------------------------------------
// The rig: reactors and volumes

pub struct Rig {
    pool: Option<ReactorPool>,
    pub handles: Arc<[ReactorHandle]>,
    pub dir: tempfile::TempDir,
}

impl Rig {
    /// Two reactor threads; `max_in_flight` bounds each reactor's slab (ops beyond it
    /// wait in the reactor, as `submit_or_wait` does).
    pub fn new(max_in_flight: usize) -> Rig {
        let config = ReactorConfig {
            cores: vec![None; REACTORS],
            max_in_flight,
            ..Default::default()
        };
        let pool = ReactorPool::start(config, Arc::new(|_: &mut Reactor| {})).expect("reactors");
        let handles = pool.handles().clone();
        let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("tempdir");
        Rig {
            pool: Some(pool),
            handles,
            dir,
        }
    }

    /// A volume of `size` bytes on `backend` (mem or null), 16 KiB chunks.
    pub fn volume(&self, name: &str, backend: BackendKind, size: u64) -> Arc<Volume> {
        self.open(name, backend, None, size)
    }

    /// A file volume of `size` bytes in the rig's directory, opened O_DIRECT.
    pub fn direct_file_volume(&self, name: &str, size: u64) -> Arc<Volume> {
        let path = self.dir.path().join(format!("{name}.img"));
        self.open(name, BackendKind::File, Some(path), size)
    }

    fn open(
        &self,
        name: &str,
        backend: BackendKind,
        path: Option<std::path::PathBuf>,
        size: u64,
    ) -> Arc<Volume> {
        let direct = path.is_some();
        let spec = VolumeSpec {
            name: name.into(),
            path,
            size_bytes: Some(size),
            block_size: BLOCK as u32,
            backend,
            read_only: false,
            direct,
            chunk_size: CHUNK as u32,
            grow: false,
        };
        Arc::new(Volume::open(spec, REACTORS, self.dir.path()).expect("volume"))
    }

    /// The live view of `vol`.
    pub fn live(&self, vol: &Arc<Volume>) -> Bdev {
        Bdev::open(vol.clone(), View::Live, Label::INTERNAL).expect("open")
    }

    /// Runs `f` on reactor `ri` (bounded wait for the inbox).
    pub fn on(&self, ri: usize, f: impl FnOnce(&mut Reactor) + Send + 'static) {
        self.handles[ri]
            .send_blocking(f, BOUND)
            .unwrap_or_else(|e| panic!("reactor {ri} inbox: {e:?}"));
    }

    /// Submits `req` for `bdev` on reactor `ri`; the result arrives on the receiver.
    pub fn submit(&self, ri: usize, bdev: &Bdev, req: Req) -> mpsc::Receiver<Res> {
        let (tx, rx) = mpsc::channel();
        let b = bdev.clone();
        self.on(ri, move |r| {
            let ch = b.channel(r);
            submit_on(r, &ch, &b, req, move |_, res| {
                let _ = tx.send(res);
            });
        });
        rx
    }

    /// Submits `req` and waits for its result.
    pub fn run(&self, ri: usize, bdev: &Bdev, req: Req) -> Res {
        let what = format!("{req:?}");
        self.submit(ri, bdev, req)
            .recv_timeout(BOUND)
            .unwrap_or_else(|e| panic!("{what}: no result ({e})"))
    }

    /// Reads the whole of `bdev`'s first `len` bytes.
    pub fn read_all(&self, ri: usize, bdev: &Bdev, len: u64) -> Vec<u8> {
        let mut out = Vec::with_capacity(len as usize);
        let step = 1u64 << 20;
        let mut off = 0;
        while off < len {
            let n = step.min(len - off) as u32;
            match self.run(ri, bdev, Req::Read { off, len: n }) {
                Ok(Outcome::Data(d)) => out.extend_from_slice(&d),
                other => panic!("read of {} at {off}: {other:?}", bdev.name()),
            }
            off += u64::from(n);
        }
        out
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        if let Some(p) = self.pool.take() {
            p.shutdown();
        }
    }
}

// ---------------------------------------------------------------------------------------
// Requests and results that cross threads

/// A request in plain data (`Send`); built into a [`BlockOp`] on the reactor.
#[derive(Clone, Debug)]
pub enum Req {
    Read {
        off: u64,
        len: u32,
    },
    Write {
        off: u64,
        data: Vec<u8>,
        fua: bool,
    },
    /// A write of `len` bytes from a buffer of `buf_len` (to test validation).
    WriteShort {
        off: u64,
        len: u32,
        buf_len: u32,
    },
    Flush,
    Unmap {
        off: u64,
        len: u64,
        fua: bool,
    },
    WriteZeroes {
        off: u64,
        len: u64,
        may_unmap: bool,
        fast_only: bool,
        fua: bool,
    },
    Status {
        off: u64,
        len: u64,
        kinds: Vec<StatusKind>,
        max_extents: u32,
    },
    Readahead {
        off: u64,
        len: u64,
    },
    Caw {
        off: u64,
        compare: Vec<u8>,
        write: Vec<u8>,
        fua: bool,
    },
}

/// A successful result, summarised.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Complete,
    Data(Vec<u8>),
    Status(Vec<Vec<Extent>>),
}

pub type Res = Result<Outcome, BlockError>;

fn own(ch: &Channel, r: &mut Reactor, bytes: &[u8], len: u32) -> DataBuf {
    let mut b = ch.alloc(r, len);
    b.as_mut_slice()[..bytes.len()].copy_from_slice(bytes);
    b.into()
}

/// Builds `req` on this reactor and submits it on `ch`; `then` gets the summary.
/// Returns the channel's pressure after the submit.
pub fn submit_on(
    r: &mut Reactor,
    ch: &Channel,
    bdev: &Bdev,
    req: Req,
    then: impl FnOnce(&mut Reactor, Res) + 'static,
) -> Pressure {
    let (op, read_len) = match req {
        Req::Read { off, len } => {
            let into = ch.alloc(r, len).into();
            (
                BlockOp::Read {
                    offset: off,
                    len,
                    into,
                },
                len as usize,
            )
        }
        Req::Write { off, data, fua } => {
            let len = data.len() as u32;
            let data = own(ch, r, &data, len);
            (
                BlockOp::Write {
                    offset: off,
                    len,
                    data,
                    fua,
                },
                0,
            )
        }
        Req::WriteShort { off, len, buf_len } => {
            // A heap buffer of exactly `buf_len` (a pool buffer may be longer).
            let data = DataBuf::Own(OwnBuf::aligned(buf_len as usize));
            (
                BlockOp::Write {
                    offset: off,
                    len,
                    data,
                    fua: false,
                },
                0,
            )
        }
        Req::Flush => (BlockOp::Flush, 0),
        Req::Unmap { off, len, fua } => (
            BlockOp::Unmap {
                offset: off,
                len,
                fua,
            },
            0,
        ),
        Req::WriteZeroes {
            off,
            len,
            may_unmap,
            fast_only,
            fua,
        } => (
            BlockOp::WriteZeroes {
                offset: off,
                len,
                may_unmap,
                fast_only,
                fua,
            },
            0,
        ),
        Req::Status {
            off,
            len,
            kinds,
            max_extents,
        } => (
            BlockOp::BlockStatus {
                offset: off,
                len,
                kinds,
                max_extents,
            },
            0,
        ),
        Req::Readahead { off, len } => (BlockOp::Readahead { offset: off, len }, 0),
        Req::Caw {
            off,
            compare,
            write,
            fua,
        } => {
            let len = compare.len() as u32;
            let compare = own(ch, r, &compare, len);
            let write = own(ch, r, &write, len);
            (
                BlockOp::CompareAndWrite {
                    offset: off,
                    len,
                    compare,
                    write,
                    fua,
                },
                0,
            )
        }
    };
    let done = Done::from_fn(move |r, res| then(r, summarise(res, read_len)));
    ch.submit(r, bdev, op, done)
}

/// The `Send` summary of a result (a read's first `read_len` bytes).
pub fn summarise(res: IoResult, read_len: usize) -> Res {
    match res? {
        IoOutput::Complete => Ok(Outcome::Complete),
        IoOutput::Status(lists) => Ok(Outcome::Status(lists.into_iter().collect())),
        IoOutput::Read(ReadData::Zeroes(_)) => Ok(Outcome::Data(vec![0; read_len])),
        IoOutput::Read(ReadData::Data(DataBuf::Own(b))) => {
            Ok(Outcome::Data(b.as_slice()[..read_len].to_vec()))
        }
        IoOutput::Read(ReadData::Data(other)) => {
            panic!("a read into an OwnBuf came back as {other:?}")
        }
    }
}

// ---------------------------------------------------------------------------------------
// Data

/// Distinct bytes per seed.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

pub fn rng(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed)
}

/// The seed of a test: `RINGBLK_MODEL_SEED` repeats a run, else `default`.
pub fn seed(default: u64) -> u64 {
    std::env::var("RINGBLK_MODEL_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// Waits (bounded) until `f` holds.
pub fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < BOUND, "not within {BOUND:?}: {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

// ---------------------------------------------------------------------------------------
// The model

/// What a volume must read back (module docs, *The model*).
#[derive(Clone)]
pub struct Model {
    pub data: Vec<u8>,
    /// Unmapped and not written since: reads as `data` or as zeros.
    pub unsure: Vec<bool>,
    /// Per backup (in creation order): its id and the chunks written since it.
    pub changed: Vec<(BackupId, BTreeSet<u64>)>,
}

impl Model {
    pub fn new(size: u64) -> Model {
        Model {
            data: vec![0; size as usize],
            unsure: vec![false; size as usize],
            changed: Vec::new(),
        }
    }

    fn range(off: u64, len: u64) -> std::ops::Range<usize> {
        off as usize..(off + len) as usize
    }

    /// The chunks `[off, off + len)` touches.
    pub fn chunks(off: u64, len: u64) -> std::ops::Range<u64> {
        if len == 0 {
            return 0..0;
        }
        off / CHUNK..(off + len - 1) / CHUNK + 1
    }

    fn mark_changed(&mut self, off: u64, len: u64) {
        for (_, set) in &mut self.changed {
            set.extend(Self::chunks(off, len));
        }
    }

    pub fn write(&mut self, off: u64, data: &[u8]) {
        let r = Self::range(off, data.len() as u64);
        self.data[r.clone()].copy_from_slice(data);
        self.unsure[r].fill(false);
        self.mark_changed(off, data.len() as u64);
    }

    pub fn zero(&mut self, off: u64, len: u64) {
        let r = Self::range(off, len);
        self.data[r.clone()].fill(0);
        self.unsure[r].fill(false);
        self.mark_changed(off, len);
    }

    /// An unmap: old data or zeros from now on (no chunk changes: on a stack with
    /// deltas an unmap is advisory and ignored).
    pub fn unmap(&mut self, off: u64, len: u64) {
        self.unsure[Self::range(off, len)].fill(true);
    }

    /// A backup taken now.
    pub fn backup(&mut self, id: BackupId) {
        self.changed.push((id, BTreeSet::new()));
    }

    /// Checks bytes read at `off` against the model; then what was unsure is what
    /// was read (later reads must agree with it).
    pub fn check_read(&mut self, off: u64, got: &[u8]) -> Result<(), String> {
        for (i, &b) in got.iter().enumerate() {
            let at = off as usize + i;
            let want = self.data[at];
            if b != want && !(self.unsure[at] && b == 0) {
                return Err(format!(
                    "byte {at} (chunk {}) reads {b:#04x}, the model says {want:#04x}{}",
                    at as u64 / CHUNK,
                    if self.unsure[at] { " or 0" } else { "" }
                ));
            }
        }
        let r = Self::range(off, got.len() as u64);
        self.data[r.clone()].copy_from_slice(got);
        self.unsure[r].fill(false);
        Ok(())
    }

    /// Whether `[off, off + len)` reads the same whatever an unmap left.
    pub fn is_sure(&self, off: u64, len: u64) -> bool {
        !self.unsure[Self::range(off, len)].contains(&true)
    }

    pub fn bytes(&self, off: u64, len: u64) -> Vec<u8> {
        self.data[Self::range(off, len)].to_vec()
    }
}

/// The extent list contract (plan §2.9): at least one extent, each non-empty, a
/// prefix of `[off, off + len)`, adjacent extents with different flags, at most
/// `max_extents`. Returns the covered length.
pub fn check_list(list: &[Extent], len: u64, max_extents: u32) -> Result<u64, String> {
    if list.is_empty() {
        return Err("an empty extent list".into());
    }
    if list.len() > max_extents.max(1) as usize {
        return Err(format!("{} extents, more than {max_extents}", list.len()));
    }
    let mut covered = 0u64;
    for (i, e) in list.iter().enumerate() {
        if e.length_bytes == 0 {
            return Err(format!("extent {i} is empty"));
        }
        if i > 0 && list[i - 1].flags == e.flags {
            return Err(format!("extents {} and {i} have equal flags", i - 1));
        }
        covered += e.length_bytes;
    }
    if covered > len {
        return Err(format!(
            "extents cover {covered} bytes of a {len}-byte request"
        ));
    }
    Ok(covered)
}

/// Allocation soundness: wherever an extent says ZEROES, the model reads zeros (an
/// unsure byte then is zero from now on).
pub fn check_allocation(model: &mut Model, off: u64, list: &[Extent]) -> Result<(), String> {
    let mut at = off;
    for e in list {
        if e.flags.contains(ExtentFlags::ZEROES) {
            for i in at..at + e.length_bytes {
                let i = i as usize;
                if model.data[i] != 0 && !model.unsure[i] {
                    return Err(format!(
                        "extent at {at} (+{}) says ZEROES, byte {i} is {:#04x}",
                        e.length_bytes, model.data[i]
                    ));
                }
                model.data[i] = 0;
                model.unsure[i] = false;
            }
        }
        at += e.length_bytes;
    }
    Ok(())
}

/// `ChangedSince` exactness: a chunk is CHANGED in the list iff the model wrote it
/// since that backup (every extent piece of the chunk agrees).
pub fn check_changed(
    model: &Model,
    backup: BackupId,
    off: u64,
    list: &[Extent],
) -> Result<(), String> {
    let Some((_, set)) = model.changed.iter().find(|(id, _)| *id == backup) else {
        return Err(format!("the model has no backup {backup:?}"));
    };
    let mut at = off;
    for e in list {
        let changed = e.flags.contains(ExtentFlags::CHANGED);
        for c in Model::chunks(at, e.length_bytes) {
            if set.contains(&c) != changed {
                return Err(format!(
                    "chunk {c} (extent at {at} +{}): CHANGED is {changed}, the model says {}",
                    e.length_bytes,
                    set.contains(&c)
                ));
            }
        }
        at += e.length_bytes;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Scripts of every op

/// One step of a script, independent of the volume it runs on.
#[derive(Clone, Debug)]
pub enum Step {
    Read {
        off: u64,
        len: u32,
    },
    Write {
        off: u64,
        len: u32,
        seed: u64,
        fua: bool,
    },
    Flush,
    Unmap {
        off: u64,
        len: u64,
        fua: bool,
    },
    WriteZeroes {
        off: u64,
        len: u64,
        may_unmap: bool,
        fast_only: bool,
        fua: bool,
    },
    /// Allocation, plus ChangedSince each backup of the volume.
    Status {
        off: u64,
        len: u64,
        max_extents: u32,
    },
    Readahead {
        off: u64,
        len: u64,
    },
    /// Compare-and-write against the model's bytes (`matching`) or one byte off.
    Caw {
        off: u64,
        len: u32,
        seed: u64,
        matching: bool,
    },
}

/// A block-aligned range inside the volume: mostly small (crossing chunk boundaries
/// often), sometimes up to 256 KiB.
fn range(rng: &mut StdRng) -> (u64, u64) {
    let blocks = if rng.gen_bool(0.85) {
        rng.gen_range(1..=80)
    } else {
        rng.gen_range(81..=512)
    };
    let len = blocks * BLOCK;
    let off = rng.gen_range(0..=(SIZE - len) / BLOCK) * BLOCK;
    (off, len)
}

/// `n` steps of every kind from `seed`.
pub fn script(seed: u64, n: usize) -> Vec<Step> {
    let mut rng = rng(seed);
    (0..n)
        .map(|i| {
            let (off, len) = range(&mut rng);
            match rng.gen_range(0..100) {
                0..=24 => Step::Read {
                    off,
                    len: len as u32,
                },
                25..=54 => Step::Write {
                    off,
                    len: len as u32,
                    seed: seed ^ (i as u64) << 20,
                    fua: rng.gen_bool(0.2),
                },
                55..=59 => Step::Flush,
                60..=66 => Step::Unmap {
                    off,
                    len,
                    fua: rng.gen_bool(0.2),
                },
                67..=76 => Step::WriteZeroes {
                    off,
                    len,
                    may_unmap: rng.gen_bool(0.5),
                    fast_only: rng.gen_bool(0.3),
                    fua: rng.gen_bool(0.2),
                },
                77..=86 => Step::Status {
                    off,
                    len,
                    max_extents: if rng.gen_bool(0.2) { 1 } else { 64 },
                },
                87..=91 => Step::Readahead { off, len },
                _ => Step::Caw {
                    off,
                    len: (len as u32).min(64 << 10),
                    seed: seed ^ (i as u64) << 24,
                    matching: rng.gen_bool(0.6),
                },
            }
        })
        .collect()
}
