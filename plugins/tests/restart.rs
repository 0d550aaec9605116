//! A restart of the relay with active alarms, pending `alarm_when` timers and
//! pending escalation steps: a new host on the same Redis and spool forgets nothing.
//! Also: Redis down while alarms change; the spool carries them into the next run.
mod common;

use std::time::{Duration, Instant};

use common::*;
use relay_plugins::PluginHost;
use serde_json::json;

const RULES: &str = r#"
fn on_message(msg) {
    let p = msg.payload;
    if p.kind == "temp" { alarm_when(`${msg.src}/hot`, p.t > 80, 2, "major", `${msg.src} hot`); }
    if p.kind == "raise" { alarm_raise(p.key, "critical", "fire"); }
    if p.kind == "state" { state_set(msg.src, "v", p.v); counter_add("seen", 1); }
}
"#;

#[test]
fn alarms_timers_and_escalations_survive_a_restart() {
    require_services();
    init_log();
    let server = HttpServer::start(vec![200]);
    let (mut cfg, id) = config("restart", &[("r.rhai", RULES)], vec![]);
    cfg.notify = toml::from_str(&format!(
        r#"
        [[notifier]]
        name = "sms"
        url = "http://127.0.0.1:{}/sms/{{{{key}}}}"
        retries = 0
        [[route]]
        severities = ["critical"]
        chain = [{{ channel = "sms", target = "+1", after_s = 3 }}]
        "#,
        server.addr.port()
    ))
    .unwrap();

    let (host, _a) = PluginHost::start_with(cfg.clone()).unwrap();
    let ev = host.events();
    let t0 = Instant::now();
    ev.try_send(msg("c1", json!({"kind": "raise", "key": "c1/fire"})));
    ev.try_send(msg("c2", json!({"kind": "temp", "t": 95})));
    ev.try_send(msg("c3", json!({"kind": "state", "v": 7})));
    wait_for(Duration::from_secs(3), "alarm raised", || {
        host.alarms().into_iter().find(|a| a.key == "c1/fire")
    });
    wait_for(Duration::from_secs(3), "state written", || {
        (host.state("c3").get("v") == Some(&json!(7))).then_some(())
    });
    // Give the sink a moment to write the timer, then stop before anything is due.
    std::thread::sleep(Duration::from_millis(150));
    host.shutdown();
    assert!(
        t0.elapsed() < Duration::from_millis(2000),
        "restart must happen before the timer is due"
    );
    assert!(server.requests().is_empty());

    let (host, _a) = PluginHost::start_with(cfg).unwrap();
    // The active alarm is back at once, with its original raise time.
    let a = host
        .alarms()
        .into_iter()
        .find(|a| a.key == "c1/fire")
        .expect("alarm restored");
    assert_eq!(a.severity.as_str(), "critical");
    assert!(a.next_step_ms.is_some(), "escalation still pending");
    // State and counters are back.
    assert_eq!(host.state("c3").get("v"), Some(&json!(7)));
    assert_eq!(host.counter("seen"), 1);
    // The pending alarm_when timer fires with no new reading.
    let hot = wait_for(Duration::from_secs(5), "timer fired after restart", || {
        host.alarms().into_iter().find(|a| a.key == "c2/hot")
    });
    assert!(
        t0.elapsed() >= Duration::from_millis(1950),
        "fired at its time, not at restart"
    );
    assert_eq!(hot.text, "c2 hot");
    // The escalation step fires at its time.
    let sms = wait_for(Duration::from_secs(6), "escalation after restart", || {
        server
            .requests()
            .into_iter()
            .find(|r| r.path == "/sms/c1/fire")
    });
    assert!(sms.at.duration_since(t0) >= Duration::from_millis(2900));
    host.shutdown();
    cleanup(&id, &[]);
}

#[test]
fn alarm_changes_while_redis_is_down_reach_the_next_run() {
    require_services();
    init_log();
    let proxy = Proxy::start("127.0.0.1:6379");
    let (mut cfg, id) = config("redisdown", &[("r.rhai", RULES)], vec![]);
    cfg.redis.url = format!("redis://{}/", proxy.addr);
    cfg.redis.op_timeout_ms = 500;
    cfg.redis.connect_timeout_ms = 500;
    let (host, _a) = PluginHost::start_with(cfg.clone()).unwrap();
    let ev = host.events();
    proxy.cut();
    ev.try_send(msg("c1", json!({"kind": "raise", "key": "k/down"})));
    ev.try_send(msg("c1", json!({"kind": "state", "v": 3})));
    wait_for(Duration::from_secs(5), "spooled", || {
        (host.stats().sink_spooled >= 3).then_some(())
    });
    host.shutdown();

    proxy.restore();
    let (host, _a) = PluginHost::start_with(cfg).unwrap();
    assert!(
        host.alarms().iter().any(|a| a.key == "k/down"),
        "replayed from the spool before loading"
    );
    assert_eq!(host.state("c1").get("v"), Some(&json!(3)));
    assert_eq!(host.counter("seen"), 1, "counted once, not once per replay");
    host.shutdown();
    cleanup(&id, &[]);
}

#[test]
fn state_of_an_earlier_run_loads_once_redis_is_back() {
    require_services();
    init_log();
    let proxy = Proxy::start("127.0.0.1:6379");
    let (mut cfg, id) = config("late", &[("r.rhai", RULES)], vec![]);
    cfg.redis.url = format!("redis://{}/", proxy.addr);
    cfg.redis.op_timeout_ms = 500;
    cfg.redis.connect_timeout_ms = 500;
    let (host, _a) = PluginHost::start_with(cfg.clone()).unwrap();
    host.events()
        .try_send(msg("c9", json!({"kind": "raise", "key": "old/alarm"})));
    host.events()
        .try_send(msg("c9", json!({"kind": "state", "v": 1})));
    wait_for(Duration::from_secs(5), "written", || {
        (host.stats().sink_writes >= 3).then_some(())
    });
    host.shutdown();

    // The next run starts while Redis is unreachable.
    proxy.cut();
    let (host, _a) = PluginHost::start_with(cfg).unwrap();
    assert!(host.alarms().is_empty(), "nothing can be loaded yet");
    host.events()
        .try_send(msg("c8", json!({"kind": "raise", "key": "new/alarm"})));
    host.events()
        .try_send(msg("c9", json!({"kind": "state", "v": 2})));
    wait_for(Duration::from_secs(5), "spooled", || {
        (host.stats().sink_spooled >= 2).then_some(())
    });
    proxy.restore();
    wait_for(Duration::from_secs(10), "old and new alarms", || {
        let keys: Vec<String> = host.alarms().into_iter().map(|a| a.key).collect();
        (keys == ["new/alarm", "old/alarm"]).then_some(())
    });
    assert_eq!(
        host.state("c9").get("v"),
        Some(&json!(2)),
        "the newer value wins"
    );
    assert_eq!(host.counter("seen"), 2, "one count from each run");
    host.shutdown();
    cleanup(&id, &[]);
}
