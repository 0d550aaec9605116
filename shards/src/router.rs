//! The per-shard router: which connections this shard owns, group and uid
//! indexes, and what happens to every event a connection produces.
//!
//! It is a plain single-threaded struct with no sockets and no executor: the
//! runtime (`rt`) feeds it events and cross-shard messages, writes what it
//! queues, and ships its outboxes over the mesh. Everything that crosses
//! shards is a [`Cross`] item, batched per destination shard.
//!
//! Ownership: an address lives on `shard_of(address) % shards`. Groups and
//! uids are both an [`Index`]: each shard holds its own members
//! (`name → local connections`) and, for every name, the mask of shards that
//! have members; a publish or uid send goes only to those shards, and each
//! delivers locally, so every member is reached once.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::SocketAddr;
use std::ops::Bound;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use bytes::{Bytes, BytesMut};
use relay_core::conn::{CloseReason, ConnConfig, Connection, Event, Hello, Now, Role, SendError};
use relay_core::frame::{ErrorCode, Flags, Frame, FrameType};
use relay_core::name::name_str;
use relay_core::route::{assign_address, shard_of};

use crate::cell::{ConnCell, ConnId, Membership, Session, conn_id};
use crate::stats::{DropReason, ShardStats};
use crate::ws::WsDecoder;

/// Most shards a relay runs (index masks are 64-bit).
pub const MAX_SHARDS: usize = 64;

/// Prefix of the tap groups: members of `watch:<addr>` receive a copy of
/// every DATA and PUBLISH that `<addr>` sends (the console's live view).
pub const WATCH_PREFIX: &[u8] = b"watch:";

/// Which index a name belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Index {
    Group = 0,
    Uid = 1,
}

impl Index {
    /// The session list this index mirrors.
    pub fn membership(self) -> Membership {
        match self {
            Index::Group => Membership::Group,
            Index::Uid => Membership::Uid,
        }
    }
}

/// A failure reported to whoever asked (ERROR frame or HTTP status).
pub type Failure = (ErrorCode, String);

/// Work one shard asks of another. Many travel in one mesh message.
#[derive(Debug)]
pub enum Cross {
    /// Deliver DATA to `frame.dst`, which the receiving shard owns.
    Deliver {
        frame: Frame,
        reply: Option<u64>,
    },
    /// Deliver to the receiving shard's local members of `name`.
    Fanout {
        index: Index,
        name: Bytes,
        frame: Frame,
        exclude: Vec<Bytes>,
        reply: Option<u64>,
    },
    /// The sending shard now has (or no longer has) members of `name`.
    Mask {
        index: Index,
        name: Bytes,
        has: bool,
        reply: Option<u64>,
    },
    /// The answer to an item that carried `reply: Some(token)`.
    Reply {
        token: u64,
        delivered: u32,
        error: Option<Failure>,
    },
    /// An API operation to run on the receiving shard.
    Call {
        call: Call,
        reply: u64,
    },
    CallDone {
        token: u64,
        result: CallResult,
    },
}

/// API operations that run on a given shard.
#[derive(Debug, Clone)]
pub enum Call {
    /// Session of an address this shard owns.
    Client(Bytes),
    /// This shard's online addresses after `after`, filtered, sorted, at most `limit`.
    List {
        role: Option<Role>,
        prefix: String,
        after: Option<Bytes>,
        limit: usize,
    },
    /// Add `addr` (owned here) to `name`.
    Bind {
        index: Index,
        name: Bytes,
        addr: Bytes,
    },
    /// Remove `addr` (owned here) from `name`.
    Unbind {
        index: Index,
        name: Bytes,
        addr: Bytes,
    },
    /// Remove every local member of a group.
    Dissolve(Bytes),
    /// Disconnect `addr` (owned here) with ERROR `forbidden`.
    Kick(Bytes),
    /// This shard's members of `name` after `after`, sorted, at most `limit`.
    Members {
        index: Index,
        name: Bytes,
        after: Option<Bytes>,
        limit: usize,
    },
    /// Deliver to every local client (of `role`).
    Broadcast { frame: Frame, role: Option<Role> },
}

/// What a [`Call`] answers.
#[derive(Debug, Clone)]
pub enum CallResult {
    Client(Option<ClientView>),
    List(Vec<ClientView>),
    Members(Vec<Bytes>),
    Done(Result<u32, Failure>),
}

/// What the API shows of a session.
#[derive(Debug, Clone, PartialEq)]
pub struct ClientView {
    pub addr: Bytes,
    pub role: Role,
    pub shard: usize,
    pub connected_at_ms: u64,
    pub remote: SocketAddr,
    pub uids: Vec<Bytes>,
    pub groups: Vec<Bytes>,
    pub meta: Bytes,
}

/// A connection moving to the shard that owns its address, with everything
/// read and queued so far; the receiving shard takes over the socket `fd`.
#[derive(Debug)]
pub struct Handover {
    pub fd: std::os::fd::OwnedFd,
    pub conn: Connection,
    pub hello: Hello,
    pub rbuf: BytesMut,
    /// Bytes already taken for writing but not yet written.
    pub pending_out: Bytes,
    pub session: Session,
    /// WebSocket frame state, for browser connections.
    pub ws: Option<WsDecoder>,
}

/// What the I/O loop must do with a connection after an event.
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
pub type AckCallback = Box<dyn FnOnce(u32, Option<Failure>)>;
/// Called with the result of a [`Call`].
pub type CallCallback = Box<dyn FnOnce(CallResult)>;

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
    error: Option<Failure>,
}

#[derive(Debug, Default)]
struct Entry {
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
pub struct Router {
    pub shard: usize,
    pub shards: usize,
    pub cfg: RouterConfig,
    pub stats: Arc<ShardStats>,
    conns: RefCell<HashMap<ConnId, Rc<ConnCell>>>,
    by_addr: RefCell<HashMap<Bytes, Rc<ConnCell>>>,
    /// The owned addresses in order, for paged listings.
    sorted: RefCell<BTreeSet<Bytes>>,
    indexes: [RefCell<HashMap<Bytes, Entry>>; 2],
    /// Addresses with a `watch:` group somewhere.
    watched: RefCell<HashSet<Bytes>>,
    outbox: RefCell<Vec<Vec<Cross>>>,
    /// Woken when an outbox gets its first item.
    flush_waker: RefCell<Option<std::task::Waker>>,
    /// Connections with output queued or a close to carry out, in the order
    /// they became so; the I/O loop writes each once per pass.
    dirty: RefCell<Vec<ConnId>>,
    /// The I/O loop, woken when `dirty` gets its first entry.
    io_waker: RefCell<Option<std::task::Waker>>,
    pending: RefCell<HashMap<u64, Pending>>,
    calls: RefCell<HashMap<u64, CallCallback>>,
    /// Results of calls from other shards, sent back after the current batch
    /// (a bind completes only when every shard has learnt the new mask).
    completed: Rc<RefCell<Vec<(usize, u64, CallResult)>>>,
    next_token: Cell<u64>,
    next_conn: Cell<u64>,
    assign_counter: Cell<u64>,
    /// Set once shutdown began: no new hellos are accepted.
    shutting_down: Cell<bool>,
    /// Receives connect/disconnect/message events (the rules engine).
    pub hooks: RefCell<Option<Box<dyn Hooks>>>,
}

impl std::fmt::Debug for Router {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Router")
            .field("shard", &self.shard)
            .field("shards", &self.shards)
            .finish()
    }
}

/// Observer of session and message events (never blocks, never fails).
pub trait Hooks {
    fn connected(&self, cell: &ConnCell, shard: usize, now: Now);
    fn disconnected(&self, cell: &ConnCell, shard: usize, reason: CloseReason, now: Now);
    /// A DATA or PUBLISH accepted from `frame.src` (after it was forwarded).
    fn message(&self, frame: &Frame, group: bool, now: Now);
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
            sorted: RefCell::default(),
            indexes: [RefCell::default(), RefCell::default()],
            watched: RefCell::default(),
            outbox: RefCell::new((0..shards).map(|_| Vec::new()).collect()),
            flush_waker: RefCell::new(None),
            dirty: RefCell::default(),
            io_waker: RefCell::new(None),
            pending: RefCell::default(),
            calls: RefCell::default(),
            completed: Rc::default(),
            next_token: Cell::new(1),
            next_conn: Cell::new(1),
            assign_counter: Cell::new(0),
            shutting_down: Cell::new(false),
            hooks: RefCell::new(None),
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

    /// Routes one event of `cell`.
    pub fn on_event(&self, cell: &Rc<ConnCell>, ev: Event, now: Now) -> Outcome {
        match ev {
            Event::Hello(hello) => return self.on_hello(cell, hello, now),
            Event::Data(frame) => self.route_client_frame(cell, frame, false, now),
            Event::Publish(frame) => self.route_client_frame(cell, frame, true, now),
            Event::Join {
                group,
                seq,
                ack_req,
            } => {
                ShardStats::add(&self.stats.frames_in, 1);
                if let Err(why) = self.may_join(cell, &group) {
                    self.stats.dropped(DropReason::Forbidden);
                    self.reply_conn(cell, seq, ack_req, Err((ErrorCode::Forbidden, why)));
                } else {
                    let target = ack_req.then_some(AckTarget::Conn { id: cell.id, seq });
                    // With ACK_REQ the error is answered through the target.
                    if let Err(e) = self.add_member(Index::Group, cell, group, target)
                        && !ack_req
                    {
                        self.reply_conn(cell, seq, false, Err(e));
                    }
                }
            }
            Event::Leave {
                group,
                seq,
                ack_req,
            } => {
                ShardStats::add(&self.stats.frames_in, 1);
                self.remove_member(Index::Group, cell, &group);
                self.reply_conn(cell, seq, ack_req, Ok(1));
            }
            Event::Closed(reason) => cell.closing(reason, now.mono_ms + self.cfg.close_grace_ms),
        }
        Outcome::Continue
    }

    /// Whether a client may JOIN `group` itself. A `watch:<addr>` group
    /// copies what `<addr>` sends, so only the device itself and privileged
    /// connections (the service token, see `Hello::privileged`) may join
    /// it, whatever `allow_client_join` says; the backend lets a browser
    /// watch by binding it through the API.
    fn may_join(&self, cell: &ConnCell, group: &[u8]) -> Result<(), String> {
        if let Some(target) = group.strip_prefix(WATCH_PREFIX) {
            let conn = cell.conn.borrow();
            if conn.is_privileged() || conn.addr().as_ref() == target {
                return Ok(());
            }
            return Err(format!(
                "watching {} needs the service token",
                name_str(target)
            ));
        }
        if self.cfg.allow_client_join {
            Ok(())
        } else {
            Err("clients may not join groups".into())
        }
    }

    /// Routes a client's DATA (to `dst`) or PUBLISH (to group `dst`).
    fn route_client_frame(&self, cell: &Rc<ConnCell>, mut frame: Frame, group: bool, now: Now) {
        ShardStats::add(&self.stats.frames_in, 1);
        if group && frame.dst.starts_with(WATCH_PREFIX) {
            // Only the relay writes to a watch group (its tap).
            self.stats.dropped(DropReason::Forbidden);
            let why = "watch groups carry what the relay taps; clients may not publish to them";
            self.reply_conn(
                cell,
                frame.seq,
                frame.flags.ack_req(),
                Err((ErrorCode::Forbidden, why.into())),
            );
            return;
        }
        // ACK_REQ comes off once, here: an ACK is the relay's answer to the
        // sender and never forwarded, so no recipient copies the frame for it.
        let target = frame.flags.ack_req().then_some(AckTarget::Conn {
            id: cell.id,
            seq: frame.seq,
        });
        frame.flags = frame.flags.with(Flags::ACK_REQ, false);
        self.tap(&frame, now);
        if !group && frame.dst[..] == *relay_core::name::RULES_DST {
            // Meant for the rules only: no client gets it, nothing echoes back.
            if self.hooks.borrow().is_none() {
                self.stats.dropped(DropReason::NoRoute);
                let why = "no rules run on this relay ([plugins] enabled = false)";
                self.reply_conn(
                    cell,
                    frame.seq,
                    target.is_some(),
                    Err((ErrorCode::NoRoute, why.into())),
                );
                return;
            }
            self.reply_conn(cell, frame.seq, target.is_some(), Ok(1));
            self.hook_message(&frame, false, now);
            return;
        }
        // The rules engine sees the frame as the client sent it; the copy
        // (three reference counts) is made only when it listens.
        let hooked = self.hooks.borrow().is_some().then(|| frame.clone());
        if group {
            let name = frame.dst.clone();
            self.fanout(Index::Group, &name, frame, Vec::new(), target, now);
        } else {
            self.unicast(frame, target, now);
        }
        if let Some(f) = hooked {
            self.hook_message(&f, group, now);
        }
    }

    fn hook_message(&self, frame: &Frame, group: bool, now: Now) {
        if let Some(h) = self.hooks.borrow().as_ref() {
            h.message(frame, group, now);
        }
    }

    /// Copies a frame sent by a watched address to its `watch:` group.
    fn tap(&self, frame: &Frame, now: Now) {
        if self.watched.borrow().is_empty() || !self.watched.borrow().contains(&frame.src) {
            return;
        }
        let mut name = BytesMut::with_capacity(WATCH_PREFIX.len() + frame.src.len());
        name.extend_from_slice(WATCH_PREFIX);
        name.extend_from_slice(&frame.src);
        let name = name.freeze();
        if name.len() > relay_core::name::MAX_NAME_LEN {
            return;
        }
        let mut copy = frame.clone();
        copy.flags = copy.flags.with(Flags::ACK_REQ, false);
        self.fanout(Index::Group, &name, copy, Vec::new(), None, now);
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
        // Its own allocation: a slice of the read buffer would keep that
        // whole chunk alive for as long as the client is online.
        let addr = Bytes::copy_from_slice(&addr);
        let old = self.by_addr.borrow_mut().insert(addr.clone(), cell.clone());
        self.sorted.borrow_mut().insert(addr.clone());
        if let Some(old) = old
            && old.id != cell.id
        {
            let why = "address taken over by a new connection";
            self.end(
                &old,
                ErrorCode::Replaced,
                why,
                CloseReason::Replaced,
                now.mono_ms + self.cfg.close_grace_ms,
            );
            self.drop_memberships(&old);
        }
        cell.conn
            .borrow_mut()
            .accept(&self.cfg.conn, now, hello, addr, &self.cfg.node);
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
        if let Some(h) = self.hooks.borrow().as_ref() {
            h.connected(cell, self.shard, now);
        }
    }

    /// Removes a connection that is handed to another shard.
    pub fn forget(&self, cell: &Rc<ConnCell>) {
        self.conns.borrow_mut().remove(&cell.id);
        self.stats.conns_pending.fetch_sub(1, Relaxed);
    }

    /// Cleans up after a connection's socket closed.
    pub fn on_closed(&self, cell: &Rc<ConnCell>, now: Now) {
        if self.conns.borrow_mut().remove(&cell.id).is_none() {
            return;
        }
        ShardStats::add(&self.stats.closed_total, 1);
        let conn = cell.conn.borrow();
        if conn.addr().is_empty() {
            self.stats.conns_pending.fetch_sub(1, Relaxed);
            return;
        }
        self.stats.conns_by_role[ShardStats::role_index(conn.role())].fetch_sub(1, Relaxed);
        let addr = conn.addr().clone();
        drop(conn);
        let mut by_addr = self.by_addr.borrow_mut();
        if by_addr.get(&addr).is_some_and(|c| c.id == cell.id) {
            by_addr.remove(&addr);
            self.sorted.borrow_mut().remove(&addr);
        }
        drop(by_addr);
        self.drop_memberships(cell);
        if let Some(h) = self.hooks.borrow().as_ref() {
            h.disconnected(
                cell,
                self.shard,
                cell.reason.get().unwrap_or(CloseReason::PeerClosed),
                now,
            );
        }
    }

    fn drop_memberships(&self, cell: &Rc<ConnCell>) {
        let (groups, uids) = { cell.session.borrow_mut().take_lists() };
        for g in groups {
            self.leave_index(Index::Group, cell, &g);
        }
        for u in uids {
            self.leave_index(Index::Uid, cell, &u);
        }
    }

    /// Queues `frame` for one recipient on this shard.
    fn deliver_local(&self, cell: &ConnCell, frame: &Frame, now: Now) -> Result<(), Failure> {
        let r = cell.conn.borrow_mut().send(&self.cfg.conn, now, frame);
        match r {
            Ok(()) => {
                ShardStats::add(&self.stats.frames_out, 1);
                self.wake(cell);
                Ok(())
            }
            Err(SendError::Full) => {
                self.stats.dropped(DropReason::SlowConsumer);
                let who = cell.conn.borrow().addr().clone();
                Err((
                    ErrorCode::SlowConsumer,
                    format!("{} is not reading; frame dropped", name_str(&who)),
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

    fn deliver_owned(&self, frame: &Frame, now: Now) -> Result<u32, Failure> {
        match self.lookup(&frame.dst) {
            Some(dst) => self.deliver_local(&dst, frame, now).map(|()| 1),
            None => {
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
            let result = self.deliver_owned(&frame, now);
            if let Some(t) = ack {
                self.resolve(t, result);
            }
        } else {
            let reply = ack.map(|t| self.pending_for(t, 1));
            ShardStats::add(&self.stats.cross_frames, 1);
            self.push(owner, Cross::Deliver { frame, reply });
        }
    }

    /// To every member of group or uid `name`, on every shard that has one.
    /// Group deliveries are DATA with flag GROUP and dst = the group; uid
    /// deliveries are DATA with dst = the uid.
    pub fn fanout(
        &self,
        index: Index,
        name: &Bytes,
        mut frame: Frame,
        exclude: Vec<Bytes>,
        ack: Option<AckTarget>,
        now: Now,
    ) {
        frame.dst = name.clone();
        frame.flags = frame.flags.with(Flags::GROUP, index == Index::Group);
        frame.kind = FrameType::Data;
        let mask = self.indexes[index as usize]
            .borrow()
            .get(name)
            .map(|g| g.mask)
            .unwrap_or(0);
        let (mut delivered, mut error) = (0, None);
        if mask & (1 << self.shard) != 0 {
            (delivered, error) = self.deliver_index_local(index, name, &frame, &exclude, now);
        }
        let remote: Vec<usize> = (0..self.shards)
            .filter(|&s| s != self.shard && mask & (1 << s) != 0)
            .collect();
        let token = match ack {
            Some(t) if !remote.is_empty() => {
                let token = self.pending_for(t, remote.len());
                if let Some(p) = self.pending.borrow_mut().get_mut(&token) {
                    p.delivered = delivered;
                    p.error = error.clone();
                }
                Some(token)
            }
            Some(t) => {
                self.finish(t, delivered, error);
                None
            }
            None => None,
        };
        for s in remote {
            ShardStats::add(&self.stats.cross_frames, 1);
            self.push(
                s,
                Cross::Fanout {
                    index,
                    name: name.clone(),
                    frame: frame.clone(),
                    exclude: exclude.clone(),
                    reply: token,
                },
            );
        }
    }

    fn deliver_index_local(
        &self,
        index: Index,
        name: &Bytes,
        frame: &Frame,
        exclude: &[Bytes],
        now: Now,
    ) -> (u32, Option<Failure>) {
        // Delivering touches only the members' own cells, never the index,
        // so the members are walked in place: no list per publish.
        let idx = self.indexes[index as usize].borrow();
        let Some(entry) = idx.get(name) else {
            return (0, None);
        };
        let mut n = 0;
        let mut err = None;
        for m in entry.local.values() {
            if !exclude.is_empty() && exclude.iter().any(|x| x == m.conn.borrow().addr()) {
                continue;
            }
            match self.deliver_local(m, frame, now) {
                Ok(()) => n += 1,
                Err(e) => err = err.or(Some(e)),
            }
        }
        (n, err)
    }

    /// Adds `cell` to `name`. When this shard gains its first member, every
    /// other shard is told, and the ACK waits until they all know, so a
    /// publish right after the ACK reaches the new member from any shard.
    pub fn add_member(
        &self,
        index: Index,
        cell: &Rc<ConnCell>,
        name: Bytes,
        ack: Option<AckTarget>,
    ) -> Result<(), Failure> {
        {
            let mut s = cell.session.borrow_mut();
            let list = s.list_mut(index.membership());
            if !list.contains(&name) {
                if index == Index::Group && list.len() >= self.cfg.max_groups_per_conn {
                    let e = (
                        ErrorCode::Forbidden,
                        format!(
                            "at most {} groups per connection",
                            self.cfg.max_groups_per_conn
                        ),
                    );
                    drop(s);
                    if let Some(t) = ack {
                        self.finish(t, 0, Some(e.clone()));
                    }
                    return Err(e);
                }
                list.push(name.clone());
            }
        }
        let newly_here = {
            let mut idx = self.indexes[index as usize].borrow_mut();
            let e = idx.entry(name.clone()).or_default();
            e.local.insert(cell.id, cell.clone());
            let was = e.mask & (1 << self.shard) != 0;
            e.mask |= 1 << self.shard;
            !was
        };
        if newly_here {
            self.mask_changed(index, &name);
        }
        let peers: Vec<usize> = (0..self.shards).filter(|&s| s != self.shard).collect();
        if newly_here && !peers.is_empty() {
            let token = ack.map(|t| self.pending_for(t, peers.len()));
            for p in peers {
                self.push(
                    p,
                    Cross::Mask {
                        index,
                        name: name.clone(),
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

    /// Removes `cell` from `name`.
    pub fn remove_member(&self, index: Index, cell: &Rc<ConnCell>, name: &Bytes) {
        {
            let mut s = cell.session.borrow_mut();
            let list = s.list_mut(index.membership());
            list.retain(|g| g != name);
        }
        self.leave_index(index, cell, name);
    }

    fn leave_index(&self, index: Index, cell: &Rc<ConnCell>, name: &Bytes) {
        let now_empty = {
            let mut idx = self.indexes[index as usize].borrow_mut();
            let Some(e) = idx.get_mut(name) else { return };
            if e.local.remove(&cell.id).is_none() || !e.local.is_empty() {
                return;
            }
            e.mask &= !(1 << self.shard);
            if e.mask == 0 {
                idx.remove(name);
            }
            true
        };
        if now_empty {
            self.mask_changed(index, name);
            for p in (0..self.shards).filter(|&s| s != self.shard) {
                self.push(
                    p,
                    Cross::Mask {
                        index,
                        name: name.clone(),
                        has: false,
                        reply: None,
                    },
                );
            }
        }
    }

    fn mask_changed(&self, index: Index, name: &Bytes) {
        if index != Index::Group || !name.starts_with(WATCH_PREFIX) {
            return;
        }
        let target = name.slice(WATCH_PREFIX.len()..);
        if self.indexes[0].borrow().contains_key(name) {
            self.watched.borrow_mut().insert(target);
        } else {
            self.watched.borrow_mut().remove(&target);
        }
    }

    /// Applies a batch from shard `from`.
    pub fn on_cross(&self, from: usize, items: Vec<Cross>, now: Now) {
        for item in items {
            match item {
                Cross::Deliver { frame, reply } => {
                    let result = self.deliver_owned(&frame, now);
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
                Cross::Fanout {
                    index,
                    name,
                    frame,
                    exclude,
                    reply,
                } => {
                    let (delivered, error) =
                        self.deliver_index_local(index, &name, &frame, &exclude, now);
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
                Cross::Mask {
                    index,
                    name,
                    has,
                    reply,
                } => {
                    {
                        let mut idx = self.indexes[index as usize].borrow_mut();
                        if has {
                            idx.entry(name.clone()).or_default().mask |= 1 << from;
                        } else if let Some(e) = idx.get_mut(&name) {
                            e.mask &= !(1 << from);
                            if e.mask == 0 {
                                idx.remove(&name);
                            }
                        }
                    }
                    self.mask_changed(index, &name);
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
                        self.settle(&p.target);
                        self.finish(p.target, p.delivered, p.error);
                    }
                }
                Cross::Call { call, reply } => {
                    let completed = self.completed.clone();
                    self.exec(
                        call,
                        Box::new(move |r| completed.borrow_mut().push((from, reply, r))),
                        now,
                    );
                }
                Cross::CallDone { token, result } => {
                    if let Some(cb) = self.calls.borrow_mut().remove(&token) {
                        cb(result);
                    }
                }
            }
        }
        let done: Vec<_> = std::mem::take(&mut *self.completed.borrow_mut());
        for (to, token, result) in done {
            self.push(to, Cross::CallDone { token, result });
        }
    }

    /// Runs `call` on shard `shard`, calling `done` with its result.
    pub fn call(&self, shard: usize, call: Call, done: CallCallback, now: Now) {
        if shard == self.shard {
            self.exec(call, done, now);
        } else {
            let token = self.token();
            self.calls.borrow_mut().insert(token, done);
            self.push(shard, Cross::Call { call, reply: token });
        }
    }

    fn exec(&self, call: Call, done: CallCallback, now: Now) {
        match call {
            Call::Client(addr) => done(CallResult::Client(
                self.lookup(&addr).map(|c| self.view(&c)),
            )),
            Call::List {
                role,
                prefix,
                after,
                limit,
            } => {
                let sorted = self.sorted.borrow();
                let by_addr = self.by_addr.borrow();
                // `after` is exclusive; below the prefix, start at the prefix.
                let lower = match after {
                    Some(a) if a.as_ref() >= prefix.as_bytes() => Bound::Excluded(a),
                    _ => Bound::Included(Bytes::copy_from_slice(prefix.as_bytes())),
                };
                let mut out = Vec::new();
                for a in sorted.range((lower, Bound::Unbounded)) {
                    if out.len() >= limit {
                        break;
                    }
                    if !a.starts_with(prefix.as_bytes()) {
                        break;
                    }
                    let Some(c) = by_addr.get(a) else { continue };
                    if role.is_some_and(|r| c.conn.borrow().role() != r) {
                        continue;
                    }
                    out.push(self.view(c));
                }
                done(CallResult::List(out))
            }
            Call::Bind { index, name, addr } => match self.lookup(&addr) {
                None => done(CallResult::Done(Err((
                    ErrorCode::NoRoute,
                    format!("{} is offline", name_str(&addr)),
                )))),
                Some(cell) => {
                    let cb: AckCallback =
                        Box::new(move |n, e| done(CallResult::Done(e.map_or(Ok(n), Err))));
                    // A refusal is answered through the callback too.
                    let _ = self.add_member(index, &cell, name, Some(AckTarget::Callback(cb)));
                }
            },
            Call::Unbind { index, name, addr } => match self.lookup(&addr) {
                None => done(CallResult::Done(Err((
                    ErrorCode::NoRoute,
                    format!("{} is offline", name_str(&addr)),
                )))),
                Some(cell) => {
                    let member = {
                        let s = cell.session.borrow();
                        s.list(index.membership()).contains(&name)
                    };
                    self.remove_member(index, &cell, &name);
                    done(CallResult::Done(if member {
                        Ok(1)
                    } else {
                        Err((
                            ErrorCode::NoRoute,
                            format!("{} is not a member of {}", name_str(&addr), name_str(&name)),
                        ))
                    }))
                }
            },
            Call::Dissolve(group) => {
                let members: Vec<Rc<ConnCell>> = self.indexes[0]
                    .borrow()
                    .get(&group)
                    .map(|e| e.local.values().cloned().collect())
                    .unwrap_or_default();
                let n = members.len() as u32;
                for m in members {
                    self.remove_member(Index::Group, &m, &group);
                }
                done(CallResult::Done(Ok(n)))
            }
            Call::Kick(addr) => match self.lookup(&addr) {
                None => done(CallResult::Done(Err((
                    ErrorCode::NoRoute,
                    format!("{} is offline", name_str(&addr)),
                )))),
                Some(cell) => {
                    let why = "disconnected by the server";
                    let deadline = now.mono_ms + self.cfg.close_grace_ms;
                    self.end(
                        &cell,
                        ErrorCode::Forbidden,
                        why,
                        CloseReason::Kicked,
                        deadline,
                    );
                    done(CallResult::Done(Ok(1)))
                }
            },
            Call::Members {
                index,
                name,
                after,
                limit,
            } => {
                let mut v: Vec<Bytes> = self.indexes[index as usize]
                    .borrow()
                    .get(&name)
                    .map(|e| {
                        e.local
                            .values()
                            .map(|c| c.conn.borrow().addr().clone())
                            .collect()
                    })
                    .unwrap_or_default();
                v.retain(|a| after.as_ref().is_none_or(|x| a > x));
                v.sort();
                v.truncate(limit);
                done(CallResult::Members(v))
            }
            Call::Broadcast { frame, role } => {
                let targets: Vec<Rc<ConnCell>> = self
                    .by_addr
                    .borrow()
                    .values()
                    .filter(|c| role.is_none_or(|r| c.conn.borrow().role() == r))
                    .cloned()
                    .collect();
                let mut n = 0;
                for c in targets {
                    let mut f = frame.clone();
                    f.dst = c.conn.borrow().addr().clone();
                    if self.deliver_local(&c, &f, now).is_ok() {
                        n += 1;
                    }
                }
                done(CallResult::Done(Ok(n)))
            }
        }
    }

    fn view(&self, c: &ConnCell) -> ClientView {
        let conn = c.conn.borrow();
        let s = c.session.borrow();
        ClientView {
            addr: conn.addr().clone(),
            role: conn.role(),
            shard: self.shard,
            connected_at_ms: s.connected_at_ms,
            remote: s.remote,
            uids: s.list(Membership::Uid).to_vec(),
            groups: s.list(Membership::Group).to_vec(),
            meta: s.meta(),
        }
    }

    fn token(&self) -> u64 {
        let t = self.next_token.get();
        self.next_token.set(t + 1);
        t
    }

    fn pending_for(&self, target: AckTarget, remaining: usize) -> u64 {
        if let AckTarget::Conn { id, .. } = &target
            && let Some(c) = self.conns.borrow().get(id)
        {
            // Room for the answer counts against the sender's queue.
            c.owed.set(c.owed.get().saturating_add(1));
        }
        let token = self.token();
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

    /// A pending answer is about to be queued: it is owed no more.
    fn settle(&self, target: &AckTarget) {
        if let AckTarget::Conn { id, .. } = target
            && let Some(c) = self.conns.borrow().get(id)
        {
            c.owed.set(c.owed.get().saturating_sub(1));
        }
    }

    fn resolve(&self, target: AckTarget, result: Result<u32, Failure>) {
        match result {
            Ok(n) => self.finish(target, n, None),
            Err(e) => self.finish(target, 0, Some(e)),
        }
    }

    /// Answers a fan-out. A unicast that failed reports its error; a group
    /// publish is accepted once every shard queued it for its members, and
    /// reports an error only when it reached nobody because of one.
    fn finish(&self, target: AckTarget, delivered: u32, error: Option<Failure>) {
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
                self.wake(&cell);
            }
            AckTarget::Callback(f) => f(delivered, error.filter(|_| delivered == 0)),
        }
    }

    fn reply_conn(&self, cell: &ConnCell, seq: u32, ack_req: bool, result: Result<u32, Failure>) {
        let frame = match result {
            Ok(_) if ack_req => Frame::ack(seq),
            Ok(_) => return,
            Err((code, msg)) => Frame::error(seq, code, &msg),
        };
        cell.conn.borrow_mut().control(&self.cfg.conn, &frame);
        self.wake(cell);
    }

    fn push(&self, peer: usize, item: Cross) {
        let mut outbox = self.outbox.borrow_mut();
        let q = &mut outbox[peer];
        let droppable = matches!(item, Cross::Deliver { .. } | Cross::Fanout { .. });
        if droppable && q.len() >= self.cfg.outbox_limit {
            // The peer shard is not keeping up: refuse rather than grow.
            // Control items (masks, replies, calls) are never dropped; they
            // are bounded by the data items that cause them.
            drop(outbox);
            self.stats.dropped(DropReason::MeshFull);
            if let Cross::Deliver { reply: Some(t), .. } | Cross::Fanout { reply: Some(t), .. } =
                item
            {
                let fail = Cross::Reply {
                    token: t,
                    delivered: 0,
                    error: Some((
                        ErrorCode::Internal,
                        "shard mesh is full; frame dropped".into(),
                    )),
                };
                self.on_cross(
                    peer,
                    vec![fail],
                    Now {
                        mono_ms: 0,
                        wall_ms: 0,
                    },
                );
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

    /// Puts `cell` on the write list (once) so the I/O loop flushes its
    /// queue or carries out its close; wakes the loop on the first entry.
    pub fn wake(&self, cell: &ConnCell) {
        if cell.dirty.replace(true) {
            return;
        }
        let mut d = self.dirty.borrow_mut();
        d.push(cell.id);
        if d.len() == 1 {
            drop(d);
            if let Some(w) = self.io_waker.borrow().as_ref() {
                w.wake_by_ref();
            }
        }
    }

    /// Takes the write list; `waker` is woken when it gets a new entry.
    pub fn take_dirty(&self, waker: &std::task::Waker, into: &mut Vec<ConnId>) {
        {
            let mut w = self.io_waker.borrow_mut();
            if !w.as_ref().is_some_and(|w| w.will_wake(waker)) {
                *w = Some(waker.clone());
            }
        }
        std::mem::swap(&mut *self.dirty.borrow_mut(), into);
    }

    /// Wakes the I/O loop (to notice a shutdown).
    pub fn wake_io(&self) {
        if let Some(w) = self.io_waker.borrow().as_ref() {
            w.wake_by_ref();
        }
    }

    /// Whether any connection waits on the write list.
    pub fn has_dirty(&self) -> bool {
        !self.dirty.borrow().is_empty()
    }

    /// The connection with id `id`, if it is still on this shard.
    pub fn cell(&self, id: ConnId) -> Option<Rc<ConnCell>> {
        self.conns.borrow().get(&id).cloned()
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
                self.wake(&cell);
            } else if cell.close_deadline.get() <= now.mono_ms {
                self.wake(&cell);
            }
        }
        self.stats.queue_bytes.store(queued, Relaxed);
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

    /// Ends a connection: ERROR `code` after what is queued, then close by
    /// `deadline_ms` at the latest.
    fn end(
        &self,
        cell: &ConnCell,
        code: ErrorCode,
        why: &str,
        reason: CloseReason,
        deadline_ms: u64,
    ) {
        let _ = cell
            .conn
            .borrow_mut()
            .close_with(&self.cfg.conn, code, why, reason);
        cell.closing(reason, deadline_ms);
        cell.close_deadline
            .set(cell.close_deadline.get().min(deadline_ms));
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
