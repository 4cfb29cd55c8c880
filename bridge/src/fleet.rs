//! [`Fleet`]: the edges as the cloud's link sees them, without I/O: every edge that linked
//! (or was refused) since the node started, whether it is linked now and since when, its
//! link history, the figures it last told (STATUS), and an hour of samples of its backlog
//! and rates, for the console and `/api/fleet`.
//!
//! Memory is bounded per edge: [`EVENTS`] link events and [`SAMPLES`] samples (an hour of
//! them, less for an edge that reconnects often), about
//! 7 KiB an edge with its names (7 MiB for 1,000 edges). The fleet lives in the node's
//! memory; after a restart it starts again from the edges that link (the cloud's metadata
//! still knows every edge's committed sequences, see `/api/edges`).

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;

use ferry_protocol::link_frames::EdgeStatus;

/// Link events kept per edge (connects, disconnects and refusals, newest last).
pub const EVENTS: usize = 32;
/// Samples kept per edge: one every [`SAMPLE_EVERY_MS`], an hour of them.
pub const SAMPLES: usize = 120;
/// How often an edge's figures are sampled into its history: 30 s; and also at the first
/// STATUS of each link, unless the last sample is younger than [`FIRST_SAMPLE_AFTER_MS`].
pub const SAMPLE_EVERY_MS: u64 = 30_000;
/// See [`SAMPLE_EVERY_MS`]: 5 s.
pub const FIRST_SAMPLE_AFTER_MS: u64 = 5_000;

/// One edge's live link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EdgeLink {
    pub edge_id: String,
    pub serial: String,
    pub remote: SocketAddr,
    pub software: String,
    /// The link protocol version spoken.
    pub version: u16,
    /// When the link came up (ms since the Unix epoch).
    pub since_unix_ms: u64,
    /// Records and bytes of BATCH frames acknowledged on this link.
    pub records: u64,
    pub batch_bytes: u64,
    pub last_ack_unix_ms: u64,
}

/// What happened to an edge's link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkEventKind {
    /// The link came up, from this address, in this version.
    Linked { remote: SocketAddr, version: u16 },
    /// The link ended, and why.
    Unlinked { reason: String },
    /// The edge was refused (the deny list).
    Refused { reason: String },
}

/// One link event, at a time in ms since the Unix epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkEvent {
    pub at_unix_ms: u64,
    pub kind: LinkEventKind,
}

/// An edge's figures at one time: its backlog as it told it, and two counters whose rates
/// are the edge's inflow (`last_seq`) and what the cloud took from it (`acked`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Sample {
    pub at_unix_ms: u64,
    pub outbox_records: u64,
    pub outbox_bytes: u64,
    /// The edge's highest sequence given (see [`EdgeStatus::last_seq`]).
    pub last_seq: u64,
    /// Records the cloud acknowledged from this edge since the node started.
    pub acked: u64,
}

/// One edge, as the fleet knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EdgeRecord {
    pub edge_id: String,
    /// The serial of the certificate it last linked (or was refused) with.
    pub serial: String,
    /// When that certificate expires (seconds since the Unix epoch).
    pub cert_not_after_unix_secs: Option<u64>,
    /// The link now; None while the edge is offline.
    pub link: Option<EdgeLink>,
    /// When the edge was last heard from (ms since the Unix epoch).
    pub last_contact_unix_ms: u64,
    /// When the current state (linked or offline) began.
    pub state_since_unix_ms: u64,
    /// The figures it told last, and when (0: never; an edge of link version 1).
    pub status: Option<EdgeStatus>,
    pub status_at_unix_ms: u64,
    /// Records and bytes acknowledged from this edge since the node started.
    pub acked_records: u64,
    pub acked_bytes: u64,
    pub events: VecDeque<LinkEvent>,
    pub history: VecDeque<Sample>,
    /// [`EdgeRecord::acked_records`] when the last STATUS came, so that rates pair figures
    /// of one moment.
    status_acked: u64,
    /// No STATUS yet on the current link.
    first_status: bool,
    /// The link that is current (an older one of the edge ending does not take it down).
    link_id: u64,
}

/// An edge's rates in records a second, over the last [`RATE_WINDOW_MS`] or so of its
/// figures.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Rates {
    /// Records accepted for the cloud on the edge.
    pub inflow: f64,
    /// Records the cloud acknowledged from it.
    pub sent: f64,
    /// How fast its backlog shrinks (negative: grows).
    pub drain: f64,
}

/// Rates are measured between the figures now and a sample at least this old (or the
/// oldest there is): 25 s, less than a sample's interval, so that one sample back serves.
pub const RATE_WINDOW_MS: u64 = 25_000;

impl EdgeRecord {
    fn new(edge_id: &str, serial: &str, now_ms: u64) -> Self {
        Self {
            edge_id: edge_id.to_owned(),
            serial: serial.to_owned(),
            cert_not_after_unix_secs: None,
            link: None,
            last_contact_unix_ms: now_ms,
            state_since_unix_ms: now_ms,
            status: None,
            status_at_unix_ms: 0,
            acked_records: 0,
            acked_bytes: 0,
            events: VecDeque::new(),
            history: VecDeque::new(),
            status_acked: 0,
            first_status: false,
            link_id: 0,
        }
    }

    /// The rates between the last STATUS and the newest sample at least
    /// [`RATE_WINDOW_MS`] before it (or the oldest); None without a STATUS, or with figures
    /// of a single moment.
    pub fn rates(&self) -> Option<Rates> {
        let now = self.status?;
        let at = self.status_at_unix_ms;
        let then = self
            .history
            .iter()
            .rev()
            .find(|s| s.at_unix_ms + RATE_WINDOW_MS <= at)
            .or_else(|| self.history.front())
            .filter(|s| s.at_unix_ms < at)?;
        let secs = (at - then.at_unix_ms) as f64 / 1000.0;
        let per_sec = |a: u64, b: u64| (a as f64 - b as f64) / secs;
        Some(Rates {
            inflow: per_sec(now.last_seq, then.last_seq).max(0.0),
            sent: per_sec(self.status_acked, then.acked).max(0.0),
            drain: per_sec(then.outbox_records, now.outbox_records),
        })
    }

    fn event(&mut self, at_unix_ms: u64, kind: LinkEventKind) {
        if self.events.len() == EVENTS {
            self.events.pop_front();
        }
        self.events.push_back(LinkEvent { at_unix_ms, kind });
    }

    /// Samples the figures if the last sample is `every_ms` old.
    fn sample(&mut self, now_ms: u64, every_ms: u64) {
        if self
            .history
            .back()
            .is_some_and(|s| now_ms < s.at_unix_ms + every_ms)
        {
            return;
        }
        if self.history.len() == SAMPLES {
            self.history.pop_front();
        }
        let status = self.status.unwrap_or_default();
        self.history.push_back(Sample {
            at_unix_ms: now_ms,
            outbox_records: status.outbox_records,
            outbox_bytes: status.outbox_bytes,
            last_seq: status.last_seq,
            acked: self.acked_records,
        });
    }
}

/// Every edge the node's link has seen since it started.
#[derive(Debug, Default)]
pub struct Fleet {
    edges: HashMap<String, EdgeRecord>,
}

impl Fleet {
    /// `link.edge_id` linked, as link `id` (a new link of an edge replaces the current one).
    pub fn linked(&mut self, id: u64, link: EdgeLink, not_after: Option<u64>, now_ms: u64) {
        let e = self.record(&link.edge_id, &link.serial, now_ms);
        e.serial.clone_from(&link.serial);
        e.cert_not_after_unix_secs = not_after;
        e.event(
            now_ms,
            LinkEventKind::Linked {
                remote: link.remote,
                version: link.version,
            },
        );
        if e.link.is_none() {
            e.state_since_unix_ms = now_ms;
        }
        e.link = Some(link);
        e.link_id = id;
        e.first_status = true;
        e.last_contact_unix_ms = now_ms;
    }

    /// Link `id` of `edge` ended, for `reason`. The edge is offline unless a newer link of
    /// it is up.
    pub fn unlinked(&mut self, edge: &str, id: u64, reason: String, now_ms: u64) {
        let Some(e) = self.edges.get_mut(edge) else {
            return;
        };
        e.event(now_ms, LinkEventKind::Unlinked { reason });
        e.last_contact_unix_ms = now_ms;
        if e.link_id == id && e.link.is_some() {
            e.link = None;
            e.state_since_unix_ms = now_ms;
            e.sample(now_ms, SAMPLE_EVERY_MS);
        }
    }

    /// `edge` was refused (with the certificate `serial`).
    pub fn refused(&mut self, edge: &str, serial: &str, reason: String, now_ms: u64) {
        let e = self.record(edge, serial, now_ms);
        e.serial = serial.to_owned();
        e.last_contact_unix_ms = now_ms;
        e.event(now_ms, LinkEventKind::Refused { reason });
    }

    /// Link `id` of `edge` had `records` of `bytes` acknowledged.
    pub fn acked(&mut self, edge: &str, id: u64, records: u64, bytes: u64, now_ms: u64) {
        let Some(e) = self.edges.get_mut(edge) else {
            return;
        };
        e.acked_records += records;
        e.acked_bytes += bytes;
        e.last_contact_unix_ms = now_ms;
        if let Some(link) = e.link.as_mut().filter(|_| e.link_id == id) {
            link.records += records;
            link.batch_bytes += bytes;
            link.last_ack_unix_ms = now_ms;
        }
    }

    /// `edge` told its figures on link `id`.
    pub fn status(&mut self, edge: &str, id: u64, status: EdgeStatus, now_ms: u64) {
        let Some(e) = self.edges.get_mut(edge).filter(|e| e.link_id == id) else {
            return;
        };
        e.status = Some(status);
        e.status_at_unix_ms = now_ms;
        e.status_acked = e.acked_records;
        e.last_contact_unix_ms = now_ms;
        // The first figures of a link are the backlog it came back with: sampled then (unless
        // a sample is very recent, as for an edge that reconnects again and again), so the
        // chart shows the backlog and its fall, not only the next half-minute's.
        let every = if std::mem::take(&mut e.first_status) {
            FIRST_SAMPLE_AFTER_MS
        } else {
            SAMPLE_EVERY_MS
        };
        e.sample(now_ms, every);
    }

    /// Takes a sample of every edge whose last one is old enough (an offline edge's
    /// history goes on, flat, so its chart shows the gap as it is).
    pub fn tick(&mut self, now_ms: u64) {
        for e in self.edges.values_mut() {
            e.sample(now_ms, SAMPLE_EVERY_MS);
        }
    }

    /// Every edge, by id.
    pub fn edges(&self) -> Vec<EdgeRecord> {
        let mut out: Vec<_> = self.edges.values().cloned().collect();
        out.sort_by(|a, b| a.edge_id.cmp(&b.edge_id));
        out
    }

    /// One edge.
    pub fn edge(&self, edge: &str) -> Option<EdgeRecord> {
        self.edges.get(edge).cloned()
    }

    /// The live links, by edge id.
    pub fn links(&self) -> Vec<EdgeLink> {
        let mut out: Vec<_> = self.edges.values().filter_map(|e| e.link.clone()).collect();
        out.sort_by(|a, b| a.edge_id.cmp(&b.edge_id));
        out
    }

    fn record(&mut self, edge: &str, serial: &str, now_ms: u64) -> &mut EdgeRecord {
        self.edges
            .entry(edge.to_owned())
            .or_insert_with(|| EdgeRecord::new(edge, serial, now_ms))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(edge: &str, port: u16) -> EdgeLink {
        EdgeLink {
            edge_id: edge.into(),
            serial: "0a1b".into(),
            remote: SocketAddr::from(([127, 0, 0, 1], port)),
            software: "ferry-edge test".into(),
            version: 2,
            since_unix_ms: 1_000,
            records: 0,
            batch_bytes: 0,
            last_ack_unix_ms: 0,
        }
    }

    fn status(records: u64, last_seq: u64) -> EdgeStatus {
        EdgeStatus {
            outbox_records: records,
            last_seq,
            ..EdgeStatus::default()
        }
    }

    #[test]
    fn a_replaced_link_ending_late_leaves_the_edge_linked_and_its_history_says_so() {
        let mut fleet = Fleet::default();
        fleet.linked(1, link("gw-1", 1), Some(99), 1_000);
        fleet.linked(2, link("gw-1", 2), Some(99), 2_000);
        // The first link's driver ends after the second came up.
        fleet.unlinked("gw-1", 1, "replaced".into(), 2_100);
        let e = fleet.edge("gw-1").expect("known");
        assert_eq!(e.link.as_ref().map(|l| l.remote.port()), Some(2));
        assert_eq!(e.state_since_unix_ms, 1_000, "linked all along");
        assert_eq!(e.cert_not_after_unix_secs, Some(99));
        // Acks and figures of the old link do not count as the current link's.
        fleet.acked("gw-1", 1, 5, 50, 2_200);
        fleet.status("gw-1", 1, status(9, 9), 2_200);
        let e = fleet.edge("gw-1").expect("known");
        assert_eq!(e.link.as_ref().map(|l| l.records), Some(0));
        assert_eq!(e.acked_records, 5, "the edge's total counts every link");
        assert_eq!(e.status, None);
        fleet.unlinked("gw-1", 2, "timed out".into(), 3_000);
        let e = fleet.edge("gw-1").expect("known");
        assert!(e.link.is_none());
        assert_eq!(e.state_since_unix_ms, 3_000);
        let kinds: Vec<_> = e.events.iter().map(|ev| &ev.kind).collect();
        assert!(matches!(
            kinds[..],
            [
                LinkEventKind::Linked { .. },
                LinkEventKind::Linked { .. },
                LinkEventKind::Unlinked { .. },
                LinkEventKind::Unlinked { .. }
            ]
        ));
        assert!(fleet.links().is_empty());
    }

    #[test]
    fn rates_pair_the_last_status_with_a_sample_about_half_a_minute_before() {
        let mut fleet = Fleet::default();
        fleet.linked(1, link("gw-3", 1), None, 0);
        fleet.status("gw-3", 1, status(1_000, 5_000), 0);
        assert_eq!(
            fleet.edge("gw-3").and_then(|e| e.rates()),
            None,
            "one moment"
        );
        // 10 s later: 200 more accepted, 700 acknowledged, backlog down by 500.
        fleet.acked("gw-3", 1, 700, 7_000, 9_000);
        fleet.status("gw-3", 1, status(500, 5_200), 10_000);
        let r = fleet.edge("gw-3").and_then(|e| e.rates()).expect("rates");
        assert_eq!((r.inflow, r.sent, r.drain), (20.0, 70.0, 50.0));
        // Cut off: the backlog it tells when it is back grew, so the drain is negative;
        // measured from the sample 30 s before, not from the first.
        fleet.unlinked("gw-3", 1, "timed out".into(), 30_000);
        fleet.linked(2, link("gw-3", 2), None, 59_000);
        fleet.status("gw-3", 2, status(800, 5_500), 60_000);
        let e = fleet.edge("gw-3").expect("known");
        assert_eq!(
            e.history.iter().map(|s| s.at_unix_ms).collect::<Vec<_>>(),
            vec![0, 30_000, 60_000]
        );
        let r = e.rates().expect("rates");
        assert_eq!((r.inflow, r.sent, r.drain), (10.0, 0.0, -10.0));
        // The first STATUS of a link is sampled unless the last sample is under 5 s old.
        fleet.linked(3, link("gw-3", 3), None, 62_000);
        fleet.status("gw-3", 3, status(700, 5_520), 63_000);
        fleet.linked(4, link("gw-3", 4), None, 70_000);
        fleet.status("gw-3", 4, status(600, 5_600), 70_500);
        fleet.status("gw-3", 4, status(0, 5_700), 75_000);
        let e = fleet.edge("gw-3").expect("known");
        assert_eq!(
            e.history.iter().map(|s| s.at_unix_ms).collect::<Vec<_>>(),
            vec![0, 30_000, 60_000, 70_500]
        );
    }

    #[test]
    fn history_and_events_are_bounded_and_sampled_every_30_s() {
        let mut fleet = Fleet::default();
        fleet.linked(1, link("gw-2", 1), None, 0);
        let mut t = 0;
        for i in 0..1_000u64 {
            t = i * 5_000;
            fleet.acked("gw-2", 1, 10, 100, t);
            fleet.status("gw-2", 1, status(1_000 - i, 10 * i), t);
        }
        let e = fleet.edge("gw-2").expect("known");
        assert_eq!(e.history.len(), SAMPLES);
        assert!(e
            .history
            .iter()
            .zip(e.history.iter().skip(1))
            .all(|(a, b)| b.at_unix_ms - a.at_unix_ms == SAMPLE_EVERY_MS));
        let last = e.history.back().expect("a sample");
        assert_eq!(last.at_unix_ms, t - t % SAMPLE_EVERY_MS);
        assert!(last.outbox_records < 1_000 && last.acked > 9_000);
        for i in 0..100 {
            fleet.refused("gw-2", "0a1b", format!("denied {i}"), t + i);
        }
        let e = fleet.edge("gw-2").expect("known");
        assert_eq!(e.events.len(), EVENTS);
        assert_eq!(
            e.events.back().map(|ev| ev.kind.clone()),
            Some(LinkEventKind::Refused {
                reason: "denied 99".into()
            })
        );
        // An edge that went quiet still gets samples, so its chart has no hole.
        fleet.tick(t + 10 * SAMPLE_EVERY_MS);
        let e = fleet.edge("gw-2").expect("known");
        assert_eq!(
            e.history.back().map(|s| s.at_unix_ms),
            Some(t + 10 * SAMPLE_EVERY_MS)
        );
    }
}
