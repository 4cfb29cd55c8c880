//! The cloud's MQTT front: the broker of `ferry-edge` in log mode, on a thread of its own,
//! and the tailer that feeds it from the log.
//!
//! ```text
//! MQTT client ─PUBLISH─▶ broker ─append (route)─▶ log ─▶ PUBACK
//! link ingest, Kafka producers ─────────────────▶ log
//!                                                  │ tailer (from the delivery cursor)
//! MQTT subscribers ◀─ broker ◀─ Input::Deliver ◀───┘
//! ```
//!
//! Every message reaches subscribers the same way, whatever wrote it. The tailer's position
//! is the durable cursor [`MQTT_CURSOR`] in the metadata, moved only past messages the
//! broker has routed and made durable for persistent sessions ([`cursor::DeliveryCursor`]);
//! after a crash the messages after it are delivered again (at least once).

pub(crate) mod clients;
mod cursor;
mod sessions;
mod tailer;

use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_edge::broker::{Message, SessionCheckpoint};
use ferry_edge::config::Config as EdgeConfig;
use ferry_edge::server::{AppendFuture, ClusterSessions, LogHooks, Server};
use tokio::sync::mpsc;

use crate::log::{now_ms, AppendData, Storage};
use crate::meta::Meta;
use crate::node::NodeError;
use crate::routes::{to_record, MqttMessage, RouteTable};
use cursor::DeliveryCursor;
use tailer::Tailer;

/// The consumer cursor under which the MQTT front's delivery position is kept.
pub const MQTT_CURSOR: &str = "$mqtt";
/// Messages read from the log and not yet taken by the broker; bounds the tailer's lead
/// (at most this many messages in memory, each up to the broker's packet size).
const DELIVERY_QUEUE: usize = 4096;
/// The most a compressed batch may take once uncompressed to be delivered to MQTT.
const MAX_UNCOMPRESSED_BYTES: usize = 64 * 1024 * 1024;
/// How often the tailer makes its cursor durable (when it moved).
const CURSOR_COMMIT_INTERVAL: Duration = Duration::from_secs(1);

/// Starts the MQTT front over `log`: the broker on its own thread (see
/// [`start_on_own_thread`]) appending what clients publish through `routes`, and the tailer
/// thread delivering what the log holds. While subscribers are more than `max_lag_records`
/// behind the log, clients that only publish are paused (0: never). Serving stops when
/// `shutdown` completes. `clustered`: the broker's session events and the retained
/// messages delivered, for [`clients::run`].
pub(crate) async fn start(
    config: EdgeConfig,
    log: Arc<dyn Storage>,
    meta: Arc<Meta>,
    routes: Arc<RouteTable>,
    max_lag_records: u64,
    clustered: bool,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(Server, Option<clients::Hooks>), NodeError> {
    let cursor = Arc::new(DeliveryCursor::default());
    let (sessions, retained, cluster, moving) = if clustered {
        let (tx, events) = mpsc::unbounded_channel();
        let report: Box<dyn FnMut(Vec<ferry_edge::broker::SessionEvent>) + Send> =
            Box::new(move |events| {
                let _ = tx.send(events);
            });
        let (retained_tx, retained) = mpsc::unbounded_channel();
        let (fetch_tx, fetches) = mpsc::unbounded_channel();
        let (checkpoint_tx, checkpoints) = mpsc::unbounded_channel();
        (
            Some(report),
            Some(retained_tx),
            Some(clients::Hooks {
                events,
                retained,
                fetches,
                checkpoints,
            }),
            Some(moving_sessions(
                log.clone(),
                cursor.clone(),
                fetch_tx,
                checkpoint_tx,
            )),
        )
    } else {
        (None, None, None, None)
    };
    let (deliveries_tx, deliveries) = mpsc::channel(DELIVERY_QUEUE);
    let lag = Arc::new(AtomicU64::new(0));
    let subscribed = Arc::new(AtomicBool::new(true));
    let hooks = LogHooks {
        append: Box::new({
            let log = log.clone();
            move |messages| append(log.clone(), routes.clone(), messages)
        }),
        deliveries,
        delivered: Box::new({
            let cursor = cursor.clone();
            move |n| cursor.routed(n)
        }),
        lag: lag.clone(),
        max_lag: max_lag_records,
        sessions,
        subscribed: subscribed.clone(),
        cluster: moving,
    };
    let server = start_on_own_thread(config, hooks, shutdown).await?;
    let tail = Tailer {
        log,
        meta,
        tx: deliveries_tx,
        cursor,
        lag,
        retained,
        subscribed,
    };
    std::thread::Builder::new()
        .name("ferry-tailer".into())
        .spawn(move || tail.run())?;
    Ok((server, cluster))
}

/// How long a CONNECT waits for the cluster's record of its session before the client is
/// refused (0x88, Server unavailable).
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);

/// The router's part in moving persistent sessions between nodes: fetches and records go to
/// [`clients::run`] (the database), replays read `log` on a thread of their own.
fn moving_sessions(
    log: Arc<dyn Storage>,
    cursor: Arc<DeliveryCursor>,
    fetch_tx: mpsc::UnboundedSender<clients::Fetch>,
    checkpoint_tx: mpsc::UnboundedSender<Vec<clients::Recorded>>,
) -> ClusterSessions {
    ClusterSessions {
        fetch: Box::new(move |client_id| {
            let (reply, answer) = tokio::sync::oneshot::channel();
            let _ = fetch_tx.send(clients::Fetch { client_id, reply });
            Box::pin(async move {
                match tokio::time::timeout(FETCH_TIMEOUT, answer).await {
                    Ok(Ok(answer)) => answer,
                    _ => Err(()),
                }
            })
        }),
        replay: Box::new(move |from, filters| {
            let (reply, answer) = tokio::sync::oneshot::channel();
            let log = log.clone();
            let started = std::thread::Builder::new()
                .name("ferry-replay".into())
                .spawn(move || {
                    let (messages, until) = sessions::replay(&*log, &from, &filters);
                    tracing::info!(
                        messages = messages.len(),
                        ?from,
                        ?until,
                        "read the log again for an MQTT session that resumes here"
                    );
                    let _ = reply.send((messages, until));
                });
            if let Err(e) = started {
                tracing::error!(error = %e, "cannot start reading the log for a resumed MQTT session");
            }
            Box::pin(async move { answer.await.unwrap_or_default() })
        }),
        // On the router's thread, right after it reported what it routed: the cursor's
        // positions are those of the sessions' state.
        checkpoint: Box::new(move |states| {
            let routed = cursor.positions();
            let records = states
                .into_iter()
                .map(|c| match c {
                    SessionCheckpoint::Held(s) => clients::Recorded {
                        client_id: s.client_id.to_string(),
                        session: Some(sessions::encode(&s, &routed)),
                    },
                    SessionCheckpoint::Gone(id) => clients::Recorded {
                        client_id: id.to_string(),
                        session: None,
                    },
                })
                .collect();
            let _ = checkpoint_tx.send(records);
        }),
    }
}

/// Starts the MQTT front on a thread of its own with a current-thread runtime, as
/// `ferry-edge` runs: one I/O thread serves packets from different connections in the order
/// they arrived, so a PUBLISH cannot overtake another client's SUBSCRIBE sent before it.
async fn start_on_own_thread(
    config: EdgeConfig,
    hooks: LogHooks,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<Server, NodeError> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("ferry-mqtt".into())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = tx.send(Err(NodeError::Io(e)));
                    return;
                }
            };
            runtime.block_on(async move {
                let started = Server::start_with_log(config, Some(hooks), shutdown).await;
                let ok = started.is_ok();
                let _ = tx.send(started.map_err(NodeError::from));
                if ok {
                    // The connections' tasks live on this runtime for the life of the process.
                    std::future::pending::<()>().await;
                }
            });
        })?;
    rx.await
        .map_err(|_| NodeError::Io(std::io::Error::other("the MQTT thread ended")))?
}

/// Appends what one broker batch accepted, each message to its route's partition, all
/// partitions at once; done when all are durable.
fn append(
    log: Arc<dyn Storage>,
    routes: Arc<RouteTable>,
    messages: Vec<Arc<Message>>,
) -> AppendFuture {
    let routes = routes.get();
    Box::pin(async move {
        let now = now_ms();
        let mut per_partition: Vec<((String, u32), Vec<crate::log::NewRecord>)> = Vec::new();
        let instant = Instant::now();
        for m in &messages {
            // The broker keeps a message's expiry as a deadline; the record carries what is
            // left of it, from the record's timestamp.
            let with_expiry;
            let properties = match m.expires_at {
                Some(deadline) => {
                    let left = deadline.saturating_duration_since(instant);
                    let mut p = m.properties.clone();
                    p.message_expiry_interval_secs =
                        Some(u32::try_from(left.as_millis().div_ceil(1000)).unwrap_or(u32::MAX));
                    with_expiry = p;
                    &with_expiry
                }
                None => &m.properties,
            };
            let msg = MqttMessage {
                topic: &m.topic,
                payload: &m.payload,
                qos: m.qos,
                retain: m.retain,
                properties,
                edge: None,
                timestamp_ms: now,
            };
            let dest = routes.destination(&msg);
            let key = (dest.stream.to_owned(), dest.partition);
            let mut record = to_record(&msg);
            if let Some(client) = &m.publisher {
                record.headers.push((
                    "ferry.client".into(),
                    Some(bytes::Bytes::copy_from_slice(client.as_bytes())),
                ));
            }
            match per_partition.iter_mut().find(|(k, _)| *k == key) {
                Some((_, v)) => v.push(record),
                None => per_partition.push((key, vec![record])),
            }
        }
        let appends = per_partition
            .into_iter()
            .map(|((stream, partition), recs)| {
                log.append(&stream, partition, AppendData::Records(recs))
            });
        for result in futures_util::future::join_all(appends).await {
            result.map_err(|e| e.to_string())?;
        }
        Ok(())
    })
}
