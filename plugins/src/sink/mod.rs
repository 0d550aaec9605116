//! The sink thread: one tokio current-thread runtime running the Redis and MySQL
//! writers, the notifiers and the alarm clock.
//!
//! Each writer applies writes in order. While its sink is down, writes go to the
//! sink's disk spool, and from then on every write goes behind them, so order holds;
//! once the sink is back the spool is replayed, then writes flow directly again.
//! Each write has a sequence number that the sink uses to apply it once.
pub mod mysql;
pub mod redis;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use relay_config::plugins::MysqlConfig;
use serde_json::Value;
use tokio::sync::mpsc;

use crate::alarm::{Alarm, Watch};
use crate::effect::Effect;
use crate::host_config::HostConfig;
use crate::notify::{Attempt, Notifier, log_attempt};
use crate::shared::{LogGate, Shared};
use crate::spool::{Spool, SpoolError};
use mysql::{MysqlBackend, MysqlOp};
use redis::{RedisBackend, RedisOp, Snapshot};

/// Why a sink write did not happen.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BackendError {
    /// The sink is unreachable or timed out: keep the write and retry later.
    #[error("sink down: {0}")]
    Down(String),
    /// The sink refused the write itself (bad data): retrying cannot help.
    #[error("write refused: {0}")]
    Rejected(String),
}

/// A store that writes can be applied to.
pub trait Backend {
    /// `redis` or `mysql`.
    fn name(&self) -> &'static str;
    /// Whether a connection is up.
    fn connected(&self) -> bool;
    /// Drops the connection after an error.
    fn disconnect(&mut self);
    /// Connects (and prepares tables).
    fn connect(&mut self) -> impl Future<Output = Result<(), BackendError>>;
    /// The highest sequence number the store has applied, when it tracks one.
    fn applied_upto(&mut self) -> impl Future<Output = Result<Option<u64>, BackendError>>;
    /// Applies one serialized write.
    fn apply(&mut self, seq: u64, op: &[u8]) -> impl Future<Output = Result<(), BackendError>>;
    /// Called whenever the sink is up with an empty spool (every write so far applied).
    fn caught_up(&mut self) -> impl Future<Output = ()> {
        async {}
    }
}

/// Most notifier requests in flight at once (each holds a blocking-pool thread while
/// it waits for the provider); more wait their turn.
pub const NOTIFY_IN_FLIGHT: usize = 16;

/// Writes waiting for the sink thread (from workers, the clock and the host).
pub type SinkSender = mpsc::Sender<Effect>;

/// One writer: its backend, its spool, and where its writes come from.
struct Writer<B: Backend> {
    backend: B,
    spool: Spool,
    rx: mpsc::Receiver<Vec<u8>>,
    shared: Arc<Shared>,
    retry: Duration,
    next_try: Instant,
    /// Set at shutdown: stop reconnecting, spool what is left.
    closing: Arc<AtomicBool>,
    /// The last connect error logged and when: the same error is logged again at
    /// most once a minute, not on every retry.
    last_warn: Option<(String, Instant)>,
}

/// How often the same connect error is logged again while a sink stays down.
const REPEAT_WARN: Duration = Duration::from_secs(60);

impl<B: Backend> Writer<B> {
    fn spool_write(&mut self, seq: u64, op: &[u8]) {
        let stats = &self.shared.stats;
        match self.spool.append(seq, op) {
            Ok(()) => self.shared.count(&stats.sink_spooled),
            Err(e @ SpoolError::Full(..)) => {
                self.shared.count(&stats.spool_dropped);
                tracing::error!(sink = self.backend.name(), "{e}; write dropped");
            }
            Err(e) => {
                self.shared.count(&stats.spool_dropped);
                tracing::error!(sink = self.backend.name(), "{e}; write dropped");
            }
        }
    }

    fn sync(&mut self) {
        if let Err(e) = self.spool.sync() {
            tracing::error!(sink = self.backend.name(), "{e}");
        }
    }

    async fn try_connect(&mut self) {
        if self.backend.connected()
            || Instant::now() < self.next_try
            || self.closing.load(Ordering::Relaxed)
        {
            return;
        }
        match self.backend.connect().await {
            Ok(()) => {
                self.last_warn = None;
                tracing::info!(sink = self.backend.name(), "connected")
            }
            Err(e) => {
                let text = e.to_string();
                let now = Instant::now();
                let repeat = self
                    .last_warn
                    .as_ref()
                    .is_some_and(|(t, at)| *t == text && now.duration_since(*at) < REPEAT_WARN);
                if repeat {
                    tracing::debug!(sink = self.backend.name(), "{text}");
                } else {
                    tracing::warn!(
                        sink = self.backend.name(),
                        "{text} (retrying every {:?})",
                        self.retry
                    );
                    self.last_warn = Some((text, now));
                }
                self.next_try = now + self.retry;
            }
        }
    }

    fn went_down(&mut self, e: &BackendError) {
        tracing::warn!(sink = self.backend.name(), "{e}; spooling writes");
        self.backend.disconnect();
        self.next_try = Instant::now() + self.retry;
    }

    /// Replays the spool while the sink is up; returns when it is empty or the sink fails.
    async fn replay(&mut self) -> Result<(), SpoolError> {
        let applied = match self.backend.applied_upto().await {
            Ok(a) => a,
            Err(e) => {
                self.went_down(&e);
                return Ok(());
            }
        };
        while !self.spool.is_empty() && self.backend.connected() {
            let batch = self.spool.peek(256)?;
            if batch.is_empty() {
                break;
            }
            let mut done = None;
            for r in batch {
                if applied.is_some_and(|a| r.seq <= a) {
                    done = Some(r.end);
                    continue;
                }
                match self.backend.apply(r.seq, &r.payload).await {
                    Ok(()) => self.shared.count(&self.shared.stats.sink_replayed),
                    Err(BackendError::Rejected(e)) => {
                        self.shared.count(&self.shared.stats.sink_rejected);
                        tracing::error!(
                            sink = self.backend.name(),
                            seq = r.seq,
                            "{e}; write dropped"
                        );
                    }
                    Err(e) => {
                        self.went_down(&e);
                        break;
                    }
                }
                done = Some(r.end);
            }
            if let Some(end) = done {
                self.spool.advance(end)?;
            }
        }
        if self.spool.is_empty() {
            tracing::info!(sink = self.backend.name(), "spool replayed");
        }
        Ok(())
    }

    /// Applies writes until the channel closes.
    async fn run(mut self) {
        loop {
            if self.backend.connected() && self.spool.is_empty() {
                self.backend.caught_up().await;
            }
            if !self.spool.is_empty() {
                self.try_connect().await;
                if self.backend.connected() && !self.closing.load(Ordering::Relaxed) {
                    // Writes that arrived meanwhile go behind the spooled ones.
                    while let Ok(op) = self.rx.try_recv() {
                        self.append_new(&op);
                    }
                    self.sync();
                    if let Err(e) = self.replay().await {
                        tracing::error!(sink = self.backend.name(), "{e}");
                        self.next_try = Instant::now() + self.retry;
                    }
                    continue;
                }
                let wait = self
                    .next_try
                    .saturating_duration_since(Instant::now())
                    .max(Duration::from_millis(5));
                tokio::select! {
                    op = self.rx.recv() => match op {
                        Some(op) => {
                            self.append_new(&op);
                            if self.rx.is_empty() {
                                self.sync();
                            }
                        }
                        None => break,
                    },
                    _ = tokio::time::sleep(wait) => {}
                }
                continue;
            }
            let Some(op) = self.rx.recv().await else {
                break;
            };
            self.try_connect().await;
            let seq = match self.spool.next_seq() {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(sink = self.backend.name(), "{e}; write dropped");
                    self.shared.count(&self.shared.stats.spool_dropped);
                    continue;
                }
            };
            if !self.backend.connected() {
                self.spool_write(seq, &op);
                if self.rx.is_empty() {
                    self.sync();
                }
                continue;
            }
            match self.backend.apply(seq, &op).await {
                Ok(()) => self.shared.count(&self.shared.stats.sink_writes),
                Err(BackendError::Rejected(e)) => {
                    self.shared.count(&self.shared.stats.sink_rejected);
                    tracing::error!(sink = self.backend.name(), "{e}; write dropped");
                }
                Err(e) => {
                    self.went_down(&e);
                    self.spool_write(seq, &op);
                    self.sync();
                }
            }
        }
        self.sync();
    }

    fn append_new(&mut self, op: &[u8]) {
        match self.spool.next_seq() {
            Ok(seq) => self.spool_write(seq, op),
            Err(e) => {
                self.shared.count(&self.shared.stats.spool_dropped);
                tracing::error!(sink = self.backend.name(), "{e}; write dropped");
            }
        }
    }
}

/// What the sink thread found at start-up (Redis state of an earlier run).
#[derive(Debug, Default)]
pub struct Loaded {
    /// Snapshot read from Redis (empty when Redis is off or unreachable).
    pub snapshot: Snapshot,
}

/// The running sink thread.
#[derive(Debug)]
pub struct SinkThread {
    /// Where effects for the sinks are sent.
    pub tx: SinkSender,
    /// Tells the thread to finish (flush, spool what is left, stop).
    pub stop: Arc<tokio::sync::Notify>,
    /// Set when stopping, read by the writers.
    pub closing: Arc<AtomicBool>,
    /// The thread.
    pub handle: std::thread::JoinHandle<()>,
}

/// Error starting the sink thread.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SinkStartError {
    /// The spool could not be opened.
    #[error(transparent)]
    Spool(#[from] SpoolError),
    /// Runtime or thread could not be created.
    #[error("sink thread: {0}")]
    Thread(String),
}

fn spool_id(dir: &std::path::Path) -> Result<String, SpoolError> {
    let path = dir.join("id");
    let io = |e| SpoolError::Io("id".into(), e);
    if let Ok(s) = std::fs::read_to_string(&path)
        && !s.trim().is_empty()
    {
        return Ok(s.trim().to_string());
    }
    std::fs::create_dir_all(dir).map_err(io)?;
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let id = format!("{:x}{:x}", t.as_nanos(), std::process::id());
    std::fs::write(&path, &id).map_err(io)?;
    Ok(id)
}

/// Starts the sink thread: opens the spools, connects, replays, reads the state an
/// earlier run left in Redis, then serves effects until stopped.
pub fn start(
    cfg: &HostConfig,
    shared: Arc<Shared>,
) -> Result<(SinkThread, Loaded), SinkStartError> {
    let (tx, rx) = mpsc::channel::<Effect>(cfg.plugins.sink_queue);
    let stop = Arc::new(tokio::sync::Notify::new());
    let closing = Arc::new(AtomicBool::new(false));
    let dir = std::path::PathBuf::from(&cfg.plugins.spool_dir);
    let p = &cfg.plugins;
    let redis_spool = if cfg.redis.enabled {
        Some((
            Spool::open(&dir, "redis", p.spool_fsync, p.spool_max_bytes)?,
            spool_id(&dir)?,
        ))
    } else {
        None
    };
    let mysql_spool = if cfg.mysql.enabled {
        Some(Spool::open(
            &dir,
            "mysql",
            p.spool_fsync,
            p.spool_max_bytes,
        )?)
    } else {
        None
    };
    let (loaded_tx, loaded_rx) = std::sync::mpsc::sync_channel::<Loaded>(1);
    let cfg2 = cfg.clone();
    let (stop2, closing2) = (stop.clone(), closing.clone());
    let handle = std::thread::Builder::new()
        .name("relay-sinks".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .max_blocking_threads(NOTIFY_IN_FLIGHT)
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    tracing::error!("sink runtime: {e}");
                    let _ = loaded_tx.send(Loaded::default());
                    return;
                }
            };
            rt.block_on(run(
                cfg2,
                shared,
                rx,
                redis_spool,
                mysql_spool,
                loaded_tx,
                stop2,
                closing2,
            ));
        })
        .map_err(|e| SinkStartError::Thread(e.to_string()))?;
    let loaded = loaded_rx
        .recv()
        .map_err(|_| SinkStartError::Thread("sink thread ended during start".into()))?;
    Ok((
        SinkThread {
            tx,
            stop,
            closing,
            handle,
        },
        loaded,
    ))
}

/// Routes effects to the writers and the notifier.
struct Dispatch {
    redis: Option<mpsc::Sender<Vec<u8>>>,
    mysql: Option<mpsc::Sender<Vec<u8>>>,
    notifier: Arc<Notifier>,
    shared: Arc<Shared>,
    mysql_cfg: MysqlConfig,
    /// Delivery tasks in flight (joined, with a bound, at shutdown).
    deliveries: tokio::task::JoinSet<()>,
    /// Bounds the log lines of alarm transitions (a storm writes a few, then a count).
    alarm_log: LogGate,
    /// Bounds the log lines of notifier attempts.
    notify_log: Arc<std::sync::Mutex<LogGate>>,
}

/// Log lines of alarm transitions, and of notifier attempts, written per second at most.
const LOG_LINES_PER_SEC: u32 = 10;

fn enc<T: serde::Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).unwrap_or_default()
}

impl Dispatch {
    /// Queues a Redis write; waits while the writer is full (backpressure to the workers).
    async fn redis(&self, op: RedisOp) {
        if let Some(tx) = &self.redis {
            let _ = tx.send(enc(&op)).await;
        }
    }

    /// Queues a MySQL row; waits while the writer is full.
    async fn mysql(&self, table: &str, row: serde_json::Map<String, serde_json::Value>) {
        if let Some(tx) = &self.mysql {
            let _ = tx
                .send(enc(&MysqlOp {
                    table: table.to_string(),
                    row,
                }))
                .await;
        }
    }

    async fn route(&mut self, e: Effect) {
        match e {
            Effect::StateSet { addr, field, value } => {
                self.redis(RedisOp::HSet {
                    key: format!("state:{addr}"),
                    field,
                    value: value.to_string(),
                })
                .await
            }
            Effect::CounterAdd { key, n, .. } => {
                self.redis(RedisOp::HIncrBy {
                    key: "counters".into(),
                    field: key,
                    n,
                })
                .await
            }
            Effect::Presence {
                addr,
                info: Some(info),
            } => {
                self.redis(RedisOp::HSet {
                    key: "presence".into(),
                    field: addr,
                    value: info.to_string(),
                })
                .await
            }
            Effect::Presence { addr, info: None } => {
                self.redis(RedisOp::HDel {
                    key: "presence".into(),
                    field: addr,
                })
                .await
            }
            Effect::AlarmStore {
                key,
                record: Some(r),
            } => {
                self.redis(RedisOp::HSet {
                    key: "alarms".into(),
                    field: key,
                    value: r.to_string(),
                })
                .await
            }
            Effect::AlarmStore { key, record: None } => {
                self.redis(RedisOp::HDel {
                    key: "alarms".into(),
                    field: key,
                })
                .await
            }
            Effect::WatchStore {
                key,
                watch: Some(w),
            } => {
                self.redis(RedisOp::HSet {
                    key: "alarm_watch".into(),
                    field: key,
                    value: w.to_string(),
                })
                .await
            }
            Effect::WatchStore { key, watch: None } => {
                self.redis(RedisOp::HDel {
                    key: "alarm_watch".into(),
                    field: key,
                })
                .await
            }
            Effect::Persist { table, row } => self.mysql(&table, row).await,
            Effect::Alarm(ev) => {
                match self.alarm_log.pass(crate::clock::now_ms()) {
                    Some(0) => {
                        tracing::info!(target: "relay::alarms", key = %ev.key, severity = %ev.severity, by = ?ev.by,
                            "alarm {}: {}", ev.transition.as_str(), ev.text)
                    }
                    Some(n) => {
                        tracing::info!(target: "relay::alarms", key = %ev.key, severity = %ev.severity, by = ?ev.by,
                            "alarm {}: {} ({n} more alarm transitions not logged; all are in the alarm table)",
                            ev.transition.as_str(), ev.text)
                    }
                    None => {}
                }
                let mut row = serde_json::Map::new();
                row.insert("at_ms".into(), ev.at_ms.into());
                row.insert("alarm_key".into(), ev.key.into());
                row.insert("transition".into(), ev.transition.as_str().into());
                row.insert("severity".into(), ev.severity.as_str().into());
                row.insert("text".into(), ev.text.into());
                row.insert(
                    "acked_by".into(),
                    ev.by.map(Into::into).unwrap_or(serde_json::Value::Null),
                );
                let table = self.mysql_cfg.alarm_table.clone();
                self.mysql(&table, row).await;
            }
            Effect::Notify(job) => {
                let notifier = self.notifier.clone();
                let mysql = self.mysql.clone();
                let table = self.mysql_cfg.notify_table.clone();
                let gate = self.notify_log.clone();
                self.deliveries
                    .spawn(notifier.deliver(job, move |a: Attempt| {
                        let pass = gate
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .pass(crate::clock::now_ms());
                        match pass {
                            Some(0) => log_attempt(&a),
                            Some(n) => {
                                log_attempt(&a);
                                tracing::warn!(target: "relay::notify",
                                    "{n} more notifier attempts not logged; all are in the attempts table");
                            }
                            None => {}
                        }
                        if let Some(tx) = &mysql
                            && tx
                                .try_send(enc(&MysqlOp {
                                    table: table.clone(),
                                    row: a.row(),
                                }))
                                .is_err()
                        {
                            tracing::warn!(
                                "mysql queue full: notifier attempt not recorded in the table"
                            );
                        }
                    }));
                while self.deliveries.try_join_next().is_some() {}
            }
            Effect::Log { file, text } => {
                tracing::info!(target: "relay::rules", file = %file, "{text}")
            }
            Effect::Action(_) => {
                let s = &self.shared;
                s.count(&s.stats.actions_dropped);
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn run(
    cfg: HostConfig,
    shared: Arc<Shared>,
    mut rx: mpsc::Receiver<Effect>,
    redis_spool: Option<(Spool, String)>,
    mysql_spool: Option<Spool>,
    loaded_tx: std::sync::mpsc::SyncSender<Loaded>,
    stop: Arc<tokio::sync::Notify>,
    closing: Arc<AtomicBool>,
) {
    let mut loaded = Loaded::default();
    let mut writers = tokio::task::JoinSet::new();
    let cap = cfg.plugins.sink_queue;
    let mut redis_tx = None;
    if let Some((spool, id)) = redis_spool {
        let (tx, wrx) = mpsc::channel(cap);
        let mut w = Writer {
            backend: RedisBackend::new(&cfg.redis, &id),
            spool,
            rx: wrx,
            shared: shared.clone(),
            retry: Duration::from_millis(cfg.redis.retry_ms),
            next_try: Instant::now(),
            closing: closing.clone(),
            last_warn: None,
        };
        // Start-up: bring Redis up to date from the spool, then read what it holds.
        w.try_connect().await;
        if w.backend.connected() {
            if let Err(e) = w.replay().await {
                tracing::error!("redis spool: {e}");
            }
            match w.backend.load(cfg.plugins.max_state_addrs).await {
                Ok(s) => loaded.snapshot = s,
                Err(e) => tracing::error!("reading state from redis: {e}"),
            }
            // Presence of the previous run is stale: its connections are gone
            // (unless another node of a running fleet wrote it).
            if !cfg.keep_presence
                && let Err(e) = w.backend.clear_presence().await
            {
                tracing::warn!("clearing old presence: {e}");
            }
        } else {
            tracing::error!(url = %cfg.redis.url, "redis unreachable at start: writes are spooled, and the \
                alarms, timers and state of an earlier run are loaded once it is back");
            w.backend.late_load = Some((shared.clone(), cfg.plugins.max_state_addrs));
        }
        redis_tx = Some(tx);
        writers.spawn(w.run());
    }
    let mut mysql_tx = None;
    if let Some(spool) = mysql_spool {
        let (tx, wrx) = mpsc::channel(cap);
        let w = Writer {
            backend: MysqlBackend::new(&cfg.mysql),
            spool,
            rx: wrx,
            shared: shared.clone(),
            retry: Duration::from_millis(cfg.mysql.retry_ms),
            next_try: Instant::now(),
            closing: closing.clone(),
            last_warn: None,
        };
        mysql_tx = Some(tx);
        writers.spawn(w.run());
    }
    let _ = loaded_tx.send(loaded);
    let mut dispatch = Dispatch {
        redis: redis_tx,
        mysql: mysql_tx,
        notifier: Arc::new(Notifier::new(&cfg.notify, shared.clone())),
        shared: shared.clone(),
        mysql_cfg: cfg.mysql.clone(),
        deliveries: tokio::task::JoinSet::new(),
        alarm_log: LogGate::new(LOG_LINES_PER_SEC),
        notify_log: Arc::new(std::sync::Mutex::new(LogGate::new(LOG_LINES_PER_SEC))),
    };
    let mut clock = tokio::time::interval(Duration::from_millis(cfg.plugins.timer_ms));
    clock.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut stopping = false;
    loop {
        tokio::select! {
            biased;
            e = rx.recv(), if !stopping => match e {
                Some(e) => dispatch.route(e).await,
                None => stopping = true,
            },
            _ = stop.notified(), if !stopping => stopping = true,
            _ = shared.clock_kick.notified() => tick_alarms(&shared, &mut dispatch).await,
            _ = clock.tick() => tick_alarms(&shared, &mut dispatch).await,
        }
        if stopping {
            break;
        }
    }
    // Drain what is queued, then let the writers finish (bounded).
    while let Ok(e) = rx.try_recv() {
        dispatch.route(e).await;
    }
    tick_alarms(&shared, &mut dispatch).await;
    let deadline = tokio::time::sleep(Duration::from_secs(3));
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            r = dispatch.deliveries.join_next() => if r.is_none() { break },
            _ = &mut deadline => { dispatch.deliveries.abort_all(); break }
        }
    }
    closing.store(true, Ordering::Relaxed);
    let Dispatch { redis, mysql, .. } = dispatch;
    drop(redis);
    drop(mysql);
    let deadline = tokio::time::sleep(Duration::from_secs(10));
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            r = writers.join_next() => if r.is_none() { break },
            _ = &mut deadline => {
                tracing::error!("sink writers did not finish in time");
                writers.abort_all();
                break
            }
        }
    }
}

/// Runs the alarm clock once and routes what it produced.
async fn tick_alarms(shared: &Arc<Shared>, dispatch: &mut Dispatch) {
    let reloaded = shared.notify_next.lock().ok().and_then(|mut n| n.take());
    if let Some(notify) = reloaded {
        dispatch.notifier = Arc::new(Notifier::new(&notify, shared.clone()));
        tracing::info!(
            target: "relay::notify",
            "notifiers reloaded: {}",
            notify
                .notifier
                .iter()
                .map(|n| n.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let now = crate::clock::now_ms();
    let fx = {
        let mut book = shared.book();
        book.poll(now);
        book.take_effects()
    };
    if let Some(n) = dispatch.alarm_log.flush(now) {
        tracing::info!(target: "relay::alarms", "{n} more alarm transitions not logged; all are in the alarm table");
    }
    let left = dispatch
        .notify_log
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .flush(now);
    if let Some(n) = left {
        tracing::warn!(target: "relay::notify", "{n} more notifier attempts not logged; all are in the attempts table");
    }
    for e in fx {
        dispatch.route(e).await;
    }
}

/// Loads what Redis holds into the alarm book (alarms and timers not known in memory)
/// and the state cache (Redis values win: every write of this run reached it first).
pub fn restore(shared: &Shared, snap: Snapshot) {
    let mut alarms = Vec::new();
    for (k, v) in snap.alarms {
        match serde_json::from_str::<Alarm>(&v) {
            Ok(a) => alarms.push(a),
            Err(e) => tracing::warn!(key = %k, "stored alarm unreadable ({e}); skipped"),
        }
    }
    let mut watches = Vec::new();
    for (k, v) in snap.watches {
        match serde_json::from_str::<Watch>(&v) {
            Ok(w) => watches.push((k, w)),
            Err(e) => tracing::warn!(key = %k, "stored alarm timer unreadable ({e}); skipped"),
        }
    }
    if !alarms.is_empty() || !watches.is_empty() {
        tracing::info!(
            alarms = alarms.len(),
            timers = watches.len(),
            "alarms restored from redis"
        );
    }
    shared.book().restore(alarms, watches);
    let mut st = shared.state_write();
    st.counters.extend(snap.counters);
    for (addr, fields) in snap.shadows {
        let m = st.shadows.entry(addr).or_default();
        for (f, v) in fields {
            m.insert(f, serde_json::from_str(&v).unwrap_or(Value::String(v)));
        }
    }
}
