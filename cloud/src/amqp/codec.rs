//! AMQP 0-9-1 framing: an 8-byte protocol header from the client, then frames of
//! `type (1) channel (2) size (4) payload frame-end (0xCE)` both ways. Methods, content
//! headers and field tables are parsed and written by the `amq-protocol` crate; this module
//! cuts frames out of the byte stream, bounds their size and names what went wrong with the
//! reply code the connection is closed with.

use amq_protocol::frame::{gen_frame, parse_frame, AMQPFrame, WriteContext};
use amq_protocol::protocol::constants;
use bytes::{Buf, BytesMut};

/// What the client must send first.
pub(crate) const PROTOCOL_HEADER: &[u8; 8] = b"AMQP\x00\x00\x09\x01";
/// Type, channel and size before the payload, and the frame-end octet after it.
pub(crate) const FRAME_OVERHEAD: usize = 8;
/// The smallest frame_max a peer may ask for (the spec's frame-min-size).
pub(crate) const FRAME_MIN_SIZE: u32 = 4096;

/// Why the bytes a client sent are not a frame. Each closes the connection with its code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum FrameError {
    #[error("a frame of {size} bytes is over frame_max ({max})")]
    TooLarge { size: usize, max: usize },
    #[error("frame type {0} is not an AMQP frame type")]
    BadType(u8),
    #[error("the frame does not end with 0xCE")]
    BadEnd,
    #[error("the frame's payload does not parse: {0}")]
    Syntax(String),
}

impl FrameError {
    /// The `connection.close` reply code (501 frame-error, 502 syntax-error).
    pub(crate) fn reply_code(&self) -> u16 {
        match self {
            FrameError::Syntax(_) => super::broker::code::SYNTAX_ERROR,
            _ => super::broker::code::FRAME_ERROR,
        }
    }
}

/// The most [`take_frame`] reserves ahead for a frame that is not all there yet.
const RESERVE_MAX: usize = 128 * 1024;

/// Takes one whole frame off the front of `buf`, if it holds one. `frame_max` bounds the
/// whole frame, header and frame-end included (0: the spec's 2^32-1, i.e. no bound).
pub(crate) fn take_frame(
    buf: &mut BytesMut,
    frame_max: u32,
) -> Result<Option<AMQPFrame>, FrameError> {
    if buf.len() < 7 {
        return Ok(None);
    }
    let kind = buf[0];
    if !matches!(
        kind,
        constants::FRAME_METHOD
            | constants::FRAME_HEADER
            | constants::FRAME_BODY
            | constants::FRAME_HEARTBEAT
    ) {
        return Err(FrameError::BadType(kind));
    }
    let size = u32::from_be_bytes([buf[3], buf[4], buf[5], buf[6]]) as usize;
    let whole = size + FRAME_OVERHEAD;
    if frame_max != 0 && whole > frame_max as usize {
        return Err(FrameError::TooLarge {
            size: whole,
            max: frame_max as usize,
        });
    }
    if buf.len() < whole {
        // Room for the rest, but not what a size field alone claims (up to 4 GiB without a
        // bound): the reader grows the buffer as the bytes come.
        buf.reserve((whole - buf.len()).min(RESERVE_MAX));
        return Ok(None);
    }
    if buf[whole - 1] != constants::FRAME_END {
        return Err(FrameError::BadEnd);
    }
    let frame = match parse_frame(&buf[..whole]) {
        Ok((_, frame)) => frame,
        Err(e) => return Err(FrameError::Syntax(format!("{e:?}"))),
    };
    buf.advance(whole);
    Ok(Some(frame))
}

/// Appends `frame`, serialised, to `out`.
pub(crate) fn put_frame(out: &mut Vec<u8>, frame: &AMQPFrame) {
    let buffer = std::mem::take(out);
    match gen_frame(frame)(WriteContext::from(buffer)) {
        Ok(ctx) => *out = ctx.write,
        // Writing to a Vec does not fail; a frame the crate cannot write (a short string
        // over 255 bytes we made) is a bug: it is left out and logged.
        Err(e) => tracing::error!(error = ?e, "cannot serialise an AMQP frame"),
    }
}

#[cfg(test)]
mod tests {
    use amq_protocol::protocol::{basic, AMQPClass};

    use super::*;

    fn frame_bytes(frame: &AMQPFrame) -> Vec<u8> {
        let mut out = Vec::new();
        put_frame(&mut out, frame);
        out
    }

    #[test]
    fn frames_are_cut_whole_from_a_stream_in_pieces() {
        let a = AMQPFrame::Method(
            1,
            AMQPClass::Basic(basic::AMQPMethod::Qos(basic::Qos {
                prefetch_count: 10,
                global: false,
            })),
        );
        let b = AMQPFrame::Heartbeat;
        let mut stream = frame_bytes(&a);
        stream.extend(frame_bytes(&b));
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        for byte in stream {
            buf.extend_from_slice(&[byte]);
            if let Some(f) = take_frame(&mut buf, 4096).expect("valid") {
                got.push(f);
            }
        }
        assert_eq!(got, vec![a, b]);
        assert!(buf.is_empty());
    }

    #[test]
    fn a_size_field_alone_does_not_reserve_its_size() {
        // A method frame header claiming 4 GiB, with no bound.
        let mut buf = BytesMut::from(&[1u8, 0, 1, 0xFF, 0xFF, 0xFF, 0xFF, 0][..]);
        assert_eq!(take_frame(&mut buf, 0), Ok(None));
        assert!(buf.capacity() <= RESERVE_MAX + 8, "{}", buf.capacity());
    }

    #[test]
    fn oversize_bad_end_bad_type_and_garbage_are_named_with_their_reply_code() {
        let body = AMQPFrame::Body(1, vec![7; 5000]);
        let mut buf = BytesMut::from(&frame_bytes(&body)[..]);
        let e = take_frame(&mut buf, 4096).expect_err("too large");
        assert_eq!(
            (e.reply_code(), matches!(e, FrameError::TooLarge { .. })),
            (501, true)
        );

        let mut bytes = frame_bytes(&AMQPFrame::Body(1, vec![1, 2, 3]));
        let last = bytes.len() - 1;
        bytes[last] = 0;
        let e = take_frame(&mut BytesMut::from(&bytes[..]), 4096).expect_err("bad end");
        assert_eq!(e, FrameError::BadEnd);

        let e = take_frame(
            &mut BytesMut::from(&[9u8, 0, 0, 0, 0, 0, 0, 0xCE][..]),
            4096,
        )
        .expect_err("bad type");
        assert_eq!(e, FrameError::BadType(9));

        // A method frame whose payload is not a method: class 999.
        let garbage = [1u8, 0, 1, 0, 0, 0, 4, 0x03, 0xE7, 0, 10, 0xCE];
        let e = take_frame(&mut BytesMut::from(&garbage[..]), 4096).expect_err("syntax");
        assert_eq!(e.reply_code(), 502, "{e}");
    }
}
