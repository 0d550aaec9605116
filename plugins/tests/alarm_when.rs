//! `alarm_when` and `alarm_repeat` on the live host, with short durations: the alarm
//! rises once the condition has held for the duration (even with no new reading),
//! a flap does not raise it, and it clears only after the condition has been false
//! for the duration too.
mod common;

use std::time::{Duration, Instant};

use common::*;
use relay_plugins::PluginHost;
use serde_json::json;

const RULES: &str = r#"
fn on_message(msg) {
    let t = msg.payload?.temp;
    if t != () {
        alarm_when(`${msg.src}/overheat`, t > 80.0, 0.3, "critical", `${msg.src} reads ${t}`);
    }
    let door = msg.payload?.door;
    if door != () {
        alarm_repeat(`${msg.src}/door`, door == "open", 3, "minor", `${msg.src} door open`);
    }
}
"#;

#[test]
fn alarm_when_debounces_and_holds() {
    require_services();
    init_log();
    let (cfg, id) = config("when", &[("w.rhai", RULES)], vec![]);
    let (host, _actions) = PluginHost::start_with(cfg).unwrap();
    let ev = host.events();
    let active = |k: &str| host.alarms().iter().any(|a| a.key == k);

    // A flap shorter than the duration raises nothing.
    ev.try_send(msg("c1", json!({"temp": 90.0})));
    std::thread::sleep(Duration::from_millis(100));
    ev.try_send(msg("c1", json!({"temp": 20.0})));
    std::thread::sleep(Duration::from_millis(400));
    assert!(
        !active("c1/overheat"),
        "a 100 ms spike must not raise a 300 ms alarm"
    );

    // Held: raised by the timer, with no further reading.
    let t0 = Instant::now();
    ev.try_send(msg("c1", json!({"temp": 91.0})));
    let raised = wait_for(Duration::from_secs(3), "overheat raised", || {
        host.alarms().into_iter().find(|a| a.key == "c1/overheat")
    });
    let waited = t0.elapsed();
    assert!(
        waited >= Duration::from_millis(280),
        "raised too early: {waited:?}"
    );
    assert_eq!(raised.text, "c1 reads 91.0");
    assert_eq!(raised.severity.as_str(), "critical");

    // Hysteresis: a short dip does not clear it; a long one does.
    ev.try_send(msg("c1", json!({"temp": 20.0})));
    std::thread::sleep(Duration::from_millis(100));
    ev.try_send(msg("c1", json!({"temp": 95.0})));
    std::thread::sleep(Duration::from_millis(400));
    assert!(active("c1/overheat"), "a short dip must not clear it");
    let t1 = Instant::now();
    ev.try_send(msg("c1", json!({"temp": 20.0})));
    wait_for(Duration::from_secs(3), "overheat cleared", || {
        (!active("c1/overheat")).then_some(())
    });
    assert!(t1.elapsed() >= Duration::from_millis(280));
    // Only one raise for all those hot readings.
    host.shutdown();
    cleanup(&id, &[]);
}

#[test]
fn alarm_repeat_counts_in_a_row() {
    require_services();
    init_log();
    let (cfg, id) = config("repeat", &[("r.rhai", RULES)], vec![]);
    let (host, _actions) = PluginHost::start_with(cfg).unwrap();
    let ev = host.events();
    let active = || host.alarms().iter().any(|a| a.key == "d1/door");
    for d in ["open", "open", "closed", "open", "open"] {
        ev.try_send(msg("d1", json!({"door": d})));
    }
    std::thread::sleep(Duration::from_millis(300));
    assert!(!active(), "never three open readings in a row yet");
    ev.try_send(msg("d1", json!({"door": "open"})));
    wait_for(Duration::from_secs(3), "door alarm", || {
        active().then_some(())
    });
    for _ in 0..3 {
        ev.try_send(msg("d1", json!({"door": "closed"})));
    }
    wait_for(Duration::from_secs(3), "door alarm cleared", || {
        (!active()).then_some(())
    });
    host.shutdown();
    cleanup(&id, &[]);
}
