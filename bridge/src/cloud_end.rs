//! [`CloudEnd`]: the cloud's end of one link as a state machine, without I/O (the shape of
//! quinn-proto's `Connection`; `cloud_listener.rs` is its driver). It takes the edge's frames
//! ([`CloudEnd::handle_frame`]), the completions of the ingest path and the downlink, and the
//! time; it gives frames to send ([`CloudEnd::poll_transmit`]), work for the driver
//! ([`CloudEnd::poll_effect`]) and its next deadline ([`CloudEnd::poll_timeout`]). It checks
//! the version and the credit, groups batches for the ingest path, coalesces
//! acknowledgements (one round per [`ACK_INTERVAL`]), and keeps the downlink within
//! [`DOWN_WINDOW`].
//!
//! `C` is the driver's handle of an appended group's metadata commit (a future in
//! `cloud_listener.rs`); the machine only keeps it in order and hands back the newest per
//! class.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bytes::Bytes;
use ferry_protocol::kafka::BatchHeader;
use ferry_protocol::link_frames::{EdgeStatus, Frame, GoAwayCode, MIN_VERSION, VERSION};

use crate::error::{frame_name, LinkError, SinkError};

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
    /// [`CloudEnd::refuse`]. `down_acked`: the downlink sequence the edge says it applied;
    /// `version`: the link version spoken (the edge's).
    Hello {
        software: String,
        down_acked: u64,
        version: u16,
    },
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
    /// The edge told its figures (STATUS, version 2 on): for the admin API.
    Status(EdgeStatus),
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
    /// The version the link speaks: the edge's, once its HELLO is taken.
    version: u16,
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
            version: VERSION,
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
                if !(MIN_VERSION..=VERSION).contains(&version) {
                    self.transmit.push_back(Frame::GoAway {
                        code: GoAwayCode::UnsupportedVersion,
                        reason: format!(
                            "this cloud speaks link versions {MIN_VERSION} to {VERSION}"
                        ),
                    });
                    self.state = State::Closed;
                    return Err(LinkError::VersionMismatch {
                        ours: VERSION,
                        theirs: version,
                    });
                }
                self.version = version;
                self.state = State::Hello { down_acked };
                self.effects.push_back(Effect::Hello {
                    software,
                    down_acked,
                    version,
                });
                Ok(())
            }
            (State::Up, Frame::Status(status)) if self.version >= 2 => {
                self.effects.push_back(Effect::Status(status));
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
            version: self.version,
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
    pub fn ingest_done(&mut self, result: Result<C, SinkError>) -> Result<(), LinkError> {
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
    pub fn commit_done(&mut self, result: Result<u64, SinkError>) -> Result<(), LinkError> {
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

    fn unavailable(&mut self, why: SinkError) -> LinkError {
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
mod tests;
