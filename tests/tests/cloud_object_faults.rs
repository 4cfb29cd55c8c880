//! The object backend when its services fail: the S3 server (SeaweedFS) and PostgreSQL, both
//! started by `scripts/test.sh`, are reached through forwarders that the test cuts
//! (`ferry_tests::tcp_cut`). An append waits out a short outage and is answered when the
//! service returns; an outage longer than `append_timeout_ms` fails the append with an error
//! that names the service, and takes no offset; the log goes on by itself afterwards, and
//! holds exactly what was acknowledged. And with services of its own
//! (`ferry_tests::services::OwnSeaweedFs`, `OwnPostgres`), a flood of appends goes through
//! SeaweedFS killed and started again and PostgreSQL crashed and started again.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use ferry_cloud::log::{
    object_testing, AppendData, LogError, NewRecord, ObjectConfig, ObjectLog, S3Config, Storage,
    StreamConfig,
};
use ferry_tests::services::{need, OwnPostgres, OwnSeaweedFs};
use ferry_tests::tcp_cut::TcpCut;

/// The `host` and `port` of a libpq connection string.
fn pg_addr(conn: &str) -> SocketAddr {
    let get = |key: &str| {
        conn.split_whitespace()
            .find_map(|kv| kv.strip_prefix(&format!("{key}=")))
            .unwrap_or_else(|| panic!("no {key} in FERRY_TEST_PG"))
            .to_owned()
    };
    format!("{}:{}", get("host"), get("port"))
        .parse()
        .expect("FERRY_TEST_PG's host and port")
}

/// `conn` with its port replaced by `port`.
fn with_port(conn: &str, port: u16) -> String {
    conn.split_whitespace()
        .map(|kv| {
            if kv.starts_with("port=") {
                format!("port={port}")
            } else {
                kv.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn rec(v: &str) -> NewRecord {
    NewRecord {
        timestamp: 1_000,
        key: None,
        value: Some(Bytes::copy_from_slice(v.as_bytes())),
        headers: Vec::new(),
    }
}

/// Runs a blocking `Storage` call off the runtime.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.expect("blocking call")
}

/// `[log.object]` for `test` (a database of its own) whose S3 server and PostgreSQL are
/// reached through forwarders the test cuts (returned with it, each on a runtime of its
/// own); appends time out after 4 s.
fn config_through_cuts(test: &str) -> (ObjectConfig, TcpCut, TcpCut) {
    let endpoint = need("FERRY_TEST_S3_ENDPOINT");
    let s3_target: SocketAddr = endpoint
        .trim_start_matches("http://")
        .parse()
        .expect("FERRY_TEST_S3_ENDPOINT is http://host:port");
    let s3 = TcpCut::start_apart(s3_target);
    let db = object_testing::database(test);
    let pg = TcpCut::start_apart(pg_addr(&db));
    let config = ObjectConfig {
        object_url: format!(
            "s3://{}/{test}-{}",
            need("FERRY_TEST_S3_BUCKET"),
            std::process::id()
        ),
        postgres_url: with_port(&db, pg.addr.port()),
        flush_ms: 10,
        append_timeout_ms: 4_000,
        s3: S3Config {
            endpoint: Some(format!("http://{}", s3.addr)),
            region: Some("us-east-1".into()),
            access_key_id: Some(need("FERRY_TEST_S3_KEY")),
            secret_access_key: Some(need("FERRY_TEST_S3_SECRET")),
            allow_http: true,
        },
        ..ObjectConfig::default()
    };
    (config, s3, pg)
}

/// An object log on [`config_through_cuts`], with stream `f`.
async fn log_through_cuts(test: &str) -> (Arc<ObjectLog>, TcpCut, TcpCut) {
    let (config, s3, pg) = config_through_cuts(test);
    let log: Arc<ObjectLog> = blocking(move || ObjectLog::open(&config))
        .await
        .expect("open");
    let l = log.clone();
    blocking(move || l.create_stream("f", &StreamConfig::default()))
        .await
        .expect("create");
    (log, s3, pg)
}

/// Every (offset, value) of `f` partition 0.
async fn values(log: &Arc<ObjectLog>) -> Vec<(i64, String)> {
    let l = log.clone();
    let read = blocking(move || l.read("f", 0, 0, 1 << 20))
        .await
        .expect("read");
    let mut values = Vec::new();
    for b in read.iter() {
        let (_, whole) = b.expect("batch");
        for r in ferry_protocol::kafka::batch::records(whole).expect("records") {
            let r = r.expect("record");
            values.push((
                r.offset,
                String::from_utf8_lossy(r.value.expect("value")).into_owned(),
            ));
        }
    }
    values
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appends_wait_out_a_short_outage_fail_a_long_one_and_the_log_goes_on() {
    let (log, s3, pg) = log_through_cuts("faults").await;
    let append = |v: &str| log.append("f", 0, AppendData::Records(vec![rec(v)]));
    assert_eq!(append("a").await.expect("append").base_offset, 0);

    for (service, name) in [(&s3, "object store"), (&pg, "PostgreSQL")] {
        // Down for a moment: the append waits, and is answered once the service is back.
        service.cut();
        let pending = tokio::spawn(append(&format!("short {name}")));
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert!(!pending.is_finished(), "{name} down: no answer yet");
        service.restore();
        let done = pending
            .await
            .expect("task")
            .expect("answered after the outage");
        assert_eq!(done.base_offset, done.last_offset);
        // Down for longer than the timeout: refused, with the service named.
        service.cut();
        let refused = append(&format!("long {name}")).await;
        service.restore();
        match refused {
            Err(LogError::Unavailable(why)) => assert!(why.contains(name), "{why}"),
            other => panic!("{name} down past the timeout: {other:?}"),
        }
    }
    // Back: the log goes on at the next offset; it holds exactly what was acknowledged.
    assert_eq!(append("z").await.expect("append").base_offset, 3);
    assert_eq!(
        values(&log).await,
        vec![
            (0, "a".to_owned()),
            (1, "short object store".to_owned()),
            (2, "short PostgreSQL".to_owned()),
            (3, "z".to_owned()),
        ]
    );
}

/// The connection to PostgreSQL drops right after the flush's COMMIT reached the server, its
/// answer lost: the flusher tries the commit again with the same flush id, finds it done,
/// and answers with the offsets it got; nothing is appended twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_whose_answer_was_lost_is_not_applied_twice() {
    let (log, _s3, pg) = log_through_cuts("lost_commit").await;
    let append = |v: &str| log.append("f", 0, AppendData::Records(vec![rec(v)]));
    assert_eq!(append("a").await.expect("append").base_offset, 0);
    pg.drop_answer_to(b"COMMIT");
    let b = append("b")
        .await
        .expect("the append whose commit's answer was lost");
    assert_eq!(pg.answers_dropped(), 1, "the COMMIT's answer was dropped");
    assert_eq!((b.base_offset, b.last_offset), (1, 1));
    assert_eq!(append("c").await.expect("append").base_offset, 2);
    assert_eq!(
        values(&log).await,
        vec![(0, "a".into()), (1, "b".into()), (2, "c".into())]
    );
}

/// Every (offset, value) of `f`'s `partition`, read from its start to its end.
fn all_values(log: &dyn Storage, partition: u32) -> Vec<(i64, String)> {
    let mut values = Vec::new();
    ferry_cloud::log::for_each_batch(log, "f", partition, 0, |_, batch| {
        for r in ferry_protocol::kafka::batch::records(batch).expect("records") {
            let r = r.expect("record");
            values.push((
                r.offset,
                String::from_utf8_lossy(r.value.expect("value")).into_owned(),
            ));
        }
    })
    .expect("read the partition");
    values
}

/// Eight writers append one record at a time (writer `w` to partition `w % 2`, values
/// `w/i`) while SeaweedFS is killed (SIGKILL) and started again, then PostgreSQL is stopped
/// as a crash does (`pg_ctl -m immediate`) and started again. Every append waits the
/// outages out (the timeout is longer than each) and is acknowledged; the log goes on by itself after each; and, read back
/// by this node and by a node opened afresh on the same services, every acknowledged record
/// is there exactly once, each writer's in the order written, at offsets without gaps.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_appends_goes_through_seaweedfs_killed_and_postgresql_crashed() {
    let (s3, pg) = blocking(|| (OwnSeaweedFs::start(), OwnPostgres::start())).await;
    let (s3, pg) = (Arc::new(s3), Arc::new(pg));
    let config = ObjectConfig {
        append_timeout_ms: 30_000,
        ..s3.object_config("flood", pg.url())
    };
    let open = config.clone();
    let log: Arc<ObjectLog> = blocking(move || ObjectLog::open(&open))
        .await
        .expect("open");
    let l = log.clone();
    blocking(move || {
        let two = StreamConfig {
            partitions: 2,
            ..StreamConfig::default()
        };
        l.create_stream("f", &two)
    })
    .await
    .expect("create");

    const WRITERS: u32 = 8;
    let acked = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let (log, acked, stop) = (log.clone(), acked.clone(), stop.clone());
            tokio::spawn(async move {
                // (value index, acknowledged) of each append, in the order made.
                let mut made = Vec::new();
                let mut i = 0u32;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let data = AppendData::Records(vec![rec(&format!("{w}/{i}"))]);
                    let ok = log.append("f", w % 2, data).await.is_ok();
                    if ok {
                        acked.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    made.push((i, ok));
                    i += 1;
                }
                made
            })
        })
        .collect();
    // Waits until `n` more appends are acknowledged: the log goes on.
    let goes_on = |what: &'static str, n: u64| {
        let acked = acked.clone();
        async move {
            let from = acked.load(std::sync::atomic::Ordering::Relaxed);
            let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
            while acked.load(std::sync::atomic::Ordering::Relaxed) < from + n {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "appends acknowledged again {what}"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    goes_on("at first", 200).await;

    let s = s3.clone();
    blocking(move || s.kill()).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = acked.load(std::sync::atomic::Ordering::Relaxed);
    let s = s3.clone();
    blocking(move || s.start_again()).await;
    goes_on("after SeaweedFS came back", 200).await;

    let p = pg.clone();
    blocking(move || p.stop_immediate()).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let p = pg.clone();
    blocking(move || p.start_again()).await;
    goes_on("after PostgreSQL came back", 200).await;

    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut made = Vec::new();
    for w in writers {
        made.push(w.await.expect("writer"));
    }
    let refused: Vec<_> = made.iter().flatten().filter(|(_, ok)| !*ok).collect();
    assert!(refused.is_empty(), "every append waited the outages out");
    let acknowledged = made.iter().map(Vec::len).sum::<usize>() as u64;
    assert!(before > 0 && acknowledged > before + 400);

    let made = Arc::new(made);
    let check = move |log: &dyn Storage, who: &str| {
        for partition in 0..2 {
            let values = all_values(log, partition);
            let offsets: Vec<i64> = values.iter().map(|(o, _)| *o).collect();
            let expected: Vec<i64> = (0..values.len() as i64).collect();
            assert_eq!(offsets, expected, "{who}: partition {partition}'s offsets");
            let mut seen: std::collections::HashMap<u32, Vec<u32>> = Default::default();
            for (_, v) in &values {
                let (w, i) = v.split_once('/').expect("w/i");
                let w: u32 = w.parse().expect("writer");
                assert_eq!(w % 2, partition, "{who}: {v} in partition {partition}");
                seen.entry(w).or_default().push(i.parse().expect("index"));
            }
            for w in (partition..WRITERS).step_by(2) {
                let got = seen.remove(&w).unwrap_or_default();
                assert!(
                    got.windows(2).all(|p| p[0] < p[1]),
                    "{who}: writer {w}'s records once each, in order: {got:?}"
                );
                for &(i, ok) in &made[w as usize] {
                    if ok {
                        assert!(
                            got.binary_search(&i).is_ok(),
                            "{who}: writer {w}'s acknowledged {i} is in the log"
                        );
                    }
                }
                let written = made[w as usize].len() as u32;
                assert!(
                    got.iter().all(|&i| i < written),
                    "{who}: only what was written"
                );
            }
        }
    };
    let (l, c) = (log.clone(), check.clone());
    blocking(move || c(&*l, "the writing node")).await;
    let fresh: Arc<ObjectLog> = blocking(move || ObjectLog::open(&config))
        .await
        .expect("open afresh");
    blocking(move || check(&*fresh, "a node opened afresh")).await;
}

/// A whole node (MQTT, Kafka, AMQP) on the object backend whose S3 server is cut for longer
/// than `append_timeout_ms`: each front refuses what it cannot store with its protocol's
/// error, and takes it again once the store is back. MQTT 5 (rumqttc): PUBACK with 0x80;
/// MQTT 3.1.1 (rumqttc): disconnected, no PUBACK; Kafka (librdkafka, no retries): the
/// delivery fails with KAFKA_STORAGE_ERROR; AMQP (lapin, confirms): `basic.nack`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_front_refuses_what_a_store_outage_kept_out_and_recovers() {
    use ferry_cloud::config::LogBackend;
    use ferry_cloud::node::{CloudConfig, Node};
    use lapin::options::{ConfirmSelectOptions, QueueDeclareOptions};
    use lapin::{Connection, ConnectionProperties};

    let (object, s3, _pg) = config_through_cuts("fronts_refuse");
    let mut config = CloudConfig::default();
    config.server.listen = vec!["127.0.0.1:0".parse().expect("addr")];
    config.server.data_dir = ferry_tests::process::temp_dir("fronts-refuse");
    config.kafka = Some(ferry_cloud::kafka::KafkaConfig {
        listen: "127.0.0.1:0".parse().expect("addr"),
        ..Default::default()
    });
    config.amqp = Some(ferry_cloud::amqp::AmqpConfig {
        listen: "127.0.0.1:0".parse().expect("addr"),
        ..Default::default()
    });
    config.log.backend = LogBackend::Object;
    config.log.object = Some(object);
    let node = Node::start(config, std::future::pending())
        .await
        .expect("the node starts");
    let mqtt_port = node.mqtt_addrs()[0].port();
    let bootstrap = node.kafka_addr.expect("kafka").to_string();
    let amqp = format!(
        "amqp://127.0.0.1:{}/%2f",
        node.amqp_addr.expect("amqp").port()
    );

    // Connected before the outage.
    let (v5, mut v5_events) = {
        use rumqttc::v5::{AsyncClient, MqttOptions};
        AsyncClient::new(MqttOptions::new("v5", "127.0.0.1", mqtt_port), 10)
    };
    let (v3, mut v3_events) = {
        use rumqttc::{AsyncClient, MqttOptions};
        AsyncClient::new(MqttOptions::new("v3", "127.0.0.1", mqtt_port), 10)
    };
    let conn = Connection::connect(&amqp, ConnectionProperties::default())
        .await
        .expect("AMQP connect");
    let ch = conn.create_channel().await.expect("channel");
    ch.queue_declare(
        "q".into(),
        QueueDeclareOptions::default(),
        Default::default(),
    )
    .await
    .expect("declare");
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    let produce = |value: &'static str| {
        let bootstrap = bootstrap.clone();
        blocking(move || produce_one(&bootstrap, "k", value))
    };
    // The Kafka topic, made before the outage (a record stored).
    assert_eq!(produce("before").await, Ok(0), "produced before the outage");
    // The MQTT clients' connections up (CONNACK) before the outage.
    v5.publish(
        "t/v5",
        rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
        false,
        "before",
    )
    .await
    .expect("queue");
    v3.publish("t/v3", rumqttc::QoS::AtLeastOnce, false, "before")
        .await
        .expect("queue");
    assert_eq!(
        next_v5_puback(&mut v5_events).await,
        rumqttc::v5::mqttbytes::v5::PubAckReason::Success
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let event = tokio::time::timeout_at(deadline, v3_events.poll())
            .await
            .expect("in time")
            .expect("connected");
        if let rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_)) = event {
            break;
        }
    }

    s3.cut();
    // MQTT 5: refused with 0x80, the connection stays.
    v5.publish(
        "t/v5",
        rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
        false,
        "during",
    )
    .await
    .expect("queue");
    assert_eq!(
        next_v5_puback(&mut v5_events).await,
        rumqttc::v5::mqttbytes::v5::PubAckReason::UnspecifiedError
    );
    // MQTT 3.1.1: the connection ends, with no PUBACK.
    v3.publish("t/v3", rumqttc::QoS::AtLeastOnce, false, "during")
        .await
        .expect("queue");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        match tokio::time::timeout_at(deadline, v3_events.poll())
            .await
            .expect("the 3.1.1 connection ends in time")
        {
            Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_))) => {
                panic!("no PUBACK for what the log did not take")
            }
            Ok(_) => {}
            Err(_) => break,
        }
    }
    // Kafka: the broker's error, not a timeout.
    assert_eq!(
        produce("during").await,
        Err(rdkafka::types::RDKafkaErrorCode::KafkaStorageError),
        "refused during the outage with the broker's error"
    );
    // AMQP: a nack.
    let confirm = publish_confirmed(&ch, b"during").await;
    assert!(confirm.is_nack(), "{confirm:?}");

    // The store back: every front takes what it is sent again.
    s3.restore();
    v5.publish(
        "t/v5",
        rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
        false,
        "after",
    )
    .await
    .expect("queue");
    assert_eq!(
        next_v5_puback(&mut v5_events).await,
        rumqttc::v5::mqttbytes::v5::PubAckReason::Success
    );
    assert_eq!(
        produce("after").await,
        Ok(1),
        "produced after the outage; the refused record took no offset"
    );
    let confirm = publish_confirmed(&ch, b"after").await;
    assert!(confirm.is_ack(), "{confirm:?}");
    drop(node);
}

/// Produces `value` to `topic` with a librdkafka producer that does not retry (acks=all):
/// the offset it got, or the error its delivery report gives.
fn produce_one(
    bootstrap: &str,
    topic: &str,
    value: &str,
) -> Result<i64, rdkafka::types::RDKafkaErrorCode> {
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer, ProducerContext};
    use rdkafka::Message as _;
    struct Report(std::sync::Mutex<Option<Result<i64, rdkafka::types::RDKafkaErrorCode>>>);
    impl rdkafka::client::ClientContext for Report {}
    impl ProducerContext for Report {
        type DeliveryOpaque = ();
        fn delivery(&self, result: &rdkafka::message::DeliveryResult<'_>, _: ()) {
            let got = match result {
                Ok(m) => Ok(m.offset()),
                Err((e, _)) => Err(e
                    .rdkafka_error_code()
                    .unwrap_or(rdkafka::types::RDKafkaErrorCode::Fail)),
            };
            *self.0.lock().expect("report") = Some(got);
        }
    }
    let producer: BaseProducer<Report> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("acks", "all")
        .set("retries", "0")
        .set("message.timeout.ms", "30000")
        .create_with_context(Report(std::sync::Mutex::new(None)))
        .expect("producer");
    producer
        .send(BaseRecord::<str, str>::to(topic).payload(value))
        .map_err(|(e, _)| panic!("queue the record: {e}"))
        .ok();
    let deadline = std::time::Instant::now() + Duration::from_secs(40);
    loop {
        producer.poll(Duration::from_millis(50));
        if let Some(got) = producer.context().0.lock().expect("report").take() {
            let _ = producer.flush(Duration::from_secs(1));
            return got;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "a delivery report in time"
        );
    }
}

/// The reason code of the next PUBACK on a v5 connection (which must stay up).
async fn next_v5_puback(
    events: &mut rumqttc::v5::EventLoop,
) -> rumqttc::v5::mqttbytes::v5::PubAckReason {
    use rumqttc::v5::mqttbytes::v5::Packet;
    use rumqttc::v5::Event;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let event = tokio::time::timeout_at(deadline, events.poll())
            .await
            .expect("a PUBACK in time")
            .expect("the v5 connection stays");
        if let Event::Incoming(Packet::PubAck(ack)) = event {
            return ack.reason;
        }
    }
}

/// Publishes `body` to queue `q` through the default exchange on a channel in confirm mode;
/// the broker's confirmation.
async fn publish_confirmed(ch: &lapin::Channel, body: &[u8]) -> lapin::Confirmation {
    ch.basic_publish(
        "".into(),
        "q".into(),
        lapin::options::BasicPublishOptions::default(),
        body,
        lapin::BasicProperties::default(),
    )
    .await
    .expect("publish")
    .await
    .expect("confirm")
}
