//! The listen collector: a local push input for applications on the gateway. They connect to a
//! unix socket (and optionally a TCP port on 127.0.0.1) and write newline-delimited JSON
//! objects or InfluxDB line protocol; each line becomes one reading of this collector's stream.
//!
//! # Protocol
//!
//! The client writes lines; ferry answers every input line exactly once, in input order, with
//! answer lines that each cover `n` consecutive input lines:
//!
//! - `ok <n>`: the next `n` lines are durable in the spool (committed and flushed; they survive
//!   SIGKILL and power loss).
//! - `error <n> <reason>`: the next `n` lines were refused (malformed, over `max_line_bytes`);
//!   resending them unchanged will not help.
//! - `retry <n> <reason>`: the next `n` lines were not stored (the spool is full under
//!   `drop_newest`, the disk is full, ferry is shutting down); resend them later.
//!
//! A client that resends whatever was not confirmed by `ok` loses nothing (it may duplicate,
//! if ferry died between the commit and the answer).
//!
//! Invariants:
//! - **Answered only after durable.** The good lines of one read are handed to the spool as one
//!   intake with a receipt ([`Intake::with_receipt`]); the answer is written only when the
//!   receipt arrived. The receipt is `false` if any reading of the commit was not stored.
//! - **Clients are independent.** Each connection is its own task; a slow, silent or dead
//!   client stalls only itself. An answer that cannot be written in [`WRITE_TIMEOUT`] ends that
//!   connection. At most `max_clients` connections at once; one more is told `retry 0 too
//!   many clients` and closed.
//! - **Bounded memory.** Per client: one read buffer and at most `max_line_bytes` of a pending
//!   line; a longer line is refused (`error 1`) and skipped up to its newline.
//! - Refused lines are also counted on `ferry.loss` (at most one record per reason per
//!   [`LOSS_REPORT_WINDOW`]), so an operator sees a misbehaving application.
//! - The unix socket is created fresh at start (a stale socket file is replaced, any other file
//!   at that path is an error), with `socket_mode` and, if set, `socket_group`.

use super::common::{LossReason, LossTally, Tags, tag_body, validate_tags};
use super::lines::{Frame, LineSplitter};
use super::parse::{self, FormatConfig, FormatKind, Parser};
use super::{Collector, CollectorContext, CollectorError, CollectorSpec, RunFuture};
use crate::clock::now_ms;
use crate::issue::Issue;
use crate::record::Reading;
use crate::spool::Intake;
use serde::Deserialize;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{Mutex, Semaphore};
use tokio_util::task::TaskTracker;

/// Bytes read from one client at once; the lines of one read are one commit.
const READ_BUFFER_BYTES: usize = 16 << 10;
/// An answer that cannot be written this long ends the connection.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// Refused lines are reported on `ferry.loss` at most this often per reason.
pub const LOSS_REPORT_WINDOW: Duration = Duration::from_secs(5);
/// How long stopping waits for clients whose lines are being committed.
const STOP_GRACE: Duration = Duration::from_secs(10);

fn yes() -> bool {
    true
}
fn default_socket_mode() -> String {
    "0660".into()
}
fn default_max_clients() -> usize {
    64
}
fn default_format() -> ListenFormat {
    ListenFormat::Json
}

/// What the clients write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ListenFormat {
    /// One JSON object per line (nested objects flattened, as the `json` line format).
    Json,
    /// InfluxDB line protocol (as the `influx` line format).
    Influx,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenConfig {
    pub name: String,
    #[serde(default = "yes")]
    pub enabled: bool,
    #[serde(default)]
    pub tags: Tags,
    /// Absolute path of the unix socket.
    pub socket: String,
    /// Permission bits of the socket, in octal.
    #[serde(default = "default_socket_mode")]
    pub socket_mode: String,
    /// Group owning the socket (ferry's user must be a member).
    #[serde(default)]
    pub socket_group: Option<String>,
    /// Also listen on 127.0.0.1 at this TCP port.
    #[serde(default)]
    pub tcp_port: Option<u16>,
    #[serde(default = "default_format")]
    pub format: ListenFormat,
    #[serde(default = "parse::default_max_line_bytes")]
    pub max_line_bytes: u64,
    #[serde(default = "default_max_clients")]
    pub max_clients: usize,
    #[serde(default)]
    pub deadband: Option<super::deadband::DeadbandConfig>,
}

fn parse_mode(mode: &str) -> Option<u32> {
    let digits = mode.strip_prefix("0o").unwrap_or(mode);
    u32::from_str_radix(digits, 8).ok().filter(|m| *m <= 0o777)
}

impl ListenConfig {
    fn parser(&self) -> Parser {
        let kind = match self.format {
            ListenFormat::Json => FormatKind::Json,
            ListenFormat::Influx => FormatKind::Influx,
        };
        Parser::new(&FormatConfig {
            kind,
            ..FormatConfig::default()
        })
        .expect("json and influx take no options")
    }
}

impl CollectorSpec for ListenConfig {
    fn name(&self) -> &str {
        &self.name
    }

    fn enabled(&self) -> bool {
        self.enabled
    }

    fn validate(&self) -> Vec<Issue> {
        let mut issues = validate_tags(&self.tags);
        if !self.socket.starts_with('/') || self.socket.len() > 100 {
            issues.push(Issue::new(
                "socket",
                format!(
                    "must be an absolute path of at most 100 bytes, got {:?}",
                    self.socket
                ),
            ));
        }
        if parse_mode(&self.socket_mode).is_none() {
            issues.push(Issue::new(
                "socket_mode",
                format!(
                    "must be octal permission bits such as \"0660\", got {:?}",
                    self.socket_mode
                ),
            ));
        }
        if self.tcp_port == Some(0) {
            issues.push(Issue::new("tcp_port", "must be between 1 and 65535"));
        }
        if !(16..=parse::MAX_MAX_LINE_BYTES).contains(&self.max_line_bytes) {
            issues.push(Issue::new(
                "max_line_bytes",
                format!(
                    "must be between 16 and {}, got {}",
                    parse::MAX_MAX_LINE_BYTES,
                    self.max_line_bytes
                ),
            ));
        }
        if !(1..=4096).contains(&self.max_clients) {
            issues.push(Issue::new(
                "max_clients",
                format!("must be between 1 and 4096, got {}", self.max_clients),
            ));
        }
        issues
    }

    fn build(&self) -> Box<dyn Collector> {
        Box::new(ListenCollector {
            config: self.clone(),
        })
    }

    fn deadband(&self) -> Option<&super::deadband::DeadbandConfig> {
        self.deadband.as_ref()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error("cannot listen on {path}: {source}")]
    Bind {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} exists and is not a socket; refusing to replace it")]
    NotASocket { path: String },
    #[error("cannot set owner group {group:?} of {path}: {reason}")]
    Group {
        path: String,
        group: String,
        reason: String,
    },
}

impl From<ListenError> for CollectorError {
    fn from(e: ListenError) -> CollectorError {
        CollectorError::Source(e.to_string())
    }
}

pub struct ListenCollector {
    config: ListenConfig,
}

impl Collector for ListenCollector {
    fn run(self: Box<Self>, ctx: CollectorContext) -> RunFuture {
        Box::pin(run(self.config, ctx))
    }
}

/// Creates the unix socket with its mode and group.
fn bind_unix(config: &ListenConfig) -> Result<UnixListener, ListenError> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let path = config.socket.clone();
    match std::fs::symlink_metadata(&path) {
        Ok(m) if m.file_type().is_socket() => {
            let _ = std::fs::remove_file(&path);
        }
        Ok(_) => return Err(ListenError::NotASocket { path }),
        Err(_) => {}
    }
    let listener = UnixListener::bind(&path).map_err(|source| ListenError::Bind {
        path: path.clone(),
        source,
    })?;
    let mode = parse_mode(&config.socket_mode).unwrap_or(0o660);
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).map_err(|source| {
        ListenError::Bind {
            path: path.clone(),
            source,
        }
    })?;
    if let Some(group) = &config.socket_group {
        let err = |reason: String| ListenError::Group {
            path: path.clone(),
            group: group.clone(),
            reason,
        };
        let gid = nix::unistd::Group::from_name(group)
            .map_err(|e| err(e.to_string()))?
            .ok_or_else(|| err("no such group".into()))?
            .gid;
        nix::unistd::chown(path.as_str(), None, Some(gid)).map_err(|e| err(e.to_string()))?;
    }
    Ok(listener)
}

/// What the client tasks share.
struct Shared {
    ctx: CollectorContext,
    parser: Parser,
    tags: Tags,
    max_line_bytes: usize,
    losses: Mutex<LossTally>,
}

async fn run(config: ListenConfig, ctx: CollectorContext) -> Result<(), CollectorError> {
    let unix = bind_unix(&config)?;
    let tcp = match config.tcp_port {
        Some(port) => Some(
            TcpListener::bind(("127.0.0.1", port))
                .await
                .map_err(|source| ListenError::Bind {
                    path: format!("127.0.0.1:{port}"),
                    source,
                })?,
        ),
        None => None,
    };
    tracing::info!(collector = %ctx.name, socket = %config.socket, tcp_port = ?config.tcp_port, "Listening for pushed readings.");
    let shared = Arc::new(Shared {
        ctx: ctx.clone(),
        parser: config.parser(),
        tags: config.tags.clone(),
        max_line_bytes: config.max_line_bytes as usize,
        losses: Mutex::new(LossTally::default()),
    });
    let slots = Arc::new(Semaphore::new(config.max_clients));
    let clients = TaskTracker::new();
    loop {
        let tcp_accept = async {
            match &tcp {
                Some(l) => l.accept().await.map(|(s, _)| s),
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = ctx.shutdown.cancelled() => break,
            accepted = unix.accept() => match accepted {
                Ok((stream, _)) => admit(&clients, &slots, &shared, stream),
                Err(e) => tracing::warn!(collector = %ctx.name, error = %e, "Accept failed."),
            },
            accepted = tcp_accept => match accepted {
                Ok(stream) => admit(&clients, &slots, &shared, stream),
                Err(e) => tracing::warn!(collector = %ctx.name, error = %e, "Accept failed."),
            },
        }
    }
    drop(unix);
    let _ = std::fs::remove_file(&config.socket);
    clients.close();
    if tokio::time::timeout(STOP_GRACE, clients.wait())
        .await
        .is_err()
    {
        tracing::warn!(collector = %ctx.name, "Clients still busy at shutdown; their unanswered lines must be resent.");
    }
    let mut out = Vec::new();
    shared.losses.lock().await.drain_into(&ctx.name, &mut out);
    if !out.is_empty() {
        ctx.send(Intake {
            readings: out,
            ..Intake::default()
        })
        .await?;
    }
    Ok(())
}

fn admit<S>(clients: &TaskTracker, slots: &Arc<Semaphore>, shared: &Arc<Shared>, mut stream: S)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let shared = shared.clone();
    match slots.clone().try_acquire_owned() {
        Ok(permit) => {
            clients.spawn(async move {
                if let Err(e) = serve(&shared, stream).await {
                    tracing::debug!(collector = %shared.ctx.name, error = %e, "Client connection ended.");
                }
                drop(permit);
            });
        }
        Err(_) => {
            clients.spawn(async move {
                let _ = tokio::time::timeout(
                    WRITE_TIMEOUT,
                    stream.write_all(b"retry 0 too many clients\n"),
                )
                .await;
            });
        }
    }
}

/// One answer line covering `n` consecutive input lines.
#[derive(Debug, Clone, PartialEq)]
enum Answer {
    /// Good lines, stored or not depending on the receipt.
    Good(usize),
    Error(usize, String),
}

fn push_answer(answers: &mut Vec<Answer>, a: Answer) {
    match (answers.last_mut(), &a) {
        (Some(Answer::Good(n)), Answer::Good(m)) => *n += m,
        (Some(Answer::Error(n, r)), Answer::Error(m, s)) if r == s => *n += m,
        _ => answers.push(a),
    }
}

/// Serves one client until it closes, fails, or ferry shuts down.
async fn serve<S>(shared: &Shared, stream: S) -> std::io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (mut reader, mut writer) = tokio::io::split(stream);
    let mut splitter = LineSplitter::new(b'\n', shared.max_line_bytes);
    let mut buf = vec![0u8; READ_BUFFER_BYTES];
    let mut frames = Vec::new();
    loop {
        let n = tokio::select! {
            _ = shared.ctx.shutdown.cancelled() => {
                let _ = write_answer(&mut writer, b"retry 0 shutting down\n").await;
                return Ok(());
            }
            n = reader.read(&mut buf) => n?,
        };
        if n == 0 {
            return Ok(());
        }
        frames.clear();
        splitter.push(&buf[..n], &mut frames);
        if frames.is_empty() {
            continue;
        }
        let (readings, answers) = decode(shared, std::mem::take(&mut frames)).await;
        let stored = if readings.is_empty() {
            Ok(true)
        } else if shared.ctx.shutdown.is_cancelled() {
            Err("shutting down")
        } else {
            commit(shared, readings).await
        };
        let mut text = String::new();
        for a in answers {
            match (a, &stored) {
                (Answer::Good(n), Ok(true)) => text += &format!("ok {n}\n"),
                (Answer::Good(n), Ok(false)) => {
                    text += &format!("retry {n} not stored: spool full or failing\n")
                }
                (Answer::Good(n), Err(why)) => text += &format!("retry {n} {why}\n"),
                (Answer::Error(n, reason), _) => text += &format!("error {n} {reason}\n"),
            }
        }
        write_answer(&mut writer, text.as_bytes()).await?;
        if stored.is_err() {
            return Ok(());
        }
    }
}

/// Parses the frames of one read: readings to store and the answers in input order.
async fn decode(shared: &Shared, frames: Vec<Frame>) -> (Vec<Reading>, Vec<Answer>) {
    let mut readings = Vec::new();
    let mut answers = Vec::new();
    let mut losses = shared.losses.lock().await;
    for frame in frames {
        match frame {
            Frame::Line(line) if line.is_empty() => {}
            Frame::Line(line) => match shared.parser.parse(&line) {
                Ok(body) => {
                    readings.push(Reading {
                        stream: shared.ctx.name.clone(),
                        ts_ms: now_ms(),
                        body: tag_body(body, &shared.tags),
                    });
                    push_answer(&mut answers, Answer::Good(1));
                }
                Err(e) => {
                    losses.note(LossReason::Malformed, &line);
                    let reason = e.to_string().replace('\n', " ");
                    push_answer(
                        &mut answers,
                        Answer::Error(1, format!("malformed: {reason}")),
                    );
                }
            },
            Frame::Oversized(sample) => {
                losses.note(LossReason::Oversized, &sample);
                push_answer(
                    &mut answers,
                    Answer::Error(
                        1,
                        format!("line over max_line_bytes {}", shared.max_line_bytes),
                    ),
                );
            }
        }
    }
    losses.drain_due(&shared.ctx.name, &mut readings, LOSS_REPORT_WINDOW);
    (readings, answers)
}

/// Hands `readings` to the spool and waits until they are durable (`Ok(true)`), or not stored
/// (`Ok(false)`).
async fn commit(shared: &Shared, readings: Vec<Reading>) -> Result<bool, &'static str> {
    let (intake, receipt) = Intake::with_receipt(readings, None);
    shared.ctx.send(intake).await.map_err(|_| "shutting down")?;
    Ok(receipt.await.unwrap_or(false))
}

async fn write_answer<W: AsyncWrite + Unpin>(writer: &mut W, text: &[u8]) -> std::io::Result<()> {
    tokio::time::timeout(WRITE_TIMEOUT, writer.write_all(text))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "answer not taken"))?
}

#[cfg(test)]
mod tests;
