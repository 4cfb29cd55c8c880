//! The codec against real clients on real sockets: the Mosquitto command-line clients and
//! rumqttc's event loop talk to a capture server (tests/src/capture.rs) that decodes what
//! they send with our codec and answers with packets we encode.

use std::time::Duration;

use bytes::Bytes;
use ferry_protocol::mqtt::{Packet, ProtocolVersion, QoS, ReasonCode};
use ferry_tests::capture::{CaptureServer, Seen, GREETING};
use ferry_tests::process::mosquitto;

const WAIT: Duration = Duration::from_secs(10);

fn packets(seen: &[Seen]) -> Vec<&Packet> {
    seen.iter()
        .map(|s| match s {
            Seen::Packet(p) => p,
            other => panic!("expected only packets before the close, saw {other:?} in {seen:?}"),
        })
        .collect()
}

#[test]
fn mosquitto_pub_v311_qos1_with_will_and_login() {
    let server = CaptureServer::start().expect("bind");
    let port = server.port().to_string();
    let out = mosquitto(
        "mosquitto_pub",
        &[
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-V",
            "mqttv311",
            "-i",
            "pub-311",
            "-u",
            "alice",
            "-P",
            "pw",
            "-k",
            "30",
            "-q",
            "1",
            "-r",
            "-t",
            "sensors/t1",
            "-m",
            "21.5",
            "--will-topic",
            "status/pub-311",
            "--will-payload",
            "gone",
            "--will-qos",
            "1",
        ],
    );
    assert!(
        out.status.success(),
        "mosquitto_pub failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let seen = server.until_closed(WAIT);
    assert_eq!(seen.last(), Some(&Seen::Closed));
    let packets = packets(&seen[..seen.len() - 1]);
    let [Packet::Connect(c), Packet::Publish(p), Packet::Disconnect(_)] = packets[..] else {
        panic!("unexpected sequence: {packets:?}")
    };
    assert_eq!(c.protocol, ProtocolVersion::V311);
    assert_eq!(c.client_id, "pub-311");
    assert_eq!(c.keep_alive_secs, 30);
    assert_eq!(c.username.as_deref(), Some("alice"));
    assert_eq!(c.password, Some(Bytes::from("pw")));
    let will = c.will.as_ref().expect("will");
    assert_eq!(
        (will.topic.as_str(), &will.payload[..], will.qos),
        ("status/pub-311", &b"gone"[..], QoS::AtLeastOnce)
    );
    assert_eq!(p.topic.as_str(), "sensors/t1");
    assert_eq!(
        (p.qos, p.retain, &p.payload[..]),
        (QoS::AtLeastOnce, true, &b"21.5"[..])
    );
}

#[test]
fn mosquitto_pub_v5_qos2_with_properties() {
    let server = CaptureServer::start().expect("bind");
    let port = server.port().to_string();
    let out = mosquitto(
        "mosquitto_pub",
        &[
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-V",
            "mqttv5",
            "-i",
            "pub-5",
            "-q",
            "2",
            "-t",
            "plant/line1/temp",
            "-m",
            "{\"c\":21.5}",
            "-x",
            "120",
            "-D",
            "publish",
            "user-property",
            "unit",
            "celsius",
            "-D",
            "publish",
            "content-type",
            "application/json",
            "-D",
            "publish",
            "message-expiry-interval",
            "60",
            "-D",
            "publish",
            "response-topic",
            "replies/pub-5",
            "-D",
            "publish",
            "correlation-data",
            "req-1",
            "-D",
            "publish",
            "payload-format-indicator",
            "1",
            "-D",
            "connect",
            "receive-maximum",
            "10",
        ],
    );
    assert!(
        out.status.success(),
        "mosquitto_pub failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let seen = server.until_closed(WAIT);
    let packets = packets(&seen[..seen.len() - 1]);
    let [Packet::Connect(c), Packet::Publish(p), Packet::PubRel(rel), Packet::Disconnect(d)] =
        packets[..]
    else {
        panic!("unexpected sequence: {packets:?}")
    };
    assert_eq!(c.protocol, ProtocolVersion::V5);
    assert_eq!(c.properties.session_expiry_interval_secs, Some(120));
    assert_eq!(c.properties.receive_maximum.map(|v| v.get()), Some(10));
    assert_eq!(p.qos, QoS::ExactlyOnce);
    assert_eq!(rel.packet_id, p.packet_id.expect("QoS 2 has an id"));
    assert_eq!(&p.payload[..], b"{\"c\":21.5}");
    let props = &p.properties;
    assert_eq!(
        props.user_properties,
        [("unit".to_string(), "celsius".to_string())]
    );
    assert_eq!(props.content_type.as_deref(), Some("application/json"));
    assert_eq!(props.message_expiry_interval_secs, Some(60));
    assert_eq!(
        props.response_topic.as_ref().map(|t| t.as_str()),
        Some("replies/pub-5")
    );
    assert_eq!(props.correlation_data, Some(Bytes::from("req-1")));
    assert_eq!(props.payload_format_utf8, Some(true));
    assert_eq!(d.reason, ReasonCode::Success);
}

/// mosquitto_sub decodes our SUBACK and PUBLISH (with v5 properties) and prints the message.
#[test]
fn mosquitto_sub_receives_what_we_encode() {
    for (version, qos) in [("mqttv311", "1"), ("mqttv5", "2")] {
        let server = CaptureServer::start().expect("bind");
        let port = server.port().to_string();
        let out = mosquitto(
            "mosquitto_sub",
            &[
                "-h",
                "127.0.0.1",
                "-p",
                &port,
                "-V",
                version,
                "-q",
                qos,
                "-t",
                "sensors/+/temp",
                "-C",
                "1",
                "-W",
                "10",
                "-F",
                "%t|%p|%q|%C|%P",
            ],
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "mosquitto_sub {version} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let expected = if version == "mqttv5" {
            format!("sensors/x/temp|{GREETING}|{qos}|text/plain|from:ferry")
        } else {
            format!("sensors/x/temp|{GREETING}|{qos}||")
        };
        assert_eq!(stdout.trim_end(), expected, "{version}");
        let seen = server.until_closed(WAIT);
        let packets = packets(&seen[..seen.len() - 1]);
        let Packet::Subscribe(s) = packets[1] else {
            panic!("expected SUBSCRIBE second: {packets:?}")
        };
        assert_eq!(s.subscriptions[0].filter.as_str(), "sensors/+/temp");
        // The client acknowledged our QoS 1/2 PUBLISH.
        assert!(
            packets
                .iter()
                .any(|p| matches!(p, Packet::PubAck(_) | Packet::PubRec(_))),
            "{version}: {packets:?}"
        );
    }
}

#[tokio::test]
async fn rumqttc_v311_event_loop_round_trip() {
    use rumqttc::{AsyncClient, Event, Incoming, MqttOptions};

    let server = CaptureServer::start().expect("bind");
    let mut options = MqttOptions::new("rumqttc-311", "127.0.0.1", server.port());
    options.set_keep_alive(Duration::from_secs(5));
    let (client, mut eventloop) = AsyncClient::new(options, 10);
    client
        .subscribe("cmd/#", rumqttc::QoS::AtLeastOnce)
        .await
        .expect("queue subscribe");
    client
        .publish("sensors/t1", rumqttc::QoS::AtLeastOnce, false, "21.5")
        .await
        .expect("queue publish");

    let (mut got_suback, mut got_puback, mut got_publish) = (false, false, false);
    let deadline = tokio::time::Instant::now() + WAIT;
    while !(got_suback && got_puback && got_publish) {
        let event = tokio::time::timeout_at(deadline, eventloop.poll())
            .await
            .expect("events before the deadline")
            .expect("no connection error");
        match event {
            Event::Incoming(Incoming::SubAck(ack)) => {
                got_suback = true;
                assert_eq!(
                    ack.return_codes,
                    [rumqttc::SubscribeReasonCode::Success(
                        rumqttc::QoS::AtLeastOnce
                    )]
                );
            }
            Event::Incoming(Incoming::PubAck(_)) => got_puback = true,
            Event::Incoming(Incoming::Publish(p)) => {
                got_publish = true;
                assert_eq!(
                    (p.topic.as_str(), &p.payload[..]),
                    ("cmd/x", GREETING.as_bytes())
                );
            }
            _ => {}
        }
    }
    client.disconnect().await.expect("queue disconnect");
    while let Ok(Ok(_)) = tokio::time::timeout(WAIT, eventloop.poll()).await {}

    let seen = server.until_closed(WAIT);
    let publish = seen
        .iter()
        .find_map(|s| match s {
            Seen::Packet(Packet::Publish(p)) => Some(p),
            _ => None,
        })
        .expect("the client's PUBLISH was decoded");
    assert_eq!(
        (publish.topic.as_str(), &publish.payload[..]),
        ("sensors/t1", &b"21.5"[..])
    );
    assert!(
        seen.iter()
            .any(|s| matches!(s, Seen::Packet(Packet::PubAck(_)))),
        "client acked our PUBLISH"
    );
    assert!(
        !seen.iter().any(|s| matches!(s, Seen::DecodeError(_))),
        "{seen:?}"
    );
}

#[tokio::test]
async fn rumqttc_v5_event_loop_round_trip() {
    use rumqttc::v5::mqttbytes::v5::{Packet as R5, PublishProperties};
    use rumqttc::v5::mqttbytes::QoS as Q5;
    use rumqttc::v5::{AsyncClient, Event, MqttOptions};

    let server = CaptureServer::start().expect("bind");
    let mut options = MqttOptions::new("rumqttc-5", "127.0.0.1", server.port());
    options.set_keep_alive(Duration::from_secs(5));
    let (client, mut eventloop) = AsyncClient::new(options, 10);
    client
        .subscribe("cmd/+", Q5::ExactlyOnce)
        .await
        .expect("queue subscribe");
    let props = PublishProperties {
        user_properties: vec![("site".into(), "north".into())],
        content_type: Some("text/plain".into()),
        ..Default::default()
    };
    client
        .publish_with_properties("sensors/t2", Q5::AtLeastOnce, false, "22.0", props)
        .await
        .expect("queue publish");

    let (mut got_puback, mut got_publish) = (false, false);
    let deadline = tokio::time::Instant::now() + WAIT;
    while !(got_puback && got_publish) {
        let event = tokio::time::timeout_at(deadline, eventloop.poll())
            .await
            .expect("events before the deadline")
            .expect("no connection error");
        match event {
            Event::Incoming(R5::PubAck(_)) => got_puback = true,
            Event::Incoming(R5::Publish(p)) => {
                got_publish = true;
                assert_eq!(
                    (&p.topic[..], &p.payload[..]),
                    (&b"cmd/x"[..], GREETING.as_bytes())
                );
                let props = p.properties.expect("our PUBLISH carries properties");
                assert_eq!(
                    props.user_properties,
                    [("from".to_string(), "ferry".to_string())]
                );
            }
            _ => {}
        }
    }
    // The client goes (its socket closes), which ends what the server can see.
    drop(client);
    drop(eventloop);

    // Everything the client sent decoded; its PUBLISH kept its properties.
    let mut publish = None;
    loop {
        match server.next(WAIT).expect("the connection's close") {
            Seen::Closed => break,
            Seen::DecodeError(e) => panic!("{e:?}"),
            Seen::Packet(Packet::Publish(p)) => publish = Some(p),
            Seen::Packet(_) => {}
        }
    }
    let publish = publish.expect("the client's PUBLISH was decoded");
    assert_eq!(
        publish.properties.user_properties,
        [("site".to_string(), "north".to_string())]
    );
    assert_eq!(
        publish.properties.content_type.as_deref(),
        Some("text/plain")
    );
    // A client never sends Subscription Identifiers on PUBLISH (MQTT-3.3.4-6).
    assert!(publish.properties.subscription_identifiers.is_empty());
}
