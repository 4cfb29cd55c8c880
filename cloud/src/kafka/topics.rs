//! CreateTopics, DeleteTopics and DescribeConfigs: streams made, deleted and described in
//! Kafka's terms. A topic's
//! settings map onto the stream's: `retention.ms` (-1: none), `retention.bytes` (-1: none),
//! `segment.bytes`, `segment.ms`, `index.interval.bytes`; other settings are refused with
//! INVALID_CONFIG. A replication factor other than -1 or 1 is refused (one node).
//!
//! DeleteTopics removes the stream, its records and every group's committed offsets on it.
//! A stream the MQTT routes write to (the default stream and `downlink` among them) is not
//! deleted: POLICY_VIOLATION, with a message naming the reason; remove the route first.
//! Topics named by id only (v6) get UNKNOWN_TOPIC_ID: Ferry's topics have no ids.

use kafka_protocol::messages::create_topics_response::CreatableTopicResult;
use kafka_protocol::messages::delete_topics_response::DeletableTopicResult;
use kafka_protocol::messages::describe_configs_response::{
    DescribeConfigsResourceResult, DescribeConfigsResult,
};
use kafka_protocol::messages::{
    CreateTopicsRequest, CreateTopicsResponse, DeleteTopicsRequest, DeleteTopicsResponse,
    DescribeConfigsRequest, DescribeConfigsResponse, TopicName,
};
use kafka_protocol::protocol::StrBytes;

use super::code::{
    INVALID_CONFIG, INVALID_PARTITIONS, INVALID_REPLICATION_FACTOR, INVALID_TOPIC_EXCEPTION,
    KAFKA_STORAGE_ERROR, NONE, POLICY_VIOLATION, TOPIC_ALREADY_EXISTS, UNKNOWN_TOPIC_ID,
    UNKNOWN_TOPIC_OR_PARTITION,
};
use super::KafkaFront;
use crate::log::StreamConfig;
use crate::meta::Command;

/// DescribeConfigs resource type of a topic.
const TOPIC_RESOURCE: i8 = 2;

/// Applies one Kafka topic setting to `c`; false if it is not one Ferry has.
fn set(c: &mut StreamConfig, name: &str, value: Option<&str>) -> bool {
    let Some(v) = value.and_then(|v| v.parse::<i64>().ok()) else {
        return false;
    };
    let optional = |v: i64| (v >= 0).then_some(v);
    match name {
        "retention.ms" => c.retention_ms = optional(v),
        "retention.bytes" => c.retention_bytes = optional(v).map(|v| v as u64),
        "segment.bytes" if v > 0 => c.segment_bytes = v as u64,
        "segment.ms" if v > 0 => c.segment_ms = v,
        "index.interval.bytes" if v > 0 => c.index_interval_bytes = v as u64,
        _ => return false,
    }
    true
}

/// The stream's settings as Kafka topic settings.
fn describe(c: &StreamConfig) -> Vec<(&'static str, String)> {
    vec![
        ("retention.ms", c.retention_ms.unwrap_or(-1).to_string()),
        (
            "retention.bytes",
            c.retention_bytes.map_or(-1, |b| b as i64).to_string(),
        ),
        ("segment.bytes", c.segment_bytes.to_string()),
        ("segment.ms", c.segment_ms.to_string()),
        ("index.interval.bytes", c.index_interval_bytes.to_string()),
        ("cleanup.policy", "delete".to_owned()),
    ]
}

impl KafkaFront {
    pub(super) fn create_topics(&self, r: CreateTopicsRequest) -> CreateTopicsResponse {
        let existing = self.log.streams();
        let topics = r
            .topics
            .into_iter()
            .map(|t| {
                let name = t.name.as_str().to_owned();
                let mut config = self.stream_defaults.clone();
                // -1: the broker's default, `[log.streams] partitions`.
                config.partitions = if t.num_partitions == -1 {
                    self.stream_defaults.partitions.max(1)
                } else {
                    t.num_partitions.max(0) as u32
                };
                let code = if !crate::log::valid_stream_name(&name) {
                    INVALID_TOPIC_EXCEPTION
                } else if existing.iter().any(|s| s.name == name) {
                    TOPIC_ALREADY_EXISTS
                } else if config.partitions == 0 || !t.assignments.is_empty() {
                    INVALID_PARTITIONS
                } else if !matches!(t.replication_factor, -1 | 1) {
                    INVALID_REPLICATION_FACTOR
                } else if !t
                    .configs
                    .iter()
                    .all(|c| set(&mut config, c.name.as_str(), c.value.as_deref()))
                {
                    INVALID_CONFIG
                } else if r.validate_only {
                    NONE
                } else {
                    let command = Command::CreateStream {
                        name: name.clone(),
                        config: config.clone(),
                    };
                    match self.meta.apply(&[command]) {
                        Ok(()) if self.log.create_stream(&name, &config).is_ok() => NONE,
                        _ => KAFKA_STORAGE_ERROR,
                    }
                };
                CreatableTopicResult::default()
                    .with_name(t.name)
                    .with_error_code(code)
                    .with_num_partitions(if code == NONE {
                        config.partitions as i32
                    } else {
                        -1
                    })
                    .with_replication_factor(if code == NONE { 1 } else { -1 })
            })
            .collect();
        CreateTopicsResponse::default().with_topics(topics)
    }

    pub(super) fn delete_topics(&self, r: DeleteTopicsRequest) -> DeleteTopicsResponse {
        // v1-5 name topics in `topic_names`, v6 in `topics` (by name or by id).
        let named = r.topic_names.into_iter().map(|n| (Some(n), None));
        let stated = r.topics.into_iter().map(|t| (t.name, Some(t.topic_id)));
        let responses = named
            .chain(stated)
            .map(|(name, id)| {
                let result = DeletableTopicResult::default()
                    .with_name(name.clone())
                    .with_topic_id(id.unwrap_or_default());
                let Some(name) = name else {
                    return result.with_error_code(UNKNOWN_TOPIC_ID);
                };
                let (code, message) = self.delete_topic(&name);
                result
                    .with_error_code(code)
                    .with_error_message(message.map(StrBytes::from_string))
            })
            .collect();
        DeleteTopicsResponse::default().with_responses(responses)
    }

    /// Deletes one stream: its records first, then its settings and every group's commits
    /// on it. (A crash between the two leaves an empty stream of that name; deleting again
    /// removes it.)
    fn delete_topic(&self, name: &TopicName) -> (i16, Option<String>) {
        let name = name.as_str();
        if self.routes.get().streams().iter().any(|(s, _)| *s == name) {
            let why = format!("stream {name} is the destination of an MQTT route");
            return (POLICY_VIOLATION, Some(why));
        }
        match self.log.delete_stream(name) {
            Ok(false) => return (UNKNOWN_TOPIC_OR_PARTITION, None),
            Ok(true) => {}
            Err(e) => return (KAFKA_STORAGE_ERROR, Some(e.to_string())),
        }
        self.producers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .forget_stream(name);
        let forget = Command::DeleteStream {
            name: name.to_owned(),
        };
        match self.meta.apply(&[forget]) {
            Ok(()) => (NONE, None),
            Err(e) => (KAFKA_STORAGE_ERROR, Some(e.to_string())),
        }
    }

    pub(super) fn describe_configs(&self, r: DescribeConfigsRequest) -> DescribeConfigsResponse {
        let configs: std::collections::HashMap<String, StreamConfig> = self
            .meta
            .streams()
            .unwrap_or_default()
            .into_iter()
            .collect();
        let streams = self.log.streams();
        let results = r
            .resources
            .into_iter()
            .map(|res| {
                let result = DescribeConfigsResult::default()
                    .with_resource_type(res.resource_type)
                    .with_resource_name(res.resource_name.clone());
                let name = res.resource_name.as_str();
                if res.resource_type != TOPIC_RESOURCE {
                    // Brokers and the rest: nothing to describe.
                    return result;
                }
                let Some(stream) = streams.iter().find(|s| s.name == name) else {
                    return result.with_error_code(UNKNOWN_TOPIC_OR_PARTITION);
                };
                let mut c = configs
                    .get(name)
                    .cloned()
                    .unwrap_or_else(|| self.stream_defaults.clone());
                c.partitions = stream.partitions.len() as u32;
                let wanted = res.configuration_keys;
                result.with_configs(
                    describe(&c)
                        .into_iter()
                        .filter(|(k, _)| {
                            wanted
                                .as_ref()
                                .is_none_or(|w| w.iter().any(|x| x.as_str() == *k))
                        })
                        .map(|(k, v)| {
                            DescribeConfigsResourceResult::default()
                                .with_name(StrBytes::from_static_str(k))
                                .with_value(Some(StrBytes::from_string(v)))
                                .with_read_only(k == "cleanup.policy")
                                // 5: the default config of the broker; 1: the topic's own.
                                .with_config_source(if configs.contains_key(name) { 1 } else { 5 })
                        })
                        .collect(),
                )
            })
            .collect();
        DescribeConfigsResponse::default().with_results(results)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kafka_topic_settings_map_onto_the_stream_and_back() {
        let mut c = StreamConfig::default();
        assert!(set(&mut c, "retention.ms", Some("3600000")));
        assert!(set(&mut c, "retention.bytes", Some("-1")));
        assert!(set(&mut c, "segment.bytes", Some("1048576")));
        assert!(!set(&mut c, "compression.type", Some("zstd")));
        assert!(!set(&mut c, "segment.bytes", Some("0")));
        assert_eq!(c.retention_ms, Some(3_600_000));
        assert_eq!(c.retention_bytes, None);
        let described = describe(&c);
        assert!(described.contains(&("retention.ms", "3600000".to_owned())));
        assert!(described.contains(&("retention.bytes", "-1".to_owned())));
        assert!(described.contains(&("segment.bytes", "1048576".to_owned())));
    }
}
