//! The object format of the object-storage backend (`docs/object-log.md`, "The object
//! format"): a 32-byte header, an index with one entry per run, then the runs, each the
//! Kafka v2 record batches of one partition with base offsets relative to the run.
//!
//! The base offset is the one field of a batch its CRC does not cover: a run is written
//! before the commit assigns its offsets, so its batches count from 0 and whoever serves
//! them adds the run's first offset ([`serve_run`]).

use bytes::{BufMut, Bytes, BytesMut};
use ferry_protocol::kafka::batch::{self, BatchHeader};

/// The first 8 bytes of every object.
pub(crate) const MAGIC: &[u8; 8] = b"FERRYOB1";
/// The format version this code writes and reads.
pub(crate) const VERSION: u16 = 1;
/// Bytes of the fixed header.
pub(crate) const HEADER_LEN: usize = 36;
/// Bytes of an index entry after its stream name.
const ENTRY_FIXED: usize = 52;
/// An index larger than this is refused (a corrupt count), far more than a flush's runs.
const MAX_INDEX_BYTES: u32 = 16 << 20;

/// Why an object or a run cannot be read (or a run cannot be written).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[cfg_attr(not(test), allow(dead_code))]
pub(crate) enum FormatError {
    #[error("not a Ferry object (magic {0:02x?})")]
    Magic(Vec<u8>),
    #[error("object format version {0} (this node reads {VERSION})")]
    Version(u16),
    #[error("object cut short: {need} bytes needed, {have} there")]
    Short { need: usize, have: usize },
    #[error("object header CRC mismatch")]
    HeaderCrc,
    #[error("object index CRC mismatch")]
    IndexCrc,
    #[error("object index: {0}")]
    Index(String),
    #[error("batch {at} of a run: {error}")]
    Batch { at: usize, error: String },
    #[error("batch {at} of a run has base offset {found}, {expected} expected")]
    Sequence {
        at: usize,
        found: i64,
        expected: i64,
    },
    #[error("run CRC mismatch: {stored:08x} stored, {computed:08x} computed")]
    RunCrc { stored: u32, computed: u32 },
}

/// One run in an object's index: where one partition's batches are and what they hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Run {
    pub(crate) stream: String,
    pub(crate) partition: u32,
    /// Where its batches start, from the start of the object, and their length.
    pub(crate) data_offset: u64,
    pub(crate) data_len: u64,
    pub(crate) records: u64,
    pub(crate) batches: u32,
    pub(crate) first_timestamp: i64,
    pub(crate) max_timestamp: i64,
    /// CRC-32C of the run's bytes as stored (relative offsets): covers what the batches'
    /// own CRCs leave out (base offset, length, leader epoch).
    pub(crate) crc: u32,
}

/// What a run's batches add up to, found by [`relativize`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RunStats {
    pub(crate) records: u64,
    pub(crate) batches: u32,
    pub(crate) first_timestamp: i64,
    pub(crate) max_timestamp: i64,
}

/// Walks the batches of `run`, checking each one's CRC, and numbers them from 0: each
/// batch's base offset becomes the count of records before it. Takes the `Encoder`'s output
/// (every base offset 0) or runs to concatenate (compaction: their own relative offsets).
pub(crate) fn relativize(run: &mut [u8]) -> Result<RunStats, FormatError> {
    let mut stats = RunStats {
        records: 0,
        batches: 0,
        first_timestamp: i64::MAX,
        max_timestamp: i64::MIN,
    };
    let mut at = 0;
    while at < run.len() {
        let h = checked(&run[at..], stats.batches as usize)?;
        batch::set_base_offset(&mut run[at..], stats.records as i64);
        stats.records += u64::from(h.last_offset_delta as u32) + 1;
        stats.batches += 1;
        stats.first_timestamp = stats.first_timestamp.min(h.base_timestamp);
        stats.max_timestamp = stats.max_timestamp.max(h.max_timestamp);
        at += h.total_len();
    }
    if stats.batches == 0 {
        return Err(FormatError::Batch {
            at: 0,
            error: "an empty run".into(),
        });
    }
    Ok(stats)
}

/// Builds an object of `runs` (stream, partition, batches numbered by [`relativize`]),
/// created at `created_ms`: its bytes and its index.
pub(crate) fn encode(
    runs: Vec<(String, u32, Bytes, RunStats)>,
    created_ms: i64,
) -> Result<(Bytes, Vec<Run>), FormatError> {
    let mut index = BytesMut::new();
    let entries_len: usize = runs.iter().map(|(s, ..)| 2 + s.len() + ENTRY_FIXED).sum();
    let mut data_offset = (HEADER_LEN + entries_len) as u64;
    let mut out_runs = Vec::with_capacity(runs.len());
    for (stream, partition, bytes, stats) in &runs {
        let name_len = u16::try_from(stream.len())
            .map_err(|_| FormatError::Index(format!("stream name of {} bytes", stream.len())))?;
        index.put_u16(name_len);
        index.put_slice(stream.as_bytes());
        index.put_u32(*partition);
        index.put_u64(data_offset);
        index.put_u64(bytes.len() as u64);
        index.put_u64(stats.records);
        index.put_u32(stats.batches);
        index.put_i64(stats.first_timestamp);
        index.put_i64(stats.max_timestamp);
        let crc = crc32c::crc32c(bytes);
        index.put_u32(crc);
        out_runs.push(Run {
            stream: stream.clone(),
            partition: *partition,
            data_offset,
            data_len: bytes.len() as u64,
            records: stats.records,
            batches: stats.batches,
            first_timestamp: stats.first_timestamp,
            max_timestamp: stats.max_timestamp,
            crc,
        });
        data_offset += bytes.len() as u64;
    }
    let index_len = u32::try_from(index.len())
        .ok()
        .filter(|n| *n <= MAX_INDEX_BYTES)
        .ok_or_else(|| FormatError::Index(format!("{} bytes of index", index.len())))?;
    let mut out = BytesMut::with_capacity(data_offset as usize);
    out.put_slice(MAGIC);
    out.put_u16(VERSION);
    out.put_u16(0);
    out.put_u32(runs.len() as u32);
    out.put_u32(index_len);
    out.put_i64(created_ms);
    out.put_u32(crc32c::crc32c(&index));
    let header_crc = crc32c::crc32c(&out);
    out.put_u32(header_crc);
    out.put_slice(&index);
    for (_, _, bytes, _) in &runs {
        out.put_slice(bytes);
    }
    Ok((out.freeze(), out_runs))
}

/// The header's fields a reader needs: how many runs and how many bytes of index follow.
/// (The object's own index is for readers without the database: the tests now, the
/// collector and tools later; a node serves runs from their database rows.)
#[cfg_attr(not(test), allow(dead_code))]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Header {
    pub(crate) runs: u32,
    pub(crate) index_len: u32,
    pub(crate) created_ms: i64,
    index_crc: u32,
}

/// Reads the header at the start of `bytes` (at least [`HEADER_LEN`] of them).
#[cfg_attr(not(test), allow(dead_code))]
pub(crate) fn decode_header(bytes: &[u8]) -> Result<Header, FormatError> {
    let head = bytes.get(..HEADER_LEN).ok_or(FormatError::Short {
        need: HEADER_LEN,
        have: bytes.len(),
    })?;
    if &head[..8] != MAGIC {
        return Err(FormatError::Magic(head[..8].to_vec()));
    }
    let u32_at = |at: usize| u32::from_be_bytes(head[at..at + 4].try_into().expect("4 bytes"));
    if crc32c::crc32c(&head[..32]) != u32_at(32) {
        return Err(FormatError::HeaderCrc);
    }
    let version = u16::from_be_bytes([head[8], head[9]]);
    if version != VERSION {
        return Err(FormatError::Version(version));
    }
    let index_len = u32_at(16);
    if index_len > MAX_INDEX_BYTES {
        return Err(FormatError::Index(format!("{index_len} bytes of index")));
    }
    Ok(Header {
        runs: u32_at(12),
        index_len,
        created_ms: i64::from_be_bytes(head[20..28].try_into().expect("8 bytes")),
        index_crc: u32_at(28),
    })
}

/// Reads the index of an object from its first `HEADER_LEN + index_len` bytes (or more).
#[cfg_attr(not(test), allow(dead_code))]
pub(crate) fn decode_index(bytes: &[u8]) -> Result<Vec<Run>, FormatError> {
    let header = decode_header(bytes)?;
    let end = HEADER_LEN + header.index_len as usize;
    let mut index = bytes.get(HEADER_LEN..end).ok_or(FormatError::Short {
        need: end,
        have: bytes.len(),
    })?;
    if crc32c::crc32c(index) != header.index_crc {
        return Err(FormatError::IndexCrc);
    }
    let mut runs = Vec::new();
    let mut expected_offset = end as u64;
    for i in 0..header.runs {
        let bad = |what: &str| FormatError::Index(format!("entry {i}: {what}"));
        let take = |index: &mut &[u8], n: usize| -> Result<Vec<u8>, FormatError> {
            let (a, b) = index
                .split_at_checked(n)
                .ok_or_else(|| FormatError::Index(format!("entry {i} cut short")))?;
            *index = b;
            Ok(a.to_vec())
        };
        let name_len = u16::from_be_bytes(take(&mut index, 2)?.try_into().expect("2 bytes"));
        let stream = String::from_utf8(take(&mut index, name_len as usize)?)
            .map_err(|_| bad("a stream name that is not UTF-8"))?;
        let fixed = take(&mut index, ENTRY_FIXED)?;
        let u32_at = |at: usize| u32::from_be_bytes(fixed[at..at + 4].try_into().expect("4"));
        let u64_at = |at: usize| u64::from_be_bytes(fixed[at..at + 8].try_into().expect("8"));
        let run = Run {
            stream,
            partition: u32_at(0),
            data_offset: u64_at(4),
            data_len: u64_at(12),
            records: u64_at(20),
            batches: u32_at(28),
            first_timestamp: u64_at(32) as i64,
            max_timestamp: u64_at(40) as i64,
            crc: u32_at(48),
        };
        if run.data_offset != expected_offset {
            return Err(bad("runs out of place"));
        }
        expected_offset += run.data_len;
        runs.push(run);
    }
    if !index.is_empty() {
        return Err(FormatError::Index("bytes after the last entry".into()));
    }
    Ok(runs)
}

/// The batches of one run (its bytes as stored, whose CRC-32C is `crc`) with their offsets
/// made absolute: each batch's base offset plus `first_offset`. The run and every batch
/// in it are checked (CRCs, lengths, offsets following on from 0), so what is served is
/// what was committed.
pub(crate) fn serve_run(run: &[u8], crc: u32, first_offset: i64) -> Result<BytesMut, FormatError> {
    let computed = crc32c::crc32c(run);
    if computed != crc {
        return Err(FormatError::RunCrc {
            stored: crc,
            computed,
        });
    }
    let mut out = BytesMut::from(run);
    let mut at = 0;
    let mut expected = 0i64;
    let mut n = 0;
    while at < out.len() {
        let h = checked(&out[at..], n)?;
        if h.base_offset != expected {
            return Err(FormatError::Sequence {
                at: n,
                found: h.base_offset,
                expected,
            });
        }
        batch::set_base_offset(&mut out[at..], first_offset + expected);
        expected += i64::from(h.last_offset_delta) + 1;
        at += h.total_len();
        n += 1;
    }
    Ok(out)
}

/// The header of the batch at the start of `bytes`, its CRC checked.
fn checked(bytes: &[u8], at: usize) -> Result<BatchHeader, FormatError> {
    let h = batch::verify_crc(bytes).map_err(|e| FormatError::Batch {
        at,
        error: e.to_string(),
    })?;
    if h.last_offset_delta < 0 {
        return Err(FormatError::Batch {
            at,
            error: format!("last offset delta {}", h.last_offset_delta),
        });
    }
    Ok(h)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_protocol::kafka::batch::BatchBuilder;
    use proptest::prelude::*;

    /// A batch of `n` records (base offset 0, as the Encoder makes them) at `ts`.
    fn batch(n: usize, ts: i64) -> Bytes {
        let mut b = BatchBuilder::new(ts);
        for i in 0..n {
            b.push(ts + i as i64, None, Some(format!("v{i}").as_bytes()), &[]);
        }
        b.finish(0)
    }

    fn run(sizes: &[usize], ts: i64) -> (BytesMut, RunStats) {
        let mut bytes = BytesMut::new();
        for (i, n) in sizes.iter().enumerate() {
            bytes.extend_from_slice(&batch(*n, ts + 1000 * i as i64));
        }
        let stats = relativize(&mut bytes).expect("a good run");
        (bytes, stats)
    }

    #[test]
    fn a_run_counts_from_zero_and_is_served_at_its_committed_offsets() {
        let (bytes, stats) = run(&[3, 1, 5], 1_000);
        assert_eq!(stats.records, 9);
        assert_eq!(stats.batches, 3);
        assert_eq!(stats.first_timestamp, 1_000);
        assert_eq!(stats.max_timestamp, 3_004);
        let served = serve_run(&bytes, crc32c::crc32c(&bytes), 100).expect("serve");
        let bases: Vec<(i64, i64)> = crate::log::ReadResult {
            batches: served.freeze(),
            high_watermark: 109,
        }
        .iter()
        .map(|b| {
            let (h, whole) = b.expect("a batch");
            batch::verify_crc(whole).expect("the CRC still holds");
            (h.base_offset, h.last_offset())
        })
        .collect();
        assert_eq!(bases, vec![(100, 102), (103, 103), (104, 108)]);
    }

    #[test]
    fn an_object_holds_each_partitions_run_where_its_index_says() {
        let (a, sa) = run(&[2, 2], 10);
        let (b, sb) = run(&[7], 20);
        let (object, index) = encode(
            vec![
                ("mqtt".into(), 0, a.clone().freeze(), sa),
                ("sensors".into(), 3, b.clone().freeze(), sb),
            ],
            1_700_000_000_000,
        )
        .expect("encode");
        let header = decode_header(&object).expect("header");
        assert_eq!((header.runs, header.created_ms), (2, 1_700_000_000_000));
        // A reader that knows nothing needs only the header and the index.
        let head = &object[..HEADER_LEN + header.index_len as usize];
        let read = decode_index(head).expect("index");
        assert_eq!(read, index);
        assert_eq!(read[1].stream, "sensors");
        assert_eq!((read[1].partition, read[1].records), (3, 7));
        for (r, bytes) in read.iter().zip([&a, &b]) {
            let start = r.data_offset as usize;
            assert_eq!(&object[start..start + r.data_len as usize], &bytes[..]);
        }
        assert_eq!(
            read[1].data_offset + read[1].data_len,
            object.len() as u64,
            "the last run ends the object"
        );
    }

    #[test]
    fn damage_anywhere_in_header_index_or_batches_is_found() {
        let (a, sa) = run(&[2, 3], 10);
        let (object, index) = encode(vec![("s".into(), 0, a.freeze(), sa)], 5).expect("encode");
        let index_end = HEADER_LEN + decode_header(&object).expect("h").index_len as usize;
        for at in 0..object.len() {
            let mut bad = object.to_vec();
            bad[at] ^= 0x40;
            let found = if at < index_end {
                decode_index(&bad).is_err()
            } else {
                let r = &index[0];
                let start = r.data_offset as usize;
                serve_run(&bad[start..start + r.data_len as usize], r.crc, 0).is_err()
            };
            assert!(found, "a flipped bit at byte {at} went unnoticed");
        }
    }

    #[test]
    fn a_cut_object_or_an_unknown_version_is_refused() {
        let (a, sa) = run(&[1], 10);
        let (object, _) = encode(vec![("s".into(), 0, a.freeze(), sa)], 5).expect("encode");
        assert!(matches!(
            decode_index(&object[..HEADER_LEN + 3]),
            Err(FormatError::Short { .. })
        ));
        assert!(matches!(
            decode_header(b"PAR1xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"),
            Err(FormatError::Magic(_))
        ));
        let mut v2 = object.to_vec();
        v2[9] = 2;
        let crc = crc32c::crc32c(&v2[..32]);
        v2[32..36].copy_from_slice(&crc.to_be_bytes());
        assert_eq!(decode_header(&v2), Err(FormatError::Version(2)));
        assert!(relativize(&mut []).is_err(), "an empty run");
    }

    proptest! {
        #[test]
        fn runs_rebased_and_concatenated_keep_every_batch_byte_for_byte(
            sizes in proptest::collection::vec(proptest::collection::vec(1usize..20, 1..6), 1..5),
            first in 0i64..1_000_000,
        ) {
            // Compaction: runs written by several flushes, each relative to itself, become
            // one run; served at the first run's offset, every record keeps its offset.
            let runs: Vec<(BytesMut, RunStats)> =
                sizes.iter().map(|s| run(s, 7)).collect();
            let mut served_apart = BytesMut::new();
            let mut at = first;
            for (bytes, stats) in &runs {
                served_apart.extend_from_slice(
                    &serve_run(bytes, crc32c::crc32c(bytes), at).expect("serve"),
                );
                at += stats.records as i64;
            }
            let mut joined = BytesMut::new();
            for (bytes, _) in &runs {
                joined.extend_from_slice(bytes);
            }
            let stats = relativize(&mut joined).expect("relativize");
            prop_assert_eq!(stats.records as i64, at - first);
            let served_joined =
                serve_run(&joined, crc32c::crc32c(&joined), first).expect("serve");
            prop_assert_eq!(&served_joined[..], &served_apart[..]);
        }
    }
}
