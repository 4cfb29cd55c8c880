//! ferry-edge as a process, driven by clients others wrote: the Mosquitto command-line
//! clients, rumqttc, and a raw socket for bad input.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use bytes::BytesMut;
use ferry_protocol::mqtt::{decode, Connect, Packet, ProtocolVersion, ReasonCode, MAX_PACKET_SIZE};
use ferry_tests::clients::{next_incoming, WAIT};
use ferry_tests::process::{
    binary, mosquitto, mosquitto_at, mosquitto_pub_lines, Edge, Subscription,
};

const LOCAL: &[&str] = &["--listen", "127.0.0.1:0"];

#[test]
fn mosquitto_clients_publish_and_subscribe_through_the_edge() {
    use std::io::BufRead;

    let edge = Edge::start(LOCAL);
    let port = edge.port().to_string();
    for (version, qos) in [("mqttv311", "1"), ("mqttv5", "2")] {
        // -d prints the protocol exchange, so the test sees the SUBACK before publishing.
        // stdbuf: its stdout is a pipe, which would otherwise be block-buffered.
        let mut sub = Command::new("stdbuf")
            .args([
                "-oL",
                "mosquitto_sub",
                "-h",
                "127.0.0.1",
                "-p",
                &port,
                "-V",
                version,
                "-q",
                qos,
                "-t",
                "plant/+/temp",
                "-C",
                "3",
                "-W",
                "15",
                "-v",
                "-d",
            ])
            .stdout(Stdio::piped())
            .spawn()
            .expect("mosquitto_sub runs");
        let stdout = sub.stdout.take().expect("piped");
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                let _ = tx.send(line);
            }
        });
        while !lines
            .recv_timeout(WAIT)
            .expect("mosquitto_sub output")
            .contains("SUBACK")
        {}
        for n in 1..=3 {
            let out = mosquitto_at(
                "mosquitto_pub",
                &port,
                &[
                    "-V",
                    version,
                    "-q",
                    qos,
                    "-t",
                    &format!("plant/line{n}/temp"),
                    "-m",
                    &format!("{n}"),
                ],
            );
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        assert!(
            sub.wait()
                .expect("mosquitto_sub exits after 3 messages")
                .success(),
            "{version}"
        );
        // Until the reader thread saw the end of mosquitto_sub's output: what it printed
        // last may still be on its way.
        let messages: Vec<String> = lines.iter().filter(|l| l.starts_with("plant/")).collect();
        assert_eq!(
            messages,
            [
                "plant/line1/temp 1",
                "plant/line2/temp 2",
                "plant/line3/temp 3"
            ],
            "{version}"
        );
    }
}

#[test]
fn retained_message_reaches_a_later_subscriber() {
    let edge = Edge::start(LOCAL);
    let port = edge.port().to_string();
    let out = mosquitto_at(
        "mosquitto_pub",
        &port,
        &["-r", "-q", "1", "-t", "status/gw", "-m", "online"],
    );
    assert!(out.status.success());
    let out = mosquitto_at(
        "mosquitto_sub",
        &port,
        &["-t", "status/#", "-C", "1", "-W", "10", "-F", "%t %p %r"],
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "status/gw online 1\n");
}

/// 2,000 QoS 1 messages from rumqttc arrive at a rumqttc subscriber, all of them, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rumqttc_qos1_stream_arrives_complete_and_in_order() {
    use rumqttc::{AsyncClient, Incoming, MqttOptions, QoS};
    const N: usize = 2000;
    let edge = Edge::start(LOCAL);

    let mut sub_opts = MqttOptions::new("e2e-sub", "127.0.0.1", edge.port());
    sub_opts.set_keep_alive(Duration::from_secs(30));
    let (sub, mut sub_loop) = AsyncClient::new(sub_opts, 100);
    sub.subscribe("stream/#", QoS::AtLeastOnce)
        .await
        .expect("queue subscribe");
    loop {
        if let Incoming::SubAck(_) = next_incoming(&mut sub_loop, "suback in time").await {
            break;
        }
    }

    let receiver = tokio::spawn(async move {
        let mut got = Vec::with_capacity(N);
        while got.len() < N {
            if let Incoming::Publish(p) = next_incoming(&mut sub_loop, "messages keep coming").await
            {
                got.push(String::from_utf8(p.payload.to_vec()).expect("utf8"));
            }
        }
        got
    });

    let mut pub_opts = MqttOptions::new("e2e-pub", "127.0.0.1", edge.port());
    pub_opts.set_keep_alive(Duration::from_secs(30));
    let (publisher, mut pub_loop) = AsyncClient::new(pub_opts, 100);
    let sender = tokio::spawn(async move {
        for n in 0..N {
            publisher
                .publish("stream/a", QoS::AtLeastOnce, false, n.to_string())
                .await
                .expect("queue publish");
        }
    });
    let mut acks = 0;
    while acks < N {
        if let Incoming::PubAck(_) = next_incoming(&mut pub_loop, "acks keep coming").await {
            acks += 1;
        }
    }
    sender.await.expect("sender done");
    let got = receiver.await.expect("receiver done");
    let expected: Vec<String> = (0..N).map(|n| n.to_string()).collect();
    assert_eq!(got, expected);
}

/// Garbage after CONNECT: a v5 client gets DISCONNECT "Malformed Packet" and the connection
/// closes; the broker goes on serving others.
#[test]
fn malformed_packet_gets_a_reason_code_and_a_clean_close() {
    let edge = Edge::start(LOCAL);
    let mut stream = TcpStream::connect(edge.addr).expect("connect");
    stream.set_read_timeout(Some(WAIT)).expect("timeout");
    let mut out = BytesMut::new();
    Packet::Connect(Box::new(Connect::new(ProtocolVersion::V5, "bad")))
        .encode(ProtocolVersion::V5, &mut out)
        .expect("encode");
    // A PUBLISH whose topic length runs past the packet.
    out.extend_from_slice(&[0x30, 0x03, 0x00, 0x09, b'a']);
    stream.write_all(&out).expect("write");

    let mut buf = BytesMut::new();
    let mut chunk = [0u8; 256];
    let mut packets = Vec::new();
    loop {
        match stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) => panic!("the broker closes the connection instead of hanging: {e}"),
        }
        while let Some(p) = decode(&mut buf, ProtocolVersion::V5, MAX_PACKET_SIZE)
            .expect("broker sends valid packets")
        {
            packets.push(p);
        }
    }
    assert!(matches!(&packets[0], Packet::ConnAck(a) if a.code == ReasonCode::Success));
    let Some(Packet::Disconnect(d)) = packets.get(1) else {
        panic!("expected DISCONNECT, got {packets:?}")
    };
    assert_eq!(d.reason, ReasonCode::MalformedPacket);

    let out = mosquitto_at(
        "mosquitto_pub",
        &edge.port().to_string(),
        &["-t", "still/up", "-m", "1"],
    );
    assert!(
        out.status.success(),
        "the broker still serves other clients"
    );
}

/// Keep alive (MQTT-3.1.2-22): a client that says nothing for 1.5 times its keep alive is
/// closed as if the network had failed (no DISCONNECT) and its will is published. The
/// broker decides this on its own deadline (`Broker::poll_timeout`): no input wakes it.
#[test]
fn a_silent_client_is_closed_after_one_and_a_half_keep_alives_and_its_will_is_sent() {
    use ferry_protocol::mqtt::{QoS, Will};

    let edge = Edge::start(LOCAL);
    let port = edge.port().to_string();
    let watcher = Subscription::open(&port, "will-watcher", "wills/#", &[]);

    let started = std::time::Instant::now();
    let mut stream = TcpStream::connect(edge.addr).expect("connect");
    stream.set_read_timeout(Some(WAIT)).expect("timeout");
    let mut connect = Connect::new(ProtocolVersion::V5, "quiet");
    connect.keep_alive_secs = 1;
    connect.will = Some(Will {
        topic: ferry_protocol::topic::TopicName::new("wills/quiet").expect("valid"),
        payload: bytes::Bytes::from_static(b"gone"),
        qos: QoS::AtLeastOnce,
        retain: false,
        properties: Default::default(),
    });
    let mut out = BytesMut::new();
    Packet::Connect(Box::new(connect))
        .encode(ProtocolVersion::V5, &mut out)
        .expect("encode");
    stream.write_all(&out).expect("write");

    let mut buf = BytesMut::new();
    let mut chunk = [0u8; 256];
    let mut packets = Vec::new();
    loop {
        match stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) => panic!("the broker closes a silent client: {e}"),
        }
        while let Some(p) = decode(&mut buf, ProtocolVersion::V5, MAX_PACKET_SIZE)
            .expect("broker sends valid packets")
        {
            packets.push(p);
        }
    }
    // Not before 1.5 s (a lower bound only: when it closes after that is up to the machine).
    assert!(
        started.elapsed() >= Duration::from_millis(1500),
        "{:?}",
        started.elapsed()
    );
    assert!(
        matches!(&packets[..], [Packet::ConnAck(a)] if a.code == ReasonCode::Success),
        "CONNACK, then a close without DISCONNECT: {packets:?}"
    );
    let out = watcher.read(1);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "gone\n", "{out:?}");
}

/// Unsupported protocol level: the 3.1.1 CONNACK return code 1, then close (MQTT-3.1.2-2).
#[test]
fn mqtt31_client_is_refused_with_return_code_1() {
    let edge = Edge::start(LOCAL);
    let out = mosquitto_at(
        "mosquitto_pub",
        &edge.port().to_string(),
        &["-V", "mqttv31", "-t", "t", "-m", "1"],
    );
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr).to_lowercase();
    assert!(stderr.contains("protocol version"), "{stderr}");
}

/// Safe by default: a listener reachable from the network needs anonymous access allowed.
#[test]
fn network_listener_without_allow_anonymous_is_refused() {
    let out = Command::new(binary("ferry-edge", "ferry-edge"))
        .args(["--listen", "0.0.0.0:0"])
        .output()
        .expect("runs");
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("allow_anonymous"), "{text}");
}

#[test]
fn sigterm_exits_cleanly() {
    let edge = Edge::start(LOCAL);
    let status = edge.terminate();
    assert!(status.success(), "{status:?}");
}

/// What a persistent session was sent at QoS 1, and the retained messages, survive SIGKILL
/// of the broker: after a restart on the same data directory, the subscriber gets every
/// message, in order, once.
#[test]
fn persistent_session_and_retained_survive_kill_9() {
    let dir = ferry_tests::process::temp_dir("kill9");
    let edge = Edge::start_in(&dir, LOCAL);
    let port = edge.port().to_string();
    // Register a persistent session (-c) with its subscription, then leave (-E).
    let out = mosquitto_at(
        "mosquitto_sub",
        &port,
        &["-c", "-i", "dev-1", "-q", "1", "-t", "cmd/#", "-E"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = mosquitto_at(
        "mosquitto_pub",
        &port,
        &["-r", "-q", "1", "-t", "status/gw", "-m", "online"],
    );
    assert!(out.status.success());
    // 100 QoS 1 messages, one per line.
    let lines: String = (0..100).map(|n| format!("{n}\n")).collect();
    let out = mosquitto_pub_lines(&port, &["-q", "1", "-t", "cmd/run"], &lines);
    assert!(out.status.success());

    edge.kill();
    let edge = Edge::start_in(&dir, LOCAL);
    let port = edge.port().to_string();
    let out = mosquitto_at(
        "mosquitto_sub",
        &port,
        &[
            "-c", "-i", "dev-1", "-q", "1", "-t", "cmd/#", "-C", "100", "-W", "15",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(String::from)
        .collect();
    let expected: Vec<String> = (0..100).map(|n| n.to_string()).collect();
    assert_eq!(got, expected);

    let out = mosquitto_at(
        "mosquitto_sub",
        &port,
        &["-t", "status/#", "-C", "1", "-W", "10"],
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "online\n");
    drop(edge);
    let _ = std::fs::remove_dir_all(&dir);
}

/// kill -9 of the broker while rumqttc publishes 10,000 QoS 1 messages: after the restart
/// the persistent subscriber has every message that was PUBACKed, in order, none twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_stream_loses_no_acknowledged_message() {
    use rumqttc::{AsyncClient, Event, Incoming, MqttOptions, QoS};
    const N: usize = 10_000;
    const KILL_AFTER_ACKS: usize = 4_000;

    let dir = ferry_tests::process::temp_dir("kill9-stream");
    let edge = Edge::start_in(&dir, LOCAL);

    // A persistent session subscribed to the stream, then offline.
    let mut sub_opts = MqttOptions::new("durable-sub", "127.0.0.1", edge.port());
    sub_opts.set_clean_session(false);
    let (sub, mut sub_loop) = AsyncClient::new(sub_opts, 10);
    sub.subscribe("stream/#", QoS::AtLeastOnce)
        .await
        .expect("queue subscribe");
    loop {
        if let Incoming::SubAck(_) = next_incoming(&mut sub_loop, "suback in time").await {
            break;
        }
    }
    sub.disconnect().await.expect("queue disconnect");
    while let Ok(Ok(_)) = tokio::time::timeout(Duration::from_secs(2), sub_loop.poll()).await {}

    let mut pub_opts = MqttOptions::new("streamer", "127.0.0.1", edge.port());
    pub_opts.set_inflight(100);
    let (publisher, mut pub_loop) = AsyncClient::new(pub_opts, 200);
    tokio::spawn(async move {
        for n in 0..N {
            if publisher
                .publish("stream/a", QoS::AtLeastOnce, false, n.to_string())
                .await
                .is_err()
            {
                return;
            }
        }
    });
    // PUBACKs from one connection come in publish order, so the acknowledged messages are
    // exactly the first `acked`.
    let mut acked = 0;
    while acked < KILL_AFTER_ACKS {
        if let Incoming::PubAck(_) = next_incoming(&mut pub_loop, "acks keep coming").await {
            acked += 1
        }
    }
    edge.kill();
    // Acks that were already on the wire before the kill count too.
    while let Ok(Ok(event)) =
        tokio::time::timeout(Duration::from_millis(500), pub_loop.poll()).await
    {
        if let Event::Incoming(Incoming::PubAck(_)) = event {
            acked += 1;
        }
    }

    let edge = Edge::start_in(&dir, LOCAL);
    let mut sub_opts = MqttOptions::new("durable-sub", "127.0.0.1", edge.port());
    sub_opts.set_clean_session(false);
    let (_sub, mut sub_loop) = AsyncClient::new(sub_opts, 10);
    while !matches!(
        next_incoming(&mut sub_loop, "connack").await,
        Incoming::ConnAck(_)
    ) {}
    // A marker published now comes after everything the session had queued: the read ends
    // with it, not with a quiet spell.
    let port = edge.port().to_string();
    tokio::task::spawn_blocking(move || {
        let out = mosquitto_at(
            "mosquitto_pub",
            &port,
            &["-t", "stream/end", "-m", "end", "-q", "1"],
        );
        assert!(out.status.success(), "{out:?}");
    })
    .await
    .expect("marker");
    let mut got: Vec<usize> = Vec::new();
    loop {
        if let Incoming::Publish(p) =
            next_incoming(&mut sub_loop, "the queue, then the marker").await
        {
            let text = std::str::from_utf8(&p.payload).expect("utf8");
            if text == "end" {
                break;
            }
            got.push(text.parse().expect("a number"));
        }
    }
    assert!(
        got.len() >= acked,
        "{} received, {acked} were acknowledged",
        got.len()
    );
    let expected: Vec<usize> = (0..got.len()).collect();
    assert_eq!(got, expected, "in order, none twice, none missing");
    drop(edge);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Mosquitto's own password file (made by mosquitto_passwd) and ACL file, read as they are;
/// SIGHUP reloads them.
#[test]
fn mosquitto_password_and_acl_files_work_and_reload_on_sighup() {
    let dir = ferry_tests::process::temp_dir("auth");
    let passwd = dir.join("passwd");
    let status = Command::new("mosquitto_passwd")
        .args(["-c", "-b"])
        .arg(&passwd)
        .args(["alice", "s3cret"])
        .status()
        .expect("mosquitto_passwd must be installed (apt-get install mosquitto)");
    assert!(status.success());
    let acl = dir.join("acl");
    std::fs::write(&acl, "user alice\ntopic readwrite sensors/#\n").expect("write acl");
    let config = dir.join("edge.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = [\"127.0.0.1:0\"]\n[auth]\npassword_file = {:?}\nacl_file = {:?}\n",
            passwd, acl
        ),
    )
    .expect("write config");
    let edge = Edge::start(&["--config", config.to_str().expect("utf8 path")]);
    let port = edge.port().to_string();
    let base = ["-h", "127.0.0.1", "-p", port.as_str(), "-V", "mqttv5"];
    let run = |tool: &str, extra: &[&str]| {
        let args: Vec<&str> = base.iter().chain(extra).copied().collect();
        mosquitto(tool, &args)
    };

    let wrong = run(
        "mosquitto_pub",
        &["-u", "alice", "-P", "nope", "-t", "sensors/t", "-m", "1"],
    );
    assert!(!wrong.status.success(), "a wrong password is refused");
    let anonymous = run("mosquitto_pub", &["-t", "sensors/t", "-m", "1"]);
    assert!(
        !anonymous.status.success(),
        "anonymous is refused when there is a password file"
    );

    let ok = run(
        "mosquitto_sub",
        &["-u", "alice", "-P", "s3cret", "-t", "sensors/#", "-E"],
    );
    let denied_text = |out: &Output| String::from_utf8_lossy(&out.stderr).contains("denied");
    assert!(
        ok.status.success() && !denied_text(&ok),
        "alice may subscribe to sensors/#"
    );
    let denied = run(
        "mosquitto_sub",
        &["-u", "alice", "-P", "s3cret", "-t", "other/#", "-E"],
    );
    // mosquitto_sub reports a SUBACK of 0x87 on stderr.
    assert!(denied_text(&denied), "other/# is not in alice's ACL");

    std::fs::write(
        &acl,
        "user alice\ntopic readwrite sensors/#\ntopic read other/#\n",
    )
    .expect("rewrite acl");
    edge.reload_and_wait_for("SIGHUP: password and ACL files reloaded");
    let now_ok = run(
        "mosquitto_sub",
        &["-u", "alice", "-P", "s3cret", "-t", "other/#", "-E"],
    );
    assert!(
        now_ok.status.success() && !denied_text(&now_ok),
        "after SIGHUP, other/# is allowed"
    );
    drop(edge);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A CA and a server certificate for localhost and 127.0.0.1 made here (rcgen), written to
/// `dir`: (CA, certificate, key).
fn server_certificate(
    dir: &std::path::Path,
) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "ferry test CA");
    let ca_key = rcgen::KeyPair::generate().expect("key");
    let ca = ca_params.self_signed(&ca_key).expect("CA");
    let server_params =
        rcgen::CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
            .expect("params");
    let server_key = rcgen::KeyPair::generate().expect("key");
    let issuer = rcgen::Issuer::from_params(&ca_params, &ca_key);
    let server = server_params
        .signed_by(&server_key, &issuer)
        .expect("server cert");
    let (ca_file, cert_file, key_file) = (
        dir.join("ca.pem"),
        dir.join("edge.pem"),
        dir.join("edge.key"),
    );
    std::fs::write(&ca_file, ca.pem()).expect("write");
    std::fs::write(&cert_file, server.pem()).expect("write");
    std::fs::write(&key_file, server_key.serialize_pem()).expect("write");
    (ca_file, cert_file, key_file)
}

/// MQTT over TLS with a certificate made here (rcgen): mosquitto_pub and mosquitto_sub verify
/// the server against its CA and exchange a message; a client that does not trust the CA is
/// refused.
#[test]
fn tls_listener_works_with_mosquitto_clients() {
    let dir = ferry_tests::process::temp_dir("tls");
    let (ca_file, cert_file, key_file) = server_certificate(&dir);
    let config = dir.join("edge.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = [\"127.0.0.1:0\"]\n[server.tls]\nlisten = [\"127.0.0.1:0\"]\ncert_file = {cert_file:?}\nkey_file = {key_file:?}\n"
        ),
    )
    .expect("write config");

    let edge = Edge::start(&["--config", config.to_str().expect("utf8")]);
    let port = edge.tls_addr().expect("a TLS listener").port().to_string();
    let ca = ca_file.to_str().expect("utf8");
    let sub = Subscription::open(&port, "tls-sub", "secure/#", &["--cafile", ca]);
    let out = mosquitto_at(
        "mosquitto_pub",
        &port,
        &["--cafile", ca, "-t", "secure/a", "-m", "sealed", "-q", "1"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got = sub.read(1);
    assert_eq!(String::from_utf8_lossy(&got.stdout), "sealed\n");

    // A client that trusts some other CA does not get through the handshake.
    let other = dir.join("other.pem");
    let other_key = rcgen::KeyPair::generate().expect("key");
    let mut other_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    other_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    std::fs::write(
        &other,
        other_params.self_signed(&other_key).expect("CA").pem(),
    )
    .expect("write");
    let out = mosquitto_at(
        "mosquitto_pub",
        &port,
        &[
            "--cafile",
            other.to_str().expect("utf8"),
            "-t",
            "secure/a",
            "-m",
            "x",
        ],
    );
    assert!(
        !out.status.success(),
        "an untrusted server certificate is refused by the client"
    );
    drop(edge);
    let _ = std::fs::remove_dir_all(&dir);
}

/// MQTT over WebSocket with paho-mqtt (Python): it subscribes and publishes over ws://; a
/// message from mosquitto_pub over plain TCP reaches a WebSocket subscriber too.
#[test]
fn websocket_listener_works_with_paho() {
    let dir = ferry_tests::process::temp_dir("ws");
    let config = dir.join("edge.toml");
    std::fs::write(
        &config,
        "[server]\nlisten = [\"127.0.0.1:0\"]\n[server.websocket]\nlisten = [\"127.0.0.1:0\"]\n",
    )
    .expect("write config");
    let edge = Edge::start(&["--config", config.to_str().expect("utf8")]);
    let ws_port = edge
        .ws_addr()
        .expect("a WebSocket listener")
        .port()
        .to_string();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/clients/paho_ws_roundtrip.py");
    let out = Command::new("python3")
        .args([script, &ws_port, "ws/a", "over websocket"])
        .output()
        .expect("python3 runs (pip install paho-mqtt)");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "over websocket",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    drop(edge);
    let _ = std::fs::remove_dir_all(&dir);
}

/// MQTT over WebSocket over TLS (`wss://`): paho-mqtt checks the server's certificate
/// against the CA made here and makes a round trip.
#[test]
fn wss_listener_works_with_paho() {
    let dir = ferry_tests::process::temp_dir("wss");
    let (ca_file, cert_file, key_file) = server_certificate(&dir);
    let config = dir.join("edge.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = [\"127.0.0.1:0\"]\n[server.tls]\nlisten = []\ncert_file = {cert_file:?}\nkey_file = {key_file:?}\n[server.websocket]\ntls_listen = [\"127.0.0.1:0\"]\n"
        ),
    )
    .expect("write config");
    let edge = Edge::start(&["--config", config.to_str().expect("utf8")]);
    let wss_port = edge
        .wss_addr()
        .expect("a wss:// listener")
        .port()
        .to_string();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/clients/paho_ws_roundtrip.py");
    let ca = ca_file.to_str().expect("utf8");
    let out = Command::new("python3")
        .args([script, &wss_port, "wss/a", "over wss", ca])
        .output()
        .expect("python3 runs (pip install paho-mqtt)");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "over wss",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Plain WebSocket on the wss port is refused (no TLS handshake), so nothing arrives.
    let plain = Command::new("python3")
        .args([script, &wss_port, "wss/a", "in the clear"])
        .output()
        .expect("python3 runs");
    assert_ne!(
        String::from_utf8_lossy(&plain.stdout).trim(),
        "in the clear"
    );
    drop(edge);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Prometheus metrics: after a QoS 1 publish, /metrics counts it; other paths are 404.
#[test]
fn metrics_endpoint_counts_messages() {
    let dir = ferry_tests::process::temp_dir("metrics");
    let config = dir.join("edge.toml");
    std::fs::write(
        &config,
        "[server]\nlisten = [\"127.0.0.1:0\"]\nmetrics_listen = \"127.0.0.1:0\"\n",
    )
    .expect("write config");
    let edge = Edge::start(&["--config", config.to_str().expect("utf8")]);
    let out = mosquitto_at(
        "mosquitto_pub",
        &edge.port().to_string(),
        &["-q", "1", "-t", "m/1", "-m", "x"],
    );
    assert!(out.status.success());
    let get = |path: &str| edge.http_get(path);
    let page = get("/metrics");
    assert!(page.starts_with("HTTP/1.1 200"), "{page}");
    assert!(
        page.contains("ferry_edge_messages_received_total{qos=\"1\"} 1\n"),
        "{page}"
    );
    assert!(
        page.contains("# TYPE ferry_edge_connections gauge"),
        "{page}"
    );
    assert!(get("/nope").starts_with("HTTP/1.1 404"));
    drop(edge);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Client certificates: with `use_identity_as_username`, the certificate's CN is the
/// username the ACL applies to; a client without a certificate does not get in.
#[test]
fn client_certificate_cn_is_the_username() {
    let dir = ferry_tests::process::temp_dir("mtls");
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "ferry test CA");
    let ca_key = rcgen::KeyPair::generate().expect("key");
    let ca = ca_params.self_signed(&ca_key).expect("CA");
    let issuer = rcgen::Issuer::from_params(&ca_params, &ca_key);
    let leaf = |names: Vec<String>, cn: &str| {
        let mut params = rcgen::CertificateParams::new(names).expect("params");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = params.signed_by(&key, &issuer).expect("cert");
        (cert.pem(), key.serialize_pem())
    };
    let (server_pem, server_key) = leaf(vec!["localhost".into(), "127.0.0.1".into()], "edge");
    let (client_pem, client_key) = leaf(vec![], "sensor-7");
    let write = |name: &str, text: &str| {
        let path = dir.join(name);
        std::fs::write(&path, text).expect("write");
        path.to_str().expect("utf8").to_owned()
    };
    let ca_file = write("ca.pem", &ca.pem());
    let cert_file = write("edge.pem", &server_pem);
    let key_file = write("edge.key", &server_key);
    let client_cert = write("client.pem", &client_pem);
    let client_key = write("client.key", &client_key);
    let acl = write("acl", "user sensor-7\ntopic readwrite sensors/7/#\n");
    let config = write(
        "edge.toml",
        &format!(
            "[server]\nlisten = [\"127.0.0.1:0\"]\n[server.tls]\nlisten = [\"127.0.0.1:0\"]\ncert_file = {cert_file:?}\nkey_file = {key_file:?}\nclient_ca_file = {ca_file:?}\nuse_identity_as_username = true\n[auth]\nacl_file = {acl:?}\n"
        ),
    );
    let edge = Edge::start(&["--config", &config]);
    let port = edge.tls_addr().expect("TLS listener").port().to_string();
    let tls: Vec<&str> = vec![
        "-h",
        "127.0.0.1",
        "-p",
        &port,
        "--cafile",
        &ca_file,
        "--cert",
        &client_cert,
        "--key",
        &client_key,
    ];

    // (-h and -p are the Subscription's own; the rest are the TLS files.)
    let sub = Subscription::open(&port, "sensor-7-sub", "sensors/7/#", &tls[4..]);
    let args: Vec<&str> = tls
        .iter()
        .copied()
        .chain(["-t", "sensors/7/temp", "-m", "21.5", "-q", "1"])
        .collect();
    let out = mosquitto("mosquitto_pub", &args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&sub.read(1).stdout), "21.5\n");

    // The ACL applies to the certificate's name: other topics are not sensor-7's.
    let args: Vec<&str> = tls
        .iter()
        .copied()
        .chain(["-V", "mqttv5", "-t", "other/#", "-E"])
        .collect();
    let denied = mosquitto("mosquitto_sub", &args);
    assert!(String::from_utf8_lossy(&denied.stderr).contains("denied"));

    // Without a client certificate the handshake fails.
    let out = mosquitto_at(
        "mosquitto_pub",
        &port,
        &["--cafile", &ca_file, "-t", "sensors/7/temp", "-m", "x"],
    );
    assert!(!out.status.success());
    drop(edge);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The outbox: QoS 1 messages for the cloud that the edge acknowledged are on disk when it is
/// killed with SIGKILL, and counted again after the restart; an MQTT 5 publisher over the
/// budget is refused with 0x97.
#[test]
fn acknowledged_messages_for_the_cloud_survive_kill_9_in_the_outbox() {
    let dir = ferry_tests::process::temp_dir("outbox");
    let config = dir.join("edge.toml");
    std::fs::write(
        &config,
        "[server]\nlisten = [\"127.0.0.1:0\"]\nmetrics_listen = \"127.0.0.1:0\"\n\
         [uplink]\nmax_outbox_bytes = 60000\n[[uplink.route]]\nfilter = \"up/#\"\n",
    )
    .expect("write config");
    let data = dir.join("data");
    let args = ["--config", config.to_str().expect("utf8")];
    let edge = Edge::start_in(&data, &args);
    let port = edge.port().to_string();
    // 500 acknowledged QoS 1 messages for the cloud (mosquitto_pub waits for each PUBACK),
    // and some that stay local.
    let lines: String = (0..500).map(|i| format!("reading {i:03}\n")).collect();
    for topic in ["up/t", "local/t"] {
        let out = mosquitto_pub_lines(&port, &["-t", topic, "-q", "1"], &lines);
        assert!(out.status.success());
    }
    assert_eq!(edge.metric("ferry_edge_outbox_records"), 500);
    edge.kill();

    let edge = Edge::start_in(&data, &args);
    assert_eq!(
        edge.metric("ferry_edge_outbox_records"),
        500,
        "all of them, after kill -9"
    );
    let bytes = edge.metric("ferry_edge_outbox_bytes");
    // docs/edge-storage.md: a record costs topic ("up/t") + payload ("reading 000") + 40.
    assert_eq!(bytes, 500 * (4 + 11 + 40));
    // Over the budget (60,000 bytes; 27,500 used, 55 a message): an MQTT 5 publisher is
    // refused, which mosquitto_pub reports as a failure.
    let port = edge.port().to_string();
    let big: String = (0..700).map(|i| format!("reading {i:03}\n")).collect();
    let out = mosquitto_pub_lines(&port, &["-t", "up/t", "-q", "1", "-V", "mqttv5"], &big);
    let rejected = edge.metric("ferry_edge_outbox_rejected_total");
    assert!(rejected >= 1, "{out:?}");
    assert!(edge.metric("ferry_edge_outbox_bytes") <= 60_000);
    // MQTT 3.1.1 has no way to refuse one PUBLISH: the publisher is disconnected, and
    // counted. (rumqttc speaks 3.1.1; mosquitto_pub would reconnect and try again.)
    let mut opts = rumqttc::MqttOptions::new("v311-over-budget", "127.0.0.1", edge.port());
    opts.set_keep_alive(Duration::from_secs(30));
    let (client, mut connection) = rumqttc::Client::new(opts, 10);
    client
        .publish("up/t", rumqttc::QoS::AtLeastOnce, false, vec![b'x'; 100])
        .expect("queue the publish");
    let ended = loop {
        match connection.recv_timeout(Duration::from_secs(30)) {
            Ok(Ok(rumqttc::Event::Incoming(rumqttc::Incoming::PubAck(_)))) => break false,
            Ok(Ok(_)) => {}
            Ok(Err(_)) => break true,
            Err(_) => panic!("neither a PUBACK nor a disconnect within 30 s"),
        }
    };
    assert!(
        ended,
        "a 3.1.1 publisher over the budget is disconnected, not acknowledged"
    );
    assert!(edge.metric("ferry_edge_outbox_rejected_total") > rejected);
    assert!(edge.metric("ferry_edge_outbox_bytes") <= 60_000);
    drop(edge);
    let _ = std::fs::remove_dir_all(&dir);
}
