//! Target side of the iSCSI login phase (RFC 7143 §6, §11.12-13, §13): stages, the
//! CSG/NSG/T/C bits, ISID/TSIH, text-key negotiation, AuthMethod None and CHAP
//! (CHAP_A=5, MD5; one-way and mutual), and the negotiated [`SessionParams`].
//!
//! # Driving it
//! ```text
//! let mut login = Login::new(config, entropy, tsih, stat_sn);
//! for every PDU decoded while logging in:
//!     match login.handle(&pdu) {
//!         LoginStep::Continue(resp) => send(resp),
//!         LoginStep::Complete { response, params } => { send(response); full feature with params }
//!         LoginStep::Fail { response, error } => { send(response); close }
//!     }
//! ```
//! One request gives exactly one response. Digests switch on with the first PDU after
//! the final response (RFC 7143 §13.1); the caller reconfigures its decoder then.
//!
//! # Contracts
//! - `entropy` must be unpredictable (from the OS): CHAP's challenge and identifier come
//!   from it, and CHAP is only as strong as they are unguessable. This module has no
//!   random source of its own so that it stays deterministic under test.
//! - `tsih` is the caller's fresh, nonzero session handle. A login that names an
//!   existing session (TSIH != 0) is refused with 0x020a: one connection per session
//!   (MaxConnections=1) and no connection reinstatement at ErrorRecoveryLevel 0.
//!   Session reinstatement (same ISID and initiator name) is the caller's to apply on
//!   `Complete`: close the old session's connection.
//! - Memory is bounded: one text across C-bit PDUs at most `LoginConfig::text_max_bytes`,
//!   a fixed set of keys, and at most [`LOGIN_PDUS_MAX`] requests per login.
//!
//! # Choices the RFC leaves open
//! - Operational keys are accepted in the security stage too (open-iscsi and Windows
//!   send some there); security keys outside it are an initiator error (0x0200).
//! - A key negotiated twice in one login is an initiator error (0x0200, RFC 7143 §6.2).
//! - Target-declared keys sent by the initiator (TargetAddress, TargetPortalGroupTag,
//!   TargetAlias) and session keys of a discovery session are answered `Irrelevant`;
//!   unknown keys (including `X-` vendor keys) `NotUnderstood`; bad values `Reject`.
//! - The RFC 3720 marker keys (IFMarker/OFMarker) get `No`, their intervals
//!   `Irrelevant`: RFC 7143 dropped markers, but older initiators still offer them.

use md5::{Digest, Md5};

use super::pdu::{Bhs, LoginRequest, LoginResponse, Pdu};
use super::text::{self, Pair};

/// Most login requests one login may take (each gets a response; C-bit continuations
/// and CHAP need a few): a peer that never finishes is cut off.
pub const LOGIN_PDUS_MAX: u32 = 64;
/// CHAP challenge length (RFC 7143 §12.1.3 asks for at least 16 bytes of randomness
/// for MD5).
pub const CHAP_CHALLENGE_BYTES: usize = 16;
/// Entropy `Login::new` needs: the CHAP identifier and challenge.
pub const ENTROPY_BYTES: usize = 1 + CHAP_CHALLENGE_BYTES;
/// Longest CHAP_C or CHAP_R we take from an initiator (binary bytes).
const CHAP_BINARY_MAX_BYTES: usize = 1024;
/// Most distinct keys one login may negotiate (RFC 7143 defines about 30; unknown
/// keys count too, each answered NotUnderstood).
pub const NEGOTIATED_KEYS_MAX: usize = 64;
/// Longest iSCSI name (RFC 7143 §4.2.7.1).
pub const NAME_MAX_BYTES: usize = 223;

/// Login stages (CSG/NSG).
pub mod stage {
    pub const SECURITY: u8 = 0;
    pub const OPERATIONAL: u8 = 1;
    pub const FULL_FEATURE: u8 = 3;
}

/// Login response status (class << 8 | detail), RFC 7143 §11.13.5.
pub mod status {
    pub const SUCCESS: u16 = 0x0000;
    pub const INITIATOR_ERROR: u16 = 0x0200;
    pub const AUTHENTICATION_FAILURE: u16 = 0x0201;
    pub const AUTHORIZATION_FAILURE: u16 = 0x0202;
    pub const NOT_FOUND: u16 = 0x0203;
    pub const TARGET_REMOVED: u16 = 0x0204;
    pub const UNSUPPORTED_VERSION: u16 = 0x0205;
    pub const TOO_MANY_CONNECTIONS: u16 = 0x0206;
    pub const MISSING_PARAMETER: u16 = 0x0207;
    pub const CANT_INCLUDE_IN_SESSION: u16 = 0x0208;
    pub const SESSION_TYPE_NOT_SUPPORTED: u16 = 0x0209;
    pub const SESSION_DOES_NOT_EXIST: u16 = 0x020a;
    pub const INVALID_DURING_LOGIN: u16 = 0x020b;
    pub const TARGET_ERROR: u16 = 0x0300;
    pub const OUT_OF_RESOURCES: u16 = 0x0302;
}

/// CHAP credentials: the name and secret a peer must prove it knows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChapCredentials {
    pub user: String,
    pub secret: Vec<u8>,
}

/// CHAP for one target (or for discovery).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChapConfig {
    /// What the initiator must prove.
    pub initiator: ChapCredentials,
    /// With `Some`, the target proves itself too when the initiator asks (mutual CHAP);
    /// an initiator that asks when this is `None` is refused.
    pub target: Option<ChapCredentials>,
}

/// One target this portal serves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TargetEntry {
    /// The iSCSI name (`iqn.…`), lowercase.
    pub name: String,
    /// `host:port,tpgt` strings for SendTargets.
    pub addresses: Vec<String>,
    /// CHAP required for this target (`None`: AuthMethod=None).
    pub chap: Option<ChapConfig>,
}

/// What the target offers and requires.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoginConfig {
    pub targets: Vec<TargetEntry>,
    /// CHAP required for discovery sessions.
    pub discovery_chap: Option<ChapConfig>,
    pub portal_group_tag: u16,
    /// Our MaxRecvDataSegmentLength (what the initiator may send us per PDU).
    pub max_recv_data_segment_length_bytes: u32,
    /// Our MaxBurstLength / FirstBurstLength offers (the results are the minimum).
    pub max_burst_length_bytes: u32,
    pub first_burst_length_bytes: u32,
    /// Our InitialR2T (result: OR) and ImmediateData (result: AND).
    pub initial_r2t: bool,
    pub immediate_data: bool,
    pub max_outstanding_r2t: u16,
    /// Whether CRC32C digests are accepted when the initiator offers them.
    pub digests_allowed: bool,
    /// Whether CRC32C digests are required (None refused; an initiator that does not
    /// offer CRC32C gets `Reject` and no digest).
    pub digests_required: bool,
    /// CmdSN window granted from login on: MaxCmdSN = ExpCmdSN + window - 1.
    pub cmd_window: u32,
    /// Bound on one text across C-bit PDUs.
    pub text_max_bytes: usize,
}

impl Default for LoginConfig {
    fn default() -> LoginConfig {
        LoginConfig {
            targets: Vec::new(),
            discovery_chap: None,
            portal_group_tag: 1,
            max_recv_data_segment_length_bytes: 256 * 1024,
            max_burst_length_bytes: 1024 * 1024,
            first_burst_length_bytes: 64 * 1024,
            initial_r2t: false,
            immediate_data: true,
            max_outstanding_r2t: 1,
            digests_allowed: true,
            digests_required: false,
            cmd_window: 32,
            text_max_bytes: text::TEXT_MAX_BYTES,
        }
    }
}

/// SessionType.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SessionType {
    Discovery,
    Normal,
}

/// Everything login settled, for the full feature phase.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionParams {
    pub session_type: SessionType,
    pub initiator_name: String,
    pub initiator_alias: Option<String>,
    /// Index into `LoginConfig::targets` (`None` for discovery).
    pub target: Option<usize>,
    pub isid: [u8; 6],
    pub tsih: u16,
    pub cid: u16,
    /// The CHAP user the initiator proved, if any.
    pub authenticated_user: Option<String>,
    pub header_digest: bool,
    pub data_digest: bool,
    /// Ours: the most the initiator may send in one PDU.
    pub max_recv_data_segment_length_bytes: u32,
    /// The initiator's MaxRecvDataSegmentLength: the most we may send in one PDU.
    pub max_xmit_data_segment_length_bytes: u32,
    pub max_burst_length_bytes: u32,
    pub first_burst_length_bytes: u32,
    pub initial_r2t: bool,
    pub immediate_data: bool,
    pub max_outstanding_r2t: u16,
    pub default_time2wait_s: u16,
    pub default_time2retain_s: u16,
    pub error_recovery_level: u8,
    pub max_connections: u16,
    pub data_pdu_in_order: bool,
    pub data_sequence_in_order: bool,
    /// The CmdSN the first command will carry.
    pub exp_cmd_sn: u32,
    /// The StatSN of the next response on this connection.
    pub stat_sn: u32,
}

impl SessionParams {
    /// RFC 7143 §13 defaults, before anything is negotiated.
    fn defaults(cfg: &LoginConfig) -> SessionParams {
        SessionParams {
            session_type: SessionType::Normal,
            initiator_name: String::new(),
            initiator_alias: None,
            target: None,
            isid: [0; 6],
            tsih: 0,
            cid: 0,
            authenticated_user: None,
            header_digest: false,
            data_digest: false,
            max_recv_data_segment_length_bytes: cfg.max_recv_data_segment_length_bytes,
            max_xmit_data_segment_length_bytes: 8192,
            max_burst_length_bytes: 262_144,
            first_burst_length_bytes: 65_536,
            initial_r2t: true,
            immediate_data: true,
            max_outstanding_r2t: 1,
            default_time2wait_s: 2,
            default_time2retain_s: 20,
            error_recovery_level: 0,
            max_connections: 1,
            data_pdu_in_order: true,
            data_sequence_in_order: true,
            exp_cmd_sn: 0,
            stat_sn: 0,
        }
    }
}

/// Why a login failed (the response carries the status; this says why in words).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LoginError {
    #[error("not a login request during login (opcode {0:#04x})")]
    NotLogin(u8),
    #[error("protocol error: {0}")]
    Protocol(&'static str),
    #[error("bad text: {0}")]
    Text(#[from] text::TextError),
    #[error("key {0} negotiated twice")]
    Repeated(String),
    #[error("missing {0}")]
    Missing(&'static str),
    #[error("no such target {0:?}")]
    NoSuchTarget(String),
    #[error("authentication failed: {0}")]
    Authentication(&'static str),
    #[error("unsupported version range {min}..={max}")]
    Version { min: u8, max: u8 },
    #[error("adding a connection to session {0:#06x}: not supported")]
    ExistingSession(u16),
    #[error("login did not finish within {LOGIN_PDUS_MAX} requests")]
    TooManyRequests,
    #[error("the login already ended")]
    Finished,
}

/// What to do with one login request's answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LoginStep {
    /// Send the response; more requests follow.
    Continue(Pdu),
    /// Send the response; the connection is in full feature phase.
    Complete {
        response: Pdu,
        params: SessionParams,
    },
    /// Send the response (a login reject), then close the connection.
    Fail { response: Pdu, error: LoginError },
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Auth {
    /// No AuthMethod chosen yet.
    Start,
    /// AuthMethod=None chosen or nothing required.
    Open,
    /// AuthMethod=CHAP chosen; waiting for CHAP_A.
    WantAlgorithm,
    /// Challenge sent; waiting for CHAP_N/CHAP_R.
    WantResponse {
        id: u8,
        challenge: [u8; CHAP_CHALLENGE_BYTES],
    },
    /// The initiator proved itself.
    Done,
}

/// The target side of one connection's login.
#[derive(Debug)]
pub struct Login {
    cfg: LoginConfig,
    entropy: [u8; ENTROPY_BYTES],
    params: SessionParams,
    requests: u32,
    /// The stage we are in (the initiator's CSG must match).
    stage: u8,
    /// The leading request (with the session's identity) has been seen.
    leading_seen: bool,
    /// The leading text has been processed (InitiatorName, TargetName known).
    identified: bool,
    auth: Auth,
    negotiated: Vec<String>,
    acc: text::Accumulator,
    mrdsl_declared: bool,
    tpgt_sent: bool,
    first_itt: u32,
    finished: bool,
}

impl Login {
    /// A login for a new session with handle `tsih` (nonzero), whose first response
    /// carries `stat_sn`.
    pub fn new(cfg: LoginConfig, entropy: [u8; ENTROPY_BYTES], tsih: u16, stat_sn: u32) -> Login {
        let mut params = SessionParams::defaults(&cfg);
        params.tsih = tsih.max(1);
        params.stat_sn = stat_sn;
        let acc = text::Accumulator::new(cfg.text_max_bytes);
        Login {
            cfg,
            entropy,
            params,
            requests: 0,
            stage: stage::SECURITY,
            leading_seen: false,
            identified: false,
            auth: Auth::Start,
            negotiated: Vec::new(),
            acc,
            mrdsl_declared: false,
            tpgt_sent: false,
            first_itt: 0,
            finished: false,
        }
    }

    /// Answers one PDU received during login.
    pub fn handle(&mut self, pdu: &Pdu) -> LoginStep {
        let Bhs::LoginRequest(req) = pdu.bhs else {
            let error = LoginError::NotLogin(pdu.bhs.opcode());
            return self.fail_without_request(status::INVALID_DURING_LOGIN, error);
        };
        if self.finished {
            return self.fail(&req, status::INVALID_DURING_LOGIN, LoginError::Finished);
        }
        self.requests += 1;
        if self.requests > LOGIN_PDUS_MAX {
            return self.fail(&req, status::INITIATOR_ERROR, LoginError::TooManyRequests);
        }
        match self.step(&req, &pdu.data) {
            Ok(step) => step,
            Err((code, error)) => self.fail(&req, code, error),
        }
    }

    fn step(&mut self, req: &LoginRequest, data: &[u8]) -> Result<LoginStep, (u16, LoginError)> {
        self.check_header(req)?;
        let Some(whole) = self
            .acc
            .push(data, req.cont)
            .map_err(|e| (status::INITIATOR_ERROR, e.into()))?
        else {
            // C bit: acknowledge with an empty response and wait for the rest.
            return Ok(LoginStep::Continue(self.response(req, false, Vec::new())));
        };
        let pairs = text::parse(&whole).map_err(|e| (status::INITIATOR_ERROR, e.into()))?;
        let mut out = Vec::new();
        if !self.identified {
            self.identify(&pairs, &mut out)?;
        }
        // CHAP_N/CHAP_R (and a mutual challenge) are checked together, after the loop.
        let chap_answer_due = matches!(self.auth, Auth::WantResponse { .. });
        for pair in &pairs {
            self.negotiate(pair, &mut out)?;
        }
        if chap_answer_due {
            self.finish_chap(&pairs, &mut out)?;
        }
        self.finish_step(req, out)
    }

    /// Header rules: version, stage bits, identity fields constant across the login.
    fn check_header(&mut self, req: &LoginRequest) -> Result<(), (u16, LoginError)> {
        let proto = |what| (status::INITIATOR_ERROR, LoginError::Protocol(what));
        if req.version_min > 0 {
            return Err((
                status::UNSUPPORTED_VERSION,
                LoginError::Version {
                    min: req.version_min,
                    max: req.version_max,
                },
            ));
        }
        if req.transit && req.cont {
            return Err(proto("T and C both set"));
        }
        if req.csg == 2 || req.csg == stage::FULL_FEATURE {
            return Err(proto("CSG is not a login stage"));
        }
        if req.transit && (req.nsg == 2 || req.nsg <= req.csg) {
            return Err(proto("NSG does not move forward"));
        }
        if !self.leading_seen {
            if req.tsih != 0 {
                return Err((
                    status::SESSION_DOES_NOT_EXIST,
                    LoginError::ExistingSession(req.tsih),
                ));
            }
            self.leading_seen = true;
            self.params.isid = req.isid;
            self.params.cid = req.cid;
            self.params.exp_cmd_sn = req.cmd_sn;
            self.first_itt = req.itt;
            // Skipping the security stage is the initiator's choice; whether it may
            // is checked once the target (and so its CHAP requirement) is known.
            self.stage = req.csg;
            return Ok(());
        }
        if req.isid != self.params.isid || req.cid != self.params.cid || req.tsih != 0 {
            return Err(proto("ISID, TSIH or CID changed during login"));
        }
        if req.csg != self.stage {
            return Err(proto("CSG is not the current stage"));
        }
        Ok(())
    }

    /// The leading text: InitiatorName, SessionType, TargetName.
    fn identify(&mut self, pairs: &[Pair], out: &mut Vec<u8>) -> Result<(), (u16, LoginError)> {
        let get = |k: &str| pairs.iter().find(|p| p.key == k).map(|p| p.value.as_str());
        let missing = |what| (status::MISSING_PARAMETER, LoginError::Missing(what));
        let initiator = get("InitiatorName").ok_or_else(|| missing("InitiatorName"))?;
        if initiator.is_empty() || initiator.len() > NAME_MAX_BYTES {
            return Err(missing("InitiatorName"));
        }
        self.params.initiator_name = initiator.into();
        self.params.session_type = match get("SessionType") {
            None | Some("Normal") => SessionType::Normal,
            Some("Discovery") => SessionType::Discovery,
            Some(_) => {
                return Err((
                    status::SESSION_TYPE_NOT_SUPPORTED,
                    LoginError::Protocol("unknown SessionType"),
                ))
            }
        };
        if self.params.session_type == SessionType::Normal {
            let name = get("TargetName").ok_or_else(|| missing("TargetName"))?;
            // iSCSI names compare case-insensitively (they are normalized to lowercase).
            let found = self
                .cfg
                .targets
                .iter()
                .position(|t| t.name.eq_ignore_ascii_case(name));
            let index = found.ok_or_else(|| {
                (
                    status::NOT_FOUND,
                    LoginError::NoSuchTarget(name.chars().take(NAME_MAX_BYTES).collect()),
                )
            })?;
            self.params.target = Some(index);
            // RFC 7143 §13.9: the first response of a normal session names the portal
            // group.
            if !self.tpgt_sent {
                text::push(
                    out,
                    "TargetPortalGroupTag",
                    &self.cfg.portal_group_tag.to_string(),
                );
                self.tpgt_sent = true;
            }
        }
        if self.chap_config().is_some() && self.stage != stage::SECURITY {
            return Err((
                status::AUTHENTICATION_FAILURE,
                LoginError::Authentication("security stage skipped but CHAP is required"),
            ));
        }
        if self.chap_config().is_none() {
            // Nothing to prove; AuthMethod, if offered, must still include None.
            self.auth = Auth::Open;
        }
        self.identified = true;
        Ok(())
    }

    fn chap_config(&self) -> Option<&ChapConfig> {
        match self.params.target {
            Some(i) => self.cfg.targets.get(i).and_then(|t| t.chap.as_ref()),
            None => self.cfg.discovery_chap.as_ref(),
        }
    }

    /// Records that `key` was negotiated; twice is an initiator error.
    fn once(&mut self, key: &str) -> Result<(), (u16, LoginError)> {
        if self.negotiated.len() >= NEGOTIATED_KEYS_MAX {
            return Err((
                status::INITIATOR_ERROR,
                LoginError::Protocol("too many keys"),
            ));
        }
        if self.negotiated.iter().any(|k| k == key) {
            return Err((status::INITIATOR_ERROR, LoginError::Repeated(key.into())));
        }
        self.negotiated.push(key.into());
        Ok(())
    }

    fn negotiate(&mut self, pair: &Pair, out: &mut Vec<u8>) -> Result<(), (u16, LoginError)> {
        let key = pair.key.as_str();
        let value = pair.value.as_str();
        if key.starts_with("CHAP_") || key == "AuthMethod" {
            if self.stage != stage::SECURITY {
                return Err((
                    status::INITIATOR_ERROR,
                    LoginError::Protocol("security key outside the security stage"),
                ));
            }
            return self.security(key, value, out);
        }
        if !matches!(key, "InitiatorName" | "SessionType" | "TargetName") {
            self.once(key)?;
        }
        let discovery = self.params.session_type == SessionType::Discovery;
        let p = &mut self.params;
        let c = &self.cfg;
        let answer: Option<String> = match key {
            // Declarations, already handled by `identify` or needing no answer.
            "InitiatorName" | "SessionType" | "TargetName" => None,
            "InitiatorAlias" => {
                p.initiator_alias = Some(value.chars().take(255).collect());
                None
            }
            "HeaderDigest" | "DataDigest" => {
                // The first value in the initiator's order that we support and allow
                // (RFC 7143 §6.2.1); with digests required, None is not allowed.
                let chosen = value.split(',').find(|v| match *v {
                    "None" => !c.digests_required,
                    "CRC32C" => c.digests_allowed,
                    _ => false,
                });
                if let Some(v) = chosen {
                    let on = v == "CRC32C";
                    if key == "HeaderDigest" {
                        p.header_digest = on;
                    } else {
                        p.data_digest = on;
                    }
                }
                Some(chosen.unwrap_or("Reject").into())
            }
            "MaxRecvDataSegmentLength" => {
                match number(value, 512, (1 << 24) - 1) {
                    Some(v) => {
                        p.max_xmit_data_segment_length_bytes = v as u32;
                        None // declarative: nothing to answer
                    }
                    None => Some("Reject".into()),
                }
            }
            "MaxBurstLength" | "FirstBurstLength" if discovery => Some("Irrelevant".into()),
            "MaxBurstLength" => Some(min_answer(
                value,
                512,
                (1 << 24) - 1,
                c.max_burst_length_bytes,
                &mut p.max_burst_length_bytes,
            )),
            "FirstBurstLength" => Some(min_answer(
                value,
                512,
                (1 << 24) - 1,
                c.first_burst_length_bytes,
                &mut p.first_burst_length_bytes,
            )),
            "MaxConnections"
            | "MaxOutstandingR2T"
            | "InitialR2T"
            | "ImmediateData"
            | "DataPDUInOrder"
            | "DataSequenceInOrder"
                if discovery =>
            {
                Some("Irrelevant".into())
            }
            "MaxConnections" => {
                let mut v = 0u32;
                let a = min_answer(value, 1, 65535, 1, &mut v);
                p.max_connections = v.max(1) as u16;
                Some(a)
            }
            "MaxOutstandingR2T" => {
                let mut v = 0u32;
                let a = min_answer(value, 1, 65535, u32::from(c.max_outstanding_r2t), &mut v);
                p.max_outstanding_r2t = v.max(1) as u16;
                Some(a)
            }
            "DefaultTime2Wait" => Some(match number(value, 0, 3600) {
                // The result function is the maximum (RFC 7143 §13.15).
                Some(v) => {
                    p.default_time2wait_s = (v as u16).max(2);
                    p.default_time2wait_s.to_string()
                }
                None => "Reject".into(),
            }),
            "DefaultTime2Retain" => {
                let mut v = 0u32;
                let a = min_answer(value, 0, 3600, 20, &mut v);
                p.default_time2retain_s = v as u16;
                Some(a)
            }
            "ErrorRecoveryLevel" => {
                let mut v = 0u32;
                // We implement level 0 only: the minimum is always 0.
                let a = min_answer(value, 0, 2, 0, &mut v);
                p.error_recovery_level = v as u8;
                Some(a)
            }
            "InitialR2T" => Some(bool_answer(
                value,
                |i| i || c.initial_r2t,
                &mut p.initial_r2t,
            )),
            "ImmediateData" => Some(bool_answer(
                value,
                |i| i && c.immediate_data,
                &mut p.immediate_data,
            )),
            // We need data in order: OR with our Yes is always Yes.
            "DataPDUInOrder" => Some(bool_answer(value, |_| true, &mut p.data_pdu_in_order)),
            "DataSequenceInOrder" => {
                Some(bool_answer(value, |_| true, &mut p.data_sequence_in_order))
            }
            "IFMarker" | "OFMarker" => Some("No".into()),
            "IFMarkInt" | "OFMarkInt" => Some("Irrelevant".into()),
            "TargetAlias" | "TargetAddress" | "TargetPortalGroupTag" | "SendTargets" => {
                Some("Irrelevant".into())
            }
            _ => Some("NotUnderstood".into()),
        };
        if let Some(answer) = answer {
            text::push(out, key, &answer);
        }
        Ok(())
    }

    fn security(
        &mut self,
        key: &str,
        value: &str,
        out: &mut Vec<u8>,
    ) -> Result<(), (u16, LoginError)> {
        let auth_fail = |why| {
            (
                status::AUTHENTICATION_FAILURE,
                LoginError::Authentication(why),
            )
        };
        let chap_required = self.chap_config().is_some();
        match (key, &self.auth) {
            ("AuthMethod", Auth::Start | Auth::Open) => {
                self.once(key)?;
                let offered = |m| value.split(',').any(|v| v == m);
                if chap_required && offered("CHAP") {
                    self.auth = Auth::WantAlgorithm;
                    text::push(out, key, "CHAP");
                } else if !chap_required && offered("None") {
                    self.auth = Auth::Open;
                    text::push(out, key, "None");
                } else {
                    text::push(out, key, "Reject");
                    return Err(auth_fail("no acceptable AuthMethod"));
                }
                Ok(())
            }
            ("CHAP_A", Auth::WantAlgorithm) => {
                self.once(key)?;
                if !value.split(',').any(|v| v == "5") {
                    return Err(auth_fail("CHAP_A without MD5 (5)"));
                }
                let id = self.entropy[0];
                let mut challenge = [0u8; CHAP_CHALLENGE_BYTES];
                challenge.copy_from_slice(&self.entropy[1..]);
                text::push(out, "CHAP_A", "5");
                text::push(out, "CHAP_I", &id.to_string());
                text::push(out, "CHAP_C", &text::hex(&challenge));
                self.auth = Auth::WantResponse { id, challenge };
                Ok(())
            }
            // CHAP_N, CHAP_R and the mutual CHAP_I/CHAP_C arrive in one text; they are
            // checked together by `finish_chap` once the whole text is in.
            ("CHAP_N" | "CHAP_R" | "CHAP_I" | "CHAP_C", Auth::WantResponse { .. }) => {
                self.once(key)?;
                Ok(())
            }
            _ => Err(auth_fail("CHAP key out of sequence")),
        }
    }

    /// Checks CHAP_N/CHAP_R (and answers a mutual challenge) once the text that holds
    /// them is complete.
    fn finish_chap(&mut self, pairs: &[Pair], out: &mut Vec<u8>) -> Result<(), (u16, LoginError)> {
        let Auth::WantResponse { id, challenge } = self.auth else {
            return Ok(());
        };
        let auth_fail = |why| {
            (
                status::AUTHENTICATION_FAILURE,
                LoginError::Authentication(why),
            )
        };
        let get = |k: &str| pairs.iter().find(|p| p.key == k).map(|p| p.value.as_str());
        let (Some(name), Some(response)) = (get("CHAP_N"), get("CHAP_R")) else {
            return Err(auth_fail("CHAP_N or CHAP_R missing"));
        };
        let Some(chap) = self.chap_config().cloned() else {
            return Err(auth_fail("CHAP state without CHAP configured"));
        };
        let response = text::parse_binary(response, CHAP_BINARY_MAX_BYTES)
            .ok_or_else(|| auth_fail("CHAP_R is not a binary value"))?;
        let expected = chap_response(id, &chap.initiator.secret, &challenge);
        // Compare without an early exit so timing says nothing about the secret.
        let same = response.len() == expected.len()
            && response
                .iter()
                .zip(&expected)
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0;
        if name != chap.initiator.user || !same {
            return Err(auth_fail("wrong CHAP name or response"));
        }
        match (get("CHAP_I"), get("CHAP_C"), &chap.target) {
            (None, None, _) => {}
            (Some(i), Some(c), Some(target)) => {
                let id2 = text::parse_number(i)
                    .filter(|&v| v <= 255)
                    .ok_or_else(|| auth_fail("bad CHAP_I"))? as u8;
                let c2 = text::parse_binary(c, CHAP_BINARY_MAX_BYTES)
                    .ok_or_else(|| auth_fail("bad CHAP_C"))?;
                // RFC 7143 §12.1.3: a challenge equal to ours is a reflection attack.
                if c2 == challenge {
                    return Err(auth_fail("the initiator reflected our challenge"));
                }
                text::push(out, "CHAP_N", &target.user);
                let r2 = chap_response(id2, &target.secret, &c2);
                text::push(out, "CHAP_R", &text::hex(&r2));
            }
            (Some(_), Some(_), None) => return Err(auth_fail("mutual CHAP not configured")),
            _ => return Err(auth_fail("CHAP_I without CHAP_C or the reverse")),
        }
        self.params.authenticated_user = Some(chap.initiator.user.clone());
        self.auth = Auth::Done;
        Ok(())
    }

    fn finish_step(
        &mut self,
        req: &LoginRequest,
        mut out: Vec<u8>,
    ) -> Result<LoginStep, (u16, LoginError)> {
        // Leaving the security stage needs an authenticated (or open) initiator.
        let authenticated = matches!(self.auth, Auth::Open | Auth::Done);
        if self.stage == stage::SECURITY && req.transit && !authenticated {
            if self.auth == Auth::Start {
                return Err((
                    status::AUTHENTICATION_FAILURE,
                    LoginError::Authentication("leaving security without AuthMethod"),
                ));
            }
            // Mid-CHAP: answer without transit; the initiator goes on with CHAP.
            return Ok(LoginStep::Continue(self.response(req, false, out)));
        }
        if !req.transit {
            return Ok(LoginStep::Continue(self.response(req, false, out)));
        }
        if req.nsg == stage::FULL_FEATURE || req.nsg == stage::OPERATIONAL {
            // Declare our receive limit once before full feature (RFC 7143 §13.12).
            if !self.mrdsl_declared {
                let v = self.cfg.max_recv_data_segment_length_bytes;
                text::push(&mut out, "MaxRecvDataSegmentLength", &v.to_string());
                self.mrdsl_declared = true;
            }
        }
        if req.nsg != stage::FULL_FEATURE {
            let resp = self.response(req, true, out);
            self.stage = req.nsg;
            return Ok(LoginStep::Continue(resp));
        }
        // FirstBurstLength may not exceed MaxBurstLength (RFC 7143 §13.14).
        let p = &mut self.params;
        p.first_burst_length_bytes = p.first_burst_length_bytes.min(p.max_burst_length_bytes);
        let response = self.response(req, true, out);
        self.finished = true;
        Ok(LoginStep::Complete {
            response,
            params: self.params.clone(),
        })
    }

    /// A success response; advances StatSN.
    fn response(&mut self, req: &LoginRequest, transit: bool, data: Vec<u8>) -> Pdu {
        let final_ = transit && req.nsg == stage::FULL_FEATURE;
        let bhs = LoginResponse {
            transit,
            cont: false,
            csg: req.csg,
            nsg: if transit { req.nsg } else { 0 },
            version_max: 0,
            version_active: 0,
            isid: req.isid,
            // The TSIH is given in the final response only (RFC 7143 §11.13.3).
            tsih: if final_ { self.params.tsih } else { 0 },
            itt: req.itt,
            stat_sn: self.params.stat_sn,
            exp_cmd_sn: req.cmd_sn,
            max_cmd_sn: req.cmd_sn.wrapping_add(self.cfg.cmd_window.max(1) - 1),
            status_class: 0,
            status_detail: 0,
        };
        self.params.stat_sn = self.params.stat_sn.wrapping_add(1);
        self.params.exp_cmd_sn = req.cmd_sn;
        Pdu::new(Bhs::LoginResponse(bhs), data)
    }

    fn fail(&mut self, req: &LoginRequest, code: u16, error: LoginError) -> LoginStep {
        self.finished = true;
        let bhs = LoginResponse {
            transit: false,
            cont: false,
            csg: req.csg,
            nsg: 0,
            version_max: 0,
            version_active: 0,
            isid: req.isid,
            tsih: 0,
            itt: req.itt,
            stat_sn: self.params.stat_sn,
            exp_cmd_sn: req.cmd_sn,
            max_cmd_sn: req.cmd_sn,
            status_class: (code >> 8) as u8,
            status_detail: code as u8,
        };
        self.params.stat_sn = self.params.stat_sn.wrapping_add(1);
        LoginStep::Fail {
            response: Pdu::new(Bhs::LoginResponse(bhs), Vec::new()),
            error,
        }
    }

    fn fail_without_request(&mut self, code: u16, error: LoginError) -> LoginStep {
        let req = LoginRequest {
            transit: false,
            cont: false,
            csg: self.stage,
            nsg: 0,
            version_max: 0,
            version_min: 0,
            isid: self.params.isid,
            tsih: 0,
            itt: self.first_itt,
            cid: self.params.cid,
            cmd_sn: self.params.exp_cmd_sn,
            exp_stat_sn: 0,
        };
        self.fail(&req, code, error)
    }
}

/// CHAP response with MD5 (RFC 1994): MD5(identifier || secret || challenge).
pub fn chap_response(id: u8, secret: &[u8], challenge: &[u8]) -> [u8; 16] {
    let mut h = Md5::new();
    h.update([id]);
    h.update(secret);
    h.update(challenge);
    h.finalize().into()
}

/// A number in `lo..=hi`.
fn number(value: &str, lo: u64, hi: u64) -> Option<u64> {
    text::parse_number(value).filter(|v| (lo..=hi).contains(v))
}

/// Minimum negotiation: the answer is min(offer, ours); out of range is `Reject` and
/// leaves the default.
fn min_answer(value: &str, lo: u64, hi: u64, ours: u32, result: &mut u32) -> String {
    match number(value, lo, hi) {
        Some(v) => {
            *result = (v as u32).min(ours);
            result.to_string()
        }
        None => "Reject".into(),
    }
}

/// Boolean negotiation with the result function `f` of the initiator's value.
fn bool_answer(value: &str, f: impl Fn(bool) -> bool, result: &mut bool) -> String {
    match text::parse_bool(value) {
        Some(v) => {
            *result = f(v);
            text::yes_no(*result).into()
        }
        None => "Reject".into(),
    }
}

#[cfg(test)]
mod tests;

/// Session parameters for tests of the full feature phase.
#[cfg(test)]
pub(crate) mod tests_support {
    use super::*;

    pub(crate) fn params_for(session_type: SessionType, target: Option<usize>) -> SessionParams {
        let mut p = SessionParams::defaults(&LoginConfig::default());
        p.session_type = session_type;
        p.target = target;
        p.initiator_name = "iqn.1994-05.com.example:host".into();
        p
    }
}
