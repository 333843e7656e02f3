//! Seeded, deterministic multi-reactor tests of the switchover (SPDK's
//! ut_multithread style: several reactors polled in turn from one thread).
//!
//! Old-epoch writes are submitted on reactor 0 but not yet entered into the kernel
//! when the switch happens; reactor 1 then issues new-epoch *partial* writes to the
//! same chunks and is polled first, so their read-merge would read the base before
//! the old writes land — unless the drain rule holds them back. Then the drain, a
//! backup read, more writes, and a release (merge) under load. Everything is checked
//! against a byte model. With the drain rule planted away, the test must fail.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use ringblk_reactor::{manual_reactors, AlignedBuf, IoBuf, Reactor, ReactorConfig};

use crate::backend::BackendKind;
use crate::bdev::{Bdev, BlockOp, DataBuf, Done, IoOutput, OwnBuf, ReadData, View};
use crate::datapath::layered as io;
use crate::stats::Label;
use crate::switchover;
use crate::volume::{Volume, VolumeSpec};

const SIZE: u64 = 1 << 20;
const CHUNK: u64 = 16 << 10;
const SECTOR: u64 = 512;

fn volume(dir: &std::path::Path) -> Arc<Volume> {
    let spec = VolumeSpec {
        name: "sim".into(),
        path: None,
        size_bytes: Some(SIZE),
        block_size: 512,
        backend: BackendKind::Mem,
        read_only: false,
        direct: false,
        chunk_size: CHUNK as u32,
        grow: false,
    };
    Arc::new(Volume::open(spec, 2, dir).expect("volume"))
}

fn poll_until(rs: &mut [Reactor], order: &[usize], mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        for &i in order {
            rs[i].poll_once();
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "simulation stalled"
        );
    }
}

/// Submits a write on reactor `ri` through the volume's channel there, admitted
/// (pinned) now; counts completions.
fn write(
    rs: &mut [Reactor],
    ri: usize,
    vol: &Arc<Volume>,
    off: u64,
    data: Vec<u8>,
    done: &Rc<RefCell<usize>>,
) {
    let r = &mut rs[ri];
    let bdev = Bdev::open(vol.clone(), View::Live, Label::INTERNAL).expect("live view");
    let ch = bdev.channel(r);
    let mut buf = AlignedBuf::direct(data.len());
    buf.as_mut_slice().copy_from_slice(&data);
    let d = done.clone();
    let op = BlockOp::Write {
        offset: off,
        len: data.len() as u32,
        data: DataBuf::Own(OwnBuf::from_io(IoBuf::from(buf))),
        fua: false,
    };
    let before = ch.in_flight();
    ch.submit(
        r,
        &bdev,
        op,
        Done::from_fn(move |_, res| {
            assert!(res.is_ok(), "write failed: {res:?}");
            *d.borrow_mut() += 1;
        }),
    );
    // Started (pinned) inside submit, not queued: the test's epochs depend on it.
    assert_eq!(ch.in_flight(), before + 1, "write admitted at submit");
}

fn read_all(rs: &mut [Reactor], vol: &Arc<Volume>, backup: Option<&str>) -> Vec<u8> {
    let out = Rc::new(RefCell::new(None));
    let o = out.clone();
    let r = &mut rs[0];
    let bdev = match backup {
        None => Bdev::open(vol.clone(), View::Live, Label::INTERNAL),
        Some(b) => Bdev::open_backup(vol.clone(), b, Label::INTERNAL),
    }
    .expect("view");
    let ch = bdev.channel(r);
    let op = BlockOp::Read {
        offset: 0,
        len: SIZE as u32,
        into: DataBuf::Own(OwnBuf::aligned(SIZE as usize)),
    };
    ch.submit(
        r,
        &bdev,
        op,
        Done::from_fn(move |_, res| {
            let bytes = match res.expect("read") {
                IoOutput::Read(ReadData::Data(DataBuf::Own(b))) => b.as_slice().to_vec(),
                IoOutput::Read(ReadData::Zeroes(_)) => vec![0u8; SIZE as usize],
                other => panic!("not a read's output: {other:?}"),
            };
            *o.borrow_mut() = Some(bytes);
        }),
    );
    poll_until(rs, &[0, 1], || out.borrow().is_some());
    let v = out.borrow_mut().take().expect("read done");
    v
}

fn random_piece(rng: &mut rand::rngs::StdRng, chunk: u64) -> (u64, usize) {
    // A sector-aligned piece strictly inside one chunk (partial: needs read-merge).
    let sectors = CHUNK / SECTOR;
    let a = rng.gen_range(0..sectors - 1);
    let b = rng.gen_range(a + 1..sectors);
    (chunk * CHUNK + a * SECTOR, ((b - a) * SECTOR) as usize)
}

/// Returns the first mismatch description, if any.
fn run(seed: u64, plant_bug: bool) -> Option<String> {
    io::planted::SKIP_DRAIN_WAIT.with(|c| c.set(plant_bug));
    let dir = tempfile::tempdir().expect("tmp");
    let vol = volume(dir.path());
    let mut rs = manual_reactors(ReactorConfig {
        cores: vec![None, None],
        ..Default::default()
    })
    .expect("reactors");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut model = vec![0u8; SIZE as usize];
    let done = Rc::new(RefCell::new(0usize));
    let mut issued = 0;
    let chunks: Vec<u64> = (0..6)
        .map(|_| rng.gen_range(0..SIZE / CHUNK))
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();

    // Old epoch: one write per chosen chunk, covering most of it, on reactor 0,
    // queued but not yet in the kernel.
    for (i, &c) in chunks.iter().enumerate() {
        let data = vec![0x10 + i as u8; (CHUNK - SECTOR) as usize];
        let off = c * CHUNK + SECTOR;
        model[off as usize..off as usize + data.len()].copy_from_slice(&data);
        write(&mut rs, 0, &vol, off, data, &done);
        issued += 1;
    }
    let backup_model = model.clone();

    // The switch.
    let mut ctl = vol.control.lock().expect("control");
    let sw = switchover::switch(&mut ctl, &vol, "b", Instant::now()).expect("switch");
    switchover::quiesce(&rs[0].peers().clone(), &vol, &sw);

    // New epoch on reactor 1: partial writes to the same chunks (read-merge).
    for (i, &c) in chunks.iter().enumerate() {
        let (off, len) = random_piece(&mut rng, c);
        let data = vec![0xa0 + i as u8; len];
        model[off as usize..off as usize + len].copy_from_slice(&data);
        write(&mut rs, 1, &vol, off, data, &done);
        issued += 1;
    }
    // Reactor 1 alone first, so its read-merge reads are entered before reactor 0's
    // writes. Long enough for the new delta's first zero-ahead write to complete:
    // fills wait for it, and polling reactor 0 meanwhile would let the old writes
    // land first and hide a planted bug.
    let t = Instant::now();
    while t.elapsed() < Duration::from_millis(100) {
        rs[1].poll_once();
    }
    // The drain: each reactor in turn, between requests.
    poll_until(&mut rs, &[0, 1], || sw.drained_on(0) && sw.drained_on(1));
    switchover::mark_ready(&mut ctl, &vol, "b", sw);
    drop(ctl);
    poll_until(&mut rs, &[1, 0], || *done.borrow() == issued);

    if read_all(&mut rs, &vol, Some("b")) != backup_model {
        return Some(format!(
            "seed {seed}: backup differs from the writes admitted before the switch"
        ));
    }
    if read_all(&mut rs, &vol, None) != model {
        return Some(format!(
            "seed {seed}: live volume differs from the model after the switch"
        ));
    }

    // Release under load: the merge runs on its own thread (as in the server) while
    // this thread polls the reactors and keeps writing whole and partial chunks.
    let handles = rs[0].peers().clone();
    let v2 = vol.clone();
    let merger =
        std::thread::spawn(move || switchover::backup_release(handles, &v2, "b").map(|_| ()));
    let mut k = 0u8;
    let start = Instant::now();
    loop {
        // try_lock: the merge holds the control lock across its drains, which need
        // this thread to poll the reactors.
        let busy = vol
            .control
            .try_lock()
            .map_or(true, |c| !c.backups.is_empty());
        if !busy && merger.is_finished() {
            break;
        }
        if *done.borrow() == issued && k < 40 {
            // One write in flight at a time keeps the model exact.
            let c = chunks[rng.gen_range(0..chunks.len())];
            let (off, len) = if rng.gen_bool(0.5) {
                (c * CHUNK, CHUNK as usize)
            } else {
                random_piece(&mut rng, c)
            };
            let data = vec![0xc0 + (k % 32); len];
            model[off as usize..off as usize + len].copy_from_slice(&data);
            write(&mut rs, (k % 2) as usize, &vol, off, data, &done);
            issued += 1;
            k += 1;
        }
        rs[0].poll_once();
        rs[1].poll_once();
        assert!(start.elapsed() < Duration::from_secs(60), "release stalled");
    }
    merger.join().expect("merge thread").expect("release");
    poll_until(&mut rs, &[0, 1], || *done.borrow() == issued);
    let ctl = vol.control.lock().expect("control");
    let deltas = vol.with_stack(&ctl, |s| s.deltas.len());
    drop(ctl);
    if deltas != 0 {
        return Some(format!("seed {seed}: {deltas} deltas left after release"));
    }
    if read_all(&mut rs, &vol, None) != model {
        return Some(format!(
            "seed {seed}: live volume differs from the model after the release"
        ));
    }
    None
}

/// Old-epoch writes on reactor 0 to chunks `old`, entered into the kernel but never
/// reaped (reactor 0 is not polled again), then new-epoch partial writes on
/// reactor 1 to chunks `new`. Returns whether the new writes completed while the
/// old epoch was still pinned, and then checks both images against the model.
fn partial_writes_during_old_epoch(old: &[u64], new: &[u64]) -> bool {
    let dir = tempfile::tempdir().expect("tmp");
    let vol = volume(dir.path());
    assert_eq!(
        switchover::home_reactor(&vol, 2),
        1,
        "the test needs home = 1"
    );
    let mut rs = manual_reactors(ReactorConfig {
        cores: vec![None, None],
        ..Default::default()
    })
    .expect("reactors");
    let mut model = vec![0u8; SIZE as usize];
    let done = Rc::new(RefCell::new(0usize));
    for &c in old {
        let data = vec![0x11; (CHUNK - SECTOR) as usize];
        let off = c * CHUNK + SECTOR;
        model[off as usize..off as usize + data.len()].copy_from_slice(&data);
        write(&mut rs, 0, &vol, off, data, &done);
    }
    let backup_model = model.clone();
    let mut ctl = vol.control.lock().expect("control");
    let sw = switchover::switch(&mut ctl, &vol, "b", Instant::now()).expect("switch");
    switchover::quiesce(&rs[0].peers().clone(), &vol, &sw);
    let new_done = Rc::new(RefCell::new(0usize));
    for &c in new {
        let (off, len) = (c * CHUNK + 2 * SECTOR, SECTOR as usize);
        let data = vec![0x22; len];
        model[off as usize..off as usize + len].copy_from_slice(&data);
        write(&mut rs, 1, &vol, off, data, &new_done);
    }
    // The quiesce round: home (1) -> reactor 0 (enters the old writes) -> 1.
    rs[1].poll_once();
    rs[0].poll_once();
    let start = Instant::now();
    while *new_done.borrow() < new.len() && start.elapsed() < Duration::from_millis(500) {
        rs[1].poll_once();
    }
    let early = *new_done.borrow() == new.len() && !sw.drained_on(0);
    poll_until(&mut rs, &[0, 1], || sw.drained_on(0) && sw.drained_on(1));
    switchover::mark_ready(&mut ctl, &vol, "b", sw);
    drop(ctl);
    poll_until(&mut rs, &[0, 1], || {
        *done.borrow() == old.len() && *new_done.borrow() == new.len()
    });
    assert!(read_all(&mut rs, &vol, Some("b")) == backup_model, "backup");
    assert!(read_all(&mut rs, &vol, None) == model, "live volume");
    early
}

/// The switchover issue: "a first write to a partial chunk read-merges from below
/// and waits only for old-epoch writes that overlap that chunk". Negative control:
/// partial writes to the chunks the old writes cover do wait for them.
#[test]
fn partial_writes_wait_only_for_overlapping_old_writes() {
    assert!(
        partial_writes_during_old_epoch(&[3, 9, 20], &[4, 10, 40]),
        "partial writes to other chunks must not wait for the old epoch's drain"
    );
    assert!(
        !partial_writes_during_old_epoch(&[3, 9, 20], &[3, 40]),
        "a partial write to a chunk an old write covers must wait for that write"
    );
}

#[test]
fn switchover_interleavings_match_the_model() {
    for seed in 0..12 {
        if let Some(e) = run(seed, false) {
            panic!("{e}");
        }
    }
}

#[test]
fn planted_ordering_bug_is_caught() {
    // Without the drain rule, a new-epoch read-merge reads the base before the
    // old-epoch write lands, and the live volume loses that write.
    let caught = (0..12).filter_map(|seed| run(seed, true)).count();
    assert!(caught > 0, "the planted bug went unnoticed in every seed");
}

/// Issue #11 item 10: a deleted volume's merge stops instead of writing its delta
/// into the base (which a volume created again under the name may own by then).
/// Negative control: the same merge of a live volume moves the chunk down.
#[test]
fn a_deleted_volumes_merge_stops() {
    for deleted in [true, false] {
        let dir = tempfile::tempdir().expect("tmp");
        let vol = volume(dir.path());
        let mut rs = manual_reactors(ReactorConfig {
            cores: vec![None, None],
            ..Default::default()
        })
        .expect("reactors");
        let done = Rc::new(RefCell::new(0usize));
        write(&mut rs, 0, &vol, 0, vec![0x11; CHUNK as usize], &done);
        poll_until(&mut rs, &[0, 1], || *done.borrow() == 1);
        let mut ctl = vol.control.lock().expect("control");
        let sw = switchover::switch(&mut ctl, &vol, "b", Instant::now()).expect("switch");
        switchover::quiesce(&rs[0].peers().clone(), &vol, &sw);
        poll_until(&mut rs, &[0, 1], || sw.drained_on(0) && sw.drained_on(1));
        switchover::mark_ready(&mut ctl, &vol, "b", sw);
        drop(ctl);
        write(&mut rs, 1, &vol, CHUNK, vec![0x22; CHUNK as usize], &done);
        poll_until(&mut rs, &[0, 1], || *done.borrow() == 2);
        let base_before = read_all(&mut rs, &vol, Some("b"));
        if deleted {
            vol.mark_removed();
        }
        let (handles, v2) = (rs[0].peers().clone(), vol.clone());
        let merger = std::thread::spawn(move || switchover::merge(&handles, &v2, "b"));
        let start = Instant::now();
        while !merger.is_finished() {
            rs[0].poll_once();
            rs[1].poll_once();
            assert!(start.elapsed() < Duration::from_secs(30), "merge stalled");
        }
        let res = merger.join().expect("merge thread");
        let ctl = vol.control.lock().expect("control");
        let mapped: Vec<u64> = vol.with_stack(&ctl, |s| {
            s.deltas.iter().map(|d| d.map.mapped_count()).collect()
        });
        drop(ctl);
        if deleted {
            assert!(
                matches!(res, Err(switchover::SwitchError::VolumeDeleted(_))),
                "{res:?}"
            );
            assert_eq!(mapped, [1], "the delta keeps its chunk: nothing moved");
            assert!(
                read_all(&mut rs, &vol, Some("b")) == base_before,
                "the base below the backup was written"
            );
        } else {
            res.expect("merge of a live volume");
            assert!(mapped.is_empty(), "the merged delta is gone: {mapped:?}");
            let live = read_all(&mut rs, &vol, None);
            assert!(live[CHUNK as usize..2 * CHUNK as usize] == [0x22; CHUNK as usize][..]);
        }
    }
}
