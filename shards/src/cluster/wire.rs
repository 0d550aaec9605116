//! The messages nodes send each other on `<prefix>.node.<name>`: one NATS
//! message is one batch of items from one node, all for the receiving node.
//!
//! Layout (big-endian): `u8 version = 1`, `u8 len` + the sending node's
//! name, then items until the end, each a `u8` tag and its fields. Frames
//! travel in the relay's own binary form (`relay_core::codec`, length
//! prefix included), so a payload is never re-encoded.
//!
//! | tag | item | fields |
//! |---|---|---|
//! | 1 | deliver | `u64` token (0: no answer wanted), frame |
//! | 2 | fanout | `u8` index (0 group, 1 uid), name, `u16` n + n names (exclude), `u64` token, frame |
//! | 3 | reply | `u64` token, `u32` delivered, `u16` error code (0: none), `u16` len + message |
//! | 4 | group fanout with MQTT fields | the fields of 2, `u8` 1 + an MQTT message or 0, share filters |
//! | 5 | MQTT publish | name (the publisher), MQTT message, share filters |
//!
//! A name is `u8 len` + bytes. An MQTT message is `u8` flags (bits 0-1
//! QoS, bit 2 RETAIN, bit 3 expiry present), `u64` ms left before it
//! expires (when present), `u16` len + topic, `u32` len + properties,
//! `u32` len + payload. Share filters (the `$share` groups the receiving
//! node serves this time) are `u16` n, then n times `u16` len + filter.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use relay_core::codec::{self, Decoder};
use relay_core::frame::{ErrorCode, Frame};

use relay_core::mqtt::{Message, QoS};

use crate::router::{Failure, Index, MqttMsg};

const VERSION: u8 = 1;
const DELIVER: u8 = 1;
const FANOUT: u8 = 2;
const REPLY: u8 = 3;
const FANOUT_MQTT: u8 = 4;
const MQTT_PUBLISH: u8 = 5;
/// Largest frame a batch may carry (the relay's own `max_frame` ceiling).
const MAX_FRAME: usize = 16 * 1024 * 1024;

/// One item of a batch.
#[derive(Debug, Clone, PartialEq)]
pub enum Item {
    Deliver {
        token: u64,
        frame: Frame,
    },
    Fanout {
        index: Index,
        name: Bytes,
        exclude: Vec<Bytes>,
        token: u64,
        frame: Frame,
        /// With a group publish an MQTT client made: its MQTT message.
        mqtt: Option<Box<MqttMsg>>,
        /// The `$share` filters whose group the receiving node serves.
        shared: Vec<Bytes>,
    },
    /// An MQTT publish for the receiving node's matching subscriptions and
    /// the share groups of `shared`.
    MqttPublish {
        src: Bytes,
        msg: Box<MqttMsg>,
        shared: Vec<Bytes>,
    },
    Reply {
        token: u64,
        delivered: u32,
        error: Option<Failure>,
    },
}

/// Why a batch could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    #[error("batch version {0} is not 1")]
    Version(u8),
    #[error("batch cut short")]
    Short,
    #[error("unknown item tag {0}")]
    Tag(u8),
    #[error("bad frame in batch")]
    Frame,
}

/// A batch being written for one node.
#[derive(Debug)]
pub struct Writer {
    buf: BytesMut,
    items: usize,
}

impl Writer {
    /// A batch from node `from`.
    pub fn new(from: &str) -> Writer {
        let mut buf = BytesMut::with_capacity(256);
        buf.put_u8(VERSION);
        // A name has at most 255 bytes: cut between characters.
        put_name(&mut buf, &from.as_bytes()[..from.floor_char_boundary(255)]);
        Writer { buf, items: 0 }
    }

    pub fn len(&self) -> usize {
        self.buf.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items == 0
    }

    pub fn push(&mut self, item: &Item) {
        self.items += 1;
        let b = &mut self.buf;
        match item {
            Item::Deliver { token, frame } => {
                b.put_u8(DELIVER);
                b.put_u64(*token);
                codec::encode(frame, b);
            }
            Item::Fanout {
                index,
                name,
                exclude,
                token,
                frame,
                mqtt,
                shared,
            } => {
                let plain = mqtt.is_none() && shared.is_empty();
                b.put_u8(if plain { FANOUT } else { FANOUT_MQTT });
                b.put_u8(*index as u8);
                put_name(b, name);
                b.put_u16(exclude.len().min(u16::MAX as usize) as u16);
                for x in exclude.iter().take(u16::MAX as usize) {
                    put_name(b, x);
                }
                b.put_u64(*token);
                codec::encode(frame, b);
                if !plain {
                    match mqtt {
                        Some(m) => {
                            b.put_u8(1);
                            put_msg(b, m);
                        }
                        None => b.put_u8(0),
                    }
                    put_filters(b, shared);
                }
            }
            Item::MqttPublish { src, msg, shared } => {
                b.put_u8(MQTT_PUBLISH);
                put_name(b, src);
                put_msg(b, msg);
                put_filters(b, shared);
            }
            Item::Reply {
                token,
                delivered,
                error,
            } => {
                b.put_u8(REPLY);
                b.put_u64(*token);
                b.put_u32(*delivered);
                match error {
                    None => b.put_u16(0),
                    Some((code, msg)) => {
                        b.put_u16(*code as u16);
                        // At most 1 KiB, cut between characters.
                        let m = &msg.as_bytes()[..msg.floor_char_boundary(1024)];
                        b.put_u16(m.len() as u16);
                        b.put_slice(m);
                    }
                }
            }
        }
    }

    /// The finished batch.
    pub fn finish(self) -> Bytes {
        self.buf.freeze()
    }
}

fn put_name(b: &mut BytesMut, name: &[u8]) {
    let n = &name[..name.len().min(255)];
    b.put_u8(n.len() as u8);
    b.put_slice(n);
}

fn put_msg(b: &mut BytesMut, m: &MqttMsg) {
    let msg = &m.msg;
    let flags = msg.qos as u8 | u8::from(msg.retain) << 2 | u8::from(m.ttl_ms.is_some()) << 3;
    b.put_u8(flags);
    if let Some(t) = m.ttl_ms {
        b.put_u64(t);
    }
    let topic = &msg.topic[..msg.topic.len().min(u16::MAX as usize)];
    b.put_u16(topic.len() as u16);
    b.put_slice(topic);
    b.put_u32(msg.props.len() as u32);
    b.put_slice(&msg.props);
    b.put_u32(msg.payload.len() as u32);
    b.put_slice(&msg.payload);
}

fn put_filters(b: &mut BytesMut, filters: &[Bytes]) {
    let n = filters.len().min(u16::MAX as usize);
    b.put_u16(n as u16);
    for f in &filters[..n] {
        let f = &f[..f.len().min(u16::MAX as usize)];
        b.put_u16(f.len() as u16);
        b.put_slice(f);
    }
}

fn get_filters(b: &mut BytesMut) -> Result<Vec<Bytes>, WireError> {
    need(b, 2)?;
    let n = b.get_u16() as usize;
    let mut out = Vec::with_capacity(n.min(64));
    for _ in 0..n {
        need(b, 2)?;
        let len = b.get_u16() as usize;
        need(b, len)?;
        out.push(b.split_to(len).freeze());
    }
    Ok(out)
}

fn get_msg(b: &mut BytesMut) -> Result<MqttMsg, WireError> {
    need(b, 1)?;
    let flags = b.get_u8();
    let qos = QoS::from_u8(flags & 3).map_err(|_| WireError::Frame)?;
    let ttl_ms = if flags & 8 != 0 {
        need(b, 8)?;
        Some(b.get_u64())
    } else {
        None
    };
    need(b, 2)?;
    let n = b.get_u16() as usize;
    need(b, n)?;
    let topic = b.split_to(n).freeze();
    need(b, 4)?;
    let n = b.get_u32() as usize;
    need(b, n)?;
    let props = b.split_to(n).freeze();
    need(b, 4)?;
    let n = b.get_u32() as usize;
    if n > MAX_FRAME {
        return Err(WireError::Frame);
    }
    need(b, n)?;
    let payload = b.split_to(n).freeze();
    let mut msg = Message::new(topic, payload, qos);
    msg.retain = flags & 4 != 0;
    msg.props = props;
    Ok(MqttMsg { msg, ttl_ms })
}

fn get_name(b: &mut BytesMut) -> Result<Bytes, WireError> {
    if b.remaining() < 1 {
        return Err(WireError::Short);
    }
    let n = b.get_u8() as usize;
    if b.remaining() < n {
        return Err(WireError::Short);
    }
    Ok(b.split_to(n).freeze())
}

fn need(b: &BytesMut, n: usize) -> Result<(), WireError> {
    if b.remaining() < n {
        Err(WireError::Short)
    } else {
        Ok(())
    }
}

fn get_frame(b: &mut BytesMut) -> Result<Frame, WireError> {
    Decoder::new(MAX_FRAME)
        .decode(b)
        .map_err(|_| WireError::Frame)?
        .ok_or(WireError::Short)
}

/// Reads a batch: the sending node and its items.
pub fn read(payload: &[u8]) -> Result<(String, Vec<Item>), WireError> {
    let mut b = BytesMut::from(payload);
    need(&b, 1)?;
    let v = b.get_u8();
    if v != VERSION {
        return Err(WireError::Version(v));
    }
    let from = String::from_utf8_lossy(&get_name(&mut b)?).into_owned();
    let mut items = Vec::new();
    while b.has_remaining() {
        let tag = b.get_u8();
        let item = match tag {
            DELIVER => {
                need(&b, 8)?;
                let token = b.get_u64();
                Item::Deliver {
                    token,
                    frame: get_frame(&mut b)?,
                }
            }
            FANOUT | FANOUT_MQTT => {
                need(&b, 1)?;
                let index = if b.get_u8() == 0 {
                    Index::Group
                } else {
                    Index::Uid
                };
                let name = get_name(&mut b)?;
                need(&b, 2)?;
                let n = b.get_u16() as usize;
                let mut exclude = Vec::with_capacity(n.min(64));
                for _ in 0..n {
                    exclude.push(get_name(&mut b)?);
                }
                need(&b, 8)?;
                let token = b.get_u64();
                let frame = get_frame(&mut b)?;
                let (mut mqtt, mut shared) = (None, Vec::new());
                if tag == FANOUT_MQTT {
                    need(&b, 1)?;
                    if b.get_u8() == 1 {
                        mqtt = Some(Box::new(get_msg(&mut b)?));
                    }
                    shared = get_filters(&mut b)?;
                }
                Item::Fanout {
                    index,
                    name,
                    exclude,
                    token,
                    frame,
                    mqtt,
                    shared,
                }
            }
            MQTT_PUBLISH => {
                let src = get_name(&mut b)?;
                let msg = Box::new(get_msg(&mut b)?);
                Item::MqttPublish {
                    src,
                    msg,
                    shared: get_filters(&mut b)?,
                }
            }
            REPLY => {
                need(&b, 14)?;
                let token = b.get_u64();
                let delivered = b.get_u32();
                let code = b.get_u16();
                let error = if code == 0 {
                    None
                } else {
                    need(&b, 2)?;
                    let n = b.get_u16() as usize;
                    need(&b, n)?;
                    let msg = String::from_utf8_lossy(&b.split_to(n)).into_owned();
                    Some((
                        ErrorCode::from_u16(code).unwrap_or(ErrorCode::Internal),
                        msg,
                    ))
                };
                Item::Reply {
                    token,
                    delivered,
                    error,
                }
            }
            other => return Err(WireError::Tag(other)),
        };
        items.push(item);
    }
    Ok((from, items))
}

#[cfg(test)]
mod tests {
    use super::*;
    use relay_core::frame::{Flags, FrameType};

    fn frame(dst: &str, payload: &[u8]) -> Frame {
        let mut f = Frame::data(
            Bytes::from_static(b"src-1"),
            Bytes::copy_from_slice(dst.as_bytes()),
            Bytes::copy_from_slice(payload),
        );
        f.seq = 7;
        f.flags = Flags(Flags::JSON);
        f
    }

    #[test]
    fn a_batch_reads_back_as_written() {
        let mut group = frame("room", b"{}");
        group.flags = Flags(Flags::GROUP);
        group.kind = FrameType::Data;
        let items = vec![
            Item::Deliver {
                token: 0,
                frame: frame("ctl-1", b"{\"a\":1}"),
            },
            Item::Fanout {
                index: Index::Uid,
                name: Bytes::from_static(b"user-9"),
                exclude: vec![Bytes::from_static(b"web-1"), Bytes::from_static(b"web:2")],
                token: 42,
                frame: group.clone(),
                mqtt: None,
                shared: vec![],
            },
            Item::Fanout {
                index: Index::Group,
                name: Bytes::from_static(b"room"),
                exclude: vec![],
                token: 3,
                frame: group.clone(),
                mqtt: None,
                shared: vec![Bytes::from_static(b"$share/g/room")],
            },
            Item::Fanout {
                index: Index::Group,
                name: Bytes::from_static(b"room"),
                exclude: vec![],
                token: 0,
                frame: group,
                mqtt: Some(Box::new(MqttMsg {
                    msg: {
                        let mut m = Message::new(&b"room"[..], &b"{}"[..], QoS::ExactlyOnce);
                        m.retain = true;
                        m.props = Bytes::from_static(&[0x03, 0, 1, b'x']);
                        m
                    },
                    ttl_ms: Some(9000),
                })),
                shared: vec![],
            },
            Item::MqttPublish {
                src: Bytes::from_static(b"mqtt-cli"),
                msg: Box::new(MqttMsg {
                    msg: Message::new(&b"a/b/c"[..], &b"21.5"[..], QoS::AtMostOnce),
                    ttl_ms: None,
                }),
                shared: vec![
                    Bytes::from_static(b"$share/a/a/+/c"),
                    Bytes::from_static(b"$share/b/#"),
                ],
            },
            Item::Reply {
                token: 9,
                delivered: 0,
                error: Some((ErrorCode::NoRoute, "ctl-1 is offline".into())),
            },
            Item::Reply {
                token: u64::MAX,
                delivered: 3,
                error: None,
            },
        ];
        let mut w = Writer::new("edge-2");
        for i in &items {
            w.push(i);
        }
        let (from, got) = read(&w.finish()).expect("reads");
        assert_eq!(from, "edge-2");
        assert_eq!(got, items);
    }

    /// A reply's error message is cut to 1 KiB at a character boundary, so
    /// the other node reads no broken character.
    #[test]
    fn a_long_error_message_is_cut_between_characters() {
        // 'a' then two-byte characters: byte 1024 falls inside one.
        let msg = format!("a{}", "é".repeat(700));
        let mut w = Writer::new("n1");
        w.push(&Item::Reply {
            token: 1,
            delivered: 0,
            error: Some((ErrorCode::Internal, msg.clone())),
        });
        let (_, items) = read(&w.finish()).expect("reads");
        let Item::Reply {
            error: Some((_, got)),
            ..
        } = &items[0]
        else {
            panic!("{items:?}");
        };
        assert_eq!(got.len(), 1023);
        assert!(msg.starts_with(got.as_str()), "{got}");
    }

    #[test]
    fn a_cut_or_foreign_batch_is_an_error_not_a_panic() {
        let mut w = Writer::new("n1");
        w.push(&Item::Deliver {
            token: 1,
            frame: frame("x", b"payload"),
        });
        let full = w.finish();
        // Four bytes are the header alone: an empty batch, which is valid.
        for cut in (0..4).chain(5..full.len()) {
            assert!(read(&full[..cut]).is_err(), "cut at {cut}");
        }
        let mut w = Writer::new("n1");
        w.push(&Item::MqttPublish {
            src: Bytes::from_static(b"c1"),
            msg: Box::new(MqttMsg {
                msg: Message::new(&b"t/1"[..], &b"payload"[..], QoS::AtLeastOnce),
                ttl_ms: Some(5),
            }),
            shared: vec![Bytes::from_static(b"$share/x/t/#")],
        });
        let full = w.finish();
        for cut in (0..4).chain(5..full.len()) {
            assert!(read(&full[..cut]).is_err(), "mqtt item cut at {cut}");
        }
        assert_eq!(read(&[2, 0]), Err(WireError::Version(2)));
        assert_eq!(read(&[1, 0, 99]), Err(WireError::Tag(99)));
    }
}

/// Batches come from other nodes: whatever bytes arrive, `read` gives a
/// batch or an error, never a panic, and what it gives writes back to the
/// same items.
#[cfg(test)]
mod props {
    use super::*;
    use proptest::collection::vec;
    use proptest::prelude::*;
    use relay_core::frame::Flags;

    fn bytes(max: usize) -> impl Strategy<Value = Bytes> {
        vec(any::<u8>(), 0..max).prop_map(Bytes::from)
    }

    fn addr() -> impl Strategy<Value = Bytes> {
        "[a-z0-9:-]{1,24}".prop_map(Bytes::from)
    }

    fn frame() -> impl Strategy<Value = Frame> {
        (addr(), addr(), bytes(200), any::<u32>(), any::<u8>()).prop_map(
            |(src, dst, payload, seq, flags)| {
                let mut f = Frame::data(src, dst, payload);
                f.seq = seq;
                f.flags = Flags(flags).defined();
                f
            },
        )
    }

    fn mqtt() -> impl Strategy<Value = MqttMsg> {
        (
            bytes(60),
            bytes(200),
            0..3u8,
            any::<bool>(),
            bytes(20),
            proptest::option::of(any::<u64>()),
        )
            .prop_map(|(topic, payload, qos, retain, props, ttl_ms)| {
                let mut msg = Message::new(topic, payload, QoS::from_u8(qos).unwrap());
                msg.retain = retain;
                msg.props = props;
                MqttMsg { msg, ttl_ms }
            })
    }

    fn item() -> impl Strategy<Value = Item> {
        let error = proptest::option::of((
            proptest::sample::select(ErrorCode::ALL.to_vec()),
            "[ -~]{0,40}",
        ));
        prop_oneof![
            (any::<u64>(), frame()).prop_map(|(token, frame)| Item::Deliver { token, frame }),
            (
                any::<bool>(),
                addr(),
                vec(addr(), 0..4),
                any::<u64>(),
                frame(),
                proptest::option::of(mqtt()),
                vec(bytes(30), 0..3),
            )
                .prop_map(|(uid, name, exclude, token, frame, mqtt, shared)| {
                    Item::Fanout {
                        index: if uid { Index::Uid } else { Index::Group },
                        name,
                        exclude,
                        token,
                        frame,
                        mqtt: mqtt.map(Box::new),
                        shared,
                    }
                }),
            (addr(), mqtt(), vec(bytes(30), 0..3)).prop_map(|(src, msg, shared)| {
                Item::MqttPublish {
                    src,
                    msg: Box::new(msg),
                    shared,
                }
            }),
            (any::<u64>(), any::<u32>(), error).prop_map(|(token, delivered, error)| {
                Item::Reply {
                    token,
                    delivered,
                    error,
                }
            }),
        ]
    }

    fn write(from: &str, items: &[Item]) -> Bytes {
        let mut w = Writer::new(from);
        for i in items {
            w.push(i);
        }
        w.finish()
    }

    /// What was read writes back to a batch that reads, with as many items,
    /// and from then on to the same items. (The first pass may clear
    /// reserved flag bits and cut an over-long error message or node name.)
    fn settles(from: &str, items: &[Item]) -> Result<(), TestCaseError> {
        let (from1, once) = read(&write(from, items)).expect("a rewritten batch reads");
        prop_assert_eq!(once.len(), items.len());
        let (from2, twice) = read(&write(&from1, &once)).expect("it reads again");
        prop_assert_eq!(from2, from1);
        prop_assert_eq!(twice, once);
        Ok(())
    }

    proptest! {
        #[test]
        fn written_batches_read_back(from in "[a-z0-9-]{0,30}", items in vec(item(), 0..8)) {
            let (got_from, got) = read(&write(&from, &items)).expect("a written batch reads");
            prop_assert_eq!(got_from, from);
            prop_assert_eq!(got, items);
        }

        #[test]
        fn any_bytes_read_to_a_batch_or_an_error(
            mut data in vec(any::<u8>(), 0..400),
            versioned in any::<bool>(),
        ) {
            if versioned && !data.is_empty() {
                data[0] = VERSION;
            }
            if let Ok((from, items)) = read(&data) {
                settles(&from, &items)?;
            }
        }

        #[test]
        fn damaged_batches_read_to_a_batch_or_an_error(
            items in vec(item(), 1..5),
            edits in vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
            cut in any::<prop::sample::Index>(),
        ) {
            let mut data = write("n1", &items).to_vec();
            for (at, v) in edits {
                let i = at.index(data.len());
                data[i] = v;
            }
            data.truncate(cut.index(data.len() + 1));
            if let Ok((from, items)) = read(&data) {
                settles(&from, &items)?;
            }
        }
    }
}
