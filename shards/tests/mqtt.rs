//! MQTT clients end to end: real clients nobody here wrote (mosquitto_pub
//! and mosquitto_sub, paho-mqtt, rumqttc) against a two-shard relay on
//! port 0, talking to each other and to native controllers.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
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

fn mqtt_port(r: &Relay) -> String {
    r.mqtt_addr().expect("mqtt listener").port().to_string()
}

fn paho(r: &Relay, id: &str, version: &str, args: &[&str], auth: Option<(&str, &str)>) -> Proc {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/mqtt/paho_client.py");
    let mut cmd = Command::new("python3");
    cmd.arg(script)
        .arg("127.0.0.1")
        .arg(mqtt_port(r))
        .arg(id)
        .arg(version)
        .args(args);
    if let Some((u, p)) = auth {
        cmd.env("MQTT_USER", u).env("MQTT_PASS", p);
    }
    Proc::spawn(&mut cmd)
}

/// mosquitto_sub printing `topic payload` lines, exiting after `count`.
fn mosquitto_sub(r: &Relay, id: &str, version: &str, filter: &str, count: u32) -> Proc {
    Proc::spawn(
        Command::new("mosquitto_sub")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &mqtt_port(r),
                "-i",
                id,
                "-V",
                version,
            ])
            .args(["-t", filter, "-q", "1", "-v", "-W", "20"])
            .args(["-C", &count.to_string()]),
    )
}

fn mosquitto_pub(r: &Relay, id: &str, version: &str, topic: &str, payload: &str, qos: u8) {
    let s = Command::new("mosquitto_pub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &mqtt_port(r),
            "-i",
            id,
            "-V",
            version,
        ])
        .args(["-t", topic, "-m", payload, "-q", &qos.to_string()])
        .status()
        .expect("mosquitto_pub runs");
    assert!(s.success(), "mosquitto_pub {topic}: {s}");
}

/// Publishes with mosquitto_pub every 300 ms until `sub` prints a line (a
/// mosquitto_sub has no "subscribed" signal): at most 20 tries.
fn publish_until_seen(
    r: &Relay,
    sub: &Proc,
    id: &str,
    version: &str,
    topic: &str,
    payload: &str,
    qos: u8,
) -> String {
    for _ in 0..20 {
        mosquitto_pub(r, id, version, topic, payload, qos);
        if let Some(l) = sub.line(Duration::from_millis(300)) {
            return l;
        }
    }
    panic!("the subscriber never got {topic}");
}

#[test]
fn mosquitto_clients_publish_and_subscribe_across_shards_in_both_versions() {
    let r = relay();
    for (version, qos) in [
        ("mqttv311", 0),
        ("mqttv311", 1),
        ("mqttv5", 0),
        ("mqttv5", 1),
    ] {
        // Subscriber and publisher on each pair of shards.
        for (ss, ps) in [(0, 0), (0, 1), (1, 0)] {
            let sub_id =
                addrs_on(&format!("sub-{version}-{qos}-{ss}{ps}-"), ss, SHARDS, 1).remove(0);
            let pub_id =
                addrs_on(&format!("pub-{version}-{qos}-{ss}{ps}-"), ps, SHARDS, 1).remove(0);
            let mut sub = mosquitto_sub(&r, &sub_id, version, "sensors/+/temp", 1);
            let l = publish_until_seen(&r, &sub, &pub_id, version, "sensors/k7/temp", "21.5", qos);
            assert_eq!(l, "sensors/k7/temp 21.5", "{version} qos {qos} {ss}->{ps}");
            assert!(sub.wait().success());
        }
    }
}

#[test]
fn paho_clients_qos1_both_versions_with_a_wildcard_subscription() {
    let r = relay();
    for version in ["3", "5"] {
        let sub_id = addrs_on(&format!("paho-s{version}-"), 1, SHARDS, 1).remove(0);
        let pub_id = addrs_on(&format!("paho-p{version}-"), 0, SHARDS, 1).remove(0);
        let sub = paho(&r, &sub_id, version, &["sub", "plant/#", "1", "2"], None);
        assert_eq!(sub.until("CONNACK"), "CONNACK 0 0");
        assert_eq!(sub.until("READY"), "READY 1");
        for (i, topic) in ["plant/a", "plant/b/c"].iter().enumerate() {
            let mut p = paho(
                &r,
                &pub_id,
                version,
                &["pub", topic, "1", &format!("m{i}")],
                None,
            );
            assert_eq!(p.until("PUBLISHED"), "PUBLISHED");
            assert!(p.wait().success());
            assert_eq!(sub.until("MSG"), format!("MSG {topic} 1 0 m{i}"));
        }
    }
}

/// rumqttc (sync client) from Rust, v5: CONNECT, SUBSCRIBE, PUBLISH QoS 1.
#[test]
fn rumqttc_v5_subscribes_and_gets_its_own_qos1_publish_back() {
    use rumqttc::v5::mqttbytes::QoS;
    use rumqttc::v5::mqttbytes::v5::Packet;
    use rumqttc::v5::{Client as V5, Event, MqttOptions};
    let r = relay();
    let port: u16 = mqtt_port(&r).parse().unwrap();
    let id = addrs_on("rq-", 1, SHARDS, 1).remove(0);
    let mut o = MqttOptions::new(id, "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(10));
    let (client, mut conn) = V5::new(o, 16);
    client.subscribe("rq/topic", QoS::AtLeastOnce).unwrap();
    client
        .publish("rq/topic", QoS::AtLeastOnce, false, "hello")
        .unwrap();
    let (mut acked, mut got) = (false, None);
    for ev in conn.iter().take(20) {
        match ev {
            Ok(Event::Incoming(Packet::PubAck(_))) => acked = true,
            Ok(Event::Incoming(Packet::Publish(p))) => {
                got = Some((p.topic.clone(), p.payload.clone(), p.qos));
            }
            Ok(_) => {}
            Err(e) => panic!("{e}"),
        }
        if acked && got.is_some() {
            break;
        }
    }
    assert!(acked, "PUBACK");
    let (t, p, q) = got.expect("its own message back");
    assert_eq!(&t[..], b"rq/topic");
    assert_eq!(&p[..], b"hello");
    assert_eq!(q, QoS::AtLeastOnce);
}

#[test]
fn native_and_mqtt_clients_reach_each_other_both_ways() {
    let r = relay();
    let ctl_name = addrs_on("ctl-", 0, SHARDS, 1).remove(0);
    let mq_id = addrs_on("mq-", 1, SHARDS, 1).remove(0);
    let mut ctl = Client::hello(r.tcp_addr(), Form::Json, &ctl_name);
    let sub = paho(&r, &mq_id, "5", &["sub", "relay/from/#", "1", "3"], None);
    assert_eq!(sub.until("READY"), "READY 1");
    // Native DATA to the MQTT client's address: PUBLISH on relay/from/<src>.
    ctl.data(&mq_id, 1, true, b"\"ping-from-native\"");
    assert_eq!(ctl.expect(FrameType::Ack).seq, 1);
    assert_eq!(
        sub.until("MSG"),
        format!("MSG relay/from/{ctl_name} 1 0 \"ping-from-native\"")
    );
    // The HTTP API's send reaches it the same way.
    let (s, v) = http(
        &r,
        "POST",
        "/api/v1/send",
        None,
        Some(&serde_json::json!({"dst": mq_id, "payload": "from-api", "src": "backend"})),
    );
    assert_eq!(s, 200, "{v}");
    // The API's JSON payload arrives as its JSON text.
    assert_eq!(sub.until("MSG"), "MSG relay/from/backend 1 0 \"from-api\"");
    // An MQTT client sends to an address by publishing to relay/to/<dst>.
    let pub_id = addrs_on("mqp-", 0, SHARDS, 1).remove(0);
    let mut p = paho(
        &r,
        &pub_id,
        "3",
        &["pub", &format!("relay/to/{ctl_name}"), "1", "to-native"],
        None,
    );
    p.until("PUBLISHED");
    assert!(p.wait().success());
    let f = ctl.expect(FrameType::Data);
    assert_eq!(&f.src[..], pub_id.as_bytes());
    assert_eq!(&f.payload[..], b"to-native");
    assert!(!f.flags.group());

    // Groups are topics: an MQTT PUBLISH to T reaches native members of T...
    let mut j = Frame::new(FrameType::Join);
    j.dst = Bytes::from_static(b"alarms");
    j.seq = 2;
    j.flags = Flags(Flags::ACK_REQ);
    ctl.send(&j);
    assert_eq!(ctl.expect(FrameType::Ack).seq, 2);
    let mut p = paho(&r, &pub_id, "5", &["pub", "alarms", "1", "smoke"], None);
    p.until("PUBLISHED");
    assert!(p.wait().success());
    let f = ctl.expect(FrameType::Data);
    assert!(f.flags.group());
    assert_eq!(&f.dst[..], b"alarms");
    assert_eq!(&f.src[..], pub_id.as_bytes());
    assert_eq!(&f.payload[..], b"smoke");
    // ...and a native PUBLISH to group G reaches MQTT filters matching G.
    let sub2_id = addrs_on("mqs-", 0, SHARDS, 1).remove(0);
    let sub2 = paho(&r, &sub2_id, "3", &["sub", "+", "1", "1"], None);
    assert_eq!(sub2.until("READY"), "READY 1");
    let mut pf = Frame::new(FrameType::Publish);
    pf.dst = Bytes::from_static(b"alarms");
    pf.payload = Bytes::from_static(b"\"fire\"");
    pf.flags = Flags(Flags::ACK_REQ | Flags::JSON);
    let mut ctl2 = Client::hello(r.tcp_addr(), Form::Json, "ctl-2");
    // A new filter reaches the other shard over the mesh just after SUBACK
    // (docs/mqtt.md): publish until it is seen, at most 20 times.
    let mut seen = None;
    for seq in 3..23 {
        pf.seq = seq;
        ctl2.send(&pf);
        assert_eq!(ctl2.expect(FrameType::Ack).seq, seq);
        seen = sub2.line(Duration::from_millis(300));
        if seen.is_some() {
            break;
        }
    }
    assert_eq!(seen.as_deref(), Some("MSG alarms 1 0 \"fire\""));
}

#[test]
fn a_second_connection_with_the_same_id_takes_over_with_0x8e() {
    let r = relay();
    let id = addrs_on("twin-", 1, SHARDS, 1).remove(0);
    let first = paho(&r, &id, "5", &["hold", "x/#", "1"], None);
    assert_eq!(first.until("READY"), "READY 1");
    let second = paho(&r, &id, "5", &["sub", "x/#", "1", "0"], None);
    assert_eq!(second.until("CONNACK"), "CONNACK 0 0");
    // paho reports DISCONNECT's reason code 0x8E (142).
    assert_eq!(first.until("DISCONNECTED"), "DISCONNECTED 142");
}

#[test]
fn hmac_auth_takes_the_device_token_or_the_api_token_as_password() {
    let secret = "0123456789abcdef0123456789abcdef";
    let r = start(|c| {
        c.listeners.mqtt = Some("127.0.0.1:0".parse().unwrap());
        c.auth.mode = relay_config::AuthMode::Hmac;
        c.auth.secret = secret.into();
        c.http.api_token = Some("svc-token-0123456789".into());
    });
    let id = addrs_on("dev-", 0, SHARDS, 1).remove(0);
    let token = relay_core::auth::token_for(secret.as_bytes(), id.as_bytes());
    let ok = paho(&r, &id, "5", &["sub", "a", "1", "0"], Some(("any", &token)));
    assert_eq!(ok.until("CONNACK"), "CONNACK 0 0");
    let svc = paho(
        &r,
        "svc-1",
        "3",
        &["sub", "a", "1", "0"],
        Some(("svc", "svc-token-0123456789")),
    );
    assert_eq!(svc.until("CONNACK"), "CONNACK 0 0");
    // A wrong password: 0x86 (v5); 3.1.1 gets return code 4, which paho
    // reports as the same reason (134).
    let bad = paho(&r, &id, "5", &["sub", "a", "1", "0"], Some(("any", "nope")));
    assert_eq!(bad.until("CONNACK"), "CONNACK 134 0");
    let bad = paho(&r, &id, "3", &["sub", "a", "1", "0"], None);
    assert_eq!(bad.until("CONNACK"), "CONNACK 134 0");
}

/// Reads one MQTT packet's bytes (fixed header and body) within 5 s, or
/// `None` when the socket closed.
fn read_packet(s: &mut TcpStream) -> Option<Vec<u8>> {
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut first = [0u8; 1];
    if s.read_exact(&mut first).is_err() {
        return None;
    }
    let mut out = vec![first[0]];
    let (mut len, mut mult) = (0usize, 1usize);
    loop {
        let mut b = [0u8; 1];
        s.read_exact(&mut b).ok()?;
        out.push(b[0]);
        len += (b[0] & 0x7f) as usize * mult;
        mult *= 128;
        if b[0] & 0x80 == 0 {
            break;
        }
    }
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).ok()?;
    out.extend(body);
    Some(out)
}

fn closed(s: &mut TcpStream) -> bool {
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut b = [0u8; 16];
    matches!(s.read(&mut b), Ok(0) | Err(_))
}

fn raw_connect(addr: SocketAddr, id: &str, v5: bool) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    let mut p = Vec::new();
    p.extend_from_slice(b"\x00\x04MQTT");
    p.push(if v5 { 5 } else { 4 });
    p.push(0x02);
    p.extend_from_slice(&[0, 30]);
    if v5 {
        p.push(0);
    }
    p.extend_from_slice(&(id.len() as u16).to_be_bytes());
    p.extend_from_slice(id.as_bytes());
    let mut pkt = vec![0x10, p.len() as u8];
    pkt.extend(p);
    s.write_all(&pkt).unwrap();
    let ack = read_packet(&mut s).expect("CONNACK");
    assert_eq!(ack[0], 0x20);
    s
}

#[test]
fn bad_input_gets_the_spec_reaction_and_touches_nothing_else() {
    let r = relay();
    let addr = r.mqtt_addr().unwrap();
    // A bystander subscribed throughout.
    let by = paho(&r, "bystander-1", "5", &["sub", "t/#", "1", "1"], None);
    assert_eq!(by.until("READY"), "READY 1");
    // Wildcard in a PUBLISH topic, v5: DISCONNECT 0x90, then closed.
    let mut s = raw_connect(addr, "bad-1", true);
    s.write_all(b"\x30\x06\x00\x03t/#\x00").unwrap();
    let d = read_packet(&mut s).expect("DISCONNECT");
    assert_eq!(d[0], 0xe0);
    assert_eq!(d[2], 0x90);
    assert!(closed(&mut s));
    // The same on 3.1.1: closed without a word.
    let mut s = raw_connect(addr, "bad-2", false);
    s.write_all(b"\x30\x05\x00\x03t/#").unwrap();
    assert!(closed(&mut s));
    // A remaining length of five bytes: malformed (0x81).
    let mut s = raw_connect(addr, "bad-3", true);
    s.write_all(b"\x30\xff\xff\xff\xff\x7f").unwrap();
    let d = read_packet(&mut s).expect("DISCONNECT");
    assert_eq!((d[0], d[2]), (0xe0, 0x81));
    assert!(closed(&mut s));
    // Over the maximum packet size, seen from the fixed header: 0x95.
    let mut s = raw_connect(addr, "bad-4", true);
    s.write_all(b"\x30\xff\xff\xff\x7f").unwrap();
    let d = read_packet(&mut s).expect("DISCONNECT");
    assert_eq!((d[0], d[2]), (0xe0, 0x95));
    assert!(closed(&mut s));
    // A malformed CONNECT (3.1.1 protocol level 3): CONNACK 0x01, closed.
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(b"\x10\x0e\x00\x06MQIsdp\x03\x02\x00\x1e\x00\x00")
        .unwrap();
    let ack = read_packet(&mut s).expect("CONNACK");
    assert_eq!(ack, vec![0x20, 0x02, 0x00, 0x01]);
    assert!(closed(&mut s));
    // The bystander is unaffected and still served.
    let mut p = paho(&r, "pub-ok-1", "5", &["pub", "t/ok", "1", "fine"], None);
    p.until("PUBLISHED");
    assert!(p.wait().success());
    assert_eq!(by.until("MSG"), "MSG t/ok 1 0 fine");
}

#[test]
fn qos2_flows_end_to_end_across_shards_in_both_versions() {
    let r = relay();
    for version in ["3", "5"] {
        let sub_id = addrs_on(&format!("q2s{version}-"), 0, SHARDS, 1).remove(0);
        let pub_id = addrs_on(&format!("q2p{version}-"), 1, SHARDS, 1).remove(0);
        let sub = paho(&r, &sub_id, version, &["sub", "q2/+", "2", "2"], None);
        assert_eq!(sub.until("READY"), "READY 2");
        for i in 0..2 {
            let mut p = paho(
                &r,
                &pub_id,
                version,
                &["pub", "q2/x", "2", &format!("once-{i}")],
                None,
            );
            assert_eq!(p.until("PUBLISHED"), "PUBLISHED");
            assert!(p.wait().success());
            assert_eq!(sub.until("MSG"), format!("MSG q2/x 2 0 once-{i}"));
        }
    }
}

#[test]
fn retained_messages_reach_later_subscribers_on_any_shard_and_empty_deletes() {
    let r = relay();
    let pub_id = addrs_on("rp-", 0, SHARDS, 1).remove(0);
    let s = Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &mqtt_port(&r), "-i", &pub_id])
        .args(["-t", "state/boiler", "-m", "on", "-q", "1", "-r"])
        .status()
        .unwrap();
    assert!(s.success());
    for shard_idx in 0..SHARDS {
        let id = addrs_on(&format!("rs{shard_idx}-"), shard_idx, SHARDS, 1).remove(0);
        let sub = paho(&r, &id, "5", &["sub", "state/#", "1", "1"], None);
        assert_eq!(
            sub.until("MSG"),
            "MSG state/boiler 1 1 on",
            "shard {shard_idx}"
        );
    }
    // An empty retained payload deletes it: a new subscriber's first
    // message is the live one that follows.
    let s = Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &mqtt_port(&r), "-i", &pub_id])
        .args(["-t", "state/boiler", "-n", "-q", "1", "-r"])
        .status()
        .unwrap();
    assert!(s.success());
    let id = addrs_on("rs-late-", 1, SHARDS, 1).remove(0);
    let sub = paho(&r, &id, "3", &["sub", "state/#", "1", "1"], None);
    assert_eq!(sub.until("READY"), "READY 1");
    mosquitto_pub(&r, &pub_id, "mqttv311", "state/boiler", "live", 1);
    assert_eq!(sub.until("MSG"), "MSG state/boiler 1 0 live");
}

#[test]
fn the_will_goes_out_when_the_client_is_killed() {
    let r = relay();
    let watcher = paho(&r, "will-watch", "5", &["sub", "wills/#", "1", "1"], None);
    assert_eq!(watcher.until("READY"), "READY 1");
    let id = addrs_on("doomed-", 1, SHARDS, 1).remove(0);
    let mut holder = paho(&r, &id, "3", &["hold", "x", "1"], None);
    assert_eq!(holder.until("READY"), "READY 1");
    holder.kill();
    assert_eq!(watcher.until("MSG"), format!("MSG wills/{id} 1 0 gone"));
}

#[test]
fn a_persistent_session_gets_what_came_while_it_was_away() {
    let r = relay();
    for version in ["3", "5"] {
        let id = addrs_on(&format!("persist{version}-"), 1, SHARDS, 1).remove(0);
        // Subscribe with a persistent session, then go away (no DISCONNECT).
        let mut first = paho(&r, &id, version, &["sub", "ps/#", "1", "0", "0"], None);
        assert_eq!(first.until("CONNACK"), "CONNACK 0 0");
        assert_eq!(first.until("READY"), "READY 1");
        assert!(first.wait().success());
        // Whether the relay has seen the close yet or not, a QoS 1 message
        // is kept: queued offline, or in flight and sent again on resumption.
        let pub_id = addrs_on(&format!("pspub{version}-"), 0, SHARDS, 1).remove(0);
        mosquitto_pub(&r, &pub_id, "mqttv311", "ps/a", "while-away", 1);
        let again = paho(&r, &id, version, &["sub", "ps/#", "1", "1", "0"], None);
        assert_eq!(again.until("CONNACK"), "CONNACK 0 1", "session present");
        assert_eq!(again.until("MSG"), "MSG ps/a 1 0 while-away");
    }
}

#[test]
fn clients_api_shows_protocol_and_version_and_metrics_count_packets_by_type() {
    let r = relay();
    let _ctl = Client::hello(r.tcp_addr(), Form::Json, "ctl-native-1");
    let v5_id = addrs_on("api5-", 0, SHARDS, 1).remove(0);
    let v3_id = addrs_on("api3-", 1, SHARDS, 1).remove(0);
    let a = paho(&r, &v5_id, "5", &["hold", "a/#", "1"], None);
    assert_eq!(a.until("READY"), "READY 1");
    let b = paho(&r, &v3_id, "3", &["hold", "b/#", "1"], None);
    assert_eq!(b.until("READY"), "READY 1");
    let find = |v: &serde_json::Value, addr: &str| -> serde_json::Value {
        let items = v["items"].as_array().expect("items");
        items
            .iter()
            .find(|c| c["addr"] == addr)
            .cloned()
            .unwrap_or_else(|| panic!("{addr} not listed: {v}"))
    };
    let v = common::wait_for(&r, "/api/v1/clients", |v| {
        v["items"].as_array().is_some_and(|i| i.len() >= 3)
    });
    let c5 = find(&v, &v5_id);
    assert_eq!(
        (c5["protocol"].as_str(), c5["version"].as_str()),
        (Some("mqtt"), Some("5.0"))
    );
    let c3 = find(&v, &v3_id);
    assert_eq!(
        (c3["protocol"].as_str(), c3["version"].as_str()),
        (Some("mqtt"), Some("3.1.1"))
    );
    let n = find(&v, "ctl-native-1");
    assert_eq!(n["protocol"], "relay");
    assert!(n["version"].is_null());
    // Two CONNECTs and two SUBSCRIBEs, on whichever shards they landed.
    let (s, m) = http(&r, "GET", "/metrics", None, None);
    assert_eq!(s, 200);
    let text = m.as_str().expect("metrics text").to_owned();
    let sum = |kind: &str| -> u64 {
        text.lines()
            .filter(|l| l.starts_with(&format!("relay_mqtt_packets_in_total{{type=\"{kind}\"")))
            .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
            .sum()
    };
    assert_eq!(sum("connect"), 2, "{text}");
    assert_eq!(sum("subscribe"), 2, "{text}");
}

#[test]
fn a_shared_subscription_across_shards_gets_each_message_once() {
    let r = relay();
    let a_id = addrs_on("share-a-", 0, SHARDS, 1).remove(0);
    let b_id = addrs_on("share-b-", 1, SHARDS, 1).remove(0);
    let a = paho(
        &r,
        &a_id,
        "5",
        &["hold", "$share/workers/jobs/+", "1"],
        None,
    );
    assert_eq!(a.until("READY"), "READY 1");
    let b = paho(
        &r,
        &b_id,
        "5",
        &["hold", "$share/workers/jobs/+", "1"],
        None,
    );
    assert_eq!(b.until("READY"), "READY 1");
    let pub_id = addrs_on("share-p-", 1, SHARDS, 1).remove(0);
    for i in 0..6 {
        mosquitto_pub(&r, &pub_id, "mqttv5", "jobs/x", &format!("job-{i}"), 1);
    }
    let mut got = Vec::new();
    let end = Instant::now() + Duration::from_secs(10);
    while got.len() < 6 && Instant::now() < end {
        for p in [&a, &b] {
            if let Some(l) = p.line(Duration::from_millis(50)) {
                got.push(l);
            }
        }
    }
    // Nothing more comes: no message went to both members.
    for p in [&a, &b] {
        if let Some(l) = p.line(Duration::from_millis(500)) {
            got.push(l);
        }
    }
    got.sort();
    let want: Vec<String> = (0..6).map(|i| format!("MSG jobs/x 1 0 job-{i}")).collect();
    assert_eq!(got, want);
}

#[test]
fn the_will_goes_out_when_keep_alive_expires() {
    let r = relay();
    let watcher = paho(&r, "ka-watch", "3", &["sub", "wills/#", "1", "1"], None);
    assert_eq!(watcher.until("READY"), "READY 1");
    let id = addrs_on("silent-", 0, SHARDS, 1).remove(0);
    let mut cmd = Command::new("python3");
    cmd.arg(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/mqtt/paho_client.py"
    ))
    .args(["127.0.0.1", &mqtt_port(&r), &id, "5", "hold", "x", "1"])
    .env("MQTT_KEEPALIVE", "1");
    let holder = Proc::spawn(&mut cmd);
    assert_eq!(holder.until("READY"), "READY 1");
    // Stopped, the client sends nothing (no PINGREQ) but its socket stays
    // open: the relay ends it after 1.5 keep alive periods.
    // SAFETY: a signal to the child this test started, by its pid.
    unsafe { libc::kill(holder.child.id() as i32, libc::SIGSTOP) };
    assert_eq!(watcher.until("MSG"), format!("MSG wills/{id} 1 0 gone"));
}

#[test]
fn an_empty_client_id_is_assigned_with_clean_start_and_refused_without() {
    let r = relay();
    let addr = r.mqtt_addr().unwrap();
    // MQTT 5, clean start: CONNACK 0 with an Assigned Client Identifier
    // (property 0x12) that is a relay address.
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(b"\x10\x0d\x00\x04MQTT\x05\x02\x00\x1e\x00\x00\x00")
        .unwrap();
    let ack = read_packet(&mut s).expect("CONNACK");
    assert_eq!(&ack[..4], &[0x20, ack[1], 0x00, 0x00][..], "{ack:?}");
    let at = ack.iter().position(|&b| b == 0x12).expect("assigned id");
    let n = u16::from_be_bytes([ack[at + 1], ack[at + 2]]) as usize;
    let id = std::str::from_utf8(&ack[at + 3..at + 3 + n])
        .unwrap()
        .to_owned();
    assert!(relay_core::validate_name(id.as_bytes()).is_ok(), "{id}");
    // The assigned id is its address: DATA to it arrives as a PUBLISH.
    let mut ctl = Client::hello(r.tcp_addr(), Form::Json, "ctl-assign");
    ctl.data(&id, 1, true, b"x");
    assert_eq!(ctl.expect(FrameType::Ack).seq, 1);
    let p = read_packet(&mut s).expect("PUBLISH");
    assert_eq!(p[0] >> 4, 3);
    assert!(p.windows(20).any(|w| w == b"relay/from/ctl-assig"), "{p:?}");
    // 3.1.1 without clean session: CONNACK return code 2, closed.
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(b"\x10\x0c\x00\x04MQTT\x04\x00\x00\x1e\x00\x00")
        .unwrap();
    assert_eq!(
        read_packet(&mut s).expect("CONNACK"),
        vec![0x20, 0x02, 0x00, 0x02]
    );
    assert!(closed(&mut s));
}

// ---------------------------------------------------------------------------
// MQTT over TLS (`[listeners] mqtt_tls`)
// ---------------------------------------------------------------------------

/// A CA, a server certificate for 127.0.0.1 and `localhost`, and device
/// certificates it signs, as PEM files in a fresh directory (rcgen).
struct MqttPki {
    dir: std::path::PathBuf,
    ca: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
}

impl MqttPki {
    fn new(tag: &str) -> MqttPki {
        let dir = std::env::temp_dir().join(format!("relay-mqtt-tls-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params.distinguished_name.push(
            rcgen::DnType::CommonName,
            format!("relay MQTT test CA {tag}"),
        );
        let ca =
            rcgen::CertifiedIssuer::self_signed(ca_params, rcgen::KeyPair::generate().unwrap())
                .unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()])
            .unwrap()
            .signed_by(&key, &ca)
            .unwrap();
        std::fs::write(dir.join("cert.pem"), cert.pem()).unwrap();
        std::fs::write(dir.join("key.pem"), key.serialize_pem()).unwrap();
        std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
        MqttPki { dir, ca }
    }

    fn path(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }

    fn ca_file(&self) -> String {
        self.path("ca.pem")
    }

    /// Turns `mqtt_tls` on (and the plaintext `mqtt`), with this certificate.
    fn apply(&self, c: &mut relay_config::Config) {
        c.listeners.mqtt = Some("127.0.0.1:0".parse().unwrap());
        c.listeners.mqtt_tls = Some("127.0.0.1:0".parse().unwrap());
        c.tls.cert_file = Some(self.path("cert.pem"));
        c.tls.key_file = Some(self.path("key.pem"));
    }

    /// A device certificate naming `cn`: (certificate file, key file).
    fn device(&self, cn: &str) -> (String, String) {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn.to_owned());
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.ca).unwrap();
        let (c, k) = (
            self.path(&format!("{cn}.pem")),
            self.path(&format!("{cn}.key")),
        );
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        (c, k)
    }
}

impl Drop for MqttPki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn mqtts_port(r: &Relay) -> String {
    r.mqtt_tls_addr()
        .expect("mqtt_tls listener")
        .port()
        .to_string()
}

fn tls_errors(r: &Relay) -> u64 {
    r.stats()
        .iter()
        .map(|s| s.tls_errors.load(std::sync::atomic::Ordering::Relaxed))
        .sum()
}

/// A mosquitto client (`bin`) on `mqtt_tls`, verifying the relay against
/// the test CA; `device`: a client certificate to present.
fn mosquitto_tls(
    bin: &str,
    r: &Relay,
    pki: &MqttPki,
    id: &str,
    version: &str,
    device: Option<&(String, String)>,
) -> Command {
    let mut cmd = Command::new(bin);
    cmd.args(["-h", "127.0.0.1", "-p", &mqtts_port(r), "-V", version])
        .args(["-i", id, "--cafile", &pki.ca_file()]);
    if let Some((cert, key)) = device {
        cmd.args(["--cert", cert, "--key", key]);
    }
    cmd
}

/// paho-mqtt on `mqtt_tls` (see `paho`), with `device` as its certificate.
fn paho_tls(
    r: &Relay,
    pki: &MqttPki,
    id: &str,
    version: &str,
    args: &[&str],
    device: Option<&(String, String)>,
) -> Proc {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/mqtt/paho_client.py");
    let mut cmd = Command::new("python3");
    cmd.arg(script)
        .arg("127.0.0.1")
        .arg(mqtts_port(r))
        .arg(id)
        .arg(version)
        .args(args)
        .env("MQTT_CAFILE", pki.ca_file());
    if let Some((cert, key)) = device {
        cmd.env("MQTT_CERTFILE", cert).env("MQTT_KEYFILE", key);
    }
    Proc::spawn(&mut cmd)
}

/// Sends DATA `payload` from `ctl` to `dst` (with ACK_REQ) until it is
/// acknowledged, i.e. until `dst` is connected: at most 50 tries.
fn data_when_connected(ctl: &mut Client, dst: &str, payload: &[u8]) {
    for seq in 1..=50 {
        ctl.data(dst, seq, true, payload);
        let f = ctl.recv();
        if f.kind == FrameType::Ack {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("{dst} never connected");
}

/// mosquitto_sub and mosquitto_pub over `mqtt_tls` (`--cafile`): DATA from
/// a native controller reaches the subscriber, the publisher's message
/// reaches the controller, in both MQTT versions.
#[test]
fn mosquitto_over_mqtt_tls_reaches_a_native_client_and_back() {
    let pki = MqttPki::new("mosquitto");
    let r = start(|c| pki.apply(c));
    for (i, version) in ["mqttv311", "mqttv5"].into_iter().enumerate() {
        let ctl_name = addrs_on(&format!("ctl-tls-{i}-"), i % SHARDS, SHARDS, 1).remove(0);
        let sub_id = addrs_on(&format!("sub-tls-{i}-"), (i + 1) % SHARDS, SHARDS, 1).remove(0);
        let mut ctl = Client::hello(r.tcp_addr(), Form::Json, &ctl_name);
        let mut sub = Proc::spawn(
            mosquitto_tls("mosquitto_sub", &r, &pki, &sub_id, version, None).args([
                "-t",
                "relay/from/#",
                "-q",
                "1",
                "-v",
                "-W",
                "20",
                "-C",
                "1",
            ]),
        );
        data_when_connected(&mut ctl, &sub_id, b"\"over-tls\"");
        assert_eq!(
            sub.until("relay/from/"),
            format!("relay/from/{ctl_name} \"over-tls\""),
            "{version}"
        );
        assert!(sub.wait().success());

        let pub_id = addrs_on(&format!("pub-tls-{i}-"), i % SHARDS, SHARDS, 1).remove(0);
        let s = mosquitto_tls("mosquitto_pub", &r, &pki, &pub_id, version, None)
            .args([
                "-t",
                &format!("relay/to/{ctl_name}"),
                "-m",
                "back",
                "-q",
                "1",
            ])
            .status()
            .expect("mosquitto_pub runs");
        assert!(s.success(), "mosquitto_pub over TLS: {s}");
        let f = ctl.expect(FrameType::Data);
        assert_eq!(
            (&f.src[..], &f.payload[..]),
            (pub_id.as_bytes(), &b"back"[..])
        );
    }
    assert_eq!(tls_errors(&r), 0);
}

/// paho-mqtt (Python's ssl) speaks MQTT 5 over `mqtt_tls`: QoS 1 both ways
/// with a native controller, and with a plaintext MQTT client.
#[test]
fn paho_v5_over_mqtt_tls_exchanges_with_native_and_plaintext_clients() {
    let pki = MqttPki::new("paho");
    let r = start(|c| pki.apply(c));
    let sub_id = addrs_on("paho-tls-", 1, SHARDS, 1).remove(0);
    let sub = paho_tls(
        &r,
        &pki,
        &sub_id,
        "5",
        &["sub", "relay/from/#", "1", "2"],
        None,
    );
    assert_eq!(sub.until("CONNACK"), "CONNACK 0 0");
    assert_eq!(sub.until("READY"), "READY 1");
    let mut ctl = Client::hello(r.tcp_addr(), Form::Json, "ctl-paho-tls");
    ctl.data(&sub_id, 1, true, b"\"native\"");
    assert_eq!(ctl.expect(FrameType::Ack).seq, 1);
    assert_eq!(
        sub.until("MSG"),
        "MSG relay/from/ctl-paho-tls 1 0 \"native\""
    );
    // A plaintext MQTT client on `mqtt` sends to it too.
    let mut p = paho(
        &r,
        "plain-to-tls",
        "5",
        &["pub", &format!("relay/to/{sub_id}"), "1", "plain"],
        None,
    );
    p.until("PUBLISHED");
    assert!(p.wait().success());
    assert_eq!(sub.until("MSG"), "MSG relay/from/plain-to-tls 1 0 plain");
    // And the TLS client publishes to the controller.
    let mut p = paho_tls(
        &r,
        &pki,
        "paho-tls-pub",
        "5",
        &["pub", "relay/to/ctl-paho-tls", "1", "secure"],
        None,
    );
    p.until("PUBLISHED");
    assert!(p.wait().success());
    let f = ctl.expect(FrameType::Data);
    assert_eq!(
        (&f.src[..], &f.payload[..]),
        (&b"paho-tls-pub"[..], &b"secure"[..])
    );
    assert_eq!(tls_errors(&r), 0);
}

/// A device certificate is the MQTT identity on `mqtt_tls`: no password is
/// needed under HMAC auth, an empty client id becomes the certificate's
/// name, and a CONNECT naming another id is refused (0x87 on MQTT 5, return
/// code 5 on 3.1.1); without a certificate there is no session at all.
#[test]
fn a_device_certificate_is_the_client_id_and_another_id_is_refused() {
    let pki = MqttPki::new("devices");
    let r = start(|c| {
        pki.apply(c);
        c.auth.mode = relay_config::AuthMode::Hmac;
        c.auth.secret = "0123456789abcdef0123456789abcdef".into();
        c.tls.client_ca_file = Some(pki.ca_file());
        c.tls.require_client_cert = true;
    });
    let mut ctl = Client::hello_with(
        r.tcp_addr(),
        Form::Json,
        "ctl-dev",
        serde_json::json!({"token": relay_core::auth::token_for(
            b"0123456789abcdef0123456789abcdef",
            b"ctl-dev"
        )}),
    );
    // Its own name as the client id, no password: accepted, and reachable.
    let dev7 = addrs_on("dev7-", 1, SHARDS, 1).remove(0);
    let cert7 = pki.device(&dev7);
    let sub = paho_tls(
        &r,
        &pki,
        &dev7,
        "5",
        &["sub", "relay/from/#", "1", "2"],
        Some(&cert7),
    );
    assert_eq!(sub.until("CONNACK"), "CONNACK 0 0");
    assert_eq!(sub.until("READY"), "READY 1");
    ctl.data(&dev7, 1, true, b"\"to-dev7\"");
    assert_eq!(ctl.expect(FrameType::Ack).seq, 1);
    assert_eq!(sub.until("MSG"), "MSG relay/from/ctl-dev 1 0 \"to-dev7\"");
    // An empty client id (3.1.1, clean session): the certificate names it.
    let dev8 = addrs_on("dev8-", 0, SHARDS, 1).remove(0);
    let cert8 = pki.device(&dev8);
    let sub8 = paho_tls(
        &r,
        &pki,
        "",
        "3",
        &["sub", "relay/from/#", "1", "1"],
        Some(&cert8),
    );
    assert_eq!(sub8.until("CONNACK"), "CONNACK 0 0");
    assert_eq!(sub8.until("READY"), "READY 1");
    ctl.data(&dev8, 2, true, b"\"to-dev8\"");
    assert_eq!(ctl.expect(FrameType::Ack).seq, 2);
    assert_eq!(sub8.until("MSG"), "MSG relay/from/ctl-dev 1 0 \"to-dev8\"");
    // The device publishes as its certificate's name.
    let s = mosquitto_tls("mosquitto_pub", &r, &pki, &dev8, "mqttv311", Some(&cert8))
        .args(["-t", "relay/to/ctl-dev", "-m", "from-dev8", "-q", "1"])
        .status()
        .unwrap();
    assert!(s.success(), "{s}");
    let f = ctl.expect(FrameType::Data);
    assert_eq!(
        (&f.src[..], &f.payload[..]),
        (dev8.as_bytes(), &b"from-dev8"[..])
    );

    // Another client id with dev7's certificate: MQTT 5 gets 0x87 (135)...
    let bad = paho_tls(
        &r,
        &pki,
        "dev-other",
        "5",
        &["sub", "a", "1", "0"],
        Some(&cert7),
    );
    assert_eq!(bad.until("CONNACK"), "CONNACK 135 0");
    // ...and 3.1.1 return code 5, which mosquitto reports as "not authorised".
    let out = mosquitto_tls(
        "mosquitto_sub",
        &r,
        &pki,
        "dev-other",
        "mqttv311",
        Some(&cert7),
    )
    .args(["-t", "a", "-W", "10", "-C", "1"])
    .output()
    .unwrap();
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stderr).to_lowercase();
    assert!(text.contains("not authori"), "{text}");
    // The holder of the name was not disturbed.
    ctl.data(&dev7, 3, true, b"\"still\"");
    assert_eq!(ctl.expect(FrameType::Ack).seq, 3);
    assert_eq!(sub.until("MSG"), "MSG relay/from/ctl-dev 1 0 \"still\"");
    // No certificate: the handshake fails, nothing is published.
    let s = mosquitto_tls("mosquitto_pub", &r, &pki, "no-cert", "mqttv5", None)
        .args(["-t", "relay/to/ctl-dev", "-m", "x"])
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(!s.success());
    assert!(ctl.recv_timeout(Duration::from_millis(300)).is_none());
}

/// A plaintext MQTT CONNECT on the TLS port gets a TLS alert, never a
/// CONNACK, and is closed; the relay goes on serving both MQTT ports.
#[test]
fn a_plaintext_mqtt_client_on_the_tls_port_gets_nothing_and_the_relay_serves_on() {
    let pki = MqttPki::new("plaintext");
    let r = start(|c| pki.apply(c));
    let tls_addr = r.mqtt_tls_addr().unwrap();
    for v5 in [false, true] {
        let mut s = TcpStream::connect(tls_addr).unwrap();
        let mut p = Vec::new();
        p.extend_from_slice(b"\x00\x04MQTT");
        p.extend_from_slice(&[if v5 { 5 } else { 4 }, 0x02, 0, 30]);
        if v5 {
            p.push(0);
        }
        p.extend_from_slice(b"\x00\x05plain");
        let mut pkt = vec![0x10, p.len() as u8];
        pkt.extend(p);
        s.write_all(&pkt).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut got = Vec::new();
        let mut tmp = [0u8; 1024];
        loop {
            match s.read(&mut tmp) {
                Ok(0) => break,
                Ok(n) => got.extend_from_slice(&tmp[..n]),
                Err(e) => panic!("not closed cleanly within 5 s: {e}"),
            }
        }
        // Content type 21: a TLS alert record, and nothing else.
        assert_eq!(got.first(), Some(&21), "got {got:?}");
        assert!(got.len() <= 7, "more than an alert: {got:?}");
    }
    assert_eq!(tls_errors(&r), 2);
    // Both ports still serve.
    let sub = paho_tls(
        &r,
        &pki,
        "after-plain",
        "5",
        &["sub", "t/#", "1", "1"],
        None,
    );
    assert_eq!(sub.until("READY"), "READY 1");
    let mut p = paho(&r, "plain-pub", "3", &["pub", "t/x", "1", "ok"], None);
    p.until("PUBLISHED");
    assert!(p.wait().success());
    assert_eq!(sub.until("MSG"), "MSG t/x 1 0 ok");
}

/// The access rules see an MQTT client identified by its device certificate
/// with `auth = "certificate"`: a rule denying sends to those without one
/// stops a TLS client without a certificate and lets the device through.
#[test]
fn the_access_rules_see_a_device_certificate_as_auth_certificate() {
    let pki = MqttPki::new("acl");
    let r = start(|c| {
        pki.apply(c);
        c.tls.client_ca_file = Some(pki.ca_file());
        c.tls.require_client_cert = false;
        let deny = relay_config::acl::AclRuleConfig {
            name: Some("sends-need-a-certificate".into()),
            effect: "deny".into(),
            actions: vec!["send".into()],
            roles: Vec::new(),
            auth: vec!["none".into(), "token".into()],
            from: Vec::new(),
            member_of: Vec::new(),
            to: vec!["ctl-acl".into()],
        };
        c.acl.rule = vec![deny];
    });
    let mut ctl = Client::hello(r.tcp_addr(), Form::Json, "ctl-acl");
    // First the client without a certificate: its message is dropped...
    let mut p = paho_tls(
        &r,
        &pki,
        "anon-1",
        "5",
        &["pub", "relay/to/ctl-acl", "1", "anon"],
        None,
    );
    assert_eq!(p.until("CONNACK"), "CONNACK 0 0");
    p.until("PUBLISHED");
    assert!(p.wait().success());
    // ...then the device's goes through: the first DATA is the device's.
    let cert = pki.device("dev-acl");
    let mut p = paho_tls(
        &r,
        &pki,
        "dev-acl",
        "5",
        &["pub", "relay/to/ctl-acl", "1", "certified"],
        Some(&cert),
    );
    p.until("PUBLISHED");
    assert!(p.wait().success());
    let f = ctl.expect(FrameType::Data);
    assert_eq!(
        (&f.src[..], &f.payload[..]),
        (&b"dev-acl"[..], &b"certified"[..])
    );
    assert!(ctl.recv_timeout(Duration::from_millis(300)).is_none());
}
