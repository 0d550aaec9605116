//! Script worker threads and the rules-folder watcher.
//!
//! Each worker owns one `Rules` (engine and compiled scripts, never shared) and a
//! bounded queue of events for the addresses hashed to it, so a device's events are
//! handled in order. Worker 0 also calls `on_tick`. The watcher recompiles the folder
//! when a file changes or on SIGHUP and publishes the sources that compiled; workers
//! pick them up between events.
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError};
use relay_config::plugins::PluginsConfig;
use serde_json::json;

use crate::actions::ActionSender;
use crate::clock::now_ms;
use crate::effect::Effect;
use crate::event::Event;
use crate::rules::{Outcome, Rules};
use crate::script::{self, Source};
use crate::shared::Shared;
use crate::sink::SinkSender;

/// The current sources and a generation number bumped on each change.
#[derive(Debug, Default)]
pub struct SourceBox {
    /// Bumped whenever `sources` changes.
    generation: AtomicU64,
    /// The sources that compiled last.
    sources: RwLock<Arc<Vec<Source>>>,
}

impl SourceBox {
    /// A box holding `sources`.
    pub fn new(sources: Vec<Source>) -> SourceBox {
        SourceBox {
            generation: AtomicU64::new(1),
            sources: RwLock::new(Arc::new(sources)),
        }
    }

    /// The generation number.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// The current sources.
    pub fn get(&self) -> Arc<Vec<Source>> {
        self.sources
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Publishes new sources.
    pub fn set(&self, s: Vec<Source>) {
        *self.sources.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(s);
        self.generation.fetch_add(1, Ordering::AcqRel);
    }
}

/// What one worker thread needs.
pub struct Worker {
    /// Index (worker 0 runs `on_tick`).
    pub idx: usize,
    /// Its event queue.
    pub rx: Receiver<Event>,
    /// Shared state.
    pub shared: Arc<Shared>,
    /// Writes for the sink thread.
    pub sink: SinkSender,
    /// Actions for the shards.
    pub actions: ActionSender,
    /// Current scripts.
    pub sources: Arc<SourceBox>,
    /// Limits and tick period.
    pub cfg: PluginsConfig,
    /// Set at shutdown.
    pub stop: Arc<AtomicBool>,
}

/// Hands the effects of one call to the shards, the log and the sink thread.
pub fn dispatch(shared: &Shared, sink: &SinkSender, actions: &ActionSender, out: Outcome) {
    for e in out.effects {
        match e {
            Effect::Action(a) => match actions.try_send(a) {
                Ok(()) => shared.count(&shared.stats.actions_out),
                Err(_) => shared.count(&shared.stats.actions_dropped),
            },
            Effect::Log { file, text } => {
                tracing::info!(target: "relay::rules", file = %file, "{text}")
            }
            other => {
                if sink.blocking_send(other).is_err() {
                    tracing::debug!("sink thread gone; write dropped");
                }
            }
        }
    }
    if out.touched_alarms {
        shared.clock_kick.notify_one();
    }
}

/// Runs one hook call; a panic inside (a bug, never a script's doing) is logged and
/// counted as a script error instead of ending the worker thread.
fn guarded(shared: &Shared, call: impl FnOnce() -> Outcome) -> Outcome {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(call)) {
        Ok(out) => out,
        Err(p) => {
            let what = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            tracing::error!(target: "relay::rules", "hook call panicked: {what}");
            shared.count(&shared.stats.script_errors);
            Outcome::default()
        }
    }
}

impl Worker {
    /// The worker loop; returns at shutdown.
    pub fn run(self) {
        let mut rules = Rules::new(&self.cfg, self.shared.clone());
        let mut generation = self.sources.generation();
        for e in rules.load(&self.sources.get()) {
            tracing::debug!(worker = self.idx, "{e}");
        }
        let tick = (self.idx == 0 && self.cfg.tick_s > 0.0)
            .then(|| Duration::from_secs_f64(self.cfg.tick_s));
        let mut next_tick = tick.map(|t| Instant::now() + t);
        let mut stop_deadline: Option<Instant> = None;
        let refresh = |rules: &mut Rules, generation: &mut u64| {
            let g = self.sources.generation();
            if g != *generation {
                *generation = g;
                for e in rules.load(&self.sources.get()) {
                    tracing::debug!(worker = self.idx, "{e}");
                }
            }
        };
        loop {
            refresh(&mut rules, &mut generation);
            if self.stop.load(Ordering::Relaxed) {
                // Finish what is queued, within a bound, then leave.
                let deadline =
                    *stop_deadline.get_or_insert_with(|| Instant::now() + Duration::from_secs(2));
                match self.rx.try_recv() {
                    Ok(ev) if Instant::now() < deadline => self.handle(&mut rules, ev),
                    _ => break,
                }
                continue;
            }
            let mut wait = Duration::from_millis(200);
            if let Some(t) = next_tick {
                wait = wait.min(t.saturating_duration_since(Instant::now()));
            }
            match self.rx.recv_timeout(wait) {
                Ok(ev) => {
                    // Scripts published while waiting apply to this event already.
                    refresh(&mut rules, &mut generation);
                    self.handle(&mut rules, ev)
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
            if let (Some(t), Some(period)) = (next_tick, tick)
                && Instant::now() >= t
            {
                let now = now_ms();
                let out = guarded(&self.shared, || rules.tick(now));
                dispatch(&self.shared, &self.sink, &self.actions, out);
                let next = t + period;
                next_tick = Some(if next < Instant::now() {
                    Instant::now() + period
                } else {
                    next
                });
            }
        }
    }

    fn handle(&self, rules: &mut Rules, ev: Event) {
        let now = now_ms();
        match &ev {
            Event::Connect(c) => {
                self.shared.registry.connected(c);
                // A device that names its group in HELLO meta (`"group": "site-3"`)
                // lets incident digests tell which share of the group they cover.
                if let Some(g) = c.meta.get("group").and_then(|g| g.as_str())
                    && !g.is_empty()
                    && g.len() <= 64
                {
                    self.shared.book().note_group(&c.addr, g);
                }
                let info = json!({"role": c.role, "remote": c.remote, "shard": c.shard, "since_ms": c.time_ms});
                let _ = self.sink.blocking_send(Effect::Presence {
                    addr: c.addr.clone(),
                    info: Some(info),
                });
            }
            Event::Disconnect(c, reason) => {
                self.shared.registry.disconnected(c, reason);
                let _ = self.sink.blocking_send(Effect::Presence {
                    addr: c.addr.clone(),
                    info: None,
                });
            }
            Event::Message(m) => self.shared.registry.seen(&m.src, m.time_ms),
        }
        let out = guarded(&self.shared, || rules.handle(now, &ev));
        dispatch(&self.shared, &self.sink, &self.actions, out);
    }
}

/// Watches the rules folder and publishes sources that compile.
pub struct Watcher {
    /// Rules folder.
    pub dir: PathBuf,
    /// Limits (compiles with the workers' settings).
    pub cfg: PluginsConfig,
    /// Where sources are published.
    pub sources: Arc<SourceBox>,
    /// Counters.
    pub shared: Arc<Shared>,
    /// Set by the SIGHUP handler.
    pub sighup: Arc<AtomicBool>,
    /// Set at shutdown.
    pub stop: Arc<AtomicBool>,
}

impl Watcher {
    /// Polls the folder every `reload_poll_ms` until stopped.
    pub fn run(self) {
        let engine = script::sandbox(&self.cfg);
        let mut seen = script::list_dir(&self.dir).ok();
        let poll = Duration::from_millis(self.cfg.reload_poll_ms);
        while !self.stop.load(Ordering::Relaxed) {
            let until = Instant::now() + poll;
            while Instant::now() < until
                && !self.stop.load(Ordering::Relaxed)
                && !self.sighup.load(Ordering::Relaxed)
            {
                std::thread::sleep(Duration::from_millis(20).min(poll));
            }
            if self.stop.load(Ordering::Relaxed) {
                break;
            }
            let hup = self.sighup.swap(false, Ordering::Relaxed);
            let now = script::list_dir(&self.dir).ok();
            if now == seen && !hup {
                continue;
            }
            seen = now;
            self.reload(&engine);
        }
    }

    /// Recompiles the folder; files that fail keep their previous version.
    pub fn reload(&self, engine: &rhai::Engine) {
        let prev = self.sources.get();
        match script::load_dir(engine, &self.dir, &prev) {
            Ok((next, errors)) => {
                for e in &errors {
                    tracing::error!(target: "relay::rules", "reload: {e} (previous version kept)");
                    self.shared.count(&self.shared.stats.reload_failures);
                }
                if next != *prev {
                    let names: Vec<&str> = next.iter().map(|s| s.name.as_str()).collect();
                    tracing::info!(target: "relay::rules", files = ?names, "rules reloaded");
                    self.sources.set(next);
                    self.shared.count(&self.shared.stats.reloads);
                }
            }
            Err(e) => {
                tracing::error!(target: "relay::rules", dir = %self.dir.display(), "reload: {e}")
            }
        }
    }
}
