//! The record batch against another implementation: bytes that kafka-python 2.x's
//! `DefaultRecordBatchBuilder` wrote (magic 2, producer id 7, epoch 0, base sequence 100):
//!
//! ```python
//! b = DefaultRecordBatchBuilder(magic=2, compression_type=0, is_transactional=False,
//!         producer_id=7, producer_epoch=0, base_sequence=100, batch_size=1 << 20)
//! b.append(0, timestamp=1700000000000, key=b"sensors/t1", value=b"21.5", headers=[("qos", b"1")])
//! b.append(1, timestamp=1700000000250, key=None, value=b"", headers=[])
//! b.append(2, timestamp=1699999999990, key=b"k3", value=None, headers=[("h", None)])
//! b.build().hex()
//! ```

use ferry_protocol::kafka::{records, verify_crc, BatchBuilder, Header};

const KAFKA_PYTHON: &str = "000000000000000000000060000000000293839fc60000000000020000018bcfe568000000018bcfe568fa000000000000000700000000006400000003340000001473656e736f72732f74310832312e350206716f7302310e00f4030201000016001304046b330102026801";

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect()
}

#[test]
fn ferry_writes_the_same_bytes_as_kafka_python() {
    let mut b = BatchBuilder::new(1_700_000_000_000).producer(7, 0, 100);
    b.push(
        1_700_000_000_000,
        Some(b"sensors/t1"),
        Some(b"21.5"),
        &[Header {
            key: "qos",
            value: Some(b"1"),
        }],
    );
    b.push(1_700_000_000_250, None, Some(b""), &[]);
    b.push(
        1_699_999_999_990,
        Some(b"k3"),
        None,
        &[Header {
            key: "h",
            value: None,
        }],
    );
    let ours = b.finish(0).to_vec();
    let mut theirs = unhex(KAFKA_PYTHON);
    // The partition leader epoch (outside the CRC): kafka-python writes 0, Ferry -1
    // ("unknown"), as the Java producer does.
    theirs[12..16].copy_from_slice(&(-1i32).to_be_bytes());
    assert_eq!(ours, theirs);
}

#[test]
fn ferry_reads_what_kafka_python_wrote() {
    let theirs = unhex(KAFKA_PYTHON);
    let h = verify_crc(&theirs).expect("kafka-python's CRC checks");
    assert_eq!(
        (
            h.records_count,
            h.last_offset(),
            h.producer_id,
            h.base_sequence
        ),
        (3, 2, 7, 100)
    );
    let recs: Vec<_> = records(&theirs)
        .expect("uncompressed")
        .collect::<Result<_, _>>()
        .expect("records");
    assert_eq!(recs[0].key, Some(&b"sensors/t1"[..]));
    assert_eq!(recs[0].value, Some(&b"21.5"[..]));
    assert_eq!(
        recs[0].headers,
        vec![Header {
            key: "qos",
            value: Some(b"1")
        }]
    );
    assert_eq!(
        (recs[1].key, recs[1].value, recs[1].timestamp),
        (None, Some(&b""[..]), 1_700_000_000_250)
    );
    assert_eq!(
        (recs[2].value, recs[2].timestamp, recs[2].headers.len()),
        (None, 1_699_999_999_990, 1)
    );
}
