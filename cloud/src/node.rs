//! One cloud node: the log, its metadata, the routes, and the MQTT front (the broker of
//! `ferry-edge` in log mode) wired together.
//!
//! ```text
//! MQTT client ─PUBLISH─▶ broker ─append (route)─▶ log ─▶ PUBACK
//! link ingest ──────────────────────────────────▶ log
//!                                                  │ tailer (from the delivery cursor)
//! MQTT subscribers ◀─ broker ◀─ Input::Deliver ◀───┘
//! ```
//!
//! Every message reaches subscribers the same way, whatever wrote it. The tailer's position
//! is the durable cursor `$mqtt` in the metadata, moved only past messages the broker has
//! routed and made durable for persistent sessions; after a crash the messages after it
//! are delivered again (at least once).

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use ferry_edge::broker::{BrokerConfig, Message};
use ferry_edge::config::{AuthConfig, Config as EdgeConfig, ServerConfig, StorageConfig};
use ferry_edge::server::{AppendFuture, LogHooks, Server, StartError};
use ferry_protocol::kafka::batch::{records, uncompressed};
use serde::Deserialize;
use tokio::sync::mpsc;
use tracing::{error, info, warn};

use crate::ingest::{Ingest, IngestError};
use crate::log::{
    now_ms, AppendData, LogError, SegmentLog, Storage, StreamConfig, READ_BUDGET_BYTES,
};
use crate::meta::{Command, Meta, MetaError};
use crate::routes::{
    from_record, to_record, MqttMessage, RouteConfig, RouteError, RouteTable, Routes,
};

/// The consumer cursor under which the MQTT front's delivery position is kept.
pub const MQTT_CURSOR: &str = "$mqtt";
/// Messages read from the log and not yet taken by the broker; bounds the tailer's lead.
const DELIVERY_QUEUE: usize = 4096;
/// The most a compressed batch may take once uncompressed to be delivered to MQTT.
const MAX_UNCOMPRESSED_BYTES: usize = 64 * 1024 * 1024;
/// How often the tailer makes its cursor durable (when it moved).
const CURSOR_COMMIT_INTERVAL: Duration = Duration::from_secs(1);

/// `ferry-cloud`'s configuration file. Every key has a default; see
/// `cloud/ferry-cloud.example.toml`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CloudConfig {
    /// MQTT listeners, limits and the data directory, as for `ferry-edge` (default data
    /// directory `ferry-cloud-data`).
    pub server: ServerConfig,
    pub mqtt: BrokerConfig,
    /// The MQTT sessions' database (`<data_dir>/ferry-edge.redb`).
    pub storage: StorageConfig,
    pub auth: AuthConfig,
    pub log: LogConfig,
    /// `[[route]]`: MQTT topic filters to streams (see `docs/routes.md`).
    #[serde(rename = "route")]
    pub routes: Vec<RouteConfig>,
    pub admin: AdminConfig,
    /// `[link]`: where edges connect (QUIC). Default none: no link listener.
    pub link: Option<crate::link::LinkConfig>,
    /// `[kafka]`: the Kafka listener (see [`crate::kafka`]). Default none: off.
    pub kafka: Option<crate::kafka::KafkaConfig>,
}

/// `[admin]`: the admin HTTP listener (JSON API and `/metrics`, see [`crate::admin`]).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminConfig {
    /// Where it listens. Default none: off. It has no authentication; keep it on loopback or
    /// a management network.
    pub listen: Option<SocketAddr>,
}

impl Default for CloudConfig {
    fn default() -> Self {
        Self {
            server: ServerConfig {
                data_dir: PathBuf::from("ferry-cloud-data"),
                ..ServerConfig::default()
            },
            mqtt: BrokerConfig::default(),
            storage: StorageConfig::default(),
            auth: AuthConfig::default(),
            log: LogConfig::default(),
            routes: Vec::new(),
            admin: AdminConfig::default(),
            link: None,
            kafka: None,
        }
    }
}

impl CloudConfig {
    /// Reads a TOML configuration file.
    pub fn load(path: &std::path::Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("{}", path.display()))
    }

    /// The MQTT front's part, in `ferry-edge`'s terms.
    pub fn edge(&self) -> EdgeConfig {
        EdgeConfig {
            server: self.server.clone(),
            mqtt: self.mqtt.clone(),
            storage: self.storage.clone(),
            auth: self.auth.clone(),
            // The cloud sends nothing further up.
            uplink: Default::default(),
        }
    }
}

/// `[log]`: the durable log (`<data_dir>/log/`, format in `docs/log-format.md`).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// Answer producers only once their records are on disk. Default true; false answers
    /// once written (a process crash loses nothing, a power loss may lose the last appends).
    pub fsync: bool,
    /// Appends waiting for the appender before producers wait too. Default 8192 (each holds
    /// its records: ~1 MB at 100-byte records).
    pub queue_requests: usize,
    /// Settings of streams that routes create (partition counts come from the routes).
    pub streams: StreamConfig,
    /// Seconds between retention passes. Default 60.
    pub retention_check_secs: u64,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            fsync: true,
            queue_requests: 8192,
            streams: StreamConfig::default(),
            retention_check_secs: 60,
        }
    }
}

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Log(#[from] LogError),
    #[error(transparent)]
    Meta(#[from] MetaError),
    #[error(transparent)]
    Routes(#[from] RouteError),
    #[error(transparent)]
    Ingest(#[from] IngestError),
    #[error(transparent)]
    Server(#[from] StartError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("link: {0}")]
    Link(#[from] ferry_bridge::server::StartError),
}

/// A running node.
#[derive(Debug, Clone)]
pub struct Node {
    pub log: Arc<SegmentLog>,
    pub meta: Arc<Meta>,
    pub ingest: Arc<Ingest>,
    pub mqtt: Server,
    /// The link listener, with `[link]`.
    pub link: Option<Arc<ferry_bridge::server::LinkServer>>,
    /// The Kafka listener's address, with `[kafka]`.
    pub kafka_addr: Option<SocketAddr>,
    routes: Arc<RouteTable>,
    stream_defaults: StreamConfig,
}

/// The metadata commands that create the streams `routes` write to.
fn create_commands(routes: &Routes, defaults: &StreamConfig) -> Vec<Command> {
    routes
        .streams()
        .into_iter()
        .map(|(name, partitions)| Command::CreateStream {
            name: name.to_owned(),
            config: StreamConfig {
                partitions,
                ..defaults.clone()
            },
        })
        .collect()
}

/// Creates the streams of `routes` (metadata, then log), and gives each partition without a
/// delivery cursor one at its end: MQTT subscribers get what is appended from now on; the
/// history is for Kafka consumers.
fn add_streams(
    meta: &Meta,
    log: &SegmentLog,
    routes: &Routes,
    defaults: &StreamConfig,
) -> Result<(), NodeError> {
    meta.apply(&create_commands(routes, defaults))?;
    let configs: HashMap<String, StreamConfig> = meta.streams()?.into_iter().collect();
    for (name, _) in routes.streams() {
        if let Some(c) = configs.get(name) {
            log.create_stream(name, c)?;
        }
    }
    let mut start_cursors = Vec::new();
    for stream in log.streams() {
        for (p, info) in stream.partitions.iter().enumerate() {
            if meta.cursor(MQTT_CURSOR, &stream.name, p as u32)?.is_none() {
                start_cursors.push(Command::CommitCursor {
                    group: MQTT_CURSOR.into(),
                    stream: stream.name.clone(),
                    partition: p as u32,
                    offset: info.offsets.high_watermark,
                });
            }
        }
    }
    meta.apply(&start_cursors)?;
    Ok(())
}

impl Node {
    /// Opens the data directory, recovers the log, creates the routes' streams and starts
    /// the MQTT front. Serving stops when `shutdown` completes.
    pub async fn start(
        config: CloudConfig,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> Result<Self, NodeError> {
        let data = config.server.data_dir.clone();
        std::fs::create_dir_all(&data)?;
        let meta = Arc::new(Meta::open(&data.join("meta.redb"))?);
        let routes = Routes::new(&config.routes)?;
        meta.apply(&create_commands(&routes, &config.log.streams))?;
        let streams: HashMap<String, StreamConfig> = meta.streams()?.into_iter().collect();
        let log = SegmentLog::open_with(
            &data.join("log"),
            config.log.fsync,
            config.log.queue_requests,
            &streams,
        )?;
        for (path, damage) in log.damage() {
            warn!(path = %path.display(), ?damage, "log recovery");
        }
        for (name, c) in &streams {
            log.create_stream(name, c)?;
        }
        add_streams(&meta, &log, &routes, &config.log.streams)?;
        let routes = Arc::new(RouteTable::new(routes));
        let ingest = Arc::new(Ingest::new(log.clone(), meta.clone(), routes.clone())?);
        let link = match &config.link {
            Some(c) => Some(ferry_bridge::server::LinkServer::start(
                c.server_config(),
                Arc::new(crate::link::IngestSink {
                    ingest: ingest.clone(),
                    log: log.clone(),
                    meta: meta.clone(),
                }),
            )?),
            None => None,
        };

        let (deliveries_tx, deliveries) = mpsc::channel(DELIVERY_QUEUE);
        let sent: Arc<Mutex<VecDeque<(String, u32, i64)>>> = Arc::default();
        let cursor: Arc<Mutex<HashMap<(String, u32), i64>>> = Arc::default();
        let hooks = LogHooks {
            append: Box::new({
                let log = log.clone();
                let routes = routes.clone();
                move |messages| append(log.clone(), routes.clone(), messages)
            }),
            deliveries,
            delivered: Box::new({
                let sent = sent.clone();
                let cursor = cursor.clone();
                move |n| {
                    let mut sent = sent.lock().unwrap_or_else(|e| e.into_inner());
                    let mut cursor = cursor.lock().unwrap_or_else(|e| e.into_inner());
                    let n = n.min(sent.len());
                    for (stream, partition, offset) in sent.drain(..n) {
                        cursor.insert((stream, partition), offset + 1);
                    }
                }
            }),
        };
        let mqtt = start_mqtt(config.edge(), hooks, shutdown).await?;

        let tail = Tailer {
            log: log.clone(),
            meta: meta.clone(),
            tx: deliveries_tx,
            sent,
            cursor,
        };
        std::thread::Builder::new()
            .name("ferry-tailer".into())
            .spawn(move || tail.run())?;
        let retention = Duration::from_secs(config.log.retention_check_secs.max(1));
        let retained_log = log.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(retention).await;
                let log = retained_log.clone();
                match tokio::task::spawn_blocking(move || log.enforce_retention()).await {
                    Ok(Ok(0)) => {}
                    Ok(Ok(n)) => info!(segments = n, "retention removed segments"),
                    Ok(Err(e)) => error!(error = %e, "retention failed"),
                    Err(_) => return,
                }
            }
        });
        let kafka_addr = match &config.kafka {
            Some(k) => Some(
                crate::kafka::KafkaFront {
                    log: log.clone(),
                    meta: meta.clone(),
                    config: k.clone(),
                    stream_defaults: config.log.streams.clone(),
                    producers: Arc::new(Mutex::new(crate::kafka::producers_from_log(&log))),
                    groups: Default::default(),
                    routes: routes.clone(),
                }
                .serve()
                .await?,
            ),
            None => None,
        };
        info!(data_dir = %data.display(), streams = streams.len(), "cloud node started");
        Ok(Self {
            log,
            meta,
            ingest,
            mqtt,
            link,
            kafka_addr,
            routes,
            stream_defaults: config.log.streams,
        })
    }

    /// Puts new routes in force (SIGHUP), creating the streams they name. Invalid routes
    /// are refused and the old ones stay.
    pub fn reload_routes(&self, configs: &[RouteConfig]) -> Result<(), NodeError> {
        let routes = Routes::new(configs)?;
        add_streams(&self.meta, &self.log, &routes, &self.stream_defaults)?;
        self.routes.set(routes);
        Ok(())
    }

    /// The MQTT listeners' addresses.
    pub fn mqtt_addrs(&self) -> &[SocketAddr] {
        self.mqtt.local_addrs()
    }
}

/// Starts the MQTT front on a thread of its own with a current-thread runtime, as
/// `ferry-edge` runs: one I/O thread serves packets from different connections in the order
/// they arrived, so a PUBLISH cannot overtake another client's SUBSCRIBE sent before it.
async fn start_mqtt(
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
    log: Arc<SegmentLog>,
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

/// Follows the end of every partition and hands each record to the broker as a message.
struct Tailer {
    log: Arc<SegmentLog>,
    meta: Arc<Meta>,
    tx: mpsc::Sender<Arc<Message>>,
    /// Records handed to the broker and not yet routed, in order.
    sent: Arc<Mutex<VecDeque<(String, u32, i64)>>>,
    /// The next offset per partition that the broker has not yet routed.
    cursor: Arc<Mutex<HashMap<(String, u32), i64>>>,
}

impl Tailer {
    fn run(self) {
        // A runtime of its own, only to wait for commits with a timeout: the node's runtime
        // may be shutting down while this thread waits.
        let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
        else {
            error!("cannot start the delivery tailer");
            return;
        };
        let mut commits = self.log.watch_commits();
        let mut positions: HashMap<(String, u32), i64> = HashMap::new();
        let mut committed: HashMap<(String, u32), i64> = HashMap::new();
        let mut last_commit = Instant::now();
        loop {
            let seen = *commits.borrow_and_update();
            let mut progressed = false;
            let streams = self.log.streams();
            // A deleted stream's positions go (a stream made again under its name starts
            // from its own beginning).
            let live = |(s, _): &(String, u32)| streams.iter().any(|st| st.name == *s);
            positions.retain(|k, _| live(k));
            committed.retain(|k, _| live(k));
            self.lock_cursor().retain(|k, _| live(k));
            for stream in streams {
                for (p, info) in stream.partitions.iter().enumerate() {
                    let key = (stream.name.clone(), p as u32);
                    let pos = match positions.get(&key) {
                        // (Past the end only if the stream was deleted and made again.)
                        Some(&pos) if pos <= info.offsets.high_watermark => pos,
                        _ => {
                            // Where the broker stopped routing last time (set at start for
                            // the streams of that time); a stream created later, from its
                            // start.
                            let stored = self
                                .meta
                                .cursor(MQTT_CURSOR, &stream.name, p as u32)
                                .ok()
                                .flatten();
                            let pos = stored
                                .unwrap_or(info.offsets.log_start)
                                .max(info.offsets.log_start);
                            if stored != Some(pos) {
                                // Durable at once: what is appended from now on is delivered
                                // even if the node dies before the next cursor commit.
                                let start = Command::CommitCursor {
                                    group: MQTT_CURSOR.into(),
                                    stream: stream.name.clone(),
                                    partition: p as u32,
                                    offset: pos,
                                };
                                if let Err(e) = self.meta.apply(&[start]) {
                                    error!(error = %e, "cannot record the delivery cursor");
                                }
                            }
                            committed.insert(key.clone(), pos);
                            self.lock_cursor().entry(key.clone()).or_insert(pos);
                            pos
                        }
                    };
                    if pos >= info.offsets.high_watermark {
                        positions.insert(key, pos);
                        continue;
                    }
                    match self.forward(&stream.name, p as u32, pos) {
                        Ok(next) => {
                            progressed |= next > pos;
                            positions.insert(key, next);
                        }
                        Err(None) => return,
                        Err(Some(e)) => {
                            error!(stream = %stream.name, partition = p, offset = pos, error = %e, "cannot read the log for delivery");
                            positions.insert(key, pos);
                        }
                    }
                }
            }
            if last_commit.elapsed() >= CURSOR_COMMIT_INTERVAL {
                last_commit = Instant::now();
                let cursor = self.lock_cursor().clone();
                let moved: Vec<Command> = cursor
                    .iter()
                    .filter(|(k, v)| committed.get(*k) != Some(*v))
                    .map(|((stream, partition), offset)| Command::CommitCursor {
                        group: MQTT_CURSOR.into(),
                        stream: stream.clone(),
                        partition: *partition,
                        offset: *offset,
                    })
                    .collect();
                if !moved.is_empty() {
                    match self.meta.apply(&moved) {
                        Ok(()) => committed = cursor,
                        Err(e) => error!(error = %e, "cannot record the delivery cursor"),
                    }
                }
            }
            if !progressed {
                // Wait for a commit, or a second (to record the cursor, find new streams).
                let mut commits = commits.clone();
                let changed = runtime.block_on(async move {
                    if *commits.borrow() != seen {
                        return true;
                    }
                    tokio::time::timeout(Duration::from_secs(1), commits.changed())
                        .await
                        .map_or(true, |r| r.is_ok())
                });
                if !changed {
                    return;
                }
            }
        }
    }

    fn lock_cursor(&self) -> std::sync::MutexGuard<'_, HashMap<(String, u32), i64>> {
        self.cursor.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Hands the records from `offset` (up to 1 MiB of batches) to the broker; the next
    /// offset. Err(None) when the broker is gone.
    fn forward(&self, stream: &str, partition: u32, offset: i64) -> Result<i64, Option<LogError>> {
        let r = self
            .log
            .read(stream, partition, offset, READ_BUDGET_BYTES)
            .map_err(Some)?;
        let mut next = offset;
        let now = now_ms();
        for batch in r.iter() {
            let (h, whole) = batch.map_err(Some)?;
            // A Kafka producer's batch may be compressed; more than this uncompressed is not
            // delivered to MQTT (it stays in the log for Kafka consumers).
            let open = uncompressed(whole, MAX_UNCOMPRESSED_BYTES);
            if let Some(recs) = open.as_deref().ok().and_then(|b| records(b).ok()) {
                for rec in recs.flatten().filter(|rec| rec.offset >= offset) {
                    let Some(view) = from_record(&rec, now) else {
                        // Not an MQTT message (no topic key, or expired): nothing to deliver,
                        // but the cursor passes it.
                        self.sent_push(stream, partition, rec.offset);
                        self.tx_message(None)?;
                        continue;
                    };
                    let msg = Message {
                        topic: view.topic,
                        payload: view.payload,
                        qos: view.qos,
                        retain: view.retain,
                        properties: view.properties,
                        expires_at: view
                            .expiry_left_secs
                            .map(|s| Instant::now() + Duration::from_secs(s.into())),
                        publisher: view.client.map(Arc::from),
                    };
                    self.sent_push(stream, partition, rec.offset);
                    self.tx_message(Some(msg))?;
                }
            }
            next = h.last_offset() + 1;
        }
        Ok(next)
    }

    fn sent_push(&self, stream: &str, partition: u32, offset: i64) {
        self.sent
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push_back((stream.to_owned(), partition, offset));
    }

    fn tx_message(&self, msg: Option<Message>) -> Result<(), Option<LogError>> {
        // A record that is not a message still counts as a delivery, so that the cursor
        // moves past it in order: it goes to the broker as an already expired message.
        let msg = msg.unwrap_or_else(|| Message {
            topic: ferry_protocol::topic::TopicName::new("$ferry/skipped").expect("a valid topic"),
            payload: bytes::Bytes::new(),
            qos: ferry_protocol::mqtt::QoS::AtMostOnce,
            retain: false,
            properties: Default::default(),
            expires_at: Some(
                Instant::now()
                    .checked_sub(Duration::from_secs(60))
                    .unwrap_or_else(Instant::now),
            ),
            publisher: None,
        });
        self.tx.blocking_send(Arc::new(msg)).map_err(|_| None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A commented-out table of the example: from its `header` line to the next blank line,
    /// its settings uncommented, trailing comments cut.
    fn commented_table(text: &str, header: &str) -> String {
        text.lines()
            .skip_while(|l| !l.starts_with(header))
            .take_while(|l| !l.trim().is_empty())
            .filter(|l| l.starts_with(header) || l.contains(" = "))
            .map(|l| {
                l.trim_start_matches("# ")
                    .split(" #")
                    .next()
                    .unwrap_or_default()
                    .to_owned()
                    + "\n"
            })
            .collect()
    }

    #[test]
    fn the_example_config_parses_and_matches_the_defaults() {
        let text = include_str!("../ferry-cloud.example.toml");
        let config: CloudConfig = toml::from_str(text).expect("example parses");
        config.edge().validate().expect("example is valid");
        let d = CloudConfig::default();
        assert_eq!(config.server.listen, d.server.listen);
        assert_eq!(config.server.data_dir, d.server.data_dir);
        assert_eq!(config.log.fsync, d.log.fsync);
        assert_eq!(config.log.queue_requests, d.log.queue_requests);
        assert_eq!(config.log.retention_check_secs, d.log.retention_check_secs);
        assert_eq!(config.log.streams, d.log.streams);
        assert_eq!(config.storage.cache_bytes, d.storage.cache_bytes);
        assert!(config.routes.is_empty() && config.admin.listen.is_none());
        // The commented route example is a valid route.
        let route = commented_table(text, "# [[route]]");
        let with_route: CloudConfig = toml::from_str(&route).expect("route example parses");
        Routes::new(&with_route.routes).expect("route example is valid");
        // The commented [link] example parses, and its numbers are the defaults.
        let link = commented_table(text, "# [link]");
        let with_link: CloudConfig = toml::from_str(&link).expect("link example parses");
        let (got, d) = (
            with_link.link.expect("[link]"),
            crate::link::LinkConfig::default(),
        );
        assert_eq!(got.listen, d.listen);
        assert_eq!(got.credit_bytes, d.credit_bytes);
        assert_eq!(got.max_frame_bytes, d.max_frame_bytes);
        assert_eq!(
            (got.keepalive_secs, got.idle_timeout_secs),
            (d.keepalive_secs, d.idle_timeout_secs)
        );
        assert!(got.deny_file.is_some());
        // And the [kafka] example, with its defaults.
        let kafka = commented_table(text, "# [kafka]");
        let with_kafka: CloudConfig = toml::from_str(&kafka).expect("kafka example parses");
        let (got, d) = (
            with_kafka.kafka.expect("[kafka]"),
            crate::kafka::KafkaConfig::default(),
        );
        assert_eq!(got.listen, d.listen);
        assert_eq!(got.max_request_bytes, d.max_request_bytes);
        assert_eq!(got.auto_create_topics, d.auto_create_topics);
    }
}
