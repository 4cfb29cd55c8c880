//! [`CloudEnd`]: the cloud's end of one link as a state machine, without I/O (the shape of
//! quinn-proto's `Connection`; `server.rs` is its driver). It takes the edge's frames
//! ([`CloudEnd::handle_frame`]), the completions of the ingest path and the downlink, and the
//! time; it gives frames to send ([`CloudEnd::poll_transmit`]), work for the driver
//! ([`CloudEnd::poll_effect`]) and its next deadline ([`CloudEnd::poll_timeout`]). It checks
//! the version and the credit, groups batches for the ingest path, coalesces
//! acknowledgements (one round per [`ACK_INTERVAL`]), and keeps the downlink within
//! [`DOWN_WINDOW`].
//!
//! `C` is the driver's handle of an appended group's metadata commit (a future in
//! `server.rs`); the machine only keeps it in order and hands back the newest per class.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bytes::Bytes;
use ferry_protocol::kafka::BatchHeader;
use ferry_protocol::link::{Frame, GoAwayCode, VERSION};

use crate::error::{frame_name, LinkError};

/// What the cloud's end needs to know of its configuration.
#[derive(Debug, Clone)]
pub struct CloudEndConfig {
    /// Bytes of BATCH frames an edge may have unacknowledged (default 16 MiB). The batches
    /// queued for one link hold at most this plus one frame.
    pub credit_bytes: u64,
    /// The largest frame taken from the edge.
    pub max_frame_bytes: usize,
    /// How long to wait for HELLO (the idle timeout, 30 s by default).
    pub handshake_timeout: Duration,
}

/// What the driver does for the cloud's end.
#[derive(Debug, PartialEq, Eq)]
pub enum Effect<C> {
    /// The edge said HELLO: check the deny list, then [`CloudEnd::welcome`] or
    /// [`CloudEnd::refuse`]. `down_acked`: the downlink sequence the edge says it applied.
    Hello { software: String, down_acked: u64 },
    /// Append these batches (in order, one class) through the ingest path; then
    /// [`CloudEnd::ingest_done`] with the handle of their metadata commit.
    Ingest { class: u8, batches: Vec<Bytes> },
    /// Run this commit (the newest of its class this round; older ones are covered by it),
    /// then [`CloudEnd::commit_done`] with the class's committed sequence.
    Commit { class: u8, commit: C },
    /// Read the edge's downlink after sequence `after`, then [`CloudEnd::downlink_read`].
    ReadDown { after: u64 },
    /// The edge applied the downlink up to `seq`: record it durably, then
    /// [`CloudEnd::down_ack_recorded`].
    RecordDownAck { seq: u64 },
    /// A round of acknowledgements went out (for metrics): records and bytes acknowledged.
    Acknowledged { records: u64, bytes: u64 },
}

/// The cloud's end of one link (one connection), from HELLO to its end.
#[derive(Debug)]
pub struct CloudEnd<C> {
    config: CloudEndConfig,
    state: State,
    transmit: VecDeque<Frame>,
    effects: VecDeque<Effect<C>>,
    /// Bytes of BATCH frames received and not yet given back with CREDIT.
    outstanding: u64,
    /// Batches received, not yet handed to the ingest path: (class, batch, bytes on the
    /// wire). At most [`QUEUED_BATCHES`].
    queued: VecDeque<(u8, Bytes, u64)>,
    /// The group being appended, if any.
    ingesting: Option<Group>,
    /// Groups appended, their commits waiting for an acknowledgement round. At most
    /// [`QUEUED_COMMITS`].
    appended: VecDeque<(Group, C)>,
    /// When the last acknowledgement round started.
    last_round: Instant,
    round: Option<Round<C>>,
    down: Downlink,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Waiting for HELLO until the deadline.
    Handshake {
        deadline: Instant,
    },
    /// HELLO taken; the driver checks the deny list.
    Hello {
        down_acked: u64,
    },
    Up,
    /// The edge sent GOAWAY, or it was refused: the link is over.
    Closed,
}

/// An appended group, as an acknowledgement round counts it.
#[derive(Debug, Clone, Copy)]
struct Group {
    class: u8,
    /// Credit to give back once acknowledged.
    returned: u64,
    records: u64,
}

/// One round of acknowledgements: the newest commit of each class appended before it
/// started, run one after the other.
#[derive(Debug)]
struct Round<C> {
    pending: VecDeque<(u8, C)>,
    /// The class whose commit runs now.
    committing: Option<u8>,
    returned: u64,
    records: u64,
}

/// Where the downlink stands on this link.
#[derive(Debug, Default)]
struct Downlink {
    /// Read up to here.
    read_to: u64,
    /// The last sequence sent in a DOWN frame.
    sent_to: u64,
    /// The edge applied up to here, and the cloud recorded it.
    acked: u64,
    /// The highest DOWN_ACK from the edge.
    acked_by_edge: u64,
    recording: bool,
    reading: bool,
    /// The downlink may have more to read.
    dirty: bool,
}

impl<C> CloudEnd<C> {
    /// A new link, waiting for HELLO.
    pub fn new(config: CloudEndConfig, now: Instant) -> Self {
        let deadline = now + config.handshake_timeout;
        Self {
            config,
            state: State::Handshake { deadline },
            transmit: VecDeque::new(),
            effects: VecDeque::new(),
            outstanding: 0,
            queued: VecDeque::new(),
            ingesting: None,
            appended: VecDeque::new(),
            last_round: now,
            round: None,
            down: Downlink::default(),
        }
    }

    /// A frame from the edge. An error ends the link (after what
    /// [`CloudEnd::poll_transmit`] still gives).
    pub fn handle_frame(&mut self, _now: Instant, frame: Frame) -> Result<(), LinkError> {
        match (self.state, frame) {
            (
                State::Handshake { .. },
                Frame::Hello {
                    version,
                    down_acked,
                    software,
                    ..
                },
            ) => {
                if version != VERSION {
                    self.transmit.push_back(Frame::GoAway {
                        code: GoAwayCode::UnsupportedVersion,
                        reason: format!("this cloud speaks link version {VERSION}"),
                    });
                    self.state = State::Closed;
                    return Err(LinkError::VersionMismatch {
                        ours: VERSION,
                        theirs: version,
                    });
                }
                self.state = State::Hello { down_acked };
                self.effects.push_back(Effect::Hello {
                    software,
                    down_acked,
                });
                Ok(())
            }
            (State::Up, Frame::Batch { class, batch }) => {
                // The frame's length (u32), type (u8), class (u8) and the batch.
                let wire = batch.len() as u64 + 6;
                self.outstanding += wire;
                let credit = self.config.credit_bytes + self.config.max_frame_bytes as u64;
                if self.outstanding > credit {
                    return Err(LinkError::PastCredit {
                        sent: self.outstanding,
                        credit,
                    });
                }
                self.queued.push_back((class, batch, wire));
                Ok(())
            }
            (State::Up, Frame::DownAck { seq }) => {
                self.down.acked_by_edge = self.down.acked_by_edge.max(seq);
                Ok(())
            }
            (State::Up, Frame::GoAway { .. }) => {
                self.state = State::Closed;
                Ok(())
            }
            (State::Closed, _) => Ok(()),
            (_, other) => Err(LinkError::UnexpectedFrame(frame_name(&other))),
        }
    }

    /// After [`Effect::Hello`]: the edge may link. Queues WELCOME with the committed
    /// sequence of each class, and starts the downlink from the further of where the edge
    /// says it stands and `down_acked`, where the cloud recorded its last DOWN_ACK.
    pub fn welcome(&mut self, now: Instant, committed: Vec<(u8, u64)>, down_acked: u64) {
        let State::Hello {
            down_acked: edge_down_acked,
        } = self.state
        else {
            return;
        };
        self.transmit.push_back(Frame::Welcome {
            version: VERSION,
            max_frame_bytes: self.config.max_frame_bytes as u32,
            credit_bytes: self.config.credit_bytes,
            committed,
        });
        let from = edge_down_acked.max(down_acked);
        self.down = Downlink {
            read_to: from,
            sent_to: from,
            acked: from,
            acked_by_edge: from,
            dirty: true,
            ..Downlink::default()
        };
        self.last_round = now;
        self.state = State::Up;
    }

    /// After [`Effect::Hello`]: the edge may not link (it is denied). Queues GOAWAY.
    pub fn refuse(&mut self, code: GoAwayCode, reason: String) {
        self.transmit.push_back(Frame::GoAway { code, reason });
        self.state = State::Closed;
    }

    /// An [`Effect::Ingest`] is done: the records are in the log, `commit` makes their
    /// sequence durable; or the ingest path failed, which ends the link with GOAWAY
    /// Unavailable (the edge sends the records again later).
    pub fn ingest_done(&mut self, result: Result<C, String>) -> Result<(), LinkError> {
        let group = self
            .ingesting
            .take()
            .expect("ingest_done answers an Effect::Ingest");
        match result {
            Ok(commit) => {
                self.appended.push_back((group, commit));
                Ok(())
            }
            Err(why) => Err(self.unavailable(why)),
        }
    }

    /// An [`Effect::Commit`] is done: queues the class's ACK (and the round's CREDIT when
    /// it was the round's last); or the commit failed (GOAWAY Unavailable).
    pub fn commit_done(&mut self, result: Result<u64, String>) -> Result<(), LinkError> {
        let committed_seq = match result {
            Ok(seq) => seq,
            Err(why) => return Err(self.unavailable(why)),
        };
        let round = self
            .round
            .as_mut()
            .expect("commit_done answers an Effect::Commit");
        let class = round
            .committing
            .take()
            .expect("commit_done answers an Effect::Commit");
        self.transmit.push_back(Frame::Ack {
            class,
            committed_seq,
        });
        if round.pending.is_empty() {
            let (returned, records) = (round.returned, round.records);
            self.round = None;
            self.transmit.push_back(Frame::Credit { bytes: returned });
            self.outstanding -= returned;
            self.effects.push_back(Effect::Acknowledged {
                records,
                bytes: returned,
            });
        }
        Ok(())
    }

    fn unavailable(&mut self, why: String) -> LinkError {
        self.transmit.push_back(Frame::GoAway {
            code: GoAwayCode::Unavailable,
            reason: format!("ingest failed: {why}"),
        });
        self.state = State::Closed;
        LinkError::Ingest(why)
    }

    /// An [`Effect::ReadDown`] is done: read up to `read_to`, and a record batch of the
    /// edge's messages among it if there were any (queued as DOWN).
    pub fn downlink_read(&mut self, read_to: u64, batch: Option<Bytes>) {
        self.down.reading = false;
        if read_to <= self.down.read_to {
            return;
        }
        self.down.read_to = read_to;
        self.down.dirty = true;
        if let Some(batch) = batch {
            if let Ok(h) = BatchHeader::parse(&batch) {
                self.down.sent_to = h.last_offset().max(0) as u64;
            }
            self.transmit.push_back(Frame::Down { batch });
        }
    }

    /// The downlink may have new messages.
    pub fn downlink_changed(&mut self) {
        self.down.dirty = true;
    }

    /// An [`Effect::RecordDownAck`] is done: `seq` is recorded durably.
    pub fn down_ack_recorded(&mut self, seq: u64) {
        self.down.recording = false;
        self.down.acked = self.down.acked.max(seq);
        // The window moved: there may be room to send more.
        self.down.dirty = true;
    }

    /// The next frame to send to the edge.
    pub fn poll_transmit(&mut self) -> Option<Frame> {
        self.transmit.pop_front()
    }

    /// Whether frames wait for [`CloudEnd::poll_transmit`].
    pub fn has_transmit(&self) -> bool {
        !self.transmit.is_empty()
    }

    /// Whether the driver should read the edge's next frame: not while
    /// [`QUEUED_BATCHES`] wait for the ingest path (QUIC's flow control then slows the
    /// edge), nor after the link ended.
    pub fn wants_frames(&self) -> bool {
        match self.state {
            State::Handshake { .. } => true,
            State::Up => self.queued.len() < QUEUED_BATCHES,
            State::Hello { .. } | State::Closed => false,
        }
    }

    /// The edge said HELLO and was welcomed; the link is not over.
    pub fn is_up(&self) -> bool {
        self.state == State::Up
    }

    /// The link is over without an error (the edge sent GOAWAY, or it was refused).
    pub fn is_closed(&self) -> bool {
        self.state == State::Closed
    }

    /// The next thing the driver should do; call until None after every input. Work
    /// that makes frames (commits, downlink reads) waits while frames wait to be sent, so
    /// a slow writer holds back the acknowledgements and the downlink, not memory.
    pub fn poll_effect(&mut self) -> Option<Effect<C>> {
        if let Some(effect) = self.effects.pop_front() {
            return Some(effect);
        }
        if self.state != State::Up {
            return None;
        }
        if self.ingesting.is_none()
            && !self.queued.is_empty()
            && self.appended.len() < QUEUED_COMMITS
        {
            return Some(self.next_group());
        }
        if !self.down.recording && self.down.acked_by_edge > self.down.acked {
            self.down.recording = true;
            return Some(Effect::RecordDownAck {
                seq: self.down.acked_by_edge,
            });
        }
        if !self.transmit.is_empty() {
            return None;
        }
        if let Some(round) = self.round.as_mut().filter(|r| r.committing.is_none()) {
            if let Some((class, commit)) = round.pending.pop_front() {
                round.committing = Some(class);
                return Some(Effect::Commit { class, commit });
            }
        }
        let down = &mut self.down;
        if !down.reading && down.dirty && down.sent_to.saturating_sub(down.acked) < DOWN_WINDOW {
            down.reading = true;
            down.dirty = false;
            return Some(Effect::ReadDown {
                after: down.read_to,
            });
        }
        None
    }

    /// As many queued batches of the first one's class as are queued, up to
    /// [`GROUP_BYTES`].
    fn next_group(&mut self) -> Effect<C> {
        let (class, first, mut returned) = self.queued.pop_front().expect("a batch is queued");
        let mut bytes = first.len();
        let mut batches = vec![first];
        while bytes < GROUP_BYTES {
            match self.queued.front() {
                Some((c, _, _)) if *c == class => {
                    let (_, batch, wire) = self.queued.pop_front().expect("front exists");
                    bytes += batch.len();
                    returned += wire;
                    batches.push(batch);
                }
                _ => break,
            }
        }
        let records = batches
            .iter()
            .filter_map(|b| BatchHeader::parse(b).ok())
            .map(|h| h.records_count.max(0) as u64)
            .sum();
        self.ingesting = Some(Group {
            class,
            returned,
            records,
        });
        Effect::Ingest { class, batches }
    }

    /// When [`CloudEnd::handle_timeout`] should be called next: the handshake's deadline,
    /// or the next acknowledgement round's.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.state {
            State::Handshake { deadline } => Some(deadline),
            State::Up if self.round.is_none() && !self.appended.is_empty() => {
                Some(self.last_round + ACK_INTERVAL)
            }
            _ => None,
        }
    }

    /// The time has come (or passed) that [`CloudEnd::poll_timeout`] gave: an error if no
    /// HELLO came in time; starts an acknowledgement round of everything appended so far.
    pub fn handle_timeout(&mut self, now: Instant) -> Result<(), LinkError> {
        match self.state {
            State::Handshake { deadline } if now >= deadline => {
                return Err(LinkError::HandshakeTimeout {
                    frame: "HELLO",
                    secs: self.config.handshake_timeout.as_secs(),
                })
            }
            State::Up => {}
            _ => return Ok(()),
        }
        if self.round.is_some() || self.appended.is_empty() || now < self.last_round + ACK_INTERVAL
        {
            return Ok(());
        }
        self.last_round = now;
        // One metadata commit per class, the newest one's (sequences only grow): it
        // acknowledges everything of the class appended before it.
        let mut round = Round {
            pending: VecDeque::new(),
            committing: None,
            returned: 0,
            records: 0,
        };
        for (group, commit) in self.appended.drain(..) {
            round.returned += group.returned;
            round.records += group.records;
            match round.pending.iter_mut().find(|(c, _)| *c == group.class) {
                Some(newest) => newest.1 = commit,
                None => round.pending.push_back((group.class, commit)),
            }
        }
        self.round = Some(round);
        Ok(())
    }
}

/// The shortest time between two rounds of acknowledgements (metadata commits) of a link:
/// the records are durable in the log already (subscribers see them); the acknowledgement
/// only lets the edge delete them, and fewer fsyncs leave the disk to the appends that
/// readers wait for.
pub const ACK_INTERVAL: Duration = Duration::from_millis(10);

/// Downlink messages (by sequence) sent and not yet acknowledged before the cloud waits.
pub const DOWN_WINDOW: u64 = 1024;

/// Up to this many bytes of batches go to the ingest path in one call.
pub const GROUP_BYTES: usize = 4 << 20;

/// Batches received and not yet handed to the ingest path, per link. The edge's credit
/// already bounds their bytes; this bounds their number (a flood of tiny batches), and when
/// it is reached the driver stops reading, so QUIC's flow control slows the edge. 1,024
/// of the default 64 KiB-or-less batches stay within the 16 MiB credit.
pub const QUEUED_BATCHES: usize = 1024;

/// Groups appended and waiting for their metadata commit and acknowledgement, per link:
/// each round (every ACK_INTERVAL) takes them all, so a few rounds' worth is enough; a
/// full queue holds the next append back.
pub const QUEUED_COMMITS: usize = 64;

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_protocol::kafka::{BatchBuilder, Compression};

    const CREDIT: u64 = 10_000;
    const MAX_FRAME: usize = 1_000;

    fn config() -> CloudEndConfig {
        CloudEndConfig {
            credit_bytes: CREDIT,
            max_frame_bytes: MAX_FRAME,
            handshake_timeout: Duration::from_secs(30),
        }
    }

    /// The commit handle of the tests: the sequence the commit makes durable.
    type End = CloudEnd<u64>;

    fn hello(version: u16, down_acked: u64) -> Frame {
        Frame::Hello {
            version,
            max_frame_bytes: 1 << 20,
            down_acked,
            software: "test".into(),
        }
    }

    /// A link past WELCOME (the edge applied `edge_down`, the cloud recorded `cloud_down`),
    /// with WELCOME taken off.
    fn up(now: Instant, edge_down: u64, cloud_down: u64) -> End {
        let mut end = End::new(config(), now);
        end.handle_frame(now, hello(VERSION, edge_down))
            .expect("hello");
        let fx = effects(&mut end);
        assert!(
            matches!(&fx[..], [Effect::Hello { down_acked, .. }] if *down_acked == edge_down),
            "{fx:?}"
        );
        end.welcome(now, vec![(0, 3)], cloud_down);
        assert!(matches!(
            frames(&mut end)[..],
            [Frame::Welcome {
                credit_bytes: CREDIT,
                ..
            }]
        ));
        // The downlink's first read, from the further of the two; left in flight.
        assert_eq!(
            effects(&mut end),
            vec![Effect::ReadDown {
                after: edge_down.max(cloud_down)
            }]
        );
        end
    }

    fn effects(end: &mut End) -> Vec<Effect<u64>> {
        std::iter::from_fn(|| end.poll_effect()).collect()
    }

    fn frames(end: &mut End) -> Vec<Frame> {
        std::iter::from_fn(|| end.poll_transmit()).collect()
    }

    /// A record batch of records `first..=last` (offsets = sequences), `pad` bytes each.
    fn batch(first: u64, last: u64, pad: usize) -> Bytes {
        let mut b = BatchBuilder::with_capacity(0, 64);
        for s in first..=last {
            b.push_at((s - first) as i32, 0, Some(b"t"), Some(&vec![0; pad]), &[]);
        }
        b.finish_with(first as i64, Compression::None)
    }

    fn batch_frame(class: u8, first: u64, last: u64) -> Frame {
        Frame::Batch {
            class,
            batch: batch(first, last, 1),
        }
    }

    #[test]
    fn hello_of_another_version_gets_goaway_unsupported_version() {
        let now = Instant::now();
        let mut end = End::new(config(), now);
        let err = end
            .handle_frame(now, hello(VERSION + 1, 0))
            .expect_err("version");
        assert!(
            matches!(err, LinkError::VersionMismatch { ours: VERSION, theirs } if theirs == VERSION + 1)
        );
        assert!(matches!(
            frames(&mut end)[..],
            [Frame::GoAway {
                code: GoAwayCode::UnsupportedVersion,
                ..
            }]
        ));
    }

    #[test]
    fn a_refused_edge_gets_goaway_and_nothing_else() {
        let now = Instant::now();
        let mut end = End::new(config(), now);
        end.handle_frame(now, hello(VERSION, 0)).expect("hello");
        let _ = effects(&mut end);
        // No frame is read while the driver decides.
        assert!(!end.wants_frames());
        end.refuse(GoAwayCode::Denied, "denied".into());
        assert!(end.is_closed());
        assert!(matches!(
            frames(&mut end)[..],
            [Frame::GoAway {
                code: GoAwayCode::Denied,
                ..
            }]
        ));
        assert!(effects(&mut end).is_empty());
    }

    #[test]
    fn a_batch_before_hello_or_no_hello_in_time_ends_the_link() {
        let now = Instant::now();
        let mut end = End::new(config(), now);
        assert!(matches!(
            end.handle_frame(now, batch_frame(0, 1, 1)),
            Err(LinkError::UnexpectedFrame("BATCH"))
        ));
        let mut end = End::new(config(), now);
        let deadline = now + Duration::from_secs(30);
        assert_eq!(end.poll_timeout(), Some(deadline));
        end.handle_timeout(deadline - Duration::from_millis(1))
            .expect("not yet");
        assert!(matches!(
            end.handle_timeout(deadline),
            Err(LinkError::HandshakeTimeout { frame: "HELLO", .. })
        ));
    }

    #[test]
    fn an_edge_that_sends_past_its_credit_is_refused() {
        let now = Instant::now();
        let mut end = up(now, 0, 0);
        // The credit plus one frame may be outstanding, not a byte more.
        let limit = CREDIT + MAX_FRAME as u64;
        let frame = |len: u64| Frame::Batch {
            class: 0,
            batch: Bytes::from(vec![0; len as usize - 6]),
        };
        let mut sent = 0;
        while sent + 500 <= limit {
            end.handle_frame(now, frame(500)).expect("within credit");
            sent += 500;
        }
        let rest = limit - sent;
        if rest > 6 {
            end.handle_frame(now, frame(rest))
                .expect("exactly the credit");
            sent += rest;
        }
        let err = end.handle_frame(now, frame(7)).expect_err("past credit");
        assert!(
            matches!(err, LinkError::PastCredit { sent: s, credit } if s == sent + 7 && credit == limit),
            "{err}"
        );
    }

    #[test]
    fn credit_comes_back_once_acknowledged_so_the_edge_may_send_again() {
        let t0 = Instant::now();
        let mut end = up(t0, 0, 0);
        let big = |n| Frame::Batch {
            class: 0,
            batch: batch(n, n, 3_000),
        };
        end.handle_frame(t0, big(4)).expect("1");
        end.handle_frame(t0, big(5)).expect("2");
        end.handle_frame(t0, big(6)).expect("3");
        // Ingest and acknowledge everything: CREDIT gives back every byte.
        let fx = effects(&mut end);
        assert!(matches!(&fx[..], [Effect::Ingest { batches, .. }] if batches.len() == 3));
        end.ingest_done(Ok(6)).expect("ingest");
        end.handle_timeout(t0 + ACK_INTERVAL).expect("round");
        assert!(matches!(
            effects(&mut end)[..],
            [Effect::Commit { commit: 6, .. }]
        ));
        end.commit_done(Ok(6)).expect("commit");
        let out = frames(&mut end);
        let [Frame::Ack { .. }, Frame::Credit { bytes }] = out[..] else {
            panic!("{out:?}")
        };
        assert_eq!(bytes, 3 * (batch(4, 4, 3_000).len() as u64 + 6));
        // The same again would have been past the credit without that CREDIT.
        for n in 7..=9 {
            end.handle_frame(t0, big(n)).expect("credit given back");
        }
    }

    #[test]
    fn acknowledgements_are_coalesced_one_round_per_ack_interval_newest_commit_per_class() {
        let t0 = Instant::now();
        let mut end = up(t0, 0, 0);
        end.handle_frame(t0, batch_frame(0, 4, 5)).expect("batch");
        assert!(matches!(
            &effects(&mut end)[..],
            [Effect::Ingest { class: 0, batches }] if batches.len() == 1
        ));
        // Batches that come while one group is appended wait for it, then go as one group.
        end.handle_frame(t0, batch_frame(0, 6, 7)).expect("batch");
        end.handle_frame(t0, batch_frame(0, 8, 9)).expect("batch");
        end.handle_frame(t0, batch_frame(2, 1, 1)).expect("batch");
        assert!(effects(&mut end).is_empty());
        end.ingest_done(Ok(5)).expect("ingest");
        let fx = effects(&mut end);
        assert!(
            matches!(&fx[..], [Effect::Ingest { class: 0, batches }] if batches.len() == 2),
            "{fx:?}"
        );
        end.ingest_done(Ok(9)).expect("ingest");
        // Another class is another group.
        assert!(matches!(
            &effects(&mut end)[..],
            [Effect::Ingest { class: 2, .. }]
        ));
        end.ingest_done(Ok(1)).expect("ingest");
        // Nothing is acknowledged before the interval since the last round (here: since
        // the link came up) is over.
        let t1 = t0 + Duration::from_millis(3);
        assert_eq!(end.poll_timeout(), Some(t0 + ACK_INTERVAL));
        end.handle_timeout(t1).expect("early");
        assert!(effects(&mut end).is_empty());
        assert!(frames(&mut end).is_empty());
        end.handle_timeout(t0 + ACK_INTERVAL).expect("round");
        // One commit per class, the newest: 9 covers 5.
        let Some(Effect::Commit {
            class: 0,
            commit: 9,
        }) = end.poll_effect()
        else {
            panic!("commit of class 0")
        };
        // One commit at a time.
        assert!(end.poll_effect().is_none());
        // What is appended during the round waits for the next one.
        end.handle_frame(t0, batch_frame(0, 10, 10)).expect("batch");
        let _ = effects(&mut end);
        end.ingest_done(Ok(10)).expect("ingest");
        end.commit_done(Ok(9)).expect("commit");
        assert_eq!(
            frames(&mut end),
            vec![Frame::Ack {
                class: 0,
                committed_seq: 9
            }]
        );
        let Some(Effect::Commit {
            class: 2,
            commit: 1,
        }) = end.poll_effect()
        else {
            panic!("commit of class 2")
        };
        end.commit_done(Ok(1)).expect("commit");
        let out = frames(&mut end);
        assert!(
            matches!(
                out[..],
                [
                    Frame::Ack {
                        class: 2,
                        committed_seq: 1
                    },
                    Frame::Credit { .. }
                ]
            ),
            "{out:?}"
        );
        assert!(matches!(
            effects(&mut end)[..],
            [Effect::Acknowledged { records: 7, .. }]
        ));
        // The next round: ACK_INTERVAL after the last one started.
        let t2 = t0 + ACK_INTERVAL + Duration::from_millis(4);
        assert_eq!(end.poll_timeout(), Some(t0 + 2 * ACK_INTERVAL));
        end.handle_timeout(t2).expect("early");
        assert!(end.poll_effect().is_none());
        end.handle_timeout(t0 + 2 * ACK_INTERVAL).expect("round");
        assert!(matches!(
            end.poll_effect(),
            Some(Effect::Commit {
                class: 0,
                commit: 10
            })
        ));
    }

    #[test]
    fn a_failed_append_or_commit_gets_goaway_unavailable() {
        let t0 = Instant::now();
        let mut end = up(t0, 0, 0);
        end.handle_frame(t0, batch_frame(0, 4, 4)).expect("batch");
        let _ = effects(&mut end);
        let err = end.ingest_done(Err("disk full".into())).expect_err("fails");
        assert!(matches!(err, LinkError::Ingest(ref why) if why == "disk full"));
        assert!(matches!(
            frames(&mut end)[..],
            [Frame::GoAway {
                code: GoAwayCode::Unavailable,
                ..
            }]
        ));

        let mut end = up(t0, 0, 0);
        end.handle_frame(t0, batch_frame(0, 4, 4)).expect("batch");
        let _ = effects(&mut end);
        end.ingest_done(Ok(4)).expect("ingest");
        end.handle_timeout(t0 + ACK_INTERVAL).expect("round");
        let _ = effects(&mut end);
        assert!(end.commit_done(Err("meta".into())).is_err());
        // No ACK for what did not commit.
        assert!(matches!(
            frames(&mut end)[..],
            [Frame::GoAway {
                code: GoAwayCode::Unavailable,
                ..
            }]
        ));
    }

    #[test]
    fn a_full_batch_queue_stops_reading_and_a_full_commit_queue_stops_appending() {
        let t0 = Instant::now();
        let mut end = End::new(
            CloudEndConfig {
                credit_bytes: 1 << 20,
                ..config()
            },
            t0,
        );
        end.handle_frame(t0, hello(VERSION, 0)).expect("hello");
        let _ = effects(&mut end);
        end.welcome(t0, vec![], 0);
        frames(&mut end);
        end.handle_frame(t0, batch_frame(0, 4, 4)).expect("batch");
        let _ = effects(&mut end);
        // While that group is appended, batches queue up to QUEUED_BATCHES.
        for i in 0..QUEUED_BATCHES as u64 {
            assert!(end.wants_frames());
            end.handle_frame(t0, batch_frame(1, i + 1, i + 1))
                .expect("batch");
        }
        assert!(!end.wants_frames());
        end.ingest_done(Ok(4)).expect("ingest");
        let _ = effects(&mut end);
        assert!(end.wants_frames());

        // Appended groups wait for a round, at most QUEUED_COMMITS of them.
        let mut end = up(t0, 0, 0);
        for i in 0..QUEUED_COMMITS as u64 + 1 {
            // Alternate classes so each batch is a group of its own.
            end.handle_frame(t0, batch_frame((i % 2) as u8, i + 4, i + 4))
                .expect("batch");
            let fx = effects(&mut end);
            if i < QUEUED_COMMITS as u64 {
                assert!(matches!(fx[..], [Effect::Ingest { .. }]), "{i}: {fx:?}");
                end.ingest_done(Ok(i + 4)).expect("ingest");
            } else {
                assert!(fx.is_empty(), "append held back: {fx:?}");
            }
        }
        end.handle_timeout(t0 + ACK_INTERVAL).expect("round");
        assert!(effects(&mut end)
            .iter()
            .any(|e| matches!(e, Effect::Ingest { .. })));
    }

    /// A downlink batch whose last offset is `last`.
    fn down(first: u64, last: u64) -> Bytes {
        batch(first, last, 1)
    }

    #[test]
    fn the_downlink_starts_from_the_further_of_the_edge_and_the_cloud_and_keeps_its_window() {
        let t0 = Instant::now();
        // `up` checks the first read: after the further of the edge's and the cloud's.
        let _ = up(t0, 50, 40);
        let mut end = up(t0, 10, 40);
        // One read at a time.
        end.downlink_changed();
        assert!(effects(&mut end).is_empty());
        // A read with nothing for this edge moves on without a frame.
        end.downlink_read(100, None);
        assert!(frames(&mut end).is_empty());
        assert!(matches!(
            effects(&mut end)[..],
            [Effect::ReadDown { after: 100 }]
        ));
        // DOWN up to 40 + DOWN_WINDOW - 1: the window is not full yet.
        end.downlink_read(200, Some(down(101, 40 + DOWN_WINDOW - 1)));
        assert!(matches!(frames(&mut end)[..], [Frame::Down { .. }]));
        assert!(matches!(
            effects(&mut end)[..],
            [Effect::ReadDown { after: 200 }]
        ));
        end.downlink_read(300, Some(down(201, 40 + DOWN_WINDOW)));
        assert!(matches!(frames(&mut end)[..], [Frame::Down { .. }]));
        // DOWN_WINDOW sequences unacknowledged: no read, even if the downlink changed.
        assert!(effects(&mut end).is_empty());
        end.downlink_changed();
        assert!(effects(&mut end).is_empty());
        // The edge's DOWN_ACK is recorded first; only then does the window move.
        end.handle_frame(t0, Frame::DownAck { seq: 41 })
            .expect("down ack");
        assert_eq!(effects(&mut end), vec![Effect::RecordDownAck { seq: 41 }]);
        // An older DOWN_ACK is no news.
        end.handle_frame(t0, Frame::DownAck { seq: 30 })
            .expect("down ack");
        assert!(effects(&mut end).is_empty());
        end.down_ack_recorded(41);
        assert_eq!(effects(&mut end), vec![Effect::ReadDown { after: 300 }]);
    }

    #[test]
    fn frames_waiting_for_the_writer_hold_back_commits_and_downlink_reads() {
        let t0 = Instant::now();
        let mut end = End::new(config(), t0);
        end.handle_frame(t0, hello(VERSION, 0)).expect("hello");
        let _ = effects(&mut end);
        end.welcome(t0, vec![], 0);
        // WELCOME is not taken yet: no downlink read.
        assert!(effects(&mut end).is_empty());
        assert_eq!(frames(&mut end).len(), 1);
        assert!(matches!(
            effects(&mut end)[..],
            [Effect::ReadDown { after: 0 }]
        ));
    }
}
