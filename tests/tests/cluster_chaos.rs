//! The chaos test of a three-node cluster (Step 10): real ferry-cloud processes on one
//! SeaweedFS and one PostgreSQL (`scripts/test.sh` starts them), each node reaching both
//! through forwarders of its own that the test cuts ([`ferry_tests::tcp_cut::TcpCut`]).
//!
//! Load, all the while: two edges linked over QUIC (each with a sensor publishing numbered
//! QoS 1 messages), an idempotent Kafka producer (librdkafka), an MQTT publisher (rumqttc,
//! QoS 1) and an AMQP publisher with confirms (lapin), the last two moving to the next node
//! when theirs stops answering; a consumer group of two librdkafka consumers reading the
//! Kafka topic throughout, committing every second.
//! Faults, on a schedule drawn from a seed: a node killed with SIGKILL every few seconds and
//! started again, one node cut from PostgreSQL for 10 s, the object store cut from every
//! node for 30 s. `FERRY_CHAOS_SEED` replays a run (the seed is printed).
//!
//! Every acknowledgement is recorded, and at the end, with every node up, a checker reads
//! the log back and verifies: each edge's messages there exactly once and in order; each
//! acknowledged Kafka record at the offset it was acknowledged with (so no offset was given
//! twice), the offsets without gaps, each record once and in order per key, none given up
//! by the producer; the group read every record and committed the end of each partition;
//! each acknowledged MQTT and AMQP message there
//! at least once, first copies in the order sent; each edge linked through
//! one node; an MQTT subscriber with a persistent session, moving to the next node when
//! its node dies, got every acknowledged MQTT message.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_tests::process::{free_tcp_port, free_udp_port, temp_dir, wait_until, Edge};
use ferry_tests::services::need;
use ferry_tests::tcp_cut::TcpCut;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer, ProducerContext};
use rdkafka::{Offset, TopicPartitionList};

/// The Kafka topic the producer writes to (partitions from `[log.streams]`).
const TOPIC: &str = "chaos-k";
const PARTITIONS: i32 = 3;

/// A small deterministic generator (xorshift64*), so a seed replays the schedule.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n
    }
}

/// One node: its ports, its forwarders to PostgreSQL and S3, its process when running.
struct ChaosNode {
    name: &'static str,
    dir: PathBuf,
    config: PathBuf,
    mqtt: u16,
    kafka: u16,
    amqp: u16,
    link: u16,
    admin: u16,
    pg: TcpCut,
    s3: TcpCut,
    process: Option<Edge>,
}

impl ChaosNode {
    fn start(&mut self) {
        let config = self.config.to_str().expect("utf8").to_owned();
        let mut node = Edge::cloud_in(&self.dir, &["--config", &config]);
        keep_log(&self.dir.join("node.log"), &mut node);
        self.process = Some(node);
    }

    fn kill(&mut self) {
        if let Some(p) = self.process.take() {
            p.kill();
        }
    }

    fn running(&self) -> &Edge {
        self.process.as_ref().expect("the node runs")
    }
}

/// What `p` logs from now on goes to the end of `file`, as it comes (read it after a
/// failure).
fn keep_log(file: &Path, p: &mut Edge) {
    use std::io::Write;
    let lines = std::mem::replace(&mut p.log, std::sync::mpsc::channel().1);
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(file)
        .expect("log file");
    std::thread::spawn(move || {
        for line in lines {
            let _ = writeln!(f, "{line}");
        }
    });
}

/// The port of `host=… port=N …` (a libpq string) or of `http://host:N`.
fn port_of(service: &str) -> u16 {
    let digits: String = match service.split_once("port=") {
        Some((_, rest)) => rest.chars().take_while(char::is_ascii_digit).collect(),
        None => service
            .rsplit(':')
            .next()
            .unwrap_or_default()
            .chars()
            .take_while(char::is_ascii_digit)
            .collect(),
    };
    digits.parse().expect("a port")
}

/// The three nodes' configurations, on one bucket prefix and one database, each through
/// forwarders of its own.
fn nodes(dir: &Path, pki: &Path) -> Vec<ChaosNode> {
    let pg_server = need("FERRY_TEST_PG");
    let database = ferry_cloud::log::object_testing::database("chaos");
    let s3 = need("FERRY_TEST_S3_ENDPOINT");
    let pg_addr = SocketAddr::from(([127, 0, 0, 1], port_of(&pg_server)));
    let s3_addr = SocketAddr::from(([127, 0, 0, 1], port_of(&s3)));
    let prefix = format!(
        "chaos-{}-{}",
        std::process::id(),
        ferry_cloud::log::now_ms()
    );
    let p = |rel: &str| pki.join(rel).display().to_string();
    ["a", "b", "c"]
        .into_iter()
        .map(|name| {
            let pg = TcpCut::start_apart(pg_addr);
            let s3 = TcpCut::start_apart(s3_addr);
            let (mqtt, kafka, amqp, admin) = (
                free_tcp_port(),
                free_tcp_port(),
                free_tcp_port(),
                free_tcp_port(),
            );
            let link = free_udp_port();
            let dir = dir.join(format!("node-{name}"));
            std::fs::create_dir_all(&dir).expect("dir");
            let postgres = database.replace(
                &format!("port={}", pg_addr.port()),
                &format!("port={}", pg.addr.port()),
            );
            let text = format!(
                "[server]\nlisten = [\"127.0.0.1:{mqtt}\"]\n[admin]\nlisten = \"127.0.0.1:{admin}\"\n\
                 [kafka]\nlisten = \"127.0.0.1:{kafka}\"\n[amqp]\nlisten = \"127.0.0.1:{amqp}\"\n\
                 [link]\nlisten = \"127.0.0.1:{link}\"\nca_file = \"{}\"\ncert_file = \"{}\"\n\
                 key_file = \"{}\"\n\
                 [log]\nbackend = \"object\"\n[log.streams]\npartitions = {PARTITIONS}\n\
                 [log.object]\nnode = \"{name}\"\nobject_url = \"s3://{}/{prefix}\"\n\
                 postgres_url = {postgres:?}\nflush_ms = 10\n\
                 [log.object.s3]\nendpoint = \"http://{}\"\nregion = \"us-east-1\"\n\
                 access_key_id = {:?}\nsecret_access_key = {:?}\nallow_http = true\n",
                p("ca.crt"),
                p("nodes/localhost.crt"),
                p("nodes/localhost.key"),
                need("FERRY_TEST_S3_BUCKET"),
                s3.addr,
                need("FERRY_TEST_S3_KEY"),
                need("FERRY_TEST_S3_SECRET"),
            );
            let config = dir.join("cloud.toml");
            std::fs::write(&config, text).expect("write");
            ChaosNode {
                name,
                dir,
                config,
                admin,
                mqtt,
                kafka,
                amqp,
                link,
                pg,
                s3,
                process: None,
            }
        })
        .collect()
}

/// An edge `id` that knows every node's link address.
fn edge(dir: &Path, pki: &Path, id: &str, links: &[u16]) -> Edge {
    let p = |rel: &str| pki.join(rel).display().to_string();
    let clouds: Vec<String> = links.iter().map(|l| format!("\"127.0.0.1:{l}\"")).collect();
    let config = dir.join(format!("{id}.toml"));
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = [\"127.0.0.1:0\"]\nmetrics_listen = \"127.0.0.1:0\"\n\
             [uplink]\ncloud = [{}]\nserver_name = \"localhost\"\n\
             ca_file = \"{}\"\ncert_file = \"{}\"\nkey_file = \"{}\"\n\
             reconnect_max_secs = 1\nidle_timeout_secs = 5\n\
             [[uplink.route]]\nfilter = \"sensors/#\"\n",
            clouds.join(", "),
            p("ca.crt"),
            p(&format!("edges/{id}.crt")),
            p(&format!("edges/{id}.key")),
        ),
    )
    .expect("write");
    Edge::start_in(&dir.join(id), &["--config", config.to_str().expect("utf8")])
}

/// What a publisher that moves between nodes had acknowledged: the numbers, in order.
type Acked = Arc<Mutex<Vec<u64>>>;

/// Publishes `m-<i>` to `chaos/m` with QoS 1, one at a time, until `stop`: a message is
/// acknowledged by its PUBACK; when a node does not answer within 10 s the publisher moves
/// to the next and sends the same message again.
async fn mqtt_publisher(ports: Vec<u16>, stop: Arc<AtomicBool>, acked: Acked) {
    use rumqttc::{AsyncClient, Event, Incoming, MqttOptions, QoS};
    let mut i = 0u64;
    let mut node = 0;
    while !stop.load(Ordering::SeqCst) {
        let mut options = MqttOptions::new("chaos-mqtt", "127.0.0.1", ports[node % ports.len()]);
        options.set_keep_alive(Duration::from_secs(5));
        let (client, mut events) = AsyncClient::new(options, 10);
        let published = async {
            let connected = async {
                loop {
                    if let Event::Incoming(Incoming::ConnAck(_)) = events.poll().await? {
                        return Ok::<(), rumqttc::ConnectionError>(());
                    }
                }
            };
            tokio::time::timeout(Duration::from_secs(10), connected)
                .await
                .map_err(|_| rumqttc::ConnectionError::Io(std::io::Error::other("no CONNACK")))??;
            while !stop.load(Ordering::SeqCst) {
                client
                    .publish("chaos/m", QoS::AtLeastOnce, false, format!("m-{i}"))
                    .await
                    .map_err(|e| rumqttc::ConnectionError::Io(std::io::Error::other(e)))?;
                loop {
                    let event = tokio::time::timeout(Duration::from_secs(10), events.poll())
                        .await
                        .map_err(|_| {
                            rumqttc::ConnectionError::Io(std::io::Error::other("no PUBACK"))
                        })??;
                    if let Event::Incoming(Incoming::PubAck(_)) = event {
                        break;
                    }
                }
                acked.lock().expect("acked").push(i);
                i += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Ok::<(), rumqttc::ConnectionError>(())
        };
        if published.await.is_err() {
            node += 1;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// Subscribes to `chaos/m` with QoS 1 in a persistent session (client id `chaos-msub`,
/// clean session 0) and records the number of every message received, acknowledging each
/// (rumqttc does), until `finish`. When its node's connection fails it connects to the next
/// node with the same session, which moves there with everything it had not acknowledged.
async fn mqtt_session_subscriber(ports: Vec<u16>, finish: Arc<AtomicBool>, got: Acked) {
    use rumqttc::{AsyncClient, Event, Incoming, MqttOptions, QoS};
    let mut node = 0;
    while !finish.load(Ordering::SeqCst) {
        let mut options = MqttOptions::new("chaos-msub", "127.0.0.1", ports[node % ports.len()]);
        options.set_keep_alive(Duration::from_secs(5));
        options.set_clean_session(false);
        let (client, mut events) = AsyncClient::new(options, 10);
        let received = async {
            while !finish.load(Ordering::SeqCst) {
                let event = match tokio::time::timeout(Duration::from_secs(1), events.poll()).await
                {
                    Err(_) => continue,
                    Ok(event) => event?,
                };
                match event {
                    Event::Incoming(Incoming::ConnAck(ack)) => {
                        eprintln!(
                            "mqtt session: connected to {} (session present {})",
                            ports[node % ports.len()],
                            ack.session_present
                        );
                        client
                            .subscribe("chaos/m", QoS::AtLeastOnce)
                            .await
                            .map_err(|e| rumqttc::ConnectionError::Io(std::io::Error::other(e)))?
                    }
                    Event::Incoming(Incoming::Publish(p)) => {
                        let text = String::from_utf8_lossy(&p.payload);
                        if let Some(n) = text.strip_prefix("m-").and_then(|n| n.parse::<u64>().ok())
                        {
                            got.lock().expect("got").push(n);
                        }
                    }
                    _ => {}
                }
            }
            Ok::<(), rumqttc::ConnectionError>(())
        };
        if received.await.is_err() {
            node += 1;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// Publishes `a-<i>` to `amq.topic` with routing key `chaos.a`, persistent, with publisher
/// confirms, one at a time, until `stop`; a message is acknowledged by its `basic.ack`. On
/// an error or no confirm within 10 s it moves to the next node and sends it again.
async fn amqp_publisher(ports: Vec<u16>, stop: Arc<AtomicBool>, acked: Acked) {
    use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
    use lapin::{BasicProperties, Connection, ConnectionProperties};
    let mut i = 0u64;
    let mut node = 0;
    while !stop.load(Ordering::SeqCst) {
        let uri = format!("amqp://127.0.0.1:{}/%2f", ports[node % ports.len()]);
        let published = async {
            let e = |e: lapin::Error| e.to_string();
            let opened = async {
                let conn = Connection::connect(&uri, ConnectionProperties::default()).await?;
                let ch = conn.create_channel().await?;
                ch.confirm_select(ConfirmSelectOptions::default()).await?;
                Ok::<_, lapin::Error>((conn, ch))
            };
            let (conn, ch) = tokio::time::timeout(Duration::from_secs(10), opened)
                .await
                .map_err(|_| "no connection".to_owned())?
                .map_err(e)?;
            while !stop.load(Ordering::SeqCst) {
                let confirm = ch
                    .basic_publish(
                        "amq.topic".into(),
                        "chaos.a".into(),
                        BasicPublishOptions::default(),
                        format!("a-{i}").as_bytes(),
                        BasicProperties::default().with_delivery_mode(2),
                    )
                    .await
                    .map_err(e)?;
                let confirmed = tokio::time::timeout(Duration::from_secs(10), confirm)
                    .await
                    .map_err(|_| "no confirm".to_owned())?
                    .map_err(e)?;
                if !confirmed.is_ack() {
                    return Err("nacked".to_owned());
                }
                acked.lock().expect("acked").push(i);
                i += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let _ = conn.close(200, "done".into()).await;
            Ok::<(), String>(())
        };
        if published.await.is_err() {
            node += 1;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// The Kafka producer's acknowledged records, (partition, offset, value), and the errors
/// of those it gave up on.
struct KafkaAcks(Mutex<Vec<(i32, i64, String)>>, Mutex<Vec<String>>);

impl rdkafka::client::ClientContext for KafkaAcks {}

impl ProducerContext for KafkaAcks {
    type DeliveryOpaque = ();
    fn delivery(&self, result: &rdkafka::message::DeliveryResult<'_>, _: Self::DeliveryOpaque) {
        match result {
            Ok(m) => {
                let v = String::from_utf8_lossy(m.payload().unwrap_or_default()).into_owned();
                self.0
                    .lock()
                    .expect("acks")
                    .push((m.partition(), m.offset(), v));
            }
            Err((e, m)) => {
                let v = String::from_utf8_lossy(m.payload().unwrap_or_default()).into_owned();
                self.1.lock().expect("errors").push(format!("{v}: {e}"));
            }
        }
    }
}

/// An idempotent acks=all producer of `k-<i>` (keys `key-<i % 6>`) at ~200 records/s until
/// `stop`, then flushed; its acknowledged records.
fn kafka_producer(bootstrap: String, stop: Arc<AtomicBool>) -> Vec<(i32, i64, String)> {
    let producer: BaseProducer<KafkaAcks> = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "5")
        .set("message.timeout.ms", "180000")
        .set("topic.metadata.refresh.interval.ms", "2000")
        .create_with_context(KafkaAcks(Mutex::default(), Mutex::default()))
        .expect("producer");
    let mut i = 0u64;
    while !stop.load(Ordering::SeqCst) {
        let value = format!("k-{i}");
        let key = format!("key-{}", i % 6);
        if producer
            .send(BaseRecord::to(TOPIC).key(&key).payload(&value))
            .is_ok()
        {
            i += 1;
        }
        producer.poll(Duration::from_millis(5));
    }
    producer
        .flush(Duration::from_secs(180))
        .expect("every record acknowledged once the faults end");
    let acks = std::mem::take(&mut *producer.context().0.lock().expect("acks"));
    let errors = producer.context().1.lock().expect("errors").clone();
    eprintln!(
        "kafka: {i} sent, {} acknowledged, {} given up (first: {:?})",
        acks.len(),
        errors.len(),
        errors.first()
    );
    assert!(!acks.is_empty(), "records acknowledged");
    assert!(errors.is_empty(), "records given up: {errors:?}");
    acks
}

/// Every lease seen: (kind, key, token) → the owners seen holding it, and per (kind, key)
/// the tokens in the order seen.
#[derive(Default)]
struct LeaseHistory {
    owners: BTreeMap<(String, String, i64), std::collections::BTreeSet<String>>,
    tokens: BTreeMap<(String, String), Vec<i64>>,
}

/// The body of `GET path` from 127.0.0.1:`port`, if it answers within a second.
fn get(port: u16, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(1))).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200").then(|| body.to_owned())
}

/// Reads the leases every node shows on `/api/cluster`, every 200 ms until `stop`.
fn watch_leases(admins: Vec<u16>, stop: Arc<AtomicBool>) -> LeaseHistory {
    let mut history = LeaseHistory::default();
    while !stop.load(Ordering::SeqCst) {
        for port in &admins {
            let Some(body) = get(*port, "/api/cluster") else {
                continue;
            };
            let Ok(v) = serde_json::from_str::<serde_json::Value>(&body) else {
                continue;
            };
            for l in v["leases"].as_array().into_iter().flatten() {
                let (Some(kind), Some(key), Some(owner), Some(token)) = (
                    l["kind"].as_str(),
                    l["key"].as_str(),
                    l["owner"].as_str(),
                    l["token"].as_i64(),
                ) else {
                    continue;
                };
                history
                    .owners
                    .entry((kind.to_owned(), key.to_owned(), token))
                    .or_default()
                    .insert(owner.to_owned());
                let tokens = history
                    .tokens
                    .entry((kind.to_owned(), key.to_owned()))
                    .or_default();
                if tokens.last() != Some(&token) {
                    tokens.push(token);
                }
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    history
}

/// The consumer group reading [`TOPIC`] all through the chaos.
const GROUP: &str = "chaos-g";

/// What the group's consumers read: (partition, offset).
type Consumed = Arc<Mutex<std::collections::HashSet<(i32, i64)>>>;

/// A consumer of [`GROUP`] reading [`TOPIC`] into `consumed`, committing what it read about
/// every second (asynchronously), until `finish`; then a last synchronous commit. The
/// errors it saw, counted.
fn group_consumer(
    bootstrap: String,
    name: &'static str,
    consumed: Consumed,
    finish: Arc<AtomicBool>,
) -> usize {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .set("group.id", GROUP)
        .set("client.id", name)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "10000")
        .set("heartbeat.interval.ms", "1000")
        .set("topic.metadata.refresh.interval.ms", "2000")
        .create()
        .expect("consumer");
    consumer.subscribe(&[TOPIC]).expect("subscribe");
    let mut errors = 0;
    let mut last_commit = Instant::now();
    while !finish.load(Ordering::SeqCst) {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                consumed
                    .lock()
                    .expect("consumed")
                    .insert((m.partition(), m.offset()));
            }
            Some(Err(e)) => {
                errors += 1;
                if errors % 50 == 1 {
                    eprintln!("{name}: {e}");
                }
            }
            None => {}
        }
        if last_commit.elapsed() > Duration::from_secs(1) {
            let _ = consumer.commit_consumer_state(rdkafka::consumer::CommitMode::Async);
            last_commit = Instant::now();
        }
    }
    // Once the group read everything: its position committed, tried until it is taken.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match consumer.commit_consumer_state(rdkafka::consumer::CommitMode::Sync) {
            Ok(())
            | Err(rdkafka::error::KafkaError::ConsumerCommit(
                rdkafka::types::RDKafkaErrorCode::NoOffset,
            )) => break,
            Err(e) => {
                assert!(Instant::now() < deadline, "{name}: the last commit: {e}");
                eprintln!("{name}: the last commit: {e}; again");
                let _ = consumer.poll(Duration::from_millis(500));
            }
        }
    }
    errors
}

/// The offsets of `GROUP` committed for each partition of [`TOPIC`] (-1: none), asked of
/// any node.
fn committed(bootstrap: &str) -> Vec<i64> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", GROUP)
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    let mut tpl = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        tpl.add_partition(TOPIC, p);
    }
    match consumer.committed_offsets(tpl, Duration::from_secs(10)) {
        Ok(tpl) => tpl
            .elements()
            .iter()
            .map(|e| match e.offset() {
                Offset::Offset(o) => o,
                _ => -1,
            })
            .collect(),
        Err(e) => {
            eprintln!("the group's committed offsets: {e}");
            vec![-1; PARTITIONS as usize]
        }
    }
}

/// Every (partition, offset, key, value) of `topic`, from the start of each partition to
/// its end.
fn read_all(bootstrap: &str, topic: &str, partitions: i32) -> Vec<(i32, i64, String, String)> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "chaos-checker")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .create()
        .expect("consumer");
    let mut assignment = TopicPartitionList::new();
    for p in 0..partitions {
        assignment
            .add_partition_offset(topic, p, Offset::Beginning)
            .expect("partition");
    }
    consumer.assign(&assignment).expect("assign");
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut got = Vec::new();
    let mut ended = std::collections::HashSet::new();
    while ended.len() < partitions as usize {
        assert!(
            Instant::now() < deadline,
            "the end of {topic} not reached in 120 s"
        );
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                let text =
                    |b: Option<&[u8]>| String::from_utf8_lossy(b.unwrap_or_default()).into_owned();
                got.push((m.partition(), m.offset(), text(m.key()), text(m.payload())));
            }
            Some(Err(rdkafka::error::KafkaError::PartitionEOF(p))) => {
                ended.insert(p);
            }
            Some(Err(e)) => eprintln!("checker's consumer: {e}"),
            None => {}
        }
    }
    got
}

/// The numbers of `values` with `prefix` (`m-7` → 7), in log order.
fn numbers(values: &[&str], prefix: &str) -> Vec<u64> {
    values
        .iter()
        .filter_map(|v| v.strip_prefix(prefix)?.parse().ok())
        .collect()
}

/// At least once, in order: every acknowledged number is there, and the first copies come
/// in the order sent. How many copies again.
fn check_at_least_once(what: &str, log: &[u64], acked: &[u64]) -> usize {
    let mut first = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for n in log {
        if seen.insert(*n) {
            first.push(*n);
        }
    }
    assert!(
        first.windows(2).all(|w| w[0] < w[1]),
        "{what}: first copies out of order"
    );
    let missing: Vec<&u64> = acked.iter().filter(|n| !seen.contains(n)).collect();
    assert!(
        missing.is_empty(),
        "{what}: acknowledged and lost: {missing:?}"
    );
    eprintln!(
        "{what}: {} acknowledged, {} in the log, {} copies again",
        acked.len(),
        first.len(),
        log.len() - first.len()
    );
    log.len() - first.len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_three_node_cluster_loses_and_doubles_nothing_through_kills_and_cuts() {
    let seed = std::env::var("FERRY_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| ferry_cloud::log::now_ms() as u64);
    eprintln!("chaos seed {seed} (FERRY_CHAOS_SEED={seed} replays the schedule)");
    let mut rng = Rng(seed | 1);
    let dir = temp_dir("chaos");
    let pki = ferry_tests::site::pki(&dir, &["gw-1", "gw-2"]);
    let mut nodes = nodes(&dir, &pki);
    for n in &mut nodes {
        n.start();
    }
    let links: Vec<u16> = nodes.iter().map(|n| n.link).collect();
    let bootstrap = nodes
        .iter()
        .map(|n| format!("127.0.0.1:{}", n.kafka))
        .collect::<Vec<_>>()
        .join(",");
    let edges = [
        edge(&dir, &pki, "gw-1", &links),
        edge(&dir, &pki, "gw-2", &links),
    ];
    let sensors = [
        ferry_tests::clients::Sensor::start(edges[0].port()),
        ferry_tests::clients::Sensor::start(edges[1].port()),
    ];
    let stop = Arc::new(AtomicBool::new(false));
    let mqtt_acked = Acked::default();
    let amqp_acked = Acked::default();
    let mqtt = tokio::spawn(mqtt_publisher(
        nodes.iter().map(|n| n.mqtt).collect(),
        stop.clone(),
        mqtt_acked.clone(),
    ));
    let session_got = Acked::default();
    let session_done = Arc::new(AtomicBool::new(false));
    let session = tokio::spawn(mqtt_session_subscriber(
        nodes.iter().rev().map(|n| n.mqtt).collect(),
        session_done.clone(),
        session_got.clone(),
    ));
    let amqp = tokio::spawn(amqp_publisher(
        nodes.iter().map(|n| n.amqp).collect(),
        stop.clone(),
        amqp_acked.clone(),
    ));
    let producer = std::thread::spawn({
        let (b, s) = (bootstrap.clone(), stop.clone());
        move || kafka_producer(b, s)
    });
    let leases_seen = Arc::new(AtomicBool::new(false));
    let lease_watch = std::thread::spawn({
        let (admins, stop) = (nodes.iter().map(|n| n.admin).collect(), leases_seen.clone());
        move || watch_leases(admins, stop)
    });
    let consumed = Consumed::default();
    let finish = Arc::new(AtomicBool::new(false));
    let consumers: Vec<_> = ["chaos-c1", "chaos-c2"]
        .into_iter()
        .map(|name| {
            let (b, c, f) = (bootstrap.clone(), consumed.clone(), finish.clone());
            std::thread::spawn(move || group_consumer(b, name, c, f))
        })
        .collect();

    // The faults. A node is not started while it cannot reach the store or the database
    // (it would not come up); kills stop while the object store is away.
    let began = Instant::now();
    let mut kills = 0;
    let mut kill_some =
        |nodes: &mut Vec<ChaosNode>, rng: &mut Rng, rounds: u64, spare: Option<usize>| {
            for _ in 0..rounds {
                std::thread::sleep(Duration::from_millis(3_000 + rng.below(3_000)));
                let mut i = rng.below(3) as usize;
                if Some(i) == spare {
                    i = (i + 1) % 3;
                }
                eprintln!("chaos {:?}: SIGKILL {}", began.elapsed(), nodes[i].name);
                nodes[i].kill();
                kills += 1;
                std::thread::sleep(Duration::from_millis(500 + rng.below(2_000)));
                nodes[i].start();
            }
        };
    let nodes_ref = &mut nodes;
    tokio::task::block_in_place(|| {
        kill_some(nodes_ref, &mut rng, 4, None);
        let cut = rng.below(3) as usize;
        eprintln!(
            "chaos {:?}: {} cut from PostgreSQL",
            began.elapsed(),
            nodes_ref[cut].name
        );
        nodes_ref[cut].pg.cut();
        kill_some(nodes_ref, &mut rng, 2, Some(cut));
        std::thread::sleep(Duration::from_secs(3));
        nodes_ref[cut].pg.restore();
        eprintln!(
            "chaos {:?}: {} back on PostgreSQL",
            began.elapsed(),
            nodes_ref[cut].name
        );
        std::thread::sleep(Duration::from_secs(3));
        eprintln!("chaos {:?}: the object store cut for 30 s", began.elapsed());
        for n in nodes_ref.iter() {
            n.s3.cut();
        }
        std::thread::sleep(Duration::from_secs(30));
        for n in nodes_ref.iter() {
            n.s3.restore();
        }
        eprintln!("chaos {:?}: the object store back", began.elapsed());
        kill_some(nodes_ref, &mut rng, 3, None);
        std::thread::sleep(Duration::from_secs(5));
    });
    eprintln!(
        "chaos {:?}: faults over after {kills} kills; the load stops",
        began.elapsed()
    );

    // The load stops; everything acknowledged or sent is let through.
    stop.store(true, Ordering::SeqCst);
    let mut sent = Vec::new();
    for s in sensors {
        sent.push(s.stop().await);
    }
    mqtt.await.expect("the MQTT publisher");
    amqp.await.expect("the AMQP publisher");
    eprintln!("chaos {:?}: the publishers stopped", began.elapsed());
    let kafka_acks = tokio::task::block_in_place(|| producer.join().expect("the producer"));
    eprintln!("chaos {:?}: the Kafka producer flushed", began.elapsed());
    for e in &edges {
        tokio::task::block_in_place(|| {
            wait_until(180, "the edges' outboxes are emptied", || {
                e.metric("ferry_edge_outbox_records") == 0
            })
        });
    }
    eprintln!("chaos {:?}: the edges' outboxes are empty", began.elapsed());

    // The checker.
    let (kafka_log, mqtt_log) = tokio::task::block_in_place(|| {
        (
            read_all(&bootstrap, TOPIC, PARTITIONS),
            read_all(&bootstrap, "mqtt", 1),
        )
    });
    // Kafka: each acknowledged record at its offset; nothing twice; in order per partition.
    let at: HashMap<(i32, i64), &str> = kafka_log
        .iter()
        .map(|(p, o, _, v)| ((*p, *o), v.as_str()))
        .collect();
    // librdkafka reports some records acknowledged with no offset (-1001: it learnt they
    // were persisted from a later batch's answer); those are checked by value below.
    let mut no_offset = 0;
    for (p, o, v) in &kafka_acks {
        if *o < 0 {
            no_offset += 1;
            continue;
        }
        assert_eq!(
            at.get(&(*p, *o)).copied(),
            Some(v.as_str()),
            "acknowledged {v} at {p}/{o}"
        );
    }
    // Exactly once: no record twice in its key's partition, none given up.
    let mut per_key: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
    for (_, _, k, v) in &kafka_log {
        per_key
            .entry(k.as_str())
            .or_default()
            .extend(numbers(&[v.as_str()], "k-"));
    }
    let acked: HashMap<&str, Vec<u64>> =
        kafka_acks.iter().fold(HashMap::new(), |mut m, (_, _, v)| {
            let n = numbers(&[v.as_str()], "k-")[0];
            m.entry(["key-0", "key-1", "key-2", "key-3", "key-4", "key-5"][(n % 6) as usize])
                .or_default()
                .push(n);
            m
        });
    for (k, ns) in &per_key {
        let copies = check_at_least_once(
            &format!("kafka {k}"),
            ns,
            acked.get(k).map_or(&[][..], |v| v),
        );
        assert_eq!(copies, 0, "kafka {k}: records appended twice");
    }
    for p in 0..PARTITIONS {
        let offsets: Vec<i64> = kafka_log.iter().filter(|r| r.0 == p).map(|r| r.1).collect();
        assert!(
            offsets.iter().enumerate().all(|(i, o)| *o == i as i64),
            "partition {p}'s offsets have a gap or a repeat"
        );
    }
    eprintln!(
        "kafka: {} acknowledged, each at its offset ({no_offset} without one)",
        kafka_acks.len()
    );
    // The consumer group: it read every record (at least once) and committed the end.
    let ends: Vec<i64> = (0..PARTITIONS)
        .map(|p| kafka_log.iter().filter(|r| r.0 == p).count() as i64)
        .collect();
    let unread = || -> Vec<i64> {
        let consumed = consumed.lock().expect("consumed");
        (0..PARTITIONS)
            .map(|p| {
                (0..ends[p as usize])
                    .filter(|o| !consumed.contains(&(p, *o)))
                    .count() as i64
            })
            .collect()
    };
    tokio::task::block_in_place(|| {
        let deadline = Instant::now() + Duration::from_secs(120);
        while unread().iter().any(|n| *n > 0) {
            assert!(
                Instant::now() < deadline,
                "the group did not read everything in 120 s: unread per partition {:?} of {ends:?}",
                unread()
            );
            std::thread::sleep(Duration::from_millis(500));
        }
        finish.store(true, Ordering::SeqCst);
        for c in consumers {
            let errors = c.join().expect("a group consumer");
            eprintln!("a group consumer: {errors} errors seen");
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let got = committed(&bootstrap);
            if got == ends {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the group's committed offsets {got:?}, the ends {ends:?}"
            );
            std::thread::sleep(Duration::from_secs(1));
        }
    });
    eprintln!("the group {GROUP}: read every record, committed the ends {ends:?}");
    // The leases: each token had one owner, and a lease's token never went back.
    leases_seen.store(true, Ordering::SeqCst);
    let history = tokio::task::block_in_place(|| lease_watch.join().expect("the lease watch"));
    for ((kind, key, token), owners) in &history.owners {
        assert_eq!(
            owners.len(),
            1,
            "{kind} {key} token {token}: owners {owners:?}"
        );
    }
    for ((kind, key), tokens) in &history.tokens {
        assert!(
            tokens.windows(2).all(|w| w[0] < w[1]),
            "{kind} {key}: tokens seen in the order {tokens:?}"
        );
    }
    let kinds: std::collections::BTreeSet<&str> =
        history.tokens.keys().map(|(k, _)| k.as_str()).collect();
    assert!(
        kinds.contains("edge-link") && kinds.contains("kafka-group"),
        "the link and group leases were seen: {kinds:?}"
    );
    eprintln!(
        "leases: {} (lease, token) seen, each with one owner; tokens only grew: {:?}",
        history.owners.len(),
        history.owners
    );
    // The edges: exactly once, in order.
    for (i, id) in ["gw-1", "gw-2"].iter().enumerate() {
        let key = format!("{id}/sensors/t");
        let got: Vec<usize> = mqtt_log
            .iter()
            .filter(|r| r.2 == key)
            .map(|r| r.3.parse().expect("a number"))
            .collect();
        assert_eq!(
            got,
            (0..sent[i]).collect::<Vec<_>>(),
            "{id}: each once, in order"
        );
        eprintln!("{id}: {} messages, each once, in order", sent[i]);
    }
    // MQTT and AMQP publishers: at least once, in order.
    let values = |key: &str| -> Vec<&str> {
        mqtt_log
            .iter()
            .filter(|r| r.2 == key)
            .map(|r| r.3.as_str())
            .collect()
    };
    let mqtt_acked = mqtt_acked.lock().expect("acked").clone();
    let amqp_acked = amqp_acked.lock().expect("acked").clone();
    check_at_least_once("mqtt", &numbers(&values("chaos/m"), "m-"), &mqtt_acked);
    // The persistent session that moved from node to node through the kills: every
    // acknowledged MQTT message reached it.
    let all: std::collections::BTreeSet<u64> = mqtt_acked.iter().copied().collect();
    let missing = || {
        let got = session_got.lock().expect("got");
        let got: std::collections::BTreeSet<u64> = got.iter().copied().collect();
        all.difference(&got).copied().collect::<Vec<u64>>()
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    while !missing().is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    session_done.store(true, Ordering::SeqCst);
    session.await.expect("the MQTT session subscriber");
    let received = session_got.lock().expect("got").len();
    assert_eq!(
        missing(),
        [0u64; 0],
        "the moving MQTT session got every acknowledged message"
    );
    eprintln!(
        "mqtt session: {} acknowledged, all received, {} copies again",
        all.len(),
        received - all.len()
    );
    check_at_least_once("amqp", &numbers(&values("chaos/a"), "a-"), &amqp_acked);
    assert!(!mqtt_acked.is_empty() && !amqp_acked.is_empty());
    // One link per edge in the cluster: never two nodes showing it linked, and one once it
    // settled (the last kill may have taken its node a moment ago).
    for id in ["gw-1", "gw-2"] {
        tokio::task::block_in_place(|| {
            wait_until(60, &format!("{id} linked through one node"), || {
                let linked: Vec<&str> = nodes
                    .iter()
                    .filter(|n| {
                        n.running()
                            .http_get(&format!("/api/fleet/{id}"))
                            .contains("\"state\":\"linked\"")
                    })
                    .map(|n| n.name)
                    .collect();
                assert!(linked.len() <= 1, "{id} linked through {linked:?}");
                linked.len() == 1
            })
        });
    }
    for n in &mut nodes {
        if let Some(p) = n.process.take() {
            assert!(p.terminate().success(), "{} stops cleanly", n.name);
        }
    }
    drop(edges);
    let _ = std::fs::remove_dir_all(&dir);
}
