//! The consumer's MQTT session: options, subscriptions and one connection epoch.
//!
//! - A **persistent session** (`clean_session = false`, a stable client id) at QoS 1, so the
//!   broker keeps what arrives while the consumer is down and redelivers every message it has
//!   not acknowledged.
//! - **Manual acks**: a message is acknowledged only after its lines are written and flushed
//!   and the dedupe state covering them is in place (see `mod.rs`). rumqttc sends the PUBACKs
//!   in the order they are asked for, which is the order of receipt (MQTT 3.1.1 wants that).
//! - Subscriptions: `P/+/data/#` and `P/+/status`, each as `$share/GROUP/...` with `--share`.
//!   They are made again after every CONNACK (harmless when the session kept them).
//! - **One epoch = one fresh client and event loop**, as in the agent's uplink: `poll()` runs
//!   in its own task and forwards what matters over a bounded channel; when it fails the epoch
//!   ends and everything unacknowledged is redelivered by the broker in the next one. A publish
//!   is acknowledged only through the client of the epoch that received it.
//! - TLS reuses the agent's loader (`crate::tls::client_config`): rustls with ring, the CA
//!   file, an optional client certificate (mTLS); the files are read again at every epoch.

use crate::tls;
use rumqttc::{
    AsyncClient, ConnectionError, Event, MqttOptions, NetworkOptions, Packet, Publish, QoS,
    SubscribeReasonCode, TlsConfiguration, Transport,
};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// Events queued between the poll task and the consumer: enough for a full batch plus the
/// broker's in-flight window; when full, the poll task stops reading (back-pressure).
pub const EVENT_CAPACITY: usize = 512;
/// rumqttc's request channel (acks, subscribes): a batch's acks fit.
const REQUEST_CAPACITY: usize = 1024;

/// How to reach and authenticate to the broker.
#[derive(Debug, Clone)]
pub struct SessionSettings {
    pub host: String,
    pub port: u16,
    pub client_id: String,
    pub share: Option<String>,
    pub topic_prefix: String,
    pub ca_file: Option<PathBuf>,
    /// `(cert_file, key_file)` for mutual TLS.
    pub client_cert: Option<(PathBuf, PathBuf)>,
    pub username: Option<String>,
    pub password_file: Option<PathBuf>,
    pub keepalive: Duration,
    pub connect_timeout: Duration,
    pub max_packet_bytes: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("TLS: {0}")]
    Tls(#[from] tls::TlsError),
    #[error("cannot read the password file {path}: {source}")]
    Password {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("TLS setup failed: {0}")]
    Rustls(#[from] rustls::Error),
}

/// What the poll task reports.
#[derive(Debug)]
pub enum Incoming {
    Connected {
        session_present: bool,
    },
    /// A SUBACK; false if the broker refused a subscription (ACL).
    Subscribed(bool),
    Publish(Publish),
    /// The connection failed or dropped: the epoch is over.
    Ended(String),
}

impl SessionSettings {
    /// The two subscription filters.
    pub fn filters(&self) -> [String; 2] {
        let p = &self.topic_prefix;
        let f = [format!("{p}/+/data/#"), format!("{p}/+/status")];
        match &self.share {
            Some(g) => f.map(|t| format!("$share/{g}/{t}")),
            None => f,
        }
    }

    fn options(&self) -> Result<(MqttOptions, NetworkOptions), SessionError> {
        let mut o = MqttOptions::new(self.client_id.clone(), self.host.clone(), self.port);
        o.set_keep_alive(self.keepalive);
        o.set_clean_session(false);
        o.set_manual_acks(true);
        o.set_max_packet_size(self.max_packet_bytes, self.max_packet_bytes);
        if let Some(user) = &self.username {
            let password = match &self.password_file {
                Some(p) => std::fs::read_to_string(p)
                    .map_err(|source| SessionError::Password {
                        path: p.clone(),
                        source,
                    })?
                    .trim_end_matches(['\r', '\n'])
                    .to_string(),
                None => String::new(),
            };
            o.set_credentials(user.clone(), password);
        }
        if let Some(ca) = &self.ca_file {
            o.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
                self.tls_config(ca)?,
            )));
        }
        let mut n = NetworkOptions::new();
        n.set_connection_timeout(self.connect_timeout.as_secs().max(1));
        Ok((o, n))
    }

    fn tls_config(&self, ca: &std::path::Path) -> Result<Arc<rustls::ClientConfig>, SessionError> {
        let client = self
            .client_cert
            .as_ref()
            .map(|(cert, key)| (cert.as_path(), key.as_path()));
        Ok(tls::client_config(ca, client)?)
    }
}

/// One connection epoch: the client to subscribe and ack with, and the events of its loop.
pub struct Epoch {
    pub client: AsyncClient,
    pub events: mpsc::Receiver<Incoming>,
    task: tokio::task::JoinHandle<()>,
}

impl Epoch {
    /// Builds a fresh client (re-reading the TLS and password files) and starts polling.
    pub fn start(s: &SessionSettings) -> Result<Epoch, SessionError> {
        let (options, network) = s.options()?;
        let (client, mut eventloop) = AsyncClient::new(options, REQUEST_CAPACITY);
        eventloop.set_network_options(network);
        let (tx, events) = mpsc::channel(EVENT_CAPACITY);
        let task = tokio::spawn(async move {
            loop {
                let incoming = match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(c))) => Incoming::Connected {
                        session_present: c.session_present,
                    },
                    Ok(Event::Incoming(Packet::SubAck(ack))) => Incoming::Subscribed(
                        ack.return_codes
                            .iter()
                            .all(|c| !matches!(c, SubscribeReasonCode::Failure)),
                    ),
                    Ok(Event::Incoming(Packet::Publish(p))) => Incoming::Publish(p),
                    Ok(_) if tx.is_closed() => return,
                    Ok(_) => continue,
                    Err(e) => Incoming::Ended(describe(&e)),
                };
                let ended = matches!(incoming, Incoming::Ended(_));
                if tx.send(incoming).await.is_err() || ended {
                    return;
                }
            }
        });
        Ok(Epoch {
            client,
            events,
            task,
        })
    }

    /// Subscribes to both filters at QoS 1.
    pub async fn subscribe(&self, s: &SessionSettings) -> Result<(), rumqttc::ClientError> {
        for f in s.filters() {
            self.client.subscribe(f, QoS::AtLeastOnce).await?;
        }
        Ok(())
    }

    /// Says goodbye (best effort) and stops polling.
    pub async fn close(self) {
        let _ = tokio::time::timeout(Duration::from_secs(2), self.client.disconnect()).await;
        let mut events = self.events;
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            while let Some(e) = events.recv().await {
                if matches!(e, Incoming::Ended(_)) {
                    break;
                }
            }
        })
        .await;
        self.task.abort();
    }
}

fn describe(e: &ConnectionError) -> String {
    match e {
        ConnectionError::ConnectionRefused(code) => format!("refused by the broker: {code:?}"),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(share: Option<&str>) -> SessionSettings {
        SessionSettings {
            host: "127.0.0.1".into(),
            port: 1883,
            client_id: "c".into(),
            share: share.map(str::to_string),
            topic_prefix: "ferry".into(),
            ca_file: None,
            client_cert: None,
            username: None,
            password_file: None,
            keepalive: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
            max_packet_bytes: 1 << 20,
        }
    }

    #[test]
    fn filters_with_and_without_a_share_group() {
        assert_eq!(
            settings(None).filters(),
            ["ferry/+/data/#", "ferry/+/status"]
        );
        assert_eq!(
            settings(Some("g")).filters(),
            ["$share/g/ferry/+/data/#", "$share/g/ferry/+/status"]
        );
    }
}
