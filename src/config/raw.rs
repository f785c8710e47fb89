//! What the YAML file says, before validation. Every struct rejects unknown keys, so a typo
//! such as `tsl:` is an error instead of a silent default. Units are in the key names.

use crate::commands::ParamKind;
use crate::spool::FullPolicy;
use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// Device id used in topics; the host name when missing or empty.
    #[serde(default)]
    pub device_id: Option<String>,
    /// Log level when `RUST_LOG` is not set: error, warn, info, debug or trace.
    #[serde(default)]
    pub log_level: Option<String>,
    /// Unix socket `ferry status` talks to; `ferry.sock` beside the spool directory when missing.
    #[serde(default)]
    pub status_socket: Option<String>,
    /// How often the agent reports its own figures on the `ferry.self` stream; 0 turns it off.
    #[serde(default = "defaults::self_metrics_interval_ms")]
    pub self_metrics_interval_ms: u64,
    pub spool: RawSpool,
    pub uplink: RawUplink,
    /// How ferry decides whether the system clock can be trusted.
    #[serde(default)]
    pub clock: RawClock,
    /// The command channel; on with the built-in commands when missing.
    #[serde(default)]
    pub commands: RawCommands,
    /// Per-stream encoding, compression, lane and drain order (by stream name).
    #[serde(default)]
    pub streams: std::collections::BTreeMap<String, RawStream>,
    /// Each item is a collector; parsed by `collectors::CollectorConfig::from_yaml` so that
    /// errors inside an item keep their full key path.
    pub collectors: Vec<serde_yaml::Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSpool {
    pub dir: String,
    #[serde(default = "defaults::max_bytes")]
    pub max_bytes: u64,
    #[serde(default)]
    pub full_policy: FullPolicy,
    #[serde(default = "defaults::flush_interval_ms")]
    pub flush_interval_ms: u64,
    #[serde(default = "defaults::flush_max_records")]
    pub flush_max_records: u64,
    #[serde(default = "defaults::cache_bytes")]
    pub cache_bytes: u64,
    /// Free space the spool leaves on its filesystem; below it new readings are dropped and
    /// counted (reason `disk_full`) instead of risking ENOSPC inside sled.
    #[serde(default = "defaults::min_free_bytes")]
    pub min_free_bytes: u64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUplink {
    pub host: String,
    #[serde(default = "defaults::port")]
    pub port: u16,
    #[serde(default)]
    pub client_id: Option<String>,
    #[serde(default = "defaults::topic_prefix")]
    pub topic_prefix: String,
    #[serde(default = "defaults::keepalive_s")]
    pub keepalive_s: u64,
    #[serde(default = "defaults::connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    #[serde(default = "defaults::max_packet_bytes")]
    pub max_packet_bytes: u64,
    /// `5` or `3.1.1`; any scalar is read so that validation can say what is wrong with it.
    #[serde(default)]
    pub mqtt_version: Option<RawScalar>,
    #[serde(default = "defaults::window")]
    pub window: u64,
    /// The slowest the link may be, in bytes/s. Unacknowledged data is kept to what such a link
    /// sends in half a keepalive period, so a ping never queues behind more than the link can
    /// carry before the broker's answer is due (otherwise a busy slow link is taken for a dead
    /// one). 0 turns the limit off.
    #[serde(default = "defaults::min_link_bytes_per_s")]
    pub min_link_bytes_per_s: u64,
    #[serde(default)]
    pub batch: RawBatch,
    #[serde(default)]
    pub backoff: RawBackoff,
    #[serde(default = "defaults::shutdown_grace_ms")]
    pub shutdown_grace_ms: u64,
    #[serde(default)]
    pub tls: Option<RawTls>,
    #[serde(default)]
    pub auth: Option<RawAuth>,
    /// Encoding of every stream not configured under `streams`.
    #[serde(default)]
    pub encoding: crate::wire::Encoding,
    #[serde(default)]
    pub compression: RawCompression,
    #[serde(default = "defaults::zstd_level")]
    pub zstd_level: i64,
    #[serde(default)]
    pub lanes: RawLanes,
    /// Wire bytes allowed per UTC day and/or calendar month; when spent only the high lane
    /// flows until the period rolls over.
    #[serde(default)]
    pub budget: RawBudget,
}

/// A scalar as YAML typed it (`5` is a number, `3.1.1` a string, `3.1` a float).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum RawScalar {
    Int(i64),
    Float(f64),
    Bool(bool),
    Str(String),
}

impl std::fmt::Display for RawScalar {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RawScalar::Int(i) => write!(f, "{i}"),
            RawScalar::Float(x) => write!(f, "{x}"),
            RawScalar::Bool(b) => write!(f, "{b}"),
            RawScalar::Str(s) => write!(f, "{s:?}"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RawCompression {
    #[default]
    None,
    Zstd,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLanes {
    #[serde(default = "defaults::normal_weight")]
    pub normal_weight: u64,
    #[serde(default = "defaults::bulk_weight")]
    pub bulk_weight: u64,
}

impl Default for RawLanes {
    fn default() -> Self {
        RawLanes {
            normal_weight: defaults::normal_weight(),
            bulk_weight: defaults::bulk_weight(),
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBudget {
    #[serde(default)]
    pub daily_bytes: Option<u64>,
    #[serde(default)]
    pub monthly_bytes: Option<u64>,
}

/// One stream's overrides; what is missing comes from `uplink`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStream {
    #[serde(default)]
    pub encoding: Option<crate::wire::Encoding>,
    #[serde(default)]
    pub compression: Option<RawCompression>,
    #[serde(default)]
    pub zstd_level: Option<i64>,
    #[serde(default)]
    pub lane: Option<crate::spool::Lane>,
    /// After an outage send the newest batch first, then the backlog oldest-first.
    #[serde(default)]
    pub live_first: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBatch {
    #[serde(default = "defaults::batch_max_records")]
    pub max_records: u64,
    #[serde(default = "defaults::batch_max_bytes")]
    pub max_bytes: u64,
    #[serde(default = "defaults::linger_ms")]
    pub linger_ms: u64,
}

impl Default for RawBatch {
    fn default() -> Self {
        RawBatch {
            max_records: defaults::batch_max_records(),
            max_bytes: defaults::batch_max_bytes(),
            linger_ms: defaults::linger_ms(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBackoff {
    #[serde(default = "defaults::backoff_initial_ms")]
    pub initial_ms: u64,
    #[serde(default = "defaults::backoff_max_ms")]
    pub max_ms: u64,
    #[serde(default = "defaults::backoff_reset_after_ms")]
    pub reset_after_ms: u64,
}

impl Default for RawBackoff {
    fn default() -> Self {
        RawBackoff {
            initial_ms: defaults::backoff_initial_ms(),
            max_ms: defaults::backoff_max_ms(),
            reset_after_ms: defaults::backoff_reset_after_ms(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    pub ca_file: String,
    #[serde(default)]
    pub cert_file: Option<String>,
    #[serde(default)]
    pub key_file: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAuth {
    pub username: String,
    /// File holding the password (trailing newline ignored); keep it 0640 root:ferry.
    #[serde(default)]
    pub password_file: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawClock {
    /// Trust the clock from the start (a gateway with a battery-backed real-time clock).
    #[serde(default)]
    pub assume_synced: bool,
    /// File whose existence means "synchronised" (systemd-timesyncd's by default).
    #[serde(default = "defaults::sync_marker")]
    pub sync_marker: String,
}

impl Default for RawClock {
    fn default() -> Self {
        RawClock {
            assume_synced: false,
            sync_marker: defaults::sync_marker(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCommands {
    #[serde(default = "defaults::yes")]
    pub enabled: bool,
    /// Refuse commands without a valid HMAC-SHA256 signature by one of `keys`.
    #[serde(default)]
    pub require_signature: bool,
    #[serde(default)]
    pub keys: Vec<RawKey>,
    /// Recent command ids (and their final replies) kept to run each command at most once.
    #[serde(default = "defaults::ledger_max_entries")]
    pub ledger_max_entries: u64,
    #[serde(default = "defaults::ledger_max_age_s")]
    pub ledger_max_age_s: u64,
    #[serde(default)]
    pub actions: Vec<RawAction>,
}

impl Default for RawCommands {
    fn default() -> Self {
        RawCommands {
            enabled: true,
            require_signature: false,
            keys: Vec::new(),
            ledger_max_entries: defaults::ledger_max_entries(),
            ledger_max_age_s: defaults::ledger_max_age_s(),
            actions: Vec::new(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawKey {
    /// Key id a signed command names in `sig.kid`; lets keys rotate.
    pub id: String,
    /// File holding the shared secret (trailing newline ignored); keep it 0640 root:ferry.
    pub key_file: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAction {
    pub name: String,
    /// Absolute path of the program; run directly, never through a shell.
    pub program: String,
    /// Fixed arguments, before the parameters.
    #[serde(default)]
    pub args: Vec<String>,
    /// Parameters a command may pass, appended in this order as separate arguments.
    #[serde(default)]
    pub params: Vec<RawParam>,
    #[serde(default = "defaults::action_timeout_ms")]
    pub timeout_ms: u64,
    #[serde(default = "defaults::action_max_output_bytes")]
    pub max_output_bytes: u64,
    #[serde(default = "defaults::action_max_concurrent")]
    pub max_concurrent: u64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawParam {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: ParamKind,
    #[serde(default)]
    pub required: bool,
}

/// Defaults, in one place so docs and code agree.
pub mod defaults {
    pub fn yes() -> bool {
        true
    }
    pub fn zstd_level() -> i64 {
        3
    }
    pub fn normal_weight() -> u64 {
        4
    }
    pub fn bulk_weight() -> u64 {
        1
    }
    pub fn sync_marker() -> String {
        crate::clock::DEFAULT_SYNC_MARKER.into()
    }
    pub fn self_metrics_interval_ms() -> u64 {
        60_000
    }
    pub fn ledger_max_entries() -> u64 {
        1000
    }
    pub fn ledger_max_age_s() -> u64 {
        7 * 24 * 3600
    }
    pub fn action_timeout_ms() -> u64 {
        30_000
    }
    pub fn action_max_output_bytes() -> u64 {
        4096
    }
    pub fn action_max_concurrent() -> u64 {
        1
    }
    pub fn max_bytes() -> u64 {
        256 << 20
    }
    pub fn flush_interval_ms() -> u64 {
        200
    }
    pub fn flush_max_records() -> u64 {
        1000
    }
    pub fn min_free_bytes() -> u64 {
        16 << 20
    }
    pub fn cache_bytes() -> u64 {
        4 << 20
    }
    pub fn port() -> u16 {
        1883
    }
    pub fn topic_prefix() -> String {
        "ferry".into()
    }
    pub fn keepalive_s() -> u64 {
        60
    }
    pub fn connect_timeout_ms() -> u64 {
        30_000
    }
    pub fn max_packet_bytes() -> u64 {
        256 << 10
    }
    pub fn min_link_bytes_per_s() -> u64 {
        2400
    }
    pub fn window() -> u64 {
        4
    }
    pub fn batch_max_records() -> u64 {
        500
    }
    pub fn batch_max_bytes() -> u64 {
        64 << 10
    }
    pub fn linger_ms() -> u64 {
        5_000
    }
    pub fn backoff_initial_ms() -> u64 {
        1_000
    }
    pub fn backoff_max_ms() -> u64 {
        300_000
    }
    pub fn backoff_reset_after_ms() -> u64 {
        60_000
    }
    pub fn shutdown_grace_ms() -> u64 {
        5_000
    }
}
