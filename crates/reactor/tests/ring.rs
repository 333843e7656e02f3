//! Reactor tests on a real io_uring and real temp files (no mock ring).

use std::cell::RefCell;
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use ringblk_reactor::*;

/// Liveness bound for loops below; a hang fails the test instead of wedging CI.
const DEADLINE: Duration = Duration::from_secs(60);

fn tmpdir() -> tempfile::TempDir {
    // Not /tmp: it may be a tmpfs; these tests want the real disk and O_DIRECT.
    tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("tempdir")
}

fn direct_file(dir: &tempfile::TempDir, len: u64) -> File {
    let path = dir.path().join("disk.img");
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_DIRECT)
        .open(&path)
        .expect("open O_DIRECT");
    f.set_len(len).expect("set_len");
    f
}

fn one_reactor(config: ReactorConfig) -> Reactor {
    manual_reactors(config)
        .expect("reactor")
        .pop()
        .expect("one reactor")
}

fn run_until(r: &mut Reactor, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        r.poll_once();
        assert!(
            start.elapsed() < DEADLINE,
            "operation did not complete in time"
        );
    }
}

fn pattern(block: u64, version: u64, len: usize) -> Vec<u8> {
    let mut x =
        block.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ version.wrapping_mul(0xD1B5_4A32_D192_ED03);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Blocks of the file at `path` that differ from the model (version 0 = zeros).
fn mismatched_blocks(path: &std::path::Path, model: &[u64], block: usize) -> Vec<usize> {
    let all = std::fs::read(path).expect("read file");
    (0..model.len())
        .filter(|&b| {
            let want = match model[b] {
                0 => vec![0; block],
                v => pattern(b as u64, v, block),
            };
            all[b * block..(b + 1) * block] != want[..]
        })
        .collect()
}

#[test]
fn o_direct_round_trip_through_fixed_buffers() {
    let dir = tmpdir();
    let file = direct_file(&dir, 1 << 20);
    let mut r = one_reactor(ReactorConfig {
        buffer_count: 8,
        buffer_size: 64 * 1024,
        ..Default::default()
    });
    assert!(
        r.buffers().is_registered(),
        "fixed buffers must register as root"
    );
    let fref = r.register_file(file.as_raw_fd()).expect("register file");
    assert!(matches!(fref, FileRef::Fixed(_)));

    let mut wbuf = r.get_buffer().expect("buffer");
    let data = pattern(7, 1, 64 * 1024);
    wbuf.as_mut_slice().copy_from_slice(&data);
    let result = Rc::new(RefCell::new(None));
    let res = result.clone();
    r.submit(Op::write(fref, 128 * 1024, wbuf, 64 * 1024), move |_, c| {
        *res.borrow_mut() = Some(c.bytes());
    })
    .expect("submit");
    run_until(&mut r, || result.borrow().is_some());
    assert_eq!(result.borrow_mut().take(), Some(Ok(64 * 1024)));

    let got = Rc::new(RefCell::new(None));
    let g = got.clone();
    let rbuf = r.get_buffer().expect("buffer");
    r.submit(Op::read(fref, 128 * 1024, rbuf, 64 * 1024), move |_, c| {
        let n = c.bytes();
        let buf = c.op.into_buf().expect("buffer back");
        *g.borrow_mut() = Some((n, buf.as_slice().to_vec()));
    })
    .expect("submit");
    run_until(&mut r, || got.borrow().is_some());
    let (n, bytes) = got.borrow_mut().take().expect("read done");
    assert_eq!(n, Ok(64 * 1024));
    assert!(bytes == data, "read back differs from what was written");
    assert_eq!(
        r.buffers().available(),
        8,
        "every buffer returned to the pool"
    );
    r.unregister_file(fref).expect("unregister");
}

/// 10 000 random reads and writes, many in flight at once, on non-overlapping
/// blocks at any instant; every read is checked against a model of the file.
#[test]
fn ten_thousand_concurrent_random_ios_verified() {
    random_ios_verified(SubmitPolicy::Batch);
}

/// The same under eager submission: entering the kernel between callbacks, with a
/// backlog in play, must not lose, reorder past a backlog or double-submit an SQE.
#[test]
fn ten_thousand_concurrent_random_ios_verified_eager() {
    random_ios_verified(SubmitPolicy::Eager);
}

fn random_ios_verified(submit: SubmitPolicy) {
    const BLOCK: usize = 4096;
    const BLOCKS: u64 = 2048;
    const OPS: usize = 10_000;
    const DEPTH: usize = 128;
    let dir = tmpdir();
    let file = direct_file(&dir, BLOCKS * BLOCK as u64);
    let mut r = one_reactor(ReactorConfig {
        buffer_count: 64,
        buffer_size: BLOCK,
        ring_entries: 64, // smaller than DEPTH: exercises the SQ backlog
        submit,
        ..Default::default()
    });
    let fref = r.register_file(file.as_raw_fd()).expect("register");

    struct State {
        model: Vec<u64>, // version per block; 0 = never written (zeros)
        busy: Vec<bool>,
        in_flight: usize,
        issued: usize,
        completed: usize,
        verified_reads: usize,
        errors: Vec<String>,
        rng: rand::rngs::StdRng,
    }
    let st = Rc::new(RefCell::new(State {
        model: vec![0; BLOCKS as usize],
        busy: vec![false; BLOCKS as usize],
        in_flight: 0,
        issued: 0,
        completed: 0,
        verified_reads: 0,
        errors: Vec::new(),
        rng: rand::rngs::StdRng::seed_from_u64(0xB10C),
    }));

    fn issue(r: &mut Reactor, st: &Rc<RefCell<State>>, fref: FileRef) {
        loop {
            let mut s = st.borrow_mut();
            if s.in_flight >= DEPTH || s.issued >= OPS {
                return;
            }
            let block = loop {
                let b = s.rng.gen_range(0..BLOCKS);
                if !s.busy[b as usize] {
                    break b;
                }
            };
            let write = s.rng.gen_bool(0.5);
            // Mix fixed pool buffers and plain aligned heap buffers.
            let buf: IoBuf = match r.get_buffer() {
                Some(b) if s.rng.gen_bool(0.5) => b.into(),
                _ => AlignedBuf::direct(BLOCK).into(),
            };
            s.busy[block as usize] = true;
            s.in_flight += 1;
            s.issued += 1;
            let version = s.issued as u64;
            drop(s);
            let offset = block * BLOCK as u64;
            let st2 = st.clone();
            let op = if write {
                let mut buf = buf;
                buf.as_mut_slice()[..BLOCK].copy_from_slice(&pattern(block, version, BLOCK));
                Op::write(fref, offset, buf, BLOCK as u32)
            } else {
                Op::read(fref, offset, buf, BLOCK as u32)
            };
            let res = r.submit(op, move |r, c| {
                {
                    let mut s = st2.borrow_mut();
                    s.in_flight -= 1;
                    s.completed += 1;
                    s.busy[block as usize] = false;
                    if c.bytes() != Ok(BLOCK as u32) {
                        s.errors.push(format!("block {block}: result {}", c.result));
                    } else if write {
                        s.model[block as usize] = version;
                    } else {
                        let want = match s.model[block as usize] {
                            0 => vec![0; BLOCK],
                            v => pattern(block, v, BLOCK),
                        };
                        let buf = c.op.into_buf().expect("buffer");
                        if buf.as_slice()[..BLOCK] != want[..] {
                            s.errors.push(format!("block {block}: wrong bytes"));
                        }
                        s.verified_reads += 1;
                    }
                }
                issue(r, &st2, fref);
            });
            assert!(res.is_ok(), "slab of 4096 cannot fill at depth {DEPTH}");
        }
    }
    issue(&mut r, &st, fref);
    run_until(&mut r, || st.borrow().completed == OPS);
    let s = st.borrow();
    assert!(
        s.errors.is_empty(),
        "errors: {:?}",
        &s.errors[..s.errors.len().min(10)]
    );
    assert!(s.verified_reads > OPS / 4);
    drop(s);

    // Final sweep: the file equals the model, block by block.
    let path = dir.path().join("disk.img");
    let model = st.borrow().model.clone();
    assert_eq!(mismatched_blocks(&path, &model, BLOCK), Vec::<usize>::new());

    // Negative control: the sweep must notice one flipped byte.
    let f = OpenOptions::new().write(true).open(&path).expect("open");
    let victim = 1234usize;
    let mut byte = [0u8; 1];
    let rf = File::open(&path).expect("open");
    std::os::unix::fs::FileExt::read_exact_at(&rf, &mut byte, (victim * BLOCK + 17) as u64)
        .expect("read");
    byte[0] ^= 0x55;
    std::os::unix::fs::FileExt::write_all_at(&f, &byte, (victim * BLOCK + 17) as u64)
        .expect("write");
    assert_eq!(mismatched_blocks(&path, &model, BLOCK), vec![victim]);
    assert_eq!(r.buffers().available(), 64);
}

fn socketpair() -> (
    std::os::unix::net::UnixStream,
    std::os::unix::net::UnixStream,
) {
    std::os::unix::net::UnixStream::pair().expect("socketpair")
}

/// Orphaning (dropping) an op the kernel is still waiting on must not free its
/// buffer before the final CQE; afterwards every buffer is back in the pool.
#[test]
fn orphaned_and_cancelled_ops_return_their_buffers_after_the_final_cqe() {
    let mut r = one_reactor(ReactorConfig {
        buffer_count: 16,
        buffer_size: 4096,
        ..Default::default()
    });
    let (a, _b) = socketpair();
    let sock = FileRef::Raw(a.as_raw_fd());

    // 8 receives that can never complete on their own (the peer sends nothing).
    let mut ids = Vec::new();
    for _ in 0..8 {
        let buf = r.get_buffer().expect("buffer");
        ids.push(
            r.submit(Op::recv(sock, buf, 0, 4096), |_, _| {
                panic!("an orphaned op's callback must never run")
            })
            .expect("submit"),
        );
    }
    // Let the kernel arm them.
    for _ in 0..10 {
        r.poll_once();
    }
    assert_eq!(r.in_flight(), 8);
    assert_eq!(
        r.buffers().available(),
        8,
        "in-flight buffers are owned by the slab"
    );
    for id in ids {
        assert!(r.orphan(id));
    }
    // The buffers are still held until the kernel confirms the cancellation.
    assert_eq!(r.buffers().available(), 8);
    let start = Instant::now();
    while r.in_flight() > 0 {
        r.poll_once();
        assert!(start.elapsed() < DEADLINE);
    }
    assert_eq!(r.buffers().available(), 16, "orphans' buffers returned");

    // cancel (not orphan): the callback runs with -ECANCELED and gets the buffer back.
    let got = Rc::new(RefCell::new(None));
    let g = got.clone();
    let buf = r.get_buffer().expect("buffer");
    let id = r
        .submit(Op::recv(sock, buf, 0, 4096), move |_, c| {
            *g.borrow_mut() = Some((c.result, c.op.into_buf().is_some()));
        })
        .expect("submit");
    for _ in 0..5 {
        r.poll_once();
    }
    r.cancel(id);
    run_until(&mut r, || got.borrow().is_some());
    assert_eq!(*got.borrow(), Some((-libc::ECANCELED, true)));
    assert_eq!(r.buffers().available(), 16);

    // Orphan disk reads that the kernel is actively performing: whether the cancel
    // or the read wins, the buffer comes back only after the final CQE.
    let dir = tmpdir();
    let file = direct_file(&dir, 16 << 20);
    let fref = r.register_file(file.as_raw_fd()).expect("register");
    for i in 0..16u64 {
        let buf = r.get_buffer().expect("buffer");
        let id = r
            .submit(Op::read(fref, i * 4096, buf, 4096), |_, _| {
                panic!("orphaned")
            })
            .expect("submit");
        r.poll_once(); // submitted to the kernel
        r.orphan(id);
    }
    let start = Instant::now();
    while r.in_flight() > 0 {
        r.poll_once();
        assert!(start.elapsed() < DEADLINE);
    }
    assert_eq!(r.buffers().available(), 16);
}

#[test]
fn full_slab_and_empty_pool_are_back_pressure() {
    let mut r = one_reactor(ReactorConfig {
        max_in_flight: 4,
        buffer_count: 2,
        buffer_size: 4096,
        ..Default::default()
    });
    let done = Rc::new(RefCell::new(0));
    for _ in 0..4 {
        let d = done.clone();
        r.submit(Op::timeout(Duration::from_millis(20)), move |_, _| {
            *d.borrow_mut() += 1
        })
        .expect("room in slab");
    }
    let rejected = r.submit(Op::Nop, |_, _| {}).expect_err("slab is full");
    assert!(matches!(rejected.op, Op::Nop));
    run_until(&mut r, || *done.borrow() == 4);
    r.submit(rejected.op, rejected.cb).expect("room again");

    let b1 = r.get_buffer().expect("1");
    let _b2 = r.get_buffer().expect("2");
    assert!(r.get_buffer().is_none());
    let woke = Rc::new(RefCell::new(false));
    let w = woke.clone();
    r.when_buffer_free(move |r| {
        *w.borrow_mut() = r.get_buffer().is_some();
    });
    r.poll_once();
    assert!(!*woke.borrow(), "waiter must wait while the pool is empty");
    drop(b1);
    run_until(&mut r, || *woke.borrow());
}

/// Guards issue #11 item 4: ops past a full slab used to come back as `Rejected`
/// and their requests failed with ENOMEM. `submit_or_wait` parks them in a FIFO
/// that completions drain: every op runs, in submission order, never more than the
/// slab at once, and with no timer polling for room.
#[test]
fn full_slab_parks_ops_in_fifo_order_until_slots_free() {
    const SLOTS: usize = 4;
    const OPS: usize = 100;
    let mut r = one_reactor(ReactorConfig {
        max_in_flight: SLOTS,
        ..Default::default()
    });
    let order = Rc::new(RefCell::new(Vec::new()));
    let mut waited = 0;
    for i in 0..OPS {
        let o = order.clone();
        let sub = r.submit_or_wait(Op::Nop, move |r, c| {
            assert_eq!(c.result, 0);
            assert!(r.in_flight() < SLOTS, "the slab bound holds");
            o.borrow_mut().push(i)
        });
        if sub == ringblk_reactor::Submitted::Waiting {
            waited += 1;
        }
        assert!(r.in_flight() <= SLOTS);
    }
    assert_eq!(waited, OPS - SLOTS, "all but the first SLOTS ops wait");
    assert_eq!(r.waiting_for_slots(), OPS - SLOTS);
    // A plain submit still sees a full slab (and may take a slot that frees).
    assert!(r.submit(Op::Nop, |_, _| {}).is_err());
    run_until(&mut r, || order.borrow().len() == OPS);
    assert_eq!(*order.borrow(), (0..OPS).collect::<Vec<_>>(), "FIFO order");
    assert_eq!(r.waiting_for_slots(), 0);
    assert_eq!(r.handle().stats().slot_waits, (OPS - SLOTS) as u64);
}

#[test]
fn small_submission_queue_backlogs_instead_of_failing() {
    let mut r = one_reactor(ReactorConfig {
        ring_entries: 4,
        ..Default::default()
    });
    let done = Rc::new(RefCell::new(Vec::new()));
    for i in 0..500 {
        let d = done.clone();
        r.submit(Op::Nop, move |_, c| {
            assert_eq!(c.result, 0);
            d.borrow_mut().push(i)
        })
        .expect("slab has room");
    }
    run_until(&mut r, || done.borrow().len() == 500);
}

/// Guards the submit policy's contract: a batch reactor enters once for what all
/// the callbacks of one iteration queued, an eager one once per callback, an
/// `Every { sqes }` one per `sqes` queued plus once for the remainder. A regression
/// silently costs IOPS (requests held back) or CPU (enters that batch nothing).
#[test]
fn submit_policy_sets_enters_per_iteration() {
    const N: u64 = 8;
    for (submit, enters) in [
        (SubmitPolicy::Batch, 1),
        (SubmitPolicy::Eager, N),
        (SubmitPolicy::Every { sqes: 4 }, N / 4),
        (SubmitPolicy::Every { sqes: 3 }, N / 3 + 1), // the remainder at the end
    ] {
        let mut r = one_reactor(ReactorConfig::default().with_submit(submit));
        let done = Rc::new(RefCell::new(0u64));
        for _ in 0..N {
            let d = done.clone();
            r.submit(Op::Nop, move |r, _| {
                r.submit(Op::Nop, move |_, _| *d.borrow_mut() += 1)
                    .expect("slab has room");
            })
            .expect("slab has room");
        }
        // First iteration: the N nops go in with one enter and complete inline.
        r.poll_once();
        let before = r.handle().stats().submit_enters;
        assert_eq!(
            before, 1,
            "{submit}: one enter for SQEs queued outside the loop"
        );
        // Second: N completions reaped at once; each callback queues one nop.
        r.poll_once();
        let during = r.handle().stats().submit_enters - before;
        assert_eq!(
            during, enters,
            "{submit}: enters in one iteration of {N} callbacks"
        );
        run_until(&mut r, || *done.borrow() == N);
        assert_eq!(r.in_flight(), 0);
    }
}

/// `hold_submit` (used by the block layer when a poller will complete a request later
/// in the iteration): with `Eager`, what a callback queues after holding and what a
/// poller queues later share the iteration's final enter. Negative control: the
/// same iteration without the hold takes two enters.
#[test]
fn hold_submit_joins_a_callbacks_sqes_with_a_later_pollers() {
    for (hold, enters) in [(true, 1u64), (false, 2)] {
        let mut r = one_reactor(ReactorConfig::default().with_submit(SubmitPolicy::Eager));
        let done = Rc::new(RefCell::new(0u64));
        let armed = Rc::new(RefCell::new(false));
        {
            let (done, armed) = (done.clone(), armed.clone());
            r.add_poller(move |r| {
                if !std::mem::take(&mut *armed.borrow_mut()) {
                    return PollResult::Idle;
                }
                let d = done.clone();
                r.submit(Op::Nop, move |_, _| *d.borrow_mut() += 1)
                    .expect("slab has room");
                PollResult::Busy
            });
        }
        let (d, a) = (done.clone(), armed.clone());
        r.submit(Op::Nop, move |r, _| {
            // As a front end's receive callback: re-arms (one SQE), and the block
            // layer's ready queue holds a completion for the poller.
            r.submit(Op::Nop, move |_, _| *d.borrow_mut() += 1)
                .expect("slab has room");
            if hold {
                r.hold_submit();
            }
            *a.borrow_mut() = true;
        })
        .expect("slab has room");
        r.poll_once(); // the first nop goes in
        let before = r.handle().stats().submit_enters;
        r.poll_once(); // its callback and the poller
        let during = r.handle().stats().submit_enters - before;
        assert_eq!(during, enters, "hold: {hold}: enters in the iteration");
        run_until(&mut r, || *done.borrow() == 2);
    }
}

#[test]
fn timers_pollers_and_vectored_ops() {
    let dir = tmpdir();
    let file = direct_file(&dir, 1 << 20);
    let mut r = one_reactor(ReactorConfig::default());
    let fired = Rc::new(RefCell::new(Vec::new()));
    for (i, ms) in [30u64, 10, 20].into_iter().enumerate() {
        let f = fired.clone();
        r.add_timer(Duration::from_millis(ms), move |_| f.borrow_mut().push(i));
    }
    let f = fired.clone();
    let t = r.add_timer(Duration::from_millis(5), move |_| f.borrow_mut().push(99));
    assert!(r.cancel_timer(t));
    let polls = Rc::new(RefCell::new(0));
    let p = polls.clone();
    let pid = r.add_poller(move |_| {
        *p.borrow_mut() += 1;
        PollResult::Idle
    });
    run_until(&mut r, || fired.borrow().len() == 3);
    assert_eq!(
        *fired.borrow(),
        vec![1, 2, 0],
        "timers fire in deadline order"
    );
    r.remove_poller(pid);
    r.poll_once();
    let n = *polls.borrow();
    r.poll_once();
    assert_eq!(*polls.borrow(), n, "removed poller does not run");

    // writev of two buffers, readv back into three, fdatasync, punch hole.
    let raw = FileRef::Raw(file.as_raw_fd());
    let a = pattern(1, 1, 4096);
    let b = pattern(2, 2, 8192);
    let mut ba = AlignedBuf::direct(4096);
    ba.as_mut_slice().copy_from_slice(&a);
    let mut bb = AlignedBuf::direct(8192);
    bb.as_mut_slice().copy_from_slice(&b);
    let out = Rc::new(RefCell::new(Vec::new()));
    let o = out.clone();
    r.submit(
        Op::writev(raw, 4096, vec![ba.into(), bb.into()]),
        move |_, c| o.borrow_mut().push(c.result),
    )
    .expect("submit");
    run_until(&mut r, || out.borrow().len() == 1);
    let o = out.clone();
    r.submit(Op::fdatasync(raw), move |_, c| {
        o.borrow_mut().push(c.result)
    })
    .expect("submit");
    run_until(&mut r, || out.borrow().len() == 2);
    let o = out.clone();
    let bufs: Vec<IoBuf> = (0..3).map(|_| AlignedBuf::direct(4096).into()).collect();
    let data = Rc::new(RefCell::new(Vec::new()));
    let d = data.clone();
    r.submit(Op::readv(raw, 4096, bufs), move |_, c| {
        o.borrow_mut().push(c.result);
        for b in c.op.into_bufs() {
            d.borrow_mut().extend_from_slice(b.as_slice());
        }
    })
    .expect("submit");
    run_until(&mut r, || out.borrow().len() == 3);
    assert_eq!(*out.borrow(), vec![12288, 0, 12288]);
    let mut want = a.clone();
    want.extend_from_slice(&b);
    assert!(*data.borrow() == want);

    let o = out.clone();
    r.submit(
        Op::fallocate(raw, 4096, 4096, falloc::PUNCH_HOLE),
        move |_, c| o.borrow_mut().push(c.result),
    )
    .expect("submit");
    run_until(&mut r, || out.borrow().len() == 4);
    assert_eq!(out.borrow()[3], 0);
    let got = Rc::new(RefCell::new(None));
    let g = got.clone();
    r.submit(
        Op::read(raw, 4096, AlignedBuf::direct(4096), 4096),
        move |_, c| *g.borrow_mut() = Some(c.op.into_buf().expect("buf").as_slice().to_vec()),
    )
    .expect("submit");
    run_until(&mut r, || got.borrow().is_some());
    assert!(
        got.borrow().as_ref().expect("read").iter().all(|&x| x == 0),
        "hole reads zeros"
    );
}

#[test]
fn accept_recv_send_and_sendmsg_on_loopback() {
    let mut r = one_reactor(ReactorConfig::default());
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let conn = Rc::new(RefCell::new(None));
    let c2 = conn.clone();
    r.submit(
        Op::accept(FileRef::Raw(listener.as_raw_fd())),
        move |_, c| {
            let peer = c.op.peer_addr();
            *c2.borrow_mut() = Some((c.result, peer));
        },
    )
    .expect("submit");
    r.poll_once();
    let client = std::thread::spawn(move || {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(addr).expect("connect");
        s.write_all(b"hello reactor").expect("write");
        let mut back = vec![0u8; 11];
        s.read_exact(&mut back).expect("read");
        back
    });
    run_until(&mut r, || conn.borrow().is_some());
    let (fd, peer) = conn.borrow_mut().take().expect("accepted");
    assert!(fd >= 0, "accept failed: {fd}");
    assert!(peer.expect("peer address").ip().is_loopback());
    // SAFETY: the accepted descriptor is ours to own and close.
    let sock = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let sref = FileRef::Raw(sock.as_raw_fd());
    let got = Rc::new(RefCell::new(Vec::new()));
    let g = got.clone();
    fn recv_more(r: &mut Reactor, sref: FileRef, g: Rc<RefCell<Vec<u8>>>) {
        r.submit(Op::recv(sref, vec![0u8; 64], 0, 64), move |r, c| {
            let n = c.bytes().expect("recv ok") as usize;
            g.borrow_mut()
                .extend_from_slice(&c.op.into_buf().expect("buf").as_slice()[..n]);
            if g.borrow().len() < 13 {
                recv_more(r, sref, g);
            }
        })
        .expect("submit");
    }
    recv_more(&mut r, sref, g);
    run_until(&mut r, || got.borrow().len() >= 13);
    assert_eq!(&got.borrow()[..], b"hello reactor");
    let sent = Rc::new(RefCell::new(0));
    let s = sent.clone();
    r.submit(Op::send(sref, b"xxhello".to_vec(), 2, 5), move |_, c| {
        *s.borrow_mut() += c.result
    })
    .expect("submit");
    let s = sent.clone();
    r.submit(
        Op::sendmsg(
            sref,
            vec![b" wo".to_vec().into(), b"rld!!".to_vec().into()],
            &[3, 3],
        ),
        move |_, c| *s.borrow_mut() += c.result,
    )
    .expect("submit");
    run_until(&mut r, || *sent.borrow() == 11);
    assert_eq!(client.join().expect("client"), b"hello world");
}

/// 100 000 messages between two reactor threads, in bursts, checked in order at
/// both ends.
#[test]
fn hundred_thousand_messages_ping_pong_in_order() {
    const TOTAL: u64 = 100_000;
    const BURST: u64 = 1_000;
    let pool = ReactorPool::start(
        ReactorConfig {
            cores: vec![None, None],
            ..Default::default()
        },
        Arc::new(|_| {}),
    )
    .expect("pool");
    let (done_tx, done_rx) = crossbeam_channel::bounded(1);
    let received_back = Arc::new(AtomicU64::new(0));
    let next_expected_at_1 = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));

    fn send_burst(
        r: &mut Reactor,
        start: u64,
        state: (
            Arc<AtomicU64>,
            Arc<AtomicU64>,
            Arc<AtomicU64>,
            crossbeam_channel::Sender<()>,
        ),
    ) {
        for i in start..(start + BURST).min(TOTAL) {
            let st = state.clone();
            r.send_to(1, move |r1| {
                let (back, exp1, errors, _) = &st;
                if exp1.swap(i + 1, Ordering::Relaxed) != i {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
                let _ = back;
                let st = st.clone();
                r1.send_to(0, move |r0| {
                    let (back, _, errors, done) = &st;
                    let n = back.fetch_add(1, Ordering::Relaxed);
                    if n != i {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                    if n + 1 == TOTAL {
                        let _ = done.send(());
                    } else if (n + 1) % BURST == 0 {
                        send_burst(r0, n + 1, st.clone());
                    }
                });
            });
        }
    }
    let state = (
        received_back.clone(),
        next_expected_at_1.clone(),
        errors.clone(),
        done_tx,
    );
    pool.handles()[0]
        .send(move |r| send_burst(r, 0, state))
        .expect("send");
    done_rx
        .recv_timeout(DEADLINE)
        .expect("all messages came back");
    assert_eq!(
        errors.load(Ordering::Relaxed),
        0,
        "messages arrived out of order"
    );
    assert_eq!(received_back.load(Ordering::Relaxed), TOTAL);
    assert_eq!(next_expected_at_1.load(Ordering::Relaxed), TOTAL);
    pool.shutdown();
}

fn wakes_on_message(policy: IdlePolicy) {
    let pool = ReactorPool::start(
        ReactorConfig {
            idle: policy,
            ..Default::default()
        },
        Arc::new(|_| {}),
    )
    .expect("pool");
    let h = pool.handles()[0].clone();
    let start = Instant::now();
    while !h.is_sleeping() {
        assert!(
            start.elapsed() < DEADLINE,
            "{policy} reactor never went to sleep"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    let sleeps_before = h.stats().sleeps;
    assert!(sleeps_before >= 1);
    let (tx, rx) = crossbeam_channel::bounded(1);
    h.send(move |_| {
        let _ = tx.send(());
    })
    .expect("send");
    rx.recv_timeout(DEADLINE)
        .expect("sleeping reactor woke for the message");
    pool.shutdown();
}

#[test]
fn adaptive_reactor_wakes_on_message() {
    wakes_on_message(IdlePolicy::Adaptive { poll_us: 100 });
}

#[test]
fn interrupt_reactor_wakes_on_message() {
    wakes_on_message(IdlePolicy::Interrupt);
}

#[test]
fn shutdown_completes_operations_in_flight() {
    let dir = tmpdir();
    let file = Arc::new(direct_file(&dir, 64 << 20));
    let completed = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let timer_done = Arc::new(AtomicBool::new(false));
    let pool = ReactorPool::start(ReactorConfig::default(), Arc::new(|_| {})).expect("pool");
    let (c, f, t, fl) = (
        completed.clone(),
        failed.clone(),
        timer_done.clone(),
        file.clone(),
    );
    let (sub_tx, sub_rx) = crossbeam_channel::bounded(1);
    pool.handles()[0]
        .send(move |r| {
            let raw = FileRef::Raw(fl.as_raw_fd());
            for i in 0..256u64 {
                let (c, f) = (c.clone(), f.clone());
                let mut buf = AlignedBuf::direct(128 * 1024);
                buf.as_mut_slice().fill(i as u8);
                r.submit(
                    Op::write(raw, i * 128 * 1024, buf, 128 * 1024),
                    move |_, comp| {
                        if comp.bytes() == Ok(128 * 1024) {
                            c.fetch_add(1, Ordering::SeqCst);
                        } else {
                            f.fetch_add(1, Ordering::SeqCst);
                        }
                    },
                )
                .expect("submit");
            }
            r.submit(Op::timeout(Duration::from_millis(300)), move |_, comp| {
                t.store(comp.result == -libc::ETIME, Ordering::SeqCst);
            })
            .expect("submit");
            let _ = sub_tx.send(r.in_flight());
        })
        .expect("send");
    let in_flight = sub_rx.recv_timeout(DEADLINE).expect("submitted");
    assert_eq!(in_flight, 257);
    pool.shutdown(); // must wait for all of them
    assert_eq!(completed.load(Ordering::SeqCst), 256);
    assert_eq!(failed.load(Ordering::SeqCst), 0);
    assert!(
        timer_done.load(Ordering::SeqCst),
        "the 300 ms timeout ran to its end"
    );
    // Data really landed.
    let mut buf = vec![0u8; 128 * 1024];
    let rf = File::open(dir.path().join("disk.img")).expect("open");
    std::os::unix::fs::FileExt::read_exact_at(&rf, &mut buf, 200 * 128 * 1024).expect("read");
    assert!(buf.iter().all(|&x| x == 200));
}

#[test]
fn for_each_reactor_visits_all_then_calls_done_on_origin() {
    let pool = ReactorPool::start(
        ReactorConfig {
            cores: vec![None, None, None],
            ..Default::default()
        },
        Arc::new(|_| {}),
    )
    .expect("pool");
    let visited = Arc::new(std::sync::Mutex::new(Vec::new()));
    let (tx, rx) = crossbeam_channel::bounded(1);
    let v = visited.clone();
    pool.handles()[1]
        .send(move |r| {
            let v2 = v.clone();
            r.for_each_reactor(
                Arc::new(move |r: &mut Reactor, next: ForEachNext| {
                    v2.lock().expect("lock").push(r.id());
                    // Finish asynchronously, as an epoch drain would.
                    r.add_timer(Duration::from_millis(2), move |r| next.next(r));
                }),
                move |r| {
                    let _ = tx.send(r.id());
                },
            );
        })
        .expect("send");
    let origin = rx.recv_timeout(DEADLINE).expect("done");
    assert_eq!(
        origin, 1,
        "done runs on the reactor that started the iteration"
    );
    assert_eq!(*visited.lock().expect("lock"), vec![0, 1, 2]);
    pool.shutdown();
}

/// IOPOLL works only on devices with polled queues. Where the probe says it is
/// supported, a polled round trip must work; elsewhere the reactor must report
/// EOPNOTSUPP instead of silently falling back.
#[test]
fn iopoll_is_used_where_supported_and_reported_elsewhere() {
    let dir = tmpdir();
    let file = direct_file(&dir, 1 << 20);
    let support = probe_iopoll(&dir.path().join("disk.img")).expect("probe");
    let mut r = one_reactor(ReactorConfig {
        iopoll: true,
        ..Default::default()
    });
    let raw = FileRef::Raw(file.as_raw_fd());
    let res = Rc::new(RefCell::new(None));
    let s = res.clone();
    r.submit_polled(
        Op::read(raw, 0, AlignedBuf::direct(4096), 4096),
        move |_, c| *s.borrow_mut() = Some(c.result),
    )
    .expect("submit");
    run_until(&mut r, || res.borrow().is_some());
    let got = res.borrow().expect("done");
    match support {
        IopollSupport::Supported => assert_eq!(got, 4096),
        IopollSupport::Unsupported(why) => {
            eprintln!("IOPOLL unsupported here: {why}");
            assert!(
                why.contains("EOPNOTSUPP") || why.contains("io_uring_setup"),
                "{why}"
            );
            assert_eq!(got, -libc::EOPNOTSUPP);
        }
    }
    // A reactor without an IOPOLL ring reports it the same way.
    let mut r2 = one_reactor(ReactorConfig::default());
    let res = Rc::new(RefCell::new(None));
    let s = res.clone();
    r2.submit_polled(
        Op::read(raw, 0, AlignedBuf::direct(4096), 4096),
        move |_, c| *s.borrow_mut() = Some(c.result),
    )
    .expect("submit");
    run_until(&mut r2, || res.borrow().is_some());
    assert_eq!(res.borrow().expect("done"), -libc::EOPNOTSUPP);
}

#[test]
fn invalid_configs_are_rejected_with_a_message() {
    let bad = ReactorConfig {
        cores: vec![],
        ..Default::default()
    };
    assert!(matches!(
        ReactorPool::start(bad, Arc::new(|_| {})),
        Err(ReactorError::Config(_))
    ));
    let bad = ReactorConfig {
        cores: vec![Some(0), Some(0)],
        ..Default::default()
    };
    assert!(ReactorPool::start(bad, Arc::new(|_| {})).is_err());
    let bad = ReactorConfig {
        cores: vec![Some(4096)],
        ..Default::default()
    };
    let err = ReactorPool::start(bad, Arc::new(|_| {}))
        .err()
        .expect("no such core");
    assert!(err.to_string().contains("core 4096"));
    // A threshold of 0 would enter on every callback even with nothing queued; one
    // above the ring size is never reached (that is Batch under another name).
    for sqes in [0, 257] {
        let bad = ReactorConfig {
            ring_entries: 256,
            submit: SubmitPolicy::Every { sqes },
            ..Default::default()
        };
        let err = bad.validate().expect_err("threshold out of range");
        assert!(err.to_string().contains("sqes"), "{err}");
    }
    assert!(ReactorConfig::default()
        .with_submit(SubmitPolicy::Every { sqes: 256 })
        .validate()
        .is_ok());
}

/// The names the bench and configuration use round-trip through Display/FromStr.
#[test]
fn submit_policies_parse_as_printed() {
    for p in [
        SubmitPolicy::Batch,
        SubmitPolicy::Eager,
        SubmitPolicy::Every { sqes: 4 },
    ] {
        assert_eq!(p.to_string().parse::<SubmitPolicy>(), Ok(p));
    }
    for bad in [
        "",
        "every",
        "every0",
        "every-1",
        "every32769",
        "Eager",
        "lazy",
    ] {
        assert!(bad.parse::<SubmitPolicy>().is_err(), "{bad:?} parsed");
    }
}

/// SQPOLL: the kernel thread picks submissions up without io_uring_enter; the same
/// O_DIRECT round trip must work (and the reactor must still sleep and wake).
#[test]
fn sqpoll_reactor_round_trip() {
    let dir = tmpdir();
    let file = direct_file(&dir, 1 << 20);
    let mut r = one_reactor(ReactorConfig {
        sqpoll_idle_ms: Some(10),
        buffer_count: 4,
        buffer_size: 4096,
        ..Default::default()
    });
    let raw = FileRef::Raw(file.as_raw_fd());
    let mut w = AlignedBuf::direct(4096);
    w.as_mut_slice().copy_from_slice(&pattern(3, 3, 4096));
    let done = Rc::new(RefCell::new(Vec::new()));
    let d = done.clone();
    r.submit(Op::write(raw, 8192, w, 4096), move |_, c| {
        d.borrow_mut().push(c.result)
    })
    .expect("submit");
    run_until(&mut r, || done.borrow().len() == 1);
    let got = Rc::new(RefCell::new(None));
    let g = got.clone();
    r.submit(
        Op::read(raw, 8192, AlignedBuf::direct(4096), 4096),
        move |_, c| *g.borrow_mut() = Some(c.op.into_buf().expect("buf").as_slice().to_vec()),
    )
    .expect("submit");
    run_until(&mut r, || got.borrow().is_some());
    assert_eq!(done.borrow()[0], 4096);
    assert!(got.borrow().as_deref() == Some(&pattern(3, 3, 4096)[..]));
}

/// Lends `mem[start..start + len]` to the reactor.
///
/// # Safety
/// `mem` outlives the returned buffer and is not used by the caller until the op that
/// holds it has completed (its callback ran) and the buffer was dropped.
unsafe fn lend(mem: &mut [u8], start: usize, len: usize) -> IoBuf {
    assert!(start + len <= mem.len(), "segment inside caller memory");
    let p = std::ptr::NonNull::new(mem.as_mut_ptr().wrapping_add(start)).expect("non-null");
    // SAFETY: the range lies inside `mem` (asserted); the caller keeps `mem` alive
    // and untouched for the loan (this fn's own contract).
    IoBuf::Foreign(unsafe { ForeignBuf::new(p, len) })
}

/// Runs one op to completion and gives back its result and buffers.
fn run_op(r: &mut Reactor, op: Op) -> (i32, Vec<IoBuf>) {
    let got = Rc::new(RefCell::new(None));
    let g = got.clone();
    r.submit(op, move |_, c| {
        *g.borrow_mut() = Some((c.result, c.op.into_bufs()))
    })
    .expect("submit");
    run_until(r, || got.borrow().is_some());
    let out = got.borrow_mut().take().expect("completed");
    out
}

/// The address and length each returned buffer names: a foreign buffer must come back
/// as the very caller memory it was lent (never copied, never reallocated).
fn foreign_ranges(bufs: &[IoBuf]) -> Vec<(usize, usize)> {
    bufs.iter()
        .map(|b| match b {
            IoBuf::Foreign(f) => (f.as_ptr() as usize, f.len()),
            _ => panic!("a foreign buffer came back as another kind"),
        })
        .collect()
}

/// Scatter-gather lists of caller memory (§2.4 of the block-layer plan): writev and
/// readv move data between an O_DIRECT file and non-adjacent aligned pages of the
/// caller's memory, and between a buffered file and misaligned segments of a plain
/// `Vec`, without touching a byte outside the segments. Single-buffer read, send and
/// receive take foreign memory too. Guards against a foreign buffer being copied
/// (the data would not land in caller memory), mis-addressed (guards change) or freed
/// by the reactor (the caller's memory is read after the loans end).
#[test]
fn foreign_segments_move_data_straight_to_and_from_caller_memory() {
    const PAGE: usize = 4096;
    const GUARD: u8 = 0xEE;
    let dir = tmpdir();
    let file = direct_file(&dir, 1 << 20);
    let path = dir.path().join("disk.img");
    let mut r = one_reactor(ReactorConfig::default());
    let fref = FileRef::Raw(file.as_raw_fd());

    // "Guest memory": six aligned pages owned by the test.
    let mut mem = AlignedBuf::direct(6 * PAGE);
    let a = pattern(7, 1, PAGE);
    let b = pattern(8, 1, 2 * PAGE);
    mem.as_mut_slice()[..PAGE].copy_from_slice(&a);
    mem.as_mut_slice()[2 * PAGE..4 * PAGE].copy_from_slice(&b);
    let base = mem.as_ptr() as usize;
    // SAFETY: `mem` lives to the end of the test; the test touches it only after
    // run_op returned and the returned buffers were dropped.
    let segs = unsafe {
        vec![
            lend(mem.as_mut_slice(), 0, PAGE),
            lend(mem.as_mut_slice(), 2 * PAGE, 2 * PAGE),
        ]
    };
    let (res, back) = run_op(&mut r, Op::writev(fref, 8 * PAGE as u64, segs));
    assert_eq!(res, 3 * PAGE as i32);
    assert_eq!(
        foreign_ranges(&back),
        vec![(base, PAGE), (base + 2 * PAGE, 2 * PAGE)]
    );
    drop(back);
    let on_disk = std::fs::read(&path).expect("read file");
    assert!(on_disk[8 * PAGE..9 * PAGE] == a[..] && on_disk[9 * PAGE..11 * PAGE] == b[..]);

    // readv back into other, non-adjacent pages; everything else keeps its guard.
    mem.as_mut_slice().fill(GUARD);
    // SAFETY: as above.
    let segs = unsafe {
        vec![
            lend(mem.as_mut_slice(), PAGE, PAGE),
            lend(mem.as_mut_slice(), 3 * PAGE, 2 * PAGE),
        ]
    };
    let (res, back) = run_op(&mut r, Op::readv(fref, 8 * PAGE as u64, segs));
    assert_eq!(res, 3 * PAGE as i32);
    assert_eq!(
        foreign_ranges(&back),
        vec![(base + PAGE, PAGE), (base + 3 * PAGE, 2 * PAGE)]
    );
    drop(back);
    let m = mem.as_slice();
    assert!(m[PAGE..2 * PAGE] == a[..], "first segment holds the data");
    assert!(
        m[3 * PAGE..5 * PAGE] == b[..],
        "second segment holds the data"
    );
    for guard in [0..PAGE, 2 * PAGE..3 * PAGE, 5 * PAGE..6 * PAGE] {
        assert!(m[guard].iter().all(|&x| x == GUARD), "outside the segments");
    }

    // One foreign buffer in a plain read.
    mem.as_mut_slice().fill(GUARD);
    // SAFETY: as above.
    let one = unsafe { lend(mem.as_mut_slice(), 5 * PAGE, PAGE) };
    let (res, back) = run_op(&mut r, Op::read(fref, 8 * PAGE as u64, one, PAGE as u32));
    assert_eq!(
        (res, foreign_ranges(&back)),
        (PAGE as i32, vec![(base + 5 * PAGE, PAGE)])
    );
    drop(back);
    assert!(mem.as_slice()[5 * PAGE..] == a[..]);
    assert!(mem.as_slice()[..5 * PAGE].iter().all(|&x| x == GUARD));

    // Misaligned segments of a Vec, on a buffered file (no O_DIRECT rule applies).
    let buffered = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .expect("open buffered");
    let bref = FileRef::Raw(buffered.as_raw_fd());
    let mut v = vec![GUARD; 10_000];
    // SAFETY: `v` outlives the op; the test reads it only after run_op returned and
    // the buffers were dropped.
    let segs = unsafe { vec![lend(&mut v, 3, 100), lend(&mut v, 211, 3_001)] };
    let (res, back) = run_op(&mut r, Op::readv(bref, 8 * PAGE as u64 + 5, segs));
    assert_eq!(res, 3_101);
    drop(back);
    assert!(v[3..103] == a[5..105] && v[211..3_212] == a[105..3_106]);
    assert!(v[..3]
        .iter()
        .chain(&v[103..211])
        .chain(&v[3_212..])
        .all(|&x| x == GUARD));

    // Send from and receive into foreign memory.
    let (s1, s2) = socketpair();
    let (x, y) = v.split_at_mut(5_000);
    x[..64].copy_from_slice(&a[..64]);
    y[..64].fill(0);
    // SAFETY: `x` and `y` are disjoint halves of `v`, untouched until both ops end.
    let (out, inn) = unsafe { (lend(x, 0, 64), lend(y, 0, 64)) };
    let (res, back) = run_op(&mut r, Op::send(FileRef::Raw(s1.as_raw_fd()), out, 0, 64));
    assert_eq!(res, 64);
    drop(back);
    let (res, back) = run_op(&mut r, Op::recv(FileRef::Raw(s2.as_raw_fd()), inn, 0, 64));
    assert_eq!(res, 64);
    drop(back);
    assert!(v[5_000..5_064] == a[..64]);
}

/// The ownership contract of a foreign buffer: once the final CQE of its op has been
/// reaped, the kernel no longer targets the caller's memory. A receive into foreign
/// memory is cancelled (callback runs with -ECANCELED and gives the loan back) or
/// orphaned (the reactor drains); data sent to that socket afterwards must not reach
/// the memory and must still be waiting in the socket. A second receive that is not
/// cancelled shows the probe works: its data does land in caller memory.
#[test]
fn a_cancelled_op_leaves_foreign_memory_untouched_after_its_final_cqe() {
    use std::io::{Read, Write};
    const LEN: usize = 4096;
    const UNTOUCHED: u8 = 0xAA;
    let mut r = one_reactor(ReactorConfig::default());
    let mut mem = vec![UNTOUCHED; 2 * LEN];
    let base = mem.as_ptr() as usize;
    let payload = pattern(3, 3, LEN);

    for orphan in [false, true] {
        mem.fill(UNTOUCHED);
        let (a, mut b) = socketpair(); // the op that is cancelled
        let (c, mut d) = socketpair(); // the control op that completes
        let (victim, control) = mem.split_at_mut(LEN);
        // SAFETY: `victim` and `control` are disjoint and outlive both ops; the test
        // reads them only after each op's final CQE (callback run or reactor drained).
        let (vbuf, cbuf) = unsafe { (lend(victim, 0, LEN), lend(control, 0, LEN)) };
        let done = Rc::new(RefCell::new(None));
        let dn = done.clone();
        let id = r
            .submit(
                Op::recv(FileRef::Raw(a.as_raw_fd()), vbuf, 0, LEN as u32),
                move |_, c| {
                    assert!(!orphan, "an orphaned op's callback must never run");
                    *dn.borrow_mut() = Some((c.result, foreign_ranges(&c.op.into_bufs())));
                },
            )
            .expect("submit");
        for _ in 0..5 {
            r.poll_once(); // armed in the kernel
        }
        if orphan {
            assert!(r.orphan(id));
            let start = Instant::now();
            while r.in_flight() > 0 {
                r.poll_once();
                assert!(start.elapsed() < DEADLINE, "orphan did not drain");
            }
        } else {
            r.cancel(id);
            run_until(&mut r, || done.borrow().is_some());
            assert_eq!(
                done.borrow_mut().take(),
                Some((-libc::ECANCELED, vec![(base, LEN)])),
                "cancelled, and the loan comes back as the same memory"
            );
        }

        // The victim's memory is the caller's again; data for its socket arrives now.
        b.write_all(&payload).expect("send to the cancelled socket");
        let got = Rc::new(RefCell::new(None));
        let g = got.clone();
        r.submit(
            Op::recv(FileRef::Raw(c.as_raw_fd()), cbuf, 0, LEN as u32),
            move |_, c| *g.borrow_mut() = Some(c.result),
        )
        .expect("submit control");
        d.write_all(&payload).expect("send to the control socket");
        run_until(&mut r, || got.borrow().is_some());
        for _ in 0..20 {
            r.poll_once(); // give a stray kernel write every chance to show up
        }
        assert_eq!(*got.borrow(), Some(LEN as i32));
        assert!(mem[LEN..] == payload[..], "control: a live op does write");
        assert!(
            mem[..LEN].iter().all(|&x| x == UNTOUCHED),
            "cancelled op wrote caller memory after its final CQE (orphan: {orphan})"
        );
        let mut left = vec![0u8; LEN];
        let mut a = a;
        a.read_exact(&mut left).expect("data still in the socket");
        assert!(
            left == payload,
            "nothing consumed the cancelled socket's data"
        );
    }
}
