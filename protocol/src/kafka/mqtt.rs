//! How an MQTT message rides in a Kafka record, the same on the link and in the cloud's log
//! (`docs/routes.md`): key = topic, value = payload, headers = the MQTT metadata.
//!
//! | header | value |
//! |---|---|
//! | `mqtt.qos` | `0`, `1` or `2` |
//! | `mqtt.retain` | `1` (absent when not set) |
//! | `mqtt.payload_format` | `1` UTF-8, `0` bytes |
//! | `mqtt.message_expiry` | seconds, decimal |
//! | `mqtt.content_type`, `mqtt.response_topic` | text |
//! | `mqtt.correlation_data` | bytes |
//! | any other name not starting with `ferry.` | an MQTT 5 user property, in order |
//!
//! `ferry.*` headers are Ferry's own (`ferry.edge`, `ferry.seq`, `ferry.class` when not 0,
//! `ferry.client`); the cloud
//! sets them and never takes them from an edge.

use bytes::Bytes;

use super::batch::Header;
use crate::mqtt::{Properties, QoS};
use crate::topic::TopicName;

/// The headers for a message's QoS, retain flag and properties (no `ferry.*` header).
pub fn message_headers(qos: QoS, retain: bool, p: &Properties) -> Vec<(String, Option<Bytes>)> {
    let mut headers = vec![(
        "mqtt.qos".to_owned(),
        Some(Bytes::from(vec![b'0' + qos as u8])),
    )];
    let mut put = |name: &str, value: Bytes| headers.push((name.to_owned(), Some(value)));
    if retain {
        put("mqtt.retain", Bytes::from_static(b"1"));
    }
    if let Some(utf8) = p.payload_format_utf8 {
        put(
            "mqtt.payload_format",
            Bytes::from_static(if utf8 { b"1" } else { b"0" }),
        );
    }
    if let Some(secs) = p.message_expiry_interval_secs {
        put("mqtt.message_expiry", Bytes::from(secs.to_string()));
    }
    if let Some(ct) = &p.content_type {
        put("mqtt.content_type", Bytes::copy_from_slice(ct.as_bytes()));
    }
    if let Some(rt) = &p.response_topic {
        put(
            "mqtt.response_topic",
            Bytes::copy_from_slice(rt.as_str().as_bytes()),
        );
    }
    if let Some(cd) = &p.correlation_data {
        put("mqtt.correlation_data", cd.clone());
    }
    for (name, value) in &p.user_properties {
        put(name, Bytes::copy_from_slice(value.as_bytes()));
    }
    headers
}

/// What a record's headers say about the MQTT message it carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MqttMeta {
    /// QoS 1 when the record has no `mqtt.qos` (a Kafka producer's record).
    pub qos: QoS,
    pub retain: bool,
    /// Message Expiry Interval as written, not yet reduced by the time since.
    pub properties: Properties,
    pub edge: Option<String>,
    pub seq: Option<u64>,
    /// The edge's priority class of the record (`ferry.class`; 0 when absent).
    pub class: u8,
    /// The cloud MQTT client that published it.
    pub client: Option<String>,
}

/// Reads the headers of a record; None if an `mqtt.*` or `ferry.*` header is malformed, or a
/// user property is not UTF-8.
pub fn read_headers(headers: &[Header<'_>]) -> Option<MqttMeta> {
    let mut m = MqttMeta {
        qos: QoS::AtLeastOnce,
        retain: false,
        properties: Properties::default(),
        edge: None,
        seq: None,
        class: 0,
        client: None,
    };
    for h in headers {
        let value = h.value.unwrap_or_default();
        let text = || std::str::from_utf8(value).ok().map(str::to_owned);
        match h.key {
            "mqtt.qos" => m.qos = QoS::from_u8(value.first()?.wrapping_sub(b'0')).ok()?,
            "mqtt.retain" => m.retain = value == b"1",
            "mqtt.payload_format" => m.properties.payload_format_utf8 = Some(value == b"1"),
            "mqtt.message_expiry" => {
                m.properties.message_expiry_interval_secs = Some(text()?.parse().ok()?)
            }
            "mqtt.content_type" => m.properties.content_type = Some(text()?),
            "mqtt.response_topic" => {
                m.properties.response_topic = Some(TopicName::new(text()?).ok()?)
            }
            "mqtt.correlation_data" => {
                m.properties.correlation_data = Some(Bytes::copy_from_slice(value))
            }
            "ferry.edge" => m.edge = Some(text()?),
            "ferry.seq" => m.seq = Some(text()?.parse().ok()?),
            "ferry.class" => m.class = text()?.parse().ok()?,
            "ferry.client" => m.client = Some(text()?),
            k if k.starts_with("ferry.") || k.starts_with("mqtt.") => {}
            k => m.properties.user_properties.push((k.to_owned(), text()?)),
        }
    }
    Some(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_read_back_as_the_metadata_they_were_made_from() {
        let mut p = Properties::default();
        p.payload_format_utf8 = Some(true);
        p.message_expiry_interval_secs = Some(60);
        p.content_type = Some("text/plain".into());
        p.response_topic = Some(TopicName::new("reply/here").expect("topic"));
        p.correlation_data = Some(Bytes::from_static(b"\x00\x01"));
        p.user_properties = vec![("unit".into(), "C".into()), ("unit".into(), "K".into())];
        let owned = message_headers(QoS::ExactlyOnce, true, &p);
        let mut headers: Vec<Header<'_>> = owned
            .iter()
            .map(|(k, v)| Header {
                key: k,
                value: v.as_deref(),
            })
            .collect();
        headers.push(Header {
            key: "ferry.seq",
            value: Some(b"42"),
        });
        let m = read_headers(&headers).expect("well formed");
        assert_eq!((m.qos, m.retain, m.seq), (QoS::ExactlyOnce, true, Some(42)));
        assert_eq!(m.properties, p);
        let bad = [Header {
            key: "mqtt.qos",
            value: Some(b"7"),
        }];
        assert_eq!(read_headers(&bad), None);
        let none = read_headers(&[]).expect("no headers");
        assert_eq!((none.qos, none.retain), (QoS::AtLeastOnce, false));
    }
}
