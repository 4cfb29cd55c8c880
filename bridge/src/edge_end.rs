//! [`EdgeEnd`]: the edge's end of the link as a state machine, without I/O (the shape of
//! quinn-proto's `Connection`; `edge_dialer.rs` is its driver). It takes frames from the cloud
//! ([`EdgeEnd::handle_frame`]), the outbox's reads ([`EdgeEnd::read_done`]) and the time
//! ([`EdgeEnd::handle_timeout`]), and gives frames to send ([`EdgeEnd::poll_transmit`]),
//! work for the driver ([`EdgeEnd::poll_effect`]) and its next deadline
//! ([`EdgeEnd::poll_timeout`]). It decides what to resume from, what the credit allows,
//! what an ACK deletes, when the link is stalled, and what the downlink applies.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use ferry_protocol::kafka::Compression;
use ferry_protocol::link_frames::{EdgeStatus, Frame, GoAwayCode, MIN_VERSION};

use crate::error::{frame_name, LinkError};
use crate::records::{batches, down_records};
pub use crate::records::{Cursors, OutRecord};

/// What the edge's end needs to know of its configuration.
#[derive(Debug, Clone)]
pub struct EdgeEndConfig {
    /// At most this many bytes of records in one BATCH frame (also bounded by the cloud's
    /// `max_frame_bytes`, less 1 KiB for framing). Default 1 MiB.
    pub max_batch_bytes: usize,
    pub compression: Compression,
    /// Records unacknowledged for this long: the link is stalled. Default 30 s.
    pub stall_timeout: Duration,
    /// How long to wait for WELCOME (the idle timeout, 30 s by default).
    pub handshake_timeout: Duration,
    /// Sent in HELLO, for the cloud's logs.
    pub software: String,
    /// The link version to announce in HELLO (`link_frames::VERSION`, or lower for a cloud
    /// that refused it).
    pub version: u16,
    /// How often to tell the cloud the edge's figures (STATUS, version 2 on). Default 5 s.
    pub status_interval: Duration,
}

/// What the driver does for the edge's end, in the order given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// The cloud welcomed the link (for the link's status).
    Connected,
    /// Read the outbox: records of the highest class that has some after its cursor in
    /// `after`, about `max_bytes` of them, and give them to [`EdgeEnd::read_done`].
    /// `blocking`: a backlog that may need the disk, so read it off the I/O thread.
    Read {
        after: Box<Cursors>,
        max_bytes: usize,
        blocking: bool,
    },
    /// The cloud has every record of `class` up to `seq` durable: delete them from the
    /// outbox.
    Delete { class: u8, seq: u64 },
    /// The cloud acknowledged `records` sent on this link (for metrics); follows the
    /// [`Effect::Delete`] of an ACK.
    Acknowledged { records: u64 },
    /// Publish these downlink messages on the edge and record `seq` (the last one's) as
    /// applied, durably; then call [`EdgeEnd::down_applied`]. One at a time: what DOWN
    /// frames bring meanwhile waits in the end and comes as the next ApplyDown. Applying may
    /// take long (a local subscriber without room holds it back): the driver goes on
    /// meanwhile with everything else, frames included (see [`EdgeEnd::wants_frames`]).
    ApplyDown { seq: u64, messages: Vec<OutRecord> },
    /// A BATCH frame was queued (for metrics): its records and its bytes on the wire.
    Sent { records: u64, bytes: u64 },
    /// Gather the edge's figures and give them to [`EdgeEnd::status_ready`] (for a STATUS
    /// frame). One at a time; the link goes on meanwhile.
    Status,
}

/// The edge's end of one link (one connection), from HELLO to its end.
#[derive(Debug)]
pub struct EdgeEnd {
    config: EdgeEndConfig,
    state: State,
    transmit: VecDeque<Frame>,
    effects: VecDeque<Effect>,
    /// Bytes of BATCH frames the cloud still takes; below 0 after a read that overshot.
    credit: i64,
    max_batch_bytes: usize,
    /// Per class: the highest sequence sent on this link (or committed before it).
    sent: Cursors,
    /// Per class: the highest sequence the cloud acknowledged.
    acked: Cursors,
    /// Per class, batches sent and not yet acknowledged: (last sequence, records).
    unacked: Vec<VecDeque<(u64, u64)>>,
    unacked_batches: usize,
    /// When the cloud last acknowledged something, or records started waiting for it.
    last_progress: Instant,
    /// Something may be readable: the outbox should be read when credit allows.
    read_wanted: bool,
    reading: bool,
    last_read_small: bool,
    /// The highest downlink sequence applied, durably.
    down_applied: u64,
    /// The highest downlink sequence taken from DOWN frames (applied, being applied, or
    /// queued).
    down_taken: u64,
    /// The [`Effect::ApplyDown`] being applied: its sequence.
    down_applying: Option<u64>,
    /// Downlink messages that came while one was being applied, in order, and their bytes
    /// (topic and payload).
    down_queued: Vec<OutRecord>,
    down_queued_bytes: usize,
    made_progress: bool,
    /// The version the cloud welcomed the link with.
    version: u16,
    /// When to ask for the next STATUS (version 2 on, once up), unless one is being
    /// gathered.
    next_status: Option<Instant>,
    status_gathering: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// HELLO sent; WELCOME awaited until the deadline.
    Handshake {
        deadline: Instant,
    },
    Up,
    /// GOAWAY sent (shutdown): nothing more to do.
    Closed,
}

impl EdgeEnd {
    /// A new link, with HELLO queued. `down_applied`: the highest downlink sequence
    /// applied on the edge, durably (0: none).
    pub fn new(config: EdgeEndConfig, now: Instant, down_applied: u64) -> Self {
        let mut transmit = VecDeque::new();
        transmit.push_back(Frame::Hello {
            version: config.version,
            max_frame_bytes: MAX_FRAME_BYTES as u32,
            down_acked: down_applied,
            software: config.software.clone(),
        });
        let deadline = now + config.handshake_timeout;
        Self {
            max_batch_bytes: config.max_batch_bytes,
            config,
            state: State::Handshake { deadline },
            transmit,
            effects: VecDeque::new(),
            credit: 0,
            sent: [0; 256],
            acked: [0; 256],
            unacked: vec![VecDeque::new(); 256],
            unacked_batches: 0,
            last_progress: now,
            read_wanted: false,
            reading: false,
            last_read_small: false,
            down_applied,
            down_taken: down_applied,
            down_applying: None,
            down_queued: Vec::new(),
            down_queued_bytes: 0,
            made_progress: false,
            version: MIN_VERSION,
            next_status: None,
            status_gathering: false,
        }
    }

    /// A frame from the cloud. An error ends the link (after what
    /// [`EdgeEnd::poll_transmit`] still gives, a GOAWAY for a protocol error).
    pub fn handle_frame(&mut self, now: Instant, frame: Frame) -> Result<(), LinkError> {
        match self.state {
            State::Handshake { .. } => self.handle_welcome(now, frame),
            State::Up => {
                // Any frame may change what can be sent (CREDIT does): read again.
                self.read_wanted = true;
                self.handle_up(now, frame)
            }
            State::Closed => Ok(()),
        }
    }

    fn handle_welcome(&mut self, now: Instant, frame: Frame) -> Result<(), LinkError> {
        let (credit, peer_max_frame, committed) = match frame {
            Frame::Welcome {
                version,
                max_frame_bytes,
                credit_bytes,
                committed,
            } => {
                // The cloud speaks ours or an older one that we speak too.
                if !(MIN_VERSION..=self.config.version).contains(&version) {
                    return Err(LinkError::VersionMismatch {
                        ours: self.config.version,
                        theirs: version,
                    });
                }
                self.version = version;
                (credit_bytes as i64, max_frame_bytes as usize, committed)
            }
            Frame::GoAway { code, reason } => return Err(LinkError::Refused { code, reason }),
            other => return Err(LinkError::UnexpectedFrame(frame_name(&other))),
        };
        self.state = State::Up;
        self.credit = credit;
        self.max_batch_bytes = self
            .config
            .max_batch_bytes
            .min(peer_max_frame.saturating_sub(1024))
            .max(1024);
        self.effects.push_back(Effect::Connected);
        // Resume each class after what the cloud has: that much is deleted here too.
        for (class, seq) in committed {
            self.sent[class as usize] = seq;
            self.acked[class as usize] = seq;
            self.effects.push_back(Effect::Delete { class, seq });
        }
        self.last_progress = now;
        self.read_wanted = true;
        if self.version >= 2 {
            // The first STATUS as soon as the link is up: the cloud's view of the edge is
            // current from the start.
            self.next_status = Some(now);
        }
        Ok(())
    }

    fn handle_up(&mut self, now: Instant, frame: Frame) -> Result<(), LinkError> {
        match frame {
            Frame::Ack {
                class,
                committed_seq,
            } => {
                let c = class as usize;
                // A duplicate or an older ACK (acks are cumulative): nothing new.
                if committed_seq <= self.acked[c] {
                    return Ok(());
                }
                if committed_seq > self.sent[c] {
                    return Err(LinkError::AckPastSent {
                        class,
                        acked: committed_seq,
                        sent: self.sent[c],
                    });
                }
                self.acked[c] = committed_seq;
                let mut records = 0;
                while let Some(&(last, n)) = self.unacked[c].front() {
                    if last > committed_seq {
                        break;
                    }
                    records += n;
                    self.unacked[c].pop_front();
                    self.unacked_batches -= 1;
                }
                self.effects.push_back(Effect::Delete {
                    class,
                    seq: committed_seq,
                });
                self.effects.push_back(Effect::Acknowledged { records });
                self.last_progress = now;
                self.made_progress = true;
            }
            Frame::Credit { bytes } => self.credit = self.credit.saturating_add(bytes as i64),
            Frame::Down { batch } => {
                let fresh = down_records(&batch, self.down_taken)?;
                match fresh.last().map(|r| r.seq) {
                    Some(last) => {
                        self.down_taken = last;
                        self.down_queued_bytes += fresh
                            .iter()
                            .map(|r| r.topic.len() + r.payload.len())
                            .sum::<usize>();
                        self.down_queued.extend(fresh);
                        self.apply_queued_down();
                    }
                    // Nothing new: acknowledge again what is applied.
                    None => self.transmit.push_back(Frame::DownAck {
                        seq: self.down_applied,
                    }),
                }
            }
            Frame::GoAway { code, reason } => return Err(LinkError::GoneAway { code, reason }),
            other => {
                self.transmit.push_back(Frame::GoAway {
                    code: GoAwayCode::ProtocolError,
                    reason: "unexpected frame".into(),
                });
                return Err(LinkError::UnexpectedFrame(frame_name(&other)));
            }
        }
        Ok(())
    }

    /// What an [`Effect::Read`] read: the class and its records, or None if there was
    /// nothing to send.
    pub fn read_done(&mut self, now: Instant, read: Option<(u8, Vec<OutRecord>)>) {
        self.reading = false;
        self.last_read_small = match &read {
            Some((_, records)) => {
                records
                    .iter()
                    .map(|r| r.payload.len() + r.topic.len())
                    .sum::<usize>()
                    < SMALL_READ_BYTES / 2
            }
            None => true,
        };
        let Some((class, records)) = read.filter(|(_, r)| !r.is_empty()) else {
            self.read_wanted = false;
            return;
        };
        if self.state != State::Up {
            return;
        }
        for batch in batches(&records, self.config.compression) {
            // The frame's length (u32), type (u8), class (u8) and the batch.
            let wire = batch.bytes.len() as u64 + 6;
            self.credit -= wire as i64;
            if self.unacked_batches == 0 {
                self.last_progress = now;
            }
            self.unacked[class as usize].push_back((batch.last_seq, batch.records));
            self.unacked_batches += 1;
            self.effects.push_back(Effect::Sent {
                records: batch.records,
                bytes: wire,
            });
            self.transmit.push_back(Frame::Batch {
                class,
                batch: batch.bytes,
            });
        }
        if let Some(last) = records.last() {
            self.sent[class as usize] = last.seq;
        }
        self.read_wanted = true;
    }

    /// What an [`Effect::Status`] gathered: queues the STATUS frame (None: the figures
    /// could not be had this time; the next are asked for after the interval).
    pub fn status_ready(&mut self, now: Instant, status: Option<EdgeStatus>) {
        self.status_gathering = false;
        if let Some(status) = status.filter(|_| self.state == State::Up) {
            self.transmit.push_back(Frame::Status(status));
        }
        self.next_status = Some(now + self.config.status_interval);
    }

    /// The version the link speaks: the cloud's answer to HELLO (before it, the oldest).
    pub fn version(&self) -> u16 {
        self.version
    }

    /// Records were added to the outbox.
    pub fn outbox_added(&mut self) {
        self.read_wanted = true;
    }

    /// An [`Effect::ApplyDown`] is done: its messages are published and `seq` is durable.
    /// The downlink that came meanwhile is the next ApplyDown.
    pub fn down_applied(&mut self, seq: u64) {
        self.down_applied = self.down_applied.max(seq);
        self.transmit.push_back(Frame::DownAck {
            seq: self.down_applied,
        });
        self.down_applying = None;
        self.apply_queued_down();
    }

    /// The queued downlink as the next [`Effect::ApplyDown`], unless one is being applied.
    fn apply_queued_down(&mut self) {
        if self.down_applying.is_some() {
            return;
        }
        let Some(last) = self.down_queued.last().map(|r| r.seq) else {
            return;
        };
        self.down_applying = Some(last);
        self.down_queued_bytes = 0;
        self.effects.push_back(Effect::ApplyDown {
            seq: last,
            messages: std::mem::take(&mut self.down_queued),
        });
    }

    /// Whether the driver should read the cloud's next frame: not while more than
    /// [`MAX_DOWN_QUEUED_BYTES`] of downlink wait behind the one being applied (then the
    /// link waits for the edge, as QUIC's flow control makes the cloud wait for it).
    pub fn wants_frames(&self) -> bool {
        self.down_queued_bytes <= MAX_DOWN_QUEUED_BYTES
    }

    /// The edge is shutting down: queues GOAWAY; nothing more happens on this link.
    pub fn shutdown(&mut self) {
        self.state = State::Closed;
        self.transmit.push_back(Frame::GoAway {
            code: GoAwayCode::Shutdown,
            reason: "the edge is shutting down".into(),
        });
    }

    /// The next frame to send to the cloud.
    pub fn poll_transmit(&mut self) -> Option<Frame> {
        self.transmit.pop_front()
    }

    /// The next thing the driver should do; call until None after every input.
    pub fn poll_effect(&mut self) -> Option<Effect> {
        if let Some(effect) = self.effects.pop_front() {
            return Some(effect);
        }
        if self.state != State::Up || !self.read_wanted || self.reading || self.credit <= 0 {
            return None;
        }
        self.reading = true;
        let budget = (self.credit as usize).min(self.max_batch_bytes);
        // Live traffic (the last read was small: the records are fresh, in the page cache)
        // may be read on the I/O thread; a backlog off it, where a read of a megabyte from
        // disk cannot hold up the edge's clients.
        Some(if self.last_read_small {
            Effect::Read {
                after: Box::new(self.sent),
                max_bytes: budget.min(SMALL_READ_BYTES),
                blocking: false,
            }
        } else {
            Effect::Read {
                after: Box::new(self.sent),
                max_bytes: budget,
                blocking: true,
            }
        })
    }

    /// When [`EdgeEnd::handle_timeout`] should be called next: the handshake's deadline, or
    /// the sooner of the stall deadline while records are unacknowledged and the next
    /// STATUS.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.state {
            State::Handshake { deadline } => Some(deadline),
            State::Up => {
                let stall = (self.unacked_batches > 0)
                    .then(|| self.last_progress + self.config.stall_timeout);
                let status = self.next_status.filter(|_| !self.status_gathering);
                match (stall, status) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                }
            }
            State::Closed => None,
        }
    }

    /// The time has come (or passed) that [`EdgeEnd::poll_timeout`] gave: an error if the
    /// cloud did not welcome the link in time or the link is stalled; the figures for the
    /// next STATUS asked for ([`Effect::Status`]) when it is due.
    pub fn handle_timeout(&mut self, now: Instant) -> Result<(), LinkError> {
        if self.state == State::Up
            && !self.status_gathering
            && self.next_status.is_some_and(|t| now >= t)
        {
            self.status_gathering = true;
            self.effects.push_back(Effect::Status);
        }
        match self.state {
            State::Handshake { deadline } if now >= deadline => Err(LinkError::HandshakeTimeout {
                frame: "WELCOME",
                secs: self.config.handshake_timeout.as_secs(),
            }),
            State::Up
                if self.unacked_batches > 0
                    && now >= self.last_progress + self.config.stall_timeout =>
            {
                Err(LinkError::Stalled {
                    secs: self.config.stall_timeout.as_secs(),
                })
            }
            _ => Ok(()),
        }
    }

    /// The cloud acknowledged something on this link (the reconnect backoff starts over).
    pub fn made_progress(&self) -> bool {
        self.made_progress
    }

    /// The cloud welcomed the link and it has not been shut down.
    pub fn is_up(&self) -> bool {
        self.state == State::Up
    }
}

/// A read of at most this many bytes of records may be done on the I/O thread (see
/// [`Effect::Read`]).
const SMALL_READ_BYTES: usize = 64 << 10;

/// The largest frame the edge takes from the cloud (4 MiB; the reader's buffer may grow to
/// this).
pub const MAX_FRAME_BYTES: usize = 4 << 20;

/// Downlink bytes (topics and payloads) that may wait in the end behind the one being
/// applied before the driver stops reading frames (and so stops taking ACKs too) until it
/// is applied: 4 MiB, one full frame. The cloud sends at most 1,024 sequences
/// unacknowledged, so this is reached only by large downlink messages for a subscriber
/// that has had no room for long; memory stays at this plus a frame.
pub const MAX_DOWN_QUEUED_BYTES: usize = 4 << 20;

#[cfg(test)]
mod tests;
