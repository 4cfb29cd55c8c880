//! One client's session: its subscriptions, the messages queued for it, and the QoS 1/2
//! exchanges in flight in both directions. It outlives a connection when the session expiry
//! says so.

use std::collections::{HashMap, HashSet, VecDeque};
use std::num::{NonZeroU16, NonZeroU32};
use std::sync::Arc;
use std::time::Instant;

use ferry_protocol::mqtt::{PacketId, QoS, SubscriptionOptions, Will};
use ferry_protocol::topic::TopicFilter;

use super::Message;

/// A message on its way to one session, with what this session's subscriptions make of it.
#[derive(Debug, Clone)]
pub(crate) struct Delivery {
    pub(crate) msg: Arc<Message>,
    /// min(published QoS, subscription QoS).
    pub(crate) qos: QoS,
    /// The RETAIN flag to send: kept only for retain-as-published or retained-on-subscribe.
    pub(crate) retain: bool,
    pub(crate) subscription_ids: Vec<NonZeroU32>,
    /// Position in the session's queue, unique within the session; the storage key.
    pub(crate) seq: u64,
}

impl Delivery {
    /// What the message costs against the queue caps: payload and topic.
    pub(crate) fn cost(&self) -> usize {
        self.msg.cost()
    }
}

/// Where an outgoing QoS 1/2 exchange stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OutState {
    /// PUBLISH sent (or to be resent), waiting for PUBACK (QoS 1) or PUBREC (QoS 2).
    Published,
    /// PUBREL sent, waiting for PUBCOMP.
    Released,
}

#[derive(Debug, Clone)]
pub(crate) struct Inflight {
    pub(crate) packet_id: PacketId,
    pub(crate) delivery: Delivery,
    pub(crate) state: OutState,
    /// False after a reconnect until it has been sent again.
    pub(crate) sent: bool,
}

#[derive(Debug)]
pub(crate) struct Session {
    pub(crate) client_id: Arc<str>,
    /// The connection now serving this session, if any.
    pub(crate) conn: Option<u64>,
    /// The username of the current (or last) connection, for the ACL.
    pub(crate) username: Option<Arc<str>>,
    /// 0: the session ends with the connection; `u32::MAX`: never expires.
    pub(crate) expiry_secs: u32,
    /// When the connection went away, for expiry.
    pub(crate) disconnected_at: Option<Instant>,
    pub(crate) subscriptions:
        HashMap<String, (TopicFilter, SubscriptionOptions, Option<NonZeroU32>)>,
    pub(crate) queue: VecDeque<Delivery>,
    pub(crate) queued_bytes: usize,
    /// Outgoing QoS 1/2 messages in the order they were first sent.
    pub(crate) inflight: VecDeque<Inflight>,
    next_packet_id: u16,
    /// The sequence number of the next queued delivery.
    pub(crate) next_seq: u64,
    /// Incoming QoS 2 packet ids received and not yet released (PUBREL).
    pub(crate) awaiting_pubrel: HashSet<PacketId>,
    /// The will of the current (or last) connection, and when it is due if pending.
    pub(crate) will: Option<Will>,
    pub(crate) will_due: Option<Instant>,
    /// Installed from the cluster and waiting for its replay (see `resume`).
    pub(crate) resuming: Option<Box<super::resume::Resuming>>,
}

impl Session {
    pub(crate) fn new(client_id: Arc<str>) -> Self {
        Self {
            client_id,
            conn: None,
            username: None,
            expiry_secs: 0,
            disconnected_at: None,
            subscriptions: HashMap::new(),
            queue: VecDeque::new(),
            queued_bytes: 0,
            inflight: VecDeque::new(),
            next_packet_id: 1,
            next_seq: 0,
            awaiting_pubrel: HashSet::new(),
            will: None,
            will_due: None,
            resuming: None,
        }
    }

    /// Appends to the queue, giving the delivery its sequence number; returns it.
    pub(crate) fn push(&mut self, mut delivery: Delivery) -> &Delivery {
        delivery.seq = self.next_seq;
        self.next_seq += 1;
        self.queued_bytes += delivery.cost();
        self.queue.push_back(delivery);
        self.queue.back().expect("just pushed")
    }

    /// Whether the session outlives its connection, and so is kept on disk.
    pub(crate) fn is_persistent(&self) -> bool {
        self.expiry_secs > 0
    }

    pub(crate) fn pop(&mut self) -> Option<Delivery> {
        let d = self.queue.pop_front()?;
        self.queued_bytes -= d.cost();
        Some(d)
    }

    /// Bytes held for this session: queued and in flight.
    pub(crate) fn held_bytes(&self) -> usize {
        self.queued_bytes
            + self
                .inflight
                .iter()
                .map(|i| i.delivery.cost())
                .sum::<usize>()
    }

    /// The next packet identifier not in flight. The caller keeps the window below 65535.
    pub(crate) fn next_packet_id(&mut self) -> PacketId {
        loop {
            let id = NonZeroU16::new(self.next_packet_id).unwrap_or(NonZeroU16::MIN);
            self.next_packet_id = self.next_packet_id.wrapping_add(1).max(1);
            if !self.inflight.iter().any(|i| i.packet_id == id) {
                return id;
            }
        }
    }

    pub(crate) fn inflight_position(&self, id: PacketId) -> Option<usize> {
        self.inflight.iter().position(|i| i.packet_id == id)
    }
}

/// The QoS a subscriber receives: never more than it asked for.
pub(crate) fn effective_qos(published: QoS, subscribed: QoS) -> QoS {
    published.min(subscribed)
}
