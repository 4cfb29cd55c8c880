//! The MQTT broker core, sans-IO: sessions, subscriptions, retained messages, wills and the
//! QoS flows, as a state machine that a driver feeds with [`Input`]s and that answers with
//! [`Action`]s. It never touches a socket or reads a clock; `now` comes in with every input.
//!
//! Flow control is explicit, so that memory stays bounded:
//!
//! - Each connection has a send credit (packets the driver can take without blocking). The
//!   broker never emits more [`Action::Send`]s than that; the driver gives credit back with
//!   [`Input::Written`] once packets are on the wire. What cannot be sent waits in the
//!   session's queue.
//! - Each session's queue is capped (`max_queued_bytes_per_session`), and so are all queues
//!   together (`max_queued_bytes_total`). When a QoS ≥ 1 message would overflow the queue of
//!   a connected subscriber, the message is held and its publisher is paused
//!   ([`Action::PauseReads`]): no PUBACK, no more reads, until the subscriber drains. No
//!   acknowledged message is dropped for a connected subscriber. For a subscriber that is
//!   offline, or for QoS 0, a message that does not fit is dropped and counted.
//!
//! Time comes in and timers go out, as in quinn-proto: every input carries `now`, and
//! [`Broker::poll_timeout`] says when the broker next needs to be called if nothing else
//! happens. The driver waits for input or that instant, whichever comes first, and then
//! hands in [`Input::Timeout`]. The deadlines are: each connection's keep alive (closed as
//! if the network had failed when the client sent nothing for 1.5 times its interval,
//! MQTT-3.1.2-22), each offline session's will delay and expiry, and the next `$SYS`
//! update. Nothing else is timed: an unacknowledged QoS 1/2 delivery is resent only when
//! its session reconnects (MQTT 5.0 §4.4 allows no other resend), an expired message is
//! dropped when its turn to be sent comes, and held publishers and deliveries are retried
//! when room is made (credit back, an acknowledgement, a connection gone).
//!
//! This file holds the types a driver uses and [`Broker::handle`], which dispatches each
//! input; the rest of `impl Broker` is split by concern:
//!
//! - `connect`: CONNECT, DISCONNECT and lost connections, keep alive, wills, session expiry.
//! - `timers`: the deadlines behind [`Broker::poll_timeout`].
//! - `publish`: an incoming PUBLISH (MQTT rules, ACL, acknowledgement, QoS 2 receipt).
//! - `route`: matching sessions, the queue caps, retained messages.
//! - `subscribe`: SUBSCRIBE and UNSUBSCRIBE.
//! - `flow`: sending within the credit, acknowledgements of what we sent, held publishers.
//! - `downstream`: what becomes of an accepted message: local subscribers only, the edge's
//!   outbox (`crate::outbox`, feature `edge`) or the cloud's log (log mode).
//! - `durable`: what goes to storage and what comes back at start-up.
//! - `stats`: counters, connected clients, `$SYS`.

mod connect;
mod downstream;
mod durable;
mod flow;
mod publish;
mod resume;
mod route;
mod session;
mod stats;
mod subscribe;
mod subscriptions;
mod timers;

pub(crate) use durable::{QueueState, Snapshot, StoreOp, StoredSession};
pub use resume::{LogPosition, SessionCheckpoint, SessionState};
pub(crate) use session::Delivery;

use std::collections::{HashMap, HashSet, VecDeque};
use std::num::NonZeroU16;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use ferry_protocol::mqtt::{
    Connect, DecodeError, Disconnect, Packet, Properties, ProtocolVersion, QoS, ReasonCode,
};
use ferry_protocol::topic::{TopicFilter, TopicName};

use session::Session;

use crate::auth::Auth;
use downstream::Downstream;
use subscriptions::SubscriptionTree;
use timers::{Timer, Timers};

/// How the client ids the broker assigns (to a client that sent none) begin.
pub const ASSIGNED_ID_PREFIX: &str = "ferry-auto-";

/// Identifies a connection for the life of the process; the driver picks them.
pub type ConnId = u64;

/// Limits and switches of the broker core. Every field has a default; see each for its cost.
/// It is also the `[mqtt]` section of the configuration file.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BrokerConfig {
    /// Largest packet accepted from or sent to a client, fixed header included. Default 1 MiB:
    /// a connection buffers at most this much of one packet.
    pub max_packet_size_bytes: u32,
    /// Receive Maximum announced to clients: QoS 2 messages a client may have unreleased,
    /// and the cap on QoS 1/2 messages we send a client before it acknowledges. Default 32.
    pub max_inflight_messages: u16,
    /// Bytes (payload and topic) queued or in flight for one session. Default 8 MiB.
    pub max_queued_bytes_per_session: usize,
    /// Bytes queued or in flight over all sessions. Default 64 MiB.
    pub max_queued_bytes_total: usize,
    /// Subscriptions one session may hold. Default 256.
    pub max_subscriptions_per_session: usize,
    /// Levels a topic name or filter may have. Default 32.
    pub max_topic_levels: usize,
    /// Topic aliases a client may use towards us. Default 32 (a table of 32 names).
    pub max_topic_alias: u16,
    /// Upper bound for session expiry, and the expiry of 3.1.1 persistent sessions.
    /// Default `u32::MAX`: persistent sessions do not expire.
    pub max_session_expiry_secs: u32,
    /// Keep alive the server imposes on MQTT 5 clients that ask for none or for more (the
    /// Server Keep Alive of CONNACK); 0 leaves the client's choice. 3.1.1 has no way to say
    /// it, so 3.1.1 clients keep theirs. Default 60: a dead v5 client is noticed within 90 s.
    pub max_keepalive_secs: u16,
    /// Whether retained messages are kept. Default true.
    pub retain_available: bool,
    /// Seconds between updates of the `$SYS/broker/...` statistics topics; 0 turns them off.
    /// Default 10.
    pub sys_interval_secs: u32,
    /// Topic filters no client may subscribe to: a SUBSCRIBE for one of them (compared as
    /// written) is refused with 0x80 (Unspecified error) for that filter. Default
    /// `["test/nosubscribe"]`, the filter with which MQTT conformance suites (Eclipse Paho's
    /// interoperability tests) check that a broker can refuse a subscription. Per-user rules
    /// belong in the ACL file, which refuses with 0x87 (Not authorized) in MQTT 5.
    pub refused_filters: Vec<String>,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        Self {
            max_packet_size_bytes: 1 << 20,
            max_inflight_messages: 32,
            max_queued_bytes_per_session: 8 << 20,
            max_queued_bytes_total: 64 << 20,
            max_subscriptions_per_session: 256,
            max_topic_levels: 32,
            max_topic_alias: 32,
            max_session_expiry_secs: u32::MAX,
            max_keepalive_secs: 60,
            retain_available: true,
            sys_interval_secs: 10,
            refused_filters: vec!["test/nosubscribe".into()],
        }
    }
}

/// An application message as the broker keeps it, shared by every queue it is in.
#[derive(Debug, Clone)]
pub struct Message {
    pub topic: TopicName,
    pub payload: Bytes,
    pub qos: QoS,
    pub retain: bool,
    /// The properties forwarded to subscribers (no Topic Alias, no Subscription Identifier).
    pub properties: Properties,
    /// When a Message Expiry Interval runs out.
    pub expires_at: Option<Instant>,
    /// The session that published it, for no-local subscriptions.
    pub publisher: Option<Arc<str>>,
    /// Log mode: where it is in the log, once read back from it (a session that moves to
    /// another node is replayed from these, see `resume`).
    pub position: Option<LogPosition>,
}

impl Message {
    pub(crate) fn cost(&self) -> usize {
        self.payload.len() + self.topic.as_str().len()
    }

    fn expired(&self, now: Instant) -> bool {
        self.expires_at.is_some_and(|t| t <= now)
    }
}

/// What the driver tells the broker.
#[derive(Debug)]
pub enum Input {
    /// A connection sent CONNECT (the driver refuses any other first packet). `credit` is how
    /// many packets the driver's writer for it can hold.
    Connect {
        conn: ConnId,
        connect: Box<Connect>,
        credit: usize,
        /// The username was taken from a client certificate the TLS layer verified: no
        /// password check.
        identity_verified: bool,
    },
    /// A packet after CONNECT.
    Packet { conn: ConnId, packet: Packet },
    /// The writer put `packets` more packets on the wire: that much credit comes back.
    Written { conn: ConnId, packets: usize },
    /// The connection is gone without a DISCONNECT from the client (closed, reset, keep alive
    /// timeout, protocol error): the will applies.
    Lost { conn: ConnId },
    /// The connection sent bytes that do not decode: the broker answers with DISCONNECT
    /// (v5, with the error's reason code) and closes; the will applies.
    Malformed { conn: ConnId, error: DecodeError },
    /// The server is going away (SIGTERM): every connection is closed; a v5 client is told
    /// with DISCONNECT 0x9C (Use another server) and a Server Reference, the next of
    /// `references` for each client in turn, or 0x8B (Server shutting down) when there are
    /// none. Wills and session expiry apply, as for a lost connection. The driver sends
    /// these after the acknowledgements still waiting for the log.
    Drain { references: Vec<String> },
    /// The deadline [`Broker::poll_timeout`] gave has come: the broker does what is due at
    /// `now` (keep alive, wills with a delay, session expiry, `$SYS`). Early or extra calls
    /// are harmless: what is not due yet is left as it is.
    Timeout,
    /// A message read back from the log (log mode, see [`Broker::use_log`]): routed to the
    /// matching sessions, and kept if retained. If a connected subscriber has no room, it
    /// and the ones after it are held until room is made ([`Broker::deliveries_held`]).
    Deliver(Arc<Message>),
    /// Log mode: MQTT delivery lags too far behind the log (`true`), or has caught up again
    /// (`false`). While it lags, connections that publish and subscribe to nothing are
    /// paused as they publish ([`Action::PauseReads`]); when it has caught up they resume.
    /// A client that also subscribes is never paused this way (its acknowledgements are what
    /// lets delivery catch up).
    Pace(bool),
    /// Log mode: the append the acknowledgements `acks` waited for
    /// ([`Action::SendWhenAppended`]) failed, so those publishes are not in the log. A v5
    /// client gets each PUBACK or PUBREC with reason 0x80 (Unspecified error) instead; a
    /// 3.1.1 client, which has no way to hear no, is disconnected without them (it publishes
    /// again when it reconnects). A QoS 2 packet id is forgotten either way, so that a resend
    /// is taken as new.
    AppendFailed { acks: Vec<(ConnId, Packet)> },
    /// Log mode in a cluster: the session of `client_id` now lives on another node (a client
    /// with that id connected there). Its connection here, if any, is closed with
    /// DISCONNECT 0x8E (Session taken over, v5), its will applying as when a connection is
    /// taken over here; then the session ends here, without its persistent state and
    /// without a will still waiting for its delay (the client is alive elsewhere).
    TakenElsewhere { client_id: String },
    /// Log mode in a cluster, at start: retained messages the cluster knows of (published
    /// before this node followed the log). Each is kept if the broker has none for its
    /// topic yet (what the log delivered since is newer); none is routed to anyone.
    Retained(Vec<Arc<Message>>),
    /// Log mode in a cluster: the answer to [`Action::FetchSession`] for `conn`: the session
    /// the cluster holds for its client id (its `positions` where the replay starts), none,
    /// or Err if the cluster could not be asked (the client is refused with 0x88, Server
    /// unavailable).
    Fetched {
        conn: ConnId,
        session: Result<Option<SessionState>, ()>,
    },
    /// Log mode in a cluster: the answer to [`Action::Replay`]: the messages of the log from
    /// the session's positions on, in log order per partition (any that its subscriptions
    /// do not match are passed over), and per partition the offset the read stopped before.
    Replayed {
        client_id: Arc<str>,
        messages: Vec<Arc<Message>>,
        until: Vec<LogPosition>,
    },
}

/// Log mode in a cluster ([`Broker::report_sessions`]): a change in where sessions live,
/// for the node to claim client ids across the cluster.
#[derive(Debug, Clone)]
pub enum SessionEvent {
    /// A connection with this client id, one the client chose, was accepted.
    Connected(Arc<str>),
    /// The will the session's connection leaves if the node dies with it, as it would be
    /// published (its expiry as a property, from when it is published), and its delay in
    /// seconds; None: no will any more (the connection has none, or it was published, or a
    /// DISCONNECT dropped it). Only for client ids the client chose.
    Will(Arc<str>, Option<(Arc<Message>, u32)>),
    /// The session with this client id ended here.
    Ended(Arc<str>),
}

/// What the broker asks of the driver.
#[derive(Debug, PartialEq)]
pub enum Action {
    Send(ConnId, Packet),
    /// Log mode only: send once the messages taken by the latest
    /// [`Broker::take_appends`] (and every earlier one) are durable in the log. The
    /// acknowledgements of client publishes (PUBACK, PUBREC) wait this way, all of them, so
    /// that they keep the order of their publishes (MQTT-4.6.0-2) while the driver goes on
    /// delivering and sending everything else.
    SendWhenAppended(ConnId, Packet),
    /// Close the connection after what was sent before.
    Close(ConnId),
    /// Stop reading from this connection until [`Action::ResumeReads`].
    PauseReads(ConnId),
    ResumeReads(ConnId),
    /// Log mode in a cluster: ask the cluster for the session of `client_id`, for a
    /// connection that waits for it; answer with [`Input::Fetched`]. See `resume`.
    FetchSession {
        conn: ConnId,
        client_id: Arc<str>,
    },
    /// Log mode in a cluster: read the log for the session of `client_id` from `from` (per
    /// partition; one not named from its start) to its end; answer with
    /// [`Input::Replayed`].
    Replay {
        client_id: Arc<str>,
        from: Vec<LogPosition>,
        /// The session's topic filters: only what they match need be read back.
        filters: Vec<TopicFilter>,
    },
}

/// A connected client, for an admin API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientInfo {
    pub client_id: String,
    pub username: Option<String>,
    /// 4 for MQTT 3.1.1, 5 for MQTT 5.0.
    pub protocol_level: u8,
    /// Its session outlives the connection.
    pub persistent: bool,
    /// Bytes queued or in flight for it.
    pub queued_bytes: usize,
    /// Its subscriptions.
    pub subscriptions: usize,
}

/// A persistent session, connected or not, and how far behind it is: what the broker holds
/// for it (for an admin API's consumer lag).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionInfo {
    pub client_id: String,
    pub username: Option<String>,
    /// A connection serves it now.
    pub connected: bool,
    pub subscriptions: usize,
    /// Messages waiting to be sent to it.
    pub queued: usize,
    /// Messages sent to it and not yet acknowledged (QoS 1 and 2).
    pub inflight: usize,
    /// Bytes of both.
    pub held_bytes: usize,
    /// While offline: how long it has been; None while connected.
    pub offline_for: Option<Duration>,
    /// Its session expiry interval; None: it never expires.
    pub expiry: Option<Duration>,
}

/// Counters for metrics and `$SYS`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    pub connections: usize,
    pub sessions: usize,
    pub subscriptions: usize,
    pub retained: usize,
    pub received_by_qos: [u64; 3],
    pub sent_by_qos: [u64; 3],
    pub queued_bytes: usize,
    /// QoS 0 messages dropped because the subscriber's queue was full.
    pub dropped_qos0_queue_full: u64,
    /// QoS ≥ 1 messages dropped for offline sessions whose queue was full.
    pub dropped_offline_queue_full: u64,
    pub dropped_expired: u64,
    pub dropped_too_large_for_client: u64,
    /// Publications the ACL did not allow (refused, or for 3.1.1 acknowledged and dropped).
    pub dropped_not_authorized: u64,
    /// Times a publisher was paused because a subscriber's queue was full.
    pub publishers_paused: u64,
    /// Log mode: publishes refused (v5) or whose client was disconnected (3.1.1) because
    /// their append to the log failed ([`Input::AppendFailed`]).
    pub refused_log_failed: u64,
    /// Messages and bytes waiting in the outbox for the cloud (always 0 without an outbox:
    /// in log mode, or without the `edge` feature; so are the two below).
    pub outbox_records: u64,
    pub outbox_bytes: u64,
    /// The highest sequence the outbox gave a record (0: none; it grows by one for every
    /// message accepted for the cloud, across restarts) and its budget, `max_outbox_bytes`.
    pub outbox_last_seq: u64,
    pub outbox_budget_bytes: u64,
    /// Messages for the cloud refused because the outbox was full (`reject_new`).
    pub outbox_rejected: u64,
    /// Records deleted from a full outbox to make room (`drop_oldest`).
    pub outbox_dropped: u64,
}

/// Per-connection state that does not outlive the connection.
#[derive(Debug)]
struct Conn {
    client_id: Arc<str>,
    version: ProtocolVersion,
    credit: usize,
    /// Client's Receive Maximum, capped by ours.
    send_window: u16,
    /// Client's Maximum Packet Size.
    max_packet_bytes: u32,
    /// Topic Alias Maximum the client accepts from us.
    alias_max_out: u16,
    aliases_out: HashMap<TopicName, NonZeroU16>,
    aliases_in: HashMap<u16, TopicName>,
    /// Packets that arrived while this publisher was paused, in order; the first is the held
    /// PUBLISH.
    held: VecDeque<Packet>,
    /// Set when the broker closes the connection: no more input is taken.
    closing: bool,
    /// Set by a DISCONNECT without "with will": the will is not sent.
    will_suppressed: bool,
    /// 1.5 times the keep alive in force (the client's, or the Server Keep Alive we gave a
    /// v5 client); None for a keep alive of 0.
    keepalive_limit: Option<Duration>,
    /// When the broker last got a packet from this client, or resumed reading from it.
    last_seen: Instant,
}

/// The broker core. See the module documentation.
#[derive(Debug)]
pub struct Broker {
    config: BrokerConfig,
    sessions: HashMap<Arc<str>, Session>,
    conns: HashMap<ConnId, Conn>,
    subscriptions: SubscriptionTree,
    retained: HashMap<TopicName, Arc<Message>>,
    /// Round-robin position per shared subscription group.
    share_cursor: HashMap<Arc<str>, usize>,
    queued_bytes: usize,
    next_assigned_id: u64,
    stats: Stats,
    out: Vec<Action>,
    /// Set while held publishes are being retried.
    retrying: bool,
    /// Durable changes since the driver last took them.
    store_ops: Vec<StoreOp>,
    /// When the broker saw its first input, for `$SYS/broker/uptime`.
    started_at: Option<Instant>,
    /// Keep alive, offline sessions and `$SYS`: see [`Broker::poll_timeout`].
    timers: Timers,
    auth: Arc<Auth>,
    /// Where accepted messages go: local subscribers only, the edge's outbox, or the cloud's
    /// log.
    downstream: Downstream,
    /// Deliveries (from the log, or the downlink) waiting for a full subscriber, in order.
    held_deliveries: VecDeque<Arc<Message>>,
    /// Deliveries routed (or dropped as expired) since start; see
    /// [`Broker::deliveries_done`].
    deliveries_done: u64,
    /// Log mode: delivery lags the log ([`Input::Pace`]); the publishers paused for it.
    pacing: bool,
    paced: HashSet<ConnId>,
    /// Set by [`Broker::report_sessions`]: the session events since the driver last took
    /// them.
    session_events: Option<Vec<SessionEvent>>,
    /// Connections whose CONNECT waits for the cluster (see `resume`).
    parked: HashMap<ConnId, resume::Parked>,
    /// Set by [`Broker::fetch_sessions`].
    fetching: bool,
}

impl Broker {
    pub fn new(config: BrokerConfig) -> Self {
        Self {
            config,
            sessions: HashMap::new(),
            conns: HashMap::new(),
            subscriptions: SubscriptionTree::default(),
            retained: HashMap::new(),
            share_cursor: HashMap::new(),
            queued_bytes: 0,
            next_assigned_id: 1,
            stats: Stats::default(),
            out: Vec::new(),
            retrying: false,
            store_ops: Vec::new(),
            started_at: None,
            timers: Timers::default(),
            auth: Arc::new(Auth::open()),
            downstream: Downstream::default(),
            held_deliveries: VecDeque::new(),
            deliveries_done: 0,
            pacing: false,
            paced: HashSet::new(),
            session_events: None,
            parked: HashMap::new(),
            fetching: false,
        }
    }

    /// From now on, records [`SessionEvent`]s for [`Broker::take_session_events`] (a cloud
    /// node in a cluster).
    pub fn report_sessions(&mut self) {
        self.session_events.get_or_insert_with(Vec::new);
    }

    /// From now on, a CONNECT that would resume a session this broker does not have waits
    /// for the cluster's ([`Action::FetchSession`]; a cloud node in a cluster, see
    /// `resume`).
    pub fn fetch_sessions(&mut self) {
        self.fetching = true;
    }

    /// The session events since the last call, in order (none unless
    /// [`Broker::report_sessions`] was called).
    pub fn take_session_events(&mut self) -> Vec<SessionEvent> {
        self.session_events
            .as_mut()
            .map(std::mem::take)
            .unwrap_or_default()
    }

    fn session_event(&mut self, event: SessionEvent) {
        if let Some(events) = &mut self.session_events {
            events.push(event);
        }
    }

    pub fn config(&self) -> &BrokerConfig {
        &self.config
    }

    /// Replaces the password and ACL rules (at start-up, and on SIGHUP). Connected clients
    /// stay connected; their next publications, subscriptions and deliveries follow the new
    /// rules.
    pub fn set_auth(&mut self, auth: Arc<Auth>) {
        self.auth = auth;
    }

    /// Handles one input; the actions it causes are appended to `actions` in order.
    pub fn handle(&mut self, input: Input, now: Instant, actions: &mut Vec<Action>) {
        self.start_clock(now);
        let input = if self.parked.is_empty() {
            input
        } else {
            match self.parked_input(input) {
                None => return actions.append(&mut self.out),
                Some(input) => input,
            }
        };
        match input {
            Input::Connect {
                conn,
                connect,
                credit,
                identity_verified,
            } => self.connect(conn, *connect, credit, identity_verified, now),
            Input::Packet { conn, packet } => {
                if let Some(c) = self.conns.get_mut(&conn) {
                    c.last_seen = now;
                    if c.held.is_empty() {
                        self.packet(conn, packet, now);
                    } else {
                        c.held.push_back(packet);
                    }
                }
            }
            Input::Written { conn, packets } => {
                if let Some(c) = self.conns.get_mut(&conn) {
                    c.credit += packets;
                    let client_id = c.client_id.clone();
                    self.pump(&client_id, now);
                    self.retry_held(now);
                }
            }
            Input::Lost { conn } => self.lost(conn, now),
            Input::Malformed { conn, error } => {
                let mut d = Disconnect::new(error.reason_code());
                d.properties.reason_string = Some(error.to_string());
                self.close_with(conn, d, now);
            }
            Input::Drain { references } => self.drain(&references, now),
            Input::Timeout => self.timeout(now),
            Input::Deliver(msg) => {
                if self.held_deliveries.is_empty() {
                    self.deliver(msg, now);
                } else {
                    self.held_deliveries.push_back(msg);
                }
            }
            Input::Pace(on) => self.pace(on, now),
            Input::AppendFailed { acks } => self.append_failed(acks, now),
            Input::TakenElsewhere { client_id } => self.taken_elsewhere(&client_id, now),
            Input::Retained(messages) => {
                for msg in messages {
                    let known = self.retained.contains_key(&msg.topic);
                    if self.config.retain_available && !known && !msg.payload.is_empty() {
                        self.retain(&msg);
                    }
                }
            }
            Input::Fetched { conn, session } => self.fetched(conn, session, now),
            Input::Replayed {
                client_id,
                messages,
                until,
            } => self.replayed(&client_id, messages, &until, now),
        }
        actions.append(&mut self.out);
    }

    /// When the broker next needs [`Input::Timeout`] if no other input comes: the earliest
    /// keep alive, will delay, session expiry or `$SYS` update; None if nothing is timed
    /// (no connection with a keep alive, no offline session that expires or has a will
    /// pending, `$SYS` off). Call it after every [`Broker::handle`]; a driver that waits
    /// for input or this instant, whichever comes first, needs no periodic tick.
    ///
    /// Never later than what is due, but it may be earlier: a keep alive that traffic has
    /// since renewed is re-armed, not acted on, when its old deadline comes (so that a
    /// packet costs no timer update). O(log n) in the number of timers.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.timers.next()
    }

    /// The first input starts the clock: `$SYS` uptime counts from it, and the first
    /// statistics are due at once.
    pub(super) fn start_clock(&mut self, now: Instant) {
        if self.started_at.is_none() {
            self.started_at = Some(now);
            if self.config.sys_interval_secs > 0 {
                self.timers.set(Timer::Sys, now);
            }
        }
    }

    /// Dispatches a packet after CONNECT.
    pub(super) fn packet(&mut self, conn: ConnId, packet: Packet, now: Instant) {
        let Some(c) = self.conns.get(&conn) else {
            return;
        };
        if c.closing {
            return;
        }
        let client_id = c.client_id.clone();
        match packet {
            Packet::Publish(p) => self.publish(conn, &client_id, p, now),
            Packet::PubAck(r) => self.acked(conn, &client_id, r.packet_id, QoS::AtLeastOnce, now),
            Packet::PubRec(r) => self.pubrec(conn, &client_id, r, now),
            Packet::PubComp(r) => self.acked(conn, &client_id, r.packet_id, QoS::ExactlyOnce, now),
            Packet::PubRel(r) => self.pubrel(conn, &client_id, r),
            Packet::Subscribe(s) => self.subscribe(conn, &client_id, s, now),
            Packet::Unsubscribe(u) => self.unsubscribe(conn, &client_id, u),
            Packet::PingReq => self.send(conn, Packet::PingResp),
            Packet::Disconnect(d) => self.disconnect(conn, &client_id, d, now),
            Packet::Connect(_) => {
                // MQTT-3.1.0-2: a second CONNECT is a protocol error.
                self.protocol_error(conn, ReasonCode::ProtocolError, now);
            }
            Packet::Auth(_) => self.protocol_error(conn, ReasonCode::ProtocolError, now),
            Packet::ConnAck(_) | Packet::SubAck(_) | Packet::UnsubAck(_) | Packet::PingResp => {
                self.protocol_error(conn, ReasonCode::ProtocolError, now)
            }
        }
    }
}

#[cfg(test)]
mod tests;
