//! Poll mode: every `interval_ms`, read each file matched by the glob patterns in `paths`
//! (sysfs sensors such as `/sys/class/thermal/thermal_zone*/temp`, 1-wire `w1_slave`) and
//! send one reading with one numeric field per file.
//!
//! - An operator's "sample now" command takes a sample at once, besides the interval.
//! - **Field names** come from the path: the part after the pattern's last directory without
//!   a wildcard, with `/` replaced by `.` and any character outside `A-Z a-z 0-9 _ . -` by
//!   `_`. `/sys/class/thermal/thermal_zone*/temp` gives `thermal_zone0.temp`; a pattern
//!   without wildcards gives the file name. When two files give the same name, the first
//!   (patterns in order, matches sorted) wins.
//! - **Values**: the file's last whitespace-separated token, after its last `=` if any
//!   (`t=23125` in a `w1_slave`), as a decimal number. A `w1_slave` whose CRC line does not end
//!   in `YES` is a bad read. The number is multiplied by `scale` (then always a float);
//!   without `scale` an integer stays an integer.
//! - A value that is not a number is counted as `malformed` on `ferry.loss` (with the file's
//!   first bytes) and left out of the reading. A file that cannot be read (a sensor that
//!   vanished between glob and read, EIO from a failing bus) is left out and logged once per
//!   run. Files are read up to [`MAX_VALUE_BYTES`]; reading happens on the blocking pool.

use super::{FileConfig, FileError};
use crate::collectors::common::{LossReason, LossTally, add_tags};
use crate::collectors::{CollectorContext, CollectorError};
use crate::record::{Reading, Value};
use crate::spool::Intake;
use std::collections::HashSet;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tracing::{info, warn};

/// Most bytes read from one polled file; sysfs values are a few bytes.
pub const MAX_VALUE_BYTES: u64 = 4096;

/// One poll's result.
#[derive(Debug, Default, PartialEq)]
pub struct Sample {
    pub fields: Vec<(String, Value)>,
    /// First bytes of each value that was not a number.
    pub malformed: Vec<Vec<u8>>,
    /// Files that matched but could not be read, with the error.
    pub unreadable: Vec<(PathBuf, String)>,
}

/// The field name of `path` matched by `pattern`; see the module doc.
pub fn field_name(pattern: &str, path: &Path) -> String {
    let is_glob = |c: &str| c.contains(['*', '?', '[']);
    let parts: Vec<&str> = pattern.split('/').collect();
    let name = match parts.iter().position(|c| is_glob(c)) {
        None => path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        Some(i) => {
            let prefix: PathBuf = parts[..i].join("/").into();
            let rel = path.strip_prefix(&prefix).unwrap_or(path);
            rel.components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect::<Vec<_>>()
                .join(".")
        }
    };
    name.chars()
        .map(|ch| {
            if ch.is_ascii_alphanumeric() || matches!(ch, '_' | '.' | '-') {
                ch
            } else {
                '_'
            }
        })
        .collect()
}

/// The number in a polled file's text; see the module doc.
pub fn parse_value(text: &[u8], scale: Option<f64>) -> Option<Value> {
    let text = std::str::from_utf8(text).ok()?;
    if text.contains("crc=") && !text.lines().next()?.trim_end().ends_with("YES") {
        return None;
    }
    let token = text.split_whitespace().last()?;
    let token = token.rsplit_once('=').map_or(token, |(_, v)| v);
    let plain = token
        .bytes()
        .all(|b| b.is_ascii_digit() || matches!(b, b'-' | b'+' | b'.' | b'e' | b'E'))
        && token.bytes().any(|b| b.is_ascii_digit());
    if !plain {
        return None;
    }
    if let Some(s) = scale {
        let v: f64 = token.parse().ok()?;
        let v = v * s;
        return v.is_finite().then_some(Value::F64(v));
    }
    token.parse::<i64>().map(Value::I64).ok().or_else(|| {
        token
            .parse::<f64>()
            .ok()
            .filter(|v| v.is_finite())
            .map(Value::F64)
    })
}

/// Reads every matched file once.
pub fn sample(patterns: &[String], scale: Option<f64>) -> Sample {
    let mut out = Sample::default();
    let mut names = HashSet::new();
    for pattern in patterns {
        let Ok(paths) = glob::glob(pattern) else {
            continue; // validated at load
        };
        for path in paths.flatten() {
            let name = field_name(pattern, &path);
            if !names.insert(name.clone()) {
                continue;
            }
            let mut buf = Vec::new();
            let read = std::fs::File::open(&path)
                .and_then(|f| f.take(MAX_VALUE_BYTES).read_to_end(&mut buf));
            if let Err(e) = read {
                out.unreadable.push((path, e.to_string()));
                continue;
            }
            match parse_value(&buf, scale) {
                Some(v) => out.fields.push((name, v)),
                None => out.malformed.push(buf),
            }
        }
    }
    out
}

pub async fn run(config: FileConfig, ctx: CollectorContext) -> Result<(), CollectorError> {
    let patterns = config
        .paths
        .clone()
        .ok_or_else(|| FileError::Config("poll mode needs `paths`".into()))?;
    let scale = config.scale;
    let mut ticker = tokio::time::interval(Duration::from_millis(config.interval_ms()));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut tally = LossTally::default();
    let mut warned: HashSet<PathBuf> = HashSet::new();
    let mut warned_empty = false;
    info!(collector = %ctx.name, patterns = ?patterns, "Polling files.");
    loop {
        tokio::select! {
            _ = ctx.shutdown.cancelled() => return Ok(()),
            _ = ticker.tick() => {}
            _ = ctx.sample_now.notified() => {}
        }
        let p = patterns.clone();
        let s = tokio::task::spawn_blocking(move || sample(&p, scale))
            .await
            .map_err(|e| FileError::Panicked(e.to_string()))?;
        for (path, error) in s.unreadable {
            if warned.insert(path.clone()) {
                warn!(collector = %ctx.name, path = %path.display(), error = %error, "Cannot read a polled file; leaving its field out.");
            }
        }
        for bad in &s.malformed {
            tally.note(LossReason::Malformed, bad);
        }
        let mut readings = Vec::new();
        if s.fields.is_empty() {
            if !warned_empty && s.malformed.is_empty() {
                warned_empty = true;
                warn!(collector = %ctx.name, patterns = ?patterns, "No readable file matches the patterns.");
            }
        } else {
            let mut fields = s.fields;
            add_tags(&mut fields, &config.tags);
            readings.push(Reading::fields(ctx.name.clone(), fields));
        }
        tally.drain_into(&ctx.name, &mut readings);
        if !readings.is_empty() {
            ctx.send(Intake {
                readings,
                ..Intake::default()
            })
            .await?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn field_names_follow_the_wildcard_part_of_the_path() {
        assert_eq!(
            field_name(
                "/sys/class/thermal/thermal_zone*/temp",
                Path::new("/sys/class/thermal/thermal_zone0/temp")
            ),
            "thermal_zone0.temp"
        );
        assert_eq!(
            field_name(
                "/sys/bus/w1/devices/28-*/w1_slave",
                Path::new("/sys/bus/w1/devices/28-00000a1b2c3d/w1_slave")
            ),
            "28-00000a1b2c3d.w1_slave"
        );
        assert_eq!(
            field_name("/run/sensor value", Path::new("/run/sensor value")),
            "sensor_value"
        );
    }

    #[test]
    fn values_sysfs_and_w1() {
        assert_eq!(parse_value(b"45000\n", Some(0.001)), Some(Value::F64(45.0)));
        assert_eq!(parse_value(b"45000\n", None), Some(Value::I64(45000)));
        assert_eq!(parse_value(b"-1.5\n", None), Some(Value::F64(-1.5)));
        let w1 = b"72 01 4b 46 7f ff 0e 10 57 : crc=57 YES\n72 01 4b 46 7f ff 0e 10 57 t=23125\n";
        assert_eq!(parse_value(w1, Some(0.001)), Some(Value::F64(23.125)));
        let bad_crc =
            b"72 01 4b 46 7f ff 0e 10 57 : crc=57 NO\n72 01 4b 46 7f ff 0e 10 57 t=85000\n";
        assert_eq!(parse_value(bad_crc, Some(0.001)), None);
        for bad in [&b""[..], b"\n", b"enabled\n", b"\xff\xfe", b"inf", b"nan"] {
            assert_eq!(parse_value(bad, None), None, "{bad:?}");
        }
    }

    #[test]
    fn sample_reads_a_fake_sysfs_tree() {
        let dir = tempfile::tempdir().unwrap();
        for (zone, temp) in [("thermal_zone0", "41000\n"), ("thermal_zone1", "oops\n")] {
            std::fs::create_dir(dir.path().join(zone)).unwrap();
            std::fs::write(dir.path().join(zone).join("temp"), temp).unwrap();
        }
        let pattern = format!("{}/thermal_zone*/temp", dir.path().display());
        let s = sample(&[pattern], Some(0.001));
        assert_eq!(
            s.fields,
            vec![("thermal_zone0.temp".into(), Value::F64(41.0))]
        );
        assert_eq!(s.malformed, vec![b"oops\n".to_vec()]);
    }
}
