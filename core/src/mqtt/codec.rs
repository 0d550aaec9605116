//! Reading and writing MQTT control packets.
//!
//! Decoding is two steps, as in the relay's own codec: [`check`] reads the
//! fixed header only and refuses a packet larger than the maximum packet
//! size before a byte of its body is buffered; [`parse`] turns one whole
//! body into a [`Packet`]. [`Decoder::decode`] does both off a `BytesMut`
//! and returns `Ok(None)` until a whole packet is there, so any chunking of
//! a TCP stream gives the same packets.
//!
//! Every read is bounds-checked (`wire::Reader`): no input panics. Topic
//! names are checked here (no wildcards, no U+0000); topic filters only as
//! strings, so a bad one can be refused per filter in SUBACK.

use bytes::{BufMut, Bytes, BytesMut};

use super::packet::*;
use super::wire::{
    DecodeError, EncodeError, MAX_VARINT, Reader, binary_len, put_binary, put_varint, read_varint,
    varint_len,
};

/// What [`check`] found at the front of a buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    /// At least `needed` more bytes are required.
    Incomplete { needed: usize },
    /// A whole packet is there: `header_len` bytes of fixed header, then
    /// `body_len` bytes of body.
    Complete { header_len: usize, body_len: usize },
}

/// Reads the fixed header at the front of `buf` without consuming it. A
/// packet whose total size (fixed header included, as MQTT 5 counts it)
/// passes `max_packet_size` is refused as soon as its remaining length is
/// read; a remaining length longer than four bytes is malformed.
pub fn check(buf: &[u8], max_packet_size: usize) -> Result<Check, DecodeError> {
    if buf.is_empty() {
        return Ok(Check::Incomplete { needed: 2 });
    }
    let Some((remaining, n)) = read_varint(&buf[1..])? else {
        return Ok(Check::Incomplete { needed: 1 });
    };
    let header_len = 1 + n;
    let body_len = remaining as usize;
    let size = header_len + body_len;
    if size > max_packet_size {
        return Err(DecodeError::TooLarge {
            size,
            max: max_packet_size,
        });
    }
    if buf.len() < size {
        return Ok(Check::Incomplete {
            needed: size - buf.len(),
        });
    }
    Ok(Check::Complete {
        header_len,
        body_len,
    })
}

/// Incremental packet decoder of one connection.
#[derive(Debug, Clone, Copy)]
pub struct Decoder {
    /// Largest whole packet accepted (the relay's Maximum Packet Size).
    pub max_packet_size: usize,
    /// The connection's version; CONNECT carries its own and is read
    /// whatever this says. Set it from the CONNECT.
    pub version: Version,
}

impl Decoder {
    pub fn new(max_packet_size: usize, version: Version) -> Decoder {
        Decoder {
            max_packet_size,
            version,
        }
    }

    /// Takes the next whole packet off the front of `buf`, or `Ok(None)`
    /// when more bytes are needed. After an error the stream is unusable.
    pub fn decode(&self, buf: &mut BytesMut) -> Result<Option<Packet>, DecodeError> {
        match check(buf, self.max_packet_size)? {
            Check::Incomplete { .. } => Ok(None),
            Check::Complete {
                header_len,
                body_len,
            } => {
                let first = buf[0];
                let mut whole = buf.split_to(header_len + body_len).freeze();
                let body = whole.split_off(header_len);
                parse(first, body, self.version).map(Some)
            }
        }
    }
}

fn packet_id(r: &mut Reader) -> Result<u16, DecodeError> {
    match r.u16()? {
        0 => Err(DecodeError::Malformed("packet identifier 0")),
        id => Ok(id),
    }
}

fn end(r: &Reader) -> Result<(), DecodeError> {
    if r.is_empty() {
        Ok(())
    } else {
        Err(DecodeError::Malformed("bytes after the last field"))
    }
}

fn props(r: &mut Reader, v: Version, of: PacketType) -> Result<Properties, DecodeError> {
    match v {
        Version::V5 => Properties::read(r, PropsOf::Packet(of)),
        Version::V311 => Ok(Properties::default()),
    }
}

/// Checks a topic name read from a PUBLISH or a will: no wildcards (the
/// string rules were checked when it was read). Emptiness is the caller's
/// rule (an MQTT 5 PUBLISH may use a topic alias instead).
fn check_topic_name(t: &[u8]) -> Result<(), DecodeError> {
    if t.iter().any(|&b| b == b'+' || b == b'#') {
        return Err(DecodeError::TopicName("wildcard in a topic name"));
    }
    Ok(())
}

/// Parses one packet body. `first` is the fixed header's first byte;
/// `version` the connection's (CONNECT reads its own).
pub fn parse(first: u8, body: Bytes, version: Version) -> Result<Packet, DecodeError> {
    let Some(kind) = PacketType::from_u8(first >> 4) else {
        return Err(DecodeError::Malformed("packet type 0"));
    };
    let flags = first & 0x0f;
    let want_flags = match kind {
        PacketType::Publish => flags,
        PacketType::PubRel | PacketType::Subscribe | PacketType::Unsubscribe => 0b0010,
        _ => 0,
    };
    if flags != want_flags {
        return Err(DecodeError::Malformed(
            "reserved flag bits of the fixed header",
        ));
    }
    if kind == PacketType::Auth && version == Version::V311 {
        return Err(DecodeError::Malformed("AUTH does not exist in MQTT 3.1.1"));
    }
    let v = version;
    let mut r = Reader::new(body);
    let p = match kind {
        PacketType::Connect => Packet::Connect(Box::new(parse_connect(&mut r)?)),
        PacketType::ConnAck => {
            let f = r.u8()?;
            if f & 0xfe != 0 {
                return Err(DecodeError::Malformed("reserved bits of the CONNACK flags"));
            }
            let code = r.u8()?;
            Packet::ConnAck(ConnAck {
                session_present: f & 1 != 0,
                code,
                props: props(&mut r, v, kind)?,
            })
        }
        PacketType::Publish => {
            let qos = QoS::from_u8((flags >> 1) & 0b11)?;
            let dup = flags & 0b1000 != 0;
            if dup && qos == QoS::AtMostOnce {
                return Err(DecodeError::Malformed("DUP set on a QoS 0 PUBLISH"));
            }
            let topic = r.string()?;
            check_topic_name(&topic)?;
            if topic.is_empty() && v == Version::V311 {
                return Err(DecodeError::TopicName("empty topic name"));
            }
            let packet_id = if qos == QoS::AtMostOnce {
                0
            } else {
                packet_id(&mut r)?
            };
            Packet::Publish(Publish {
                dup,
                qos,
                retain: flags & 1 != 0,
                topic,
                packet_id,
                props: props(&mut r, v, kind)?,
                payload: r.rest(),
            })
        }
        PacketType::PubAck | PacketType::PubRec | PacketType::PubRel | PacketType::PubComp => {
            let packet_id = packet_id(&mut r)?;
            let (code, props) = code_and_props(&mut r, v, kind)?;
            let resp = PubResp {
                packet_id,
                code,
                props,
            };
            match kind {
                PacketType::PubAck => Packet::PubAck(resp),
                PacketType::PubRec => Packet::PubRec(resp),
                PacketType::PubRel => Packet::PubRel(resp),
                _ => Packet::PubComp(resp),
            }
        }
        PacketType::Subscribe => {
            let packet_id = packet_id(&mut r)?;
            let props = props(&mut r, v, kind)?;
            let mut filters = Vec::new();
            while !r.is_empty() {
                let f = r.string()?;
                let o = SubOptions::from_byte(r.u8()?, v)?;
                filters.push((f, o));
            }
            if filters.is_empty() {
                return Err(DecodeError::Protocol("SUBSCRIBE without a topic filter"));
            }
            Packet::Subscribe(Subscribe {
                packet_id,
                props,
                filters,
            })
        }
        PacketType::SubAck => {
            let packet_id = packet_id(&mut r)?;
            let props = props(&mut r, v, kind)?;
            let codes = r.rest().to_vec();
            Packet::SubAck(SubAck {
                packet_id,
                props,
                codes,
            })
        }
        PacketType::Unsubscribe => {
            let packet_id = packet_id(&mut r)?;
            let props = props(&mut r, v, kind)?;
            let mut filters = Vec::new();
            while !r.is_empty() {
                filters.push(r.string()?);
            }
            if filters.is_empty() {
                return Err(DecodeError::Protocol("UNSUBSCRIBE without a topic filter"));
            }
            Packet::Unsubscribe(Unsubscribe {
                packet_id,
                props,
                filters,
            })
        }
        PacketType::UnsubAck => {
            let packet_id = packet_id(&mut r)?;
            let props = props(&mut r, v, kind)?;
            let codes = match v {
                Version::V5 => r.rest().to_vec(),
                Version::V311 => Vec::new(),
            };
            Packet::UnsubAck(UnsubAck {
                packet_id,
                props,
                codes,
            })
        }
        PacketType::PingReq => Packet::PingReq,
        PacketType::PingResp => Packet::PingResp,
        PacketType::Disconnect | PacketType::Auth => {
            let (code, props) = if r.is_empty() {
                (0, Properties::default())
            } else if v == Version::V311 {
                return Err(DecodeError::Malformed(
                    "DISCONNECT with a body in MQTT 3.1.1",
                ));
            } else {
                let code = r.u8()?;
                let props = if r.is_empty() {
                    Properties::default()
                } else {
                    Properties::read(&mut r, PropsOf::Packet(kind))?
                };
                (code, props)
            };
            if kind == PacketType::Disconnect {
                Packet::Disconnect(Disconnect { code, props })
            } else {
                Packet::Auth(Auth { code, props })
            }
        }
    };
    end(&r)?;
    Ok(p)
}

/// The reason code and properties of an MQTT 5 acknowledgement, both
/// optional on the wire.
fn code_and_props(
    r: &mut Reader,
    v: Version,
    kind: PacketType,
) -> Result<(u8, Properties), DecodeError> {
    if v == Version::V311 || r.is_empty() {
        return Ok((0, Properties::default()));
    }
    let code = r.u8()?;
    if r.is_empty() {
        return Ok((code, Properties::default()));
    }
    Ok((code, Properties::read(r, PropsOf::Packet(kind))?))
}

fn parse_connect(r: &mut Reader) -> Result<Connect, DecodeError> {
    let name = r.binary()?;
    let level = r.u8()?;
    match &name[..] {
        b"MQTT" => {}
        b"MQIsdp" => return Err(DecodeError::UnsupportedVersion(level)),
        _ => return Err(DecodeError::ProtocolName),
    }
    let version = match level {
        4 => Version::V311,
        5 => Version::V5,
        _ => return Err(DecodeError::UnsupportedVersion(level)),
    };
    let flags = r.u8()?;
    if flags & 1 != 0 {
        return Err(DecodeError::Malformed("reserved bit of the CONNECT flags"));
    }
    let will_flag = flags & 0b100 != 0;
    let will_qos = QoS::from_u8((flags >> 3) & 0b11)?;
    let will_retain = flags & 0b10_0000 != 0;
    let has_password = flags & 0b100_0000 != 0;
    let has_username = flags & 0b1000_0000 != 0;
    if !will_flag && (will_qos != QoS::AtMostOnce || will_retain) {
        return Err(DecodeError::Malformed("will QoS or retain without a will"));
    }
    if version == Version::V311 && has_password && !has_username {
        return Err(DecodeError::Malformed("password without a user name"));
    }
    let keep_alive = r.u16()?;
    let props = props(r, version, PacketType::Connect)?;
    let client_id = r.string()?;
    let will = if will_flag {
        let props = match version {
            Version::V5 => Properties::read(r, PropsOf::Will)?,
            Version::V311 => Properties::default(),
        };
        let topic = r.string()?;
        check_topic_name(&topic)?;
        if topic.is_empty() {
            return Err(DecodeError::TopicName("empty will topic"));
        }
        let payload = r.binary()?;
        Some(Will {
            topic,
            payload,
            qos: will_qos,
            retain: will_retain,
            props,
        })
    } else {
        None
    };
    let username = if has_username {
        Some(r.string()?)
    } else {
        None
    };
    let password = if has_password {
        Some(r.binary()?)
    } else {
        None
    };
    Ok(Connect {
        version,
        clean_start: flags & 0b10 != 0,
        keep_alive,
        props,
        client_id,
        will,
        username,
        password,
    })
}

fn props_len(p: &Properties, v: Version) -> usize {
    match v {
        Version::V5 => p.block_len(),
        Version::V311 => 0,
    }
}

fn write_props(p: &Properties, v: Version, out: &mut impl BufMut) {
    if v == Version::V5 {
        p.write(out);
    }
}

/// Length of an acknowledgement's reason code and properties in MQTT 5
/// (omitted when the code is 0 and there are no properties).
fn code_props_len(code: u8, p: &Properties) -> usize {
    if p.is_empty() {
        if code == 0 { 0 } else { 1 }
    } else {
        1 + p.block_len()
    }
}

fn write_code_props(code: u8, p: &Properties, out: &mut impl BufMut) {
    if code != 0 || !p.is_empty() {
        out.put_u8(code);
        if !p.is_empty() {
            p.write(out);
        }
    }
}

fn connect_body_len(c: &Connect) -> usize {
    let v = c.version;
    let mut n = 2 + 4 + 1 + 1 + 2 + props_len(&c.props, v) + binary_len(&c.client_id);
    if let Some(w) = &c.will {
        n += props_len(&w.props, v) + binary_len(&w.topic) + binary_len(&w.payload);
    }
    n += c.username.as_ref().map_or(0, |u| binary_len(u));
    n += c.password.as_ref().map_or(0, |p| binary_len(p));
    n
}

/// Length of the body (remaining length) of `p` written for `version`.
pub fn body_len(p: &Packet, version: Version) -> usize {
    let v = version;
    match p {
        Packet::Connect(c) => connect_body_len(c),
        Packet::ConnAck(c) => 2 + props_len(&c.props, v),
        Packet::Publish(p) => {
            binary_len(&p.topic)
                + if p.qos == QoS::AtMostOnce { 0 } else { 2 }
                + props_len(&p.props, v)
                + p.payload.len()
        }
        Packet::PubAck(r) | Packet::PubRec(r) | Packet::PubRel(r) | Packet::PubComp(r) => {
            2 + match v {
                Version::V5 => code_props_len(r.code, &r.props),
                Version::V311 => 0,
            }
        }
        Packet::Subscribe(s) => {
            2 + props_len(&s.props, v)
                + s.filters
                    .iter()
                    .map(|(f, _)| binary_len(f) + 1)
                    .sum::<usize>()
        }
        Packet::SubAck(s) => 2 + props_len(&s.props, v) + s.codes.len(),
        Packet::Unsubscribe(u) => {
            2 + props_len(&u.props, v) + u.filters.iter().map(|f| binary_len(f)).sum::<usize>()
        }
        Packet::UnsubAck(u) => match v {
            Version::V5 => 2 + u.props.block_len() + u.codes.len(),
            Version::V311 => 2,
        },
        Packet::PingReq | Packet::PingResp => 0,
        Packet::Disconnect(Disconnect { code, props }) | Packet::Auth(Auth { code, props }) => {
            match v {
                Version::V5 => code_props_len(*code, props),
                Version::V311 => 0,
            }
        }
    }
}

/// Whole size of `p` on the wire: fixed header and body.
pub fn encoded_len(p: &Packet, version: Version) -> usize {
    let n = body_len(p, version);
    1 + varint_len(n) + n
}

fn first_byte(p: &Packet) -> u8 {
    let kind = p.kind() as u8;
    let flags = match p {
        Packet::Publish(p) => (p.dup as u8) << 3 | (p.qos as u8) << 1 | p.retain as u8,
        Packet::PubRel(_) | Packet::Subscribe(_) | Packet::Unsubscribe(_) => 0b0010,
        _ => 0,
    };
    kind << 4 | flags
}

/// Appends `p` written for `version` to `out`; returns the bytes written.
/// CONNECT is written in its own `version`. Strings longer than 65,535
/// bytes are a caller bug and are cut.
pub fn encode(p: &Packet, version: Version, out: &mut BytesMut) -> Result<usize, EncodeError> {
    let v = match p {
        Packet::Connect(c) => c.version,
        _ => version,
    };
    if v == Version::V311 && matches!(p, Packet::Auth(_)) {
        return Err(EncodeError::Unsupported("AUTH"));
    }
    let n = body_len(p, v);
    if n > MAX_VARINT as usize {
        return Err(EncodeError::TooLarge(n));
    }
    let total = 1 + varint_len(n) + n;
    out.reserve(total);
    out.put_u8(first_byte(p));
    put_varint(out, n);
    match p {
        Packet::Connect(c) => {
            put_binary(out, b"MQTT");
            out.put_u8(v.level());
            let mut flags = (c.clean_start as u8) << 1;
            if let Some(w) = &c.will {
                flags |= 0b100 | (w.qos as u8) << 3 | (w.retain as u8) << 5;
            }
            flags |= (c.password.is_some() as u8) << 6 | (c.username.is_some() as u8) << 7;
            out.put_u8(flags);
            out.put_u16(c.keep_alive);
            write_props(&c.props, v, out);
            put_binary(out, &c.client_id);
            if let Some(w) = &c.will {
                write_props(&w.props, v, out);
                put_binary(out, &w.topic);
                put_binary(out, &w.payload);
            }
            if let Some(u) = &c.username {
                put_binary(out, u);
            }
            if let Some(pw) = &c.password {
                put_binary(out, pw);
            }
        }
        Packet::ConnAck(c) => {
            out.put_u8(c.session_present as u8);
            out.put_u8(c.code);
            write_props(&c.props, v, out);
        }
        Packet::Publish(p) => {
            put_binary(out, &p.topic);
            if p.qos != QoS::AtMostOnce {
                out.put_u16(p.packet_id);
            }
            write_props(&p.props, v, out);
            out.put_slice(&p.payload);
        }
        Packet::PubAck(r) | Packet::PubRec(r) | Packet::PubRel(r) | Packet::PubComp(r) => {
            out.put_u16(r.packet_id);
            if v == Version::V5 {
                write_code_props(r.code, &r.props, out);
            }
        }
        Packet::Subscribe(s) => {
            out.put_u16(s.packet_id);
            write_props(&s.props, v, out);
            for (f, o) in &s.filters {
                put_binary(out, f);
                out.put_u8(o.to_byte(v));
            }
        }
        Packet::SubAck(s) => {
            out.put_u16(s.packet_id);
            write_props(&s.props, v, out);
            out.put_slice(&s.codes);
        }
        Packet::Unsubscribe(u) => {
            out.put_u16(u.packet_id);
            write_props(&u.props, v, out);
            for f in &u.filters {
                put_binary(out, f);
            }
        }
        Packet::UnsubAck(u) => {
            out.put_u16(u.packet_id);
            if v == Version::V5 {
                u.props.write(out);
                out.put_slice(&u.codes);
            }
        }
        Packet::PingReq | Packet::PingResp => {}
        Packet::Disconnect(Disconnect { code, props }) | Packet::Auth(Auth { code, props }) => {
            if v == Version::V5 {
                write_code_props(*code, props, out);
            }
        }
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mqtt::reason;

    fn decode_all(bytes: &[u8], v: Version) -> Result<Option<Packet>, DecodeError> {
        Decoder::new(1 << 20, v).decode(&mut BytesMut::from(bytes))
    }

    fn round_trip(p: &Packet, v: Version) -> Vec<u8> {
        let mut out = BytesMut::new();
        let n = encode(p, v, &mut out).unwrap();
        assert_eq!(n, out.len());
        assert_eq!(n, encoded_len(p, v));
        let wire = out.to_vec();
        let back = Decoder::new(1 << 20, v).decode(&mut out).unwrap().unwrap();
        assert_eq!(&back, p);
        assert!(out.is_empty());
        wire
    }

    #[test]
    fn v311_connect_bytes_as_the_spec_shows_them() {
        // CONNECT, clean session, keep alive 60, client id "ab", user "u",
        // password "p", will "w/t" QoS 1 retained with payload "x".
        let c = Connect {
            version: Version::V311,
            clean_start: true,
            keep_alive: 60,
            client_id: Bytes::from_static(b"ab"),
            will: Some(Will {
                topic: Bytes::from_static(b"w/t"),
                payload: Bytes::from_static(b"x"),
                qos: QoS::AtLeastOnce,
                retain: true,
                props: Properties::default(),
            }),
            username: Some(Bytes::from_static(b"u")),
            password: Some(Bytes::from_static(b"p")),
            ..Connect::default()
        };
        let wire = round_trip(&Packet::Connect(Box::new(c)), Version::V311);
        let expected: &[u8] = &[
            0x10,
            28, // CONNECT, remaining length
            0,
            4,
            b'M',
            b'Q',
            b'T',
            b'T',
            4,           // protocol name, level
            0b1110_1110, // user, password, will retain, will QoS 1, will, clean
            0,
            60, // keep alive
            0,
            2,
            b'a',
            b'b', // client id
            0,
            3,
            b'w',
            b'/',
            b't', // will topic
            0,
            1,
            b'x', // will payload
            0,
            1,
            b'u',
            0,
            1,
            b'p',
        ];
        assert_eq!(wire, expected);
    }

    #[test]
    fn v5_publish_with_properties_round_trips() {
        let p = Publish {
            qos: QoS::ExactlyOnce,
            dup: true,
            retain: true,
            topic: Bytes::from_static(b"a/b"),
            packet_id: 7,
            props: Properties {
                message_expiry_interval: Some(30),
                topic_alias: Some(3),
                payload_format_indicator: Some(1),
                content_type: Some(Bytes::from_static(b"text/plain")),
                response_topic: Some(Bytes::from_static(b"r/1")),
                correlation_data: Some(Bytes::from_static(&[0, 1, 2])),
                user_properties: vec![
                    (Bytes::from_static(b"k"), Bytes::from_static(b"v")),
                    (Bytes::from_static(b"k"), Bytes::from_static(b"v2")),
                ],
                ..Properties::default()
            },
            payload: Bytes::from_static(b"hello"),
        };
        round_trip(&Packet::Publish(p), Version::V5);
    }

    #[test]
    fn every_packet_type_round_trips_in_both_versions() {
        let id = 0x1234;
        let resp = PubResp {
            packet_id: id,
            code: 0,
            props: Properties::default(),
        };
        let mut packets = vec![
            Packet::ConnAck(ConnAck {
                session_present: true,
                code: 0,
                props: Properties::default(),
            }),
            Packet::PubAck(resp.clone()),
            Packet::PubRec(resp.clone()),
            Packet::PubRel(resp.clone()),
            Packet::PubComp(resp.clone()),
            Packet::Subscribe(Subscribe {
                packet_id: id,
                props: Properties::default(),
                filters: vec![(
                    Bytes::from_static(b"a/+"),
                    SubOptions::qos(QoS::AtLeastOnce),
                )],
            }),
            Packet::SubAck(SubAck {
                packet_id: id,
                props: Properties::default(),
                codes: vec![0, 1, 2, 0x80],
            }),
            Packet::Unsubscribe(Unsubscribe {
                packet_id: id,
                props: Properties::default(),
                filters: vec![Bytes::from_static(b"a/#")],
            }),
            Packet::UnsubAck(UnsubAck {
                packet_id: id,
                ..UnsubAck::default()
            }),
            Packet::PingReq,
            Packet::PingResp,
            Packet::Disconnect(Disconnect::default()),
        ];
        for p in &packets {
            round_trip(p, Version::V311);
        }
        // MQTT 5 extras: reason codes, properties, options, AUTH.
        let reason_string = Properties {
            reason_string: Some(Bytes::from_static(b"why")),
            ..Properties::default()
        };
        packets.extend([
            Packet::PubAck(PubResp {
                code: reason::NO_MATCHING_SUBSCRIBERS,
                ..resp.clone()
            }),
            Packet::PubRec(PubResp {
                code: reason::QUOTA_EXCEEDED,
                props: reason_string.clone(),
                ..resp.clone()
            }),
            Packet::Subscribe(Subscribe {
                packet_id: id,
                props: Properties {
                    subscription_identifiers: vec![268_435_455],
                    ..Properties::default()
                },
                filters: vec![(
                    Bytes::from_static(b"$share/g/a/#"),
                    SubOptions {
                        qos: QoS::ExactlyOnce,
                        no_local: true,
                        retain_as_published: true,
                        retain_handling: RetainHandling::DontSend,
                    },
                )],
            }),
            Packet::UnsubAck(UnsubAck {
                packet_id: id,
                props: reason_string.clone(),
                codes: vec![0, reason::NO_SUBSCRIPTION_EXISTED],
            }),
            Packet::Disconnect(Disconnect {
                code: reason::DISCONNECT_WITH_WILL,
                props: Properties {
                    session_expiry_interval: Some(10),
                    ..Properties::default()
                },
            }),
            Packet::Disconnect(Disconnect {
                code: reason::SESSION_TAKEN_OVER,
                props: Properties::default(),
            }),
            Packet::Auth(Auth {
                code: reason::CONTINUE_AUTHENTICATION,
                props: Properties {
                    authentication_method: Some(Bytes::from_static(b"SCRAM")),
                    authentication_data: Some(Bytes::from_static(&[9, 9])),
                    ..Properties::default()
                },
            }),
            Packet::Auth(Auth::default()),
        ]);
        for p in &packets {
            round_trip(p, Version::V5);
        }
    }

    #[test]
    fn v5_acks_use_their_short_forms() {
        let mut out = BytesMut::new();
        let ack = Packet::PubAck(PubResp {
            packet_id: 1,
            ..PubResp::default()
        });
        encode(&ack, Version::V5, &mut out).unwrap();
        assert_eq!(&out[..], &[0x40, 2, 0, 1]);
        out.clear();
        encode(
            &Packet::Disconnect(Disconnect::default()),
            Version::V5,
            &mut out,
        )
        .unwrap();
        assert_eq!(&out[..], &[0xe0, 0]);
        // A code without properties: 3 bytes; the decoder takes all forms.
        assert_eq!(
            decode_all(&[0x40, 3, 0, 1, 0x10], Version::V5),
            Ok(Some(Packet::PubAck(PubResp {
                packet_id: 1,
                code: 0x10,
                props: Properties::default()
            })))
        );
        assert_eq!(
            decode_all(&[0x40, 4, 0, 1, 0x10, 0], Version::V5),
            Ok(Some(Packet::PubAck(PubResp {
                packet_id: 1,
                code: 0x10,
                props: Properties::default()
            })))
        );
    }

    #[test]
    fn oversized_remaining_length_is_refused_from_the_header_alone() {
        // PUBLISH announcing 1,000,000 bytes; only the header has arrived.
        let mut buf = BytesMut::from(&[0x30, 0xc0, 0x84, 0x3d][..]);
        let err = Decoder::new(1024, Version::V5)
            .decode(&mut buf)
            .unwrap_err();
        assert_eq!(
            err,
            DecodeError::TooLarge {
                size: 1_000_004,
                max: 1024
            }
        );
        assert_eq!(err.reason_code(), reason::PACKET_TOO_LARGE);
        // The limit counts the fixed header: 1 + 1 + 10 = 12.
        let mut at_limit = BytesMut::from(&[0xc0, 10][..]);
        assert_eq!(
            check(&at_limit, 11),
            Err(DecodeError::TooLarge { size: 12, max: 11 })
        );
        assert_eq!(check(&at_limit, 12), Ok(Check::Incomplete { needed: 10 }));
        at_limit.extend_from_slice(&[0; 10]);
        assert_eq!(
            check(&at_limit, 12),
            Ok(Check::Complete {
                header_len: 2,
                body_len: 10
            })
        );
    }

    #[test]
    fn five_byte_remaining_length_is_malformed() {
        let err = decode_all(&[0x30, 0xff, 0xff, 0xff, 0xff, 0x7f], Version::V5).unwrap_err();
        assert_eq!(err, DecodeError::VarInt);
        assert_eq!(err.reason_code(), reason::MALFORMED_PACKET);
    }

    #[test]
    fn partial_input_is_incomplete_at_every_cut() {
        let p = Packet::Publish(Publish {
            qos: QoS::AtLeastOnce,
            topic: Bytes::from_static(b"t"),
            packet_id: 1,
            payload: Bytes::from(vec![5u8; 300]),
            ..Publish::default()
        });
        let mut out = BytesMut::new();
        encode(&p, Version::V311, &mut out).unwrap();
        for cut in 0..out.len() {
            let mut part = BytesMut::from(&out[..cut]);
            assert_eq!(
                Decoder::new(1 << 20, Version::V311).decode(&mut part),
                Ok(None)
            );
            assert_eq!(part.len(), cut, "nothing consumed");
        }
    }

    #[test]
    fn reserved_flags_qos3_and_packet_id_0_are_malformed() {
        let v = Version::V5;
        // PUBACK with flags 1.
        assert!(matches!(
            decode_all(&[0x41, 2, 0, 1], v),
            Err(DecodeError::Malformed(_))
        ));
        // SUBSCRIBE with flags 0 instead of 2.
        assert!(matches!(
            decode_all(&[0x80, 6, 0, 1, 0, 0, 1, b'a'], v),
            Err(DecodeError::Malformed(_))
        ));
        // PUBLISH QoS 3.
        assert_eq!(
            decode_all(&[0x36, 5, 0, 1, b't', 0, 1], v),
            Err(DecodeError::Malformed("QoS 3"))
        );
        // PUBLISH QoS 1 with packet id 0.
        assert_eq!(
            decode_all(&[0x32, 6, 0, 1, b't', 0, 0, 0], v),
            Err(DecodeError::Malformed("packet identifier 0"))
        );
        // PUBACK with packet id 0.
        assert_eq!(
            decode_all(&[0x40, 2, 0, 0], Version::V311),
            Err(DecodeError::Malformed("packet identifier 0"))
        );
        // DUP on QoS 0.
        assert!(decode_all(&[0x38, 4, 0, 1, b't', 0], v).is_err());
        // Packet type 0, and AUTH in 3.1.1.
        assert!(decode_all(&[0x00, 0], v).is_err());
        assert!(decode_all(&[0xf0, 0], Version::V311).is_err());
        // PINGREQ with a body.
        assert!(decode_all(&[0xc0, 1, 0], v).is_err());
    }

    #[test]
    fn wildcards_and_nul_in_publish_topics_are_refused() {
        let err = decode_all(&[0x30, 5, 0, 3, b'a', b'/', b'+'], Version::V311).unwrap_err();
        assert_eq!(err, DecodeError::TopicName("wildcard in a topic name"));
        assert_eq!(err.reason_code(), reason::TOPIC_NAME_INVALID);
        assert!(decode_all(&[0x30, 3, 0, 1, b'#'], Version::V311).is_err());
        assert_eq!(
            decode_all(&[0x30, 5, 0, 3, b'a', 0, b'b'], Version::V311),
            Err(DecodeError::Malformed("string contains U+0000"))
        );
        assert_eq!(
            decode_all(&[0x30, 4, 0, 2, 0xc3, 0x28], Version::V311),
            Err(DecodeError::Malformed("string is not valid UTF-8"))
        );
        // Empty topic: refused in 3.1.1, left to the alias rules in 5.
        assert!(decode_all(&[0x30, 2, 0, 0], Version::V311).is_err());
        assert!(decode_all(&[0x30, 3, 0, 0, 0], Version::V5).is_ok());
    }

    #[test]
    fn connect_rules() {
        let base = |level: u8, flags: u8, tail: &[u8]| {
            let mut b = vec![0, 4, b'M', b'Q', b'T', b'T', level, flags, 0, 10];
            if level == 5 {
                b.push(0); // no properties
            }
            b.extend_from_slice(&[0, 1, b'c']);
            b.extend_from_slice(tail);
            let mut p = vec![0x10, b.len() as u8];
            p.extend(b);
            p
        };
        let v = Version::V311;
        assert!(decode_all(&base(4, 0b10, &[]), v).is_ok());
        assert!(decode_all(&base(5, 0b10, &[]), v).is_ok());
        assert_eq!(
            decode_all(&base(3, 0, &[]), v),
            Err(DecodeError::UnsupportedVersion(3))
        );
        assert_eq!(
            DecodeError::UnsupportedVersion(3).v3_connack_code(),
            Some(reason::V3_UNACCEPTABLE_PROTOCOL_VERSION)
        );
        // Reserved bit.
        assert!(decode_all(&base(4, 0b11, &[]), v).is_err());
        // Will QoS without the will flag.
        assert!(decode_all(&base(4, 0b1000, &[]), v).is_err());
        // Will QoS 3.
        assert!(decode_all(&base(4, 0b11100, &[0, 1, b't', 0, 0]), v).is_err());
        // Password without user name: refused in 3.1.1 only.
        assert!(decode_all(&base(4, 0b100_0000, &[0, 1, b'p']), v).is_err());
        assert!(decode_all(&base(5, 0b100_0000, &[0, 1, b'p']), v).is_ok());
        // Will topic with a wildcard.
        assert_eq!(
            decode_all(&base(4, 0b100, &[0, 1, b'#', 0, 0]), v),
            Err(DecodeError::TopicName("wildcard in a topic name"))
        );
        // Wrong protocol name.
        let mut bad = base(4, 0, &[]);
        bad[4] = b'X';
        assert_eq!(decode_all(&bad, v), Err(DecodeError::ProtocolName));
        // Trailing garbage.
        assert!(decode_all(&base(4, 0, &[1]), v).is_err());
    }

    #[test]
    fn property_rules() {
        // PUBACK (v5) with a topic alias: not allowed there.
        assert_eq!(
            decode_all(&[0x40, 7, 0, 1, 0, 3, 0x23, 0, 1], Version::V5),
            Err(DecodeError::Malformed(
                "property not allowed in this packet"
            ))
        );
        // Reason string twice.
        let r = decode_all(&[0x40, 10, 0, 1, 0, 6, 0x1f, 0, 0, 0x1f, 0, 0], Version::V5);
        assert_eq!(r, Err(DecodeError::Protocol("a property appears twice")));
        assert_eq!(r.unwrap_err().reason_code(), reason::PROTOCOL_ERROR);
        // Unknown identifier.
        assert!(decode_all(&[0x40, 6, 0, 1, 0, 2, 0x7f, 0], Version::V5).is_err());
        // Property block longer than the packet.
        assert!(decode_all(&[0x40, 4, 0, 1, 0, 9], Version::V5).is_err());
        // Receive maximum 0 in CONNECT.
        let mut c = vec![0, 4, b'M', b'Q', b'T', b'T', 5, 0b10, 0, 10, 3, 0x21, 0, 0];
        c.extend_from_slice(&[0, 1, b'c']);
        let mut p = vec![0x10, c.len() as u8];
        p.extend(c);
        assert_eq!(
            decode_all(&p, Version::V5),
            Err(DecodeError::Protocol("receive maximum 0"))
        );
    }

    #[test]
    fn subscribe_option_rules() {
        let sub = |opts: u8| [0x82, 6, 0, 1, 0, 1, b'a', opts];
        let v5 = |opts: u8| {
            let mut b = sub(opts).to_vec();
            b[1] = 7;
            b.insert(4, 0);
            b
        };
        // 3.1.1: only the QoS bits.
        let ok = decode_all(&sub(1)[..], Version::V311).unwrap().unwrap();
        assert!(matches!(ok, Packet::Subscribe(_)));
        assert!(decode_all(&sub(0b100)[..], Version::V311).is_err());
        assert!(decode_all(&sub(3)[..], Version::V311).is_err());
        // 5: no-local, retain as published, retain handling; 3 and the top
        // bits are refused.
        let Ok(Some(Packet::Subscribe(s))) = decode_all(&v5(0b10_1110), Version::V5) else {
            panic!("valid options refused");
        };
        assert_eq!(
            s.filters[0].1,
            SubOptions {
                qos: QoS::ExactlyOnce,
                no_local: true,
                retain_as_published: true,
                retain_handling: RetainHandling::DontSend
            }
        );
        assert_eq!(
            decode_all(&v5(0b11_0000), Version::V5),
            Err(DecodeError::Protocol("retain handling 3"))
        );
        assert!(decode_all(&v5(0b0100_0000), Version::V5).is_err());
        // No filter at all.
        assert!(decode_all(&[0x82, 2, 0, 1], Version::V311).is_err());
    }
}
