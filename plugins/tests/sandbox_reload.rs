//! The sandbox and hot reload on a live host: an endless loop or an unbounded
//! allocation is stopped, logged with file and line and counted, while the other
//! workers keep going; a reload with a broken file keeps the old rules; a good
//! edit (file change or SIGHUP) takes effect.
mod common;

use std::time::Duration;

use common::*;
use relay_plugins::{Action, Event, PluginHost};
use serde_json::json;

const RULES: &str = r#"
fn on_message(msg) {
    if msg.src == "evil-loop" { loop { } }
    if msg.src == "evil-string" { let s = "xx"; loop { s += s; } }
    if msg.src == "evil-array" { let a = []; loop { a.push(a.len()); } }
    if msg.src == "evil-map" { let m = #{}; let i = 0; loop { m[`k${i}`] = i; i += 1; } }
    if msg.src == "evil-recursion" { deep(1); }
    send(msg.src, #{ ok: true, version: 1 });
}
fn deep(n) { deep(n + 1) }
"#;

/// Two addresses that hash to different workers (of 2).
fn addr_on(worker: usize) -> String {
    (0..100)
        .map(|i| format!("good-{i}"))
        .find(|a| Event::worker_of(a, 2) == worker)
        .unwrap()
}

#[test]
fn runaway_scripts_are_stopped_and_others_keep_going() {
    require_services();
    init_log();
    let (mut cfg, id) = config("sandbox", &[("evil.rhai", RULES)], vec![]);
    cfg.plugins.workers = 2;
    cfg.plugins.max_operations = 500_000;
    cfg.plugins.max_string_size = 100_000;
    cfg.plugins.max_array_size = 10_000;
    cfg.plugins.max_map_size = 1_000;
    let (host, actions) = PluginHost::start_with(cfg).unwrap();
    let ev = host.events();
    let evil = [
        "evil-loop",
        "evil-string",
        "evil-array",
        "evil-map",
        "evil-recursion",
    ];
    for e in evil {
        ev.try_send(msg(e, json!({})));
    }
    // Workers stay responsive, on both threads.
    let good: Vec<String> = (0..2).map(addr_on).collect();
    for g in &good {
        ev.try_send(msg(g, json!({})));
    }
    let got = take_actions(&actions, 2, Duration::from_secs(20));
    let dsts: Vec<&str> = got
        .iter()
        .filter_map(|a| match a {
            Action::Send { dst, .. } => Some(dst.as_str()),
            _ => None,
        })
        .collect();
    for g in &good {
        assert!(dsts.contains(&g.as_str()), "{g} answered: {dsts:?}");
    }
    wait_for(Duration::from_secs(20), "five limit trips", || {
        let s = host.stats();
        (s.limit_trips == 5 && s.script_errors == 5).then_some(())
    });
    // And after the trips, the workers still run scripts.
    ev.try_send(msg(&good[0], json!({})));
    assert_eq!(take_actions(&actions, 1, Duration::from_secs(5)).len(), 1);
    host.shutdown();
    cleanup(&id, &[]);
}

#[test]
fn broken_reload_keeps_old_rules_and_good_edits_apply() {
    require_services();
    init_log();
    let v1 = "fn on_message(msg) { send(msg.src, #{ version: 1 }); }";
    let (mut cfg, id) = config("reload", &[("a.rhai", v1)], vec![]);
    cfg.plugins.workers = 1;
    let dir = std::path::PathBuf::from(&cfg.plugins.dir);
    let (host, actions) = PluginHost::start_with(cfg).unwrap();
    let ev = host.events();
    let version = |who: &str| -> i64 {
        ev.try_send(msg(who, json!({})));
        match take_actions(&actions, 1, Duration::from_secs(5)).pop() {
            Some(Action::Send { payload, .. }) => {
                serde_json::from_slice::<serde_json::Value>(&payload).unwrap()["version"]
                    .as_i64()
                    .unwrap()
            }
            other => panic!("no answer: {other:?}"),
        }
    };
    assert_eq!(version("c"), 1);

    // A broken edit: reported, counted, old version still runs.
    std::fs::write(
        dir.join("a.rhai"),
        "fn on_message(msg) { send(msg.src, #{ version: 2 }) ",
    )
    .unwrap();
    wait_for(Duration::from_secs(5), "reload failure counted", || {
        (host.stats().reload_failures >= 1).then_some(())
    });
    assert_eq!(version("c"), 1, "the previous version keeps running");

    // A good edit applies.
    std::fs::write(
        dir.join("a.rhai"),
        "fn on_message(msg) { send(msg.src, #{ version: 3 }); }",
    )
    .unwrap();
    wait_for(Duration::from_secs(5), "reloaded", || {
        (version("c") == 3).then_some(())
    });

    host.shutdown();
    cleanup(&id, &[]);
}

#[test]
fn sighup_reloads() {
    require_services();
    init_log();
    let (mut cfg, id) = config(
        "sighup",
        &[("a.rhai", "fn on_message(msg) { send(msg.src, 1); }")],
        vec![],
    );
    // The folder is never polled in this test: only the signal can cause a reload.
    cfg.plugins.reload_poll_ms = 600_000;
    let dir = std::path::PathBuf::from(&cfg.plugins.dir);
    let (host, actions) = PluginHost::start_with(cfg).unwrap();
    let ev = host.events();
    let answer = || -> String {
        ev.try_send(msg("c", json!({})));
        match take_actions(&actions, 1, Duration::from_secs(5)).pop() {
            Some(Action::Send { payload, .. }) => String::from_utf8(payload.to_vec()).unwrap(),
            other => panic!("no answer: {other:?}"),
        }
    };
    assert_eq!(answer(), "1");
    std::fs::write(
        dir.join("a.rhai"),
        "fn on_message(msg) { send(msg.src, 2); }",
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(answer(), "1", "no reload without the signal");
    signal_hook::low_level::raise(signal_hook::consts::SIGHUP).unwrap();
    wait_for(Duration::from_secs(5), "reload on SIGHUP", || {
        (host.stats().reloads >= 1).then_some(())
    });
    assert_eq!(answer(), "2");
    host.shutdown();
    cleanup(&id, &[]);
}
