//! Builds rumqttc's options for one connection epoch, setting explicitly what rumqttc
//! defaults wrongly for slow links: connect/flush timeout (default 5 s), packet size limits
//! (default 10 KiB), keepalive, session persistence, in-flight limit, last will.

use super::UplinkSettings;
use crate::tls::{self, TlsError};
use rumqttc::{LastWill, MqttOptions, NetworkOptions, QoS, TlsConfiguration, Transport, v5};
use std::time::Duration;

/// Topic names for one device.
#[derive(Debug, Clone)]
pub struct Topics {
    base: String,
}

impl Topics {
    pub fn new(prefix: &str, device: &str) -> Topics {
        Topics {
            base: format!("{prefix}/{device}"),
        }
    }

    pub fn data(&self, stream: &str) -> String {
        format!("{}/data/{stream}", self.base)
    }

    pub fn status(&self) -> String {
        format!("{}/status", self.base)
    }

    pub fn commands(&self) -> String {
        format!("{}/commands", self.base)
    }

    pub fn replies(&self) -> String {
        format!("{}/replies", self.base)
    }
}

/// The retained status payload.
pub fn status_payload(state: &str, boot: &str) -> Vec<u8> {
    serde_json::json!({
        "state": state,
        "version": crate::VERSION,
        "boot": boot,
        "ts": crate::clock::now_ms(),
    })
    .to_string()
    .into_bytes()
}

#[derive(Debug, thiserror::Error)]
pub enum OptionsError {
    #[error("{0}")]
    Tls(#[from] TlsError),
    #[error("cannot read password file {path}: {source}")]
    Password {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

/// The largest "remaining length" an MQTT packet can declare (256 MiB - 1).
pub const MQTT_MAX_REMAINING: usize = 268_435_455;

/// rumqttc's in-flight limit is also its packet id range; keeping it well above our window
/// makes pkid collisions (which stall rumqttc) rare.
pub fn rumqttc_inflight(window: usize) -> u16 {
    (window * 4 + 8).min(u16::MAX as usize) as u16
}

/// Options and network options for a fresh client. Reads the TLS and password files again, so
/// rotated files take effect at the next reconnect.
pub fn build(
    s: &UplinkSettings,
    topics: &Topics,
    boot: &str,
) -> Result<(MqttOptions, NetworkOptions), OptionsError> {
    let mut o = MqttOptions::new(s.client_id.clone(), s.host.clone(), s.port);
    o.set_keep_alive(s.keepalive);
    // A persistent session: the broker keeps our command subscription and queues commands
    // while we are offline. Delivery of our own data never relies on it (the spool does).
    o.set_clean_session(false);
    // Incoming: MQTT 3.1.1 cannot tell the broker our limit, and a packet over it makes
    // rumqttc drop the connection, after which the broker redelivers it on every reconnect
    // (one big command would stop all data). So accept any size the protocol allows (the
    // broker's message_size_limit bounds it); the command service refuses big requests.
    o.set_max_packet_size(MQTT_MAX_REMAINING, s.max_packet_bytes);
    o.set_inflight(rumqttc_inflight(s.window));
    // Commands are acknowledged only once recorded (see commands/): a crash in between makes
    // the broker redeliver instead of losing the command.
    o.set_manual_acks(true);
    o.set_last_will(LastWill::new(
        topics.status(),
        status_payload("offline", boot),
        QoS::AtLeastOnce,
        true,
    ));
    if let Some((user, password)) = credentials(s)? {
        o.set_credentials(user, password);
    }
    if let Some(t) = transport(s)? {
        o.set_transport(t);
    }
    Ok((o, network_options(s)))
}

/// MQTT 5 options: the same as [`build`], plus what 5 can say that 3.1.1 cannot: the
/// Maximum Packet Size the broker may send us, and a session expiry that keeps the session
/// (subscription, queued commands) across outages, as `clean_session = false` does in 3.1.1.
pub fn build_v5(
    s: &UplinkSettings,
    topics: &Topics,
    boot: &str,
) -> Result<v5::MqttOptions, OptionsError> {
    let mut o = v5::MqttOptions::new(s.client_id.clone(), s.host.clone(), s.port);
    o.set_keep_alive(s.keepalive);
    o.set_clean_start(false);
    o.set_session_expiry_interval(Some(SESSION_EXPIRY_S));
    // The broker must not send a packet over this; a command that does not fit is dropped by
    // the broker (never delivered), instead of ending our connection.
    o.set_max_packet_size(Some(u32::try_from(s.max_packet_bytes).unwrap_or(u32::MAX)));
    o.set_outgoing_inflight_upper_limit(rumqttc_inflight(s.window));
    o.set_manual_acks(true);
    o.set_last_will(v5::mqttbytes::v5::LastWill::new(
        topics.status(),
        status_payload("offline", boot),
        v5::mqttbytes::QoS::AtLeastOnce,
        true,
        None,
    ));
    if let Some((user, password)) = credentials(s)? {
        o.set_credentials(user, password);
    }
    if let Some(t) = transport(s)? {
        o.set_transport(t);
    }
    o.set_connection_timeout(s.connect_timeout.as_secs().max(1));
    o.set_network_options(network_options(s));
    Ok(o)
}

/// MQTT 5 session expiry: 0xFFFFFFFF means the session never expires, like a 3.1.1 session
/// with `clean_session = false` (the broker's own limit, e.g. Mosquitto's
/// `persistent_client_expiration`, still applies).
pub const SESSION_EXPIRY_S: u32 = u32::MAX;

/// User name and password, the password read from its file now.
fn credentials(s: &UplinkSettings) -> Result<Option<(String, String)>, OptionsError> {
    let Some(auth) = &s.auth else {
        return Ok(None);
    };
    let password = match &auth.password_file {
        Some(p) => std::fs::read_to_string(p)
            .map_err(|source| OptionsError::Password {
                path: p.clone(),
                source,
            })?
            .trim_end_matches(['\r', '\n'])
            .to_string(),
        None => String::new(),
    };
    Ok(Some((auth.username.clone(), password)))
}

/// The TLS transport, certificate files read now; `None` for plain TCP.
fn transport(s: &UplinkSettings) -> Result<Option<Transport>, OptionsError> {
    let Some(t) = &s.tls else {
        return Ok(None);
    };
    let client_cert = t
        .client_cert
        .as_ref()
        .map(|(c, k)| (c.as_path(), k.as_path()));
    let config = tls::client_config(&t.ca_file, client_cert)?;
    Ok(Some(Transport::tls_with_config(TlsConfiguration::Rustls(
        config,
    ))))
}

fn network_options(s: &UplinkSettings) -> NetworkOptions {
    let mut n = NetworkOptions::new();
    n.set_connection_timeout(s.connect_timeout.as_secs().max(1));
    n
}

/// Time allowed for TCP + TLS + CONNECT/CONNACK before the attempt counts as failed.
pub fn connect_deadline(s: &UplinkSettings) -> Duration {
    s.connect_timeout + Duration::from_secs(1)
}
