//! The modbus collector: polls meters and PLCs over Modbus TCP or Modbus RTU (a serial line,
//! configured like the serial collector) every `interval_ms`, reading a register map into one
//! reading with one field per entry. The map, request grouping and value conversion are in
//! [`map`]; this file is the config, the schedule and the link to the device.
//!
//! Invariants:
//! - **One request per group, not per value.** Entries of one unit and function that are
//!   adjacent or overlap are read by one request (see [`map::plan`]).
//! - **A request that gets no usable answer is a loss record, never the end of the
//!   collector.** A timeout (`timeout`), an exception response (`modbus_exception`, with the
//!   code in the sample), a link that cannot be opened or broke (`failed`) and a value that
//!   cannot be a field (`malformed`: NaN, a short answer) are counted per request and
//!   reported on `ferry.loss`; the fields of the requests that did answer are still sent.
//!   Losses are reported when the device answers in full again, or at the latest
//!   [`LOSS_REPORT_WINDOW`] after the first unreported one (one record per reason with a
//!   count), so a dead device costs a few records a minute, not one per poll.
//! - **The schedule is kept.** The next poll comes at the next tick whatever the last one
//!   gave; a broken link is reopened at the next request, at the pace of the schedule (no
//!   retry loop of its own). Each request waits at most `timeout_ms`; a unit that did not
//!   answer is not asked again in the same poll, so one dead unit on a bus costs one timeout
//!   per poll. After a timeout or a transport error the link is closed and reopened, so a late
//!   answer cannot be taken for the answer to a later request.
//! - **No panics on bad answers.** Answers are checked against the request (count, function)
//!   here, not by the Modbus library's debug assertions.
//! - RTU opens the port like the serial collector (tokio-serial, no libudev, exclusive) and a
//!   reconfigured run waits for the previous one to close it
//!   ([`exclusive_run`](super::common::exclusive_run)).

pub mod map;

use super::common::{LossReason, LossTally, Tags, add_tags, validate_tags};
use super::serial::Parity;
use super::{Collector, CollectorContext, CollectorError, CollectorSpec, RunFuture};
use crate::issue::Issue;
use crate::record::{Reading, Value};
use crate::spool::Intake;
use map::{Entry, Function, Order, Request};
use serde::Deserialize;
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;
use tokio_modbus::client::{Client, Context};
use tokio_modbus::slave::{Slave, SlaveContext};

/// Shortest interval accepted.
pub const MIN_INTERVAL_MS: u64 = 100;
/// Most entries one map may have (each is a field of every reading).
pub const MAX_ENTRIES: usize = 1000;
/// Losses are reported at the latest this long after the first unreported one.
pub const LOSS_REPORT_WINDOW: Duration = Duration::from_secs(10);

fn yes() -> bool {
    true
}
fn default_interval_ms() -> u64 {
    10_000
}
fn default_timeout_ms() -> u64 {
    1_000
}
fn default_unit() -> u8 {
    1
}
fn default_port() -> u16 {
    502
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

/// The type of a value in the map (`type:`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ValueType {
    Bool,
    U16,
    I16,
    U32,
    I32,
    F32,
    U64,
    I64,
    F64,
}

impl ValueType {
    fn as_str(self) -> &'static str {
        match self {
            ValueType::Bool => "bool",
            ValueType::U16 => "u16",
            ValueType::I16 => "i16",
            ValueType::U32 => "u32",
            ValueType::I32 => "i32",
            ValueType::F32 => "f32",
            ValueType::U64 => "u64",
            ValueType::I64 => "i64",
            ValueType::F64 => "f64",
        }
    }
}

/// Modbus TCP: a device or gateway at `host:port`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TcpConfig {
    pub host: String,
    #[serde(default = "default_port")]
    pub port: u16,
}

/// Modbus RTU: a serial line, with the serial collector's settings.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RtuConfig {
    /// Absolute path of the port, e.g. `/dev/serial/by-id/usb-FTDI_...-if00-port0`.
    pub path: String,
    #[serde(default = "default_baud")]
    pub baud: u32,
    #[serde(default = "default_data_bits")]
    pub data_bits: u8,
    #[serde(default)]
    pub parity: Parity,
    #[serde(default = "default_stop_bits")]
    pub stop_bits: u8,
}

impl RtuConfig {
    fn port(&self) -> super::serial::PortSettings<'_> {
        super::serial::PortSettings {
            path: &self.path,
            baud: self.baud,
            data_bits: self.data_bits,
            parity: self.parity,
            stop_bits: self.stop_bits,
        }
    }
}

/// One entry of the register map.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegisterConfig {
    /// The field name in the reading.
    pub field: String,
    /// The unit (slave) id; the collector's `unit` by default.
    #[serde(default)]
    pub unit: Option<u8>,
    pub function: Function,
    /// 0-based protocol address (register 40001 of a data sheet is holding address 0).
    pub address: u32,
    /// `u16` for registers, `bool` for coils and discrete inputs by default.
    #[serde(default, rename = "type")]
    pub value_type: Option<ValueType>,
    /// Registers the value spans; optional, must match `type` when given.
    #[serde(default)]
    pub count: Option<u32>,
    #[serde(default)]
    pub byte_order: Order,
    #[serde(default)]
    pub word_order: Order,
    /// The field is `raw * scale + offset` (a float) when either is set.
    #[serde(default)]
    pub scale: Option<f64>,
    #[serde(default)]
    pub offset: Option<f64>,
}

impl RegisterConfig {
    pub fn value_type(&self) -> ValueType {
        self.value_type.unwrap_or(if self.function.is_bits() {
            ValueType::Bool
        } else {
            ValueType::U16
        })
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModbusConfig {
    pub name: String,
    #[serde(default = "yes")]
    pub enabled: bool,
    #[serde(default)]
    pub tags: Tags,
    /// Exactly one of `tcp` and `rtu`.
    #[serde(default)]
    pub tcp: Option<TcpConfig>,
    #[serde(default)]
    pub rtu: Option<RtuConfig>,
    /// Unit (slave) id of entries that name none.
    #[serde(default = "default_unit")]
    pub unit: u8,
    #[serde(default = "default_interval_ms")]
    pub interval_ms: u64,
    /// How long one request (or opening the link) may take.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    pub registers: Vec<RegisterConfig>,
    #[serde(default)]
    pub deadband: Option<super::deadband::DeadbandConfig>,
}

impl ModbusConfig {
    fn entries(&self) -> Vec<Entry> {
        self.registers
            .iter()
            .map(|r| Entry::from_config(r, self.unit))
            .collect()
    }

    fn link_issues(&self, issues: &mut Vec<Issue>) {
        match (&self.tcp, &self.rtu) {
            (Some(_), Some(_)) => {
                issues.push(Issue::new("rtu", "set either `tcp` or `rtu`, not both"))
            }
            (None, None) => issues.push(Issue::new(
                "",
                "missing the link: set `tcp: {host, port}` or `rtu: {path, baud, ...}`",
            )),
            _ => {}
        }
        if let Some(tcp) = &self.tcp {
            if tcp.host.trim().is_empty() {
                issues.push(Issue::new("tcp.host", "must not be empty"));
            }
            if tcp.port == 0 {
                issues.push(Issue::new("tcp.port", "must be between 1 and 65535, got 0"));
            }
        }
        if let Some(rtu) = &self.rtu {
            issues.extend(rtu.port().issues("rtu."));
        }
    }

    /// RTU units are 1-247 (0 is broadcast, which no device answers); TCP takes 0-255.
    fn unit_issue(&self, key: &str, unit: u8) -> Option<Issue> {
        (self.rtu.is_some() && !(1..=247).contains(&unit)).then(|| {
            Issue::new(
                key,
                format!("an RTU unit id must be between 1 and 247, got {unit}"),
            )
        })
    }

    fn register_issues(&self, issues: &mut Vec<Issue>) {
        if self.registers.is_empty() {
            issues.push(Issue::new("registers", "must list at least one value"));
        }
        if self.registers.len() > MAX_ENTRIES {
            issues.push(Issue::new(
                "registers",
                format!("at most {MAX_ENTRIES} values, got {}", self.registers.len()),
            ));
        }
        let mut fields: BTreeMap<&str, usize> = BTreeMap::new();
        for (i, r) in self.registers.iter().enumerate() {
            let key = |k: &str| format!("registers[{i}].{k}");
            if !crate::record::is_valid_stream_name(&r.field) || r.field.starts_with("tag.") {
                issues.push(Issue::new(
                    key("field"),
                    format!(
                        "a field name must be 1-64 characters of A-Z a-z 0-9 _ . - and not start with `tag.`, got {:?}",
                        r.field
                    ),
                ));
            }
            if let Some(first) = fields.insert(&r.field, i) {
                fields.insert(&r.field, first);
                issues.push(Issue::new(
                    key("field"),
                    format!(
                        "field name {:?} is already used by registers[{first}]",
                        r.field
                    ),
                ));
            }
            if let Some(unit) = r.unit {
                issues.extend(self.unit_issue(&key("unit"), unit));
            }
            issues.extend(entry_issues(r, &key));
        }
    }
}

/// Checks of one map entry that need no other entry.
fn entry_issues(r: &RegisterConfig, key: &dyn Fn(&str) -> String) -> Vec<Issue> {
    let mut issues = Vec::new();
    let t = r.value_type();
    let width = t.width() as u32;
    let what = if r.function.is_bits() {
        "bits"
    } else {
        "registers"
    };
    if r.function.is_bits() && t != ValueType::Bool {
        issues.push(Issue::new(
            key("type"),
            format!(
                "a {} is one bit: its type must be bool, got {}",
                r.function.as_str(),
                t.as_str()
            ),
        ));
    } else if !r.function.is_bits() && t == ValueType::Bool {
        issues.push(Issue::new(
            key("type"),
            format!(
                "bool is for coil and discrete; a {} register is u16, i16, u32, i32, f32, u64, i64 or f64",
                r.function.as_str()
            ),
        ));
    }
    if let Some(count) = r.count
        && count != width
    {
        issues.push(Issue::new(
            key("count"),
            format!(
                "count {count} does not match type {}, which spans {width} {what}",
                t.as_str()
            ),
        ));
    }
    if r.address > u16::MAX as u32 {
        issues.push(Issue::new(
            key("address"),
            format!("must be between 0 and 65535, got {}", r.address),
        ));
    } else if r.address + width - 1 > u16::MAX as u32 {
        issues.push(Issue::new(
            key("address"),
            format!(
                "address overflow: a {} at {} spans {width} {what} and ends past 65535",
                t.as_str(),
                r.address
            ),
        ));
    }
    for (name, v) in [("scale", r.scale), ("offset", r.offset)] {
        match v {
            Some(_) if t == ValueType::Bool => issues.push(Issue::new(
                key(name),
                format!("{name} applies to numbers, not to a bool"),
            )),
            Some(v) if !v.is_finite() || (name == "scale" && v == 0.0) => issues.push(Issue::new(
                key(name),
                format!("must be a finite non-zero number, got {v}"),
            )),
            _ => {}
        }
    }
    issues
}

impl CollectorSpec for ModbusConfig {
    fn name(&self) -> &str {
        &self.name
    }

    fn enabled(&self) -> bool {
        self.enabled
    }

    fn validate(&self) -> Vec<Issue> {
        let mut issues = validate_tags(&self.tags);
        self.link_issues(&mut issues);
        issues.extend(self.unit_issue("unit", self.unit));
        if !(MIN_INTERVAL_MS..=86_400_000).contains(&self.interval_ms) {
            issues.push(Issue::new(
                "interval_ms",
                format!(
                    "must be between {MIN_INTERVAL_MS} and 86400000, got {}",
                    self.interval_ms
                ),
            ));
        }
        if !(10..=self.interval_ms.clamp(10, 60_000)).contains(&self.timeout_ms) {
            issues.push(Issue::new(
                "timeout_ms",
                format!(
                    "must be between 10 and interval_ms (at most 60000), got {}",
                    self.timeout_ms
                ),
            ));
        }
        self.register_issues(&mut issues);
        issues
    }

    fn build(&self) -> Box<dyn Collector> {
        Box::new(ModbusCollector {
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

pub struct ModbusCollector {
    config: ModbusConfig,
}

impl Collector for ModbusCollector {
    fn run(self: Box<Self>, ctx: CollectorContext) -> RunFuture {
        Box::pin(run(self.config, ctx))
    }
}

/// Why the link to the device could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("cannot connect to {addr}: no answer within {timeout_ms} ms")]
    ConnectTimeout { addr: String, timeout_ms: u64 },
    #[error(transparent)]
    Serial(#[from] super::serial::SerialError),
}

/// The open link to the device, if any; opened on demand.
struct Link {
    config: std::sync::Arc<ModbusConfig>,
    context: Option<Context>,
}

impl Link {
    async fn get(&mut self) -> Result<&mut Context, LinkError> {
        if self.context.is_none() {
            self.context = Some(open(&self.config).await?);
        }
        Ok(self.context.as_mut().expect("opened above"))
    }

    fn close(&mut self) {
        self.context = None;
    }
}

/// Opens the link of `config`: connects to the TCP device or opens the serial port.
async fn open(config: &ModbusConfig) -> Result<Context, LinkError> {
    let timeout_ms = config.timeout_ms;
    if let Some(tcp) = &config.tcp {
        let addr = format!("{}:{}", tcp.host, tcp.port);
        let connect = tokio::net::TcpStream::connect((tcp.host.as_str(), tcp.port));
        let stream = tokio::time::timeout(Duration::from_millis(timeout_ms), connect)
            .await
            .map_err(|_| LinkError::ConnectTimeout {
                addr: addr.clone(),
                timeout_ms,
            })?
            .map_err(|source| LinkError::Connect {
                addr: addr.clone(),
                source,
            })?;
        let _ = stream.set_nodelay(true);
        tracing::info!(collector = %config.name, addr = %addr, "Modbus TCP connected.");
        return Ok(tokio_modbus::client::tcp::attach_slave(
            stream,
            Slave(config.unit),
        ));
    }
    let rtu = config.rtu.as_ref().expect("validated: tcp or rtu is set");
    let port = rtu.port().open()?;
    // Bytes that arrived while the port was closed (a late answer to a request that timed
    // out) must not be read as the answer to the next request.
    if let Err(e) = tokio_serial::SerialPort::clear(&port, tokio_serial::ClearBuffer::Input) {
        tracing::debug!(collector = %config.name, error = %e, "Cannot flush the port's input.");
    }
    tracing::info!(collector = %config.name, path = %rtu.path, baud = rtu.baud, "Modbus RTU port opened.");
    Ok(tokio_modbus::client::rtu::attach_slave(
        port,
        Slave(config.unit),
    ))
}

async fn run(config: ModbusConfig, ctx: CollectorContext) -> Result<(), CollectorError> {
    let entries = config.entries();
    let requests = map::plan(&entries);
    // RTU owns its port exclusively: wait for a previous run of this collector to close it.
    let _run = match config.rtu {
        Some(_) => match super::common::exclusive_run(&ctx.name, &ctx.shutdown).await {
            Some(guard) => Some(guard),
            None => return Ok(()),
        },
        None => None,
    };
    tracing::info!(collector = %ctx.name, values = entries.len(), requests = requests.len(), "Modbus polling started.");
    let config = std::sync::Arc::new(config);
    let mut link = Link {
        config: config.clone(),
        context: None,
    };
    let mut losses = LossTally::default();
    // Whether the last poll was complete; a change is logged once, not every poll.
    let mut healthy = true;
    let mut ticker = tokio::time::interval(Duration::from_millis(config.interval_ms));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let poller = Poller {
        config: &config,
        entries: &entries,
        requests: &requests,
    };
    loop {
        tokio::select! {
            _ = ctx.shutdown.cancelled() => break,
            _ = ticker.tick() => {}
            _ = ctx.sample_now.notified() => {}
        }
        let polled = tokio::select! {
            _ = ctx.shutdown.cancelled() => break,
            polled = poller.poll(&mut link, &mut losses) => polled,
        };
        match (&polled.first_error, healthy) {
            (Some(e), true) => {
                tracing::warn!(collector = %ctx.name, error = %e, "Modbus device did not answer in full; reported on ferry.loss.");
            }
            (None, false) => tracing::info!(collector = %ctx.name, "Modbus device answers again."),
            _ => {}
        }
        healthy = polled.complete;
        let mut readings = Vec::with_capacity(2);
        if !polled.fields.is_empty() {
            let mut fields = polled.fields;
            add_tags(&mut fields, &config.tags);
            readings.push(Reading::fields(ctx.name.clone(), fields));
        }
        if polled.complete {
            losses.drain_into(&ctx.name, &mut readings);
        } else {
            losses.drain_due(&ctx.name, &mut readings, LOSS_REPORT_WINDOW);
        }
        if !readings.is_empty() {
            ctx.send(Intake {
                readings,
                ..Intake::default()
            })
            .await?;
        }
    }
    // Shutdown: what was counted is reported with the run's last intake.
    let mut readings = Vec::new();
    losses.drain_into(&ctx.name, &mut readings);
    if !readings.is_empty() {
        ctx.send(Intake {
            readings,
            ..Intake::default()
        })
        .await?;
    }
    Ok(())
}

/// What one poll gave.
#[derive(Debug, Default)]
struct Polled {
    /// The fields of the entries whose requests answered, in map order.
    fields: Vec<(String, Value)>,
    /// Every request answered and every value decoded.
    complete: bool,
    /// What went wrong first, for the log.
    first_error: Option<String>,
}

/// One answer to a read request.
enum Answer {
    Words(Vec<u16>),
    Bits(Vec<bool>),
}

struct Poller<'a> {
    config: &'a ModbusConfig,
    entries: &'a [Entry],
    requests: &'a [Request],
}

impl Poller<'_> {
    /// Sends every request once, in order; see the module doc for what a failure costs.
    async fn poll(&self, link: &mut Link, losses: &mut LossTally) -> Polled {
        let mut values: Vec<Option<Value>> = vec![None; self.entries.len()];
        let mut silent_units = BTreeSet::new();
        let mut link_down: Option<String> = None;
        let mut first_error = None;
        let mut fail = |reason: LossReason, message: String| {
            losses.note(reason, message.as_bytes());
            first_error.get_or_insert(message);
        };
        let timeout_ms = self.config.timeout_ms;
        for req in self.requests {
            let what = req.describe();
            if silent_units.contains(&req.unit) {
                fail(
                    LossReason::Timeout,
                    format!("{what}: not asked, the unit did not answer this poll"),
                );
                continue;
            }
            if let Some(e) = &link_down {
                fail(LossReason::Failed, format!("{what}: {e}"));
                continue;
            }
            let context = match link.get().await {
                Ok(c) => c,
                Err(e) => {
                    fail(LossReason::Failed, format!("{what}: {e}"));
                    link_down = Some(e.to_string());
                    continue;
                }
            };
            let answer =
                tokio::time::timeout(Duration::from_millis(timeout_ms), read(context, req));
            match answer.await {
                Err(_) => {
                    silent_units.insert(req.unit);
                    link.close();
                    fail(
                        LossReason::Timeout,
                        format!("{what}: no answer within {timeout_ms} ms"),
                    );
                }
                Ok(Err(ReadError::Exception(code))) => fail(
                    LossReason::ModbusException,
                    format!("{what}: exception {} ({code:?})", u8::from(code)),
                ),
                Ok(Err(e)) => {
                    link.close();
                    fail(LossReason::Failed, format!("{what}: {e}"));
                }
                Ok(Ok(answer)) => {
                    for &(i, at) in &req.entries {
                        let entry = &self.entries[i];
                        let decoded = match &answer {
                            Answer::Words(w) => map::decode_registers(entry, w, at),
                            Answer::Bits(b) => map::decode_bits(entry, b, at),
                        };
                        match decoded {
                            Ok(v) => values[i] = Some(v),
                            Err(e) => fail(LossReason::Malformed, format!("{what}: {e}")),
                        }
                    }
                }
            }
        }
        let fields = self
            .entries
            .iter()
            .zip(values)
            .filter_map(|(e, v)| v.map(|v| (e.field.clone(), v)))
            .collect();
        Polled {
            fields,
            complete: first_error.is_none(),
            first_error,
        }
    }
}

/// Why a read request got no usable answer (besides a timeout).
#[derive(Debug, thiserror::Error)]
enum ReadError {
    #[error("exception {0:?}")]
    Exception(tokio_modbus::ExceptionCode),
    /// The link broke. tokio-modbus reports a TCP connection the device closed with the last
    /// OS error, whatever it was, hence the hint.
    #[error("link broke (closed by the device?): {0}")]
    Link(#[from] tokio_modbus::Error),
    #[error("answer does not match the request: {0}")]
    Mismatch(String),
}

/// Sends one read request and checks that the answer is for it.
async fn read(context: &mut Context, req: &Request) -> Result<Answer, ReadError> {
    use tokio_modbus::{Request as Q, Response as R};
    context.set_slave(Slave(req.unit));
    let (a, n) = (req.address, req.count);
    let query = match req.function {
        Function::Holding => Q::ReadHoldingRegisters(a, n),
        Function::Input => Q::ReadInputRegisters(a, n),
        Function::Coil => Q::ReadCoils(a, n),
        Function::Discrete => Q::ReadDiscreteInputs(a, n),
    };
    let response = context.call(query).await?.map_err(ReadError::Exception)?;
    let n = n as usize;
    match (req.function, response) {
        (Function::Holding, R::ReadHoldingRegisters(w))
        | (Function::Input, R::ReadInputRegisters(w))
            if w.len() == n =>
        {
            Ok(Answer::Words(w))
        }
        // Bits come in whole bytes: the answer may have up to 7 more than asked for.
        (Function::Coil, R::ReadCoils(mut b))
        | (Function::Discrete, R::ReadDiscreteInputs(mut b))
            if b.len() >= n =>
        {
            b.truncate(n);
            Ok(Answer::Bits(b))
        }
        (_, other) => Err(ReadError::Mismatch(format!(
            "asked for {} {} at {}, got {other:?}",
            n,
            req.function.as_str(),
            req.address
        ))),
    }
}

#[cfg(test)]
mod tests;
