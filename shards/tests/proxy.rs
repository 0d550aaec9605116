//! The PROXY protocol v2 on listeners behind a load balancer
//! (`[listeners] proxy_protocol`): the client address a header names is the
//! one `/api/v1/clients` shows; a connection without a valid header, or
//! whose header does not arrive in time, is closed.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{Client, Form, start};
use relay_core::frame::{Flags, Frame, FrameType};
use relay_core::proxy;
use relay_shards::Relay;

fn hello_frame(addr: &str) -> Frame {
    let mut f = Frame::new(FrameType::Hello);
    f.src = Bytes::copy_from_slice(addr.as_bytes());
    f.payload = Bytes::from_static(b"{}");
    f.flags = Flags(Flags::JSON);
    f
}

/// GET `path` on the HTTP port, through a balancer (a PROXY header first)
/// when `proxied`: the body as JSON.
fn get(relay: &Relay, path: &str, proxied: bool) -> serde_json::Value {
    let http = relay.http_addr().unwrap();
    let mut s = TcpStream::connect(http).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    if proxied {
        s.write_all(&proxy::encode("192.0.2.200:9999".parse().unwrap(), http))
            .unwrap();
    }
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: relay\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let text = String::from_utf8_lossy(&raw).into_owned();
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    serde_json::from_str(body).unwrap_or(serde_json::Value::Null)
}

/// The client `addr` as `/api/v1/clients` lists it (waits up to 10 s).
fn listed(relay: &Relay, addr: &str, proxied: bool) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let v = get(relay, "/api/v1/clients", proxied);
        if let Some(c) = v["items"]
            .as_array()
            .and_then(|a| a.iter().find(|c| c["addr"] == addr))
        {
            return c.clone();
        }
        assert!(Instant::now() < deadline, "{addr} never listed: {v}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Whether the relay closes `s` (EOF or reset) within 5 s, sending nothing.
fn closed_silently(s: &mut TcpStream) -> bool {
    s.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut tmp = [0u8; 256];
    while Instant::now() < deadline {
        match s.read(&mut tmp) {
            Ok(0) => return true,
            Ok(n) => panic!("the relay answered {:?}", &tmp[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return true,
        }
    }
    false
}

/// Controllers behind a balancer: the header's source address (IPv4 or
/// IPv6) is the client's `remote` in the API, across shards, and the
/// connection then speaks the protocol as usual.
#[test]
fn a_proxied_controller_shows_the_address_its_header_names() {
    let relay = start(|c| c.listeners.proxy_protocol = vec!["tcp".into()]);
    let tcp = relay.tcp_addr();
    let mut clients = Vec::new();
    for (addr, fake) in [
        ("px-v4", "203.0.113.7:40001"),
        ("px-v6", "[2001:db8::42]:40002"),
        ("px-other-shard", "198.51.100.9:40003"),
    ] {
        let fake: SocketAddr = fake.parse().unwrap();
        let mut s = TcpStream::connect(tcp).unwrap();
        // The header, then the hello in the same write: nothing of the hello
        // may be taken for the header.
        let mut out = proxy::encode(fake, tcp);
        let mut hello = bytes::BytesMut::new();
        relay_core::codec::encode(&hello_frame(addr), &mut hello);
        out.extend_from_slice(&hello);
        s.write_all(&out).unwrap();
        let mut c = Client::from_stream(s, Form::Binary);
        c.addr = addr.into();
        c.expect(FrameType::Welcome);
        assert_eq!(listed(&relay, addr, false)["remote"], fake.to_string());
        clients.push(c);
    }
    let v = get(&relay, "/api/v1/clients/px-v6", false);
    assert_eq!(v["remote"].as_str(), Some("[2001:db8::42]:40002"));
    clients[0].data("px-v6", 1, true, b"through the balancer");
    clients[0].expect(FrameType::Ack);
    assert_eq!(
        &clients[1].expect(FrameType::Data).payload[..],
        b"through the balancer"
    );
}

/// No header, a garbled one, a PROXY v1 text line, or a header cut short:
/// closed without an answer (the last at `proxy_header_timeout_ms`).
#[test]
fn a_connection_without_a_valid_header_is_closed() {
    let relay = start(|c| {
        c.listeners.proxy_protocol = vec!["tcp".into(), "http".into()];
        c.listeners.proxy_header_timeout_ms = 300;
        c.limits.hello_timeout_ms = 30_000;
    });
    let tcp = relay.tcp_addr();
    let mut hello = bytes::BytesMut::new();
    relay_core::codec::encode(&hello_frame("px-none"), &mut hello);
    let mut bad_version = proxy::encode("192.0.2.1:1".parse().unwrap(), tcp);
    bad_version[12] = 0x11;
    let cases: [(&str, Vec<u8>); 4] = [
        ("no header", hello.to_vec()),
        ("bad version", bad_version),
        (
            "v1 text",
            b"PROXY TCP4 192.0.2.1 10.0.0.1 1 7000\r\n".to_vec(),
        ),
        (
            "cut short",
            proxy::encode("192.0.2.1:1".parse().unwrap(), tcp)[..20].to_vec(),
        ),
    ];
    for (what, bytes) in cases {
        let mut s = TcpStream::connect(tcp).unwrap();
        s.write_all(&bytes).unwrap();
        assert!(closed_silently(&mut s), "{what}: not closed");
    }
    // The HTTP port too: a plain request without the header.
    let mut s = TcpStream::connect(relay.http_addr().unwrap()).unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    assert!(closed_silently(&mut s), "http without a header: not closed");
    // Nobody got in; through the balancer the API answers.
    let v = get(&relay, "/api/v1/clients", true);
    assert_eq!(v["items"].as_array().map(Vec::len), Some(0), "{v}");
}

/// A browser behind a balancer: the WebSocket connection's `remote` is
/// the header's source.
#[test]
fn a_proxied_browser_shows_the_address_its_header_names() {
    let relay = start(|c| c.listeners.proxy_protocol = vec!["http".into()]);
    let http = relay.http_addr().unwrap();
    let fake: SocketAddr = "192.0.2.77:51234".parse().unwrap();
    let mut s = TcpStream::connect(http).unwrap();
    s.write_all(&proxy::encode(fake, http)).unwrap();
    let url = format!("ws://{http}/ws?addr=web-px&role=browser");
    let (mut ws, resp) = tungstenite::client(url, s).expect("websocket handshake");
    assert_eq!(resp.status().as_u16(), 101);
    let welcome = ws.read().unwrap();
    assert!(welcome.to_string().contains("welcome"), "{welcome}");
    assert_eq!(listed(&relay, "web-px", true)["remote"], fake.to_string());
}
