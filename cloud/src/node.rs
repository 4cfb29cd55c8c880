//! One cloud node: the log, its metadata, the routes, the link's ingest and the fronts
//! wired together ([`Node::start`]).
//!
//! Threads and runtimes, and why:
//! - the node's runtime (multi-threaded, the binary's `main`): the admin API, the link's
//!   server (QUIC), the Kafka front, retention passes; metadata writes and log reads go to
//!   tokio's blocking pool;
//! - the MQTT front ([`crate::mqtt`]): a current-thread runtime on a thread of its own for
//!   its connections (one I/O thread keeps packets of different clients in the order they
//!   arrived), the broker's router thread (it may block on a commit), and the tailer thread
//!   that reads the log for delivery (blocking file IO);
//! - the AMQP front ([`crate::amqp`], with `[amqp]`): its broker thread (a current-thread
//!   runtime: every queue, consumer and confirm without locks; it reads the log itself) and
//!   the state writer thread that commits queue positions to the metadata off it;
//! - the log's appender thread ([`crate::log`]): its single writer, with group commit.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_edge::server::{Server, StartError};
use tracing::{error, info, warn};

use crate::config::LogBackend;
pub use crate::config::{AdminConfig, CloudConfig, LogConfig};
use crate::ingest::{Ingest, IngestError};
use crate::log::{LogError, ObjectLog, PgMeta, SegmentLog, Storage, StreamConfig};
use crate::meta::{Command, Meta, MetaError};
pub use crate::mqtt::MQTT_CURSOR;
use crate::routes::{RouteConfig, RouteError, RouteTable, Routes};

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
    #[error(transparent)]
    Amqp(#[from] crate::amqp::AmqpError),
    #[error("link: {0}")]
    Link(#[from] ferry_bridge::cloud_listener::StartError),
}

/// A running node.
#[derive(Debug, Clone)]
pub struct Node {
    pub log: Arc<dyn Storage>,
    pub meta: Arc<Meta>,
    pub ingest: Arc<Ingest>,
    pub mqtt: Server,
    /// The link listener, with `[link]`.
    pub link: Option<Arc<ferry_bridge::cloud_listener::LinkServer>>,
    /// The Kafka listener's address, with `[kafka]`.
    pub kafka_addr: Option<SocketAddr>,
    /// The Kafka front's consumer groups (their members), with `[kafka]`.
    pub kafka_groups: Option<Arc<crate::kafka::groups::Groups>>,
    /// The AMQP listener's address, with `[amqp]`.
    pub amqp_addr: Option<SocketAddr>,
    /// The AMQP front, with `[amqp]`.
    pub amqp: Option<crate::amqp::AmqpFront>,
    /// The log on object storage, when that is the backend: this node is registered among
    /// the nodes on its store and database ([`ObjectLog::members`], `/api/cluster`).
    pub object: Option<Arc<ObjectLog>>,
    /// The other nodes as the Kafka front sees them (empty unless this node is one of
    /// several on the object backend): refreshed every second from the members.
    pub cluster: Arc<crate::kafka::cluster::ClusterView>,
    routes: Arc<RouteTable>,
    stream_defaults: StreamConfig,
    /// On the object backend, until the node joined: what the MQTT front tells the cluster.
    mqtt_sessions: Arc<std::sync::Mutex<Option<crate::mqtt::clients::Hooks>>>,
}

/// This node's name on the object backend when `[log.object] node` is not set: made up once
/// (12 hex digits) and kept in `<data_dir>/node-name`, so that a node started again on its
/// data directory takes its own place among the nodes rather than looking like a second one
/// until the first one's lease runs out.
fn node_name(data: &std::path::Path) -> std::io::Result<String> {
    let path = data.join("node-name");
    match std::fs::read_to_string(&path) {
        Ok(name) if !name.trim().is_empty() => Ok(name.trim().to_owned()),
        _ => {
            let mut b = [0u8; 6];
            getrandom::fill(&mut b).map_err(|e| std::io::Error::other(e.to_string()))?;
            let name: String = b.iter().map(|x| format!("{x:02x}")).collect();
            std::fs::write(&path, &name)?;
            Ok(name)
        }
    }
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
    log: &dyn Storage,
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
    /// Opens the data directory, recovers the log on local disk (`<data_dir>/log`), creates
    /// the routes' streams and starts the fronts. Serving stops when `shutdown` completes.
    pub async fn start(
        config: CloudConfig,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> Result<Self, NodeError> {
        let data = config.server.data_dir.clone();
        std::fs::create_dir_all(&data)?;
        let routes = Routes::new(&config.routes)?;
        let mut on_object = None;
        let (meta, log): (Arc<Meta>, Arc<dyn Storage>) = match config.log.backend {
            LogBackend::Local => {
                let meta = Arc::new(Meta::open(&data.join("meta.redb"))?);
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
                (meta, log)
            }
            LogBackend::Object => {
                let mut object = config.log.object.clone().ok_or_else(|| {
                    LogError::Failed("[log] backend = \"object\" needs a [log.object] table".into())
                })?;
                if object.node.is_none() {
                    object.node = Some(node_name(&data)?);
                }
                let log = tokio::task::spawn_blocking(move || ObjectLog::open(&object))
                    .await
                    .map_err(|e| LogError::Failed(e.to_string()))??;
                // The metadata beside the log's index, in PostgreSQL.
                let meta = Meta::shared(&data.join("meta.redb"), PgMeta::new(log.clone()))?;
                on_object = Some(log.clone());
                (Arc::new(meta), log)
            }
        };
        let advertised = config.kafka.as_ref().and_then(|k| k.advertised.clone());
        let mut node = Self::start_on(config, meta, log, shutdown).await?;
        if let Some(object) = on_object {
            // Registered once its fronts listen, with their addresses (Kafka's as clients
            // are to reach it).
            let kafka = node.kafka_addr.map(|a| {
                advertised.unwrap_or_else(|| {
                    let host = if a.ip().is_unspecified() {
                        "localhost".to_owned()
                    } else {
                        a.ip().to_string()
                    };
                    format!("{host}:{}", a.port())
                })
            });
            let addrs = serde_json::json!({
                "mqtt": node.mqtt_addrs(),
                "kafka": kafka,
                "amqp": node.amqp_addr,
                "link": node.link.as_ref().map(|l| l.local_addr()),
            });
            let o = object.clone();
            tokio::task::spawn_blocking(move || o.join(addrs))
                .await
                .map_err(|e| LogError::Failed(e.to_string()))??;
            info!(
                node = object.node(),
                "registered among the nodes on the object store"
            );
            // The Kafka front's view of the cluster (its leases in the same database),
            // refreshed every second.
            node.cluster.set_store(object.clone());
            // One session per MQTT client id in the cluster.
            let hooks = node
                .mqtt_sessions
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take();
            if let Some(hooks) = hooks {
                // What the cluster retained before this node followed the log.
                crate::mqtt::clients::seed_retained(&object, &node.mqtt).await;
                let registry = crate::mqtt::clients::Registry {
                    log: object.clone(),
                    server: node.mqtt.clone(),
                    storage: node.log.clone(),
                    routes: node.routes.clone(),
                };
                tokio::spawn(crate::mqtt::clients::run(registry, hooks));
            }
            let (view, members) = (Arc::downgrade(&node.cluster), object.clone());
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(1));
                loop {
                    tick.tick().await;
                    let Some(view) = view.upgrade() else { return };
                    let m = members.clone();
                    let Ok(found) = tokio::task::spawn_blocking(move || m.members()).await else {
                        return;
                    };
                    match found {
                        Ok(found) => {
                            let nodes: Vec<(String, Option<String>)> = found
                                .into_iter()
                                .map(|n| {
                                    let kafka = n.addrs["kafka"].as_str().map(str::to_owned);
                                    (n.name, kafka)
                                })
                                .collect();
                            view.set(members.node(), &nodes);
                        }
                        Err(e) => warn!(error = %e, "cannot read the cluster's nodes"),
                    }
                }
            });
            node.object = Some(object);
        }
        Ok(node)
    }

    /// Starts the node over `log`, any [`Storage`] backend, with the metadata `meta`: creates
    /// the streams the metadata knows and the routes write to, then starts the link, the
    /// MQTT front, the Kafka front and retention. Every front reads and writes through the
    /// trait only.
    pub async fn start_on(
        config: CloudConfig,
        meta: Arc<Meta>,
        log: Arc<dyn Storage>,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> Result<Self, NodeError> {
        let routes = Routes::new(&config.routes)?;
        meta.apply(&create_commands(&routes, &config.log.streams))?;
        let streams: HashMap<String, StreamConfig> = meta.streams()?.into_iter().collect();
        for (name, c) in &streams {
            log.create_stream(name, c)?;
        }
        add_streams(&meta, &*log, &routes, &config.log.streams)?;
        let routes = Arc::new(RouteTable::new(routes));
        let ingest = Arc::new(Ingest::new(log.clone(), meta.clone(), routes.clone())?);
        let cluster = crate::kafka::cluster::ClusterView::new();
        if config.log.backend == LogBackend::Object {
            cluster.set_clustered();
        }
        let link = match &config.link {
            Some(c) => Some(ferry_bridge::cloud_listener::LinkServer::start(
                c.server_config(),
                Arc::new(crate::link_sink::IngestSink {
                    ingest: ingest.clone(),
                    log: log.clone(),
                    meta: meta.clone(),
                    cluster: cluster.clone(),
                }),
            )?),
            None => None,
        };

        let (mqtt, mqtt_sessions) = crate::mqtt::start(
            config.edge(),
            log.clone(),
            meta.clone(),
            routes.clone(),
            config.log.mqtt_max_lag_records,
            config.log.backend == LogBackend::Object,
            shutdown,
        )
        .await?;
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
        let kafka_groups = config.kafka.as_ref().map(|_| Arc::default());
        let kafka_addr = match &config.kafka {
            Some(k) => Some(
                crate::kafka::KafkaFront {
                    log: log.clone(),
                    meta: meta.clone(),
                    config: k.clone(),
                    stream_defaults: config.log.streams.clone(),
                    producers: Arc::new(Mutex::new(crate::kafka::producers_from_log(&*log))),
                    groups: kafka_groups.clone().unwrap_or_default(),
                    routes: routes.clone(),
                    cluster: cluster.clone(),
                }
                .serve()
                .await?,
            ),
            None => None,
        };
        let amqp = match &config.amqp {
            Some(a) => Some(
                crate::amqp::start(
                    a,
                    (
                        config.auth.password_file.clone(),
                        config.auth.acl_file.clone(),
                    ),
                    log.clone(),
                    meta.clone(),
                    routes.clone(),
                )
                .await?,
            ),
            None => None,
        };
        let amqp_addr = amqp.as_ref().map(|a| a.addr);
        info!(data_dir = %config.server.data_dir.display(), streams = streams.len(), "cloud node started");
        Ok(Self {
            log,
            meta,
            ingest,
            mqtt,
            link,
            kafka_addr,
            kafka_groups,
            amqp_addr,
            amqp,
            object: None,
            cluster,
            routes,
            stream_defaults: config.log.streams,
            mqtt_sessions: Arc::new(std::sync::Mutex::new(mqtt_sessions)),
        })
    }

    /// Puts new routes in force (SIGHUP), creating the streams they name. Invalid routes
    /// are refused and the old ones stay.
    pub fn reload_routes(&self, configs: &[RouteConfig]) -> Result<(), NodeError> {
        let routes = Routes::new(configs)?;
        add_streams(&self.meta, &*self.log, &routes, &self.stream_defaults)?;
        self.routes.set(routes);
        Ok(())
    }

    /// The MQTT listeners' addresses.
    pub fn mqtt_addrs(&self) -> &[SocketAddr] {
        self.mqtt.local_addrs()
    }

    /// Where this node's MQTT clients go when it drains: one `host:port` for each other live
    /// node of the cluster, by name (see [`mqtt_reference`]). Empty alone, or when the nodes
    /// cannot be read.
    pub async fn other_nodes_mqtt(&self) -> Vec<String> {
        let Some(object) = self.object.clone() else {
            return Vec::new();
        };
        let me = object.node().to_owned();
        match tokio::task::spawn_blocking(move || object.members()).await {
            Ok(Ok(members)) => members
                .iter()
                .filter(|m| m.name != me)
                .filter_map(|m| mqtt_reference(&m.addrs))
                .collect(),
            Ok(Err(e)) => {
                warn!(error = %e, "cannot read the other nodes: MQTT clients not sent to one");
                Vec::new()
            }
            Err(_) => Vec::new(),
        }
    }
}

/// A node's first MQTT address as it registered it (`addrs.mqtt`), for a client elsewhere:
/// a listener on every address (0.0.0.0) is named by the host the node advertises to Kafka
/// clients (`[kafka] advertised`), and has no usable name without one.
fn mqtt_reference(addrs: &serde_json::Value) -> Option<String> {
    let first: SocketAddr = addrs["mqtt"].get(0)?.as_str()?.parse().ok()?;
    if !first.ip().is_unspecified() {
        return Some(first.to_string());
    }
    let (host, _) = addrs["kafka"].as_str()?.rsplit_once(':')?;
    (host != "localhost").then(|| format!("{host}:{}", first.port()))
}

#[cfg(test)]
mod tests {
    use super::mqtt_reference;
    use serde_json::json;

    #[test]
    fn a_nodes_mqtt_reference_is_its_address_or_its_advertised_host() {
        let named = json!({"mqtt": ["10.0.0.7:1883", "10.0.0.7:1884"], "kafka": "k:9092"});
        assert_eq!(mqtt_reference(&named).as_deref(), Some("10.0.0.7:1883"));
        let every = json!({"mqtt": ["0.0.0.0:1883"], "kafka": "node-2.ferry:9092"});
        assert_eq!(mqtt_reference(&every).as_deref(), Some("node-2.ferry:1883"));
        let unnamed = json!({"mqtt": ["0.0.0.0:1883"], "kafka": "localhost:9092"});
        assert_eq!(mqtt_reference(&unnamed), None);
        assert_eq!(mqtt_reference(&json!({"mqtt": []})), None);
    }
}
