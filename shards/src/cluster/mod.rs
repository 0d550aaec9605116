//! Several relay nodes as one address space, over NATS with JetStream.
//!
//! Off unless `[cluster] enabled`. When on, one plain thread runs a small
//! tokio runtime with the NATS client (async-nats); the shards talk to it
//! over bounded channels and never wait on it:
//!
//! - shard → link: what no shard of this node can settle ([`Remote`]: DATA
//!   for an address held elsewhere, fan-outs for members on other nodes,
//!   claims and releases of addresses, interest in groups and uids, answers
//!   owed to other nodes). A flusher pass sends one message with every item
//!   of that pass, with `try_send`: a full channel settles the items at once
//!   with `unavailable`.
//! - link → shard: what arrived for a shard ([`Inbound`]).
//!
//! On NATS:
//! - `<prefix>.node.<name>`: each node's inbox. Frames for a node travel in
//!   batches, one NATS message per destination node per pass (`wire`).
//! - `<prefix>.presence`: every node says it is alive (with its load)
//!   three times per heartbeat period; one silent for a period is gone.
//! - bucket `<prefix>_dir`: address → `"<node> <hello time ms>"`, entries
//!   living one heartbeat period and refreshed three times per period by
//!   their node; watched by every node (its directory cache). A newer hello
//!   elsewhere takes the address over: the older connection gets `replaced`.
//! - bucket `<prefix>_interest`: `<g|u>.<name>.<node>` for each group or uid
//!   with members on a node, and `m.<filter>.<node>` (value: the filter)
//!   for each MQTT topic filter with subscribers on a node, kept alive the
//!   same way.
//! - bucket `<prefix>_lease` and `<prefix>.rules.<name>` (`[cluster]
//!   rules_lease`): the node running the rules engine, and the events the
//!   others forward to it ([`lease`]).
//! - `<prefix>.api.<name>`: API requests other nodes hand to this one
//!   (NATS request/reply, [`ask`]).
//!
//! The state and every decision live in [`link::Link`], without IO; this
//! module only carries bytes between it, NATS and the shards.

pub mod ask;
pub mod lease;
pub mod link;
pub mod wire;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, kv};
use futures_util::StreamExt;
use serde_json::{Value, json};

pub use ask::{Answer, Ask, Target};
pub use lease::RulesLease;
pub use link::{ClusterStats, Effect, Link, LinkConfig};

use crate::router::{Inbound, Remote};
use crate::stats::ShardStats;

/// How often the NATS thread looks at its clock (deadlines, heartbeats).
const TICK_MS: u64 = 50;
/// Most shard messages taken in one pass before the batches go out.
const PASS_ITEMS: usize = 1024;

/// Sends a shard's items to the NATS thread.
pub type LinkSender = async_channel::Sender<(usize, Vec<Remote>)>;
/// What one shard receives from the NATS thread.
pub type ShardReceiver = async_channel::Receiver<Vec<Inbound>>;

/// What a node tells the others about itself, besides its name.
#[derive(Debug, Clone, Default)]
pub struct NodeFacts {
    pub tcp: Option<std::net::SocketAddr>,
    pub http: Option<std::net::SocketAddr>,
}

/// The running cluster link of one relay.
pub struct Cluster {
    pub stats: Arc<ClusterStats>,
    node: String,
    lease: Option<Arc<RulesLease>>,
    tx: LinkSender,
    asks: async_channel::Sender<Ask>,
    receivers: Mutex<Vec<Option<ShardReceiver>>>,
    nodes: Arc<Mutex<Value>>,
    stop: Arc<AtomicBool>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster").finish()
    }
}

/// Milliseconds on a monotonic clock of the NATS thread.
fn mono_ms(start: Instant) -> u64 {
    start.elapsed().as_millis() as u64 + 1
}

fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Cluster {
    /// Starts the NATS thread. It connects in the background and keeps
    /// reconnecting; until it is connected, frames for other nodes are
    /// answered `unavailable`.
    pub(crate) fn start(
        cfg: &relay_config::Config,
        shards: usize,
        shard_stats: Vec<Arc<ShardStats>>,
        facts: NodeFacts,
        lease: Option<Arc<RulesLease>>,
        kicks: crate::rt::kick::Kicks,
    ) -> anyhow::Result<Arc<Cluster>> {
        let c = cfg.cluster.clone();
        let cap = c.channel_capacity.max(1);
        let (tx, rx) = async_channel::bounded(cap);
        let mut to_shards = Vec::with_capacity(shards);
        let mut receivers = Vec::with_capacity(shards);
        for _ in 0..shards {
            let (t, r) = async_channel::bounded(cap);
            to_shards.push(t);
            receivers.push(Some(r));
        }
        let stats = Arc::new(ClusterStats::default());
        let nodes = Arc::new(Mutex::new(json!([])));
        let stop = Arc::new(AtomicBool::new(false));
        let (asks, ask_rx) = async_channel::bounded(cap);
        let driver = Driver {
            asks: ask_rx,
            api_token: cfg.http.api_token.clone(),
            inflight: Arc::new(tokio::sync::Semaphore::new(c.api_inflight.max(1))),
            cfg: c,
            link_cfg: LinkConfig {
                node: cfg.node.name.as_str().into(),
                shards,
                heartbeat_ms: cfg.cluster.heartbeat_ms,
                reply_timeout_ms: cfg.cluster.reply_timeout_ms,
                batch_bytes: cfg.cluster.batch_bytes,
                cache_size: cfg.cluster.cache_size,
            },
            stats: stats.clone(),
            rx,
            to_shards,
            kicks,
            nodes: nodes.clone(),
            stop: stop.clone(),
            shard_stats,
            facts,
            started_wall_ms: wall_ms(),
            lease: lease.clone(),
        };
        let thread = std::thread::Builder::new()
            .name("relay-nats".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        tracing::error!("cluster: cannot start the NATS runtime: {e}");
                        return;
                    }
                };
                rt.block_on(driver.run());
            })?;
        Ok(Arc::new(Cluster {
            stats,
            node: cfg.node.name.clone(),
            lease,
            tx,
            asks,
            receivers: Mutex::new(receivers),
            nodes,
            stop,
            thread: Mutex::new(Some(thread)),
        }))
    }

    /// The sender every shard's flusher uses.
    pub fn sender(&self) -> LinkSender {
        self.tx.clone()
    }

    /// Shard `shard`'s receiving end (once).
    pub fn receiver(&self, shard: usize) -> Option<ShardReceiver> {
        self.receivers
            .lock()
            .ok()
            .and_then(|mut v| v.get_mut(shard).and_then(Option::take))
    }

    /// This node's name.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// With `rules_lease`: whether this node holds the lease now.
    pub fn rules_leader(&self) -> Option<bool> {
        self.lease.as_ref().map(|l| l.is_leader())
    }

    /// The other live nodes, by name.
    pub fn peers(&self) -> Vec<String> {
        let nodes = self.nodes();
        nodes
            .as_array()
            .map(|a| {
                a.iter()
                    .filter(|n| n["self"] != json!(true))
                    .filter_map(|n| n["node"].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Hands an API request to the node `to` names (over NATS); the answer
    /// comes on the returned channel. Never waits: a full channel answers
    /// `unavailable` at once.
    pub fn ask(
        &self,
        to: Target,
        method: &str,
        path: &str,
        query: &str,
        body: &[u8],
    ) -> async_channel::Receiver<Answer> {
        let (tx, rx) = async_channel::bounded(1);
        let a = Ask {
            to,
            method: method.to_owned(),
            path: path.to_owned(),
            query: query.to_owned(),
            body: body.to_vec(),
            answer: tx,
        };
        if let Err(e) = self.asks.try_send(a) {
            let _ = e.into_inner().answer.try_send(Answer::Unavailable(
                "too many API requests waiting for other nodes".into(),
            ));
        }
        rx
    }

    /// The nodes alive now, as `/api/v1/nodes` lists them.
    pub fn nodes(&self) -> Value {
        self.nodes.lock().map(|v| v.clone()).unwrap_or(json!([]))
    }

    /// `/metrics` lines of the link.
    pub fn metrics(&self) -> Vec<(String, String, u64)> {
        use std::sync::atomic::Ordering::Relaxed;
        let s = &self.stats;
        let m = |n: &str, h: &str, v: &std::sync::atomic::AtomicU64| {
            (n.to_owned(), h.to_owned(), v.load(Relaxed))
        };
        let mut out = vec![
            m(
                "relay_cluster_remote_frames_out_total",
                "Frames sent to other nodes.",
                &s.remote_frames_out,
            ),
            m(
                "relay_cluster_remote_frames_in_total",
                "Frames received from other nodes.",
                &s.remote_frames_in,
            ),
            m(
                "relay_cluster_batches_out_total",
                "NATS messages (batches of frames) sent to other nodes.",
                &s.batches_out,
            ),
            m(
                "relay_cluster_batches_in_total",
                "Batches received from other nodes.",
                &s.batches_in,
            ),
            m(
                "relay_cluster_nats_errors_total",
                "Failed NATS operations and lost connections.",
                &s.nats_errors,
            ),
            m(
                "relay_cluster_unavailable_total",
                "Frames for other nodes dropped: link down or full, or no answer in time.",
                &s.unavailable,
            ),
            m(
                "relay_cluster_no_route_total",
                "Frames for addresses that no node holds.",
                &s.no_route,
            ),
            m(
                "relay_cluster_takeovers_total",
                "Connections closed because another node took their address.",
                &s.takeovers,
            ),
            m(
                "relay_cluster_nodes_lost_total",
                "Nodes taken as gone after a silent heartbeat period.",
                &s.nodes_lost,
            ),
            m(
                "relay_cluster_cache_full_total",
                "Directory entries or other nodes' MQTT filters not kept: cluster.cache_size reached.",
                &s.cache_full,
            ),
            m(
                "relay_cluster_channel_full_total",
                "Shard messages dropped: the channel to the NATS thread was full.",
                &s.channel_full,
            ),
            m(
                "relay_cluster_mqtt_publishes_out_total",
                "MQTT publishes sent to other nodes for their subscriptions (one per node).",
                &s.mqtt_out,
            ),
            m(
                "relay_cluster_mqtt_publishes_in_total",
                "MQTT publishes received from other nodes for this node's subscriptions.",
                &s.mqtt_in,
            ),
            m(
                "relay_cluster_connected",
                "1 while connected to NATS.",
                &s.connected,
            ),
        ];
        if let Some(l) = &self.lease {
            let s = &l.stats;
            out.extend([
                (
                    "relay_rules_leader".to_owned(),
                    "1 while this node holds the rules lease and runs the rules engine.".to_owned(),
                    u64::from(l.is_leader()),
                ),
                m(
                    "relay_rules_forwarded_total",
                    "Rule events sent to the node holding the rules lease.",
                    &s.forwarded,
                ),
                m(
                    "relay_rules_forward_dropped_total",
                    "Rule events dropped: no live node held the lease, or the channel was full.",
                    &s.forward_dropped,
                ),
                m(
                    "relay_rules_received_total",
                    "Rule events received from other nodes and fed to this node's engine.",
                    &s.received,
                ),
                m(
                    "relay_rules_received_dropped_total",
                    "Rule events that reached this node while it did not run the engine.",
                    &s.received_dropped,
                ),
                m(
                    "relay_rules_lease_acquired_total",
                    "Times this node took the rules lease.",
                    &s.acquired,
                ),
                m(
                    "relay_rules_lease_lost_total",
                    "Times this node gave the rules lease up.",
                    &s.lost,
                ),
            ]);
        }
        out
    }

    /// Stops the NATS thread after it has sent what it holds (at most a
    /// second).
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        let t = self.thread.lock().ok().and_then(|mut t| t.take());
        if let Some(t) = t {
            let _ = t.join();
        }
    }
}

/// What woke the NATS thread.
enum Ev {
    Items(Option<(usize, Vec<Remote>)>),
    Batch(Option<async_nats::Message>),
    Presence(Option<async_nats::Message>),
    Dir(Option<Result<kv::Entry, kv::WatcherError>>),
    Interest(Option<Result<kv::Entry, kv::WatcherError>>),
    /// A rule event of this node's shards, for the lease holder.
    Rules(Option<relay_plugins::Event>),
    /// Rule events another node forwarded here.
    RulesIn(Option<async_nats::Message>),
    /// An API request of this node's API for another node.
    Ask(Option<Ask>),
    /// An API request from another node.
    ApiIn(Option<async_nats::Message>),
    Tick,
}

/// What the NATS thread holds once JetStream is set up.
struct Wired {
    node_sub: async_nats::Subscriber,
    presence_sub: async_nats::Subscriber,
    api_sub: async_nats::Subscriber,
    dir: kv::Watch,
    interest: kv::Watch,
    /// The lease bucket and this node's rules subject (`rules_lease`).
    lease: Option<(kv::Store, async_nats::Subscriber)>,
}

struct Driver {
    cfg: relay_config::ClusterConfig,
    link_cfg: LinkConfig,
    stats: Arc<ClusterStats>,
    rx: async_channel::Receiver<(usize, Vec<Remote>)>,
    to_shards: Vec<async_channel::Sender<Vec<Inbound>>>,
    /// Wakes a shard whose loop waits on its sockets, not on its channel.
    kicks: crate::rt::kick::Kicks,
    nodes: Arc<Mutex<Value>>,
    stop: Arc<AtomicBool>,
    shard_stats: Vec<Arc<ShardStats>>,
    facts: NodeFacts,
    started_wall_ms: u64,
    lease: Option<Arc<RulesLease>>,
    asks: async_channel::Receiver<Ask>,
    api_token: Option<String>,
    /// API requests to and from other nodes under way (`api_inflight`).
    inflight: Arc<tokio::sync::Semaphore>,
}

/// The next item of an optional stream; pending forever when there is none.
async fn next_of<S: futures_util::Stream + Unpin>(s: Option<&mut S>) -> Option<S::Item> {
    match s {
        Some(s) => s.next().await,
        None => std::future::pending().await,
    }
}

impl Driver {
    fn subject(&self, what: &str) -> String {
        format!("{}.{what}", self.cfg.prefix)
    }

    fn bucket(&self, what: &str) -> String {
        format!("{}_{what}", self.cfg.prefix)
    }

    async fn bucket_store(
        &self,
        js: &jetstream::Context,
        what: &str,
        max_age_ms: u64,
    ) -> anyhow::Result<kv::Store> {
        let name = self.bucket(what);
        // The bucket's stream made directly, as a key-value bucket is laid
        // out: `create_key_value` asks for account details that older
        // servers (2.9) answer in a shape this client does not read.
        let created = js
            .create_stream(jetstream::stream::Config {
                name: format!("KV_{name}"),
                subjects: vec![format!("$KV.{name}.>")],
                max_messages_per_subject: 1,
                max_age: Duration::from_millis(max_age_ms),
                storage: jetstream::stream::StorageType::Memory,
                allow_rollup: true,
                deny_delete: true,
                discard: jetstream::stream::DiscardPolicy::New,
                allow_direct: true,
                num_replicas: 1,
                ..Default::default()
            })
            .await;
        match created {
            Ok(_) => js
                .get_key_value(name.as_str())
                .await
                .map_err(|e| anyhow::anyhow!("bucket {name}: {e}")),
            // Made by another node already (or with another heartbeat).
            Err(created) => js.get_key_value(name.as_str()).await.map_err(|e| {
                anyhow::anyhow!("bucket {name}: cannot create it ({created}) nor open it ({e})")
            }),
        }
    }

    async fn wire(&self, client: &async_nats::Client) -> anyhow::Result<Wired> {
        let js = jetstream::new(client.clone());
        let hb = self.cfg.heartbeat_ms;
        let dir = self.bucket_store(&js, "dir", hb).await?;
        let interest = self.bucket_store(&js, "interest", hb).await?;
        let lease = match &self.lease {
            Some(_) => Some((
                self.bucket_store(&js, "lease", hb).await?,
                client
                    .subscribe(self.subject(&format!("rules.{}", self.link_cfg.node)))
                    .await?,
            )),
            None => None,
        };
        let node_sub = client
            .subscribe(self.subject(&format!("node.{}", self.link_cfg.node)))
            .await?;
        let presence_sub = client.subscribe(self.subject("presence")).await?;
        let api_sub = client
            .subscribe(self.subject(&format!("api.{}", self.link_cfg.node)))
            .await?;
        let dir = dir.watch_with_history(">").await?;
        let interest = interest.watch_with_history(">").await?;
        Ok(Wired {
            node_sub,
            presence_sub,
            api_sub,
            dir,
            interest,
            lease,
        })
    }

    fn presence(&self, link: &Link) -> Value {
        use std::sync::atomic::Ordering::Relaxed;
        let mut roles = [0u64; 4];
        let (mut frames_in, mut frames_out, mut pending) = (0, 0, 0);
        for s in &self.shard_stats {
            for (i, r) in roles.iter_mut().enumerate() {
                *r += s.conns_by_role[i].load(Relaxed);
            }
            frames_in += s.frames_in.load(Relaxed);
            frames_out += s.frames_out.load(Relaxed);
            pending += s.conns_pending.load(Relaxed);
        }
        let by_role: serde_json::Map<String, Value> = relay_core::Role::ALL
            .iter()
            .zip(roles)
            .map(|(r, n)| (r.name().to_owned(), json!(n)))
            .collect();
        let mut v = json!({
            "node": &*self.link_cfg.node,
            "clients": roles.iter().sum::<u64>(),
            "pending": pending,
            "by_role": by_role,
            "addresses": link.own_count(),
            "shards": self.link_cfg.shards,
            "frames_in": frames_in,
            "frames_out": frames_out,
            "remote_frames_out": self.stats.remote_frames_out.load(Relaxed),
            "remote_frames_in": self.stats.remote_frames_in.load(Relaxed),
            "started_ms": self.started_wall_ms,
            "time_ms": wall_ms(),
            "tcp": self.facts.tcp.map(|a| a.to_string()),
            "http": self.facts.http.map(|a| a.to_string()),
        });
        if let (Some(l), Some(o)) = (&self.lease, v.as_object_mut()) {
            o.insert("rules".into(), json!(l.is_leader()));
        }
        v
    }

    fn snapshot(&self, link: &Link) {
        let mut list: Vec<Value> = link
            .nodes()
            .iter()
            .map(|(name, seen)| {
                let mut v = seen.info.clone();
                if let Some(o) = v.as_object_mut() {
                    o.insert("node".into(), json!(&**name));
                    o.insert("self".into(), json!(**name == *self.link_cfg.node));
                }
                v
            })
            .collect();
        list.sort_by(|a, b| a["node"].as_str().cmp(&b["node"].as_str()));
        if let Ok(mut n) = self.nodes.lock() {
            *n = Value::Array(list);
        }
    }

    async fn run(self) {
        let start = Instant::now();
        let mut link = Link::new(self.link_cfg.clone(), self.stats.clone(), mono_ms(start));
        let hb = self.cfg.heartbeat_ms;
        let opts = async_nats::ConnectOptions::new()
            .name(format!("relay {}", self.link_cfg.node))
            .retry_on_initial_connect()
            .ping_interval(Duration::from_millis((hb / 3).max(100)))
            .connection_timeout(Duration::from_millis(hb.max(1000)))
            .reconnect_delay_callback(|attempt| {
                Duration::from_millis((100 * attempt as u64).min(1000))
            });
        let client = match opts.connect(self.cfg.nats_url.as_str()).await {
            Ok(c) => c,
            Err(e) => {
                tracing::error!("cluster: NATS at {}: {e}", self.cfg.nats_url);
                return;
            }
        };
        let mut wired: Option<Wired> = None;
        let mut tick = tokio::time::interval(Duration::from_millis(TICK_MS));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_presence = 0u64;
        let mut stopping_since: Option<u64> = None;
        let mut lease_clock = lease::LeaseClock::new(hb);
        // Without the lease, a channel nobody sends on: its receive never ends.
        let (_no_sender, no_events) = async_channel::bounded::<relay_plugins::Event>(1);
        let events = self.lease.as_ref().map_or(&no_events, |l| l.receiver());
        loop {
            let now = mono_ms(start);
            let ev = {
                let (node_sub, presence_sub, dir, interest, rules_sub, api_sub) =
                    match wired.as_mut() {
                        Some(w) => (
                            Some(&mut w.node_sub),
                            Some(&mut w.presence_sub),
                            Some(&mut w.dir),
                            Some(&mut w.interest),
                            w.lease.as_mut().map(|(_, s)| s),
                            Some(&mut w.api_sub),
                        ),
                        None => (None, None, None, None, None, None),
                    };
                tokio::select! {
                    r = self.rx.recv() => Ev::Items(r.ok()),
                    m = next_of(node_sub) => Ev::Batch(m),
                    m = next_of(presence_sub) => Ev::Presence(m),
                    e = next_of(dir) => Ev::Dir(e),
                    e = next_of(interest) => Ev::Interest(e),
                    r = events.recv() => Ev::Rules(r.ok()),
                    m = next_of(rules_sub) => Ev::RulesIn(m),
                    a = self.asks.recv() => Ev::Ask(a.ok()),
                    m = next_of(api_sub) => Ev::ApiIn(m),
                    _ = tick.tick() => Ev::Tick,
                }
            };
            match ev {
                Ev::Items(None) => break,
                Ev::Items(Some((shard, items))) => {
                    link.handle_items(shard, items, now);
                    for _ in 0..PASS_ITEMS {
                        match self.rx.try_recv() {
                            Ok((shard, items)) => link.handle_items(shard, items, now),
                            Err(_) => break,
                        }
                    }
                }
                Ev::Batch(Some(m)) => link.handle_batch(&m.payload, now),
                Ev::Presence(Some(m)) => {
                    if let Ok(v) = serde_json::from_slice::<Value>(&m.payload)
                        && let Some(n) = v["node"].as_str()
                    {
                        let n = n.to_owned();
                        link.handle_presence(&n, v, now);
                    }
                }
                Ev::Dir(Some(Ok(e))) => {
                    let value = (e.operation == kv::Operation::Put)
                        .then(|| String::from_utf8_lossy(&e.value).into_owned());
                    link.handle_dir(&e.key, value.as_deref(), now);
                }
                Ev::Interest(Some(Ok(e))) => {
                    let value = (e.operation == kv::Operation::Put).then_some(&e.value[..]);
                    link.handle_interest(&e.key, value, now);
                }
                Ev::Dir(Some(Err(e))) | Ev::Interest(Some(Err(e))) => {
                    ClusterStats::count(&self.stats.nats_errors);
                    tracing::warn!("cluster: bucket watch: {e}");
                    wired = None;
                }
                Ev::Rules(None) => {}
                Ev::Rules(Some(ev)) => {
                    let mut evs = vec![ev];
                    while evs.len() < PASS_ITEMS {
                        match events.try_recv() {
                            Ok(ev) => evs.push(ev),
                            Err(_) => break,
                        }
                    }
                    self.forward_rules(&client, &link, evs, wired.is_some())
                        .await;
                }
                Ev::RulesIn(Some(m)) => {
                    if let Some(l) = &self.lease {
                        for ev in lease::decode(&m.payload) {
                            if l.feed_local(ev) {
                                ClusterStats::count(&l.stats.received);
                            }
                        }
                    }
                }
                Ev::Ask(None) => {}
                Ev::Ask(Some(a)) => self.ask(&client, &link, a, wired.is_some(), now),
                Ev::ApiIn(Some(m)) => self.answer_api(&client, m),
                Ev::Batch(None)
                | Ev::ApiIn(None)
                | Ev::Presence(None)
                | Ev::Dir(None)
                | Ev::Interest(None)
                | Ev::RulesIn(None) => {
                    wired = None;
                }
                Ev::Tick => {
                    let connected =
                        client.connection_state() == async_nats::connection::State::Connected;
                    if !connected && wired.is_some() {
                        tracing::warn!("cluster: lost the NATS connection; reconnecting");
                        ClusterStats::count(&self.stats.nats_errors);
                        wired = None;
                    }
                    if connected && wired.is_none() {
                        match self.wire(&client).await {
                            Ok(w) => {
                                tracing::info!(
                                    node = %self.link_cfg.node,
                                    "cluster: connected to NATS at {}", self.cfg.nats_url
                                );
                                wired = Some(w);
                            }
                            Err(e) => {
                                ClusterStats::count(&self.stats.nats_errors);
                                crate::warn_every!("cluster: setting up JetStream: {e}");
                            }
                        }
                    }
                    let now = mono_ms(start);
                    link.set_up(wired.is_some(), now);
                    if let Some(l) = &self.lease {
                        let kv = wired
                            .as_ref()
                            .and_then(|w| w.lease.as_ref())
                            .map(|(k, _)| k);
                        self.lease_step(l, kv, &mut lease_clock, now).await;
                    }
                    if wired.is_some() && now.saturating_sub(last_presence) >= hb / 3 {
                        last_presence = now;
                        let p = self.presence(&link);
                        let bytes = serde_json::to_vec(&p).unwrap_or_default();
                        if client
                            .publish(self.subject("presence"), bytes.into())
                            .await
                            .is_err()
                        {
                            ClusterStats::count(&self.stats.nats_errors);
                        }
                    }
                    link.handle_tick(now);
                    self.snapshot(&link);
                    if self.stop.load(Ordering::Relaxed) {
                        let since = *stopping_since.get_or_insert(now);
                        // What the shards sent while stopping goes out first.
                        if self.rx.is_empty() || now.saturating_sub(since) > 1000 {
                            break;
                        }
                    }
                }
            }
            link.flush();
            self.carry_out(&client, &mut link, wired.is_some()).await;
        }
        link.flush();
        self.carry_out(&client, &mut link, wired.is_some()).await;
        let _ = tokio::time::timeout(Duration::from_millis(500), client.flush()).await;
    }

    /// One step of the rules lease: take it when free, keep it while held,
    /// give it up at once when a rewrite fails, is late, or NATS is gone.
    async fn lease_step(
        &self,
        l: &RulesLease,
        kv: Option<&kv::Store>,
        clock: &mut lease::LeaseClock,
        now: u64,
    ) {
        let node = &*self.link_cfg.node;
        let Some(kv) = kv else {
            if clock.revision.is_some() || l.is_leader() {
                tracing::warn!("cluster: NATS lost; giving the rules lease up");
                clock.failed(now);
                l.set(false, None);
            }
            return;
        };
        let within = Duration::from_millis((clock.ttl_ms / 3).max(100));
        let value = || bytes::Bytes::copy_from_slice(node.as_bytes());
        match clock.step(now) {
            lease::Step::Wait => {}
            lease::Step::StepDown => {
                tracing::warn!("cluster: the rules lease was not renewed in time; giving it up");
                clock.failed(now);
                l.set(false, None);
            }
            lease::Step::Renew(rev) => {
                match tokio::time::timeout(within, kv.update(lease::LEASE_KEY, value(), rev)).await
                {
                    Ok(Ok(r)) => clock.written(now, r),
                    failed => {
                        let why = match failed {
                            Ok(Err(e)) => e.to_string(),
                            _ => "no answer in time".to_owned(),
                        };
                        tracing::warn!("cluster: renewing the rules lease: {why}; giving it up");
                        ClusterStats::count(&self.stats.nats_errors);
                        clock.failed(now);
                        l.set(false, None);
                    }
                }
            }
            lease::Step::Acquire => {
                match tokio::time::timeout(within, kv.create(lease::LEASE_KEY, value())).await {
                    Ok(Ok(r)) => {
                        clock.written(now, r);
                        tracing::info!(node, "cluster: this node holds the rules lease");
                        l.set(true, Some(node.to_owned()));
                    }
                    _ => {
                        clock.failed(now);
                        let holder =
                            match tokio::time::timeout(within, kv.get(lease::LEASE_KEY)).await {
                                Ok(Ok(Some(v))) => Some(String::from_utf8_lossy(&v).into_owned()),
                                _ => None,
                            };
                        l.set(false, holder);
                    }
                }
            }
        }
    }

    /// Rule events of this node's shards: to this node's engine when it holds
    /// the lease, else in batches to the live node that holds it, else dropped
    /// and counted.
    async fn forward_rules(
        &self,
        client: &async_nats::Client,
        link: &Link,
        evs: Vec<relay_plugins::Event>,
        up: bool,
    ) {
        let Some(l) = &self.lease else { return };
        if l.is_leader() {
            for ev in evs {
                l.feed_local(ev);
            }
            return;
        }
        let n = evs.len() as u64;
        let holder = l
            .holder()
            .filter(|h| up && *h != *self.link_cfg.node && link.nodes().contains_key(h.as_str()));
        let Some(holder) = holder else {
            l.stats.forward_dropped.fetch_add(n, Ordering::Relaxed);
            return;
        };
        let subject = self.subject(&format!("rules.{holder}"));
        for (batch, n) in lease::encode(&evs, self.cfg.batch_bytes) {
            if client.publish(subject.clone(), batch.into()).await.is_ok() {
                l.stats.forwarded.fetch_add(n, Ordering::Relaxed);
            } else {
                ClusterStats::count(&self.stats.nats_errors);
                l.stats.forward_dropped.fetch_add(n, Ordering::Relaxed);
            }
        }
    }

    /// Sends an API request of this node to the node it is for, and answers
    /// it when that node does (or does not, within `reply_timeout_ms`).
    fn ask(&self, client: &async_nats::Client, link: &Link, a: Ask, up: bool, now: u64) {
        if !up {
            let _ = a.answer.try_send(Answer::Unavailable(
                "the cluster link is down (NATS unreachable)".into(),
            ));
            return;
        }
        let me = &*self.link_cfg.node;
        let node = match &a.to {
            Target::Addr(addr) => link.holder_of(addr, now).map(|n| n.to_string()),
            Target::Rules => self
                .lease
                .as_ref()
                .and_then(|l| l.holder())
                .filter(|h| h != me && link.is_live(h, now)),
            Target::Node(n) => (n != me && link.is_live(n, now)).then(|| n.clone()),
        };
        let Some(node) = node else {
            let _ = a.answer.try_send(Answer::Nobody);
            return;
        };
        let Ok(permit) = self.inflight.clone().try_acquire_owned() else {
            let _ = a.answer.try_send(Answer::Unavailable(
                "too many API requests between nodes at once (cluster.api_inflight)".into(),
            ));
            return;
        };
        let subject = self.subject(&format!("api.{node}"));
        let payload = ask::encode_request(&a.method, &a.path, &a.query, &a.body);
        let client = client.clone();
        let wait = Duration::from_millis(self.cfg.reply_timeout_ms);
        tokio::spawn(async move {
            let r = tokio::time::timeout(wait, client.request(subject, payload.into())).await;
            drop(permit);
            let answer = match r {
                Ok(Ok(m)) => ask::decode_answer(&node, &m.payload),
                Ok(Err(e)) => {
                    Answer::Unavailable(format!("node {node} did not take the request: {e}"))
                }
                Err(_) => Answer::Unavailable(format!(
                    "node {node} did not answer within {} ms",
                    wait.as_millis()
                )),
            };
            let _ = a.answer.try_send(answer);
        });
    }

    /// Runs an API request from another node through this node's own API
    /// (this node only) and answers it.
    fn answer_api(&self, client: &async_nats::Client, m: async_nats::Message) {
        let Some(reply) = m.reply.clone() else { return };
        let client = client.clone();
        let refuse = |status: u16, error: &str, message: String| {
            let body = json!({"error": error, "message": message});
            let client = client.clone();
            let reply = reply.clone();
            tokio::spawn(async move {
                let _ = client
                    .publish(reply, ask::encode_answer(status, &body).into())
                    .await;
            });
        };
        let Some(req) = ask::decode_request(&m.payload) else {
            refuse(400, "bad_frame", "not an API request".into());
            return;
        };
        let Some(http) = self.facts.http else {
            refuse(
                503,
                "unavailable",
                format!(
                    "node {} has no plain HTTP listener to run the request on",
                    self.link_cfg.node
                ),
            );
            return;
        };
        let Ok(permit) = self.inflight.clone().try_acquire_owned() else {
            refuse(
                503,
                "busy",
                "too many API requests between nodes at once (cluster.api_inflight)".into(),
            );
            return;
        };
        let token = self.api_token.clone();
        let wait = Duration::from_millis(self.cfg.reply_timeout_ms);
        tokio::spawn(async move {
            let (status, body) = match ask::run_local(http, token.as_deref(), req, wait).await {
                Ok(r) => r,
                Err(e) => (503, json!({"error": "unavailable", "message": e})),
            };
            drop(permit);
            let _ = client
                .publish(reply, ask::encode_answer(status, &body).into())
                .await;
        });
    }

    async fn carry_out(&self, client: &async_nats::Client, link: &mut Link, up: bool) {
        for e in link.take_effects() {
            match e {
                Effect::ToShard { shard, items } => {
                    if let Some(tx) = self.to_shards.get(shard) {
                        // Waits for room (a shard drains its channel at once);
                        // only this thread waits, never a shard.
                        if tx.send(items).await.is_ok() {
                            self.kicks[shard].kick();
                        }
                    }
                }
                _ if !up => {}
                Effect::Publish { node, payload } => {
                    let subject = self.subject(&format!("node.{node}"));
                    if client.publish(subject, payload).await.is_err() {
                        ClusterStats::count(&self.stats.nats_errors);
                    }
                }
                Effect::DirPut { key, value } => {
                    self.kv_put("dir", &key, value.into_bytes().into(), client)
                        .await
                }
                Effect::DirDelete { key } => self.kv_delete("dir", &key, client).await,
                Effect::InterestPut { key, value } => {
                    self.kv_put("interest", &key, value, client).await
                }
                Effect::InterestDelete { key } => self.kv_delete("interest", &key, client).await,
            }
        }
    }

    /// A bucket write as a plain publish on the bucket's subject: JetStream
    /// stores it, and no shard or pass waits for its acknowledgement.
    async fn kv_put(&self, bucket: &str, key: &str, value: bytes::Bytes, c: &async_nats::Client) {
        let subject = format!("$KV.{}.{key}", self.bucket(bucket));
        if c.publish(subject, value).await.is_err() {
            ClusterStats::count(&self.stats.nats_errors);
        }
    }

    async fn kv_delete(&self, bucket: &str, key: &str, c: &async_nats::Client) {
        let subject = format!("$KV.{}.{key}", self.bucket(bucket));
        let mut h = async_nats::HeaderMap::new();
        h.insert("KV-Operation", "DEL");
        if c.publish_with_headers(subject, h, bytes::Bytes::new())
            .await
            .is_err()
        {
            ClusterStats::count(&self.stats.nats_errors);
        }
    }
}

/// Sends one flusher pass's items to the NATS thread without waiting; when
/// the channel is full they are handed back to be settled `unavailable`.
pub fn offer(
    tx: &LinkSender,
    stats: &ClusterStats,
    shard: usize,
    items: Vec<Remote>,
) -> Result<(), Vec<Remote>> {
    match tx.try_send((shard, items)) {
        Ok(()) => Ok(()),
        Err(e) => {
            ClusterStats::count(&stats.channel_full);
            Err(e.into_inner().1)
        }
    }
}
