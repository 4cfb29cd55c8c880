//! Idempotent producers' sequence numbers: per producer id and partition, the epoch and the
//! last [`RECENT_BATCHES`] batches (first and last sequence, base offset), and what a new
//! batch is against them. Kafka's rules: a batch with a known first sequence is a resend,
//! answered with its first append's offset; the one after the last is next; anything else is
//! out of order; an older epoch is fenced, a newer one starts over.
//!
//! The Kafka front keeps this state in memory over the local log (rebuilt from the log's
//! tail at start); the object log keeps it in PostgreSQL and checks each batch in the
//! transaction that commits it ([`Storage::checks_producers`](super::Storage)), so that
//! several nodes appending for one producer never append a batch twice.

use std::collections::VecDeque;

/// How many batches per producer and partition are remembered for duplicates (Kafka's
/// `max.in.flight.requests.per.connection` limit for idempotence).
pub const RECENT_BATCHES: usize = 5;

/// An idempotent producer's batch: who sent it and its sequence numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProducerBatch {
    pub producer_id: i64,
    pub epoch: i16,
    pub first: i32,
    pub last: i32,
}

impl ProducerBatch {
    /// The producer's batch that `bytes` is, when it is one whole v2 batch of an idempotent
    /// producer (what a Kafka producer sends per partition); None otherwise.
    pub fn of(bytes: &[u8]) -> Option<Self> {
        let h = ferry_protocol::kafka::batch::verify_crc(bytes).ok()?;
        if h.producer_id < 0 || h.total_len() != bytes.len() {
            return None;
        }
        Some(Self {
            producer_id: h.producer_id,
            epoch: h.producer_epoch,
            first: h.base_sequence,
            last: h.base_sequence.wrapping_add(h.records_count.max(1) - 1),
        })
    }
}

/// Why a producer's batch is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SequenceError {
    /// Not the batch after the producer's last one (Kafka: OUT_OF_ORDER_SEQUENCE_NUMBER).
    #[error("the batch's sequence does not follow the producer's last batch")]
    OutOfOrder,
    /// From an epoch older than the producer's (Kafka: INVALID_PRODUCER_EPOCH).
    #[error("the producer's epoch is older than one seen before")]
    StaleEpoch,
}

/// What an idempotent producer's batch is, against what was seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sequence {
    /// Append it.
    Next,
    /// Already appended at this base offset.
    Duplicate(i64),
    Refused(SequenceError),
}

/// One idempotent producer's state in one partition.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProducerState {
    pub epoch: i16,
    /// (first sequence, last sequence, base offset) of the last batches, in offset order.
    pub recent: VecDeque<(i32, i32, i64)>,
}

impl ProducerState {
    /// What a batch of `epoch` starting at sequence `first` is.
    pub fn check(&self, epoch: i16, first: i32) -> Sequence {
        if epoch < self.epoch {
            return Sequence::Refused(SequenceError::StaleEpoch);
        }
        if epoch > self.epoch {
            return Sequence::Next;
        }
        if let Some(&(_, _, offset)) = self.recent.iter().find(|(f, _, _)| *f == first) {
            return Sequence::Duplicate(offset);
        }
        match self.recent.back() {
            Some(&(_, last, _)) if first != last.wrapping_add(1) => {
                Sequence::Refused(SequenceError::OutOfOrder)
            }
            _ => Sequence::Next,
        }
    }

    /// A batch at `offset`; one already known (read again from the log) is not counted
    /// twice, and one older than those known is put in its place.
    pub fn appended(&mut self, epoch: i16, first: i32, last: i32, offset: i64) {
        if epoch < self.epoch || self.recent.iter().any(|&(_, _, o)| o == offset) {
            return;
        }
        if epoch > self.epoch {
            self.epoch = epoch;
            self.recent.clear();
        }
        let at = self.recent.partition_point(|&(_, _, o)| o < offset);
        self.recent.insert(at, (first, last, offset));
        if self.recent.len() > RECENT_BATCHES {
            self.recent.pop_front();
        }
    }

    /// The recent batches flattened (first, last, offset, first, ...), as the database
    /// keeps them.
    pub fn flat(&self) -> Vec<i64> {
        self.recent
            .iter()
            .flat_map(|&(f, l, o)| [i64::from(f), i64::from(l), o])
            .collect()
    }

    /// The state from `epoch` and [`ProducerState::flat`]'s output.
    pub fn from_flat(epoch: i16, flat: &[i64]) -> Self {
        Self {
            epoch,
            recent: flat
                .chunks_exact(3)
                .map(|c| (c[0] as i32, c[1] as i32, c[2]))
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_resend_is_found_and_a_gap_or_an_old_epoch_refused() {
        let mut s = ProducerState::default();
        assert_eq!(s.check(0, 0), Sequence::Next);
        s.appended(0, 0, 9, 100);
        s.appended(0, 10, 19, 110);
        assert_eq!(s.check(0, 20), Sequence::Next);
        assert_eq!(s.check(0, 10), Sequence::Duplicate(110));
        assert_eq!(s.check(0, 0), Sequence::Duplicate(100));
        assert_eq!(s.check(0, 25), Sequence::Refused(SequenceError::OutOfOrder));
        // A new epoch starts over; the old one is fenced.
        assert_eq!(s.check(1, 0), Sequence::Next);
        s.appended(1, 0, 4, 120);
        assert_eq!(s.check(0, 20), Sequence::Refused(SequenceError::StaleEpoch));
        // Only the last RECENT_BATCHES batches are remembered.
        for i in 1..=RECENT_BATCHES as i32 {
            s.appended(1, i * 5, i * 5 + 4, 120 + i64::from(i) * 5);
        }
        assert!(!matches!(s.check(1, 0), Sequence::Duplicate(_)));
        assert_eq!(ProducerState::from_flat(s.epoch, &s.flat()), s);
    }

    #[test]
    fn only_one_whole_batch_of_an_idempotent_producer_is_a_producer_batch() {
        use ferry_protocol::kafka::batch::BatchBuilder;
        let mut b = BatchBuilder::new(1_000).producer(7, 2, 40);
        for _ in 0..3 {
            b.push(1_000, None, Some(b"v"), &[]);
        }
        let one = b.finish(0);
        assert_eq!(
            ProducerBatch::of(&one),
            Some(ProducerBatch {
                producer_id: 7,
                epoch: 2,
                first: 40,
                last: 42
            })
        );
        let two = [&one[..], &one[..]].concat();
        assert_eq!(ProducerBatch::of(&two), None, "two batches");
        let mut plain = BatchBuilder::new(1_000);
        plain.push(1_000, None, Some(b"v"), &[]);
        assert_eq!(ProducerBatch::of(&plain.finish(0)), None, "no producer id");
    }
}
