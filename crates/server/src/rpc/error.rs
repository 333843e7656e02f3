//! The one error type of the control plane: a JSON-RPC 2.0 error object.
//!
//! Codes follow SPDK: the JSON-RPC 2.0 reserved codes for protocol faults, `-32000` for
//! transport-level refusals of this server (too many connections), and the **negative
//! errno** for application errors (`-17` EEXIST, `-19` ENODEV, `-22` EINVAL, `-16` EBUSY),
//! so that a client can map an error back to the errno the operation failed with.

use serde_json::{json, Map, Value};

/// A JSON-RPC 2.0 error object: what a method failed with, and what the client is sent.
///
/// Also returned by [`RpcServer::start`](super::RpcServer::start) when the socket cannot be
/// set up; then `code` is the negative errno of the failed system call.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{message} (code {code})")]
pub struct RpcError {
    /// JSON-RPC error code (see the module docs for the ranges).
    pub code: i32,
    /// Human-readable, one line.
    pub message: String,
    /// Optional structured detail, sent as the error object's `data` member.
    pub data: Option<Value>,
}

impl RpcError {
    /// Invalid JSON was received.
    pub const PARSE_ERROR: i32 = -32700;
    /// The JSON sent is not a valid request object.
    pub const INVALID_REQUEST: i32 = -32600;
    /// The method does not exist.
    pub const METHOD_NOT_FOUND: i32 = -32601;
    /// Invalid method parameters.
    pub const INVALID_PARAMS: i32 = -32602;
    /// Internal JSON-RPC error (also: a handler panicked).
    pub const INTERNAL_ERROR: i32 = -32603;
    /// Server-defined transport error: the server refused the connection (too many).
    pub const SERVER_BUSY: i32 = -32000;

    /// An error with an arbitrary code.
    pub fn new(code: i32, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            data: None,
        }
    }

    /// Attaches structured detail (the error object's `data` member).
    #[must_use]
    pub fn with_data(mut self, data: Value) -> Self {
        self.data = Some(data);
        self
    }

    /// -32700: the bytes received are not JSON.
    pub fn parse_error(message: impl Into<String>) -> Self {
        Self::new(Self::PARSE_ERROR, message)
    }

    /// -32600: valid JSON, but not a JSON-RPC 2.0 request object.
    pub fn invalid_request(message: impl Into<String>) -> Self {
        Self::new(Self::INVALID_REQUEST, message)
    }

    /// -32601: no such method.
    pub fn method_not_found(method: &str) -> Self {
        Self::new(
            Self::METHOD_NOT_FOUND,
            format!("method not found: {method}"),
        )
    }

    /// -32602: the params do not fit the method.
    pub fn invalid_params(message: impl Into<String>) -> Self {
        Self::new(Self::INVALID_PARAMS, message)
    }

    /// -32603: the server failed for a reason that is not the client's.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(Self::INTERNAL_ERROR, message)
    }

    /// An application error carrying `-errno`, SPDK's convention. `errno` is positive
    /// (`libc::EEXIST`); the code sent is its negation.
    pub fn errno(errno: i32, message: impl Into<String>) -> Self {
        debug_assert!(errno > 0, "pass a positive errno, e.g. libc::EINVAL");
        Self::new(errno.saturating_abs().saturating_neg(), message)
    }

    /// -17 (EEXIST): e.g. a volume of that name exists.
    pub fn exists(message: impl Into<String>) -> Self {
        Self::errno(libc::EEXIST, message)
    }

    /// -19 (ENODEV): e.g. no volume of that name.
    pub fn no_device(message: impl Into<String>) -> Self {
        Self::errno(libc::ENODEV, message)
    }

    /// -22 (EINVAL): a value is out of range or inconsistent.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::errno(libc::EINVAL, message)
    }

    /// -16 (EBUSY): e.g. the volume has connections.
    pub fn busy(message: impl Into<String>) -> Self {
        Self::errno(libc::EBUSY, message)
    }

    /// -12 (ENOMEM): a bound was reached; the client may retry later.
    pub fn no_memory(message: impl Into<String>) -> Self {
        Self::errno(libc::ENOMEM, message)
    }

    /// Maps an I/O error to `-errno` (or -32603 when it has none), prefixing `context`.
    pub fn from_io(context: impl std::fmt::Display, err: &std::io::Error) -> Self {
        let message = format!("{context}: {err}");
        match err.raw_os_error() {
            Some(errno) if errno > 0 => Self::errno(errno, message),
            _ => Self::internal(message),
        }
    }

    /// The JSON-RPC error object: `{"code": .., "message": .., "data"?: ..}`.
    pub fn to_json(&self) -> Value {
        let mut object = Map::new();
        object.insert("code".into(), json!(self.code));
        object.insert("message".into(), json!(self.message));
        if let Some(data) = &self.data {
            object.insert("data".into(), data.clone());
        }
        Value::Object(object)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_errors_are_negative() {
        assert_eq!(RpcError::exists("x").code, -17);
        assert_eq!(RpcError::no_device("x").code, -19);
        assert_eq!(RpcError::invalid("x").code, -22);
        assert_eq!(RpcError::busy("x").code, -16);
        assert_eq!(RpcError::no_memory("x").code, -12);
    }

    #[test]
    fn json_object_omits_absent_data() {
        assert_eq!(
            RpcError::invalid_params("bad").to_json(),
            json!({"code": -32602, "message": "bad"})
        );
        assert_eq!(
            RpcError::internal("x").with_data(json!(1)).to_json(),
            json!({"code": -32603, "message": "x", "data": 1})
        );
    }

    #[test]
    fn io_errors_keep_their_errno() {
        let err = std::io::Error::from_raw_os_error(libc::EADDRINUSE);
        let rpc = RpcError::from_io("bind /x", &err);
        assert_eq!(rpc.code, -libc::EADDRINUSE);
        assert!(rpc.message.starts_with("bind /x: "));
    }
}
