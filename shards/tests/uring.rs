//! The io_uring backend's own limits: a provided-buffer ring far too small
//! for the traffic (the kernel ends receives with ENOBUFS, the shard arms
//! them again) loses nothing and keeps order. The rest of the suites run on
//! either backend (`RELAY__SHARDS__IO`).

mod common;

use std::time::Duration;

use common::{Client, Form, counter};
use relay_config::IoBackend;
use relay_core::frame::FrameType;

/// The value of the per-shard counter `name`, summed over shards.
#[test]
fn a_dry_buffer_ring_loses_nothing_and_keeps_order() {
    let relay = common::start(|c| {
        c.shards.io = IoBackend::Uring;
        // Two buffers of 64 bytes for the whole shard, and 1 KiB frames:
        // every frame takes several receives and many find the ring empty.
        c.shards.uring_buffers = 2;
        c.shards.uring_buffer_size = 64;
    });
    const PAIRS: usize = 20;
    const FRAMES: u32 = 30;
    let mut senders = Vec::new();
    let mut receivers = Vec::new();
    for i in 0..PAIRS {
        receivers.push(Client::hello(
            relay.tcp_addr(),
            Form::Binary,
            &format!("dry-rx-{i}"),
        ));
        senders.push(Client::hello(
            relay.tcp_addr(),
            Form::Binary,
            &format!("dry-tx-{i}"),
        ));
    }
    let payload = |i: usize, n: u32| {
        let mut p = format!("{i}:{n}:").into_bytes();
        p.resize(1024, b'x');
        p
    };
    // All senders write at once, from their own threads.
    let threads: Vec<_> = senders
        .into_iter()
        .enumerate()
        .map(|(i, mut s)| {
            std::thread::spawn(move || {
                for n in 0..FRAMES {
                    s.data(&format!("dry-rx-{i}"), n, false, &payload(i, n));
                }
                s
            })
        })
        .collect();
    for (i, rx) in receivers.iter_mut().enumerate() {
        for n in 0..FRAMES {
            let f = rx
                .recv_timeout(Duration::from_secs(20))
                .unwrap_or_else(|| panic!("pair {i}: frame {n} never came"));
            assert_eq!(f.kind, FrameType::Data);
            assert_eq!(
                f.payload.as_ref(),
                payload(i, n).as_slice(),
                "pair {i} frame {n}"
            );
        }
    }
    for t in threads {
        drop(t.join().unwrap());
    }
    let dry = counter(&relay, "relay_uring_enobufs_total");
    assert!(dry > 0, "the ring never ran dry: the test proves nothing");
}

/// Every pair sends at once through a submission ring of 8 entries: the
/// shard's pass queues more receives and sends than the ring holds, so it
/// submits as it goes (or keeps entries for the next pass) and loses none.
#[test]
fn a_submission_ring_smaller_than_a_pass_loses_nothing() {
    let relay = common::start(|c| {
        c.shards.io = IoBackend::Uring;
        c.shards.ring_depth = 8;
    });
    const PAIRS: usize = 40;
    const FRAMES: u32 = 20;
    let mut pairs: Vec<_> = (0..PAIRS)
        .map(|i| {
            let rx = Client::hello(relay.tcp_addr(), Form::Binary, &format!("sq-rx-{i}"));
            let tx = Client::hello(relay.tcp_addr(), Form::Binary, &format!("sq-tx-{i}"));
            (tx, rx)
        })
        .collect();
    for n in 0..FRAMES {
        for (i, (tx, _)) in pairs.iter_mut().enumerate() {
            tx.data(
                &format!("sq-rx-{i}"),
                n,
                false,
                format!("{i}:{n}").as_bytes(),
            );
        }
    }
    for (i, (_, rx)) in pairs.iter_mut().enumerate() {
        for n in 0..FRAMES {
            let f = rx
                .recv_timeout(Duration::from_secs(20))
                .unwrap_or_else(|| panic!("pair {i}: frame {n} never came"));
            assert_eq!(f.payload.as_ref(), format!("{i}:{n}").as_bytes());
        }
    }
}

#[test]
fn the_epoll_backend_never_counts_a_dry_ring() {
    let relay = common::start(|c| c.shards.io = IoBackend::Epoll);
    let mut a = Client::hello(relay.tcp_addr(), Form::Binary, "ep-a");
    let mut b = Client::hello(relay.tcp_addr(), Form::Binary, "ep-b");
    for n in 0..20 {
        a.data("ep-b", n, false, &[7u8; 1024]);
    }
    for _ in 0..20 {
        b.expect(FrameType::Data);
    }
    assert_eq!(counter(&relay, "relay_uring_enobufs_total"), 0);
}
