//! The outbox's tables (feature `edge`): the records waiting for the cloud, their totals,
//! and where the downlink stands. The router's commits write them
//! ([`Writer`], one per write transaction, beside the broker's other tables); the link reads
//! them in transactions of its own ([`OutboxReader`]); start-up reads only the totals
//! ([`Store::outbox_totals`]). Formats: `docs/edge-storage.md`.

use std::sync::Arc;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction};

use super::{corrupt, dberr, need, read_message, write_message, Clock, Store, StoreError};
use crate::broker::Message;
use crate::outbox::{outbox_cost, OutboxOp, OutboxTotals};

/// (priority, seq) → when it was accepted (u64 Unix ms) and the message for the cloud (as
/// in `retained`), in sending order within a priority class.
const OUTBOX: TableDefinition<'_, (u8, u64), &[u8]> = TableDefinition::new("outbox");
/// The outbox's totals, kept with it so that start-up need not read it: "records",
/// "bytes", "last_seq"; and "down_applied", the last downlink sequence published here.
const OUTBOX_TOTALS: TableDefinition<'_, &str, u64> = TableDefinition::new("outbox_totals");

/// Creates the tables (when the store is opened).
pub(super) fn create(txn: &WriteTransaction) -> Result<(), StoreError> {
    txn.open_table(OUTBOX).map_err(dberr)?;
    txn.open_table(OUTBOX_TOTALS).map_err(dberr)?;
    Ok(())
}

impl Store {
    /// A handle that reads the outbox for the link, beside the router's commits.
    pub(crate) fn outbox_reader(&self) -> OutboxReader {
        OutboxReader {
            db: self.db.clone(),
        }
    }

    /// What the outbox holds, for its budget at start-up. The records stay on disk until
    /// the link sends them; only their totals are read.
    pub(crate) fn outbox_totals(&self) -> Result<OutboxTotals, StoreError> {
        let txn = self.db.begin_read().map_err(dberr)?;
        let totals = txn.open_table(OUTBOX_TOTALS).map_err(dberr)?;
        let total = |key: &str| -> Result<u64, StoreError> {
            Ok(totals.get(key).map_err(dberr)?.map_or(0, |v| v.value()))
        };
        Ok(OutboxTotals {
            records: total("records")?,
            bytes: total("bytes")?,
            last_seq: total("last_seq")?,
        })
    }
}

/// The outbox's part of one write transaction: applies its [`OutboxOp`]s in order, then
/// ([`Writer::finish`]) brings the totals up to date.
pub(super) struct Writer<'txn> {
    txn: &'txn WriteTransaction,
    outbox: redb::Table<'txn, (u8, u64), &'static [u8]>,
    added: OutboxTotals,
    removed: OutboxRemoved,
    /// The highest downlink sequence this transaction records as applied.
    down_applied: Option<u64>,
}

impl<'txn> Writer<'txn> {
    pub(super) fn open(txn: &'txn WriteTransaction) -> Result<Self, StoreError> {
        Ok(Self {
            txn,
            outbox: txn.open_table(OUTBOX).map_err(dberr)?,
            added: OutboxTotals::default(),
            removed: OutboxRemoved::default(),
            down_applied: None,
        })
    }

    /// One operation; `buf` is scratch space.
    pub(super) fn apply(
        &mut self,
        op: &OutboxOp,
        clock: &Clock,
        buf: &mut BytesMut,
    ) -> Result<(), StoreError> {
        match op {
            OutboxOp::Put { priority, seq, msg } => {
                buf.put_u64(clock.unix_ms);
                write_message(buf, msg, clock);
                self.outbox
                    .insert((*priority, *seq), &buf[..])
                    .map_err(dberr)?;
                self.added.records += 1;
                self.added.bytes += outbox_cost(msg);
                self.added.last_seq = self.added.last_seq.max(*seq);
            }
            OutboxOp::Delete { priority, seq } => {
                let mut bad = None;
                let acked = &mut self.removed.acked;
                self.outbox
                    .retain_in((*priority, 0)..=(*priority, *seq), |_, value| {
                        match read_outbox(value, clock) {
                            Ok((_, msg)) => {
                                acked.records += 1;
                                acked.bytes += outbox_cost(&msg);
                            }
                            Err(e) => bad = Some(e),
                        }
                        false
                    })
                    .map_err(dberr)?;
                if let Some(e) = bad {
                    return Err(e);
                }
            }
            OutboxOp::DropOldest { bytes } => {
                let dropped = &mut self.removed.dropped;
                let goal = dropped.bytes + bytes;
                while dropped.bytes < goal {
                    let Some((_, value)) = self.outbox.pop_first().map_err(dberr)? else {
                        break;
                    };
                    let (_, msg) = read_outbox(value.value(), clock)?;
                    dropped.records += 1;
                    dropped.bytes += outbox_cost(&msg);
                }
            }
            OutboxOp::DownlinkApplied { seq } => {
                self.down_applied = Some(self.down_applied.map_or(*seq, |s| s.max(*seq)));
            }
        }
        Ok(())
    }

    /// Writes the totals and the downlink's applied sequence; what the transaction deleted
    /// from the outbox.
    pub(super) fn finish(self) -> Result<OutboxRemoved, StoreError> {
        let Self {
            txn,
            outbox,
            added,
            removed,
            down_applied,
        } = self;
        drop(outbox);
        let gone = removed.total();
        if added.records == 0 && gone.records == 0 && down_applied.is_none() {
            return Ok(removed);
        }
        let mut totals = txn.open_table(OUTBOX_TOTALS).map_err(dberr)?;
        let get = |t: &redb::Table<'_, &str, u64>, k: &str| -> Result<u64, StoreError> {
            Ok(t.get(k).map_err(dberr)?.map_or(0, |v| v.value()))
        };
        if let Some(seq) = down_applied {
            let old = get(&totals, "down_applied")?;
            totals.insert("down_applied", old.max(seq)).map_err(dberr)?;
        }
        if added.records > 0 || gone.records > 0 {
            let records = (get(&totals, "records")? + added.records).saturating_sub(gone.records);
            let bytes = (get(&totals, "bytes")? + added.bytes).saturating_sub(gone.bytes);
            let last_seq = get(&totals, "last_seq")?.max(added.last_seq);
            totals.insert("records", records).map_err(dberr)?;
            totals.insert("bytes", bytes).map_err(dberr)?;
            totals.insert("last_seq", last_seq).map_err(dberr)?;
        }
        Ok(removed)
    }
}

/// What one commit deleted from the outbox.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct OutboxRemoved {
    /// Acknowledged by the cloud.
    pub(crate) acked: OutboxTotals,
    /// Dropped to make room (`drop_oldest`).
    pub(crate) dropped: OutboxTotals,
}

impl OutboxRemoved {
    /// Acknowledged and dropped together.
    fn total(&self) -> OutboxTotals {
        OutboxTotals {
            records: self.acked.records + self.dropped.records,
            bytes: self.acked.bytes + self.dropped.bytes,
            last_seq: 0,
        }
    }
}

/// Reads the outbox for the link, in its own read transactions (they see only committed
/// records and never block the router's commits).
#[derive(Clone)]
pub(crate) struct OutboxReader {
    db: Arc<Database>,
}

impl std::fmt::Debug for OutboxReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutboxReader").finish_non_exhaustive()
    }
}

/// A message of the outbox as the link sends it.
#[derive(Debug)]
pub(crate) struct OutboxEntry {
    pub(crate) seq: u64,
    pub(crate) accepted_unix_ms: u64,
    pub(crate) msg: Message,
    /// The Message Expiry Interval it was published with, counted from `accepted_unix_ms`.
    pub(crate) expiry_secs: Option<u32>,
}

impl OutboxReader {
    /// When the oldest record still in the outbox was accepted (ms since the Unix epoch):
    /// the first record of each class, the earliest of them. None if it is empty.
    pub(crate) fn oldest_accepted_unix_ms(&self) -> Result<Option<u64>, StoreError> {
        let txn = self.db.begin_read().map_err(dberr)?;
        let outbox = txn.open_table(OUTBOX).map_err(dberr)?;
        let mut oldest: Option<u64> = None;
        let mut next = outbox.first().map_err(dberr)?;
        while let Some((key, value)) = next {
            let (class, _) = key.value();
            let accepted = value
                .value()
                .get(..8)
                .and_then(|b| b.try_into().ok())
                .map(u64::from_be_bytes)
                .ok_or_else(|| corrupt("outbox", "record too short"))?;
            oldest = Some(oldest.map_or(accepted, |o| o.min(accepted)));
            let Some(up) = class.checked_add(1) else {
                break;
            };
            next = match outbox.range((up, 0)..).map_err(dberr)?.next() {
                Some(row) => Some(row.map_err(dberr)?),
                None => None,
            };
        }
        Ok(oldest)
    }

    /// The last downlink sequence applied on this edge (0: none).
    pub(crate) fn down_applied(&self) -> Result<u64, StoreError> {
        let txn = self.db.begin_read().map_err(dberr)?;
        let totals = txn.open_table(OUTBOX_TOTALS).map_err(dberr)?;
        Ok(totals
            .get("down_applied")
            .map_err(dberr)?
            .map_or(0, |v| v.value()))
    }

    /// Records of the highest priority class that has any after its cursor in `after`, in
    /// sequence order, about `max_bytes` of them (at least one).
    pub(crate) fn read(
        &self,
        after: &[u64; 256],
        max_bytes: usize,
    ) -> Result<Option<(u8, Vec<OutboxEntry>)>, StoreError> {
        let clock = Clock::now();
        let txn = self.db.begin_read().map_err(dberr)?;
        let outbox = txn.open_table(OUTBOX).map_err(dberr)?;
        // Walk down the classes present, from the highest, to one with records to send.
        let mut last = outbox.last().map_err(dberr)?.map(|(k, _)| k.value());
        while let Some((class, seq)) = last {
            let cursor = after[class as usize];
            if seq > cursor {
                let mut out = Vec::new();
                let mut bytes = 0;
                for row in outbox
                    .range((class, cursor + 1)..=(class, u64::MAX))
                    .map_err(dberr)?
                {
                    let (k, v) = row.map_err(dberr)?;
                    let (accepted_unix_ms, msg) = read_outbox(v.value(), &clock)?;
                    bytes += outbox_cost(&msg) as usize;
                    let expiry_secs = msg.expires_at.map(|at| {
                        let ends = clock.unix_ms_of(at);
                        ends.saturating_sub(accepted_unix_ms).div_ceil(1000) as u32
                    });
                    out.push(OutboxEntry {
                        seq: k.value().1,
                        accepted_unix_ms,
                        msg,
                        expiry_secs,
                    });
                    if bytes >= max_bytes {
                        break;
                    }
                }
                return Ok(Some((class, out)));
            }
            last = match outbox.range(..(class, 0)).map_err(dberr)?.next_back() {
                Some(row) => Some(row.map_err(dberr)?.0.value()),
                None => None,
            };
        }
        Ok(None)
    }
}

fn read_outbox(value: &[u8], clock: &Clock) -> Result<(u64, Message), StoreError> {
    let mut r = Bytes::copy_from_slice(value);
    need(&r, 8, "outbox")?;
    let accepted = r.get_u64();
    Ok((accepted, read_message(&mut r, clock, "outbox")?))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use bytes::Bytes;
    use ferry_protocol::mqtt::QoS;
    use ferry_protocol::topic::TopicName;

    use super::*;
    use crate::broker::StoreOp;
    use crate::config::StorageConfig;

    #[test]
    fn the_outbox_is_counted_again_at_start_up() {
        let dir = std::env::temp_dir().join(format!("ferry-store-outbox-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let msg = |payload: &'static [u8]| {
            Arc::new(Message {
                topic: TopicName::new("up/t").expect("topic"),
                payload: Bytes::from_static(payload),
                qos: QoS::AtLeastOnce,
                retain: false,
                properties: ferry_protocol::mqtt::Properties::default(),
                expires_at: None,
                publisher: None,
                position: None,
            })
        };
        {
            let store = Store::open(&dir, &StorageConfig::default()).expect("open");
            store
                .apply(&[
                    StoreOp::Outbox(OutboxOp::Put {
                        priority: 0,
                        seq: 1,
                        msg: msg(b"a"),
                    }),
                    StoreOp::Outbox(OutboxOp::Put {
                        priority: 5,
                        seq: 2,
                        msg: msg(b"bb"),
                    }),
                ])
                .expect("apply");
        }
        let store = Store::open(&dir, &StorageConfig::default()).expect("reopen");
        let totals = store.outbox_totals().expect("totals");
        assert_eq!(
            (totals.records, totals.bytes, totals.last_seq),
            (2, (4 + 1 + 40) + (4 + 2 + 40), 2)
        );
    }
}
