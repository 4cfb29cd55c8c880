//! MQTT 5.0 properties (§2.2.2): one struct holding every property, and the table of which
//! packet may carry which.
//!
//! Decoding refuses an unknown identifier, a property on a packet that may not carry it,
//! a property given twice (except User Property, and Subscription Identifier on PUBLISH), and
//! values the spec forbids (0 for Receive Maximum, Topic Alias, Maximum Packet Size and
//! Subscription Identifier; anything but 0/1 for the boolean bytes; QoS 2 as Maximum QoS).

use std::num::{NonZeroU16, NonZeroU32};

use bytes::{BufMut, Bytes, BytesMut};

use super::wire::{field_len, put_binary, put_string, put_varint, varint_len, Reader, MAX_VARINT};
use super::{DecodeError, EncodeError, PacketType, QoS};
use crate::topic::TopicName;

/// Property identifiers (MQTT 5.0 §2.2.2.2).
pub mod id {
    pub const PAYLOAD_FORMAT_INDICATOR: u8 = 0x01;
    pub const MESSAGE_EXPIRY_INTERVAL: u8 = 0x02;
    pub const CONTENT_TYPE: u8 = 0x03;
    pub const RESPONSE_TOPIC: u8 = 0x08;
    pub const CORRELATION_DATA: u8 = 0x09;
    pub const SUBSCRIPTION_IDENTIFIER: u8 = 0x0B;
    pub const SESSION_EXPIRY_INTERVAL: u8 = 0x11;
    pub const ASSIGNED_CLIENT_IDENTIFIER: u8 = 0x12;
    pub const SERVER_KEEP_ALIVE: u8 = 0x13;
    pub const AUTHENTICATION_METHOD: u8 = 0x15;
    pub const AUTHENTICATION_DATA: u8 = 0x16;
    pub const REQUEST_PROBLEM_INFORMATION: u8 = 0x17;
    pub const WILL_DELAY_INTERVAL: u8 = 0x18;
    pub const REQUEST_RESPONSE_INFORMATION: u8 = 0x19;
    pub const RESPONSE_INFORMATION: u8 = 0x1A;
    pub const SERVER_REFERENCE: u8 = 0x1C;
    pub const REASON_STRING: u8 = 0x1F;
    pub const RECEIVE_MAXIMUM: u8 = 0x21;
    pub const TOPIC_ALIAS_MAXIMUM: u8 = 0x22;
    pub const TOPIC_ALIAS: u8 = 0x23;
    pub const MAXIMUM_QOS: u8 = 0x24;
    pub const RETAIN_AVAILABLE: u8 = 0x25;
    pub const USER_PROPERTY: u8 = 0x26;
    pub const MAXIMUM_PACKET_SIZE: u8 = 0x27;
    pub const WILDCARD_SUBSCRIPTION_AVAILABLE: u8 = 0x28;
    pub const SUBSCRIPTION_IDENTIFIER_AVAILABLE: u8 = 0x29;
    pub const SHARED_SUBSCRIPTION_AVAILABLE: u8 = 0x2A;
}

/// The human name of a property identifier, for error messages.
pub fn property_name(property: u8) -> &'static str {
    match property {
        id::PAYLOAD_FORMAT_INDICATOR => "Payload Format Indicator",
        id::MESSAGE_EXPIRY_INTERVAL => "Message Expiry Interval",
        id::CONTENT_TYPE => "Content Type",
        id::RESPONSE_TOPIC => "Response Topic",
        id::CORRELATION_DATA => "Correlation Data",
        id::SUBSCRIPTION_IDENTIFIER => "Subscription Identifier",
        id::SESSION_EXPIRY_INTERVAL => "Session Expiry Interval",
        id::ASSIGNED_CLIENT_IDENTIFIER => "Assigned Client Identifier",
        id::SERVER_KEEP_ALIVE => "Server Keep Alive",
        id::AUTHENTICATION_METHOD => "Authentication Method",
        id::AUTHENTICATION_DATA => "Authentication Data",
        id::REQUEST_PROBLEM_INFORMATION => "Request Problem Information",
        id::WILL_DELAY_INTERVAL => "Will Delay Interval",
        id::REQUEST_RESPONSE_INFORMATION => "Request Response Information",
        id::RESPONSE_INFORMATION => "Response Information",
        id::SERVER_REFERENCE => "Server Reference",
        id::REASON_STRING => "Reason String",
        id::RECEIVE_MAXIMUM => "Receive Maximum",
        id::TOPIC_ALIAS_MAXIMUM => "Topic Alias Maximum",
        id::TOPIC_ALIAS => "Topic Alias",
        id::MAXIMUM_QOS => "Maximum QoS",
        id::RETAIN_AVAILABLE => "Retain Available",
        id::USER_PROPERTY => "User Property",
        id::MAXIMUM_PACKET_SIZE => "Maximum Packet Size",
        id::WILDCARD_SUBSCRIPTION_AVAILABLE => "Wildcard Subscription Available",
        id::SUBSCRIPTION_IDENTIFIER_AVAILABLE => "Subscription Identifier Available",
        id::SHARED_SUBSCRIPTION_AVAILABLE => "Shared Subscription Available",
        _ => "unknown",
    }
}

/// Where a property list sits: a packet type, or the will properties inside CONNECT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PropertyContext {
    Packet(PacketType),
    Will,
}

impl PropertyContext {
    /// The packet type named in errors (a will's properties are part of CONNECT).
    fn packet(self) -> PacketType {
        match self {
            PropertyContext::Packet(p) => p,
            PropertyContext::Will => PacketType::Connect,
        }
    }

    /// Bit `n` set means property `n` may appear (MQTT 5.0 §2.2.2.2, table 2-4).
    fn allowed(self) -> u64 {
        use id::*;
        const fn mask(ids: &[u8]) -> u64 {
            let mut m = 0u64;
            let mut i = 0;
            while i < ids.len() {
                m |= 1 << ids[i];
                i += 1;
            }
            m
        }
        const ACKS: u64 = mask(&[REASON_STRING, USER_PROPERTY]);
        match self {
            PropertyContext::Will => mask(&[
                PAYLOAD_FORMAT_INDICATOR,
                MESSAGE_EXPIRY_INTERVAL,
                CONTENT_TYPE,
                RESPONSE_TOPIC,
                CORRELATION_DATA,
                WILL_DELAY_INTERVAL,
                USER_PROPERTY,
            ]),
            PropertyContext::Packet(packet) => match packet {
                PacketType::Publish => mask(&[
                    PAYLOAD_FORMAT_INDICATOR,
                    MESSAGE_EXPIRY_INTERVAL,
                    CONTENT_TYPE,
                    RESPONSE_TOPIC,
                    CORRELATION_DATA,
                    SUBSCRIPTION_IDENTIFIER,
                    TOPIC_ALIAS,
                    USER_PROPERTY,
                ]),
                PacketType::Connect => mask(&[
                    SESSION_EXPIRY_INTERVAL,
                    AUTHENTICATION_METHOD,
                    AUTHENTICATION_DATA,
                    REQUEST_PROBLEM_INFORMATION,
                    REQUEST_RESPONSE_INFORMATION,
                    RECEIVE_MAXIMUM,
                    TOPIC_ALIAS_MAXIMUM,
                    USER_PROPERTY,
                    MAXIMUM_PACKET_SIZE,
                ]),
                PacketType::ConnAck => mask(&[
                    SESSION_EXPIRY_INTERVAL,
                    ASSIGNED_CLIENT_IDENTIFIER,
                    SERVER_KEEP_ALIVE,
                    AUTHENTICATION_METHOD,
                    AUTHENTICATION_DATA,
                    RESPONSE_INFORMATION,
                    SERVER_REFERENCE,
                    REASON_STRING,
                    RECEIVE_MAXIMUM,
                    TOPIC_ALIAS_MAXIMUM,
                    MAXIMUM_QOS,
                    RETAIN_AVAILABLE,
                    USER_PROPERTY,
                    MAXIMUM_PACKET_SIZE,
                    WILDCARD_SUBSCRIPTION_AVAILABLE,
                    SUBSCRIPTION_IDENTIFIER_AVAILABLE,
                    SHARED_SUBSCRIPTION_AVAILABLE,
                ]),
                PacketType::PubAck
                | PacketType::PubRec
                | PacketType::PubRel
                | PacketType::PubComp
                | PacketType::SubAck
                | PacketType::UnsubAck => ACKS,
                PacketType::Subscribe => mask(&[SUBSCRIPTION_IDENTIFIER, USER_PROPERTY]),
                PacketType::Unsubscribe => mask(&[USER_PROPERTY]),
                PacketType::Disconnect => mask(&[
                    SESSION_EXPIRY_INTERVAL,
                    SERVER_REFERENCE,
                    REASON_STRING,
                    USER_PROPERTY,
                ]),
                PacketType::Auth => mask(&[
                    AUTHENTICATION_METHOD,
                    AUTHENTICATION_DATA,
                    REASON_STRING,
                    USER_PROPERTY,
                ]),
                PacketType::PingReq | PacketType::PingResp => 0,
            },
        }
    }

    /// Whether property `property` may appear here.
    pub fn allows(self, property: u8) -> bool {
        property < 64 && self.allowed() & (1 << property) != 0
    }
}

/// The properties of a packet: a pointer, null while there are none.
///
/// Most packets carry no properties (every 3.1.1 packet, most v5 PUBLISH traffic), so they
/// cost one word and no allocation; the first write through `DerefMut` allocates the full
/// [`PropertyValues`]. Read fields through `Deref` as if it were that struct:
/// `publish.properties.content_type`. Which properties a packet may carry is checked on
/// decode and encode; MQTT 3.1.1 has none, and encoding for 3.1.1 leaves them out.
#[derive(Clone, Default)]
pub struct Properties(Option<Box<PropertyValues>>);

/// Every MQTT 5.0 property. Field names carry units (`_secs`); a `None` or empty field is
/// absent on the wire.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PropertyValues {
    /// `Some(true)`: the payload is UTF-8 text; `Some(false)`: unspecified bytes.
    pub payload_format_utf8: Option<bool>,
    pub message_expiry_interval_secs: Option<u32>,
    pub content_type: Option<String>,
    pub response_topic: Option<TopicName>,
    pub correlation_data: Option<Bytes>,
    /// One on SUBSCRIBE; on a PUBLISH to a client, one per matching subscription.
    pub subscription_identifiers: Vec<NonZeroU32>,
    pub session_expiry_interval_secs: Option<u32>,
    pub assigned_client_identifier: Option<String>,
    pub server_keep_alive_secs: Option<u16>,
    pub authentication_method: Option<String>,
    pub authentication_data: Option<Bytes>,
    pub request_problem_information: Option<bool>,
    pub will_delay_interval_secs: Option<u32>,
    pub request_response_information: Option<bool>,
    pub response_information: Option<String>,
    pub server_reference: Option<String>,
    pub reason_string: Option<String>,
    pub receive_maximum: Option<NonZeroU16>,
    pub topic_alias_maximum: Option<u16>,
    pub topic_alias: Option<NonZeroU16>,
    /// Only [`QoS::AtMostOnce`] or [`QoS::AtLeastOnce`] may be sent.
    pub maximum_qos: Option<QoS>,
    pub retain_available: Option<bool>,
    /// In the order received; names may repeat.
    pub user_properties: Vec<(String, String)>,
    pub maximum_packet_size: Option<NonZeroU32>,
    pub wildcard_subscription_available: Option<bool>,
    pub subscription_identifiers_available: Option<bool>,
    pub shared_subscription_available: Option<bool>,
}

/// No properties at all, for reading through an empty [`Properties`].
static EMPTY: PropertyValues = PropertyValues {
    payload_format_utf8: None,
    message_expiry_interval_secs: None,
    content_type: None,
    response_topic: None,
    correlation_data: None,
    subscription_identifiers: Vec::new(),
    session_expiry_interval_secs: None,
    assigned_client_identifier: None,
    server_keep_alive_secs: None,
    authentication_method: None,
    authentication_data: None,
    request_problem_information: None,
    will_delay_interval_secs: None,
    request_response_information: None,
    response_information: None,
    server_reference: None,
    reason_string: None,
    receive_maximum: None,
    topic_alias_maximum: None,
    topic_alias: None,
    maximum_qos: None,
    retain_available: None,
    user_properties: Vec::new(),
    maximum_packet_size: None,
    wildcard_subscription_available: None,
    subscription_identifiers_available: None,
    shared_subscription_available: None,
};

impl std::ops::Deref for Properties {
    type Target = PropertyValues;
    fn deref(&self) -> &PropertyValues {
        self.0.as_deref().unwrap_or(&EMPTY)
    }
}

impl std::ops::DerefMut for Properties {
    /// Allocates the values on first use.
    fn deref_mut(&mut self) -> &mut PropertyValues {
        self.0.get_or_insert_with(Default::default)
    }
}

impl From<PropertyValues> for Properties {
    fn from(values: PropertyValues) -> Self {
        Self(Some(Box::new(values)))
    }
}

/// Equal when they carry the same properties, however they are stored.
impl PartialEq for Properties {
    fn eq(&self, other: &Self) -> bool {
        **self == **other
    }
}

impl Eq for Properties {}

impl std::fmt::Debug for Properties {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.is_empty() {
            f.write_str("Properties {}")
        } else {
            std::fmt::Debug::fmt(&**self, f)
        }
    }
}

impl Properties {
    /// True when no property is present.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.0.as_deref().is_none_or(|v| *v == EMPTY)
    }

    /// Reads a property list (its length, then the properties) for `ctx`.
    pub(crate) fn read(r: &mut Reader, ctx: PropertyContext) -> Result<Self, DecodeError> {
        let len = r.varint()? as usize;
        if len == 0 {
            return Ok(Properties::default());
        }
        let mut r = r.take(len)?;
        let mut p = PropertyValues::default();
        let mut seen = 0u64;
        while !r.is_empty() {
            let raw = r.varint()?;
            let property = u8::try_from(raw)
                .ok()
                .filter(|&p| property_name(p) != "unknown")
                .ok_or(DecodeError::UnknownProperty(raw))?;
            if !ctx.allows(property) {
                return Err(DecodeError::PropertyNotAllowed {
                    property,
                    packet: ctx.packet(),
                });
            }
            let repeatable = property == id::USER_PROPERTY
                || (property == id::SUBSCRIPTION_IDENTIFIER
                    && ctx == PropertyContext::Packet(PacketType::Publish));
            if seen & (1 << property) != 0 && !repeatable {
                return Err(DecodeError::DuplicateProperty { property });
            }
            seen |= 1 << property;
            p.read_one(&mut r, property)?;
        }
        Ok(p.into())
    }

    /// Checks that every present property is allowed in `ctx` and in range, and returns the
    /// encoded length of the property list without its length prefix.
    #[inline]
    pub(crate) fn encoded_len(&self, ctx: PropertyContext) -> Result<usize, EncodeError> {
        match self.0.as_deref() {
            None => Ok(0),
            Some(values) => values.encoded_len(ctx),
        }
    }

    /// Writes the length prefix and the properties; `len` comes from [`Self::encoded_len`].
    #[inline]
    pub(crate) fn write(&self, buf: &mut BytesMut, len: usize) -> Result<(), EncodeError> {
        put_varint(buf, len)?;
        match self.0.as_deref() {
            Some(values) if len > 0 => values.write(buf),
            _ => Ok(()),
        }
    }
}

impl PropertyValues {
    fn read_one(&mut self, r: &mut Reader, property: u8) -> Result<(), DecodeError> {
        let invalid = |value: u32| DecodeError::InvalidPropertyValue { property, value };
        let flag = |r: &mut Reader| -> Result<bool, DecodeError> {
            match r.u8()? {
                0 => Ok(false),
                1 => Ok(true),
                v => Err(invalid(u32::from(v))),
            }
        };
        let string = |r: &mut Reader| r.string().map(String::from);
        use id::*;
        match property {
            PAYLOAD_FORMAT_INDICATOR => self.payload_format_utf8 = Some(flag(r)?),
            MESSAGE_EXPIRY_INTERVAL => self.message_expiry_interval_secs = Some(r.u32()?),
            CONTENT_TYPE => self.content_type = Some(string(r)?),
            RESPONSE_TOPIC => {
                let topic = TopicName::new(r.string()?).map_err(DecodeError::TopicName)?;
                self.response_topic = Some(topic);
            }
            CORRELATION_DATA => self.correlation_data = Some(r.binary()?),
            SUBSCRIPTION_IDENTIFIER => {
                let v = r.varint()?;
                self.subscription_identifiers
                    .push(NonZeroU32::new(v).ok_or(invalid(v))?);
            }
            SESSION_EXPIRY_INTERVAL => self.session_expiry_interval_secs = Some(r.u32()?),
            ASSIGNED_CLIENT_IDENTIFIER => self.assigned_client_identifier = Some(string(r)?),
            SERVER_KEEP_ALIVE => self.server_keep_alive_secs = Some(r.u16()?),
            AUTHENTICATION_METHOD => self.authentication_method = Some(string(r)?),
            AUTHENTICATION_DATA => self.authentication_data = Some(r.binary()?),
            REQUEST_PROBLEM_INFORMATION => self.request_problem_information = Some(flag(r)?),
            WILL_DELAY_INTERVAL => self.will_delay_interval_secs = Some(r.u32()?),
            REQUEST_RESPONSE_INFORMATION => self.request_response_information = Some(flag(r)?),
            RESPONSE_INFORMATION => self.response_information = Some(string(r)?),
            SERVER_REFERENCE => self.server_reference = Some(string(r)?),
            REASON_STRING => self.reason_string = Some(string(r)?),
            RECEIVE_MAXIMUM => {
                let v = r.u16()?;
                self.receive_maximum = Some(NonZeroU16::new(v).ok_or(invalid(v.into()))?);
            }
            TOPIC_ALIAS_MAXIMUM => self.topic_alias_maximum = Some(r.u16()?),
            TOPIC_ALIAS => {
                let v = r.u16()?;
                self.topic_alias = Some(NonZeroU16::new(v).ok_or(invalid(v.into()))?);
            }
            MAXIMUM_QOS => {
                self.maximum_qos = Some(match r.u8()? {
                    0 => QoS::AtMostOnce,
                    1 => QoS::AtLeastOnce,
                    v => return Err(invalid(v.into())),
                })
            }
            RETAIN_AVAILABLE => self.retain_available = Some(flag(r)?),
            USER_PROPERTY => {
                let name = string(r)?;
                let value = string(r)?;
                self.user_properties.push((name, value));
            }
            MAXIMUM_PACKET_SIZE => {
                let v = r.u32()?;
                self.maximum_packet_size = Some(NonZeroU32::new(v).ok_or(invalid(v))?);
            }
            WILDCARD_SUBSCRIPTION_AVAILABLE => {
                self.wildcard_subscription_available = Some(flag(r)?)
            }
            SUBSCRIPTION_IDENTIFIER_AVAILABLE => {
                self.subscription_identifiers_available = Some(flag(r)?)
            }
            SHARED_SUBSCRIPTION_AVAILABLE => self.shared_subscription_available = Some(flag(r)?),
            _ => unreachable!("property ids are checked against property_name before read_one"),
        }
        Ok(())
    }

    /// Each present property as (identifier, encoded size without the identifier).
    fn present(&self) -> impl Iterator<Item = (u8, usize)> + '_ {
        use id::*;
        let opt = |present: bool, property: u8, len: usize| present.then_some((property, len));
        let s = |v: &Option<String>| v.as_ref().map_or(0, |s| field_len(s.as_bytes()));
        let b = |v: &Option<Bytes>| v.as_ref().map_or(0, |b| field_len(b));
        [
            opt(
                self.payload_format_utf8.is_some(),
                PAYLOAD_FORMAT_INDICATOR,
                1,
            ),
            opt(
                self.message_expiry_interval_secs.is_some(),
                MESSAGE_EXPIRY_INTERVAL,
                4,
            ),
            opt(
                self.content_type.is_some(),
                CONTENT_TYPE,
                s(&self.content_type),
            ),
            opt(
                self.response_topic.is_some(),
                RESPONSE_TOPIC,
                self.response_topic
                    .as_ref()
                    .map_or(0, |t| field_len(t.as_str().as_bytes())),
            ),
            opt(
                self.correlation_data.is_some(),
                CORRELATION_DATA,
                b(&self.correlation_data),
            ),
            opt(
                self.session_expiry_interval_secs.is_some(),
                SESSION_EXPIRY_INTERVAL,
                4,
            ),
            opt(
                self.assigned_client_identifier.is_some(),
                ASSIGNED_CLIENT_IDENTIFIER,
                s(&self.assigned_client_identifier),
            ),
            opt(self.server_keep_alive_secs.is_some(), SERVER_KEEP_ALIVE, 2),
            opt(
                self.authentication_method.is_some(),
                AUTHENTICATION_METHOD,
                s(&self.authentication_method),
            ),
            opt(
                self.authentication_data.is_some(),
                AUTHENTICATION_DATA,
                b(&self.authentication_data),
            ),
            opt(
                self.request_problem_information.is_some(),
                REQUEST_PROBLEM_INFORMATION,
                1,
            ),
            opt(
                self.will_delay_interval_secs.is_some(),
                WILL_DELAY_INTERVAL,
                4,
            ),
            opt(
                self.request_response_information.is_some(),
                REQUEST_RESPONSE_INFORMATION,
                1,
            ),
            opt(
                self.response_information.is_some(),
                RESPONSE_INFORMATION,
                s(&self.response_information),
            ),
            opt(
                self.server_reference.is_some(),
                SERVER_REFERENCE,
                s(&self.server_reference),
            ),
            opt(
                self.reason_string.is_some(),
                REASON_STRING,
                s(&self.reason_string),
            ),
            opt(self.receive_maximum.is_some(), RECEIVE_MAXIMUM, 2),
            opt(self.topic_alias_maximum.is_some(), TOPIC_ALIAS_MAXIMUM, 2),
            opt(self.topic_alias.is_some(), TOPIC_ALIAS, 2),
            opt(self.maximum_qos.is_some(), MAXIMUM_QOS, 1),
            opt(self.retain_available.is_some(), RETAIN_AVAILABLE, 1),
            opt(self.maximum_packet_size.is_some(), MAXIMUM_PACKET_SIZE, 4),
            opt(
                self.wildcard_subscription_available.is_some(),
                WILDCARD_SUBSCRIPTION_AVAILABLE,
                1,
            ),
            opt(
                self.subscription_identifiers_available.is_some(),
                SUBSCRIPTION_IDENTIFIER_AVAILABLE,
                1,
            ),
            opt(
                self.shared_subscription_available.is_some(),
                SHARED_SUBSCRIPTION_AVAILABLE,
                1,
            ),
        ]
        .into_iter()
        .flatten()
        .chain(
            self.subscription_identifiers
                .iter()
                .map(|v| (SUBSCRIPTION_IDENTIFIER, varint_len(v.get() as usize))),
        )
        .chain(self.user_properties.iter().map(|(k, v)| {
            (
                USER_PROPERTY,
                field_len(k.as_bytes()) + field_len(v.as_bytes()),
            )
        }))
    }

    fn encoded_len(&self, ctx: PropertyContext) -> Result<usize, EncodeError> {
        let mut len = 0;
        for (property, size) in self.present() {
            if !ctx.allows(property) {
                return Err(EncodeError::PropertyNotAllowed {
                    property,
                    packet: ctx.packet(),
                });
            }
            len += 1 + size;
        }
        if self.subscription_identifiers.len() > 1
            && ctx != PropertyContext::Packet(PacketType::Publish)
        {
            return Err(EncodeError::PropertyNotAllowed {
                property: id::SUBSCRIPTION_IDENTIFIER,
                packet: ctx.packet(),
            });
        }
        if let Some(v) = self
            .subscription_identifiers
            .iter()
            .find(|v| v.get() > MAX_VARINT)
        {
            return Err(EncodeError::VarIntTooLarge { value: v.get() });
        }
        if self.maximum_qos == Some(QoS::ExactlyOnce) {
            return Err(EncodeError::PropertyNotAllowed {
                property: id::MAXIMUM_QOS,
                packet: ctx.packet(),
            });
        }
        Ok(len)
    }

    fn write(&self, buf: &mut BytesMut) -> Result<(), EncodeError> {
        use id::*;
        let flag = |buf: &mut BytesMut, property: u8, v: Option<bool>| {
            if let Some(v) = v {
                buf.put_u8(property);
                buf.put_u8(u8::from(v));
            }
        };
        let string = |buf: &mut BytesMut, property: u8, v: &Option<String>| {
            if let Some(v) = v {
                buf.put_u8(property);
                put_string(buf, v)?;
            }
            Ok::<(), EncodeError>(())
        };
        let binary = |buf: &mut BytesMut, property: u8, v: &Option<Bytes>| {
            if let Some(v) = v {
                buf.put_u8(property);
                put_binary(buf, v)?;
            }
            Ok::<(), EncodeError>(())
        };
        let u32_ = |buf: &mut BytesMut, property: u8, v: Option<u32>| {
            if let Some(v) = v {
                buf.put_u8(property);
                buf.put_u32(v);
            }
        };
        let u16_ = |buf: &mut BytesMut, property: u8, v: Option<u16>| {
            if let Some(v) = v {
                buf.put_u8(property);
                buf.put_u16(v);
            }
        };
        flag(buf, PAYLOAD_FORMAT_INDICATOR, self.payload_format_utf8);
        u32_(
            buf,
            MESSAGE_EXPIRY_INTERVAL,
            self.message_expiry_interval_secs,
        );
        string(buf, CONTENT_TYPE, &self.content_type)?;
        if let Some(topic) = &self.response_topic {
            buf.put_u8(RESPONSE_TOPIC);
            put_string(buf, topic.as_str())?;
        }
        binary(buf, CORRELATION_DATA, &self.correlation_data)?;
        u32_(
            buf,
            SESSION_EXPIRY_INTERVAL,
            self.session_expiry_interval_secs,
        );
        string(
            buf,
            ASSIGNED_CLIENT_IDENTIFIER,
            &self.assigned_client_identifier,
        )?;
        u16_(buf, SERVER_KEEP_ALIVE, self.server_keep_alive_secs);
        string(buf, AUTHENTICATION_METHOD, &self.authentication_method)?;
        binary(buf, AUTHENTICATION_DATA, &self.authentication_data)?;
        flag(
            buf,
            REQUEST_PROBLEM_INFORMATION,
            self.request_problem_information,
        );
        u32_(buf, WILL_DELAY_INTERVAL, self.will_delay_interval_secs);
        flag(
            buf,
            REQUEST_RESPONSE_INFORMATION,
            self.request_response_information,
        );
        string(buf, RESPONSE_INFORMATION, &self.response_information)?;
        string(buf, SERVER_REFERENCE, &self.server_reference)?;
        string(buf, REASON_STRING, &self.reason_string)?;
        u16_(
            buf,
            RECEIVE_MAXIMUM,
            self.receive_maximum.map(NonZeroU16::get),
        );
        u16_(buf, TOPIC_ALIAS_MAXIMUM, self.topic_alias_maximum);
        u16_(buf, TOPIC_ALIAS, self.topic_alias.map(NonZeroU16::get));
        if let Some(qos) = self.maximum_qos {
            buf.put_u8(MAXIMUM_QOS);
            buf.put_u8(qos as u8);
        }
        flag(buf, RETAIN_AVAILABLE, self.retain_available);
        u32_(
            buf,
            MAXIMUM_PACKET_SIZE,
            self.maximum_packet_size.map(NonZeroU32::get),
        );
        flag(
            buf,
            WILDCARD_SUBSCRIPTION_AVAILABLE,
            self.wildcard_subscription_available,
        );
        flag(
            buf,
            SUBSCRIPTION_IDENTIFIER_AVAILABLE,
            self.subscription_identifiers_available,
        );
        flag(
            buf,
            SHARED_SUBSCRIPTION_AVAILABLE,
            self.shared_subscription_available,
        );
        for v in &self.subscription_identifiers {
            buf.put_u8(SUBSCRIPTION_IDENTIFIER);
            put_varint(buf, v.get() as usize)?;
        }
        for (k, v) in &self.user_properties {
            buf.put_u8(USER_PROPERTY);
            put_string(buf, k)?;
            put_string(buf, v)?;
        }
        Ok(())
    }
}

/// The encoded size of a property list with its length prefix.
#[inline]
pub(crate) fn properties_len(p: &Properties, ctx: PropertyContext) -> Result<usize, EncodeError> {
    let len = p.encoded_len(ctx)?;
    Ok(varint_len(len) + len)
}

/// Writes a property list with its length prefix.
#[inline]
pub(crate) fn write_properties(
    buf: &mut BytesMut,
    p: &Properties,
    ctx: PropertyContext,
) -> Result<(), EncodeError> {
    let len = p.encoded_len(ctx)?;
    p.write(buf, len)
}
