//! What becomes of a message a client published once the MQTT rules let it in: it is
//! routed to local subscribers, and on the edge (feature `edge`), where an uplink route
//! matches, kept in the outbox ([`crate::outbox::OutboxBudget`]); on the cloud (log mode)
//! it is appended to the log first and routed when it comes back.

use std::sync::Arc;
use std::time::Instant;

use ferry_protocol::mqtt::{Disconnect, Packet, ProtocolVersion, ReasonCode};

use super::{Action, Broker, ConnId, Message, StoreOp};

/// Where accepted messages go; chosen at start-up.
#[derive(Debug, Default)]
pub(crate) enum Downstream {
    /// Local subscribers only (until [`Broker::set_outbox`] or [`Broker::use_log`]).
    #[default]
    Local,
    /// The edge: local subscribers, and the outbox for what goes up.
    #[cfg(feature = "edge")]
    Edge(crate::outbox::OutboxBudget),
    /// The cloud's log mode: the messages accepted and not yet taken for appending.
    Log(Vec<Arc<Message>>),
}

impl Downstream {
    /// What the edge's outbox holds, into `stats` (nothing elsewhere).
    pub(super) fn outbox_figures(&self, stats: &mut super::Stats) {
        match self {
            #[cfg(feature = "edge")]
            Downstream::Edge(outbox) => outbox.figures(stats),
            _ => {
                let _ = stats;
            }
        }
    }
}

/// The edge's outbox as the broker's downstream.
#[cfg(feature = "edge")]
impl Broker {
    /// Sets the outbox, and with it what goes up to the cloud (at start-up, with what it
    /// held restored: [`crate::outbox::OutboxBudget::restore`]). In log mode nothing goes
    /// further up, and this does nothing.
    pub fn set_outbox(&mut self, outbox: crate::outbox::OutboxBudget) {
        if !self.log_mode() {
            self.downstream = Downstream::Edge(outbox);
        }
    }

    /// Whether `msg` goes up to the cloud, and if it does whether the outbox has room.
    pub(super) fn outbox_admit(&self, msg: &Message) -> crate::outbox::Admission {
        match &self.downstream {
            Downstream::Edge(outbox) => outbox.admit(msg),
            _ => crate::outbox::Admission::Local,
        }
    }

    /// Puts `msg`, which [`Broker::outbox_admit`] sent up and routing took, in the outbox
    /// (in this batch's commit, before its PUBACK). Whether it goes up.
    pub(super) fn outbox_put(&mut self, up: crate::outbox::Admission, msg: &Arc<Message>) -> bool {
        let (
            crate::outbox::Admission::Up {
                priority,
                cloud_topic,
            },
            Downstream::Edge(outbox),
        ) = (up, &mut self.downstream)
        else {
            return false;
        };
        outbox.put(priority, cloud_topic, msg, &mut self.store_ops);
        true
    }

    /// What a commit deleted from the outbox: `acked` (the cloud has it) and `dropped`
    /// (`drop_oldest`).
    pub(crate) fn outbox_applied(
        &mut self,
        acked: crate::outbox::OutboxTotals,
        dropped: crate::outbox::OutboxTotals,
    ) {
        if let Downstream::Edge(outbox) = &mut self.downstream {
            outbox.applied(acked, dropped);
        }
        self.stats.outbox_dropped += dropped.records;
    }
}

impl Broker {
    /// Log mode (the cloud node): a message a client publishes (or a will) is not routed but
    /// kept for [`Broker::take_appends`]; the driver appends it to the log before it sends its
    /// acknowledgement ([`super::Action::SendWhenAppended`]), and feeds what the log holds back
    /// as [`Input::Deliver`](super::Input::Deliver). Every source of messages thus reaches
    /// subscribers through the same path.
    pub fn use_log(&mut self) {
        self.downstream = Downstream::Log(Vec::new());
    }

    pub(super) fn log_mode(&self) -> bool {
        matches!(self.downstream, Downstream::Log(_))
    }

    /// Log mode: the messages accepted since the last call, in order.
    pub fn take_appends(&mut self) -> Vec<Arc<Message>> {
        match &mut self.downstream {
            Downstream::Log(appends) => std::mem::take(appends),
            _ => Vec::new(),
        }
    }

    /// [`Input::AppendFailed`](super::Input::AppendFailed): the acknowledgements of publishes
    /// the log did not take become refusals (v5) or disconnections (3.1.1).
    pub(super) fn append_failed(&mut self, acks: Vec<(ConnId, Packet)>, now: Instant) {
        for (conn, packet) in acks {
            let (mut response, qos2) = match packet {
                Packet::PubAck(r) => (r, false),
                Packet::PubRec(r) => (r, true),
                _ => continue,
            };
            // A connection already gone took its session's acknowledgements with it (its
            // client resends); a QoS 2 id of its session stays awaiting PUBREL (a limit).
            let Some(c) = self.conns.get(&conn) else {
                continue;
            };
            let (client_id, v5, closing) = (
                c.client_id.clone(),
                c.version == ProtocolVersion::V5,
                c.closing,
            );
            if qos2 {
                let session = self.sessions.get_mut(&client_id);
                let persistent = session.as_ref().is_some_and(|s| s.is_persistent());
                if session.is_some_and(|s| s.awaiting_pubrel.remove(&response.packet_id))
                    && persistent
                {
                    self.store_ops.push(StoreOp::Qos2Delete {
                        client_id,
                        packet_id: response.packet_id,
                    });
                }
            }
            if closing {
                continue;
            }
            self.stats.refused_log_failed += 1;
            if v5 {
                // A refusal that waited its turn behind the append stays what it was.
                if !response.reason.is_error() {
                    response.reason = ReasonCode::UnspecifiedError;
                    response.properties.reason_string =
                        Some("the log did not take the message".into());
                }
                let packet = if qos2 {
                    Packet::PubRec(response)
                } else {
                    Packet::PubAck(response)
                };
                self.out.push(Action::Send(conn, packet));
            } else {
                let mut d = Disconnect::new(ReasonCode::UnspecifiedError);
                d.properties.reason_string = Some("the log did not take the message".into());
                self.close_with(conn, d, now);
            }
        }
    }

    /// Deliveries held for a subscriber without room. While there are any, the driver
    /// should stop reading the log.
    pub fn deliveries_held(&self) -> usize {
        self.held_deliveries.len()
    }

    /// Deliveries ([`Input::Deliver`](super::Input::Deliver)) done with since start: routed
    /// to the matching sessions (stored, for persistent ones, in the store operations of
    /// the input that routed them), or dropped as expired. They are done with in the order
    /// they came, and every one handed in is done or held: once this reaches the count
    /// handed in up to some delivery, that one and all before it are routed. (How the edge
    /// records a downlink sequence as applied only when it is.)
    pub fn deliveries_done(&self) -> u64 {
        self.deliveries_done
    }

    /// [`Input::Pace`](super::Input::Pace): starts or ends pacing; ending it resumes the
    /// paused publishers (but those the broker holds for a full subscriber of its own).
    pub(super) fn pace(&mut self, on: bool, now: Instant) {
        self.pacing = on;
        if on {
            return;
        }
        for conn in std::mem::take(&mut self.paced) {
            if self.conns.get(&conn).is_some_and(|c| c.held.is_empty()) {
                self.resume_reads(conn, now);
            }
        }
    }

    /// After a publish from `conn` while pacing: pauses it if it subscribes to nothing.
    pub(super) fn pace_publisher(&mut self, conn: ConnId) {
        if !self.pacing || self.paced.contains(&conn) {
            return;
        }
        let Some(c) = self.conns.get(&conn) else {
            return;
        };
        let subscribes = self
            .sessions
            .get(&c.client_id)
            .is_some_and(|s| !s.subscriptions.is_empty());
        if !subscribes && !c.closing {
            self.paced.insert(conn);
            self.out.push(Action::PauseReads(conn));
        }
    }
}
