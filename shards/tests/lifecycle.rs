//! Many relays started and stopped in one process, as an embedding program
//! (or a test suite) does. Each start builds a shard mesh on several threads
//! and each stop tears it down; a race there corrupts the heap, which shows
//! as an abort a few relays later, so the loop goes on long enough to see it.

mod common;

use std::time::{Duration, Instant};

use common::{Client, Form, addrs_on, start};
use relay_core::frame::FrameType;

#[test]
fn relays_started_and_stopped_in_one_process_keep_the_heap_sound() {
    const SHARDS: usize = 4;
    const CYCLES: usize = 40;
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut done = 0;
    while done < CYCLES && Instant::now() < deadline {
        let relay = start(|c| c.shards.count = SHARDS);
        // One frame across shards, so the mesh carries something each time.
        let a = addrs_on("life-a-", 0, SHARDS, 1).remove(0);
        let b = addrs_on("life-b-", SHARDS - 1, SHARDS, 1).remove(0);
        let mut rx = Client::hello(relay.tcp_addr(), Form::Binary, &b);
        let mut tx = Client::hello(relay.tcp_addr(), Form::Binary, &a);
        tx.data(&b, 1, false, b"ping");
        let f = rx.expect(FrameType::Data);
        assert_eq!(&f.payload[..], b"ping");
        drop((rx, tx));
        relay.stop();
        relay.join().expect("relay stops cleanly");
        done += 1;
    }
    assert_eq!(done, CYCLES, "every cycle ran within the time bound");
}
