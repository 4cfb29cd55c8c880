//! The cloud node's fronts over its other storage backends: the in-memory log
//! (`ferry_cloud::log::MemoryLog`, the node started on it with `Node::start_on`) and the log
//! on object storage (`[log] backend = "object"`: SeaweedFS as the S3 server, PostgreSQL for
//! the index, both started by `scripts/test.sh`). On each the node serves MQTT (rumqttc)
//! and Kafka (librdkafka) as it does on the local segment log, so the fronts depend on the
//! `Storage` trait and nothing else. What MQTT clients publish is read by a Kafka consumer;
//! what a Kafka producer sends reaches an MQTT subscriber through the tailer.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_cloud::config::LogBackend;
use ferry_cloud::log::{MemoryLog, ObjectConfig};
use ferry_cloud::meta::Meta;
use ferry_cloud::node::{CloudConfig, Node};
use ferry_cloud::routes::RouteConfig;
use ferry_tests::clients::next_incoming;
use ferry_tests::process::{temp_dir, Edge, ToldToGo};
use ferry_tests::services::object_config;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::{Offset, TopicPartitionList};
use rumqttc::{AsyncClient, Event, Incoming, MqttOptions, QoS};

/// Records the Kafka consumer reads from `topic` (all partitions, from the start) until it
/// has `count` or 30 s have passed: (partition, key, value).
fn consume(
    bootstrap: &str,
    topic: &str,
    partitions: i32,
    count: usize,
) -> Vec<(i32, String, String)> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "memory-test")
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    let mut assignment = TopicPartitionList::new();
    for p in 0..partitions {
        assignment
            .add_partition_offset(topic, p, Offset::Beginning)
            .expect("partition");
    }
    consumer.assign(&assignment).expect("assign");
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut got = Vec::new();
    while got.len() < count && Instant::now() < deadline {
        if let Some(m) = consumer.poll(Duration::from_millis(200)) {
            let m = m.expect("no consumer error");
            let text =
                |b: Option<&[u8]>| String::from_utf8_lossy(b.unwrap_or_default()).into_owned();
            got.push((m.partition(), text(m.key()), text(m.payload())));
        }
    }
    got
}

/// Produces (key, value) pairs to `topic` with an idempotent acks=all producer; returns
/// once all are acknowledged.
fn produce(bootstrap: &str, topic: &str, records: &[(String, String)]) {
    let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .create()
        .expect("producer");
    for (key, value) in records {
        producer
            .send(
                BaseRecord::to(topic)
                    .key(key.as_str())
                    .payload(value.as_str()),
            )
            .map_err(|(e, _)| e)
            .expect("queued");
    }
    producer
        .flush(Duration::from_secs(30))
        .expect("every record acknowledged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_and_kafka_fronts_work_over_the_in_memory_log() {
    fronts_over(Backend::Memory).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_and_kafka_fronts_work_over_the_log_on_s3_and_postgresql() {
    fronts_over(Backend::Object).await;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backend {
    Memory,
    Local,
    Object,
}

async fn fronts_over(backend: Backend) {
    let dir = temp_dir(&format!("cloud-{backend:?}"));
    let mut config = CloudConfig::default();
    config.server.listen = vec!["127.0.0.1:0".parse().expect("addr")];
    config.server.data_dir = dir.clone();
    config.kafka = Some(ferry_cloud::kafka::KafkaConfig {
        listen: "127.0.0.1:0".parse().expect("addr"),
        ..Default::default()
    });
    config.routes = vec![RouteConfig {
        filter: "mem/#".into(),
        stream: "mem".into(),
        partitions: 2,
        partition_key: Default::default(),
    }];
    std::fs::create_dir_all(&dir).expect("data dir");
    let node = match backend {
        Backend::Memory => {
            let meta = Arc::new(Meta::open(&dir.join("meta.redb")).expect("meta"));
            Node::start_on(config, meta, MemoryLog::new(), std::future::pending())
                .await
                .expect("the node starts on the memory log")
        }
        Backend::Local => Node::start(config, std::future::pending())
            .await
            .expect("the node starts on the local log"),
        Backend::Object => {
            config.log.backend = LogBackend::Object;
            config.log.object = Some(object_config("fronts"));
            Node::start(config, std::future::pending())
                .await
                .expect("the node starts on the object log")
        }
    };
    let log = node.log.clone();
    let port = node.mqtt_addrs()[0].port();
    let bootstrap = node.kafka_addr.expect("kafka listener").to_string();

    // An MQTT subscriber, then 100 QoS 1 publishes: delivered through the log, in order.
    let (_sub, mut sub_events) = publish_and_receive("mem", port, port, 100, 4).await;
    // They are in the node's log, and nothing was written to disk as a log.
    let kept: i64 = log
        .streams()
        .iter()
        .filter(|s| s.name == "mem")
        .flat_map(|s| s.partitions.iter().map(|p| p.offsets.high_watermark))
        .sum();
    assert_eq!(kept, 100);
    assert!(!dir.join("log").exists(), "no segment log was opened");

    // A Kafka consumer reads the same 100 records, topic as key.
    let b = bootstrap.clone();
    let consumed = tokio::task::spawn_blocking(move || consume(&b, "mem", 2, 100))
        .await
        .expect("consumer thread");
    assert_eq!(consumed.len(), 100, "{consumed:?}");
    let mut values: Vec<_> = consumed.iter().map(|(_, _, v)| v.clone()).collect();
    values.sort();
    let mut sent: Vec<_> = (0..100).map(|i| format!("m{i}")).collect();
    sent.sort();
    assert_eq!(values, sent);
    assert!(consumed
        .iter()
        .all(|(_, k, v)| k == &format!("mem/{}", v[1..].parse::<u32>().expect("n") % 4)));

    // What a Kafka producer sends (key = topic) reaches the MQTT subscriber.
    let records: Vec<_> = (0..20)
        .map(|i| ("mem/kafka".to_owned(), format!("k{i}")))
        .collect();
    let b = bootstrap.clone();
    let r = records.clone();
    tokio::task::spawn_blocking(move || produce(&b, "mem", &r))
        .await
        .expect("producer thread");
    let mut from_kafka = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while from_kafka.len() < 20 && Instant::now() < deadline {
        if let Ok(Ok(Event::Incoming(Incoming::Publish(p)))) =
            tokio::time::timeout(Duration::from_secs(1), sub_events.poll()).await
        {
            assert_eq!(p.topic, "mem/kafka");
            from_kafka.push(String::from_utf8_lossy(&p.payload).into_owned());
        }
    }
    let expected: Vec<_> = records.into_iter().map(|(_, v)| v).collect();
    assert_eq!(from_kafka, expected);
}

/// A QoS 1 subscriber to `<prefix>/#` on port `sub_port`, then `n` QoS 1 publishes to
/// `<prefix>/<i % topics>` on port `pub_port`: each one received by the subscriber, in order
/// per topic (a topic is one partition under the route's key). Returns the subscriber.
async fn publish_and_receive(
    prefix: &str,
    sub_port: u16,
    pub_port: u16,
    n: usize,
    topics: usize,
) -> (AsyncClient, rumqttc::EventLoop) {
    let (sub, mut sub_events) = AsyncClient::new(
        MqttOptions::new(format!("{prefix}-sub"), "127.0.0.1", sub_port),
        200,
    );
    sub.subscribe(format!("{prefix}/#"), QoS::AtLeastOnce)
        .await
        .expect("subscribe");
    while !matches!(
        next_incoming(&mut sub_events, "SUBACK").await,
        Incoming::SubAck(_)
    ) {}
    let (publisher, mut pub_events) = AsyncClient::new(
        MqttOptions::new(format!("{prefix}-pub"), "127.0.0.1", pub_port),
        200,
    );
    tokio::spawn(async move { while pub_events.poll().await.is_ok() {} });
    for i in 0..n {
        publisher
            .publish(
                format!("{prefix}/{}", i % topics),
                QoS::AtLeastOnce,
                false,
                format!("m{i}"),
            )
            .await
            .expect("publish");
    }
    let mut received = Vec::new();
    while received.len() < n {
        if let Incoming::Publish(p) = next_incoming(&mut sub_events, "a PUBLISH").await {
            received.push((
                p.topic.clone(),
                String::from_utf8_lossy(&p.payload).into_owned(),
            ));
        }
    }
    for topic in 0..topics {
        let got: Vec<_> = received
            .iter()
            .filter(|(t, _)| *t == format!("{prefix}/{topic}"))
            .map(|(_, v)| v.clone())
            .collect();
        let sent: Vec<_> = (0..n)
            .filter(|i| i % topics == topic)
            .map(|i| format!("m{i}"))
            .collect();
        assert_eq!(got, sent, "{prefix}/{topic}");
    }
    (sub, sub_events)
}

/// `[log.object]` and `[log.object.s3]` of `object_config` as TOML.
fn object_toml(c: &ObjectConfig) -> String {
    format!(
        "[log]\nbackend = \"object\"\n[log.object]\nobject_url = {:?}\npostgres_url = {:?}\n\
         flush_ms = {}\n[log.object.s3]\nendpoint = {:?}\nregion = \"us-east-1\"\n\
         access_key_id = {:?}\nsecret_access_key = {:?}\nallow_http = true\n",
        c.object_url,
        c.postgres_url,
        c.flush_ms,
        c.s3.endpoint.clone().unwrap_or_default(),
        c.s3.access_key_id.clone().unwrap_or_default(),
        c.s3.secret_access_key.clone().unwrap_or_default(),
    )
}

/// Every (offset, value) of partition 0 of `topic`, from the start to its end.
fn read_all(bootstrap: &str, topic: &str) -> Vec<(i64, String)> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "kill9-reader")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .create()
        .expect("consumer");
    let mut assignment = TopicPartitionList::new();
    assignment
        .add_partition_offset(topic, 0, Offset::Beginning)
        .expect("partition");
    consumer.assign(&assignment).expect("assign");
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut got = Vec::new();
    while Instant::now() < deadline {
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => got.push((
                m.offset(),
                String::from_utf8_lossy(m.payload().unwrap_or_default()).into_owned(),
            )),
            Some(Err(rdkafka::error::KafkaError::PartitionEOF(_))) => return got,
            Some(Err(e)) => panic!("consumer: {e}"),
            None => {}
        }
    }
    panic!(
        "the end of {topic} not reached in 60 s ({} records)",
        got.len()
    );
}

#[test]
fn kill_9_mid_produce_loses_no_acknowledged_record_on_local_disk() {
    kill_9_mid_produce(Backend::Local);
}

#[test]
fn kill_9_mid_produce_loses_no_acknowledged_record_on_s3_and_postgresql() {
    kill_9_mid_produce(Backend::Object);
}

/// A ferry-cloud process (on the local segment log, or on the object log on SeaweedFS and
/// PostgreSQL) takes an idempotent acks=all
/// flood and is killed with SIGKILL after 2,000 acknowledgements; started again on the same
/// storage, it serves every acknowledged record once, in the order acknowledged, and goes on
/// at the next offset.
fn kill_9_mid_produce(backend: Backend) {
    use rdkafka::producer::{BaseProducer, ProducerContext};
    let name = format!("kill9-{backend:?}").to_lowercase();
    let dir = temp_dir(&name);
    std::fs::create_dir_all(&dir).expect("dir");
    let storage = match backend {
        Backend::Memory | Backend::Local => String::new(),
        Backend::Object => object_toml(&object_config(&name)),
    };
    let config = dir.join("cloud.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = [\"127.0.0.1:0\"]\n[kafka]\nlisten = \"127.0.0.1:0\"\n{storage}"
        ),
    )
    .expect("config");
    let args = ["--config", config.to_str().expect("utf8")];
    let cloud = ferry_tests::process::Edge::cloud_in(&dir.join("data"), &args);
    let bootstrap = cloud.kafka_addr().expect("kafka").to_string();

    /// The values whose delivery report said "stored", with their offsets.
    struct Acks(std::sync::Mutex<Vec<(i64, String)>>);
    impl rdkafka::client::ClientContext for Acks {}
    impl ProducerContext for Acks {
        type DeliveryOpaque = ();
        fn delivery(&self, result: &rdkafka::message::DeliveryResult<'_>, _: Self::DeliveryOpaque) {
            if let Ok(m) = result {
                let v = String::from_utf8_lossy(m.payload().unwrap_or_default()).into_owned();
                self.0.lock().expect("acks").push((m.offset(), v));
            }
        }
    }
    let producer: BaseProducer<Acks> = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "2")
        .set("message.timeout.ms", "5000")
        .create_with_context(Acks(std::sync::Mutex::new(Vec::new())))
        .expect("producer");
    let acked = |p: &BaseProducer<Acks>| p.context().0.lock().expect("acks").len();
    let mut i = 0;
    while acked(&producer) < 2_000 {
        let value = format!("v{i:06}");
        match producer.send(BaseRecord::<str, str>::to("k9").payload(&value)) {
            Ok(()) => i += 1,
            Err(_) => {
                producer.poll(Duration::from_millis(5));
            }
        }
        producer.poll(Duration::ZERO);
    }
    // Killed with appends in flight.
    cloud.kill();
    producer.poll(Duration::from_millis(100));
    let acks: Vec<(i64, String)> = producer.context().0.lock().expect("acks").clone();
    drop(producer);
    assert!(
        acks.len() >= 2_000 && i > acks.len(),
        "sent {i}, acked {}",
        acks.len()
    );

    let cloud = ferry_tests::process::Edge::cloud_in(&dir.join("data"), &args);
    let bootstrap = cloud.kafka_addr().expect("kafka").to_string();
    let log = read_all(&bootstrap, "k9");
    let mut seen = std::collections::HashSet::new();
    assert!(
        log.iter().all(|(_, v)| seen.insert(v.clone())),
        "a record twice in the log"
    );
    for (offset, value) in &acks {
        assert!(
            log.contains(&(*offset, value.clone())),
            "acknowledged {value} at {offset} is not there after the restart"
        );
    }
    let order: Vec<&String> = log.iter().map(|(_, v)| v).collect();
    let mut sorted = order.clone();
    sorted.sort();
    assert_eq!(order, sorted, "in the order sent");
    // And the log goes on after what it kept.
    let after: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .set("acks", "all")
        .create()
        .expect("producer");
    after
        .send(BaseRecord::<str, str>::to("k9").payload("after"))
        .map_err(|(e, _)| e)
        .expect("queued");
    after.flush(Duration::from_secs(30)).expect("acknowledged");
    let log2 = read_all(&bootstrap, "k9");
    assert_eq!(
        log2.last().map(|(o, v)| (*o, v.as_str())),
        Some((log.len() as i64, "after"))
    );
}

/// A node on the object log with `[log.object]` `object` (its name `name`), MQTT and Kafka
/// on free ports, and the route `two/#` → stream `two` (2 partitions).
async fn object_node(name: &str, mut object: ObjectConfig) -> Node {
    let dir = temp_dir(&format!("cloud-two-{name}"));
    std::fs::create_dir_all(&dir).expect("data dir");
    let mut config = CloudConfig::default();
    config.server.listen = vec!["127.0.0.1:0".parse().expect("addr")];
    config.server.data_dir = dir;
    config.kafka = Some(ferry_cloud::kafka::KafkaConfig {
        listen: "127.0.0.1:0".parse().expect("addr"),
        ..Default::default()
    });
    config.routes = vec![RouteConfig {
        filter: "two/#".into(),
        stream: "two".into(),
        partitions: 2,
        partition_key: Default::default(),
    }];
    object.node = Some(name.to_owned());
    config.log.backend = LogBackend::Object;
    config.log.object = Some(object);
    Node::start(config, std::future::pending())
        .await
        .expect("the node starts on the object log")
}

/// Two nodes on one S3 bucket and one database (not a cluster yet: each serves its own
/// clients, Step 10): each registered itself with its fronts' addresses, and sees the
/// other; what is published on one is delivered by the other, because each
/// follows the other's commits (PostgreSQL `LISTEN`). An MQTT subscriber on `b` gets what
/// an MQTT publisher on `a` sent, in order per topic; a Kafka consumer on `a`, already
/// waiting in a long poll, gets what a Kafka producer sent to `b`; the offsets a group
/// committed on `a` are served by `b` (the metadata is in PostgreSQL too).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_on_one_store_and_database_serve_each_others_commits() {
    let object = object_config("two-nodes");
    let a = object_node("a", object.clone()).await;
    let b = object_node("b", object).await;
    // Each registered itself with its fronts' addresses: a sees both.
    let on = a.object.clone().expect("on the object backend");
    let members = tokio::task::spawn_blocking(move || on.members())
        .await
        .expect("task")
        .expect("members");
    let names: Vec<&str> = members.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(names, ["a", "b"]);
    assert_eq!(
        members[1].addrs["mqtt"][0],
        b.mqtt_addrs()[0].to_string(),
        "b's MQTT address as it registered it"
    );

    let (_sub, _sub_events) = publish_and_receive(
        "two",
        b.mqtt_addrs()[0].port(),
        a.mqtt_addrs()[0].port(),
        60,
        3,
    )
    .await;

    // A consumer on a waits at the end of partition 0; a producer on b sends.
    let on_a = a.kafka_addr.expect("kafka on a").to_string();
    let on_b = b.kafka_addr.expect("kafka on b").to_string();
    let waiting = tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &on_a)
            .set("group.id", "two-nodes")
            .set("enable.auto.commit", "false")
            .set("fetch.wait.max.ms", "5000")
            .create()
            .expect("consumer");
        let mut assignment = TopicPartitionList::new();
        assignment
            .add_partition_offset("two", 0, Offset::End)
            .expect("partition");
        consumer.assign(&assignment).expect("assign");
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut got = Vec::new();
        while got.len() < 10 && Instant::now() < deadline {
            if let Some(m) = consumer.poll(Duration::from_millis(200)) {
                let m = m.expect("no consumer error");
                got.push(String::from_utf8_lossy(m.payload().unwrap_or_default()).into_owned());
            }
        }
        consumer
            .commit_consumer_state(rdkafka::consumer::CommitMode::Sync)
            .expect("offsets committed on a");
        let position = consumer.position().expect("position");
        let at = position
            .find_partition("two", 0)
            .expect("partition 0")
            .offset();
        (got, at)
    });
    // Long enough for the consumer to be in its long poll at the end.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let records: Vec<_> = (0..10)
        .map(|i| ("kafka".to_owned(), format!("k{i}")))
        .collect();
    let producer = tokio::task::spawn_blocking(move || {
        let p: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
            .set("bootstrap.servers", &on_b)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .create()
            .expect("producer");
        for (k, v) in &records {
            p.send(BaseRecord::to("two").partition(0).key(k).payload(v))
                .map_err(|(e, _)| e)
                .expect("queued");
        }
        p.flush(Duration::from_secs(30)).expect("acknowledged by b");
    });
    producer.await.expect("producer thread");
    let (got, at) = waiting.await.expect("consumer thread");
    let sent: Vec<_> = (0..10).map(|i| format!("k{i}")).collect();
    assert_eq!(got, sent, "what b took, a served");

    // The group's offsets, committed on a, are in PostgreSQL: b serves them.
    let on_b = b.kafka_addr.expect("kafka on b").to_string();
    let committed = tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &on_b)
            .set("group.id", "two-nodes")
            .create()
            .expect("consumer");
        let mut wanted = TopicPartitionList::new();
        wanted.add_partition("two", 0);
        consumer
            .committed_offsets(wanted, Duration::from_secs(10))
            .expect("committed offsets from b")
            .find_partition("two", 0)
            .expect("partition 0")
            .offset()
    })
    .await
    .expect("thread");
    assert!(matches!(at, Offset::Offset(n) if n > 10), "{at:?}");
    assert_eq!(committed, at, "b knows what was committed on a");
}

/// Two nodes on one store and database are one Kafka cluster to librdkafka: each lists both
/// as brokers (the partitions of `two` led by one each), a producer bootstrapped on one
/// writes to both, and two consumers of one group, bootstrapped on different nodes, find
/// the same coordinator (the node holding the group's lease; the other answers
/// NOT_COORDINATOR for the group), get one partition each and together read every record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_clients_see_two_nodes_as_one_cluster_with_one_coordinator_per_group() {
    let object = object_config("kafka-cluster");
    let a = object_node("ka", object.clone()).await;
    let b = object_node("kb", object).await;
    let on_a = a.kafka_addr.expect("kafka on a").to_string();
    let on_b = b.kafka_addr.expect("kafka on b").to_string();

    let metadata_a = on_a.clone();
    let leaders = tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &metadata_a)
            .create()
            .expect("client");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let m = consumer
                .fetch_metadata(Some("two"), Duration::from_secs(5))
                .expect("metadata");
            if m.brokers().len() == 2 {
                let t = &m.topics()[0];
                return t
                    .partitions()
                    .iter()
                    .map(|p| p.leader())
                    .collect::<Vec<_>>();
            }
            assert!(Instant::now() < deadline, "both nodes listed as brokers");
            std::thread::sleep(Duration::from_millis(200));
        }
    })
    .await
    .expect("task");
    assert_eq!(leaders.len(), 2);
    assert_ne!(leaders[0], leaders[1], "one partition led by each node");

    let records: Vec<(String, String)> = (0..200)
        .map(|i| (format!("k{i}"), format!("v{i}")))
        .collect();
    let sent = records.clone();
    let produce_on = on_a.clone();
    tokio::task::spawn_blocking(move || produce(&produce_on, "two", &sent))
        .await
        .expect("produce");

    // Two members of one group, one bootstrapped on each node.
    let member = |bootstrap: String| {
        std::thread::spawn(move || {
            let consumer: BaseConsumer = ClientConfig::new()
                .set("bootstrap.servers", &bootstrap)
                .set("group.id", "spread")
                .set("auto.offset.reset", "earliest")
                .set("session.timeout.ms", "10000")
                .create()
                .expect("consumer");
            consumer.subscribe(&["two"]).expect("subscribe");
            let mut got = Vec::new();
            let deadline = Instant::now() + Duration::from_secs(60);
            // Until the group has settled on one partition each and both are read out.
            let mut quiet_since = Instant::now();
            while Instant::now() < deadline {
                match consumer.poll(Duration::from_millis(200)) {
                    Some(Ok(m)) => {
                        got.push(
                            String::from_utf8_lossy(m.payload().unwrap_or_default()).into_owned(),
                        );
                        quiet_since = Instant::now();
                    }
                    Some(Err(e)) => panic!("consumer: {e}"),
                    None => {}
                }
                let assigned = consumer.assignment().map_or(0, |a| a.count());
                if assigned == 1
                    && !got.is_empty()
                    && quiet_since.elapsed() > Duration::from_secs(3)
                {
                    return (assigned, got);
                }
            }
            (consumer.assignment().map_or(0, |a| a.count()), got)
        })
    };
    let (one, two) = (member(on_a), member(on_b));
    let (one, two) = (
        one.join().expect("member on a"),
        two.join().expect("member on b"),
    );
    assert_eq!(
        (one.0, two.0),
        (1, 1),
        "one partition each: one group, one coordinator"
    );
    // (A member that read before the other joined may have handed over a partition it read
    // but had not committed yet: a group delivers at least once across a rebalance.)
    let mut got: Vec<String> = one.1.into_iter().chain(two.1).collect();
    got.sort();
    got.dedup();
    let mut expected: Vec<String> = records.into_iter().map(|(_, v)| v).collect();
    expected.sort();
    assert_eq!(got, expected, "every record");
    // The group's coordinator holds its lease.
    let on = a.object.clone().expect("on the object backend");
    let holder = tokio::task::spawn_blocking(move || on.lease_holder("kafka-group", "spread"))
        .await
        .expect("task")
        .expect("lease")
        .expect("the group's lease is held");
    assert!(["ka", "kb"].contains(&holder.owner.as_str()), "{holder:?}");
    drop((a, b));
}

/// A ferry-cloud process in `dir`, node `name` of the cluster on `object`, with the tables
/// of `config` (its listeners) and the object backend's.
fn cluster_node(dir: &std::path::Path, object: &ObjectConfig, name: &str, config: &str) -> Edge {
    std::fs::create_dir_all(dir).expect("data dir");
    let file = dir.join("cloud.toml");
    let log = object_toml(object).replace(
        "[log.object]\n",
        &format!("[log.object]\nnode = \"{name}\"\n"),
    );
    std::fs::write(&file, format!("{config}{log}")).expect("write");
    Edge::cloud_in(dir, &["--config", file.to_str().expect("utf8")])
}

/// A ferry-cloud process, node `name` of the cluster on `object`, serving MQTT only.
fn mqtt_cluster_node(test: &str, object: &ObjectConfig, name: &str) -> Edge {
    let dir = temp_dir(&format!("cloud-{test}-{name}"));
    cluster_node(&dir, object, name, "[server]\nlisten = [\"127.0.0.1:0\"]\n")
}

/// SIGTERM drains a node of a cluster: its MQTT 5 clients are sent to another live node
/// (DISCONNECT 0x9C, Use another server, with that node's MQTT address as the Server
/// Reference), and it leaves the nodes at once.
#[test]
fn a_draining_node_sends_its_mqtt5_clients_to_another_node() {
    let object = object_config("drain");
    let a = mqtt_cluster_node("drain", &object, "a");
    let b = mqtt_cluster_node("drain", &object, "b");
    let client = ToldToGo::connect(a.port());
    assert!(a.terminate().success());
    assert_eq!(
        client.told(),
        (0x9C, format!("127.0.0.1:{}", b.port())),
        "sent to b"
    );
    assert!(b.terminate().success());
}

/// The state of `edge` on the fleet view of `node` ("linked", "offline", ... or "" when the
/// node does not know it or does not answer).
fn fleet_state(node: &Edge, edge: &str) -> String {
    let answer = node.http_get(&format!("/api/fleet/{edge}"));
    answer
        .split("\r\n\r\n")
        .nth(1)
        .and_then(|b| serde_json::from_str::<serde_json::Value>(b).ok())
        .and_then(|v| v["state"].as_str().map(str::to_owned))
        .unwrap_or_default()
}

/// The owner of `edge`'s link lease as `/api/cluster` of `node` shows it ("" if none).
fn link_owner(node: &Edge, edge: &str) -> String {
    let answer = node.http_get("/api/cluster");
    let cluster: serde_json::Value = answer
        .split("\r\n\r\n")
        .nth(1)
        .and_then(|b| serde_json::from_str(b).ok())
        .unwrap_or_default();
    cluster["leases"]
        .as_array()
        .and_then(|l| {
            l.iter()
                .find(|x| x["kind"] == "edge-link" && x["key"] == edge)
        })
        .and_then(|x| x["owner"].as_str().map(str::to_owned))
        .unwrap_or_default()
}

/// Two ferry-cloud nodes on SeaweedFS and PostgreSQL, and an edge that knows both: it links
/// to one (one link in the whole cluster: the other refuses it while its lease is held);
/// that node is killed with SIGKILL while a sensor publishes on the edge, and the edge moves
/// to the other node, where a subscriber gets every message once, in order — what the dead
/// node appended and had not committed included. The failover time is printed. Before
/// that, a command published on the node the edge is not linked to reaches it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_moves_to_another_node_when_its_node_dies_and_nothing_is_doubled() {
    let site = ferry_tests::site::Site::new("cluster-link", "");
    let object = object_config("cluster-link");
    let base = std::fs::read_to_string(&site.cloud_config).expect("the cloud's config");
    let ports = [site.link_port, ferry_tests::process::free_udp_port()];
    let start = |i: usize| {
        let name = ["a", "b"][i];
        let link = base.replace(
            &format!("listen = \"127.0.0.1:{}\"", site.link_port),
            &format!("listen = \"127.0.0.1:{}\"", ports[i]),
        );
        cluster_node(&site.dir.join(format!("node-{name}")), &object, name, &link)
    };
    let a = start(0);
    let b = start(1);
    let edge_config = std::fs::read_to_string(&site.edge_config).expect("the edge's config");
    let edge_config = edge_config.replace(
        &format!("cloud = \"127.0.0.1:{}\"", site.link_port),
        &format!(
            "cloud = [\"127.0.0.1:{}\", \"127.0.0.1:{}\"]",
            ports[0], ports[1]
        ),
    );
    std::fs::write(&site.edge_config, edge_config).expect("write");
    let watcher = ferry_tests::process::Subscription::open(
        &b.port().to_string(),
        "watcher",
        "gw-1/sensors/#",
        &[],
    );
    let edge = site.edge();
    ferry_tests::process::wait_until(60, "the edge is linked to a", || {
        fleet_state(&a, "gw-1") == "linked"
    });
    let sensor = ferry_tests::clients::Sensor::start(edge.port());
    ferry_tests::process::wait_until(60, "a took some of the sensor's messages", || {
        edge.metric("ferry_edge_link_records_acked_total") >= 200
    });
    assert_ne!(fleet_state(&b, "gw-1"), "linked", "one link in the cluster");
    assert_eq!(
        link_owner(&b, "gw-1"),
        "a",
        "/api/cluster names the lease's owner"
    );
    // A command published on b goes down through a, where the edge is linked.
    let valve = ferry_tests::process::Subscription::open(
        &edge.port().to_string(),
        "valve-app",
        "valve/#",
        &[],
    );
    let out = ferry_tests::process::mosquitto_at(
        "mosquitto_pub",
        &b.port().to_string(),
        &["-t", "$edge/gw-1/valve/set", "-q", "1", "-m", "open"],
    );
    assert!(out.status.success(), "{out:?}");
    let got = valve.read(1);
    assert_eq!(String::from_utf8_lossy(&got.stdout), "open\n", "{got:?}");

    a.kill();
    let killed = Instant::now();
    ferry_tests::process::wait_until(90, "the edge is linked to b", || {
        fleet_state(&b, "gw-1") == "linked"
    });
    let moved = killed.elapsed();
    assert_eq!(
        link_owner(&b, "gw-1"),
        "b",
        "b holds the edge's link lease now"
    );
    eprintln!("failover: the edge linked to b {moved:?} after a was killed");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let sent = sensor.stop().await;
    ferry_tests::process::wait_until(60, "the outbox is emptied through b", || {
        edge.metric("ferry_edge_outbox_records") == 0
    });
    let out = watcher.read(sent);
    let got: Vec<usize> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.parse().expect("a number"))
        .collect();
    assert_eq!(got, (0..sent).collect::<Vec<_>>(), "each once, in order");
    // Nothing more after them: no message twice.
    let more = ferry_tests::process::mosquitto_at(
        "mosquitto_sub",
        &b.port().to_string(),
        &[
            "-i",
            "watcher",
            "-c",
            "-q",
            "1",
            "-t",
            "gw-1/sensors/#",
            "-C",
            "1",
            "-W",
            "3",
        ],
    );
    assert!(
        more.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&more.stdout)
    );
    drop(edge);
    assert!(b.terminate().success());
}

/// An MQTT 5 client `id` on `port` with a persistent session (expiry 1 h, clean start 0)
/// and a will on `two/wills/<id>`, subscribed to `two/news`; returns once its CONNACK and
/// SUBACK came, with its session present flag.
async fn session_client(
    id: &str,
    port: u16,
) -> (rumqttc::v5::AsyncClient, rumqttc::v5::EventLoop, bool) {
    use rumqttc::v5::mqttbytes::v5::{LastWill, Packet};
    use rumqttc::v5::mqttbytes::QoS as Q5;
    use rumqttc::v5::{AsyncClient, Event, MqttOptions};
    let mut opts = MqttOptions::new(id, "127.0.0.1", port);
    opts.set_clean_start(false);
    opts.set_session_expiry_interval(Some(3600));
    opts.set_last_will(LastWill::new(
        format!("two/wills/{id}"),
        "gone",
        Q5::AtLeastOnce,
        false,
        None,
    ));
    let (client, mut events) = AsyncClient::new(opts, 10);
    client
        .subscribe("two/news", Q5::AtLeastOnce)
        .await
        .expect("subscribe queued");
    let mut present = None;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, events.poll()).await {
            Ok(Ok(Event::Incoming(Packet::ConnAck(ack)))) => present = Some(ack.session_present),
            Ok(Ok(Event::Incoming(Packet::SubAck(_)))) => break,
            Ok(Ok(_)) => {}
            Ok(Err(e)) => panic!("{id} on {port}: {e}"),
            Err(_) => panic!("{id} on {port}: no CONNACK and SUBACK"),
        }
    }
    (client, events, present.expect("CONNACK before SUBACK"))
}

/// The persistent sessions `node` holds, by client id.
async fn persistent_ids(node: &Node) -> Vec<String> {
    let mut ids: Vec<String> = node
        .mqtt
        .persistent_sessions()
        .await
        .expect("the broker answers")
        .into_iter()
        .map(|s| s.client_id)
        .collect();
    ids.sort();
    ids
}

/// A client id is served by one node of a cluster: when client `dev` (paho-mqtt, MQTT 5, a
/// persistent session with a will) connects to `b` while its session is on `a`, `a` closes
/// its connection with DISCONNECT 0x8E (Session taken over), publishes its will (no delay)
/// and drops the session; `b` keeps the new connection. Coming back to `a` (rumqttc) takes
/// it from `b` the same way: the newest claim wins, and the session comes along: `a`
/// answers session present 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_id_connected_on_another_node_takes_its_session_over() {
    let object = object_config("mqtt-takeover");
    let a = object_node("a", object.clone()).await;
    let b = object_node("b", object).await;
    let (a_port, b_port) = (a.mqtt_addrs()[0].port(), b.mqtt_addrs()[0].port());

    // A watcher of the wills, on b.
    let mut opts = MqttOptions::new("watcher", "127.0.0.1", b_port);
    opts.set_clean_session(true);
    let (watcher, mut wills) = AsyncClient::new(opts, 10);
    watcher
        .subscribe("two/wills/#", QoS::AtLeastOnce)
        .await
        .expect("subscribe queued");
    while !matches!(
        next_incoming(&mut wills, "the watcher's SUBACK").await,
        Incoming::SubAck(_)
    ) {}

    let first =
        tokio::task::spawn_blocking(move || ToldToGo::connect_as(a_port, "dev", "two/wills/dev"))
            .await
            .expect("paho on a");
    assert_eq!(persistent_ids(&a).await, ["dev"]);
    let mut second =
        tokio::task::spawn_blocking(move || ToldToGo::connect_as(b_port, "dev", "two/wills/dev"))
            .await
            .expect("paho on b");
    let told = tokio::task::spawn_blocking(move || first.told())
        .await
        .expect("paho on a");
    assert_eq!(
        told,
        (0x8E, "-".to_owned()),
        "a closes its connection of dev: Session taken over"
    );
    let will = loop {
        match next_incoming(&mut wills, "dev's will").await {
            Incoming::Publish(p) => break p,
            _ => continue,
        }
    };
    assert_eq!(
        (&will.topic[..], &will.payload[..]),
        ("two/wills/dev", &b"gone"[..])
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while !persistent_ids(&a).await.is_empty() {
        assert!(Instant::now() < deadline, "a still holds dev's session");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(second.connected(), "b keeps the newest connection");
    assert_eq!(persistent_ids(&b).await, ["dev"]);

    let (_third, _on_a, present) = session_client("dev", a_port).await;
    assert!(present, "the session moves back to a with the client");
    let told = tokio::task::spawn_blocking(move || second.told())
        .await
        .expect("paho on b");
    assert_eq!(told, (0x8E, "-".to_owned()), "back on a: b lets go");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !persistent_ids(&b).await.is_empty() {
        assert!(Instant::now() < deadline, "b still holds dev's session");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(persistent_ids(&a).await, ["dev"]);
}

/// The next PUBLISH `events` receives within 20 s: its payload and DUP flag.
async fn next_publish_v5(events: &mut rumqttc::v5::EventLoop, what: &str) -> (String, bool) {
    use rumqttc::v5::mqttbytes::v5::Packet;
    use rumqttc::v5::Event;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, events.poll()).await {
            Ok(Ok(Event::Incoming(Packet::Publish(p)))) => {
                return (String::from_utf8_lossy(&p.payload).into_owned(), p.dup)
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => panic!("{what}: {e}"),
            Err(_) => panic!("{what}: nothing within 20 s"),
        }
    }
}

/// A persistent session outlives its node: client `dev` (rumqttc, MQTT 5, session expiry
/// 1 h) subscribes on `a`, gets and acknowledges `one`, gets `two` and does not acknowledge
/// it; `a` is killed with SIGKILL and `three` is published meanwhile. When `dev` connects to
/// `b` it finds its session there (session present 1): `two` again, under its packet id
/// with DUP, then `three`, and not `one`, which it had acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_persistent_session_resumes_on_another_node_after_its_node_died() {
    use ferry_tests::process::mosquitto_at;
    let object = object_config("resume");
    let a = mqtt_cluster_node("resume", &object, "a");
    let b = mqtt_cluster_node("resume", &object, "b");
    let (a_port, b_port) = (a.port(), b.port());
    let publish = move |payload: &'static str| {
        let out = mosquitto_at(
            "mosquitto_pub",
            &b_port.to_string(),
            &["-t", "two/news", "-m", payload, "-q", "1"],
        );
        assert!(out.status.success(), "{out:?}");
    };
    let (_first, mut on_a, present) = session_client("dev", a_port).await;
    assert!(!present, "a new session");
    tokio::task::spawn_blocking(move || publish("one"))
        .await
        .expect("published");
    assert_eq!(next_publish_v5(&mut on_a, "one on a").await.0, "one");
    // Polled again only to send the PUBACK of `one`.
    let _ = tokio::time::timeout(Duration::from_millis(500), on_a.poll()).await;
    // `two` reaches dev's socket, and the client, not polled, never acknowledges it.
    tokio::task::spawn_blocking(move || publish("two"))
        .await
        .expect("published");
    // The session's state is recorded about once a second.
    tokio::time::sleep(Duration::from_secs(3)).await;
    a.kill();
    tokio::task::spawn_blocking(move || publish("three"))
        .await
        .expect("published");
    drop(on_a);

    let resumed_at = Instant::now();
    let (_second, mut on_b, present) = {
        use rumqttc::v5::mqttbytes::v5::Packet;
        use rumqttc::v5::{AsyncClient, Event, MqttOptions};
        let mut opts = MqttOptions::new("dev", "127.0.0.1", b_port);
        opts.set_clean_start(false);
        opts.set_session_expiry_interval(Some(3600));
        let (client, mut events) = AsyncClient::new(opts, 10);
        let present = loop {
            match tokio::time::timeout(Duration::from_secs(20), events.poll()).await {
                Ok(Ok(Event::Incoming(Packet::ConnAck(ack)))) => break ack.session_present,
                Ok(Ok(_)) => {}
                Ok(Err(e)) => panic!("dev on b: {e}"),
                Err(_) => panic!("dev on b: no CONNACK"),
            }
        };
        (client, events, present)
    };
    println!(
        "the session resumed on b {:?} after the client connected",
        resumed_at.elapsed()
    );
    assert!(present, "the session of a dead node resumes on b");
    let (two, dup) = next_publish_v5(&mut on_b, "two on b").await;
    assert_eq!(
        (two.as_str(), dup),
        ("two", true),
        "in flight on a: sent again with DUP"
    );
    let (three, dup) = next_publish_v5(&mut on_b, "three on b").await;
    assert_eq!((three.as_str(), dup), ("three", false));
    // Nothing else: not `one`, not a second `two` or `three`.
    let marker = tokio::task::spawn_blocking(move || {
        let out = mosquitto_at(
            "mosquitto_pub",
            &b_port.to_string(),
            &["-t", "two/news", "-m", "end", "-q", "1"],
        );
        assert!(out.status.success(), "{out:?}");
    });
    marker.await.expect("published");
    assert_eq!(next_publish_v5(&mut on_b, "the marker").await.0, "end");
    assert!(b.terminate().success());
}

/// A will outlives its node: client `dev` (paho-mqtt, a will on `wills/dev`) is connected to
/// `a` when `a` is killed with SIGKILL; `b` publishes the will once `a`'s lease ran out, and
/// a subscriber on `b` gets it. A client that left `a` with a DISCONNECT before (its will
/// dropped) leaves none.
#[test]
fn a_dead_nodes_connections_leave_their_wills_to_another_node() {
    use ferry_tests::process::{mosquitto_at, Subscription};
    let object = object_config("wills");
    let a = mqtt_cluster_node("wills", &object, "a");
    let b = mqtt_cluster_node("wills", &object, "b");
    let (a_port, b_port) = (a.port().to_string(), b.port().to_string());
    let watcher = Subscription::open(&b_port, "watcher", "wills/#", &["-v"]);
    let quiet = mosquitto_at(
        "mosquitto_pub",
        &a_port,
        &[
            "-i",
            "quiet",
            "--will-topic",
            "wills/quiet",
            "--will-payload",
            "gone",
            "-t",
            "hello",
            "-m",
            "hi",
            "-q",
            "1",
        ],
    );
    assert!(quiet.status.success(), "{quiet:?}");
    let dev = ToldToGo::connect_as(a.port(), "dev", "wills/dev");
    // The claim and the will are recorded a moment after the CONNACK.
    std::thread::sleep(Duration::from_secs(1));
    a.kill();
    let killed = Instant::now();
    let out = watcher.read(1);
    println!(
        "the will of a connection on a SIGKILLed node came {:?} later",
        killed.elapsed()
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "wills/dev gone\n");
    let marker = mosquitto_at(
        "mosquitto_pub",
        &b_port,
        &["-t", "wills/marker", "-m", "end", "-q", "1"],
    );
    assert!(marker.status.success(), "{marker:?}");
    let out = watcher.read(1);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "wills/marker end\n",
        "no will from the client that disconnected"
    );
    drop(dev);
    assert!(b.terminate().success());
}

/// Retained messages are the cluster's: a node started after a retained message was
/// published on another one (its log read from the end on, so it never delivers that
/// message itself) gives it to a subscriber, and not one whose topic was cleared since.
#[test]
fn a_node_started_later_has_the_retained_messages_of_the_cluster() {
    use ferry_tests::process::mosquitto_at;
    let object = object_config("retained");
    let a = mqtt_cluster_node("retained", &object, "a");
    let a_port = a.port().to_string();
    for (topic, payload) in [("state/x", "on"), ("state/y", "on"), ("state/y", "")] {
        let out = mosquitto_at(
            "mosquitto_pub",
            &a_port,
            &["-t", topic, "-m", payload, "-r", "-q", "1"],
        );
        assert!(out.status.success(), "{out:?}");
    }
    // a delivers them from the log and records them a moment later.
    std::thread::sleep(Duration::from_secs(2));
    let c = mqtt_cluster_node("retained", &object, "c");
    let out = mosquitto_at(
        "mosquitto_sub",
        &c.port().to_string(),
        &["-t", "state/#", "-v", "-C", "2", "-W", "5"],
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "state/x on\n",
        "state/x retained, state/y cleared"
    );
    assert!(a.terminate().success());
    assert!(c.terminate().success());
}

/// While no session subscribes to anything, the MQTT front passes over what is not retained
/// (it would be routed to no one) but still keeps what is: a subscriber that comes later gets
/// the retained message and not the other, then everything published after its SUBACK.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_no_subscriber_the_front_still_keeps_retained_messages() {
    use ferry_tests::process::mosquitto_at;
    let dir = temp_dir("cloud-unsubscribed");
    let mut config = CloudConfig::default();
    config.server.listen = vec!["127.0.0.1:0".parse().expect("addr")];
    config.server.data_dir = dir.clone();
    std::fs::create_dir_all(&dir).expect("data dir");
    let meta = Arc::new(Meta::open(&dir.join("meta.redb")).expect("meta"));
    let node = Node::start_on(config, meta, MemoryLog::new(), std::future::pending())
        .await
        .expect("the node starts on the memory log");
    let port = node.mqtt_addrs()[0].port().to_string();
    for (topic, payload, retain) in [("state/x", "on", true), ("live/x", "early", false)] {
        let mut args = vec!["-t", topic, "-m", payload, "-q", "1"];
        if retain {
            args.push("-r");
        }
        let out = mosquitto_at("mosquitto_pub", &port, &args);
        assert!(out.status.success(), "{out:?}");
    }
    // Both are in the log (and delivered to no one) before anyone subscribes.
    let deadline = Instant::now() + Duration::from_secs(10);
    while node.log.offsets("mqtt", 0).expect("offsets").high_watermark < 2 {
        assert!(
            Instant::now() < deadline,
            "the publishes are not in the log"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (sub, mut events) = AsyncClient::new(
        MqttOptions::new("late", "127.0.0.1", node.mqtt_addrs()[0].port()),
        10,
    );
    sub.subscribe("#", QoS::AtLeastOnce)
        .await
        .expect("subscribe");
    let mut got = Vec::new();
    loop {
        match next_incoming(&mut events, "the retained message").await {
            Incoming::Publish(p) => {
                got.push((p.topic.clone(), p.retain));
                break;
            }
            _ => continue,
        }
    }
    let out = mosquitto_at(
        "mosquitto_pub",
        &port,
        &["-t", "live/y", "-m", "late", "-q", "1"],
    );
    assert!(out.status.success(), "{out:?}");
    loop {
        if let Incoming::Publish(p) = next_incoming(&mut events, "what came after").await {
            got.push((p.topic.clone(), p.retain));
            break;
        }
    }
    assert_eq!(
        got,
        [("state/x".to_owned(), true), ("live/y".to_owned(), false)],
        "the retained message, then what was published after the SUBACK; not live/x"
    );
}
