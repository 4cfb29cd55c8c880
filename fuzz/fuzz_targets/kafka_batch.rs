#![no_main]
//! Kafka record batch reader and decompressors: never panic on any bytes; a batch whose CRC checks and whose
//! records read rebuilds, record by record, into the same bytes (for batches Ferry's builder
//! could have written: no producer epoch games, leader epoch -1, attributes 0).

use ferry_protocol::kafka::{records, uncompressed, verify_crc, BatchBuilder};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The decompressors take any bytes without panicking, and never give more than asked.
    if let Ok(open) = uncompressed(data, 1 << 16) {
        if let Ok(recs) = records(&open) {
            recs.for_each(drop);
        }
    }
    let Ok(h) = verify_crc(data) else { return };
    let Ok(recs) = records(data) else { return };
    let Ok(recs) = recs.collect::<Result<Vec<_>, _>>() else { return };
    let canonical = h.attributes == 0
        && h.partition_leader_epoch == -1
        && !recs.is_empty()
        && h.last_offset_delta == recs.len() as i32 - 1
        && recs.iter().enumerate().all(|(i, r)| r.offset == h.base_offset + i as i64);
    if !canonical {
        return;
    }
    let mut b = BatchBuilder::new(h.base_timestamp).producer(h.producer_id, h.producer_epoch, h.base_sequence);
    for r in &recs {
        b.push(r.timestamp, r.key, r.value, &r.headers);
    }
    let rebuilt = b.finish(h.base_offset);
    if rebuilt.len() == h.total_len() && h.max_timestamp == recs.iter().map(|r| r.timestamp).max().unwrap_or(h.base_timestamp).max(h.base_timestamp) {
        assert_eq!(&rebuilt[..], &data[..h.total_len()]);
    }
});
