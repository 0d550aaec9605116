//! MQTT over WebSocket (`/mqtt` on the HTTP port) and the relay ending MQTT
//! connections (kick, takeover, shutdown), end to end with real clients
//! nobody here wrote: paho-mqtt over WebSocket and TCP, mosquitto_pub and
//! mosquitto_sub, against a two-shard relay on port 0, beside native
//! controllers and the HTTP API. tungstenite plays a client only where the
//! test needs bytes no MQTT client sends (packets split or packed across
//! WebSocket messages, malformed input).

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::proc::Proc;
use common::{Client, Form, addrs_on, http, start};
use relay_core::frame::{Flags, Frame, FrameType};
use relay_shards::Relay;

const SHARDS: usize = 2;

fn relay() -> Relay {
    start(|c| c.listeners.mqtt = Some("127.0.0.1:0".parse().unwrap()))
}

/// How a paho client reaches the relay.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Via {
    Tcp,
    Ws,
}

/// paho-mqtt (tests/mqtt/paho_client.py) over TCP or over WebSocket.
fn paho(r: &Relay, via: Via, id: &str, version: &str, args: &[&str]) -> Proc {
    let port = match via {
        Via::Tcp => r.mqtt_addr().expect("mqtt listener").port(),
        Via::Ws => r.http_addr().expect("http listener").port(),
    };
    paho_at(port, via, id, version, args, &[])
}

/// paho-mqtt on `port`, with more of its options in `env`.
fn paho_at(
    port: u16,
    via: Via,
    id: &str,
    version: &str,
    args: &[&str],
    env: &[(&str, &str)],
) -> Proc {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/mqtt/paho_client.py");
    let mut cmd = Command::new("python3");
    cmd.envs(env.iter().copied());
    cmd.arg(script)
        .arg("127.0.0.1")
        .arg(port.to_string())
        .arg(id)
        .arg(version)
        .args(args);
    if via == Via::Ws {
        cmd.env("MQTT_TRANSPORT", "websockets");
    }
    Proc::spawn(&mut cmd)
}

fn mosquitto_pub(r: &Relay, id: &str, topic: &str, payload: &str) {
    let s = Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p"])
        .arg(r.mqtt_addr().unwrap().port().to_string())
        .args(["-i", id, "-V", "mqttv311", "-q", "1"])
        .args(["-t", topic, "-m", payload])
        .status()
        .expect("mosquitto_pub runs");
    assert!(s.success(), "mosquitto_pub {topic}: {s}");
}

/// mosquitto_sub printing `topic payload` lines, exiting after `count`.
fn mosquitto_sub(r: &Relay, id: &str, filter: &str, count: u32) -> Proc {
    Proc::spawn(
        Command::new("mosquitto_sub")
            .args(["-h", "127.0.0.1", "-p"])
            .arg(r.mqtt_addr().unwrap().port().to_string())
            .args(["-i", id, "-V", "mqttv5", "-q", "1", "-v", "-W", "20"])
            .args(["-t", filter, "-C", &count.to_string()]),
    )
}

/// Runs `publish` every 300 ms until `sub` prints a line (a subscription
/// reaches the other shard just after SUBACK, docs/mqtt.md): at most 20 tries.
fn until_seen(sub: &Proc, mut publish: impl FnMut()) -> String {
    for _ in 0..20 {
        publish();
        if let Some(l) = sub.line(Duration::from_millis(300)) {
            return l;
        }
    }
    panic!("the subscriber never got the message");
}

fn metric(r: &Relay, name: &str) -> u64 {
    let (_, text) = http(r, "GET", "/metrics", None, None);
    text.as_str()
        .unwrap()
        .lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

#[test]
fn paho_over_websocket_reaches_mqtt_tcp_native_clients_and_the_api_both_ways() {
    let r = relay();
    for version in ["3", "5"] {
        // One WebSocket client per shard: the HTTP connection is accepted on
        // whichever shard the kernel picks and handed to its owner.
        for shard in 0..SHARDS {
            let tag = format!("{version}{shard}");
            let ws_id = addrs_on(&format!("wsc{tag}-"), shard, SHARDS, 1).remove(0);
            let ws_sub = paho(&r, Via::Ws, &ws_id, version, &["sub", "#", "1", "4"]);
            assert_eq!(ws_sub.until("CONNACK"), "CONNACK 0 0");
            assert_eq!(ws_sub.until("READY"), "READY 1");

            // MQTT over TCP -> MQTT over WebSocket.
            let tcp_pub = addrs_on(&format!("tcpp{tag}-"), 1 - shard, SHARDS, 1).remove(0);
            let l = until_seen(&ws_sub, || {
                mosquitto_pub(&r, &tcp_pub, &format!("plant/{tag}/temp"), "21.5")
            });
            assert_eq!(l, format!("MSG plant/{tag}/temp 1 0 21.5"));
            // Native DATA -> PUBLISH relay/from/<src>.
            let ctl_name = addrs_on(&format!("ctl{tag}-"), 1 - shard, SHARDS, 1).remove(0);
            let mut ctl = Client::hello(r.tcp_addr(), Form::Json, &ctl_name);
            ctl.data(&ws_id, 1, true, b"\"from-native\"");
            assert_eq!(ctl.expect(FrameType::Ack).seq, 1);
            assert_eq!(
                ws_sub.until("MSG"),
                format!("MSG relay/from/{ctl_name} 1 0 \"from-native\"")
            );
            // The HTTP API's send and group publish.
            let (s, v) = http(
                &r,
                "POST",
                "/api/v1/send",
                None,
                Some(&serde_json::json!({"dst": ws_id, "payload": "from-api", "src": "backend"})),
            );
            assert_eq!(s, 200, "{v}");
            assert_eq!(
                ws_sub.until("MSG"),
                "MSG relay/from/backend 1 0 \"from-api\""
            );
            let (s, v) = http(
                &r,
                "POST",
                &format!("/api/v1/groups/g{tag}/publish"),
                None,
                Some(&serde_json::json!({"payload": {"n": 1}, "src": "backend"})),
            );
            assert_eq!(s, 200, "{v}");
            assert_eq!(ws_sub.until("MSG"), format!("MSG g{tag} 1 0 {{\"n\":1}}"));

            // The API lists it as an MQTT client over WebSocket.
            let (s, v) = http(&r, "GET", &format!("/api/v1/clients/{ws_id}"), None, None);
            assert_eq!(s, 200, "{v}");
            assert_eq!(v["protocol"], "mqtt");
            assert_eq!(v["transport"], "websocket");
            assert_eq!(v["version"], if version == "5" { "5.0" } else { "3.1.1" });
            assert_eq!(v["shard"], shard);

            // MQTT over WebSocket -> MQTT over TCP, a native group member
            // and a native address.
            let tcp_sub_id = addrs_on(&format!("tcps{tag}-"), 1 - shard, SHARDS, 1).remove(0);
            let tcp_sub = mosquitto_sub(&r, &tcp_sub_id, &format!("up/{tag}"), 1);
            let ws_pub = addrs_on(&format!("wsp{tag}-"), shard, SHARDS, 1).remove(0);
            let l = until_seen(&tcp_sub, || {
                let mut p = paho(
                    &r,
                    Via::Ws,
                    &ws_pub,
                    version,
                    &["pub", &format!("up/{tag}"), "1", "from-ws"],
                );
                p.until("PUBLISHED");
                assert!(p.wait().success());
            });
            assert_eq!(l, format!("up/{tag} from-ws"));
            let mut j = Frame::new(FrameType::Join);
            j.dst = Bytes::from(format!("alarms{tag}"));
            j.seq = 2;
            j.flags = Flags(Flags::ACK_REQ);
            ctl.send(&j);
            assert_eq!(ctl.expect(FrameType::Ack).seq, 2);
            for (topic, payload) in [
                (format!("alarms{tag}"), "smoke"),
                (format!("relay/to/{ctl_name}"), "to-native"),
            ] {
                let mut p = paho(
                    &r,
                    Via::Ws,
                    &ws_pub,
                    version,
                    &["pub", &topic, "1", payload],
                );
                p.until("PUBLISHED");
                assert!(p.wait().success());
                let f = ctl.expect(FrameType::Data);
                assert_eq!(&f.src[..], ws_pub.as_bytes());
                assert_eq!(&f.payload[..], payload.as_bytes());
                assert_eq!(f.flags.group(), topic.starts_with("alarms"));
            }
        }
    }
    assert!(metric(&r, "relay_mqtt_connects_total") > 0);
}

#[test]
fn a_websocket_client_on_the_wrong_shard_is_handed_to_its_owner() {
    let r = relay();
    // The kernel spreads connections over the shards' listeners: connect
    // until one landed on the other shard and moved (at most 20 tries).
    let mut moved = false;
    for i in 0..20 {
        let before = metric(&r, "relay_handovers_total");
        let id = addrs_on(&format!("mv{i}-"), i % SHARDS, SHARDS, 1).remove(0);
        let sub = paho(
            &r,
            Via::Ws,
            &id,
            "5",
            &["sub", &format!("mv/{i}"), "1", "1"],
        );
        assert_eq!(sub.until("READY"), "READY 1");
        if metric(&r, "relay_handovers_total") == before {
            continue;
        }
        // Moved: served from its owner shard from then on.
        moved = true;
        let (_, v) = http(&r, "GET", &format!("/api/v1/clients/{id}"), None, None);
        assert_eq!(v["shard"], i % SHARDS);
        let l = until_seen(&sub, || {
            mosquitto_pub(&r, "mv-pub", &format!("mv/{i}"), "x")
        });
        assert_eq!(l, format!("MSG mv/{i} 1 0 x"));
        break;
    }
    assert!(moved, "no WebSocket connection was ever handed over");
}

#[test]
fn a_takeover_between_tcp_and_websocket_clients_with_the_same_id() {
    let r = relay();
    let watcher = paho(&r, Via::Tcp, "tk-watch", "5", &["sub", "wills/#", "1", "2"]);
    assert_eq!(watcher.until("READY"), "READY 1");
    for (first_via, second_via) in [(Via::Tcp, Via::Ws), (Via::Ws, Via::Tcp)] {
        let id = addrs_on(&format!("tk{first_via:?}-"), 1, SHARDS, 1).remove(0);
        let first = paho(&r, first_via, &id, "5", &["hold", "x/#", "1"]);
        assert_eq!(first.until("READY"), "READY 1");
        let second = paho(&r, second_via, &id, "5", &["sub", "x/#", "1", "1"]);
        assert_eq!(second.until("CONNACK"), "CONNACK 0 0");
        // DISCONNECT 0x8E (142) to the first, and its will goes out.
        assert_eq!(first.until("DISCONNECTED"), "DISCONNECTED 142");
        assert_eq!(watcher.until("MSG"), format!("MSG wills/{id} 1 0 gone"));
        // The second holds the id now.
        assert_eq!(second.until("READY"), "READY 1");
        let (_, v) = http(&r, "GET", &format!("/api/v1/clients/{id}"), None, None);
        let transport = if second_via == Via::Ws {
            "websocket"
        } else {
            "tcp"
        };
        assert_eq!(v["transport"], transport, "{v}");
        drop(first);
    }
}

/// A raw MQTT-over-WebSocket client (tungstenite), for bytes no MQTT
/// client sends.
struct RawWs {
    ws: tungstenite::WebSocket<TcpStream>,
    /// MQTT bytes received and not yet taken as packets.
    stream: Vec<u8>,
}

impl RawWs {
    fn connect(r: &Relay) -> RawWs {
        use tungstenite::client::IntoClientRequest;
        let addr = r.http_addr().unwrap();
        let mut req = format!("ws://{addr}/mqtt").into_client_request().unwrap();
        req.headers_mut()
            .insert("Sec-WebSocket-Protocol", "mqtt".parse().unwrap());
        let stream = TcpStream::connect(addr).unwrap();
        let (ws, resp) = tungstenite::client(req, stream).expect("websocket handshake");
        assert_eq!(resp.status().as_u16(), 101);
        assert_eq!(
            resp.headers()
                .get("sec-websocket-protocol")
                .map(|v| v.to_str().unwrap()),
            Some("mqtt")
        );
        ws.get_ref()
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        RawWs {
            ws,
            stream: Vec::new(),
        }
    }

    fn send(&mut self, bytes: &[u8]) {
        self.ws
            .send(tungstenite::Message::binary(bytes.to_vec()))
            .unwrap();
    }

    /// The next message (binary as `Ok`, a close as `Err(code)`), within 5 s.
    fn recv(&mut self) -> Option<Result<Vec<u8>, Option<u16>>> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match self.ws.read() {
                Ok(tungstenite::Message::Binary(b)) => return Some(Ok(b.to_vec())),
                Ok(tungstenite::Message::Close(c)) => {
                    return Some(Err(c.map(|c| u16::from(c.code))));
                }
                Ok(m) => panic!("unexpected message {m:?}"),
                Err(tungstenite::Error::Io(e))
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(_) => return Some(Err(None)),
            }
            if Instant::now() >= deadline {
                return None;
            }
        }
    }

    /// The next MQTT packet, whichever messages carry it (within 5 s).
    fn packet(&mut self) -> Vec<u8> {
        loop {
            if let Some(n) = whole_packet(&self.stream) {
                return self.stream.drain(..n).collect();
            }
            match self.recv() {
                Some(Ok(b)) => self.stream.extend(b),
                other => panic!("no MQTT packet: {other:?}"),
            }
        }
    }

    /// Whether the relay closes the WebSocket (within 5 s): the close code.
    fn closed(&mut self) -> Option<u16> {
        loop {
            match self.recv() {
                Some(Ok(_)) => {}
                Some(Err(code)) => return code.or(Some(0)),
                None => return None,
            }
        }
    }
}

/// The length of the whole MQTT packet at the head of `b`, if it is there.
fn whole_packet(b: &[u8]) -> Option<usize> {
    let (mut len, mut mult, mut i) = (0usize, 1usize, 1usize);
    loop {
        let byte = *b.get(i)?;
        len += (byte & 0x7f) as usize * mult;
        mult *= 128;
        i += 1;
        if byte & 0x80 == 0 {
            break;
        }
    }
    (b.len() >= i + len).then_some(i + len)
}

/// CONNECT (clean start, keep alive 30 s) for `id`.
fn connect_packet(id: &str, v5: bool) -> Vec<u8> {
    let mut p = Vec::new();
    p.extend_from_slice(b"\x00\x04MQTT");
    p.push(if v5 { 5 } else { 4 });
    p.extend_from_slice(&[0x02, 0, 30]);
    if v5 {
        p.push(0);
    }
    p.extend_from_slice(&(id.len() as u16).to_be_bytes());
    p.extend_from_slice(id.as_bytes());
    let mut pkt = vec![0x10, p.len() as u8];
    pkt.extend(p);
    pkt
}

#[test]
fn packets_may_span_websocket_messages_and_messages_may_hold_several() {
    let r = relay();
    for v5 in [false, true] {
        let id = format!("raw-ws-{v5}");
        let mut c = RawWs::connect(&r);
        // CONNECT in three messages, cut inside the fixed header and the body.
        let connect = connect_packet(&id, v5);
        c.send(&connect[..1]);
        c.send(&connect[1..7]);
        c.send(&connect[7..]);
        let ack = c.packet();
        assert_eq!(ack[0], 0x20, "CONNACK {ack:?}");
        // The return code (3.1.1) or reason code (5) is the fourth byte.
        assert_eq!(ack[3], 0, "accepted: {ack:?}");
        // A WebSocket ping is answered with a pong of its payload.
        c.ws.send(tungstenite::Message::Ping(b"hi".to_vec().into()))
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match c.ws.read() {
                Ok(tungstenite::Message::Pong(p)) => {
                    assert_eq!(&p[..], b"hi");
                    break;
                }
                Ok(m) => panic!("unexpected {m:?}"),
                Err(tungstenite::Error::Io(e)) if Instant::now() < deadline => {
                    assert!(matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ));
                }
                Err(e) => panic!("no pong: {e}"),
            }
        }
        // SUBSCRIBE and PINGREQ in one message, with the head of a PUBLISH
        // (QoS 0 to the subscribed topic) whose rest comes next.
        let mut sub = vec![0x82];
        let mut body = vec![0, 7];
        if v5 {
            body.push(0);
        }
        body.extend_from_slice(b"\x00\x03w/x\x01");
        sub.push(body.len() as u8);
        sub.extend(body);
        let mut publish = vec![0x30];
        let mut pb = b"\x00\x03w/x".to_vec();
        if v5 {
            pb.push(0);
        }
        pb.extend_from_slice(b"hello");
        publish.push(pb.len() as u8);
        publish.extend(pb);
        let mut msg = sub.clone();
        msg.extend_from_slice(b"\xc0\x00");
        msg.extend_from_slice(&publish[..4]);
        c.send(&msg);
        let suback = c.packet();
        assert_eq!((suback[0], suback[suback.len() - 1]), (0x90, 1), "SUBACK");
        assert_eq!(c.packet(), vec![0xd0, 0x00], "PINGRESP");
        c.send(&publish[4..]);
        let p = c.packet();
        assert_eq!(p[0] & 0xf0, 0x30, "its own PUBLISH back: {p:?}");
        assert!(p.ends_with(b"hello"));
        // DISCONNECT: the relay closes the WebSocket normally.
        c.send(b"\xe0\x00");
        assert_eq!(c.closed(), Some(1000));
    }
}

#[test]
fn malformed_input_over_websocket_closes_only_that_connection() {
    let r = relay();
    let by = paho(&r, Via::Ws, "ws-bystander", "5", &["sub", "t/#", "1", "1"]);
    assert_eq!(by.until("READY"), "READY 1");
    let mut ctl = Client::hello(r.tcp_addr(), Form::Binary, "ctl-by");

    // A reserved packet type after CONNECT (v5): DISCONNECT 0x81, closed.
    let mut c = RawWs::connect(&r);
    c.send(&connect_packet("bad-ws-1", true));
    assert_eq!(c.packet()[0], 0x20);
    c.send(b"\x00\x00");
    let d = c.packet();
    assert_eq!((d[0], d[2]), (0xe0, 0x81), "{d:?}");
    assert!(c.closed().is_some());
    // A wildcard in a PUBLISH topic (3.1.1): closed without a word.
    let mut c = RawWs::connect(&r);
    c.send(&connect_packet("bad-ws-2", false));
    assert_eq!(c.packet()[0], 0x20);
    c.send(b"\x30\x05\x00\x03t/#");
    assert_eq!(c.closed(), Some(1002));
    // Garbage before CONNECT: closed.
    let mut c = RawWs::connect(&r);
    c.send(b"\xff\xff\xff\xff\xff");
    assert!(c.closed().is_some());
    // A text message: MQTT rides binary messages only (1003).
    let mut c = RawWs::connect(&r);
    c.send(&connect_packet("bad-ws-3", true));
    assert_eq!(c.packet()[0], 0x20);
    c.ws.send(tungstenite::Message::text("{}")).unwrap();
    assert_eq!(c.closed(), Some(1003));
    // A message over the maximum packet size: 1009.
    let mut c = RawWs::connect(&r);
    c.send(&vec![0u8; 300 * 1024]);
    assert_eq!(c.closed(), Some(1009));

    // Everyone else is still served.
    mosquitto_pub(&r, "pub-after", "t/ok", "fine");
    assert_eq!(by.until("MSG"), "MSG t/ok 1 0 fine");
    ctl.data("ctl-by", 1, true, b"still here");
    assert_eq!(&ctl.expect(FrameType::Data).payload[..], b"still here");
}

/// The raw answer to an HTTP request (status line, headers and body).
fn raw_http(addr: SocketAddr, req: &str) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(req.as_bytes()).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn an_upgrade_to_mqtt_must_offer_the_mqtt_subprotocol_and_needs_mqtt_on() {
    let upgrade = |protocols: &str| {
        format!(
            "GET /mqtt HTTP/1.1\r\nHost: relay\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{protocols}\r\n"
        )
    };
    let r = relay();
    let addr = r.http_addr().unwrap();
    for offer in ["", "Sec-WebSocket-Protocol: mqttv3.1, chat\r\n"] {
        let resp = raw_http(addr, &upgrade(offer));
        assert!(resp.starts_with("HTTP/1.1 400 "), "{resp}");
        assert!(resp.contains("Sec-WebSocket-Protocol: mqtt"), "{resp}");
    }
    let resp = raw_http(addr, &upgrade("Sec-WebSocket-Protocol: chat, mqtt\r\n"));
    assert!(resp.starts_with("HTTP/1.1 101 "), "{resp}");
    assert!(resp.contains("sec-websocket-protocol: mqtt\r\n"), "{resp}");
    // Without [listeners] mqtt there is no MQTT, over WebSocket either.
    let off = start(|_| {});
    let resp = raw_http(
        off.http_addr().unwrap(),
        &upgrade("Sec-WebSocket-Protocol: mqtt\r\n"),
    );
    assert!(resp.starts_with("HTTP/1.1 404 "), "{resp}");
    let c = paho(&off, Via::Ws, "ws-off", "5", &["sub", "a", "1", "1"]);
    let line = c.line(Duration::from_secs(5));
    assert!(
        line.as_deref().is_none_or(|l| !l.starts_with("CONNACK")),
        "{line:?}"
    );
}

#[test]
fn kicking_an_mqtt5_client_sends_disconnect_0x98_and_its_will_goes_out() {
    let r = relay();
    let watcher = paho(
        &r,
        Via::Tcp,
        "kick-watch",
        "5",
        &["sub", "wills/#", "1", "4"],
    );
    assert_eq!(watcher.until("READY"), "READY 1");
    for (via, version) in [
        (Via::Tcp, "5"),
        (Via::Ws, "5"),
        (Via::Tcp, "3"),
        (Via::Ws, "3"),
    ] {
        let id = addrs_on(&format!("kick{version}{via:?}-"), 1, SHARDS, 1).remove(0);
        let holder = paho(&r, via, &id, version, &["hold", "x", "1"]);
        assert_eq!(holder.until("READY"), "READY 1");
        let (s, v) = http(&r, "DELETE", &format!("/api/v1/clients/{id}"), None, None);
        assert_eq!(s, 200, "{v}");
        let d = holder.until("DISCONNECTED");
        if version == "5" {
            // Administrative action (0x98 = 152).
            assert_eq!(d, "DISCONNECTED 152", "{via:?}");
        } else {
            assert_ne!(d, "DISCONNECTED 152", "{via:?}: 3.1.1 has no DISCONNECT");
        }
        assert_eq!(watcher.until("MSG"), format!("MSG wills/{id} 1 0 gone"));
    }
}

fn read_packet(s: &mut TcpStream) -> Option<Vec<u8>> {
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = Vec::new();
    loop {
        if let Some(n) = whole_packet(&buf) {
            return Some(buf.drain(..n).collect());
        }
        let mut b = [0u8; 256];
        match s.read(&mut b) {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&b[..n]),
        }
    }
}

fn raw_tcp(r: &Relay, id: &str, v5: bool) -> TcpStream {
    let mut s = TcpStream::connect(r.mqtt_addr().unwrap()).unwrap();
    s.write_all(&connect_packet(id, v5)).unwrap();
    let ack = read_packet(&mut s).expect("CONNACK");
    assert_eq!(ack[0], 0x20);
    s
}

#[test]
fn the_relay_ends_mqtt_connections_with_the_reason_code_3_1_1_without_one() {
    let r = relay();
    // Kick: v5 gets exactly DISCONNECT 0x98, then the socket closes; 3.1.1
    // is closed without a byte.
    let mut v5 = raw_tcp(&r, "rk-5", true);
    let mut v3 = raw_tcp(&r, "rk-3", false);
    for id in ["rk-5", "rk-3"] {
        let (s, v) = http(&r, "DELETE", &format!("/api/v1/clients/{id}"), None, None);
        assert_eq!(s, 200, "{v}");
    }
    assert_eq!(read_packet(&mut v5), Some(vec![0xe0, 0x01, 0x98]));
    assert_eq!(read_packet(&mut v5), None, "closed after DISCONNECT");
    assert_eq!(read_packet(&mut v3), None, "3.1.1: closed, no DISCONNECT");
    // A native controller taking the address: DISCONNECT 0x8E.
    let mut v5 = raw_tcp(&r, "rk-taken", true);
    let _ctl = Client::hello(r.tcp_addr(), Form::Binary, "rk-taken");
    assert_eq!(read_packet(&mut v5), Some(vec![0xe0, 0x01, 0x8e]));
    assert_eq!(read_packet(&mut v5), None);
    // The relay shutting down: DISCONNECT 0x8B, over TCP and WebSocket.
    let mut v5 = raw_tcp(&r, "rk-stop", true);
    let mut ws = RawWs::connect(&r);
    ws.send(&connect_packet("rk-stop-ws", true));
    assert_eq!(ws.packet()[0], 0x20);
    let paho5 = paho(&r, Via::Ws, "rk-stop-paho", "5", &["hold", "x", "1"]);
    assert_eq!(paho5.until("READY"), "READY 1");
    r.stop();
    assert_eq!(read_packet(&mut v5), Some(vec![0xe0, 0x01, 0x8b]));
    assert_eq!(read_packet(&mut v5), None);
    assert_eq!(ws.packet(), vec![0xe0, 0x01, 0x8b]);
    assert_eq!(ws.closed(), Some(1001));
    assert_eq!(paho5.until("DISCONNECTED"), "DISCONNECTED 139");
    r.join().unwrap();
}

#[test]
fn paho_over_wss_on_the_https_port() {
    // A CA and a server certificate for 127.0.0.1 it signed.
    let dir = std::env::temp_dir().join(format!("relay-mqtt-wss-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "relay test CA mqtt-wss");
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, rcgen::KeyPair::generate().unwrap())
        .unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()])
        .unwrap()
        .signed_by(&key, &ca)
        .unwrap();
    let (cert_file, key_file, ca_file) = (
        dir.join("cert.pem"),
        dir.join("key.pem"),
        dir.join("ca.pem"),
    );
    std::fs::write(&cert_file, cert.pem()).unwrap();
    std::fs::write(&key_file, key.serialize_pem()).unwrap();
    std::fs::write(&ca_file, ca.pem()).unwrap();
    let r = start(|c| {
        c.listeners.mqtt = Some("127.0.0.1:0".parse().unwrap());
        c.listeners.http_tls = Some("127.0.0.1:0".parse().unwrap());
        c.tls.cert_file = Some(cert_file.display().to_string());
        c.tls.key_file = Some(key_file.display().to_string());
    });
    let https = r.http_tls_addr().expect("HTTPS listener").port();
    let ca_env = [
        ("MQTT_TRANSPORT", "websockets"),
        ("MQTT_CA", ca_file.to_str().unwrap()),
    ];
    for version in ["3", "5"] {
        let id = format!("wss-sub-{version}");
        let sub = paho_at(
            https,
            Via::Ws,
            &id,
            version,
            &["sub", "secure/#", "1", "2"],
            &ca_env,
        );
        assert_eq!(sub.until("READY"), "READY 1");
        let l = until_seen(&sub, || {
            mosquitto_pub(&r, "wss-tcp-pub", "secure/a", "over-tls")
        });
        assert_eq!(l, "MSG secure/a 1 0 over-tls");
        let topic = format!("secure/{version}");
        let mut p = paho_at(
            https,
            Via::Ws,
            &format!("wss-pub-{version}"),
            version,
            &["pub", &topic, "1", "from-wss"],
            &ca_env,
        );
        p.until("PUBLISHED");
        assert!(p.wait().success());
        assert_eq!(sub.until("MSG"), format!("MSG {topic} 1 0 from-wss"));
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_websocket_close_without_disconnect_sends_the_will() {
    let r = relay();
    let watcher = paho(
        &r,
        Via::Tcp,
        "wsclose-watch",
        "5",
        &["sub", "wills/#", "1", "1"],
    );
    assert_eq!(watcher.until("READY"), "READY 1");
    // CONNECT (v5, clean start, will QoS 0 on wills/ws-closer "bye").
    let id = "ws-closer";
    let mut p = b"\x00\x04MQTT\x05\x06\x00\x1e\x00".to_vec();
    p.extend_from_slice(&(id.len() as u16).to_be_bytes());
    p.extend_from_slice(id.as_bytes());
    p.push(0); // will properties
    for field in [&b"wills/ws-closer"[..], b"bye"] {
        p.extend_from_slice(&(field.len() as u16).to_be_bytes());
        p.extend_from_slice(field);
    }
    let mut connect = vec![0x10, p.len() as u8];
    connect.extend(p);
    let mut c = RawWs::connect(&r);
    c.send(&connect);
    let ack = c.packet();
    assert_eq!((ack[0], ack[3]), (0x20, 0), "{ack:?}");
    // The browser tab goes away: a WebSocket close, no DISCONNECT.
    c.ws.close(None).unwrap();
    assert_eq!(c.closed(), Some(1000), "the close is answered");
    assert_eq!(watcher.until("MSG"), "MSG wills/ws-closer 0 0 bye");
}

#[test]
fn a_persistent_session_moves_between_websocket_and_tcp() {
    let r = relay();
    for version in ["3", "5"] {
        for (away, back) in [(Via::Ws, Via::Tcp), (Via::Tcp, Via::Ws)] {
            let id = addrs_on(&format!("ps{version}{away:?}-"), 1, SHARDS, 1).remove(0);
            let topic = format!("ps/{version}/{away:?}");
            // Subscribe with a persistent session, then go away (no DISCONNECT).
            let mut first = paho(&r, away, &id, version, &["sub", "ps/#", "1", "0", "0"]);
            assert_eq!(first.until("CONNACK"), "CONNACK 0 0");
            assert_eq!(first.until("READY"), "READY 1");
            assert!(first.wait().success());
            mosquitto_pub(&r, "ps-pub", &topic, "while-away");
            let again = paho(&r, back, &id, version, &["sub", "ps/#", "1", "1", "0"]);
            assert_eq!(again.until("CONNACK"), "CONNACK 0 1", "session present");
            assert_eq!(again.until("MSG"), format!("MSG {topic} 1 0 while-away"));
        }
    }
}
