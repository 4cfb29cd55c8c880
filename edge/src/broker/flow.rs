//! Outgoing flow control: what a session's connection is sent within its send credit and
//! the client's window, the acknowledgements that end an exchange, and the publishers held
//! while a subscriber has no room.

use std::num::NonZeroU16;
use std::sync::Arc;
use std::time::Instant;

use ferry_protocol::mqtt::{
    Packet, PacketId, ProtocolVersion, PubResponse, Publish, QoS, ReasonCode,
};
use ferry_protocol::topic::TopicName;

use super::session::{Inflight, OutState, Session};
use super::{Action, Broker, Conn, ConnId, Delivery, QueueState, StoreOp};

impl Broker {
    /// A PUBACK (QoS 1) or PUBCOMP (QoS 2) ends an outgoing exchange.
    pub(super) fn acked(
        &mut self,
        conn: ConnId,
        client_id: &Arc<str>,
        id: PacketId,
        qos: QoS,
        now: Instant,
    ) {
        let Some(session) = self.sessions.get_mut(client_id) else {
            return;
        };
        let Some(pos) = session.inflight_position(id) else {
            // Unknown id: nothing to do (MQTT allows a late or duplicate ack).
            return;
        };
        if session.inflight[pos].delivery.qos != qos {
            return self.protocol_error(conn, ReasonCode::ProtocolError, now);
        }
        if let Some(done) = session.inflight.remove(pos) {
            self.queued_bytes -= done.delivery.cost();
            if session.is_persistent() {
                self.store_ops.push(StoreOp::QueueDelete {
                    client_id: client_id.clone(),
                    seq: done.delivery.seq,
                });
            }
        }
        self.pump(client_id, now);
        self.retry_held(now);
    }

    /// A PUBREC moves an outgoing QoS 2 exchange on to PUBREL, or ends it if the receiver
    /// refused the message.
    pub(super) fn pubrec(
        &mut self,
        conn: ConnId,
        client_id: &Arc<str>,
        r: PubResponse,
        now: Instant,
    ) {
        let Some(session) = self.sessions.get_mut(client_id) else {
            return;
        };
        let known = session
            .inflight_position(r.packet_id)
            .map(|i| &mut session.inflight[i])
            .filter(|i| i.delivery.qos == QoS::ExactlyOnce);
        match known {
            Some(i) if r.reason.is_error() => {
                // The receiver refused it: the exchange ends here.
                let _ = i;
                self.acked(conn, client_id, r.packet_id, QoS::ExactlyOnce, now);
            }
            Some(i) => {
                i.state = OutState::Released;
                let delivery = i.delivery.clone();
                if session.is_persistent() {
                    self.store_ops.push(StoreOp::QueuePut {
                        client_id: client_id.clone(),
                        delivery,
                        state: QueueState::Released(r.packet_id),
                    });
                }
                self.send(conn, Packet::PubRel(PubResponse::new(r.packet_id)));
            }
            None => {
                let mut rel = PubResponse::new(r.packet_id);
                rel.reason = ReasonCode::PacketIdentifierNotFound;
                self.send(conn, Packet::PubRel(rel));
            }
        }
    }

    // ---- delivery -------------------------------------------------------------------------

    /// Sends what the session's connection can take now: unsent in-flight messages first
    /// (after a reconnect), then the queue, within the send credit and the client's window.
    pub(super) fn pump(&mut self, client_id: &Arc<str>, now: Instant) {
        let Some(session) = self.sessions.get_mut(client_id) else {
            return;
        };
        let Some(conn_id) = session.conn else {
            return;
        };
        let Some(conn) = self.conns.get_mut(&conn_id) else {
            return;
        };
        if conn.closing {
            return;
        }
        // Resend after reconnect, in the original order (MQTT-4.4.0-1).
        for inflight in session.inflight.iter_mut().filter(|i| !i.sent) {
            if conn.credit == 0 {
                return;
            }
            let packet = match inflight.state {
                OutState::Published => {
                    let mut p = to_publish(&inflight.delivery, Some(inflight.packet_id), now, conn);
                    p.dup = true;
                    Packet::Publish(p)
                }
                OutState::Released => Packet::PubRel(PubResponse::new(inflight.packet_id)),
            };
            inflight.sent = true;
            conn.credit -= 1;
            self.out.push(Action::Send(conn_id, packet));
        }
        while conn.credit > 0 {
            let Some(front) = session.queue.front() else {
                break;
            };
            if front.qos != QoS::AtMostOnce
                && session.inflight.len() >= usize::from(conn.send_window)
            {
                break;
            }
            let d = session.pop().expect("front exists");
            let stored = session.is_persistent() && d.qos != QoS::AtMostOnce;
            if d.msg.expired(now) {
                self.queued_bytes -= d.cost();
                self.stats.dropped_expired += 1;
                if stored {
                    self.store_ops.push(StoreOp::QueueDelete {
                        client_id: client_id.clone(),
                        seq: d.seq,
                    });
                }
                continue;
            }
            let packet_id = (d.qos != QoS::AtMostOnce).then(|| session.next_packet_id());
            let publish = to_publish(&d, packet_id, now, conn);
            // A topic sent whole with an alias binds the alias at the client (§3.3.2.3.4).
            let binds_alias = publish.properties.topic_alias.is_some() && !publish.topic.is_empty();
            let packet = Packet::Publish(publish);
            let too_large = packet
                .encoded_len(conn.version)
                .map_or(true, |len| len > conn.max_packet_bytes as usize);
            if too_large {
                // MQTT-3.1.2-25: never send a client more than its Maximum Packet Size. What
                // is not sent binds no alias either: the next message on the topic must
                // carry the topic again.
                if binds_alias {
                    conn.aliases_out.remove(&d.msg.topic);
                }
                self.queued_bytes -= d.cost();
                self.stats.dropped_too_large_for_client += 1;
                if stored {
                    self.store_ops.push(StoreOp::QueueDelete {
                        client_id: client_id.clone(),
                        seq: d.seq,
                    });
                }
                continue;
            }
            self.stats.sent_by_qos[d.qos as usize] += 1;
            match packet_id {
                Some(packet_id) => {
                    if stored {
                        self.store_ops.push(StoreOp::QueuePut {
                            client_id: client_id.clone(),
                            delivery: d.clone(),
                            state: QueueState::Published(packet_id),
                        });
                    }
                    session.inflight.push_back(Inflight {
                        packet_id,
                        delivery: d,
                        state: OutState::Published,
                        sent: true,
                    });
                }
                None => self.queued_bytes -= d.cost(),
            }
            conn.credit -= 1;
            self.out.push(Action::Send(conn_id, packet));
        }
    }

    /// Holds a PUBLISH that a connected subscriber without room could not take, and stops
    /// reading from its publisher until the subscriber drains ([`Broker::retry_held`]).
    pub(super) fn hold_publish(&mut self, conn: ConnId, p: Publish) {
        self.stats.publishers_paused += 1;
        if let Some(c) = self.conns.get_mut(&conn) {
            c.held.push_front(Packet::Publish(p));
        }
        self.out.push(Action::PauseReads(conn));
    }

    /// Tries again the publishes held for publishers that were paused.
    pub(super) fn retry_held(&mut self, now: Instant) {
        if self.retrying {
            // Reached again through a held packet (a PUBACK that frees room): the outer
            // call goes on with the rest, in order.
            return;
        }
        self.retrying = true;
        self.retry_held_inner(now);
        self.retrying = false;
    }

    fn retry_held_inner(&mut self, now: Instant) {
        while let Some(msg) = self.held_deliveries.pop_front() {
            let before = self.held_deliveries.len();
            self.deliver(msg, now);
            if self.held_deliveries.len() > before {
                // Still no room: it went to the back; put it first again and wait.
                let msg = self.held_deliveries.pop_back().expect("just pushed");
                self.held_deliveries.push_front(msg);
                break;
            }
        }
        let paused: Vec<ConnId> = self
            .conns
            .iter()
            .filter(|(_, c)| !c.held.is_empty())
            .map(|(id, _)| *id)
            .collect();
        for conn in paused {
            loop {
                let Some(packet) = self.conns.get_mut(&conn).and_then(|c| c.held.pop_front())
                else {
                    self.resume_reads(conn, now);
                    break;
                };
                let was_publish = matches!(packet, Packet::Publish(_));
                self.packet(conn, packet, now);
                let blocked_again = was_publish
                    && self
                        .out
                        .last()
                        .is_some_and(|a| *a == Action::PauseReads(conn));
                if blocked_again {
                    // Still no room: undo the repeated pause, keep waiting.
                    self.out.pop();
                    self.stats.publishers_paused -= 1;
                    break;
                }
            }
        }
    }

    pub(super) fn send(&mut self, conn: ConnId, packet: Packet) {
        // Control packets (acks, SUBACK, PINGRESP) are small and bounded by what the client
        // sends; they go out even without credit, so that a paused reader never deadlocks.
        if let Some(c) = self.conns.get_mut(&conn) {
            c.credit = c.credit.saturating_sub(1);
        }
        // What a client published is acknowledged only once the log has it (log mode).
        let acknowledges_a_publish = matches!(packet, Packet::PubAck(_) | Packet::PubRec(_));
        if self.log_mode() && acknowledges_a_publish {
            self.out.push(Action::SendWhenAppended(conn, packet));
        } else {
            self.out.push(Action::Send(conn, packet));
        }
    }
}

/// Appends a delivery to a session's queue, and to its stored queue if the session is
/// persistent and the delivery is QoS 1/2.
pub(super) fn enqueue(session: &mut Session, d: Delivery, store_ops: &mut Vec<StoreOp>) {
    let client_id = session.client_id.clone();
    let persistent = session.is_persistent();
    let d = session.push(d);
    if persistent && d.qos != QoS::AtMostOnce {
        store_ops.push(StoreOp::QueuePut {
            client_id,
            delivery: d.clone(),
            state: QueueState::Queued,
        });
    }
}

/// The PUBLISH for one delivery on one connection: remaining expiry, subscription ids,
/// topic alias.
fn to_publish(d: &Delivery, packet_id: Option<PacketId>, now: Instant, conn: &mut Conn) -> Publish {
    let mut p = Publish::new(d.msg.topic.clone(), d.msg.payload.clone());
    p.qos = d.qos;
    p.retain = d.retain;
    p.packet_id = packet_id;
    if conn.version == ProtocolVersion::V5 {
        p.properties = d.msg.properties.clone();
        if let Some(at) = d.msg.expires_at {
            let left = at.saturating_duration_since(now).as_secs();
            p.properties.message_expiry_interval_secs =
                Some(u32::try_from(left).unwrap_or(u32::MAX).max(1));
        }
        if !d.subscription_ids.is_empty() {
            p.properties.subscription_identifiers = d.subscription_ids.clone();
        }
        if conn.alias_max_out > 0 {
            match conn.aliases_out.get(&d.msg.topic) {
                Some(alias) => {
                    p.properties.topic_alias = Some(*alias);
                    p.topic = TopicName::alias_only();
                }
                None if conn.aliases_out.len() < usize::from(conn.alias_max_out) => {
                    let alias = NonZeroU16::new(conn.aliases_out.len() as u16 + 1)
                        .expect("len + 1 is never 0");
                    conn.aliases_out.insert(d.msg.topic.clone(), alias);
                    p.properties.topic_alias = Some(alias);
                }
                None => {}
            }
        }
    }
    p
}
