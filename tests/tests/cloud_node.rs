//! ferry-cloud as a process: MQTT clients others wrote (rumqttc, the Mosquitto clients)
//! publish to it and subscribe to it; what they publish is in the log, under the routes.

use std::io::Write;
use std::process::Command;
use std::time::Duration;

use ferry_cloud::routes::kafka_partition;
use ferry_tests::clients::next_incoming;
use ferry_tests::process::{mosquitto_at, mosquitto_pub_lines, temp_dir, Edge, Subscription};

/// (key, value, headers) of every record of a stream partition, in offset order. The node
/// must be stopped: this opens its log.
fn stream(dir: &std::path::Path, name: &str, partition: u32) -> Vec<ferry_tests::log::TextRecord> {
    ferry_tests::log::records(&dir.join("log"), name, partition)
}

/// The whole answer (head and body) to `GET path`.
fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    use std::io::Read;
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .expect("request");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("response");
    out
}

/// A node in this process, on an ephemeral port, with a rumqttc client subscribed to
/// `filter` (its SUBACK already in).
async fn node_with_subscriber(
    name: &str,
    filter: &str,
) -> (
    ferry_cloud::node::Node,
    rumqttc::AsyncClient,
    rumqttc::EventLoop,
) {
    use ferry_cloud::node::{CloudConfig, Node};
    use rumqttc::{AsyncClient, Incoming, MqttOptions, QoS};
    let mut config = CloudConfig::default();
    config.server.listen = vec!["127.0.0.1:0".parse().expect("addr")];
    config.server.data_dir = temp_dir(name);
    ferry_tests::services::in_process(&mut config);
    let node = Node::start(config, std::future::pending())
        .await
        .expect("the node starts");
    let port = node.mqtt_addrs()[0].port();
    let (sub, mut events) = AsyncClient::new(MqttOptions::new(name, "127.0.0.1", port), 100);
    sub.subscribe(filter, QoS::AtLeastOnce)
        .await
        .expect("subscribe");
    loop {
        if let Incoming::SubAck(_) = next_incoming(&mut events, "SUBACK").await {
            return (node, sub, events);
        }
    }
}

/// Publishes each line as one message with mosquitto_pub -l.
fn publish_lines(port: &str, topic: &str, qos: &str, lines: &[String]) {
    let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
    let out = mosquitto_pub_lines(port, &["-t", topic, "-q", qos], &text);
    assert!(out.status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloud_publishes_reach_cloud_subscribers_and_the_routed_streams() {
    use rumqttc::{AsyncClient, Incoming, MqttOptions, QoS};
    let dir = temp_dir("cloud-routes");
    let config = dir.join("ferry-cloud.toml");
    std::fs::write(
        &config,
        "[admin]\nlisten = \"127.0.0.1:0\"\n[[route]]\nfilter = \"plant/+/temp\"\nstream = \"temps\"\npartitions = 2\n",
    )
    .expect("config");
    let cloud = Edge::cloud_in(
        &dir,
        &[
            "--listen",
            "127.0.0.1:0",
            "--config",
            config.to_str().expect("utf8"),
        ],
    );
    let port = cloud.port().to_string();

    let mut opts = MqttOptions::new("cloud-sub", "127.0.0.1", cloud.port());
    opts.set_keep_alive(Duration::from_secs(30));
    let (sub, mut events) = AsyncClient::new(opts, 100);
    sub.subscribe("plant/#", QoS::AtLeastOnce)
        .await
        .expect("subscribe");
    loop {
        if let Incoming::SubAck(_) = next_incoming(&mut events, "SUBACK").await {
            break;
        }
    }
    let temps: Vec<String> = (0..50).map(|i| format!("t{i}")).collect();
    let logs: Vec<String> = (0..50).map(|i| format!("l{i}")).collect();
    let (p1, p2) = (port.clone(), port.clone());
    let (t, l) = (temps.clone(), logs.clone());
    let publishers = tokio::task::spawn_blocking(move || {
        publish_lines(&p1, "plant/a/temp", "1", &t);
        publish_lines(&p2, "plant/a/log", "1", &l);
    });
    let (mut got_temps, mut got_logs) = (Vec::new(), Vec::new());
    while got_temps.len() + got_logs.len() < 100 {
        if let Incoming::Publish(p) = next_incoming(&mut events, "the messages").await {
            let payload = String::from_utf8(p.payload.to_vec()).expect("utf8");
            match p.topic.as_str() {
                "plant/a/temp" => got_temps.push(payload),
                "plant/a/log" => got_logs.push(payload),
                other => panic!("unexpected topic {other}"),
            }
        }
    }
    publishers.await.expect("publishers");
    assert_eq!(
        (got_temps, got_logs),
        (temps.clone(), logs.clone()),
        "every message, in order, once"
    );
    // Retained, through the log: a later subscriber gets it.
    let out = mosquitto_at(
        "mosquitto_pub",
        &port,
        &["-t", "plant/a/state", "-m", "on", "-r", "-q", "1"],
    );
    assert!(out.status.success());
    let out = mosquitto_at(
        "mosquitto_sub",
        &port,
        &["-t", "plant/a/state", "-C", "1", "-W", "60", "-v"],
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "plant/a/state on"
    );
    // The admin API sees the streams and the appends.
    let admin = cloud.admin_addr().expect("admin listener");
    let streams = http_get(admin, "/api/streams");
    assert!(streams.starts_with("HTTP/1.1 200"), "{streams}");
    assert!(
        streams.contains("\"name\":\"temps\"") && streams.contains("\"high_watermark\":50"),
        "{streams}"
    );
    let metrics = http_get(admin, "/metrics");
    assert!(metrics.contains("ferry_log_records_total 101"), "{metrics}");
    assert!(http_get(admin, "/api/health").contains("{\"status\":\"ok\"}"));
    let clients = http_get(admin, "/api/clients");
    assert!(clients.contains("\"client_id\":\"cloud-sub\""), "{clients}");
    assert!(http_get(admin, "/nope").starts_with("HTTP/1.1 404"));
    // The cluster's nodes: on the object backend this one, registered with its MQTT
    // address; on local disk there is none.
    let cluster = http_get(admin, "/api/cluster");
    if ferry_tests::services::on_object_backend() {
        assert!(cluster.starts_with("HTTP/1.1 200"), "{cluster}");
        let mqtt = format!("\"mqtt\":[\"127.0.0.1:{}\"]", cloud.port());
        assert!(cluster.contains(&mqtt), "{cluster}");
    } else {
        assert!(cluster.starts_with("HTTP/1.1 404"), "{cluster}");
    }
    assert!(cloud.terminate().success());
    if ferry_tests::services::on_object_backend() {
        // Stopped with SIGTERM, it left: no node is registered any more.
        let text = std::fs::read_to_string(ferry_tests::services::object_config_file(&dir))
            .expect("the object backend's config");
        let config: ferry_cloud::config::CloudConfig = toml::from_str(&text).expect("config");
        let log = ferry_cloud::log::ObjectLog::open(&config.log.object.expect("[log.object]"))
            .expect("open");
        assert_eq!(log.members().expect("members"), []);
    }

    // In the log: the route's stream, one topic in one partition, key = topic.
    let p = kafka_partition(b"plant/a/temp", 2);
    let recs = stream(&dir, "temps", p);
    assert_eq!(recs.iter().map(|r| r.1.clone()).collect::<Vec<_>>(), temps);
    assert!(recs.iter().all(|r| r.0 == "plant/a/temp"));
    assert_eq!(recs[0].2[0], ("mqtt.qos".to_owned(), "1".to_owned()));
    assert!(stream(&dir, "temps", 1 - p).is_empty());
    // Everything else in the default stream `mqtt`.
    let rest = stream(&dir, "mqtt", 0);
    assert_eq!(
        rest.iter()
            .filter(|r| r.0 == "plant/a/log")
            .map(|r| r.1.clone())
            .collect::<Vec<_>>(),
        logs
    );
    assert!(rest
        .iter()
        .any(|r| r.0 == "plant/a/state" && r.2.contains(&("mqtt.retain".into(), "1".into()))));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_persistent_cloud_session_gets_what_was_acknowledged_before_a_kill_9() {
    let dir = temp_dir("cloud-persistent");
    let cloud = Edge::cloud_in(&dir, &["--listen", "127.0.0.1:0"]);
    let port = cloud.port().to_string();
    // A persistent session subscribes, then goes away.
    Subscription::open(&port, "keeper", "x/#", &[]);
    let lines: Vec<String> = (0..300).map(|i| format!("m{i}")).collect();
    let p = port.clone();
    let l = lines.clone();
    tokio::task::spawn_blocking(move || publish_lines(&p, "x/y", "1", &l))
        .await
        .expect("publisher");
    // Every message was acknowledged (mosquitto_pub waited for each PUBACK); the node dies.
    cloud.kill();

    let cloud = Edge::cloud_in(&dir, &["--listen", "127.0.0.1:0"]);
    let port = cloud.port().to_string();
    // The session resumes; a marker published after it ends the read (it comes after
    // everything queued before it, copies included).
    let mut opts = rumqttc::MqttOptions::new("keeper", "127.0.0.1", cloud.port());
    opts.set_clean_session(false);
    let (_keeper, mut events) = rumqttc::AsyncClient::new(opts, 100);
    while !matches!(
        next_incoming(&mut events, "connack").await,
        rumqttc::Incoming::ConnAck(_)
    ) {}
    let p = port.clone();
    tokio::task::spawn_blocking(move || publish_lines(&p, "x/end", "1", &["end".to_owned()]))
        .await
        .expect("marker");
    let mut got: Vec<String> = Vec::new();
    loop {
        if let rumqttc::Incoming::Publish(m) = next_incoming(&mut events, "the queue").await {
            let text = String::from_utf8_lossy(&m.payload).into_owned();
            if text == "end" {
                break;
            }
            got.push(text);
        }
    }
    // At least once: each message is there, the first copies in order.
    let mut firsts: Vec<String> = Vec::new();
    for m in &got {
        if !firsts.contains(m) {
            firsts.push(m.clone());
        }
    }
    assert_eq!(firsts, lines, "received {} messages", got.len());
}

#[test]
fn sighup_puts_new_routes_in_force() {
    let dir = temp_dir("cloud-reload");
    let config = dir.join("ferry-cloud.toml");
    std::fs::write(&config, "").expect("config");
    let cloud = Edge::cloud_in(
        &dir,
        &[
            "--listen",
            "127.0.0.1:0",
            "--config",
            config.to_str().expect("utf8"),
        ],
    );
    let port = cloud.port().to_string();
    assert!(mosquitto_at(
        "mosquitto_pub",
        &port,
        &["-t", "a/x", "-m", "before", "-q", "1"]
    )
    .status
    .success());
    let routes = "[[route]]\nfilter = \"a/#\"\nstream = \"alpha\"\n";
    ferry_tests::services::write_cloud_config(&config, &dir, routes);
    cloud.reload_and_wait_for("SIGHUP: routes reloaded");
    assert!(mosquitto_at(
        "mosquitto_pub",
        &port,
        &["-t", "a/x", "-m", "after", "-q", "1"]
    )
    .status
    .success());
    assert!(cloud.terminate().success());
    let values = |s: &str| {
        stream(&dir, s, 0)
            .into_iter()
            .map(|r| r.1)
            .collect::<Vec<_>>()
    };
    assert_eq!(values("mqtt"), ["before"]);
    assert_eq!(values("alpha"), ["after"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_from_an_edge_reach_cloud_subscribers_once_through_the_same_path() {
    use bytes::Bytes;
    use ferry_cloud::ingest::EdgeRecord;
    use ferry_protocol::mqtt::{Properties, QoS as Q};
    use ferry_protocol::topic::TopicName;
    use rumqttc::Incoming;

    let (node, _sub, mut events) = node_with_subscriber("cloud-app", "gw1/#").await;
    let record = |seq: u64| EdgeRecord {
        seq,
        topic: TopicName::new("sensors/t").expect("topic"),
        payload: Bytes::from(format!("r{seq}")),
        qos: Q::AtLeastOnce,
        retain: false,
        properties: Properties::default(),
        timestamp_ms: 1_000,
    };
    let batch: Vec<_> = (1..=20).map(record).collect();
    assert_eq!(
        node.ingest
            .ingest("gw1", 0, batch.clone())
            .await
            .expect("ingest"),
        20
    );
    // The edge did not hear the answer and sends it all again, then one more.
    assert_eq!(
        node.ingest.ingest("gw1", 0, batch).await.expect("resend"),
        20
    );
    assert_eq!(
        node.ingest
            .ingest("gw1", 0, vec![record(21)])
            .await
            .expect("ingest"),
        21
    );
    let mut got = Vec::new();
    while got.len() < 21 {
        if let Incoming::Publish(p) = next_incoming(&mut events, "records from the edge").await {
            assert_eq!(p.topic, "gw1/sensors/t", "the cloud-side topic");
            got.push(String::from_utf8(p.payload.to_vec()).expect("utf8"));
        }
    }
    assert_eq!(
        got,
        (1..=21).map(|s| format!("r{s}")).collect::<Vec<_>>(),
        "each once, in order"
    );
}

#[test]
fn ferry_cloud_pki_makes_a_ca_and_certificates_that_openssl_verifies() {
    let dir = temp_dir("pki");
    let bin = ferry_tests::process::binary("ferry-cloud", "ferry-cloud");
    let run = |args: &[&str]| {
        Command::new(&bin)
            .args(["pki"])
            .args(args)
            .arg("--dir")
            .arg(&dir)
            .output()
            .expect("ferry-cloud runs")
    };
    assert!(run(&["init"]).status.success());
    let out = run(&["issue-edge", "gw-7"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("edges/gw-7.key"));
    assert!(run(&["issue-node", "cloud.example"]).status.success());
    assert!(
        !run(&["init"]).status.success(),
        "an existing CA is never replaced"
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dir.join("edges/gw-7.key"))
        .expect("key")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    // OpenSSL agrees that the chain holds (scripts/test.sh installs it).
    let out = Command::new("openssl")
        .arg("verify")
        .arg("-CAfile")
        .arg(dir.join("ca.crt"))
        .arg(dir.join("edges/gw-7.crt"))
        .arg(dir.join("nodes/cloud.example.crt"))
        .output()
        .expect("openssl must be installed (apt-get install openssl)");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compressed_producer_batch_in_the_log_reaches_mqtt_subscribers() {
    use ferry_cloud::log::AppendData;
    use ferry_protocol::kafka::{BatchBuilder, Compression, Header};
    use rumqttc::Incoming;

    let (node, _sub, mut events) = node_with_subscriber("kafka-reader", "plant/#").await;
    for compression in [Compression::Lz4, Compression::Zstd] {
        // What a Kafka producer would send: key = topic, compressed.
        let mut b = BatchBuilder::new(1_000);
        for i in 0..10 {
            let qos = [Header {
                key: "mqtt.qos",
                value: Some(b"1"),
            }];
            b.push(
                1_000,
                Some(b"plant/line-1"),
                Some(format!("{compression:?} {i}").as_bytes()),
                &qos,
            );
        }
        let batch = b.finish_with(0, compression);
        node.log
            .append(
                "mqtt",
                0,
                AppendData::Batches(bytes::BytesMut::from(&batch[..])),
            )
            .await
            .expect("append");
        for i in 0..10 {
            loop {
                if let Incoming::Publish(p) =
                    next_incoming(&mut events, "a record of the batch").await
                {
                    assert_eq!(p.topic, "plant/line-1");
                    assert_eq!(p.payload, format!("{compression:?} {i}"));
                    break;
                }
            }
        }
    }
}

#[test]
fn message_expiry_survives_the_trip_through_the_log() {
    let dir = temp_dir("cloud-expiry");
    let cloud = Edge::cloud_in(&dir, &["--listen", "127.0.0.1:0"]);
    let port = cloud.port().to_string();
    let v5 = ["-V", "mqttv5"];
    // A persistent MQTT 5 session subscribes and goes away.
    let sub = Subscription::open(
        &port,
        "expiry-sub",
        "exp/#",
        &["-V", "mqttv5", "-x", "600", "-v"],
    );
    for (topic, secs) in [("exp/short", "1"), ("exp/long", "60")] {
        let args = [
            "-t",
            topic,
            "-m",
            secs,
            "-q",
            "1",
            "-D",
            "publish",
            "message-expiry-interval",
            secs,
        ];
        assert!(
            mosquitto_at("mosquitto_pub", &port, &[&v5[..], &args[..]].concat())
                .status
                .success()
        );
    }
    // Time passes (not a wait for an event): the 1 s message's life ends meanwhile.
    std::thread::sleep(Duration::from_millis(2500));
    // Messages come in order: had the expired one been kept, it would come first.
    let out = sub.read(1);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "exp/long 60",
        "the 1 s message expired"
    );
}

/// The cloud's password and ACL files (Mosquitto's formats) are read again on SIGHUP: a user
/// added to both can connect, subscribe and read only after the reload.
#[test]
fn sighup_reloads_the_password_and_acl_files() {
    let dir = temp_dir("cloud-auth-reload");
    let (passwd, acl, config) = (dir.join("passwd"), dir.join("acl"), dir.join("cloud.toml"));
    let mosquitto_passwd = |args: &[&str]| {
        let status = Command::new("mosquitto_passwd")
            .args(args)
            .status()
            .expect("mosquitto_passwd must be installed (apt-get install mosquitto)");
        assert!(status.success(), "mosquitto_passwd {args:?}");
    };
    let path = |p: &std::path::Path| p.to_str().expect("utf8").to_owned();
    mosquitto_passwd(&["-c", "-b", &path(&passwd), "alice", "a-secret"]);
    std::fs::write(&acl, "user alice\ntopic readwrite r/#\n").expect("acl");
    std::fs::write(
        &config,
        format!(
            "[auth]\npassword_file = {:?}\nacl_file = {:?}\n",
            passwd, acl
        ),
    )
    .expect("config");
    let cloud = Edge::cloud_in(
        &dir,
        &["--listen", "127.0.0.1:0", "--config", &path(&config)],
    );
    let port = cloud.port().to_string();
    let as_user = |user: &str, pass: &str, tool: &str, args: &[&str]| {
        let mut all = vec!["-u", user, "-P", pass];
        all.extend_from_slice(args);
        mosquitto_at(tool, &port, &all)
    };
    let bob_subscribes = || {
        as_user(
            "bob",
            "b-secret",
            "mosquitto_sub",
            &["-i", "bob", "-c", "-q", "1", "-t", "r/#", "-E"],
        )
    };
    assert!(as_user(
        "alice",
        "a-secret",
        "mosquitto_pub",
        &["-t", "r/x", "-m", "1", "-q", "1"]
    )
    .status
    .success());
    assert!(!bob_subscribes().status.success(), "bob is not a user yet");

    mosquitto_passwd(&["-b", &path(&passwd), "bob", "b-secret"]);
    std::fs::write(
        &acl,
        "user alice\ntopic readwrite r/#\nuser bob\ntopic read r/#\n",
    )
    .expect("acl");
    cloud.reload_and_wait_for("SIGHUP: password and ACL files reloaded");
    let subscribed = bob_subscribes();
    assert!(subscribed.status.success(), "{subscribed:?}");
    assert!(as_user(
        "alice",
        "a-secret",
        "mosquitto_pub",
        &["-t", "r/x", "-m", "for bob", "-q", "1"]
    )
    .status
    .success());
    let read = as_user(
        "bob",
        "b-secret",
        "mosquitto_sub",
        &[
            "-i", "bob", "-c", "-q", "1", "-t", "r/#", "-C", "1", "-W", "30",
        ],
    );
    assert_eq!(
        String::from_utf8_lossy(&read.stdout),
        "for bob\n",
        "{read:?}"
    );
    assert!(cloud.terminate().success());
}
