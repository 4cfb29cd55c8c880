//! An incoming PUBLISH: the MQTT rules and the ACL, the outbox budget, routing, and the
//! acknowledgement (PUBACK, or PUBREC and the QoS 2 exchange up to PUBCOMP).

use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_protocol::mqtt::{
    Packet, Properties, ProtocolVersion, PubResponse, Publish, QoS, ReasonCode,
};

use super::route::Blocked;
use super::{Broker, Conn, ConnId, Downstream, Message, StoreOp};
use crate::auth;

impl Broker {
    /// A PUBLISH from a client: checked, routed (in log mode, kept for the log instead), put
    /// in the outbox if it goes up to the cloud (feature `edge`), and acknowledged. If a
    /// connected subscriber has no room, it is held and its publisher paused instead.
    pub(super) fn publish(
        &mut self,
        conn: ConnId,
        client_id: &Arc<str>,
        mut p: Publish,
        now: Instant,
    ) {
        let v5 = self
            .conns
            .get(&conn)
            .is_some_and(|c| c.version == ProtocolVersion::V5);
        if self.resolve_topic_alias(conn, &mut p, now).is_break() {
            return;
        }
        if self.check_publish(conn, client_id, &p, v5, now).is_break() {
            return;
        }

        let msg = Arc::new(Message {
            expires_at: p
                .properties
                .message_expiry_interval_secs
                .map(|s| now + Duration::from_secs(s.into())),
            properties: forwarded_properties(&p.properties),
            topic: p.topic.clone(),
            payload: p.payload.clone(),
            qos: p.qos,
            retain: p.retain,
            publisher: Some(client_id.clone()),
            position: None,
        });
        if let Downstream::Log(appends) = &mut self.downstream {
            // Routed when it comes back from the log; acknowledged once it is appended.
            appends.push(msg);
            self.stats.received_by_qos[p.qos as usize] += 1;
            self.await_pubrel(client_id, &p);
            self.acknowledge(conn, &p, ReasonCode::Success);
            return self.pace_publisher(conn);
        }
        // For the cloud: refused now if the outbox is full; put in it (in this batch's
        // commit, before the PUBACK) once routing took it.
        #[cfg(feature = "edge")]
        let up = match self.outbox_admit(&msg) {
            crate::outbox::Admission::Full => {
                self.stats.outbox_rejected += 1;
                if v5 {
                    return self.acknowledge(conn, &p, ReasonCode::QuotaExceeded);
                }
                return self.protocol_error(conn, ReasonCode::QuotaExceeded, now);
            }
            up => up,
        };
        let destinations = match self.route(msg.clone(), now, p.qos == QoS::AtMostOnce) {
            Ok(matched) => matched,
            Err(Blocked) => return self.hold_publish(conn, p),
        };
        self.stats.received_by_qos[p.qos as usize] += 1;
        // A message that goes up to the cloud has a destination even with no local subscriber.
        #[cfg(feature = "edge")]
        let destinations = destinations + usize::from(self.outbox_put(up, &msg));
        if p.retain {
            self.retain(&msg);
        }
        let reason = if destinations == 0 && v5_reason_ok(self.conns.get(&conn)) {
            ReasonCode::NoMatchingSubscribers
        } else {
            ReasonCode::Success
        };
        self.await_pubrel(client_id, &p);
        self.acknowledge(conn, &p, reason);
    }

    /// Topic aliases from the client (MQTT 5.0 §3.3.2.3.4): a PUBLISH with an alias and a
    /// topic sets the alias, one with an alias and no topic uses it. Breaks if the connection
    /// is closed for a bad alias (or is gone).
    fn resolve_topic_alias(
        &mut self,
        conn: ConnId,
        p: &mut Publish,
        now: Instant,
    ) -> ControlFlow<()> {
        if let Some(alias) = p.properties.topic_alias.take() {
            if alias.get() > self.config.max_topic_alias {
                self.protocol_error(conn, ReasonCode::TopicAliasInvalid, now);
                return ControlFlow::Break(());
            }
            let Some(c) = self.conns.get_mut(&conn) else {
                return ControlFlow::Break(());
            };
            if p.topic.is_empty() {
                match c.aliases_in.get(&alias.get()) {
                    Some(topic) => p.topic = topic.clone(),
                    None => {
                        self.protocol_error(conn, ReasonCode::ProtocolError, now);
                        return ControlFlow::Break(());
                    }
                }
            } else {
                c.aliases_in.insert(alias.get(), p.topic.clone());
            }
        }
        ControlFlow::Continue(())
    }

    /// The MQTT rules and the ACL for a PUBLISH whose topic is known: no Subscription
    /// Identifiers, the topic's depth, retain support, `$SYS`, who may publish there, and for
    /// QoS 2 a resend and the Receive Maximum. Breaks if the PUBLISH was answered here
    /// (refused, or a resend acknowledged again) or its connection closed.
    fn check_publish(
        &mut self,
        conn: ConnId,
        client_id: &Arc<str>,
        p: &Publish,
        v5: bool,
        now: Instant,
    ) -> ControlFlow<()> {
        if !p.properties.subscription_identifiers.is_empty() {
            // MQTT-3.3.4-6: a client must not send Subscription Identifiers.
            self.protocol_error(conn, ReasonCode::ProtocolError, now);
            return ControlFlow::Break(());
        }
        if p.topic.as_str().split('/').count() > self.config.max_topic_levels {
            self.refuse_publish(conn, p, ReasonCode::TopicNameInvalid, now);
            return ControlFlow::Break(());
        }
        if p.retain && !self.config.retain_available {
            self.protocol_error(conn, ReasonCode::RetainNotSupported, now);
            return ControlFlow::Break(());
        }
        if p.topic.as_str().starts_with("$SYS") {
            // `$SYS` belongs to the broker (other `$` topics, such as the cloud's `$edge/`
            // downlink, are for applications that know them).
            self.refuse_publish(conn, p, ReasonCode::TopicNameInvalid, now);
            return ControlFlow::Break(());
        }
        let username = self
            .sessions
            .get(client_id)
            .and_then(|s| s.username.clone());
        let allowed = self.auth.allows(
            username.as_deref(),
            client_id,
            auth::Action::Publish,
            p.topic.as_str(),
        );
        if !allowed {
            // v5 says why; 3.1.1 cannot, so there the message is acknowledged and dropped
            // (as Mosquitto does). Counted either way.
            self.stats.dropped_not_authorized += 1;
            let reason = if v5 {
                ReasonCode::NotAuthorized
            } else {
                ReasonCode::Success
            };
            self.acknowledge(conn, p, reason);
            return ControlFlow::Break(());
        }
        if p.qos == QoS::ExactlyOnce {
            let id = p.packet_id.expect("the decoder guarantees an id on QoS 2");
            let session = self
                .sessions
                .get_mut(client_id)
                .expect("a connection has a session");
            if session.awaiting_pubrel.contains(&id) {
                // A resend of a message already taken: acknowledge again, do not route again.
                self.send(conn, Packet::PubRec(PubResponse::new(id)));
                return ControlFlow::Break(());
            }
            if session.awaiting_pubrel.len() >= usize::from(self.config.max_inflight_messages) {
                self.protocol_error(conn, ReasonCode::ReceiveMaximumExceeded, now);
                return ControlFlow::Break(());
            }
        }
        ControlFlow::Continue(())
    }

    /// A QoS 2 message was taken: its id waits for PUBREL (durably, for a persistent session).
    fn await_pubrel(&mut self, client_id: &Arc<str>, p: &Publish) {
        if let (QoS::ExactlyOnce, Some(id), Some(s)) =
            (p.qos, p.packet_id, self.sessions.get_mut(client_id))
        {
            s.awaiting_pubrel.insert(id);
            if s.is_persistent() {
                self.store_ops.push(StoreOp::Qos2Put {
                    client_id: client_id.clone(),
                    packet_id: id,
                });
            }
        }
    }

    /// A PUBREL releases an incoming QoS 2 message: its id is forgotten and PUBCOMP sent.
    pub(super) fn pubrel(&mut self, conn: ConnId, client_id: &Arc<str>, r: PubResponse) {
        let session = self.sessions.get_mut(client_id);
        let persistent = session.as_ref().is_some_and(|s| s.is_persistent());
        let known = session.is_some_and(|s| s.awaiting_pubrel.remove(&r.packet_id));
        if known && persistent {
            self.store_ops.push(StoreOp::Qos2Delete {
                client_id: client_id.clone(),
                packet_id: r.packet_id,
            });
        }
        let mut comp = PubResponse::new(r.packet_id);
        if !known {
            comp.reason = ReasonCode::PacketIdentifierNotFound;
        }
        self.send(conn, Packet::PubComp(comp));
    }

    /// Answers a QoS 1 PUBLISH with PUBACK and a QoS 2 one with PUBREC, carrying `reason`
    /// (v5 only; 3.1.1 has no reason code on these). Nothing for QoS 0.
    fn acknowledge(&mut self, conn: ConnId, p: &Publish, reason: ReasonCode) {
        let Some(id) = p.packet_id else {
            return;
        };
        let mut response = PubResponse::new(id);
        response.reason = reason;
        let packet = match p.qos {
            QoS::AtMostOnce => return,
            QoS::AtLeastOnce => Packet::PubAck(response),
            QoS::ExactlyOnce => Packet::PubRec(response),
        };
        self.send(conn, packet);
    }

    /// Refuses a PUBLISH the spec lets us refuse: v5 QoS 1/2 get a reason code; otherwise
    /// (3.1.1, or QoS 0) the connection is closed, since 3.1.1 has no way to say no.
    fn refuse_publish(&mut self, conn: ConnId, p: &Publish, code: ReasonCode, now: Instant) {
        let v5 = self
            .conns
            .get(&conn)
            .is_some_and(|c| c.version == ProtocolVersion::V5);
        if v5 && p.qos != QoS::AtMostOnce {
            self.acknowledge(conn, p, code);
        } else {
            self.protocol_error(conn, code, now);
        }
    }
}

fn v5_reason_ok(conn: Option<&Conn>) -> bool {
    conn.is_some_and(|c| c.version == ProtocolVersion::V5)
}

/// The properties a subscriber receives: everything but Topic Alias and Subscription
/// Identifiers, which are per hop (MQTT-3.3.2-?).
pub(super) fn forwarded_properties(p: &Properties) -> Properties {
    if p.is_empty() {
        return Properties::default();
    }
    let mut out = p.clone();
    out.topic_alias = None;
    out.subscription_identifiers.clear();
    out.will_delay_interval_secs = None;
    out.message_expiry_interval_secs = None;
    out
}
