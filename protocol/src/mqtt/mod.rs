//! The MQTT 3.1.1 and 5.0 codec, sans-IO.
//!
//! One packet model serves both versions: [`Packet`] holds what 5.0 can say, and encoding
//! for 3.1.1 leaves out what 3.1.1 cannot (properties, most reason codes). Decoding is two
//! steps, so that a peer cannot make us buffer an oversized packet:
//!
//! 1. [`check`] reads the fixed header and refuses a packet over `max_packet_size` before
//!    its body has arrived;
//! 2. [`decode`] splits the whole packet off the buffer and parses it. Payloads and topic
//!    names are slices of that buffer, not copies.
//!
//! "Need more bytes" is `Ok(None)` and consumes nothing. Malformed input is a
//! [`DecodeError`] that names what was wrong.
//!
//! ```
//! use bytes::BytesMut;
//! use ferry_protocol::mqtt::{decode, Packet, ProtocolVersion, Publish, QoS};
//! use ferry_protocol::topic::TopicName;
//!
//! let publish = Publish::new(TopicName::new("sensors/t1").unwrap(), "21.5");
//! let mut buf = BytesMut::new();
//! Packet::Publish(publish.clone()).encode(ProtocolVersion::V5, &mut buf).unwrap();
//! let decoded = decode(&mut buf, ProtocolVersion::V5, 1024).unwrap();
//! assert_eq!(decoded, Some(Packet::Publish(publish)));
//! assert!(buf.is_empty());
//! ```

mod ack;
mod connect;
pub(crate) mod error;
pub mod properties;
mod publish;
mod reason;
mod subscribe;
mod wire;

use std::num::NonZeroU16;

use bytes::{Buf, BufMut, BytesMut};

pub use ack::{Auth, Disconnect, PubResponse};
pub use connect::{ConnAck, Connect, Will};
pub use error::{DecodeError, EncodeError};
pub use properties::{Properties, PropertyContext, PropertyValues};
pub use publish::Publish;
pub use reason::ReasonCode;
pub use subscribe::{
    RetainHandling, SubAck, Subscribe, Subscription, SubscriptionOptions, UnsubAck, Unsubscribe,
};
pub use wire::MAX_VARINT;

use wire::Reader;

/// The largest packet MQTT can express: a 4-byte remaining length of 268,435,455 plus the
/// 5-byte fixed header.
pub const MAX_PACKET_SIZE: usize = MAX_VARINT as usize + 5;

/// A packet identifier: never zero on the wire (MQTT-2.2.1-3).
pub type PacketId = NonZeroU16;

/// The protocol level spoken on a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ProtocolVersion {
    /// MQTT 3.1.1, protocol level 4.
    V311,
    /// MQTT 5.0, protocol level 5.
    V5,
}

impl ProtocolVersion {
    pub fn level(self) -> u8 {
        match self {
            ProtocolVersion::V311 => 4,
            ProtocolVersion::V5 => 5,
        }
    }
}

/// Quality of service of a message or subscription.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum QoS {
    AtMostOnce = 0,
    AtLeastOnce = 1,
    ExactlyOnce = 2,
}

impl QoS {
    pub fn from_u8(v: u8) -> Result<Self, DecodeError> {
        match v {
            0 => Ok(QoS::AtMostOnce),
            1 => Ok(QoS::AtLeastOnce),
            2 => Ok(QoS::ExactlyOnce),
            _ => Err(DecodeError::InvalidQoS(v)),
        }
    }
}

/// The control packet types (the high nibble of the first byte).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum PacketType {
    Connect = 1,
    ConnAck = 2,
    Publish = 3,
    PubAck = 4,
    PubRec = 5,
    PubRel = 6,
    PubComp = 7,
    Subscribe = 8,
    SubAck = 9,
    Unsubscribe = 10,
    UnsubAck = 11,
    PingReq = 12,
    PingResp = 13,
    Disconnect = 14,
    Auth = 15,
}

impl PacketType {
    fn from_nibble(n: u8, version: ProtocolVersion) -> Result<Self, DecodeError> {
        use PacketType::*;
        Ok(match n {
            1 => Connect,
            2 => ConnAck,
            3 => Publish,
            4 => PubAck,
            5 => PubRec,
            6 => PubRel,
            7 => PubComp,
            8 => Subscribe,
            9 => SubAck,
            10 => Unsubscribe,
            11 => UnsubAck,
            12 => PingReq,
            13 => PingResp,
            14 => Disconnect,
            15 if version == ProtocolVersion::V5 => Auth,
            _ => return Err(DecodeError::ReservedPacketType(n)),
        })
    }

    /// The fixed flags of every packet but PUBLISH (MQTT 5.0 §2.1.3).
    fn required_flags(self) -> u8 {
        match self {
            PacketType::PubRel | PacketType::Subscribe | PacketType::Unsubscribe => 0b0010,
            _ => 0,
        }
    }
}

/// An MQTT control packet of either version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Packet {
    Connect(Box<Connect>),
    ConnAck(ConnAck),
    Publish(Publish),
    PubAck(PubResponse),
    PubRec(PubResponse),
    PubRel(PubResponse),
    PubComp(PubResponse),
    Subscribe(Subscribe),
    SubAck(SubAck),
    Unsubscribe(Unsubscribe),
    UnsubAck(UnsubAck),
    PingReq,
    PingResp,
    Disconnect(Disconnect),
    /// MQTT 5.0 only.
    Auth(Auth),
}

/// What the fixed header of the next packet says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FixedHeader {
    /// The first byte: packet type and flags.
    pub byte1: u8,
    /// Bytes taken by the first byte and the remaining length.
    pub header_len: usize,
    /// Bytes that follow the fixed header.
    pub remaining_len: usize,
}

impl FixedHeader {
    /// The whole packet's size on the wire.
    pub fn packet_len(&self) -> usize {
        self.header_len + self.remaining_len
    }
}

/// Step one of decoding: reads the fixed header at the start of `buf`.
///
/// `Ok(None)` if the header is not complete yet. Refuses a packet whose total size would be
/// over `max_packet_size` as soon as the remaining length is known, so its body is never
/// buffered. Consumes nothing.
pub fn check(buf: &[u8], max_packet_size: usize) -> Result<Option<FixedHeader>, DecodeError> {
    let Some((&byte1, rest)) = buf.split_first() else {
        return Ok(None);
    };
    let Some((remaining, len_len)) = wire::read_varint(rest)? else {
        return Ok(None);
    };
    let header = FixedHeader {
        byte1,
        header_len: 1 + len_len,
        remaining_len: remaining as usize,
    };
    if header.packet_len() > max_packet_size {
        return Err(DecodeError::PacketTooLarge {
            size: header.packet_len(),
            max: max_packet_size,
        });
    }
    Ok(Some(header))
}

/// Decodes the next packet from `buf`, removing its bytes.
///
/// `Ok(None)` when `buf` does not yet hold a whole packet: nothing is consumed and the caller
/// reads more. `version` is the connection's protocol level; a CONNECT carries its own and is
/// decoded whatever `version` says. After an error the connection must be closed: what is
/// left in `buf` is not meaningful.
pub fn decode(
    buf: &mut BytesMut,
    version: ProtocolVersion,
    max_packet_size: usize,
) -> Result<Option<Packet>, DecodeError> {
    let Some(header) = check(buf, max_packet_size)? else {
        return Ok(None);
    };
    if buf.len() < header.packet_len() {
        // Make room for the rest now; the size was checked against the limit above.
        buf.reserve(header.packet_len() - buf.len());
        return Ok(None);
    }
    let mut packet = buf.split_to(header.packet_len()).freeze();
    packet.advance(header.header_len);
    Packet::decode_body(header.byte1, Reader::new(packet), version).map(Some)
}

impl Packet {
    /// The packet's type.
    pub fn packet_type(&self) -> PacketType {
        match self {
            Packet::Connect(_) => PacketType::Connect,
            Packet::ConnAck(_) => PacketType::ConnAck,
            Packet::Publish(_) => PacketType::Publish,
            Packet::PubAck(_) => PacketType::PubAck,
            Packet::PubRec(_) => PacketType::PubRec,
            Packet::PubRel(_) => PacketType::PubRel,
            Packet::PubComp(_) => PacketType::PubComp,
            Packet::Subscribe(_) => PacketType::Subscribe,
            Packet::SubAck(_) => PacketType::SubAck,
            Packet::Unsubscribe(_) => PacketType::Unsubscribe,
            Packet::UnsubAck(_) => PacketType::UnsubAck,
            Packet::PingReq => PacketType::PingReq,
            Packet::PingResp => PacketType::PingResp,
            Packet::Disconnect(_) => PacketType::Disconnect,
            Packet::Auth(_) => PacketType::Auth,
        }
    }

    fn decode_body(
        byte1: u8,
        mut r: Reader,
        version: ProtocolVersion,
    ) -> Result<Packet, DecodeError> {
        let kind = PacketType::from_nibble(byte1 >> 4, version)?;
        let flags = byte1 & 0x0f;
        if kind != PacketType::Publish && flags != kind.required_flags() {
            return Err(DecodeError::InvalidFlags {
                packet: kind,
                flags,
            });
        }
        let packet = match kind {
            PacketType::Connect => Packet::Connect(Box::new(Connect::read(&mut r)?)),
            PacketType::ConnAck => Packet::ConnAck(ConnAck::read(&mut r, version)?),
            PacketType::Publish => return Publish::read(flags, r, version).map(Packet::Publish),
            PacketType::PubAck => Packet::PubAck(PubResponse::read(&mut r, kind, version)?),
            PacketType::PubRec => Packet::PubRec(PubResponse::read(&mut r, kind, version)?),
            PacketType::PubRel => Packet::PubRel(PubResponse::read(&mut r, kind, version)?),
            PacketType::PubComp => Packet::PubComp(PubResponse::read(&mut r, kind, version)?),
            PacketType::Subscribe => Packet::Subscribe(Subscribe::read(&mut r, version)?),
            PacketType::SubAck => Packet::SubAck(SubAck::read(&mut r, version)?),
            PacketType::Unsubscribe => Packet::Unsubscribe(Unsubscribe::read(&mut r, version)?),
            PacketType::UnsubAck => Packet::UnsubAck(UnsubAck::read(&mut r, version)?),
            PacketType::PingReq => Packet::PingReq,
            PacketType::PingResp => Packet::PingResp,
            PacketType::Disconnect => Packet::Disconnect(Disconnect::read(&mut r, version)?),
            PacketType::Auth => Packet::Auth(Auth::read(&mut r)?),
        };
        if !r.is_empty() {
            return Err(DecodeError::TrailingBytes {
                packet: kind,
                count: r.remaining(),
            });
        }
        Ok(packet)
    }

    /// The number of bytes [`Packet::encode`] would write for `version`. Use it to honour the
    /// peer's Maximum Packet Size before sending.
    pub fn encoded_len(&self, version: ProtocolVersion) -> Result<usize, EncodeError> {
        let remaining = self.remaining_len(version)?;
        if remaining > MAX_VARINT as usize {
            return Err(EncodeError::VarIntTooLarge {
                value: error::saturate(remaining),
            });
        }
        Ok(1 + wire::varint_len(remaining) + remaining)
    }

    fn remaining_len(&self, version: ProtocolVersion) -> Result<usize, EncodeError> {
        match self {
            Packet::Connect(p) => p.remaining_len(),
            Packet::ConnAck(p) => p.remaining_len(version),
            Packet::Publish(p) => p.remaining_len(version),
            Packet::PubAck(p) | Packet::PubRec(p) | Packet::PubRel(p) | Packet::PubComp(p) => {
                p.remaining_len(self.packet_type(), version)
            }
            Packet::Subscribe(p) => p.remaining_len(version),
            Packet::SubAck(p) => p.remaining_len(version),
            Packet::Unsubscribe(p) => p.remaining_len(version),
            Packet::UnsubAck(p) => p.remaining_len(version),
            Packet::PingReq | Packet::PingResp => Ok(0),
            Packet::Disconnect(p) => p.remaining_len(version),
            Packet::Auth(p) => match version {
                ProtocolVersion::V311 => Err(EncodeError::AuthInV311),
                ProtocolVersion::V5 => p.remaining_len(),
            },
        }
    }

    /// Appends the packet, encoded for `version`, to `buf`; returns the bytes written.
    ///
    /// For MQTT 3.1.1, properties are left out and reason codes are mapped to 3.1.1's return
    /// codes where the packet has one. A CONNECT is encoded for its own `protocol` field.
    /// On error nothing is written.
    #[inline]
    pub fn encode(
        &self,
        version: ProtocolVersion,
        buf: &mut BytesMut,
    ) -> Result<usize, EncodeError> {
        match self {
            // The hot path goes straight to its own encoder.
            Packet::Publish(p) => p.encode(version, buf),
            _ => self.encode_other(version, buf),
        }
    }

    fn encode_other(
        &self,
        version: ProtocolVersion,
        buf: &mut BytesMut,
    ) -> Result<usize, EncodeError> {
        let kind = self.packet_type();
        let remaining = self.remaining_len(version)?;
        let total = 1 + wire::varint_len(remaining) + remaining;
        buf.reserve(total);
        let start = buf.len();
        let byte1 = kind.required_flags() | (kind as u8) << 4;
        buf.put_u8(byte1);
        let written = wire::put_varint(buf, remaining).and_then(|()| match self {
            Packet::Connect(p) => p.write(buf),
            Packet::ConnAck(p) => p.write(buf, version),
            Packet::Publish(_) => unreachable!("PUBLISH returned above"),
            Packet::PubAck(p) | Packet::PubRec(p) | Packet::PubRel(p) | Packet::PubComp(p) => {
                p.write(buf, kind, version)
            }
            Packet::Subscribe(p) => p.write(buf, version),
            Packet::SubAck(p) => p.write(buf, version),
            Packet::Unsubscribe(p) => p.write(buf, version),
            Packet::UnsubAck(p) => p.write(buf, version),
            Packet::PingReq | Packet::PingResp => Ok(()),
            Packet::Disconnect(p) => p.write(buf, version),
            Packet::Auth(p) => p.write(buf),
        });
        if let Err(e) = written {
            buf.truncate(start);
            return Err(e);
        }
        debug_assert_eq!(
            buf.len() - start,
            total,
            "remaining_len disagrees with write for {kind:?}"
        );
        Ok(total)
    }
}

/// Reads a packet identifier, refusing 0.
fn read_packet_id(r: &mut Reader) -> Result<PacketId, DecodeError> {
    PacketId::new(r.u16()?).ok_or(DecodeError::ZeroPacketId)
}
