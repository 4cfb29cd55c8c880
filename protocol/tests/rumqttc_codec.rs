//! Interop with rumqttc's own codec (the maintained successor of `mqttbytes`): what it
//! encodes, we decode to the same meaning, and what we encode, it decodes.

use std::num::{NonZeroU16, NonZeroU32};

use bytes::{Bytes, BytesMut};
use ferry_protocol::mqtt::{
    decode, ConnAck, Packet, Properties, PropertyValues, ProtocolVersion, PubResponse, Publish,
    QoS, ReasonCode, RetainHandling, SubAck, UnsubAck, MAX_PACKET_SIZE,
};
use ferry_protocol::topic::TopicName;
use rumqttc::mqttbytes::v4 as r4;
use rumqttc::v5::mqttbytes::v5 as r5;

fn id(v: u16) -> NonZeroU16 {
    NonZeroU16::new(v).expect("test ids are non-zero")
}

fn topic(s: &str) -> TopicName {
    TopicName::new(s).expect("valid test topic")
}

fn ours(bytes: &mut BytesMut, version: ProtocolVersion) -> Packet {
    let packet = decode(bytes, version, MAX_PACKET_SIZE)
        .expect("rumqttc's bytes decode")
        .expect("a whole packet");
    assert!(
        bytes.is_empty(),
        "one packet, fully consumed: {packet:?} left {bytes:?}"
    );
    packet
}

fn encode(packet: Packet, version: ProtocolVersion) -> BytesMut {
    let mut buf = BytesMut::new();
    packet.encode(version, &mut buf).expect("encodes");
    buf
}

#[test]
fn v311_packets_from_rumqttc_decode() {
    let mut connect = r4::Connect::new("sensor-7");
    connect.keep_alive = 30;
    connect.clean_session = false;
    connect.last_will = Some(r4::LastWill::new(
        "status/sensor-7",
        "gone",
        rumqttc::QoS::AtLeastOnce,
        true,
    ));
    connect.login = Some(r4::Login::new("alice", "s3cret"));
    let mut buf = BytesMut::new();
    r4::Packet::Connect(connect)
        .write(&mut buf, 1 << 20)
        .expect("rumqttc encodes");
    let Packet::Connect(c) = ours(&mut buf, ProtocolVersion::V311) else {
        panic!("expected CONNECT")
    };
    assert_eq!(c.protocol, ProtocolVersion::V311);
    assert_eq!(c.client_id, "sensor-7");
    assert_eq!(c.keep_alive_secs, 30);
    assert!(!c.clean_start);
    let will = c.will.expect("will present");
    assert_eq!(will.topic.as_str(), "status/sensor-7");
    assert_eq!(will.payload, Bytes::from("gone"));
    assert_eq!(will.qos, QoS::AtLeastOnce);
    assert!(will.retain);
    assert_eq!(c.username.as_deref(), Some("alice"));
    assert_eq!(c.password, Some(Bytes::from("s3cret")));

    let mut publish = r4::Publish::new("sensors/t1", rumqttc::QoS::ExactlyOnce, vec![1u8, 2, 3]);
    publish.pkid = 42;
    publish.retain = true;
    publish.dup = true;
    let mut buf = BytesMut::new();
    r4::Packet::Publish(publish)
        .write(&mut buf, 1 << 20)
        .expect("rumqttc encodes");
    let Packet::Publish(p) = ours(&mut buf, ProtocolVersion::V311) else {
        panic!("expected PUBLISH")
    };
    assert_eq!(p.topic.as_str(), "sensors/t1");
    assert_eq!((p.qos, p.retain, p.dup), (QoS::ExactlyOnce, true, true));
    assert_eq!(p.packet_id, Some(id(42)));
    assert_eq!(p.payload, Bytes::from(vec![1u8, 2, 3]));

    let mut subscribe = r4::Subscribe::new("sensors/+/temp", rumqttc::QoS::AtLeastOnce);
    subscribe.pkid = 7;
    subscribe.filters.push(r4::SubscribeFilter::new(
        "alerts/#".into(),
        rumqttc::QoS::ExactlyOnce,
    ));
    let mut buf = BytesMut::new();
    r4::Packet::Subscribe(subscribe)
        .write(&mut buf, 1 << 20)
        .expect("rumqttc encodes");
    let Packet::Subscribe(s) = ours(&mut buf, ProtocolVersion::V311) else {
        panic!("expected SUBSCRIBE")
    };
    assert_eq!(s.packet_id, id(7));
    let filters: Vec<_> = s
        .subscriptions
        .iter()
        .map(|s| (s.filter.as_str(), s.options.qos))
        .collect();
    assert_eq!(
        filters,
        [
            ("sensors/+/temp", QoS::AtLeastOnce),
            ("alerts/#", QoS::ExactlyOnce)
        ]
    );

    let mut unsubscribe = r4::Unsubscribe::new("alerts/#");
    unsubscribe.pkid = 8;
    let mut buf = BytesMut::new();
    r4::Packet::Unsubscribe(unsubscribe)
        .write(&mut buf, 1 << 20)
        .expect("rumqttc encodes");
    let Packet::Unsubscribe(u) = ours(&mut buf, ProtocolVersion::V311) else {
        panic!("expected UNSUBSCRIBE")
    };
    assert_eq!(u.packet_id, id(8));
    assert_eq!(u.filters[0].as_str(), "alerts/#");

    for (packet, expected) in [
        (
            r4::Packet::PubAck(r4::PubAck::new(9)),
            Packet::PubAck(PubResponse::new(id(9))),
        ),
        (
            r4::Packet::PubRec(r4::PubRec::new(10)),
            Packet::PubRec(PubResponse::new(id(10))),
        ),
        (
            r4::Packet::PubRel(r4::PubRel::new(11)),
            Packet::PubRel(PubResponse::new(id(11))),
        ),
        (
            r4::Packet::PubComp(r4::PubComp::new(12)),
            Packet::PubComp(PubResponse::new(id(12))),
        ),
        (r4::Packet::PingReq, Packet::PingReq),
        (
            r4::Packet::Disconnect,
            Packet::Disconnect(Default::default()),
        ),
    ] {
        let mut buf = BytesMut::new();
        packet.write(&mut buf, 1 << 20).expect("rumqttc encodes");
        assert_eq!(ours(&mut buf, ProtocolVersion::V311), expected);
    }
}

#[test]
fn v311_packets_we_encode_decode_in_rumqttc() {
    let read = |packet: Packet| {
        let mut buf = encode(packet, ProtocolVersion::V311);
        let decoded = r4::Packet::read(&mut buf, 1 << 20).expect("rumqttc decodes");
        assert!(buf.is_empty());
        decoded
    };
    assert_eq!(
        read(Packet::ConnAck(ConnAck::new(ReasonCode::Success, true))),
        r4::Packet::ConnAck(r4::ConnAck::new(r4::ConnectReturnCode::Success, true))
    );
    assert_eq!(
        read(Packet::ConnAck(ConnAck::new(
            ReasonCode::BadUserNameOrPassword,
            false
        ))),
        r4::Packet::ConnAck(r4::ConnAck::new(
            r4::ConnectReturnCode::BadUserNamePassword,
            false
        ))
    );
    let mut publish = Publish::new(topic("sensors/t1"), "21.5");
    publish.qos = QoS::AtLeastOnce;
    publish.packet_id = Some(id(3));
    publish.retain = true;
    let mut expected = r4::Publish::new("sensors/t1", rumqttc::QoS::AtLeastOnce, "21.5");
    expected.pkid = 3;
    expected.retain = true;
    assert_eq!(
        read(Packet::Publish(publish)),
        r4::Packet::Publish(expected)
    );
    let suback = SubAck {
        packet_id: id(5),
        properties: Properties::default(),
        reasons: vec![ReasonCode::GrantedQoS1, ReasonCode::NotAuthorized],
    };
    assert_eq!(
        read(Packet::SubAck(suback)),
        r4::Packet::SubAck(r4::SubAck::new(
            5,
            vec![
                r4::SubscribeReasonCode::Success(rumqttc::QoS::AtLeastOnce),
                r4::SubscribeReasonCode::Failure
            ]
        ))
    );
    let unsuback = UnsubAck {
        packet_id: id(6),
        properties: Properties::default(),
        reasons: vec![ReasonCode::Success],
    };
    assert_eq!(
        read(Packet::UnsubAck(unsuback)),
        r4::Packet::UnsubAck(r4::UnsubAck::new(6))
    );
    assert_eq!(
        read(Packet::PubAck(PubResponse::new(id(9)))),
        r4::Packet::PubAck(r4::PubAck::new(9))
    );
    assert_eq!(
        read(Packet::PubRec(PubResponse::new(id(9)))),
        r4::Packet::PubRec(r4::PubRec::new(9))
    );
    assert_eq!(
        read(Packet::PubRel(PubResponse::new(id(9)))),
        r4::Packet::PubRel(r4::PubRel::new(9))
    );
    assert_eq!(
        read(Packet::PubComp(PubResponse::new(id(9)))),
        r4::Packet::PubComp(r4::PubComp::new(9))
    );
    assert_eq!(read(Packet::PingResp), r4::Packet::PingResp);
}

#[test]
fn v5_packets_from_rumqttc_decode() {
    let connect = r5::Connect {
        keep_alive: 15,
        client_id: "gw-1".into(),
        clean_start: true,
        properties: Some(r5::ConnectProperties {
            session_expiry_interval: Some(3600),
            receive_maximum: Some(20),
            max_packet_size: Some(65536),
            topic_alias_max: Some(10),
            request_response_info: Some(1),
            request_problem_info: Some(0),
            user_properties: vec![("site".into(), "north".into())],
            authentication_method: None,
            authentication_data: None,
        }),
    };
    let will = r5::LastWill::new(
        "status/gw-1",
        "offline",
        rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
        false,
        Some(r5::LastWillProperties {
            delay_interval: Some(5),
            payload_format_indicator: Some(1),
            message_expiry_interval: Some(60),
            content_type: Some("text/plain".into()),
            response_topic: Some("replies/gw-1".into()),
            correlation_data: Some(Bytes::from("c1")),
            user_properties: vec![],
        }),
    );
    let login = r5::Login::new("gw", "pw");
    let mut buf = BytesMut::new();
    r5::Packet::Connect(connect, Some(will), Some(login))
        .write(&mut buf, None)
        .expect("rumqttc encodes");
    let Packet::Connect(c) = ours(&mut buf, ProtocolVersion::V311) else {
        panic!("expected CONNECT")
    };
    assert_eq!(
        c.protocol,
        ProtocolVersion::V5,
        "CONNECT carries its own level"
    );
    assert_eq!(c.client_id, "gw-1");
    assert_eq!(c.properties.session_expiry_interval_secs, Some(3600));
    assert_eq!(c.properties.receive_maximum, NonZeroU16::new(20));
    assert_eq!(c.properties.maximum_packet_size, NonZeroU32::new(65536));
    assert_eq!(c.properties.topic_alias_maximum, Some(10));
    assert_eq!(c.properties.request_response_information, Some(true));
    assert_eq!(c.properties.request_problem_information, Some(false));
    assert_eq!(
        c.properties.user_properties,
        [("site".to_string(), "north".to_string())]
    );
    let will = c.will.expect("will present");
    assert_eq!(will.properties.will_delay_interval_secs, Some(5));
    assert_eq!(will.properties.payload_format_utf8, Some(true));
    assert_eq!(will.properties.content_type.as_deref(), Some("text/plain"));
    assert_eq!(will.properties.response_topic, Some(topic("replies/gw-1")));
    assert_eq!(will.properties.correlation_data, Some(Bytes::from("c1")));
    assert_eq!(c.username.as_deref(), Some("gw"));

    let mut publish = r5::Publish::new(
        "sensors/t1",
        rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
        "21.5",
        Some(r5::PublishProperties {
            payload_format_indicator: Some(1),
            message_expiry_interval: Some(120),
            topic_alias: Some(4),
            response_topic: Some("replies/1".into()),
            correlation_data: Some(Bytes::from("abc")),
            user_properties: vec![("unit".into(), "C".into()), ("unit".into(), "K".into())],
            subscription_identifiers: vec![],
            content_type: Some("text/plain".into()),
        }),
    );
    publish.pkid = 77;
    let mut buf = BytesMut::new();
    r5::Packet::Publish(publish)
        .write(&mut buf, None)
        .expect("rumqttc encodes");
    let Packet::Publish(p) = ours(&mut buf, ProtocolVersion::V5) else {
        panic!("expected PUBLISH")
    };
    assert_eq!(p.topic.as_str(), "sensors/t1");
    assert_eq!(p.packet_id, Some(id(77)));
    assert_eq!(p.payload, Bytes::from("21.5"));
    assert_eq!(p.properties.message_expiry_interval_secs, Some(120));
    assert_eq!(p.properties.topic_alias, NonZeroU16::new(4));
    assert_eq!(
        p.properties.user_properties.len(),
        2,
        "repeated names are kept in order"
    );

    let mut filter = r5::Filter::new(
        "$share/workers/sensors/#",
        rumqttc::v5::mqttbytes::QoS::ExactlyOnce,
    );
    filter.preserve_retain = true;
    filter.retain_forward_rule = r5::RetainForwardRule::Never;
    let mut subscribe = r5::Subscribe::new(
        filter,
        Some(r5::SubscribeProperties {
            id: Some(99),
            user_properties: vec![],
        }),
    );
    subscribe.pkid = 5;
    let mut buf = BytesMut::new();
    r5::Packet::Subscribe(subscribe)
        .write(&mut buf, None)
        .expect("rumqttc encodes");
    let Packet::Subscribe(s) = ours(&mut buf, ProtocolVersion::V5) else {
        panic!("expected SUBSCRIBE")
    };
    assert_eq!(
        s.properties.subscription_identifiers,
        [NonZeroU32::new(99).expect("non-zero")]
    );
    let sub = &s.subscriptions[0];
    assert_eq!(sub.filter.share_name(), Some("workers"));
    assert_eq!(sub.filter.filter(), "sensors/#");
    assert_eq!(sub.options.qos, QoS::ExactlyOnce);
    assert!(sub.options.retain_as_published);
    assert_eq!(sub.options.retain_handling, RetainHandling::DoNotSend);

    let disconnect = r5::Disconnect {
        reason_code: r5::DisconnectReasonCode::DisconnectWithWillMessage,
        properties: Some(r5::DisconnectProperties {
            session_expiry_interval: Some(0),
            reason_string: Some("bye".into()),
            user_properties: vec![],
            server_reference: None,
        }),
    };
    let mut buf = BytesMut::new();
    r5::Packet::Disconnect(disconnect)
        .write(&mut buf, None)
        .expect("rumqttc encodes");
    let Packet::Disconnect(d) = ours(&mut buf, ProtocolVersion::V5) else {
        panic!("expected DISCONNECT")
    };
    assert_eq!(d.reason, ReasonCode::DisconnectWithWillMessage);
    assert_eq!(d.properties.session_expiry_interval_secs, Some(0));
    assert_eq!(d.properties.reason_string.as_deref(), Some("bye"));
}

/// rumqttc 0.25 encodes a DISCONNECT with a reason code and no properties as remaining
/// length 1 followed by two bytes (the code and an empty property length). We decode the
/// DISCONNECT the length describes; the stray byte is then the start of a "packet" of
/// reserved type 0. A broker closes the connection after DISCONNECT and never reads it.
#[test]
fn rumqttc_v5_disconnect_without_properties_has_a_stray_byte() {
    let mut buf = BytesMut::new();
    r5::Packet::Disconnect(r5::Disconnect::new(
        r5::DisconnectReasonCode::DisconnectWithWillMessage,
    ))
    .write(&mut buf, None)
    .expect("rumqttc encodes");
    assert_eq!(&buf[..], [0xe0, 0x01, 0x04, 0x00]);
    let first = decode(&mut buf, ProtocolVersion::V5, MAX_PACKET_SIZE);
    let Ok(Some(Packet::Disconnect(d))) = first else {
        panic!("expected DISCONNECT, got {first:?}")
    };
    assert_eq!(d.reason, ReasonCode::DisconnectWithWillMessage);
    assert_eq!(&buf[..], [0x00]);
}

#[test]
fn v5_packets_we_encode_decode_in_rumqttc() {
    let read = |packet: Packet| {
        let mut buf = encode(packet, ProtocolVersion::V5);
        let decoded = r5::Packet::read(&mut buf, None).expect("rumqttc decodes");
        assert!(buf.is_empty());
        decoded
    };
    let mut connack = ConnAck::new(ReasonCode::Success, false);
    connack.properties = PropertyValues {
        receive_maximum: NonZeroU16::new(100),
        maximum_qos: Some(QoS::AtLeastOnce),
        assigned_client_identifier: Some("auto-1".into()),
        topic_alias_maximum: Some(16),
        server_keep_alive_secs: Some(30),
        shared_subscription_available: Some(true),
        ..Default::default()
    }
    .into();
    let r5::Packet::ConnAck(ack) = read(Packet::ConnAck(connack)) else {
        panic!("expected CONNACK")
    };
    assert_eq!(ack.code, r5::ConnectReturnCode::Success);
    let props = ack.properties.expect("properties present");
    assert_eq!(props.receive_max, Some(100));
    assert_eq!(props.max_qos, Some(1));
    assert_eq!(props.assigned_client_identifier.as_deref(), Some("auto-1"));
    assert_eq!(props.topic_alias_max, Some(16));
    assert_eq!(props.server_keep_alive, Some(30));
    assert_eq!(props.shared_subscription_available, Some(1));

    let mut publish = Publish::new(topic("a/b"), Bytes::from_static(b"\x00\x01"));
    publish.qos = QoS::ExactlyOnce;
    publish.packet_id = Some(id(1000));
    publish.properties.subscription_identifiers = vec![
        NonZeroU32::new(1).expect("non-zero"),
        NonZeroU32::new(300_000).expect("non-zero"),
    ];
    publish.properties.content_type = Some("application/octet-stream".into());
    let r5::Packet::Publish(p) = read(Packet::Publish(publish)) else {
        panic!("expected PUBLISH")
    };
    assert_eq!(&p.topic[..], b"a/b");
    assert_eq!(p.pkid, 1000);
    assert_eq!(&p.payload[..], b"\x00\x01");
    let props = p.properties.expect("properties present");
    assert_eq!(props.subscription_identifiers, [1, 300_000]);
    assert_eq!(
        props.content_type.as_deref(),
        Some("application/octet-stream")
    );

    let mut puback = PubResponse::new(id(4));
    puback.reason = ReasonCode::NoMatchingSubscribers;
    let r5::Packet::PubAck(ack) = read(Packet::PubAck(puback)) else {
        panic!("expected PUBACK")
    };
    assert_eq!(
        (ack.pkid, ack.reason),
        (4, r5::PubAckReason::NoMatchingSubscribers)
    );

    let suback = SubAck {
        packet_id: id(2),
        properties: PropertyValues {
            reason_string: Some("no wildcards here".into()),
            ..Default::default()
        }
        .into(),
        reasons: vec![
            ReasonCode::GrantedQoS2,
            ReasonCode::WildcardSubscriptionsNotSupported,
        ],
    };
    let r5::Packet::SubAck(ack) = read(Packet::SubAck(suback)) else {
        panic!("expected SUBACK")
    };
    assert_eq!(
        ack.return_codes,
        [
            r5::SubscribeReasonCode::Success(rumqttc::v5::mqttbytes::QoS::ExactlyOnce),
            r5::SubscribeReasonCode::WildcardSubscriptionsNotSupported
        ]
    );
    assert_eq!(
        ack.properties.and_then(|p| p.reason_string).as_deref(),
        Some("no wildcards here")
    );
}
