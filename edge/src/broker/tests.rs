//! The broker core driven directly, without sockets: every input and every action is
//! visible, so QoS flows, flow control and session rules are checked exactly.

use std::num::NonZeroU16;
use std::time::{Duration, Instant};

use bytes::Bytes;
use ferry_protocol::mqtt::{
    ConnAck, Connect, Disconnect, Packet, ProtocolVersion, PubResponse, Publish, QoS, ReasonCode,
    Subscribe, Subscription, SubscriptionOptions, Unsubscribe, Will,
};
use ferry_protocol::topic::{TopicFilter, TopicName};

use super::*;

mod resume;
mod timeouts;

struct Harness {
    broker: Broker,
    now: Instant,
}

fn id(v: u16) -> NonZeroU16 {
    NonZeroU16::new(v).expect("non-zero")
}

fn topic(s: &str) -> TopicName {
    TopicName::new(s).expect("valid")
}

fn publish(t: &str, payload: &str, qos: QoS, packet_id: u16) -> Packet {
    let mut p = Publish::new(topic(t), Bytes::from(payload.to_owned()));
    p.qos = qos;
    p.packet_id = (qos != QoS::AtMostOnce).then(|| id(packet_id));
    Packet::Publish(p)
}

fn subscribe(filter: &str, qos: QoS) -> Packet {
    Packet::Subscribe(Subscribe {
        packet_id: id(1),
        properties: Properties::default(),
        subscriptions: vec![Subscription {
            filter: TopicFilter::new(filter).expect("valid"),
            options: SubscriptionOptions::new(qos),
        }],
    })
}

impl Harness {
    fn new(config: BrokerConfig) -> Self {
        Self {
            broker: Broker::new(config),
            now: Instant::now(),
        }
    }

    fn run(&mut self, input: Input) -> Vec<Action> {
        let mut actions = Vec::new();
        self.broker.handle(input, self.now, &mut actions);
        actions
    }

    fn connect_with(&mut self, conn: ConnId, connect: Connect, credit: usize) -> Vec<Action> {
        self.run(Input::Connect {
            conn,
            connect: Box::new(connect),
            credit,
            identity_verified: false,
        })
    }

    fn connect(&mut self, conn: ConnId, client_id: &str) -> ConnAck {
        let mut c = Connect::new(ProtocolVersion::V5, client_id);
        c.clean_start = true;
        let actions = self.connect_with(conn, c, 1000);
        match &actions[..] {
            [Action::Send(c, Packet::ConnAck(ack))] if *c == conn => ack.clone(),
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }

    fn packet(&mut self, conn: ConnId, packet: Packet) -> Vec<Action> {
        self.run(Input::Packet { conn, packet })
    }
}

/// The PUBLISH packets sent to `conn` among `actions`.
fn publishes(actions: &[Action], conn: ConnId) -> Vec<Publish> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Send(c, Packet::Publish(p)) if *c == conn => Some(p.clone()),
            _ => None,
        })
        .collect()
}

#[test]
fn qos1_publish_is_acked_and_delivered() {
    let mut h = Harness::new(BrokerConfig::default());
    h.connect(1, "sub");
    h.connect(2, "pub");
    let a = h.packet(1, subscribe("sensors/+", QoS::AtLeastOnce));
    assert!(
        matches!(&a[..], [Action::Send(1, Packet::SubAck(s))] if s.reasons == [ReasonCode::GrantedQoS1])
    );

    let a = h.packet(2, publish("sensors/t1", "21.5", QoS::AtLeastOnce, 7));
    let delivered = publishes(&a, 1);
    assert_eq!(delivered.len(), 1);
    assert_eq!(&delivered[0].payload[..], b"21.5");
    assert_eq!(delivered[0].qos, QoS::AtLeastOnce);
    assert!(a.contains(&Action::Send(2, Packet::PubAck(PubResponse::new(id(7))))));

    // The subscriber's PUBACK ends the exchange: nothing is left held.
    let pid = delivered[0].packet_id.expect("QoS 1 has an id");
    h.packet(1, Packet::PubAck(PubResponse::new(pid)));
    assert_eq!(h.broker.stats().queued_bytes, 0);
}

#[test]
fn qos2_flow_both_ways_and_resend_is_not_routed_twice() {
    let mut h = Harness::new(BrokerConfig::default());
    h.connect(1, "sub");
    h.connect(2, "pub");
    h.packet(1, subscribe("a", QoS::ExactlyOnce));
    let a = h.packet(2, publish("a", "x", QoS::ExactlyOnce, 3));
    assert!(a.contains(&Action::Send(2, Packet::PubRec(PubResponse::new(id(3))))));
    assert_eq!(publishes(&a, 1).len(), 1);
    // The same packet id again before PUBREL: acknowledged, not delivered again.
    let mut dup = publish("a", "x", QoS::ExactlyOnce, 3);
    if let Packet::Publish(p) = &mut dup {
        p.dup = true;
    }
    let a = h.packet(2, dup);
    assert_eq!(publishes(&a, 1).len(), 0);
    let a = h.packet(2, Packet::PubRel(PubResponse::new(id(3))));
    assert_eq!(
        a,
        [Action::Send(2, Packet::PubComp(PubResponse::new(id(3))))]
    );

    // Outgoing: PUBREC from the subscriber gets PUBREL, PUBCOMP ends it.
    let pid = id(1);
    let a = h.packet(1, Packet::PubRec(PubResponse::new(pid)));
    assert_eq!(a, [Action::Send(1, Packet::PubRel(PubResponse::new(pid)))]);
    h.packet(1, Packet::PubComp(PubResponse::new(pid)));
    assert_eq!(h.broker.stats().queued_bytes, 0);
}

#[test]
fn retained_messages_are_set_replaced_cleared_and_sent_on_subscribe() {
    let mut h = Harness::new(BrokerConfig::default());
    h.connect(1, "pub");
    let retained = |t: &str, payload: &str| {
        let mut p = Publish::new(topic(t), Bytes::from(payload.to_owned()));
        p.retain = true;
        Packet::Publish(p)
    };
    h.packet(1, retained("status/a", "on"));
    h.packet(1, retained("status/a", "off"));
    h.packet(1, retained("status/b", "on"));
    h.packet(1, retained("status/b", ""));
    assert_eq!(h.broker.stats().retained, 1);

    h.connect(2, "sub");
    let a = h.packet(2, subscribe("status/#", QoS::AtMostOnce));
    let got = publishes(&a, 2);
    assert_eq!(got.len(), 1);
    assert_eq!(
        (got[0].topic.as_str(), &got[0].payload[..], got[0].retain),
        ("status/a", &b"off"[..], true)
    );
}

#[test]
fn will_is_published_on_loss_but_not_after_disconnect() {
    let mut h = Harness::new(BrokerConfig::default());
    h.connect(1, "watcher");
    h.packet(1, subscribe("wills/#", QoS::AtMostOnce));
    let with_will = |client: &str| {
        let mut c = Connect::new(ProtocolVersion::V311, client);
        c.will = Some(Will {
            topic: topic(&format!("wills/{client}")),
            payload: Bytes::from_static(b"gone"),
            qos: QoS::AtMostOnce,
            retain: false,
            properties: Properties::default(),
        });
        c
    };
    h.connect_with(2, with_will("a"), 100);
    let a = h.run(Input::Lost { conn: 2 });
    assert_eq!(publishes(&a, 1).len(), 1, "lost connection: will sent");

    h.connect_with(3, with_will("b"), 100);
    h.packet(3, Packet::Disconnect(Disconnect::default()));
    let a = h.run(Input::Lost { conn: 3 });
    assert!(publishes(&a, 1).is_empty(), "clean DISCONNECT: no will");
}

#[test]
fn will_delay_is_cancelled_by_reconnect() {
    let mut h = Harness::new(BrokerConfig::default());
    h.connect(1, "watcher");
    h.packet(1, subscribe("wills/#", QoS::AtMostOnce));
    let mut c = Connect::new(ProtocolVersion::V5, "dev");
    c.clean_start = false;
    c.properties.session_expiry_interval_secs = Some(300);
    let mut will = Will {
        topic: topic("wills/dev"),
        payload: Bytes::from_static(b"gone"),
        qos: QoS::AtMostOnce,
        retain: false,
        properties: Properties::default(),
    };
    will.properties.will_delay_interval_secs = Some(10);
    c.will = Some(will);
    h.connect_with(2, c.clone(), 100);
    assert!(
        publishes(&h.run(Input::Lost { conn: 2 }), 1).is_empty(),
        "delayed"
    );
    h.now += Duration::from_secs(5);
    let a = h.connect_with(3, c.clone(), 100);
    assert!(matches!(&a[0], Action::Send(3, Packet::ConnAck(ack)) if ack.session_present));
    h.now += Duration::from_secs(20);
    assert!(
        publishes(&h.run(Input::Timeout), 1).is_empty(),
        "session resumed: will cancelled"
    );

    h.run(Input::Lost { conn: 3 });
    h.now += Duration::from_secs(11);
    assert_eq!(
        publishes(&h.run(Input::Timeout), 1).len(),
        1,
        "delay passed: will sent"
    );
}

#[test]
fn persistent_session_keeps_messages_and_resends_inflight_with_dup() {
    let mut h = Harness::new(BrokerConfig::default());
    let mut c = Connect::new(ProtocolVersion::V311, "dev");
    c.clean_start = false;
    h.connect_with(1, c.clone(), 100);
    h.packet(1, subscribe("cmd", QoS::AtLeastOnce));
    h.connect(2, "pub");
    let a = h.packet(2, publish("cmd", "one", QoS::AtLeastOnce, 1));
    assert_eq!(publishes(&a, 1).len(), 1);
    h.run(Input::Lost { conn: 1 });
    h.packet(2, publish("cmd", "two", QoS::AtLeastOnce, 2));
    h.now += Duration::from_secs(3);
    let offline = h.broker.persistent_sessions(h.now);
    assert_eq!(
        offline.len(),
        1,
        "the clean publisher is not listed: {offline:?}"
    );
    let s = &offline[0];
    assert_eq!(
        (
            s.client_id.as_str(),
            s.connected,
            s.queued,
            s.inflight,
            s.subscriptions
        ),
        ("dev", false, 1, 1, 1),
        "one unacknowledged, one waiting"
    );
    assert_eq!(
        (s.offline_for, s.expiry),
        (Some(Duration::from_secs(3)), None)
    );
    assert!(s.held_bytes > 0);

    let a = h.connect_with(3, c, 100);
    assert!(matches!(&a[0], Action::Send(3, Packet::ConnAck(ack)) if ack.session_present));
    let got = publishes(&a, 3);
    assert_eq!(got.len(), 2);
    let online = &h.broker.persistent_sessions(h.now)[0];
    assert_eq!(
        (
            online.connected,
            online.queued,
            online.inflight,
            online.offline_for
        ),
        (true, 0, 2, None)
    );
    assert_eq!(
        (&got[0].payload[..], got[0].dup),
        (&b"one"[..], true),
        "unacked one resent with DUP"
    );
    assert_eq!(
        (&got[1].payload[..], got[1].dup),
        (&b"two"[..], false),
        "queued one sent after"
    );
}

#[test]
fn session_takeover_closes_the_old_connection() {
    let mut h = Harness::new(BrokerConfig::default());
    h.connect(1, "same");
    let mut c = Connect::new(ProtocolVersion::V5, "same");
    c.clean_start = false;
    let a = h.connect_with(2, c, 100);
    assert_eq!(
        a[0],
        Action::Send(
            1,
            Packet::Disconnect(Disconnect::new(ReasonCode::SessionTakenOver))
        )
    );
    assert_eq!(a[1], Action::Close(1));
    assert!(matches!(&a[2], Action::Send(2, Packet::ConnAck(_))));
    assert_eq!(h.broker.stats().connections, 1);
}

#[test]
fn full_subscriber_pauses_the_publisher_instead_of_dropping() {
    let config = BrokerConfig {
        max_inflight_messages: 1,
        max_queued_bytes_per_session: 30,
        ..BrokerConfig::default()
    };
    let mut h = Harness::new(config);
    h.connect(1, "slow");
    h.packet(1, subscribe("t", QoS::AtLeastOnce));
    h.connect(2, "fast");
    // Each message costs 1 (topic) + 9 bytes: three fit in 30 bytes (one in flight).
    let mut acked = 0;
    let mut paused = false;
    for n in 1..=5u16 {
        let a = h.packet(
            2,
            publish("t", &format!("payload-{n}"), QoS::AtLeastOnce, n),
        );
        acked += a
            .iter()
            .filter(|x| matches!(x, Action::Send(2, Packet::PubAck(_))))
            .count();
        paused |= a.contains(&Action::PauseReads(2));
    }
    assert_eq!(acked, 3, "only what fits is acknowledged");
    assert!(paused, "the publisher is paused");
    assert_eq!(h.broker.stats().dropped_offline_queue_full, 0);

    // The subscriber acknowledges: room for one, the held message goes through; the next
    // one (read before the pause took effect) is held in its turn.
    let a = h.packet(1, Packet::PubAck(PubResponse::new(id(1))));
    assert!(a.contains(&Action::Send(2, Packet::PubAck(PubResponse::new(id(4))))));
    assert_eq!(publishes(&a, 1).len(), 1, "next message to the subscriber");
    assert!(!a.contains(&Action::ResumeReads(2)));
    // Another acknowledgement: the last one goes through and reads resume.
    let a = h.packet(1, Packet::PubAck(PubResponse::new(id(2))));
    assert!(a.contains(&Action::Send(2, Packet::PubAck(PubResponse::new(id(5))))));
    assert!(a.contains(&Action::ResumeReads(2)));
    assert_eq!(h.broker.stats().publishers_paused, 1);
}

#[test]
fn send_credit_bounds_what_goes_to_the_writer() {
    let mut h = Harness::new(BrokerConfig::default());
    let mut c = Connect::new(ProtocolVersion::V5, "sub");
    c.clean_start = true;
    h.connect_with(1, c, 3);
    h.packet(1, subscribe("t", QoS::AtMostOnce));
    h.connect(2, "pub");
    let mut sent = 0;
    for _ in 0..5 {
        sent += publishes(&h.packet(2, publish("t", "x", QoS::AtMostOnce, 0)), 1).len();
    }
    // Credit 3: one went to the CONNACK, one to the SUBACK, one message.
    assert_eq!(sent, 1);
    let a = h.run(Input::Written {
        conn: 1,
        packets: 10,
    });
    assert_eq!(
        publishes(&a, 1).len(),
        4,
        "the rest follows when credit comes back"
    );
}

#[test]
fn shared_subscription_delivers_each_message_to_one_member() {
    let mut h = Harness::new(BrokerConfig::default());
    h.connect(1, "w1");
    h.connect(2, "w2");
    h.packet(1, subscribe("$share/workers/jobs/#", QoS::AtLeastOnce));
    h.packet(2, subscribe("$share/workers/jobs/#", QoS::AtLeastOnce));
    h.connect(3, "pub");
    let (mut to1, mut to2) = (0, 0);
    for n in 1..=10u16 {
        let a = h.packet(3, publish("jobs/x", "j", QoS::AtLeastOnce, n));
        to1 += publishes(&a, 1).len();
        to2 += publishes(&a, 2).len();
    }
    assert_eq!(to1 + to2, 10);
    assert_eq!((to1, to2), (5, 5), "round robin");
}

#[test]
fn protocol_errors_disconnect_with_reason() {
    let mut h = Harness::new(BrokerConfig::default());
    h.connect(1, "c");
    let a = h.packet(
        1,
        Packet::Connect(Box::new(Connect::new(ProtocolVersion::V5, "c"))),
    );
    assert_eq!(
        a,
        [
            Action::Send(
                1,
                Packet::Disconnect(Disconnect::new(ReasonCode::ProtocolError))
            ),
            Action::Close(1)
        ]
    );
    // 3.1.1 client without id asking for a persistent session: refused.
    let mut c = Connect::new(ProtocolVersion::V311, "");
    c.clean_start = false;
    let a = h.connect_with(2, c, 10);
    assert!(
        matches!(&a[0], Action::Send(2, Packet::ConnAck(ack)) if ack.code == ReasonCode::ClientIdentifierNotValid)
    );
}

#[test]
fn unsubscribe_reports_what_existed() {
    let mut h = Harness::new(BrokerConfig::default());
    h.connect(1, "c");
    h.packet(1, subscribe("a/b", QoS::AtMostOnce));
    let a = h.packet(
        1,
        Packet::Unsubscribe(Unsubscribe {
            packet_id: id(2),
            properties: Properties::default(),
            filters: vec![
                TopicFilter::new("a/b").expect("valid"),
                TopicFilter::new("x").expect("valid"),
            ],
        }),
    );
    assert!(matches!(&a[..], [Action::Send(1, Packet::UnsubAck(u))]
        if u.reasons == [ReasonCode::Success, ReasonCode::NoSubscriptionExisted]));
    assert_eq!(h.broker.stats().subscriptions, 0);
}

#[test]
fn assigned_client_identifier_for_empty_v5_id() {
    let mut h = Harness::new(BrokerConfig::default());
    let ack = h.connect(1, "");
    assert!(ack
        .properties
        .assigned_client_identifier
        .as_deref()
        .is_some_and(|s| s.starts_with("ferry-auto-")));
}

/// A session restored at start under an id the broker assigned before the restart is not
/// given to a new client that sends no id.
#[test]
fn an_assigned_id_is_never_one_a_restored_session_has() {
    let mut h = Harness::new(BrokerConfig::default());
    let stored = |id: &str| StoredSession {
        client_id: id.into(),
        username: None,
        expiry_secs: 3600,
        subscriptions: Vec::new(),
        queue: Vec::new(),
        awaiting_pubrel: Vec::new(),
    };
    let snapshot = Snapshot {
        sessions: vec![stored("ferry-auto-1"), stored("ferry-auto-2")],
        retained: Vec::new(),
    };
    h.broker.restore(snapshot, h.now);
    let ack = h.connect(1, "");
    assert_eq!(
        ack.properties.assigned_client_identifier.as_deref(),
        Some("ferry-auto-3")
    );
    assert!(!ack.session_present);
}

#[test]
fn sys_topics_are_published_on_timeout_and_retained() {
    let mut h = Harness::new(BrokerConfig::default());
    h.connect(1, "ops");
    h.packet(1, subscribe("$SYS/broker/clients/#", QoS::AtMostOnce));
    let a = h.run(Input::Timeout);
    let got = publishes(&a, 1);
    let connected = got
        .iter()
        .find(|p| p.topic.as_str() == "$SYS/broker/clients/connected")
        .expect("clients/connected published");
    assert_eq!(&connected.payload[..], b"1");
    // Not again before the interval; again after it.
    h.now += Duration::from_secs(5);
    assert!(publishes(&h.run(Input::Timeout), 1).is_empty());
    h.now += Duration::from_secs(6);
    assert!(!publishes(&h.run(Input::Timeout), 1).is_empty());
    // A later subscriber gets the values at once (retained), and `#` does not match $SYS.
    h.connect(2, "late");
    let a = h.packet(2, subscribe("#", QoS::AtMostOnce));
    assert!(publishes(&a, 2).is_empty());
    let a = h.packet(2, subscribe("$SYS/broker/version", QoS::AtMostOnce));
    assert!(publishes(&a, 2)[0].payload.starts_with(b"ferry-edge "));
}

#[test]
fn server_keep_alive_caps_v5_clients_only() {
    let mut h = Harness::new(BrokerConfig::default());
    let mut c = Connect::new(ProtocolVersion::V5, "long");
    c.keep_alive_secs = 120;
    let a = h.connect_with(1, c, 10);
    assert!(
        matches!(&a[0], Action::Send(1, Packet::ConnAck(ack)) if ack.properties.server_keep_alive_secs == Some(60))
    );
    let mut c = Connect::new(ProtocolVersion::V5, "short");
    c.keep_alive_secs = 5;
    let a = h.connect_with(2, c, 10);
    assert!(
        matches!(&a[0], Action::Send(2, Packet::ConnAck(ack)) if ack.properties.server_keep_alive_secs.is_none())
    );
}

#[test]
fn an_expired_session_is_not_resumed_even_before_a_tick() {
    let mut h = Harness::new(BrokerConfig::default());
    let mut c = Connect::new(ProtocolVersion::V5, "dev");
    c.properties.session_expiry_interval_secs = Some(5);
    h.connect_with(1, c.clone(), 10);
    h.run(Input::Lost { conn: 1 });
    h.now += Duration::from_secs(6);
    c.clean_start = false;
    let a = h.connect_with(2, c, 10);
    assert!(matches!(&a[0], Action::Send(2, Packet::ConnAck(ack)) if !ack.session_present));
}

#[test]
fn a_refused_filter_gets_0x80_and_the_rest_of_the_subscribe_is_granted() {
    let mut h = Harness::new(BrokerConfig::default());
    h.connect(1, "c");
    let a = h.packet(
        1,
        Packet::Subscribe(Subscribe {
            packet_id: id(3),
            properties: Properties::default(),
            subscriptions: ["test/nosubscribe", "test/+"]
                .iter()
                .map(|f| Subscription {
                    filter: TopicFilter::new(*f).expect("valid"),
                    options: SubscriptionOptions::new(QoS::ExactlyOnce),
                })
                .collect(),
        }),
    );
    assert!(
        matches!(&a[..], [Action::Send(1, Packet::SubAck(s))]
        if s.reasons == [ReasonCode::UnspecifiedError, ReasonCode::GrantedQoS2]),
        "{a:?}"
    );
    // Only the granted filter delivers.
    h.connect(2, "p");
    let a = h.packet(2, publish("test/nosubscribe", "x", QoS::AtMostOnce, 0));
    assert_eq!(
        publishes(&a, 1).len(),
        1,
        "delivered through test/+ only, once"
    );
    let mut open = BrokerConfig::default();
    open.refused_filters.clear();
    let mut h = Harness::new(open);
    h.connect(1, "c");
    let a = h.packet(1, subscribe("test/nosubscribe", QoS::AtLeastOnce));
    assert!(
        matches!(&a[..], [Action::Send(1, Packet::SubAck(s))] if s.reasons == [ReasonCode::GrantedQoS1])
    );
}

#[test]
fn log_mode_acknowledges_without_routing_and_delivers_what_comes_back() {
    let config = BrokerConfig {
        max_inflight_messages: 1,
        max_queued_bytes_per_session: 30,
        ..BrokerConfig::default()
    };
    let mut h = Harness::new(config);
    h.broker.use_log();
    h.connect(1, "sub");
    h.packet(1, subscribe("t", QoS::AtLeastOnce));
    h.connect(2, "pub");
    let a = h.packet(2, publish("t", "hello", QoS::AtLeastOnce, 7));
    assert_eq!(
        a,
        vec![Action::SendWhenAppended(
            2,
            Packet::PubAck(PubResponse::new(id(7)))
        )],
        "acknowledged once the log has it"
    );
    assert!(
        publishes(&a, 1).is_empty(),
        "not routed before the log has it"
    );
    let appended = h.broker.take_appends();
    assert_eq!(appended.len(), 1);
    assert_eq!(
        (appended[0].topic.as_str(), &appended[0].payload[..]),
        ("t", &b"hello"[..])
    );
    assert!(h.broker.take_appends().is_empty());

    // Back from the log: delivered, and held (not dropped) when the subscriber is full.
    let mut delivered = 0;
    for n in 0..5 {
        let mut m = (*appended[0]).clone();
        m.payload = Bytes::from(format!("payload-{n}"));
        m.retain = n == 4;
        delivered += publishes(&h.run(Input::Deliver(Arc::new(m))), 1).len();
    }
    assert_eq!(delivered, 1, "one in flight");
    assert_eq!(
        h.broker.deliveries_held(),
        2,
        "three fit in 30 bytes, the rest wait"
    );
    assert_eq!(h.broker.deliveries_done(), 3, "every one is done or held");
    assert_eq!(h.broker.stats().dropped_offline_queue_full, 0);
    // Acknowledgements make room; held deliveries go on in order.
    let mut got = Vec::new();
    for pid in 1..=4u16 {
        let a = h.packet(1, Packet::PubAck(PubResponse::new(id(pid))));
        got.extend(publishes(&a, 1).into_iter().map(|p| p.payload));
    }
    assert_eq!(
        got,
        ["payload-1", "payload-2", "payload-3", "payload-4"]
            .map(|s| Bytes::from_static(s.as_bytes()))
    );
    assert_eq!(h.broker.deliveries_held(), 0);
    assert_eq!(h.broker.deliveries_done(), 5);
    assert_eq!(
        h.broker.stats().retained,
        1,
        "a retained message is kept when it comes back"
    );
    // An expired one is done with too (dropped, not held).
    let mut expired = (*appended[0]).clone();
    expired.expires_at = Some(h.now);
    h.run(Input::Deliver(Arc::new(expired)));
    assert_eq!(h.broker.deliveries_done(), 6);
}

/// Log mode, an append that failed: a v5 publisher's PUBACK and PUBREC become refusals
/// (0x80) and its connection stays; the QoS 2 id is forgotten, so the same message sent
/// again is taken (appended) again; a 3.1.1 publisher is disconnected without its PUBACK.
#[test]
fn log_mode_refuses_what_the_log_did_not_take() {
    let mut h = Harness::new(BrokerConfig::default());
    h.broker.use_log();
    h.connect(1, "v5");
    let mut acks = Vec::new();
    for (qos, pid) in [(QoS::AtLeastOnce, 1), (QoS::ExactlyOnce, 2)] {
        for a in h.packet(1, publish("t", "x", qos, pid)) {
            match a {
                Action::SendWhenAppended(conn, packet) => acks.push((conn, packet)),
                other => panic!("{other:?}"),
            }
        }
    }
    let mut v3 = Connect::new(ProtocolVersion::V311, "v3");
    v3.clean_start = true;
    h.connect_with(2, v3, 1000);
    for a in h.packet(2, publish("t", "y", QoS::AtLeastOnce, 9)) {
        if let Action::SendWhenAppended(conn, packet) = a {
            acks.push((conn, packet));
        }
    }
    assert_eq!(h.broker.take_appends().len(), 3);

    let a = h.run(Input::AppendFailed { acks });
    let refused: Vec<(u16, ReasonCode)> = a
        .iter()
        .filter_map(|a| match a {
            Action::Send(1, Packet::PubAck(r) | Packet::PubRec(r)) => {
                Some((r.packet_id.get(), r.reason))
            }
            _ => None,
        })
        .collect();
    assert_eq!(
        refused,
        [
            (1, ReasonCode::UnspecifiedError),
            (2, ReasonCode::UnspecifiedError)
        ],
        "{a:?}"
    );
    assert!(a.contains(&Action::Close(2)), "the 3.1.1 publisher: {a:?}");
    assert!(!a.contains(&Action::Close(1)), "the v5 publisher stays");
    assert!(
        !a.iter()
            .any(|x| matches!(x, Action::Send(2, Packet::PubAck(_)))),
        "no PUBACK for 3.1.1: {a:?}"
    );
    assert_eq!(h.broker.stats().refused_log_failed, 3);
    // The QoS 2 message sent again is a new one: appended again.
    let a = h.packet(1, publish("t", "x", QoS::ExactlyOnce, 2));
    assert!(
        matches!(&a[..], [Action::SendWhenAppended(1, Packet::PubRec(r))] if r.reason == ReasonCode::Success),
        "{a:?}"
    );
    assert_eq!(h.broker.take_appends().len(), 1, "taken again");
}

#[test]
fn log_mode_holds_every_publish_acknowledgement_for_the_log_and_nothing_else() {
    let mut h = Harness::new(BrokerConfig::default());
    h.broker.use_log();
    h.connect(1, "pub");
    // QoS 2: the PUBREC waits for the log; the PUBCOMP that answers the PUBREL does not.
    let a = h.packet(1, publish("t", "x", QoS::ExactlyOnce, 3));
    assert_eq!(
        a,
        [Action::SendWhenAppended(
            1,
            Packet::PubRec(PubResponse::new(id(3)))
        )]
    );
    let a = h.packet(1, Packet::PubRel(PubResponse::new(id(3))));
    assert_eq!(
        a,
        [Action::Send(1, Packet::PubComp(PubResponse::new(id(3))))]
    );
    // A refusal waits too, so that it cannot overtake the acknowledgement of a publish
    // before it on the same connection.
    let a = h.packet(1, publish("$SYS/x", "x", QoS::AtLeastOnce, 4));
    assert!(
        matches!(&a[..], [Action::SendWhenAppended(1, Packet::PubAck(r))] if r.packet_id == id(4)),
        "{a:?}"
    );
    // Without a log nothing waits.
    let mut edge = Harness::new(BrokerConfig::default());
    edge.connect(1, "pub");
    let a = edge.packet(1, publish("t", "x", QoS::AtLeastOnce, 5));
    assert!(
        matches!(&a[..], [Action::Send(1, Packet::PubAck(r))] if r.packet_id == id(5)),
        "{a:?}"
    );
}

#[test]
fn pacing_pauses_pure_publishers_as_they_publish_and_resumes_them_after() {
    let mut h = Harness::new(BrokerConfig::default());
    h.broker.use_log();
    h.connect(1, "publisher");
    h.connect(2, "both");
    h.packet(2, subscribe("cmd/#", QoS::AtLeastOnce));
    h.run(Input::Pace(true));
    let a = h.packet(1, publish("t", "x", QoS::AtLeastOnce, 1));
    assert!(a.contains(&Action::PauseReads(1)), "{a:?}");
    assert!(
        a.iter()
            .any(|x| matches!(x, Action::SendWhenAppended(1, _))),
        "still acknowledged: {a:?}"
    );
    // Paused once, not at every publish; a client that subscribes is not paused.
    let a = h.packet(1, publish("t", "y", QoS::AtLeastOnce, 2));
    assert!(!a.contains(&Action::PauseReads(1)), "{a:?}");
    let a = h.packet(2, publish("t", "z", QoS::AtLeastOnce, 3));
    assert!(!a.contains(&Action::PauseReads(2)), "{a:?}");
    assert_eq!(h.run(Input::Pace(false)), [Action::ResumeReads(1)]);
    // Not pacing: nobody is paused.
    let a = h.packet(1, publish("t", "w", QoS::AtLeastOnce, 4));
    assert!(!a.contains(&Action::PauseReads(1)), "{a:?}");
}

#[test]
#[cfg(feature = "edge")]
fn a_message_for_the_cloud_is_in_the_outbox_commit_before_its_puback_and_a_full_outbox_refuses() {
    let mut h = Harness::new(BrokerConfig::default());
    let config: crate::uplink::UplinkConfig =
        toml::from_str("max_outbox_bytes = 120\n[[route]]\nfilter = \"up/#\"\npriority = 3\n")
            .expect("parses");
    h.broker.set_outbox(crate::outbox::OutboxBudget::new(
        crate::uplink::UplinkRules::new(&config).expect("valid"),
    ));
    h.connect(1, "sensor");
    h.broker.take_store_ops();
    let a = h.packet(1, publish("up/t", "21.5", QoS::AtLeastOnce, 1));
    assert!(a.contains(&Action::Send(1, Packet::PubAck(PubResponse::new(id(1))))));
    let ops = h.broker.take_store_ops();
    assert!(
        matches!(
            &ops[..],
            [StoreOp::Outbox(crate::outbox::OutboxOp::Put { priority: 3, seq: 1, msg })]
                if &msg.payload[..] == b"21.5"
        ),
        "{ops:?}"
    );
    // QoS 0 and other topics stay on the edge.
    h.packet(1, publish("up/t", "x", QoS::AtMostOnce, 0));
    h.packet(1, publish("local/t", "x", QoS::AtLeastOnce, 2));
    assert!(h.broker.take_store_ops().is_empty());
    // The budget's documented cost (docs/edge-storage.md, what users size
    // max_outbox_bytes by): topic + payload + 40 bytes a record.
    assert_eq!(
        (
            h.broker.stats().outbox_records,
            h.broker.stats().outbox_bytes
        ),
        (1, 4 + 4 + 40)
    );
    // 48 bytes in; the next 48 fit (96 <= 120), the third does not: refused with 0x97.
    h.packet(1, publish("up/t", "21.6", QoS::AtLeastOnce, 3));
    let a = h.packet(1, publish("up/t", "21.7", QoS::AtLeastOnce, 4));
    let mut refused = PubResponse::new(id(4));
    refused.reason = ReasonCode::QuotaExceeded;
    assert!(
        a.contains(&Action::Send(1, Packet::PubAck(refused))),
        "{a:?}"
    );
    assert_eq!(h.broker.stats().outbox_rejected, 1);
    assert_eq!(
        h.broker.take_store_ops().len(),
        1,
        "only the one that fitted"
    );
}

#[test]
fn a_drain_sends_v5_clients_to_the_references_in_turn_and_closes_everyone() {
    let mut h = Harness::new(BrokerConfig::default());
    h.connect(1, "a");
    h.connect(2, "b");
    h.connect(3, "c");
    h.connect_with(4, Connect::new(ProtocolVersion::V311, "old"), 100);
    let refs = vec!["node-2:1883".to_owned(), "node-3:1883".to_owned()];
    let a = h.run(Input::Drain { references: refs });
    let told: Vec<(ConnId, ReasonCode, Option<String>)> = a
        .iter()
        .filter_map(|x| match x {
            Action::Send(c, Packet::Disconnect(d)) => {
                Some((*c, d.reason, d.properties.server_reference.clone()))
            }
            _ => None,
        })
        .collect();
    let to = |r: &str| Some(r.to_owned());
    assert_eq!(
        told,
        [
            (1, ReasonCode::UseAnotherServer, to("node-2:1883")),
            (2, ReasonCode::UseAnotherServer, to("node-3:1883")),
            (3, ReasonCode::UseAnotherServer, to("node-2:1883")),
        ],
        "a 3.1.1 client has no DISCONNECT to hear"
    );
    let mut closed: Vec<ConnId> = a
        .iter()
        .filter_map(|x| match x {
            Action::Close(c) => Some(*c),
            _ => None,
        })
        .collect();
    closed.sort_unstable();
    assert_eq!(closed, [1, 2, 3, 4]);
    assert_eq!(h.broker.stats().connections, 0);

    // Alone: shutting down.
    h.connect(5, "a");
    let a = h.run(Input::Drain {
        references: Vec::new(),
    });
    assert!(matches!(
        &a[0],
        Action::Send(5, Packet::Disconnect(d))
            if d.reason == ReasonCode::ServerShuttingDown
                && d.properties.server_reference.is_none()
    ));
}

/// The session events the broker has for the node, as text.
fn told(broker: &mut Broker) -> Vec<String> {
    broker
        .take_session_events()
        .into_iter()
        .map(|e| match e {
            SessionEvent::Connected(id) => format!("connected {id}"),
            SessionEvent::Will(id, Some((m, delay))) => format!("will {id} {} {delay}", m.topic),
            SessionEvent::Will(id, None) => format!("will {id} -"),
            SessionEvent::Ended(id) => format!("ended {id}"),
        })
        .collect()
}

/// A cluster node: a session whose client id connected on another node ends here. Its
/// connection is closed with 0x8E, a will without a delay goes to the log as on a takeover
/// here, a will waiting for its delay is dropped, the persistent state is deleted, and the
/// node hears where sessions connected and ended (ids the broker assigned are not told).
#[test]
fn a_session_taken_elsewhere_ends_here_and_the_node_hears_of_sessions() {
    let mut h = Harness::new(BrokerConfig::default());
    h.broker.use_log();
    h.broker.report_sessions();
    let with_will = |client: &str, delay: Option<u32>| {
        let mut c = Connect::new(ProtocolVersion::V5, client);
        c.clean_start = false;
        c.properties.session_expiry_interval_secs = Some(3600);
        let mut will = Will {
            topic: topic(&format!("wills/{client}")),
            payload: Bytes::from_static(b"gone"),
            qos: QoS::AtLeastOnce,
            retain: false,
            properties: Properties::default(),
        };
        will.properties.will_delay_interval_secs = delay;
        c.will = Some(will);
        c
    };
    h.connect_with(1, with_will("now", None), 100);
    h.packet(1, subscribe("t/#", QoS::AtLeastOnce));
    h.connect_with(2, with_will("later", Some(60)), 100);
    h.run(Input::Lost { conn: 2 });
    h.connect(3, "");
    assert_eq!(
        told(&mut h.broker),
        [
            "connected now",
            "will now wills/now 0",
            "connected later",
            "will later wills/later 60"
        ],
        "the assigned id is not told"
    );
    h.broker.take_store_ops();

    let a = h.run(Input::TakenElsewhere {
        client_id: "now".into(),
    });
    assert_eq!(
        a[..2],
        [
            Action::Send(
                1,
                Packet::Disconnect(Disconnect::new(ReasonCode::SessionTakenOver))
            ),
            Action::Close(1)
        ]
    );
    let appended = h.broker.take_appends();
    assert_eq!(
        appended
            .iter()
            .map(|m| m.topic.as_str())
            .collect::<Vec<_>>(),
        ["wills/now"],
        "the will without a delay goes out"
    );
    h.run(Input::TakenElsewhere {
        client_id: "later".into(),
    });
    h.run(Input::TakenElsewhere {
        client_id: "unknown".into(),
    });
    assert_eq!(
        told(&mut h.broker),
        ["will now -", "ended now", "ended later"],
        "now's will went out as its connection closed"
    );
    let deleted: Vec<String> = h
        .broker
        .take_store_ops()
        .into_iter()
        .filter_map(|op| match op {
            StoreOp::SessionDelete { client_id } => Some(client_id.to_string()),
            _ => None,
        })
        .collect();
    assert_eq!(deleted, ["now", "later"]);
    assert_eq!(h.broker.stats().sessions, 1, "only the assigned id's");
    h.now += Duration::from_secs(120);
    h.run(Input::Timeout);
    assert!(
        h.broker.take_appends().is_empty(),
        "the delayed will is not sent: its client lives elsewhere"
    );
    let a = h.connect_with(4, with_will("now", None), 100);
    assert!(matches!(&a[0], Action::Send(4, Packet::ConnAck(ack)) if !ack.session_present));
}

/// A cluster node at start: retained messages seeded from the cluster are kept where the
/// broker has none for the topic (what the log delivered since is newer), sent to a later
/// subscriber, and routed to no one.
#[test]
fn seeded_retained_messages_fill_only_the_topics_the_broker_has_none_for() {
    let mut h = Harness::new(BrokerConfig::default());
    h.broker.use_log();
    h.connect(1, "early");
    h.packet(1, subscribe("state/#", QoS::AtLeastOnce));
    let retained = |t: &str, payload: &'static str| {
        Arc::new(Message {
            topic: topic(t),
            payload: Bytes::from_static(payload.as_bytes()),
            qos: QoS::AtLeastOnce,
            retain: true,
            properties: Properties::default(),
            expires_at: None,
            publisher: None,
            position: None,
        })
    };
    // The log delivered a newer state/a first.
    let a = h.run(Input::Deliver(retained("state/a", "from the log")));
    assert_eq!(publishes(&a, 1).len(), 1);
    let a = h.run(Input::Retained(vec![
        retained("state/a", "older, seeded"),
        retained("state/b", "seeded"),
        retained("state/c", ""),
    ]));
    assert!(publishes(&a, 1).is_empty(), "seeds are not routed");
    h.connect(2, "late");
    let a = h.packet(2, subscribe("state/#", QoS::AtLeastOnce));
    let mut got: Vec<(String, String)> = publishes(&a, 2)
        .iter()
        .map(|p| {
            (
                p.topic.to_string(),
                String::from_utf8_lossy(&p.payload).into_owned(),
            )
        })
        .collect();
    got.sort();
    assert_eq!(
        got,
        [
            ("state/a".to_owned(), "from the log".to_owned()),
            ("state/b".to_owned(), "seeded".to_owned())
        ]
    );
}
