//! [`EdgeEnd`]: the edge's end of the link as a state machine, without I/O (the shape of
//! quinn-proto's `Connection`; `client.rs` is its driver). It takes frames from the cloud
//! ([`EdgeEnd::handle_frame`]), the outbox's reads ([`EdgeEnd::read_done`]) and the time
//! ([`EdgeEnd::handle_timeout`]), and gives frames to send ([`EdgeEnd::poll_transmit`]),
//! work for the driver ([`EdgeEnd::poll_effect`]) and its next deadline
//! ([`EdgeEnd::poll_timeout`]). It decides what to resume from, what the credit allows,
//! what an ACK deletes, when the link is stalled, and what the downlink applies.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bytes::Bytes;
use ferry_protocol::kafka::{BatchBuilder, Compression, Header};
use ferry_protocol::link::{Frame, GoAwayCode, VERSION};

use crate::error::{frame_name, LinkError};

/// One record of the outbox, as the link sends it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutRecord {
    /// Its sequence number: increasing within its class.
    pub seq: u64,
    /// When the edge accepted it (ms since the Unix epoch).
    pub timestamp_ms: i64,
    pub topic: String,
    pub payload: Bytes,
    /// The MQTT metadata as record headers (`ferry_protocol::kafka::mqtt`).
    pub headers: Vec<(String, Option<Bytes>)>,
}

impl OutRecord {
    /// Its headers as a record batch takes them.
    pub fn header_refs(&self) -> Vec<Header<'_>> {
        self.headers
            .iter()
            .map(|(key, value)| Header {
                key,
                value: value.as_deref(),
            })
            .collect()
    }
}

/// Cursor per priority class: the highest sequence sent (or committed) in it.
pub type Cursors = [u64; 256];

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
    /// applied, durably; then call [`EdgeEnd::down_applied`].
    ApplyDown { seq: u64, messages: Vec<OutRecord> },
    /// A BATCH frame was queued (for metrics): its records and its bytes on the wire.
    Sent { records: u64, bytes: u64 },
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
    /// The highest downlink sequence handed to [`Effect::ApplyDown`].
    down_taken: u64,
    made_progress: bool,
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
            version: VERSION,
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
            made_progress: false,
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
                if version != VERSION {
                    return Err(LinkError::VersionMismatch {
                        ours: VERSION,
                        theirs: version,
                    });
                }
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
                        self.effects.push_back(Effect::ApplyDown {
                            seq: last,
                            messages: fresh,
                        });
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

    /// Records were added to the outbox.
    pub fn outbox_added(&mut self) {
        self.read_wanted = true;
    }

    /// An [`Effect::ApplyDown`] is done: its messages are published and `seq` is durable.
    pub fn down_applied(&mut self, seq: u64) {
        self.down_applied = self.down_applied.max(seq);
        self.transmit.push_back(Frame::DownAck {
            seq: self.down_applied,
        });
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
    /// the stall deadline while records are unacknowledged.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.state {
            State::Handshake { deadline } => Some(deadline),
            State::Up if self.unacked_batches > 0 => {
                Some(self.last_progress + self.config.stall_timeout)
            }
            State::Up | State::Closed => None,
        }
    }

    /// The time has come (or passed) that [`EdgeEnd::poll_timeout`] gave: an error if the
    /// cloud did not welcome the link in time or the link is stalled.
    pub fn handle_timeout(&mut self, now: Instant) -> Result<(), LinkError> {
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

/// The downlink messages of a DOWN batch after `applied`, in order.
fn down_records(batch: &[u8], applied: u64) -> Result<Vec<OutRecord>, LinkError> {
    let plain = ferry_protocol::kafka::uncompressed(batch, MAX_FRAME_BYTES * 16)?;
    let mut out = Vec::new();
    for r in ferry_protocol::kafka::records(&plain)? {
        let r = r?;
        let seq = u64::try_from(r.offset).map_err(|_| LinkError::BadDownRecord {
            offset: r.offset,
            what: "a negative sequence",
        })?;
        if seq <= applied {
            continue;
        }
        let topic =
            r.key
                .and_then(|k| std::str::from_utf8(k).ok())
                .ok_or(LinkError::BadDownRecord {
                    offset: r.offset,
                    what: "no topic",
                })?;
        out.push(OutRecord {
            seq,
            timestamp_ms: r.timestamp,
            topic: topic.to_owned(),
            payload: Bytes::copy_from_slice(r.value.unwrap_or_default()),
            headers: r
                .headers
                .iter()
                .map(|h| (h.key.to_owned(), h.value.map(Bytes::copy_from_slice)))
                .collect(),
        });
    }
    Ok(out)
}

struct OutBatch {
    bytes: Bytes,
    last_seq: u64,
    records: u64,
}

/// The records as record batches whose offsets are their sequence numbers (a new batch
/// where a gap would not fit an offset delta).
fn batches(records: &[OutRecord], compression: Compression) -> Vec<OutBatch> {
    let mut out = Vec::new();
    let mut rest = records;
    while let Some(first) = rest.first() {
        let size: usize = rest
            .iter()
            .map(|r| r.topic.len() + r.payload.len() + 32)
            .sum();
        let mut b = BatchBuilder::with_capacity(first.timestamp_ms, size);
        let mut n = 0;
        for r in rest {
            let Ok(delta) = i32::try_from(r.seq - first.seq) else {
                break;
            };
            let headers = r.header_refs();
            b.push_at(
                delta,
                r.timestamp_ms,
                Some(r.topic.as_bytes()),
                Some(&r.payload),
                &headers,
            );
            n += 1;
        }
        out.push(OutBatch {
            bytes: b.finish_with(first.seq as i64, compression),
            last_seq: rest[n - 1].seq,
            records: n as u64,
        });
        rest = &rest[n..];
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_protocol::kafka::{records, uncompressed};

    const STALL: Duration = Duration::from_secs(30);

    fn config() -> EdgeEndConfig {
        EdgeEndConfig {
            max_batch_bytes: 1 << 20,
            compression: Compression::None,
            stall_timeout: STALL,
            handshake_timeout: Duration::from_secs(30),
            software: "test".into(),
        }
    }

    fn rec(seq: u64) -> OutRecord {
        OutRecord {
            seq,
            timestamp_ms: 1_000 + seq as i64,
            topic: format!("t/{seq}"),
            payload: Bytes::from(vec![b'x'; 10]),
            headers: vec![("mqtt.qos".into(), Some(Bytes::from_static(b"1")))],
        }
    }

    fn recs(seqs: std::ops::RangeInclusive<u64>) -> Vec<OutRecord> {
        seqs.map(rec).collect()
    }

    fn welcome(credit_bytes: u64, committed: Vec<(u8, u64)>) -> Frame {
        Frame::Welcome {
            version: VERSION,
            max_frame_bytes: 4 << 20,
            credit_bytes,
            committed,
        }
    }

    /// A link the cloud welcomed, HELLO taken off, and the effects of the welcome.
    fn up(now: Instant, credit: u64, committed: Vec<(u8, u64)>) -> (EdgeEnd, Vec<Effect>) {
        let mut end = EdgeEnd::new(config(), now, 0);
        assert!(matches!(end.poll_transmit(), Some(Frame::Hello { .. })));
        end.handle_frame(now, welcome(credit, committed))
            .expect("welcome");
        let effects = effects(&mut end);
        (end, effects)
    }

    fn effects(end: &mut EdgeEnd) -> Vec<Effect> {
        std::iter::from_fn(|| end.poll_effect()).collect()
    }

    fn frames(end: &mut EdgeEnd) -> Vec<Frame> {
        std::iter::from_fn(|| end.poll_transmit()).collect()
    }

    /// The read an effect list asks for: the cursor of `class` and the budget.
    fn read_of(effects: &[Effect], class: u8) -> Option<(u64, usize)> {
        effects.iter().find_map(|e| match e {
            Effect::Read {
                after, max_bytes, ..
            } => Some((after[class as usize], *max_bytes)),
            _ => None,
        })
    }

    fn deletes(effects: &[Effect]) -> Vec<(u8, u64)> {
        effects
            .iter()
            .filter_map(|e| match e {
                Effect::Delete { class, seq, .. } => Some((*class, *seq)),
                _ => None,
            })
            .collect()
    }

    /// The sequences of the BATCH frames, per frame.
    fn batch_seqs(frames: &[Frame]) -> Vec<(u8, Vec<u64>)> {
        frames
            .iter()
            .filter_map(|f| match f {
                Frame::Batch { class, batch } => {
                    let plain = uncompressed(batch, 1 << 20).expect("decompress");
                    let seqs = records(&plain)
                        .expect("records")
                        .map(|r| r.expect("record").offset as u64)
                        .collect();
                    Some((*class, seqs))
                }
                _ => None,
            })
            .collect()
    }

    /// Sends `seqs` of `class` as one read's records; returns the BATCH frames' bytes.
    fn send(end: &mut EdgeEnd, now: Instant, class: u8, seqs: std::ops::RangeInclusive<u64>) {
        end.read_done(now, Some((class, recs(seqs))));
    }

    #[test]
    fn hello_carries_the_downlink_applied_and_the_version() {
        let mut end = EdgeEnd::new(config(), Instant::now(), 42);
        assert_eq!(
            end.poll_transmit(),
            Some(Frame::Hello {
                version: VERSION,
                max_frame_bytes: MAX_FRAME_BYTES as u32,
                down_acked: 42,
                software: "test".into(),
            })
        );
        // Nothing is read before the cloud says where to resume.
        assert_eq!(effects(&mut end), vec![]);
    }

    #[test]
    fn resume_after_partial_acks_sends_from_the_committed_sequence() {
        let t0 = Instant::now();
        let (mut end, fx) = up(t0, 1 << 20, vec![]);
        assert_eq!(read_of(&fx, 0), Some((0, 1 << 20)));
        send(&mut end, t0, 0, 1..=10);
        assert_eq!(batch_seqs(&frames(&mut end)), vec![(0, (1..=10).collect())]);
        // The cloud committed up to 4, then the link went.
        end.handle_frame(
            t0,
            Frame::Ack {
                class: 0,
                committed_seq: 4,
            },
        )
        .expect("ack");
        assert_eq!(deletes(&effects(&mut end)), vec![(0, 4)]);

        // The next link: the cloud's WELCOME says 4 in class 0 and 7 in class 2; the edge
        // deletes that much and reads each class after it, not after what it had sent.
        let (mut end, fx) = up(t0, 1 << 20, vec![(0, 4), (2, 7)]);
        assert_eq!(deletes(&fx), vec![(0, 4), (2, 7)]);
        assert_eq!(fx[0], Effect::Connected);
        assert_eq!(read_of(&fx, 0), Some((4, 1 << 20)));
        assert_eq!(read_of(&fx, 2), Some((7, 1 << 20)));
        send(&mut end, t0, 0, 5..=10);
        assert_eq!(batch_seqs(&frames(&mut end)), vec![(0, (5..=10).collect())]);
        // The next read goes on after what was sent.
        assert_eq!(read_of(&effects(&mut end), 0).map(|r| r.0), Some(10));
    }

    #[test]
    fn one_read_at_a_time_and_none_after_the_outbox_ran_dry_until_records_are_added() {
        let t0 = Instant::now();
        let (mut end, fx) = up(t0, 1 << 20, vec![]);
        assert!(read_of(&fx, 0).is_some());
        // A read is in flight: no second one.
        assert_eq!(effects(&mut end), vec![]);
        end.read_done(t0, None);
        assert_eq!(effects(&mut end), vec![]);
        end.outbox_added();
        let fx = effects(&mut end);
        // The last read was small (empty): live traffic is read on the I/O thread.
        assert!(
            matches!(fx[..], [Effect::Read { blocking: false, max_bytes, .. }] if max_bytes == SMALL_READ_BYTES),
            "{fx:?}"
        );
    }

    #[test]
    fn credit_exhausted_the_edge_stops_sending_until_credit_arrives() {
        let t0 = Instant::now();
        let (mut end, fx) = up(t0, 300, vec![]);
        // The budget of a read is the credit left.
        assert_eq!(read_of(&fx, 0), Some((0, 300)));
        send(&mut end, t0, 0, 1..=5);
        let sent = frames(&mut end);
        let Frame::Batch { batch, .. } = &sent[0] else {
            panic!("{sent:?}")
        };
        let wire = batch.len() as u64 + 6;
        // The frame's size on the wire is what the credit counts.
        let mut encoded = bytes::BytesMut::new();
        sent[0].encode(&mut encoded);
        assert_eq!(encoded.len() as u64, wire);
        assert!(wire < 300);
        // Credit left: the edge reads again, within what is left.
        let fx = effects(&mut end);
        assert_eq!(read_of(&fx, 0), Some((5, 300 - wire as usize)));
        send(&mut end, t0, 0, 6..=10);
        let sent = frames(&mut end);
        let [Frame::Batch { batch, .. }] = &sent[..] else {
            panic!("{sent:?}")
        };
        let wire2 = batch.len() as u64 + 6;
        // The credit is spent (overdrawn): no read, whatever happens, until CREDIT.
        assert!(read_of(&effects(&mut end), 0).is_none());
        end.outbox_added();
        end.handle_frame(
            t0,
            Frame::Ack {
                class: 0,
                committed_seq: 5,
            },
        )
        .expect("ack");
        assert_eq!(deletes(&effects(&mut end)), vec![(0, 5)]);
        assert!(read_of(&effects(&mut end), 0).is_none());
        // Giving back less than the overdraft still leaves nothing to spend.
        let overdraft = wire + wire2 - 300;
        end.handle_frame(t0, Frame::Credit { bytes: overdraft })
            .expect("credit");
        assert_eq!(effects(&mut end), vec![]);
        end.handle_frame(t0, Frame::Credit { bytes: 100 })
            .expect("credit");
        assert_eq!(read_of(&effects(&mut end), 0), Some((10, 100)));
    }

    #[test]
    fn duplicate_and_out_of_order_acks_are_ignored_and_never_move_back() {
        let t0 = Instant::now();
        let (mut end, _) = up(t0, 1 << 20, vec![]);
        send(&mut end, t0, 0, 1..=3);
        let _ = effects(&mut end);
        send(&mut end, t0, 0, 4..=6);
        let _ = effects(&mut end);
        frames(&mut end);
        end.handle_frame(
            t0,
            Frame::Ack {
                class: 0,
                committed_seq: 6,
            },
        )
        .expect("ack");
        let fx = effects(&mut end);
        assert_eq!(
            fx,
            vec![
                Effect::Delete { class: 0, seq: 6 },
                Effect::Acknowledged { records: 6 }
            ]
        );
        // The same ACK again, and an older one arriving late: nothing is deleted again and
        // the acknowledged sequence stays at 6.
        for seq in [6, 3, 5, 6] {
            end.handle_frame(
                t0,
                Frame::Ack {
                    class: 0,
                    committed_seq: seq,
                },
            )
            .expect("old ack");
            assert_eq!(deletes(&effects(&mut end)), vec![], "ack {seq}");
        }
        // Nothing waits for an ACK any more, so no stall deadline.
        assert_eq!(end.poll_timeout(), None);
        // An ACK of a class or sequence never sent is the cloud's error.
        let err = end
            .handle_frame(
                t0,
                Frame::Ack {
                    class: 0,
                    committed_seq: 7,
                },
            )
            .expect_err("past sent");
        assert!(matches!(
            err,
            LinkError::AckPastSent {
                class: 0,
                acked: 7,
                sent: 6
            }
        ));
    }

    #[test]
    fn an_ack_counts_the_records_of_the_batches_it_covers() {
        let t0 = Instant::now();
        let (mut end, _) = up(t0, 1 << 20, vec![]);
        send(&mut end, t0, 0, 1..=3);
        send(&mut end, t0, 0, 4..=6);
        send(&mut end, t0, 1, 1..=2);
        let _ = effects(&mut end);
        end.handle_frame(
            t0,
            Frame::Ack {
                class: 0,
                committed_seq: 5,
            },
        )
        .expect("ack");
        // Batch 4..=6 is not wholly acknowledged yet.
        assert!(effects(&mut end).contains(&Effect::Acknowledged { records: 3 }));
        end.handle_frame(
            t0,
            Frame::Ack {
                class: 0,
                committed_seq: 6,
            },
        )
        .expect("ack");
        assert!(effects(&mut end).contains(&Effect::Acknowledged { records: 3 }));
        // Class 1 still waits: the stall deadline stands.
        assert!(end.poll_timeout().is_some());
        assert!(end.made_progress());
    }

    #[test]
    fn records_unacknowledged_for_the_stall_timeout_stall_the_link() {
        let t0 = Instant::now();
        let (mut end, _) = up(t0, 1 << 20, vec![]);
        // Nothing sent: no deadline, however long the link is quiet.
        assert_eq!(end.poll_timeout(), None);
        end.handle_timeout(t0 + 10 * STALL)
            .expect("idle is no stall");

        let t1 = t0 + Duration::from_secs(100);
        send(&mut end, t1, 0, 1..=3);
        assert_eq!(end.poll_timeout(), Some(t1 + STALL));
        // More sent while waiting does not move the deadline.
        send(&mut end, t1 + Duration::from_secs(5), 0, 4..=6);
        assert_eq!(end.poll_timeout(), Some(t1 + STALL));
        // An ACK is progress: the deadline starts again from it.
        let t2 = t1 + Duration::from_secs(20);
        end.handle_frame(
            t2,
            Frame::Ack {
                class: 0,
                committed_seq: 3,
            },
        )
        .expect("ack");
        assert_eq!(end.poll_timeout(), Some(t2 + STALL));
        end.handle_timeout(t1 + STALL).expect("not stalled yet");
        end.handle_timeout(t2 + STALL - Duration::from_millis(1))
            .expect("not stalled yet");
        let err = end.handle_timeout(t2 + STALL).expect_err("stalled");
        assert!(matches!(err, LinkError::Stalled { secs: 30 }), "{err}");
    }

    #[test]
    fn no_welcome_within_the_handshake_timeout_ends_the_link() {
        let t0 = Instant::now();
        let mut end = EdgeEnd::new(config(), t0, 0);
        let deadline = t0 + Duration::from_secs(30);
        assert_eq!(end.poll_timeout(), Some(deadline));
        end.handle_timeout(deadline - Duration::from_millis(1))
            .expect("not yet");
        assert!(matches!(
            end.handle_timeout(deadline),
            Err(LinkError::HandshakeTimeout {
                frame: "WELCOME",
                ..
            })
        ));
    }

    #[test]
    fn a_refusal_or_another_version_ends_the_handshake() {
        let now = Instant::now();
        let mut end = EdgeEnd::new(config(), now, 0);
        let err = end
            .handle_frame(
                now,
                Frame::GoAway {
                    code: GoAwayCode::Denied,
                    reason: "no".into(),
                },
            )
            .expect_err("refused");
        assert!(matches!(
            err,
            LinkError::Refused {
                code: GoAwayCode::Denied,
                ..
            }
        ));
        let mut end = EdgeEnd::new(config(), now, 0);
        let Frame::Welcome {
            max_frame_bytes,
            credit_bytes,
            committed,
            ..
        } = welcome(1, vec![])
        else {
            unreachable!()
        };
        let err = end
            .handle_frame(
                now,
                Frame::Welcome {
                    version: VERSION + 1,
                    max_frame_bytes,
                    credit_bytes,
                    committed,
                },
            )
            .expect_err("version");
        assert!(
            matches!(err, LinkError::VersionMismatch { ours: VERSION, theirs } if theirs == VERSION + 1)
        );
        assert!(!end.is_up());
    }

    #[test]
    fn an_unexpected_frame_on_a_link_that_is_up_gets_goaway_protocol_error() {
        let now = Instant::now();
        let (mut end, _) = up(now, 1 << 20, vec![]);
        let err = end
            .handle_frame(now, Frame::DownAck { seq: 1 })
            .expect_err("unexpected");
        assert!(matches!(err, LinkError::UnexpectedFrame("DOWN_ACK")));
        assert!(matches!(
            frames(&mut end)[..],
            [Frame::GoAway {
                code: GoAwayCode::ProtocolError,
                ..
            }]
        ));
    }

    fn down_batch(seqs: &[u64]) -> Bytes {
        let mut b = BatchBuilder::with_capacity(0, 256);
        for &s in seqs {
            b.push_at(
                (s - seqs[0]) as i32,
                7,
                Some(format!("d/{s}").as_bytes()),
                Some(b"v"),
                &[],
            );
        }
        b.finish_with(seqs[0] as i64, Compression::None)
    }

    #[test]
    fn the_downlink_is_applied_once_and_acknowledged_after_it_is_durable() {
        let now = Instant::now();
        let mut end = EdgeEnd::new(config(), now, 2);
        frames(&mut end);
        end.handle_frame(now, welcome(1 << 20, vec![]))
            .expect("welcome");
        let _ = effects(&mut end);
        // 1 and 2 were applied before this link: only 3 and 5 are new.
        end.handle_frame(
            now,
            Frame::Down {
                batch: down_batch(&[1, 2, 3, 5]),
            },
        )
        .expect("down");
        let fx = effects(&mut end);
        let Some(Effect::ApplyDown { seq, messages }) = fx.first() else {
            panic!("{fx:?}")
        };
        assert_eq!(*seq, 5);
        let got: Vec<_> = messages.iter().map(|m| (m.seq, m.topic.as_str())).collect();
        assert_eq!(got, vec![(3, "d/3"), (5, "d/5")]);
        // Not acknowledged before it is applied.
        assert_eq!(frames(&mut end), vec![]);
        end.down_applied(5);
        assert_eq!(frames(&mut end), vec![Frame::DownAck { seq: 5 }]);
        // A resend of what is applied: acknowledged again, not applied twice.
        end.handle_frame(
            now,
            Frame::Down {
                batch: down_batch(&[4, 5]),
            },
        )
        .expect("down");
        assert!(!effects(&mut end)
            .iter()
            .any(|e| matches!(e, Effect::ApplyDown { .. })));
        assert_eq!(frames(&mut end), vec![Frame::DownAck { seq: 5 }]);
    }

    #[test]
    fn shutdown_sends_goaway_and_stops_reading() {
        let now = Instant::now();
        let (mut end, _) = up(now, 1 << 20, vec![]);
        end.read_done(now, None);
        end.shutdown();
        end.outbox_added();
        assert_eq!(effects(&mut end), vec![]);
        assert!(matches!(
            frames(&mut end)[..],
            [Frame::GoAway {
                code: GoAwayCode::Shutdown,
                ..
            }]
        ));
    }

    #[test]
    fn record_offsets_are_sequence_numbers_and_a_gap_too_wide_starts_a_new_batch() {
        let recs = vec![
            rec(5),
            rec(6),
            rec(9),
            rec(9 + (1 << 31)),
            rec(10 + (1 << 31)),
        ];
        for compression in [Compression::None, Compression::Lz4, Compression::Zstd] {
            let out = batches(&recs, compression);
            assert_eq!(out.len(), 2);
            assert_eq!((out[0].last_seq, out[0].records), (9, 3));
            assert_eq!((out[1].last_seq, out[1].records), (10 + (1 << 31), 2));
            let mut seqs = Vec::new();
            for b in &out {
                let plain = uncompressed(&b.bytes, 1 << 20).expect("decompress");
                for r in records(&plain).expect("records") {
                    let r = r.expect("record");
                    seqs.push(r.offset as u64);
                    assert_eq!(r.key, Some(format!("t/{}", r.offset).as_bytes()));
                }
            }
            assert_eq!(seqs, recs.iter().map(|r| r.seq).collect::<Vec<_>>());
        }
    }
}
