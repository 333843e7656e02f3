//! ringblk-vhost: the vhost-user-blk front end (issue #13). Skeleton; see the crate's
//! module docs once written.

pub mod blk;
pub mod queue;
pub mod virtq;
