//! The command channel: operators publish JSON requests to `<prefix>/<device>/commands`; ferry
//! runs each at most once and replies on `<prefix>/<device>/replies`.
//!
//! Invariants:
//! - **Recorded before acknowledged.** A command is PUBACKed only after its id is flushed to
//!   the [`ledger`] (or, for a refused request, after its error reply is committed to the
//!   spool). A crash in between makes the broker redeliver it instead of losing it.
//! - **At most once per id.** A redelivered id is not run again: its stored final reply is
//!   sent again; an id whose run was interrupted by a stop gets an error reply saying so.
//! - **Replies are spooled** on the `commands` stream like data, so a reply is not lost when
//!   the link drops right after the command arrived; the uplink sends them ahead of data.
//! - **Nothing from the network runs as a shell string.** Built-ins are fixed code; actions
//!   are programs the config names, with typed parameters as separate argv items.
//! - Deliveries are handled one at a time, in order of receipt, so acknowledgements go out in
//!   the order MQTT 3.1.1 requires. Actions then run in their own tasks, bounded per action.
//! - With `require_signature`, a request must carry an HMAC-SHA256 over its canonical form
//!   ([`request::canonical`]) by a configured key; unsigned, wrongly signed and replayed
//!   requests are refused with an error reply and a WARN log.
//! - Every refusal is counted once, by reason ([`RefusedCounts`]), with its error reply.
//! - No action outlives the service: when it stops, running actions' process groups are
//!   killed and their final `interrupted` replies committed before [`CommandService::run`]
//!   returns (within `ACTIONS_STOP_DEADLINE`).

pub mod actions;
pub mod ledger;
pub mod request;
mod settings;

use crate::clock::now_ms;
use crate::command_link::{AckRequest, CommandDelivery, CommandPublish};
use crate::control::Control;
use crate::loss::{Loss, LossReason};
use crate::record::{Body, COMMANDS_STREAM, Reading};
use crate::spool::Intake;
use hmac::{Hmac, Mac};
use ledger::Ledger;
use request::Request;
use serde_json::{Value, json};
pub use settings::{ActionSettings, CommandSettings, ParamKind, ParamSettings};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::sync::{Notify, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("cannot read command key {id} from {path}: {source}")]
    Key {
        id: String,
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("command ledger: {0}")]
    Ledger(#[from] crate::spool::SpoolError),
}

/// A reply as published: `{"id", "status", "result"|"error", "ts"}`.
pub fn reply(
    id: Option<&str>,
    status: &str,
    body: Result<Value, (String, Option<Value>)>,
) -> String {
    let mut r = json!({ "id": id, "status": status, "ts": now_ms() });
    match body {
        Ok(v) => r["result"] = v,
        Err((msg, details)) => {
            r["error"] = msg.into();
            if let Some(d) = details {
                r["details"] = d;
            }
        }
    }
    r.to_string()
}

fn ok(id: &str, result: Value) -> String {
    reply(Some(id), "ok", Ok(result))
}

fn error(id: Option<&str>, msg: impl Into<String>) -> String {
    reply(id, "error", Err((msg.into(), None)))
}

struct Shared {
    intake: mpsc::Sender<Intake>,
    ledger: Ledger,
}

impl Shared {
    /// Commits a reply to the spool; true once it is durable.
    async fn send_reply(&self, text: String) -> bool {
        let reading = Reading {
            stream: COMMANDS_STREAM.into(),
            ts_ms: now_ms(),
            body: Body::Line(text),
        };
        let (intake, receipt) = Intake::with_receipt(vec![reading], None);
        if self.intake.send(intake).await.is_err() {
            return false;
        }
        receipt.await.unwrap_or(false)
    }

    /// Sends the final reply and records it in the ledger.
    async fn finish(&self, id: &str, text: String) {
        if let Err(e) = self.ledger.finish(id, &text) {
            warn!(command = %id, error = %e, "Cannot record a command's final reply; a redelivery would get an 'interrupted' reply.");
        }
        self.send_reply(text).await;
    }
}

/// Commands refused, by reason, for `ferry status` and `ferry.self`: each counted once, with
/// its error reply (a retained command's redeliveries, acknowledged silently, are not).
#[derive(Debug, Default)]
pub struct RefusedCounts {
    /// Not a request: not JSON, not UTF-8, missing or wrongly typed keys.
    pub malformed: AtomicU64,
    /// Over the request size limit.
    pub too_big: AtomicU64,
    pub retained: AtomicU64,
    pub expired: AtomicU64,
    /// The command queue was full, or an action already ran `max_concurrent` times.
    pub busy: AtomicU64,
    /// A signed command's id published anew.
    pub replayed: AtomicU64,
    /// Unsigned or wrongly signed, with `require_signature`.
    pub unsigned: AtomicU64,
}

impl RefusedCounts {
    /// The counts by name, for the status document.
    pub fn to_json(&self) -> Value {
        let n = |c: &AtomicU64| c.load(Ordering::Relaxed);
        json!({
            "malformed": n(&self.malformed),
            "too_big": n(&self.too_big),
            "retained": n(&self.retained),
            "expired": n(&self.expired),
            "busy": n(&self.busy),
            "replayed": n(&self.replayed),
            "unsigned": n(&self.unsigned),
        })
    }
}

fn count(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

pub struct CommandService {
    settings: CommandSettings,
    keys: HashMap<String, Vec<u8>>,
    shared: Arc<Shared>,
    control: Control,
    flush: Arc<Notify>,
    limits: HashMap<String, Arc<Semaphore>>,
    /// Running actions: on a stop their process groups are killed and their final replies
    /// committed before [`CommandService::run`] returns.
    actions: TaskTracker,
    actions_stop: CancellationToken,
    refused: Arc<RefusedCounts>,
}

/// How long running actions get, once killed at a stop, to commit their final replies.
const ACTIONS_STOP_DEADLINE: std::time::Duration = std::time::Duration::from_secs(3);

impl CommandService {
    pub fn new(
        settings: CommandSettings,
        tree: sled::Tree,
        durable: ledger::Durable,
        intake: mpsc::Sender<Intake>,
        control: Control,
        flush: Arc<Notify>,
    ) -> Result<CommandService, CommandError> {
        let mut keys = HashMap::new();
        for (id, path) in &settings.keys {
            let text = std::fs::read_to_string(path).map_err(|source| CommandError::Key {
                id: id.clone(),
                path: path.clone(),
                source,
            })?;
            keys.insert(id.clone(), text.trim().as_bytes().to_vec());
        }
        let limits = settings
            .actions
            .iter()
            .map(|a| (a.name.clone(), Arc::new(Semaphore::new(a.max_concurrent))))
            .collect();
        Ok(CommandService {
            shared: Arc::new(Shared {
                intake,
                ledger: Ledger::new(
                    tree,
                    durable,
                    settings.ledger_max_entries,
                    settings.ledger_max_age,
                ),
            }),
            settings,
            keys,
            control,
            flush,
            limits,
            actions: TaskTracker::new(),
            actions_stop: CancellationToken::new(),
            refused: Arc::default(),
        })
    }

    /// The refusal counters, shared with the status document.
    pub fn refused(&self) -> Arc<RefusedCounts> {
        self.refused.clone()
    }

    /// Serves deliveries until `stop` is cancelled.
    pub async fn run(
        self,
        mut deliveries: mpsc::Receiver<CommandDelivery>,
        mut busy: mpsc::Receiver<Option<String>>,
        acks: mpsc::Sender<AckRequest>,
        stop: CancellationToken,
    ) {
        self.finish_interrupted().await;
        loop {
            let delivery = tokio::select! {
                _ = stop.cancelled() => break,
                d = deliveries.recv() => match d { Some(d) => d, None => break },
                Some(id) = busy.recv() => {
                    self.refuse_busy(id).await;
                    continue;
                }
            };
            let durable = self.handle(&delivery.publish).await;
            if durable {
                let _ = acks
                    .send(AckRequest {
                        epoch: delivery.epoch,
                        publish: delivery.publish,
                    })
                    .await;
            }
        }
        // Running actions are killed (their whole process groups) and answered now, so none
        // outlives ferry and none holds the spool writer past its deadline.
        self.actions_stop.cancel();
        self.actions.close();
        if tokio::time::timeout(ACTIONS_STOP_DEADLINE, self.actions.wait())
            .await
            .is_err()
        {
            warn!("Running actions did not record their final replies in time.");
        }
    }

    /// Handles one delivery; returns whether it is durably recorded (and may be acknowledged).
    async fn handle(&self, publish: &CommandPublish) -> bool {
        if publish.retain {
            return self.refuse_retained(&publish.payload).await;
        }
        self.handle_request(&publish.payload, publish.dup, publish.expires_at_ms)
            .await
    }

    /// A command that arrived while the queue was full (the uplink acknowledged it already).
    /// Commands that were running when ferry last stopped (a crash, SIGKILL, power cut) get
    /// their final `interrupted` reply now: their PUBACK went out with the `accepted` reply,
    /// so the broker will not deliver them again. They are not run again.
    async fn finish_interrupted(&self) {
        let ids = match self.shared.ledger.unfinished() {
            Ok(ids) => ids,
            Err(e) => {
                warn!(error = %e, "Cannot read the command ledger for interrupted commands.");
                return;
            }
        };
        for id in ids {
            warn!(command = %id, "Command interrupted by the last stop; it is not run again.");
            self.shared
                .finish(
                    &id,
                    error(
                        Some(&id),
                        "interrupted: ferry stopped while this command ran; it is not run again",
                    ),
                )
                .await;
        }
    }

    /// Not waiting for the reply to be durable keeps a burst from backing up behind flushes.
    async fn refuse_busy(&self, id: Option<String>) {
        warn!(command = ?id, "Command refused: too many commands waiting.");
        count(&self.refused.busy);
        let text = error(
            id.as_deref(),
            "busy: too many commands are waiting; send it again later",
        );
        let reading = Reading {
            stream: COMMANDS_STREAM.into(),
            ts_ms: now_ms(),
            body: Body::Line(text),
        };
        let _ = self.shared.intake.send(Intake::reading(reading)).await;
    }

    /// A retained command is never run: it would run again on every new subscription, and
    /// once more each time its id leaves the ledger. It gets one error reply; its redeliveries
    /// (same bytes) are acknowledged without another, while the ledger remembers it.
    async fn refuse_retained(&self, payload: &[u8]) -> bool {
        let sh = &self.shared;
        let key = format!("retained\0{}", hex::encode(&Sha256::digest(payload)[..16]));
        let id = request::decode(payload)
            .map(|r| r.id)
            .ok()
            .or_else(|| request::sniff_id(payload));
        // Seen before, by its bytes or (MQTT 3.1.1 forwards a retained message published while
        // ferry is subscribed without the retain flag) by its id: no second reply.
        for known in std::iter::once(&key).chain(id.as_ref()) {
            match sh.ledger.get(known) {
                Ok(Some(_)) => {
                    debug!(command = ?id, "Retained command delivered again; acknowledged without a reply.");
                    return true;
                }
                Ok(None) => {}
                Err(e) => {
                    warn!(error = %e, "Cannot read the command ledger; the command is not acknowledged and will be redelivered.");
                    return false;
                }
            }
        }
        warn!(command = ?id, "Retained command refused; clear it on the broker (publish an empty retained message to the command topic).");
        count(&self.refused.retained);
        if sh.ledger.accept(&key, now_ms()).is_err() {
            return false;
        }
        let text = error(
            id.as_deref(),
            "retained: commands must not be retained (they would run again on every subscription); not run",
        );
        let _ = sh.ledger.finish(&key, &text);
        sh.send_reply(text).await
    }

    /// Handles one request; returns whether it is durably recorded (and may be acknowledged).
    /// `dup`: the broker is sending it again (its PUBACK was lost), not a new publish.
    /// `message_expiry_ms`: the MQTT 5 message expiry as a deadline; it counts like the
    /// request's own `expires_at` (the earlier of the two wins).
    async fn handle_request(
        &self,
        payload: &[u8],
        dup: bool,
        message_expiry_ms: Option<u64>,
    ) -> bool {
        let sh = &self.shared;
        let req = match request::decode(payload) {
            Ok(r) => r,
            Err(e) => {
                warn!(command = ?e.id, error = %e.message, "Malformed command refused.");
                count(if payload.len() > request::MAX_REQUEST_BYTES {
                    &self.refused.too_big
                } else {
                    &self.refused.malformed
                });
                return sh
                    .send_reply(error(
                        e.id.as_deref(),
                        format!("malformed request: {}", e.message),
                    ))
                    .await;
            }
        };
        let id = req.id.clone();
        if self.settings.require_signature
            && let Err(why) = self.verify(&req)
        {
            warn!(command = %id, name = %req.name, reason = %why, "Command refused: signature check failed.");
            count(&self.refused.unsigned);
            return sh
                .send_reply(error(Some(&id), format!("signature refused: {why}")))
                .await;
        }
        match sh.ledger.get(&id) {
            Ok(Some(entry)) => {
                // The broker sets DUP itself when it sends a message again (a publisher
                // cannot), so a DUP delivery is a QoS redelivery and gets only its stored
                // reply; the same id published anew is a replay.
                if self.settings.require_signature && !dup {
                    warn!(command = %id, "Replayed signed command refused.");
                    count(&self.refused.replayed);
                    return sh
                        .send_reply(error(
                            Some(&id),
                            "replayed: this command id was already received",
                        ))
                        .await;
                }
                info!(command = %id, "Command id seen before; not run again.");
                let text = entry.reply.unwrap_or_else(|| {
                    error(
                        Some(&id),
                        "interrupted: ferry stopped while this command ran; it is not run again",
                    )
                });
                let _ = sh.ledger.finish(&id, &text);
                return sh.send_reply(text).await;
            }
            Ok(None) => {}
            Err(e) => {
                warn!(command = %id, error = %e, "Cannot read the command ledger; the command is not acknowledged and will be redelivered.");
                return false;
            }
        }
        let now = now_ms();
        let expires_at = match (req.expires_at, message_expiry_ms) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        if expires_at.is_some_and(|e| e < now) {
            info!(command = %id, name = %req.name, message_expiry = message_expiry_ms.is_some(), "Expired command refused.");
            count(&self.refused.expired);
            let text = error(Some(&id), "expired");
            if sh.ledger.accept(&id, now).is_err() {
                return false;
            }
            // A refused command is data the operator sent that ferry dropped: count it.
            let loss = Loss::new(COMMANDS_STREAM, LossReason::ExpiredCommand, 1)
                .with("id", crate::record::Value::Str(id.clone()))
                .to_reading();
            let _ = sh.intake.send(Intake::reading(loss)).await;
            sh.finish(&id, text).await;
            return true;
        }
        if let Err(e) = sh.ledger.accept(&id, now) {
            warn!(command = %id, error = %e, "Cannot record the command; it is not acknowledged and will be redelivered.");
            return false;
        }
        info!(command = %id, name = %req.name, "Command received.");
        self.execute(req).await;
        true
    }

    fn verify(&self, req: &Request) -> Result<(), String> {
        let sig = req.sig.as_ref().ok_or("the request is not signed")?;
        let key = self
            .keys
            .get(&sig.kid)
            .ok_or_else(|| format!("unknown key id {:?}", sig.kid))?;
        let mut mac = Hmac::<Sha256>::new_from_slice(key).map_err(|e| e.to_string())?;
        mac.update(&request::canonical(req));
        mac.verify_slice(&sig.hmac)
            .map_err(|_| "the signature does not match".to_string())
    }

    async fn execute(&self, req: Request) {
        let sh = self.shared.clone();
        let id = req.id.clone();
        let arg_str = |k: &str| req.args.get(k).and_then(Value::as_str).map(str::to_string);
        let result: Result<Value, (String, Option<Value>)> = match req.name.as_str() {
            "ping" => Ok(json!({ "pong": true })),
            "status" => Ok(self.control.status().await),
            "reload_config" => match self.control.reload().await {
                Ok(changes) => Ok(json!({ "changes": changes })),
                Err(issues) => Err((
                    "the new config is invalid; the running config stays".into(),
                    Some(json!(issues)),
                )),
            },
            "set_interval" => match (
                arg_str("collector"),
                req.args.get("interval_ms").and_then(Value::as_u64),
            ) {
                (Some(c), Some(ms)) => self
                    .control
                    .set_interval(c, ms)
                    .await
                    .map(|()| json!({ "interval_ms": ms }))
                    .map_err(|e| (e, None)),
                _ => Err((
                    "set_interval needs args {\"collector\": string, \"interval_ms\": integer}"
                        .into(),
                    None,
                )),
            },
            "sample_now" => match arg_str("collector") {
                Some(c) => self
                    .control
                    .sample_now(c)
                    .await
                    .map(|()| json!({ "requested": true }))
                    .map_err(|e| (e, None)),
                None => Err(("sample_now needs args {\"collector\": string}".into(), None)),
            },
            "set_log_level" => match arg_str("level") {
                Some(l) => self
                    .control
                    .set_log_level(l)
                    .await
                    .map(|()| json!({ "level": arg_str("level") }))
                    .map_err(|e| (e, None)),
                None => Err(("set_log_level needs args {\"level\": string}".into(), None)),
            },
            "flush" => {
                self.flush.notify_one();
                Ok(json!({ "flushing": true }))
            }
            name => match self.settings.actions.iter().find(|a| a.name == name) {
                Some(action) => return self.start_action(action.clone(), req).await,
                None => Err((format!("unknown command {name:?}"), None)),
            },
        };
        let status = if result.is_ok() { "ok" } else { "error" };
        sh.finish(&id, reply(Some(&id), status, result)).await;
    }

    async fn start_action(&self, action: ActionSettings, req: Request) {
        let sh = self.shared.clone();
        let id = req.id.clone();
        let argv = match actions::build_args(&action, &req.args) {
            Ok(a) => a,
            Err(e) => return sh.finish(&id, error(Some(&id), e)).await,
        };
        let limit = self
            .limits
            .get(&action.name)
            .cloned()
            .unwrap_or_else(|| Arc::new(Semaphore::new(1)));
        let Ok(permit) = limit.try_acquire_owned() else {
            count(&self.refused.busy);
            return sh
                .finish(
                    &id,
                    error(
                        Some(&id),
                        format!(
                            "busy: {} run(s) of {} already running",
                            action.max_concurrent, action.name
                        ),
                    ),
                )
                .await;
        };
        sh.send_reply(reply(
            Some(&id),
            "accepted",
            Ok(json!({ "action": action.name })),
        ))
        .await;
        let stop = self.actions_stop.clone();
        self.actions.spawn(async move {
            let _permit = permit;
            let text = match actions::run(&action, argv, &stop).await {
                Ok(o) if o.stopped => {
                    warn!(command = %id, action = %action.name, "Action killed: ferry is stopping.");
                    error(
                        Some(&id),
                        "interrupted: ferry stopped while this command ran (its process group was killed); it is not run again",
                    )
                }
                Ok(o) if o.timed_out => reply(
                    Some(&id),
                    "error",
                    Err((
                        format!(
                            "timed out after {} ms; the process group was killed",
                            action.timeout.as_millis()
                        ),
                        None,
                    )),
                ),
                Ok(o) => {
                    let result = json!({
                        "exit_code": o.exit_code,
                        "stdout": o.stdout,
                        "stderr": o.stderr,
                        "truncated": o.truncated,
                    });
                    if o.exit_code == Some(0) {
                        ok(&id, result)
                    } else {
                        reply(
                            Some(&id),
                            "error",
                            Err((format!("exited with {:?}", o.exit_code), Some(result))),
                        )
                    }
                }
                Err(e) => error(Some(&id), e),
            };
            info!(command = %id, action = %action.name, "Action finished.");
            sh.finish(&id, text).await;
        });
    }
}
