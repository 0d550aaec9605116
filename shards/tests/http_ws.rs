//! Browsers and backends end to end: WebSocket clients, the HTTP API, uids,
//! metrics. Real sockets, two shards, port 0.

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{Browser, Client, Form, WsIn, addrs_on, http, shard, start};
use relay_core::frame::{ErrorCode, Flags, Frame, FrameType};
use serde_json::json;

const TOKEN: &str = "test-token";

fn with_token(c: &mut relay_config::Config) {
    c.http.api_token = Some(TOKEN.into());
}

#[test]
fn websocket_clients_exchange_with_tcp_clients_across_shards_in_both_forms() {
    let relay = start(|_| {});
    let web = addrs_on("web-", 0, 2, 2);
    let ctl = addrs_on("ctl-", 1, 2, 2);
    assert_ne!(shard(&web[0], 2), shard(&ctl[0], 2));
    // JSON text: hello in the URL gives WELCOME at once.
    let mut b = Browser::connect(&relay, &format!("addr={}&role=browser", web[0]));
    let w = b.recv_json();
    assert_eq!(w["type"], "welcome");
    assert_eq!(w["addr"], web[0].as_str());
    let mut c = Client::hello(relay.tcp_addr(), Form::Binary, &ctl[0]);
    b.send_text(
        json!({"type":"data","dst":ctl[0],"seq":7,"ack":true,"payload":{"cmd":"relay_on"}}),
    );
    let got = c.expect(FrameType::Data);
    assert_eq!(&got.src[..], web[0].as_bytes());
    assert!(got.flags.json());
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&got.payload).unwrap(),
        json!({"cmd":"relay_on"})
    );
    assert_eq!(b.recv_json(), json!({"type":"ack","seq":7}));
    c.data(&web[0], 0, false, &[1, 2, 3]);
    assert_eq!(
        b.recv_json(),
        json!({"type":"data","src":ctl[0],"dst":web[0],"payload_b64":"AQID"})
    );

    // Binary messages: a hello sent as a binary message sets the binary form.
    let mut bb = Browser::connect(&relay, "");
    let mut h = Frame::new(FrameType::Hello);
    h.src = Bytes::from(web[1].clone());
    bb.send_binary(&h);
    match bb.recv() {
        WsIn::Frame(f) => assert_eq!(f.kind, FrameType::Welcome),
        other => panic!("expected a binary WELCOME, got {other:?}"),
    }
    let mut jc = Client::hello(relay.tcp_addr(), Form::Json, &ctl[1]);
    jc.send_raw(
        format!(
            "{{\"type\":\"data\",\"dst\":\"{}\",\"payload\":{{\"t\":1}}}}\n",
            web[1]
        )
        .as_bytes(),
    )
    .unwrap();
    match bb.recv() {
        WsIn::Frame(f) => {
            assert_eq!(f.kind, FrameType::Data);
            assert_eq!(&f.payload[..], br#"{"t":1}"#);
            assert!(f.flags.json());
        }
        other => panic!("expected a binary DATA, got {other:?}"),
    }
    let mut d = Frame::data(Bytes::new(), Bytes::from(ctl[1].clone()), &b"raw"[..]);
    d.seq = 3;
    d.flags = Flags(Flags::ACK_REQ);
    bb.send_binary(&d);
    assert_eq!(jc.recv().payload, Bytes::from_static(b"raw"));
    match bb.recv() {
        WsIn::Frame(f) => assert_eq!((f.kind, f.seq), (FrameType::Ack, 3)),
        other => panic!("expected ACK, got {other:?}"),
    }
}

#[test]
fn websocket_takeover_and_close_codes() {
    let relay = start(|_| {});
    let name = addrs_on("tab-", 1, 2, 1).remove(0);
    let mut first = Browser::connect(&relay, &format!("addr={name}"));
    assert_eq!(first.recv_json()["type"], "welcome");
    let mut second = Browser::connect(&relay, &format!("addr={name}"));
    assert_eq!(second.recv_json()["type"], "welcome");
    assert_eq!(first.recv_json()["code"], "replaced");
    match first.recv() {
        WsIn::Close(code) => assert_eq!(code, Some(4000 + ErrorCode::Replaced as u16)),
        other => panic!("expected a close, got {other:?}"),
    }
    second.send_text(json!({"type":"bye"}));
    assert_eq!(second.recv_json()["type"], "bye");
    match second.recv() {
        WsIn::Close(code) => assert_eq!(code, Some(1000)),
        other => panic!("expected a close, got {other:?}"),
    }
}

#[test]
fn websocket_pings_count_as_activity() {
    let relay = start(|c| {
        c.heartbeat.min_s = 1;
        c.heartbeat.interval_s = 1;
        c.heartbeat.idle_factor = 1;
    });
    let mut pinging = Browser::connect(&relay, "addr=web-pinging");
    pinging.recv_json();
    let mut silent = Browser::connect(&relay, "addr=web-silent");
    silent.recv_json();
    let start = Instant::now();
    let mut silent_closed = None;
    while start.elapsed() < Duration::from_millis(2500) {
        pinging
            .ws
            .send(tungstenite::Message::Ping(Bytes::from_static(b"hb")))
            .unwrap();
        let _ = pinging.recv_timeout(Duration::from_millis(200));
        if silent_closed.is_none()
            && let Some(m) = silent.recv_timeout(Duration::from_millis(50))
        {
            match m {
                WsIn::Json(v) => assert_eq!(v["code"], "idle_timeout"),
                WsIn::Close(code) => silent_closed = Some(code),
                other => panic!("{other:?}"),
            }
        }
    }
    assert_eq!(
        silent_closed,
        Some(Some(4000 + ErrorCode::IdleTimeout as u16))
    );
    // The pinging browser is still online.
    let mut c = Client::hello(relay.tcp_addr(), Form::Binary, "ctl-check");
    c.data("web-pinging", 1, true, b"still there?");
    c.expect(FrameType::Ack);
}

#[test]
fn websocket_messages_are_bounded_by_max_frame() {
    let relay = start(|c| c.limits.max_frame = 1024);
    let mut b = Browser::connect(&relay, "addr=web-big");
    b.recv_json();
    b.ws.send(tungstenite::Message::binary(vec![0u8; 4096]))
        .unwrap();
    let mut saw_close = None;
    for _ in 0..5 {
        match b.recv_timeout(Duration::from_secs(2)) {
            Some(WsIn::Close(c)) => {
                saw_close = Some(c);
                break;
            }
            Some(_) => {}
            None => break,
        }
    }
    assert!(
        matches!(saw_close, Some(Some(1009)) | Some(Some(1002))),
        "got {saw_close:?}"
    );
}

#[test]
fn api_needs_the_bearer_token_and_changes_nothing_without_it() {
    let relay = start(with_token);
    let mut c = Client::hello(relay.tcp_addr(), Form::Json, "ctl-tok");
    let (s, body) = http(
        &relay,
        "POST",
        "/api/v1/send",
        None,
        Some(&json!({"dst":"ctl-tok","payload":1})),
    );
    assert_eq!(s, 401);
    assert_eq!(body["error"], "unauthorized");
    let (s, _) = http(
        &relay,
        "POST",
        "/api/v1/send",
        Some("wrong"),
        Some(&json!({"dst":"ctl-tok","payload":1})),
    );
    assert_eq!(s, 401);
    c.expect_silence(Duration::from_millis(200));
    let (s, body) = http(
        &relay,
        "POST",
        "/api/v1/send",
        Some(TOKEN),
        Some(&json!({"dst":"ctl-tok","payload":{"x":1}})),
    );
    assert_eq!((s, body), (200, json!({"count": 1})));
    let f = c.expect(FrameType::Data);
    assert_eq!(&f.src[..], b"$api");
    assert_eq!(&f.payload[..], br#"{"x":1}"#);
}

#[test]
fn api_send_errors_and_payload_forms() {
    let relay = start(with_token);
    let t = Some(TOKEN);
    let mut c = Client::hello(relay.tcp_addr(), Form::Binary, "ctl:site@1");
    // Percent-encoded path segments and body addresses with : and @.
    let (s, _) = http(
        &relay,
        "POST",
        "/api/v1/send",
        t,
        Some(&json!({"dst":"ctl:site@1","payload_b64":"AP8=","src":"backend-1"})),
    );
    assert_eq!(s, 200);
    let f = c.expect(FrameType::Data);
    assert_eq!(
        (&f.src[..], &f.payload[..]),
        (&b"backend-1"[..], &[0u8, 255][..])
    );
    let (s, b) = http(
        &relay,
        "POST",
        "/api/v1/send",
        t,
        Some(&json!({"dst":"nobody","payload":1})),
    );
    assert_eq!((s, b["error"].as_str()), (404, Some("no_route")));
    let (s, b) = http(
        &relay,
        "POST",
        "/api/v1/send",
        t,
        Some(&json!({"dst":"bad addr","payload":1})),
    );
    assert_eq!((s, b["error"].as_str()), (400, Some("bad_address")));
    let (s, _) = http(
        &relay,
        "POST",
        "/api/v1/send",
        t,
        Some(&json!({"dst":"ctl:site@1"})),
    );
    assert_eq!(s, 400);
    let big = "x".repeat(70_000);
    let (s, b) = http(
        &relay,
        "POST",
        "/api/v1/send",
        t,
        Some(&json!({"dst":"ctl:site@1","payload":big})),
    );
    assert_eq!((s, b["error"].as_str()), (413, Some("too_large")));
    let (s, b) = http(&relay, "GET", "/api/v1/clients/ctl%3Asite%401", t, None);
    assert_eq!(s, 200);
    assert_eq!(b["addr"], "ctl:site@1");
    assert_eq!(b["online"], true);
    assert_eq!(b["role"], "controller");
    assert_eq!(b["shard"], shard("ctl:site@1", 2));
    let (s, _) = http(&relay, "GET", "/api/v1/clients/nobody", t, None);
    assert_eq!(s, 404);
    let (s, _) = http(&relay, "GET", "/api/v1/nothing-here", t, None);
    assert_eq!(s, 404);
}

#[test]
fn uid_sends_reach_every_bound_address_once_across_shards() {
    let relay = start(with_token);
    let t = Some(TOKEN);
    let tabs0 = addrs_on("tab-a-", 0, 2, 2);
    let tabs1 = addrs_on("tab-b-", 1, 2, 2);
    let mut tabs: Vec<Client> = tabs0
        .iter()
        .chain(tabs1.iter())
        .map(|a| Client::hello(relay.tcp_addr(), Form::Json, a))
        .collect();
    for a in tabs0.iter().chain(tabs1.iter()) {
        let (s, _) = http(
            &relay,
            "POST",
            "/api/v1/uids/user-42/bind",
            t,
            Some(&json!({"addr": a})),
        );
        assert_eq!(s, 200);
    }
    // Binding twice is harmless.
    http(
        &relay,
        "POST",
        "/api/v1/uids/user-42/bind",
        t,
        Some(&json!({"addr": tabs0[0]})),
    );
    let (s, b) = http(
        &relay,
        "POST",
        "/api/v1/uids/user-42/bind",
        t,
        Some(&json!({"addr": "offline-tab"})),
    );
    assert_eq!((s, b["error"].as_str()), (404, Some("no_route")));
    let (s, b) = http(&relay, "GET", "/api/v1/uids/user-42", t, None);
    assert_eq!(s, 200);
    assert_eq!(b["count"], 4);
    let (s, b) = http(
        &relay,
        "POST",
        "/api/v1/uids/user-42/send",
        t,
        Some(&json!({"payload":"hi"})),
    );
    assert_eq!((s, b), (200, json!({"count": 4})));
    for tab in tabs.iter_mut() {
        let f = tab.expect(FrameType::Data);
        assert_eq!(&f.payload[..], b"\"hi\"");
        assert_eq!(&f.dst[..], b"user-42");
        tab.expect_silence(Duration::from_millis(100));
    }
    // Unbind one, and a disconnect drops another's binding.
    let (s, _) = http(
        &relay,
        "DELETE",
        &format!("/api/v1/uids/user-42/bind/{}", tabs1[0]),
        t,
        None,
    );
    assert_eq!(s, 200);
    let gone = tabs.remove(0);
    drop(gone);
    std::thread::sleep(Duration::from_millis(300));
    let (_, b) = http(
        &relay,
        "POST",
        "/api/v1/uids/user-42/send",
        t,
        Some(&json!({"payload":"again"})),
    );
    assert_eq!(b, json!({"count": 2}));
    let (_, b) = http(
        &relay,
        "GET",
        &format!("/api/v1/clients/{}", tabs1[1]),
        t,
        None,
    );
    assert_eq!(b["uids"], json!(["user-42"]));
}

#[test]
fn groups_through_the_api_are_visible_to_the_protocol_at_once() {
    let relay = start(with_token);
    let t = Some(TOKEN);
    let names: Vec<String> = addrs_on("gm-", 0, 2, 2)
        .into_iter()
        .chain(addrs_on("gm-", 1, 2, 2))
        .collect();
    let mut members: Vec<Client> = names
        .iter()
        .map(|a| Client::hello(relay.tcp_addr(), Form::Binary, a))
        .collect();
    for a in &names {
        let (s, _) = http(
            &relay,
            "POST",
            "/api/v1/groups/room-9/members",
            t,
            Some(&json!({"addr": a})),
        );
        assert_eq!(s, 200);
    }
    // A publish right after the joins reaches every member, from any shard.
    let mut publisher = Client::hello(relay.tcp_addr(), Form::Json, "pub-x");
    let mut p = Frame::new(FrameType::Publish);
    p.dst = Bytes::from_static(b"room-9");
    p.payload = Bytes::from_static(b"1");
    p.flags = Flags(Flags::JSON);
    publisher.send(&p);
    for m in members.iter_mut() {
        assert!(m.expect(FrameType::Data).flags.group());
    }
    let (s, b) = http(
        &relay,
        "POST",
        "/api/v1/groups/room-9/publish",
        t,
        Some(&json!({"payload":2,"exclude":[names[0]]})),
    );
    assert_eq!((s, b), (200, json!({"count": 3})));
    members[0].expect_silence(Duration::from_millis(150));
    for m in members.iter_mut().skip(1) {
        assert_eq!(&m.expect(FrameType::Data).payload[..], b"2");
    }
    let (_, b) = http(&relay, "GET", "/api/v1/groups/room-9?limit=3", t, None);
    assert_eq!(b["count"], 4);
    assert_eq!(b["items"].as_array().unwrap().len(), 3);
    let next = b["next"].as_str().unwrap().to_owned();
    let (_, b2) = http(
        &relay,
        "GET",
        &format!("/api/v1/groups/room-9?limit=3&after={next}"),
        t,
        None,
    );
    assert_eq!(b2["items"].as_array().unwrap().len(), 1);
    assert_eq!(b2["next"], serde_json::Value::Null);
    let (s, _) = http(
        &relay,
        "DELETE",
        &format!("/api/v1/groups/room-9/members/{}", names[1]),
        t,
        None,
    );
    assert_eq!(s, 200);
    let (_, b) = http(
        &relay,
        "POST",
        "/api/v1/groups/room-9/publish",
        t,
        Some(&json!({"payload":3})),
    );
    assert_eq!(b, json!({"count": 3}));
    let (s, b) = http(&relay, "DELETE", "/api/v1/groups/room-9", t, None);
    assert_eq!((s, b), (200, json!({"count": 3})));
    let (_, b) = http(
        &relay,
        "POST",
        "/api/v1/groups/room-9/publish",
        t,
        Some(&json!({"payload":4})),
    );
    assert_eq!(b, json!({"count": 0}));
    let (s, _) = http(
        &relay,
        "POST",
        "/api/v1/groups/room-9/members",
        t,
        Some(&json!({"addr": "nobody"})),
    );
    assert_eq!(s, 404);
}

#[test]
fn client_listing_is_paged_and_filtered() {
    let relay = start(with_token);
    let t = Some(TOKEN);
    let mut keep = Vec::new();
    for i in 0..25 {
        keep.push(Client::hello(
            relay.tcp_addr(),
            Form::Binary,
            &format!("ctl-{i:02}"),
        ));
    }
    let mut tools = Vec::new();
    for i in 0..3 {
        tools.push(Client::hello_with(
            relay.tcp_addr(),
            Form::Json,
            &format!("tool-{i}"),
            json!({"role":"tool"}),
        ));
    }
    let mut seen = Vec::new();
    let mut after = String::new();
    for _ in 0..10 {
        let (s, b) = http(
            &relay,
            "GET",
            &format!("/api/v1/clients?prefix=ctl-&limit=10&after={after}"),
            t,
            None,
        );
        assert_eq!(s, 200);
        for it in b["items"].as_array().unwrap() {
            seen.push(it["addr"].as_str().unwrap().to_owned());
        }
        match b["next"].as_str() {
            Some(n) => after = n.to_owned(),
            None => break,
        }
    }
    let expected: Vec<String> = (0..25).map(|i| format!("ctl-{i:02}")).collect();
    assert_eq!(seen, expected);
    let (_, b) = http(&relay, "GET", "/api/v1/clients?role=tool", t, None);
    let tools_seen: Vec<&str> = b["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["addr"].as_str().unwrap())
        .collect();
    assert_eq!(tools_seen, vec!["tool-0", "tool-1", "tool-2"]);
    let (s, b) = http(&relay, "GET", "/api/v1/stats", t, None);
    assert_eq!(s, 200);
    assert_eq!(b["connections_by_role"]["controller"], 25);
    assert_eq!(b["connections_by_role"]["tool"], 3);
    assert_eq!(b["shards"].as_array().unwrap().len(), 2);
    // Broadcast to one role.
    let (_, b) = http(
        &relay,
        "POST",
        "/api/v1/broadcast",
        t,
        Some(&json!({"payload":"all tools","role":"tool"})),
    );
    assert_eq!(b, json!({"count": 3}));
    for tool in tools.iter_mut() {
        tool.expect(FrameType::Data);
    }
    keep[0].expect_silence(Duration::from_millis(100));
    // Kick.
    let (s, _) = http(&relay, "DELETE", "/api/v1/clients/ctl-03", t, None);
    assert_eq!(s, 200);
    let (frames, closed) = keep[3].drain_until_closed(Duration::from_secs(3));
    assert!(closed);
    assert_eq!(
        frames[0].error_parts().unwrap().0,
        ErrorCode::Forbidden as u16
    );
    let (s, _) = http(&relay, "DELETE", "/api/v1/clients/ctl-03", t, None);
    assert_eq!(s, 404);
}

#[test]
fn metrics_and_health_move_with_traffic() {
    let relay = start(|_| {});
    let (s, b) = http(&relay, "GET", "/healthz", None, None);
    assert_eq!((s, b), (200, json!({"ok": true})));
    let count = |text: &str, name: &str| -> u64 {
        text.lines()
            .filter(|l| l.starts_with(name))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    };
    let (_, m0) = http(&relay, "GET", "/metrics", None, None);
    let m0 = m0.as_str().unwrap().to_owned();
    let mut a = Client::hello(relay.tcp_addr(), Form::Binary, &addrs_on("ma-", 0, 2, 1)[0]);
    let b_name = addrs_on("mb-", 1, 2, 1).remove(0);
    let mut b = Client::hello(relay.tcp_addr(), Form::Binary, &b_name);
    for i in 0..10 {
        a.data(&b_name, i + 1, true, b"m");
        b.expect(FrameType::Data);
        a.expect(FrameType::Ack);
    }
    a.data("nobody", 99, true, b"m");
    a.expect_error(ErrorCode::NoRoute);
    let (_, m1) = http(&relay, "GET", "/metrics", None, None);
    let m1 = m1.as_str().unwrap();
    assert!(count(m1, "relay_frames_in_total") >= count(&m0, "relay_frames_in_total") + 11);
    assert!(count(m1, "relay_frames_out_total") >= count(&m0, "relay_frames_out_total") + 10);
    assert!(count(m1, "relay_cross_shard_frames_total") >= 10);
    assert!(count(m1, "relay_dropped_frames_total{reason=\"no_route\"}") >= 1);
    assert!(count(m1, "relay_connections{role=\"controller\"") >= 2);
    assert!(count(m1, "process_resident_memory_bytes") > 0);
    assert!(count(m1, "relay_bytes_in_total") > count(&m0, "relay_bytes_in_total"));
}

#[test]
fn watch_groups_tap_what_a_controller_sends() {
    let relay = start(|c| c.auth.allow_client_join = false);
    let ctl_name = addrs_on("ctl-w-", 0, 2, 1).remove(0);
    let mut ctl = Client::hello(relay.tcp_addr(), Form::Binary, &ctl_name);
    let mut console = Browser::connect(
        &relay,
        &format!("addr={}", addrs_on("console-", 1, 2, 1)[0]),
    );
    console.recv_json();
    console
        .send_text(json!({"type":"join","group":format!("watch:{ctl_name}"),"seq":1,"ack":true}));
    assert_eq!(console.recv_json(), json!({"type":"ack","seq":1}));
    let mut other = Client::hello(relay.tcp_addr(), Form::Binary, "dash-1");
    let mut f = Frame::data(
        Bytes::new(),
        Bytes::from_static(b"dash-1"),
        &br#"{"temp":21}"#[..],
    );
    f.flags = Flags(Flags::JSON);
    ctl.send(&f);
    other.expect(FrameType::Data);
    let tapped = console.recv_json();
    assert_eq!(tapped["src"], ctl_name.as_str());
    assert_eq!(tapped["group"], format!("watch:{ctl_name}"));
    assert_eq!(tapped["payload"], json!({"temp":21}));
}

#[test]
fn in_hmac_mode_the_api_token_admits_the_console_and_services() {
    let relay = start(|c| {
        c.auth.mode = relay_config::AuthMode::Hmac;
        c.auth.secret = "fleet-secret-fleet-secret".into();
        c.http.api_token = Some(TOKEN.into());
    });
    let mut console = Browser::connect(
        &relay,
        &format!("addr=console-1&role=browser&token={TOKEN}"),
    );
    assert_eq!(console.recv_json()["type"], "welcome");
    let mut wrong = Browser::connect(&relay, "addr=console-2&role=browser&token=nope");
    assert_eq!(wrong.recv_json()["code"], "unauthorized");
    // Devices still need their own HMAC token.
    let device_token = relay_core::auth::token_for(b"fleet-secret-fleet-secret", b"ctl-1");
    let mut ctl = Client::hello_with(
        relay.tcp_addr(),
        Form::Binary,
        "ctl-1",
        json!({"token": device_token}),
    );
    console.send_text(json!({"type":"data","dst":"ctl-1","payload":{"cmd":"on"}}));
    assert_eq!(&ctl.expect(FrameType::Data).payload[..], br#"{"cmd":"on"}"#);
}

#[test]
fn the_console_is_served_with_a_content_security_policy() {
    use std::io::{Read, Write};
    let relay = start(|_| {});
    let mut s = std::net::TcpStream::connect(relay.http_addr().unwrap()).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: relay\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"));
    assert!(head.contains("content-type: text/html"));
    assert!(head.contains(&format!(
        "content-security-policy: {}",
        relay_shards::console::CSP
    )));
    assert!(body.contains("<html") || body.contains("<!doctype") || body.contains("<!DOCTYPE"));
}

#[test]
fn the_client_view_reports_meta_and_groups_and_empty_defaults() {
    let relay = start(with_token);
    let t = Some(TOKEN);
    let plain = addrs_on("plain-", 0, 2, 1).remove(0);
    let rich = addrs_on("rich-", 1, 2, 1).remove(0);
    let _p = Client::hello(relay.tcp_addr(), Form::Binary, &plain);
    let mut r = Client::hello_with(
        relay.tcp_addr(),
        Form::Json,
        &rich,
        json!({"meta": {"fw": "1.2.0", "site": "north"}}),
    );
    let mut j = Frame::new(FrameType::Join);
    j.dst = Bytes::from_static(b"boilers");
    j.seq = 7;
    j.flags = Flags(Flags::ACK_REQ);
    r.send(&j);
    assert_eq!(r.expect(FrameType::Ack).seq, 7);

    let (s, b) = http(&relay, "GET", &format!("/api/v1/clients/{plain}"), t, None);
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["meta"], json!({}));
    assert_eq!(b["groups"], json!([]));
    assert_eq!(b["uids"], json!([]));

    let (s, b) = http(&relay, "GET", &format!("/api/v1/clients/{rich}"), t, None);
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["meta"], json!({"fw": "1.2.0", "site": "north"}));
    assert_eq!(b["groups"], json!(["boilers"]));

    // Leaving empties the list again.
    let mut l = Frame::new(FrameType::Leave);
    l.dst = Bytes::from_static(b"boilers");
    l.seq = 8;
    l.flags = Flags(Flags::ACK_REQ);
    r.send(&l);
    assert_eq!(r.expect(FrameType::Ack).seq, 8);
    let (_, b) = http(&relay, "GET", &format!("/api/v1/clients/{rich}"), t, None);
    assert_eq!(b["groups"], json!([]));
}
