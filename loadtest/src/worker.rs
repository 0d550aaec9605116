//! A worker runs one share of the fleet on its own tokio runtime: it connects its
//! clients, then runs steps on command and reports each step's measurements.
//! The same engine runs inside the tool's process ([`spawn_local`]) or in a child
//! process ([`child_main`]) that reads [`Command`]s as JSON lines on stdin and writes
//! [`Reply`]s as JSON lines on stdout; that is how a fleet larger than one process's
//! open-file limit is split.

use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::client::{self, Env, Link, StepPlan};
use crate::clock::{Anchor, mono_ns};
use crate::plan::Plan;
use crate::scenario::{Endpoint, Pattern, Scenario};
use crate::schedule::Schedule;
use crate::sender::{self, SchedCmd, SenderConfig};
use crate::stats::{ConnectStats, ErrorKind, ProgressSnapshot, Recorder, StepStats};
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
    /// Connect only the clients of the first this many fleet units (`None`: all).
    pub units: Option<u64>,
}

/// Coordinator → worker.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Command {
    /// Connect this worker's share of the fleet.
    Connect(Box<WorkerSetup>),
    /// Run one step, then wait `drain_ns` past its end before reporting.
    Step { plan: StepPlan, drain_ns: u64 },
    /// Hold the clients of the first `units` fleet units: close the rest, connect
    /// what is missing (answered with `Connected`).
    Resize { units: u64 },
    /// Close every connection and exit.
    Finish,
}

/// Worker → coordinator.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Reply {
    /// Live counters (sent every progress interval).
    Progress(ProgressSnapshot),
    /// The connect phase (or a resize) is over.
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
/// How long a shrinking fleet waits for its closed connections to end.
const SETTLE_MAX: Duration = Duration::from_secs(3);

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
        Endpoint::Echo { .. } => WireKind::Relay {
            form: crate::scenario::Form::Binary,
            ws: false,
        },
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
    let controllers = s.controller_endpoints()?;
    let browsers = s.browser_endpoints()?;
    let recorder = Arc::new(Recorder::new(threads * 8));
    let tls_for = |e: &Endpoint| match e.tls_host() {
        Some(host) => crate::tls::TlsClient::new(&s.target, host).map(Some),
        None => Ok(None),
    };
    let controller_tls = tls_for(&controllers[0])?;
    let browser_tls = tls_for(&browsers[0])?;
    let env = Env {
        controller_tls,
        browser_tls,
        controller_wire: wire_for(&controllers[0], s.target.controller_form, &setup.prefix),
        browser_wire: wire_for(&browsers[0], s.target.browser_form, &setup.prefix),
        controllers,
        browsers,
        sources: Arc::new(setup.sources.clone()),
        recorder: recorder.clone(),
        payload_len: s.load.payload_bytes as usize,
        heartbeat_ns: s.load.heartbeat.as_nanos().max(1),
        connect_timeout: s.run.connect_timeout.0,
        busy_retries: s.run.busy_retries,
        max_pending: s.run.max_pending as usize,
        max_in: 1 << 20,
        template: match &s.load.payload_template {
            Some(t) => Some(Arc::new(
                crate::payload::Template::parse(t).map_err(|e| format!("payload_template: {e}"))?,
            )),
            None => None,
        },
    };
    let (sched, sender) = sender::spawn(
        setup.worker,
        setup.workers,
        SenderConfig {
            tick_ns: s.load.tick.as_nanos(),
            spin_ns: s.run.spin.as_nanos(),
            max_batch: s.run.max_batch.max(1) as u64,
            heartbeat_ns: env.heartbeat_ns,
        },
        recorder.clone(),
    )
    .map_err(|e| format!("cannot start the sender thread: {e}"))?;

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

    let mut fleet = Fleet {
        plan: Plan::new(s, &setup.prefix),
        links: BTreeMap::new(),
        tasks: JoinSet::new(),
        sched: sched.clone(),
    };
    let stats = rt.block_on(fleet.resize(&env, &setup, setup.units));
    out(Reply::Connected(Box::new(stats)));

    let result = loop {
        match cmds.recv() {
            Ok(Command::Step { plan, drain_ns }) => {
                recorder.begin_step(plan.id, plan.start_ns, plan.end_ns);
                let _ = sched.send(SchedCmd::Run(plan));
                sleep_until_ns(plan.end_ns.saturating_add(drain_ns));
                let _ = sched.send(SchedCmd::Halt);
                let stats = recorder.end_step();
                out(Reply::StepDone {
                    id: plan.id,
                    stats: Box::new(stats),
                });
            }
            Ok(Command::Resize { units }) => {
                let stats = rt.block_on(fleet.resize(&env, &setup, Some(units)));
                out(Reply::Connected(Box::new(stats)));
            }
            Ok(Command::Connect(_)) => break Err("Connect sent twice".to_string()),
            Ok(Command::Finish) | Err(_) => break Ok(()),
        }
    };
    for l in fleet.links.values() {
        l.close();
    }
    let mut tasks = std::mem::take(&mut fleet.tasks);
    rt.block_on(async {
        let _ = tokio::time::timeout(FINISH_GRACE, async {
            while tasks.join_next().await.is_some() {}
        })
        .await;
    });
    tasks.abort_all();
    let _ = sched.send(SchedCmd::Stop);
    let _ = sender.join();
    drop(fleet);
    out(Reply::Progress(recorder.counters.snapshot()));
    stop.store(true, Ordering::Relaxed);
    let _ = ticker.join();
    rt.shutdown_timeout(Duration::from_secs(1));
    if result.is_ok() {
        out(Reply::Finished);
    }
    result
}

/// Sleeps this (non-runtime) thread until monotonic time `ns`.
fn sleep_until_ns(ns: u64) {
    let now = mono_ns();
    if ns > now {
        std::thread::sleep(Duration::from_nanos(ns - now));
    }
}

/// The connections a worker holds.
struct Fleet {
    plan: Plan,
    /// Established links by client index.
    links: BTreeMap<u64, Arc<Link>>,
    /// Each link's tasks.
    tasks: JoinSet<()>,
    /// The sender thread.
    sched: mpsc::Sender<SchedCmd>,
}

/// One finished connect attempt: start, end, outcome.
type Attempt = (u64, u64, Result<client::Session, ErrorKind>, u32);

impl Fleet {
    /// Brings this worker's share to the clients of the first `units` fleet units
    /// (`None`: all): closes the links past it and connects the missing ones.
    async fn resize(&mut self, env: &Env, setup: &WorkerSetup, units: Option<u64>) -> ConnectStats {
        let s = &setup.scenario;
        let full = self.plan.range(setup.worker, setup.workers);
        let range = full.start
            ..full
                .end
                .min(full.start.saturating_add(setup.max_connections));
        let plan = self.plan.clone();
        let wanted = |i: u64| units.is_none_or(|u| plan.unit_of(i) < u);
        let gone: Vec<u64> = self
            .links
            .iter()
            .filter(|(i, l)| !wanted(**i) || !l.alive())
            .map(|(i, _)| *i)
            .collect();
        let mut closing = Vec::new();
        for i in gone {
            if let Some(l) = self.links.remove(&i) {
                l.close();
                closing.push(l);
            }
        }
        // A shrinking fleet settles before it grows again: the server has seen
        // these connections go (their reader ended on its close) before any new
        // one is opened, as a fleet whose devices leave and others join later.
        let settle = Instant::now() + SETTLE_MAX;
        while closing.iter().any(|l| l.alive()) && Instant::now() < settle {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let todo: Vec<u64> = range
            .clone()
            .filter(|&i| wanted(i) && !self.links.contains_key(&i))
            .collect();
        let mut stats = ConnectStats {
            planned: todo.len() as u64,
            ..ConnectStats::default()
        };
        let capped = (range.end..full.end).filter(|&i| wanted(i)).count() as u64;
        if capped > 0 {
            stats.notes.push(format!(
                "worker {} could not open {capped} of its connections (open-file cap)",
                setup.worker
            ));
        }
        let storm = s.pattern == Pattern::Storm;
        let total = self.plan.count().max(1);
        let share = todo.len() as f64 / total as f64;
        let rate = s.load.connect_rate * share;
        let start_ns = setup.connect_start_ns.max(mono_ns());
        let pacing = (rate > 0.0).then(|| Schedule::new(start_ns, u64::MAX, rate, 0, 1));
        // A storm is open loop: connects start on schedule whatever is in flight.
        let limit = Arc::new(Semaphore::new(if storm {
            Semaphore::MAX_PERMITS
        } else {
            s.run.connect_concurrency.max(1) as usize
        }));
        let mut attempts: JoinSet<Attempt> = JoinSet::new();
        let hold = !(storm && s.load.storm_close);
        let rec = env.recorder.clone();
        let finish = |r: Attempt, stats: &mut ConnectStats, fleet: &mut Fleet| {
            let (start, end, res, retries) = r;
            stats.retried += u64::from(retries);
            rec.counters.connects_done.fetch_add(1, Ordering::Relaxed);
            match res {
                Ok(session) => {
                    stats.record(start, end, Ok(()));
                    if hold {
                        rec.counters.connected.fetch_add(1, Ordering::Relaxed);
                        let index = session.spec().index;
                        let (link, h) = session.spawn(env);
                        let _ = fleet.sched.send(SchedCmd::Add(link.clone()));
                        fleet.links.insert(index, link);
                        fleet.tasks.spawn(async move {
                            let _ = h.await;
                        });
                    } else {
                        fleet.tasks.spawn(session.close());
                    }
                }
                Err(kind) => stats.record(start, end, Err(kind)),
            }
        };

        for (k, &i) in todo.iter().enumerate() {
            let mut start = mono_ns();
            if let Some(p) = &pacing
                && let Some(t) = p.intended(k as u64)
            {
                if t > start {
                    let at = Anchor::now().instant_at(t);
                    tokio::time::sleep_until(at.into()).await;
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
            let spec = self.plan.client(i);
            attempts.spawn(async move {
                let (r, retries) = client::open_retrying(&env2, spec).await;
                drop(permit);
                (start, mono_ns(), r, retries)
            });
            while let Some(r) = attempts.try_join_next() {
                if let Ok(r) = r {
                    finish(r, &mut stats, self);
                }
            }
        }
        while let Some(r) = attempts.join_next().await {
            if let Ok(r) = r {
                finish(r, &mut stats, self);
            }
        }
        stats.holding = self.links.values().filter(|l| l.alive()).count() as u64;
        stats
    }
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
