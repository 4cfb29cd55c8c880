//! The AMQP broker core: every connection's handshake and channels, the virtual hosts'
//! exchanges, queues and consumers, publishing into the log and delivering from it.
//!
//! It is driven by one thread (see `super::driver`): frames and events come in as
//! [`Input`]s, and what must happen goes out as [`Action`]s (bytes for a connection, an
//! append to the log, metadata to make durable before those bytes go). It reads the log
//! itself, through [`Storage`], to match new records against queues and to fetch what it
//! delivers; it never writes to a socket, the log or the metadata.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use amq_protocol::frame::{AMQPContentHeader, AMQPFrame};
use amq_protocol::protocol::basic::AMQPProperties;
use amq_protocol::protocol::{basic, channel, confirm, connection, exchange, queue, AMQPClass};
use amq_protocol::types::{AMQPValue, FieldTable, ShortString};
use bytes::Bytes;
use ferry_edge::auth::{Action as AclAction, Auth};
use ferry_protocol::kafka::batch::{records, uncompressed};

use super::codec::{put_frame, FrameError, FRAME_OVERHEAD};
use super::message::{from_log, to_log, Message};
use super::queue::{ConsumerKey, Overflow, Queue, QueueArgs, QueueDef, Ready, SourceKey};
use super::topology::{Binding, Destination, Exchange, ExchangeKind, HeaderValue, Topology};
use super::ConnId;
use crate::log::{now_ms, NewRecord, Storage, READ_BUDGET_BYTES};
use crate::meta::Command;
use crate::routes::{RouteTable, DOWNLINK_STREAM};

/// Bytes of deliveries one connection gets per round at most; the rest waits for the next
/// round, so that one consumer without prefetch does not build one huge write.
const ROUND_BYTES: usize = 256 * 1024;

/// The pseudo-queue of direct reply-to (RabbitMQ's RPC shortcut).
const REPLY_TO: &str = "amq.rabbitmq.reply-to";

/// AMQP reply codes (the spec's constants).
pub(crate) mod code {
    pub(crate) const CONNECTION_FORCED: u16 = 320;
    pub(crate) const CONTENT_TOO_LARGE: u16 = 311;
    pub(crate) const NO_ROUTE: u16 = 312;
    pub(crate) const ACCESS_REFUSED: u16 = 403;
    pub(crate) const NOT_FOUND: u16 = 404;
    pub(crate) const RESOURCE_LOCKED: u16 = 405;
    pub(crate) const PRECONDITION_FAILED: u16 = 406;
    pub(crate) const FRAME_ERROR: u16 = 501;
    pub(crate) const SYNTAX_ERROR: u16 = 502;
    pub(crate) const COMMAND_INVALID: u16 = 503;
    pub(crate) const CHANNEL_ERROR: u16 = 504;
    pub(crate) const UNEXPECTED_FRAME: u16 = 505;
    pub(crate) const NOT_ALLOWED: u16 = 530;
    pub(crate) const NOT_IMPLEMENTED: u16 = 540;
}

/// What the core needs to know of the node and of its configuration.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub(crate) vhosts: Vec<String>,
    pub(crate) frame_max: u32,
    pub(crate) channel_max: u16,
    pub(crate) heartbeat_secs: u16,
    /// A delivery unacknowledged this long closes its channel (RabbitMQ's
    /// `consumer_timeout`, 30 minutes by default).
    pub(crate) ack_timeout: Duration,
    /// A connection not open (connection.open answered) this long after its protocol
    /// header is closed (RabbitMQ's `handshake_timeout`, 10 s by default).
    pub(crate) handshake_timeout: Duration,
}

/// What comes in.
// A frame is what comes in most; boxing it would cost an allocation per frame.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub(crate) enum Input {
    /// A client sent a valid protocol header.
    Connected {
        conn: ConnId,
    },
    Frame {
        conn: ConnId,
        frame: AMQPFrame,
    },
    /// What the client sent is not a frame: the connection is closed with its code.
    Bad {
        conn: ConnId,
        error: FrameError,
    },
    /// The socket closed or the peer went silent.
    Lost {
        conn: ConnId,
    },
    /// An append of [`Action::Append`] is durable (or failed).
    Appended {
        token: u64,
        ok: bool,
    },
    /// New records may be in the log.
    LogChanged,
    /// Time passed (the driver calls this about once a second).
    Tick,
    /// The node cannot take more (`true`: appends waiting for the log are over their
    /// budget) or can again (`false`).
    Pressure(bool),
}

/// What must happen.
#[derive(Debug)]
pub(crate) enum Action {
    /// Write these bytes (whole frames) to the connection.
    Send { conn: ConnId, bytes: Vec<u8> },
    /// The connection was tuned: the heartbeat interval it agreed to (0: none).
    Tuned { conn: ConnId, heartbeat_secs: u16 },
    /// Stop reading from the connection (it publishes while the node is under pressure),
    /// or read again.
    PauseReads { conn: ConnId, paused: bool },
    /// Close the connection once what was sent before is written.
    Close { conn: ConnId },
    /// Append a record; answer [`Input::Appended`] with `token` when it is durable.
    Append {
        token: u64,
        stream: String,
        partition: u32,
        record: NewRecord,
        /// A dead-lettered copy: its source queue let go of the message in this round,
        /// so the round's positions (and every later one) wait until it is durable,
        /// even those a reply waits for.
        dead_letter: bool,
    },
    /// Make this metadata durable before anything after it is sent.
    Meta(Command),
    /// A queue's position (its cursor state): make it durable once the dead-lettered
    /// copies of its round and of those before are (a dead-lettered message is in the log
    /// before its queue lets go of it); nothing waits for it. Written in order with
    /// [`Action::Meta`].
    Position(Command),
    /// Every position sent before must be durable before anything after it is sent (a
    /// client that acknowledged sent a synchronous method: its reply tells it the
    /// acknowledgements count).
    Barrier,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// connection.start sent, waiting for start-ok.
    Start,
    /// connection.tune sent, waiting for tune-ok.
    Tune,
    /// Waiting for connection.open.
    Open,
    Ready,
    /// connection.close sent or received: only close/close-ok count.
    Closing,
}

#[derive(Debug)]
struct Conn {
    stage: Stage,
    user: Option<String>,
    vhost: String,
    frame_max: u32,
    channel_max: u16,
    cancel_notify: bool,
    /// The client takes connection.blocked/unblocked.
    blocked_notify: bool,
    /// It published since it connected: pressure pauses its reads.
    publishes: bool,
    /// Its reads are paused by pressure.
    paused: bool,
    channels: BTreeMap<u16, Channel>,
    out: Vec<u8>,
    next_ctag: u64,
    /// When its protocol header came: the handshake must be done by this plus the
    /// handshake timeout.
    since: Instant,
}

/// A message being received: publish, then its header, then its body.
#[derive(Debug)]
struct Incoming {
    publish: basic::Publish,
    header: Option<AMQPContentHeader>,
    body: Vec<u8>,
}

#[derive(Debug)]
struct Consumer {
    queue: String,
    no_ack: bool,
    prefetch: u16,
    unacked: u32,
}

#[derive(Debug)]
struct Unacked {
    queue: String,
    ready: Ready,
    consumer: Option<String>,
    at: Instant,
}

#[derive(Debug, Default)]
struct Channel {
    closing: bool,
    incoming: Option<Incoming>,
    confirm: bool,
    /// tx.select: publishes and acknowledgements wait for tx.commit.
    tx: Option<Tx>,
    /// The tag of its consumer of `amq.rabbitmq.reply-to` (direct reply-to), if any.
    reply_consumer: Option<String>,
    /// The queue it declared last: what an empty queue name means.
    last_queue: Option<String>,
    next_seq: u64,
    /// Publish sequence numbers answered, not yet confirmed to the client (in order).
    answered: BTreeMap<u64, bool>,
    confirmed_to: u64,
    consumers: BTreeMap<String, Consumer>,
    /// basic.qos global=false: for consumers started after it.
    prefetch: u16,
    /// basic.qos global=true: for the whole channel.
    global_prefetch: u16,
    unacked: BTreeMap<u64, Unacked>,
    next_tag: u64,
}

#[derive(Debug)]
struct VHost {
    topology: Topology,
    queues: BTreeMap<String, Queue>,
}

/// A pending append: who to confirm, or which commit waits for it.
#[derive(Debug)]
struct Pending {
    conn: ConnId,
    channel: u16,
    seq: Option<u64>,
    commit: Option<u64>,
}

/// What a transactional channel did since its last commit or rollback.
#[derive(Debug, Default)]
struct Tx {
    publishes: Vec<(String, u32, NewRecord)>,
    /// (delivery tag, multiple, requeue: None for an ack).
    settles: Vec<(u64, bool, Option<bool>)>,
}

/// The core; see the module docs.
pub(crate) struct Broker {
    settings: Settings,
    auth: Arc<Auth>,
    routes: Arc<RouteTable>,
    log: Arc<dyn Storage>,
    conns: HashMap<ConnId, Conn>,
    vhosts: BTreeMap<String, VHost>,
    appends: HashMap<u64, Pending>,
    next_token: u64,
    /// Per partition, the messages of the last read for delivery not delivered yet (None:
    /// a record that is no message), so that a backlog is read and decoded once.
    cache: HashMap<SourceKey, BTreeMap<i64, Option<Message>>>,
    out: Vec<Action>,
    next_queue_name: u64,
    /// The node cannot take more now (see [`Input::Pressure`]).
    pressure: bool,
    /// Messages published and appended (or handed to a transaction) since start.
    published_total: u64,
    /// Commits waiting for their appends: id → (connection, channel, appends left, all ok).
    commits: HashMap<u64, (ConnId, u16, usize, bool)>,
    /// Connections whose write queue is full: nothing more is delivered to them now.
    blocked: std::collections::HashSet<ConnId>,
    /// The last round left deliverable messages for later (a write was full or its
    /// round's share was used).
    more: bool,
    /// This round's positions go out as [`Action::Meta`]: a reply waits for them
    /// (queue.purge-ok, tx.commit-ok after acknowledgements).
    sync_positions: bool,
    /// Connections that acknowledged since their last synchronous method: the next one's
    /// reply waits until those positions are durable ([`Action::Barrier`]).
    unsynced: std::collections::HashSet<ConnId>,
    barrier: bool,
    /// The log may hold records the queues have not read: set by [`Input::LogChanged`],
    /// kept while a pass stops at its budget, so a round without news reads nothing.
    behind: bool,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker")
            .field("connections", &self.conns.len())
            .finish_non_exhaustive()
    }
}

type Reply = Result<(), (u16, String)>;

fn method(class: AMQPClass) -> AMQPClass {
    class
}

fn ss(s: &str) -> ShortString {
    // Names that reach here are short strings already (they came in as ones or are ours);
    // a longer text (an error message) is cut.
    let mut end = s.len().min(255);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    ShortString::from(&s[..end])
}

/// Keys of the durable state in the metadata (vhost names are URL-escaped).
fn key(kind: &str, vhost: &str, name: &str) -> String {
    format!(
        "{kind}/{}/{name}",
        vhost.replace('%', "%25").replace('/', "%2F")
    )
}

impl Broker {
    /// A broker over `log` with the durable state `state` read back from the metadata
    /// (`(key, value)` entries, see [`key`]).
    pub(crate) fn new(
        settings: Settings,
        auth: Arc<Auth>,
        routes: Arc<RouteTable>,
        log: Arc<dyn Storage>,
        state: Vec<(String, Vec<u8>)>,
    ) -> Self {
        let mut vhosts = BTreeMap::new();
        for v in &settings.vhosts {
            vhosts.insert(
                v.clone(),
                VHost {
                    topology: Topology::new(),
                    queues: BTreeMap::new(),
                },
            );
        }
        let mut b = Self {
            settings,
            auth,
            routes,
            log,
            conns: HashMap::new(),
            vhosts,
            appends: HashMap::new(),
            next_token: 1,
            cache: HashMap::new(),
            out: Vec::new(),
            next_queue_name: 1,
            commits: HashMap::new(),
            published_total: 0,
            pressure: false,
            blocked: Default::default(),
            more: false,
            sync_positions: false,
            unsynced: Default::default(),
            barrier: false,
            behind: true,
        };
        b.load(state);
        b
    }

    fn load(&mut self, state: Vec<(String, Vec<u8>)>) {
        let now = now_ms();
        let mut cursors = Vec::new();
        for (k, v) in state {
            let mut parts = k.splitn(3, '/');
            let (Some(kind), Some(vhost), Some(name)) = (parts.next(), parts.next(), parts.next())
            else {
                continue;
            };
            let vhost = vhost.replace("%2F", "/").replace("%25", "%");
            let Some(vh) = self.vhosts.get_mut(&vhost) else {
                continue;
            };
            match kind {
                "x" => {
                    if let Ok(x) = serde_json::from_slice::<Exchange>(&v) {
                        vh.topology.exchanges.insert(name.to_owned(), x);
                    }
                }
                "q" => {
                    if let Ok(def) = serde_json::from_slice::<QueueDef>(&v) {
                        vh.queues
                            .insert(name.to_owned(), Queue::new(def, None, BTreeMap::new(), now));
                    }
                }
                "b" => {
                    if let Ok(b) = serde_json::from_slice::<Vec<Binding>>(&v) {
                        vh.topology.bindings = b;
                    }
                }
                "c" => cursors.push((vhost, name.to_owned(), v)),
                _ => {}
            }
        }
        for (vhost, name, v) in cursors {
            let Some(q) = self
                .vhosts
                .get_mut(&vhost)
                .and_then(|vh| vh.queues.get_mut(&name))
            else {
                continue;
            };
            if let Ok(state) = serde_json::from_slice(&v) {
                q.sources = Queue::sources_from(state);
            }
            q.dirty = false;
        }
    }

    /// The connections that cannot take more bytes now (their writer is full).
    pub(crate) fn set_blocked(&mut self, blocked: std::collections::HashSet<ConnId>) {
        self.blocked = blocked;
    }

    /// Whether the last [`Broker::take_actions`] left deliveries, or records to read, for
    /// another round.
    pub(crate) fn more(&self) -> bool {
        self.more || self.behind
    }

    /// Handles one input; the actions are in [`Broker::take_actions`].
    pub(crate) fn handle(&mut self, input: Input, now: Instant) {
        match input {
            Input::Connected { conn } => self.connected(conn, now),
            Input::Frame { conn, frame } => self.frame(conn, frame, now),
            Input::Bad { conn, error } => {
                let code = error.reply_code();
                self.close_connection(conn, code, &error.to_string(), 0, 0);
            }
            Input::Lost { conn } => self.lost(conn),
            Input::Appended { token, ok } => self.appended(token, ok),
            Input::LogChanged => self.behind = true,
            Input::Tick => self.tick(now),
            Input::Pressure(on) => self.pressure(on),
        }
    }

    /// What the inputs since the last call made necessary, in order: metadata first,
    /// then, per connection, its frames of this round as one write.
    pub(crate) fn take_actions(&mut self, now: Instant) -> Vec<Action> {
        if self.behind {
            self.follow();
        }
        self.pump(now);
        self.persist();
        let mut out = std::mem::take(&mut self.out);
        let mut sends: Vec<Action> = Vec::new();
        for (conn, c) in self.conns.iter_mut() {
            if !c.out.is_empty() {
                sends.push(Action::Send {
                    conn: *conn,
                    bytes: std::mem::take(&mut c.out),
                });
            }
        }
        // Metadata, then sends, then the rest in the order they came (closes after the
        // bytes that precede them).
        let (meta, rest): (Vec<_>, Vec<_>) =
            out.drain(..).partition(|a| matches!(a, Action::Meta(_)));
        let mut all = meta;
        all.extend(sends);
        all.extend(rest);
        all
    }

    // ---- connections ----

    fn connected(&mut self, conn: ConnId, now: Instant) {
        let mut c = Conn {
            stage: Stage::Start,
            user: None,
            vhost: String::new(),
            frame_max: self.settings.frame_max,
            channel_max: self.settings.channel_max,
            cancel_notify: false,
            blocked_notify: false,
            publishes: false,
            paused: false,
            channels: BTreeMap::new(),
            out: Vec::new(),
            next_ctag: 1,
            since: now,
        };
        let mut caps = FieldTable::default();
        for cap in [
            "publisher_confirms",
            "exchange_exchange_bindings",
            "basic.nack",
            "consumer_cancel_notify",
            "authentication_failure_close",
            "per_consumer_qos",
            "direct_reply_to",
        ] {
            caps.insert(ss(cap), AMQPValue::Boolean(true));
        }
        caps.insert(ss("connection.blocked"), AMQPValue::Boolean(true));
        let mut props = FieldTable::default();
        props.insert(ss("product"), AMQPValue::LongString("Ferry".into()));
        props.insert(
            ss("version"),
            AMQPValue::LongString(env!("CARGO_PKG_VERSION").into()),
        );
        props.insert(ss("platform"), AMQPValue::LongString("Rust".into()));
        props.insert(ss("capabilities"), AMQPValue::FieldTable(caps));
        send(
            &mut c,
            0,
            method(AMQPClass::Connection(connection::AMQPMethod::Start(
                connection::Start {
                    version_major: 0,
                    version_minor: 9,
                    server_properties: props,
                    mechanisms: "PLAIN AMQPLAIN".into(),
                    locales: "en_US".into(),
                },
            ))),
        );
        self.conns.insert(conn, c);
    }

    fn lost(&mut self, conn: ConnId) {
        self.unsynced.remove(&conn);
        let Some(c) = self.conns.remove(&conn) else {
            return;
        };
        let vhost = c.vhost.clone();
        for (id, ch) in c.channels {
            self.release_channel(&vhost, conn, id, ch);
        }
        // Exclusive queues go with their connection.
        if let Some(vh) = self.vhosts.get(&vhost) {
            let owned: Vec<String> = vh
                .queues
                .iter()
                .filter(|(_, q)| q.owner == Some(conn))
                .map(|(n, _)| n.clone())
                .collect();
            for name in owned {
                self.delete_queue(&vhost, &name);
            }
        }
        self.appends.retain(|_, p| p.conn != conn);
    }

    /// A channel is gone: its unacked messages are requeued, its consumers cancelled.
    fn release_channel(&mut self, vhost: &str, conn: ConnId, id: u16, ch: Channel) {
        let Some(vh) = self.vhosts.get_mut(vhost) else {
            return;
        };
        for (_, u) in ch.unacked.into_iter().rev() {
            if let Some(q) = vh.queues.get_mut(&u.queue) {
                q.requeue(u.ready);
            }
        }
        let mut emptied = Vec::new();
        for (tag, consumer) in ch.consumers {
            if let Some(q) = vh.queues.get_mut(&consumer.queue) {
                q.consumers
                    .retain(|k| !(k.conn == conn && k.channel == id && k.tag == tag));
                if q.consumers.is_empty() {
                    q.exclusive_consumer = false;
                    if q.def.auto_delete && q.had_consumer {
                        emptied.push(consumer.queue.clone());
                    }
                }
            }
        }
        for name in emptied {
            self.delete_queue(vhost, &name);
        }
    }

    fn close_connection(&mut self, conn: ConnId, code: u16, text: &str, class: u16, m: u16) {
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        if c.stage == Stage::Closing {
            return;
        }
        tracing::debug!(conn, code, text, "AMQP connection closed by the server");
        c.stage = Stage::Closing;
        send(
            c,
            0,
            AMQPClass::Connection(connection::AMQPMethod::Close(connection::Close {
                reply_code: code,
                reply_text: ss(text),
                class_id: class,
                method_id: m,
            })),
        );
        // Errors before the connection is open are not waited on (a broken peer may
        // never answer); after, the client's close-ok (or its silence, the heartbeat)
        // ends it. Either way nothing more is read from it.
        let vhost = c.vhost.clone();
        let channels = std::mem::take(&mut c.channels);
        for (id, ch) in channels {
            self.release_channel(&vhost, conn, id, ch);
        }
        self.out.push(Action::Close { conn });
    }

    fn frame(&mut self, conn: ConnId, frame: AMQPFrame, now: Instant) {
        let Some(c) = self.conns.get(&conn) else {
            return;
        };
        let stage = c.stage;
        if stage == Stage::Closing {
            // Only close-ok (or a crossing close) matters now; the driver closes.
            return;
        }
        match frame {
            AMQPFrame::Heartbeat => {}
            AMQPFrame::ProtocolHeader(_) | AMQPFrame::InvalidHeartbeat(_) => {
                self.close_connection(conn, code::FRAME_ERROR, "unexpected frame", 0, 0)
            }
            AMQPFrame::Method(0, m) => {
                self.sync_point(conn, &m);
                self.connection_method(conn, m)
            }
            AMQPFrame::Method(id, m) => {
                self.sync_point(conn, &m);
                if stage != Stage::Ready {
                    return self.close_connection(
                        conn,
                        code::CHANNEL_ERROR,
                        "channel used before the connection is open",
                        m.get_amqp_class_id(),
                        m.get_amqp_method_id(),
                    );
                }
                self.channel_method(conn, id, m, now)
            }
            AMQPFrame::Header(id, header) => self.content_header(conn, id, header, now),
            AMQPFrame::Body(id, body) => self.content_body(conn, id, body, now),
        }
    }

    /// A method other than publish and the acknowledgements, from a connection that
    /// acknowledged since its last one: its reply (or anything after) waits for the
    /// positions those acknowledgements moved.
    fn sync_point(&mut self, conn: ConnId, m: &AMQPClass) {
        use basic::AMQPMethod as B;
        let asynchronous = matches!(
            m,
            AMQPClass::Basic(B::Publish(_) | B::Ack(_) | B::Nack(_) | B::Reject(_))
        );
        if !asynchronous && self.unsynced.remove(&conn) {
            self.sync_positions = true;
            self.barrier = true;
        }
    }

    fn connection_method(&mut self, conn: ConnId, m: AMQPClass) {
        let (class_id, method_id) = (m.get_amqp_class_id(), m.get_amqp_method_id());
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        let AMQPClass::Connection(m) = m else {
            return self.close_connection(
                conn,
                code::COMMAND_INVALID,
                "only connection methods on channel 0",
                class_id,
                method_id,
            );
        };
        use connection::AMQPMethod as M;
        match (c.stage, m) {
            (Stage::Start, M::StartOk(ok)) => {
                let caps = ok.client_properties.inner().get("capabilities");
                if let Some(AMQPValue::FieldTable(caps)) = caps {
                    let has =
                        |k: &str| matches!(caps.inner().get(k), Some(AMQPValue::Boolean(true)));
                    c.cancel_notify = has("consumer_cancel_notify");
                    c.blocked_notify = has("connection.blocked");
                }
                let creds = match ok.mechanism.as_str() {
                    "PLAIN" => plain(ok.response.as_bytes()),
                    "AMQPLAIN" => amqplain(ok.response.as_bytes()),
                    other => {
                        let text = format!("unsupported authentication mechanism {other}");
                        return self.close_connection(
                            conn,
                            code::ACCESS_REFUSED,
                            &text,
                            class_id,
                            method_id,
                        );
                    }
                };
                let refused = |why: &str| {
                    format!("ACCESS_REFUSED - Login was refused using authentication mechanism {}: {why}", ok.mechanism)
                };
                let Some((user, password)) = creds else {
                    let text = refused("the response does not parse");
                    return self.close_connection(
                        conn,
                        code::ACCESS_REFUSED,
                        &text,
                        class_id,
                        method_id,
                    );
                };
                let user_opt = (!user.is_empty()).then_some(user.as_str());
                if self
                    .auth
                    .authenticate(user_opt, Some(password.as_bytes()))
                    .is_err()
                {
                    let text = refused("bad user name or password");
                    return self.close_connection(
                        conn,
                        code::ACCESS_REFUSED,
                        &text,
                        class_id,
                        method_id,
                    );
                }
                let c = self.conns.get_mut(&conn).expect("present");
                c.user = user_opt.map(str::to_owned);
                c.stage = Stage::Tune;
                let tune = connection::Tune {
                    channel_max: self.settings.channel_max,
                    frame_max: self.settings.frame_max,
                    heartbeat: self.settings.heartbeat_secs,
                };
                send(c, 0, AMQPClass::Connection(M::Tune(tune)));
            }
            (Stage::Tune, M::TuneOk(ok)) => {
                if ok.frame_max != 0 && ok.frame_max < super::codec::FRAME_MIN_SIZE {
                    return self.close_connection(
                        conn,
                        code::NOT_ALLOWED,
                        "frame_max below the minimum of 4096",
                        class_id,
                        method_id,
                    );
                }
                c.frame_max = match ok.frame_max {
                    0 => self.settings.frame_max,
                    n => n.min(self.settings.frame_max),
                };
                c.channel_max = match ok.channel_max {
                    0 => self.settings.channel_max,
                    n => n.min(self.settings.channel_max),
                };
                c.stage = Stage::Open;
                self.out.push(Action::Tuned {
                    conn,
                    heartbeat_secs: ok.heartbeat,
                });
            }
            (Stage::Open, M::Open(open)) => {
                let vhost = open.virtual_host.as_str().to_owned();
                if !self.vhosts.contains_key(&vhost) {
                    let text = format!("NOT_ALLOWED - vhost {vhost} not found");
                    return self.close_connection(
                        conn,
                        code::NOT_ALLOWED,
                        &text,
                        class_id,
                        method_id,
                    );
                }
                c.vhost = vhost;
                c.stage = Stage::Ready;
                send(
                    c,
                    0,
                    AMQPClass::Connection(M::OpenOk(connection::OpenOk {})),
                );
            }
            (_, M::Close(_)) => {
                send(
                    c,
                    0,
                    AMQPClass::Connection(M::CloseOk(connection::CloseOk {})),
                );
                c.stage = Stage::Closing;
                let vhost = c.vhost.clone();
                let channels = std::mem::take(&mut c.channels);
                for (id, ch) in channels {
                    self.release_channel(&vhost, conn, id, ch);
                }
                self.out.push(Action::Close { conn });
            }
            (_, M::CloseOk(_)) => self.out.push(Action::Close { conn }),
            (Stage::Ready, M::UpdateSecret(_)) => {
                send(
                    c,
                    0,
                    AMQPClass::Connection(M::UpdateSecretOk(connection::UpdateSecretOk {})),
                );
            }
            (_, _) => self.close_connection(
                conn,
                code::COMMAND_INVALID,
                "connection method out of order",
                class_id,
                method_id,
            ),
        }
    }

    /// Closes channel `id` with an error (a channel exception).
    fn close_channel(&mut self, conn: ConnId, id: u16, code: u16, text: &str, m: (u16, u16)) {
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        let Some(ch) = c.channels.get_mut(&id) else {
            return;
        };
        ch.closing = true;
        ch.incoming = None;
        send(
            c,
            id,
            AMQPClass::Channel(channel::AMQPMethod::Close(channel::Close {
                reply_code: code,
                reply_text: ss(text),
                class_id: m.0,
                method_id: m.1,
            })),
        );
        // Its messages and consumers go now; the channel id is free after close-ok.
        let vhost = c.vhost.clone();
        let ch = std::mem::take(c.channels.get_mut(&id).expect("present"));
        c.channels.get_mut(&id).expect("present").closing = true;
        self.release_channel(&vhost, conn, id, ch);
    }

    fn channel_method(&mut self, conn: ConnId, id: u16, m: AMQPClass, now: Instant) {
        let ids = (m.get_amqp_class_id(), m.get_amqp_method_id());
        let c = self.conns.get_mut(&conn).expect("checked");
        if id > c.channel_max {
            return self.close_connection(
                conn,
                code::CHANNEL_ERROR,
                "channel id over channel_max",
                ids.0,
                ids.1,
            );
        }
        let open = c.channels.get(&id);
        match (&m, open) {
            (AMQPClass::Channel(channel::AMQPMethod::Open(_)), None) => {
                c.channels.insert(id, Channel::default());
                return send(
                    c,
                    id,
                    AMQPClass::Channel(channel::AMQPMethod::OpenOk(channel::OpenOk {})),
                );
            }
            (AMQPClass::Channel(channel::AMQPMethod::Open(_)), Some(_)) => {
                return self.close_connection(
                    conn,
                    code::CHANNEL_ERROR,
                    "channel already open",
                    ids.0,
                    ids.1,
                );
            }
            (_, None) => {
                return self.close_connection(
                    conn,
                    code::CHANNEL_ERROR,
                    "channel not open",
                    ids.0,
                    ids.1,
                );
            }
            (AMQPClass::Channel(channel::AMQPMethod::CloseOk(_)), Some(ch)) if ch.closing => {
                c.channels.remove(&id);
                return;
            }
            (AMQPClass::Channel(channel::AMQPMethod::Close(_)), Some(_)) => {
                let ch = c.channels.remove(&id).expect("present");
                send(
                    c,
                    id,
                    AMQPClass::Channel(channel::AMQPMethod::CloseOk(channel::CloseOk {})),
                );
                let vhost = c.vhost.clone();
                return self.release_channel(&vhost, conn, id, ch);
            }
            (_, Some(ch)) if ch.closing => return,
            (_, Some(ch)) if ch.incoming.is_some() => {
                return self.close_connection(
                    conn,
                    code::UNEXPECTED_FRAME,
                    "a method while content was expected",
                    ids.0,
                    ids.1,
                );
            }
            _ => {}
        }
        let result = match m {
            AMQPClass::Exchange(m) => self.exchange_method(conn, id, m),
            AMQPClass::Queue(m) => self.queue_method(conn, id, m),
            AMQPClass::Basic(m) => self.basic_method(conn, id, m, now),
            AMQPClass::Confirm(confirm::AMQPMethod::Select(s)) => {
                let c = self.conns.get_mut(&conn).expect("checked");
                let ch = c.channels.get_mut(&id).expect("open");
                if ch.tx.is_some() {
                    return self.close_channel(
                        conn,
                        id,
                        code::PRECONDITION_FAILED,
                        "PRECONDITION_FAILED - cannot switch from tx to confirm mode",
                        ids,
                    );
                }
                if !ch.confirm {
                    ch.confirm = true;
                    ch.next_seq = 1;
                    ch.confirmed_to = 0;
                }
                if !s.nowait {
                    send(
                        c,
                        id,
                        AMQPClass::Confirm(confirm::AMQPMethod::SelectOk(confirm::SelectOk {})),
                    );
                }
                Ok(())
            }
            AMQPClass::Tx(m) => self.tx_method(conn, id, m),
            AMQPClass::Channel(channel::AMQPMethod::Flow(f)) => {
                let c = self.conns.get_mut(&conn).expect("checked");
                send(
                    c,
                    id,
                    AMQPClass::Channel(channel::AMQPMethod::FlowOk(channel::FlowOk {
                        active: f.active,
                    })),
                );
                Ok(())
            }
            AMQPClass::Access(_) => {
                Err((code::NOT_IMPLEMENTED, "access.request is not served".into()))
            }
            _ => {
                return self.close_connection(
                    conn,
                    code::COMMAND_INVALID,
                    "a method the server does not take",
                    ids.0,
                    ids.1,
                );
            }
        };
        if let Err((code, text)) = result {
            if code >= 500 {
                self.close_connection(conn, code, &text, ids.0, ids.1);
            } else {
                self.close_channel(conn, id, code, &text, ids);
            }
        }
    }

    fn vhost_of(&self, conn: ConnId) -> String {
        self.conns
            .get(&conn)
            .map(|c| c.vhost.clone())
            .unwrap_or_default()
    }

    fn user_of(&self, conn: ConnId) -> Option<String> {
        self.conns.get(&conn).and_then(|c| c.user.clone())
    }

    /// Whether the connection's user may do `action` on the ACL topic `topic`.
    fn allowed(&self, conn: ConnId, action: AclAction, topic: &str) -> bool {
        self.auth.allows_everything()
            || self.auth.allows(
                self.user_of(conn).as_deref(),
                &format!("amqp-{conn}"),
                action,
                topic,
            )
    }

    // ---- exchanges ----

    fn exchange_method(&mut self, conn: ConnId, id: u16, m: exchange::AMQPMethod) -> Reply {
        use exchange::AMQPMethod as M;
        let vhost = self.vhost_of(conn);
        let not_found = |name: &str| {
            (
                code::NOT_FOUND,
                format!("NOT_FOUND - no exchange '{name}' in vhost '{vhost}'"),
            )
        };
        let (reply, nowait) = match m {
            M::Declare(d) => {
                let name = d.exchange.as_str().to_owned();
                let vh = self.vhosts.get_mut(&vhost).expect("open vhost");
                if d.passive {
                    if !vh.topology.exchanges.contains_key(&name) && !name.is_empty() {
                        return Err(not_found(&name));
                    }
                } else {
                    let Some(kind) = ExchangeKind::parse(d.kind.as_str()) else {
                        return Err((
                            code::COMMAND_INVALID,
                            format!("COMMAND_INVALID - unknown exchange type '{}'", d.kind),
                        ));
                    };
                    if name.is_empty()
                        || (name.starts_with("amq.") && !vh.topology.exchanges.contains_key(&name))
                    {
                        return Err((code::ACCESS_REFUSED, format!("ACCESS_REFUSED - exchange name '{name}' contains reserved prefix 'amq.*'")));
                    }
                    let new = Exchange {
                        kind,
                        durable: d.durable,
                        auto_delete: d.auto_delete,
                        internal: d.internal,
                    };
                    match vh.topology.exchanges.get(&name) {
                        Some(old)
                            if old.kind != new.kind
                                || old.durable != new.durable
                                || old.auto_delete != new.auto_delete
                                || old.internal != new.internal =>
                        {
                            return Err((code::PRECONDITION_FAILED, format!("PRECONDITION_FAILED - inequivalent arg 'type' or flags for exchange '{name}' in vhost '{vhost}': current is '{}'", old.kind.name())));
                        }
                        Some(_) => {}
                        None => {
                            if new.durable {
                                self.out.push(Action::Meta(Command::AmqpPut {
                                    key: key("x", &vhost, &name),
                                    value: serde_json::to_vec(&new).unwrap_or_default(),
                                }));
                            }
                            vh.topology.exchanges.insert(name, new);
                        }
                    }
                }
                (
                    AMQPClass::Exchange(M::DeclareOk(exchange::DeclareOk {})),
                    d.nowait,
                )
            }
            M::Delete(d) => {
                let name = d.exchange.as_str().to_owned();
                let vh = self.vhosts.get_mut(&vhost).expect("open vhost");
                if name.is_empty() || name.starts_with("amq.") {
                    return Err((
                        code::ACCESS_REFUSED,
                        format!("ACCESS_REFUSED - operation not permitted on exchange '{name}'"),
                    ));
                }
                if vh.topology.exchanges.contains_key(&name) {
                    if d.if_unused && vh.topology.bindings.iter().any(|b| b.source == name) {
                        return Err((
                            code::PRECONDITION_FAILED,
                            format!(
                                "PRECONDITION_FAILED - exchange '{name}' in vhost '{vhost}' in use"
                            ),
                        ));
                    }
                    vh.topology.exchanges.remove(&name);
                    let dest = Destination::Exchange(name.clone());
                    vh.topology
                        .bindings
                        .retain(|b| b.source != name && b.destination != dest);
                    self.out.push(Action::Meta(Command::AmqpDelete {
                        key: key("x", &vhost, &name),
                    }));
                    self.save_bindings(&vhost);
                }
                (
                    AMQPClass::Exchange(M::DeleteOk(exchange::DeleteOk {})),
                    d.nowait,
                )
            }
            M::Bind(b) => {
                self.bind(
                    &vhost,
                    b.source.as_str(),
                    Destination::Exchange(b.destination.as_str().into()),
                    b.routing_key.as_str(),
                    &b.arguments,
                    true,
                )?;
                (
                    AMQPClass::Exchange(M::BindOk(exchange::BindOk {})),
                    b.nowait,
                )
            }
            M::Unbind(b) => {
                self.bind(
                    &vhost,
                    b.source.as_str(),
                    Destination::Exchange(b.destination.as_str().into()),
                    b.routing_key.as_str(),
                    &b.arguments,
                    false,
                )?;
                (
                    AMQPClass::Exchange(M::UnbindOk(exchange::UnbindOk {})),
                    b.nowait,
                )
            }
            _ => {
                return Err((
                    code::COMMAND_INVALID,
                    "COMMAND_INVALID - not a client method".into(),
                ))
            }
        };
        if !nowait {
            let c = self.conns.get_mut(&conn).expect("checked");
            send(c, id, reply);
        }
        Ok(())
    }

    fn bind(
        &mut self,
        vhost: &str,
        source: &str,
        to: Destination,
        key_: &str,
        args: &FieldTable,
        add: bool,
    ) -> Reply {
        let vh = self.vhosts.get_mut(vhost).expect("open vhost");
        if source.is_empty() {
            return Err((
                code::ACCESS_REFUSED,
                "ACCESS_REFUSED - operation not permitted on the default exchange".into(),
            ));
        }
        if !vh.topology.exchanges.contains_key(source) {
            return Err((
                code::NOT_FOUND,
                format!("NOT_FOUND - no exchange '{source}' in vhost '{vhost}'"),
            ));
        }
        match &to {
            Destination::Queue(q) if !vh.queues.contains_key(q) => {
                return Err((
                    code::NOT_FOUND,
                    format!("NOT_FOUND - no queue '{q}' in vhost '{vhost}'"),
                ));
            }
            Destination::Exchange(x) if !vh.topology.exchanges.contains_key(x) => {
                return Err((
                    code::NOT_FOUND,
                    format!("NOT_FOUND - no exchange '{x}' in vhost '{vhost}'"),
                ));
            }
            _ => {}
        }
        let binding = Binding {
            source: source.to_owned(),
            destination: to,
            key: key_.to_owned(),
            args: HeaderValue::table(args),
        };
        if add {
            if !vh.topology.bindings.contains(&binding) {
                vh.topology.bindings.push(binding);
            }
        } else {
            vh.topology.bindings.retain(|b| *b != binding);
            // An auto-delete exchange goes with its last binding.
            let auto = vh
                .topology
                .exchanges
                .get(source)
                .is_some_and(|x| x.auto_delete);
            if auto && !vh.topology.bindings.iter().any(|b| b.source == source) {
                vh.topology.exchanges.remove(source);
                self.out.push(Action::Meta(Command::AmqpDelete {
                    key: key("x", vhost, source),
                }));
            }
        }
        self.save_bindings(vhost);
        Ok(())
    }

    /// Writes the vhost's bindings between durable ends.
    fn save_bindings(&mut self, vhost: &str) {
        let Some(vh) = self.vhosts.get(vhost) else {
            return;
        };
        let durable = |b: &Binding| {
            let src = vh
                .topology
                .exchanges
                .get(&b.source)
                .is_some_and(|x| x.durable);
            let dst = match &b.destination {
                Destination::Queue(q) => vh.queues.get(q).is_some_and(|q| q.def.durable),
                Destination::Exchange(x) => vh.topology.exchanges.get(x).is_some_and(|x| x.durable),
            };
            src && dst
        };
        let kept: Vec<&Binding> = vh.topology.bindings.iter().filter(|b| durable(b)).collect();
        self.out.push(Action::Meta(Command::AmqpPut {
            key: key("b", vhost, ""),
            value: serde_json::to_vec(&kept).unwrap_or_default(),
        }));
    }

    // ---- queues ----

    fn queue_method(&mut self, conn: ConnId, id: u16, m: queue::AMQPMethod) -> Reply {
        use queue::AMQPMethod as M;
        let vhost = self.vhost_of(conn);
        let not_found = |name: &str| {
            (
                code::NOT_FOUND,
                format!("NOT_FOUND - no queue '{name}' in vhost '{vhost}'"),
            )
        };
        let (reply, nowait) = match m {
            M::Declare(d) => {
                let mut name = d.queue.as_str().to_owned();
                if d.passive {
                    let vh = self.vhosts.get(&vhost).expect("open vhost");
                    let q = vh.queues.get(&name).ok_or_else(|| not_found(&name))?;
                    if q.owner.is_some_and(|o| o != conn) {
                        return Err(locked(&name, &vhost));
                    }
                } else {
                    let args = QueueArgs::parse(&d.arguments).map_err(|e| {
                        (
                            code::PRECONDITION_FAILED,
                            format!("PRECONDITION_FAILED - {e}"),
                        )
                    })?;
                    if name.starts_with("amq.") {
                        return Err((code::ACCESS_REFUSED, format!("ACCESS_REFUSED - queue name '{name}' contains reserved prefix 'amq.*'")));
                    }
                    if name.is_empty() {
                        name = format!("amq.gen-{conn:x}-{:x}", self.next_queue_name);
                        self.next_queue_name += 1;
                    }
                    let def = QueueDef {
                        durable: d.durable,
                        exclusive: d.exclusive,
                        auto_delete: d.auto_delete,
                        args,
                    };
                    let from = self.log_ends();
                    let vh = self.vhosts.get_mut(&vhost).expect("open vhost");
                    match vh.queues.get(&name) {
                        Some(q) if q.owner.is_some_and(|o| o != conn) => {
                            return Err(locked(&name, &vhost))
                        }
                        Some(q) if q.def != def => {
                            return Err((code::PRECONDITION_FAILED, format!("PRECONDITION_FAILED - inequivalent arg 'durable', 'exclusive', 'auto_delete' or 'x-*' for queue '{name}' in vhost '{vhost}'")));
                        }
                        Some(_) => {}
                        None => {
                            let owner = d.exclusive.then_some(conn);
                            if def.durable {
                                self.out.push(Action::Meta(Command::AmqpPut {
                                    key: key("q", &vhost, &name),
                                    value: serde_json::to_vec(&def).unwrap_or_default(),
                                }));
                            }
                            vh.queues
                                .insert(name.clone(), Queue::new(def, owner, from, now_ms()));
                            // Every queue is bound to the default exchange by its name.
                        }
                    }
                }
                if let Some(ch) = self
                    .conns
                    .get_mut(&conn)
                    .and_then(|c| c.channels.get_mut(&id))
                {
                    ch.last_queue = Some(name.clone());
                }
                let vh = self.vhosts.get(&vhost).expect("open vhost");
                let q = &vh.queues[&name];
                let ok = queue::DeclareOk {
                    queue: ss(&name),
                    message_count: q.ready.len() as u32,
                    consumer_count: q.consumers.len() as u32,
                };
                (AMQPClass::Queue(M::DeclareOk(ok)), d.nowait)
            }
            M::Bind(b) => {
                let name = self.queue_name(conn, id, b.queue.as_str());
                self.check_queue(conn, &vhost, &name)?;
                self.bind(
                    &vhost,
                    b.exchange.as_str(),
                    Destination::Queue(name),
                    b.routing_key.as_str(),
                    &b.arguments,
                    true,
                )?;
                (AMQPClass::Queue(M::BindOk(queue::BindOk {})), b.nowait)
            }
            M::Unbind(b) => {
                let name = self.queue_name(conn, id, b.queue.as_str());
                self.check_queue(conn, &vhost, &name)?;
                self.bind(
                    &vhost,
                    b.exchange.as_str(),
                    Destination::Queue(name),
                    b.routing_key.as_str(),
                    &b.arguments,
                    false,
                )?;
                (AMQPClass::Queue(M::UnbindOk(queue::UnbindOk {})), false)
            }
            M::Purge(p) => {
                let name = self.queue_name(conn, id, p.queue.as_str());
                self.check_queue(conn, &vhost, &name)?;
                let vh = self.vhosts.get_mut(&vhost).expect("open vhost");
                let n = vh.queues.get_mut(&name).map_or(0, Queue::purge);
                self.sync_positions = true;
                (
                    AMQPClass::Queue(M::PurgeOk(queue::PurgeOk {
                        message_count: n as u32,
                    })),
                    p.nowait,
                )
            }
            M::Delete(d) => {
                let name = self.queue_name(conn, id, d.queue.as_str());
                let vh = self.vhosts.get(&vhost).expect("open vhost");
                let count = match vh.queues.get(&name) {
                    // Deleting what is not there is fine (RabbitMQ answers delete-ok).
                    None => 0,
                    Some(q) => {
                        if q.owner.is_some_and(|o| o != conn) {
                            return Err(locked(&name, &vhost));
                        }
                        if d.if_unused && !q.consumers.is_empty() {
                            return Err((code::PRECONDITION_FAILED, format!("PRECONDITION_FAILED - queue '{name}' in vhost '{vhost}' in use")));
                        }
                        if d.if_empty && !q.ready.is_empty() {
                            return Err((code::PRECONDITION_FAILED, format!("PRECONDITION_FAILED - queue '{name}' in vhost '{vhost}' is not empty")));
                        }
                        let n = q.ready.len();
                        self.delete_queue(&vhost, &name);
                        n
                    }
                };
                (
                    AMQPClass::Queue(M::DeleteOk(queue::DeleteOk {
                        message_count: count as u32,
                    })),
                    d.nowait,
                )
            }
            _ => {
                return Err((
                    code::COMMAND_INVALID,
                    "COMMAND_INVALID - not a client method".into(),
                ))
            }
        };
        if !nowait {
            let c = self.conns.get_mut(&conn).expect("checked");
            send(c, id, reply);
        }
        Ok(())
    }

    /// An empty queue name is the channel's last declared queue (as in RabbitMQ).
    fn queue_name(&self, conn: ConnId, id: u16, name: &str) -> String {
        if !name.is_empty() {
            return name.to_owned();
        }
        self.conns
            .get(&conn)
            .and_then(|c| c.channels.get(&id))
            .and_then(|ch| ch.last_queue.clone())
            .unwrap_or_default()
    }

    fn check_queue(&self, conn: ConnId, vhost: &str, name: &str) -> Reply {
        let vh = self.vhosts.get(vhost).expect("open vhost");
        let q = vh.queues.get(name).ok_or_else(|| {
            (
                code::NOT_FOUND,
                format!("NOT_FOUND - no queue '{name}' in vhost '{vhost}'"),
            )
        })?;
        if q.owner.is_some_and(|o| o != conn) {
            return Err(locked(name, vhost));
        }
        Ok(())
    }

    /// The end of every partition the AMQP front reads: where a new queue starts.
    fn log_ends(&self) -> BTreeMap<SourceKey, i64> {
        let mut out = BTreeMap::new();
        for s in self.log.streams() {
            if s.name == DOWNLINK_STREAM {
                continue;
            }
            for (p, info) in s.partitions.iter().enumerate() {
                out.insert((s.name.clone(), p as u32), info.offsets.high_watermark);
            }
        }
        out
    }

    /// Removes a queue: its consumers are cancelled (told, if they asked to be), its
    /// bindings and its durable state go.
    fn delete_queue(&mut self, vhost: &str, name: &str) {
        let Some(vh) = self.vhosts.get_mut(vhost) else {
            return;
        };
        let Some(q) = vh.queues.remove(name) else {
            return;
        };
        let dest = Destination::Queue(name.to_owned());
        vh.topology.bindings.retain(|b| b.destination != dest);
        for k in &q.consumers {
            if let Some(c) = self.conns.get_mut(&k.conn) {
                let notify = c.cancel_notify;
                if let Some(ch) = c.channels.get_mut(&k.channel) {
                    ch.consumers.remove(&k.tag);
                    if notify {
                        send(
                            c,
                            k.channel,
                            AMQPClass::Basic(basic::AMQPMethod::Cancel(basic::Cancel {
                                consumer_tag: ss(&k.tag),
                                nowait: true,
                            })),
                        );
                    }
                }
            }
        }
        if q.def.durable {
            self.out.push(Action::Meta(Command::AmqpDelete {
                key: key("q", vhost, name),
            }));
            self.out.push(Action::Meta(Command::AmqpDelete {
                key: key("c", vhost, name),
            }));
        }
        self.save_bindings(vhost);
    }

    // ---- basic ----

    fn basic_method(&mut self, conn: ConnId, id: u16, m: basic::AMQPMethod, now: Instant) -> Reply {
        use basic::AMQPMethod as M;
        let vhost = self.vhost_of(conn);
        match m {
            M::Qos(q) => {
                let c = self.conns.get_mut(&conn).expect("checked");
                let ch = c.channels.get_mut(&id).expect("open");
                if q.global {
                    ch.global_prefetch = q.prefetch_count;
                } else {
                    ch.prefetch = q.prefetch_count;
                }
                send(c, id, AMQPClass::Basic(M::QosOk(basic::QosOk {})));
            }
            M::Publish(p) => {
                let vh = self.vhosts.get(&vhost).expect("open vhost");
                let name = p.exchange.as_str();
                if !name.is_empty() {
                    match vh.topology.exchanges.get(name) {
                        None => {
                            return Err((
                                code::NOT_FOUND,
                                format!("NOT_FOUND - no exchange '{name}' in vhost '{vhost}'"),
                            ))
                        }
                        Some(x) if x.internal => {
                            return Err((code::ACCESS_REFUSED, format!("ACCESS_REFUSED - cannot publish to internal exchange '{name}' in vhost '{vhost}'")));
                        }
                        Some(_) => {}
                    }
                }
                let c = self.conns.get_mut(&conn).expect("checked");
                let ch = c.channels.get_mut(&id).expect("open");
                ch.incoming = Some(Incoming {
                    publish: p,
                    header: None,
                    body: Vec::new(),
                });
            }
            M::Consume(cm) if cm.queue.as_str() == REPLY_TO => {
                // Direct reply-to: a pseudo-queue; replies go straight to this channel.
                if !cm.no_ack {
                    return Err((
                        code::PRECONDITION_FAILED,
                        "PRECONDITION_FAILED - reply consumer cannot acknowledge".into(),
                    ));
                }
                let c = self.conns.get_mut(&conn).expect("checked");
                let mut tag = cm.consumer_tag.as_str().to_owned();
                if tag.is_empty() {
                    tag = format!("amq.ctag-{conn:x}-{}", c.next_ctag);
                    c.next_ctag += 1;
                }
                let ch = c.channels.get_mut(&id).expect("open");
                if ch.reply_consumer.is_some() {
                    return Err((
                        code::PRECONDITION_FAILED,
                        "PRECONDITION_FAILED - a reply consumer already exists on this channel"
                            .into(),
                    ));
                }
                ch.reply_consumer = Some(tag.clone());
                if !cm.nowait {
                    send(
                        c,
                        id,
                        AMQPClass::Basic(M::ConsumeOk(basic::ConsumeOk {
                            consumer_tag: ss(&tag),
                        })),
                    );
                }
            }
            M::Consume(cm) => {
                let name = self.queue_name(conn, id, cm.queue.as_str());
                self.check_queue(conn, &vhost, &name)?;
                if !self.allowed(conn, AclAction::Receive, &format!("amqp/queue/{name}")) {
                    return Err((
                        code::ACCESS_REFUSED,
                        format!(
                            "ACCESS_REFUSED - access to queue '{name}' in vhost '{vhost}' refused"
                        ),
                    ));
                }
                let vh = self.vhosts.get_mut(&vhost).expect("open vhost");
                let q = vh.queues.get_mut(&name).expect("checked");
                if q.exclusive_consumer || (cm.exclusive && !q.consumers.is_empty()) {
                    return Err((
                        code::ACCESS_REFUSED,
                        format!(
                            "ACCESS_REFUSED - queue '{name}' in vhost '{vhost}' in exclusive use"
                        ),
                    ));
                }
                let c = self.conns.get_mut(&conn).expect("checked");
                let mut tag = cm.consumer_tag.as_str().to_owned();
                if tag.is_empty() {
                    tag = format!("amq.ctag-{conn:x}-{}", c.next_ctag);
                    c.next_ctag += 1;
                }
                let ch = c.channels.get_mut(&id).expect("open");
                if ch.consumers.contains_key(&tag) {
                    return Err((
                        code::NOT_ALLOWED,
                        format!("NOT_ALLOWED - attempt to reuse consumer tag '{tag}'"),
                    ));
                }
                ch.consumers.insert(
                    tag.clone(),
                    Consumer {
                        queue: name.clone(),
                        no_ack: cm.no_ack,
                        prefetch: ch.prefetch,
                        unacked: 0,
                    },
                );
                if !cm.nowait {
                    send(
                        c,
                        id,
                        AMQPClass::Basic(M::ConsumeOk(basic::ConsumeOk {
                            consumer_tag: ss(&tag),
                        })),
                    );
                }
                q.consumers.push(ConsumerKey {
                    conn,
                    channel: id,
                    tag,
                });
                q.exclusive_consumer |= cm.exclusive;
                q.had_consumer = true;
                q.used_ms = now_ms();
            }
            M::Cancel(cn) => {
                let c = self.conns.get_mut(&conn).expect("checked");
                let ch = c.channels.get_mut(&id).expect("open");
                let tag = cn.consumer_tag.as_str().to_owned();
                if ch.reply_consumer.as_deref() == Some(tag.as_str()) {
                    ch.reply_consumer = None;
                }
                let gone = ch.consumers.remove(&tag);
                if !cn.nowait {
                    send(
                        c,
                        id,
                        AMQPClass::Basic(M::CancelOk(basic::CancelOk {
                            consumer_tag: ss(&tag),
                        })),
                    );
                }
                if let Some(consumer) = gone {
                    let vh = self.vhosts.get_mut(&vhost).expect("open vhost");
                    let mut emptied = false;
                    if let Some(q) = vh.queues.get_mut(&consumer.queue) {
                        q.consumers
                            .retain(|k| !(k.conn == conn && k.channel == id && k.tag == tag));
                        if q.consumers.is_empty() {
                            q.exclusive_consumer = false;
                            emptied = q.def.auto_delete;
                        }
                    }
                    if emptied {
                        self.delete_queue(&vhost, &consumer.queue);
                    }
                }
            }
            M::Get(g) => {
                let name = self.queue_name(conn, id, g.queue.as_str());
                self.check_queue(conn, &vhost, &name)?;
                if !self.allowed(conn, AclAction::Receive, &format!("amqp/queue/{name}")) {
                    return Err((
                        code::ACCESS_REFUSED,
                        format!(
                            "ACCESS_REFUSED - access to queue '{name}' in vhost '{vhost}' refused"
                        ),
                    ));
                }
                self.follow();
                match self.next_message(&vhost, &name, now) {
                    Some((ready, msg)) => {
                        let vh = self.vhosts.get_mut(&vhost).expect("open vhost");
                        let q = vh.queues.get_mut(&name).expect("checked");
                        let left = q.ready.len() as u32;
                        q.delivered(&ready);
                        if g.no_ack {
                            q.unacked -= 1;
                            q.settle(&ready.source, ready.offset);
                        }
                        let c = self.conns.get_mut(&conn).expect("checked");
                        let ch = c.channels.get_mut(&id).expect("open");
                        ch.next_tag += 1;
                        let tag = ch.next_tag;
                        let redelivered = ready.redelivered;
                        if !g.no_ack {
                            ch.unacked.insert(
                                tag,
                                Unacked {
                                    queue: name.clone(),
                                    ready,
                                    consumer: None,
                                    at: now,
                                },
                            );
                        }
                        let get_ok = basic::GetOk {
                            delivery_tag: tag,
                            redelivered,
                            exchange: ss(&msg.exchange),
                            routing_key: ss(&msg.routing_key),
                            message_count: left,
                        };
                        send_content(c, id, AMQPClass::Basic(M::GetOk(get_ok)), &msg);
                    }
                    None => {
                        let c = self.conns.get_mut(&conn).expect("checked");
                        send(c, id, AMQPClass::Basic(M::GetEmpty(basic::GetEmpty {})));
                    }
                }
            }
            M::Ack(a) => self.settle_or_hold(conn, id, a.delivery_tag, a.multiple, None)?,
            M::Nack(n) => {
                self.settle_or_hold(conn, id, n.delivery_tag, n.multiple, Some(n.requeue))?
            }
            M::Reject(r) => {
                self.settle_or_hold(conn, id, r.delivery_tag, false, Some(r.requeue))?
            }
            M::Recover(_) | M::RecoverAsync(_) => {
                let c = self.conns.get_mut(&conn).expect("checked");
                let ch = c.channels.get_mut(&id).expect("open");
                let unacked = std::mem::take(&mut ch.unacked);
                for u in ch.consumers.values_mut() {
                    u.unacked = 0;
                }
                let is_sync = matches!(m, M::Recover(_));
                if is_sync {
                    send(c, id, AMQPClass::Basic(M::RecoverOk(basic::RecoverOk {})));
                }
                let vh = self.vhosts.get_mut(&vhost).expect("open vhost");
                for (_, u) in unacked.into_iter().rev() {
                    if let Some(q) = vh.queues.get_mut(&u.queue) {
                        q.requeue(u.ready);
                    }
                }
            }
            _ => {
                return Err((
                    code::COMMAND_INVALID,
                    "COMMAND_INVALID - not a client method".into(),
                ))
            }
        }
        Ok(())
    }

    /// basic.ack (`requeue` None), basic.nack and basic.reject.
    fn settle(
        &mut self,
        conn: ConnId,
        id: u16,
        tag: u64,
        multiple: bool,
        requeue: Option<bool>,
    ) -> Reply {
        let vhost = self.vhost_of(conn);
        let c = self.conns.get_mut(&conn).expect("checked");
        let ch = c.channels.get_mut(&id).expect("open");
        let tags: Vec<u64> = if multiple {
            let upto = if tag == 0 { u64::MAX } else { tag };
            ch.unacked.range(..=upto).map(|(t, _)| *t).collect()
        } else if ch.unacked.contains_key(&tag) {
            vec![tag]
        } else {
            Vec::new()
        };
        if tags.is_empty() && !(multiple && tag == 0) {
            return Err((
                code::PRECONDITION_FAILED,
                format!("PRECONDITION_FAILED - unknown delivery tag {tag}"),
            ));
        }
        let mut done = Vec::new();
        for t in tags {
            if let Some(u) = ch.unacked.remove(&t) {
                if let Some(tag) = &u.consumer {
                    if let Some(consumer) = ch.consumers.get_mut(tag) {
                        consumer.unacked = consumer.unacked.saturating_sub(1);
                    }
                }
                done.push(u);
            }
        }
        let vh = self.vhosts.get_mut(&vhost).expect("open vhost");
        let mut dead = Vec::new();
        // Requeued in reverse so that they keep their order at the front.
        for u in done.into_iter().rev() {
            let Some(q) = vh.queues.get_mut(&u.queue) else {
                continue;
            };
            match requeue {
                Some(true) => q.requeue(u.ready),
                _ => {
                    q.unacked = q.unacked.saturating_sub(1);
                    q.settle(&u.ready.source, u.ready.offset);
                    if requeue == Some(false) && q.def.args.dead_letter_exchange.is_some() {
                        dead.push((u.queue.clone(), u.ready, "rejected"));
                    }
                }
            }
        }
        for (queue, ready, reason) in dead.into_iter().rev() {
            self.dead_letter(&vhost, &queue, &ready, reason);
        }
        Ok(())
    }

    fn content_header(&mut self, conn: ConnId, id: u16, header: AMQPContentHeader, now: Instant) {
        let c = self.conns.get_mut(&conn).expect("present");
        let frame_max = c.frame_max;
        let Some(ch) = c.channels.get_mut(&id).filter(|ch| !ch.closing) else {
            if c.channels.get(&id).is_some_and(|ch| ch.closing) {
                return;
            }
            return self.close_connection(
                conn,
                code::CHANNEL_ERROR,
                "content on a channel that is not open",
                0,
                0,
            );
        };
        let Some(incoming) = ch.incoming.as_mut().filter(|i| i.header.is_none()) else {
            return self.close_connection(
                conn,
                code::UNEXPECTED_FRAME,
                "a content header without basic.publish",
                0,
                0,
            );
        };
        if header.class_id != 60 {
            return self.close_connection(
                conn,
                code::UNEXPECTED_FRAME,
                "a content header of another class",
                0,
                0,
            );
        }
        let _ = frame_max;
        // Bodies are bounded by the log's batch size limit.
        if header.body_size > 32 * 1024 * 1024 {
            let text = format!(
                "message of {} bytes is over the 32 MiB limit",
                header.body_size
            );
            ch.incoming = None;
            return self.close_channel(conn, id, code::CONTENT_TOO_LARGE, &text, (60, 40));
        }
        incoming.body.reserve(header.body_size as usize);
        let complete = header.body_size == 0;
        incoming.header = Some(header);
        if complete {
            self.published(conn, id, now);
        }
    }

    fn content_body(&mut self, conn: ConnId, id: u16, body: Vec<u8>, now: Instant) {
        let c = self.conns.get_mut(&conn).expect("present");
        let Some(ch) = c.channels.get_mut(&id).filter(|ch| !ch.closing) else {
            if c.channels.get(&id).is_some_and(|ch| ch.closing) {
                return;
            }
            return self.close_connection(
                conn,
                code::CHANNEL_ERROR,
                "content on a channel that is not open",
                0,
                0,
            );
        };
        let Some(incoming) = ch.incoming.as_mut() else {
            return self.close_connection(
                conn,
                code::UNEXPECTED_FRAME,
                "a content body without basic.publish",
                0,
                0,
            );
        };
        let Some(size) = incoming.header.as_ref().map(|h| h.body_size) else {
            return self.close_connection(
                conn,
                code::UNEXPECTED_FRAME,
                "a content body before its header",
                0,
                0,
            );
        };
        incoming.body.extend_from_slice(&body);
        match (incoming.body.len() as u64).cmp(&size) {
            std::cmp::Ordering::Less => {}
            std::cmp::Ordering::Equal => self.published(conn, id, now),
            std::cmp::Ordering::Greater => self.close_connection(
                conn,
                code::FRAME_ERROR,
                "content body longer than its header said",
                0,
                0,
            ),
        }
    }

    /// A whole message came in on `id`: it is checked, appended (or returned), and
    /// confirmed once durable.
    fn published(&mut self, conn: ConnId, id: u16, _now: Instant) {
        let vhost = self.vhost_of(conn);
        let user = self.user_of(conn);
        let c = self.conns.get_mut(&conn).expect("present");
        let ch = c.channels.get_mut(&id).expect("open");
        let Some(Incoming {
            publish,
            header: Some(header),
            body,
        }) = ch.incoming.take()
        else {
            return;
        };
        let seq = ch.confirm.then(|| {
            let s = ch.next_seq;
            ch.next_seq += 1;
            s
        });
        let exchange = publish.exchange.as_str().to_owned();
        let routing_key = publish.routing_key.as_str().to_owned();
        let mut properties = header.properties;
        if properties.reply_to().as_ref().map(ShortString::as_str) == Some(REPLY_TO) {
            // A request that wants a direct reply: its reply-to names this channel.
            let has_consumer = self
                .conns
                .get(&conn)
                .and_then(|c| c.channels.get(&id))
                .is_some_and(|ch| ch.reply_consumer.is_some());
            if !has_consumer {
                let text = "PRECONDITION_FAILED - fast reply consumer does not exist";
                return self.close_channel(conn, id, code::PRECONDITION_FAILED, text, (60, 40));
            }
            properties = properties.with_reply_to(ss(&format!("{REPLY_TO}.{conn}.{id}")));
        }
        if exchange.is_empty() {
            if let Some(to) = routing_key.strip_prefix(&format!("{REPLY_TO}.")) {
                // A direct reply: to the requester's channel, not through the log.
                self.direct_reply(to, &routing_key, properties, Bytes::from(body));
                if let Some(seq) = seq {
                    self.answer(conn, id, seq, true);
                }
                return;
            }
        }
        if let Some(claimed) = properties.user_id() {
            if user.as_deref() != Some(claimed.as_str()) {
                let text = format!(
                    "PRECONDITION_FAILED - user_id property set to '{claimed}' but authenticated user was '{}'",
                    user.unwrap_or_default()
                );
                return self.close_channel(conn, id, code::PRECONDITION_FAILED, &text, (60, 40));
            }
        }
        let acl_topic = if exchange == super::message::TOPIC_EXCHANGE {
            super::topology::routing_key_to_mqtt(&routing_key)
        } else {
            format!("amqp/exchange/{exchange}")
        };
        if !self.allowed(conn, AclAction::Publish, &acl_topic) {
            let text = format!(
                "ACCESS_REFUSED - write access to exchange '{exchange}' in vhost '{vhost}' refused"
            );
            return self.close_channel(conn, id, code::ACCESS_REFUSED, &text, (60, 40));
        }
        let vh = self.vhosts.get(&vhost).expect("open vhost");
        let headers = properties
            .headers()
            .as_ref()
            .map(HeaderValue::table)
            .unwrap_or_default();
        let reached: Vec<&String> = vh
            .queues
            .keys()
            .filter(|q| vh.topology.reaches(&exchange, &routing_key, &headers, q))
            .collect();
        let rejected = reached.iter().any(|q| {
            let q = &vh.queues[*q];
            q.def.args.overflow == Overflow::RejectPublish && q.full()
        });
        let body = Bytes::from(body);
        if publish.mandatory && reached.is_empty() && exchange != super::message::TOPIC_EXCHANGE {
            let c = self.conns.get_mut(&conn).expect("present");
            let ret = basic::Return {
                reply_code: code::NO_ROUTE,
                reply_text: ss("NO_ROUTE"),
                exchange: ss(&exchange),
                routing_key: ss(&routing_key),
            };
            let msg = Message {
                exchange,
                routing_key,
                properties,
                body,
                timestamp_ms: now_ms(),
            };
            send_content(
                c,
                id,
                AMQPClass::Basic(basic::AMQPMethod::Return(ret)),
                &msg,
            );
            if let Some(seq) = seq {
                self.answer(conn, id, seq, true);
            }
            return;
        }
        if rejected {
            if let Some(seq) = seq {
                self.answer(conn, id, seq, false);
            }
            return;
        }
        let routes = self.routes.get();
        let (stream, partition, record) = to_log(
            &routes,
            &exchange,
            &routing_key,
            &properties,
            body,
            now_ms(),
        );
        self.published_total += 1;
        let c = self.conns.get_mut(&conn).expect("present");
        if !c.publishes {
            c.publishes = true;
            if self.pressure && !c.paused {
                c.paused = true;
                if c.blocked_notify {
                    send(c, 0, blocked_frame());
                }
                self.out.push(Action::PauseReads { conn, paused: true });
            }
        }
        if let Some(tx) = c.channels.get_mut(&id).and_then(|ch| ch.tx.as_mut()) {
            tx.publishes.push((stream, partition, record));
            return;
        }
        let token = self.next_token;
        self.next_token += 1;
        self.appends.insert(
            token,
            Pending {
                conn,
                channel: id,
                seq,
                commit: None,
            },
        );
        self.out.push(Action::Append {
            token,
            stream,
            partition,
            record,
            dead_letter: false,
        });
    }

    /// Delivers a reply to the channel named by `to` (`<connection>.<channel>`) if its reply
    /// consumer is still there; dropped otherwise, as RabbitMQ does.
    fn direct_reply(
        &mut self,
        to: &str,
        routing_key: &str,
        properties: AMQPProperties,
        body: Bytes,
    ) {
        let Some((conn, id)) = to
            .split_once('.')
            .and_then(|(c, ch)| Some((c.parse::<ConnId>().ok()?, ch.parse::<u16>().ok()?)))
        else {
            return;
        };
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        let Some(ch) = c.channels.get_mut(&id) else {
            return;
        };
        let Some(tag) = ch.reply_consumer.clone() else {
            return;
        };
        ch.next_tag += 1;
        let deliver = basic::Deliver {
            consumer_tag: ss(&tag),
            delivery_tag: ch.next_tag,
            redelivered: false,
            exchange: ss(""),
            routing_key: ss(routing_key),
        };
        let msg = Message {
            exchange: String::new(),
            routing_key: routing_key.to_owned(),
            properties,
            body,
            timestamp_ms: now_ms(),
        };
        send_content(
            c,
            id,
            AMQPClass::Basic(basic::AMQPMethod::Deliver(deliver)),
            &msg,
        );
    }

    fn appended(&mut self, token: u64, ok: bool) {
        let Some(p) = self.appends.remove(&token) else {
            return;
        };
        if ok {
            // The record is in the log: the queues read it this round, before its confirm
            // goes out, so a confirmed message is in its queues' counts (RabbitMQ's confirm
            // means "routed and stored" too). The commit's own LogChanged may come later.
            self.behind = true;
        } else {
            tracing::warn!(conn = p.conn, "an AMQP publish could not be appended");
        }
        if let Some(seq) = p.seq {
            self.answer(p.conn, p.channel, seq, ok);
        }
        if let Some(id) = p.commit {
            let Some(entry) = self.commits.get_mut(&id) else {
                return;
            };
            entry.2 -= 1;
            entry.3 &= ok;
            if entry.2 == 0 {
                let (conn, channel, _, all_ok) = *entry;
                self.commits.remove(&id);
                self.committed(conn, channel, all_ok);
            }
        }
    }

    /// tx.select, tx.commit, tx.rollback. A commit appends what the channel published
    /// since the last one and answers commit-ok once all of it is durable; its
    /// acknowledgements take effect at the commit.
    fn tx_method(
        &mut self,
        conn: ConnId,
        id: u16,
        m: amq_protocol::protocol::tx::AMQPMethod,
    ) -> Reply {
        use amq_protocol::protocol::tx::{self, AMQPMethod as M};
        let c = self.conns.get_mut(&conn).expect("checked");
        let ch = c.channels.get_mut(&id).expect("open");
        match m {
            M::Select(_) => {
                if ch.confirm {
                    return Err((
                        code::PRECONDITION_FAILED,
                        "PRECONDITION_FAILED - cannot switch from confirm to tx mode".into(),
                    ));
                }
                ch.tx.get_or_insert_with(Tx::default);
                send(c, id, AMQPClass::Tx(M::SelectOk(tx::SelectOk {})));
            }
            M::Rollback(_) => {
                let Some(t) = ch.tx.as_mut() else {
                    return Err((
                        code::PRECONDITION_FAILED,
                        "PRECONDITION_FAILED - channel is not transactional".into(),
                    ));
                };
                *t = Tx::default();
                send(c, id, AMQPClass::Tx(M::RollbackOk(tx::RollbackOk {})));
            }
            M::Commit(_) => {
                let Some(t) = ch.tx.as_mut() else {
                    return Err((
                        code::PRECONDITION_FAILED,
                        "PRECONDITION_FAILED - channel is not transactional".into(),
                    ));
                };
                let Tx { publishes, settles } = std::mem::take(t);
                self.sync_positions |= !settles.is_empty();
                for (tag, multiple, requeue) in settles {
                    // Tags were checked when they came; one settled since is skipped.
                    let _ = self.settle(conn, id, tag, multiple, requeue);
                }
                if publishes.is_empty() {
                    self.committed(conn, id, true);
                    return Ok(());
                }
                let commit = self.next_token;
                self.next_token += 1;
                self.commits
                    .insert(commit, (conn, id, publishes.len(), true));
                for (stream, partition, record) in publishes {
                    let token = self.next_token;
                    self.next_token += 1;
                    self.appends.insert(
                        token,
                        Pending {
                            conn,
                            channel: id,
                            seq: None,
                            commit: Some(commit),
                        },
                    );
                    self.out.push(Action::Append {
                        token,
                        stream,
                        partition,
                        record,
                        dead_letter: false,
                    });
                }
            }
            _ => {
                return Err((
                    code::COMMAND_INVALID,
                    "COMMAND_INVALID - not a client method".into(),
                ))
            }
        }
        Ok(())
    }

    fn committed(&mut self, conn: ConnId, id: u16, ok: bool) {
        use amq_protocol::protocol::tx::{self, AMQPMethod as M};
        if !ok {
            let text = "INTERNAL_ERROR - the commit could not be stored";
            return self.close_connection(conn, 541, text, 90, 20);
        }
        if let Some(c) = self.conns.get_mut(&conn) {
            if c.channels.contains_key(&id) {
                send(c, id, AMQPClass::Tx(M::CommitOk(tx::CommitOk {})));
            }
        }
    }

    /// An acknowledgement now, or at the commit on a transactional channel.
    fn settle_or_hold(
        &mut self,
        conn: ConnId,
        id: u16,
        tag: u64,
        multiple: bool,
        requeue: Option<bool>,
    ) -> Reply {
        let c = self.conns.get_mut(&conn).expect("checked");
        let ch = c.channels.get_mut(&id).expect("open");
        if let Some(tx) = ch.tx.as_mut() {
            let known = ch.unacked.contains_key(&tag)
                || (multiple && (tag == 0 || ch.unacked.range(..=tag).next().is_some()));
            if !known {
                return Err((
                    code::PRECONDITION_FAILED,
                    format!("PRECONDITION_FAILED - unknown delivery tag {tag}"),
                ));
            }
            tx.settles.push((tag, multiple, requeue));
            return Ok(());
        }
        self.unsynced.insert(conn);
        self.settle(conn, id, tag, multiple, requeue)
    }

    /// Publish `seq` on a confirm channel is stored (`ok`) or not: confirms go out in
    /// order, consecutive acks as one `multiple`.
    fn answer(&mut self, conn: ConnId, id: u16, seq: u64, ok: bool) {
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        let Some(ch) = c.channels.get_mut(&id) else {
            return;
        };
        ch.answered.insert(seq, ok);
        let mut acked_to = None;
        let mut frames = Vec::new();
        while let Some(ok) = ch.answered.remove(&(ch.confirmed_to + 1)) {
            ch.confirmed_to += 1;
            if ok {
                acked_to = Some(ch.confirmed_to);
            } else {
                if let Some(to) = acked_to.take() {
                    frames.push(AMQPClass::Basic(basic::AMQPMethod::Ack(basic::Ack {
                        delivery_tag: to,
                        multiple: true,
                    })));
                }
                frames.push(AMQPClass::Basic(basic::AMQPMethod::Nack(basic::Nack {
                    delivery_tag: ch.confirmed_to,
                    multiple: false,
                    requeue: false,
                })));
            }
        }
        if let Some(to) = acked_to {
            frames.push(AMQPClass::Basic(basic::AMQPMethod::Ack(basic::Ack {
                delivery_tag: to,
                multiple: true,
            })));
        }
        for f in frames {
            send(c, id, f);
        }
    }

    // ---- delivery ----

    /// Reads what is new in the log and gives each queue the records that reach it.
    fn follow(&mut self) {
        self.behind = false;
        let streams = self.log.streams();
        for s in &streams {
            if s.name == DOWNLINK_STREAM {
                continue;
            }
            for (p, info) in s.partitions.iter().enumerate() {
                let source: Arc<SourceKey> = Arc::new((s.name.clone(), p as u32));
                let end = info.offsets.high_watermark;
                let start = info.offsets.log_start;
                let from = self
                    .vhosts
                    .values()
                    .flat_map(|vh| vh.queues.values())
                    .map(|q| q.read_to(&source))
                    .min();
                let Some(mut at) = from else {
                    return;
                };
                at = at.max(start);
                // A bounded amount per pass: other work goes on between.
                let mut budget = 4 * READ_BUDGET_BYTES;
                while at < end && budget > 0 {
                    let Ok(read) = self.log.read(&s.name, p as u32, at, READ_BUDGET_BYTES) else {
                        break;
                    };
                    if read.batches.is_empty() {
                        break;
                    }
                    budget = budget.saturating_sub(read.batches.len());
                    let now = now_ms();
                    for batch in read.iter() {
                        let Ok((h, whole)) = batch else {
                            break;
                        };
                        let Ok(plain) = uncompressed(whole, 64 * 1024 * 1024) else {
                            at = h.last_offset() + 1;
                            continue;
                        };
                        let Ok(recs) = records(&plain) else {
                            at = h.last_offset() + 1;
                            continue;
                        };
                        for rec in recs.flatten() {
                            if rec.offset < at {
                                continue;
                            }
                            let msg = from_log(&rec, now);
                            let size = rec.value.map_or(0, <[u8]>::len) as u64;
                            self.offer(&source, rec.offset, msg.as_ref(), size, rec.timestamp);
                        }
                        at = h.last_offset() + 1;
                        // Queues behind `at` that saw nothing here move on too.
                        self.advance(&source, at);
                    }
                }
                if at >= end {
                    self.advance(&source, end);
                } else if budget == 0 {
                    // Another pass next round (a failed read waits for the next commit).
                    self.behind = true;
                }
            }
        }
        let _ = streams;
    }

    /// One record of `source` to every queue that has not seen it.
    fn offer(
        &mut self,
        source: &Arc<SourceKey>,
        offset: i64,
        msg: Option<&Message>,
        size: u64,
        ts: i64,
    ) {
        let mut dead = Vec::new();
        let headers = msg.map(Message::headers).unwrap_or_default();
        for (vname, vh) in self.vhosts.iter_mut() {
            let VHost { topology, queues } = vh;
            for (name, q) in queues.iter_mut() {
                if q.read_to(source) > offset {
                    continue;
                }
                let reached = msg
                    .is_some_and(|m| topology.reaches(&m.exchange, &m.routing_key, &headers, name));
                let dropped = q.matched(source, offset, reached.then_some((size, ts)));
                if q.def.args.dead_letter_exchange.is_some() {
                    dead.extend(
                        dropped
                            .into_iter()
                            .map(|r| (vname.clone(), name.clone(), r)),
                    );
                }
            }
        }
        for (vhost, queue, r) in dead {
            self.dead_letter(&vhost, &queue, &r, "maxlen");
        }
    }

    /// Queues that read `source` below `to` have seen everything below it.
    fn advance(&mut self, source: &SourceKey, to: i64) {
        for vh in self.vhosts.values_mut() {
            for q in vh.queues.values_mut() {
                if q.read_to(source) < to {
                    q.source_mut(source).read_to = to;
                }
            }
        }
    }

    /// The next live message of a queue (expired ones are dropped or dead-lettered on the
    /// way), fetched from the log.
    fn next_message(&mut self, vhost: &str, name: &str, _now: Instant) -> Option<(Ready, Message)> {
        loop {
            let vh = self.vhosts.get_mut(vhost)?;
            let q = vh.queues.get_mut(name)?;
            let ready = q.pop_ready()?;
            let ttl = q.def.args.message_ttl_ms;
            let now = now_ms();
            let fetched = self.fetch(&ready.source, ready.offset, now);
            let vh = self.vhosts.get_mut(vhost)?;
            let q = vh.queues.get_mut(name)?;
            let Some(msg) = fetched else {
                // Gone from the log (retention): settled.
                q.settle(&ready.source, ready.offset);
                continue;
            };
            let per_message = msg
                .properties
                .expiration()
                .as_ref()
                .and_then(|e| e.as_str().parse::<i64>().ok());
            let limit = match (ttl, per_message) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            if limit.is_some_and(|l| now - msg.timestamp_ms >= l) {
                q.settle(&ready.source, ready.offset);
                if q.def.args.dead_letter_exchange.is_some() {
                    self.dead_letter(vhost, name, &ready, "expired");
                }
                continue;
            }
            return Some((ready, msg));
        }
    }

    /// The message at `offset` of `source`, from the log (the last batch read per
    /// partition is kept, so a backlog is read once).
    fn fetch(&mut self, source: &SourceKey, offset: i64, now: i64) -> Option<Message> {
        if let Some(hit) = self.cache.get_mut(source).and_then(|c| c.remove(&offset)) {
            return hit;
        }
        // One read from `offset` on, decoded once: the deliveries that follow take their
        // messages from it in turn.
        let read = self
            .log
            .read(&source.0, source.1, offset, READ_BUDGET_BYTES)
            .ok()?;
        let mut decoded = BTreeMap::new();
        for b in read.iter() {
            let Ok((_, whole)) = b else {
                break;
            };
            let Ok(plain) = uncompressed(whole, 64 * 1024 * 1024) else {
                continue;
            };
            let Ok(recs) = records(&plain) else {
                continue;
            };
            for rec in recs.flatten() {
                if rec.offset >= offset {
                    decoded.insert(rec.offset, from_log(&rec, now));
                }
            }
        }
        let found = decoded.remove(&offset).flatten();
        self.cache.insert(source.clone(), decoded);
        found
    }

    /// Delivers to every consumer with room.
    fn pump(&mut self, now: Instant) {
        self.more = false;
        let names: Vec<(String, String)> = self
            .vhosts
            .iter()
            .flat_map(|(v, vh)| {
                vh.queues
                    .iter()
                    .filter(|(_, q)| !q.consumers.is_empty() && !q.ready.is_empty())
                    .map(move |(n, _)| (v.clone(), n.clone()))
            })
            .collect();
        for (vhost, name) in names {
            self.pump_queue(&vhost, &name, now);
        }
    }

    fn pump_queue(&mut self, vhost: &str, name: &str, now: Instant) {
        loop {
            let Some(q) = self.vhosts.get(vhost).and_then(|vh| vh.queues.get(name)) else {
                return;
            };
            if q.ready.is_empty() || q.consumers.is_empty() {
                return;
            }
            // The next consumer in turn with room.
            let n = q.consumers.len();
            let start = q.next_consumer % n;
            let mut capped = false;
            let chosen = (0..n).map(|i| (start + i) % n).find(|&i| {
                let k = &q.consumers[i];
                let over = self.blocked.contains(&k.conn)
                    || self
                        .conns
                        .get(&k.conn)
                        .is_some_and(|c| c.out.len() >= ROUND_BYTES);
                if over {
                    capped = true;
                    return false;
                }
                self.conns
                    .get(&k.conn)
                    .and_then(|c| c.channels.get(&k.channel))
                    .is_some_and(|ch| {
                        let Some(consumer) = ch.consumers.get(&k.tag) else {
                            return false;
                        };
                        consumer.no_ack
                            || ((consumer.prefetch == 0
                                || consumer.unacked < u32::from(consumer.prefetch))
                                && (ch.global_prefetch == 0
                                    || ch.unacked.len() < usize::from(ch.global_prefetch)))
                    })
            });
            let Some(i) = chosen else {
                self.more |= capped;
                return;
            };
            let key = q.consumers[i].clone();
            let Some((ready, msg)) = self.next_message(vhost, name, now) else {
                return;
            };
            let vh = self.vhosts.get_mut(vhost).expect("present");
            let q = vh.queues.get_mut(name).expect("present");
            q.next_consumer = i + 1;
            q.delivered(&ready);
            let c = self.conns.get_mut(&key.conn).expect("checked");
            let ch = c.channels.get_mut(&key.channel).expect("checked");
            let consumer = ch.consumers.get_mut(&key.tag).expect("checked");
            ch.next_tag += 1;
            let tag = ch.next_tag;
            let redelivered = ready.redelivered;
            if consumer.no_ack {
                q.unacked -= 1;
                q.settle(&ready.source, ready.offset);
            } else {
                consumer.unacked += 1;
                ch.unacked.insert(
                    tag,
                    Unacked {
                        queue: name.to_owned(),
                        ready,
                        consumer: Some(key.tag.clone()),
                        at: now,
                    },
                );
            }
            let deliver = basic::Deliver {
                consumer_tag: ss(&key.tag),
                delivery_tag: tag,
                redelivered,
                exchange: ss(&msg.exchange),
                routing_key: ss(&msg.routing_key),
            };
            send_content(
                c,
                key.channel,
                AMQPClass::Basic(basic::AMQPMethod::Deliver(deliver)),
                &msg,
            );
        }
    }

    /// Republishes a dropped message to its queue's dead-letter exchange, with `x-death`.
    fn dead_letter(&mut self, vhost: &str, queue: &str, r: &Ready, reason: &str) {
        let Some(q) = self.vhosts.get(vhost).and_then(|vh| vh.queues.get(queue)) else {
            return;
        };
        let (Some(dlx), dlrk) = (
            q.def.args.dead_letter_exchange.clone(),
            q.def.args.dead_letter_routing_key.clone(),
        ) else {
            return;
        };
        let Some(msg) = self.fetch(&r.source, r.offset, now_ms()) else {
            return;
        };
        let mut headers = msg.properties.headers().clone().unwrap_or_default();
        let mut death = FieldTable::default();
        death.insert(ss("queue"), AMQPValue::LongString(queue.into()));
        death.insert(ss("reason"), AMQPValue::LongString(reason.into()));
        death.insert(
            ss("exchange"),
            AMQPValue::LongString(msg.exchange.as_str().into()),
        );
        death.insert(
            ss("routing-keys"),
            AMQPValue::FieldArray(
                vec![AMQPValue::LongString(msg.routing_key.as_str().into())].into(),
            ),
        );
        death.insert(ss("count"), AMQPValue::LongLongInt(1));
        death.insert(ss("time"), AMQPValue::Timestamp((now_ms() / 1000) as u64));
        let mut deaths = match headers.inner().get("x-death") {
            Some(AMQPValue::FieldArray(a)) => a.as_slice().to_vec(),
            _ => Vec::new(),
        };
        deaths.insert(0, AMQPValue::FieldTable(death));
        headers.insert(ss("x-death"), AMQPValue::FieldArray(deaths.into()));
        if reason == "expired" {
            headers.insert(
                ss("x-first-death-reason"),
                AMQPValue::LongString("expired".into()),
            );
        }
        let properties = msg.properties.clone().with_headers(headers);
        let properties = if reason == "expired" {
            strip_expiration(properties)
        } else {
            properties
        };
        let routing_key = dlrk.unwrap_or_else(|| msg.routing_key.clone());
        let exchange = if dlx.is_empty() { String::new() } else { dlx };
        let routes = self.routes.get();
        let (stream, partition, record) = to_log(
            &routes,
            &exchange,
            &routing_key,
            &properties,
            msg.body.clone(),
            now_ms(),
        );
        let token = self.next_token;
        self.next_token += 1;
        self.out.push(Action::Append {
            token,
            stream,
            partition,
            record,
            dead_letter: true,
        });
    }

    /// Pressure on or off: connections that publish are paused (and told with
    /// connection.blocked, if they take it) until it is off again (connection.unblocked).
    /// Consumers on other connections go on, so the backlog drains.
    fn pressure(&mut self, on: bool) {
        if self.pressure == on {
            return;
        }
        self.pressure = on;
        for (id, c) in self.conns.iter_mut() {
            if !c.publishes || c.paused == on || c.stage != Stage::Ready {
                continue;
            }
            c.paused = on;
            if c.blocked_notify {
                let m = if on {
                    blocked_frame()
                } else {
                    AMQPClass::Connection(connection::AMQPMethod::Unblocked(
                        connection::Unblocked {},
                    ))
                };
                send(c, 0, m);
            }
            self.out.push(Action::PauseReads {
                conn: *id,
                paused: on,
            });
        }
    }

    /// What the admin API shows: connections, queues, exchanges, bindings.
    pub(crate) fn overview(&self) -> super::Overview {
        use super::{BindingInfo, ConnectionInfo, ExchangeInfo, Overview, QueueInfo};
        let mut o = Overview {
            published_total: self.published_total,
            ..Overview::default()
        };
        let mut conns: Vec<_> = self.conns.iter().collect();
        conns.sort_by_key(|(id, _)| **id);
        for (id, c) in conns {
            o.connections.push(ConnectionInfo {
                id: *id,
                user: c.user.clone(),
                vhost: c.vhost.clone(),
                channels: c.channels.len(),
                consumers: c.channels.values().map(|ch| ch.consumers.len()).sum(),
                unacked: c.channels.values().map(|ch| ch.unacked.len()).sum(),
            });
        }
        for (v, vh) in &self.vhosts {
            for (n, q) in &vh.queues {
                o.queues.push(QueueInfo {
                    vhost: v.clone(),
                    name: n.clone(),
                    durable: q.def.durable,
                    exclusive: q.def.exclusive,
                    auto_delete: q.def.auto_delete,
                    ready: q.ready.len() as u64,
                    ready_bytes: q.ready_bytes,
                    unacked: q.unacked as u64,
                    consumers: q.consumers.len() as u64,
                    delivered_total: q.delivered_total,
                    settled_total: q.settled_total,
                });
            }
            for (n, x) in &vh.topology.exchanges {
                o.exchanges.push(ExchangeInfo {
                    vhost: v.clone(),
                    name: n.clone(),
                    kind: x.kind.name().to_owned(),
                    durable: x.durable,
                    auto_delete: x.auto_delete,
                    internal: x.internal,
                });
            }
            for b in &vh.topology.bindings {
                let (kind, name) = match &b.destination {
                    Destination::Queue(q) => ("queue", q.clone()),
                    Destination::Exchange(x) => ("exchange", x.clone()),
                };
                o.bindings.push(BindingInfo {
                    vhost: v.clone(),
                    source: b.source.clone(),
                    destination: name,
                    destination_kind: kind.to_owned(),
                    routing_key: b.key.clone(),
                });
            }
        }
        o
    }

    fn tick(&mut self, now: Instant) {
        // A handshake not done in time ends its connection (a peer that opened a socket
        // and went quiet holds nothing for long).
        let limit = self.settings.handshake_timeout;
        let slow: Vec<ConnId> = self
            .conns
            .iter()
            .filter(|(_, c)| {
                matches!(c.stage, Stage::Start | Stage::Tune | Stage::Open)
                    && now.duration_since(c.since) > limit
            })
            .map(|(id, _)| *id)
            .collect();
        for conn in slow {
            self.close_connection(
                conn,
                code::CONNECTION_FORCED,
                "CONNECTION_FORCED - handshake timed out",
                0,
                0,
            );
        }
        // Deliveries unacknowledged past the timeout close their channel (RabbitMQ's
        // consumer_timeout).
        let timeout = self.settings.ack_timeout;
        let mut late = Vec::new();
        for (conn, c) in &self.conns {
            for (id, ch) in &c.channels {
                if ch
                    .unacked
                    .values()
                    .any(|u| now.duration_since(u.at) > timeout)
                {
                    late.push((*conn, *id));
                }
            }
        }
        for (conn, id) in late {
            let text =
                format!("PRECONDITION_FAILED - delivery acknowledgement on channel {id} timed out");
            self.close_channel(conn, id, code::PRECONDITION_FAILED, &text, (0, 0));
        }
        // Unused queues past x-expires go.
        let t = now_ms();
        let mut expired = Vec::new();
        for (v, vh) in &self.vhosts {
            for (n, q) in &vh.queues {
                if q.consumers.is_empty()
                    && q.def
                        .args
                        .expires_ms
                        .is_some_and(|e| t - q.used_ms > e as i64)
                {
                    expired.push((v.clone(), n.clone()));
                }
            }
        }
        for (v, n) in expired {
            self.delete_queue(&v, &n);
        }
        // Expired messages at the head of queues without consumers.
        let ttl_queues: Vec<(String, String)> = self
            .vhosts
            .iter()
            .flat_map(|(v, vh)| {
                vh.queues
                    .iter()
                    .filter(|(_, q)| {
                        q.def.args.message_ttl_ms.is_some()
                            && q.consumers.is_empty()
                            && !q.ready.is_empty()
                    })
                    .map(move |(n, _)| (v.clone(), n.clone()))
            })
            .collect();
        for (v, n) in ttl_queues {
            let ttl = self.vhosts[&v].queues[&n]
                .def
                .args
                .message_ttl_ms
                .unwrap_or(i64::MAX);
            while let Some(q) = self.vhosts.get_mut(&v).and_then(|vh| vh.queues.get_mut(&n)) {
                let Some(head) = q.ready.front().cloned() else {
                    break;
                };
                if t - head.timestamp_ms < ttl {
                    break;
                }
                q.pop_ready();
                q.settle(&head.source, head.offset);
                if q.def.args.dead_letter_exchange.is_some() {
                    self.dead_letter(&v, &n, &head, "expired");
                }
            }
        }
    }

    /// Durable queues whose position moved: their cursor to the metadata.
    fn persist(&mut self) {
        let sync = std::mem::take(&mut self.sync_positions);
        if std::mem::take(&mut self.barrier) {
            self.out.push(Action::Barrier);
        }
        for (v, vh) in self.vhosts.iter_mut() {
            for (n, q) in vh.queues.iter_mut() {
                if q.dirty && q.def.durable {
                    let put = Command::AmqpPut {
                        key: key("c", v, n),
                        value: serde_json::to_vec(&q.cursor_state()).unwrap_or_default(),
                    };
                    self.out.push(if sync {
                        Action::Meta(put)
                    } else {
                        Action::Position(put)
                    });
                }
                q.dirty = false;
            }
        }
    }
}

fn strip_expiration(p: AMQPProperties) -> AMQPProperties {
    // AMQPProperties has no setter to clear a field: rebuilt without it.
    let mut out = AMQPProperties::default();
    if let Some(v) = p.content_type() {
        out = out.with_content_type(v.clone());
    }
    if let Some(v) = p.content_encoding() {
        out = out.with_content_encoding(v.clone());
    }
    if let Some(v) = p.headers() {
        out = out.with_headers(v.clone());
    }
    if let Some(v) = p.delivery_mode() {
        out = out.with_delivery_mode(*v);
    }
    if let Some(v) = p.priority() {
        out = out.with_priority(*v);
    }
    if let Some(v) = p.correlation_id() {
        out = out.with_correlation_id(v.clone());
    }
    if let Some(v) = p.reply_to() {
        out = out.with_reply_to(v.clone());
    }
    if let Some(v) = p.message_id() {
        out = out.with_message_id(v.clone());
    }
    if let Some(v) = p.timestamp() {
        out = out.with_timestamp(*v);
    }
    if let Some(v) = p.kind() {
        out = out.with_type(v.clone());
    }
    if let Some(v) = p.user_id() {
        out = out.with_user_id(v.clone());
    }
    if let Some(v) = p.app_id() {
        out = out.with_app_id(v.clone());
    }
    out
}

fn blocked_frame() -> AMQPClass {
    AMQPClass::Connection(connection::AMQPMethod::Blocked(connection::Blocked {
        reason: ss("low on resources: appends waiting for the log are over their budget"),
    }))
}

fn locked(name: &str, vhost: &str) -> (u16, String) {
    (
        code::RESOURCE_LOCKED,
        format!("RESOURCE_LOCKED - cannot obtain exclusive access to locked queue '{name}' in vhost '{vhost}'"),
    )
}

fn send(c: &mut Conn, channel: u16, m: AMQPClass) {
    put_frame(&mut c.out, &AMQPFrame::Method(channel, m));
}

/// A method with content: the method, the content header, the body in frames that fit the
/// connection's frame_max.
fn send_content(c: &mut Conn, channel: u16, m: AMQPClass, msg: &Message) {
    send(c, channel, m);
    put_frame(
        &mut c.out,
        &AMQPFrame::Header(
            channel,
            AMQPContentHeader {
                class_id: 60,
                body_size: msg.body.len() as u64,
                properties: msg.properties.clone(),
            },
        ),
    );
    let chunk = (c.frame_max as usize).saturating_sub(FRAME_OVERHEAD).max(1);
    for part in msg.body.chunks(chunk) {
        put_frame(&mut c.out, &AMQPFrame::Body(channel, part.to_vec()));
    }
}

/// SASL PLAIN: `authzid \0 user \0 password`.
fn plain(response: &[u8]) -> Option<(String, String)> {
    let mut parts = response.split(|b| *b == 0);
    let _authzid = parts.next()?;
    let user = String::from_utf8(parts.next()?.to_vec()).ok()?;
    let password = String::from_utf8(parts.next()?.to_vec()).ok()?;
    Some((user, password))
}

/// AMQPLAIN: a field table (without its length) with LOGIN and PASSWORD.
fn amqplain(response: &[u8]) -> Option<(String, String)> {
    let mut framed = (response.len() as u32).to_be_bytes().to_vec();
    framed.extend_from_slice(response);
    let (_, table) = amq_protocol::types::parsing::parse_field_table(&framed[..]).ok()?;
    let get = |k: &str| match table.inner().get(k)? {
        AMQPValue::LongString(s) => String::from_utf8(s.as_bytes().to_vec()).ok(),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    };
    Some((get("LOGIN")?, get("PASSWORD")?))
}

#[cfg(test)]
mod tests;
