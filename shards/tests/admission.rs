//! `[admission]` on real sockets: hellos over the per-shard or per-address
//! rate get ERROR `busy` whose message carries a jittered `retry_after_ms`,
//! and are closed; everything else is welcomed.

mod common;

use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{Client, Form, start};
use relay_core::ErrorCode;
use relay_core::frame::{Flags, Frame, FrameType};

fn send_hello(c: &mut Client, addr: &str) {
    let mut f = Frame::new(FrameType::Hello);
    f.src = Bytes::copy_from_slice(addr.as_bytes());
    f.payload = Bytes::from_static(b"{}");
    f.flags = Flags(Flags::JSON);
    c.send(&f);
}

/// What the relay answered a hello: Ok(()) for WELCOME, Err(retry_after_ms)
/// for `busy` (after which the connection must be closed).
fn answer(c: &mut Client) -> Result<(), u64> {
    let f = c.recv();
    match f.kind {
        FrameType::Welcome => Ok(()),
        FrameType::Error => {
            let (code, msg) = f.error_parts().unwrap();
            assert_eq!(code, ErrorCode::Busy as u16, "{msg}");
            assert!(msg.starts_with("retry_after_ms="), "{msg}");
            let hint = f.retry_after_ms().expect("a retry hint");
            let (rest, closed) = c.drain_until_closed(Duration::from_secs(5));
            assert!(closed && rest.is_empty(), "closed after busy: {rest:?}");
            Err(hint)
        }
        k => panic!("unexpected {k:?}"),
    }
}

fn from(source: &str, relay: SocketAddr, form: Form) -> Client {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    let src: SocketAddr = format!("{source}:0").parse().unwrap();
    s.bind(&src.into()).unwrap();
    s.connect(&relay.into()).unwrap();
    Client::from_stream(TcpStream::from(s), form)
}

#[test]
fn hellos_over_the_shard_rate_get_busy_with_a_spread_retry_hint() {
    let relay = start(|c| {
        c.shards.count = 1;
        c.admission.hellos_per_sec = 20;
        c.admission.burst = 10;
        c.admission.retry_min_ms = 200;
        c.admission.retry_window_ms = 1000;
    });
    let t0 = Instant::now();
    let mut clients: Vec<Client> = (0..60)
        .map(|i| {
            let form = if i % 2 == 0 { Form::Binary } else { Form::Json };
            let mut c = Client::connect(relay.tcp_addr(), form);
            send_hello(&mut c, &format!("adm-{i}"));
            c
        })
        .collect();
    let mut welcomed = 0;
    let mut hints = Vec::new();
    for c in &mut clients {
        match answer(c) {
            Ok(()) => welcomed += 1,
            Err(h) => hints.push(h),
        }
    }
    let elapsed = t0.elapsed().as_secs_f64();
    // The burst, plus what the rate refilled meanwhile; every other hello
    // got a hint.
    let most = 10 + (20.0 * elapsed).ceil() as usize + 1;
    assert!(
        (10..=most).contains(&welcomed),
        "{welcomed} welcomed in {elapsed:.2} s"
    );
    assert_eq!(welcomed + hints.len(), 60);
    assert!(hints.iter().all(|h| (200..=1200).contains(h)), "{hints:?}");
    let (lo, hi) = (hints.iter().min().unwrap(), hints.iter().max().unwrap());
    assert!(hi - lo >= 300, "hints spread over the window: {lo}..{hi}");
    let deferred: u64 = relay
        .stats()
        .iter()
        .map(|s| s.hellos_deferred.load(std::sync::atomic::Ordering::Relaxed))
        .sum();
    assert_eq!(deferred, hints.len() as u64);

    // After the hint's wait, the retry is welcomed.
    std::thread::sleep(Duration::from_millis(*hi));
    let mut again = Client::connect(relay.tcp_addr(), Form::Binary);
    send_hello(&mut again, "adm-retry");
    assert_eq!(answer(&mut again), Ok(()));
}

#[test]
fn one_source_address_is_limited_without_holding_back_the_others() {
    let relay = start(|c| {
        c.shards.count = 1;
        c.admission.hellos_per_sec = 0;
        c.admission.per_ip_per_sec = 1;
        c.admission.per_ip_burst = 3;
        c.admission.retry_min_ms = 50;
        c.admission.retry_window_ms = 100;
    });
    let mut results = Vec::new();
    for i in 0..5 {
        let mut c = from("127.0.0.1", relay.tcp_addr(), Form::Binary);
        send_hello(&mut c, &format!("ip-a-{i}"));
        results.push((answer(&mut c).is_ok(), c));
    }
    let ok = results.iter().filter(|(ok, _)| *ok).count();
    assert!((3..=4).contains(&ok), "{ok} of 5 from one address welcomed");
    let mut other = from("127.0.0.2", relay.tcp_addr(), Form::Json);
    send_hello(&mut other, "ip-b-0");
    assert_eq!(answer(&mut other), Ok(()));
}
