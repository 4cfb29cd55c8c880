//! Routing: a message to every matching session's queue (one member per shared group),
//! within the queue caps, and retained messages.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use ferry_protocol::mqtt::{QoS, SubscriptionOptions};

use super::flow::enqueue;
use super::session::effective_qos;
use super::subscriptions::Entry;
use super::{Broker, Delivery, Message, StoreOp};
use crate::auth;

/// Why a message could not be routed now.
pub(super) struct Blocked;

impl Broker {
    /// Puts `msg` in the queue of every matching session. Fails without queueing anything if a
    /// connected subscriber has no room for a QoS ≥ 1 message and `lossy` is false.
    /// Returns how many sessions it was queued for.
    pub(super) fn route(
        &mut self,
        msg: Arc<Message>,
        now: Instant,
        lossy: bool,
    ) -> Result<usize, Blocked> {
        // One delivery per session: the highest QoS and all identifiers of its matching
        // subscriptions (MQTT 5.0 §3.3.4); one member per shared group.
        let mut targets: HashMap<Arc<str>, Delivery> = HashMap::new();
        let mut groups: HashMap<Arc<str>, Vec<Entry>> = HashMap::new();
        self.subscriptions.for_each_match(msg.topic.as_str(), |e| {
            if let Some(group) = &e.shared_group {
                groups.entry(group.clone()).or_default().push(e.clone());
                return;
            }
            if e.options.no_local && msg.publisher.as_ref() == Some(&e.client_id) {
                return;
            }
            add_target(&mut targets, &msg, e);
        });
        for (group, mut members) in groups {
            members.sort_by(|a, b| a.client_id.cmp(&b.client_id));
            let cursor = self.share_cursor.entry(group).or_insert(0);
            let online: Vec<&Entry> = members
                .iter()
                .filter(|e| {
                    self.sessions
                        .get(&e.client_id)
                        .is_some_and(|s| s.conn.is_some())
                })
                .collect();
            let pool: Vec<&Entry> = if online.is_empty() {
                members.iter().collect()
            } else {
                online
            };
            let chosen = pool[*cursor % pool.len()];
            *cursor = cursor.wrapping_add(1);
            add_target(&mut targets, &msg, chosen);
        }

        let cost = msg.cost();
        if !lossy && msg.qos != QoS::AtMostOnce {
            let over_total =
                self.queued_bytes + cost * targets.len() > self.config.max_queued_bytes_total;
            for (client_id, d) in &targets {
                let Some(session) = self.sessions.get(client_id) else {
                    continue;
                };
                let full = over_total
                    || session.held_bytes() + cost > self.config.max_queued_bytes_per_session;
                if session.conn.is_some() && d.qos != QoS::AtMostOnce && full {
                    return Err(Blocked);
                }
            }
        }

        let matched = targets.len();
        let mut ids: Vec<Arc<str>> = Vec::with_capacity(targets.len());
        for (client_id, d) in targets {
            let Some(session) = self.sessions.get_mut(&client_id) else {
                continue;
            };
            if session.conn.is_none() && d.qos == QoS::AtMostOnce {
                // QoS 0 is not queued for an offline session.
                continue;
            }
            if !self.auth.allows_everything()
                && !self.auth.allows(
                    session.username.as_deref(),
                    &client_id,
                    auth::Action::Receive,
                    d.msg.topic.as_str(),
                )
            {
                continue;
            }
            if let Some(resuming) = &mut session.resuming {
                // After what the replay brings (see `resume`).
                resuming.aside.push(d);
                continue;
            }
            let full = session.held_bytes() + cost > self.config.max_queued_bytes_per_session
                || self.queued_bytes + cost > self.config.max_queued_bytes_total;
            if full {
                if d.qos == QoS::AtMostOnce {
                    self.stats.dropped_qos0_queue_full += 1;
                } else {
                    self.stats.dropped_offline_queue_full += 1;
                }
                continue;
            }
            self.queued_bytes += cost;
            enqueue(session, d, &mut self.store_ops);
            ids.push(client_id);
        }
        for id in ids {
            self.pump(&id, now);
        }
        Ok(matched)
    }

    /// Routes a message read back from the log (log mode) or from the downlink (the edge);
    /// holds it (and what follows) if a connected subscriber has no room.
    pub(super) fn deliver(&mut self, msg: Arc<Message>, now: Instant) {
        if msg.expired(now) {
            self.deliveries_done += 1;
            return;
        }
        match self.route(msg.clone(), now, false) {
            Ok(_) => {
                self.deliveries_done += 1;
                if msg.retain {
                    self.retain(&msg);
                }
            }
            Err(Blocked) => self.held_deliveries.push_back(msg),
        }
    }

    pub(super) fn retain(&mut self, msg: &Arc<Message>) {
        if msg.payload.is_empty() {
            if self.retained.remove(&msg.topic).is_some() {
                self.store_ops.push(StoreOp::RetainedDelete {
                    topic: msg.topic.clone(),
                });
            }
        } else {
            self.retained.insert(msg.topic.clone(), msg.clone());
            self.store_ops
                .push(StoreOp::RetainedPut { msg: msg.clone() });
        }
    }
}

fn add_target(targets: &mut HashMap<Arc<str>, Delivery>, msg: &Arc<Message>, e: &Entry) {
    let d = targets
        .entry(e.client_id.clone())
        .or_insert_with(|| Delivery {
            msg: msg.clone(),
            qos: QoS::AtMostOnce,
            retain: false,
            subscription_ids: Vec::new(),
            seq: 0,
        });
    add_match(d, &e.options, e.id);
}

/// One more of a session's subscriptions matches the delivery: the highest QoS of them, the
/// RETAIN flag if any keeps it, every subscription identifier.
pub(super) fn add_match(
    d: &mut Delivery,
    options: &SubscriptionOptions,
    id: Option<std::num::NonZeroU32>,
) {
    d.qos = d.qos.max(effective_qos(d.msg.qos, options.qos));
    d.retain |= d.msg.retain && options.retain_as_published;
    if let Some(id) = id {
        d.subscription_ids.push(id);
    }
}
