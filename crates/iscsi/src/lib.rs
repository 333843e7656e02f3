//! ringblk-iscsi: the iSCSI protocol for ringblk (issue #14). The sans-IO foundation:
//! bytes and PDUs in, PDUs and decisions out; no sockets, no threads, no clocks, no
//! randomness of its own, no storage. With the default feature `frontend`, [`frontend`]
//! runs sessions on reactors over the block layer (the fuzz crate builds without it).
//!
//! # What this crate may import
//! `std`, `thiserror`, `crc32c` (digests), `md-5` (CHAP), and from ringblk only
//! `ringblk_target::error::BlockError`, the block layer's protocol-free error, which
//! [`scsi::sense_for`] maps to sense data (the one place that does). Depending on the
//! target crate for that one type pulls the whole crate into the build; accepted,
//! because the front end will submit through its bdev API anyway. Nothing here may
//! import images, maps, backends or `ringblk-server` (`ci/layers.py` checks the crate
//! dependencies).
//!
//! # Modules
//! - [`pdu`]: the 48-byte BHS of every opcode in both directions, AHS (extended CDB,
//!   bidirectional read length), data segments and padding, and [`pdu::PduDecoder`],
//!   an incremental decoder fed arbitrary chunks, with limits.
//! - [`digest`]: CRC32C header and data digests (RFC 3720 B.4 vectors in its tests).
//! - [`text`]: `key=value` text, C-bit accumulation and long-response splitting.
//! - [`login`]: the target side of login: stages, CHAP, RFC 7143 §13 negotiation,
//!   the resulting [`login::SessionParams`].
//! - [`names`]: volume and backup names as iSCSI target names, reversibly escaped.
//! - [`discovery`]: Text requests in the full feature phase (`SendTargets`).
//! - [`window`]: the CmdSN window (ExpCmdSN/MaxCmdSN) as back-pressure.
//! - [`response`]: Data-In sequences (status in the last PDU) and SCSI Responses.
//! - [`r2t`]: a write's data: immediate, unsolicited and R2T-requested Data-Out, each
//!   PDU checked before its data is copied.
//! - [`scsi`]: CDB decoding into [`scsi::ScsiRequest`], response pages, sense data,
//!   persistent reservations ([`scsi::pr`]).
//! - [`fuzz`]: entry points of the cargo-fuzz targets `iscsi_pdu` and `iscsi_login`.
//!
//! # Contracts
//! - **Limits.** The decoder accepts at most our declared MaxRecvDataSegmentLength of
//!   data (8192 during login) and a capped AHS, checked before anything is allocated;
//!   a login's text is bounded across C-bit PDUs, keys and values by RFC 7143's lengths,
//!   a login by [`login::LOGIN_PDUS_MAX`] requests, reservations by
//!   [`scsi::pr::REGISTRANTS_MAX`]. Every error names what was wrong.
//! - **Ownership.** Decoded PDUs own their AHS and data (`Vec`s no larger than the
//!   limits); nothing borrows the caller's buffers past a call.
//! - **What a caller must do.** Feed every received byte to one `PduDecoder` per
//!   connection and close the connection on any `PduError` (ErrorRecoveryLevel 0).
//!   During login give each PDU to [`login::Login::handle`] and send the one response it
//!   returns; on `Complete` switch the decoder to the negotiated digests and
//!   MaxRecvDataSegmentLength. Supply unpredictable entropy for CHAP and a fresh TSIH.
//!   In the full feature phase admit each command through a [`window::CmdWindow`]
//!   (drop what it drops; a busy volume narrows the window instead of queueing),
//!   decode CDBs with [`scsi::decode`], check Data-Out against
//!   [`scsi::ScsiRequest::data_out_len`] and the Expected Data Transfer Length, answer
//!   failures with CHECK CONDITION and [`scsi::sense_for`]'s sense, and check
//!   reservations with [`scsi::pr::Reservations::check_access`] before I/O. For a
//!   write, run a [`r2t::WriteTransfer`]: send the R2Ts it asks for, place each Data-Out
//!   where it says, submit once it is complete. Answer reads with
//!   [`response::data_in`] and everything else with [`response::scsi_response`],
//!   advancing StatSN once per status sent.
//! - **Panics.** None on input: wire bytes are hostile (fuzzed, proptested).
//!
//! # Not done yet
//! - The session ([`frontend`], its module docs) serves one connection per session,
//!   copies Data-In and Data-Out (not zero-copy), sends no Async messages, and closes
//!   the connection on a bad Data-Out (DataSN, offset) instead of answering it. Medium
//!   access goes through `check_access`; under RESERVE(6) MODE SENSE, READ CAPACITY
//!   and START STOP UNIT of another nexus conflict too. LUN RESET aborts this
//!   session's tasks only. Unit serials and NAA ids derive from the volume name (not a
//!   persisted per-incarnation id), and reservations live in memory, shared by the
//!   server's sessions (not persisted, no APTPL).
//! - Wiring done: `ringblk serve --iscsi`, `[iscsi]` (IQN prefix, CHAP), RPC
//!   `iscsi_list`, stats label `iscsi`. Not done: `iscsi_target_list` and
//!   `iscsi_session_list` as separate RPCs, per-session CmdSN window in RPC output
//!   (the login's is shown), the benchmark against tgtd.
//! - Real-client tests: crates/server/tests/iscsi.rs (libiscsi tools, iscsi-test-cu
//!   suites, qemu-io/qemu-img, CHAP); the passing iscsi-test-cu tests are asserted
//!   there and the others named with reasons. MultipathIO is not run yet.
//! - SCSI commands not decoded yet: REPORT SUPPORTED OPERATION CODES (libiscsi's
//!   suite asks for it), PREVENT ALLOW MEDIUM REMOVAL, READ DEFECT DATA, SANITIZE,
//!   EXTENDED COPY, WRITE ATOMIC, ORWRITE, PRE-FETCH.
//! - Not planned at this level: ErrorRecoveryLevel > 0 (SNACK decodes as
//!   [`pdu::Bhs::Unknown`]), several connections per session, READ FULL STATUS and
//!   REGISTER AND MOVE in persistent reservations, descriptor-format sense.

pub mod digest;
pub mod discovery;
#[cfg(feature = "frontend")]
pub mod frontend;
pub mod fuzz;
pub mod login;
pub mod names;
pub mod pdu;
pub mod r2t;
pub mod response;
pub mod scsi;
#[cfg(test)]
mod testutil;
pub mod text;
pub mod window;
