//! The packets that are a reason code and properties, and may shorten to nothing when the
//! code is Success and there are no properties: PUBACK, PUBREC, PUBREL, PUBCOMP (after their
//! packet identifier), DISCONNECT and AUTH.

use bytes::{BufMut, BytesMut};

use super::properties::{properties_len, write_properties, Properties, PropertyContext};
use super::reason::check_reason;
use super::wire::Reader;
use super::{
    read_packet_id, DecodeError, EncodeError, PacketId, PacketType, ProtocolVersion, ReasonCode,
};

/// PUBACK, PUBREC, PUBREL or PUBCOMP: which one is the [`super::Packet`] variant.
///
/// In 3.1.1 only the packet identifier is on the wire; decoding gives `Success`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PubResponse {
    pub packet_id: PacketId,
    pub reason: ReasonCode,
    pub properties: Properties,
}

impl PubResponse {
    pub fn new(packet_id: PacketId) -> Self {
        Self {
            packet_id,
            reason: ReasonCode::Success,
            properties: Properties::default(),
        }
    }

    pub(crate) fn read(
        r: &mut Reader,
        kind: PacketType,
        version: ProtocolVersion,
    ) -> Result<Self, DecodeError> {
        let packet_id = read_packet_id(r)?;
        let (reason, properties) = match version {
            ProtocolVersion::V311 => (ReasonCode::Success, Properties::default()),
            ProtocolVersion::V5 => read_reason_and_properties(r, kind)?,
        };
        Ok(Self {
            packet_id,
            reason,
            properties,
        })
    }

    pub(crate) fn remaining_len(
        &self,
        kind: PacketType,
        version: ProtocolVersion,
    ) -> Result<usize, EncodeError> {
        Ok(2 + match version {
            ProtocolVersion::V311 => 0,
            ProtocolVersion::V5 => reason_and_properties_len(self.reason, &self.properties, kind)?,
        })
    }

    pub(crate) fn write(
        &self,
        buf: &mut BytesMut,
        kind: PacketType,
        version: ProtocolVersion,
    ) -> Result<(), EncodeError> {
        buf.put_u16(self.packet_id.get());
        if version == ProtocolVersion::V5 {
            write_reason_and_properties(buf, self.reason, &self.properties, kind)?;
        }
        Ok(())
    }
}

/// DISCONNECT. In 3.1.1 it is empty; decoding gives `Success` (normal disconnection).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Disconnect {
    pub reason: ReasonCode,
    pub properties: Properties,
}

impl Disconnect {
    pub fn new(reason: ReasonCode) -> Self {
        Self {
            reason,
            properties: Properties::default(),
        }
    }

    pub(crate) fn read(r: &mut Reader, version: ProtocolVersion) -> Result<Self, DecodeError> {
        let (reason, properties) = match version {
            ProtocolVersion::V311 => (ReasonCode::Success, Properties::default()),
            ProtocolVersion::V5 => read_reason_and_properties(r, PacketType::Disconnect)?,
        };
        Ok(Self { reason, properties })
    }

    pub(crate) fn remaining_len(&self, version: ProtocolVersion) -> Result<usize, EncodeError> {
        match version {
            ProtocolVersion::V311 => Ok(0),
            ProtocolVersion::V5 => {
                reason_and_properties_len(self.reason, &self.properties, PacketType::Disconnect)
            }
        }
    }

    pub(crate) fn write(
        &self,
        buf: &mut BytesMut,
        version: ProtocolVersion,
    ) -> Result<(), EncodeError> {
        match version {
            ProtocolVersion::V311 => Ok(()),
            ProtocolVersion::V5 => write_reason_and_properties(
                buf,
                self.reason,
                &self.properties,
                PacketType::Disconnect,
            ),
        }
    }
}

/// AUTH (MQTT 5.0 only): a step of enhanced authentication.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Auth {
    pub reason: ReasonCode,
    pub properties: Properties,
}

impl Auth {
    pub(crate) fn read(r: &mut Reader) -> Result<Self, DecodeError> {
        let (reason, properties) = read_reason_and_properties(r, PacketType::Auth)?;
        Ok(Self { reason, properties })
    }

    pub(crate) fn remaining_len(&self) -> Result<usize, EncodeError> {
        reason_and_properties_len(self.reason, &self.properties, PacketType::Auth)
    }

    pub(crate) fn write(&self, buf: &mut BytesMut) -> Result<(), EncodeError> {
        write_reason_and_properties(buf, self.reason, &self.properties, PacketType::Auth)
    }
}

/// Reads the optional reason code and properties: absent means Success (MQTT 5.0 §3.4.2.1,
/// §3.14.2.1, §3.15.2.1), and a reason code without a property length means no properties.
fn read_reason_and_properties(
    r: &mut Reader,
    kind: PacketType,
) -> Result<(ReasonCode, Properties), DecodeError> {
    if r.is_empty() {
        return Ok((ReasonCode::Success, Properties::default()));
    }
    let raw = r.u8()?;
    let reason = ReasonCode::from_u8(raw)
        .filter(|c| c.allowed_in(kind))
        .ok_or(DecodeError::InvalidReasonCode {
            packet: kind,
            code: raw,
        })?;
    if r.is_empty() {
        return Ok((reason, Properties::default()));
    }
    let properties = Properties::read(r, PropertyContext::Packet(kind))?;
    Ok((reason, properties))
}

/// The shortest form: nothing for Success without properties, the code alone without
/// properties, else the code and the property list.
fn reason_and_properties_len(
    reason: ReasonCode,
    properties: &Properties,
    kind: PacketType,
) -> Result<usize, EncodeError> {
    check_reason(reason, kind)?;
    Ok(if properties.is_empty() {
        usize::from(reason != ReasonCode::Success)
    } else {
        1 + properties_len(properties, PropertyContext::Packet(kind))?
    })
}

fn write_reason_and_properties(
    buf: &mut BytesMut,
    reason: ReasonCode,
    properties: &Properties,
    kind: PacketType,
) -> Result<(), EncodeError> {
    if properties.is_empty() {
        if reason != ReasonCode::Success {
            buf.put_u8(reason as u8);
        }
        return Ok(());
    }
    buf.put_u8(reason as u8);
    write_properties(buf, properties, PropertyContext::Packet(kind))
}
