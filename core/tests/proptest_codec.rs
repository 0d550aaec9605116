//! Property tests of the wire forms: binary round trips, any chunking of a
//! stream, JSON ↔ binary meaning, the payload crossing rules, and that no
//! input makes the decoders or the connection state machine panic.

use bytes::{Bytes, BytesMut};
use proptest::prelude::*;
use relay_core::codec::{self, Decoder};
use relay_core::conn::{ConnConfig, Connection, Event, Now, Transport};
use relay_core::frame::{Flags, Frame, FrameType};
use relay_core::json;
use serde_json::Value;

const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._:@-";

fn name(min: usize) -> impl Strategy<Value = Bytes> {
    prop::collection::vec(prop::sample::select(ALPHABET), min..=64).prop_map(Bytes::from)
}

fn kind() -> impl Strategy<Value = FrameType> {
    prop::sample::select(FrameType::ALL.to_vec())
}

fn payload() -> impl Strategy<Value = Bytes> {
    prop::collection::vec(any::<u8>(), 0..3000).prop_map(Bytes::from)
}

/// Any frame the binary form can carry.
fn any_frame() -> impl Strategy<Value = Frame> {
    (
        kind(),
        any::<u8>(),
        any::<u32>(),
        name(0),
        name(0),
        payload(),
    )
        .prop_map(|(kind, flags, seq, src, dst, payload)| Frame {
            kind,
            flags: Flags(flags),
            seq,
            src,
            dst,
            payload,
        })
}

/// JSON values of every kind, nested a few levels.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        (-1e12f64..1e12).prop_map(Value::from),
        "[ -~]{0,12}".prop_map(Value::String),
        any::<String>().prop_map(Value::String),
        Just(Value::String("q\"b\\s/\n\t\u{2028}é".into())),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map("[ -~]{0,8}", inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn encode_all(frames: &[Frame]) -> BytesMut {
    let mut out = BytesMut::new();
    for f in frames {
        codec::encode(f, &mut out);
    }
    out
}

/// Cuts `len` bytes into pieces at the given (unsorted, maybe repeated) points.
fn pieces(len: usize, cuts: &[usize]) -> Vec<(usize, usize)> {
    let mut at: Vec<usize> = cuts.iter().map(|c| c % (len + 1)).collect();
    at.push(0);
    at.push(len);
    at.sort_unstable();
    at.dedup();
    at.windows(2).map(|w| (w[0], w[1])).collect()
}

fn now(ms: u64) -> Now {
    Now {
        mono_ms: ms,
        wall_ms: 1_763_800_000_000 + ms,
    }
}

/// The frame as a receiver sees it after the binary form: reserved flag bits
/// are cleared on send.
fn sent(f: &Frame) -> Frame {
    Frame {
        flags: f.flags.defined(),
        ..f.clone()
    }
}

/// Every event of a TCP connection fed `stream` in `parts`, answering hellos
/// at once as the router does.
fn run_conn(cfg: &ConnConfig, stream: &[u8], parts: &[(usize, usize)]) -> (Vec<Event>, Vec<u8>) {
    let mut c = Connection::new(cfg, Transport::Tcp, now(0));
    let mut input = BytesMut::new();
    let mut evs = Vec::new();
    let mut out = Vec::new();
    for &(a, b) in parts {
        input.extend_from_slice(&stream[a..b]);
        for _ in 0..100_000 {
            match c.handle_input(cfg, now(1), &mut input) {
                Some(Event::Hello(h)) => {
                    c.accept(cfg, now(1), &h, h.addr.clone(), "n1");
                    evs.push(Event::Hello(h));
                }
                Some(ev) => evs.push(ev),
                None => break,
            }
        }
        while let Some(chunk) = c.poll_transmit(4096) {
            out.extend_from_slice(&chunk);
            c.on_transmitted(cfg, now(1), chunk.len());
        }
    }
    (evs, out)
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 256,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn binary_round_trip(f in any_frame()) {
        let mut buf = BytesMut::new();
        codec::encode(&f, &mut buf);
        prop_assert_eq!(buf.len(), 4 + f.body_len());
        let back = Decoder::new(1 << 20).decode(&mut buf).unwrap().unwrap();
        prop_assert_eq!(back, sent(&f));
        prop_assert!(buf.is_empty());
        // The body alone (a WebSocket binary message) parses the same.
        prop_assert_eq!(codec::parse_body(codec::body_bytes(&f)).unwrap(), sent(&f));
    }

    #[test]
    fn any_chunking_gives_the_same_frames(
        frames in prop::collection::vec(any_frame(), 1..12),
        cuts in prop::collection::vec(any::<usize>(), 0..40),
    ) {
        let stream = encode_all(&frames);
        let d = Decoder::new(1 << 20);
        let mut input = BytesMut::new();
        let mut got = Vec::new();
        for (a, b) in pieces(stream.len(), &cuts) {
            input.extend_from_slice(&stream[a..b]);
            while let Some(f) = d.decode(&mut input).unwrap() {
                got.push(f);
            }
        }
        prop_assert!(input.is_empty());
        prop_assert_eq!(got, frames.iter().map(sent).collect::<Vec<_>>());
    }

    #[test]
    fn any_chunking_gives_the_same_connection_events(
        body in prop::collection::vec(
            (prop::sample::select(vec![FrameType::Data, FrameType::Publish, FrameType::Join,
                FrameType::Leave, FrameType::Ping]), any::<u8>(), any::<u32>(), name(1), payload()),
            1..10),
        cuts in prop::collection::vec(any::<usize>(), 0..40),
        json_form in any::<bool>(),
    ) {
        let cfg = ConnConfig { frames_per_sec: 0, ..ConnConfig::default() };
        let frames: Vec<Frame> = body.into_iter().map(|(kind, flags, seq, dst, payload)| Frame {
            kind, flags: Flags(flags), seq, src: Bytes::new(), dst, payload,
        }).collect();
        let hello = Frame { src: Bytes::from_static(b"ctl-1"), ..Frame::new(FrameType::Hello) };
        let mut stream = Vec::new();
        if json_form {
            for f in std::iter::once(&hello).chain(&frames) {
                let mut b = BytesMut::new();
                json::write_json(f, &mut b);
                stream.extend_from_slice(&b);
                stream.push(b'\n');
            }
        } else {
            stream.extend_from_slice(&encode_all(&[hello]));
            stream.extend_from_slice(&encode_all(&frames));
        }
        let whole = run_conn(&cfg, &stream, &[(0, stream.len())]);
        let chunked = run_conn(&cfg, &stream, &pieces(stream.len(), &cuts));
        prop_assert_eq!(&whole, &chunked);
        // One Hello, then one event per frame but PING; replies for each PING.
        let expected = 1 + frames.iter().filter(|f| f.kind != FrameType::Ping).count();
        prop_assert_eq!(whole.0.len(), expected);
        for ev in &whole.0[1..] {
            if let Event::Data(f) | Event::Publish(f) = ev {
                prop_assert_eq!(&f.src[..], b"ctl-1");
                prop_assert!(!f.flags.group() && f.flags.defined() == f.flags);
            }
        }
    }

    #[test]
    fn json_round_trip_keeps_the_meaning(
        k in prop::sample::select(vec![FrameType::Data, FrameType::Publish, FrameType::Join,
            FrameType::Leave, FrameType::Ack, FrameType::Ping, FrameType::Bye]),
        flags in 0u8..8, seq in any::<u32>(), src in name(0), dst in name(0),
        raw in payload(), value in json_value(), use_value in any::<bool>(),
    ) {
        let payload = if use_value { Bytes::from(value.to_string()) } else { raw };
        let f = Frame { kind: k, flags: Flags(flags), seq, src, dst, payload };
        let mut b = BytesMut::new();
        json::write_json(&f, &mut b);
        prop_assert!(!b.contains(&b'\n'));
        let back = json::parse_json(&b).unwrap();
        // What the JSON form can say: the JSON flag only for JSON text,
        // GROUP only where a group is named, never on group commands.
        let mut want = f.clone();
        let is_json = f.flags.json() && json::is_json(&f.payload);
        let group_cmd = matches!(k, FrameType::Join | FrameType::Leave | FrameType::Publish);
        want.flags = want.flags
            .with(Flags::JSON, is_json)
            .with(Flags::GROUP, f.flags.group() && !group_cmd && !f.dst.is_empty());
        prop_assert_eq!(back, want);
    }

    #[test]
    fn json_error_and_pong_round_trip(
        code in any::<u16>(), message in any::<String>(), seq in any::<u32>(),
        time in prop::option::of(any::<u64>()),
    ) {
        let mut p = Vec::new();
        p.extend_from_slice(&code.to_be_bytes());
        p.extend_from_slice(message.as_bytes());
        let e = Frame { seq, payload: p.into(), ..Frame::new(FrameType::Error) };
        prop_assert_eq!(json::parse_json(json::to_json_string(&e).as_bytes()).unwrap(), e);
        let pong = Frame {
            seq,
            payload: time.map(|t| Bytes::copy_from_slice(&t.to_be_bytes())).unwrap_or_default(),
            ..Frame::new(FrameType::Pong)
        };
        prop_assert_eq!(json::parse_json(json::to_json_string(&pong).as_bytes()).unwrap(), pong);
    }

    #[test]
    fn a_json_payload_arrives_as_the_same_value(value in json_value(), pretty in any::<bool>()) {
        let text = if pretty {
            serde_json::to_string_pretty(&value).unwrap()
        } else {
            value.to_string()
        };
        // Binary sender with flag JSON → JSON receiver → parsed back.
        let mut f = Frame::data(&b"ctl-1"[..], &b"web-1"[..], text.clone());
        f.flags = Flags(Flags::JSON);
        let line = json::to_json_string(&f);
        prop_assert!(!line.contains('\n'));
        let as_json: Value = serde_json::from_str(&line).unwrap();
        let expected: Value = serde_json::from_str(&text).unwrap();
        prop_assert_eq!(&as_json["payload"], &expected);
        let back = json::parse_json(line.as_bytes()).unwrap();
        prop_assert!(back.flags.json());
        prop_assert_eq!(serde_json::from_slice::<Value>(&back.payload).unwrap(), expected.clone());
        // JSON sender → binary receiver: compact text, flag JSON.
        let sent_line = format!(r#"{{"type":"data","dst":"ctl-1","payload":{text}}}"#);
        let from_json = json::parse_json(sent_line.as_bytes()).unwrap();
        prop_assert!(from_json.flags.json());
        prop_assert!(!from_json.payload.contains(&b'\n'));
        prop_assert_eq!(serde_json::from_slice::<Value>(&from_json.payload).unwrap(), expected);
    }

    #[test]
    fn minify_keeps_the_value(value in json_value(), pretty in any::<bool>()) {
        let text = if pretty {
            serde_json::to_string_pretty(&value).unwrap()
        } else {
            format!(" \t{value}\r\n ")
        };
        let mut out = Vec::new();
        json::minify_into(text.as_bytes(), &mut out);
        let a: Value = serde_json::from_str(&text).unwrap();
        let b: Value = serde_json::from_slice(&out).unwrap();
        prop_assert_eq!(a, b);
        prop_assert!(!out.iter().any(|c| matches!(c, b'\n' | b'\r')));
    }

    #[test]
    fn decoders_never_panic(
        bytes in prop::collection::vec(any::<u8>(), 0..2000),
        max_frame in 0usize..300,
    ) {
        let d = Decoder::new(max_frame);
        let mut buf = BytesMut::from(&bytes[..]);
        for _ in 0..bytes.len() + 1 {
            match d.decode(&mut buf) {
                Ok(Some(f)) => prop_assert!(f.body_len() <= max_frame),
                Ok(None) => break,
                Err(e) if e.recoverable() => {}
                Err(_) => break,
            }
        }
        let _ = codec::parse_body(Bytes::from(bytes.clone()));
        let _ = json::parse_json(&bytes);
        let _ = json::seq_of(&bytes);
    }

    #[test]
    fn connections_never_panic_on_garbage(
        bytes in prop::collection::vec(any::<u8>(), 0..2000),
        lead in prop::sample::select(vec![None, Some(b'{')]),
        text in any::<bool>(),
    ) {
        let cfg = ConnConfig { max_frame: 256, queue_bytes: 4096, ..ConnConfig::default() };
        let mut stream = Vec::new();
        stream.extend(lead);
        stream.extend_from_slice(&bytes);
        let (evs, _) = run_conn(&cfg, &stream, &[(0, stream.len())]);
        let closes = evs.iter().filter(|e| matches!(e, Event::Closed(_))).count();
        prop_assert!(closes <= 1);
        let mut w = Connection::new(&cfg, Transport::WebSocket, now(0));
        for piece in stream.chunks(97) {
            let _ = w.handle_message(&cfg, now(1), text, Bytes::copy_from_slice(piece));
        }
        prop_assert!(w.queued_bytes() <= cfg.queue_bytes + relay_core::conn::CONTROL_SLACK + 1024);
    }
}
