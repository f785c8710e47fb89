//! One MQTT connection of either protocol version behind one small interface, so the epoch
//! code (connect, steady, goodbye) and the PUBACK bookkeeping exist once.
//!
//! - [`start`] builds a fresh rumqttc client and event loop of the chosen version (3.1.1:
//!   `rumqttc`, 5: `rumqttc::v5`) and spawns the task that polls it. That task turns each
//!   event into ferry's own [`LinkEvent`] and each error into a [`LinkFailure`], and forwards
//!   them over a bounded channel; it stops after the first error (the epoch then ends).
//! - [`Client`] publishes, subscribes, acknowledges and disconnects with either flavour.
//!
//! Invariants: events keep rumqttc's order (the PUBACK binding in `acks.rs` relies on it),
//! including the events rumqttc had read but not yet handed out when `poll()` failed; a
//! PUBACK is always reported, with the MQTT 5 reason code when it is a refusal (>= 0x80), so a
//! refused publish is never taken for an acknowledged one. MQTT 3.1.1 has no reason codes:
//! every 3.1.1 PUBACK counts as an acknowledgement.

use super::UplinkSettings;
use super::options::{self, OptionsError, Topics};
use super::settings::MqttVersion;
use crate::clock::now_ms;
use crate::command_link::CommandPublish;
use rumqttc::v5;
use rumqttc::v5::mqttbytes::v5::{
    ConnectReturnCode as ConnectReturnCode5, PubAckReason, SubscribeReasonCode as SubCode5,
};
use rumqttc::{ConnectReturnCode, Outgoing, QoS, SubscribeReasonCode};
use tokio::sync::mpsc;

/// Events from the polling task waiting for the uplink task. Small: the uplink handles each
/// event in microseconds, and a full channel only pauses polling (back-pressure on the socket).
const EVENT_CAPACITY: usize = 64;

/// A refused publish: the MQTT 5 PUBACK reason code (>= 0x80) and the broker's reason string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub code: u8,
    pub reason: Option<String>,
}

impl Refusal {
    /// The code's name in the MQTT 5 specification.
    pub fn name(&self) -> &'static str {
        match self.code {
            0x80 => "unspecified error",
            0x83 => "implementation specific error",
            0x87 => "not authorized",
            0x90 => "topic name invalid",
            0x91 => "packet identifier in use",
            0x97 => "quota exceeded",
            0x99 => "payload format invalid",
            _ => "refused",
        }
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "0x{:02x} {}", self.code, self.name())?;
        if let Some(r) = &self.reason {
            write!(f, " ({r})")?;
        }
        Ok(())
    }
}

/// What happened on the connection, in rumqttc's order.
#[derive(Debug)]
pub enum LinkEvent {
    ConnAck {
        session_present: bool,
    },
    /// A publish was written with this packet id (0: QoS 0).
    Published(u16),
    /// rumqttc holds a publish back until this packet id is acknowledged.
    AwaitAck(u16),
    /// A PUBACK; `refusal` is set for an MQTT 5 reason code >= 0x80.
    PubAck {
        pkid: u16,
        refusal: Option<Refusal>,
    },
    SubAck {
        refused: bool,
    },
    Publish {
        topic: String,
        publish: CommandPublish,
    },
    /// The DISCONNECT was written.
    Disconnected,
    /// Any other packet received (pings, ...): the link is alive.
    OtherIncoming,
    OtherOutgoing,
}

impl LinkEvent {
    /// Something came from the broker.
    pub fn is_incoming(&self) -> bool {
        !matches!(
            self,
            LinkEvent::Published(_)
                | LinkEvent::AwaitAck(_)
                | LinkEvent::Disconnected
                | LinkEvent::OtherOutgoing
        )
    }
}

/// How the broker answered a CONNECT of a version it may not speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VersionRefusal {
    /// Not a protocol-version problem.
    No,
    /// A CONNACK saying "unsupported protocol version" (MQTT 5 0x84, or 3.1.1's 0x01 as an
    /// MQTT 5 client reads it).
    Explicit,
    /// The broker closed the connection after our CONNECT without a CONNACK ferry could read
    /// (a 3.1.1-only broker answers a version-5 CONNECT with a 3.1.1 CONNACK and closes).
    ClosedBeforeConnack,
}

/// Why the connection failed, as an operator should read it.
#[derive(Debug, Clone)]
pub struct LinkFailure {
    pub error: String,
    /// Needs an operator (credentials, certificates, ACL), not just a network retry.
    pub serious: bool,
    pub version: VersionRefusal,
}

pub type Events = mpsc::Receiver<Result<LinkEvent, LinkFailure>>;

/// A client of either version.
#[derive(Clone)]
pub enum Client {
    V311(rumqttc::AsyncClient),
    V5(v5::AsyncClient),
}

impl Client {
    /// Queues a QoS 1 publish.
    pub fn publish(&self, topic: String, retain: bool, payload: Vec<u8>) -> Result<(), String> {
        match self {
            Client::V311(c) => c
                .try_publish(topic, QoS::AtLeastOnce, retain, payload)
                .map_err(|e| e.to_string()),
            Client::V5(c) => c
                .try_publish(topic, v5::mqttbytes::QoS::AtLeastOnce, retain, payload)
                .map_err(|e| e.to_string()),
        }
    }

    pub fn subscribe(&self, topic: String) -> Result<(), String> {
        match self {
            Client::V311(c) => c
                .try_subscribe(topic, QoS::AtLeastOnce)
                .map_err(|e| e.to_string()),
            Client::V5(c) => c
                .try_subscribe(topic, v5::mqttbytes::QoS::AtLeastOnce)
                .map_err(|e| e.to_string()),
        }
    }

    /// Queues the acknowledgement of a received publish (PUBACK for QoS 1, PUBREC for 2).
    pub fn ack(&self, p: &CommandPublish) -> Result<(), String> {
        match self {
            Client::V311(c) => {
                let qos = match p.qos {
                    0 => return Ok(()),
                    1 => QoS::AtLeastOnce,
                    _ => QoS::ExactlyOnce,
                };
                let mut publish = rumqttc::Publish::new("", qos, Vec::new());
                publish.pkid = p.pkid;
                c.try_ack(&publish).map_err(|e| e.to_string())
            }
            Client::V5(c) => {
                let qos = match p.qos {
                    0 => return Ok(()),
                    1 => v5::mqttbytes::QoS::AtLeastOnce,
                    _ => v5::mqttbytes::QoS::ExactlyOnce,
                };
                let mut publish =
                    v5::mqttbytes::v5::Publish::new("", qos, bytes::Bytes::new(), None);
                publish.pkid = p.pkid;
                c.try_ack(&publish).map_err(|e| e.to_string())
            }
        }
    }

    pub fn disconnect(&self) -> Result<(), String> {
        match self {
            Client::V311(c) => c.try_disconnect().map_err(|e| e.to_string()),
            Client::V5(c) => c.try_disconnect().map_err(|e| e.to_string()),
        }
    }
}

/// Aborts the polling task when the connection is dropped.
pub struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A fresh client and event loop of `version` for one epoch, and the task polling it.
/// `capacity`: rumqttc's request channel.
pub fn start(
    s: &UplinkSettings,
    version: MqttVersion,
    topics: &Topics,
    boot: &str,
    capacity: usize,
) -> Result<(Client, Events, AbortOnDrop), OptionsError> {
    let (tx, rx) = mpsc::channel(EVENT_CAPACITY);
    match version {
        MqttVersion::V311 => {
            let (opts, net) = options::build(s, topics, boot)?;
            let (client, mut eventloop) = rumqttc::AsyncClient::new(opts, capacity);
            eventloop.set_network_options(net);
            let poller = tokio::spawn(async move {
                let mut connected = false;
                loop {
                    let ev = eventloop.poll().await;
                    let out = match ev {
                        Ok(ev) => Ok(event_v4(ev, &mut connected)),
                        Err(e) => {
                            // Packets read in the same batch as the failure (a PUBACK just
                            // before the broker closed) are still queued in rumqttc.
                            for ev in std::mem::take(&mut eventloop.state.events) {
                                if tx.send(Ok(event_v4(ev, &mut connected))).await.is_err() {
                                    return;
                                }
                            }
                            Err(failure_v4(&e))
                        }
                    };
                    let stop = out.is_err();
                    if tx.send(out).await.is_err() || stop {
                        break;
                    }
                }
            });
            Ok((Client::V311(client), rx, AbortOnDrop(poller)))
        }
        MqttVersion::V5 => {
            let opts = options::build_v5(s, topics, boot)?;
            let (client, mut eventloop) = v5::AsyncClient::new(opts, capacity);
            let poller = tokio::spawn(async move {
                let mut connected = false;
                loop {
                    let ev = eventloop.poll().await;
                    let out = match ev {
                        Ok(ev) => Ok(event_v5(ev, &mut connected)),
                        Err(e) => {
                            // As above: a refusing PUBACK followed at once by the broker
                            // closing the connection (Mosquitto 2.0 does) must still count.
                            for ev in std::mem::take(&mut eventloop.state.events) {
                                if tx.send(Ok(event_v5(ev, &mut connected))).await.is_err() {
                                    return;
                                }
                            }
                            Err(failure_v5(&e, connected))
                        }
                    };
                    let stop = out.is_err();
                    if tx.send(out).await.is_err() || stop {
                        break;
                    }
                }
            });
            Ok((Client::V5(client), rx, AbortOnDrop(poller)))
        }
    }
}

fn outgoing(o: Outgoing) -> LinkEvent {
    match o {
        Outgoing::Publish(pkid) => LinkEvent::Published(pkid),
        Outgoing::AwaitAck(pkid) => LinkEvent::AwaitAck(pkid),
        Outgoing::Disconnect => LinkEvent::Disconnected,
        _ => LinkEvent::OtherOutgoing,
    }
}

fn event_v4(ev: rumqttc::Event, connected: &mut bool) -> LinkEvent {
    use rumqttc::{Event, Packet};
    match ev {
        Event::Outgoing(o) => outgoing(o),
        Event::Incoming(Packet::ConnAck(c)) => {
            *connected = true;
            LinkEvent::ConnAck {
                session_present: c.session_present,
            }
        }
        Event::Incoming(Packet::PubAck(a)) => LinkEvent::PubAck {
            pkid: a.pkid,
            refusal: None,
        },
        Event::Incoming(Packet::SubAck(a)) => LinkEvent::SubAck {
            refused: a
                .return_codes
                .iter()
                .any(|c| matches!(c, SubscribeReasonCode::Failure)),
        },
        Event::Incoming(Packet::Publish(p)) => LinkEvent::Publish {
            topic: p.topic.clone(),
            publish: CommandPublish {
                payload: p.payload,
                retain: p.retain,
                dup: p.dup,
                qos: p.qos as u8,
                pkid: p.pkid,
                expires_at_ms: None,
            },
        },
        Event::Incoming(_) => LinkEvent::OtherIncoming,
    }
}

fn event_v5(ev: v5::Event, connected: &mut bool) -> LinkEvent {
    use v5::Event;
    use v5::mqttbytes::v5::Packet;
    match ev {
        Event::Outgoing(o) => outgoing(o),
        Event::Incoming(Packet::ConnAck(c)) => {
            *connected = true;
            LinkEvent::ConnAck {
                session_present: c.session_present,
            }
        }
        Event::Incoming(Packet::PubAck(a)) => {
            let code = puback_code(&a.reason);
            LinkEvent::PubAck {
                pkid: a.pkid,
                refusal: (code >= 0x80).then(|| Refusal {
                    code,
                    reason: a.properties.and_then(|p| p.reason_string),
                }),
            }
        }
        Event::Incoming(Packet::SubAck(a)) => LinkEvent::SubAck {
            refused: a
                .return_codes
                .iter()
                .any(|c| !matches!(c, SubCode5::Success(_))),
        },
        Event::Incoming(Packet::Publish(p)) => {
            let expiry_s = p
                .properties
                .as_ref()
                .and_then(|pr| pr.message_expiry_interval);
            LinkEvent::Publish {
                topic: String::from_utf8_lossy(&p.topic).into_owned(),
                publish: CommandPublish {
                    payload: p.payload,
                    retain: p.retain,
                    dup: p.dup,
                    qos: p.qos as u8,
                    pkid: p.pkid,
                    expires_at_ms: expiry_s.map(|s| now_ms().saturating_add(u64::from(s) * 1000)),
                },
            }
        }
        Event::Incoming(_) => LinkEvent::OtherIncoming,
    }
}

/// The reason code of an MQTT 5 PUBACK.
fn puback_code(r: &PubAckReason) -> u8 {
    match r {
        PubAckReason::Success => 0x00,
        PubAckReason::NoMatchingSubscribers => 0x10,
        PubAckReason::UnspecifiedError => 0x80,
        PubAckReason::ImplementationSpecificError => 0x83,
        PubAckReason::NotAuthorized => 0x87,
        PubAckReason::TopicNameInvalid => 0x90,
        PubAckReason::PacketIdentifierInUse => 0x91,
        PubAckReason::QuotaExceeded => 0x97,
        PubAckReason::PayloadFormatInvalid => 0x99,
    }
}

/// A refused CONNECT, with a hint where the cause is usually configuration.
fn refused(why: &str) -> LinkFailure {
    LinkFailure {
        error: format!("the broker refused the connection: {why}"),
        serious: true,
        version: VersionRefusal::No,
    }
}

fn failure_v4(e: &rumqttc::ConnectionError) -> LinkFailure {
    if let rumqttc::ConnectionError::ConnectionRefused(code) = e {
        return refused(match code {
            ConnectReturnCode::BadUserNamePassword => {
                "bad user name or password (check uplink.auth)"
            }
            ConnectReturnCode::NotAuthorized => {
                "not authorized (check uplink.auth, the client certificate and the broker's ACL)"
            }
            ConnectReturnCode::BadClientId => "client id rejected (check uplink.client_id)",
            ConnectReturnCode::ServiceUnavailable => "service unavailable",
            ConnectReturnCode::RefusedProtocolVersion => "MQTT 3.1.1 is not accepted",
            ConnectReturnCode::Success => "refused with a success code",
        });
    }
    describe_other(e)
}

fn failure_v5(e: &v5::ConnectionError, connected: bool) -> LinkFailure {
    use v5::{ConnectionError, StateError};
    match e {
        ConnectionError::ConnectionRefused(code) => {
            let other = format!("refused with reason {code:?}");
            let mut f = refused(match code {
                ConnectReturnCode5::UnsupportedProtocolVersion
                | ConnectReturnCode5::RefusedProtocolVersion => "MQTT 5 is not accepted",
                ConnectReturnCode5::BadUserNamePassword => {
                    "bad user name or password (check uplink.auth)"
                }
                ConnectReturnCode5::NotAuthorized => {
                    "not authorized (check uplink.auth, the client certificate and the broker's ACL)"
                }
                ConnectReturnCode5::BadClientId | ConnectReturnCode5::ClientIdentifierNotValid => {
                    "client id rejected (check uplink.client_id)"
                }
                _ => &other,
            });
            if matches!(
                code,
                ConnectReturnCode5::UnsupportedProtocolVersion
                    | ConnectReturnCode5::RefusedProtocolVersion
            ) {
                f.version = VersionRefusal::Explicit;
            }
            f
        }
        ConnectionError::MqttState(StateError::ConnectionAborted) if !connected => LinkFailure {
            error: "the broker closed the connection after the MQTT 5 CONNECT without an answer ferry could read".into(),
            serious: false,
            version: VersionRefusal::ClosedBeforeConnack,
        },
        other => describe_other(other),
    }
}

/// A connection error's text with its sources, and a hint for TLS errors an operator fixes.
fn describe_other(e: &(dyn std::error::Error + 'static)) -> LinkFailure {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let s_text = s.to_string();
        if !text.contains(&s_text) {
            text.push_str(": ");
            text.push_str(&s_text);
        }
        source = s.source();
    }
    let debug = format!("{e:?}");
    let hint = if debug.contains("UnknownIssuer") || debug.contains("BadSignature") {
        Some("the broker's certificate is not signed by uplink.tls.ca_file")
    } else if debug.contains("NotValidForName") {
        Some("the broker's certificate does not name uplink.host")
    } else if debug.contains("CertificateRequired") {
        Some("the broker requires a client certificate: set uplink.tls.cert_file and key_file")
    } else if debug.contains("Expired") {
        Some("a certificate has expired (or the clock is wrong)")
    } else {
        None
    };
    match hint {
        Some(h) => LinkFailure {
            error: format!("TLS handshake failed: {h} ({text})"),
            serious: true,
            version: VersionRefusal::No,
        },
        None => LinkFailure {
            error: text,
            serious: false,
            version: VersionRefusal::No,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusal_names_the_code_and_reason() {
        let r = Refusal {
            code: 0x87,
            reason: None,
        };
        assert_eq!(r.to_string(), "0x87 not authorized");
        let r = Refusal {
            code: 0x97,
            reason: Some("slow down".into()),
        };
        assert_eq!(r.to_string(), "0x97 quota exceeded (slow down)");
    }

    #[test]
    fn puback_codes_at_or_above_0x80_are_refusals() {
        assert!(puback_code(&PubAckReason::Success) < 0x80);
        assert!(puback_code(&PubAckReason::NoMatchingSubscribers) < 0x80);
        for r in [
            PubAckReason::UnspecifiedError,
            PubAckReason::ImplementationSpecificError,
            PubAckReason::NotAuthorized,
            PubAckReason::TopicNameInvalid,
            PubAckReason::PacketIdentifierInUse,
            PubAckReason::QuotaExceeded,
            PubAckReason::PayloadFormatInvalid,
        ] {
            assert!(puback_code(&r) >= 0x80, "{r:?}");
        }
    }

    #[test]
    fn v5_refused_version_and_early_close_ask_for_the_fallback() {
        let e =
            v5::ConnectionError::ConnectionRefused(ConnectReturnCode5::UnsupportedProtocolVersion);
        assert_eq!(failure_v5(&e, false).version, VersionRefusal::Explicit);
        let e = v5::ConnectionError::MqttState(v5::StateError::ConnectionAborted);
        assert_eq!(
            failure_v5(&e, false).version,
            VersionRefusal::ClosedBeforeConnack
        );
        // After a CONNACK, a closed connection is just a lost link.
        assert_eq!(failure_v5(&e, true).version, VersionRefusal::No);
        let e = v5::ConnectionError::ConnectionRefused(ConnectReturnCode5::BadUserNamePassword);
        assert_eq!(failure_v5(&e, false).version, VersionRefusal::No);
    }
}
