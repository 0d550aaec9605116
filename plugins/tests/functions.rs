//! Every script function against the real sinks: Redis for the device shadow,
//! counters, presence and alarm state; MariaDB for persist, alarm history and
//! notifier attempts; the action channel for send and publish.
mod common;

use std::time::Duration;

use common::*;
use redis::Commands;
use relay_config::plugins::{ColumnConfig, ColumnType, TableConfig};
use relay_plugins::{Action, Event, PluginHost};
use serde_json::json;

const RULES: &str = r#"
fn on_connect(client) {
    state_set(client.addr, "online", true);
    state_set(client.addr, "fw", client.meta.fw);
    alarm_clear(`${client.addr}/offline`);
}
fn on_disconnect(client, reason) {
    state_set(client.addr, "online", false);
    alarm_raise(`${client.addr}/offline`, "major", `${client.addr} offline (${reason})`);
}
fn on_message(msg) {
    let p = msg.payload;
    if type_of(p) != "map" { log(`blob of ${msg.size} bytes from ${msg.src}`); return; }
    if p.kind == "reading" {
        state_set(msg.src, "temp", p.temp);
        let prev = state_get(msg.src, "temp");
        let all = state_get(msg.src);
        persist("readings", #{ addr: msg.src, temp: p.temp, ok: p.temp < 80.0, raw: p });
        let visits = counter_add(`room/${p.room}`, 1);
        if visits == 2 { send(msg.src, #{ cmd: "visits", n: counter_get(`room/${p.room}`), seen: all.temp == prev }); }
    }
    if p.kind == "hello" { publish("room-1", "plain text"); log(`now=${now_ms()}`); }
    if p.kind == "page" { notify("log", "ops", `paged by ${msg.src}`); }
    if p.kind == "bad_table" { persist("nope", #{ a: 1 }); }
    if p.kind == "bad_column" { persist("readings", #{ nope: 1 }); }
    if p.kind == "bad_type" { persist("readings", #{ temp: "hot" }); }
    if p.kind == "bad_severity" { alarm_raise("x", "apocalyptic", "x"); }
    if p.kind == "bad_channel" { notify("pigeon", "x", "x"); }
    if p.kind == "alarm" { alarm_raise(`${msg.src}/a`, p.sev, "text"); }
    if p.kind == "clear" { let was = alarm_active(`${msg.src}/a`); alarm_clear(`${msg.src}/a`); send(msg.src, #{ was: was }); }
}
"#;

fn readings_table(id: &str) -> TableConfig {
    let col = |n: &str, kind| ColumnConfig {
        name: n.into(),
        kind,
    };
    TableConfig {
        name: format!("{id}_readings"),
        columns: vec![
            col("addr", ColumnType::String),
            col("temp", ColumnType::Float),
            col("ok", ColumnType::Bool),
            col("raw", ColumnType::Json),
        ],
    }
}

#[test]
fn every_function_reaches_its_sink() {
    require_services();
    init_log();
    let id = unique("fn");
    let rules = RULES.replace("\"readings\"", &format!("\"{id}_readings\""));
    let (cfg, id) = {
        let (mut cfg, _) = config("fn", &[("all.rhai", &rules)], vec![]);
        cfg.mysql.tables = vec![readings_table(&id)];
        cfg.mysql.alarm_table = format!("{id}_alarms");
        cfg.mysql.notify_table = format!("{id}_notify");
        cfg.redis.key_prefix = format!("{id}:");
        (cfg, id)
    };
    let (host, actions) = PluginHost::start_with(cfg).unwrap();
    let ev = host.events();
    let mut r = redis();

    // Connect / disconnect: shadow, presence, alarms.
    assert!(ev.try_send(Event::Connect(client("ctl-1", "controller"))));
    wait_for(Duration::from_secs(5), "presence in redis", || {
        let v: Option<String> = r.hget(format!("{id}:presence"), "ctl-1").unwrap();
        v.filter(|v| v.contains("controller"))
    });
    assert_eq!(host.state("ctl-1").get("fw"), Some(&json!("1.2")));
    assert!(ev.try_send(Event::Disconnect(
        client("ctl-1", "controller"),
        "idle_timeout".into()
    )));
    wait_for(Duration::from_secs(5), "offline alarm", || {
        host.alarms().into_iter().find(|a| a.key == "ctl-1/offline")
    });
    let alarm = host
        .alarms()
        .into_iter()
        .find(|a| a.key == "ctl-1/offline")
        .unwrap();
    assert_eq!(alarm.text, "ctl-1 offline (idle_timeout)");
    wait_for(Duration::from_secs(5), "alarm stored in redis", || {
        let v: Option<String> = r.hget(format!("{id}:alarms"), "ctl-1/offline").unwrap();
        v
    });
    wait_for(Duration::from_secs(5), "presence removed", || {
        let v: Option<String> = r.hget(format!("{id}:presence"), "ctl-1").unwrap();
        v.is_none().then_some(())
    });
    assert!(ev.try_send(Event::Connect(client("ctl-1", "controller"))));
    wait_for(Duration::from_secs(5), "offline alarm cleared", || {
        host.alarms().is_empty().then_some(())
    });
    wait_for(Duration::from_secs(5), "alarm removed from redis", || {
        let v: Option<String> = r.hget(format!("{id}:alarms"), "ctl-1/offline").unwrap();
        v.is_none().then_some(())
    });

    // Readings: state, persist, counters, send.
    for t in [21.5, 85.0] {
        assert!(ev.try_send(msg(
            "ctl-1",
            json!({"kind": "reading", "temp": t, "room": "r1"})
        )));
    }
    let got = take_actions(&actions, 1, Duration::from_secs(5));
    match &got[..] {
        [Action::Send { dst, payload, json }] => {
            assert_eq!(dst, "ctl-1");
            assert!(*json);
            let v: serde_json::Value = serde_json::from_slice(payload).unwrap();
            assert_eq!(v, json!({"cmd": "visits", "n": 2, "seen": true}));
        }
        other => panic!("expected one send, got {other:?}"),
    }
    wait_for(Duration::from_secs(5), "shadow in redis", || {
        let v: Option<String> = r.hget(format!("{id}:state:ctl-1"), "temp").unwrap();
        v.filter(|v| v == "85.0")
    });
    let counters: i64 = wait_for(Duration::from_secs(5), "counter in redis", || {
        let v: Option<i64> = r.hget(format!("{id}:counters"), "room/r1").unwrap();
        v.filter(|v| *v == 2)
    });
    assert_eq!(counters, 2);
    assert_eq!(host.counter("room/r1"), 2);
    let rows = wait_for(Duration::from_secs(5), "persisted rows", || {
        mysql_rows_opt(&format!(
            "SELECT addr, temp, ok, raw FROM `{id}_readings` ORDER BY id"
        ))
        .filter(|r| r.len() == 2)
    });
    assert_eq!(rows[0][..3], ["ctl-1", "21.5", "1"]);
    assert_eq!(rows[1][..3], ["ctl-1", "85", "0"]);
    let raw: serde_json::Value = serde_json::from_str(&rows[1][3]).unwrap();
    assert_eq!(raw["room"], "r1");

    // Publish a plain string; log; notify through the log channel (attempt recorded).
    assert!(ev.try_send(msg("ctl-2", json!({"kind": "hello"}))));
    let got = take_actions(&actions, 1, Duration::from_secs(5));
    assert_eq!(
        got,
        [Action::Publish {
            group: "room-1".into(),
            payload: "plain text".into(),
            json: false
        }]
    );
    assert!(ev.try_send(msg("ctl-2", json!({"kind": "page"}))));
    let rows = wait_for(Duration::from_secs(5), "notify attempt row", || {
        mysql_rows_opt(&format!(
            "SELECT channel, target, event, status FROM `{id}_notify`"
        ))
        .filter(|r| !r.is_empty())
    });
    assert_eq!(rows[0], ["log", "ops", "message", "sent"]);

    // Alarm transitions land in the history table in order.
    for kind in [
        json!({"kind": "alarm", "sev": "minor"}),
        json!({"kind": "alarm", "sev": "critical"}),
    ] {
        assert!(ev.try_send(msg("ctl-3", kind)));
    }
    let v = wait_for(Duration::from_secs(5), "escalated alarm", || {
        host.alarms()
            .into_iter()
            .find(|a| a.key == "ctl-3/a" && a.severity.as_str() == "critical")
    });
    host.ack("ctl-3/a", "alice").unwrap();
    assert_eq!(v.count, 2);
    assert!(ev.try_send(msg("ctl-3", json!({"kind": "clear"}))));
    let got = take_actions(&actions, 1, Duration::from_secs(5));
    assert_eq!(got.len(), 1);
    let hist = wait_for(Duration::from_secs(5), "alarm history", || {
        mysql_rows_opt(&format!(
            "SELECT transition, severity, IFNULL(acked_by, '-') FROM `{id}_alarms` WHERE alarm_key = 'ctl-3/a' ORDER BY id"
        ))
        .filter(|r| r.len() == 4)
    });
    let hist: Vec<Vec<&str>> = hist
        .iter()
        .map(|r| r.iter().map(String::as_str).collect())
        .collect();
    assert_eq!(
        hist,
        [
            ["raised", "minor", "-"],
            ["escalated", "critical", "-"],
            ["acknowledged", "critical", "alice"],
            ["cleared", "critical", "-"]
        ]
    );

    // Bad calls are script errors, counted, and do not stop later events.
    let before = host.stats().script_errors;
    for k in [
        "bad_table",
        "bad_column",
        "bad_type",
        "bad_severity",
        "bad_channel",
    ] {
        assert!(ev.try_send(msg("ctl-4", json!({"kind": k}))));
    }
    assert!(ev.try_send(msg("ctl-4", vec![0u8, 1, 2].into())));
    wait_for(Duration::from_secs(5), "five script errors", || {
        (host.stats().script_errors == before + 5).then_some(())
    });

    let stats = host.stats();
    assert!(stats.sink_writes > 0);
    assert_eq!(stats.events_dropped, 0);
    host.shutdown();
    let _: () = r.del(format!("{id}:state:ctl-1")).unwrap();
    drop_tables(&[
        format!("{id}_readings"),
        format!("{id}_alarms"),
        format!("{id}_notify"),
    ]);
}

#[test]
fn alarms_are_listed_in_pages() {
    require_services();
    init_log();
    let rules = r#"fn on_message(msg) { alarm_raise(msg.payload.key, "minor", "x"); }"#;
    let (cfg, id) = config("page", &[("p.rhai", rules)], vec![]);
    let (host, _a) = PluginHost::start_with(cfg).unwrap();
    for k in ["b", "c", "a"] {
        host.events().try_send(msg("s", json!({"key": k})));
    }
    wait_for(Duration::from_secs(5), "three alarms", || {
        (host.alarms().len() == 3).then_some(())
    });
    let p1 = host.alarms_page(None, 2);
    assert_eq!(
        p1.items.iter().map(|a| a.key.as_str()).collect::<Vec<_>>(),
        ["a", "b"]
    );
    assert_eq!(p1.next.as_deref(), Some("b"));
    let p2 = host.alarms_page(p1.next.as_deref(), 2);
    assert_eq!(
        p2.items.iter().map(|a| a.key.as_str()).collect::<Vec<_>>(),
        ["c"]
    );
    assert_eq!(p2.next, None);
    let body = serde_json::to_value(&p2).unwrap();
    assert_eq!(body["items"][0]["severity"], "minor");
    assert!(body["next"].is_null());
    host.shutdown();
    cleanup(&id, &[]);
}

#[test]
fn alarm_history_reads_back_newest_first_in_pages() {
    require_services();
    init_log();
    let rules = r#"fn on_message(msg) { if msg.payload.up { alarm_raise("h/1", "major", "t"); } else { alarm_clear("h/1"); } }"#;
    let (cfg, id) = config("hist", &[("h.rhai", rules)], vec![]);
    let mysql = cfg.mysql.clone();
    let (host, _a) = PluginHost::start_with(cfg).unwrap();
    for up in [true, false, true] {
        host.events().try_send(msg("s", json!({"up": up})));
    }
    wait_for(Duration::from_secs(5), "three transitions stored", || {
        mysql_rows_opt(&format!("SELECT id FROM `{id}_alarms`")).filter(|r| r.len() == 3)
    });
    let (tx, rx) = std::sync::mpsc::channel();
    relay_plugins::history::alarm_history_in_background(mysql.clone(), 2, None, move |r| {
        tx.send(r).unwrap();
    });
    let (items, next) = rx.recv_timeout(Duration::from_secs(10)).unwrap().unwrap();
    let tr: Vec<&str> = items
        .iter()
        .map(|i| i["transition"].as_str().unwrap())
        .collect();
    assert_eq!(tr, ["raised", "cleared"], "newest first");
    assert_eq!(items[0]["key"], "h/1");
    assert_eq!(items[0]["severity"], "major");
    let next = next.expect("a second page");
    let (tx, rx) = std::sync::mpsc::channel();
    relay_plugins::history::alarm_history_in_background(mysql.clone(), 2, Some(next), move |r| {
        tx.send(r).unwrap();
    });
    let (items, next) = rx.recv_timeout(Duration::from_secs(10)).unwrap().unwrap();
    assert_eq!(items.len(), 1);
    assert_eq!(items[0]["transition"], "raised");
    assert_eq!(next, None);
    // MySQL off: a clear error, no connection attempt.
    let mut off = mysql.clone();
    off.enabled = false;
    let (tx, rx) = std::sync::mpsc::channel();
    relay_plugins::history::alarm_history_in_background(off, 10, None, move |r| {
        tx.send(r).unwrap()
    });
    assert!(
        rx.recv_timeout(Duration::from_secs(10))
            .unwrap()
            .unwrap_err()
            .contains("enabled")
    );
    // A table that does not exist yet reads as empty.
    let mut none = mysql;
    none.alarm_table = format!("{id}_never");
    let (tx, rx) = std::sync::mpsc::channel();
    relay_plugins::history::alarm_history_in_background(none, 10, None, move |r| {
        tx.send(r).unwrap()
    });
    assert_eq!(
        rx.recv_timeout(Duration::from_secs(10)).unwrap().unwrap(),
        (vec![], None)
    );
    host.shutdown();
    cleanup(&id, &[]);
}
