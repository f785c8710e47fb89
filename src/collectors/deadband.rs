//! Deadband (report-on-change): a collector's field is sent only when it moved more than a
//! threshold since it was last *sent*, with a heartbeat that sends every field now and then so
//! that silence is never mistaken for a dead device.
//!
//! The filter runs on a collector's readings before they reach the spool (see
//! [`CollectorContext::send`](super::CollectorContext::send)). What it leaves out was never
//! accepted, so it is not loss: no seq is used for it, nothing is reported on `ferry.loss`, and
//! the consumer's gap detection is unaffected.
//!
//! Invariants:
//! - **Compared with the last sent value**, not the last sample: a slow drift of many small
//!   steps is reported once it adds up past the threshold, and between two sent values the
//!   true value never differs from the last sent one by more than the threshold.
//! - **A field is kept** if it was never sent since the last heartbeat, or if it is a number
//!   (`I64`, `U64`, `F64`, compared across these types) with `|value - last sent| > threshold`,
//!   or if it is a bool or string (or a number with threshold 0) whose value changed. NaN is a
//!   value of its own: NaN -> number and number -> NaN are changes, NaN -> NaN is not; an
//!   infinity changes only into something else. Integers are compared exactly (no rounding
//!   through `f64`).
//! - **Unlisted fields** use `default`; without a `default` they are always sent.
//! - **Heartbeat**: the first reading and then every `heartbeat`-th reading (counted per
//!   filter, i.e. per collector) is sent whole, and the baselines are reset to exactly its
//!   fields. So a field present in a reading is sent at least once in every `heartbeat`
//!   readings, and the state holds at most the fields seen since the last heartbeat.
//! - **Tags** (`tag.*` fields, static per collector) ride along with every reading that is
//!   sent and never make a reading be sent on their own.
//! - A reading whose every field was suppressed is dropped whole ([`Deadband::apply`] returns
//!   `None`). A reading of a raw line ([`Body::Line`]) or with no fields passes untouched.

use crate::issue::Issue;
use crate::record::{Body, Reading, Value};
use serde::Deserialize;
use std::collections::{BTreeMap, HashMap};

/// Field name prefix of static tags (see [`super::common::add_tags`]).
const TAG_PREFIX: &str = "tag.";

/// The `deadband:` key of a collector.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeadbandConfig {
    /// Threshold for fields not listed in `fields`; without it those are always sent.
    #[serde(default)]
    pub default: Option<f64>,
    /// Per-field thresholds, by the field's exact name in the records.
    #[serde(default)]
    pub fields: BTreeMap<String, f64>,
    /// Every `heartbeat`-th reading carries every field; at least 1 (1 sends everything).
    pub heartbeat: u64,
}

impl DeadbandConfig {
    /// Checks thresholds (finite, >= 0) and the heartbeat (>= 1). Paths are relative to the
    /// collector item, starting with `deadband`.
    pub fn validate(&self) -> Vec<Issue> {
        let mut issues = Vec::new();
        let mut threshold = |path: String, t: f64| {
            if !t.is_finite() || t < 0.0 {
                issues.push(Issue::new(
                    path,
                    format!("a threshold must be a finite number >= 0, got {t}"),
                ));
            }
        };
        if let Some(t) = self.default {
            threshold("deadband.default".into(), t);
        }
        for (name, t) in &self.fields {
            threshold(format!("deadband.fields.{name}"), *t);
        }
        for name in self.fields.keys() {
            if name.is_empty() {
                issues.push(Issue::new(
                    "deadband.fields",
                    "a field name must not be empty",
                ));
            }
        }
        if self.heartbeat == 0 {
            issues.push(Issue::new(
                "deadband.heartbeat",
                "must be at least 1 (every heartbeat-th reading carries every field), got 0",
            ));
        }
        issues
    }
}

/// The state of one collector's deadband filter.
#[derive(Debug, Clone)]
pub struct Deadband {
    default: Option<f64>,
    fields: HashMap<String, f64>,
    heartbeat: u64,
    /// Readings to go until the next heartbeat; 0 means the next reading is one.
    until_heartbeat: u64,
    /// The value last sent, per field, since the last heartbeat.
    last_sent: HashMap<String, Value>,
    suppressed: u64,
}

impl Deadband {
    /// A filter whose first reading is a heartbeat. `config` should be validated; a heartbeat
    /// of 0 is taken as 1, and a threshold that is not a finite number >= 0 as 0.
    pub fn new(config: &DeadbandConfig) -> Deadband {
        let sane = |t: f64| if t.is_finite() && t > 0.0 { t } else { 0.0 };
        Deadband {
            default: config.default.map(sane),
            fields: config
                .fields
                .iter()
                .map(|(k, t)| (k.clone(), sane(*t)))
                .collect(),
            heartbeat: config.heartbeat.max(1),
            until_heartbeat: 0,
            last_sent: HashMap::new(),
            suppressed: 0,
        }
    }

    /// Filters one reading; `None` if every field of it was suppressed. See the module doc.
    pub fn apply(&mut self, reading: Reading) -> Option<Reading> {
        let Reading {
            stream,
            ts_ms,
            body,
        } = reading;
        let fields = match body {
            Body::Fields(f) if !f.is_empty() => f,
            body => {
                return Some(Reading {
                    stream,
                    ts_ms,
                    body,
                });
            }
        };
        if self.until_heartbeat == 0 {
            self.until_heartbeat = self.heartbeat - 1;
            self.last_sent = fields
                .iter()
                .filter(|(name, _)| !name.starts_with(TAG_PREFIX))
                .cloned()
                .collect();
            return Some(Reading {
                stream,
                ts_ms,
                body: Body::Fields(fields),
            });
        }
        self.until_heartbeat -= 1;
        let mut kept = Vec::with_capacity(fields.len());
        let mut tags = Vec::new();
        let mut suppressed = 0;
        for (name, value) in fields {
            if name.starts_with(TAG_PREFIX) {
                tags.push((name, value));
                continue;
            }
            let send = match (self.threshold(&name), self.last_sent.get(&name)) {
                (_, None) | (None, _) => true,
                (Some(t), Some(last)) => moved(last, &value, t),
            };
            if send {
                self.last_sent.insert(name.clone(), value.clone());
                kept.push((name, value));
            } else {
                suppressed += 1;
            }
        }
        self.suppressed += suppressed;
        if kept.is_empty() && suppressed > 0 {
            return None;
        }
        kept.extend(tags);
        Some(Reading {
            stream,
            ts_ms,
            body: Body::Fields(kept),
        })
    }

    /// Field values left out since this filter was made.
    pub fn suppressed(&self) -> u64 {
        self.suppressed
    }

    fn threshold(&self, field: &str) -> Option<f64> {
        self.fields.get(field).copied().or(self.default)
    }
}

/// Whether `now` differs from `last` by more than `threshold` (see the module doc).
fn moved(last: &Value, now: &Value, threshold: f64) -> bool {
    use Value::*;
    let int = |v: &Value| match v {
        I64(i) => Some(i128::from(*i)),
        U64(u) => Some(i128::from(*u)),
        _ => None,
    };
    let float = |v: &Value| match v {
        I64(i) => Some(*i as f64),
        U64(u) => Some(*u as f64),
        F64(f) => Some(*f),
        _ => None,
    };
    if let (Some(a), Some(b)) = (int(last), int(now)) {
        // Exact: i64/u64 differences fit in i128; the cast to f64 only rounds huge moves.
        let diff = (b - a).unsigned_abs();
        return if threshold == 0.0 {
            diff != 0
        } else {
            diff as f64 > threshold
        };
    }
    match (float(last), float(now)) {
        (Some(a), Some(b)) => match (a.is_nan(), b.is_nan()) {
            (true, true) => false,
            (true, false) | (false, true) => true,
            (false, false) if a.is_infinite() || b.is_infinite() || threshold == 0.0 => a != b,
            (false, false) => (b - a).abs() > threshold,
        },
        // Bool, string, or a change of kind between number and not-a-number.
        _ => last != now,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn config(yaml: &str) -> DeadbandConfig {
        serde_yaml::from_str(yaml).unwrap()
    }

    fn reading(fields: &[(&str, Value)]) -> Reading {
        Reading {
            stream: "s".into(),
            ts_ms: 1,
            body: Body::Fields(
                fields
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.clone()))
                    .collect(),
            ),
        }
    }

    /// The names and values `apply` kept, or None.
    fn run(db: &mut Deadband, fields: &[(&str, Value)]) -> Option<Vec<(String, Value)>> {
        db.apply(reading(fields)).map(|r| match r.body {
            Body::Fields(f) => f,
            Body::Line(l) => panic!("fields became a line {l:?}"),
        })
    }

    fn names(kept: &Option<Vec<(String, Value)>>) -> Vec<&str> {
        kept.iter().flatten().map(|(n, _)| n.as_str()).collect()
    }

    use Value::{Bool, F64, I64, Str, U64};

    #[test]
    fn per_field_and_default_thresholds() {
        let mut db = Deadband::new(&config(
            "default: 10\nfields: {temp: 0.5}\nheartbeat: 100\n",
        ));
        let first = run(&mut db, &[("temp", F64(20.0)), ("hum", I64(50))]);
        assert_eq!(names(&first), ["temp", "hum"]);
        // Within both thresholds: nothing left, no reading.
        assert_eq!(run(&mut db, &[("temp", F64(20.5)), ("hum", I64(60))]), None);
        // Past temp's 0.5 only.
        let r = run(&mut db, &[("temp", F64(20.6)), ("hum", I64(60))]);
        assert_eq!(r, Some(vec![("temp".into(), F64(20.6))]));
        // Past the default of 10 (strictly more than).
        let r = run(&mut db, &[("temp", F64(20.6)), ("hum", I64(61))]);
        assert_eq!(r, Some(vec![("hum".into(), I64(61))]));
        assert_eq!(db.suppressed(), 4);
    }

    #[test]
    fn unlisted_fields_without_a_default_are_always_sent() {
        let mut db = Deadband::new(&config("fields: {temp: 1}\nheartbeat: 100\n"));
        run(&mut db, &[("temp", F64(1.0)), ("state", Str("ok".into()))]);
        let r = run(&mut db, &[("temp", F64(1.0)), ("state", Str("ok".into()))]);
        assert_eq!(r, Some(vec![("state".into(), Str("ok".into()))]));
    }

    #[test]
    fn heartbeat_sends_everything_every_nth_reading_and_resets_the_baseline() {
        let mut db = Deadband::new(&config("default: 100\nheartbeat: 3\n"));
        let mut sent = Vec::new();
        for i in 0..7 {
            sent.push(run(&mut db, &[("v", I64(i))]).is_some());
        }
        // Readings 1, 4, 7 are heartbeats; nothing moved by more than 100 in between.
        assert_eq!(sent, [true, false, false, true, false, false, true]);
        // The baseline is the heartbeat's value (6), not the first one (0).
        assert_eq!(run(&mut db, &[("v", I64(106))]), None);
        assert!(run(&mut db, &[("v", I64(107))]).is_some());
        // heartbeat: 1 turns the deadband off.
        let mut off = Deadband::new(&config("default: 100\nheartbeat: 1\n"));
        for _ in 0..3 {
            assert!(run(&mut off, &[("v", I64(0))]).is_some());
        }
    }

    #[test]
    fn slow_drift_is_reported_once_it_adds_up() {
        let mut db = Deadband::new(&config("default: 1.0\nheartbeat: 1000\n"));
        let mut sent = Vec::new();
        for i in 0..=10 {
            let v = 20.0 + 0.3 * f64::from(i);
            if run(&mut db, &[("t", F64(v))]).is_some() {
                sent.push(i);
            }
        }
        // Every step is 0.3; against the last *sent* value it passes 1.0 at every 4th step.
        assert_eq!(sent, [0, 4, 8]);
    }

    #[test]
    fn strings_bools_and_zero_thresholds_are_sent_on_change() {
        let mut db = Deadband::new(&config("default: 0\nheartbeat: 1000\n"));
        let f =
            |s: &str, b: bool, n: u64| vec![("s", Str(s.into())), ("b", Bool(b)), ("n", U64(n))];
        assert!(run(&mut db, &f("a", true, 1)).is_some());
        assert_eq!(run(&mut db, &f("a", true, 1)), None);
        assert_eq!(names(&run(&mut db, &f("b", true, 1))), ["s"]);
        assert_eq!(names(&run(&mut db, &f("b", false, 1))), ["b"]);
        assert_eq!(names(&run(&mut db, &f("b", false, 2))), ["n"]);
        // A number that becomes a string (or back) is a change whatever the threshold.
        let mut db = Deadband::new(&config("default: 1000\nheartbeat: 1000\n"));
        run(&mut db, &[("x", I64(1))]);
        assert!(run(&mut db, &[("x", Str("1".into()))]).is_some());
        assert!(run(&mut db, &[("x", I64(1))]).is_some());
        // Numbers compare across types: 5 and 5.0 and 5u64 are the same value.
        assert_eq!(run(&mut db, &[("x", F64(1.0))]), None);
        assert_eq!(run(&mut db, &[("x", U64(1))]), None);
    }

    #[test]
    fn large_integers_compare_exactly() {
        let mut db = Deadband::new(&config("default: 0\nheartbeat: 1000\n"));
        let big = 1u64 << 60;
        run(&mut db, &[("n", U64(big))]);
        // Through f64 these two would be equal.
        assert!(run(&mut db, &[("n", U64(big + 1))]).is_some());
        run(&mut db, &[("m", I64(i64::MIN))]);
        assert!(run(&mut db, &[("m", U64(u64::MAX))]).is_some());
    }

    #[test]
    fn nan_and_infinity_are_handled() {
        let mut db = Deadband::new(&config("default: 1.0\nheartbeat: 1000\n"));
        run(&mut db, &[("x", F64(1.0))]);
        assert!(
            run(&mut db, &[("x", F64(f64::NAN))]).is_some(),
            "number -> NaN"
        );
        assert_eq!(run(&mut db, &[("x", F64(f64::NAN))]), None, "NaN -> NaN");
        assert!(run(&mut db, &[("x", F64(1.0))]).is_some(), "NaN -> number");
        assert!(run(&mut db, &[("x", F64(f64::INFINITY))]).is_some());
        assert_eq!(run(&mut db, &[("x", F64(f64::INFINITY))]), None);
        assert!(run(&mut db, &[("x", F64(f64::NEG_INFINITY))]).is_some());
        assert!(run(&mut db, &[("x", I64(3))]).is_some());
    }

    #[test]
    fn lines_and_empty_readings_pass_untouched() {
        let mut db = Deadband::new(&config("default: 1000\nheartbeat: 1000\n"));
        for _ in 0..3 {
            let line = Reading {
                stream: "s".into(),
                ts_ms: 7,
                body: Body::Line("same".into()),
            };
            assert_eq!(db.apply(line.clone()), Some(line));
            assert_eq!(run(&mut db, &[]), Some(vec![]));
        }
        assert_eq!(db.suppressed(), 0);
    }

    #[test]
    fn tags_ride_along_but_never_make_a_reading_alone() {
        let mut db = Deadband::new(&config("default: 1\nheartbeat: 1000\n"));
        let tag = ("tag.site", Str("north".into()));
        run(&mut db, &[("v", I64(0)), tag.clone()]);
        assert_eq!(run(&mut db, &[("v", I64(1)), tag.clone()]), None);
        let r = run(&mut db, &[("v", I64(2)), tag.clone()]);
        assert_eq!(names(&r), ["v", "tag.site"]);
        assert_eq!(
            db.suppressed(),
            1,
            "tags are not counted as suppressed values"
        );
    }

    #[test]
    fn validation_names_each_bad_key() {
        let bad = config("default: -1\nfields: {a: .nan, b: .inf, ok: 0, '': 1}\nheartbeat: 0\n");
        let paths: Vec<String> = bad.validate().into_iter().map(|i| i.path).collect();
        assert_eq!(
            paths,
            [
                "deadband.default",
                "deadband.fields.a",
                "deadband.fields.b",
                "deadband.fields",
                "deadband.heartbeat"
            ]
        );
        assert!(config("heartbeat: 1\n").validate().is_empty());
        assert!(serde_yaml::from_str::<DeadbandConfig>("default: 1\n").is_err());
        assert!(serde_yaml::from_str::<DeadbandConfig>("heartbeat: 2\nthreshold: 1\n").is_err());
        // An unvalidated config does not panic.
        let mut db = Deadband::new(&bad);
        assert!(run(&mut db, &[("a", F64(1.0))]).is_some());
        assert!(run(&mut db, &[("a", F64(1.0))]).is_some());
    }

    fn value() -> impl Strategy<Value = Value> {
        prop_oneof![
            (-50i64..50).prop_map(I64),
            (0u64..100).prop_map(U64),
            (-50.0f64..50.0).prop_map(F64),
            Just(F64(f64::NAN)),
            any::<bool>().prop_map(Bool),
            prop::sample::select(vec!["a", "b"]).prop_map(|s| Str(s.into())),
        ]
    }

    /// A reading: each of four fields present or not, with a value.
    fn sample() -> impl Strategy<Value = Vec<(String, Value)>> {
        prop::collection::vec(prop::option::of(value()), 4).prop_map(|vals| {
            vals.into_iter()
                .enumerate()
                .filter_map(|(i, v)| v.map(|v| (format!("f{i}"), v)))
                .collect()
        })
    }

    /// Equal, with NaN equal to NaN.
    fn same(a: &Value, b: &Value) -> bool {
        a == b || matches!((a, b), (F64(x), F64(y)) if x.is_nan() && y.is_nan())
    }

    proptest! {
        /// A field present in a reading was sent within the last `heartbeat` readings, and
        /// what the consumer last saw of it is within its threshold of the true value.
        #[test]
        fn no_field_is_silent_longer_than_the_heartbeat(
            samples in prop::collection::vec(sample(), 1..80),
            heartbeat in 1u64..10,
            default in prop::option::of(0.0f64..20.0),
            f0 in 0.0f64..20.0,
        ) {
            let mut cfg = DeadbandConfig { default, fields: BTreeMap::new(), heartbeat };
            cfg.fields.insert("f0".into(), f0);
            let mut db = Deadband::new(&cfg);
            let mut last_sent_at: HashMap<String, usize> = HashMap::new();
            let mut seen: HashMap<String, Value> = HashMap::new();
            // Readings without fields pass untouched and do not count towards the heartbeat.
            for (i, fields) in samples.iter().filter(|f| !f.is_empty()).enumerate() {
                let out = db.apply(Reading { stream: "s".into(), ts_ms: 0, body: Body::Fields(fields.clone()) });
                if let Some(out) = out {
                    let Body::Fields(kept) = out.body else { panic!("fields became a line") };
                    prop_assert!(!kept.is_empty());
                    for (name, v) in kept {
                        prop_assert!(fields.iter().any(|(n, w)| *n == name && same(w, &v)));
                        last_sent_at.insert(name.clone(), i);
                        seen.insert(name, v);
                    }
                }
                for (name, v) in fields {
                    let at = last_sent_at.get(name).copied();
                    prop_assert!(
                        at.is_some_and(|at| i - at < heartbeat as usize),
                        "{name} at reading {i} last sent at {at:?} (heartbeat {heartbeat})"
                    );
                    let t = cfg.fields.get(name).copied().or(default);
                    let last = &seen[name];
                    if let Some(t) = t {
                        prop_assert!(!moved(last, v, t), "{name}: consumer has {last:?}, true {v:?}");
                    } else {
                        prop_assert!(same(last, v), "{name}: consumer has {last:?}, true {v:?}");
                    }
                }
            }
        }
    }
}
