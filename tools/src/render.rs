//! Human output: one function per command, from the result JSON to text.
//!
//! Fields the tables do not know are ignored (they are in `--json`); a missing or
//! mistyped field prints as `-` rather than failing, so an older or newer server still
//! gets a readable table. Only a result of the wrong overall shape is an error.

use serde_json::Value;

use crate::client::CtlError;
use crate::size::format_size;
use crate::table::{Align, Table};

use Align::{Left, Right};

pub fn volumes(result: &Value) -> Result<String, CtlError> {
    let rows = array(result, "volume_list")?;
    if rows.is_empty() {
        return Ok("no volumes\n".into());
    }
    let mut out = volume_table(rows).render();
    // Volumes the server left out at start (not served), and why.
    for v in rows.iter().filter(|v| v["state"] == "failed") {
        out.push_str(&format!(
            "{}: FAILED, not served: {}\n",
            text(v, "name"),
            text(v, "error")
        ));
    }
    Ok(out)
}

/// `volume_create` returns the new volume object.
pub fn created_volume(result: &Value, name: &str) -> String {
    if result.is_object() {
        volume_table(std::slice::from_ref(result)).render()
    } else {
        format!("created volume {name}\n")
    }
}

fn volume_table(rows: &[Value]) -> Table {
    let mut table = Table::new(&[
        ("NAME", Left),
        ("SIZE", Right),
        ("BLOCK", Right),
        ("BACKEND", Left),
        ("RO", Left),
        ("CONNS", Right),
        ("PATH", Left),
    ]);
    for v in rows {
        table.push(vec![
            text(v, "name"),
            size(v, "size_bytes"),
            text(v, "block_size"),
            text(v, "backend"),
            text(v, "read_only"),
            text(v, "connections"),
            text(v, "path"),
        ]);
    }
    table
}

pub fn backup_created(result: &Value) -> String {
    if text(result, "state") == "draining" {
        return format!("{}\n", text(result, "message"));
    }
    format!(
        "backup {} ready: switch {} us, ready {} us\n",
        text(result, "export"),
        text(result, "switch_us"),
        text(result, "ready_us")
    )
}

pub fn backups(result: &Value) -> Result<String, CtlError> {
    let rows = array(result, "backup_list")?;
    if rows.is_empty() {
        return Ok("no backups\n".into());
    }
    let mut table = Table::new(&[
        ("EXPORT", Left),
        ("STATE", Left),
        ("DELTA CHUNKS", Right),
        ("DELTA", Right),
        ("SWITCH US", Right),
        ("READY US", Right),
    ]);
    for b in rows {
        table.push(vec![
            text(b, "export"),
            backup_state(b),
            text(b, "delta_chunks"),
            size(b, "delta_bytes"),
            text(b, "switch_us"),
            text(b, "ready_us"),
        ]);
    }
    Ok(table.render())
}

/// `ready`, `copying 42%` while a copy job reads the backup, or `draining (3
/// requests)` while requests admitted before its switch still run.
fn backup_state(b: &Value) -> String {
    let waiting = b.get("waiting_requests").and_then(Value::as_u64);
    match b
        .get("copy")
        .and_then(|c| c.get("percent"))
        .and_then(Value::as_u64)
    {
        Some(p) => format!("copying {p}%"),
        None if text(b, "state") == "draining" && waiting.is_some() => {
            format!("draining ({} requests)", waiting.unwrap_or(0))
        }
        None => text(b, "state"),
    }
}

pub fn exports(result: &Value) -> Result<String, CtlError> {
    let rows = array(result, "export_list")?;
    if rows.is_empty() {
        return Ok("no exports\n".into());
    }
    let mut table = Table::new(&[
        ("NAME", Left),
        ("VOLUME", Left),
        ("SIZE", Right),
        ("RO", Left),
    ]);
    for e in rows {
        table.push(vec![
            text(e, "name"),
            text(e, "volume"),
            size(e, "size_bytes"),
            text(e, "read_only"),
        ]);
    }
    Ok(table.render())
}

/// `stats` returns `{volumes: [..], reactors?: [..]}`; a bare array is taken as the
/// volumes, and a `reactors` member that is not a list is left to `--json`.
pub fn stats(result: &Value) -> Result<String, CtlError> {
    let (volumes, reactors) = match result {
        Value::Array(volumes) => (volumes.as_slice(), None),
        Value::Object(object) => {
            let volumes = object
                .get("volumes")
                .map(|v| array(v, "stats.volumes"))
                .transpose()?
                .unwrap_or(&[]);
            (volumes, object.get("reactors").and_then(Value::as_array))
        }
        _ => return Err(shape("stats", "an object", result)),
    };
    let mut out = String::new();
    if volumes.is_empty() {
        out.push_str("no volumes\n");
    } else {
        let mut table = Table::new(&[
            ("VOLUME", Left),
            ("READS", Right),
            ("WRITES", Right),
            ("FLUSHES", Right),
            ("TRIMS", Right),
            ("ZEROES", Right),
            ("READ", Right),
            ("WRITTEN", Right),
            ("ERRORS", Right),
        ]);
        for v in volumes {
            table.push(vec![
                text(v, "name"),
                text(v, "read_ops"),
                text(v, "write_ops"),
                text(v, "flush_ops"),
                text(v, "trim_ops"),
                text(v, "zero_ops"),
                size(v, "read_bytes"),
                size(v, "write_bytes"),
                text(v, "errors"),
            ]);
        }
        out.push_str(&table.render());
    }
    if let Some(reactors) = reactors.filter(|r| !r.is_empty()) {
        out.push('\n');
        out.push_str(&reactor_table(reactors).render());
    }
    Ok(out)
}

pub fn reactors(result: &Value) -> Result<String, CtlError> {
    let rows = array(result, "reactor_list")?;
    if rows.is_empty() {
        return Ok("no reactors\n".into());
    }
    Ok(reactor_table(rows).render())
}

fn reactor_table(rows: &[Value]) -> Table {
    let mut table = Table::new(&[
        ("ID", Right),
        ("CORE", Right),
        ("CONNS", Right),
        ("BUSY%", Right),
        ("BUSY_TICKS", Right),
        ("IDLE_TICKS", Right),
        ("POLICY", Left),
    ]);
    for r in rows {
        table.push(vec![
            text(r, "id"),
            text(r, "core"),
            text(r, "connections"),
            busy_percent(r),
            text(r, "busy_ticks"),
            text(r, "idle_ticks"),
            text(r, "poll_policy"),
        ]);
    }
    table
}

/// `vhost_list`: one line per queue (an export's fields repeat on each).
pub fn vhost(result: &Value) -> Result<String, CtlError> {
    let rows = array(result, "vhost_list")?;
    if rows.is_empty() {
        return Ok("no vhost-user exports\n".into());
    }
    let mut table = Table::new(&[
        ("EXPORT", Left),
        ("SOCKET", Left),
        ("RO", Left),
        ("CONNECTED", Left),
        ("QUEUE", Right),
        ("REACTOR", Right),
        ("RUNNING", Left),
        ("SERVED", Right),
        ("RESUBMITTED", Right),
        ("ERRORS", Right),
    ]);
    for e in rows {
        let queues = e.get("queues").and_then(Value::as_array);
        let none = [Value::Null];
        let queues = queues.map_or(&none[..], |q| if q.is_empty() { &none[..] } else { q });
        for q in queues {
            table.push(vec![
                text(e, "export"),
                text(e, "socket"),
                text(e, "read_only"),
                text(e, "connected"),
                text(q, "index"),
                text(q, "reactor"),
                text(q, "running"),
                text(q, "served"),
                text(q, "resubmitted"),
                text(q, "errors"),
            ]);
        }
    }
    Ok(table.render())
}

/// Share of polled time spent doing work, SPDK's "busy" measure.
fn busy_percent(reactor: &Value) -> String {
    let ticks = |key| reactor.get(key).and_then(Value::as_u64);
    match (ticks("busy_ticks"), ticks("idle_ticks")) {
        (Some(busy), Some(idle)) if busy.saturating_add(idle) > 0 => {
            let total = busy as f64 + idle as f64;
            format!("{:.1}", busy as f64 * 100.0 / total)
        }
        _ => "-".into(),
    }
}

/// `fault_inject` returns `{volume, rule: {id, op, errno, offset, length, count}}`.
pub fn fault_injected(result: &Value) -> String {
    let rule = result.get("rule").unwrap_or(&Value::Null);
    let count = match rule.get("count").and_then(Value::as_u64) {
        Some(0) => "every request until cleared".to_string(),
        Some(1) => "the next request".to_string(),
        Some(n) => format!("the next {n} requests"),
        None => text(rule, "count"),
    };
    format!(
        "fault rule {} on {}: {} {} at {} (+{}) fails {count}\n",
        text(rule, "id"),
        text(result, "volume"),
        text(rule, "op"),
        text(rule, "errno"),
        size(rule, "offset"),
        size(rule, "length"),
    )
}

pub fn methods(result: &Value) -> Result<String, CtlError> {
    let names = array(result, "rpc_get_methods")?;
    Ok(names
        .iter()
        .map(|name| match name {
            Value::String(name) => format!("{name}\n"),
            other => format!("{other}\n"),
        })
        .collect())
}

/// Pretty JSON and a newline: what `--json` and `call` print.
pub fn json(result: &Value) -> String {
    let mut out = serde_json::to_string_pretty(result).unwrap_or_else(|_| result.to_string());
    out.push('\n');
    out
}

fn array<'a>(result: &'a Value, method: &str) -> Result<&'a [Value], CtlError> {
    result
        .as_array()
        .map(Vec::as_slice)
        .ok_or_else(|| shape(method, "a list", result))
}

fn shape(method: &str, expected: &str, got: &Value) -> CtlError {
    let mut got = got.to_string();
    if got.len() > 80 {
        let cut = (0..=77)
            .rev()
            .find(|&i| got.is_char_boundary(i))
            .unwrap_or(0);
        got.truncate(cut);
        got.push_str("...");
    }
    CtlError::Protocol(format!("{method} returned {got}, expected {expected}"))
}

fn text(object: &Value, key: &str) -> String {
    match object.get(key) {
        None | Some(Value::Null) => "-".into(),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Bool(true)) => "yes".into(),
        Some(Value::Bool(false)) => "no".into(),
        Some(other) => other.to_string(),
    }
}

fn size(object: &Value, key: &str) -> String {
    match object.get(key).and_then(Value::as_u64) {
        Some(bytes) => format_size(bytes),
        None => text(object, key),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn volume_table_tolerates_missing_and_extra_fields() {
        let out = volumes(&json!([
            {"name": "a", "size_bytes": 1073741824_u64, "block_size": 4096, "backend": "file",
             "read_only": false, "connections": 2, "path": "/a.img", "future_field": 1},
            {"name": "b"}
        ]))
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            out,
            "NAME     SIZE  BLOCK  BACKEND  RO  CONNS  PATH\n\
             a     1.0 GiB   4096  file     no      2  /a.img\n\
             b           -      -  -        -       -  -\n"
        );
    }

    #[test]
    fn a_volume_left_out_at_start_says_why() {
        let out = volumes(&json!([
            {"name": "a", "state": "failed", "error": "cannot be recovered: x"},
            {"name": "b", "state": "serving"}
        ]))
        .unwrap_or_else(|e| panic!("{e}"));
        assert!(
            out.ends_with("a: FAILED, not served: cannot be recovered: x\n"),
            "{out}"
        );
        assert_eq!(out.matches("FAILED").count(), 1, "{out}");
    }

    #[test]
    fn a_backup_being_copied_shows_its_progress() {
        let out = backups(&json!([
            {"export": "v@a", "state": "ready", "copy": {"job": 3, "percent": 42}},
            {"export": "v@b", "state": "ready", "copy": null}
        ]))
        .unwrap_or_else(|e| panic!("{e}"));
        assert!(out.contains("copying 42%"), "{out}");
        assert_eq!(out.matches("ready").count(), 1, "{out}");
    }

    #[test]
    fn fault_rule_is_described() {
        let out = fault_injected(&json!({"volume": "v", "rule": {"id": 2, "op": "read",
            "errno": "EIO", "offset": 1048576, "length": 65536, "count": 3}}));
        assert_eq!(
            out,
            "fault rule 2 on v: read EIO at 1.0 MiB (+64.0 KiB) fails the next 3 requests\n"
        );
        assert!(fault_injected(&json!({})).contains("fault rule - on -"));
    }

    #[test]
    fn vhost_table_has_a_line_per_queue() {
        let out = vhost(&json!([
            {"export": "v", "socket": "/s", "read_only": false, "connected": true,
             "queues": [
                {"index": 0, "reactor": 0, "running": true, "served": 7, "resubmitted": 1, "errors": 0},
                {"index": 1, "reactor": 1, "running": false, "served": 3, "resubmitted": 0, "errors": 2}
             ]},
            {"export": "w@b", "socket": "/t"}
        ]))
        .unwrap_or_else(|e| panic!("{e}"));
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 4, "{out}");
        assert!(
            lines[1].starts_with("v ") && lines[1].contains(" 7 "),
            "{out}"
        );
        assert!(lines[2]
            .split_whitespace()
            .eq(["v", "/s", "no", "yes", "1", "1", "no", "3", "0", "2"]));
        assert!(lines[3].starts_with("w@b"), "{out}");
        assert_eq!(
            vhost(&json!([])).ok().as_deref(),
            Some("no vhost-user exports\n")
        );
        assert!(vhost(&json!({})).is_err());
    }

    #[test]
    fn wrong_shape_is_an_error() {
        assert!(volumes(&json!({"name": "a"})).is_err());
        assert!(stats(&json!("x")).is_err());
        assert!(stats(&json!({"volumes": 3})).is_err());
    }

    #[test]
    fn busy_percent_handles_zero_ticks() {
        assert_eq!(
            busy_percent(&json!({"busy_ticks": 0, "idle_ticks": 0})),
            "-"
        );
        assert_eq!(
            busy_percent(&json!({"busy_ticks": 1, "idle_ticks": 3})),
            "25.0"
        );
        assert_eq!(
            busy_percent(&json!({"busy_ticks": u64::MAX, "idle_ticks": u64::MAX})),
            "50.0"
        );
    }

    #[test]
    fn long_shapes_are_truncated_on_char_boundaries() {
        let err = shape("m", "a list", &json!("é".repeat(100)));
        assert!(err.to_string().contains("..."));
    }
}
