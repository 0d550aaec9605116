//! The TCP relay end to end: real sockets, two shards, port 0.

mod common;

use std::collections::HashMap;
use std::io::Write;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{Client, Form, addrs_on, shard, start};
use relay_core::frame::{ErrorCode, Flags, Frame, FrameType};

const FORMS: [Form; 2] = [Form::Binary, Form::Json];

#[test]
fn hello_welcome_ping_pong_and_bye_in_both_forms() {
    let relay = start(|_| {});
    for form in FORMS {
        let mut c = Client::hello(relay.tcp_addr(), form, "ctl-8266-0042");
        let before = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        c.send(&Frame::new(FrameType::Ping));
        let pong = c.expect(FrameType::Pong);
        let t = pong.pong_time().unwrap();
        assert!(
            t + 1000 >= before && t <= before + 5000,
            "server time {t} vs {before}"
        );
        c.send(&Frame::new(FrameType::Bye));
        let (frames, closed) = c.drain_until_closed(Duration::from_secs(3));
        assert!(closed, "{form:?}: BYE closes");
        assert_eq!(
            frames.iter().map(|f| f.kind).collect::<Vec<_>>(),
            vec![FrameType::Bye]
        );
    }
}

#[test]
fn welcome_carries_the_documented_fields() {
    let relay = start(|c| c.node.name = "edge-7".into());
    let mut c = Client::connect(relay.tcp_addr(), Form::Json);
    c.send_raw(b"{\"type\":\"hello\",\"addr\":\"web-7f3a\",\"heartbeat_s\":12}\n")
        .unwrap();
    let w = c.expect(FrameType::Welcome);
    let v: serde_json::Value = serde_json::from_slice(&w.payload).unwrap();
    assert_eq!(v["addr"], "web-7f3a");
    assert_eq!(v["heartbeat_s"], 12);
    assert_eq!(v["max_frame"], 65536);
    assert_eq!(v["node"], "edge-7");
    assert!(v["server_time_ms"].as_u64().unwrap() > 1_600_000_000_000);
}

#[test]
fn hello_without_address_gets_a_unique_one() {
    let relay = start(|_| {});
    let mut seen = std::collections::HashSet::new();
    for i in 0..20 {
        let form = FORMS[i % 2];
        let c = Client::hello(relay.tcp_addr(), form, "");
        relay_core::validate_name(c.addr.as_bytes()).unwrap();
        assert!(seen.insert(c.addr.clone()), "duplicate {}", c.addr);
    }
}

#[test]
fn hello_with_ack_req_gets_welcome_then_ack() {
    let relay = start(|_| {});
    let mut c = Client::connect(relay.tcp_addr(), Form::Binary);
    let mut h = Frame::new(FrameType::Hello);
    h.src = Bytes::from_static(b"ctl-ack");
    h.seq = 77;
    h.flags = Flags(Flags::ACK_REQ);
    c.send(&h);
    c.expect(FrameType::Welcome);
    assert_eq!(c.expect(FrameType::Ack).seq, 77);
}

#[test]
fn before_hello_only_hello_ping_and_bye_are_accepted() {
    let relay = start(|_| {});
    for form in FORMS {
        let mut c = Client::connect(relay.tcp_addr(), form);
        c.data("anyone", 9, true, b"x");
        assert_eq!(c.expect_error(ErrorCode::HelloRequired), 9);
        let mut j = Frame::new(FrameType::Join);
        j.dst = Bytes::from_static(b"room");
        j.seq = 10;
        c.send(&j);
        assert_eq!(c.expect_error(ErrorCode::HelloRequired), 10);
        c.send(&Frame::new(FrameType::Ping));
        c.expect(FrameType::Pong);
        // The connection goes on, and a HELLO after it succeeds.
        let mut h = Frame::new(FrameType::Hello);
        h.src = Bytes::from(format!("late-{form:?}"));
        c.send(&h);
        c.expect(FrameType::Welcome);
    }
}

#[test]
fn hello_timeout_closes_silent_connections() {
    let relay = start(|c| c.limits.hello_timeout_ms = 300);
    let mut c = Client::connect(relay.tcp_addr(), Form::Binary);
    let start = Instant::now();
    let (frames, closed) = c.drain_until_closed(Duration::from_secs(5));
    assert!(closed);
    assert!(start.elapsed() >= Duration::from_millis(250));
    assert_eq!(frames.len(), 1);
    assert_eq!(
        frames[0].error_parts().unwrap().0,
        ErrorCode::HelloRequired as u16
    );
}

#[test]
fn pairs_on_different_shards_exchange_in_every_form_combination() {
    let relay = start(|_| {});
    let a0 = addrs_on("ctl-a-", 0, 2, 4);
    let a1 = addrs_on("web-b-", 1, 2, 4);
    let mut i = 0;
    for fa in FORMS {
        for fb in FORMS {
            let (na, nb) = (&a0[i], &a1[i]);
            i += 1;
            assert_ne!(shard(na, 2), shard(nb, 2), "the pair must span shards");
            let mut a = Client::hello(relay.tcp_addr(), fa, na);
            let mut b = Client::hello(relay.tcp_addr(), fb, nb);
            // a → b with a JSON payload, acknowledged.
            let mut f = Frame::data(
                Bytes::new(),
                Bytes::from(nb.clone()),
                &br#"{"cmd":"relay_on","ch":2}"#[..],
            );
            f.flags = Flags(Flags::ACK_REQ | Flags::JSON);
            f.seq = 5;
            a.send(&f);
            assert_eq!(a.expect(FrameType::Ack).seq, 5);
            let got = b.expect(FrameType::Data);
            assert_eq!(&got.src[..], na.as_bytes(), "server sets src");
            assert_eq!(&got.dst[..], nb.as_bytes());
            assert_eq!(got.seq, 5);
            assert!(got.flags.json());
            assert!(!got.flags.ack_req(), "ACK_REQ is the relay's business");
            let v: serde_json::Value = serde_json::from_slice(&got.payload).unwrap();
            assert_eq!(v, serde_json::json!({"cmd":"relay_on","ch":2}));
            // b → a with raw bytes: survive every crossing unchanged.
            b.data(na, 0, false, &[0, 1, 2, 0xff, b'\n', b'{']);
            let got = a.expect(FrameType::Data);
            assert_eq!(&got.payload[..], &[0, 1, 2, 0xff, b'\n', b'{']);
            assert!(!got.flags.json());
            assert_eq!(&got.src[..], nb.as_bytes());
        }
    }
}

#[test]
fn json_receiver_sees_payload_or_payload_b64_as_documented() {
    let relay = start(|_| {});
    let mut bin = Client::hello(relay.tcp_addr(), Form::Binary, "ctl-bin");
    let mut js = Client::connect(relay.tcp_addr(), Form::Json);
    js.send_raw(b"{\"type\":\"hello\",\"addr\":\"web-json\"}\n")
        .unwrap();
    js.expect(FrameType::Welcome);
    let mut f = Frame::data(
        Bytes::new(),
        Bytes::from_static(b"web-json"),
        &b"{\"t\":81.5}"[..],
    );
    f.flags = Flags(Flags::JSON);
    bin.send(&f);
    bin.data("web-json", 0, false, b"\x00\x01");
    // Read the raw lines to check the exact JSON form.
    let mut raw = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    while raw.iter().filter(|&&b| b == b'\n').count() < 2 && Instant::now() < deadline {
        let mut tmp = [0u8; 4096];
        if let Ok(n) = std::io::Read::read(&mut js.stream, &mut tmp) {
            raw.extend_from_slice(&tmp[..n]);
        }
    }
    let text = String::from_utf8(raw).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        lines[0],
        serde_json::json!({"type":"data","src":"ctl-bin","dst":"web-json","payload":{"t":81.5}})
    );
    assert_eq!(
        lines[1],
        serde_json::json!({"type":"data","src":"ctl-bin","dst":"web-json","payload_b64":"AAE="})
    );
}

#[test]
fn data_to_an_offline_address_gets_no_route_only_when_asked() {
    let relay = start(|_| {});
    for form in FORMS {
        let mut a = Client::hello(relay.tcp_addr(), form, &format!("ctl-nr-{form:?}"));
        for (i, dst) in ["nobody-1", "nobody-2", "nobody-3", "nobody-4"]
            .iter()
            .enumerate()
        {
            a.data(dst, 0, false, b"lost");
            a.data(dst, 100 + i as u32, true, b"lost");
            assert_eq!(a.expect_error(ErrorCode::NoRoute), 100 + i as u32);
        }
        a.expect_silence(Duration::from_millis(200));
    }
}

#[test]
fn bad_addresses_get_bad_address_and_the_connection_goes_on() {
    let relay = start(|_| {});
    let mut a = Client::hello(relay.tcp_addr(), Form::Json, "ctl-ba");
    a.send_raw(b"{\"type\":\"data\",\"dst\":\"has space\",\"seq\":3,\"ack\":true}\n")
        .unwrap();
    assert_eq!(a.expect_error(ErrorCode::BadAddress), 3);
    let mut bad = Client::connect(relay.tcp_addr(), Form::Binary);
    let mut h = Frame::new(FrameType::Hello);
    h.src = Bytes::from_static(b"a/b");
    bad.send(&h);
    bad.expect_error(ErrorCode::BadAddress);
    a.data("ctl-ba", 4, true, b"self");
    a.expect(FrameType::Data);
    a.expect(FrameType::Ack);
}

#[test]
fn frames_from_many_senders_arrive_in_order() {
    // A queue large enough for the whole burst: this test is about order,
    // not about the slow-consumer bound.
    let relay = start(|c| {
        c.limits.frames_per_sec = 0;
        c.limits.queue_bytes = 8 << 20;
    });
    let mut rx = Client::hello(relay.tcp_addr(), Form::Binary, "sink-0");
    rx.stream
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    const SENDERS: usize = 8;
    const N: u32 = 2000;
    let addr = relay.tcp_addr();
    let handles: Vec<_> = (0..SENDERS)
        .map(|s| {
            std::thread::spawn(move || {
                let form = FORMS[s % 2];
                let mut c = Client::hello(addr, form, &format!("src-{s}"));
                for seq in 1..=N {
                    c.data("sink-0", seq, false, &seq.to_be_bytes());
                }
                c
            })
        })
        .collect();
    let mut last: HashMap<Vec<u8>, u32> = HashMap::new();
    let mut total = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    while total < SENDERS as u32 * N {
        assert!(Instant::now() < deadline, "only {total} frames arrived");
        let Some(f) = rx.recv_timeout(Duration::from_secs(1)) else {
            continue;
        };
        assert_eq!(f.kind, FrameType::Data);
        let seq = u32::from_be_bytes(f.payload[..4].try_into().unwrap());
        assert_eq!(f.seq, seq);
        let prev = last.insert(f.src.to_vec(), seq).unwrap_or(0);
        assert_eq!(seq, prev + 1, "frames from {:?} out of order", f.src);
        total += 1;
    }
    let senders: Vec<Client> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert!(
        (0..SENDERS).any(|s| shard(&format!("src-{s}"), 2) != shard("sink-0", 2)),
        "some senders cross shards"
    );
    drop(senders);
}

#[test]
fn a_second_hello_for_an_online_address_takes_it_over() {
    let relay = start(|_| {});
    for form in FORMS {
        let name = format!("ctl-dup-{form:?}");
        let mut old = Client::hello(relay.tcp_addr(), form, &name);
        let mut new = Client::hello(relay.tcp_addr(), form, &name);
        let (frames, closed) = old.drain_until_closed(Duration::from_secs(5));
        assert!(closed, "the old connection is closed");
        assert_eq!(frames.len(), 1);
        assert_eq!(
            frames[0].error_parts().unwrap().0,
            ErrorCode::Replaced as u16
        );
        let mut other = Client::hello(relay.tcp_addr(), Form::Binary, &format!("peer-{form:?}"));
        other.data(&name, 1, true, b"to the new one");
        other.expect(FrameType::Ack);
        assert_eq!(&new.expect(FrameType::Data).payload[..], b"to the new one");
    }
}

#[test]
fn idle_connections_are_closed_and_go_offline_everywhere() {
    let relay = start(|c| {
        c.heartbeat.min_s = 1;
        c.heartbeat.interval_s = 1;
        c.heartbeat.idle_factor = 1;
    });
    let quiet_name = addrs_on("quiet-", 0, 2, 1).remove(0);
    let mut quiet = Client::hello(relay.tcp_addr(), Form::Binary, &quiet_name);
    let pinger_name = addrs_on("pinger-", 1, 2, 1).remove(0);
    let mut pinger = Client::hello(relay.tcp_addr(), Form::Json, &pinger_name);
    let start = Instant::now();
    let mut closed = false;
    while start.elapsed() < Duration::from_secs(4) {
        pinger.send(&Frame::new(FrameType::Ping));
        pinger.expect(FrameType::Pong);
        let (frames, c) = quiet.drain_until_closed(Duration::from_millis(250));
        if c {
            assert_eq!(
                frames.last().unwrap().error_parts().unwrap().0,
                ErrorCode::IdleTimeout as u16
            );
            closed = true;
            break;
        }
    }
    assert!(closed, "the silent connection was closed");
    assert!(start.elapsed() >= Duration::from_millis(800));
    // The pinger, on the other shard, is still there and can no longer reach it.
    pinger.data(&quiet_name, 42, true, b"?");
    assert_eq!(pinger.expect_error(ErrorCode::NoRoute), 42);
}

#[test]
fn client_heartbeat_is_clamped_to_the_configured_bounds() {
    let relay = start(|c| {
        c.heartbeat.min_s = 10;
        c.heartbeat.max_s = 60;
    });
    for (asked, got) in [(1, 10), (30, 30), (600, 60)] {
        let mut c = Client::connect(relay.tcp_addr(), Form::Json);
        c.send_raw(format!("{{\"type\":\"hello\",\"heartbeat_s\":{asked}}}\n").as_bytes())
            .unwrap();
        let w = c.expect(FrameType::Welcome);
        let v: serde_json::Value = serde_json::from_slice(&w.payload).unwrap();
        assert_eq!(v["heartbeat_s"], got);
    }
}

#[test]
fn a_client_that_never_reads_is_bounded_and_disconnected() {
    let queue = 64 * 1024;
    let relay = start(|c| {
        c.limits.queue_bytes = queue;
        // Long enough for the queue to fill behind the kernel's buffers even
        // on a loaded machine, so the sender is told before the disconnect.
        c.limits.slow_consumer_timeout_ms = 2500;
        c.limits.frames_per_sec = 0;
    });
    let stuck_name = addrs_on("stuck-", 0, 2, 1).remove(0);
    let stuck = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    stuck.set_recv_buffer_size(4096).unwrap();
    stuck.connect(&relay.tcp_addr().into()).unwrap();
    let mut stuck: std::net::TcpStream = stuck.into();
    let mut h = Frame::new(FrameType::Hello);
    h.src = Bytes::from(stuck_name.clone());
    let mut out = bytes::BytesMut::new();
    relay_core::codec::encode(&h, &mut out);
    stuck.write_all(&out).unwrap();
    // Its WELCOME is the last thing it reads: the flood must not start
    // before the owner shard holds the address (a connection that landed on
    // the other shard is handed over first), or it is answered no_route.
    stuck
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut welcome = [0u8; 512];
    let n = std::io::Read::read(&mut stuck, &mut welcome).unwrap();
    assert!(n > 0, "the stuck client got its WELCOME");

    let sender_name = addrs_on("flood-", 1, 2, 1).remove(0);
    let mut sender = Client::hello(relay.tcp_addr(), Form::Binary, &sender_name);
    let payload = vec![7u8; 1024];
    let mut slow = 0;
    let mut no_route = 0;
    let start = Instant::now();
    let mut seq = 0;
    while start.elapsed() < Duration::from_secs(20) && no_route == 0 {
        for _ in 0..64 {
            seq += 1;
            sender.data(&stuck_name, seq, true, &payload);
        }
        while let Some(f) = sender.recv_timeout(Duration::from_millis(5)) {
            match f.error_parts() {
                Some((c, _)) if c == ErrorCode::SlowConsumer as u16 => slow += 1,
                Some((c, _)) if c == ErrorCode::NoRoute as u16 => no_route += 1,
                Some(other) => panic!("unexpected error {other:?}"),
                None => assert_eq!(f.kind, FrameType::Ack),
            }
        }
        let queued: u64 = relay
            .stats()
            .iter()
            .map(|s| s.queue_bytes.load(std::sync::atomic::Ordering::Relaxed))
            .sum();
        assert!(
            queued as usize <= queue + relay_core::conn::CONTROL_SLACK + 64 * 1024,
            "queue grew to {queued}"
        );
    }
    assert!(slow > 0, "the sender was told the receiver is slow");
    assert!(no_route > 0, "the slow receiver was disconnected");
}

#[test]
fn garbage_on_many_connections_leaves_a_healthy_pair_unharmed() {
    let relay = start(|c| c.limits.frames_per_sec = 0);
    let addr = relay.tcp_addr();
    let garbage: Vec<_> = (0..40u64)
        .map(|i| {
            std::thread::spawn(move || {
                let mut seed = 0x9e3779b97f4a7c15u64 ^ i;
                let mut next = || {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    seed
                };
                for _ in 0..5 {
                    let Ok(mut s) = std::net::TcpStream::connect(addr) else {
                        continue;
                    };
                    let len = (next() % 4096) as usize;
                    let mut junk: Vec<u8> = (0..len).map(|_| next() as u8).collect();
                    if i % 3 == 0 && !junk.is_empty() {
                        junk[0] = b'{';
                    }
                    let _ = s.write_all(&junk);
                    std::thread::sleep(Duration::from_millis(next() % 20));
                }
            })
        })
        .collect();
    let a_name = addrs_on("healthy-a-", 0, 2, 1).remove(0);
    let b_name = addrs_on("healthy-b-", 1, 2, 1).remove(0);
    let mut a = Client::hello(addr, Form::Binary, &a_name);
    let mut b = Client::hello(addr, Form::Json, &b_name);
    for i in 0..500u32 {
        a.data(&b_name, i + 1, true, &i.to_be_bytes());
        let f = b.expect(FrameType::Data);
        assert_eq!(&f.payload[..], &i.to_be_bytes());
        assert_eq!(a.expect(FrameType::Ack).seq, i + 1);
        b.data(&a_name, 0, false, b"pong");
        assert_eq!(&a.expect(FrameType::Data).payload[..], b"pong");
    }
    for g in garbage {
        g.join().unwrap();
    }
    // Still accepting after the storm.
    Client::hello(addr, Form::Binary, "after-storm");
}

#[test]
fn broken_binary_framing_closes_with_an_error() {
    let relay = start(|_| {});
    let mut c = Client::hello(relay.tcp_addr(), Form::Binary, "ctl-broken");
    // Length 9 but version 9: layout broken.
    c.send_raw(&[0, 0, 0, 9, 9, 3, 0, 0, 0, 0, 0, 0, 0])
        .unwrap();
    let (frames, closed) = c.drain_until_closed(Duration::from_secs(3));
    assert!(closed);
    assert_eq!(
        frames[0].error_parts().unwrap().0,
        ErrorCode::Unsupported as u16
    );
    let mut c = Client::hello(relay.tcp_addr(), Form::Binary, "ctl-broken2");
    // src_len 200 in a 9-byte body.
    c.send_raw(&[0, 0, 0, 9, 1, 3, 0, 0, 0, 0, 0, 200, 0])
        .unwrap();
    let (frames, closed) = c.drain_until_closed(Duration::from_secs(3));
    assert!(closed);
    assert_eq!(
        frames[0].error_parts().unwrap().0,
        ErrorCode::BadFrame as u16
    );
}

#[test]
fn a_length_over_max_frame_is_refused_before_the_body() {
    let relay = start(|c| c.limits.max_frame = 1024);
    let mut c = Client::hello(relay.tcp_addr(), Form::Binary, "ctl-big");
    // Announce 1 MiB and send nothing more: the relay must answer at once.
    c.send_raw(&(1u32 << 20).to_be_bytes()).unwrap();
    let (frames, closed) = c.drain_until_closed(Duration::from_secs(3));
    assert!(closed);
    assert_eq!(
        frames[0].error_parts().unwrap().0,
        ErrorCode::TooLarge as u16
    );
}

#[test]
fn a_bad_json_line_gets_an_error_and_the_connection_goes_on() {
    let relay = start(|_| {});
    let mut c = Client::hello(relay.tcp_addr(), Form::Json, "ctl-badjson");
    c.send_raw(b"{not json\n{\"type\":\"warp\"}\n{\"type\":\"data\",\"dst\":\"ctl-badjson\",\"payload\":1}\n").unwrap();
    c.expect_error(ErrorCode::BadFrame);
    c.expect_error(ErrorCode::Unsupported);
    assert_eq!(&c.expect(FrameType::Data).payload[..], b"1");
}

#[test]
fn hmac_mode_admits_the_right_token_only() {
    let relay = start(|c| {
        c.auth.mode = relay_config::AuthMode::Hmac;
        c.auth.secret = "fleet-secret".into();
    });
    let token = relay_core::auth::token_for(b"fleet-secret", b"ctl-8266-0042");
    let ok = Client::hello_with(
        relay.tcp_addr(),
        Form::Binary,
        "ctl-8266-0042",
        serde_json::json!({"token": token}),
    );
    assert_eq!(ok.addr, "ctl-8266-0042");
    for (addr, tok) in [
        ("ctl-8266-0042", "00"),
        ("ctl-8266-0043", token.as_str()),
        ("", token.as_str()),
    ] {
        let mut c = Client::connect(relay.tcp_addr(), Form::Json);
        c.send_raw(
            format!("{{\"type\":\"hello\",\"addr\":\"{addr}\",\"token\":\"{tok}\"}}\n").as_bytes(),
        )
        .unwrap();
        let (frames, closed) = c.drain_until_closed(Duration::from_secs(3));
        assert!(closed, "{addr}: closed");
        assert_eq!(
            frames[0].error_parts().unwrap().0,
            ErrorCode::Unauthorized as u16
        );
    }
}

#[test]
fn frames_over_the_rate_limit_are_refused() {
    let relay = start(|c| {
        c.limits.frames_per_sec = 5;
        c.limits.burst = 10;
    });
    let mut c = Client::hello(relay.tcp_addr(), Form::Binary, "ctl-rate");
    for seq in 1..=30 {
        c.data("ctl-rate", seq, true, b"x");
    }
    let mut acks = 0;
    let mut limited = 0;
    while let Some(f) = c.recv_timeout(Duration::from_millis(300)) {
        match f.kind {
            FrameType::Ack => acks += 1,
            FrameType::Error => {
                assert_eq!(f.error_parts().unwrap().0, ErrorCode::RateLimited as u16);
                limited += 1;
            }
            FrameType::Data => {}
            k => panic!("unexpected {k:?}"),
        }
    }
    assert_eq!(
        acks + limited,
        30,
        "every ACK_REQ frame gets exactly one answer"
    );
    assert!(
        (10..=12).contains(&acks),
        "about the burst passes, got {acks}"
    );
}

#[test]
fn connections_over_max_connections_are_refused() {
    let relay = start(|c| c.limits.max_connections = 3);
    let _a = Client::hello(relay.tcp_addr(), Form::Binary, "m1");
    let _b = Client::hello(relay.tcp_addr(), Form::Binary, "m2");
    let _c = Client::hello(relay.tcp_addr(), Form::Binary, "m3");
    let mut d = Client::connect(relay.tcp_addr(), Form::Binary);
    let (_, closed) = d.drain_until_closed(Duration::from_secs(3));
    assert!(closed, "the fourth connection is closed at once");
}

#[test]
fn groups_deliver_to_every_member_once_across_shards() {
    let relay = start(|_| {});
    let m0 = addrs_on("member-", 0, 2, 2);
    let m1 = addrs_on("member-", 1, 2, 2);
    let mut members: Vec<Client> = m0
        .iter()
        .chain(m1.iter())
        .enumerate()
        .map(|(i, a)| Client::hello(relay.tcp_addr(), FORMS[i % 2], a))
        .collect();
    for (i, m) in members.iter_mut().enumerate() {
        let mut j = Frame::new(FrameType::Join);
        j.dst = Bytes::from_static(b"room-1");
        j.seq = 100 + i as u32;
        j.flags = Flags(Flags::ACK_REQ);
        m.send(&j);
        m.send(&j); // joining twice is harmless
        assert_eq!(m.expect(FrameType::Ack).seq, 100 + i as u32);
        assert_eq!(m.expect(FrameType::Ack).seq, 100 + i as u32);
    }
    let publisher_name = addrs_on("pub-", 1, 2, 1).remove(0);
    let mut publisher = Client::hello(relay.tcp_addr(), Form::Json, &publisher_name);
    let mut p = Frame::new(FrameType::Publish);
    p.dst = Bytes::from_static(b"room-1");
    p.payload = Bytes::from_static(b"\"hello\"");
    p.flags = Flags(Flags::ACK_REQ | Flags::JSON);
    p.seq = 1;
    publisher.send(&p);
    assert_eq!(publisher.expect(FrameType::Ack).seq, 1);
    for m in members.iter_mut() {
        let f = m.expect(FrameType::Data);
        assert!(f.flags.group());
        assert_eq!(&f.dst[..], b"room-1");
        assert_eq!(&f.src[..], publisher_name.as_bytes());
        assert_eq!(&f.payload[..], b"\"hello\"");
        m.expect_silence(Duration::from_millis(50));
    }
    // One member on each shard leaves; the rest still receive. The LEAVE's
    // ACK comes once its shard no longer delivers to it, so no wait is needed
    // (how the other shards learn it is the router simulation's subject).
    for idx in [0, 2] {
        let mut l = Frame::new(FrameType::Leave);
        l.dst = Bytes::from_static(b"room-1");
        l.seq = 200 + idx as u32;
        l.flags = Flags(Flags::ACK_REQ);
        members[idx].send(&l);
        assert_eq!(members[idx].expect(FrameType::Ack).seq, 200 + idx as u32);
    }
    p.seq = 2;
    publisher.send(&p);
    publisher.expect(FrameType::Ack);
    for (i, m) in members.iter_mut().enumerate() {
        if i == 0 || i == 2 {
            m.expect_silence(Duration::from_millis(200));
        } else {
            m.expect(FrameType::Data);
        }
    }
}

#[test]
fn shutdown_drains_queued_frames_then_says_shutting_down() {
    let relay = start(|c| {
        c.limits.frames_per_sec = 0;
        c.shutdown.grace_ms = 3000;
    });
    let rx_name = addrs_on("drain-rx-", 0, 2, 1).remove(0);
    let tx_name = addrs_on("drain-tx-", 1, 2, 1).remove(0);
    let mut rx = Client::hello(relay.tcp_addr(), Form::Binary, &rx_name);
    let mut tx = Client::hello(relay.tcp_addr(), Form::Binary, &tx_name);
    const N: u32 = 300;
    for i in 0..N {
        tx.data(&rx_name, i + 1, true, &[1u8; 100]);
    }
    for _ in 0..N {
        tx.expect(FrameType::Ack);
    }
    relay.stop();
    let (frames, closed) = rx.drain_until_closed(Duration::from_secs(10));
    assert!(closed);
    let data = frames.iter().filter(|f| f.kind == FrameType::Data).count();
    assert_eq!(data, N as usize, "every queued frame was delivered");
    let last = frames.last().unwrap();
    assert_eq!(
        last.error_parts().unwrap().0,
        ErrorCode::ShuttingDown as u16
    );
    relay.join().unwrap();
}

#[test]
fn reserved_flag_bits_are_ignored_and_never_sent() {
    let relay = start(|_| {});
    let mut c = Client::hello(relay.tcp_addr(), Form::Binary, "ctl-flags");
    let mut f = Frame::data(Bytes::new(), Bytes::from_static(b"ctl-flags"), &b"x"[..]);
    f.flags = Flags(0b1111_1001); // ACK_REQ + reserved bits + a forged GROUP
    f.seq = 3;
    // Encode by hand so the reserved bits really go out.
    let mut body = relay_core::codec::body_bytes(&f).to_vec();
    body[2] = 0b1111_1101;
    let mut raw = (body.len() as u32).to_be_bytes().to_vec();
    raw.extend_from_slice(&body);
    c.send_raw(&raw).unwrap();
    let d = c.expect(FrameType::Data);
    assert_eq!(d.flags.0 & !Flags::DEFINED, 0);
    assert!(!d.flags.group(), "clients cannot forge GROUP");
    assert_eq!(c.expect(FrameType::Ack).seq, 3);
}

#[test]
fn a_reader_that_falls_behind_gets_every_frame_in_order_once_it_reads() {
    // The relay's writes to this reader stop on a full socket and must resume
    // when it drains, with nothing else waking the connection.
    let relay = start(|c| {
        c.limits.queue_bytes = 16 * 1024 * 1024;
        c.limits.frames_per_sec = 0;
    });
    let name = addrs_on("lagging-", 0, 2, 1).remove(0);
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    sock.connect(&relay.tcp_addr().into()).unwrap();
    let mut reader = Client::from_stream(sock.into(), Form::Binary);
    let mut h = Frame::new(FrameType::Hello);
    h.src = Bytes::from(name.clone());
    reader.send(&h);
    reader.expect(FrameType::Welcome);

    let sender_name = addrs_on("burst-", 1, 2, 1).remove(0);
    let mut sender = Client::hello(relay.tcp_addr(), Form::Binary, &sender_name);
    let payload = vec![3u8; 1000];
    // ~8 MB: more than the relay's socket send buffer can take (4 MB at most
    // by default), so the relay's writes stop on a full socket.
    let frames = 8000u32;
    for seq in 1..=frames {
        let mut p = payload.clone();
        p[..4].copy_from_slice(&seq.to_be_bytes());
        sender.data(&name, seq, false, &p);
    }
    // Let the relay fill the reader's socket and stall on it.
    std::thread::sleep(Duration::from_millis(300));
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut next = 1u32;
    while next <= frames && Instant::now() < deadline {
        let Some(f) = reader.recv_timeout(Duration::from_millis(200)) else {
            continue;
        };
        assert_eq!(f.kind, FrameType::Data);
        let seq = u32::from_be_bytes(f.payload[..4].try_into().unwrap());
        assert_eq!(seq, next, "frames arrive in order, none lost");
        next += 1;
    }
    assert_eq!(next, frames + 1, "every frame arrived");
}

/// Each shard's table of socket states (`relay_sockets`) follows its
/// connections: a connection handed to its owner leaves nothing on the shard
/// that accepted it, one closed by the relay (taken over) or by its client
/// leaves nothing at all, and with every client gone both tables are empty.
/// Browsers (sockets given to the loop after their upgrade) too.
#[test]
fn socket_states_leave_the_shards_with_their_connections() {
    use std::sync::atomic::Ordering::Relaxed;
    const N: u64 = 16;
    let relay = start(|_| {});
    let stats = relay.stats();
    let sockets = || -> Vec<u64> { stats.iter().map(|s| s.sockets.load(Relaxed)).collect() };
    let wait = |want: [u64; 2], why: &str| {
        let until = Instant::now() + Duration::from_secs(15);
        while sockets() != want {
            assert!(
                Instant::now() < until,
                "{why}: {:?}, not {want:?}",
                sockets()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    // SO_REUSEPORT spreads the accepts, so about half of these are accepted
    // by the shard that does not own their address and handed over.
    let mut clients: Vec<Client> = (0..2)
        .flat_map(|s| addrs_on("sockets-", s, 2, N as usize))
        .map(|a| Client::hello(relay.tcp_addr(), Form::Binary, &a))
        .collect();
    let handovers: u64 = stats.iter().map(|s| s.handovers.load(Relaxed)).sum();
    assert!(handovers > 0, "no connection was handed over");
    wait([N, N], "after hello, on the owners only");
    let mut browsers: Vec<common::Browser> = addrs_on("sockets-web-", 1, 2, 2)
        .iter()
        .map(|a| {
            let mut b = common::Browser::connect(&relay, &format!("addr={a}"));
            assert_eq!(b.recv_json()["type"], "welcome");
            b
        })
        .collect();
    wait([N, N + 2], "with two browsers on shard 1");
    // A second hello for the first address takes it over: the relay closes
    // the old connection.
    let first = addrs_on("sockets-", 0, 2, 1).remove(0);
    let taker = Client::hello(relay.tcp_addr(), Form::Json, &first);
    clients[0].expect_error(ErrorCode::Replaced);
    let (_, closed) = clients[0].drain_until_closed(Duration::from_secs(5));
    assert!(closed, "the replaced connection is closed");
    wait([N, N + 2], "after the take-over");
    // Shard 0's first clients leave, then everyone else.
    let rest = clients.split_off(N as usize);
    drop(clients);
    wait([1, N + 2], "with shard 0's first clients gone");
    for b in &mut browsers {
        let _ = b.ws.close(None);
        let _ = b.ws.flush();
    }
    drop((rest, taker, browsers));
    wait([0, 0], "with every client gone");
    for s in stats.iter() {
        assert_eq!(s.conns(), 0);
    }
}

/// A controller that writes its hello and its first frames in one segment,
/// before any WELCOME: when the shard that accepted it does not own its
/// address, the connection is handed over with those frames already read (or
/// still in the socket), and every one of them is routed, in order. On
/// io_uring the accepting shard keeps no receive in flight across the
/// handover (one-shot receives until the hello is taken).
#[test]
fn frames_written_with_the_hello_survive_the_handover_in_order() {
    use std::sync::atomic::Ordering::Relaxed;
    const SENDERS: usize = 16;
    const FRAMES: u32 = 50;
    let relay = start(|_| {});
    let mut sink = Client::hello(relay.tcp_addr(), Form::Binary, "piped-sink");
    // Half of the senders' addresses belong to each shard; SO_REUSEPORT
    // spreads the accepts, so some connections land on the other shard.
    let senders: Vec<String> = (0..2)
        .flat_map(|s| addrs_on("piped-", s, 2, SENDERS / 2))
        .collect();
    let mut clients = Vec::new();
    for (i, a) in senders.iter().enumerate() {
        let mut c = Client::connect(relay.tcp_addr(), Form::Binary);
        let mut out = bytes::BytesMut::new();
        let mut hello = Frame::new(FrameType::Hello);
        hello.src = bytes::Bytes::copy_from_slice(a.as_bytes());
        hello.payload = bytes::Bytes::from_static(b"{}");
        hello.flags = Flags(Flags::JSON);
        relay_core::codec::encode(&hello, &mut out);
        for n in 0..FRAMES {
            let mut f = Frame::data(
                bytes::Bytes::new(),
                bytes::Bytes::from_static(b"piped-sink"),
                bytes::Bytes::copy_from_slice(
                    &[&(i as u32).to_be_bytes()[..], &n.to_be_bytes()].concat(),
                ),
            );
            f.seq = n + 1;
            relay_core::codec::encode(&f, &mut out);
        }
        c.send_raw(&out).unwrap();
        clients.push(c);
    }
    let mut next = vec![0u32; SENDERS];
    let mut got = 0;
    let deadline = Instant::now() + Duration::from_secs(20);
    while got < SENDERS as u32 * FRAMES && Instant::now() < deadline {
        let Some(f) = sink.recv_timeout(Duration::from_millis(200)) else {
            continue;
        };
        assert_eq!(f.kind, FrameType::Data, "{f:?}");
        let i = u32::from_be_bytes(f.payload[..4].try_into().unwrap()) as usize;
        let n = u32::from_be_bytes(f.payload[4..8].try_into().unwrap());
        assert_eq!(n, next[i], "{}: frames in order, none lost", senders[i]);
        next[i] += 1;
        got += 1;
    }
    assert_eq!(
        got,
        SENDERS as u32 * FRAMES,
        "every frame arrived: {next:?}"
    );
    for c in &mut clients {
        assert_eq!(c.expect(FrameType::Welcome).kind, FrameType::Welcome);
    }
    let handovers: u64 = relay
        .stats()
        .iter()
        .map(|s| s.handovers.load(Relaxed))
        .sum();
    assert!(handovers > 0, "no connection was handed over");
}
