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
