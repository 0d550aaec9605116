//! Rules running inside the relay: hooks fed by real connections, actions
//! routed back to clients, alarms and the device shadow through the API, and
//! a runaway script that cannot stop the relay from forwarding.

mod common;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Client, Form, http, test_config};
use relay_core::frame::{Flags, Frame, FrameType};
use relay_shards::Relay;
use serde_json::json;

struct RulesRelay {
    relay: Option<Relay>,
    host: Option<Arc<relay_plugins::PluginHost>>,
    dir: PathBuf,
}

impl Drop for RulesRelay {
    fn drop(&mut self) {
        drop(self.relay.take());
        if let Some(h) = self.host.take().and_then(|h| Arc::try_unwrap(h).ok()) {
            h.shutdown();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn start_with_rules(name: &str, scripts: &[(&str, &str)]) -> RulesRelay {
    start_with_rules_and(name, scripts, |_| {})
}

fn start_with_rules_and(
    name: &str,
    scripts: &[(&str, &str)],
    tweak: impl FnOnce(&mut relay_config::Config),
) -> RulesRelay {
    let dir = std::env::temp_dir().join(format!("relay-rules-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("rules")).unwrap();
    for (file, text) in scripts {
        std::fs::write(dir.join("rules").join(file), text).unwrap();
    }
    let mut cfg = test_config();
    cfg.plugins.enabled = true;
    cfg.plugins.dir = dir.join("rules").display().to_string();
    cfg.plugins.spool_dir = dir.join("spool").display().to_string();
    cfg.plugins.max_operations = 100_000;
    cfg.plugins.workers = 2;
    tweak(&mut cfg);
    let (ext, host) = relay_shards::rules::attach(&cfg).expect("rules engine starts");
    let relay = Relay::start_with(&cfg, ext).expect("relay starts");
    RulesRelay {
        relay: Some(relay),
        host: Some(host),
        dir,
    }
}

fn metric(relay: &Relay, name: &str) -> u64 {
    let (_, text) = http(relay, "GET", "/metrics", None, None);
    text.as_str()
        .unwrap()
        .lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

fn json_data(dst: &str, v: serde_json::Value) -> Frame {
    let mut f = Frame::data(
        bytes::Bytes::new(),
        dst.to_owned().into_bytes(),
        v.to_string().into_bytes(),
    );
    f.flags = Flags(Flags::JSON);
    f
}

#[test]
fn a_rule_answers_a_controller_through_the_relay() {
    let r = start_with_rules(
        "answer",
        &[(
            "echo.rhai",
            r#"
            fn on_message(msg) {
                let p = msg.payload;
                if type_of(p) == "map" && p.ping == true {
                    send(msg.src, #{ pong: true, seen: p.n });
                }
            }
            "#,
        )],
    );
    let relay = r.relay.as_ref().unwrap();
    let mut c = Client::hello(relay.tcp_addr(), Form::Json, "ctl-echo");
    let _sink = Client::hello(relay.tcp_addr(), Form::Binary, "sink");
    c.send(&json_data("sink", json!({"ping": true, "n": 7})));
    let f = c.expect(FrameType::Data);
    assert_eq!(&f.src[..], b"$rules");
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&f.payload).unwrap(),
        json!({"pong": true, "seen": 7})
    );
}

#[test]
fn alarms_and_the_device_shadow_are_served_by_the_api() {
    let r = start_with_rules(
        "alarms",
        &[(
            "hot.rhai",
            r#"
            fn on_message(msg) {
                let t = msg.payload?.temp;
                if t == () { return; }
                state_set(msg.src, "temp", t);
                if t > 80.0 { alarm_raise(`${msg.src}/overheat`, "critical", `${msg.src} reads ${t}`); }
            }
            fn on_disconnect(client, reason) {
                alarm_raise(`${client.addr}/offline`, "major", `${client.addr} offline (${reason})`);
            }
            "#,
        )],
    );
    let relay = r.relay.as_ref().unwrap();
    let mut c = Client::hello(relay.tcp_addr(), Form::Binary, "ctl-hot");
    c.send(&json_data("ctl-hot", json!({"temp": 91.5})));
    c.expect(FrameType::Data);
    let deadline = Instant::now() + Duration::from_secs(5);
    let items = loop {
        let (s, b) = http(relay, "GET", "/api/v1/alarms", None, None);
        assert_eq!(s, 200);
        let items = b["items"].as_array().unwrap().clone();
        if !items.is_empty() || Instant::now() > deadline {
            break items;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(items.len(), 1, "{items:?}");
    assert_eq!(items[0]["key"], "ctl-hot/overheat");
    assert_eq!(items[0]["severity"], "critical");
    let (_, state) = http(relay, "GET", "/api/v1/clients/ctl-hot/state", None, None);
    assert_eq!(state["temp"], 91.5);
    let (s, b) = http(
        relay,
        "POST",
        "/api/v1/alarms/ctl-hot%2Foverheat/ack",
        None,
        Some(&json!({"by": "ops-1"})),
    );
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["acked_by"], "ops-1");
    // The key as it is, slash and all.
    let (s, b) = http(
        relay,
        "POST",
        "/api/v1/alarms/ctl-hot/overheat/ack",
        None,
        Some(&json!({"by": "ops-2"})),
    );
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["key"], "ctl-hot/overheat");
    assert_eq!(b["acked_by"], "ops-1", "the first acknowledger stays");
    let (s, _) = http(
        relay,
        "POST",
        "/api/v1/alarms/nope/ack",
        None,
        Some(&json!({"by": "ops-1"})),
    );
    assert_eq!(s, 404);
    // The disconnect hook fires when the controller goes away.
    drop(c);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (_, b) = http(relay, "GET", "/api/v1/alarms", None, None);
        if b["items"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["key"] == "ctl-hot/offline")
        {
            break;
        }
        assert!(Instant::now() < deadline, "no offline alarm: {b}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let (s, b) = http(relay, "GET", "/api/v1/alarms/history", None, None);
    assert_eq!(s, 503, "history needs MySQL: {b}");
}

#[test]
fn a_runaway_script_is_stopped_while_the_relay_keeps_forwarding() {
    let r = start_with_rules(
        "runaway",
        &[(
            "loop.rhai",
            r#"
            fn on_message(msg) {
                let x = 0;
                loop { x += 1; }
            }
            fn on_connect(client) {
                let s = "x";
                loop { s += s; }
            }
            "#,
        )],
    );
    let relay = r.relay.as_ref().unwrap();
    let mut a = Client::hello(relay.tcp_addr(), Form::Binary, "ctl-a");
    let mut b = Client::hello(relay.tcp_addr(), Form::Json, "ctl-b");
    let start = Instant::now();
    for i in 0..200u32 {
        a.data("ctl-b", i + 1, true, &i.to_be_bytes());
        assert_eq!(&b.expect(FrameType::Data).payload[..], &i.to_be_bytes());
        a.expect(FrameType::Ack);
    }
    assert!(start.elapsed() < Duration::from_secs(30));
    let deadline = Instant::now() + Duration::from_secs(20);
    while metric(relay, "relay_rules_limit_trips_total") < 3 {
        assert!(Instant::now() < deadline, "limit trips were not counted");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(metric(relay, "relay_rules_errors_total") >= 3);
}

#[test]
fn a_full_rules_queue_drops_and_counts_and_a_slow_hook_is_stopped_by_the_clock() {
    // Cheap operations, slow overall: only the wall-clock bound stops it.
    let r = start_with_rules_and(
        "slowq",
        &[("slow.rhai", "fn on_message(msg) { loop { } }")],
        |c| {
            c.plugins.workers = 1;
            c.plugins.queue = 4;
            c.plugins.max_hook_ms = 50;
            c.plugins.max_operations = 1_000_000_000_000;
        },
    );
    let relay = r.relay.as_ref().unwrap();
    let mut c = Client::hello(relay.tcp_addr(), Form::Binary, "ctl-slowq");
    for seq in 1..=100 {
        c.data("ctl-slowq", seq, false, b"x");
    }
    for _ in 0..100 {
        c.expect(FrameType::Data);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while metric(relay, "relay_rules_limit_trips_total") < 2 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(metric(relay, "relay_rules_limit_trips_total") >= 2);
    let dropped = metric(
        relay,
        "relay_dropped_frames_total{reason=\"plugin_queue_full\"}",
    );
    assert!(
        dropped >= 50,
        "{dropped} events dropped of 100 for a queue of 4"
    );
    let (_, stats) = http(relay, "GET", "/api/v1/stats", None, None);
    assert!(stats["drops"]["plugin_queue_full"].as_u64().unwrap() >= dropped);
}

#[test]
fn devices_feed_the_rules_through_dollar_rules_without_an_echo() {
    let r = start_with_rules(
        "dollar",
        &[(
            "feed.rhai",
            r#"
            fn on_message(msg) {
                if msg.dst != "$rules" { return; }
                state_set(msg.src, "temp", msg.payload.temp);
            }
            "#,
        )],
    );
    let relay = r.relay.as_ref().unwrap();
    let mut c = Client::hello(relay.tcp_addr(), Form::Json, "ctl-feed");
    let mut f = json_data("$rules", json!({"temp": 21.5}));
    f.seq = 9;
    f.flags = Flags(Flags::JSON | Flags::ACK_REQ);
    c.send(&f);
    let ack = c.expect(FrameType::Ack);
    assert_eq!(ack.seq, 9, "acknowledged: the rules took it");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (_, state) = http(relay, "GET", "/api/v1/clients/ctl-feed/state", None, None);
        if state["temp"] == 21.5 {
            break;
        }
        assert!(Instant::now() < deadline, "rules never saw it: {state}");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Nothing came back to the device (no echo, no error).
    c.send(&json_data("ctl-feed", json!({"ping": 1})));
    let back = c.expect(FrameType::Data);
    assert_eq!(
        &back.src[..],
        b"ctl-feed",
        "the next frame is its own message"
    );
    assert_eq!(metric(relay, "relay_dropped_frames_total"), 0);
    // The same from a browser over WebSocket, in the JSON form.
    let mut b = common::Browser::connect(relay, "addr=web-feed&role=browser");
    assert_eq!(b.recv_json()["type"], "welcome");
    b.send_text(json!({"type":"data","dst":"$rules","seq":4,"ack":true,"payload":{"temp":19}}));
    assert_eq!(b.recv_json(), json!({"type":"ack","seq":4}));
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (_, state) = http(relay, "GET", "/api/v1/clients/web-feed/state", None, None);
        if state["temp"] == 19 {
            break;
        }
        assert!(Instant::now() < deadline, "rules never saw it: {state}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn dollar_rules_without_rules_is_an_error_for_the_sender() {
    let relay = common::start(|_| {});
    let mut c = Client::hello(relay.tcp_addr(), Form::Binary, "ctl-lonely");
    let mut f = json_data("$rules", json!({"temp": 1}));
    f.seq = 3;
    c.send(&f);
    assert_eq!(c.expect_error(relay_core::ErrorCode::NoRoute), 3);
}

/// Polls the device shadow of `addr` until `ok` holds (at most 10 s).
fn state_until(
    relay: &Relay,
    addr: &str,
    ok: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, state) = http(
            relay,
            "GET",
            &format!("/api/v1/clients/{addr}/state"),
            None,
            None,
        );
        if ok(&state) {
            return state;
        }
        assert!(Instant::now() < deadline, "rules never saw it: {state}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn mosquitto_pub(relay: &Relay, id: &str, topic: &str, payload: &serde_json::Value) {
    let s = std::process::Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p"])
        .arg(relay.mqtt_addr().unwrap().port().to_string())
        .args(["-i", id, "-V", "mqttv5", "-q", "1", "-t", topic, "-m"])
        .arg(payload.to_string())
        .status()
        .expect("mosquitto_pub runs");
    assert!(s.success(), "mosquitto_pub {topic}: {s}");
}

#[test]
fn mqtt_publishes_reach_the_rules_as_native_messages_do_and_rule_sends_reach_mqtt_clients() {
    let r = start_with_rules_and(
        "mqtt",
        &[(
            "mqtt.rhai",
            r#"
            fn on_message(msg) {
                let p = msg.payload;
                if type_of(p) == "f64" { state_set(msg.src, "scalar", p); }
                if type_of(p) != "map" { return; }
                let g = msg.group;
                if g == () { g = ""; }
                state_set(msg.src, p.kind, #{ dst: msg.dst, group: g, temp: p.temp });
                if p.temp > 80.0 {
                    send(msg.src, #{ alarm: "hot", temp: p.temp });
                    publish("alerts", #{ from: msg.src });
                }
            }
            "#,
        )],
        |c| c.listeners.mqtt = Some("127.0.0.1:0".parse().unwrap()),
    );
    let relay = r.relay.as_ref().unwrap();
    let _sink = Client::hello(relay.tcp_addr(), Form::Binary, "ctl-sink");
    // The same three messages from a native controller and an MQTT client.
    let mut ctl = Client::hello(relay.tcp_addr(), Form::Binary, "ctl-r1");
    let mut group = json_data("plant", json!({"kind": "group", "temp": 21.5}));
    group.kind = FrameType::Publish;
    ctl.send(&group);
    ctl.send(&json_data(
        "ctl-sink",
        json!({"kind": "data", "temp": 21.5}),
    ));
    ctl.send(&json_data("$rules", json!({"kind": "rules", "temp": 21.5})));
    let m = |kind: &str| json!({"kind": kind, "temp": 21.5});
    mosquitto_pub(relay, "mq-r1", "plant", &m("group"));
    mosquitto_pub(relay, "mq-r1", "relay/to/ctl-sink", &m("data"));
    mosquitto_pub(relay, "mq-r1", "relay/to/$rules", &m("rules"));
    // A topic that is no group name reaches the rules too, as the group.
    mosquitto_pub(relay, "mq-r1", "plant/boiler-7/temp", &m("topic"));
    // MQTT has no JSON flag: a payload that is JSON text is JSON, as a
    // native JSON payload is.
    ctl.send(&json_data("ctl-sink", json!(20.5)));
    mosquitto_pub(relay, "mq-r1", "plant/raw", &json!(20.5));
    let kinds = ["group", "data", "rules"];
    let native = state_until(relay, "ctl-r1", |s| {
        kinds.iter().all(|k| s[k].is_object()) && s["scalar"] == 20.5
    });
    let mqtt = state_until(relay, "mq-r1", |s| {
        kinds.iter().chain(&["topic"]).all(|k| s[k].is_object()) && s["scalar"] == 20.5
    });
    assert_eq!(
        native["group"],
        json!({"dst": "", "group": "plant", "temp": 21.5})
    );
    assert_eq!(
        native["data"],
        json!({"dst": "ctl-sink", "group": "", "temp": 21.5})
    );
    assert_eq!(
        native["rules"],
        json!({"dst": "$rules", "group": "", "temp": 21.5})
    );
    for k in kinds {
        assert_eq!(mqtt[k], native[k], "{k}");
    }
    assert_eq!(
        mqtt["topic"],
        json!({"dst": "", "group": "plant/boiler-7/temp", "temp": 21.5})
    );

    // A rule's reactions reach an MQTT client: its send on relay/from/$rules,
    // its publish to group "alerts" on topic "alerts".
    use rumqttc::{Event, MqttOptions, Packet, QoS};
    let mut o = MqttOptions::new("mq-hot", "127.0.0.1", relay.mqtt_addr().unwrap().port());
    o.set_keep_alive(Duration::from_secs(10));
    let (client, mut conn) = rumqttc::Client::new(o, 16);
    client.subscribe("relay/from/#", QoS::AtLeastOnce).unwrap();
    client.subscribe("alerts", QoS::AtLeastOnce).unwrap();
    let hot = json!({"kind": "hot", "temp": 91.5}).to_string();
    let (mut subacks, mut publish_due, mut got_send, mut got_alert) = (0, true, None, None);
    let deadline = Instant::now() + Duration::from_secs(20);
    while (got_send.is_none() || got_alert.is_none()) && Instant::now() < deadline {
        match conn.recv_timeout(Duration::from_secs(2)) {
            Ok(Ok(Event::Incoming(Packet::SubAck(_)))) => subacks += 1,
            Ok(Ok(Event::Incoming(Packet::Publish(p)))) => {
                let v: serde_json::Value = serde_json::from_slice(&p.payload).unwrap();
                match p.topic.as_str() {
                    "relay/from/$rules" => got_send = Some(v),
                    "alerts" => got_alert = Some(v),
                    t => panic!("unexpected topic {t}"),
                }
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => panic!("{e}"),
            // Nothing for 2 s: a subscription may have reached the other
            // shard only after the rule's publish (docs/mqtt.md); again.
            Err(_) => publish_due = true,
        }
        if subacks == 2 && publish_due {
            publish_due = false;
            client
                .publish("plant/hot", QoS::AtLeastOnce, false, hot.clone())
                .unwrap();
        }
    }
    assert_eq!(got_send, Some(json!({"alarm": "hot", "temp": 91.5})));
    assert_eq!(got_alert, Some(json!({"from": "mq-hot"})));
}

/// A shard whose input is steady waits on its sockets itself (the busy
/// loop), not on the rules' channel: a rule's send rings its kick, so the
/// action is routed at once rather than at the end of the loop's slice.
/// One shard: no other shard kicks it, so every kicked wait is the rules'.
#[test]
fn a_rule_action_wakes_a_shard_that_waits_on_its_sockets() {
    let r = start_with_rules_and(
        "kick",
        &[(
            "kick.rhai",
            r#"
            fn on_message(msg) {
                if msg.dst != "$rules" { return; }
                send("kick-out", msg.payload);
            }
            "#,
        )],
        |c| {
            c.shards.count = 1;
            c.shards.io = relay_config::IoBackend::Epoll;
            c.shards.slice_us = 20_000;
            c.shards.coalesce_us = 0;
        },
    );
    let relay = r.relay.as_ref().unwrap();
    let mut out = Client::hello(relay.tcp_addr(), Form::Json, "kick-out");
    let mut c = Client::hello(relay.tcp_addr(), Form::Json, "kick-in");
    let steady = common::Steady::start(relay.tcp_addr(), &common::names("kick-tx-", 8), "kick-rx");
    std::thread::sleep(Duration::from_millis(200));
    // An action wakes the loop only if it comes while the loop waits: on a
    // loaded machine that can take more actions (at most 400).
    let kicked = || common::counter(relay, "relay_busy_waits_kicked_total");
    for n in 0..400u64 {
        c.send(&json_data("$rules", json!({"n": n})));
        let f = out
            .recv_timeout(Duration::from_secs(5))
            .expect("the rule's frame");
        assert_eq!(&f.src[..], b"$rules");
        assert_eq!(
            serde_json::from_slice::<serde_json::Value>(&f.payload).unwrap(),
            json!({"n": n})
        );
        std::thread::sleep(Duration::from_millis(5));
        if n % 20 == 19 && kicked() > 0 {
            break;
        }
    }
    let (sent, received) = steady.stop();
    assert!(sent > 100, "the stream ran: {sent} frames");
    assert!(received > 0);
    assert!(
        common::counter(relay, "relay_busy_waits_total") > 0,
        "the stream kept the loop busy"
    );
    assert!(kicked() > 0, "no rule action woke the waiting loop");
}
