//! The connection records a shard holds, found two ways, with no copy of
//! either key:
//!
//! - by id: a slab of records, whose slot the id carries
//!   ([`crate::cell::conn_id_in`]); a lookup checks the whole id, so a
//!   stale one finds nothing. 8 bytes per connection (a map by id cost 31
//!   at 18,000 connections: 16-byte entries in 32,768 buckets), and the
//!   vector's spare capacity is untouched address space, not resident
//!   memory;
//! - by address: a hash table of the records themselves, hashed by the
//!   address their connection holds (the hash kept in the record,
//!   `ConnCell::addr_hash`, so growing the table reads no connection). 8
//!   bytes per bucket where a map keyed by a copy of the address took 40,
//!   and the address is no longer cloned for the key (a clone of a unique
//!   `Bytes` allocates its shared header, 32 bytes).

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::rc::Rc;

use hashbrown::HashTable;

use crate::cell::{ConnCell, ConnId, SPILL_SLOT, conn_id_in, slot_of};

/// The records by id.
#[derive(Debug)]
pub(super) struct ById {
    slots: Vec<Option<Rc<ConnCell>>>,
    /// Vacant slots, reused first.
    free: Vec<u32>,
    /// Records beyond the last slot an id can name (never in practice).
    spill: HashMap<ConnId, Rc<ConnCell>>,
    len: usize,
    /// Slots at most (`SPILL_SLOT`; fewer in a test).
    max_slots: u32,
}

impl Default for ById {
    fn default() -> Self {
        ById {
            slots: Vec::new(),
            free: Vec::new(),
            spill: HashMap::new(),
            len: 0,
            max_slots: SPILL_SLOT,
        }
    }
}

impl ById {
    /// Makes a record for the `counter`th connection of `shard` with
    /// `make(id)` and holds it.
    pub(super) fn insert(
        &mut self,
        shard: usize,
        counter: u64,
        make: impl FnOnce(ConnId) -> ConnCell,
    ) -> Rc<ConnCell> {
        let slot = match self.free.pop() {
            Some(s) => s,
            None if self.slots.len() < self.max_slots as usize => {
                self.slots.push(None);
                (self.slots.len() - 1) as u32
            }
            None => SPILL_SLOT,
        };
        let cell = Rc::new(make(conn_id_in(shard, counter, slot)));
        match self
            .slots
            .get_mut(slot as usize)
            .filter(|_| slot < SPILL_SLOT)
        {
            Some(s) => *s = Some(cell.clone()),
            None => {
                self.spill.insert(cell.id, cell.clone());
            }
        }
        self.len += 1;
        cell
    }

    pub(super) fn get(&self, id: ConnId) -> Option<&Rc<ConnCell>> {
        match slot_of(id) {
            SPILL_SLOT => self.spill.get(&id),
            slot => self
                .slots
                .get(slot as usize)?
                .as_ref()
                .filter(|c| c.id == id),
        }
    }

    /// Lets go of the record with id `id`; whether it was held.
    pub(super) fn remove(&mut self, id: ConnId) -> bool {
        let slot = slot_of(id);
        let gone = match self.slots.get_mut(slot as usize) {
            _ if slot == SPILL_SLOT => self.spill.remove(&id).is_some(),
            Some(s) if s.as_ref().is_some_and(|c| c.id == id) => {
                *s = None;
                self.free.push(slot);
                true
            }
            _ => false,
        };
        if gone {
            self.len -= 1;
        }
        gone
    }

    pub(super) fn len(&self) -> usize {
        self.len
    }

    pub(super) fn values(&self) -> impl Iterator<Item = &Rc<ConnCell>> {
        self.slots.iter().flatten().chain(self.spill.values())
    }
}

/// The records of open connections by address.
#[derive(Default)]
pub(super) struct ByAddr {
    table: HashTable<Rc<ConnCell>>,
    hasher: std::hash::RandomState,
}

impl std::fmt::Debug for ByAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ByAddr")
            .field("len", &self.table.len())
            .finish()
    }
}

/// The table's hash of a record's kept hash: spread over 64 bits (the
/// table takes its buckets from the low bits, its tags from the top ones).
fn spread(h: u32) -> u64 {
    u64::from(h).wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

/// Whether the connection of `c` holds `addr`. A record whose connection
/// is in use further up the stack is not read (the table only compares
/// records whose hash tag matches, and no caller looks up the connection
/// it is working on).
fn holds(c: &ConnCell, addr: &[u8]) -> bool {
    c.conn.try_borrow().is_ok_and(|x| x.addr().as_ref() == addr)
}

impl ByAddr {
    fn hash(&self, addr: &[u8]) -> u32 {
        self.hasher.hash_one(addr) as u32
    }

    /// The record holding `addr`.
    pub(super) fn get(&self, addr: &[u8]) -> Option<&Rc<ConnCell>> {
        self.table.find(spread(self.hash(addr)), |c| holds(c, addr))
    }

    /// Makes `cell`, whose connection holds `addr` now, the holder of it;
    /// returns the record that held it before.
    pub(super) fn insert(&mut self, cell: &Rc<ConnCell>) -> Option<Rc<ConnCell>> {
        // Read in place: a clone of a unique `Bytes` would give the address
        // a shared header (32 bytes) for the connection's life.
        let conn = cell.conn.borrow();
        let addr: &[u8] = conn.addr();
        let h32 = self.hash(addr);
        cell.addr_hash.set(h32);
        let h = spread(h32);
        let old = match self.table.find_entry(h, |c| holds(c, addr)) {
            Ok(e) => Some(e.remove().0),
            Err(_) => None,
        };
        drop(conn);
        self.table
            .insert_unique(h, cell.clone(), |c| spread(c.addr_hash.get()));
        old
    }

    /// Lets go of `cell` if it holds its address here; whether it did.
    pub(super) fn remove(&mut self, cell: &Rc<ConnCell>) -> bool {
        let h = spread(cell.addr_hash.get());
        match self.table.find_entry(h, |c| Rc::ptr_eq(c, cell)) {
            Ok(e) => {
                e.remove();
                true
            }
            Err(_) => false,
        }
    }

    pub(super) fn values(&self) -> impl Iterator<Item = &Rc<ConnCell>> {
        self.table.iter()
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::rc::Rc;
    use std::sync::Arc;

    use bytes::{Bytes, BytesMut};
    use relay_core::conn::{Hello, Now, Role, Transport};
    use relay_core::mqtt::session::Event as MqttEvent;

    use super::super::{MqttConn, Outcome, Router, Signals};
    use crate::cell::{ConnCell, SPILL_SLOT, slot_of};
    use crate::stats::ShardStats;

    struct Quiet;

    impl Signals for Quiet {
        fn writes_ready(&self) {}
        fn outbox_ready(&self) {}
    }

    const NOW: Now = Now {
        mono_ms: 1_000,
        wall_ms: 1_700_000_000_000,
    };

    fn router() -> Router {
        let cfg = crate::router_config(&relay_config::Config::default());
        Router::new(0, 1, cfg, Arc::new(ShardStats::default()), Rc::new(Quiet))
    }

    fn register(r: &Router) -> Rc<ConnCell> {
        let conn = relay_core::Connection::new(&r.cfg().conn, Transport::Tcp, NOW);
        r.register(conn, Router::session(SocketAddr::from(([127, 0, 0, 1], 9))))
    }

    fn hello(addr: &str) -> Hello {
        Hello {
            addr: Bytes::copy_from_slice(addr.as_bytes()),
            role: Role::Controller,
            heartbeat_s: 30,
            meta: Bytes::new(),
            seq: 1,
            ack_req: false,
            privileged: true,
            auth: relay_core::acl::Auth::None,
        }
    }

    /// Records are found by id through the slot their id carries, and by
    /// address through the address their connection holds; a closed
    /// record's id finds nothing, also once its slot is taken again.
    #[test]
    fn records_are_found_by_id_and_by_address_without_key_copies() {
        let r = router();
        let a = register(&r);
        let b = register(&r);
        assert_ne!(slot_of(a.id), slot_of(b.id));
        assert!(Rc::ptr_eq(&r.cell(a.id).unwrap(), &a));
        assert!(Rc::ptr_eq(&r.cell(b.id).unwrap(), &b));
        r.accept_hello(&a, &hello("dev-a"), Bytes::from_static(b"dev-a"), NOW);
        r.accept_hello(&b, &hello("dev-b"), Bytes::from_static(b"dev-b"), NOW);
        assert!(Rc::ptr_eq(&r.lookup(b"dev-a").unwrap(), &a));
        assert!(Rc::ptr_eq(&r.lookup(b"dev-b").unwrap(), &b));
        assert!(r.lookup(b"dev-c").is_none());
        assert_eq!(r.conn_count(), 2);

        r.on_closed(&a, NOW);
        assert!(r.cell(a.id).is_none());
        assert!(r.lookup(b"dev-a").is_none());
        assert_eq!(r.conn_count(), 1);
        // The slot is reused; the old id still finds nothing.
        let c = register(&r);
        assert_eq!(slot_of(c.id), slot_of(a.id));
        assert!(r.cell(a.id).is_none());
        assert!(Rc::ptr_eq(&r.cell(c.id).unwrap(), &c));
        // A new connection takes an address over: the index holds it.
        r.accept_hello(&c, &hello("dev-b"), Bytes::from_static(b"dev-b"), NOW);
        assert!(Rc::ptr_eq(&r.lookup(b"dev-b").unwrap(), &c));
        // The replaced one's close leaves the new holder in place.
        r.on_closed(&b, NOW);
        assert!(Rc::ptr_eq(&r.lookup(b"dev-b").unwrap(), &c));
    }

    /// Many records: the tables grow (the index by address rehashes from
    /// the hashes the records keep) and every record stays found.
    #[test]
    fn every_record_stays_found_as_the_tables_grow() {
        let r = router();
        let cells: Vec<_> = (0..2000)
            .map(|i| {
                let c = register(&r);
                let a = format!("dev-{i}");
                r.accept_hello(&c, &hello(&a), Bytes::from(a.clone()), NOW);
                (a, c)
            })
            .collect();
        for (a, c) in &cells {
            assert!(Rc::ptr_eq(&r.lookup(a.as_bytes()).unwrap(), c));
            assert!(Rc::ptr_eq(&r.cell(c.id).unwrap(), c));
            assert!(slot_of(c.id) < SPILL_SLOT);
        }
        for (_, c) in cells.iter().step_by(2) {
            r.on_closed(c, NOW);
        }
        for (i, (a, c)) in cells.iter().enumerate() {
            assert_eq!(r.lookup(a.as_bytes()).is_some(), i % 2 == 1);
            assert_eq!(r.cell(c.id).is_some(), i % 2 == 1);
        }
        assert_eq!(r.conn_count(), 1000);
    }

    /// The API's listing pages through the records in address order, with
    /// no ordered copy of the addresses.
    #[test]
    fn a_listing_pages_in_address_order() {
        use super::super::{Call, CallResult};
        let r = router();
        let names = ["d-07", "d-03", "x-01", "d-09", "d-01", "d-05", "d-02"];
        for a in names {
            let c = register(&r);
            r.accept_hello(&c, &hello(a), Bytes::from_static(a.as_bytes()), NOW);
        }
        let page = |after: Option<&'static str>, limit: usize| {
            let got = Rc::new(std::cell::RefCell::new(Vec::new()));
            let out = got.clone();
            r.call(
                0,
                Call::List {
                    role: None,
                    prefix: "d-".into(),
                    after: after.map(|a: &'static str| Bytes::from_static(a.as_bytes())),
                    limit,
                },
                Box::new(move |res| {
                    let CallResult::List(v) = res else { panic!() };
                    *out.borrow_mut() = v.into_iter().map(|c| c.addr).collect();
                }),
                NOW,
            );
            got.take()
        };
        let b = |v: &[&'static str]| {
            v.iter()
                .map(|a| Bytes::from_static(a.as_bytes()))
                .collect::<Vec<_>>()
        };
        assert_eq!(page(None, 3), b(&["d-01", "d-02", "d-03"]));
        assert_eq!(page(Some("d-03"), 3), b(&["d-05", "d-07", "d-09"]));
        assert_eq!(page(Some("d-09"), 3), b(&[]));
        assert_eq!(page(None, 0), b(&[]));
        assert_eq!(page(None, 100).len(), 6);
    }

    /// The spill map past the last slot an id can name.
    #[test]
    fn records_past_the_last_slot_are_held_aside() {
        let mut t = super::ById {
            max_slots: 1,
            ..Default::default()
        };
        let r = router();
        let remote = SocketAddr::from(([127, 0, 0, 1], 9));
        let mut add = |n: u64| {
            let conn = relay_core::Connection::new(&r.cfg().conn, Transport::Tcp, NOW);
            t.insert(0, n, |id| {
                ConnCell::new(id, conn, crate::cell::Session::new(remote))
            })
        };
        let (a, b, c) = (add(1), add(2), add(3));
        assert_eq!(slot_of(a.id), 0);
        assert_eq!(slot_of(b.id), SPILL_SLOT);
        assert_eq!(slot_of(c.id), SPILL_SLOT);
        for x in [&a, &b, &c] {
            assert!(Rc::ptr_eq(t.get(x.id).unwrap(), x));
        }
        assert_eq!(t.len(), 3);
        assert_eq!(t.values().count(), 3);
        assert!(t.remove(b.id));
        assert!(!t.remove(b.id));
        assert!(t.get(b.id).is_none());
        assert!(t.get(c.id).is_some());
        assert_eq!(t.len(), 2);
    }

    /// An MQTT client's native protocol state holds nothing queued once its
    /// CONNECT is accepted: its session wrote CONNACK, and the WELCOME the
    /// native state queues at accept (never sent on MQTT) is dropped.
    #[test]
    fn an_accepted_mqtt_client_holds_no_native_output() {
        let r = router();
        let cell = register(&r);
        let mcfg = r.cfg().mqtt.clone();
        *cell.mqtt.borrow_mut() = Some(Box::new(MqttConn::new(&mcfg.session, NOW)));
        let mut input = BytesMut::from(&b"\x10\x11\x00\x04MQTT\x04\x02\x00\x1e\x00\x05dev-m"[..]);
        let ev = {
            let mut m = cell.mqtt.borrow_mut();
            let m = m.as_mut().unwrap();
            m.session.handle_input(&mcfg.session, NOW, &mut input)
        };
        let Some(ev @ MqttEvent::Connect(_)) = ev else {
            panic!("{ev:?}")
        };
        assert!(matches!(r.on_mqtt_event(&cell, ev, NOW), Outcome::Continue));
        assert!(cell.conn.borrow().is_open());
        assert_eq!(cell.conn.borrow().queued_bytes(), 0);
        assert!(cell.conn.borrow_mut().poll_transmit(1024).is_none());
        let connack = cell
            .mqtt
            .borrow_mut()
            .as_mut()
            .unwrap()
            .session
            .poll_transmit(1024);
        assert_eq!(connack.as_deref(), Some(&b"\x20\x02\x00\x00"[..]));
        assert!(Rc::ptr_eq(&r.lookup(b"dev-m").unwrap(), &cell));
    }
}
