//! ferry-cloud's Kafka front against real Kafka clients: kcat and confluent-kafka (both
//! librdkafka), and raw bad requests.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::Duration;

use ferry_tests::process::{mosquitto_at, python_client, temp_dir, Edge, Subscription};

/// A ferry-cloud with MQTT and Kafka on ephemeral ports, in `dir`, and a stream `grp` of
/// three partitions.
fn cloud(dir: &std::path::Path) -> Edge {
    cloud_with(dir, "")
}

/// As [`cloud`], with `more` added to the configuration.
fn cloud_with(dir: &std::path::Path, more: &str) -> Edge {
    let config = dir.join("cloud.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = [\"127.0.0.1:0\"]\n[kafka]\nlisten = \"127.0.0.1:0\"\n\
             [[route]]\nfilter = \"grp/#\"\nstream = \"grp\"\npartitions = 3\n{more}"
        ),
    )
    .expect("write config");
    Edge::cloud_in(
        &dir.join("data"),
        &["--config", config.to_str().expect("utf8")],
    )
}

fn kcat(bootstrap: &str, args: &[&str], input: Option<&str>) -> String {
    let mut child = Command::new("kcat")
        .args(["-b", bootstrap])
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("kcat must be installed (apt-get install kcat)");
    let mut stdin = child.stdin.take().expect("stdin");
    if let Some(text) = input {
        stdin.write_all(text.as_bytes()).expect("write to kcat");
    }
    drop(stdin);
    let out = child.wait_with_output().expect("kcat ends");
    assert!(out.status.success(), "kcat {args:?}: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// kcat lists the streams, reads what MQTT clients published (key = topic, MQTT metadata in
/// headers), produces to a new topic (created on the fly), and reads that back.
#[test]
fn kcat_lists_consumes_and_produces() {
    let dir = temp_dir("kafka-kcat");
    let node = cloud(&dir);
    let bootstrap = node.kafka_addr().expect("a Kafka listener").to_string();
    let port = node.port().to_string();
    for i in 1..=3 {
        let out = mosquitto_at(
            "mosquitto_pub",
            &port,
            &[
                "-t",
                &format!("sensors/t{i}"),
                "-m",
                &format!("reading {i}"),
                "-q",
                "1",
            ],
        );
        assert!(out.status.success());
    }
    let listing = kcat(&bootstrap, &["-L"], None);
    assert!(
        listing.contains("topic \"mqtt\" with 1 partitions"),
        "{listing}"
    );
    assert!(
        listing.contains(&format!("broker 0 at {bootstrap}")),
        "{listing}"
    );
    let got = kcat(
        &bootstrap,
        &[
            "-C",
            "-t",
            "mqtt",
            "-o",
            "beginning",
            "-e",
            "-f",
            "%k=%s@%o %h\n",
        ],
        None,
    );
    let lines: Vec<&str> = got.lines().collect();
    assert_eq!(lines.len(), 3, "{got}");
    for (i, line) in lines.iter().enumerate() {
        let n = i + 1;
        assert!(
            line.starts_with(&format!("sensors/t{n}=reading {n}@{i} mqtt.qos=1")),
            "{line}"
        );
    }
    kcat(
        &bootstrap,
        &["-P", "-t", "orders", "-K", ":"],
        Some("k1:hello\nk2:world\n"),
    );
    let orders = kcat(
        &bootstrap,
        &[
            "-C",
            "-t",
            "orders",
            "-o",
            "beginning",
            "-e",
            "-f",
            "%k=%s@%o\n",
        ],
        None,
    );
    assert_eq!(orders, "k1=hello@0\nk2=world@1\n");
    drop(node);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A record produced by a Kafka client whose key is an MQTT topic name reaches the cloud's
/// MQTT subscribers under that topic; one whose key is not stays with Kafka consumers.
#[test]
fn kafka_records_reach_mqtt_subscribers_under_their_key() {
    let dir = temp_dir("kafka-to-mqtt");
    let node = cloud(&dir);
    let bootstrap = node.kafka_addr().expect("a Kafka listener").to_string();
    let sub = Subscription::open(&node.port().to_string(), "plant-sub", "plant/#", &["-v"]);
    kcat(
        &bootstrap,
        &["-P", "-t", "orders", "-K", "|"],
        Some("plant/line1|start\nnot/a/topic/#|x\nplant/line2|stop\n"),
    );
    let out = sub.read(2);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "plant/line1 start\nplant/line2 stop\n"
    );
    drop(node);
    let _ = std::fs::remove_dir_all(&dir);
}

/// confluent-kafka: 1,000 records produced with acks=all, consumed back in order from an
/// assigned partition, and found again by timestamp; then the same with an idempotent
/// producer (InitProducerId, sequence numbers).
#[test]
fn confluent_kafka_produces_consumes_and_seeks_by_time() {
    let dir = temp_dir("kafka-python");
    let node = cloud(&dir);
    let bootstrap = node.kafka_addr().expect("a Kafka listener").to_string();
    for (topic, mode) in [("py", "plain"), ("py-idem", "idempotent")] {
        python_roundtrip(&bootstrap, topic, mode);
    }
    drop(node);
    let _ = std::fs::remove_dir_all(&dir);
}

fn python_roundtrip(bootstrap: &str, topic: &str, mode: &str) {
    python_client("kafka_roundtrip.py", &[bootstrap, topic, "1000", mode]);
}

/// A consumer group of three (confluent-kafka) on a stream of three partitions: one member
/// leaves, one dies; the group rebalances and consumes every record; a new member resumes
/// after the committed offsets.
#[test]
fn a_consumer_group_rebalances_and_resumes_from_its_commits() {
    let dir = temp_dir("kafka-group");
    let node = cloud(&dir);
    let bootstrap = node.kafka_addr().expect("a Kafka listener").to_string();
    python_client("kafka_group.py", &[&bootstrap, "grp", "3000"]);
    // The node serves on after the group's comings and goings.
    let listing = kcat(&bootstrap, &["-L"], None);
    assert!(
        listing.contains("topic \"grp\" with 3 partitions"),
        "{listing}"
    );
    drop(node);
    let _ = std::fs::remove_dir_all(&dir);
}

/// confluent-kafka's AdminClient creates a topic of four partitions with a retention
/// setting, reads the setting back, and is refused a setting Ferry does not have; it deletes
/// the topic (made again, it has no records and no commits), and is refused the deletion of
/// a stream an MQTT route writes to and of one that does not exist. A topic made without a
/// partition count gets `[log.streams] partitions`.
#[test]
fn the_admin_client_creates_and_describes_topics() {
    let dir = temp_dir("kafka-admin");
    let node = cloud_with(&dir, "[log.streams]\npartitions = 2\n");
    let bootstrap = node.kafka_addr().expect("a Kafka listener").to_string();
    let stdout = python_client("kafka_admin.py", &[&bootstrap, "grp", "2"]);
    assert!(stdout.contains("defaulted: 2 partitions"), "{stdout}");
    assert!(stdout.contains("refused: INVALID_CONFIG"), "{stdout}");
    assert!(stdout.contains("again: TOPIC_ALREADY_EXISTS"), "{stdout}");
    assert!(stdout.contains("delete: NO_ERROR"), "{stdout}");
    assert!(
        stdout.contains("delete again: UNKNOWN_TOPIC_OR_PART"),
        "{stdout}"
    );
    assert!(
        stdout.contains("delete routed: POLICY_VIOLATION"),
        "{stdout}"
    );
    drop(node);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Sends one raw request and reads one response frame (its 4-byte length, then the body);
/// panics if none comes within 10 s.
fn raw_reply(addr: std::net::SocketAddr, request: &[u8]) -> Vec<u8> {
    let mut s = raw_send(addr, request);
    let mut len = [0u8; 4];
    s.read_exact(&mut len).expect("a response frame's length");
    let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
    s.read_exact(&mut body).expect("a response frame's body");
    [len.to_vec(), body].concat()
}

/// Sends one raw request and asserts that the node closes the connection without an
/// answer: an end of stream (or a reset), not a read that times out after 10 s with the
/// connection still open, which is what a hung node would look like.
fn assert_closed_without_answer(addr: std::net::SocketAddr, request: &[u8]) {
    let mut s = raw_send(addr, request);
    let mut got = Vec::new();
    match s.read_to_end(&mut got) {
        Ok(_) => assert!(got.is_empty(), "answered {got:?} to {request:?}"),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Err(e) => panic!("the node did not close the connection after {request:?}: {e}"),
    }
}

fn raw_send(addr: std::net::SocketAddr, request: &[u8]) -> TcpStream {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    s.write_all(request).expect("write");
    s
}

/// Bad requests get the protocol's answer or a closed connection, never a crash: an
/// ApiVersions of an unknown version gets the v0 answer with UNSUPPORTED_VERSION (KIP-511),
/// an unknown API key and an oversize frame close the connection; the node serves on.
#[test]
fn bad_requests_get_an_error_or_a_closed_connection() {
    let dir = temp_dir("kafka-bad");
    let node = cloud(&dir);
    let addr = node.kafka_addr().expect("a Kafka listener");
    // ApiVersions (18) v99, correlation id 7, client id "x".
    let mut req = vec![0, 0, 0, 11, 0, 18, 0, 99, 0, 0, 0, 7, 0, 1, b'x'];
    req[3] = (req.len() - 4) as u8;
    let got = raw_reply(addr, &req);
    assert!(got.len() > 14, "{got:?}");
    assert_eq!(&got[4..8], &[0, 0, 0, 7], "the correlation id");
    assert_eq!(&got[8..10], &[0, 35], "UNSUPPORTED_VERSION");
    // An unknown API key: closed, nothing answered.
    assert_closed_without_answer(addr, &[0, 0, 0, 8, 0x7f, 0x7f, 0, 0, 0, 0, 0, 1]);
    // A frame of 2 GB announced: closed before anything is read.
    assert_closed_without_answer(addr, &[0x7f, 0xff, 0xff, 0xff, 0, 18, 0, 0]);
    // A truncated Metadata request: closed.
    assert_closed_without_answer(addr, &[0, 0, 0, 6, 0, 3, 0, 9, 0, 0]);
    // Still serving.
    let listing = kcat(&addr.to_string(), &["-L"], None);
    assert!(listing.contains("1 brokers"), "{listing}");
    drop(node);
    let _ = std::fs::remove_dir_all(&dir);
}
