//! The per-shard router: which connections this shard owns, group
//! membership, and what happens to every event a connection produces.
//!
//! It is a plain single-threaded struct with no sockets and no executor: the
//! runtime (`rt`) feeds it events and cross-shard messages, writes what it
//! queues, and ships its outboxes over the mesh. Everything that crosses
//! shards is a [`Cross`] item, batched per destination shard.
//!
//! Ownership: an address lives on `shard_of(address) % shards`. Groups: each
//! shard indexes its own members (`group → local members`) and keeps, for
//! every group, the mask of shards that have members; a publish is sent only
//! to those shards, and each delivers locally.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use relay_core::conn::{CloseReason, ConnConfig, Connection, Event, Hello, Now, SendError};
use relay_core::frame::{ErrorCode, Flags, Frame};
use relay_core::name::name_str;
use relay_core::route::{assign_address, shard_of};

use crate::cell::{ConnCell, ConnId, Session, conn_id};
use crate::stats::{DropReason, ShardStats};

/// Most shards a relay runs (group masks are 64-bit).
pub const MAX_SHARDS: usize = 64;

/// Work one shard asks of another. Many travel in one mesh message.
#[derive(Debug)]
pub enum Cross {
    /// Deliver DATA to `frame.dst`, which the receiving shard owns.
    Deliver { frame: Frame, reply: Option<u64> },
    /// Deliver to the receiving shard's local members of group `frame.dst`.
    GroupDeliver { frame: Frame, reply: Option<u64> },
    /// The sending shard now has (or no longer has) members of `group`.
    Mask {
        group: Bytes,
        has: bool,
        reply: Option<u64>,
    },
    /// The answer to an item that carried `reply: Some(token)`.
    Reply {
        token: u64,
        delivered: u32,
        error: Option<(ErrorCode, String)>,
    },
}

/// A connection moving to the shard that owns its address, with everything
/// read and queued so far. `fd` is a duplicate the receiver takes ownership of.
#[derive(Debug)]
pub struct Handover {
    pub fd: i32,
    pub conn: Connection,
    pub hello: Hello,
    pub rbuf: BytesMut,
    /// Bytes already taken for writing but not yet written.
    pub pending_out: Bytes,
    pub session: Session,
}

/// What a connection's driver must do after an event.
#[derive(Debug)]
pub enum Outcome {
    Continue,
    /// Hand the connection to `owner` (its address hashes there).
    Handover {
        owner: usize,
        hello: Hello,
    },
}

/// Called with (recipients reached, first error) when a fan-out completes.
pub type AckCallback = Box<dyn FnOnce(u32, Option<(ErrorCode, String)>)>;

/// Who waits for the answer to a fan-out.
pub enum AckTarget {
    /// ACK or ERROR to a client frame.
    Conn { id: ConnId, seq: u32 },
    /// A caller inside the relay (the HTTP API).
    Callback(AckCallback),
}

impl std::fmt::Debug for AckTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AckTarget::Conn { id, seq } => write!(f, "Conn({id}, {seq})"),
            AckTarget::Callback(_) => write!(f, "Callback"),
        }
    }
}

#[derive(Debug)]
struct Pending {
    target: AckTarget,
    remaining: usize,
    delivered: u32,
    error: Option<(ErrorCode, String)>,
}

#[derive(Debug, Default)]
struct GroupEntry {
    /// Members owned by this shard.
    local: HashMap<ConnId, Rc<ConnCell>>,
    /// Bit i: shard i has members (this shard's bit included).
    mask: u64,
}

/// Settings the router needs, resolved from the config once.
#[derive(Debug, Clone)]
pub struct RouterConfig {
    pub conn: ConnConfig,
    pub node: String,
    pub allow_client_join: bool,
    pub max_groups_per_conn: usize,
    /// Most items waiting for one peer shard before new ones are dropped.
    pub outbox_limit: usize,
    /// How long a closing connection may take to flush.
    pub close_grace_ms: u64,
}

/// One shard's routing state.
#[derive(Debug)]
pub struct Router {
    pub shard: usize,
    pub shards: usize,
    pub cfg: RouterConfig,
    pub stats: Arc<ShardStats>,
    conns: RefCell<HashMap<ConnId, Rc<ConnCell>>>,
    by_addr: RefCell<HashMap<Bytes, Rc<ConnCell>>>,
    groups: RefCell<HashMap<Bytes, GroupEntry>>,
    outbox: RefCell<Vec<Vec<Cross>>>,
    /// Woken when an outbox gets its first item.
    flush_waker: RefCell<Option<std::task::Waker>>,
    pending: RefCell<HashMap<u64, Pending>>,
    next_token: Cell<u64>,
    next_conn: Cell<u64>,
    assign_counter: Cell<u64>,
    /// Set once shutdown began: no new hellos are accepted.
    shutting_down: Cell<bool>,
}

impl Router {
    pub fn new(shard: usize, shards: usize, cfg: RouterConfig, stats: Arc<ShardStats>) -> Router {
        Router {
            shard,
            shards,
            cfg,
            stats,
            conns: RefCell::default(),
            by_addr: RefCell::default(),
            groups: RefCell::default(),
            outbox: RefCell::new((0..shards).map(|_| Vec::new()).collect()),
            flush_waker: RefCell::new(None),
            pending: RefCell::default(),
            next_token: Cell::new(1),
            next_conn: Cell::new(1),
            assign_counter: Cell::new(0),
            shutting_down: Cell::new(false),
        }
    }

    /// Registers a freshly accepted (or handed-over) connection.
    pub fn register(&self, conn: Connection, session: Session) -> Rc<ConnCell> {
        let n = self.next_conn.get();
        self.next_conn.set(n + 1);
        let cell = Rc::new(ConnCell::new(conn_id(self.shard, n), conn, session));
        self.conns.borrow_mut().insert(cell.id, cell.clone());
        ShardStats::add(&self.stats.conns_pending, 1);
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

    /// Online addresses owned here.
    pub fn addresses(&self) -> Vec<Bytes> {
        self.by_addr.borrow().keys().cloned().collect()
    }

    /// Routes one event of `cell`.
    pub fn on_event(&self, cell: &Rc<ConnCell>, ev: Event, now: Now) -> Outcome {
        match ev {
            Event::Hello(hello) => return self.on_hello(cell, hello, now),
            Event::Data(frame) => {
                ShardStats::add(&self.stats.frames_in, 1);
                let ack = frame.flags.ack_req().then_some(frame.seq);
                self.unicast(
                    frame,
                    ack.map(|seq| AckTarget::Conn { id: cell.id, seq }),
                    now,
                );
            }
            Event::Publish(frame) => {
                ShardStats::add(&self.stats.frames_in, 1);
                let ack = frame.flags.ack_req().then_some(frame.seq);
                let group = frame.dst.clone();
                self.publish(
                    &group,
                    frame,
                    ack.map(|seq| AckTarget::Conn { id: cell.id, seq }),
                    now,
                );
            }
            Event::Join {
                group,
                seq,
                ack_req,
            } => {
                ShardStats::add(&self.stats.frames_in, 1);
                if !self.cfg.allow_client_join {
                    self.reply_conn(
                        cell,
                        seq,
                        ack_req,
                        Err((ErrorCode::Forbidden, "clients may not join groups".into())),
                    );
                } else {
                    let target = ack_req.then_some(AckTarget::Conn { id: cell.id, seq });
                    if let Err(e) = self.join(cell, group, target) {
                        self.reply_conn(cell, seq, ack_req, Err(e));
                    }
                }
            }
            Event::Leave {
                group,
                seq,
                ack_req,
            } => {
                ShardStats::add(&self.stats.frames_in, 1);
                self.leave(cell, &group);
                self.reply_conn(cell, seq, ack_req, Ok(1));
            }
            Event::Closed(reason) => cell.closing(reason, now.mono_ms + self.cfg.close_grace_ms),
        }
        Outcome::Continue
    }

    fn on_hello(&self, cell: &Rc<ConnCell>, hello: Hello, now: Now) -> Outcome {
        if self.shutting_down.get() {
            let ev = cell.conn.borrow_mut().refuse(
                &self.cfg.conn,
                hello.seq,
                ErrorCode::ShuttingDown,
                "relay is shutting down",
                true,
            );
            if let Some(Event::Closed(r)) = ev {
                cell.closing(r, now.mono_ms + self.cfg.close_grace_ms);
            }
            return Outcome::Continue;
        }
        if hello.addr.is_empty() {
            let mut counter = self.assign_counter.get();
            let prefix = format!("{}-", self.cfg.node);
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
        let old = self.by_addr.borrow_mut().insert(addr.clone(), cell.clone());
        if let Some(old) = old
            && old.id != cell.id
        {
            let ev = old.conn.borrow_mut().close_with(
                &self.cfg.conn,
                ErrorCode::Replaced,
                "address taken over by a new connection",
                CloseReason::Replaced,
            );
            if ev.is_some() {
                old.closing(CloseReason::Replaced, now.mono_ms + self.cfg.close_grace_ms);
            }
            self.drop_memberships(&old);
            old.wake();
        }
        cell.conn
            .borrow_mut()
            .accept(&self.cfg.conn, now, hello, addr, &self.cfg.node);
        {
            let mut s = cell.session.borrow_mut();
            s.meta = hello.meta.clone();
            s.connected_at_ms = now.wall_ms;
        }
        self.stats
            .conns_pending
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        ShardStats::add(
            &self.stats.conns_by_role[ShardStats::role_index(hello.role)],
            1,
        );
    }

    /// Removes a connection that is handed to another shard.
    pub fn forget(&self, cell: &Rc<ConnCell>) {
        self.conns.borrow_mut().remove(&cell.id);
        self.stats
            .conns_pending
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// Cleans up after a connection's driver ended.
    pub fn on_closed(&self, cell: &Rc<ConnCell>) {
        if self.conns.borrow_mut().remove(&cell.id).is_none() {
            return;
        }
        ShardStats::add(&self.stats.closed_total, 1);
        let conn = cell.conn.borrow();
        if conn.addr().is_empty() {
            self.stats
                .conns_pending
                .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
            return;
        }
        self.stats.conns_by_role[ShardStats::role_index(conn.role())]
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        let addr = conn.addr().clone();
        drop(conn);
        let mut by_addr = self.by_addr.borrow_mut();
        if by_addr.get(&addr).is_some_and(|c| c.id == cell.id) {
            by_addr.remove(&addr);
        }
        drop(by_addr);
        self.drop_memberships(cell);
    }

    fn drop_memberships(&self, cell: &Rc<ConnCell>) {
        let groups = std::mem::take(&mut cell.session.borrow_mut().groups);
        for g in groups {
            self.leave_inner(cell, &g);
        }
    }

    /// Queues `frame` for one recipient on this shard.
    fn deliver_local(
        &self,
        cell: &ConnCell,
        frame: &Frame,
        now: Now,
    ) -> Result<(), (ErrorCode, String)> {
        let r = cell.conn.borrow_mut().send(&self.cfg.conn, now, frame);
        match r {
            Ok(()) => {
                ShardStats::add(&self.stats.frames_out, 1);
                cell.wake();
                Ok(())
            }
            Err(SendError::Full) => {
                self.stats.dropped(DropReason::SlowConsumer);
                Err((
                    ErrorCode::SlowConsumer,
                    format!("{} is not reading; frame dropped", name_str(&frame.dst)),
                ))
            }
            Err(SendError::Closed) => {
                self.stats.dropped(DropReason::NoRoute);
                Err((
                    ErrorCode::NoRoute,
                    format!("{} is offline", name_str(&frame.dst)),
                ))
            }
        }
    }

    /// DATA to one address, wherever it lives.
    pub fn unicast(&self, frame: Frame, ack: Option<AckTarget>, now: Now) {
        let owner = shard_of(&frame.dst, self.shards);
        if owner == self.shard {
            let result = match self.lookup(&frame.dst) {
                Some(dst) => self.deliver_local(&dst, &frame, now).map(|()| 1),
                None => {
                    self.stats.dropped(DropReason::NoRoute);
                    Err((
                        ErrorCode::NoRoute,
                        format!("{} is offline", name_str(&frame.dst)),
                    ))
                }
            };
            if let Some(t) = ack {
                self.resolve(t, result);
            }
        } else {
            let reply = ack.map(|t| self.pending_for(t, 1));
            ShardStats::add(&self.stats.cross_frames, 1);
            self.push(owner, Cross::Deliver { frame, reply });
        }
    }

    /// PUBLISH to every member of `group` on every shard that has one.
    pub fn publish(&self, group: &Bytes, mut frame: Frame, ack: Option<AckTarget>, now: Now) {
        frame.dst = group.clone();
        frame.flags = frame.flags.with(Flags::GROUP, true);
        frame.kind = relay_core::FrameType::Data;
        let mask = self.groups.borrow().get(group).map(|g| g.mask).unwrap_or(0);
        let mut delivered = 0;
        let mut error = None;
        if mask & (1 << self.shard) != 0 {
            let (n, e) = self.deliver_group_local(group, &frame, now);
            delivered += n;
            error = error.or(e);
        }
        let remote: Vec<usize> = (0..self.shards)
            .filter(|&s| s != self.shard && mask & (1 << s) != 0)
            .collect();
        match ack {
            Some(t) if !remote.is_empty() => {
                let token = self.pending_for(t, remote.len());
                if let Some(p) = self.pending.borrow_mut().get_mut(&token) {
                    p.delivered = delivered;
                    p.error = error;
                }
                for s in remote {
                    ShardStats::add(&self.stats.cross_frames, 1);
                    self.push(
                        s,
                        Cross::GroupDeliver {
                            frame: frame.clone(),
                            reply: Some(token),
                        },
                    );
                }
            }
            ack => {
                for s in remote {
                    ShardStats::add(&self.stats.cross_frames, 1);
                    self.push(
                        s,
                        Cross::GroupDeliver {
                            frame: frame.clone(),
                            reply: None,
                        },
                    );
                }
                if let Some(t) = ack {
                    self.finish(t, delivered, error);
                }
            }
        }
    }

    fn deliver_group_local(
        &self,
        group: &Bytes,
        frame: &Frame,
        now: Now,
    ) -> (u32, Option<(ErrorCode, String)>) {
        let members: Vec<Rc<ConnCell>> = self
            .groups
            .borrow()
            .get(group)
            .map(|g| g.local.values().cloned().collect())
            .unwrap_or_default();
        let mut n = 0;
        let mut err = None;
        for m in members {
            match self.deliver_local(&m, frame, now) {
                Ok(()) => n += 1,
                Err(e) => err = err.or(Some(e)),
            }
        }
        (n, err)
    }

    /// Adds `cell` to `group`. When this shard gains its first member, every
    /// other shard is told, and the ACK waits until they all know.
    pub fn join(
        &self,
        cell: &Rc<ConnCell>,
        group: Bytes,
        ack: Option<AckTarget>,
    ) -> Result<(), (ErrorCode, String)> {
        {
            let mut s = cell.session.borrow_mut();
            if !s.groups.contains(&group) {
                if s.groups.len() >= self.cfg.max_groups_per_conn {
                    return Err((
                        ErrorCode::Forbidden,
                        format!(
                            "at most {} groups per connection",
                            self.cfg.max_groups_per_conn
                        ),
                    ));
                }
                s.groups.push(group.clone());
            }
        }
        let newly_here = {
            let mut groups = self.groups.borrow_mut();
            let e = groups.entry(group.clone()).or_default();
            e.local.insert(cell.id, cell.clone());
            let was = e.mask & (1 << self.shard) != 0;
            e.mask |= 1 << self.shard;
            !was
        };
        let peers: Vec<usize> = (0..self.shards).filter(|&s| s != self.shard).collect();
        if newly_here && !peers.is_empty() {
            let token = ack.map(|t| self.pending_for(t, peers.len()));
            for p in peers {
                self.push(
                    p,
                    Cross::Mask {
                        group: group.clone(),
                        has: true,
                        reply: token,
                    },
                );
            }
        } else if let Some(t) = ack {
            self.finish(t, 1, None);
        }
        Ok(())
    }

    /// Removes `cell` from `group`.
    pub fn leave(&self, cell: &Rc<ConnCell>, group: &Bytes) {
        cell.session.borrow_mut().groups.retain(|g| g != group);
        self.leave_inner(cell, group);
    }

    fn leave_inner(&self, cell: &Rc<ConnCell>, group: &Bytes) {
        let now_empty = {
            let mut groups = self.groups.borrow_mut();
            let Some(e) = groups.get_mut(group) else {
                return;
            };
            if e.local.remove(&cell.id).is_none() || !e.local.is_empty() {
                return;
            }
            e.mask &= !(1 << self.shard);
            if e.mask == 0 {
                groups.remove(group);
            }
            true
        };
        if now_empty {
            for p in (0..self.shards).filter(|&s| s != self.shard) {
                self.push(
                    p,
                    Cross::Mask {
                        group: group.clone(),
                        has: false,
                        reply: None,
                    },
                );
            }
        }
    }

    /// Local members of `group` on this shard.
    pub fn group_members(&self, group: &[u8]) -> Vec<Bytes> {
        self.groups
            .borrow()
            .get(group)
            .map(|g| {
                g.local
                    .values()
                    .map(|c| c.conn.borrow().addr().clone())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Applies a batch from shard `from`.
    pub fn on_cross(&self, from: usize, items: Vec<Cross>, now: Now) {
        for item in items {
            match item {
                Cross::Deliver { frame, reply } => {
                    let result = match self.lookup(&frame.dst) {
                        Some(dst) => self.deliver_local(&dst, &frame, now).map(|()| 1),
                        None => {
                            self.stats.dropped(DropReason::NoRoute);
                            Err((
                                ErrorCode::NoRoute,
                                format!("{} is offline", name_str(&frame.dst)),
                            ))
                        }
                    };
                    if let Some(token) = reply {
                        let (delivered, error) = match result {
                            Ok(n) => (n, None),
                            Err(e) => (0, Some(e)),
                        };
                        self.push(
                            from,
                            Cross::Reply {
                                token,
                                delivered,
                                error,
                            },
                        );
                    }
                }
                Cross::GroupDeliver { frame, reply } => {
                    let group = frame.dst.clone();
                    let (delivered, error) = self.deliver_group_local(&group, &frame, now);
                    if let Some(token) = reply {
                        self.push(
                            from,
                            Cross::Reply {
                                token,
                                delivered,
                                error,
                            },
                        );
                    }
                }
                Cross::Mask { group, has, reply } => {
                    {
                        let mut groups = self.groups.borrow_mut();
                        if has {
                            groups.entry(group).or_default().mask |= 1 << from;
                        } else if let Some(e) = groups.get_mut(&group) {
                            e.mask &= !(1 << from);
                            if e.mask == 0 {
                                groups.remove(&group);
                            }
                        }
                    }
                    if let Some(token) = reply {
                        self.push(
                            from,
                            Cross::Reply {
                                token,
                                delivered: 1,
                                error: None,
                            },
                        );
                    }
                }
                Cross::Reply {
                    token,
                    delivered,
                    error,
                } => {
                    let done = {
                        let mut pending = self.pending.borrow_mut();
                        let Some(p) = pending.get_mut(&token) else {
                            continue;
                        };
                        p.delivered += delivered;
                        if p.error.is_none() {
                            p.error = error;
                        }
                        p.remaining -= 1;
                        if p.remaining == 0 {
                            pending.remove(&token)
                        } else {
                            None
                        }
                    };
                    if let Some(p) = done {
                        self.finish(p.target, p.delivered, p.error);
                    }
                }
            }
        }
    }

    fn pending_for(&self, target: AckTarget, remaining: usize) -> u64 {
        let token = self.next_token.get();
        self.next_token.set(token + 1);
        self.pending.borrow_mut().insert(
            token,
            Pending {
                target,
                remaining,
                delivered: 0,
                error: None,
            },
        );
        token
    }

    fn resolve(&self, target: AckTarget, result: Result<u32, (ErrorCode, String)>) {
        match result {
            Ok(n) => self.finish(target, n, None),
            Err(e) => self.finish(target, 0, Some(e)),
        }
    }

    /// Answers a fan-out. A unicast that failed reports its error; a group
    /// publish is accepted once every shard queued it for its members, and
    /// reports an error only when it reached nobody because of one.
    fn finish(&self, target: AckTarget, delivered: u32, error: Option<(ErrorCode, String)>) {
        match target {
            AckTarget::Conn { id, seq } => {
                let Some(cell) = self.conns.borrow().get(&id).cloned() else {
                    return;
                };
                let frame = match error {
                    Some((code, msg)) if delivered == 0 => Frame::error(seq, code, &msg),
                    _ => Frame::ack(seq),
                };
                cell.conn.borrow_mut().control(&self.cfg.conn, &frame);
                cell.wake();
            }
            AckTarget::Callback(f) => f(delivered, error),
        }
    }

    fn reply_conn(
        &self,
        cell: &ConnCell,
        seq: u32,
        ack_req: bool,
        result: Result<u32, (ErrorCode, String)>,
    ) {
        let frame = match result {
            Ok(_) if ack_req => Frame::ack(seq),
            Ok(_) => return,
            Err((code, msg)) => Frame::error(seq, code, &msg),
        };
        cell.conn.borrow_mut().control(&self.cfg.conn, &frame);
        cell.wake();
    }

    fn push(&self, peer: usize, item: Cross) {
        let mut outbox = self.outbox.borrow_mut();
        let q = &mut outbox[peer];
        if q.len() >= self.cfg.outbox_limit {
            // The peer shard is not keeping up: refuse rather than grow.
            drop(outbox);
            self.stats.dropped(DropReason::MeshFull);
            match item {
                Cross::Deliver { reply: Some(t), .. }
                | Cross::GroupDeliver { reply: Some(t), .. } => {
                    self.on_cross(
                        peer,
                        vec![Cross::Reply {
                            token: t,
                            delivered: 0,
                            error: Some((
                                ErrorCode::Internal,
                                "shard mesh is full; frame dropped".into(),
                            )),
                        }],
                        Now {
                            mono_ms: 0,
                            wall_ms: 0,
                        },
                    );
                }
                _ => {}
            }
            return;
        }
        let was_empty = q.is_empty();
        q.push(item);
        drop(outbox);
        if was_empty && let Some(w) = self.flush_waker.borrow().as_ref() {
            w.wake_by_ref();
        }
    }

    /// Takes the waiting items for every peer (index = shard).
    pub fn take_outbox(&self, waker: &std::task::Waker) -> Vec<(usize, Vec<Cross>)> {
        {
            let mut w = self.flush_waker.borrow_mut();
            if !w.as_ref().is_some_and(|w| w.will_wake(waker)) {
                *w = Some(waker.clone());
            }
        }
        let mut outbox = self.outbox.borrow_mut();
        outbox
            .iter_mut()
            .enumerate()
            .filter(|(_, q)| !q.is_empty())
            .map(|(i, q)| (i, std::mem::take(q)))
            .collect()
    }

    /// Applies deadlines that have passed and samples the queued bytes.
    pub fn sweep(&self, now: Now) {
        let cells: Vec<Rc<ConnCell>> = self.conns.borrow().values().cloned().collect();
        let mut queued = 0u64;
        for cell in cells {
            let ev = {
                let mut c = cell.conn.borrow_mut();
                queued += c.queued_bytes() as u64;
                match c.poll_timeout(&self.cfg.conn) {
                    Some(t) if t <= now.mono_ms => c.handle_timeout(&self.cfg.conn, now),
                    _ => None,
                }
            };
            if let Some(Event::Closed(reason)) = ev {
                cell.closing(reason, now.mono_ms + self.cfg.close_grace_ms);
                cell.wake();
            } else if cell.close_deadline.get().is_some_and(|d| d <= now.mono_ms) {
                cell.wake();
            }
        }
        self.stats
            .queue_bytes
            .store(queued, std::sync::atomic::Ordering::Relaxed);
    }

    /// Begins a graceful shutdown: every client gets ERROR `shutting_down`
    /// after what is already queued, and is closed once flushed or at `deadline`.
    pub fn shutdown(&self, now: Now, deadline_ms: u64) {
        self.shutting_down.set(true);
        let cells: Vec<Rc<ConnCell>> = self.conns.borrow().values().cloned().collect();
        for cell in cells {
            let ev = cell.conn.borrow_mut().close_with(
                &self.cfg.conn,
                ErrorCode::ShuttingDown,
                "relay is shutting down",
                CloseReason::Shutdown,
            );
            if ev.is_some() || cell.reason.get().is_none() {
                cell.closing(CloseReason::Shutdown, deadline_ms);
            }
            cell.close_deadline.set(Some(
                cell.close_deadline
                    .get()
                    .map_or(deadline_ms, |d| d.min(deadline_ms)),
            ));
            cell.wake();
        }
        let _ = now;
    }

    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.get()
    }

    /// A placeholder session for a connection whose peer address is known.
    pub fn session(remote: SocketAddr) -> Session {
        Session {
            remote,
            connected_at_ms: 0,
            meta: Bytes::from_static(b"{}"),
            groups: Vec::new(),
        }
    }
}
