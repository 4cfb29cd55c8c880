//! The edge's end of the link: connects to the cloud (with backoff and jitter while it is
//! away), resumes where the cloud's log stands, sends the outbox in order within each
//! priority class (highest class first) within the cloud's credit, and has the outbox
//! delete what the cloud acknowledged. The outbox itself (durable storage) is the edge's:
//! [`Outbox`].

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use ferry_protocol::kafka::{BatchBuilder, Compression, Header};
use ferry_protocol::link::{Frame, GoAwayCode, VERSION};
use tokio::sync::{mpsc, watch, Notify};
use tracing::{debug, info, warn};

use crate::quic::{self, FrameReader, FrameWriter, StreamError, Timeouts, TlsFiles};

/// One record of the outbox, as the link sends it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutRecord {
    /// Its sequence number: increasing within its class.
    pub seq: u64,
    /// When the edge accepted it (ms since the Unix epoch).
    pub timestamp_ms: i64,
    pub topic: String,
    pub payload: Bytes,
    /// The MQTT metadata as record headers (`ferry_protocol::kafka::mqtt`).
    pub headers: Vec<(String, Option<Bytes>)>,
}

impl OutRecord {
    /// Its headers as a record batch takes them.
    pub fn header_refs(&self) -> Vec<Header<'_>> {
        self.headers
            .iter()
            .map(|(key, value)| Header {
                key,
                value: value.as_deref(),
            })
            .collect()
    }
}

/// Cursor per priority class: the highest sequence sent (or committed) in it.
pub type Cursors = [u64; 256];

/// The edge's durable outbox, as the link sees it.
pub trait Outbox: Send + Sync + 'static {
    /// Records of the highest class that has records after its cursor, in sequence order,
    /// about `max_bytes` of them (at least one). None if there is nothing to send. May
    /// block on the disk: the link calls it off the runtime.
    fn read(
        &self,
        after: &Cursors,
        max_bytes: usize,
    ) -> Result<Option<(u8, Vec<OutRecord>)>, String>;
    /// The cloud has every record of `class` up to `seq` durable: they may be deleted.
    fn acked(&self, class: u8, seq: u64);
    /// Notified when records were added.
    fn added(&self) -> Arc<Notify>;
    /// The highest downlink sequence applied on the edge, durably (0: none).
    fn down_applied(&self) -> u64;
    /// Publishes downlink messages on the edge; completes once they are taken and `seq` (the
    /// last one's) is durable as applied.
    fn apply_down(
        &self,
        seq: u64,
        messages: Vec<OutRecord>,
    ) -> crate::server::BoxFuture<'static, Result<(), String>>;
}

/// How the edge reaches the cloud.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// `host:port` of the cloud's link listener.
    pub cloud: String,
    /// The name the cloud's certificate must carry; the host of `cloud` if None.
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
}

impl ClientConfig {
    /// Defaults for everything but where the cloud is and the certificates.
    pub fn new(cloud: String, tls: TlsFiles) -> Self {
        Self {
            cloud,
            server_name: None,
            tls,
            timeouts: Timeouts::default(),
            compression: Compression::Lz4,
            max_batch_bytes: 1 << 20,
            stall_timeout: Duration::from_secs(30),
            backoff_min: Duration::from_millis(200),
            backoff_max: Duration::from_secs(30),
            software: format!("ferry-edge {}", env!("CARGO_PKG_VERSION")),
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
    let mut backoff = config.backoff_min;
    let mut rng = seed();
    loop {
        status.update(|s| s.state = LinkState::Connecting);
        let mut session = Session {
            config: &config,
            outbox: &outbox,
            status: &status,
            made_progress: false,
        };
        let connects_before = status.get().connects;
        let end = session.run(&endpoint, &quic_config, &mut stop).await;
        let progressed = session.made_progress;
        match end {
            Ok(()) => {
                status.update(|s| s.state = LinkState::Down);
                endpoint.close(0u32.into(), b"shutdown");
                return;
            }
            Err(why) => {
                warn!(cloud = %config.cloud, error = %why, "link down");
                status.update(|s| {
                    s.state = LinkState::Down;
                    s.last_error = Some(why);
                    if s.connects == connects_before {
                        s.failed_attempts += 1;
                    }
                });
            }
        }
        if progressed {
            backoff = config.backoff_min;
        }
        // Full jitter between half the backoff and all of it: a fleet that lost its cloud
        // at once does not come back at once.
        let half = backoff.as_millis() as u64 / 2;
        rng = xorshift(rng);
        let wait = Duration::from_millis(half + rng % (half + 1));
        debug!(?wait, "reconnecting after");
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stopped(&mut stop) => {
                endpoint.close(0u32.into(), b"shutdown");
                return;
            }
        }
        backoff = (backoff * 2).min(config.backoff_max);
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

fn xorshift(mut x: u64) -> u64 {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    x
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
    /// The cloud acknowledged something on this connection.
    made_progress: bool,
}

impl Session<'_> {
    /// One connection: Ok when stopped, Err with why it ended otherwise.
    async fn run(
        &mut self,
        endpoint: &quinn::Endpoint,
        quic_config: &quinn::ClientConfig,
        stop: &mut watch::Receiver<bool>,
    ) -> Result<(), String> {
        let addr = tokio::net::lookup_host(&self.config.cloud)
            .await
            .map_err(|e| format!("cannot resolve {}: {e}", self.config.cloud))?
            .next()
            .ok_or_else(|| format!("{} resolves to no address", self.config.cloud))?;
        let host = self.config.server_name.clone().unwrap_or_else(|| {
            let cloud = &self.config.cloud;
            let host = cloud.rsplit_once(':').map_or(cloud.as_str(), |(h, _)| h);
            host.trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned()
        });
        let connecting = endpoint
            .connect_with(quic_config.clone(), addr, &host)
            .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
        // A cloud that is down does not answer at all: give up well before the idle timeout.
        let connect_timeout = self.config.timeouts.idle.min(CONNECT_TIMEOUT);
        let conn = tokio::select! {
            c = tokio::time::timeout(connect_timeout, connecting) => match c {
                Ok(c) => c.map_err(|e| format!("cannot connect to {addr}: {e}"))?,
                Err(_) => return Err(format!("no answer from {addr} in {connect_timeout:?}")),
            },
            _ = stopped(stop) => return Ok(()),
        };
        let result = self.converse(&conn, stop).await;
        match &result {
            Ok(()) => conn.close(0u32.into(), b"shutdown"),
            Err(why) => conn.close(2u32.into(), why.as_bytes()),
        }
        result
    }

    async fn converse(
        &mut self,
        conn: &quinn::Connection,
        stop: &mut watch::Receiver<bool>,
    ) -> Result<(), String> {
        let (send, recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
        let mut writer = FrameWriter::new(send);
        let io = |e: StreamError| e.to_string();
        let mut down_applied = self.outbox.down_applied();
        writer
            .send(&Frame::Hello {
                version: VERSION,
                max_frame_bytes: MAX_FRAME_BYTES as u32,
                down_acked: down_applied,
                software: self.config.software.clone(),
            })
            .await
            .map_err(io)?;
        let (frames_tx, mut frames) = mpsc::channel(256);
        let mut reader = FrameReader::new(recv, MAX_FRAME_BYTES);
        tokio::spawn(async move {
            loop {
                let next = reader.next().await;
                let end = !matches!(next, Ok(Some(_)));
                if frames_tx.send(next).await.is_err() || end {
                    return;
                }
            }
        });
        let next_frame = |f: Option<Result<Option<Frame>, StreamError>>| match f {
            Some(Ok(Some(frame))) => Ok(frame),
            Some(Ok(None)) | None => Err("the cloud closed the link".to_owned()),
            Some(Err(e)) => Err(e.to_string()),
        };
        let welcome = tokio::time::timeout(self.config.timeouts.idle, frames.recv())
            .await
            .map_err(|_| "no WELCOME from the cloud".to_owned())?;
        let (mut credit, peer_max_frame, committed) = match next_frame(welcome)? {
            Frame::Welcome {
                version,
                max_frame_bytes,
                credit_bytes,
                committed,
            } => {
                if version != VERSION {
                    return Err(format!("the cloud speaks link version {version}"));
                }
                (credit_bytes as i64, max_frame_bytes as usize, committed)
            }
            Frame::GoAway { code, reason } => {
                return Err(format!("the cloud refused the link ({code:?}): {reason}"))
            }
            other => return Err(format!("expected WELCOME, got {other:?}")),
        };
        let mut sent: Cursors = [0; 256];
        let mut acked: Cursors = [0; 256];
        for (class, seq) in committed {
            sent[class as usize] = seq;
            acked[class as usize] = seq;
            self.outbox.acked(class, seq);
        }
        info!(cloud = %self.config.cloud, "link up");
        self.status.update(|s| {
            s.state = LinkState::Up;
            s.connects += 1;
        });
        // Records sent per class and not yet acknowledged: (last seq of a batch, records).
        let mut unacked: Vec<std::collections::VecDeque<(u64, u64)>> =
            vec![std::collections::VecDeque::new(); 256];
        let mut last_progress = Instant::now();
        let max_batch = self
            .config
            .max_batch_bytes
            .min(peer_max_frame.saturating_sub(1024))
            .max(1024);
        let added = self.outbox.added();
        let mut stall_check = tokio::time::interval(Duration::from_secs(1));
        // At start there may be a backlog: read it off the runtime.
        let mut last_read_small = false;
        loop {
            // Send while there is credit and something to send.
            while credit > 0 {
                let outbox = self.outbox.clone();
                let after = sent;
                let budget = (credit as usize).min(max_batch);
                // Live traffic (the last read was small: the records are fresh, in the page
                // cache) is read right here; a backlog off the runtime, where a read of a
                // megabyte from disk cannot hold up the edge's clients.
                let read = if last_read_small {
                    outbox.read(&after, budget.min(SMALL_READ_BYTES))
                } else {
                    tokio::task::spawn_blocking(move || outbox.read(&after, budget))
                        .await
                        .map_err(|e| format!("outbox read did not finish: {e}"))?
                }
                .map_err(|e| format!("cannot read the outbox: {e}"))?;
                last_read_small = match &read {
                    Some((_, records)) => {
                        records
                            .iter()
                            .map(|r| r.payload.len() + r.topic.len())
                            .sum::<usize>()
                            < SMALL_READ_BYTES / 2
                    }
                    None => true,
                };
                let Some((class, records)) = read else {
                    break;
                };
                for batch in batches(&records, self.config.compression) {
                    let frame = Frame::Batch {
                        class,
                        batch: batch.bytes,
                    };
                    let wire = writer.send(&frame).await.map_err(io)?;
                    credit -= wire as i64;
                    if unacked.iter().all(|q| q.is_empty()) {
                        last_progress = Instant::now();
                    }
                    unacked[class as usize].push_back((batch.last_seq, batch.records));
                    self.status.update(|s| {
                        s.batches_sent += 1;
                        s.records_sent += batch.records;
                        s.batch_bytes_sent += wire as u64;
                    });
                }
                if let Some(last) = records.last() {
                    sent[class as usize] = last.seq;
                }
            }
            tokio::select! {
                frame = frames.recv() => match next_frame(frame)? {
                    Frame::Ack { class, committed_seq } => {
                        let c = class as usize;
                        if committed_seq <= acked[c] {
                            continue;
                        }
                        if committed_seq > sent[c] {
                            return Err(format!(
                                "the cloud acknowledged class {class} up to {committed_seq}, past what was sent ({})",
                                sent[c]
                            ));
                        }
                        acked[c] = committed_seq;
                        let mut records = 0;
                        while let Some(&(last, n)) = unacked[c].front() {
                            if last > committed_seq {
                                break;
                            }
                            records += n;
                            unacked[c].pop_front();
                        }
                        self.outbox.acked(class, committed_seq);
                        last_progress = Instant::now();
                        self.made_progress = true;
                        self.status.update(|s| {
                            s.state = LinkState::Up;
                            s.records_acked += records;
                            s.last_ack_unix_ms = now_ms();
                        });
                    }
                    Frame::Credit { bytes } => credit = credit.saturating_add(bytes as i64),
                    Frame::Down { batch } => {
                        let fresh = down_records(&batch, down_applied)?;
                        if let Some(last) = fresh.last().map(|r| r.seq) {
                            self.outbox.apply_down(last, fresh).await?;
                            down_applied = last;
                            self.status.update(|s| s.down_applied = last);
                        }
                        writer
                            .send(&Frame::DownAck { seq: down_applied })
                            .await
                            .map_err(io)?;
                    }
                    Frame::GoAway { code, reason } => {
                        return Err(format!("the cloud closed the link ({code:?}): {reason}"));
                    }
                    other => {
                        let _ = writer
                            .send(&Frame::GoAway {
                                code: GoAwayCode::ProtocolError,
                                reason: "unexpected frame".into(),
                            })
                            .await;
                        return Err(format!("unexpected frame from the cloud: {other:?}"));
                    }
                },
                _ = added.notified(), if credit > 0 => {}
                _ = stall_check.tick() => {
                    let waiting = unacked.iter().any(|q| !q.is_empty());
                    if waiting && last_progress.elapsed() > self.config.stall_timeout {
                        self.status.update(|s| s.state = LinkState::Stalled);
                        return Err(format!(
                            "stalled: nothing acknowledged for {:?}",
                            self.config.stall_timeout
                        ));
                    }
                }
                _ = stopped(stop) => {
                    let _ = writer
                        .send(&Frame::GoAway {
                            code: GoAwayCode::Shutdown,
                            reason: "the edge is shutting down".into(),
                        })
                        .await;
                    writer.finish();
                    return Ok(());
                }
            }
        }
    }
}

/// The downlink messages of a DOWN batch after `applied`, in order.
fn down_records(batch: &[u8], applied: u64) -> Result<Vec<OutRecord>, String> {
    let plain = ferry_protocol::kafka::uncompressed(batch, MAX_FRAME_BYTES * 16)
        .map_err(|e| format!("bad DOWN batch: {e}"))?;
    let mut out = Vec::new();
    for r in ferry_protocol::kafka::records(&plain).map_err(|e| format!("bad DOWN batch: {e}"))? {
        let r = r.map_err(|e| format!("bad DOWN record: {e}"))?;
        let seq = u64::try_from(r.offset).map_err(|_| "negative DOWN sequence".to_owned())?;
        if seq <= applied {
            continue;
        }
        let topic = r
            .key
            .and_then(|k| std::str::from_utf8(k).ok())
            .ok_or_else(|| "a DOWN record without a topic".to_owned())?;
        out.push(OutRecord {
            seq,
            timestamp_ms: r.timestamp,
            topic: topic.to_owned(),
            payload: Bytes::copy_from_slice(r.value.unwrap_or_default()),
            headers: r
                .headers
                .iter()
                .map(|h| (h.key.to_owned(), h.value.map(Bytes::copy_from_slice)))
                .collect(),
        });
    }
    Ok(out)
}

/// A read of at most this many bytes of records is done on the runtime's thread (see the
/// send loop).
const SMALL_READ_BYTES: usize = 64 << 10;

/// The longest wait for the cloud to answer a connection attempt.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The largest frame the edge takes from the cloud.
const MAX_FRAME_BYTES: usize = 4 << 20;

struct OutBatch {
    bytes: Bytes,
    last_seq: u64,
    records: u64,
}

/// The records as record batches whose offsets are their sequence numbers (a new batch
/// where a gap would not fit an offset delta).
fn batches(records: &[OutRecord], compression: Compression) -> Vec<OutBatch> {
    let mut out = Vec::new();
    let mut rest = records;
    while let Some(first) = rest.first() {
        let size: usize = rest
            .iter()
            .map(|r| r.topic.len() + r.payload.len() + 32)
            .sum();
        let mut b = BatchBuilder::with_capacity(first.timestamp_ms, size);
        let mut n = 0;
        for r in rest {
            let Ok(delta) = i32::try_from(r.seq - first.seq) else {
                break;
            };
            let headers = r.header_refs();
            b.push_at(
                delta,
                r.timestamp_ms,
                Some(r.topic.as_bytes()),
                Some(&r.payload),
                &headers,
            );
            n += 1;
        }
        out.push(OutBatch {
            bytes: b.finish_with(first.seq as i64, compression),
            last_seq: rest[n - 1].seq,
            records: n as u64,
        });
        rest = &rest[n..];
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_protocol::kafka::{records, uncompressed};

    fn rec(seq: u64) -> OutRecord {
        OutRecord {
            seq,
            timestamp_ms: 1_000 + seq as i64,
            topic: format!("t/{seq}"),
            payload: Bytes::from(vec![b'x'; 10]),
            headers: vec![("mqtt.qos".into(), Some(Bytes::from_static(b"1")))],
        }
    }

    #[test]
    fn record_offsets_are_sequence_numbers_and_a_gap_too_wide_starts_a_new_batch() {
        let recs = vec![
            rec(5),
            rec(6),
            rec(9),
            rec(9 + (1 << 31)),
            rec(10 + (1 << 31)),
        ];
        for compression in [Compression::None, Compression::Lz4, Compression::Zstd] {
            let out = batches(&recs, compression);
            assert_eq!(out.len(), 2);
            assert_eq!((out[0].last_seq, out[0].records), (9, 3));
            assert_eq!((out[1].last_seq, out[1].records), (10 + (1 << 31), 2));
            let mut seqs = Vec::new();
            for b in &out {
                let plain = uncompressed(&b.bytes, 1 << 20).expect("decompress");
                for r in records(&plain).expect("records") {
                    let r = r.expect("record");
                    seqs.push(r.offset as u64);
                    assert_eq!(r.key, Some(format!("t/{}", r.offset).as_bytes()));
                }
            }
            assert_eq!(seqs, recs.iter().map(|r| r.seq).collect::<Vec<_>>());
        }
    }
}
