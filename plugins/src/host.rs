//! `PluginHost`: starts the script workers, the sink thread and the rules watcher,
//! and is the handle the shards use (events in, alarms, acknowledge, device shadow,
//! counters, shutdown).
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Sender, TrySendError};
use serde_json::{Map, Value};

use crate::actions::{ActionReceiver, ActionSender};
use crate::alarm::{AckError, AlarmView};
use crate::clock::now_ms;
use crate::event::Event;
use crate::host_config::HostConfig;
use crate::script;
use crate::shared::{PluginStats, Shared};
use crate::sink::{self, SinkThread};
use crate::worker::{SourceBox, Watcher, Worker};

/// Why the host could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PluginError {
    /// The plugin sections are invalid.
    #[error("invalid plugin configuration:\n{}", .0.join("\n"))]
    Config(Vec<String>),
    /// The sink thread or its spool could not start.
    #[error(transparent)]
    Sink(#[from] sink::SinkStartError),
    /// A thread could not be spawned.
    #[error("spawning {0}: {1}")]
    Thread(&'static str, String),
    /// The SIGHUP handler could not be installed.
    #[error("installing the SIGHUP handler: {0}")]
    Signal(String),
}

/// A page of active alarms: `{"items": [...], "next": <key or null>, "total": N,
/// "totals": {...}}`.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct AlarmPage {
    /// Alarms in key order.
    pub items: Vec<AlarmView>,
    /// Cursor for the next page (`after=`), none on the last page.
    pub next: Option<String>,
    /// Alarms matching the filter, all pages.
    pub total: usize,
    /// Counts over every active alarm, whatever the filter and the page.
    pub totals: AlarmTotals,
}

/// Counts over every active alarm.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct AlarmTotals {
    /// Active alarms.
    pub active: usize,
    /// Not acknowledged.
    pub unacked: usize,
    /// Shelved now.
    pub shelved: usize,
    /// Not acknowledged and not shelved: the ones still paging someone.
    pub open: usize,
    /// Active alarms by severity.
    pub critical: usize,
    pub major: usize,
    pub minor: usize,
    pub info: usize,
}

/// Which active alarms a page or a bulk acknowledge covers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AlarmFilter {
    /// Only this severity (`critical`, `major`, `minor`, `info`).
    pub severity: Option<relay_config::plugins::Severity>,
    /// Keys starting with this.
    pub prefix: String,
    /// `Some(false)`: not acknowledged only; `Some(true)`: acknowledged only.
    pub acked: Option<bool>,
}

impl AlarmFilter {
    fn matches(&self, a: &AlarmView) -> bool {
        self.severity.is_none_or(|s| a.severity == s)
            && a.key.starts_with(&self.prefix)
            && self.acked.is_none_or(|k| a.acked_by.is_some() == k)
    }
}

/// What a bulk acknowledge did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct BulkAck {
    /// Alarms acknowledged now.
    pub acked: usize,
    /// Asked for but already acknowledged.
    pub already: usize,
    /// Keys asked for that are not active.
    pub not_found: Vec<String>,
}

/// Hands events to the workers without ever blocking.
#[derive(Debug, Clone)]
pub struct EventSender {
    /// One bounded queue per worker.
    txs: Arc<[Sender<Event>]>,
    /// Counters.
    shared: Arc<Shared>,
}

impl EventSender {
    /// Queues `event` for the worker of its address. Never blocks; `false` means the
    /// queue was full (or the host stopped) and the event was dropped and counted.
    pub fn try_send(&self, event: Event) -> bool {
        if self.txs.is_empty() {
            return true; // plugins disabled: nothing wants events
        }
        let w = Event::worker_of(event.addr(), self.txs.len());
        let stats = &self.shared.stats;
        match self.txs[w].try_send(event) {
            Ok(()) => {
                self.shared.count(&stats.events_in);
                true
            }
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.shared.count(&stats.events_dropped);
                false
            }
        }
    }
}

/// The running plugins: workers, sink thread, watcher.
#[derive(Debug)]
pub struct PluginHost {
    /// Shared state.
    shared: Arc<Shared>,
    /// Event queues.
    events: EventSender,
    /// Worker threads.
    workers: Vec<JoinHandle<()>>,
    /// Rules watcher.
    watcher: Option<JoinHandle<()>>,
    /// Sink thread.
    sink: Option<SinkThread>,
    /// Writes the device registry to Redis.
    registry: Option<crate::registry::Flusher>,
    /// Stops workers and watcher.
    stop: Arc<AtomicBool>,
    /// SIGHUP registration, removed at shutdown.
    sighup: Option<signal_hook::SigId>,
}

fn join_bounded(h: JoinHandle<()>, what: &str, within: Duration) {
    let until = Instant::now() + within;
    while !h.is_finished() && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(5));
    }
    if h.is_finished() {
        let _ = h.join();
    } else {
        tracing::error!("{what} did not stop within {within:?}; left running");
    }
}

impl PluginHost {
    /// Starts the plugins with the relay's configuration.
    pub fn start(cfg: &relay_config::Config) -> Result<(PluginHost, ActionReceiver), PluginError> {
        Self::start_with(HostConfig::from_config(cfg))
    }

    /// Starts the plugins with their four sections.
    pub fn start_with(cfg: HostConfig) -> Result<(PluginHost, ActionReceiver), PluginError> {
        let (actions_tx, actions_rx) = crate::actions::channel(cfg.plugins.actions_queue);
        let host = Self::start_with_actions(cfg, actions_tx)?;
        Ok((host, actions_rx))
    }

    /// Starts the plugins with their four sections, sending the scripts'
    /// actions on `actions_tx` (a channel that outlives this host: a relay
    /// may start and stop its rules engine while its shards keep draining
    /// one channel).
    pub fn start_with_actions(
        cfg: HostConfig,
        actions_tx: ActionSender,
    ) -> Result<PluginHost, PluginError> {
        let problems = cfg.problems();
        if !problems.is_empty() {
            return Err(PluginError::Config(problems));
        }
        let shared = Shared::new(&cfg.plugins, &cfg.mysql, &cfg.notify);
        let stop = Arc::new(AtomicBool::new(false));
        if !cfg.plugins.enabled {
            let host = PluginHost {
                events: EventSender {
                    txs: Arc::from(Vec::new()),
                    shared: shared.clone(),
                },
                shared,
                workers: Vec::new(),
                watcher: None,
                sink: None,
                registry: None,
                stop,
                sighup: None,
            };
            return Ok(host);
        }
        let (sink, loaded) = sink::start(&cfg, shared.clone())?;
        sink::restore(&shared, loaded.snapshot);
        let flusher =
            crate::registry::Flusher::start(shared.registry.clone(), &cfg.plugins, &cfg.redis)
                .map_err(|e| PluginError::Thread("device registry", e.to_string()))?;

        let dir = PathBuf::from(&cfg.plugins.dir);
        let engine = script::sandbox(&cfg.plugins);
        let sources = match script::load_dir(&engine, &dir, &[]) {
            Ok((sources, errors)) => {
                for e in errors {
                    tracing::error!(target: "relay::rules", "{e} (file not loaded)");
                    shared.count(&shared.stats.reload_failures);
                }
                sources
            }
            Err(e) => {
                tracing::warn!(target: "relay::rules", dir = %dir.display(), "rules folder not readable ({e}); no rules loaded");
                Vec::new()
            }
        };
        let names: Vec<&str> = sources.iter().map(|s| s.name.as_str()).collect();
        tracing::info!(target: "relay::rules", dir = %dir.display(), files = ?names, "rules loaded");
        let sources = Arc::new(SourceBox::new(sources));

        let mut txs = Vec::with_capacity(cfg.plugins.workers);
        let mut workers = Vec::with_capacity(cfg.plugins.workers);
        for idx in 0..cfg.plugins.workers {
            let (tx, rx) = crossbeam_channel::bounded(cfg.plugins.queue);
            txs.push(tx);
            let w = Worker {
                idx,
                rx,
                shared: shared.clone(),
                sink: sink.tx.clone(),
                actions: actions_tx.clone(),
                sources: sources.clone(),
                cfg: cfg.plugins.clone(),
                stop: stop.clone(),
            };
            let h = std::thread::Builder::new()
                .name(format!("relay-rules-{idx}"))
                .spawn(move || w.run())
                .map_err(|e| PluginError::Thread("script worker", e.to_string()))?;
            workers.push(h);
        }
        let (watcher, sighup) = if cfg.plugins.reload {
            let flag = Arc::new(AtomicBool::new(false));
            let id = signal_hook::flag::register(signal_hook::consts::SIGHUP, flag.clone())
                .map_err(|e| PluginError::Signal(e.to_string()))?;
            let w = Watcher {
                dir,
                cfg: cfg.plugins.clone(),
                sources,
                shared: shared.clone(),
                sighup: flag,
                stop: stop.clone(),
            };
            let h = std::thread::Builder::new()
                .name("relay-rules-watch".into())
                .spawn(move || w.run())
                .map_err(|e| PluginError::Thread("rules watcher", e.to_string()))?;
            (Some(h), Some(id))
        } else {
            (None, None)
        };
        let host = PluginHost {
            events: EventSender {
                txs: Arc::from(txs),
                shared: shared.clone(),
            },
            shared,
            workers,
            watcher,
            sink: Some(sink),
            registry: Some(flusher),
            stop,
            sighup,
        };
        Ok(host)
    }

    /// A handle for the shards to queue events.
    pub fn events(&self) -> EventSender {
        self.events.clone()
    }

    /// Active alarms, by key.
    pub fn alarms(&self) -> Vec<AlarmView> {
        self.shared.book().views()
    }

    /// One page of active alarms in key order: those after `after` (a key from an
    /// earlier page's `next`), at most `limit` (1 to 1000), as `GET /api/v1/alarms`
    /// returns them.
    pub fn alarms_page(&self, after: Option<&str>, limit: usize) -> AlarmPage {
        self.alarms_filtered(&AlarmFilter::default(), after, limit)
    }

    /// One page of the active alarms matching `f`, in key order, with the number
    /// matching (`total`) and the counts over every active alarm (`totals`).
    pub fn alarms_filtered(&self, f: &AlarmFilter, after: Option<&str>, limit: usize) -> AlarmPage {
        use relay_config::plugins::Severity;
        let limit = limit.clamp(1, 1000);
        let now = now_ms();
        let book = self.shared.book();
        let mut totals = AlarmTotals::default();
        let mut total = 0;
        let mut items = Vec::with_capacity(limit);
        let mut more = false;
        for a in book.views_after(None) {
            totals.active += 1;
            let shelved = a.shelved_until_ms.is_some_and(|t| t > now);
            totals.unacked += usize::from(a.acked_by.is_none());
            totals.shelved += usize::from(shelved);
            totals.open += usize::from(a.acked_by.is_none() && !shelved);
            match a.severity {
                Severity::Critical => totals.critical += 1,
                Severity::Major => totals.major += 1,
                Severity::Minor => totals.minor += 1,
                _ => totals.info += 1,
            }
            if !f.matches(&a) {
                continue;
            }
            total += 1;
            if after.is_some_and(|k| a.key.as_str() <= k) {
                continue;
            }
            if items.len() < limit {
                items.push(a);
            } else {
                more = true;
            }
        }
        let next = if more {
            items.last().map(|a| a.key.clone())
        } else {
            None
        };
        AlarmPage {
            items,
            next,
            total,
            totals,
        }
    }

    /// Ends alarm `key` on behalf of `by` (the history records who); `false` when it
    /// was not active. A rule whose condition still holds may raise it again.
    pub fn clear(&self, key: &str, by: &str) -> bool {
        let done = self.shared.book().clear_as(now_ms(), key, Some(by));
        self.shared.clock_kick.notify_one();
        done
    }

    /// Takes new `[notify]` notifiers and routes (a configuration reload):
    /// see [`Shared::reload_notify`].
    pub fn reload_notify(&self, notify: &relay_config::plugins::NotifyConfig) {
        self.shared.reload_notify(notify);
    }

    /// Shelves alarm `key` for `for_ms` (0 unshelves) on behalf of `by`: no
    /// escalation step is sent until then.
    pub fn shelve(&self, key: &str, by: &str, for_ms: u64) -> Result<AlarmView, AckError> {
        let v = self.shared.book().shelve(now_ms(), key, by, for_ms)?;
        self.shared.clock_kick.notify_one();
        Ok(v)
    }

    /// Acknowledges, on behalf of `by`, the alarms named by `keys`, or (when `keys`
    /// is `None`) every unacknowledged alarm matching `f`.
    pub fn ack_many(&self, keys: Option<&[String]>, f: &AlarmFilter, by: &str) -> BulkAck {
        let now = now_ms();
        let mut out = BulkAck::default();
        {
            let mut book = self.shared.book();
            let keys: Vec<String> = match keys {
                Some(k) => k.to_vec(),
                None => book
                    .views_after(None)
                    .filter(|a| a.acked_by.is_none() && f.matches(a))
                    .map(|a| a.key)
                    .collect(),
            };
            for k in keys {
                let before = book.get(&k).map(|a| a.acked_by.is_some());
                match (before, book.ack(now, &k, by)) {
                    (Some(true), Ok(_)) => out.already += 1,
                    (_, Ok(_)) => out.acked += 1,
                    (_, Err(_)) => out.not_found.push(k),
                }
            }
        }
        self.shared.clock_kick.notify_one();
        out
    }

    /// Acknowledges alarm `key` on behalf of `by`; its escalation chain stops.
    pub fn ack(&self, key: &str, by: &str) -> Result<AlarmView, AckError> {
        let v = self.shared.book().ack(now_ms(), key, by)?;
        self.shared.clock_kick.notify_one();
        Ok(v)
    }

    /// The device shadow of `addr` (empty when unknown).
    pub fn state(&self, addr: &str) -> Map<String, Value> {
        self.shared
            .state_read()
            .shadows
            .get(addr)
            .cloned()
            .unwrap_or_default()
    }

    /// The value of counter `key` (0 when unknown).
    pub fn counter(&self, key: &str) -> i64 {
        self.shared
            .state_read()
            .counters
            .get(key)
            .copied()
            .unwrap_or(0)
    }

    /// One page of the device registry (newest last seen first) with its totals.
    pub fn devices(&self, q: &crate::registry::DeviceQuery) -> crate::registry::DevicePage {
        self.shared.registry.page(q)
    }

    /// One device of the registry.
    pub fn device(&self, addr: &str) -> Option<crate::registry::Device> {
        self.shared.registry.get(addr)
    }

    /// The registry's counts (devices, online, offline).
    pub fn device_totals(&self) -> crate::registry::Totals {
        self.shared.registry.totals()
    }

    /// Devices the registry forgot (cap or retention) and new devices it refused
    /// (cap reached with every known device online), since start.
    pub fn registry_counters(&self) -> (u64, u64) {
        let r = &self.shared.registry;
        (
            r.forgotten.load(Ordering::Relaxed),
            r.refused.load(Ordering::Relaxed),
        )
    }

    /// The plugin counters.
    pub fn stats(&self) -> PluginStats {
        self.shared.snapshot()
    }

    /// Stops the workers (finishing queued events, bounded), the watcher, then the
    /// sink thread (flushing writes to the sinks or the spool).
    pub fn shutdown(mut self) {
        self.stop_all();
    }

    fn stop_all(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for h in self.workers.drain(..) {
            join_bounded(h, "script worker", Duration::from_secs(5));
        }
        if let Some(h) = self.watcher.take() {
            join_bounded(h, "rules watcher", Duration::from_secs(2));
        }
        if let Some(id) = self.sighup.take() {
            signal_hook::low_level::unregister(id);
        }
        if let Some(mut f) = self.registry.take() {
            f.stop();
        }
        if let Some(s) = self.sink.take() {
            s.stop.notify_one();
            join_bounded(s.handle, "sink thread", Duration::from_secs(20));
        }
    }
}

impl Drop for PluginHost {
    fn drop(&mut self) {
        self.stop_all();
    }
}
