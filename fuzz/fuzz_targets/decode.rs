//! Fuzz target `decode`: arbitrary bytes into every decoder of relay-core.
//!
//! The first input byte picks a small `max_frame` and the WebSocket message
//! form; the rest goes, unchanged, to the binary `Decoder`, `parse_body`,
//! `json::parse_json`, and to `Connection::handle_input` (TCP, both the binary
//! and the JSON form) and `Connection::handle_message` (WebSocket). Nothing may
//! panic, every decoded frame must re-encode to bytes that decode to the same
//! frame, and every connection's queue must stay within its bound.

#![no_main]

use bytes::{Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;
use relay_core::codec::{self, Decoder};
use relay_core::conn::{CONTROL_SLACK, ConnConfig, Connection, Event, Now, Transport};
use relay_core::frame::Frame;
use relay_core::json;
use relay_core::name::is_name_byte;

fn now(ms: u64) -> Now {
    Now {
        mono_ms: ms,
        wall_ms: 1_763_800_000_000 + ms,
    }
}

/// Binary: encode → decode gives the frame back (reserved bits cleared).
fn binary_round_trip(f: &Frame) {
    let mut want = f.clone();
    want.flags = f.flags.defined();
    let mut buf = BytesMut::new();
    codec::encode(f, &mut buf);
    let back = Decoder::new(usize::MAX)
        .decode(&mut buf)
        .expect("re-encoded frame decodes")
        .expect("re-encoded frame is whole");
    assert_eq!(back, want);
    assert!(buf.is_empty());
}

/// JSON: write → parse is stable after one pass (the JSON form may drop what
/// it cannot say, such as a JSON flag on non-JSON bytes, but only once).
/// Only frames the relay could write are checked: names of the address
/// alphabet (the binary parser alone does not check names; the connection does).
fn json_round_trip(f: &Frame) {
    if !f.src.iter().chain(f.dst.iter()).all(|&b| is_name_byte(b)) {
        return;
    }
    let once = json::to_json_string(f);
    let Ok(g) = json::parse_json(once.as_bytes()) else {
        panic!("server-written JSON does not parse: {once}");
    };
    let twice = json::to_json_string(&g);
    let h = json::parse_json(twice.as_bytes()).expect("second pass parses");
    assert_eq!(g, h, "{once} / {twice}");
}

fn drive_tcp(cfg: &ConnConfig, data: &[u8]) {
    let mut c = Connection::new(cfg, Transport::Tcp, now(0));
    let mut input = BytesMut::new();
    let mut closes = 0;
    // Two reads, to cross a read boundary mid-frame.
    let (a, b) = data.split_at(data.len() / 2);
    for (i, part) in [a, b].into_iter().enumerate() {
        input.extend_from_slice(part);
        for _ in 0..=data.len() {
            // As the relay does: a client whose queue is full is not read.
            if c.should_pause(cfg, now(i as u64), 0) {
                break;
            }
            match c.handle_input(cfg, now(i as u64), &mut input) {
                Some(Event::Hello(h)) => c.accept(cfg, now(i as u64), &h, h.addr.clone(), "n1"),
                Some(Event::Data(f)) | Some(Event::Publish(f)) => {
                    binary_round_trip(&f);
                    json_round_trip(&f);
                }
                Some(Event::Closed(_)) => closes += 1,
                Some(_) => {}
                None => break,
            }
        }
        assert!(c.queued_bytes() <= cfg.queue_bytes + CONTROL_SLACK + cfg.max_line() + 64);
        while let Some(chunk) = c.poll_transmit(1500) {
            c.on_transmitted(cfg, now(i as u64), chunk.len());
        }
    }
    assert!(closes <= 1);
    let _ = c.handle_timeout(cfg, now(1_000_000));
}

fuzz_target!(|data: &[u8]| {
    let Some((&knob, rest)) = data.split_first() else {
        return;
    };
    let max_frame = 9 + (knob as usize & 0x7f) * 4;
    let text = knob & 0x80 != 0;

    // The binary decoder over the whole buffer.
    let d = Decoder::new(max_frame);
    let mut buf = BytesMut::from(rest);
    for _ in 0..=rest.len() {
        match d.decode(&mut buf) {
            Ok(Some(f)) => {
                assert!(f.body_len() <= max_frame);
                binary_round_trip(&f);
            }
            Ok(None) => break,
            Err(e) if e.recoverable() => {}
            Err(_) => break,
        }
    }
    if let Ok(f) = codec::parse_body(Bytes::copy_from_slice(rest)) {
        binary_round_trip(&f);
        json_round_trip(&f);
    }

    // The JSON form.
    if let Ok(f) = json::parse_json(rest) {
        binary_round_trip(&f);
        json_round_trip(&f);
    }
    let _ = json::seq_of(rest);

    // Connections: as given (binary unless it starts with `{`), and forced
    // into the JSON form.
    let cfg = ConnConfig {
        max_frame,
        queue_bytes: 2048,
        frames_per_sec: 0,
        ..ConnConfig::default()
    };
    drive_tcp(&cfg, rest);
    let mut as_json = Vec::with_capacity(rest.len() + 1);
    as_json.push(b'{');
    as_json.extend_from_slice(rest);
    drive_tcp(&cfg, &as_json);

    // A WebSocket: the input as one message, then split at newlines.
    let mut w = Connection::new(&cfg, Transport::WebSocket, now(0));
    let msgs = std::iter::once(rest).chain(rest.split(|&b| b == b'\n'));
    for m in msgs {
        if let Some(Event::Hello(h)) =
            w.handle_message(&cfg, now(1), text, Bytes::copy_from_slice(m))
        {
            w.accept(&cfg, now(1), &h, h.addr.clone(), "n1");
        }
    }
    if let Ok(q) = std::str::from_utf8(rest) {
        let mut u = Connection::new(&cfg, Transport::WebSocket, now(0));
        let _ = u.handle_url_hello(&cfg, now(0), q);
    }
});
