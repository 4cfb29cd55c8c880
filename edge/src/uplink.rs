//! What goes up to the cloud: `[uplink]` with its `[[uplink.route]]` rules, and the outbox's
//! byte budget.
//!
//! ```toml
//! [uplink]
//! cloud = "cloud.example.com:7883" # the cloud's link listener (UDP); no link without it
//! ca_file = "/etc/ferry/link/ca.crt"
//! cert_file = "/etc/ferry/link/gw-1.crt"   # this edge's identity (ferry-cloud pki issue-edge)
//! key_file = "/etc/ferry/link/gw-1.key"
//! max_outbox_bytes = 268435456     # 256 MiB
//! full_policy = "reject_new"
//!
//! [[uplink.route]]
//! filter = "sensors/#"
//! qos = 1          # messages at this QoS or above go up (default 1)
//! priority = 0     # higher drains first (default 0)
//! cloud_topic = "line-1/{topic}"   # in the cloud: <edge-id>/line-1/<topic> (default {topic})
//! ```
//!
//! A QoS ≥ 1 message that matches a route is durable in the outbox before its PUBACK leaves
//! (the broker emits it in the same group commit as its other durable state). The link
//! (`ferry_bridge::edge_dialer`, wired in [`crate::outbox_source`]) sends the outbox,
//! highest priority first and in order within a priority, and deletes what the cloud
//! acknowledged.

use ferry_protocol::mqtt::QoS;
use ferry_protocol::topic::{TopicError, TopicFilter, TopicName};
use serde::Deserialize;

/// A string, or a list of them.
fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(one) => vec![one],
        OneOrMany::Many(many) => many,
    })
}

/// `[uplink]`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct UplinkConfig {
    /// `host:port` of the cloud's link listener, or a list of them (the nodes of a cluster):
    /// the link goes to one at a time, and to the next when that one fails or goes away; a
    /// name with several addresses counts as that many. Without it nothing is sent: the
    /// outbox fills up to its budget.
    #[serde(deserialize_with = "one_or_many")]
    pub cloud: Vec<String>,
    /// The name the cloud's certificate must carry. Default: the host of each `cloud`.
    pub server_name: Option<String>,
    /// The link CA's certificate, this edge's certificate and key (PEM). Required with
    /// `cloud`.
    pub ca_file: Option<std::path::PathBuf>,
    pub cert_file: Option<std::path::PathBuf>,
    pub key_file: Option<std::path::PathBuf>,
    /// Compression of record batches on the link: `lz4` (default), `zstd` or `none`.
    pub compression: LinkCompression,
    /// Seconds without traffic before a keepalive (default 10) and before the link is
    /// declared dead (default 30).
    pub keepalive_secs: u64,
    pub idle_timeout_secs: u64,
    /// A link with records unacknowledged for this long is reported stalled and
    /// reconnected. Default 30.
    pub stall_timeout_secs: u64,
    /// The longest wait between two connection attempts while the cloud is away (the wait
    /// starts at 0.2 s and doubles, with jitter). Default 30.
    pub reconnect_max_secs: u64,
    /// How often the edge tells the cloud its outbox figures (a STATUS frame, for the
    /// cloud's console and `/api/fleet`). Default 5.
    pub status_secs: u64,
    /// Bytes (topic + payload + ~40 of bookkeeping per record) the outbox may hold while the
    /// cloud is away. Default 256 MiB, on disk (the outbox is not held in memory).
    pub max_outbox_bytes: u64,
    /// What happens to a message for the outbox when it is full. Default `reject_new`.
    pub full_policy: FullPolicy,
    /// What goes up. Default none: nothing leaves the edge.
    pub route: Vec<UplinkRoute>,
}

impl Default for UplinkConfig {
    fn default() -> Self {
        Self {
            cloud: Vec::new(),
            server_name: None,
            ca_file: None,
            cert_file: None,
            key_file: None,
            compression: LinkCompression::Lz4,
            keepalive_secs: 10,
            idle_timeout_secs: 30,
            stall_timeout_secs: 30,
            reconnect_max_secs: 30,
            status_secs: 5,
            max_outbox_bytes: 256 << 20,
            full_policy: FullPolicy::RejectNew,
            route: Vec::new(),
        }
    }
}

/// Record batch compression on the link.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LinkCompression {
    None,
    #[default]
    Lz4,
    Zstd,
}

/// The outbox's policy when it is full.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FullPolicy {
    /// Refuse the new message: an MQTT 5 publisher gets PUBACK/PUBREC 0x97 (Quota exceeded)
    /// and backs off; an MQTT 3.1.1 publisher, which cannot be told, is disconnected. Counted.
    #[default]
    RejectNew,
    /// Take the new message and delete the oldest records to make room, from the lowest
    /// priority class up (within a class, oldest first), in the same commit. Counted
    /// (`ferry_edge_outbox_dropped_total`); a record the link already sent may still reach
    /// the cloud. A message larger than the whole budget is refused as with `reject_new`.
    DropOldest,
}

/// One `[[uplink.route]]`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct UplinkRoute {
    pub filter: String,
    /// The lowest QoS that goes up (1 or 2). Default 1.
    #[serde(default = "one")]
    pub qos: u8,
    /// Higher drains first after an outage. Default 0.
    #[serde(default)]
    pub priority: u8,
    /// The topic it has in the cloud, under the edge's id: a template where `{topic}` is
    /// the topic on the edge. Default `{topic}`: the cloud publishes `<edge-id>/<topic>`.
    /// The cloud always puts the edge's id (from its certificate) first, so an edge cannot
    /// write into another edge's topics.
    #[serde(default)]
    pub cloud_topic: Option<String>,
}

fn one() -> u8 {
    1
}

/// Why `[uplink]` cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UplinkError {
    #[error("uplink route {index}: invalid filter {filter:?}: {why}")]
    BadFilter {
        index: usize,
        filter: String,
        #[source]
        why: TopicError,
    },
    #[error("uplink route {index}: qos must be 1 or 2 (QoS 0 is never stored)")]
    BadQos { index: usize },
    #[error("[uplink] cloud is set: {0} is required too")]
    Missing(&'static str),
    #[error("uplink route {index}: cloud_topic {template:?} does not make a topic name")]
    BadCloudTopic { index: usize, template: String },
}

/// The compiled rules the broker applies.
#[derive(Debug, Clone, Default)]
pub struct UplinkRules {
    routes: Vec<Route>,
    pub max_outbox_bytes: u64,
    pub full_policy: FullPolicy,
}

impl UplinkRules {
    pub fn new(config: &UplinkConfig) -> Result<Self, UplinkError> {
        let mut routes = Vec::new();
        for (index, r) in config.route.iter().enumerate() {
            let filter =
                TopicFilter::new_route(r.filter.clone()).map_err(|why| UplinkError::BadFilter {
                    index,
                    filter: r.filter.clone(),
                    why,
                })?;
            let qos = match r.qos {
                1 => QoS::AtLeastOnce,
                2 => QoS::ExactlyOnce,
                _ => return Err(UplinkError::BadQos { index }),
            };
            if let Some(template) = &r.cloud_topic {
                if render(template, "a/b").is_none() {
                    return Err(UplinkError::BadCloudTopic {
                        index,
                        template: template.clone(),
                    });
                }
            }
            routes.push(Route {
                filter,
                qos,
                priority: r.priority,
                cloud_topic: r.cloud_topic.clone(),
            });
        }
        if !config.cloud.is_empty() {
            for (set, name) in [
                (config.ca_file.is_some(), "ca_file"),
                (config.cert_file.is_some(), "cert_file"),
                (config.key_file.is_some(), "key_file"),
            ] {
                if !set {
                    return Err(UplinkError::Missing(name));
                }
            }
        }
        Ok(Self {
            routes,
            max_outbox_bytes: config.max_outbox_bytes,
            full_policy: config.full_policy,
        })
    }

    /// True if no route is configured.
    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }

    /// The priority of a message that goes up, per the first matching route; None if it
    /// stays on the edge.
    pub fn priority(&self, topic: &TopicName, qos: QoS) -> Option<u8> {
        self.route(topic, qos).map(|(p, _)| p)
    }

    /// The priority of a message that goes up and the topic it is sent with (None: its own),
    /// per the first matching route; None if it stays on the edge.
    pub fn route(&self, topic: &TopicName, qos: QoS) -> Option<(u8, Option<TopicName>)> {
        let r = self
            .routes
            .iter()
            .find(|r| qos >= r.qos && r.filter.matches(topic))?;
        let renamed = r
            .cloud_topic
            .as_deref()
            .and_then(|t| render(t, topic.as_str()));
        Some((r.priority, renamed))
    }
}

/// A compiled `[[uplink.route]]`.
#[derive(Debug, Clone)]
struct Route {
    filter: TopicFilter,
    qos: QoS,
    priority: u8,
    cloud_topic: Option<String>,
}

/// `template` with `{topic}` replaced, if that is a valid topic name.
fn render(template: &str, topic: &str) -> Option<TopicName> {
    TopicName::new(template.replace("{topic}", topic)).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cloud_is_one_address_or_a_list_of_them() {
        let one: UplinkConfig = toml::from_str("cloud = \"c:7883\"").expect("parses");
        assert_eq!(one.cloud, ["c:7883"]);
        let many: UplinkConfig =
            toml::from_str("cloud = [\"a:7883\", \"b:7883\"]").expect("parses");
        assert_eq!(many.cloud, ["a:7883", "b:7883"]);
        assert!(UplinkConfig::default().cloud.is_empty());
        assert!(toml::from_str::<UplinkConfig>("cloud = 7883").is_err());
    }

    #[test]
    fn the_first_matching_route_at_or_above_its_qos_decides() {
        let config: UplinkConfig = toml::from_str(
            "[[route]]\nfilter = \"alarms/#\"\nqos = 1\npriority = 9\n[[route]]\nfilter = \"#\"\nqos = 2\n",
        )
        .expect("parses");
        let rules = UplinkRules::new(&config).expect("valid");
        let t = |s: &str| TopicName::new(s.to_owned()).expect("topic");
        assert_eq!(rules.priority(&t("alarms/fire"), QoS::AtLeastOnce), Some(9));
        assert_eq!(
            rules.priority(&t("sensors/t"), QoS::AtLeastOnce),
            None,
            "below the route's QoS"
        );
        assert_eq!(rules.priority(&t("sensors/t"), QoS::ExactlyOnce), Some(0));
        assert_eq!(
            rules.priority(&t("alarms/fire"), QoS::AtMostOnce),
            None,
            "QoS 0 never goes up"
        );
        let renamed: UplinkConfig =
            toml::from_str("[[route]]\nfilter = \"a/#\"\ncloud_topic = \"line-1/{topic}\"\n")
                .expect("parses");
        let rules = UplinkRules::new(&renamed).expect("valid");
        assert_eq!(
            rules.route(&t("a/b"), QoS::AtLeastOnce),
            Some((0, Some(t("line-1/a/b"))))
        );
        let wild: UplinkConfig =
            toml::from_str("[[route]]\nfilter = \"a/#\"\ncloud_topic = \"x/#/{topic}\"\n")
                .expect("parses");
        assert!(matches!(
            UplinkRules::new(&wild),
            Err(UplinkError::BadCloudTopic { index: 0, .. })
        ));
        let shared: UplinkConfig =
            toml::from_str("[[route]]\nfilter = \"$share/g/a/#\"\n").expect("parses");
        assert!(matches!(
            UplinkRules::new(&shared),
            Err(UplinkError::BadFilter {
                index: 0,
                why: TopicError::SharedRoute { .. },
                ..
            })
        ));
        let bad: UplinkConfig =
            toml::from_str("[[route]]\nfilter = \"a\"\nqos = 0\n").expect("parses");
        assert_eq!(
            UplinkRules::new(&bad).err(),
            Some(UplinkError::BadQos { index: 0 })
        );
    }
}
