//! The outbox's records on the link: [`OutRecord`], the record batches of BATCH frames made
//! from them (offsets = sequence numbers), and the records of a DOWN frame's batch.

use bytes::Bytes;
use ferry_protocol::kafka::{BatchBuilder, Compression, Header};

use crate::edge_end::MAX_FRAME_BYTES;
use crate::error::LinkError;

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

/// The downlink messages of a DOWN batch after `applied`, in order.
pub(crate) fn down_records(batch: &[u8], applied: u64) -> Result<Vec<OutRecord>, LinkError> {
    let plain = ferry_protocol::kafka::uncompressed(batch, MAX_FRAME_BYTES * 16)?;
    let mut out = Vec::new();
    for r in ferry_protocol::kafka::records(&plain)? {
        let r = r?;
        let seq = u64::try_from(r.offset).map_err(|_| LinkError::BadDownRecord {
            offset: r.offset,
            what: "a negative sequence",
        })?;
        if seq <= applied {
            continue;
        }
        let topic =
            r.key
                .and_then(|k| std::str::from_utf8(k).ok())
                .ok_or(LinkError::BadDownRecord {
                    offset: r.offset,
                    what: "no topic",
                })?;
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

pub(crate) struct OutBatch {
    pub(crate) bytes: Bytes,
    pub(crate) last_seq: u64,
    pub(crate) records: u64,
}

/// The records as record batches whose offsets are their sequence numbers (a new batch
/// where a gap would not fit an offset delta).
pub(crate) fn batches(records: &[OutRecord], compression: Compression) -> Vec<OutBatch> {
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
pub(crate) mod tests {
    use super::*;
    use ferry_protocol::kafka::{records, uncompressed};

    /// A record of sequence `seq`, topic `t/<seq>`, 10 bytes of payload.
    pub(crate) fn rec(seq: u64) -> OutRecord {
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
