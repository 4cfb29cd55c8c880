//! The frames of the edge ↔ cloud link, sans-IO. The format is written down in
//! `docs/link-protocol.md`; this module is its reference.
//!
//! A frame is `length (u32, big-endian) | type (u8) | body`, where `length` counts the type
//! byte and the body. Framing is two steps, as for MQTT: [`decode`] refuses a length over
//! the limit from the first four bytes, before it buffers anything, and answers `Ok(None)`
//! while a frame is incomplete.
//!
//! Records travel as Kafka v2 record batches (`crate::kafka::batch`), the unit of the cloud's
//! log. A record's offset in the batch (base offset + offset delta) is its sequence number:
//! per edge and priority class, increasing, with gaps where the edge dropped records
//! (`drop_oldest`) or sent them in another class.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::kafka::batch::{self, BatchError};

/// The newest protocol version this module speaks. Version 2 added [`Frame::Status`].
pub const VERSION: u16 = 2;
/// The oldest version still spoken: a cloud welcomes an edge of any version from this to
/// [`VERSION`] and speaks the edge's; a peer announcing another is refused with
/// [`GoAwayCode::UnsupportedVersion`].
pub const MIN_VERSION: u16 = 1;
/// The ALPN protocol id of the link.
pub const ALPN: &[u8] = b"ferry-link/1";
/// Bytes before a frame's type: its length.
pub const LENGTH_BYTES: usize = 4;

/// One frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// Edge → cloud, first: who speaks what, and which downlink messages it already applied.
    Hello {
        version: u16,
        /// The largest frame the edge accepts.
        max_frame_bytes: u32,
        /// The highest downlink sequence the edge has applied (0: none).
        down_acked: u64,
        /// The edge's software, for the cloud's logs and admin API.
        software: String,
    },
    /// Cloud → edge, the answer to `Hello`: where the edge's data stands in the cloud.
    Welcome {
        version: u16,
        max_frame_bytes: u32,
        /// Bytes of `Batch` frames the edge may send before more credit comes.
        credit_bytes: u64,
        /// Per priority class the cloud knows for this edge, the highest sequence committed
        /// to the log: the edge resumes after it (a class not listed: after 0).
        committed: Vec<(u8, u64)>,
    },
    /// Edge → cloud: records of one priority class, as one record batch whose record offsets
    /// are their sequence numbers.
    Batch { class: u8, batch: Bytes },
    /// Cloud → edge: every record of `class` up to `committed_seq` is durable in the log.
    Ack { class: u8, committed_seq: u64 },
    /// Cloud → edge: `bytes` more of `Batch` frames may be sent.
    Credit { bytes: u64 },
    /// Cloud → edge: messages to publish on the edge, as one record batch whose record
    /// offsets are their downlink sequence numbers.
    Down { batch: Bytes },
    /// Edge → cloud: every downlink message up to `seq` is applied on the edge.
    DownAck { seq: u64 },
    /// Either way: the sender closes the link, and why.
    GoAway { code: GoAwayCode, reason: String },
    /// Edge → cloud (version 2 on): the edge's own figures, every few seconds.
    Status(EdgeStatus),
}

/// What an edge tells the cloud of itself in a [`Frame::Status`]: its outbox and its
/// clients, as the edge counts them.
///
/// On the wire: `count u8, count × (field u8, value u64)`, fields in any order. A receiver
/// takes the fields it knows and skips the others (a newer edge may send more; a field left
/// out is 0), so fields are added without a new version.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EdgeStatus {
    /// Records in the outbox, waiting for the cloud (field 1).
    pub outbox_records: u64,
    /// Bytes they take against the budget (field 2).
    pub outbox_bytes: u64,
    /// The outbox's budget, `max_outbox_bytes` (field 3).
    pub outbox_budget_bytes: u64,
    /// How long ago the oldest record in the outbox was accepted, in ms; 0 when it is empty
    /// (field 4).
    pub oldest_age_ms: u64,
    /// The highest sequence number the edge has given a record: it grows by one for every
    /// record accepted for the cloud, so its rate is the edge's inflow (field 5).
    pub last_seq: u64,
    /// Messages for the cloud refused because the outbox was full (`reject_new`), since the
    /// edge started (field 6).
    pub rejected: u64,
    /// Records deleted from a full outbox (`drop_oldest`), since the edge started (field 7).
    pub dropped: u64,
    /// MQTT clients connected to the edge (field 8).
    pub clients: u64,
}

impl EdgeStatus {
    fn fields(&self) -> [(u8, u64); 8] {
        [
            (1, self.outbox_records),
            (2, self.outbox_bytes),
            (3, self.outbox_budget_bytes),
            (4, self.oldest_age_ms),
            (5, self.last_seq),
            (6, self.rejected),
            (7, self.dropped),
            (8, self.clients),
        ]
    }

    fn set(&mut self, field: u8, value: u64) {
        match field {
            1 => self.outbox_records = value,
            2 => self.outbox_bytes = value,
            3 => self.outbox_budget_bytes = value,
            4 => self.oldest_age_ms = value,
            5 => self.last_seq = value,
            6 => self.rejected = value,
            7 => self.dropped = value,
            8 => self.clients = value,
            // A field of a newer edge.
            _ => {}
        }
    }
}

/// Why a link is closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum GoAwayCode {
    /// Shutting down; reconnect later.
    Shutdown = 0,
    UnsupportedVersion = 1,
    /// A frame that does not decode, or breaks the protocol (credit overrun, a sequence gap).
    ProtocolError = 2,
    /// The edge's identity is on the cloud's deny list.
    Denied = 3,
    /// Another link of the same edge took over.
    Replaced = 4,
    /// The receiver cannot take it now (its storage failed); reconnect later.
    Unavailable = 5,
}

impl GoAwayCode {
    fn from_u16(v: u16) -> Option<Self> {
        Some(match v {
            0 => Self::Shutdown,
            1 => Self::UnsupportedVersion,
            2 => Self::ProtocolError,
            3 => Self::Denied,
            4 => Self::Replaced,
            5 => Self::Unavailable,
            _ => return None,
        })
    }
}

/// A frame that cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LinkError {
    #[error("frame of {size} bytes, over the limit of {max}")]
    TooLarge { size: usize, max: usize },
    #[error("empty frame (no type)")]
    Empty,
    #[error("unknown frame type {0}")]
    UnknownType(u8),
    #[error("{frame} frame: {what}")]
    Malformed {
        frame: &'static str,
        what: &'static str,
    },
    #[error("unknown GOAWAY code {0}")]
    UnknownCode(u16),
    #[error("{frame} frame: {error}")]
    BadBatch {
        frame: &'static str,
        error: BatchError,
    },
}

const HELLO: u8 = 1;
const WELCOME: u8 = 2;
const BATCH: u8 = 3;
const ACK: u8 = 4;
const CREDIT: u8 = 5;
const DOWN: u8 = 6;
const DOWN_ACK: u8 = 7;
const GOAWAY: u8 = 8;
const STATUS: u8 = 9;

impl Frame {
    fn kind(&self) -> u8 {
        match self {
            Frame::Hello { .. } => HELLO,
            Frame::Welcome { .. } => WELCOME,
            Frame::Batch { .. } => BATCH,
            Frame::Ack { .. } => ACK,
            Frame::Credit { .. } => CREDIT,
            Frame::Down { .. } => DOWN,
            Frame::DownAck { .. } => DOWN_ACK,
            Frame::GoAway { .. } => GOAWAY,
            Frame::Status(_) => STATUS,
        }
    }

    /// Appends the frame to `buf`. Strings longer than 65,535 bytes are cut (they are
    /// names and reasons, never data).
    pub fn encode(&self, buf: &mut BytesMut) {
        let start = buf.len();
        buf.put_u32(0);
        buf.put_u8(self.kind());
        match self {
            Frame::Hello {
                version,
                max_frame_bytes,
                down_acked,
                software,
            } => {
                buf.put_u16(*version);
                buf.put_u32(*max_frame_bytes);
                buf.put_u64(*down_acked);
                put_str(buf, software);
            }
            Frame::Welcome {
                version,
                max_frame_bytes,
                credit_bytes,
                committed,
            } => {
                buf.put_u16(*version);
                buf.put_u32(*max_frame_bytes);
                buf.put_u64(*credit_bytes);
                // At most 256 classes exist; a longer list cannot be made by the cloud.
                buf.put_u16(committed.len().min(256) as u16);
                for (class, seq) in committed.iter().take(256) {
                    buf.put_u8(*class);
                    buf.put_u64(*seq);
                }
            }
            Frame::Batch { class, batch } => {
                buf.put_u8(*class);
                buf.put_slice(batch);
            }
            Frame::Down { batch } => buf.put_slice(batch),
            Frame::Ack {
                class,
                committed_seq,
            } => {
                buf.put_u8(*class);
                buf.put_u64(*committed_seq);
            }
            Frame::Credit { bytes: n } | Frame::DownAck { seq: n } => {
                buf.put_u64(*n);
            }
            Frame::GoAway { code, reason } => {
                buf.put_u16(*code as u16);
                put_str(buf, reason);
            }
            Frame::Status(status) => {
                let fields = status.fields();
                buf.put_u8(fields.len() as u8);
                for (field, value) in fields {
                    buf.put_u8(field);
                    buf.put_u64(value);
                }
            }
        }
        let len = (buf.len() - start - LENGTH_BYTES) as u32;
        buf[start..start + LENGTH_BYTES].copy_from_slice(&len.to_be_bytes());
    }
}

/// Takes one whole frame off the front of `buf`: `Ok(None)` (nothing consumed) while it is
/// incomplete. A frame longer than `max_frame_bytes` is refused from its length alone.
/// `Batch` and `Down` bodies must be one whole record batch with a valid CRC, whose offsets
/// (sequence numbers) start at 1 or later.
pub fn decode(buf: &mut BytesMut, max_frame_bytes: usize) -> Result<Option<Frame>, LinkError> {
    if buf.len() < LENGTH_BYTES {
        return Ok(None);
    }
    let len = u32::from_be_bytes(buf[..LENGTH_BYTES].try_into().expect("4 bytes")) as usize;
    if len > max_frame_bytes {
        return Err(LinkError::TooLarge {
            size: len,
            max: max_frame_bytes,
        });
    }
    if len == 0 {
        return Err(LinkError::Empty);
    }
    if buf.len() < LENGTH_BYTES + len {
        buf.reserve(LENGTH_BYTES + len - buf.len());
        return Ok(None);
    }
    buf.advance(LENGTH_BYTES);
    let mut body = buf.split_to(len).freeze();
    let kind = body.get_u8();
    parse(kind, body).map(Some)
}

fn parse(kind: u8, mut b: Bytes) -> Result<Frame, LinkError> {
    let name = match kind {
        HELLO => "HELLO",
        WELCOME => "WELCOME",
        BATCH => "BATCH",
        ACK => "ACK",
        CREDIT => "CREDIT",
        DOWN => "DOWN",
        DOWN_ACK => "DOWN_ACK",
        GOAWAY => "GOAWAY",
        STATUS => "STATUS",
        other => return Err(LinkError::UnknownType(other)),
    };
    let short = |what| LinkError::Malformed { frame: name, what };
    let need = |b: &Bytes, n: usize| {
        if b.remaining() < n {
            Err(short("truncated"))
        } else {
            Ok(())
        }
    };
    let frame = match kind {
        HELLO => {
            need(&b, 2 + 4 + 8)?;
            let (version, max_frame_bytes, down_acked) = (b.get_u16(), b.get_u32(), b.get_u64());
            let software = get_str(&mut b).ok_or_else(|| short("bad software string"))?;
            Frame::Hello {
                version,
                max_frame_bytes,
                down_acked,
                software,
            }
        }
        WELCOME => {
            need(&b, 2 + 4 + 8 + 2)?;
            let (version, max_frame_bytes, credit_bytes) = (b.get_u16(), b.get_u32(), b.get_u64());
            let n = b.get_u16() as usize;
            if n > 256 {
                return Err(short("more than 256 classes"));
            }
            need(&b, n * 9)?;
            let committed = (0..n).map(|_| (b.get_u8(), b.get_u64())).collect();
            Frame::Welcome {
                version,
                max_frame_bytes,
                credit_bytes,
                committed,
            }
        }
        BATCH | DOWN => {
            let class = if kind == BATCH {
                need(&b, 1)?;
                b.get_u8()
            } else {
                0
            };
            let batch = b.split_to(b.len());
            let h = batch::verify_crc(&batch)
                .map_err(|error| LinkError::BadBatch { frame: name, error })?;
            if h.total_len() != batch.len() {
                return Err(short("bytes after the record batch"));
            }
            if h.base_offset < 1 {
                return Err(short("sequence numbers start at 1"));
            }
            if kind == BATCH {
                Frame::Batch { class, batch }
            } else {
                Frame::Down { batch }
            }
        }
        ACK => {
            need(&b, 9)?;
            Frame::Ack {
                class: b.get_u8(),
                committed_seq: b.get_u64(),
            }
        }
        CREDIT | DOWN_ACK => {
            need(&b, 8)?;
            let n = b.get_u64();
            if kind == CREDIT {
                Frame::Credit { bytes: n }
            } else {
                Frame::DownAck { seq: n }
            }
        }
        STATUS => {
            need(&b, 1)?;
            let n = b.get_u8() as usize;
            need(&b, n * 9)?;
            let mut status = EdgeStatus::default();
            for _ in 0..n {
                let field = b.get_u8();
                status.set(field, b.get_u64());
            }
            Frame::Status(status)
        }
        _ => {
            need(&b, 2)?;
            let raw = b.get_u16();
            let code = GoAwayCode::from_u16(raw).ok_or(LinkError::UnknownCode(raw))?;
            let reason = get_str(&mut b).ok_or_else(|| short("bad reason string"))?;
            Frame::GoAway { code, reason }
        }
    };
    if b.has_remaining() {
        return Err(short("bytes after the frame"));
    }
    Ok(frame)
}

fn put_str(buf: &mut BytesMut, s: &str) {
    let mut end = s.len().min(u16::MAX as usize);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    buf.put_u16(end as u16);
    buf.put_slice(&s.as_bytes()[..end]);
}

fn get_str(b: &mut Bytes) -> Option<String> {
    if b.remaining() < 2 {
        return None;
    }
    let n = b.get_u16() as usize;
    if b.remaining() < n {
        return None;
    }
    String::from_utf8(b.split_to(n).to_vec()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kafka::BatchBuilder;

    fn a_batch_at(first_seq: i64) -> Bytes {
        let mut b = BatchBuilder::new(1_000);
        b.push(1_000, Some(b"sensors/t1"), Some(b"21.5"), &[]);
        b.push_at(3, 1_001, Some(b"sensors/t2"), Some(b"19.0"), &[]);
        b.finish(first_seq)
    }

    fn a_batch() -> Bytes {
        a_batch_at(42)
    }

    fn every_frame() -> Vec<Frame> {
        vec![
            Frame::Hello {
                version: VERSION,
                max_frame_bytes: 1 << 20,
                down_acked: 7,
                software: "ferry-edge 0.1.0".into(),
            },
            Frame::Welcome {
                version: VERSION,
                max_frame_bytes: 4 << 20,
                credit_bytes: 8 << 20,
                committed: vec![(0, 41), (9, 40)],
            },
            Frame::Batch {
                class: 9,
                batch: a_batch(),
            },
            Frame::Ack {
                class: 9,
                committed_seq: 45,
            },
            Frame::Credit { bytes: 65_536 },
            Frame::Down { batch: a_batch() },
            Frame::DownAck { seq: 8 },
            Frame::GoAway {
                code: GoAwayCode::Denied,
                reason: "edge gw-9 is revoked".into(),
            },
            Frame::Status(EdgeStatus {
                outbox_records: 120_000,
                outbox_bytes: 9_600_000,
                outbox_budget_bytes: 256 << 20,
                oldest_age_ms: 61_000,
                last_seq: 1_000_042,
                rejected: 3,
                dropped: 4,
                clients: 12,
            }),
        ]
    }

    #[test]
    fn a_status_takes_the_fields_it_knows_and_skips_the_others() {
        // Field 2 (bytes), a field 200 of some newer edge, field 8 (clients); the rest 0.
        let mut body = vec![STATUS, 3, 2];
        body.extend_from_slice(&77u64.to_be_bytes());
        body.push(200);
        body.extend_from_slice(&u64::MAX.to_be_bytes());
        body.push(8);
        body.extend_from_slice(&5u64.to_be_bytes());
        let mut frame = BytesMut::from(&(body.len() as u32).to_be_bytes()[..]);
        frame.extend_from_slice(&body);
        assert_eq!(
            decode(&mut frame, 1024),
            Ok(Some(Frame::Status(EdgeStatus {
                outbox_bytes: 77,
                clients: 5,
                ..EdgeStatus::default()
            })))
        );
        // Fewer bytes than the count says.
        let mut short = BytesMut::from(&[0, 0, 0, 4, STATUS, 1, 1, 0][..]);
        assert!(matches!(
            decode(&mut short, 1024),
            Err(LinkError::Malformed {
                frame: "STATUS",
                what: "truncated"
            })
        ));
    }

    #[test]
    fn every_frame_round_trips_back_to_back_and_every_prefix_is_incomplete() {
        let mut all = BytesMut::new();
        for f in every_frame() {
            f.encode(&mut all);
        }
        let bytes = all.clone().freeze();
        for cut in 0..bytes.len() {
            let mut prefix = BytesMut::from(&bytes[..cut]);
            let mut n = 0;
            while let Some(_f) = decode(&mut prefix, 1 << 20).expect("a prefix is never an error") {
                n += 1;
            }
            assert!(n < every_frame().len(), "cut at {cut}");
        }
        let mut got = Vec::new();
        while let Some(f) = decode(&mut all, 1 << 20).expect("decode") {
            got.push(f);
        }
        assert_eq!(got, every_frame());
        assert!(all.is_empty());
    }

    #[test]
    fn bad_frames_are_refused_with_the_reason() {
        let mut big = BytesMut::from(&[0, 1, 0, 1, BATCH][..]);
        assert_eq!(
            decode(&mut big, 1024),
            Err(LinkError::TooLarge {
                size: 65_537,
                max: 1024
            })
        );
        let mut empty = BytesMut::from(&[0, 0, 0, 0][..]);
        assert_eq!(decode(&mut empty, 1024), Err(LinkError::Empty));
        let mut unknown = BytesMut::from(&[0, 0, 0, 1, 99][..]);
        assert_eq!(decode(&mut unknown, 1024), Err(LinkError::UnknownType(99)));
        let mut short_ack = BytesMut::from(&[0, 0, 0, 3, ACK, 0, 0][..]);
        let mut many = BytesMut::from(
            &[
                0, 0, 0, 17, WELCOME, 0, 1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1,
            ][..],
        );
        assert!(matches!(
            decode(&mut many, 1024),
            Err(LinkError::Malformed {
                what: "more than 256 classes",
                ..
            })
        ));
        assert!(matches!(
            decode(&mut short_ack, 1024),
            Err(LinkError::Malformed { frame: "ACK", .. })
        ));
        let mut long_ack = BytesMut::new();
        Frame::Ack {
            class: 0,
            committed_seq: 1,
        }
        .encode(&mut long_ack);
        long_ack.put_u8(0);
        long_ack[3] += 1;
        assert!(matches!(
            decode(&mut long_ack, 1024),
            Err(LinkError::Malformed {
                what: "bytes after the frame",
                ..
            })
        ));
        let mut code = BytesMut::from(&[0, 0, 0, 5, GOAWAY, 0, 77, 0, 0][..]);
        assert_eq!(decode(&mut code, 1024), Err(LinkError::UnknownCode(77)));
        // A batch whose CRC fails is not taken.
        let mut frame = BytesMut::new();
        Frame::Batch {
            class: 0,
            batch: a_batch(),
        }
        .encode(&mut frame);
        let last = frame.len() - 1;
        frame[last] ^= 1;
        assert!(matches!(
            decode(&mut frame, 1 << 20),
            Err(LinkError::BadBatch { frame: "BATCH", .. })
        ));
        let mut zero = BytesMut::new();
        Frame::Batch {
            class: 0,
            batch: a_batch_at(0),
        }
        .encode(&mut zero);
        assert!(matches!(
            decode(&mut zero, 1 << 20),
            Err(LinkError::Malformed { .. })
        ));
    }
}
