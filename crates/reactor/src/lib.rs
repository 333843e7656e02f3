//! ringblk-reactor: per-core io_uring event loop.
