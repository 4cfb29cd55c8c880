//! The AMQP 0-9-1 front: RabbitMQ clients (pika, lapin, kombu, amqplib…) publish to and
//! consume from the cloud's log. See `docs/amqp.md` for what is served, what a publish
//! becomes in the log and what is refused.
//!
//! ```text
//! connection tasks ──frames──▶ broker thread (broker.rs, sans-IO core) ──bytes──▶ writers
//!                               │  reads the log (follow new records, fetch deliveries)
//!                               ├─ appends publishes, confirms when durable
//!                               └─ queue state and topology ──▶ state writer thread (redb)
//! ```
//!
//! - `codec`: frames in and out (amq-protocol parses and writes methods).
//! - `broker`: connections, channels, exchanges, queues, consumers; publish and deliver.
//! - `queue`: a queue as a cursor over the log, never a copy of its messages.
//! - `topology`: exchanges, bindings and routing.
//! - `state_writer`: the thread that commits queue positions and topology to the metadata.
//! - `message`: what a publish becomes in the log, and a record to an AMQP consumer.

mod broker;
mod codec;
#[doc(hidden)]
pub mod fuzzing;
mod message;
mod queue;
mod state_writer;
mod topology;

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use ferry_edge::auth::Auth;
use futures_util::stream::{FuturesUnordered, StreamExt};
use futures_util::FutureExt;
use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tracing::{debug, error, info, warn};

use crate::log::{AppendData, Storage};
use crate::meta::{Command, Meta};
use crate::routes::RouteTable;
use broker::{Action, Broker, Input, Settings};
pub use message::AMQP_STREAM;
use state_writer::StateWriter;

/// A connection, as the broker knows it.
pub(crate) type ConnId = u64;

/// `[amqp]`: the AMQP listener. Off unless present.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AmqpConfig {
    /// Where AMQP clients connect. Default `127.0.0.1:5672`.
    pub listen: SocketAddr,
    /// Virtual hosts. Default `["/"]`.
    pub vhosts: Vec<String>,
    /// The largest frame, header and end included, either side may send. Default 131,072
    /// (RabbitMQ's); at least 4,096.
    pub frame_max: u32,
    /// Channels per connection. Default 2,047 (RabbitMQ's).
    pub channel_max: u16,
    /// The heartbeat the server proposes, in seconds (0: none); a peer silent for two
    /// intervals is closed. Default 60.
    pub heartbeat_secs: u16,
    /// A delivery unacknowledged this long closes its channel with PRECONDITION_FAILED
    /// (RabbitMQ's `consumer_timeout`). Default 1,800 s (30 minutes).
    pub ack_timeout_secs: u64,
    /// Users and ACLs: Mosquitto-format files, as for MQTT. Default: those of `[auth]`.
    pub password_file: Option<PathBuf>,
    pub acl_file: Option<PathBuf>,
    /// Bytes of publishes waiting for the log above which connections that publish are
    /// blocked (connection.blocked, and their reads paused) until half of it is left.
    /// Default 64 MiB.
    pub max_appending_bytes: usize,
    /// `[amqp.tls]`: AMQP over TLS (`amqps://`, usually port 5671) with these PEM files, as
    /// `[server.tls]` (`client_ca_file` makes clients present a certificate). Default none.
    pub tls: Option<ferry_edge::config::TlsConfig>,
}

impl Default for AmqpConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 5672)),
            vhosts: vec!["/".into()],
            frame_max: 131_072,
            channel_max: 2047,
            heartbeat_secs: 60,
            ack_timeout_secs: 1800,
            password_file: None,
            acl_file: None,
            max_appending_bytes: 64 << 20,
            tls: None,
        }
    }
}

/// Connections opened and connections with frames, not yet taken by the broker thread (at
/// most one entry per connection with frames): a full queue makes readers wait.
const INPUT_QUEUE: usize = 4096;
/// Frames read from one connection and not yet taken by the broker thread; a full lane makes
/// its reader wait (TCP pushes back to the client).
const LANE: usize = 256;
/// Frames the broker thread takes from one connection before the next one's turn, so a
/// consumer's acknowledgements do not queue behind other clients' publishes.
const TURN: usize = 32;
/// Frames taken in one round (then the round's actions go out).
const ROUND_FRAMES: usize = 1024;
/// Writes queued for one connection; the broker delivers no more to a connection whose
/// queue is full until it drains.
const WRITE_QUEUE: usize = 64;
/// A TLS handshake, a protocol header or an AMQP handshake (up to connection.open) that
/// takes longer ends its connection (RabbitMQ's `handshake_timeout`).
const HANDSHAKE: Duration = Duration::from_secs(10);
/// A write the peer takes nothing of for this long ends its connection (RabbitMQ's
/// `send_timeout`), and so does a close whose bytes cannot be queued for its writer.
const SEND_TIMEOUT: Duration = Duration::from_secs(15);
/// After the server's connection.close went out, how long the peer's close-ok (or its
/// closing the socket) is waited for while what it sends is read and dropped.
const CLOSE_GRACE: Duration = Duration::from_secs(5);
/// Bytes waiting for one connection's writer (it had no room) before the connection is
/// taken for one that does not read and is closed: far more than a round's replies.
const MAX_UNSENT_BYTES: usize = 16 << 20;
/// How often the broker's timers run (acknowledgement timeout, TTL, x-expires).
const TICK: Duration = Duration::from_secs(1);

/// What the connection tasks send the broker thread; their frames go in their own lane.
enum Event {
    Open {
        conn: ConnId,
        writer: mpsc::Sender<Out>,
        heartbeat: Arc<AtomicU16>,
        paused: tokio::sync::watch::Sender<bool>,
        lane: Lane,
    },
    /// The connection's lane has inputs (sent once until the broker took its turn).
    Ready(ConnId),
}

/// One connection's inputs, in order, for the broker thread. `queued` is set while the
/// connection is in the broker's turns or a [`Event::Ready`] for it is on its way.
struct Lane {
    inputs: mpsc::Receiver<Input>,
    queued: Arc<AtomicBool>,
}

/// The reader's end of its lane.
struct LaneSender {
    conn: ConnId,
    inputs: mpsc::Sender<Input>,
    queued: Arc<AtomicBool>,
    events: mpsc::Sender<Event>,
}

impl LaneSender {
    /// Queues `input`, and tells the broker thread if the lane was idle. Err: the broker
    /// thread is gone.
    async fn send(&self, input: Input) -> Result<(), ()> {
        self.inputs.send(input).await.map_err(|_| ())?;
        // Against the broker's store-then-look (see `run_broker`): one of the two sees the
        // other, so a lane with inputs is never left out of the turns.
        std::sync::atomic::fence(Ordering::SeqCst);
        if !self.queued.swap(true, Ordering::SeqCst) {
            self.events
                .send(Event::Ready(self.conn))
                .await
                .map_err(|_| ())?;
        }
        Ok(())
    }
}

/// Appends of one round to one partition: (stream, partition), their tokens, records.
type Grouped = ((String, u32), Vec<u64>, Vec<crate::log::NewRecord>);

/// An append done: its tokens, whether it is durable, its bytes, its round.
type Done = (Vec<u64>, bool, usize, u64);

/// The broker thread's rounds with appends not yet done: round → (appends left, whether
/// any is a dead-lettered copy).
#[derive(Default)]
struct OpenRounds(BTreeMap<u64, (usize, bool)>);

impl OpenRounds {
    /// An append of `round` started.
    fn started(&mut self, round: u64, dead_letters: bool) {
        let e = self.0.entry(round).or_default();
        e.0 += 1;
        e.1 |= dead_letters;
    }

    /// An append finished: tells the broker, and returns its bytes.
    fn done(&mut self, done: &Done, broker: &mut Broker, now: Instant) -> usize {
        let (tokens, ok, bytes, of) = done;
        if let Some(e) = self.0.get_mut(of) {
            e.0 -= 1;
            if e.0 == 0 {
                self.0.remove(of);
            }
        }
        for token in tokens {
            broker.handle(
                Input::Appended {
                    token: *token,
                    ok: *ok,
                },
                now,
            );
        }
        *bytes
    }

    /// The oldest round whose dead-lettered copies are not all durable (`u64::MAX`: none):
    /// positions from it on wait.
    fn oldest_dead_letters(&self) -> u64 {
        self.0
            .iter()
            .find(|(_, (_, dl))| *dl)
            .map_or(u64::MAX, |(r, _)| *r)
    }
}

/// What the broker thread sends a connection's writer.
#[derive(Debug)]
enum Out {
    Bytes(Vec<u8>),
    /// The last bytes (the connection.close, and what preceded it): written, then the
    /// socket is shut for writing.
    Last(Vec<u8>),
}

/// How a connection's writer ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WriterEnd {
    /// It wrote its last bytes (or the broker let it go) and shut the socket for writing.
    Closed,
    /// A write failed or the peer took nothing for [`SEND_TIMEOUT`].
    Failed,
}

/// What the admin API shows of the AMQP front (a snapshot the broker thread refreshes about
/// once a second).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Overview {
    pub connections: Vec<ConnectionInfo>,
    pub queues: Vec<QueueInfo>,
    pub exchanges: Vec<ExchangeInfo>,
    pub bindings: Vec<BindingInfo>,
    /// Messages published since the node started.
    pub published_total: u64,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct ConnectionInfo {
    pub id: u64,
    pub user: Option<String>,
    pub vhost: String,
    pub channels: usize,
    pub consumers: usize,
    /// Deliveries waiting for an acknowledgement on its channels.
    pub unacked: usize,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct QueueInfo {
    pub vhost: String,
    pub name: String,
    pub durable: bool,
    pub exclusive: bool,
    pub auto_delete: bool,
    /// Messages waiting for a consumer, and their bytes.
    pub ready: u64,
    pub ready_bytes: u64,
    pub unacked: u64,
    pub consumers: u64,
    /// Deliveries and settlements (acks, drops, expiries) since the node started: their
    /// rates are the queue's delivery and acknowledgement rates.
    pub delivered_total: u64,
    pub settled_total: u64,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct ExchangeInfo {
    pub vhost: String,
    pub name: String,
    pub kind: String,
    pub durable: bool,
    pub auto_delete: bool,
    pub internal: bool,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct BindingInfo {
    pub vhost: String,
    pub source: String,
    pub destination: String,
    /// `queue` or `exchange`.
    pub destination_kind: String,
    pub routing_key: String,
}

/// A running AMQP front.
#[derive(Debug, Clone)]
pub struct AmqpFront {
    pub addr: SocketAddr,
    /// The `[amqp.tls]` listeners' addresses.
    pub tls_addrs: Vec<SocketAddr>,
    overview: Arc<std::sync::Mutex<Overview>>,
}

impl AmqpFront {
    /// The latest snapshot (at most about a second old).
    pub fn overview(&self) -> Overview {
        self.overview
            .lock()
            .map(|o| o.clone())
            .unwrap_or_else(|e| e.into_inner().clone())
    }
}

/// Why the AMQP front could not start.
#[derive(Debug, thiserror::Error)]
pub enum AmqpError {
    #[error("AMQP listener: {0}")]
    Io(#[from] std::io::Error),
    #[error("AMQP users: {0}")]
    Auth(#[from] ferry_edge::auth::AuthError),
    #[error("AMQP state: {0}")]
    Meta(#[from] crate::meta::MetaError),
    #[error("[amqp] frame_max must be at least 4096")]
    FrameMax,
    #[error(
        "[amqp] a listener on {0} needs a password_file: AMQP clients would get in without one"
    )]
    Open(SocketAddr),
    #[error("[amqp.tls] {0}")]
    Tls(#[from] ferry_edge::server::StartError),
    #[error("[amqp.tls] use_identity_as_username is not served for AMQP (no EXTERNAL mechanism)")]
    Identity,
}

/// Starts the AMQP front: the listener and the broker thread.
pub async fn start(
    config: &AmqpConfig,
    auth_files: (Option<PathBuf>, Option<PathBuf>),
    log: Arc<dyn Storage>,
    meta: Arc<Meta>,
    routes: Arc<RouteTable>,
) -> Result<AmqpFront, AmqpError> {
    if config.frame_max < codec::FRAME_MIN_SIZE {
        return Err(AmqpError::FrameMax);
    }
    let password_file = config.password_file.clone().or(auth_files.0);
    let acl_file = config.acl_file.clone().or(auth_files.1);
    if password_file.is_none() && !config.listen.ip().is_loopback() {
        return Err(AmqpError::Open(config.listen));
    }
    let auth = Arc::new(Auth::load(
        password_file.as_deref(),
        acl_file.as_deref(),
        password_file.is_none(),
    )?);
    log.create_stream(AMQP_STREAM, &crate::log::StreamConfig::default())
        .map_err(|e| AmqpError::Io(std::io::Error::other(e.to_string())))?;
    let state = meta.amqp_entries("")?;
    let settings = Settings {
        vhosts: config.vhosts.clone(),
        frame_max: config.frame_max,
        channel_max: config.channel_max,
        heartbeat_secs: config.heartbeat_secs,
        ack_timeout: Duration::from_secs(config.ack_timeout_secs),
        handshake_timeout: HANDSHAKE,
    };
    let listener = TcpListener::bind(config.listen).await?;
    let addr = listener.local_addr()?;
    let mut tls = Vec::new();
    if let Some(t) = &config.tls {
        if t.use_identity_as_username {
            return Err(AmqpError::Identity);
        }
        let acceptor = ferry_edge::server::tls::acceptor(t)?;
        for a in &t.listen {
            tls.push((TcpListener::bind(a).await?, acceptor.clone()));
        }
    }
    let (events, rx) = mpsc::channel(INPUT_QUEUE);
    let broker = Broker::new(settings, auth, routes, log.clone(), state);
    let budget = config.max_appending_bytes.max(1);
    let overview = Arc::new(std::sync::Mutex::new(broker.overview()));
    let shared = overview.clone();
    let state = StateWriter::start(meta)?;
    std::thread::Builder::new()
        .name("ferry-amqp".into())
        .spawn(move || run_broker(broker, rx, log, state, shared, budget))?;
    info!(%addr, "listening for AMQP clients");
    let ids = Arc::new(AtomicU64::new(1));
    let frame_max = config.frame_max;
    tokio::spawn(accept(
        listener,
        None,
        ids.clone(),
        events.clone(),
        frame_max,
    ));
    let mut tls_addrs = Vec::new();
    for (listener, acceptor) in tls {
        let a = listener.local_addr()?;
        info!(addr = %a, "listening for AMQP clients over TLS");
        tls_addrs.push(a);
        tokio::spawn(accept(
            listener,
            Some(acceptor),
            ids.clone(),
            events.clone(),
            frame_max,
        ));
    }
    Ok(AmqpFront {
        addr,
        tls_addrs,
        overview,
    })
}

/// Takes the connections of one listener (over TLS with `tls`) until the process ends.
async fn accept(
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    ids: Arc<AtomicU64>,
    events: mpsc::Sender<Event>,
    frame_max: u32,
) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                warn!(error = %e, "AMQP accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let conn = ids.fetch_add(1, Ordering::Relaxed);
        let events = events.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            debug!(%peer, conn, "AMQP connection");
            match tls {
                None => connection(stream, conn, events, frame_max).await,
                Some(acceptor) => {
                    match tokio::time::timeout(HANDSHAKE, acceptor.accept(stream)).await {
                        Ok(Ok(s)) => connection(s, conn, events, frame_max).await,
                        Ok(Err(e)) => debug!(%peer, error = %e, "AMQP TLS handshake failed"),
                        Err(_) => debug!(%peer, "AMQP TLS handshake timed out"),
                    }
                }
            }
        });
    }
}

/// One client: checks its protocol header, then reads frames for the broker while a
/// writer task sends what the broker gives it, with heartbeats when idle.
async fn connection<S>(mut stream: S, conn: ConnId, events: mpsc::Sender<Event>, frame_max: u32)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let mut header = [0u8; 8];
    match tokio::time::timeout(HANDSHAKE, stream.read_exact(&mut header)).await {
        Ok(Ok(_)) => {}
        Ok(Err(_)) => return,
        Err(_) => {
            debug!(conn, "AMQP protocol header timed out");
            return;
        }
    }
    if &header != codec::PROTOCOL_HEADER {
        // The spec: answer with the protocol we speak, then close.
        let _ = stream.write_all(codec::PROTOCOL_HEADER).await;
        let _ = stream.shutdown().await;
        return;
    }
    let (mut reader, mut writer) = tokio::io::split(stream);
    let (out_tx, mut out_rx) = mpsc::channel::<Out>(WRITE_QUEUE);
    let heartbeat = Arc::new(AtomicU16::new(0));
    let (paused, mut paused_rx) = tokio::sync::watch::channel(false);
    let (inputs, lane_rx) = mpsc::channel(LANE);
    let queued = Arc::new(AtomicBool::new(false));
    if events
        .send(Event::Open {
            conn,
            writer: out_tx,
            heartbeat: heartbeat.clone(),
            paused,
            lane: Lane {
                inputs: lane_rx,
                queued: queued.clone(),
            },
        })
        .await
        .is_err()
    {
        return;
    }
    let lane = LaneSender {
        conn,
        inputs,
        queued,
        events,
    };
    let beat = heartbeat.clone();
    let mut write = tokio::spawn(async move {
        let mut heartbeat_frame = Vec::new();
        codec::put_frame(
            &mut heartbeat_frame,
            &amq_protocol::frame::AMQPFrame::Heartbeat,
        );
        loop {
            let secs = beat.load(Ordering::Relaxed);
            let next = if secs == 0 {
                out_rx.recv().await
            } else {
                // Something at least every half interval.
                match tokio::time::timeout(
                    Duration::from_millis(u64::from(secs) * 500),
                    out_rx.recv(),
                )
                .await
                {
                    Ok(x) => x,
                    Err(_) => Some(Out::Bytes(heartbeat_frame.clone())),
                }
            };
            let (mut b, mut last) = match next {
                Some(Out::Bytes(b)) => (b, false),
                Some(Out::Last(b)) => (b, true),
                None => (Vec::new(), true),
            };
            // Whatever else is queued goes in the same write.
            while !last {
                match out_rx.try_recv() {
                    Ok(Out::Bytes(m)) => b.extend_from_slice(&m),
                    Ok(Out::Last(m)) => {
                        b.extend_from_slice(&m);
                        last = true;
                    }
                    Err(_) => break,
                }
            }
            if !b.is_empty() {
                match tokio::time::timeout(SEND_TIMEOUT, writer.write_all(&b)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(_)) => return WriterEnd::Failed,
                    Err(_) => {
                        debug!(conn, "AMQP peer took nothing for the send timeout");
                        return WriterEnd::Failed;
                    }
                }
            }
            if last {
                let _ = tokio::time::timeout(SEND_TIMEOUT, writer.shutdown()).await;
                return WriterEnd::Closed;
            }
        }
    });
    let _ = lane.send(Input::Connected { conn }).await;
    let mut buf = BytesMut::with_capacity(64 * 1024);
    // Set once the writer ended after a close: what the peer sends until then is read and
    // dropped (the broker takes nothing of a closing connection).
    let mut closed_at: Option<tokio::time::Instant> = None;
    let mut writer_done = false;
    loop {
        let limit = match closed_at {
            Some(at) => Some(at + CLOSE_GRACE),
            None => match heartbeat.load(Ordering::Relaxed) {
                0 => None,
                secs => {
                    Some(tokio::time::Instant::now() + Duration::from_secs(u64::from(secs) * 2))
                }
            },
        };
        let read = async {
            // Paused while the node is under pressure and this connection publishes.
            if paused_rx.wait_for(|p| !*p).await.is_err() {
                return None;
            }
            Some(reader.read_buf(&mut buf).await)
        };
        let timed = async {
            match limit {
                None => Ok(read.await),
                Some(at) => tokio::time::timeout_at(at, read).await,
            }
        };
        let read = tokio::select! {
            end = &mut write, if !writer_done => {
                writer_done = true;
                match end {
                    Ok(WriterEnd::Closed) => {
                        closed_at = Some(tokio::time::Instant::now());
                        continue;
                    }
                    _ => break,
                }
            }
            r = timed => r,
        };
        match read {
            Ok(Some(Ok(n))) if n > 0 => {}
            Ok(_) => break,
            Err(_) => {
                if closed_at.is_none() {
                    debug!(conn, "AMQP peer silent for two heartbeats");
                }
                break;
            }
        }
        if closed_at.is_some() {
            buf.clear();
            continue;
        }
        loop {
            match codec::take_frame(&mut buf, frame_max) {
                Ok(Some(frame)) => {
                    if lane.send(Input::Frame { conn, frame }).await.is_err() {
                        return;
                    }
                }
                Ok(None) => break,
                Err(error) => {
                    let _ = lane.send(Input::Bad { conn, error }).await;
                    // The broker sends connection.close and closes; what the peer sends
                    // after a bad frame is not read.
                    if !writer_done {
                        let _ = write.await;
                    }
                    let _ = lane.send(Input::Lost { conn }).await;
                    return;
                }
            }
        }
    }
    let _ = lane.send(Input::Lost { conn }).await;
    if !writer_done {
        write.abort();
    }
}

/// The broker thread: a current-thread runtime that waits for frames, appends, log
/// commits and the tick; after each round of inputs it commits the metadata a reply waits
/// for, starts the appends, hands each connection its bytes, and passes queue positions to
/// the state writer once the appends of their round are durable.
fn run_broker(
    mut broker: Broker,
    mut rx: mpsc::Receiver<Event>,
    log: Arc<dyn Storage>,
    state: StateWriter,
    overview: Arc<std::sync::Mutex<Overview>>,
    budget: usize,
) {
    let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
    else {
        error!("cannot start the AMQP broker thread");
        return;
    };
    runtime.block_on(async move {
        let mut writers: HashMap<ConnId, mpsc::Sender<Out>> = HashMap::new();
        let mut heartbeats: HashMap<ConnId, Arc<AtomicU16>> = HashMap::new();
        let mut pauses: HashMap<ConnId, tokio::sync::watch::Sender<bool>> = HashMap::new();
        let mut lanes: HashMap<ConnId, Lane> = HashMap::new();
        // Connections with inputs waiting, in turn.
        let mut turns: VecDeque<ConnId> = VecDeque::new();
        // Bytes for a connection whose writer had no room yet.
        let mut unsent: HashMap<ConnId, Vec<u8>> = HashMap::new();
        // Closed connections whose last bytes wait for room in their writer, until when.
        let mut closing: Vec<(mpsc::Sender<Out>, Vec<u8>, Instant)> = Vec::new();
        // Bytes of records handed to the log and not yet durable.
        let mut appending = 0usize;
        let mut pressure = false;
        let mut appends = FuturesUnordered::new();
        // Rounds are numbered; those with appends not yet done.
        let mut round: u64 = 0;
        let mut open_rounds = OpenRounds::default();
        // Queue positions waiting for the dead-lettered copies of their round and of those
        // before.
        let mut held: VecDeque<(u64, Vec<Command>)> = VecDeque::new();
        let mut commits = log.watch_commits();
        let mut tick = tokio::time::interval(TICK);
        loop {
            tokio::select! {
                event = rx.recv() => {
                    let Some(event) = event else { return };
                    let mut next = Some(event);
                    while let Some(event) = next {
                        match event {
                            Event::Open { conn, writer, heartbeat, paused, lane } => {
                                writers.insert(conn, writer);
                                heartbeats.insert(conn, heartbeat);
                                pauses.insert(conn, paused);
                                lanes.insert(conn, lane);
                            }
                            Event::Ready(conn) => turns.push_back(conn),
                        }
                        next = rx.try_recv().ok();
                    }
                }
                // Inputs left from the last round: go on at once.
                _ = std::future::ready(()), if !turns.is_empty() => {}
                Some(done) = appends.next(), if !appends.is_empty() => {
                    // Every append that is done by now, in one round.
                    let now = Instant::now();
                    let mut next = Some(done);
                    while let Some(done) = next {
                        appending -= open_rounds.done(&done, &mut broker, now);
                        next = appends.next().now_or_never().flatten();
                    }
                }
                changed = commits.changed() => {
                    if changed.is_err() { return; }
                    commits.borrow_and_update();
                    broker.handle(Input::LogChanged, Instant::now());
                }
                _ = tick.tick() => {
                    broker.handle(Input::Tick, Instant::now());
                    if let Ok(mut o) = overview.lock() {
                        *o = broker.overview();
                    }
                }
                // Deliveries left from the last round: go on at once, or in a moment if a
                // writer is full.
                _ = tokio::time::sleep(Duration::from_millis(1)), if broker.more() || !unsent.is_empty() || !closing.is_empty() => {}
            }
            // Each connection with inputs in turn, up to TURN of its frames, until the
            // round's share is taken.
            let now = Instant::now();
            let mut frames_left = ROUND_FRAMES;
            while frames_left > 0 {
                let Some(conn) = turns.pop_front() else { break };
                let Some(lane) = lanes.get_mut(&conn) else { continue };
                let mut took = 0;
                let mut lost = false;
                while took < TURN {
                    let Ok(input) = lane.inputs.try_recv() else { break };
                    took += 1;
                    lost = matches!(input, Input::Lost { .. });
                    broker.handle(input, now);
                    if lost {
                        break;
                    }
                }
                frames_left = frames_left.saturating_sub(took.max(1));
                if lost {
                    lanes.remove(&conn);
                    writers.remove(&conn);
                    heartbeats.remove(&conn);
                    pauses.remove(&conn);
                } else if took == TURN {
                    turns.push_back(conn);
                } else {
                    // Idle now, unless the reader queued more since the last look.
                    lane.queued.store(false, Ordering::SeqCst);
                    std::sync::atomic::fence(Ordering::SeqCst);
                    if !lane.inputs.is_empty() && !lane.queued.swap(true, Ordering::SeqCst) {
                        turns.push_back(conn);
                    }
                }
            }
            // The log's backlog is the node's limit: over budget, publishers wait.
            let over = appending > budget;
            let under = appending <= budget / 2;
            if (over && !pressure) || (under && pressure) {
                pressure = over;
                broker.handle(Input::Pressure(pressure), Instant::now());
            }
            let full: HashSet<ConnId> = writers
                .iter()
                .filter(|(c, w)| w.capacity() == 0 || unsent.contains_key(*c))
                .map(|(c, _)| *c)
                .collect();
            broker.set_blocked(full);
            let actions = broker.take_actions(Instant::now());
            round += 1;
            let mut metadata: Vec<Command> = Vec::new();
            let mut positions: Vec<Command> = Vec::new();
            let mut barrier = false;
            let mut grouped: Vec<Grouped> = Vec::new();
            let mut dead_letters = false;
            let mut rest = Vec::new();
            for a in actions {
                match a {
                    Action::Meta(c) => metadata.push(c),
                    Action::Position(c) => positions.push(c),
                    Action::Barrier => barrier = true,
                    Action::Append {
                        token,
                        stream,
                        partition,
                        record,
                        dead_letter,
                    } => {
                        dead_letters |= dead_letter;
                        let key = (stream, partition);
                        match grouped.iter_mut().find(|(k, _, _)| *k == key) {
                            Some((_, tokens, records)) => {
                                tokens.push(token);
                                records.push(record);
                            }
                            None => grouped.push((key, vec![token], vec![record])),
                        }
                    }
                    other => rest.push(other),
                }
            }
            for ((stream, partition), tokens, records) in grouped {
                let bytes: usize = records
                    .iter()
                    .map(|r| {
                        r.value.as_ref().map_or(0, |v| v.len())
                            + r.key.as_ref().map_or(0, |k| k.len())
                    })
                    .sum();
                appending += bytes;
                open_rounds.started(round, dead_letters);
                let append = log.append(&stream, partition, AppendData::Records(records));
                appends.push(async move { (tokens, append.await.is_ok(), bytes, round) });
            }
            if !metadata.is_empty() || barrier {
                // A reply waits for this: first the dead-lettered copies of this round and
                // of those before must be durable (their queues let go of them), then the
                // held positions and this round's metadata are written, in the order they
                // were made.
                while open_rounds.oldest_dead_letters() <= round {
                    let Some(done) = appends.next().await else { break };
                    appending -= open_rounds.done(&done, &mut broker, Instant::now());
                }
                let mut all: Vec<Command> = held.drain(..).flat_map(|(_, c)| c).collect();
                all.extend(metadata);
                if let Err(e) = state.write(all) {
                    error!(error = %e, "cannot write the AMQP state");
                }
            }
            if !positions.is_empty() {
                held.push_back((round, positions));
            }
            let waiting_for = open_rounds.oldest_dead_letters();
            let mut durable_now = Vec::new();
            while held.front().is_some_and(|(r, _)| *r < waiting_for) {
                durable_now.extend(held.pop_front().map(|(_, c)| c).unwrap_or_default());
            }
            state.send(durable_now);
            for a in rest {
                match a {
                    Action::Send { conn, bytes } => {
                        // Behind what already waits for this writer, if anything.
                        let waiting = unsent.entry(conn).or_default();
                        waiting.extend_from_slice(&bytes);
                        if waiting.len() > MAX_UNSENT_BYTES {
                            // The broker delivers nothing to a full writer, so this is
                            // replies piling up on a peer that does not read.
                            warn!(conn, "AMQP connection not reading; closed");
                            // Its writer, let go, ends when the peer takes what it holds,
                            // or after the send timeout.
                            unsent.remove(&conn);
                            writers.remove(&conn);
                            broker.handle(Input::Lost { conn }, Instant::now());
                        }
                    }
                    Action::PauseReads { conn, paused } => {
                        if let Some(p) = pauses.get(&conn) {
                            let _ = p.send(paused);
                        }
                    }
                    Action::Tuned {
                        conn,
                        heartbeat_secs,
                    } => {
                        if let Some(h) = heartbeats.get(&conn) {
                            h.store(heartbeat_secs, Ordering::Relaxed);
                        }
                    }
                    Action::Close { conn } => {
                        // Never waited on here: a writer with no room gets its last bytes
                        // in a later round.
                        if let Some(w) = writers.remove(&conn) {
                            let last = unsent.remove(&conn).unwrap_or_default();
                            closing.push((w, last, Instant::now() + SEND_TIMEOUT));
                        }
                    }
                    Action::Meta(_)
                    | Action::Position(_)
                    | Action::Barrier
                    | Action::Append { .. } => {}
                }
            }
            // Closes whose writer has room now go; one that found no room in time lets its
            // writer go (it ends once the peer took what it holds, or on its own timeout).
            let now = Instant::now();
            closing.retain_mut(|(w, last, until)| match w.try_reserve() {
                Ok(permit) => {
                    permit.send(Out::Last(std::mem::take(last)));
                    false
                }
                Err(mpsc::error::TrySendError::Full(())) => now < *until,
                Err(mpsc::error::TrySendError::Closed(())) => false,
            });
            // What each connection has waiting goes to its writer as one entry, if it has
            // room; otherwise it waits for the next round.
            unsent.retain(|conn, bytes| {
                let Some(w) = writers.get(conn) else {
                    return false;
                };
                match w.try_reserve() {
                    Ok(permit) => {
                        permit.send(Out::Bytes(std::mem::take(bytes)));
                        false
                    }
                    Err(_) => true,
                }
            });
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_wait_only_for_rounds_with_dead_lettered_copies_not_yet_durable() {
        let mut rounds = OpenRounds::default();
        let log = crate::log::MemoryLog::new();
        let mut broker = Broker::new(
            Settings {
                vhosts: vec!["/".into()],
                frame_max: 131_072,
                channel_max: 16,
                heartbeat_secs: 0,
                ack_timeout: Duration::from_secs(1800),
                handshake_timeout: HANDSHAKE,
            },
            Arc::new(Auth::open()),
            Arc::new(RouteTable::new(
                crate::routes::Routes::new(&[]).expect("routes"),
            )),
            log,
            Vec::new(),
        );
        let now = Instant::now();
        assert_eq!(rounds.oldest_dead_letters(), u64::MAX, "nothing open");
        rounds.started(1, false);
        rounds.started(2, true);
        rounds.started(2, true);
        rounds.started(3, false);
        assert_eq!(
            rounds.oldest_dead_letters(),
            2,
            "publishes alone hold nothing"
        );
        assert_eq!(rounds.done(&(vec![], true, 10, 2), &mut broker, now), 10);
        assert_eq!(
            rounds.oldest_dead_letters(),
            2,
            "one of round 2's two is left"
        );
        rounds.done(&(vec![], true, 5, 2), &mut broker, now);
        assert_eq!(rounds.oldest_dead_letters(), u64::MAX);
        rounds.done(&(vec![], true, 1, 1), &mut broker, now);
        rounds.done(&(vec![], true, 1, 3), &mut broker, now);
        assert!(rounds.0.is_empty());
    }
}
