//! The durable, partitioned log: streams (a Kafka topic is a stream) of partitions, each a
//! series of segment files of Kafka v2 record batches. On-disk format: `docs/log-format.md`.
//!
//! ```text
//! fronts ──append──▶ appender thread ──write──▶ active segments ──one fsync each──▶ replies
//!        ◀──read──── partitions (only what is durable)
//! ```
//!
//! Appends are group-committed: the appender takes every request waiting (up to
//! [`GROUP_MAX_REQUESTS`]), writes them partition by partition (records from many requests to
//! one partition become one batch), syncs each touched file once, and only then answers them
//! all and lets readers see the new records.
//!
//! The fronts use the [`Storage`] trait only, so that another backend (object storage) can
//! take the place of [`SegmentLog`] without touching them; [`MemoryLog`] is a second
//! backend, for tests.

mod memory;
pub(crate) mod object;
mod partition;
mod segment;
pub mod sequence;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::future::Future;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use ferry_protocol::kafka::batch::{self, BatchBuilder, BatchError, BatchHeader, Header};
use serde::Deserialize;
use tokio::sync::{mpsc, oneshot};
use tracing::error;

pub use memory::MemoryLog;
pub use object::leases::Lease;
pub use object::members::Member;
pub use object::meta::Fence;
pub use object::meta::PgMeta;
pub use object::{testing as object_testing, ObjectConfig, ObjectLog, RequestCounts, S3Config};
use partition::Partition;
pub use segment::Damage;

/// Requests the appender takes into one commit at most: bounds the time the first of them
/// waits and the memory a commit holds. At 100-byte records this is ~1 MB of writes.
pub const GROUP_MAX_REQUESTS: usize = 8192;
/// Records from several requests to one partition are merged into batches of at most this
/// size, which every Kafka consumer can fetch (its default `max.partition.fetch.bytes` is
/// 1 MiB).
const MERGED_BATCH_BYTES: usize = 256 * 1024;

/// Why a log operation failed.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("corrupt batch in {path} at byte {position}: {error}")]
    Corrupt {
        path: PathBuf,
        position: u64,
        error: BatchError,
    },
    #[error("offset {offset} is outside the log [{start}, {end}]")]
    OffsetOutOfRange { offset: i64, start: i64, end: i64 },
    #[error("no stream {0}")]
    UnknownStream(String),
    #[error("stream {stream} has no partition {partition}")]
    UnknownPartition { stream: String, partition: u32 },
    #[error("invalid stream name {0:?} (1-249 of a-z A-Z 0-9 . _ -)")]
    BadStreamName(String),
    #[error("bad record batch: {0}")]
    BadBatch(String),
    #[error("the log is closed")]
    Closed,
    #[error(
        "the partition stopped taking appends after a failed write ({0}); restart to recover it"
    )]
    Failed(String),
    /// The object store or the database did not answer in time (the object backend): what
    /// was waiting is refused (an append refused so may have been committed with its answer
    /// lost: a client sends it again), and the next ones are tried again.
    #[error("the store did not answer: {0}; try again")]
    Unavailable(String),
    /// An idempotent producer's batch refused by its sequence ([`sequence`]; the object log
    /// checks it in the commit's transaction).
    #[error("{0}")]
    Sequence(#[from] sequence::SequenceError),
    /// An append made under a lease ([`Storage::append_fenced`]) that no longer held it when
    /// it was to commit: nothing of it was appended.
    #[error("the {kind} lease on {key} is no longer this node's; nothing was appended")]
    Fenced { kind: String, key: String },
}

impl LogError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        Self::Io {
            path: path.to_owned(),
            source,
        }
    }
}

/// How a stream's partitions are kept. Every field has a default (see each).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct StreamConfig {
    /// Partitions of a stream created with this configuration. Default 1.
    pub partitions: u32,
    /// A segment is rolled once it holds this many bytes. Default 128 MiB.
    pub segment_bytes: u64,
    /// A segment is rolled once it is this old (ms). Default 7 days.
    pub segment_ms: i64,
    /// Each partition keeps at most about this many bytes (whole segments are dropped from
    /// the front; the active segment always stays). Default none: no limit.
    pub retention_bytes: Option<u64>,
    /// Segments whose newest record is older than this (ms) are dropped. Default 7 days.
    pub retention_ms: Option<i64>,
    /// Bytes of batches between two entries of the sparse offset index. Default 4 KiB; each
    /// entry costs 16 bytes of memory.
    pub index_interval_bytes: u64,
}

impl Default for StreamConfig {
    fn default() -> Self {
        Self {
            partitions: 1,
            segment_bytes: 128 * 1024 * 1024,
            segment_ms: 7 * 24 * 3600 * 1000,
            retention_bytes: None,
            retention_ms: Some(7 * 24 * 3600 * 1000),
            index_interval_bytes: 4096,
        }
    }
}

/// One record to append; the log builds the batch.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NewRecord {
    /// Milliseconds since the Unix epoch.
    pub timestamp: i64,
    pub key: Option<Bytes>,
    pub value: Option<Bytes>,
    pub headers: Vec<(String, Option<Bytes>)>,
}

/// What an append carries.
#[derive(Debug)]
pub enum AppendData {
    /// Records; those of requests committed together are merged into one batch.
    Records(Vec<NewRecord>),
    /// Whole v2 batches, back to back, stored as they are (a Kafka producer's): their CRC is
    /// checked and their base offsets set by the log.
    Batches(BytesMut),
}

/// Where an append landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    pub base_offset: i64,
    pub last_offset: i64,
}

/// A partition's offsets: the first still kept and the high watermark (the next offset).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Offsets {
    pub log_start: i64,
    pub high_watermark: i64,
}

/// How many bytes of batches a front asks for in one read when it walks a partition (the
/// MQTT tailer, the downlink, offset-by-time lookups, the ingest's start-up scan): 1 MiB.
/// A read returns at least one whole batch even when that batch is larger, so this bounds
/// the memory of one read, not the size of a batch.
pub const READ_BUDGET_BYTES: usize = 1 << 20;

/// The answer to a read: whole batches, each CRC-checked, starting with the one that holds
/// the offset asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadResult {
    pub batches: Bytes,
    pub high_watermark: i64,
}

impl ReadResult {
    /// The batches of this read, in order: each one's header and its whole bytes. A batch
    /// whose header does not parse, or that is cut short, ends the walk with
    /// [`LogError::BadBatch`] (a read serves only checked batches, so this is a bug or a
    /// foreign `Storage`).
    pub fn iter(&self) -> Batches<'_> {
        Batches {
            bytes: &self.batches,
        }
    }
}

/// The iterator of [`ReadResult::iter`].
#[derive(Debug)]
pub struct Batches<'a> {
    bytes: &'a [u8],
}

impl<'a> Iterator for Batches<'a> {
    type Item = Result<(BatchHeader, &'a [u8]), LogError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.bytes.is_empty() {
            return None;
        }
        let parsed = BatchHeader::parse(self.bytes)
            .map_err(|e| LogError::BadBatch(e.to_string()))
            .and_then(|h| match self.bytes.get(..h.total_len()) {
                Some(whole) => Ok((h, whole)),
                None => Err(LogError::BadBatch(format!(
                    "a batch of {} bytes with {} left in the read",
                    h.total_len(),
                    self.bytes.len()
                ))),
            });
        match &parsed {
            Ok((_, whole)) => self.bytes = &self.bytes[whole.len()..],
            Err(_) => self.bytes = &[],
        }
        Some(parsed)
    }
}

/// A stream as the admin API shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamInfo {
    pub name: String,
    pub partitions: Vec<PartitionInfo>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionInfo {
    pub offsets: Offsets,
    pub bytes: u64,
    pub segments: usize,
    /// The first offset of the active segment: what recovery re-reads at open.
    pub active_base: i64,
}

/// Appender counters since the log was opened (for metrics).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LogStats {
    /// Group commits (each one sync per partition file touched).
    pub commits: u64,
    pub records: u64,
    /// Bytes of batches written.
    pub bytes: u64,
    /// Time spent syncing, over all commits and the longest one (µs).
    pub sync_us_total: u64,
    pub sync_us_max: u64,
}

/// The live form of [`LogStats`], shared by a log's writer and its readers of metrics.
#[derive(Debug, Default)]
struct Counters {
    commits: AtomicU64,
    records: AtomicU64,
    bytes: AtomicU64,
    sync_us_total: AtomicU64,
    sync_us_max: AtomicU64,
}

impl Counters {
    fn load(&self) -> LogStats {
        LogStats {
            commits: self.commits.load(Relaxed),
            records: self.records.load(Relaxed),
            bytes: self.bytes.load(Relaxed),
            sync_us_total: self.sync_us_total.load(Relaxed),
            sync_us_max: self.sync_us_max.load(Relaxed),
        }
    }

    /// One commit that took `sync_us` to make durable.
    fn committed(&self, sync_us: u64) {
        self.commits.fetch_add(1, Relaxed);
        self.sync_us_total.fetch_add(sync_us, Relaxed);
        self.sync_us_max.fetch_max(sync_us, Relaxed);
    }

    /// `records` records in `bytes` bytes of batches written.
    fn wrote(&self, records: u64, bytes: u64) {
        self.records.fetch_add(records, Relaxed);
        self.bytes.fetch_add(bytes, Relaxed);
    }
}

/// A pending append.
pub type AppendFuture = Pin<Box<dyn Future<Output = Result<Appended, LogError>> + Send>>;

/// What the fronts (MQTT, Kafka, AMQP, the link's ingest) need from storage.
pub trait Storage: Send + Sync + std::fmt::Debug + 'static {
    /// Creates `name` with `config` if it does not exist; an existing stream is left as is.
    fn create_stream(&self, name: &str, config: &StreamConfig) -> Result<(), LogError>;
    /// Deletes `name` and every record in it; false if there was no such stream. Appends
    /// already queued for it are refused; its files are gone when this returns.
    fn delete_stream(&self, name: &str) -> Result<bool, LogError>;
    /// Every stream, with its partitions' offsets and sizes.
    fn streams(&self) -> Vec<StreamInfo>;
    /// Appends to one partition; completes once the data is durable (per the fsync policy).
    fn append(&self, stream: &str, partition: u32, data: AppendData) -> AppendFuture;
    /// Reads whole batches from `offset` on, about `max_bytes` (at least one batch, however
    /// large). Blocking file IO: call from a blocking context.
    fn read(
        &self,
        stream: &str,
        partition: u32,
        offset: i64,
        max_bytes: usize,
    ) -> Result<ReadResult, LogError>;
    fn offsets(&self, stream: &str, partition: u32) -> Result<Offsets, LogError>;
    /// A partition's offsets as the store has them now: on a store several nodes share,
    /// what the others committed is asked for first (blocking; an error when the store
    /// cannot be reached), where [`Storage::offsets`] answers from what this node has seen
    /// so far. Default: [`Storage::offsets`].
    fn offsets_now(&self, stream: &str, partition: u32) -> Result<Offsets, LogError> {
        self.offsets(stream, partition)
    }
    /// As [`Storage::append`], committed only if `fence` still holds its lease in the
    /// commit's own transaction, else refused with [`LogError::Fenced`] (the object log; a
    /// log without leases, on one node, takes it as an append).
    fn append_fenced(
        &self,
        stream: &str,
        partition: u32,
        data: AppendData,
        fence: Option<Fence>,
    ) -> AppendFuture {
        let _ = fence;
        self.append(stream, partition, data)
    }
    /// True when the log itself checks idempotent producers' batches
    /// ([`sequence::ProducerBatch`]) as it commits them: a resend is answered with the first
    /// append's offsets, a gap or a stale epoch refused with [`LogError::Sequence`]. Else
    /// the front keeps the producers' state.
    fn checks_producers(&self) -> bool {
        false
    }
    /// The first offset whose batch has a timestamp at or after `timestamp`, if any.
    fn offset_for_time(
        &self,
        stream: &str,
        partition: u32,
        timestamp: i64,
    ) -> Result<Option<i64>, LogError>;
    /// Changes whenever appends became readable (for readers that follow the log's end: the
    /// MQTT tailer, Kafka long polls, the downlink). A reader marks what it has seen and
    /// waits for the next change; it then reads the offsets again.
    fn watch_commits(&self) -> tokio::sync::watch::Receiver<u64>;
    /// Drops what every partition's retention no longer keeps; returns how many units
    /// (segments, for the local log) went. Blocking IO.
    fn enforce_retention(&self) -> Result<usize, LogError>;
    /// What the writer did since the log was opened (for metrics).
    fn stats(&self) -> LogStats;
}

/// The log on local disk: `<dir>/<stream>-<partition>/<base offset>.log`.
pub struct SegmentLog {
    dir: PathBuf,
    streams: RwLock<HashMap<String, Arc<Stream>>>,
    to_appender: mpsc::Sender<Request>,
    /// Counts commits: changes whenever new records became readable.
    commits: tokio::sync::watch::Receiver<u64>,
    counters: Arc<Counters>,
    /// What the open found damaged (torn tails cut, corrupt batches kept), for the admin API
    /// and the tests.
    damage: Vec<(PathBuf, Damage)>,
}

impl std::fmt::Debug for SegmentLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SegmentLog")
            .field("dir", &self.dir)
            .finish()
    }
}

struct Stream {
    partitions: Vec<Arc<Cell>>,
}

/// A partition behind its lock. The appender holds the lock while writing, never while
/// syncing; readers hold it only to find where to read.
struct Cell {
    dir: PathBuf,
    state: Mutex<Partition>,
}

impl Cell {
    fn lock(&self) -> MutexGuard<'_, Partition> {
        // A panic while holding it is a bug that already stopped the appender.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

type Reply = oneshot::Sender<Result<Appended, LogError>>;

struct Request {
    cell: Arc<Cell>,
    data: AppendData,
    reply: Reply,
}

/// A partition directory being deleted is renamed to this prefix + its name (`~` is not in
/// any stream name); what a crash left of one is removed at open.
const DELETED_PREFIX: &str = "~deleted~";

/// Calls `f` with every whole batch of a partition, from the one holding `from` to what is
/// durable now, in order. Stops at a batch that does not parse (the log serves only checked
/// batches, so nothing after it can be read either). Returns the offset after the last
/// batch read (`from` if none). Blocking file IO.
pub fn for_each_batch(
    log: &dyn Storage,
    stream: &str,
    partition: u32,
    from: i64,
    mut f: impl FnMut(&BatchHeader, &[u8]),
) -> Result<i64, LogError> {
    let end = log.offsets(stream, partition)?.high_watermark;
    let mut offset = from;
    while offset < end {
        let read = log.read(stream, partition, offset, READ_BUDGET_BYTES)?;
        if read.batches.is_empty() {
            break;
        }
        for batch in read.iter() {
            let Ok((h, whole)) = batch else {
                return Ok(offset);
            };
            f(&h, whole);
            offset = h.last_offset() + 1;
        }
    }
    Ok(offset)
}

/// The current time in ms since the Unix epoch.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// A Kafka-legal topic name: 1-249 of `a-z A-Z 0-9 . _ -`, not `.` or `..`.
pub fn valid_stream_name(name: &str) -> bool {
    (1..=249).contains(&name.len())
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
}

impl SegmentLog {
    /// Opens the log in `dir` (created if new), recovering every partition found there, and
    /// starts the appender thread. `fsync`: answer appends only once they are on disk
    /// (default); without, once they are in the page cache (a process crash loses nothing,
    /// a power loss may lose the last appends). `queue_requests`: appends waiting for the
    /// appender before `append` waits too.
    pub fn open(dir: &Path, fsync: bool, queue_requests: usize) -> Result<Arc<Self>, LogError> {
        Self::open_with(dir, fsync, queue_requests, &HashMap::new())
    }

    /// As [`SegmentLog::open`], with the settings of known streams (from the metadata); a
    /// partition directory of a stream not in `configs` gets the defaults.
    pub fn open_with(
        dir: &Path,
        fsync: bool,
        queue_requests: usize,
        configs: &HashMap<String, StreamConfig>,
    ) -> Result<Arc<Self>, LogError> {
        std::fs::create_dir_all(dir).map_err(|e| LogError::io(dir, e))?;
        let now = now_ms();
        let mut found: HashMap<String, Vec<u32>> = HashMap::new();
        for entry in std::fs::read_dir(dir).map_err(|e| LogError::io(dir, e))? {
            let entry = entry.map_err(|e| LogError::io(dir, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(DELETED_PREFIX) {
                std::fs::remove_dir_all(entry.path())
                    .map_err(|e| LogError::io(&entry.path(), e))?;
                continue;
            }
            if let Some((stream, p)) = name.rsplit_once('-') {
                if let (true, Ok(p)) = (valid_stream_name(stream), p.parse::<u32>()) {
                    found.entry(stream.to_owned()).or_default().push(p);
                }
            }
        }
        let mut streams = HashMap::new();
        let mut damage = Vec::new();
        for (name, mut parts) in found {
            parts.sort_unstable();
            let count = parts.last().map_or(0, |p| p + 1);
            let mut partitions = Vec::new();
            for p in 0..count {
                let pdir = dir.join(format!("{name}-{p}"));
                let config = configs.get(&name).cloned().unwrap_or_default();
                let (partition, d) = Partition::open(&pdir, config, now)?;
                damage.extend(d.into_iter().map(|d| (pdir.clone(), d)));
                partitions.push(Arc::new(Cell {
                    dir: pdir,
                    state: Mutex::new(partition),
                }));
            }
            streams.insert(name, Arc::new(Stream { partitions }));
        }
        let (to_appender, rx) = mpsc::channel(queue_requests.max(1));
        let (commits_tx, commits) = tokio::sync::watch::channel(0u64);
        let counters = Arc::new(Counters::default());
        let appender_counters = counters.clone();
        std::thread::Builder::new()
            .name("ferry-appender".into())
            .spawn(move || appender(rx, fsync, commits_tx, appender_counters))
            .map_err(|e| LogError::io(dir, e))?;
        Ok(Arc::new(Self {
            dir: dir.to_owned(),
            streams: RwLock::new(streams),
            to_appender,
            commits,
            counters,
            damage,
        }))
    }

    /// What recovery found at open.
    pub fn damage(&self) -> &[(PathBuf, Damage)] {
        &self.damage
    }

    fn cell(&self, stream: &str, partition: u32) -> Result<Arc<Cell>, LogError> {
        let streams = self.streams.read().unwrap_or_else(|e| e.into_inner());
        let s = streams
            .get(stream)
            .ok_or_else(|| LogError::UnknownStream(stream.to_owned()))?;
        s.partitions
            .get(partition as usize)
            .cloned()
            .ok_or_else(|| LogError::UnknownPartition {
                stream: stream.to_owned(),
                partition,
            })
    }
}

impl Storage for SegmentLog {
    fn create_stream(&self, name: &str, config: &StreamConfig) -> Result<(), LogError> {
        if !valid_stream_name(name) {
            return Err(LogError::BadStreamName(name.to_owned()));
        }
        let mut streams = self.streams.write().unwrap_or_else(|e| e.into_inner());
        if streams.contains_key(name) {
            return Ok(());
        }
        let mut partitions = Vec::new();
        for p in 0..config.partitions.max(1) {
            let pdir = self.dir.join(format!("{name}-{p}"));
            let (partition, _) = Partition::open(&pdir, config.clone(), now_ms())?;
            partitions.push(Arc::new(Cell {
                dir: pdir,
                state: Mutex::new(partition),
            }));
        }
        streams.insert(name.to_owned(), Arc::new(Stream { partitions }));
        Ok(())
    }

    fn delete_stream(&self, name: &str) -> Result<bool, LogError> {
        let Some(stream) = self
            .streams
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name)
        else {
            return Ok(false);
        };
        for cell in &stream.partitions {
            // Under the lock the appender writes under: no append lands after this.
            cell.lock().deleted = true;
            // Renamed first (a name no stream can have, so that a crash before the removal
            // leaves nothing that opens as a stream), then removed.
            let leaf = cell
                .dir
                .file_name()
                .map_or_else(Default::default, |n| n.to_owned());
            let mut doomed = std::ffi::OsString::from(DELETED_PREFIX);
            doomed.push(&leaf);
            let doomed = self.dir.join(doomed);
            std::fs::rename(&cell.dir, &doomed).map_err(|e| LogError::io(&cell.dir, e))?;
            std::fs::remove_dir_all(&doomed).map_err(|e| LogError::io(&doomed, e))?;
        }
        // The removal made durable: a deleted stream does not come back after a power loss.
        std::fs::File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| LogError::io(&self.dir, e))?;
        Ok(true)
    }

    fn streams(&self) -> Vec<StreamInfo> {
        let streams = self.streams.read().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<_> = streams
            .iter()
            .map(|(name, s)| StreamInfo {
                name: name.clone(),
                partitions: s
                    .partitions
                    .iter()
                    .map(|c| {
                        let p = c.lock();
                        PartitionInfo {
                            offsets: Offsets {
                                log_start: p.log_start(),
                                high_watermark: p.durable_next,
                            },
                            bytes: p.size_bytes(),
                            segments: p.segments.len(),
                            active_base: p.segments.last().map_or(0, |s| s.base_offset),
                        }
                    })
                    .collect(),
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    fn append(&self, stream: &str, partition: u32, data: AppendData) -> AppendFuture {
        let cell = self.cell(stream, partition);
        let tx = self.to_appender.clone();
        Box::pin(async move {
            let cell = cell?;
            let (reply, answer) = oneshot::channel();
            tx.send(Request { cell, data, reply })
                .await
                .map_err(|_| LogError::Closed)?;
            answer.await.map_err(|_| LogError::Closed)?
        })
    }

    fn read(
        &self,
        stream: &str,
        partition: u32,
        offset: i64,
        max_bytes: usize,
    ) -> Result<ReadResult, LogError> {
        let cell = self.cell(stream, partition)?;
        let (plan, high_watermark) = {
            let p = cell.lock();
            (p.plan_read(offset)?, p.durable_next)
        };
        let Some(plan) = plan else {
            return Ok(ReadResult {
                batches: Bytes::new(),
                high_watermark,
            });
        };
        // Skip batches that end before `offset`, then take whole batches up to max_bytes
        // (at least one).
        let mut out = BytesMut::new();
        let mut position = plan.from;
        let mut header = [0u8; batch::HEADER_LEN];
        let corrupt = |position: u64, error: BatchError| LogError::Corrupt {
            path: plan.path.clone(),
            position,
            error,
        };
        while position < plan.to {
            plan.file
                .read_exact_at(&mut header, position)
                .map_err(|e| LogError::io(&plan.path, e))?;
            let h = BatchHeader::parse(&header).map_err(|e| corrupt(position, e))?;
            let len = h.total_len();
            if h.last_offset() < offset {
                position += len as u64;
                continue;
            }
            if !out.is_empty() && out.len() + len > max_bytes {
                break;
            }
            let start = out.len();
            out.resize(start + len, 0);
            plan.file
                .read_exact_at(&mut out[start..], position)
                .map_err(|e| LogError::io(&plan.path, e))?;
            batch::verify_crc(&out[start..]).map_err(|e| corrupt(position, e))?;
            position += len as u64;
        }
        Ok(ReadResult {
            batches: out.freeze(),
            high_watermark,
        })
    }

    fn offsets(&self, stream: &str, partition: u32) -> Result<Offsets, LogError> {
        let cell = self.cell(stream, partition)?;
        let p = cell.lock();
        Ok(Offsets {
            log_start: p.log_start(),
            high_watermark: p.durable_next,
        })
    }

    fn offset_for_time(
        &self,
        stream: &str,
        partition: u32,
        timestamp: i64,
    ) -> Result<Option<i64>, LogError> {
        self.cell(stream, partition)?
            .lock()
            .offset_for_time(timestamp)
    }

    fn watch_commits(&self) -> tokio::sync::watch::Receiver<u64> {
        self.commits.clone()
    }

    /// Drops whole old segments in every partition (never the active one).
    fn enforce_retention(&self) -> Result<usize, LogError> {
        let now = now_ms();
        let cells: Vec<_> = {
            let streams = self.streams.read().unwrap_or_else(|e| e.into_inner());
            streams
                .values()
                .flat_map(|s| s.partitions.clone())
                .collect()
        };
        let mut removed = 0;
        for cell in cells {
            removed += cell.lock().enforce_retention(now)?;
        }
        Ok(removed)
    }

    fn stats(&self) -> LogStats {
        self.counters.load()
    }
}

/// Turns appends into whole v2 batches with base offset 0 (the log sets them): records of
/// consecutive appends are merged into batches of up to [`MERGED_BATCH_BYTES`]; a
/// producer's batches are checked (CRC) and kept as they are. Shared by every backend, so
/// that what one accepts the others accept too.
#[derive(Default)]
pub(crate) struct Encoder {
    bytes: BytesMut,
    records: u64,
    open: Option<BatchBuilder>,
}

impl Encoder {
    /// Adds one append; its records' place as (first, last) record index counted from the
    /// start of this encoder's output. Nothing is added when it is refused.
    pub(crate) fn add(&mut self, data: &AppendData) -> Result<(u64, u64), LogError> {
        let first = self.records;
        match data {
            AppendData::Records(records) if records.is_empty() => {
                return Err(LogError::BadBatch("no records".into()));
            }
            AppendData::Records(records) => {
                for r in records {
                    if self
                        .open
                        .as_ref()
                        .is_some_and(|b| b.size() >= MERGED_BATCH_BYTES)
                    {
                        self.close_batch();
                    }
                    let b = self
                        .open
                        .get_or_insert_with(|| BatchBuilder::new(r.timestamp));
                    let headers: Vec<Header<'_>> = r
                        .headers
                        .iter()
                        .map(|(k, v)| Header {
                            key: k,
                            value: v.as_deref(),
                        })
                        .collect();
                    b.push(r.timestamp, r.key.as_deref(), r.value.as_deref(), &headers);
                }
                self.records += records.len() as u64;
            }
            AppendData::Batches(bytes) => {
                // Check every batch before any of it is taken.
                let mut at = 0;
                let mut count = 0u64;
                while at < bytes.len() {
                    let h = batch::verify_crc(&bytes[at..])
                        .map_err(|e| LogError::BadBatch(e.to_string()))?;
                    if h.total_len() > segment::MAX_BATCH_BYTES {
                        return Err(LogError::BadBatch(format!(
                            "a batch of {} bytes (at most {})",
                            h.total_len(),
                            segment::MAX_BATCH_BYTES
                        )));
                    }
                    count += u64::from(h.last_offset_delta as u32) + 1;
                    at += h.total_len();
                }
                if count == 0 {
                    return Err(LogError::BadBatch("no batches".into()));
                }
                self.close_batch();
                self.bytes.extend_from_slice(bytes);
                self.records += count;
            }
        }
        Ok((first, self.records - 1))
    }

    fn close_batch(&mut self) {
        if let Some(b) = self.open.take() {
            self.bytes.extend_from_slice(&b.finish(0));
        }
    }

    /// The batches of everything added, back to back, and their record count.
    pub(crate) fn finish(mut self) -> (BytesMut, u64) {
        self.close_batch();
        (self.bytes, self.records)
    }
}

/// One partition's share of a commit: its bytes and the requests they answer.
struct Pending {
    cell: Arc<Cell>,
    encoder: Encoder,
    /// Per request: its reply, and its records' position in the write as (first, last)
    /// record index counted from the start of this partition's share.
    replies: Vec<(Reply, u64, u64)>,
}

impl Pending {
    fn add(&mut self, data: AppendData, reply: Reply) {
        match self.encoder.add(&data) {
            Ok((first, last)) => self.replies.push((reply, first, last)),
            Err(e) => {
                let _ = reply.send(Err(e));
            }
        }
    }
}

/// The group-commit loop; runs until every sender is gone.
fn appender(
    mut rx: mpsc::Receiver<Request>,
    fsync: bool,
    commits: tokio::sync::watch::Sender<u64>,
    stats: Arc<Counters>,
) {
    while let Some(first) = rx.blocking_recv() {
        let mut pending: Vec<Pending> = Vec::new();
        let mut next = Some(first);
        let mut n = 0;
        while let Some(req) = next {
            let i = match pending.iter().position(|p| Arc::ptr_eq(&p.cell, &req.cell)) {
                Some(i) => i,
                None => {
                    pending.push(Pending {
                        cell: req.cell.clone(),
                        encoder: Encoder::default(),
                        replies: Vec::new(),
                    });
                    pending.len() - 1
                }
            };
            pending[i].add(req.data, req.reply);
            n += 1;
            next = if n < GROUP_MAX_REQUESTS {
                rx.try_recv().ok()
            } else {
                None
            };
        }
        commit(pending, fsync, &stats, &commits);
    }
}

/// Writes each partition's share, syncs each file once, then publishes (readers told on
/// `commits`) and answers: an append is answered after its readers were told.
fn commit(
    pending: Vec<Pending>,
    fsync: bool,
    stats: &Counters,
    commits: &tokio::sync::watch::Sender<u64>,
) {
    let now = now_ms();
    let mut shares: Vec<_> = pending
        .into_iter()
        .map(|p| {
            let (bytes, _) = p.encoder.finish();
            (p.cell, bytes, p.replies)
        })
        .collect();
    let mut written = Vec::with_capacity(shares.len());
    for (cell, bytes, _) in &mut shares {
        if bytes.is_empty() {
            written.push(Ok(None));
            continue;
        }
        let result = cell.lock().append(bytes, now);
        written.push(result.map(Some));
    }
    // One sync per file, outside the partition locks: readers go on meanwhile.
    let started = std::time::Instant::now();
    let mut synced = Vec::with_capacity(written.len());
    for w in &written {
        synced.push(match w {
            Ok(Some((_, _, file, path))) if fsync => segment::Segment::sync(file, path),
            _ => Ok(()),
        });
    }
    stats.committed(started.elapsed().as_micros() as u64);
    for ((_, bytes, _), w) in shares.iter().zip(&written) {
        if let Ok(Some((base, last, _, _))) = w {
            stats.wrote((last - base + 1) as u64, bytes.len() as u64);
        }
    }
    let outcomes: Vec<_> = written
        .into_iter()
        .zip(synced)
        .map(|(w, s)| w.and_then(|w| s.map(|()| w)))
        .collect();
    for ((cell, _, _), outcome) in shares.iter().zip(&outcomes) {
        if let Ok(Some(_)) = outcome {
            cell.lock().mark_durable();
        }
    }
    commits.send_modify(|n| *n += 1);
    for ((cell, _, replies), outcome) in shares.into_iter().zip(outcomes) {
        match outcome {
            Ok(Some((base, _, _, _))) => {
                for (reply, first, last) in replies {
                    let _ = reply.send(Ok(Appended {
                        base_offset: base + first as i64,
                        last_offset: base + last as i64,
                    }));
                }
            }
            Ok(None) => {}
            Err(e @ LogError::UnknownStream(_)) => {
                // Its stream was deleted while the append waited.
                let msg = e.to_string();
                for (reply, _, _) in replies {
                    let _ = reply.send(Err(LogError::UnknownStream(msg.clone())));
                }
            }
            Err(e) => {
                // The partition's file is in an unknown state: nothing of this write is
                // acknowledged; the next open recovers the file.
                error!(dir = %cell.dir.display(), error = %e, "append failed; the partition takes no more appends");
                let msg = e.to_string();
                cell.lock().failed = Some(msg.clone());
                for (reply, _, _) in replies {
                    let _ = reply.send(Err(LogError::Io {
                        path: cell.dir.clone(),
                        source: std::io::Error::other(msg.clone()),
                    }));
                }
            }
        }
    }
}
