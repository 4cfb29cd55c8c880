//! MQTT 5.0 reason codes (§2.4) and which packet may carry which.

use super::{EncodeError, PacketType};

/// A v5 reason code. For MQTT 3.1.1 the CONNACK return codes and SUBACK return codes are
/// mapped onto these (see [`ReasonCode::to_v311_connack`]).
///
/// `0x00` is called Success, Normal disconnection or Granted QoS 0 depending on the packet:
/// all are [`ReasonCode::Success`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum ReasonCode {
    #[default]
    Success = 0x00,
    GrantedQoS1 = 0x01,
    GrantedQoS2 = 0x02,
    DisconnectWithWillMessage = 0x04,
    NoMatchingSubscribers = 0x10,
    NoSubscriptionExisted = 0x11,
    ContinueAuthentication = 0x18,
    ReAuthenticate = 0x19,
    UnspecifiedError = 0x80,
    MalformedPacket = 0x81,
    ProtocolError = 0x82,
    ImplementationSpecificError = 0x83,
    UnsupportedProtocolVersion = 0x84,
    ClientIdentifierNotValid = 0x85,
    BadUserNameOrPassword = 0x86,
    NotAuthorized = 0x87,
    ServerUnavailable = 0x88,
    ServerBusy = 0x89,
    Banned = 0x8A,
    ServerShuttingDown = 0x8B,
    BadAuthenticationMethod = 0x8C,
    KeepAliveTimeout = 0x8D,
    SessionTakenOver = 0x8E,
    TopicFilterInvalid = 0x8F,
    TopicNameInvalid = 0x90,
    PacketIdentifierInUse = 0x91,
    PacketIdentifierNotFound = 0x92,
    ReceiveMaximumExceeded = 0x93,
    TopicAliasInvalid = 0x94,
    PacketTooLarge = 0x95,
    MessageRateTooHigh = 0x96,
    QuotaExceeded = 0x97,
    AdministrativeAction = 0x98,
    PayloadFormatInvalid = 0x99,
    RetainNotSupported = 0x9A,
    QoSNotSupported = 0x9B,
    UseAnotherServer = 0x9C,
    ServerMoved = 0x9D,
    SharedSubscriptionsNotSupported = 0x9E,
    ConnectionRateExceeded = 0x9F,
    MaximumConnectTime = 0xA0,
    SubscriptionIdentifiersNotSupported = 0xA1,
    WildcardSubscriptionsNotSupported = 0xA2,
}

use ReasonCode::*;

impl ReasonCode {
    /// Every reason code, in numeric order.
    pub const ALL: [ReasonCode; 43] = [
        Success,
        GrantedQoS1,
        GrantedQoS2,
        DisconnectWithWillMessage,
        NoMatchingSubscribers,
        NoSubscriptionExisted,
        ContinueAuthentication,
        ReAuthenticate,
        UnspecifiedError,
        MalformedPacket,
        ProtocolError,
        ImplementationSpecificError,
        UnsupportedProtocolVersion,
        ClientIdentifierNotValid,
        BadUserNameOrPassword,
        NotAuthorized,
        ServerUnavailable,
        ServerBusy,
        Banned,
        ServerShuttingDown,
        BadAuthenticationMethod,
        KeepAliveTimeout,
        SessionTakenOver,
        TopicFilterInvalid,
        TopicNameInvalid,
        PacketIdentifierInUse,
        PacketIdentifierNotFound,
        ReceiveMaximumExceeded,
        TopicAliasInvalid,
        PacketTooLarge,
        MessageRateTooHigh,
        QuotaExceeded,
        AdministrativeAction,
        PayloadFormatInvalid,
        RetainNotSupported,
        QoSNotSupported,
        UseAnotherServer,
        ServerMoved,
        SharedSubscriptionsNotSupported,
        ConnectionRateExceeded,
        MaximumConnectTime,
        SubscriptionIdentifiersNotSupported,
        WildcardSubscriptionsNotSupported,
    ];

    pub fn from_u8(code: u8) -> Option<Self> {
        Self::ALL.iter().copied().find(|c| *c as u8 == code)
    }

    /// True for the codes 0x80 and above, which report a failure.
    pub fn is_error(self) -> bool {
        self as u8 >= 0x80
    }

    /// Whether a packet of type `packet` may carry this code (MQTT 5.0 §2.4, table 2-6).
    pub fn allowed_in(self, packet: PacketType) -> bool {
        use PacketType as P;
        match packet {
            P::ConnAck => matches!(
                self,
                Success
                    | UnspecifiedError
                    | MalformedPacket
                    | ProtocolError
                    | ImplementationSpecificError
                    | UnsupportedProtocolVersion
                    | ClientIdentifierNotValid
                    | BadUserNameOrPassword
                    | NotAuthorized
                    | ServerUnavailable
                    | ServerBusy
                    | Banned
                    | BadAuthenticationMethod
                    | TopicNameInvalid
                    | PacketTooLarge
                    | QuotaExceeded
                    | PayloadFormatInvalid
                    | RetainNotSupported
                    | QoSNotSupported
                    | UseAnotherServer
                    | ServerMoved
                    | ConnectionRateExceeded
            ),
            P::PubAck | P::PubRec => matches!(
                self,
                Success
                    | NoMatchingSubscribers
                    | UnspecifiedError
                    | ImplementationSpecificError
                    | NotAuthorized
                    | TopicNameInvalid
                    | PacketIdentifierInUse
                    | QuotaExceeded
                    | PayloadFormatInvalid
            ),
            P::PubRel | P::PubComp => matches!(self, Success | PacketIdentifierNotFound),
            P::SubAck => matches!(
                self,
                Success
                    | GrantedQoS1
                    | GrantedQoS2
                    | UnspecifiedError
                    | ImplementationSpecificError
                    | NotAuthorized
                    | TopicFilterInvalid
                    | PacketIdentifierInUse
                    | QuotaExceeded
                    | SharedSubscriptionsNotSupported
                    | SubscriptionIdentifiersNotSupported
                    | WildcardSubscriptionsNotSupported
            ),
            P::UnsubAck => matches!(
                self,
                Success
                    | NoSubscriptionExisted
                    | UnspecifiedError
                    | ImplementationSpecificError
                    | NotAuthorized
                    | TopicFilterInvalid
                    | PacketIdentifierInUse
            ),
            P::Disconnect => matches!(
                self,
                Success
                    | DisconnectWithWillMessage
                    | UnspecifiedError
                    | MalformedPacket
                    | ProtocolError
                    | ImplementationSpecificError
                    | NotAuthorized
                    | ServerBusy
                    | ServerShuttingDown
                    | KeepAliveTimeout
                    | SessionTakenOver
                    | TopicFilterInvalid
                    | TopicNameInvalid
                    | ReceiveMaximumExceeded
                    | TopicAliasInvalid
                    | PacketTooLarge
                    | MessageRateTooHigh
                    | QuotaExceeded
                    | AdministrativeAction
                    | PayloadFormatInvalid
                    | RetainNotSupported
                    | QoSNotSupported
                    | UseAnotherServer
                    | ServerMoved
                    | SharedSubscriptionsNotSupported
                    | ConnectionRateExceeded
                    | MaximumConnectTime
                    | SubscriptionIdentifiersNotSupported
                    | WildcardSubscriptionsNotSupported
            ),
            P::Auth => matches!(self, Success | ContinueAuthentication | ReAuthenticate),
            _ => false,
        }
    }

    /// The MQTT 3.1.1 CONNACK return code (§3.2.2.3) nearest to this reason code. The six
    /// codes that 3.1.1 has map both ways; any other failure becomes 3, "Server unavailable".
    pub fn to_v311_connack(self) -> u8 {
        match self {
            Success => 0,
            UnsupportedProtocolVersion => 1,
            ClientIdentifierNotValid => 2,
            BadUserNameOrPassword | BadAuthenticationMethod => 4,
            NotAuthorized | Banned => 5,
            _ => 3,
        }
    }

    /// The reason code for an MQTT 3.1.1 CONNACK return code, if it is one of 0..=5.
    pub fn from_v311_connack(code: u8) -> Option<Self> {
        Some(match code {
            0 => Success,
            1 => UnsupportedProtocolVersion,
            2 => ClientIdentifierNotValid,
            3 => ServerUnavailable,
            4 => BadUserNameOrPassword,
            5 => NotAuthorized,
            _ => return None,
        })
    }

    /// The MQTT 3.1.1 SUBACK return code: granted QoS 0/1/2, or 0x80 for any failure.
    pub fn to_v311_suback(self) -> u8 {
        match self {
            Success | GrantedQoS1 | GrantedQoS2 => self as u8,
            _ => 0x80,
        }
    }

    /// The reason code for an MQTT 3.1.1 SUBACK return code (0, 1, 2 or 0x80).
    pub fn from_v311_suback(code: u8) -> Option<Self> {
        match code {
            0x00 | 0x01 | 0x02 | 0x80 => Self::from_u8(code),
            _ => None,
        }
    }
}

impl From<ReasonCode> for u8 {
    fn from(code: ReasonCode) -> u8 {
        code as u8
    }
}

/// Refuses to encode a reason code that `packet` may not carry.
pub(crate) fn check_reason(code: ReasonCode, packet: PacketType) -> Result<(), EncodeError> {
    if code.allowed_in(packet) {
        Ok(())
    } else {
        Err(EncodeError::InvalidReasonCode { packet, code })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_codes_are_listed_once_in_order() {
        for pair in ReasonCode::ALL.windows(2) {
            assert!((pair[0] as u8) < (pair[1] as u8));
        }
        for code in 0..=u8::MAX {
            if let Some(rc) = ReasonCode::from_u8(code) {
                assert_eq!(rc as u8, code);
            }
        }
        assert_eq!(ReasonCode::from_u8(0x03), None);
        assert_eq!(ReasonCode::from_u8(0xA3), None);
    }

    #[test]
    fn v311_connack_codes_map_both_ways() {
        for code in 0..=5 {
            let rc = ReasonCode::from_v311_connack(code).expect("0..=5 are defined");
            assert_eq!(rc.to_v311_connack(), code);
        }
        assert_eq!(ReasonCode::from_v311_connack(6), None);
        assert_eq!(ReasonCode::QuotaExceeded.to_v311_connack(), 3);
    }

    #[test]
    fn packets_carry_only_their_codes() {
        assert!(ReasonCode::NoMatchingSubscribers.allowed_in(PacketType::PubAck));
        assert!(!ReasonCode::NoMatchingSubscribers.allowed_in(PacketType::PubRel));
        assert!(ReasonCode::PacketIdentifierNotFound.allowed_in(PacketType::PubComp));
        assert!(!ReasonCode::GrantedQoS1.allowed_in(PacketType::UnsubAck));
        assert!(ReasonCode::ReAuthenticate.allowed_in(PacketType::Auth));
        assert!(!ReasonCode::Success.allowed_in(PacketType::Publish));
    }
}
