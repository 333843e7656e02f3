//! Tests of the queue's data plane: a hand-written driver (`virtq::testdriver`)
//! puts requests in a fake guest memory; a manual reactor runs the queue's poller
//! against a real `Target` with a mem volume; bytes, status bytes, used lengths and
//! counters are checked, and the volume is read back through the block layer
//! directly (not through the queue). Each verifying test has a negative control: the
//! same check with a planted bug (`blk::plant`) or against wrong data must fail.

use std::cell::RefCell;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ringblk_reactor::{manual_reactors, IdlePolicy, Reactor, ReactorConfig};
use ringblk_target::bdev::{Bdev, BlockOp, DataBuf, Done, IoOutput, ReadData};
use ringblk_target::stats::Label;
use ringblk_target::target::Target;
use serde::de::value::{Error as DeError, MapDeserializer};
use serde::de::{IntoDeserializer, Visitor};

use super::*;
use crate::blk::plant::{self, Plant};
use crate::blk::{S_IOERR, S_OK, S_UNSUPP};
use crate::inflight::{InflightQueue, InflightRegion};
use crate::virtq::testdriver::{Driver, Req, DESC, F_INDIRECT, F_NEXT, F_WRITE, MEM_BYTES, USED};

const VOL_BYTES: u64 = 4 << 20;
/// How long a test waits at most for something that must happen (a liveness bound,
/// never a speed assertion: the volume's I/O is real io_uring I/O on a memfd).
const BOUND: Duration = Duration::from_secs(60);

struct Rig {
    r: Reactor,
    bdev: Bdev,
    _target: Target,
    _dir: tempfile::TempDir,
}

fn rig(idle: IdlePolicy) -> Rig {
    let r = manual_reactors(ReactorConfig {
        cores: vec![None],
        idle,
        ..Default::default()
    })
    .expect("reactor")
    .pop()
    .expect("one reactor");
    let dir = tempfile::tempdir().expect("tempdir");
    let target = Target::new(dir.path().into(), 1, 16);
    // The spec goes in as the volume_create RPC's parameters would: this crate names
    // only the target's front-end API (ci/layers.py rule 4), not its `spec` module.
    let spec = serde::Deserialize::deserialize(MapDeserializer::<_, DeError>::new(
        [
            ("name", Val::Str("vol")),
            ("backend", Val::Str("mem")),
            ("size_bytes", Val::U64(VOL_BYTES)),
            ("block_size", Val::U64(512)),
            ("chunk_size", Val::U64(4096)),
            ("direct", Val::Bool(false)),
        ]
        .into_iter(),
    ))
    .expect("volume spec");
    target.add_volume(spec).expect("volume");
    let bdev = target.open("vol", Label::INTERNAL).expect("open");
    Rig {
        r,
        bdev,
        _target: target,
        _dir: dir,
    }
}

/// A parameter value of the volume spec `rig` builds.
#[derive(Clone, Copy)]
enum Val {
    Str(&'static str),
    U64(u64),
    Bool(bool),
}

impl<'de> IntoDeserializer<'de, DeError> for Val {
    type Deserializer = Val;
    fn into_deserializer(self) -> Val {
        self
    }
}

impl<'de> serde::Deserializer<'de> for Val {
    type Error = DeError;

    fn deserialize_any<V: Visitor<'de>>(self, v: V) -> Result<V::Value, DeError> {
        match self {
            Val::Str(s) => v.visit_borrowed_str(s),
            Val::U64(n) => v.visit_u64(n),
            Val::Bool(b) => v.visit_bool(b),
        }
    }

    fn deserialize_option<V: Visitor<'de>>(self, v: V) -> Result<V::Value, DeError> {
        v.visit_some(self)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _variants: &'static [&'static str],
        v: V,
    ) -> Result<V::Value, DeError> {
        match self {
            Val::Str(s) => v.visit_enum(s.into_deserializer()),
            _ => self.deserialize_any(v),
        }
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes
        byte_buf unit unit_struct newtype_struct seq tuple tuple_struct map struct
        identifier ignored_any
    }
}

fn eventfd() -> OwnedFd {
    // SAFETY: plain syscall; the result is checked before it becomes an OwnedFd.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    assert!(fd >= 0, "eventfd");
    // SAFETY: a fresh descriptor nobody else owns.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

fn dup(fd: &OwnedFd) -> OwnedFd {
    fd.try_clone().expect("dup")
}

/// Reads an eventfd's counter (0 when it was not signalled).
fn take_signal(fd: &OwnedFd) -> u64 {
    let mut v = 0u64;
    // SAFETY: reads 8 bytes into a live u64 from a descriptor we own.
    let n = unsafe { libc::read(fd.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
    if n == 8 {
        v
    } else {
        0
    }
}

fn kick(fd: &OwnedFd) {
    let one = 1u64;
    // SAFETY: writes 8 bytes from a live u64 to a descriptor we own.
    let n = unsafe { libc::write(fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
    assert_eq!(n, 8, "kick");
}

/// A started queue and the driver's ends of its eventfds.
struct Q {
    h: QueueHandle,
    d: Driver,
    kick: OwnedFd,
    call: OwnedFd,
    err: OwnedFd,
    counters: Arc<QueueCounters>,
}

#[derive(Default)]
struct Opts {
    read_only: bool,
    event_idx: bool,
    next_avail: u16,
    inflight: Option<InflightQueue>,
}

fn start(rig: &mut Rig, d: Driver, o: Opts) -> Q {
    let (kick, call, err) = (eventfd(), eventfd(), eventfd());
    let counters = Arc::new(QueueCounters::default());
    let setup = QueueSetup {
        index: 0,
        size: d.size,
        desc_table: DESC,
        avail_ring: crate::virtq::testdriver::AVAIL,
        used_ring: USED,
        next_avail: o.next_avail,
        event_idx: o.event_idx,
        mem: d.mem.clone(),
        kick: dup(&kick),
        call: Some(dup(&call)),
        err: Some(dup(&err)),
        bdev: rig.bdev.clone(),
        read_only: o.read_only,
        inflight: o.inflight,
        counters: counters.clone(),
    };
    let h = start_queue(&mut rig.r, setup);
    Q {
        h,
        d,
        kick,
        call,
        err,
        counters,
    }
}

fn spin(rig: &mut Rig, n: usize) {
    for _ in 0..n {
        rig.r.poll_once();
    }
}

/// Runs the reactor until `cond` holds (true) or [`BOUND`] passes (false).
fn until(r: &mut Reactor, mut cond: impl FnMut() -> bool) -> bool {
    let t0 = Instant::now();
    while t0.elapsed() < BOUND {
        r.poll_once();
        if cond() {
            return true;
        }
    }
    false
}

/// Runs the reactor until `n` more used entries show up; returns them.
fn serve(rig: &mut Rig, q: &mut Q, n: usize) -> Vec<(u32, u32)> {
    let mut got = Vec::new();
    let d = &mut q.d;
    let ok = until(&mut rig.r, || {
        got.extend(d.used());
        got.len() >= n
    });
    assert!(ok, "{n} requests not served, got {got:?}");
    got
}

/// The queue's next avail index (how many heads it popped).
fn popped(rig: &mut Rig, q: &Q) -> u16 {
    next_avail_of(&mut rig.r, &q.h).expect("queue running")
}

/// Stops the queue and waits for the reply.
fn stop(rig: &mut Rig, q: &Q) -> u16 {
    let replied = Arc::new(Mutex::new(None));
    let r2 = replied.clone();
    stop_queue(
        &mut rig.r,
        &q.h,
        Box::new(move |n| *r2.lock().unwrap() = Some(n)),
    );
    let ok = until(&mut rig.r, || replied.lock().unwrap().is_some());
    assert!(ok, "stop not answered");
    let n = replied.lock().unwrap().expect("reply");
    n
}

/// Publishes `req`, serves it; returns `(used len, status)`.
fn one(rig: &mut Rig, q: &mut Q, req: Req) -> (u32, u8) {
    q.d.publish(req.head);
    let used = serve(rig, q, 1);
    assert_eq!(used.len(), 1);
    assert_eq!(used[0].0, u32::from(req.head), "used id is the head");
    (used[0].1, q.d.byte(req.status))
}

/// Runs a block request on the reactor directly (not through the queue).
fn direct(rig: &mut Rig, op: BlockOp) -> ringblk_target::bdev::IoResult {
    let out = Rc::new(RefCell::new(None));
    let o = out.clone();
    let ch = rig.bdev.channel(&mut rig.r);
    ch.submit(
        &mut rig.r,
        &rig.bdev,
        op,
        Done::from_fn(move |_, res| *o.borrow_mut() = Some(res)),
    );
    let ok = until(&mut rig.r, || out.borrow().is_some());
    assert!(ok, "direct block request not done");
    let res = out.borrow_mut().take().expect("result");
    res
}

fn vol_read(rig: &mut Rig, offset: u64, len: u32) -> Vec<u8> {
    let buf = rig.bdev.channel(&mut rig.r).alloc(&mut rig.r, len);
    match direct(
        rig,
        BlockOp::Read {
            offset,
            len,
            into: buf.into(),
        },
    ) {
        Ok(IoOutput::Read(ReadData::Data(DataBuf::Own(b)))) => {
            b.as_slice()[..len as usize].to_vec()
        }
        Ok(IoOutput::Read(ReadData::Zeroes(_))) => vec![0; len as usize],
        other => panic!("volume read: {other:?}"),
    }
}

fn vol_write(rig: &mut Rig, offset: u64, bytes: &[u8]) {
    let mut buf = rig
        .bdev
        .channel(&mut rig.r)
        .alloc(&mut rig.r, bytes.len() as u32);
    buf.as_mut_slice()[..bytes.len()].copy_from_slice(bytes);
    let res = direct(
        rig,
        BlockOp::Write {
            offset,
            len: bytes.len() as u32,
            data: buf.into(),
            fua: false,
        },
    );
    assert!(res.is_ok(), "volume write: {res:?}");
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
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

fn ensure(ok: bool, what: impl std::fmt::Display) -> Result<(), String> {
    if ok {
        Ok(())
    } else {
        Err(what.to_string())
    }
}

// -------------------------------------------------------------------------------------
// Bytes

/// OUT with two data segments, then IN with two (split differently): the volume holds
/// the bytes (read directly) and the guest gets them back; used lengths are 1 and
/// data + 1.
fn roundtrip() -> Result<(), String> {
    let mut rig = rig(IdlePolicy::Busy);
    let mut q = start(&mut rig, Driver::new(64), Opts::default());
    let w = pattern(1, 12288);
    let (sector, off) = (24u64, 24 * 512);
    // OUT: header, 4 KiB + 8 KiB, status.
    let hdr = q.d.header(1, sector);
    let (a, b) = (q.d.alloc(4096), q.d.alloc(8192));
    q.d.write(a, &w[..4096]);
    q.d.write(b, &w[4096..]);
    let st = q.d.status_byte();
    let head =
        q.d.chain(&[(hdr, 16, 0), (a, 4096, 0), (b, 8192, 0), (st, 1, F_WRITE)]);
    let (len, status) = one(
        &mut rig,
        &mut q,
        Req {
            head,
            status: st,
            data: a,
        },
    );
    ensure(
        status == S_OK && len == 1,
        format!("write: status {status} len {len}"),
    )?;
    ensure(
        vol_read(&mut rig, off, 12288) == w,
        "volume bytes after the write",
    )?;
    // IN: header, 8 KiB + 4 KiB, status.
    let hdr = q.d.header(0, sector);
    let (a, b) = (q.d.alloc(8192), q.d.alloc(4096));
    let st = q.d.status_byte();
    let head = q.d.chain(&[
        (hdr, 16, 0),
        (a, 8192, F_WRITE),
        (b, 4096, F_WRITE),
        (st, 1, F_WRITE),
    ]);
    let (len, status) = one(
        &mut rig,
        &mut q,
        Req {
            head,
            status: st,
            data: a,
        },
    );
    ensure(
        status == S_OK && len == 12289,
        format!("read: status {status} len {len}"),
    )?;
    let mut got = q.d.read(a, 8192);
    got.extend(q.d.read(b, 4096));
    ensure(got == w, "guest bytes after the read")?;
    ensure(
        q.counters.served.load(Ordering::Relaxed) == 2,
        "served counter",
    )
}

#[test]
fn read_write_bytes_roundtrip() {
    roundtrip().unwrap();
}

#[test]
fn read_write_bytes_roundtrip_negative_control() {
    let res = plant::with(Plant::ReverseSegments, roundtrip);
    assert!(res.is_err(), "segments out of order went unnoticed");
}

/// An indirect table; a header split over two descriptors; data and status in one
/// descriptor (VIRTIO_F_ANY_LAYOUT). Checked against `expect` (the test passes the
/// bytes it wrote; the control passes other bytes).
fn layouts(expect_seed: u64) -> Result<(), String> {
    let mut rig = rig(IdlePolicy::Busy);
    let mut q = start(&mut rig, Driver::new(16), Opts::default());
    let w = pattern(2, 8192);
    vol_write(&mut rig, 0, &w);
    let expect = pattern(expect_seed, 8192);
    // Indirect: header, data, status in the table.
    let hdr = q.d.header(0, 0);
    let data = q.d.alloc(4096);
    let st = q.d.status_byte();
    let head =
        q.d.indirect(&[(hdr, 16, 0), (data, 4096, F_WRITE), (st, 1, F_WRITE)]);
    let (len, status) = one(
        &mut rig,
        &mut q,
        Req {
            head,
            status: st,
            data,
        },
    );
    ensure(
        status == S_OK && len == 4097,
        format!("indirect: {status} {len}"),
    )?;
    ensure(
        q.d.read(data, 4096) == expect[..4096],
        "indirect read bytes",
    )?;
    // Header in two pieces; the status is the byte after the data in one buffer.
    let hdr = q.d.header(0, 8);
    let buf = q.d.alloc(4097);
    q.d.write(buf + 4096, &[0xff]);
    let head =
        q.d.chain(&[(hdr, 8, 0), (hdr + 8, 8, 0), (buf, 4097, F_WRITE)]);
    let (len, status) = one(
        &mut rig,
        &mut q,
        Req {
            head,
            status: buf + 4096,
            data: buf,
        },
    );
    ensure(
        status == S_OK && len == 4097,
        format!("any layout: {status} {len}"),
    )?;
    ensure(
        q.d.read(buf, 4096) == expect[4096..],
        "any-layout read bytes",
    )
}

#[test]
fn indirect_and_any_layout() {
    layouts(2).unwrap();
}

#[test]
fn indirect_and_any_layout_negative_control() {
    assert!(layouts(3).is_err(), "wrong bytes went unnoticed");
}

/// FLUSH, GET_ID (the volume's name, zero-padded), an unknown type.
fn misc(name: &str) -> Result<(), String> {
    let mut rig = rig(IdlePolicy::Busy);
    let mut q = start(&mut rig, Driver::new(16), Opts::default());
    let req = q.d.bare_req(4);
    let (len, status) = one(&mut rig, &mut q, req);
    ensure(status == S_OK && len == 1, format!("flush: {status} {len}"))?;
    let hdr = q.d.header(8, 0);
    let id = q.d.alloc(20);
    q.d.write(id, &[0xee; 20]);
    let st = q.d.status_byte();
    let head =
        q.d.chain(&[(hdr, 16, 0), (id, 20, F_WRITE), (st, 1, F_WRITE)]);
    let (len, status) = one(
        &mut rig,
        &mut q,
        Req {
            head,
            status: st,
            data: id,
        },
    );
    ensure(
        status == S_OK && len == 21,
        format!("get id: {status} {len}"),
    )?;
    ensure(q.d.read(id, 20) == blk::serial(name), "serial")?;
    let req = q.d.bare_req(2); // VIRTIO_BLK_T_SCSI_CMD
    let (len, status) = one(&mut rig, &mut q, req);
    ensure(
        status == S_UNSUPP && len == 1,
        format!("unknown type: {status} {len}"),
    )
}

#[test]
fn flush_get_id_and_unknown_types() {
    misc("vol").unwrap();
}

#[test]
fn flush_get_id_and_unknown_types_negative_control() {
    assert!(misc("other").is_err(), "a wrong serial went unnoticed");
}

/// WRITE_ZEROES with two segments zeroes exactly those ranges; discard succeeds;
/// unsupported flags and limits answer UNSUPP/IOERR. `model_zeroes`: the control
/// checks against a model that forgets the zeroing.
fn dwz(model_zeroes: bool) -> Result<(), String> {
    let mut rig = rig(IdlePolicy::Busy);
    let mut q = start(&mut rig, Driver::new(64), Opts::default());
    let w = pattern(4, 65536);
    vol_write(&mut rig, 0, &w);
    let mut model = w.clone();
    let req = q.d.dwz_req(13, &[(8, 8, 1), (40, 16, 0)]);
    let (len, status) = one(&mut rig, &mut q, req);
    ensure(
        status == S_OK && len == 1,
        format!("write zeroes: {status} {len}"),
    )?;
    if model_zeroes {
        model[8 * 512..16 * 512].fill(0);
        model[40 * 512..56 * 512].fill(0);
    }
    ensure(
        vol_read(&mut rig, 0, 65536) == model,
        "bytes after write zeroes",
    )?;
    let req = q.d.dwz_req(11, &[(64, 8, 0)]);
    let (_, status) = one(&mut rig, &mut q, req);
    ensure(status == S_OK, format!("discard: {status}"))?;
    for (kind, segs, want) in [
        (11, vec![(0, 8, 1)], S_UNSUPP),              // UNMAP on a discard
        (13, vec![(0, 8, 2)], S_UNSUPP),              // unknown flag
        (11, vec![(0, u32::MAX, 0)], S_IOERR),        // past max_discard_sectors
        (13, vec![(u64::MAX, 1, 0)], S_IOERR),        // sector overflow
        (13, vec![(0, 1, 0); 17], S_IOERR),           // past max_write_zeroes_seg
        (11, vec![(VOL_BYTES / 512, 8, 0)], S_IOERR), // past the end
    ] {
        let req = q.d.dwz_req(kind, &segs);
        let (len, status) = one(&mut rig, &mut q, req);
        ensure(
            status == want && len == 1,
            format!("{kind} {segs:?}: {status} {len}"),
        )?;
    }
    Ok(())
}

#[test]
fn discard_and_write_zeroes() {
    dwz(true).unwrap();
}

#[test]
fn discard_and_write_zeroes_negative_control() {
    assert!(dwz(false).is_err(), "zeroing went unnoticed");
}

/// A read-only queue: OUT, DISCARD, WRITE_ZEROES answer IOERR and the volume does
/// not change; IN and FLUSH work.
fn read_only() -> Result<(), String> {
    let mut rig = rig(IdlePolicy::Busy);
    let mut q = start(
        &mut rig,
        Driver::new(16),
        Opts {
            read_only: true,
            ..Opts::default()
        },
    );
    let w = pattern(5, 8192);
    vol_write(&mut rig, 0, &w);
    let req = q.d.write_req(0, &pattern(6, 4096));
    let (_, status) = one(&mut rig, &mut q, req);
    ensure(status == S_IOERR, format!("write: {status}"))?;
    let req = q.d.dwz_req(13, &[(8, 8, 0)]);
    let (_, status) = one(&mut rig, &mut q, req);
    ensure(status == S_IOERR, format!("write zeroes: {status}"))?;
    let req = q.d.dwz_req(11, &[(0, 16, 0)]);
    let (_, status) = one(&mut rig, &mut q, req);
    ensure(status == S_IOERR, format!("discard: {status}"))?;
    ensure(vol_read(&mut rig, 0, 8192) == w, "the volume changed")?;
    let req = q.d.read_req(0, 8192);
    let (_, status) = one(&mut rig, &mut q, req);
    ensure(status == S_OK && q.d.read(req.data, 8192) == w, "read")?;
    let req = q.d.bare_req(4);
    let (_, status) = one(&mut rig, &mut q, req);
    ensure(status == S_OK, "flush")
}

#[test]
fn read_only_queue_changes_nothing() {
    read_only().unwrap();
}

#[test]
fn read_only_queue_changes_nothing_negative_control() {
    let res = plant::with(Plant::IgnoreReadOnly, read_only);
    assert!(
        res.is_err(),
        "a write through a read-only queue went unnoticed"
    );
}

// -------------------------------------------------------------------------------------
// Malformed chains

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    Status(u8),
    Broken,
}

/// Builds a malformed request on `d`; returns its head and status address.
type Build = fn(&mut Driver) -> (u16, u64);

fn cases() -> Vec<(&'static str, Build, Outcome)> {
    fn next_out_of_range(d: &mut Driver) -> (u16, u64) {
        let hdr = d.header(0, 0);
        let st = d.status_byte();
        d.set_desc(DESC, 0, hdr, 16, F_NEXT, 200);
        let _ = st;
        (0, st)
    }
    fn looped(d: &mut Driver) -> (u16, u64) {
        let hdr = d.header(0, 0);
        let data = d.alloc(512);
        d.set_desc(DESC, 0, hdr, 16, F_NEXT, 1);
        d.set_desc(DESC, 1, data, 512, F_NEXT | F_WRITE, 0);
        (0, data)
    }
    fn nested_indirect(d: &mut Driver) -> (u16, u64) {
        let inner = d.alloc(16);
        let table = d.alloc(16);
        d.set_desc(table, 0, inner, 16, F_INDIRECT, 0);
        d.set_desc(DESC, 0, table, 16, F_INDIRECT, 0);
        (0, 0)
    }
    fn bad_indirect_len(d: &mut Driver) -> (u16, u64) {
        let table = d.alloc(64);
        d.set_desc(DESC, 0, table, 24, F_INDIRECT, 0);
        (0, 0)
    }
    fn indirect_outside_memory(d: &mut Driver) -> (u16, u64) {
        d.set_desc(DESC, 0, MEM_BYTES as u64, 32, F_INDIRECT, 0);
        (0, 0)
    }
    fn data_outside_memory(d: &mut Driver) -> (u16, u64) {
        let hdr = d.header(0, 0);
        let st = d.status_byte();
        let h = d.chain(&[
            (hdr, 16, 0),
            (MEM_BYTES as u64 - 512, 1024, F_WRITE),
            (st, 1, F_WRITE),
        ]);
        (h, st)
    }
    fn length_overflow(d: &mut Driver) -> (u16, u64) {
        let hdr = d.header(1, 0);
        let st = d.status_byte();
        let h = d.chain(&[(hdr, 16, 0), (u64::MAX - 511, 4096, 0), (st, 1, F_WRITE)]);
        (h, st)
    }
    fn total_overflow(d: &mut Driver) -> (u16, u64) {
        let hdr = d.header(0, 0);
        let st = d.status_byte();
        let h = d.chain(&[
            (hdr, 16, 0),
            (0x100000, u32::MAX - 511, F_WRITE),
            (0x100000, 4096, F_WRITE),
            (st, 1, F_WRITE),
        ]);
        (h, st)
    }
    fn status_not_writable(d: &mut Driver) -> (u16, u64) {
        let hdr = d.header(0, 0);
        let st = d.status_byte();
        let h = d.chain(&[(hdr, 16, 0), (st, 1, 0)]);
        (h, st)
    }
    fn status_outside_memory(d: &mut Driver) -> (u16, u64) {
        let hdr = d.header(4, 0);
        let h = d.chain(&[(hdr, 16, 0), (MEM_BYTES as u64, 1, F_WRITE)]);
        (h, 0)
    }
    fn read_with_readable_data(d: &mut Driver) -> (u16, u64) {
        let hdr = d.header(0, 0);
        let data = d.alloc(512);
        let st = d.status_byte();
        let h = d.chain(&[(hdr, 16, 0), (data, 512, 0), (st, 1, F_WRITE)]);
        (h, st)
    }
    fn write_with_writable_data(d: &mut Driver) -> (u16, u64) {
        let hdr = d.header(1, 0);
        let data = d.alloc(512);
        let st = d.status_byte();
        let h = d.chain(&[(hdr, 16, 0), (data, 512, F_WRITE), (st, 1, F_WRITE)]);
        (h, st)
    }
    fn readable_after_writable(d: &mut Driver) -> (u16, u64) {
        let hdr = d.header(0, 0);
        let data = d.alloc(1024);
        let st = d.status_byte();
        let h = d.chain(&[
            (hdr, 16, 0),
            (data, 512, F_WRITE),
            (data + 512, 512, 0),
            (st, 1, F_WRITE),
        ]);
        (h, st)
    }
    fn too_many_segments(d: &mut Driver) -> (u16, u64) {
        let hdr = d.header(0, 0);
        let data = d.alloc(257 * 512);
        let st = d.status_byte();
        let mut chain = vec![(hdr, 16, 0)];
        chain.extend((0..257u64).map(|i| (data + 512 * i, 512, F_WRITE)));
        chain.push((st, 1, F_WRITE));
        (d.indirect(&chain), st)
    }
    fn short_header(d: &mut Driver) -> (u16, u64) {
        let hdr = d.header(0, 0);
        let st = d.status_byte();
        (d.chain(&[(hdr, 8, 0), (st, 1, F_WRITE)]), st)
    }
    fn unaligned_length(d: &mut Driver) -> (u16, u64) {
        let hdr = d.header(0, 0);
        let data = d.alloc(1000);
        let st = d.status_byte();
        (
            d.chain(&[(hdr, 16, 0), (data, 1000, F_WRITE), (st, 1, F_WRITE)]),
            st,
        )
    }
    fn sector_overflow(d: &mut Driver) -> (u16, u64) {
        let hdr = d.header(0, u64::MAX / 256);
        let data = d.alloc(512);
        let st = d.status_byte();
        (
            d.chain(&[(hdr, 16, 0), (data, 512, F_WRITE), (st, 1, F_WRITE)]),
            st,
        )
    }
    fn head_out_of_range(_: &mut Driver) -> (u16, u64) {
        (5000, 0)
    }
    use Outcome::*;
    vec![
        ("next index >= size", next_out_of_range as Build, Broken),
        ("loop", looped as Build, Broken),
        ("indirect in indirect", nested_indirect as Build, Broken),
        ("indirect table length", bad_indirect_len as Build, Broken),
        (
            "indirect table outside memory",
            indirect_outside_memory as Build,
            Broken,
        ),
        ("head index >= size", head_out_of_range as Build, Broken),
        ("status not writable", status_not_writable as Build, Broken),
        (
            "status outside memory",
            status_outside_memory as Build,
            Broken,
        ),
        (
            "data outside memory",
            data_outside_memory as Build,
            Status(S_IOERR),
        ),
        (
            "address + length wraps",
            length_overflow as Build,
            Status(S_IOERR),
        ),
        (
            "total length overflow",
            total_overflow as Build,
            Status(S_IOERR),
        ),
        (
            "read with readable data",
            read_with_readable_data as Build,
            Status(S_IOERR),
        ),
        (
            "write with writable data",
            write_with_writable_data as Build,
            Status(S_IOERR),
        ),
        (
            "readable after writable",
            readable_after_writable as Build,
            Status(S_IOERR),
        ),
        (
            "too many segments",
            too_many_segments as Build,
            Status(S_IOERR),
        ),
        ("short header", short_header as Build, Status(S_IOERR)),
        (
            "length not a sector multiple",
            unaligned_length as Build,
            Status(S_IOERR),
        ),
        ("sector overflow", sector_overflow as Build, Status(S_IOERR)),
    ]
}

/// Runs every malformed case on a fresh queue; after a failed request a good one is
/// still served; after a break nothing more is, and the error eventfd fired.
fn malformed() -> Result<(), String> {
    let mut rig = rig(IdlePolicy::Busy);
    for (name, build, want) in cases() {
        let mut q = start(&mut rig, Driver::new(16), Opts::default());
        let (head, st) = build(&mut q.d);
        q.d.publish(head);
        spin(&mut rig, 8);
        let used = q.d.used();
        let got = if q.counters.broken.load(Ordering::Relaxed) {
            ensure(used.is_empty(), format!("{name}: broken but answered"))?;
            ensure(take_signal(&q.err) == 1, format!("{name}: no error signal"))?;
            Outcome::Broken
        } else {
            ensure(
                used.len() == 1,
                format!("{name}: {} used entries", used.len()),
            )?;
            ensure(
                used[0] == (u32::from(head), 1),
                format!("{name}: used {:?}", used[0]),
            )?;
            Outcome::Status(q.d.byte(st))
        };
        ensure(got == want, format!("{name}: {got:?}, want {want:?}"))?;
        // Then a good request.
        let good = q.d.read_req(0, 512);
        q.d.publish(good.head);
        if want == Outcome::Broken {
            // A broken queue pops nothing more, however long it runs.
            let before = popped(&mut rig, &q);
            spin(&mut rig, 16);
            ensure(
                popped(&mut rig, &q) == before,
                format!("{name}: popped after the break"),
            )?;
        } else {
            let d = &mut q.d;
            let ok = until(&mut rig.r, || !d.used().is_empty());
            ensure(ok, format!("{name}: the next request was not served"))?;
        }
        stop(&mut rig, &q);
    }
    Ok(())
}

#[test]
fn malformed_chains_fail_the_request_or_break_the_queue() {
    malformed().unwrap();
}

#[test]
fn malformed_chains_negative_control() {
    let res = plant::with(Plant::NoDirectionCheck, malformed);
    assert!(
        res.is_err(),
        "a data buffer of the wrong direction went unnoticed"
    );
}

/// An avail index more than the ring's size ahead breaks the queue.
#[test]
fn avail_index_too_far_ahead_breaks_the_queue() {
    let mut rig = rig(IdlePolicy::Busy);
    let mut q = start(&mut rig, Driver::new(16), Opts::default());
    q.d.set_avail_idx(17);
    spin(&mut rig, 4);
    assert!(q.counters.broken.load(Ordering::Relaxed));
    // Control: 16 ahead is allowed (every entry names head 0, a valid read).
    let mut q = start(&mut rig, Driver::new(16), Opts::default());
    let req = q.d.read_req(0, 512);
    assert_eq!(req.head, 0);
    q.d.set_avail_idx(16);
    let used = serve(&mut rig, &mut q, 16);
    assert_eq!(used.len(), 16);
    assert!(!q.counters.broken.load(Ordering::Relaxed));
}

// -------------------------------------------------------------------------------------
// Stopping, notifications, parking

/// stop_queue answers after every request in flight has completed, with the next
/// avail index.
fn stop_drains() -> Result<(), String> {
    let mut rig = rig(IdlePolicy::Busy);
    let mut q = start(&mut rig, Driver::new(16), Opts::default());
    for i in 0..3 {
        let req = q.d.read_req(i * 8, 4096);
        q.d.publish(req.head);
    }
    // One iteration pops and submits; completions come in a later one.
    rig.r.poll_once();
    let seen = Arc::new(Mutex::new(None));
    let (s2, mem) = (seen.clone(), q.d.mem.clone());
    stop_queue(
        &mut rig.r,
        &q.h,
        Box::new(move |n| {
            let mut b = [0u8; 2];
            mem.read_slice(&mut b, vm_memory::GuestAddress(USED + 2))
                .expect("used idx");
            *s2.lock().unwrap() = Some((n, u16::from_le_bytes(b)));
        }),
    );
    until(&mut rig.r, || seen.lock().unwrap().is_some());
    let got = *seen.lock().unwrap();
    ensure(
        got == Some((3, 3)),
        format!("reply (next avail, used idx at reply): {got:?}"),
    )?;
    // Nothing is popped after the stop.
    let req = q.d.read_req(0, 512);
    q.d.publish(req.head);
    spin(&mut rig, 8);
    ensure(q.d.used().len() == 3, "served after the stop")
}

#[test]
fn stop_drains_then_replies_next_avail() {
    stop_drains().unwrap();
}

#[test]
fn stop_drains_negative_control() {
    let res = plant::with(Plant::ReplyEarly, stop_drains);
    assert!(res.is_err(), "a reply before the drain went unnoticed");
}

/// Interrupt mode: the queue parks (notifications on, kick read armed) and serves
/// only after a kick; then polls again until idle. Stop cancels the kick read.
#[test]
fn interrupt_mode_parks_and_wakes_on_kick() {
    let mut rig = rig(IdlePolicy::Interrupt);
    let mut q = start(&mut rig, Driver::new(16), Opts::default());
    spin(&mut rig, 4);
    // Parked: no NO_NOTIFY flag in the used ring (no EVENT_IDX).
    assert_eq!(
        q.d.read(USED, 2),
        [0, 0],
        "notifications enabled while parked"
    );
    let req = q.d.read_req(0, 512);
    q.d.publish(req.head);
    spin(&mut rig, 50);
    // The control of this test: without a kick a parked queue does not see it.
    assert_eq!(
        popped(&mut rig, &q),
        0,
        "popped without a kick: the queue never parked"
    );
    kick(&q.kick);
    let used = serve(&mut rig, &mut q, 1);
    assert_eq!(used, vec![(u32::from(req.head), 513)]);
    // The call eventfd was signalled (no EVENT_IDX: every time).
    assert_eq!(take_signal(&q.call), 1);
    // Idle again: parked again, with a kick read armed that the stop cancels.
    spin(&mut rig, 4);
    assert_eq!(q.d.read(USED, 2), [0, 0], "parked again");
    assert_eq!(stop(&mut rig, &q), 1);
}

/// A request published between the last empty poll and the notification enable is
/// caught by the re-check (no kick needed).
#[test]
fn interrupt_mode_recheck_catches_a_late_publish() {
    let mut rig = rig(IdlePolicy::Interrupt);
    let mut q = start(&mut rig, Driver::new(16), Opts::default());
    let req = q.d.read_req(0, 512);
    q.d.publish(req.head);
    // The first poll pops it (not parked yet); no kick ever.
    let used = serve(&mut rig, &mut q, 1);
    assert_eq!(used.len(), 1);
}

/// EVENT_IDX: the call eventfd fires when used_event says so, not otherwise.
fn event_idx(event_idx: bool) -> Result<(), String> {
    let mut rig = rig(IdlePolicy::Busy);
    let mut q = start(
        &mut rig,
        Driver::new(16),
        Opts {
            event_idx,
            ..Opts::default()
        },
    );
    // used_event 0: notify when the used index passes 0.
    q.d.set_used_event(0);
    let req = q.d.read_req(0, 512);
    one(&mut rig, &mut q, req);
    ensure(take_signal(&q.call) == 1, "first completion not signalled")?;
    // used_event 10: the next completion (used index 2) is not signalled.
    q.d.set_used_event(10);
    let req = q.d.read_req(0, 512);
    one(&mut rig, &mut q, req);
    ensure(
        take_signal(&q.call) == 0,
        "completion signalled against used_event",
    )
}

/// Without EVENT_IDX: the avail ring's NO_INTERRUPT flag suppresses calls.
fn no_interrupt_flag(set: bool) -> Result<(), String> {
    let mut rig = rig(IdlePolicy::Busy);
    let mut q = start(&mut rig, Driver::new(16), Opts::default());
    let req = q.d.read_req(0, 512);
    one(&mut rig, &mut q, req);
    ensure(take_signal(&q.call) == 1, "completion not signalled")?;
    if set {
        q.d.write(crate::virtq::testdriver::AVAIL, &1u16.to_le_bytes());
    }
    let req = q.d.read_req(0, 512);
    one(&mut rig, &mut q, req);
    ensure(
        take_signal(&q.call) == 0,
        "completion signalled against NO_INTERRUPT",
    )
}

#[test]
fn no_interrupt_flag_suppresses_calls() {
    no_interrupt_flag(true).unwrap();
}

#[test]
fn no_interrupt_flag_negative_control() {
    assert!(
        no_interrupt_flag(false).is_err(),
        "without the flag every completion signals"
    );
}

#[test]
fn event_idx_suppresses_calls() {
    event_idx(true).unwrap();
}

#[test]
fn event_idx_negative_control() {
    assert!(
        event_idx(false).is_err(),
        "without EVENT_IDX every completion signals"
    );
    let res = plant::with(Plant::AlwaysSignal, || event_idx(true));
    assert!(res.is_err(), "a signal against used_event went unnoticed");
}

// -------------------------------------------------------------------------------------
// Inflight

/// A real INFLIGHT_SHMFD region (memfd) of one queue part, and that part.
fn region(size: u16) -> (Arc<InflightRegion>, InflightQueue) {
    let r = InflightRegion::create(1, size).expect("inflight region");
    let q = r.queue(0).expect("queue 0");
    (r, q)
}

/// The region's bytes, as another process (QEMU) sees them.
fn peek(r: &InflightRegion) -> Vec<u8> {
    let mut b = vec![0u8; r.mmap_size() as usize];
    r.file().read_exact_at(&mut b, 0).expect("read region");
    b
}

/// Writes `bytes` at `at` of the region, as a previous server would have.
fn poke(r: &InflightRegion, at: u64, bytes: &[u8]) {
    r.file().write_all_at(bytes, at).expect("write region");
}

/// A previous server popped request A (logged in flight) and died. The restarted
/// queue, given vring base = used index (QEMU's rule), resubmits A from the log,
/// pops B from the avail ring after it, and serves each once. `mark`: whether the
/// log says A is in flight (the control: without it, nothing is resubmitted).
fn inflight(mark: bool) -> Result<(), String> {
    let size = 16;
    let mut rig = rig(IdlePolicy::Busy);
    let mut d = Driver::new(size);
    let w = pattern(7, 4096);
    let a = d.write_req(0, &w);
    let b = d.read_req(0, 4096);
    d.publish(a.head);
    d.publish(b.head);
    let (bytes, region_q) = region(size);
    poke(&bytes, 8, &[1]); // version
    poke(&bytes, 10, &size.to_le_bytes());
    if mark {
        poke(&bytes, 16 + 16 * u64::from(a.head), &[1]);
    }
    let mut q = start(
        &mut rig,
        d,
        Opts {
            inflight: Some(region_q),
            next_avail: 0,
            ..Opts::default()
        },
    );
    // Served once each: with the log, A then B; without it, only A is popped from
    // index 0 (B's slot follows), so both are served as well, but nothing counts as
    // resubmitted.
    let used = serve(&mut rig, &mut q, 2);
    ensure(used.len() == 2, format!("used {used:?}"))?;
    ensure(
        used[0].0 == u32::from(a.head),
        "the resubmitted request goes first",
    )?;
    let resub = q.counters.resubmitted.load(Ordering::Relaxed);
    ensure(resub == 1, format!("resubmitted {resub}"))?;
    ensure(q.d.read(b.data, 4096) == w, "B reads what A wrote")?;
    // The log is clean again: nothing in flight.
    let m = peek(&bytes);
    let marks = (0..size as usize).filter(|&i| m[16 + 16 * i] != 0).count();
    ensure(marks == 0, format!("{marks} heads still marked in flight"))?;
    ensure(m[14..16] == [2, 0], "log used_idx")
}

#[test]
fn inflight_requests_are_resubmitted_first() {
    inflight(true).unwrap();
}

#[test]
fn inflight_negative_control() {
    assert!(
        inflight(false).is_err(),
        "a missing resubmission went unnoticed"
    );
}

/// A client's region describes 64 descriptors for a queue of 16 and marks A plus
/// 40 heads at or past 16 in flight: only A is resubmitted (next avail = used + 1),
/// B is popped after it, and the queue is not broken.
fn inflight_oversized() -> Result<(), String> {
    let size = 16;
    let mut rig = rig(IdlePolicy::Busy);
    let mut d = Driver::new(size);
    let a = d.read_req(0, 512);
    let b = d.read_req(512, 512);
    d.publish(a.head);
    d.publish(b.head);
    let desc_num = 64u16;
    let (bytes, region_q) = region(desc_num);
    poke(&bytes, 8, &[1]); // version
    poke(&bytes, 10, &desc_num.to_le_bytes());
    poke(&bytes, 16 + 16 * u64::from(a.head), &[1]);
    for h in 20..60u64 {
        poke(&bytes, 16 + 16 * h, &[1]);
    }
    let mut q = start(
        &mut rig,
        d,
        Opts {
            inflight: Some(region_q),
            next_avail: 0,
            ..Opts::default()
        },
    );
    // Until both are answered or the queue breaks (the planted bug's outcome).
    let mut used = Vec::new();
    let (d, counters) = (&mut q.d, &q.counters);
    until(&mut rig.r, || {
        used.extend(d.used());
        used.len() >= 2 || counters.broken.load(Ordering::Relaxed)
    });
    ensure(
        !q.counters.broken.load(Ordering::Relaxed),
        "queue broken by heads past its size",
    )?;
    ensure(used.len() == 2, format!("used {used:?}"))?;
    let resub = q.counters.resubmitted.load(Ordering::Relaxed);
    ensure(resub == 1, format!("resubmitted {resub}"))?;
    ensure(
        used.iter().any(|u| u.0 == u32::from(b.head)),
        "B was not popped",
    )
}

#[test]
fn inflight_heads_past_the_queue_size_are_ignored() {
    inflight_oversized().unwrap();
}

#[test]
fn inflight_heads_past_the_queue_size_negative_control() {
    use crate::virtq::inflight::plant::PLANT_ALL_PENDING;
    PLANT_ALL_PENDING.with(|p| p.set(true));
    let r = inflight_oversized();
    PLANT_ALL_PENDING.with(|p| p.set(false));
    assert!(r.is_err(), "heads past the queue size went unnoticed");
}

/// Popped requests are logged in flight until completed.
#[test]
fn inflight_log_tracks_requests_in_flight() {
    let size = 16;
    let mut rig = rig(IdlePolicy::Busy);
    let (bytes, region_q) = region(size);
    let mut q = start(
        &mut rig,
        Driver::new(size),
        Opts {
            inflight: Some(region_q),
            ..Opts::default()
        },
    );
    let req = q.d.read_req(0, 4096);
    q.d.publish(req.head);
    // One iteration pops and submits; the completion comes later.
    rig.r.poll_once();
    let marked = peek(&bytes)[16 + 16 * usize::from(req.head)];
    assert_eq!(marked, 1, "popped request not logged");
    serve(&mut rig, &mut q, 1);
    let marked = peek(&bytes)[16 + 16 * usize::from(req.head)];
    assert_eq!(marked, 0, "completed request still logged");
}

// -------------------------------------------------------------------------------------
// Back-pressure

/// 17 queues of 128 on one reactor and one volume, 128 requests each (every avail
/// entry names the same chain): one iteration pops 64 per queue, more than the
/// channel's CHANNEL_DEPTH (1024) at once, so the channel says Full. Checked: a queue
/// that waits for room pops nothing until `when_room` (counted by the queue at every
/// pop); every request completes OK (back-pressure, never failure); some queue did
/// wait.
fn pressure() -> Result<(), String> {
    const QUEUES: usize = 17;
    let mut rig = rig(IdlePolicy::Busy);
    let mut qs: Vec<Q> = (0..QUEUES)
        .map(|_| {
            let mut d = Driver::new(128);
            let req = d.read_req(0, 4096);
            assert_eq!(req.head, 0);
            d.set_avail_idx(128);
            start(&mut rig, d, Opts::default())
        })
        .collect();
    let mut done = vec![0usize; QUEUES];
    let t0 = Instant::now();
    while done.iter().any(|&n| n < 128) {
        if t0.elapsed() > BOUND {
            return Err(format!("not all served: {done:?}"));
        }
        rig.r.poll_once();
        for (i, q) in qs.iter_mut().enumerate() {
            let n = pops_while_blocked(&mut rig.r, &q.h).expect("running");
            ensure(
                n == 0,
                format!("queue {i} popped {n} times while waiting for room"),
            )?;
            for (id, len) in q.d.used() {
                ensure(
                    id == 0 && len == 4097,
                    format!("queue {i}: used ({id}, {len})"),
                )?;
                done[i] += 1;
            }
        }
    }
    for (i, q) in qs.iter().enumerate() {
        ensure(
            q.counters.errors.load(Ordering::Relaxed) == 0,
            format!("queue {i}: errors"),
        )?;
    }
    let full: u64 = qs
        .iter()
        .map(|q| q.counters.full.load(Ordering::Relaxed))
        .sum();
    ensure(full > 0, "the channel never said Full")
}

#[test]
fn channel_full_stops_popping_until_room() {
    pressure().unwrap();
}

#[test]
fn channel_full_negative_control() {
    let res = plant::with(Plant::PopWhenFull, pressure);
    assert!(
        res.is_err(),
        "popping while the channel is full went unnoticed"
    );
}

/// Adaptive mode parks after its idle spell like interrupt mode, and wakes on a kick.
#[test]
fn adaptive_mode_parks_after_the_spell() {
    let mut rig = rig(IdlePolicy::Adaptive { poll_us: 1 });
    let mut q = start(&mut rig, Driver::new(16), Opts::default());
    let req = q.d.read_req(0, 512);
    q.d.publish(req.head);
    serve(&mut rig, &mut q, 1);
    let parked = until(&mut rig.r, || q.d.read(USED, 2) == [0, 0]);
    assert!(parked, "never parked");
    let req = q.d.read_req(0, 512);
    q.d.publish(req.head);
    spin(&mut rig, 50);
    assert_eq!(popped(&mut rig, &q), 1, "popped without a kick: not parked");
    kick(&q.kick);
    assert_eq!(serve(&mut rig, &mut q, 1).len(), 1);
    assert_eq!(stop(&mut rig, &q), 2);
}

/// A reactor stop ends its queues (waiting for their requests); a stop_queue that
/// comes afterwards still gets the queue's next avail index, not the fallback 0
/// (which is this test's control: 2 requests were served, so 0 fails it).
#[test]
fn reactor_stop_ends_queues_and_keeps_their_index() {
    let mut rig = rig(IdlePolicy::Interrupt);
    let mut q = start(&mut rig, Driver::new(16), Opts::default());
    for _ in 0..2 {
        let req = q.d.read_req(0, 512);
        q.d.publish(req.head);
        kick(&q.kick);
        serve(&mut rig, &mut q, 1);
    }
    // Parked with a kick read armed: the stop must cancel it to finish.
    spin(&mut rig, 4);
    rig.r.handle().request_stop();
    rig.r.run();
    assert_eq!(next_avail_of(&mut rig.r, &q.h), None, "queue still running");
    assert_eq!(stop(&mut rig, &q), 2);
}

/// set_mem: requests after it are read from, and answered in, the new mapping. Here
/// the new table is another memory with its own copy of the rings (a driver that
/// re-laid its memory). The control (below) is a queue never told.
fn new_table() -> Result<(), String> {
    let mut rig = rig(IdlePolicy::Busy);
    let mut q = start(&mut rig, Driver::new(16), Opts::default());
    let w = pattern(9, 4096);
    vol_write(&mut rig, 4096, &w);
    let req = q.d.read_req(8, 4096);
    one(&mut rig, &mut q, req);
    // The second memory: the same ring state (one request already used).
    let mut d2 = Driver::new(16);
    let first = d2.read_req(0, 512);
    d2.publish(first.head);
    d2.write(USED + 2, &1u16.to_le_bytes());
    d2.used();
    set_mem(&mut rig.r, &q.h, d2.mem.clone());
    let req = d2.read_req(8, 4096);
    d2.publish(req.head);
    let d = &mut d2;
    let served = until(&mut rig.r, || d.used_idx() == 2);
    ensure(
        served,
        "the request in the new table was not answered there",
    )?;
    ensure(d2.byte(req.status) == S_OK, "status")?;
    ensure(d2.read(req.data, 4096) == w, "bytes in the new table")
}

#[test]
fn set_mem_takes_the_new_table() {
    new_table().unwrap();
}

#[test]
fn set_mem_negative_control() {
    // Without set_mem the queue never sees the new memory (checked directly: the
    // positive test's wait would run to BOUND).
    let mut rig = rig(IdlePolicy::Busy);
    let q = start(&mut rig, Driver::new(16), Opts::default());
    let mut d2 = Driver::new(16);
    let req = d2.read_req(0, 512);
    d2.publish(req.head);
    spin(&mut rig, 64);
    assert_eq!(
        d2.used_idx(),
        0,
        "a queue not told of the new table answered in it"
    );
    assert_eq!(popped(&mut rig, &q), 0);
}

/// A setup the queue cannot run (a size that is not a power of two, rings outside
/// guest memory, a misaligned ring) starts broken: error eventfd signalled, nothing
/// popped, and a stop answers the base it was given. Control: the same driver with
/// a valid setup serves its request.
#[test]
fn unusable_setups_start_broken() {
    let mut rig = rig(IdlePolicy::Busy);
    for (name, size, used_ring) in [
        ("size 12", 12u16, USED),
        ("used ring outside memory", 16, MEM_BYTES as u64 - 8),
        ("misaligned used ring", 16, USED + 2),
        ("valid (control)", 16, USED),
    ] {
        let mut d = Driver::new(16);
        let req = d.read_req(0, 512);
        d.publish(req.head);
        let (kick_fd, call, err) = (eventfd(), eventfd(), eventfd());
        let counters = Arc::new(QueueCounters::default());
        let h = start_queue(
            &mut rig.r,
            QueueSetup {
                index: 0,
                size,
                desc_table: DESC,
                avail_ring: crate::virtq::testdriver::AVAIL,
                used_ring,
                next_avail: 0,
                event_idx: false,
                mem: d.mem.clone(),
                kick: kick_fd,
                call: Some(dup(&call)),
                err: Some(dup(&err)),
                bdev: rig.bdev.clone(),
                read_only: false,
                inflight: None,
                counters: counters.clone(),
            },
        );
        let valid = name.starts_with("valid");
        if valid {
            let dd = &mut d;
            assert!(
                until(&mut rig.r, || dd.used_idx() == 1),
                "{name}: not served"
            );
        } else {
            spin(&mut rig, 8);
            assert_eq!(d.used_idx(), 0, "{name}: served");
        }
        assert_eq!(counters.broken.load(Ordering::Relaxed), !valid, "{name}");
        assert_eq!(
            take_signal(&err),
            u64::from(!valid),
            "{name}: error eventfd"
        );
        let replied = Arc::new(Mutex::new(None));
        let r2 = replied.clone();
        stop_queue(
            &mut rig.r,
            &h,
            Box::new(move |n| *r2.lock().unwrap() = Some(n)),
        );
        assert!(until(&mut rig.r, || replied.lock().unwrap().is_some()));
        assert_eq!(
            *replied.lock().unwrap(),
            Some(u16::from(valid)),
            "{name}: base"
        );
    }
}

/// A kick fd that is not an eventfd (here /dev/null: every read returns 0 at once)
/// must not make an interrupt-mode queue spin between parking and waking: the queue
/// falls back to polling and still serves requests published without a kick.
/// Control: with a real eventfd the same unkicked request is not served.
fn odd_kick(eventfd_kick: bool) -> Result<(), String> {
    let mut rig = rig(IdlePolicy::Interrupt);
    let mut d = Driver::new(16);
    let req = d.read_req(0, 512);
    let kick_fd = if eventfd_kick {
        eventfd()
    } else {
        OwnedFd::from(std::fs::File::open("/dev/null").expect("/dev/null"))
    };
    let h = start_queue(
        &mut rig.r,
        QueueSetup {
            index: 0,
            size: 16,
            desc_table: DESC,
            avail_ring: crate::virtq::testdriver::AVAIL,
            used_ring: USED,
            next_avail: 0,
            event_idx: false,
            mem: d.mem.clone(),
            kick: kick_fd,
            call: None,
            err: None,
            bdev: rig.bdev.clone(),
            read_only: false,
            inflight: None,
            counters: Arc::new(QueueCounters::default()),
        },
    );
    spin(&mut rig, 16);
    // Without the fallback the queue re-arms a read that completes at once, every
    // iteration: it is found parked at the end of each.
    let parked = parked_of(&mut rig.r, &h).expect("running");
    ensure(!parked, "parked on a kick fd that is not an eventfd")?;
    d.publish(req.head);
    spin(&mut rig, 16);
    let popped = next_avail_of(&mut rig.r, &h).expect("running");
    ensure(popped == 1, format!("popped {popped} without a kick"))
}

#[test]
fn a_kick_fd_that_is_not_an_eventfd_falls_back_to_polling() {
    odd_kick(false).unwrap();
}

#[test]
fn a_kick_fd_that_is_not_an_eventfd_negative_control() {
    assert!(
        odd_kick(true).is_err(),
        "a parked queue popped without a kick"
    );
}

// -------------------------------------------------------------------------------------
// Stop releases resources before replying

/// A pipe: (read end, write end), non-blocking.
fn pipe() -> (OwnedFd, OwnedFd) {
    let mut fds = [0i32; 2];
    // SAFETY: `pipe2` writes two descriptors into the live array; checked below.
    let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) };
    assert_eq!(rc, 0, "pipe2");
    // SAFETY: fresh descriptors nobody else owns.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

/// Whether the other end of our pipe end is closed (POLLHUP / POLLERR).
fn peer_closed(fd: &OwnedFd) -> bool {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: 0,
        revents: 0,
    };
    // SAFETY: one live pollfd; zero timeout.
    let n = unsafe { libc::poll(&mut p, 1, 0) };
    n == 1 && p.revents & (libc::POLLHUP | libc::POLLERR) != 0
}

/// At the moment a stop is answered, the queue holds neither the guest mapping
/// (strong count: only the driver's) nor the kick/call/err descriptors (pipes here,
/// so their closing shows at our ends) nor the inflight log (its keep-alive).
fn stop_releases(policy: IdlePolicy) -> Result<(), String> {
    let mut rig = rig(policy);
    let mut d = Driver::new(16);
    let (kick_r, kick_w) = pipe();
    let (call_r, call_w) = pipe();
    let (err_r, err_w) = pipe();
    let (log, region_q) = region(16);
    let setup = QueueSetup {
        index: 0,
        size: d.size,
        desc_table: DESC,
        avail_ring: crate::virtq::testdriver::AVAIL,
        used_ring: USED,
        next_avail: 0,
        event_idx: false,
        mem: d.mem.clone(),
        kick: kick_r,
        call: Some(call_w),
        err: Some(err_w),
        bdev: rig.bdev.clone(),
        read_only: false,
        inflight: Some(region_q),
        counters: Arc::new(QueueCounters::default()),
    };
    let h = start_queue(&mut rig.r, setup);
    let req = d.read_req(0, 512);
    d.publish(req.head);
    let ok = until(&mut rig.r, || !d.used().is_empty());
    ensure(ok, "request not served")?;
    let mem = Arc::downgrade(&d.mem);
    let log_w = Arc::downgrade(&log);
    drop(log);
    let seen = Arc::new(Mutex::new(None));
    let s2 = seen.clone();
    let fds = [kick_w, call_r, err_r];
    stop_queue(
        &mut rig.r,
        &h,
        Box::new(move |_| {
            let closed = fds.iter().map(peer_closed).collect::<Vec<_>>();
            *s2.lock().unwrap() = Some((mem.strong_count(), log_w.strong_count(), closed));
        }),
    );
    let ok = until(&mut rig.r, || seen.lock().unwrap().is_some());
    ensure(ok, "stop not answered")?;
    let got = seen.lock().unwrap().take();
    ensure(
        got == Some((1, 0, vec![true, true, true])),
        format!("at the reply (mem refs, log refs, kick/call/err closed): {got:?}"),
    )
}

#[test]
fn stop_releases_resources_before_replying() {
    stop_releases(IdlePolicy::Busy).unwrap();
    stop_releases(IdlePolicy::Interrupt).unwrap();
}

#[test]
fn stop_releases_resources_negative_control() {
    let res = plant::with(Plant::KeepResources, || stop_releases(IdlePolicy::Busy));
    let err = res.expect_err("resources held past the reply went unnoticed");
    assert!(err.contains("Some((2, 1, [false, false, false]))"), "{err}");
}
