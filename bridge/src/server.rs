//! The cloud's end of the link: accepts edges over QUIC, takes each edge's identity from
//! its verified certificate (never from what it says), refuses edges on the deny list,
//! hands their record batches to the ingest path ([`Sink`]) in order, and acknowledges each
//! class's committed sequence once it is durable. A second link of the same edge replaces
//! the first.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use ferry_protocol::link::{Frame, GoAwayCode, VERSION};
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::quic::{self, FrameReader, FrameWriter, PeerIdentity, SetupError, Timeouts, TlsFiles};

/// A boxed future, as [`Sink`] returns.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Where an edge's records go: the cloud's ingest path.
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
    fn downlink(&self, edge: String, after: u64) -> BoxFuture<'static, Result<Downlink, String>>;
    /// Changes when the downlink may have new messages.
    fn downlink_changed(&self) -> tokio::sync::watch::Receiver<u64>;
    /// `edge` applied its downlink messages up to `seq`: record it durably.
    fn downlink_ack(&self, edge: String, seq: u64) -> BoxFuture<'static, Result<(), String>>;
}

/// What [`Sink::downlink`] read: up to which sequence, and the edge's messages among it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Downlink {
    pub read_to: u64,
    pub batch: Option<Bytes>,
}

/// What [`Sink::ingest`] gives: the records are in the log; the commit is to run.
pub type Appended = Result<BoxFuture<'static, Result<u64, String>>, String>;

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

/// One connected edge, for the admin API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EdgeLink {
    pub edge_id: String,
    pub serial: String,
    pub remote: SocketAddr,
    pub software: String,
    /// When the link came up (ms since the Unix epoch).
    pub since_unix_ms: u64,
    pub records: u64,
    pub batch_bytes: u64,
    pub last_ack_unix_ms: u64,
}

/// The running link listener.
pub struct LinkServer {
    endpoint: quinn::Endpoint,
    config: ServerConfig,
    sink: Arc<dyn Sink>,
    deny: RwLock<HashSet<String>>,
    /// Edge id → its current link.
    links: Mutex<HashMap<String, Live>>,
    next_id: AtomicU64,
}

struct Live {
    id: u64,
    conn: quinn::Connection,
    info: EdgeLink,
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
            next_id: AtomicU64::new(1),
        });
        server.reload_deny()?;
        info!(addr = %server.local_addr(), "listening for edges (QUIC)");
        tokio::spawn(accept_loop(server.clone()));
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
        for live in links.values() {
            if self.denied(&live.info.edge_id, &live.info.serial) {
                warn!(edge = %live.info.edge_id, "edge is on the deny list; closing its link");
                live.conn
                    .close((GoAwayCode::Denied as u32).into(), b"denied");
            }
        }
        Ok(n)
    }

    fn denied(&self, edge_id: &str, serial: &str) -> bool {
        let deny = self.deny.read().unwrap_or_else(|e| e.into_inner());
        deny.contains(edge_id) || deny.contains(serial) || deny.contains(&serial.to_uppercase())
    }

    /// The edges connected now.
    pub fn edges(&self) -> Vec<EdgeLink> {
        let links = self.links.lock().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<_> = links.values().map(|l| l.info.clone()).collect();
        out.sort_by(|a, b| a.edge_id.cmp(&b.edge_id));
        out
    }

    /// Closes every link (GOAWAY-less: the edges reconnect and resume) and the listener.
    pub fn close(&self) {
        self.endpoint
            .close((GoAwayCode::Shutdown as u32).into(), b"shutdown");
    }

    fn update(&self, edge: &str, id: u64, f: impl FnOnce(&mut EdgeLink)) {
        let mut links = self.links.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(live) = links.get_mut(edge).filter(|l| l.id == id) {
            f(&mut live.info);
        }
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
                conn.close((GoAwayCode::ProtocolError as u32).into(), why.as_bytes());
            }
        });
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// One edge's link, from HELLO to its end.
async fn serve(
    server: &Arc<LinkServer>,
    conn: &quinn::Connection,
    peer: &PeerIdentity,
) -> Result<(), String> {
    let (send, recv) = tokio::time::timeout(server.config.timeouts.idle, conn.accept_bi())
        .await
        .map_err(|_| "no stream opened".to_owned())?
        .map_err(|e| e.to_string())?;
    let mut writer = FrameWriter::new(send);
    let mut reader = FrameReader::new(recv, server.config.max_frame_bytes);
    let hello = tokio::time::timeout(server.config.timeouts.idle, reader.next())
        .await
        .map_err(|_| "no HELLO".to_owned())?
        .map_err(|e| e.to_string())?;
    let (software, edge_down_acked) = match hello {
        Some(Frame::Hello {
            version,
            software,
            down_acked,
            ..
        }) => {
            if version != VERSION {
                let _ = writer
                    .send(&Frame::GoAway {
                        code: GoAwayCode::UnsupportedVersion,
                        reason: format!("this cloud speaks link version {VERSION}"),
                    })
                    .await;
                writer.finish();
                return Err(format!("link version {version}"));
            }
            (software, down_acked)
        }
        other => return Err(format!("expected HELLO, got {other:?}")),
    };
    if server.denied(&peer.edge_id, &peer.serial) {
        let _ = writer
            .send(&Frame::GoAway {
                code: GoAwayCode::Denied,
                reason: format!("edge {} is on the deny list", peer.edge_id),
            })
            .await;
        writer.finish();
        // Let the GOAWAY reach the edge before the connection goes.
        tokio::time::sleep(Duration::from_millis(100)).await;
        conn.close((GoAwayCode::Denied as u32).into(), b"denied");
        warn!(edge = %peer.edge_id, serial = %peer.serial, "denied edge refused");
        return Ok(());
    }
    let edge = peer.edge_id.clone();
    let id = server.next_id.fetch_add(1, Ordering::Relaxed);
    {
        let mut links = server.links.lock().unwrap_or_else(|e| e.into_inner());
        let info = EdgeLink {
            edge_id: edge.clone(),
            serial: peer.serial.clone(),
            remote: conn.remote_address(),
            software,
            since_unix_ms: now_ms(),
            records: 0,
            batch_bytes: 0,
            last_ack_unix_ms: 0,
        };
        let old = links.insert(
            edge.clone(),
            Live {
                id,
                conn: conn.clone(),
                info,
            },
        );
        if let Some(old) = old {
            info!(edge = %edge, "a new link of the edge replaces the old one");
            old.conn
                .close((GoAwayCode::Replaced as u32).into(), b"replaced");
        }
    }
    let result = converse(server, &edge, id, edge_down_acked, writer, reader).await;
    let mut links = server.links.lock().unwrap_or_else(|e| e.into_inner());
    if links.get(&edge).is_some_and(|l| l.id == id) {
        links.remove(&edge);
    }
    result
}

async fn converse(
    server: &Arc<LinkServer>,
    edge: &str,
    id: u64,
    edge_down_acked: u64,
    mut writer: FrameWriter,
    mut reader: FrameReader,
) -> Result<(), String> {
    writer
        .send(&Frame::Welcome {
            version: VERSION,
            max_frame_bytes: server.config.max_frame_bytes as u32,
            credit_bytes: server.config.credit_bytes,
            committed: server.sink.committed(edge),
        })
        .await
        .map_err(|e| e.to_string())?;
    info!(edge, "edge linked");
    // One task writes: ACK and CREDIT from the acker, a last GOAWAY.
    let (out, mut out_rx) = mpsc::channel::<Frame>(OUT_FRAMES);
    let writing = tokio::spawn(async move {
        while let Some(frame) = out_rx.recv().await {
            if writer.send(&frame).await.is_err() {
                return;
            }
        }
        writer.finish();
    });
    // The receiver queues batches (bounded by the credit given: an edge that sends more is
    // closed); the ingester appends them in order, as many of a class at a time as are
    // queued; each group's metadata commit runs while the next group is appended, and the
    // acker answers them in order.
    let (batches_tx, mut batches) = mpsc::channel::<(u8, Bytes, u64)>(QUEUED_BATCHES);
    let (commits_tx, mut commits) = mpsc::channel::<Committing>(QUEUED_COMMITS);
    let outstanding = Arc::new(AtomicU64::new(0));
    let ingester = {
        let (server, edge) = (server.clone(), edge.to_owned());
        async move {
            let mut next = None;
            loop {
                let first = match next.take() {
                    Some(item) => item,
                    None => match batches.recv().await {
                        Some(item) => item,
                        None => return Ok(()),
                    },
                };
                let class = first.0;
                let mut bytes = first.1.len();
                let mut group = vec![first];
                while bytes < GROUP_BYTES {
                    match batches.try_recv() {
                        Ok(item) if item.0 == class => {
                            bytes += item.1.len();
                            group.push(item);
                        }
                        Ok(item) => {
                            next = Some(item);
                            break;
                        }
                        Err(_) => break,
                    }
                }
                let returned = group.iter().map(|(_, _, wire)| wire).sum();
                let records = group
                    .iter()
                    .filter_map(|(_, b, _)| ferry_protocol::kafka::BatchHeader::parse(b).ok())
                    .map(|h| h.records_count.max(0) as u64)
                    .sum();
                let group = group.into_iter().map(|(_, b, _)| b).collect();
                let commit = server
                    .sink
                    .ingest(edge.clone(), class, group)
                    .await
                    .map_err(|why| format!("ingest failed: {why}"))?;
                let committing = Committing {
                    class,
                    commit,
                    returned,
                    records,
                };
                if commits_tx.send(committing).await.is_err() {
                    return Ok(());
                }
            }
        }
    };
    let acker = {
        let (server, edge, out, outstanding) = (
            server.clone(),
            edge.to_owned(),
            out.clone(),
            outstanding.clone(),
        );
        async move {
            let mut last_round = tokio::time::Instant::now();
            while let Some(first) = commits.recv().await {
                // At most one round of metadata commits per ACK_INTERVAL: the records are
                // durable in the log already (subscribers see them); the acknowledgement
                // only lets the edge delete them, and fewer fsyncs leave the disk to the
                // appends that readers wait for.
                tokio::time::sleep_until(last_round + ACK_INTERVAL).await;
                last_round = tokio::time::Instant::now();
                // Everything appended meanwhile is acknowledged with one metadata commit
                // per class: the newest one's (sequences only grow).
                let mut ready = vec![first];
                while let Ok(c) = commits.try_recv() {
                    ready.push(c);
                }
                let returned: u64 = ready.iter().map(|c| c.returned).sum();
                let records: u64 = ready.iter().map(|c| c.records).sum();
                let mut newest: Vec<Committing> = Vec::new();
                for c in ready {
                    match newest.iter_mut().find(|n| n.class == c.class) {
                        Some(n) => *n = c,
                        None => newest.push(c),
                    }
                }
                for c in newest {
                    let committed = c
                        .commit
                        .await
                        .map_err(|why| format!("ingest failed: {why}"))?;
                    let _ = out
                        .send(Frame::Ack {
                            class: c.class,
                            committed_seq: committed,
                        })
                        .await;
                }
                let _ = out.send(Frame::Credit { bytes: returned }).await;
                outstanding.fetch_sub(returned, Ordering::Relaxed);
                server.update(&edge, id, |e| {
                    e.records += records;
                    e.batch_bytes += returned;
                    e.last_ack_unix_ms = now_ms();
                });
            }
            Ok(())
        }
    };
    // The downlink: from where the edge (or, if further, the cloud's record) says it
    // stands, the edge's messages as they are committed to the log; at most
    // DOWN_WINDOW unacknowledged.
    let down_acked = Arc::new(AtomicU64::new(
        edge_down_acked.max(server.sink.downlink_acked(edge)),
    ));
    let down_progress = Arc::new(tokio::sync::Notify::new());
    let downlinker = {
        let (server, edge, out) = (server.clone(), edge.to_owned(), out.clone());
        let (acked, progress) = (down_acked.clone(), down_progress.clone());
        async move {
            let mut changed = server.sink.downlink_changed();
            let mut read_to = acked.load(Ordering::Relaxed);
            let mut sent_to = read_to;
            loop {
                if sent_to.saturating_sub(acked.load(Ordering::Relaxed)) < DOWN_WINDOW {
                    changed.borrow_and_update();
                    let d = server.sink.downlink(edge.clone(), read_to).await?;
                    if d.read_to > read_to {
                        read_to = d.read_to;
                        if let Some(batch) = d.batch {
                            if let Ok(h) = ferry_protocol::kafka::BatchHeader::parse(&batch) {
                                sent_to = h.last_offset().max(0) as u64;
                            }
                            let _ = out.send(Frame::Down { batch }).await;
                        }
                        continue;
                    }
                }
                tokio::select! {
                    r = changed.changed() => if r.is_err() { return Ok::<(), String>(()) },
                    _ = progress.notified() => {}
                }
            }
        }
    };
    let limit = server.config.credit_bytes + server.config.max_frame_bytes as u64;
    let (server2, edge2) = (server.clone(), edge.to_owned());
    let receiver = async move {
        loop {
            match reader.next().await.map_err(|e| e.to_string())? {
                Some(Frame::Batch { class, batch }) => {
                    let wire = batch.len() as u64 + 6;
                    if outstanding.fetch_add(wire, Ordering::Relaxed) + wire > limit {
                        return Err("the edge sent past its credit".to_owned());
                    }
                    if batches_tx.send((class, batch, wire)).await.is_err() {
                        return Ok(());
                    }
                }
                Some(Frame::DownAck { seq }) => {
                    if seq > down_acked.load(Ordering::Relaxed) {
                        server2.sink.downlink_ack(edge2.clone(), seq).await?;
                        down_acked.store(seq, Ordering::Relaxed);
                        down_progress.notify_one();
                    }
                }
                Some(Frame::GoAway { code, reason }) => {
                    info!(edge = %edge2, ?code, %reason, "edge closed its link");
                    return Ok(());
                }
                Some(other) => return Err(format!("unexpected frame {other:?}")),
                None => return Ok(()),
            }
        }
    };
    let result: Result<(), String> = tokio::select! {
        r = ingester => r,
        r = acker => r,
        r = receiver => r,
        r = downlinker => r,
    };
    if let Err(why) = &result {
        if why.starts_with("ingest failed") {
            let goaway = Frame::GoAway {
                code: GoAwayCode::Unavailable,
                reason: why.clone(),
            };
            let _ = tokio::time::timeout(Duration::from_secs(1), out.send(goaway)).await;
        }
    }
    drop(out);
    // What is queued (a last ACK, the GOAWAY) goes out before the connection closes.
    let _ = tokio::time::timeout(Duration::from_secs(1), writing).await;
    result
}

/// A group appended to the log, its metadata commit to run.
struct Committing {
    class: u8,
    commit: BoxFuture<'static, Result<u64, String>>,
    /// Credit to give back once acknowledged.
    returned: u64,
    records: u64,
}

/// The shortest time between two rounds of acknowledgements (metadata commits) of a link.
const ACK_INTERVAL: Duration = Duration::from_millis(10);

/// Downlink messages (by sequence) sent and not yet acknowledged before the cloud waits.
const DOWN_WINDOW: u64 = 1024;

/// Up to this many bytes of batches go to the ingest path in one call.
const GROUP_BYTES: usize = 4 << 20;

/// Batches received and not yet handed to the ingest path, per link. The edge's credit
/// already bounds their bytes; this bounds their number (a flood of tiny batches), and when
/// it is reached the receiver stops reading, so QUIC's flow control slows the edge. 1,024
/// of the default 64 KiB-or-less batches stay within the 16 MiB credit.
const QUEUED_BATCHES: usize = 1024;

/// Groups appended and waiting for their metadata commit and acknowledgement, per link:
/// the acker takes them all each round (every ACK_INTERVAL), so a few rounds' worth is
/// enough; a full queue holds the next append back.
const QUEUED_COMMITS: usize = 64;

/// Frames waiting for the link's writer: ACK and CREDIT (one round: two per priority class
/// in use) and DOWN (at most one per downlink read, DOWN_WINDOW sequences). A full queue
/// makes the acker and the downlinker wait for the writer, which waits for QUIC.
const OUT_FRAMES: usize = 256;
