//! The record of one connection on its shard, shared (`Rc`) between the
//! connection's driver task and the shard's router. Single-threaded: interior
//! mutability with `RefCell`/`Cell`, never a lock.

use std::cell::{Cell, RefCell};
use std::net::SocketAddr;
use std::task::Waker;

use bytes::Bytes;
use relay_core::{CloseReason, Connection};

/// Identifies a connection for the life of the process: the shard in the low
/// 8 bits, a per-shard counter above. Never reused, so a stale id (an ACK
/// for a connection that has gone) finds nothing instead of the wrong peer.
pub type ConnId = u64;

pub fn conn_id(shard: usize, counter: u64) -> ConnId {
    (counter << 8) | (shard as u64 & 0xff)
}

/// What the API and rules know about a session.
#[derive(Debug, Clone)]
pub struct Session {
    pub remote: SocketAddr,
    pub connected_at_ms: u64,
    /// Compact JSON object from the hello.
    pub meta: Bytes,
    /// Groups this connection is a member of.
    pub groups: Vec<Bytes>,
    /// Uids bound to this connection's address (through the API).
    pub uids: Vec<Bytes>,
}

#[derive(Debug)]
pub struct ConnCell {
    pub id: ConnId,
    pub conn: RefCell<Connection>,
    /// Waker of the driver task: routers push frames into `conn` and wake it,
    /// so everything queued during one scheduler turn leaves in one write.
    pub waker: RefCell<Option<Waker>>,
    pub session: RefCell<Session>,
    /// Set once the connection is closing: when the driver gives up flushing.
    pub close_deadline: Cell<Option<u64>>,
    pub reason: Cell<Option<CloseReason>>,
}

impl ConnCell {
    pub fn new(id: ConnId, conn: Connection, session: Session) -> ConnCell {
        ConnCell {
            id,
            conn: RefCell::new(conn),
            waker: RefCell::new(None),
            session: RefCell::new(session),
            close_deadline: Cell::new(None),
            reason: Cell::new(None),
        }
    }

    /// Wakes the driver so it writes what was queued or notices a close.
    pub fn wake(&self) {
        if let Some(w) = self.waker.borrow().as_ref() {
            w.wake_by_ref();
        }
    }

    /// Records that the connection is closing (first reason wins).
    pub fn closing(&self, reason: CloseReason, deadline_ms: u64) {
        if self.reason.get().is_none() {
            self.reason.set(Some(reason));
            self.close_deadline.set(Some(deadline_ms));
        }
    }
}
