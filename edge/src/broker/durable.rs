//! What the broker hands the storage layer ([`StoreOp`]s, applied by the driver in one
//! commit per batch) and what it reads back at start-up ([`Snapshot`]).

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Instant;

use ferry_protocol::mqtt::{PacketId, SubscriptionOptions};
use ferry_protocol::topic::{TopicFilter, TopicName};

use super::session::{Inflight, OutState, Session};
use super::subscriptions::Entry;
use super::{Broker, Delivery, Message};

/// A change to durable state, for the storage layer to apply. The broker emits these while it
/// handles a batch of inputs; the driver writes them in one transaction and only then sends
/// the batch's packets, so that no acknowledgement leaves before what it acknowledges is on
/// disk (group commit).
///
/// Persisted: sessions that outlive their connection (expiry > 0) with their subscriptions,
/// their queued and in-flight QoS 1/2 messages and their unreleased incoming QoS 2 ids; and
/// retained messages; on the edge, the outbox and where the downlink stands.
#[derive(Debug, Clone)]
pub(crate) enum StoreOp {
    SessionPut {
        client_id: Arc<str>,
        /// Kept so that the ACL applies to deliveries while the session is offline.
        username: Option<Arc<str>>,
        expiry_secs: u32,
        subscriptions: Vec<(TopicFilter, SubscriptionOptions, Option<NonZeroU32>)>,
    },
    /// Removes the session with its queue and QoS 2 state.
    SessionDelete {
        client_id: Arc<str>,
    },
    /// A queued or in-flight delivery, with where its exchange stands.
    QueuePut {
        client_id: Arc<str>,
        delivery: Delivery,
        state: QueueState,
    },
    QueueDelete {
        client_id: Arc<str>,
        seq: u64,
    },
    RetainedPut {
        msg: Arc<Message>,
    },
    RetainedDelete {
        topic: TopicName,
    },
    Qos2Put {
        client_id: Arc<str>,
        packet_id: PacketId,
    },
    Qos2Delete {
        client_id: Arc<str>,
        packet_id: PacketId,
    },
    /// The edge's outbox and downlink (feature `edge`): see [`crate::outbox::OutboxOp`].
    #[cfg(feature = "edge")]
    Outbox(crate::outbox::OutboxOp),
}

impl StoreOp {
    /// The session the change is to, if it is to one.
    pub(crate) fn session(&self) -> Option<Arc<str>> {
        match self {
            StoreOp::SessionPut { client_id, .. }
            | StoreOp::SessionDelete { client_id }
            | StoreOp::QueuePut { client_id, .. }
            | StoreOp::QueueDelete { client_id, .. }
            | StoreOp::Qos2Put { client_id, .. }
            | StoreOp::Qos2Delete { client_id, .. } => Some(client_id.clone()),
            _ => None,
        }
    }
}

/// Where a stored delivery stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum QueueState {
    Queued,
    /// Sent with this packet id, waiting for PUBACK / PUBREC.
    Published(PacketId),
    /// PUBREL sent, waiting for PUBCOMP.
    Released(PacketId),
}

/// Durable state the broker reads back at start-up (the outbox is not the broker's: its
/// budget is restored with it, before `Broker::set_outbox`).
#[derive(Debug, Default)]
pub(crate) struct Snapshot {
    pub(crate) sessions: Vec<StoredSession>,
    pub(crate) retained: Vec<Message>,
}

#[derive(Debug)]
pub(crate) struct StoredSession {
    pub(crate) client_id: Arc<str>,
    pub(crate) username: Option<Arc<str>>,
    pub(crate) expiry_secs: u32,
    pub(crate) subscriptions: Vec<(TopicFilter, SubscriptionOptions, Option<NonZeroU32>)>,
    /// In sequence order.
    pub(crate) queue: Vec<(Delivery, QueueState)>,
    pub(crate) awaiting_pubrel: Vec<PacketId>,
}

impl Broker {
    /// The durable changes made since the last call, in order. The driver must make them
    /// durable before it sends the packets of the same batch.
    pub(crate) fn take_store_ops(&mut self) -> Vec<StoreOp> {
        std::mem::take(&mut self.store_ops)
    }

    /// Loads durable state at start-up, before any connection. Sessions come back offline:
    /// their expiry counts from `now`, their in-flight messages are resent with DUP when
    /// they reconnect.
    pub(crate) fn restore(&mut self, snapshot: Snapshot, now: Instant) {
        self.start_clock(now);
        for msg in snapshot.retained {
            self.retained.insert(msg.topic.clone(), Arc::new(msg));
        }
        for stored in snapshot.sessions {
            let mut session = Session::new(stored.client_id.clone());
            session.expiry_secs = stored.expiry_secs;
            session.username = stored.username;
            session.disconnected_at = Some(now);
            self.restore_subscriptions(&mut session, stored.subscriptions);
            for (delivery, state) in stored.queue {
                self.queued_bytes += delivery.cost();
                session.next_seq = session.next_seq.max(delivery.seq + 1);
                match state {
                    QueueState::Queued => {
                        session.queued_bytes += delivery.cost();
                        session.queue.push_back(delivery);
                    }
                    QueueState::Published(packet_id) | QueueState::Released(packet_id) => {
                        session.inflight.push_back(Inflight {
                            packet_id,
                            delivery,
                            state: if matches!(state, QueueState::Released(_)) {
                                OutState::Released
                            } else {
                                OutState::Published
                            },
                            sent: false,
                        });
                    }
                }
            }
            session.awaiting_pubrel.extend(stored.awaiting_pubrel);
            self.sessions.insert(stored.client_id.clone(), session);
            self.arm_session(&stored.client_id);
        }
    }

    /// Gives `session` (not in the broker's map yet) `subscriptions`, in the subscription
    /// tree too.
    pub(super) fn restore_subscriptions(
        &mut self,
        session: &mut Session,
        subscriptions: Vec<(TopicFilter, SubscriptionOptions, Option<NonZeroU32>)>,
    ) {
        for (filter, options, id) in subscriptions {
            self.subscriptions.insert(
                &filter,
                Entry {
                    client_id: session.client_id.clone(),
                    shared_group: filter.is_shared().then(|| Arc::from(filter.as_str())),
                    options,
                    id,
                },
            );
            session
                .subscriptions
                .insert(filter.as_str().to_owned(), (filter, options, id));
        }
    }

    pub(super) fn persist_session(&mut self, client_id: &Arc<str>) {
        let Some(session) = self.sessions.get(client_id) else {
            return;
        };
        let op = if session.is_persistent() {
            StoreOp::SessionPut {
                client_id: client_id.clone(),
                username: session.username.clone(),
                expiry_secs: session.expiry_secs,
                subscriptions: session.subscriptions.values().cloned().collect(),
            }
        } else {
            StoreOp::SessionDelete {
                client_id: client_id.clone(),
            }
        };
        self.store_ops.push(op);
    }
}
