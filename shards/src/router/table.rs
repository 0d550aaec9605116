//! Address ownership: the connections this shard holds, hellos, take-over,
//! closes, deadlines and shutdown.

use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;

use bytes::Bytes;
use relay_core::conn::{CloseReason, Connection, Event, Hello, Now};
use relay_core::frame::ErrorCode;
use relay_core::route::{assign_address, shard_of};

use super::*;
use crate::cell::{ConnCell, ConnId, Session};
use crate::stats::ShardStats;

impl Router {
    /// Registers a freshly accepted (or handed-over) connection.
    pub fn register(&self, conn: Connection, session: Session) -> Rc<ConnCell> {
        let n = self.next_conn.get();
        self.next_conn.set(n + 1);
        let cell = self
            .conns
            .borrow_mut()
            .insert(self.shard, n, |id| ConnCell::new(id, conn, session));
        ShardStats::add(&self.stats.conns_pending, 1);
        self.arm(&cell);
        cell
    }

    /// Number of connections on this shard, any state.
    pub fn conn_count(&self) -> usize {
        self.conns.borrow().len()
    }

    /// The connection holding `addr`, if this shard owns it and it is open.
    pub fn lookup(&self, addr: &[u8]) -> Option<Rc<ConnCell>> {
        self.by_addr.borrow().get(addr).cloned()
    }

    /// The connection with id `id`, if it is still on this shard.
    pub fn cell(&self, id: ConnId) -> Option<Rc<ConnCell>> {
        self.conns.borrow().get(id).cloned()
    }

    pub(super) fn on_hello(&self, cell: &Rc<ConnCell>, hello: Hello, now: Now) -> Outcome {
        // An upgrade stops hellos too, but answers them with `going_away`
        // and a retry hint (the new process takes them), not `shutting_down`.
        if let Some(window) = self.going_away.get() {
            let ms = self.admission.borrow_mut().jitter(window);
            let ev = cell.conn.borrow_mut().refuse_retry(
                &self.cfg().conn,
                hello.seq,
                ErrorCode::GoingAway,
                ms,
                GOING_AWAY,
            );
            if let Some(Event::Closed(r)) = ev {
                cell.closing(r, now.mono_ms + self.cfg().close_grace_ms);
            }
            return Outcome::Continue;
        }
        if self.shutting_down.get() {
            let ev = cell.conn.borrow_mut().refuse(
                &self.cfg().conn,
                hello.seq,
                ErrorCode::ShuttingDown,
                "relay is shutting down",
                true,
            );
            if let Some(Event::Closed(r)) = ev {
                cell.closing(r, now.mono_ms + self.cfg().close_grace_ms);
            }
            return Outcome::Continue;
        }
        let ip = cell.session.borrow().remote.ip();
        let verdict = self
            .admission
            .borrow_mut()
            .check(&self.cfg().admission, ip, now.mono_ms);
        if let crate::admission::Verdict::Busy {
            retry_after_ms,
            limit,
        } = verdict
        {
            ShardStats::add(&self.stats.hellos_deferred, 1);
            let why = match limit {
                crate::admission::Limit::Shard => "too many hellos; try again later",
                crate::admission::Limit::SourceAddress => {
                    "too many hellos from this address; try again later"
                }
            };
            crate::warn_every!("[admission] limit reached; hellos are told to retry later");
            let mut conn = cell.conn.borrow_mut();
            let ev = conn.refuse_retry(
                &self.cfg().conn,
                hello.seq,
                ErrorCode::Busy,
                retry_after_ms,
                why,
            );
            drop(conn);
            if let Some(Event::Closed(r)) = ev {
                cell.closing(r, now.mono_ms + self.cfg().close_grace_ms);
            }
            return Outcome::Continue;
        }
        if hello.addr.is_empty() {
            let mut counter = self.assign_counter.get();
            let prefix = format!("{}-", self.cfg().node);
            let addr = assign_address(&prefix, self.shard, self.shards, &mut counter);
            self.assign_counter.set(counter);
            self.accept_hello(cell, &hello, Bytes::from(addr), now);
            return Outcome::Continue;
        }
        let owner = shard_of(&hello.addr, self.shards);
        if owner != self.shard {
            return Outcome::Handover { owner, hello };
        }
        let addr = hello.addr.clone();
        self.accept_hello(cell, &hello, addr, now);
        Outcome::Continue
    }

    /// Makes `cell` the holder of `addr` on this (owner) shard, replacing a
    /// connection that held it, and sends WELCOME.
    pub fn accept_hello(&self, cell: &Rc<ConnCell>, hello: &Hello, addr: Bytes, now: Now) {
        // Its own allocation: a slice of the read buffer would keep that
        // whole chunk alive for as long as the client is online.
        self.accept_hello_owned(cell, hello, Bytes::copy_from_slice(&addr), now);
    }

    /// [`accept_hello`](Self::accept_hello) with an address that already
    /// has its own allocation (kept as it is, and shared with its caller).
    pub(super) fn accept_hello_owned(
        &self,
        cell: &Rc<ConnCell>,
        hello: &Hello,
        addr: Bytes,
        now: Now,
    ) {
        // The index by address reads the address from the connection: it
        // holds it first. (One no longer waiting for its hello does not
        // take it, and is not indexed under it.)
        cell.conn
            .borrow_mut()
            .accept(&self.cfg().conn, now, hello, addr, &self.cfg().node);
        let old = if cell.conn.borrow().addr().is_empty() {
            None
        } else {
            self.by_addr.borrow_mut().insert(cell)
        };
        if let Some(old) = old
            && old.id != cell.id
        {
            let why = "address taken over by a new connection";
            self.end(
                &old,
                ErrorCode::Replaced,
                why,
                CloseReason::Replaced,
                now.mono_ms + self.cfg().close_grace_ms,
            );
            self.drop_memberships(&old);
        }
        // The access rules that can apply to this client, once.
        {
            let cfg = self.cfg();
            if !cfg.acl.acl.is_open() {
                self.acl_view(cell, &cfg.acl);
            }
        }
        {
            let mut s = cell.session.borrow_mut();
            s.set_meta(hello.meta.clone());
            s.connected_at_ms = now.wall_ms;
        }
        self.stats.conns_pending.fetch_sub(1, Relaxed);
        ShardStats::add(
            &self.stats.conns_by_role[ShardStats::role_index(hello.role)],
            1,
        );
        if self.clustered() {
            self.push_remote(Remote::Claim {
                addr: cell.conn.borrow().addr().clone(),
                conn: cell.id,
                at_ms: now.wall_ms,
            });
        }
        if let Some(h) = self.hooks.borrow().as_ref() {
            h.connected(cell, self.shard, now);
        }
    }

    /// Removes a connection that is handed to another shard.
    pub fn forget(&self, cell: &Rc<ConnCell>) {
        self.conns.borrow_mut().remove(cell.id);
        self.stats.conns_pending.fetch_sub(1, Relaxed);
    }

    /// Cleans up after a connection's socket closed.
    pub fn on_closed(&self, cell: &Rc<ConnCell>, now: Now) {
        if !self.conns.borrow_mut().remove(cell.id) {
            return;
        }
        self.mqtt_closed(cell, now);
        ShardStats::add(&self.stats.closed_total, 1);
        let conn = cell.conn.borrow();
        if conn.addr().is_empty() {
            self.stats.conns_pending.fetch_sub(1, Relaxed);
            return;
        }
        self.stats.conns_by_role[ShardStats::role_index(conn.role())].fetch_sub(1, Relaxed);
        let addr = conn.addr().clone();
        drop(conn);
        let held = self.by_addr.borrow_mut().remove(cell);
        if held && self.clustered() {
            self.push_remote(Remote::Release {
                addr: addr.clone(),
                conn: cell.id,
            });
        }
        // The hook sees the groups the connection was in, before it leaves them.
        if let Some(h) = self.hooks.borrow().as_ref() {
            h.disconnected(
                cell,
                self.shard,
                cell.conn
                    .borrow()
                    .close_reason()
                    .unwrap_or(CloseReason::PeerClosed),
                now,
            );
        }
        self.drop_memberships(cell);
    }

    pub(super) fn drop_memberships(&self, cell: &Rc<ConnCell>) {
        let (groups, uids) = { cell.session.borrow_mut().take_lists() };
        for g in groups {
            self.leave_index(Index::Group, cell, &g);
        }
        for u in uids {
            self.leave_index(Index::Uid, cell, &u);
        }
    }

    /// An upgrade hands over to a new process: no more accepts or hellos
    /// here, and every client gets ERROR `going_away` with a `retry_after_ms`
    /// drawn from 0 to `window_ms`. Connections stay served (frames in
    /// flight are answered) until the clients close or `end_going_away`.
    pub fn going_away(&self, window_ms: u64) {
        self.going_away.set(Some(window_ms));
        self.shutting_down.set(true);
        let cells: Vec<Rc<ConnCell>> = self.conns.borrow().values().cloned().collect();
        for cell in cells {
            if !cell.conn.borrow().is_open() {
                // Before hello: its hello (if any) gets the same answer.
                continue;
            }
            let ms = self.admission.borrow_mut().jitter(window_ms);
            let f = Frame::error_retry(0, ErrorCode::GoingAway, ms, GOING_AWAY);
            cell.conn.borrow_mut().control(&self.cfg().conn, &f);
            self.wake(&cell);
        }
    }

    pub fn is_going_away(&self) -> bool {
        self.going_away.get().is_some()
    }

    pub fn going_away_ended(&self) -> bool {
        self.going_away_ended.get()
    }

    /// The end of an upgrade's drain: every connection still here gets
    /// `going_away` again and is closed once flushed or at `deadline_ms`
    /// (WebSocket close 1012).
    pub fn end_going_away(&self, window_ms: u64, deadline_ms: u64) {
        self.going_away_ended.set(true);
        let cells: Vec<Rc<ConnCell>> = self.conns.borrow().values().cloned().collect();
        for cell in cells {
            let ms = self.admission.borrow_mut().jitter(window_ms);
            let why = format!("{}{ms} {GOING_AWAY}", relay_core::frame::RETRY_AFTER_PREFIX);
            self.end(
                &cell,
                ErrorCode::GoingAway,
                &why,
                CloseReason::GoingAway,
                deadline_ms,
            );
        }
    }

    /// Begins a graceful shutdown: every client gets ERROR `shutting_down`
    /// after what is already queued, and is closed once flushed or at `deadline_ms`.
    pub fn shutdown(&self, deadline_ms: u64) {
        self.shutting_down.set(true);
        let cells: Vec<Rc<ConnCell>> = self.conns.borrow().values().cloned().collect();
        for cell in cells {
            let why = "relay is shutting down";
            self.end(
                &cell,
                ErrorCode::ShuttingDown,
                why,
                CloseReason::Shutdown,
                deadline_ms,
            );
        }
    }

    /// Ends a connection: ERROR `code` after what is queued (an MQTT
    /// client: DISCONNECT, see `mqtt_end`), then close by `deadline_ms` at
    /// the latest.
    pub(super) fn end(
        &self,
        cell: &Rc<ConnCell>,
        code: ErrorCode,
        why: &str,
        reason: CloseReason,
        deadline_ms: u64,
    ) {
        if self.mqtt_end(cell, reason, deadline_ms) {
            return;
        }
        let _ = cell
            .conn
            .borrow_mut()
            .close_with(&self.cfg().conn, code, why, reason);
        cell.closing(reason, deadline_ms);
        self.wake(cell);
    }

    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.get()
    }

    /// A fresh session for a connection from `remote`.
    pub fn session(remote: SocketAddr) -> Session {
        Session::new(remote)
    }
}
