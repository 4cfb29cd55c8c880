//! The node's metadata (streams and their settings, consumer cursors, the highest committed
//! sequence of each edge) in redb, `<data_dir>/meta.redb`; on the object backend in its
//! PostgreSQL database ([`Meta::shared`]), but for the MQTT delivery cursor, which stays in
//! `meta.redb` beside the MQTT sessions of this node it belongs to (`[storage]`).
//!
//! Metadata changes only through [`Command`]s applied by [`Meta::apply`], a deterministic
//! state machine: the result depends on the current state and the commands alone (no clock,
//! no randomness, no I/O but the database). On one node the commands are applied locally; a
//! cluster will replicate the same commands through Raft and apply them on every node.
//! Commands have a stable binary encoding ([`Command::encode`]) for that log.

use std::path::Path;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use crate::log::object::meta::PgMeta;
use crate::log::StreamConfig;
use crate::mqtt::MQTT_CURSOR;

/// Stream name → its settings (see `encode_config`).
const STREAMS: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("streams");
/// (group, stream, partition) → the next offset the group will read.
const CURSORS: TableDefinition<'_, (&str, &str, u32), i64> = TableDefinition::new("cursors");
/// (edge id, priority class) → the highest sequence number of its records committed to the
/// log.
const EDGES: TableDefinition<'_, (&str, u8), u64> = TableDefinition::new("edge_seqs");
/// (stream, partition) → the offset from which, at start, the link's ingest looks for edge
/// records not yet committed (see `crate::ingest`).
const INGEST_FROM: TableDefinition<'_, (&str, u32), i64> = TableDefinition::new("ingest_from");
/// The AMQP front's durable state by key (exchanges, queues, bindings, queue cursors; the
/// keys and values are the front's, see `crate::amqp`).
const AMQP: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("amqp");

/// Why metadata could not be read or changed.
#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    #[error("metadata database: {0}")]
    Db(#[from] redb::Error),
    #[error("metadata: {0}")]
    Corrupt(String),
    #[error("metadata in PostgreSQL: {0}")]
    Shared(String),
}

fn dberr(e: impl Into<redb::Error>) -> MetaError {
    MetaError::Db(e.into())
}

/// One change to the metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Creates a stream; a stream that exists keeps its settings.
    CreateStream { name: String, config: StreamConfig },
    /// Forgets a stream and the cursors on it.
    DeleteStream { name: String },
    /// Records where a consumer group will read next in a partition.
    CommitCursor {
        group: String,
        stream: String,
        partition: u32,
        offset: i64,
    },
    /// Records that an edge's records of priority class `class` up to `seq` are in the log.
    /// Never moves backwards.
    CommitEdge { edge: String, class: u8, seq: u64 },
    /// Records that every edge record in a partition whose sequence is not yet committed
    /// lies at or after `offset`. Never moves backwards.
    IngestFrom {
        stream: String,
        partition: u32,
        offset: i64,
    },
    /// Sets one entry of the AMQP front's state.
    AmqpPut { key: String, value: Vec<u8> },
    /// Removes one entry of the AMQP front's state (nothing if there is none).
    AmqpDelete { key: String },
}

/// The metadata database.
pub struct Meta {
    db: Database,
    /// On the object backend: all but the MQTT delivery cursor.
    shared: Option<PgMeta>,
}

/// Kept in `meta.redb` even with shared metadata: the MQTT delivery cursor, which says how
/// far this node's MQTT sessions were given the log.
fn node_local(c: &Command) -> bool {
    matches!(c, Command::CommitCursor { group, .. } if group == MQTT_CURSOR)
}

impl std::fmt::Debug for Meta {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Meta").finish_non_exhaustive()
    }
}

impl Meta {
    /// Opens (or creates) `path`.
    pub fn open(path: &Path) -> Result<Self, MetaError> {
        let db = Database::builder()
            .set_cache_size(4 << 20)
            .create(path)
            .map_err(dberr)?;
        let txn = db.begin_write().map_err(dberr)?;
        txn.open_table(STREAMS).map_err(dberr)?;
        txn.open_table(CURSORS).map_err(dberr)?;
        txn.open_table(EDGES).map_err(dberr)?;
        txn.open_table(INGEST_FROM).map_err(dberr)?;
        txn.open_table(AMQP).map_err(dberr)?;
        txn.commit().map_err(dberr)?;
        Ok(Self { db, shared: None })
    }

    /// `path` for what is this node's own, and `shared` (the object backend's database) for
    /// the rest.
    pub fn shared(path: &Path, shared: PgMeta) -> Result<Self, MetaError> {
        let mut meta = Self::open(path)?;
        meta.shared = Some(shared);
        Ok(meta)
    }

    /// Applies `commands` in order, in one durable transaction: all or none. With shared
    /// metadata, one transaction in PostgreSQL, then one here for the MQTT delivery cursor
    /// (and a stream's delete, which drops its cursor here too).
    pub fn apply(&self, commands: &[Command]) -> Result<(), MetaError> {
        let Some(shared) = &self.shared else {
            return self.apply_here(commands);
        };
        let there: Vec<Command> = commands
            .iter()
            .filter(|c| !node_local(c))
            .cloned()
            .collect();
        if !there.is_empty() {
            shared.apply(&there).map_err(MetaError::Shared)?;
        }
        let here: Vec<Command> = commands
            .iter()
            .filter(|c| node_local(c) || matches!(c, Command::DeleteStream { .. }))
            .cloned()
            .collect();
        if here.is_empty() {
            return Ok(());
        }
        self.apply_here(&here)
    }

    /// As [`Meta::apply`], fenced by a lease on the shared metadata (a cluster): false, with
    /// nothing applied, when `fence` no longer holds its lease. Without shared metadata, or
    /// without a fence, this is [`Meta::apply`].
    pub fn apply_fenced(
        &self,
        commands: &[Command],
        fence: Option<&crate::log::Fence>,
    ) -> Result<bool, MetaError> {
        match (&self.shared, fence) {
            (Some(shared), Some(fence)) if commands.iter().all(|c| !node_local(c)) => shared
                .apply_fenced(commands, fence)
                .map_err(MetaError::Shared),
            _ => self.apply(commands).map(|()| true),
        }
    }

    fn apply_here(&self, commands: &[Command]) -> Result<(), MetaError> {
        let txn = self.db.begin_write().map_err(dberr)?;
        {
            let mut streams = txn.open_table(STREAMS).map_err(dberr)?;
            let mut cursors = txn.open_table(CURSORS).map_err(dberr)?;
            let mut edges = txn.open_table(EDGES).map_err(dberr)?;
            let mut ingest_from = txn.open_table(INGEST_FROM).map_err(dberr)?;
            let mut amqp = txn.open_table(AMQP).map_err(dberr)?;
            for c in commands {
                match c {
                    Command::CreateStream { name, config } => {
                        if streams.get(name.as_str()).map_err(dberr)?.is_none() {
                            streams
                                .insert(name.as_str(), encode_config(config).as_slice())
                                .map_err(dberr)?;
                        }
                    }
                    Command::DeleteStream { name } => {
                        streams.remove(name.as_str()).map_err(dberr)?;
                        cursors
                            .retain(|(_, stream, _), _| stream != name)
                            .map_err(dberr)?;
                        ingest_from
                            .retain(|(stream, _), _| stream != name)
                            .map_err(dberr)?;
                    }
                    Command::CommitCursor {
                        group,
                        stream,
                        partition,
                        offset,
                    } => {
                        cursors
                            .insert((group.as_str(), stream.as_str(), *partition), offset)
                            .map_err(dberr)?;
                    }
                    Command::CommitEdge { edge, class, seq } => {
                        let key = (edge.as_str(), *class);
                        let old = edges.get(key).map_err(dberr)?.map(|v| v.value());
                        if old.is_none_or(|old| *seq > old) {
                            edges.insert(key, seq).map_err(dberr)?;
                        }
                    }
                    Command::IngestFrom {
                        stream,
                        partition,
                        offset,
                    } => {
                        let key = (stream.as_str(), *partition);
                        let old = ingest_from.get(key).map_err(dberr)?.map(|v| v.value());
                        if old.is_none_or(|old| *offset > old) {
                            ingest_from.insert(key, offset).map_err(dberr)?;
                        }
                    }
                    Command::AmqpPut { key, value } => {
                        amqp.insert(key.as_str(), value.as_slice()).map_err(dberr)?;
                    }
                    Command::AmqpDelete { key } => {
                        amqp.remove(key.as_str()).map_err(dberr)?;
                    }
                }
            }
        }
        txn.commit().map_err(dberr)
    }

    /// Every stream and its settings, by name.
    pub fn streams(&self) -> Result<Vec<(String, StreamConfig)>, MetaError> {
        if let Some(shared) = &self.shared {
            return shared.streams().map_err(MetaError::Shared);
        }
        let txn = self.db.begin_read().map_err(dberr)?;
        let table = txn.open_table(STREAMS).map_err(dberr)?;
        let mut out = Vec::new();
        for row in table.iter().map_err(dberr)? {
            let (k, v) = row.map_err(dberr)?;
            let config = decode_config(v.value())
                .ok_or_else(|| MetaError::Corrupt(format!("settings of stream {}", k.value())))?;
            out.push((k.value().to_owned(), config));
        }
        Ok(out)
    }

    /// Where `group` reads next in a partition, if it committed.
    pub fn cursor(
        &self,
        group: &str,
        stream: &str,
        partition: u32,
    ) -> Result<Option<i64>, MetaError> {
        if let Some(shared) = self.shared.as_ref().filter(|_| group != MQTT_CURSOR) {
            return shared
                .cursor(group, stream, partition)
                .map_err(MetaError::Shared);
        }
        let txn = self.db.begin_read().map_err(dberr)?;
        let table = txn.open_table(CURSORS).map_err(dberr)?;
        Ok(table
            .get((group, stream, partition))
            .map_err(dberr)?
            .map(|v| v.value()))
    }

    /// Every committed cursor: (group, stream, partition, next offset), by group, stream
    /// and partition. Kafka groups, the MQTT front's delivery cursor ([`MQTT_CURSOR`], on
    /// this node's disk) and each edge's downlink (`$edge:<edge-id>`).
    pub fn cursors(&self) -> Result<Vec<(String, String, u32, i64)>, MetaError> {
        let mut out = match &self.shared {
            Some(shared) => shared.cursors().map_err(MetaError::Shared)?,
            None => Vec::new(),
        };
        let txn = self.db.begin_read().map_err(dberr)?;
        let table = txn.open_table(CURSORS).map_err(dberr)?;
        for row in table.iter().map_err(dberr)? {
            let (k, v) = row.map_err(dberr)?;
            let (group, stream, partition) = k.value();
            // Shared, only the MQTT front's own cursor is kept here.
            if self.shared.is_none() || group == MQTT_CURSOR {
                out.push((group.to_owned(), stream.to_owned(), partition, v.value()));
            }
        }
        out.sort();
        Ok(out)
    }

    /// Every edge's highest committed sequence per priority class: (edge, class, seq).
    pub fn edges(&self) -> Result<Vec<(String, u8, u64)>, MetaError> {
        if let Some(shared) = &self.shared {
            return shared.edges().map_err(MetaError::Shared);
        }
        let txn = self.db.begin_read().map_err(dberr)?;
        let table = txn.open_table(EDGES).map_err(dberr)?;
        let mut out = Vec::new();
        for row in table.iter().map_err(dberr)? {
            let (k, v) = row.map_err(dberr)?;
            let (edge, class) = k.value();
            out.push((edge.to_owned(), class, v.value()));
        }
        Ok(out)
    }
}

impl Meta {
    /// The AMQP front's entries whose key starts with `prefix`, in key order.
    pub fn amqp_entries(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, MetaError> {
        if let Some(shared) = &self.shared {
            return shared.amqp_entries(prefix).map_err(MetaError::Shared);
        }
        let txn = self.db.begin_read().map_err(dberr)?;
        let table = txn.open_table(AMQP).map_err(dberr)?;
        let mut out = Vec::new();
        for row in table.range(prefix..).map_err(dberr)? {
            let (k, v) = row.map_err(dberr)?;
            if !k.value().starts_with(prefix) {
                break;
            }
            out.push((k.value().to_owned(), v.value().to_vec()));
        }
        Ok(out)
    }

    /// Where the link's ingest looks for uncommitted edge records at start: (stream,
    /// partition, offset).
    pub fn ingest_from(&self) -> Result<Vec<(String, u32, i64)>, MetaError> {
        if let Some(shared) = &self.shared {
            return shared.ingest_from().map_err(MetaError::Shared);
        }
        let txn = self.db.begin_read().map_err(dberr)?;
        let table = txn.open_table(INGEST_FROM).map_err(dberr)?;
        let mut out = Vec::new();
        for row in table.iter().map_err(dberr)? {
            let (k, v) = row.map_err(dberr)?;
            let (stream, partition) = k.value();
            out.push((stream.to_owned(), partition, v.value()));
        }
        Ok(out)
    }
}

impl Command {
    /// A stable encoding, for replicating commands: a tag byte, then the fields, strings as
    /// u16 length + UTF-8, integers big-endian.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let put_str = |out: &mut Vec<u8>, s: &str| {
            out.extend_from_slice(&(s.len() as u16).to_be_bytes());
            out.extend_from_slice(s.as_bytes());
        };
        match self {
            Command::CreateStream { name, config } => {
                out.push(1);
                put_str(&mut out, name);
                out.extend_from_slice(&encode_config(config));
            }
            Command::DeleteStream { name } => {
                out.push(2);
                put_str(&mut out, name);
            }
            Command::CommitCursor {
                group,
                stream,
                partition,
                offset,
            } => {
                out.push(3);
                put_str(&mut out, group);
                put_str(&mut out, stream);
                out.extend_from_slice(&partition.to_be_bytes());
                out.extend_from_slice(&offset.to_be_bytes());
            }
            Command::CommitEdge { edge, class, seq } => {
                out.push(4);
                put_str(&mut out, edge);
                out.push(*class);
                out.extend_from_slice(&seq.to_be_bytes());
            }
            Command::IngestFrom {
                stream,
                partition,
                offset,
            } => {
                out.push(5);
                put_str(&mut out, stream);
                out.extend_from_slice(&partition.to_be_bytes());
                out.extend_from_slice(&offset.to_be_bytes());
            }
            Command::AmqpPut { key, value } => {
                out.push(6);
                put_str(&mut out, key);
                out.extend_from_slice(&(value.len() as u32).to_be_bytes());
                out.extend_from_slice(value);
            }
            Command::AmqpDelete { key } => {
                out.push(7);
                put_str(&mut out, key);
            }
        }
        out
    }

    /// Reads what [`Command::encode`] wrote; None if the bytes are not a command.
    pub fn decode(mut b: &[u8]) -> Option<Self> {
        fn take<'a>(b: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
            (b.len() >= n).then(|| {
                let (head, rest) = b.split_at(n);
                *b = rest;
                head
            })
        }
        fn string(b: &mut &[u8]) -> Option<String> {
            let n = u16::from_be_bytes(take(b, 2)?.try_into().ok()?) as usize;
            String::from_utf8(take(b, n)?.to_vec()).ok()
        }
        let tag = *take(&mut b, 1)?.first()?;
        let c = match tag {
            1 => {
                let name = string(&mut b)?;
                let config = decode_config(take(&mut b, CONFIG_LEN)?)?;
                Command::CreateStream { name, config }
            }
            2 => Command::DeleteStream {
                name: string(&mut b)?,
            },
            3 => Command::CommitCursor {
                group: string(&mut b)?,
                stream: string(&mut b)?,
                partition: u32::from_be_bytes(take(&mut b, 4)?.try_into().ok()?),
                offset: i64::from_be_bytes(take(&mut b, 8)?.try_into().ok()?),
            },
            4 => Command::CommitEdge {
                edge: string(&mut b)?,
                class: *take(&mut b, 1)?.first()?,
                seq: u64::from_be_bytes(take(&mut b, 8)?.try_into().ok()?),
            },
            5 => Command::IngestFrom {
                stream: string(&mut b)?,
                partition: u32::from_be_bytes(take(&mut b, 4)?.try_into().ok()?),
                offset: i64::from_be_bytes(take(&mut b, 8)?.try_into().ok()?),
            },
            6 => {
                let key = string(&mut b)?;
                let n = u32::from_be_bytes(take(&mut b, 4)?.try_into().ok()?) as usize;
                Command::AmqpPut {
                    key,
                    value: take(&mut b, n)?.to_vec(),
                }
            }
            7 => Command::AmqpDelete {
                key: string(&mut b)?,
            },
            _ => return None,
        };
        b.is_empty().then_some(c)
    }
}

const CONFIG_LEN: usize = 4 + 8 + 8 + 8 + 8 + 8;

/// partitions u32, segment_bytes u64, segment_ms i64, retention_bytes u64 (MAX: none),
/// retention_ms i64 (-1: none), index_interval_bytes u64; big-endian.
pub(crate) fn encode_config(c: &StreamConfig) -> Vec<u8> {
    let mut out = Vec::with_capacity(CONFIG_LEN);
    out.extend_from_slice(&c.partitions.to_be_bytes());
    out.extend_from_slice(&c.segment_bytes.to_be_bytes());
    out.extend_from_slice(&c.segment_ms.to_be_bytes());
    out.extend_from_slice(&c.retention_bytes.unwrap_or(u64::MAX).to_be_bytes());
    out.extend_from_slice(&c.retention_ms.unwrap_or(-1).to_be_bytes());
    out.extend_from_slice(&c.index_interval_bytes.to_be_bytes());
    out
}

pub(crate) fn decode_config(b: &[u8]) -> Option<StreamConfig> {
    if b.len() != CONFIG_LEN {
        return None;
    }
    let u64_at = |at: usize| u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"));
    Some(StreamConfig {
        partitions: u32::from_be_bytes(b[..4].try_into().expect("4 bytes")),
        segment_bytes: u64_at(4),
        segment_ms: u64_at(12) as i64,
        retention_bytes: Some(u64_at(20)).filter(|&v| v != u64::MAX),
        retention_ms: Some(u64_at(28) as i64).filter(|&v| v >= 0),
        index_interval_bytes: u64_at(36),
    })
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::log::ObjectLog;

    fn commands() -> Vec<Command> {
        vec![
            Command::CreateStream {
                name: "sensors".into(),
                config: StreamConfig {
                    partitions: 8,
                    retention_bytes: Some(1 << 30),
                    retention_ms: None,
                    ..StreamConfig::default()
                },
            },
            Command::CreateStream {
                name: "sensors".into(),
                config: StreamConfig::default(),
            },
            Command::CreateStream {
                name: "gone".into(),
                config: StreamConfig::default(),
            },
            Command::CommitCursor {
                group: "g".into(),
                stream: "gone".into(),
                partition: 0,
                offset: 5,
            },
            Command::IngestFrom {
                stream: "gone".into(),
                partition: 0,
                offset: 3,
            },
            Command::IngestFrom {
                stream: "sensors".into(),
                partition: 1,
                offset: 70,
            },
            Command::IngestFrom {
                stream: "sensors".into(),
                partition: 1,
                offset: 60,
            },
            Command::CommitCursor {
                group: "g".into(),
                stream: "sensors".into(),
                partition: 3,
                offset: 42,
            },
            Command::CommitCursor {
                group: MQTT_CURSOR.into(),
                stream: "sensors".into(),
                partition: 0,
                offset: 9,
            },
            Command::DeleteStream {
                name: "gone".into(),
            },
            Command::CommitEdge {
                edge: "gw1".into(),
                class: 0,
                seq: 100,
            },
            Command::CommitEdge {
                edge: "gw1".into(),
                class: 0,
                seq: 90,
            },
            Command::CommitEdge {
                edge: "gw1".into(),
                class: 7,
                seq: 3,
            },
            Command::AmqpPut {
                key: "q/%2F/orders".into(),
                value: b"{}".to_vec(),
            },
            Command::AmqpPut {
                key: "q/%2F/gone".into(),
                value: b"old".to_vec(),
            },
            Command::AmqpPut {
                key: "x/%2F/e".into(),
                value: Vec::new(),
            },
            Command::AmqpDelete {
                key: "q/%2F/gone".into(),
            },
        ]
    }

    #[test]
    fn commands_change_state_deterministically_and_survive_a_reopen() {
        let dir = temp("redb");
        commands_change_state(&|name: &str| Meta::open(&dir.join(format!("{name}.redb"))));
    }

    /// The same on the object backend's PostgreSQL (`FERRY_TEST_PG`, as `scripts/test.sh`
    /// sets it), but for the MQTT delivery cursor, which another node on the database does
    /// not see.
    #[test]
    fn shared_metadata_in_postgresql_gives_the_same_state_but_the_node_local_cursor() {
        let dir = temp("shared");
        let mut configs = HashMap::new();
        for name in ["a", "b"] {
            let objects = dir.join(format!("{name}-objects"));
            let config = crate::log::object::tests::config(&format!("meta_{name}"), &objects);
            configs.insert(name.to_owned(), config);
        }
        let open = |name: &str| {
            let log = ObjectLog::open(&configs[name]).expect("object log");
            Meta::shared(&dir.join(format!("{name}.redb")), PgMeta::new(log))
        };
        commands_change_state(&open);
        let log = ObjectLog::open(&configs["a"]).expect("object log");
        let elsewhere =
            Meta::shared(&dir.join("another-node.redb"), PgMeta::new(log)).expect("open");
        assert_eq!(
            elsewhere.cursor("g", "sensors", 3).expect("cursor"),
            Some(42)
        );
        assert_eq!(
            elsewhere.cursor(MQTT_CURSOR, "sensors", 0).expect("cursor"),
            None,
            "the MQTT delivery cursor is the node's own"
        );
    }

    fn temp(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("ferry-meta-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        dir
    }

    /// The commands applied one by one to `open("a")` and all at once to `open("b")` give
    /// the same state, and it survives a reopen.
    fn commands_change_state(open: &dyn Fn(&str) -> Result<Meta, MetaError>) {
        {
            let meta = open("a").expect("open");
            for c in commands() {
                meta.apply(&[c]).expect("apply");
            }
            open("b").expect("open").apply(&commands()).expect("apply");
        }
        let (a, b) = (open("a").expect("reopen"), open("b").expect("reopen"));
        for meta in [&a, &b] {
            let streams = meta.streams().expect("streams");
            assert_eq!(streams.len(), 1);
            assert_eq!(
                (streams[0].0.as_str(), streams[0].1.partitions),
                ("sensors", 8),
                "the first create wins"
            );
            assert_eq!(streams[0].1.retention_bytes, Some(1 << 30));
            assert_eq!(streams[0].1.retention_ms, None);
            assert_eq!(meta.cursor("g", "sensors", 3).expect("cursor"), Some(42));
            assert_eq!(
                meta.cursor(MQTT_CURSOR, "sensors", 0).expect("cursor"),
                Some(9)
            );
            assert_eq!(
                meta.cursor("g", "gone", 0).expect("cursor"),
                None,
                "deleted with its stream"
            );
            assert_eq!(
                meta.edges().expect("edges"),
                vec![("gw1".to_owned(), 0, 100), ("gw1".to_owned(), 7, 3)],
                "never backwards"
            );
            assert_eq!(
                meta.ingest_from().expect("ingest_from"),
                vec![("sensors".to_owned(), 1, 70)],
                "never backwards, deleted with its stream"
            );
            assert_eq!(
                meta.amqp_entries("q/").expect("amqp"),
                vec![("q/%2F/orders".to_owned(), b"{}".to_vec())],
                "put, and deleted"
            );
        }
    }

    #[test]
    fn every_command_round_trips_through_its_encoding() {
        for c in commands() {
            assert_eq!(Command::decode(&c.encode()), Some(c.clone()));
            let bytes = c.encode();
            assert_eq!(
                Command::decode(&bytes[..bytes.len() - 1]),
                None,
                "truncated: {c:?}"
            );
        }
        assert_eq!(Command::decode(&[9]), None);
    }
}
