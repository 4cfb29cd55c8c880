//! [`Broker::poll_timeout`] and [`Input::Timeout`]: which deadlines the broker has, that
//! each is reported at the right instant, and what handling it at that instant does.

use super::*;

/// No `$SYS`, so that the only deadlines are the ones a test makes.
fn quiet() -> BrokerConfig {
    BrokerConfig {
        sys_interval_secs: 0,
        ..BrokerConfig::default()
    }
}

/// A client without keep alive (3.1.1 keeps its 0: no Server Keep Alive to impose), whose
/// session ends with its connection.
fn no_keepalive(client_id: &str) -> Connect {
    let mut c = Connect::new(ProtocolVersion::V311, client_id);
    c.keep_alive_secs = 0;
    c.clean_start = true;
    c
}

fn with_keepalive(version: ProtocolVersion, client_id: &str, secs: u16) -> Connect {
    let mut c = Connect::new(version, client_id);
    c.keep_alive_secs = secs;
    c
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

impl Harness {
    /// [`Input::Timeout`] at `at` (the harness's clock moves there).
    fn timeout_at(&mut self, at: Instant) -> Vec<Action> {
        self.now = at;
        self.run(Input::Timeout)
    }
}

#[test]
fn nothing_pending_means_no_deadline() {
    let mut h = Harness::new(quiet());
    assert_eq!(h.broker.poll_timeout(), None, "a new broker");
    h.connect_with(1, no_keepalive("sub"), 100);
    h.packet(1, subscribe("t", QoS::AtLeastOnce));
    h.connect_with(2, no_keepalive("pub"), 100);
    let a = h.packet(2, publish("t", "x", QoS::AtMostOnce, 0));
    assert_eq!(publishes(&a, 1).len(), 1);
    assert_eq!(
        h.broker.poll_timeout(),
        None,
        "connected, idle, nothing timed"
    );
    // A session that ends with its connection leaves no timer behind.
    h.run(Input::Lost { conn: 1 });
    assert_eq!(h.broker.poll_timeout(), None);
    assert_eq!(h.broker.timers.len(), 0);
    // And a timeout that comes anyway does nothing.
    assert_eq!(h.timeout_at(h.now + secs(3600)), []);
}

#[test]
fn keep_alive_is_a_deadline_at_one_and_a_half_times_and_closes_the_client() {
    let mut h = Harness::new(quiet());
    h.connect_with(1, no_keepalive("watcher"), 100);
    h.packet(1, subscribe("wills/#", QoS::AtMostOnce));
    let start = h.now;
    let mut c = with_keepalive(ProtocolVersion::V5, "dev", 10);
    c.will = Some(Will {
        topic: topic("wills/dev"),
        payload: Bytes::from_static(b"gone"),
        qos: QoS::AtMostOnce,
        retain: false,
        properties: Properties::default(),
    });
    h.connect_with(2, c, 100);
    assert_eq!(h.broker.poll_timeout(), Some(start + secs(15)));

    // Just before: nothing happens, the deadline stays.
    let a = h.timeout_at(start + secs(15) - Duration::from_millis(1));
    assert_eq!(a, []);
    assert_eq!(h.broker.poll_timeout(), Some(start + secs(15)));

    // At the deadline: closed as if the network had failed (no DISCONNECT, MQTT-3.1.2-22),
    // and the will goes out.
    let a = h.timeout_at(start + secs(15));
    assert!(a.contains(&Action::Close(2)), "{a:?}");
    assert!(
        !a.iter()
            .any(|x| matches!(x, Action::Send(2, Packet::Disconnect(_)))),
        "{a:?}"
    );
    let wills = publishes(&a, 1);
    assert_eq!(wills.len(), 1, "{a:?}");
    assert_eq!(wills[0].topic.as_str(), "wills/dev");
    assert_eq!(h.broker.stats().connections, 1);
    assert_eq!(h.broker.poll_timeout(), None);
}

#[test]
fn traffic_renews_the_keep_alive_and_the_old_deadline_only_rearms_it() {
    let mut h = Harness::new(quiet());
    let start = h.now;
    h.connect_with(1, with_keepalive(ProtocolVersion::V311, "dev", 10), 100);
    h.now = start + secs(10);
    assert_eq!(
        h.packet(1, Packet::PingReq),
        [Action::Send(1, Packet::PingResp)]
    );
    // The deadline reported is the old one (a packet does not touch the timers)...
    assert_eq!(h.broker.poll_timeout(), Some(start + secs(15)));
    // ...and handling it finds the client was heard from: re-armed, not closed.
    assert_eq!(h.timeout_at(start + secs(15)), []);
    assert_eq!(h.broker.poll_timeout(), Some(start + secs(25)));
    assert_eq!(h.timeout_at(start + secs(25)), [Action::Close(1)]);
    assert_eq!(h.broker.stats().connections, 0);
}

#[test]
fn the_server_keep_alive_is_what_a_v5_client_is_held_to() {
    let mut h = Harness::new(quiet());
    let start = h.now;
    // A v5 client asking for none gets the Server Keep Alive (60 s by default): 90 s.
    let a = h.connect_with(1, with_keepalive(ProtocolVersion::V5, "v5", 0), 100);
    assert!(
        matches!(&a[0], Action::Send(1, Packet::ConnAck(ack)) if ack.properties.server_keep_alive_secs == Some(60))
    );
    assert_eq!(h.broker.poll_timeout(), Some(start + secs(90)));
    // 3.1.1 has no way to be told: its 0 stays 0 and adds no deadline.
    h.connect_with(2, with_keepalive(ProtocolVersion::V311, "v3", 0), 100);
    assert_eq!(h.broker.poll_timeout(), Some(start + secs(90)));
    assert_eq!(h.timeout_at(start + secs(90)), [Action::Close(1)]);
    assert_eq!(h.broker.poll_timeout(), None);
}

#[test]
fn a_qos1_delivery_awaiting_its_ack_adds_no_deadline_and_is_not_resent_on_a_timer() {
    let mut h = Harness::new(quiet());
    let start = h.now;
    let mut c = with_keepalive(ProtocolVersion::V5, "sub", 30);
    c.clean_start = false;
    c.properties.session_expiry_interval_secs = Some(600);
    h.connect_with(1, c.clone(), 100);
    h.packet(1, subscribe("t", QoS::AtLeastOnce));
    h.connect_with(2, no_keepalive("pub"), 100);
    h.now = start + secs(5);
    let a = h.packet(2, publish("t", "x", QoS::AtLeastOnce, 1));
    assert_eq!(publishes(&a, 1).len(), 1, "delivered, now awaiting PUBACK");

    // MQTT 5.0 §4.4: a PUBLISH is resent only when the session reconnects, never on a
    // timer. The only deadline is the subscriber's keep alive.
    assert_eq!(h.broker.poll_timeout(), Some(start + secs(45)));
    let a = h.timeout_at(start + secs(45));
    assert_eq!(a, [Action::Close(1)], "closed, nothing resent");
    // Its session is offline now: the next deadline is its expiry.
    assert_eq!(h.broker.poll_timeout(), Some(start + secs(45 + 600)));
    // It comes back before that: the unacknowledged message is resent (with DUP), and the
    // expiry is disarmed.
    h.now = start + secs(60);
    let a = h.connect_with(3, c, 100);
    let resent = publishes(&a, 3);
    assert_eq!(resent.len(), 1, "{a:?}");
    assert!(resent[0].dup);
    assert_eq!(h.broker.poll_timeout(), Some(start + secs(60 + 45)));
}

#[test]
fn will_delay_and_session_expiry_are_deadlines_and_a_reconnect_disarms_them() {
    let mut h = Harness::new(quiet());
    h.connect_with(1, no_keepalive("watcher"), 100);
    h.packet(1, subscribe("wills/#", QoS::AtMostOnce));
    let mut c = no_keepalive("dev");
    c.protocol = ProtocolVersion::V5;
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
    // The Server Keep Alive would add a deadline; this test is about the session's.
    h.broker.config.max_keepalive_secs = 0;

    h.connect_with(2, c.clone(), 100);
    let lost_at = h.now;
    h.run(Input::Lost { conn: 2 });
    assert_eq!(h.broker.poll_timeout(), Some(lost_at + secs(10)), "will");
    let a = h.timeout_at(lost_at + secs(10));
    assert_eq!(publishes(&a, 1).len(), 1, "will sent at its delay");
    assert_eq!(h.broker.poll_timeout(), Some(lost_at + secs(300)), "expiry");
    h.broker.take_store_ops();
    h.timeout_at(lost_at + secs(300));
    assert_eq!(h.broker.stats().sessions, 1, "only the watcher's is left");
    assert!(
        matches!(&h.broker.take_store_ops()[..], [StoreOp::SessionDelete { client_id }] if &**client_id == "dev")
    );
    assert_eq!(h.broker.poll_timeout(), None);

    // Lost again, and back within the delay: nothing timed is left.
    h.connect_with(3, c.clone(), 100);
    h.run(Input::Lost { conn: 3 });
    assert!(h.broker.poll_timeout().is_some());
    h.now += secs(5);
    h.connect_with(4, c, 100);
    assert_eq!(h.broker.poll_timeout(), None);
    assert_eq!(h.broker.timers.len(), 0);
}

#[test]
fn a_paused_publisher_is_not_timed_out_and_counts_again_from_its_resume() {
    let config = BrokerConfig {
        max_inflight_messages: 1,
        max_queued_bytes_per_session: 30,
        ..quiet()
    };
    let mut h = Harness::new(config);
    let start = h.now;
    h.connect_with(1, no_keepalive("slow"), 100);
    h.packet(1, subscribe("t", QoS::AtLeastOnce));
    h.connect_with(2, with_keepalive(ProtocolVersion::V311, "fast", 10), 100);
    // Each message costs 10 bytes: three fit, the fourth pauses the publisher.
    let mut paused = false;
    for n in 1..=4u16 {
        let a = h.packet(
            2,
            publish("t", &format!("payload-{n}"), QoS::AtLeastOnce, n),
        );
        paused |= a.contains(&Action::PauseReads(2));
    }
    assert!(paused);
    // Its reads are paused, so it cannot be heard: its deadline passes without a close.
    assert_eq!(h.timeout_at(start + secs(15)), []);
    assert_eq!(h.broker.poll_timeout(), Some(start + secs(30)));
    // Room is made at 20 s: it resumes, and its keep alive counts from then.
    h.now = start + secs(20);
    let a = h.packet(1, Packet::PubAck(PubResponse::new(id(1))));
    assert!(a.contains(&Action::ResumeReads(2)), "{a:?}");
    assert_eq!(h.timeout_at(start + secs(30)), [], "heard from at 20 s");
    assert_eq!(h.broker.poll_timeout(), Some(start + secs(35)));
    assert_eq!(h.timeout_at(start + secs(35)), [Action::Close(2)]);
}

#[test]
fn sys_is_due_at_the_first_input_then_every_interval() {
    let mut h = Harness::new(BrokerConfig::default());
    assert_eq!(h.broker.poll_timeout(), None, "no input yet: no clock");
    let start = h.now;
    h.connect_with(1, no_keepalive("ops"), 100);
    h.packet(1, subscribe("$SYS/broker/uptime", QoS::AtMostOnce));
    assert_eq!(
        h.broker.poll_timeout(),
        Some(start),
        "the first is due at once"
    );
    let a = h.timeout_at(start);
    assert_eq!(&publishes(&a, 1)[0].payload[..], b"0 seconds");
    assert_eq!(h.broker.poll_timeout(), Some(start + secs(10)));
    let a = h.timeout_at(start + secs(10));
    assert_eq!(&publishes(&a, 1)[0].payload[..], b"10 seconds");
}

#[test]
fn restored_sessions_expire_on_a_deadline_from_the_start() {
    let mut h = Harness::new(quiet());
    let start = h.now;
    let stored = |client_id: &str, expiry_secs| StoredSession {
        client_id: client_id.into(),
        username: None,
        expiry_secs,
        subscriptions: Vec::new(),
        queue: Vec::new(),
        awaiting_pubrel: Vec::new(),
    };
    h.broker.restore(
        Snapshot {
            sessions: vec![stored("forever", u32::MAX), stored("brief", 60)],
            ..Snapshot::default()
        },
        start,
    );
    assert_eq!(h.broker.poll_timeout(), Some(start + secs(60)));
    h.timeout_at(start + secs(60));
    assert_eq!(h.broker.stats().sessions, 1, "the one that never expires");
    assert_eq!(h.broker.poll_timeout(), None);
}

#[test]
fn after_a_timeout_the_next_deadline_is_later() {
    // What the router relies on not to spin: handling what is due never leaves a deadline
    // at or before `now`.
    let mut h = Harness::new(BrokerConfig::default());
    let start = h.now;
    for n in 0..20u64 {
        let mut c = with_keepalive(ProtocolVersion::V5, &format!("c{n}"), 1 + n as u16);
        c.clean_start = false;
        c.properties.session_expiry_interval_secs = Some(n as u32);
        h.connect_with(n, c, 100);
    }
    let mut at = start;
    let mut rounds = 0;
    while let Some(next) = h.broker.poll_timeout() {
        assert!(next >= at);
        at = next;
        h.timeout_at(at);
        assert!(h.broker.poll_timeout().is_none_or(|n| n > at));
        rounds += 1;
        if h.broker.stats().sessions == 0 || rounds == 1000 {
            break;
        }
    }
    assert_eq!(
        h.broker.stats().sessions,
        0,
        "every client timed out, every session expired"
    );
    assert!(rounds > 20, "{rounds}");
    // Only `$SYS` is left.
    assert_eq!(h.broker.timers.len(), 1);
}
