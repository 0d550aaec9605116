//! The bridge between the shards and the rules engine (`relay-plugins`):
//! session and message events go out with a `try_send` that never blocks a
//! shard (a full queue drops the event and counts it), and the API's alarm
//! and device-shadow routes are answered from the engine's shared state.

use std::sync::Arc;

use relay_core::conn::{CloseReason, Now};
use relay_core::frame::Frame;
use relay_core::name::name_str;
use relay_plugins::{ClientInfo, Event, EventSender, MessageEvent, PluginHost};
use serde_json::{Value, json};

use crate::api::{PluginApi, SeriesQuery};
use crate::cell::ConnCell;
use crate::router::Hooks;
use crate::rt::{Extensions, HooksFactory, MetricsSource};
use crate::stats::{DropReason, ShardStats};
use relay_plugins::records::ReadError;

/// Feeds one shard's events to the rules engine.
pub struct RuleHooks {
    events: EventSender,
    stats: Arc<ShardStats>,
}

impl RuleHooks {
    fn send(&self, ev: Event) {
        if !self.events.try_send(ev) {
            self.stats.dropped(DropReason::PluginQueueFull);
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
    pub host: Arc<PluginHost>,
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
        serde_json::to_value(self.host.alarms_filtered(f, after, limit))
            .unwrap_or(json!({"items": [], "next": null}))
    }

    fn clear(&self, key: &str, by: &str) -> bool {
        self.host.clear(key, by)
    }

    fn reload_notify(&self, notify: &relay_config::plugins::NotifyConfig) {
        self.host.reload_notify(notify);
    }

    fn shelve(&self, key: &str, by: &str, for_ms: u64) -> Option<Value> {
        self.host
            .shelve(key, by, for_ms)
            .ok()
            .and_then(|v| serde_json::to_value(v).ok())
    }

    fn ack_many(&self, keys: Option<&[String]>, f: &relay_plugins::AlarmFilter, by: &str) -> Value {
        serde_json::to_value(self.host.ack_many(keys, f, by)).unwrap_or(json!({}))
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
            .ack(key, by)
            .ok()
            .and_then(|v| serde_json::to_value(v).ok())
    }

    fn state(&self, addr: &str) -> Value {
        Value::Object(self.host.state(addr))
    }

    fn devices(&self, q: &relay_plugins::registry::DeviceQuery) -> Value {
        serde_json::to_value(self.host.devices(q)).unwrap_or(json!({"items": []}))
    }

    fn device(&self, addr: &str) -> Option<Value> {
        self.host
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
            events: events.clone(),
            stats,
        }) as Box<dyn Hooks>
    }));
    let metrics_host = host.clone();
    let metrics: MetricsSource = Some(Arc::new(move || {
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
    let ext = Extensions {
        plugins: Some(Arc::new(RulesApi {
            host: host.clone(),
            mysql: cfg.mysql.clone(),
            running: Arc::default(),
        })),
        hooks,
        plugin_metrics: metrics,
        actions: Some(actions),
        inherited: None,
    };
    Ok((ext, host))
}
