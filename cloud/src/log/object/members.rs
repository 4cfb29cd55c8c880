//! Membership (the first part of Step 10): every node on one store and database registers
//! itself in the `nodes` table with its fronts' addresses and a lease, which it renews three
//! times per lease period. The database's clock alone decides what ran out, so the nodes'
//! clocks need not agree. A node that dies stops renewing and is gone for everyone once its
//! lease ends; one that stops cleanly deletes its row at once. A node that cannot reach
//! PostgreSQL loses its lease as it loses its commits: it acknowledges nothing meanwhile.

use std::time::Duration;

use deadpool_postgres::Pool;
use serde::Serialize;
use tracing::warn;

use super::pg::PgError;

/// A live node, as the database has it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Member {
    /// Its name (`[log.object] node`, or the random one it took at start).
    pub name: String,
    /// The addresses its fronts listen on, as it registered them.
    pub addrs: serde_json::Value,
    /// When it registered (ms since the epoch, the database's clock).
    pub started_ms: i64,
    /// How long its lease has left (ms).
    pub lease_left_ms: i64,
}

/// Registers `node` (or updates its row) with a lease of `lease` from now.
pub(crate) async fn register(
    pool: &Pool,
    node: &str,
    addrs: &serde_json::Value,
    lease: Duration,
) -> Result<(), PgError> {
    let client = pool.get().await?;
    let ms = lease.as_millis() as f64;
    client
        .execute(
            "INSERT INTO nodes (name, addrs, lease_until) \
             VALUES ($1, $2::text::jsonb, now() + $3 * interval '1 millisecond') \
             ON CONFLICT (name) DO UPDATE SET addrs = EXCLUDED.addrs, \
             lease_until = EXCLUDED.lease_until",
            &[&node, &addrs.to_string(), &ms],
        )
        .await?;
    Ok(())
}

/// Renews `node`'s lease; false if its row is gone (another node cleaned it up after the
/// lease ran out: the caller registers again). Also deletes rows whose lease ran out an hour
/// ago.
pub(crate) async fn renew(pool: &Pool, node: &str, lease: Duration) -> Result<bool, PgError> {
    let client = pool.get().await?;
    let ms = lease.as_millis() as f64;
    let renewed = client
        .execute(
            "UPDATE nodes SET lease_until = now() + $2 * interval '1 millisecond' \
             WHERE name = $1",
            &[&node, &ms],
        )
        .await?;
    client
        .execute(
            "DELETE FROM nodes WHERE lease_until < now() - interval '1 hour'",
            &[],
        )
        .await?;
    Ok(renewed == 1)
}

/// Deletes `node`'s row and gives up its leases: it is gone for everyone now, and what it
/// coordinated can be taken over at once.
pub(crate) async fn leave(pool: &Pool, node: &str) -> Result<(), PgError> {
    let client = pool.get().await?;
    client
        .execute("DELETE FROM nodes WHERE name = $1", &[&node])
        .await?;
    client
        .execute("DELETE FROM leases WHERE owner = $1", &[&node])
        .await?;
    Ok(())
}

/// The nodes whose lease has not run out, by name.
pub(crate) async fn live(pool: &Pool) -> Result<Vec<Member>, PgError> {
    let client = pool.get().await?;
    let rows = client
        .query(
            "SELECT name, addrs::text, \
             (extract(epoch FROM started_at) * 1000)::bigint, \
             (extract(epoch FROM (lease_until - now())) * 1000)::bigint \
             FROM nodes WHERE lease_until > now() ORDER BY name COLLATE \"C\"",
            &[],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| Member {
            name: r.get(0),
            addrs: serde_json::from_str(r.get::<_, &str>(1)).unwrap_or_default(),
            started_ms: r.get(2),
            lease_left_ms: r.get(3),
        })
        .collect())
}

/// Keeps `node`'s lease: renews it every third of `lease`, registering again if its row was
/// cleaned up meanwhile. Runs until aborted.
pub(crate) async fn keep(pool: Pool, node: String, addrs: serde_json::Value, lease: Duration) {
    let mut tick = tokio::time::interval(lease / 3);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let kept = match renew(&pool, &node, lease).await {
            Ok(true) => Ok(()),
            Ok(false) => register(&pool, &node, &addrs, lease).await,
            Err(e) => Err(e),
        };
        if let Err(e) = kept {
            warn!(error = %e, node = %node, "the node's lease could not be renewed");
        }
    }
}
