//! Leases (Step 10): one owner at a time for each (kind, key), such as a Kafka group's
//! coordinator. A lease is taken or renewed in one statement, which succeeds only when the
//! lease is free, ran out (by the database's clock), or is already the caller's; each time
//! it passes to another owner its `token` grows. Work done under a lease is fenced: its
//! transaction first checks that (owner, token) still holds the lease ([`held`]), so an
//! owner that lost it while paused cannot act on it after the next owner took over.

use std::time::Duration;

use deadpool_postgres::{GenericClient, Pool};

use super::pg::PgError;

/// A lease held: its owner and token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub owner: String,
    pub token: i64,
}

/// Takes or renews the lease on (`kind`, `key`) for `owner` for `ttl`; its token, or None
/// when another owner holds it.
pub(crate) async fn acquire(
    pool: &Pool,
    kind: &str,
    key: &str,
    owner: &str,
    ttl: Duration,
) -> Result<Option<i64>, PgError> {
    let client = pool.get().await?;
    let ms = ttl.as_millis() as f64;
    let row = client
        .query_opt(
            "INSERT INTO leases (kind, key, owner, token, until) \
             VALUES ($1, $2, $3, 1, now() + $4 * interval '1 millisecond') \
             ON CONFLICT (kind, key) DO UPDATE SET owner = EXCLUDED.owner, \
             token = CASE WHEN leases.owner = EXCLUDED.owner AND leases.until >= now() \
                     THEN leases.token ELSE leases.token + 1 END, \
             until = EXCLUDED.until \
             WHERE leases.owner = EXCLUDED.owner OR leases.until < now() \
             RETURNING token",
            &[&kind, &key, &owner, &ms],
        )
        .await?;
    Ok(row.map(|r| r.get(0)))
}

/// Gives up `owner`'s lease on (`kind`, `key`), if it holds it: it runs out now (the row and
/// its token stay, so the next owner's token is still a new one).
pub(crate) async fn release(
    pool: &Pool,
    kind: &str,
    key: &str,
    owner: &str,
) -> Result<(), PgError> {
    let client = pool.get().await?;
    client
        .execute(
            "UPDATE leases SET until = now() - interval '1 millisecond' \
             WHERE kind = $1 AND key = $2 AND owner = $3",
            &[&kind, &key, &owner],
        )
        .await?;
    Ok(())
}

/// A lease held now, as `/api/cluster` shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Held {
    pub kind: String,
    pub key: String,
    pub owner: String,
    pub token: i64,
    /// Until it runs out unless renewed.
    pub left_ms: i64,
}

/// Every lease held now (not run out), by kind and key.
pub(crate) async fn held_now(pool: &Pool) -> Result<Vec<Held>, PgError> {
    let client = pool.get().await?;
    let rows = client
        .query(
            "SELECT kind, key, owner, token, \
             (extract(epoch FROM (until - now())) * 1000)::bigint \
             FROM leases WHERE until > now() ORDER BY kind, key COLLATE \"C\"",
            &[],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| Held {
            kind: r.get(0),
            key: r.get(1),
            owner: r.get(2),
            token: r.get(3),
            left_ms: r.get(4),
        })
        .collect())
}

/// Who holds the lease on (`kind`, `key`) now, if anyone.
pub(crate) async fn holder(pool: &Pool, kind: &str, key: &str) -> Result<Option<Lease>, PgError> {
    let client = pool.get().await?;
    let row = client
        .query_opt(
            "SELECT owner, token FROM leases WHERE kind = $1 AND key = $2 AND until > now()",
            &[&kind, &key],
        )
        .await?;
    Ok(row.map(|r| Lease {
        owner: r.get(0),
        token: r.get(1),
    }))
}

/// Inside a transaction: true if `lease` still holds (`kind`, `key`); the row is locked
/// until the transaction ends, so the lease cannot pass to another owner before the work
/// that checked it commits.
pub(crate) async fn held(
    tx: &impl GenericClient,
    kind: &str,
    key: &str,
    lease: &Lease,
) -> Result<bool, PgError> {
    let row = tx
        .query_opt(
            "SELECT 1 FROM leases WHERE kind = $1 AND key = $2 AND owner = $3 AND token = $4 \
             AND until > now() FOR UPDATE",
            &[&kind, &key, &lease.owner, &lease.token],
        )
        .await?;
    Ok(row.is_some())
}
