//! The PUBACK-to-deletion path, all of it: which spool chunks a PUBACK acknowledges, and
//! deleting them.
//!
//! rumqttc's `publish()` returning `Ok` only means "queued"; the packet id is known when its
//! event loop reports `Outgoing::Publish(pkid)`, and it takes requests strictly FIFO. So per
//! connection epoch:
//!
//! - [`Inflight::queued`] appends the publish to `awaiting` (handed to the client, pkid unknown);
//! - [`Inflight::on_outgoing`] binds a new pkid to the front of `awaiting`. A pkid that is already
//!   bound is a retransmission of that publish and binds nothing; pkid 0 is QoS 0 and ignored;
//! - [`Inflight::on_puback`] releases the entry bound to that pkid, whose chunks may now be
//!   deleted from the spool. A PUBACK for an unknown pkid releases nothing.
//! - [`Acks::on_refused`]: an MQTT 5 PUBACK with a reason code >= 0x80 releases the entry
//!   *without* deleting anything: the broker did not take the message, so its chunks stay in
//!   the spool and are sent again.
//! - [`Acks`] wraps the epoch's [`Inflight`] and the chunks acknowledged but not deleted yet
//!   ([`PendingDeletes`]). Deleting is lazy by contract (a lost deletion only causes a resend):
//!   PUBACKs are collected and deleted in one sled batch every [`DELETE_BATCH`] chunks or
//!   [`DELETE_LINGER`], and at the end of every epoch. Nothing else deletes spool chunks.
//!
//! When the epoch ends the whole structure is dropped: everything not acknowledged stays in
//! the spool and is sent again by the next epoch (a duplicate at worst, never a loss).

use crate::spool::Spool;
use std::collections::{HashMap, VecDeque};
use std::time::Duration;
use tokio::time::Instant;

/// Acknowledged chunks deleted together (see [`PendingDeletes`]).
pub const DELETE_BATCH: usize = 256;
/// An acknowledged chunk waits at most this long for its deletion.
pub const DELETE_LINGER: Duration = Duration::from_millis(200);

/// A published data message whose PUBACK is awaited.
#[derive(Debug, Clone)]
pub struct Sent {
    pub stream_id: u32,
    pub chunk_ids: Vec<u64>,
    pub records: u64,
    /// Payload size.
    pub bytes: usize,
}

/// Acknowledged chunks not deleted yet, by stream.
#[derive(Default)]
struct PendingDeletes {
    by_stream: HashMap<u32, Vec<u64>>,
    chunks: usize,
    since: Option<Instant>,
}

impl PendingDeletes {
    fn add(&mut self, sent: Sent) {
        self.chunks += sent.chunk_ids.len();
        self.by_stream
            .entry(sent.stream_id)
            .or_default()
            .extend(sent.chunk_ids);
        self.since.get_or_insert_with(Instant::now);
    }
}

/// One epoch's acknowledgement state: the in-flight map and the deletions it has released.
#[derive(Default)]
pub struct Acks {
    pub inflight: Inflight<Sent>,
    deletes: PendingDeletes,
    /// Stream names by id, for what is logged about a refused publish.
    names: HashMap<u32, String>,
}

impl Acks {
    /// Records a data publish the client accepted (see [`Inflight::queued`]).
    pub fn queued_data(&mut self, sent: Sent, stream: &str) {
        self.names
            .entry(sent.stream_id)
            .or_insert_with(|| stream.to_string());
        self.inflight.queued(Tag::Data(sent));
    }

    /// Applies a refusing PUBACK (MQTT 5 reason code >= 0x80): the publish is no longer in
    /// flight and nothing is deleted. Returns the data publish it was, with its stream's name.
    pub fn on_refused(&mut self, pkid: u16) -> Option<(Sent, String)> {
        match self.inflight.on_puback(pkid) {
            Some(Tag::Data(sent)) => {
                let name = self
                    .names
                    .get(&sent.stream_id)
                    .cloned()
                    .unwrap_or_else(|| format!("#{}", sent.stream_id));
                Some((sent, name))
            }
            _ => None,
        }
    }

    /// Applies a PUBACK; returns the records it acknowledged (data publishes only).
    pub fn on_puback(&mut self, pkid: u16) -> Option<u64> {
        match self.inflight.on_puback(pkid) {
            Some(Tag::Data(sent)) => {
                let records = sent.records;
                self.deletes.add(sent);
                Some(records)
            }
            _ => None,
        }
    }

    /// Deletes a message's chunks without a PUBACK: only for chunks that can never be sent.
    pub fn discard(&mut self, sent: Sent) {
        self.deletes.add(sent);
    }

    /// When the pending deletions must be carried out, if any are waiting.
    pub fn due(&self) -> Option<Instant> {
        self.deletes.since.map(|t| t + DELETE_LINGER)
    }

    /// Enough deletions are waiting to make one batch.
    pub fn batch_full(&self) -> bool {
        self.deletes.chunks >= DELETE_BATCH
    }

    /// Deletes the chunks acknowledged so far, in one sled batch.
    pub async fn delete_acked(&mut self, spool: &Spool) -> Result<(), String> {
        if self.deletes.chunks == 0 {
            return Ok(());
        }
        let acked: Vec<(u32, Vec<u64>)> = self.deletes.by_stream.drain().collect();
        self.deletes.chunks = 0;
        self.deletes.since = None;
        let spool = spool.clone();
        tokio::task::spawn_blocking(move || spool.ack_many(&acked))
            .await
            .map_err(|e| format!("spool delete panicked: {e}"))?
            .map_err(|e| format!("cannot delete acknowledged records: {e}"))?;
        Ok(())
    }
}

/// What a bound publish carried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tag<T> {
    /// Spool data: acknowledge these chunks when the PUBACK arrives.
    Data(T),
    /// A control publish (the status message): nothing to delete.
    Control,
}

/// Result of an `Outgoing::Publish` event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bind {
    Bound,
    /// The pkid is already bound: rumqttc resent that packet.
    Retransmission,
    /// QoS 0 (pkid 0): not tracked.
    Untracked,
    /// Nothing was waiting for a pkid: the FIFO invariant broke. The caller must end the epoch
    /// so no PUBACK can be applied to the wrong chunks.
    Unexpected,
}

#[derive(Debug)]
pub struct Inflight<T> {
    awaiting: VecDeque<Tag<T>>,
    bound: HashMap<u16, Tag<T>>,
}

impl<T> Default for Inflight<T> {
    fn default() -> Self {
        Inflight {
            awaiting: VecDeque::new(),
            bound: HashMap::new(),
        }
    }
}

impl<T> Inflight<T> {
    pub fn new() -> Self {
        Self::default()
    }

    /// Records a publish the client accepted, in the order it was handed over.
    pub fn queued(&mut self, tag: Tag<T>) {
        self.awaiting.push_back(tag);
    }

    pub fn on_outgoing(&mut self, pkid: u16) -> Bind {
        if pkid == 0 {
            return Bind::Untracked;
        }
        if self.bound.contains_key(&pkid) {
            return Bind::Retransmission;
        }
        match self.awaiting.pop_front() {
            Some(tag) => {
                self.bound.insert(pkid, tag);
                Bind::Bound
            }
            None => Bind::Unexpected,
        }
    }

    pub fn on_puback(&mut self, pkid: u16) -> Option<Tag<T>> {
        self.bound.remove(&pkid)
    }

    /// Publishes handed over and not yet acknowledged.
    pub fn len(&self) -> usize {
        self.awaiting.len() + self.bound.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Data publishes not yet acknowledged (control publishes do not use the window).
    pub fn data_len(&self) -> usize {
        let is_data = |t: &Tag<T>| matches!(t, Tag::Data(_));
        self.awaiting.iter().filter(|t| is_data(t)).count()
            + self.bound.values().filter(|t| is_data(t)).count()
    }

    /// The data publishes not yet acknowledged.
    pub fn data(&self) -> impl Iterator<Item = &T> {
        fn data<T>(t: &Tag<T>) -> Option<&T> {
            match t {
                Tag::Data(d) => Some(d),
                Tag::Control => None,
            }
        }
        self.awaiting
            .iter()
            .filter_map(data)
            .chain(self.bound.values().filter_map(data))
    }

    /// Forgets everything (end of an epoch); returns how many publishes were unacknowledged.
    pub fn reset(&mut self) -> usize {
        let n = self.len();
        self.awaiting.clear();
        self.bound.clear();
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binds_in_fifo_order_and_acks_release_the_right_batch() {
        let mut f = Inflight::new();
        f.queued(Tag::Control);
        f.queued(Tag::Data("a"));
        f.queued(Tag::Data("b"));
        assert_eq!(f.on_outgoing(1), Bind::Bound);
        assert_eq!(f.on_outgoing(2), Bind::Bound);
        assert_eq!(f.on_outgoing(3), Bind::Bound);
        assert_eq!(f.data_len(), 2);
        // Acks may come in any order.
        assert_eq!(f.on_puback(3), Some(Tag::Data("b")));
        assert_eq!(f.on_puback(1), Some(Tag::Control));
        assert_eq!(f.on_puback(2), Some(Tag::Data("a")));
        assert!(f.is_empty());
    }

    #[test]
    fn retransmission_binds_nothing() {
        let mut f = Inflight::new();
        f.queued(Tag::Data(1));
        f.queued(Tag::Data(2));
        assert_eq!(f.on_outgoing(7), Bind::Bound);
        // rumqttc resends pkid 7 (e.g. a replayed pending publish): batch 2 must stay unbound.
        assert_eq!(f.on_outgoing(7), Bind::Retransmission);
        assert_eq!(f.on_puback(7), Some(Tag::Data(1)));
        assert_eq!(f.on_outgoing(8), Bind::Bound);
        assert_eq!(f.on_puback(8), Some(Tag::Data(2)));
    }

    #[test]
    fn pkid_reuse_after_ack_binds_the_next_batch() {
        let mut f = Inflight::new();
        f.queued(Tag::Data("x"));
        f.queued(Tag::Data("y"));
        assert_eq!(f.on_outgoing(1), Bind::Bound);
        assert_eq!(f.on_puback(1), Some(Tag::Data("x")));
        // rumqttc's pkid counter wrapped: 1 is free again and now carries "y".
        assert_eq!(f.on_outgoing(1), Bind::Bound);
        assert_eq!(f.on_puback(1), Some(Tag::Data("y")));
    }

    #[test]
    fn unknown_puback_and_qos0_are_ignored() {
        let mut f: Inflight<u8> = Inflight::new();
        f.queued(Tag::Data(1));
        assert_eq!(f.on_outgoing(0), Bind::Untracked);
        assert_eq!(f.on_puback(9), None);
        assert_eq!(f.len(), 1);
    }

    #[test]
    fn outgoing_with_nothing_awaiting_is_reported() {
        let mut f: Inflight<u8> = Inflight::new();
        assert_eq!(f.on_outgoing(1), Bind::Unexpected);
    }

    fn sent(stream_id: u32, chunk: u64) -> Sent {
        Sent {
            stream_id,
            chunk_ids: vec![chunk],
            records: 3,
            bytes: 100,
        }
    }

    #[test]
    fn a_refused_publish_deletes_nothing_and_an_accepted_one_does() {
        let mut a = Acks::default();
        a.queued_data(sent(1, 10), "sys");
        a.queued_data(sent(1, 11), "sys");
        assert_eq!(a.inflight.on_outgoing(1), Bind::Bound);
        assert_eq!(a.inflight.on_outgoing(2), Bind::Bound);
        let (refused, name) = a.on_refused(1).expect("data publish");
        assert_eq!((refused.chunk_ids, name.as_str()), (vec![10], "sys"));
        assert!(a.due().is_none(), "a refusal must not schedule a deletion");
        assert_eq!(a.on_puback(2), Some(3));
        assert_eq!(a.deletes.by_stream.get(&1), Some(&vec![11]));
        assert!(a.inflight.is_empty());
        // A refusal for a packet id nothing is bound to releases nothing.
        assert!(a.on_refused(7).is_none());
    }

    #[test]
    fn reset_on_reconnect_forgets_everything() {
        let mut f = Inflight::new();
        f.queued(Tag::Data(1));
        f.queued(Tag::Data(2));
        f.on_outgoing(1);
        assert_eq!(f.reset(), 2);
        assert!(f.is_empty());
        // A PUBACK from the old epoch for pkid 1 must not release anything of the new one.
        assert_eq!(f.on_puback(1), None);
        f.queued(Tag::Data(3));
        assert_eq!(f.on_outgoing(1), Bind::Bound);
        assert_eq!(f.on_puback(1), Some(Tag::Data(3)));
    }
}
