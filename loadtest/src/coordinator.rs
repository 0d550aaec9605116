//! Runs a scenario from start to report: plans workers and source addresses within the
//! machine's limits, starts the workers (in process, or as child processes of this
//! binary), connects the fleet, runs the fixed step or the find-max ramp with every
//! worker starting each step at the same CLOCK_MONOTONIC instant, samples the server
//! from /proc, and assembles the [`Report`].

use std::io::{BufRead, BufReader, Write};
use std::net::IpAddr;
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
    ConnectReport, FindMaxReport, FleetReport, GENERATOR_LAG_US, LimitsReport, Report,
    ServerReport, ServerStep, StepReport, TargetReport, fmt_rate, fmt_us, group,
};
use crate::scenario::{Endpoint, Form, Pattern, Scenario, ScenarioError};
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
        mut on_tick: impl FnMut(),
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
            || {},
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

/// The sentence answering "how much does this server hold".
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
    let per = s.per_sender_rate(b.rate);
    let l = &s.load;
    let who = match s.pattern {
        Pattern::Telemetry => format!(
            "{} controllers at {} msg/s each to {} browser(s) each",
            group(l.controllers as u64),
            fmt_rate(per),
            l.browsers_per_controller
        ),
        Pattern::Command => format!(
            "{} browser→controller pairs at {} commands/s each",
            group(l.controllers as u64),
            fmt_rate(per)
        ),
        Pattern::Fanout => format!(
            "{} publisher(s) at {} msg/s each to groups of {} members ({} deliveries/s)",
            group(l.groups as u64),
            fmt_rate(per),
            group(l.members as u64),
            fmt_rate(b.rate * l.members as f64)
        ),
        Pattern::Fanin => format!(
            "{} controllers at {} msg/s each into {} dashboard(s)",
            group(l.controllers as u64),
            fmt_rate(per),
            l.dashboards
        ),
        Pattern::Idle | Pattern::Storm => "the fleet".to_string(),
    };
    format!(
        "this server holds {who} ({} msg/s in all) with p99 {} < {slo_ms} ms and loss {:.3}% < {loss}%",
        fmt_rate(b.rate),
        fmt_us(b.p99_us),
        b.loss * 100.0
    )
}

/// Rates of the failing steps during which the generator lagged its own schedule.
pub fn generator_limited(steps: &[StepReport]) -> Vec<f64> {
    steps
        .iter()
        .filter(|x| x.passed == Some(false) && x.send_lag.p99_us > GENERATOR_LAG_US)
        .map(|x| x.total_rate)
        .collect()
}

/// Runs `s` and returns its report.
pub fn run(s: &Scenario, opts: &RunOptions) -> Result<Report, RunError> {
    s.validate("scenario")?;
    let mut s = s.clone();
    if s.target.prefix.is_empty() {
        s.target.prefix = fresh_prefix();
    }
    let ctl = s.controller_endpoint().map_err(RunError::Setup)?;
    let br = s.browser_endpoint().map_err(RunError::Setup)?;
    let plan = Plan::new(&s, &s.target.prefix);
    let mut progress = Progress::new(opts.progress);

    // Limits: open files and ephemeral ports.
    let mut notes = Vec::new();
    let nofile = match limits::raise_nofile() {
        Ok(n) => n,
        Err(e) => {
            notes.push(format!("could not raise the open-file limit: {e}"));
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
    for n in &notes {
        if n.starts_with("LIMIT:") {
            progress.println(n);
        }
    }
    let cores = std::thread::available_parallelism()
        .map(|n| n.get() as u32)
        .unwrap_or(1);
    let threads = if s.run.threads > 0 {
        s.run.threads
    } else {
        (cores / wplan.workers).max(1)
    };

    // The server.
    let (pid, found_by) = find_server(&s, &ctl);
    let sampler = pid.and_then(|p| Sampler::start(p, s.run.sample_interval.0).ok());
    if pid.is_some() && sampler.is_none() {
        notes.push(format!(
            "cannot read /proc of server pid {}",
            pid.unwrap_or(0)
        ));
    }
    let rss_before = sampler.as_ref().and_then(|x| x.mark()).map(|x| x.rss_bytes);

    // Workers and the connect phase.
    let started_unix_ms = unix_ms();
    let mut fleet = Fleet::start(wplan.workers as usize, opts.worker_exe.as_ref())?;
    let connect_start_ns = mono_ns() + s.run.start_lead.as_nanos();
    let setup = |i: usize| WorkerSetup {
        scenario: s.clone(),
        prefix: s.target.prefix.clone(),
        worker: i as u32,
        workers: wplan.workers,
        threads,
        sources: sources.clone(),
        connect_start_ns,
        max_connections: wplan.per_process,
        units: None,
    };
    let result = (|| {
        fleet.broadcast(|i| Command::Connect(Box::new(setup(i))))?;
        let planned = wplan.connections;
        let connects = fleet.gather(
            &mut progress,
            &|| format!("connecting {} planned", group(planned)),
            |_, r| match r {
                Reply::Connected(c) => Some(*c),
                _ => None,
            },
            || {},
        )?;
        let mut connect = ConnectStats::default();
        for c in &connects {
            connect.merge(c);
        }
        let rss_connected = sampler.as_ref().and_then(|x| x.mark()).map(|x| x.rss_bytes);

        // Steps.
        let mut steps: Vec<StepReport> = Vec::new();
        let mut find_max = None;
        let run_step =
            |fleet: &mut Fleet, progress: &mut Progress, id: u32, total: f64, duration_ns: u64| {
                run_one_step(
                    &s,
                    fleet,
                    progress,
                    sampler.as_ref(),
                    id,
                    total,
                    duration_ns,
                )
            };
        if s.find_max.enabled {
            let f = &s.find_max;
            let start = f
                .start_rate
                .or(s.total_rate())
                .unwrap_or(s.senders() as f64);
            let mut ramp = Ramp::new(RampConfig {
                start,
                factor: f.factor,
                max_steps: f.max_steps,
                refine_steps: f.refine_steps,
                max_rate: f.max_rate,
                slo_p99_us: (f.slo_p99.as_nanos() / 1000).max(1),
                max_loss: f.max_loss,
            });
            let mut rate = ramp.first();
            let mut id = 1;
            loop {
                let (mut rep, _) = run_step(
                    &mut fleet,
                    &mut progress,
                    id,
                    rate,
                    f.step_duration.as_nanos(),
                )?;
                let next = ramp.observe(rate, rep.latency.p99_us, rep.loss_ratio, rep.received);
                rep.passed = ramp.history().last().map(|o| o.passed);
                progress.println(&format!(
                    "step {id}: {} msg/s  p99 {}  loss {:.4}%  {}",
                    fmt_rate(rate),
                    fmt_us(rep.latency.p99_us),
                    rep.loss_ratio * 100.0,
                    if rep.passed == Some(true) {
                        "pass"
                    } else {
                        "fail"
                    }
                ));
                steps.push(rep);
                match next {
                    Some(r) => rate = r,
                    None => break,
                }
                id += 1;
            }
            let slo_ms = f.slo_p99.as_secs_f64() * 1000.0;
            let generator_limited = generator_limited(&steps);
            let mut answer = capacity_answer(&s, ramp.best().as_ref(), slo_ms);
            if let Some(r) = generator_limited.iter().copied().reduce(f64::min) {
                answer.push_str(&format!(
                    " — a lower bound: at {} msg/s the generator itself fell behind (send lag p99 over {}), so run it with more --workers/--threads or on another machine",
                    fmt_rate(r),
                    fmt_us(GENERATOR_LAG_US)
                ));
            }
            find_max = Some(FindMaxReport {
                slo_p99_ms: slo_ms,
                max_loss: f.max_loss,
                steps: ramp.history().to_vec(),
                best: ramp.best(),
                first_failure: ramp.first_failure(),
                generator_limited,
                answer,
            });
        } else {
            let total = if s.pattern.sends_data() {
                s.total_rate().unwrap_or(0.0)
            } else {
                0.0
            };
            let (rep, _) = run_step(
                &mut fleet,
                &mut progress,
                1,
                total,
                s.load.duration.as_nanos(),
            )?;
            steps.push(rep);
        }
        Ok::<_, RunError>((connect, rss_connected, steps, find_max))
    })();
    fleet.finish(&mut progress);
    progress.finish();
    let (connect, rss_connected, steps, find_max) = result?;

    let server = sampler.map(|smp| {
        let samples: Vec<ProcSample> = smp.stop();
        let peak = samples.iter().map(|x| x.rss_bytes).max().unwrap_or(0);
        let cpu_total = match (samples.first(), samples.last()) {
            (Some(a), Some(b)) => b.cpu_us.saturating_sub(a.cpu_us) as f64 / 1e6,
            _ => 0.0,
        };
        let before = rss_before.unwrap_or(0);
        let connected = rss_connected.unwrap_or(before);
        ServerReport {
            pid: pid.unwrap_or(0),
            found_by: found_by.clone(),
            rss_before_bytes: before,
            rss_connected_bytes: connected,
            rss_peak_bytes: peak,
            bytes_per_connection: (connect.established > 0)
                .then(|| (connected as f64 - before as f64) / connect.established as f64),
            cpu_total_s: cpu_total,
            samples,
        }
    });
    if server.is_none() {
        notes.push(format!("server not sampled: {found_by}"));
    }
    notes.extend(connect.notes.iter().cloned());
    let capped = wplan.connections < asked || notes.iter().any(|n| n.starts_with("LIMIT:"));

    let kind = if ctl.is_mqtt() { "mqtt" } else { "relay" };
    Ok(Report {
        tool: "relay-loadtest".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        name: s.name.clone(),
        description: s.description.clone(),
        pattern: s.pattern,
        started_unix_ms,
        target: TargetReport {
            kind: kind.into(),
            controllers: s.target.controllers.clone(),
            browsers: if ctl.is_mqtt() {
                s.target.controllers.clone()
            } else {
                s.target.browsers.clone()
            },
            controller_form: if ctl.is_mqtt() {
                "mqtt".into()
            } else {
                form_name(s.target.controller_form).into()
            },
            browser_form: if ctl.is_mqtt() {
                "mqtt".into()
            } else {
                form_name(s.target.browser_form).into()
            },
            prefix: s.target.prefix.clone(),
        },
        fleet: FleetReport {
            controllers: n_ctl,
            browsers: n_br,
            connections: asked,
            senders: s.senders(),
            payload_bytes: s.load.payload_bytes,
            heartbeat_s: s.load.heartbeat.as_secs_f64(),
        },
        workers: wplan.workers,
        threads_per_worker: threads,
        connect: ConnectReport::new(&connect),
        steps,
        server,
        limits: LimitsReport {
            nofile_soft: nofile.soft,
            nofile_hard: nofile.hard,
            per_process_connections: wplan.per_process,
            ephemeral_ports: ports,
            source_addrs: sources.iter().map(|a| a.to_string()).collect(),
            connections_asked: asked,
            connections_planned: wplan.connections,
            capped,
            notes,
        },
        find_max,
    })
}

/// Runs one step on every worker and merges the results.
fn run_one_step(
    s: &Scenario,
    fleet: &mut Fleet,
    progress: &mut Progress,
    sampler: Option<&Sampler>,
    id: u32,
    total_rate: f64,
    duration_ns: u64,
) -> Result<(StepReport, StepStats), RunError> {
    let per_sender = s.per_sender_rate(total_rate);
    let start_ns = mono_ns() + s.run.start_lead.as_nanos();
    let plan = StepPlan {
        id,
        rate: per_sender,
        start_ns,
        end_ns: start_ns + duration_ns,
    };
    let drain_ns = s.load.drain.as_nanos();
    fleet.broadcast(|_| Command::Step { plan, drain_ns })?;
    let mut cpu0: Option<ProcSample> = None;
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
    let parts = fleet.gather(
        progress,
        &phase,
        |_, r| match r {
            Reply::StepDone { id: got, stats } if got == id => Some(*stats),
            _ => None,
        },
        || {
            if cpu0.is_none() && mono_ns() >= start_ns {
                cpu0 = sampler.and_then(|x| x.mark());
            }
        },
    )?;
    let cpu1 = sampler.and_then(|x| x.mark());
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
    Ok((rep, merged))
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
            r.passed = Some(passed);
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
