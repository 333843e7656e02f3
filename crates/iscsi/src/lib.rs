//! ringblk-iscsi: the iSCSI protocol, sans-IO (work in progress, see the end).

pub mod digest;
pub mod pdu;
#[cfg(test)]
mod testutil;
pub mod text;
