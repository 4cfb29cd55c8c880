//! The node's metadata ([`crate::meta`]) in the object backend's PostgreSQL database: stream
//! settings, consumer cursors, edge sequences, the link ingest's start offsets and the AMQP
//! front's state, shared by every node on the database and lost with none of them
//! (`docs/object-log.md`, "The metadata").
//!
//! The same commands as on redb, with the same results: one transaction per
//! [`PgMeta::apply`], first create wins, edge sequences and ingest offsets never move back,
//! a stream's cursors and ingest offsets go with it; lists come in redb's order (bytes of
//! the key, `COLLATE "C"`).

use std::sync::Arc;

use deadpool_postgres::GenericClient;

use super::pg::PgError;
use super::{wait, ObjectLog};
use crate::log::StreamConfig;
use crate::meta::{decode_config, encode_config, Command};

/// The metadata on the object log's database (its pool and its runtime: it keeps the log
/// open).
pub struct PgMeta {
    log: Arc<ObjectLog>,
}

impl std::fmt::Debug for PgMeta {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgMeta").finish_non_exhaustive()
    }
}

/// Work done under a lease: (`kind`, `key`) must still be held by `lease` when it commits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fence {
    pub kind: String,
    pub key: String,
    pub lease: super::leases::Lease,
}

impl PgMeta {
    /// The metadata beside `log`'s index.
    pub fn new(log: Arc<ObjectLog>) -> Self {
        Self { log }
    }

    /// Runs what `f` makes of the pool on the log's runtime, and waits for it.
    fn run<T, Fut>(&self, f: impl FnOnce(deadpool_postgres::Pool) -> Fut) -> Result<T, String>
    where
        T: Send + 'static,
        Fut: std::future::Future<Output = Result<T, PgError>> + Send + 'static,
    {
        wait(&self.log.io, f(self.log.pool.clone()))
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())
    }

    /// Applies `commands` in order in one transaction: all or none.
    pub fn apply(&self, commands: &[Command]) -> Result<(), String> {
        let commands = commands.to_vec();
        self.run(move |pool| async move {
            let mut client = pool.get().await?;
            let tx = client.transaction().await?;
            for command in &commands {
                apply_one(&tx, command).await?;
            }
            tx.commit().await?;
            Ok(())
        })
    }

    /// As [`PgMeta::apply`], fenced: in the same transaction `fence` must still hold its
    /// lease, else nothing is applied and the answer is false.
    pub fn apply_fenced(&self, commands: &[Command], fence: &Fence) -> Result<bool, String> {
        let commands = commands.to_vec();
        let fence = fence.clone();
        self.run(move |pool| async move {
            let mut client = pool.get().await?;
            let tx = client.transaction().await?;
            if !super::leases::held(&tx, &fence.kind, &fence.key, &fence.lease).await? {
                return Ok(false);
            }
            for command in &commands {
                apply_one(&tx, command).await?;
            }
            tx.commit().await?;
            Ok(true)
        })
    }

    /// Every stream's settings, by name.
    pub fn streams(&self) -> Result<Vec<(String, StreamConfig)>, String> {
        let raw: Vec<(String, Vec<u8>)> = self.run(move |pool| async move {
            let rows = pool
                .get()
                .await?
                .query(
                    "SELECT name, config FROM meta_streams ORDER BY name COLLATE \"C\"",
                    &[],
                )
                .await?;
            Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
        })?;
        raw.into_iter()
            .map(|(name, b)| {
                decode_config(&b)
                    .map(|c| (name.clone(), c))
                    .ok_or_else(|| format!("settings of stream {name}"))
            })
            .collect()
    }

    /// Where `group` reads next in a partition, if it committed.
    pub fn cursor(&self, group: &str, stream: &str, partition: u32) -> Result<Option<i64>, String> {
        let (group, stream) = (group.to_owned(), stream.to_owned());
        self.run(move |pool| async move {
            let row = pool
                .get()
                .await?
                .query_opt(
                    "SELECT next_offset FROM cursors \
                     WHERE grp = $1 AND stream = $2 AND partition = $3",
                    &[&group, &stream, &(partition as i32)],
                )
                .await?;
            Ok(row.map(|r| r.get(0)))
        })
    }

    /// Every cursor: (group, stream, partition, next offset).
    pub fn cursors(&self) -> Result<Vec<(String, String, u32, i64)>, String> {
        self.run(move |pool| async move {
            let rows = pool
                .get()
                .await?
                .query(
                    "SELECT grp, stream, partition, next_offset FROM cursors \
                     ORDER BY grp, stream, partition",
                    &[],
                )
                .await?;
            Ok(rows
                .iter()
                .map(|r| {
                    let p: i32 = r.get(2);
                    (r.get(0), r.get(1), p as u32, r.get(3))
                })
                .collect())
        })
    }

    /// (edge, class, seq), by edge and class.
    pub fn edges(&self) -> Result<Vec<(String, u8, u64)>, String> {
        self.run(move |pool| async move {
            let rows = pool
                .get()
                .await?
                .query(
                    "SELECT edge, class, seq FROM edge_seqs ORDER BY edge COLLATE \"C\", class",
                    &[],
                )
                .await?;
            Ok(rows
                .iter()
                .map(|r| {
                    (
                        r.get(0),
                        r.get::<_, i16>(1) as u8,
                        r.get::<_, i64>(2) as u64,
                    )
                })
                .collect())
        })
    }

    /// The AMQP front's entries whose key starts with `prefix`, in key order.
    pub fn amqp_entries(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, String> {
        let prefix = prefix.to_owned();
        self.run(move |pool| async move {
            let rows = pool
                .get()
                .await?
                .query(
                    "SELECT key, value FROM amqp_state WHERE starts_with(key, $1) \
                     ORDER BY key COLLATE \"C\"",
                    &[&prefix],
                )
                .await?;
            Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
        })
    }

    /// (stream, partition, offset), by stream and partition.
    pub fn ingest_from(&self) -> Result<Vec<(String, u32, i64)>, String> {
        self.run(move |pool| async move {
            let rows = pool
                .get()
                .await?
                .query(
                    "SELECT stream, partition, next_offset FROM ingest_from \
                     ORDER BY stream COLLATE \"C\", partition",
                    &[],
                )
                .await?;
            Ok(rows
                .iter()
                .map(|r| (r.get(0), r.get::<_, i32>(1) as u32, r.get(2)))
                .collect())
        })
    }
}

/// One command, in the caller's transaction.
async fn apply_one(tx: &impl GenericClient, command: &Command) -> Result<(), PgError> {
    match command {
        Command::CreateStream { name, config } => {
            tx.execute(
                "INSERT INTO meta_streams (name, config) VALUES ($1, $2) \
                 ON CONFLICT (name) DO NOTHING",
                &[name, &encode_config(config)],
            )
            .await?;
        }
        Command::DeleteStream { name } => {
            for sql in [
                "DELETE FROM meta_streams WHERE name = $1",
                "DELETE FROM cursors WHERE stream = $1",
                "DELETE FROM ingest_from WHERE stream = $1",
            ] {
                tx.execute(sql, &[name]).await?;
            }
        }
        Command::CommitCursor {
            group,
            stream,
            partition,
            offset,
        } => {
            tx.execute(
                "INSERT INTO cursors (grp, stream, partition, next_offset) \
                 VALUES ($1, $2, $3, $4) ON CONFLICT (grp, stream, partition) \
                 DO UPDATE SET next_offset = EXCLUDED.next_offset",
                &[group, stream, &(*partition as i32), offset],
            )
            .await?;
        }
        Command::CommitEdge { edge, class, seq } => {
            tx.execute(
                "INSERT INTO edge_seqs (edge, class, seq) VALUES ($1, $2, $3) \
                 ON CONFLICT (edge, class) DO UPDATE SET seq = GREATEST(edge_seqs.seq, EXCLUDED.seq)",
                &[edge, &i16::from(*class), &(*seq as i64)],
            )
            .await?;
        }
        Command::IngestFrom {
            stream,
            partition,
            offset,
        } => {
            tx.execute(
                "INSERT INTO ingest_from (stream, partition, next_offset) VALUES ($1, $2, $3) \
                 ON CONFLICT (stream, partition) \
                 DO UPDATE SET next_offset = GREATEST(ingest_from.next_offset, EXCLUDED.next_offset)",
                &[stream, &(*partition as i32), offset],
            )
            .await?;
        }
        Command::AmqpPut { key, value } => {
            tx.execute(
                "INSERT INTO amqp_state (key, value) VALUES ($1, $2) \
                 ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
                &[key, value],
            )
            .await?;
        }
        Command::AmqpDelete { key } => {
            tx.execute("DELETE FROM amqp_state WHERE key = $1", &[key])
                .await?;
        }
    }
    Ok(())
}
