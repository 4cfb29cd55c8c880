//! The tailer: a thread that follows the end of every partition and hands each record that
//! is an MQTT message to the broker, in log order, from the durable delivery cursor
//! [`MQTT_CURSOR`]. It has a small runtime of its own only to wait for commits with a
//! timeout; reads are blocking file IO.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_edge::broker::{LogPosition, Message};
use ferry_protocol::kafka::batch::{records, uncompressed};
use tokio::sync::mpsc;
use tracing::error;

use super::cursor::DeliveryCursor;
use super::{CURSOR_COMMIT_INTERVAL, MAX_UNCOMPRESSED_BYTES, MQTT_CURSOR};
use crate::log::{now_ms, LogError, Storage, READ_BUDGET_BYTES};
use crate::meta::{Command, Meta};
use crate::routes::{from_record, MqttView};

/// Follows the end of every partition and hands each record to the broker as a message.
pub(super) struct Tailer {
    pub(super) log: Arc<dyn Storage>,
    pub(super) meta: Arc<Meta>,
    pub(super) tx: mpsc::Sender<Arc<Message>>,
    /// Where delivery stands; the router's `delivered` callback moves it too.
    pub(super) cursor: Arc<DeliveryCursor>,
    /// Records of the log the broker has not routed yet (as of the last pass).
    pub(super) lag: Arc<AtomicU64>,
    /// In a cluster: every retained message delivered, for the cluster's record of them.
    pub(super) retained: Option<mpsc::UnboundedSender<super::clients::RetainedSeen>>,
    /// Whether the broker has any subscription; without one only retained messages are
    /// handed to it (the others would be routed to no one).
    pub(super) subscribed: Arc<AtomicBool>,
}

impl Tailer {
    pub(super) fn run(self) {
        // A runtime of its own, only to wait for commits with a timeout: the node's runtime
        // may be shutting down while this thread waits.
        let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
        else {
            error!("cannot start the delivery tailer");
            return;
        };
        let mut commits = self.log.watch_commits();
        let mut positions: HashMap<(String, u32), i64> = HashMap::new();
        let mut committed: HashMap<(String, u32), i64> = HashMap::new();
        let mut last_commit = Instant::now();
        loop {
            let seen = *commits.borrow_and_update();
            let mut progressed = false;
            let streams = self.log.streams();
            // A deleted stream's positions go (a stream made again under its name starts
            // from its own beginning).
            let live = |(s, _): &(String, u32)| streams.iter().any(|st| st.name == *s);
            positions.retain(|k, _| live(k));
            committed.retain(|k, _| live(k));
            self.cursor.retain(live);
            let ends: Vec<((String, u32), i64)> = streams
                .iter()
                .flat_map(|st| {
                    st.partitions
                        .iter()
                        .enumerate()
                        .map(|(p, info)| ((st.name.clone(), p as u32), info.offsets.high_watermark))
                })
                .collect();
            for stream in streams {
                for (p, info) in stream.partitions.iter().enumerate() {
                    let key = (stream.name.clone(), p as u32);
                    let pos = match positions.get(&key) {
                        // Past the end this node knows of: on the object log a read can
                        // return what another node committed before this node heard of the
                        // commit; the end catches up. (Going back to the durable cursor here
                        // delivered the records since it again.)
                        Some(&pos) => pos,
                        None => {
                            // Where the broker stopped routing last time (set at start for
                            // the streams of that time); a stream created later, from its
                            // start.
                            let stored = self
                                .meta
                                .cursor(MQTT_CURSOR, &stream.name, p as u32)
                                .ok()
                                .flatten();
                            let pos = stored
                                .unwrap_or(info.offsets.log_start)
                                .max(info.offsets.log_start);
                            if stored != Some(pos) {
                                // Durable at once: what is appended from now on is delivered
                                // even if the node dies before the next cursor commit.
                                let start = Command::CommitCursor {
                                    group: MQTT_CURSOR.into(),
                                    stream: stream.name.clone(),
                                    partition: p as u32,
                                    offset: pos,
                                };
                                if let Err(e) = self.meta.apply(&[start]) {
                                    error!(error = %e, "cannot record the delivery cursor");
                                }
                            }
                            committed.insert(key.clone(), pos);
                            self.cursor.start(key.clone(), pos);
                            pos
                        }
                    };
                    if pos >= info.offsets.high_watermark {
                        positions.insert(key, pos);
                        continue;
                    }
                    match self.forward(&stream.name, p as u32, pos) {
                        Ok(next) => {
                            progressed |= next > pos;
                            positions.insert(key, next);
                        }
                        Err(None) => return,
                        Err(Some(e)) => {
                            error!(stream = %stream.name, partition = p, offset = pos, error = %e, "cannot read the log for delivery");
                            positions.insert(key, pos);
                        }
                    }
                }
            }
            // How far the broker is behind the log, for the router's pacing of publishers.
            let routed = self.cursor.positions();
            let behind: i64 = ends
                .iter()
                .map(|(key, end)| routed.get(key).map_or(0, |at| (end - at).max(0)))
                .sum();
            self.lag.store(behind as u64, Ordering::Relaxed);
            if last_commit.elapsed() >= CURSOR_COMMIT_INTERVAL {
                last_commit = Instant::now();
                let cursor = self.cursor.positions();
                let moved: Vec<Command> = cursor
                    .iter()
                    .filter(|(k, v)| committed.get(*k) != Some(*v))
                    .map(|((stream, partition), offset)| Command::CommitCursor {
                        group: MQTT_CURSOR.into(),
                        stream: stream.clone(),
                        partition: *partition,
                        offset: *offset,
                    })
                    .collect();
                if !moved.is_empty() {
                    match self.meta.apply(&moved) {
                        Ok(()) => committed = cursor,
                        Err(e) => error!(error = %e, "cannot record the delivery cursor"),
                    }
                }
            }
            if !progressed {
                // Wait for a commit, or a second (to record the cursor, find new streams).
                let mut commits = commits.clone();
                let changed = runtime.block_on(async move {
                    if *commits.borrow() != seen {
                        return true;
                    }
                    tokio::time::timeout(Duration::from_secs(1), commits.changed())
                        .await
                        .map_or(true, |r| r.is_ok())
                });
                if !changed {
                    return;
                }
            }
        }
    }

    /// Hands the records from `offset` (up to [`READ_BUDGET_BYTES`] of batches) to the
    /// broker; the next offset. Err(None) when the broker is gone.
    fn forward(&self, stream: &str, partition: u32, offset: i64) -> Result<i64, Option<LogError>> {
        let key = (stream.to_owned(), partition);
        let stream_name: Arc<str> = Arc::from(stream);
        read_messages(&*self.log, stream, partition, offset, |at, view| {
            // Not an MQTT message (no topic key, expired, a batch too large to open):
            // nothing to deliver, but the cursor passes it.
            let Some(view) = view else {
                self.cursor.skipped(&key, at);
                return Ok(());
            };
            // Read after the record was: a subscription acknowledged before it was
            // appended is seen here.
            if !view.retain && !self.subscribed.load(Ordering::Acquire) {
                self.cursor.skipped(&key, at);
                return Ok(());
            }
            let msg = Arc::new(to_message(view, &stream_name, partition, at));
            if let Some(retained) = self.retained.as_ref().filter(|_| msg.retain) {
                let _ = retained.send(super::clients::RetainedSeen {
                    stream: stream.to_owned(),
                    partition,
                    offset: at,
                    msg: msg.clone(),
                });
            }
            // Counted before it is sent: the broker may route it at once.
            self.cursor.handed(&key, at);
            self.tx.blocking_send(msg).map_err(|_| ())
        })
    }
}

/// Reads the records of a partition from `offset` (up to [`READ_BUDGET_BYTES`] of
/// batches), calling `each` with every record's offset and the MQTT message it is (None
/// for one that is none, or once with the last offset of a batch too large to open); the
/// next offset. Err(None) when `each` fails.
pub(super) fn read_messages(
    log: &dyn Storage,
    stream: &str,
    partition: u32,
    offset: i64,
    mut each: impl FnMut(i64, Option<MqttView>) -> Result<(), ()>,
) -> Result<i64, Option<LogError>> {
    let r = log
        .read(stream, partition, offset, READ_BUDGET_BYTES)
        .map_err(Some)?;
    let mut next = offset;
    let now = now_ms();
    for batch in r.iter() {
        let (h, whole) = batch.map_err(Some)?;
        // A Kafka producer's batch may be compressed; more than this uncompressed is not
        // delivered to MQTT (it stays in the log for Kafka consumers).
        let open = uncompressed(whole, MAX_UNCOMPRESSED_BYTES);
        let Some(recs) = open.as_deref().ok().and_then(|b| records(b).ok()) else {
            each(h.last_offset(), None).map_err(|()| None)?;
            next = h.last_offset() + 1;
            continue;
        };
        for rec in recs.flatten().filter(|rec| rec.offset >= offset) {
            each(rec.offset, from_record(&rec, now)).map_err(|()| None)?;
        }
        next = h.last_offset() + 1;
    }
    Ok(next)
}

/// The message a record read back is, at `offset` of a partition.
pub(super) fn to_message(
    view: MqttView,
    stream: &Arc<str>,
    partition: u32,
    offset: i64,
) -> Message {
    Message {
        topic: view.topic,
        payload: view.payload,
        qos: view.qos,
        retain: view.retain,
        properties: view.properties,
        expires_at: view
            .expiry_left_secs
            .map(|s| Instant::now() + Duration::from_secs(s.into())),
        publisher: view.client.map(Arc::from),
        position: Some(LogPosition {
            stream: stream.clone(),
            partition,
            offset,
        }),
    }
}
