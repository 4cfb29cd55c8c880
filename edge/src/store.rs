//! Durable state of the edge broker in one redb database: persistent sessions with their
//! subscriptions, queued and in-flight QoS 1/2 messages and unreleased QoS 2 ids, and retained
//! messages; on the edge (feature `edge`) the outbox too, in tables of its own
//! (`outbox_tables`). The broker core emits [`StoreOp`]s; the router applies each batch of
//! them in one write transaction (one fsync) before the batch's acknowledgements go out.
//!
//! The record formats are written down in `docs/edge-storage.md`.

#[cfg(feature = "edge")]
pub(crate) mod outbox_tables;

use std::num::NonZeroU32;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use ferry_protocol::mqtt::{
    decode, Packet, PacketId, ProtocolVersion, Publish, QoS, RetainHandling, SubscriptionOptions,
    MAX_PACKET_SIZE,
};
use ferry_protocol::topic::{TopicFilter, TopicName};
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};

use crate::broker::{Delivery, LogPosition, Message, QueueState, Snapshot, StoreOp, StoredSession};
use crate::config::StorageConfig;

/// client id → session record.
const SESSIONS: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("sessions");
/// (client id, sequence) → delivery record.
const QUEUE: TableDefinition<'_, (&str, u64), &[u8]> = TableDefinition::new("queue");
/// (client id, packet id) → nothing: incoming QoS 2 received, not yet released.
const QOS2: TableDefinition<'_, (&str, u16), ()> = TableDefinition::new("qos2_in");
/// topic → message record.
const RETAINED: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("retained");

/// The first byte of every record, so that a later format can be told apart.
const FORMAT: u8 = 1;
/// The first byte of a message record that says where the message is in the cloud's log
/// (log mode: a session held on a cloud node, see [`write_message`]).
const FORMAT_POSITIONED: u8 = 2;

/// Why storage failed. Any of these stops the broker: it cannot acknowledge what it cannot
/// keep.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database: {0}")]
    Db(#[from] redb::Error),
    /// The log of a node in log mode refused an append.
    #[error("log append failed: {0}")]
    Log(String),
    #[error("cannot create the data directory {path}: {source}")]
    DataDir {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("corrupt record in {table}: {what}")]
    Corrupt { table: &'static str, what: String },
    /// The router thread could not start its runtime.
    #[error("cannot start the router: {0}")]
    RouterStart(std::io::Error),
}

fn dberr(e: impl Into<redb::Error>) -> StoreError {
    StoreError::Db(e.into())
}

/// The database, and whether each commit waits for the disk.
pub struct Store {
    db: Arc<Database>,
    fsync: bool,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("fsync", &self.fsync).finish()
    }
}

impl Store {
    /// Opens (or creates) `dir/ferry-edge.redb`, with at most `config.cache_bytes` of page
    /// cache. With `config.fsync`, every commit is on disk when it returns; without, a power
    /// loss may lose the last commits (a process crash does not).
    pub fn open(dir: &Path, config: &StorageConfig) -> Result<Self, StoreError> {
        let fsync = config.fsync;
        std::fs::create_dir_all(dir).map_err(|source| StoreError::DataDir {
            path: dir.to_owned(),
            source,
        })?;
        let database = Database::builder()
            .set_cache_size(usize::try_from(config.cache_bytes).unwrap_or(usize::MAX))
            .create(dir.join("ferry-edge.redb"))
            .map_err(dberr)?;
        let txn = database.begin_write().map_err(dberr)?;
        txn.open_table(SESSIONS).map_err(dberr)?;
        txn.open_table(QUEUE).map_err(dberr)?;
        txn.open_table(QOS2).map_err(dberr)?;
        txn.open_table(RETAINED).map_err(dberr)?;
        #[cfg(feature = "edge")]
        outbox_tables::create(&txn)?;
        txn.commit().map_err(dberr)?;
        Ok(Self {
            db: Arc::new(database),
            fsync,
        })
    }

    /// Everything stored, for [`crate::broker::Broker`] to restore at start-up.
    pub(crate) fn load(&self) -> Result<Snapshot, StoreError> {
        let clock = Clock::now();
        let txn = self.db.begin_read().map_err(dberr)?;
        let sessions = txn.open_table(SESSIONS).map_err(dberr)?;
        let queue = txn.open_table(QUEUE).map_err(dberr)?;
        let qos2 = txn.open_table(QOS2).map_err(dberr)?;
        let retained = txn.open_table(RETAINED).map_err(dberr)?;
        let mut snapshot = Snapshot::default();
        for row in sessions.iter().map_err(dberr)? {
            let (key, value) = row.map_err(dberr)?;
            let client_id: Arc<str> = key.value().into();
            let (expiry_secs, username, subscriptions) = read_session(value.value())?;
            let mut stored = StoredSession {
                client_id: client_id.clone(),
                username,
                expiry_secs,
                subscriptions,
                queue: Vec::new(),
                awaiting_pubrel: Vec::new(),
            };
            for row in queue
                .range((&*client_id, 0)..=(&*client_id, u64::MAX))
                .map_err(dberr)?
            {
                let (key, value) = row.map_err(dberr)?;
                let seq = key.value().1;
                stored
                    .queue
                    .push(read_delivery(value.value(), seq, &clock)?);
            }
            for row in qos2
                .range((&*client_id, 0)..=(&*client_id, u16::MAX))
                .map_err(dberr)?
            {
                let (key, _) = row.map_err(dberr)?;
                if let Some(id) = PacketId::new(key.value().1) {
                    stored.awaiting_pubrel.push(id);
                }
            }
            snapshot.sessions.push(stored);
        }
        for row in retained.iter().map_err(dberr)? {
            let (_, value) = row.map_err(dberr)?;
            let mut bytes = Bytes::copy_from_slice(value.value());
            snapshot
                .retained
                .push(read_message(&mut bytes, &clock, "retained")?);
        }
        Ok(snapshot)
    }

    /// Applies `ops` in order in one write transaction; returns what it deleted from the
    /// outbox.
    pub(crate) fn apply(&self, ops: &[StoreOp]) -> Result<Committed, StoreError> {
        if ops.is_empty() {
            return Ok(Committed::default());
        }
        let clock = Clock::now();
        let mut txn = self.db.begin_write().map_err(dberr)?;
        if !self.fsync {
            txn.set_durability(Durability::None)
                .map_err(|e| StoreError::Corrupt {
                    table: "-",
                    what: e.to_string(),
                })?;
        }
        let committed = {
            let mut sessions = txn.open_table(SESSIONS).map_err(dberr)?;
            let mut queue = txn.open_table(QUEUE).map_err(dberr)?;
            let mut qos2 = txn.open_table(QOS2).map_err(dberr)?;
            let mut retained = txn.open_table(RETAINED).map_err(dberr)?;
            #[cfg(feature = "edge")]
            let mut outbox = outbox_tables::Writer::open(&txn)?;
            let mut buf = BytesMut::new();
            for op in ops {
                buf.clear();
                match op {
                    StoreOp::SessionPut {
                        client_id,
                        username,
                        expiry_secs,
                        subscriptions,
                    } => {
                        write_session(&mut buf, *expiry_secs, username.as_deref(), subscriptions);
                        sessions.insert(&**client_id, &buf[..]).map_err(dberr)?;
                    }
                    StoreOp::SessionDelete { client_id } => {
                        let id = &**client_id;
                        sessions.remove(id).map_err(dberr)?;
                        queue
                            .retain_in((id, 0)..=(id, u64::MAX), |_, _| false)
                            .map_err(dberr)?;
                        qos2.retain_in((id, 0)..=(id, u16::MAX), |_, _| false)
                            .map_err(dberr)?;
                    }
                    StoreOp::QueuePut {
                        client_id,
                        delivery,
                        state,
                    } => {
                        write_delivery(&mut buf, delivery, *state, &clock);
                        queue
                            .insert((&**client_id, delivery.seq), &buf[..])
                            .map_err(dberr)?;
                    }
                    StoreOp::QueueDelete { client_id, seq } => {
                        queue.remove((&**client_id, *seq)).map_err(dberr)?;
                    }
                    StoreOp::RetainedPut { msg } => {
                        write_message(&mut buf, msg, &clock);
                        retained
                            .insert(msg.topic.as_str(), &buf[..])
                            .map_err(dberr)?;
                    }
                    StoreOp::RetainedDelete { topic } => {
                        retained.remove(topic.as_str()).map_err(dberr)?;
                    }
                    StoreOp::Qos2Put {
                        client_id,
                        packet_id,
                    } => {
                        qos2.insert((&**client_id, packet_id.get()), ())
                            .map_err(dberr)?;
                    }
                    StoreOp::Qos2Delete {
                        client_id,
                        packet_id,
                    } => {
                        qos2.remove((&**client_id, packet_id.get()))
                            .map_err(dberr)?;
                    }
                    #[cfg(feature = "edge")]
                    StoreOp::Outbox(op) => outbox.apply(op, &clock, &mut buf)?,
                }
            }
            Committed {
                #[cfg(feature = "edge")]
                outbox: outbox.finish()?,
            }
        };
        txn.commit().map_err(dberr)?;
        Ok(committed)
    }
}

/// What the router needs of storage: one batch's changes made durable in one commit (group
/// commit). [`Store`] is the real one; the router's tests give it stores that fail or take
/// their time on purpose.
pub(crate) trait CommitStore {
    /// Applies `ops` in order in one durable commit and returns what it deleted from the
    /// outbox. The router sends none of the batch's packets before this returns, and stops
    /// on an error: nothing it could not keep is acknowledged.
    fn apply(&self, ops: &[StoreOp]) -> Result<Committed, StoreError>;
}

impl CommitStore for Store {
    fn apply(&self, ops: &[StoreOp]) -> Result<Committed, StoreError> {
        Store::apply(self, ops)
    }
}

/// What a commit reports beside having made its operations durable.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Committed {
    /// What it deleted from the outbox (for the outbox's budget).
    #[cfg(feature = "edge")]
    pub(crate) outbox: outbox_tables::OutboxRemoved,
}

/// Instants do not survive a restart; expiry times are stored as Unix milliseconds.
struct Clock {
    instant: Instant,
    unix_ms: u64,
}

impl Clock {
    fn now() -> Self {
        let unix_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        Self {
            instant: Instant::now(),
            unix_ms,
        }
    }

    fn unix_ms_of(&self, at: Instant) -> u64 {
        match at.checked_duration_since(self.instant) {
            Some(ahead) => self.unix_ms + ahead.as_millis() as u64,
            None => self
                .unix_ms
                .saturating_sub(self.instant.duration_since(at).as_millis() as u64),
        }
    }

    fn instant_of_unix_ms(&self, ms: u64) -> Instant {
        self.instant + Duration::from_millis(ms.saturating_sub(self.unix_ms))
    }
}

fn corrupt(table: &'static str, what: impl Into<String>) -> StoreError {
    StoreError::Corrupt {
        table,
        what: what.into(),
    }
}

fn put_str(buf: &mut BytesMut, s: &str) {
    buf.put_u16(s.len() as u16);
    buf.put_slice(s.as_bytes());
}

fn get_str(r: &mut Bytes, table: &'static str) -> Result<String, StoreError> {
    if r.remaining() < 2 {
        return Err(corrupt(table, "short string length"));
    }
    let len = usize::from(r.get_u16());
    if r.remaining() < len {
        return Err(corrupt(table, "short string"));
    }
    String::from_utf8(r.split_to(len).to_vec()).map_err(|_| corrupt(table, "string is not UTF-8"))
}

fn need(r: &Bytes, n: usize, table: &'static str) -> Result<(), StoreError> {
    if r.remaining() < n {
        Err(corrupt(table, "record too short"))
    } else {
        Ok(())
    }
}

/// Session: format, expiry, username (empty for none), then each subscription as filter, options byte (the MQTT 5
/// SUBSCRIBE encoding) and identifier (0 for none).
fn write_session(
    buf: &mut BytesMut,
    expiry_secs: u32,
    username: Option<&str>,
    subs: &[(TopicFilter, SubscriptionOptions, Option<NonZeroU32>)],
) {
    buf.put_u8(FORMAT);
    buf.put_u32(expiry_secs);
    put_str(buf, username.unwrap_or(""));
    buf.put_u16(subs.len() as u16);
    for (filter, o, id) in subs {
        put_str(buf, filter.as_str());
        buf.put_u8(
            o.qos as u8
                | u8::from(o.no_local) << 2
                | u8::from(o.retain_as_published) << 3
                | (o.retain_handling as u8) << 4,
        );
        buf.put_u32(id.map_or(0, NonZeroU32::get));
    }
}

type Subscriptions = Vec<(TopicFilter, SubscriptionOptions, Option<NonZeroU32>)>;

fn read_session(raw: &[u8]) -> Result<(u32, Option<Arc<str>>, Subscriptions), StoreError> {
    const T: &str = "sessions";
    let mut r = Bytes::copy_from_slice(raw);
    need(&r, 7, T)?;
    if r.get_u8() != FORMAT {
        return Err(corrupt(T, "unknown format"));
    }
    let expiry = r.get_u32();
    let username = get_str(&mut r, T)?;
    let username = (!username.is_empty()).then(|| Arc::from(username));
    need(&r, 2, T)?;
    let n = r.get_u16();
    let mut subs = Vec::with_capacity(usize::from(n));
    for _ in 0..n {
        let filter =
            TopicFilter::new(get_str(&mut r, T)?).map_err(|e| corrupt(T, e.to_string()))?;
        need(&r, 5, T)?;
        let byte = r.get_u8();
        let qos = QoS::from_u8(byte & 0b11).map_err(|e| corrupt(T, e.to_string()))?;
        let retain_handling = match (byte >> 4) & 0b11 {
            0 => RetainHandling::SendAtSubscribe,
            1 => RetainHandling::SendAtSubscribeIfNew,
            _ => RetainHandling::DoNotSend,
        };
        let options = SubscriptionOptions {
            qos,
            no_local: byte & 0b0100 != 0,
            retain_as_published: byte & 0b1000 != 0,
            retain_handling,
        };
        subs.push((filter, options, NonZeroU32::new(r.get_u32())));
    }
    Ok((expiry, username, subs))
}

/// Delivery: format, delivered QoS, RETAIN to send, state (0 queued, 1 published, 2
/// released), packet id, subscription identifiers, then the message.
fn write_delivery(buf: &mut BytesMut, d: &Delivery, state: QueueState, clock: &Clock) {
    buf.put_u8(FORMAT);
    buf.put_u8(d.qos as u8);
    buf.put_u8(u8::from(d.retain));
    let (code, id) = match state {
        QueueState::Queued => (0, 0),
        QueueState::Published(id) => (1, id.get()),
        QueueState::Released(id) => (2, id.get()),
    };
    buf.put_u8(code);
    buf.put_u16(id);
    buf.put_u16(d.subscription_ids.len() as u16);
    for id in &d.subscription_ids {
        buf.put_u32(id.get());
    }
    write_message(buf, &d.msg, clock);
}

fn read_delivery(
    raw: &[u8],
    seq: u64,
    clock: &Clock,
) -> Result<(Delivery, QueueState), StoreError> {
    const T: &str = "queue";
    let mut r = Bytes::copy_from_slice(raw);
    need(&r, 8, T)?;
    if r.get_u8() != FORMAT {
        return Err(corrupt(T, "unknown format"));
    }
    let qos = QoS::from_u8(r.get_u8()).map_err(|e| corrupt(T, e.to_string()))?;
    let retain = r.get_u8() != 0;
    let code = r.get_u8();
    let id = PacketId::new(r.get_u16());
    let state = match (code, id) {
        (0, _) => QueueState::Queued,
        (1, Some(id)) => QueueState::Published(id),
        (2, Some(id)) => QueueState::Released(id),
        _ => return Err(corrupt(T, "bad delivery state")),
    };
    let n = usize::from(r.get_u16());
    need(&r, 4 * n, T)?;
    let subscription_ids = (0..n)
        .filter_map(|_| NonZeroU32::new(r.get_u32()))
        .collect();
    let msg = read_message(&mut r, clock, T)?;
    Ok((
        Delivery {
            msg: Arc::new(msg),
            qos,
            retain,
            subscription_ids,
            seq,
        },
        state,
    ))
}

/// Message: format, QoS, RETAIN, expiry (Unix ms, 0 for none), publisher (empty for none),
/// with [`FORMAT_POSITIONED`] where it is in the log (stream, partition, offset), then the
/// topic, properties and payload as an MQTT 5.0 QoS 0 PUBLISH packet.
fn write_message(buf: &mut BytesMut, msg: &Message, clock: &Clock) {
    buf.put_u8(if msg.position.is_some() {
        FORMAT_POSITIONED
    } else {
        FORMAT
    });
    buf.put_u8(msg.qos as u8);
    buf.put_u8(u8::from(msg.retain));
    buf.put_u64(msg.expires_at.map_or(0, |at| clock.unix_ms_of(at).max(1)));
    put_str(buf, msg.publisher.as_deref().unwrap_or(""));
    if let Some(at) = &msg.position {
        put_str(buf, &at.stream);
        buf.put_u32(at.partition);
        buf.put_i64(at.offset);
    }
    let mut p = Publish::new(msg.topic.clone(), msg.payload.clone());
    p.properties = msg.properties.clone();
    Packet::Publish(p)
        .encode(ProtocolVersion::V5, buf)
        .expect("a message the broker accepted encodes as a PUBLISH");
}

fn read_message(r: &mut Bytes, clock: &Clock, table: &'static str) -> Result<Message, StoreError> {
    need(r, 11, table)?;
    let format = r.get_u8();
    if format != FORMAT && format != FORMAT_POSITIONED {
        return Err(corrupt(table, "unknown message format"));
    }
    let qos = QoS::from_u8(r.get_u8()).map_err(|e| corrupt(table, e.to_string()))?;
    let retain = r.get_u8() != 0;
    let expires = r.get_u64();
    let publisher = get_str(r, table)?;
    let position = if format == FORMAT_POSITIONED {
        let stream = get_str(r, table)?;
        need(r, 12, table)?;
        Some(LogPosition {
            stream: stream.into(),
            partition: r.get_u32(),
            offset: r.get_i64(),
        })
    } else {
        None
    };
    let mut rest = BytesMut::from(&r[..]);
    let Ok(Some(Packet::Publish(p))) = decode(&mut rest, ProtocolVersion::V5, MAX_PACKET_SIZE)
    else {
        return Err(corrupt(table, "stored PUBLISH does not decode"));
    };
    let topic: TopicName = p.topic;
    Ok(Message {
        topic,
        payload: p.payload,
        qos,
        retain,
        properties: p.properties,
        expires_at: (expires != 0).then(|| clock.instant_of_unix_ms(expires)),
        publisher: (!publisher.is_empty()).then(|| publisher.into()),
        position,
    })
}

#[cfg(test)]
mod tests {
    use redb::ReadableTableMetadata;

    use super::*;

    fn message(topic: &str, payload: &str) -> Arc<Message> {
        let mut properties = ferry_protocol::mqtt::Properties::default();
        properties.user_properties.push(("unit".into(), "C".into()));
        Arc::new(Message {
            topic: TopicName::new(topic).expect("valid"),
            payload: Bytes::from(payload.to_owned()),
            qos: QoS::AtLeastOnce,
            retain: true,
            properties,
            expires_at: None,
            publisher: Some("pub-1".into()),
            position: None,
        })
    }

    #[test]
    fn ops_survive_reopening_the_database() {
        let dir = tempdir();
        let client: Arc<str> = "dev-1".into();
        {
            let store = Store::open(&dir, &StorageConfig::default()).expect("open");
            let filter = TopicFilter::new("cmd/#").expect("valid");
            let d = |seq| Delivery {
                msg: {
                    // One read back from a cloud's log (log mode) says where it is there.
                    let mut m = (*message("cmd/a", &format!("m{seq}"))).clone();
                    m.position = (seq == 2).then(|| LogPosition {
                        stream: "mqtt".into(),
                        partition: 3,
                        offset: 42,
                    });
                    Arc::new(m)
                },
                qos: QoS::AtLeastOnce,
                retain: false,
                subscription_ids: vec![NonZeroU32::new(7).expect("non-zero")],
                seq,
            };
            store
                .apply(&[
                    StoreOp::SessionPut {
                        client_id: client.clone(),
                        username: Some("alice".into()),
                        expiry_secs: 3600,
                        subscriptions: vec![(
                            filter,
                            SubscriptionOptions::new(QoS::AtLeastOnce),
                            NonZeroU32::new(7),
                        )],
                    },
                    StoreOp::QueuePut {
                        client_id: client.clone(),
                        delivery: d(0),
                        state: QueueState::Queued,
                    },
                    StoreOp::QueuePut {
                        client_id: client.clone(),
                        delivery: d(1),
                        state: QueueState::Queued,
                    },
                    StoreOp::QueuePut {
                        client_id: client.clone(),
                        delivery: d(2),
                        state: QueueState::Queued,
                    },
                    StoreOp::QueuePut {
                        client_id: client.clone(),
                        delivery: d(0),
                        state: QueueState::Published(PacketId::new(5).expect("non-zero")),
                    },
                    StoreOp::QueueDelete {
                        client_id: client.clone(),
                        seq: 1,
                    },
                    StoreOp::Qos2Put {
                        client_id: client.clone(),
                        packet_id: PacketId::new(9).expect("non-zero"),
                    },
                    StoreOp::RetainedPut {
                        msg: message("status/a", "on"),
                    },
                    StoreOp::RetainedPut {
                        msg: message("status/b", "on"),
                    },
                    StoreOp::RetainedDelete {
                        topic: TopicName::new("status/b").expect("valid"),
                    },
                ])
                .expect("apply");
        }
        let store = Store::open(&dir, &StorageConfig::default()).expect("reopen");
        let snap = store.load().expect("load");
        assert_eq!(snap.sessions.len(), 1);
        let s = &snap.sessions[0];
        assert_eq!((&*s.client_id, s.expiry_secs), ("dev-1", 3600));
        assert_eq!(s.username.as_deref(), Some("alice"));
        assert_eq!(s.subscriptions[0].0.as_str(), "cmd/#");
        let seqs: Vec<(u64, QueueState)> = s.queue.iter().map(|(d, st)| (d.seq, *st)).collect();
        assert_eq!(
            seqs,
            [
                (
                    0,
                    QueueState::Published(PacketId::new(5).expect("non-zero"))
                ),
                (2, QueueState::Queued)
            ]
        );
        let (d, _) = &s.queue[1];
        assert_eq!(&d.msg.payload[..], b"m2");
        assert_eq!(
            d.msg.properties.user_properties,
            [("unit".to_string(), "C".to_string())]
        );
        assert_eq!(d.msg.publisher.as_deref(), Some("pub-1"));
        assert_eq!(
            d.msg.position,
            Some(LogPosition {
                stream: "mqtt".into(),
                partition: 3,
                offset: 42
            })
        );
        assert_eq!(s.queue[0].0.msg.position, None);
        assert_eq!(d.subscription_ids, [NonZeroU32::new(7).expect("non-zero")]);
        assert_eq!(s.awaiting_pubrel, [PacketId::new(9).expect("non-zero")]);
        assert_eq!(snap.retained.len(), 1);
        assert_eq!(snap.retained[0].topic.as_str(), "status/a");

        store
            .apply(&[StoreOp::SessionDelete { client_id: client }])
            .expect("delete");
        let snap = store.load().expect("load");
        assert!(snap.sessions.is_empty());
        let txn = store.db.begin_read().expect("read");
        assert_eq!(
            txn.open_table(QUEUE).expect("queue").len().expect("len"),
            0,
            "queue went with the session"
        );
    }

    #[test]
    fn corrupt_record_is_an_error_not_a_panic() {
        assert!(matches!(
            read_session(&[9, 0, 0]),
            Err(StoreError::Corrupt { .. })
        ));
        assert!(matches!(
            read_delivery(&[1, 1, 0, 7, 0, 1, 0, 0], 0, &Clock::now()),
            Err(StoreError::Corrupt { .. })
        ));
        let mut junk = Bytes::from_static(&[1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x30, 0x7f]);
        assert!(matches!(
            read_message(&mut junk, &Clock::now(), "t"),
            Err(StoreError::Corrupt { .. })
        ));
    }

    #[test]
    fn expiry_times_round_trip_through_unix_time() {
        let clock = Clock::now();
        let at = clock.instant + Duration::from_secs(90);
        let back = clock.instant_of_unix_ms(clock.unix_ms_of(at));
        assert!(
            back.duration_since(at) < Duration::from_millis(2)
                && at.duration_since(back) < Duration::from_millis(2)
        );
    }

    fn tempdir() -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "ferry-store-test-{}-{}",
            std::process::id(),
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos())
        ));
        std::fs::create_dir_all(&dir).expect("temp dir");
        dir
    }
}
