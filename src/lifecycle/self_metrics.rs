//! The agent's own figures as a `ferry.self` stream, every `self_metrics_interval_ms`: the
//! numbers of the status document (connection, spool per stream, collector restarts),
//! flattened to fields such as `spool.bytes` or `spool.system.records`.

use crate::control::Control;
use crate::record::{Reading, Value};
use crate::spool::Intake;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

pub use crate::record::SELF_STREAM;

pub async fn run(
    control: Control,
    intake: mpsc::Sender<Intake>,
    every: Duration,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let status = control.status().await;
        let fields = flatten(&status);
        if intake
            .send(Intake::reading(Reading::fields(SELF_STREAM, fields)))
            .await
            .is_err()
        {
            return;
        }
    }
}

/// Numeric and boolean leaves of the status document, with dotted names; per-stream and
/// per-collector entries are keyed by their name.
pub fn flatten(status: &serde_json::Value) -> Vec<(String, Value)> {
    let mut out = Vec::new();
    walk("", status, &mut out);
    out
}

fn walk(prefix: &str, v: &serde_json::Value, out: &mut Vec<(String, Value)>) {
    let key = |k: &str| {
        if prefix.is_empty() {
            k.to_string()
        } else {
            format!("{prefix}.{k}")
        }
    };
    match v {
        serde_json::Value::Object(m) => {
            for (k, v) in m {
                walk(&key(k), v, out);
            }
        }
        serde_json::Value::Array(items) => {
            for item in items {
                if let Some(name) = item.get("name").and_then(|n| n.as_str()) {
                    walk(&key(name), item, out);
                }
            }
        }
        serde_json::Value::Number(n) => {
            if let Some(u) = n.as_u64() {
                out.push((prefix.to_string(), Value::U64(u)));
            } else if let Some(f) = n.as_f64() {
                out.push((prefix.to_string(), Value::F64(f)));
            }
        }
        serde_json::Value::Bool(b) => out.push((prefix.to_string(), Value::Bool(*b))),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flattens_numbers_and_named_items() {
        let s = serde_json::json!({
            "uptime_s": 5,
            "version": "0.1.0",
            "connection": {"connected": true, "backoff_ms": 0},
            "spool": {"bytes": 10, "streams": [{"name": "system", "records": 3}]},
        });
        let f = flatten(&s);
        let get = |k: &str| f.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        assert_eq!(get("uptime_s"), Some(Value::U64(5)));
        assert_eq!(get("connection.connected"), Some(Value::Bool(true)));
        assert_eq!(get("spool.streams.system.records"), Some(Value::U64(3)));
        assert_eq!(get("version"), None);
    }
}
