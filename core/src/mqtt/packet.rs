//! The MQTT control packets of 3.1.1 and 5.0 as plain structs, and the
//! MQTT 5 properties.
//!
//! One struct per packet serves both versions: fields that exist only in
//! MQTT 5 (properties, reason codes of acknowledgements) are ignored when a
//! 3.1.1 packet is written and are at their defaults when one is read.
//! Strings, topics and payloads are [`Bytes`] slices of the packet that
//! carried them, checked as UTF-8 where the spec says they are strings.

use bytes::{BufMut, Bytes};

use super::wire::{
    DecodeError, MAX_VARINT, Reader, binary_len, put_binary, put_varint, varint_len,
};

/// Protocol version, from the CONNECT protocol level.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub enum Version {
    /// MQTT 3.1.1, protocol level 4.
    #[default]
    V311,
    /// MQTT 5.0, protocol level 5.
    V5,
}

impl Version {
    /// The protocol level byte of CONNECT.
    pub fn level(self) -> u8 {
        match self {
            Version::V311 => 4,
            Version::V5 => 5,
        }
    }
}

/// Quality of service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub enum QoS {
    #[default]
    AtMostOnce = 0,
    AtLeastOnce = 1,
    ExactlyOnce = 2,
}

impl QoS {
    /// QoS from its two bits; 3 is malformed.
    pub fn from_u8(v: u8) -> Result<QoS, DecodeError> {
        match v {
            0 => Ok(QoS::AtMostOnce),
            1 => Ok(QoS::AtLeastOnce),
            2 => Ok(QoS::ExactlyOnce),
            _ => Err(DecodeError::Malformed("QoS 3")),
        }
    }
}

/// The control packet types (fixed header, high nibble).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
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
    pub fn name(self) -> &'static str {
        match self {
            PacketType::Connect => "CONNECT",
            PacketType::ConnAck => "CONNACK",
            PacketType::Publish => "PUBLISH",
            PacketType::PubAck => "PUBACK",
            PacketType::PubRec => "PUBREC",
            PacketType::PubRel => "PUBREL",
            PacketType::PubComp => "PUBCOMP",
            PacketType::Subscribe => "SUBSCRIBE",
            PacketType::SubAck => "SUBACK",
            PacketType::Unsubscribe => "UNSUBSCRIBE",
            PacketType::UnsubAck => "UNSUBACK",
            PacketType::PingReq => "PINGREQ",
            PacketType::PingResp => "PINGRESP",
            PacketType::Disconnect => "DISCONNECT",
            PacketType::Auth => "AUTH",
        }
    }

    pub(crate) fn from_u8(v: u8) -> Option<PacketType> {
        Some(match v {
            1 => PacketType::Connect,
            2 => PacketType::ConnAck,
            3 => PacketType::Publish,
            4 => PacketType::PubAck,
            5 => PacketType::PubRec,
            6 => PacketType::PubRel,
            7 => PacketType::PubComp,
            8 => PacketType::Subscribe,
            9 => PacketType::SubAck,
            10 => PacketType::Unsubscribe,
            11 => PacketType::UnsubAck,
            12 => PacketType::PingReq,
            13 => PacketType::PingResp,
            14 => PacketType::Disconnect,
            15 => PacketType::Auth,
            _ => return None,
        })
    }
}

/// A will message (CONNECT payload).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Will {
    pub topic: Bytes,
    pub payload: Bytes,
    pub qos: QoS,
    pub retain: bool,
    /// MQTT 5 will properties: will delay, message expiry, content type,
    /// response topic, correlation data, payload format, user properties.
    pub props: Properties,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Connect {
    pub version: Version,
    /// Clean Session (3.1.1) / Clean Start (5).
    pub clean_start: bool,
    /// Seconds; 0 turns keep alive off.
    pub keep_alive: u16,
    pub props: Properties,
    pub client_id: Bytes,
    pub will: Option<Will>,
    pub username: Option<Bytes>,
    pub password: Option<Bytes>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ConnAck {
    pub session_present: bool,
    /// MQTT 5 reason code, or the 3.1.1 return code.
    pub code: u8,
    pub props: Properties,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Publish {
    pub dup: bool,
    pub qos: QoS,
    pub retain: bool,
    /// Empty in MQTT 5 when a topic alias stands for it.
    pub topic: Bytes,
    /// 0 for QoS 0 (not on the wire).
    pub packet_id: u16,
    pub props: Properties,
    pub payload: Bytes,
}

/// PUBACK, PUBREC, PUBREL and PUBCOMP: a packet id, and in MQTT 5 a reason
/// code and properties.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PubResp {
    pub packet_id: u16,
    pub code: u8,
    pub props: Properties,
}

/// What to do with retained messages when a subscription is made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum RetainHandling {
    /// Send them at the time of the subscribe.
    #[default]
    SendAtSubscribe = 0,
    /// Send them only if the subscription did not exist.
    SendIfNew = 1,
    /// Do not send them.
    DontSend = 2,
}

/// The subscription options byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct SubOptions {
    /// Maximum QoS (the granted QoS once accepted).
    pub qos: QoS,
    /// MQTT 5: do not deliver the subscriber's own publishes.
    pub no_local: bool,
    /// MQTT 5: keep the RETAIN flag of forwarded messages.
    pub retain_as_published: bool,
    /// MQTT 5.
    pub retain_handling: RetainHandling,
}

impl SubOptions {
    pub fn qos(qos: QoS) -> SubOptions {
        SubOptions {
            qos,
            ..SubOptions::default()
        }
    }

    pub(crate) fn to_byte(self, version: Version) -> u8 {
        let mut b = self.qos as u8;
        if version == Version::V5 {
            b |= (self.no_local as u8) << 2
                | (self.retain_as_published as u8) << 3
                | (self.retain_handling as u8) << 4;
        }
        b
    }

    pub(crate) fn from_byte(b: u8, version: Version) -> Result<SubOptions, DecodeError> {
        let qos = QoS::from_u8(b & 0b11)?;
        match version {
            Version::V311 => {
                if b & !0b11 != 0 {
                    return Err(DecodeError::Malformed(
                        "reserved bits of the requested QoS byte",
                    ));
                }
                Ok(SubOptions::qos(qos))
            }
            Version::V5 => {
                if b & 0b1100_0000 != 0 {
                    return Err(DecodeError::Malformed(
                        "reserved bits of the subscription options",
                    ));
                }
                let retain_handling = match (b >> 4) & 0b11 {
                    0 => RetainHandling::SendAtSubscribe,
                    1 => RetainHandling::SendIfNew,
                    2 => RetainHandling::DontSend,
                    _ => return Err(DecodeError::Protocol("retain handling 3")),
                };
                Ok(SubOptions {
                    qos,
                    no_local: b & 0b100 != 0,
                    retain_as_published: b & 0b1000 != 0,
                    retain_handling,
                })
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Subscribe {
    pub packet_id: u16,
    pub props: Properties,
    /// Topic filters as sent (shared ones with their `$share/<group>/`).
    pub filters: Vec<(Bytes, SubOptions)>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SubAck {
    pub packet_id: u16,
    pub props: Properties,
    /// One per filter: granted QoS or a failure code.
    pub codes: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Unsubscribe {
    pub packet_id: u16,
    pub props: Properties,
    pub filters: Vec<Bytes>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct UnsubAck {
    pub packet_id: u16,
    pub props: Properties,
    /// MQTT 5: one per filter. Not on the wire in 3.1.1.
    pub codes: Vec<u8>,
}

/// DISCONNECT (MQTT 5: reason code and properties; 3.1.1: empty).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Disconnect {
    pub code: u8,
    pub props: Properties,
}

/// AUTH (MQTT 5 only).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Auth {
    pub code: u8,
    pub props: Properties,
}

/// One control packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Packet {
    Connect(Box<Connect>),
    ConnAck(ConnAck),
    Publish(Publish),
    PubAck(PubResp),
    PubRec(PubResp),
    PubRel(PubResp),
    PubComp(PubResp),
    Subscribe(Subscribe),
    SubAck(SubAck),
    Unsubscribe(Unsubscribe),
    UnsubAck(UnsubAck),
    PingReq,
    PingResp,
    Disconnect(Disconnect),
    Auth(Auth),
}

impl Packet {
    pub fn kind(&self) -> PacketType {
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
}

/// Property identifiers (spec 2.2.2.2).
pub mod prop {
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

/// Where a property block sits: decides which identifiers are allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PropsOf {
    Packet(PacketType),
    Will,
}

const fn bits(ids: &[u8]) -> u64 {
    let mut m = 0u64;
    let mut i = 0;
    while i < ids.len() {
        m |= 1 << ids[i];
        i += 1;
    }
    m
}

use prop::*;

const MESSAGE_PROPS: [u8; 5] = [
    PAYLOAD_FORMAT_INDICATOR,
    MESSAGE_EXPIRY_INTERVAL,
    CONTENT_TYPE,
    RESPONSE_TOPIC,
    CORRELATION_DATA,
];

impl PropsOf {
    /// The identifiers allowed here (bit `id` set), user properties always.
    pub fn allowed(self) -> u64 {
        let user = 1u64 << USER_PROPERTY;
        user | match self {
            PropsOf::Will => bits(&MESSAGE_PROPS) | bits(&[WILL_DELAY_INTERVAL]),
            PropsOf::Packet(t) => match t {
                PacketType::Connect => bits(&[
                    SESSION_EXPIRY_INTERVAL,
                    AUTHENTICATION_METHOD,
                    AUTHENTICATION_DATA,
                    REQUEST_PROBLEM_INFORMATION,
                    REQUEST_RESPONSE_INFORMATION,
                    RECEIVE_MAXIMUM,
                    TOPIC_ALIAS_MAXIMUM,
                    MAXIMUM_PACKET_SIZE,
                ]),
                PacketType::ConnAck => bits(&[
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
                    MAXIMUM_PACKET_SIZE,
                    WILDCARD_SUBSCRIPTION_AVAILABLE,
                    SUBSCRIPTION_IDENTIFIER_AVAILABLE,
                    SHARED_SUBSCRIPTION_AVAILABLE,
                ]),
                PacketType::Publish => {
                    bits(&MESSAGE_PROPS) | bits(&[SUBSCRIPTION_IDENTIFIER, TOPIC_ALIAS])
                }
                PacketType::PubAck
                | PacketType::PubRec
                | PacketType::PubRel
                | PacketType::PubComp
                | PacketType::SubAck
                | PacketType::UnsubAck => bits(&[REASON_STRING]),
                PacketType::Subscribe => bits(&[SUBSCRIPTION_IDENTIFIER]),
                PacketType::Unsubscribe => 0,
                PacketType::Disconnect => {
                    bits(&[SESSION_EXPIRY_INTERVAL, SERVER_REFERENCE, REASON_STRING])
                }
                PacketType::Auth => {
                    bits(&[AUTHENTICATION_METHOD, AUTHENTICATION_DATA, REASON_STRING])
                }
                PacketType::PingReq | PacketType::PingResp => 0,
            },
        }
    }
}

/// The MQTT 5 properties of one packet. Every field is `None` (or empty)
/// when the property is absent; which ones a packet may carry is checked on
/// decoding ([`PropsOf::allowed`]). Writing sends whatever is set.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Properties {
    pub payload_format_indicator: Option<u8>,
    pub message_expiry_interval: Option<u32>,
    pub content_type: Option<Bytes>,
    pub response_topic: Option<Bytes>,
    pub correlation_data: Option<Bytes>,
    /// PUBLISH to a client may carry several; SUBSCRIBE at most one.
    pub subscription_identifiers: Vec<u32>,
    pub session_expiry_interval: Option<u32>,
    pub assigned_client_identifier: Option<Bytes>,
    pub server_keep_alive: Option<u16>,
    pub authentication_method: Option<Bytes>,
    pub authentication_data: Option<Bytes>,
    pub request_problem_information: Option<u8>,
    pub will_delay_interval: Option<u32>,
    pub request_response_information: Option<u8>,
    pub response_information: Option<Bytes>,
    pub server_reference: Option<Bytes>,
    pub reason_string: Option<Bytes>,
    pub receive_maximum: Option<u16>,
    pub topic_alias_maximum: Option<u16>,
    pub topic_alias: Option<u16>,
    pub maximum_qos: Option<u8>,
    pub retain_available: Option<u8>,
    /// In order, duplicates kept (the spec allows both).
    pub user_properties: Vec<(Bytes, Bytes)>,
    pub maximum_packet_size: Option<u32>,
    pub wildcard_subscription_available: Option<u8>,
    pub subscription_identifier_available: Option<u8>,
    pub shared_subscription_available: Option<u8>,
}

fn once<T>(slot: &mut Option<T>, v: T) -> Result<(), DecodeError> {
    if slot.is_some() {
        return Err(DecodeError::Protocol("a property appears twice"));
    }
    *slot = Some(v);
    Ok(())
}

fn flag(r: &mut Reader) -> Result<u8, DecodeError> {
    match r.u8()? {
        v @ (0 | 1) => Ok(v),
        _ => Err(DecodeError::Protocol("a 0/1 property has another value")),
    }
}

impl Properties {
    pub fn is_empty(&self) -> bool {
        *self == Properties::default()
    }

    /// Reads a property block (its length, then the properties) for `of`.
    pub(crate) fn read(r: &mut Reader, of: PropsOf) -> Result<Properties, DecodeError> {
        let len = r.varint()? as usize;
        let mut r = r.sub(len)?;
        let allowed = of.allowed();
        let mut p = Properties::default();
        while !r.is_empty() {
            // Identifiers are variable byte integers; every defined one fits
            // one byte, so a longer one is unknown.
            let id = r.varint()?;
            if id >= 64 || allowed & (1u64 << id) == 0 {
                return Err(DecodeError::Malformed(
                    "property not allowed in this packet",
                ));
            }
            let id = id as u8;
            match id {
                PAYLOAD_FORMAT_INDICATOR => once(&mut p.payload_format_indicator, flag(&mut r)?)?,
                MESSAGE_EXPIRY_INTERVAL => once(&mut p.message_expiry_interval, r.u32()?)?,
                CONTENT_TYPE => once(&mut p.content_type, r.string()?)?,
                RESPONSE_TOPIC => {
                    let t = r.string()?;
                    if t.is_empty() || t.iter().any(|&b| b == b'+' || b == b'#') {
                        return Err(DecodeError::Protocol("response topic is not a topic name"));
                    }
                    once(&mut p.response_topic, t)?
                }
                CORRELATION_DATA => once(&mut p.correlation_data, r.binary()?)?,
                SUBSCRIPTION_IDENTIFIER => {
                    let v = r.varint()?;
                    if v == 0 {
                        return Err(DecodeError::Protocol("subscription identifier 0"));
                    }
                    if of == PropsOf::Packet(PacketType::Subscribe)
                        && !p.subscription_identifiers.is_empty()
                    {
                        return Err(DecodeError::Protocol("a property appears twice"));
                    }
                    p.subscription_identifiers.push(v);
                }
                SESSION_EXPIRY_INTERVAL => once(&mut p.session_expiry_interval, r.u32()?)?,
                ASSIGNED_CLIENT_IDENTIFIER => once(&mut p.assigned_client_identifier, r.string()?)?,
                SERVER_KEEP_ALIVE => once(&mut p.server_keep_alive, r.u16()?)?,
                AUTHENTICATION_METHOD => once(&mut p.authentication_method, r.string()?)?,
                AUTHENTICATION_DATA => once(&mut p.authentication_data, r.binary()?)?,
                REQUEST_PROBLEM_INFORMATION => {
                    once(&mut p.request_problem_information, flag(&mut r)?)?
                }
                WILL_DELAY_INTERVAL => once(&mut p.will_delay_interval, r.u32()?)?,
                REQUEST_RESPONSE_INFORMATION => {
                    once(&mut p.request_response_information, flag(&mut r)?)?
                }
                RESPONSE_INFORMATION => once(&mut p.response_information, r.string()?)?,
                SERVER_REFERENCE => once(&mut p.server_reference, r.string()?)?,
                REASON_STRING => once(&mut p.reason_string, r.string()?)?,
                RECEIVE_MAXIMUM => {
                    let v = r.u16()?;
                    if v == 0 {
                        return Err(DecodeError::Protocol("receive maximum 0"));
                    }
                    once(&mut p.receive_maximum, v)?
                }
                TOPIC_ALIAS_MAXIMUM => once(&mut p.topic_alias_maximum, r.u16()?)?,
                TOPIC_ALIAS => once(&mut p.topic_alias, r.u16()?)?,
                MAXIMUM_QOS => once(&mut p.maximum_qos, flag(&mut r)?)?,
                RETAIN_AVAILABLE => once(&mut p.retain_available, flag(&mut r)?)?,
                USER_PROPERTY => {
                    let k = r.string()?;
                    let v = r.string()?;
                    p.user_properties.push((k, v));
                }
                MAXIMUM_PACKET_SIZE => {
                    let v = r.u32()?;
                    if v == 0 {
                        return Err(DecodeError::Protocol("maximum packet size 0"));
                    }
                    once(&mut p.maximum_packet_size, v)?
                }
                WILDCARD_SUBSCRIPTION_AVAILABLE => {
                    once(&mut p.wildcard_subscription_available, flag(&mut r)?)?
                }
                SUBSCRIPTION_IDENTIFIER_AVAILABLE => {
                    once(&mut p.subscription_identifier_available, flag(&mut r)?)?
                }
                SHARED_SUBSCRIPTION_AVAILABLE => {
                    once(&mut p.shared_subscription_available, flag(&mut r)?)?
                }
                _ => return Err(DecodeError::Malformed("unknown property")),
            }
        }
        Ok(p)
    }

    /// Bytes of the properties themselves (without the block's length).
    pub fn len(&self) -> usize {
        let mut n = 0;
        let b = |v: &Option<u8>| v.map_or(0, |_| 2);
        let s = |v: &Option<u16>| v.map_or(0, |_| 3);
        let w = |v: &Option<u32>| v.map_or(0, |_| 5);
        let d = |v: &Option<Bytes>| v.as_ref().map_or(0, |x| 1 + binary_len(x));
        n += b(&self.payload_format_indicator);
        n += w(&self.message_expiry_interval);
        n += d(&self.content_type);
        n += d(&self.response_topic);
        n += d(&self.correlation_data);
        for &id in &self.subscription_identifiers {
            n += 1 + varint_len(id.min(MAX_VARINT) as usize);
        }
        n += w(&self.session_expiry_interval);
        n += d(&self.assigned_client_identifier);
        n += s(&self.server_keep_alive);
        n += d(&self.authentication_method);
        n += d(&self.authentication_data);
        n += b(&self.request_problem_information);
        n += w(&self.will_delay_interval);
        n += b(&self.request_response_information);
        n += d(&self.response_information);
        n += d(&self.server_reference);
        n += d(&self.reason_string);
        n += s(&self.receive_maximum);
        n += s(&self.topic_alias_maximum);
        n += s(&self.topic_alias);
        n += b(&self.maximum_qos);
        n += b(&self.retain_available);
        for (k, v) in &self.user_properties {
            n += 1 + binary_len(k) + binary_len(v);
        }
        n += w(&self.maximum_packet_size);
        n += b(&self.wildcard_subscription_available);
        n += b(&self.subscription_identifier_available);
        n += b(&self.shared_subscription_available);
        n
    }

    /// Bytes of the whole block: length prefix and properties.
    pub fn block_len(&self) -> usize {
        let n = self.len();
        varint_len(n) + n
    }

    /// Writes the block: its length, then every property set.
    pub(crate) fn write(&self, out: &mut impl BufMut) {
        put_varint(out, self.len());
        self.write_fields(out);
    }

    /// Writes every property set, without the block's length ([`len`]
    /// bytes).
    ///
    /// [`len`]: Properties::len
    pub(crate) fn write_fields(&self, out: &mut impl BufMut) {
        let b = |out: &mut dyn BufMut, id: u8, v: Option<u8>| {
            if let Some(v) = v {
                out.put_u8(id);
                out.put_u8(v);
            }
        };
        let s = |out: &mut dyn BufMut, id: u8, v: Option<u16>| {
            if let Some(v) = v {
                out.put_u8(id);
                out.put_u16(v);
            }
        };
        let w = |out: &mut dyn BufMut, id: u8, v: Option<u32>| {
            if let Some(v) = v {
                out.put_u8(id);
                out.put_u32(v);
            }
        };
        let d = |out: &mut dyn BufMut, id: u8, v: &Option<Bytes>| {
            if let Some(v) = v {
                out.put_u8(id);
                let v = &v[..v.len().min(u16::MAX as usize)];
                out.put_u16(v.len() as u16);
                out.put_slice(v);
            }
        };
        b(out, PAYLOAD_FORMAT_INDICATOR, self.payload_format_indicator);
        w(out, MESSAGE_EXPIRY_INTERVAL, self.message_expiry_interval);
        d(out, CONTENT_TYPE, &self.content_type);
        d(out, RESPONSE_TOPIC, &self.response_topic);
        d(out, CORRELATION_DATA, &self.correlation_data);
        for &id in &self.subscription_identifiers {
            out.put_u8(SUBSCRIPTION_IDENTIFIER);
            put_varint(&mut *out, id.min(MAX_VARINT) as usize);
        }
        w(out, SESSION_EXPIRY_INTERVAL, self.session_expiry_interval);
        d(
            out,
            ASSIGNED_CLIENT_IDENTIFIER,
            &self.assigned_client_identifier,
        );
        s(out, SERVER_KEEP_ALIVE, self.server_keep_alive);
        d(out, AUTHENTICATION_METHOD, &self.authentication_method);
        d(out, AUTHENTICATION_DATA, &self.authentication_data);
        b(
            out,
            REQUEST_PROBLEM_INFORMATION,
            self.request_problem_information,
        );
        w(out, WILL_DELAY_INTERVAL, self.will_delay_interval);
        b(
            out,
            REQUEST_RESPONSE_INFORMATION,
            self.request_response_information,
        );
        d(out, RESPONSE_INFORMATION, &self.response_information);
        d(out, SERVER_REFERENCE, &self.server_reference);
        d(out, REASON_STRING, &self.reason_string);
        s(out, RECEIVE_MAXIMUM, self.receive_maximum);
        s(out, TOPIC_ALIAS_MAXIMUM, self.topic_alias_maximum);
        s(out, TOPIC_ALIAS, self.topic_alias);
        b(out, MAXIMUM_QOS, self.maximum_qos);
        b(out, RETAIN_AVAILABLE, self.retain_available);
        for (k, v) in &self.user_properties {
            out.put_u8(USER_PROPERTY);
            put_binary(&mut *out, k);
            put_binary(&mut *out, v);
        }
        w(out, MAXIMUM_PACKET_SIZE, self.maximum_packet_size);
        b(
            out,
            WILDCARD_SUBSCRIPTION_AVAILABLE,
            self.wildcard_subscription_available,
        );
        b(
            out,
            SUBSCRIPTION_IDENTIFIER_AVAILABLE,
            self.subscription_identifier_available,
        );
        b(
            out,
            SHARED_SUBSCRIPTION_AVAILABLE,
            self.shared_subscription_available,
        );
    }
}
