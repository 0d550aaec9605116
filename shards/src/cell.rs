//! The record of one connection on its shard, shared (`Rc`) between the
//! shard's I/O loop and its router: the protocol state (`Connection`), the
//! session, and the router's marks. Plain data: the socket, its TLS session
//! and its buffers live in the runtime, in the shard's I/O table
//! (`rt/io.rs`), which the record only names by slot. Single-threaded:
//! interior mutability with `RefCell`/`Cell`, never a lock.

use std::cell::{Cell, RefCell};
use std::net::SocketAddr;

use bytes::Bytes;
use relay_core::{CloseReason, Connection};

/// Identifies a connection: the shard in the low 8 bits, the low 32 bits
/// of a per-shard counter above them, and the record's slot in its router's
/// table in the top 24 bits (so the router finds a record by id with no map
/// by id). An id comes back only after 2^32 more connections on its shard
/// that took the same slot, so a stale id (an ACK for a connection that has
/// gone) finds nothing instead of the wrong peer. The low 32 bits (shard
/// and counter) are what the I/O table's tokens carry.
pub type ConnId = u64;

/// Bits of the router slot in a [`ConnId`].
const SLOT_SHIFT: u32 = 40;
/// The slot of a record the router keeps outside its table (beyond
/// 16,777,214 connections on one shard).
pub const SPILL_SLOT: u32 = (1 << (64 - SLOT_SHIFT)) - 1;

/// The id of the `counter`th connection of `shard`, in router slot 0.
pub fn conn_id(shard: usize, counter: u64) -> ConnId {
    conn_id_in(shard, counter, 0)
}

/// The id of the `counter`th connection of `shard`, in router slot `slot`
/// (at most [`SPILL_SLOT`]).
pub fn conn_id_in(shard: usize, counter: u64, slot: u32) -> ConnId {
    (u64::from(slot.min(SPILL_SLOT)) << SLOT_SHIFT)
        | ((counter & 0xffff_ffff) << 8)
        | (shard as u64 & 0xff)
}

/// The router slot an id names.
pub fn slot_of(id: ConnId) -> u32 {
    (id >> SLOT_SHIFT) as u32
}

/// What the API and rules know about a session. The parts most idle
/// controllers never have (hello meta, groups, uids) live out of line, so
/// the record of an idle connection stays small.
#[derive(Debug, Clone)]
pub struct Session {
    pub remote: SocketAddr,
    pub connected_at_ms: u64,
    more: Option<Box<SessionMore>>,
}

#[derive(Debug, Clone, Default)]
struct SessionMore {
    /// Compact JSON object from the hello (empty: `{}`).
    meta: Bytes,
    /// Groups this connection is a member of.
    groups: Vec<Bytes>,
    /// Uids bound to this connection's address (through the API).
    uids: Vec<Bytes>,
}

/// The two lists a connection can be a member of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Membership {
    Group,
    Uid,
}

impl Session {
    pub fn new(remote: SocketAddr) -> Session {
        Session {
            remote,
            connected_at_ms: 0,
            more: None,
        }
    }

    /// The hello's meta as a compact JSON object (`{}` when it had none).
    pub fn meta(&self) -> Bytes {
        match &self.more {
            Some(m) if !m.meta.is_empty() => m.meta.clone(),
            _ => Bytes::from_static(b"{}"),
        }
    }

    pub fn set_meta(&mut self, meta: Bytes) {
        if meta.is_empty() || meta.as_ref() == b"{}" {
            if let Some(m) = self.more.as_mut() {
                m.meta = Bytes::new();
            }
        } else {
            self.more.get_or_insert_with(Box::default).meta = meta;
        }
    }

    /// The groups or uids of this connection.
    pub fn list(&self, which: Membership) -> &[Bytes] {
        match (&self.more, which) {
            (Some(m), Membership::Group) => &m.groups,
            (Some(m), Membership::Uid) => &m.uids,
            (None, _) => &[],
        }
    }

    /// The groups or uids of this connection, to change.
    pub fn list_mut(&mut self, which: Membership) -> &mut Vec<Bytes> {
        let m = self.more.get_or_insert_with(Box::default);
        match which {
            Membership::Group => &mut m.groups,
            Membership::Uid => &mut m.uids,
        }
    }

    /// Takes every membership (the connection is going).
    pub fn take_lists(&mut self) -> (Vec<Bytes>, Vec<Bytes>) {
        match self.more.as_mut() {
            Some(m) => (std::mem::take(&mut m.groups), std::mem::take(&mut m.uids)),
            None => (Vec::new(), Vec::new()),
        }
    }
}

#[derive(Debug)]
pub struct ConnCell {
    pub id: ConnId,
    pub conn: RefCell<Connection>,
    /// Set while the connection waits in its shard's write list: everything
    /// queued for it during one pass of the I/O loop leaves in one write.
    pub dirty: Cell<bool>,
    pub session: RefCell<Session>,
    /// Answers (ACK or ERROR) this connection is owed by other shards: room
    /// for them counts against its queue before more of its input is read.
    pub owed: Cell<u32>,
    /// The deadline slot the router will look at this connection in
    /// (`router::timers`; `NOT_DUE`: none).
    pub due: Cell<u32>,
    /// The access rules that can apply to this client (made at hello)...
    pub acl: AclView,
    /// ...and the settings generation they were made for (its low 32 bits).
    pub acl_generation: Cell<u32>,
    /// The slot of the connection's socket state in the runtime's I/O table
    /// on this shard (`NO_SLOT` while it has none); the router never reads it.
    pub io_slot: Cell<u32>,
    /// The hash of the address the router holds this connection under
    /// (its index by address hashes the record, not a copy of the key).
    pub addr_hash: Cell<u32>,
    /// The MQTT session of a client on the MQTT listener (`None`: native).
    pub mqtt: RefCell<Option<Box<crate::router::MqttConn>>>,
}

/// A list of access rules, shared by the connections it applies to.
pub type AclList = std::rc::Rc<Box<[u16]>>;

/// The access-rule view a connection keeps: a `Cell`, not a `RefCell`, of
/// a thin pointer, so it costs the record 8 bytes.
#[derive(Default)]
pub struct AclView(Cell<Option<AclList>>);

impl AclView {
    pub fn get(&self) -> Option<AclList> {
        let v = self.0.take();
        self.0.set(v.clone());
        v
    }

    pub fn set(&self, v: AclList) {
        self.0.set(Some(v));
    }
}

impl std::fmt::Debug for AclView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("AclView").field(&self.get()).finish()
    }
}

/// `ConnCell::io_slot` of a connection without socket state on the shard.
pub const NO_SLOT: u32 = u32::MAX;

impl ConnCell {
    pub fn new(id: ConnId, conn: Connection, session: Session) -> ConnCell {
        ConnCell {
            id,
            conn: RefCell::new(conn),
            dirty: Cell::new(false),
            session: RefCell::new(session),
            owed: Cell::new(0),
            due: Cell::new(u32::MAX), // router::timers::NOT_DUE
            acl: AclView::default(),
            acl_generation: Cell::new(0),
            io_slot: Cell::new(NO_SLOT),
            addr_hash: Cell::new(0),
            mqtt: RefCell::new(None),
        }
    }

    /// Records that the connection is closing, to be closed by
    /// `deadline_ms` at the latest (the state lives in the `Connection`:
    /// the first reason wins, the deadline only moves earlier).
    pub fn closing(&self, reason: CloseReason, deadline_ms: u64) {
        self.conn.borrow_mut().closing(reason, deadline_ms);
    }
}

#[cfg(test)]
mod size_tests {
    /// The record is most of the relay's memory per idle connection: what
    /// only some connections need stays out of line. At 232 bytes its
    /// allocation (with the `Rc` counts and malloc's header) is 256 bytes,
    /// down from 320 at 288.
    #[test]
    fn the_connection_record_stays_small() {
        let n = std::mem::size_of::<super::ConnCell>();
        assert!(n <= 232, "{n}");
    }

    /// The access-rule view is a thin pointer.
    #[test]
    fn the_access_rule_view_is_one_pointer() {
        assert_eq!(std::mem::size_of::<super::AclView>(), 8);
    }

    /// The router slot survives in the id next to the shard and counter,
    /// and the low 32 bits (the I/O table's check) are those of before.
    #[test]
    fn an_id_carries_its_router_slot() {
        let id = super::conn_id_in(3, (7 << 32) | 5, 12);
        assert_eq!(super::slot_of(id), 12);
        assert_eq!(id as u32, (5 << 8) | 3);
        assert_eq!(id & 0xff, 3);
        let spill = super::conn_id_in(3, 5, u32::MAX);
        assert_eq!(super::slot_of(spill), super::SPILL_SLOT);
    }
}
