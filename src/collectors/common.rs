//! What every collector kind shares: static tags, and the loss report for input that could
//! not be turned into a reading.
//!
//! - **Tags** are `key: value` strings from the config, added to every reading of the
//!   collector as fields `tag.<key>`. A raw line with tags becomes fields `line` + `tag.*`.
//! - **Unusable input** (a line that does not parse, a line over `max_line_bytes`, a sysfs
//!   value that is not a number) is never a panic and never silent: it is counted and reported
//!   as a reading on the [`LOSS_STREAM`] with fields `{stream, count, reason, sample}`, sent
//!   through the same intake as the good readings, so the report is exactly as durable as they
//!   are. Lines of one intake with the same reason are reported as one reading whose `count`
//!   says how many, with the sample of the first; a burst of binary noise is a few loss
//!   records, not thousands. The spool never evicts loss records, so a source that can send
//!   garbage without end (serial) reports at most once per window ([`LossTally::drain_due`]).

use crate::config::Issue;
use crate::record::{Body, LOSS_STREAM, Reading, Value};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// Held by a run of a collector that owns something exclusive: a serial port (opened with
/// TIOCEXCL) or a file position. The supervisor starts a reconfigured collector while the old
/// run is still stopping; the new run waits here until the old one has closed its port, or
/// until the old one's intakes are committed so the position it loads is the last one.
pub type RunGuard = tokio::sync::OwnedMutexGuard<()>;

/// Waits until no other run of collector `name` holds the guard; `None` if `shutdown` came
/// first.
pub async fn exclusive_run(name: &str, shutdown: &CancellationToken) -> Option<RunGuard> {
    static RUNS: OnceLock<Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>> = OnceLock::new();
    let lock = RUNS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .entry(name.to_string())
        .or_default()
        .clone();
    tokio::select! {
        guard = lock.lock_owned() => Some(guard),
        _ = shutdown.cancelled() => None,
    }
}

/// Static tags of a collector: `tag.<key>` fields on every reading.
pub type Tags = BTreeMap<String, String>;

/// How many leading bytes of a bad line a loss report carries.
pub const LOSS_SAMPLE_BYTES: usize = 64;

/// Most tags one collector may have; they are repeated in every reading.
const MAX_TAGS: usize = 32;

/// Checks tag keys (`[A-Za-z0-9_.-]`, 1-64 characters) and values (at most 256 bytes).
pub fn validate_tags(tags: &Tags) -> Vec<Issue> {
    let mut issues = Vec::new();
    if tags.len() > MAX_TAGS {
        issues.push(Issue::new(
            "tags",
            format!(
                "at most {MAX_TAGS} tags, got {} (each is sent with every reading)",
                tags.len()
            ),
        ));
    }
    for (k, v) in tags {
        if !crate::record::is_valid_stream_name(k) {
            issues.push(Issue::new(
                format!("tags.{k}"),
                "a tag key must be 1-64 characters of A-Z a-z 0-9 _ . -",
            ));
        }
        if v.len() > 256 {
            issues.push(Issue::new(
                format!("tags.{k}"),
                format!("a tag value must be at most 256 bytes, got {}", v.len()),
            ));
        }
    }
    issues
}

/// Appends `tag.<key>` fields.
pub fn add_tags(fields: &mut Vec<(String, Value)>, tags: &Tags) {
    fields.extend(
        tags.iter()
            .map(|(k, v)| (format!("tag.{k}"), Value::Str(v.clone()))),
    );
}

/// Adds the tags to a parsed body; a raw line with tags becomes fields `line` + `tag.*`.
pub fn tag_body(body: Body, tags: &Tags) -> Body {
    if tags.is_empty() {
        return body;
    }
    match body {
        Body::Fields(mut f) => {
            add_tags(&mut f, tags);
            Body::Fields(f)
        }
        Body::Line(line) => {
            let mut f = vec![("line".to_string(), Value::Str(line))];
            add_tags(&mut f, tags);
            Body::Fields(f)
        }
    }
}

/// Why input was not turned into a reading (the `reason` field of the loss report).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum LossReason {
    /// The line (or value) did not parse in the configured format, or was not UTF-8.
    Malformed,
    /// The line was longer than `max_line_bytes`; it was cut off and dropped.
    Oversized,
    /// A program exited non-zero or by a signal, or could not be started (exec).
    Failed,
    /// A program or a device did not answer in time (exec, modbus).
    Timeout,
    /// Output past a size cap was discarded (exec `max_output_bytes`).
    Truncated,
    /// A scheduled sample was skipped because the previous one was still running (exec).
    Skipped,
}

impl LossReason {
    pub fn as_str(self) -> &'static str {
        match self {
            LossReason::Malformed => "malformed",
            LossReason::Oversized => "oversized",
            LossReason::Failed => "failed",
            LossReason::Timeout => "timeout",
            LossReason::Truncated => "truncated",
            LossReason::Skipped => "skipped",
        }
    }
}

/// One loss reading: `{stream, count, reason, sample}` on [`LOSS_STREAM`].
pub fn loss_reading(stream: &str, reason: LossReason, count: u64, sample: &[u8]) -> Reading {
    let sample = &sample[..sample.len().min(LOSS_SAMPLE_BYTES)];
    Reading::fields(
        LOSS_STREAM,
        vec![
            ("stream".into(), Value::Str(stream.to_string())),
            ("count".into(), Value::U64(count)),
            ("reason".into(), Value::Str(reason.as_str().into())),
            (
                "sample".into(),
                Value::Str(String::from_utf8_lossy(sample).into_owned()),
            ),
        ],
    )
}

/// How often at most a collector logs that it dropped input.
const LOSS_LOG_EVERY: Duration = Duration::from_secs(60);

/// Counts unusable input until it is reported; see the module doc.
#[derive(Debug, Default)]
pub struct LossTally {
    /// Per reason: count and the sample of the first occurrence.
    pending: BTreeMap<LossReason, (u64, Vec<u8>)>,
    /// When the oldest unreported loss was noted.
    since: Option<Instant>,
    /// Since the start of this run, for the log.
    total: u64,
    last_log: Option<Instant>,
}

impl LossTally {
    pub fn note(&mut self, reason: LossReason, sample: &[u8]) {
        let entry = self
            .pending
            .entry(reason)
            .or_insert_with(|| (0, sample[..sample.len().min(LOSS_SAMPLE_BYTES)].to_vec()));
        entry.0 += 1;
        self.total += 1;
        self.since.get_or_insert_with(Instant::now);
    }

    /// When losses counted now should be reported at the latest, for a collector that
    /// reports at most once per `window` (see [`LossTally::drain_due`]).
    pub fn due_at(&self, window: Duration) -> Option<Instant> {
        self.since.map(|t| t + window)
    }

    /// Like [`LossTally::drain_into`], but only once the oldest unreported loss is `window`
    /// old: a source that can send garbage without end (a serial line) then makes at most one
    /// loss record per reason and window, since loss records are never evicted from the spool.
    pub fn drain_due(&mut self, stream: &str, out: &mut Vec<Reading>, window: Duration) {
        if self.since.is_some_and(|t| t.elapsed() >= window) {
            self.drain_into(stream, out);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// Moves the pending counts into loss readings for `stream`, and logs (at most once a
    /// minute) how much this collector dropped.
    pub fn drain_into(&mut self, stream: &str, out: &mut Vec<Reading>) {
        if self.pending.is_empty() {
            return;
        }
        self.since = None;
        for (reason, (count, sample)) in std::mem::take(&mut self.pending) {
            out.push(loss_reading(stream, reason, count, &sample));
        }
        if self.last_log.is_none_or(|t| t.elapsed() >= LOSS_LOG_EVERY) {
            self.last_log = Some(Instant::now());
            tracing::warn!(
                collector = %stream,
                dropped_total = self.total,
                "Input that could not be parsed was dropped and reported on ferry.loss."
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tally_aggregates_per_reason_with_the_first_sample() {
        let mut t = LossTally::default();
        t.note(LossReason::Malformed, b"first bad line");
        t.note(LossReason::Malformed, b"second");
        t.note(LossReason::Oversized, &[b'x'; 1000]);
        let mut out = Vec::new();
        t.drain_into("gps", &mut out);
        assert!(t.is_empty());
        assert_eq!(out.len(), 2);
        let Body::Fields(f) = &out[0].body else {
            panic!("fields")
        };
        assert_eq!(out[0].stream, LOSS_STREAM);
        assert_eq!(f[0], ("stream".into(), Value::Str("gps".into())));
        assert_eq!(f[1], ("count".into(), Value::U64(2)));
        assert_eq!(f[2], ("reason".into(), Value::Str("malformed".into())));
        assert_eq!(f[3], ("sample".into(), Value::Str("first bad line".into())));
        let Body::Fields(f) = &out[1].body else {
            panic!("fields")
        };
        assert_eq!(f[3], ("sample".into(), Value::Str("x".repeat(64))));
    }

    #[test]
    fn windowed_reports_wait_for_the_window() {
        let mut t = LossTally::default();
        let mut out = Vec::new();
        assert_eq!(t.due_at(Duration::from_secs(5)), None);
        t.note(LossReason::Malformed, b"a");
        t.note(LossReason::Malformed, b"b");
        assert!(t.due_at(Duration::from_secs(5)).is_some());
        t.drain_due("s", &mut out, Duration::from_secs(3600));
        assert!(out.is_empty() && !t.is_empty());
        t.drain_due("s", &mut out, Duration::ZERO);
        assert_eq!(out.len(), 1);
        assert!(t.is_empty() && t.due_at(Duration::ZERO).is_none());
    }

    #[test]
    fn tags_on_lines_and_fields() {
        let tags: Tags = [("site".to_string(), "north".to_string())].into();
        assert_eq!(
            tag_body(Body::Line("a".into()), &tags),
            Body::Fields(vec![
                ("line".into(), Value::Str("a".into())),
                ("tag.site".into(), Value::Str("north".into()))
            ])
        );
        assert_eq!(
            tag_body(Body::Line("a".into()), &Tags::new()),
            Body::Line("a".into())
        );
        let bad: Tags = [("no spaces".to_string(), "x".to_string())].into();
        assert_eq!(validate_tags(&bad)[0].path, "tags.no spaces");
    }
}
