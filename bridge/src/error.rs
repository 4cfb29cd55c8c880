//! The link's errors: [`LinkError`], why one connection of the link ended, at either end;
//! and the errors of what the two ends call into, [`OutboxError`] (the edge's outbox) and
//! [`SinkError`] (the cloud's ingest path), each with a [`FailureKind`].

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
    /// The edge's outbox could not be read.
    #[error("outbox: {0}")]
    Outbox(#[source] OutboxError),
    /// The edge could not apply downlink messages (publish them, record them as applied).
    #[error("downlink: {0}")]
    ApplyDown(#[source] OutboxError),
    /// The cloud's ingest path (log append or metadata commit) failed: the link gets GOAWAY
    /// Unavailable and the edge sends the records again later.
    #[error("ingest failed: {0}")]
    Ingest(#[source] SinkError),
    /// The cloud could not read the downlink or record what the edge acknowledged of it.
    #[error("downlink: {0}")]
    Downlink(#[source] SinkError),
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

/// An error from behind an end of the link: the edge's store, the cloud's log or metadata.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What kind of failure an [`OutboxError`] or a [`SinkError`] is: whether the same request
/// may succeed later ([`FailureKind::is_retryable`]). Today the link treats them alike (the
/// link is closed and the edge sends the records again after it reconnects); the kind is
/// what a policy or a metric can tell them apart by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// Storage failed: a disk or database error, a log partition that stopped taking
    /// appends. The same request may succeed later.
    Storage,
    /// The request was refused by the rules of what got it (a stream or partition that
    /// does not exist, an offset outside the log): sending it again fails again.
    Refused,
    /// A record in the request cannot be taken as it is (not a record batch, no topic, a
    /// sequence out of order): sending it again fails again.
    BadRecord,
    /// What serves the request has stopped or is stopping (the broker, the node, its
    /// blocking pool). It may succeed after a restart.
    Closed,
}

impl FailureKind {
    /// Whether the same request may succeed later: after a storage failure or a restart,
    /// not after a refusal or a bad record.
    pub fn is_retryable(self) -> bool {
        matches!(self, FailureKind::Storage | FailureKind::Closed)
    }

    /// The kind as a short word, for messages and metrics labels.
    pub fn name(self) -> &'static str {
        match self {
            FailureKind::Storage => "storage",
            FailureKind::Refused => "refused",
            FailureKind::BadRecord => "bad record",
            FailureKind::Closed => "closed",
        }
    }
}

impl std::fmt::Display for FailureKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Why the edge's outbox ([`crate::edge_dialer::Outbox`]) could not do what the link asked:
/// read records, or apply downlink messages. The outbox converts its own error into it
/// (`From` or [`OutboxError::new`]), which stays reachable as its
/// [`source`](std::error::Error::source).
#[derive(Debug, thiserror::Error)]
#[error("{kind}: {source}")]
pub struct OutboxError {
    kind: FailureKind,
    source: BoxError,
}

impl OutboxError {
    /// An error of `kind` caused by `source`.
    pub fn new(kind: FailureKind, source: impl Into<BoxError>) -> Self {
        Self {
            kind,
            source: source.into(),
        }
    }

    /// What kind of failure it is.
    pub fn kind(&self) -> FailureKind {
        self.kind
    }
}

/// Why the cloud's ingest path ([`crate::cloud_listener::Sink`]) could not do what the link
/// asked: append an edge's records, commit their sequence, read the downlink or record its
/// acknowledgement. The sink converts its own error into it (`From` or
/// [`SinkError::new`]), which stays reachable as its [`source`](std::error::Error::source).
#[derive(Debug, thiserror::Error)]
#[error("{kind}: {source}")]
pub struct SinkError {
    kind: FailureKind,
    source: BoxError,
}

impl SinkError {
    /// An error of `kind` caused by `source`.
    pub fn new(kind: FailureKind, source: impl Into<BoxError>) -> Self {
        Self {
            kind,
            source: source.into(),
        }
    }

    /// What kind of failure it is.
    pub fn kind(&self) -> FailureKind {
        self.kind
    }
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
        Frame::Status(_) => "STATUS",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("disk full")]
    struct DiskFull;

    #[test]
    fn a_sink_error_keeps_its_kind_and_its_source() {
        let e = SinkError::new(FailureKind::Storage, DiskFull);
        assert_eq!(e.kind(), FailureKind::Storage);
        assert!(e.kind().is_retryable());
        assert_eq!(e.to_string(), "storage: disk full");
        let source = std::error::Error::source(&e).expect("a source");
        assert!(source.downcast_ref::<DiskFull>().is_some());
    }

    #[test]
    fn refusals_and_bad_records_are_not_retryable() {
        assert!(!FailureKind::Refused.is_retryable());
        assert!(!FailureKind::BadRecord.is_retryable());
        assert!(FailureKind::Closed.is_retryable());
        let e = OutboxError::new(FailureKind::BadRecord, "no topic");
        assert_eq!(e.kind(), FailureKind::BadRecord);
        assert_eq!(
            LinkError::Outbox(e).to_string(),
            "outbox: bad record: no topic"
        );
    }
}
