//! The Kafka v2 record batch ("magic 2"), as Kafka writes it on disk and on the wire.
//!
//! ```text
//! offset  size  field
//!  0      8     base offset            ─┐ outside the CRC: the log assigns the offset
//!  8      4     batch length (bytes after this field)
//! 12      4     partition leader epoch ─┘
//! 16      1     magic = 2
//! 17      4     CRC-32C of bytes 21..end
//! 21      2     attributes (bits 0-2 compression, 3 timestamp type, 4 transactional, 5 control)
//! 23      4     last offset delta
//! 27      8     base timestamp (ms)
//! 35      8     max timestamp (ms)
//! 43      8     producer id (-1: none)
//! 51      2     producer epoch
//! 53      4     base sequence
//! 57      4     record count
//! 61      …     records
//! ```
//!
//! A record: length (zig-zag varint), attributes (1 byte, 0), timestamp delta (varlong),
//! offset delta (varint), key length + key, value length + value (length -1: null), header
//! count, then each header's key length + key and value length + value.

use bytes::{BufMut, Bytes, BytesMut};

/// Bytes before the records.
pub const HEADER_LEN: usize = 61;
/// Bytes before the batch length ends (base offset + batch length): the rest of the batch is
/// `batch_length` bytes.
pub const LOG_OVERHEAD: usize = 12;
/// The only magic this module reads or writes.
pub const MAGIC: u8 = 2;
/// Where the CRC'd part starts (the attributes).
const CRC_START: usize = 21;

/// A batch that cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BatchError {
    #[error("batch truncated: {need} bytes needed, {have} present")]
    Truncated { need: usize, have: usize },
    #[error("batch length {0} is impossible")]
    BadLength(i32),
    #[error("unsupported record batch magic {0} (only 2)")]
    BadMagic(u8),
    #[error("batch CRC mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    CrcMismatch { stored: u32, computed: u32 },
    #[error("compressed batch (codec {0}) cannot be read record by record here")]
    Compressed(u8),
    #[error("malformed record {index}: {what}")]
    BadRecord { index: i32, what: &'static str },
    #[error("compression codec {0} is not supported (none, lz4 and zstd are)")]
    UnsupportedCompression(u8),
    #[error("cannot decompress a codec {codec} batch: {what}")]
    Decompress { codec: u8, what: String },
    #[error("batch decompresses to more than {max} bytes")]
    DecompressedTooLarge { max: usize },
}

/// How a batch's records are compressed (the low bits of its attributes), as Kafka does it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum Compression {
    #[default]
    None,
    /// LZ4 frame format.
    Lz4,
    /// Zstandard frame format (written at zstd's fastest level).
    Zstd,
}

impl Compression {
    /// The codec number in the attributes.
    pub fn codec(self) -> u8 {
        match self {
            Compression::None => 0,
            Compression::Lz4 => 3,
            Compression::Zstd => 4,
        }
    }
}

/// The batch at the start of `batch` with its records uncompressed: borrowed as it is when
/// it is not compressed; otherwise a new batch (codec bits cleared, CRC recomputed) whose
/// records take at most `max_bytes`. Gzip and snappy batches are refused.
pub fn uncompressed(
    batch: &[u8],
    max_bytes: usize,
) -> Result<std::borrow::Cow<'_, [u8]>, BatchError> {
    use std::io::Read;
    let h = BatchHeader::parse(batch)?;
    let end = h.total_len();
    if batch.len() < end {
        return Err(BatchError::Truncated {
            need: end,
            have: batch.len(),
        });
    }
    let codec = h.compression();
    let body = &batch[HEADER_LEN..end];
    let fail = |what: String| BatchError::Decompress { codec, what };
    let mut records = Vec::new();
    let limit = max_bytes as u64 + 1;
    match codec {
        0 => return Ok(std::borrow::Cow::Borrowed(&batch[..end])),
        3 => {
            lz4_flex::frame::FrameDecoder::new(body)
                .take(limit)
                .read_to_end(&mut records)
                .map_err(|e| fail(e.to_string()))?;
        }
        4 => {
            let decoder =
                ruzstd::decoding::StreamingDecoder::new(body).map_err(|e| fail(e.to_string()))?;
            decoder
                .take(limit)
                .read_to_end(&mut records)
                .map_err(|e| fail(e.to_string()))?;
        }
        other => return Err(BatchError::UnsupportedCompression(other)),
    }
    if records.len() > max_bytes {
        return Err(BatchError::DecompressedTooLarge { max: max_bytes });
    }
    let mut out = Vec::with_capacity(HEADER_LEN + records.len());
    out.extend_from_slice(&batch[..HEADER_LEN]);
    out.extend_from_slice(&records);
    let attributes = h.attributes & !0x07;
    out[21..23].copy_from_slice(&attributes.to_be_bytes());
    seal(&mut out);
    Ok(std::borrow::Cow::Owned(out))
}

/// Sets the batch length and the CRC of a batch whose other fields are final.
fn seal(batch: &mut [u8]) {
    let batch_length = (batch.len() - LOG_OVERHEAD) as i32;
    batch[8..12].copy_from_slice(&batch_length.to_be_bytes());
    let crc = crc32c::crc32c(&batch[CRC_START..]);
    batch[17..21].copy_from_slice(&crc.to_be_bytes());
}

/// The fixed part of a batch, parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchHeader {
    pub base_offset: i64,
    /// Bytes after the length field; the whole batch is `LOG_OVERHEAD + batch_length`.
    pub batch_length: i32,
    pub partition_leader_epoch: i32,
    pub magic: u8,
    pub crc: u32,
    pub attributes: i16,
    pub last_offset_delta: i32,
    pub base_timestamp: i64,
    pub max_timestamp: i64,
    pub producer_id: i64,
    pub producer_epoch: i16,
    pub base_sequence: i32,
    pub records_count: i32,
}

impl BatchHeader {
    /// Parses the header at the start of `buf`; checks the magic and that the length is
    /// possible, not the CRC (see [`verify_crc`]).
    pub fn parse(buf: &[u8]) -> Result<Self, BatchError> {
        if buf.len() < HEADER_LEN {
            return Err(BatchError::Truncated {
                need: HEADER_LEN,
                have: buf.len(),
            });
        }
        let i16_at = |at: usize| i16::from_be_bytes([buf[at], buf[at + 1]]);
        let i32_at = |at: usize| i32::from_be_bytes(buf[at..at + 4].try_into().expect("4 bytes"));
        let i64_at = |at: usize| i64::from_be_bytes(buf[at..at + 8].try_into().expect("8 bytes"));
        let batch_length = i32_at(8);
        if batch_length < (HEADER_LEN - LOG_OVERHEAD) as i32 {
            return Err(BatchError::BadLength(batch_length));
        }
        let magic = buf[16];
        if magic != MAGIC {
            return Err(BatchError::BadMagic(magic));
        }
        Ok(Self {
            base_offset: i64_at(0),
            batch_length,
            partition_leader_epoch: i32_at(12),
            magic,
            crc: u32::from_be_bytes(buf[17..21].try_into().expect("4 bytes")),
            attributes: i16_at(21),
            last_offset_delta: i32_at(23),
            base_timestamp: i64_at(27),
            max_timestamp: i64_at(35),
            producer_id: i64_at(43),
            producer_epoch: i16_at(51),
            base_sequence: i32_at(53),
            records_count: i32_at(57),
        })
    }

    /// The whole batch's size in bytes.
    pub fn total_len(&self) -> usize {
        LOG_OVERHEAD + self.batch_length as usize
    }

    /// The offset of the batch's last record.
    pub fn last_offset(&self) -> i64 {
        self.base_offset + i64::from(self.last_offset_delta)
    }

    /// The compression codec (0 none, 1 gzip, 2 snappy, 3 lz4, 4 zstd).
    pub fn compression(&self) -> u8 {
        (self.attributes & 0x07) as u8
    }

    /// A control batch (transaction markers), which carries no user records.
    pub fn is_control(&self) -> bool {
        self.attributes & 0x20 != 0
    }
}

/// Checks the CRC-32C of the whole batch at the start of `batch` (its exact bytes).
pub fn verify_crc(batch: &[u8]) -> Result<BatchHeader, BatchError> {
    let header = BatchHeader::parse(batch)?;
    let len = header.total_len();
    if batch.len() < len {
        return Err(BatchError::Truncated {
            need: len,
            have: batch.len(),
        });
    }
    let computed = crc32c::crc32c(&batch[CRC_START..len]);
    if computed != header.crc {
        return Err(BatchError::CrcMismatch {
            stored: header.crc,
            computed,
        });
    }
    Ok(header)
}

/// Sets the base offset of the batch at the start of `batch`; the CRC does not cover it.
pub fn set_base_offset(batch: &mut [u8], base_offset: i64) {
    batch[..8].copy_from_slice(&base_offset.to_be_bytes());
}

/// One header of a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header<'a> {
    pub key: &'a str,
    pub value: Option<&'a [u8]>,
}

/// Builds one uncompressed batch, record by record, straight into its final bytes.
///
/// ```
/// # use ferry_protocol::kafka::batch::{BatchBuilder, verify_crc};
/// let mut b = BatchBuilder::new(1_700_000_000_000);
/// b.push(1_700_000_000_005, Some(b"sensors/t1"), Some(b"21.5"), &[]);
/// let batch = b.finish(42);
/// assert_eq!(verify_crc(&batch).unwrap().last_offset(), 42);
/// ```
#[derive(Debug)]
pub struct BatchBuilder {
    buf: BytesMut,
    count: i32,
    /// The offset delta of the last record pushed (-1: none).
    last_delta: i32,
    base_timestamp: i64,
    max_timestamp: i64,
    producer_id: i64,
    producer_epoch: i16,
    base_sequence: i32,
}

impl BatchBuilder {
    /// A batch whose records' timestamps are stored relative to `base_timestamp` (ms since
    /// the Unix epoch), with no producer id.
    pub fn new(base_timestamp: i64) -> Self {
        Self::with_capacity(base_timestamp, 256)
    }

    /// As [`BatchBuilder::new`], with room for `bytes` of records reserved.
    pub fn with_capacity(base_timestamp: i64, bytes: usize) -> Self {
        let mut buf = BytesMut::with_capacity(HEADER_LEN + bytes);
        buf.resize(HEADER_LEN, 0);
        Self {
            buf,
            count: 0,
            last_delta: -1,
            base_timestamp,
            max_timestamp: base_timestamp,
            producer_id: -1,
            producer_epoch: -1,
            base_sequence: -1,
        }
    }

    /// Marks the batch as written by producer `id` (idempotent producers; Ferry gives each
    /// edge one), its first record carrying sequence `base_sequence`.
    pub fn producer(mut self, id: i64, epoch: i16, base_sequence: i32) -> Self {
        self.producer_id = id;
        self.producer_epoch = epoch;
        self.base_sequence = base_sequence;
        self
    }

    /// Records pushed so far.
    pub fn len(&self) -> usize {
        self.count as usize
    }

    /// True if no record was pushed.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The batch's size if it were finished now.
    pub fn size(&self) -> usize {
        self.buf.len()
    }

    /// Appends a record. Its offset is one past the previous record's (the batch's base
    /// offset for the first).
    pub fn push(
        &mut self,
        timestamp: i64,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
        headers: &[Header<'_>],
    ) {
        self.push_at(self.last_delta + 1, timestamp, key, value, headers);
    }

    /// Appends a record at offset delta `offset_delta`, which must be above the previous
    /// record's: offsets may have gaps, as in a compacted Kafka topic (the link uses them
    /// for sequence numbers).
    ///
    /// # Panics
    /// If `offset_delta` is not above the previous record's.
    pub fn push_at(
        &mut self,
        offset_delta: i32,
        timestamp: i64,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
        headers: &[Header<'_>],
    ) {
        assert!(
            offset_delta > self.last_delta,
            "offset deltas must increase"
        );
        self.last_delta = offset_delta;
        let ts_delta = timestamp - self.base_timestamp;
        let offset_delta = i64::from(offset_delta);
        let bytes_len =
            |b: Option<&[u8]>| b.map_or(varint_len(-1), |b| varint_len(b.len() as i64) + b.len());
        let mut body = 1 + varint_len(ts_delta) + varint_len(offset_delta);
        body += bytes_len(key) + bytes_len(value);
        body += varint_len(headers.len() as i64);
        for h in headers {
            body += varint_len(h.key.len() as i64) + h.key.len() + bytes_len(h.value);
        }
        self.buf.reserve(body + 5);
        put_varint(&mut self.buf, body as i64);
        self.buf.put_u8(0);
        put_varint(&mut self.buf, ts_delta);
        put_varint(&mut self.buf, offset_delta);
        put_bytes(&mut self.buf, key);
        put_bytes(&mut self.buf, value);
        put_varint(&mut self.buf, headers.len() as i64);
        for h in headers {
            put_bytes(&mut self.buf, Some(h.key.as_bytes()));
            put_bytes(&mut self.buf, h.value);
        }
        self.count += 1;
        self.max_timestamp = self.max_timestamp.max(timestamp);
    }

    /// Fills in the header and the CRC, compressing the records with `compression`.
    pub fn finish_with(self, base_offset: i64, compression: Compression) -> Bytes {
        if compression == Compression::None {
            return self.finish(base_offset);
        }
        let plain = self.finish(base_offset);
        let records = &plain[HEADER_LEN..];
        let packed = match compression {
            Compression::Lz4 => {
                let mut enc = lz4_flex::frame::FrameEncoder::new(Vec::new());
                std::io::Write::write_all(&mut enc, records).expect("writing to memory");
                enc.finish().expect("writing to memory")
            }
            _ => ruzstd::encoding::compress_to_vec(
                records,
                ruzstd::encoding::CompressionLevel::Fastest,
            ),
        };
        let mut out = Vec::with_capacity(HEADER_LEN + packed.len());
        out.extend_from_slice(&plain[..HEADER_LEN]);
        out.extend_from_slice(&packed);
        let attributes = i16::from(compression.codec());
        out[21..23].copy_from_slice(&attributes.to_be_bytes());
        seal(&mut out);
        Bytes::from(out)
    }

    /// Fills in the header and the CRC. A batch of no records is valid but Kafka clients
    /// do not expect one; callers push at least one.
    pub fn finish(mut self, base_offset: i64) -> Bytes {
        let batch_length = (self.buf.len() - LOG_OVERHEAD) as i32;
        let mut h = &mut self.buf[..HEADER_LEN];
        h.put_i64(base_offset);
        h.put_i32(batch_length);
        h.put_i32(-1); // partition leader epoch: unknown
        h.put_u8(MAGIC);
        h.put_u32(0); // CRC, below
        h.put_i16(0); // attributes: no compression, create time, not transactional
        h.put_i32(self.last_delta.max(0));
        h.put_i64(self.base_timestamp);
        h.put_i64(self.max_timestamp);
        h.put_i64(self.producer_id);
        h.put_i16(self.producer_epoch);
        h.put_i32(self.base_sequence);
        h.put_i32(self.count);
        let crc = crc32c::crc32c(&self.buf[CRC_START..]);
        self.buf[17..21].copy_from_slice(&crc.to_be_bytes());
        self.buf.freeze()
    }
}

/// One record of a batch, borrowed from the batch's bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordRef<'a> {
    pub offset: i64,
    pub timestamp: i64,
    pub key: Option<&'a [u8]>,
    pub value: Option<&'a [u8]>,
    pub headers: Vec<Header<'a>>,
}

/// The records of one uncompressed batch, in order; see [`records`].
#[derive(Debug)]
pub struct Records<'a> {
    header: BatchHeader,
    rest: &'a [u8],
    index: i32,
}

/// Reads the records of the (CRC-checked) batch at the start of `batch`. Compressed batches
/// are refused with [`BatchError::Compressed`]: pass them through [`uncompressed`] first.
pub fn records(batch: &[u8]) -> Result<Records<'_>, BatchError> {
    let header = BatchHeader::parse(batch)?;
    if header.compression() != 0 {
        return Err(BatchError::Compressed(header.compression()));
    }
    let end = header.total_len();
    if batch.len() < end {
        return Err(BatchError::Truncated {
            need: end,
            have: batch.len(),
        });
    }
    Ok(Records {
        header,
        rest: &batch[HEADER_LEN..end],
        index: 0,
    })
}

impl<'a> Iterator for Records<'a> {
    type Item = Result<RecordRef<'a>, BatchError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.index >= self.header.records_count {
            return None;
        }
        let index = self.index;
        self.index += 1;
        let result = read_record(&mut self.rest, &self.header)
            .map_err(|what| BatchError::BadRecord { index, what });
        if result.is_err() {
            self.index = self.header.records_count;
        }
        Some(result)
    }
}

fn read_record<'a>(buf: &mut &'a [u8], h: &BatchHeader) -> Result<RecordRef<'a>, &'static str> {
    let len = get_varint(buf).ok_or("bad length")?;
    let len = usize::try_from(len).map_err(|_| "negative length")?;
    if buf.len() < len {
        return Err("length past the batch");
    }
    let (body, rest) = buf.split_at(len);
    *buf = rest;
    let mut body = body;
    let b = &mut body;
    let _attributes = take(b, 1).ok_or("no attributes")?;
    let ts_delta = get_varint(b).ok_or("bad timestamp delta")?;
    let offset_delta = get_varint(b).ok_or("bad offset delta")?;
    let key = get_bytes(b)?;
    let value = get_bytes(b)?;
    let n = get_varint(b).ok_or("bad header count")?;
    let n = usize::try_from(n).map_err(|_| "negative header count")?;
    let mut headers = Vec::with_capacity(n.min(b.len()));
    for _ in 0..n {
        let key = get_bytes(b)?.ok_or("null header key")?;
        let key = std::str::from_utf8(key).map_err(|_| "header key is not UTF-8")?;
        let value = get_bytes(b)?;
        headers.push(Header { key, value });
    }
    if !b.is_empty() {
        return Err("bytes left after the record");
    }
    Ok(RecordRef {
        offset: h.base_offset + offset_delta,
        timestamp: h.base_timestamp + ts_delta,
        key,
        value,
        headers,
    })
}

fn take<'a>(buf: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
    if buf.len() < n {
        return None;
    }
    let (head, rest) = buf.split_at(n);
    *buf = rest;
    Some(head)
}

fn get_bytes<'a>(buf: &mut &'a [u8]) -> Result<Option<&'a [u8]>, &'static str> {
    match get_varint(buf).ok_or("bad byte-string length")? {
        -1 => Ok(None),
        n if n < 0 => Err("negative byte-string length"),
        n => take(buf, n as usize)
            .map(Some)
            .ok_or("byte string past the record"),
    }
}

/// Zig-zag varint (Kafka's varint and varlong share the encoding; varlong is up to 10 bytes).
fn put_varint(buf: &mut BytesMut, v: i64) {
    let mut z = ((v << 1) ^ (v >> 63)) as u64;
    while z >= 0x80 {
        buf.put_u8((z as u8) | 0x80);
        z >>= 7;
    }
    buf.put_u8(z as u8);
}

fn varint_len(v: i64) -> usize {
    let z = ((v << 1) ^ (v >> 63)) as u64;
    (64 - (z | 1).leading_zeros() as usize).div_ceil(7)
}

fn get_varint(buf: &mut &[u8]) -> Option<i64> {
    let mut z: u64 = 0;
    for (i, &byte) in buf.iter().enumerate().take(10) {
        z |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            *buf = &buf[i + 1..];
            return Some((z >> 1) as i64 ^ -((z & 1) as i64));
        }
    }
    None
}

fn put_bytes(buf: &mut BytesMut, b: Option<&[u8]>) {
    match b {
        None => put_varint(buf, -1),
        Some(b) => {
            put_varint(buf, b.len() as i64);
            buf.put_slice(b);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_round_trip_at_their_edges() {
        for v in [
            0i64,
            1,
            -1,
            63,
            -64,
            64,
            -65,
            8191,
            1 << 31,
            i64::MAX,
            i64::MIN,
        ] {
            let mut buf = BytesMut::new();
            put_varint(&mut buf, v);
            assert_eq!(buf.len(), varint_len(v), "{v}");
            let mut slice = &buf[..];
            assert_eq!(get_varint(&mut slice), Some(v));
            assert!(slice.is_empty());
        }
    }

    #[test]
    fn a_built_batch_reads_back_record_by_record() {
        let mut b = BatchBuilder::new(1_000).producer(7, 0, 100);
        b.push(
            1_000,
            Some(b"k1"),
            Some(b"v1"),
            &[Header {
                key: "qos",
                value: Some(b"1"),
            }],
        );
        b.push(1_250, None, Some(b""), &[]);
        b.push(
            990,
            Some(b"k3"),
            None,
            &[Header {
                key: "h",
                value: None,
            }],
        );
        let batch = b.finish(500);
        let h = verify_crc(&batch).expect("valid");
        assert_eq!(
            (h.base_offset, h.last_offset(), h.records_count),
            (500, 502, 3)
        );
        assert_eq!(
            (h.max_timestamp, h.producer_id, h.base_sequence),
            (1_250, 7, 100)
        );
        assert_eq!(h.total_len(), batch.len());
        let recs: Vec<_> = records(&batch)
            .expect("uncompressed")
            .collect::<Result<_, _>>()
            .expect("records");
        assert_eq!(recs.len(), 3);
        assert_eq!(recs[0].key, Some(&b"k1"[..]));
        assert_eq!(
            recs[0].headers,
            vec![Header {
                key: "qos",
                value: Some(b"1")
            }]
        );
        assert_eq!(
            (
                recs[1].offset,
                recs[1].timestamp,
                recs[1].key,
                recs[1].value
            ),
            (501, 1_250, None, Some(&b""[..]))
        );
        assert_eq!(
            (recs[2].offset, recs[2].timestamp, recs[2].value),
            (502, 990, None)
        );
    }

    #[test]
    fn the_base_offset_is_outside_the_crc_and_every_other_byte_inside() {
        let mut b = BatchBuilder::new(5);
        b.push(5, Some(b"key"), Some(b"value"), &[]);
        let mut batch = b.finish(0).to_vec();
        set_base_offset(&mut batch, 1 << 40);
        assert_eq!(
            verify_crc(&batch).expect("still valid").base_offset,
            1 << 40
        );
        for i in CRC_START..batch.len() {
            let mut bad = batch.clone();
            bad[i] ^= 0x10;
            assert!(
                matches!(verify_crc(&bad), Err(BatchError::CrcMismatch { .. })),
                "flip at {i} went unnoticed"
            );
        }
    }

    #[test]
    fn compressed_batches_round_trip_and_bombs_are_stopped() {
        for compression in [Compression::Lz4, Compression::Zstd] {
            let mut b = BatchBuilder::new(1_000).producer(3, 0, 1);
            for i in 0..100 {
                b.push(
                    1_000 + i,
                    Some(b"sensors/t1"),
                    Some(b"21.5 degrees, steady, steady, steady"),
                    &[],
                );
            }
            let plain = {
                let mut p = BatchBuilder::new(1_000).producer(3, 0, 1);
                for i in 0..100 {
                    p.push(
                        1_000 + i,
                        Some(b"sensors/t1"),
                        Some(b"21.5 degrees, steady, steady, steady"),
                        &[],
                    );
                }
                p.finish(7)
            };
            let packed = b.finish_with(7, compression);
            let h = verify_crc(&packed).expect("valid CRC");
            assert_eq!(
                (h.compression(), h.records_count, h.last_offset()),
                (compression.codec(), 100, 106)
            );
            assert!(
                packed.len() < plain.len() / 3,
                "{compression:?}: {} of {}",
                packed.len(),
                plain.len()
            );
            assert!(matches!(records(&packed), Err(BatchError::Compressed(_))));
            let open = uncompressed(&packed, 1 << 20).expect("decompresses");
            assert_eq!(
                &open[..],
                &plain[..],
                "{compression:?}: the same batch as never compressed"
            );
            assert_eq!(
                uncompressed(&packed, 100),
                Err(BatchError::DecompressedTooLarge { max: 100 }),
                "{compression:?}"
            );
        }
        let mut b = BatchBuilder::new(0);
        b.push(0, None, Some(b"x"), &[]);
        let mut gzip = b.finish(0).to_vec();
        gzip[22] = 1;
        seal(&mut gzip);
        assert_eq!(
            uncompressed(&gzip, 1 << 20),
            Err(BatchError::UnsupportedCompression(1))
        );
    }

    #[test]
    fn truncated_and_foreign_batches_are_refused() {
        let mut b = BatchBuilder::new(0);
        b.push(0, None, Some(b"x"), &[]);
        let batch = b.finish(0);
        for cut in [0, 11, 60, batch.len() - 1] {
            assert!(
                matches!(verify_crc(&batch[..cut]), Err(BatchError::Truncated { .. })),
                "cut at {cut}"
            );
        }
        let mut old = batch.to_vec();
        old[16] = 1;
        assert_eq!(verify_crc(&old), Err(BatchError::BadMagic(1)));
        let mut short = batch.to_vec();
        short[8..12].copy_from_slice(&3i32.to_be_bytes());
        assert_eq!(verify_crc(&short), Err(BatchError::BadLength(3)));
    }
}
