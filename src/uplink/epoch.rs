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
use super::link::{self, AbortOnDrop, Client, Events, LinkEvent, LinkFailure, Refusal};
use super::prepare::PrepareJob;
use super::{EpochCtx, EpochEnd, REQUEST_SLACK, Uplink, failed, options};
use crate::clock::now_ms;
use crate::command_link::{AckRequest, CommandDelivery, CommandLink, CommandPublish};
use crate::heartbeat::TICK;
use crate::loss::{Loss, LossReason};
use crate::spool::{DrainState, Pick};
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tracing::{debug, error, info, warn};

/// How long to wait for the DISCONNECT to be written at shutdown.
const DISCONNECT_WAIT: Duration = Duration::from_secs(2);
/// After a refused publish's retry delay, how long the other publishes still in flight may
/// take to be answered before the connection is restarted instead (rumqttc can hold a publish
/// back behind a refused packet id for good).
const HOLD_DRAIN_LIMIT: Duration = Duration::from_secs(30);

/// A live connection: the client, the polling task's events, and the task itself (aborted
/// when this is dropped).
pub(super) struct Conn {
    client: Client,
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
    /// Set when the broker refused a data publish (MQTT 5 reason code >= 0x80): no new data
    /// is sent until then; once nothing is in flight any more, the drain starts again from
    /// the oldest stored chunk, so the refused records are sent again.
    hold: Option<Instant>,
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
        let (client, mut events, poller) = link::start(
            s,
            ctx.version,
            &ctx.topics,
            &self.boot,
            s.window + REQUEST_SLACK,
        )
        .map_err(|e| EpochEnd::Failed {
            error: e.to_string(),
            serious: true,
            was_connected: false,
        })?;
        let session_present = self.await_connack(ctx, &mut events).await?;
        self.version.connected();
        self.stats.connected.store(true, Ordering::Relaxed);
        self.stats.connects.fetch_add(1, Ordering::Relaxed);
        self.stats.backoff_ms.store(0, Ordering::Relaxed);
        self.stats
            .set_protocol(ctx.version, self.version.fell_back());
        info!(broker = %format!("{}:{}", s.host, s.port), client_id = %s.client_id, tls = s.tls.is_some(), mqtt_version = ctx.version.as_str(), session_present, "Connected to the broker.");

        // Subscribe before any publish, so its packet id cannot collide with one (rumqtt #1057).
        // Only when the broker does not hold the subscription already: each new subscription
        // makes it deliver a retained command again.
        let resubscribe =
            !session_present || self.subscribed.as_deref() != Some(ctx.commands_topic.as_str());
        if subscribe
            && resubscribe
            && let Err(e) = client.subscribe(ctx.commands_topic.clone())
        {
            return Err(failed(
                format!("cannot queue the command subscription: {e}"),
                true,
            ));
        }
        if let Err(e) = client.publish(
            ctx.topics.status(),
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
                    Some(Ok(LinkEvent::ConnAck { session_present })) => return Ok(session_present),
                    Some(Ok(_)) => {}
                    Some(Err(f)) => return Err(self.connect_failed(ctx, f)),
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
            hold: self.refusal_until.filter(|t| *t > Instant::now()),
        };
        let mut tick = tokio::time::interval(TICK);
        loop {
            if st.draining.is_none() {
                self.end_hold(acks, &mut st).await?;
                if st.hold.is_none() {
                    st.linger_until = self.fill(ctx, &conn.client, acks, &mut st).await?;
                }
            } else if acks.inflight.data_len() == 0 {
                return Ok(st.reconfigured);
            }
            let hold_wake = hold_wake(&st);
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
                        if ev.is_incoming() {
                            st.last_rx = Instant::now();
                        }
                        self.on_event(ctx, ev, acks, &conn.client, link.as_deref_mut(), &mut st)?;
                        if acks.batch_full() {
                            self.delete_now(acks).await?;
                        }
                    }
                    Some(Err(f)) => return Err(end_of(f, true)),
                    None => return Err(failed("event loop stopped", true)),
                },
                ack = recv_ack(link.as_deref_mut()) => on_command_ack(ctx, &conn.client, ack)?,
                _ = self.flush.notified() => st.flush_now = true,
                r = st.committed.changed() => if r.is_err() { return Err(EpochEnd::Shutdown) },
                _ = tokio::time::sleep_until(st.linger_until.unwrap_or_else(far)), if st.linger_until.is_some() => {}
                _ = tokio::time::sleep_until(acks.due().unwrap_or_else(far)), if acks.due().is_some() => self.delete_now(acks).await?,
                _ = tokio::time::sleep_until(hold_wake.unwrap_or_else(far)), if hold_wake.is_some() => {}
            }
        }
    }

    /// Ends a refusal hold once its delay is over and nothing is in flight any more: the
    /// acknowledged chunks are deleted, and the drain starts again from the oldest stored
    /// chunk, which sends the refused records again. Restarts the connection if the publishes
    /// in flight are not answered within [`HOLD_DRAIN_LIMIT`] after the delay.
    async fn end_hold(&mut self, acks: &mut Acks, st: &mut Steady) -> Result<(), EpochEnd> {
        let Some(until) = st.hold else {
            return Ok(());
        };
        let now = Instant::now();
        if now < until {
            return Ok(());
        }
        if acks.inflight.data_len() > 0 {
            if now >= until + HOLD_DRAIN_LIMIT {
                return Err(failed(
                    "publishes still unanswered after a refused one; restarting the connection to send them again",
                    true,
                ));
            }
            return Ok(());
        }
        self.delete_now(acks).await?;
        st.drain = DrainState::default();
        st.hold = None;
        self.refusal_until = None;
        info!("Sending the refused data again.");
        Ok(())
    }

    /// The broker refused a data publish: its chunks stay in the spool (nothing is deleted),
    /// the refusal is counted and logged, and new data waits for the retry delay (growing
    /// while refusals go on, reset by an accepted publish).
    fn on_refused(&mut self, pkid: u16, refusal: Refusal, acks: &mut Acks, st: &mut Steady) {
        let Some((sent, stream)) = acks.on_refused(pkid) else {
            warn!(pkid, reason = %refusal, "The broker refused a control publish (the status message); check its ACL.");
            return;
        };
        self.stats.publishes_refused.fetch_add(1, Ordering::Relaxed);
        self.stats
            .records_refused
            .fetch_add(sent.records, Ordering::Relaxed);
        let text = format!("{refusal} on stream {stream}");
        let repeated = {
            let mut last = self
                .stats
                .last_refusal
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            let repeated = last.as_deref() == Some(text.as_str());
            *last = Some(text);
            repeated
        };
        if st.hold.is_some() {
            debug!(stream = %stream, reason = %refusal, records = sent.records, "Another publish refused while holding.");
            return;
        }
        let delay = self.refusal_backoff.next_delay().max(self.refusal_floor);
        st.hold = Some(Instant::now() + delay);
        self.refusal_until = st.hold;
        // No batch lingers while holding (its timer would wake the loop for nothing).
        st.linger_until = None;
        let holds = self.refusal_backoff.attempts();
        if !repeated || holds.is_multiple_of(10) {
            error!(
                stream = %stream,
                reason = %refusal,
                records = sent.records,
                retry_in_ms = delay.as_millis() as u64,
                retries = holds,
                "The broker refused a publish (check its ACL and limits); its records stay in the spool and are sent again."
            );
        } else {
            debug!(stream = %stream, reason = %refusal, retry_in_ms = delay.as_millis() as u64, "Publish refused again.");
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
            let _ = conn.client.publish(
                ctx.topics.status(),
                true,
                options::status_payload("offline", &self.boot),
            );
        }
        let _ = conn.client.disconnect();
        let _ = tokio::time::timeout(DISCONNECT_WAIT, async {
            while let Some(Ok(ev)) = conn.events.recv().await {
                if matches!(ev, LinkEvent::Disconnected) {
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
        client: &Client,
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
        client: &Client,
        acks: &mut Acks,
        m: super::prepare::Prepared,
    ) -> Result<(), EpochEnd> {
        client
            .publish(m.topic, false, m.payload)
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
            // The 3.1.1 packet size, as the budget's fit check counts it: an MQTT 5 PUBLISH
            // carries one more byte (its empty property length), not counted (docs/WIRE.md).
            b.charge(m.wire_bytes);
        }
        if m.pick == Pick::Backlog
            && let Some(last) = m.sent.chunk_ids.last()
        {
            let high = self.sent_high.entry(m.sent.stream_id).or_default();
            *high = (*high).max(*last);
        }
        acks.queued_data(m.sent, &m.stream);
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
        ev: LinkEvent,
        acks: &mut Acks,
        client: &Client,
        link: Option<&mut CommandLink>,
        st: &mut Steady,
    ) -> Result<(), EpochEnd> {
        let commands_topic = ctx.commands_topic.as_str();
        match ev {
            LinkEvent::Published(pkid) => match acks.inflight.on_outgoing(pkid) {
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
            LinkEvent::AwaitAck(pkid) => {
                debug!(pkid, "Packet id collision; rumqttc waits for its ack.")
            }
            LinkEvent::PubAck {
                pkid,
                refusal: Some(refusal),
            } => self.on_refused(pkid, refusal, acks, st),
            LinkEvent::PubAck {
                pkid,
                refusal: None,
            } => {
                if let Some(records) = acks.on_puback(pkid) {
                    self.stats
                        .records_acked
                        .fetch_add(records, Ordering::Relaxed);
                    self.refusal_backoff.reset();
                }
            }
            LinkEvent::SubAck { refused: true } => {
                error!(topic = %commands_topic, "The broker refused the command subscription (check its ACL); commands will not arrive.");
            }
            LinkEvent::SubAck { refused: false } => {
                info!(topic = %commands_topic, "Subscribed to commands.");
                self.subscribed = Some(commands_topic.to_string());
            }
            LinkEvent::Publish { topic, publish } => match link {
                Some(link) if topic == commands_topic => {
                    pass_command(ctx, client, link, publish)?;
                }
                _ => {
                    debug!(topic = %topic, "Unexpected publish acknowledged and ignored.");
                    let _ = client.ack(&publish);
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
    client: &Client,
    link: &mut CommandLink,
    publish: CommandPublish,
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
            if let Err(e) = client.ack(&d.publish) {
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
    client: &Client,
    ack: Option<AckRequest>,
) -> Result<(), EpochEnd> {
    match ack {
        Some(ack) if ack.epoch == ctx.epoch => client
            .ack(&ack.publish)
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

/// When the steady loop must wake up for a refusal hold: at the end of its delay, then at
/// the limit for the publishes still in flight (never a time already past, so the loop does
/// not spin while it waits for their PUBACKs).
fn hold_wake(st: &Steady) -> Option<Instant> {
    let until = st.hold?;
    Some(if Instant::now() < until {
        until
    } else {
        until + HOLD_DRAIN_LIMIT
    })
}

/// A failed connection as the reconnect loop reads it.
pub(super) fn end_of(f: LinkFailure, was_connected: bool) -> EpochEnd {
    EpochEnd::Failed {
        error: f.error,
        serious: f.serious,
        was_connected,
    }
}
