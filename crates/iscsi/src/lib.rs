//! ringblk-iscsi: the iSCSI protocol, sans-IO (work in progress, see the end).

pub mod digest;
pub mod discovery;
pub mod fuzz;
pub mod login;
pub mod pdu;
pub mod scsi;
#[cfg(test)]
mod testutil;
pub mod text;
