//! What an idle connection keeps allocated once its hello (or CONNECT) is
//! answered and the answer written: counted with a global allocator that
//! tracks live allocations, in a binary of its own (one test, so no other
//! test allocates meanwhile).

use bytes::{Bytes, BytesMut};
use relay_core::conn::{ConnConfig, Connection, Event, Now, Transport};
use relay_core::mqtt::session::{Event as MqttEvent, Session, SessionConfig};

#[path = "support/counting_alloc.rs"]
mod counting_alloc;
use counting_alloc::live;

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
    let before = live();
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
    assert_eq!(live() - before, 1, "the address alone");
    drop(conn);
    assert_eq!(live(), before);

    let cfg = SessionConfig::default();
    let before = live();
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
    assert_eq!(live() - before, 1, "the client id alone");
    drop(s);
    assert_eq!(live(), before);
}
