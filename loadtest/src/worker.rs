//! A worker runs one share of the fleet on its own tokio runtime: it connects its
//! clients, then runs steps on command and reports each step's measurements.
//! The same engine runs inside the tool's process ([`spawn_local`]) or in a child
//! process ([`child_main`]) that reads [`Command`]s as JSON lines on stdin and writes
//! [`Reply`]s as JSON lines on stdout; that is how a fleet larger than one process's
//! open-file limit is split.

use std::io::{BufRead, Write};
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;

use crate::client::{self, Env, StepCmd, StepPlan};
use crate::clock::{Anchor, mono_ns};
use crate::plan::Plan;
use crate::scenario::{Endpoint, Pattern, Scenario};
use crate::schedule::Schedule;
use crate::stats::{ConnectStats, ProgressSnapshot, Recorder, StepStats};
use crate::wire::WireKind;

/// What a worker is asked to run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkerSetup {
    /// The validated scenario.
    pub scenario: Scenario,
    /// Name prefix of this run (the same in every worker).
    pub prefix: String,
    /// This worker's number.
    pub worker: u32,
    /// Number of workers.
    pub workers: u32,
    /// Runtime threads.
    pub threads: u32,
    /// Source addresses for connects.
    pub sources: Vec<Ipv4Addr>,
    /// Connect phase start, ns of CLOCK_MONOTONIC (a storm's schedule is anchored here).
    pub connect_start_ns: u64,
    /// Most connections this worker may open (the open-file cap).
    pub max_connections: u64,
}

/// Coordinator → worker.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Command {
    /// Connect this worker's share of the fleet.
    Connect(Box<WorkerSetup>),
    /// Run one step, then wait `drain_ns` past its end before reporting.
    Step { plan: StepPlan, drain_ns: u64 },
    /// Close every connection and exit.
    Finish,
}

/// Worker → coordinator.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Reply {
    /// Live counters (sent every progress interval).
    Progress(ProgressSnapshot),
    /// The connect phase is over.
    Connected(Box<ConnectStats>),
    /// A step is over.
    StepDone { id: u32, stats: Box<StepStats> },
    /// All connections are closed.
    Finished,
    /// The worker cannot go on.
    Failed(String),
}

/// How often workers report progress.
pub const PROGRESS_EVERY: Duration = Duration::from_millis(250);
/// How long closing waits for connections to say goodbye.
const FINISH_GRACE: Duration = Duration::from_secs(5);

/// Runs a worker until `Finish` or until `cmds` closes, sending replies to `out`.
pub fn serve(cmds: mpsc::Receiver<Command>, out: impl Fn(Reply) + Send + Sync + 'static) {
    let out = Arc::new(out);
    let setup = match cmds.recv() {
        Ok(Command::Connect(s)) => s,
        Ok(other) => {
            out(Reply::Failed(format!(
                "expected Connect first, got {other:?}"
            )));
            return;
        }
        Err(_) => return,
    };
    if let Err(e) = run(*setup, &cmds, out.clone()) {
        out(Reply::Failed(e));
    }
}

fn wire_for(endpoint: &Endpoint, form: crate::scenario::Form, prefix: &str) -> WireKind {
    match endpoint {
        Endpoint::Mqtt { .. } => WireKind::Mqtt {
            prefix: prefix.to_string(),
        },
        Endpoint::RelayWs { .. } => WireKind::Relay { form, ws: true },
        Endpoint::RelayTcp { .. } => WireKind::Relay { form, ws: false },
    }
}

fn run(
    setup: WorkerSetup,
    cmds: &mpsc::Receiver<Command>,
    out: Arc<dyn Fn(Reply) + Send + Sync>,
) -> Result<(), String> {
    let s = &setup.scenario;
    let threads = setup.threads.max(1) as usize;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .thread_name(format!("lt-w{}", setup.worker))
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))?;
    let controllers = s.controller_endpoint()?;
    let browsers = s.browser_endpoint()?;
    let recorder = Arc::new(Recorder::new(threads * 8));
    let (step_tx, step_rx) = watch::channel(StepCmd::Wait);
    let env = Env {
        controller_wire: wire_for(&controllers, s.target.controller_form, &setup.prefix),
        browser_wire: wire_for(&browsers, s.target.browser_form, &setup.prefix),
        controllers,
        browsers,
        sources: Arc::new(setup.sources.clone()),
        recorder: recorder.clone(),
        steps: step_rx,
        anchor: Anchor::now(),
        payload_len: s.load.payload_bytes as usize,
        heartbeat_ns: s.load.heartbeat.as_nanos().max(1),
        tick_ns: s.load.tick.as_nanos(),
        max_batch: s.run.max_batch.max(1) as u64,
        connect_timeout: s.run.connect_timeout.0,
        reply_queue: s.run.reply_queue as usize,
        max_in: 1 << 20,
    };

    // Progress ticker.
    let stop = Arc::new(AtomicBool::new(false));
    let ticker = {
        let (stop, rec, out) = (stop.clone(), recorder.clone(), out.clone());
        std::thread::Builder::new()
            .name("lt-progress".into())
            .spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    out(Reply::Progress(rec.counters.snapshot()));
                    std::thread::sleep(PROGRESS_EVERY);
                }
            })
            .map_err(|e| format!("cannot start the progress thread: {e}"))?
    };

    let (stats, mut tasks) = rt.block_on(connect_phase(&env, &setup));
    out(Reply::Connected(Box::new(stats)));

    let result = loop {
        match cmds.recv() {
            Ok(Command::Step { plan, drain_ns }) => {
                recorder.begin_step(plan.id, plan.start_ns, plan.end_ns);
                let _ = step_tx.send(StepCmd::Run(plan));
                let until = env.anchor.instant_at(plan.end_ns.saturating_add(drain_ns));
                let now = std::time::Instant::now();
                if until > now {
                    std::thread::sleep(until - now);
                }
                let _ = step_tx.send(StepCmd::Wait);
                let stats = recorder.end_step();
                out(Reply::StepDone {
                    id: plan.id,
                    stats: Box::new(stats),
                });
            }
            Ok(Command::Connect(_)) => break Err("Connect sent twice".to_string()),
            Ok(Command::Finish) | Err(_) => break Ok(()),
        }
    };
    let _ = step_tx.send(StepCmd::Finish);
    rt.block_on(async {
        let _ = tokio::time::timeout(FINISH_GRACE, async {
            while tasks.join_next().await.is_some() {}
        })
        .await;
    });
    tasks.abort_all();
    out(Reply::Progress(recorder.counters.snapshot()));
    stop.store(true, Ordering::Relaxed);
    let _ = ticker.join();
    rt.shutdown_timeout(Duration::from_secs(1));
    if result.is_ok() {
        out(Reply::Finished);
    }
    result
}

/// Connects this worker's clients; returns the phase's stats and the running sessions.
async fn connect_phase(env: &Env, setup: &WorkerSetup) -> (ConnectStats, JoinSet<()>) {
    let s = &setup.scenario;
    let plan = Plan::new(s, &setup.prefix);
    let full = plan.range(setup.worker, setup.workers);
    let range = full.start
        ..full
            .end
            .min(full.start.saturating_add(setup.max_connections));
    let mut stats = ConnectStats {
        planned: range.end - range.start,
        ..ConnectStats::default()
    };
    if range.end < full.end {
        stats.notes.push(format!(
            "worker {} opened {} of its {} connections (open-file cap)",
            setup.worker,
            range.end - range.start,
            full.end - full.start
        ));
    }
    let storm = s.pattern == Pattern::Storm;
    let total = plan.count().max(1);
    let share = (range.end - range.start) as f64 / total as f64;
    let rate = s.load.connect_rate * share;
    let pacing = (rate > 0.0).then(|| Schedule::new(setup.connect_start_ns, u64::MAX, rate, 0, 1));
    // A storm is open loop: connects start on schedule whatever is in flight.
    let limit = Arc::new(Semaphore::new(if storm {
        Semaphore::MAX_PERMITS
    } else {
        s.run.connect_concurrency.max(1) as usize
    }));
    let mut attempts: JoinSet<(u64, u64, Result<client::Session, crate::stats::ErrorKind>)> =
        JoinSet::new();
    let mut sessions = JoinSet::new();
    let hold = !(storm && s.load.storm_close);
    let rec = env.recorder.clone();

    let finish = |r: (u64, u64, Result<client::Session, crate::stats::ErrorKind>),
                  stats: &mut ConnectStats,
                  sessions: &mut JoinSet<()>| {
        let (start, end, res) = r;
        rec.counters.connects_done.fetch_add(1, Ordering::Relaxed);
        match res {
            Ok(session) => {
                stats.record(start, end, Ok(()));
                if hold {
                    rec.counters.connected.fetch_add(1, Ordering::Relaxed);
                    let h = session.spawn(env);
                    sessions.spawn(async move {
                        let _ = h.await;
                    });
                } else {
                    sessions.spawn(session.close());
                }
            }
            Err(kind) => stats.record(start, end, Err(kind)),
        }
    };

    for (k, i) in range.clone().enumerate() {
        let mut start = mono_ns();
        if let Some(p) = &pacing
            && let Some(t) = p.intended(k as u64)
        {
            if t > start {
                tokio::time::sleep_until(env.anchor.instant_at(t).into()).await;
            }
            if storm {
                start = t;
            }
        }
        let permit = match limit.clone().acquire_owned().await {
            Ok(p) => p,
            Err(_) => break,
        };
        if !storm {
            start = mono_ns();
        }
        let env2 = env.clone();
        let spec = plan.client(i);
        attempts.spawn(async move {
            let r = client::open(&env2, spec).await;
            drop(permit);
            (start, mono_ns(), r)
        });
        while let Some(r) = attempts.try_join_next() {
            if let Ok(r) = r {
                finish(r, &mut stats, &mut sessions);
            }
        }
    }
    while let Some(r) = attempts.join_next().await {
        if let Ok(r) = r {
            finish(r, &mut stats, &mut sessions);
        }
    }
    (stats, sessions)
}

/// A worker running on a thread of this process.
#[derive(Debug)]
pub struct LocalWorker {
    /// Commands to the worker.
    pub commands: mpsc::Sender<Command>,
    /// The worker's thread.
    pub thread: std::thread::JoinHandle<()>,
}

/// Starts a worker on a thread; its replies go to `out` tagged with `index`.
pub fn spawn_local(
    index: usize,
    out: mpsc::Sender<(usize, Reply)>,
) -> std::io::Result<LocalWorker> {
    let (tx, rx) = mpsc::channel();
    let thread = std::thread::Builder::new()
        .name(format!("lt-worker-{index}"))
        .spawn(move || {
            serve(rx, move |r| {
                let _ = out.send((index, r));
            })
        })?;
    Ok(LocalWorker {
        commands: tx,
        thread,
    })
}

/// Main of a worker child process: commands on stdin, replies on stdout, one JSON
/// object per line.
pub fn child_main() -> std::io::Result<()> {
    let (tx, rx) = mpsc::channel();
    std::thread::Builder::new()
        .name("lt-stdin".into())
        .spawn(move || {
            let stdin = std::io::stdin();
            for line in stdin.lock().lines() {
                let Ok(line) = line else { break };
                if line.trim().is_empty() {
                    continue;
                }
                match serde_json::from_str::<Command>(&line) {
                    Ok(c) => {
                        if tx.send(c).is_err() {
                            break;
                        }
                    }
                    Err(e) => {
                        eprintln!("relay-loadtest worker: bad command: {e}");
                        break;
                    }
                }
            }
            // stdin closed: the coordinator is gone, so finish.
            let _ = tx.send(Command::Finish);
        })?;
    let stdout = std::sync::Mutex::new(std::io::stdout());
    serve(rx, move |r| {
        if let Ok(line) = serde_json::to_string(&r) {
            let mut o = stdout.lock().unwrap_or_else(|p| p.into_inner());
            let _ = writeln!(o, "{line}");
            let _ = o.flush();
        }
    });
    Ok(())
}

#[cfg(test)]
// Tests build values field by field from the defaults, which reads clearer here.
#[allow(clippy::field_reassign_with_default)]
mod tests {
    use super::*;

    #[test]
    fn commands_and_replies_cross_a_pipe_as_json() {
        let plan = StepPlan {
            id: 3,
            rate: 12.5,
            start_ns: 10,
            end_ns: 20,
        };
        let c = Command::Step { plan, drain_ns: 5 };
        let back: Command = serde_json::from_str(&serde_json::to_string(&c).unwrap()).unwrap();
        let Command::Step { plan: p, drain_ns } = back else {
            panic!()
        };
        assert_eq!((p, drain_ns), (plan, 5));
        let mut st = StepStats::default();
        st.sent = 9;
        st.latency.saturating_record(77);
        let r = Reply::StepDone {
            id: 3,
            stats: Box::new(st),
        };
        let back: Reply = serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
        let Reply::StepDone { stats, .. } = back else {
            panic!()
        };
        assert_eq!(stats.sent, 9);
        assert_eq!(stats.latency.len(), 1);
    }

    #[test]
    fn a_worker_refuses_steps_before_connect() {
        let (tx, rx) = mpsc::channel();
        let (otx, orx) = mpsc::channel();
        tx.send(Command::Finish).unwrap();
        serve(rx, move |r| {
            let _ = otx.send(r);
        });
        assert!(matches!(orx.recv().unwrap(), Reply::Failed(_)));
    }
}
