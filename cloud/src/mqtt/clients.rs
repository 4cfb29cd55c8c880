//! MQTT client ids across a cluster (Step 10): a client id is served by one node at a time.
//!
//! The broker tells this task where sessions connected and ended
//! ([`SessionEvent`]); a connection accepted here claims its client id in PostgreSQL
//! (`log::object::clients`: one row per id, a token from one sequence, every node told).
//! When another node claims an id this node serves with a newer token, the session ends
//! here ([`Server::taken_elsewhere`]: its connection closed with 0x8E, its state dropped),
//! as a second connection takes a session over on one node. A node that may have missed
//! claims (its listening connection was down, or it was not running) reads the rows of the
//! sessions it holds again and ends those claimed elsewhere since.
//!
//! Wills outlive their node: each connection's will is recorded under its claim
//! (`mqtt_wills`) and forgotten once it is published or dropped here; the wills of a node
//! that is gone (its lease ran out) are taken by one live node, which publishes them, and a
//! node publishes its own from before it started. A will with a delay whose client connected
//! again since is dropped instead.
//!
//! Retained messages are the cluster's: every retained message the tailer delivers is
//! recorded (`mqtt_retained`, the newest per topic), and a node that starts takes those it
//! has none of ([`Server::seed_retained`]).
//!
//! Persistent sessions move: each node records what it holds of them under their claims,
//! about once a second while they change, and a client that connects with Clean Start 0 to
//! a node without its session waits while that node claims the id, takes the record and
//! reads the log again from it (`super::sessions`, the broker's `resume`). Between the new
//! node accepting the connection and the old one hearing of it there is the time of one
//! claim and one notice (milliseconds), in which both serve the id.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use ferry_edge::broker::{Message, SessionEvent, SessionState, ASSIGNED_ID_PREFIX};
use ferry_edge::server::Server;
use ferry_protocol::mqtt::{Packet, PacketId, ProtocolVersion, Publish, QoS};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::log::object::clients::{ClientNotice, Orphan, RetainedRow, MAX_CLAIMED_ID};
use crate::log::object::ObjectLog;
use crate::log::{LogError, Storage};
use crate::routes::RouteTable;

/// How long a claim that failed (the database out of reach) waits before it is tried again.
const RETRY: Duration = Duration::from_secs(1);

/// The client ids the broker's sessions connected and ended under, from the router.
pub(crate) type Events = mpsc::UnboundedReceiver<Vec<SessionEvent>>;

/// A retained message the tailer delivered, and where it is in the log.
#[derive(Debug)]
pub(crate) struct RetainedSeen {
    pub(crate) stream: String,
    pub(crate) partition: u32,
    pub(crate) offset: i64,
    pub(crate) msg: Arc<Message>,
}

/// The broker asks for the session the cluster holds for a client id.
#[derive(Debug)]
pub(crate) struct Fetch {
    pub(crate) client_id: Arc<str>,
    pub(crate) reply: tokio::sync::oneshot::Sender<Result<Option<SessionState>, ()>>,
}

/// A persistent session as it stands here, to record (None: none to resume any more).
#[derive(Debug)]
pub(crate) struct Recorded {
    pub(crate) client_id: String,
    pub(crate) session: Option<Vec<u8>>,
}

/// What the MQTT front tells this task.
#[derive(Debug)]
pub(crate) struct Hooks {
    pub(crate) events: Events,
    pub(crate) retained: mpsc::UnboundedReceiver<RetainedSeen>,
    pub(crate) fetches: mpsc::UnboundedReceiver<Fetch>,
    pub(crate) checkpoints: mpsc::UnboundedReceiver<Vec<Recorded>>,
}

/// How often the wills of nodes that are gone are looked for.
const ORPHANS_EVERY: Duration = Duration::from_secs(2);

/// What the task needs of the node.
pub(crate) struct Registry {
    pub(crate) log: Arc<ObjectLog>,
    pub(crate) server: Server,
    /// Where dead nodes' wills are appended, through `routes`.
    pub(crate) storage: Arc<dyn Storage>,
    pub(crate) routes: Arc<RouteTable>,
}

/// What became of one client id over the events waiting.
#[derive(Default)]
struct Change {
    /// Connected (true) or ended (false) last.
    connected: Option<bool>,
    /// The will it has now, if that changed.
    will: Option<Option<(Arc<Message>, u32)>>,
}

/// Follows `events` from the server's broker and other nodes' claims until either ends;
/// publishes the wills of nodes that are gone. See the module docs.
pub(crate) async fn run(registry: Registry, hooks: Hooks) {
    let Registry {
        log,
        server,
        storage,
        routes,
    } = registry;
    let Hooks {
        mut events,
        mut retained,
        mut fetches,
        mut checkpoints,
    } = hooks;
    // Session records not written yet (the database did not answer), the newest of each.
    let mut unsaved: HashMap<String, Option<Vec<u8>>> = HashMap::new();
    let mut notices = log.follow_mqtt_clients();
    let me = log.node().to_owned();
    // The ids served here, each with the token of this node's claim (the newest it made).
    let mut own: HashMap<String, i64> = HashMap::new();
    // This node's own wills from before it started: its connections died with it.
    let mut orphans = take_orphans(&log, true).await;
    let mut sweep = tokio::time::interval(ORPHANS_EVERY);
    loop {
        if !orphans.is_empty() {
            orphans = publish_orphans(&log, &storage, &routes, orphans).await;
        }
        tokio::select! {
            biased;
            batch = events.recv() => {
                let Some(batch) = batch else { return };
                let mut changes: HashMap<Arc<str>, Change> = HashMap::new();
                let mut batch = Some(batch);
                while let Some(events_of_batch) = batch.take().or_else(|| events.try_recv().ok()) {
                    for event in events_of_batch {
                        match event {
                            SessionEvent::Connected(id) => changes.entry(id).or_default().connected = Some(true),
                            SessionEvent::Ended(id) => {
                                let change = changes.entry(id).or_default();
                                change.connected = Some(false);
                                change.will = Some(None);
                            }
                            SessionEvent::Will(id, will) => changes.entry(id).or_default().will = Some(will),
                        }
                    }
                }
                apply(&log, &mut own, changes).await;
            }
            notice = notices.recv() => match notice {
                None => return,
                Some(ClientNotice::Claimed { node, token, client_id }) => {
                    // Only an id served here under an older claim.
                    let older_here = own.get(&client_id).is_some_and(|t| *t < token);
                    if node == me || !older_here {
                        continue;
                    }
                    own.remove(&client_id);
                    debug!(client_id, node, "MQTT session taken over on another node");
                    server.taken_elsewhere(client_id).await;
                }
                Some(ClientNotice::Resync) => resync(&log, &server, &me, &mut own).await,
            },
            Some(first) = retained.recv() => {
                // The newest of each topic, over everything waiting.
                let mut newest: HashMap<String, RetainedSeen> = HashMap::new();
                let mut next = Some(first);
                while let Some(seen) = next.take().or_else(|| retained.try_recv().ok()) {
                    newest.insert(seen.msg.topic.to_string(), seen);
                }
                record_retained(&log, newest).await;
            }
            Some(fetch) = fetches.recv() => {
                let answer = take_session(&log, &mut own, &fetch.client_id).await;
                let _ = fetch.reply.send(answer);
            }
            Some(first) = checkpoints.recv() => {
                let mut next = Some(first);
                while let Some(records) = next.take().or_else(|| checkpoints.try_recv().ok()) {
                    unsaved.extend(records.into_iter().map(|r| (r.client_id, r.session)));
                }
                save_sessions(&log, &own, &mut unsaved).await;
            }
            _ = sweep.tick() => {
                orphans.extend(take_orphans(&log, false).await);
                if !unsaved.is_empty() {
                    save_sessions(&log, &own, &mut unsaved).await;
                }
            }
        }
    }
}

/// Claims `client_id` for a connection that waits to resume its session here, and takes the
/// session the cluster recorded for it (see `super::sessions`); Err if the database does
/// not answer.
async fn take_session(
    log: &Arc<ObjectLog>,
    own: &mut HashMap<String, i64>,
    client_id: &str,
) -> Result<Option<SessionState>, ()> {
    if client_id.len() > MAX_CLAIMED_ID {
        // Never claimed across the cluster: served by one node, as without one.
        return Ok(None);
    }
    let id = client_id.to_owned();
    match on_log(log, move |l| l.take_mqtt_session(&id)).await {
        Some(Ok((token, session))) => {
            own.insert(client_id.to_owned(), token);
            Ok(session.and_then(|bytes| super::sessions::decode(client_id, &bytes)))
        }
        Some(Err(e)) => {
            warn!(client_id, error = %e, "cannot ask the cluster for an MQTT session; the client is refused");
            Err(())
        }
        None => Err(()),
    }
}

/// Writes the session records in `unsaved` under this node's claims; those of ids not
/// claimed here (any more) are dropped, and all stay if the database does not answer (tried
/// again at the next sweep).
async fn save_sessions(
    log: &Arc<ObjectLog>,
    own: &HashMap<String, i64>,
    unsaved: &mut HashMap<String, Option<Vec<u8>>>,
) {
    let rows: Vec<(String, i64, Option<Vec<u8>>)> = unsaved
        .iter()
        .filter_map(|(id, session)| Some((id.clone(), *own.get(id)?, session.clone())))
        .collect();
    if rows.is_empty() {
        unsaved.clear();
        return;
    }
    match on_log(log, move |l| l.save_mqtt_sessions(rows)).await {
        Some(Ok(())) => unsaved.clear(),
        Some(Err(e)) => {
            warn!(error = %e, sessions = unsaved.len(), "cannot record MQTT sessions; trying again")
        }
        None => {}
    }
}

/// Makes `changes` known: ended sessions' claims and wills forgotten, new connections
/// claimed, their wills recorded under their claims.
async fn apply(
    log: &Arc<ObjectLog>,
    own: &mut HashMap<String, i64>,
    changes: HashMap<Arc<str>, Change>,
) {
    let mut connected = Vec::new();
    let mut ended = Vec::new();
    let mut wills = Vec::new();
    let mut no_will = Vec::new();
    for (id, change) in changes {
        match change.connected {
            Some(true) => connected.push(id.to_string()),
            Some(false) => ended.push(id.to_string()),
            None => {}
        }
        match change.will {
            Some(Some(will)) => wills.push((id.to_string(), will)),
            Some(None) => no_will.push(id.to_string()),
            None => {}
        }
    }
    for id in &ended {
        own.remove(id);
    }
    if !ended.is_empty() {
        if let Some(Err(e)) = on_log(log, move |l| l.release_mqtt_clients(&ended)).await {
            // Harmless: a stale row names this node until the id is claimed again.
            debug!(error = %e, "cannot forget ended MQTT sessions' claims");
        }
    }
    if !connected.is_empty() {
        own.extend(claim(log, connected).await);
    }
    if !no_will.is_empty() {
        if let Some(Err(e)) = on_log(log, move |l| l.drop_mqtt_wills(&no_will)).await {
            // Published once more if this node dies before the row is gone.
            warn!(error = %e, "cannot forget MQTT wills");
        }
    }
    let recorded: Vec<(String, i64, u32, Vec<u8>)> = wills
        .into_iter()
        .filter_map(|(id, (msg, delay))| {
            let token = *own.get(&id)?;
            Some((id, token, delay, encode_message(&msg)?))
        })
        .collect();
    if !recorded.is_empty() {
        if let Some(Err(e)) = on_log(log, move |l| l.put_mqtt_wills(recorded)).await {
            warn!(error = %e, "cannot record MQTT wills: they are not published if this node dies");
        }
    }
}

/// The wills of nodes that are gone (with `mine`, this node's own from before it started),
/// now this node's to publish; none when the database does not answer (tried again at the
/// next sweep).
async fn take_orphans(log: &Arc<ObjectLog>, mine: bool) -> Vec<Orphan> {
    match on_log(log, move |l| l.take_orphan_wills(mine)).await {
        Some(Ok(orphans)) => orphans,
        Some(Err(e)) => {
            debug!(error = %e, "cannot look for dead nodes' MQTT wills");
            Vec::new()
        }
        None => Vec::new(),
    }
}

/// Publishes `orphans` (appends them to the log, through the routes) and forgets them;
/// what could not be appended, to try again.
async fn publish_orphans(
    log: &Arc<ObjectLog>,
    storage: &Arc<dyn Storage>,
    routes: &Arc<RouteTable>,
    orphans: Vec<Orphan>,
) -> Vec<Orphan> {
    let messages: Vec<Arc<Message>> = orphans
        .iter()
        .filter_map(|o| decode_message(&o.client_id, &o.will, Some(&o.client_id)))
        .map(Arc::new)
        .collect();
    if let Err(e) = super::append(storage.clone(), routes.clone(), messages).await {
        warn!(error = %e, wills = orphans.len(), "cannot publish dead nodes' MQTT wills; trying again");
        tokio::time::sleep(RETRY).await;
        return orphans;
    }
    info!(
        wills = orphans.len(),
        "published the MQTT wills of connections on nodes that are gone"
    );
    let ids: Vec<String> = orphans.into_iter().map(|o| o.client_id).collect();
    if let Some(Err(e)) = on_log(log, move |l| l.drop_mqtt_wills(&ids)).await {
        warn!(error = %e, "cannot forget published MQTT wills");
    }
    Vec::new()
}

/// Gives the broker the retained messages the cluster recorded (those it has none of are
/// kept); tried a few times, then given up with a warning (the node then knows only what
/// is retained from now on). Before the node says it is ready: the broker takes them before
/// the SUBSCRIBE of any client that connects after.
pub(crate) async fn seed_retained(log: &Arc<ObjectLog>, server: &Server) {
    for _ in 0..10 {
        match on_log(log, |l| l.mqtt_retained()).await {
            Some(Ok(rows)) => {
                let messages: Vec<Arc<Message>> = rows
                    .iter()
                    .filter_map(|(topic, bytes)| decode_message(topic, bytes, None))
                    .map(Arc::new)
                    .collect();
                debug!(
                    retained = messages.len(),
                    "retained MQTT messages of the cluster"
                );
                server.seed_retained(messages).await;
                return;
            }
            Some(Err(e)) => warn!(error = %e, "cannot read the cluster's retained MQTT messages"),
            None => return,
        }
        tokio::time::sleep(RETRY).await;
    }
    warn!("started without the cluster's retained MQTT messages");
}

/// Records the newest retained message of each topic delivered here; one that cannot be
/// recorded is left to the next of its topic (or another node's record of it).
async fn record_retained(log: &Arc<ObjectLog>, newest: HashMap<String, RetainedSeen>) {
    let rows: Vec<RetainedRow> = newest
        .into_iter()
        .filter_map(|(topic, seen)| {
            let message = if seen.msg.payload.is_empty() {
                None
            } else {
                Some(encode_message(&seen.msg)?)
            };
            Some(RetainedRow {
                topic,
                stream: seen.stream,
                partition: i32::try_from(seen.partition).ok()?,
                offset: seen.offset,
                message,
            })
        })
        .collect();
    if let Some(Err(e)) = on_log(log, move |l| l.put_mqtt_retained(rows)).await {
        debug!(error = %e, "cannot record retained MQTT messages");
    }
}

/// A message as the PUBLISH packet (MQTT 5) it is recorded as (a will, a retained
/// message): what is left of its expiry, as its Message Expiry Interval.
fn encode_message(msg: &Message) -> Option<Vec<u8>> {
    let mut publish = Publish::new(msg.topic.clone(), msg.payload.clone());
    publish.qos = msg.qos;
    publish.retain = msg.retain;
    publish.properties = msg.properties.clone();
    if let Some(at) = msg.expires_at {
        let left = at.saturating_duration_since(std::time::Instant::now());
        publish.properties.message_expiry_interval_secs =
            Some(u32::try_from(left.as_secs().max(1)).unwrap_or(u32::MAX));
    }
    publish.packet_id = (msg.qos != QoS::AtMostOnce)
        .then(|| PacketId::new(1))
        .flatten();
    let mut out = bytes::BytesMut::new();
    Packet::Publish(publish)
        .encode(ProtocolVersion::V5, &mut out)
        .ok()?;
    Some(out.to_vec())
}

/// The message recorded as `bytes` (under `what`: a client id or a topic), from
/// `publisher`.
fn decode_message(what: &str, bytes: &[u8], publisher: Option<&str>) -> Option<Message> {
    let mut buf = bytes::BytesMut::from(bytes);
    match ferry_protocol::mqtt::decode(&mut buf, ProtocolVersion::V5, usize::MAX) {
        Ok(Some(Packet::Publish(p))) => {
            let expires_at = p
                .properties
                .message_expiry_interval_secs
                .map(|s| std::time::Instant::now() + Duration::from_secs(s.into()));
            Some(Message {
                topic: p.topic,
                payload: p.payload,
                qos: p.qos,
                retain: p.retain,
                properties: p.properties,
                expires_at,
                publisher: publisher.map(Arc::from),
                position: None,
            })
        }
        _ => {
            warn!(what, "a recorded MQTT message does not decode; dropped");
            None
        }
    }
}

/// Claims `ids` for this node, trying again until the database answers; their tokens.
async fn claim(log: &Arc<ObjectLog>, ids: Vec<String>) -> Vec<(String, i64)> {
    let ids = Arc::new(ids);
    until_answered(log, "claim MQTT client ids", move |l| {
        l.claim_mqtt_clients(&ids)
    })
    .await
    .unwrap_or_default()
}

/// Runs `f` with the object log on a blocking thread (its calls block); None once the
/// runtime is going away.
async fn on_log<T: Send + 'static>(
    log: &Arc<ObjectLog>,
    f: impl FnOnce(&ObjectLog) -> Result<T, LogError> + Send + 'static,
) -> Option<Result<T, LogError>> {
    let log = log.clone();
    tokio::task::spawn_blocking(move || f(&log)).await.ok()
}

/// [`on_log`] again every [`RETRY`] until the database answers (a warning each time it
/// does not, saying what could not be done).
async fn until_answered<T: Send + 'static>(
    log: &Arc<ObjectLog>,
    what: &str,
    f: impl Fn(&ObjectLog) -> Result<T, LogError> + Clone + Send + 'static,
) -> Option<T> {
    loop {
        match on_log(log, f.clone()).await? {
            Ok(answer) => return Some(answer),
            Err(e) => warn!(error = %e, "cannot {what}; trying again"),
        }
        tokio::time::sleep(RETRY).await;
    }
}

/// Reads the claims of every session held here again: those claimed elsewhere since end
/// here, those no node claimed are claimed, and `own` is what is left.
async fn resync(log: &Arc<ObjectLog>, server: &Server, me: &str, own: &mut HashMap<String, i64>) {
    let connected = server.clients().await.unwrap_or_default();
    let persistent = server.persistent_sessions().await.unwrap_or_default();
    let mut ids: Vec<String> = connected
        .into_iter()
        .map(|c| c.client_id)
        .chain(persistent.into_iter().map(|s| s.client_id))
        .filter(|id| !id.starts_with(ASSIGNED_ID_PREFIX))
        .collect();
    ids.sort_unstable();
    ids.dedup();
    let asked = Arc::new(ids.clone());
    let read = until_answered(log, "read the MQTT client ids' claims", move |l| {
        l.mqtt_client_owners(&asked)
    });
    let Some(rows) = read.await else { return };
    let rows: HashMap<String, (String, i64)> = rows
        .into_iter()
        .map(|(id, node, token)| (id, (node, token)))
        .collect();
    own.retain(|id, _| ids.binary_search(id).is_ok());
    let mut unclaimed = Vec::new();
    for id in ids {
        match rows.get(&id) {
            Some((node, token)) if node == me => {
                own.insert(id, *token);
            }
            Some((node, token)) => {
                if own.get(&id).is_none_or(|t| t <= token) {
                    own.remove(&id);
                    debug!(
                        client_id = id,
                        node, "MQTT session taken over on another node meanwhile"
                    );
                    server.taken_elsewhere(id).await;
                }
            }
            None => unclaimed.push(id),
        }
    }
    if !unclaimed.is_empty() {
        own.extend(claim(log, unclaimed).await);
    }
}
