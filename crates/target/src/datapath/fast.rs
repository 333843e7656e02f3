//! The fast path: requests on a view without deltas, one I/O on the base, no map
//! lookups (moved from a front end's session, #12 step 3).
//!
//! Each function takes the request's stack pin and keeps it in the operation's
//! callback until the I/O has landed, so the drain of a later switchover waits for
//! it. Completions are generic `FnOnce`s (module docs of `datapath`, *Completion*);
//! a null backend completes before the function returns.

use std::sync::Arc;

use ringblk_reactor::{falloc, AlignedBuf, FileRef, IoBuf, Op, Reactor};

use crate::error::BlockError;
use crate::image::StackPin;

use super::{submit_io, DataVol};

/// Chunk size of the write-zeros fallback (when fallocate cannot zero).
const ZERO_FILL_CHUNK: u64 = 1024 * 1024;

/// A read's buffer back from the data path.
pub(crate) struct Filled {
    pub buf: IoBuf,
    /// The buffer was not touched and reads as zeros (null base).
    pub zeros: bool,
}

fn base_file<V: DataVol + ?Sized>(vol: &V) -> Option<FileRef> {
    vol.images().backend().raw_fd().map(FileRef::Raw)
}

fn write_result(res: Result<u32, i32>, len: u32) -> Result<(), BlockError> {
    match res {
        Ok(n) if n == len => Ok(()),
        // A short O_DIRECT write means the device is out of space.
        Ok(_) => Err(BlockError::NoSpace),
        Err(e) => Err(BlockError::from_os_errno(e)),
    }
}

/// Reads `len` bytes at `offset` of the base into `buf` (at least `len` long).
pub(crate) fn read<V: DataVol, F>(
    r: &mut Reactor,
    vol: &Arc<V>,
    pin: StackPin,
    (offset, len): (u64, u32),
    buf: IoBuf,
    fin: F,
) where
    F: FnOnce(&mut Reactor, Result<Filled, BlockError>) + 'static,
{
    let Some(file) = base_file(vol) else {
        drop(pin);
        return fin(r, Ok(Filled { buf, zeros: true }));
    };
    submit_io(r, vol, Op::read(file, offset, buf, len), move |r, comp| {
        drop(pin);
        let res = match comp.bytes() {
            Ok(n) => match comp.op.into_buf() {
                Some(mut buf) => {
                    // Short read = end of file: the rest reads as zeros.
                    buf.as_mut_slice()[n as usize..len as usize].fill(0);
                    Ok(Filled { buf, zeros: false })
                }
                None => Err(BlockError::Io),
            },
            Err(e) => Err(BlockError::from_os_errno(e)),
        };
        fin(r, res)
    })
}

/// Reads `len` bytes at `offset` of the base straight into caller memory (`bufs`:
/// foreign segments covering exactly `len`); `fin` gets the bytes read, and the
/// caller zeroes the rest (end of file, or all of it on a null base).
pub(crate) fn read_sg<V: DataVol, F>(
    r: &mut Reactor,
    vol: &Arc<V>,
    pin: StackPin,
    offset: u64,
    bufs: Vec<IoBuf>,
    fin: F,
) where
    F: FnOnce(&mut Reactor, Result<u32, BlockError>) + 'static,
{
    let Some(file) = base_file(vol) else {
        drop(pin);
        return fin(r, Ok(0));
    };
    submit_io(r, vol, Op::readv(file, offset, bufs), move |r, comp| {
        drop(pin);
        let res = comp.bytes().map_err(BlockError::from_os_errno);
        drop(comp.op); // ends the loan of the caller's memory before `fin`
        fin(r, res)
    })
}

/// Writes `len` bytes at an offset of the base with the op `make` builds for the
/// base file (`Op::write` of a layer buffer, or `Op::writev` of caller memory);
/// FUA: durable before `fin`. The op, and with it the buffer or the loan of the
/// caller's memory, is dropped before the FUA sync and before `fin`.
pub(crate) fn write<V: DataVol, F>(
    r: &mut Reactor,
    vol: &Arc<V>,
    pin: StackPin,
    len: u32,
    make: impl FnOnce(FileRef) -> Op,
    fua: bool,
    fin: F,
) where
    F: FnOnce(&mut Reactor, Result<(), BlockError>) + 'static,
{
    let Some(file) = base_file(vol) else {
        drop(pin);
        return fin(r, Ok(()));
    };
    let vol2 = fua.then(|| vol.clone());
    submit_io(r, vol, make(file), move |r, comp| {
        drop(pin); // the write has landed: the drain may count it done
        let res = write_result(comp.bytes(), len);
        drop(comp.op);
        with_fua(r, vol2, file, res, fin)
    })
}

/// FLUSH of the base.
pub(crate) fn flush<V: DataVol, F>(r: &mut Reactor, vol: &Arc<V>, pin: StackPin, fin: F)
where
    F: FnOnce(&mut Reactor, Result<(), BlockError>) + 'static,
{
    let Some(file) = base_file(vol) else {
        drop(pin);
        return fin(r, Ok(()));
    };
    submit_io(r, vol, Op::fdatasync(file), move |r, comp| {
        drop(pin);
        fin(
            r,
            comp.bytes().map(|_| ()).map_err(BlockError::from_os_errno),
        )
    })
}

/// UNMAP (advisory): a hole punched where the backend can, else nothing.
pub(crate) fn unmap<V: DataVol, F>(
    r: &mut Reactor,
    vol: &Arc<V>,
    pin: StackPin,
    (offset, len): (u64, u64),
    fua: bool,
    fin: F,
) where
    F: FnOnce(&mut Reactor, Result<(), BlockError>) + 'static,
{
    let file = match base_file(vol) {
        // A device that cannot discard keeps the data.
        Some(file) if vol.images().backend().can_punch() => file,
        _ => {
            drop(pin);
            return fin(r, Ok(()));
        }
    };
    let vol2 = fua.then(|| vol.clone());
    let op = Op::fallocate(file, offset, len, falloc::PUNCH_HOLE);
    submit_io(r, vol, op, move |r, comp| {
        drop(pin);
        let res = match comp.bytes() {
            // Advisory: a device without a fast zero/discard keeps the data.
            Err(e) if e == libc::EOPNOTSUPP || e == libc::EINVAL => Ok(()),
            res => res.map(|_| ()).map_err(BlockError::from_os_errno),
        };
        with_fua(r, vol2, file, res, fin)
    })
}

/// WRITE_ZEROES: fallocate (punch, or zero-range when `!may_unmap`), or writes of
/// zeros where fallocate cannot; `fast_only` refuses the slow way (`NotSupported`).
#[allow(clippy::too_many_arguments)]
pub(crate) fn write_zeroes<V: DataVol, F>(
    r: &mut Reactor,
    vol: &Arc<V>,
    pin: StackPin,
    (offset, len): (u64, u64),
    may_unmap: bool,
    fast_only: bool,
    fua: bool,
    fin: F,
) where
    F: FnOnce(&mut Reactor, Result<(), BlockError>) + 'static,
{
    let Some(file) = base_file(vol) else {
        drop(pin);
        return fin(r, Ok(()));
    };
    if !vol.images().backend().can_punch() {
        if fast_only {
            drop(pin);
            return fin(r, Err(BlockError::NotSupported));
        }
        return zero_fill(r, vol.clone(), file, (offset, len), 0, fua, pin, fin);
    }
    let mode = if may_unmap {
        falloc::PUNCH_HOLE
    } else {
        falloc::ZERO_RANGE
    };
    let vol2 = vol.clone();
    let op = Op::fallocate(file, offset, len, mode);
    submit_io(r, vol, op, move |r, comp| match comp.bytes() {
        Ok(_) => {
            drop(pin);
            with_fua(r, fua.then_some(vol2), file, Ok(()), fin)
        }
        Err(e) if e == libc::EOPNOTSUPP || e == libc::EINVAL => {
            if fast_only {
                drop(pin);
                fin(r, Err(BlockError::NotSupported))
            } else {
                zero_fill(r, vol2, file, (offset, len), 0, fua, pin, fin)
            }
        }
        Err(e) => {
            drop(pin);
            fin(r, Err(BlockError::from_os_errno(e)))
        }
    })
}

/// Writes zeros chunk by chunk where fallocate cannot (block devices).
#[allow(clippy::too_many_arguments)]
fn zero_fill<V: DataVol, F>(
    r: &mut Reactor,
    vol: Arc<V>,
    file: FileRef,
    (offset, total): (u64, u64),
    done: u64,
    fua: bool,
    pin: StackPin,
    fin: F,
) where
    F: FnOnce(&mut Reactor, Result<(), BlockError>) + 'static,
{
    if done >= total {
        drop(pin);
        return with_fua(r, fua.then_some(vol), file, Ok(()), fin);
    }
    let n = (total - done).min(ZERO_FILL_CHUNK);
    let buf = AlignedBuf::direct(n as usize);
    let vol2 = vol.clone();
    submit_io(
        r,
        &vol,
        Op::write(file, offset + done, buf, n as u32),
        move |r, comp| match write_result(comp.bytes(), n as u32) {
            Ok(()) => zero_fill(r, vol2, file, (offset, total), done + n, fua, pin, fin),
            Err(e) => {
                drop(pin);
                fin(r, Err(e))
            }
        },
    );
}

/// FUA: `fin` waits until the data is durable (`vol` is `Some` for FUA).
fn with_fua<V: DataVol, F>(
    r: &mut Reactor,
    vol: Option<Arc<V>>,
    file: FileRef,
    res: Result<(), BlockError>,
    fin: F,
) where
    F: FnOnce(&mut Reactor, Result<(), BlockError>) + 'static,
{
    let Some(vol) = vol.filter(|_| res.is_ok()) else {
        return fin(r, res);
    };
    submit_io(r, &vol, Op::fdatasync(file), move |r, comp| {
        fin(
            r,
            comp.bytes().map(|_| ()).map_err(BlockError::from_os_errno),
        )
    });
}
