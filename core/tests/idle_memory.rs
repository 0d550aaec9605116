//! What an idle connection keeps allocated once its hello (or CONNECT) is
//! answered and the answer written: counted with a global allocator that
//! tracks live allocations, in a binary of its own (one test, so no other
//! test allocates meanwhile).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering::Relaxed};

use bytes::{Bytes, BytesMut};
use relay_core::conn::{ConnConfig, Connection, Event, Now, Transport};
use relay_core::mqtt::session::{Event as MqttEvent, Session, SessionConfig};

struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(1, Relaxed);
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(1, Relaxed);
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(1, Relaxed);
        unsafe { System.alloc_zeroed(l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        unsafe { System.realloc(p, l, n) }
    }
}

#[global_allocator]
static A: Counting = Counting;

const NOW: Now = Now {
    mono_ms: 0,
    wall_ms: 1_700_000_000_000,
};

/// An idle native connection keeps one allocation: its address (the
/// WELCOME carries a copy of it, not a clone that would give the address a
/// shared header for the connection's life). An idle MQTT session keeps
/// its client id and nothing else (no write queue, no event queue).
#[test]
fn an_idle_connection_keeps_only_its_address() {
    let cfg = ConnConfig::default();
    let before = LIVE.load(Relaxed);
    let mut input = BytesMut::from(&b"{\"type\":\"hello\",\"addr\":\"ctl-1\"}\n"[..]);
    let mut conn = Connection::new(&cfg, Transport::Tcp, NOW);
    while let Some(ev) = conn.handle_input(&cfg, NOW, &mut input) {
        if let Event::Hello(h) = ev {
            // The router's own copy of the address.
            let addr = Bytes::copy_from_slice(&h.addr);
            conn.accept(&cfg, NOW, &h, addr, "node-1");
        }
    }
    drop(input);
    while let Some(chunk) = conn.poll_transmit(64 * 1024) {
        conn.on_transmitted(&cfg, NOW, chunk.len());
    }
    assert!(conn.is_open());
    assert_eq!(LIVE.load(Relaxed) - before, 1, "the address alone");
    drop(conn);
    assert_eq!(LIVE.load(Relaxed), before);

    let cfg = SessionConfig::default();
    let before = LIVE.load(Relaxed);
    let mut input = BytesMut::from(&b"\x10\x11\x00\x04MQTT\x04\x02\x00\x1e\x00\x05ctl-1"[..]);
    let mut s = Session::new(&cfg, NOW);
    while let Some(ev) = s.handle_input(&cfg, NOW, &mut input) {
        assert!(matches!(ev, MqttEvent::Connect(_)));
        s.accept(&cfg, NOW, None, None);
    }
    drop(input);
    s.tidy();
    while let Some(chunk) = s.poll_transmit(64 * 1024) {
        s.on_transmitted(&cfg, NOW, chunk.len());
    }
    assert!(s.is_open());
    assert_eq!(LIVE.load(Relaxed) - before, 1, "the client id alone");
    drop(s);
    assert_eq!(LIVE.load(Relaxed), before);
}
