//! ferry-cloud's Kafka front, request by request, against confluent-kafka (librdkafka) and
//! raw requests over TCP where a client cannot say exactly what it sends: Produce with
//! acks=0 and acks=1, pipelined Produce requests, Fetch's max_wait_ms and min_bytes, ListGroups and DescribeGroups of a
//! live group, and OffsetFetch of several groups in one request.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use ferry_protocol::kafka::{records, BatchBuilder};
use ferry_tests::process::{python_client, temp_dir, Edge};

/// A ferry-cloud with MQTT and Kafka on ephemeral ports, in `dir`, and a stream `grp` of
/// three partitions. (As tests/tests/cloud_kafka.rs's `cloud`.)
fn cloud(dir: &std::path::Path) -> Edge {
    let config = dir.join("cloud.toml");
    std::fs::write(
        &config,
        "[server]\nlisten = [\"127.0.0.1:0\"]\n[kafka]\nlisten = \"127.0.0.1:0\"\n\
         [[route]]\nfilter = \"grp/#\"\nstream = \"grp\"\npartitions = 3\n",
    )
    .expect("write config");
    Edge::cloud_in(
        &dir.join("data"),
        &["--config", config.to_str().expect("utf8")],
    )
}

/// confluent-kafka produces 500 records with acks=0 (it reads no response and so learns no
/// offset) and, once they have all landed, 500 with acks=1 (confirmed at offsets 500..1000);
/// a consumer reads all 1,000 back, in order. Then raw: on one connection a Produce with
/// acks=0 and one with acks=1; the first answer on the connection is the acks=1 one (the
/// acks=0 request got none), at offset 3, after the acks=0 request's three records, which a
/// Fetch returns in order before the acks=1 records.
#[test]
fn produce_with_acks_0_and_acks_1_lands_in_order() {
    let dir = temp_dir("kafka-acks");
    let node = cloud(&dir);
    let addr = node.kafka_addr().expect("a Kafka listener");
    python_client("kafka_produce_acks.py", &[&addr.to_string(), "acks", "500"]);

    let mut conn = Raw::connect(addr);
    let unanswered = conn.send(PRODUCE, 3, &produce_v3(0, "grp", 0, &["a0", "a1", "a2"]));
    let answered = conn.send(PRODUCE, 3, &produce_v3(1, "grp", 0, &["b0", "b1"]));
    let (correlation, body) = conn.receive();
    assert_eq!(
        correlation, answered,
        "the first answer is the acks=1 Produce's (the acks=0 one, {unanswered}, has none)"
    );
    let mut r = Reader(&body);
    assert_eq!((r.i32(), r.string(), r.i32()), (1, "grp".into(), 1));
    let (partition, error, base_offset) = (r.i32(), r.i16(), r.i64());
    assert_eq!(
        (partition, error, base_offset),
        (0, 0, 3),
        "acks=1 appended after the acks=0 records"
    );
    let (_, fetched) = fetch(&mut conn, "grp", 0, 0, 0, 1);
    assert_eq!(
        fetched,
        [(0, "a0"), (1, "a1"), (2, "a2"), (3, "b0"), (4, "b1")]
            .map(|(o, v)| (o, v.to_owned()))
            .to_vec(),
        "both requests' records, in order"
    );
    drop(node);
    let _ = std::fs::remove_dir_all(&dir);
}

/// On one connection, 30 Produce requests (acks=-1) sent back to back without reading an
/// answer, the front pipelining them (their appends queued while earlier ones wait for
/// their commit), with an ApiVersions request (not pipelined: it waits for those before
/// it) after the first 15: every answer comes, in the order sent, the ApiVersions one after
/// the first 15 produce answers, the offsets follow the order sent, and a Fetch reads the
/// records in that order.
#[test]
fn pipelined_produce_requests_are_answered_and_stored_in_the_order_sent() {
    let dir = temp_dir("kafka-pipeline");
    let node = cloud(&dir);
    let addr = node.kafka_addr().expect("a Kafka listener");
    let mut conn = Raw::connect(addr);
    let mut sent = Vec::new();
    for i in 0..30 {
        if i == 15 {
            sent.push((conn.send(API_VERSIONS, 0, &[]), None));
        }
        let values = [format!("r{i}-0"), format!("r{i}-1")];
        let values: Vec<&str> = values.iter().map(String::as_str).collect();
        sent.push((
            conn.send(PRODUCE, 3, &produce_v3(-1, "grp", 1, &values)),
            Some(i),
        ));
    }
    for (correlation, produce) in &sent {
        let (got, body) = conn.receive();
        assert_eq!(got, *correlation, "answers in the order sent");
        let Some(i) = produce else {
            continue;
        };
        let mut r = Reader(&body);
        assert_eq!((r.i32(), r.string(), r.i32()), (1, "grp".into(), 1));
        let (partition, error, base_offset) = (r.i32(), r.i16(), r.i64());
        assert_eq!(
            (partition, error, base_offset),
            (1, 0, 2 * i64::from(*i)),
            "request {i} appended after those sent before it"
        );
    }
    let (_, fetched) = fetch(&mut conn, "grp", 1, 0, 0, 1);
    let expected: Vec<(i64, String)> = (0..60)
        .map(|n| (n, format!("r{}-{}", n / 2, n % 2)))
        .collect();
    assert_eq!(fetched, expected, "the records in the order sent");
    drop(node);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Raw Fetch requests (v4) to a partition of `grp`, each timed:
/// - nothing there, max_wait 1,000 ms, min_bytes 1: the answer comes after about max_wait
///   (at least 900 ms), with no records;
/// - nothing there, max_wait 5,000 ms, min_bytes 1, a record produced 200 ms in: the answer
///   comes early (under 4 s) with the record;
/// - one small record there, max_wait 3,000 ms, min_bytes 1,000,000, another small record
///   produced 200 ms in: neither reaches min_bytes, so the answer waits the whole max_wait
///   (at least 2,900 ms) and then brings both records, which is what Kafka answers when
///   max_wait runs out.
#[test]
fn a_fetch_waits_for_min_bytes_up_to_max_wait() {
    let dir = temp_dir("kafka-fetch-wait");
    let node = cloud(&dir);
    let addr = node.kafka_addr().expect("a Kafka listener");
    let mut conn = Raw::connect(addr);

    let (took, got) = fetch(&mut conn, "grp", 0, 0, 1_000, 1);
    assert!(got.is_empty(), "{got:?}");
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(4),
        "an empty fetch waits max_wait (1 s): {took:?}"
    );

    let producer = produce_later(addr, 1, "early");
    let (took, got) = fetch(&mut conn, "grp", 1, 0, 5_000, 1);
    producer.join().expect("the producer");
    assert_eq!(got, [(0, "early".to_owned())]);
    assert!(
        took < Duration::from_secs(4),
        "data arriving ends the wait before max_wait (5 s): {took:?}"
    );

    produce_now(&mut conn, 2, "small0");
    let producer = produce_later(addr, 2, "small1");
    let (took, got) = fetch(&mut conn, "grp", 2, 0, 3_000, 1_000_000);
    producer.join().expect("the producer");
    assert!(
        took >= Duration::from_millis(2_900),
        "records short of min_bytes do not end the wait: {took:?}"
    );
    assert_eq!(
        got,
        [(0, "small0".to_owned()), (1, "small1".to_owned())],
        "at max_wait, what there is"
    );

    // min_bytes 0: the answer comes at once, even with nothing to give ("the server will
    // always respond immediately", the protocol guide).
    let (took, got) = fetch(&mut conn, "grp", 0, 0, 5_000, 0);
    assert!(got.is_empty(), "{got:?}");
    assert!(took < Duration::from_secs(2), "min_bytes 0 waited {took:?}");
    // An offset past the end is an error, answered at once: waiting would not change it.
    let (took, error, _) = fetch_answer(&mut conn, "grp", 0, 1_000_000, 5_000, 1);
    assert_eq!(error, 1, "OFFSET_OUT_OF_RANGE");
    assert!(took < Duration::from_secs(2), "an error waited {took:?}");
    drop(node);
    let _ = std::fs::remove_dir_all(&dir);
}

/// confluent-kafka's AdminClient against a live group of two (see kafka_groups_admin.py):
/// ListGroups and DescribeGroups give its state (Stable, then Empty when both left), its
/// members with their client ids and assignments, and the assignor it chose.
#[test]
fn the_admin_client_lists_and_describes_a_live_group() {
    let dir = temp_dir("kafka-groups-admin");
    let node = cloud(&dir);
    let bootstrap = node.kafka_addr().expect("a Kafka listener").to_string();
    let stdout = python_client("kafka_groups_admin.py", &[&bootstrap, "grp", "3"]);
    assert!(
        stdout.contains("described ConsumerGroupState.STABLE range"),
        "{stdout}"
    );
    drop(node);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Two groups commit offsets with confluent-kafka and each reads its own back with the
/// AdminClient (see kafka_group_offsets.py); then one raw OffsetFetch v8 asks for both and
/// a group that never committed: each group gets its own offsets (-1 for a partition asked
/// for and not committed), the third none.
#[test]
fn offset_fetch_answers_several_groups_in_one_request() {
    let dir = temp_dir("kafka-offset-fetch");
    let node = cloud(&dir);
    let addr = node.kafka_addr().expect("a Kafka listener");
    python_client("kafka_group_offsets.py", &[&addr.to_string(), "grp"]);

    let mut conn = Raw::connect(addr);
    let mut body = Vec::new();
    uvarint(&mut body, 4); // three groups
    for (group, partitions) in [("ga", None), ("gb", Some(&[0, 1, 2][..])), ("nobody", None)] {
        compact_string(&mut body, group);
        match partitions {
            None => uvarint(&mut body, 0), // topics: null, every one it committed
            Some(partitions) => {
                uvarint(&mut body, 2); // one topic
                compact_string(&mut body, "grp");
                uvarint(&mut body, partitions.len() as u64 + 1);
                for p in partitions {
                    body.extend_from_slice(&i32::to_be_bytes(*p));
                }
                body.push(0); // tagged fields
            }
        }
        body.push(0); // tagged fields
    }
    body.push(0); // require_stable: false
    body.push(0); // tagged fields
    let (_, answer) = conn.request(OFFSET_FETCH, 8, &body);
    let mut r = Reader(&answer);
    r.uvarint(); // response header v1: tagged fields
    r.i32(); // throttle_time_ms
    let mut groups = Vec::new();
    for _ in 0..r.compact_len() {
        let group = r.compact_string();
        let mut offsets = Vec::new();
        for _ in 0..r.compact_len() {
            let topic = r.compact_string();
            for _ in 0..r.compact_len() {
                let (partition, offset, _epoch) = (r.i32(), r.i64(), r.i32());
                r.compact_string(); // metadata
                assert_eq!(r.i16(), 0, "{group} {topic} {partition}: no error");
                r.uvarint();
                offsets.push((topic.clone(), partition, offset));
            }
            r.uvarint();
        }
        assert_eq!(r.i16(), 0, "{group}: no error");
        r.uvarint();
        offsets.sort();
        groups.push((group, offsets));
    }
    let grp = |p, o| ("grp".to_owned(), p, o);
    assert_eq!(
        groups,
        vec![
            ("ga".to_owned(), vec![grp(0, 5), grp(1, 7)]),
            ("gb".to_owned(), vec![grp(0, 2), grp(1, -1), grp(2, 9)]),
            ("nobody".to_owned(), vec![]),
        ],
        "each group's own commits, in one answer"
    );
    drop(node);
    let _ = std::fs::remove_dir_all(&dir);
}

const PRODUCE: i16 = 0;
const API_VERSIONS: i16 = 18;
const FETCH: i16 = 1;
const OFFSET_FETCH: i16 = 9;

/// One Kafka connection, raw: requests with header v1 (v2 for flexible versions: the
/// caller's body starts after the header's tagged fields, which [`Raw::send`] writes).
struct Raw {
    stream: TcpStream,
    next_correlation: i32,
}

impl Raw {
    fn connect(addr: SocketAddr) -> Self {
        let stream = TcpStream::connect(addr).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(15)))
            .expect("timeout");
        Self {
            stream,
            next_correlation: 1,
        }
    }

    /// Sends a request; its correlation id.
    fn send(&mut self, api_key: i16, version: i16, body: &[u8]) -> i32 {
        let correlation = self.next_correlation;
        self.next_correlation += 1;
        let mut frame = vec![0; 4];
        frame.extend_from_slice(&api_key.to_be_bytes());
        frame.extend_from_slice(&version.to_be_bytes());
        frame.extend_from_slice(&correlation.to_be_bytes());
        string(&mut frame, "raw"); // client id
        if api_key == OFFSET_FETCH && version >= 6 {
            frame.push(0); // request header v2: tagged fields
        }
        frame.extend_from_slice(body);
        let len = (frame.len() - 4) as u32;
        frame[..4].copy_from_slice(&len.to_be_bytes());
        self.stream.write_all(&frame).expect("write a request");
        correlation
    }

    /// The next response frame: its correlation id and the rest.
    fn receive(&mut self) -> (i32, Vec<u8>) {
        let mut len = [0u8; 4];
        self.stream
            .read_exact(&mut len)
            .expect("a response frame's length");
        let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
        self.stream
            .read_exact(&mut body)
            .expect("a response frame's body");
        let correlation = i32::from_be_bytes(body[..4].try_into().expect("4 bytes"));
        (correlation, body.split_off(4))
    }

    /// Sends a request and returns how long its answer took, and the answer.
    fn request(&mut self, api_key: i16, version: i16, body: &[u8]) -> (Duration, Vec<u8>) {
        let start = Instant::now();
        let correlation = self.send(api_key, version, body);
        let (got, answer) = self.receive();
        assert_eq!(got, correlation, "answers in order");
        (start.elapsed(), answer)
    }
}

/// A Produce v3 body: `values` as one batch to `topic`'s `partition`, with `acks`.
fn produce_v3(acks: i16, topic: &str, partition: i32, values: &[&str]) -> Vec<u8> {
    let mut batch = BatchBuilder::new(1_790_000_000_000);
    for v in values {
        batch.push(1_790_000_000_000, None, Some(v.as_bytes()), &[]);
    }
    let batch = batch.finish(0);
    let mut body = Vec::new();
    body.extend_from_slice(&(-1i16).to_be_bytes()); // transactional id: null
    body.extend_from_slice(&acks.to_be_bytes());
    body.extend_from_slice(&10_000i32.to_be_bytes()); // timeout_ms
    body.extend_from_slice(&1i32.to_be_bytes()); // one topic
    string(&mut body, topic);
    body.extend_from_slice(&1i32.to_be_bytes()); // one partition
    body.extend_from_slice(&partition.to_be_bytes());
    body.extend_from_slice(&(batch.len() as i32).to_be_bytes());
    body.extend_from_slice(&batch);
    body
}

/// Produces `value` to `grp`'s `partition` with acks=1 on `conn`; checks it was taken.
fn produce_now(conn: &mut Raw, partition: i32, value: &str) {
    let (_, answer) = conn.request(PRODUCE, 3, &produce_v3(1, "grp", partition, &[value]));
    let mut r = Reader(&answer);
    let _ = (r.i32(), r.string(), r.i32(), r.i32()); // topics, name, partitions, index
    assert_eq!(r.i16(), 0, "produced {value}");
}

/// Produces `value` to `grp`'s `partition` 200 ms from now, on a connection of its own.
fn produce_later(
    addr: SocketAddr,
    partition: i32,
    value: &'static str,
) -> std::thread::JoinHandle<()> {
    let mut conn = Raw::connect(addr);
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(200));
        produce_now(&mut conn, partition, value);
    })
}

/// A Fetch v4 of `topic`'s `partition` from `offset` with `max_wait_ms` and `min_bytes`:
/// how long the answer took, and the (offset, value) of its records.
fn fetch(
    conn: &mut Raw,
    topic: &str,
    partition: i32,
    offset: i64,
    max_wait_ms: i32,
    min_bytes: i32,
) -> (Duration, Vec<(i64, String)>) {
    let (took, error, got) = fetch_answer(conn, topic, partition, offset, max_wait_ms, min_bytes);
    assert_eq!(error, 0, "no error");
    (took, got)
}

/// As [`fetch`], with the partition's error code (its records: none when it is not 0).
fn fetch_answer(
    conn: &mut Raw,
    topic: &str,
    partition: i32,
    offset: i64,
    max_wait_ms: i32,
    min_bytes: i32,
) -> (Duration, i16, Vec<(i64, String)>) {
    let mut body = Vec::new();
    body.extend_from_slice(&(-1i32).to_be_bytes()); // replica id: a consumer
    body.extend_from_slice(&max_wait_ms.to_be_bytes());
    body.extend_from_slice(&min_bytes.to_be_bytes());
    body.extend_from_slice(&(50i32 << 20).to_be_bytes()); // max_bytes
    body.push(0); // isolation level: read uncommitted
    body.extend_from_slice(&1i32.to_be_bytes()); // one topic
    string(&mut body, topic);
    body.extend_from_slice(&1i32.to_be_bytes()); // one partition
    body.extend_from_slice(&partition.to_be_bytes());
    body.extend_from_slice(&offset.to_be_bytes());
    body.extend_from_slice(&(10i32 << 20).to_be_bytes()); // partition_max_bytes
    let (took, answer) = conn.request(FETCH, 4, &body);
    let mut r = Reader(&answer);
    r.i32(); // throttle_time_ms
    assert_eq!(r.i32(), 1, "one topic");
    assert_eq!(r.string(), topic);
    assert_eq!(r.i32(), 1, "one partition");
    assert_eq!(r.i32(), partition);
    let error = r.i16();
    if error != 0 {
        return (took, error, Vec::new());
    }
    r.i64(); // high watermark
    r.i64(); // last stable offset
    let aborted = r.i32();
    assert!(aborted <= 0, "no aborted transactions");
    let len = r.i32();
    let mut set = r.take(len.max(0) as usize);
    let mut got = Vec::new();
    while !set.is_empty() {
        let header = ferry_protocol::kafka::BatchHeader::parse(set).expect("a batch header");
        let end = header.total_len();
        if set.len() < end {
            break; // a partial batch at the end, as Kafka may send
        }
        for record in records(&set[..end]).expect("an uncompressed batch") {
            let record = record.expect("a record");
            let value = String::from_utf8_lossy(record.value.unwrap_or_default()).into_owned();
            got.push((record.offset, value));
        }
        set = &set[end..];
    }
    (took, error, got)
}

/// A STRING: i16 length, then the bytes.
fn string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as i16).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// A COMPACT_STRING: unsigned varint of length + 1, then the bytes.
fn compact_string(out: &mut Vec<u8>, s: &str) {
    uvarint(out, s.len() as u64 + 1);
    out.extend_from_slice(s.as_bytes());
}

fn uvarint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Reads a response body front to back; panics past its end (a short answer is a failure).
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> &'a [u8] {
        assert!(self.0.len() >= n, "the answer is cut short");
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        head
    }

    fn i16(&mut self) -> i16 {
        i16::from_be_bytes(self.take(2).try_into().expect("2 bytes"))
    }

    fn i32(&mut self) -> i32 {
        i32::from_be_bytes(self.take(4).try_into().expect("4 bytes"))
    }

    fn i64(&mut self) -> i64 {
        i64::from_be_bytes(self.take(8).try_into().expect("8 bytes"))
    }

    fn string(&mut self) -> String {
        let len = self.i16();
        String::from_utf8_lossy(self.take(len.max(0) as usize)).into_owned()
    }

    fn uvarint(&mut self) -> u64 {
        let (mut v, mut shift) = (0u64, 0);
        loop {
            let b = self.take(1)[0];
            v |= u64::from(b & 0x7f) << shift;
            if b < 0x80 {
                return v;
            }
            shift += 7;
        }
    }

    /// A compact array's or string's length (0 for null).
    fn compact_len(&mut self) -> usize {
        self.uvarint().saturating_sub(1) as usize
    }

    fn compact_string(&mut self) -> String {
        let len = self.compact_len();
        String::from_utf8_lossy(self.take(len)).into_owned()
    }
}
