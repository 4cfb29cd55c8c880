//! The broker's counters and connected clients, for metrics and an admin API, and the
//! `$SYS/broker/...` topics that publish them.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use ferry_protocol::mqtt::{Properties, QoS};
use ferry_protocol::topic::TopicName;

use super::{Broker, ClientInfo, Message, SessionInfo, Stats};

impl Broker {
    /// True while any session, connected or not, subscribes to anything: a message delivered
    /// now may be routed to someone.
    pub fn has_subscriptions(&self) -> bool {
        self.subscriptions.len() > 0
    }

    pub fn stats(&self) -> Stats {
        let mut stats = Stats {
            connections: self.conns.len(),
            sessions: self.sessions.len(),
            subscriptions: self.subscriptions.len(),
            retained: self.retained.len(),
            queued_bytes: self.queued_bytes,
            ..self.stats.clone()
        };
        self.downstream.outbox_figures(&mut stats);
        stats
    }

    /// The connected clients, by client id.
    pub fn clients(&self) -> Vec<ClientInfo> {
        let mut out: Vec<ClientInfo> = self
            .conns
            .values()
            .filter(|c| !c.closing)
            .filter_map(|c| {
                let s = self.sessions.get(&c.client_id)?;
                Some(ClientInfo {
                    client_id: c.client_id.to_string(),
                    username: s.username.as_deref().map(str::to_owned),
                    protocol_level: c.version.level(),
                    persistent: s.is_persistent(),
                    queued_bytes: s.held_bytes(),
                    subscriptions: s.subscriptions.len(),
                })
            })
            .collect();
        out.sort_by(|a, b| a.client_id.cmp(&b.client_id));
        out
    }

    /// The persistent sessions (expiry interval above 0), connected or not, by client id.
    pub fn persistent_sessions(&self, now: Instant) -> Vec<SessionInfo> {
        let mut out: Vec<SessionInfo> = self
            .sessions
            .values()
            .filter(|s| s.is_persistent())
            .map(|s| SessionInfo {
                client_id: s.client_id.to_string(),
                username: s.username.as_deref().map(str::to_owned),
                connected: s.conn.is_some(),
                subscriptions: s.subscriptions.len(),
                queued: s.queue.len(),
                inflight: s.inflight.len(),
                held_bytes: s.held_bytes(),
                offline_for: match s.conn {
                    Some(_) => None,
                    None => s.disconnected_at.map(|t| now.saturating_duration_since(t)),
                },
                expiry: (s.expiry_secs != u32::MAX)
                    .then(|| Duration::from_secs(u64::from(s.expiry_secs))),
            })
            .collect();
        out.sort_by(|a, b| a.client_id.cmp(&b.client_id));
        out
    }

    /// Publishes the statistics as retained QoS 0 messages under `$SYS/broker/` (the names
    /// Mosquitto uses where it has one). They are not written to disk.
    pub(super) fn publish_sys(&mut self, now: Instant, uptime: Duration) {
        let s = self.stats();
        let dropped = s.dropped_qos0_queue_full
            + s.dropped_offline_queue_full
            + s.dropped_expired
            + s.dropped_too_large_for_client;
        let values: [(&str, String); 14] = [
            (
                "version",
                format!("ferry-edge {}", env!("CARGO_PKG_VERSION")),
            ),
            ("uptime", format!("{} seconds", uptime.as_secs())),
            ("clients/connected", s.connections.to_string()),
            ("clients/total", s.sessions.to_string()),
            ("subscriptions/count", s.subscriptions.to_string()),
            ("retained messages/count", s.retained.to_string()),
            (
                "messages/received",
                s.received_by_qos.iter().sum::<u64>().to_string(),
            ),
            (
                "messages/sent",
                s.sent_by_qos.iter().sum::<u64>().to_string(),
            ),
            ("store/messages/bytes", s.queued_bytes.to_string()),
            ("messages/dropped", dropped.to_string()),
            (
                "messages/dropped/qos0_queue_full",
                s.dropped_qos0_queue_full.to_string(),
            ),
            (
                "messages/dropped/offline_queue_full",
                s.dropped_offline_queue_full.to_string(),
            ),
            ("messages/dropped/expired", s.dropped_expired.to_string()),
            ("publishers/paused", s.publishers_paused.to_string()),
        ];
        for (name, value) in values {
            let Ok(topic) = TopicName::new(format!("$SYS/broker/{name}")) else {
                continue;
            };
            let msg = Arc::new(Message {
                topic,
                payload: Bytes::from(value),
                qos: QoS::AtMostOnce,
                retain: true,
                properties: Properties::default(),
                expires_at: None,
                publisher: None,
                position: None,
            });
            self.retained.insert(msg.topic.clone(), msg.clone());
            let _ = self.route(msg, now, true);
        }
    }
}
