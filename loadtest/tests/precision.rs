//! The generator's own clock, measured against a plain blocking-socket echo server in
//! this process: 1,000 connections at 5,000 msg/s, each message sent back to its
//! sender. What is asserted is the distribution of the send-time error (actual write
//! minus intended time, per message), not how long the test took. A 1 ms timer puts
//! the median error near 0.5–1.5 ms; the sender thread keeps it at tens of µs. The
//! bounds leave room for a loaded 2-core machine and still fail for a 1 ms timer.

// Scenarios are built field by field from the defaults, which reads clearer here.
#![allow(clippy::field_reassign_with_default)]

mod common;

use common::EchoServer;
use relay_loadtest::scenario::{Dur, Pattern};

/// The VM this runs on stalls in bursts of tens of ms, which can move a
/// two-second run's median by itself: the run is measured up to three
/// times and the best median counts. A 1 ms timer fails every attempt.
#[test]
fn messages_leave_at_their_intended_time() {
    let mut best = u64::MAX;
    for _ in 0..3 {
        best = best.min(send_lag_p50_us());
        if best <= 300 {
            break;
        }
    }
    // A 1 ms timer puts the median error at 0.5 ms or more (intended times fall
    // anywhere between its ticks); the tail is left to the machine's load.
    assert!(best <= 300, "send lag p50 {best} µs at best");
}

/// One run against the echo server; its checks, and the median send lag.
fn send_lag_p50_us() -> u64 {
    let server = EchoServer::start(usize::MAX, true);
    let mut s = common::small_scenario(
        "precision",
        Pattern::Telemetry,
        format!("echo://127.0.0.1:{}", server.port),
        String::new(),
    );
    s.load.controllers = 1000;
    s.load.total_rate = Some(5000.0);
    s.load.duration = Dur::secs(2);
    s.load.drain = Dur::millis(500);
    s.load.heartbeat = Dur::secs(60);
    s.run.connect_concurrency = 64;
    let r = common::run_ok(&s);
    common::assert_no_loss(&r, 1);
    let st = &r.steps[0];
    assert_eq!(st.sent, 10_000);
    let lag = &st.send_lag;
    assert_eq!(lag.count, st.sent, "one send-time error per message");
    let g = st.generator.expect("the generator's CPU is measured");
    eprintln!(
        "send lag p50 {} µs, p90 {} µs, p99 {} µs; latency from intended p50 {} µs, from sent p50 {} µs; generator {:.1}% of the machine, {:.2} CPU-µs per message sent or received",
        lag.p50_us,
        lag.p90_us,
        lag.p99_us,
        st.latency.p50_us,
        st.latency_from_sent.p50_us,
        g.machine_percent,
        g.cpu_us_per_msg
    );
    // The latency from the actual send is the latency from the intended time less
    // each message's own lag.
    assert!(st.latency_from_sent.p50_us <= st.latency.p50_us);
    lag.p50_us
}
