//! `ferry test`: one round of every enabled collector, printed as the records would be sent,
//! without a spool or a broker (like `telegraf --test`), to see what a collector, a parser or a
//! regex produces before deploying it.
//!
//! Each collector runs in a context of its own whose intake is read here instead of by the
//! spool writer: commit receipts are answered `true` and positions stay in memory, so nothing
//! is written anywhere and a file collector's stored position is not touched. A collector's
//! round ends with its first intake plus whatever it sends within [`SETTLE`] after it (a
//! file read in several pieces), or at the deadline; then it is shut down.

use crate::collectors::CollectorContext;
use crate::config::Config;
use crate::record::{Body, Reading, Value};
use std::time::Duration;
use tokio::time::Instant;

/// After a collector's first intake, how long more of the same burst is waited for.
const SETTLE: Duration = Duration::from_millis(200);

/// What one collector produced in its round.
pub struct Round {
    pub collector: String,
    pub readings: Vec<Reading>,
    /// Why the round ended without readings, if it did.
    pub note: Option<String>,
}

/// Runs every enabled collector of `config` once, at most `wait` each (all in parallel).
pub async fn one_round(config: &Config, wait: Duration) -> Vec<Round> {
    let rounds = config
        .collectors
        .iter()
        .filter(|c| c.enabled())
        .map(|spec| {
            let name = spec.name().to_string();
            let collector = spec.build();
            async move {
                let (ctx, mut rx) = CollectorContext::new_test(&name);
                let shutdown = ctx.shutdown.clone();
                let task = tokio::spawn(collector.run(ctx));
                let deadline = Instant::now() + wait;
                let mut readings = Vec::new();
                let mut note = None;
                let mut until = deadline;
                loop {
                    match tokio::time::timeout_at(until, rx.recv()).await {
                        Ok(Some(mut intake)) => {
                            if let Some(receipt) = intake.committed.take() {
                                let _ = receipt.send(true);
                            }
                            if !intake.readings.is_empty() {
                                readings.append(&mut intake.readings);
                                until = (Instant::now() + SETTLE).min(deadline);
                            }
                        }
                        Ok(None) => break,
                        Err(_) => {
                            if readings.is_empty() {
                                note = Some(format!(
                                    "nothing within {} ms (--wait-ms sets how long to wait)",
                                    wait.as_millis()
                                ));
                            }
                            break;
                        }
                    }
                }
                shutdown.cancel();
                if let Ok(Ok(Err(e))) = tokio::time::timeout(SETTLE, task).await {
                    note = Some(e.to_string());
                }
                Round {
                    collector: name,
                    readings,
                    note,
                }
            }
        });
    join_in_order(rounds).await
}

/// Runs the futures concurrently and returns their outputs in order.
async fn join_in_order<F: std::future::Future<Output = Round> + Send + 'static>(
    futures: impl Iterator<Item = F>,
) -> Vec<Round> {
    let handles: Vec<_> = futures.map(tokio::spawn).collect();
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        match h.await {
            Ok(r) => out.push(r),
            Err(e) => out.push(Round {
                collector: "?".into(),
                readings: Vec::new(),
                note: Some(format!("the collector's round panicked: {e}")),
            }),
        }
    }
    out
}

/// A reading as the JSON object a record of it carries (without the seq the spool would give
/// it): `{"stream","ts","fields"|"line"}`.
pub fn reading_json(r: &Reading) -> serde_json::Value {
    let mut o = serde_json::Map::new();
    o.insert("stream".into(), r.stream.clone().into());
    o.insert("ts".into(), r.ts_ms.into());
    match &r.body {
        Body::Fields(fields) => {
            let f: serde_json::Map<String, serde_json::Value> = fields
                .iter()
                .map(|(k, v)| {
                    let v = match v {
                        Value::I64(i) => (*i).into(),
                        Value::U64(u) => (*u).into(),
                        Value::F64(x) => serde_json::Number::from_f64(*x)
                            .map_or(serde_json::Value::Null, serde_json::Value::Number),
                        Value::Bool(b) => (*b).into(),
                        Value::Str(s) => s.clone().into(),
                    };
                    (k.clone(), v)
                })
                .collect();
            o.insert("fields".into(), f.into());
        }
        Body::Line(l) => {
            o.insert("line".into(), l.clone().into());
        }
    }
    o.into()
}
