//! Routes: which stream and partition an MQTT message is appended to, and how it becomes a
//! record. The rules are in `docs/routes.md`.
//!
//! ```toml
//! [[route]]
//! filter = "+/sensors/#"   # MQTT topic filter, on the cloud-side topic
//! stream = "sensors"
//! partitions = 4           # default 1
//! partition_key = "topic"  # "topic" (default) or "edge"
//! ```
//!
//! The first route whose filter matches wins; a message no route matches goes to the stream
//! `mqtt` (one partition). The partition is chosen as a Kafka producer's default partitioner
//! would for the same key (murmur2), so Kafka producers writing with the MQTT topic as key
//! land in the same partition as the MQTT messages of that topic.

use bytes::Bytes;
use ferry_protocol::mqtt::{Properties, QoS};
use ferry_protocol::topic::{TopicError, TopicFilter, TopicName};
use serde::Deserialize;

use ferry_protocol::kafka::mqtt::{message_headers, read_headers};

use crate::log::NewRecord;

/// The stream of messages that no route matches.
pub const DEFAULT_STREAM: &str = "mqtt";
/// The stream of messages for edges: every message published to `$edge/<edge-id>/<topic>`
/// goes there (one partition, whatever the routes say) and down the link to that edge.
pub const DOWNLINK_STREAM: &str = "downlink";
/// The topic prefix of messages for edges.
pub const DOWNLINK_PREFIX: &str = "$edge/";

/// One `[[route]]` as written in the config.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    pub filter: String,
    pub stream: String,
    #[serde(default = "one")]
    pub partitions: u32,
    #[serde(default)]
    pub partition_key: PartitionKey,
}

fn one() -> u32 {
    1
}

/// What chooses the partition.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PartitionKey {
    /// The (cloud-side) MQTT topic: one topic's messages stay in order.
    #[default]
    Topic,
    /// The edge the message came from (the topic for messages published on the cloud):
    /// one edge's messages stay in order.
    Edge,
}

/// Why the routes cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RouteError {
    #[error("route {index}: invalid filter {filter:?}: {why}")]
    BadFilter {
        index: usize,
        filter: String,
        #[source]
        why: TopicError,
    },
    #[error("route {index}: invalid stream name {0:?}", .stream)]
    BadStream { index: usize, stream: String },
    #[error("route {index}: partitions must be 1 to 10000")]
    BadPartitions { index: usize },
    #[error("stream {stream} has routes with different partition counts")]
    Inconsistent { stream: String },
}

#[derive(Debug, Clone)]
struct Route {
    filter: TopicFilter,
    stream: String,
    partitions: u32,
    key: PartitionKey,
}

/// The routes in force, in order.
#[derive(Debug, Clone, Default)]
pub struct Routes {
    routes: Vec<Route>,
}

/// The routes in force, replaceable while the node runs (SIGHUP). Readers take the current
/// set and keep it for one message or batch.
#[derive(Debug, Default)]
pub struct RouteTable {
    current: std::sync::RwLock<std::sync::Arc<Routes>>,
}

impl RouteTable {
    pub fn new(routes: Routes) -> Self {
        Self {
            current: std::sync::RwLock::new(std::sync::Arc::new(routes)),
        }
    }

    /// The routes now.
    pub fn get(&self) -> std::sync::Arc<Routes> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Replaces the routes; appends already routed keep their destination.
    pub fn set(&self, routes: Routes) {
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = std::sync::Arc::new(routes);
    }
}

/// Where a message goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Destination<'a> {
    pub stream: &'a str,
    pub partition: u32,
}

/// An MQTT message on its way into the log.
#[derive(Debug, Clone)]
pub struct MqttMessage<'a> {
    /// The cloud-side topic (for data from an edge, `<edge-id>/<topic>` by default).
    pub topic: &'a TopicName,
    pub payload: &'a Bytes,
    pub qos: QoS,
    pub retain: bool,
    pub properties: &'a Properties,
    /// The edge it came from, if it came over the link.
    pub edge: Option<&'a str>,
    /// When it was accepted (by the edge, for data from an edge), ms since the epoch.
    pub timestamp_ms: i64,
}

impl Routes {
    /// Checks and compiles the configured routes.
    pub fn new(configs: &[RouteConfig]) -> Result<Self, RouteError> {
        let mut routes = Vec::with_capacity(configs.len());
        for (index, c) in configs.iter().enumerate() {
            let filter =
                TopicFilter::new_route(c.filter.clone()).map_err(|why| RouteError::BadFilter {
                    index,
                    filter: c.filter.clone(),
                    why,
                })?;
            if !crate::log::valid_stream_name(&c.stream) {
                return Err(RouteError::BadStream {
                    index,
                    stream: c.stream.clone(),
                });
            }
            if !(1..=10_000).contains(&c.partitions) {
                return Err(RouteError::BadPartitions { index });
            }
            let clash = routes
                .iter()
                .chain(std::iter::once(&Route {
                    filter: filter.clone(),
                    stream: DEFAULT_STREAM.into(),
                    partitions: 1,
                    key: PartitionKey::Topic,
                }))
                .any(|r: &Route| r.stream == c.stream && r.partitions != c.partitions);
            if clash {
                return Err(RouteError::Inconsistent {
                    stream: c.stream.clone(),
                });
            }
            routes.push(Route {
                filter,
                stream: c.stream.clone(),
                partitions: c.partitions,
                key: c.partition_key,
            });
        }
        Ok(Self { routes })
    }

    /// Every stream the routes write to, with its partition count (the default stream
    /// included).
    pub fn streams(&self) -> Vec<(&str, u32)> {
        let mut out = vec![(DEFAULT_STREAM, 1), (DOWNLINK_STREAM, 1)];
        for r in &self.routes {
            if !out.iter().any(|(s, _)| *s == r.stream) {
                out.push((&r.stream, r.partitions));
            }
        }
        out
    }

    /// The stream and partition for a message.
    pub fn destination(&self, msg: &MqttMessage<'_>) -> Destination<'_> {
        if msg.topic.as_str().starts_with(DOWNLINK_PREFIX) {
            return Destination {
                stream: DOWNLINK_STREAM,
                partition: 0,
            };
        }
        let Some(route) = self.routes.iter().find(|r| r.filter.matches(msg.topic)) else {
            return Destination {
                stream: DEFAULT_STREAM,
                partition: 0,
            };
        };
        let key = match (route.key, msg.edge) {
            (PartitionKey::Edge, Some(edge)) => edge.as_bytes(),
            _ => msg.topic.as_str().as_bytes(),
        };
        Destination {
            stream: &route.stream,
            partition: kafka_partition(key, route.partitions),
        }
    }
}

/// The record a message becomes: key = topic, value = payload, timestamp = when accepted,
/// headers = the MQTT metadata (see `docs/routes.md`), then the MQTT 5 user properties
/// under their own names, in order.
pub fn to_record(msg: &MqttMessage<'_>) -> NewRecord {
    let mut headers = message_headers(msg.qos, msg.retain, msg.properties);
    if let Some(edge) = msg.edge {
        let after_retain = 1 + usize::from(msg.retain);
        headers.insert(
            after_retain,
            (
                "ferry.edge".into(),
                Some(Bytes::copy_from_slice(edge.as_bytes())),
            ),
        );
    }
    NewRecord {
        timestamp: msg.timestamp_ms,
        key: Some(Bytes::copy_from_slice(msg.topic.as_str().as_bytes())),
        value: Some(msg.payload.clone()),
        headers,
    }
}

/// A record read back from the log, as MQTT sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MqttView {
    pub topic: TopicName,
    pub payload: Bytes,
    pub qos: QoS,
    pub retain: bool,
    pub properties: Properties,
    /// The MQTT client of the cloud that published it (header `ferry.client`), for no-local.
    pub client: Option<String>,
    /// Seconds of the Message Expiry Interval left at `now_ms`; None when it has none.
    pub expiry_left_secs: Option<u32>,
}

/// The MQTT message a record stands for, read back at `now_ms`: topic = key, payload =
/// value, the `mqtt.*` headers back into flags and properties, other headers (but `ferry.*`)
/// as user properties. None for a record without a key that is a valid topic name, or whose
/// message expiry has passed. A record without `mqtt.qos` (a Kafka producer's) is QoS 1.
pub fn from_record(rec: &ferry_protocol::kafka::RecordRef<'_>, now_ms: i64) -> Option<MqttView> {
    let topic = std::str::from_utf8(rec.key?).ok()?;
    let topic = TopicName::new(topic.to_owned()).ok()?;
    let mut meta = read_headers(&rec.headers)?;
    let mut expiry_left_secs = None;
    if let Some(secs) = meta.properties.message_expiry_interval_secs {
        let left_ms = i64::from(secs) * 1000 - (now_ms - rec.timestamp);
        if left_ms <= 0 {
            return None;
        }
        let left = u32::try_from((left_ms + 999) / 1000).unwrap_or(u32::MAX);
        expiry_left_secs = Some(left);
        meta.properties.message_expiry_interval_secs = Some(left);
    }
    Some(MqttView {
        topic,
        payload: Bytes::copy_from_slice(rec.value.unwrap_or_default()),
        qos: meta.qos,
        retain: meta.retain,
        properties: meta.properties,
        client: meta.client,
        expiry_left_secs,
    })
}

/// The partition Kafka's default partitioner picks for `key`:
/// `(murmur2(key) & 0x7fffffff) % partitions`.
pub fn kafka_partition(key: &[u8], partitions: u32) -> u32 {
    (murmur2(key) & 0x7fff_ffff) as u32 % partitions.max(1)
}

/// MurmurHash2, 32-bit, seed 0x9747b28c, as Kafka's `Utils.murmur2` computes it.
pub fn murmur2(data: &[u8]) -> i32 {
    const SEED: u32 = 0x9747_b28c;
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    let mut h = SEED ^ data.len() as u32;
    let mut chunks = data.chunks_exact(4);
    for c in &mut chunks {
        let mut k = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let rest = chunks.remainder();
    if rest.len() >= 3 {
        h ^= u32::from(rest[2]) << 16;
    }
    if rest.len() >= 2 {
        h ^= u32::from(rest[1]) << 8;
    }
    if !rest.is_empty() {
        h ^= u32::from(rest[0]);
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h as i32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn murmur2_matches_kafkas_own_test_vectors() {
        // From Kafka's UtilsTest.testMurmur2.
        for (input, expected) in [
            ("21", -973_932_308),
            ("foobar", -790_332_482),
            ("a-little-bit-long-string", -985_981_536),
            ("a-little-bit-longer-string", -1_486_304_829),
            (
                "lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8",
                -58_897_971,
            ),
            ("abc", 479_470_107),
        ] {
            assert_eq!(murmur2(input.as_bytes()), expected, "{input}");
        }
    }

    fn route(filter: &str, stream: &str, partitions: u32, key: PartitionKey) -> RouteConfig {
        RouteConfig {
            filter: filter.into(),
            stream: stream.into(),
            partitions,
            partition_key: key,
        }
    }

    fn msg<'a>(
        topic: &'a TopicName,
        payload: &'a Bytes,
        props: &'a Properties,
        edge: Option<&'a str>,
    ) -> MqttMessage<'a> {
        MqttMessage {
            topic,
            payload,
            qos: QoS::AtLeastOnce,
            retain: false,
            properties: props,
            edge,
            timestamp_ms: 42,
        }
    }

    #[test]
    fn the_first_matching_route_wins_and_the_rest_goes_to_mqtt() {
        let routes = Routes::new(&[
            route("+/sensors/alarm", "alarms", 1, PartitionKey::Topic),
            route("+/sensors/#", "sensors", 8, PartitionKey::Topic),
            route("plant/#", "plant", 4, PartitionKey::Edge),
        ])
        .expect("valid");
        let (payload, props) = (Bytes::new(), Properties::default());
        let t = |s: &str| TopicName::new(s.to_owned()).expect("topic");
        let alarm = t("gw1/sensors/alarm");
        assert_eq!(
            routes
                .destination(&msg(&alarm, &payload, &props, None))
                .stream,
            "alarms"
        );
        let temp = t("gw1/sensors/t1");
        let d = routes.destination(&msg(&temp, &payload, &props, None));
        assert_eq!(
            (d.stream, d.partition),
            ("sensors", kafka_partition(b"gw1/sensors/t1", 8))
        );
        let other = t("gw1/logs");
        assert_eq!(
            routes.destination(&msg(&other, &payload, &props, None)),
            Destination {
                stream: "mqtt",
                partition: 0
            }
        );
        // Keyed by edge: every topic of one edge lands in one partition.
        let (a, b) = (t("plant/a"), t("plant/b/c"));
        let pa = routes
            .destination(&msg(&a, &payload, &props, Some("edge-7")))
            .partition;
        let pb = routes
            .destination(&msg(&b, &payload, &props, Some("edge-7")))
            .partition;
        assert_eq!(
            (pa, pb),
            (kafka_partition(b"edge-7", 4), kafka_partition(b"edge-7", 4))
        );
        assert_eq!(
            routes.streams(),
            vec![
                ("mqtt", 1),
                ("downlink", 1),
                ("alarms", 1),
                ("sensors", 8),
                ("plant", 4)
            ]
        );
        // Messages for edges go to the downlink stream, whatever the routes say.
        let down = TopicName::new("$edge/gw-1/valve/set".to_owned()).expect("topic");
        let d = routes.destination(&msg(&down, &payload, &props, None));
        assert_eq!((d.stream, d.partition), ("downlink", 0));
    }

    #[test]
    fn bad_routes_are_refused_with_the_reason() {
        assert!(matches!(
            Routes::new(&[route("a/#/b", "s", 1, PartitionKey::Topic)]),
            Err(RouteError::BadFilter { index: 0, .. })
        ));
        assert!(matches!(
            Routes::new(&[route("$share/g/a", "s", 1, PartitionKey::Topic)]),
            Err(RouteError::BadFilter {
                why: TopicError::SharedRoute { .. },
                ..
            })
        ));
        assert!(matches!(
            Routes::new(&[route("a", "bad name", 1, PartitionKey::Topic)]),
            Err(RouteError::BadStream { .. })
        ));
        assert!(matches!(
            Routes::new(&[route("a", "s", 0, PartitionKey::Topic)]),
            Err(RouteError::BadPartitions { .. })
        ));
        assert!(matches!(
            Routes::new(&[
                route("a", "s", 2, PartitionKey::Topic),
                route("b", "s", 3, PartitionKey::Topic)
            ]),
            Err(RouteError::Inconsistent { .. })
        ));
        assert!(matches!(
            Routes::new(&[route("a", "mqtt", 2, PartitionKey::Topic)]),
            Err(RouteError::Inconsistent { .. })
        ));
    }

    #[test]
    fn a_record_reads_back_as_the_message_it_was() {
        use ferry_protocol::kafka::{records, BatchBuilder, Header};
        let topic = TopicName::new("gw1/sensors/t1").expect("topic");
        let payload = Bytes::from_static(b"21.5");
        let mut props = Properties::default();
        props.content_type = Some("text/plain".into());
        props.message_expiry_interval_secs = Some(60);
        props.user_properties = vec![("unit".into(), "C".into())];
        let mut m = msg(&topic, &payload, &props, Some("gw1"));
        m.qos = QoS::ExactlyOnce;
        m.retain = true;
        m.timestamp_ms = 100_000;
        let r = to_record(&m);
        let headers: Vec<Header<'_>> = r
            .headers
            .iter()
            .map(|(k, v)| Header {
                key: k,
                value: v.as_deref(),
            })
            .collect();
        let mut b = BatchBuilder::new(r.timestamp);
        b.push(r.timestamp, r.key.as_deref(), r.value.as_deref(), &headers);
        b.push(r.timestamp, None, r.value.as_deref(), &[]);
        let batch = b.finish(0);
        let recs: Vec<_> = records(&batch)
            .expect("records")
            .map(|r| r.expect("record"))
            .collect();
        // 15 s later, 45 s of the expiry are left.
        let view = from_record(&recs[0], 115_000).expect("a message");
        assert_eq!(
            (
                view.topic.as_str(),
                &view.payload[..],
                view.qos,
                view.retain
            ),
            ("gw1/sensors/t1", &b"21.5"[..], QoS::ExactlyOnce, true)
        );
        assert_eq!(view.properties.content_type.as_deref(), Some("text/plain"));
        assert_eq!(
            view.properties.user_properties,
            vec![("unit".to_owned(), "C".to_owned())]
        );
        assert_eq!(view.expiry_left_secs, Some(45));
        assert_eq!(from_record(&recs[0], 161_000), None, "expired");
        assert_eq!(from_record(&recs[1], 0), None, "no key, no topic");
    }

    #[test]
    fn a_message_becomes_a_record_with_its_mqtt_metadata_in_headers() {
        let topic = TopicName::new("gw1/sensors/t1").expect("topic");
        let payload = Bytes::from_static(b"21.5");
        let mut props = Properties::default();
        props.content_type = Some("text/plain".into());
        props.user_properties = vec![("unit".into(), "C".into()), ("unit".into(), "K".into())];
        let mut m = msg(&topic, &payload, &props, Some("gw1"));
        m.retain = true;
        let r = to_record(&m);
        assert_eq!(
            (r.timestamp, r.key.as_deref(), r.value.as_deref()),
            (42, Some(&b"gw1/sensors/t1"[..]), Some(&b"21.5"[..]))
        );
        let h: Vec<(&str, &[u8])> = r
            .headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_deref().unwrap_or_default()))
            .collect();
        assert_eq!(
            h,
            vec![
                ("mqtt.qos", &b"1"[..]),
                ("mqtt.retain", b"1"),
                ("ferry.edge", b"gw1"),
                ("mqtt.content_type", b"text/plain"),
                ("unit", b"C"),
                ("unit", b"K"),
            ]
        );
    }
}
