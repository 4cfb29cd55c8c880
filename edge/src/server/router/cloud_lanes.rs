//! The router's lanes from the link (feature `edge`): the cloud's acknowledgements of the
//! outbox and the downlink, served after the connections' credit and acknowledgements and
//! before new publishes; and their part in each commit (the outbox's deletes, the downlink's
//! applied sequence, the outbox's budget and the link's wake-up after it).
//!
//! A downlink sequence is applied once every message up to it is routed: in the sessions'
//! queues, durably for persistent sessions, in the same commit that records the sequence.
//! A message a connected subscriber has no room for is held by the broker (in memory,
//! [`Broker::deliveries_held`]); the batch's sequence, and every later one, then waits in
//! [`CloudLanes`] until the broker has routed it ([`Broker::deliveries_done`]), and its
//! `done` with it: a crash meanwhile loses nothing the cloud was told the edge has, since
//! the cloud sends again what the edge did not acknowledge. The link does not wait for
//! `done` to go on (it sends and acknowledges the uplink meanwhile); the cloud's downlink
//! window (1,024 sequences unacknowledged) bounds what waits here. A batch that comes again
//! while its messages are still held here (the link went and the next one got them from
//! the cloud again) is not published twice: messages at or below the highest sequence
//! taken are skipped.

use std::collections::VecDeque;
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
    /// Outbox deletes for the next commit.
    ops: Vec<StoreOp>,
    /// Downlink batches taken and not applied yet, in order.
    pending: VecDeque<PendingDown>,
    /// The highest downlink sequence given to the broker in this process.
    down_taken: u64,
    /// Who waits for the next commit, which applies their sequences.
    downlink_done: Vec<oneshot::Sender<()>>,
}

/// A downlink batch whose messages the broker may still hold.
#[derive(Debug)]
struct PendingDown {
    seq: u64,
    /// Applied once [`Broker::deliveries_done`] reaches this: its last message, and every
    /// delivery before it, is routed.
    routed_at: u64,
    done: oneshot::Sender<()>,
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
            pending: VecDeque::new(),
            down_taken: 0,
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
    /// messages go to the broker now (but those taken before), and their sequence waits
    /// until they are routed.
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
            FromCloud::Downlink(Downlink {
                messages,
                seq,
                done,
            }) => {
                for (msg_seq, msg) in messages {
                    if msg_seq > self.down_taken {
                        broker.handle(Input::Deliver(msg), now, actions);
                    }
                }
                self.down_taken = self.down_taken.max(seq);
                // Everything handed to the broker so far is done with or held, in order.
                let routed_at = broker.deliveries_done() + broker.deliveries_held() as u64;
                self.pending.push_back(PendingDown {
                    seq,
                    routed_at,
                    done,
                });
            }
        }
    }

    /// Before the batch's commit: its outbox deletes (with every acknowledgement that has
    /// arrived meanwhile) go into it, and the highest downlink sequence whose messages (and
    /// all before them) the broker has routed, in this batch or before.
    pub(super) fn before_commit(&mut self, broker: &Broker, ops: &mut Vec<StoreOp>) {
        while let Ok((priority, seq)) = self.outbox_acks.try_recv() {
            self.ops
                .push(StoreOp::Outbox(OutboxOp::Delete { priority, seq }));
        }
        ops.append(&mut self.ops);
        let routed = broker.deliveries_done();
        let mut applied: Option<u64> = None;
        while self.pending.front().is_some_and(|p| p.routed_at <= routed) {
            let Some(p) = self.pending.pop_front() else {
                break;
            };
            // A batch sent again by a later link may end below one taken before it.
            applied = Some(applied.map_or(p.seq, |a| a.max(p.seq)));
            self.downlink_done.push(p.done);
        }
        if let Some(seq) = applied {
            ops.push(StoreOp::Outbox(OutboxOp::DownlinkApplied { seq }));
        }
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
