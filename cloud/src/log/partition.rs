//! One partition: its segments in offset order, the last one active. Appends go to the
//! active segment (rolled by size and age); reads see only what is durable; retention drops
//! whole segments from the front.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ferry_protocol::kafka::batch::{self, BatchHeader};
use tracing::info;

use super::segment::{Damage, Segment, MAX_BATCH_BYTES};
use super::{LogError, StreamConfig};

#[derive(Debug)]
pub(crate) struct Partition {
    dir: PathBuf,
    pub(crate) segments: Vec<Segment>,
    /// The offset after the last durable (acknowledgeable) record: the high watermark.
    pub(crate) durable_next: i64,
    /// Bytes of the active segment that are durable; reads stop there.
    durable_len: u64,
    config: StreamConfig,
    /// Set when a write or sync failed: the file's state is unknown, so the partition takes
    /// no more appends until the log is opened again (and recovers it), as Kafka does.
    pub(crate) failed: Option<String>,
    /// Set when its stream is deleted: appends that were already queued are refused.
    pub(crate) deleted: bool,
}

/// Where a read finds its bytes: a file and a range in it, read outside the partition lock.
#[derive(Debug)]
pub(crate) struct ReadPlan {
    pub(crate) file: Arc<File>,
    pub(crate) path: PathBuf,
    pub(crate) from: u64,
    pub(crate) to: u64,
}

impl Partition {
    /// Opens the partition in `dir` (created if new), recovering its active segment.
    pub(crate) fn open(
        dir: &Path,
        config: StreamConfig,
        now_ms: i64,
    ) -> Result<(Self, Vec<Damage>), LogError> {
        std::fs::create_dir_all(dir).map_err(|e| LogError::io(dir, e))?;
        let mut bases = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(|e| LogError::io(dir, e))? {
            let entry = entry.map_err(|e| LogError::io(dir, e))?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if let Some(base) = name
                .strip_suffix(".log")
                .and_then(|b| b.parse::<i64>().ok())
            {
                bases.push(base);
            }
        }
        bases.sort_unstable();
        let mut segments = Vec::new();
        let mut damage = Vec::new();
        for (i, &base) in bases.iter().enumerate() {
            let active = i + 1 == bases.len();
            let (seg, d) = Segment::open(dir, base, config.index_interval_bytes, active)?;
            damage.extend(d);
            segments.push(seg);
        }
        if segments.is_empty() {
            segments.push(Segment::create(
                dir,
                0,
                config.index_interval_bytes,
                now_ms,
            )?);
        }
        let active = segments.last().expect("at least one segment");
        let p = Self {
            dir: dir.to_owned(),
            durable_next: active.next_offset,
            durable_len: active.len,
            segments,
            config,
            failed: None,
            deleted: false,
        };
        Ok((p, damage))
    }

    fn active(&self) -> &Segment {
        self.segments
            .last()
            .expect("a partition always has an active segment")
    }

    /// The first offset still in the log.
    pub(crate) fn log_start(&self) -> i64 {
        self.segments.first().map_or(0, |s| s.base_offset)
    }

    /// The offset the next record will get.
    pub(crate) fn next_offset(&self) -> i64 {
        self.active().next_offset
    }

    pub(crate) fn size_bytes(&self) -> u64 {
        self.segments.iter().map(|s| s.len).sum()
    }

    /// Writes `batches` (whole batches back to back) at the end of the log, giving them
    /// consecutive offsets; returns the first and last offset and the file to sync. Not
    /// durable, and not readable, until [`Partition::mark_durable`].
    pub(crate) fn append(
        &mut self,
        batches: &mut [u8],
        now_ms: i64,
    ) -> Result<(i64, i64, Arc<File>, PathBuf), LogError> {
        if self.deleted {
            return Err(LogError::UnknownStream(self.dir.display().to_string()));
        }
        if let Some(why) = &self.failed {
            return Err(LogError::Failed(why.clone()));
        }
        let active = self.active();
        let too_big =
            active.len > 0 && active.len + batches.len() as u64 > self.config.segment_bytes;
        let too_old = active.len > 0 && now_ms - active.created_ms > self.config.segment_ms;
        if too_big || too_old {
            self.roll(now_ms)?;
        }
        let first = self.next_offset();
        let mut next = first;
        let mut headers = Vec::new();
        let mut at = 0;
        while at < batches.len() {
            batch::set_base_offset(&mut batches[at..], next);
            let h = BatchHeader::parse(&batches[at..])
                .map_err(|e| LogError::BadBatch(e.to_string()))?;
            if h.total_len() > MAX_BATCH_BYTES || at + h.total_len() > batches.len() {
                return Err(LogError::BadBatch(format!(
                    "batch of {} bytes",
                    h.total_len()
                )));
            }
            next = h.last_offset() + 1;
            at += h.total_len();
            headers.push(h);
        }
        let seg = self.segments.last_mut().expect("active segment");
        seg.append(batches, &headers)?;
        Ok((first, next - 1, seg.file.clone(), seg.path().to_owned()))
    }

    /// Everything appended so far is on disk (or, without fsync, in the page cache): reads
    /// may see it and its producers may be answered.
    pub(crate) fn mark_durable(&mut self) {
        let (next, len) = (self.active().next_offset, self.active().len);
        self.durable_next = next;
        self.durable_len = len;
    }

    /// Starts a new active segment; the old one's indexes are written out.
    fn roll(&mut self, now_ms: i64) -> Result<(), LogError> {
        let old = self.active();
        old.write_indexes()?;
        Segment::sync(&old.file, old.path())?;
        let base = old.next_offset;
        let seg = Segment::create(&self.dir, base, self.config.index_interval_bytes, now_ms)?;
        self.segments.push(seg);
        self.durable_len = 0;
        Ok(())
    }

    /// Where to read from for `offset`: the segment holding it, from the batch holding it
    /// (or an earlier one: the reader skips what ends before `offset`) to the durable end.
    /// None when `offset` is the high watermark (nothing yet); an error when out of range.
    pub(crate) fn plan_read(&self, offset: i64) -> Result<Option<ReadPlan>, LogError> {
        if offset < self.log_start() || offset > self.durable_next {
            return Err(LogError::OffsetOutOfRange {
                offset,
                start: self.log_start(),
                end: self.durable_next,
            });
        }
        if offset == self.durable_next {
            return Ok(None);
        }
        let i = self.segments.partition_point(|s| s.base_offset <= offset) - 1;
        let seg = &self.segments[i];
        let is_active = i + 1 == self.segments.len();
        let to = if is_active { self.durable_len } else { seg.len };
        Ok(Some(ReadPlan {
            file: seg.file.clone(),
            path: seg.path().to_owned(),
            from: seg.position_for(offset),
            to,
        }))
    }

    /// The first offset of the first batch with a timestamp at or after `timestamp`.
    pub(crate) fn offset_for_time(&self, timestamp: i64) -> Result<Option<i64>, LogError> {
        let last = self.segments.len() - 1;
        for (i, seg) in self.segments.iter().enumerate() {
            let limit = if i == last { self.durable_len } else { seg.len };
            if let Some(o) = seg.offset_for_time(timestamp, limit)? {
                return Ok(Some(o));
            }
        }
        Ok(None)
    }

    /// Drops whole segments from the front while the partition is over its byte budget or
    /// they are older than the retention time (by their newest record). The active segment
    /// stays. Returns the segments removed.
    pub(crate) fn enforce_retention(&mut self, now_ms: i64) -> Result<usize, LogError> {
        let mut removed = 0;
        while self.segments.len() > 1 {
            let oldest = &self.segments[0];
            let over_bytes = self
                .config
                .retention_bytes
                .is_some_and(|max| self.size_bytes() - oldest.len >= max);
            let newest_ms = if oldest.max_timestamp >= 0 {
                oldest.max_timestamp
            } else {
                oldest.created_ms
            };
            let too_old = self
                .config
                .retention_ms
                .is_some_and(|max| now_ms - newest_ms > max);
            if !(over_bytes || too_old) {
                break;
            }
            let seg = self.segments.remove(0);
            for path in [
                seg.path().to_owned(),
                seg.path().with_extension("index"),
                seg.path().with_extension("timeindex"),
            ] {
                match std::fs::remove_file(&path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(LogError::io(&path, e)),
                }
            }
            info!(dir = %self.dir.display(), base_offset = seg.base_offset, "segment removed by retention");
            removed += 1;
        }
        Ok(removed)
    }
}
