//! The cluster link's state, without IO: which node holds which address
//! (the directory, as watched), which nodes have members of which group or
//! uid (interest), which nodes are alive (presence), the answers owed across
//! nodes, and the batches being written for each node.
//!
//! The NATS thread feeds it what arrives (`handle_*`) and carries out what
//! it asks (`take_effects`); the simulation in the router's tests feeds it
//! the same way over an in-memory bus, so remote routing is tested without
//! a server.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use base64::Engine as _;
use bytes::Bytes;
use relay_core::mqtt::SubscriptionTrie;
use relay_core::route::shard_of;

use super::wire::{self, Item, Writer};
use crate::router::{Failure, Inbound, Index, Remote, ReplyTo, failure, remote::unavailable};

/// What the link asks of its driver.
#[derive(Debug)]
pub enum Effect {
    /// One batch for `node` (its subject `<prefix>.node.<node>`).
    Publish { node: Arc<str>, payload: Bytes },
    /// Items for one shard of this node.
    ToShard { shard: usize, items: Vec<Inbound> },
    /// Directory bucket: put `value` under `key`.
    DirPut { key: String, value: String },
    /// Directory bucket: delete `key`.
    DirDelete { key: String },
    /// Interest bucket: this node has members of the name in `key` (or
    /// MQTT subscribers of the filter `value`, for an `m.` key).
    InterestPut { key: String, value: Bytes },
    /// Interest bucket: no more.
    InterestDelete { key: String },
}

/// Counters of the link (`/metrics`).
#[derive(Debug, Default)]
pub struct ClusterStats {
    /// Frames sent to other nodes (deliveries and fan-outs).
    pub remote_frames_out: AtomicU64,
    /// Frames received from other nodes.
    pub remote_frames_in: AtomicU64,
    /// NATS messages (batches) sent to other nodes.
    pub batches_out: AtomicU64,
    /// Batches received.
    pub batches_in: AtomicU64,
    /// Failed NATS operations (publish, bucket writes, a lost connection).
    pub nats_errors: AtomicU64,
    /// Frames for other nodes dropped because the link was down or full,
    /// or whose answer did not come in time.
    pub unavailable: AtomicU64,
    /// Frames for addresses no node holds.
    pub no_route: AtomicU64,
    /// Local connections closed because another node took their address.
    pub takeovers: AtomicU64,
    /// Nodes taken as gone (silent for a heartbeat period).
    pub nodes_lost: AtomicU64,
    /// Directory entries not kept: `cache_size` was reached.
    pub cache_full: AtomicU64,
    /// Batches from shards dropped: the channel to the NATS thread was full.
    pub channel_full: AtomicU64,
    /// 1 while connected to NATS.
    pub connected: AtomicU64,
    /// MQTT publishes sent to other nodes for their subscriptions (one per
    /// node; group publishes that carry them included).
    pub mqtt_out: AtomicU64,
    /// MQTT publishes received from other nodes.
    pub mqtt_in: AtomicU64,
}

impl ClusterStats {
    pub fn count(c: &AtomicU64) {
        c.fetch_add(1, Relaxed);
    }

    fn inc(c: &AtomicU64) {
        Self::count(c);
    }
}

/// The settings the link needs.
#[derive(Debug, Clone)]
pub struct LinkConfig {
    pub node: Arc<str>,
    pub shards: usize,
    pub heartbeat_ms: u64,
    pub reply_timeout_ms: u64,
    pub batch_bytes: usize,
    pub cache_size: usize,
}

/// A directory entry: `node` holds the address since `at_ms` (its hello's
/// wall clock time); `seen_ms` is when this node last heard of it.
#[derive(Debug, Clone)]
struct Entry {
    node: Arc<str>,
    at_ms: u64,
    seen_ms: u64,
}

/// An address held here.
#[derive(Debug, Clone, Copy)]
struct Own {
    shard: usize,
    conn: crate::cell::ConnId,
    at_ms: u64,
}

/// An answer owed to a shard, waiting for `remaining` nodes.
#[derive(Debug)]
struct Waiting {
    shard: usize,
    token: u64,
    remaining: usize,
    delivered: u32,
    error: Option<Failure>,
    deadline_ms: u64,
}

/// What another node said of itself in its last heartbeat.
#[derive(Debug, Clone)]
pub struct NodeSeen {
    pub seen_ms: u64,
    pub info: serde_json::Value,
}

/// The link's state.
pub struct Link {
    cfg: LinkConfig,
    stats: Arc<ClusterStats>,
    up: bool,
    started_ms: u64,
    last_refresh_ms: u64,
    dir: HashMap<Bytes, Entry>,
    own: HashMap<Bytes, Own>,
    /// (index, name) → nodes with members, and when each was last heard of.
    interest: HashMap<(Index, Bytes), HashMap<Arc<str>, u64>>,
    /// (index, name) → the shards of this node with members (bit mask).
    own_interest: HashMap<(Index, Bytes), u64>,
    /// MQTT filter → the shards of this node with subscribers (bit mask).
    own_mqtt: HashMap<Bytes, u64>,
    /// Other nodes' MQTT filters by interest key: (filter, node, last
    /// heard of), and the same as a trie (filter → nodes) for matching.
    mqtt: HashMap<String, (Bytes, Arc<str>, u64)>,
    mqtt_trie: SubscriptionTrie<Arc<str>, Bytes>,
    nodes: HashMap<Arc<str>, NodeSeen>,
    waiting: HashMap<u64, Waiting>,
    next_token: u64,
    batches: HashMap<Arc<str>, Writer>,
    inbound: Vec<Vec<Inbound>>,
    effects: Vec<Effect>,
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link")
            .field("node", &self.cfg.node)
            .finish()
    }
}

/// Whether a key is held by any shard of this node, after one shard's change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Held {
    /// It was held by none and now is by one.
    Began,
    /// It was held and now is by none.
    Ended,
    Same,
}

/// Sets or clears `shard`'s bit in `map[key]` (an entry whose mask becomes 0
/// is removed) and says whether the key began or ended being held.
fn set_shard<K: std::hash::Hash + Eq>(
    map: &mut HashMap<K, u64>,
    key: K,
    shard: usize,
    has: bool,
) -> Held {
    let before = map.get(&key).is_some_and(|m| *m != 0);
    let mask = if has {
        let m = map.entry(key).or_default();
        *m |= 1 << shard;
        *m
    } else {
        match map.get_mut(&key) {
            Some(m) => {
                *m &= !(1 << shard);
                let left = *m;
                if left == 0 {
                    map.remove(&key);
                }
                left
            }
            None => 0,
        }
    };
    match (before, mask != 0) {
        (false, true) => Held::Began,
        (true, false) => Held::Ended,
        _ => Held::Same,
    }
}

/// The directory key of an address (bucket keys allow fewer characters
/// than addresses do).
pub fn dir_key(addr: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(addr)
}

/// The interest key of (`index`, `name`) on `node`.
pub fn interest_key(index: Index, name: &[u8], node: &str) -> String {
    let i = match index {
        Index::Group => "g",
        Index::Uid => "u",
    };
    format!("{i}.{}.{node}", dir_key(name))
}

/// Filters longer than this are keyed by a hash (bucket keys are subject
/// tokens, and NATS bounds a subject's length); the value always holds the
/// filter.
const MQTT_KEY_MAX: usize = 192;

/// The interest key of MQTT topic filter `filter` on `node`:
/// `m.<filter b64>.<node>`, or `m.=<hash>.<node>` for a long filter
/// (`=` never appears in unpadded base64).
pub fn mqtt_key(filter: &[u8], node: &str) -> String {
    if filter.len() <= MQTT_KEY_MAX {
        return format!("m.{}.{node}", dir_key(filter));
    }
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    filter.hash(&mut h);
    format!("m.={:016x}{:08x}.{node}", h.finish(), filter.len())
}

fn unkey(key: &str) -> Option<Bytes> {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(key)
        .ok()
        .map(Bytes::from)
}

impl Link {
    pub fn new(cfg: LinkConfig, stats: Arc<ClusterStats>, now_ms: u64) -> Link {
        let shards = cfg.shards;
        Link {
            cfg,
            stats,
            up: false,
            started_ms: now_ms,
            last_refresh_ms: 0,
            dir: HashMap::new(),
            own: HashMap::new(),
            interest: HashMap::new(),
            own_interest: HashMap::new(),
            own_mqtt: HashMap::new(),
            mqtt: HashMap::new(),
            mqtt_trie: SubscriptionTrie::new(),
            nodes: HashMap::new(),
            waiting: HashMap::new(),
            next_token: 1,
            batches: HashMap::new(),
            inbound: (0..shards).map(|_| Vec::new()).collect(),
            effects: Vec::new(),
        }
    }

    pub fn node(&self) -> &Arc<str> {
        &self.cfg.node
    }

    /// The NATS connection came up (`true`) or went down.
    pub fn set_up(&mut self, up: bool, now_ms: u64) {
        if up && !self.up {
            // Everything held here is written again at once.
            self.last_refresh_ms = 0;
            self.up = true;
            self.refresh(now_ms);
        }
        self.up = up;
        self.stats.connected.store(u64::from(up), Relaxed);
    }

    pub fn is_up(&self) -> bool {
        self.up
    }

    /// The nodes heard of within a heartbeat period (this one included).
    pub fn nodes(&self) -> &HashMap<Arc<str>, NodeSeen> {
        &self.nodes
    }

    /// Addresses this node holds, as the link knows them.
    pub fn own_count(&self) -> usize {
        self.own.len()
    }

    fn alive(&self, node: &str, now_ms: u64) -> bool {
        match self.nodes.get(node) {
            Some(n) => now_ms.saturating_sub(n.seen_ms) <= self.cfg.heartbeat_ms,
            // Before the first heartbeat period is over, nodes not yet
            // heard of are given the benefit of the doubt.
            None => now_ms.saturating_sub(self.started_ms) <= self.cfg.heartbeat_ms,
        }
    }

    /// The node holding `addr`, if another live node does.
    pub fn holder_of(&self, addr: &[u8], now_ms: u64) -> Option<Arc<str>> {
        self.holder(addr, now_ms)
    }

    /// `node` has been heard of within the last heartbeat period.
    pub fn is_live(&self, node: &str, now_ms: u64) -> bool {
        self.nodes.contains_key(node) && self.alive(node, now_ms)
    }

    /// The node holding `addr`, if another live node does.
    fn holder(&self, addr: &[u8], now_ms: u64) -> Option<Arc<str>> {
        let e = self.dir.get(addr)?;
        let fresh = now_ms.saturating_sub(e.seen_ms) <= self.cfg.heartbeat_ms;
        (fresh && *e.node != *self.cfg.node && self.alive(&e.node, now_ms)).then(|| e.node.clone())
    }

    fn for_shard(&mut self, shard: usize, item: Inbound) {
        if let Some(q) = self.inbound.get_mut(shard) {
            q.push(item);
        }
    }

    fn answer(&mut self, shard: usize, token: Option<u64>, delivered: u32, error: Option<Failure>) {
        if let Some(token) = token {
            self.for_shard(
                shard,
                Inbound::Reply {
                    token,
                    delivered,
                    error,
                },
            );
        }
    }

    fn wait(&mut self, shard: usize, token: u64, remaining: usize, now_ms: u64) -> u64 {
        let t = self.next_token;
        self.next_token += 1;
        self.waiting.insert(
            t,
            Waiting {
                shard,
                token,
                remaining,
                delivered: 0,
                error: None,
                deadline_ms: now_ms + self.cfg.reply_timeout_ms,
            },
        );
        t
    }

    fn send(&mut self, node: &Arc<str>, item: &Item) {
        let from = self.cfg.node.clone();
        let w = self
            .batches
            .entry(node.clone())
            .or_insert_with(|| Writer::new(&from));
        w.push(item);
        if w.len() >= self.cfg.batch_bytes {
            let w = self.batches.remove(node).expect("just written");
            self.publish(node.clone(), w);
        }
    }

    fn publish(&mut self, node: Arc<str>, w: Writer) {
        ClusterStats::inc(&self.stats.batches_out);
        self.effects.push(Effect::Publish {
            node,
            payload: w.finish(),
        });
    }

    /// Items from shard `shard`.
    pub fn handle_items(&mut self, shard: usize, items: Vec<Remote>, now_ms: u64) {
        for item in items {
            self.handle_item(shard, item, now_ms);
        }
    }

    /// A key this node announces (`key`, with `value`) began or stopped
    /// being held by any of its shards: tell the other nodes, when up.
    fn interest_changed(&mut self, change: Held, key: String, value: Bytes) {
        if !self.up {
            return;
        }
        match change {
            Held::Began => self.effects.push(Effect::InterestPut { key, value }),
            Held::Ended => self.effects.push(Effect::InterestDelete { key }),
            Held::Same => {}
        }
    }

    fn handle_item(&mut self, shard: usize, item: Remote, now_ms: u64) {
        match item {
            Remote::Deliver { frame, reply } => {
                if !self.up {
                    ClusterStats::inc(&self.stats.unavailable);
                    return self.answer(shard, reply, 0, Some(unavailable()));
                }
                let Some(node) = self.holder(&frame.dst, now_ms) else {
                    ClusterStats::inc(&self.stats.no_route);
                    return self.answer(shard, reply, 0, Some(failure::offline(&frame.dst)));
                };
                let token = reply.map_or(0, |t| self.wait(shard, t, 1, now_ms));
                ClusterStats::inc(&self.stats.remote_frames_out);
                self.send(&node, &Item::Deliver { token, frame });
            }
            Remote::Fanout {
                index,
                name,
                frame,
                exclude,
                reply,
                mqtt,
                shared,
            } => {
                if !self.up {
                    ClusterStats::inc(&self.stats.unavailable);
                    return self.answer(shard, reply, 0, Some(unavailable()));
                }
                let mut nodes: Vec<(Arc<str>, Vec<Bytes>)> =
                    match self.interest.get(&(index, name.clone())) {
                        Some(m) => m
                            .iter()
                            .filter(|(n, seen)| {
                                ***n != *self.cfg.node
                                    && now_ms.saturating_sub(**seen) <= self.cfg.heartbeat_ms
                                    && self.alive(n, now_ms)
                            })
                            .map(|(n, _)| (n.clone(), Vec::new()))
                            .collect(),
                        None => Vec::new(),
                    };
                if index == Index::Group {
                    // A group is a topic: the nodes whose MQTT subscribers
                    // match it get the same item (one per node).
                    let retain = mqtt.as_ref().is_some_and(|m| m.msg.retain);
                    let native = nodes.len();
                    self.mqtt_nodes(&name, retain, &shared, now_ms, &mut nodes);
                    // With an MQTT client's message, every node gets it.
                    let n = if mqtt.is_some() {
                        nodes.len()
                    } else {
                        nodes.len() - native
                    };
                    self.stats.mqtt_out.fetch_add(n as u64, Relaxed);
                }
                if nodes.is_empty() {
                    return self.answer(shard, reply, 0, None);
                }
                let token = reply.map_or(0, |t| self.wait(shard, t, nodes.len(), now_ms));
                for (n, shared) in nodes {
                    ClusterStats::inc(&self.stats.remote_frames_out);
                    self.send(
                        &n,
                        &Item::Fanout {
                            index,
                            name: name.clone(),
                            exclude: exclude.clone(),
                            token,
                            frame: frame.clone(),
                            mqtt: mqtt.clone(),
                            shared,
                        },
                    );
                }
            }
            Remote::MqttPublish { src, msg, shared } => {
                if !self.up {
                    ClusterStats::inc(&self.stats.unavailable);
                    return;
                }
                let mut nodes = Vec::new();
                let (topic, retain) = (&msg.msg.topic, msg.msg.retain);
                self.mqtt_nodes(topic, retain, &shared, now_ms, &mut nodes);
                for (n, shared) in nodes {
                    ClusterStats::inc(&self.stats.remote_frames_out);
                    ClusterStats::inc(&self.stats.mqtt_out);
                    self.send(
                        &n,
                        &Item::MqttPublish {
                            src: src.clone(),
                            msg: msg.clone(),
                            shared,
                        },
                    );
                }
            }
            Remote::MqttFilter { filter, has } => {
                let change = set_shard(&mut self.own_mqtt, filter.clone(), shard, has);
                let key = mqtt_key(&filter, &self.cfg.node);
                self.interest_changed(change, key, filter);
            }
            Remote::Interest { index, name, has } => {
                let key = interest_key(index, &name, &self.cfg.node);
                let change = set_shard(&mut self.own_interest, (index, name), shard, has);
                self.interest_changed(change, key, Bytes::from_static(b"1"));
            }
            Remote::Claim { addr, conn, at_ms } => {
                self.own.insert(addr.clone(), Own { shard, conn, at_ms });
                self.dir.insert(
                    addr.clone(),
                    Entry {
                        node: self.cfg.node.clone(),
                        at_ms,
                        seen_ms: now_ms,
                    },
                );
                if self.up {
                    self.effects.push(Effect::DirPut {
                        key: dir_key(&addr),
                        value: format!("{} {at_ms}", self.cfg.node),
                    });
                }
            }
            Remote::Release { addr, conn } => {
                if self.own.get(&addr).is_none_or(|o| o.conn != conn) {
                    return;
                }
                self.own.remove(&addr);
                if self
                    .dir
                    .get(&addr)
                    .is_some_and(|e| *e.node == *self.cfg.node)
                {
                    self.dir.remove(&addr);
                    if self.up {
                        self.effects.push(Effect::DirDelete {
                            key: dir_key(&addr),
                        });
                    }
                }
            }
            Remote::Reply {
                to,
                delivered,
                error,
            } => {
                if self.up {
                    self.send(
                        &to.node,
                        &Item::Reply {
                            token: to.token,
                            delivered,
                            error,
                        },
                    );
                }
            }
        }
    }

    /// A batch from another node (or a broken one, which is counted).
    pub fn handle_batch(&mut self, payload: &[u8], _now_ms: u64) {
        let (from, items) = match wire::read(payload) {
            Ok(b) => b,
            Err(e) => {
                crate::warn_every!("cluster: a batch from another node is unreadable: {e}");
                ClusterStats::inc(&self.stats.nats_errors);
                return;
            }
        };
        ClusterStats::inc(&self.stats.batches_in);
        let from: Arc<str> = from.into();
        for item in items {
            match item {
                Item::Deliver { token, frame } => {
                    ClusterStats::inc(&self.stats.remote_frames_in);
                    let shard = shard_of(&frame.dst, self.cfg.shards);
                    let reply = (token != 0).then(|| ReplyTo {
                        node: from.clone(),
                        token,
                    });
                    self.for_shard(shard, Inbound::Deliver { frame, reply });
                }
                Item::Fanout {
                    index,
                    name,
                    exclude,
                    token,
                    frame,
                    mqtt,
                    shared,
                } => {
                    ClusterStats::inc(&self.stats.remote_frames_in);
                    if mqtt.is_some() {
                        ClusterStats::inc(&self.stats.mqtt_in);
                    }
                    let shard = shard_of(&name, self.cfg.shards);
                    let reply = (token != 0).then(|| ReplyTo {
                        node: from.clone(),
                        token,
                    });
                    self.for_shard(
                        shard,
                        Inbound::Fanout {
                            index,
                            name,
                            frame,
                            exclude,
                            reply,
                            mqtt,
                            shared,
                        },
                    );
                }
                Item::MqttPublish { src, msg, shared } => {
                    ClusterStats::inc(&self.stats.remote_frames_in);
                    ClusterStats::inc(&self.stats.mqtt_in);
                    let shard = shard_of(&msg.msg.topic, self.cfg.shards);
                    self.for_shard(shard, Inbound::MqttPublish { src, msg, shared });
                }
                Item::Reply {
                    token,
                    delivered,
                    error,
                } => self.on_reply(token, delivered, error),
            }
        }
    }

    fn on_reply(&mut self, token: u64, delivered: u32, error: Option<Failure>) {
        let Some(w) = self.waiting.get_mut(&token) else {
            // Already answered (timed out): exactly one answer per frame.
            return;
        };
        w.delivered += delivered;
        if w.error.is_none() {
            w.error = error;
        }
        w.remaining -= 1;
        if w.remaining == 0 {
            let w = self.waiting.remove(&token).expect("present");
            self.answer(w.shard, Some(w.token), w.delivered, w.error);
        }
    }

    /// A directory change seen on the bucket's watch: `value` is
    /// `"<node> <at_ms>"`, or `None` for a delete.
    pub fn handle_dir(&mut self, key: &str, value: Option<&str>, now_ms: u64) {
        let Some(addr) = unkey(key) else { return };
        let Some(value) = value else {
            if let Some(o) = self.own.get(&addr) {
                // Ours: written again (a late delete from a node it left).
                if self.up {
                    self.effects.push(Effect::DirPut {
                        key: key.to_owned(),
                        value: format!("{} {}", self.cfg.node, o.at_ms),
                    });
                }
            } else {
                self.dir.remove(&addr);
            }
            return;
        };
        let Some((node, at)) = value.split_once(' ') else {
            return;
        };
        let at_ms: u64 = at.parse().unwrap_or(0);
        if *node == *self.cfg.node {
            if let Some(e) = self.dir.get_mut(&addr)
                && *e.node == *self.cfg.node
            {
                e.seen_ms = now_ms;
            }
            return;
        }
        let node: Arc<str> = match self.nodes.get_key_value(node) {
            Some((k, _)) => k.clone(),
            None => node.into(),
        };
        if let Some(o) = self.own.get(&addr).copied() {
            if (at_ms, &*node) > (o.at_ms, &*self.cfg.node) {
                // A newer hello elsewhere: the connection here goes.
                self.own.remove(&addr);
                ClusterStats::inc(&self.stats.takeovers);
                self.for_shard(
                    o.shard,
                    Inbound::Takeover {
                        addr: addr.clone(),
                        conn: o.conn,
                    },
                );
            } else {
                // An older claim still being refreshed: ours stands.
                return;
            }
        }
        if let Some(e) = self.dir.get_mut(&addr) {
            if (at_ms, &*node) >= (e.at_ms, &*e.node) {
                *e = Entry {
                    node,
                    at_ms,
                    seen_ms: now_ms,
                };
            }
            return;
        }
        if self.dir.len() >= self.cfg.cache_size {
            ClusterStats::inc(&self.stats.cache_full);
            return;
        }
        self.dir.insert(
            addr,
            Entry {
                node,
                at_ms,
                seen_ms: now_ms,
            },
        );
    }

    /// The live nodes other than this one whose MQTT filters match `topic`
    /// (every live node when `all`), added to `nodes` once each, each with
    /// the `$share` filters whose group it serves: for each matching share
    /// group not in `done` (served on this node), one node with members, in
    /// turn.
    fn mqtt_nodes(
        &self,
        topic: &[u8],
        all: bool,
        done: &[Bytes],
        now_ms: u64,
        nodes: &mut Vec<(Arc<str>, Vec<Bytes>)>,
    ) {
        let me = &*self.cfg.node;
        fn slot<'a>(
            nodes: &'a mut Vec<(Arc<str>, Vec<Bytes>)>,
            n: &Arc<str>,
        ) -> &'a mut Vec<Bytes> {
            let i = match nodes.iter().position(|(m, _)| m == n) {
                Some(i) => i,
                None => {
                    nodes.push((n.clone(), Vec::new()));
                    nodes.len() - 1
                }
            };
            &mut nodes[i].1
        }
        if all {
            for n in self.nodes.keys() {
                if **n != *me && self.alive(n, now_ms) {
                    slot(nodes, n);
                }
            }
        }
        if self.mqtt_trie.is_empty() {
            return;
        }
        self.mqtt_trie.for_each_match(topic, |m| {
            if **m.id == *me || !self.alive(m.id, now_ms) {
                return;
            }
            match m.group {
                None => {
                    slot(nodes, m.id);
                }
                Some(_) if done.contains(m.options) => {}
                Some(_) => slot(nodes, m.id).push(m.options.clone()),
            }
        });
    }

    /// An `m.` interest entry: another node has MQTT subscribers of the
    /// filter `value` (`None`: no more).
    fn handle_mqtt_interest(&mut self, key: &str, node: &str, value: Option<&[u8]>, now_ms: u64) {
        if *node == *self.cfg.node {
            if value.is_none() && self.up {
                let mine = self
                    .own_mqtt
                    .keys()
                    .find(|f| mqtt_key(f, node) == key)
                    .cloned();
                if let Some(filter) = mine {
                    self.effects.push(Effect::InterestPut {
                        key: key.to_owned(),
                        value: filter,
                    });
                }
            }
            return;
        }
        match value {
            Some(filter) => {
                if let Some(e) = self.mqtt.get_mut(key) {
                    e.2 = now_ms;
                    return;
                }
                let node: Arc<str> = match self.nodes.get_key_value(node) {
                    Some((k, _)) => k.clone(),
                    None => node.into(),
                };
                if self.mqtt.len() >= self.cfg.cache_size {
                    ClusterStats::inc(&self.stats.cache_full);
                    return;
                }
                let filter = Bytes::copy_from_slice(filter);
                if self
                    .mqtt_trie
                    .insert(&filter, node.clone(), filter.clone())
                    .is_ok()
                {
                    self.mqtt.insert(key.to_owned(), (filter, node, now_ms));
                }
            }
            None => {
                if let Some((filter, node, _)) = self.mqtt.remove(key) {
                    self.mqtt_trie.remove(&filter, &node);
                }
            }
        }
    }

    /// An interest change seen on its bucket's watch: `value` is the
    /// entry's value, `None` for a delete.
    pub fn handle_interest(&mut self, key: &str, value: Option<&[u8]>, now_ms: u64) {
        let present = value.is_some();
        if let Some(rest) = key.strip_prefix("m.") {
            if let Some((_, node)) = rest.split_once('.') {
                self.handle_mqtt_interest(key, node, value, now_ms);
            }
            return;
        }
        let mut parts = key.splitn(3, '.');
        let (Some(i), Some(name), Some(node)) = (parts.next(), parts.next(), parts.next()) else {
            return;
        };
        let index = match i {
            "g" => Index::Group,
            "u" => Index::Uid,
            _ => return,
        };
        let Some(name) = unkey(name) else { return };
        let k = (index, name);
        if *node == *self.cfg.node {
            if !present && self.own_interest.contains_key(&k) && self.up {
                self.effects.push(Effect::InterestPut {
                    key: key.to_owned(),
                    value: Bytes::from_static(b"1"),
                });
            }
            return;
        }
        if present {
            self.interest
                .entry(k)
                .or_default()
                .insert(node.into(), now_ms);
        } else if let Some(m) = self.interest.get_mut(&k) {
            m.remove(node);
            if m.is_empty() {
                self.interest.remove(&k);
            }
        }
    }

    /// A node's heartbeat (this node's own included).
    pub fn handle_presence(&mut self, node: &str, info: serde_json::Value, now_ms: u64) {
        match self.nodes.get_mut(node) {
            Some(n) => {
                n.seen_ms = now_ms;
                n.info = info;
            }
            None => {
                self.nodes.insert(
                    node.into(),
                    NodeSeen {
                        seen_ms: now_ms,
                        info,
                    },
                );
            }
        }
    }

    /// Time passes: entries are refreshed (three times per heartbeat
    /// period), silent nodes dropped, answers past their deadline given up.
    pub fn handle_tick(&mut self, now_ms: u64) {
        if self.up && now_ms.saturating_sub(self.last_refresh_ms) >= self.cfg.heartbeat_ms / 3 {
            self.refresh(now_ms);
        }
        let hb = self.cfg.heartbeat_ms;
        let gone: Vec<Arc<str>> = self
            .nodes
            .iter()
            .filter(|(n, s)| **n != self.cfg.node && now_ms.saturating_sub(s.seen_ms) > hb)
            .map(|(n, _)| n.clone())
            .collect();
        for n in &gone {
            tracing::warn!(node = %n, "cluster: node silent for a heartbeat period; taken as gone");
            ClusterStats::inc(&self.stats.nodes_lost);
            self.nodes.remove(n);
        }
        let me = self.cfg.node.clone();
        self.dir
            .retain(|_, e| *e.node == *me || now_ms.saturating_sub(e.seen_ms) <= hb);
        self.interest.retain(|_, m| {
            m.retain(|_, seen| now_ms.saturating_sub(*seen) <= hb);
            !m.is_empty()
        });
        let trie = &mut self.mqtt_trie;
        self.mqtt.retain(|_, (filter, node, seen)| {
            let keep = now_ms.saturating_sub(*seen) <= hb;
            if !keep {
                trie.remove(filter, node);
            }
            keep
        });
        let late: Vec<u64> = self
            .waiting
            .iter()
            .filter(|(_, w)| w.deadline_ms <= now_ms)
            .map(|(t, _)| *t)
            .collect();
        for t in late {
            let w = self.waiting.remove(&t).expect("listed");
            ClusterStats::inc(&self.stats.unavailable);
            let err = w.error.or(Some((
                relay_core::ErrorCode::Unavailable,
                "another node did not answer in time".into(),
            )));
            self.answer(w.shard, Some(w.token), w.delivered, err);
        }
    }

    fn refresh(&mut self, now_ms: u64) {
        self.last_refresh_ms = now_ms;
        let node = self.cfg.node.clone();
        for (addr, o) in &self.own {
            self.effects.push(Effect::DirPut {
                key: dir_key(addr),
                value: format!("{node} {}", o.at_ms),
            });
        }
        for (index, name) in self.own_interest.keys() {
            self.effects.push(Effect::InterestPut {
                key: interest_key(*index, name, &node),
                value: Bytes::from_static(b"1"),
            });
        }
        for filter in self.own_mqtt.keys() {
            self.effects.push(Effect::InterestPut {
                key: mqtt_key(filter, &node),
                value: filter.clone(),
            });
        }
    }

    /// Ends the pass: every batch written so far goes out, and every
    /// shard's items are handed over.
    pub fn flush(&mut self) {
        let batches: Vec<(Arc<str>, Writer)> = self.batches.drain().collect();
        for (node, w) in batches {
            if !w.is_empty() {
                self.publish(node, w);
            }
        }
        for (shard, q) in self.inbound.iter_mut().enumerate() {
            if !q.is_empty() {
                self.effects.push(Effect::ToShard {
                    shard,
                    items: std::mem::take(q),
                });
            }
        }
    }

    /// What the driver must do now (call after `flush`).
    pub fn take_effects(&mut self) -> Vec<Effect> {
        std::mem::take(&mut self.effects)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::router::MqttMsg;
    use relay_core::mqtt::{Message, QoS};

    fn link(node: &str) -> Link {
        let cfg = LinkConfig {
            node: node.into(),
            shards: 2,
            heartbeat_ms: 3000,
            reply_timeout_ms: 1000,
            batch_bytes: 64 * 1024,
            cache_size: 100,
        };
        let mut l = Link::new(cfg, Arc::new(ClusterStats::default()), 1);
        l.set_up(true, 1);
        for n in ["n1", "n2", "n3"] {
            l.handle_presence(n, serde_json::json!({}), 1);
        }
        l.take_effects();
        l
    }

    fn publish(topic: &str, retain: bool) -> Remote {
        let mut msg = Message::new(topic.as_bytes().to_vec(), &b"x"[..], QoS::AtLeastOnce);
        msg.retain = retain;
        Remote::MqttPublish {
            src: Bytes::from_static(b"pub-1"),
            msg: Box::new(MqttMsg { msg, ttl_ms: None }),
            shared: vec![],
        }
    }

    /// The nodes the pass's batches go to, sorted.
    fn sent_to(l: &mut Link) -> Vec<String> {
        l.flush();
        let mut to: Vec<String> = l
            .take_effects()
            .into_iter()
            .filter_map(|e| match e {
                Effect::Publish { node, .. } => Some(node.to_string()),
                _ => None,
            })
            .collect();
        to.sort();
        to
    }

    fn filter(f: &str, has: bool) -> Remote {
        Remote::MqttFilter {
            filter: Bytes::copy_from_slice(f.as_bytes()),
            has,
        }
    }

    #[test]
    fn a_filter_is_announced_once_per_node_while_a_shard_has_subscribers() {
        let mut l = link("n1");
        l.handle_items(0, vec![filter("a/+", true)], 5);
        let e = l.take_effects();
        assert!(
            matches!(&e[..], [Effect::InterestPut { key, value }]
                if *key == mqtt_key(b"a/+", "n1") && &value[..] == b"a/+"),
            "{e:?}"
        );
        l.handle_items(1, vec![filter("a/+", true)], 5);
        l.handle_items(0, vec![filter("a/+", false)], 5);
        assert!(l.take_effects().is_empty(), "shard 1 still has subscribers");
        l.handle_items(1, vec![filter("a/+", false)], 5);
        let e = l.take_effects();
        assert!(
            matches!(&e[..], [Effect::InterestDelete { key }] if *key == mqtt_key(b"a/+", "n1")),
            "{e:?}"
        );
        // Refreshes write the filters held, with their value.
        l.handle_items(0, vec![filter("b/#", true)], 5);
        l.take_effects();
        l.handle_tick(2000);
        let puts: Vec<_> = l
            .take_effects()
            .into_iter()
            .filter_map(|e| match e {
                Effect::InterestPut { key, value } if key.starts_with("m.") => Some(value),
                _ => None,
            })
            .collect();
        assert_eq!(puts, [Bytes::from_static(b"b/#")]);
    }

    #[test]
    fn a_publish_goes_once_to_each_node_with_a_matching_filter_until_it_goes() {
        let mut l = link("n1");
        let long = format!("long/{}/+", "x".repeat(300));
        for (f, n) in [
            ("a/+/c", "n2"),
            ("a/#", "n2"),
            ("#", "n3"),
            (&long[..], "n3"),
        ] {
            l.handle_interest(&mqtt_key(f.as_bytes(), n), Some(f.as_bytes()), 10);
        }
        assert!(
            mqtt_key(long.as_bytes(), "n3").len() < 64,
            "a long filter gets a short key"
        );
        l.handle_items(0, vec![publish("a/b/c", false)], 20);
        assert_eq!(sent_to(&mut l), ["n2", "n3"], "once per node");
        // `#` does not match a `$` topic; the long filter matches.
        l.handle_items(0, vec![publish("$sys/x", false)], 20);
        assert!(sent_to(&mut l).is_empty());
        l.handle_items(
            0,
            vec![publish(&format!("long/{}/z", "x".repeat(300)), false)],
            20,
        );
        assert_eq!(sent_to(&mut l), ["n3"]);
        // A retained publish goes to every live node.
        l.handle_items(0, vec![publish("$sys/x", true)], 20);
        assert_eq!(sent_to(&mut l), ["n2", "n3"]);
        // Deleted entries, then expired ones, are no longer matched.
        l.handle_interest(&mqtt_key(b"#", "n3"), None, 30);
        l.handle_items(0, vec![publish("z", false)], 30);
        assert!(sent_to(&mut l).is_empty());
        l.handle_items(0, vec![publish("a/b/c", false)], 30);
        assert_eq!(sent_to(&mut l), ["n2"]);
        for n in ["n1", "n2", "n3"] {
            l.handle_presence(n, serde_json::json!({}), 3500);
        }
        l.handle_interest(&mqtt_key(b"a/#", "n2"), Some(b"a/#"), 3500);
        l.handle_tick(3500);
        l.take_effects();
        l.handle_items(0, vec![publish("a/b/c", false)], 3500);
        assert_eq!(sent_to(&mut l), ["n2"], "the refreshed entry stays");
        l.handle_items(0, vec![publish("a/b", false)], 3500);
        assert_eq!(sent_to(&mut l), ["n2"]);
        l.handle_interest(&mqtt_key(b"a/#", "n2"), None, 3500);
        l.handle_items(0, vec![publish("a/b/c", false)], 3500);
        assert!(sent_to(&mut l).is_empty(), "a/+/c expired, a/# deleted");
    }

    #[test]
    fn a_group_publish_goes_once_to_nodes_with_members_or_subscribers() {
        let mut l = link("n1");
        l.handle_interest(&interest_key(Index::Group, b"room", "n2"), Some(b"1"), 10);
        l.handle_interest(&mqtt_key(b"room", "n2"), Some(b"room"), 10);
        l.handle_interest(&mqtt_key(b"+", "n3"), Some(b"+"), 10);
        let frame = relay_core::Frame::data(
            Bytes::from_static(b"ctl"),
            Bytes::from_static(b"room"),
            Bytes::from_static(b"p"),
        );
        l.handle_items(
            0,
            vec![Remote::Fanout {
                index: Index::Group,
                name: Bytes::from_static(b"room"),
                frame,
                exclude: vec![],
                reply: None,
                mqtt: None,
                shared: vec![],
            }],
            20,
        );
        l.flush();
        let batches: Vec<(String, Vec<Item>)> = l
            .take_effects()
            .into_iter()
            .filter_map(|e| match e {
                Effect::Publish { node, payload } => {
                    Some((node.to_string(), wire::read(&payload).unwrap().1))
                }
                _ => None,
            })
            .collect();
        assert_eq!(batches.len(), 2, "{batches:?}");
        for (node, items) in &batches {
            assert_eq!(items.len(), 1, "one item for {node}: {items:?}");
        }
    }

    #[test]
    fn other_nodes_filters_past_cache_size_are_not_kept_and_counted() {
        let mut l = link("n1");
        l.cfg.cache_size = 2;
        for f in ["a", "b", "c"] {
            l.handle_interest(&mqtt_key(f.as_bytes(), "n2"), Some(f.as_bytes()), 10);
        }
        assert_eq!(l.stats.cache_full.load(Relaxed), 1);
        l.handle_items(0, vec![publish("c", false)], 20);
        assert!(sent_to(&mut l).is_empty());
        l.handle_items(0, vec![publish("b", false)], 20);
        assert_eq!(sent_to(&mut l), ["n2"]);
    }

    #[test]
    fn a_share_group_gets_each_message_on_one_node_in_turn_unless_served_here() {
        let mut l = link("n1");
        let f = b"$share/g/job/#";
        for n in ["n2", "n3"] {
            l.handle_interest(&mqtt_key(f, n), Some(f), 10);
        }
        let mut served = Vec::new();
        for _ in 0..4 {
            l.handle_items(0, vec![publish("job/1", false)], 20);
            l.flush();
            for e in l.take_effects() {
                if let Effect::Publish { node, payload } = e {
                    let (_, items) = wire::read(&payload).unwrap();
                    assert!(
                        matches!(&items[..], [Item::MqttPublish { shared, .. }]
                            if shared[..] == [Bytes::from_static(f)]),
                        "{items:?}"
                    );
                    served.push(node.to_string());
                }
            }
        }
        served.sort();
        assert_eq!(
            served,
            ["n2", "n2", "n3", "n3"],
            "one node per message, in turn"
        );
        // Served here already: no other node gets it.
        l.handle_items(
            0,
            vec![Remote::MqttPublish {
                src: Bytes::from_static(b"p"),
                msg: Box::new(MqttMsg {
                    msg: Message::new(&b"job/1"[..], &b"x"[..], QoS::AtLeastOnce),
                    ttl_ms: None,
                }),
                shared: vec![Bytes::from_static(f)],
            }],
            20,
        );
        assert!(sent_to(&mut l).is_empty());
    }

    #[test]
    fn own_mqtt_entries_deleted_by_others_are_written_again() {
        let mut l = link("n1");
        l.handle_items(0, vec![filter("a/b", true)], 5);
        l.take_effects();
        l.handle_interest(&mqtt_key(b"a/b", "n1"), None, 6);
        let e = l.take_effects();
        assert!(
            matches!(&e[..], [Effect::InterestPut { value, .. }] if &value[..] == b"a/b"),
            "{e:?}"
        );
    }
}
