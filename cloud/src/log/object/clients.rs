//! Where each MQTT client id's session lives in a cluster (Step 10): one row per client id
//! naming the node that last accepted a connection with it, and a token from one sequence
//! for every claim, so that of two claims of an id the newer has the higher token. A claim
//! is told to every node on [`CHANNEL`] in its own transaction; a node that hears that an id
//! it serves was claimed by another node with a higher token ends the session here (see
//! `crate::mqtt::clients`).

use deadpool_postgres::Pool;

use super::pg::PgError;

/// The channel on which claims are told, as `<token> <node> <client id>`.
pub(crate) const CHANNEL: &str = "ferry_mqtt_clients";

/// The longest client id claimed across the cluster: a notice's payload must stay under
/// PostgreSQL's 8,000 bytes. Longer ids (MQTT allows 65,535 bytes) are served by one node
/// each, as without a cluster.
pub(crate) const MAX_CLAIMED_ID: usize = 4000;

/// A claim heard from the database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientNotice {
    /// `node` accepted a connection of `client_id`; its claim's token.
    Claimed {
        node: String,
        token: i64,
        client_id: String,
    },
    /// The listening connection was (re)made: notices may have been missed, so the rows of
    /// the ids served here are to be read again.
    Resync,
}

impl ClientNotice {
    /// A notice's payload, or None if it is not one.
    pub(crate) fn parse(payload: &str) -> Option<Self> {
        let (token, rest) = payload.split_once(' ')?;
        let (node, client_id) = rest.split_once(' ')?;
        Some(Self::Claimed {
            node: node.to_owned(),
            token: token.parse().ok()?,
            client_id: client_id.to_owned(),
        })
    }
}

/// Claims `ids` (sorted, no repeats: rows are locked in that order) for `node`, telling every
/// node; each id's new token.
pub(crate) async fn claim(
    pool: &Pool,
    node: &str,
    ids: &[String],
) -> Result<Vec<(String, i64)>, PgError> {
    let client = pool.get().await?;
    let rows = client
        .query(
            "WITH claimed AS ( \
               INSERT INTO mqtt_clients (client_id, node, token) \
               SELECT c, $2, nextval('mqtt_claims') FROM unnest($1::text[]) AS c \
               ON CONFLICT (client_id) DO UPDATE \
                 SET node = EXCLUDED.node, token = EXCLUDED.token, at = now() \
               RETURNING client_id, token) \
             SELECT client_id, token, \
               pg_notify($3, token::text || ' ' || $2 || ' ' || client_id) FROM claimed",
            &[&ids, &node, &CHANNEL],
        )
        .await?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// Claims `id` for `node` as [`claim`] does, and takes the session recorded under the claim
/// before: the new token and that session, if any. From then on only this claim can record
/// the session ([`save_sessions`]).
pub(crate) async fn take_session(
    pool: &Pool,
    node: &str,
    id: &str,
) -> Result<(i64, Option<Vec<u8>>), PgError> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    let old = tx
        .query_opt(
            "SELECT session FROM mqtt_clients WHERE client_id = $1 FOR UPDATE",
            &[&id],
        )
        .await?
        .and_then(|r| r.get::<_, Option<Vec<u8>>>(0));
    let row = tx
        .query_one(
            "INSERT INTO mqtt_clients (client_id, node, token) \
             VALUES ($1, $2, nextval('mqtt_claims')) \
             ON CONFLICT (client_id) DO UPDATE \
               SET node = EXCLUDED.node, token = EXCLUDED.token, at = now() \
             RETURNING token, pg_notify($3, token::text || ' ' || $2 || ' ' || $1)",
            &[&id, &node, &CHANNEL],
        )
        .await?;
    tx.commit().await?;
    Ok((row.get(0), old))
}

/// Records sessions as they stand on `node` (id, the claim's token, the session; None: no
/// persistent session): a row claimed since by a newer claim is left as it is.
pub(crate) async fn save_sessions(
    pool: &Pool,
    node: &str,
    sessions: &[(String, i64, Option<Vec<u8>>)],
) -> Result<(), PgError> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    for (id, token, session) in sessions {
        tx.execute(
            "UPDATE mqtt_clients SET session = $4 \
             WHERE client_id = $1 AND node = $2 AND token = $3",
            &[id, &node, token, session],
        )
        .await?;
    }
    tx.commit().await?;
    Ok(())
}

/// Forgets the rows of `ids` that still name `node` (their sessions ended there).
pub(crate) async fn release(pool: &Pool, node: &str, ids: &[String]) -> Result<(), PgError> {
    let client = pool.get().await?;
    client
        .execute(
            "DELETE FROM mqtt_clients WHERE client_id = ANY($1) AND node = $2",
            &[&ids, &node],
        )
        .await?;
    Ok(())
}

/// The rows of `ids` that exist: (client id, node, token).
pub(crate) async fn owners(
    pool: &Pool,
    ids: &[String],
) -> Result<Vec<(String, String, i64)>, PgError> {
    let client = pool.get().await?;
    let rows = client
        .query(
            "SELECT client_id, node, token FROM mqtt_clients WHERE client_id = ANY($1)",
            &[&ids],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect())
}

/// Records the wills of connections accepted here under their claims (id, token, delay in
/// seconds, the will as a PUBLISH packet): a will recorded under an older claim than the
/// one there is does not replace it.
pub(crate) async fn put_wills(
    pool: &Pool,
    node: &str,
    wills: &[(String, i64, u32, Vec<u8>)],
) -> Result<(), PgError> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    for (id, token, delay, will) in wills {
        tx.execute(
            "INSERT INTO mqtt_wills (client_id, node, token, delay_secs, will)              VALUES ($1, $2, $3, $4, $5)              ON CONFLICT (client_id) DO UPDATE SET node = EXCLUDED.node,                token = EXCLUDED.token, delay_secs = EXCLUDED.delay_secs,                will = EXCLUDED.will, at = now()              WHERE mqtt_wills.token < EXCLUDED.token",
            &[id, &node, token, &i64::from(*delay), will],
        )
        .await?;
    }
    tx.commit().await?;
    Ok(())
}

/// Forgets the wills of `ids` this node recorded (published here, dropped by a DISCONNECT,
/// or their sessions ended).
pub(crate) async fn drop_wills(pool: &Pool, node: &str, ids: &[String]) -> Result<(), PgError> {
    let client = pool.get().await?;
    client
        .execute(
            "DELETE FROM mqtt_wills WHERE client_id = ANY($1) AND node = $2",
            &[&ids, &node],
        )
        .await?;
    Ok(())
}

/// A will left by a node that is gone, to publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Orphan {
    pub client_id: String,
    /// The PUBLISH packet (MQTT 5) it was recorded as.
    pub will: Vec<u8>,
}

/// Takes the wills of nodes that are gone (their lease ran out; with `mine`, this node's
/// own from before it started), for this node to publish: each is handed to one node. A
/// will whose client has connected again since, on any node, is dropped instead if it had
/// a delay (the delay is there to ride out a reconnection); one without a delay is
/// published, as when a connection is taken over on one node. Once published, they are
/// forgotten with [`drop_wills`].
pub(crate) async fn take_orphans(
    pool: &Pool,
    node: &str,
    mine: bool,
) -> Result<Vec<Orphan>, PgError> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    let rows = tx
        .query(
            "SELECT w.client_id, w.will, w.delay_secs, w.token, c.token              FROM mqtt_wills w LEFT JOIN mqtt_clients c USING (client_id)              WHERE (w.node <> $1 AND NOT EXISTS (                       SELECT 1 FROM nodes n WHERE n.name = w.node AND n.lease_until > now()))                 OR ($2 AND w.node = $1)              ORDER BY w.client_id FOR UPDATE OF w SKIP LOCKED",
            &[&node, &mine],
        )
        .await?;
    let mut taken = Vec::new();
    let mut dropped = Vec::new();
    for r in &rows {
        let (id, will, delay, token, latest): (String, Vec<u8>, i64, i64, Option<i64>) =
            (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4));
        if delay > 0 && latest.is_some_and(|l| l > token) {
            dropped.push(id);
        } else {
            taken.push(Orphan {
                client_id: id,
                will,
            });
        }
    }
    let ids: Vec<&str> = taken.iter().map(|o| o.client_id.as_str()).collect();
    // Taken over by this node until published: if it dies first, another node takes them.
    tx.execute(
        "UPDATE mqtt_wills SET node = $2, at = now() WHERE client_id = ANY($1)",
        &[&ids, &node],
    )
    .await?;
    tx.execute(
        "DELETE FROM mqtt_wills WHERE client_id = ANY($1)",
        &[&dropped],
    )
    .await?;
    tx.commit().await?;
    Ok(taken)
}

/// A retained message delivered from the log: its topic, where it is in the log, and the
/// PUBLISH packet (MQTT 5) it is kept as (None: the topic's retained message was cleared).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetainedRow {
    pub topic: String,
    pub stream: String,
    pub partition: i32,
    pub offset: i64,
    pub message: Option<Vec<u8>>,
}

/// Records `rows` (one per topic), each unless the topic has a later one from the same
/// partition already (every node delivers every retained message, so most are known).
pub(crate) async fn put_retained(pool: &Pool, rows: &[RetainedRow]) -> Result<(), PgError> {
    let topics: Vec<&str> = rows.iter().map(|r| r.topic.as_str()).collect();
    let streams: Vec<&str> = rows.iter().map(|r| r.stream.as_str()).collect();
    let partitions: Vec<i32> = rows.iter().map(|r| r.partition).collect();
    let offsets: Vec<i64> = rows.iter().map(|r| r.offset).collect();
    let messages: Vec<Option<&[u8]>> = rows.iter().map(|r| r.message.as_deref()).collect();
    let client = pool.get().await?;
    client
        .execute(
            "INSERT INTO mqtt_retained (topic, stream, partition, \"offset\", message) \
             SELECT * FROM unnest($1::text[], $2::text[], $3::int[], $4::bigint[], $5::bytea[]) \
             ON CONFLICT (topic) DO UPDATE SET stream = EXCLUDED.stream, \
               partition = EXCLUDED.partition, \"offset\" = EXCLUDED.\"offset\", \
               message = EXCLUDED.message \
             WHERE mqtt_retained.stream <> EXCLUDED.stream \
                OR mqtt_retained.partition <> EXCLUDED.partition \
                OR mqtt_retained.\"offset\" < EXCLUDED.\"offset\"",
            &[&topics, &streams, &partitions, &offsets, &messages],
        )
        .await?;
    Ok(())
}

/// Every retained message recorded (topic, PUBLISH packet), cleared ones left out.
pub(crate) async fn retained(pool: &Pool) -> Result<Vec<(String, Vec<u8>)>, PgError> {
    let client = pool.get().await?;
    let rows = client
        .query(
            "SELECT topic, message FROM mqtt_retained WHERE message IS NOT NULL",
            &[],
        )
        .await?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_notice_keeps_spaces_in_the_client_id() {
        assert_eq!(
            ClientNotice::parse("42 node-a my client"),
            Some(ClientNotice::Claimed {
                node: "node-a".into(),
                token: 42,
                client_id: "my client".into()
            })
        );
        assert_eq!(ClientNotice::parse("x node-a id"), None);
        assert_eq!(ClientNotice::parse("42"), None);
    }
}
