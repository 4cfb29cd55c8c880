//! The edge's outbox for the cloud: which messages go up ([`UplinkRules`]), and the budget
//! of what is stored until the cloud has it (see [`crate::uplink`]).

use std::sync::Arc;

use ferry_protocol::topic::TopicName;

use super::{Broker, Message, OutboxTotals, StoreOp};
use crate::uplink::{FullPolicy, UplinkRules};

impl Broker {
    /// Sets what goes up to the cloud (at start-up).
    pub fn set_uplink(&mut self, rules: UplinkRules) {
        self.uplink = rules;
    }

    /// Whether `msg`, if it goes up to the cloud, finds no room in the outbox: under
    /// `reject_new`, it does not fit beside what is there; under `drop_oldest`, it is larger
    /// than the whole budget.
    pub(super) fn outbox_full(&self, msg: &Message) -> bool {
        let cost = outbox_cost(msg);
        let max = self.uplink.max_outbox_bytes;
        match self.uplink.full_policy {
            FullPolicy::RejectNew => self.outbox.bytes + cost > max,
            FullPolicy::DropOldest => cost > max,
        }
    }

    /// Puts a message that routing took in the outbox, as class `priority` and under
    /// `cloud_topic` if its route renames it, in this batch's commit (before the PUBACK).
    /// Called only once [`Broker::outbox_full`] said there is room.
    pub(super) fn outbox_put(
        &mut self,
        priority: u8,
        cloud_topic: Option<TopicName>,
        msg: &Arc<Message>,
    ) {
        let cost = outbox_cost(msg);
        let max = self.uplink.max_outbox_bytes;
        let over = (self.outbox.bytes + cost).saturating_sub(max);
        if over > 0 {
            // drop_oldest (reject_new refused it before routing): room first, in the same
            // commit.
            self.store_ops
                .push(StoreOp::OutboxDropOldest { bytes: over });
            self.outbox.bytes -= over;
            self.outbox_drop_assumed += over;
        }
        self.outbox.last_seq += 1;
        self.outbox.records += 1;
        self.outbox.bytes += cost;
        let msg = match cloud_topic {
            Some(topic) => Arc::new(Message {
                topic,
                ..(**msg).clone()
            }),
            None => msg.clone(),
        };
        self.store_ops.push(StoreOp::OutboxPut {
            priority,
            seq: self.outbox.last_seq,
            msg,
        });
    }

    /// What a commit deleted from the outbox: `acked` (the cloud has it) and `dropped`
    /// (`drop_oldest`); neither counts against its budget any more.
    pub(crate) fn outbox_applied(&mut self, acked: OutboxTotals, dropped: OutboxTotals) {
        // The bytes a drop was to free were taken off when it was asked for.
        let assumed = std::mem::take(&mut self.outbox_drop_assumed);
        self.outbox.bytes = (self.outbox.bytes + assumed)
            .saturating_sub(acked.bytes)
            .saturating_sub(dropped.bytes);
        self.outbox.records = self
            .outbox
            .records
            .saturating_sub(acked.records)
            .saturating_sub(dropped.records);
        self.stats.outbox_dropped += dropped.records;
    }
}

/// What a message costs in the outbox's budget: topic, payload and its record's bookkeeping.
pub(crate) fn outbox_cost(msg: &Message) -> u64 {
    (msg.cost() + 40) as u64
}
