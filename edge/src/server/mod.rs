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
//! anyway (a client that sends but never reads) is closed. Nothing ticks: the router sleeps
//! until its next input or the broker's next deadline ([`Broker::poll_timeout`]), and the
//! broker, not the connection, decides when a client's keep alive ran out.
//!
//! This file holds [`Server`], which starts everything; `listeners` has the accept loops,
//! `tls` and `websocket` the handshakes, `connection` one connection's reader and writer,
//! `router` the router thread with its group commit and the [`LogHooks`] of log mode, and
//! `edge_side` (feature `edge`) what only the edge runs: the outbox, the link's lanes into
//! the router, the link.

mod connection;
#[cfg(feature = "edge")]
mod edge_side;
mod listeners;
mod router;
pub mod tls;
mod websocket;

pub use router::{
    AppendFuture, ClusterSessions, CommitStats, LogHooks, ReplayFuture, SessionFuture,
    CHECKPOINT_INTERVAL,
};

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch, Semaphore};
use tracing::info;

use crate::auth::{Auth, AuthError};
use crate::broker::{Broker, ClientInfo, SessionInfo, Stats};
use crate::config::Config;
use crate::store::{Store, StoreError};
use connection::ConnSettings;
use listeners::{accept_loop, Transport};
use router::{router, Lanes, ToRouter};

/// Acknowledgements from subscribers waiting for the router (see `ConnSettings::acks`).
const ACK_LANE: usize = 4096;

/// Credit coming back from writers, waiting for the router: each writer sends at most one
/// message per write, so this is a few per connection; a full lane makes writers wait for
/// the router, which serves this lane first.
const CREDIT_LANE: usize = 4096;

/// A running broker: its local addresses and a way to ask for statistics.
#[derive(Clone)]
pub struct Server {
    to_router: mpsc::Sender<ToRouter>,
    local_addrs: Vec<SocketAddr>,
    tls_addrs: Vec<SocketAddr>,
    ws_addrs: Vec<SocketAddr>,
    wss_addrs: Vec<SocketAddr>,
    failed: watch::Receiver<Option<String>>,
    /// True once the router thread has ended (and the store with it).
    router_done: watch::Receiver<bool>,
    /// One permit per open connection, `max_connections` in all.
    connections: Arc<Semaphore>,
    max_connections: u32,
    /// What a connection made inside the process needs (see [`Server::connect_internal`]).
    internal: Arc<Internal>,
    /// The field sources (`[field]`), started with the server, replaced by
    /// [`Server::reload_field`].
    #[cfg(feature = "field")]
    field: crate::field::Field,
    /// The outbox and the link.
    #[cfg(feature = "edge")]
    edge: edge_side::EdgeSide,
}

/// What [`Server::connect_internal`] hands a connection that has no socket.
struct Internal {
    next_id: Arc<AtomicU64>,
    settings: Arc<ConnSettings>,
    stop: watch::Receiver<bool>,
}

/// How many bytes an in-process connection's pipe holds each way (see
/// [`Server::connect_internal`]): a few typical packets; the writer waits when it is full,
/// as a socket's would.
const INTERNAL_PIPE: usize = 64 * 1024;

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
        if let Some(log) = &log {
            broker.use_log();
            if log.cluster.is_some() {
                broker.fetch_sessions();
            }
            if log.sessions.is_some() {
                broker.report_sessions();
            }
        }
        broker.set_auth(Arc::new(config.load_auth()?));
        #[cfg(feature = "edge")]
        let (mut edge, cloud_lanes) =
            edge_side::EdgeSide::open(&config.uplink, &store, &mut broker)?;
        #[cfg(not(feature = "edge"))]
        let cloud_lanes = router::cloud_lanes::CloudLanes;
        broker.restore(store.load()?, Instant::now());
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
        let (router_done_tx, router_done) = watch::channel(false);
        let (credit_tx, credit_rx) = mpsc::channel(CREDIT_LANE);
        let (acks_tx, acks_rx) = mpsc::channel(ACK_LANE);
        let lanes = Lanes {
            credit: credit_rx,
            acks: acks_rx,
            cloud: cloud_lanes,
        };
        std::thread::Builder::new()
            .name("ferry-router".into())
            .spawn(move || {
                if let Err(e) = router(broker, store, log, from_conns, lanes) {
                    tracing::error!(error = %e, "storage failed; the broker stops");
                    let _ = failed_tx.send(Some(e.to_string()));
                }
                let _ = router_done_tx.send(true);
            })?;

        let (stop_tx, stop_rx) = watch::channel(false);
        tokio::spawn(async move {
            shutdown.await;
            let _ = stop_tx.send(true);
        });
        let next_id = Arc::new(AtomicU64::new(1));
        let max_connections = u32::try_from(config.server.max_connections)
            .unwrap_or(u32::MAX)
            .min(Semaphore::MAX_PERMITS as u32);
        let limit = Arc::new(Semaphore::new(max_connections as usize));
        let settings = Arc::new(ConnSettings {
            credit: credit_tx,
            acks: acks_tx,
            connect_timeout: Duration::from_secs(config.server.connect_timeout_secs),
            max_packet_size: config.mqtt.max_packet_size_bytes as usize,
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
        let internal = Arc::new(Internal {
            next_id: next_id.clone(),
            settings: settings.clone(),
            stop: stop_rx.clone(),
        });
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
        #[cfg(feature = "edge")]
        edge.start_link(
            &config.uplink,
            RouterHandle(to_router.clone()),
            stop_rx.clone(),
        );
        let server = Self {
            to_router,
            local_addrs,
            tls_addrs,
            ws_addrs,
            wss_addrs,
            failed,
            router_done,
            connections: limit,
            max_connections,
            internal,
            #[cfg(feature = "field")]
            field: crate::field::Field::default(),
            #[cfg(feature = "edge")]
            edge,
        };
        #[cfg(feature = "field")]
        server.field.reload(&server, &config.field);
        Ok(server)
    }

    /// Replaces the field sources with those of `config` (SIGHUP): the old ones' broker
    /// connections close, MQTT clients stay.
    #[cfg(feature = "field")]
    pub fn reload_field(&self, config: &crate::field::FieldConfig) {
        self.field.reload(self, config);
    }

    /// The field sources' figures (`/api/field`, the metrics).
    #[cfg(feature = "field")]
    pub fn field_sources(&self) -> Vec<crate::field::stats::SourceSnapshot> {
        self.field.snapshot()
    }

    /// A connection from inside the process (the field sources of `crate::field`): the
    /// returned end of an in-memory pipe speaks MQTT to the broker exactly as a socket
    /// would, so what it publishes takes the whole path of a client's publish (ACL, outbox,
    /// retained messages, flow control) and what it subscribes to reaches it the same way.
    /// The CONNECT's username is taken as `identity`, verified, as for a client
    /// certificate: no password is checked, the ACL applies to it. It takes one of
    /// `max_connections`, and ends with the server. `None` once `max_connections` are open.
    pub fn connect_internal(&self, identity: String) -> Option<tokio::io::DuplexStream> {
        let permit = self.connections.clone().try_acquire_owned().ok()?;
        let (ours, theirs) = tokio::io::duplex(INTERNAL_PIPE);
        let conn = self
            .internal
            .next_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let to_router = self.to_router.clone();
        let settings = self.internal.settings.clone();
        let stop = self.internal.stop.clone();
        let peer = SocketAddr::from(([0, 0, 0, 0], 0));
        tokio::spawn(async move {
            connection::connection(ours, Some(identity), peer, conn, to_router, settings, stop)
                .await;
            drop(permit);
        });
        Some(theirs)
    }

    /// After the `shutdown` future given to [`Server::start`] completed: waits until every
    /// connection has ended (readers stop at once; each writer sends what is queued for it,
    /// including acknowledgements still waiting for the log, then closes), then lets the
    /// router finish its batch and its appends in flight, commit, and end, closing the
    /// store. False if that took longer than `deadline` (what was not acknowledged by then
    /// is not lost: it was never acknowledged, or it is durable).
    pub async fn stopped(&self, deadline: Duration) -> bool {
        #[cfg(feature = "field")]
        self.field.stop();
        tokio::time::timeout(deadline, async {
            let _all_closed = self.connections.acquire_many(self.max_connections).await;
            let _ = self.to_router.send(ToRouter::Stop).await;
            let mut done = self.router_done.clone();
            let _ = done.wait_for(|d| *d).await;
        })
        .await
        .is_ok()
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

    /// Before the shutdown: tells every client the server is going away, after what it is
    /// owed (see [`Input::Drain`](crate::broker::Input::Drain)); an MQTT 5 client gets
    /// DISCONNECT 0x9C with the next of `references` (`host:port` of another server), or
    /// 0x8B with none.
    pub async fn drain(&self, references: Vec<String>) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        if self
            .to_router
            .send(ToRouter::Drain(references, tx))
            .await
            .is_ok()
        {
            let _ = rx.await;
        }
    }

    /// A node in a cluster: the session of `client_id` now lives on another node (see
    /// [`Input::TakenElsewhere`](crate::broker::Input::TakenElsewhere)).
    pub async fn taken_elsewhere(&self, client_id: String) {
        let input = crate::broker::Input::TakenElsewhere { client_id };
        let _ = self.to_router.send(ToRouter::Input(input)).await;
    }

    /// A node in a cluster, at start: retained messages published before it followed the
    /// log (see [`Input::Retained`](crate::broker::Input::Retained)).
    pub async fn seed_retained(&self, messages: Vec<Arc<crate::broker::Message>>) {
        let input = crate::broker::Input::Retained(messages);
        let _ = self.to_router.send(ToRouter::Input(input)).await;
    }

    /// The persistent sessions, connected or not, with what is held for each.
    pub async fn persistent_sessions(&self) -> Option<Vec<SessionInfo>> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.to_router.send(ToRouter::Sessions(tx)).await.ok()?;
        rx.await.ok()
    }

    /// The broker's counters and the storage commit figures.
    pub async fn metrics(&self) -> Option<(Stats, CommitStats)> {
        RouterHandle(self.to_router.clone()).metrics().await
    }
}

/// What asks the router for its figures from outside the server's connections (the link,
/// for its STATUS frames).
#[derive(Debug, Clone)]
pub(crate) struct RouterHandle(mpsc::Sender<ToRouter>);

impl RouterHandle {
    /// The broker's counters and the storage commit figures; None once the router stopped.
    pub(crate) async fn metrics(&self) -> Option<(Stats, CommitStats)> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.0.send(ToRouter::Stats(tx)).await.ok()?;
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
    #[cfg(feature = "edge")]
    #[error(transparent)]
    Uplink(#[from] crate::uplink::UplinkError),
}
