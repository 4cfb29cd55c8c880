//! The log in memory: a second [`Storage`] backend, of which nothing outlives the process.
//!
//! It is here for two reasons: the fronts' tests run over it to show that they depend on
//! the trait and nothing else (the next backend, object storage, plugs into the same seam),
//! and it is the smallest complete example of what a backend must do. It is not offered in
//! the node's configuration: a node on it would lose every record at a restart.
//!
//! What it shares with [`super::SegmentLog`], so that both accept and answer the same:
//! the [`Encoder`] that turns appends into batches, stream-name rules, offsets and their
//! errors, whole batches on read (at least one), retention by bytes and by age (whole
//! batches here, whole segments there: the unit is the backend's). An append is durable
//! (readable, counted in `watch_commits`) when its future is made, which is before it is
//! polled.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use bytes::{Bytes, BytesMut};
use ferry_protocol::kafka::batch::{self, BatchHeader};
use tokio::sync::watch;

use super::{
    now_ms, valid_stream_name, AppendData, AppendFuture, Appended, Counters, Encoder, LogError,
    LogStats, Offsets, PartitionInfo, ReadResult, Storage, StreamConfig, StreamInfo,
};

/// A log held in memory; see the module docs.
#[derive(Debug)]
pub struct MemoryLog {
    streams: RwLock<HashMap<String, Arc<[Mutex<Part>]>>>,
    commits: watch::Sender<u64>,
    counters: Counters,
}

/// One partition: its batches, oldest first.
#[derive(Debug)]
struct Part {
    config: StreamConfig,
    batches: VecDeque<Stored>,
    /// The first offset kept (moves up as retention drops batches).
    start: i64,
    /// The next offset to give.
    next: i64,
    /// Bytes of the batches kept.
    bytes: u64,
    /// Set when its stream is deleted: an append holding it is refused.
    deleted: bool,
}

#[derive(Debug)]
struct Stored {
    last: i64,
    max_timestamp: i64,
    bytes: Bytes,
}

impl Default for MemoryLog {
    fn default() -> Self {
        Self {
            streams: RwLock::default(),
            commits: watch::channel(0).0,
            counters: Counters::default(),
        }
    }
}

impl MemoryLog {
    /// An empty log.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn stream(&self, name: &str) -> Result<Arc<[Mutex<Part>]>, LogError> {
        self.streams
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned()
            .ok_or_else(|| LogError::UnknownStream(name.to_owned()))
    }

    fn with_part<T>(
        &self,
        stream: &str,
        partition: u32,
        f: impl FnOnce(&mut Part) -> Result<T, LogError>,
    ) -> Result<T, LogError> {
        let parts = self.stream(stream)?;
        let cell = parts
            .get(partition as usize)
            .ok_or_else(|| LogError::UnknownPartition {
                stream: stream.to_owned(),
                partition,
            })?;
        let mut part = lock(cell);
        f(&mut part)
    }

    fn append_now(
        &self,
        stream: &str,
        partition: u32,
        data: AppendData,
    ) -> Result<Appended, LogError> {
        let mut encoder = Encoder::default();
        encoder.add(&data)?;
        let (mut bytes, _) = encoder.finish();
        let appended = self.with_part(stream, partition, |p| {
            if p.deleted {
                return Err(LogError::UnknownStream(stream.to_owned()));
            }
            Ok(p.push(&mut bytes))
        })?;
        self.counters.committed(0);
        self.counters.wrote(
            (appended.last_offset - appended.base_offset + 1) as u64,
            bytes.len() as u64,
        );
        self.commits.send_modify(|n| *n += 1);
        Ok(appended)
    }
}

fn lock(part: &Mutex<Part>) -> MutexGuard<'_, Part> {
    part.lock().unwrap_or_else(|e| e.into_inner())
}

impl Part {
    fn new(config: StreamConfig) -> Self {
        Self {
            config,
            batches: VecDeque::new(),
            start: 0,
            next: 0,
            bytes: 0,
            deleted: false,
        }
    }

    fn offsets(&self) -> Offsets {
        Offsets {
            log_start: self.start,
            high_watermark: self.next,
        }
    }

    /// Gives the encoded batches their offsets and keeps them.
    fn push(&mut self, bytes: &mut BytesMut) -> Appended {
        let base_offset = self.next;
        let mut at = 0;
        while at < bytes.len() {
            batch::set_base_offset(&mut bytes[at..], self.next);
            // The encoder checked every batch: its header parses and it is whole.
            let Ok(h) = BatchHeader::parse(&bytes[at..]) else {
                break;
            };
            let whole = Bytes::copy_from_slice(&bytes[at..at + h.total_len()]);
            self.bytes += whole.len() as u64;
            self.batches.push_back(Stored {
                last: h.last_offset(),
                max_timestamp: h.max_timestamp,
                bytes: whole,
            });
            self.next = h.last_offset() + 1;
            at += h.total_len();
        }
        Appended {
            base_offset,
            last_offset: self.next - 1,
        }
    }

    /// Drops batches from the front while over the byte budget or older than the
    /// retention time; the newest batch stays (as the local log's active segment does).
    fn enforce_retention(&mut self, now: i64) -> usize {
        let mut removed = 0;
        while self.batches.len() > 1 {
            let Some(oldest) = self.batches.front() else {
                break;
            };
            let over_bytes = self
                .config
                .retention_bytes
                .is_some_and(|max| self.bytes - oldest.bytes.len() as u64 >= max);
            let too_old = self
                .config
                .retention_ms
                .is_some_and(|max| now - oldest.max_timestamp > max);
            if !(over_bytes || too_old) {
                break;
            }
            self.bytes -= oldest.bytes.len() as u64;
            self.start = oldest.last + 1;
            self.batches.pop_front();
            removed += 1;
        }
        removed
    }
}

impl Storage for MemoryLog {
    fn create_stream(&self, name: &str, config: &StreamConfig) -> Result<(), LogError> {
        if !valid_stream_name(name) {
            return Err(LogError::BadStreamName(name.to_owned()));
        }
        let mut streams = self.streams.write().unwrap_or_else(|e| e.into_inner());
        streams.entry(name.to_owned()).or_insert_with(|| {
            (0..config.partitions.max(1))
                .map(|_| Mutex::new(Part::new(config.clone())))
                .collect()
        });
        Ok(())
    }

    fn delete_stream(&self, name: &str) -> Result<bool, LogError> {
        let removed = self
            .streams
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name);
        match removed {
            Some(parts) => {
                for p in parts.iter() {
                    lock(p).deleted = true;
                }
                Ok(true)
            }
            None => Ok(false),
        }
    }

    fn streams(&self) -> Vec<StreamInfo> {
        let streams = self.streams.read().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<_> = streams
            .iter()
            .map(|(name, parts)| StreamInfo {
                name: name.clone(),
                partitions: parts
                    .iter()
                    .map(|p| {
                        let p = lock(p);
                        PartitionInfo {
                            offsets: p.offsets(),
                            bytes: p.bytes,
                            segments: 1,
                            active_base: p.start,
                        }
                    })
                    .collect(),
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    fn append(&self, stream: &str, partition: u32, data: AppendData) -> AppendFuture {
        Box::pin(std::future::ready(self.append_now(stream, partition, data)))
    }

    fn read(
        &self,
        stream: &str,
        partition: u32,
        offset: i64,
        max_bytes: usize,
    ) -> Result<ReadResult, LogError> {
        self.with_part(stream, partition, |p| {
            if offset < p.start || offset > p.next {
                return Err(LogError::OffsetOutOfRange {
                    offset,
                    start: p.start,
                    end: p.next,
                });
            }
            let first = p.batches.partition_point(|b| b.last < offset);
            let mut out = BytesMut::new();
            for b in p.batches.iter().skip(first) {
                if !out.is_empty() && out.len() + b.bytes.len() > max_bytes {
                    break;
                }
                out.extend_from_slice(&b.bytes);
            }
            Ok(ReadResult {
                batches: out.freeze(),
                high_watermark: p.next,
            })
        })
    }

    fn offsets(&self, stream: &str, partition: u32) -> Result<Offsets, LogError> {
        self.with_part(stream, partition, |p| Ok(p.offsets()))
    }

    fn offset_for_time(
        &self,
        stream: &str,
        partition: u32,
        timestamp: i64,
    ) -> Result<Option<i64>, LogError> {
        self.with_part(stream, partition, |p| {
            Ok(p.batches
                .iter()
                .find(|b| b.max_timestamp >= timestamp)
                .and_then(|b| BatchHeader::parse(&b.bytes).ok())
                .map(|h| h.base_offset))
        })
    }

    fn watch_commits(&self) -> watch::Receiver<u64> {
        self.commits.subscribe()
    }

    fn enforce_retention(&self) -> Result<usize, LogError> {
        let now = now_ms();
        let parts: Vec<_> = self
            .streams
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        Ok(parts
            .iter()
            .flat_map(|s| s.iter())
            .map(|p| lock(p).enforce_retention(now))
            .sum())
    }

    fn stats(&self) -> LogStats {
        self.counters.load()
    }
}
