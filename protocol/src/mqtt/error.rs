//! Errors of the MQTT codec. Each says what was wrong and carries the offending value.

use super::properties::property_name;
use super::{PacketType, ReasonCode};
use crate::topic::TopicError;

/// Why bytes from a peer could not be decoded into a packet.
///
/// Every variant is a protocol violation by the peer; the connection should be closed, after
/// a DISCONNECT (v5) carrying [`DecodeError::reason_code`] where one can still be sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("malformed Variable Byte Integer (over four bytes, or not in its shortest form)")]
    MalformedVarInt,
    #[error("packet of {size} bytes is over the maximum packet size of {max}")]
    PacketTooLarge { size: usize, max: usize },
    #[error("reserved packet type {0}")]
    ReservedPacketType(u8),
    #[error("invalid fixed header flags {flags:#06b} for {packet:?}")]
    InvalidFlags { packet: PacketType, flags: u8 },
    #[error("invalid QoS {0}")]
    InvalidQoS(u8),
    #[error("DUP set on a QoS 0 PUBLISH")]
    DupWithQoS0,
    #[error("packet is shorter than its contents require")]
    Truncated,
    #[error("{count} bytes left over at the end of {packet:?}")]
    TrailingBytes { packet: PacketType, count: usize },
    #[error("string is not valid UTF-8")]
    InvalidUtf8,
    #[error("string contains U+0000")]
    NullCharacter,
    #[error("protocol name {0:?} is not \"MQTT\"")]
    InvalidProtocolName(String),
    #[error("unsupported protocol level {level}")]
    UnsupportedProtocolVersion { level: u8 },
    #[error("reserved CONNECT flag is set")]
    ReservedConnectFlag,
    #[error("will QoS or will retain set without the will flag")]
    InvalidWillFlags,
    #[error("password flag set without the username flag (MQTT 3.1.1)")]
    PasswordWithoutUsername,
    #[error("reserved CONNACK acknowledge flags {0:#04x}")]
    InvalidConnAckFlags(u8),
    #[error("unknown property identifier {0:#04x}")]
    UnknownProperty(u32),
    #[error("property {} ({property:#04x}) is not allowed on {packet:?}", property_name(*property))]
    PropertyNotAllowed { property: u8, packet: PacketType },
    #[error("property {} ({property:#04x}) given twice", property_name(*property))]
    DuplicateProperty { property: u8 },
    #[error("property {} ({property:#04x}) has invalid value {value}", property_name(*property))]
    InvalidPropertyValue { property: u8, value: u32 },
    #[error("packet identifier 0 where a non-zero one is required")]
    ZeroPacketId,
    #[error("invalid topic name: {0}")]
    TopicName(TopicError),
    #[error("invalid topic filter: {0}")]
    TopicFilter(TopicError),
    #[error("{0:?} carries no topic filters")]
    NoTopicFilters(PacketType),
    #[error("SUBACK or UNSUBACK carries no reason codes")]
    NoReasonCodes,
    #[error("invalid subscription options byte {0:#04x}")]
    InvalidSubscriptionOptions(u8),
    #[error("no local set on shared subscription {0:?}")]
    NoLocalOnSharedSubscription(String),
    #[error("reason code {code:#04x} is not allowed on {packet:?}")]
    InvalidReasonCode { packet: PacketType, code: u8 },
}

impl DecodeError {
    /// The reason code a v5 DISCONNECT (or CONNACK) should carry for this error:
    /// "Malformed Packet" for a wrong form, "Protocol Error" for a rule broken by a
    /// well-formed packet, and the specific code where the spec names one.
    pub fn reason_code(&self) -> ReasonCode {
        use DecodeError::*;
        match self {
            PacketTooLarge { .. } => ReasonCode::PacketTooLarge,
            UnsupportedProtocolVersion { .. } => ReasonCode::UnsupportedProtocolVersion,
            TopicName(_) => ReasonCode::TopicNameInvalid,
            TopicFilter(_) => ReasonCode::TopicFilterInvalid,
            InvalidPropertyValue {
                property: super::properties::id::TOPIC_ALIAS,
                ..
            } => ReasonCode::TopicAliasInvalid,
            PropertyNotAllowed { .. }
            | DuplicateProperty { .. }
            | InvalidPropertyValue { .. }
            | NoLocalOnSharedSubscription(_)
            | InvalidProtocolName(_)
            | ReservedPacketType(_) => ReasonCode::ProtocolError,
            _ => ReasonCode::MalformedPacket,
        }
    }
}

/// Why a packet could not be encoded. These are caller mistakes (a value out of range, a
/// property on the wrong packet), reported instead of sending a packet the peer would refuse.
///
/// Kept to eight bytes, so that `Result<usize, EncodeError>` comes back in registers on the
/// hot path of every send.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// `value` saturates at `u32::MAX`.
    #[error("value {value} does not fit a Variable Byte Integer")]
    VarIntTooLarge { value: u32 },
    /// `len` saturates at `u32::MAX`.
    #[error("string or binary field of {len} bytes is over 65535")]
    FieldTooLong { len: u32 },
    #[error("property {} ({property:#04x}) is not allowed on {packet:?}", property_name(*property))]
    PropertyNotAllowed { property: u8, packet: PacketType },
    #[error("reason code {code:?} is not allowed on {packet:?}")]
    InvalidReasonCode {
        packet: PacketType,
        code: ReasonCode,
    },
    #[error("{0:?} must carry at least one entry")]
    EmptyList(PacketType),
    #[error("AUTH does not exist in MQTT 3.1.1")]
    AuthInV311,
    #[error("MQTT 3.1.1 does not allow a password without a username")]
    PasswordWithoutUsername,
    #[error("a QoS 0 PUBLISH has no packet identifier, a QoS 1/2 PUBLISH needs one")]
    PacketIdMismatch,
    #[error("a PUBLISH with an empty topic name needs a topic alias (MQTT 5.0 only)")]
    EmptyTopicWithoutAlias,
    #[error("no local cannot be set on a shared subscription")]
    NoLocalOnSharedSubscription,
}

/// Saturating conversion for the sizes carried by [`EncodeError`].
pub(crate) fn saturate(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}
