//! [`LinkError`]: why one connection of the link ended, at either end.

use ferry_protocol::kafka::BatchError;
use ferry_protocol::link_frames::{Frame, GoAwayCode};

use crate::quic::StreamError;

/// Why a link (one connection) ended. The edge reconnects after any of them (with
/// backoff); either end closes the QUIC connection with code 2 (protocol error) and the
/// error's text as the reason.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The peer speaks another version of the link protocol.
    #[error("the peer speaks link version {theirs}, this end {ours}")]
    VersionMismatch { ours: u16, theirs: u16 },
    /// The peer answered the handshake with GOAWAY (a denied edge, a cloud shutting down).
    #[error("the peer refused the link ({code:?}): {reason}")]
    Refused { code: GoAwayCode, reason: String },
    /// The peer sent GOAWAY on a link that was up.
    #[error("the peer closed the link ({code:?}): {reason}")]
    GoneAway { code: GoAwayCode, reason: String },
    /// A frame the protocol does not allow here (its type, e.g. `"BATCH"`).
    #[error("unexpected {0} frame")]
    UnexpectedFrame(&'static str),
    /// The edge had more bytes of BATCH frames unacknowledged than its credit allows
    /// (`credit` counts the credit given plus one frame).
    #[error("the edge sent past its credit: {sent} bytes outstanding, {credit} allowed")]
    PastCredit { sent: u64, credit: u64 },
    /// The cloud acknowledged a sequence of `class` the edge has not sent.
    #[error("the cloud acknowledged class {class} up to {acked}, past what was sent ({sent})")]
    AckPastSent { class: u8, acked: u64, sent: u64 },
    /// Records were unacknowledged for longer than the stall timeout.
    #[error("stalled: nothing acknowledged for {secs} s")]
    Stalled { secs: u64 },
    /// The handshake's frame (`"HELLO"`, `"WELCOME"`) did not come within the idle timeout.
    #[error("no {frame} in {secs} s")]
    HandshakeTimeout { frame: &'static str, secs: u64 },
    /// A DOWN frame whose record batch does not read.
    #[error("bad DOWN batch: {0}")]
    BadDown(#[from] BatchError),
    /// A DOWN record without a (UTF-8) topic, or with a negative sequence.
    #[error("bad DOWN record at offset {offset}: {what}")]
    BadDownRecord { offset: i64, what: &'static str },
    /// The edge's outbox failed (its storage's message).
    #[error("outbox: {0}")]
    Outbox(String),
    /// The cloud's ingest path (log append or metadata commit) failed: the link gets GOAWAY
    /// Unavailable and the edge sends the records again later.
    #[error("ingest failed: {0}")]
    Ingest(String),
    /// The downlink's storage failed (reading the downlink, recording or applying it).
    #[error("downlink: {0}")]
    Downlink(String),
    /// `host:port` of the cloud does not resolve.
    #[error("cannot resolve {cloud}: {why}")]
    Resolve { cloud: String, why: String },
    /// The QUIC connection could not be made or was lost.
    #[error("connection: {0}")]
    Connection(#[from] quinn::ConnectionError),
    #[error("cannot connect: {0}")]
    Connect(#[from] quinn::ConnectError),
    /// No answer to a connection attempt within the connect timeout.
    #[error("no answer from the cloud in {ms} ms")]
    ConnectTimeout { ms: u64 },
    /// The peer opened no stream within the idle timeout.
    #[error("no stream opened in {secs} s")]
    NoStream { secs: u64 },
    /// The peer finished the link's stream.
    #[error("the peer closed the link's stream")]
    StreamClosed,
    /// Reading or writing the link's stream failed, or a frame did not decode.
    #[error(transparent)]
    Io(#[from] StreamError),
}

/// The name of a frame's type, as `docs/link-protocol.md` writes it.
pub fn frame_name(frame: &Frame) -> &'static str {
    match frame {
        Frame::Hello { .. } => "HELLO",
        Frame::Welcome { .. } => "WELCOME",
        Frame::Batch { .. } => "BATCH",
        Frame::Ack { .. } => "ACK",
        Frame::Credit { .. } => "CREDIT",
        Frame::Down { .. } => "DOWN",
        Frame::DownAck { .. } => "DOWN_ACK",
        Frame::GoAway { .. } => "GOAWAY",
    }
}
