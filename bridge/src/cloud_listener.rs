//! The cloud's end of the link: accepts edges over QUIC, takes each edge's identity from
//! its verified certificate (never from what it says), refuses edges on the deny list,
//! hands their record batches to the ingest path ([`Sink`]) in order, and acknowledges each
//! class's committed sequence once it is durable. A second link of the same edge replaces
//! the first.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use ferry_protocol::link_frames::{Frame, GoAwayCode};
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::cloud_end::{CloudEnd, CloudEndConfig, Effect};
use crate::error::{LinkError, SinkError};
pub use crate::fleet::EdgeLink;
use crate::fleet::{EdgeRecord, Fleet, SAMPLE_EVERY_MS};
use crate::quic::{
    self, FrameReader, FrameWriter, PeerIdentity, SetupError, StreamError, Timeouts, TlsFiles,
};
use crate::BoxFuture;

/// Where an edge's records go: the cloud's ingest path.
///
/// A failure is a [`SinkError`] of some [`FailureKind`](crate::FailureKind); whatever the
/// kind, it ends that edge's link (GOAWAY Unavailable when the ingest path failed), and the
/// edge sends again what was not acknowledged once it has reconnected.
pub trait Sink: Send + Sync + 'static {
    /// Per priority class, the highest sequence of `edge` committed to the log.
    fn committed(&self, edge: &str) -> Vec<(u8, u64)>;
    /// Appends the records of these batches (in order, one class) not yet in the log. The
    /// future completes once they are durable in the log, with a second future that makes
    /// the class's committed sequence durable and returns it (the link appends the next
    /// batches meanwhile). An error means none of them is acknowledged; the link is closed
    /// and the edge sends them again.
    fn ingest(&self, edge: String, class: u8, batches: Vec<Bytes>) -> BoxFuture<'static, Appended>;

    /// The downlink sequence `edge` has acknowledged, as the cloud recorded it (0: none).
    fn downlink_acked(&self, edge: &str) -> u64;
    /// The downlink after sequence `after`: the sequence read up to, and a record batch of
    /// `edge`'s messages among what was read (offsets = sequence numbers, keys = topics on
    /// the edge), if any. Completes without waiting for new messages.
    fn downlink(&self, edge: String, after: u64)
        -> BoxFuture<'static, Result<Downlink, SinkError>>;
    /// Changes when the downlink may have new messages.
    fn downlink_changed(&self) -> tokio::sync::watch::Receiver<u64>;
    /// `edge` applied its downlink messages up to `seq`: record it durably.
    fn downlink_ack(&self, edge: String, seq: u64) -> BoxFuture<'static, Result<(), SinkError>>;

    /// Before `edge`'s link is welcomed, and every [`Sink::claim_every`] while it lives: may
    /// this node serve it? In a cluster one node at a time does (a lease in the database),
    /// and a node that takes an edge over first learns what the others took of it. An error
    /// refuses the link, or ends it (GOAWAY Unavailable with the error as the reason): the
    /// edge tries again, at another node if it knows several. Default: always.
    fn claim(&self, _edge: &str) -> BoxFuture<'static, Result<(), SinkError>> {
        Box::pin(async { Ok(()) })
    }

    /// How often a live link claims again (None: it need not).
    fn claim_every(&self) -> Option<Duration> {
        None
    }

    /// `edge`'s link on this node ended (after a successful [`Sink::claim`]).
    fn release(&self, _edge: &str) {}
}

/// What [`Sink::downlink`] read: up to which sequence, and the edge's messages among it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Downlink {
    pub read_to: u64,
    pub batch: Option<Bytes>,
}

/// What [`Sink::ingest`] gives: the records are in the log; the commit is to run.
pub type Appended = Result<BoxFuture<'static, Result<u64, SinkError>>, SinkError>;

/// `[link]` of the cloud, as the server takes it.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub tls: TlsFiles,
    /// A file of revoked edge ids or certificate serial numbers (hex), one per line, `#`
    /// comments; read at start and on [`LinkServer::reload_deny`].
    pub deny_file: Option<PathBuf>,
    pub timeouts: Timeouts,
    /// Bytes of BATCH frames an edge may have in flight (unacknowledged).
    pub credit_bytes: u64,
    pub max_frame_bytes: usize,
}

/// The running link listener.
pub struct LinkServer {
    endpoint: quinn::Endpoint,
    config: ServerConfig,
    sink: Arc<dyn Sink>,
    deny: RwLock<HashSet<String>>,
    /// Edge id → its current link.
    links: Mutex<HashMap<String, Live>>,
    /// Every edge seen since the start, for the admin API and the console.
    fleet: Mutex<Fleet>,
    next_id: AtomicU64,
}

struct Live {
    id: u64,
    conn: quinn::Connection,
    serial: String,
}

impl std::fmt::Debug for LinkServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinkServer")
            .field("listen", &self.config.listen)
            .finish_non_exhaustive()
    }
}

/// Why the deny list could not be read.
#[derive(Debug, thiserror::Error)]
#[error("deny list {path}: {source}")]
pub struct DenyError {
    path: PathBuf,
    source: std::io::Error,
}

/// Why the deny list could not be changed.
#[derive(Debug, thiserror::Error)]
pub enum DenyEditError {
    #[error("there is no deny list: set [link] deny_file")]
    NoFile,
    #[error(transparent)]
    Io(DenyError),
}

impl LinkServer {
    /// Binds the link's UDP port and starts accepting edges.
    pub fn start(config: ServerConfig, sink: Arc<dyn Sink>) -> Result<Arc<Self>, StartError> {
        let endpoint = quic::server(config.listen, &config.tls, config.timeouts)?;
        let server = Arc::new(Self {
            endpoint,
            config,
            sink,
            deny: RwLock::new(HashSet::new()),
            links: Mutex::new(HashMap::new()),
            fleet: Mutex::new(Fleet::default()),
            next_id: AtomicU64::new(1),
        });
        server.reload_deny()?;
        info!(addr = %server.local_addr(), "listening for edges (QUIC)");
        tokio::spawn(accept_loop(server.clone()));
        tokio::spawn(sample_fleet(Arc::downgrade(&server)));
        Ok(server)
    }

    /// The bound address (for a `listen` with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.endpoint.local_addr().unwrap_or(self.config.listen)
    }

    /// Reads the deny list again and closes the links of edges now on it. Returns how many
    /// entries it has.
    pub fn reload_deny(&self) -> Result<usize, DenyError> {
        let Some(path) = &self.config.deny_file else {
            return Ok(0);
        };
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            // No file yet: nobody is denied.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(source) => {
                return Err(DenyError {
                    path: path.clone(),
                    source,
                })
            }
        };
        let deny: HashSet<String> = text
            .lines()
            .map(|l| l.split('#').next().unwrap_or("").trim())
            .filter(|l| !l.is_empty())
            .map(|l| l.to_owned())
            .collect();
        let n = deny.len();
        *self.deny.write().unwrap_or_else(|e| e.into_inner()) = deny;
        let links = self.links.lock().unwrap_or_else(|e| e.into_inner());
        for (edge, live) in links.iter() {
            if self.denied(edge, &live.serial) {
                warn!(edge = %edge, "edge is on the deny list; closing its link");
                live.conn
                    .close((GoAwayCode::Denied as u32).into(), b"denied");
            }
        }
        Ok(n)
    }

    /// Puts `names` (an edge id, a certificate serial) on the deny list, or takes them off
    /// it: the deny file is rewritten (through a new file renamed over it) and applied at
    /// once, as by [`LinkServer::reload_deny`] (a denied edge's link is closed). Returns
    /// how many entries the list has.
    pub fn set_denied(&self, names: &[&str], denied: bool) -> Result<usize, DenyEditError> {
        let path = self
            .config
            .deny_file
            .as_ref()
            .ok_or(DenyEditError::NoFile)?;
        let io = |source| {
            DenyEditError::Io(DenyError {
                path: path.clone(),
                source,
            })
        };
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(io(e)),
        };
        let entry = |line: &str| line.split('#').next().unwrap_or("").trim().to_owned();
        let named = |line: &str| {
            let e = entry(line);
            names.iter().any(|n| n.eq_ignore_ascii_case(&e))
        };
        let mut out: String = text
            .lines()
            .filter(|l| denied || !named(l))
            .map(|l| format!("{l}\n"))
            .collect();
        if denied {
            let present: Vec<String> = text.lines().map(entry).collect();
            if let Some(first) = names.first().filter(|n| !present.iter().any(|p| p == *n)) {
                out.push_str(&format!("{first}\n"));
            }
        }
        let tmp = path.with_extension("new");
        std::fs::write(&tmp, out).map_err(io)?;
        std::fs::rename(&tmp, path).map_err(io)?;
        self.reload_deny().map_err(DenyEditError::Io)
    }

    /// Whether `edge_id`, or the certificate `serial`, is on the deny list.
    pub fn denied(&self, edge_id: &str, serial: &str) -> bool {
        let deny = self.deny.read().unwrap_or_else(|e| e.into_inner());
        deny.contains(edge_id) || deny.contains(serial) || deny.contains(&serial.to_uppercase())
    }

    /// The edges connected now.
    pub fn edges(&self) -> Vec<EdgeLink> {
        self.fleet().links()
    }

    /// Every edge that linked or was refused since the start: its link, figures and
    /// history (see [`crate::fleet`]).
    pub fn fleet_edges(&self) -> Vec<EdgeRecord> {
        self.fleet().edges()
    }

    /// One edge of [`LinkServer::fleet_edges`].
    pub fn fleet_edge(&self, edge: &str) -> Option<EdgeRecord> {
        self.fleet().edge(edge)
    }

    fn fleet(&self) -> std::sync::MutexGuard<'_, Fleet> {
        self.fleet.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Closes every link (GOAWAY-less: the edges reconnect and resume) and the listener.
    pub fn close(&self) {
        self.endpoint
            .close((GoAwayCode::Shutdown as u32).into(), b"shutdown");
    }
}

/// Samples every edge's figures into its history while the server runs.
async fn sample_fleet(server: std::sync::Weak<LinkServer>) {
    let mut every = tokio::time::interval(Duration::from_millis(SAMPLE_EVERY_MS));
    loop {
        every.tick().await;
        let Some(server) = server.upgrade() else {
            return;
        };
        server.fleet().tick(now_ms());
    }
}

/// Why the link listener could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Setup(#[from] SetupError),
    #[error(transparent)]
    Deny(#[from] DenyError),
}

async fn accept_loop(server: Arc<LinkServer>) {
    while let Some(incoming) = server.endpoint.accept().await {
        let server = server.clone();
        tokio::spawn(async move {
            let remote = incoming.remote_address();
            let conn = match incoming.await {
                Ok(c) => c,
                Err(e) => {
                    warn!(%remote, error = %e, "link handshake failed");
                    return;
                }
            };
            let Some(peer) = quic::peer_identity(&conn) else {
                warn!(%remote, "link without a usable certificate; closing");
                conn.close((GoAwayCode::Denied as u32).into(), b"no identity");
                return;
            };
            if let Err(why) = serve(&server, &conn, &peer).await {
                warn!(edge = %peer.edge_id, %remote, error = %why, "link closed");
                conn.close(
                    (GoAwayCode::ProtocolError as u32).into(),
                    why.to_string().as_bytes(),
                );
            }
        });
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The handle of an appended group's metadata commit, as the [`CloudEnd`] keeps it.
type Commit = BoxFuture<'static, Result<u64, SinkError>>;

/// How a link ended without an error.
enum Ended {
    /// The edge closed it, or the cloud is going away.
    Closed,
    /// The edge was refused with a GOAWAY of this code, queued: on the deny list
    /// (Denied), or not to be served by this node ([`Sink::claim`], Unavailable).
    Refused(GoAwayCode),
}

/// One edge's link, from HELLO to its end: the driver of its [`CloudEnd`]. A reader task
/// takes frames off the stream, a writer task puts them on it; this task feeds the end,
/// runs what it asks for (the ingest path, commits, the downlink) and sleeps until its
/// next deadline.
async fn serve(
    server: &Arc<LinkServer>,
    conn: &quinn::Connection,
    peer: &PeerIdentity,
) -> Result<(), LinkError> {
    let idle = server.config.timeouts.idle;
    let (send, recv) = tokio::time::timeout(idle, conn.accept_bi())
        .await
        .map_err(|_| LinkError::NoStream {
            secs: idle.as_secs(),
        })??;
    let mut end = CloudEnd::new(
        CloudEndConfig {
            credit_bytes: server.config.credit_bytes,
            max_frame_bytes: server.config.max_frame_bytes,
            handshake_timeout: idle,
        },
        Instant::now(),
    );
    // The reader stops when the driver stops taking frames (a full ingest queue): then
    // QUIC's flow control slows the edge. One frame waits in the channel at most.
    let (frames_tx, mut frames) = mpsc::channel(1);
    let reading = tokio::spawn(crate::quic::read_frames(
        FrameReader::new(recv, server.config.max_frame_bytes),
        frames_tx,
    ));
    let (out, out_rx) = mpsc::channel::<Frame>(OUT_FRAMES);
    let writing = tokio::spawn(write_frames(FrameWriter::new(send), out_rx));
    let mut live = None;
    let result = drive(server, conn, peer, (&mut end, &mut frames, &out), &mut live).await;
    if live.is_some() {
        // The sink's claim succeeded before the link was registered.
        server.sink.release(&peer.edge_id);
    }
    reading.abort();
    // What is still queued (a last ACK, a GOAWAY) goes out before the connection closes.
    while let Some(frame) = end.poll_transmit() {
        if !matches!(
            tokio::time::timeout(Duration::from_secs(1), out.send(frame)).await,
            Ok(Ok(()))
        ) {
            break;
        }
    }
    drop(out);
    let _ = tokio::time::timeout(Duration::from_secs(1), writing).await;
    if let Some(id) = live {
        let mut links = server.links.lock().unwrap_or_else(|e| e.into_inner());
        let replaced = links.get(&peer.edge_id).is_none_or(|l| l.id != id);
        if !replaced {
            links.remove(&peer.edge_id);
        }
        drop(links);
        let reason = match &result {
            _ if replaced => "replaced by a new link".to_owned(),
            Ok(_) => "closed".to_owned(),
            Err(why) => why.to_string(),
        };
        server.fleet().unlinked(&peer.edge_id, id, reason, now_ms());
    }
    match result? {
        Ended::Closed => {}
        Ended::Refused(code) => {
            // Let the GOAWAY reach the edge before the connection goes.
            tokio::time::sleep(Duration::from_millis(100)).await;
            if code == GoAwayCode::Denied {
                conn.close((code as u32).into(), b"denied");
                warn!(edge = %peer.edge_id, serial = %peer.serial, "denied edge refused");
            } else {
                conn.close((code as u32).into(), b"unavailable");
            }
        }
    }
    Ok(())
}

/// As good as never, for a timer that need not fire.
const NEVER: Duration = Duration::from_secs(365 * 86_400);

/// The link's end and its frame channels, for [`drive`].
type Wires<'a> = (
    &'a mut CloudEnd<Commit>,
    &'a mut mpsc::Receiver<Result<Option<Frame>, StreamError>>,
    &'a mpsc::Sender<Frame>,
);

async fn drive(
    server: &Arc<LinkServer>,
    conn: &quinn::Connection,
    peer: &PeerIdentity,
    (end, frames, out): Wires<'_>,
    live: &mut Option<u64>,
) -> Result<Ended, LinkError> {
    let edge = &peer.edge_id;
    let sink = &server.sink;
    let mut changed = sink.downlink_changed();
    let mut claim: Option<BoxFuture<'static, Result<(), SinkError>>> = None;
    let claim_every = sink.claim_every();
    let mut next_claim = tokio::time::Instant::now() + claim_every.unwrap_or(NEVER);
    let mut ingest: Option<BoxFuture<'static, Appended>> = None;
    let mut commit: Option<Commit> = None;
    let mut down_read: Option<BoxFuture<'static, Result<Downlink, SinkError>>> = None;
    let mut down_ack: Option<BoxFuture<'static, Result<u64, SinkError>>> = None;
    loop {
        while let Some(effect) = end.poll_effect() {
            match effect {
                Effect::Hello {
                    software, version, ..
                } => {
                    if server.denied(edge, &peer.serial) {
                        let reason = format!("edge {edge} is on the deny list");
                        server
                            .fleet()
                            .refused(edge, &peer.serial, reason.clone(), now_ms());
                        end.refuse(GoAwayCode::Denied, reason);
                        return Ok(Ended::Refused(GoAwayCode::Denied));
                    }
                    if let Err(e) = sink.claim(edge).await {
                        let reason = format!("edge {edge} not taken here: {e}");
                        info!(edge = %edge, reason, "link refused");
                        server
                            .fleet()
                            .refused(edge, &peer.serial, reason.clone(), now_ms());
                        end.refuse(GoAwayCode::Unavailable, reason);
                        return Ok(Ended::Refused(GoAwayCode::Unavailable));
                    }
                    if let Some(every) = claim_every {
                        next_claim = tokio::time::Instant::now() + every;
                    }
                    *live = Some(register(server, conn, peer, software, version));
                    end.welcome(
                        Instant::now(),
                        sink.committed(edge),
                        sink.downlink_acked(edge),
                    );
                    info!(edge = %edge, "edge linked");
                }
                Effect::Ingest { class, batches } => {
                    debug_assert!(ingest.is_none(), "one ingest at a time");
                    ingest = Some(sink.ingest(edge.clone(), class, batches));
                }
                Effect::Commit { commit: c, .. } => {
                    debug_assert!(commit.is_none(), "one commit at a time");
                    commit = Some(c);
                }
                Effect::ReadDown { after } => down_read = Some(sink.downlink(edge.clone(), after)),
                Effect::RecordDownAck { seq } => {
                    let recording = sink.downlink_ack(edge.clone(), seq);
                    down_ack = Some(Box::pin(async move { recording.await.map(|()| seq) }));
                }
                Effect::Acknowledged { records, bytes } => {
                    if let Some(id) = *live {
                        server.fleet().acked(edge, id, records, bytes, now_ms());
                    }
                }
                Effect::Status(status) => {
                    if let Some(id) = *live {
                        server.fleet().status(edge, id, status, now_ms());
                    }
                }
            }
        }
        if end.is_closed() {
            return Ok(Ended::Closed);
        }
        let deadline = end.poll_timeout();
        let sleep = tokio::time::sleep_until(
            deadline.map_or_else(tokio::time::Instant::now, tokio::time::Instant::from_std),
        );
        tokio::select! {
            frame = frames.recv(), if end.wants_frames() => match frame {
                Some(Ok(Some(frame))) => end.handle_frame(Instant::now(), frame)?,
                Some(Err(e)) => return Err(e.into()),
                Some(Ok(None)) | None if end.is_up() => return Ok(Ended::Closed),
                Some(Ok(None)) | None => return Err(LinkError::StreamClosed),
            },
            r = next_of(&mut ingest), if ingest.is_some() => {
                ingest = None;
                end.ingest_done(r)?;
            }
            r = next_of(&mut commit), if commit.is_some() => {
                commit = None;
                end.commit_done(r)?;
            }
            r = next_of(&mut down_read), if down_read.is_some() => {
                down_read = None;
                let d = r.map_err(LinkError::Downlink)?;
                end.downlink_read(d.read_to, d.batch);
            }
            r = next_of(&mut down_ack), if down_ack.is_some() => {
                down_ack = None;
                end.down_ack_recorded(r.map_err(LinkError::Downlink)?);
            }
            r = changed.changed() => match r {
                Ok(()) => end.downlink_changed(),
                // The cloud is going away.
                Err(_) => return Ok(Ended::Closed),
            },
            permit = out.reserve(), if end.has_transmit() => match permit {
                Ok(permit) => permit.send(end.poll_transmit().expect("has_transmit said so")),
                // The writer is gone: the stream failed.
                Err(_) => return Ok(Ended::Closed),
            },
            () = sleep, if deadline.is_some() => end.handle_timeout(Instant::now())?,
            () = tokio::time::sleep_until(next_claim), if live.is_some() && claim.is_none() => {
                claim = Some(sink.claim(edge));
            }
            r = next_of(&mut claim), if claim.is_some() => {
                claim = None;
                if let Err(e) = r {
                    // Another node may take the edge now: this link must not go on.
                    let reason = format!("edge {edge} no longer taken here: {e}");
                    warn!(edge = %edge, reason, "link ended");
                    end.refuse(GoAwayCode::Unavailable, reason);
                    return Ok(Ended::Refused(GoAwayCode::Unavailable));
                }
                next_claim = tokio::time::Instant::now() + claim_every.unwrap_or(NEVER);
            }
        }
    }
}

/// Records the edge's link (for the admin API) and closes the link it replaces.
fn register(
    server: &LinkServer,
    conn: &quinn::Connection,
    peer: &PeerIdentity,
    software: String,
    version: u16,
) -> u64 {
    let edge = &peer.edge_id;
    let id = server.next_id.fetch_add(1, Ordering::Relaxed);
    let now = now_ms();
    let info = EdgeLink {
        edge_id: edge.clone(),
        serial: peer.serial.clone(),
        remote: conn.remote_address(),
        software,
        version,
        since_unix_ms: now,
        records: 0,
        batch_bytes: 0,
        last_ack_unix_ms: 0,
    };
    server
        .fleet()
        .linked(id, info, peer.not_after_unix_secs, now);
    let mut links = server.links.lock().unwrap_or_else(|e| e.into_inner());
    let old = links.insert(
        edge.clone(),
        Live {
            id,
            conn: conn.clone(),
            serial: peer.serial.clone(),
        },
    );
    if let Some(old) = old {
        info!(edge = %edge, "a new link of the edge replaces the old one");
        old.conn
            .close((GoAwayCode::Replaced as u32).into(), b"replaced");
    }
    id
}

/// The output of the future in `slot`; never, if there is none.
async fn next_of<T>(slot: &mut Option<BoxFuture<'static, T>>) -> T {
    match slot {
        Some(f) => f.await,
        None => std::future::pending().await,
    }
}

/// Writes the driver's frames until it is done (then finishes the stream) or a write
/// fails.
async fn write_frames(mut writer: FrameWriter, mut frames: mpsc::Receiver<Frame>) {
    while let Some(frame) = frames.recv().await {
        if writer.send(&frame).await.is_err() {
            return;
        }
    }
    writer.finish();
}

/// Frames waiting for the link's writer: ACK and CREDIT (one round: two per priority class
/// in use) and DOWN (at most one per downlink read, DOWN_WINDOW sequences). A full queue
/// makes the acknowledgements and the downlink wait for the writer, which waits for QUIC
/// (the [`CloudEnd`] starts no commit or downlink read while frames wait for it).
const OUT_FRAMES: usize = 256;
