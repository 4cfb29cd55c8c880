//! The router's lanes from the link (feature `edge`): the cloud's acknowledgements of the
//! outbox and the downlink, served after the connections' credit and acknowledgements and
//! before new publishes; and their part in each commit (the outbox's deletes, the downlink's
//! applied sequence, the outbox's budget and the link's wake-up after it).

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{mpsc, oneshot, Notify};

use crate::broker::{Action, Broker, Input, StoreOp};
use crate::outbox::OutboxOp;
use crate::outbox_source::Downlink;
use crate::store::Committed;

/// The link's lanes into the router and what they wait for.
#[derive(Debug)]
pub(in crate::server) struct CloudLanes {
    /// The cloud's acknowledgements of the outbox: (class, seq).
    outbox_acks: mpsc::Receiver<(u8, u64)>,
    /// Woken after a commit that added records to the outbox.
    outbox_added: Arc<Notify>,
    /// Messages from the cloud to publish here.
    downlink: mpsc::Receiver<Downlink>,
    /// Outbox deletes and downlink sequences for the next commit.
    ops: Vec<StoreOp>,
    /// Who waits for the next commit to have applied downlink messages.
    downlink_done: Vec<oneshot::Sender<()>>,
}

/// An input from the link.
#[derive(Debug)]
pub(in crate::server) enum FromCloud {
    /// The cloud has the outbox's class `priority` up to `seq`: delete it.
    OutboxAck { priority: u8, seq: u64 },
    /// Downlink messages to publish (see [`crate::outbox_source`]).
    Downlink(Downlink),
}

impl CloudLanes {
    /// The lanes' receiving ends; the link holds the senders
    /// ([`crate::outbox_source::EdgeOutbox`]).
    pub(in crate::server) fn new(
        outbox_acks: mpsc::Receiver<(u8, u64)>,
        outbox_added: Arc<Notify>,
        downlink: mpsc::Receiver<Downlink>,
    ) -> Self {
        Self {
            outbox_acks,
            outbox_added,
            downlink,
            ops: Vec::new(),
            downlink_done: Vec::new(),
        }
    }

    /// The next input, acknowledgements first; None once both lanes are closed.
    pub(super) async fn next(&mut self) -> Option<FromCloud> {
        tokio::select! {
            biased;
            Some((priority, seq)) = self.outbox_acks.recv() => {
                Some(FromCloud::OutboxAck { priority, seq })
            }
            Some(down) = self.downlink.recv() => Some(FromCloud::Downlink(down)),
            else => None,
        }
    }

    /// An input in the router's batch: an acknowledgement waits for the commit; downlink
    /// messages go to the broker now, and their sequence is recorded as applied in the
    /// commit.
    pub(super) fn take(
        &mut self,
        input: FromCloud,
        broker: &mut Broker,
        now: Instant,
        actions: &mut Vec<Action>,
    ) {
        match input {
            FromCloud::OutboxAck { priority, seq } => {
                self.ops
                    .push(StoreOp::Outbox(OutboxOp::Delete { priority, seq }));
            }
            FromCloud::Downlink((msgs, seq, done)) => {
                for msg in msgs {
                    broker.handle(Input::Deliver(msg), now, actions);
                }
                self.ops
                    .push(StoreOp::Outbox(OutboxOp::DownlinkApplied { seq }));
                self.downlink_done.push(done);
            }
        }
    }

    /// Before the batch's commit: its outbox deletes (with every acknowledgement that has
    /// arrived meanwhile) and downlink sequences go into it.
    pub(super) fn before_commit(&mut self, ops: &mut Vec<StoreOp>) {
        while let Ok((priority, seq)) = self.outbox_acks.try_recv() {
            self.ops
                .push(StoreOp::Outbox(OutboxOp::Delete { priority, seq }));
        }
        ops.append(&mut self.ops);
    }

    /// After the commit of `ops`: what it deleted leaves the outbox's budget, the link is
    /// woken if records were added, and the downlink's waiters are told.
    pub(super) fn committed(&mut self, broker: &mut Broker, committed: Committed, ops: &[StoreOp]) {
        broker.outbox_applied(committed.outbox.acked, committed.outbox.dropped);
        let added = ops
            .iter()
            .any(|op| matches!(op, StoreOp::Outbox(OutboxOp::Put { .. })));
        if added {
            self.outbox_added.notify_one();
        }
        for done in self.downlink_done.drain(..) {
            let _ = done.send(());
        }
    }
}
