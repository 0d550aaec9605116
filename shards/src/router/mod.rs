//! The per-shard router: which connections this shard owns, group and uid
//! indexes, and what happens to every event a connection produces.
//!
//! It is a plain single-threaded struct with no sockets and no executor: the
//! runtime (`rt`) feeds it events and cross-shard messages, writes what it
//! queues, and ships its outboxes over the mesh. The connection records it
//! holds (`ConnCell`) carry no descriptor, TLS session or socket buffer:
//! those live in the runtime's per-shard I/O table (`rt/io.rs`), which
//! routing never reaches. Everything that crosses shards is a [`Cross`]
//! item, batched per destination shard.
//!
//! Ownership: an address lives on `shard_of(address) % shards`. Groups and
//! uids are both an [`Index`]: each shard holds its own members
//! (`name → local connections`) and, for every name, the mask of shards that
//! have members; a publish or uid send goes only to those shards, and each
//! delivers locally, so every member is reached once.
//!
//! Layout, one job per file: `table` (address ownership: hellos, take-over,
//! closes, shutdown), `timers` (when each connection's next deadline
//! comes), `index` (group and uid members and masks),
//! `route` (delivery of DATA and PUBLISH), `cross` (the items shards send
//! each other and the outboxes), `pending` (answers owed across shards),
//! `calls` (API operations), `writes` (the write list) and `failure` (every
//! failure the router reports, one constructor each). The router holds no
//! executor types and no socket state: it tells the runtime through
//! [`Signals`] that a write pass or a flush is due, and the runtime takes the
//! lists as values and writes each listed connection from its own table.

mod access;
mod calls;
#[cfg(test)]
mod cluster_tests;
mod conns;
mod cross;
pub mod failure;
mod index;
mod mqtt;
mod pending;
pub mod remote;
mod route;
#[cfg(test)]
mod sim;
mod table;
#[cfg(test)]
mod tests;
mod timers;
mod writes;

pub use calls::{Call, CallCallback, CallResult, ClientView};
pub use cross::Cross;
use index::Entry;
pub use mqtt::{MqttConn, MqttSettings, MqttWs};
use pending::Pending;
pub use pending::{AckCallback, AckTarget};
pub use remote::{Inbound, MqttMsg, Remote, ReplyTo};

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, HashSet};
use std::rc::Rc;
use std::sync::Arc;

use bytes::Bytes;
use relay_core::conn::{CloseReason, ConnConfig, Event, Hello, Now};
use relay_core::frame::Frame;

use crate::cell::{ConnCell, ConnId, Membership};
use crate::stats::{DropReason, ShardStats};

/// Most shards a relay runs (index masks are 64-bit); the config refuses more.
pub use relay_config::MAX_SHARDS;

/// Prefix of the tap groups: members of `watch:<addr>` receive a copy of
/// every DATA and PUBLISH that `<addr>` sends (the console's live view).
pub const WATCH_PREFIX: &[u8] = b"watch:";

/// Which index a name belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
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

pub use failure::Failure;

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

/// The message of `going_away` after its retry hint.
const GOING_AWAY: &str = "relay is being upgraded; reconnect and say hello again";

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
    /// `[admission]`: hellos per second per shard and per source address.
    pub admission: relay_config::AdmissionConfig,
    /// `[acl]`: the access rules and their denial counters.
    pub acl: Arc<crate::acl::AclRules>,
    /// `[cluster] enabled`: what no shard of this node holds goes to the
    /// cluster link instead of answering `no_route`.
    pub cluster: bool,
    /// `[mqtt]`: the MQTT clients' mapping and session bounds.
    pub mqtt: Arc<MqttSettings>,
}

/// One shard's routing state.
pub struct Router {
    pub shard: usize,
    pub shards: usize,
    /// The settings; `set_cfg` swaps them on a configuration reload.
    cfg: RefCell<Rc<RouterConfig>>,
    /// The reload generation `cfg` comes from (0: the one at start).
    cfg_generation: Cell<u64>,
    /// Hellos admitted per second (`cfg.admission`).
    admission: RefCell<crate::admission::Gate>,
    /// An upgrade is under way: clients are told to reconnect after a
    /// `retry_after_ms` drawn from 0 to this window (ms).
    going_away: Cell<Option<u64>>,
    /// The upgrade's drain is over and the last connections are closing.
    going_away_ended: Cell<bool>,
    pub stats: Arc<ShardStats>,
    /// The connections on this shard, any state, by id...
    conns: RefCell<conns::ById>,
    /// ...and those open, by address (see `conns`).
    by_addr: RefCell<conns::ByAddr>,
    indexes: [RefCell<HashMap<Bytes, Entry>>; 2],
    /// MQTT subscriptions, retained messages and offline sessions.
    mqtt: RefCell<mqtt::MqttIndex>,
    /// Addresses with a `watch:` group somewhere.
    watched: RefCell<HashSet<Bytes>>,
    /// The access-rule views handed to connections, one per distinct list,
    /// for the settings of generation `.0` (connections share them).
    acl_views: RefCell<(u64, HashSet<access::SharedView>)>,
    outbox: RefCell<Vec<Vec<Cross>>>,
    /// Items for the cluster link (only ever filled when `cfg.cluster`).
    remote: RefCell<Vec<Remote>>,
    /// Connections with output queued or a close to carry out, in the order
    /// they became so; the I/O loop writes each once per pass.
    dirty: RefCell<Vec<ConnId>>,
    /// Tells the runtime that a write pass or a flush is due.
    signals: Rc<dyn Signals>,
    /// When each connection's next deadline comes (see `timers`).
    deadlines: RefCell<timers::Deadlines>,
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

/// How the router tells its runtime that work waits. Each is called when
/// its list goes from empty to not empty, so once per batch: the runtime
/// wakes the task that takes the list ([`Router::take_dirty`],
/// [`Router::take_outbox`]). A simulation records or ignores them.
pub trait Signals {
    /// The write list got its first entry.
    fn writes_ready(&self);
    /// An outbox got its first item.
    fn outbox_ready(&self);
    /// The cluster link's list got its first item.
    fn remote_ready(&self) {
        self.outbox_ready();
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
    pub fn new(
        shard: usize,
        shards: usize,
        cfg: RouterConfig,
        stats: Arc<ShardStats>,
        signals: Rc<dyn Signals>,
    ) -> Router {
        Router {
            shard,
            shards,
            cfg: RefCell::new(Rc::new(cfg)),
            cfg_generation: Cell::new(0),
            going_away: Cell::new(None),
            going_away_ended: Cell::new(false),
            admission: RefCell::new(crate::admission::Gate::new(
                0x9e37_79b9_7f4a_7c15 ^ shard as u64 ^ u64::from(std::process::id()),
            )),
            stats,
            conns: RefCell::default(),
            by_addr: RefCell::default(),
            indexes: [RefCell::default(), RefCell::default()],
            mqtt: RefCell::default(),
            watched: RefCell::default(),
            acl_views: RefCell::default(),
            outbox: RefCell::new((0..shards).map(|_| Vec::new()).collect()),
            remote: RefCell::default(),
            dirty: RefCell::default(),
            signals,
            deadlines: RefCell::default(),
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

    /// The current settings (a cheap handle; a reload swaps them between
    /// two calls, never during one).
    pub fn cfg(&self) -> Rc<RouterConfig> {
        self.cfg.borrow().clone()
    }

    /// The reload generation the settings come from.
    pub fn cfg_generation(&self) -> u64 {
        self.cfg_generation.get()
    }

    /// Takes the settings of reload `generation`. Connections read them on
    /// their next frame, timer or hello.
    pub fn set_cfg(&self, generation: u64, cfg: RouterConfig) {
        *self.cfg.borrow_mut() = Rc::new(cfg);
        self.cfg_generation.set(generation);
        self.arm_all();
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
                if let Err(e) = self.may_join(cell, &group) {
                    self.stats.dropped(DropReason::Forbidden);
                    self.reply_conn(cell, seq, ack_req, Err(e));
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
            Event::Closed(reason) => cell.closing(reason, now.mono_ms + self.cfg().close_grace_ms),
        }
        Outcome::Continue
    }

    /// Whether a client may JOIN `group` itself. The access rules come
    /// first: a rule that allows it explicitly grants it, one that denies it
    /// (or a default of deny) refuses it. Otherwise the protocol's own rules
    /// hold: a `watch:<addr>` group copies what `<addr>` sends, so only the
    /// device itself and privileged connections (the service token, see
    /// `Hello::privileged`) may join it, whatever `allow_client_join` says;
    /// the backend lets a browser watch by binding it through the API.
    fn may_join(&self, cell: &ConnCell, group: &[u8]) -> Result<(), Failure> {
        let watched = group.strip_prefix(WATCH_PREFIX);
        let (action, target) = match watched {
            Some(t) => (relay_core::acl::Action::Watch, t),
            None => (relay_core::acl::Action::Join, group),
        };
        if self.access(cell, action, target)? {
            return Ok(());
        }
        if let Some(target) = watched {
            let conn = cell.conn.borrow();
            if conn.is_privileged() || conn.addr().as_ref() == target {
                return Ok(());
            }
            return Err(failure::watch_needs_token(target));
        }
        if self.cfg().allow_client_join {
            Ok(())
        } else {
            Err(failure::join_not_allowed())
        }
    }
}
