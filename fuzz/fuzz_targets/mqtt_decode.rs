//! Fuzz target `mqtt_decode`: arbitrary bytes into the MQTT layer of
//! relay-core.
//!
//! The first input byte picks the protocol version (bit 0), a small
//! maximum packet size (bits 1..7) and whether the session under test is
//! persistent; the rest goes, unchanged, to the packet `Decoder`, to
//! `codec::parse` as one body, and to a `Session` after a valid CONNECT
//! (fed in two reads, with QoS 2 messages delivered to it between them).
//! The input is also read as topic names and filters: validation, the
//! reference matcher, the subscription trie and the retained store must
//! agree. Nothing may panic; every decoded packet must re-encode to bytes
//! that decode to the same packet; a session reports `Closed` at most once
//! and keeps its window and queue bounds.

#![no_main]

use bytes::{Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;
use relay_core::conn::Now;
use relay_core::mqtt::session::{Delivery, Event, Session, SessionConfig};
use relay_core::mqtt::{
    Connect, Decoder, Message, Packet, QoS, RetainConfig, RetainedStore, SubscriptionTrie, Version,
    codec, encode, matches, parse_filter, validate_topic_name,
};

fn now(ms: u64) -> Now {
    Now {
        mono_ms: ms,
        wall_ms: 1_763_800_000_000 + ms,
    }
}

/// encode → decode gives the packet back.
fn round_trip(p: &Packet, v: Version) {
    let v = match p {
        Packet::Connect(c) => c.version,
        _ => v,
    };
    let mut buf = BytesMut::new();
    encode(p, v, &mut buf).expect("a decoded packet encodes");
    let back = Decoder::new(usize::MAX, v)
        .decode(&mut buf)
        .expect("re-encoded packet decodes")
        .expect("re-encoded packet is whole");
    assert_eq!(&back, p);
    assert!(buf.is_empty());
}

fn drive_session(cfg: &SessionConfig, v: Version, persistent: bool, data: &[u8]) {
    let mut s = Session::new(cfg, now(0));
    let c = Packet::Connect(Box::new(Connect {
        version: v,
        clean_start: !persistent,
        keep_alive: 2,
        client_id: Bytes::from_static(b"ctl-1"),
        ..Connect::default()
    }));
    let mut input = BytesMut::new();
    encode(&c, v, &mut input).expect("CONNECT encodes");
    let mut closes = 0;
    let (a, b) = data.split_at(data.len() / 2);
    for (i, part) in [a, b].into_iter().enumerate() {
        let t = now(i as u64 * 1000);
        input.extend_from_slice(part);
        for _ in 0..=data.len() + 1 {
            match s.handle_input(cfg, t, &mut input) {
                Some(Event::Connect(_)) => s.accept(cfg, t, None, None),
                Some(Event::Publish(m)) => assert!(validate_topic_name(&m.topic).is_ok()),
                Some(Event::Closed(_)) => closes += 1,
                Some(_) => {}
                None => break,
            }
        }
        let payload = Bytes::copy_from_slice(&data[..data.len().min(40)]);
        let m = Message::new(&b"a/b"[..], payload, QoS::ExactlyOnce);
        let d = Delivery {
            qos: QoS::ExactlyOnce,
            ..Delivery::default()
        };
        for _ in 0..3 {
            let _ = s.deliver(cfg, t, &m, &d);
        }
        assert!(s.inflight_len() <= usize::from(cfg.max_inflight));
        assert!(s.queued_len() <= cfg.max_queued_messages);
        while let Some(chunk) = s.poll_transmit(1500) {
            s.on_transmitted(cfg, t, chunk.len());
        }
        s.handle_timeout(t);
        while let Some(ev) = s.poll_event() {
            if matches!(ev, Event::Closed(_)) {
                closes += 1;
            }
        }
    }
    s.handle_closed(now(10_000));
    s.handle_timeout(now(u64::MAX / 2));
    while let Some(ev) = s.poll_event() {
        if matches!(ev, Event::Closed(_)) {
            closes += 1;
        }
    }
    assert!(closes <= 1);
}

fn topics(data: &[u8]) {
    let mut parts = data.splitn(2, |&b| b == b'\n');
    let (Some(filter), Some(topic)) = (parts.next(), parts.next()) else {
        return;
    };
    let Ok(f) = parse_filter(filter) else {
        return;
    };
    let mut trie: SubscriptionTrie<u8, ()> = SubscriptionTrie::new();
    trie.insert(filter, 1, ()).expect("a parsed filter inserts");
    let mut found = 0;
    trie.for_each_match(topic, |_| found += 1);
    if validate_topic_name(topic).is_ok() {
        assert_eq!(found == 1, matches(f.filter, topic));
        if f.group.is_none() {
            let mut store = RetainedStore::new();
            let msg = Message::new(Bytes::copy_from_slice(topic), &b"p"[..], QoS::AtMostOnce);
            store.set(&RetainConfig::default(), &msg).expect("room");
            let mut hits = 0;
            store.for_each_match(f.filter, 0, |_| hits += 1);
            assert_eq!(hits == 1, matches(f.filter, topic));
        }
    }
    assert_eq!(trie.remove(filter, &1), Some(()));
    assert!(trie.is_empty());
}

fuzz_target!(|data: &[u8]| {
    let Some((&knob, rest)) = data.split_first() else {
        return;
    };
    let v = if knob & 1 == 0 {
        Version::V311
    } else {
        Version::V5
    };
    let max = 2 + usize::from(knob >> 1) * 8;

    // The decoder over the whole buffer.
    let d = Decoder::new(max, v);
    let mut buf = BytesMut::from(rest);
    for _ in 0..=rest.len() {
        match d.decode(&mut buf) {
            Ok(Some(p)) => round_trip(&p, v),
            Ok(None) | Err(_) => break,
        }
    }
    // One body, whatever its first byte says.
    if let Some((&first, body)) = rest.split_first()
        && let Ok(p) = codec::parse(first, Bytes::copy_from_slice(body), v)
    {
        round_trip(&p, v);
    }

    let cfg = SessionConfig {
        max_packet_size: max.max(64) as u32,
        max_inflight: 4,
        max_queued_messages: 8,
        max_queued_bytes: 512,
        ..SessionConfig::default()
    };
    drive_session(&cfg, v, knob & 0x80 != 0, rest);
    topics(rest);
});
