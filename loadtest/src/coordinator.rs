//! Runs a scenario from start to report: plans workers and source addresses within the
//! machine's limits, starts the workers (in process, or as child processes of this
//! binary), connects the fleet, runs the fixed step or the find-max ramp with every
//! worker starting each step at the same CLOCK_MONOTONIC instant, samples the server
//! from /proc, and assembles the [`Report`].

use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command as Process, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::client::StepPlan;
use crate::clock::{mono_ns, unix_ms};
use crate::findmax::{Ramp, RampConfig};
use crate::limits::{self, NoFile};
use crate::plan::Plan;
use crate::procstat::{self, ProcSample, Sampler};
use crate::progress::Progress;
use crate::report::{
    ConnectReport, CpuStep, FindMaxReport, FleetReport, GENERATOR_LAG_US, LimitKind, LimitsReport,
    Note, ProcReport, Report, ServerReport, ServerStep, Slo, StepReport, TargetReport, Verdict,
    fmt_rate, fmt_us, group,
};
use crate::scenario::{
    Endpoint, FindMaxSpec, Form, Pattern, RampBy, Scenario, ScenarioError, WatchSpec,
};
use crate::stats::{ConnectStats, ProgressSnapshot, StepStats};
use crate::worker::{self, Command, Reply, WorkerSetup};

/// How to run, beyond the scenario.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Draw the live progress line.
    pub progress: bool,
    /// The `relay-loadtest` binary, re-run with `--worker` for each worker process
    /// when the fleet is split; without it only one in-process worker can run (a
    /// single worker always runs in process).
    pub worker_exe: Option<PathBuf>,
}

/// Why a run could not complete.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RunError {
    #[error(transparent)]
    Scenario(#[from] ScenarioError),
    #[error("worker: {0}")]
    Worker(String),
    #[error("cannot start worker process {exe}: {source}")]
    Spawn { exe: String, source: std::io::Error },
    #[error("{0}")]
    Setup(String),
}

/// A started worker.
enum Link {
    Local(worker::LocalWorker),
    Child {
        child: Child,
        stdin: Option<ChildStdin>,
    },
}

impl Link {
    fn send(&mut self, c: &Command) -> Result<(), String> {
        match self {
            Link::Local(w) => w
                .commands
                .send(c.clone())
                .map_err(|_| "the worker thread has stopped".to_string()),
            Link::Child { stdin, .. } => {
                let Some(stdin) = stdin.as_mut() else {
                    return Err("the worker's stdin is closed".into());
                };
                let line = serde_json::to_string(c).map_err(|e| e.to_string())?;
                writeln!(stdin, "{line}")
                    .and_then(|_| stdin.flush())
                    .map_err(|e| format!("cannot talk to the worker process: {e}"))
            }
        }
    }

    fn close(self, grace: Duration) {
        match self {
            Link::Local(w) => {
                drop(w.commands);
                let _ = w.thread.join();
            }
            Link::Child { mut child, stdin } => {
                drop(stdin);
                let deadline = Instant::now() + grace;
                loop {
                    match child.try_wait() {
                        Ok(Some(_)) => break,
                        Ok(None) if Instant::now() < deadline => {
                            std::thread::sleep(Duration::from_millis(20))
                        }
                        _ => {
                            let _ = child.kill();
                            let _ = child.wait();
                            break;
                        }
                    }
                }
            }
        }
    }
}

/// All workers and the one channel their replies arrive on.
struct Fleet {
    links: Vec<Link>,
    replies: mpsc::Receiver<(usize, Reply)>,
    /// Last progress counters of each worker.
    progress: Vec<ProgressSnapshot>,
    /// When each worker was last heard from.
    heard: Vec<Instant>,
}

/// A worker silent this long is taken for dead (they report every 250 ms).
const SILENCE: Duration = Duration::from_secs(30);

impl Fleet {
    fn start(n: usize, exe: Option<&PathBuf>) -> Result<Self, RunError> {
        let (tx, rx) = mpsc::channel();
        let mut links = Vec::with_capacity(n);
        for i in 0..n {
            if n == 1 {
                let w = worker::spawn_local(i, tx.clone())
                    .map_err(|e| RunError::Setup(format!("cannot start the worker thread: {e}")))?;
                links.push(Link::Local(w));
                continue;
            }
            let exe = exe.ok_or_else(|| {
                RunError::Setup(
                    "splitting the fleet over processes needs the relay-loadtest binary".into(),
                )
            })?;
            let mut child = Process::new(exe)
                .arg("--worker")
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .map_err(|source| RunError::Spawn {
                    exe: exe.display().to_string(),
                    source,
                })?;
            let stdout = child
                .stdout
                .take()
                .ok_or_else(|| RunError::Setup("no worker stdout".into()))?;
            let stdin = child.stdin.take();
            let tx = tx.clone();
            std::thread::Builder::new()
                .name(format!("lt-link-{i}"))
                .spawn(move || {
                    let mut finished = false;
                    for line in BufReader::new(stdout).lines() {
                        let Ok(line) = line else { break };
                        match serde_json::from_str::<Reply>(&line) {
                            Ok(r) => {
                                finished |= matches!(r, Reply::Finished);
                                if tx.send((i, r)).is_err() {
                                    return;
                                }
                            }
                            Err(e) => {
                                let _ =
                                    tx.send((i, Reply::Failed(format!("unreadable reply: {e}"))));
                                return;
                            }
                        }
                    }
                    if !finished {
                        let _ = tx.send((i, Reply::Failed(format!("worker process {i} exited"))));
                    }
                })
                .map_err(|e| RunError::Setup(format!("cannot start a reader thread: {e}")))?;
            links.push(Link::Child { child, stdin });
        }
        Ok(Self {
            links,
            replies: rx,
            progress: vec![ProgressSnapshot::default(); n],
            heard: vec![Instant::now(); n],
        })
    }

    /// Pids of the worker processes (none when the worker runs in this process).
    fn child_pids(&self) -> Vec<u32> {
        self.links
            .iter()
            .filter_map(|l| match l {
                Link::Child { child, .. } => Some(child.id()),
                Link::Local(_) => None,
            })
            .collect()
    }

    fn broadcast(&mut self, make: impl Fn(usize) -> Command) -> Result<(), RunError> {
        for (i, l) in self.links.iter_mut().enumerate() {
            l.send(&make(i))
                .map_err(|e| RunError::Worker(format!("worker {i}: {e}")))?;
        }
        Ok(())
    }

    fn total(&self) -> ProgressSnapshot {
        let mut t = ProgressSnapshot::default();
        for p in &self.progress {
            t.add(p);
        }
        t
    }

    /// Waits until `take` has accepted one reply from every worker; progress replies
    /// update the line and `on_tick` runs between replies.
    fn gather<T>(
        &mut self,
        progress: &mut Progress,
        phase: &dyn Fn() -> String,
        mut take: impl FnMut(usize, Reply) -> Option<T>,
        on_tick: &mut dyn FnMut(),
    ) -> Result<Vec<T>, RunError> {
        let n = self.links.len();
        let mut got: Vec<Option<T>> = (0..n).map(|_| None).collect();
        let mut left = n;
        while left > 0 {
            on_tick();
            match self.replies.recv_timeout(Duration::from_millis(100)) {
                Ok((i, Reply::Progress(p))) => {
                    self.heard[i] = Instant::now();
                    self.progress[i] = p;
                    progress.update(&phase(), self.total());
                }
                Ok((i, Reply::Failed(e))) => {
                    return Err(RunError::Worker(format!("worker {i}: {e}")));
                }
                Ok((i, r)) => {
                    self.heard[i] = Instant::now();
                    if got[i].is_none()
                        && let Some(v) = take(i, r)
                    {
                        got[i] = Some(v);
                        left -= 1;
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if let Some(i) =
                        (0..n).find(|&i| got[i].is_none() && self.heard[i].elapsed() > SILENCE)
                    {
                        return Err(RunError::Worker(format!("worker {i} fell silent")));
                    }
                    progress.update(&phase(), self.total());
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    return Err(RunError::Worker("every worker has gone".into()));
                }
            }
        }
        Ok(got.into_iter().flatten().collect())
    }

    fn finish(mut self, progress: &mut Progress) {
        let _ = self.broadcast(|_| Command::Finish);
        let _ = self.gather(
            progress,
            &|| "closing".to_string(),
            |_, r| matches!(r, Reply::Finished).then_some(()),
            &mut || {},
        );
        for l in self.links {
            l.close(Duration::from_secs(5));
        }
    }
}

fn fresh_prefix() -> String {
    let x = (unix_ms() ^ ((std::process::id() as u64) << 24)) & 0xff_ffff_ffff;
    format!("lt{x:x}")
}

fn is_loopback(e: &Endpoint) -> bool {
    match e.addr().ip() {
        IpAddr::V4(v) => v.is_loopback(),
        IpAddr::V6(v) => v.is_loopback(),
    }
}

fn form_name(f: Form) -> &'static str {
    match f {
        Form::Binary => "binary",
        Form::Json => "json",
    }
}

/// The server process to sample.
fn find_server(s: &Scenario, ctl: &Endpoint) -> (Option<u32>, String) {
    if s.target.server_pid != 0 {
        return (Some(s.target.server_pid), "given".into());
    }
    if !is_loopback(ctl) {
        return (None, "server is not on this machine".into());
    }
    if ctl.is_echo() {
        return (None, "an echo target is not sampled".into());
    }
    let me = std::process::id();
    let port = ctl.addr().port();
    let pids: Vec<u32> = procstat::pids_listening_on(port)
        .into_iter()
        .filter(|p| *p != me)
        .collect();
    match pids.first() {
        Some(p) => (Some(*p), format!("listening on port {port}")),
        None => (None, format!("nothing found listening on port {port}")),
    }
}

/// Who the fleet is, in words, for capacity answers.
fn fleet_words(s: &Scenario, units: u64, per: f64) -> String {
    let l = &s.load;
    if s.is_echo() {
        return format!(
            "{} echo connections at {} msg/s each",
            group(units),
            fmt_rate(per)
        );
    }
    match s.pattern {
        Pattern::Telemetry => format!(
            "{} controllers at {} msg/s each to {} browser(s) each",
            group(units),
            fmt_rate(per),
            l.browsers_per_controller
        ),
        Pattern::Command => format!(
            "{} browser→controller pairs at {} commands/s each",
            group(units),
            fmt_rate(per)
        ),
        Pattern::Fanout => format!(
            "{} publisher(s) at {} msg/s each to groups of {} members ({} deliveries/s)",
            group(units),
            fmt_rate(per),
            group(l.members as u64),
            fmt_rate(per * units as f64 * l.members as f64)
        ),
        Pattern::Fanin => format!(
            "{} controllers at {} msg/s each into {} dashboard(s)",
            group(units),
            fmt_rate(per),
            l.dashboards
        ),
        Pattern::Idle => format!("{} idle controllers", group(units)),
        Pattern::Storm => "the fleet".to_string(),
    }
}

/// The sentence answering "how much does this server hold" for a rate ramp.
pub fn capacity_answer(
    s: &Scenario,
    best: Option<&crate::findmax::Outcome>,
    slo_ms: f64,
) -> String {
    let loss = s.find_max.max_loss * 100.0;
    let Some(b) = best else {
        return format!(
            "no rate tried met p99 < {slo_ms} ms with loss < {loss}%: lower find_max.start_rate or relax the SLO"
        );
    };
    let who = fleet_words(s, s.load.controllers as u64, s.per_sender_rate(b.rate));
    let who = if s.pattern == Pattern::Fanout {
        fleet_words(s, s.load.groups as u64, s.per_sender_rate(b.rate))
    } else {
        who
    };
    format!(
        "this server holds {who} ({} msg/s in all) with p99 {} < {slo_ms} ms and loss {:.3}% < {loss}%",
        fmt_rate(b.rate),
        fmt_us(b.p99_us),
        b.loss * 100.0
    )
}

/// The sentence answering "how many controllers does this server hold" for a fleet
/// ramp (`Outcome::rate` is the fleet size there).
pub fn fleet_answer(s: &Scenario, best: Option<&crate::findmax::Outcome>, slo_ms: f64) -> String {
    let loss = s.find_max.max_loss * 100.0;
    let per = s.load.rate.unwrap_or(0.0);
    let hb = s.load.heartbeat;
    let Some(b) = best else {
        return format!(
            "no fleet size tried met p99 < {slo_ms} ms with loss < {loss}%: lower find_max.start_fleet or relax the SLO"
        );
    };
    let units = b.rate.round() as u64;
    format!(
        "this server holds {} (heartbeat every {hb}) with p99 {} < {slo_ms} ms and loss {:.3}% < {loss}%",
        fleet_words(s, units, per),
        fmt_us(b.p99_us),
        b.loss * 100.0
    )
}

/// Rates of the failing steps during which the generator lagged its own schedule.
pub fn generator_limited(steps: &[StepReport]) -> Vec<f64> {
    steps
        .iter()
        .filter(|x| !x.passed && generator_lagged(x))
        .map(|x| x.total_rate)
        .collect()
}

/// Whether the generator, not only the server, shaped a step: its send lag p99 passed
/// [`GENERATOR_LAG_US`], or it used nearly all of the machine.
fn generator_lagged(x: &StepReport) -> bool {
    x.send_lag.p99_us > GENERATOR_LAG_US
        || x.generator
            .is_some_and(|g| g.machine_percent > GENERATOR_MACHINE_PERCENT)
}

/// Above this share of the machine the generator is taken to have run out of CPU.
pub const GENERATOR_MACHINE_PERCENT: f64 = 90.0;

/// Why a step failed: what broke (connections, nothing sent, losses, errors) and what
/// missed the SLO.
#[derive(Debug, Default, PartialEq)]
pub struct Judgement {
    pub broken: Vec<String>,
    pub slo: Vec<String>,
}

/// Judges one step against the SLO. `fixed`: a fixed run, where any lost message
/// breaks the run (a ramp step only has to stay under `max_loss`).
pub fn judge(s: &Scenario, x: &StepReport, fixed: bool) -> Judgement {
    let mut j = Judgement::default();
    let slo_us = (s.find_max.slo_p99.as_nanos() / 1000).max(1);
    let slo = fmt_us(slo_us);
    if x.connected < x.connections_needed {
        j.broken.push(format!(
            "{} of {} connections were not up",
            group(x.connections_needed - x.connected),
            group(x.connections_needed)
        ));
    }
    if s.pattern.sends_data() && x.rate_per_sender > 0.0 {
        if x.sent == 0 {
            j.broken.push("nothing was sent".into());
        } else if x.received == 0 {
            j.broken.push("nothing was received".into());
        }
        if fixed && x.lost > 0 {
            j.broken.push(format!(
                "{} messages lost ({:.4}%)",
                group(x.lost),
                x.loss_ratio * 100.0
            ));
        }
        if x.loss_ratio >= s.find_max.max_loss && x.lost > 0 {
            j.slo.push(format!(
                "loss {:.4}% ≥ {}%",
                x.loss_ratio * 100.0,
                s.find_max.max_loss * 100.0
            ));
        }
        if x.latency.count > 0 && x.latency.p99_us >= slo_us {
            j.slo
                .push(format!("p99 {} ≥ {slo}", fmt_us(x.latency.p99_us)));
        }
    } else if s.pattern != Pattern::Storm {
        if x.pings == 0 {
            j.broken.push("no heartbeats were sent".into());
        } else if x.pongs < x.pings {
            j.broken.push(format!(
                "{} of {} heartbeats unanswered",
                group(x.pings - x.pongs),
                group(x.pings)
            ));
        }
        if x.heartbeat.count > 0 && x.heartbeat.p99_us >= slo_us {
            j.slo.push(format!(
                "heartbeat p99 {} ≥ {slo}",
                fmt_us(x.heartbeat.p99_us)
            ));
        }
    }
    let errors: u64 = x.errors.values().sum();
    if errors > 0 {
        j.broken.push(format!(
            "{} errors ({})",
            group(errors),
            x.errors
                .iter()
                .map(|(k, v)| format!("{k}={}", group(*v)))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    j
}

/// What capped the connect phase, if anything: the tool's open files or ports, or the
/// server not taking every connection.
fn connect_limit(c: &ConnectStats) -> Option<Note> {
    if c.failed == 0 {
        return None;
    }
    let count = |k: &str| c.errors.get(k).copied().unwrap_or(0);
    let errs = c
        .errors
        .iter()
        .map(|(k, v)| format!("{k}={}", group(*v)))
        .collect::<Vec<_>>()
        .join(", ");
    let (kind, who) = if count("fd_limit") > 0 {
        (LimitKind::OpenFiles, "the tool ran out of open files")
    } else if count("source_ports_exhausted") > 0 {
        (
            LimitKind::Ports,
            "the tool ran out of ephemeral ports (add --source-addrs)",
        )
    } else if c.errors.keys().any(|k| k.starts_with("tls:")) {
        (
            LimitKind::Connections,
            "their TLS handshakes failed (check --ca-file, --tls-server-name and the client certificate)",
        )
    } else {
        (LimitKind::Connections, "the server did not take them")
    };
    Some(Note::limit(
        kind,
        format!(
            "{} of {} connections failed: {who} ({errs})",
            group(c.failed),
            group(c.planned)
        ),
    ))
}

/// The run as planned before anything connects: endpoints, fleet, workers, source
/// addresses and the limits that shaped them.
struct Prepared {
    s: Scenario,
    ctl: Endpoint,
    plan: Plan,
    nofile: NoFile,
    wplan: limits::WorkerPlan,
    sources: Vec<Ipv4Addr>,
    ports: u64,
    threads: u32,
    cores: u32,
    notes: Vec<Note>,
}

fn prepare(s: &Scenario, opts: &RunOptions) -> Result<Prepared, RunError> {
    s.validate("scenario")?;
    let mut s = s.clone();
    if s.target.prefix.is_empty() {
        s.target.prefix = fresh_prefix();
    }
    let ctl = s.controller_endpoint().map_err(RunError::Setup)?;
    let br = s.browser_endpoint().map_err(RunError::Setup)?;
    let plan = Plan::new(&s, &s.target.prefix);
    let mut notes = Vec::new();
    let nofile = match limits::raise_nofile() {
        Ok(n) => n,
        Err(e) => {
            notes.push(Note::info(format!(
                "could not raise the open-file limit: {e}"
            )));
            limits::nofile().unwrap_or(NoFile {
                soft: 1024,
                hard: 1024,
            })
        }
    };
    let asked = plan.count();
    let wplan = limits::plan_workers(asked, s.run.workers, nofile.hard, s.run.fd_reserve as u64);
    notes.extend(wplan.notes.iter().cloned());
    if wplan.workers > 1 && opts.worker_exe.is_none() {
        return Err(RunError::Setup(format!(
            "{} connections need {} worker processes, which only the relay-loadtest binary can start",
            asked, wplan.workers
        )));
    }
    let (lo, hi) = limits::port_range();
    let ports = (hi - lo) as u64 + 1;
    let (n_ctl, n_br) = plan.sides();
    let per_destination = if ctl.addr() == br.addr() {
        n_ctl + n_br
    } else {
        n_ctl.max(n_br)
    };
    let requested = s.source_addrs().map_err(RunError::Setup)?;
    let (sources, src_notes) = limits::plan_sources(
        &requested,
        per_destination,
        ports,
        is_loopback(&ctl) && is_loopback(&br),
    );
    notes.extend(src_notes);
    let cores = std::thread::available_parallelism()
        .map(|n| n.get() as u32)
        .unwrap_or(1);
    let threads = if s.run.threads > 0 {
        s.run.threads
    } else {
        (cores / wplan.workers).max(1)
    };
    Ok(Prepared {
        s,
        ctl,
        plan,
        nofile,
        wplan,
        sources,
        ports,
        threads,
        cores,
        notes,
    })
}

/// A group of processes whose CPU time the run follows.
struct Watched {
    name: String,
    pids: Vec<u32>,
    found_by: String,
    /// (t_ns, summed CPU µs) readings.
    samples: Vec<(u64, u64)>,
}

impl Watched {
    fn new(name: &str, pids: Vec<u32>, found_by: String) -> Self {
        Self {
            name: name.to_string(),
            pids,
            found_by,
            samples: Vec::new(),
        }
    }

    /// Reads the summed CPU time now and keeps the reading.
    fn mark(&mut self) -> Option<(u64, u64)> {
        let mut cpu = 0;
        let mut t = 0;
        for &pid in &self.pids {
            let x = procstat::sample(pid).ok()?;
            cpu += x.cpu_us;
            t = x.t_ns;
        }
        if self.pids.is_empty() {
            return None;
        }
        self.samples.push((t, cpu));
        Some((t, cpu))
    }

    fn report(&self, cores: u32) -> ProcReport {
        let (cpu_s, machine_percent) = match (self.samples.first(), self.samples.last()) {
            (Some(a), Some(b)) if b.0 > a.0 => {
                let cpu = b.1.saturating_sub(a.1) as f64;
                let wall = (b.0 - a.0) as f64 / 1000.0;
                (cpu / 1e6, 100.0 * cpu / (wall * cores.max(1) as f64))
            }
            _ => (0.0, 0.0),
        };
        ProcReport {
            name: self.name.clone(),
            pids: self.pids.clone(),
            found_by: self.found_by.clone(),
            cpu_s,
            machine_percent,
            cpu_over_time: cpu_series(&self.samples),
        }
    }
}

/// (seconds since the first reading, percent of one core) between readings.
pub fn cpu_series(samples: &[(u64, u64)]) -> Vec<(f64, f64)> {
    let Some(first) = samples.first() else {
        return Vec::new();
    };
    samples
        .windows(2)
        .filter(|w| w[1].0 > w[0].0)
        .map(|w| {
            let wall = (w[1].0 - w[0].0) as f64;
            let cpu = w[1].1.saturating_sub(w[0].1) as f64 * 1000.0;
            ((w[1].0 - first.0) as f64 / 1e9, 100.0 * cpu / wall)
        })
        .collect()
}

/// CPU of one watched group over a step.
fn cpu_step(a: (u64, u64), b: (u64, u64), cores: u32, msgs: u64) -> CpuStep {
    let cpu_us = b.1.saturating_sub(a.1) as f64;
    let wall_us = b.0.saturating_sub(a.0) as f64 / 1000.0;
    let pct = if wall_us > 0.0 {
        100.0 * cpu_us / wall_us
    } else {
        0.0
    };
    CpuStep {
        cpu_s: cpu_us / 1e6,
        cpu_percent: pct,
        machine_percent: pct / cores.max(1) as f64,
        cpu_us_per_msg: if msgs > 0 { cpu_us / msgs as f64 } else { 0.0 },
    }
}

/// Readings at a step's start: the server, the generator, each watched process.
type StepMarks = (
    Option<ProcSample>,
    Option<(u64, u64)>,
    Vec<Option<(u64, u64)>>,
);

/// Everything a running scenario holds between its phases.
struct Runner<'a> {
    p: &'a Prepared,
    fleet: Fleet,
    progress: Progress,
    sampler: Option<&'a Sampler>,
    /// The generator: this process and its worker processes.
    generator: Watched,
    /// `target.watch` processes.
    watched: Vec<Watched>,
    /// When the watched processes were last read (they are read every sample interval).
    last_watch: Instant,
    /// Every connect phase and resize, merged.
    connect: ConnectStats,
    /// Connections held now.
    holding: u64,
    /// Fleet units connected now.
    units: u64,
}

impl Runner<'_> {
    fn tick_watch(&mut self) {
        if self.last_watch.elapsed() >= self.p.s.run.sample_interval.0 {
            self.last_watch = Instant::now();
            self.generator.mark();
            for w in &mut self.watched {
                w.mark();
            }
        }
    }

    /// Connects (or resizes to) the clients of the first `units` fleet units.
    fn connect(&mut self, units: u64, first: bool) -> Result<ConnectStats, RunError> {
        if !first {
            self.fleet.broadcast(|_| Command::Resize { units })?;
        }
        let planned = self.p.plan.clients_in(units);
        let mut gen_mark = || {};
        let parts = self.fleet.gather(
            &mut self.progress,
            &|| format!("connecting {} planned", group(planned)),
            |_, r| match r {
                Reply::Connected(c) => Some(*c),
                _ => None,
            },
            &mut gen_mark,
        )?;
        let mut c = ConnectStats::default();
        for x in &parts {
            c.merge(x);
        }
        self.holding = c.holding;
        self.units = units;
        self.connect.merge(&c);
        self.connect.holding = c.holding;
        Ok(c)
    }

    /// Runs one step on every worker and merges the results.
    fn step(&mut self, id: u32, total_rate: f64, duration_ns: u64) -> Result<StepReport, RunError> {
        let s = &self.p.s;
        let per_sender = if s.ramps_fleet() {
            s.load.rate.unwrap_or(0.0)
        } else {
            s.per_sender_rate(total_rate)
        };
        let start_ns = mono_ns() + s.run.start_lead.as_nanos();
        let plan = StepPlan {
            id,
            rate: per_sender,
            start_ns,
            end_ns: start_ns + duration_ns,
        };
        let drain_ns = s.load.drain.as_nanos();
        self.fleet.broadcast(|_| Command::Step { plan, drain_ns })?;
        let mut marks: Option<StepMarks> = None;
        let phase = move || {
            let now = mono_ns();
            let t = now.saturating_sub(start_ns) as f64 / 1e9;
            let d = duration_ns as f64 / 1e9;
            if now < start_ns {
                format!("step {id} @ {} msg/s starting", fmt_rate(total_rate))
            } else if now < start_ns + duration_ns {
                format!("step {id} @ {} msg/s {t:.0}/{d:.0}s", fmt_rate(total_rate))
            } else {
                format!("step {id} @ {} msg/s draining", fmt_rate(total_rate))
            }
        };
        let sampler = self.sampler;
        let generator = &mut self.generator;
        let watched = &mut self.watched;
        let last_watch = &mut self.last_watch;
        let interval = s.run.sample_interval.0;
        let parts = self.fleet.gather(
            &mut self.progress,
            &phase,
            |_, r| match r {
                Reply::StepDone { id: got, stats } if got == id => Some(*stats),
                _ => None,
            },
            &mut || {
                if marks.is_none() && mono_ns() >= start_ns {
                    marks = Some((
                        sampler.and_then(|x| x.mark()),
                        generator.mark(),
                        watched.iter_mut().map(|w| w.mark()).collect(),
                    ));
                    *last_watch = Instant::now();
                } else if last_watch.elapsed() >= interval {
                    *last_watch = Instant::now();
                    generator.mark();
                    for w in watched.iter_mut() {
                        w.mark();
                    }
                }
            },
        )?;
        let cpu1 = self.sampler.and_then(|x| x.mark());
        let gen1 = self.generator.mark();
        let watched1: Vec<Option<(u64, u64)>> = self.watched.iter_mut().map(|w| w.mark()).collect();
        let mut merged = StepStats::default();
        for p in &parts {
            merged.merge(p);
        }
        let mut rep = StepReport::new(
            id,
            per_sender,
            total_rate,
            duration_ns as f64 / 1e9,
            &merged,
        );
        rep.fleet = self.units;
        // Held at connect time and still open at the step's end: a connection the
        // server accepted and then closed does not count as up.
        rep.connected = self.holding.min(merged.held);
        rep.connections_needed = self
            .p
            .plan
            .clients_in(self.units)
            .min(self.p.wplan.connections);
        let (cpu0, gen0, watched0) = marks.unwrap_or((None, None, Vec::new()));
        if let (Some(a), Some(b)) = (cpu0, cpu1) {
            let cpu_us = b.cpu_us.saturating_sub(a.cpu_us) as f64;
            let wall_us = b.t_ns.saturating_sub(a.t_ns) as f64 / 1000.0;
            let delivered = (merged.received + merged.pongs).max(1) as f64;
            rep.server = Some(ServerStep {
                cpu_s: cpu_us / 1e6,
                cpu_percent: if wall_us > 0.0 {
                    100.0 * cpu_us / wall_us
                } else {
                    0.0
                },
                cpu_us_per_msg: cpu_us / delivered,
                rss_bytes: b.rss_bytes,
            });
        }
        let cores = self.p.cores;
        if let (Some(a), Some(b)) = (gen0, gen1) {
            let msgs = merged.sent + merged.received + merged.pings + merged.pongs;
            rep.generator = Some(cpu_step(a, b, cores, msgs));
        }
        for (i, w) in self.watched.iter().enumerate() {
            if let (Some(Some(a)), Some(Some(b))) = (watched0.get(i), watched1.get(i)) {
                rep.watched
                    .insert(w.name.clone(), cpu_step(*a, *b, cores, 0));
            }
        }
        Ok(rep)
    }

    /// One step at the scenario's rate for its duration.
    fn fixed(&mut self) -> Result<Vec<StepReport>, RunError> {
        let s = &self.p.s;
        let total = if s.pattern.sends_data() {
            s.total_rate().unwrap_or(0.0)
        } else {
            0.0
        };
        let mut rep = self.step(1, total, s.load.duration.as_nanos())?;
        settle(s, &mut rep, true);
        Ok(vec![rep])
    }

    fn log_step(&mut self, rep: &StepReport, what: &str) {
        let verdict = if rep.passed {
            "pass".to_string()
        } else {
            format!("fail: {}", rep.failures.join("; "))
        };
        self.progress.println(&format!(
            "step {}: {what}  p99 {}  loss {:.4}%  {verdict}",
            rep.index,
            fmt_us(rep.latency.p99_us.max(rep.heartbeat.p99_us)),
            rep.loss_ratio * 100.0,
        ));
    }

    fn ramp_config(&self, start: f64, max: f64) -> RampConfig {
        let f = &self.p.s.find_max;
        RampConfig {
            start,
            factor: f.factor,
            max_steps: f.max_steps,
            refine_steps: f.refine_steps,
            max_rate: max,
            slo_p99_us: (f.slo_p99.as_nanos() / 1000).max(1),
            max_loss: f.max_loss,
        }
    }

    /// The rate ramp over the connected fleet.
    fn ramp_rate(&mut self) -> Result<(Vec<StepReport>, FindMaxReport), RunError> {
        let s = &self.p.s;
        let f = &s.find_max;
        let start = f
            .start_rate
            .or(s.total_rate())
            .unwrap_or(s.senders() as f64);
        let mut ramp = Ramp::new(self.ramp_config(start, f.max_rate));
        let mut rate = ramp.first();
        let mut steps = Vec::new();
        for id in 1.. {
            let mut rep = self.step(id, rate, f.step_duration.as_nanos())?;
            settle(s, &mut rep, false);
            let next = ramp.observe_judged(
                rate,
                rep.latency.p99_us,
                rep.loss_ratio,
                rep.received,
                rep.passed,
            );
            self.log_step(&rep, &format!("{} msg/s", fmt_rate(rate)));
            steps.push(rep);
            match next {
                Some(r) => rate = r,
                None => break,
            }
        }
        let slo_ms = f.slo_p99.as_secs_f64() * 1000.0;
        let limited = generator_limited(&steps);
        let mut answer = capacity_answer(s, ramp.best().as_ref(), slo_ms);
        if let Some(r) = limited.iter().copied().reduce(f64::min) {
            answer.push_str(&format!(
                " — a lower bound: at {} msg/s the generator itself fell behind (send lag p99 over {} or over {GENERATOR_MACHINE_PERCENT}% of the machine), so run it with more --workers/--threads or on another machine",
                fmt_rate(r),
                fmt_us(GENERATOR_LAG_US)
            ));
        }
        let stopped = stopped_by(&steps, ramp.first_failure(), RampBy::Rate);
        let report = ramp_report(RampBy::Rate, f, &ramp, limited, answer, stopped);
        Ok((steps, report))
    }

    /// The fleet ramp: grow (or shrink) the connected fleet, each unit at the
    /// scenario's per-sender rate, and find the largest that meets the SLO.
    fn ramp_fleet(&mut self) -> Result<(Vec<StepReport>, FindMaxReport), RunError> {
        let s = &self.p.s;
        let f = &s.find_max;
        let max = self.p.plan.units();
        let per = if s.pattern.sends_data() {
            s.load.rate.unwrap_or(0.0)
        } else {
            0.0
        };
        let mut ramp = Ramp::new(self.ramp_config(self.units as f64, max as f64));
        let mut units = self.units;
        let mut tried = std::collections::BTreeSet::new();
        let mut steps = Vec::new();
        for id in 1.. {
            if id > 1 {
                self.connect(units, false)?;
            }
            tried.insert(units);
            let senders = if s.pattern.sends_data() { units } else { 0 };
            let mut rep = self.step(id, per * senders as f64, f.step_duration.as_nanos())?;
            settle(s, &mut rep, false);
            let p99 = if s.pattern.sends_data() {
                rep.latency.p99_us
            } else {
                rep.heartbeat.p99_us
            };
            let received = rep.received + rep.pongs;
            let next = ramp.observe_judged(units as f64, p99, rep.loss_ratio, received, rep.passed);
            self.log_step(&rep, &format!("fleet {}", group(units)));
            steps.push(rep);
            let Some(n) = next.map(|x| (x.round() as u64).clamp(1, max)) else {
                break;
            };
            if tried.contains(&n) {
                break;
            }
            units = n;
        }
        let slo_ms = f.slo_p99.as_secs_f64() * 1000.0;
        let limited: Vec<f64> = steps
            .iter()
            .filter(|x| !x.passed && generator_lagged(x))
            .map(|x| x.fleet as f64)
            .collect();
        let mut answer = fleet_answer(s, ramp.best().as_ref(), slo_ms);
        if let Some(n) = limited.iter().copied().reduce(f64::min) {
            answer.push_str(&format!(
                " — a lower bound: at a fleet of {} the generator itself fell behind, so run it with more --workers/--threads or on another machine",
                group(n as u64)
            ));
        }
        let mut stopped = stopped_by(&steps, ramp.first_failure(), RampBy::Fleet);
        if ramp.first_failure().is_none() && ramp.best().is_some_and(|b| b.rate >= max as f64) {
            stopped = format!(
                "nothing: the ramp reached its ceiling of {} (load.{}); raise it to search further",
                group(max),
                if s.pattern == Pattern::Fanout {
                    "groups"
                } else {
                    "controllers"
                }
            );
        }
        let report = ramp_report(RampBy::Fleet, f, &ramp, limited, answer, stopped);
        Ok((steps, report))
    }
}

/// Judges a step against the SLO and records whether it passed and why not.
fn settle(s: &Scenario, rep: &mut StepReport, fixed: bool) {
    let j = judge(s, rep, fixed);
    rep.passed = j.broken.is_empty() && j.slo.is_empty();
    rep.failures = j.broken.into_iter().chain(j.slo).collect();
}

/// The report of a finished ramp over `by`.
fn ramp_report(
    by: RampBy,
    f: &FindMaxSpec,
    ramp: &Ramp,
    generator_limited: Vec<f64>,
    answer: String,
    stopped_by: String,
) -> FindMaxReport {
    FindMaxReport {
        by,
        slo_p99_ms: f.slo_p99.as_secs_f64() * 1000.0,
        max_loss: f.max_loss,
        steps: ramp.history().to_vec(),
        best: ramp.best(),
        first_failure: ramp.first_failure(),
        generator_limited,
        answer,
        stopped_by,
    }
}

/// What stopped a ramp: the reasons of the step at its first failing value.
fn stopped_by(steps: &[StepReport], first_failure: Option<f64>, by: RampBy) -> String {
    let Some(v) = first_failure else {
        return "no step failed (the ramp ran out of steps or reached its bound)".into();
    };
    let step = steps.iter().find(|x| {
        !x.passed
            && if by == RampBy::Fleet {
                x.fleet as f64 == v.round()
            } else {
                x.total_rate == v
            }
    });
    match step {
        Some(x) => {
            let at = if by == RampBy::Fleet {
                format!("a fleet of {}", group(x.fleet))
            } else {
                format!("{} msg/s", fmt_rate(x.total_rate))
            };
            let mut why = format!("at {at}: {}", x.failures.join("; "));
            if generator_lagged(x) {
                why.push_str(" (the generator itself fell behind there)");
            }
            why
        }
        None => String::new(),
    }
}

/// The run's verdict from its steps, connect phase and notes.
fn verdict(
    p: &Prepared,
    connect: &ConnectStats,
    steps: &[StepReport],
    find_max: Option<&FindMaxReport>,
    notes: &[Note],
) -> Verdict {
    let mut broken = Vec::new();
    let mut slo = Vec::new();
    let asked = p.plan.count();
    let fleet_ramp = find_max.is_some_and(|f| f.by == RampBy::Fleet);
    if p.wplan.connections < asked {
        broken.push(format!(
            "capped at {} of {} connections",
            group(p.wplan.connections),
            group(asked)
        ));
    }
    if !fleet_ramp && connect.established < connect.planned {
        let why = connect
            .errors
            .iter()
            .map(|(k, v)| format!("{k}={}", group(*v)))
            .collect::<Vec<_>>()
            .join(", ");
        broken.push(if why.is_empty() {
            format!(
                "{} of {} connections failed",
                group(connect.planned - connect.established),
                group(connect.planned)
            )
        } else {
            format!(
                "{} of {} connections failed ({why})",
                group(connect.planned - connect.established),
                group(connect.planned)
            )
        });
    }
    match find_max {
        None => {
            for x in steps {
                let j = judge(&p.s, x, true);
                broken.extend(
                    j.broken
                        .into_iter()
                        .map(|f| format!("step {}: {f}", x.index)),
                );
                slo.extend(j.slo.into_iter().map(|f| format!("step {}: {f}", x.index)));
            }
        }
        Some(f) => {
            if f.best.is_none() {
                slo.push(format!(
                    "no {} met the SLO",
                    if fleet_ramp { "fleet size" } else { "rate" }
                ));
            }
        }
    }
    // One limit, in one sentence: the planned caps first, then what the run hit.
    let mut limited_by = notes
        .iter()
        .find(|n| n.limit.is_some())
        .map(|n| n.text.clone());
    if limited_by.is_none() {
        let lagged = match find_max {
            None => steps.iter().find(|x| generator_lagged(x)),
            Some(f) => steps.iter().find(|x| {
                !x.passed
                    && generator_lagged(x)
                    && f.first_failure.is_some_and(|v| {
                        v == x.total_rate || (fleet_ramp && v.round() == x.fleet as f64)
                    })
            }),
        };
        if let Some(x) = lagged {
            limited_by = Some(format!(
                "the generator itself: at step {} its send lag p99 was {} and it used {:.0}% of the machine, so latency there is partly the tool's (give it more --workers/--threads or another machine)",
                x.index,
                fmt_us(x.send_lag.p99_us),
                x.generator.map_or(0.0, |g| g.machine_percent)
            ));
        }
    }
    let exit_code = if !broken.is_empty() {
        2
    } else if !slo.is_empty() {
        3
    } else {
        0
    };
    Verdict {
        passed: exit_code == 0,
        exit_code,
        failures: broken.into_iter().chain(slo).collect(),
        limited_by,
    }
}

/// The server process the run samples, and how it was found.
struct ServerWatch {
    pid: Option<u32>,
    found_by: String,
    sampler: Option<Sampler>,
    /// Its RSS before anything connects.
    rss_before: Option<u64>,
}

/// Finds the server and starts sampling it; a server that cannot be read is noted.
fn watch_server(s: &Scenario, ctl: &Endpoint, notes: &mut Vec<Note>) -> ServerWatch {
    let (pid, found_by) = find_server(s, ctl);
    let sampler = pid.and_then(|x| Sampler::start(x, s.run.sample_interval.0).ok());
    if pid.is_some() && sampler.is_none() {
        notes.push(Note::info(format!(
            "cannot read /proc of server pid {}",
            pid.unwrap_or(0)
        )));
    }
    ServerWatch {
        pid,
        found_by,
        sampler,
        rss_before: None,
    }
}

/// The `target.watch` processes that can be read; the others are noted.
fn watch_targets(s: &Scenario, notes: &mut Vec<Note>) -> Vec<Watched> {
    let mut watched = Vec::new();
    for w in &s.target.watch {
        let Ok(spec) = WatchSpec::parse(w) else {
            continue;
        };
        let (pids, how) = match &spec {
            WatchSpec::Pid(_, pid) => (vec![*pid], "given".to_string()),
            WatchSpec::Port(_, port) => (
                procstat::pids_listening_on(*port)
                    .into_iter()
                    .filter(|x| *x != std::process::id())
                    .take(1)
                    .collect(),
                format!("listening on port {port}"),
            ),
        };
        if pids.iter().any(|x| procstat::sample(*x).is_err()) || pids.is_empty() {
            notes.push(Note::info(format!(
                "{}: not watched ({how}: no readable process)",
                spec.name()
            )));
            continue;
        }
        watched.push(Watched::new(spec.name(), pids, how));
    }
    watched
}

/// The fleet units connected first: all of them, or a fleet ramp's starting size.
fn first_units(p: &Prepared) -> u64 {
    let s = &p.s;
    let max = p.plan.units();
    if s.ramps_fleet() {
        s.find_max
            .start_fleet
            .map(|n| n as u64)
            .unwrap_or((max / 10).max(1))
            .min(max)
    } else {
        max
    }
}

/// What the connect and step phases produced.
struct Phases {
    /// The first connect phase.
    connect: ConnectStats,
    /// The server's RSS once the first fleet was connected.
    rss_connected: Option<u64>,
    steps: Vec<StepReport>,
    find_max: Option<FindMaxReport>,
}

/// What the runner leaves once its workers have stopped.
struct Stopped {
    generator: Watched,
    watched: Vec<Watched>,
    /// Every connect phase and resize, merged.
    all_connects: ConnectStats,
}

impl<'a> Runner<'a> {
    /// Starts the workers and takes the first CPU readings.
    fn start(
        p: &'a Prepared,
        opts: &RunOptions,
        progress: Progress,
        sampler: Option<&'a Sampler>,
        mut watched: Vec<Watched>,
    ) -> Result<Self, RunError> {
        let fleet = Fleet::start(p.wplan.workers as usize, opts.worker_exe.as_ref())?;
        let mut generator = Watched::new(
            "generator",
            std::iter::once(std::process::id())
                .chain(fleet.child_pids())
                .collect(),
            "this process and its workers".into(),
        );
        generator.mark();
        for w in &mut watched {
            w.mark();
        }
        Ok(Runner {
            p,
            fleet,
            progress,
            sampler,
            generator,
            watched,
            last_watch: Instant::now(),
            connect: ConnectStats::default(),
            holding: 0,
            units: first_units(p),
        })
    }

    /// Connects the first fleet, then runs the fixed step or the ramp.
    fn phases(&mut self) -> Result<Phases, RunError> {
        let p = self.p;
        let s = &p.s;
        let connect_start_ns = mono_ns() + s.run.start_lead.as_nanos();
        let fleet_ramp = s.ramps_fleet();
        let first_units = self.units;
        let setup = |i: usize| WorkerSetup {
            scenario: s.clone(),
            prefix: s.target.prefix.clone(),
            worker: i as u32,
            workers: p.wplan.workers,
            threads: p.threads,
            sources: p.sources.clone(),
            connect_start_ns,
            max_connections: p.wplan.per_process,
            units: fleet_ramp.then_some(first_units),
        };
        self.fleet
            .broadcast(|i| Command::Connect(Box::new(setup(i))))?;
        let connect = self.connect(first_units, true)?;
        self.tick_watch();
        let rss_connected = self.sampler.and_then(|x| x.mark()).map(|x| x.rss_bytes);
        let (steps, find_max) = if !s.find_max.enabled {
            (self.fixed()?, None)
        } else if fleet_ramp {
            let (a, b) = self.ramp_fleet()?;
            (a, Some(b))
        } else {
            let (a, b) = self.ramp_rate()?;
            (a, Some(b))
        };
        Ok(Phases {
            connect,
            rss_connected,
            steps,
            find_max,
        })
    }

    /// Takes the last CPU readings and stops the workers.
    fn stop(mut self) -> Stopped {
        self.generator.mark();
        for w in &mut self.watched {
            w.mark();
        }
        let Runner {
            fleet,
            mut progress,
            generator,
            watched,
            connect: all_connects,
            ..
        } = self;
        fleet.finish(&mut progress);
        progress.finish();
        Stopped {
            generator,
            watched,
            all_connects,
        }
    }
}

/// Runs `s` and returns its report.
pub fn run(s: &Scenario, opts: &RunOptions) -> Result<Report, RunError> {
    let p = prepare(s, opts)?;
    let progress = Progress::new(opts.progress);
    for n in p.notes.iter().filter(|n| n.limit.is_some()) {
        progress.println(&format!("LIMIT: {}", n.text));
    }
    let mut notes = p.notes.clone();
    let mut server = watch_server(&p.s, &p.ctl, &mut notes);
    let watched = watch_targets(&p.s, &mut notes);
    server.rss_before = server
        .sampler
        .as_ref()
        .and_then(|x| x.mark())
        .map(|x| x.rss_bytes);

    let started_unix_ms = unix_ms();
    let mut r = Runner::start(&p, opts, progress, server.sampler.as_ref(), watched)?;
    let phases = r.phases();
    let stopped = r.stop();
    let phases = phases?;
    Ok(assemble(
        &p,
        server,
        notes,
        started_unix_ms,
        phases,
        stopped,
    ))
}

/// The server's memory and CPU over the run, from its samples.
fn server_report(server: ServerWatch, phases: &Phases) -> Option<ServerReport> {
    let ServerWatch {
        pid,
        found_by,
        sampler,
        rss_before,
    } = server;
    sampler.map(|smp| {
        let samples: Vec<ProcSample> = smp.stop();
        let peak = samples.iter().map(|x| x.rss_bytes).max().unwrap_or(0);
        let cpu_total = match (samples.first(), samples.last()) {
            (Some(a), Some(b)) => b.cpu_us.saturating_sub(a.cpu_us) as f64 / 1e6,
            _ => 0.0,
        };
        let before = rss_before.unwrap_or(0);
        let connected = phases.rss_connected.unwrap_or(before);
        let established = phases.connect.established;
        ServerReport {
            pid: pid.unwrap_or(0),
            found_by,
            rss_before_bytes: before,
            rss_connected_bytes: connected,
            rss_peak_bytes: peak,
            bytes_per_connection: (established > 0)
                .then(|| (connected as f64 - before as f64) / established as f64),
            cpu_total_s: cpu_total,
            samples,
        }
    })
}

/// Where the load went and in which forms.
fn target_report(p: &Prepared) -> TargetReport {
    let s = &p.s;
    let mqtt = p.ctl.is_mqtt();
    let kind = if mqtt {
        "mqtt"
    } else if p.ctl.is_echo() {
        "echo"
    } else {
        "relay"
    };
    let form = |f: Form| if mqtt { "mqtt" } else { form_name(f) }.to_string();
    TargetReport {
        kind: kind.into(),
        controllers: s.target.controllers.clone(),
        browsers: if mqtt || p.ctl.is_echo() {
            s.target.controllers.clone()
        } else {
            s.target.browsers.clone()
        },
        controller_form: form(s.target.controller_form),
        browser_form: form(s.target.browser_form),
        prefix: s.target.prefix.clone(),
        spread: (s.targets() > 1).then(|| {
            let sp = p.plan.spread();
            crate::report::SpreadReport {
                targets: crate::scenario::split_urls(&s.target.controllers)
                    .into_iter()
                    .zip(sp.clients)
                    .map(|(url, clients)| crate::report::TargetClients {
                        url: url.to_owned(),
                        clients,
                    })
                    .collect(),
                pairs: sp.pairs,
                cross_pairs: sp.cross,
            }
        }),
    }
}

/// The report of a finished run: the server, the limits met, the verdict.
fn assemble(
    p: &Prepared,
    server: ServerWatch,
    mut notes: Vec<Note>,
    started_unix_ms: u64,
    phases: Phases,
    stopped: Stopped,
) -> Report {
    let s = &p.s;
    let found_by = server.found_by.clone();
    let server = server_report(server, &phases);
    if server.is_none() {
        notes.push(Note::info(format!("server not sampled: {found_by}")));
    }
    for n in &stopped.all_connects.notes {
        notes.push(Note::limit(LimitKind::OpenFiles, n.clone()));
    }
    // A fleet ramp that stops at refused connections found the server's limit; that is
    // its answer, not a cap of the run.
    let fleet_ramp = s.ramps_fleet();
    if !fleet_ramp && let Some(n) = connect_limit(&phases.connect) {
        notes.push(n);
    }
    let asked = p.plan.count();
    let capped = p.wplan.connections < asked || notes.iter().any(|n| n.limit.is_some());
    let verdict = verdict(
        p,
        &phases.connect,
        &phases.steps,
        phases.find_max.as_ref(),
        &notes,
    );
    let (n_ctl, n_br) = p.plan.sides();
    Report {
        tool: "relay-loadtest".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        name: s.name.clone(),
        description: s.description.clone(),
        pattern: s.pattern,
        started_unix_ms,
        verdict,
        slo: Slo {
            p99_ms: s.find_max.slo_p99.as_secs_f64() * 1000.0,
            max_loss: s.find_max.max_loss,
        },
        cores: p.cores,
        target: target_report(p),
        fleet: FleetReport {
            controllers: n_ctl,
            browsers: n_br,
            connections: asked,
            senders: s.senders(),
            payload_bytes: s.load.payload_bytes,
            heartbeat_s: s.load.heartbeat.as_secs_f64(),
        },
        workers: p.wplan.workers,
        threads_per_worker: p.threads,
        connect: ConnectReport::new(&phases.connect),
        steps: phases.steps,
        server,
        generator: Some(stopped.generator.report(p.cores)),
        watched: stopped.watched.iter().map(|w| w.report(p.cores)).collect(),
        limits: LimitsReport {
            nofile_soft: p.nofile.soft,
            nofile_hard: p.nofile.hard,
            per_process_connections: p.wplan.per_process,
            ephemeral_ports: p.ports,
            source_addrs: p.sources.iter().map(|a| a.to_string()).collect(),
            connections_asked: asked,
            connections_planned: p.wplan.connections,
            capped,
            notes,
        },
        find_max: phases.find_max,
    }
}

#[cfg(test)]
// Tests build values field by field from the defaults, which reads clearer here.
#[allow(clippy::field_reassign_with_default)]
mod tests {
    use super::*;
    use crate::findmax::Outcome;

    #[test]
    fn the_capacity_answer_names_fleet_rate_and_slo() {
        let mut s = Scenario::default();
        s.load.controllers = 1000;
        let o = Outcome {
            rate: 20_000.0,
            p99_us: 4_200,
            loss: 0.0,
            received: 1,
            passed: true,
        };
        let a = capacity_answer(&s, Some(&o), 10.0);
        assert_eq!(
            a,
            "this server holds 1,000 controllers at 20.0 msg/s each to 1 browser(s) each (20,000 msg/s in all) with p99 4.20 ms < 10 ms and loss 0.000% < 0.1%"
        );
        assert!(capacity_answer(&s, None, 10.0).starts_with("no rate tried"));
    }

    #[test]
    fn failing_steps_with_a_lagging_generator_are_flagged() {
        let step = |rate: f64, lag_us: u64, passed: bool| {
            let mut st = StepStats::default();
            st.send_lag.saturating_record(lag_us);
            let mut r = StepReport::new(1, rate, rate, 1.0, &st);
            r.passed = passed;
            r
        };
        let steps = [
            step(1000.0, 30_000, true),  // lagged but passed: not a limit
            step(2000.0, 1_000, false),  // the server failed it
            step(4000.0, 30_000, false), // the generator lagged
        ];
        assert_eq!(generator_limited(&steps), vec![4000.0]);
    }

    #[test]
    fn a_split_fleet_without_the_binary_is_refused() {
        let mut s = Scenario::default();
        s.pattern = Pattern::Idle;
        s.load.controllers = 50_000;
        s.target.controllers = "tcp://127.0.0.1:9".into();
        let e = run(&s, &RunOptions::default()).unwrap_err();
        assert!(e.to_string().contains("worker processes"), "{e}");
    }

    #[test]
    fn an_invalid_scenario_is_refused_before_anything_starts() {
        let mut s = Scenario::default();
        s.load.payload_bytes = 1;
        assert!(matches!(
            run(&s, &RunOptions::default()),
            Err(RunError::Scenario(_))
        ));
    }
}
