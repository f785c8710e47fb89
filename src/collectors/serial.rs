//! The serial collector: reads delimited lines from a serial port (GPS receivers, Modbus
//! gateways that print lines, weather stations, PLC debug ports) and parses each with the
//! configured [`parse`](super::parse) format.
//!
//! Invariants:
//! - **The device going away ends the run.** A USB unplug (or a pty whose other end closed)
//!   makes tokio-serial return `Ok(0)` on every read, forever; a read error is the same event.
//!   Both return an error at once, so the [`supervisor`](super::supervisor) reopens the same
//!   path after its backoff (random up to 1 s, doubling per failed attempt up to 60 s, reset
//!   after a run of 60 s). The collector never spins on `Ok(0)` and never retries by itself.
//! - Garbage (invalid UTF-8, unparseable lines, binary noise, a line longer than
//!   `max_line_bytes`) is counted, reported on `ferry.loss` (one record per reason and
//!   [`LOSS_REPORT_WINDOW`], with a count) and skipped; the next good line parses.
//! - Opening needs no libudev (tokio-serial without default features): the port is named by
//!   path, ideally a stable `/dev/serial/by-id/...` link. Permission denied names the group
//!   the service user is missing (dialout on Debian).
//! - The port is opened exclusively (TIOCEXCL + flock); a second opener fails. A run of a
//!   reconfigured collector waits until the previous run has closed the port
//!   ([`exclusive_run`](super::common::exclusive_run)).

use super::common::{Tags, validate_tags};
use super::lines::{Frame, LineSplitter};
use super::parse::{self, FormatConfig, LineDecoder, Parser};
use super::{Collector, CollectorContext, CollectorError, CollectorSpec, RunFuture};
use crate::issue::Issue;
use crate::spool::Intake;
use serde::Deserialize;
use std::time::Duration;
use tokio::io::AsyncReadExt;
use tokio_serial::SerialPortBuilderExt;
use tracing::info;

/// Bytes read from the port at once. A serial line at 115200 baud delivers about 11 KiB/s.
const READ_BUFFER_BYTES: usize = 4096;
/// Unusable input is reported on `ferry.loss` at most this often (one record per reason with
/// a count): a line spewing noise for days must not fill the spool with loss records, which
/// are never evicted.
const LOSS_REPORT_WINDOW: Duration = Duration::from_secs(5);

fn yes() -> bool {
    true
}
fn default_baud() -> u32 {
    9600
}
fn default_data_bits() -> u8 {
    8
}
fn default_stop_bits() -> u8 {
    1
}
fn default_delimiter() -> String {
    "\n".into()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Parity {
    #[default]
    None,
    Odd,
    Even,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SerialConfig {
    pub name: String,
    #[serde(default = "yes")]
    pub enabled: bool,
    #[serde(default)]
    pub tags: Tags,
    /// Absolute path of the port, e.g. `/dev/serial/by-id/usb-u-blox_GNSS-if00`.
    pub path: String,
    #[serde(default = "default_baud")]
    pub baud: u32,
    #[serde(default = "default_data_bits")]
    pub data_bits: u8,
    #[serde(default)]
    pub parity: Parity,
    #[serde(default = "default_stop_bits")]
    pub stop_bits: u8,
    /// One byte ends a line; `"\r\n"` is accepted and means `"\n"` (a trailing `\r` is always
    /// stripped when the delimiter is `\n`).
    #[serde(default = "default_delimiter")]
    pub delimiter: String,
    #[serde(default = "parse::default_max_line_bytes")]
    pub max_line_bytes: u64,
    #[serde(default)]
    pub format: FormatConfig,
    /// Report-on-change thresholds and heartbeat (see [`super::deadband`]).
    #[serde(default)]
    pub deadband: Option<super::deadband::DeadbandConfig>,
}

/// The line settings of a serial port, as the serial collector and Modbus RTU configure them.
pub struct PortSettings<'a> {
    pub path: &'a str,
    pub baud: u32,
    pub data_bits: u8,
    pub parity: Parity,
    pub stop_bits: u8,
}

impl PortSettings<'_> {
    /// What is wrong with these settings; each issue's key is `prefix` plus the field name.
    pub fn issues(&self, prefix: &str) -> Vec<Issue> {
        let mut issues = Vec::new();
        if !self.path.starts_with('/') {
            issues.push(Issue::new(
                format!("{prefix}path"),
                format!(
                    "must be an absolute device path such as /dev/ttyUSB0, got {:?}",
                    self.path
                ),
            ));
        }
        if !(50..=4_000_000).contains(&self.baud) {
            issues.push(Issue::new(
                format!("{prefix}baud"),
                format!("must be between 50 and 4000000, got {}", self.baud),
            ));
        }
        if !(5..=8).contains(&self.data_bits) {
            issues.push(Issue::new(
                format!("{prefix}data_bits"),
                format!("must be 5, 6, 7 or 8, got {}", self.data_bits),
            ));
        }
        if !(1..=2).contains(&self.stop_bits) {
            issues.push(Issue::new(
                format!("{prefix}stop_bits"),
                format!("must be 1 or 2, got {}", self.stop_bits),
            ));
        }
        issues
    }

    /// Opens the port, 8N1-style settings applied, no flow control.
    pub fn open(&self) -> Result<tokio_serial::SerialStream, SerialError> {
        tokio_serial::new(self.path, self.baud)
            .data_bits(match self.data_bits {
                5 => tokio_serial::DataBits::Five,
                6 => tokio_serial::DataBits::Six,
                7 => tokio_serial::DataBits::Seven,
                _ => tokio_serial::DataBits::Eight,
            })
            .parity(match self.parity {
                Parity::None => tokio_serial::Parity::None,
                Parity::Odd => tokio_serial::Parity::Odd,
                Parity::Even => tokio_serial::Parity::Even,
            })
            .stop_bits(match self.stop_bits {
                2 => tokio_serial::StopBits::Two,
                _ => tokio_serial::StopBits::One,
            })
            .flow_control(tokio_serial::FlowControl::None)
            .open_native_async()
            .map_err(|e| open_error(self.path, e))
    }
}

impl SerialConfig {
    fn port(&self) -> PortSettings<'_> {
        PortSettings {
            path: &self.path,
            baud: self.baud,
            data_bits: self.data_bits,
            parity: self.parity,
            stop_bits: self.stop_bits,
        }
    }
}

/// The delimiter byte of a valid config value.
fn delimiter_byte(d: &str) -> Option<u8> {
    match d.as_bytes() {
        [b] => Some(*b),
        b"\r\n" => Some(b'\n'),
        _ => None,
    }
}

impl CollectorSpec for SerialConfig {
    fn name(&self) -> &str {
        &self.name
    }

    fn enabled(&self) -> bool {
        self.enabled
    }

    fn validate(&self) -> Vec<Issue> {
        let mut issues = validate_tags(&self.tags);
        issues.extend(self.port().issues(""));
        if delimiter_byte(&self.delimiter).is_none() {
            issues.push(Issue::new(
                "delimiter",
                format!(
                    "must be one byte (such as \"\\n\" or \"\\r\") or \"\\r\\n\", got {:?}",
                    self.delimiter
                ),
            ));
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
        issues.extend(parse::format_issues(&self.format));
        issues
    }

    fn build(&self) -> Box<dyn Collector> {
        Box::new(SerialCollector {
            config: self.clone(),
        })
    }

    fn deadband(&self) -> Option<&super::deadband::DeadbandConfig> {
        self.deadband.as_ref()
    }
}

/// Why a serial run ended.
#[derive(Debug, thiserror::Error)]
pub enum SerialError {
    #[error(
        "cannot open serial port {path}: permission denied (is the user in group dialout? with systemd: SupplementaryGroups=dialout)"
    )]
    PermissionDenied { path: String },
    #[error("cannot open serial port {path}: no such device (unplugged?)")]
    NotFound { path: String },
    #[error("cannot open serial port {path}: {source}")]
    Open {
        path: String,
        source: tokio_serial::Error,
    },
    #[error("serial port {path} closed: end of input (device unplugged?)")]
    Closed { path: String },
    #[error("cannot read serial port {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("invalid format: {0}")]
    Format(String),
}

impl From<SerialError> for CollectorError {
    fn from(e: SerialError) -> CollectorError {
        CollectorError::Source(e.to_string())
    }
}

/// Maps an open error to what an operator should do about it.
pub fn open_error(path: &str, e: tokio_serial::Error) -> SerialError {
    use std::io::ErrorKind as Io;
    use tokio_serial::ErrorKind as K;
    let path = path.to_string();
    match e.kind() {
        K::Io(Io::PermissionDenied) => SerialError::PermissionDenied { path },
        K::Io(Io::NotFound) => SerialError::NotFound { path },
        _ if e.description.contains("not permitted") => SerialError::PermissionDenied { path },
        _ => SerialError::Open { path, source: e },
    }
}

pub struct SerialCollector {
    config: SerialConfig,
}

impl Collector for SerialCollector {
    fn run(self: Box<Self>, ctx: CollectorContext) -> RunFuture {
        Box::pin(async move { run(self.config, ctx).await })
    }
}

async fn run(config: SerialConfig, ctx: CollectorContext) -> Result<(), CollectorError> {
    let parser = Parser::new(&config.format).map_err(|issues| {
        let msgs: Vec<String> = issues.iter().map(ToString::to_string).collect();
        SerialError::Format(msgs.join("; "))
    })?;
    let delimiter = delimiter_byte(&config.delimiter)
        .ok_or_else(|| SerialError::Format(format!("bad delimiter {:?}", config.delimiter)))?;
    let Some(_run) = super::common::exclusive_run(&ctx.name, &ctx.shutdown).await else {
        return Ok(());
    };
    let path = config.path.clone();
    let mut port = config.port().open()?;
    info!(collector = %ctx.name, path = %path, baud = config.baud, "Serial port opened.");

    let mut splitter = LineSplitter::new(delimiter, config.max_line_bytes as usize);
    let mut decoder = LineDecoder::new(&ctx.name, parser, config.tags.clone());
    let result = read_lines(&ctx, &path, &mut port, &mut splitter, &mut decoder).await;
    // Whatever way the run ends, the losses counted so far are reported.
    let mut readings = Vec::new();
    decoder.finish(&mut readings);
    if !readings.is_empty() {
        ctx.send(Intake {
            readings,
            ..Intake::default()
        })
        .await?;
    }
    result
}

async fn read_lines(
    ctx: &CollectorContext,
    path: &str,
    port: &mut tokio_serial::SerialStream,
    splitter: &mut LineSplitter,
    decoder: &mut LineDecoder,
) -> Result<(), CollectorError> {
    let mut buf = vec![0u8; READ_BUFFER_BYTES];
    let mut frames: Vec<Frame> = Vec::new();
    loop {
        let due = decoder.loss_due_at(LOSS_REPORT_WINDOW);
        // `read` is cancel-safe: when another branch wins, no bytes were taken from the port.
        let n = tokio::select! {
            _ = ctx.shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep_until(tokio::time::Instant::from_std(due.unwrap_or_else(std::time::Instant::now))), if due.is_some() => None,
            r = port.read(&mut buf) => Some(r.map_err(|source| SerialError::Read { path: path.to_string(), source })?),
        };
        if n == Some(0) {
            return Err(SerialError::Closed {
                path: path.to_string(),
            }
            .into());
        }
        if let Some(n) = n {
            splitter.push(&buf[..n], &mut frames);
        }
        let mut readings = Vec::with_capacity(frames.len());
        for frame in frames.drain(..) {
            decoder.decode(frame, &mut readings);
        }
        decoder.finish_due(&mut readings, LOSS_REPORT_WINDOW);
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
    use crate::record::{Body, Value};

    fn config(yaml: &str) -> SerialConfig {
        serde_yaml::from_str(yaml).unwrap()
    }

    #[test]
    fn defaults_and_validation() {
        let c = config("name: gps\npath: /dev/ttyUSB0\n");
        assert_eq!((c.baud, c.data_bits, c.stop_bits), (9600, 8, 1));
        assert!(c.validate().is_empty());
        let c = config(
            "name: gps\npath: ttyUSB0\nbaud: 10\ndata_bits: 9\nstop_bits: 3\ndelimiter: ab\nmax_line_bytes: 0\nformat: {type: csv}\n",
        );
        let paths: Vec<String> = c.validate().into_iter().map(|i| i.path).collect();
        assert_eq!(
            paths,
            [
                "path",
                "baud",
                "data_bits",
                "stop_bits",
                "delimiter",
                "max_line_bytes",
                "format.columns"
            ]
        );
        assert_eq!(delimiter_byte("\r\n"), Some(b'\n'));
        assert_eq!(delimiter_byte("\r"), Some(b'\r'));
    }

    #[test]
    fn permission_denied_names_the_dialout_group() {
        let e = open_error(
            "/dev/ttyUSB0",
            tokio_serial::Error::new(
                tokio_serial::ErrorKind::Io(std::io::ErrorKind::PermissionDenied),
                "Permission denied",
            ),
        );
        let msg = e.to_string();
        assert!(
            msg.contains("/dev/ttyUSB0") && msg.contains("dialout"),
            "{msg}"
        );
    }

    #[tokio::test]
    async fn reads_lines_from_a_pty_and_fails_when_the_other_end_closes() {
        let (master, slave) = tokio_serial::SerialStream::pair().expect("openpty");
        let slave_path = tokio_serial::SerialPort::name(&slave).expect("pty name");
        drop(slave);
        let (ctx, mut rx) = CollectorContext::new_test("weather");
        let cfg = config(&format!(
            "name: weather\npath: {slave_path}\nbaud: 115200\nformat: {{type: kv}}\ntags: {{site: roof}}\n"
        ));
        let task = tokio::spawn(cfg.build().run(ctx));
        let mut master = master;
        use tokio::io::AsyncWriteExt;
        // The collector may not have opened the port yet: repeat until a reading arrives.
        let intake = loop {
            master.write_all(b"t=21.5 h=40\n").await.unwrap();
            if let Ok(Some(i)) =
                tokio::time::timeout(std::time::Duration::from_millis(100), rx.recv()).await
            {
                break i;
            }
        };
        assert_eq!(
            intake.readings[0].body,
            Body::Fields(vec![
                ("t".into(), Value::F64(21.5)),
                ("h".into(), Value::I64(40)),
                ("tag.site".into(), Value::Str("roof".into())),
            ])
        );
        drop(master);
        let result = tokio::time::timeout(std::time::Duration::from_secs(5), task)
            .await
            .expect("the collector ends when the device goes away")
            .unwrap();
        let err = result.unwrap_err().to_string();
        assert!(err.contains(&slave_path), "{err}");
    }

    #[tokio::test]
    async fn a_missing_device_is_an_error_not_a_wait() {
        let (ctx, _rx) = CollectorContext::new_test("gps");
        let cfg = config("name: gps\npath: /nonexistent/ttyUSB9\n");
        let err = cfg.build().run(ctx).await.unwrap_err().to_string();
        assert!(err.contains("no such device"), "{err}");
    }
}
