//! Typed io_uring operations that own everything the kernel may touch.
//!
//! # Ownership
//! An [`Op`] owns its buffers, iovec arrays, socket addresses, `msghdr` and
//! timespec. Every pointer placed in an SQE points into a heap allocation owned by
//! the op (never into the `Op` value itself), so the op may move while the kernel
//! works; the reactor's slab keeps the op alive until its final CQE, then hands it
//! back in a [`Completion`].

use std::os::fd::RawFd;
use std::time::Duration;

use io_uring::{opcode, squeue, types};

use crate::buffers::IoBuf;

/// A file named by raw descriptor or by its index in the ring's fixed-file table.
/// Fixed indexes are per reactor (see [`Reactor::register_file`](crate::Reactor::register_file)).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileRef {
    Raw(RawFd),
    Fixed(u32),
}

/// `fallocate` modes used by block targets.
pub mod falloc {
    /// Deallocate the range; reads return zeros (NBD TRIM).
    pub const PUNCH_HOLE: i32 = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    /// Zero the range, keeping it allocated (NBD WRITE_ZEROES with NO_HOLE).
    pub const ZERO_RANGE: i32 = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;
}

/// Storage for an accepted peer's address.
pub struct SockAddrBuf {
    pub addr: libc::sockaddr_storage,
    pub len: libc::socklen_t,
}

/// One operation. Buffers are lent to the kernel for the op's lifetime.
pub enum Op {
    Nop,
    /// Read `len` bytes at `offset` into `buf[..len]`.
    Read {
        file: FileRef,
        offset: u64,
        buf: IoBuf,
        len: u32,
    },
    /// Write `buf[..len]` at `offset`.
    Write {
        file: FileRef,
        offset: u64,
        buf: IoBuf,
        len: u32,
    },
    /// Scatter read into whole buffers. With [`IoBuf::Foreign`] segments this reads
    /// straight into caller memory (a scatter-gather list); more than the kernel's
    /// `IOV_MAX` (1024) segments complete with `-EINVAL`.
    Readv {
        file: FileRef,
        offset: u64,
        bufs: Vec<IoBuf>,
        iov: Vec<libc::iovec>,
    },
    /// Gather write of whole buffers (caller memory too, as for `Readv`).
    Writev {
        file: FileRef,
        offset: u64,
        bufs: Vec<IoBuf>,
        iov: Vec<libc::iovec>,
    },
    Fsync {
        file: FileRef,
        datasync: bool,
    },
    Fallocate {
        file: FileRef,
        offset: u64,
        len: u64,
        mode: i32,
    },
    Accept {
        file: FileRef,
        addr: Box<SockAddrBuf>,
    },
    /// Receive into `buf[start..start + len]`.
    Recv {
        file: FileRef,
        buf: IoBuf,
        start: u32,
        len: u32,
    },
    /// Send `buf[start..start + len]`.
    Send {
        file: FileRef,
        buf: IoBuf,
        start: u32,
        len: u32,
    },
    /// Gather send of whole buffers (`iov` may be trimmed by the caller's builder).
    SendMsg {
        file: FileRef,
        bufs: Vec<IoBuf>,
        iov: Vec<libc::iovec>,
        hdr: Box<libc::msghdr>,
    },
    /// Completes with -ETIME after the duration (an io_uring timeout op).
    Timeout {
        ts: Box<types::Timespec>,
    },
    /// Cancels the op with the given raw user_data (used internally; public so
    /// tests can observe cancellation results).
    Cancel {
        user_data: u64,
    },
}

fn iovecs_of(bufs: &mut [IoBuf]) -> Vec<libc::iovec> {
    bufs.iter_mut()
        .map(|b| libc::iovec {
            iov_len: b.len(),
            iov_base: b.as_mut_ptr() as *mut libc::c_void,
        })
        .collect()
}

impl Op {
    pub fn read(file: FileRef, offset: u64, buf: impl Into<IoBuf>, len: u32) -> Op {
        let buf = buf.into();
        assert!(len as usize <= buf.len(), "read length exceeds buffer");
        Op::Read {
            file,
            offset,
            buf,
            len,
        }
    }

    pub fn write(file: FileRef, offset: u64, buf: impl Into<IoBuf>, len: u32) -> Op {
        let buf = buf.into();
        assert!(len as usize <= buf.len(), "write length exceeds buffer");
        Op::Write {
            file,
            offset,
            buf,
            len,
        }
    }

    pub fn readv(file: FileRef, offset: u64, mut bufs: Vec<IoBuf>) -> Op {
        let iov = iovecs_of(&mut bufs);
        Op::Readv {
            file,
            offset,
            bufs,
            iov,
        }
    }

    pub fn writev(file: FileRef, offset: u64, mut bufs: Vec<IoBuf>) -> Op {
        let iov = iovecs_of(&mut bufs);
        Op::Writev {
            file,
            offset,
            bufs,
            iov,
        }
    }

    pub fn fsync(file: FileRef) -> Op {
        Op::Fsync {
            file,
            datasync: false,
        }
    }

    pub fn fdatasync(file: FileRef) -> Op {
        Op::Fsync {
            file,
            datasync: true,
        }
    }

    pub fn fallocate(file: FileRef, offset: u64, len: u64, mode: i32) -> Op {
        Op::Fallocate {
            file,
            offset,
            len,
            mode,
        }
    }

    pub fn accept(file: FileRef) -> Op {
        Op::Accept {
            file,
            addr: Box::new(SockAddrBuf {
                // SAFETY: sockaddr_storage is plain old data; all-zero is valid.
                addr: unsafe { std::mem::zeroed() },
                len: std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t,
            }),
        }
    }

    pub fn recv(file: FileRef, buf: impl Into<IoBuf>, start: u32, len: u32) -> Op {
        let buf = buf.into();
        assert!(
            start as usize + len as usize <= buf.len(),
            "recv range exceeds buffer"
        );
        Op::Recv {
            file,
            buf,
            start,
            len,
        }
    }

    pub fn send(file: FileRef, buf: impl Into<IoBuf>, start: u32, len: u32) -> Op {
        let buf = buf.into();
        assert!(
            start as usize + len as usize <= buf.len(),
            "send range exceeds buffer"
        );
        Op::Send {
            file,
            buf,
            start,
            len,
        }
    }

    /// Gather send; `lens[i]` bytes of `bufs[i]` (from its start) are sent.
    pub fn sendmsg(file: FileRef, mut bufs: Vec<IoBuf>, lens: &[usize]) -> Op {
        let mut iov = iovecs_of(&mut bufs);
        for (v, &l) in iov.iter_mut().zip(lens) {
            v.iov_len = l.min(v.iov_len);
        }
        // SAFETY: msghdr is plain old data; all-zero is a valid empty header.
        let mut hdr: Box<libc::msghdr> = Box::new(unsafe { std::mem::zeroed() });
        hdr.msg_iov = iov.as_mut_ptr();
        hdr.msg_iovlen = iov.len();
        Op::SendMsg {
            file,
            bufs,
            iov,
            hdr,
        }
    }

    pub fn timeout(after: Duration) -> Op {
        Op::Timeout {
            ts: Box::new(types::Timespec::from(after)),
        }
    }

    /// Gives back the single buffer of a Read/Write/Recv/Send op.
    pub fn into_buf(self) -> Option<IoBuf> {
        match self {
            Op::Read { buf, .. } | Op::Write { buf, .. } => Some(buf),
            Op::Recv { buf, .. } | Op::Send { buf, .. } => Some(buf),
            _ => None,
        }
    }

    /// Gives back the buffers of a vectored op.
    pub fn into_bufs(self) -> Vec<IoBuf> {
        match self {
            Op::Readv { bufs, .. } | Op::Writev { bufs, .. } | Op::SendMsg { bufs, .. } => bufs,
            other => other.into_buf().into_iter().collect(),
        }
    }

    /// The accepted connection's peer address (after an Accept completed).
    pub fn peer_addr(&self) -> Option<std::net::SocketAddr> {
        let Op::Accept { addr, .. } = self else {
            return None;
        };
        sockaddr_to_std(&addr.addr)
    }

    /// Whether the op may touch a file that is in the IOPOLL ring (disk data ops).
    pub(crate) fn is_disk_data(&self) -> bool {
        matches!(
            self,
            Op::Read { .. } | Op::Write { .. } | Op::Readv { .. } | Op::Writev { .. }
        )
    }

    /// Builds the SQE. Called only while the op sits in the slab.
    pub(crate) fn build_sqe(&mut self) -> squeue::Entry {
        macro_rules! with_fd {
            ($file:expr, |$fd:ident| $body:expr) => {
                match $file {
                    FileRef::Raw(raw) => {
                        let $fd = types::Fd(raw);
                        $body
                    }
                    FileRef::Fixed(i) => {
                        let $fd = types::Fixed(i);
                        $body
                    }
                }
            };
        }
        match self {
            Op::Nop => opcode::Nop::new().build(),
            Op::Read {
                file,
                offset,
                buf,
                len,
            } => {
                let idx = buf.fixed_index();
                let p = buf.as_mut_ptr();
                with_fd!(*file, |fd| match idx {
                    Some(i) => opcode::ReadFixed::new(fd, p, *len, i)
                        .offset(*offset)
                        .build(),
                    None => opcode::Read::new(fd, p, *len).offset(*offset).build(),
                })
            }
            Op::Write {
                file,
                offset,
                buf,
                len,
            } => {
                let idx = buf.fixed_index();
                let p = buf.as_mut_ptr() as *const u8;
                with_fd!(*file, |fd| match idx {
                    Some(i) => opcode::WriteFixed::new(fd, p, *len, i)
                        .offset(*offset)
                        .build(),
                    None => opcode::Write::new(fd, p, *len).offset(*offset).build(),
                })
            }
            Op::Readv {
                file, offset, iov, ..
            } => with_fd!(*file, |fd| opcode::Readv::new(
                fd,
                iov.as_ptr(),
                iov.len() as u32
            )
            .offset(*offset)
            .build()),
            Op::Writev {
                file, offset, iov, ..
            } => with_fd!(*file, |fd| opcode::Writev::new(
                fd,
                iov.as_ptr(),
                iov.len() as u32
            )
            .offset(*offset)
            .build()),
            Op::Fsync { file, datasync } => {
                let flags = if *datasync {
                    types::FsyncFlags::DATASYNC
                } else {
                    types::FsyncFlags::empty()
                };
                with_fd!(*file, |fd| opcode::Fsync::new(fd).flags(flags).build())
            }
            Op::Fallocate {
                file,
                offset,
                len,
                mode,
            } => with_fd!(*file, |fd| opcode::Fallocate::new(fd, *len)
                .offset(*offset)
                .mode(*mode)
                .build()),
            Op::Accept { file, addr } => {
                let a = &mut addr.addr as *mut libc::sockaddr_storage as *mut libc::sockaddr;
                let l = &mut addr.len as *mut libc::socklen_t;
                with_fd!(*file, |fd| opcode::Accept::new(fd, a, l)
                    .flags(libc::SOCK_CLOEXEC)
                    .build())
            }
            Op::Recv {
                file,
                buf,
                start,
                len,
            } => {
                let p = buf.as_mut_ptr().wrapping_add(*start as usize);
                with_fd!(*file, |fd| opcode::Recv::new(fd, p, *len).build())
            }
            Op::Send {
                file,
                buf,
                start,
                len,
            } => {
                let p = buf.as_mut_ptr().wrapping_add(*start as usize) as *const u8;
                with_fd!(*file, |fd| opcode::Send::new(fd, p, *len)
                    .flags(libc::MSG_NOSIGNAL)
                    .build())
            }
            Op::SendMsg { file, hdr, .. } => {
                let h = &**hdr as *const libc::msghdr;
                with_fd!(*file, |fd| opcode::SendMsg::new(fd, h)
                    .flags(libc::MSG_NOSIGNAL as u32)
                    .build())
            }
            Op::Timeout { ts } => opcode::Timeout::new(&**ts as *const types::Timespec).build(),
            Op::Cancel { user_data } => opcode::AsyncCancel::new(*user_data).build(),
        }
    }
}

fn sockaddr_to_std(ss: &libc::sockaddr_storage) -> Option<std::net::SocketAddr> {
    use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
    match ss.ss_family as i32 {
        libc::AF_INET => {
            // SAFETY: ss_family says this storage holds a sockaddr_in; storage is
            // large and aligned enough for it.
            let a = unsafe { &*(ss as *const _ as *const libc::sockaddr_in) };
            Some(SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)),
                u16::from_be(a.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: as above, for sockaddr_in6.
            let a = unsafe { &*(ss as *const _ as *const libc::sockaddr_in6) };
            Some(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(a.sin6_addr.s6_addr),
                u16::from_be(a.sin6_port),
                a.sin6_flowinfo,
                a.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

/// The final result of an operation, with the op (and its buffers) given back.
pub struct Completion {
    /// The CQE result: bytes transferred or a negative errno.
    pub result: i32,
    pub op: Op,
}

impl Completion {
    /// `Ok(bytes)` or `Err(errno)` (positive errno value).
    pub fn bytes(&self) -> Result<u32, i32> {
        if self.result < 0 {
            Err(-self.result)
        } else {
            Ok(self.result as u32)
        }
    }
}
