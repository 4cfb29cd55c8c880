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
//! What does not move: the session's state. A client that connects to another node starts
//! there with the session that node has (none, usually: CONNACK says so with session present
//! 0). Between the new node accepting the connection and the old one hearing of it there is
//! the time of one claim and one notice (milliseconds), in which both serve the id.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use ferry_edge::broker::{SessionEvent, ASSIGNED_ID_PREFIX};
use ferry_edge::server::Server;
use tokio::sync::mpsc;
use tracing::{debug, warn};

use crate::log::object::clients::ClientNotice;
use crate::log::object::ObjectLog;

/// How long a claim that failed (the database out of reach) waits before it is tried again.
const RETRY: Duration = Duration::from_secs(1);

/// The client ids the broker's sessions connected and ended under, from the router.
pub(crate) type Events = mpsc::UnboundedReceiver<Vec<SessionEvent>>;

/// Follows `events` from `server`'s broker and other nodes' claims through `log` until
/// either ends; see the module docs.
pub(crate) async fn run(log: Arc<ObjectLog>, server: Server, mut events: Events) {
    let mut notices = log.follow_mqtt_clients();
    let me = log.node().to_owned();
    // The ids served here, each with the token of this node's claim (the newest it made).
    let mut own: HashMap<String, i64> = HashMap::new();
    loop {
        tokio::select! {
            biased;
            batch = events.recv() => {
                let Some(batch) = batch else { return };
                // What each id's sessions came to, over every batch waiting.
                let mut last: HashMap<Arc<str>, bool> = HashMap::new();
                let mut batch = Some(batch);
                while let Some(events_of_batch) = batch.take().or_else(|| events.try_recv().ok()) {
                    for event in events_of_batch {
                        match event {
                            SessionEvent::Connected(id) => last.insert(id, true),
                            SessionEvent::Ended(id) => last.insert(id, false),
                        };
                    }
                }
                let (connected, ended): (Vec<_>, Vec<_>) = last.into_iter().partition(|(_, c)| *c);
                let connected: Vec<String> = connected.into_iter().map(|(id, _)| id.to_string()).collect();
                let ended: Vec<String> = ended.into_iter().map(|(id, _)| id.to_string()).collect();
                for id in &ended {
                    own.remove(id);
                }
                if !ended.is_empty() {
                    let (l, ids) = (log.clone(), ended);
                    if let Ok(Err(e)) = tokio::task::spawn_blocking(move || l.release_mqtt_clients(&ids)).await {
                        // Harmless: a stale row names this node until the id is claimed again.
                        debug!(error = %e, "cannot forget ended MQTT sessions' claims");
                    }
                }
                if !connected.is_empty() {
                    own.extend(claim(&log, connected).await);
                }
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
        }
    }
}

/// Claims `ids` for this node, trying again until the database answers; their tokens.
async fn claim(log: &Arc<ObjectLog>, ids: Vec<String>) -> Vec<(String, i64)> {
    loop {
        let (l, i) = (log.clone(), ids.clone());
        match tokio::task::spawn_blocking(move || l.claim_mqtt_clients(&i)).await {
            Ok(Ok(tokens)) => return tokens,
            Ok(Err(e)) => {
                warn!(error = %e, clients = ids.len(), "cannot claim MQTT client ids; trying again")
            }
            Err(_) => return Vec::new(),
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
    let rows = loop {
        let (l, i) = (log.clone(), ids.clone());
        match tokio::task::spawn_blocking(move || l.mqtt_client_owners(&i)).await {
            Ok(Ok(rows)) => break rows,
            Ok(Err(e)) => {
                warn!(error = %e, "cannot read the MQTT client ids' claims; trying again")
            }
            Err(_) => return,
        }
        tokio::time::sleep(RETRY).await;
    };
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
