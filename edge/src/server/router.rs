//! The router thread: it owns the [`Broker`], applies every input in order, in batches,
//! commits each batch's durable changes in one storage transaction (and in log mode appends
//! what it accepted) before it sends the batch's packets (group commit).
//!
//! It has no periodic tick: it waits for input or for the broker's next deadline
//! ([`Broker::poll_timeout`]: keep alive, wills, session expiry, `$SYS`), whichever comes
//! first, and after each batch hands the broker [`Input::Timeout`] if that deadline has
//! passed, so that a busy router still acts on time and an idle one sleeps.
//!
//! On the edge (feature `edge`) the link has lanes of its own into the router
//! (`cloud_lanes`: the cloud's acknowledgements of the outbox, the downlink) and a part in
//! each commit; without the feature they are a stub that never yields. The downlink's rule:
//! a downlink sequence is recorded as applied, and the link told, only in the commit that
//! routes (into the sessions' queues, durably for persistent ones) the last message up to
//! it; a message the broker holds for a subscriber without room holds its sequence back,
//! not the router nor the link.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_protocol::mqtt::Packet;
use futures_util::stream::{FuturesOrdered, FuturesUnordered, StreamExt};
use tokio::sync::mpsc;
use tracing::warn;

use super::connection::Wire;
use crate::auth::Auth;
use crate::broker::{
    Action, Broker, ClientInfo, ConnId, Input, LogPosition, Message, SessionCheckpoint,
    SessionEvent, SessionInfo, SessionState, Stats, StoreOp,
};
use crate::store::{CommitStore, StoreError};
use cloud_lanes::{CloudLanes, FromCloud};
use ferry_protocol::topic::TopicFilter;

#[cfg(feature = "edge")]
pub(super) mod cloud_lanes;

/// Inputs the router applies before it dispatches what they caused: a batch, so that one
/// storage commit can later cover many messages (group commit).
const ROUTER_BATCH: usize = 256;

/// Log mode: appends issued and not yet durable before the router waits for the oldest.
/// The log's group commit merges what is queued for a partition, so a few appends in flight
/// keep its disk busy while the router goes on delivering and sending; more would only let
/// publishers run further ahead of what is durable (each holds up to one batch's
/// acknowledgements: ROUTER_BATCH publishes).
const APPENDS_IN_FLIGHT: usize = 4;

/// Log mode, while publishers are paced: how long the router may sleep before it reads the
/// log's lag again. The lag is a counter the log's reader keeps, not an input, so without
/// this an idle router would keep publishers paused after delivery caught up. One second,
/// the period of the tick that woke the router before it slept until deadlines.
const PACE_RECHECK: Duration = Duration::from_secs(1);

/// What a node whose broker works through a log (the cloud) gives the server.
pub struct LogHooks {
    /// Appends what one router batch accepted, durably; the batch's acknowledgements wait
    /// for it (and for the appends before it), everything else of the batch goes out at
    /// once. Up to APPENDS_IN_FLIGHT run at a time, and they must complete in order. An
    /// error stops the broker, as a failed storage commit does.
    pub append: Box<dyn FnMut(Vec<Arc<Message>>) -> AppendFuture + Send>,
    /// Messages read back from the log, in log order, for delivery. The router stops taking
    /// them while a subscriber without room holds deliveries back.
    pub deliveries: mpsc::Receiver<Arc<Message>>,
    /// Called after each batch with how many deliveries were routed and made durable (for
    /// persistent sessions) in it, in the order they came: the log may move its delivery
    /// cursor past them.
    pub delivered: Box<dyn FnMut(usize) + Send>,
    /// Records in the log that the broker has not routed yet, kept up to date by the log's
    /// reader.
    pub lag: Arc<AtomicU64>,
    /// Above this `lag`, publishers are paced ([`Input::Pace`]) until it is down to half;
    /// 0: never.
    pub max_lag: u64,
    /// A node in a cluster: told after each batch, before its packets go out, where
    /// sessions connected and ended ([`Broker::report_sessions`]).
    pub sessions: Option<Box<dyn FnMut(Vec<SessionEvent>) + Send>>,
    /// Set after each batch, before its packets go out (a SUBACK among them): whether any
    /// session subscribes to anything ([`Broker::has_subscriptions`]). While it is false the
    /// log's reader may pass over what is not retained: it would be routed to no one.
    pub subscribed: Arc<AtomicBool>,
    /// A node in a cluster: how persistent sessions move between nodes (see
    /// [`ClusterSessions`]).
    pub cluster: Option<ClusterSessions>,
}

/// What a cloud node in a cluster does for sessions that move between nodes (see the
/// broker's `resume` module).
pub struct ClusterSessions {
    /// Asks the cluster for a session ([`Action::FetchSession`]); the router hands the
    /// answer to the broker as [`Input::Fetched`].
    pub fetch: Box<dyn FnMut(Arc<str>) -> SessionFuture + Send>,
    /// Reads the log for a session from positions, only what some of the filters match
    /// ([`Action::Replay`]); the answer goes to the broker as [`Input::Replayed`].
    pub replay: Box<dyn FnMut(Vec<LogPosition>, Vec<TopicFilter>) -> ReplayFuture + Send>,
    /// After a batch's deliveries were reported to [`LogHooks::delivered`], at most once
    /// every [`CHECKPOINT_INTERVAL`]: the persistent sessions that changed since, as they
    /// stand ([`Broker::session_states`]).
    pub checkpoint: Box<dyn FnMut(Vec<SessionCheckpoint>) + Send>,
}

impl std::fmt::Debug for ClusterSessions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterSessions").finish_non_exhaustive()
    }
}

/// How often, at most, [`ClusterSessions::checkpoint`] is called.
pub const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(1);

/// A pending [`ClusterSessions::fetch`].
pub type SessionFuture =
    std::pin::Pin<Box<dyn Future<Output = Result<Option<SessionState>, ()>> + Send>>;
/// A pending [`ClusterSessions::replay`]: the messages read, and per partition where the
/// read stopped.
pub type ReplayFuture =
    std::pin::Pin<Box<dyn Future<Output = (Vec<Arc<Message>>, Vec<LogPosition>)> + Send>>;
/// A fetch or replay on its way back to the broker.
type SessionInput = std::pin::Pin<Box<dyn Future<Output = Input> + Send>>;

impl std::fmt::Debug for LogHooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogHooks").finish_non_exhaustive()
    }
}

/// A pending [`LogHooks::append`].
pub type AppendFuture = std::pin::Pin<Box<dyn Future<Output = Result<(), String>> + Send>>;

/// The next delivery, or never without a log.
async fn next_delivery(log: &mut Option<LogHooks>) -> Option<Arc<Message>> {
    match log {
        Some(l) => l.deliveries.recv().await,
        None => std::future::pending().await,
    }
}

/// Messages into the router thread.
pub(super) enum ToRouter {
    Register {
        conn: ConnId,
        wire: Arc<Wire>,
    },
    SetAuth(Arc<Auth>),
    Input(Input),
    Stats(tokio::sync::oneshot::Sender<(Stats, CommitStats)>),
    Clients(tokio::sync::oneshot::Sender<Vec<ClientInfo>>),
    Sessions(tokio::sync::oneshot::Sender<Vec<SessionInfo>>),
    /// Before a shutdown: every client is told to go (see [`Input::Drain`]), after the
    /// acknowledgements it is owed; answered once that is on its way to the writers.
    Drain(Vec<String>, tokio::sync::oneshot::Sender<()>),
    /// From the link's lanes ([`CloudLanes`]): the cloud's acknowledgements of the outbox,
    /// downlink messages.
    Cloud(FromCloud),
    /// Shutdown: finish this batch and the appends in flight, send what they acknowledge,
    /// close every connection's writer, and end the router (the store closes with it).
    Stop,
}

/// Storage commits made by the router: how many and how long they took.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CommitStats {
    pub commits: u64,
    pub total: Duration,
    pub max: Duration,
}

/// The router thread: applies inputs to the broker in batches, makes the batch's durable
/// changes durable in one commit, then dispatches the batch's actions (group commit). If a
/// commit fails, nothing of the batch is sent and the router stops, returning the error;
/// the connections' inputs are refused from then on. `store` is the real [`Store`] but in
/// tests.
///
/// [`Store`]: crate::store::Store
pub(super) fn router(
    broker: Broker,
    store: impl CommitStore,
    log: Option<LogHooks>,
    rx: mpsc::Receiver<ToRouter>,
    lanes: Lanes,
) -> Result<(), StoreError> {
    // A runtime of its own, on this thread only: the router may block on a commit without
    // holding up the connections' tasks.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .map_err(StoreError::RouterStart)?;
    runtime.block_on(route_loop(broker, store, log, rx, lanes))
}

/// The router's inputs beside the main channel, served first.
pub(super) struct Lanes {
    /// Writers' credit back.
    pub(super) credit: mpsc::Receiver<(ConnId, usize)>,
    /// Subscribers' PUBACK/PUBREC/PUBCOMP.
    pub(super) acks: mpsc::Receiver<(ConnId, Packet)>,
    /// The link's (on the edge): the cloud's acknowledgements of the outbox, the downlink.
    pub(super) cloud: CloudLanes,
}

async fn route_loop(
    mut broker: Broker,
    store: impl CommitStore,
    mut log: Option<LogHooks>,
    mut rx: mpsc::Receiver<ToRouter>,
    lanes: Lanes,
) -> Result<(), StoreError> {
    let Lanes {
        mut credit,
        mut acks,
        mut cloud,
    } = lanes;
    let mut conns: HashMap<ConnId, Arc<Wire>> = HashMap::new();
    let mut actions = Vec::new();
    // Connections whose reader ended; their handles go after this batch's actions went out,
    // so that a last CONNACK or DISCONNECT still reaches the writer.
    let mut gone = Vec::new();
    let mut commits = CommitStats::default();
    let mut appending = Appending::default();
    let mut stopping = false;
    let mut pacing = false;
    let mut lag_read_at = Instant::now();
    // In a cluster: sessions fetched or replayed for the broker, and the persistent
    // sessions changed since the last checkpoint.
    let mut session_inputs: FuturesUnordered<SessionInput> = FuturesUnordered::new();
    let mut changed: Vec<Arc<str>> = Vec::new();
    let mut checkpoint_at = Instant::now();
    // Fires at the broker's next deadline (or the next read of the lag while pacing).
    let wake = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(wake);
    while !stopping {
        let wake_at = earliest(
            earliest(
                broker.poll_timeout(),
                pacing.then(|| lag_read_at + PACE_RECHECK),
            ),
            (!changed.is_empty()).then(|| checkpoint_at + CHECKPOINT_INTERVAL),
        )
        .map(tokio::time::Instant::from_std);
        if let Some(at) = wake_at.filter(|at| *at != wake.deadline()) {
            wake.as_mut().reset(at);
        }
        // A finished append first (its acknowledgements go out; polling this branch also
        // starts the appends issued since). Then credit: a subscriber's writer waiting for
        // it must not queue behind a flood of publishes. A deadline last: under load the
        // check after each batch meets it.
        let first = tokio::select! {
            biased;
            done = appending.next_done(), if appending.in_flight() > 0 => {
                done.finish(&mut broker, &mut conns, Instant::now());
                continue;
            }
            Some((conn, packets)) = credit.recv() => {
                Some(ToRouter::Input(Input::Written { conn, packets }))
            }
            Some((conn, packet)) = acks.recv() => Some(ToRouter::Input(Input::Packet { conn, packet })),
            Some(input) = cloud.next() => Some(ToRouter::Cloud(input)),
            Some(input) = session_inputs.next(), if !session_inputs.is_empty() => {
                Some(ToRouter::Input(input))
            }
            Some(msg) = next_delivery(&mut log), if broker.deliveries_held() == 0 => {
                Some(ToRouter::Input(Input::Deliver(msg)))
            }
            msg = rx.recv() => match msg {
                Some(msg) => Some(msg),
                None => break,
            },
            () = &mut wake, if wake_at.is_some() => None,
        };
        let now = Instant::now();
        if let Some(log) = log.as_ref().filter(|l| l.max_lag > 0) {
            lag_read_at = now;
            // Publishers wait while subscribers lag far behind the log (with hysteresis, so
            // that they are not paused and resumed at every batch).
            let lag = log.lag.load(Ordering::Relaxed);
            let pace = if pacing {
                lag > log.max_lag / 2
            } else {
                lag > log.max_lag
            };
            if pace != pacing {
                pacing = pace;
                broker.handle(Input::Pace(pace), now, &mut actions);
            }
        }
        let held_before = broker.deliveries_held();
        let mut draining = None;
        let mut deliveries = 0;
        let mut next = first;
        let mut n = 0;
        while let Some(msg) = next {
            match msg {
                ToRouter::Register { conn, wire } => {
                    conns.insert(conn, wire);
                }
                ToRouter::SetAuth(auth) => broker.set_auth(auth),
                ToRouter::Input(input) => {
                    deliveries += usize::from(matches!(input, Input::Deliver(_)));
                    let lost = match &input {
                        Input::Lost { conn } => Some(*conn),
                        _ => None,
                    };
                    broker.handle(input, now, &mut actions);
                    gone.extend(lost);
                }
                ToRouter::Stats(reply) => {
                    let _ = reply.send((broker.stats(), commits));
                }
                ToRouter::Clients(reply) => {
                    let _ = reply.send(broker.clients());
                }
                ToRouter::Sessions(reply) => {
                    let _ = reply.send(broker.persistent_sessions(now));
                }
                ToRouter::Cloud(input) => cloud.take(input, &mut broker, now, &mut actions),
                ToRouter::Drain(references, reply) => draining = Some((references, reply)),
                ToRouter::Stop => stopping = true,
            }
            while let Ok((conn, packets)) = credit.try_recv() {
                broker.handle(Input::Written { conn, packets }, now, &mut actions);
            }
            while let Ok((conn, packet)) = acks.try_recv() {
                broker.handle(Input::Packet { conn, packet }, now, &mut actions);
            }
            n += 1;
            next = if n < ROUTER_BATCH && !stopping {
                let delivery = log
                    .as_mut()
                    .filter(|_| broker.deliveries_held() == 0)
                    .and_then(|l| l.deliveries.try_recv().ok());
                match delivery {
                    Some(msg) => Some(ToRouter::Input(Input::Deliver(msg))),
                    None => rx.try_recv().ok(),
                }
            } else {
                None
            };
        }
        // Deadlines after the batch's inputs: a packet in this batch renews its client's
        // keep alive before that is checked.
        if broker.poll_timeout().is_some_and(|at| at <= now) {
            broker.handle(Input::Timeout, now, &mut actions);
        }
        if let Some(log) = &mut log {
            // What this batch accepted goes to the log; its acknowledgements wait for it.
            let appends = broker.take_appends();
            if !appends.is_empty() {
                appending.start((log.append)(appends));
            }
        }
        if let Some(log) = &log {
            log.subscribed
                .store(broker.has_subscriptions(), Ordering::Release);
        }
        if let Some(report) = log.as_mut().and_then(|l| l.sessions.as_mut()) {
            let events = broker.take_session_events();
            if !events.is_empty() {
                report(events);
            }
        }
        let mut ops = broker.take_store_ops();
        if log.as_ref().is_some_and(|l| l.cluster.is_some()) {
            changed.extend(ops.iter().filter_map(StoreOp::session));
        }
        cloud.before_commit(&broker, &mut ops);
        if !ops.is_empty() {
            let started = Instant::now();
            let committed = store.apply(&ops)?;
            let took = started.elapsed();
            cloud.committed(&mut broker, committed, &ops);
            commits.commits += 1;
            commits.total += took;
            commits.max = commits.max.max(took);
        }
        if let Some(log) = &mut log {
            let routed = held_before + deliveries - broker.deliveries_held();
            if routed > 0 {
                (log.delivered)(routed);
            }
            if let Some(cluster) = &mut log.cluster {
                cluster_actions(cluster, &mut actions, &mut session_inputs);
                if !changed.is_empty() && checkpoint_at.elapsed() >= CHECKPOINT_INTERVAL {
                    checkpoint_at = Instant::now();
                    changed.sort_unstable();
                    changed.dedup();
                    (cluster.checkpoint)(broker.session_states(&changed));
                    changed.clear();
                }
            }
        }
        appending.hold(&mut actions);
        if let Some((references, reply)) = draining {
            // After this batch's appends: the DISCONNECTs and closes follow every
            // acknowledgement the clients are owed.
            let mut drained = Vec::new();
            broker.handle(Input::Drain { references }, now, &mut drained);
            appending.after_held(&mut drained);
            actions.append(&mut drained);
            let _ = reply.send(());
        }
        dispatch(&mut conns, &mut actions);
        for conn in gone.drain(..) {
            // The writer sends what is still queued (a last DISCONNECT, and acknowledgements
            // still waiting for the log), then closes.
            let mut close = vec![Action::Close(conn)];
            appending.after_held(&mut close);
            dispatch(&mut conns, &mut close);
        }
        while appending.in_flight() > APPENDS_IN_FLIGHT {
            let done = appending.next_done().await;
            done.finish(&mut broker, &mut conns, Instant::now());
        }
    }
    // What was appended before the end is acknowledged (to the connections still open).
    while appending.in_flight() > 0 {
        let done = appending.next_done().await;
        done.finish(&mut broker, &mut conns, Instant::now());
    }
    for (_, wire) in conns.drain() {
        wire.close();
    }
    Ok(())
}

/// Takes the broker's requests of the cluster out of `actions` and starts them.
fn cluster_actions(
    cluster: &mut ClusterSessions,
    actions: &mut Vec<Action>,
    pending: &mut FuturesUnordered<SessionInput>,
) {
    actions.retain(|action| match action {
        Action::FetchSession { conn, client_id } => {
            let conn = *conn;
            let fetch = (cluster.fetch)(client_id.clone());
            pending.push(Box::pin(async move {
                Input::Fetched {
                    conn,
                    session: fetch.await,
                }
            }));
            false
        }
        Action::Replay {
            client_id,
            from,
            filters,
        } => {
            let client_id = client_id.clone();
            let replay = (cluster.replay)(from.clone(), filters.clone());
            pending.push(Box::pin(async move {
                let (messages, until) = replay.await;
                Input::Replayed {
                    client_id,
                    messages,
                    until,
                }
            }));
            false
        }
        _ => true,
    });
}

/// The earlier of two optional instants.
fn earliest(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Log mode: the appends issued and not yet durable, oldest first, and the
/// acknowledgements that wait for each (see [`Action::SendWhenAppended`]).
#[derive(Default)]
struct Appending {
    appends: FuturesOrdered<AppendFuture>,
    /// One entry per append in `appends`, in the same order.
    held: VecDeque<Vec<Action>>,
}

impl Appending {
    fn in_flight(&self) -> usize {
        self.held.len()
    }

    /// Issues an append (it runs when the router next polls [`Appending::next_done`]).
    fn start(&mut self, append: AppendFuture) {
        self.appends.push_back(append);
        self.held.push_back(Vec::new());
    }

    /// Takes the acknowledgements out of `actions`: they wait for the newest append in
    /// flight, and so for every one before it; with none in flight they go now.
    fn hold(&mut self, actions: &mut Vec<Action>) {
        let Some(held) = self.held.back_mut() else {
            return;
        };
        actions.retain_mut(|action| match action {
            Action::SendWhenAppended(..) => {
                held.push(std::mem::replace(action, Action::Close(0)));
                false
            }
            _ => true,
        });
    }

    /// Puts `actions` behind the acknowledgements waiting for the newest append (so that a
    /// connection is closed only after they went out); with none in flight they stay in
    /// `actions`, to go now.
    fn after_held(&mut self, actions: &mut Vec<Action>) {
        if let Some(held) = self.held.back_mut() {
            held.append(actions);
        }
    }

    /// Waits for the oldest append; what waited for it. Cancel-safe: a call dropped before
    /// the append is done leaves it where it was.
    async fn next_done(&mut self) -> Done {
        let done = self.appends.next().await;
        let held = self.held.pop_front().unwrap_or_default();
        Done {
            held,
            failed: done.and_then(Result::err),
        }
    }
}

/// An append finished: the actions that waited for it, and why it failed if it did.
struct Done {
    held: Vec<Action>,
    failed: Option<String>,
}

impl Done {
    /// Sends what waited for the append. If it failed, its acknowledgements are not sent:
    /// the broker is told ([`Input::AppendFailed`]) and answers for them; the rest goes
    /// after that.
    fn finish(self, broker: &mut Broker, conns: &mut HashMap<ConnId, Arc<Wire>>, now: Instant) {
        let Done { mut held, failed } = self;
        if let Some(why) = failed {
            let (acks, mut rest): (Vec<_>, Vec<_>) = held
                .into_iter()
                .partition(|a| matches!(a, Action::SendWhenAppended(..)));
            let acks: Vec<(ConnId, Packet)> = acks
                .into_iter()
                .filter_map(|a| match a {
                    Action::SendWhenAppended(conn, packet) => Some((conn, packet)),
                    _ => None,
                })
                .collect();
            warn!(error = %why, publishes = acks.len(), "an append to the log failed; its publishes are refused");
            let mut answers = Vec::new();
            broker.handle(Input::AppendFailed { acks }, now, &mut answers);
            dispatch(conns, &mut answers);
            dispatch(conns, &mut rest);
            return;
        }
        dispatch(conns, &mut held);
    }
}

fn dispatch(conns: &mut HashMap<ConnId, Arc<Wire>>, actions: &mut Vec<Action>) {
    for action in actions.drain(..) {
        match action {
            // (Log mode's SendWhenAppended waited in Appending and comes here as Send.)
            Action::Send(conn, packet) | Action::SendWhenAppended(conn, packet) => {
                let Some(wire) = conns.get(&conn) else {
                    continue;
                };
                if !wire.send(packet) {
                    // Its writer is full beyond the credit: a client that does not read.
                    warn!(conn, "client is not reading its acknowledgements; closing");
                    wire.abort();
                    conns.remove(&conn);
                }
            }
            Action::Close(conn) => {
                if let Some(wire) = conns.remove(&conn) {
                    wire.close();
                }
            }
            Action::PauseReads(conn) => {
                if let Some(wire) = conns.get(&conn) {
                    wire.set_paused(true);
                }
            }
            Action::ResumeReads(conn) => {
                if let Some(wire) = conns.get(&conn) {
                    wire.set_paused(false);
                }
            }
            // Taken out before (`cluster_actions`); without a cluster never asked for.
            Action::FetchSession { .. } | Action::Replay { .. } => {}
        }
    }
}

/// Without the `edge` feature no link feeds the router: its lane never yields, and it has
/// no part in a commit.
#[cfg(not(feature = "edge"))]
pub(super) mod cloud_lanes {
    use std::time::Instant;

    use crate::broker::{Action, Broker, StoreOp};
    use crate::store::Committed;

    /// No lanes from a link.
    #[derive(Debug, Default)]
    pub(in crate::server) struct CloudLanes;

    /// Nothing comes from a link.
    #[derive(Debug)]
    pub(in crate::server) enum FromCloud {}

    impl CloudLanes {
        pub(super) async fn next(&mut self) -> Option<FromCloud> {
            std::future::pending().await
        }

        pub(super) fn take(
            &mut self,
            input: FromCloud,
            _: &mut Broker,
            _: Instant,
            _: &mut Vec<Action>,
        ) {
            match input {}
        }

        pub(super) fn before_commit(&mut self, _: &Broker, _: &mut Vec<StoreOp>) {}

        pub(super) fn committed(&mut self, _: &mut Broker, _: Committed, _: &[StoreOp]) {}
    }
}

// The tests drive an edge broker (its outbox makes every publish on `up/#` a commit).
#[cfg(all(test, feature = "edge"))]
mod tests;
