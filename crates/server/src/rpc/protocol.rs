//! Sans-IO JSON-RPC 2.0: one decoded JSON value in, at most one reply value out.
//!
//! Nothing here touches a socket, so every rule about what is and is not a request is
//! tested without one; `server.rs` only moves bytes.

use std::panic::{catch_unwind, AssertUnwindSafe};

use serde_json::{json, Value};

use super::{RpcError, RpcHandler};

/// The method the server answers itself, from [`RpcHandler::methods`].
pub const GET_METHODS: &str = "rpc_get_methods";

/// A request object that passed validation.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// `None` for a notification (no `id` member): it runs but gets no reply.
    pub id: Option<Value>,
    pub method: String,
    /// `Value::Null` when the request has no `params` member.
    pub params: Value,
}

/// Validates one JSON value as a request. On failure returns the id to answer with
/// (the request's own id when it had a valid one, else `null`) and a -32600 error.
///
/// Batches (arrays) are rejected: no client of ours sends them, and answering a batch
/// needs a bound of its own. An invalid request is answered even when it has no `id`,
/// as the specification's examples do: only a *valid* notification goes unanswered.
pub fn decode(value: Value) -> Result<Request, (Value, RpcError)> {
    let mut object = match value {
        Value::Object(object) => object,
        Value::Array(_) => {
            return Err((
                Value::Null,
                RpcError::invalid_request("batch requests are not supported"),
            ))
        }
        _ => {
            return Err((
                Value::Null,
                RpcError::invalid_request("request must be a JSON object"),
            ))
        }
    };
    let id = match object.remove("id") {
        None => None,
        Some(id @ (Value::Null | Value::Number(_) | Value::String(_))) => Some(id),
        Some(_) => {
            return Err((
                Value::Null,
                RpcError::invalid_request("id must be a string, a number or null"),
            ))
        }
    };
    let reply_id = id.clone().unwrap_or(Value::Null);
    let invalid = |message: &str| (reply_id.clone(), RpcError::invalid_request(message));
    match object.get("jsonrpc") {
        Some(Value::String(version)) if version == "2.0" => {}
        _ => return Err(invalid("jsonrpc must be \"2.0\"")),
    }
    let method = match object.remove("method") {
        Some(Value::String(method)) => method,
        Some(_) => return Err(invalid("method must be a string")),
        None => return Err(invalid("missing method")),
    };
    let params = match object.remove("params") {
        None => Value::Null,
        Some(params @ (Value::Object(_) | Value::Array(_))) => params,
        Some(_) => return Err(invalid("params must be an object or an array")),
    };
    Ok(Request { id, method, params })
}

/// Handles one JSON value received on a connection: the reply to send, or `None` for a
/// notification. Never panics because of the value or the handler.
pub fn handle_value(handler: &dyn RpcHandler, value: Value) -> Option<Value> {
    match decode(value) {
        Err((id, err)) => Some(error_response(id, &err)),
        Ok(request) => {
            let outcome = call(handler, &request.method, request.params);
            let id = request.id?;
            Some(match outcome {
                Ok(result) => json!({"jsonrpc": "2.0", "id": id, "result": result}),
                Err(err) => error_response(id, &err),
            })
        }
    }
}

/// The reply object carrying `err`.
pub fn error_response(id: Value, err: &RpcError) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "error": err.to_json()})
}

/// Runs one method. `rpc_get_methods` is answered here; a method not listed by the
/// handler is -32601 without calling it, which keeps the list and the dispatch honest.
fn call(handler: &dyn RpcHandler, method: &str, params: Value) -> Result<Value, RpcError> {
    if method == GET_METHODS {
        return Ok(json!(method_names(handler)));
    }
    if !handler.methods().contains(&method) {
        return Err(RpcError::method_not_found(method));
    }
    // AssertUnwindSafe: a handler that panics half-way may leave its own state
    // inconsistent; guarding that state (with poisoning locks or otherwise) is the
    // handler's contract. The server's own state is not touched by the closure.
    match catch_unwind(AssertUnwindSafe(|| handler.call(method, params))) {
        Ok(outcome) => outcome,
        Err(payload) => {
            let detail = panic_message(payload.as_ref());
            tracing::error!(method, detail, "RPC handler panicked");
            Err(
                RpcError::internal(format!("internal error in {method}: handler panicked"))
                    .with_data(json!({ "panic": detail })),
            )
        }
    }
}

/// Every method the server answers, sorted, `rpc_get_methods` included.
pub fn method_names(handler: &dyn RpcHandler) -> Vec<&'static str> {
    let mut names = handler.methods();
    names.push(GET_METHODS);
    names.sort_unstable();
    names.dedup();
    names
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(message) = payload.downcast_ref::<&str>() {
        (*message).to_owned()
    } else if let Some(message) = payload.downcast_ref::<String>() {
        message.clone()
    } else {
        "non-string panic payload".to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Toy;

    impl RpcHandler for Toy {
        fn call(&self, method: &str, params: Value) -> Result<Value, RpcError> {
            match method {
                "echo" => Ok(params),
                "fail" => Err(RpcError::no_device("no such volume")),
                "boom" => panic!("boom"),
                _ => Err(RpcError::method_not_found(method)),
            }
        }

        fn methods(&self) -> Vec<&'static str> {
            vec!["fail", "echo", "boom"]
        }
    }

    fn reply(value: Value) -> Value {
        match handle_value(&Toy, value) {
            Some(reply) => reply,
            None => panic!("expected a reply"),
        }
    }

    fn code(reply: &Value) -> i64 {
        reply["error"]["code"].as_i64().unwrap_or(0)
    }

    #[test]
    fn call_echoes_id_and_result() {
        let r = reply(json!({"jsonrpc": "2.0", "id": "a", "method": "echo", "params": [1]}));
        assert_eq!(r, json!({"jsonrpc": "2.0", "id": "a", "result": [1]}));
    }

    #[test]
    fn absent_params_are_null() {
        let r = reply(json!({"jsonrpc": "2.0", "id": 1, "method": "echo"}));
        assert_eq!(r["result"], Value::Null);
    }

    #[test]
    fn null_id_is_a_request_not_a_notification() {
        let r = reply(json!({"jsonrpc": "2.0", "id": null, "method": "echo"}));
        assert_eq!(r["id"], Value::Null);
        assert!(r.get("result").is_some());
    }

    #[test]
    fn notification_runs_without_reply() {
        let r = handle_value(&Toy, json!({"jsonrpc": "2.0", "method": "fail"}));
        assert_eq!(r, None);
    }

    #[test]
    fn invalid_requests_are_32600() {
        for bad in [
            json!(1),
            json!("x"),
            json!([]),
            json!([{"jsonrpc": "2.0", "id": 1, "method": "echo"}]),
            json!({"id": 1, "method": "echo"}),
            json!({"jsonrpc": "1.0", "id": 1, "method": "echo"}),
            json!({"jsonrpc": 2.0, "id": 1, "method": "echo"}),
            json!({"jsonrpc": "2.0", "id": 1}),
            json!({"jsonrpc": "2.0", "id": 1, "method": 7}),
            json!({"jsonrpc": "2.0", "id": 1, "method": "echo", "params": "x"}),
            json!({"jsonrpc": "2.0", "id": 1, "method": "echo", "params": 3}),
            json!({"jsonrpc": "2.0", "id": {}, "method": "echo"}),
            json!({"jsonrpc": "2.0", "id": true, "method": "echo"}),
            // No id, but invalid: still answered (spec example), since it is not a
            // valid notification.
            json!({"jsonrpc": "2.0", "method": 1, "params": "bar"}),
        ] {
            let r = reply(bad.clone());
            assert_eq!(code(&r), -32600, "{bad}");
        }
    }

    #[test]
    fn invalid_request_keeps_a_valid_id() {
        let r = reply(json!({"jsonrpc": "2.0", "id": 9, "method": 1}));
        assert_eq!(r["id"], json!(9));
        let r = reply(json!({"jsonrpc": "2.0", "id": [9], "method": "echo"}));
        assert_eq!(r["id"], Value::Null);
    }

    #[test]
    fn unknown_method_is_32601_without_calling_handler() {
        let r = reply(json!({"jsonrpc": "2.0", "id": 1, "method": "nope"}));
        assert_eq!(code(&r), -32601);
        assert!(r["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("nope"));
    }

    #[test]
    fn application_error_passes_through() {
        let r = reply(json!({"jsonrpc": "2.0", "id": 1, "method": "fail"}));
        assert_eq!(code(&r), -19);
        assert_eq!(r["error"]["message"], json!("no such volume"));
    }

    #[test]
    fn handler_panic_is_32603() {
        let r = reply(json!({"jsonrpc": "2.0", "id": 1, "method": "boom"}));
        assert_eq!(code(&r), -32603);
        assert_eq!(r["error"]["data"]["panic"], json!("boom"));
    }

    #[test]
    fn get_methods_lists_handler_methods_and_itself() {
        let r = reply(json!({"jsonrpc": "2.0", "id": 1, "method": "rpc_get_methods"}));
        assert_eq!(
            r["result"],
            json!(["boom", "echo", "fail", "rpc_get_methods"])
        );
    }
}
