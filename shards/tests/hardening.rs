//! What an attacker and a hostile network can and cannot do to the relay:
//! real sockets, two shards, port 0. Each test is one attack that used to
//! work.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use common::{Client, Form, addrs_on, http, start};
use relay_core::frame::{ErrorCode, Flags, Frame, FrameType};
use relay_core::ws::{self, Opcode};
use serde_json::json;

const TOKEN: &str = "test-token";

/// Bytes queued for clients, summed over the shards (the sweeper samples it
/// every 100 ms).
fn queued(relay: &relay_shards::Relay) -> usize {
    relay
        .stats()
        .iter()
        .map(|s| s.queue_bytes.load(Relaxed) as usize)
        .sum()
}

/// A client-to-server WebSocket frame (masked, final).
fn ws_frame(opcode: Opcode, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    ws::put_client_frame(&mut v, opcode, true, payload, [0x11, 0x22, 0x33, 0x44]);
    v
}

/// Opens `/ws?{query}` by hand on `stream` and reads the 101 head.
fn ws_handshake(stream: &mut TcpStream, query: &str) {
    let req = format!(
        "GET /ws?{query} HTTP/1.1\r\nHost: relay\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    stream.write_all(req.as_bytes()).unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        stream.read_exact(&mut b).unwrap();
        head.push(b[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 101"),
        "{:?}",
        String::from_utf8_lossy(&head)
    );
}

#[test]
fn websocket_pings_from_a_client_that_never_reads_are_bounded_and_it_is_closed() {
    let queue = 4096;
    let relay = start(|c| {
        c.limits.max_frame = 1024;
        c.limits.queue_bytes = queue;
        c.limits.slow_consumer_timeout_ms = 300;
    });
    let http = relay.http_addr().unwrap();
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    sock.connect(&http.into()).unwrap();
    let mut stream: TcpStream = sock.into();
    ws_handshake(&mut stream, "addr=web-pinger");
    // Pings with the largest payload, written and never read.
    let batch: Vec<u8> = (0..500)
        .flat_map(|_| ws_frame(Opcode::Ping, &[7u8; 125]))
        .collect();
    let mut writer = stream.try_clone().unwrap();
    let flood = std::thread::spawn(move || {
        let mut sent = 0usize;
        // Bounded: 40,000 batches is 2.6 GB, far past any kernel buffer.
        for _ in 0..40_000 {
            if writer.write_all(&batch).is_err() {
                return (sent, true);
            }
            sent += batch.len();
        }
        (sent, false)
    });
    let start = Instant::now();
    let mut most = 0;
    while !flood.is_finished() && start.elapsed() < Duration::from_secs(15) {
        most = most.max(queued(&relay));
        assert!(
            most <= queue + relay_core::conn::CONTROL_SLACK,
            "the relay queued {most} bytes of pongs against queue_bytes = {queue}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        flood.is_finished(),
        "the client was not closed as a slow consumer within 15 s"
    );
    let (sent, closed) = flood.join().unwrap();
    assert!(
        closed,
        "the relay kept reading: {sent} bytes of pings taken"
    );
    assert!(
        sent < 64 << 20,
        "the relay read {sent} bytes from a client that never reads"
    );
}

#[test]
fn every_ack_req_gets_exactly_one_answer_even_from_one_large_write() {
    let n: u32 = 10_000;
    let relay = start(|c| c.limits.queue_bytes = 65_540);
    let peer_name = addrs_on("peer-", 1, 2, 1).remove(0);
    let sender_name = addrs_on("sender-", 0, 2, 1).remove(0);
    let mut peer = Client::hello(relay.tcp_addr(), Form::Binary, &peer_name);
    let mut sender = Client::hello(relay.tcp_addr(), Form::Json, &sender_name);
    let reader = std::thread::spawn(move || {
        let mut got = 0;
        while peer.recv_timeout(Duration::from_secs(3)).is_some() {
            got += 1;
        }
        got
    });
    // Odd seqs to a peer on the other shard (ACK or slow_consumer comes back
    // over the mesh), even seqs to an offline address (no_route); past the
    // burst of 4000, rate_limited. All in one write.
    let mut out = BytesMut::new();
    for seq in 1..=n {
        let dst = if seq % 2 == 1 {
            peer_name.as_str()
        } else {
            "gone-1"
        };
        let mut f = Frame::data(Bytes::new(), Bytes::from(dst.to_owned()), "x");
        f.seq = seq;
        f.flags = Flags(Flags::ACK_REQ);
        relay_core::json::write_json(&f, &mut out);
        out.extend_from_slice(b"\n");
    }
    let mut w = sender.stream.try_clone().unwrap();
    let writer = std::thread::spawn(move || w.write_all(&out).unwrap());
    let mut answers = vec![0u32; n as usize + 1];
    let mut total = 0;
    let deadline = Instant::now() + Duration::from_secs(30);
    while total < n && Instant::now() < deadline {
        let Some(f) = sender.recv_timeout(Duration::from_millis(500)) else {
            continue;
        };
        assert!(matches!(f.kind, FrameType::Ack | FrameType::Error), "{f:?}");
        assert!(f.seq >= 1 && f.seq <= n, "an answer without its seq: {f:?}");
        answers[f.seq as usize] += 1;
        total += 1;
    }
    writer.join().unwrap();
    let missing: Vec<usize> = (1..=n as usize).filter(|&s| answers[s] == 0).collect();
    let doubled: Vec<usize> = (1..=n as usize).filter(|&s| answers[s] > 1).collect();
    assert!(
        missing.is_empty() && doubled.is_empty(),
        "{} frames got no answer (first {:?}), {} got several",
        missing.len(),
        missing.first(),
        doubled.len()
    );
    sender.expect_silence(Duration::from_millis(300));
    assert!(reader.join().unwrap() > 0);
}

/// `relay_dropped_frames_total{reason=...}` of `/metrics`.
fn metric_drops(relay: &relay_shards::Relay, reason: &str) -> u64 {
    let (status, text) = http(relay, "GET", "/metrics", None, None);
    assert_eq!(status, 200);
    let line = format!("relay_dropped_frames_total{{reason=\"{reason}\"}} ");
    text.as_str()
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(&line))
        .unwrap_or_else(|| panic!("no {line} in /metrics"))
        .parse()
        .unwrap()
}

/// The drops of `reason` as `/metrics` and `/api/v1/stats` count them
/// (read in turn, so the stats count lies between two metric reads).
fn drops(relay: &relay_shards::Relay, reason: &str) -> u64 {
    let before = metric_drops(relay, reason);
    let (status, stats) = http(relay, "GET", "/api/v1/stats", Some(TOKEN), None);
    assert_eq!(status, 200);
    let after = metric_drops(relay, reason);
    let n = stats["drops"][reason].as_u64().unwrap();
    assert!(
        (before..=after).contains(&n),
        "{reason}: /api/v1/stats says {n}, /metrics {before}..{after}"
    );
    after
}

/// Waits until the drop counter of `reason` reaches `at_least`.
fn wait_drops(relay: &relay_shards::Relay, reason: &str, at_least: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let n = drops(relay, reason);
        if n >= at_least || Instant::now() > deadline {
            return n;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn every_dropped_frame_is_counted_by_its_reason() {
    let relay = start(|c| {
        c.limits.frames_per_sec = 50;
        c.limits.burst = 10;
        c.limits.max_frame = 1024;
        c.auth.allow_client_join = false;
    });
    let tcp = relay.tcp_addr();
    // hello_required: DATA before hello.
    let mut early = Client::connect(tcp, Form::Binary);
    early.data("ctl-1", 1, true, b"x");
    early.expect_error(ErrorCode::HelloRequired);
    // too_large: a length over max_frame (the stream closes).
    let mut big = Client::connect(tcp, Form::Binary);
    big.send_raw(&[0, 0, 0x10, 0]).unwrap();
    big.expect_error(ErrorCode::TooLarge);
    // bad_frame: a JSON line that is no frame, and one that is not UTF-8.
    let mut j = Client::hello(tcp, Form::Json, "drops-json");
    j.send_raw(b"{\"type\":\"data\",\"dst\":\n").unwrap();
    j.expect_error(ErrorCode::BadFrame);
    j.send_raw(b"{\"type\":\"ping\",\"note\":\"\xc3\x28\"}\n")
        .unwrap();
    j.expect_error(ErrorCode::BadFrame);
    let mut c = Client::hello(tcp, Form::Binary, "drops-bin");
    // bad_address, unsupported, forbidden, no_route: one each.
    c.data("bad addr", 2, true, b"x");
    c.expect_error(ErrorCode::BadAddress);
    let mut w = Frame::new(FrameType::Welcome);
    w.seq = 3;
    c.send(&w);
    c.expect_error(ErrorCode::Unsupported);
    let mut join = Frame::new(FrameType::Join);
    join.dst = Bytes::from_static(b"room-1");
    join.seq = 4;
    c.send(&join);
    c.expect_error(ErrorCode::Forbidden);
    c.data("gone-1", 5, true, b"x");
    c.expect_error(ErrorCode::NoRoute);
    // rate_limited: 60 frames at once against a burst of 10.
    for seq in 100..160 {
        c.data("gone-1", seq, false, b"x");
    }
    c.expect_error(ErrorCode::RateLimited);
    assert!(wait_drops(&relay, "hello_required", 1) >= 1);
    assert!(wait_drops(&relay, "too_large", 1) >= 1);
    assert!(wait_drops(&relay, "bad_frame", 2) >= 2);
    assert!(wait_drops(&relay, "bad_address", 1) >= 1);
    assert!(wait_drops(&relay, "unsupported", 1) >= 1);
    assert!(wait_drops(&relay, "forbidden", 1) >= 1);
    assert!(wait_drops(&relay, "no_route", 2) >= 2);
    assert!(wait_drops(&relay, "rate_limited", 30) >= 30);
    drop(relay);

    // slow_consumer and mesh_full need a full queue and a full mesh.
    let relay = start(|c| {
        c.limits.max_frame = 1024;
        c.limits.queue_bytes = 4096;
        c.limits.frames_per_sec = 0;
        c.shards.mesh_capacity = 1;
        c.shards.max_batch = 1;
    });
    let tcp = relay.tcp_addr();
    let stuck_name = addrs_on("stuck-", 0, 2, 1).remove(0);
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    sock.connect(&tcp.into()).unwrap();
    let mut stuck = Client::from_stream(sock.into(), Form::Binary);
    let mut h = Frame::new(FrameType::Hello);
    h.src = Bytes::from(stuck_name.clone());
    stuck.send(&h);
    let sender_name = addrs_on("flood-", 0, 2, 1).remove(0);
    let mut sender = Client::hello(tcp, Form::Binary, &sender_name);
    let start = Instant::now();
    let mut slow = false;
    let mut seq = 0;
    while !slow && start.elapsed() < Duration::from_secs(10) {
        for _ in 0..32 {
            seq += 1;
            sender.data(&stuck_name, seq, true, &[1u8; 900]);
        }
        while let Some(f) = sender.recv_timeout(Duration::from_millis(5)) {
            slow |= f
                .error_parts()
                .is_some_and(|(c, _)| c == ErrorCode::SlowConsumer as u16);
        }
    }
    assert!(slow, "the stuck receiver's queue never filled");
    assert!(wait_drops(&relay, "slow_consumer", 1) >= 1);
    let peer_name = addrs_on("peer-", 1, 2, 1).remove(0);
    let mut peer = Client::hello(tcp, Form::Binary, &peer_name);
    let mut burst = BytesMut::new();
    for seq in 1..=2000 {
        let mut f = Frame::data(Bytes::new(), Bytes::from(peer_name.clone()), "m");
        f.seq = seq;
        relay_core::codec::encode(&f, &mut burst);
    }
    sender.send_raw(&burst).unwrap();
    assert!(wait_drops(&relay, "mesh_full", 1) >= 1);
    assert!(peer.recv_timeout(Duration::from_secs(2)).is_some());
}

fn device_hello(tcp: std::net::SocketAddr, addr: &str) -> Client {
    let token = relay_core::auth::token_for(SECRET.as_bytes(), addr.as_bytes());
    Client::hello_with(tcp, Form::Binary, addr, json!({ "token": token }))
}

const SECRET: &str = "fleet-secret-fleet-secret";

fn frame_to(kind: FrameType, dst: &str, seq: u32) -> Frame {
    let mut f = Frame::new(kind);
    f.dst = Bytes::from(dst.to_owned());
    f.seq = seq;
    f.flags = Flags(Flags::ACK_REQ);
    f
}

#[test]
fn only_the_device_and_the_service_token_may_watch_and_no_client_publishes_to_a_watch_group() {
    let relay = start(|c| {
        c.auth.mode = relay_config::AuthMode::Hmac;
        c.auth.secret = SECRET.into();
        c.auth.allow_client_join = false;
        c.http.api_token = Some(TOKEN.into());
    });
    let tcp = relay.tcp_addr();
    let mut dev5 = device_hello(tcp, "dev-5");
    let mut dev4 = device_hello(tcp, "dev-4");
    // Another device may not watch dev-5, nor take the service role with
    // its own token.
    dev4.send(&frame_to(FrameType::Join, "watch:dev-5", 1));
    assert_eq!(dev4.expect_error(ErrorCode::Forbidden), 1);
    let mut climber = Client::connect(tcp, Form::Binary);
    let mut h = Frame::new(FrameType::Hello);
    h.src = Bytes::from_static(b"dev-6");
    h.seq = 2;
    let token = relay_core::auth::token_for(SECRET.as_bytes(), b"dev-6");
    h.payload = json!({"token": token, "role": "service"})
        .to_string()
        .into();
    climber.send(&h);
    assert_eq!(climber.expect_error(ErrorCode::Forbidden), 2);
    // The service token may watch, and so may the device itself.
    let mut svc = Client::hello_with(
        tcp,
        Form::Binary,
        "svc-1",
        json!({"token": TOKEN, "role": "service"}),
    );
    svc.send(&frame_to(FrameType::Join, "watch:dev-5", 3));
    assert_eq!(svc.expect(FrameType::Ack).seq, 3);
    dev5.send(&frame_to(FrameType::Join, "watch:dev-5", 4));
    assert_eq!(dev5.expect(FrameType::Ack).seq, 4);
    // No client publishes to a watch group, whatever its token.
    dev4.send(&frame_to(FrameType::Publish, "watch:dev-5", 5));
    assert_eq!(dev4.expect_error(ErrorCode::Forbidden), 5);
    svc.send(&frame_to(FrameType::Publish, "watch:dev-5", 6));
    assert_eq!(svc.expect_error(ErrorCode::Forbidden), 6);
    // The backend lets a browser watch by binding it through the API.
    let mut web = device_hello(tcp, "web-9");
    let (status, body) = http(
        &relay,
        "POST",
        "/api/v1/groups/watch:dev-5/members",
        Some(TOKEN),
        Some(&json!({"addr": "web-9"})),
    );
    assert_eq!(status, 200, "{body}");
    dev5.data("dev-4", 9, false, b"private");
    let direct = dev4.expect(FrameType::Data);
    assert_eq!(direct.dst.as_ref(), b"dev-4");
    dev4.expect_silence(Duration::from_millis(300));
    for watcher in [&mut svc, &mut dev5, &mut web] {
        let f = watcher.expect(FrameType::Data);
        assert_eq!(
            (f.src.as_ref(), f.dst.as_ref()),
            (&b"dev-5"[..], &b"watch:dev-5"[..])
        );
        assert_eq!(&f.payload[..], b"private");
    }
    assert!(drops(&relay, "forbidden") >= 4);
}

/// Sends `raw` on a new HTTP connection and reads the answer until the
/// relay closes it (or 5 s pass).
fn raw_http(relay: &relay_shards::Relay, raw: &[u8]) -> String {
    let mut s = TcpStream::connect(relay.http_addr().unwrap()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(raw).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

/// The status line's code of what a connection has answered so far, waiting
/// at most `wait`; `None` when nothing came.
fn status_within(s: &mut TcpStream, wait: Duration) -> Option<u16> {
    s.set_read_timeout(Some(wait)).unwrap();
    let mut buf = [0u8; 512];
    match s.read(&mut buf) {
        Ok(n) if n >= 12 => std::str::from_utf8(&buf[9..12]).ok()?.parse().ok(),
        _ => None,
    }
}

const ONE_MIB: usize = 1 << 20;

fn send_head(addr: std::net::SocketAddr, token: Option<&str>) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let head = format!(
        "POST /api/v1/send HTTP/1.1\r\nHost: relay\r\n{auth}Content-Type: application/json\r\nContent-Length: {ONE_MIB}\r\n\r\n"
    );
    s.write_all(head.as_bytes()).unwrap();
    s
}

#[test]
fn api_bodies_are_refused_on_the_head_without_the_token_and_capped_per_shard() {
    let relay = start(|c| {
        c.http.api_token = Some(TOKEN.into());
        c.http.max_body = ONE_MIB;
        c.http.max_bodies_bytes = ONE_MIB;
    });
    let addr = relay.http_addr().unwrap();
    // Heads announcing 1 MiB without the token: 401 at once, no body read.
    let mut heads: Vec<TcpStream> = (0..40).map(|_| send_head(addr, None)).collect();
    for s in &mut heads {
        assert_eq!(status_within(s, Duration::from_secs(3)), Some(401));
    }
    // With the token, each shard holds one 1 MiB body at a time: of three
    // waiting heads on two shards at least one is refused at once.
    let mut held = Vec::new();
    let mut busy = 0;
    for _ in 0..3 {
        let mut s = send_head(addr, Some(TOKEN));
        match status_within(&mut s, Duration::from_millis(700)) {
            Some(503) => busy += 1,
            None => held.push(s),
            other => panic!("unexpected answer {other:?}"),
        }
    }
    assert!(busy >= 1, "three 1 MiB bodies in flight on two shards");
    assert!(held.len() <= 2);
    // The budget comes back when a request ends.
    drop(held);
    std::thread::sleep(Duration::from_millis(300));
    for _ in 0..4 {
        let (status, body) = http(
            &relay,
            "POST",
            "/api/v1/send",
            Some(TOKEN),
            Some(&json!({"dst": "gone-1", "payload": "x"})),
        );
        assert_eq!(status, 404, "{body}");
    }
}

#[test]
fn http_connections_cannot_take_controllers_slots_nor_dribble_past_their_deadlines() {
    let relay = start(|c| {
        c.limits.max_connections = 4;
        c.http.max_connections = 5;
        c.http.health_slots = 1;
        c.http.head_timeout_ms = 600;
        c.http.body_timeout_ms = 600;
    });
    let addr = relay.http_addr().unwrap();
    // Four partial heads and a partial body fill the HTTP pool.
    let mut dribblers: Vec<TcpStream> = (0..4)
        .map(|_| {
            let mut s = TcpStream::connect(addr).unwrap();
            s.write_all(b"GET /api/v1/stats HTTP/1.1\r\nHost: relay\r\nX-Slow: ")
                .unwrap();
            s
        })
        .collect();
    let mut body = TcpStream::connect(addr).unwrap();
    body.write_all(b"POST /api/v1/send HTTP/1.1\r\nContent-Length: 100\r\n\r\n{")
        .unwrap();
    std::thread::sleep(Duration::from_millis(150));
    // Controllers still get all of limits.max_connections.
    let ctls: Vec<Client> = (0..4)
        .map(|i| Client::hello(relay.tcp_addr(), Form::Binary, &format!("ctl-slot-{i}")))
        .collect();
    // The health slot answers /healthz and /metrics, and nothing else.
    let (status, body_json) = http(&relay, "GET", "/healthz", None, None);
    assert_eq!((status, body_json), (200, json!({"ok": true})));
    assert_eq!(http(&relay, "GET", "/metrics", None, None).0, 200);
    assert_eq!(http(&relay, "GET", "/api/v1/stats", None, None).0, 503);
    // Every dribbler is closed by its deadline, however often it sends.
    dribblers.push(body);
    let start = Instant::now();
    let mut open: Vec<bool> = vec![true; dribblers.len()];
    while open.iter().any(|&o| o) && start.elapsed() < Duration::from_secs(4) {
        for (s, o) in dribblers.iter_mut().zip(open.iter_mut()) {
            if *o
                && (s.write_all(b"a").is_err()
                    || status_within(s, Duration::from_millis(20)).is_some())
            {
                *o = false;
            }
        }
        std::thread::sleep(Duration::from_millis(80));
    }
    assert!(
        open.iter().all(|&o| !o),
        "a client sending a byte every 100 ms kept its connection past the deadline"
    );
    assert!(start.elapsed() < Duration::from_secs(3));
    drop(ctls);
}

#[test]
fn smuggling_heads_are_refused_and_head_answers_like_get_without_a_body() {
    let relay = start(|_| {});
    for cl in [
        "Content-Length: 2\r\nContent-Length: 2",
        "Content-Length: 2\r\nContent-Length: 7",
        "Content-Length: +2",
    ] {
        let raw = format!("GET /healthz HTTP/1.1\r\nHost: relay\r\n{cl}\r\n\r\n{{}}");
        let got = raw_http(&relay, raw.as_bytes());
        assert!(got.starts_with("HTTP/1.1 400 "), "{cl:?}: {got}");
    }
    let get = raw_http(
        &relay,
        b"GET /healthz HTTP/1.1\r\nConnection: close\r\n\r\n",
    );
    let head = raw_http(
        &relay,
        b"HEAD /healthz HTTP/1.1\r\nConnection: close\r\n\r\n",
    );
    let (get_head, get_body) = get.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200 "), "{head}");
    assert_eq!(
        head,
        format!("{get_head}\r\n\r\n"),
        "HEAD is GET's head, no body"
    );
    assert!(!get_body.is_empty());
}

#[test]
fn relay_closed_total_counts_http_connections() {
    let relay = start(|_| {});
    let closed = |relay: &relay_shards::Relay| -> u64 {
        let (_, text) = http(relay, "GET", "/metrics", None, None);
        // Summed over the shards.
        text.as_str()
            .unwrap()
            .lines()
            .filter(|l| l.starts_with("relay_closed_total{"))
            .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
            .sum()
    };
    let before = closed(&relay);
    for _ in 0..3 {
        assert_eq!(http(&relay, "GET", "/healthz", None, None).0, 200);
    }
    let deadline = Instant::now() + Duration::from_secs(3);
    while closed(&relay) < before + 4 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    // The three health checks and the first /metrics request.
    assert!(closed(&relay) >= before + 4);
}

/// Reads one server WebSocket frame: (opcode, payload).
fn read_ws_frame(s: &mut TcpStream) -> (Option<Opcode>, Vec<u8>) {
    let mut h = [0u8; 2];
    s.read_exact(&mut h).unwrap();
    let len = match h[1] & 0x7f {
        126 => {
            let mut l = [0u8; 2];
            s.read_exact(&mut l).unwrap();
            u16::from_be_bytes(l) as usize
        }
        127 => {
            let mut l = [0u8; 8];
            s.read_exact(&mut l).unwrap();
            u64::from_be_bytes(l) as usize
        }
        n => n as usize,
    };
    let mut p = vec![0u8; len];
    s.read_exact(&mut p).unwrap();
    (Opcode::from_u8(h[0]), p)
}

/// The close code the relay answers after `frame`, skipping other frames.
fn close_code_after(relay: &relay_shards::Relay, frame: &[u8]) -> u16 {
    let mut s = TcpStream::connect(relay.http_addr().unwrap()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    ws_handshake(&mut s, "addr=web-closer");
    s.write_all(frame).unwrap();
    loop {
        let (op, p) = read_ws_frame(&mut s);
        if op == Some(Opcode::Close) {
            return u16::from_be_bytes([p[0], p[1]]);
        }
    }
}

#[test]
fn websocket_handshakes_and_close_frames_are_checked() {
    let relay = start(|c| c.limits.max_frame = 1024);
    for key in ["", "c2hvcnQ=", "not-base64-not-base64-!!"] {
        let raw = format!(
            "GET /ws HTTP/1.1\r\nHost: relay\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        );
        let got = raw_http(&relay, raw.as_bytes());
        assert!(got.starts_with("HTTP/1.1 400 "), "key {key:?}: {got}");
    }
    // Close codes RFC 6455 forbids, and a 1-byte close payload: 1002.
    assert_eq!(
        close_code_after(&relay, &ws_frame(Opcode::Close, &5u16.to_be_bytes())),
        1002
    );
    assert_eq!(
        close_code_after(&relay, &ws_frame(Opcode::Close, &1005u16.to_be_bytes())),
        1002
    );
    assert_eq!(
        close_code_after(&relay, &ws_frame(Opcode::Close, &[3])),
        1002
    );
    assert_eq!(
        close_code_after(&relay, &ws_frame(Opcode::Close, &1000u16.to_be_bytes())),
        1000
    );
    // A broken relay frame in a binary message: 4000 + bad_frame, and over
    // max_frame (but within the message bound): 4000 + too_large.
    assert_eq!(
        close_code_after(&relay, &ws_frame(Opcode::Binary, &[1, 2, 3])),
        4000 + ErrorCode::BadFrame as u16
    );
    assert_eq!(
        close_code_after(&relay, &ws_frame(Opcode::Binary, &[0u8; 1500])),
        4000 + ErrorCode::TooLarge as u16
    );
}

#[test]
fn a_second_relay_with_the_same_listeners_refuses_to_start_and_names_the_holder() {
    let first = start(|_| {});
    let mut cfg = common::test_config();
    cfg.listeners.tcp = first.tcp_addr();
    cfg.listeners.http = "127.0.0.1:0".parse().unwrap();
    let err = relay_shards::Relay::start(&cfg)
        .expect_err("the TCP port is taken")
        .to_string();
    let pid = format!("process {}", std::process::id());
    assert!(
        err.contains(&first.tcp_addr().to_string()) && err.contains(&pid),
        "{err}"
    );
    let mut cfg = common::test_config();
    cfg.listeners.http = first.http_addr().unwrap();
    let err = relay_shards::Relay::start(&cfg)
        .expect_err("the HTTP port is taken")
        .to_string();
    assert!(err.contains(&pid), "{err}");
    // The first relay is unharmed.
    let mut c = Client::hello(first.tcp_addr(), Form::Binary, "ctl-still");
    c.data("ctl-still", 1, true, b"me");
    c.expect(FrameType::Data);
    c.expect(FrameType::Ack);
}
