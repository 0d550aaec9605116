//! The result of a run: one [`Report`] value, printed as a human summary (with an
//! HdrHistogram percentile table), written as JSON, and drawn as HTML by [`crate::html`].

use std::collections::BTreeMap;
use std::fmt::Write as _;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::findmax::Outcome;
use crate::procstat::ProcSample;
use crate::scenario::Pattern;
use crate::stats::{ConnectStats, StepStats, hist_b64};

/// Percentiles of one histogram, plus its curve for plotting.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LatencySummary {
    /// Recorded values.
    pub count: u64,
    pub min_us: u64,
    pub mean_us: f64,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub p9999_us: u64,
    pub max_us: u64,
    /// (percentile, µs) points of the percentile curve, HdrHistogram's iteration.
    pub curve: Vec<(f64, u64)>,
}

impl LatencySummary {
    /// Summarises a µs histogram.
    pub fn from_hist(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Self::default();
        }
        let curve = h
            .iter_quantiles(4)
            .map(|v| {
                (
                    v.quantile_iterated_to() * 100.0,
                    h.highest_equivalent(v.value_iterated_to()),
                )
            })
            .collect();
        Self {
            count: h.len(),
            min_us: h.min(),
            mean_us: h.mean(),
            p50_us: h.value_at_quantile(0.5),
            p90_us: h.value_at_quantile(0.9),
            p99_us: h.value_at_quantile(0.99),
            p999_us: h.value_at_quantile(0.999),
            p9999_us: h.value_at_quantile(0.9999),
            max_us: h.max(),
            curve,
        }
    }
}

/// Messages in one second of a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Second {
    /// Seconds since the step start.
    pub t: u32,
    pub sent: u64,
    pub received: u64,
}

/// Latency in one time bucket of a step (by arrival time).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct TimePoint {
    /// Start of the bucket, seconds since the step start.
    pub t_s: f64,
    /// Receipts in the bucket.
    pub count: u64,
    pub p50_us: u64,
    pub p99_us: u64,
    pub max_us: u64,
}

/// CPU a process (or a group of processes) used during one step.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct CpuStep {
    /// CPU seconds (user + system) from step start to the end of its drain.
    pub cpu_s: f64,
    /// CPU time over wall time, in percent of one core.
    pub cpu_percent: f64,
    /// CPU time over wall time × cores, in percent of the whole machine.
    pub machine_percent: f64,
    /// CPU µs per message sent or received by the generator in the step (generator
    /// only; 0 for other processes).
    pub cpu_us_per_msg: f64,
}

/// The server's cost during one step.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ServerStep {
    /// CPU seconds (user + system) from step start to the end of its drain.
    pub cpu_s: f64,
    /// CPU time over wall time, in percent of one core.
    pub cpu_percent: f64,
    /// CPU µs per message the server delivered (data plus heartbeat answers).
    pub cpu_us_per_msg: f64,
    /// RSS at the end of the step, bytes.
    pub rss_bytes: u64,
}

/// One step of the run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StepReport {
    /// Step number (1-based).
    pub index: u32,
    /// Messages per second per sending client.
    pub rate_per_sender: f64,
    /// Messages per second for the fleet.
    pub total_rate: f64,
    /// Sending time, seconds.
    pub duration_s: f64,
    pub sent: u64,
    pub received: u64,
    pub expected: u64,
    pub lost: u64,
    pub loss_ratio: f64,
    /// Arrivals stamped with another step.
    pub late: u64,
    /// sent / duration.
    pub send_rate: f64,
    /// received / duration.
    pub receive_rate: f64,
    /// Latency from intended send time (round trip for the command pattern).
    pub latency: LatencySummary,
    /// Latency from the actual send time (the generator's lag taken off).
    #[serde(default)]
    pub latency_from_sent: LatencySummary,
    /// Latency from intended send time over the step, by arrival time.
    #[serde(default)]
    pub latency_over_time: Vec<TimePoint>,
    /// Heartbeat round trip from its intended time.
    pub heartbeat: LatencySummary,
    /// The tool's own lag from intended send time to the write, per batch.
    pub send_lag: LatencySummary,
    pub pings: u64,
    pub pongs: u64,
    /// Per-second throughput.
    pub throughput: Vec<Second>,
    /// Errors by kind.
    pub errors: BTreeMap<String, u64>,
    /// Server cost, when a server process was sampled.
    pub server: Option<ServerStep>,
    /// What the generator itself (this process and its worker processes) used.
    #[serde(default)]
    pub generator: Option<CpuStep>,
    /// Other watched processes (`target.watch`: Redis, MySQL, …) by name.
    #[serde(default)]
    pub watched: BTreeMap<String, CpuStep>,
    /// Fleet units (controllers, or groups for fanout) connected during the step.
    #[serde(default)]
    pub fleet: u64,
    /// Connections up during the step, and how many the step needed.
    #[serde(default)]
    pub connected: u64,
    #[serde(default)]
    pub connections_needed: u64,
    /// Whether the step met the SLO and ran cleanly.
    pub passed: bool,
    /// Why it did not, one phrase each.
    #[serde(default)]
    pub failures: Vec<String>,
    /// The latency histogram, HdrHistogram V2 serialization, base64.
    pub latency_hdr: String,
}

impl StepReport {
    /// Builds the report of one step from its merged stats.
    pub fn new(
        index: u32,
        rate_per_sender: f64,
        total_rate: f64,
        duration_s: f64,
        s: &StepStats,
    ) -> Self {
        let n = s.sent_per_sec.len().max(s.recv_per_sec.len());
        let throughput = (0..n)
            .map(|i| Second {
                t: i as u32,
                sent: s.sent_per_sec.get(i).copied().unwrap_or(0),
                received: s.recv_per_sec.get(i).copied().unwrap_or(0),
            })
            .collect();
        let d = duration_s.max(1e-9);
        Self {
            index,
            rate_per_sender,
            total_rate,
            duration_s,
            sent: s.sent,
            received: s.received,
            expected: s.expected,
            lost: s.lost(),
            loss_ratio: s.loss_ratio(),
            late: s.late,
            send_rate: s.sent as f64 / d,
            receive_rate: s.received as f64 / d,
            latency: LatencySummary::from_hist(&s.latency),
            latency_from_sent: LatencySummary::from_hist(&s.latency_sent),
            latency_over_time: s
                .latency_by_time
                .iter()
                .enumerate()
                .filter(|(_, h)| !h.is_empty())
                .map(|(i, h)| TimePoint {
                    t_s: (i as u64 * s.time_bucket_s.max(1) as u64) as f64,
                    count: h.len(),
                    p50_us: h.value_at_quantile(0.5),
                    p99_us: h.value_at_quantile(0.99),
                    max_us: h.max(),
                })
                .collect(),
            heartbeat: LatencySummary::from_hist(&s.heartbeat),
            send_lag: LatencySummary::from_hist(&s.send_lag),
            pings: s.pings,
            pongs: s.pongs,
            throughput,
            errors: s.errors.clone(),
            server: None,
            generator: None,
            watched: BTreeMap::new(),
            fleet: 0,
            connected: 0,
            connections_needed: 0,
            passed: false,
            failures: Vec::new(),
            latency_hdr: hist_b64::encode(&s.latency),
        }
    }
}

/// The connect phase.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ConnectReport {
    pub planned: u64,
    pub established: u64,
    pub failed: u64,
    /// Seconds from the first connect start to the last handshake end.
    pub duration_s: f64,
    /// Established connections per second.
    pub rate: f64,
    /// Connect + handshake time (from the intended start in a storm).
    pub time: LatencySummary,
    pub errors: BTreeMap<String, u64>,
    /// Connects answered `busy` and retried after the server's `retry_after_ms`.
    #[serde(default)]
    pub retried: u64,
    /// The connect-time histogram, V2 + base64.
    pub time_hdr: String,
}

impl ConnectReport {
    /// Builds the report from merged connect stats.
    pub fn new(c: &ConnectStats) -> Self {
        Self {
            planned: c.planned,
            established: c.established,
            failed: c.failed,
            duration_s: c.last_ns.saturating_sub(c.first_ns) as f64 / 1e9,
            rate: c.rate(),
            time: LatencySummary::from_hist(&c.time),
            errors: c.errors.clone(),
            retried: c.retried,
            time_hdr: hist_b64::encode(&c.time),
        }
    }
}

/// The sampled server process.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServerReport {
    pub pid: u32,
    /// How the pid was chosen.
    pub found_by: String,
    /// RSS before the fleet connected.
    pub rss_before_bytes: u64,
    /// RSS once the fleet was connected.
    pub rss_connected_bytes: u64,
    /// Highest RSS seen.
    pub rss_peak_bytes: u64,
    /// (RSS connected − RSS before) / established connections.
    pub bytes_per_connection: Option<f64>,
    /// CPU seconds over the whole run.
    pub cpu_total_s: f64,
    /// Every reading, for plots.
    pub samples: Vec<ProcSample>,
}

/// A limit of the machine, the server or the tool itself that capped a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum LimitKind {
    /// The open-file limit of the tool's processes.
    OpenFiles,
    /// Ephemeral ports per source address.
    Ports,
    /// The server (or the network) did not take every connection.
    Connections,
    /// The generator could not keep its own schedule or ran out of CPU.
    Generator,
}

/// A sentence about the run's limits; `limit` is set when it capped the run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Note {
    pub limit: Option<LimitKind>,
    pub text: String,
}

impl Note {
    /// A note that a limit capped the run.
    pub fn limit(kind: LimitKind, text: impl Into<String>) -> Self {
        Self {
            limit: Some(kind),
            text: text.into(),
        }
    }

    /// A plain note.
    pub fn info(text: impl Into<String>) -> Self {
        Self {
            limit: None,
            text: text.into(),
        }
    }
}

/// The run's outcome, said first in every report.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Verdict {
    /// True when every step passed and the run did what it was asked.
    pub passed: bool,
    /// The process exit status: 0 passed, 2 the run failed (connections, nothing
    /// sent, messages lost, errors, capped), 3 it ran cleanly but missed the SLO.
    pub exit_code: i32,
    /// Why it failed, one phrase each.
    pub failures: Vec<String>,
    /// The limit that capped the run, in one sentence.
    pub limited_by: Option<String>,
}

impl Verdict {
    /// `PASS` or `FAIL (…)` with the reasons: the first line of every report.
    pub fn headline(&self) -> String {
        if self.passed {
            "PASS".into()
        } else {
            format!(
                "FAIL (exit {}): {}",
                self.exit_code,
                self.failures.join("; ")
            )
        }
    }
}

/// The SLO every step was judged by.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Slo {
    /// p99 latency must stay under this, ms.
    pub p99_ms: f64,
    /// Loss ratio must stay under this.
    pub max_loss: f64,
}

/// CPU over the whole run of the generator or another watched process.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ProcReport {
    /// What it is (`generator`, `redis`, …).
    pub name: String,
    /// Its pids.
    pub pids: Vec<u32>,
    /// How they were found.
    pub found_by: String,
    /// CPU seconds over the run.
    pub cpu_s: f64,
    /// Percent of the whole machine over the run.
    pub machine_percent: f64,
    /// (seconds since the first sample, percent of one core) over the run.
    pub cpu_over_time: Vec<(f64, f64)>,
}

/// The limits in force and what they did to the run.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LimitsReport {
    pub nofile_soft: u64,
    pub nofile_hard: u64,
    /// Connections one process may hold.
    pub per_process_connections: u64,
    /// Ephemeral ports per source address.
    pub ephemeral_ports: u64,
    pub source_addrs: Vec<String>,
    /// Connections the scenario asked for.
    pub connections_asked: u64,
    /// Connections the plan allowed.
    pub connections_planned: u64,
    /// True when a limit made the run smaller than asked.
    pub capped: bool,
    /// What the limits did, in words.
    pub notes: Vec<Note>,
}

/// The capacity search.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FindMaxReport {
    /// What was ramped: `rate` or `fleet` (then `Outcome::rate` is the fleet size).
    #[serde(default)]
    pub by: crate::scenario::RampBy,
    pub slo_p99_ms: f64,
    pub max_loss: f64,
    pub steps: Vec<Outcome>,
    pub best: Option<Outcome>,
    pub first_failure: Option<f64>,
    /// Rates of failing steps during which the generator itself lagged (send lag p99
    /// over [`GENERATOR_LAG_US`]): there the answer is a lower bound.
    pub generator_limited: Vec<f64>,
    /// The capacity answer in one sentence.
    pub answer: String,
    /// What stopped the ramp: the first failing step's reasons.
    #[serde(default)]
    pub stopped_by: String,
}

/// Fleet shape.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FleetReport {
    pub controllers: u64,
    pub browsers: u64,
    pub connections: u64,
    pub senders: u64,
    pub payload_bytes: u32,
    pub heartbeat_s: f64,
}

/// Where the clients connected.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TargetReport {
    /// `relay` or `mqtt`.
    pub kind: String,
    pub controllers: String,
    pub browsers: String,
    pub controller_form: String,
    pub browser_form: String,
    pub prefix: String,
    /// Several targets (nodes of a cluster): clients per target and the pairs
    /// crossing targets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spread: Option<SpreadReport>,
}

/// How the fleet lay over several targets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpreadReport {
    /// Each target (controllers' URL) with its clients.
    pub targets: Vec<TargetClients>,
    /// Sender → recipient pairs (a group message to `k` members is `k` pairs).
    pub pairs: u64,
    /// Pairs whose ends are on different targets.
    pub cross_pairs: u64,
}

/// One target and the clients placed on it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TargetClients {
    pub url: String,
    pub clients: u64,
}

/// A whole run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub tool: String,
    pub version: String,
    pub name: String,
    pub description: String,
    pub pattern: Pattern,
    pub started_unix_ms: u64,
    /// The outcome; the first thing every form of the report says.
    #[serde(default)]
    pub verdict: Verdict,
    /// The SLO steps were judged by.
    #[serde(default)]
    pub slo: Slo,
    /// Cores of the machine (what "% of the machine" divides by).
    #[serde(default)]
    pub cores: u32,
    pub target: TargetReport,
    pub fleet: FleetReport,
    pub workers: u32,
    pub threads_per_worker: u32,
    pub connect: ConnectReport,
    pub steps: Vec<StepReport>,
    pub server: Option<ServerReport>,
    /// The generator's own CPU over the run.
    #[serde(default)]
    pub generator: Option<ProcReport>,
    /// Other watched processes (Redis, MySQL, …).
    #[serde(default)]
    pub watched: Vec<ProcReport>,
    pub limits: LimitsReport,
    pub find_max: Option<FindMaxReport>,
}

/// A step whose send lag p99 is above this (µs) is flagged: the tool, not only the
/// server, shaped its latency.
pub const GENERATOR_LAG_US: u64 = 5_000;

/// `1234` µs as `1.23 ms`, and so on.
pub fn fmt_us(us: u64) -> String {
    if us < 1_000 {
        format!("{us} µs")
    } else if us < 1_000_000 {
        format!("{:.2} ms", us as f64 / 1e3)
    } else {
        format!("{:.2} s", us as f64 / 1e6)
    }
}

/// Bytes in binary units.
pub fn fmt_bytes(b: f64) -> String {
    if b.abs() < 1024.0 {
        format!("{b:.0} B")
    } else if b.abs() < 1024.0 * 1024.0 {
        format!("{:.1} KiB", b / 1024.0)
    } else if b.abs() < 1024.0 * 1024.0 * 1024.0 {
        format!("{:.1} MiB", b / 1024.0 / 1024.0)
    } else {
        format!("{:.2} GiB", b / 1024.0 / 1024.0 / 1024.0)
    }
}

/// A rate with thousands separators, no decimals past 100.
pub fn fmt_rate(r: f64) -> String {
    if r >= 100.0 {
        group(r.round() as u64)
    } else if r >= 1.0 {
        format!("{r:.1}")
    } else {
        format!("{r:.3}")
    }
}

/// 1234567 as `1,234,567`.
pub fn group(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::with_capacity(s.len() + s.len() / 3);
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn fmt_errors(e: &BTreeMap<String, u64>) -> String {
    if e.is_empty() {
        return "none".into();
    }
    e.iter()
        .map(|(k, v)| format!("{k}={}", group(*v)))
        .collect::<Vec<_>>()
        .join(", ")
}

fn latency_line(l: &LatencySummary) -> String {
    if l.count == 0 {
        return "no samples".into();
    }
    format!(
        "p50 {}  p90 {}  p99 {}  p99.9 {}  p99.99 {}  max {}  ({} samples)",
        fmt_us(l.p50_us),
        fmt_us(l.p90_us),
        fmt_us(l.p99_us),
        fmt_us(l.p999_us),
        fmt_us(l.p9999_us),
        fmt_us(l.max_us),
        group(l.count)
    )
}

/// The percentile table of a base64 V2 histogram, HdrHistogram style.
pub fn percentile_table(hdr_b64: &str) -> String {
    let Ok(h) = hist_b64::decode(hdr_b64) else {
        return String::new();
    };
    if h.is_empty() {
        return String::new();
    }
    let mut t = String::from("      percentile      latency        count\n");
    for q in [0.0, 0.5, 0.75, 0.9, 0.95, 0.99, 0.999, 0.9999, 0.99999, 1.0] {
        let v = h.value_at_quantile(q);
        let below = h.count_between(0, v);
        let _ = writeln!(
            t,
            "  {:>12.5}%  {:>11}  {:>11}",
            q * 100.0,
            fmt_us(v),
            group(below)
        );
    }
    t
}

impl Report {
    /// The step the summary leads with: the best passing step of a search, else the last.
    pub fn main_step(&self) -> Option<&StepReport> {
        if let Some(fm) = &self.find_max
            && let Some(best) = &fm.best
            && let Some(s) = self
                .steps
                .iter()
                .find(|s| s.passed && s.total_rate == best.rate)
        {
            return Some(s);
        }
        self.steps.last()
    }

    /// The report as pretty JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }

    /// The human summary.
    pub fn human(&self) -> String {
        let mut o = String::new();
        let _ = writeln!(o, "RESULT: {}", self.verdict.headline());
        if let Some(l) = &self.verdict.limited_by {
            let _ = writeln!(o, "LIMIT: {l}");
        }
        let t = &self.target;
        let ends = if t.kind == "mqtt" {
            t.controllers.clone()
        } else if self.fleet.browsers == 0 {
            format!("{} ({})", t.controllers, t.controller_form)
        } else {
            format!(
                "{} ({}) + {} ({})",
                t.controllers, t.controller_form, t.browsers, t.browser_form
            )
        };
        let _ = writeln!(
            o,
            "relay-loadtest {}: {} \"{}\" against {}",
            self.version, self.pattern, self.name, ends
        );
        if let Some(sp) = &t.spread {
            let per: Vec<String> = sp
                .targets
                .iter()
                .map(|c| format!("{} on {}", group(c.clients), c.url))
                .collect();
            let _ = writeln!(
                o,
                "targets: {} clients round-robin over {} targets ({}); {} of {} sender-recipient pairs cross targets",
                group(sp.targets.iter().map(|c| c.clients).sum()),
                sp.targets.len(),
                per.join(", "),
                group(sp.cross_pairs),
                group(sp.pairs)
            );
        }
        let f = &self.fleet;
        let _ = writeln!(
            o,
            "fleet: {} controllers, {} browsers ({} connections, {} senders) in {} worker(s) × {} thread(s); payload {} B; heartbeat {}s",
            group(f.controllers),
            group(f.browsers),
            group(f.connections),
            group(f.senders),
            self.workers,
            self.threads_per_worker,
            f.payload_bytes,
            f.heartbeat_s
        );
        let c = &self.connect;
        let _ = writeln!(
            o,
            "connect: {}/{} established, {} failed in {:.2} s ({}/s); connect time {}",
            group(c.established),
            group(c.planned),
            group(c.failed),
            c.duration_s,
            fmt_rate(c.rate),
            latency_line(&c.time)
        );
        if !c.errors.is_empty() {
            let _ = writeln!(o, "  connect errors: {}", fmt_errors(&c.errors));
        }
        if c.retried > 0 {
            let _ = writeln!(
                o,
                "  retried: {} connects answered busy, retried after the relay's retry_after_ms",
                group(c.retried)
            );
        }
        for s in &self.steps {
            let verdict = if s.passed {
                "[pass]".to_string()
            } else {
                format!("[fail: {}]", s.failures.join("; "))
            };
            let fleet = if self
                .find_max
                .as_ref()
                .is_some_and(|f| f.by == crate::scenario::RampBy::Fleet)
            {
                format!(", fleet {}", group(s.fleet))
            } else {
                String::new()
            };
            let _ = writeln!(
                o,
                "step {}: {} msg/s for {:.1} s ({} msg/s per sender{fleet})  {verdict}",
                s.index,
                fmt_rate(s.total_rate),
                s.duration_s,
                fmt_rate(s.rate_per_sender)
            );
            let _ = writeln!(
                o,
                "  sent {}  received {}  expected {}  lost {} ({:.4}%)  late {}",
                group(s.sent),
                group(s.received),
                group(s.expected),
                group(s.lost),
                s.loss_ratio * 100.0,
                group(s.late)
            );
            let _ = writeln!(
                o,
                "  throughput: sent {}/s, received {}/s",
                fmt_rate(s.send_rate),
                fmt_rate(s.receive_rate)
            );
            let what = if self.pattern == Pattern::Command {
                "round trip"
            } else {
                "latency"
            };
            let _ = writeln!(
                o,
                "  {what} from intended send: {}",
                latency_line(&s.latency)
            );
            if s.latency_from_sent.count > 0 {
                let _ = writeln!(
                    o,
                    "  {what} from actual send:   {}",
                    latency_line(&s.latency_from_sent)
                );
            }
            if s.send_lag.count > 0 {
                let _ = writeln!(
                    o,
                    "  send lag (tool side, intended → written, per message): {}",
                    latency_line(&s.send_lag)
                );
                if s.send_lag.p99_us > GENERATOR_LAG_US {
                    let _ = writeln!(
                        o,
                        "  WARNING: the generator fell behind its schedule (send lag p99 {}): part of the latency above is the tool's; give it more --threads or --workers, or another machine",
                        fmt_us(s.send_lag.p99_us)
                    );
                }
            }
            let _ = writeln!(
                o,
                "  heartbeats: {} sent, {} answered; round trip {}",
                group(s.pings),
                group(s.pongs),
                latency_line(&s.heartbeat)
            );
            let _ = writeln!(o, "  errors: {}", fmt_errors(&s.errors));
            if let Some(sv) = &s.server {
                let _ = writeln!(
                    o,
                    "  server: {:.2} CPU-s ({:.0}% of a core), {:.2} CPU-µs per message, RSS {}",
                    sv.cpu_s,
                    sv.cpu_percent,
                    sv.cpu_us_per_msg,
                    fmt_bytes(sv.rss_bytes as f64)
                );
            }
            for (name, w) in &s.watched {
                let _ = writeln!(
                    o,
                    "  {name}: {:.2} CPU-s ({:.0}% of a core)",
                    w.cpu_s, w.cpu_percent
                );
            }
            if let Some(g) = &s.generator {
                let _ = writeln!(
                    o,
                    "  generator: {:.2} CPU-s, {:.0}% of the machine ({} cores), {:.2} CPU-µs per message sent or received",
                    g.cpu_s, g.machine_percent, self.cores, g.cpu_us_per_msg
                );
            }
        }
        if let Some(s) = self.main_step() {
            let table = percentile_table(&s.latency_hdr);
            if !table.is_empty() {
                let _ = writeln!(o, "latency percentiles (step {}):", s.index);
                o.push_str(&table);
            }
        }
        if let Some(sv) = &self.server {
            let per_conn = sv
                .bytes_per_connection
                .map(|b| format!(" ({} per connection)", fmt_bytes(b)))
                .unwrap_or_default();
            let _ = writeln!(
                o,
                "server pid {} ({}): RSS {} before connect, {} connected{per_conn}, peak {}; {:.2} CPU-s in all",
                sv.pid,
                sv.found_by,
                fmt_bytes(sv.rss_before_bytes as f64),
                fmt_bytes(sv.rss_connected_bytes as f64),
                fmt_bytes(sv.rss_peak_bytes as f64),
                sv.cpu_total_s
            );
        } else {
            let _ = writeln!(o, "server: not sampled (no pid given or found)");
        }
        let l = &self.limits;
        let _ = writeln!(
            o,
            "limits: open files {}/{} (soft/hard), {} connections per process, {} ephemeral ports per source address, sources {}",
            l.nofile_soft,
            l.nofile_hard,
            group(l.per_process_connections),
            group(l.ephemeral_ports),
            l.source_addrs.join(",")
        );
        for n in &l.notes {
            let _ = writeln!(o, "  {}", n.text);
        }
        if let Some(g) = &self.generator {
            let _ = writeln!(
                o,
                "generator (pids {}): {:.2} CPU-s, {:.0}% of the machine over the run",
                g.pids
                    .iter()
                    .map(|p| p.to_string())
                    .collect::<Vec<_>>()
                    .join(","),
                g.cpu_s,
                g.machine_percent
            );
        }
        for w in &self.watched {
            let _ = writeln!(
                o,
                "{} (pid {}, {}): {:.2} CPU-s, {:.0}% of the machine over the run",
                w.name,
                w.pids
                    .iter()
                    .map(|p| p.to_string())
                    .collect::<Vec<_>>()
                    .join(","),
                w.found_by,
                w.cpu_s,
                w.machine_percent
            );
        }
        if let Some(fm) = &self.find_max {
            let _ = writeln!(o, "find-max: {}", fm.answer);
            if !fm.stopped_by.is_empty() {
                let _ = writeln!(o, "  stopped by: {}", fm.stopped_by);
            }
        }
        o
    }
}

#[cfg(test)]
// Tests build values field by field from the defaults, which reads clearer here.
#[allow(clippy::field_reassign_with_default)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn sample_report() -> Report {
        let mut st = StepStats::default();
        st.sent = 1000;
        st.expected = 1000;
        st.received = 998;
        st.sent_per_sec = vec![500, 500];
        st.recv_per_sec = vec![499, 499];
        st.latency_by_time = vec![crate::stats::new_time_hist(), crate::stats::new_time_hist()];
        for v in 1..=998u64 {
            st.latency.saturating_record(100 + v);
            st.latency_by_time[(v % 2) as usize].saturating_record(100 + v);
        }
        st.errors.insert("server:no_route".into(), 2);
        let mut c = ConnectStats::default();
        c.planned = 20;
        c.record(0, 1_000_000, Ok(()));
        Report {
            tool: "relay-loadtest".into(),
            version: "0.1.0".into(),
            name: "t".into(),
            description: String::new(),
            pattern: Pattern::Telemetry,
            started_unix_ms: 0,
            verdict: Verdict {
                passed: true,
                exit_code: 0,
                failures: Vec::new(),
                limited_by: None,
            },
            slo: Slo {
                p99_ms: 10.0,
                max_loss: 0.001,
            },
            cores: 2,
            target: TargetReport {
                kind: "relay".into(),
                controllers: "tcp://127.0.0.1:7000".into(),
                browsers: "ws://127.0.0.1:8080/ws".into(),
                controller_form: "binary".into(),
                browser_form: "json".into(),
                prefix: "lt".into(),
                spread: None,
            },
            fleet: FleetReport {
                controllers: 10,
                browsers: 10,
                connections: 20,
                senders: 10,
                payload_bytes: 64,
                heartbeat_s: 30.0,
            },
            workers: 1,
            threads_per_worker: 2,
            connect: ConnectReport::new(&c),
            steps: vec![StepReport::new(1, 50.0, 500.0, 2.0, &st)],
            server: None,
            generator: None,
            watched: Vec::new(),
            limits: LimitsReport::default(),
            find_max: None,
        }
    }

    #[test]
    fn step_report_counts_and_rates() {
        let r = sample_report();
        let s = &r.steps[0];
        assert_eq!((s.sent, s.received, s.lost), (1000, 998, 2));
        assert!((s.loss_ratio - 0.002).abs() < 1e-12);
        assert_eq!(s.send_rate, 500.0);
        assert_eq!(s.throughput.len(), 2);
        assert_eq!(
            s.throughput[1],
            Second {
                t: 1,
                sent: 500,
                received: 499
            }
        );
        assert_eq!(s.latency.count, 998);
        assert!(
            s.latency.p50_us >= 590 && s.latency.p50_us <= 610,
            "{}",
            s.latency.p50_us
        );
        assert!(s.latency.curve.len() > 5);
        assert!(
            s.latency
                .curve
                .windows(2)
                .all(|w| w[0].0 <= w[1].0 && w[0].1 <= w[1].1)
        );
    }

    #[test]
    fn json_report_round_trips() {
        let r = sample_report();
        let back: Report = serde_json::from_str(&r.to_json()).unwrap();
        assert_eq!(back.steps[0].received, 998);
        let h = hist_b64::decode(&back.steps[0].latency_hdr).unwrap();
        assert_eq!(h.len(), 998);
    }

    #[test]
    fn human_summary_names_the_numbers() {
        let text = sample_report().human();
        for needle in [
            "sent 1,000",
            "received 998",
            "lost 2 (0.2000%)",
            "server:no_route=2",
            "percentile",
            "p99",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in\n{text}");
        }
    }

    #[test]
    fn a_lagging_generator_is_called_out() {
        let mut r = sample_report();
        assert!(!r.human().contains("WARNING"));
        let mut st = StepStats::default();
        st.sent = 1;
        st.send_lag.saturating_record(20_000);
        r.steps[0] = StepReport::new(1, 1.0, 1.0, 1.0, &st);
        let text = r.human();
        assert!(
            text.contains("WARNING: the generator fell behind"),
            "{text}"
        );
    }

    #[test]
    fn number_formats() {
        assert_eq!(group(1234567), "1,234,567");
        assert_eq!(group(12), "12");
        assert_eq!(fmt_us(850), "850 µs");
        assert_eq!(fmt_us(1500), "1.50 ms");
        assert_eq!(fmt_us(2_500_000), "2.50 s");
        assert_eq!(fmt_bytes(2048.0), "2.0 KiB");
        assert_eq!(fmt_rate(20000.4), "20,000");
    }
}
