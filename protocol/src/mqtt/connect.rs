//! CONNECT (with its will) and CONNACK.

use bytes::{BufMut, Bytes, BytesMut};

use super::properties::{properties_len, write_properties, Properties, PropertyContext};
use super::reason::check_reason;
use super::wire::{field_len, put_binary, put_string, Reader};
use super::{DecodeError, EncodeError, PacketType, ProtocolVersion, QoS, ReasonCode};
use crate::topic::TopicName;

const PROTOCOL_NAME: &str = "MQTT";

/// CONNECT: the first packet a client sends.
///
/// An empty `client_id` asks the server to assign one (v5), or is allowed with a clean
/// session only (3.1.1); that rule is the server's to enforce, not the codec's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connect {
    pub protocol: ProtocolVersion,
    pub clean_start: bool,
    pub keep_alive_secs: u16,
    pub properties: Properties,
    pub client_id: String,
    pub will: Option<Will>,
    pub username: Option<String>,
    pub password: Option<Bytes>,
}

/// The will message of a CONNECT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Will {
    pub topic: TopicName,
    pub payload: Bytes,
    pub qos: QoS,
    pub retain: bool,
    /// Will properties (v5): delay, expiry, content type, response topic, ...
    pub properties: Properties,
}

mod flag {
    pub(super) const RESERVED: u8 = 0b0000_0001;
    pub(super) const CLEAN_START: u8 = 0b0000_0010;
    pub(super) const WILL: u8 = 0b0000_0100;
    pub(super) const WILL_QOS_SHIFT: u8 = 3;
    pub(super) const WILL_RETAIN: u8 = 0b0010_0000;
    pub(super) const PASSWORD: u8 = 0b0100_0000;
    pub(super) const USERNAME: u8 = 0b1000_0000;
}

impl Connect {
    /// A clean-start CONNECT with no will and no credentials.
    pub fn new(protocol: ProtocolVersion, client_id: impl Into<String>) -> Self {
        Self {
            protocol,
            clean_start: true,
            keep_alive_secs: 60,
            properties: Properties::default(),
            client_id: client_id.into(),
            will: None,
            username: None,
            password: None,
        }
    }

    pub(crate) fn read(r: &mut Reader) -> Result<Self, DecodeError> {
        let name = r.string()?;
        let level = r.u8()?;
        if &*name != PROTOCOL_NAME {
            // MQTT 3.1 ("MQIsdp", level 3) is answered as an unsupported level.
            if &*name == "MQIsdp" {
                return Err(DecodeError::UnsupportedProtocolVersion { level });
            }
            return Err(DecodeError::InvalidProtocolName(name.to_string()));
        }
        let protocol = match level {
            4 => ProtocolVersion::V311,
            5 => ProtocolVersion::V5,
            _ => return Err(DecodeError::UnsupportedProtocolVersion { level }),
        };
        let flags = r.u8()?;
        if flags & flag::RESERVED != 0 {
            return Err(DecodeError::ReservedConnectFlag);
        }
        let has_will = flags & flag::WILL != 0;
        let will_qos = QoS::from_u8((flags >> flag::WILL_QOS_SHIFT) & 0b11)?;
        let will_retain = flags & flag::WILL_RETAIN != 0;
        if !has_will && (will_qos != QoS::AtMostOnce || will_retain) {
            return Err(DecodeError::InvalidWillFlags);
        }
        let has_username = flags & flag::USERNAME != 0;
        let has_password = flags & flag::PASSWORD != 0;
        if protocol == ProtocolVersion::V311 && has_password && !has_username {
            return Err(DecodeError::PasswordWithoutUsername);
        }
        let keep_alive_secs = r.u16()?;
        let v5 = protocol == ProtocolVersion::V5;
        let properties = if v5 {
            Properties::read(r, PropertyContext::Packet(PacketType::Connect))?
        } else {
            Properties::default()
        };
        let client_id = r.string()?.to_string();
        let will = if has_will {
            let properties = if v5 {
                Properties::read(r, PropertyContext::Will)?
            } else {
                Properties::default()
            };
            let topic = TopicName::new(r.string()?).map_err(DecodeError::TopicName)?;
            let payload = r.binary()?;
            Some(Will {
                topic,
                payload,
                qos: will_qos,
                retain: will_retain,
                properties,
            })
        } else {
            None
        };
        let username = has_username
            .then(|| r.string().map(String::from))
            .transpose()?;
        let password = has_password.then(|| r.binary()).transpose()?;
        Ok(Self {
            protocol,
            clean_start: flags & flag::CLEAN_START != 0,
            keep_alive_secs,
            properties,
            client_id,
            will,
            username,
            password,
        })
    }

    pub(crate) fn remaining_len(&self) -> Result<usize, EncodeError> {
        let v5 = self.protocol == ProtocolVersion::V5;
        if !v5 && self.password.is_some() && self.username.is_none() {
            return Err(EncodeError::PasswordWithoutUsername);
        }
        // Protocol name, level, flags, keep alive.
        let mut len = field_len(PROTOCOL_NAME.as_bytes()) + 1 + 1 + 2;
        if v5 {
            len += properties_len(
                &self.properties,
                PropertyContext::Packet(PacketType::Connect),
            )?;
        }
        len += field_len(self.client_id.as_bytes());
        if let Some(will) = &self.will {
            if v5 {
                len += properties_len(&will.properties, PropertyContext::Will)?;
            }
            len += field_len(will.topic.as_str().as_bytes()) + field_len(&will.payload);
        }
        len += self
            .username
            .as_ref()
            .map_or(0, |u| field_len(u.as_bytes()));
        len += self.password.as_ref().map_or(0, |p| field_len(p));
        Ok(len)
    }

    pub(crate) fn write(&self, buf: &mut BytesMut) -> Result<(), EncodeError> {
        let v5 = self.protocol == ProtocolVersion::V5;
        put_string(buf, PROTOCOL_NAME)?;
        buf.put_u8(self.protocol.level());
        let mut flags = 0;
        if self.clean_start {
            flags |= flag::CLEAN_START;
        }
        if let Some(will) = &self.will {
            flags |= flag::WILL | (will.qos as u8) << flag::WILL_QOS_SHIFT;
            if will.retain {
                flags |= flag::WILL_RETAIN;
            }
        }
        if self.username.is_some() {
            flags |= flag::USERNAME;
        }
        if self.password.is_some() {
            flags |= flag::PASSWORD;
        }
        buf.put_u8(flags);
        buf.put_u16(self.keep_alive_secs);
        if v5 {
            write_properties(
                buf,
                &self.properties,
                PropertyContext::Packet(PacketType::Connect),
            )?;
        }
        put_string(buf, &self.client_id)?;
        if let Some(will) = &self.will {
            if v5 {
                write_properties(buf, &will.properties, PropertyContext::Will)?;
            }
            put_string(buf, will.topic.as_str())?;
            put_binary(buf, &will.payload)?;
        }
        if let Some(username) = &self.username {
            put_string(buf, username)?;
        }
        if let Some(password) = &self.password {
            put_binary(buf, password)?;
        }
        Ok(())
    }
}

/// CONNACK: the server's answer to CONNECT.
///
/// For 3.1.1 the return codes 0–5 map to and from [`ReasonCode`] (see
/// [`ReasonCode::to_v311_connack`]); properties are v5 only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnAck {
    pub session_present: bool,
    pub code: ReasonCode,
    pub properties: Properties,
}

impl ConnAck {
    pub fn new(code: ReasonCode, session_present: bool) -> Self {
        Self {
            session_present,
            code,
            properties: Properties::default(),
        }
    }

    pub(crate) fn read(r: &mut Reader, version: ProtocolVersion) -> Result<Self, DecodeError> {
        let flags = r.u8()?;
        if flags & !1 != 0 {
            return Err(DecodeError::InvalidConnAckFlags(flags));
        }
        let raw = r.u8()?;
        let invalid = DecodeError::InvalidReasonCode {
            packet: PacketType::ConnAck,
            code: raw,
        };
        let (code, properties) = match version {
            ProtocolVersion::V311 => (
                ReasonCode::from_v311_connack(raw).ok_or(invalid)?,
                Properties::default(),
            ),
            ProtocolVersion::V5 => (
                ReasonCode::from_u8(raw)
                    .filter(|c| c.allowed_in(PacketType::ConnAck))
                    .ok_or(invalid)?,
                Properties::read(r, PropertyContext::Packet(PacketType::ConnAck))?,
            ),
        };
        Ok(Self {
            session_present: flags & 1 != 0,
            code,
            properties,
        })
    }

    pub(crate) fn remaining_len(&self, version: ProtocolVersion) -> Result<usize, EncodeError> {
        match version {
            ProtocolVersion::V311 => Ok(2),
            ProtocolVersion::V5 => {
                check_reason(self.code, PacketType::ConnAck)?;
                Ok(2 + properties_len(
                    &self.properties,
                    PropertyContext::Packet(PacketType::ConnAck),
                )?)
            }
        }
    }

    pub(crate) fn write(
        &self,
        buf: &mut BytesMut,
        version: ProtocolVersion,
    ) -> Result<(), EncodeError> {
        buf.put_u8(u8::from(self.session_present));
        match version {
            ProtocolVersion::V311 => buf.put_u8(self.code.to_v311_connack()),
            ProtocolVersion::V5 => {
                buf.put_u8(self.code as u8);
                write_properties(
                    buf,
                    &self.properties,
                    PropertyContext::Packet(PacketType::ConnAck),
                )?;
            }
        }
        Ok(())
    }
}
