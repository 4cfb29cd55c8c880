//! Other nodes' changes, followed: one connection of its own `LISTEN`s on
//! [`pg::CHANNEL`]; each [`pg::Notice`] from another node is caught up with from the
//! database (the partitions it names, or every stream), then `watch_commits` moves, so Kafka
//! long polls and the MQTT and AMQP tailers wake on another node's commit as on their own.
//!
//! Notices sent while this connection was down are lost, so every (re)connection first
//! catches up with everything; a connection that stops answering is noticed by a query every
//! [`CHECK_EVERY`] and replaced.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio_postgres::{AsyncMessage, NoTls};
use tracing::warn;

use super::clients::{self, ClientNotice};
use super::pg::{self, Notice, PgError};
use super::{lock, StreamConfig, StreamState};

/// How often the connection is asked whether it still answers.
const CHECK_EVERY: Duration = Duration::from_secs(10);
/// How long it has to answer.
const CHECK_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest wait between two connection attempts.
const MAX_PAUSE: Duration = Duration::from_secs(5);

/// The streams this node knows, by name.
pub(super) type Streams = Arc<RwLock<HashMap<String, Arc<StreamState>>>>;

/// The task that follows other nodes' changes; see the module docs.
pub(super) struct Listener {
    pub(super) config: tokio_postgres::Config,
    pub(super) node: String,
    pub(super) pool: deadpool_postgres::Pool,
    pub(super) state: Streams,
    /// Held while the set of streams changes (here, and in `create_stream`/`delete_stream`),
    /// so a reload never undoes a stream made meanwhile.
    pub(super) streams_lock: Arc<tokio::sync::Mutex<()>>,
    pub(super) commits: Arc<watch::Sender<u64>>,
    /// Where claims of MQTT client ids go, once the MQTT front follows them.
    pub(super) clients: ClientsTx,
}

/// The receiver of [`ClientNotice`]s, when there is one.
pub(super) type ClientsTx = Arc<std::sync::Mutex<Option<mpsc::UnboundedSender<ClientNotice>>>>;

impl Listener {
    /// Follows changes until the runtime ends, connecting again after each failure.
    pub(super) async fn run(self) {
        let mut pause = Duration::from_millis(100);
        loop {
            let started = tokio::time::Instant::now();
            let e = match self.follow().await {
                Err(e) => e,
                Ok(never) => match never {},
            };
            warn!(error = %e, "following other nodes' commits stopped; connecting again");
            if started.elapsed() > Duration::from_secs(30) {
                pause = Duration::from_millis(100);
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(MAX_PAUSE);
        }
    }

    /// One connection: LISTEN, catch up with what may have been missed, then follow notices
    /// until the connection fails.
    async fn follow(&self) -> Result<std::convert::Infallible, PgError> {
        let (client, mut conn) = self.config.connect(NoTls).await?;
        let (tx, mut notices) = mpsc::unbounded_channel::<String>();
        let claims = self.clients.clone();
        let driver = tokio::spawn(async move {
            loop {
                match std::future::poll_fn(|cx| conn.poll_message(cx)).await {
                    Some(Ok(AsyncMessage::Notification(n))) if n.channel() == clients::CHANNEL => {
                        if let Some(notice) = ClientNotice::parse(n.payload()) {
                            send_client_notice(&claims, notice);
                        }
                    }
                    Some(Ok(AsyncMessage::Notification(n))) => {
                        if tx.send(n.payload().to_owned()).is_err() {
                            return None;
                        }
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => return Some(e),
                    None => return None,
                }
            }
        });
        let _driver = AbortOnDrop(driver.abort_handle());
        client
            .batch_execute(&format!(
                "LISTEN {}; LISTEN {}",
                pg::CHANNEL,
                clients::CHANNEL
            ))
            .await?;
        // Claims told while this connection was down are lost: the MQTT front reads the
        // rows of its sessions again.
        send_client_notice(&self.clients, ClientNotice::Resync);
        self.catch_up(&Notice {
            everything: true,
            ..Notice::default()
        })
        .await?;
        let mut check = tokio::time::interval(CHECK_EVERY);
        check.tick().await;
        loop {
            tokio::select! {
                first = notices.recv() => {
                    let Some(first) = first else {
                        return Err(match driver.await {
                            Ok(Some(e)) => e.into(),
                            _ => PgError::Lost("the connection closed".to_owned()),
                        });
                    };
                    // Whatever else is waiting, as one.
                    let mut merged = Notice::default();
                    let mut next = Some(first);
                    while let Some(payload) = next.take() {
                        if let Some(n) = Notice::parse(&payload).filter(|n| n.node != self.node) {
                            merged.everything |= n.everything;
                            merged.streams |= n.streams;
                            merged.partitions.extend(n.partitions);
                            merged.rewritten.extend(n.rewritten);
                        }
                        next = notices.try_recv().ok();
                    }
                    if merged.everything
                        || merged.streams
                        || !merged.partitions.is_empty()
                        || !merged.rewritten.is_empty()
                    {
                        self.catch_up(&merged).await?;
                    }
                }
                _ = check.tick() => {
                    tokio::time::timeout(CHECK_TIMEOUT, client.simple_query("SELECT 1"))
                        .await
                        .map_err(|_| PgError::Lost("no answer to a check".to_owned()))??;
                }
            }
        }
    }

    /// Reads again from the database what `notice` says moved, then tells this node's readers.
    async fn catch_up(&self, notice: &Notice) -> Result<(), PgError> {
        let known = {
            let state = self.state.read().unwrap_or_else(|e| e.into_inner());
            notice
                .partitions
                .iter()
                .chain(&notice.rewritten)
                .all(|(s, _)| state.contains_key(s))
        };
        if notice.everything || notice.streams || !known {
            self.reload_streams().await?;
        } else {
            let mut which: Vec<(String, u32)> = notice
                .partitions
                .iter()
                .chain(&notice.rewritten)
                .cloned()
                .collect();
            which.sort();
            which.dedup();
            let client = self.pool.get().await?;
            let rows = pg::partitions(&client, &which).await?;
            let state = self.state.read().unwrap_or_else(|e| e.into_inner());
            for ((s, p), row) in rows {
                if let Some(part) = state.get(&s).and_then(|s| s.parts.get(p as usize)) {
                    lock(part).catch_up(&row);
                }
            }
        }
        // Runs another node's compaction replaced: asked of the database again when read.
        // (Everything else that may be stale is found out by a read, which then asks again.)
        if !notice.rewritten.is_empty() {
            let state = self.state.read().unwrap_or_else(|e| e.into_inner());
            for (s, p) in &notice.rewritten {
                if let Some(part) = state.get(s).and_then(|s| s.parts.get(*p as usize)) {
                    lock(part).runs.clear();
                }
            }
        }
        self.commits.send_modify(|n| *n += 1);
        Ok(())
    }

    /// Every stream as the database has it: new ones added, gone ones dropped (and marked
    /// deleted, for whoever holds them), every partition caught up with.
    async fn reload_streams(&self) -> Result<(), PgError> {
        let _changing = self.streams_lock.lock().await;
        let client = self.pool.get().await?;
        let loaded = pg::streams(&client).await?;
        let mut state = self.state.write().unwrap_or_else(|e| e.into_inner());
        let names: HashSet<&str> = loaded.iter().map(|(n, ..)| n.as_str()).collect();
        state.retain(|name, s| {
            let keep = names.contains(name.as_str());
            if !keep {
                for p in &s.parts {
                    lock(p).deleted = true;
                }
            }
            keep
        });
        for (name, json, parts) in &loaded {
            match state.get(name) {
                Some(s) => {
                    for (p, row) in s.parts.iter().zip(parts) {
                        lock(p).catch_up(row);
                    }
                }
                None => {
                    let config: StreamConfig = serde_json::from_str(json).unwrap_or_default();
                    state.insert(name.clone(), StreamState::new(config, parts));
                }
            }
        }
        Ok(())
    }
}

fn send_client_notice(to: &ClientsTx, notice: ClientNotice) {
    let mut to = to.lock().unwrap_or_else(|e| e.into_inner());
    if to.as_ref().is_some_and(|tx| tx.send(notice).is_err()) {
        *to = None;
    }
}

/// Ends a task when dropped.
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
