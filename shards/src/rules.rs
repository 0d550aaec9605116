//! The bridge between the shards and the rules engine (`relay-plugins`):
//! session and message events go out with a `try_send` that never blocks a
//! shard (a full queue drops the event and counts it), and the API's alarm
//! and device-shadow routes are answered from the engine's shared state.

use std::sync::Arc;

use relay_core::conn::{CloseReason, Now};
use relay_core::frame::Frame;
use relay_core::name::name_str;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, RwLock};

use relay_plugins::{ClientInfo, Event, EventSender, MessageEvent, PluginHost};
use serde_json::{Value, json};

use crate::api::{PluginApi, SeriesQuery};
use crate::cell::ConnCell;
use crate::cluster::RulesLease;
use crate::router::Hooks;
use crate::rt::{Extensions, HooksFactory, MetricsSource};
use crate::stats::{DropReason, ShardStats};
use relay_plugins::records::ReadError;

/// Where one shard's events go.
enum Target {
    /// The engine of this relay.
    Local(EventSender),
    /// The engine of whichever node holds the rules lease.
    Leased(Arc<Leased>),
}

/// Feeds one shard's events to the rules engine.
pub struct RuleHooks {
    target: Target,
    stats: Arc<ShardStats>,
}

impl RuleHooks {
    fn send(&self, ev: Event) {
        let taken = match &self.target {
            Target::Local(events) => events.try_send(ev),
            Target::Leased(l) => l.deliver(ev),
        };
        if !taken {
            self.stats.dropped(DropReason::PluginQueueFull);
        }
    }
}

/// The rules engine of a cluster node with `[cluster] rules_lease`: running
/// while this node holds the lease (started when it takes it, so it loads
/// the alarms, timers and state the previous holder left in Redis), stopped
/// when it gives it up. Events of this node's shards go to it while it
/// runs, to the holder on another node otherwise.
pub struct Leased {
    cfg: relay_plugins::HostConfig,
    lease: Arc<RulesLease>,
    running: RwLock<Option<(Arc<PluginHost>, EventSender)>>,
    actions: relay_plugins::ActionSender,
    stop: AtomicBool,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Leased {
    /// The engine, while it runs on this node.
    pub fn host(&self) -> Option<Arc<PluginHost>> {
        self.running
            .read()
            .ok()
            .and_then(|r| r.as_ref().map(|(h, _)| h.clone()))
    }

    /// The lease this engine follows.
    pub fn lease(&self) -> &Arc<RulesLease> {
        &self.lease
    }

    /// An event of this node's shards; `false`: dropped by a full queue.
    fn deliver(&self, ev: Event) -> bool {
        if self.lease.is_leader()
            && let Ok(r) = self.running.read()
            && let Some((_, events)) = r.as_ref()
        {
            return events.try_send(ev);
        }
        self.lease.forward(ev);
        true
    }

    /// An event from another node, for the engine on this one.
    fn deliver_local(&self, ev: Event) -> bool {
        let Ok(r) = self.running.read() else {
            return false;
        };
        match r.as_ref() {
            Some((_, events)) => events.try_send(ev),
            None => false,
        }
    }

    /// Starts and stops the engine as the lease comes and goes.
    fn follow(self: Arc<Self>) {
        let mut retry_at = std::time::Instant::now();
        while !self.stop.load(Ordering::Relaxed) {
            std::thread::sleep(std::time::Duration::from_millis(20));
            let want = self.lease.is_leader();
            let have = self.running.read().is_ok_and(|r| r.is_some());
            if want && !have && std::time::Instant::now() >= retry_at {
                match PluginHost::start_with_actions(self.cfg.clone(), self.actions.clone()) {
                    Ok(host) => {
                        tracing::info!("rules engine started: this node holds the rules lease");
                        let events = host.events();
                        if let Ok(mut r) = self.running.write() {
                            *r = Some((Arc::new(host), events));
                        }
                    }
                    Err(e) => {
                        tracing::error!("rules engine: {e}");
                        retry_at = std::time::Instant::now() + std::time::Duration::from_secs(1);
                    }
                }
            } else if !want && have {
                self.stop_engine();
                tracing::info!("rules engine stopped: the rules lease is held elsewhere");
            }
        }
        self.stop_engine();
    }

    /// Stops the engine, flushing its sinks (the last handle to go does).
    fn stop_engine(&self) {
        let taken = self.running.write().ok().and_then(|mut r| r.take());
        if let Some((host, _)) = taken {
            match Arc::try_unwrap(host) {
                Ok(host) => host.shutdown(),
                // An API call holds it: it stops when that call drops it.
                Err(host) => drop(host),
            }
        }
    }

    /// Stops following the lease and the engine (at the relay's exit).
    pub fn shutdown(&self) {
        self.stop.store(true, Ordering::Relaxed);
        let t = self.thread.lock().ok().and_then(|mut t| t.take());
        if let Some(t) = t {
            let _ = t.join();
        }
        self.stop_engine();
    }
}

/// Where the API finds the engine.
#[derive(Clone)]
enum HostRef {
    Fixed(Arc<PluginHost>),
    Leased(Arc<Leased>),
}

impl HostRef {
    fn get(&self) -> Option<Arc<PluginHost>> {
        match self {
            HostRef::Fixed(h) => Some(h.clone()),
            HostRef::Leased(l) => l.host(),
        }
    }
}

fn client_info(cell: &ConnCell, shard: usize, now: Now) -> ClientInfo {
    let conn = cell.conn.borrow();
    let s = cell.session.borrow();
    ClientInfo {
        addr: name_str(conn.addr()).into_owned(),
        role: conn.role().name().to_owned(),
        meta: serde_json::from_slice(&s.meta()).unwrap_or(json!({})),
        remote: s.remote.to_string(),
        shard,
        time_ms: now.wall_ms,
        groups: s
            .list(crate::cell::Membership::Group)
            .iter()
            .filter(|g| !g.starts_with(crate::router::WATCH_PREFIX))
            .map(|g| name_str(g).into_owned())
            .collect(),
    }
}

impl Hooks for RuleHooks {
    fn connected(&self, cell: &ConnCell, shard: usize, now: Now) {
        self.send(Event::Connect(client_info(cell, shard, now)));
    }

    fn disconnected(&self, cell: &ConnCell, shard: usize, reason: CloseReason, now: Now) {
        let reason = match reason {
            CloseReason::PeerClosed | CloseReason::ProtocolError | CloseReason::SlowConsumer => {
                "error"
            }
            CloseReason::HelloTimeout | CloseReason::IdleTimeout => "idle_timeout",
            CloseReason::Unauthorized => "error",
            other => other.name(),
        };
        self.send(Event::Disconnect(
            client_info(cell, shard, now),
            reason.to_owned(),
        ));
    }

    fn message(&self, frame: &Frame, group: bool, now: Now) {
        self.send(Event::Message(MessageEvent {
            src: name_str(&frame.src).into_owned(),
            dst: if group {
                String::new()
            } else {
                name_str(&frame.dst).into_owned()
            },
            group: group.then(|| name_str(&frame.dst).into_owned()),
            payload: frame.payload.clone(),
            json: frame.flags.json(),
            time_ms: now.wall_ms,
        }));
    }
}

/// Answers the API's alarm and shadow routes.
pub struct RulesApi {
    host: HostRef,
    pub mysql: relay_config::plugins::MysqlConfig,
    /// History queries running now (each on its own thread), bounded.
    running: Arc<std::sync::atomic::AtomicUsize>,
}

/// Most alarm-history queries running at once.
const MAX_HISTORY_QUERIES: usize = 4;

impl RulesApi {
    /// Runs a MySQL read on a thread of its own (at most `MAX_HISTORY_QUERIES` at
    /// once, with the history queries) and answers on the returned channel.
    fn read<T, F, Fut>(
        &self,
        f: F,
        shape: impl FnOnce(T) -> Value + Send + 'static,
    ) -> async_channel::Receiver<Result<Value, ReadError>>
    where
        T: Send + 'static,
        F: FnOnce() -> Fut + Send + 'static,
        Fut: std::future::Future<Output = Result<T, ReadError>>,
    {
        use std::sync::atomic::Ordering::SeqCst;
        let (tx, rx) = async_channel::bounded(1);
        if !self.mysql.enabled {
            let _ = tx.try_send(Err(ReadError::Unavailable(
                "this needs [mysql] enabled = true".into(),
            )));
            return rx;
        }
        if self.running.fetch_add(1, SeqCst) >= MAX_HISTORY_QUERIES {
            self.running.fetch_sub(1, SeqCst);
            let _ = tx.try_send(Err(ReadError::Unavailable(
                "too many MySQL queries running; try again".into(),
            )));
            return rx;
        }
        let running = self.running.clone();
        let guard = Running(running);
        relay_plugins::records::in_background(f, move |r| {
            drop(guard);
            let _ = tx.try_send(r.map(shape));
        });
        rx
    }
}

/// Counts one running query until dropped (also when its thread never started).
struct Running(Arc<std::sync::atomic::AtomicUsize>);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

impl PluginApi for RulesApi {
    fn alarms(&self, f: &relay_plugins::AlarmFilter, after: Option<&str>, limit: usize) -> Value {
        self.host
            .get()
            .and_then(|h| serde_json::to_value(h.alarms_filtered(f, after, limit)).ok())
            .unwrap_or(json!({"items": [], "next": null, "total": 0}))
    }

    fn clear(&self, key: &str, by: &str) -> bool {
        self.host.get().is_some_and(|h| h.clear(key, by))
    }

    fn reload_notify(&self, notify: &relay_config::plugins::NotifyConfig) {
        if let Some(h) = self.host.get() {
            h.reload_notify(notify);
        }
    }

    fn shelve(&self, key: &str, by: &str, for_ms: u64) -> Option<Value> {
        self.host
            .get()?
            .shelve(key, by, for_ms)
            .ok()
            .and_then(|v| serde_json::to_value(v).ok())
    }

    fn ack_many(&self, keys: Option<&[String]>, f: &relay_plugins::AlarmFilter, by: &str) -> Value {
        self.host
            .get()
            .and_then(|h| serde_json::to_value(h.ack_many(keys, f, by)).ok())
            .unwrap_or(json!({"acked": 0, "already": 0, "not_found": keys.unwrap_or_default()}))
    }

    fn notifications(
        &self,
        f: relay_plugins::records::NotifyFilter,
        limit: usize,
        before_id: Option<u64>,
    ) -> async_channel::Receiver<Result<Value, ReadError>> {
        let cfg = self.mysql.clone();
        self.read(
            move || async move {
                relay_plugins::records::notifications(&cfg, &f, limit, before_id).await
            },
            |(items, next)| json!({"items": items, "next": next}),
        )
    }

    fn series(
        &self,
        addr: &str,
        q: SeriesQuery,
    ) -> async_channel::Receiver<Result<Value, ReadError>> {
        let cfg = self.mysql.clone();
        let addr = addr.to_string();
        self.read(
            move || async move {
                relay_plugins::records::device_series(
                    &cfg,
                    &addr,
                    q.table.as_deref(),
                    q.field.as_deref(),
                    q.since_ms,
                    q.limit,
                )
                .await
            },
            |v| v,
        )
    }

    fn ack(&self, key: &str, by: &str) -> Option<Value> {
        self.host
            .get()?
            .ack(key, by)
            .ok()
            .and_then(|v| serde_json::to_value(v).ok())
    }

    fn state(&self, addr: &str) -> Value {
        Value::Object(self.host.get().map(|h| h.state(addr)).unwrap_or_default())
    }

    fn devices(&self, q: &relay_plugins::registry::DeviceQuery) -> Value {
        self.host
            .get()
            .and_then(|h| serde_json::to_value(h.devices(q)).ok())
            .unwrap_or(json!({"items": []}))
    }

    fn device(&self, addr: &str) -> Option<Value> {
        self.host
            .get()?
            .device(addr)
            .and_then(|d| serde_json::to_value(d).ok())
    }

    fn history(
        &self,
        limit: usize,
        before_id: Option<u64>,
    ) -> async_channel::Receiver<Result<Value, String>> {
        use std::sync::atomic::Ordering::SeqCst;
        let (tx, rx) = async_channel::bounded(1);
        if !self.mysql.enabled {
            let _ = tx.try_send(Err("alarm history needs [mysql] enabled = true".into()));
            return rx;
        }
        if self.running.fetch_add(1, SeqCst) >= MAX_HISTORY_QUERIES {
            self.running.fetch_sub(1, SeqCst);
            let _ = tx.try_send(Err("too many history queries running; try again".into()));
            return rx;
        }
        let running = self.running.clone();
        relay_plugins::history::alarm_history_in_background(
            self.mysql.clone(),
            limit,
            before_id,
            move |r| {
                running.fetch_sub(1, SeqCst);
                let _ = tx.try_send(r.map(|(items, next)| json!({"items": items, "next": next})));
            },
        );
        rx
    }
}

/// Starts the rules engine for `cfg` and returns the relay extensions that
/// connect it, the host (to shut down after the relay) and the action channel
/// the shards drain.
pub fn attach(
    cfg: &relay_config::Config,
) -> Result<(Extensions, Arc<PluginHost>), relay_plugins::PluginError> {
    let (host, actions) = PluginHost::start(cfg)?;
    let host = Arc::new(host);
    let events = host.events();
    let hooks: HooksFactory = Some(Arc::new(move |_shard, stats| {
        Box::new(RuleHooks {
            target: Target::Local(events.clone()),
            stats,
        }) as Box<dyn Hooks>
    }));
    let ext = extensions(cfg, HostRef::Fixed(host.clone()), hooks, actions);
    Ok((ext, host))
}

/// Starts a cluster node's rules engine behind the rules lease
/// (`[cluster] rules_lease`): it runs while this node holds the lease.
/// Returns the relay extensions (with the lease for the cluster link) and
/// the handle to shut it down after the relay.
pub fn attach_leased(
    cfg: &relay_config::Config,
) -> Result<(Extensions, Arc<Leased>), relay_plugins::PluginError> {
    let mut host_cfg = relay_plugins::HostConfig::from_config(cfg);
    let problems = host_cfg.problems();
    if !problems.is_empty() {
        return Err(relay_plugins::PluginError::Config(problems));
    }
    host_cfg.keep_presence = true;
    let (actions_tx, actions) = relay_plugins::actions::channel(cfg.plugins.actions_queue);
    let lease = Arc::new(RulesLease::new(cfg.cluster.channel_capacity));
    let leased = Arc::new(Leased {
        cfg: host_cfg,
        lease: lease.clone(),
        running: RwLock::new(None),
        actions: actions_tx,
        stop: AtomicBool::new(false),
        thread: Mutex::new(None),
    });
    let weak = Arc::downgrade(&leased);
    lease.set_feed(Box::new(move |ev| {
        weak.upgrade().is_some_and(|l| l.deliver_local(ev))
    }));
    let follower = leased.clone();
    let t = std::thread::Builder::new()
        .name("relay-rules-lease".into())
        .spawn(move || follower.follow())
        .map_err(|e| relay_plugins::PluginError::Thread("rules lease", e.to_string()))?;
    if let Ok(mut slot) = leased.thread.lock() {
        *slot = Some(t);
    }
    let l = leased.clone();
    let hooks: HooksFactory = Some(Arc::new(move |_shard, stats| {
        Box::new(RuleHooks {
            target: Target::Leased(l.clone()),
            stats,
        }) as Box<dyn Hooks>
    }));
    let mut ext = extensions(cfg, HostRef::Leased(leased.clone()), hooks, actions);
    ext.rules_lease = Some(lease);
    Ok((ext, leased))
}

fn extensions(
    cfg: &relay_config::Config,
    host: HostRef,
    hooks: HooksFactory,
    actions: relay_plugins::ActionReceiver,
) -> Extensions {
    let metrics_ref = host.clone();
    let metrics: MetricsSource = Some(Arc::new(move || {
        // A node without the rules lease runs no engine: no engine counters.
        let Some(metrics_host) = metrics_ref.get() else {
            return Vec::new();
        };
        let s = metrics_host.stats();
        vec![
            (
                "relay_rules_events_total".into(),
                "Events accepted by the rules engine.".into(),
                s.events_in,
            ),
            (
                "relay_rules_events_dropped_total".into(),
                "Events dropped: a worker queue was full.".into(),
                s.events_dropped,
            ),
            (
                "relay_rules_actions_total".into(),
                "Sends and publishes made by rules.".into(),
                s.actions_out,
            ),
            (
                "relay_rules_errors_total".into(),
                "Hook calls that ended in an error.".into(),
                s.script_errors,
            ),
            (
                "relay_rules_limit_trips_total".into(),
                "Hook calls stopped by a sandbox limit.".into(),
                s.limit_trips,
            ),
            (
                "relay_rules_reloads_total".into(),
                "Successful rule reloads.".into(),
                s.reloads,
            ),
            (
                "relay_rules_reload_failures_total".into(),
                "Rule files that failed to compile on reload.".into(),
                s.reload_failures,
            ),
            (
                "relay_sink_writes_total".into(),
                "Writes applied to Redis or MySQL.".into(),
                s.sink_writes,
            ),
            (
                "relay_sink_spooled_total".into(),
                "Writes spooled to disk while a sink was down.".into(),
                s.sink_spooled,
            ),
            (
                "relay_sink_replayed_total".into(),
                "Spooled writes replayed.".into(),
                s.sink_replayed,
            ),
            (
                "relay_notify_attempts_total".into(),
                "Notifier attempts.".into(),
                s.notify_attempts,
            ),
            (
                "relay_notify_failures_total".into(),
                "Notifier attempts that failed.".into(),
                s.notify_failures,
            ),
            (
                "relay_notify_rate_limited_total".into(),
                "Notifications held back by a per-target rate limit.".into(),
                s.notify_rate_limited,
            ),
            (
                "relay_rules_actions_dropped_total".into(),
                "Rule actions dropped: the action channel was full.".into(),
                s.actions_dropped,
            ),
            (
                "relay_spool_dropped_total".into(),
                "Writes lost because the spool was full.".into(),
                s.spool_dropped,
            ),
            (
                "relay_sink_rejected_total".into(),
                "Writes a sink refused for good (bad data).".into(),
                s.sink_rejected,
            ),
            (
                "relay_registry_devices".into(),
                "Devices in the registry (every address seen, within its bounds).".into(),
                metrics_host.device_totals().devices as u64,
            ),
            (
                "relay_registry_online".into(),
                "Registry devices online now.".into(),
                metrics_host.device_totals().online as u64,
            ),
            (
                "relay_registry_forgotten_total".into(),
                "Devices the registry forgot: registry_max_devices or registry_retention_days."
                    .into(),
                metrics_host.registry_counters().0,
            ),
            (
                "relay_registry_refused_total".into(),
                "New devices not recorded: registry full of online devices.".into(),
                metrics_host.registry_counters().1,
            ),
            (
                "relay_alarms_active".into(),
                "Alarms raised and not cleared.".into(),
                s.alarms_active,
            ),
            (
                "relay_alarms_untracked_total".into(),
                "Alarms recorded but not tracked: max_alarms was reached.".into(),
                s.alarms_untracked,
            ),
        ]
    }));
    Extensions {
        plugins: Some(Arc::new(RulesApi {
            host,
            mysql: cfg.mysql.clone(),
            running: Arc::default(),
        })),
        hooks,
        plugin_metrics: metrics,
        actions: Some(actions),
        inherited: None,
        rules_lease: None,
    }
}
