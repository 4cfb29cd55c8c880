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

use ferry_protocol::kafka::{records, uncompressed, verify_crc, BatchBuilder, Header};

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

/// Twenty records (key `sensors/t1`, value `21.5 degrees, steady`, header `mqtt.qos: 1`,
/// timestamps 1700000000000 + i) that kafka-python 2.x compressed with LZ4 (codec 3, through
/// the `lz4` package) and with zstd (codec 4, through `zstandard`).
const KAFKA_PYTHON_LZ4: &str = "0000000000000000000000f300000000029934e5410003000000130000018bcfe568000000018bcfe56813ffffffffffffffffffffffffffff0000001404224d186840c0030000000000002bab000000ff255e0000001473656e736f72732f74312832312e3520646567726565732c2073746561647902106d7174742e716f7302315e00020230001b2f040430001b2f060630001b2f080830001b2f0a0a30001b2f0c0c30001b2f0e0e30001b2f101030001b2f121230001b2f141430001b2f161630001b2f181830001b2f1a1a30001b2f1c1c30001b2f1e1e30001b2f202030001b2f222230001b2f242430001b2f262630001450716f73023100000000";
const KAFKA_PYTHON_ZSTD: &str = "0000000000000000000000b60000000002eb2197ae0004000000130000018bcfe568000000018bcfe56813ffffffffffffffffffffffffffff0000001428b52ffd60c002dd030084055e0000001473656e736f72732f74312832312e3520646567726565732c2073746561647902106d7174742e716f7302315e0002020404060608080a0a0c0c0e0e101012121414161618181a1a1c1c1e1e2020222224242626130424013cc0033cc0033cc0033cc0033cc0033cc0033cc0033cc0033cc0f45450";

#[test]
fn ferry_decompresses_what_kafka_python_compressed() {
    for (name, hex) in [("lz4", KAFKA_PYTHON_LZ4), ("zstd", KAFKA_PYTHON_ZSTD)] {
        let theirs = unhex(hex);
        verify_crc(&theirs).expect("their CRC checks");
        let open = uncompressed(&theirs, 1 << 20).expect(name);
        let recs: Vec<_> = records(&open)
            .expect("uncompressed now")
            .collect::<Result<_, _>>()
            .expect("records");
        assert_eq!(recs.len(), 20, "{name}");
        for (i, r) in recs.iter().enumerate() {
            assert_eq!(
                (r.offset, r.timestamp),
                (i as i64, 1_700_000_000_000 + i as i64),
                "{name}"
            );
            assert_eq!(
                (r.key, r.value),
                (Some(&b"sensors/t1"[..]), Some(&b"21.5 degrees, steady"[..]))
            );
            assert_eq!(
                r.headers,
                vec![Header {
                    key: "mqtt.qos",
                    value: Some(b"1")
                }]
            );
        }
    }
}
