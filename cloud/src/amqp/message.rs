//! What an AMQP publish becomes in the log, and what a record of the log is to an AMQP
//! consumer (the format is in `docs/amqp.md`).
//!
//! - A publish to `amq.topic` whose routing key maps to a valid MQTT topic name (`.` → `/`)
//!   is an MQTT message: it goes where the routes send that topic (so MQTT subscribers and
//!   Kafka consumers of that stream see it, and `$edge.<edge>.<topic>` goes down the link)
//!   and its record is what an MQTT publish at QoS 1 (persistent) or 0 makes, plus the AMQP
//!   headers below.
//! - Any other publish goes to the stream `amqp`: key = routing key, value = body.
//! - Both carry `amqp.exchange`, `amqp.routing_key` and `amqp.properties` (the basic
//!   properties as AMQP writes them in a content header), so a consumer gets back exactly
//!   what was published.
//! - A record without `amqp.exchange` (from MQTT, the link or a Kafka producer) is a message
//!   on `amq.topic` with routing key = its key (an MQTT topic) with `/` → `.`, delivery mode
//!   2 for QoS 1/2 and 1 for QoS 0, its content type, and its user properties as headers
//!   (with `x-mqtt-publish-qos`, as RabbitMQ's MQTT plugin sets).

use amq_protocol::frame::WriteContext;
use amq_protocol::protocol::basic::{gen_properties, parse_properties, AMQPProperties};
use amq_protocol::types::{AMQPValue, FieldTable, LongString, ShortString};
use bytes::Bytes;
use ferry_protocol::kafka::batch::RecordRef;
use ferry_protocol::mqtt::{Properties, QoS};
use ferry_protocol::topic::TopicName;

use super::topology::{mqtt_to_routing_key, routing_key_to_mqtt, HeaderValue};
use crate::log::NewRecord;
use crate::routes::{from_record, to_record, MqttMessage, Routes};

/// The stream of AMQP publishes that are not MQTT messages.
pub const AMQP_STREAM: &str = "amqp";
/// The exchange that is the MQTT view of the log.
pub(crate) const TOPIC_EXCHANGE: &str = "amq.topic";

const H_EXCHANGE: &str = "amqp.exchange";
const H_ROUTING_KEY: &str = "amqp.routing_key";
const H_PROPERTIES: &str = "amqp.properties";

/// A message as an AMQP consumer sees it.
#[derive(Debug, Clone)]
pub(crate) struct Message {
    pub(crate) exchange: String,
    pub(crate) routing_key: String,
    pub(crate) properties: AMQPProperties,
    pub(crate) body: Bytes,
    /// The record's timestamp (ms since the epoch): when it was accepted.
    pub(crate) timestamp_ms: i64,
}

impl Message {
    /// Its headers in the form bindings compare.
    pub(crate) fn headers(&self) -> Vec<(String, HeaderValue)> {
        self.properties
            .headers()
            .as_ref()
            .map(HeaderValue::table)
            .unwrap_or_default()
    }
}

/// Where a publish goes and the record it becomes.
pub(crate) fn to_log(
    routes: &Routes,
    exchange: &str,
    routing_key: &str,
    properties: &AMQPProperties,
    body: Bytes,
    now_ms: i64,
) -> (String, u32, NewRecord) {
    let amqp_headers = [
        (H_EXCHANGE, Bytes::copy_from_slice(exchange.as_bytes())),
        (
            H_ROUTING_KEY,
            Bytes::copy_from_slice(routing_key.as_bytes()),
        ),
        (H_PROPERTIES, Bytes::from(encode_properties(properties))),
    ];
    let topic = (exchange == TOPIC_EXCHANGE)
        .then(|| TopicName::new(routing_key_to_mqtt(routing_key)).ok())
        .flatten();
    if let Some(topic) = topic {
        let qos = if *properties.delivery_mode() == Some(2) {
            QoS::AtLeastOnce
        } else {
            QoS::AtMostOnce
        };
        let mqtt_properties = Properties::default();
        let msg = MqttMessage {
            topic: &topic,
            payload: &body,
            qos,
            retain: false,
            properties: &mqtt_properties,
            edge: None,
            timestamp_ms: now_ms,
        };
        let dest = routes.destination(&msg);
        let mut record = to_record(&msg);
        record
            .headers
            .extend(amqp_headers.map(|(k, v)| (k.to_owned(), Some(v))));
        return (dest.stream.to_owned(), dest.partition, record);
    }
    let record = NewRecord {
        timestamp: now_ms,
        key: Some(Bytes::copy_from_slice(routing_key.as_bytes())),
        value: Some(body),
        headers: amqp_headers
            .map(|(k, v)| (k.to_owned(), Some(v)))
            .into_iter()
            .collect(),
    };
    (AMQP_STREAM.to_owned(), 0, record)
}

/// The AMQP message a record stands for; None for a record that is neither an AMQP
/// publish nor an MQTT message (no key that is a topic, or its MQTT expiry passed).
pub(crate) fn from_log(rec: &RecordRef<'_>, now_ms: i64) -> Option<Message> {
    let header = |name: &str| {
        rec.headers
            .iter()
            .find(|h| h.key == name)
            .and_then(|h| h.value)
    };
    if let Some(exchange) = header(H_EXCHANGE) {
        let routing_key = header(H_ROUTING_KEY).or(rec.key).unwrap_or_default();
        let properties = header(H_PROPERTIES)
            .and_then(|p| parse_properties(p).ok().map(|(_, props)| props))
            .unwrap_or_default();
        return Some(Message {
            exchange: String::from_utf8_lossy(exchange).into_owned(),
            routing_key: String::from_utf8_lossy(routing_key).into_owned(),
            properties,
            body: Bytes::copy_from_slice(rec.value.unwrap_or_default()),
            timestamp_ms: rec.timestamp,
        });
    }
    let mqtt = from_record(rec, now_ms)?;
    let mut headers = FieldTable::default();
    headers.insert(
        ShortString::from("x-mqtt-publish-qos"),
        AMQPValue::ShortShortUInt(mqtt.qos as u8),
    );
    for (k, v) in &mqtt.properties.user_properties {
        headers.insert(
            ShortString::from(k.as_str()),
            AMQPValue::LongString(LongString::from(v.as_bytes())),
        );
    }
    let mut properties = AMQPProperties::default()
        .with_delivery_mode(if mqtt.qos == QoS::AtMostOnce { 1 } else { 2 })
        .with_timestamp((rec.timestamp / 1000).max(0) as u64)
        .with_headers(headers);
    if let Some(ct) = &mqtt.properties.content_type {
        properties = properties.with_content_type(ShortString::from(ct.as_str()));
    }
    Some(Message {
        exchange: TOPIC_EXCHANGE.to_owned(),
        routing_key: mqtt_to_routing_key(mqtt.topic.as_str()),
        properties,
        body: mqtt.payload,
        timestamp_ms: rec.timestamp,
    })
}

/// Basic properties as a content header carries them (flags, then the fields present).
pub(crate) fn encode_properties(p: &AMQPProperties) -> Vec<u8> {
    gen_properties(p)(WriteContext::from(Vec::new()))
        .map(|ctx| ctx.write)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use ferry_protocol::kafka::batch::{records, BatchBuilder, Header};

    use super::*;

    fn read_back(record: &NewRecord) -> Option<Message> {
        let mut b = BatchBuilder::new(record.timestamp);
        let headers: Vec<Header<'_>> = record
            .headers
            .iter()
            .map(|(k, v)| Header {
                key: k,
                value: v.as_deref(),
            })
            .collect();
        b.push(
            record.timestamp,
            record.key.as_deref(),
            record.value.as_deref(),
            &headers,
        );
        let batch = b.finish(0);
        let rec = records(&batch).expect("records").next()?.ok()?;
        from_log(&rec, record.timestamp)
    }

    #[test]
    fn a_publish_comes_back_with_every_property_and_amq_topic_becomes_mqtt() {
        let routes = Routes::new(&[]).expect("routes");
        let mut headers = FieldTable::default();
        headers.insert("h".into(), AMQPValue::LongString("v".into()));
        let props = AMQPProperties::default()
            .with_content_type("text/plain".into())
            .with_delivery_mode(2)
            .with_priority(3)
            .with_correlation_id("c-1".into())
            .with_reply_to("r".into())
            .with_expiration("6000".into())
            .with_message_id("m-1".into())
            .with_timestamp(1_700_000_000)
            .with_type("t".into())
            .with_user_id("u".into())
            .with_app_id("a".into())
            .with_headers(headers);
        let (stream, _, rec) = to_log(
            &routes,
            "amq.direct",
            "orders",
            &props,
            Bytes::from_static(b"body"),
            1_000,
        );
        assert_eq!(stream, AMQP_STREAM);
        let back = read_back(&rec).expect("a message");
        assert_eq!(
            (back.exchange.as_str(), back.routing_key.as_str()),
            ("amq.direct", "orders")
        );
        assert_eq!(back.properties, props);
        assert_eq!(&back.body[..], b"body");

        let (stream, _, rec) = to_log(
            &routes,
            TOPIC_EXCHANGE,
            "gw-7.sensors.temp",
            &props,
            Bytes::from_static(b"21.5"),
            1_000,
        );
        assert_eq!(stream, crate::routes::DEFAULT_STREAM);
        assert_eq!(rec.key.as_deref(), Some(&b"gw-7/sensors/temp"[..]));
        // A routing key that is no MQTT topic name (a wildcard) stays an AMQP record.
        let (stream, _, _) = to_log(&routes, TOPIC_EXCHANGE, "a.#", &props, Bytes::new(), 0);
        assert_eq!(stream, AMQP_STREAM);
        // $edge.<edge>.<topic> goes to the downlink.
        let (stream, _, _) = to_log(
            &routes,
            TOPIC_EXCHANGE,
            "$edge.gw-7.cmd",
            &props,
            Bytes::new(),
            0,
        );
        assert_eq!(stream, crate::routes::DOWNLINK_STREAM);
    }

    #[test]
    fn an_mqtt_record_is_a_message_on_amq_topic() {
        let topic = TopicName::new("gw-7/sensors/temp".to_owned()).expect("topic");
        let props = Properties::default();
        let payload = Bytes::from_static(b"21.5");
        let rec = to_record(&MqttMessage {
            topic: &topic,
            payload: &payload,
            qos: QoS::AtLeastOnce,
            retain: false,
            properties: &props,
            edge: Some("gw-7"),
            timestamp_ms: 5_000,
        });
        let m = read_back(&rec).expect("a message");
        assert_eq!(
            (m.exchange.as_str(), m.routing_key.as_str()),
            ("amq.topic", "gw-7.sensors.temp")
        );
        assert_eq!(*m.properties.delivery_mode(), Some(2));
        assert_eq!(&m.body[..], b"21.5");
    }
}
