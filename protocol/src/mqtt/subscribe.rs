//! SUBSCRIBE, SUBACK, UNSUBSCRIBE and UNSUBACK.

use bytes::{BufMut, BytesMut};

use super::properties::{properties_len, write_properties, Properties, PropertyContext};
use super::reason::check_reason;
use super::wire::{field_len, put_string, Reader};
use super::{
    read_packet_id, DecodeError, EncodeError, PacketId, PacketType, ProtocolVersion, QoS,
    ReasonCode,
};
use crate::topic::TopicFilter;

/// SUBSCRIBE: one or more topic filters, each with its options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscribe {
    pub packet_id: PacketId,
    /// v5: at most one Subscription Identifier, and user properties.
    pub properties: Properties,
    pub subscriptions: Vec<Subscription>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscription {
    pub filter: TopicFilter,
    pub options: SubscriptionOptions,
}

/// The options byte of a subscription. In 3.1.1 only `qos` exists; the others decode as
/// their defaults and are not encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubscriptionOptions {
    pub qos: QoS,
    /// Do not send this client's own publications back to it (v5).
    pub no_local: bool,
    /// Keep the RETAIN flag as published when forwarding (v5).
    pub retain_as_published: bool,
    pub retain_handling: RetainHandling,
}

impl SubscriptionOptions {
    pub fn new(qos: QoS) -> Self {
        Self {
            qos,
            no_local: false,
            retain_as_published: false,
            retain_handling: RetainHandling::SendAtSubscribe,
        }
    }
}

/// When retained messages are sent for a new subscription (MQTT 5.0 §3.8.3.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum RetainHandling {
    SendAtSubscribe = 0,
    SendAtSubscribeIfNew = 1,
    DoNotSend = 2,
}

impl Subscribe {
    pub(crate) fn read(r: &mut Reader, version: ProtocolVersion) -> Result<Self, DecodeError> {
        let packet_id = read_packet_id(r)?;
        let properties = read_properties(r, version, PacketType::Subscribe)?;
        let mut subscriptions = Vec::new();
        while !r.is_empty() {
            let filter = TopicFilter::new(r.string()?).map_err(DecodeError::TopicFilter)?;
            let options = read_options(r.u8()?, version)?;
            if options.no_local && filter.is_shared() {
                // MQTT-3.8.3-4: a Protocol Error.
                return Err(DecodeError::NoLocalOnSharedSubscription(filter.to_string()));
            }
            subscriptions.push(Subscription { filter, options });
        }
        if subscriptions.is_empty() {
            return Err(DecodeError::NoTopicFilters(PacketType::Subscribe));
        }
        Ok(Self {
            packet_id,
            properties,
            subscriptions,
        })
    }

    pub(crate) fn remaining_len(&self, version: ProtocolVersion) -> Result<usize, EncodeError> {
        if self.subscriptions.is_empty() {
            return Err(EncodeError::EmptyList(PacketType::Subscribe));
        }
        if self
            .subscriptions
            .iter()
            .any(|s| s.options.no_local && s.filter.is_shared())
        {
            return Err(EncodeError::NoLocalOnSharedSubscription);
        }
        let filters: usize = self
            .subscriptions
            .iter()
            .map(|s| field_len(s.filter.as_str().as_bytes()) + 1)
            .sum();
        Ok(2 + filters + encoded_properties_len(&self.properties, version, PacketType::Subscribe)?)
    }

    pub(crate) fn write(
        &self,
        buf: &mut BytesMut,
        version: ProtocolVersion,
    ) -> Result<(), EncodeError> {
        buf.put_u16(self.packet_id.get());
        maybe_write_properties(buf, &self.properties, version, PacketType::Subscribe)?;
        for s in &self.subscriptions {
            put_string(buf, s.filter.as_str())?;
            let o = s.options;
            let byte = match version {
                ProtocolVersion::V311 => o.qos as u8,
                ProtocolVersion::V5 => {
                    o.qos as u8
                        | u8::from(o.no_local) << 2
                        | u8::from(o.retain_as_published) << 3
                        | (o.retain_handling as u8) << 4
                }
            };
            buf.put_u8(byte);
        }
        Ok(())
    }
}

fn read_options(byte: u8, version: ProtocolVersion) -> Result<SubscriptionOptions, DecodeError> {
    let reserved = match version {
        ProtocolVersion::V311 => 0b1111_1100,
        ProtocolVersion::V5 => 0b1100_0000,
    };
    if byte & reserved != 0 {
        return Err(DecodeError::InvalidSubscriptionOptions(byte));
    }
    let qos = QoS::from_u8(byte & 0b11)?;
    let retain_handling = match (byte >> 4) & 0b11 {
        0 => RetainHandling::SendAtSubscribe,
        1 => RetainHandling::SendAtSubscribeIfNew,
        2 => RetainHandling::DoNotSend,
        _ => return Err(DecodeError::InvalidSubscriptionOptions(byte)),
    };
    Ok(SubscriptionOptions {
        qos,
        no_local: byte & 0b0100 != 0,
        retain_as_published: byte & 0b1000 != 0,
        retain_handling,
    })
}

/// SUBACK: one reason code per subscription, in order. For 3.1.1 the codes are granted QoS
/// 0/1/2 or 0x80 (any failure is sent as 0x80).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubAck {
    pub packet_id: PacketId,
    pub properties: Properties,
    pub reasons: Vec<ReasonCode>,
}

impl SubAck {
    pub(crate) fn read(r: &mut Reader, version: ProtocolVersion) -> Result<Self, DecodeError> {
        let packet_id = read_packet_id(r)?;
        let properties = read_properties(r, version, PacketType::SubAck)?;
        let mut reasons = Vec::with_capacity(r.remaining());
        while !r.is_empty() {
            let raw = r.u8()?;
            let code = match version {
                ProtocolVersion::V311 => ReasonCode::from_v311_suback(raw),
                ProtocolVersion::V5 => {
                    ReasonCode::from_u8(raw).filter(|c| c.allowed_in(PacketType::SubAck))
                }
            };
            reasons.push(code.ok_or(DecodeError::InvalidReasonCode {
                packet: PacketType::SubAck,
                code: raw,
            })?);
        }
        if reasons.is_empty() {
            return Err(DecodeError::NoReasonCodes);
        }
        Ok(Self {
            packet_id,
            properties,
            reasons,
        })
    }

    pub(crate) fn remaining_len(&self, version: ProtocolVersion) -> Result<usize, EncodeError> {
        check_reasons(&self.reasons, version, PacketType::SubAck)?;
        Ok(2 + self.reasons.len()
            + encoded_properties_len(&self.properties, version, PacketType::SubAck)?)
    }

    pub(crate) fn write(
        &self,
        buf: &mut BytesMut,
        version: ProtocolVersion,
    ) -> Result<(), EncodeError> {
        buf.put_u16(self.packet_id.get());
        maybe_write_properties(buf, &self.properties, version, PacketType::SubAck)?;
        for code in &self.reasons {
            buf.put_u8(match version {
                ProtocolVersion::V311 => code.to_v311_suback(),
                ProtocolVersion::V5 => *code as u8,
            });
        }
        Ok(())
    }
}

/// UNSUBSCRIBE: one or more topic filters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unsubscribe {
    pub packet_id: PacketId,
    pub properties: Properties,
    pub filters: Vec<TopicFilter>,
}

impl Unsubscribe {
    pub(crate) fn read(r: &mut Reader, version: ProtocolVersion) -> Result<Self, DecodeError> {
        let packet_id = read_packet_id(r)?;
        let properties = read_properties(r, version, PacketType::Unsubscribe)?;
        let mut filters = Vec::new();
        while !r.is_empty() {
            filters.push(TopicFilter::new(r.string()?).map_err(DecodeError::TopicFilter)?);
        }
        if filters.is_empty() {
            return Err(DecodeError::NoTopicFilters(PacketType::Unsubscribe));
        }
        Ok(Self {
            packet_id,
            properties,
            filters,
        })
    }

    pub(crate) fn remaining_len(&self, version: ProtocolVersion) -> Result<usize, EncodeError> {
        if self.filters.is_empty() {
            return Err(EncodeError::EmptyList(PacketType::Unsubscribe));
        }
        let filters: usize = self
            .filters
            .iter()
            .map(|f| field_len(f.as_str().as_bytes()))
            .sum();
        Ok(2 + filters
            + encoded_properties_len(&self.properties, version, PacketType::Unsubscribe)?)
    }

    pub(crate) fn write(
        &self,
        buf: &mut BytesMut,
        version: ProtocolVersion,
    ) -> Result<(), EncodeError> {
        buf.put_u16(self.packet_id.get());
        maybe_write_properties(buf, &self.properties, version, PacketType::Unsubscribe)?;
        for f in &self.filters {
            put_string(buf, f.as_str())?;
        }
        Ok(())
    }
}

/// UNSUBACK. In 3.1.1 it has no payload and `reasons` is empty; in v5 it has one reason
/// code per filter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnsubAck {
    pub packet_id: PacketId,
    pub properties: Properties,
    pub reasons: Vec<ReasonCode>,
}

impl UnsubAck {
    pub(crate) fn read(r: &mut Reader, version: ProtocolVersion) -> Result<Self, DecodeError> {
        let packet_id = read_packet_id(r)?;
        let properties = read_properties(r, version, PacketType::UnsubAck)?;
        let mut reasons = Vec::new();
        if version == ProtocolVersion::V5 {
            while !r.is_empty() {
                let raw = r.u8()?;
                reasons.push(
                    ReasonCode::from_u8(raw)
                        .filter(|c| c.allowed_in(PacketType::UnsubAck))
                        .ok_or(DecodeError::InvalidReasonCode {
                            packet: PacketType::UnsubAck,
                            code: raw,
                        })?,
                );
            }
            if reasons.is_empty() {
                return Err(DecodeError::NoReasonCodes);
            }
        }
        Ok(Self {
            packet_id,
            properties,
            reasons,
        })
    }

    pub(crate) fn remaining_len(&self, version: ProtocolVersion) -> Result<usize, EncodeError> {
        match version {
            ProtocolVersion::V311 => Ok(2),
            ProtocolVersion::V5 => {
                check_reasons(&self.reasons, version, PacketType::UnsubAck)?;
                Ok(2 + self.reasons.len()
                    + encoded_properties_len(&self.properties, version, PacketType::UnsubAck)?)
            }
        }
    }

    pub(crate) fn write(
        &self,
        buf: &mut BytesMut,
        version: ProtocolVersion,
    ) -> Result<(), EncodeError> {
        buf.put_u16(self.packet_id.get());
        if version == ProtocolVersion::V5 {
            write_properties(
                buf,
                &self.properties,
                PropertyContext::Packet(PacketType::UnsubAck),
            )?;
            for code in &self.reasons {
                buf.put_u8(*code as u8);
            }
        }
        Ok(())
    }
}

fn read_properties(
    r: &mut Reader,
    version: ProtocolVersion,
    kind: PacketType,
) -> Result<Properties, DecodeError> {
    match version {
        ProtocolVersion::V311 => Ok(Properties::default()),
        ProtocolVersion::V5 => Properties::read(r, PropertyContext::Packet(kind)),
    }
}

fn encoded_properties_len(
    p: &Properties,
    version: ProtocolVersion,
    kind: PacketType,
) -> Result<usize, EncodeError> {
    match version {
        ProtocolVersion::V311 => Ok(0),
        ProtocolVersion::V5 => properties_len(p, PropertyContext::Packet(kind)),
    }
}

fn maybe_write_properties(
    buf: &mut BytesMut,
    p: &Properties,
    version: ProtocolVersion,
    kind: PacketType,
) -> Result<(), EncodeError> {
    match version {
        ProtocolVersion::V311 => Ok(()),
        ProtocolVersion::V5 => write_properties(buf, p, PropertyContext::Packet(kind)),
    }
}

/// A SUBACK or v5 UNSUBACK needs at least one code, each allowed on the packet. (For a
/// 3.1.1 SUBACK any code is accepted: failures are sent as 0x80.)
fn check_reasons(
    reasons: &[ReasonCode],
    version: ProtocolVersion,
    kind: PacketType,
) -> Result<(), EncodeError> {
    if reasons.is_empty() {
        return Err(EncodeError::EmptyList(kind));
    }
    if version == ProtocolVersion::V5 {
        for &code in reasons {
            check_reason(code, kind)?;
        }
    }
    Ok(())
}
