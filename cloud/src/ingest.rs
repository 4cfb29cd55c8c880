//! The ingest interface of the link: an edge's records, each with its sequence number in
//! its priority class, appended exactly once however often the edge resends them.
//!
//! Sequence numbers are per (edge, class): increasing, with gaps allowed (an edge drops
//! records under `drop_oldest`, and numbers its records across classes from one counter).
//! [`Ingest::ingest`] returns once every new record is durable in the log and the class's
//! highest committed sequence is durable in the metadata; that sequence is what the link
//! acknowledges and what an edge resumes after.
//!
//! Duplicates are dropped at two levels:
//! - a record whose sequence is at or below its class's committed sequence is skipped;
//! - per partition, a record at or below the highest sequence of that edge already in that
//!   partition is skipped. This covers a batch that reached some partitions but not others
//!   (one append failed, or the node died between the appends and the metadata commit): the
//!   resend fills in what is missing and nothing twice. Each record carries `ferry.edge`,
//!   `ferry.seq` and (class ≠ 0) `ferry.class` headers, and at start the node rebuilds the
//!   per-partition state by reading each partition from its *ingest point* on.
//!
//! The ingest point of a partition (meta `IngestFrom`) is an offset at or before every edge
//! record in it whose sequence is not yet committed. Before the first edge append to a
//! partition it is set to the partition's end; every commit moves it up, in the same
//! metadata transaction, to the first offset of the appends still waiting for their commit
//! (or past the last edge append when none wait). So however many segments roll between a
//! half-appended batch and a crash, the restart finds its records. A partition without one
//! (data from before ingest points existed) is read from its active segment.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use ferry_protocol::kafka::batch::records;
use ferry_protocol::mqtt::{Properties, QoS};
use ferry_protocol::topic::TopicName;

use crate::log::{for_each_batch, AppendData, LogError, NewRecord, Storage};
use crate::meta::{Command, Meta, MetaError};
use crate::routes::{to_record, MqttMessage, RouteTable};

/// Header carrying a record's per-edge sequence number (decimal).
pub const SEQ_HEADER: &str = "ferry.seq";
/// Header carrying the edge id.
pub const EDGE_HEADER: &str = "ferry.edge";
/// Header carrying a record's priority class on the edge, when not 0.
pub const CLASS_HEADER: &str = "ferry.class";

/// One record as an edge sends it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EdgeRecord {
    /// Per edge and priority class, increasing from record to record.
    pub seq: u64,
    /// The topic on the edge; on the cloud it becomes `<edge-id>/<topic>`.
    pub topic: TopicName,
    pub payload: Bytes,
    pub qos: QoS,
    pub retain: bool,
    pub properties: Properties,
    /// When the edge accepted it (ms since the epoch).
    pub timestamp_ms: i64,
}

/// Why an ingest failed; nothing of it is acknowledged, and the edge sends it again.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error(transparent)]
    Log(#[from] LogError),
    #[error(transparent)]
    Meta(#[from] MetaError),
    #[error("edge {edge}: topic {topic:?} is not valid on the cloud")]
    BadTopic { edge: String, topic: String },
    #[error("edge {edge}: sequence {seq} follows {previous}")]
    OutOfOrder {
        edge: String,
        seq: u64,
        previous: u64,
    },
}

/// The ingest path: routes, the log and the metadata.
pub struct Ingest {
    log: Arc<dyn Storage>,
    meta: Arc<Meta>,
    routes: Arc<RouteTable>,
    state: Mutex<State>,
    /// One ingest at a time per edge: a resend racing the original is serialised.
    edge_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Held while new partitions get their ingest point.
    pointing: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for Ingest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ingest").finish_non_exhaustive()
    }
}

/// A stream and partition.
type Destination = (String, u32);

/// An edge and one of its priority classes: one sequence space.
type Lane = (String, u8);

#[derive(Debug, Default)]
struct State {
    /// (edge, class) → highest sequence committed in the metadata.
    committed: HashMap<Lane, u64>,
    /// (stream, partition, lane) → highest sequence of that lane in that partition.
    partitions: HashMap<(String, u32, Lane), u64>,
    /// Partitions whose ingest point is in the metadata.
    pointed: HashSet<Destination>,
    /// Where the start-up read of a partition without an ingest point began.
    read_from: HashMap<Destination, i64>,
    /// Edge appends durable in the log, their commit still to come: partition → (append id,
    /// first offset).
    waiting: HashMap<Destination, Vec<(u64, i64)>>,
    /// Partition → the offset before which every edge record of it is in `partitions` (read
    /// at start or by [`Ingest::adopt`], or appended here).
    scanned_to: HashMap<Destination, i64>,
    /// Partition → the offset after the last edge append to it.
    edge_end: HashMap<Destination, i64>,
    /// Edges an append of which failed: it may have been committed with its answer lost,
    /// so their partitions are read again ([`Ingest::adopt`]) before the next link takes
    /// more of them ([`Ingest::take_unsure`]).
    unsure: HashSet<String>,
    next_append: u64,
}

impl State {
    /// The ingest point of `dest` once append `id` is committed.
    fn ingest_point(&self, dest: &Destination, id: u64) -> Option<i64> {
        let waiting = self.waiting.get(dest).into_iter().flatten();
        let first_waiting = waiting.filter(|(i, _)| *i != id).map(|(_, o)| *o).min();
        first_waiting.or_else(|| self.edge_end.get(dest).copied())
    }
}

impl Ingest {
    /// Loads the committed sequences and rebuilds the per-partition state from each
    /// partition's ingest point on.
    pub fn new(
        log: Arc<dyn Storage>,
        meta: Arc<Meta>,
        routes: Arc<RouteTable>,
    ) -> Result<Self, IngestError> {
        let mut state = State {
            committed: meta
                .edges()?
                .into_iter()
                .map(|(edge, class, seq)| ((edge, class), seq))
                .collect(),
            ..State::default()
        };
        let points: HashMap<Destination, i64> = meta
            .ingest_from()?
            .into_iter()
            .map(|(stream, partition, offset)| ((stream, partition), offset))
            .collect();
        state.pointed = points.keys().cloned().collect();
        for stream in log.streams() {
            for (p, info) in stream.partitions.iter().enumerate() {
                let p = p as u32;
                let dest = (stream.name.clone(), p);
                let from = match points.get(&dest) {
                    Some(&point) => point,
                    None => {
                        let active = info.active_base;
                        state.read_from.insert(dest.clone(), active);
                        active
                    }
                };
                let from = from.max(info.offsets.log_start);
                let found = edge_seqs(&*log, &stream.name, p, from)?;
                merge(&mut state.partitions, &stream.name, p, found);
                state.scanned_to.insert(dest, info.offsets.high_watermark);
            }
        }
        Ok(Self {
            log,
            meta,
            routes,
            state: Mutex::new(state),
            edge_locks: Mutex::new(HashMap::new()),
            pointing: tokio::sync::Mutex::new(()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `edge`'s link has just come to this node, from another node of the cluster perhaps,
    /// which may have taken records of it since this node last did: reloads the edge's
    /// committed sequences from the metadata, and reads each partition with an ingest point
    /// from where this node last read it (or, one it never read, from the point) for the
    /// edge records in it — every edge's, as they are there. Then a resend of what the other
    /// node appended, and had not committed when it went away, is not appended again.
    /// Blocking: reads the metadata and the log.
    pub fn adopt(&self, edge: &str) -> Result<(), IngestError> {
        let committed: Vec<(u8, u64)> = self
            .meta
            .edges()?
            .into_iter()
            .filter(|(e, _, _)| e == edge)
            .map(|(_, class, seq)| (class, seq))
            .collect();
        for (stream, p, point) in self.meta.ingest_from()? {
            let dest = (stream.clone(), p);
            // As the store has it now: what other nodes committed, and this node's own
            // commits whose answer was lost.
            let offsets = match self.log.offsets_now(&stream, p) {
                Ok(o) => o,
                Err(LogError::UnknownStream(_) | LogError::UnknownPartition { .. }) => continue,
                Err(e) => return Err(e.into()),
            };
            let known = self.lock().scanned_to.get(&dest).copied();
            let from = known.unwrap_or(point).max(offsets.log_start);
            if from >= offsets.high_watermark {
                continue;
            }
            let found = edge_seqs(&*self.log, &stream, p, from)?;
            let mut state = self.lock();
            merge(&mut state.partitions, &stream, p, found);
            let to = state.scanned_to.entry(dest).or_insert(0);
            *to = (*to).max(offsets.high_watermark);
        }
        let mut state = self.lock();
        for (class, seq) in committed {
            let c = state.committed.entry((edge.to_owned(), class)).or_insert(0);
            *c = (*c).max(seq);
        }
        Ok(())
    }

    /// True once for an edge an append of which failed since (see `State::unsure`).
    pub fn take_unsure(&self, edge: &str) -> bool {
        self.lock().unsure.remove(edge)
    }

    /// Marks `edge` to be read again at its next claim (its read failed).
    pub fn mark_unsure(&self, edge: &str) {
        self.lock().unsure.insert(edge.to_owned());
    }

    /// The highest sequence of `edge`'s class `class` committed so far (0: none).
    pub fn committed(&self, edge: &str, class: u8) -> u64 {
        self.lock()
            .committed
            .get(&(edge.to_owned(), class))
            .copied()
            .unwrap_or(0)
    }

    /// Every class of `edge` with something committed, and its highest sequence.
    pub fn committed_classes(&self, edge: &str) -> Vec<(u8, u64)> {
        let mut out: Vec<_> = self
            .lock()
            .committed
            .iter()
            .filter(|((e, _), _)| e == edge)
            .map(|((_, class), seq)| (*class, *seq))
            .collect();
        out.sort_unstable();
        out
    }

    /// Appends the records of `edge`'s class `class` not yet in the log, and returns the
    /// class's committed sequence once they (and it) are durable. Records must be in
    /// sequence order. [`Ingest::append`] then [`Ingest::commit`].
    pub async fn ingest(
        &self,
        edge: &str,
        class: u8,
        batch: Vec<EdgeRecord>,
    ) -> Result<u64, IngestError> {
        let appended = self.append(edge, class, batch).await?;
        self.commit(appended).await
    }

    /// The first half of [`Ingest::ingest`]: returns once the new records are durable in
    /// the log. The next batch of the edge may be appended while this one's
    /// [`Ingest::commit`] runs (a lagging committed sequence only makes a resend start
    /// earlier, and the per-partition state drops what is already in the log).
    pub async fn append(
        &self,
        edge: &str,
        class: u8,
        batch: Vec<EdgeRecord>,
    ) -> Result<Appended, IngestError> {
        self.append_fenced(edge, class, batch, None).await
    }

    /// As [`Ingest::append`], under the edge's link lease on a cluster: the log commits
    /// the records only while `fence` still holds it ([`Storage::append_fenced`]), so an
    /// append still waiting for the store when the edge moved to another node cannot land
    /// after that node read the edge's partitions.
    pub async fn append_fenced(
        &self,
        edge: &str,
        class: u8,
        batch: Vec<EdgeRecord>,
        fence: Option<crate::log::Fence>,
    ) -> Result<Appended, IngestError> {
        let lane: Lane = (edge.to_owned(), class);
        let edge_lock = {
            let mut locks = self.edge_locks.lock().unwrap_or_else(|e| e.into_inner());
            locks.entry(edge.to_owned()).or_default().clone()
        };
        let _serial = edge_lock.lock().await;
        let committed = self.committed(edge, class);
        let mut previous = committed;
        let routes = self.routes.get();
        // Per destination, in order: (stream, partition) → records.
        let mut groups: Vec<(Destination, Vec<(u64, NewRecord)>)> = Vec::new();
        for r in batch.into_iter().filter(|r| r.seq > committed) {
            if r.seq <= previous {
                return Err(IngestError::OutOfOrder {
                    edge: edge.to_owned(),
                    seq: r.seq,
                    previous,
                });
            }
            previous = r.seq;
            let topic = TopicName::new(format!("{edge}/{}", r.topic.as_str())).map_err(|_| {
                IngestError::BadTopic {
                    edge: edge.to_owned(),
                    topic: r.topic.as_str().to_owned(),
                }
            })?;
            let msg = MqttMessage {
                topic: &topic,
                payload: &r.payload,
                qos: r.qos,
                retain: r.retain,
                properties: &r.properties,
                edge: Some(edge),
                timestamp_ms: r.timestamp_ms,
            };
            let dest = routes.destination(&msg);
            let key = (dest.stream.to_owned(), dest.partition);
            let mut record = to_record(&msg);
            let after_edge = record
                .headers
                .iter()
                .position(|(k, _)| k == EDGE_HEADER)
                .map_or(0, |i| i + 1);
            record.headers.insert(
                after_edge,
                (SEQ_HEADER.to_owned(), Some(Bytes::from(r.seq.to_string()))),
            );
            if class != 0 {
                record.headers.insert(
                    after_edge + 1,
                    (
                        CLASS_HEADER.to_owned(),
                        Some(Bytes::from(class.to_string())),
                    ),
                );
            }
            match groups.iter_mut().find(|(k, _)| *k == key) {
                Some((_, v)) => v.push((r.seq, record)),
                None => groups.push((key, vec![(r.seq, record)])),
            }
        }
        if previous == committed {
            return Ok(Appended {
                lane,
                seq: None,
                id: 0,
                parts: Vec::new(),
            });
        }
        self.point_new_partitions(groups.iter().map(|(k, _)| k))
            .await?;
        // Drop what a partition already has, then append to every partition at once.
        let mut appends = Vec::new();
        let mut parts = Vec::new();
        let id;
        {
            let mut state = self.lock();
            state.next_append += 1;
            id = state.next_append;
            for ((stream, partition), recs) in groups {
                let have = state
                    .partitions
                    .get(&(stream.clone(), partition, lane.clone()))
                    .copied()
                    .unwrap_or(0);
                let fresh: Vec<_> = recs.into_iter().filter(|(seq, _)| *seq > have).collect();
                let Some(&(last, _)) = fresh.last() else {
                    continue;
                };
                // Waiting from before it is issued, at the partition's end now (its records
                // land there or after): a commit meanwhile cannot move the ingest point past
                // them. (An append whose batch then fails stays waiting: its partition's
                // ingest point stays before it until the node restarts.)
                let end = self
                    .log
                    .offsets(&stream, partition)
                    .map_or(0, |o| o.high_watermark);
                let dest = (stream.clone(), partition);
                state
                    .waiting
                    .entry(dest.clone())
                    .or_default()
                    .push((id, end));
                parts.push(dest);
                let data = AppendData::Records(fresh.into_iter().map(|(_, r)| r).collect());
                appends.push((
                    stream.clone(),
                    partition,
                    last,
                    self.log
                        .append_fenced(&stream, partition, data, fence.clone()),
                ));
            }
        }
        // Every partition's append at once, so that they share the appender's commits.
        let (keys, futures): (Vec<_>, Vec<_>) = appends
            .into_iter()
            .map(|(s, p, last, f)| ((s, p, last), f))
            .unzip();
        let results = futures_util::future::join_all(futures).await;
        let mut first_error = None;
        for ((stream, partition, last), result) in keys.into_iter().zip(results) {
            match result {
                Ok(appended) => {
                    let mut state = self.lock();
                    let end = state
                        .edge_end
                        .entry((stream.clone(), partition))
                        .or_insert(0);
                    *end = (*end).max(appended.last_offset + 1);
                    let e = state
                        .partitions
                        .entry((stream, partition, lane.clone()))
                        .or_insert(0);
                    *e = (*e).max(last);
                }
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        if let Some(e) = first_error {
            self.mark_unsure(edge);
            return Err(e.into());
        }
        Ok(Appended {
            lane,
            seq: Some(previous),
            id,
            parts,
        })
    }

    /// Sets the ingest point of each partition in `dests` that has none, to where its edge
    /// records will start: the partition's end (or, for one that had edge records before
    /// ingest points existed, where the start-up read began). Once per partition.
    async fn point_new_partitions<'a>(
        &self,
        dests: impl Iterator<Item = &'a Destination>,
    ) -> Result<(), IngestError> {
        let new: Vec<Destination> = {
            let state = self.lock();
            dests
                .filter(|d| !state.pointed.contains(*d))
                .cloned()
                .collect()
        };
        if new.is_empty() {
            return Ok(());
        }
        // One at a time: no edge append reaches a partition before its point is durable.
        let _one = self.pointing.lock().await;
        let mut commands = Vec::new();
        for (stream, partition) in new {
            let dest = (stream.clone(), partition);
            let offset = {
                let state = self.lock();
                if state.pointed.contains(&dest) {
                    continue;
                }
                state.read_from.get(&dest).copied()
            };
            let offset = match offset {
                Some(o) => o,
                None => match self.log.offsets(&stream, partition) {
                    Ok(o) => o.high_watermark,
                    // No such partition: the append to it fails on its own.
                    Err(_) => continue,
                },
            };
            commands.push(Command::IngestFrom {
                stream,
                partition,
                offset,
            });
        }
        let meta = self.meta.clone();
        let written = commands.clone();
        tokio::task::spawn_blocking(move || meta.apply(&written))
            .await
            .map_err(|e| MetaError::Corrupt(format!("metadata commit did not finish: {e}")))??;
        let mut state = self.lock();
        for c in commands {
            if let Command::IngestFrom {
                stream, partition, ..
            } = c
            {
                state.pointed.insert((stream, partition));
            }
        }
        Ok(())
    }

    /// The second half of [`Ingest::ingest`]: makes the lane's committed sequence durable
    /// in the metadata (never backwards) and returns it.
    pub async fn commit(&self, appended: Appended) -> Result<u64, IngestError> {
        let Appended {
            lane: (edge, class),
            seq,
            id,
            parts,
        } = appended;
        let Some(seq) = seq else {
            return Ok(self.committed(&edge, class));
        };
        let meta = self.meta.clone();
        let mut commands = vec![Command::CommitEdge {
            edge: edge.clone(),
            class,
            seq,
        }];
        {
            // With this append committed, its partitions' ingest points move up.
            let state = self.lock();
            for dest in &parts {
                if let Some(offset) = state.ingest_point(dest, id) {
                    commands.push(Command::IngestFrom {
                        stream: dest.0.clone(),
                        partition: dest.1,
                        offset,
                    });
                }
            }
        }
        tokio::task::spawn_blocking(move || meta.apply(&commands))
            .await
            .map_err(|e| MetaError::Corrupt(format!("metadata commit did not finish: {e}")))??;
        let mut state = self.lock();
        for dest in &parts {
            if let Some(waiting) = state.waiting.get_mut(dest) {
                waiting.retain(|(i, _)| *i != id);
            }
        }
        let committed = state.committed.entry((edge, class)).or_insert(0);
        *committed = (*committed).max(seq);
        Ok(*committed)
    }
}

/// Records of a lane durable in the log, their sequence not yet committed in the metadata.
#[derive(Debug)]
#[must_use = "the committed sequence moves only with Ingest::commit"]
pub struct Appended {
    lane: Lane,
    /// The highest sequence appended; None if the batch had nothing new.
    seq: Option<u64>,
    /// This append among the waiting ones, and the partitions it reached.
    id: u64,
    parts: Vec<Destination>,
}

/// The highest sequence of each lane among the edge records of a partition from `from` on.
fn edge_seqs(
    log: &dyn Storage,
    stream: &str,
    partition: u32,
    from: i64,
) -> Result<HashMap<Lane, u64>, LogError> {
    let mut found: HashMap<Lane, u64> = HashMap::new();
    for_each_batch(log, stream, partition, from, |_, batch| {
        // Compressed batches come from Kafka producers, never from an edge.
        let Ok(recs) = records(batch) else {
            return;
        };
        for rec in recs.flatten() {
            if let Some((lane, seq)) = lane_and_seq(&rec.headers) {
                let e = found.entry(lane).or_insert(0);
                *e = (*e).max(seq);
            }
        }
    })?;
    Ok(found)
}

/// Puts what [`edge_seqs`] found in a partition into the per-partition state.
fn merge(
    partitions: &mut HashMap<(String, u32, Lane), u64>,
    stream: &str,
    partition: u32,
    found: HashMap<Lane, u64>,
) {
    for (lane, seq) in found {
        let e = partitions
            .entry((stream.to_owned(), partition, lane))
            .or_insert(0);
        *e = (*e).max(seq);
    }
}

fn lane_and_seq(headers: &[ferry_protocol::kafka::Header<'_>]) -> Option<(Lane, u64)> {
    let meta = ferry_protocol::kafka::mqtt::read_headers(headers)?;
    Some(((meta.edge?, meta.class), meta.seq?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::{SegmentLog, StreamConfig};
    use crate::routes::{PartitionKey, RouteConfig, Routes};
    use ferry_protocol::kafka::batch::BatchHeader;

    fn rec(seq: u64, topic: &str) -> EdgeRecord {
        EdgeRecord {
            seq,
            topic: TopicName::new(topic.to_owned()).expect("topic"),
            payload: Bytes::from(format!("m{seq}")),
            qos: QoS::AtLeastOnce,
            retain: false,
            properties: Properties::default(),
            timestamp_ms: 1_000 + seq as i64,
        }
    }

    /// (stream, seq) of every record in the log, in offset order per stream.
    fn contents(log: &dyn Storage) -> Vec<(String, u64)> {
        let mut out = Vec::new();
        for s in log.streams() {
            let hw = s.partitions[0].offsets.high_watermark;
            let r = log.read(&s.name, 0, 0, usize::MAX).expect("read");
            assert!(hw == 0 || !r.batches.is_empty());
            let mut at = 0;
            while at < r.batches.len() {
                let h = BatchHeader::parse(&r.batches[at..]).expect("header");
                for rec in records(&r.batches[at..]).expect("records") {
                    let rec = rec.expect("record");
                    let ((edge, _), seq) =
                        lane_and_seq(&rec.headers).expect("edge and seq headers");
                    assert_eq!(edge, "gw1");
                    assert_eq!(
                        rec.key,
                        Some(
                            format!("gw1/{}", if s.name == "alarms" { "alarm" } else { "t" })
                                .as_bytes()
                        )
                    );
                    out.push((s.name.clone(), seq));
                }
                at += h.total_len();
            }
        }
        out
    }

    struct Node {
        log: Arc<dyn Storage>,
        ingest: Ingest,
    }

    /// The log backends the ingest is tested on.
    #[derive(Debug, Clone, Copy)]
    enum Backend {
        Local,
        /// Objects in a directory, the index and the metadata in PostgreSQL (`FERRY_TEST_PG`).
        Object,
    }

    const BACKENDS: [Backend; 2] = [Backend::Local, Backend::Object];

    /// Where a test's node keeps its log and metadata, the same on every (re)start.
    struct Place {
        dir: std::path::PathBuf,
        object: Option<crate::log::ObjectConfig>,
    }

    fn place(name: &str, backend: Backend) -> Place {
        let name = format!("{name}-{backend:?}").to_lowercase();
        let dir = std::env::temp_dir().join(format!("ferry-ingest-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let object = match backend {
            Backend::Local => None,
            Backend::Object => Some(crate::log::ObjectConfig {
                object_url: format!("file://{}", dir.join("objects").display()),
                postgres_url: crate::log::object_testing::database(&format!("ingest_{name}")),
                flush_ms: 5,
                ..crate::log::ObjectConfig::default()
            }),
        };
        Place { dir, object }
    }

    fn node(place: &Place, with_alarms: bool) -> Node {
        node_with(place, with_alarms, StreamConfig::default())
    }

    fn node_with(place: &Place, with_alarms: bool, config: StreamConfig) -> Node {
        let dir = &place.dir;
        let (log, meta): (Arc<dyn Storage>, Meta) = match &place.object {
            None => (
                SegmentLog::open(&dir.join("log"), true, 64).expect("log"),
                Meta::open(&dir.join("meta.redb")).expect("meta"),
            ),
            Some(object) => {
                std::fs::create_dir_all(dir).expect("dir");
                let log = crate::log::ObjectLog::open(object).expect("log");
                let meta =
                    Meta::shared(&dir.join("meta.redb"), crate::log::PgMeta::new(log.clone()))
                        .expect("meta");
                (log, meta)
            }
        };
        let meta = Arc::new(meta);
        let routes = Routes::new(&[RouteConfig {
            filter: "+/alarm".into(),
            stream: "alarms".into(),
            partitions: 1,
            partition_key: PartitionKey::Topic,
        }])
        .expect("routes");
        for (name, partitions) in routes.streams() {
            if name != "alarms" || with_alarms {
                log.create_stream(
                    name,
                    &StreamConfig {
                        partitions,
                        ..config.clone()
                    },
                )
                .expect("stream");
            }
        }
        let ingest =
            Ingest::new(log.clone(), meta, Arc::new(RouteTable::new(routes))).expect("ingest");
        Node { log, ingest }
    }

    #[tokio::test]
    async fn a_resend_is_appended_once() {
        for backend in BACKENDS {
            let dir = place("resend", backend);
            let n = node(&dir, true);
            let batch: Vec<_> = (1..=10).map(|s| rec(s, "t")).collect();
            assert_eq!(
                n.ingest
                    .ingest("gw1", 0, batch.clone())
                    .await
                    .expect("ingest"),
                10
            );
            assert_eq!(n.ingest.ingest("gw1", 0, batch).await.expect("resend"), 10);
            let more: Vec<_> = (5..=15).map(|s| rec(s, "t")).collect();
            assert_eq!(n.ingest.ingest("gw1", 0, more).await.expect("overlap"), 15);
            let got = contents(&*n.log);
            assert_eq!(
                got,
                (1..=15).map(|s| ("mqtt".to_owned(), s)).collect::<Vec<_>>()
            );
            assert!(matches!(
                n.ingest
                    .ingest("gw1", 0, vec![rec(17, "t"), rec(16, "t")])
                    .await,
                Err(IngestError::OutOfOrder {
                    seq: 16,
                    previous: 17,
                    ..
                })
            ));
        }
    }

    #[tokio::test]
    async fn a_batch_that_reached_some_partitions_is_completed_without_duplicates_even_after_a_restart(
    ) {
        for backend in BACKENDS {
            let dir = place("partial", backend);
            let batch = || {
                vec![
                    rec(1, "t"),
                    rec(2, "alarm"),
                    rec(3, "t"),
                    rec(4, "alarm"),
                    rec(5, "t"),
                ]
            };
            // The alarms stream is missing: that part of the batch fails, the rest is durable.
            {
                let n = node(&dir, false);
                assert!(n.ingest.ingest("gw1", 0, batch()).await.is_err());
                assert_eq!(n.ingest.committed("gw1", 0), 0, "nothing acknowledged");
            }
            // The node restarts (the per-partition state comes back from the log), and the edge
            // sends the whole batch again.
            let n = node(&dir, true);
            assert_eq!(n.ingest.ingest("gw1", 0, batch()).await.expect("resend"), 5);
            let got = contents(&*n.log);
            assert_eq!(
                got,
                vec![
                    ("alarms".into(), 2),
                    ("alarms".into(), 4),
                    ("mqtt".into(), 1),
                    ("mqtt".into(), 3),
                    ("mqtt".into(), 5)
                ]
            );
            drop(n);
            let n = node(&dir, true);
            assert_eq!(
                n.ingest.committed("gw1", 0),
                5,
                "the committed sequence is durable"
            );
        }
    }

    /// Two nodes of a cluster on one store and database: `a` takes an edge's records and
    /// goes away with the last of them appended and not committed; the edge moves to `b`,
    /// which started before all that, and sends them again: once `b` adopted the edge, they
    /// are not appended twice, and `b` knows what `a` committed.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_node_that_takes_an_edge_over_appends_nothing_the_other_node_took() {
        let shared = place("adopt", Backend::Object);
        let on = |name: &str| {
            let mut object = shared.object.clone().expect("object");
            object.node = Some(name.to_owned());
            Place {
                dir: shared.dir.join(name),
                object: Some(object),
            }
        };
        let b = node(&on("b"), true);
        let a = node(&on("a"), true);
        let batch = |seqs: std::ops::RangeInclusive<u64>| seqs.map(|s| rec(s, "t")).collect();
        assert_eq!(a.ingest.ingest("gw1", 0, batch(1..=3)).await.expect("a"), 3);
        let _never_committed = a.ingest.append("gw1", 0, batch(4..=6)).await.expect("a");
        drop(a);
        // b follows a's commits through PostgreSQL.
        let until = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while b.log.offsets("mqtt", 0).expect("offsets").high_watermark < 6 {
            assert!(std::time::Instant::now() < until, "b sees a's appends");
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        let ingest = &b.ingest;
        tokio::task::block_in_place(|| ingest.adopt("gw1")).expect("adopt");
        assert_eq!(b.ingest.committed("gw1", 0), 3, "what a committed");
        assert_eq!(b.ingest.ingest("gw1", 0, batch(4..=8)).await.expect("b"), 8);
        assert_eq!(edge_seqs(&*b.log, "mqtt"), (1..=8).collect::<Vec<_>>());
    }

    /// The edge sequences in partition 0 of `stream`, in offset order (other records
    /// skipped).
    fn edge_seqs(log: &dyn Storage, stream: &str) -> Vec<u64> {
        let mut out = Vec::new();
        for_each_batch(log, stream, 0, 0, |_, batch| {
            for rec in records(batch).expect("records") {
                if let Some((_, seq)) = lane_and_seq(&rec.expect("record").headers) {
                    out.push(seq);
                }
            }
        })
        .expect("read");
        out
    }

    #[tokio::test]
    async fn a_half_appended_batch_is_found_after_segments_rolled_and_the_node_restarted() {
        for backend in BACKENDS {
            let dir = place("rolled", backend);
            let small = StreamConfig {
                segment_bytes: 2048,
                index_interval_bytes: 256,
                ..StreamConfig::default()
            };
            {
                let n = node_with(&dir, false, small.clone());
                let first: Vec<_> = (1..=3).map(|s| rec(s, "t")).collect();
                assert_eq!(n.ingest.ingest("gw1", 0, first).await.expect("ingest"), 3);
                // Half of the next batch reaches the log (the alarms stream is missing).
                let half = vec![rec(4, "t"), rec(5, "alarm"), rec(6, "t")];
                assert!(n.ingest.ingest("gw1", 0, half).await.is_err());
                // Other clients' records roll the partition's segments well past it.
                for i in 0..100 {
                    let other = NewRecord {
                        timestamp: 2_000,
                        key: Some(Bytes::from_static(b"sensors/other")),
                        value: Some(Bytes::from(format!("other {i}"))),
                        headers: Vec::new(),
                    };
                    n.log
                        .append("mqtt", 0, AppendData::Records(vec![other]))
                        .await
                        .expect("append");
                }
                let streams = n.log.streams();
                let mqtt = streams.iter().find(|s| s.name == "mqtt").expect("mqtt");
                assert!(mqtt.partitions[0].segments > 3, "segments rolled");
            }
            // Restarted, the edge sends the batch again: what was there is not appended twice.
            let n = node_with(&dir, true, small);
            let again = vec![rec(4, "t"), rec(5, "alarm"), rec(6, "t")];
            assert_eq!(n.ingest.ingest("gw1", 0, again).await.expect("resend"), 6);
            assert_eq!(edge_seqs(&*n.log, "mqtt"), [1, 2, 3, 4, 6]);
            assert_eq!(edge_seqs(&*n.log, "alarms"), [5]);
        }
    }
}
