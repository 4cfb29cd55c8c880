//! A table of malformed inputs, each with the exact error the decoder must give. Every entry
//! is also checked not to consume a partial packet as something else.

use bytes::BytesMut;
use ferry_protocol::mqtt::{decode, DecodeError, PacketType, ProtocolVersion, ReasonCode};
use ferry_protocol::topic::TopicError;

use DecodeError as E;
use ProtocolVersion::{V311, V5};

/// A packet with the given first byte and body; the remaining length is computed.
fn pkt(byte1: u8, body: &[u8]) -> Vec<u8> {
    assert!(
        body.len() < 128,
        "test packets use a one-byte remaining length"
    );
    let mut v = vec![byte1, body.len() as u8];
    v.extend_from_slice(body);
    v
}

/// A length-prefixed string or binary field.
fn s(data: &[u8]) -> Vec<u8> {
    let mut v = (data.len() as u16).to_be_bytes().to_vec();
    v.extend_from_slice(data);
    v
}

fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

/// CONNECT variable header and payload: name, level, flags, keep alive, then `rest`.
fn connect(name: &[u8], level: u8, flags: u8, rest: &[u8]) -> Vec<u8> {
    pkt(0x10, &cat(&[&s(name), &[level, flags, 0, 60], rest]))
}

fn cases() -> Vec<(&'static str, ProtocolVersion, Vec<u8>, DecodeError)> {
    vec![
        (
            "remaining length over four bytes",
            V5,
            vec![0x30, 0xff, 0xff, 0xff, 0xff, 0x7f],
            E::MalformedVarInt,
        ),
        (
            "remaining length not in its shortest form",
            V5,
            vec![0xc0, 0x80, 0x00],
            E::MalformedVarInt,
        ),
        (
            "packet type 0 is reserved",
            V5,
            pkt(0x00, &[]),
            E::ReservedPacketType(0),
        ),
        (
            "AUTH does not exist in 3.1.1",
            V311,
            pkt(0xf0, &[]),
            E::ReservedPacketType(15),
        ),
        (
            "PINGREQ with flags",
            V311,
            pkt(0xc1, &[]),
            E::InvalidFlags {
                packet: PacketType::PingReq,
                flags: 1,
            },
        ),
        (
            "SUBSCRIBE without its 0b0010 flags",
            V311,
            pkt(0x80, &cat(&[&[0, 1], &s(b"a"), &[0]])),
            E::InvalidFlags {
                packet: PacketType::Subscribe,
                flags: 0,
            },
        ),
        (
            "PUBREL without its 0b0010 flags",
            V5,
            pkt(0x60, &[0, 1]),
            E::InvalidFlags {
                packet: PacketType::PubRel,
                flags: 0,
            },
        ),
        (
            "PUBLISH with QoS 3",
            V311,
            pkt(0x36, &s(b"a")),
            E::InvalidQoS(3),
        ),
        (
            "DUP on a QoS 0 PUBLISH",
            V311,
            pkt(0x38, &s(b"a")),
            E::DupWithQoS0,
        ),
        (
            "wildcard in a topic name",
            V311,
            pkt(0x30, &s(b"a/#")),
            E::TopicName(TopicError::WildcardInName { name: "a/#".into() }),
        ),
        (
            "'+' in a topic name",
            V5,
            pkt(0x30, &cat(&[&s(b"a/+/b"), &[0]])),
            E::TopicName(TopicError::WildcardInName {
                name: "a/+/b".into(),
            }),
        ),
        (
            "invalid UTF-8 in a topic",
            V311,
            pkt(0x30, &s(&[0xc3, 0x28])),
            E::InvalidUtf8,
        ),
        (
            "UTF-16 surrogate encoded in UTF-8",
            V311,
            pkt(0x30, &s(&[0xed, 0xa0, 0x80])),
            E::InvalidUtf8,
        ),
        (
            "U+0000 in a topic",
            V311,
            pkt(0x30, &s(b"a\0b")),
            E::NullCharacter,
        ),
        (
            "U+0000 in a client identifier",
            V311,
            connect(b"MQTT", 4, 0x02, &s(b"c\0")),
            E::NullCharacter,
        ),
        (
            "packet id 0 on a QoS 1 PUBLISH",
            V311,
            pkt(0x32, &cat(&[&s(b"a"), &[0, 0]])),
            E::ZeroPacketId,
        ),
        (
            "packet id 0 on PUBACK",
            V311,
            pkt(0x40, &[0, 0]),
            E::ZeroPacketId,
        ),
        (
            "packet id 0 on SUBSCRIBE",
            V5,
            pkt(0x82, &cat(&[&[0, 0, 0], &s(b"a"), &[0]])),
            E::ZeroPacketId,
        ),
        (
            "string longer than the packet",
            V311,
            pkt(0x30, &[0, 5, b'a']),
            E::Truncated,
        ),
        ("PUBACK cut short", V311, pkt(0x40, &[0]), E::Truncated),
        (
            "bytes after PINGREQ",
            V311,
            pkt(0xc0, &[0]),
            E::TrailingBytes {
                packet: PacketType::PingReq,
                count: 1,
            },
        ),
        (
            "a 3.1.1 PUBACK with a reason code",
            V311,
            pkt(0x40, &[0, 1, 0]),
            E::TrailingBytes {
                packet: PacketType::PubAck,
                count: 1,
            },
        ),
        (
            "a 3.1.1 DISCONNECT with a body",
            V311,
            pkt(0xe0, &[0]),
            E::TrailingBytes {
                packet: PacketType::Disconnect,
                count: 1,
            },
        ),
        (
            "protocol name not MQTT",
            V5,
            connect(b"MQTX", 4, 0x02, &s(b"c")),
            E::InvalidProtocolName("MQTX".into()),
        ),
        (
            "protocol level 6",
            V5,
            connect(b"MQTT", 6, 0x02, &s(b"c")),
            E::UnsupportedProtocolVersion { level: 6 },
        ),
        (
            "MQTT 3.1 (MQIsdp) is not supported",
            V5,
            connect(b"MQIsdp", 3, 0x02, &s(b"c")),
            E::UnsupportedProtocolVersion { level: 3 },
        ),
        (
            "reserved CONNECT flag",
            V311,
            connect(b"MQTT", 4, 0x03, &s(b"c")),
            E::ReservedConnectFlag,
        ),
        (
            "will QoS without the will flag",
            V311,
            connect(b"MQTT", 4, 0x0a, &s(b"c")),
            E::InvalidWillFlags,
        ),
        (
            "will retain without the will flag",
            V311,
            connect(b"MQTT", 4, 0x22, &s(b"c")),
            E::InvalidWillFlags,
        ),
        (
            "will QoS 3",
            V311,
            connect(b"MQTT", 4, 0x1e, &cat(&[&s(b"c"), &s(b"t"), &s(b"p")])),
            E::InvalidQoS(3),
        ),
        (
            "3.1.1 password without username",
            V311,
            connect(b"MQTT", 4, 0x42, &cat(&[&s(b"c"), &s(b"pw")])),
            E::PasswordWithoutUsername,
        ),
        (
            "wildcard in a will topic",
            V311,
            connect(b"MQTT", 4, 0x06, &cat(&[&s(b"c"), &s(b"t/+"), &s(b"p")])),
            E::TopicName(TopicError::WildcardInName { name: "t/+".into() }),
        ),
        (
            "Session Expiry Interval on PUBLISH",
            V5,
            pkt(0x30, &cat(&[&s(b"a"), &[5, 0x11, 0, 0, 0, 1]])),
            E::PropertyNotAllowed {
                property: 0x11,
                packet: PacketType::Publish,
            },
        ),
        (
            "Topic Alias in a will",
            V5,
            connect(
                b"MQTT",
                5,
                0x06,
                &cat(&[&[0], &s(b"c"), &[3, 0x23, 0, 1], &s(b"t"), &s(b"p")]),
            ),
            E::PropertyNotAllowed {
                property: 0x23,
                packet: PacketType::Connect,
            },
        ),
        (
            "Message Expiry Interval given twice",
            V5,
            pkt(0x30, &cat(&[&s(b"a"), &[10, 2, 0, 0, 0, 1, 2, 0, 0, 0, 2]])),
            E::DuplicateProperty { property: 0x02 },
        ),
        (
            "unknown property 0x05",
            V5,
            pkt(0x30, &cat(&[&s(b"a"), &[2, 0x05, 0]])),
            E::UnknownProperty(5),
        ),
        (
            "Topic Alias 0",
            V5,
            pkt(0x30, &cat(&[&s(b"a"), &[3, 0x23, 0, 0]])),
            E::InvalidPropertyValue {
                property: 0x23,
                value: 0,
            },
        ),
        (
            "Payload Format Indicator 2",
            V5,
            pkt(0x30, &cat(&[&s(b"a"), &[2, 0x01, 2]])),
            E::InvalidPropertyValue {
                property: 0x01,
                value: 2,
            },
        ),
        (
            "Receive Maximum 0 on CONNECT",
            V5,
            connect(b"MQTT", 5, 0x02, &cat(&[&[3, 0x21, 0, 0], &s(b"c")])),
            E::InvalidPropertyValue {
                property: 0x21,
                value: 0,
            },
        ),
        (
            "Maximum QoS 2 on CONNACK",
            V5,
            pkt(0x20, &[0, 0, 2, 0x24, 2]),
            E::InvalidPropertyValue {
                property: 0x24,
                value: 2,
            },
        ),
        (
            "property list longer than the packet",
            V5,
            pkt(0x30, &cat(&[&s(b"a"), &[9, 0x02, 0, 0]])),
            E::Truncated,
        ),
        (
            "empty topic without a Topic Alias (v5)",
            V5,
            pkt(0x30, &cat(&[&s(b""), &[0]])),
            E::TopicName(TopicError::Empty),
        ),
        (
            "empty topic (3.1.1)",
            V311,
            pkt(0x30, &s(b"")),
            E::TopicName(TopicError::Empty),
        ),
        (
            "'#' not last in a filter",
            V311,
            pkt(0x82, &cat(&[&[0, 1], &s(b"a/#/b"), &[0]])),
            E::TopicFilter(TopicError::MisplacedWildcard {
                filter: "a/#/b".into(),
            }),
        ),
        (
            "'+' sharing a level",
            V5,
            pkt(0x82, &cat(&[&[0, 1, 0], &s(b"a/b+"), &[0]])),
            E::TopicFilter(TopicError::MisplacedWildcard {
                filter: "a/b+".into(),
            }),
        ),
        (
            "empty topic filter",
            V311,
            pkt(0xa2, &cat(&[&[0, 1], &s(b"")])),
            E::TopicFilter(TopicError::Empty),
        ),
        (
            "shared subscription without a filter",
            V5,
            pkt(0x82, &cat(&[&[0, 1, 0], &s(b"$share/g"), &[0]])),
            E::TopicFilter(TopicError::EmptySharedFilter {
                filter: "$share/g".into(),
            }),
        ),
        (
            "SUBSCRIBE with no filters",
            V311,
            pkt(0x82, &[0, 1]),
            E::NoTopicFilters(PacketType::Subscribe),
        ),
        (
            "UNSUBSCRIBE with no filters",
            V5,
            pkt(0xa2, &[0, 1, 0]),
            E::NoTopicFilters(PacketType::Unsubscribe),
        ),
        (
            "3.1.1 subscription options with reserved bits",
            V311,
            pkt(0x82, &cat(&[&[0, 1], &s(b"a"), &[0x04]])),
            E::InvalidSubscriptionOptions(0x04),
        ),
        (
            "v5 subscription options with reserved bits",
            V5,
            pkt(0x82, &cat(&[&[0, 1, 0], &s(b"a"), &[0x40]])),
            E::InvalidSubscriptionOptions(0x40),
        ),
        (
            "retain handling 3",
            V5,
            pkt(0x82, &cat(&[&[0, 1, 0], &s(b"a"), &[0x30]])),
            E::InvalidSubscriptionOptions(0x30),
        ),
        (
            "subscription QoS 3",
            V311,
            pkt(0x82, &cat(&[&[0, 1], &s(b"a"), &[3]])),
            E::InvalidQoS(3),
        ),
        (
            "no local on a shared subscription",
            V5,
            pkt(0x82, &cat(&[&[0, 1, 0], &s(b"$share/g/a"), &[0x04]])),
            E::NoLocalOnSharedSubscription("$share/g/a".into()),
        ),
        (
            "Subscription Identifier 0",
            V5,
            pkt(0x82, &cat(&[&[0, 1, 2, 0x0b, 0], &s(b"a"), &[0]])),
            E::InvalidPropertyValue {
                property: 0x0b,
                value: 0,
            },
        ),
        (
            "two Subscription Identifiers on SUBSCRIBE",
            V5,
            pkt(0x82, &cat(&[&[0, 1, 4, 0x0b, 1, 0x0b, 2], &s(b"a"), &[0]])),
            E::DuplicateProperty { property: 0x0b },
        ),
        (
            "PUBACK with a PUBREL-only reason code",
            V5,
            pkt(0x40, &[0, 1, 0x92]),
            E::InvalidReasonCode {
                packet: PacketType::PubAck,
                code: 0x92,
            },
        ),
        (
            "DISCONNECT with a SUBACK-only reason code",
            V5,
            pkt(0xe0, &[0x01]),
            E::InvalidReasonCode {
                packet: PacketType::Disconnect,
                code: 0x01,
            },
        ),
        (
            "undefined reason code on AUTH",
            V5,
            pkt(0xf0, &[0x03, 0]),
            E::InvalidReasonCode {
                packet: PacketType::Auth,
                code: 0x03,
            },
        ),
        (
            "CONNACK with reserved flag bits",
            V5,
            pkt(0x20, &[0x02, 0, 0]),
            E::InvalidConnAckFlags(2),
        ),
        (
            "3.1.1 CONNACK return code 6",
            V311,
            pkt(0x20, &[0, 6]),
            E::InvalidReasonCode {
                packet: PacketType::ConnAck,
                code: 6,
            },
        ),
        (
            "3.1.1 SUBACK return code 3",
            V311,
            pkt(0x90, &[0, 1, 3]),
            E::InvalidReasonCode {
                packet: PacketType::SubAck,
                code: 3,
            },
        ),
        (
            "SUBACK with no return codes",
            V311,
            pkt(0x90, &[0, 1]),
            E::NoReasonCodes,
        ),
        (
            "v5 UNSUBACK with no reason codes",
            V5,
            pkt(0xb0, &[0, 1, 0]),
            E::NoReasonCodes,
        ),
    ]
}

#[test]
fn malformed_inputs_give_their_error() {
    let mut failures = Vec::new();
    for (what, version, bytes, expected) in cases() {
        let mut buf = BytesMut::from(&bytes[..]);
        let got = decode(&mut buf, version, 1024);
        if got != Err(expected.clone()) {
            failures.push(format!("{what}: expected {expected:?}, got {got:?}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The size limit is enforced from the fixed header alone: two header bytes that announce a
/// 16 KB body are refused before any of the body exists.
#[test]
fn oversize_packet_is_refused_from_the_fixed_header() {
    let mut buf = BytesMut::from(&[0x30u8, 0xff, 0x7f][..]);
    assert_eq!(
        decode(&mut buf, V5, 1024),
        Err(E::PacketTooLarge {
            size: 3 + 16_383,
            max: 1024
        })
    );
    // Exactly at the limit is fine and waits for the body.
    let mut buf = BytesMut::from(&[0x30u8, 0x7d][..]);
    assert_eq!(decode(&mut buf, V5, 127), Ok(None));
    assert_eq!(
        decode(&mut buf, V5, 126),
        Err(E::PacketTooLarge {
            size: 127,
            max: 126
        })
    );
}

#[test]
fn errors_map_to_the_reason_codes_a_broker_sends() {
    let cases = [
        (
            E::PacketTooLarge { size: 2, max: 1 },
            ReasonCode::PacketTooLarge,
        ),
        (E::Truncated, ReasonCode::MalformedPacket),
        (E::InvalidUtf8, ReasonCode::MalformedPacket),
        (
            E::DuplicateProperty { property: 2 },
            ReasonCode::ProtocolError,
        ),
        (
            E::UnsupportedProtocolVersion { level: 6 },
            ReasonCode::UnsupportedProtocolVersion,
        ),
        (
            E::TopicName(TopicError::Empty),
            ReasonCode::TopicNameInvalid,
        ),
        (
            E::TopicFilter(TopicError::Empty),
            ReasonCode::TopicFilterInvalid,
        ),
    ];
    for (error, code) in cases {
        assert_eq!(error.reason_code(), code, "{error}");
    }
}

/// Error messages say what was wrong, with the offending value.
#[test]
fn error_messages_name_the_problem() {
    let e = E::PropertyNotAllowed {
        property: 0x11,
        packet: PacketType::Publish,
    };
    assert_eq!(
        e.to_string(),
        "property Session Expiry Interval (0x11) is not allowed on Publish"
    );
    let e = E::PacketTooLarge {
        size: 2048,
        max: 1024,
    };
    assert_eq!(
        e.to_string(),
        "packet of 2048 bytes is over the maximum packet size of 1024"
    );
}
