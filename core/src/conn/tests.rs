//! Tests of the connection state machine: every rule driven through
//! `handle_input` / `handle_message` on a simulated clock, output read back
//! from `poll_transmit`.

use super::hello::percent_decode;
use super::*;
use crate::codec::{Decoder, encode};
use serde_json::{Value, json};

const WALL0: u64 = 1_763_800_000_000;

/// Simulated clock: `ms` since the connection's accept.
fn t(ms: u64) -> Now {
    Now {
        mono_ms: ms,
        wall_ms: WALL0.saturating_add(ms),
    }
}

fn bin(f: &Frame) -> BytesMut {
    let mut b = BytesMut::new();
    encode(f, &mut b);
    b
}

fn hello(addr: &str, payload: &str) -> Frame {
    Frame {
        src: Bytes::copy_from_slice(addr.as_bytes()),
        payload: Bytes::copy_from_slice(payload.as_bytes()),
        ..Frame::new(FrameType::Hello)
    }
}

fn with(mut f: Frame, seq: u32, flags: u8) -> Frame {
    f.seq = seq;
    f.flags = Flags(flags);
    f
}

/// Every event `input` yields now.
fn events(c: &mut Connection, cfg: &ConnConfig, now: Now, input: &mut BytesMut) -> Vec<Event> {
    let mut v = Vec::new();
    for _ in 0..10_000 {
        match c.handle_input(cfg, now, input) {
            Some(ev) => v.push(ev),
            None => return v,
        }
    }
    panic!("handle_input never returned None");
}

/// Like `events`, answering each hello with `accept` at once, as the
/// router does.
fn pump(c: &mut Connection, cfg: &ConnConfig, now: Now, input: &mut BytesMut) -> Vec<Event> {
    let mut v = Vec::new();
    for _ in 0..10_000 {
        match c.handle_input(cfg, now, input) {
            Some(Event::Hello(h)) => {
                c.accept(cfg, now, &h, h.addr.clone(), "n1");
                v.push(Event::Hello(h));
            }
            Some(ev) => v.push(ev),
            None => return v,
        }
    }
    panic!("handle_input never returned None");
}

/// Everything queued for the client, confirmed written.
fn drain(c: &mut Connection, cfg: &ConnConfig, now: Now) -> BytesMut {
    let mut all = BytesMut::new();
    while let Some(chunk) = c.poll_transmit(usize::MAX) {
        all.extend_from_slice(&chunk);
        c.on_transmitted(cfg, now, chunk.len());
    }
    all
}

fn bin_frames(mut out: BytesMut) -> Vec<Frame> {
    let d = Decoder::new(1 << 20);
    let mut v = Vec::new();
    while let Some(f) = d.decode(&mut out).expect("server output decodes") {
        v.push(f);
    }
    assert!(out.is_empty(), "trailing bytes in server output");
    v
}

fn json_lines(out: &[u8]) -> Vec<Value> {
    let text = std::str::from_utf8(out).expect("JSON output is UTF-8");
    assert!(text.is_empty() || text.ends_with('\n'));
    text.lines()
        .map(|l| serde_json::from_str(l).expect("each line is JSON"))
        .collect()
}

/// (opcode, payload) of each server WebSocket frame (unmasked, final).
fn ws_frames(out: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let mut v = Vec::new();
    let mut i = 0;
    while i < out.len() {
        assert_eq!(out[i] & 0xf0, 0x80, "FIN set, RSV clear");
        let op = out[i] & 0x0f;
        assert_eq!(out[i + 1] & 0x80, 0, "server frames are unmasked");
        let (len, hl) = match out[i + 1] {
            126 => (u16::from_be_bytes([out[i + 2], out[i + 3]]) as usize, 4),
            127 => (
                u64::from_be_bytes(out[i + 2..i + 10].try_into().unwrap()) as usize,
                10,
            ),
            n => (n as usize, 2),
        };
        v.push((op, out[i + hl..i + hl + len].to_vec()));
        i += hl + len;
    }
    v
}

fn err_of(f: &Frame) -> (u32, ErrorCode) {
    let (code, _) = f.error_parts().expect("an ERROR frame");
    (f.seq, ErrorCode::from_u16(code).expect("a known code"))
}

fn expect_hello(ev: Vec<Event>) -> Hello {
    match &ev[..] {
        [Event::Hello(h)] => h.clone(),
        other => panic!("expected one Hello, got {other:?}"),
    }
}

/// A binary TCP connection that said hello as `addr` and read its WELCOME.
fn open_bin(cfg: &ConnConfig, addr: &str) -> Connection {
    let mut c = Connection::new(cfg, Transport::Tcp, t(0));
    let h = expect_hello(events(&mut c, cfg, t(0), &mut bin(&hello(addr, ""))));
    c.accept(cfg, t(0), &h, h.addr.clone(), "n1");
    let out = bin_frames(drain(&mut c, cfg, t(0)));
    assert_eq!(out[0].kind, FrameType::Welcome);
    c
}

#[test]
fn before_hello_only_hello_ping_and_bye_are_accepted() {
    let cfg = ConnConfig::default();
    let mut c = Connection::new(&cfg, Transport::Tcp, t(0));
    let mut input = BytesMut::new();
    input.extend(bin(&with(Frame::data("", "ctl-1", "x"), 1, Flags::ACK_REQ)));
    input.extend(bin(&with(
        Frame {
            dst: Bytes::from_static(b"room"),
            ..Frame::new(FrameType::Join)
        },
        2,
        0,
    )));
    input.extend(bin(&with(Frame::new(FrameType::Leave), 3, 0)));
    input.extend(bin(&with(Frame::new(FrameType::Publish), 4, 0)));
    input.extend(bin(&with(Frame::new(FrameType::Ping), 5, 0)));
    assert_eq!(events(&mut c, &cfg, t(10), &mut input), vec![]);
    assert!(!c.is_closing() && !c.is_open());
    let out = bin_frames(drain(&mut c, &cfg, t(10)));
    assert_eq!(out.len(), 5);
    for (i, f) in out[..4].iter().enumerate() {
        assert_eq!(err_of(f), (i as u32 + 1, ErrorCode::HelloRequired));
    }
    assert_eq!(out[4].kind, FrameType::Pong);
    // The connection goes on: a HELLO now succeeds.
    let h = expect_hello(events(&mut c, &cfg, t(20), &mut bin(&hello("ctl-1", ""))));
    assert_eq!(&h.addr[..], b"ctl-1");
    c.accept(&cfg, t(20), &h, h.addr.clone(), "n1");
    assert!(c.is_open());
    let out = bin_frames(drain(&mut c, &cfg, t(20)));
    assert_eq!(out[0].kind, FrameType::Welcome);
    assert_eq!(&out[0].dst[..], b"ctl-1");
    let w: Value = serde_json::from_slice(&out[0].payload).unwrap();
    assert_eq!(
        w,
        json!({"addr":"ctl-1","server_time_ms":WALL0 + 20,"heartbeat_s":30,"max_frame":65536,"node":"n1"})
    );
    assert!(out[0].flags.json());
}

#[test]
fn bye_before_hello_closes() {
    let cfg = ConnConfig::default();
    let mut c = Connection::new(&cfg, Transport::Tcp, t(0));
    let ev = events(&mut c, &cfg, t(1), &mut bin(&Frame::new(FrameType::Bye)));
    assert_eq!(ev, vec![Event::Closed(CloseReason::Bye)]);
    let out = bin_frames(drain(&mut c, &cfg, t(1)));
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].kind, FrameType::Bye);
}

#[test]
fn hello_timeout_closes_a_silent_connection() {
    let cfg = ConnConfig {
        hello_timeout_ms: 2_000,
        ..ConnConfig::default()
    };
    let mut c = Connection::new(&cfg, Transport::Tcp, t(100));
    assert_eq!(c.poll_timeout(&cfg), Some(2_100));
    // Activity that is not a hello does not move the deadline.
    events(&mut c, &cfg, t(500), &mut bin(&Frame::new(FrameType::Ping)));
    assert_eq!(c.poll_timeout(&cfg), Some(2_100));
    assert_eq!(c.handle_timeout(&cfg, t(2_099)), None);
    assert_eq!(
        c.handle_timeout(&cfg, t(2_100)),
        Some(Event::Closed(CloseReason::HelloTimeout))
    );
    assert!(c.is_closing());
    assert_eq!(c.poll_timeout(&cfg), None);
    let out = bin_frames(drain(&mut c, &cfg, t(2_100)));
    assert_eq!(err_of(out.last().unwrap()), (0, ErrorCode::HelloRequired));
    // A hello that arrives now is ignored.
    assert_eq!(
        events(&mut c, &cfg, t(2_200), &mut bin(&hello("a", ""))),
        vec![]
    );
}

#[test]
fn extreme_limits_do_not_overflow() {
    let cfg = ConnConfig {
        hello_timeout_ms: u64::MAX,
        heartbeat_default_s: u32::MAX,
        heartbeat_min_s: u32::MAX,
        heartbeat_max_s: u32::MAX,
        idle_factor: u32::MAX,
        slow_consumer_timeout_ms: u64::MAX,
        frames_per_sec: u32::MAX,
        burst: u32::MAX,
        queue_bytes: 1,
        ..ConnConfig::default()
    };
    let mut c = Connection::new(&cfg, Transport::Tcp, t(5));
    assert_eq!(c.poll_timeout(&cfg), Some(u64::MAX));
    let h = expect_hello(events(&mut c, &cfg, t(5), &mut bin(&hello("a", ""))));
    c.accept(&cfg, t(5), &h, h.addr.clone(), "n1");
    drain(&mut c, &cfg, t(5));
    assert_eq!(c.idle_timeout_ms(&cfg), u64::MAX);
    c.send(&cfg, t(6), &Frame::data("b", "a", "x")).unwrap();
    assert_eq!(
        c.send(&cfg, t(6), &Frame::data("b", "a", "x")),
        Err(SendError::Full)
    );
    assert_eq!(c.poll_timeout(&cfg), Some(u64::MAX));
    assert_eq!(c.handle_timeout(&cfg, t(u64::MAX - 1)), None);
    let mut input = BytesMut::new();
    for _ in 0..10 {
        input.extend(bin(&Frame::data("", "b", "x")));
    }
    assert_eq!(events(&mut c, &cfg, t(u64::MAX - 1), &mut input).len(), 10);
}

#[test]
fn no_hello_timeout_once_open() {
    let cfg = ConnConfig::default();
    let mut c = open_bin(&cfg, "ctl-1");
    assert_eq!(c.poll_timeout(&cfg), Some(90_000));
    assert_eq!(c.handle_timeout(&cfg, t(10_000)), None);
    assert!(c.is_open());
}

#[test]
fn idle_timeout_is_factor_times_heartbeat_and_moves_with_activity() {
    let cfg = ConnConfig::default();
    let mut c = open_bin(&cfg, "ctl-1");
    assert_eq!(c.idle_timeout_ms(&cfg), 90_000);
    events(
        &mut c,
        &cfg,
        t(50_000),
        &mut bin(&Frame::new(FrameType::Ping)),
    );
    assert_eq!(c.poll_timeout(&cfg), Some(140_000));
    c.touch(t(60_000));
    assert_eq!(c.poll_timeout(&cfg), Some(150_000));
    assert_eq!(c.handle_timeout(&cfg, t(149_999)), None);
    assert_eq!(
        c.handle_timeout(&cfg, t(150_000)),
        Some(Event::Closed(CloseReason::IdleTimeout))
    );
    let out = bin_frames(drain(&mut c, &cfg, t(150_000)));
    assert_eq!(err_of(out.last().unwrap()), (0, ErrorCode::IdleTimeout));
}

#[test]
fn requested_heartbeat_is_clamped_and_sets_the_idle_timeout() {
    let cfg = ConnConfig {
        idle_factor: 2,
        ..ConnConfig::default()
    };
    for (asked, kept) in [
        (Some(20), 20),
        (Some(1), 5),
        (Some(0), 5),
        (Some(99_999), 3600),
        (None, 30),
    ] {
        let mut c = Connection::new(&cfg, Transport::Tcp, t(0));
        let payload = match asked {
            Some(n) => format!(r#"{{"heartbeat_s":{n}}}"#),
            None => String::new(),
        };
        let h = expect_hello(events(&mut c, &cfg, t(0), &mut bin(&hello("a", &payload))));
        assert_eq!(h.heartbeat_s, kept);
        c.accept(&cfg, t(0), &h, h.addr.clone(), "n1");
        assert_eq!(c.heartbeat_s(), kept);
        assert_eq!(c.idle_timeout_ms(&cfg), kept as u64 * 2_000);
        assert_eq!(c.poll_timeout(&cfg), Some(kept as u64 * 2_000));
        let w = &bin_frames(drain(&mut c, &cfg, t(0)))[0];
        let w: Value = serde_json::from_slice(&w.payload).unwrap();
        assert_eq!(w["heartbeat_s"], json!(kept));
    }
}

#[test]
fn ping_gets_pong_with_server_time_and_ack_when_asked() {
    let cfg = ConnConfig::default();
    let mut c = open_bin(&cfg, "ctl-1");
    events(
        &mut c,
        &cfg,
        t(1234),
        &mut bin(&Frame::new(FrameType::Ping)),
    );
    let out = bin_frames(drain(&mut c, &cfg, t(1234)));
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].kind, FrameType::Pong);
    assert_eq!(out[0].pong_time(), Some(WALL0 + 1234));
    events(
        &mut c,
        &cfg,
        t(1300),
        &mut bin(&with(Frame::new(FrameType::Ping), 77, Flags::ACK_REQ)),
    );
    let out = bin_frames(drain(&mut c, &cfg, t(1300)));
    assert_eq!(out.len(), 2);
    assert_eq!(out[0].pong_time(), Some(WALL0 + 1300));
    assert_eq!(out[1], Frame::ack(77));
}

#[test]
fn bye_is_answered_with_bye_and_closes() {
    let cfg = ConnConfig::default();
    let mut c = open_bin(&cfg, "ctl-1");
    let mut input = bin(&with(Frame::new(FrameType::Bye), 3, Flags::ACK_REQ));
    input.extend(bin(&Frame::data("", "ctl-2", "late")));
    let ev = events(&mut c, &cfg, t(5), &mut input);
    assert_eq!(ev, vec![Event::Closed(CloseReason::Bye)]);
    assert!(c.is_closing());
    let out = bin_frames(drain(&mut c, &cfg, t(5)));
    assert_eq!(out, vec![Frame::ack(3), Frame::new(FrameType::Bye)]);
    // Nothing more comes out, and nothing more can be sent.
    assert_eq!(events(&mut c, &cfg, t(6), &mut input), vec![]);
    assert_eq!(
        c.send(&cfg, t(6), &Frame::data("x", "ctl-1", "")),
        Err(SendError::Closed)
    );
    assert_eq!(c.poll_timeout(&cfg), None);
}

#[test]
fn binary_layout_errors_get_an_error_and_close() {
    let cfg = ConnConfig {
        max_frame: 1000,
        ..ConnConfig::default()
    };
    // (bytes, seq carried, code)
    let cases: Vec<(Vec<u8>, u32, ErrorCode)> = vec![
        // version 2
        (
            vec![0, 0, 0, 9, 2, 3, 0, 0, 0, 0, 4, 0, 0],
            4,
            ErrorCode::Unsupported,
        ),
        // src_len 65
        (
            vec![0, 0, 0, 9, 1, 3, 1, 0, 0, 0, 5, 65, 0],
            5,
            ErrorCode::BadFrame,
        ),
        // src runs past the end
        (
            vec![0, 0, 0, 9, 1, 3, 1, 0, 0, 0, 6, 3, 0],
            6,
            ErrorCode::BadFrame,
        ),
        // dst runs past the end
        (
            vec![0, 0, 0, 10, 1, 3, 1, 0, 0, 0, 7, 0, 5, b'a'],
            7,
            ErrorCode::BadFrame,
        ),
        // body shorter than 9 bytes
        (vec![0, 0, 0, 3, 1, 3, 0], 0, ErrorCode::BadFrame),
        // length over max_frame, refused before the body arrives
        (vec![0, 0, 0x03, 0xe9], 0, ErrorCode::TooLarge),
    ];
    for (bytes, seq, code) in cases {
        let mut c = open_bin(&cfg, "ctl-1");
        let mut input = BytesMut::from(&bytes[..]);
        input.extend(bin(&Frame::new(FrameType::Ping)));
        let ev = events(&mut c, &cfg, t(1), &mut input);
        assert_eq!(
            ev,
            vec![Event::Closed(CloseReason::ProtocolError)],
            "{bytes:?}"
        );
        let out = bin_frames(drain(&mut c, &cfg, t(1)));
        // One ERROR, and the PING behind the bad frame is not answered.
        assert_eq!(out.len(), 1, "{bytes:?}");
        assert_eq!(err_of(&out[0]), (seq, code), "{bytes:?}");
    }
}

#[test]
fn unknown_binary_type_is_refused_and_the_stream_goes_on() {
    let cfg = ConnConfig::default();
    let mut c = open_bin(&cfg, "ctl-1");
    let mut input = BytesMut::from(&[0, 0, 0, 9, 1, 99, 1, 0, 0, 0, 8, 0, 0][..]);
    input.extend(bin(&Frame::new(FrameType::Ping)));
    assert_eq!(events(&mut c, &cfg, t(1), &mut input), vec![]);
    let out = bin_frames(drain(&mut c, &cfg, t(1)));
    assert_eq!(err_of(&out[0]), (8, ErrorCode::Unsupported));
    assert_eq!(out[1].kind, FrameType::Pong);
    assert!(c.is_open());
}

#[test]
fn frames_a_client_may_not_send_are_unsupported() {
    let cfg = ConnConfig::default();
    let mut c = open_bin(&cfg, "ctl-1");
    let mut input = BytesMut::new();
    for (i, k) in [
        FrameType::Welcome,
        FrameType::Ack,
        FrameType::Pong,
        FrameType::Error,
        FrameType::Hello,
    ]
    .into_iter()
    .enumerate()
    {
        input.extend(bin(&with(Frame::new(k), i as u32 + 1, Flags::ACK_REQ)));
    }
    assert_eq!(events(&mut c, &cfg, t(1), &mut input), vec![]);
    let out = bin_frames(drain(&mut c, &cfg, t(1)));
    let got: Vec<_> = out.iter().map(err_of).collect();
    assert_eq!(
        got,
        (1..=5)
            .map(|s| (s, ErrorCode::Unsupported))
            .collect::<Vec<_>>()
    );
    assert!(c.is_open());
}

#[test]
fn bad_json_lines_get_an_error_and_the_connection_goes_on() {
    let cfg = ConnConfig::default();
    let mut c = Connection::new(&cfg, Transport::Tcp, t(0));
    let mut input = BytesMut::from(
        &b"{\"type\":\"hello\",\"addr\":\"web-1\"}\r\n\
           {\"type\":\n\
           {\"type\":\"teleport\",\"seq\":4,\"ack\":true}\n\
           {\"type\":\"data\",\"seq\":-1}\n\
           \n\
           {\"type\":\"data\",\"dst\":\"ctl-1\",\"seq\":6,\"payload_b64\":\"!\"}\n\
           {\"type\":\"ping\"}\n"[..],
    );
    let ev = pump(&mut c, &cfg, t(0), &mut input);
    assert!(matches!(&ev[..], [Event::Hello(_)]), "{ev:?}");
    assert_eq!(c.wire(), Some(Wire::Json));
    assert!(c.is_open());
    let out = json_lines(&drain(&mut c, &cfg, t(0)));
    assert_eq!(out[0]["type"], "welcome");
    assert_eq!(out[0]["addr"], "web-1");
    assert_eq!(
        (&out[1]["type"], &out[1]["code"]),
        (&json!("error"), &json!("bad_frame"))
    );
    assert_eq!(out[2]["code"], "unsupported");
    assert_eq!(out[2]["seq"], 4);
    assert_eq!(out[3]["code"], "bad_frame");
    assert_eq!(out[4]["code"], "bad_frame");
    assert_eq!(out[4]["seq"], 6);
    assert_eq!(out[5]["type"], "pong");
    assert_eq!(out[5]["server_time_ms"], WALL0);
    assert_eq!(out.len(), 6);
}

#[test]
fn json_lines_split_across_reads() {
    let cfg = ConnConfig::default();
    let mut c = open_json(&cfg);
    let line = b"{\"type\":\"data\",\"dst\":\"ctl-1\",\"payload\":{\"a\": 1}}\n";
    let mut input = BytesMut::new();
    let mut got = Vec::new();
    for chunk in line.chunks(3) {
        input.extend_from_slice(chunk);
        got.extend(events(&mut c, &cfg, t(1), &mut input));
    }
    assert_eq!(got.len(), 1);
    let Event::Data(f) = &got[0] else {
        panic!("{got:?}")
    };
    assert_eq!(&f.payload[..], br#"{"a":1}"#);
    assert_eq!(&f.src[..], b"web-1");
    assert!(input.is_empty());
}

fn open_json(cfg: &ConnConfig) -> Connection {
    let mut c = Connection::new(cfg, Transport::Tcp, t(0));
    let mut input = BytesMut::from(&b"{\"type\":\"hello\",\"addr\":\"web-1\"}\n"[..]);
    let h = expect_hello(events(&mut c, cfg, t(0), &mut input));
    c.accept(cfg, t(0), &h, h.addr.clone(), "n1");
    drain(&mut c, cfg, t(0));
    c
}

#[test]
fn too_long_json_lines_are_refused_and_skipped() {
    let cfg = ConnConfig {
        max_frame: 100,
        ..ConnConfig::default()
    };
    let max = cfg.max_line();
    // Whole line present at once.
    let mut c = open_json(&cfg);
    let mut input = BytesMut::new();
    input.extend_from_slice(
        format!("{{\"type\":\"ping\",\"x\":\"{}\"}}\n", "a".repeat(max)).as_bytes(),
    );
    input.extend_from_slice(b"{\"type\":\"ping\"}\n");
    assert_eq!(events(&mut c, &cfg, t(1), &mut input), vec![]);
    let out = json_lines(&drain(&mut c, &cfg, t(1)));
    assert_eq!(out[0]["code"], "too_large");
    assert_eq!(out[1]["type"], "pong");
    assert_eq!(out.len(), 2);
    // Line arriving in pieces: the buffer never holds more than max_line.
    let mut input = BytesMut::new();
    for _ in 0..10 {
        input.extend_from_slice(&vec![b'x'; max / 3]);
        assert_eq!(events(&mut c, &cfg, t(2), &mut input), vec![]);
        assert!(input.len() <= max);
    }
    input.extend_from_slice(b"tail}\n{\"type\":\"ping\"}\n");
    assert_eq!(events(&mut c, &cfg, t(2), &mut input), vec![]);
    let out = json_lines(&drain(&mut c, &cfg, t(2)));
    assert_eq!(out.len(), 2, "{out:?}");
    assert_eq!(out[0]["code"], "too_large");
    assert_eq!(out[1]["type"], "pong");
    assert!(c.is_open());
    // A line whose payload makes a frame over max_frame.
    let line = format!(
        "{{\"type\":\"data\",\"dst\":\"a\",\"seq\":3,\"payload\":\"{}\"}}\n",
        "b".repeat(100)
    );
    assert!(line.len() < max);
    let mut input = BytesMut::from(line.as_bytes());
    assert_eq!(events(&mut c, &cfg, t(3), &mut input), vec![]);
    let out = json_lines(&drain(&mut c, &cfg, t(3)));
    assert_eq!(
        (&out[0]["code"], &out[0]["seq"]),
        (&json!("too_large"), &json!(3))
    );
}

#[test]
fn hello_with_ack_req_gets_welcome_then_ack() {
    let cfg = ConnConfig::default();
    let mut c = Connection::new(&cfg, Transport::Tcp, t(0));
    let h = expect_hello(events(
        &mut c,
        &cfg,
        t(0),
        &mut bin(&with(hello("ctl-9", ""), 42, Flags::ACK_REQ)),
    ));
    assert!(h.ack_req);
    assert_eq!(h.seq, 42);
    c.accept(&cfg, t(0), &h, h.addr.clone(), "n1");
    let out = bin_frames(drain(&mut c, &cfg, t(0)));
    assert_eq!(out.len(), 2);
    assert_eq!(out[0].kind, FrameType::Welcome);
    assert_eq!(out[1], Frame::ack(42));
    // Same in the JSON form.
    let mut c = Connection::new(&cfg, Transport::Tcp, t(0));
    let mut input = BytesMut::from(&b"{\"type\":\"hello\",\"seq\":7,\"ack\":true}\n"[..]);
    let h = expect_hello(events(&mut c, &cfg, t(0), &mut input));
    assert!(h.addr.is_empty());
    c.accept(&cfg, t(0), &h, Bytes::from_static(b"n1-0-1"), "n1");
    assert_eq!(c.addr(), &Bytes::from_static(b"n1-0-1"));
    let out = json_lines(&drain(&mut c, &cfg, t(0)));
    assert_eq!(out[0]["type"], "welcome");
    assert_eq!(out[0]["addr"], "n1-0-1");
    assert_eq!(out[1], json!({"type":"ack","seq":7}));
}

#[test]
fn hello_fields_role_and_meta() {
    let cfg = ConnConfig::default();
    let mut c = Connection::new(&cfg, Transport::Tcp, t(0));
    let h = expect_hello(events(
        &mut c,
        &cfg,
        t(0),
        &mut bin(&hello("svc-1", r#"{"role":"service","meta":{"fw":"1.2"}}"#)),
    ));
    assert_eq!(h.role, Role::Service);
    assert_eq!(&h.meta[..], br#"{"fw":"1.2"}"#);
    c.accept(&cfg, t(0), &h, h.addr.clone(), "n1");
    assert_eq!(c.role(), Role::Service);
    // Defaults: controller on TCP, browser on WebSocket, meta {}.
    let mut c = Connection::new(&cfg, Transport::Tcp, t(0));
    let h = expect_hello(events(&mut c, &cfg, t(0), &mut bin(&hello("a", ""))));
    assert_eq!((h.role, &h.meta[..]), (Role::Controller, &b"{}"[..]));
    let mut w = Connection::new(&cfg, Transport::WebSocket, t(0));
    let Some(Event::Hello(h)) =
        w.handle_message(&cfg, t(0), true, Bytes::from_static(br#"{"type":"hello"}"#))
    else {
        panic!()
    };
    assert_eq!(h.role, Role::Browser);
    // Bad payloads are refused and the connection goes on.
    for bad in [
        r#"{"role":"king"}"#,
        r#"{"role":1}"#,
        r#"{"heartbeat_s":-3}"#,
        r#"{"meta":[1]}"#,
        r#"[1]"#,
        "not json",
    ] {
        let mut c = Connection::new(&cfg, Transport::Tcp, t(0));
        assert_eq!(
            events(&mut c, &cfg, t(0), &mut bin(&with(hello("a", bad), 2, 0))),
            vec![]
        );
        let out = bin_frames(drain(&mut c, &cfg, t(0)));
        assert_eq!(err_of(&out[0]), (2, ErrorCode::BadFrame), "{bad}");
        assert!(!c.is_closing());
    }
    let cfg_small = ConnConfig {
        max_meta_bytes: 10,
        ..ConnConfig::default()
    };
    let mut c = Connection::new(&cfg_small, Transport::Tcp, t(0));
    let big = r#"{"meta":{"k":"0123456789"}}"#;
    assert_eq!(
        events(&mut c, &cfg_small, t(0), &mut bin(&hello("a", big))),
        vec![]
    );
    assert_eq!(
        err_of(&bin_frames(drain(&mut c, &cfg_small, t(0)))[0]).1,
        ErrorCode::BadFrame
    );
}

#[test]
fn a_second_hello_while_one_is_pending_is_refused() {
    let cfg = ConnConfig::default();
    let mut c = Connection::new(&cfg, Transport::Tcp, t(0));
    let mut input = bin(&hello("a", ""));
    input.extend(bin(&with(hello("b", ""), 2, 0)));
    let first = c.handle_input(&cfg, t(0), &mut input);
    assert!(matches!(first, Some(Event::Hello(_))));
    assert_eq!(c.handle_input(&cfg, t(0), &mut input), None);
    let out = bin_frames(drain(&mut c, &cfg, t(0)));
    assert_eq!(err_of(&out[0]), (2, ErrorCode::Unsupported));
    // After a refusal without close, a new hello is taken.
    assert_eq!(c.refuse(&cfg, 0, ErrorCode::Forbidden, "no", false), None);
    assert!(matches!(
        events(&mut c, &cfg, t(0), &mut bin(&hello("c", "")))[..],
        [Event::Hello(_)]
    ));
}

#[test]
fn refuse_with_close_ends_the_connection() {
    let cfg = ConnConfig::default();
    let mut c = Connection::new(&cfg, Transport::Tcp, t(0));
    let h = expect_hello(events(
        &mut c,
        &cfg,
        t(0),
        &mut bin(&with(hello("a", ""), 5, 0)),
    ));
    assert_eq!(
        c.refuse(&cfg, h.seq, ErrorCode::Forbidden, "not here", true),
        Some(Event::Closed(CloseReason::ProtocolError))
    );
    let out = bin_frames(drain(&mut c, &cfg, t(0)));
    assert_eq!(err_of(&out[0]), (5, ErrorCode::Forbidden));
    assert!(c.is_closing());
}

#[test]
fn hmac_auth_refuses_wrong_or_missing_tokens_and_closes() {
    let cfg = ConnConfig {
        auth_secret: Some(b"s3cret".to_vec()),
        ..ConnConfig::default()
    };
    let good = auth::token_for(b"s3cret", b"ctl-8266-0042");
    let other = auth::token_for(b"s3cret", b"ctl-8266-0043");
    let refused = [
        hello("ctl-8266-0042", &format!(r#"{{"token":"{other}"}}"#)),
        hello("ctl-8266-0042", r#"{"token":"zz"}"#),
        hello("ctl-8266-0042", ""),
        hello("", &format!(r#"{{"token":"{good}"}}"#)),
    ];
    for f in refused {
        let mut c = Connection::new(&cfg, Transport::Tcp, t(0));
        let mut input = bin(&with(f, 11, Flags::ACK_REQ));
        input.extend(bin(&Frame::new(FrameType::Ping)));
        let ev = events(&mut c, &cfg, t(0), &mut input);
        assert_eq!(ev, vec![Event::Closed(CloseReason::Unauthorized)]);
        let out = bin_frames(drain(&mut c, &cfg, t(0)));
        assert_eq!(out.len(), 1);
        assert_eq!(err_of(&out[0]), (11, ErrorCode::Unauthorized));
    }
    let mut c = Connection::new(&cfg, Transport::Tcp, t(0));
    let h = expect_hello(events(
        &mut c,
        &cfg,
        t(0),
        &mut bin(&hello(
            "ctl-8266-0042",
            &format!(r#"{{"token":"{}"}}"#, good.to_uppercase()),
        )),
    ));
    assert_eq!(&h.addr[..], b"ctl-8266-0042");
    // Mode "none" ignores tokens.
    let open = ConnConfig::default();
    let mut c = Connection::new(&open, Transport::Tcp, t(0));
    expect_hello(events(
        &mut c,
        &open,
        t(0),
        &mut bin(&hello("a", r#"{"token":"x"}"#)),
    ));
}

#[test]
fn hmac_mode_admits_the_service_token_for_any_address() {
    let cfg = ConnConfig {
        auth_secret: Some(b"s3cret".to_vec()),
        service_token: Some(b"api-tok-1".to_vec()),
        ..ConnConfig::default()
    };
    for addr in ["svc-1", "ctl-8266-0042", ""] {
        let mut c = Connection::new(&cfg, Transport::Tcp, t(0));
        let h = expect_hello(events(
            &mut c,
            &cfg,
            t(0),
            &mut bin(&hello(addr, r#"{"token":"api-tok-1"}"#)),
        ));
        assert_eq!(&h.addr[..], addr.as_bytes());
    }
    // A near miss, or the service token where none is configured, is refused.
    let no_service = ConnConfig {
        service_token: None,
        ..cfg.clone()
    };
    for (cfg, tok) in [
        (&cfg, "api-tok-2"),
        (&cfg, "api-tok-1 "),
        (&no_service, "api-tok-1"),
    ] {
        let mut c = Connection::new(cfg, Transport::Tcp, t(0));
        let payload = format!(r#"{{"token":"{tok}"}}"#);
        let ev = events(&mut c, cfg, t(0), &mut bin(&hello("svc-1", &payload)));
        assert_eq!(
            ev,
            vec![Event::Closed(CloseReason::Unauthorized)],
            "{tok:?}"
        );
    }
}

#[test]
fn bad_addresses_get_bad_address_and_the_connection_goes_on() {
    let cfg = ConnConfig::default();
    let mut c = Connection::new(&cfg, Transport::Tcp, t(0));
    assert_eq!(
        events(&mut c, &cfg, t(0), &mut bin(&with(hello("a b", ""), 1, 0))),
        vec![]
    );
    let out = bin_frames(drain(&mut c, &cfg, t(0)));
    assert_eq!(err_of(&out[0]), (1, ErrorCode::BadAddress));
    let h = expect_hello(events(&mut c, &cfg, t(0), &mut bin(&hello("ctl-1", ""))));
    c.accept(&cfg, t(0), &h, h.addr.clone(), "n1");
    drain(&mut c, &cfg, t(0));
    let mut input = BytesMut::new();
    input.extend(bin(&with(Frame::data("", "x/y", "p"), 2, 0)));
    input.extend(bin(&with(Frame::data("", "", "p"), 3, 0)));
    for (i, k) in [FrameType::Join, FrameType::Leave, FrameType::Publish]
        .into_iter()
        .enumerate()
    {
        let f = Frame {
            dst: Bytes::from_static(b"room 1"),
            ..Frame::new(k)
        };
        input.extend(bin(&with(f, 4 + i as u32, 0)));
    }
    assert_eq!(events(&mut c, &cfg, t(1), &mut input), vec![]);
    let out: Vec<_> = bin_frames(drain(&mut c, &cfg, t(1)))
        .iter()
        .map(err_of)
        .collect();
    assert_eq!(
        out,
        (2..=6)
            .map(|s| (s, ErrorCode::BadAddress))
            .collect::<Vec<_>>()
    );
    assert!(c.is_open());
    // JSON names over 64 bytes are bad addresses too.
    let mut j = open_json(&cfg);
    let line = format!(
        "{{\"type\":\"data\",\"seq\":9,\"dst\":\"{}\"}}\n",
        "a".repeat(65)
    );
    assert_eq!(
        events(&mut j, &cfg, t(1), &mut BytesMut::from(line.as_bytes())),
        vec![]
    );
    let out = json_lines(&drain(&mut j, &cfg, t(1)));
    assert_eq!(
        (&out[0]["code"], &out[0]["seq"]),
        (&json!("bad_address"), &json!(9))
    );
}

#[test]
fn client_frames_become_events_with_the_server_setting_src_and_flags() {
    let cfg = ConnConfig::default();
    let mut c = open_bin(&cfg, "ctl-1");
    let mut input = BytesMut::new();
    let f = Frame {
        flags: Flags(0xff),
        ..with(Frame::data("spoofed", "web-1", "on"), 9, 0)
    };
    input.extend(bin(&f));
    let mut p = with(
        Frame::data("x", "room-1", "\"hi\""),
        10,
        Flags::GROUP | Flags::JSON,
    );
    p.kind = FrameType::Publish;
    input.extend(bin(&p));
    let j = with(
        Frame {
            dst: Bytes::from_static(b"room-1"),
            ..Frame::new(FrameType::Join)
        },
        11,
        Flags::ACK_REQ,
    );
    input.extend(bin(&j));
    let mut l = j.clone();
    l.kind = FrameType::Leave;
    l.seq = 12;
    l.flags = Flags(0);
    input.extend(bin(&l));
    let ev = events(&mut c, &cfg, t(1), &mut input);
    assert_eq!(ev.len(), 4);
    let Event::Data(d) = &ev[0] else {
        panic!("{ev:?}")
    };
    // The client's src is replaced; GROUP and reserved bits are cleared;
    // ACK_REQ and JSON are kept for the router.
    assert_eq!(&d.src[..], b"ctl-1");
    assert_eq!(d.flags, Flags(Flags::ACK_REQ | Flags::JSON));
    assert_eq!(
        (d.seq, &d.dst[..], &d.payload[..]),
        (9, &b"web-1"[..], &b"on"[..])
    );
    let Event::Publish(p) = &ev[1] else {
        panic!("{ev:?}")
    };
    assert_eq!(
        (&p.src[..], &p.dst[..], p.flags),
        (&b"ctl-1"[..], &b"room-1"[..], Flags(Flags::JSON))
    );
    assert_eq!(
        ev[2],
        Event::Join {
            group: Bytes::from_static(b"room-1"),
            seq: 11,
            ack_req: true
        }
    );
    assert_eq!(
        ev[3],
        Event::Leave {
            group: Bytes::from_static(b"room-1"),
            seq: 12,
            ack_req: false
        }
    );
}

#[test]
fn sent_frames_have_ack_req_and_reserved_bits_cleared() {
    let cfg = ConnConfig::default();
    let mut c = open_bin(&cfg, "web-1");
    let mut f = Frame::data("ctl-1", "web-1", "x");
    f.flags = Flags(0xff);
    f.seq = 4;
    c.send(&cfg, t(1), &f).unwrap();
    c.send(
        &cfg,
        t(1),
        &Frame {
            flags: Flags(0xf8),
            ..Frame::new(FrameType::Ping)
        },
    )
    .unwrap();
    let mut raw = drain(&mut c, &cfg, t(1));
    // flags byte of the DATA body: JSON | GROUP only.
    assert_eq!(raw[4 + 2], Flags::JSON | Flags::GROUP);
    let out = bin_frames(raw.split());
    assert_eq!(out[0].flags, Flags(Flags::JSON | Flags::GROUP));
    assert_eq!(out[1].flags, Flags(0));
}

#[test]
fn the_writer_form_follows_the_first_byte_on_tcp() {
    let cfg = ConnConfig::default();
    let b = open_bin(&cfg, "ctl-1");
    assert_eq!(b.wire(), Some(Wire::Binary));
    let mut j = open_json(&cfg);
    assert_eq!(j.wire(), Some(Wire::Json));
    j.send(&cfg, t(1), &Frame::data("ctl-1", "web-1", &[0xffu8, 0][..]))
        .unwrap();
    let out = json_lines(&drain(&mut j, &cfg, t(1)));
    assert_eq!(
        out,
        vec![json!({"type":"data","src":"ctl-1","dst":"web-1","payload_b64":"/wA="})]
    );
    // A pretty-printed JSON payload from a binary sender stays on one line.
    let mut pretty = Frame::data("ctl-1", "web-1", "{\n  \"t\": 1\n}\n");
    pretty.flags = Flags(Flags::JSON);
    j.send(&cfg, t(1), &pretty).unwrap();
    let out = json_lines(&drain(&mut j, &cfg, t(1)));
    assert_eq!(
        out,
        vec![json!({"type":"data","src":"ctl-1","dst":"web-1","payload":{"t":1}})]
    );
}

#[test]
fn websocket_messages_text_is_json_binary_is_one_body() {
    let cfg = ConnConfig::default();
    // Text hello: replies are text frames holding JSON.
    let mut w = Connection::new(&cfg, Transport::WebSocket, t(0));
    let ev = w.handle_message(
        &cfg,
        t(0),
        true,
        Bytes::from_static(br#"{"type":"hello","addr":"web-1","seq":1,"ack":true}"#),
    );
    let Some(Event::Hello(h)) = ev else {
        panic!("{ev:?}")
    };
    w.accept(&cfg, t(0), &h, h.addr.clone(), "n1");
    assert_eq!(w.wire(), Some(Wire::Json));
    let ev = w.handle_message(
        &cfg,
        t(1),
        true,
        Bytes::from_static(br#"{"type":"data","dst":"ctl-1","payload":[1, 2]}"#),
    );
    let Some(Event::Data(d)) = ev else {
        panic!("{ev:?}")
    };
    assert_eq!((&d.src[..], &d.payload[..]), (&b"web-1"[..], &b"[1,2]"[..]));
    let frames = ws_frames(&drain(&mut w, &cfg, t(1)));
    assert_eq!(frames.len(), 2);
    assert!(frames.iter().all(|(op, _)| *op == 1));
    let welcome: Value = serde_json::from_slice(&frames[0].1).unwrap();
    assert_eq!(welcome["type"], "welcome");
    assert_eq!(
        serde_json::from_slice::<Value>(&frames[1].1).unwrap(),
        json!({"type":"ack","seq":1})
    );
    // A bad text message gets an ERROR and the socket goes on.
    assert_eq!(
        w.handle_message(&cfg, t(2), true, Bytes::from_static(b"{nope")),
        None
    );
    assert!(w.is_open());
    // A binary message in a JSON session is still understood.
    let ev = w.handle_message(
        &cfg,
        t(3),
        false,
        crate::codec::body_bytes(&Frame::data("", "ctl-2", "b")),
    );
    assert!(matches!(ev, Some(Event::Data(_))));
    let frames = ws_frames(&drain(&mut w, &cfg, t(3)));
    assert_eq!(frames.len(), 1);
    assert_eq!(
        serde_json::from_slice::<Value>(&frames[0].1).unwrap()["code"],
        "bad_frame"
    );

    // Binary hello: replies are binary frames holding one body each.
    let mut b = Connection::new(&cfg, Transport::WebSocket, t(0));
    let ev = b.handle_message(
        &cfg,
        t(0),
        false,
        crate::codec::body_bytes(&hello("ctl-1", "")),
    );
    let Some(Event::Hello(h)) = ev else {
        panic!("{ev:?}")
    };
    b.accept(&cfg, t(0), &h, h.addr.clone(), "n1");
    let big = Frame::data("web-1", "ctl-1", vec![7u8; 300]);
    b.send(&cfg, t(1), &big).unwrap();
    let frames = ws_frames(&drain(&mut b, &cfg, t(1)));
    assert!(frames.iter().all(|(op, _)| *op == 2));
    let bodies: Vec<Frame> = frames
        .into_iter()
        .map(|(_, body)| crate::codec::parse_body(body.into()).unwrap())
        .collect();
    assert_eq!(bodies[0].kind, FrameType::Welcome);
    assert_eq!(bodies[1], big);
    // A broken binary body closes; an oversized one too.
    let ev = b.handle_message(
        &cfg,
        t(2),
        false,
        Bytes::from_static(&[1, 3, 0, 0, 0, 0, 5, 9, 0]),
    );
    assert_eq!(ev, Some(Event::Closed(CloseReason::ProtocolError)));
    let frames = ws_frames(&drain(&mut b, &cfg, t(2)));
    let e = crate::codec::parse_body(frames[0].1.clone().into()).unwrap();
    assert_eq!(err_of(&e), (5, ErrorCode::BadFrame));
    let mut b2 = Connection::new(&cfg, Transport::WebSocket, t(0));
    let ev = b2.handle_message(&cfg, t(0), false, Bytes::from(vec![0u8; cfg.max_frame + 1]));
    assert_eq!(ev, Some(Event::Closed(CloseReason::ProtocolError)));
    let frames = ws_frames(&drain(&mut b2, &cfg, t(0)));
    assert_eq!(
        err_of(&crate::codec::parse_body(frames[0].1.clone().into()).unwrap()).1,
        ErrorCode::TooLarge
    );
    // An oversized text message is refused and the socket goes on.
    let mut w2 = Connection::new(&cfg, Transport::WebSocket, t(0));
    let ev = w2.handle_message(
        &cfg,
        t(0),
        true,
        Bytes::from(vec![b' '; cfg.max_line() + 1]),
    );
    assert_eq!(ev, None);
    assert!(!w2.is_closing());
    let frames = ws_frames(&drain(&mut w2, &cfg, t(0)));
    assert_eq!(
        serde_json::from_slice::<Value>(&frames[0].1).unwrap()["code"],
        "too_large"
    );
}

#[test]
fn websocket_replies_before_hello_follow_the_message_form() {
    let cfg = ConnConfig::default();
    let mut w = Connection::new(&cfg, Transport::WebSocket, t(0));
    w.handle_message(
        &cfg,
        t(0),
        false,
        crate::codec::body_bytes(&Frame::new(FrameType::Ping)),
    );
    assert_eq!(ws_frames(&drain(&mut w, &cfg, t(0)))[0].0, 2);
    let ev = w.handle_message(&cfg, t(0), true, Bytes::from_static(br#"{"type":"hello"}"#));
    let Some(Event::Hello(h)) = ev else { panic!() };
    w.accept(&cfg, t(0), &h, Bytes::from_static(b"web-9"), "n1");
    // After a text hello everything is text, even replies to binary.
    w.handle_message(
        &cfg,
        t(0),
        false,
        crate::codec::body_bytes(&Frame::new(FrameType::Ping)),
    );
    let frames = ws_frames(&drain(&mut w, &cfg, t(0)));
    assert!(frames.iter().all(|(op, _)| *op == 1), "{frames:?}");
}

#[test]
fn json_text_frames_of_every_header_size() {
    let cfg = ConnConfig {
        max_frame: 1 << 20,
        queue_bytes: 1 << 22,
        ..ConnConfig::default()
    };
    let mut w = Connection::new(&cfg, Transport::WebSocket, t(0));
    assert!(w.handle_url_hello(&cfg, t(0), "addr=web-1").is_some());
    let h = Hello {
        addr: Bytes::from_static(b"web-1"),
        role: Role::Browser,
        heartbeat_s: 30,
        meta: Bytes::from_static(b"{}"),
        seq: 0,
        ack_req: false,
        privileged: false,
        auth: crate::acl::Auth::None,
    };
    w.accept(&cfg, t(0), &h, h.addr.clone(), "n1");
    drain(&mut w, &cfg, t(0));
    for n in [10usize, 200, 70_000] {
        let mut f = Frame::data("ctl-1", "web-1", format!("\"{}\"", "z".repeat(n)));
        f.flags = Flags(Flags::JSON);
        w.send(&cfg, t(1), &f).unwrap();
        let frames = ws_frames(&drain(&mut w, &cfg, t(1)));
        assert_eq!(frames.len(), 1);
        let v: Value = serde_json::from_slice(&frames[0].1).unwrap();
        assert_eq!(v["payload"].as_str().unwrap().len(), n);
    }
}

#[test]
fn hello_in_the_websocket_url() {
    let cfg = ConnConfig {
        auth_secret: Some(b"k".to_vec()),
        ..ConnConfig::default()
    };
    let tok = auth::token_for(b"k", b"web-7f3a");
    let mut w = Connection::new(&cfg, Transport::WebSocket, t(0));
    let ev = w.handle_url_hello(
        &cfg,
        t(0),
        &format!("/ws?addr=web-7f3a&role=tool&token={tok}&heartbeat_s=10&x=1"),
    );
    let Some(Event::Hello(h)) = ev else {
        panic!("{ev:?}")
    };
    assert_eq!(
        (&h.addr[..], h.role, h.heartbeat_s),
        (&b"web-7f3a"[..], Role::Tool, 10)
    );
    w.accept(&cfg, t(0), &h, h.addr.clone(), "n1");
    // WELCOME at once, as JSON text.
    let frames = ws_frames(&drain(&mut w, &cfg, t(0)));
    assert_eq!(frames[0].0, 1);
    let v: Value = serde_json::from_slice(&frames[0].1).unwrap();
    assert_eq!(
        (&v["type"], &v["addr"]),
        (&json!("welcome"), &json!("web-7f3a"))
    );
    // Percent-escapes are decoded; a wrong token closes.
    let mut w = Connection::new(&cfg, Transport::WebSocket, t(0));
    let ev = w.handle_url_hello(&cfg, t(0), "addr=web%2D7f3a&token=00");
    assert_eq!(ev, Some(Event::Closed(CloseReason::Unauthorized)));
    let frames = ws_frames(&drain(&mut w, &cfg, t(0)));
    assert_eq!(
        serde_json::from_slice::<Value>(&frames[0].1).unwrap()["code"],
        "unauthorized"
    );
    // No hello keys: nothing happens, the client will hello by message.
    let mut w = Connection::new(&cfg, Transport::WebSocket, t(0));
    assert_eq!(w.handle_url_hello(&cfg, t(0), "/ws"), None);
    assert_eq!(w.wire(), None);
    assert_eq!(percent_decode("a%2fb+c%zz%4"), "a/b c%zz%4");
}

#[test]
fn rate_limit_with_ack_req_gets_an_error_per_frame() {
    let cfg = ConnConfig {
        frames_per_sec: 10,
        burst: 3,
        ..ConnConfig::default()
    };
    let mut c = open_bin(&cfg, "ctl-1");
    let mut input = BytesMut::new();
    for seq in 1..=5 {
        input.extend(bin(&with(
            Frame::data("", "web-1", "x"),
            seq,
            Flags::ACK_REQ,
        )));
    }
    let ev = events(&mut c, &cfg, t(1000), &mut input);
    assert_eq!(ev.len(), 3);
    let out: Vec<_> = bin_frames(drain(&mut c, &cfg, t(1000)))
        .iter()
        .map(err_of)
        .collect();
    assert_eq!(
        out,
        vec![(4, ErrorCode::RateLimited), (5, ErrorCode::RateLimited)]
    );
    // 100 ms later one token is back (10 per second), not two.
    let mut input = BytesMut::new();
    for seq in 6..=7 {
        input.extend(bin(&with(
            Frame::data("", "web-1", "x"),
            seq,
            Flags::ACK_REQ,
        )));
    }
    assert_eq!(events(&mut c, &cfg, t(1100), &mut input).len(), 1);
    let out: Vec<_> = bin_frames(drain(&mut c, &cfg, t(1100)))
        .iter()
        .map(err_of)
        .collect();
    assert_eq!(out, vec![(7, ErrorCode::RateLimited)]);
    // A long pause refills up to the burst only.
    let mut input = BytesMut::new();
    for _ in 0..5 {
        input.extend(bin(&Frame::data("", "web-1", "x")));
    }
    assert_eq!(events(&mut c, &cfg, t(60_000), &mut input).len(), 3);
}

#[test]
fn rate_limit_without_ack_req_drops_with_one_note_a_second() {
    let cfg = ConnConfig {
        frames_per_sec: 1,
        burst: 1,
        ..ConnConfig::default()
    };
    let mut c = open_bin(&cfg, "ctl-1");
    let mut input = BytesMut::new();
    for _ in 0..6 {
        input.extend(bin(&Frame::data("", "web-1", "x")));
    }
    let ev = events(&mut c, &cfg, t(10), &mut input);
    assert_eq!(ev.len(), 1);
    let out = bin_frames(drain(&mut c, &cfg, t(10)));
    assert_eq!(out.len(), 1, "one note for five dropped frames");
    assert_eq!(err_of(&out[0]), (0, ErrorCode::RateLimited));
    // Within the same second: dropped silently.
    events(
        &mut c,
        &cfg,
        t(500),
        &mut bin(&Frame::data("", "web-1", "x")),
    );
    assert!(drain(&mut c, &cfg, t(500)).is_empty());
    // A second later a token is back.
    assert_eq!(
        events(
            &mut c,
            &cfg,
            t(1010),
            &mut bin(&Frame::data("", "web-1", "x"))
        )
        .len(),
        1
    );
    // Disabled limit: everything passes.
    let off = ConnConfig {
        frames_per_sec: 0,
        burst: 0,
        ..ConnConfig::default()
    };
    let mut c = open_bin(&off, "ctl-1");
    let mut input = BytesMut::new();
    for _ in 0..100 {
        input.extend(bin(&Frame::data("", "web-1", "x")));
    }
    assert_eq!(events(&mut c, &off, t(1), &mut input).len(), 100);
}

#[test]
fn the_queue_is_bounded_replies_are_never_dropped_and_a_full_queue_pauses_input() {
    let cfg = ConnConfig {
        queue_bytes: 1000,
        ..ConnConfig::default()
    };
    let mut c = open_bin(&cfg, "web-1");
    let f = Frame::data("ctl-1", "web-1", vec![1u8; 100]);
    let per = 4 + f.body_len();
    let mut sent = 0;
    while c.send(&cfg, t(1), &f).is_ok() {
        sent += 1;
        assert!(sent < 100);
    }
    assert_eq!(sent, 1000 / per);
    assert!(c.queued_bytes() <= 1000);
    assert_eq!(c.send(&cfg, t(2), &f), Err(SendError::Full));
    // Not full yet: input goes on, unless answers still owed fill it.
    assert!(!c.should_pause(&cfg, t(2), 0));
    assert!(c.should_pause(&cfg, t(2), 1000 - c.queued_bytes()));
    // Replies the relay owes are queued whatever the queue holds...
    let before = c.queued_bytes();
    for i in 0..100 {
        c.control(&cfg, &Frame::error(i, ErrorCode::NoRoute, "x"));
    }
    let out = bin_frames(drain(&mut c, &cfg, t(3)));
    assert_eq!(out.len(), sent + 100, "every reply is there");
    assert!(before < 1000);
    // ...and a queue at the bound tells the runtime to stop reading,
    // which starts the slow-consumer clock.
    for i in 0..100 {
        c.control(&cfg, &Frame::ack(i));
    }
    assert!(c.should_pause(&cfg, t(10), 0));
    assert_eq!(
        c.poll_timeout(&cfg),
        Some(10 + cfg.slow_consumer_timeout_ms)
    );
}

#[test]
fn every_dropped_input_frame_is_counted_by_reason() {
    let cfg = ConnConfig {
        frames_per_sec: 1,
        burst: 1,
        max_frame: 64,
        ..ConnConfig::default()
    };
    let mut c = Connection::new(&cfg, Transport::Tcp, t(0));
    let mut input = BytesMut::new();
    // hello_required, then a hello with a malformed payload (bad_frame)
    // and one with a bad address.
    input.extend(bin(&Frame::data("", "x", "a")));
    input.extend(bin(&hello("web-1", "[1]")));
    input.extend(bin(&hello("bad addr", "")));
    let got = events(&mut c, &cfg, t(0), &mut input);
    assert!(got.is_empty());
    let d = c.take_drops().unwrap();
    assert_eq!(d[DropReason::HelloRequired as usize], 1);
    assert_eq!(d[DropReason::BadFrame as usize], 1);
    assert_eq!(d[DropReason::BadAddress as usize], 1);
    assert_eq!(c.take_drops(), None, "the counts restart");
    let mut c = open_bin(&cfg, "web-1");
    let mut input = BytesMut::new();
    input.extend(bin(&Frame::data("", "ctl-1", "a"))); // the one token
    input.extend(bin(&Frame::data("", "ctl-1", "b"))); // rate_limited
    input.extend(bin(&Frame::data("", "ctl-1", "c"))); // rate_limited
    events(&mut c, &cfg, t(0), &mut input);
    let d = c.take_drops().unwrap();
    assert_eq!(d[DropReason::RateLimited as usize], 2);
    // A frame over max_frame closes the stream: too_large.
    let mut input = BytesMut::from(&[0u8, 0, 1, 0][..]);
    events(&mut c, &cfg, t(5000), &mut input);
    assert_eq!(c.take_drops().unwrap()[DropReason::TooLarge as usize], 1);
}

#[test]
fn json_that_is_not_utf8_is_bad_frame_even_in_an_ignored_field() {
    let cfg = ConnConfig::default();
    let mut c = open_json(&cfg);
    let mut input = BytesMut::from(&b"{\"type\":\"ping\",\"seq\":7,\"x\":\"\xff\xfe\"}\n"[..]);
    assert!(events(&mut c, &cfg, t(1), &mut input).is_empty());
    let out = json_lines(&drain(&mut c, &cfg, t(1)));
    assert_eq!(out.len(), 1, "{out:?}");
    assert_eq!(out[0]["type"], "error");
    assert_eq!(out[0]["code"], "bad_frame");
    assert_eq!(out[0]["seq"], 7);
    assert_eq!(c.take_drops().unwrap()[DropReason::BadFrame as usize], 1);
}

#[test]
fn the_service_role_comes_from_the_token_not_the_hello() {
    let cfg = ConnConfig {
        auth_secret: Some(b"s3cret".to_vec()),
        service_token: Some(b"api-token".to_vec()),
        ..ConnConfig::default()
    };
    let device = crate::auth::token_for(b"s3cret", b"dev-4");
    // A device token with role service: forbidden, the hello may be retried.
    let mut c = Connection::new(&cfg, Transport::Tcp, t(0));
    let p = json!({"token": device, "role": "service"}).to_string();
    let mut input = bin(&with(hello("dev-4", &p), 3, 0));
    assert!(events(&mut c, &cfg, t(0), &mut input).is_empty());
    let out = bin_frames(drain(&mut c, &cfg, t(0)));
    assert_eq!(err_of(&out[0]), (3, ErrorCode::Forbidden));
    assert!(!c.is_closing());
    // The same device without the role: admitted, not privileged.
    let p = json!({"token": device}).to_string();
    let mut input = bin(&hello("dev-4", &p));
    let h = expect_hello(events(&mut c, &cfg, t(0), &mut input));
    assert!(!h.privileged);
    assert_eq!(h.role, Role::Controller);
    // The service token grants the role and the privilege.
    let mut c = Connection::new(&cfg, Transport::Tcp, t(0));
    let p = json!({"token": "api-token", "role": "service"}).to_string();
    let mut input = bin(&hello("svc-1", &p));
    let h = expect_hello(events(&mut c, &cfg, t(0), &mut input));
    assert!(h.privileged);
    assert_eq!(h.role, Role::Service);
    // Without any auth every hello is trusted; with only an API token
    // set, the role still needs that token.
    let open = ConnConfig::default();
    let mut c = Connection::new(&open, Transport::Tcp, t(0));
    let mut input = bin(&hello("svc-2", r#"{"role":"service"}"#));
    assert!(expect_hello(events(&mut c, &open, t(0), &mut input)).privileged);
    let api_only = ConnConfig {
        service_token: Some(b"api-token".to_vec()),
        ..ConnConfig::default()
    };
    let mut c = Connection::new(&api_only, Transport::Tcp, t(0));
    let mut input = bin(&hello("svc-3", r#"{"role":"service"}"#));
    assert!(events(&mut c, &api_only, t(0), &mut input).is_empty());
}

#[test]
fn a_queue_that_stays_full_closes_as_slow_consumer() {
    let cfg = ConnConfig {
        queue_bytes: 500,
        slow_consumer_timeout_ms: 3_000,
        ..ConnConfig::default()
    };
    let mut c = open_bin(&cfg, "web-1");
    let f = Frame::data("ctl-1", "web-1", vec![1u8; 200]);
    c.send(&cfg, t(1_000), &f).unwrap();
    c.send(&cfg, t(1_000), &f).unwrap();
    assert_eq!(c.send(&cfg, t(1_000), &f), Err(SendError::Full));
    assert_eq!(c.poll_timeout(&cfg), Some(4_000));
    // The writer takes a chunk but the socket never confirms it.
    let chunk = c.poll_transmit(100).unwrap();
    assert_eq!(chunk.len(), 100);
    assert_eq!(c.send(&cfg, t(2_000), &f), Err(SendError::Full));
    assert_eq!(c.handle_timeout(&cfg, t(3_999)), None);
    assert_eq!(
        c.handle_timeout(&cfg, t(4_000)),
        Some(Event::Closed(CloseReason::SlowConsumer))
    );
    assert!(c.is_closing());
    // The ERROR is queued behind the rest for a last flush.
    let mut rest = BytesMut::from(&chunk[..]);
    rest.extend(drain(&mut c, &cfg, t(4_000)));
    let out = bin_frames(rest);
    assert_eq!(err_of(out.last().unwrap()), (0, ErrorCode::SlowConsumer));
}

#[test]
fn progress_on_the_socket_clears_the_slow_consumer_clock() {
    let cfg = ConnConfig {
        queue_bytes: 500,
        slow_consumer_timeout_ms: 3_000,
        ..ConnConfig::default()
    };
    let mut c = open_bin(&cfg, "web-1");
    let f = Frame::data("ctl-1", "web-1", vec![1u8; 200]);
    c.send(&cfg, t(0), &f).unwrap();
    c.send(&cfg, t(0), &f).unwrap();
    assert_eq!(c.send(&cfg, t(0), &f), Err(SendError::Full));
    let chunk = c.poll_transmit(usize::MAX).unwrap();
    c.on_transmitted(&cfg, t(2_000), chunk.len());
    assert_eq!(c.queued_bytes(), 0);
    assert_eq!(c.poll_timeout(&cfg), Some(90_000));
    assert_eq!(c.handle_timeout(&cfg, t(3_000)), None);
    assert!(c.send(&cfg, t(2_001), &f).is_ok());
}

#[test]
fn a_frame_bigger_than_the_queue_fits_an_empty_queue_only() {
    let cfg = ConnConfig {
        queue_bytes: 100,
        ..ConnConfig::default()
    };
    let mut c = open_bin(&cfg, "web-1");
    let big = Frame::data("ctl-1", "web-1", vec![0u8; 300]);
    assert!(c.send(&cfg, t(0), &big).is_ok());
    assert_eq!(
        c.send(&cfg, t(0), &Frame::data("a", "web-1", "x")),
        Err(SendError::Full)
    );
    let mut small = Connection::new(&cfg, Transport::Tcp, t(0));
    assert_eq!(
        small.send(&cfg, t(0), &big),
        Err(SendError::Closed),
        "no send before hello"
    );
    let mut c2 = open_bin(&cfg, "web-2");
    c2.send(&cfg, t(0), &Frame::data("a", "web-2", "x"))
        .unwrap();
    assert_eq!(c2.send(&cfg, t(0), &big), Err(SendError::Full));
    // The refused frame left nothing behind.
    let out = bin_frames(drain(&mut c2, &cfg, t(0)));
    assert_eq!(out.len(), 1);
}

#[test]
fn poll_transmit_chunks_and_gives_the_buffer_back() {
    let cfg = ConnConfig::default();
    let mut c = open_bin(&cfg, "web-1");
    assert_eq!(c.poll_transmit(10), None);
    let frames: Vec<Frame> = (0..5u8)
        .map(|i| Frame::data("ctl-1", "web-1", vec![i; 37]))
        .collect();
    let mut expected = BytesMut::new();
    for f in &frames {
        c.send(&cfg, t(1), f).unwrap();
        encode(f, &mut expected);
    }
    assert_eq!(c.queued_bytes(), expected.len());
    let mut got = BytesMut::new();
    let mut chunks = 0;
    while let Some(chunk) = c.poll_transmit(16) {
        assert!(chunk.len() <= 16 && !chunk.is_empty());
        got.extend_from_slice(&chunk);
        chunks += 1;
        // In flight until confirmed.
        assert_eq!(c.queued_bytes(), expected.len() - got.len() + chunk.len());
        c.on_transmitted(&cfg, t(1), chunk.len());
        assert!(chunks < 1000);
    }
    assert_eq!(got, expected);
    assert_eq!(chunks, expected.len().div_ceil(16));
    assert_eq!(c.queued_bytes(), 0);
    assert!(c.out.is_none(), "a drained queue holds no buffer");
    // max 0 still makes progress.
    c.send(&cfg, t(1), &frames[0]).unwrap();
    assert_eq!(c.poll_transmit(0).map(|b| b.len()), Some(1));
}

#[test]
fn close_with_sends_the_error_once() {
    let cfg = ConnConfig::default();
    let mut c = open_bin(&cfg, "ctl-1");
    assert_eq!(
        c.close_with(
            &cfg,
            ErrorCode::Replaced,
            "replaced by a new connection",
            CloseReason::Replaced
        ),
        Some(Event::Closed(CloseReason::Replaced))
    );
    assert_eq!(
        c.close_with(&cfg, ErrorCode::Replaced, "again", CloseReason::Replaced),
        None
    );
    let out = bin_frames(drain(&mut c, &cfg, t(0)));
    assert_eq!(out.len(), 1);
    assert_eq!(err_of(&out[0]), (0, ErrorCode::Replaced));
    assert_eq!(
        out[0].error_parts().unwrap().1,
        "replaced by a new connection"
    );
}

#[test]
fn any_chunking_of_the_input_gives_the_same_events() {
    let cfg = ConnConfig::default();
    let mut stream = bin(&hello("ctl-1", r#"{"heartbeat_s":10}"#));
    for i in 0..20u32 {
        stream.extend(bin(&with(
            Frame::data("", "web-1", vec![i as u8; i as usize * 7]),
            i,
            0,
        )));
    }
    let run = |chunk: usize| {
        let mut c = Connection::new(&cfg, Transport::Tcp, t(0));
        let mut input = BytesMut::new();
        let mut evs = Vec::new();
        for piece in stream.chunks(chunk) {
            input.extend_from_slice(piece);
            evs.extend(pump(&mut c, &cfg, t(0), &mut input));
        }
        evs
    };
    let whole = run(stream.len());
    assert_eq!(whole.len(), 21);
    for chunk in [1, 2, 3, 7, 64] {
        assert_eq!(run(chunk), whole, "chunk {chunk}");
    }
}

#[test]
fn url_query_values_decode_escapes_and_plus_signs_once() {
    // An escaped plus stays a plus; a stray `%` stays; bad UTF-8 is replaced.
    assert_eq!(
        percent_decode("%2B+%%41%C3%A9%FF%4"),
        "+ %A\u{e9}\u{fffd}%4"
    );
    assert_eq!(percent_decode(""), "");
}

#[test]
fn closing_keeps_its_first_reason_and_its_deadline_only_moves_earlier() {
    let cfg = ConnConfig::default();
    let mut c = Connection::new(&cfg, Transport::Tcp, t(0));
    assert_eq!(c.close_reason(), None);
    assert_eq!(c.close_deadline(), None);
    // The connection decides to close; the runtime then gives it a grace.
    assert_eq!(
        c.close(CloseReason::IdleTimeout),
        Event::Closed(CloseReason::IdleTimeout)
    );
    assert!(c.is_closing());
    assert_eq!(c.close_deadline(), Some(u64::MAX));
    c.closing(CloseReason::IdleTimeout, 5_000);
    assert_eq!(c.close_deadline(), Some(5_000));
    // A later cause (shutdown, the peer going away) neither renames the
    // close nor grants more time; an earlier deadline is taken.
    c.closing(CloseReason::Shutdown, 9_000);
    assert_eq!(c.close_reason(), Some(CloseReason::IdleTimeout));
    assert_eq!(c.close_deadline(), Some(5_000));
    c.closing(CloseReason::PeerClosed, 1_000);
    assert_eq!(c.close_reason(), Some(CloseReason::IdleTimeout));
    assert_eq!(c.close_deadline(), Some(1_000));
    assert_eq!(
        c.poll_timeout(&cfg),
        None,
        "a closing connection has no timers"
    );
}

#[test]
fn a_certified_address_needs_no_token_and_admits_no_other() {
    let cfg = ConnConfig {
        auth_secret: Some(b"s3cret".to_vec()),
        ..ConnConfig::default()
    };
    let certified = |c: &mut Connection| c.set_certified(Bytes::from_static(b"dev-7"));
    // Its own address, or none, without a token.
    for src in ["dev-7", ""] {
        let mut c = Connection::new(&cfg, Transport::Tcp, t(0));
        certified(&mut c);
        let h = expect_hello(events(&mut c, &cfg, t(0), &mut bin(&hello(src, ""))));
        assert_eq!(&h.addr[..], b"dev-7");
        assert!(!h.privileged);
    }
    // Another address, even with that address's valid token.
    let token = auth::token_for(b"s3cret", b"dev-8");
    let mut c = Connection::new(&cfg, Transport::Tcp, t(0));
    certified(&mut c);
    let mut input = bin(&with(
        hello("dev-8", &format!(r#"{{"token":"{token}"}}"#)),
        4,
        Flags::ACK_REQ,
    ));
    let ev = events(&mut c, &cfg, t(0), &mut input);
    assert_eq!(ev, vec![Event::Closed(CloseReason::Unauthorized)]);
    let out = bin_frames(drain(&mut c, &cfg, t(0)));
    assert_eq!(err_of(&out[0]), (4, ErrorCode::Unauthorized));
}

#[test]
fn a_hello_says_how_it_authenticated() {
    use crate::acl::Auth;
    let cfg = ConnConfig {
        auth_secret: Some(b"s3cret".to_vec()),
        service_token: Some(b"api-tok-1".to_vec()),
        ..ConnConfig::default()
    };
    let token = auth::token_for(b"s3cret", b"dev-9");
    let cases = [
        (
            "dev-9",
            format!(r#"{{"token":"{token}"}}"#),
            false,
            Auth::Token,
        ),
        (
            "svc-1",
            r#"{"token":"api-tok-1"}"#.to_owned(),
            false,
            Auth::ServiceToken,
        ),
        ("dev-7", String::new(), true, Auth::Certificate),
    ];
    for (src, payload, cert, want) in cases {
        let mut c = Connection::new(&cfg, Transport::Tcp, t(0));
        if cert {
            c.set_certified(Bytes::from_static(b"dev-7"));
        }
        let h = expect_hello(events(&mut c, &cfg, t(0), &mut bin(&hello(src, &payload))));
        assert_eq!(h.auth, want, "{src}");
        c.accept(&cfg, t(0), &h, h.addr.clone(), "n1");
        assert_eq!(c.auth(), want);
    }
    // No authentication configured: everyone is `none`.
    let open = ConnConfig::default();
    let mut c = Connection::new(&open, Transport::Tcp, t(0));
    let h = expect_hello(events(&mut c, &open, t(0), &mut bin(&hello("a", ""))));
    assert_eq!(h.auth, Auth::None);
}

/// An idle connection's protocol state is part of the relay's memory per
/// connection: the hello deadline lives in the state it belongs to, the
/// write queue is a pointer (allocated while something is queued), and the
/// slow-consumer clock, the rate-limit note, drop counts and a certificate's
/// address share one box that most connections never allocate.
#[test]
fn the_protocol_state_of_a_connection_stays_small() {
    assert!(
        std::mem::size_of::<Connection>() <= 112,
        "{}",
        std::mem::size_of::<Connection>()
    );
}

/// The rare parts come and go: a slow consumer's clock, dropped frames
/// and the rate-limit note allocate them, and they are freed once cleared.
#[test]
fn the_rare_parts_are_freed_once_cleared() {
    let cfg = ConnConfig {
        queue_bytes: 64,
        ..ConnConfig::default()
    };
    let mut c = Connection::new(&cfg, Transport::Tcp, t(0));
    assert!(c.rare.is_none());
    assert!(!c.should_pause(&cfg, t(0), 0));
    assert!(c.rare.is_none(), "a connection that is not full has none");
    c.send_raw(&[0; 64]);
    assert!(c.should_pause(&cfg, t(0), 0));
    // Not open: the slow-consumer clock does not start.
    assert!(c.rare.is_none());
    c.count_drop(DropReason::RateLimited);
    assert!(c.rare.is_some());
    let d = c.take_drops().unwrap();
    assert_eq!(d[DropReason::RateLimited as usize], 1);
    assert!(c.take_drops().is_none());
    assert!(c.rare.is_none(), "freed once the counts are taken");
    while let Some(chunk) = c.poll_transmit(1024) {
        c.on_transmitted(&cfg, t(0), chunk.len());
    }
    assert!(c.out.is_none());
}
