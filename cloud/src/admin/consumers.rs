//! `GET /api/consumers`: every reader of the log and how far behind it is — Kafka groups
//! per partition (committed offset, high watermark, lag, members), the MQTT front's
//! delivery cursor and each MQTT persistent session (what the broker holds for it: queued
//! and in flight), each edge's downlink, AMQP queues (ready, unacked, consumers); and the
//! admins' reset of a Kafka group's offsets.

use std::collections::BTreeMap;

use hyper::StatusCode;
use serde_json::{json, Value};

use ferry_edge::broker::SessionInfo;

use super::http::Reply;
use crate::meta::Command;
use crate::mqtt::MQTT_CURSOR;
use crate::node::Node;

/// The cursor group of an edge's downlink starts with this.
const DOWNLINK_GROUP: &str = "$edge:";

/// The document of `GET /api/consumers`, with the MQTT front's persistent `sessions`.
///
/// A session's lag is what the broker holds for it: messages queued and in flight. Those
/// not yet read from the log by the front are the front cursor's lag (`mqtt`), shared by
/// every session.
pub fn consumers(node: &Node, sessions: &[SessionInfo]) -> Result<Value, crate::meta::MetaError> {
    let ends = ends(node);
    let lag = |stream: &str, partition: u32, next: i64| {
        let hw = ends
            .get(&(stream.to_owned(), partition))
            .map_or(next, |o| o.1);
        (hw, (hw - next).max(0))
    };
    let mut groups: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    let (mut mqtt, mut downlinks) = (Vec::new(), Vec::new());
    for (group, stream, partition, next) in node.meta.cursors()? {
        let (hw, behind) = lag(&stream, partition, next);
        let row = json!({
            "stream": stream, "partition": partition, "committed": next,
            "high_watermark": hw, "lag": behind,
        });
        if group == MQTT_CURSOR {
            mqtt.push(row);
        } else if let Some(edge) = group.strip_prefix(DOWNLINK_GROUP) {
            downlinks.push(json!({"edge": edge, "acked_seq": next, "lag": behind}));
        } else {
            groups.entry(group).or_default().push(row);
        }
    }
    let kafka: Vec<Value> = groups
        .into_iter()
        .map(|(group, partitions)| {
            let total: i64 = partitions.iter().filter_map(|p| p["lag"].as_i64()).sum();
            let info = node.kafka_groups.as_ref().and_then(|g| g.describe(&group));
            json!({
                "group": group,
                "state": info.as_ref().map_or("Empty", |i| i.state),
                "members": info.map_or(0, |i| i.members.len()),
                "lag": total,
                "partitions": partitions,
            })
        })
        .collect();
    let amqp: Vec<Value> = node
        .amqp
        .as_ref()
        .map(|a| {
            a.overview()
                .queues
                .iter()
                .map(|q| {
                    json!({"vhost": q.vhost, "queue": q.name, "ready": q.ready,
                           "unacked": q.unacked, "consumers": q.consumers})
                })
                .collect()
        })
        .unwrap_or_default();
    let sessions: Vec<Value> = sessions
        .iter()
        .map(|s| {
            json!({
                "client_id": s.client_id, "username": s.username, "connected": s.connected,
                "subscriptions": s.subscriptions, "queued": s.queued, "inflight": s.inflight,
                "held_bytes": s.held_bytes, "lag": s.queued + s.inflight,
                "offline_secs": s.offline_for.map(|d| d.as_secs()),
                "expires_in_secs": s.offline_for.zip(s.expiry)
                    .map(|(gone, expiry)| expiry.saturating_sub(gone).as_secs()),
            })
        })
        .collect();
    Ok(json!({
        "kafka_groups": kafka,
        "mqtt": mqtt,
        "mqtt_sessions": sessions,
        "downlinks": downlinks,
        "amqp_queues": amqp,
    }))
}

/// (stream, partition) → (log start, high watermark).
fn ends(node: &Node) -> BTreeMap<(String, u32), (i64, i64)> {
    let mut out = BTreeMap::new();
    for s in node.log.streams() {
        for (p, info) in s.partitions.iter().enumerate() {
            out.insert(
                (s.name.clone(), p as u32),
                (info.offsets.log_start, info.offsets.high_watermark),
            );
        }
    }
    out
}

/// `POST /api/consumers/kafka/<group>/reset` with `{"to": "earliest" | "latest"}`, and
/// optionally `"stream"`: moves the group's committed offsets of every partition it has
/// (of that stream) to the start or the end of the log. As Kafka's
/// `kafka-consumer-groups --reset-offsets`, only while the group has no members (409).
pub fn reset(node: &Node, group: &str, body: &[u8]) -> Reply {
    let Ok(body) = serde_json::from_slice::<Value>(body) else {
        return Reply::error(StatusCode::BAD_REQUEST, "a JSON object is needed");
    };
    let earliest = match body["to"].as_str() {
        Some("earliest") => true,
        Some("latest") => false,
        _ => return Reply::error(StatusCode::BAD_REQUEST, "to is \"earliest\" or \"latest\""),
    };
    if group == MQTT_CURSOR || group.starts_with(DOWNLINK_GROUP) {
        return Reply::error(StatusCode::BAD_REQUEST, "not a Kafka group");
    }
    let members = node
        .kafka_groups
        .as_ref()
        .and_then(|g| g.describe(group))
        .map_or(0, |i| i.members.len());
    if members > 0 {
        return Reply::error(
            StatusCode::CONFLICT,
            &format!("group {group} has {members} members: stop them first"),
        );
    }
    let cursors = match node.meta.cursors() {
        Ok(c) => c,
        Err(e) => return Reply::error(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()),
    };
    let ends = ends(node);
    let only = body["stream"].as_str();
    let commands: Vec<Command> = cursors
        .into_iter()
        .filter(|(g, s, _, _)| g == group && only.is_none_or(|o| o == s))
        .filter_map(|(_, stream, partition, _)| {
            let (start, end) = *ends.get(&(stream.clone(), partition))?;
            Some(Command::CommitCursor {
                group: group.to_owned(),
                stream,
                partition,
                offset: if earliest { start } else { end },
            })
        })
        .collect();
    if commands.is_empty() {
        return Reply::error(
            StatusCode::NOT_FOUND,
            &format!("group {group} has no committed offsets"),
        );
    }
    match node.meta.apply(&commands) {
        Ok(()) => {
            let partitions: Vec<Value> = commands
                .iter()
                .filter_map(|c| match c {
                    Command::CommitCursor {
                        stream,
                        partition,
                        offset,
                        ..
                    } => {
                        Some(json!({"stream": stream, "partition": partition, "committed": offset}))
                    }
                    _ => None,
                })
                .collect();
            tracing::warn!(
                group,
                earliest,
                "a Kafka group's offsets reset from the console"
            );
            Reply::json(
                StatusCode::OK,
                &json!({"group": group, "partitions": partitions}),
            )
        }
        Err(e) => Reply::error(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()),
    }
}
