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

mod session;
mod subscriptions;

pub(crate) use session::Delivery;

use std::collections::{HashMap, VecDeque};
use std::num::{NonZeroU16, NonZeroU32};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use ferry_protocol::mqtt::SubscriptionOptions;
use ferry_protocol::mqtt::{
    ConnAck, Connect, DecodeError, Disconnect, Packet, PacketId, Properties, ProtocolVersion,
    PubResponse, Publish, QoS, ReasonCode, RetainHandling, SubAck, Subscribe, UnsubAck,
    Unsubscribe,
};
use ferry_protocol::topic::{TopicFilter, TopicName};

use session::{effective_qos, Inflight, OutState, Session};

use crate::auth::{self, Auth};
use crate::uplink::{FullPolicy, UplinkRules};
use subscriptions::{Entry, SubscriptionTree};

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
}

impl Message {
    fn cost(&self) -> usize {
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
    /// Time passed: wills with a delay, session expiry, message expiry.
    Tick,
    /// A message read back from the log (log mode, see [`Broker::use_log`]): routed to the
    /// matching sessions, and kept if retained. If a connected subscriber has no room, it
    /// and the ones after it are held until room is made ([`Broker::deliveries_held`]).
    Deliver(Arc<Message>),
}

/// What the broker asks of the driver.
#[derive(Debug, PartialEq)]
pub enum Action {
    Send(ConnId, Packet),
    /// Close the connection after what was sent before.
    Close(ConnId),
    /// Stop reading from this connection until [`Action::ResumeReads`].
    PauseReads(ConnId),
    ResumeReads(ConnId),
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
    /// Messages and bytes waiting in the outbox for the cloud.
    pub outbox_records: u64,
    pub outbox_bytes: u64,
    /// Messages for the cloud refused because the outbox was full (`reject_new`).
    pub outbox_rejected: u64,
    /// Records deleted from a full outbox to make room (`drop_oldest`).
    pub outbox_dropped: u64,
}

/// A change to durable state, for the storage layer to apply. The broker emits these while it
/// handles a batch of inputs; the driver writes them in one transaction and only then sends
/// the batch's packets, so that no acknowledgement leaves before what it acknowledges is on
/// disk (group commit).
///
/// Persisted: sessions that outlive their connection (expiry > 0) with their subscriptions,
/// their queued and in-flight QoS 1/2 messages and their unreleased incoming QoS 2 ids; and
/// retained messages.
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
    /// A message for the cloud, durable before its PUBACK (see [`crate::uplink`]).
    OutboxPut {
        priority: u8,
        seq: u64,
        msg: Arc<Message>,
    },
    /// The cloud has every record of class `priority` up to `seq`: delete them (the store
    /// reports what it removed, for [`Broker::outbox_applied`]).
    OutboxDelete {
        priority: u8,
        seq: u64,
    },
    /// The outbox is full under `drop_oldest`: delete records, lowest class first and oldest
    /// first within it, until at least `bytes` are freed.
    OutboxDropOldest {
        bytes: u64,
    },
    /// Downlink messages up to `seq` were published on the edge (in this commit).
    DownlinkApplied {
        seq: u64,
    },
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

/// Durable state read back at start-up.
#[derive(Debug, Default)]
pub(crate) struct Snapshot {
    pub(crate) sessions: Vec<StoredSession>,
    pub(crate) retained: Vec<Message>,
    pub(crate) outbox: OutboxTotals,
}

/// What the outbox holds, counted at start-up.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct OutboxTotals {
    pub(crate) records: u64,
    pub(crate) bytes: u64,
    /// The highest sequence number ever given (0: none).
    pub(crate) last_seq: u64,
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
    next_sys_at: Option<Instant>,
    auth: Arc<Auth>,
    /// Log mode: messages accepted from clients, not yet appended.
    log: Option<Vec<Arc<Message>>>,
    /// Log mode: deliveries waiting for a full subscriber, in order.
    held_deliveries: VecDeque<Arc<Message>>,
    /// What goes up to the cloud; empty on the cloud itself.
    uplink: UplinkRules,
    outbox: OutboxTotals,
    /// Bytes `OutboxDropOldest` ops not yet applied were to free (taken off `outbox.bytes`).
    outbox_drop_assumed: u64,
}

/// Why a message could not be routed now.
struct Blocked;

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
            next_sys_at: None,
            auth: Arc::new(Auth::open()),
            log: None,
            held_deliveries: VecDeque::new(),
            uplink: UplinkRules::default(),
            outbox: OutboxTotals::default(),
            outbox_drop_assumed: 0,
        }
    }

    /// What a commit deleted from the outbox: `acked` (the cloud has it) and `dropped`
    /// (`drop_oldest`); neither counts against its budget any more.
    pub(crate) fn outbox_applied(&mut self, acked: OutboxTotals, dropped: OutboxTotals) {
        // The bytes a drop was to free were taken off when it was asked for.
        let assumed = std::mem::take(&mut self.outbox_drop_assumed);
        self.outbox.bytes = (self.outbox.bytes + assumed)
            .saturating_sub(acked.bytes)
            .saturating_sub(dropped.bytes);
        self.outbox.records = self
            .outbox
            .records
            .saturating_sub(acked.records)
            .saturating_sub(dropped.records);
        self.stats.outbox_dropped += dropped.records;
    }

    /// Sets what goes up to the cloud (at start-up).
    pub fn set_uplink(&mut self, rules: UplinkRules) {
        self.uplink = rules;
    }

    /// Log mode (the cloud node): a message a client publishes (or a will) is not routed but
    /// kept for [`Broker::take_appends`]; the driver appends it to the log before it sends the
    /// batch's acknowledgements, and feeds what the log holds back as [`Input::Deliver`].
    /// Every source of messages thus reaches subscribers through the same path.
    pub fn use_log(&mut self) {
        self.log = Some(Vec::new());
    }

    /// Log mode: the messages accepted since the last call, in order. The driver must make
    /// them durable before it sends the packets of the same batch.
    pub fn take_appends(&mut self) -> Vec<Arc<Message>> {
        self.log.as_mut().map(std::mem::take).unwrap_or_default()
    }

    /// Log mode: deliveries held for a subscriber without room. While there are any, the
    /// driver should stop reading the log.
    pub fn deliveries_held(&self) -> usize {
        self.held_deliveries.len()
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

    pub fn stats(&self) -> Stats {
        Stats {
            connections: self.conns.len(),
            sessions: self.sessions.len(),
            subscriptions: self.subscriptions.len(),
            retained: self.retained.len(),
            queued_bytes: self.queued_bytes,
            outbox_records: self.outbox.records,
            outbox_bytes: self.outbox.bytes,
            ..self.stats.clone()
        }
    }

    /// The connected clients, by client id.
    pub fn clients(&self) -> Vec<ClientInfo> {
        let mut out: Vec<ClientInfo> = self
            .conns
            .values()
            .filter(|c| !c.closing)
            .filter_map(|c| {
                let s = self.sessions.get(&c.client_id)?;
                Some(ClientInfo {
                    client_id: c.client_id.to_string(),
                    username: s.username.as_deref().map(str::to_owned),
                    protocol_level: c.version.level(),
                    persistent: s.is_persistent(),
                    queued_bytes: s.held_bytes(),
                    subscriptions: s.subscriptions.len(),
                })
            })
            .collect();
        out.sort_by(|a, b| a.client_id.cmp(&b.client_id));
        out
    }

    /// The durable changes made since the last call, in order. The driver must make them
    /// durable before it sends the packets of the same batch.
    pub(crate) fn take_store_ops(&mut self) -> Vec<StoreOp> {
        std::mem::take(&mut self.store_ops)
    }

    /// Loads durable state at start-up, before any connection. Sessions come back offline:
    /// their expiry counts from `now`, their in-flight messages are resent with DUP when
    /// they reconnect.
    pub(crate) fn restore(&mut self, snapshot: Snapshot, now: Instant) {
        self.outbox = snapshot.outbox;
        for msg in snapshot.retained {
            self.retained.insert(msg.topic.clone(), Arc::new(msg));
        }
        for stored in snapshot.sessions {
            let mut session = Session::new(stored.client_id.clone());
            session.expiry_secs = stored.expiry_secs;
            session.username = stored.username;
            session.disconnected_at = Some(now);
            for (filter, options, id) in stored.subscriptions {
                self.subscriptions.insert(
                    &filter,
                    Entry {
                        client_id: stored.client_id.clone(),
                        shared_group: filter.is_shared().then(|| Arc::from(filter.as_str())),
                        options,
                        id,
                    },
                );
                session
                    .subscriptions
                    .insert(filter.as_str().to_owned(), (filter, options, id));
            }
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
            self.sessions.insert(stored.client_id, session);
        }
    }

    fn persist_session(&mut self, client_id: &Arc<str>) {
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

    /// Handles one input; the actions it causes are appended to `actions` in order.
    pub fn handle(&mut self, input: Input, now: Instant, actions: &mut Vec<Action>) {
        self.started_at.get_or_insert(now);
        match input {
            Input::Connect {
                conn,
                connect,
                credit,
                identity_verified,
            } => self.connect(conn, *connect, credit, identity_verified, now),
            Input::Packet { conn, packet } => match self.conns.get_mut(&conn) {
                None => {}
                Some(c) if !c.held.is_empty() => c.held.push_back(packet),
                Some(_) => self.packet(conn, packet, now),
            },
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
            Input::Tick => self.tick(now),
            Input::Deliver(msg) => {
                if self.held_deliveries.is_empty() {
                    self.deliver(msg, now);
                } else {
                    self.held_deliveries.push_back(msg);
                }
            }
        }
        actions.append(&mut self.out);
    }

    // ---- connection lifecycle -------------------------------------------------------------

    fn connect(
        &mut self,
        conn: ConnId,
        connect: Connect,
        credit: usize,
        identity_verified: bool,
        now: Instant,
    ) {
        let v5 = connect.protocol == ProtocolVersion::V5;
        let refuse = |this: &mut Self, code: ReasonCode| {
            this.out.push(Action::Send(
                conn,
                Packet::ConnAck(ConnAck::new(code, false)),
            ));
            this.out.push(Action::Close(conn));
        };
        if connect.properties.authentication_method.is_some() {
            // Enhanced authentication is not supported (MQTT-4.12.0-1 allows refusing it).
            return refuse(self, ReasonCode::BadAuthenticationMethod);
        }
        let username = connect.username.as_deref();
        if !identity_verified {
            if let Err(code) = self
                .auth
                .authenticate(username, connect.password.as_deref())
            {
                return refuse(self, code);
            }
        }
        let mut assigned = None;
        let client_id: Arc<str> = if connect.client_id.is_empty() {
            if !v5 && !connect.clean_start {
                // MQTT-3.1.3-8: a 3.1.1 client without an id must ask for a clean session.
                return refuse(self, ReasonCode::ClientIdentifierNotValid);
            }
            let id = format!("ferry-auto-{}", self.next_assigned_id);
            self.next_assigned_id += 1;
            if v5 {
                assigned = Some(id.clone());
            }
            id.into()
        } else {
            connect.client_id.as_str().into()
        };

        if let Some(will) = &connect.will {
            let allowed = self.auth.allows(
                username,
                &client_id,
                auth::Action::Publish,
                will.topic.as_str(),
            );
            if !allowed {
                return refuse(self, ReasonCode::NotAuthorized);
            }
        }

        // Session takeover (MQTT-3.1.4-3): the older connection is closed.
        if let Some(old_conn) = self.sessions.get(&client_id).and_then(|s| s.conn) {
            if let Some(old) = self.conns.get(&old_conn) {
                if old.version == ProtocolVersion::V5 {
                    self.out.push(Action::Send(
                        old_conn,
                        Packet::Disconnect(Disconnect::new(ReasonCode::SessionTakenOver)),
                    ));
                }
            }
            self.out.push(Action::Close(old_conn));
            self.lost(old_conn, now);
        }

        let expiry_secs = if v5 {
            connect.properties.session_expiry_interval_secs.unwrap_or(0)
        } else if connect.clean_start {
            0
        } else {
            u32::MAX
        }
        .min(self.config.max_session_expiry_secs);

        // A session whose expiry ran out since the last tick is gone, not resumed.
        self.tick_session(&client_id, now);
        if connect.clean_start {
            self.end_session(&client_id, now);
        }
        let session_present = self.sessions.contains_key(&client_id);
        let session = self
            .sessions
            .entry(client_id.clone())
            .or_insert_with(|| Session::new(client_id.clone()));
        session.conn = Some(conn);
        session.username = connect.username.as_deref().map(Arc::from);
        session.expiry_secs = expiry_secs;
        session.disconnected_at = None;
        // A pending will of an earlier connection is not sent once the session resumes.
        session.will_due = None;
        session.will = connect.will;
        for inflight in &mut session.inflight {
            inflight.sent = false;
        }
        self.persist_session(&client_id);

        let client_window = connect
            .properties
            .receive_maximum
            .map_or(u16::MAX, NonZeroU16::get);
        self.conns.insert(
            conn,
            Conn {
                client_id: client_id.clone(),
                version: connect.protocol,
                credit,
                send_window: client_window.min(self.config.max_inflight_messages).max(1),
                max_packet_bytes: connect
                    .properties
                    .maximum_packet_size
                    .map_or(u32::MAX, NonZeroU32::get),
                alias_max_out: connect.properties.topic_alias_maximum.unwrap_or(0),
                aliases_out: HashMap::new(),
                aliases_in: HashMap::new(),
                held: VecDeque::new(),
                closing: false,
                will_suppressed: false,
            },
        );

        let mut ack = ConnAck::new(ReasonCode::Success, session_present);
        if v5 {
            let p = &mut ack.properties;
            p.receive_maximum = NonZeroU16::new(self.config.max_inflight_messages);
            p.maximum_packet_size = NonZeroU32::new(self.config.max_packet_size_bytes);
            p.topic_alias_maximum = Some(self.config.max_topic_alias);
            p.assigned_client_identifier = assigned;
            if !self.config.retain_available {
                p.retain_available = Some(false);
            }
            if connect
                .properties
                .session_expiry_interval_secs
                .is_some_and(|s| s != expiry_secs)
            {
                p.session_expiry_interval_secs = Some(expiry_secs);
            }
            let max_ka = self.config.max_keepalive_secs;
            if max_ka > 0 && (connect.keep_alive_secs == 0 || connect.keep_alive_secs > max_ka) {
                p.server_keep_alive_secs = Some(max_ka);
            }
        }
        self.out.push(Action::Send(conn, Packet::ConnAck(ack)));
        if let Some(c) = self.conns.get_mut(&conn) {
            c.credit = c.credit.saturating_sub(1);
        }
        self.pump(&client_id, now);
    }

    /// The connection ended without DISCONNECT, or after one: detach it from its session,
    /// start the will and the session expiry.
    fn lost(&mut self, conn: ConnId, now: Instant) {
        let Some(c) = self.conns.remove(&conn) else {
            return;
        };
        // Held messages of a paused publisher were never acknowledged: the client resends.
        let Some(session) = self.sessions.get_mut(&c.client_id) else {
            return;
        };
        if session.conn != Some(conn) {
            return;
        }
        session.conn = None;
        session.disconnected_at = Some(now);
        if c.will_suppressed {
            session.will = None;
        }
        if let Some(will) = &session.will {
            let delay = will.properties.will_delay_interval_secs.unwrap_or(0);
            let delay = delay.min(session.expiry_secs);
            session.will_due = Some(now + Duration::from_secs(delay.into()));
        }
        let client_id = c.client_id.clone();
        self.tick_session(&client_id, now);
        self.retry_held(now);
    }

    /// Sends due wills and ends expired sessions.
    fn tick(&mut self, now: Instant) {
        let started = *self.started_at.get_or_insert(now);
        let interval = self.config.sys_interval_secs;
        if interval > 0 && self.next_sys_at.is_none_or(|at| now >= at) {
            self.next_sys_at = Some(now + Duration::from_secs(interval.into()));
            self.publish_sys(now, now.duration_since(started));
        }
        let ids: Vec<Arc<str>> = self
            .sessions
            .values()
            .filter(|s| s.conn.is_none())
            .map(|s| s.client_id.clone())
            .collect();
        for id in ids {
            self.tick_session(&id, now);
        }
    }

    /// Publishes the statistics as retained QoS 0 messages under `$SYS/broker/` (the names
    /// Mosquitto uses where it has one). They are not written to disk.
    fn publish_sys(&mut self, now: Instant, uptime: Duration) {
        let s = self.stats();
        let dropped = s.dropped_qos0_queue_full
            + s.dropped_offline_queue_full
            + s.dropped_expired
            + s.dropped_too_large_for_client;
        let values: [(&str, String); 14] = [
            (
                "version",
                format!("ferry-edge {}", env!("CARGO_PKG_VERSION")),
            ),
            ("uptime", format!("{} seconds", uptime.as_secs())),
            ("clients/connected", s.connections.to_string()),
            ("clients/total", s.sessions.to_string()),
            ("subscriptions/count", s.subscriptions.to_string()),
            ("retained messages/count", s.retained.to_string()),
            (
                "messages/received",
                s.received_by_qos.iter().sum::<u64>().to_string(),
            ),
            (
                "messages/sent",
                s.sent_by_qos.iter().sum::<u64>().to_string(),
            ),
            ("store/messages/bytes", s.queued_bytes.to_string()),
            ("messages/dropped", dropped.to_string()),
            (
                "messages/dropped/qos0_queue_full",
                s.dropped_qos0_queue_full.to_string(),
            ),
            (
                "messages/dropped/offline_queue_full",
                s.dropped_offline_queue_full.to_string(),
            ),
            ("messages/dropped/expired", s.dropped_expired.to_string()),
            ("publishers/paused", s.publishers_paused.to_string()),
        ];
        for (name, value) in values {
            let Ok(topic) = TopicName::new(format!("$SYS/broker/{name}")) else {
                continue;
            };
            let msg = Arc::new(Message {
                topic,
                payload: Bytes::from(value),
                qos: QoS::AtMostOnce,
                retain: true,
                properties: Properties::default(),
                expires_at: None,
                publisher: None,
            });
            self.retained.insert(msg.topic.clone(), msg.clone());
            let _ = self.route(msg, now, true);
        }
    }

    fn tick_session(&mut self, client_id: &Arc<str>, now: Instant) {
        let Some(session) = self.sessions.get_mut(client_id) else {
            return;
        };
        if session.will_due.is_some_and(|due| due <= now) {
            session.will_due = None;
            if let Some(will) = session.will.take() {
                self.publish_will(client_id.clone(), will, now);
            }
        }
        let Some(session) = self.sessions.get(client_id) else {
            return;
        };
        let expired = session.conn.is_none()
            && session.expiry_secs != u32::MAX
            && session
                .disconnected_at
                .is_some_and(|at| now >= at + Duration::from_secs(session.expiry_secs.into()));
        if expired {
            // A will still pending goes out when its session ends (MQTT-3.1.3-9).
            if let Some(will) = self.sessions.get_mut(client_id).and_then(|s| s.will.take()) {
                if self
                    .sessions
                    .get(client_id)
                    .is_some_and(|s| s.will_due.is_some())
                {
                    self.publish_will(client_id.clone(), will, now);
                }
            }
            self.end_session(client_id, now);
        }
    }

    fn publish_will(
        &mut self,
        client_id: Arc<str>,
        will: ferry_protocol::mqtt::Will,
        now: Instant,
    ) {
        let msg = Message {
            expires_at: will
                .properties
                .message_expiry_interval_secs
                .map(|s| now + Duration::from_secs(s.into())),
            properties: forwarded_properties(&will.properties),
            topic: will.topic,
            payload: will.payload,
            qos: will.qos,
            retain: will.retain,
            publisher: Some(client_id),
        };
        let msg = Arc::new(msg);
        if let Some(appends) = &mut self.log {
            appends.push(msg);
            return;
        }
        if msg.retain {
            self.retain(&msg);
        }
        // A will has no publisher left to pause; what does not fit is dropped and counted.
        let _ = self.route(msg, now, true);
    }

    /// Removes a session and everything it holds.
    fn end_session(&mut self, client_id: &Arc<str>, _now: Instant) {
        let Some(session) = self.sessions.remove(client_id) else {
            return;
        };
        for (filter, _, _) in session.subscriptions.values() {
            self.subscriptions.remove(filter, client_id);
        }
        self.queued_bytes -= session.held_bytes();
        if session.is_persistent() {
            self.store_ops.push(StoreOp::SessionDelete {
                client_id: client_id.clone(),
            });
        }
    }

    // ---- packets --------------------------------------------------------------------------

    fn packet(&mut self, conn: ConnId, packet: Packet, now: Instant) {
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
            Packet::PubRec(r) => {
                let Some(session) = self.sessions.get_mut(&client_id) else {
                    return;
                };
                let known = session
                    .inflight_position(r.packet_id)
                    .map(|i| &mut session.inflight[i])
                    .filter(|i| i.delivery.qos == QoS::ExactlyOnce);
                match known {
                    Some(i) if r.reason.is_error() => {
                        // The receiver refused it: the exchange ends here.
                        let _ = i;
                        self.acked(conn, &client_id, r.packet_id, QoS::ExactlyOnce, now);
                    }
                    Some(i) => {
                        i.state = OutState::Released;
                        let delivery = i.delivery.clone();
                        if session.is_persistent() {
                            self.store_ops.push(StoreOp::QueuePut {
                                client_id: client_id.clone(),
                                delivery,
                                state: QueueState::Released(r.packet_id),
                            });
                        }
                        self.send(conn, Packet::PubRel(PubResponse::new(r.packet_id)));
                    }
                    None => {
                        let mut rel = PubResponse::new(r.packet_id);
                        rel.reason = ReasonCode::PacketIdentifierNotFound;
                        self.send(conn, Packet::PubRel(rel));
                    }
                }
            }
            Packet::PubComp(r) => self.acked(conn, &client_id, r.packet_id, QoS::ExactlyOnce, now),
            Packet::PubRel(r) => {
                let session = self.sessions.get_mut(&client_id);
                let persistent = session.as_ref().is_some_and(|s| s.is_persistent());
                let known = session.is_some_and(|s| s.awaiting_pubrel.remove(&r.packet_id));
                if known && persistent {
                    self.store_ops.push(StoreOp::Qos2Delete {
                        client_id: client_id.clone(),
                        packet_id: r.packet_id,
                    });
                }
                let mut comp = PubResponse::new(r.packet_id);
                if !known {
                    comp.reason = ReasonCode::PacketIdentifierNotFound;
                }
                self.send(conn, Packet::PubComp(comp));
            }
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

    /// Sends DISCONNECT with `code` (v5) and closes; the will applies.
    fn protocol_error(&mut self, conn: ConnId, code: ReasonCode, now: Instant) {
        self.close_with(conn, Disconnect::new(code), now);
    }

    fn close_with(&mut self, conn: ConnId, disconnect: Disconnect, now: Instant) {
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        c.closing = true;
        c.held.clear();
        if c.version == ProtocolVersion::V5 {
            self.out
                .push(Action::Send(conn, Packet::Disconnect(disconnect)));
        }
        self.out.push(Action::Close(conn));
        self.lost(conn, now);
    }

    fn disconnect(&mut self, conn: ConnId, client_id: &Arc<str>, d: Disconnect, now: Instant) {
        let Some(session) = self.sessions.get_mut(client_id) else {
            return;
        };
        if let Some(expiry) = d.properties.session_expiry_interval_secs {
            if session.expiry_secs == 0 && expiry != 0 {
                // MQTT-3.14.2-2: cannot turn a session that ends into one that persists.
                return self.protocol_error(conn, ReasonCode::ProtocolError, now);
            }
            session.expiry_secs = expiry.min(self.config.max_session_expiry_secs);
            self.persist_session(client_id);
        }
        if let Some(c) = self.conns.get_mut(&conn) {
            c.closing = true;
            c.will_suppressed = d.reason != ReasonCode::DisconnectWithWillMessage;
        }
        self.out.push(Action::Close(conn));
        self.lost(conn, now);
    }

    fn publish(&mut self, conn: ConnId, client_id: &Arc<str>, mut p: Publish, now: Instant) {
        let v5 = self
            .conns
            .get(&conn)
            .is_some_and(|c| c.version == ProtocolVersion::V5);
        // Topic aliases from the client (MQTT 5.0 §3.3.2.3.4).
        if let Some(alias) = p.properties.topic_alias.take() {
            if alias.get() > self.config.max_topic_alias {
                return self.protocol_error(conn, ReasonCode::TopicAliasInvalid, now);
            }
            let Some(c) = self.conns.get_mut(&conn) else {
                return;
            };
            if p.topic.is_empty() {
                match c.aliases_in.get(&alias.get()) {
                    Some(topic) => p.topic = topic.clone(),
                    None => return self.protocol_error(conn, ReasonCode::ProtocolError, now),
                }
            } else {
                c.aliases_in.insert(alias.get(), p.topic.clone());
            }
        }
        if !p.properties.subscription_identifiers.is_empty() {
            // MQTT-3.3.4-6: a client must not send Subscription Identifiers.
            return self.protocol_error(conn, ReasonCode::ProtocolError, now);
        }
        if p.topic.as_str().split('/').count() > self.config.max_topic_levels {
            return self.refuse_publish(conn, &p, ReasonCode::TopicNameInvalid, now);
        }
        if p.retain && !self.config.retain_available {
            return self.protocol_error(conn, ReasonCode::RetainNotSupported, now);
        }
        if p.topic.as_str().starts_with("$SYS") {
            // `$SYS` belongs to the broker (other `$` topics, such as the cloud's `$edge/`
            // downlink, are for applications that know them).
            return self.refuse_publish(conn, &p, ReasonCode::TopicNameInvalid, now);
        }
        let username = self
            .sessions
            .get(client_id)
            .and_then(|s| s.username.clone());
        let allowed = self.auth.allows(
            username.as_deref(),
            client_id,
            auth::Action::Publish,
            p.topic.as_str(),
        );
        if !allowed {
            // v5 says why; 3.1.1 cannot, so there the message is acknowledged and dropped
            // (as Mosquitto does). Counted either way.
            self.stats.dropped_not_authorized += 1;
            let reason = if v5 {
                ReasonCode::NotAuthorized
            } else {
                ReasonCode::Success
            };
            return self.acknowledge(conn, &p, reason);
        }
        if p.qos == QoS::ExactlyOnce {
            let id = p.packet_id.expect("the decoder guarantees an id on QoS 2");
            let session = self
                .sessions
                .get_mut(client_id)
                .expect("a connection has a session");
            if session.awaiting_pubrel.contains(&id) {
                // A resend of a message already taken: acknowledge again, do not route again.
                return self.send(conn, Packet::PubRec(PubResponse::new(id)));
            }
            if session.awaiting_pubrel.len() >= usize::from(self.config.max_inflight_messages) {
                return self.protocol_error(conn, ReasonCode::ReceiveMaximumExceeded, now);
            }
        }

        let msg = Arc::new(Message {
            expires_at: p
                .properties
                .message_expiry_interval_secs
                .map(|s| now + Duration::from_secs(s.into())),
            properties: forwarded_properties(&p.properties),
            topic: p.topic.clone(),
            payload: p.payload.clone(),
            qos: p.qos,
            retain: p.retain,
            publisher: Some(client_id.clone()),
        });
        // For the cloud: refused now if the outbox is full; put in it (in this batch's
        // commit, before the PUBACK) once routing took it.
        let uplink = self.uplink.route(&msg.topic, msg.qos);
        let cost = outbox_cost(&msg);
        let max = self.uplink.max_outbox_bytes;
        let full = match self.uplink.full_policy {
            FullPolicy::RejectNew => self.outbox.bytes + cost > max,
            FullPolicy::DropOldest => cost > max,
        };
        if uplink.is_some() && full {
            self.stats.outbox_rejected += 1;
            if v5 {
                return self.acknowledge(conn, &p, ReasonCode::QuotaExceeded);
            }
            return self.protocol_error(conn, ReasonCode::QuotaExceeded, now);
        }
        if let Some(appends) = &mut self.log {
            // Routed when it comes back from the log; acknowledged once the driver appended it.
            appends.push(msg);
            self.stats.received_by_qos[p.qos as usize] += 1;
            self.await_pubrel(client_id, &p);
            return self.acknowledge(conn, &p, ReasonCode::Success);
        }
        let matched = match self.route(msg.clone(), now, p.qos == QoS::AtMostOnce) {
            Ok(matched) => matched,
            Err(Blocked) => {
                // Hold the message and stop reading from this publisher until the
                // subscriber that is full drains.
                self.stats.publishers_paused += 1;
                if let Some(c) = self.conns.get_mut(&conn) {
                    c.held.push_front(Packet::Publish(p));
                }
                self.out.push(Action::PauseReads(conn));
                return;
            }
        };
        self.stats.received_by_qos[p.qos as usize] += 1;
        let goes_up = uplink.is_some();
        if let Some((priority, cloud_topic)) = uplink {
            let over = (self.outbox.bytes + cost).saturating_sub(max);
            if over > 0 {
                // drop_oldest (reject_new refused it above): room first, in the same commit.
                self.store_ops
                    .push(StoreOp::OutboxDropOldest { bytes: over });
                self.outbox.bytes -= over;
                self.outbox_drop_assumed += over;
            }
            self.outbox.last_seq += 1;
            self.outbox.records += 1;
            self.outbox.bytes += cost;
            let msg = match cloud_topic {
                Some(topic) => Arc::new(Message {
                    topic,
                    ..(*msg).clone()
                }),
                None => msg.clone(),
            };
            self.store_ops.push(StoreOp::OutboxPut {
                priority,
                seq: self.outbox.last_seq,
                msg,
            });
        }
        if p.retain {
            self.retain(&msg);
        }
        // A message that goes up to the cloud has a destination even with no local subscriber.
        let reason = if matched == 0 && !goes_up && v5_reason_ok(self.conns.get(&conn)) {
            ReasonCode::NoMatchingSubscribers
        } else {
            ReasonCode::Success
        };
        self.await_pubrel(client_id, &p);
        self.acknowledge(conn, &p, reason);
    }

    /// A QoS 2 message was taken: its id waits for PUBREL (durably, for a persistent session).
    fn await_pubrel(&mut self, client_id: &Arc<str>, p: &Publish) {
        if let (QoS::ExactlyOnce, Some(id), Some(s)) =
            (p.qos, p.packet_id, self.sessions.get_mut(client_id))
        {
            s.awaiting_pubrel.insert(id);
            if s.is_persistent() {
                self.store_ops.push(StoreOp::Qos2Put {
                    client_id: client_id.clone(),
                    packet_id: id,
                });
            }
        }
    }

    /// Log mode: routes a message read back from the log; holds it (and what follows) if a
    /// connected subscriber has no room.
    fn deliver(&mut self, msg: Arc<Message>, now: Instant) {
        if msg.expired(now) {
            return;
        }
        match self.route(msg.clone(), now, false) {
            Ok(_) => {
                if msg.retain {
                    self.retain(&msg);
                }
            }
            Err(Blocked) => self.held_deliveries.push_back(msg),
        }
    }

    /// Answers a QoS 1 PUBLISH with PUBACK and a QoS 2 one with PUBREC, carrying `reason`
    /// (v5 only; 3.1.1 has no reason code on these). Nothing for QoS 0.
    fn acknowledge(&mut self, conn: ConnId, p: &Publish, reason: ReasonCode) {
        let Some(id) = p.packet_id else {
            return;
        };
        let mut response = PubResponse::new(id);
        response.reason = reason;
        let packet = match p.qos {
            QoS::AtMostOnce => return,
            QoS::AtLeastOnce => Packet::PubAck(response),
            QoS::ExactlyOnce => Packet::PubRec(response),
        };
        self.send(conn, packet);
    }

    /// Refuses a PUBLISH the spec lets us refuse: v5 QoS 1/2 get a reason code; otherwise
    /// (3.1.1, or QoS 0) the connection is closed, since 3.1.1 has no way to say no.
    fn refuse_publish(&mut self, conn: ConnId, p: &Publish, code: ReasonCode, now: Instant) {
        let v5 = self
            .conns
            .get(&conn)
            .is_some_and(|c| c.version == ProtocolVersion::V5);
        if v5 && p.qos != QoS::AtMostOnce {
            self.acknowledge(conn, p, code);
        } else {
            self.protocol_error(conn, code, now);
        }
    }

    fn retain(&mut self, msg: &Arc<Message>) {
        if msg.payload.is_empty() {
            if self.retained.remove(&msg.topic).is_some() {
                self.store_ops.push(StoreOp::RetainedDelete {
                    topic: msg.topic.clone(),
                });
            }
        } else {
            self.retained.insert(msg.topic.clone(), msg.clone());
            self.store_ops
                .push(StoreOp::RetainedPut { msg: msg.clone() });
        }
    }

    /// Puts `msg` in the queue of every matching session. Fails without queueing anything if a
    /// connected subscriber has no room for a QoS ≥ 1 message and `lossy` is false.
    /// Returns how many sessions it was queued for.
    fn route(&mut self, msg: Arc<Message>, now: Instant, lossy: bool) -> Result<usize, Blocked> {
        // One delivery per session: the highest QoS and all identifiers of its matching
        // subscriptions (MQTT 5.0 §3.3.4); one member per shared group.
        let mut targets: HashMap<Arc<str>, Delivery> = HashMap::new();
        let mut groups: HashMap<Arc<str>, Vec<Entry>> = HashMap::new();
        self.subscriptions.for_each_match(msg.topic.as_str(), |e| {
            if let Some(group) = &e.shared_group {
                groups.entry(group.clone()).or_default().push(e.clone());
                return;
            }
            if e.options.no_local && msg.publisher.as_ref() == Some(&e.client_id) {
                return;
            }
            add_target(&mut targets, &msg, e);
        });
        for (group, mut members) in groups {
            members.sort_by(|a, b| a.client_id.cmp(&b.client_id));
            let cursor = self.share_cursor.entry(group).or_insert(0);
            let online: Vec<&Entry> = members
                .iter()
                .filter(|e| {
                    self.sessions
                        .get(&e.client_id)
                        .is_some_and(|s| s.conn.is_some())
                })
                .collect();
            let pool: Vec<&Entry> = if online.is_empty() {
                members.iter().collect()
            } else {
                online
            };
            let chosen = pool[*cursor % pool.len()];
            *cursor = cursor.wrapping_add(1);
            add_target(&mut targets, &msg, chosen);
        }

        let cost = msg.cost();
        if !lossy && msg.qos != QoS::AtMostOnce {
            let over_total =
                self.queued_bytes + cost * targets.len() > self.config.max_queued_bytes_total;
            for (client_id, d) in &targets {
                let Some(session) = self.sessions.get(client_id) else {
                    continue;
                };
                let full = over_total
                    || session.held_bytes() + cost > self.config.max_queued_bytes_per_session;
                if session.conn.is_some() && d.qos != QoS::AtMostOnce && full {
                    return Err(Blocked);
                }
            }
        }

        let matched = targets.len();
        let mut ids: Vec<Arc<str>> = Vec::with_capacity(targets.len());
        for (client_id, d) in targets {
            let Some(session) = self.sessions.get_mut(&client_id) else {
                continue;
            };
            if session.conn.is_none() && d.qos == QoS::AtMostOnce {
                // QoS 0 is not queued for an offline session.
                continue;
            }
            if !self.auth.allows_everything()
                && !self.auth.allows(
                    session.username.as_deref(),
                    &client_id,
                    auth::Action::Receive,
                    d.msg.topic.as_str(),
                )
            {
                continue;
            }
            let full = session.held_bytes() + cost > self.config.max_queued_bytes_per_session
                || self.queued_bytes + cost > self.config.max_queued_bytes_total;
            if full {
                if d.qos == QoS::AtMostOnce {
                    self.stats.dropped_qos0_queue_full += 1;
                } else {
                    self.stats.dropped_offline_queue_full += 1;
                }
                continue;
            }
            self.queued_bytes += cost;
            enqueue(session, d, &mut self.store_ops);
            ids.push(client_id);
        }
        for id in ids {
            self.pump(&id, now);
        }
        Ok(matched)
    }

    fn subscribe(&mut self, conn: ConnId, client_id: &Arc<str>, s: Subscribe, now: Instant) {
        let id = s.properties.subscription_identifiers.first().copied();
        let mut reasons = Vec::with_capacity(s.subscriptions.len());
        let mut retained_out: Vec<Delivery> = Vec::new();
        for sub in s.subscriptions {
            let session = self
                .sessions
                .get_mut(client_id)
                .expect("a connection has a session");
            let key = sub.filter.as_str().to_owned();
            if sub.filter.filter().split('/').count() > self.config.max_topic_levels {
                reasons.push(ReasonCode::TopicFilterInvalid);
                continue;
            }
            if self.config.refused_filters.contains(&key) {
                reasons.push(ReasonCode::UnspecifiedError);
                continue;
            }
            let allowed = self.auth.allows(
                session.username.as_deref(),
                client_id,
                auth::Action::Subscribe,
                sub.filter.filter(),
            );
            if !allowed {
                reasons.push(ReasonCode::NotAuthorized);
                continue;
            }
            let exists = session.subscriptions.contains_key(&key);
            if !exists && session.subscriptions.len() >= self.config.max_subscriptions_per_session {
                reasons.push(ReasonCode::QuotaExceeded);
                continue;
            }
            session
                .subscriptions
                .insert(key.clone(), (sub.filter.clone(), sub.options, id));
            self.subscriptions.insert(
                &sub.filter,
                Entry {
                    client_id: client_id.clone(),
                    shared_group: sub.filter.is_shared().then(|| Arc::from(key.as_str())),
                    options: sub.options,
                    id,
                },
            );
            reasons.push(match sub.options.qos {
                QoS::AtMostOnce => ReasonCode::Success,
                QoS::AtLeastOnce => ReasonCode::GrantedQoS1,
                QoS::ExactlyOnce => ReasonCode::GrantedQoS2,
            });
            // Retained messages for the new subscription (MQTT 5.0 §3.3.1.3); none for shared
            // subscriptions (MQTT-3.8.4-?: "retained messages are not sent to shared subs").
            let send_retained = !sub.filter.is_shared()
                && match sub.options.retain_handling {
                    RetainHandling::SendAtSubscribe => true,
                    RetainHandling::SendAtSubscribeIfNew => !exists,
                    RetainHandling::DoNotSend => false,
                };
            if send_retained {
                for msg in self.retained.values() {
                    if sub.filter.matches(&msg.topic) && !msg.expired(now) {
                        retained_out.push(Delivery {
                            msg: msg.clone(),
                            qos: effective_qos(msg.qos, sub.options.qos),
                            retain: true,
                            subscription_ids: id.into_iter().collect(),
                            seq: 0,
                        });
                    }
                }
            }
        }
        self.send(
            conn,
            Packet::SubAck(SubAck {
                packet_id: s.packet_id,
                properties: Properties::default(),
                reasons,
            }),
        );
        self.persist_session(client_id);
        if let Some(session) = self.sessions.get_mut(client_id) {
            for d in retained_out {
                self.queued_bytes += d.cost();
                enqueue(session, d, &mut self.store_ops);
            }
        }
        self.pump(client_id, now);
    }

    fn unsubscribe(&mut self, conn: ConnId, client_id: &Arc<str>, u: Unsubscribe) {
        let session = self
            .sessions
            .get_mut(client_id)
            .expect("a connection has a session");
        let reasons = u
            .filters
            .iter()
            .map(|f| {
                if session.subscriptions.remove(f.as_str()).is_some() {
                    self.subscriptions.remove(f, client_id);
                    ReasonCode::Success
                } else {
                    ReasonCode::NoSubscriptionExisted
                }
            })
            .collect();
        self.persist_session(client_id);
        self.send(
            conn,
            Packet::UnsubAck(UnsubAck {
                packet_id: u.packet_id,
                properties: Properties::default(),
                reasons,
            }),
        );
    }

    /// A PUBACK (QoS 1) or PUBCOMP (QoS 2) ends an outgoing exchange.
    fn acked(&mut self, conn: ConnId, client_id: &Arc<str>, id: PacketId, qos: QoS, now: Instant) {
        let Some(session) = self.sessions.get_mut(client_id) else {
            return;
        };
        let Some(pos) = session.inflight_position(id) else {
            // Unknown id: nothing to do (MQTT allows a late or duplicate ack).
            return;
        };
        if session.inflight[pos].delivery.qos != qos {
            return self.protocol_error(conn, ReasonCode::ProtocolError, now);
        }
        if let Some(done) = session.inflight.remove(pos) {
            self.queued_bytes -= done.delivery.cost();
            if session.is_persistent() {
                self.store_ops.push(StoreOp::QueueDelete {
                    client_id: client_id.clone(),
                    seq: done.delivery.seq,
                });
            }
        }
        self.pump(client_id, now);
        self.retry_held(now);
    }

    // ---- delivery -------------------------------------------------------------------------

    /// Sends what the session's connection can take now: unsent in-flight messages first
    /// (after a reconnect), then the queue, within the send credit and the client's window.
    fn pump(&mut self, client_id: &Arc<str>, now: Instant) {
        let Some(session) = self.sessions.get_mut(client_id) else {
            return;
        };
        let Some(conn_id) = session.conn else {
            return;
        };
        let Some(conn) = self.conns.get_mut(&conn_id) else {
            return;
        };
        if conn.closing {
            return;
        }
        // Resend after reconnect, in the original order (MQTT-4.4.0-1).
        for inflight in session.inflight.iter_mut().filter(|i| !i.sent) {
            if conn.credit == 0 {
                return;
            }
            let packet = match inflight.state {
                OutState::Published => {
                    let mut p = to_publish(&inflight.delivery, Some(inflight.packet_id), now, conn);
                    p.dup = true;
                    Packet::Publish(p)
                }
                OutState::Released => Packet::PubRel(PubResponse::new(inflight.packet_id)),
            };
            inflight.sent = true;
            conn.credit -= 1;
            self.out.push(Action::Send(conn_id, packet));
        }
        while conn.credit > 0 {
            let Some(front) = session.queue.front() else {
                break;
            };
            if front.qos != QoS::AtMostOnce
                && session.inflight.len() >= usize::from(conn.send_window)
            {
                break;
            }
            let d = session.pop().expect("front exists");
            let stored = session.is_persistent() && d.qos != QoS::AtMostOnce;
            if d.msg.expired(now) {
                self.queued_bytes -= d.cost();
                self.stats.dropped_expired += 1;
                if stored {
                    self.store_ops.push(StoreOp::QueueDelete {
                        client_id: client_id.clone(),
                        seq: d.seq,
                    });
                }
                continue;
            }
            let packet_id = (d.qos != QoS::AtMostOnce).then(|| session.next_packet_id());
            let publish = to_publish(&d, packet_id, now, conn);
            let packet = Packet::Publish(publish);
            let too_large = packet
                .encoded_len(conn.version)
                .map_or(true, |len| len > conn.max_packet_bytes as usize);
            if too_large {
                // MQTT-3.1.2-25: never send a client more than its Maximum Packet Size.
                self.queued_bytes -= d.cost();
                self.stats.dropped_too_large_for_client += 1;
                if stored {
                    self.store_ops.push(StoreOp::QueueDelete {
                        client_id: client_id.clone(),
                        seq: d.seq,
                    });
                }
                continue;
            }
            self.stats.sent_by_qos[d.qos as usize] += 1;
            match packet_id {
                Some(packet_id) => {
                    if stored {
                        self.store_ops.push(StoreOp::QueuePut {
                            client_id: client_id.clone(),
                            delivery: d.clone(),
                            state: QueueState::Published(packet_id),
                        });
                    }
                    session.inflight.push_back(Inflight {
                        packet_id,
                        delivery: d,
                        state: OutState::Published,
                        sent: true,
                    });
                }
                None => self.queued_bytes -= d.cost(),
            }
            conn.credit -= 1;
            self.out.push(Action::Send(conn_id, packet));
        }
    }

    /// Tries again the publishes held for publishers that were paused.
    fn retry_held(&mut self, now: Instant) {
        if self.retrying {
            // Reached again through a held packet (a PUBACK that frees room): the outer
            // call goes on with the rest, in order.
            return;
        }
        self.retrying = true;
        self.retry_held_inner(now);
        self.retrying = false;
    }

    fn retry_held_inner(&mut self, now: Instant) {
        while let Some(msg) = self.held_deliveries.pop_front() {
            let before = self.held_deliveries.len();
            self.deliver(msg, now);
            if self.held_deliveries.len() > before {
                // Still no room: it went to the back; put it first again and wait.
                let msg = self.held_deliveries.pop_back().expect("just pushed");
                self.held_deliveries.push_front(msg);
                break;
            }
        }
        let paused: Vec<ConnId> = self
            .conns
            .iter()
            .filter(|(_, c)| !c.held.is_empty())
            .map(|(id, _)| *id)
            .collect();
        for conn in paused {
            loop {
                let Some(packet) = self.conns.get_mut(&conn).and_then(|c| c.held.pop_front())
                else {
                    self.out.push(Action::ResumeReads(conn));
                    break;
                };
                let was_publish = matches!(packet, Packet::Publish(_));
                self.packet(conn, packet, now);
                let blocked_again = was_publish
                    && self
                        .out
                        .last()
                        .is_some_and(|a| *a == Action::PauseReads(conn));
                if blocked_again {
                    // Still no room: undo the repeated pause, keep waiting.
                    self.out.pop();
                    self.stats.publishers_paused -= 1;
                    break;
                }
            }
        }
    }

    fn send(&mut self, conn: ConnId, packet: Packet) {
        // Control packets (acks, SUBACK, PINGRESP) are small and bounded by what the client
        // sends; they go out even without credit, so that a paused reader never deadlocks.
        if let Some(c) = self.conns.get_mut(&conn) {
            c.credit = c.credit.saturating_sub(1);
        }
        self.out.push(Action::Send(conn, packet));
    }
}

/// Appends a delivery to a session's queue, and to its stored queue if the session is
/// persistent and the delivery is QoS 1/2.
fn enqueue(session: &mut Session, d: Delivery, store_ops: &mut Vec<StoreOp>) {
    let client_id = session.client_id.clone();
    let persistent = session.is_persistent();
    let d = session.push(d);
    if persistent && d.qos != QoS::AtMostOnce {
        store_ops.push(StoreOp::QueuePut {
            client_id,
            delivery: d.clone(),
            state: QueueState::Queued,
        });
    }
}

fn v5_reason_ok(conn: Option<&Conn>) -> bool {
    conn.is_some_and(|c| c.version == ProtocolVersion::V5)
}

fn add_target(targets: &mut HashMap<Arc<str>, Delivery>, msg: &Arc<Message>, e: &Entry) {
    let qos = effective_qos(msg.qos, e.options.qos);
    let retain = msg.retain && e.options.retain_as_published;
    let d = targets
        .entry(e.client_id.clone())
        .or_insert_with(|| Delivery {
            msg: msg.clone(),
            qos,
            retain,
            subscription_ids: Vec::new(),
            seq: 0,
        });
    d.qos = d.qos.max(qos);
    d.retain |= retain;
    if let Some(id) = e.id {
        d.subscription_ids.push(id);
    }
}

/// The properties a subscriber receives: everything but Topic Alias and Subscription
/// Identifiers, which are per hop (MQTT-3.3.2-?).
/// What a message costs in the outbox's budget: topic, payload and its record's bookkeeping.
pub(crate) fn outbox_cost(msg: &Message) -> u64 {
    (msg.cost() + 40) as u64
}

fn forwarded_properties(p: &Properties) -> Properties {
    if p.is_empty() {
        return Properties::default();
    }
    let mut out = p.clone();
    out.topic_alias = None;
    out.subscription_identifiers.clear();
    out.will_delay_interval_secs = None;
    out.message_expiry_interval_secs = None;
    out
}

/// The PUBLISH for one delivery on one connection: remaining expiry, subscription ids,
/// topic alias.
fn to_publish(d: &Delivery, packet_id: Option<PacketId>, now: Instant, conn: &mut Conn) -> Publish {
    let mut p = Publish::new(d.msg.topic.clone(), d.msg.payload.clone());
    p.qos = d.qos;
    p.retain = d.retain;
    p.packet_id = packet_id;
    if conn.version == ProtocolVersion::V5 {
        p.properties = d.msg.properties.clone();
        if let Some(at) = d.msg.expires_at {
            let left = at.saturating_duration_since(now).as_secs();
            p.properties.message_expiry_interval_secs =
                Some(u32::try_from(left).unwrap_or(u32::MAX).max(1));
        }
        if !d.subscription_ids.is_empty() {
            p.properties.subscription_identifiers = d.subscription_ids.clone();
        }
        if conn.alias_max_out > 0 {
            match conn.aliases_out.get(&d.msg.topic) {
                Some(alias) => {
                    p.properties.topic_alias = Some(*alias);
                    p.topic = TopicName::alias_only();
                }
                None if conn.aliases_out.len() < usize::from(conn.alias_max_out) => {
                    let alias = NonZeroU16::new(conn.aliases_out.len() as u16 + 1)
                        .expect("len + 1 is never 0");
                    conn.aliases_out.insert(d.msg.topic.clone(), alias);
                    p.properties.topic_alias = Some(alias);
                }
                None => {}
            }
        }
    }
    p
}

#[cfg(test)]
mod tests;
