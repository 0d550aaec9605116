//! State every worker, the sink thread and the host handle see: the alarm book,
//! the device-shadow and counter cache, the declared tables, and the counters
//! behind `PluginStats`.
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use relay_config::plugins::{ColumnType, MysqlConfig, NotifyConfig, PluginsConfig};
use serde::Serialize;
use serde_json::{Map, Value};

use crate::alarm::AlarmBook;

/// Counters shown by `/metrics` and the console.
#[derive(Debug, Default)]
pub struct Stats {
    pub events_in: AtomicU64,
    pub events_dropped: AtomicU64,
    pub actions_out: AtomicU64,
    pub actions_dropped: AtomicU64,
    pub script_errors: AtomicU64,
    pub limit_trips: AtomicU64,
    pub reloads: AtomicU64,
    pub reload_failures: AtomicU64,
    pub sink_writes: AtomicU64,
    pub sink_spooled: AtomicU64,
    pub sink_replayed: AtomicU64,
    pub sink_rejected: AtomicU64,
    pub spool_dropped: AtomicU64,
    pub persist_skipped: AtomicU64,
    pub notify_attempts: AtomicU64,
    pub notify_failures: AtomicU64,
    pub notify_rate_limited: AtomicU64,
}

/// A snapshot of the plugin counters.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PluginStats {
    /// Events accepted from the shards.
    pub events_in: u64,
    /// Events dropped because a worker queue was full.
    pub events_dropped: u64,
    /// Actions (send, publish) handed to the shards.
    pub actions_out: u64,
    /// Actions dropped because the action channel was full.
    pub actions_dropped: u64,
    /// Hook calls that ended in an error (limit trips included).
    pub script_errors: u64,
    /// Hook calls stopped by a sandbox limit.
    pub limit_trips: u64,
    /// Successful script reloads.
    pub reloads: u64,
    /// Script files that failed to compile on reload (old version kept).
    pub reload_failures: u64,
    /// Writes applied to Redis or MySQL.
    pub sink_writes: u64,
    /// Writes that went to the disk spool because a sink was down.
    pub sink_spooled: u64,
    /// Spooled writes replayed into their sink.
    pub sink_replayed: u64,
    /// Writes the sink refused for good (bad data); logged and dropped.
    pub sink_rejected: u64,
    /// Writes lost because the spool was full (`spool_max_bytes`).
    pub spool_dropped: u64,
    /// `persist` calls while MySQL is off.
    pub persist_skipped: u64,
    /// Notifier attempts (HTTP requests and log lines).
    pub notify_attempts: u64,
    /// Notifier attempts that failed.
    pub notify_failures: u64,
    /// Notifications refused by a per-target rate limit.
    pub notify_rate_limited: u64,
    /// Active alarms now.
    pub alarms_active: u64,
    /// Alarms recorded but not tracked because the book was full (`max_alarms`).
    pub alarms_untracked: u64,
}

/// Latest values of devices and counters, mirrored to Redis.
#[derive(Debug, Default)]
pub struct StateCache {
    /// Device shadow: address → field → value.
    pub shadows: HashMap<String, Map<String, Value>>,
    /// Counters by key.
    pub counters: HashMap<String, i64>,
}

/// Everything shared between threads of one host.
#[derive(Debug)]
pub struct Shared {
    /// Active alarms and timers.
    pub alarms: Mutex<AlarmBook>,
    /// Device shadow and counters.
    pub state: RwLock<StateCache>,
    /// Counters.
    pub stats: Stats,
    /// Declared tables: name → columns.
    pub tables: HashMap<String, Vec<(String, ColumnType)>>,
    /// MySQL is on, so `persist` writes rows (off: counted and skipped).
    pub mysql_enabled: bool,
    /// Check `persist` against declared tables even when MySQL is off (dry runs with a config).
    pub strict_tables: bool,
    /// Channel names `notify()` accepts (replaced on a notifier reload).
    pub channels: RwLock<HashSet<String>>,
    /// Notifier settings from a reload, for the sink to take on its next tick.
    pub notify_next: Mutex<Option<NotifyConfig>>,
    /// Cap on addresses in the shadow cache.
    pub max_state_addrs: usize,
    /// Wakes the alarm clock after a script touched alarms.
    pub clock_kick: tokio::sync::Notify,
    /// Every device seen (the workers keep it up to date).
    pub registry: Arc<crate::registry::Registry>,
}

/// The channel names `notify()` accepts under `notify`: every notifier, and `log`.
fn channels_of(notify: &NotifyConfig) -> HashSet<String> {
    let mut channels: HashSet<String> = notify.notifier.iter().map(|n| n.name.clone()).collect();
    channels.insert("log".into());
    channels
}

impl Shared {
    /// Takes new notifier and route settings: alarms raised from now on follow
    /// the new routes (active ones keep the chain they started), scripts may
    /// name the new notifiers at once, and the sink swaps its notifiers on its
    /// next tick (deliveries under way finish with the old ones).
    pub fn reload_notify(&self, notify: &NotifyConfig) {
        self.book().set_routes(notify);
        if let Ok(mut c) = self.channels.write() {
            *c = channels_of(notify);
        }
        if let Ok(mut n) = self.notify_next.lock() {
            *n = Some(notify.clone());
        }
        self.clock_kick.notify_one();
    }

    /// Shared state for one host (or one dry run).
    pub fn new(plugins: &PluginsConfig, mysql: &MysqlConfig, notify: &NotifyConfig) -> Arc<Shared> {
        let tables = mysql
            .tables
            .iter()
            .map(|t| {
                (
                    t.name.clone(),
                    t.columns.iter().map(|c| (c.name.clone(), c.kind)).collect(),
                )
            })
            .collect();
        let channels = channels_of(notify);
        Arc::new(Shared {
            alarms: Mutex::new(AlarmBook::new(notify, plugins.max_alarms)),
            state: RwLock::new(StateCache::default()),
            stats: Stats::default(),
            tables,
            mysql_enabled: mysql.enabled,
            strict_tables: mysql.enabled,
            channels: RwLock::new(channels),
            notify_next: Mutex::new(None),
            max_state_addrs: plugins.max_state_addrs,
            clock_kick: tokio::sync::Notify::new(),
            registry: Arc::new(crate::registry::Registry::new(plugins)),
        })
    }

    /// The alarm book, recovering from a poisoned lock (a panic elsewhere must not
    /// stop alarms).
    pub fn book(&self) -> MutexGuard<'_, AlarmBook> {
        self.alarms.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reads the state cache.
    pub fn state_read(&self) -> std::sync::RwLockReadGuard<'_, StateCache> {
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Writes the state cache.
    pub fn state_write(&self) -> std::sync::RwLockWriteGuard<'_, StateCache> {
        self.state.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds one to a counter.
    pub fn count(&self, c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// A snapshot of the counters.
    pub fn snapshot(&self) -> PluginStats {
        let s = &self.stats;
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let (alarms_active, alarms_untracked) = {
            let book = self.book();
            (book.active_count() as u64, book.untracked_count())
        };
        PluginStats {
            events_in: g(&s.events_in),
            events_dropped: g(&s.events_dropped),
            actions_out: g(&s.actions_out),
            actions_dropped: g(&s.actions_dropped),
            script_errors: g(&s.script_errors),
            limit_trips: g(&s.limit_trips),
            reloads: g(&s.reloads),
            reload_failures: g(&s.reload_failures),
            sink_writes: g(&s.sink_writes),
            sink_spooled: g(&s.sink_spooled),
            sink_replayed: g(&s.sink_replayed),
            sink_rejected: g(&s.sink_rejected),
            spool_dropped: g(&s.spool_dropped),
            persist_skipped: g(&s.persist_skipped),
            notify_attempts: g(&s.notify_attempts),
            notify_failures: g(&s.notify_failures),
            notify_rate_limited: g(&s.notify_rate_limited),
            alarms_active,
            alarms_untracked,
        }
    }
}

/// Lets at most `per_sec` log lines through each second and counts those left out,
/// so a storm of alarms or notifications writes a bounded log.
#[derive(Debug)]
pub struct LogGate {
    /// Lines allowed per one-second window.
    per_sec: u32,
    /// Start of the current window (ms).
    window_ms: u64,
    /// Lines let through in the current window.
    passed: u32,
    /// Lines left out since the last summary.
    left_out: u64,
}

impl LogGate {
    /// A gate letting `per_sec` lines a second through.
    pub fn new(per_sec: u32) -> LogGate {
        LogGate {
            per_sec: per_sec.max(1),
            window_ms: 0,
            passed: 0,
            left_out: 0,
        }
    }

    /// `Some(n)`: write the line, and say that `n` were left out before it.
    pub fn pass(&mut self, now_ms: u64) -> Option<u64> {
        if now_ms.saturating_sub(self.window_ms) >= 1000 {
            self.window_ms = now_ms;
            self.passed = 0;
        }
        if self.passed >= self.per_sec {
            self.left_out += 1;
            return None;
        }
        self.passed += 1;
        Some(std::mem::take(&mut self.left_out))
    }

    /// Lines left out, once their window is over (for a summary line), else `None`.
    pub fn flush(&mut self, now_ms: u64) -> Option<u64> {
        (self.left_out > 0 && now_ms.saturating_sub(self.window_ms) >= 1000)
            .then(|| std::mem::take(&mut self.left_out))
    }
}

#[cfg(test)]
mod tests {
    use super::LogGate;

    #[test]
    fn log_gate_bounds_lines_and_counts_the_rest() {
        let mut g = LogGate::new(3);
        let passed = (0..1000).filter(|i| g.pass(i / 10).is_some()).count();
        assert_eq!(passed, 3, "three lines in the first second");
        assert_eq!(g.flush(500), None, "the window is not over");
        assert_eq!(g.flush(1000), Some(997));
        assert_eq!(g.flush(1001), None);
        assert_eq!(g.pass(1000), Some(0));
        for _ in 0..5 {
            g.pass(1001);
        }
        assert_eq!(
            g.pass(2500),
            Some(3),
            "the next line says how many were left out"
        );
    }
}
