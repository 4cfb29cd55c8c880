//! ferry-cloud's Kafka front against librdkafka through the `rdkafka` crate: idempotent
//! produce with acks=all, consume, seek by timestamp, and a consumer group of three where one
//! member leaves and one (a process of its own) is killed with SIGKILL.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use ferry_tests::process::{temp_dir, Edge};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{CommitMode, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::{Offset, TopicPartitionList};

/// A ferry-cloud with Kafka on an ephemeral port, in `dir`, and streams `rk` and `rkg` of
/// three partitions each.
fn cloud(dir: &std::path::Path) -> Edge {
    let config = dir.join("cloud.toml");
    std::fs::write(
        &config,
        "[server]\nlisten = [\"127.0.0.1:0\"]\n[kafka]\nlisten = \"127.0.0.1:0\"\n\
         [[route]]\nfilter = \"rk/#\"\nstream = \"rk\"\npartitions = 3\n\
         [[route]]\nfilter = \"rkg/#\"\nstream = \"rkg\"\npartitions = 3\n",
    )
    .expect("write config");
    Edge::cloud_in(
        &dir.join("data"),
        &["--config", config.to_str().expect("utf8")],
    )
}

/// Client settings every client here shares; `FERRY_RDKAFKA_DEBUG` (e.g. `cgrp,protocol`)
/// turns on librdkafka's debug log.
fn config(bootstrap: &str) -> ClientConfig {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", bootstrap);
    if let Ok(debug) = std::env::var("FERRY_RDKAFKA_DEBUG") {
        config.set("debug", debug);
        config.set_log_level(rdkafka::config::RDKafkaLogLevel::Debug);
    }
    config
}

/// Produces `values` to `topic` (key = value) with an idempotent producer, acks=all, each
/// record with `timestamp` (ms); returns once every record is acknowledged.
fn produce(bootstrap: &str, topic: &str, values: &[String], timestamp: i64) {
    let producer: ThreadedProducer<DefaultProducerContext> = config(bootstrap)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "5")
        .create()
        .expect("producer");
    for value in values {
        let mut record = BaseRecord::to(topic)
            .key(value.as_str())
            .payload(value.as_str())
            .timestamp(timestamp);
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((e, back)) => {
                    assert!(
                        matches!(
                            e.rdkafka_error_code(),
                            Some(rdkafka::types::RDKafkaErrorCode::QueueFull)
                        ),
                        "send: {e}"
                    );
                    record = back;
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        }
    }
    producer
        .flush(Duration::from_secs(30))
        .expect("every record acknowledged");
}

/// A consumer's context: librdkafka's log lines (see [`config`]) on stderr, with the
/// client's name.
#[derive(Debug)]
struct Named(String);

impl rdkafka::client::ClientContext for Named {
    fn log(&self, _level: rdkafka::config::RDKafkaLogLevel, facility: &str, line: &str) {
        eprintln!("{} {facility} {line}", self.0);
    }
}

impl rdkafka::consumer::ConsumerContext for Named {}

type BaseConsumer = rdkafka::consumer::BaseConsumer<Named>;

/// A consumer of `group` that commits only when told.
fn consumer(bootstrap: &str, group: &str, name: &str) -> BaseConsumer {
    config(bootstrap)
        .set("group.id", group)
        .set("client.id", name)
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .set("session.timeout.ms", "6000")
        .set("heartbeat.interval.ms", "500")
        .create_with_context(Named(name.to_owned()))
        .expect("consumer")
}

/// Polls `consumer` until `count` records have arrived or `within` has passed; returns
/// (partition, offset, value) in the order they came.
fn poll_n(consumer: &BaseConsumer, count: usize, within: Duration) -> Vec<(i32, i64, String)> {
    let deadline = Instant::now() + within;
    let mut got = Vec::new();
    while got.len() < count && Instant::now() < deadline {
        if let Some(message) = consumer.poll(Duration::from_millis(200)) {
            let message = message.expect("no consumer error");
            got.push(record(&message));
        }
    }
    got
}

fn record(message: &impl Message) -> (i32, i64, String) {
    let value = String::from_utf8_lossy(message.payload().unwrap_or_default()).into_owned();
    (message.partition(), message.offset(), value)
}

/// 1,000 records from an idempotent acks=all producer (two batches of timestamps) come back
/// once each, in order within each partition, with the key the producer gave; the records
/// at or after the second timestamp are found with offsets_for_times and only they are read
/// from there.
#[test]
fn rdkafka_produces_consumes_and_seeks_by_time() {
    let dir = temp_dir("rdkafka-roundtrip");
    let node = cloud(&dir);
    let bootstrap = node.kafka_addr().expect("a Kafka listener").to_string();
    let early: Vec<String> = (0..500).map(|i| format!("v{i}")).collect();
    let late: Vec<String> = (500..1000).map(|i| format!("v{i}")).collect();
    let t0 = 1_790_000_000_000;
    produce(&bootstrap, "rk", &early, t0);
    produce(&bootstrap, "rk", &late, t0 + 60_000);

    let reader = consumer(&bootstrap, "rk-reader", "reader");
    reader.subscribe(&["rk"]).expect("subscribe");
    let got = poll_n(&reader, 1000, Duration::from_secs(30));
    let values: BTreeSet<&str> = got.iter().map(|(_, _, v)| v.as_str()).collect();
    assert_eq!(got.len(), 1000, "every record once");
    assert_eq!(values.len(), 1000, "no record twice");
    let mut last: BTreeMap<i32, (i64, usize)> = BTreeMap::new();
    for (partition, offset, value) in &got {
        let n: usize = value[1..].parse().expect("v<n>");
        if let Some((o, m)) = last.insert(*partition, (*offset, n)) {
            assert!(
                o < *offset && m < n,
                "in order within partition {partition}"
            );
        }
    }
    assert_eq!(last.len(), 3, "spread over the three partitions");

    // Seek by timestamp: every partition's first offset at or after t0 + 60 s.
    let mut times = TopicPartitionList::new();
    for p in 0..3 {
        times
            .add_partition_offset("rk", p, Offset::Offset(t0 + 60_000))
            .expect("add");
    }
    let found = reader
        .offsets_for_times(times, Duration::from_secs(10))
        .expect("offsets_for_times");
    drop(reader);
    let seeker = consumer(&bootstrap, "rk-seeker", "seeker");
    seeker.assign(&found).expect("assign");
    let again = poll_n(&seeker, 500, Duration::from_secs(30));
    let again: BTreeSet<String> = again.into_iter().map(|(_, _, v)| v).collect();
    assert_eq!(
        again,
        late.iter().cloned().collect(),
        "only the later records"
    );
    drop(seeker);
    drop(node);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Whether `consumer` is assigned all `partitions` of `topic` and positioned at the end of
/// each: its position there, or where nothing was read yet the group's committed offset.
fn at_end(consumer: &BaseConsumer, topic: &str, partitions: i32) -> bool {
    let Ok(assignment) = consumer.assignment() else {
        return false;
    };
    let (Ok(positions), Ok(committed)) = (
        consumer.position(),
        consumer.committed(Duration::from_secs(5)),
    ) else {
        return false;
    };
    let offset = |list: &TopicPartitionList, p| match list.find_partition(topic, p)?.offset() {
        Offset::Offset(at) => Some(at),
        _ => None,
    };
    assignment.count() == partitions as usize
        && (0..partitions).all(|p| {
            let high = consumer
                .fetch_watermarks(topic, p, Duration::from_secs(5))
                .map(|(_, high)| high);
            let at = offset(&positions, p).or_else(|| offset(&committed, p));
            matches!((at, high), (Some(at), Ok(high)) if at == high)
        })
}

/// A member in a process of its own; its records arrive on `lines`.
struct Member {
    child: std::process::Child,
    lines: mpsc::Receiver<(i32, i64, String)>,
}

impl Member {
    fn start(bootstrap: &str, group: &str, topic: &str) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_kafka-member"))
            .args([bootstrap, group, topic])
            .stdout(Stdio::piped())
            .spawn()
            .expect("kafka-member starts");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let mut parts = line.splitn(3, ' ');
                let (Some(p), Some(o), Some(v)) = (parts.next(), parts.next(), parts.next()) else {
                    continue;
                };
                let parsed = (p.parse(), o.parse());
                if let (Ok(p), Ok(o)) = parsed {
                    if tx.send((p, o, v.to_owned())).is_err() {
                        return;
                    }
                }
            }
        });
        Member { child, lines }
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A group of three on a topic of three partitions: two members in this process, one in a
/// process of its own. After a quarter of the records one member leaves (closes); after half,
/// the other process is killed with SIGKILL (no LeaveGroup: its session runs out). The group
/// rebalances and every record is consumed at least once. The survivor commits; a new member
/// of the group resumes after those commits and reads only records produced later.
#[test]
fn rdkafka_group_of_three_survives_a_leave_and_a_death_and_resumes() {
    let dir = temp_dir("rdkafka-group");
    let node = cloud(&dir);
    let bootstrap = node.kafka_addr().expect("a Kafka listener").to_string();
    let count = 3000;
    let values: Vec<String> = (0..count).map(|i| format!("v{i}")).collect();
    produce(&bootstrap, "rkg", &values, 1_790_000_000_000);

    let mut member = Some(Member::start(&bootstrap, "g3", "rkg"));
    let mut leaver = Some(consumer(&bootstrap, "g3", "leaver"));
    let survivor = consumer(&bootstrap, "g3", "survivor");
    for c in [leaver.as_ref(), Some(&survivor)].into_iter().flatten() {
        c.subscribe(&["rkg"]).expect("subscribe");
    }
    let mut seen = BTreeSet::new();
    let (mut left, mut died) = (false, false);
    let deadline = Instant::now() + Duration::from_secs(90);
    while seen.len() < count && Instant::now() < deadline {
        for c in [leaver.as_ref(), Some(&survivor)].into_iter().flatten() {
            if let Some(message) = c.poll(Duration::from_millis(50)) {
                seen.insert(record(&message.expect("no consumer error")).2);
            }
        }
        if let Some(m) = &member {
            while let Ok((_, _, value)) = m.lines.try_recv() {
                seen.insert(value);
            }
        }
        if !left && seen.len() > count / 4 {
            // Leaves the group: close (LeaveGroup), then gone.
            let c = leaver.take().expect("the leaver");
            c.commit_consumer_state(CommitMode::Sync).ok();
            c.unsubscribe();
            drop(c);
            left = true;
        }
        if left && !died && seen.len() > count / 2 {
            drop(member.take()); // SIGKILL: no LeaveGroup, no last commit
            died = true;
        }
    }
    assert!(left && died, "a member left and one died");
    assert_eq!(seen.len(), count, "every record at least once");
    // Once the dead member's session has run out the survivor holds all three partitions
    // and reads on from the dead member's last commit to the end; then it commits.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !at_end(&survivor, "rkg", 3) && Instant::now() < deadline {
        // Drain what has arrived before asking again (each ask waits behind a fetch).
        while let Some(message) = survivor.poll(Duration::from_millis(500)) {
            seen.insert(record(&message.expect("no consumer error")).2);
        }
    }
    assert!(
        at_end(&survivor, "rkg", 3),
        "the survivor took over every partition"
    );
    survivor
        .commit_consumer_state(CommitMode::Sync)
        .expect("commit");
    drop(survivor);

    let later: Vec<String> = (count..count + 10).map(|i| format!("v{i}")).collect();
    produce(&bootstrap, "rkg", &later, 1_790_000_100_000);
    let late = consumer(&bootstrap, "g3", "late");
    late.subscribe(&["rkg"]).expect("subscribe");
    let got: BTreeSet<String> = poll_n(&late, 10, Duration::from_secs(30))
        .into_iter()
        .map(|(_, _, v)| v)
        .collect();
    assert_eq!(
        got,
        later.into_iter().collect(),
        "resumed after the commits"
    );
    drop(late);
    drop(node);
    let _ = std::fs::remove_dir_all(&dir);
}
