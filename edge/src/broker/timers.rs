//! The broker's deadlines, for [`Broker::poll_timeout`](super::Broker::poll_timeout): one
//! entry per armed timer, ordered by when it is due, so that the earliest is found in
//! O(log n) and arming or cancelling one costs O(log n), whatever the number of sessions.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Instant;

use super::ConnId;

/// What a deadline is for.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(super) enum Timer {
    /// The `$SYS/broker/...` statistics are due.
    Sys,
    /// A connection's keep alive: check whether the client sent anything within 1.5 times
    /// its interval. Armed lazily: a packet only moves the connection's `last_seen`, and the
    /// check re-arms itself at `last_seen + limit` when it finds the client was heard from
    /// since, so that traffic costs nothing here.
    KeepAlive(ConnId),
    /// An offline session: its will delay or its expiry, whichever comes first.
    Session(Arc<str>),
}

/// The armed timers. At most one deadline per [`Timer`]: arming one again moves it.
#[derive(Debug, Default)]
pub(super) struct Timers {
    by_deadline: BTreeSet<(Instant, Timer)>,
    by_timer: HashMap<Timer, Instant>,
}

impl Timers {
    /// Arms `timer` at `at`, replacing its earlier deadline if it had one.
    pub(super) fn set(&mut self, timer: Timer, at: Instant) {
        if let Some(old) = self.by_timer.insert(timer.clone(), at) {
            if old == at {
                return;
            }
            self.by_deadline.remove(&(old, timer.clone()));
        }
        self.by_deadline.insert((at, timer));
    }

    /// Disarms `timer`; nothing if it was not armed.
    pub(super) fn cancel(&mut self, timer: &Timer) {
        if let Some(old) = self.by_timer.remove(timer) {
            self.by_deadline.remove(&(old, timer.clone()));
        }
    }

    /// The earliest deadline.
    pub(super) fn next(&self) -> Option<Instant> {
        self.by_deadline.first().map(|(at, _)| *at)
    }

    /// Disarms and returns every timer due at `now`, earliest first. Taken all at once, so
    /// that what their handlers arm (always later than `now`) waits for the next call.
    pub(super) fn take_due(&mut self, now: Instant) -> Vec<Timer> {
        let mut due = Vec::new();
        while self.by_deadline.first().is_some_and(|(at, _)| *at <= now) {
            let Some((_, timer)) = self.by_deadline.pop_first() else {
                break;
            };
            self.by_timer.remove(&timer);
            due.push(timer);
        }
        due
    }

    /// Armed timers, for tests of the bookkeeping.
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        debug_assert_eq!(self.by_deadline.len(), self.by_timer.len());
        self.by_timer.len()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn earliest_first_rearming_moves_and_cancel_removes() {
        let t0 = Instant::now();
        let s = |n: u64| t0 + Duration::from_secs(n);
        let mut timers = Timers::default();
        assert_eq!(timers.next(), None);
        timers.set(Timer::KeepAlive(1), s(30));
        timers.set(Timer::Session("a".into()), s(10));
        timers.set(Timer::Sys, s(20));
        assert_eq!(timers.next(), Some(s(10)));
        // Re-arming moves the deadline instead of adding a second one.
        timers.set(Timer::Session("a".into()), s(40));
        assert_eq!((timers.next(), timers.len()), (Some(s(20)), 3));
        timers.cancel(&Timer::Sys);
        timers.cancel(&Timer::Sys);
        assert_eq!((timers.next(), timers.len()), (Some(s(30)), 2));
        assert_eq!(timers.take_due(s(29)), []);
        assert_eq!(
            timers.take_due(s(40)),
            [Timer::KeepAlive(1), Timer::Session("a".into())]
        );
        assert_eq!((timers.next(), timers.len()), (None, 0));
    }
}
