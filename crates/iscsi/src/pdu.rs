//! iSCSI PDUs (RFC 7143 §11): the 48-byte Basic Header Segment of every opcode, in both
//! directions, Additional Header Segments, data segments with their padding, optional
//! CRC32C digests, and [`PduDecoder`], an incremental decoder fed arbitrary byte chunks.
//!
//! # Wire layout
//! `BHS (48) | AHS (TotalAHSLength * 4) | header digest (4)? | data (DataSegmentLength)
//! | padding to 4 | data digest (4)?`. The header digest covers BHS and AHS; the data
//! digest covers data and padding; neither exists when its length would be zero (no data
//! segment, no data digest).
//!
//! # Bounds
//! The decoder owns a 48-byte header buffer, at most [`DecoderLimits::ahs_max_bytes`] of
//! AHS and at most [`DecoderLimits::data_segment_max_bytes`] of data, and allocates only
//! after the lengths in the header were checked against them. Our declared
//! MaxRecvDataSegmentLength is the data limit (8192 during login, RFC 7143 §13.12).
//!
//! # Reserved fields and unknown opcodes
//! Reserved bits are written as zero and ignored on receipt. An opcode this codec does
//! not know still frames (TotalAHSLength and DataSegmentLength are common to every
//! PDU), so it decodes as [`Bhs::Unknown`] and the session answers it with a Reject
//! instead of losing the stream.
//!
//! # Errors
//! Every [`PduError`] from the decoder ends the connection: after it the stream cannot
//! be trusted (a header digest error may hide a wrong length; at ErrorRecoveryLevel 0 a
//! data digest error is answered by dropping the connection too, RFC 7143 §7.8). The
//! decoder stays poisoned afterwards.

use super::digest::{self, DIGEST_LEN};

/// Length of the Basic Header Segment.
pub const BHS_LEN: usize = 48;
/// TotalAHSLength is one byte counting 4-byte words.
pub const AHS_MAX_BYTES: usize = 255 * 4;
/// DataSegmentLength is a 3-byte field.
pub const DATA_SEGMENT_MAX_BYTES: u32 = (1 << 24) - 1;
/// MaxRecvDataSegmentLength before (and during) login: RFC 7143 §13.12's default.
pub const LOGIN_DATA_SEGMENT_MAX_BYTES: u32 = 8192;
/// The reserved Initiator Task Tag (unsolicited NOP-In, Reject, Async message).
pub const RESERVED_TAG: u32 = 0xffff_ffff;

/// Opcodes (byte 0, low 6 bits).
pub mod opcode {
    /// Initiator: NOP-Out.
    pub const NOP_OUT: u8 = 0x00;
    /// Initiator: SCSI Command.
    pub const SCSI_COMMAND: u8 = 0x01;
    /// Initiator: SCSI Task Management Function Request.
    pub const TASK_MGMT_REQUEST: u8 = 0x02;
    /// Initiator: Login Request.
    pub const LOGIN_REQUEST: u8 = 0x03;
    /// Initiator: Text Request.
    pub const TEXT_REQUEST: u8 = 0x04;
    /// Initiator: SCSI Data-Out.
    pub const DATA_OUT: u8 = 0x05;
    /// Initiator: Logout Request.
    pub const LOGOUT_REQUEST: u8 = 0x06;
    /// Initiator: SNACK Request (ErrorRecoveryLevel > 0 only; decoded as `Unknown`).
    pub const SNACK_REQUEST: u8 = 0x10;
    /// Target: NOP-In.
    pub const NOP_IN: u8 = 0x20;
    /// Target: SCSI Response.
    pub const SCSI_RESPONSE: u8 = 0x21;
    /// Target: SCSI Task Management Function Response.
    pub const TASK_MGMT_RESPONSE: u8 = 0x22;
    /// Target: Login Response.
    pub const LOGIN_RESPONSE: u8 = 0x23;
    /// Target: Text Response.
    pub const TEXT_RESPONSE: u8 = 0x24;
    /// Target: SCSI Data-In.
    pub const DATA_IN: u8 = 0x25;
    /// Target: Logout Response.
    pub const LOGOUT_RESPONSE: u8 = 0x26;
    /// Target: Ready To Transfer.
    pub const R2T: u8 = 0x31;
    /// Target: Asynchronous Message.
    pub const ASYNC_MESSAGE: u8 = 0x32;
    /// Target: Reject.
    pub const REJECT: u8 = 0x3f;
}

/// AHS types (RFC 7143 §11.2.2).
pub mod ahs_type {
    /// Extended CDB: the CDB bytes past the 16 in the BHS.
    pub const EXTENDED_CDB: u8 = 1;
    /// Expected bidirectional read data length.
    pub const BIDI_READ_LENGTH: u8 = 2;
}

/// Why bytes are not a valid PDU, or a PDU cannot be encoded.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PduError {
    /// DataSegmentLength above our MaxRecvDataSegmentLength (or the field's range).
    #[error("data segment of {len} bytes exceeds the limit of {max}")]
    DataSegmentTooLong { len: u32, max: u32 },
    /// TotalAHSLength above the AHS cap.
    #[error("AHS of {len} bytes exceeds the limit of {max}")]
    AhsTooLong { len: usize, max: usize },
    /// The AHS does not parse: lengths overrun it, or a type repeats.
    #[error("malformed AHS: {0}")]
    BadAhs(&'static str),
    /// The header digest does not match BHS and AHS.
    #[error("header digest {received:#010x}, computed {computed:#010x}")]
    HeaderDigest { received: u32, computed: u32 },
    /// The data digest does not match data and padding.
    #[error("data digest {received:#010x}, computed {computed:#010x}")]
    DataDigest { received: u32, computed: u32 },
    /// A field cannot be encoded (too long AHS, data or CDB).
    #[error("cannot encode {field}: {value} is out of range")]
    Encode { field: &'static str, value: usize },
    /// An earlier error ended the stream.
    #[error("the stream failed earlier")]
    Poisoned,
}

// --- field helpers: every BHS field is big-endian at a fixed offset ----------------

fn be16(b: &[u8; BHS_LEN], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}
fn be32(b: &[u8; BHS_LEN], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
fn be64(b: &[u8; BHS_LEN], at: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(v)
}
fn put16(b: &mut [u8; BHS_LEN], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_be_bytes());
}
fn put32(b: &mut [u8; BHS_LEN], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}
fn put64(b: &mut [u8; BHS_LEN], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_be_bytes());
}
fn bit(v: u8, mask: u8) -> bool {
    v & mask != 0
}
fn flag(on: bool, mask: u8) -> u8 {
    if on {
        mask
    } else {
        0
    }
}

const F: u8 = 0x80;
const IMMEDIATE: u8 = 0x40;

/// Login Request (RFC 7143 §11.12). The I bit is always set on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoginRequest {
    /// T: the initiator is ready to move to `nsg`.
    pub transit: bool,
    /// C: the text continues in the next PDU.
    pub cont: bool,
    /// Current stage (2 bits: 0 security, 1 operational, 3 full feature).
    pub csg: u8,
    /// Next stage (valid with `transit`).
    pub nsg: u8,
    pub version_max: u8,
    pub version_min: u8,
    pub isid: [u8; 6],
    pub tsih: u16,
    pub itt: u32,
    pub cid: u16,
    pub cmd_sn: u32,
    pub exp_stat_sn: u32,
}

/// Login Response (RFC 7143 §11.13).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoginResponse {
    pub transit: bool,
    pub cont: bool,
    pub csg: u8,
    pub nsg: u8,
    pub version_max: u8,
    pub version_active: u8,
    pub isid: [u8; 6],
    pub tsih: u16,
    pub itt: u32,
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
    pub status_class: u8,
    pub status_detail: u8,
}

/// Text Request (RFC 7143 §11.10).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TextRequest {
    pub immediate: bool,
    pub final_: bool,
    pub cont: bool,
    pub lun: u64,
    pub itt: u32,
    pub ttt: u32,
    pub cmd_sn: u32,
    pub exp_stat_sn: u32,
}

/// Text Response (RFC 7143 §11.11).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TextResponse {
    pub final_: bool,
    pub cont: bool,
    pub lun: u64,
    pub itt: u32,
    pub ttt: u32,
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
}

/// SCSI Command (RFC 7143 §11.3). A CDB longer than 16 bytes continues in an
/// extended-CDB AHS: see [`Pdu::cdb`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ScsiCommand {
    pub immediate: bool,
    /// F: no unsolicited Data-Out follows this PDU.
    pub final_: bool,
    /// R: data flows to the initiator.
    pub read: bool,
    /// W: data flows to the target.
    pub write: bool,
    /// Task attributes (3 bits: untagged, simple, ordered, head of queue, ACA).
    pub attr: u8,
    pub lun: u64,
    pub itt: u32,
    pub expected_data_len: u32,
    pub cmd_sn: u32,
    pub exp_stat_sn: u32,
    /// The first 16 bytes of the CDB (zero-padded when shorter).
    pub cdb: [u8; 16],
}

/// SCSI Response (RFC 7143 §11.4). The data segment carries sense data as
/// `SenseLength (2) | sense`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ScsiResponse {
    /// o: bidirectional read residual overflow.
    pub bidi_overflow: bool,
    /// u: bidirectional read residual underflow.
    pub bidi_underflow: bool,
    /// O: residual overflow (more data than expected was needed).
    pub overflow: bool,
    /// U: residual underflow (less data than expected was moved).
    pub underflow: bool,
    /// 0x00 command completed at target, 0x01 target failure.
    pub response: u8,
    /// SCSI status (0x00 GOOD, 0x02 CHECK CONDITION, 0x18 RESERVATION CONFLICT, …).
    pub status: u8,
    pub itt: u32,
    pub snack_tag: u32,
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
    pub exp_data_sn: u32,
    pub bidi_residual: u32,
    pub residual: u32,
}

/// SCSI Data-Out (RFC 7143 §11.7).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DataOut {
    pub final_: bool,
    pub lun: u64,
    pub itt: u32,
    /// The R2T's tag, or `RESERVED_TAG` for unsolicited data.
    pub ttt: u32,
    pub exp_stat_sn: u32,
    pub data_sn: u32,
    pub buffer_offset: u32,
}

/// SCSI Data-In (RFC 7143 §11.8). With `status` set (the S bit) the PDU also completes
/// the command (the last PDU of a read that needs no sense data).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DataIn {
    pub final_: bool,
    /// A: the target asks for a DataACK SNACK (ErrorRecoveryLevel > 0 only).
    pub ack: bool,
    pub overflow: bool,
    pub underflow: bool,
    /// S bit and status byte: `Some(status)` when this PDU carries the status.
    pub status: Option<u8>,
    pub lun: u64,
    pub itt: u32,
    pub ttt: u32,
    /// Valid with `status` only; encoded as given either way.
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
    pub data_sn: u32,
    pub buffer_offset: u32,
    pub residual: u32,
}

/// Ready To Transfer (RFC 7143 §11.8).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct R2t {
    pub lun: u64,
    pub itt: u32,
    pub ttt: u32,
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
    pub r2t_sn: u32,
    pub buffer_offset: u32,
    pub desired_len: u32,
}

/// NOP-Out (RFC 7143 §11.18): a ping, or the answer to a target's NOP-In.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NopOut {
    pub immediate: bool,
    pub lun: u64,
    pub itt: u32,
    pub ttt: u32,
    pub cmd_sn: u32,
    pub exp_stat_sn: u32,
}

/// NOP-In (RFC 7143 §11.19).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NopIn {
    pub lun: u64,
    pub itt: u32,
    pub ttt: u32,
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
}

/// Task Management Function Request (RFC 7143 §11.5).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TaskMgmtRequest {
    pub immediate: bool,
    /// 7 bits: 1 ABORT TASK, 2 ABORT TASK SET, 3 CLEAR ACA, 4 CLEAR TASK SET,
    /// 5 LOGICAL UNIT RESET, 6 TARGET WARM RESET, 7 TARGET COLD RESET, 8 TASK REASSIGN.
    pub function: u8,
    pub lun: u64,
    pub itt: u32,
    pub referenced_tag: u32,
    pub cmd_sn: u32,
    pub exp_stat_sn: u32,
    pub ref_cmd_sn: u32,
    pub exp_data_sn: u32,
}

/// Task Management Function Response (RFC 7143 §11.6).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TaskMgmtResponse {
    /// 0 complete, 1 task does not exist, 2 LUN does not exist, 3 task allegiant,
    /// 4 reassignment not supported, 5 not supported, 6 authorization failed,
    /// 255 rejected.
    pub response: u8,
    pub itt: u32,
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
}

/// Logout Request (RFC 7143 §11.14).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LogoutRequest {
    pub immediate: bool,
    /// 7 bits: 0 close the session, 1 close the connection, 2 remove for recovery.
    pub reason: u8,
    pub itt: u32,
    pub cid: u16,
    pub cmd_sn: u32,
    pub exp_stat_sn: u32,
}

/// Logout Response (RFC 7143 §11.15).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LogoutResponse {
    /// 0 closed, 1 CID not found, 2 recovery not supported, 3 cleanup failed.
    pub response: u8,
    pub itt: u32,
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
    pub time2wait: u16,
    pub time2retain: u16,
}

/// Reject (RFC 7143 §11.17). The data segment is the rejected PDU's header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reject {
    /// See [`reject_reason`].
    pub reason: u8,
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
    pub data_sn_or_r2t_sn: u32,
}

/// Asynchronous Message (RFC 7143 §11.9).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AsyncMessage {
    pub lun: u64,
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
    pub event: u8,
    pub vcode: u8,
    pub param1: u16,
    pub param2: u16,
    pub param3: u16,
}

/// A decoded Basic Header Segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bhs {
    NopOut(NopOut),
    ScsiCommand(ScsiCommand),
    TaskMgmtRequest(TaskMgmtRequest),
    LoginRequest(LoginRequest),
    TextRequest(TextRequest),
    DataOut(DataOut),
    LogoutRequest(LogoutRequest),
    NopIn(NopIn),
    ScsiResponse(ScsiResponse),
    TaskMgmtResponse(TaskMgmtResponse),
    LoginResponse(LoginResponse),
    TextResponse(TextResponse),
    DataIn(DataIn),
    LogoutResponse(LogoutResponse),
    R2t(R2t),
    AsyncMessage(AsyncMessage),
    Reject(Reject),
    /// An opcode this codec does not decode (SNACK, vendor opcodes, reserved ones). The
    /// whole header is kept: a Reject carries it back.
    Unknown {
        opcode: u8,
        itt: u32,
    },
}

impl Bhs {
    /// Decodes a header. TotalAHSLength and DataSegmentLength (bytes 4..8) are the
    /// framing's business and are not part of the result. Never fails: every bit
    /// pattern is some PDU (reserved bits are ignored, unknown opcodes are `Unknown`).
    pub fn decode(b: &[u8; BHS_LEN]) -> Bhs {
        let op = b[0] & 0x3f;
        let imm = bit(b[0], IMMEDIATE);
        let fl = b[1];
        let lun = be64(b, 8);
        let itt = be32(b, 16);
        match op {
            opcode::NOP_OUT => Bhs::NopOut(NopOut {
                immediate: imm,
                lun,
                itt,
                ttt: be32(b, 20),
                cmd_sn: be32(b, 24),
                exp_stat_sn: be32(b, 28),
            }),
            opcode::SCSI_COMMAND => {
                let mut cdb = [0u8; 16];
                cdb.copy_from_slice(&b[32..48]);
                Bhs::ScsiCommand(ScsiCommand {
                    immediate: imm,
                    final_: bit(fl, F),
                    read: bit(fl, 0x40),
                    write: bit(fl, 0x20),
                    attr: fl & 0x07,
                    lun,
                    itt,
                    expected_data_len: be32(b, 20),
                    cmd_sn: be32(b, 24),
                    exp_stat_sn: be32(b, 28),
                    cdb,
                })
            }
            opcode::TASK_MGMT_REQUEST => Bhs::TaskMgmtRequest(TaskMgmtRequest {
                immediate: imm,
                function: fl & 0x7f,
                lun,
                itt,
                referenced_tag: be32(b, 20),
                cmd_sn: be32(b, 24),
                exp_stat_sn: be32(b, 28),
                ref_cmd_sn: be32(b, 32),
                exp_data_sn: be32(b, 36),
            }),
            opcode::LOGIN_REQUEST => {
                let mut isid = [0u8; 6];
                isid.copy_from_slice(&b[8..14]);
                Bhs::LoginRequest(LoginRequest {
                    transit: bit(fl, 0x80),
                    cont: bit(fl, 0x40),
                    csg: (fl >> 2) & 3,
                    nsg: fl & 3,
                    version_max: b[2],
                    version_min: b[3],
                    isid,
                    tsih: be16(b, 14),
                    itt,
                    cid: be16(b, 20),
                    cmd_sn: be32(b, 24),
                    exp_stat_sn: be32(b, 28),
                })
            }
            opcode::TEXT_REQUEST => Bhs::TextRequest(TextRequest {
                immediate: imm,
                final_: bit(fl, F),
                cont: bit(fl, 0x40),
                lun,
                itt,
                ttt: be32(b, 20),
                cmd_sn: be32(b, 24),
                exp_stat_sn: be32(b, 28),
            }),
            opcode::DATA_OUT => Bhs::DataOut(DataOut {
                final_: bit(fl, F),
                lun,
                itt,
                ttt: be32(b, 20),
                exp_stat_sn: be32(b, 28),
                data_sn: be32(b, 36),
                buffer_offset: be32(b, 40),
            }),
            opcode::LOGOUT_REQUEST => Bhs::LogoutRequest(LogoutRequest {
                immediate: imm,
                reason: fl & 0x7f,
                itt,
                cid: be16(b, 20),
                cmd_sn: be32(b, 24),
                exp_stat_sn: be32(b, 28),
            }),
            opcode::NOP_IN => Bhs::NopIn(NopIn {
                lun,
                itt,
                ttt: be32(b, 20),
                stat_sn: be32(b, 24),
                exp_cmd_sn: be32(b, 28),
                max_cmd_sn: be32(b, 32),
            }),
            opcode::SCSI_RESPONSE => Bhs::ScsiResponse(ScsiResponse {
                bidi_overflow: bit(fl, 0x10),
                bidi_underflow: bit(fl, 0x08),
                overflow: bit(fl, 0x04),
                underflow: bit(fl, 0x02),
                response: b[2],
                status: b[3],
                itt,
                snack_tag: be32(b, 20),
                stat_sn: be32(b, 24),
                exp_cmd_sn: be32(b, 28),
                max_cmd_sn: be32(b, 32),
                exp_data_sn: be32(b, 36),
                bidi_residual: be32(b, 40),
                residual: be32(b, 44),
            }),
            opcode::TASK_MGMT_RESPONSE => Bhs::TaskMgmtResponse(TaskMgmtResponse {
                response: b[2],
                itt,
                stat_sn: be32(b, 24),
                exp_cmd_sn: be32(b, 28),
                max_cmd_sn: be32(b, 32),
            }),
            opcode::LOGIN_RESPONSE => {
                let mut isid = [0u8; 6];
                isid.copy_from_slice(&b[8..14]);
                Bhs::LoginResponse(LoginResponse {
                    transit: bit(fl, 0x80),
                    cont: bit(fl, 0x40),
                    csg: (fl >> 2) & 3,
                    nsg: fl & 3,
                    version_max: b[2],
                    version_active: b[3],
                    isid,
                    tsih: be16(b, 14),
                    itt,
                    stat_sn: be32(b, 24),
                    exp_cmd_sn: be32(b, 28),
                    max_cmd_sn: be32(b, 32),
                    status_class: b[36],
                    status_detail: b[37],
                })
            }
            opcode::TEXT_RESPONSE => Bhs::TextResponse(TextResponse {
                final_: bit(fl, F),
                cont: bit(fl, 0x40),
                lun,
                itt,
                ttt: be32(b, 20),
                stat_sn: be32(b, 24),
                exp_cmd_sn: be32(b, 28),
                max_cmd_sn: be32(b, 32),
            }),
            opcode::DATA_IN => Bhs::DataIn(DataIn {
                final_: bit(fl, F),
                ack: bit(fl, 0x40),
                overflow: bit(fl, 0x04),
                underflow: bit(fl, 0x02),
                status: bit(fl, 0x01).then_some(b[3]),
                lun,
                itt,
                ttt: be32(b, 20),
                stat_sn: be32(b, 24),
                exp_cmd_sn: be32(b, 28),
                max_cmd_sn: be32(b, 32),
                data_sn: be32(b, 36),
                buffer_offset: be32(b, 40),
                residual: be32(b, 44),
            }),
            opcode::LOGOUT_RESPONSE => Bhs::LogoutResponse(LogoutResponse {
                response: b[2],
                itt,
                stat_sn: be32(b, 24),
                exp_cmd_sn: be32(b, 28),
                max_cmd_sn: be32(b, 32),
                time2wait: be16(b, 40),
                time2retain: be16(b, 42),
            }),
            opcode::R2T => Bhs::R2t(R2t {
                lun,
                itt,
                ttt: be32(b, 20),
                stat_sn: be32(b, 24),
                exp_cmd_sn: be32(b, 28),
                max_cmd_sn: be32(b, 32),
                r2t_sn: be32(b, 36),
                buffer_offset: be32(b, 40),
                desired_len: be32(b, 44),
            }),
            opcode::ASYNC_MESSAGE => Bhs::AsyncMessage(AsyncMessage {
                lun,
                stat_sn: be32(b, 24),
                exp_cmd_sn: be32(b, 28),
                max_cmd_sn: be32(b, 32),
                event: b[36],
                vcode: b[37],
                param1: be16(b, 38),
                param2: be16(b, 40),
                param3: be16(b, 42),
            }),
            opcode::REJECT => Bhs::Reject(Reject {
                reason: b[2],
                stat_sn: be32(b, 24),
                exp_cmd_sn: be32(b, 28),
                max_cmd_sn: be32(b, 32),
                data_sn_or_r2t_sn: be32(b, 36),
            }),
            other => Bhs::Unknown { opcode: other, itt },
        }
    }

    /// Encodes the header with TotalAHSLength and DataSegmentLength zero (the
    /// [`Pdu`] encoder fills them in). `Unknown` encodes its opcode and tag only.
    pub fn encode(&self) -> [u8; BHS_LEN] {
        let mut b = [0u8; BHS_LEN];
        match *self {
            Bhs::NopOut(p) => {
                b[0] = opcode::NOP_OUT | flag(p.immediate, IMMEDIATE);
                b[1] = F;
                put64(&mut b, 8, p.lun);
                put32(&mut b, 16, p.itt);
                put32(&mut b, 20, p.ttt);
                put32(&mut b, 24, p.cmd_sn);
                put32(&mut b, 28, p.exp_stat_sn);
            }
            Bhs::ScsiCommand(p) => {
                b[0] = opcode::SCSI_COMMAND | flag(p.immediate, IMMEDIATE);
                b[1] =
                    flag(p.final_, F) | flag(p.read, 0x40) | flag(p.write, 0x20) | (p.attr & 0x07);
                put64(&mut b, 8, p.lun);
                put32(&mut b, 16, p.itt);
                put32(&mut b, 20, p.expected_data_len);
                put32(&mut b, 24, p.cmd_sn);
                put32(&mut b, 28, p.exp_stat_sn);
                b[32..48].copy_from_slice(&p.cdb);
            }
            Bhs::TaskMgmtRequest(p) => {
                b[0] = opcode::TASK_MGMT_REQUEST | flag(p.immediate, IMMEDIATE);
                b[1] = F | (p.function & 0x7f);
                put64(&mut b, 8, p.lun);
                put32(&mut b, 16, p.itt);
                put32(&mut b, 20, p.referenced_tag);
                put32(&mut b, 24, p.cmd_sn);
                put32(&mut b, 28, p.exp_stat_sn);
                put32(&mut b, 32, p.ref_cmd_sn);
                put32(&mut b, 36, p.exp_data_sn);
            }
            Bhs::LoginRequest(p) => {
                b[0] = opcode::LOGIN_REQUEST | IMMEDIATE;
                b[1] = stage_bits(p.transit, p.cont, p.csg, p.nsg);
                b[2] = p.version_max;
                b[3] = p.version_min;
                b[8..14].copy_from_slice(&p.isid);
                put16(&mut b, 14, p.tsih);
                put32(&mut b, 16, p.itt);
                put16(&mut b, 20, p.cid);
                put32(&mut b, 24, p.cmd_sn);
                put32(&mut b, 28, p.exp_stat_sn);
            }
            Bhs::TextRequest(p) => {
                b[0] = opcode::TEXT_REQUEST | flag(p.immediate, IMMEDIATE);
                b[1] = flag(p.final_, F) | flag(p.cont, 0x40);
                put64(&mut b, 8, p.lun);
                put32(&mut b, 16, p.itt);
                put32(&mut b, 20, p.ttt);
                put32(&mut b, 24, p.cmd_sn);
                put32(&mut b, 28, p.exp_stat_sn);
            }
            Bhs::DataOut(p) => {
                b[0] = opcode::DATA_OUT;
                b[1] = flag(p.final_, F);
                put64(&mut b, 8, p.lun);
                put32(&mut b, 16, p.itt);
                put32(&mut b, 20, p.ttt);
                put32(&mut b, 28, p.exp_stat_sn);
                put32(&mut b, 36, p.data_sn);
                put32(&mut b, 40, p.buffer_offset);
            }
            Bhs::LogoutRequest(p) => {
                b[0] = opcode::LOGOUT_REQUEST | flag(p.immediate, IMMEDIATE);
                b[1] = F | (p.reason & 0x7f);
                put32(&mut b, 16, p.itt);
                put16(&mut b, 20, p.cid);
                put32(&mut b, 24, p.cmd_sn);
                put32(&mut b, 28, p.exp_stat_sn);
            }
            Bhs::NopIn(p) => {
                b[0] = opcode::NOP_IN;
                b[1] = F;
                put64(&mut b, 8, p.lun);
                put32(&mut b, 16, p.itt);
                put32(&mut b, 20, p.ttt);
                put32(&mut b, 24, p.stat_sn);
                put32(&mut b, 28, p.exp_cmd_sn);
                put32(&mut b, 32, p.max_cmd_sn);
            }
            Bhs::ScsiResponse(p) => {
                b[0] = opcode::SCSI_RESPONSE;
                b[1] = F
                    | flag(p.bidi_overflow, 0x10)
                    | flag(p.bidi_underflow, 0x08)
                    | flag(p.overflow, 0x04)
                    | flag(p.underflow, 0x02);
                b[2] = p.response;
                b[3] = p.status;
                put32(&mut b, 16, p.itt);
                put32(&mut b, 20, p.snack_tag);
                put32(&mut b, 24, p.stat_sn);
                put32(&mut b, 28, p.exp_cmd_sn);
                put32(&mut b, 32, p.max_cmd_sn);
                put32(&mut b, 36, p.exp_data_sn);
                put32(&mut b, 40, p.bidi_residual);
                put32(&mut b, 44, p.residual);
            }
            Bhs::TaskMgmtResponse(p) => {
                b[0] = opcode::TASK_MGMT_RESPONSE;
                b[1] = F;
                b[2] = p.response;
                put32(&mut b, 16, p.itt);
                put32(&mut b, 24, p.stat_sn);
                put32(&mut b, 28, p.exp_cmd_sn);
                put32(&mut b, 32, p.max_cmd_sn);
            }
            Bhs::LoginResponse(p) => {
                b[0] = opcode::LOGIN_RESPONSE;
                b[1] = stage_bits(p.transit, p.cont, p.csg, p.nsg);
                b[2] = p.version_max;
                b[3] = p.version_active;
                b[8..14].copy_from_slice(&p.isid);
                put16(&mut b, 14, p.tsih);
                put32(&mut b, 16, p.itt);
                put32(&mut b, 24, p.stat_sn);
                put32(&mut b, 28, p.exp_cmd_sn);
                put32(&mut b, 32, p.max_cmd_sn);
                b[36] = p.status_class;
                b[37] = p.status_detail;
            }
            Bhs::TextResponse(p) => {
                b[0] = opcode::TEXT_RESPONSE;
                b[1] = flag(p.final_, F) | flag(p.cont, 0x40);
                put64(&mut b, 8, p.lun);
                put32(&mut b, 16, p.itt);
                put32(&mut b, 20, p.ttt);
                put32(&mut b, 24, p.stat_sn);
                put32(&mut b, 28, p.exp_cmd_sn);
                put32(&mut b, 32, p.max_cmd_sn);
            }
            Bhs::DataIn(p) => {
                b[0] = opcode::DATA_IN;
                b[1] = flag(p.final_, F)
                    | flag(p.ack, 0x40)
                    | flag(p.overflow, 0x04)
                    | flag(p.underflow, 0x02)
                    | flag(p.status.is_some(), 0x01);
                b[3] = p.status.unwrap_or(0);
                put64(&mut b, 8, p.lun);
                put32(&mut b, 16, p.itt);
                put32(&mut b, 20, p.ttt);
                put32(&mut b, 24, p.stat_sn);
                put32(&mut b, 28, p.exp_cmd_sn);
                put32(&mut b, 32, p.max_cmd_sn);
                put32(&mut b, 36, p.data_sn);
                put32(&mut b, 40, p.buffer_offset);
                put32(&mut b, 44, p.residual);
            }
            Bhs::LogoutResponse(p) => {
                b[0] = opcode::LOGOUT_RESPONSE;
                b[1] = F;
                b[2] = p.response;
                put32(&mut b, 16, p.itt);
                put32(&mut b, 24, p.stat_sn);
                put32(&mut b, 28, p.exp_cmd_sn);
                put32(&mut b, 32, p.max_cmd_sn);
                put16(&mut b, 40, p.time2wait);
                put16(&mut b, 42, p.time2retain);
            }
            Bhs::R2t(p) => {
                b[0] = opcode::R2T;
                b[1] = F;
                put64(&mut b, 8, p.lun);
                put32(&mut b, 16, p.itt);
                put32(&mut b, 20, p.ttt);
                put32(&mut b, 24, p.stat_sn);
                put32(&mut b, 28, p.exp_cmd_sn);
                put32(&mut b, 32, p.max_cmd_sn);
                put32(&mut b, 36, p.r2t_sn);
                put32(&mut b, 40, p.buffer_offset);
                put32(&mut b, 44, p.desired_len);
            }
            Bhs::AsyncMessage(p) => {
                b[0] = opcode::ASYNC_MESSAGE;
                b[1] = F;
                put64(&mut b, 8, p.lun);
                put32(&mut b, 16, RESERVED_TAG);
                put32(&mut b, 24, p.stat_sn);
                put32(&mut b, 28, p.exp_cmd_sn);
                put32(&mut b, 32, p.max_cmd_sn);
                b[36] = p.event;
                b[37] = p.vcode;
                put16(&mut b, 38, p.param1);
                put16(&mut b, 40, p.param2);
                put16(&mut b, 42, p.param3);
            }
            Bhs::Reject(p) => {
                b[0] = opcode::REJECT;
                b[1] = F;
                b[2] = p.reason;
                put32(&mut b, 16, RESERVED_TAG);
                put32(&mut b, 24, p.stat_sn);
                put32(&mut b, 28, p.exp_cmd_sn);
                put32(&mut b, 32, p.max_cmd_sn);
                put32(&mut b, 36, p.data_sn_or_r2t_sn);
            }
            Bhs::Unknown { opcode, itt } => {
                b[0] = opcode & 0x3f;
                put32(&mut b, 16, itt);
            }
        }
        b
    }

    /// The opcode (low 6 bits of byte 0).
    pub fn opcode(&self) -> u8 {
        self.encode()[0] & 0x3f
    }

    /// The Initiator Task Tag (`RESERVED_TAG` for Reject and Async message).
    pub fn itt(&self) -> u32 {
        be32(&self.encode(), 16)
    }
}

fn stage_bits(transit: bool, cont: bool, csg: u8, nsg: u8) -> u8 {
    flag(transit, 0x80) | flag(cont, 0x40) | ((csg & 3) << 2) | (nsg & 3)
}

/// Which digests are on (negotiated at login; both off until then).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Digests {
    pub header: bool,
    pub data: bool,
}

/// What the AHS of a SCSI Command said.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AhsInfo<'a> {
    /// CDB bytes past the first 16.
    pub extended_cdb: Option<&'a [u8]>,
    /// Expected bidirectional read data length.
    pub bidi_read_len: Option<u32>,
}

/// Parses an AHS area (each entry: AHSLength (2) | AHSType (1) | specific, padded to
/// 4). AHSLength counts the bytes after AHSType, including the reserved byte both known
/// types start with. Unknown types are skipped (RFC 7143 leaves room for more); a
/// repeated known type or an entry overrunning the area is an error.
pub fn parse_ahs(ahs: &[u8]) -> Result<AhsInfo<'_>, PduError> {
    let mut info = AhsInfo::default();
    let mut rest = ahs;
    while !rest.is_empty() {
        if rest.len() < 4 {
            return Err(PduError::BadAhs("entry shorter than 4 bytes"));
        }
        let len = usize::from(u16::from_be_bytes([rest[0], rest[1]]));
        let kind = rest[2];
        // Entry = 3 bytes of length and type + `len` bytes, padded to 4.
        let total = (3 + len).next_multiple_of(4);
        if total > rest.len() {
            return Err(PduError::BadAhs("AHSLength overruns TotalAHSLength"));
        }
        let specific = &rest[3..3 + len];
        match kind {
            ahs_type::EXTENDED_CDB => {
                if info.extended_cdb.is_some() {
                    return Err(PduError::BadAhs("two extended CDB entries"));
                }
                if specific.len() < 2 {
                    return Err(PduError::BadAhs("empty extended CDB"));
                }
                info.extended_cdb = Some(&specific[1..]);
            }
            ahs_type::BIDI_READ_LENGTH => {
                if info.bidi_read_len.is_some() {
                    return Err(PduError::BadAhs("two bidirectional read length entries"));
                }
                if specific.len() != 5 {
                    return Err(PduError::BadAhs("bidirectional read length is not 5 bytes"));
                }
                let v = [specific[1], specific[2], specific[3], specific[4]];
                info.bidi_read_len = Some(u32::from_be_bytes(v));
            }
            _ => {}
        }
        rest = &rest[total..];
    }
    Ok(info)
}

/// Builds the AHS area of a SCSI Command: an extended-CDB entry for a CDB longer than
/// 16 bytes, and a bidirectional read length entry.
pub fn build_ahs(cdb: &[u8], bidi_read_len: Option<u32>) -> Result<Vec<u8>, PduError> {
    let mut out = Vec::new();
    if cdb.len() > 16 {
        let extra = &cdb[16..];
        let len = u16::try_from(extra.len() + 1).map_err(|_| PduError::Encode {
            field: "CDB length",
            value: cdb.len(),
        })?;
        out.extend_from_slice(&len.to_be_bytes());
        out.push(ahs_type::EXTENDED_CDB);
        out.push(0);
        out.extend_from_slice(extra);
        out.resize(out.len().next_multiple_of(4), 0);
    }
    if let Some(v) = bidi_read_len {
        out.extend_from_slice(&[0, 5, ahs_type::BIDI_READ_LENGTH, 0]);
        out.extend_from_slice(&v.to_be_bytes());
    }
    if out.len() > AHS_MAX_BYTES {
        return Err(PduError::Encode {
            field: "AHS length",
            value: out.len(),
        });
    }
    Ok(out)
}

/// A whole PDU: header, AHS (a multiple of 4 bytes) and data segment (unpadded).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pdu {
    pub bhs: Bhs,
    pub ahs: Vec<u8>,
    pub data: Vec<u8>,
}

impl Pdu {
    /// A PDU without AHS.
    pub fn new(bhs: Bhs, data: Vec<u8>) -> Pdu {
        Pdu {
            bhs,
            ahs: Vec::new(),
            data,
        }
    }

    /// The full CDB of a SCSI Command: the BHS's 16 bytes followed by the extended CDB
    /// AHS, if any. `None` for other PDUs. The AHS was validated by the decoder, but a
    /// hand-built PDU may carry a bad one: that is an error here too.
    pub fn cdb(&self) -> Result<Option<Vec<u8>>, PduError> {
        let Bhs::ScsiCommand(cmd) = &self.bhs else {
            return Ok(None);
        };
        let mut cdb = cmd.cdb.to_vec();
        if let Some(extra) = parse_ahs(&self.ahs)?.extended_cdb {
            cdb.extend_from_slice(extra);
        }
        Ok(Some(cdb))
    }

    /// Appends the PDU's wire form to `out`.
    pub fn encode(&self, digests: Digests, out: &mut Vec<u8>) -> Result<(), PduError> {
        if self.ahs.len() > AHS_MAX_BYTES || self.ahs.len() % 4 != 0 {
            return Err(PduError::Encode {
                field: "AHS length",
                value: self.ahs.len(),
            });
        }
        let data_len = u32::try_from(self.data.len())
            .ok()
            .filter(|&n| n <= DATA_SEGMENT_MAX_BYTES)
            .ok_or(PduError::Encode {
                field: "data segment length",
                value: self.data.len(),
            })?;
        let mut bhs = self.bhs.encode();
        // Checked above: AHS length / 4 <= 255 and the data length fits 24 bits.
        bhs[4] = (self.ahs.len() / 4) as u8;
        bhs[5..8].copy_from_slice(&data_len.to_be_bytes()[1..]);
        let start = out.len();
        out.extend_from_slice(&bhs);
        out.extend_from_slice(&self.ahs);
        if digests.header {
            let crc = digest::crc32c(&out[start..]);
            out.extend_from_slice(&digest::to_wire(crc));
        }
        if !self.data.is_empty() {
            let data_start = out.len();
            out.extend_from_slice(&self.data);
            out.resize(data_start + padded(self.data.len()), 0);
            if digests.data {
                let crc = digest::crc32c(&out[data_start..]);
                out.extend_from_slice(&digest::to_wire(crc));
            }
        }
        Ok(())
    }

    /// The PDU's wire form.
    pub fn to_bytes(&self, digests: Digests) -> Result<Vec<u8>, PduError> {
        let mut out = Vec::with_capacity(BHS_LEN + self.ahs.len() + padded(self.data.len()) + 8);
        self.encode(digests, &mut out)?;
        Ok(out)
    }
}

/// Reject reasons (RFC 7143 §11.17.1).
pub mod reject_reason {
    pub const DATA_DIGEST_ERROR: u8 = 0x02;
    pub const SNACK_REJECT: u8 = 0x03;
    pub const PROTOCOL_ERROR: u8 = 0x04;
    pub const COMMAND_NOT_SUPPORTED: u8 = 0x05;
    pub const IMMEDIATE_COMMAND_REJECT: u8 = 0x06;
    pub const TASK_IN_PROGRESS: u8 = 0x07;
    pub const INVALID_DATA_ACK: u8 = 0x08;
    pub const INVALID_PDU_FIELD: u8 = 0x09;
    pub const LONG_OPERATION_REJECT: u8 = 0x0a;
    pub const DEPRECATED: u8 = 0x0b;
    pub const WAITING_FOR_LOGOUT: u8 = 0x0c;
}

/// A Reject of the PDU whose received header is `rejected` (see
/// [`PduDecoder::last_header`]); the session supplies its sequence numbers.
pub fn reject(
    reason: u8,
    rejected: &[u8; BHS_LEN],
    stat_sn: u32,
    exp_cmd_sn: u32,
    max_cmd_sn: u32,
) -> Pdu {
    Pdu::new(
        Bhs::Reject(Reject {
            reason,
            stat_sn,
            exp_cmd_sn,
            max_cmd_sn,
            data_sn_or_r2t_sn: 0,
        }),
        rejected.to_vec(),
    )
}

/// `len` rounded up to a multiple of 4 (data segments are padded so).
pub const fn padded(len: usize) -> usize {
    len.next_multiple_of(4)
}

/// What the decoder accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecoderLimits {
    /// Our declared MaxRecvDataSegmentLength (at most [`DATA_SEGMENT_MAX_BYTES`]).
    pub data_segment_max_bytes: u32,
    /// Cap on TotalAHSLength * 4 (at most [`AHS_MAX_BYTES`]).
    pub ahs_max_bytes: usize,
}

impl Default for DecoderLimits {
    /// The login phase's limits: 8192 bytes of data, and room for a 260-byte CDB plus
    /// a bidirectional length entry (the largest AHS a SCSI command needs).
    fn default() -> DecoderLimits {
        DecoderLimits {
            data_segment_max_bytes: LOGIN_DATA_SEGMENT_MAX_BYTES,
            ahs_max_bytes: 272,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stage {
    Header,
    Ahs,
    HeaderDigest,
    Data,
    DataDigest,
    Failed,
}

/// Incremental PDU decoder: feed it whatever the socket returned, in any chunks.
///
/// ```text
/// while !input.is_empty() {
///     let (consumed, pdu) = dec.feed(input)?;   // Err => close the connection
///     input = &input[consumed..];
///     if let Some(pdu) = pdu { handle(pdu) }
/// }
/// ```
#[derive(Debug)]
pub struct PduDecoder {
    limits: DecoderLimits,
    digests: Digests,
    stage: Stage,
    header: [u8; BHS_LEN],
    /// Bytes of the current stage received so far.
    have: usize,
    ahs: Vec<u8>,
    data: Vec<u8>,
    data_len: usize,
    digest_buf: [u8; DIGEST_LEN],
    /// Running data digest over data and padding.
    data_crc: u32,
}

impl PduDecoder {
    /// A decoder with no digests; limits are clamped to the fields' ranges.
    pub fn new(limits: DecoderLimits) -> PduDecoder {
        let limits = DecoderLimits {
            data_segment_max_bytes: limits.data_segment_max_bytes.min(DATA_SEGMENT_MAX_BYTES),
            ahs_max_bytes: limits.ahs_max_bytes.min(AHS_MAX_BYTES),
        };
        PduDecoder {
            limits,
            digests: Digests::default(),
            stage: Stage::Header,
            header: [0; BHS_LEN],
            have: 0,
            ahs: Vec::new(),
            data: Vec::new(),
            data_len: 0,
            digest_buf: [0; DIGEST_LEN],
            data_crc: 0,
        }
    }

    /// Switches digests and limits, for the PDU after the one being decoded: RFC 7143
    /// applies negotiated digests from the first PDU after the final Login Response.
    pub fn reconfigure(&mut self, digests: Digests, limits: DecoderLimits) {
        self.digests = digests;
        self.limits = PduDecoder::new(limits).limits;
    }

    /// The limits in force.
    pub fn limits(&self) -> DecoderLimits {
        self.limits
    }

    /// The received header of the PDU `feed` returned last, bytes as they came (a
    /// Reject carries them back, reserved bits included). Valid until the next `feed`.
    pub fn last_header(&self) -> &[u8; BHS_LEN] {
        &self.header
    }

    /// True between PDUs: no partial PDU is buffered.
    pub fn is_idle(&self) -> bool {
        self.stage == Stage::Header && self.have == 0
    }

    /// Consumes bytes of `input` until one PDU is complete or the input is used up.
    /// Returns how much was consumed and the PDU, if one completed.
    pub fn feed(&mut self, input: &[u8]) -> Result<(usize, Option<Pdu>), PduError> {
        let mut used = 0;
        loop {
            if self.stage == Stage::Failed {
                return Err(PduError::Poisoned);
            }
            let rest = &input[used..];
            // Stages of zero length (no AHS, no data) complete without input.
            if rest.is_empty() && !self.stage_is_empty() {
                return Ok((used, None));
            }
            let result = match self.stage {
                Stage::Failed => return Err(PduError::Poisoned),
                Stage::Header => self.fill_header(rest),
                Stage::Ahs => self.fill_ahs(rest),
                Stage::HeaderDigest => self.fill_header_digest(rest),
                Stage::Data => self.fill_data(rest),
                Stage::DataDigest => self.fill_data_digest(rest),
            };
            // Every call either consumes a byte or moves to the next stage, so this
            // loop ends.
            match result {
                Ok((n, pdu)) => {
                    used += n;
                    if pdu.is_some() {
                        return Ok((used, pdu));
                    }
                }
                Err(e) => {
                    self.stage = Stage::Failed;
                    return Err(e);
                }
            }
        }
    }

    /// True when the current stage needs no bytes, so it completes without input.
    fn stage_is_empty(&self) -> bool {
        match self.stage {
            Stage::Ahs => self.ahs.len() == self.ahs_len(),
            Stage::Data => self.data_len == 0,
            _ => false,
        }
    }

    fn ahs_len(&self) -> usize {
        usize::from(self.header[4]) * 4
    }

    fn fill_header(&mut self, rest: &[u8]) -> Result<(usize, Option<Pdu>), PduError> {
        let n = rest.len().min(BHS_LEN - self.have);
        self.header[self.have..self.have + n].copy_from_slice(&rest[..n]);
        self.have += n;
        if self.have < BHS_LEN {
            return Ok((n, None));
        }
        // Check both lengths before allocating anything for them.
        let ahs_len = self.ahs_len();
        if ahs_len > self.limits.ahs_max_bytes {
            return Err(PduError::AhsTooLong {
                len: ahs_len,
                max: self.limits.ahs_max_bytes,
            });
        }
        let data_len = u32::from_be_bytes([0, self.header[5], self.header[6], self.header[7]]);
        if data_len > self.limits.data_segment_max_bytes {
            return Err(PduError::DataSegmentTooLong {
                len: data_len,
                max: self.limits.data_segment_max_bytes,
            });
        }
        self.data_len = data_len as usize;
        self.ahs = Vec::with_capacity(ahs_len);
        self.have = 0;
        self.stage = Stage::Ahs;
        Ok((n, None))
    }

    fn fill_ahs(&mut self, rest: &[u8]) -> Result<(usize, Option<Pdu>), PduError> {
        let n = rest.len().min(self.ahs_len() - self.ahs.len());
        self.ahs.extend_from_slice(&rest[..n]);
        if self.ahs.len() == self.ahs_len() {
            parse_ahs(&self.ahs)?;
            self.stage = if self.digests.header {
                Stage::HeaderDigest
            } else {
                self.start_data()
            };
        }
        Ok((n, None))
    }

    fn fill_header_digest(&mut self, rest: &[u8]) -> Result<(usize, Option<Pdu>), PduError> {
        let n = rest.len().min(DIGEST_LEN - self.have);
        self.digest_buf[self.have..self.have + n].copy_from_slice(&rest[..n]);
        self.have += n;
        if self.have == DIGEST_LEN {
            let computed = digest::crc32c_append(digest::crc32c(&self.header), &self.ahs);
            let received = digest::from_wire(self.digest_buf);
            if computed != received {
                return Err(PduError::HeaderDigest { received, computed });
            }
            self.stage = self.start_data();
        }
        Ok((n, None))
    }

    fn start_data(&mut self) -> Stage {
        self.have = 0;
        self.data_crc = 0;
        // Bounded by the data limit checked in fill_header.
        self.data = Vec::with_capacity(self.data_len);
        Stage::Data
    }

    fn fill_data(&mut self, rest: &[u8]) -> Result<(usize, Option<Pdu>), PduError> {
        // `have` counts data and padding; only data is kept.
        let want = padded(self.data_len) - self.have;
        let n = rest.len().min(want);
        let chunk = &rest[..n];
        let keep = n.min(self.data_len.saturating_sub(self.have));
        self.data.extend_from_slice(&chunk[..keep]);
        self.data_crc = digest::crc32c_append(self.data_crc, chunk);
        self.have += n;
        if self.have < padded(self.data_len) {
            return Ok((n, None));
        }
        self.have = 0;
        if self.digests.data && self.data_len > 0 {
            self.stage = Stage::DataDigest;
            return Ok((n, None));
        }
        Ok((n, Some(self.finish())))
    }

    fn fill_data_digest(&mut self, rest: &[u8]) -> Result<(usize, Option<Pdu>), PduError> {
        let n = rest.len().min(DIGEST_LEN - self.have);
        self.digest_buf[self.have..self.have + n].copy_from_slice(&rest[..n]);
        self.have += n;
        if self.have < DIGEST_LEN {
            return Ok((n, None));
        }
        let received = digest::from_wire(self.digest_buf);
        if received != self.data_crc {
            return Err(PduError::DataDigest {
                received,
                computed: self.data_crc,
            });
        }
        self.have = 0;
        Ok((n, Some(self.finish())))
    }

    fn finish(&mut self) -> Pdu {
        self.stage = Stage::Header;
        self.have = 0;
        Pdu {
            bhs: Bhs::decode(&self.header),
            ahs: std::mem::take(&mut self.ahs),
            data: std::mem::take(&mut self.data),
        }
    }
}

#[cfg(test)]
mod tests;
