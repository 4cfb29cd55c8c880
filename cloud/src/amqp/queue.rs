//! An AMQP queue over the log: a durable cursor per partition it reads, the offsets of the
//! records that reached it and are not settled yet, and its arguments. It holds offsets,
//! never messages: a message is read from the log when it is delivered.
//!
//! Per partition (a *source*): records below `read_to` have been matched against the
//! queue's bindings; `pending` are the matched ones not yet settled (ready or unacked);
//! `acked` are settled ones above the lowest pending. What is kept durable for a durable
//! queue is the *settled* point (the lowest pending offset, or `read_to`), `acked` above it
//! and `delivered_to`; after a restart the queue reads again from the settled point, skips
//! what is in `acked`, and marks what lies below `delivered_to` as redelivered.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;

use amq_protocol::types::{AMQPValue, FieldTable};
use serde::{Deserialize, Serialize};

use super::ConnId;

/// A partition of a stream.
pub(crate) type SourceKey = (String, u32);

/// What `x-overflow` does when the queue is at `x-max-length`/`x-max-length-bytes`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum Overflow {
    /// The oldest ready message is dropped (dead-lettered if the queue has a DLX).
    #[default]
    DropHead,
    /// New messages are not taken (a publisher with confirms gets `basic.nack`).
    RejectPublish,
}

/// A queue's `x-` arguments, checked.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct QueueArgs {
    pub(crate) message_ttl_ms: Option<i64>,
    pub(crate) expires_ms: Option<u64>,
    pub(crate) max_length: Option<u64>,
    pub(crate) max_length_bytes: Option<u64>,
    pub(crate) overflow: Overflow,
    pub(crate) dead_letter_exchange: Option<String>,
    pub(crate) dead_letter_routing_key: Option<String>,
    /// `classic`, `quorum` or `stream`: all are the same queue over the log here.
    pub(crate) queue_type: Option<String>,
    /// `x-max-priority`: accepted, priorities are not ordered by (documented).
    pub(crate) max_priority: Option<u8>,
}

fn int(v: &AMQPValue) -> Option<i64> {
    Some(match v {
        AMQPValue::ShortShortInt(n) => i64::from(*n),
        AMQPValue::ShortShortUInt(n) => i64::from(*n),
        AMQPValue::ShortInt(n) => i64::from(*n),
        AMQPValue::ShortUInt(n) => i64::from(*n),
        AMQPValue::LongInt(n) => i64::from(*n),
        AMQPValue::LongUInt(n) => i64::from(*n),
        AMQPValue::LongLongInt(n) => *n,
        AMQPValue::Timestamp(n) => i64::try_from(*n).ok()?,
        _ => return None,
    })
}

fn text(v: &AMQPValue) -> Option<String> {
    match v {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

impl QueueArgs {
    /// Checks `queue.declare` arguments; the error is the PRECONDITION_FAILED text.
    pub(crate) fn parse(table: &FieldTable) -> Result<Self, String> {
        let mut a = Self::default();
        for (k, v) in table.inner() {
            let k = k.as_str();
            let bad = || format!("invalid arg '{k}' for queue: {v:?}");
            let non_negative = |v: &AMQPValue| int(v).filter(|n| *n >= 0).ok_or_else(bad);
            match k {
                "x-message-ttl" => a.message_ttl_ms = Some(non_negative(v)?),
                "x-expires" => {
                    a.expires_ms = Some(int(v).filter(|n| *n > 0).ok_or_else(bad)? as u64)
                }
                "x-max-length" => a.max_length = Some(non_negative(v)? as u64),
                "x-max-length-bytes" => a.max_length_bytes = Some(non_negative(v)? as u64),
                "x-overflow" => {
                    a.overflow = match text(v).as_deref() {
                        Some("drop-head") => Overflow::DropHead,
                        Some("reject-publish") => Overflow::RejectPublish,
                        _ => return Err(bad()),
                    }
                }
                "x-dead-letter-exchange" => a.dead_letter_exchange = Some(text(v).ok_or_else(bad)?),
                "x-dead-letter-routing-key" => {
                    a.dead_letter_routing_key = Some(text(v).ok_or_else(bad)?)
                }
                "x-queue-type" => match text(v).as_deref() {
                    Some(t @ ("classic" | "quorum" | "stream")) => a.queue_type = Some(t.into()),
                    _ => return Err(bad()),
                },
                "x-max-priority" => {
                    a.max_priority =
                        Some(int(v).filter(|n| (0..=255).contains(n)).ok_or_else(bad)? as u8)
                }
                _ => return Err(format!("unknown arg '{k}' for queue")),
            }
        }
        if a.dead_letter_routing_key.is_some() && a.dead_letter_exchange.is_none() {
            return Err("x-dead-letter-routing-key requires x-dead-letter-exchange".into());
        }
        Ok(a)
    }
}

/// What declares a queue, and what a redeclare must match.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct QueueDef {
    pub(crate) durable: bool,
    pub(crate) exclusive: bool,
    pub(crate) auto_delete: bool,
    pub(crate) args: QueueArgs,
}

/// A queue's position in one partition.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct Source {
    /// Records below this were matched.
    pub(crate) read_to: i64,
    /// Messages at or below this were delivered at least once (for the redelivered flag).
    pub(crate) delivered_to: i64,
    /// Settled offsets above the lowest pending one.
    pub(crate) acked: BTreeSet<i64>,
    /// Matched, not settled: ready or unacked.
    #[serde(skip)]
    pub(crate) pending: BTreeSet<i64>,
}

impl Source {
    /// Everything below this is settled.
    pub(crate) fn settled(&self) -> i64 {
        self.pending.first().copied().unwrap_or(self.read_to)
    }
}

/// A message waiting for a consumer (the partition is shared by all of its messages).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Ready {
    pub(crate) source: Arc<SourceKey>,
    pub(crate) offset: i64,
    pub(crate) bytes: u64,
    pub(crate) timestamp_ms: i64,
    pub(crate) redelivered: bool,
}

/// A consumer, as its queue knows it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct ConsumerKey {
    pub(crate) conn: ConnId,
    pub(crate) channel: u16,
    pub(crate) tag: String,
}

/// One queue.
#[derive(Debug, Clone)]
pub(crate) struct Queue {
    pub(crate) def: QueueDef,
    /// The connection an exclusive queue belongs to.
    pub(crate) owner: Option<ConnId>,
    pub(crate) sources: BTreeMap<SourceKey, Source>,
    /// In delivery order; requeued messages go to the front.
    pub(crate) ready: VecDeque<Ready>,
    pub(crate) ready_bytes: u64,
    pub(crate) unacked: usize,
    pub(crate) consumers: Vec<ConsumerKey>,
    /// A consumer that asked for exclusive access.
    pub(crate) exclusive_consumer: bool,
    /// Where the round robin over consumers goes on.
    pub(crate) next_consumer: usize,
    /// Had a consumer (an auto-delete queue goes when its last one does).
    pub(crate) had_consumer: bool,
    /// Its durable state changed since it was last written.
    pub(crate) dirty: bool,
    /// When it was last used (for `x-expires`), ms since the epoch.
    pub(crate) used_ms: i64,
    /// Deliveries (get included) and settlements since the node started, for metrics.
    pub(crate) delivered_total: u64,
    pub(crate) settled_total: u64,
}

impl Queue {
    /// A new queue reading each partition from the offset given (the end of the log when
    /// it is declared).
    pub(crate) fn new(
        def: QueueDef,
        owner: Option<ConnId>,
        from: BTreeMap<SourceKey, i64>,
        now_ms: i64,
    ) -> Self {
        let sources = from
            .into_iter()
            .map(|(k, read_to)| {
                (
                    k,
                    Source {
                        read_to,
                        delivered_to: read_to,
                        ..Source::default()
                    },
                )
            })
            .collect();
        Self {
            def,
            owner,
            sources,
            ready: VecDeque::new(),
            ready_bytes: 0,
            unacked: 0,
            consumers: Vec::new(),
            exclusive_consumer: false,
            next_consumer: 0,
            had_consumer: false,
            dirty: true,
            used_ms: now_ms,
            delivered_total: 0,
            settled_total: 0,
        }
    }

    /// Its position in `source`, made on first use (without cloning the key each time).
    pub(crate) fn source_mut(&mut self, source: &SourceKey) -> &mut Source {
        if !self.sources.contains_key(source) {
            self.sources.insert(source.clone(), Source::default());
        }
        self.sources.get_mut(source).expect("inserted above")
    }

    /// Where the queue reads `source` next: a partition it has not seen from its start.
    pub(crate) fn read_to(&self, source: &SourceKey) -> i64 {
        self.sources.get(source).map_or(0, |s| s.read_to)
    }

    /// The record at `offset` of `source` was read: it reached the queue (`bytes` long) or
    /// not. Returns the messages that overflow pushed out (to dead-letter), if any.
    pub(crate) fn matched(
        &mut self,
        source: &Arc<SourceKey>,
        offset: i64,
        reached: Option<(u64, i64)>,
    ) -> Vec<Ready> {
        let s = self.source_mut(source);
        s.read_to = offset + 1;
        let Some((bytes, timestamp_ms)) = reached else {
            return Vec::new();
        };
        if s.acked.contains(&offset) {
            // Acknowledged before a restart.
            return Vec::new();
        }
        let redelivered = offset < s.delivered_to;
        if self.full() && self.def.args.overflow == Overflow::RejectPublish {
            self.dirty = true;
            return Vec::new();
        }
        self.source_mut(source).pending.insert(offset);
        self.ready.push_back(Ready {
            source: source.clone(),
            offset,
            bytes,
            timestamp_ms,
            redelivered,
        });
        self.ready_bytes += bytes;
        let mut dropped = Vec::new();
        while self.over_limit() {
            let Some(head) = self.pop_ready() else {
                break;
            };
            self.settle(&head.source, head.offset);
            dropped.push(head);
        }
        dropped
    }

    /// At or over its length limits: a new message would be refused (reject-publish).
    pub(crate) fn full(&self) -> bool {
        let a = &self.def.args;
        a.max_length.is_some_and(|m| self.ready.len() as u64 >= m)
            || a.max_length_bytes
                .is_some_and(|m| self.ready_bytes >= m && m > 0)
            || a.max_length_bytes == Some(0)
    }

    fn over_limit(&self) -> bool {
        let a = &self.def.args;
        a.max_length.is_some_and(|m| self.ready.len() as u64 > m)
            || a.max_length_bytes.is_some_and(|m| self.ready_bytes > m)
    }

    /// The next message to deliver, taken off the ready list (still pending).
    pub(crate) fn pop_ready(&mut self) -> Option<Ready> {
        let r = self.ready.pop_front()?;
        self.ready_bytes -= r.bytes;
        Some(r)
    }

    /// A delivered message is now unacked; `delivered_to` moves past it.
    pub(crate) fn delivered(&mut self, r: &Ready) {
        self.unacked += 1;
        self.delivered_total += 1;
        if let Some(s) = self.sources.get_mut(&r.source) {
            if r.offset >= s.delivered_to {
                s.delivered_to = r.offset + 1;
                self.dirty = true;
            }
        }
    }

    /// A message is done with (acked, dropped, dead-lettered, expired, purged).
    pub(crate) fn settle(&mut self, source: &SourceKey, offset: i64) {
        if let Some(s) = self.sources.get_mut(source) {
            if s.pending.remove(&offset) {
                self.settled_total += 1;
                s.acked.insert(offset);
                let settled = s.settled();
                s.acked = s.acked.split_off(&settled);
                self.dirty = true;
            }
        }
    }

    /// An unacked message goes back to the front of the queue, marked redelivered.
    pub(crate) fn requeue(&mut self, mut r: Ready) {
        self.unacked = self.unacked.saturating_sub(1);
        r.redelivered = true;
        self.ready_bytes += r.bytes;
        self.ready.push_front(r);
    }

    /// Drops every ready message; returns how many.
    pub(crate) fn purge(&mut self) -> usize {
        let n = self.ready.len();
        while let Some(r) = self.pop_ready() {
            self.settle(&r.source, r.offset);
        }
        n
    }

    /// The durable part of its position, as stored.
    pub(crate) fn cursor_state(&self) -> BTreeMap<String, Source> {
        self.sources
            .iter()
            .map(|((stream, p), s)| {
                let settled = s.settled();
                (
                    format!("{stream}/{p}"),
                    Source {
                        read_to: settled,
                        delivered_to: s.delivered_to,
                        acked: s.acked.clone(),
                        pending: BTreeSet::new(),
                    },
                )
            })
            .collect()
    }

    /// Sources read back from [`Queue::cursor_state`].
    pub(crate) fn sources_from(state: BTreeMap<String, Source>) -> BTreeMap<SourceKey, Source> {
        state
            .into_iter()
            .filter_map(|(k, s)| {
                let (stream, p) = k.rsplit_once('/')?;
                Some(((stream.to_owned(), p.parse().ok()?), s))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn def(args: QueueArgs) -> QueueDef {
        QueueDef {
            durable: true,
            exclusive: false,
            auto_delete: false,
            args,
        }
    }

    fn src() -> SourceKey {
        ("amqp".into(), 0)
    }

    #[test]
    fn out_of_order_acks_keep_the_settled_point_at_the_lowest_unacked() {
        let mut q = Queue::new(def(QueueArgs::default()), None, [(src(), 10)].into(), 0);
        for o in 10..15 {
            q.matched(&Arc::new(src()), o, Some((100, 0)));
        }
        let mut taken = Vec::new();
        while let Some(r) = q.pop_ready() {
            q.delivered(&r);
            taken.push(r);
        }
        assert_eq!(taken.len(), 5);
        q.settle(&src(), 13);
        q.settle(&src(), 11);
        let state = q.cursor_state();
        let s = &state["amqp/0"];
        assert_eq!((s.read_to, s.delivered_to), (10, 15));
        assert_eq!(s.acked, [11, 13].into());
        q.settle(&src(), 10);
        let s = &q.cursor_state()["amqp/0"];
        assert_eq!(s.read_to, 12, "10 and 11 settled, 12 pending");
        assert_eq!(s.acked, [13].into());

        // After a restart: read again from 12; 13 is skipped, 12 and 14 are redelivered.
        let mut again = Queue::new(def(QueueArgs::default()), None, BTreeMap::new(), 0);
        again.sources = Queue::sources_from(q.cursor_state());
        let from = again.read_to(&src());
        assert_eq!(from, 12);
        for o in 12..16 {
            again.matched(&Arc::new(src()), o, Some((100, 0)));
        }
        let got: Vec<_> = again
            .ready
            .iter()
            .map(|r| (r.offset, r.redelivered))
            .collect();
        assert_eq!(got, [(12, true), (14, true), (15, false)]);
    }

    #[test]
    fn max_length_drops_the_head_or_refuses_new_messages() {
        let drop_head = QueueArgs {
            max_length: Some(2),
            ..QueueArgs::default()
        };
        let mut q = Queue::new(def(drop_head), None, [(src(), 0)].into(), 0);
        let mut dropped = Vec::new();
        for o in 0..4 {
            dropped.extend(q.matched(&Arc::new(src()), o, Some((10, 0))));
        }
        assert_eq!(dropped.iter().map(|r| r.offset).collect::<Vec<_>>(), [0, 1]);
        assert_eq!(q.ready.iter().map(|r| r.offset).collect::<Vec<_>>(), [2, 3]);

        let reject = QueueArgs {
            max_length: Some(2),
            overflow: Overflow::RejectPublish,
            ..QueueArgs::default()
        };
        let mut q = Queue::new(def(reject), None, [(src(), 0)].into(), 0);
        for o in 0..4 {
            assert!(q.matched(&Arc::new(src()), o, Some((10, 0))).is_empty());
        }
        assert_eq!(q.ready.iter().map(|r| r.offset).collect::<Vec<_>>(), [0, 1]);
        assert_eq!(q.read_to(&src()), 4);
    }

    #[test]
    fn arguments_are_checked_as_rabbitmq_does() {
        let mut t = FieldTable::default();
        t.insert("x-message-ttl".into(), AMQPValue::LongInt(6000));
        t.insert(
            "x-overflow".into(),
            AMQPValue::LongString("reject-publish".into()),
        );
        t.insert(
            "x-queue-type".into(),
            AMQPValue::LongString("quorum".into()),
        );
        let a = QueueArgs::parse(&t).expect("valid");
        assert_eq!(
            (a.message_ttl_ms, a.overflow),
            (Some(6000), Overflow::RejectPublish)
        );
        for (k, v) in [
            ("x-message-ttl", AMQPValue::LongInt(-1)),
            ("x-expires", AMQPValue::LongInt(0)),
            ("x-overflow", AMQPValue::LongString("sideways".into())),
            ("x-queue-type", AMQPValue::LongString("lazy".into())),
            ("x-unknown", AMQPValue::Boolean(true)),
        ] {
            let mut t = FieldTable::default();
            t.insert(k.into(), v);
            assert!(QueueArgs::parse(&t).is_err(), "{k}");
        }
    }
}
