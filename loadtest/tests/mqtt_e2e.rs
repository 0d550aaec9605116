//! End-to-end runs of the tool against the Mosquitto broker on 127.0.0.1:1883 (MQTT
//! 3.1.1, QoS 0): every pattern on a small fleet for about a second, checking the
//! report's counts (every message sent arrives, nothing is lost), and one run split
//! over two worker processes of the real binary. Each run uses its own topic prefix.

// Scenarios are built field by field from the defaults, which reads clearer here.
#![allow(clippy::field_reassign_with_default)]

mod common;

use common::{assert_no_loss, run_ok};
use relay_loadtest::scenario::{Dur, Pattern, Scenario};

const BROKER: &str = "mqtt://127.0.0.1:1883";

fn scenario(pattern: Pattern) -> Scenario {
    common::small_scenario("test", pattern, BROKER.into(), String::new())
}

#[test]
fn telemetry_delivers_every_message_to_its_browser() {
    let mut s = scenario(Pattern::Telemetry);
    s.load.rate = Some(20.0);
    let r = run_ok(&s);
    assert_no_loss(&r, 1);
    let st = &r.steps[0];
    // 10 controllers × 20 msg/s × 1 s, on schedule.
    assert_eq!(st.sent, 200);
    assert_eq!(st.latency.count, st.received);
    assert_eq!(st.throughput.iter().map(|x| x.sent).sum::<u64>(), st.sent);
    assert_eq!(
        st.throughput.iter().map(|x| x.received).sum::<u64>(),
        st.received
    );
    assert_eq!(r.target.kind, "mqtt");
}

#[test]
fn telemetry_with_several_browsers_reaches_each() {
    let mut s = scenario(Pattern::Telemetry);
    s.load.controllers = 5;
    s.load.browsers_per_controller = 3;
    s.load.total_rate = Some(100.0);
    let r = run_ok(&s);
    assert_eq!(r.fleet.connections, 20);
    assert_no_loss(&r, 3);
    assert_eq!(r.steps[0].sent, 100);
}

#[test]
fn fanout_reaches_every_member_of_every_group() {
    let mut s = scenario(Pattern::Fanout);
    s.load.groups = 2;
    s.load.members = 15;
    s.load.rate = Some(10.0);
    let r = run_ok(&s);
    assert_eq!(r.fleet.connections, 32);
    assert_no_loss(&r, 15);
    assert_eq!(r.steps[0].received, 20 * 15);
}

#[test]
fn fanin_collects_every_controller_at_the_dashboards() {
    let mut s = scenario(Pattern::Fanin);
    s.load.controllers = 30;
    s.load.dashboards = 2;
    s.load.rate = Some(5.0);
    let r = run_ok(&s);
    assert_no_loss(&r, 1);
    assert_eq!(r.steps[0].received, 150);
}

#[test]
fn commands_come_back_as_replies() {
    let mut s = scenario(Pattern::Command);
    s.load.rate = Some(10.0);
    let r = run_ok(&s);
    assert_no_loss(&r, 1);
    let st = &r.steps[0];
    // 100 commands and 100 replies; the round trip is measured once per reply.
    assert_eq!(st.sent, 200);
    assert_eq!(st.latency.count, 100);
}

#[test]
fn an_idle_fleet_heartbeats_and_is_answered() {
    let mut s = scenario(Pattern::Idle);
    s.load.controllers = 30;
    let r = run_ok(&s);
    assert_eq!(r.connect.established, 30);
    let st = &r.steps[0];
    assert_eq!((st.sent, st.received), (0, 0));
    // 30 clients × one beat per 250 ms, counted over the 1 s step: 4 each.
    assert!(
        st.pings >= 30 * 3 && st.pings <= 30 * 4,
        "{} pings",
        st.pings
    );
    assert_eq!(st.pongs, st.pings, "every PINGREQ answered");
    assert_eq!(st.heartbeat.count, st.pongs);
    assert!(st.errors.is_empty(), "{:?}", st.errors);
}

#[test]
fn a_storm_connects_on_schedule() {
    let mut s = scenario(Pattern::Storm);
    s.load.controllers = 40;
    s.load.connect_rate = 100.0;
    let r = run_ok(&s);
    assert_eq!(r.connect.established, 40);
    assert_eq!(r.connect.time.count, 40);
    // 40 connects at 100/s are spread over about 0.4 s.
    assert!(r.connect.duration_s >= 0.35, "{}", r.connect.duration_s);
    let mut s = scenario(Pattern::Storm);
    s.load.controllers = 20;
    s.load.connect_rate = 200.0;
    s.load.storm_close = true;
    let r = run_ok(&s);
    assert_eq!(r.connect.established, 20);
}

#[test]
fn find_max_ramps_and_answers() {
    let mut s = scenario(Pattern::Telemetry);
    s.find_max.enabled = true;
    s.find_max.start_rate = Some(50.0);
    s.find_max.factor = 2.0;
    s.find_max.max_steps = 2;
    s.find_max.refine_steps = 0;
    s.find_max.slo_p99 = Dur::secs(5);
    s.find_max.step_duration = Dur::millis(500);
    s.load.drain = Dur::millis(500);
    let r = run_ok(&s);
    let fm = r.find_max.as_ref().unwrap();
    assert_eq!(r.steps.len(), 2);
    assert_eq!(r.steps[0].total_rate, 50.0);
    assert_eq!(r.steps[1].total_rate, 100.0);
    assert!(r.steps.iter().all(|x| x.passed));
    assert_eq!(fm.best.unwrap().rate, 100.0);
    assert!(
        fm.answer.starts_with("this server holds 10 controllers"),
        "{}",
        fm.answer
    );
}

#[test]
fn the_binary_splits_the_fleet_over_worker_processes() {
    let dir = std::env::temp_dir().join(format!("lt-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let json = dir.join("report.json");
    let html = dir.join("report.html");
    let prefix = format!("lt-test-{}-split", std::process::id());
    let out = common::loadtest()
        .args([
            "--target",
            BROKER,
            "--pattern",
            "telemetry",
            "-n",
            "12",
            "--rate",
            "10",
            "--duration",
            "1s",
            "--drain",
            "800ms",
            "--workers",
            "2",
            "--threads",
            "1",
            "--prefix",
            &prefix,
            "--no-progress",
            // About splitting, not latency: a loaded machine must not fail it.
            "--slo-p99",
            "1s",
            "--json",
        ])
        .arg(&json)
        .arg("--html")
        .arg(&html)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("2 worker(s)"), "{stdout}");
    let r = common::read_report(&json, &stdout);
    assert_eq!(r.workers, 2);
    assert_no_loss(&r, 1);
    assert_eq!(r.steps[0].sent, 120);
    let page = std::fs::read_to_string(&html).unwrap();
    assert!(page.contains("<svg"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_bad_scenario_file_is_a_clear_error_not_a_panic() {
    let dir = std::env::temp_dir().join(format!("lt-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let f = dir.join("bad.toml");
    std::fs::write(
        &f,
        "pattern = \"telemetry\"\n[load]\nrate = -3\npayload_bytes = 2\n",
    )
    .unwrap();
    let out = common::loadtest()
        .arg("--scenario")
        .arg(&f)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("load.rate") && err.contains("load.payload_bytes"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_open_file_limit_splits_the_fleet_and_the_report_says_so() {
    // Keep all but 100 files free per process: 250 connections need 3 processes.
    let hard = relay_loadtest::limits::nofile().unwrap().hard;
    let dir = std::env::temp_dir().join(format!("lt-split-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let scenario = dir.join("split.toml");
    let json = dir.join("split.json");
    std::fs::write(
        &scenario,
        format!(
            "name = \"split\"\npattern = \"fanin\"\n[target]\ncontrollers = \"{BROKER}\"\nprefix = \"lt-test-{}-fd\"\n\
             [load]\ncontrollers = 249\ndashboards = 1\nrate = 2.0\nduration = \"1s\"\ndrain = \"800ms\"\n\
             [run]\nfd_reserve = {}\nthreads = 1\nsource_addrs = [\"127.0.0.2..127.0.0.4\"]\n\
             [find_max]\nslo_p99 = \"1s\"\n",
            std::process::id(),
            hard - 100
        ),
    )
    .unwrap();
    let out = common::loadtest_on(&scenario, &json).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r = common::read_report(&json, &stdout);
    assert_eq!(r.workers, 3);
    assert_eq!(r.limits.per_process_connections, 100);
    assert!(!r.limits.capped);
    assert!(
        r.limits
            .notes
            .iter()
            .any(|n| n.text.contains("split over 3 worker processes")),
        "{:?}",
        r.limits.notes
    );
    assert_eq!(
        r.limits.source_addrs,
        vec!["127.0.0.2", "127.0.0.3", "127.0.0.4"]
    );
    assert_no_loss(&r, 1);
    assert_eq!(r.steps[0].sent, 249 * 2);

    // Forcing one worker caps the run at the per-process limit: the run fails (exit
    // 2) and says why at the top of every report.
    let out = common::loadtest_on(&scenario, &json)
        .args(["--workers", "1"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let mut lines = stdout.lines();
    assert!(
        lines
            .next()
            .unwrap()
            .starts_with("RESULT: FAIL (exit 2): capped at 100 of 250 connections"),
        "{stdout}"
    );
    assert!(
        lines
            .next()
            .unwrap()
            .starts_with("LIMIT: the open-file limit"),
        "{stdout}"
    );
    let r = common::read_report(&json, &stdout);
    assert!(r.limits.capped);
    assert!(!r.verdict.passed);
    assert_eq!(r.verdict.exit_code, 2);
    assert!(
        r.verdict
            .limited_by
            .as_deref()
            .is_some_and(|l| l.starts_with("the open-file limit")),
        "{:?}",
        r.verdict
    );
    assert_eq!(r.connect.planned, 100);
    assert_eq!(r.connect.established, 100);
    let _ = std::fs::remove_dir_all(&dir);
}
