//! Runs that fail say so: the exit status, the first line of the text report and the
//! JSON verdict; and the fleet ramp on a small fleet against an echo server that takes
//! only so many connections.

// Scenarios are built field by field from the defaults, which reads clearer here.
#![allow(clippy::field_reassign_with_default)]

mod common;

use common::EchoServer;
use relay_loadtest::report::LimitKind;
use relay_loadtest::scenario::{Dur, Pattern, RampBy, Scenario};

fn echo_scenario(name: &str, url: String) -> Scenario {
    let mut s = common::small_scenario(name, Pattern::Telemetry, url, String::new());
    s.load.rate = Some(20.0);
    s.load.duration = Dur::millis(500);
    s.load.drain = Dur::millis(300);
    // Judged by loss and errors, not by how busy the test machine is.
    s.find_max.slo_p99 = Dur::secs(5);
    s
}

#[test]
fn a_clean_run_passes_with_exit_0() {
    let server = EchoServer::start(usize::MAX, true);
    let (code, stdout, r) = common::run_binary(&echo_scenario("ok", server.url()), "ok");
    assert_eq!(code, Some(0), "{stdout}");
    assert!(stdout.starts_with("RESULT: PASS\n"), "{stdout}");
    assert!(r.verdict.passed);
    assert!(r.steps[0].passed, "a fixed step is judged too");
    let g = r.steps[0].generator.expect("the generator's own CPU");
    assert!(g.cpu_s > 0.0 && g.cpu_us_per_msg > 0.0, "{g:?}");
    assert!(r.generator.as_ref().is_some_and(|g| g.cpu_s > 0.0));
}

#[test]
fn refused_connections_fail_the_run_with_exit_2() {
    // A port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let s = echo_scenario("refused", format!("echo://127.0.0.1:{port}"));
    let (code, stdout, r) = common::run_binary(&s, "refused");
    assert_eq!(code, Some(2), "{stdout}");
    let first = stdout.lines().next().unwrap();
    assert!(
        first.starts_with("RESULT: FAIL (exit 2): 10 of 10 connections failed"),
        "{stdout}"
    );
    assert!(first.contains("nothing was sent"), "{first}");
    assert!(
        stdout
            .lines()
            .nth(1)
            .unwrap()
            .starts_with("LIMIT: 10 of 10 connections failed")
    );
    assert!(!r.steps[0].passed);
    assert_eq!(
        r.limits.notes.iter().find_map(|n| n.limit),
        Some(LimitKind::Connections)
    );
}

#[test]
fn lost_messages_fail_the_run_with_exit_2() {
    // Takes the messages and never sends them back.
    let server = EchoServer::start(usize::MAX, false);
    let (code, stdout, r) = common::run_binary(&echo_scenario("lost", server.url()), "lost");
    assert_eq!(code, Some(2), "{stdout}");
    assert!(
        stdout.starts_with("RESULT: FAIL (exit 2): step 1: nothing was received"),
        "{stdout}"
    );
    assert!(
        r.verdict
            .failures
            .iter()
            .any(|f| f.contains("messages lost"))
    );
}

#[test]
fn a_missed_slo_exits_3() {
    let server = EchoServer::start(usize::MAX, true);
    let mut s = echo_scenario("slo", server.url());
    s.find_max.slo_p99 = Dur(std::time::Duration::from_nanos(1_000));
    let (code, stdout, r) = common::run_binary(&s, "slo");
    assert_eq!(code, Some(3), "{stdout}");
    assert!(
        stdout.starts_with("RESULT: FAIL (exit 3): step 1: p99"),
        "{stdout}"
    );
    assert!(!r.steps[0].passed);
}

#[test]
fn the_fleet_ramp_finds_how_many_connections_the_server_takes() {
    // The server takes 12 connections; the ramp grows the fleet from 4 (×2) up to a
    // ceiling of 20 controllers at 10 msg/s each, then bisects.
    let server = EchoServer::start(12, true);
    let mut s = echo_scenario("fleet", server.url());
    s.load.controllers = 20;
    s.load.rate = Some(10.0);
    s.find_max.enabled = true;
    s.find_max.by = RampBy::Fleet;
    s.find_max.start_fleet = Some(4);
    s.find_max.factor = 2.0;
    s.find_max.refine_steps = 3;
    s.find_max.step_duration = Dur::millis(400);
    let (code, stdout, r) = common::run_binary(&s, "fleet");
    assert_eq!(code, Some(0), "{stdout}");
    let fm = r.find_max.as_ref().unwrap();
    assert_eq!(fm.by, RampBy::Fleet);
    let sizes: Vec<u64> = r.steps.iter().map(|x| x.fleet).collect();
    // 4, 8 pass; 16 fails (4 connections refused); then 12 passes, 14 fails, 13 fails.
    assert_eq!(sizes, vec![4, 8, 16, 12, 14, 13], "{stdout}");
    assert_eq!(fm.best.unwrap().rate, 12.0);
    assert_eq!(r.steps[0].total_rate, 40.0, "10 msg/s per controller");
    assert!(
        fm.answer
            .starts_with("this server holds 12 echo connections at 10.0 msg/s each"),
        "{}",
        fm.answer
    );
    assert!(
        fm.stopped_by
            .starts_with("at a fleet of 13: 1 of 13 connections were not up"),
        "{}",
        fm.stopped_by
    );
}

#[test]
fn compare_prints_a_table_and_writes_overlaid_plots() {
    let server = EchoServer::start(usize::MAX, true);
    let dir = std::env::temp_dir().join(format!("lt-compare-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut paths = Vec::new();
    for (i, rate) in [10.0, 20.0].into_iter().enumerate() {
        let mut s = echo_scenario(&format!("cmp{i}"), server.url());
        s.load.rate = Some(rate);
        let r = common::run_ok(&s);
        let p = dir.join(format!("{i}.json"));
        std::fs::write(&p, r.to_json()).unwrap();
        paths.push(p);
    }
    let html = dir.join("cmp.html");
    let out = common::loadtest()
        .arg("compare")
        .args(&paths)
        .arg("--html")
        .arg(&html)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(stdout.starts_with("figure"), "{stdout}");
    let rate = stdout
        .lines()
        .find(|l| l.starts_with("rate (msg/s)"))
        .unwrap();
    assert!(rate.ends_with("2.00×"), "B sent twice A's rate: {rate}");
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("p99 from actual send"))
    );
    let page = std::fs::read_to_string(&html).unwrap();
    assert!(page.contains("A: step 1") && page.contains("B: step 1"));
    assert!(page.matches("<svg").count() >= 2);
    // A file that is not a report is a clear error.
    let out = common::loadtest()
        .arg("compare")
        .arg(&html)
        .arg(&paths[0])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not a relay-loadtest JSON report"));
    let _ = std::fs::remove_dir_all(&dir);
}
