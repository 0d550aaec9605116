//! The busy epoll loop (`[shards] slice_us`): under steady input a shard
//! waits on its sockets itself; nothing is lost or reordered, frames still
//! cross shards, and the shard's other work (HTTP) is still served.

mod common;

use std::thread;
use std::time::{Duration, Instant};

use common::{Client, Form, addrs_on, counter, start};
use relay_config::IoBackend;
use relay_core::frame::FrameType;

const PAIRS: usize = 4;

/// The tests here measure how the loop waits under load: one at a time, so
/// that one's load does not change another's pattern.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}
const FRAMES: u32 = 3000;

/// A relay of `shards` shards on epoll that answers every input at once
/// (`coalesce_us = 0`) and waits on its sockets for up to `slice_us`.
fn busy_relay(shards: usize, slice_us: u32) -> relay_shards::Relay {
    start(|c| {
        c.shards.count = shards;
        c.shards.slice_us = slice_us;
        c.shards.io = IoBackend::Epoll;
        c.shards.coalesce_us = 0;
    })
}

/// `PAIRS` senders on shard 0, each streaming `FRAMES` DATA frames to its
/// receiver (half on shard 0, half on shard 1), while the test asks for
/// `/metrics` over HTTP. Every frame arrives, in order; returns the relay
/// and its busy-wait count.
fn stream(slice_us: u32) -> (relay_shards::Relay, u64) {
    let relay = busy_relay(2, slice_us);
    let senders = addrs_on("busy-tx-", 0, 2, PAIRS);
    let local = addrs_on("busy-rx-", 0, 2, PAIRS / 2);
    let remote = addrs_on("busy-rx-", 1, 2, PAIRS - PAIRS / 2);
    let receivers: Vec<String> = local.into_iter().chain(remote).collect();
    let mut rx: Vec<Client> = receivers
        .iter()
        .map(|a| Client::hello(relay.tcp_addr(), Form::Binary, a))
        .collect();
    let readers: Vec<_> = rx
        .drain(..)
        .map(|mut c| {
            thread::spawn(move || {
                let mut next = 0u32;
                while next < FRAMES {
                    let f = c.recv_timeout(Duration::from_secs(20)).expect("a frame");
                    if f.kind != FrameType::Data {
                        continue;
                    }
                    let n = u32::from_be_bytes(f.payload[..4].try_into().unwrap());
                    assert_eq!(n, next, "frames arrive in order");
                    next += 1;
                }
            })
        })
        .collect();
    let writers: Vec<_> = senders
        .iter()
        .zip(&receivers)
        .map(|(s, r)| {
            let mut c = Client::hello(relay.tcp_addr(), Form::Binary, s);
            let dst = r.clone();
            thread::spawn(move || {
                for n in 0..FRAMES {
                    let mut payload = n.to_be_bytes().to_vec();
                    payload.resize(48, 0);
                    c.data(&dst, n, false, &payload);
                    if n % 16 == 0 {
                        // Spread the stream over time: many passes with a
                        // few ready sockets each, as a fleet sends.
                        thread::sleep(Duration::from_micros(200));
                    }
                }
                c
            })
        })
        .collect();
    // The shard's HTTP side is served while its loop is busy.
    for _ in 0..5 {
        let (status, _) = common::get(&relay, "/metrics");
        assert_eq!(status, 200);
        thread::sleep(Duration::from_millis(20));
    }
    let _senders: Vec<Client> = writers.into_iter().map(|w| w.join().unwrap()).collect();
    for r in readers {
        r.join().expect("every frame arrived in order");
    }
    let waits = counter(&relay, "relay_busy_waits_total");
    (relay, waits)
}

#[test]
fn steady_input_is_waited_on_by_the_loop_and_nothing_is_lost() {
    let _one = serial();
    let (relay, mut waits) = stream(1000);
    // A pass that hands frames to the other shard yields instead of waiting
    // (the flusher runs), and on a loaded machine every pass may find more
    // ready: how many waits that short stream takes varies. A steady stream
    // on shard 0 alone then, until the loop waits (at most 10 s).
    if waits == 0 {
        let steady = common::Steady::start(
            relay.tcp_addr(),
            &addrs_on("busy-steady-", 0, 2, 8),
            &addrs_on("busy-sink-", 0, 2, 1)[0],
        );
        for _ in 0..100 {
            thread::sleep(Duration::from_millis(100));
            waits = counter(&relay, "relay_busy_waits_total");
            if waits > 0 {
                break;
            }
        }
        steady.stop();
    }
    assert!(waits > 0, "the loop never waited on its sockets itself");
}

#[test]
fn slice_zero_always_sleeps_through_the_executor() {
    let _one = serial();
    let (relay, waits) = stream(0);
    assert_eq!(waits, 0);
    // The HTTP requests were input for the executor in passes that did not
    // wait: a wait ended early is counted only when there was a wait.
    assert_eq!(counter(&relay, "relay_busy_waits_kicked_total"), 0);
}

/// A shard whose input is steady and that routes a frame to another shard
/// lets its flusher run at once, rather than waiting on its sockets until
/// its slice (20 ms here) ends: frames from the busy shard 1 to shard 0 take
/// well under the slice.
#[test]
fn frames_for_another_shard_leave_a_busy_shard_before_its_slice_ends() {
    let _one = serial();
    let slice = Duration::from_millis(20);
    let relay = busy_relay(2, slice.as_micros() as u32);
    let sources = addrs_on("flush-tx-", 1, 2, 8);
    let sink = addrs_on("flush-rx-", 1, 2, 1).remove(0);
    let near = addrs_on("flush-near-", 1, 2, 1).remove(0);
    let far = addrs_on("flush-far-", 0, 2, 1).remove(0);
    let mut far_c = Client::hello(relay.tcp_addr(), Form::Binary, &far);
    let mut near_c = Client::hello(relay.tcp_addr(), Form::Binary, &near);
    let steady = common::Steady::start(relay.tcp_addr(), &sources, &sink);
    let waits = || counter(&relay, "relay_busy_waits_total{shard=\"1\"}");
    let mut settle = 0;
    while waits() == 0 && settle < 100 {
        thread::sleep(Duration::from_millis(100));
        settle += 1;
    }
    let mut took = Vec::new();
    for n in 0..60u32 {
        let t = Instant::now();
        near_c.data(&far, n, false, &n.to_be_bytes());
        let f = far_c
            .recv_timeout(Duration::from_secs(5))
            .expect("the frame from shard 1");
        took.push(t.elapsed());
        assert_eq!(f.payload[..], n.to_be_bytes());
        // Probes at different points of the busy shard's slices.
        thread::sleep(Duration::from_millis(3));
    }
    let (sent, _) = steady.stop();
    assert!(sent > 100, "the stream ran: {sent} frames");
    assert!(waits() > 0, "shard 1 never waited on its sockets");
    took.sort();
    let median = took[took.len() / 2];
    // Held for the slice's end, half the probes would take more than a
    // quarter of it.
    assert!(
        median < slice / 4,
        "frames for shard 0 waited for shard 1's slice: median {median:?}"
    );
}

/// A shard whose input is steady waits on its sockets itself; frames another
/// shard routes to it ring its kick and are delivered at once, not at the end
/// of its slice. Only its peer kicks shard 1 here.
#[test]
fn frames_from_another_shard_wake_a_shard_that_waits_on_its_sockets() {
    let _one = serial();
    let relay = busy_relay(2, 20_000);
    let sources = addrs_on("kick-tx-", 1, 2, 8);
    let sink = addrs_on("kick-rx-", 1, 2, 1).remove(0);
    let far = addrs_on("kick-far-", 1, 2, 1).remove(0);
    let near = addrs_on("kick-near-", 0, 2, 1).remove(0);
    let mut far_c = Client::hello(relay.tcp_addr(), Form::Binary, &far);
    let mut near_c = Client::hello(relay.tcp_addr(), Form::Binary, &near);
    let steady = common::Steady::start(relay.tcp_addr(), &sources, &sink);
    thread::sleep(Duration::from_millis(200));
    // A frame wakes the loop only if it comes while the loop waits: on a
    // loaded machine that can take more frames (at most 400).
    let kicked = || counter(&relay, "relay_busy_waits_kicked_total{shard=\"1\"}");
    for n in 0..400u32 {
        near_c.data(&far, n, false, &n.to_be_bytes());
        let f = far_c
            .recv_timeout(Duration::from_secs(5))
            .expect("the frame from shard 0");
        assert_eq!(f.payload[..], n.to_be_bytes());
        thread::sleep(Duration::from_millis(5));
        if n % 20 == 19 && kicked() > 0 {
            break;
        }
    }
    let (sent, _) = steady.stop();
    assert!(sent > 100, "the stream ran: {sent} frames");
    assert!(counter(&relay, "relay_busy_waits_total{shard=\"1\"}") > 0);
    assert!(
        kicked() > 0,
        "no batch from shard 0 woke shard 1's waiting loop"
    );
}

/// GET `path` on the kept-alive connection `s`: the status line and the
/// body.
fn get_on(s: &mut std::net::TcpStream, path: &str) -> (String, String) {
    use std::io::{BufRead, BufReader, Read, Write};
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: relay\r\n\r\n").as_bytes())
        .unwrap();
    let mut r = BufReader::new(s);
    let mut status = String::new();
    r.read_line(&mut status).unwrap();
    let mut len = 0;
    loop {
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        if line == "\r\n" {
            break;
        }
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            len = v.trim().parse().unwrap();
        }
    }
    let mut body = vec![0; len];
    r.read_exact(&mut body).unwrap();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// The shard's HTTP side is driven by the executor, not by the loop's epoll
/// set: a request (on a new connection or a kept-alive one) ends the busy
/// loop's wait, so it is answered at once rather than at the end of the
/// slice. One shard, no rules, no cluster: nothing else ends its waits.
#[test]
fn http_requests_end_the_wait_of_a_busy_shard() {
    let _one = serial();
    let relay = busy_relay(1, 20_000);
    let names = common::names("http-tx-", 8);
    let steady = common::Steady::start(relay.tcp_addr(), &names, "http-rx");
    thread::sleep(Duration::from_millis(200));
    const ENDED: &str = "relay_busy_waits_kicked_total";
    // Each `counter` is a GET on a connection of its own: the listener's
    // input. Requests come more than a slice apart: after one the loop
    // sleeps through the executor for a slice (HTTP under way) and only
    // then waits on its sockets again.
    let mut on_new = 0;
    for _ in 0..100 {
        thread::sleep(Duration::from_millis(30));
        on_new = counter(&relay, ENDED);
        if on_new > 0 {
            break;
        }
    }
    assert!(on_new > 0, "no new HTTP connection ended a busy wait");
    // Requests on one kept-alive connection only.
    let mut s = std::net::TcpStream::connect(relay.http_addr().unwrap()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let ended = |s: &mut std::net::TcpStream| -> u64 {
        let (status, body) = get_on(s, "/metrics");
        assert!(status.starts_with("HTTP/1.1 200"), "{status}");
        body.lines()
            .filter(|l| l.starts_with(ENDED))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    };
    let before = ended(&mut s);
    let mut grew = false;
    for n in 0..100 {
        thread::sleep(Duration::from_millis(30));
        let (status, _) = get_on(&mut s, "/healthz");
        assert!(status.starts_with("HTTP/1.1 200"), "{status}");
        if n % 5 == 4 && ended(&mut s) > before {
            grew = true;
            break;
        }
    }
    // Each step of an exchange (accept, read, answer, close) is the
    // executor's: while HTTP is under way the loop sleeps through it rather
    // than wait out a slice per step. Twenty requests, each on a connection
    // of its own, take less than one slice each on average (20 ms here; a
    // step per slice would take several).
    let t = std::time::Instant::now();
    for _ in 0..20 {
        let (status, _) = common::get(&relay, "/healthz");
        assert_eq!(status, 200);
    }
    let took = t.elapsed();
    let (sent, _) = steady.stop();
    assert!(sent > 100, "the stream ran: {sent} frames");
    assert!(counter(&relay, "relay_busy_waits_total") > 0);
    assert!(
        grew,
        "no request on a kept-alive connection ended a busy wait"
    );
    assert!(
        took < Duration::from_millis(400),
        "20 requests took {took:?}: the loop waited out its slice between their steps"
    );
}
