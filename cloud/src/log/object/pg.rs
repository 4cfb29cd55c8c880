//! The object backend's metadata in PostgreSQL (`docs/object-log.md`, "The schema" and
//! "The commit"): schema migrations, streams and partitions, and the one transaction that
//! makes a flush durable.

use std::time::Duration;

use deadpool_postgres::{GenericClient, Pool};
use tokio_postgres::NoTls;

use super::format::Run;
use super::meta::Fence;
use crate::log::sequence::{ProducerBatch, ProducerState, Sequence, SequenceError};

/// The migrations, in order: (version, SQL). A database at a version above the last one
/// here was made by a newer Ferry and is refused.
const MIGRATIONS: &[(i32, &str)] = &[
    (1, include_str!("sql/001_init.sql")),
    (2, include_str!("sql/002_meta.sql")),
    (3, include_str!("sql/003_no_producers.sql")),
    (4, include_str!("sql/004_nodes.sql")),
    (5, include_str!("sql/005_leases.sql")),
    (6, include_str!("sql/006_producers.sql")),
    (7, include_str!("sql/007_mqtt_clients.sql")),
    (8, include_str!("sql/008_mqtt_sessions.sql")),
];
/// The advisory lock nodes take to migrate one at a time ("FERRYMIG" in ASCII).
const MIGRATION_LOCK: i64 = 0x4645_5252_594d_4947;
/// The channel changes are announced on, as a [`Notice`].
pub(crate) const CHANNEL: &str = "ferry_log";
/// A notice longer than this names no partitions but says "everything" (PostgreSQL's limit
/// on a payload is 8,000 bytes).
const NOTICE_MAX: usize = 7_000;

/// What a node tells the others on [`CHANNEL`] in the transaction of a change: the node that
/// made it (so it skips its own) and what moved. Payload: the node, then space-separated
/// tokens: `<stream>/<partition>` (its offsets, start or bytes moved), `=<stream>/<partition>`
/// (its runs were rewritten by a compaction: forget those known), `+` (streams were made or
/// deleted), `*` (too much to name: read everything again). Unknown tokens are ignored, so a
/// newer node may add some.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Notice {
    pub(crate) node: String,
    pub(crate) partitions: Vec<(String, u32)>,
    pub(crate) rewritten: Vec<(String, u32)>,
    pub(crate) streams: bool,
    pub(crate) everything: bool,
}

impl Notice {
    pub(crate) fn encode(&self) -> String {
        let mut out = self.node.clone();
        if self.everything {
            out.push_str(" *");
            return out;
        }
        if self.streams {
            out.push_str(" +");
        }
        let named = self.partitions.iter().map(|(s, p)| format!(" {s}/{p}"));
        let rewritten = self.rewritten.iter().map(|(s, p)| format!(" ={s}/{p}"));
        for token in named.chain(rewritten) {
            out.push_str(&token);
            if out.len() > NOTICE_MAX {
                return format!("{} *", self.node);
            }
        }
        out
    }

    /// None for a payload with no node (not one of ours).
    pub(crate) fn parse(payload: &str) -> Option<Self> {
        let mut tokens = payload.split(' ').filter(|t| !t.is_empty());
        let mut n = Self {
            node: tokens.next()?.to_owned(),
            ..Self::default()
        };
        for t in tokens {
            match t {
                "*" => n.everything = true,
                "+" => n.streams = true,
                _ => {
                    let (list, t) = match t.strip_prefix('=') {
                        Some(t) => (&mut n.rewritten, t),
                        None => (&mut n.partitions, t),
                    };
                    if let Some((s, p)) = t.rsplit_once('/') {
                        if let Ok(p) = p.parse() {
                            list.push((s.to_owned(), p));
                        }
                    }
                }
            }
        }
        Some(n)
    }

    /// Sends it in `tx` (delivered to listeners when, and only if, `tx` commits).
    async fn send(&self, tx: &impl GenericClient) -> Result<(), PgError> {
        tx.execute("SELECT pg_notify($1, $2)", &[&CHANNEL, &self.encode()])
            .await?;
        Ok(())
    }
}

/// Why a metadata operation failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum PgError {
    #[error("PostgreSQL: {0}")]
    Db(#[from] tokio_postgres::Error),
    #[error("PostgreSQL pool: {0}")]
    Pool(String),
    #[error("the database's schema is version {found}; this Ferry knows up to {known}")]
    Newer { found: i32, known: i32 },
    #[error("PostgreSQL: {0}")]
    Lost(String),
    #[error("no partition {partition} of stream {stream} in the database")]
    NoPartition { stream: String, partition: u32 },
}

impl From<deadpool_postgres::PoolError> for PgError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        Self::Pool(e.to_string())
    }
}

/// A bounded pool of connections to `url` (a `postgres://` URL or a libpq string).
pub(crate) fn pool(url: &str, size: usize, wait: Duration) -> Result<Pool, PgError> {
    let config: tokio_postgres::Config = url.parse()?;
    let manager = deadpool_postgres::Manager::from_config(
        config,
        NoTls,
        deadpool_postgres::ManagerConfig {
            recycling_method: deadpool_postgres::RecyclingMethod::Fast,
        },
    );
    Pool::builder(manager)
        .max_size(size)
        .runtime(deadpool_postgres::Runtime::Tokio1)
        .wait_timeout(Some(wait))
        .create_timeout(Some(wait))
        .build()
        .map_err(|e| PgError::Pool(e.to_string()))
}

/// Brings the schema to the newest version, in one transaction under an advisory lock (two
/// nodes starting at once migrate once). Returns the version.
pub(crate) async fn migrate(pool: &Pool) -> Result<i32, PgError> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS schema_version (version int PRIMARY KEY, \
         applied_at timestamptz NOT NULL DEFAULT now())",
    )
    .await?;
    let current: Option<i32> = tx
        .query_one("SELECT max(version) FROM schema_version", &[])
        .await?
        .get(0);
    let current = current.unwrap_or(0);
    let known = MIGRATIONS.last().map_or(0, |(v, _)| *v);
    if current > known {
        return Err(PgError::Newer {
            found: current,
            known,
        });
    }
    for (version, sql) in MIGRATIONS {
        if *version > current {
            tx.batch_execute(sql).await?;
            tx.execute(
                "INSERT INTO schema_version (version) VALUES ($1)",
                &[version],
            )
            .await?;
        }
    }
    tx.commit().await?;
    Ok(known)
}

/// A partition as the database has it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PartitionRow {
    pub(crate) next_offset: i64,
    pub(crate) log_start: i64,
    pub(crate) bytes: i64,
}

/// Creates `name` with `partitions` partitions and `config` (JSON) unless it exists; true
/// if it was created (and the other nodes told, as from `node`).
pub(crate) async fn create_stream(
    pool: &Pool,
    node: &str,
    name: &str,
    partitions: u32,
    config: &serde_json::Value,
) -> Result<bool, PgError> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    let n = tx
        .execute(
            "INSERT INTO streams (name, partitions, config) VALUES ($1, $2, $3::text::jsonb) \
             ON CONFLICT (name) DO NOTHING",
            &[&name, &(partitions as i32), &config.to_string()],
        )
        .await?;
    if n == 1 {
        tx.execute(
            "INSERT INTO partitions (stream, partition) \
             SELECT $1, p FROM generate_series(0, $2 - 1) AS p",
            &[&name, &(partitions as i32)],
        )
        .await?;
        streams_changed(node).send(&tx).await?;
    }
    tx.commit().await?;
    Ok(n == 1)
}

fn streams_changed(node: &str) -> Notice {
    Notice {
        node: node.to_owned(),
        streams: true,
        ..Notice::default()
    }
}

/// Deletes `name`, its partitions and its runs (their objects are left to the collector);
/// true if there was such a stream (and the other nodes were told, as from `node`).
pub(crate) async fn delete_stream(pool: &Pool, node: &str, name: &str) -> Result<bool, PgError> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    let n = tx
        .execute("DELETE FROM streams WHERE name = $1", &[&name])
        .await?;
    if n == 1 {
        streams_changed(node).send(&tx).await?;
    }
    tx.commit().await?;
    Ok(n == 1)
}

/// Every stream: (name, config JSON, its partitions in order).
pub(crate) async fn streams(
    client: &impl GenericClient,
) -> Result<Vec<(String, String, Vec<PartitionRow>)>, PgError> {
    let rows = client
        .query(
            "SELECT s.name, s.config::text, p.next_offset, p.log_start, p.bytes \
             FROM streams s JOIN partitions p ON p.stream = s.name \
             ORDER BY s.name, p.partition",
            &[],
        )
        .await?;
    let mut out: Vec<(String, String, Vec<PartitionRow>)> = Vec::new();
    for r in rows {
        let name: String = r.get(0);
        let row = PartitionRow {
            next_offset: r.get(2),
            log_start: r.get(3),
            bytes: r.get(4),
        };
        match out.last_mut() {
            Some((n, _, parts)) if *n == name => parts.push(row),
            _ => out.push((name, r.get(1), vec![row])),
        }
    }
    Ok(out)
}

/// The rows of the partitions named, those that exist: ((stream, partition), row).
pub(crate) async fn partitions(
    client: &impl GenericClient,
    which: &[(String, u32)],
) -> Result<Vec<((String, u32), PartitionRow)>, PgError> {
    let streams: Vec<&str> = which.iter().map(|(s, _)| s.as_str()).collect();
    let parts: Vec<i32> = which.iter().map(|(_, p)| *p as i32).collect();
    let rows = client
        .query(
            "SELECT p.stream, p.partition, p.next_offset, p.log_start, p.bytes \
             FROM partitions p JOIN unnest($1::text[], $2::int[]) AS w(s, n) \
             ON p.stream = w.s AND p.partition = w.n",
            &[&streams, &parts],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| {
            (
                (r.get(0), r.get::<_, i32>(1) as u32),
                PartitionRow {
                    next_offset: r.get(2),
                    log_start: r.get(3),
                    bytes: r.get(4),
                },
            )
        })
        .collect())
}

/// One run's row: where a partition's batches from `first_offset` to `last_offset` are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RunRow {
    pub(crate) first_offset: i64,
    pub(crate) last_offset: i64,
    pub(crate) object_key: String,
    pub(crate) byte_start: u64,
    pub(crate) byte_len: u64,
    pub(crate) crc: u32,
    pub(crate) first_timestamp: i64,
    pub(crate) max_timestamp: i64,
}

impl RunRow {
    /// The row of `run` (of object `key`) committed at offset `first`.
    pub(crate) fn of(run: &Run, first: i64, key: &str) -> Self {
        Self {
            first_offset: first,
            last_offset: first + run.records as i64 - 1,
            object_key: key.to_owned(),
            byte_start: run.data_offset,
            byte_len: run.data_len,
            crc: run.crc,
            first_timestamp: run.first_timestamp,
            max_timestamp: run.max_timestamp,
        }
    }
}

/// The columns of a [`RunRow`], in the order [`run_row`] reads them.
const RUN_COLUMNS: &str = "r.first_offset, r.last_offset, o.key, r.byte_start, r.byte_len, \
     r.crc, r.first_timestamp, r.max_timestamp FROM runs r JOIN objects o ON o.id = r.object";

/// The runs of one partition holding `from` and after, in order, at most `limit`.
pub(crate) async fn runs_from(
    client: &impl GenericClient,
    stream: &str,
    partition: u32,
    from: i64,
    limit: i64,
) -> Result<Vec<RunRow>, PgError> {
    let rows = client
        .query(
            &format!(
                "SELECT {RUN_COLUMNS} WHERE r.stream = $1 AND r.partition = $2 \
                 AND r.last_offset >= $3 ORDER BY r.first_offset LIMIT $4"
            ),
            &[&stream, &(partition as i32), &from, &limit],
        )
        .await?;
    Ok(rows.iter().map(run_row).collect())
}

/// The first run of a partition whose newest record is at or after `timestamp`.
pub(crate) async fn run_for_time(
    client: &impl GenericClient,
    stream: &str,
    partition: u32,
    timestamp: i64,
) -> Result<Option<RunRow>, PgError> {
    let row = client
        .query_opt(
            &format!(
                "SELECT {RUN_COLUMNS} WHERE r.stream = $1 AND r.partition = $2 \
                 AND r.max_timestamp >= $3 ORDER BY r.first_offset LIMIT 1"
            ),
            &[&stream, &(partition as i32), &timestamp],
        )
        .await?;
    Ok(row.as_ref().map(run_row))
}

fn run_row(r: &tokio_postgres::Row) -> RunRow {
    RunRow {
        first_offset: r.get(0),
        last_offset: r.get(1),
        object_key: r.get(2),
        byte_start: r.get::<_, i64>(3) as u64,
        byte_len: r.get::<_, i64>(4) as u64,
        crc: r.get::<_, i64>(5) as u32,
        first_timestamp: r.get(6),
        max_timestamp: r.get(7),
    }
}

/// Commits a flush written as object `key` (id `id`, `size` bytes) holding `runs`: assigns
/// each run its offsets and records where it lives, in one transaction, and announces the
/// partitions touched (as from `node`). Returns each run's first offset, in the order of
/// `runs`.
///
/// Idempotent by `id`: a flush whose commit went through but whose answer was lost finds
/// its own rows when it tries again, and gets the same offsets.
pub(crate) async fn commit_flush(
    pool: &Pool,
    node: &str,
    id: &str,
    key: &str,
    size: u64,
    runs: &[Run],
    checks: &[&Checks],
) -> Result<Committed, PgError> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    let new = tx
        .execute(
            "INSERT INTO objects (id, key, size) VALUES ($1, $2, $3) ON CONFLICT (id) DO NOTHING",
            &[&id, &key, &(size as i64)],
        )
        .await?;
    if new == 0 {
        // Committed before: its rows say where each run went.
        let rows = tx
            .query(
                "SELECT stream, partition, first_offset FROM runs WHERE object = $1",
                &[&id],
            )
            .await?;
        let found: Vec<(String, i32, i64)> = rows
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect();
        tx.commit().await?;
        return runs
            .iter()
            .map(|run| {
                found
                    .iter()
                    .find(|(s, p, _)| *s == run.stream && *p == run.partition as i32)
                    .map(|(_, _, first)| *first)
                    .ok_or_else(|| PgError::NoPartition {
                        stream: run.stream.clone(),
                        partition: run.partition,
                    })
            })
            .collect::<Result<_, _>>()
            .map(Committed::Done);
    }
    // The leases appends were made under, before any partition: every commit locks leases
    // first, in one order, then partitions, so none waits on another in a cycle.
    let mut fences: Vec<(usize, usize, &Fence)> = checks
        .iter()
        .enumerate()
        .flat_map(|(run, c)| c.fences.iter().map(move |(req, f)| (run, *req, f)))
        .collect();
    fences.sort_by(|a, b| (&a.2.kind, &a.2.key).cmp(&(&b.2.kind, &b.2.key)));
    let mut conflicts = Vec::new();
    let mut checked: Vec<(&Fence, bool)> = Vec::new();
    for (run, req, fence) in fences {
        let holds = match checked.iter().find(|(f, _)| *f == fence) {
            Some(&(_, holds)) => holds,
            None => {
                let holds = super::leases::held(&tx, &fence.kind, &fence.key, &fence.lease).await?;
                checked.push((fence, holds));
                holds
            }
        };
        if !holds {
            conflicts.push((run, req, Conflict::Fenced));
        }
    }
    if !conflicts.is_empty() {
        return Ok(Committed::Conflicts(conflicts));
    }
    // Partitions in one order for every commit: two never wait on each other in a cycle.
    let mut order: Vec<usize> = (0..runs.len()).collect();
    order.sort_by(|a, b| {
        (&runs[*a].stream, runs[*a].partition).cmp(&(&runs[*b].stream, runs[*b].partition))
    });
    let mut firsts = vec![0i64; runs.len()];
    let mut touched = Vec::with_capacity(runs.len());
    for i in order {
        let run = &runs[i];
        let n = run.records as i64;
        let row = tx
            .query_opt(
                "UPDATE partitions SET next_offset = next_offset + $3, bytes = bytes + $4 \
                 WHERE stream = $1 AND partition = $2 RETURNING next_offset - $3",
                &[
                    &run.stream,
                    &(run.partition as i32),
                    &n,
                    &(run.data_len as i64),
                ],
            )
            .await?
            .ok_or_else(|| PgError::NoPartition {
                stream: run.stream.clone(),
                partition: run.partition,
            })?;
        let first: i64 = row.get(0);
        if let Some(c) = checks.get(i).filter(|c| !c.producers.is_empty()) {
            let found = check_producers(&tx, run, first, &c.producers).await?;
            conflicts.extend(found.into_iter().map(|(req, why)| (i, req, why)));
        }
        insert_run(&tx, run, first, id).await?;
        firsts[i] = first;
        touched.push((run.stream.clone(), run.partition));
    }
    if !conflicts.is_empty() {
        // Rolled back as the transaction is dropped: nothing of this flush is committed.
        return Ok(Committed::Conflicts(conflicts));
    }
    Notice {
        node: node.to_owned(),
        partitions: touched,
        ..Notice::default()
    }
    .send(&tx)
    .await?;
    tx.commit().await?;
    Ok(Committed::Done(firsts))
}

/// What a flush's commit did.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Committed {
    /// Committed: each run's first offset.
    Done(Vec<i64>),
    /// Not committed, for requests that cannot be appended as they are: (run, request in
    /// its [`Checks`], why). The others may be tried again.
    Conflicts(Vec<(usize, usize, Conflict)>),
}

/// What a run's commit checks, per request (its index in the run's share).
#[derive(Debug, Default)]
pub(crate) struct Checks {
    /// Idempotent producers' batches, with the index of their first record in the run.
    pub producers: Vec<(usize, ProducerBatch, u64)>,
    /// The leases appends were made under.
    pub fences: Vec<(usize, Fence)>,
}

/// Why an idempotent producer's batch keeps a flush from committing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Conflict {
    /// Committed before, at this base offset: answered with it.
    Duplicate(i64),
    /// Refused by its sequence.
    Refused(SequenceError),
    /// Sent again while its first copy is in the same flush: refused, retriable (the
    /// resend after this flush is a duplicate).
    InFlight,
    /// Made under a lease no longer held (another node took it): refused.
    Fenced,
}

/// Checks a run's idempotent producers' batches ((request, batch, index of its first
/// record in the run)) against the producers' state, under the partition's row lock (taken
/// by the commit's update of `partitions`), and writes the new state. Those that are not
/// the next batch of their producer: (request, why).
async fn check_producers(
    tx: &impl GenericClient,
    run: &Run,
    first: i64,
    checks: &[(usize, ProducerBatch, u64)],
) -> Result<Vec<(usize, Conflict)>, PgError> {
    let partition = run.partition as i32;
    let mut ids: Vec<i64> = checks.iter().map(|(_, b, _)| b.producer_id).collect();
    ids.sort_unstable();
    ids.dedup();
    let rows = tx
        .query(
            "SELECT producer_id, epoch, recent FROM producers \
             WHERE stream = $1 AND partition = $2 AND producer_id = ANY($3)",
            &[&run.stream, &partition, &ids],
        )
        .await?;
    let mut states: std::collections::HashMap<i64, ProducerState> = rows
        .iter()
        .map(|r| {
            let recent: Vec<i64> = r.get(2);
            (r.get(0), ProducerState::from_flat(r.get(1), &recent))
        })
        .collect();
    let mut conflicts = Vec::new();
    let mut changed = Vec::new();
    for &(k, ref b, at) in checks {
        let state = states.entry(b.producer_id).or_default();
        match state.check(b.epoch, b.first) {
            Sequence::Next => {
                state.appended(b.epoch, b.first, b.last, first + at as i64);
                changed.push(b.producer_id);
            }
            Sequence::Duplicate(offset) if offset >= first => {
                conflicts.push((k, Conflict::InFlight))
            }
            Sequence::Duplicate(offset) => conflicts.push((k, Conflict::Duplicate(offset))),
            Sequence::Refused(e) => conflicts.push((k, Conflict::Refused(e))),
        }
    }
    if !conflicts.is_empty() {
        return Ok(conflicts);
    }
    changed.sort_unstable();
    changed.dedup();
    for id in changed {
        let state = &states[&id];
        tx.execute(
            "INSERT INTO producers (stream, partition, producer_id, epoch, recent) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (stream, partition, producer_id) \
             DO UPDATE SET epoch = EXCLUDED.epoch, recent = EXCLUDED.recent, at = now()",
            &[&run.stream, &partition, &id, &state.epoch, &state.flat()],
        )
        .await?;
    }
    Ok(Vec::new())
}

/// Forgets the sequence state of producers silent for `days` days (Kafka expires idle
/// producer ids too); returns how many.
pub(crate) async fn forget_idle_producers(pool: &Pool, days: i32) -> Result<u64, PgError> {
    let client = pool.get().await?;
    Ok(client
        .execute(
            "DELETE FROM producers WHERE at < now() - make_interval(days => $1)",
            &[&days],
        )
        .await?)
}

/// Gives the collector those of `objects` no run refers to any more: deleted `grace_secs`
/// from now (readers that found a run before it went have that long to read it).
async fn release_objects(
    tx: &impl GenericClient,
    objects: &[String],
    grace_secs: f64,
) -> Result<(), PgError> {
    tx.execute(
        "UPDATE objects SET deleted_after = now() + make_interval(secs => $2) \
         WHERE id = ANY($1) AND NOT EXISTS (SELECT 1 FROM runs WHERE runs.object = objects.id)",
        &[&objects, &grace_secs],
    )
    .await?;
    Ok(())
}

/// The row of `run`, its records from offset `first` on, in object `object`.
async fn insert_run(
    tx: &impl GenericClient,
    run: &Run,
    first: i64,
    object: &str,
) -> Result<(), PgError> {
    tx.execute(
        "INSERT INTO runs (stream, partition, first_offset, last_offset, object, byte_start, \
         byte_len, crc, first_timestamp, max_timestamp) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
        &[
            &run.stream,
            &(run.partition as i32),
            &first,
            &(first + run.records as i64 - 1),
            &object,
            &(run.data_offset as i64),
            &(run.data_len as i64),
            &i64::from(run.crc),
            &run.first_timestamp,
            &run.max_timestamp,
        ],
    )
    .await?;
    Ok(())
}

/// Drops whole runs from the front of a partition while it holds more than
/// `retention_bytes` without them, or while their newest record is older than
/// `older_than` (ms since the epoch); the newest run always stays. Objects left with no run
/// are given to the collector. Returns (runs dropped, the new log start, bytes left), or
/// None if nothing went. Their objects may be deleted `grace_secs` from now (readers that
/// found a run before it went have that long to read it). The other nodes are told, as
/// from `node`.
pub(crate) async fn enforce_retention(
    pool: &Pool,
    node: &str,
    stream: &str,
    partition: u32,
    retention_bytes: Option<u64>,
    older_than: Option<i64>,
    grace_secs: f64,
) -> Result<Option<(usize, i64, i64)>, PgError> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    let p = partition as i32;
    let Some(row) = tx
        .query_opt(
            "SELECT bytes FROM partitions WHERE stream = $1 AND partition = $2 FOR UPDATE",
            &[&stream, &p],
        )
        .await?
    else {
        return Ok(None);
    };
    let mut bytes: i64 = row.get(0);
    let runs = tx
        .query(
            "SELECT first_offset, last_offset, byte_len, max_timestamp, object FROM runs \
             WHERE stream = $1 AND partition = $2 ORDER BY first_offset LIMIT 1001",
            &[&stream, &p],
        )
        .await?;
    let mut dropped = 0;
    let mut new_start = None;
    let mut objects: Vec<String> = Vec::new();
    // The last row stays: it may be the partition's newest run.
    for r in runs.iter().take(runs.len().saturating_sub(1)) {
        let len: i64 = r.get(2);
        let max_ts: i64 = r.get(3);
        let over = retention_bytes.is_some_and(|max| bytes - len >= max as i64);
        let old = older_than.is_some_and(|t| max_ts < t);
        if !(over || old) {
            break;
        }
        bytes -= len;
        dropped += 1;
        new_start = Some(r.get::<_, i64>(1) + 1);
        objects.push(r.get(4));
    }
    let Some(start) = new_start else {
        return Ok(None);
    };
    tx.execute(
        "DELETE FROM runs WHERE stream = $1 AND partition = $2 AND first_offset < $3",
        &[&stream, &p, &start],
    )
    .await?;
    tx.execute(
        "UPDATE partitions SET log_start = $3, bytes = $4 WHERE stream = $1 AND partition = $2",
        &[&stream, &p, &start, &bytes],
    )
    .await?;
    release_objects(&tx, &objects, grace_secs).await?;
    Notice {
        node: node.to_owned(),
        partitions: vec![(stream.to_owned(), partition)],
        ..Notice::default()
    }
    .send(&tx)
    .await?;
    tx.commit().await?;
    Ok(Some((dropped, start, bytes)))
}

/// Objects whose time to go came: (id, key).
pub(crate) async fn collectable(pool: &Pool) -> Result<Vec<(String, String)>, PgError> {
    let client = pool.get().await?;
    let rows = client
        .query(
            "SELECT id, key FROM objects WHERE deleted_after < now() \
             AND NOT EXISTS (SELECT 1 FROM runs WHERE runs.object = objects.id) LIMIT 1000",
            &[],
        )
        .await?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// Forgets an object once it is deleted from the store (never one a run refers to).
pub(crate) async fn forget_object(pool: &Pool, id: &str) -> Result<(), PgError> {
    let client = pool.get().await?;
    client
        .execute(
            "DELETE FROM objects WHERE id = $1 \
             AND NOT EXISTS (SELECT 1 FROM runs WHERE runs.object = objects.id)",
            &[&id],
        )
        .await?;
    Ok(())
}

/// Which of `keys` the database knows as objects.
pub(crate) async fn known_keys(
    pool: &Pool,
    keys: &[String],
) -> Result<std::collections::HashSet<String>, PgError> {
    let client = pool.get().await?;
    let rows = client
        .query("SELECT key FROM objects WHERE key = ANY($1)", &[&keys])
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// What a compaction puts in place of a partition's runs: the new object and its one run.
pub(crate) struct Compacted<'a> {
    pub(crate) id: &'a str,
    pub(crate) key: &'a str,
    pub(crate) size: u64,
    pub(crate) run: &'a Run,
    /// The first offsets of the runs it replaces, in order; its own first offset is the
    /// first of them.
    pub(crate) replaces: &'a [i64],
}

/// Swaps a partition's runs `c.replaces` for the one run of `c`, in one transaction under the
/// partition's lock, if every one of them is still there (retention or another node's
/// compaction may have been first: then nothing changes and false is returned). Objects left
/// with no run may be deleted `grace_secs` from now; the other nodes are told, as from
/// `node`, to forget the runs they knew.
pub(crate) async fn swap_runs(
    pool: &Pool,
    node: &str,
    c: &Compacted<'_>,
    grace_secs: f64,
) -> Result<bool, PgError> {
    let (stream, p) = (&c.run.stream, c.run.partition as i32);
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    tx.query_opt(
        "SELECT 1 FROM partitions WHERE stream = $1 AND partition = $2 FOR UPDATE",
        &[stream, &p],
    )
    .await?;
    let gone = tx
        .query(
            "DELETE FROM runs WHERE stream = $1 AND partition = $2 AND first_offset = ANY($3) \
             RETURNING object, byte_len",
            &[stream, &p, &c.replaces],
        )
        .await?;
    if gone.len() != c.replaces.len() {
        tx.rollback().await?;
        return Ok(false);
    }
    let old_bytes: i64 = gone.iter().map(|r| r.get::<_, i64>(1)).sum();
    let objects: Vec<String> = gone.iter().map(|r| r.get(0)).collect();
    let first = c.replaces[0];
    tx.execute(
        "INSERT INTO objects (id, key, size) VALUES ($1, $2, $3)",
        &[&c.id, &c.key, &(c.size as i64)],
    )
    .await?;
    insert_run(&tx, c.run, first, c.id).await?;
    tx.execute(
        "UPDATE partitions SET bytes = bytes - $3 + $4 WHERE stream = $1 AND partition = $2",
        &[stream, &p, &old_bytes, &(c.run.data_len as i64)],
    )
    .await?;
    release_objects(&tx, &objects, grace_secs).await?;
    Notice {
        node: node.to_owned(),
        rewritten: vec![(stream.clone(), c.run.partition)],
        ..Notice::default()
    }
    .send(&tx)
    .await?;
    tx.commit().await?;
    Ok(true)
}
