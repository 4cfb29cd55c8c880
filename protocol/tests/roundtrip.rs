//! Property tests: every packet type, in both protocol versions, survives encode → decode
//! unchanged, and a packet cut short anywhere decodes as "need more bytes".

use std::num::{NonZeroU16, NonZeroU32};

use bytes::{Bytes, BytesMut};
use ferry_protocol::mqtt::properties::id;
use ferry_protocol::mqtt::{
    decode, Auth, ConnAck, Connect, Disconnect, Packet, PacketType, Properties, PropertyContext,
    PropertyValues, ProtocolVersion, PubResponse, Publish, QoS, ReasonCode, RetainHandling, SubAck,
    Subscribe, Subscription, SubscriptionOptions, UnsubAck, Unsubscribe, Will, MAX_PACKET_SIZE,
};
use ferry_protocol::topic::{TopicFilter, TopicName};
use proptest::collection::vec;
use proptest::option;
use proptest::prelude::*;

use ProtocolVersion::{V311, V5};

fn text() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9 _.\u{e9}\u{4e2d}-]{0,12}"
}

fn bytes() -> impl Strategy<Value = Bytes> {
    vec(any::<u8>(), 0..40).prop_map(Bytes::from)
}

fn topic_name() -> impl Strategy<Value = TopicName> {
    "[a-z0-9$]{0,4}(/[a-zA-Z0-9 \u{e9}]{0,6}){0,4}"
        .prop_filter_map("non-empty", |s| TopicName::new(s).ok())
}

fn topic_filter() -> impl Strategy<Value = TopicFilter> {
    let level = prop_oneof![Just("+".to_string()), "[a-z0-9]{0,5}"];
    (vec(level, 1..5), any::<bool>(), option::of("[a-z]{1,6}")).prop_filter_map(
        "valid filter",
        |(levels, hash, share)| {
            let mut f = levels.join("/");
            if hash {
                f.push_str("/#");
            }
            if let Some(group) = share {
                f = format!("$share/{group}/{f}");
            }
            TopicFilter::new(f).ok()
        },
    )
}

fn qos() -> impl Strategy<Value = QoS> {
    prop_oneof![
        Just(QoS::AtMostOnce),
        Just(QoS::AtLeastOnce),
        Just(QoS::ExactlyOnce)
    ]
}

fn packet_id() -> impl Strategy<Value = NonZeroU16> {
    (1..=u16::MAX).prop_map(|v| NonZeroU16::new(v).expect("range starts at 1"))
}

/// Every property with some value, then only those `ctx` allows kept.
fn properties(ctx: PropertyContext) -> impl Strategy<Value = Properties> {
    let a = (
        option::of(any::<bool>()),
        option::of(any::<u32>()),
        option::of(text()),
        option::of(topic_name()),
        option::of(bytes()),
        vec(1..=268_435_455u32, 0..3),
        option::of(any::<u32>()),
        option::of(text()),
        option::of(any::<u16>()),
    );
    let b = (
        option::of(text()),
        option::of(bytes()),
        option::of(any::<bool>()),
        option::of(any::<u32>()),
        option::of(any::<bool>()),
        option::of(text()),
        option::of(text()),
        option::of(text()),
        option::of(1..=u16::MAX),
    );
    let c = (
        option::of(any::<u16>()),
        option::of(1..=u16::MAX),
        option::of(prop_oneof![Just(QoS::AtMostOnce), Just(QoS::AtLeastOnce)]),
        option::of(any::<bool>()),
        vec((text(), text()), 0..3),
        option::of(1..=u32::MAX),
        option::of(any::<bool>()),
        option::of(any::<bool>()),
        option::of(any::<bool>()),
    );
    (a, b, c).prop_map(move |(a, b, c)| {
        let mut p: Properties = PropertyValues {
            payload_format_utf8: a.0,
            message_expiry_interval_secs: a.1,
            content_type: a.2,
            response_topic: a.3,
            correlation_data: a.4,
            subscription_identifiers: a.5.into_iter().filter_map(NonZeroU32::new).collect(),
            session_expiry_interval_secs: a.6,
            assigned_client_identifier: a.7,
            server_keep_alive_secs: a.8,
            authentication_method: b.0,
            authentication_data: b.1,
            request_problem_information: b.2,
            will_delay_interval_secs: b.3,
            request_response_information: b.4,
            response_information: b.5,
            server_reference: b.6,
            reason_string: b.7,
            receive_maximum: b.8.and_then(NonZeroU16::new),
            topic_alias_maximum: c.0,
            topic_alias: c.1.and_then(NonZeroU16::new),
            maximum_qos: c.2,
            retain_available: c.3,
            user_properties: c.4,
            maximum_packet_size: c.5.and_then(NonZeroU32::new),
            wildcard_subscription_available: c.6,
            subscription_identifiers_available: c.7,
            shared_subscription_available: c.8,
        }
        .into();
        keep_allowed(&mut p, ctx);
        p
    })
}

fn keep_allowed(p: &mut Properties, ctx: PropertyContext) {
    macro_rules! keep {
        ($($field:ident: $id:expr),* $(,)?) => {
            $(if !ctx.allows($id) { p.$field = Default::default(); })*
        };
    }
    keep!(
        payload_format_utf8: id::PAYLOAD_FORMAT_INDICATOR,
        message_expiry_interval_secs: id::MESSAGE_EXPIRY_INTERVAL,
        content_type: id::CONTENT_TYPE,
        response_topic: id::RESPONSE_TOPIC,
        correlation_data: id::CORRELATION_DATA,
        subscription_identifiers: id::SUBSCRIPTION_IDENTIFIER,
        session_expiry_interval_secs: id::SESSION_EXPIRY_INTERVAL,
        assigned_client_identifier: id::ASSIGNED_CLIENT_IDENTIFIER,
        server_keep_alive_secs: id::SERVER_KEEP_ALIVE,
        authentication_method: id::AUTHENTICATION_METHOD,
        authentication_data: id::AUTHENTICATION_DATA,
        request_problem_information: id::REQUEST_PROBLEM_INFORMATION,
        will_delay_interval_secs: id::WILL_DELAY_INTERVAL,
        request_response_information: id::REQUEST_RESPONSE_INFORMATION,
        response_information: id::RESPONSE_INFORMATION,
        server_reference: id::SERVER_REFERENCE,
        reason_string: id::REASON_STRING,
        receive_maximum: id::RECEIVE_MAXIMUM,
        topic_alias_maximum: id::TOPIC_ALIAS_MAXIMUM,
        topic_alias: id::TOPIC_ALIAS,
        maximum_qos: id::MAXIMUM_QOS,
        retain_available: id::RETAIN_AVAILABLE,
        user_properties: id::USER_PROPERTY,
        maximum_packet_size: id::MAXIMUM_PACKET_SIZE,
        wildcard_subscription_available: id::WILDCARD_SUBSCRIPTION_AVAILABLE,
        subscription_identifiers_available: id::SUBSCRIPTION_IDENTIFIER_AVAILABLE,
        shared_subscription_available: id::SHARED_SUBSCRIPTION_AVAILABLE,
    );
    if ctx != PropertyContext::Packet(PacketType::Publish) {
        p.subscription_identifiers.truncate(1);
    }
}

/// Properties for `kind` in v5; none in 3.1.1.
fn props_for(version: ProtocolVersion, ctx: PropertyContext) -> BoxedStrategy<Properties> {
    match version {
        V311 => Just(Properties::default()).boxed(),
        V5 => properties(ctx).boxed(),
    }
}

fn reason_for(version: ProtocolVersion, kind: PacketType) -> BoxedStrategy<ReasonCode> {
    let allowed: Vec<ReasonCode> = match (version, kind) {
        (V311, PacketType::ConnAck) => (0..=5).filter_map(ReasonCode::from_v311_connack).collect(),
        (V311, PacketType::SubAck) => [0, 1, 2, 0x80]
            .into_iter()
            .filter_map(ReasonCode::from_v311_suback)
            .collect(),
        (V311, _) => vec![ReasonCode::Success],
        (V5, _) => ReasonCode::ALL
            .into_iter()
            .filter(|c| c.allowed_in(kind))
            .collect(),
    };
    proptest::sample::select(allowed).boxed()
}

fn ctx(kind: PacketType) -> PropertyContext {
    PropertyContext::Packet(kind)
}

fn connect(version: ProtocolVersion) -> impl Strategy<Value = Packet> {
    let will = (
        topic_name(),
        bytes(),
        qos(),
        any::<bool>(),
        props_for(version, PropertyContext::Will),
    )
        .prop_map(|(topic, payload, qos, retain, properties)| Will {
            topic,
            payload,
            qos,
            retain,
            properties,
        });
    (
        any::<bool>(),
        any::<u16>(),
        props_for(version, ctx(PacketType::Connect)),
        text(),
        option::of(will),
        option::of(text()),
        option::of(bytes()),
    )
        .prop_map(
            move |(
                clean_start,
                keep_alive_secs,
                properties,
                client_id,
                will,
                username,
                password,
            )| {
                // 3.1.1 forbids a password without a username.
                let password = if version == V311 && username.is_none() {
                    None
                } else {
                    password
                };
                Packet::Connect(Box::new(Connect {
                    protocol: version,
                    clean_start,
                    keep_alive_secs,
                    properties,
                    client_id,
                    will,
                    username,
                    password,
                }))
            },
        )
}

fn publish(version: ProtocolVersion) -> impl Strategy<Value = Packet> {
    (
        any::<bool>(),
        qos(),
        any::<bool>(),
        topic_name(),
        packet_id(),
        props_for(version, ctx(PacketType::Publish)),
        bytes(),
        any::<bool>(),
    )
        .prop_map(
            |(dup, qos, retain, topic, id, properties, payload, alias_only)| {
                let topic = if alias_only && properties.topic_alias.is_some() {
                    TopicName::alias_only()
                } else {
                    topic
                };
                let at_most_once = qos == QoS::AtMostOnce;
                Packet::Publish(Publish {
                    dup: dup && !at_most_once,
                    qos,
                    retain,
                    topic,
                    packet_id: (!at_most_once).then_some(id),
                    properties,
                    payload,
                })
            },
        )
}

fn pub_response(version: ProtocolVersion, kind: PacketType) -> impl Strategy<Value = Packet> {
    (
        packet_id(),
        reason_for(version, kind),
        props_for(version, ctx(kind)),
    )
        .prop_map(move |(packet_id, reason, properties)| {
            let r = PubResponse {
                packet_id,
                reason,
                properties,
            };
            match kind {
                PacketType::PubAck => Packet::PubAck(r),
                PacketType::PubRec => Packet::PubRec(r),
                PacketType::PubRel => Packet::PubRel(r),
                _ => Packet::PubComp(r),
            }
        })
}

fn subscribe(version: ProtocolVersion) -> impl Strategy<Value = Packet> {
    let options =
        (qos(), any::<bool>(), any::<bool>(), 0..3u8).prop_map(move |(qos, nl, rap, rh)| {
            if version == V311 {
                return SubscriptionOptions::new(qos);
            }
            SubscriptionOptions {
                qos,
                no_local: nl,
                retain_as_published: rap,
                retain_handling: match rh {
                    0 => RetainHandling::SendAtSubscribe,
                    1 => RetainHandling::SendAtSubscribeIfNew,
                    _ => RetainHandling::DoNotSend,
                },
            }
        });
    let subscription = (topic_filter(), options).prop_map(|(filter, mut options)| {
        options.no_local &= !filter.is_shared();
        Subscription { filter, options }
    });
    (
        packet_id(),
        props_for(version, ctx(PacketType::Subscribe)),
        vec(subscription, 1..4),
    )
        .prop_map(|(packet_id, properties, subscriptions)| {
            Packet::Subscribe(Subscribe {
                packet_id,
                properties,
                subscriptions,
            })
        })
}

fn suback(version: ProtocolVersion) -> impl Strategy<Value = Packet> {
    (
        packet_id(),
        props_for(version, ctx(PacketType::SubAck)),
        vec(reason_for(version, PacketType::SubAck), 1..5),
    )
        .prop_map(|(packet_id, properties, reasons)| {
            Packet::SubAck(SubAck {
                packet_id,
                properties,
                reasons,
            })
        })
}

fn unsubscribe(version: ProtocolVersion) -> impl Strategy<Value = Packet> {
    (
        packet_id(),
        props_for(version, ctx(PacketType::Unsubscribe)),
        vec(topic_filter(), 1..4),
    )
        .prop_map(|(packet_id, properties, filters)| {
            Packet::Unsubscribe(Unsubscribe {
                packet_id,
                properties,
                filters,
            })
        })
}

fn unsuback(version: ProtocolVersion) -> impl Strategy<Value = Packet> {
    let reasons = match version {
        V311 => Just(Vec::new()).boxed(),
        V5 => vec(reason_for(V5, PacketType::UnsubAck), 1..5).boxed(),
    };
    (
        packet_id(),
        props_for(version, ctx(PacketType::UnsubAck)),
        reasons,
    )
        .prop_map(|(packet_id, properties, reasons)| {
            Packet::UnsubAck(UnsubAck {
                packet_id,
                properties,
                reasons,
            })
        })
}

fn packet(version: ProtocolVersion) -> impl Strategy<Value = Packet> {
    let connack = (
        any::<bool>(),
        reason_for(version, PacketType::ConnAck),
        props_for(version, ctx(PacketType::ConnAck)),
    )
        .prop_map(|(session_present, code, properties)| {
            Packet::ConnAck(ConnAck {
                session_present,
                code,
                properties,
            })
        });
    let disconnect = (
        reason_for(version, PacketType::Disconnect),
        props_for(version, ctx(PacketType::Disconnect)),
    )
        .prop_map(|(reason, properties)| Packet::Disconnect(Disconnect { reason, properties }));
    let auth = (
        reason_for(V5, PacketType::Auth),
        properties(ctx(PacketType::Auth)),
    )
        .prop_map(|(reason, properties)| Packet::Auth(Auth { reason, properties }));
    let mut all = vec![
        connect(version).boxed(),
        connack.boxed(),
        publish(version).boxed(),
        pub_response(version, PacketType::PubAck).boxed(),
        pub_response(version, PacketType::PubRec).boxed(),
        pub_response(version, PacketType::PubRel).boxed(),
        pub_response(version, PacketType::PubComp).boxed(),
        subscribe(version).boxed(),
        suback(version).boxed(),
        unsubscribe(version).boxed(),
        unsuback(version).boxed(),
        Just(Packet::PingReq).boxed(),
        Just(Packet::PingResp).boxed(),
        disconnect.boxed(),
    ];
    if version == V5 {
        all.push(auth.boxed());
    }
    proptest::strategy::Union::new(all)
}

fn round_trip(packet: &Packet, version: ProtocolVersion) -> Result<(), TestCaseError> {
    let mut buf = BytesMut::new();
    let written = packet
        .encode(version, &mut buf)
        .map_err(|e| TestCaseError::fail(format!("{e}")))?;
    prop_assert_eq!(written, buf.len());
    prop_assert_eq!(packet.encoded_len(version).ok(), Some(written));
    let bytes = buf.clone();

    // Every strict prefix is "need more bytes" and consumes nothing.
    for cut in 0..bytes.len() {
        let mut partial = BytesMut::from(&bytes[..cut]);
        prop_assert_eq!(decode(&mut partial, version, MAX_PACKET_SIZE), Ok(None));
        prop_assert_eq!(partial.len(), cut);
    }

    let decoded = decode(&mut buf, version, MAX_PACKET_SIZE);
    prop_assert_eq!(decoded, Ok(Some(packet.clone())));
    prop_assert!(buf.is_empty());
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn v5_packets_round_trip(p in packet(V5)) {
        round_trip(&p, V5)?;
    }

    #[test]
    fn v311_packets_round_trip(p in packet(V311)) {
        round_trip(&p, V311)?;
    }

    /// Two packets back to back in one buffer decode one after the other.
    #[test]
    fn packets_stream_back_to_back(a in packet(V5), b in packet(V5)) {
        let mut buf = BytesMut::new();
        a.encode(V5, &mut buf).map_err(|e| TestCaseError::fail(format!("{e}")))?;
        b.encode(V5, &mut buf).map_err(|e| TestCaseError::fail(format!("{e}")))?;
        prop_assert_eq!(decode(&mut buf, V5, MAX_PACKET_SIZE), Ok(Some(a)));
        prop_assert_eq!(decode(&mut buf, V5, MAX_PACKET_SIZE), Ok(Some(b)));
        prop_assert_eq!(decode(&mut buf, V5, MAX_PACKET_SIZE), Ok(None));
    }

    /// A v5 packet encoded for 3.1.1 (properties dropped, codes mapped) decodes as 3.1.1.
    #[test]
    fn v5_packets_downgrade_to_v311(p in packet(V5)) {
        prop_assume!(!matches!(p, Packet::Auth(_) | Packet::Connect(_)));
        if let Packet::Publish(ref publish) = p {
            prop_assume!(!publish.topic.is_empty());
        }
        let mut buf = BytesMut::new();
        p.encode(V311, &mut buf).map_err(|e| TestCaseError::fail(format!("{e}")))?;
        let decoded = decode(&mut buf, V311, MAX_PACKET_SIZE);
        prop_assert!(matches!(decoded, Ok(Some(_))), "{:?}", decoded);
        prop_assert!(buf.is_empty());
    }
}
