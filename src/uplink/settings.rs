//! The uplink's settings. The uplink owns them; config validation fills them in from the file
//! (ranges, defaults, relative paths, readable TLS files), so the uplink never reads the config
//! itself. A reload sends a new `UplinkSettings` on the uplink's watch channel.

use crate::spool::{BatchLimits, DrainRules};
use crate::wire::Format;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Clone, PartialEq)]
pub struct UplinkSettings {
    pub host: String,
    pub port: u16,
    pub client_id: String,
    pub topic_prefix: String,
    pub device_id: String,
    /// Zero disables keepalive pings.
    pub keepalive: Duration,
    pub connect_timeout: Duration,
    pub max_packet_bytes: usize,
    /// The MQTT protocol version ferry asks for; 5 falls back to 3.1.1 when the broker
    /// refuses it.
    pub mqtt_version: MqttVersion,
    /// Batches in flight at once (published, PUBACK not yet seen).
    pub window: usize,
    /// Most payload bytes in flight at once (see `min_link_bytes_per_s`); at least one message
    /// is always allowed.
    pub inflight_bytes: Option<usize>,
    pub batch: BatchLimits,
    pub backoff: BackoffSettings,
    pub shutdown_grace: Duration,
    pub tls: Option<TlsSettings>,
    pub auth: Option<AuthSettings>,
    pub streams: StreamSettings,
    pub budget: BudgetSettings,
}

/// The MQTT protocol version of the CONNECT.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MqttVersion {
    /// MQTT 3.1.1 (protocol level 4): no reason codes; a broker that refuses a publish still
    /// acknowledges it.
    V311,
    /// MQTT 5: PUBACK reason codes, Maximum Packet Size, session and message expiry.
    #[default]
    V5,
}

impl MqttVersion {
    /// As written in the config and shown in `ferry status`.
    pub fn as_str(self) -> &'static str {
        match self {
            MqttVersion::V311 => "3.1.1",
            MqttVersion::V5 => "5",
        }
    }
}

/// How each stream is encoded and drained.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct StreamSettings {
    /// Streams not named in `formats`.
    pub default_format: Format,
    pub formats: BTreeMap<String, Format>,
    pub drain: DrainRules,
}

impl StreamSettings {
    pub fn format(&self, stream: &str) -> Format {
        self.formats
            .get(stream)
            .copied()
            .unwrap_or(self.default_format)
    }
}

/// Wire bytes (MQTT PUBLISH packets, headers included) allowed per period; `None` = no limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BudgetSettings {
    /// Per UTC day.
    pub daily_bytes: Option<u64>,
    /// Per UTC calendar month.
    pub monthly_bytes: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BackoffSettings {
    pub initial: Duration,
    pub max: Duration,
    /// A connection that stayed up this long resets the backoff to `initial`.
    pub reset_after: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TlsSettings {
    pub ca_file: PathBuf,
    pub client_cert: Option<(PathBuf, PathBuf)>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct AuthSettings {
    pub username: String,
    pub password_file: Option<PathBuf>,
}
