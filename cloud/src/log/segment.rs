//! One segment: an append-only file of record batches (`{base:020}.log`), its sparse offset
//! index (`.index`) and time index (`.timeindex`). The format is in `docs/log-format.md`.
//!
//! The indexes live in memory while the segment is active and are written out when it is
//! rolled or the log is closed; a missing or short index is rebuilt from the batch headers.
//! The active segment is always scanned at open, batch by batch with the CRC checked, which
//! finds the end of what was written (a torn tail is cut off) and rebuilds its indexes.

use std::fs::{File, OpenOptions};
use std::io::{BufReader, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ferry_protocol::kafka::batch::{self, BatchError, BatchHeader, HEADER_LEN, LOG_OVERHEAD};
use tracing::{error, warn};

use super::LogError;

/// A batch larger than this in a segment file is taken for garbage (Kafka's own limit on a
/// message batch is 1 MiB by default; this leaves room for any configuration).
pub(crate) const MAX_BATCH_BYTES: usize = 64 * 1024 * 1024;

/// One entry of the sparse offset index: the first offset of a batch and where it starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct IndexEntry {
    pub(crate) offset: i64,
    pub(crate) position: u64,
}

/// One entry of the time index: the largest timestamp in the segment up to a batch, and that
/// batch's first offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TimeEntry {
    pub(crate) timestamp: i64,
    pub(crate) offset: i64,
}

/// What the open-time scan found wrong in an active segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Damage {
    /// The end of the file did not hold a whole, valid batch (a write cut short by a crash
    /// or power loss); it was truncated at `at`, losing `bytes` bytes never acknowledged.
    TornTail { at: u64, bytes: u64 },
    /// A batch in the middle failed its check, with valid batches after it: reported and
    /// kept (reads of it fail), never truncated, because what follows was acknowledged.
    Corrupt { position: u64, error: String },
}

#[derive(Debug)]
pub(crate) struct Segment {
    pub(crate) base_offset: i64,
    path: PathBuf,
    pub(crate) file: Arc<File>,
    /// Bytes of whole batches in the file.
    pub(crate) len: u64,
    /// The offset after the last record in the segment.
    pub(crate) next_offset: i64,
    pub(crate) max_timestamp: i64,
    pub(crate) index: Vec<IndexEntry>,
    pub(crate) time_index: Vec<TimeEntry>,
    bytes_since_index: u64,
    index_interval_bytes: u64,
    /// When the segment was created (ms since the epoch), for rolling by age.
    pub(crate) created_ms: i64,
}

pub(crate) fn log_path(dir: &Path, base_offset: i64) -> PathBuf {
    dir.join(format!("{base_offset:020}.log"))
}

impl Segment {
    /// Creates an empty segment starting at `base_offset`.
    pub(crate) fn create(
        dir: &Path,
        base_offset: i64,
        index_interval_bytes: u64,
        now_ms: i64,
    ) -> Result<Self, LogError> {
        let path = log_path(dir, base_offset);
        let file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| LogError::io(&path, e))?;
        Ok(Self::empty(
            base_offset,
            path,
            file,
            index_interval_bytes,
            now_ms,
        ))
    }

    /// Opens a segment written before. `active`: it is the partition's last segment, whose
    /// tail may be torn; every batch is checked and the file cut after the last good one.
    /// Otherwise the indexes are loaded (or rebuilt from batch headers).
    pub(crate) fn open(
        dir: &Path,
        base_offset: i64,
        index_interval_bytes: u64,
        active: bool,
    ) -> Result<(Self, Vec<Damage>), LogError> {
        let path = log_path(dir, base_offset);
        let file = OpenOptions::new()
            .read(true)
            .append(true)
            .open(&path)
            .map_err(|e| LogError::io(&path, e))?;
        let meta = file.metadata().map_err(|e| LogError::io(&path, e))?;
        let created_ms = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_millis() as i64);
        let mut seg = Self::empty(base_offset, path, file, index_interval_bytes, created_ms);
        let file_len = meta.len();
        if !active && seg.load_indexes(file_len)? {
            return Ok((seg, Vec::new()));
        }
        let damage = seg.scan(file_len, active)?;
        Ok((seg, damage))
    }

    /// A segment with nothing known about its file yet.
    fn empty(
        base_offset: i64,
        path: PathBuf,
        file: File,
        index_interval_bytes: u64,
        created_ms: i64,
    ) -> Self {
        Self {
            base_offset,
            path,
            file: Arc::new(file),
            len: 0,
            next_offset: base_offset,
            max_timestamp: -1,
            index: Vec::new(),
            time_index: Vec::new(),
            bytes_since_index: 0,
            index_interval_bytes,
            created_ms,
        }
    }

    /// Appends whole batches (already given their offsets) to the file, without waiting for
    /// the disk. `batches` holds back-to-back batches, `headers` their parsed headers.
    pub(crate) fn append(&mut self, bytes: &[u8], headers: &[BatchHeader]) -> Result<(), LogError> {
        (&*self.file)
            .write_all(bytes)
            .map_err(|e| LogError::io(&self.path, e))?;
        let mut position = self.len;
        for h in headers {
            self.note_batch(h, position);
            position += h.total_len() as u64;
        }
        debug_assert_eq!(position, self.len + bytes.len() as u64);
        self.len = position;
        Ok(())
    }

    /// Makes what was appended durable.
    pub(crate) fn sync(file: &File, path: &Path) -> Result<(), LogError> {
        file.sync_data().map_err(|e| LogError::io(path, e))
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Updates the in-memory state for a batch written at `position`.
    fn note_batch(&mut self, h: &BatchHeader, position: u64) {
        if self.index.is_empty() || self.bytes_since_index >= self.index_interval_bytes {
            self.index.push(IndexEntry {
                offset: h.base_offset,
                position,
            });
            self.bytes_since_index = 0;
        }
        self.bytes_since_index += h.total_len() as u64;
        if h.max_timestamp > self.max_timestamp {
            self.max_timestamp = h.max_timestamp;
            if self
                .time_index
                .last()
                .is_none_or(|t| t.timestamp < h.max_timestamp)
            {
                self.time_index.push(TimeEntry {
                    timestamp: h.max_timestamp,
                    offset: h.base_offset,
                });
            }
        }
        self.next_offset = h.last_offset() + 1;
    }

    /// The file position to start reading at for `offset`: the last indexed batch at or
    /// before it (the caller skips batches that end before `offset`).
    pub(crate) fn position_for(&self, offset: i64) -> u64 {
        match self.index.partition_point(|e| e.offset <= offset) {
            0 => 0,
            i => self.index[i - 1].position,
        }
    }

    /// The first offset of the first batch whose largest timestamp is at least `timestamp`,
    /// found from the time index and then batch headers; None if every batch is older.
    pub(crate) fn offset_for_time(
        &self,
        timestamp: i64,
        limit: u64,
    ) -> Result<Option<i64>, LogError> {
        if self.max_timestamp < timestamp {
            return Ok(None);
        }
        // Entries are increasing in both fields; start at the last entry before the target.
        let i = self.time_index.partition_point(|e| e.timestamp < timestamp);
        let start_offset = if i == 0 {
            self.base_offset
        } else {
            self.time_index[i - 1].offset
        };
        let mut position = self.position_for(start_offset);
        let mut header = [0u8; HEADER_LEN];
        while position < limit {
            self.file
                .read_exact_at(&mut header, position)
                .map_err(|e| LogError::io(&self.path, e))?;
            let h = BatchHeader::parse(&header).map_err(|e| self.corrupt(position, e))?;
            if h.max_timestamp >= timestamp {
                return Ok(Some(h.base_offset));
            }
            position += h.total_len() as u64;
        }
        Ok(None)
    }

    pub(crate) fn corrupt(&self, position: u64, e: BatchError) -> LogError {
        LogError::Corrupt {
            path: self.path.clone(),
            position,
            error: e,
        }
    }

    /// Writes the indexes next to the log (on roll and on close).
    pub(crate) fn write_indexes(&self) -> Result<(), LogError> {
        let mut idx = Vec::with_capacity(self.index.len() * 8);
        for e in &self.index {
            idx.extend_from_slice(&((e.offset - self.base_offset) as u32).to_be_bytes());
            idx.extend_from_slice(&(e.position as u32).to_be_bytes());
        }
        let mut time = Vec::with_capacity(self.time_index.len() * 12);
        for e in &self.time_index {
            time.extend_from_slice(&e.timestamp.to_be_bytes());
            time.extend_from_slice(&((e.offset - self.base_offset) as u32).to_be_bytes());
        }
        // The end of the segment goes last in the offset index file, so that a reader can
        // tell a complete index from one cut short.
        idx.extend_from_slice(&((self.next_offset - self.base_offset) as u32).to_be_bytes());
        idx.extend_from_slice(&(self.len as u32).to_be_bytes());
        for (ext, bytes) in [("index", idx), ("timeindex", time)] {
            let path = self.path.with_extension(ext);
            let tmp = self.path.with_extension(format!("{ext}.tmp"));
            let write = || -> std::io::Result<()> {
                let mut f = File::create(&tmp)?;
                f.write_all(&bytes)?;
                f.sync_data()?;
                std::fs::rename(&tmp, &path)
            };
            write().map_err(|e| LogError::io(&path, e))?;
        }
        Ok(())
    }

    /// Loads the indexes written at roll; false if they are missing or do not match the log
    /// file (then the caller rebuilds them by a scan).
    fn load_indexes(&mut self, file_len: u64) -> Result<bool, LogError> {
        let (Ok(idx), Ok(time)) = (
            std::fs::read(self.path.with_extension("index")),
            std::fs::read(self.path.with_extension("timeindex")),
        ) else {
            return Ok(false);
        };
        if idx.len() < 8 || idx.len() % 8 != 0 || time.len() % 12 != 0 {
            return Ok(false);
        }
        let u32_at =
            |b: &[u8], at: usize| u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"));
        let (entries, end) = idx.split_at(idx.len() - 8);
        let (end_offset, end_position) = (u32_at(end, 0), u32_at(end, 4));
        if u64::from(end_position) != file_len {
            return Ok(false);
        }
        self.len = file_len;
        self.next_offset = self.base_offset + i64::from(end_offset);
        self.index = entries
            .chunks_exact(8)
            .map(|c| IndexEntry {
                offset: self.base_offset + i64::from(u32_at(c, 0)),
                position: u64::from(u32_at(c, 4)),
            })
            .collect();
        self.time_index = time
            .chunks_exact(12)
            .map(|c| TimeEntry {
                timestamp: i64::from_be_bytes(c[..8].try_into().expect("8 bytes")),
                offset: self.base_offset + i64::from(u32_at(c, 8)),
            })
            .collect();
        self.max_timestamp = self.time_index.last().map_or(-1, |t| t.timestamp);
        Ok(true)
    }

    /// Reads the file batch by batch from the start, rebuilding the indexes. With `check`,
    /// each batch's CRC is verified and the file is cut after the last good batch when what
    /// follows is a torn write.
    fn scan(&mut self, file_len: u64, check: bool) -> Result<Vec<Damage>, LogError> {
        let mut damage = Vec::new();
        let file = self.file.clone();
        let mut reader = BufReader::with_capacity(1 << 20, &*file);
        reader
            .seek(SeekFrom::Start(0))
            .map_err(|e| LogError::io(&self.path, e))?;
        let mut position = 0u64;
        let mut buf = Vec::new();
        loop {
            if position == file_len {
                break;
            }
            let read = read_batch(&mut reader, &mut buf, file_len - position);
            let bad = match read {
                Ok(()) => {
                    let checked = if check {
                        batch::verify_crc(&buf)
                    } else {
                        BatchHeader::parse(&buf)
                    };
                    match checked {
                        Ok(h) if h.base_offset >= self.next_offset || self.index.is_empty() => {
                            self.note_batch(&h, position);
                            position += buf.len() as u64;
                            continue;
                        }
                        Ok(h) => format!(
                            "batch at offset {} after offset {}",
                            h.base_offset,
                            self.next_offset - 1
                        ),
                        Err(e) => e.to_string(),
                    }
                }
                Err(e) => e,
            };
            if !check {
                return Err(LogError::Corrupt {
                    path: self.path.clone(),
                    position,
                    error: BatchError::BadRecord {
                        index: -1,
                        what: "unreadable batch in a closed segment",
                    },
                });
            }
            // A good batch further on means the damage is in the middle: keep everything.
            match self.find_next_good(position, file_len)? {
                Some(next) => {
                    error!(path = %self.path.display(), position, error = %bad, "corrupt batch in the middle of a segment; reads of it will fail");
                    damage.push(Damage::Corrupt {
                        position,
                        error: bad,
                    });
                    reader
                        .seek(SeekFrom::Start(next))
                        .map_err(|e| LogError::io(&self.path, e))?;
                    position = next;
                }
                None => {
                    warn!(path = %self.path.display(), at = position, bytes = file_len - position, error = %bad, "torn tail cut off");
                    self.file
                        .set_len(position)
                        .map_err(|e| LogError::io(&self.path, e))?;
                    self.file
                        .sync_all()
                        .map_err(|e| LogError::io(&self.path, e))?;
                    damage.push(Damage::TornTail {
                        at: position,
                        bytes: file_len - position,
                    });
                    break;
                }
            }
        }
        self.len = position;
        Ok(damage)
    }

    /// After a bad batch at `from`: the position of the next batch with a valid CRC whose
    /// base offset follows the segment's last good offset, if the file holds one.
    fn find_next_good(&self, from: u64, file_len: u64) -> Result<Option<u64>, LogError> {
        let mut rest = vec![0u8; (file_len - from) as usize];
        self.file
            .read_exact_at(&mut rest, from)
            .map_err(|e| LogError::io(&self.path, e))?;
        let expected = self.next_offset;
        let mut at = 1;
        while at + HEADER_LEN <= rest.len() {
            let base = i64::from_be_bytes(rest[at..at + 8].try_into().expect("8 bytes"));
            if base >= expected && base < expected + (1 << 31) {
                if let Ok(h) = batch::verify_crc(&rest[at..]) {
                    if h.total_len() <= MAX_BATCH_BYTES {
                        return Ok(Some(from + at as u64));
                    }
                }
            }
            at += 1;
        }
        Ok(None)
    }
}

/// Reads one whole batch into `buf`; an error message if the bytes cannot be one.
fn read_batch(reader: &mut impl Read, buf: &mut Vec<u8>, remaining: u64) -> Result<(), String> {
    if remaining < HEADER_LEN as u64 {
        return Err(format!("{remaining} bytes left, less than a batch header"));
    }
    buf.resize(HEADER_LEN, 0);
    reader.read_exact(buf).map_err(|e| e.to_string())?;
    let length = i32::from_be_bytes(buf[8..12].try_into().expect("4 bytes"));
    let total = LOG_OVERHEAD as i64 + i64::from(length);
    if total < HEADER_LEN as i64 || total > MAX_BATCH_BYTES as i64 {
        return Err(format!("batch length {length} is impossible"));
    }
    if total as u64 > remaining {
        return Err(format!(
            "batch of {total} bytes with {remaining} left in the file"
        ));
    }
    buf.resize(total as usize, 0);
    reader
        .read_exact(&mut buf[HEADER_LEN..])
        .map_err(|e| e.to_string())
}
