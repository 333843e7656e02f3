//! A smoke test of a vhost-user-blk socket through libblkio's Rust core (the
//! `blkio` crate, driver `virtio-blk-vhost-user`): writes a pattern on every queue,
//! reads it back, flushes, and prints what it saw. The real tests are
//! `crates/server/tests/vhost_blkio.rs` and `ringblk-bench --vhost`; this is for a
//! quick manual check of the control plane:
//!
//! ```text
//! ringblk serve --volume v=,backend=mem,size=64M --vhost v=/tmp/v.sock &
//! cargo run -p ringblk-vhost --example blkio_smoke -- /tmp/v.sock [QUEUES]
//! ```

use std::mem::MaybeUninit;

use blkio::{Blkio, Blkioq, Completion, ReqFlags};

fn wait_one(q: &mut Blkioq, what: &str) -> Result<(), String> {
    let mut c = [MaybeUninit::<Completion>::uninit()];
    let n = q
        .do_io(&mut c, 1, None, None)
        .map_err(|e| format!("{what}: do_io: {e:?}"))?;
    if n != 1 {
        return Err(format!("{what}: {n} completions"));
    }
    // SAFETY: do_io initialised the first `n` (= 1) completions.
    let c = unsafe { c[0].assume_init_read() };
    if c.ret != 0 {
        return Err(format!("{what}: request failed with {}", c.ret));
    }
    Ok(())
}

fn main() -> Result<(), String> {
    let mut args = std::env::args().skip(1);
    let path = args.next().ok_or("usage: blkio_smoke SOCKET [QUEUES]")?;
    let queues: i32 = args
        .next()
        .map_or(Ok(1), |s| s.parse())
        .map_err(|e| format!("{e}"))?;
    let mut b = Blkio::new("virtio-blk-vhost-user").map_err(|e| format!("new: {e:?}"))?;
    b.set_str("path", &path)
        .map_err(|e| format!("path: {e:?}"))?;
    b.connect().map_err(|e| format!("connect: {e:?}"))?;
    let capacity = b
        .get_u64("capacity")
        .map_err(|e| format!("capacity: {e:?}"))?;
    println!("capacity {capacity} bytes");
    b.set_i32("num-queues", queues)
        .map_err(|e| format!("num-queues: {e:?}"))?;
    let mut out = b.start().map_err(|e| format!("start: {e:?}"))?;
    let len = 1 << 20;
    let region = b
        .alloc_mem_region(len)
        .map_err(|e| format!("alloc: {e:?}"))?;
    b.map_mem_region(&region)
        .map_err(|e| format!("map: {e:?}"))?;
    let buf = region.addr as *mut u8;
    for (i, q) in out.queues.iter_mut().enumerate() {
        let off = (i as u64) * 8192;
        // SAFETY: `buf` is the start of the 1 MiB region mapped above, unused
        // elsewhere; 4 KiB + 4 KiB fit.
        let (w, r) = unsafe {
            (
                std::slice::from_raw_parts_mut(buf, 4096),
                std::slice::from_raw_parts_mut(buf.add(4096), 4096),
            )
        };
        for (k, b) in w.iter_mut().enumerate() {
            *b = (k as u8) ^ (i as u8) ^ 0x5a;
        }
        r.fill(0);
        q.write(off, w.as_ptr(), 4096, 1, ReqFlags::empty());
        wait_one(q, "write")?;
        q.read(off, r.as_mut_ptr(), 4096, 2, ReqFlags::empty());
        wait_one(q, "read")?;
        if w != r {
            return Err(format!(
                "queue {i}: read back differs from what was written"
            ));
        }
        q.flush(3, ReqFlags::empty());
        wait_one(q, "flush")?;
        println!("queue {i}: 4 KiB written at {off}, read back equal, flushed");
    }
    println!("ok");
    Ok(())
}
