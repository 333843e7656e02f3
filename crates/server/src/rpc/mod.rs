//! JSON-RPC 2.0 control socket (SPDK's convention).
//!
//! The control plane: `ringblk-ctl` and scripts create volumes, list exports and read
//! statistics through it. It is never on the data path.
//!
//! # Protocol
//!
//! A client sends one JSON-RPC 2.0 request object and the server answers with one
//! response object followed by `\n`. Requests may be newline-delimited or back-to-back
//! (`{..}{..}`), several per connection, answered in order. Requests without an `id`
//! are notifications: they run and get no reply. The server answers `rpc_get_methods`
//! itself from [`RpcHandler::methods`]; every other method goes to the handler. Batch
//! requests (JSON arrays) are **not supported** and get a single -32600 error.
//!
//! # Threads
//!
//! One `rpc-accept` thread blocks in `epoll_wait` on the listening socket and a wake
//! socket; [`RpcServer::shutdown`] closes the wake socket to stop it. Each connection
//! gets its own `rpc-conn-N` thread that reads, calls the handler synchronously and
//! writes the reply, so a slow or hostile client delays only itself. Handlers are
//! therefore called concurrently from several threads (`RpcHandler: Send + Sync`);
//! requests on one connection are handled one at a time, in order. Shutdown stops
//! accepting, shuts down every connection's socket (waking blocked reads and writes),
//! waits for handler calls in progress, joins every thread and removes the socket file.
//!
//! # Bounds
//!
//! From [`RpcConfig`] (defaults in parentheses): request size (1 MiB), connections at
//! once (64), idle time with no byte received (30 s), time for a started request to
//! arrive complete (30 s), time for a reply to be read (30 s). JSON nesting is bounded
//! by serde_json's recursion limit (128), which also bounds the parser's stack.
//!
//! # Errors
//!
//! No request can panic or stop the server; other connections are unaffected.
//!
//! | What the client did                          | Reply (`id` null unless known)    | Then   |
//! |----------------------------------------------|-----------------------------------|--------|
//! | bytes that are not JSON, or EOF mid-request  | -32700 parse error                | close  |
//! | JSON that is not a request (see [`protocol::decode`]) | -32600 invalid request   | go on  |
//! | a batch array                                | -32600 invalid request            | go on  |
//! | a method the handler does not list           | -32601 method not found           | go on  |
//! | params the method rejects ([`parse_params`]) | -32602 invalid params             | go on  |
//! | a handler that panicked                      | -32603 internal error             | go on  |
//! | a request over the size bound                | -32600 invalid request            | close  |
//! | a started request stalled or too slow        | -32600 invalid request            | close  |
//! | an idle connection past the idle timeout     | none                              | close  |
//! | a connection over the connection bound       | -32000 server busy                | close  |
//!
//! A connection is closed after a framing error because the byte stream cannot be
//! resynchronised. Application errors are the negative errno (SPDK's convention), e.g.
//! -17 EEXIST, -19 ENODEV, -22 EINVAL, -16 EBUSY; see [`RpcError`].
//!
//! # Panics
//!
//! A handler panic is caught with `catch_unwind` and answered with -32603 (with the
//! panic message in `data.panic`); the process keeps running. This relies on the
//! workspace building with `panic = "unwind"`.

mod error;
pub mod protocol;
mod server;

use serde::de::DeserializeOwned;
use serde_json::Value;

pub use error::RpcError;
pub use server::{RpcConfig, RpcServer};

/// What the server calls to answer requests. Implemented by the target's management
/// layer; called from several connection threads at once.
pub trait RpcHandler: Send + Sync {
    /// Runs `method`. `params` is the request's params (`Value::Null` when absent).
    /// Returns the result value or an error; a panic is caught and answered with -32603.
    fn call(&self, method: &str, params: Value) -> Result<Value, RpcError>;

    /// Every method name this server answers (for `rpc_get_methods` and the README test).
    /// A method not listed here is answered with -32601 without calling [`Self::call`].
    fn methods(&self) -> Vec<&'static str>;
}

/// Deserializes a method's params into `T`, mapping any failure to -32602 with serde's
/// message (e.g. ``missing field `name` ``).
///
/// Absent params (`Value::Null`) are read as an empty object when `T` does not accept
/// `null` itself, so a struct whose fields are all optional works with or without
/// params. Use `#[serde(deny_unknown_fields)]` on `T` to reject misspelt fields.
pub fn parse_params<T: DeserializeOwned>(params: Value) -> Result<T, RpcError> {
    let invalid = |e: serde_json::Error| RpcError::invalid_params(format!("invalid params: {e}"));
    if params.is_null() {
        if let Ok(value) = serde_json::from_value::<T>(Value::Null) {
            return Ok(value);
        }
        return serde_json::from_value(Value::Object(serde_json::Map::new())).map_err(invalid);
    }
    serde_json::from_value(params).map_err(invalid)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;
    use serde_json::json;

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Create {
        name: String,
        size_bytes: Option<u64>,
    }

    #[derive(Debug, Deserialize, PartialEq)]
    struct Optional {
        volume: Option<String>,
    }

    #[test]
    fn parse_params_reads_objects_and_arrays() {
        let p: Create = parse_params(json!({"name": "a", "size_bytes": 4096}))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            p,
            Create {
                name: "a".into(),
                size_bytes: Some(4096)
            }
        );
        let p: Create = parse_params(json!(["b", null])).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(p.name, "b");
    }

    #[test]
    fn parse_params_errors_are_32602_with_serde_message() {
        let err = parse_params::<Create>(json!({"size_bytes": 1})).err();
        let err = err.unwrap_or_else(|| panic!("missing name accepted"));
        assert_eq!(err.code, -32602);
        assert!(
            err.message.contains("missing field `name`"),
            "{}",
            err.message
        );
        let err = parse_params::<Create>(json!({"name": "a", "sise_bytes": 1})).err();
        assert!(err.is_some_and(|e| e.message.contains("unknown field")));
        let err = parse_params::<Create>(json!({"name": "a", "size_bytes": -1})).err();
        assert!(err.is_some_and(|e| e.code == -32602));
    }

    #[test]
    fn parse_params_treats_absent_params_as_empty_object() {
        let p: Optional = parse_params(Value::Null).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(p, Optional { volume: None });
        let p: () = parse_params(Value::Null).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(p, ());
        let err = parse_params::<Create>(Value::Null).err();
        assert!(err.is_some_and(|e| e.message.contains("missing field `name`")));
    }
}
