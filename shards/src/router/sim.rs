//! A deterministic simulation of one relay's routers: N shards' [`Router`]s,
//! a mesh that moves each router's outboxes into its peers' `on_cross`, a
//! stepped clock, and clients whose bytes go through the same `Connection`
//! state machine the runtime uses. No sockets, no threads, no sleeps: a test
//! says when the mesh delivers (`settle`), so cross-shard orderings that are
//! races on a real relay are chosen here.

use std::collections::{BTreeMap, VecDeque};
use std::rc::Rc;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use relay_core::codec::{self, Decoder};
use relay_core::conn::{Now, Transport};
use relay_core::frame::{Flags, Frame, FrameType};
use relay_core::route::shard_of;
use relay_core::{CloseReason, Connection};

use super::{Cross, Outcome, Router, RouterConfig, Signals};
use crate::cell::{ConnCell, Session};
use crate::stats::ShardStats;

/// The simulation ignores wake-ups: it takes every list after each step.
struct Quiet;

impl Signals for Quiet {
    fn writes_ready(&self) {}
    fn outbox_ready(&self) {}
}

/// One simulated client: its connection on the shard that owns its address,
/// and the frames the relay sent it, decoded.
struct Client {
    shard: usize,
    cell: Rc<ConnCell>,
    inbox: VecDeque<Frame>,
    unread: BytesMut,
}

/// N routers joined by a mesh the test drives.
pub struct Sim {
    pub routers: Vec<Router>,
    cfg: RouterConfig,
    now: Now,
    clients: BTreeMap<String, Client>,
    /// Batches shipped but not yet delivered: (from, to, items).
    wire: VecDeque<(usize, usize, Vec<Cross>)>,
    seq: u32,
}

impl Sim {
    /// `shards` routers with the relay's default settings.
    pub fn new(shards: usize) -> Sim {
        Self::with(shards, relay_config::Config::default())
    }

    /// One node `name` of a cluster: what its shards cannot settle goes to
    /// their `take_remote` lists.
    pub fn node(shards: usize, name: &str) -> Sim {
        let mut config = relay_config::Config::default();
        config.node.name = name.into();
        config.cluster.enabled = true;
        Self::with(shards, config)
    }

    fn with(shards: usize, mut config: relay_config::Config) -> Sim {
        config.shards.count = shards as _;
        let cfg = crate::router_config(&config);
        let routers = (0..shards)
            .map(|i| {
                Router::new(
                    i,
                    shards,
                    cfg.clone(),
                    Arc::new(ShardStats::default()),
                    Rc::new(Quiet),
                )
            })
            .collect();
        Sim {
            routers,
            cfg,
            now: Now {
                mono_ms: 1,
                wall_ms: 1_700_000_000_000,
            },
            clients: BTreeMap::new(),
            wire: VecDeque::new(),
            seq: 0,
        }
    }

    /// Moves the clock on.
    pub fn tick(&mut self, ms: u64) {
        self.now.mono_ms += ms;
        self.now.wall_ms += ms;
    }

    /// Ships every outbox onto the wire (without delivering).
    pub fn ship(&mut self) {
        for (from, r) in self.routers.iter().enumerate() {
            for (to, items) in r.take_outbox() {
                self.wire.push_back((from, to, items));
            }
        }
    }

    /// Delivers the oldest batch on the wire; false when none waits.
    pub fn deliver_one(&mut self) -> bool {
        let Some((from, to, items)) = self.wire.pop_front() else {
            return false;
        };
        self.routers[to].on_cross(from, items, self.now);
        true
    }

    /// Runs the mesh until nothing is in flight: every batch delivered, and
    /// everything that caused shipped and delivered too.
    pub fn settle(&mut self) {
        for _ in 0..10_000 {
            self.ship();
            if !self.deliver_one() {
                self.take_output();
                return;
            }
        }
        panic!("the mesh never went quiet");
    }

    /// The simulated clock.
    pub fn now(&self) -> Now {
        self.now
    }

    /// Connects `name` on the shard that owns it, with its hello answered.
    pub fn connect(&mut self, name: &str) {
        let welcome = self.hello(name);
        assert_eq!(welcome.kind, FrameType::Welcome, "{name} got {welcome:?}");
    }

    /// Opens a connection for `name` that never says hello.
    pub fn open_silent(&mut self, name: &str) {
        let shard = shard_of(name.as_bytes(), self.routers.len());
        let conn = Connection::new(&self.cfg.conn, Transport::Tcp, self.now);
        let remote = "127.0.0.1:1".parse().expect("an address");
        let cell = self.routers[shard].register(conn, Session::new(remote));
        self.clients.insert(
            name.to_owned(),
            Client {
                shard,
                cell,
                inbox: VecDeque::new(),
                unread: BytesMut::new(),
            },
        );
    }

    /// The simulated clock, ms.
    pub fn now_ms(&self) -> u64 {
        self.now.mono_ms
    }

    /// Opens a connection for `name` and says hello: the relay's first answer.
    pub fn hello(&mut self, name: &str) -> Frame {
        self.open_silent(name);
        let mut hello = Frame::new(FrameType::Hello);
        hello.src = Bytes::copy_from_slice(name.as_bytes());
        self.send(name, hello);
        self.take_output();
        let c = self.clients.get_mut(name).expect("just connected");
        let first = c
            .inbox
            .pop_front()
            .unwrap_or_else(|| panic!("{name} got nothing"));
        if first.kind != FrameType::Welcome {
            self.clients.remove(name);
        }
        first
    }

    /// Runs every shard's deadline sweep at the current time, then closes
    /// the connections it ended, as the I/O loop does once they flushed.
    pub fn sweep(&mut self) {
        for r in &self.routers {
            r.sweep(self.now);
        }
        self.take_output();
        let ended: Vec<String> = self
            .clients
            .iter()
            .filter(|(_, c)| c.cell.conn.borrow().is_closing())
            .map(|(n, _)| n.clone())
            .collect();
        for name in ended {
            let c = self.clients.remove(&name).expect("listed above");
            self.routers[c.shard].on_closed(&c.cell, self.now);
        }
        self.settle();
    }

    /// `name`'s socket closes.
    pub fn disconnect(&mut self, name: &str) {
        let c = self.clients.remove(name).expect("a connected client");
        c.cell.closing(CloseReason::PeerClosed, self.now.mono_ms);
        self.routers[c.shard].on_closed(&c.cell, self.now);
    }

    /// Whether `name` is connected.
    pub fn online(&self, name: &str) -> bool {
        self.clients.contains_key(name)
    }

    /// Feeds `frame` to the relay as `name` sent it (binary form).
    pub fn send(&mut self, name: &str, frame: Frame) {
        let c = self.clients.get(name).expect("a connected client");
        let (shard, cell) = (c.shard, c.cell.clone());
        let mut input = BytesMut::new();
        codec::encode(&frame, &mut input);
        loop {
            let ev = cell
                .conn
                .borrow_mut()
                .handle_input(&self.cfg.conn, self.now, &mut input);
            let Some(ev) = ev else { break };
            match self.routers[shard].on_event(&cell, ev, self.now) {
                Outcome::Continue => {}
                Outcome::Handover { owner, .. } => {
                    panic!("{name} lives on shard {shard}, yet its hello names shard {owner}")
                }
            }
        }
        self.take_output();
    }

    fn next_seq(&mut self) -> u32 {
        self.seq += 1;
        self.seq
    }

    /// JOIN `group` (with ACK_REQ when `ack`); returns the frame's seq.
    pub fn join(&mut self, name: &str, group: &str, ack: bool) -> u32 {
        self.member_frame(FrameType::Join, name, group, ack)
    }

    /// LEAVE `group`; returns the frame's seq.
    pub fn leave(&mut self, name: &str, group: &str) -> u32 {
        self.member_frame(FrameType::Leave, name, group, false)
    }

    fn member_frame(&mut self, kind: FrameType, name: &str, group: &str, ack: bool) -> u32 {
        let mut f = Frame::new(kind);
        f.dst = Bytes::copy_from_slice(group.as_bytes());
        f.seq = self.next_seq();
        f.flags = Flags(if ack { Flags::ACK_REQ } else { 0 });
        let seq = f.seq;
        self.send(name, f);
        seq
    }

    /// PUBLISH `payload` to `group` as `name`; returns the frame's seq.
    pub fn publish(&mut self, name: &str, group: &str, payload: &[u8], ack: bool) -> u32 {
        let mut f = Frame::new(FrameType::Publish);
        f.dst = Bytes::copy_from_slice(group.as_bytes());
        f.payload = Bytes::copy_from_slice(payload);
        f.seq = self.next_seq();
        f.flags = Flags(if ack { Flags::ACK_REQ } else { 0 });
        let seq = f.seq;
        self.send(name, f);
        seq
    }

    /// DATA `payload` to `dst` as `name`; returns the frame's seq.
    pub fn data(&mut self, name: &str, dst: &str, payload: &[u8], ack: bool) -> u32 {
        let mut f = Frame::data(
            Bytes::copy_from_slice(name.as_bytes()),
            Bytes::copy_from_slice(dst.as_bytes()),
            Bytes::copy_from_slice(payload),
        );
        f.seq = self.next_seq();
        f.flags = Flags(if ack { Flags::ACK_REQ } else { 0 });
        let seq = f.seq;
        self.send(name, f);
        seq
    }

    /// Takes what every connection has queued into its client's inbox, as
    /// the I/O loop's write pass would.
    fn take_output(&mut self) {
        for r in &self.routers {
            let mut dirty = Vec::new();
            r.take_dirty(&mut dirty);
            for id in dirty {
                if let Some(cell) = r.cell(id) {
                    cell.dirty.set(false);
                }
            }
        }
        let decoder = Decoder::new(self.cfg.conn.max_frame);
        for c in self.clients.values_mut() {
            let mut conn = c.cell.conn.borrow_mut();
            while let Some(b) = conn.poll_transmit(usize::MAX) {
                let n = b.len();
                c.unread.extend_from_slice(&b);
                conn.on_transmitted(&self.cfg.conn, self.now, n);
            }
            drop(conn);
            while let Some(f) = decoder
                .decode(&mut c.unread)
                .expect("the relay's output decodes")
            {
                c.inbox.push_back(f);
            }
        }
    }

    /// Everything `name` was sent so far.
    pub fn take(&mut self, name: &str) -> Vec<Frame> {
        self.take_output();
        self.clients
            .get_mut(name)
            .map(|c| c.inbox.drain(..).collect())
            .unwrap_or_default()
    }

    /// The next frame `name` was sent, which must be of `kind`.
    pub fn expect(&mut self, name: &str, kind: FrameType) -> Frame {
        self.take_output();
        let c = self.clients.get_mut(name).expect("a connected client");
        let f = c
            .inbox
            .pop_front()
            .unwrap_or_else(|| panic!("{name} got nothing"));
        assert_eq!(f.kind, kind, "{name} got {f:?}");
        f
    }
}
