//! One connection epoch, in three phases, each a function that returns how the epoch ended:
//!
//! - [`Uplink::connect`]: fresh client and event loop, CONNECT/CONNACK, the command
//!   subscription and the retained `online` status (subscribe first, so its packet id cannot
//!   collide with a publish's, rumqtt #1057);
//! - [`Uplink::steady`]: fill the window from the spool, bind packet ids, apply PUBACKs, pass
//!   commands on, until a shutdown, a settings change or a failure; a shutdown or a change
//!   first waits up to `shutdown_grace` for outstanding PUBACKs;
//! - [`Uplink::goodbye`]: the retained `offline` status and DISCONNECT.
//!
//! Whatever the ending, the chunks acknowledged so far are deleted before the next epoch reads
//! the spool again ([`super::acks`]).

use super::acks::{Acks, Bind, Sent, Tag};
use super::prepare::PrepareJob;
use super::{EpochCtx, EpochEnd, REQUEST_SLACK, Uplink, failed, options};
use crate::clock::now_ms;
use crate::command_link::{AckRequest, CommandDelivery, CommandLink};
use crate::heartbeat::TICK;
use crate::loss::{Loss, LossReason};
use crate::spool::{DrainState, Pick};
use rumqttc::{
    AsyncClient, ConnectReturnCode, ConnectionError, Event, Outgoing, Packet, QoS,
    SubscribeReasonCode,
};
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tracing::{debug, error, info, warn};

/// Events from the polling task waiting for the uplink task. Small: the uplink handles each
/// event in microseconds, and a full channel only pauses polling (back-pressure on the socket).
const EVENT_CAPACITY: usize = 64;
/// How long to wait for the DISCONNECT to be written at shutdown.
const DISCONNECT_WAIT: Duration = Duration::from_secs(2);

type Events = mpsc::Receiver<Result<Event, ConnectionError>>;

/// A live connection: the client, the polling task's events, and the task itself (aborted
/// when this is dropped).
pub(super) struct Conn {
    client: AsyncClient,
    events: Events,
    _poller: AbortOnDrop,
}

/// The steady phase's state between two events.
struct Steady {
    drain: DrainState,
    committed: watch::Receiver<u64>,
    /// Silence for longer than this means the link is dead.
    silence_limit: Option<Duration>,
    last_rx: Instant,
    linger_until: Option<Instant>,
    /// Set once a shutdown or a settings change asked to stop: the end of the grace period.
    draining: Option<Instant>,
    flush_now: bool,
    reconfigured: bool,
}

fn far() -> Instant {
    Instant::now() + Duration::from_secs(3600)
}

impl Uplink {
    pub(super) async fn epoch(
        &mut self,
        ctx: &EpochCtx,
        link: Option<&mut CommandLink>,
    ) -> EpochEnd {
        let mut acks = Acks::default();
        let end = match self.connect(ctx, link.is_some(), &mut acks).await {
            Err(end) => end,
            Ok(mut conn) => match self.steady(ctx, &mut conn, link, &mut acks).await {
                Ok(reconfigured) => self.goodbye(ctx, conn, reconfigured).await,
                Err(end) => end,
            },
        };
        // Acknowledged chunks are deleted before the next epoch reads the spool again.
        if let Err(e) = acks.delete_acked(&self.spool).await {
            warn!(error = %e, "Cannot delete acknowledged records; they will be sent again.");
        }
        end
    }

    /// Connects, subscribes to commands (if `subscribe`) and queues the `online` status.
    async fn connect(
        &mut self,
        ctx: &EpochCtx,
        subscribe: bool,
        acks: &mut Acks,
    ) -> Result<Conn, EpochEnd> {
        let s = &ctx.s;
        let (opts, net) =
            options::build(s, &ctx.topics, &self.boot).map_err(|e| EpochEnd::Failed {
                error: e.to_string(),
                serious: true,
                was_connected: false,
            })?;
        let (client, mut eventloop) = AsyncClient::new(opts, s.window + REQUEST_SLACK);
        eventloop.set_network_options(net);
        let (ev_tx, mut events) = mpsc::channel(EVENT_CAPACITY);
        let poller = AbortOnDrop(tokio::spawn(async move {
            loop {
                let ev = eventloop.poll().await;
                let stop = ev.is_err();
                if ev_tx.send(ev).await.is_err() || stop {
                    break;
                }
            }
        }));
        let session_present = self.await_connack(ctx, &mut events).await?;
        self.stats.connected.store(true, Ordering::Relaxed);
        self.stats.connects.fetch_add(1, Ordering::Relaxed);
        self.stats.backoff_ms.store(0, Ordering::Relaxed);
        info!(broker = %format!("{}:{}", s.host, s.port), client_id = %s.client_id, tls = s.tls.is_some(), "Connected to the broker.");

        // Subscribe before any publish, so its packet id cannot collide with one (rumqtt #1057).
        // Only when the broker does not hold the subscription already: each new subscription
        // makes it deliver a retained command again.
        let resubscribe =
            !session_present || self.subscribed.as_deref() != Some(ctx.commands_topic.as_str());
        if subscribe
            && resubscribe
            && let Err(e) = client.try_subscribe(ctx.commands_topic.clone(), QoS::AtLeastOnce)
        {
            return Err(failed(
                format!("cannot queue the command subscription: {e}"),
                true,
            ));
        }
        if let Err(e) = client.try_publish(
            ctx.topics.status(),
            QoS::AtLeastOnce,
            true,
            options::status_payload("online", &self.boot),
        ) {
            return Err(failed(
                format!("cannot queue the status message: {e}"),
                true,
            ));
        }
        acks.inflight.queued(Tag::Control);
        Ok(Conn {
            client,
            events,
            _poller: poller,
        })
    }

    /// Waits for the CONNACK; returns whether the broker kept our session.
    async fn await_connack(
        &mut self,
        ctx: &EpochCtx,
        events: &mut Events,
    ) -> Result<bool, EpochEnd> {
        let deadline = Instant::now() + options::connect_deadline(&ctx.s);
        let mut tick = tokio::time::interval(TICK);
        loop {
            tokio::select! {
                _ = tick.tick() => self.heartbeat.touch(),
                _ = self.shutdown.cancelled() => return Err(EpochEnd::Shutdown),
                _ = tokio::time::sleep_until(deadline) => return Err(failed("timed out waiting for the broker's CONNACK", false)),
                ev = events.recv() => match ev {
                    Some(Ok(Event::Incoming(Packet::ConnAck(c)))) => return Ok(c.session_present),
                    Some(Ok(_)) => {}
                    Some(Err(e)) => return Err(describe(&e, false)),
                    None => return Err(failed("event loop stopped", false)),
                },
            }
        }
    }

    /// Sends and acknowledges until asked to stop (`Ok(reconfigured)`, after the grace period
    /// for outstanding PUBACKs) or the connection fails (`Err`).
    async fn steady(
        &mut self,
        ctx: &EpochCtx,
        conn: &mut Conn,
        mut link: Option<&mut CommandLink>,
        acks: &mut Acks,
    ) -> Result<bool, EpochEnd> {
        let s = &ctx.s;
        // rumqttc notices a dead link only when a ping finds the previous one unanswered (up to
        // 2-3x keepalive). It pings every keepalive, so on a live link something arrives at
        // least that often: silence for 1.5x keepalive means the link is gone.
        let mut st = Steady {
            drain: DrainState::default(),
            committed: self.spool.subscribe(),
            silence_limit: (!s.keepalive.is_zero()).then(|| s.keepalive * 3 / 2),
            last_rx: Instant::now(),
            linger_until: None,
            draining: None,
            flush_now: false,
            reconfigured: false,
        };
        let mut tick = tokio::time::interval(TICK);
        loop {
            if st.draining.is_none() {
                st.linger_until = self.fill(ctx, &conn.client, acks, &mut st).await?;
            } else if acks.inflight.data_len() == 0 {
                return Ok(st.reconfigured);
            }
            tokio::select! {
                _ = tick.tick() => self.on_tick(&st)?,
                _ = self.shutdown.cancelled(), if st.draining.is_none() => {
                    debug!(in_flight = acks.inflight.data_len(), "Shutdown: waiting for outstanding PUBACKs.");
                    st.draining = Some(Instant::now() + s.shutdown_grace);
                }
                r = self.settings.changed(), if st.draining.is_none() => {
                    if r.is_ok() {
                        info!("Uplink settings changed; reconnecting with the new ones.");
                        st.reconfigured = true;
                        st.draining = Some(Instant::now() + s.shutdown_grace);
                    }
                }
                _ = tokio::time::sleep_until(st.draining.unwrap_or_else(far)), if st.draining.is_some() => {
                    warn!(in_flight = acks.inflight.data_len(), "Grace period over; unacknowledged data stays in the spool and is resent.");
                    return Ok(st.reconfigured);
                }
                ev = conn.events.recv() => match ev {
                    Some(Ok(ev)) => {
                        if matches!(ev, Event::Incoming(_)) {
                            st.last_rx = Instant::now();
                        }
                        self.on_event(ctx, ev, acks, &conn.client, link.as_deref_mut())?;
                        if acks.batch_full() {
                            self.delete_now(acks).await?;
                        }
                    }
                    Some(Err(e)) => return Err(describe(&e, true)),
                    None => return Err(failed("event loop stopped", true)),
                },
                ack = recv_ack(link.as_deref_mut()) => on_command_ack(ctx, &conn.client, ack)?,
                _ = self.flush.notified() => st.flush_now = true,
                r = st.committed.changed() => if r.is_err() { return Err(EpochEnd::Shutdown) },
                _ = tokio::time::sleep_until(st.linger_until.unwrap_or_else(far)), if st.linger_until.is_some() => {}
                _ = tokio::time::sleep_until(acks.due().unwrap_or_else(far)), if acks.due().is_some() => self.delete_now(acks).await?,
            }
        }
    }

    fn on_tick(&self, st: &Steady) -> Result<(), EpochEnd> {
        self.heartbeat.touch();
        match st.silence_limit {
            Some(limit) if st.last_rx.elapsed() > limit => Err(failed(
                format!(
                    "nothing received from the broker for {} s (1.5x keepalive): the link is dead",
                    st.last_rx.elapsed().as_secs()
                ),
                true,
            )),
            _ => Ok(()),
        }
    }

    async fn delete_now(&self, acks: &mut Acks) -> Result<(), EpochEnd> {
        acks.delete_acked(&self.spool)
            .await
            .map_err(|error| EpochEnd::Failed {
                error,
                serious: true,
                was_connected: true,
            })
    }

    /// Retained `offline` status (not after a settings change: ferry reconnects at once), then
    /// DISCONNECT, so the broker does not send the last will.
    async fn goodbye(&self, ctx: &EpochCtx, mut conn: Conn, reconfigured: bool) -> EpochEnd {
        if !reconfigured {
            let _ = conn.client.try_publish(
                ctx.topics.status(),
                QoS::AtLeastOnce,
                true,
                options::status_payload("offline", &self.boot),
            );
        }
        let _ = conn.client.try_disconnect();
        let _ = tokio::time::timeout(DISCONNECT_WAIT, async {
            while let Some(Ok(ev)) = conn.events.recv().await {
                if matches!(ev, Event::Outgoing(Outgoing::Disconnect)) {
                    break;
                }
            }
        })
        .await;
        info!("Disconnected from the broker.");
        if reconfigured {
            EpochEnd::Reconfigured
        } else {
            EpochEnd::Shutdown
        }
    }

    /// Publishes batches until the window is full or nothing is ready. Returns when a
    /// lingering batch becomes due, if one is waiting. Reading and encoding run on the blocking
    /// pool, several batches per trip, while rumqttc's own task keeps the socket busy.
    async fn fill(
        &mut self,
        ctx: &EpochCtx,
        client: &AsyncClient,
        acks: &mut Acks,
        st: &mut Steady,
    ) -> Result<Option<Instant>, EpochEnd> {
        let s = &ctx.s;
        loop {
            let free = s.window.saturating_sub(acks.inflight.data_len());
            if free == 0 {
                return Ok(None);
            }
            let job = PrepareJob {
                spool: self.spool.clone(),
                drain: st.drain.clone(),
                streams: ctx.streams.clone(),
                wire_left: self.budget.as_mut().and_then(|b| b.remaining()),
                limits: s.batch,
                max_packet_bytes: s.max_packet_bytes,
                topics: ctx.topics.clone(),
                origin: ctx.origin.clone(),
                ignore_linger: st.flush_now,
                count: free,
                sent_high: self.sent_high.clone(),
                byte_budget: s.inflight_bytes.map(|cap| {
                    cap.saturating_sub(acks.inflight.data().map(|d: &Sent| d.bytes).sum())
                }),
                must_send_one: acks.inflight.data_len() == 0,
            };
            let prepared = tokio::task::spawn_blocking(move || job.run())
                .await
                .map_err(|e| failed(format!("spool read panicked: {e}"), true))?
                .map_err(|e| EpochEnd::Failed {
                    error: format!("cannot read the spool: {e}"),
                    serious: true,
                    was_connected: true,
                })?;
            st.drain = prepared.drain;
            if let (Some(packet), Some(b)) = (prepared.over_budget, self.budget.as_mut()) {
                b.exhaust(packet);
            }
            let got = prepared.messages.len();
            for m in prepared.messages {
                if m.oversize {
                    self.drop_oversize(acks, m).await;
                } else {
                    self.publish(client, acks, m)?;
                }
            }
            if prepared.exhausted {
                st.flush_now = false;
            }
            if got < free {
                let now = now_ms();
                return Ok(prepared
                    .linger_due_ms
                    .map(|due| Instant::now() + Duration::from_millis(due.saturating_sub(now))));
            }
        }
    }

    /// Hands one prepared message to the client and records it as awaiting its PUBACK.
    fn publish(
        &mut self,
        client: &AsyncClient,
        acks: &mut Acks,
        m: super::prepare::Prepared,
    ) -> Result<(), EpochEnd> {
        client
            .try_publish(m.topic, QoS::AtLeastOnce, false, m.payload)
            .map_err(|e| failed(format!("cannot queue a publish: {e}"), true))?;
        self.stats
            .messages_published
            .fetch_add(1, Ordering::Relaxed);
        self.stats
            .records_published
            .fetch_add(m.sent.records, Ordering::Relaxed);
        self.stats
            .records_resent
            .fetch_add(m.resent, Ordering::Relaxed);
        if let Some(b) = self.budget.as_mut() {
            b.charge(m.wire_bytes);
        }
        if m.pick == Pick::Backlog
            && let Some(last) = m.sent.chunk_ids.last()
        {
            let high = self.sent_high.entry(m.sent.stream_id).or_default();
            *high = (*high).max(*last);
        }
        acks.inflight.queued(Tag::Data(m.sent));
        Ok(())
    }

    /// A message that can never be sent (its chunk alone is over `max_packet_bytes`): its
    /// records are deleted only once a `ferry.loss` record saying so is committed; if that
    /// fails they stay in the spool (and are tried again next epoch).
    async fn drop_oversize(&self, acks: &mut Acks, m: super::prepare::Prepared) {
        let loss = oversize_loss(&m.stream, m.seqs, m.sent.records, m.payload.len());
        let spool = self.spool.clone();
        let committed = tokio::task::spawn_blocking(move || {
            spool.commit(&[crate::spool::Intake::reading(loss)])
        })
        .await;
        match committed {
            Ok(Ok(_)) => {
                error!(
                    stream = %m.stream,
                    first_seq = m.seqs.0,
                    last_seq = m.seqs.1,
                    bytes = m.payload.len(),
                    records = m.sent.records,
                    "A stored chunk is larger than uplink.max_packet_bytes allows; it cannot be sent, is dropped and reported on ferry.loss (reason oversize)."
                );
                acks.discard(m.sent);
            }
            Ok(Err(e)) => {
                error!(stream = %m.stream, error = %e, "Cannot report an oversize chunk's loss; it stays in the spool.")
            }
            Err(e) => {
                error!(stream = %m.stream, error = %e, "Cannot report an oversize chunk's loss; it stays in the spool.")
            }
        }
    }

    fn on_event(
        &mut self,
        ctx: &EpochCtx,
        ev: Event,
        acks: &mut Acks,
        client: &AsyncClient,
        link: Option<&mut CommandLink>,
    ) -> Result<(), EpochEnd> {
        let commands_topic = ctx.commands_topic.as_str();
        match ev {
            Event::Outgoing(Outgoing::Publish(pkid)) => match acks.inflight.on_outgoing(pkid) {
                Bind::Unexpected => {
                    return Err(failed(
                        format!(
                            "packet id {pkid} was published with nothing awaiting it; restarting the connection to keep acknowledgements exact"
                        ),
                        true,
                    ));
                }
                Bind::Retransmission => debug!(pkid, "Publish retransmitted."),
                Bind::Bound | Bind::Untracked => {}
            },
            Event::Outgoing(Outgoing::AwaitAck(pkid)) => {
                debug!(pkid, "Packet id collision; rumqttc waits for its ack.")
            }
            Event::Incoming(Packet::PubAck(ack)) => {
                if let Some(records) = acks.on_puback(ack.pkid) {
                    self.stats
                        .records_acked
                        .fetch_add(records, Ordering::Relaxed);
                }
            }
            Event::Incoming(Packet::SubAck(ack)) => {
                if ack
                    .return_codes
                    .iter()
                    .any(|c| matches!(c, SubscribeReasonCode::Failure))
                {
                    error!(topic = %commands_topic, "The broker refused the command subscription (check its ACL); commands will not arrive.");
                } else {
                    info!(topic = %commands_topic, "Subscribed to commands.");
                    self.subscribed = Some(commands_topic.to_string());
                }
            }
            Event::Incoming(Packet::Publish(p)) => match link {
                Some(link) if p.topic == commands_topic => {
                    pass_command(ctx, client, link, p)?;
                }
                _ => {
                    debug!(topic = %p.topic, "Unexpected publish acknowledged and ignored.");
                    let _ = client.try_ack(&p);
                }
            },
            _ => {}
        }
        Ok(())
    }
}

/// The `ferry.loss` record for records dropped because their message can never fit in a
/// packet.
fn oversize_loss(
    stream: &str,
    seqs: (u64, u64),
    count: u64,
    bytes: usize,
) -> crate::record::Reading {
    let mut loss = Loss::range(stream, LossReason::TooBigForPacket, seqs.0, seqs.1)
        .with("bytes", crate::record::Value::U64(bytes as u64));
    loss.count = count;
    loss.to_reading()
}

/// Hands a command to the command service. When its queue is full, the command is
/// acknowledged at once and refused with a `busy` reply, rather than left unacknowledged
/// until the next reconnect (PUBACK order then differs from receipt order; brokers match
/// PUBACKs by packet id).
fn pass_command(
    ctx: &EpochCtx,
    client: &AsyncClient,
    link: &mut CommandLink,
    publish: rumqttc::Publish,
) -> Result<(), EpochEnd> {
    let delivery = CommandDelivery {
        epoch: ctx.epoch,
        publish,
    };
    match link.deliveries.try_send(delivery) {
        Ok(()) => Ok(()),
        Err(mpsc::error::TrySendError::Full(d)) => {
            warn!(
                bytes = d.publish.payload.len(),
                "Command queue full; the command is refused as busy and acknowledged."
            );
            // More refusals at once than rumqttc's request channel holds (a broker sending
            // over REQUEST_SLACK unacknowledged commands): leave the rest unacknowledged
            // (redelivered after a reconnect) rather than end the connection.
            if let Err(e) = client.try_ack(&d.publish) {
                warn!(error = %e, "Cannot queue a busy command's acknowledgement; it is redelivered after a reconnect.");
                return Ok(());
            }
            let id = crate::command_link::sniff_id(&d.publish.payload);
            if link.busy.try_send(id).is_err() {
                warn!("Busy queue full too; a refused command gets no reply.");
            }
            Ok(())
        }
        Err(mpsc::error::TrySendError::Closed(_)) => {
            debug!("Command service stopped; the command is not acknowledged.");
            Ok(())
        }
    }
}

/// PUBACKs a command the command service has recorded, unless its epoch has ended meanwhile
/// (the broker then redelivers it on the next connection).
fn on_command_ack(
    ctx: &EpochCtx,
    client: &AsyncClient,
    ack: Option<AckRequest>,
) -> Result<(), EpochEnd> {
    match ack {
        Some(ack) if ack.epoch == ctx.epoch => client
            .try_ack(&ack.publish)
            .map_err(|e| failed(format!("cannot queue a command acknowledgement: {e}"), true)),
        _ => Ok(()),
    }
}

/// The next ack request; never resolves without a command service (or once it is gone).
async fn recv_ack(link: Option<&mut CommandLink>) -> Option<AckRequest> {
    match link {
        Some(l) => match l.acks.recv().await {
            Some(ack) => Some(ack),
            None => std::future::pending().await,
        },
        None => std::future::pending().await,
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A connection error as an operator should read it, with a hint where the cause is usually
/// configuration.
fn describe(e: &ConnectionError, was_connected: bool) -> EpochEnd {
    if let ConnectionError::ConnectionRefused(code) = e {
        let why = match code {
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
        };
        return EpochEnd::Failed {
            error: format!("the broker refused the connection: {why}"),
            serious: true,
            was_connected,
        };
    }
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
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
        Some(h) => EpochEnd::Failed {
            error: format!("TLS handshake failed: {h} ({text})"),
            serious: true,
            was_connected,
        },
        None => failed(text, was_connected),
    }
}
