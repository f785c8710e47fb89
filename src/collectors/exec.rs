//! The exec collector: runs a program every `interval_ms` and parses its standard output with
//! the shared [`parse`](super::parse) formats (one reading per line), e.g. `mmcli -J` for the
//! modem's signal or a vendor tool that prints `key=value`.
//!
//! Invariants:
//! - **No shell, no inherited environment.** `command` is an absolute path run with the fixed
//!   `args`; the environment holds only `PATH` (ferry's, or a default) and the `env` listed in
//!   the config. Standard input is `/dev/null`.
//! - **Every run ends.** The program runs in its own process group; after `timeout_ms` the
//!   whole group is killed with SIGKILL (a grandchild the script left behind too) and the
//!   child is reaped. A run whose program exited is also followed by a SIGKILL to its group,
//!   so a background process cannot outlive the run.
//! - **Bounded memory.** At most `max_output_bytes` of standard output and
//!   [`STDERR_KEEP_BYTES`] of standard error are kept; the rest is read and discarded (so the
//!   program is not blocked on a full pipe) and reported.
//! - **A failed run is a loss record, never the end of the collector.** A non-zero exit (or a
//!   signal), a timeout, output over the cap and unparsable lines are each reported on
//!   `ferry.loss` with their reason and a sample (the first bytes of standard error, or of the
//!   line); the schedule continues. A program that cannot be started at all is reported the
//!   same way (reason `failed`), since it may be installed later.
//! - **No overlap.** A tick that comes while the previous run is still going is skipped and
//!   counted; the count is reported (reason `skipped`) with the next run's readings.

use super::common::{LossReason, LossTally, Tags, validate_tags};
use super::lines::LineSplitter;
use super::parse::{self, FormatConfig, LineDecoder, Parser};
use super::{Collector, CollectorContext, CollectorError, CollectorSpec, RunFuture};
use crate::issue::Issue;
use crate::spool::Intake;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::task::JoinHandle;

/// Bytes of standard error kept for the loss report's sample.
pub const STDERR_KEEP_BYTES: usize = 256;
/// Shortest interval accepted.
pub const MIN_INTERVAL_MS: u64 = 100;
/// Largest `max_output_bytes` accepted.
pub const MAX_MAX_OUTPUT_BYTES: u64 = 16 << 20;
/// `PATH` given to the program when ferry itself has none.
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// How long the pipes may stay open after the process group was killed.
const PIPE_GRACE: Duration = Duration::from_secs(1);
/// Read buffer for the program's pipes.
const READ_BUFFER_BYTES: usize = 8192;

fn yes() -> bool {
    true
}
fn default_interval_ms() -> u64 {
    60_000
}
fn default_timeout_ms() -> u64 {
    10_000
}
fn default_max_output_bytes() -> u64 {
    1 << 20
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecConfig {
    pub name: String,
    #[serde(default = "yes")]
    pub enabled: bool,
    #[serde(default)]
    pub tags: Tags,
    /// Absolute path of the program; no shell is involved.
    pub command: String,
    /// Fixed arguments.
    #[serde(default)]
    pub args: Vec<String>,
    /// Environment variables given to the program besides `PATH`.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default = "default_interval_ms")]
    pub interval_ms: u64,
    /// The whole process group is killed after this long.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Standard output kept per run; the excess is discarded and reported.
    #[serde(default = "default_max_output_bytes")]
    pub max_output_bytes: u64,
    #[serde(default = "parse::default_max_line_bytes")]
    pub max_line_bytes: u64,
    #[serde(default)]
    pub format: FormatConfig,
    #[serde(default)]
    pub deadband: Option<super::deadband::DeadbandConfig>,
}

impl CollectorSpec for ExecConfig {
    fn name(&self) -> &str {
        &self.name
    }

    fn enabled(&self) -> bool {
        self.enabled
    }

    fn validate(&self) -> Vec<Issue> {
        let mut issues = validate_tags(&self.tags);
        if !self.command.starts_with('/') {
            issues.push(Issue::new(
                "command",
                format!(
                    "must be an absolute path (no shell is used), got {:?}",
                    self.command
                ),
            ));
        }
        for k in self.env.keys() {
            if k.is_empty() || k.contains('=') || k.contains('\0') || k == "PATH" {
                issues.push(Issue::new(
                    format!("env.{k}"),
                    "must be a variable name without `=` (PATH is always ferry's own)",
                ));
            }
        }
        let range = |issues: &mut Vec<Issue>, key: &str, v: u64, lo: u64, hi: u64| {
            if !(lo..=hi).contains(&v) {
                issues.push(Issue::new(
                    key,
                    format!("must be between {lo} and {hi}, got {v}"),
                ));
            }
        };
        range(
            &mut issues,
            "interval_ms",
            self.interval_ms,
            MIN_INTERVAL_MS,
            86_400_000,
        );
        range(&mut issues, "timeout_ms", self.timeout_ms, 10, 3_600_000);
        range(
            &mut issues,
            "max_output_bytes",
            self.max_output_bytes,
            16,
            MAX_MAX_OUTPUT_BYTES,
        );
        range(
            &mut issues,
            "max_line_bytes",
            self.max_line_bytes,
            16,
            parse::MAX_MAX_LINE_BYTES,
        );
        issues.extend(parse::format_issues(&self.format));
        issues
    }

    fn build(&self) -> Box<dyn Collector> {
        Box::new(ExecCollector {
            config: self.clone(),
        })
    }

    fn deadband(&self) -> Option<&super::deadband::DeadbandConfig> {
        self.deadband.as_ref()
    }

    fn set_interval_ms(&mut self, interval_ms: u64) -> bool {
        self.interval_ms = interval_ms;
        true
    }
}

pub struct ExecCollector {
    config: ExecConfig,
}

impl Collector for ExecCollector {
    fn run(self: Box<Self>, ctx: CollectorContext) -> RunFuture {
        Box::pin(run(self.config, ctx))
    }
}

async fn run(config: ExecConfig, ctx: CollectorContext) -> Result<(), CollectorError> {
    let parser = Parser::new(&config.format)
        .map_err(|_| CollectorError::Source("invalid format (not validated?)".into()))?;
    let config = std::sync::Arc::new(config);
    let mut ticker = tokio::time::interval(Duration::from_millis(config.interval_ms));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut running: Option<JoinHandle<Result<(), CollectorError>>> = None;
    let mut skipped = 0u64;
    loop {
        tokio::select! {
            _ = ctx.shutdown.cancelled() => break,
            _ = ticker.tick() => {}
            _ = ctx.sample_now.notified() => {}
        }
        if let Some(handle) = &running {
            if !handle.is_finished() {
                skipped += 1;
                tracing::debug!(collector = %ctx.name, "Previous run still going; tick skipped.");
                continue;
            }
            if let Some(handle) = running.take() {
                join(handle).await?;
            }
        }
        let (config, ctx2, parser) = (config.clone(), ctx.clone(), parser.clone());
        let skipped_now = std::mem::take(&mut skipped);
        running = Some(tokio::spawn(async move {
            let intake = run_once(&config, &ctx2.name, parser, skipped_now).await;
            ctx2.send(intake).await
        }));
    }
    // Shutdown: a run in progress is killed by its own timeout or by dropping its child
    // (kill_on_drop); wait for it so what it read is handed over.
    if let Some(handle) = running {
        handle.abort();
        let _ = handle.await;
    }
    Ok(())
}

async fn join(handle: JoinHandle<Result<(), CollectorError>>) -> Result<(), CollectorError> {
    handle
        .await
        .map_err(|e| CollectorError::Source(format!("an exec run panicked: {e}")))?
}

/// What one run of the program gave.
#[derive(Debug, Default)]
struct Output {
    stdout: Vec<u8>,
    /// Standard output bytes past `max_output_bytes`, read and discarded.
    stdout_excess: u64,
    stderr: Vec<u8>,
    /// `None` when the run timed out.
    status: Option<std::process::ExitStatus>,
}

/// Runs the program once and turns what it gave into one intake (readings and loss records).
async fn run_once(config: &ExecConfig, stream: &str, parser: Parser, skipped: u64) -> Intake {
    let mut losses = LossTally::default();
    for _ in 0..skipped {
        losses.note(LossReason::Skipped, b"the previous run was still going");
    }
    let mut readings = Vec::new();
    let mut decoder = LineDecoder::new(stream, parser, config.tags.clone());
    match execute(config).await {
        Err(e) => {
            tracing::warn!(collector = %stream, error = %e, "Cannot start the program.");
            losses.note(LossReason::Failed, e.to_string().as_bytes());
        }
        Ok(out) => {
            let stderr_sample = |prefix: String| {
                let mut s = prefix.into_bytes();
                if !out.stderr.is_empty() {
                    s.extend_from_slice(b": ");
                    s.extend_from_slice(&out.stderr);
                }
                s
            };
            match out.status {
                None => losses.note(
                    LossReason::Timeout,
                    &stderr_sample(format!("killed after {} ms", config.timeout_ms)),
                ),
                Some(status) if !status.success() => {
                    losses.note(LossReason::Failed, &stderr_sample(status.to_string()))
                }
                Some(_) => {
                    if out.stdout_excess > 0 {
                        losses.note(
                            LossReason::Truncated,
                            format!(
                                "{} bytes over max_output_bytes {}",
                                out.stdout_excess, config.max_output_bytes
                            )
                            .as_bytes(),
                        );
                    }
                    let mut splitter = LineSplitter::new(b'\n', config.max_line_bytes as usize);
                    let mut frames = Vec::new();
                    splitter.push(&out.stdout, &mut frames);
                    // A last line without its newline is complete once the program exited,
                    // unless the output was cut at the cap.
                    if out.stdout_excess == 0 && splitter.pending_bytes() > 0 {
                        splitter.push(b"\n", &mut frames);
                    }
                    for frame in frames {
                        decoder.decode(frame, &mut readings);
                    }
                }
            }
        }
    }
    decoder.finish(&mut readings);
    losses.drain_into(stream, &mut readings);
    Intake {
        readings,
        ..Intake::default()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("cannot start {command}: {source}")]
    Spawn {
        command: String,
        source: std::io::Error,
    },
}

/// Spawns the program in its own process group and collects its output, killing the group at
/// the timeout.
async fn execute(config: &ExecConfig) -> Result<Output, ExecError> {
    let path = std::env::var_os("PATH").unwrap_or_else(|| DEFAULT_PATH.into());
    let mut child = tokio::process::Command::new(&config.command)
        .args(&config.args)
        .env_clear()
        .env("PATH", path)
        .envs(&config.env)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| ExecError::Spawn {
            command: config.command.clone(),
            source,
        })?;
    // Dropped at the end of the run in every case (also when the run is aborted at shutdown):
    // after a timeout it kills the run itself, after an exit whatever the program left running
    // in the background.
    let group = child
        .id()
        .map(|id| GroupKill(nix::unistd::Pid::from_raw(id as i32)));
    let max_out = config.max_output_bytes as usize;
    let stdout = tokio::spawn(read_capped(child.stdout.take(), max_out));
    let stderr = tokio::spawn(read_capped(child.stderr.take(), STDERR_KEEP_BYTES));
    let timeout = Duration::from_millis(config.timeout_ms);
    let status = match tokio::time::timeout(timeout, child.wait()).await {
        Ok(status) => status.ok(),
        Err(_) => None,
    };
    drop(group);
    let _ = child.wait().await;
    // The pipes end once every process holding them is gone, which the group kill ensured
    // unless one left the group (setsid); then its output is abandoned after a grace period.
    let collect = |task: JoinHandle<(Vec<u8>, u64)>| async move {
        let abort = task.abort_handle();
        match tokio::time::timeout(PIPE_GRACE, task).await {
            Ok(Ok(out)) => out,
            _ => {
                abort.abort();
                (Vec::new(), 0)
            }
        }
    };
    let (stdout, stdout_excess) = collect(stdout).await;
    let (stderr, _) = collect(stderr).await;
    Ok(Output {
        stdout,
        stdout_excess,
        stderr,
        status,
    })
}

/// Kills a process group with SIGKILL when dropped.
struct GroupKill(nix::unistd::Pid);

impl Drop for GroupKill {
    fn drop(&mut self) {
        let _ = nix::sys::signal::killpg(self.0, nix::sys::signal::Signal::SIGKILL);
    }
}

/// Reads `pipe` to its end, keeping the first `cap` bytes; returns them and how many more
/// there were.
async fn read_capped(pipe: Option<impl AsyncRead + Unpin>, cap: usize) -> (Vec<u8>, u64) {
    let Some(mut pipe) = pipe else {
        return (Vec::new(), 0);
    };
    let mut kept = Vec::new();
    let mut excess = 0u64;
    let mut buf = vec![0u8; READ_BUFFER_BYTES];
    loop {
        match pipe.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let room = cap.saturating_sub(kept.len()).min(n);
                kept.extend_from_slice(&buf[..room]);
                excess += (n - room) as u64;
            }
        }
    }
    (kept, excess)
}

#[cfg(test)]
mod tests;
