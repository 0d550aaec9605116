//! What the router keeps allocated per idle connection once its hello is
//! answered and its WELCOME written: counted with a global allocator that
//! tracks live allocations, in a binary of its own (one test, so no other
//! test allocates meanwhile).

use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;

use bytes::Bytes;
use relay_core::conn::{Hello, Now, Role, Transport};
use relay_shards::router::{Router, Signals};
use relay_shards::stats::ShardStats;

#[path = "../../core/tests/support/counting_alloc.rs"]
mod counting_alloc;
use counting_alloc::live;

struct Quiet;

impl Signals for Quiet {
    fn writes_ready(&self) {}
    fn outbox_ready(&self) {}
}

/// Each idle connection keeps two allocations: its record and its address.
/// The indexes add no copy of the address (a second allocation, or a clone
/// that gives it a shared header), and their tables grow by doubling (a
/// few allocations for all the connections).
#[test]
fn an_idle_connection_keeps_its_record_and_its_address() {
    const N: isize = 2000;
    let now = Now {
        mono_ms: 1_000,
        wall_ms: 1_700_000_000_000,
    };
    let cfg = relay_shards::router_config(&relay_config::Config::default());
    let r = Router::new(0, 1, cfg, Arc::new(ShardStats::default()), Rc::new(Quiet));
    let remote = SocketAddr::from(([127, 0, 0, 1], 9));
    let mut cells = Vec::with_capacity(N as usize);
    let before = live();
    for i in 0..N {
        let conn = relay_core::Connection::new(&r.cfg().conn, Transport::Tcp, now);
        let cell = r.register(conn, Router::session(remote));
        let addr = Bytes::from(format!("dev-{i}"));
        let hello = Hello {
            addr: addr.clone(),
            role: Role::Controller,
            heartbeat_s: 30,
            meta: Bytes::new(),
            seq: 1,
            ack_req: false,
            privileged: true,
            auth: relay_core::acl::Auth::None,
        };
        r.accept_hello(&cell, &hello, addr, now);
        drop(hello);
        let mut c = cell.conn.borrow_mut();
        while let Some(chunk) = c.poll_transmit(64 * 1024) {
            c.on_transmitted(&r.cfg().conn, now, chunk.len());
        }
        drop(c);
        cells.push(cell);
    }
    // The write list (the WELCOMEs woke every connection) is the runtime's.
    let mut dirty = Vec::new();
    r.take_dirty(&mut dirty);
    drop(dirty);
    let kept = live() - before;
    assert!(r.lookup(b"dev-7").is_some());
    assert!(
        kept <= 2 * N + 64,
        "{kept} allocations kept for {N} connections"
    );
    drop(cells);
}
