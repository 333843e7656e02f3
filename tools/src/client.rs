//! A one-request-per-connection JSON-RPC 2.0 client for the ringblk control socket.

use std::io::{self, BufReader, ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};

/// A reply larger than this is refused: no ringblk result comes near it, and a bound
/// keeps a confused peer from filling memory.
const MAX_REPLY_BYTES: u64 = 256 << 20;

/// The one request id we send; the reply must carry it back.
const REQUEST_ID: u64 = 1;

/// Everything that can go wrong after the command line parsed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CtlError {
    #[error(
        "no ringblk control socket at {}: start the server with `ringblk serve`, \
         or point --rpc (or RINGBLK_RPC) at its socket",
        path.display()
    )]
    NoSocket { path: PathBuf },

    #[error(
        "nothing is listening on {} (connection refused; stale socket?): \
         start the server with `ringblk serve`",
        path.display()
    )]
    Refused { path: PathBuf },

    #[error("cannot connect to {}: {source}", path.display())]
    Connect { path: PathBuf, source: io::Error },

    #[error(
        "no reply from {} within {secs} s (raise --timeout to wait longer)",
        path.display(),
        secs = timeout.as_secs_f64()
    )]
    Timeout { path: PathBuf, timeout: Duration },

    #[error("talking to {}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },

    #[error("bad reply from the server: {0}")]
    Protocol(String),

    /// A report file (`stats --hgrm/--svg`) could not be written.
    #[error("cannot write {}: {message}", path.display())]
    Output { path: PathBuf, message: String },

    /// The server answered with a JSON-RPC error object.
    #[error("{message} (code {code})")]
    Rpc {
        code: i64,
        message: String,
        data: Option<Value>,
    },
}

/// Where the server is and how long to wait for it.
#[derive(Debug, Clone)]
pub struct Client {
    path: PathBuf,
    timeout: Duration,
}

impl Client {
    pub fn new(path: &Path, timeout: Duration) -> Self {
        Self {
            path: path.to_owned(),
            timeout,
        }
    }

    /// Sends `method` with `params` (omitted when `None`) and returns the result.
    pub fn call(&self, method: &str, params: Option<Value>) -> Result<Value, CtlError> {
        let stream = self.connect()?;
        let mut request = json!({"jsonrpc": "2.0", "id": REQUEST_ID, "method": method});
        if let Some(params) = params {
            request["params"] = params;
        }
        let mut bytes = request.to_string().into_bytes();
        bytes.push(b'\n');
        (&stream).write_all(&bytes).map_err(|e| self.io_error(e))?;
        let reply = self.read_reply(&stream)?;
        decode_reply(reply)
    }

    fn connect(&self) -> Result<UnixStream, CtlError> {
        let path = self.path.clone();
        let stream = UnixStream::connect(&self.path).map_err(|source| match source.kind() {
            ErrorKind::NotFound => CtlError::NoSocket { path },
            ErrorKind::ConnectionRefused => CtlError::Refused { path },
            _ => CtlError::Connect { path, source },
        })?;
        stream
            .set_read_timeout(Some(self.timeout))
            .and_then(|()| stream.set_write_timeout(Some(self.timeout)))
            .map_err(|e| self.io_error(e))?;
        Ok(stream)
    }

    fn read_reply(&self, stream: &UnixStream) -> Result<Value, CtlError> {
        let reader = BufReader::new(stream).take(MAX_REPLY_BYTES);
        let mut values = serde_json::Deserializer::from_reader(reader).into_iter::<Value>();
        match values.next() {
            Some(Ok(value)) => Ok(value),
            None => Err(CtlError::Protocol(
                "the server closed the connection without replying".into(),
            )),
            Some(Err(err)) if err.is_io() => Err(self.io_error(io::Error::from(err))),
            Some(Err(err)) if err.is_eof() => Err(CtlError::Protocol(
                "the server closed the connection in the middle of its reply".into(),
            )),
            Some(Err(err)) => Err(CtlError::Protocol(format!("malformed reply: {err}"))),
        }
    }

    fn io_error(&self, source: io::Error) -> CtlError {
        let path = self.path.clone();
        match source.kind() {
            ErrorKind::WouldBlock | ErrorKind::TimedOut => CtlError::Timeout {
                path,
                timeout: self.timeout,
            },
            _ => CtlError::Io { path, source },
        }
    }
}

/// Checks the response envelope and returns the result or the server's error.
fn decode_reply(reply: Value) -> Result<Value, CtlError> {
    let Value::Object(mut reply) = reply else {
        return Err(CtlError::Protocol(format!(
            "expected an object, got {reply}"
        )));
    };
    if reply.get("jsonrpc") != Some(&json!("2.0")) {
        return Err(CtlError::Protocol("missing \"jsonrpc\": \"2.0\"".into()));
    }
    if let Some(error) = reply.remove("error") {
        let code = error.get("code").and_then(Value::as_i64);
        let message = error.get("message").and_then(Value::as_str);
        return match (code, message) {
            (Some(code), Some(message)) => Err(CtlError::Rpc {
                code,
                message: message.to_owned(),
                data: error.get("data").cloned(),
            }),
            _ => Err(CtlError::Protocol(format!(
                "malformed error object: {error}"
            ))),
        };
    }
    // Checked after "error": a server that could not parse our request answers with
    // id null, and its error is more useful than "wrong id".
    if reply.get("id") != Some(&json!(REQUEST_ID)) {
        return Err(CtlError::Protocol(format!(
            "reply id {} does not match request id {REQUEST_ID}",
            reply.get("id").unwrap_or(&Value::Null)
        )));
    }
    reply
        .remove("result")
        .ok_or_else(|| CtlError::Protocol("reply has neither result nor error".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn result_is_returned() {
        let r = decode_reply(json!({"jsonrpc": "2.0", "id": 1, "result": [1]}));
        assert_eq!(r.ok(), Some(json!([1])));
    }

    #[test]
    fn error_object_becomes_rpc_error() {
        let r = decode_reply(json!({"jsonrpc": "2.0", "id": null,
            "error": {"code": -17, "message": "exists", "data": {"x": 1}}}));
        match r {
            Err(CtlError::Rpc {
                code: -17,
                message,
                data: Some(_),
            }) => assert_eq!(message, "exists"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn malformed_envelopes_are_protocol_errors() {
        for reply in [
            json!([]),
            json!({"id": 1, "result": 1}),
            json!({"jsonrpc": "2.0", "id": 2, "result": 1}),
            json!({"jsonrpc": "2.0", "id": 1}),
            json!({"jsonrpc": "2.0", "id": 1, "error": {"code": "x"}}),
        ] {
            assert!(
                matches!(decode_reply(reply.clone()), Err(CtlError::Protocol(_))),
                "{reply}"
            );
        }
    }
}
