//! The edge's outbox budget, sans-IO: which accepted messages go up to the cloud (the
//! [`UplinkRules`]), whether there is room for them under `max_outbox_bytes` and the full
//! policy, and the store operations that put them in the outbox. The broker asks it about
//! every message it accepts (its downstream on the edge); the router tells it what each
//! commit deleted. The records themselves live in the store (its outbox tables,
//! `crate::store::outbox_tables`), which the link reads (`crate::outbox_source`).
//!
//! Feature `edge` only, as is everything that knows of the outbox.

use std::sync::Arc;

use ferry_protocol::topic::TopicName;

use crate::broker::{Message, StoreOp};
use crate::uplink::{FullPolicy, UplinkRules};

/// A change to the outbox's tables: the broker's [`StoreOp::Outbox`], applied in the same
/// commit as the batch's other operations.
#[derive(Debug, Clone)]
pub(crate) enum OutboxOp {
    /// A message for the cloud, durable before its PUBACK (see [`crate::uplink`]).
    Put {
        priority: u8,
        seq: u64,
        msg: Arc<Message>,
    },
    /// The cloud has every record of class `priority` up to `seq`: delete them (the store
    /// reports what it removed, for [`OutboxBudget::applied`]).
    Delete { priority: u8, seq: u64 },
    /// The outbox is full under `drop_oldest`: delete records, lowest class first and oldest
    /// first within it, until at least `bytes` are freed.
    DropOldest { bytes: u64 },
    /// Downlink messages up to `seq` were published on the edge (in this commit).
    DownlinkApplied { seq: u64 },
}

/// What the outbox holds (counted by the store, read at start-up), or what a commit took
/// out of it.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct OutboxTotals {
    pub(crate) records: u64,
    pub(crate) bytes: u64,
    /// The highest sequence number ever given (0: none).
    pub(crate) last_seq: u64,
}

/// What the outbox holds and may hold.
#[derive(Debug, Default)]
pub struct OutboxBudget {
    rules: UplinkRules,
    totals: OutboxTotals,
    /// Bytes `OutboxOp::DropOldest` ops not yet applied were to free (taken off `totals.bytes`).
    drop_assumed: u64,
}

/// What becomes of an accepted message on the edge.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Admission {
    /// No uplink route matches: it stays on the edge.
    Local,
    /// It goes up, as class `priority`, renamed to `cloud_topic` if its route says so.
    Up {
        priority: u8,
        cloud_topic: Option<TopicName>,
    },
    /// It would go up and there is no room (`reject_new`): refuse it.
    Full,
}

impl OutboxBudget {
    pub fn new(rules: UplinkRules) -> Self {
        Self {
            rules,
            ..Self::default()
        }
    }

    /// What the outbox held at start-up (before the broker takes it,
    /// [`crate::broker::Broker::set_outbox`]).
    pub(crate) fn restore(&mut self, totals: OutboxTotals) {
        self.totals = totals;
    }

    /// Whether `msg` goes up, and if it does whether it fits: under `reject_new` beside
    /// what is there, under `drop_oldest` within the whole budget.
    pub(crate) fn admit(&self, msg: &Message) -> Admission {
        let Some((priority, cloud_topic)) = self.rules.route(&msg.topic, msg.qos) else {
            return Admission::Local;
        };
        let cost = outbox_cost(msg);
        let max = self.rules.max_outbox_bytes;
        let full = match self.rules.full_policy {
            FullPolicy::RejectNew => self.totals.bytes + cost > max,
            FullPolicy::DropOldest => cost > max,
        };
        if full {
            Admission::Full
        } else {
            Admission::Up {
                priority,
                cloud_topic,
            }
        }
    }

    /// Puts a message that [`OutboxBudget::admit`] sent up and routing took in the outbox,
    /// in this batch's commit (before its PUBACK): the operations go to `ops`; under
    /// `drop_oldest` a drop of the oldest records that makes room comes first.
    pub(crate) fn put(
        &mut self,
        priority: u8,
        cloud_topic: Option<TopicName>,
        msg: &Arc<Message>,
        ops: &mut Vec<StoreOp>,
    ) {
        let cost = outbox_cost(msg);
        let over = (self.totals.bytes + cost).saturating_sub(self.rules.max_outbox_bytes);
        if over > 0 {
            ops.push(StoreOp::Outbox(OutboxOp::DropOldest { bytes: over }));
            self.totals.bytes -= over;
            self.drop_assumed += over;
        }
        self.totals.last_seq += 1;
        self.totals.records += 1;
        self.totals.bytes += cost;
        let msg = match cloud_topic {
            Some(topic) => Arc::new(Message {
                topic,
                ..(**msg).clone()
            }),
            None => msg.clone(),
        };
        ops.push(StoreOp::Outbox(OutboxOp::Put {
            priority,
            seq: self.totals.last_seq,
            msg,
        }));
    }

    /// What a commit deleted: `acked` (the cloud has it) and `dropped` (`drop_oldest`);
    /// neither counts against the budget any more.
    pub(crate) fn applied(&mut self, acked: OutboxTotals, dropped: OutboxTotals) {
        // The bytes a drop was to free were taken off when it was asked for.
        let assumed = std::mem::take(&mut self.drop_assumed);
        self.totals.bytes = (self.totals.bytes + assumed)
            .saturating_sub(acked.bytes)
            .saturating_sub(dropped.bytes);
        self.totals.records = self
            .totals
            .records
            .saturating_sub(acked.records)
            .saturating_sub(dropped.records);
    }

    /// Records and bytes in the outbox now, the highest sequence given, and the budget.
    pub(crate) fn figures(&self, stats: &mut crate::broker::Stats) {
        stats.outbox_records = self.totals.records;
        stats.outbox_bytes = self.totals.bytes;
        stats.outbox_last_seq = self.totals.last_seq;
        stats.outbox_budget_bytes = self.rules.max_outbox_bytes;
    }
}

/// What a message costs in the outbox's budget: topic, payload and its record's bookkeeping
/// (docs/edge-storage.md).
pub(crate) fn outbox_cost(msg: &Message) -> u64 {
    (msg.cost() + 40) as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_protocol::mqtt::QoS;

    /// Records and bytes held, as the broker's figures show them.
    fn held(b: &OutboxBudget) -> (u64, u64) {
        let mut stats = crate::broker::Stats::default();
        b.figures(&mut stats);
        (stats.outbox_records, stats.outbox_bytes)
    }

    fn msg(topic: &str, payload: &str) -> Message {
        Message {
            topic: TopicName::new(topic).expect("topic"),
            payload: bytes::Bytes::copy_from_slice(payload.as_bytes()),
            qos: QoS::AtLeastOnce,
            retain: false,
            properties: Default::default(),
            expires_at: None,
            publisher: None,
            position: None,
        }
    }

    fn budget(policy: &str) -> OutboxBudget {
        let config: crate::uplink::UplinkConfig = toml::from_str(&format!(
            "max_outbox_bytes = 100\nfull_policy = \"{policy}\"\n\
             [[route]]\nfilter = \"up/#\"\npriority = 2\ncloud_topic = \"site/{{topic}}\"\n"
        ))
        .expect("parses");
        OutboxBudget::new(UplinkRules::new(&config).expect("valid"))
    }

    #[test]
    fn reject_new_refuses_what_does_not_fit_beside_what_is_held() {
        let mut b = budget("reject_new");
        let mut ops = Vec::new();
        assert_eq!(b.admit(&msg("local/t", "x")), Admission::Local);
        // 4 + 6 + 40 = 50 bytes a message: two fit in 100, a third does not.
        for _ in 0..2 {
            let Admission::Up {
                priority,
                cloud_topic,
            } = b.admit(&msg("up/t", "123456"))
            else {
                panic!("room for it");
            };
            assert_eq!(priority, 2);
            assert_eq!(cloud_topic.as_ref().map(|t| t.as_str()), Some("site/up/t"));
            b.put(
                priority,
                cloud_topic,
                &Arc::new(msg("up/t", "123456")),
                &mut ops,
            );
        }
        assert_eq!(held(&b), (2, 100));
        let mut stats = crate::broker::Stats::default();
        b.figures(&mut stats);
        assert_eq!((stats.outbox_last_seq, stats.outbox_budget_bytes), (2, 100));
        assert_eq!(b.admit(&msg("up/t", "123456")), Admission::Full);
        assert!(matches!(
            &ops[..],
            [
                StoreOp::Outbox(OutboxOp::Put { seq: 1, msg: a, .. }),
                StoreOp::Outbox(OutboxOp::Put { seq: 2, .. })
            ] if a.topic.as_str() == "site/up/t"
        ));
        // The cloud acknowledged the first: room again.
        let one = OutboxTotals {
            records: 1,
            bytes: 50,
            last_seq: 1,
        };
        b.applied(one, OutboxTotals::default());
        assert_eq!(held(&b), (1, 50));
        assert!(matches!(
            b.admit(&msg("up/t", "123456")),
            Admission::Up { .. }
        ));
    }

    #[test]
    fn drop_oldest_makes_room_first_and_refuses_only_what_exceeds_the_whole_budget() {
        let mut b = budget("drop_oldest");
        let mut ops = Vec::new();
        for _ in 0..3 {
            assert!(matches!(
                b.admit(&msg("up/t", "123456")),
                Admission::Up { .. }
            ));
            b.put(2, None, &Arc::new(msg("up/t", "123456")), &mut ops);
        }
        // The third asked for 50 bytes to be dropped before it was put.
        assert!(matches!(
            &ops[..],
            [
                StoreOp::Outbox(OutboxOp::Put { seq: 1, .. }),
                StoreOp::Outbox(OutboxOp::Put { seq: 2, .. }),
                StoreOp::Outbox(OutboxOp::DropOldest { bytes: 50 }),
                StoreOp::Outbox(OutboxOp::Put { seq: 3, .. })
            ]
        ));
        assert_eq!(held(&b).1, 100, "the bytes to be dropped are off already");
        // The store dropped one record of 50 bytes: the count follows, the bytes stay right.
        let dropped = OutboxTotals {
            records: 1,
            bytes: 50,
            last_seq: 1,
        };
        b.applied(OutboxTotals::default(), dropped);
        assert_eq!(held(&b), (2, 100));
        let big = "x".repeat(100);
        assert_eq!(
            b.admit(&msg("up/t", &big)),
            Admission::Full,
            "larger than the budget"
        );
    }
}
