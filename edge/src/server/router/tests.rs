//! The router on a thread of its own, as in the server, against a store the test controls:
//! it sees every commit and, once gated, decides when (and whether) each one succeeds. No
//! sockets and no sleeps: the router is known to be inside a commit while the test holds
//! it, and every wait is for something the router must do (with a deadline only so that a
//! broken router fails the test instead of hanging it).

use std::sync::atomic::AtomicBool;
use std::sync::mpsc as std_mpsc;
use std::thread::JoinHandle;

use bytes::Bytes;
use ferry_protocol::mqtt::{
    Connect, Properties, ProtocolVersion, PubResponse, Publish, QoS, Subscribe, Subscription,
    SubscriptionOptions,
};
use ferry_protocol::topic::{TopicFilter, TopicName};
use tokio::sync::{oneshot, Notify};

use super::*;
use crate::broker::{BrokerConfig, StoreOp};
use crate::outbox::OutboxOp;
use crate::outbox_source::Downlink;
use crate::store::Committed;

/// How long a test waits for something the router must do before it fails. Never reached
/// when the router works; it only turns a hang into a failure.
const PATIENCE: Duration = Duration::from_secs(30);

/// A store whose commits the test sees (each one's operations) and, while gated, decides:
/// a gated commit waits for the test's verdict, Ok or the error to fail with.
struct TestStore {
    commits: std_mpsc::Sender<Vec<StoreOp>>,
    gated: Arc<AtomicBool>,
    verdicts: std_mpsc::Receiver<Result<(), StoreError>>,
}

impl CommitStore for TestStore {
    fn apply(&self, ops: &[StoreOp]) -> Result<Committed, StoreError> {
        let _ = self.commits.send(ops.to_vec());
        if self.gated.load(Ordering::SeqCst) {
            match self.verdicts.recv() {
                Ok(verdict) => verdict?,
                Err(_) => return Err(StoreError::Log("the test has gone".into())),
            }
        }
        Ok(Committed::default())
    }
}

/// A running router with its store under the test's control.
struct Rig {
    to_router: mpsc::Sender<ToRouter>,
    downlink: mpsc::Sender<Downlink>,
    commits: std_mpsc::Receiver<Vec<StoreOp>>,
    verdicts: std_mpsc::Sender<Result<(), StoreError>>,
    gated: Arc<AtomicBool>,
    router: Option<JoinHandle<Result<(), StoreError>>>,
    /// For the test thread's waits on wires.
    runtime: tokio::runtime::Runtime,
    /// The lanes nobody writes to in these tests, kept open as in the server.
    _credit: mpsc::Sender<(ConnId, usize)>,
    _acks: mpsc::Sender<(ConnId, Packet)>,
    _outbox_acks: mpsc::Sender<(u8, u64)>,
}

impl Rig {
    /// An edge broker (no `$SYS`; `up/#` goes to the outbox, so that every QoS 1 publish on
    /// it is a store operation) behind a router whose store lets every commit through until
    /// [`Rig::gate`].
    fn start() -> Self {
        Self::start_with(BrokerConfig::default())
    }

    /// As [`Rig::start`], with the broker's limits of `config` (and no `$SYS`).
    fn start_with(config: BrokerConfig) -> Self {
        let mut broker = Broker::new(BrokerConfig {
            sys_interval_secs: 0,
            ..config
        });
        let uplink: crate::uplink::UplinkConfig =
            toml::from_str("[[route]]\nfilter = \"up/#\"\n").expect("parses");
        broker.set_outbox(crate::outbox::OutboxBudget::new(
            crate::uplink::UplinkRules::new(&uplink).expect("valid"),
        ));
        let (commits_tx, commits) = std_mpsc::channel();
        let (verdicts, verdicts_rx) = std_mpsc::channel();
        let gated = Arc::new(AtomicBool::new(false));
        let store = TestStore {
            commits: commits_tx,
            gated: gated.clone(),
            verdicts: verdicts_rx,
        };
        let (to_router, rx) = mpsc::channel(64);
        let (credit_tx, credit) = mpsc::channel(16);
        let (acks_tx, acks) = mpsc::channel(16);
        let (outbox_acks_tx, outbox_acks) = mpsc::channel(16);
        let (downlink_tx, downlink) = mpsc::channel(16);
        let lanes = Lanes {
            credit,
            acks,
            cloud: CloudLanes::new(outbox_acks, Arc::new(Notify::new()), downlink),
        };
        let router = std::thread::spawn(move || router(broker, store, None, rx, lanes));
        Self {
            to_router,
            downlink: downlink_tx,
            commits,
            verdicts,
            gated,
            router: Some(router),
            runtime: tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .build()
                .expect("a runtime"),
            _credit: credit_tx,
            _acks: acks_tx,
            _outbox_acks: outbox_acks_tx,
        }
    }

    fn send(&self, msg: ToRouter) {
        assert!(
            self.to_router.blocking_send(msg).is_ok(),
            "the router stopped"
        );
    }

    /// Registers a connection and sends its CONNECT (3.1.1, no keep alive, a session that
    /// ends with it); returns its wire once the CONNACK is on it.
    fn connect(&self, conn: ConnId, client_id: &str) -> Arc<Wire> {
        let wire = Wire::new();
        self.send(ToRouter::Register {
            conn,
            wire: wire.clone(),
        });
        self.send(connect(conn, client_id, ProtocolVersion::V311, 0));
        self.wait_for(&wire, "CONNACK", |sent, _| {
            sent.iter().any(|p| matches!(p, Packet::ConnAck(_)))
        });
        wire
    }

    /// As [`Rig::connect`], for a session that outlives its connection (3.1.1, clean session
    /// off): what is queued for it is stored.
    fn connect_persistent(&self, conn: ConnId, client_id: &str) -> Arc<Wire> {
        let wire = Wire::new();
        self.send(ToRouter::Register {
            conn,
            wire: wire.clone(),
        });
        let mut c = Connect::new(ProtocolVersion::V311, client_id);
        c.clean_start = false;
        self.send(ToRouter::Input(Input::Connect {
            conn,
            connect: Box::new(c),
            credit: 100,
            identity_verified: false,
        }));
        self.wait_for(&wire, "CONNACK", |sent, _| {
            sent.iter().any(|p| matches!(p, Packet::ConnAck(_)))
        });
        wire
    }

    /// From now on every commit waits for [`Rig::decide`]. Called while the router is idle
    /// (what the test sent has been answered), so no commit is half-way.
    fn gate(&self) {
        while self.commits.try_recv().is_ok() {}
        self.gated.store(true, Ordering::SeqCst);
    }

    /// The operations of the router's next commit; while gated, the router is inside it
    /// until [`Rig::decide`].
    fn next_commit(&self) -> Vec<StoreOp> {
        self.commits
            .recv_timeout(PATIENCE)
            .expect("the router commits")
    }

    /// Ends the gated commit the router is in: Ok, or failed with `verdict`'s error.
    fn decide(&self, verdict: Result<(), StoreError>) {
        self.verdicts.send(verdict).expect("the store is there");
    }

    /// Waits until what the router queued on `wire` (and whether it closed it) satisfies
    /// `done`; what was queued.
    fn wait_for(
        &self,
        wire: &Wire,
        what: &str,
        done: impl Fn(&[Packet], bool) -> bool,
    ) -> Vec<Packet> {
        self.runtime.block_on(async {
            loop {
                let (sent, closed) = wire.queued();
                if done(&sent, closed) {
                    return sent;
                }
                let changed = tokio::time::timeout(PATIENCE, wire.changed()).await;
                assert!(changed.is_ok(), "waited in vain for {what}: {sent:?}");
            }
        })
    }

    /// The broker's counters and the router's commit figures.
    fn stats(&self) -> (Stats, CommitStats) {
        let (tx, rx) = oneshot::channel();
        self.send(ToRouter::Stats(tx));
        rx.blocking_recv().expect("the router answers")
    }

    /// Waits for the router thread to end; what it returned.
    fn join(&mut self) -> Result<(), StoreError> {
        self.router
            .take()
            .expect("joined once")
            .join()
            .expect("the router does not panic")
    }
}

fn connect(conn: ConnId, client_id: &str, version: ProtocolVersion, keep_alive: u16) -> ToRouter {
    let mut c = Connect::new(version, client_id);
    c.clean_start = true;
    c.keep_alive_secs = keep_alive;
    ToRouter::Input(Input::Connect {
        conn,
        connect: Box::new(c),
        credit: 100,
        identity_verified: false,
    })
}

fn packet(conn: ConnId, packet: Packet) -> ToRouter {
    ToRouter::Input(Input::Packet { conn, packet })
}

fn topic(s: &str) -> TopicName {
    TopicName::new(s).expect("valid")
}

/// A QoS 1 PUBLISH for the outbox.
fn publish(id: u16) -> Packet {
    let mut p = Publish::new(topic("up/t"), Bytes::from(format!("m{id}")));
    p.qos = QoS::AtLeastOnce;
    p.packet_id = Some(std::num::NonZeroU16::new(id).expect("non-zero"));
    Packet::Publish(p)
}

fn subscribe(filter: &str) -> Packet {
    subscribe_at(filter, QoS::AtMostOnce)
}

fn subscribe_at(filter: &str, qos: QoS) -> Packet {
    Packet::Subscribe(Subscribe {
        packet_id: std::num::NonZeroU16::MIN,
        properties: Properties::default(),
        subscriptions: vec![Subscription {
            filter: TopicFilter::new(filter).expect("valid"),
            options: SubscriptionOptions::new(qos),
        }],
    })
}

/// A QoS 1 downlink message on `cmd/valve`: 13 bytes of a subscriber's queue.
fn command(payload: &'static str) -> Arc<Message> {
    Arc::new(Message {
        topic: topic("cmd/valve"),
        payload: Bytes::from_static(payload.as_bytes()),
        qos: QoS::AtLeastOnce,
        retain: false,
        properties: Properties::default(),
        expires_at: None,
        publisher: None,
        position: None,
    })
}

/// A downlink batch of [`command`]s with their sequences, up to `seq`.
fn commands(messages: &[(u64, &'static str)], seq: u64, done: oneshot::Sender<()>) -> Downlink {
    Downlink {
        messages: messages.iter().map(|&(s, p)| (s, command(p))).collect(),
        seq,
        done,
    }
}

/// The payloads a commit queues for subscribers (newly queued, not yet sent).
fn queued(ops: &[StoreOp]) -> Vec<String> {
    ops.iter()
        .filter_map(|op| match op {
            StoreOp::QueuePut {
                delivery,
                state: crate::broker::QueueState::Queued,
                ..
            } => Some(String::from_utf8_lossy(&delivery.msg.payload).into_owned()),
            _ => None,
        })
        .collect()
}

/// Whether a commit records the downlink applied up to `seq`.
fn applies(ops: &[StoreOp], seq: u64) -> bool {
    ops.iter()
        .any(|op| matches!(op, StoreOp::Outbox(OutboxOp::DownlinkApplied { seq: s }) if *s == seq))
}

/// The packet ids of the PUBLISHes among `sent`, in order.
fn publish_ids(sent: &[Packet]) -> Vec<std::num::NonZeroU16> {
    sent.iter()
        .filter_map(|p| match p {
            Packet::Publish(p) => p.packet_id,
            _ => None,
        })
        .collect()
}

/// The packet ids of the PUBACKs among `sent`, in order.
fn pubacks(sent: &[Packet]) -> Vec<u16> {
    sent.iter()
        .filter_map(|p| match p {
            Packet::PubAck(r) => Some(r.packet_id.get()),
            _ => None,
        })
        .collect()
}

fn publishes(sent: &[Packet]) -> usize {
    sent.iter()
        .filter(|p| matches!(p, Packet::Publish(_)))
        .count()
}

/// The outbox sequence numbers a commit puts.
fn outbox_puts(ops: &[StoreOp]) -> Vec<u64> {
    ops.iter()
        .filter_map(|op| match op {
            StoreOp::Outbox(OutboxOp::Put { seq, .. }) => Some(*seq),
            _ => None,
        })
        .collect()
}

fn disk_full() -> StoreError {
    StoreError::Db(redb::Error::from(std::io::Error::other(
        "no space left on device",
    )))
}

#[test]
fn a_failed_commit_sends_nothing_of_its_batch_and_stops_the_router() {
    let mut rig = Rig::start();
    let publisher = rig.connect(1, "sensor");
    let subscriber = rig.connect(2, "app");
    rig.send(packet(2, subscribe("up/#")));
    rig.wait_for(&subscriber, "SUBACK", |sent, _| {
        sent.iter().any(|p| matches!(p, Packet::SubAck(_)))
    });
    rig.gate();

    rig.send(packet(1, publish(7)));
    let ops = rig.next_commit();
    assert_eq!(outbox_puts(&ops), [1], "{ops:?}");
    rig.decide(Err(disk_full()));

    // The router ends with the store's error (the server logs it and reports the broker
    // failed)...
    let ended = rig.join();
    assert!(
        matches!(&ended, Err(e @ StoreError::Db(_)) if e.to_string().contains("no space left")),
        "{ended:?}"
    );
    // ...having sent nothing of the failed batch: no PUBACK for what it could not keep,
    // and no delivery of it either.
    let (sent, _) = publisher.queued();
    assert!(
        matches!(&sent[..], [Packet::ConnAck(_)]),
        "only the CONNACK: {sent:?}"
    );
    let (sent, _) = subscriber.queued();
    assert_eq!(publishes(&sent), 0, "{sent:?}");
    // And it takes no more input: connections see it gone.
    assert!(rig.to_router.blocking_send(packet(1, publish(8))).is_err());
}

#[test]
fn publishes_that_arrive_during_a_slow_commit_share_the_next_one_and_are_acked_after_it() {
    let mut rig = Rig::start();
    let publisher = rig.connect(1, "sensor");
    rig.gate();

    rig.send(packet(1, publish(1)));
    assert_eq!(outbox_puts(&rig.next_commit()), [1]);
    // The router is writing the first; four more publishes arrive meanwhile.
    for id in 2..=5 {
        rig.send(packet(1, publish(id)));
    }
    assert_eq!(
        pubacks(&publisher.queued().0),
        [0u16; 0],
        "none before its commit"
    );
    rig.decide(Ok(()));

    // The four that waited go in one commit...
    let ops = rig.next_commit();
    assert_eq!(outbox_puts(&ops), [2, 3, 4, 5], "{ops:?}");
    // ...which the router is inside now: the first's PUBACK is out, theirs are not.
    assert_eq!(pubacks(&publisher.queued().0), [1]);
    rig.decide(Ok(()));
    let sent = rig.wait_for(&publisher, "PUBACKs 2 to 5", |sent, _| {
        pubacks(sent).len() == 5
    });
    assert_eq!(
        pubacks(&sent),
        [1, 2, 3, 4, 5],
        "in the order of the publishes"
    );

    // Five publishes, two commits (and one before them for the CONNECT).
    let (stats, commits) = rig.stats();
    assert_eq!(stats.received_by_qos[1], 5);
    assert_eq!(commits.commits, 3);
    rig.send(ToRouter::Stop);
    assert!(rig.join().is_ok());
}

#[test]
fn stop_commits_and_acknowledges_what_came_before_it_then_closes_every_connection() {
    let mut rig = Rig::start();
    let publisher = rig.connect(1, "sensor");
    let idle = rig.connect(2, "idle");
    rig.gate();

    rig.send(packet(1, publish(1)));
    rig.next_commit();
    rig.send(packet(1, publish(2)));
    rig.send(ToRouter::Stop);
    rig.decide(Ok(()));
    // The publish taken before Stop is committed before the router ends...
    assert_eq!(outbox_puts(&rig.next_commit()), [2]);
    assert!(!publisher.queued().1, "nothing closed before that commit");
    rig.decide(Ok(()));
    assert!(rig.join().is_ok(), "a stop is no failure");
    // ...and acknowledged, and then every connection's writer is closed.
    let (sent, closed) = publisher.queued();
    assert_eq!(pubacks(&sent), [1, 2]);
    assert!(closed);
    assert!(idle.queued().1, "an idle connection is closed too");
}

#[test]
fn a_downlink_batch_is_reported_applied_only_after_its_commit() {
    let mut rig = Rig::start();
    let app = rig.connect(2, "app");
    rig.send(packet(2, subscribe("cmd/#")));
    rig.wait_for(&app, "SUBACK", |sent, _| {
        sent.iter().any(|p| matches!(p, Packet::SubAck(_)))
    });
    rig.gate();

    let msg = Arc::new(Message {
        topic: topic("cmd/valve"),
        payload: Bytes::from_static(b"open"),
        qos: QoS::AtLeastOnce,
        retain: false,
        properties: Properties::default(),
        expires_at: None,
        publisher: None,
        position: None,
    });
    let (done, mut applied) = oneshot::channel();
    let down = Downlink {
        messages: vec![(42, msg)],
        seq: 42,
        done,
    };
    assert!(rig.downlink.blocking_send(down).is_ok());
    let ops = rig.next_commit();
    assert!(
        ops.iter()
            .any(|op| matches!(op, StoreOp::Outbox(OutboxOp::DownlinkApplied { seq: 42 }))),
        "the applied sequence is in the commit: {ops:?}"
    );
    // Inside the commit: the link is not told yet (it would let the cloud forget the
    // message), and the subscriber has not got it yet.
    assert_eq!(applied.try_recv(), Err(oneshot::error::TryRecvError::Empty));
    assert_eq!(publishes(&app.queued().0), 0);
    rig.decide(Ok(()));
    let told = rig
        .runtime
        .block_on(async { tokio::time::timeout(PATIENCE, applied).await });
    assert!(matches!(told, Ok(Ok(()))), "{told:?}");
    rig.wait_for(&app, "the downlink message", |sent, _| publishes(sent) == 1);
    rig.send(ToRouter::Stop);
    assert!(rig.join().is_ok());
}

#[test]
fn a_downlink_sequence_is_applied_only_once_every_message_up_to_it_is_routed() {
    // A subscriber with room for one command (13 bytes) in its queue.
    let mut rig = Rig::start_with(BrokerConfig {
        max_queued_bytes_per_session: 20,
        ..BrokerConfig::default()
    });
    let app = rig.connect_persistent(2, "app");
    rig.send(packet(2, subscribe_at("cmd/#", QoS::AtLeastOnce)));
    rig.wait_for(&app, "SUBACK", |sent, _| {
        sent.iter().any(|p| matches!(p, Packet::SubAck(_)))
    });
    rig.gate();

    let (done, mut applied) = oneshot::channel();
    assert!(rig
        .downlink
        .blocking_send(commands(&[(41, "open"), (42, "shut")], 42, done))
        .is_ok());
    // The first is routed (stored in the persistent session's queue, in this commit); the
    // second finds no room and is held, in memory only: 42 is not applied yet, or a crash
    // now would lose "shut" although the cloud was told the edge has it.
    let ops = rig.next_commit();
    assert_eq!(queued(&ops), ["open"], "{ops:?}");
    assert!(
        !applies(&ops, 42),
        "applied while a message is held: {ops:?}"
    );
    rig.decide(Ok(()));
    let sent = rig.wait_for(&app, "the first command", |sent, _| publishes(sent) == 1);
    assert_eq!(applied.try_recv(), Err(oneshot::error::TryRecvError::Empty));

    // Its acknowledgement makes room: the second is routed, and 42 applied in that commit.
    let first = publish_ids(&sent)[0];
    rig.send(packet(2, Packet::PubAck(PubResponse::new(first))));
    let ops = rig.next_commit();
    assert_eq!(queued(&ops), ["shut"], "{ops:?}");
    assert!(applies(&ops, 42), "{ops:?}");
    assert_eq!(
        applied.try_recv(),
        Err(oneshot::error::TryRecvError::Empty),
        "not before the commit"
    );
    rig.decide(Ok(()));
    let told = rig
        .runtime
        .block_on(async { tokio::time::timeout(PATIENCE, applied).await });
    assert!(matches!(told, Ok(Ok(()))), "{told:?}");
    rig.wait_for(&app, "the second command", |sent, _| publishes(sent) == 2);
    rig.send(ToRouter::Stop);
    assert!(rig.join().is_ok());
}

#[test]
fn a_resend_of_downlink_messages_the_router_still_holds_is_not_published_twice() {
    let mut rig = Rig::start_with(BrokerConfig {
        max_queued_bytes_per_session: 20,
        ..BrokerConfig::default()
    });
    let app = rig.connect_persistent(2, "app");
    rig.send(packet(2, subscribe_at("cmd/#", QoS::AtLeastOnce)));
    rig.wait_for(&app, "SUBACK", |sent, _| {
        sent.iter().any(|p| matches!(p, Packet::SubAck(_)))
    });
    rig.gate();
    let (done, _gone) = oneshot::channel();
    assert!(rig
        .downlink
        .blocking_send(commands(&[(41, "open"), (42, "shut")], 42, done))
        .is_ok());
    assert_eq!(queued(&rig.next_commit()), ["open"]);
    rig.decide(Ok(()));
    let sent = rig.wait_for(&app, "the first command", |sent, _| publishes(sent) == 1);
    // The link went while "shut" waited (its wait for 42 dropped); the next link resumes
    // from what is durable and gets both again from the cloud.
    let (done, applied) = oneshot::channel();
    assert!(rig
        .downlink
        .blocking_send(commands(&[(41, "open"), (42, "shut")], 42, done))
        .is_ok());
    // Room for "shut" only when "open" is acknowledged; the resend adds nothing.
    rig.send(packet(
        2,
        Packet::PubAck(PubResponse::new(publish_ids(&sent)[0])),
    ));
    let ops = rig.next_commit();
    assert_eq!(queued(&ops), ["shut"], "{ops:?}");
    assert!(applies(&ops, 42), "{ops:?}");
    rig.decide(Ok(()));
    let told = rig
        .runtime
        .block_on(async { tokio::time::timeout(PATIENCE, applied).await });
    assert!(
        matches!(told, Ok(Ok(()))),
        "the resend is answered: {told:?}"
    );
    let sent = rig.wait_for(&app, "the second command", |sent, _| publishes(sent) == 2);
    rig.send(packet(
        2,
        Packet::PubAck(PubResponse::new(publish_ids(&sent)[1])),
    ));
    let ops = rig.next_commit();
    assert!(queued(&ops).is_empty(), "nothing again: {ops:?}");
    rig.decide(Ok(()));
    let _ = rig.stats();
    assert_eq!(publishes(&app.queued().0), 2, "each command once");
    rig.send(ToRouter::Stop);
    assert!(rig.join().is_ok());
}

#[test]
fn a_connection_gone_in_the_batch_that_answered_it_still_gets_that_answer_then_is_closed() {
    let mut rig = Rig::start();
    rig.connect(1, "sensor");
    rig.gate();
    // Hold the router in a commit, so that what follows arrives as one batch.
    rig.send(packet(1, publish(1)));
    rig.next_commit();
    let wire = Wire::new();
    rig.send(ToRouter::Register {
        conn: 3,
        wire: wire.clone(),
    });
    rig.send(connect(3, "brief", ProtocolVersion::V311, 0));
    rig.send(ToRouter::Input(Input::Lost { conn: 3 }));
    rig.decide(Ok(()));
    // The CONNECT's session change is committed with the batch; nothing is sent before.
    let ops = rig.next_commit();
    assert!(
        matches!(&ops[..], [StoreOp::SessionDelete { client_id }] if &**client_id == "brief"),
        "{ops:?}"
    );
    assert_eq!(wire.queued(), (Vec::new(), false));
    rig.decide(Ok(()));
    // Its CONNACK reaches the writer, and only then is the writer closed.
    let sent = rig.wait_for(&wire, "the close", |_, closed| closed);
    assert!(matches!(&sent[..], [Packet::ConnAck(_)]), "{sent:?}");
    rig.send(ToRouter::Stop);
    assert!(rig.join().is_ok());
}

#[test]
fn the_router_wakes_for_the_brokers_deadline_without_any_input() {
    // A v5 client with a keep alive of 1 s that then says nothing: no tick, no other input,
    // and still the router closes it (at 1.5 s, the broker's deadline).
    let mut rig = Rig::start();
    let wire = Wire::new();
    rig.send(ToRouter::Register {
        conn: 1,
        wire: wire.clone(),
    });
    rig.send(connect(1, "quiet", ProtocolVersion::V5, 1));
    let sent = rig.wait_for(&wire, "the keep alive close", |_, closed| closed);
    assert!(matches!(&sent[..], [Packet::ConnAck(_)]), "{sent:?}");
    let (stats, _) = rig.stats();
    assert_eq!(stats.connections, 0);
    rig.send(ToRouter::Stop);
    assert!(rig.join().is_ok());
}
