//! The tokio driver around the broker core: listeners, one task pair per connection, and
//! one router thread that owns the [`Broker`] and applies every input in order.
//!
//! ```text
//! socket ─▶ reader task ──Input──▶ router thread (Broker) ──Outbound──▶ writer task ─▶ socket
//!                ▲                        │                                   │
//!                └──── pause / resume ────┘◀────────── Written (credit) ──────┘
//! ```
//!
//! The binary runs the connections on one current-thread runtime (see `main.rs` for why);
//! the router has a thread of its own. Every channel is bounded. The router never blocks on a connection: it emits at most the
//! credit a writer has room for (see `broker` flow control), and a writer whose queue is full
//! anyway (a client that sends but never reads) is closed.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use ferry_protocol::mqtt::{self, DecodeError, Packet, ProtocolVersion};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch, Semaphore};
use tracing::{debug, info, warn};

use crate::auth::{Auth, AuthError};
use crate::broker::{Action, Broker, ClientInfo, ConnId, Input, Message, Stats, StoreOp};
use crate::config::Config;
use crate::store::{Store, StoreError};

/// Packets a writer may have queued for PUBLISH flow: the send credit. A queued packet shares
/// its payload with the broker's queues; what it adds is its header (~100 bytes). Deep
/// enough that a fast subscriber is never waiting for credit to come back.
const SEND_CREDIT: usize = 256;
/// Room above the credit for control packets (acks, SUBACK, PINGRESP), which the broker
/// sends without credit. A client that fills this without reading is closed.
const CONTROL_SLACK: usize = 64;
/// Acknowledgements from subscribers waiting for the router (see `ConnSettings::acks`).
const ACK_LANE: usize = 4096;
/// Inputs the router applies before it dispatches what they caused: a batch, so that one
/// storage commit can later cover many messages (group commit).
const ROUTER_BATCH: usize = 256;
/// Room made in a connection's read buffer before a read: it starts small, so that an idle
/// connection costs little, doubles while reads fill it (a busy publisher) up to the
/// maximum, and halves when they use little of it. A packet larger than this gets its whole
/// size reserved by the decoder once its header is in.
const READ_CHUNK_MIN: usize = 512;
const READ_CHUNK_MAX: usize = 64 * 1024;
/// How long a connection whose reading ended waits for its writer to flush and close.
const WRITER_GRACE: Duration = Duration::from_secs(5);
/// A read or write buffer that grew past this during a burst is given back once empty.
const BUFFER_KEEP: usize = 64 * 1024;

/// What a node whose broker works through a log (the cloud) gives the server.
pub struct LogHooks {
    /// Appends what one router batch accepted, durably; the batch's acknowledgements wait
    /// for it. An error stops the broker, as a failed storage commit does.
    pub append: Box<dyn FnMut(Vec<Arc<Message>>) -> AppendFuture + Send>,
    /// Messages read back from the log, in log order, for delivery. The router stops taking
    /// them while a subscriber without room holds deliveries back.
    pub deliveries: mpsc::Receiver<Arc<Message>>,
    /// Called after each batch with how many deliveries were routed and made durable (for
    /// persistent sessions) in it, in the order they came: the log may move its delivery
    /// cursor past them.
    pub delivered: Box<dyn FnMut(usize) + Send>,
}

impl std::fmt::Debug for LogHooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogHooks").finish_non_exhaustive()
    }
}

/// A pending [`LogHooks::append`].
pub type AppendFuture = std::pin::Pin<Box<dyn Future<Output = Result<(), String>> + Send>>;

/// The next delivery, or never without a log.
async fn next_delivery(log: &mut Option<LogHooks>) -> Option<Arc<Message>> {
    match log {
        Some(l) => l.deliveries.recv().await,
        None => std::future::pending().await,
    }
}

/// Messages into the router thread.
enum ToRouter {
    Register {
        conn: ConnId,
        wire: Arc<Wire>,
    },
    SetAuth(Arc<Auth>),
    Input(Input),
    Stats(tokio::sync::oneshot::Sender<(Stats, CommitStats)>),
    Clients(tokio::sync::oneshot::Sender<Vec<ClientInfo>>),
    /// The cloud has the outbox's class `priority` up to `seq`: delete it.
    OutboxAck {
        priority: u8,
        seq: u64,
    },
    /// Downlink messages to publish (see [`crate::link`]).
    Downlink(crate::link::Downlink),
}

/// Storage commits made by the router: how many and how long they took.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CommitStats {
    pub commits: u64,
    pub total: Duration,
    pub max: Duration,
}

/// What the router shares with one connection's reader and writer: the writer's queue and
/// the reader's pause flag. A plain mutex-guarded queue rather than a channel, so that an
/// idle connection holds no buffer at all (a channel keeps a block of slots) and the writer
/// takes everything queued in one lock.
struct Wire {
    state: std::sync::Mutex<WireState>,
    /// Wakes the writer: packets queued, or close.
    to_writer: tokio::sync::Notify,
    /// Wakes the reader: pause or resume, or the writer is gone.
    to_reader: tokio::sync::Notify,
}

#[derive(Default)]
struct WireState {
    /// Packets for the writer, in order. At most `SEND_CREDIT + CONTROL_SLACK`.
    queue: std::collections::VecDeque<Packet>,
    /// The writer sends what is queued, then closes the connection.
    close: bool,
    /// The broker's flow control holds this connection's reads.
    paused: bool,
    /// The writer has ended (closed or failed); the reader stops.
    writer_gone: bool,
}

/// The largest queue a writer keeps between bursts; a larger one is given back once drained.
const QUEUE_KEEP: usize = 64;

impl Wire {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            state: std::sync::Mutex::new(WireState::default()),
            to_writer: tokio::sync::Notify::new(),
            to_reader: tokio::sync::Notify::new(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, WireState> {
        // The lock guards plain data with no invariant a panic could break.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues `packet` for the writer; false if the queue is full (a client that sends but
    /// does not read) or the writer is gone.
    fn send(&self, packet: Packet) -> bool {
        let mut state = self.lock();
        if state.writer_gone || state.close || state.queue.len() >= SEND_CREDIT + CONTROL_SLACK {
            return false;
        }
        state.queue.push_back(packet);
        drop(state);
        self.to_writer.notify_one();
        true
    }

    fn close(&self) {
        self.lock().close = true;
        self.to_writer.notify_one();
    }

    /// Drops what is queued and ends the connection now: the reader stops at once, the
    /// writer as soon as it gets back to the queue.
    fn abort(&self) {
        let mut state = self.lock();
        state.queue.clear();
        state.close = true;
        state.writer_gone = true;
        drop(state);
        self.to_writer.notify_one();
        self.to_reader.notify_one();
    }

    fn set_paused(&self, paused: bool) {
        self.lock().paused = paused;
        self.to_reader.notify_one();
    }
}

/// A running broker: its local addresses and a way to ask for statistics.
#[derive(Clone)]
pub struct Server {
    to_router: mpsc::Sender<ToRouter>,
    local_addrs: Vec<SocketAddr>,
    tls_addrs: Vec<SocketAddr>,
    ws_addrs: Vec<SocketAddr>,
    wss_addrs: Vec<SocketAddr>,
    failed: watch::Receiver<Option<String>>,
    link: Option<Arc<ferry_bridge::client::LinkStatus>>,
    outbox: Arc<crate::link::EdgeOutbox>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("local_addrs", &self.local_addrs)
            .finish()
    }
}

impl Server {
    /// Opens the store, binds the listeners of `config` and starts serving in the
    /// background. Serving stops when `shutdown` completes: listeners close and connections
    /// are closed.
    pub async fn start(
        config: Config,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<Self, StartError> {
        Self::start_with_log(config, None, shutdown).await
    }

    /// As [`Server::start`]; with `log`, the broker works in log mode
    /// ([`Broker::use_log`]): what clients publish is appended through `log` before it is
    /// acknowledged, and reaches subscribers when it comes back through its deliveries.
    pub async fn start_with_log(
        config: Config,
        log: Option<LogHooks>,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<Self, StartError> {
        let store = Store::open(&config.server.data_dir, &config.storage)?;
        let mut broker = Broker::new(config.mqtt.clone());
        if log.is_some() {
            broker.use_log();
        }
        broker.set_auth(Arc::new(config.load_auth()?));
        broker.set_uplink(crate::uplink::UplinkRules::new(&config.uplink)?);
        broker.restore(store.load()?, Instant::now());
        let (outbox_acks_tx, outbox_acks) = mpsc::unbounded_channel();
        let (downlink_tx, downlink) = mpsc::unbounded_channel();
        let outbox = Arc::new(crate::link::EdgeOutbox {
            reader: store.outbox_reader(),
            acks: outbox_acks_tx,
            added: Arc::new(tokio::sync::Notify::new()),
            downlink: downlink_tx,
        });
        let mut listeners = Vec::new();
        for addr in &config.server.listen {
            listeners.push((TcpListener::bind(addr).await?, Transport::Tcp));
        }
        let local_addrs = listeners
            .iter()
            .map(|(l, _)| l.local_addr())
            .collect::<std::io::Result<Vec<_>>>()?;
        let mut tls_addrs = Vec::new();
        if let Some(tls) = &config.server.tls {
            let acceptor = tls::acceptor(tls)?;
            for addr in &tls.listen {
                let listener = TcpListener::bind(addr).await?;
                tls_addrs.push(listener.local_addr()?);
                listeners.push((
                    listener,
                    Transport::Tls(acceptor.clone(), tls.use_identity_as_username),
                ));
            }
        }
        let (to_router, from_conns) = mpsc::channel(4096);
        let (failed_tx, failed) = watch::channel(None);
        let (credit_tx, credit_rx) = mpsc::unbounded_channel();
        let (acks_tx, acks_rx) = mpsc::channel(ACK_LANE);
        let lanes = Lanes {
            credit: credit_rx,
            acks: acks_rx,
            outbox_acks,
            outbox_added: outbox.added.clone(),
            downlink,
        };
        std::thread::Builder::new()
            .name("ferry-router".into())
            .spawn(move || {
                if let Err(e) = router(broker, store, log, from_conns, lanes) {
                    tracing::error!(error = %e, "storage failed; the broker stops");
                    let _ = failed_tx.send(Some(e.to_string()));
                }
            })?;

        let (stop_tx, stop_rx) = watch::channel(false);
        tokio::spawn(async move {
            shutdown.await;
            let _ = stop_tx.send(true);
        });
        let ticker = to_router.clone();
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            let mut interval = tokio::time::interval(Duration::from_secs(1));
            loop {
                tokio::select! {
                    _ = interval.tick() => {
                        if ticker.send(ToRouter::Input(Input::Tick)).await.is_err() {
                            return;
                        }
                    }
                    _ = stop.changed() => return,
                }
            }
        });

        let next_id = Arc::new(AtomicU64::new(1));
        let limit = Arc::new(Semaphore::new(config.server.max_connections));
        let settings = Arc::new(ConnSettings {
            credit: credit_tx,
            acks: acks_tx,
            connect_timeout: Duration::from_secs(config.server.connect_timeout_secs),
            max_packet_size: config.mqtt.max_packet_size_bytes as usize,
            max_keepalive_secs: config.mqtt.max_keepalive_secs,
        });
        let mut ws_addrs = Vec::new();
        let mut wss_addrs = Vec::new();
        if let Some(ws) = &config.server.websocket {
            for addr in &ws.listen {
                let listener = TcpListener::bind(addr).await?;
                ws_addrs.push(listener.local_addr()?);
                listeners.push((listener, Transport::WebSocket));
            }
            if let (Some(tls), false) = (&config.server.tls, ws.tls_listen.is_empty()) {
                let acceptor = tls::acceptor(tls)?;
                for addr in &ws.tls_listen {
                    let listener = TcpListener::bind(addr).await?;
                    wss_addrs.push(listener.local_addr()?);
                    listeners.push((
                        listener,
                        Transport::WebSocketTls(acceptor.clone(), tls.use_identity_as_username),
                    ));
                }
            }
        }
        for (listener, transport) in listeners {
            info!(addr = %listener.local_addr()?, transport = transport.name(), "listening for MQTT");
            tokio::spawn(accept_loop(
                listener,
                transport,
                to_router.clone(),
                next_id.clone(),
                limit.clone(),
                settings.clone(),
                stop_rx.clone(),
            ));
        }
        let link = crate::link::client_config(&config.uplink)
            .map(|c| crate::link::start(c, outbox.clone(), stop_rx.clone()));
        Ok(Self {
            to_router,
            local_addrs,
            tls_addrs,
            ws_addrs,
            wss_addrs,
            failed,
            link,
            outbox,
        })
    }

    /// How long ago the oldest record still in the outbox was accepted; zero if it is
    /// empty, None if the store cannot be read.
    pub async fn outbox_oldest_age(&self) -> Option<Duration> {
        let reader = self.outbox.reader.clone();
        let oldest = tokio::task::spawn_blocking(move || reader.oldest_accepted_unix_ms())
            .await
            .ok()?
            .ok()?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        Some(Duration::from_millis(
            oldest.map_or(0, |t| now.saturating_sub(t)),
        ))
    }

    /// The link to the cloud, if `[uplink] cloud` is set.
    pub fn link_status(&self) -> Option<ferry_bridge::client::LinkStats> {
        self.link.as_ref().map(|l| l.get())
    }

    /// Completes if the broker stopped because storage failed; the error says why.
    pub async fn failed(&self) -> String {
        let mut failed = self.failed.clone();
        loop {
            if let Some(e) = failed.borrow().clone() {
                return e;
            }
            if failed.changed().await.is_err() {
                return "the router stopped".into();
            }
        }
    }

    /// The plain TCP listeners' addresses.
    pub fn local_addrs(&self) -> &[SocketAddr] {
        &self.local_addrs
    }

    /// The TLS listeners' addresses.
    pub fn tls_addrs(&self) -> &[SocketAddr] {
        &self.tls_addrs
    }

    /// The WebSocket listeners' addresses.
    pub fn ws_addrs(&self) -> &[SocketAddr] {
        &self.ws_addrs
    }

    /// The MQTT over WebSocket over TLS (`wss://`) listeners' addresses.
    pub fn wss_addrs(&self) -> &[SocketAddr] {
        &self.wss_addrs
    }

    /// Applies new password and ACL rules (SIGHUP).
    pub async fn reload_auth(&self, auth: Auth) {
        let _ = self.to_router.send(ToRouter::SetAuth(Arc::new(auth))).await;
    }

    /// The broker's counters now.
    pub async fn stats(&self) -> Option<Stats> {
        self.metrics().await.map(|(stats, _)| stats)
    }

    /// The connected clients.
    pub async fn clients(&self) -> Option<Vec<ClientInfo>> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.to_router.send(ToRouter::Clients(tx)).await.ok()?;
        rx.await.ok()
    }

    /// The broker's counters and the storage commit figures.
    pub async fn metrics(&self) -> Option<(Stats, CommitStats)> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.to_router.send(ToRouter::Stats(tx)).await.ok()?;
        rx.await.ok()
    }
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error("TLS: {0}")]
    Tls(String),
    #[error(transparent)]
    Uplink(#[from] crate::uplink::UplinkError),
}

mod websocket {
    //! MQTT over WebSocket: the handshake (answering the `mqtt` subprotocol, as MQTT 5.0
    //! §6 asks), then a bridge task between binary frames and a byte pipe, so that the
    //! connection code reads and writes bytes as on TCP. MQTT packets may span frames and
    //! frames may hold several packets; the pipe does not care.

    use futures_util::{SinkExt, StreamExt};
    use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream};
    use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
    use tokio_tungstenite::tungstenite::http::HeaderValue;
    use tokio_tungstenite::tungstenite::Message;

    /// Bytes buffered in each direction of the pipe.
    const PIPE_BYTES: usize = 64 * 1024;

    // The callback's error type is tungstenite's HTTP response, large by its API's design.
    #[allow(clippy::result_large_err)]
    pub(super) async fn accept<S>(
        stream: S,
    ) -> Result<DuplexStream, tokio_tungstenite::tungstenite::Error>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let ws =
            tokio_tungstenite::accept_hdr_async(stream, |req: &Request, mut resp: Response| {
                let wants_mqtt = req
                    .headers()
                    .get_all("Sec-WebSocket-Protocol")
                    .iter()
                    .filter_map(|v| v.to_str().ok())
                    .flat_map(|v| v.split(','))
                    .any(|p| p.trim() == "mqtt");
                if wants_mqtt {
                    resp.headers_mut()
                        .insert("Sec-WebSocket-Protocol", HeaderValue::from_static("mqtt"));
                }
                Ok(resp)
            })
            .await?;
        let (ours, theirs) = tokio::io::duplex(PIPE_BYTES);
        tokio::spawn(bridge(ws, theirs));
        Ok(ours)
    }

    async fn bridge<S>(ws: tokio_tungstenite::WebSocketStream<S>, pipe: DuplexStream)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (mut ws_tx, mut ws_rx) = ws.split();
        let (mut pipe_rx, mut pipe_tx) = tokio::io::split(pipe);
        let inbound = async {
            while let Some(Ok(msg)) = ws_rx.next().await {
                let data = match msg {
                    Message::Binary(data) => data,
                    // Text frames are not MQTT (MQTT 5.0 §6.0): close.
                    Message::Close(_) | Message::Text(_) => break,
                    _ => continue,
                };
                if pipe_tx.write_all(&data).await.is_err() {
                    break;
                }
            }
            let _ = pipe_tx.shutdown().await;
        };
        let outbound = async {
            let mut buf = vec![0u8; PIPE_BYTES];
            loop {
                match pipe_rx.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if ws_tx
                            .send(Message::binary(buf[..n].to_vec()))
                            .await
                            .is_err()
                        {
                            break;
                        }
                    }
                }
            }
            let _ = ws_tx.close().await;
        };
        tokio::join!(inbound, outbound);
    }
}

mod tls {
    //! The TLS acceptor: certificate chain and key from PEM files, optionally client
    //! certificates verified against a CA (rustls, with the `ring` provider).

    use std::sync::Arc;

    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};

    use super::StartError;
    use crate::config::TlsConfig;

    /// The Common Name of the client certificate the handshake verified, if any.
    pub(super) fn peer_common_name<S>(
        stream: &tokio_rustls::server::TlsStream<S>,
    ) -> Option<String> {
        use x509_cert::der::Decode;
        let der = stream.get_ref().1.peer_certificates()?.first()?;
        let cert = x509_cert::Certificate::from_der(der).ok()?;
        let cn = cert.tbs_certificate().subject().common_name().ok()??;
        Some(cn.value().into_owned())
    }

    pub(super) fn acceptor(config: &TlsConfig) -> Result<tokio_rustls::TlsAcceptor, StartError> {
        let err = |what: &str, e: &dyn std::fmt::Display| StartError::Tls(format!("{what}: {e}"));
        let certs = CertificateDer::pem_file_iter(&config.cert_file)
            .map_err(|e| err(&format!("{}", config.cert_file.display()), &e))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| err(&format!("{}", config.cert_file.display()), &e))?;
        let key = PrivateKeyDer::from_pem_file(&config.key_file)
            .map_err(|e| err(&format!("{}", config.key_file.display()), &e))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| err("protocol versions", &e))?;
        let builder = match &config.client_ca_file {
            None => builder.with_no_client_auth(),
            Some(ca) => {
                let mut roots = rustls::RootCertStore::empty();
                for cert in CertificateDer::pem_file_iter(ca)
                    .map_err(|e| err(&format!("{}", ca.display()), &e))?
                {
                    let cert = cert.map_err(|e| err(&format!("{}", ca.display()), &e))?;
                    roots
                        .add(cert)
                        .map_err(|e| err(&format!("{}", ca.display()), &e))?;
                }
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots),
                    provider,
                )
                .build()
                .map_err(|e| err("client certificate verifier", &e))?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let server = builder
            .with_single_cert(certs, key)
            .map_err(|e| err("certificate and key", &e))?;
        Ok(tokio_rustls::TlsAcceptor::from(Arc::new(server)))
    }
}

struct ConnSettings {
    /// Where writers give send credit back to the router.
    credit: mpsc::UnboundedSender<(ConnId, usize)>,
    /// Where readers send a subscriber's acknowledgements (PUBACK, PUBREC, PUBCOMP): a lane
    /// the router serves before publishes, so that deliveries are not starved by a flood of
    /// publishers (an acknowledgement is about a message we sent; its order relative to the
    /// client's own publishes does not matter).
    acks: mpsc::Sender<(ConnId, Packet)>,
    connect_timeout: Duration,
    max_packet_size: usize,
    max_keepalive_secs: u16,
}

/// How a listener's connections carry MQTT.
#[derive(Clone)]
enum Transport {
    Tcp,
    /// With whether the client certificate's CN becomes the username.
    Tls(tokio_rustls::TlsAcceptor, bool),
    /// MQTT over WebSocket (binary frames, subprotocol `mqtt`).
    WebSocket,
    /// MQTT over WebSocket over TLS (`wss://`), with the TLS listener's settings.
    WebSocketTls(tokio_rustls::TlsAcceptor, bool),
}

impl Transport {
    fn name(&self) -> &'static str {
        match self {
            Transport::Tcp => "tcp",
            Transport::Tls(..) => "tls",
            Transport::WebSocket => "websocket",
            Transport::WebSocketTls(..) => "websocket+tls",
        }
    }
}

async fn accept_loop(
    listener: TcpListener,
    transport: Transport,
    to_router: mpsc::Sender<ToRouter>,
    next_id: Arc<AtomicU64>,
    limit: Arc<Semaphore>,
    settings: Arc<ConnSettings>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(x) => x,
                Err(e) => {
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = stop.changed() => return,
        };
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            warn!(%peer, "connection refused: max_connections reached");
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let conn = next_id.fetch_add(1, Ordering::Relaxed);
        let to_router = to_router.clone();
        let settings = settings.clone();
        let stop = stop.clone();
        let transport = transport.clone();
        // One spawn per transport, so that a plain TCP connection's task is not sized for a
        // TLS handshake's state.
        match transport {
            Transport::Tcp => {
                tokio::spawn(async move {
                    connection(stream, None, peer, conn, to_router, settings, stop).await;
                    drop(permit);
                });
            }
            Transport::WebSocket => {
                tokio::spawn(async move {
                    let upgraded =
                        tokio::time::timeout(settings.connect_timeout, websocket::accept(stream))
                            .await;
                    match upgraded {
                        Ok(Ok(stream)) => {
                            connection(stream, None, peer, conn, to_router, settings, stop).await
                        }
                        Ok(Err(e)) => debug!(%peer, error = %e, "WebSocket handshake failed"),
                        Err(_) => debug!(%peer, "WebSocket handshake timed out"),
                    }
                    drop(permit);
                });
            }
            Transport::WebSocketTls(acceptor, identity_as_username) => {
                tokio::spawn(async move {
                    // Both handshakes count against the connect timeout.
                    let upgraded = tokio::time::timeout(settings.connect_timeout, async {
                        let tls = acceptor.accept(stream).await.map_err(|e| e.to_string())?;
                        let identity = identity_as_username
                            .then(|| tls::peer_common_name(&tls))
                            .flatten();
                        let ws = websocket::accept(tls).await.map_err(|e| e.to_string())?;
                        Ok::<_, String>((ws, identity))
                    })
                    .await;
                    match upgraded {
                        Ok(Ok((stream, identity))) => {
                            connection(stream, identity, peer, conn, to_router, settings, stop)
                                .await
                        }
                        Ok(Err(e)) => {
                            debug!(%peer, error = %e, "TLS or WebSocket handshake failed")
                        }
                        Err(_) => debug!(%peer, "TLS or WebSocket handshake timed out"),
                    }
                    drop(permit);
                });
            }
            Transport::Tls(acceptor, identity_as_username) => {
                tokio::spawn(async move {
                    // The handshake counts against the connect timeout.
                    let accepted =
                        tokio::time::timeout(settings.connect_timeout, acceptor.accept(stream))
                            .await;
                    match accepted {
                        Ok(Ok(stream)) => {
                            let identity = identity_as_username
                                .then(|| tls::peer_common_name(&stream))
                                .flatten();
                            connection(stream, identity, peer, conn, to_router, settings, stop)
                                .await
                        }
                        Ok(Err(e)) => debug!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => debug!(%peer, "TLS handshake timed out"),
                    }
                    drop(permit);
                });
            }
        }
    }
}

/// Serves one connection: CONNECT, then reading and writing until either side ends it.
async fn connection<S>(
    stream: S,
    identity: Option<String>,
    peer: SocketAddr,
    conn: ConnId,
    to_router: mpsc::Sender<ToRouter>,
    settings: Arc<ConnSettings>,
    mut stop: watch::Receiver<bool>,
) where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (mut rd, mut wr) = tokio::io::split(stream);
    let mut buf = BytesMut::new();
    let mut chunk = READ_CHUNK_MIN;

    // CONNECT first, within the connect timeout.
    let first = tokio::time::timeout(
        settings.connect_timeout,
        read_packet(
            &mut rd,
            &mut buf,
            &mut chunk,
            ProtocolVersion::V5,
            settings.max_packet_size,
        ),
    )
    .await;
    let connect = match first {
        Ok(Ok(Some(Packet::Connect(c)))) => c,
        Ok(Ok(Some(other))) => {
            debug!(%peer, packet = ?other.packet_type(), "first packet is not CONNECT; closing");
            return;
        }
        Ok(Ok(None)) => return,
        Ok(Err(ReadError::Decode(e))) => {
            debug!(%peer, error = %e, "bad CONNECT; closing");
            refuse_connect(&mut wr, &e).await;
            return;
        }
        Ok(Err(ReadError::Io(_))) => return,
        Err(_) => {
            debug!(%peer, "no CONNECT within the connect timeout; closing");
            return;
        }
    };
    let mut connect = connect;
    let identity_verified = identity.is_some();
    if let Some(cn) = identity {
        // The certificate, verified against the CA, is the credential (Mosquitto's
        // use_identity_as_username): its CN is the username, any password is ignored.
        connect.username = Some(cn);
        connect.password = None;
    }
    let version = connect.protocol;
    // The broker tells a v5 client the Server Keep Alive in CONNACK; 3.1.1 keeps its own.
    let max_ka = settings.max_keepalive_secs;
    let keepalive_secs = match connect.keep_alive_secs {
        ka if connect.protocol == ProtocolVersion::V5 && max_ka > 0 && (ka == 0 || ka > max_ka) => {
            max_ka
        }
        ka => ka,
    };
    debug!(%peer, conn, client_id = %connect.client_id, ?version, "CONNECT");

    let wire = Wire::new();
    if to_router
        .send(ToRouter::Register {
            conn,
            wire: wire.clone(),
        })
        .await
        .is_err()
    {
        return;
    }
    let connect_input = Input::Connect {
        conn,
        connect,
        credit: SEND_CREDIT,
        identity_verified,
    };
    if to_router
        .send(ToRouter::Input(connect_input))
        .await
        .is_err()
    {
        return;
    }
    let writer = tokio::spawn(write_loop(
        wr,
        wire.clone(),
        conn,
        version,
        settings.credit.clone(),
    ));

    // Keep alive: the client must send something within 1.5 times its interval (MQTT-3.1.2-22).
    let idle_limit =
        (keepalive_secs > 0).then(|| Duration::from_millis(u64::from(keepalive_secs) * 1500));
    loop {
        // A paused publisher is not read from until the broker resumes it.
        let paused = {
            let state = wire.lock();
            if state.writer_gone {
                break;
            }
            state.paused
        };
        if paused {
            tokio::select! {
                _ = wire.to_reader.notified() => continue,
                _ = stop.changed() => break,
            }
        }
        if *stop.borrow() {
            break;
        }
        let read = read_packet(
            &mut rd,
            &mut buf,
            &mut chunk,
            version,
            settings.max_packet_size,
        );
        // A wake-up for the reader (paused, or the writer gone) abandons the read, which
        // loses nothing: what was read stays in `buf`.
        let next = tokio::select! {
            r = async {
                match idle_limit {
                    Some(limit) => tokio::time::timeout(limit, read).await.ok(),
                    None => Some(read.await),
                }
            } => r,
            _ = wire.to_reader.notified() => continue,
            _ = stop.changed() => break,
        };
        match next {
            None => {
                debug!(%peer, conn, "keep alive expired");
                break;
            }
            Some(Ok(Some(packet))) => {
                let sent = match packet {
                    Packet::PubAck(_) | Packet::PubRec(_) | Packet::PubComp(_) => {
                        settings.acks.send((conn, packet)).await.is_ok()
                    }
                    packet => to_router
                        .send(ToRouter::Input(Input::Packet { conn, packet }))
                        .await
                        .is_ok(),
                };
                if !sent {
                    break;
                }
            }
            Some(Ok(None)) => break,
            Some(Err(ReadError::Io(error))) => {
                debug!(%peer, conn, %error, "read failed");
                break;
            }
            Some(Err(ReadError::Decode(error))) => {
                debug!(%peer, conn, %error, "malformed packet; closing");
                // The broker sends the DISCONNECT, after what it already queued.
                let _ = to_router
                    .send(ToRouter::Input(Input::Malformed { conn, error }))
                    .await;
                break;
            }
        }
    }
    // Whatever ended it, the broker detaches the session (it ignores a connection it has
    // already closed itself).
    let _ = to_router.send(ToRouter::Input(Input::Lost { conn })).await;
    // A writer stuck on a client that does not read is not waited for long.
    let mut writer = writer;
    if tokio::time::timeout(WRITER_GRACE, &mut writer)
        .await
        .is_err()
    {
        writer.abort();
    }
    debug!(%peer, conn, "connection closed");
}

/// Answers a CONNECT that could not be decoded with the CONNACK the spec asks for, where
/// there is one (an unsupported protocol level, MQTT-3.1.2-2).
async fn refuse_connect(wr: &mut (impl AsyncWrite + Unpin), e: &DecodeError) {
    if let DecodeError::UnsupportedProtocolVersion { .. } = e {
        let mut out = BytesMut::new();
        let ack = mqtt::ConnAck::new(mqtt::ReasonCode::UnsupportedProtocolVersion, false);
        // 3.1.1's CONNACK is what an old client can read.
        if Packet::ConnAck(ack)
            .encode(ProtocolVersion::V311, &mut out)
            .is_ok()
        {
            let _ = wr.write_all(&out).await;
        }
    }
}

enum ReadError {
    Io(std::io::Error),
    Decode(DecodeError),
}

/// Reads until one whole packet is decoded; `Ok(None)` at a clean end of stream.
async fn read_packet(
    rd: &mut (impl AsyncRead + Unpin),
    buf: &mut BytesMut,
    chunk: &mut usize,
    version: ProtocolVersion,
    max_packet_size: usize,
) -> Result<Option<Packet>, ReadError> {
    loop {
        if let Some(packet) =
            mqtt::decode(buf, version, max_packet_size).map_err(ReadError::Decode)?
        {
            return Ok(Some(packet));
        }
        if buf.is_empty() && buf.capacity() > BUFFER_KEEP {
            *buf = BytesMut::new();
        }
        buf.reserve((*chunk).min(max_packet_size));
        let spare = buf.capacity() - buf.len();
        match rd.read_buf(buf).await {
            Ok(0) => return Ok(None),
            Ok(n) if n == spare => *chunk = (*chunk * 2).min(READ_CHUNK_MAX),
            Ok(n) if n < spare / 4 => *chunk = (*chunk / 2).max(READ_CHUNK_MIN),
            Ok(_) => {}
            Err(e) => return Err(ReadError::Io(e)),
        }
    }
}

/// Encodes what the router queues, writes it in batches, and gives the credit back.
async fn write_loop(
    mut wr: impl AsyncWrite + Unpin,
    wire: Arc<Wire>,
    conn: ConnId,
    version: ProtocolVersion,
    credit: mpsc::UnboundedSender<(ConnId, usize)>,
) {
    let mut out = BytesMut::new();
    let mut batch = std::collections::VecDeque::new();
    loop {
        let close = {
            let mut state = wire.lock();
            std::mem::swap(&mut state.queue, &mut batch);
            state.close
        };
        if batch.is_empty() && !close {
            wire.to_writer.notified().await;
            continue;
        }
        let packets = batch.len();
        for p in batch.drain(..) {
            if let Err(e) = p.encode(version, &mut out) {
                warn!(conn, error = %e, "dropping a packet that cannot be encoded");
            }
        }
        if batch.capacity() > QUEUE_KEEP {
            batch = std::collections::VecDeque::new();
        }
        if !out.is_empty() && wr.write_all(&out).await.is_err() {
            break;
        }
        out.clear();
        if out.capacity() > BUFFER_KEEP {
            out = BytesMut::new();
        }
        if close {
            break;
        }
        // Unbounded by type, bounded by design: at most one message per write, and writes
        // need credit.
        if packets > 0 && credit.send((conn, packets)).is_err() {
            break;
        }
    }
    let _ = wr.shutdown().await;
    wire.lock().writer_gone = true;
    wire.to_reader.notify_one();
}

/// The router thread: applies inputs to the broker in batches, makes the batch's durable
/// changes durable in one commit, then dispatches the batch's actions (group commit). If a
/// commit fails, nothing of the batch is sent and the router stops.
fn router(
    broker: Broker,
    store: Store,
    log: Option<LogHooks>,
    rx: mpsc::Receiver<ToRouter>,
    lanes: Lanes,
) -> Result<(), StoreError> {
    // A runtime of its own, on this thread only: the router may block on a commit without
    // holding up the connections' tasks.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .map_err(|e| StoreError::Corrupt {
            table: "-",
            what: format!("cannot start the router: {e}"),
        })?;
    runtime.block_on(route_loop(broker, store, log, rx, lanes))
}

/// The router's inputs beside the main channel, served first.
struct Lanes {
    /// Writers' credit back.
    credit: mpsc::UnboundedReceiver<(ConnId, usize)>,
    /// Subscribers' PUBACK/PUBREC/PUBCOMP.
    acks: mpsc::Receiver<(ConnId, Packet)>,
    /// The cloud's acknowledgements of the outbox: (class, seq).
    outbox_acks: mpsc::UnboundedReceiver<(u8, u64)>,
    /// Woken after a commit that added records to the outbox.
    outbox_added: Arc<tokio::sync::Notify>,
    /// Messages from the cloud to publish here.
    downlink: mpsc::UnboundedReceiver<crate::link::Downlink>,
}

async fn route_loop(
    mut broker: Broker,
    store: Store,
    mut log: Option<LogHooks>,
    mut rx: mpsc::Receiver<ToRouter>,
    lanes: Lanes,
) -> Result<(), StoreError> {
    let Lanes {
        mut credit,
        mut acks,
        mut outbox_acks,
        outbox_added,
        mut downlink,
    } = lanes;
    // Who waits for this batch's commit to have applied downlink messages.
    let mut downlink_done = Vec::new();
    // Outbox deletes waiting for the next commit.
    let mut deletes: Vec<StoreOp> = Vec::new();
    let mut conns: HashMap<ConnId, Arc<Wire>> = HashMap::new();
    let mut actions = Vec::new();
    // Connections whose reader ended; their handles go after this batch's actions went out,
    // so that a last CONNACK or DISCONNECT still reaches the writer.
    let mut gone = Vec::new();
    let mut commits = CommitStats::default();
    loop {
        // Credit first: a subscriber's writer waiting for it must not queue behind a flood
        // of publishes.
        let first = tokio::select! {
            biased;
            Some((conn, packets)) = credit.recv() => ToRouter::Input(Input::Written { conn, packets }),
            Some((conn, packet)) = acks.recv() => ToRouter::Input(Input::Packet { conn, packet }),
            Some((priority, seq)) = outbox_acks.recv() => ToRouter::OutboxAck { priority, seq },
            Some(down) = downlink.recv() => ToRouter::Downlink(down),
            Some(msg) = next_delivery(&mut log), if broker.deliveries_held() == 0 => {
                ToRouter::Input(Input::Deliver(msg))
            }
            msg = rx.recv() => match msg {
                Some(msg) => msg,
                None => break,
            },
        };
        let now = Instant::now();
        let held_before = broker.deliveries_held();
        let mut deliveries = 0;
        let mut next = Some(first);
        let mut n = 0;
        while let Some(msg) = next {
            match msg {
                ToRouter::Register { conn, wire } => {
                    conns.insert(conn, wire);
                }
                ToRouter::SetAuth(auth) => broker.set_auth(auth),
                ToRouter::Input(input) => {
                    deliveries += usize::from(matches!(input, Input::Deliver(_)));
                    let lost = match &input {
                        Input::Lost { conn } => Some(*conn),
                        _ => None,
                    };
                    broker.handle(input, now, &mut actions);
                    gone.extend(lost);
                }
                ToRouter::Stats(reply) => {
                    let _ = reply.send((broker.stats(), commits));
                }
                ToRouter::Clients(reply) => {
                    let _ = reply.send(broker.clients());
                }
                ToRouter::OutboxAck { priority, seq } => {
                    deletes.push(StoreOp::OutboxDelete { priority, seq });
                }
                ToRouter::Downlink((msgs, seq, done)) => {
                    for msg in msgs {
                        broker.handle(Input::Deliver(msg), now, &mut actions);
                    }
                    deletes.push(StoreOp::DownlinkApplied { seq });
                    downlink_done.push(done);
                }
            }
            while let Ok((priority, seq)) = outbox_acks.try_recv() {
                deletes.push(StoreOp::OutboxDelete { priority, seq });
            }
            while let Ok((conn, packets)) = credit.try_recv() {
                broker.handle(Input::Written { conn, packets }, now, &mut actions);
            }
            while let Ok((conn, packet)) = acks.try_recv() {
                broker.handle(Input::Packet { conn, packet }, now, &mut actions);
            }
            n += 1;
            next = if n < ROUTER_BATCH {
                let delivery = log
                    .as_mut()
                    .filter(|_| broker.deliveries_held() == 0)
                    .and_then(|l| l.deliveries.try_recv().ok());
                match delivery {
                    Some(msg) => Some(ToRouter::Input(Input::Deliver(msg))),
                    None => rx.try_recv().ok(),
                }
            } else {
                None
            };
        }
        if let Some(log) = &mut log {
            // What this batch accepted is in the log before any of its acknowledgements.
            let appends = broker.take_appends();
            if !appends.is_empty() {
                (log.append)(appends).await.map_err(StoreError::Log)?;
            }
        }
        let mut ops = broker.take_store_ops();
        ops.append(&mut deletes);
        if !ops.is_empty() {
            let started = Instant::now();
            let removed = store.apply(&ops)?;
            broker.outbox_applied(removed.acked, removed.dropped);
            if ops.iter().any(|op| matches!(op, StoreOp::OutboxPut { .. })) {
                outbox_added.notify_one();
            }
            let took = started.elapsed();
            for done in downlink_done.drain(..) {
                let _ = done.send(());
            }
            commits.commits += 1;
            commits.total += took;
            commits.max = commits.max.max(took);
        }
        if let Some(log) = &mut log {
            let routed = held_before + deliveries - broker.deliveries_held();
            if routed > 0 {
                (log.delivered)(routed);
            }
        }
        dispatch(&mut conns, &mut actions);
        for conn in gone.drain(..) {
            // The writer sends what is still queued (a last DISCONNECT), then closes.
            if let Some(wire) = conns.remove(&conn) {
                wire.close();
            }
        }
    }
    Ok(())
}

fn dispatch(conns: &mut HashMap<ConnId, Arc<Wire>>, actions: &mut Vec<Action>) {
    for action in actions.drain(..) {
        match action {
            Action::Send(conn, packet) => {
                let Some(wire) = conns.get(&conn) else {
                    continue;
                };
                if !wire.send(packet) {
                    // Its writer is full beyond the credit: a client that does not read.
                    warn!(conn, "client is not reading its acknowledgements; closing");
                    wire.abort();
                    conns.remove(&conn);
                }
            }
            Action::Close(conn) => {
                if let Some(wire) = conns.remove(&conn) {
                    wire.close();
                }
            }
            Action::PauseReads(conn) => {
                if let Some(wire) = conns.get(&conn) {
                    wire.set_paused(true);
                }
            }
            Action::ResumeReads(conn) => {
                if let Some(wire) = conns.get(&conn) {
                    wire.set_paused(false);
                }
            }
        }
    }
}
