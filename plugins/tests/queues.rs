//! Bounded hand-offs: a full worker queue drops and counts events without ever
//! blocking the sender, a full action channel drops and counts actions, `on_tick`
//! runs once per period (on one worker), and a host with plugins off or a bad
//! config behaves plainly.
mod common;

use std::time::{Duration, Instant};

use common::*;
use relay_plugins::{Event, PluginError, PluginHost};
use serde_json::json;

#[test]
fn full_queue_drops_and_counts_without_blocking() {
    require_services();
    init_log();
    // Each event spins for a while, so the one-slot queue stays full.
    let rules = "fn on_message(msg) { let i = 0; while i < 200000 { i += 1; } }";
    let (mut cfg, id) = config("queue", &[("slow.rhai", rules)], vec![]);
    cfg.plugins.workers = 1;
    cfg.plugins.queue = 1;
    cfg.plugins.max_operations = 10_000_000;
    let (host, _a) = PluginHost::start_with(cfg).unwrap();
    let ev = host.events();
    let t0 = Instant::now();
    let accepted = (0..200)
        .filter(|_| ev.try_send(msg("c", json!({}))))
        .count();
    assert!(
        t0.elapsed() < Duration::from_secs(2),
        "try_send must never wait for a worker"
    );
    assert!(
        accepted < 200,
        "a one-slot queue cannot take 200 events at once"
    );
    let s = host.stats();
    assert_eq!(s.events_dropped as usize, 200 - accepted);
    assert_eq!(s.events_in as usize, accepted);
    host.shutdown();
    cleanup(&id, &[]);
}

#[test]
fn full_action_channel_drops_and_counts() {
    require_services();
    init_log();
    let rules = "fn on_message(msg) { for i in 0..5 { send(msg.src, #{ i: i }); } }";
    let (mut cfg, id) = config("actions", &[("a.rhai", rules)], vec![]);
    cfg.plugins.actions_queue = 2;
    let (host, actions) = PluginHost::start_with(cfg).unwrap();
    host.events().try_send(msg("c", json!({})));
    wait_for(Duration::from_secs(5), "actions counted", || {
        let s = host.stats();
        (s.actions_out == 2 && s.actions_dropped == 3).then_some(())
    });
    assert_eq!(actions.len(), 2);
    host.shutdown();
    cleanup(&id, &[]);
}

#[test]
fn on_tick_runs_once_per_period() {
    require_services();
    init_log();
    let rules = "fn on_tick(now) { counter_add(\"ticks\", 1); }";
    let (mut cfg, id) = config("tick", &[("t.rhai", rules)], vec![]);
    cfg.plugins.workers = 4;
    cfg.plugins.tick_s = 0.1;
    let (host, _a) = PluginHost::start_with(cfg).unwrap();
    let t0 = Instant::now();
    wait_for(Duration::from_secs(5), "three ticks", || {
        (host.counter("ticks") >= 3).then_some(())
    });
    std::thread::sleep(Duration::from_millis(500));
    let ticks = host.counter("ticks");
    let periods = (t0.elapsed().as_millis() / 100) as i64;
    assert!(
        ticks <= periods + 1,
        "{ticks} ticks in {periods} periods: on_tick must run on one worker only"
    );
    host.shutdown();
    cleanup(&id, &[]);
}

#[test]
fn disabled_plugins_and_bad_config() {
    let mut cfg = relay_plugins::HostConfig::default();
    cfg.plugins.enabled = false;
    let (host, _a) = PluginHost::start_with(cfg).unwrap();
    assert!(
        host.events()
            .try_send(Event::Connect(client("c", "controller")))
    );
    assert!(host.alarms().is_empty());
    assert_eq!(host.stats().events_in, 0);
    host.shutdown();

    let mut cfg = relay_plugins::HostConfig::default();
    cfg.plugins.workers = 0;
    cfg.redis.enabled = true;
    cfg.redis.url = "http://nope".into();
    match PluginHost::start_with(cfg) {
        Err(PluginError::Config(p)) => {
            assert!(p.iter().any(|l| l.starts_with("plugins.workers:")), "{p:?}");
            assert!(p.iter().any(|l| l.starts_with("redis.url:")), "{p:?}");
        }
        other => panic!("expected a config error, got {:?}", other.map(|_| ())),
    }
}
