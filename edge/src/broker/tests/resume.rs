//! Sessions that move between the nodes of a cluster (`resume`): a CONNECT parked while
//! the cluster is asked, a session installed from its record, the log read again for it.

use super::*;

/// A node of a cluster: log mode, sessions reported and fetched.
fn node() -> Harness {
    let mut h = Harness::new(BrokerConfig {
        sys_interval_secs: 0,
        ..BrokerConfig::default()
    });
    h.broker.use_log();
    h.broker.report_sessions();
    h.broker.fetch_sessions();
    h
}

fn at(offset: i64) -> LogPosition {
    LogPosition {
        stream: "mqtt".into(),
        partition: 0,
        offset,
    }
}

/// A QoS 1 message read back from the log at `offset`.
fn logged(t: &str, offset: i64) -> Arc<Message> {
    Arc::new(Message {
        topic: topic(t),
        payload: Bytes::from(format!("m{offset}")),
        qos: QoS::AtLeastOnce,
        retain: false,
        properties: Properties::default(),
        expires_at: None,
        publisher: None,
        position: Some(at(offset)),
    })
}

fn resuming(client_id: &str) -> Connect {
    let mut c = Connect::new(ProtocolVersion::V5, client_id);
    c.clean_start = false;
    c.properties.session_expiry_interval_secs = Some(3600);
    c
}

fn connack(actions: &[Action], conn: ConnId) -> Option<ConnAck> {
    actions.iter().find_map(|a| match a {
        Action::Send(c, Packet::ConnAck(ack)) if *c == conn => Some(ack.clone()),
        _ => None,
    })
}

#[test]
fn a_session_moves_to_another_node_with_its_subscriptions_its_packet_ids_and_the_log_since() {
    // Node A: the client's first connection waits for the cluster, which has nothing.
    let mut a = node();
    let actions = a.connect_with(1, resuming("dev"), 100);
    assert_eq!(
        actions,
        [Action::FetchSession {
            conn: 1,
            client_id: "dev".into()
        }]
    );
    let actions = a.run(Input::Fetched {
        conn: 1,
        session: Ok(None),
    });
    assert!(!connack(&actions, 1).expect("answered").session_present);
    a.packet(1, subscribe("cmd/#", QoS::AtLeastOnce));
    let sent: Vec<Publish> = [10, 11, 12]
        .into_iter()
        .flat_map(|o| publishes(&a.run(Input::Deliver(logged(&format!("cmd/{o}"), o))), 1))
        .collect();
    assert_eq!(sent.len(), 3);
    a.packet(
        1,
        Packet::PubAck(PubResponse::new(sent[0].packet_id.expect("valid"))),
    );
    a.run(Input::Lost { conn: 1 });
    a.run(Input::Deliver(logged("cmd/13", 13)));
    let states = a.broker.session_states(&["dev".into(), "gone".into()]);
    let [SessionCheckpoint::Held(state), SessionCheckpoint::Gone(gone)] = &states[..] else {
        panic!("one session held, one not: {states:?}");
    };
    assert_eq!(&**gone, "gone");
    assert_eq!(
        state.inflight,
        [
            (sent[1].packet_id.expect("valid"), false, at(11)),
            (sent[2].packet_id.expect("valid"), false, at(12))
        ],
        "what was sent and not acknowledged, by packet id and position"
    );
    assert_eq!(state.positions, [at(11)], "the oldest message it holds");
    assert_eq!(state.subscriptions.len(), 1);
    assert_eq!(state.expiry_secs, 3600);

    // Node B (A is gone): the client comes back there and sends a PINGREQ at once.
    let mut b = node();
    let actions = b.connect_with(7, resuming("dev"), 100);
    assert!(matches!(
        &actions[..],
        [Action::FetchSession { conn: 7, .. }]
    ));
    assert!(
        b.packet(7, Packet::PingReq).is_empty(),
        "kept for after CONNACK"
    );
    let actions = b.run(Input::Fetched {
        conn: 7,
        session: Ok(Some(state.clone())),
    });
    let [Action::Replay {
        client_id,
        from,
        filters,
    }] = &actions[..]
    else {
        panic!("the log is read again before CONNACK: {actions:?}");
    };
    assert_eq!((&**client_id, &from[..]), ("dev", &[at(11)][..]));
    assert_eq!(filters[0].as_str(), "cmd/#");
    // What B's log delivers meanwhile waits aside.
    for o in [13, 14] {
        assert!(b
            .run(Input::Deliver(logged(&format!("cmd/{o}"), o)))
            .is_empty());
    }
    // The replay read 11..14; 13 came both ways and goes once.
    let actions = b.run(Input::Replayed {
        client_id: "dev".into(),
        messages: [11, 12, 13]
            .into_iter()
            .map(|o| logged(&format!("cmd/{o}"), o))
            .collect(),
        until: vec![at(14)],
    });
    assert!(connack(&actions, 7).expect("answered").session_present);
    let got: Vec<(String, Option<ferry_protocol::mqtt::PacketId>, bool)> = publishes(&actions, 7)
        .into_iter()
        .map(|p| (p.topic.to_string(), p.packet_id, p.dup))
        .collect();
    assert_eq!(
        got[..2],
        [
            ("cmd/11".to_owned(), sent[1].packet_id, true),
            ("cmd/12".to_owned(), sent[2].packet_id, true)
        ],
        "in flight again under the same packet ids, with DUP"
    );
    let rest: Vec<&str> = got[2..]
        .iter()
        .map(|(t, _, dup)| {
            assert!(!dup);
            t.as_str()
        })
        .collect();
    assert_eq!(
        rest,
        ["cmd/13", "cmd/14"],
        "then the rest, in log order, once"
    );
    let ping = actions
        .iter()
        .position(|a| *a == Action::Send(7, Packet::PingResp));
    let ack = actions
        .iter()
        .position(|a| matches!(a, Action::Send(7, Packet::ConnAck(_))));
    assert!(
        ping > ack,
        "the PINGREQ kept is answered after CONNACK: {actions:?}"
    );
}

#[test]
fn a_parked_connect_is_refused_if_the_cluster_cannot_answer_and_forgotten_if_the_client_goes() {
    let mut h = node();
    h.connect_with(1, resuming("dev"), 100);
    let actions = h.run(Input::Fetched {
        conn: 1,
        session: Err(()),
    });
    assert_eq!(
        connack(&actions, 1).map(|a| a.code),
        Some(ReasonCode::ServerUnavailable)
    );
    assert!(actions.contains(&Action::Close(1)));

    h.connect_with(2, resuming("dev"), 100);
    h.run(Input::Lost { conn: 2 });
    let actions = h.run(Input::Fetched {
        conn: 2,
        session: Ok(None),
    });
    assert!(
        actions.is_empty(),
        "nothing for a connection gone: {actions:?}"
    );

    // Clean Start 1 needs no one else, nor a session held here (a clean one, which ends
    // as its connection is taken over).
    assert!(!h.connect(3, "other").session_present);
    let actions = h.connect_with(4, resuming("other"), 100);
    assert!(
        connack(&actions, 4).is_some(),
        "answered at once: {actions:?}"
    );
    assert!(!actions
        .iter()
        .any(|a| matches!(a, Action::FetchSession { .. })));
}
