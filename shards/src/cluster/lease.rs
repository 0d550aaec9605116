//! The rules lease: rules and alarms run on one node of the cluster at a
//! time (`[cluster] rules_lease`).
//!
//! - The lease is key `rules` in bucket `<prefix>_lease`, whose entries live
//!   one heartbeat period. A node takes it by creating the key when it is
//!   absent, and keeps it by rewriting it three times per period with the
//!   revision it last wrote (a write with another revision fails). A holder
//!   whose rewrite fails, or whose last good rewrite is two thirds of a
//!   period old, steps down at once; the key then expires and another node
//!   creates it.
//! - Every node's shards hand their rule events to [`RulesLease`]: the
//!   holder's go straight to its engine, the others' go to the NATS thread
//!   over a bounded channel (full: dropped and counted) and on to the
//!   holder's subject `<prefix>.rules.<node>` in batches ([`encode`]).
//! - The holder feeds what arrives into its engine as if local. Events
//!   while no live node holds the lease are dropped and counted.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Mutex, OnceLock};

use base64::Engine as _;
use relay_plugins::{ClientInfo, Event, MessageEvent};
use serde_json::{Value, json};

/// The key of the lease in `<prefix>_lease`.
pub const LEASE_KEY: &str = "rules";

/// Counters of the lease (`/metrics`).
#[derive(Debug, Default)]
pub struct LeaseStats {
    /// Events sent to the holder on another node.
    pub forwarded: AtomicU64,
    /// Events dropped: channel to the NATS thread full, or no live holder.
    pub forward_dropped: AtomicU64,
    /// Events received from other nodes and fed to this node's engine.
    pub received: AtomicU64,
    /// Events received while this node did not run the engine.
    pub received_dropped: AtomicU64,
    /// Times this node took the lease.
    pub acquired: AtomicU64,
    /// Times this node gave it up (a failed or late rewrite, NATS lost).
    pub lost: AtomicU64,
}

/// Feeds one event to the engine running on this node; `false`: not taken.
pub type Feed = Box<dyn Fn(Event) -> bool + Send + Sync>;

/// What the shards, the NATS thread and the rules engine share.
pub struct RulesLease {
    leader: AtomicBool,
    holder: Mutex<Option<String>>,
    tx: async_channel::Sender<Event>,
    rx: async_channel::Receiver<Event>,
    feed: OnceLock<Feed>,
    pub stats: LeaseStats,
}

impl std::fmt::Debug for RulesLease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RulesLease")
            .field("leader", &self.is_leader())
            .finish()
    }
}

impl RulesLease {
    /// A lease handle whose channel to the NATS thread holds `capacity` events.
    pub fn new(capacity: usize) -> RulesLease {
        let (tx, rx) = async_channel::bounded(capacity.max(1));
        RulesLease {
            leader: AtomicBool::new(false),
            holder: Mutex::new(None),
            tx,
            rx,
            feed: OnceLock::new(),
            stats: LeaseStats::default(),
        }
    }

    /// This node holds the lease now.
    pub fn is_leader(&self) -> bool {
        self.leader.load(Relaxed)
    }

    /// The node holding the lease, as last read.
    pub fn holder(&self) -> Option<String> {
        self.holder.lock().ok().and_then(|h| h.clone())
    }

    pub(crate) fn set(&self, leader: bool, holder: Option<String>) {
        let was = self.leader.swap(leader, Relaxed);
        if leader && !was {
            self.stats.acquired.fetch_add(1, Relaxed);
        }
        if was && !leader {
            self.stats.lost.fetch_add(1, Relaxed);
        }
        if let Ok(mut h) = self.holder.lock() {
            *h = holder;
        }
    }

    /// Where events for this node's engine go (set once, by the engine's side).
    pub fn set_feed(&self, feed: Feed) {
        let _ = self.feed.set(feed);
    }

    /// Hands an event to the NATS thread for the holder; never waits.
    pub fn forward(&self, ev: Event) {
        if self.tx.try_send(ev).is_err() {
            self.stats.forward_dropped.fetch_add(1, Relaxed);
        }
    }

    pub(crate) fn receiver(&self) -> &async_channel::Receiver<Event> {
        &self.rx
    }

    /// Feeds an event that came from another node (or was queued on this
    /// one while it took the lease) to the local engine.
    pub(crate) fn feed_local(&self, ev: Event) -> bool {
        let taken = self.is_leader() && self.feed.get().is_some_and(|f| f(ev));
        if !taken {
            self.stats.received_dropped.fetch_add(1, Relaxed);
        }
        taken
    }
}

fn info_json(c: &ClientInfo) -> Value {
    json!({
        "addr": c.addr, "role": c.role, "meta": c.meta, "remote": c.remote,
        "shard": c.shard, "time_ms": c.time_ms, "groups": c.groups,
    })
}

fn info_of(v: &Value) -> Option<ClientInfo> {
    Some(ClientInfo {
        addr: v["addr"].as_str()?.to_owned(),
        role: v["role"].as_str()?.to_owned(),
        meta: v["meta"].clone(),
        remote: v["remote"].as_str()?.to_owned(),
        shard: v["shard"].as_u64()? as usize,
        time_ms: v["time_ms"].as_u64()?,
        groups: v["groups"]
            .as_array()?
            .iter()
            .filter_map(|g| g.as_str().map(str::to_owned))
            .collect(),
    })
}

/// One event as JSON (`None` for a kind this version does not carry).
pub fn event_json(ev: &Event) -> Option<Value> {
    let b64 = base64::engine::general_purpose::STANDARD;
    Some(match ev {
        Event::Connect(c) => json!({"k": "connect", "client": info_json(c)}),
        Event::Disconnect(c, reason) => {
            json!({"k": "disconnect", "client": info_json(c), "reason": reason})
        }
        Event::Message(m) => json!({
            "k": "message", "src": m.src, "dst": m.dst, "group": m.group,
            "payload": b64.encode(&m.payload), "json": m.json, "time_ms": m.time_ms,
        }),
        _ => return None,
    })
}

/// An event read back from [`event_json`].
pub fn event_of(v: &Value) -> Option<Event> {
    let b64 = base64::engine::general_purpose::STANDARD;
    Some(match v["k"].as_str()? {
        "connect" => Event::Connect(info_of(&v["client"])?),
        "disconnect" => Event::Disconnect(info_of(&v["client"])?, v["reason"].as_str()?.to_owned()),
        "message" => Event::Message(MessageEvent {
            src: v["src"].as_str()?.to_owned(),
            dst: v["dst"].as_str()?.to_owned(),
            group: v["group"].as_str().map(str::to_owned),
            payload: b64.decode(v["payload"].as_str()?).ok()?.into(),
            json: v["json"].as_bool()?,
            time_ms: v["time_ms"].as_u64()?,
        }),
        _ => return None,
    })
}

/// Events as NATS messages of at most about `max_bytes` each (one event
/// larger than that goes alone): a JSON array per message, with the number
/// of events it carries.
pub fn encode(events: &[Event], max_bytes: usize) -> Vec<(Vec<u8>, u64)> {
    let mut out = Vec::new();
    let mut cur: Vec<u8> = Vec::new();
    let mut n = 0;
    for ev in events {
        let Some(v) = event_json(ev) else { continue };
        let text = serde_json::to_vec(&v).unwrap_or_default();
        if !cur.is_empty() && cur.len() + text.len() + 2 > max_bytes {
            cur.push(b']');
            out.push((std::mem::take(&mut cur), std::mem::take(&mut n)));
        }
        cur.push(if cur.is_empty() { b'[' } else { b',' });
        cur.extend_from_slice(&text);
        n += 1;
    }
    if !cur.is_empty() {
        cur.push(b']');
        out.push((cur, n));
    }
    out
}

/// The events of one NATS message from [`encode`] (unreadable ones skipped).
pub fn decode(payload: &[u8]) -> Vec<Event> {
    serde_json::from_slice::<Vec<Value>>(payload)
        .map(|vs| vs.iter().filter_map(event_of).collect())
        .unwrap_or_default()
}

/// What the holder-side clock decides, without IO.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Try to create the key (no lease held).
    Acquire,
    /// Rewrite the key with this revision.
    Renew(u64),
    /// Give the lease up now: the last good rewrite is too old.
    StepDown,
    /// Nothing due yet.
    Wait,
}

/// The lease's timing on one node (monotonic ms).
#[derive(Debug, Clone)]
pub struct LeaseClock {
    /// The key's lifetime on the server (the heartbeat period).
    pub ttl_ms: u64,
    /// Revision of this node's last good write, while it holds the lease.
    pub revision: Option<u64>,
    /// When the last good write was sent.
    pub written_ms: u64,
    /// When the last attempt (of either kind) was made.
    pub tried_ms: u64,
}

impl LeaseClock {
    pub fn new(ttl_ms: u64) -> LeaseClock {
        LeaseClock {
            ttl_ms,
            revision: None,
            written_ms: 0,
            tried_ms: 0,
        }
    }

    /// Rewrites (and attempts) three times per lifetime.
    fn period(&self) -> u64 {
        (self.ttl_ms / 3).max(1)
    }

    /// What is due at `now`.
    pub fn step(&self, now: u64) -> Step {
        match self.revision {
            Some(_) if now.saturating_sub(self.written_ms) >= self.ttl_ms * 2 / 3 => Step::StepDown,
            _ if now.saturating_sub(self.tried_ms) < self.period() => Step::Wait,
            Some(r) => Step::Renew(r),
            None => Step::Acquire,
        }
    }

    /// A write sent at `sent` (monotonic ms) succeeded with `revision`.
    pub fn written(&mut self, sent: u64, revision: u64) {
        self.revision = Some(revision);
        self.written_ms = sent;
        self.tried_ms = sent;
    }

    /// An attempt sent at `sent` failed (or found the key taken).
    pub fn failed(&mut self, sent: u64) {
        self.revision = None;
        self.tried_ms = sent;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn events() -> Vec<Event> {
        let c = ClientInfo {
            addr: "ctl-1".into(),
            role: "controller".into(),
            meta: json!({"site": "a"}),
            remote: "127.0.0.1:5000".into(),
            shard: 1,
            time_ms: 77,
            groups: vec!["g".into()],
        };
        vec![
            Event::Connect(c.clone()),
            Event::Message(MessageEvent {
                src: "ctl-1".into(),
                dst: "".into(),
                group: Some("g".into()),
                payload: bytes::Bytes::from_static(b"\x00\xffbin"),
                json: false,
                time_ms: 78,
            }),
            Event::Disconnect(c, "bye".into()),
        ]
    }

    #[test]
    fn events_cross_nodes_unchanged_and_in_order() {
        let evs = events();
        let msgs = encode(&evs, 64 * 1024);
        assert_eq!(msgs.len(), 1);
        assert_eq!(msgs[0].1, 3);
        assert_eq!(decode(&msgs[0].0), evs);
    }

    #[test]
    fn batches_are_bounded_and_keep_order() {
        let evs: Vec<Event> = (0..50).flat_map(|_| events()).collect();
        let msgs = encode(&evs, 1024);
        assert!(msgs.len() > 1);
        for (m, n) in &msgs {
            assert!(m.len() <= 1024, "a batch of {} bytes", m.len());
            assert_eq!(decode(m).len() as u64, *n);
        }
        let back: Vec<Event> = msgs.iter().flat_map(|(m, _)| decode(m)).collect();
        assert_eq!(back, evs);
        assert!(decode(b"not json").is_empty());
    }

    #[test]
    fn the_clock_acquires_renews_and_steps_down_in_time() {
        let mut c = LeaseClock::new(3000);
        assert_eq!(c.step(5000), Step::Acquire);
        c.failed(5000);
        assert_eq!(c.step(5500), Step::Wait);
        assert_eq!(c.step(6000), Step::Acquire);
        c.written(6000, 7);
        assert_eq!(c.step(6500), Step::Wait);
        assert_eq!(c.step(7000), Step::Renew(7));
        c.written(7000, 8);
        // No good rewrite for two thirds of the lifetime: give it up before
        // the key can expire on the server and another node take it.
        assert_eq!(c.step(8999), Step::Renew(8));
        assert_eq!(c.step(9000), Step::StepDown);
        c.failed(9000);
        assert_eq!(c.revision, None);
    }

    #[test]
    fn a_node_without_the_lease_forwards_and_drops_when_full() {
        let l = RulesLease::new(2);
        for e in events() {
            l.forward(e);
        }
        assert_eq!(l.receiver().len(), 2);
        assert_eq!(l.stats.forward_dropped.load(Relaxed), 1);
        // Not the holder: nothing reaches an engine.
        let fed = std::sync::Arc::new(AtomicU64::new(0));
        let f = fed.clone();
        l.set_feed(Box::new(move |_| {
            f.fetch_add(1, Relaxed);
            true
        }));
        assert!(!l.feed_local(events().remove(0)));
        l.set(true, Some("a".into()));
        assert!(l.feed_local(events().remove(0)));
        assert_eq!(fed.load(Relaxed), 1);
        assert_eq!(l.stats.received_dropped.load(Relaxed), 1);
        assert_eq!(l.stats.acquired.load(Relaxed), 1);
        l.set(false, None);
        assert_eq!(l.stats.lost.load(Relaxed), 1);
    }
}
