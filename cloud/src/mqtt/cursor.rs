//! Where MQTT delivery stands in the log: for each partition, the next offset the broker has
//! not yet routed. Shared by the tailer, which hands records to the broker, and the router's
//! [`LogHooks::delivered`](ferry_edge::server::LogHooks) callback, which says how many of
//! them it routed.

use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, MutexGuard};

/// A partition of a stream.
pub(crate) type PartitionKey = (String, u32);

/// The delivery position of every partition the tailer follows.
///
/// Records go to the broker in log order through a bounded channel; the broker routes them
/// in that order and reports counts. A record that is no MQTT message (no topic key, or
/// already expired) is not sent to the broker at all: it is passed as soon as everything
/// handed before it has been routed.
#[derive(Debug, Default)]
pub(crate) struct DeliveryCursor(Mutex<State>);

#[derive(Debug, Default)]
struct State {
    /// Records handed to the broker or skipped, in the order of the broker's channel, not
    /// yet passed by the cursor.
    pending: VecDeque<Pending>,
    /// How many entries of `pending` are messages (what `routed` counts).
    messages: usize,
    /// The next offset per partition that the broker has not routed.
    next: HashMap<PartitionKey, i64>,
}

#[derive(Debug)]
struct Pending {
    key: PartitionKey,
    offset: i64,
    /// False for a record that was skipped, not sent to the broker.
    message: bool,
}

impl DeliveryCursor {
    /// Where delivery starts in a partition the cursor does not know yet (its durable
    /// position): kept unless the cursor already has one.
    pub(crate) fn start(&self, key: PartitionKey, offset: i64) {
        self.lock().next.entry(key).or_insert(offset);
    }

    /// The record at `offset` was handed to the broker as a message.
    pub(crate) fn handed(&self, key: &PartitionKey, offset: i64) {
        let mut s = self.lock();
        s.messages += 1;
        s.pending.push_back(Pending {
            key: key.clone(),
            offset,
            message: true,
        });
    }

    /// The record at `offset` is no message for MQTT: the cursor passes it once what was
    /// handed before it has been routed (at once if nothing is waiting).
    pub(crate) fn skipped(&self, key: &PartitionKey, offset: i64) {
        let mut s = self.lock();
        if s.pending.is_empty() {
            s.next.insert(key.clone(), offset + 1);
        } else {
            s.pending.push_back(Pending {
                key: key.clone(),
                offset,
                message: false,
            });
        }
    }

    /// The broker routed (and made durable for persistent sessions) the next `n` messages
    /// handed to it: the cursor moves past them, and past the skipped records that followed.
    pub(crate) fn routed(&self, n: usize) {
        let mut s = self.lock();
        let mut left = n.min(s.messages);
        s.messages -= left;
        while let Some(front) = s.pending.front() {
            if front.message {
                if left == 0 {
                    break;
                }
                left -= 1;
            }
            let p = s.pending.pop_front().expect("a front exists");
            s.next.insert(p.key, p.offset + 1);
        }
    }

    /// The positions now, to be made durable.
    pub(crate) fn positions(&self) -> HashMap<PartitionKey, i64> {
        self.lock().next.clone()
    }

    /// Forgets partitions for which `live` is false (a deleted stream).
    pub(crate) fn retain(&self, live: impl Fn(&PartitionKey) -> bool) {
        self.lock().next.retain(|k, _| live(k));
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(p: u32) -> PartitionKey {
        ("s".to_owned(), p)
    }

    #[test]
    fn the_cursor_passes_only_what_was_routed_and_skipped_records_behind_it() {
        let c = DeliveryCursor::default();
        c.start(key(0), 10);
        c.start(key(0), 99); // a start does not move a known partition
        assert_eq!(c.positions()[&key(0)], 10);
        // Nothing waits: a skipped record is passed at once.
        c.skipped(&key(0), 10);
        assert_eq!(c.positions()[&key(0)], 11);
        c.handed(&key(0), 11);
        c.skipped(&key(0), 12);
        c.handed(&key(1), 0);
        c.handed(&key(0), 13);
        assert_eq!(c.positions()[&key(0)], 11, "nothing routed yet");
        c.routed(1);
        assert_eq!(
            c.positions()[&key(0)],
            13,
            "11 routed, and 12 skipped behind it"
        );
        assert!(!c.positions().contains_key(&key(1)));
        c.routed(1);
        assert_eq!(c.positions()[&key(1)], 1);
        assert_eq!(c.positions()[&key(0)], 13, "13 not routed yet");
        // More routed than handed: the rest is ignored, not carried forward.
        c.routed(5);
        assert_eq!(c.positions()[&key(0)], 14);
        c.handed(&key(0), 14);
        assert_eq!(c.positions()[&key(0)], 14);
        c.routed(1);
        assert_eq!(c.positions()[&key(0)], 15);
        c.retain(|k| k.1 == 0);
        assert!(!c.positions().contains_key(&key(1)));
    }
}
