//! The link, end to end, with real processes: a `ferry-edge` sends its outbox over QUIC to a
//! `ferry-cloud`; publishers and subscribers are rumqttc; the cloud's log is read back after
//! the run and counted.

use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use ferry_tests::clients::next_incoming;
use ferry_tests::process::{temp_dir, wait_until, Edge};
use ferry_tests::site::Site;
use rumqttc::{AsyncClient, Event, Incoming, MqttOptions, QoS};

/// The edge's `GET /api/link` document.
fn edge_health(edge: &Edge) -> serde_json::Value {
    let response = edge.http_get("/api/link");
    let body = response.split("\r\n\r\n").nth(1).expect("a body");
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"))
}

/// `ferry_edge_outbox_oldest_age_seconds` (a fraction of a second counts).
fn oldest_age_metric(edge: &Edge) -> f64 {
    let page = edge.http_get("/metrics");
    page.lines()
        .find_map(|l| l.strip_prefix("ferry_edge_outbox_oldest_age_seconds "))
        .expect("the oldest record's age")
        .parse()
        .expect("a number")
}

/// A persistent session on the cloud subscribed to everything of gw-1, then gone: it gets
/// what the log takes while it is away.
async fn register_cloud_subscriber(cloud: &Edge) {
    let mut opts = MqttOptions::new("cloud-sub", "127.0.0.1", cloud.port());
    opts.set_clean_session(false);
    let (sub, mut ev) = AsyncClient::new(opts, 10);
    sub.subscribe("gw-1/#", QoS::AtLeastOnce)
        .await
        .expect("queue subscribe");
    while !matches!(next_incoming(&mut ev, "suback").await, Incoming::SubAck(_)) {}
    sub.disconnect().await.expect("queue disconnect");
    while let Ok(Ok(_)) = tokio::time::timeout(Duration::from_secs(1), ev.poll()).await {}
}

async fn publish(edge_port: u16, range: std::ops::Range<usize>) -> usize {
    ferry_tests::clients::publish_numbers(edge_port, range).await
}

/// Receives on the registered persistent session until `n` messages came (within 120 s,
/// however loaded the machine), then for as long as more keep coming within a second: a
/// message sent twice shows up as more than `n`.
async fn receive_all(cloud: &Edge, n: usize) -> Vec<String> {
    let mut opts = MqttOptions::new("cloud-sub", "127.0.0.1", cloud.port());
    opts.set_clean_session(false);
    opts.set_inflight(1000);
    let (_sub, mut ev) = AsyncClient::new(opts, 1000);
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let wait = if got.len() < n {
            deadline.saturating_duration_since(tokio::time::Instant::now())
        } else {
            Duration::from_secs(1)
        };
        match tokio::time::timeout(wait, ev.poll()).await {
            Err(_) => return got,
            Ok(Ok(Event::Incoming(Incoming::Publish(p)))) => {
                assert_eq!(p.topic, "gw-1/sensors/t");
                got.push(String::from_utf8_lossy(&p.payload).into_owned());
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => panic!("cloud subscriber: {e}"),
        }
    }
}

fn numbers(n: usize) -> Vec<String> {
    (0..n).map(|i| i.to_string()).collect()
}

/// 100,000 QoS 1 messages published to the edge while the cloud is down; then the cloud
/// starts: a cloud subscriber receives all of them, in order, none twice; the cloud's log
/// has each once; the edge's outbox is empty.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_made_while_the_cloud_is_down_arrives_once_in_order() {
    const N: usize = 100_000;
    let site = Site::new("link-backlog", "");
    let cloud = site.cloud();
    register_cloud_subscriber(&cloud).await;
    assert!(cloud.terminate().success());

    let edge = site.edge();
    assert_eq!(publish(edge.port(), 0..N).await, N);
    assert_eq!(edge.metric("ferry_edge_outbox_records"), N as u64);
    // The edge's health while the cloud is away: a backlog with an age, a link not up.
    let health = edge_health(&edge);
    assert_eq!(health["outbox"]["records"], N as u64, "{health}");
    assert!(
        health["outbox"]["oldest_age_secs"].as_f64() > Some(0.0),
        "{health}"
    );
    assert_ne!(health["link"]["state"], "up", "{health}");
    assert_eq!(health["link"]["records_acked"], 0, "{health}");
    assert!(oldest_age_metric(&edge) > 0.0);

    let cloud = site.cloud();
    let got = receive_all(&cloud, N).await;
    assert_eq!(got.len(), N, "every message, none twice");
    assert!(got == numbers(N), "in order");
    wait_until(60, "the outbox is emptied", || {
        edge.metric("ferry_edge_outbox_records") == 0
    });
    assert_eq!(edge.metric("ferry_edge_outbox_bytes"), 0);
    assert!(edge.metric("ferry_edge_link_records_acked_total") >= N as u64);
    let health = edge_health(&edge);
    assert_eq!(health["outbox"]["records"], 0, "{health}");
    assert_eq!(
        health["outbox"]["oldest_age_secs"].as_f64(),
        Some(0.0),
        "{health}"
    );
    assert!(
        health["link"]["records_acked"].as_u64() >= Some(N as u64),
        "{health}"
    );
    // (On a loaded machine the link may have been re-established meanwhile: up again soon.)
    wait_until(60, "the link is up", || {
        edge_health(&edge)["link"]["state"] == "up"
    });
    assert_eq!(oldest_age_metric(&edge), 0.0);
    drop(edge);
    assert!(cloud.terminate().success());
    assert!(
        site.cloud_log() == numbers(N),
        "the log has each message once, in order"
    );
}

/// kill -9 of the edge while its link is sending a backlog, then of the cloud while it
/// takes another: every message the edge acknowledged is in the cloud's log exactly once,
/// in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_either_end_mid_stream_loses_and_duplicates_nothing() {
    const N: usize = 100_000;
    let site = Site::new("link-kill", "");
    let edge = site.edge();
    assert_eq!(publish(edge.port(), 0..N).await, N);
    // The cloud comes up and the backlog starts to drain: the edge dies as soon as the
    // cloud has acknowledged some of it. The cloud goes too, so that what was left waits.
    let cloud = site.cloud();
    let acked = cloud_acked_some(&cloud);
    edge.kill();
    cloud.kill();
    let edge = site.edge();
    let left = edge.metric("ferry_edge_outbox_records");
    assert!(
        left > 0,
        "killed mid-stream: {acked} acknowledged, {left} left"
    );
    // Another backlog behind what was left; the cloud dies while it takes them.
    assert_eq!(publish(edge.port(), N..2 * N).await, N);
    let cloud = site.cloud();
    let acked2 = cloud_acked_some(&cloud);
    cloud.kill();
    let left2 = edge.metric("ferry_edge_outbox_records");
    assert!(
        left2 > 0,
        "killed mid-stream: {acked2} acknowledged, {left2} left"
    );
    let cloud = site.cloud();
    wait_until(60, "the outbox is emptied", || {
        edge.metric("ferry_edge_outbox_records") == 0
    });
    drop(edge);
    assert!(cloud.terminate().success());
    let log = site.cloud_log();
    assert_eq!(log.len(), 2 * N, "each acknowledged message once");
    assert!(log == numbers(2 * N), "in order");
}

/// kill -9 of the cloud while it takes an edge's backlog and a flood from an idempotent
/// librdkafka producer (acks=all) at once, both going on into the cloud started again: the
/// edge's messages are in the log once each, in order; every record the producer had
/// acknowledged is there, none twice (its resends after the restart are found), in the
/// order produced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_cloud_amid_an_edge_backlog_and_a_kafka_flood_loses_and_doubles_nothing() {
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer, ProducerContext};
    use rdkafka::Message as _;
    const N: usize = 50_000;
    let site = Site::new("link-kafka-kill", "");
    // A Kafka port that stays the same across the cloud's restart, for the producer.
    let kafka_port = ferry_tests::process::free_tcp_port();
    let config = std::fs::read_to_string(&site.cloud_config).expect("config");
    let config = config.replace(
        "[kafka]\nlisten = \"127.0.0.1:0\"",
        &format!("[kafka]\nlisten = \"127.0.0.1:{kafka_port}\""),
    );
    std::fs::write(&site.cloud_config, config).expect("config");
    let edge = site.edge();
    assert_eq!(publish(edge.port(), 0..N).await, N);
    let cloud = site.cloud();

    /// The values the producer's delivery reports said were stored.
    struct Acks(std::sync::Mutex<Vec<String>>);
    impl rdkafka::client::ClientContext for Acks {}
    impl ProducerContext for Acks {
        type DeliveryOpaque = ();
        fn delivery(&self, result: &rdkafka::message::DeliveryResult<'_>, _: ()) {
            if let Ok(m) = result {
                let v = String::from_utf8_lossy(m.payload().unwrap_or_default()).into_owned();
                self.0.lock().expect("acks").push(v);
            }
        }
    }
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let acked = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (s, a) = (stop.clone(), acked.clone());
    let bootstrap = format!("127.0.0.1:{kafka_port}");
    let producer = std::thread::spawn(move || {
        let producer: BaseProducer<Acks> = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", &bootstrap)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "2")
            .set("message.timeout.ms", "120000")
            .create_with_context(Acks(std::sync::Mutex::new(Vec::new())))
            .expect("producer");
        let mut i = 0u64;
        while !s.load(Ordering::Relaxed) {
            let value = format!("{i:08}");
            match producer.send(BaseRecord::<str, str>::to("kflood").payload(&value)) {
                Ok(()) => i += 1,
                Err(_) => {
                    producer.poll(Duration::from_millis(5));
                }
            }
            producer.poll(Duration::ZERO);
            a.store(
                producer.context().0.lock().expect("acks").len(),
                Ordering::Relaxed,
            );
            if i.is_multiple_of(1000) {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        producer
            .flush(Duration::from_secs(120))
            .expect("every record acknowledged in the end");
        let acks = producer.context().0.lock().expect("acks").clone();
        (i, acks)
    });
    let kafka_acked_some = |n: usize| {
        wait_until(60, "the producer's records acknowledged", || {
            acked.load(Ordering::Relaxed) >= n
        })
    };
    kafka_acked_some(1_000);
    let from_edge = cloud_acked_some(&cloud);
    cloud.kill();
    let before = acked.load(Ordering::Relaxed);
    let left = edge.metric("ferry_edge_outbox_records");
    assert!(
        left > 0,
        "killed mid-stream: {from_edge} acknowledged, {left} left"
    );

    let cloud = site.cloud();
    kafka_acked_some(before + 1_000);
    stop.store(true, Ordering::Relaxed);
    let (sent, acks) = producer.join().expect("the producer");
    wait_until(60, "the outbox is emptied", || {
        edge.metric("ferry_edge_outbox_records") == 0
    });
    drop(edge);
    assert!(cloud.terminate().success());

    let log = site.cloud_log();
    assert_eq!(log.len(), N, "each of the edge's messages once");
    assert!(log == numbers(N), "in order");
    let kafka: Vec<String> = ferry_tests::log::records(&site.dir.join("cloud/log"), "kflood", 0)
        .into_iter()
        .map(|(_, value, _)| value)
        .collect();
    assert_eq!(
        acks.len() as u64,
        sent,
        "flushed: every record acknowledged"
    );
    assert!(
        kafka.windows(2).all(|w| w[0] < w[1]),
        "each record once, in the order produced"
    );
    let expected: Vec<String> = (0..sent).map(|i| format!("{i:08}")).collect();
    assert!(kafka == expected, "every acknowledged record, none twice");
}

/// Waits (up to 60 s, polling every 2 ms) until the cloud has acknowledged records of gw-1's
/// link; how many. Watched on the cloud, whose admin listener does not wait for the edge's
/// busy router.
fn cloud_acked_some(cloud: &Edge) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let acked = cloud
            .http_get("/metrics")
            .lines()
            .find_map(|l| l.strip_prefix("ferry_cloud_link_records_total{edge=\"gw-1\"} "))
            .map_or(0, |v| v.parse().expect("a number"));
        if acked > 0 {
            return acked;
        }
        assert!(
            Instant::now() < deadline,
            "no record acknowledged within 60 s"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// The cloud takes the edge's identity from its certificate; an edge on the deny list is
/// refused, and let in again when the list is changed and reloaded (SIGHUP).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_denied_edge_is_refused_until_the_deny_list_lets_it_in() {
    let site = Site::new("link-deny", "");
    std::fs::write(site.dir.join("deny.txt"), "# revoked\ngw-1\n").expect("deny list");
    let cloud = site.cloud();
    let edge = site.edge();
    assert_eq!(publish(edge.port(), 0..100).await, 100);
    // Refused twice (the second after a backoff): the window in which nothing may be taken
    // ends at an event, not a sleep.
    wait_until(60, "two refused attempts", || {
        edge.metric("ferry_edge_link_failed_attempts_total") >= 2
    });
    assert_eq!(
        edge.metric("ferry_edge_outbox_records"),
        100,
        "nothing taken from a denied edge"
    );
    assert_eq!(edge.metric("ferry_edge_link_records_acked_total"), 0);
    std::fs::write(site.dir.join("deny.txt"), "# nobody\n").expect("deny list");
    let status = Command::new("kill")
        .args(["-HUP", &cloud.pid().to_string()])
        .status()
        .expect("kill runs");
    assert!(status.success());
    wait_until(60, "the outbox is emptied", || {
        edge.metric("ferry_edge_outbox_records") == 0
    });
    drop(edge);
    assert!(cloud.terminate().success());
    assert!(site.cloud_log() == numbers(100));
}

/// After an outage the higher priority class drains first; order holds within each class.
/// The alarms' route also renames them in the cloud (`cloud_topic`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_higher_priority_drains_first_after_an_outage() {
    let site = Site::new(
        "link-priority",
        "[[uplink.route]]\nfilter = \"alarms/#\"\npriority = 9\ncloud_topic = \"site-7/{topic}\"",
    );
    let edge = site.edge();
    assert_eq!(publish(edge.port(), 0..2000).await, 2000);
    let mut opts = MqttOptions::new("alarm", "127.0.0.1", edge.port());
    opts.set_inflight(10);
    let (alarm, mut ev) = AsyncClient::new(opts, 100);
    for i in 0..50 {
        alarm
            .publish("alarms/fire", QoS::AtLeastOnce, false, format!("a{i}"))
            .await
            .expect("queue");
    }
    let mut acked = 0;
    while acked < 50 {
        if let Incoming::PubAck(_) = next_incoming(&mut ev, "alarm acks").await {
            acked += 1;
        }
    }
    let cloud = site.cloud();
    wait_until(60, "the outbox is emptied", || {
        edge.metric("ferry_edge_outbox_records") == 0
    });
    drop(edge);
    assert!(cloud.terminate().success());
    let got = site.cloud_records();
    let alarms: Vec<(String, String)> = (0..50)
        .map(|i| ("gw-1/site-7/alarms/fire".to_owned(), format!("a{i}")))
        .collect();
    assert_eq!(got.len(), 2050);
    assert!(got[..50] == alarms[..], "the alarms first, in order");
    assert!(
        got[50..].iter().map(|(_, v)| v.clone()).collect::<Vec<_>>() == numbers(2000),
        "then the readings, in order"
    );
}

/// A full outbox under `drop_oldest` takes every new message and drops the oldest, counted;
/// what reaches the cloud afterwards is exactly the newest messages, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_outbox_drops_the_oldest_and_counts_them() {
    let site = Site::new(
        "link-drop",
        "max_outbox_bytes = 20000\nfull_policy = \"drop_oldest\"",
    );
    let edge = site.edge();
    assert_eq!(publish(edge.port(), 0..1000).await, 1000, "every one taken");
    let (records, bytes) = (
        edge.metric("ferry_edge_outbox_records"),
        edge.metric("ferry_edge_outbox_bytes"),
    );
    let dropped = edge.metric("ferry_edge_outbox_dropped_total");
    assert!(bytes <= 20_000, "{bytes} bytes in the outbox");
    assert!(
        records > 300 && dropped > 0,
        "{records} kept, {dropped} dropped"
    );
    assert_eq!(
        records + dropped,
        1000,
        "every message kept or counted as dropped"
    );
    let cloud = site.cloud();
    wait_until(60, "the outbox is emptied", || {
        edge.metric("ferry_edge_outbox_records") == 0
    });
    drop(edge);
    assert!(cloud.terminate().success());
    let newest: Vec<String> = (dropped as usize..1000).map(|i| i.to_string()).collect();
    assert!(site.cloud_log() == newest, "the newest {records}, in order");
}

/// The edge's persistent subscriber `id` on `valve/#`: what it gets, `count` messages at
/// most, waiting `secs` at most.
fn valve_app(edge: &Edge, id: &str, count: u32, secs: u32) -> String {
    let (count, secs) = (count.to_string(), secs.to_string());
    let out = ferry_tests::process::mosquitto_at(
        "mosquitto_sub",
        &edge.port().to_string(),
        &[
            "-c", "-i", id, "-q", "1", "-t", "valve/#", "-v", "-C", &count, "-W", &secs,
        ],
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The downlink: messages published on the cloud to `$edge/gw-1/<topic>` while the edge
/// is down are kept, reach the edge when it returns and are published there on `<topic>`,
/// once (not again after another restart of the edge).
#[test]
fn messages_for_an_edge_wait_for_it_and_are_published_there_once() {
    use ferry_tests::process::mosquitto_at;
    let site = Site::new("link-down", "");
    let cloud = site.cloud();
    let cloud_port = cloud.port().to_string();
    let edge = site.edge();
    // A persistent subscriber on the edge, then gone.
    let out = mosquitto_at(
        "mosquitto_sub",
        &edge.port().to_string(),
        &["-c", "-i", "valve-app", "-q", "1", "-t", "valve/#", "-E"],
    );
    assert!(out.status.success(), "{out:?}");
    edge.kill();
    for n in 1..=3 {
        let out = mosquitto_at(
            "mosquitto_pub",
            &cloud_port,
            &[
                "-t",
                "$edge/gw-1/valve/set",
                "-q",
                "1",
                "-m",
                &format!("open {n}"),
            ],
        );
        assert!(out.status.success(), "{out:?}");
    }
    // A message for another edge stays with the cloud.
    let out = mosquitto_at(
        "mosquitto_pub",
        &cloud_port,
        &[
            "-t",
            "$edge/gw-2/valve/set",
            "-q",
            "1",
            "-m",
            "not for gw-1",
        ],
    );
    assert!(out.status.success());
    let edge = site.edge();
    assert_eq!(
        valve_app(&edge, "valve-app", 3, 30),
        "valve/set open 1\nvalve/set open 2\nvalve/set open 3\n"
    );
    // Acknowledged: after another kill -9 of the edge, nothing is published again. A new
    // persistent subscriber watches (valve-app itself may legitimately get a message again
    // whose PUBACK the kill cut off: that is its session's at-least-once, not the link's).
    let out = mosquitto_at(
        "mosquitto_sub",
        &edge.port().to_string(),
        &["-c", "-i", "watcher", "-q", "1", "-t", "valve/#", "-E"],
    );
    assert!(out.status.success());
    edge.kill();
    let edge = site.edge();
    // A Kafka producer reaches the edge the same way: a record with key
    // `$edge/gw-1/<topic>` produced to the downlink stream. It is the watcher's first
    // message: had the edge published the acknowledged ones again, they would come first.
    let kafka = cloud.kafka_addr().expect("a Kafka listener").to_string();
    let mut kcat = Command::new("kcat")
        .args(["-b", &kafka, "-P", "-t", "downlink", "-K", "|"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .expect("kcat must be installed (apt-get install kcat)");
    {
        use std::io::Write;
        let mut stdin = kcat.stdin.take().expect("stdin");
        stdin
            .write_all(b"$edge/gw-1/valve/set|close from kafka\n")
            .expect("write");
    }
    assert!(kcat.wait().expect("kcat ends").success());
    assert_eq!(
        valve_app(&edge, "watcher", 1, 60),
        "valve/set close from kafka\n",
        "published once, then the Kafka record"
    );
    // And an AMQP client's: a publish to amq.topic with routing key
    // `$edge.gw-1.<topic with . for />` goes down the link too.
    let amqp = cloud
        .amqp_addr()
        .expect("an AMQP listener")
        .port()
        .to_string();
    ferry_tests::process::python_client(
        "amqp_publish.py",
        &[&amqp, "amq.topic", "$edge.gw-1.valve.set", "open from amqp"],
    );
    assert_eq!(
        valve_app(&edge, "watcher", 1, 60),
        "valve/set open from amqp\n",
        "the AMQP publish, on the edge"
    );
}

/// 10% packet loss both ways and a 30-second cut of the path, through the impairment proxy:
/// every acknowledged message is in the cloud's log once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loss_and_a_cut_of_the_link_lose_and_duplicate_nothing() {
    use std::sync::atomic::Ordering;
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64);
    eprintln!("impairment seed {seed} (replay: set it in this test)");
    let (site, proxy) = Site::behind_proxy("link-impaired", "", 100, seed).await;
    let cloud = site.cloud();
    let edge = site.edge();
    assert_eq!(publish(edge.port(), 0..10_000).await, 10_000);
    wait_until(
        60,
        "the first half reaches the cloud through 10% loss",
        || edge.metric("ferry_edge_link_records_acked_total") > 0,
    );
    proxy.control.cut.store(true, Ordering::Relaxed);
    assert_eq!(publish(edge.port(), 10_000..20_000).await, 10_000);
    tokio::time::sleep(Duration::from_secs(30)).await;
    proxy.control.cut.store(false, Ordering::Relaxed);
    wait_until(90, "the outbox is emptied after the cut", || {
        edge.metric("ferry_edge_outbox_records") == 0
    });
    assert!(
        edge.metric("ferry_edge_link_connects_total") >= 2,
        "the link came back after the cut"
    );
    assert!(proxy.control.dropped.load(Ordering::Relaxed) > 0);
    drop(edge);
    assert!(cloud.terminate().success());
    assert!(
        site.cloud_log() == numbers(20_000),
        "each message once, in order"
    );
}

/// The cloud's `GET /api/fleet/gw-1` document.
fn fleet_edge(cloud: &Edge) -> serde_json::Value {
    let response = cloud.http_get("/api/fleet/gw-1");
    let body = response.split("\r\n\r\n").nth(1).unwrap_or_default();
    serde_json::from_str(body).unwrap_or(serde_json::Value::Null)
}

/// The cloud's fleet view is what the edge tells of itself (STATUS frames, link version 2):
/// while a sensor publishes steadily, the edge is linked with its outbox, budget, inflow
/// counter and certificate; cut off, it is offline and its estimated backlog grows; back,
/// its history has the backlog it came back with and its outbox falls to zero; its link
/// events tell the story.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fleet_shows_the_edge_as_it_tells_itself_through_a_cut() {
    let (site, proxy) = Site::behind_proxy(
        "link-fleet",
        "status_secs = 1\nmax_outbox_bytes = 50000000",
        0,
        1,
    )
    .await;
    let cloud = site.cloud();
    let edge = site.edge();
    let sensor = ferry_tests::clients::Sensor::start(edge.port());
    wait_until(60, "the edge is linked and has told its figures", || {
        let e = fleet_edge(&cloud);
        e["state"] == "linked"
            && e["link"]["version"] == 2
            && e["outbox"]["budget_bytes"] == 50_000_000
            && e["outbox"]["last_seq"].as_u64() >= Some(100)
            && e["rates"]["inflow"].as_f64() > Some(0.0)
    });
    let e = fleet_edge(&cloud);
    let now_secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    assert!(
        e["cert_expires_unix_secs"].as_u64() > Some(now_secs + 9 * 365 * 86_400),
        "{e}"
    );
    assert!(e["serial"].as_str().is_some_and(|s| !s.is_empty()), "{e}");

    proxy.control.cut.store(true, Ordering::Relaxed);
    wait_until(30, "the cut edge is offline", || {
        fleet_edge(&cloud)["state"] == "offline"
    });
    let estimate = |e: &serde_json::Value| e["estimate"]["records"].as_u64().unwrap_or(0);
    let first = estimate(&fleet_edge(&cloud));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let e = fleet_edge(&cloud);
    assert!(estimate(&e) > first, "the estimated backlog grows: {e}");
    assert_eq!(e["growing"], true, "{e}");
    let list = cloud.http_get("/api/fleet");
    let list: serde_json::Value =
        serde_json::from_str(list.split("\r\n\r\n").nth(1).expect("a body")).expect("json");
    assert_eq!(list["counts"]["offline"], 1, "{list}");
    assert_eq!(list["counts"]["growing"], 1, "{list}");
    assert_eq!(list["edges"][0]["edge"], "gw-1", "{list}");
    tokio::time::sleep(Duration::from_secs(3)).await;

    proxy.control.cut.store(false, Ordering::Relaxed);
    wait_until(
        60,
        "back, with the backlog it came back with, drained",
        || {
            let e = fleet_edge(&cloud);
            let Some(back_at) = e["events"]
                .as_array()
                .and_then(|ev| ev.iter().rev().find(|x| x["kind"] == "linked"))
                .and_then(|x| x["at_unix_ms"].as_u64())
            else {
                return false;
            };
            let came_back_with = e["history"].as_array().is_some_and(|h| {
                h.iter()
                    .any(|s| s[0].as_u64() >= Some(back_at) && s[1].as_u64() > Some(0))
            });
            e["state"] == "linked" && came_back_with && e["outbox"]["records"] == 0
        },
    );
    let sent = sensor.stop().await as u64;
    wait_until(30, "the edge's own count of what it took", || {
        fleet_edge(&cloud)["outbox"]["last_seq"].as_u64() == Some(sent)
    });
    let e = fleet_edge(&cloud);
    let kinds: Vec<&str> = e["events"]
        .as_array()
        .expect("events")
        .iter()
        .filter_map(|x| x["kind"].as_str())
        .collect();
    assert!(
        kinds.starts_with(&["linked", "unlinked", "linked"]),
        "{kinds:?}"
    );
    assert!(e["acked_records"].as_u64() >= Some(sent), "{e}");
    assert_eq!(e["committed"][0]["class"], 0, "{e}");
}

/// The cloud sees the edge's packets come from a new address mid-stream (QUIC connection
/// migration): the link goes on without reconnecting, nothing lost or doubled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_link_survives_the_edge_changing_its_address() {
    let (site, proxy) = Site::behind_proxy("link-migrate", "", 0, 1).await;
    let cloud = site.cloud();
    let edge = site.edge();
    assert_eq!(publish(edge.port(), 0..5_000).await, 5_000);
    wait_until(60, "the first half is acknowledged", || {
        edge.metric("ferry_edge_link_records_acked_total") >= 5_000
    });
    proxy.control.rebind.notify_one();
    wait_until(60, "the proxy sends from a new address", || {
        proxy.control.rebinds.load(Ordering::Relaxed) == 1
    });
    assert_eq!(publish(edge.port(), 5_000..10_000).await, 5_000);
    wait_until(60, "the outbox is emptied", || {
        edge.metric("ferry_edge_outbox_records") == 0
    });
    assert_eq!(
        edge.metric("ferry_edge_link_connects_total"),
        1,
        "the same connection throughout"
    );
    drop(edge);
    assert!(cloud.terminate().success());
    assert!(
        site.cloud_log() == numbers(10_000),
        "each message once, in order"
    );
}

/// `ferry-cloud demo`: the sensor's readings reach a subscriber on the cloud, under the
/// edge's id, through the edge and the link.
#[test]
fn the_demo_delivers_sensor_readings_to_the_cloud() {
    let dir = temp_dir("demo");
    let demo = Edge::cloud_in(
        &dir,
        &[
            "demo",
            "--edge-listen",
            "127.0.0.1:0",
            "--cloud-listen",
            "127.0.0.1:0",
            "--link-listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--kafka-listen",
            "127.0.0.1:0",
            "--interval-ms",
            "100",
        ],
    );
    let out = ferry_tests::process::mosquitto_at(
        "mosquitto_sub",
        &demo.port().to_string(),
        &["-t", "demo-edge/#", "-v", "-C", "5", "-W", "30"],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 5);
    for l in lines {
        assert!(
            l.starts_with("demo-edge/sensors/demo/temperature {\"sensor\":\"t1\""),
            "{l}"
        );
    }
    // The admin API shows the edge linked, and what the cloud committed of it.
    use std::io::{Read, Write};
    let mut stream =
        std::net::TcpStream::connect(demo.admin_addr().expect("admin listener")).expect("connect");
    write!(
        stream,
        "GET /api/edges HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .expect("write");
    let mut page = String::new();
    stream.read_to_string(&mut page).expect("read");
    assert!(page.contains("\"edge\":\"demo-edge\""), "{page}");
    assert!(page.contains("\"connected\":true"), "{page}");
    assert!(page.contains("\"committed_seq\""), "{page}");
    let mut stream =
        std::net::TcpStream::connect(demo.admin_addr().expect("admin listener")).expect("connect");
    write!(
        stream,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .expect("write");
    let mut page = String::new();
    stream.read_to_string(&mut page).expect("read");
    assert!(page.contains("ferry_cloud_link_edges 1\n"), "{page}");
    assert!(
        page.contains("ferry_cloud_link_records_total{edge=\"demo-edge\"}"),
        "{page}"
    );
    drop(demo);
    let _ = std::fs::remove_dir_all(&dir);
}
