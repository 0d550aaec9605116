//! What an attacker and a hostile network can and cannot do to the relay:
//! real sockets, two shards, port 0. Each test is one attack that used to
//! work.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use common::{Client, Form, addrs_on, start};
use relay_core::frame::{Flags, Frame, FrameType};

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
fn ws_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mask = [0x11, 0x22, 0x33, 0x44];
    let mut v = vec![0x80 | opcode];
    if payload.len() < 126 {
        v.push(0x80 | payload.len() as u8);
    } else {
        v.push(0x80 | 126);
        v.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    }
    v.extend_from_slice(&mask);
    v.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i & 3]));
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
    let batch: Vec<u8> = (0..500).flat_map(|_| ws_frame(0x9, &[7u8; 125])).collect();
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
