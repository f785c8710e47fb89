//! The file collector, in one of two modes:
//!
//! - [`tail`]: follows one growing file like `tail -F` (application logs), and a rotated one
//!   until its writer is done with it; parses each line with the configured
//!   [`parse`](super::parse) format, and commits its position with the lines read up to it,
//!   so a crash neither loses nor repeats a line.
//! - [`poll`]: reads small files every interval (sysfs sensors, 1-wire `w1_slave`), each
//!   matched file one numeric field of one reading.
//!
//! Both keep their keys in one [`FileConfig`]; keys of the other mode are rejected by
//! validation, so a `scale:` on a tailed file is an error rather than silently ignored.

pub mod poll;
pub mod tail;

use super::common::{Tags, validate_tags};
use super::parse::{self, FormatConfig};
use super::{Collector, CollectorContext, CollectorError, CollectorSpec, RunFuture};
use crate::issue::Issue;
use serde::Deserialize;

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FileMode {
    #[default]
    Tail,
    Poll,
}

/// Where tail mode starts in a file it has no stored position for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StartAt {
    /// Only lines written from now on (what was already in the file is history).
    #[default]
    End,
    /// Everything already in the file.
    Beginning,
}

/// Tail mode defaults.
pub const DEFAULT_POLL_INTERVAL_MS: u64 = 250;
pub const DEFAULT_BATCH_LINES: u64 = 500;
/// How long a rotated file is read after it was last written to (like Fluent Bit's
/// `Rotate_Wait`): covers an application that reopens its log a moment after the rename.
pub const DEFAULT_ROTATE_WAIT_MS: u64 = 5_000;
/// Longest accepted `rotate_wait_ms`: a writer that keeps a rotated file for longer than this
/// is not reopening it on rotation at all.
pub const MAX_ROTATE_WAIT_MS: u64 = 600_000;
/// Poll mode default.
pub const DEFAULT_INTERVAL_MS: u64 = 10_000;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub name: String,
    #[serde(default = "yes")]
    pub enabled: bool,
    #[serde(default)]
    pub tags: Tags,
    #[serde(default)]
    pub mode: FileMode,

    // tail
    /// The file to follow (absolute).
    #[serde(default)]
    pub path: Option<String>,
    #[serde(default)]
    pub start_at: Option<StartAt>,
    #[serde(default)]
    pub poll_interval_ms: Option<u64>,
    #[serde(default)]
    pub batch_lines: Option<u64>,
    #[serde(default)]
    pub max_line_bytes: Option<u64>,
    #[serde(default)]
    pub format: Option<FormatConfig>,
    /// How long a rotated file must be idle before it is left (see [`tail`]).
    #[serde(default)]
    pub rotate_wait_ms: Option<u64>,

    // poll
    /// Glob patterns of the files to read (absolute).
    #[serde(default)]
    pub paths: Option<Vec<String>>,
    #[serde(default)]
    pub interval_ms: Option<u64>,
    /// Each value is multiplied by this (e.g. 0.001 for millidegrees).
    #[serde(default)]
    pub scale: Option<f64>,

    // both
    /// Report-on-change thresholds and heartbeat (see [`deadband`](crate::collectors::deadband)).
    #[serde(default)]
    pub deadband: Option<crate::collectors::deadband::DeadbandConfig>,
}

impl FileConfig {
    pub fn poll_interval_ms(&self) -> u64 {
        self.poll_interval_ms.unwrap_or(DEFAULT_POLL_INTERVAL_MS)
    }
    pub fn batch_lines(&self) -> u64 {
        self.batch_lines.unwrap_or(DEFAULT_BATCH_LINES)
    }
    pub fn max_line_bytes(&self) -> u64 {
        self.max_line_bytes.unwrap_or(parse::DEFAULT_MAX_LINE_BYTES)
    }
    pub fn rotate_wait_ms(&self) -> u64 {
        self.rotate_wait_ms.unwrap_or(DEFAULT_ROTATE_WAIT_MS)
    }
    pub fn interval_ms(&self) -> u64 {
        self.interval_ms.unwrap_or(DEFAULT_INTERVAL_MS)
    }
}

fn range(issues: &mut Vec<Issue>, key: &str, v: Option<u64>, min: u64, max: u64) {
    if let Some(v) = v
        && !(min..=max).contains(&v)
    {
        issues.push(Issue::new(
            key,
            format!("must be between {min} and {max}, got {v}"),
        ));
    }
}

impl CollectorSpec for FileConfig {
    fn name(&self) -> &str {
        &self.name
    }

    fn enabled(&self) -> bool {
        self.enabled
    }

    fn validate(&self) -> Vec<Issue> {
        let mut issues = validate_tags(&self.tags);
        let mut not_here = |key: &str, set: bool, mode: &str| {
            if set {
                issues.push(Issue::new(key, format!("is only used with mode: {mode}")));
            }
        };
        match self.mode {
            FileMode::Tail => {
                not_here("paths", self.paths.is_some(), "poll");
                not_here("interval_ms", self.interval_ms.is_some(), "poll");
                not_here("scale", self.scale.is_some(), "poll");
            }
            FileMode::Poll => {
                not_here("path", self.path.is_some(), "tail");
                not_here("start_at", self.start_at.is_some(), "tail");
                not_here("poll_interval_ms", self.poll_interval_ms.is_some(), "tail");
                not_here("batch_lines", self.batch_lines.is_some(), "tail");
                not_here("max_line_bytes", self.max_line_bytes.is_some(), "tail");
                not_here("format", self.format.is_some(), "tail");
                not_here("rotate_wait_ms", self.rotate_wait_ms.is_some(), "tail");
            }
        }
        match self.mode {
            FileMode::Tail => {
                match &self.path {
                    None => issues.push(Issue::new(
                        "path",
                        "is required with mode: tail (the file to follow)",
                    )),
                    Some(p) if !p.starts_with('/') => issues.push(Issue::new(
                        "path",
                        format!("must be an absolute path, got {p:?}"),
                    )),
                    Some(p) if p.ends_with('/') => issues.push(Issue::new(
                        "path",
                        format!("must name a file, not a directory: {p:?}"),
                    )),
                    Some(_) => {}
                }
                range(
                    &mut issues,
                    "poll_interval_ms",
                    self.poll_interval_ms,
                    10,
                    60_000,
                );
                range(&mut issues, "batch_lines", self.batch_lines, 1, 100_000);
                range(
                    &mut issues,
                    "rotate_wait_ms",
                    self.rotate_wait_ms,
                    0,
                    MAX_ROTATE_WAIT_MS,
                );
                range(
                    &mut issues,
                    "max_line_bytes",
                    self.max_line_bytes,
                    16,
                    parse::MAX_MAX_LINE_BYTES,
                );
                issues.extend(parse::format_issues(
                    &self.format.clone().unwrap_or_default(),
                ));
            }
            FileMode::Poll => {
                match &self.paths {
                    None => issues.push(Issue::new(
                        "paths",
                        "is required with mode: poll (glob patterns of the files to read)",
                    )),
                    Some(p) if p.is_empty() => {
                        issues.push(Issue::new("paths", "must list at least one pattern"))
                    }
                    Some(patterns) => {
                        for (i, p) in patterns.iter().enumerate() {
                            if !p.starts_with('/') {
                                issues.push(Issue::new(
                                    format!("paths[{i}]"),
                                    format!("must be an absolute path or pattern, got {p:?}"),
                                ));
                            } else if let Err(e) = glob::Pattern::new(p) {
                                issues.push(Issue::new(
                                    format!("paths[{i}]"),
                                    format!("is not a valid glob pattern: {e}"),
                                ));
                            }
                        }
                    }
                }
                range(
                    &mut issues,
                    "interval_ms",
                    self.interval_ms,
                    100,
                    86_400_000,
                );
                if let Some(s) = self.scale
                    && (!s.is_finite() || s == 0.0)
                {
                    issues.push(Issue::new(
                        "scale",
                        format!("must be a finite number other than 0, got {s}"),
                    ));
                }
            }
        }
        issues
    }

    /// Poll mode's `interval_ms`; tail mode has no sampling interval.
    fn set_interval_ms(&mut self, interval_ms: u64) -> bool {
        if self.mode != FileMode::Poll {
            return false;
        }
        self.interval_ms = Some(interval_ms);
        true
    }

    fn build(&self) -> Box<dyn Collector> {
        Box::new(FileCollector {
            config: self.clone(),
        })
    }

    fn deadband(&self) -> Option<&crate::collectors::deadband::DeadbandConfig> {
        self.deadband.as_ref()
    }
}

pub struct FileCollector {
    config: FileConfig,
}

impl Collector for FileCollector {
    fn run(self: Box<Self>, ctx: CollectorContext) -> RunFuture {
        let config = self.config;
        Box::pin(async move {
            match config.mode {
                FileMode::Tail => tail::run(config, ctx).await,
                FileMode::Poll => poll::run(config, ctx).await,
            }
        })
    }
}

/// A file collector error, with the path it concerns.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("cannot open {path}: {source}")]
    Open {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("invalid config: {0}")]
    Config(String),
    #[error(
        "the stored position of {0} is unreadable; delete the spool's position or rename the collector"
    )]
    Position(String),
    #[error("the file reader panicked: {0}")]
    Panicked(String),
}

impl From<FileError> for CollectorError {
    fn from(e: FileError) -> CollectorError {
        CollectorError::Source(e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn issues(yaml: &str) -> Vec<String> {
        let c: FileConfig = serde_yaml::from_str(yaml).unwrap();
        c.validate()
            .into_iter()
            .map(|i| format!("{}: {}", i.path, i.message))
            .collect()
    }

    #[test]
    fn tail_and_poll_keys_are_checked_per_mode() {
        assert!(issues("name: log\npath: /var/log/app.log\n").is_empty());
        assert!(issues("name: t\nmode: poll\npaths: ['/sys/class/thermal/thermal_zone*/temp']\nscale: 0.001\n").is_empty());
        assert_eq!(
            issues("name: log\npath: app.log\nscale: 2\npoll_interval_ms: 0\n"),
            vec![
                "scale: is only used with mode: poll",
                "path: must be an absolute path, got \"app.log\"",
                "poll_interval_ms: must be between 10 and 60000, got 0",
            ]
        );
        assert_eq!(
            issues(
                "name: t\nmode: poll\npaths: ['/sys/[x', 'rel/*']\nformat: {type: json}\nscale: 0\n"
            ),
            vec![
                "format: is only used with mode: tail",
                "paths[0]: is not a valid glob pattern: Pattern syntax error near position 5: invalid range pattern",
                "paths[1]: must be an absolute path or pattern, got \"rel/*\"",
                "scale: must be a finite number other than 0, got 0",
            ]
        );
        assert_eq!(
            issues("name: log\npath: /x\nformat: {type: regex, pattern: '('}\n"),
            vec!["format.pattern: does not compile: unclosed group"]
        );
        assert_eq!(
            issues("name: log\npath: /x\nrotate_wait_ms: 600001\n"),
            vec!["rotate_wait_ms: must be between 0 and 600000, got 600001"]
        );
        assert!(issues("name: log\npath: /x\nrotate_wait_ms: 0\n").is_empty());
        assert_eq!(
            issues("name: t\nmode: poll\npaths: ['/x']\nrotate_wait_ms: 10\n"),
            vec!["rotate_wait_ms: is only used with mode: tail"]
        );
        assert_eq!(
            issues("name: t\nmode: poll\n"),
            vec!["paths: is required with mode: poll (glob patterns of the files to read)"]
        );
    }
}
