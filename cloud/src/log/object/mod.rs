//! The log on object storage, its metadata in PostgreSQL (`docs/object-log.md`).
//!
//! ```text
//! append ──▶ flusher (one task) ──one object per flush──▶ object store
//!                │ ──one transaction: offsets, runs──▶ PostgreSQL
//!                └─ then answers, updates the partitions and the cache, tells readers
//! read ──▶ partition's runs (memory, else PostgreSQL) ──▶ cache, else a ranged GET
//! ```
//!
//! The backend runs its own tokio runtime (two threads) for the store and the database, so
//! that the `Storage` methods that are synchronous (`read`, `create_stream`…) can wait on it
//! from any thread, the fronts' runtimes included, as they wait on a file read.
//!
//! Built so far: appends (one object and one commit per flush, idempotent by flush id),
//! reads with a bounded cache, streams, offsets, offsets by time, retention by bytes and age
//! (rows first, then the objects no row refers to, after a grace), the collector of objects a
//! crashed flush left, other nodes' commits followed (`listen.rs`), compaction
//! (`compact.rs`), and the node's metadata in the same database (`meta.rs`).

pub(crate) mod clients;
mod compact;
pub(crate) mod format;
pub(crate) mod leases;
mod listen;
pub(crate) mod members;
pub(crate) mod meta;
pub(crate) mod pg;
#[cfg(test)]
pub(crate) mod tests;

/// For tests of the object backend, here and in `tests/`: not part of the API.
#[doc(hidden)]
pub mod testing {
    /// A fresh, empty database for `test` on the PostgreSQL server named by `FERRY_TEST_PG`
    /// (a libpq connection string; `scripts/test.sh` starts a server and sets it): its
    /// connection string. Panics with what to do when there is none.
    pub fn database(test: &str) -> String {
        make(test, true)
    }

    /// The database for `test`, made if it is not there yet, kept if it is (a node started
    /// again on it finds what it wrote).
    pub fn database_kept(test: &str) -> String {
        make(test, false)
    }

    fn make(test: &str, fresh: bool) -> String {
        let server = std::env::var("FERRY_TEST_PG").unwrap_or_else(|_| {
            panic!(
                "the object backend's tests need PostgreSQL: run scripts/test.sh (it starts \
                 one) or set FERRY_TEST_PG to a libpq connection string"
            )
        });
        let name = format!(
            "t_{}_{}",
            test.replace(|c: char| !c.is_ascii_alphanumeric(), "_"),
            std::process::id()
        );
        let create = server.clone();
        let db = name.clone();
        // A thread and a runtime of its own: the caller may be inside a runtime.
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let (client, conn) = tokio_postgres::connect(&create, tokio_postgres::NoTls)
                    .await
                    .expect("connect to FERRY_TEST_PG");
                tokio::spawn(conn);
                if fresh {
                    client
                        .batch_execute(&format!("DROP DATABASE IF EXISTS {db}"))
                        .await
                        .expect("drop the test database");
                }
                let there = client
                    .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&db])
                    .await
                    .expect("look for the test database")
                    .is_some();
                if !there {
                    client
                        .batch_execute(&format!("CREATE DATABASE {db}"))
                        .await
                        .expect("create the test database");
                }
            });
        })
        .join()
        .expect("create the test database");
        format!("{server} dbname={name}")
    }
}

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use ferry_protocol::kafka::batch::BatchHeader;
use futures_util::TryStreamExt;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use serde::Deserialize;
use tokio::sync::{mpsc, oneshot, watch, Semaphore};
use tracing::{error, info, warn};

use super::sequence::ProducerBatch;
use super::{
    now_ms, valid_stream_name, AppendData, AppendFuture, Appended, Counters, Encoder, LogError,
    LogStats, Offsets, PartitionInfo, ReadResult, Storage, StreamConfig, StreamInfo,
};
use format::RunStats;
use listen::Streams;
use pg::RunRow;

/// `[storage]` for `backend = "object"` (see `docs/object-log.md`, "Configuration").
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ObjectConfig {
    /// `s3://bucket/prefix` or `file:///dir`.
    pub object_url: String,
    /// A `postgres://` URL or a libpq connection string.
    pub postgres_url: String,
    /// A flush at least this often while appends wait (ms). Default 100.
    pub flush_ms: u64,
    /// Or as soon as this many bytes wait. Default 4 MiB.
    pub flush_bytes: usize,
    /// Bytes of appends not yet committed above which `append` waits. Default 64 MiB.
    pub buffer_bytes: usize,
    /// An append not committed by then fails (ms). Default 30,000.
    pub append_timeout_ms: u64,
    /// Bytes of runs this node keeps in memory for reads. Default 64 MiB.
    pub cache_bytes: usize,
    /// Connections to PostgreSQL at most. Default 8.
    pub postgres_pool: usize,
    /// This node's name in object keys. Default: a random one per start.
    pub node: Option<String>,
    /// An object no database row refers to (a flush that crashed before its commit), or one
    /// retention let go of, is deleted after this long (s): far longer than any commit or
    /// read in progress. Default 600.
    pub orphan_grace_secs: u64,
    /// What compaction aims at: a partition's runs smaller than half of this are rewritten
    /// together into runs of up to this many bytes. Default 64 MiB.
    pub compact_bytes: u64,
    /// A node's lease in the `nodes` table (ms): renewed three times per lease; a node that
    /// stopped renewing is gone for the others this long after its last renewal. Default
    /// 10,000.
    pub lease_ms: u64,
    /// `[storage.s3]`: for `s3://` URLs.
    pub s3: S3Config,
}

impl Default for ObjectConfig {
    fn default() -> Self {
        Self {
            object_url: String::new(),
            postgres_url: String::new(),
            flush_ms: 100,
            flush_bytes: 4 << 20,
            buffer_bytes: 64 << 20,
            append_timeout_ms: 30_000,
            cache_bytes: 64 << 20,
            postgres_pool: 8,
            node: None,
            orphan_grace_secs: 600,
            compact_bytes: 64 << 20,
            lease_ms: 10_000,
            s3: S3Config::default(),
        }
    }
}

/// `[storage.s3]`: an S3 endpoint; unset fields come from the usual `AWS_*` environment.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct S3Config {
    /// An S3-compatible server (path-style requests), e.g. `http://127.0.0.1:8333`.
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
    /// Plain HTTP to the endpoint. Default false.
    pub allow_http: bool,
}

/// Requests made of the object store since start, by kind: what a deployment pays for
/// (S3 bills PUT and LIST by the thousand, GET likewise, DELETE not at all).
#[derive(Debug, Default)]
struct Requests {
    put: AtomicU64,
    get: AtomicU64,
    delete: AtomicU64,
    list: AtomicU64,
}

/// [`ObjectLog::requests`]: counts since the log was opened.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RequestCounts {
    pub put: u64,
    pub get: u64,
    pub delete: u64,
    /// List requests (one per page of 1,000 keys).
    pub list: u64,
}

fn count(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

/// Runs of a partition kept in memory (the newest, and those read lately); older ones are
/// asked of PostgreSQL again.
const RUNS_IN_MEMORY: usize = 4096;
/// Runs asked of PostgreSQL in one query.
const RUNS_PER_QUERY: i64 = 64;

/// The log on object storage; see the module docs.
pub struct ObjectLog {
    runtime: Option<tokio::runtime::Runtime>,
    io: tokio::runtime::Handle,
    pool: deadpool_postgres::Pool,
    store: Arc<dyn ObjectStore>,
    state: Streams,
    /// Held while the set of streams changes (see [`listen::Listener`]).
    streams_lock: Arc<tokio::sync::Mutex<()>>,
    node: String,
    cache: Arc<Mutex<Cache>>,
    to_flusher: mpsc::UnboundedSender<Request>,
    budget: Arc<Semaphore>,
    buffer_bytes: usize,
    commits: watch::Receiver<u64>,
    counters: Arc<Counters>,
    requests: Arc<Requests>,
    grace: Duration,
    compact_bytes: u64,
    lease: Duration,
    /// The task that keeps this node's lease, once it joined.
    membership: Mutex<Option<tokio::task::AbortHandle>>,
    /// Where the listener sends claims of MQTT client ids ([`ObjectLog::follow_mqtt_clients`]).
    clients: listen::ClientsTx,
}

impl std::fmt::Debug for ObjectLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObjectLog").finish_non_exhaustive()
    }
}

impl Drop for ObjectLog {
    fn drop(&mut self) {
        // Never blocks (this may be dropped inside another runtime).
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

#[derive(Debug)]
struct StreamState {
    config: StreamConfig,
    parts: Vec<Mutex<PartState>>,
}

impl StreamState {
    /// A stream as the database has it.
    fn new(config: StreamConfig, parts: &[pg::PartitionRow]) -> Arc<Self> {
        Arc::new(Self {
            config,
            parts: parts
                .iter()
                .map(|p| {
                    Mutex::new(PartState {
                        next: p.next_offset,
                        start: p.log_start,
                        bytes: p.bytes.max(0) as u64,
                        ..PartState::default()
                    })
                })
                .collect(),
        })
    }
}

#[derive(Debug, Default)]
struct PartState {
    next: i64,
    start: i64,
    bytes: u64,
    /// Runs known here, by first offset (the newest, and those read lately).
    runs: BTreeMap<i64, RunRow>,
    deleted: bool,
}

impl PartState {
    /// What the database says of this partition now that another node moved it: offsets
    /// only ever move up, and runs before a new log start are forgotten.
    fn catch_up(&mut self, row: &pg::PartitionRow) {
        if row.next_offset >= self.next {
            self.bytes = row.bytes.max(0) as u64;
        }
        self.next = self.next.max(row.next_offset);
        if row.log_start > self.start {
            self.start = row.log_start;
            self.runs = self.runs.split_off(&row.log_start);
        }
    }

    fn remember(&mut self, run: RunRow) {
        self.runs.insert(run.first_offset, run);
        while self.runs.len() > RUNS_IN_MEMORY {
            self.runs.pop_first();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs' bytes as stored (relative offsets), least recently used first out.
#[derive(Debug, Default)]
struct Cache {
    /// Each run's bytes and when it was last used.
    runs: HashMap<(String, u64), (Bytes, u64)>,
    /// The runs by when they were last used, oldest first.
    order: BTreeMap<u64, (String, u64)>,
    tick: u64,
    bytes: usize,
    max: usize,
}

impl Cache {
    fn get(&mut self, key: &(String, u64)) -> Option<Bytes> {
        self.tick += 1;
        let tick = self.tick;
        let (bytes, used) = self.runs.get_mut(key)?;
        let k = self.order.remove(used)?;
        *used = tick;
        self.order.insert(tick, k);
        Some(bytes.clone())
    }

    fn put(&mut self, key: (String, u64), bytes: Bytes) {
        if bytes.len() > self.max || self.runs.contains_key(&key) {
            return;
        }
        self.tick += 1;
        self.bytes += bytes.len();
        self.runs.insert(key.clone(), (bytes, self.tick));
        self.order.insert(self.tick, key);
        while self.bytes > self.max {
            let Some((_, old)) = self.order.pop_first() else {
                break;
            };
            if let Some((b, _)) = self.runs.remove(&old) {
                self.bytes -= b.len();
            }
        }
    }
}

/// An idempotent producer silent this long is forgotten: its next batch is taken as it
/// comes (Kafka expires idle producer ids too).
const IDLE_PRODUCER_DAYS: i32 = 7;

struct Request {
    stream: String,
    partition: u32,
    data: AppendData,
    reply: oneshot::Sender<Result<Appended, LogError>>,
    /// The lease it was made under, checked in the commit ([`Storage::append_fenced`]).
    fence: Option<super::Fence>,
    /// About how many bytes it adds to a flush (measured once, in `append`).
    bytes: usize,
    /// Its share of the byte budget, given back when it is answered.
    _permit: tokio::sync::OwnedSemaphorePermit,
}

fn failed(what: &str, e: impl std::fmt::Display) -> LogError {
    LogError::Unavailable(format!("{what}: {e}"))
}

impl ObjectLog {
    /// Connects to the store and the database (applying the schema's migrations), loads the
    /// streams, and starts the flusher.
    pub fn open(config: &ObjectConfig) -> Result<Arc<Self>, LogError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("ferry-object-log")
            .enable_all()
            .build()
            .map_err(|e| failed("object log runtime", e))?;
        let io = runtime.handle().clone();
        let store = open_store(config)?;
        let pool = pg::pool(
            &config.postgres_url,
            config.postgres_pool.max(2),
            Duration::from_millis(config.append_timeout_ms.max(1000)),
        )
        .map_err(|e| failed("PostgreSQL", e))?;
        let state: Streams = Arc::default();
        {
            let pool = pool.clone();
            let loaded = wait(&io, async move {
                pg::migrate(&pool).await?;
                pg::streams(&pool.get().await?).await
            })?
            .map_err(|e| failed("PostgreSQL", e))?;
            let mut s = state.write().unwrap_or_else(|e| e.into_inner());
            for (name, config_json, parts) in loaded {
                let config: StreamConfig = serde_json::from_str(&config_json).unwrap_or_default();
                s.insert(name, StreamState::new(config, &parts));
            }
        }
        let cache = Arc::new(Mutex::new(Cache {
            max: config.cache_bytes,
            ..Cache::default()
        }));
        let (to_flusher, rx) = mpsc::unbounded_channel();
        let (commits_tx, commits) = watch::channel(0u64);
        let commits_tx = Arc::new(commits_tx);
        let counters = Arc::new(Counters::default());
        let requests = Arc::new(Requests::default());
        let node = config
            .node
            .clone()
            .unwrap_or_else(|| random_id()[..12].to_owned());
        let streams_lock = Arc::new(tokio::sync::Mutex::new(()));
        let clients = listen::ClientsTx::default();
        let mut listen_config: tokio_postgres::Config = config
            .postgres_url
            .parse()
            .map_err(|e| failed("PostgreSQL", e))?;
        listen_config
            .application_name("ferry-log-listen")
            .connect_timeout(Duration::from_secs(10));
        io.spawn(
            listen::Listener {
                config: listen_config,
                node: node.clone(),
                pool: pool.clone(),
                state: state.clone(),
                streams_lock: streams_lock.clone(),
                commits: commits_tx.clone(),
                clients: clients.clone(),
            }
            .run(),
        );
        let flusher = Flusher {
            store: store.clone(),
            pool: pool.clone(),
            state: state.clone(),
            cache: cache.clone(),
            commits: commits_tx,
            counters: counters.clone(),
            requests: requests.clone(),
            node: node.clone(),
            flush_every: Duration::from_millis(config.flush_ms.max(1)),
            flush_bytes: config.flush_bytes.max(1),
            timeout: Duration::from_millis(config.append_timeout_ms.max(1)),
        };
        io.spawn(flusher.run(rx));
        let buffer_bytes = config.buffer_bytes.max(1);
        Ok(Arc::new(Self {
            runtime: Some(runtime),
            io,
            pool,
            store,
            state,
            streams_lock,
            node,
            cache,
            to_flusher,
            budget: Arc::new(Semaphore::new(buffer_bytes)),
            buffer_bytes,
            commits,
            counters,
            requests,
            grace: Duration::from_secs(config.orphan_grace_secs),
            compact_bytes: config.compact_bytes.max(1),
            lease: Duration::from_millis(config.lease_ms.max(300)),
            membership: Mutex::new(None),
            clients,
        }))
    }

    /// This node's name among the nodes on the store and database.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// Registers this node in the database with `addrs` (its fronts' addresses) and keeps
    /// its lease (`lease_ms`) until [`ObjectLog::leave`] or until the log is dropped (then,
    /// as when the process dies, the lease runs out). See [`members`].
    pub fn join(&self, addrs: serde_json::Value) -> Result<(), LogError> {
        let (pool, node, lease) = (self.pool.clone(), self.node.clone(), self.lease);
        let a = addrs.clone();
        wait(&self.io, async move {
            members::register(&pool, &node, &a, lease).await
        })?
        .map_err(|e| failed("register the node", e))?;
        let keep = self.io.spawn(members::keep(
            self.pool.clone(),
            self.node.clone(),
            addrs,
            self.lease,
        ));
        if let Some(old) = lock(&self.membership).replace(keep.abort_handle()) {
            old.abort();
        }
        Ok(())
    }

    /// Stops renewing this node's lease and deletes its row: it is gone for every node now.
    pub fn leave(&self) -> Result<(), LogError> {
        if let Some(keep) = lock(&self.membership).take() {
            keep.abort();
        }
        let (pool, node) = (self.pool.clone(), self.node.clone());
        wait(&self.io, async move { members::leave(&pool, &node).await })?
            .map_err(|e| failed("unregister the node", e))
    }

    /// Takes or renews the lease on (`kind`, `key`) for this node for `ttl`: its token, or
    /// None when another node holds it (see [`leases`]).
    pub fn acquire_lease(
        &self,
        kind: &str,
        key: &str,
        ttl: Duration,
    ) -> Result<Option<i64>, LogError> {
        let (pool, node) = (self.pool.clone(), self.node.clone());
        let (kind, key) = (kind.to_owned(), key.to_owned());
        wait(&self.io, async move {
            leases::acquire(&pool, &kind, &key, &node, ttl).await
        })?
        .map_err(|e| failed("a lease", e))
    }

    /// Gives up this node's lease on (`kind`, `key`), if it holds it.
    pub fn release_lease(&self, kind: &str, key: &str) -> Result<(), LogError> {
        let (pool, node) = (self.pool.clone(), self.node.clone());
        let (kind, key) = (kind.to_owned(), key.to_owned());
        wait(&self.io, async move {
            leases::release(&pool, &kind, &key, &node).await
        })?
        .map_err(|e| failed("a lease", e))
    }

    /// Every lease held now, by kind and key.
    pub fn leases(&self) -> Result<Vec<leases::Held>, LogError> {
        let pool = self.pool.clone();
        wait(&self.io, async move { leases::held_now(&pool).await })?
            .map_err(|e| failed("the leases", e))
    }

    /// Who holds the lease on (`kind`, `key`) now, if anyone.
    pub fn lease_holder(&self, kind: &str, key: &str) -> Result<Option<leases::Lease>, LogError> {
        let pool = self.pool.clone();
        let (kind, key) = (kind.to_owned(), key.to_owned());
        wait(
            &self.io,
            async move { leases::holder(&pool, &kind, &key).await },
        )?
        .map_err(|e| failed("a lease", e))
    }

    /// Claims the MQTT client ids `ids` for this node (a connection with each was accepted
    /// here), telling every node; each id's token. Ids longer than
    /// [`clients::MAX_CLAIMED_ID`] are left out.
    pub fn claim_mqtt_clients(&self, ids: &[String]) -> Result<Vec<(String, i64)>, LogError> {
        let mut ids: Vec<String> = ids
            .iter()
            .filter(|id| id.len() <= clients::MAX_CLAIMED_ID)
            .cloned()
            .collect();
        ids.sort_unstable();
        ids.dedup();
        let (pool, node) = (self.pool.clone(), self.node.clone());
        wait(
            &self.io,
            async move { clients::claim(&pool, &node, &ids).await },
        )?
        .map_err(|e| failed("claim MQTT client ids", e))
    }

    /// Claims `id` for this node and takes the session recorded under the claim before (see
    /// [`clients::take_session`]): the claim's token and that session.
    pub fn take_mqtt_session(&self, id: &str) -> Result<(i64, Option<Vec<u8>>), LogError> {
        let (pool, node, id) = (self.pool.clone(), self.node.clone(), id.to_owned());
        wait(&self.io, async move {
            clients::take_session(&pool, &node, &id).await
        })?
        .map_err(|e| failed("take an MQTT session", e))
    }

    /// Records sessions held here under this node's claims (see
    /// [`clients::save_sessions`]).
    pub fn save_mqtt_sessions(
        &self,
        sessions: Vec<(String, i64, Option<Vec<u8>>)>,
    ) -> Result<(), LogError> {
        let (pool, node) = (self.pool.clone(), self.node.clone());
        wait(&self.io, async move {
            clients::save_sessions(&pool, &node, &sessions).await
        })?
        .map_err(|e| failed("record MQTT sessions", e))
    }

    /// Forgets this node's claims of `ids` (their sessions ended here).
    pub fn release_mqtt_clients(&self, ids: &[String]) -> Result<(), LogError> {
        let (pool, node, ids) = (self.pool.clone(), self.node.clone(), ids.to_vec());
        wait(&self.io, async move {
            clients::release(&pool, &node, &ids).await
        })?
        .map_err(|e| failed("release MQTT client ids", e))
    }

    /// The claims of `ids` there are: (client id, node, token).
    pub fn mqtt_client_owners(
        &self,
        ids: &[String],
    ) -> Result<Vec<(String, String, i64)>, LogError> {
        let (pool, ids) = (self.pool.clone(), ids.to_vec());
        wait(&self.io, async move { clients::owners(&pool, &ids).await })?
            .map_err(|e| failed("MQTT client ids", e))
    }

    /// Records the wills of connections accepted here (id, claim token, delay, PUBLISH
    /// packet), for another node to publish if this one dies (see [`clients::put_wills`]).
    pub fn put_mqtt_wills(&self, wills: Vec<(String, i64, u32, Vec<u8>)>) -> Result<(), LogError> {
        let (pool, node) = (self.pool.clone(), self.node.clone());
        wait(&self.io, async move {
            clients::put_wills(&pool, &node, &wills).await
        })?
        .map_err(|e| failed("record MQTT wills", e))
    }

    /// Forgets the wills of `ids` this node recorded.
    pub fn drop_mqtt_wills(&self, ids: &[String]) -> Result<(), LogError> {
        let (pool, node, ids) = (self.pool.clone(), self.node.clone(), ids.to_vec());
        wait(&self.io, async move {
            clients::drop_wills(&pool, &node, &ids).await
        })?
        .map_err(|e| failed("forget MQTT wills", e))
    }

    /// The wills of nodes that are gone (with `mine`, this node's own from before it
    /// started), now this node's to publish (see [`clients::take_orphans`]).
    pub fn take_orphan_wills(&self, mine: bool) -> Result<Vec<clients::Orphan>, LogError> {
        let (pool, node) = (self.pool.clone(), self.node.clone());
        wait(&self.io, async move {
            clients::take_orphans(&pool, &node, mine).await
        })?
        .map_err(|e| failed("take dead nodes' MQTT wills", e))
    }

    /// Records retained messages delivered from the log (see [`clients::put_retained`]).
    pub fn put_mqtt_retained(&self, rows: Vec<clients::RetainedRow>) -> Result<(), LogError> {
        let pool = self.pool.clone();
        wait(&self.io, async move {
            clients::put_retained(&pool, &rows).await
        })?
        .map_err(|e| failed("record retained MQTT messages", e))
    }

    /// Every retained message the cluster recorded: (topic, PUBLISH packet).
    pub fn mqtt_retained(&self) -> Result<Vec<(String, Vec<u8>)>, LogError> {
        let pool = self.pool.clone();
        wait(&self.io, async move { clients::retained(&pool).await })?
            .map_err(|e| failed("retained MQTT messages", e))
    }

    /// From now on, the claims of MQTT client ids other nodes make (this node's too), and a
    /// [`clients::ClientNotice::Resync`] whenever some may have been missed (the first comes
    /// when the listening connection is next made, or at once if it is up).
    pub fn follow_mqtt_clients(
        &self,
    ) -> tokio::sync::mpsc::UnboundedReceiver<clients::ClientNotice> {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let _ = tx.send(clients::ClientNotice::Resync);
        *lock(&self.clients) = Some(tx);
        rx
    }

    /// The nodes on this store and database whose lease has not run out (this one too once
    /// it joined), by name.
    pub fn members(&self) -> Result<Vec<members::Member>, LogError> {
        let pool = self.pool.clone();
        wait(&self.io, async move { members::live(&pool).await })?
            .map_err(|e| failed("the nodes", e))
    }

    /// Deletes the objects whose time came (retention let go of them) and the orphans (no
    /// row refers to them, older than the grace); returns how many went.
    fn collect(&self) -> Result<usize, LogError> {
        let pool = self.pool.clone();
        let store = self.store.clone();
        let grace = self.grace;
        let requests = self.requests.clone();
        wait(&self.io, async move {
            let mut n = 0;
            for (id, key) in pg::collectable(&pool).await.map_err(|e| e.to_string())? {
                count(&requests.delete, 1);
                match store.delete(&ObjectPath::from(key.as_str())).await {
                    Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                    Err(e) => return Err(e.to_string()),
                }
                pg::forget_object(&pool, &id)
                    .await
                    .map_err(|e| e.to_string())?;
                n += 1;
            }
            match pg::forget_idle_producers(&pool, IDLE_PRODUCER_DAYS).await {
                Ok(0) => {}
                Ok(n) => info!(producers = n, "idle producers' sequences forgotten"),
                Err(e) => warn!(error = %e, "cannot forget idle producers"),
            }
            let cutoff = cutoff_ms(grace);
            let listed: Vec<object_store::ObjectMeta> = store
                .list(Some(&ObjectPath::from("data")))
                .try_collect()
                .await
                .map_err(|e| e.to_string())?;
            count(&requests.list, 1 + listed.len() as u64 / 1000);
            let old: Vec<String> = listed
                .into_iter()
                .filter(|m| m.last_modified.timestamp_millis() < cutoff)
                .map(|m| m.location.to_string())
                .collect();
            for keys in old.chunks(500) {
                let known = pg::known_keys(&pool, keys)
                    .await
                    .map_err(|e| e.to_string())?;
                for k in keys.iter().filter(|k| !known.contains(*k)) {
                    count(&requests.delete, 1);
                    match store.delete(&ObjectPath::from(k.as_str())).await {
                        Ok(()) | Err(object_store::Error::NotFound { .. }) => n += 1,
                        Err(e) => return Err(e.to_string()),
                    }
                }
            }
            Ok(n)
        })?
        .map_err(|e| failed("collecting objects", e))
    }

    /// What a change to the set of streams needs, to move into a task.
    #[allow(clippy::type_complexity)]
    fn for_streams(
        &self,
    ) -> (
        deadpool_postgres::Pool,
        String,
        Streams,
        Arc<tokio::sync::Mutex<()>>,
    ) {
        (
            self.pool.clone(),
            self.node.clone(),
            self.state.clone(),
            self.streams_lock.clone(),
        )
    }

    /// Requests made of the object store since the log was opened.
    pub fn requests(&self) -> RequestCounts {
        let r = &self.requests;
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        RequestCounts {
            put: load(&r.put),
            get: load(&r.get),
            delete: load(&r.delete),
            list: load(&r.list),
        }
    }

    /// Forgets the runs' bytes this node keeps for readers (for cold-read benchmarks).
    pub fn drop_cache(&self) {
        let mut c = lock(&self.cache);
        c.runs.clear();
        c.order.clear();
        c.bytes = 0;
    }

    fn stream(&self, name: &str) -> Result<Arc<StreamState>, LogError> {
        self.state
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned()
            .ok_or_else(|| LogError::UnknownStream(name.to_owned()))
    }

    fn with_part<T>(
        &self,
        stream: &str,
        partition: u32,
        f: impl FnOnce(&mut PartState) -> T,
    ) -> Result<T, LogError> {
        let s = self.stream(stream)?;
        let p = s
            .parts
            .get(partition as usize)
            .ok_or_else(|| LogError::UnknownPartition {
                stream: stream.to_owned(),
                partition,
            })?;
        let out = f(&mut lock(p));
        Ok(out)
    }

    /// The runs of a partition that hold `offset` and after, as far as memory knows them
    /// without a gap; else asked of PostgreSQL (and remembered).
    fn runs_from(
        &self,
        stream: &str,
        partition: u32,
        offset: i64,
    ) -> Result<Vec<RunRow>, LogError> {
        let known = self.with_part(stream, partition, |p| {
            let first = p.runs.range(..=offset).next_back().map(|(_, r)| r.clone());
            match first {
                Some(r) if r.last_offset >= offset => {
                    let mut out = vec![r];
                    for (_, next) in p.runs.range(offset + 1..) {
                        if out
                            .last()
                            .is_some_and(|l| l.last_offset + 1 != next.first_offset)
                        {
                            break;
                        }
                        out.push(next.clone());
                        if out.len() >= RUNS_PER_QUERY as usize {
                            break;
                        }
                    }
                    Some(out)
                }
                _ => None,
            }
        })?;
        if let Some(runs) = known {
            return Ok(runs);
        }
        let rows = self.runs_in_db(stream, partition, offset, RUNS_PER_QUERY)?;
        self.with_part(stream, partition, |p| {
            for r in &rows {
                p.remember(r.clone());
            }
        })?;
        Ok(rows)
    }

    /// At most `limit` runs of a partition holding `offset` and after, as PostgreSQL has them.
    fn runs_in_db(
        &self,
        stream: &str,
        partition: u32,
        offset: i64,
        limit: i64,
    ) -> Result<Vec<RunRow>, LogError> {
        let pool = self.pool.clone();
        let s = stream.to_owned();
        wait(&self.io, async move {
            let client = pool.get().await.map_err(pg::PgError::from)?;
            pg::runs_from(&client, &s, partition, offset, limit).await
        })?
        .map_err(|e| failed("PostgreSQL", e))
    }

    /// A run's bytes as stored: from the cache, else a ranged GET (then cached).
    fn run_bytes(&self, run: &RunRow) -> Result<Bytes, LogError> {
        let key = (run.object_key.clone(), run.byte_start);
        if let Some(b) = lock(&self.cache).get(&key) {
            return Ok(b);
        }
        let store = self.store.clone();
        let path = ObjectPath::from(run.object_key.as_str());
        let range = run.byte_start..run.byte_start + run.byte_len;
        count(&self.requests.get, 1);
        let bytes = wait(&self.io, async move { store.get_range(&path, range).await })?
            .map_err(|e| failed("object store", e))?;
        lock(&self.cache).put(key, bytes.clone());
        Ok(bytes)
    }

    /// A read of `Storage::read` with the runs known here (else asked of the database).
    fn read_once(
        &self,
        stream: &str,
        partition: u32,
        offset: i64,
        max_bytes: usize,
    ) -> Result<ReadResult, LogError> {
        let (start, next) = self.with_part(stream, partition, |p| (p.start, p.next))?;
        if offset < start || offset > next {
            return Err(LogError::OffsetOutOfRange {
                offset,
                start,
                end: next,
            });
        }
        let mut out = BytesMut::new();
        if offset < next {
            'runs: for run in self.runs_from(stream, partition, offset)? {
                let stored = self.run_bytes(&run)?;
                let served = format::serve_run(&stored, run.crc, run.first_offset)
                    .map_err(|e| failed(&format!("run at offset {}", run.first_offset), e))?;
                let mut at = 0;
                while at < served.len() {
                    let h = BatchHeader::parse(&served[at..])
                        .map_err(|e| LogError::BadBatch(e.to_string()))?;
                    let len = h.total_len();
                    if h.last_offset() >= offset {
                        if !out.is_empty() && out.len() + len > max_bytes {
                            break 'runs;
                        }
                        out.extend_from_slice(&served[at..at + len]);
                    }
                    at += len;
                }
                if out.len() >= max_bytes {
                    break;
                }
            }
        }
        Ok(ReadResult {
            batches: out.freeze(),
            high_watermark: next,
        })
    }
}

/// Milliseconds since the epoch `grace` ago.
fn cutoff_ms(grace: Duration) -> i64 {
    now_ms() - grace.as_millis() as i64
}

/// Runs `fut` on the backend's runtime and waits for it from this thread.
fn wait<T: Send + 'static>(
    io: &tokio::runtime::Handle,
    fut: impl std::future::Future<Output = T> + Send + 'static,
) -> Result<T, LogError> {
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    io.spawn(async move {
        let _ = tx.send(fut.await);
    });
    rx.recv().map_err(|_| LogError::Closed)
}

/// 128 random bits in hex: a flush's id.
fn random_id() -> String {
    let mut b = [0u8; 16];
    if getrandom::fill(&mut b).is_err() {
        // No entropy source: time and a counter are unique enough for one node.
        static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        b[..8].copy_from_slice(&now_ms().to_be_bytes());
        b[8..].copy_from_slice(&n.to_be_bytes());
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The store named by `object_url`, with its key prefix.
fn open_store(config: &ObjectConfig) -> Result<Arc<dyn ObjectStore>, LogError> {
    let url = config.object_url.as_str();
    if let Some(dir) = url.strip_prefix("file://") {
        std::fs::create_dir_all(dir).map_err(|e| LogError::io(std::path::Path::new(dir), e))?;
        let fs = object_store::local::LocalFileSystem::new_with_prefix(dir)
            .map_err(|e| failed("object store", e))?;
        return Ok(Arc::new(fs));
    }
    let Some(rest) = url.strip_prefix("s3://") else {
        return Err(LogError::Failed(format!(
            "[storage] object_url {url:?}: s3://bucket/prefix or file:///dir"
        )));
    };
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    // reqwest's TLS needs a process-wide provider: rustls' ring, as everywhere in Ferry.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut b = object_store::aws::AmazonS3Builder::from_env().with_bucket_name(bucket);
    let s3 = &config.s3;
    if let Some(e) = &s3.endpoint {
        b = b.with_endpoint(e).with_virtual_hosted_style_request(false);
    }
    if let Some(r) = &s3.region {
        b = b.with_region(r);
    }
    if let Some(k) = &s3.access_key_id {
        b = b.with_access_key_id(k);
    }
    if let Some(k) = &s3.secret_access_key {
        b = b.with_secret_access_key(k);
    }
    let store = b
        .with_allow_http(s3.allow_http)
        .build()
        .map_err(|e| failed("object store", e))?;
    let prefix = prefix.trim_matches('/');
    if prefix.is_empty() {
        Ok(Arc::new(store))
    } else {
        Ok(Arc::new(object_store::prefix::PrefixStore::new(
            store, prefix,
        )))
    }
}

/// The task that turns waiting appends into one object and one commit at a time.
struct Flusher {
    store: Arc<dyn ObjectStore>,
    pool: deadpool_postgres::Pool,
    state: Streams,
    cache: Arc<Mutex<Cache>>,
    commits: Arc<watch::Sender<u64>>,
    counters: Arc<Counters>,
    requests: Arc<Requests>,
    node: String,
    flush_every: Duration,
    flush_bytes: usize,
    timeout: Duration,
}

/// One partition's share of a flush: its requests, in order (their data is encoded when the
/// flush is written, and again if a producer's batch keeps the first try from committing).
struct Share {
    stream: String,
    partition: u32,
    requests: Vec<Request>,
}

/// A share encoded: its run's bytes, per request its records' place as (first, last)
/// record index in the run, and what its commit checks.
struct Encoded {
    bytes: BytesMut,
    places: Vec<(u64, u64)>,
    checks: pg::Checks,
}

impl Share {
    /// Encodes the requests; those the encoder refuses are answered and dropped.
    fn encode(&mut self) -> Encoded {
        let mut encoder = Encoder::default();
        let mut places = Vec::with_capacity(self.requests.len());
        let mut checks = pg::Checks::default();
        let mut kept = Vec::with_capacity(self.requests.len());
        for req in self.requests.drain(..) {
            match encoder.add(&req.data) {
                Ok(place) => {
                    if let AppendData::Batches(b) = &req.data {
                        if let Some(batch) = ProducerBatch::of(b) {
                            checks.producers.push((kept.len(), batch, place.0));
                        }
                    }
                    if let Some(fence) = &req.fence {
                        checks.fences.push((kept.len(), fence.clone()));
                    }
                    places.push(place);
                    kept.push(req);
                }
                Err(e) => {
                    let _ = req.reply.send(Err(e));
                }
            }
        }
        self.requests = kept;
        Encoded {
            bytes: encoder.finish().0,
            places,
            checks,
        }
    }
}

impl Flusher {
    async fn run(self, mut rx: mpsc::UnboundedReceiver<Request>) {
        while let Some(first) = rx.recv().await {
            let deadline = tokio::time::Instant::now() + self.flush_every;
            let mut shares: Vec<Share> = Vec::new();
            let mut bytes = 0usize;
            let mut next = Some(first);
            loop {
                let Some(req) = next.take() else { break };
                bytes += req.bytes;
                match shares
                    .iter_mut()
                    .find(|s| s.stream == req.stream && s.partition == req.partition)
                {
                    Some(share) => share.requests.push(req),
                    None => shares.push(Share {
                        stream: req.stream.clone(),
                        partition: req.partition,
                        requests: vec![req],
                    }),
                }
                if bytes >= self.flush_bytes {
                    break;
                }
                next = match tokio::time::timeout_at(deadline, rx.recv()).await {
                    Ok(Some(r)) => Some(r),
                    _ => None,
                };
            }
            self.flush(shares).await;
        }
    }

    /// Writes one object of `shares`, commits it, and answers every request. When an
    /// idempotent producer's batch cannot be appended as it is (a resend of a committed
    /// batch, a gap, a stale epoch) or an append's lease passed to another node
    /// ([`pg::Conflict`]), nothing was committed: those requests are answered, and the rest
    /// written and committed again.
    async fn flush(&self, mut shares: Vec<Share>) {
        loop {
            let started = std::time::Instant::now();
            let mut runs = Vec::new();
            let mut encoded = Vec::new();
            let mut waiting = Vec::new();
            for share in &mut shares {
                let mut e = share.encode();
                if share.requests.is_empty() {
                    continue;
                }
                let mut bytes = std::mem::take(&mut e.bytes);
                let stats: RunStats = match format::relativize(&mut bytes) {
                    Ok(s) => s,
                    Err(err) => {
                        // The encoder checked every batch: this is a bug; refuse, lose nothing.
                        error!(error = %err, "a run the encoder made does not check");
                        for req in share.requests.drain(..) {
                            let _ = req.reply.send(Err(failed("run", &err)));
                        }
                        continue;
                    }
                };
                runs.push((share.stream.clone(), share.partition, bytes.freeze(), stats));
                waiting.push(std::mem::take(&mut share.requests));
                encoded.push(e);
            }
            if runs.is_empty() {
                return;
            }
            let checks: Vec<&pg::Checks> = encoded.iter().map(|e| &e.checks).collect();
            let result = self.write_and_commit(runs, &checks).await;
            let elapsed = started.elapsed().as_micros() as u64;
            match result {
                Ok(Flushed::Done(done)) => {
                    self.counters.committed(elapsed);
                    for (run, _) in &done {
                        self.counters.wrote(run.records, run.data_len);
                    }
                    // Readers are told before any append is answered.
                    self.commits.send_modify(|n| *n += 1);
                    for (((_, row), requests), e) in done.into_iter().zip(waiting).zip(encoded) {
                        for (req, (a, b)) in requests.into_iter().zip(e.places) {
                            let _ = req.reply.send(Ok(Appended {
                                base_offset: row.first_offset + a as i64,
                                last_offset: row.first_offset + b as i64,
                            }));
                        }
                    }
                    return;
                }
                Ok(Flushed::Conflicts(conflicts)) => {
                    // Those answered here leave; the others go back to their shares.
                    let mut leaving: Vec<Vec<Option<pg::Conflict>>> =
                        waiting.iter().map(|r| vec![None; r.len()]).collect();
                    for (run, request, conflict) in conflicts {
                        leaving[run][request] = Some(conflict);
                    }
                    shares = waiting
                        .into_iter()
                        .zip(leaving)
                        .zip(encoded)
                        .map(|((requests, leaving), e)| {
                            let (stream, partition) = (requests[0].stream.clone(), requests[0].partition);
                            let mut kept = Vec::new();
                            for ((req, conflict), (a, b)) in
                                requests.into_iter().zip(leaving).zip(e.places)
                            {
                                match conflict {
                                    None => kept.push(req),
                                    Some(c) => {
                                        info!(stream = %req.stream, partition = req.partition, ?c, "an append taken out of a flush");
                                        let _ = req.reply.send(conflict_answer(c, b - a, req.fence.as_ref()));
                                    }
                                }
                            }
                            Share {
                                stream,
                                partition,
                                requests: kept,
                            }
                        })
                        .collect();
                }
                Err(e) => {
                    warn!(error = %e, "a flush failed; its appends are refused");
                    for requests in waiting {
                        for req in requests {
                            let _ = req.reply.send(Err(match &e {
                                LogError::Unavailable(m) => LogError::Unavailable(m.clone()),
                                other => LogError::Failed(other.to_string()),
                            }));
                        }
                    }
                    return;
                }
            }
        }
    }

    /// The object written (retried until the timeout), then the commit (retried with the
    /// same id: idempotent), then the partitions and the cache updated. An object whose
    /// commit met conflicts is deleted again (nothing refers to it).
    async fn write_and_commit(
        &self,
        runs: Vec<(String, u32, Bytes, RunStats)>,
        checks: &[&pg::Checks],
    ) -> Result<Flushed, LogError> {
        let deadline = tokio::time::Instant::now() + self.timeout;
        let payloads: Vec<Bytes> = runs.iter().map(|(_, _, b, _)| b.clone()).collect();
        let (object, index) = format::encode(runs, now_ms()).map_err(|e| failed("object", e))?;
        let id = random_id();
        let key = format!("data/{}/{id}.fob", self.node);
        let path = ObjectPath::from(key.as_str());
        let size = object.len() as u64;
        let payload = PutPayload::from(object);
        retry(deadline, "object store PUT", || {
            let store = self.store.clone();
            let path = path.clone();
            let payload = payload.clone();
            count(&self.requests.put, 1);
            async move { store.put(&path, payload).await.map(|_| ()) }
        })
        .await?;
        let committed = retry(deadline, "PostgreSQL commit", || {
            pg::commit_flush(&self.pool, &self.node, &id, &key, size, &index, checks)
        })
        .await?;
        let firsts = match committed {
            pg::Committed::Done(firsts) => firsts,
            pg::Committed::Conflicts(c) => {
                count(&self.requests.delete, 1);
                if let Err(e) = self.store.delete(&path).await {
                    // The collector takes it once its grace is over.
                    warn!(error = %e, key, "cannot delete an object not committed");
                }
                return Ok(Flushed::Conflicts(c));
            }
        };
        let mut done = Vec::with_capacity(index.len());
        let streams = self.state.read().unwrap_or_else(|e| e.into_inner()).clone();
        for ((run, first), bytes) in index.into_iter().zip(firsts).zip(payloads) {
            let row = RunRow::of(&run, first, &key);
            lock(&self.cache).put((key.clone(), run.data_offset), bytes);
            if let Some(p) = streams
                .get(&run.stream)
                .and_then(|s| s.parts.get(run.partition as usize))
            {
                let mut p = lock(p);
                p.next = p.next.max(row.last_offset + 1);
                p.bytes += run.data_len;
                p.remember(row.clone());
            }
            done.push((run, row));
        }
        Ok(Flushed::Done(done))
    }
}

/// What a flush's write and commit came to.
enum Flushed {
    /// Committed: per run, what the object holds and its row.
    Done(Vec<(format::Run, RunRow)>),
    /// Not committed: (run, request, why), as [`pg::Committed::Conflicts`].
    Conflicts(Vec<(usize, usize, pg::Conflict)>),
}

/// The answer to an append of `span + 1` records, made under `fence`, that did not commit.
fn conflict_answer(
    c: pg::Conflict,
    span: u64,
    fence: Option<&super::Fence>,
) -> Result<Appended, LogError> {
    match c {
        pg::Conflict::Duplicate(base_offset) => Ok(Appended {
            base_offset,
            last_offset: base_offset + span as i64,
        }),
        pg::Conflict::Refused(e) => Err(LogError::Sequence(e)),
        pg::Conflict::InFlight => Err(LogError::Unavailable(
            "the batch was sent again while its first copy was being committed".into(),
        )),
        pg::Conflict::Fenced => Err(LogError::Fenced {
            kind: fence.map_or_else(String::new, |f| f.kind.clone()),
            key: fence.map_or_else(String::new, |f| f.key.clone()),
        }),
    }
}

/// Tries `op` until it succeeds or `deadline` passes, waiting a little longer each time.
async fn retry<T, E, F, Fut>(
    deadline: tokio::time::Instant,
    what: &str,
    mut op: F,
) -> Result<T, LogError>
where
    E: std::fmt::Display,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    let mut pause = Duration::from_millis(50);
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let e = match tokio::time::timeout(left, op()).await {
            Ok(Ok(v)) => return Ok(v),
            Ok(Err(e)) => e.to_string(),
            Err(_) => "timed out".to_owned(),
        };
        if tokio::time::Instant::now() + pause >= deadline {
            return Err(LogError::Unavailable(format!("{what}: {e}")));
        }
        warn!(error = %e, "{what} failed; trying again");
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(2));
    }
}

impl Storage for ObjectLog {
    fn create_stream(&self, name: &str, config: &StreamConfig) -> Result<(), LogError> {
        if !valid_stream_name(name) {
            return Err(LogError::BadStreamName(name.to_owned()));
        }
        if self.stream(name).is_ok() {
            return Ok(());
        }
        let partitions = config.partitions.max(1);
        let json = serde_json::to_value(config).map_err(|e| failed("stream config", e))?;
        let (pool, node, state, changing) = self.for_streams();
        let name = name.to_owned();
        let config = config.clone();
        wait(&self.io, async move {
            let _changing = changing.lock().await;
            pg::create_stream(&pool, &node, &name, partitions, &json).await?;
            // Another node may have made it first, with its settings: those are the stream's.
            let all = pg::streams(&pool.get().await?).await?;
            let mut state = state.write().unwrap_or_else(|e| e.into_inner());
            if let Some((_, json, parts)) = all.into_iter().find(|(n, ..)| *n == name) {
                let config = serde_json::from_str(&json).unwrap_or(config);
                state
                    .entry(name)
                    .or_insert_with(|| StreamState::new(config, &parts));
            }
            Ok::<_, pg::PgError>(())
        })?
        .map_err(|e| failed("PostgreSQL", e))
    }

    fn delete_stream(&self, name: &str) -> Result<bool, LogError> {
        let (pool, node, state, changing) = self.for_streams();
        let name = name.to_owned();
        wait(&self.io, async move {
            let _changing = changing.lock().await;
            let existed = pg::delete_stream(&pool, &node, &name).await?;
            if let Some(s) = state
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&name)
            {
                for p in &s.parts {
                    lock(p).deleted = true;
                }
            }
            Ok::<_, pg::PgError>(existed)
        })?
        .map_err(|e| failed("PostgreSQL", e))
    }

    fn streams(&self) -> Vec<StreamInfo> {
        let state = self.state.read().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<StreamInfo> = state
            .iter()
            .map(|(name, s)| StreamInfo {
                name: name.clone(),
                partitions: s
                    .parts
                    .iter()
                    .map(|p| {
                        let p = lock(p);
                        PartitionInfo {
                            offsets: Offsets {
                                log_start: p.start,
                                high_watermark: p.next,
                            },
                            bytes: p.bytes,
                            segments: p.runs.len(),
                            active_base: p.start,
                        }
                    })
                    .collect(),
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    fn append(&self, stream: &str, partition: u32, data: AppendData) -> AppendFuture {
        self.append_fenced(stream, partition, data, None)
    }

    /// The fence is checked in the flush's transaction ([`pg::Conflict::Fenced`]).
    fn append_fenced(
        &self,
        stream: &str,
        partition: u32,
        data: AppendData,
        fence: Option<super::Fence>,
    ) -> AppendFuture {
        let known = self.with_part(stream, partition, |p| !p.deleted);
        let tx = self.to_flusher.clone();
        let budget = self.budget.clone();
        // About what it adds to a flush: keys, values and a little for each record's framing.
        let size: usize = match &data {
            AppendData::Records(r) => r
                .iter()
                .map(|r| {
                    r.value.as_ref().map_or(0, |v| v.len())
                        + r.key.as_ref().map_or(0, |k| k.len())
                        + 16
                })
                .sum(),
            AppendData::Batches(b) => b.len(),
        };
        let permits = size.clamp(1, self.buffer_bytes) as u32;
        let stream = stream.to_owned();
        Box::pin(async move {
            if !known? {
                return Err(LogError::UnknownStream(stream));
            }
            // Over the budget of bytes not yet committed, the append waits: the fronts
            // slow their publishers down, nothing is dropped.
            let permit = budget
                .acquire_many_owned(permits)
                .await
                .map_err(|_| LogError::Closed)?;
            let (reply, answer) = oneshot::channel();
            tx.send(Request {
                stream,
                partition,
                data,
                reply,
                fence,
                bytes: size,
                _permit: permit,
            })
            .map_err(|_| LogError::Closed)?;
            answer.await.map_err(|_| LogError::Closed)?
        })
    }

    /// Reads as [`ObjectLog::read_once`]; when that fails for want of an object or a row (a
    /// compaction or retention elsewhere made the runs known here stale), the partition's
    /// runs are forgotten and asked of the database once more.
    fn read(
        &self,
        stream: &str,
        partition: u32,
        offset: i64,
        max_bytes: usize,
    ) -> Result<ReadResult, LogError> {
        match self.read_once(stream, partition, offset, max_bytes) {
            Err(LogError::Failed(e) | LogError::Unavailable(e)) => {
                warn!(error = %e, stream, partition, offset, "a read failed; asking the database again");
                self.with_part(stream, partition, |p| p.runs.clear())?;
                self.read_once(stream, partition, offset, max_bytes)
            }
            other => other,
        }
    }

    /// Checked in the flush's transaction ([`pg::Conflict`]).
    fn checks_producers(&self) -> bool {
        true
    }

    fn offsets_now(&self, stream: &str, partition: u32) -> Result<Offsets, LogError> {
        let pool = self.pool.clone();
        let which = vec![(stream.to_owned(), partition)];
        let rows = wait(&self.io, async move {
            let client = pool.get().await.map_err(pg::PgError::from)?;
            pg::partitions(&client, &which).await
        })?
        .map_err(|e| failed("PostgreSQL", e))?;
        for (_, row) in rows {
            self.with_part(stream, partition, |p| p.catch_up(&row))?;
        }
        self.offsets(stream, partition)
    }

    fn offsets(&self, stream: &str, partition: u32) -> Result<Offsets, LogError> {
        self.with_part(stream, partition, |p| Offsets {
            log_start: p.start,
            high_watermark: p.next,
        })
    }

    fn offset_for_time(
        &self,
        stream: &str,
        partition: u32,
        timestamp: i64,
    ) -> Result<Option<i64>, LogError> {
        let start = self.with_part(stream, partition, |p| p.start)?;
        let pool = self.pool.clone();
        let s = stream.to_owned();
        let run = wait(&self.io, async move {
            let client = pool.get().await.map_err(pg::PgError::from)?;
            pg::run_for_time(&client, &s, partition, timestamp).await
        })?
        .map_err(|e| failed("PostgreSQL", e))?;
        let Some(run) = run.filter(|r| r.last_offset >= start) else {
            return Ok(None);
        };
        let stored = self.run_bytes(&run)?;
        let served =
            format::serve_run(&stored, run.crc, run.first_offset).map_err(|e| failed("run", e))?;
        let found = crate::log::ReadResult {
            batches: served.freeze(),
            high_watermark: run.last_offset + 1,
        }
        .iter()
        .filter_map(Result::ok)
        .find(|(h, _)| h.max_timestamp >= timestamp && h.last_offset() >= start)
        .map(|(h, _)| h.base_offset.max(start));
        Ok(found)
    }

    fn watch_commits(&self) -> watch::Receiver<u64> {
        self.commits.clone()
    }

    /// Drops whole runs from the front of every partition while over its byte budget or
    /// older than its retention (the newest run stays), compacts small runs (`compact.rs`),
    /// then deletes the objects nothing refers to any more (see [`ObjectLog::collect`]);
    /// returns how many runs retention dropped.
    fn enforce_retention(&self) -> Result<usize, LogError> {
        let streams: Vec<(String, Arc<StreamState>)> = self
            .state
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(n, s)| (n.clone(), s.clone()))
            .collect();
        let now = now_ms();
        let grace_secs = self.grace.as_secs_f64();
        let mut removed = 0;
        for (name, s) in streams {
            if s.config.retention_bytes.is_none() && s.config.retention_ms.is_none() {
                continue;
            }
            for (i, p) in s.parts.iter().enumerate() {
                let pool = self.pool.clone();
                let node = self.node.clone();
                let n = name.clone();
                let config = s.config.clone();
                let result = wait(&self.io, async move {
                    pg::enforce_retention(
                        &pool,
                        &node,
                        &n,
                        i as u32,
                        config.retention_bytes,
                        config.retention_ms.map(|ms| now - ms),
                        grace_secs,
                    )
                    .await
                })?
                .map_err(|e| failed("PostgreSQL", e))?;
                if let Some((dropped, log_start, bytes)) = result {
                    let mut p = lock(p);
                    p.start = p.start.max(log_start);
                    p.bytes = bytes.max(0) as u64;
                    let keep = p.runs.split_off(&log_start);
                    p.runs = keep;
                    removed += dropped;
                }
            }
        }
        // Then small runs rewritten together, and the objects nothing refers to any more
        // (and those a crashed flush left).
        self.compact()?;
        self.collect()?;
        Ok(removed)
    }

    fn stats(&self) -> LogStats {
        self.counters.load()
    }
}
