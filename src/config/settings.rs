//! The validated, frozen configuration and the checks that produce it.

use super::raw::{RawCommands, RawCompression, RawConfig, RawStream, RawUplink};
use crate::collectors::CollectorConfig;
use crate::commands::{ActionSettings, CommandSettings, ParamSettings};
use crate::issue::Issue;
use crate::record::{COMMANDS_STREAM, LOSS_STREAM, is_valid_stream_name};
use crate::spool::{BatchLimits, DrainRules, Lane, LaneWeights, SpoolSettings, StreamDrain};
use crate::uplink::{
    AuthSettings, BackoffSettings, BudgetSettings, MqttVersion, StreamSettings, TlsSettings,
    UplinkSettings,
};
use crate::wire::{Compression, Format};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The whole agent configuration, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// The file it came from.
    pub source: PathBuf,
    pub device_id: String,
    /// Why this device id (`config`, or how the default was derived); logged at start.
    pub device_id_source: String,
    pub log_level: Option<String>,
    pub status_socket: PathBuf,
    pub clock: ClockSettings,
    /// Zero when self-metrics are off.
    pub self_metrics_interval: Duration,
    pub spool: SpoolSettings,
    pub uplink: UplinkSettings,
    pub commands: CommandSettings,
    pub collectors: Vec<CollectorConfig>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ClockSettings {
    pub assume_synced: bool,
    pub sync_marker: PathBuf,
}

/// Ratio between the batch byte limit and the stored chunk byte limit; see
/// [`SpoolSettings::chunk_max_bytes`].
const CHUNK_FRACTION: u64 = 8;
/// Room for the MQTT fixed header and topic beyond a batch's payload.
const PACKET_OVERHEAD_BYTES: u64 = 1024;
/// Worst-case growth of text in JSON: a control byte becomes `\u00XX`, six bytes.
const JSON_WORST_INFLATION: u64 = 6;
/// Room, beyond one record's text, for the message around it: device, boot, stream, seq,
/// timestamp, field names, a reply's status and exit code.
const RECORD_ENVELOPE_BYTES: u64 = 1024;
const LOG_LEVELS: [&str; 5] = ["error", "warn", "info", "debug", "trace"];

struct Checker {
    issues: Vec<Issue>,
}

impl Checker {
    fn fail(&mut self, path: &str, message: impl Into<String>) {
        self.issues.push(Issue::new(path, message));
    }

    fn range(&mut self, path: &str, value: u64, min: u64, max: u64) -> u64 {
        if value < min || value > max {
            self.fail(
                path,
                format!("must be between {min} and {max}, got {value}"),
            );
        }
        value.clamp(min, max)
    }

    fn readable(&mut self, path: &str, file: &Path) {
        if let Err(e) = std::fs::File::open(file) {
            self.fail(path, format!("cannot read {}: {e}", file.display()));
        }
    }
}

fn resolve(base: &Path, p: &str) -> PathBuf {
    let p = Path::new(p);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    }
}

pub(super) fn validate(raw: RawConfig, base: &Path, source: &Path) -> Result<Config, Vec<Issue>> {
    let mut c = Checker { issues: Vec::new() };

    let (device_id, device_id_source) = match raw.device_id.filter(|d| !d.is_empty()) {
        Some(d) => (d, "config".to_string()),
        None => {
            let d = super::device_id::default_device_id();
            (d.id, d.source)
        }
    };
    if !is_valid_stream_name(&device_id) {
        c.fail(
            "device_id",
            format!("{device_id:?} is not usable in an MQTT topic: use 1-64 characters of A-Z a-z 0-9 _ . -"),
        );
    }
    if let Some(level) = &raw.log_level
        && !LOG_LEVELS.contains(&level.as_str())
    {
        c.fail(
            "log_level",
            format!(
                "unknown level {level:?}; expected one of {}",
                LOG_LEVELS.join(", ")
            ),
        );
    }

    let s = &raw.spool;
    if s.dir.trim().is_empty() {
        c.fail("spool.dir", "must name a directory");
    }
    let max_bytes = c.range("spool.max_bytes", s.max_bytes, 64 << 10, 1 << 40);
    let flush_ms = c.range("spool.flush_interval_ms", s.flush_interval_ms, 1, 60_000);
    let flush_max = c.range("spool.flush_max_records", s.flush_max_records, 1, 100_000);
    let cache = c.range("spool.cache_bytes", s.cache_bytes, 256 << 10, 1 << 30);

    let uplink = validate_uplink(&mut c, &raw.uplink, &raw.streams, base, &device_id);
    let spool = SpoolSettings {
        dir: resolve(base, &s.dir),
        max_bytes,
        full_policy: s.full_policy,
        flush_interval: Duration::from_millis(flush_ms),
        flush_max_records: flush_max as usize,
        cache_bytes: cache,
        min_free_bytes: s.min_free_bytes,
        chunk_max_records: uplink.batch.max_records,
        chunk_max_bytes: (uplink.batch.max_bytes as u64 / CHUNK_FRACTION)
            .clamp(512, crate::spool::CHUNK_MAX_BYTES_CAP) as usize,
    };

    let commands = validate_commands(&mut c, &raw.commands, base);
    let status_socket = match raw.status_socket.as_deref() {
        Some(p) if !p.is_empty() => resolve(base, p),
        _ => default_status_socket(&spool.dir),
    };
    let self_metrics = if raw.self_metrics_interval_ms == 0 {
        0
    } else {
        c.range(
            "self_metrics_interval_ms",
            raw.self_metrics_interval_ms,
            1000,
            86_400_000,
        )
    };

    let mut collectors = Vec::new();
    let mut names = std::collections::HashSet::new();
    for (i, item) in raw.collectors.into_iter().enumerate() {
        let prefix = format!("collectors[{i}]");
        match CollectorConfig::from_yaml(item) {
            Ok(cfg) => {
                for issue in cfg.validate() {
                    c.issues
                        .push(Issue::new(join(&prefix, &issue.path), issue.message));
                }
                let name = cfg.name().to_string();
                if !is_valid_stream_name(&name) || name.starts_with("ferry.") || name == "commands"
                {
                    c.fail(
                        &format!("{prefix}.name"),
                        format!("{name:?} is not a usable stream name: use 1-64 characters of A-Z a-z 0-9 _ . -, not starting with \"ferry.\" and not \"commands\""),
                    );
                } else if !names.insert(name.clone()) {
                    c.fail(&format!("{prefix}.name"), format!("duplicate collector name {name:?}; names become stream names and must be unique"));
                }
                collectors.push(cfg);
            }
            Err(issues) => {
                for issue in issues {
                    c.issues
                        .push(Issue::new(join(&prefix, &issue.path), issue.message));
                }
            }
        }
    }

    check_record_limits(
        &mut c,
        &collectors,
        &commands,
        uplink.max_packet_bytes as u64,
    );

    if !c.issues.is_empty() {
        return Err(c.issues);
    }
    Ok(Config {
        source: source.to_path_buf(),
        device_id,
        device_id_source,
        log_level: raw.log_level,
        status_socket,
        clock: ClockSettings {
            assume_synced: raw.clock.assume_synced,
            sync_marker: PathBuf::from(&raw.clock.sync_marker),
        },
        self_metrics_interval: Duration::from_millis(self_metrics),
        spool,
        uplink,
        commands,
        collectors,
    })
}

/// Built-in command names; an action may not take one.
pub const BUILTIN_COMMANDS: &[&str] = &[
    "ping",
    "status",
    "reload_config",
    "set_interval",
    "sample_now",
    "set_log_level",
    "flush",
];

fn validate_commands(c: &mut Checker, r: &RawCommands, base: &Path) -> CommandSettings {
    let mut keys = Vec::new();
    for (i, k) in r.keys.iter().enumerate() {
        let path = resolve(base, &k.key_file);
        match std::fs::read(&path) {
            Ok(bytes) if bytes.iter().filter(|b| !b.is_ascii_whitespace()).count() < 16 => c.fail(
                &format!("commands.keys[{i}].key_file"),
                format!(
                    "{} holds fewer than 16 characters; use a long random secret",
                    path.display()
                ),
            ),
            Ok(_) => {}
            Err(e) => c.fail(
                &format!("commands.keys[{i}].key_file"),
                format!("cannot read {}: {e}", path.display()),
            ),
        }
        if k.id.is_empty() || keys.iter().any(|(id, _)| *id == k.id) {
            c.fail(
                &format!("commands.keys[{i}].id"),
                format!("key id {:?} is empty or used twice", k.id),
            );
        }
        keys.push((k.id.clone(), path));
    }
    if r.require_signature && keys.is_empty() {
        c.fail(
            "commands.require_signature",
            "is true but commands.keys is empty",
        );
    }
    let max_entries = c.range(
        "commands.ledger_max_entries",
        r.ledger_max_entries,
        10,
        1_000_000,
    );
    let max_age = c.range(
        "commands.ledger_max_age_s",
        r.ledger_max_age_s,
        60,
        365 * 86_400,
    );
    let mut actions: Vec<ActionSettings> = Vec::new();
    for (i, a) in r.actions.iter().enumerate() {
        let p = format!("commands.actions[{i}]");
        if !crate::record::is_valid_stream_name(&a.name)
            || BUILTIN_COMMANDS.contains(&a.name.as_str())
            || actions.iter().any(|x| x.name == a.name)
        {
            c.fail(&format!("{p}.name"), format!("{:?} is not a usable action name (1-64 of A-Z a-z 0-9 _ . -, unique, not a built-in command)", a.name));
        }
        let program = PathBuf::from(&a.program);
        if !program.is_absolute() {
            c.fail(
                &format!("{p}.program"),
                format!(
                    "{:?} must be an absolute path (actions never search PATH or use a shell)",
                    a.program
                ),
            );
        }
        let mut params: Vec<ParamSettings> = Vec::new();
        for (j, prm) in a.params.iter().enumerate() {
            if !crate::record::is_valid_stream_name(&prm.name)
                || params.iter().any(|x| x.name == prm.name)
            {
                c.fail(
                    &format!("{p}.params[{j}].name"),
                    format!("{:?} is not a usable parameter name", prm.name),
                );
            }
            params.push(ParamSettings {
                name: prm.name.clone(),
                kind: prm.kind,
                required: prm.required,
            });
        }
        let timeout = c.range(&format!("{p}.timeout_ms"), a.timeout_ms, 10, 86_400_000);
        let out = c.range(
            &format!("{p}.max_output_bytes"),
            a.max_output_bytes,
            0,
            1 << 20,
        );
        let conc = c.range(&format!("{p}.max_concurrent"), a.max_concurrent, 1, 64);
        actions.push(ActionSettings {
            name: a.name.clone(),
            program,
            args: a.args.clone(),
            params,
            timeout: Duration::from_millis(timeout),
            max_output_bytes: out as usize,
            max_concurrent: conc as usize,
        });
    }
    CommandSettings {
        enabled: r.enabled,
        require_signature: r.require_signature,
        keys,
        ledger_max_entries: max_entries as usize,
        ledger_max_age: Duration::from_secs(max_age),
        actions,
    }
}

/// The largest record a limit allows must fit in one message even in the worst case: every
/// byte a control character that JSON writes in six (invalid UTF-8 grows less: three), plus
/// the message's envelope and the packet's header. A limit that breaks this is refused, so no
/// record a collector or an action produces is too big for a packet (the uplink still reports
/// one as lost should it meet one, e.g. after `max_packet_bytes` was lowered).
fn check_record_limits(
    c: &mut Checker,
    collectors: &[CollectorConfig],
    commands: &CommandSettings,
    max_packet: u64,
) {
    let room = max_packet.saturating_sub(PACKET_OVERHEAD_BYTES + RECORD_ENVELOPE_BYTES);
    let largest_line = room / JSON_WORST_INFLATION;
    for (i, cfg) in collectors.iter().enumerate() {
        let (line, set) = match cfg {
            CollectorConfig::Serial(s) => (s.max_line_bytes, true),
            CollectorConfig::Exec(e) => (e.max_line_bytes, true),
            CollectorConfig::Listen(l) => (l.max_line_bytes, true),
            CollectorConfig::File(f) if f.mode == crate::collectors::file::FileMode::Tail => {
                (f.max_line_bytes(), f.max_line_bytes.is_some())
            }
            _ => continue,
        };
        if line > largest_line {
            let what = if set { "" } else { " (the default)" };
            c.fail(
                &format!("collectors[{i}].max_line_bytes"),
                format!(
                    "{line}{what} is too big for uplink.max_packet_bytes ({max_packet}): a line of control characters grows {JSON_WORST_INFLATION}x in JSON and must fit in one message with {} bytes of envelope; use at most {largest_line} or raise max_packet_bytes",
                    PACKET_OVERHEAD_BYTES + RECORD_ENVELOPE_BYTES
                ),
            );
        }
    }
    // A reply carries stdout and stderr, each up to max_output_bytes.
    let largest_output = room / (2 * JSON_WORST_INFLATION);
    for (i, a) in commands.actions.iter().enumerate() {
        if a.max_output_bytes as u64 > largest_output {
            c.fail(
                &format!("commands.actions[{i}].max_output_bytes"),
                format!(
                    "{} is too big for uplink.max_packet_bytes ({max_packet}): stdout and stderr, each up to this size, grow up to {JSON_WORST_INFLATION}x in JSON and must fit in one reply with {} bytes of envelope; use at most {largest_output} or raise max_packet_bytes",
                    a.max_output_bytes,
                    PACKET_OVERHEAD_BYTES + RECORD_ENVELOPE_BYTES
                ),
            );
        }
    }
}

/// `ferry.sock` in the directory that holds the spool directory.
pub fn default_status_socket(spool_dir: &Path) -> PathBuf {
    spool_dir
        .parent()
        .map_or_else(|| PathBuf::from("ferry.sock"), |p| p.join("ferry.sock"))
}

fn join(prefix: &str, path: &str) -> String {
    if path.is_empty() {
        prefix.to_string()
    } else if path.starts_with('[') {
        format!("{prefix}{path}")
    } else {
        format!("{prefix}.{path}")
    }
}

fn validate_uplink(
    c: &mut Checker,
    u: &RawUplink,
    streams: &BTreeMap<String, RawStream>,
    base: &Path,
    device_id: &str,
) -> UplinkSettings {
    if u.host.trim().is_empty() {
        c.fail("uplink.host", "must name the broker host");
    }
    if u.port == 0 {
        c.fail("uplink.port", "must be between 1 and 65535, got 0");
    }
    let client_id = u
        .client_id
        .clone()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| format!("ferry-{device_id}"));
    if client_id.len() > 128 {
        c.fail("uplink.client_id", "must be at most 128 characters");
    }
    if u.topic_prefix.is_empty()
        || u.topic_prefix.contains(['+', '#'])
        || u.topic_prefix.starts_with('/')
        || u.topic_prefix.ends_with('/')
    {
        c.fail(
            "uplink.topic_prefix",
            format!(
                "{:?} is not a usable topic prefix: non-empty, no + or #, no leading or trailing /",
                u.topic_prefix
            ),
        );
    }
    let keepalive = if u.keepalive_s == 0 {
        0
    } else {
        c.range("uplink.keepalive_s", u.keepalive_s, 1, 65_535)
    };
    let connect = c.range(
        "uplink.connect_timeout_ms",
        u.connect_timeout_ms,
        100,
        600_000,
    );
    let max_packet = c.range(
        "uplink.max_packet_bytes",
        u.max_packet_bytes,
        4096,
        256 << 20,
    );
    let mqtt_version = mqtt_version(c, u.mqtt_version.as_ref());
    if mqtt_version == MqttVersion::V5 && (1..MIN_KEEPALIVE_V5_S).contains(&keepalive) {
        c.fail(
            "uplink.keepalive_s",
            format!(
                "must be 0 or at least {MIN_KEEPALIVE_V5_S} with MQTT 5 (uplink.mqtt_version, default 5), got {keepalive}; set mqtt_version: 3.1.1 for a shorter keepalive"
            ),
        );
    }
    let window = c.range("uplink.window", u.window, 1, 64);
    let min_rate = c.range(
        "uplink.min_link_bytes_per_s",
        u.min_link_bytes_per_s,
        0,
        1 << 30,
    );
    let max_records = c.range("uplink.batch.max_records", u.batch.max_records, 1, 100_000);
    let batch_bytes = c.range("uplink.batch.max_bytes", u.batch.max_bytes, 1024, 128 << 20);
    if batch_bytes + PACKET_OVERHEAD_BYTES > max_packet {
        c.fail(
            "uplink.batch.max_bytes",
            format!("{batch_bytes} does not fit in uplink.max_packet_bytes ({max_packet}) with {PACKET_OVERHEAD_BYTES} bytes of room for the topic and header"),
        );
    }
    let linger = c.range("uplink.batch.linger_ms", u.batch.linger_ms, 0, 3_600_000);
    let b = &u.backoff;
    let initial = c.range("uplink.backoff.initial_ms", b.initial_ms, 1, 3_600_000);
    let max = c.range("uplink.backoff.max_ms", b.max_ms, 1, 86_400_000);
    if initial > max {
        c.fail(
            "uplink.backoff.max_ms",
            format!("must be at least backoff.initial_ms ({initial}), got {max}"),
        );
    }
    let reset = c.range(
        "uplink.backoff.reset_after_ms",
        b.reset_after_ms,
        0,
        86_400_000,
    );
    let grace = c.range("uplink.shutdown_grace_ms", u.shutdown_grace_ms, 0, 600_000);

    let tls = u.tls.as_ref().map(|t| {
        let ca = resolve(base, &t.ca_file);
        match std::fs::read(&ca) {
            Ok(pem) => {
                if let Err(e) = crate::tls::parse_ca(&pem) {
                    c.fail("uplink.tls.ca_file", format!("{}: {e}", ca.display()));
                }
            }
            Err(e) => c.fail(
                "uplink.tls.ca_file",
                format!("cannot read {}: {e}", ca.display()),
            ),
        }
        let client_cert = match (&t.cert_file, &t.key_file) {
            (Some(cert), Some(key)) => {
                let (cert, key) = (resolve(base, cert), resolve(base, key));
                c.readable("uplink.tls.cert_file", &cert);
                c.readable("uplink.tls.key_file", &key);
                if let (Ok(cp), Ok(kp)) = (std::fs::read(&cert), std::fs::read(&key))
                    && let Err(e) = crate::tls::parse_client_identity(&cp, &kp)
                {
                    c.fail("uplink.tls.cert_file", e.to_string());
                }
                Some((cert, key))
            }
            (Some(_), None) => {
                c.fail(
                    "uplink.tls.key_file",
                    "is required when cert_file is set (mutual TLS needs both)",
                );
                None
            }
            (None, Some(_)) => {
                c.fail(
                    "uplink.tls.cert_file",
                    "is required when key_file is set (mutual TLS needs both)",
                );
                None
            }
            (None, None) => None,
        };
        TlsSettings {
            ca_file: ca,
            client_cert,
        }
    });
    let auth = u.auth.as_ref().map(|a| {
        if a.username.is_empty() {
            c.fail("uplink.auth.username", "must not be empty");
        }
        let password_file = a.password_file.as_ref().map(|p| resolve(base, p));
        if let Some(p) = &password_file {
            c.readable("uplink.auth.password_file", p);
        }
        AuthSettings {
            username: a.username.clone(),
            password_file,
        }
    });

    UplinkSettings {
        host: u.host.clone(),
        port: u.port,
        client_id,
        topic_prefix: u.topic_prefix.clone(),
        device_id: device_id.to_string(),
        keepalive: Duration::from_secs(keepalive),
        connect_timeout: Duration::from_millis(connect),
        max_packet_bytes: max_packet as usize,
        mqtt_version,
        window: window as usize,
        inflight_bytes: (keepalive > 0 && min_rate > 0)
            .then(|| ((keepalive * min_rate / 2) as usize).max(1024)),
        batch: BatchLimits {
            max_records: max_records as usize,
            max_bytes: batch_bytes as usize,
            linger: Duration::from_millis(linger),
        },
        backoff: BackoffSettings {
            initial: Duration::from_millis(initial),
            max: Duration::from_millis(max),
            reset_after: Duration::from_millis(reset),
        },
        shutdown_grace: Duration::from_millis(grace),
        tls,
        auth,
        streams: validate_streams(c, u, streams),
        budget: BudgetSettings {
            daily_bytes: budget(
                c,
                "uplink.budget.daily_bytes",
                u.budget.daily_bytes,
                max_packet,
            ),
            monthly_bytes: budget(
                c,
                "uplink.budget.monthly_bytes",
                u.budget.monthly_bytes,
                max_packet,
            ),
        },
    }
}

/// The shortest keepalive rumqttc's MQTT 5 client accepts.
const MIN_KEEPALIVE_V5_S: u64 = 5;

/// `uplink.mqtt_version`: `5` (a number or a string) or the string `3.1.1`; unset is the
/// default, 5 (which falls back to 3.1.1 when a broker refuses it).
fn mqtt_version(c: &mut Checker, raw: Option<&super::raw::RawScalar>) -> MqttVersion {
    use super::raw::RawScalar;
    match raw {
        None => MqttVersion::default(),
        Some(RawScalar::Int(5)) => MqttVersion::V5,
        Some(RawScalar::Str(s)) if s == "5" => MqttVersion::V5,
        Some(RawScalar::Str(s)) if s == "3.1.1" => MqttVersion::V311,
        Some(other) => {
            c.fail(
                "uplink.mqtt_version",
                format!("must be 5 or 3.1.1, got {other}"),
            );
            MqttVersion::default()
        }
    }
}

/// A budget must hold the largest message ferry sends (`max_packet`): ferry cuts messages to
/// what is left of a period, but one stored chunk (a single big record) may fill a packet, and a
/// message that never fits a whole period would stop the normal and bulk lanes for good.
fn budget(c: &mut Checker, path: &str, value: Option<u64>, max_packet: u64) -> Option<u64> {
    value.map(|v| {
        if v < max_packet {
            c.fail(
                path,
                format!(
                    "must be at least uplink.max_packet_bytes ({max_packet}) bytes, got {v}: a message as big as a packet must fit in one period, or the normal and bulk lanes would stop for good"
                ),
            );
        }
        v.max(max_packet)
    })
}

fn compression(c: &mut Checker, path: &str, kind: RawCompression, level: i64) -> Compression {
    let range = zstd::compression_level_range();
    let (lo, hi) = (*range.start() as i64, *range.end() as i64);
    if level < lo || level > hi {
        c.fail(
            path,
            format!("must be a zstd level between {lo} and {hi}, got {level}"),
        );
    }
    match kind {
        RawCompression::None => Compression::None,
        RawCompression::Zstd => Compression::Zstd {
            level: level.clamp(lo, hi) as i32,
        },
    }
}

fn validate_streams(
    c: &mut Checker,
    u: &RawUplink,
    streams: &BTreeMap<String, RawStream>,
) -> StreamSettings {
    let default_format = Format {
        encoding: u.encoding,
        compression: compression(c, "uplink.zstd_level", u.compression, u.zstd_level),
    };
    let weights = LaneWeights {
        normal: c.range("uplink.lanes.normal_weight", u.lanes.normal_weight, 1, 1000) as u32,
        bulk: c.range("uplink.lanes.bulk_weight", u.lanes.bulk_weight, 1, 1000) as u32,
    };
    let mut out = StreamSettings {
        default_format,
        formats: BTreeMap::new(),
        drain: DrainRules {
            weights,
            streams: BTreeMap::new(),
        },
    };
    for (name, s) in streams {
        let path = format!("streams.{name}");
        if !is_valid_stream_name(name) {
            c.fail(
                &path,
                format!("{name:?} is not a stream name: 1-64 characters of A-Z a-z 0-9 _ . -"),
            );
            continue;
        }
        let fixed_high = name == COMMANDS_STREAM || name == LOSS_STREAM;
        if fixed_high && s.lane.is_some_and(|l| l != Lane::High) {
            c.fail(
                &format!("{path}.lane"),
                format!("{name} always travels on the high lane"),
            );
        }
        if fixed_high && s.live_first {
            c.fail(
                &format!("{path}.live_first"),
                format!("{name} is always sent oldest first"),
            );
        }
        if name == COMMANDS_STREAM && (s.encoding.is_some() || s.compression.is_some()) {
            c.fail(
                &path,
                "command replies are always plain JSON on the replies topic",
            );
        }
        let format = Format {
            encoding: s.encoding.unwrap_or(u.encoding),
            compression: compression(
                c,
                &format!("{path}.zstd_level"),
                s.compression.unwrap_or(u.compression),
                s.zstd_level.unwrap_or(u.zstd_level),
            ),
        };
        out.formats.insert(name.clone(), format);
        let default = out.drain.of(name);
        out.drain.streams.insert(
            name.clone(),
            StreamDrain {
                lane: s.lane.unwrap_or(default.lane),
                live_first: s.live_first,
            },
        );
    }
    out
}
