//! PUBLISH.

use bytes::{BufMut, Bytes, BytesMut};

use super::properties::{properties_len, write_properties, Properties, PropertyContext};
use super::wire::{field_len, put_string, Reader};
use super::{read_packet_id, DecodeError, EncodeError, PacketId, PacketType, ProtocolVersion, QoS};
use crate::topic::TopicName;

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
        let topic = r.string()?;
        TopicName::check(&topic).map_err(DecodeError::TopicName)?;
        let packet_id = match qos {
            QoS::AtMostOnce => None,
            QoS::AtLeastOnce | QoS::ExactlyOnce => Some(read_packet_id(&mut r)?),
        };
        let properties = match version {
            ProtocolVersion::V311 => Properties::default(),
            ProtocolVersion::V5 => Properties::read(&mut r, CTX)?,
        };
        if topic.is_empty() && properties.topic_alias.is_none() {
            return Err(DecodeError::TopicName(crate::topic::TopicError::Empty));
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

    pub(crate) fn fixed_header_flags(&self) -> u8 {
        u8::from(self.dup) << 3 | (self.qos as u8) << 1 | u8::from(self.retain)
    }

    pub(crate) fn remaining_len(&self, version: ProtocolVersion) -> Result<usize, EncodeError> {
        if self.packet_id.is_some() != (self.qos != QoS::AtMostOnce) {
            return Err(EncodeError::PacketIdMismatch);
        }
        let v5 = version == ProtocolVersion::V5;
        if self.topic.is_empty() && !(v5 && self.properties.topic_alias.is_some()) {
            return Err(EncodeError::EmptyTopicWithoutAlias);
        }
        let mut len = field_len(self.topic.as_str().as_bytes()) + self.payload.len();
        if self.packet_id.is_some() {
            len += 2;
        }
        if v5 {
            len += properties_len(&self.properties, CTX)?;
        }
        Ok(len)
    }

    pub(crate) fn write(
        &self,
        buf: &mut BytesMut,
        version: ProtocolVersion,
    ) -> Result<(), EncodeError> {
        put_string(buf, self.topic.as_str())?;
        if let Some(id) = self.packet_id {
            buf.put_u16(id.get());
        }
        if version == ProtocolVersion::V5 {
            write_properties(buf, &self.properties, CTX)?;
        }
        buf.put_slice(&self.payload);
        Ok(())
    }
}
