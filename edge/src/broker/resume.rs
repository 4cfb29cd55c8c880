//! Log mode in a cluster: persistent sessions that move between nodes.
//!
//! A node keeps what it holds of each persistent session where the whole cluster can read it
//! ([`Broker::session_states`], taken by the driver at most about once a second): its
//! subscriptions, its QoS 2 receipts, its messages in flight by packet id and log position,
//! and per partition the oldest message it still holds. Nothing is copied: the messages are
//! in the log.
//!
//! A client that connects with Clean Start 0 to a node that has no session for it is parked
//! ([`Action::FetchSession`]): no CONNACK, its later packets kept, until the node has asked
//! the cluster. With no session anywhere ([`Input::Fetched`] with none) it connects as new.
//! With one, the session is installed here at once, so that what the log delivers from then
//! on reaches it, but those deliveries wait aside while the node reads the log again from
//! the session's positions ([`Action::Replay`]); the messages read ([`Input::Replayed`]) go
//! to the session first, those in flight under their old packet ids, then the ones that
//! waited aside (less those the replay read too), and only then is the client answered,
//! with Session Present 1. Messages it had acknowledged since the last state was recorded
//! come again (at least once).

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Instant;

use ferry_protocol::mqtt::{
    ConnAck, Connect, Packet, PacketId, QoS, ReasonCode, SubscriptionOptions,
};
use ferry_protocol::topic::TopicFilter;

use super::flow::enqueue;
use super::route::add_match;
use super::session::{Delivery, Inflight, OutState, Session};
use super::{Action, Broker, ConnId, Input, Message, QueueState, StoreOp};
use crate::auth;

/// Where a message is in the cloud's log: a partition of a stream and an offset.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct LogPosition {
    pub stream: Arc<str>,
    pub partition: u32,
    pub offset: i64,
}

/// What a node holds of a persistent session, for another node to resume it.
#[derive(Debug, Clone, PartialEq)]
pub struct SessionState {
    pub client_id: Arc<str>,
    pub expiry_secs: u32,
    pub subscriptions: Vec<(TopicFilter, SubscriptionOptions, Option<NonZeroU32>)>,
    /// Incoming QoS 2 packet ids received and not yet released.
    pub awaiting_pubrel: Vec<PacketId>,
    /// Messages sent and not acknowledged, oldest first: the packet id, whether PUBREL was
    /// sent (QoS 2), and where the message is in the log.
    pub inflight: Vec<(PacketId, bool, LogPosition)>,
    /// From [`Broker::session_states`]: per partition, the oldest message the session holds
    /// (in flight or queued). In [`Input::Fetched`]: where the replay starts, per partition.
    pub positions: Vec<LogPosition>,
}

/// What [`Broker::session_states`] reports of a session.
#[derive(Debug, Clone, PartialEq)]
pub enum SessionCheckpoint {
    /// The session as it is now.
    Held(SessionState),
    /// The session is not persistent here (any more): nothing to resume.
    Gone(Arc<str>),
}

/// A CONNECT waiting for the cluster's answer, and what its connection sent since.
#[derive(Debug)]
pub(super) struct Parked {
    client_id: Arc<str>,
    connect: Connect,
    credit: usize,
    inputs: Vec<Input>,
}

/// A session installed from the cluster, waiting for its replay.
#[derive(Debug, Default)]
pub(crate) struct Resuming {
    /// Packet id and state of each message in flight, by position.
    inflight: HashMap<LogPosition, (PacketId, bool)>,
    /// Deliveries routed to the session meanwhile, in order.
    pub(super) aside: Vec<Delivery>,
}

impl Broker {
    /// Whether a CONNECT must wait for the cluster: a node in a cluster, a client id the
    /// client chose, Clean Start 0, and no session for it here.
    pub(super) fn must_fetch(&self, connect: &Connect, client_id: &str, chosen: bool) -> bool {
        self.fetching && chosen && !connect.clean_start && !self.sessions.contains_key(client_id)
    }

    /// Parks `connect` until [`Input::Fetched`] (see the module docs).
    pub(super) fn park(
        &mut self,
        conn: ConnId,
        client_id: Arc<str>,
        connect: Connect,
        credit: usize,
    ) {
        self.out.push(Action::FetchSession {
            conn,
            client_id: client_id.clone(),
        });
        self.parked.insert(
            conn,
            Parked {
                client_id,
                connect,
                credit,
                inputs: Vec::new(),
            },
        );
    }

    /// An input for a parked connection: kept for after its CONNACK (credit counted, a lost
    /// connection forgotten). The input back if it is not for a parked connection.
    pub(super) fn parked_input(&mut self, input: Input) -> Option<Input> {
        let conn = match &input {
            Input::Packet { conn, .. }
            | Input::Written { conn, .. }
            | Input::Lost { conn }
            | Input::Malformed { conn, .. } => *conn,
            _ => return Some(input),
        };
        let Some(parked) = self.parked.get_mut(&conn) else {
            return Some(input);
        };
        match input {
            Input::Written { packets, .. } => parked.credit += packets,
            Input::Lost { .. } => {
                self.parked.remove(&conn);
            }
            Input::Malformed { .. } => {
                self.parked.remove(&conn);
                self.out.push(Action::Close(conn));
            }
            other => parked.inputs.push(other),
        }
        None
    }

    /// [`Input::Fetched`]: the cluster's answer for a parked connection.
    pub(super) fn fetched(
        &mut self,
        conn: ConnId,
        session: Result<Option<SessionState>, ()>,
        now: Instant,
    ) {
        match session {
            Err(()) => {
                // The cluster cannot say: no session is started that might hide another.
                if self.parked.remove(&conn).is_some() {
                    self.out.push(Action::Send(
                        conn,
                        Packet::ConnAck(ConnAck::new(ReasonCode::ServerUnavailable, false)),
                    ));
                    self.out.push(Action::Close(conn));
                }
            }
            Ok(None) => self.unpark(conn, now),
            Ok(Some(state)) => {
                if self.sessions.contains_key(&state.client_id) {
                    // Made here meanwhile (another connection with the same id): that one
                    // is newer.
                    return self.unpark(conn, now);
                }
                let username = self
                    .parked
                    .get(&conn)
                    .and_then(|p| p.connect.username.clone());
                self.install(state, username.as_deref().map(Arc::from), now);
            }
        }
    }

    /// A session from the cluster, offline until its replay is in.
    fn install(&mut self, state: SessionState, username: Option<Arc<str>>, now: Instant) {
        let client_id = state.client_id.clone();
        let filters = state
            .subscriptions
            .iter()
            .map(|(f, _, _)| f.clone())
            .collect();
        let mut session = Session::new(client_id.clone());
        session.expiry_secs = state.expiry_secs;
        session.username = username;
        session.disconnected_at = Some(now);
        self.restore_subscriptions(&mut session, state.subscriptions);
        session
            .awaiting_pubrel
            .extend(state.awaiting_pubrel.iter().copied());
        for id in &state.awaiting_pubrel {
            self.store_ops.push(StoreOp::Qos2Put {
                client_id: client_id.clone(),
                packet_id: *id,
            });
        }
        session.resuming = Some(Box::new(Resuming {
            inflight: state
                .inflight
                .into_iter()
                .map(|(id, released, at)| (at, (id, released)))
                .collect(),
            aside: Vec::new(),
        }));
        self.sessions.insert(client_id.clone(), session);
        self.persist_session(&client_id);
        self.out.push(Action::Replay {
            client_id,
            from: state.positions,
            filters,
        });
    }

    /// [`Input::Replayed`]: the session's messages from the log, then what waited aside;
    /// then its parked connection, if still there, is answered.
    pub(super) fn replayed(
        &mut self,
        client_id: &str,
        messages: Vec<Arc<Message>>,
        until: &[LogPosition],
        now: Instant,
    ) {
        let waiting: Vec<ConnId> = self
            .parked
            .iter()
            .filter(|(_, p)| *p.client_id == *client_id)
            .map(|(conn, _)| *conn)
            .collect();
        let resuming = self
            .sessions
            .get_mut(client_id)
            .and_then(|s| s.resuming.take());
        if let Some(resuming) = resuming {
            self.take_replay(client_id, *resuming, messages, until, now);
        }
        // (A session ended meanwhile, taken by another node: they connect as new.)
        for conn in waiting {
            self.unpark(conn, now);
        }
    }

    /// What [`Broker::replayed`] brings into the session of `client_id`, then what waited
    /// aside; sent at once if a connection serves it already (a second CONNECT answered
    /// while the first waited).
    fn take_replay(
        &mut self,
        client_id: &str,
        resuming: Resuming,
        messages: Vec<Arc<Message>>,
        until: &[LogPosition],
        now: Instant,
    ) {
        let Some(session) = self.sessions.get_mut(client_id) else {
            return;
        };
        let Resuming { inflight, aside } = resuming;
        let persistent = session.is_persistent();
        let client_id = session.client_id.clone();
        for msg in messages {
            let in_flight = msg.position.as_ref().and_then(|at| inflight.get(at));
            let Some(mut d) = delivery_for(session, &msg) else {
                continue;
            };
            let allowed = self.auth.allows_everything()
                || self.auth.allows(
                    session.username.as_deref(),
                    &client_id,
                    auth::Action::Receive,
                    msg.topic.as_str(),
                );
            if !allowed {
                continue;
            }
            if let Some(&(packet_id, released)) = in_flight {
                d.seq = session.next_seq;
                session.next_seq += 1;
                self.queued_bytes += d.cost();
                if persistent {
                    self.store_ops.push(StoreOp::QueuePut {
                        client_id: client_id.clone(),
                        delivery: d.clone(),
                        state: if released {
                            QueueState::Released(packet_id)
                        } else {
                            QueueState::Published(packet_id)
                        },
                    });
                }
                session.inflight.push_back(Inflight {
                    packet_id,
                    delivery: d,
                    state: if released {
                        OutState::Released
                    } else {
                        OutState::Published
                    },
                    sent: false,
                });
            } else if d.qos != QoS::AtMostOnce {
                // Within the queue caps, as for any offline session.
                let cost = d.cost();
                if session.held_bytes() + cost > self.config.max_queued_bytes_per_session
                    || self.queued_bytes + cost > self.config.max_queued_bytes_total
                {
                    self.stats.dropped_offline_queue_full += 1;
                    continue;
                }
                self.queued_bytes += cost;
                enqueue(session, d, &mut self.store_ops);
            }
        }
        for d in aside {
            let replayed = d.msg.position.as_ref().is_some_and(|at| {
                until.iter().any(|u| {
                    u.stream == at.stream && u.partition == at.partition && at.offset < u.offset
                })
            });
            if !replayed {
                self.queued_bytes += d.cost();
                enqueue(session, d, &mut self.store_ops);
            }
        }
        if session.conn.is_some() {
            self.pump(&client_id, now);
        }
    }

    /// Answers a parked connection as if its CONNECT came now (the session it finds here,
    /// if any, is resumed), then applies what it sent meanwhile.
    fn unpark(&mut self, conn: ConnId, now: Instant) {
        let Some(parked) = self.parked.remove(&conn) else {
            return;
        };
        self.connect_fetched(conn, parked.connect, parked.credit, now);
        for input in parked.inputs {
            let mut out = Vec::new();
            self.handle(input, now, &mut out);
            self.out.append(&mut out);
        }
    }

    /// Persistent sessions among `client_ids` as they stand, for the cluster.
    pub fn session_states(&self, client_ids: &[Arc<str>]) -> Vec<SessionCheckpoint> {
        client_ids
            .iter()
            .filter_map(|id| match self.sessions.get(id) {
                // A session still waiting for its replay: what the cluster has is newer.
                Some(s) if s.resuming.is_some() => None,
                Some(s) if s.is_persistent() => Some(SessionCheckpoint::Held(state_of(s))),
                _ => Some(SessionCheckpoint::Gone(id.clone())),
            })
            .collect()
    }
}

/// What `session` holds, for [`Broker::session_states`].
fn state_of(session: &Session) -> SessionState {
    let mut oldest: Vec<LogPosition> = Vec::new();
    let held = session
        .inflight
        .iter()
        .map(|i| &i.delivery)
        .chain(session.queue.iter());
    for d in held {
        let Some(at) = &d.msg.position else { continue };
        match oldest
            .iter_mut()
            .find(|o| o.stream == at.stream && o.partition == at.partition)
        {
            Some(o) => o.offset = o.offset.min(at.offset),
            None => oldest.push(at.clone()),
        }
    }
    SessionState {
        client_id: session.client_id.clone(),
        expiry_secs: session.expiry_secs,
        subscriptions: session.subscriptions.values().cloned().collect(),
        awaiting_pubrel: session.awaiting_pubrel.iter().copied().collect(),
        inflight: session
            .inflight
            .iter()
            .filter_map(|i| {
                let at = i.delivery.msg.position.clone()?;
                Some((i.packet_id, i.state == OutState::Released, at))
            })
            .collect(),
        positions: oldest,
    }
}

/// The delivery `msg` makes for `session` alone, by its subscriptions (shared ones too: a
/// replay cannot know which member of a group had it), as routing would.
fn delivery_for(session: &Session, msg: &Arc<Message>) -> Option<Delivery> {
    let mut d: Option<Delivery> = None;
    for (filter, options, id) in session.subscriptions.values() {
        if !filter.matches(&msg.topic)
            || (options.no_local && msg.publisher.as_ref() == Some(&session.client_id))
        {
            continue;
        }
        let d = d.get_or_insert_with(|| Delivery {
            msg: msg.clone(),
            qos: QoS::AtMostOnce,
            retain: false,
            subscription_ids: Vec::new(),
            seq: 0,
        });
        add_match(d, options, *id);
    }
    d
}
