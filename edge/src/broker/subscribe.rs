//! SUBSCRIBE and UNSUBSCRIBE: the checks, the subscription tree, and the retained messages a
//! new subscription receives.

use std::sync::Arc;
use std::time::Instant;

use ferry_protocol::mqtt::{
    Packet, Properties, QoS, ReasonCode, RetainHandling, SubAck, Subscribe, UnsubAck, Unsubscribe,
};

use super::flow::enqueue;
use super::session::effective_qos;
use super::subscriptions::Entry;
use super::{Broker, ConnId, Delivery};
use crate::auth;

impl Broker {
    pub(super) fn subscribe(
        &mut self,
        conn: ConnId,
        client_id: &Arc<str>,
        s: Subscribe,
        now: Instant,
    ) {
        let id = s.properties.subscription_identifiers.first().copied();
        let mut reasons = Vec::with_capacity(s.subscriptions.len());
        let mut retained_out: Vec<Delivery> = Vec::new();
        for sub in s.subscriptions {
            let session = self
                .sessions
                .get_mut(client_id)
                .expect("a connection has a session");
            let key = sub.filter.as_str().to_owned();
            if sub.filter.filter().split('/').count() > self.config.max_topic_levels {
                reasons.push(ReasonCode::TopicFilterInvalid);
                continue;
            }
            if self.config.refused_filters.contains(&key) {
                reasons.push(ReasonCode::UnspecifiedError);
                continue;
            }
            let allowed = self.auth.allows(
                session.username.as_deref(),
                client_id,
                auth::Action::Subscribe,
                sub.filter.filter(),
            );
            if !allowed {
                reasons.push(ReasonCode::NotAuthorized);
                continue;
            }
            let exists = session.subscriptions.contains_key(&key);
            if !exists && session.subscriptions.len() >= self.config.max_subscriptions_per_session {
                reasons.push(ReasonCode::QuotaExceeded);
                continue;
            }
            session
                .subscriptions
                .insert(key.clone(), (sub.filter.clone(), sub.options, id));
            self.subscriptions.insert(
                &sub.filter,
                Entry {
                    client_id: client_id.clone(),
                    shared_group: sub.filter.is_shared().then(|| Arc::from(key.as_str())),
                    options: sub.options,
                    id,
                },
            );
            reasons.push(match sub.options.qos {
                QoS::AtMostOnce => ReasonCode::Success,
                QoS::AtLeastOnce => ReasonCode::GrantedQoS1,
                QoS::ExactlyOnce => ReasonCode::GrantedQoS2,
            });
            // Retained messages for the new subscription (MQTT 5.0 §3.3.1.3); none for shared
            // subscriptions (MQTT-3.8.4-?: "retained messages are not sent to shared subs").
            let send_retained = !sub.filter.is_shared()
                && match sub.options.retain_handling {
                    RetainHandling::SendAtSubscribe => true,
                    RetainHandling::SendAtSubscribeIfNew => !exists,
                    RetainHandling::DoNotSend => false,
                };
            if send_retained {
                for msg in self.retained.values() {
                    if sub.filter.matches(&msg.topic) && !msg.expired(now) {
                        retained_out.push(Delivery {
                            msg: msg.clone(),
                            qos: effective_qos(msg.qos, sub.options.qos),
                            retain: true,
                            subscription_ids: id.into_iter().collect(),
                            seq: 0,
                        });
                    }
                }
            }
        }
        self.send(
            conn,
            Packet::SubAck(SubAck {
                packet_id: s.packet_id,
                properties: Properties::default(),
                reasons,
            }),
        );
        self.persist_session(client_id);
        if let Some(session) = self.sessions.get_mut(client_id) {
            for d in retained_out {
                self.queued_bytes += d.cost();
                enqueue(session, d, &mut self.store_ops);
            }
        }
        self.pump(client_id, now);
    }

    pub(super) fn unsubscribe(&mut self, conn: ConnId, client_id: &Arc<str>, u: Unsubscribe) {
        let session = self
            .sessions
            .get_mut(client_id)
            .expect("a connection has a session");
        let reasons = u
            .filters
            .iter()
            .map(|f| {
                if session.subscriptions.remove(f.as_str()).is_some() {
                    self.subscriptions.remove(f, client_id);
                    ReasonCode::Success
                } else {
                    ReasonCode::NoSubscriptionExisted
                }
            })
            .collect();
        self.persist_session(client_id);
        self.send(
            conn,
            Packet::UnsubAck(UnsubAck {
                packet_id: u.packet_id,
                properties: Properties::default(),
                reasons,
            }),
        );
    }
}
