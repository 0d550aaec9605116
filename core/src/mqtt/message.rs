//! [`Message`]: an application message as the router carries it, and how
//! a session writes it out as a PUBLISH.
//!
//! A message keeps the properties that travel with it (payload format,
//! content type, response topic, correlation data, user properties) in
//! their wire form, so fanning it out clones three `Bytes` handles and
//! writing it copies them once. What changes per hop is not kept there:
//! the message expiry (a deadline, rewritten as the time left on each
//! send), the topic alias and the subscription identifiers.

use bytes::{BufMut, Bytes, BytesMut};

use super::packet::{Properties, PropsOf, Publish, QoS, Version, prop};
use super::wire::{MAX_VARINT, Reader, binary_len, put_binary, put_varint, varint_len};

/// An application message on its way through the relay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub topic: Bytes,
    pub payload: Bytes,
    /// The QoS it was published with.
    pub qos: QoS,
    /// The RETAIN flag it was published with.
    pub retain: bool,
    /// Forwarded MQTT 5 properties, wire form without the length prefix.
    pub props: Bytes,
    /// Monotonic ms after which it is no longer delivered (its message
    /// expiry interval counted from its arrival).
    pub expires_at: Option<u64>,
}

impl Message {
    /// A message with no properties and no expiry.
    pub fn new(topic: impl Into<Bytes>, payload: impl Into<Bytes>, qos: QoS) -> Message {
        Message {
            topic: topic.into(),
            payload: payload.into(),
            qos,
            retain: false,
            props: Bytes::new(),
            expires_at: None,
        }
    }

    /// The message a PUBLISH (its topic resolved) carries, received at
    /// monotonic `now_ms`. One allocation when it has forwarded
    /// properties, none otherwise.
    pub fn from_publish(p: &Publish, now_ms: u64) -> Message {
        Message {
            topic: p.topic.clone(),
            payload: p.payload.clone(),
            qos: p.qos,
            retain: p.retain,
            props: forwarded(&p.props),
            expires_at: p
                .props
                .message_expiry_interval
                .map(|s| now_ms.saturating_add(u64::from(s) * 1000)),
        }
    }

    /// The message a will becomes, published at monotonic `now_ms`.
    pub fn from_will(w: &super::packet::Will, now_ms: u64) -> Message {
        Message {
            topic: w.topic.clone(),
            payload: w.payload.clone(),
            qos: w.qos,
            retain: w.retain,
            props: forwarded(&w.props),
            expires_at: w
                .props
                .message_expiry_interval
                .map(|s| now_ms.saturating_add(u64::from(s) * 1000)),
        }
    }

    /// The forwarded properties, decoded (for hooks and rules).
    pub fn properties(&self) -> Properties {
        let mut block = BytesMut::with_capacity(self.props.len() + 4);
        put_varint(&mut block, self.props.len());
        block.extend_from_slice(&self.props);
        Properties::read(
            &mut Reader::new(block.freeze()),
            PropsOf::Packet(super::packet::PacketType::Publish),
        )
        .unwrap_or_default()
    }

    /// Bytes the message holds (topic, payload, properties): what queues
    /// count against their byte bounds.
    pub fn size(&self) -> usize {
        self.topic.len() + self.payload.len() + self.props.len()
    }

    /// Whether its expiry has passed at monotonic `now_ms`.
    pub fn is_expired(&self, now_ms: u64) -> bool {
        self.expires_at.is_some_and(|t| now_ms >= t)
    }

    /// Seconds of expiry left at `now_ms`, rounded up, as a PUBLISH says it.
    pub fn expiry_left_s(&self, now_ms: u64) -> Option<u32> {
        self.expires_at.map(|t| {
            let ms = t.saturating_sub(now_ms);
            ms.div_ceil(1000).min(u64::from(u32::MAX)) as u32
        })
    }
}

/// The properties that travel with a message, in wire form.
fn forwarded(p: &Properties) -> Bytes {
    let f = Properties {
        payload_format_indicator: p.payload_format_indicator,
        content_type: p.content_type.clone(),
        response_topic: p.response_topic.clone(),
        correlation_data: p.correlation_data.clone(),
        user_properties: p.user_properties.clone(),
        ..Properties::default()
    };
    if f.is_empty() {
        return Bytes::new();
    }
    let mut b = BytesMut::with_capacity(f.len());
    f.write_fields(&mut b);
    b.freeze()
}

/// How one PUBLISH of a message is written for one subscriber.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PublishHeader<'a> {
    pub qos: QoS,
    pub retain: bool,
    pub dup: bool,
    pub packet_id: u16,
    /// Send the topic name (false: only the alias).
    pub with_topic: bool,
    pub topic_alias: Option<u16>,
    /// Message expiry left, in seconds.
    pub expiry_s: Option<u32>,
    pub subscription_ids: &'a [u32],
}

fn props_len(m: &Message, h: &PublishHeader) -> usize {
    m.props.len()
        + h.expiry_s.map_or(0, |_| 5)
        + h.topic_alias.map_or(0, |_| 3)
        + h.subscription_ids
            .iter()
            .map(|&i| 1 + varint_len(i.min(MAX_VARINT) as usize))
            .sum::<usize>()
}

fn body_len(m: &Message, h: &PublishHeader, v: Version) -> usize {
    let topic = if h.with_topic { &m.topic[..] } else { &[] };
    let mut n = binary_len(topic) + m.payload.len();
    if h.qos != QoS::AtMostOnce {
        n += 2;
    }
    if v == Version::V5 {
        let p = props_len(m, h);
        n += varint_len(p) + p;
    }
    n
}

/// Whole size of the PUBLISH [`write_publish`] writes.
pub fn publish_len(m: &Message, h: &PublishHeader, v: Version) -> usize {
    let n = body_len(m, h, v);
    1 + varint_len(n) + n
}

/// Writes `m` as a PUBLISH for a client of version `v` (an MQTT 3.1.1
/// client gets no properties). A message larger than the MQTT limit is a
/// caller bug: the session checks sizes first.
pub fn write_publish(m: &Message, h: &PublishHeader, v: Version, out: &mut BytesMut) {
    let n = body_len(m, h, v).min(MAX_VARINT as usize);
    out.reserve(1 + varint_len(n) + n);
    out.put_u8(0x30 | (h.dup as u8) << 3 | (h.qos as u8) << 1 | h.retain as u8);
    put_varint(out, n);
    put_binary(out, if h.with_topic { &m.topic[..] } else { &[] });
    if h.qos != QoS::AtMostOnce {
        out.put_u16(h.packet_id);
    }
    if v == Version::V5 {
        put_varint(out, props_len(m, h));
        if let Some(s) = h.expiry_s {
            out.put_u8(prop::MESSAGE_EXPIRY_INTERVAL);
            out.put_u32(s);
        }
        if let Some(a) = h.topic_alias {
            out.put_u8(prop::TOPIC_ALIAS);
            out.put_u16(a);
        }
        for &i in h.subscription_ids {
            out.put_u8(prop::SUBSCRIPTION_IDENTIFIER);
            put_varint(out, i.min(MAX_VARINT) as usize);
        }
        out.put_slice(&m.props);
    }
    out.put_slice(&m.payload);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mqtt::codec::Decoder;
    use crate::mqtt::packet::Packet;

    #[test]
    fn written_publish_decodes_to_the_same_message() {
        let p = Publish {
            qos: QoS::AtLeastOnce,
            retain: true,
            topic: Bytes::from_static(b"a/b"),
            packet_id: 9,
            props: Properties {
                message_expiry_interval: Some(10),
                topic_alias: Some(4),
                content_type: Some(Bytes::from_static(b"json")),
                user_properties: vec![(Bytes::from_static(b"k"), Bytes::from_static(b"v"))],
                ..Properties::default()
            },
            payload: Bytes::from_static(b"{}"),
            ..Publish::default()
        };
        let m = Message::from_publish(&p, 1_000);
        assert_eq!(m.expires_at, Some(11_000));
        assert_eq!(
            m.properties().content_type,
            Some(Bytes::from_static(b"json"))
        );
        assert_eq!(m.properties().topic_alias, None, "aliases are per hop");
        let h = PublishHeader {
            qos: QoS::ExactlyOnce,
            retain: false,
            dup: true,
            packet_id: 3,
            with_topic: true,
            topic_alias: Some(2),
            expiry_s: m.expiry_left_s(3_500),
            subscription_ids: &[5, 300],
        };
        let mut out = BytesMut::new();
        write_publish(&m, &h, Version::V5, &mut out);
        assert_eq!(out.len(), publish_len(&m, &h, Version::V5));
        let Ok(Some(Packet::Publish(back))) = Decoder::new(1 << 20, Version::V5).decode(&mut out)
        else {
            panic!("written PUBLISH does not decode");
        };
        assert_eq!(back.topic, p.topic);
        assert_eq!(back.payload, p.payload);
        assert_eq!(back.qos, QoS::ExactlyOnce);
        assert!(back.dup && !back.retain);
        assert_eq!(back.packet_id, 3);
        assert_eq!(
            back.props.message_expiry_interval,
            Some(8),
            "10 s less 2.5 s, rounded up"
        );
        assert_eq!(back.props.topic_alias, Some(2));
        assert_eq!(back.props.subscription_identifiers, vec![5, 300]);
        assert_eq!(back.props.user_properties, p.props.user_properties);
        assert_eq!(back.props.content_type, p.props.content_type);
        // A 3.1.1 subscriber gets no properties.
        let mut out = BytesMut::new();
        write_publish(&m, &h, Version::V311, &mut out);
        let Ok(Some(Packet::Publish(v3))) = Decoder::new(1 << 20, Version::V311).decode(&mut out)
        else {
            panic!("3.1.1 PUBLISH does not decode");
        };
        assert!(v3.props.is_empty());
        assert_eq!(v3.payload, p.payload);
    }

    #[test]
    fn expiry() {
        let mut m = Message::new(&b"t"[..], &b""[..], QoS::AtMostOnce);
        assert!(!m.is_expired(u64::MAX));
        assert_eq!(m.expiry_left_s(0), None);
        m.expires_at = Some(5_000);
        assert!(!m.is_expired(4_999));
        assert!(m.is_expired(5_000));
        assert_eq!(m.expiry_left_s(4_001), Some(1));
        assert_eq!(m.expiry_left_s(9_000), Some(0));
    }
}
