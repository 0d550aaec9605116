//! End-to-end runs of the tool against a real `relay` process started on port 0:
//! short, small scenarios of each pattern and wire form, checking the report's counts
//! (sent = received, zero loss, no errors) and that the relay process was found from
//! its port and sampled.
//!
//! The relay binary comes from the relay-shards package: `RELAY_BIN` names it, or it
//! is taken from this test's target directory, where `cargo test --workspace` builds
//! it (run `cargo build -p relay-shards --bin relay` first when testing this package
//! alone). Its ports are read from its `relay listening tcp_addr=… http_addr=…` line.

// Scenarios are built field by field from the defaults, which reads clearer here.
#![allow(clippy::field_reassign_with_default)]

use std::path::PathBuf;
use std::process::Child;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

mod common;

use common::{run_ok, spawn_relay};
use relay_loadtest::report::Report;
use relay_loadtest::scenario::{Form, Pattern, Scenario};

/// A relay child process, killed when dropped.
struct Relay {
    child: Child,
    tcp: String,
    http: String,
    _dir: TempDir,
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn start_relay() -> Relay {
    start_relay_with("")
}

/// A relay whose config gets `extra` (TOML sections) appended.
fn start_relay_with(extra: &str) -> Relay {
    static N: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "lt-relay-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("relay.toml");
    std::fs::write(
        &cfg,
        format!(
            "[listeners]\ntcp = \"127.0.0.1:0\"\nhttp = \"127.0.0.1:0\"\n\
             [shards]\ncount = 2\npin = false\nio_memory_kib = 256\n\
             [plugins]\nenabled = false\n{extra}"
        ),
    )
    .unwrap();
    let (child, rx) = spawn_relay(&cfg);
    let mut relay = Relay {
        child,
        tcp: String::new(),
        http: String::new(),
        _dir: TempDir(dir),
    };
    let (tcp, http) = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("the relay reports its listening addresses within 30 s");
    relay.tcp = tcp.expect("tcp_addr in the listening line");
    relay.http = http.expect("http_addr in the listening line");
    relay
}

fn scenario(relay: &Relay, pattern: Pattern) -> Scenario {
    common::small_scenario(
        "relay",
        pattern,
        format!("tcp://{}", relay.tcp),
        format!("ws://{}/ws", relay.http),
    )
}

/// No loss, and every heartbeat answered.
fn assert_no_loss(r: &Report, recipients: u64) {
    common::assert_no_loss(r, recipients);
    let s = &r.steps[0];
    assert_eq!(s.pongs, s.pings, "every heartbeat answered");
}

#[test]
fn every_pattern_and_form_against_a_relay_on_port_0() {
    let relay = start_relay();

    // Telemetry: binary controllers on TCP to JSON browsers on WebSocket.
    let mut s = scenario(&relay, Pattern::Telemetry);
    s.load.rate = Some(20.0);
    let r = run_ok(&s);
    assert_no_loss(&r, 1);
    assert_eq!(r.steps[0].sent, 200);
    assert_eq!(r.steps[0].latency.count, 200);
    assert_eq!(r.target.kind, "relay");
    // The relay was found from its port and sampled.
    let server = r.server.as_ref().expect("server sampled");
    assert_eq!(server.pid, relay.child.id());
    assert!(server.rss_peak_bytes > 0);
    assert!(r.steps[0].server.is_some());

    // Telemetry the other way round: JSON lines on TCP, binary WebSocket messages.
    let mut s = scenario(&relay, Pattern::Telemetry);
    s.target.controller_form = Form::Json;
    s.target.browser_form = Form::Binary;
    s.load.rate = Some(20.0);
    assert_no_loss(&run_ok(&s), 1);

    // Several browsers per controller: a group per controller.
    let mut s = scenario(&relay, Pattern::Telemetry);
    s.load.controllers = 5;
    s.load.browsers_per_controller = 3;
    s.load.total_rate = Some(100.0);
    assert_no_loss(&run_ok(&s), 3);

    // Command round trip: browser → controller → reply.
    let mut s = scenario(&relay, Pattern::Command);
    s.load.rate = Some(10.0);
    let r = run_ok(&s);
    assert_no_loss(&r, 1);
    assert_eq!(r.steps[0].latency.count, 100, "one round trip per command");

    // Group fan-out.
    let mut s = scenario(&relay, Pattern::Fanout);
    s.load.groups = 2;
    s.load.members = 20;
    s.load.rate = Some(10.0);
    let r = run_ok(&s);
    assert_no_loss(&r, 20);
    assert_eq!(r.steps[0].received, 400);

    // Fan-in to dashboards.
    let mut s = scenario(&relay, Pattern::Fanin);
    s.load.controllers = 30;
    s.load.dashboards = 2;
    s.load.rate = Some(5.0);
    assert_no_loss(&run_ok(&s), 1);

    // Idle fleet: heartbeats only, each answered.
    let mut s = scenario(&relay, Pattern::Idle);
    s.load.controllers = 50;
    let r = run_ok(&s);
    assert_eq!(r.connect.established, 50);
    let st = &r.steps[0];
    assert!(st.pings >= 50 * 3, "{} pings", st.pings);
    assert_eq!(st.pongs, st.pings);
    assert!(st.errors.is_empty(), "{:?}", st.errors);
    assert!(r.server.as_ref().unwrap().bytes_per_connection.is_some());

    // Connection storm on schedule.
    let mut s = scenario(&relay, Pattern::Storm);
    s.load.controllers = 50;
    s.load.connect_rate = 200.0;
    let r = run_ok(&s);
    assert_eq!(r.connect.established, 50);
    assert!(r.connect.duration_s >= 0.2, "{}", r.connect.duration_s);
}

#[test]
fn templated_payloads_cross_the_relay_and_watched_processes_are_reported() {
    let relay = start_relay();
    for (ctl, br) in [(Form::Binary, Form::Json), (Form::Json, Form::Binary)] {
        let mut s = scenario(&relay, Pattern::Telemetry);
        s.target.controller_form = ctl;
        s.target.browser_form = br;
        s.load.rate = Some(20.0);
        s.load.payload_template = Some(r#"{"temp": {{rand 20..90}}, "n": {{seq}}}"#.into());
        // The Redis the relay's rules use runs on this machine.
        s.target.watch = vec!["redis=:6379".into()];
        let r = run_ok(&s);
        assert_no_loss(&r, 1);
        assert_eq!(
            r.steps[0].latency.count, 200,
            "every stamp read back from JSON"
        );
        let redis = r
            .watched
            .iter()
            .find(|w| w.name == "redis")
            .expect("redis watched");
        assert_eq!(redis.pids.len(), 1);
        assert!(r.steps[0].watched.contains_key("redis"));
    }
}

/// A storm against a relay that admits 50 hellos a second per shard: the
/// relay answers the rest `busy` with a `retry_after_ms`, the tool waits that
/// long and retries, and every connection ends up established, spread out
/// instead of refused.
#[test]
fn storm_against_admission_limits_retries_after_the_hint_and_connects_all() {
    let relay = start_relay_with(
        "[admission]\nhellos_per_sec = 50\nburst = 10\nretry_min_ms = 100\nretry_window_ms = 900\n",
    );
    let mut s = scenario(&relay, Pattern::Storm);
    s.load.controllers = 200;
    s.load.connect_rate = 1000.0;
    s.run.busy_retries = 20;
    let r = run_ok(&s);
    assert_eq!(r.connect.established, 200, "{:?}", r.connect.errors);
    assert_eq!(r.connect.failed, 0, "{:?}", r.connect.errors);
    assert!(r.connect.retried > 0, "no connect was told to retry");
    // 2 shards × (10 at once + 50/s): 200 hellos need well over a second.
    assert!(r.connect.duration_s >= 1.0, "{}", r.connect.duration_s);
    let (_, body) = http_get(&relay.http, "/metrics");
    let deferred: u64 = body
        .lines()
        .filter(|l| l.starts_with("relay_admission_deferred_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum();
    assert_eq!(deferred, r.connect.retried);
}

fn http_get(addr: &str, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: relay\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    (status, body.to_owned())
}
