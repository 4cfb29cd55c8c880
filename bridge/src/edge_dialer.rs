//! The edge's end of the link: connects to the cloud (with backoff and jitter while it is
//! away), resumes where the cloud's log stands, sends the outbox in order within each
//! priority class (highest class first) within the cloud's credit, and has the outbox
//! delete what the cloud acknowledged. The outbox itself (durable storage) is the edge's:
//! [`Outbox`].

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ferry_protocol::kafka::Compression;
use ferry_protocol::link_frames::{EdgeStatus, Frame, GoAwayCode, MIN_VERSION, VERSION};
use tokio::sync::{mpsc, watch, Notify};
use tracing::{debug, info, warn};

use crate::backoff::Backoff;
pub use crate::edge_end::{Cursors, OutRecord};
use crate::edge_end::{EdgeEnd, EdgeEndConfig, Effect, MAX_FRAME_BYTES};
use crate::error::{FailureKind, LinkError, OutboxError};
use crate::quic::{self, FrameReader, FrameWriter, StreamError, Timeouts, TlsFiles};
use crate::BoxFuture;

/// The edge's durable outbox, as the link sees it.
///
/// A failure is an [`OutboxError`] of some [`FailureKind`]; whatever the kind, it ends the
/// link, which reconnects after its backoff and reads again from what the cloud committed.
pub trait Outbox: Send + Sync + 'static {
    /// Records of the highest class that has records after its cursor, in sequence order,
    /// about `max_bytes` of them (at least one). None if there is nothing to send. May
    /// block on the disk: the link calls it off the runtime.
    fn read(
        &self,
        after: &Cursors,
        max_bytes: usize,
    ) -> Result<Option<(u8, Vec<OutRecord>)>, OutboxError>;
    /// The cloud has every record of `class` up to `seq` durable: they may be deleted.
    fn acked(&self, class: u8, seq: u64);
    /// Notified when records were added.
    fn added(&self) -> Arc<Notify>;
    /// The highest downlink sequence applied on the edge, durably (0: none).
    fn down_applied(&self) -> u64;
    /// Publishes downlink messages on the edge; completes once every one of them (and of
    /// the calls before) is routed to the edge's subscribers, durably where they are
    /// persistent, and `seq` (the last one's) is durable as applied. That may take as long
    /// as a subscriber has no room: the link goes on meanwhile, and makes the next call
    /// only after this one completed. Messages the edge still holds from a call of an
    /// earlier link (whose future was dropped) may come again: they must not be published
    /// twice.
    fn apply_down(
        &self,
        seq: u64,
        messages: Vec<OutRecord>,
    ) -> BoxFuture<'static, Result<(), OutboxError>>;
    /// The edge's figures for the cloud (STATUS frames): what the outbox holds, its budget,
    /// the edge's clients. None if they cannot be had now (the link tries again later).
    fn status(&self) -> BoxFuture<'static, Option<EdgeStatus>>;
}

/// How the edge reaches the cloud.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// `host:port` of the cloud's link listener, or of each node of a cluster: the link goes
    /// to one at a time and moves on to the next when it fails (see [`Rotation`]). A name
    /// with several addresses counts as that many.
    pub clouds: Vec<String>,
    /// The name the cloud's certificate must carry; the host of each cloud if None.
    pub server_name: Option<String>,
    pub tls: TlsFiles,
    pub timeouts: Timeouts,
    pub compression: Compression,
    /// At most this many bytes of records in one BATCH frame.
    pub max_batch_bytes: usize,
    /// A link with records unacknowledged for this long is reported stalled and reconnected.
    pub stall_timeout: Duration,
    /// The first wait before reconnecting; doubles up to `backoff_max`, with jitter.
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// Sent in HELLO, for the cloud's logs.
    pub software: String,
    /// How often the edge tells the cloud its figures (a cloud of link version 2 on).
    pub status_interval: Duration,
}

impl ClientConfig {
    /// Defaults for everything but where the cloud is and the certificates.
    pub fn new(clouds: Vec<String>, tls: TlsFiles) -> Self {
        Self {
            clouds,
            server_name: None,
            tls,
            timeouts: Timeouts::default(),
            compression: Compression::Lz4,
            max_batch_bytes: 1 << 20,
            stall_timeout: Duration::from_secs(30),
            backoff_min: Duration::from_millis(200),
            backoff_max: Duration::from_secs(30),
            software: format!("ferry-edge {}", env!("CARGO_PKG_VERSION")),
            status_interval: Duration::from_secs(5),
        }
    }
}

/// Where the link stands.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum LinkState {
    #[default]
    Down,
    Connecting,
    Up,
    /// Up, but nothing acknowledged for longer than the stall timeout: being reconnected.
    Stalled,
}

impl LinkState {
    pub fn name(self) -> &'static str {
        match self {
            LinkState::Down => "down",
            LinkState::Connecting => "connecting",
            LinkState::Up => "up",
            LinkState::Stalled => "stalled",
        }
    }
}

/// What the link did, for metrics and the admin API.
#[derive(Debug, Clone, Default)]
pub struct LinkStats {
    pub state: LinkState,
    /// Links established.
    pub connects: u64,
    /// Connection attempts that ended before the cloud welcomed the link: no answer, a TLS
    /// failure, or a refusal (a denied edge).
    pub failed_attempts: u64,
    pub batches_sent: u64,
    pub records_sent: u64,
    /// Bytes of BATCH frames written (compressed record batches and framing).
    pub batch_bytes_sent: u64,
    /// Records acknowledged by the cloud on this run of the edge.
    pub records_acked: u64,
    /// When the cloud last acknowledged something (ms since the Unix epoch; 0: never).
    pub last_ack_unix_ms: u64,
    /// The last downlink sequence applied on this run of the edge.
    pub down_applied: u64,
    /// The link version the cloud welcomed the last link with (0: none yet).
    pub version: u16,
    pub last_error: Option<String>,
}

/// Shared view of [`LinkStats`].
#[derive(Debug, Default)]
pub struct LinkStatus(Mutex<LinkStats>);

impl LinkStatus {
    pub fn get(&self) -> LinkStats {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LinkStats> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn update(&self, f: impl FnOnce(&mut LinkStats)) {
        f(&mut self.lock());
    }
}

/// Runs the edge's link until `stop` turns true: connects, sends, reconnects.
pub async fn run(
    config: ClientConfig,
    outbox: Arc<dyn Outbox>,
    status: Arc<LinkStatus>,
    mut stop: watch::Receiver<bool>,
) {
    let (endpoint, quic_config) = match quic::client(&config.tls, config.timeouts) {
        Ok(x) => x,
        Err(e) => {
            warn!(error = %e, "the link cannot start");
            status.update(|s| s.last_error = Some(e.to_string()));
            return;
        }
    };
    let mut backoff = Backoff::new(config.backoff_min, config.backoff_max, seed());
    // Lowered, one attempt at a time, for a cloud that does not speak ours.
    let mut version = VERSION;
    let mut rotation = Rotation::default();
    let mut targets: Vec<Target> = Vec::new();
    loop {
        status.update(|s| s.state = LinkState::Connecting);
        // Names are looked up again at the start of every round.
        if rotation.at == 0 || targets.is_empty() {
            targets = resolve(&config).await;
        }
        let target = targets.get(rotation.at % targets.len().max(1)).cloned();
        let mut session = Session {
            config: &config,
            outbox: &outbox,
            status: &status,
            version,
            cloud: String::new(),
            made_progress: false,
            applying: None,
            gathering: None,
        };
        let connects_before = status.get().connects;
        let end = match &target {
            Some(target) => {
                session
                    .run(&endpoint, &quic_config, target, &mut stop)
                    .await
            }
            None => Err(LinkError::Resolve {
                cloud: config.clouds.join(", "),
                why: "no address".to_owned(),
            }),
        };
        let progressed = session.made_progress;
        let cloud = target.as_ref().map_or("-", |t| t.name.as_str());
        match end {
            Ok(()) => {
                status.update(|s| s.state = LinkState::Down);
                endpoint.close(0u32.into(), b"shutdown");
                return;
            }
            Err(why) => {
                if let LinkError::Refused {
                    code: GoAwayCode::UnsupportedVersion,
                    ..
                } = why
                {
                    if version > MIN_VERSION {
                        version -= 1;
                        info!(
                            version,
                            "the cloud refused our link version; trying an older one"
                        );
                    }
                }
                warn!(%cloud, error = %why, "link down");
                status.update(|s| {
                    s.state = LinkState::Down;
                    s.last_error = Some(why.to_string());
                    if s.connects == connects_before {
                        s.failed_attempts += 1;
                    }
                });
            }
        }
        let wait = backoff.next_wait(progressed);
        if !rotation.ended(targets.len(), progressed) {
            debug!("trying the next cloud address at once");
            continue;
        }
        debug!(?wait, "reconnecting after");
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stopped(&mut stop) => {
                endpoint.close(0u32.into(), b"shutdown");
                return;
            }
        }
    }
}

/// One address of the cloud to connect to: as configured, resolved, and the name its
/// certificate must carry.
#[derive(Debug, Clone)]
struct Target {
    name: String,
    addr: SocketAddr,
    server_name: String,
}

/// Every address of every configured cloud, in the configured order (a name's addresses as
/// the resolver gives them). A name that does not resolve is logged and left out.
async fn resolve(config: &ClientConfig) -> Vec<Target> {
    let mut out = Vec::new();
    for cloud in &config.clouds {
        let server_name = config.server_name.clone().unwrap_or_else(|| {
            let host = cloud.rsplit_once(':').map_or(cloud.as_str(), |(h, _)| h);
            host.trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned()
        });
        match tokio::net::lookup_host(cloud).await {
            Ok(addrs) => out.extend(addrs.map(|addr| Target {
                name: cloud.clone(),
                addr,
                server_name: server_name.clone(),
            })),
            Err(e) => warn!(%cloud, error = %e, "cannot resolve the cloud's address"),
        }
    }
    out
}

/// Which of the cloud's addresses the next connection attempt goes to, and whether it
/// waits first. Every attempt, failed or not, hands on to the next address (the nodes of a
/// cluster are alike: any one will do). A failed attempt with addresses left in the round
/// goes on at once; a whole round of failures waits the backoff, as does a single address
/// after a link that worked.
#[derive(Debug, Default)]
struct Rotation {
    /// The address of the next attempt.
    at: usize,
    /// Failed attempts in a row.
    failures: usize,
}

impl Rotation {
    /// The attempt ended (`progressed`: the cloud acknowledged something on it) with `len`
    /// addresses known; true when the next attempt waits the backoff.
    fn ended(&mut self, len: usize, progressed: bool) -> bool {
        let len = len.max(1);
        self.at = (self.at + 1) % len;
        if progressed {
            self.failures = 0;
            return len == 1;
        }
        self.failures += 1;
        self.failures.is_multiple_of(len)
    }
}

/// Completes when `stop` turns true (or its sender is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

fn seed() -> u64 {
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    (t ^ u64::from(std::process::id()).rotate_left(32)) | 1
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

struct Session<'a> {
    config: &'a ClientConfig,
    outbox: &'a Arc<dyn Outbox>,
    status: &'a LinkStatus,
    /// The link version to announce.
    version: u16,
    /// The configured name of the cloud address this connection goes to, for the logs.
    cloud: String,
    /// The cloud acknowledged something on this connection.
    made_progress: bool,
    /// The [`Effect::ApplyDown`] the edge is applying (at most one: the end gives the next
    /// after [`EdgeEnd::down_applied`]): its sequence and its completion.
    applying: Option<Applying>,
    /// The figures for the next STATUS being gathered ([`Outbox::status`]).
    gathering: Option<BoxFuture<'static, Option<EdgeStatus>>>,
}

/// A pending [`Outbox::apply_down`]: its sequence and its completion.
type Applying = (u64, BoxFuture<'static, Result<(), OutboxError>>);

/// Completes when the pending apply does, with its sequence; never without one.
/// Cancel-safe: the apply stays pending if this is dropped first.
async fn applied(applying: &mut Option<Applying>) -> (u64, Result<(), OutboxError>) {
    let Some((seq, apply)) = applying else {
        return std::future::pending().await;
    };
    let result = apply.await;
    let seq = *seq;
    *applying = None;
    (seq, result)
}

/// Completes with the figures being gathered, once they are; never without a gathering.
/// Cancel-safe as [`applied`] is.
async fn gathered(
    gathering: &mut Option<BoxFuture<'static, Option<EdgeStatus>>>,
) -> Option<EdgeStatus> {
    let Some(figures) = gathering else {
        return std::future::pending().await;
    };
    let status = figures.await;
    *gathering = None;
    status
}

impl Session<'_> {
    /// One connection: Ok when stopped, Err with why it ended otherwise.
    async fn run(
        &mut self,
        endpoint: &quinn::Endpoint,
        quic_config: &quinn::ClientConfig,
        target: &Target,
        stop: &mut watch::Receiver<bool>,
    ) -> Result<(), LinkError> {
        let connecting =
            endpoint.connect_with(quic_config.clone(), target.addr, &target.server_name)?;
        // A cloud that is down does not answer at all: give up well before the idle timeout.
        let connect_timeout = self.config.timeouts.idle.min(CONNECT_TIMEOUT);
        let conn = tokio::select! {
            c = tokio::time::timeout(connect_timeout, connecting) => match c {
                Ok(c) => c?,
                Err(_) => {
                    return Err(LinkError::ConnectTimeout {
                        ms: connect_timeout.as_millis() as u64,
                    })
                }
            },
            _ = stopped(stop) => return Ok(()),
        };
        self.cloud.clone_from(&target.name);
        let result = self.converse(&conn, stop).await;
        match &result {
            Ok(()) => conn.close(0u32.into(), b"shutdown"),
            Err(why) => conn.close(2u32.into(), why.to_string().as_bytes()),
        }
        result
    }

    /// Drives the link's [`EdgeEnd`]: a reader task takes frames off the stream; this task
    /// feeds them to the end, writes what it sends, runs what it asks for (outbox reads,
    /// deletes, downlink publishes) and sleeps until its next deadline. A downlink publish
    /// is awaited beside the rest, not before it: while a local subscriber holds it up, the
    /// outbox is still sent and acknowledged.
    async fn converse(
        &mut self,
        conn: &quinn::Connection,
        stop: &mut watch::Receiver<bool>,
    ) -> Result<(), LinkError> {
        let (send, recv) = conn.open_bi().await?;
        let mut writer = FrameWriter::new(send);
        let mut end = EdgeEnd::new(
            EdgeEndConfig {
                max_batch_bytes: self.config.max_batch_bytes,
                compression: self.config.compression,
                stall_timeout: self.config.stall_timeout,
                handshake_timeout: self.config.timeouts.idle,
                software: self.config.software.clone(),
                version: self.version,
                status_interval: self.config.status_interval,
            },
            Instant::now(),
            self.outbox.down_applied(),
        );
        let (frames_tx, mut frames) = mpsc::channel(256);
        let reading = tokio::spawn(crate::quic::read_frames(
            FrameReader::new(recv, MAX_FRAME_BYTES),
            frames_tx,
        ));
        let result = self.drive(&mut end, &mut writer, &mut frames, stop).await;
        self.made_progress = end.made_progress();
        match &result {
            Ok(()) => writer.finish(),
            Err(LinkError::Stalled { .. }) => {
                self.status.update(|s| s.state = LinkState::Stalled);
            }
            // What the end still sends (a GOAWAY for a protocol error).
            Err(_) => {
                while let Some(frame) = end.poll_transmit() {
                    if writer.send(&frame).await.is_err() {
                        break;
                    }
                }
            }
        }
        reading.abort();
        result
    }

    async fn drive(
        &mut self,
        end: &mut EdgeEnd,
        writer: &mut FrameWriter,
        frames: &mut mpsc::Receiver<Result<Option<Frame>, StreamError>>,
        stop: &mut watch::Receiver<bool>,
    ) -> Result<(), LinkError> {
        let added = self.outbox.added();
        loop {
            // Write and do what the end asks until it asks for nothing more: a read gives
            // batches to write, which may leave credit for another read.
            loop {
                while let Some(frame) = end.poll_transmit() {
                    writer.send(&frame).await?;
                }
                let Some(effect) = end.poll_effect() else {
                    break;
                };
                self.perform(end, effect).await?;
            }
            let deadline = end.poll_timeout();
            let sleep = tokio::time::sleep_until(
                deadline.map_or_else(tokio::time::Instant::now, tokio::time::Instant::from_std),
            );
            tokio::select! {
                frame = frames.recv(), if end.wants_frames() => match frame {
                    Some(Ok(Some(frame))) => end.handle_frame(Instant::now(), frame)?,
                    Some(Ok(None)) | None => return Err(LinkError::StreamClosed),
                    Some(Err(e)) => return Err(e.into()),
                },
                (seq, result) = applied(&mut self.applying) => {
                    result.map_err(LinkError::ApplyDown)?;
                    end.down_applied(seq);
                    self.status.update(|s| s.down_applied = seq);
                }
                status = gathered(&mut self.gathering) => end.status_ready(Instant::now(), status),
                () = added.notified() => end.outbox_added(),
                () = sleep, if deadline.is_some() => end.handle_timeout(Instant::now())?,
                () = stopped(stop) => {
                    end.shutdown();
                    while let Some(frame) = end.poll_transmit() {
                        let _ = writer.send(&frame).await;
                    }
                    return Ok(());
                }
            }
        }
    }

    async fn perform(&mut self, end: &mut EdgeEnd, effect: Effect) -> Result<(), LinkError> {
        match effect {
            Effect::Connected => {
                info!(cloud = %self.cloud, version = end.version(), "link up");
                self.status.update(|s| {
                    s.state = LinkState::Up;
                    s.connects += 1;
                    s.version = end.version();
                });
            }
            // Completed in `drive`, beside everything else.
            Effect::Status => self.gathering = Some(self.outbox.status()),
            Effect::Read {
                after,
                max_bytes,
                blocking,
            } => {
                let read = if blocking {
                    let outbox = self.outbox.clone();
                    tokio::task::spawn_blocking(move || outbox.read(&after, max_bytes))
                        .await
                        .map_err(|e| {
                            LinkError::Outbox(OutboxError::new(
                                FailureKind::Closed,
                                ReadUnfinished(e),
                            ))
                        })?
                } else {
                    self.outbox.read(&after, max_bytes)
                }
                .map_err(LinkError::Outbox)?;
                end.read_done(Instant::now(), read);
            }
            Effect::Delete { class, seq } => self.outbox.acked(class, seq),
            Effect::Acknowledged { records } => self.status.update(|s| {
                s.state = LinkState::Up;
                s.records_acked += records;
                s.last_ack_unix_ms = now_ms();
            }),
            Effect::ApplyDown { seq, messages } => {
                // Completed in `drive`, beside everything else.
                debug_assert!(self.applying.is_none(), "the end applies one at a time");
                self.applying = Some((seq, self.outbox.apply_down(seq, messages)));
            }
            Effect::Sent { records, bytes } => self.status.update(|s| {
                s.batches_sent += 1;
                s.records_sent += records;
                s.batch_bytes_sent += bytes;
            }),
        }
        Ok(())
    }
}

/// An outbox read on the blocking pool that panicked or was cancelled (the runtime is
/// shutting down).
#[derive(Debug, thiserror::Error)]
#[error("the outbox read did not finish: {0}")]
struct ReadUnfinished(tokio::task::JoinError);

/// The longest wait for the cloud to answer a connection attempt.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

#[cfg(test)]
mod tests {
    use super::Rotation;

    #[test]
    fn failed_attempts_go_round_the_addresses_and_a_whole_round_waits() {
        let mut r = Rotation::default();
        // Three nodes: the first two failures go on at once, the third waits.
        assert!(!r.ended(3, false));
        assert_eq!(r.at, 1);
        assert!(!r.ended(3, false));
        assert!(r.ended(3, false), "a whole round failed");
        assert_eq!(r.at, 0);
        // A link that worked on node 0 ends: on to node 1 at once, and a new round.
        assert!(!r.ended(3, true));
        assert_eq!((r.at, r.failures), (1, 0));
        assert!(!r.ended(3, false));
        assert!(!r.ended(3, false));
        assert!(r.ended(3, false));
    }

    #[test]
    fn a_single_address_always_waits_the_backoff() {
        let mut r = Rotation::default();
        assert!(r.ended(1, false));
        assert!(r.ended(1, true));
        assert_eq!(r.at, 0);
        // No address known (nothing resolved) counts as one.
        assert!(r.ended(0, false));
    }
}
