//! Access rules (`[acl]`) over real sockets: sends, joins, publishes and
//! watches allowed or refused with `forbidden`, HTTP API pushes as role
//! `api`, the default, the per-rule denial counters in `/metrics`, a reload
//! on SIGHUP, and `relay check-config` reporting every bad rule.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::{Client, Form, addrs_on, start};
use relay_config::acl::{AclConfig, AclEffect, AclRuleConfig};
use relay_core::ErrorCode;
use relay_core::frame::{Flags, Frame, FrameType};

fn rule(name: &str, effect: &str, actions: &[&str]) -> AclRuleConfig {
    AclRuleConfig {
        name: Some(name.to_owned()),
        effect: effect.to_owned(),
        actions: actions.iter().map(|s| s.to_string()).collect(),
        roles: Vec::new(),
        auth: Vec::new(),
        from: Vec::new(),
        member_of: Vec::new(),
        to: Vec::new(),
    }
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// The value of `relay_acl_denied_total{rule="<rule>"}`.
fn denied(relay: &relay_shards::Relay, rule: &str) -> u64 {
    let (_, body) = common::get(relay, "/metrics");
    let text = body.as_str().unwrap_or_default().to_owned();
    let prefix = format!("relay_acl_denied_total{{rule=\"{rule}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("no {prefix} in /metrics:\n{text}"))
        .trim()
        .parse()
        .unwrap()
}

fn group_frame(kind: FrameType, group: &str, seq: u32, payload: &[u8]) -> Frame {
    let mut f = Frame::new(kind);
    f.dst = Bytes::copy_from_slice(group.as_bytes());
    f.seq = seq;
    f.flags = Flags(Flags::ACK_REQ);
    f.payload = Bytes::copy_from_slice(payload);
    f
}

/// Sensors may send to collectors and nothing else; everyone else keeps the
/// default (allow). A denied send gets `forbidden` with its seq (and without
/// ACK_REQ too), reaches nobody, and is counted for its rule; the API is
/// role `api` and one of its pushes is refused with 403.
#[test]
fn allowed_sends_pass_and_denied_sends_get_forbidden() {
    let relay = start(|c| {
        c.http.api_token = Some("acl-test-token".into());
        let mut to_collectors = rule("sensors-to-collectors", "allow", &["send"]);
        to_collectors.from = strings(&["sensor-*"]);
        to_collectors.to = strings(&["collector-?"]);
        let mut nothing_else = rule("sensors-nothing-else", "deny", &["*"]);
        nothing_else.from = strings(&["sensor-*"]);
        let mut no_api = rule("no-api-to-sensors", "deny", &["send"]);
        no_api.roles = strings(&["api"]);
        no_api.to = strings(&["sensor-*"]);
        c.acl = AclConfig {
            default: AclEffect::Allow,
            rule: vec![to_collectors, nothing_else, no_api],
        };
    });
    let tcp = relay.tcp_addr();
    // On different shards, so the check is the sender's shard's.
    let sensor = addrs_on("sensor-", 0, 2, 1).remove(0);
    let other = addrs_on("other-", 1, 2, 1).remove(0);
    let mut s = Client::hello(tcp, Form::Binary, &sensor);
    let mut col = Client::hello(tcp, Form::Json, "collector-1");
    let mut o = Client::hello(tcp, Form::Binary, &other);

    s.data("collector-1", 1, true, b"21.5");
    assert_eq!(s.expect(FrameType::Ack).seq, 1);
    let f = col.expect(FrameType::Data);
    assert_eq!(&f.src[..], sensor.as_bytes());

    s.data(&other, 2, true, b"not for you");
    assert_eq!(s.expect_error(ErrorCode::Forbidden), 2);
    s.data(&other, 3, false, b"nor this");
    let f = s.expect(FrameType::Error);
    let (code, msg) = f.error_parts().unwrap();
    assert_eq!((code, f.seq), (ErrorCode::Forbidden as u16, 3));
    assert!(msg.contains("sensors-nothing-else"), "{msg}");
    o.expect_silence(Duration::from_millis(300));

    // Not a sensor: the default lets it through.
    o.data(&sensor, 4, true, b"hello sensor");
    assert_eq!(o.expect(FrameType::Ack).seq, 4);
    assert_eq!(&s.expect(FrameType::Data).payload[..], b"hello sensor");
    assert_eq!(denied(&relay, "sensors-nothing-else"), 2);
    assert_eq!(denied(&relay, "sensors-to-collectors"), 0);

    // The API: role api. Refused to a sensor (403 forbidden), allowed elsewhere.
    let token = Some("acl-test-token");
    let body = serde_json::json!({"dst": sensor, "payload": {"cmd": "x"}});
    let (status, v) = common::http(&relay, "POST", "/api/v1/send", token, Some(&body));
    assert_eq!(
        (status, v["error"].as_str()),
        (403, Some("forbidden")),
        "{v}"
    );
    let body = serde_json::json!({"dst": other, "payload": {"cmd": "y"}});
    let (status, v) = common::http(&relay, "POST", "/api/v1/send", token, Some(&body));
    assert_eq!(status, 200, "{v}");
    o.expect(FrameType::Data);
    s.expect_silence(Duration::from_millis(200));
    assert_eq!(denied(&relay, "no-api-to-sensors"), 1);
}

/// Browsers may join and publish to `room-*` only; a join elsewhere is
/// `forbidden`. A rule may grant watching a device without the service
/// token (which the protocol asks for otherwise), and deny it to others.
#[test]
fn group_joins_and_watches_follow_the_rules() {
    let relay = start(|c| {
        c.auth.mode = relay_config::AuthMode::Hmac;
        c.auth.secret = "0123456789abcdef0123456789abcdef".into();
        let mut rooms = rule("browsers-rooms", "allow", &["join", "publish"]);
        rooms.roles = strings(&["browser"]);
        rooms.to = strings(&["room-*"]);
        let mut watch = rule("ops-watch-controllers", "allow", &["watch"]);
        watch.from = strings(&["ops-*"]);
        watch.to = strings(&["ctl-*"]);
        let mut no_browser_groups = rule("browsers-no-other-groups", "deny", &["join", "watch"]);
        no_browser_groups.roles = strings(&["browser"]);
        c.acl = AclConfig {
            default: AclEffect::Allow,
            rule: vec![rooms, watch, no_browser_groups],
        };
    });
    let tcp = relay.tcp_addr();
    let secret = b"0123456789abcdef0123456789abcdef";
    let hello = |addr: &str, role: &str| {
        let token = relay_core::auth::token_for(secret, addr.as_bytes());
        Client::hello_with(
            tcp,
            Form::Json,
            addr,
            serde_json::json!({"token": token, "role": role}),
        )
    };
    let mut web = hello("web-1", "browser");
    let mut web2 = hello("web-2", "browser");
    let mut ctl = hello("ctl-1", "controller");
    let mut ops = hello("ops-1", "browser");

    web.send(&group_frame(FrameType::Join, "room-1", 1, b""));
    assert_eq!(web.expect(FrameType::Ack).seq, 1);
    web2.send(&group_frame(FrameType::Join, "room-1", 2, b""));
    assert_eq!(web2.expect(FrameType::Ack).seq, 2);
    web.send(&group_frame(FrameType::Join, "lobby", 3, b""));
    assert_eq!(web.expect_error(ErrorCode::Forbidden), 3);
    web.send(&group_frame(
        FrameType::Publish,
        "room-1",
        4,
        b"\"hi room\"",
    ));
    // The publisher is a member too: its copy and the ACK, in either order.
    let mut got: Vec<FrameType> = (0..2).map(|_| web.recv().kind).collect();
    got.sort_by_key(|k| *k as u8);
    assert_eq!(got, [FrameType::Data, FrameType::Ack]);
    assert_eq!(web2.expect(FrameType::Data).dst.as_ref(), b"room-1");

    // Watching ctl-1: granted to ops-1 by its rule (no service token),
    // refused to web-2 by the browsers' deny rule.
    ops.send(&group_frame(FrameType::Join, "watch:ctl-1", 5, b""));
    assert_eq!(ops.expect(FrameType::Ack).seq, 5);
    web2.send(&group_frame(FrameType::Join, "watch:ctl-1", 6, b""));
    assert_eq!(web2.expect_error(ErrorCode::Forbidden), 6);
    ctl.data("web-1", 7, true, b"\"reading\"");
    assert_eq!(ctl.expect(FrameType::Ack).seq, 7);
    assert_eq!(&ops.expect(FrameType::Data).src[..], b"ctl-1");
    assert_eq!(denied(&relay, "browsers-no-other-groups"), 2);
}

/// `default = "deny"`: only what a rule allows goes through; the rest is
/// `forbidden` and counted under `default`.
#[test]
fn default_deny_refuses_what_no_rule_allows_and_counts_it() {
    let relay = start(|c| {
        let mut echo = rule("to-collector", "allow", &["send"]);
        echo.to = strings(&["collector-1"]);
        let mut api = rule("backend", "allow", &["send", "publish"]);
        api.roles = strings(&["api"]);
        c.acl = AclConfig {
            default: AclEffect::Deny,
            rule: vec![echo, api],
        };
    });
    let tcp = relay.tcp_addr();
    let mut a = Client::hello(tcp, Form::Binary, "dev-a");
    let mut b = Client::hello(tcp, Form::Binary, "dev-b");
    let mut col = Client::hello(tcp, Form::Binary, "collector-1");
    a.data("collector-1", 1, true, b"ok");
    assert_eq!(a.expect(FrameType::Ack).seq, 1);
    col.expect(FrameType::Data);
    a.data("dev-b", 2, true, b"no");
    assert_eq!(a.expect_error(ErrorCode::Forbidden), 2);
    a.send(&group_frame(FrameType::Join, "g1", 3, b""));
    assert_eq!(a.expect_error(ErrorCode::Forbidden), 3);
    a.send(&group_frame(FrameType::Publish, "g1", 4, b"x"));
    let f = a.expect(FrameType::Error);
    let (_, msg) = f.error_parts().unwrap();
    assert!(msg.contains("default deny"), "{msg}");
    b.expect_silence(Duration::from_millis(200));
    assert_eq!(denied(&relay, "default"), 3);
    // The backend's pushes are allowed by their rule.
    let body = serde_json::json!({"dst": "dev-b", "payload": "from the backend"});
    let (status, v) = common::http(&relay, "POST", "/api/v1/send", None, Some(&body));
    assert_eq!(status, 200, "{v}");
    assert_eq!(&b.expect(FrameType::Data).src[..], b"$api");
}

/// SIGHUP applies new rules to clients already connected; the counters of
/// a rule that stays carry on.
#[test]
fn sighup_reloads_the_rules_for_connected_clients() {
    let dir = std::env::temp_dir().join(format!("relay-acl-reload-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("relay.toml");
    let base = "[listeners]\ntcp = \"127.0.0.1:0\"\nhttp = \"127.0.0.1:0\"\n\
                [shards]\ncount = 2\npin = false\nio_memory_kib = 256\n[plugins]\nenabled = false\n";
    let rules = |extra: &str| {
        format!(
            "{base}[acl]\ndefault = \"allow\"\n[[acl.rule]]\nname = \"no-x\"\neffect = \"deny\"\n\
             actions = [\"send\"]\nto = [\"x-*\"]\n{extra}"
        )
    };
    std::fs::write(&file, rules("")).unwrap();
    let mut relay = common::RelayProc::spawn(&file, &[]);
    let mut a = Client::hello(relay.tcp, Form::Binary, "dev-a");
    let mut b = Client::hello(relay.tcp, Form::Binary, "dev-b");
    let _x = Client::hello(relay.tcp, Form::Binary, "x-1");
    a.data("x-1", 1, true, b"no");
    assert_eq!(a.expect_error(ErrorCode::Forbidden), 1);
    a.data("dev-b", 2, true, b"yes");
    assert_eq!(a.expect(FrameType::Ack).seq, 2);
    b.expect(FrameType::Data);

    std::fs::write(
        &file,
        rules("[[acl.rule]]\nname = \"no-b\"\neffect = \"deny\"\nactions = [\"send\"]\nto = [\"dev-b\"]\n"),
    )
    .unwrap();
    relay.signal(libc::SIGHUP);
    relay.wait_log("access rules reloaded", Duration::from_secs(10));
    // Each shard takes the new settings on its next sweep (within 100 ms).
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let mut seq = 3;
    loop {
        a.data("dev-b", seq, true, b"now no?");
        let f = a.recv();
        if f.kind == FrameType::Error {
            assert_eq!(f.error_parts().unwrap().0, ErrorCode::Forbidden as u16);
            break;
        }
        assert_eq!((f.kind, f.seq), (FrameType::Ack, seq));
        b.expect(FrameType::Data);
        assert!(
            std::time::Instant::now() < deadline,
            "the new rule never applied"
        );
        std::thread::sleep(Duration::from_millis(50));
        seq += 1;
    }
    a.data("x-1", 100, true, b"still no");
    assert_eq!(a.expect_error(ErrorCode::Forbidden), 100);
    b.expect_silence(Duration::from_millis(200));
    let (_, metrics) = relay.get("/metrics");
    assert!(
        metrics.contains("relay_acl_denied_total{rule=\"no-x\"} 2\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains("relay_acl_denied_total{rule=\"no-b\"} 1\n"),
        "{metrics}"
    );
    assert!(relay.stop(Duration::from_secs(10)).success());
    let _ = std::fs::remove_dir_all(&dir);
}

/// `relay check-config` names every bad rule: pattern, role, action, effect.
#[test]
fn check_config_reports_every_bad_rule() {
    let dir = std::env::temp_dir().join(format!("relay-acl-check-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("acl.toml");
    std::fs::write(
        &bad,
        "[acl]\ndefault = \"deny\"\n\
         [[acl.rule]]\neffect = \"allow\"\nactions = [\"send\", \"teleport\"]\n\
         roles = [\"robot\"]\nto = [\"ctl 1\"]\n\
         [[acl.rule]]\neffect = \"maybe\"\nactions = [\"join\"]\n",
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_relay"))
        .arg("check-config")
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8(out.stderr).unwrap();
    for needle in [
        "acl.rule[0].actions[1]",
        "unknown action \"teleport\"",
        "acl.rule[0].roles[0]",
        "unknown role \"robot\"",
        "acl.rule[0].to[0]",
        "acl.rule[1].effect",
    ] {
        assert!(err.contains(needle), "missing {needle} in:\n{err}");
    }
    let good = dir.join("good.toml");
    std::fs::write(
        &good,
        "[acl]\ndefault = \"deny\"\n[[acl.rule]]\neffect = \"allow\"\nactions = [\"*\"]\n\
         roles = [\"controller\", \"api\"]\nfrom = [\"sensor-*\"]\n",
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_relay"))
        .arg("check-config")
        .arg(&good)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = std::fs::remove_dir_all(&dir);
}
