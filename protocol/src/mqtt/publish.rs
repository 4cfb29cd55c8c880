//! PUBLISH.

use bytes::{BufMut, Bytes, BytesMut};

use super::error::saturate;
use super::properties::{Properties, PropertyContext};
use super::wire::{field_len, put_varint, varint_len, Reader, MAX_VARINT};
use super::{read_packet_id, DecodeError, EncodeError, PacketId, PacketType, ProtocolVersion, QoS};
use crate::topic::{TopicError, TopicName};

const CTX: PropertyContext = PropertyContext::Packet(PacketType::Publish);

/// PUBLISH: an application message, in either direction.
///
/// `packet_id` is `Some` exactly when `qos` is 1 or 2. The topic is empty only for a v5
/// PUBLISH that names its topic through `properties.topic_alias`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publish {
    pub dup: bool,
    pub qos: QoS,
    pub retain: bool,
    pub topic: TopicName,
    pub packet_id: Option<PacketId>,
    pub properties: Properties,
    /// Shares the buffer the packet was decoded from.
    pub payload: Bytes,
}

impl Publish {
    /// A QoS 0, non-retained message.
    pub fn new(topic: TopicName, payload: impl Into<Bytes>) -> Self {
        Self {
            dup: false,
            qos: QoS::AtMostOnce,
            retain: false,
            topic,
            packet_id: None,
            properties: Properties::default(),
            payload: payload.into(),
        }
    }

    pub(crate) fn read(
        flags: u8,
        mut r: Reader,
        version: ProtocolVersion,
    ) -> Result<Self, DecodeError> {
        let qos = QoS::from_u8((flags >> 1) & 0b11)?;
        let dup = flags & 0b1000 != 0;
        if dup && qos == QoS::AtMostOnce {
            return Err(DecodeError::DupWithQoS0);
        }
        let topic = r.utf8()?;
        TopicName::check(&topic).map_err(|e| match e {
            TopicError::NullCharacter => DecodeError::NullCharacter,
            e => DecodeError::TopicName(e),
        })?;
        let packet_id = match qos {
            QoS::AtMostOnce => None,
            QoS::AtLeastOnce | QoS::ExactlyOnce => Some(read_packet_id(&mut r)?),
        };
        let properties = match version {
            ProtocolVersion::V311 => Properties::default(),
            ProtocolVersion::V5 => Properties::read(&mut r, CTX)?,
        };
        if topic.is_empty() && properties.topic_alias.is_none() {
            return Err(DecodeError::TopicName(TopicError::Empty));
        }
        Ok(Self {
            dup,
            qos,
            retain: flags & 1 != 0,
            topic: TopicName::from_checked(topic),
            packet_id,
            properties,
            payload: r.rest(),
        })
    }

    #[inline]
    pub(crate) fn fixed_header_flags(&self) -> u8 {
        u8::from(self.dup) << 3 | (self.qos as u8) << 1 | u8::from(self.retain)
    }

    #[inline]
    pub(crate) fn remaining_len(&self, version: ProtocolVersion) -> Result<usize, EncodeError> {
        self.lengths(version).map(|(remaining, _)| remaining)
    }

    /// The remaining length, and for v5 the length of the property list (without its
    /// prefix), computed once for both sizing and writing.
    #[inline]
    fn lengths(&self, version: ProtocolVersion) -> Result<(usize, Option<usize>), EncodeError> {
        if self.packet_id.is_some() != (self.qos != QoS::AtMostOnce) {
            return Err(EncodeError::PacketIdMismatch);
        }
        let v5 = version == ProtocolVersion::V5;
        let properties = match (v5, self.properties.is_empty()) {
            (false, _) => None,
            (true, true) => Some(0),
            (true, false) => Some(self.properties.encoded_len(CTX)?),
        };
        if self.topic.is_empty() && !(v5 && self.properties.topic_alias.is_some()) {
            return Err(EncodeError::EmptyTopicWithoutAlias);
        }
        let mut len = field_len(self.topic.as_str().as_bytes()) + self.payload.len();
        if self.packet_id.is_some() {
            len += 2;
        }
        if let Some(p) = properties {
            len += varint_len(p) + p;
        }
        Ok((len, properties))
    }

    /// Appends this PUBLISH, encoded for `version`, to `buf`; returns the bytes written.
    /// [`super::Packet::encode`] comes here: this is the hot path of every broker, so it is
    /// written out straight.
    #[inline]
    pub fn encode(
        &self,
        version: ProtocolVersion,
        buf: &mut BytesMut,
    ) -> Result<usize, EncodeError> {
        let (remaining, properties) = self.lengths(version)?;
        if remaining > MAX_VARINT as usize {
            return Err(EncodeError::VarIntTooLarge {
                value: saturate(remaining),
            });
        }
        let total = 1 + varint_len(remaining) + remaining;
        buf.reserve(total);
        let start = buf.len();
        buf.put_u8((PacketType::Publish as u8) << 4 | self.fixed_header_flags());
        put_varint(buf, remaining)?;
        // A TopicName is at most 65535 bytes, so its length fits the prefix.
        let topic = self.topic.as_str().as_bytes();
        buf.put_u16(topic.len() as u16);
        buf.put_slice(topic);
        if let Some(id) = self.packet_id {
            buf.put_u16(id.get());
        }
        match properties {
            None => {}
            Some(0) => buf.put_u8(0),
            Some(len) => {
                if let Err(e) = self.properties.write(buf, len) {
                    buf.truncate(start);
                    return Err(e);
                }
            }
        }
        buf.put_slice(&self.payload);
        Ok(total)
    }
}
