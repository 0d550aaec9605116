//! Measurements: latency and connect-time HdrHistograms (microseconds), per-second
//! throughput, errors by kind. A worker records into a sharded [`Recorder`] (one small
//! lock per shard, connections spread over shards); the results are plain mergeable
//! values ([`StepStats`], [`ConnectStats`]) that cross process pipes with their
//! histograms in HdrHistogram's V2 serialization, base64-encoded.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::payload::Stamp;

/// Largest value a histogram tracks: one hour in microseconds (larger values saturate).
pub const HIST_MAX_US: u64 = 3_600_000_000;
/// Significant digits kept by every histogram.
pub const HIST_SIGFIG: u8 = 3;
/// Most per-second throughput buckets one step keeps (a day plus drain).
pub const MAX_SECONDS: usize = 86_400 + 700;
/// Step id meaning "between steps": every arrival then counts as late.
pub const NO_STEP: u32 = u32::MAX;

/// A fresh microsecond histogram with the tool's bounds.
pub fn new_hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, HIST_MAX_US, HIST_SIGFIG)
        .expect("static histogram bounds are valid")
}

/// Largest value a latency-over-time histogram tracks: one minute, µs.
pub const TIME_HIST_MAX_US: u64 = 60_000_000;
/// Most latency-over-time buckets a step keeps (their width grows with the step).
pub const MAX_TIME_BUCKETS: u64 = 60;

/// A small histogram (2 significant digits, up to a minute) for one time bucket of the
/// latency-over-time plot.
pub fn new_time_hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, TIME_HIST_MAX_US, 2).expect("static histogram bounds are valid")
}

/// What went wrong, counted by kind in every report.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
#[non_exhaustive]
pub enum ErrorKind {
    /// TCP connect refused (nothing listening, or the backlog overflowed).
    ConnectRefused,
    /// TCP connect or handshake did not finish within `connect_timeout`.
    ConnectTimeout,
    /// No ephemeral port left for this source address (add source addresses).
    SourcePortsExhausted,
    /// The process ran out of file descriptors (the open-file limit).
    FdLimit,
    /// Any other connect failure.
    ConnectFailed,
    /// The handshake broke: bad reply, closed during hello, refused upgrade.
    HandshakeFailed,
    /// The server closed a connection the tool did not close.
    Disconnected,
    /// A read from the socket failed.
    ReadFailed,
    /// A write to the socket failed.
    WriteFailed,
    /// A scheduled message was not written: the connection's socket was full and its
    /// queue at `run.max_pending` (the server is not reading).
    WriteBlocked,
    /// The server sent bytes that do not decode.
    BadInput,
    /// A command controller's reply queue was full; the reply was not sent.
    ReplyDropped,
    /// A received message carried no stamp (not sent by this tool).
    Unstamped,
    /// The server answered ERROR with this protocol code name (`no_route`, ...).
    Server(String),
    /// The MQTT broker refused CONNECT or SUBSCRIBE with this reason.
    Refused(String),
    /// The server refused for now (`busy`) and said when to come back; the
    /// connect is retried then, up to `run.busy_retries` times.
    RetryLater { code: String, retry_after_ms: u64 },
    /// The TLS handshake or session failed, with the reason (`unknown_issuer`,
    /// `alert_handshake_failure`, ...).
    Tls(String),
}

impl ErrorKind {
    /// The stable name used as the key in reports.
    pub fn name(&self) -> String {
        match self {
            ErrorKind::ConnectRefused => "connect_refused".into(),
            ErrorKind::ConnectTimeout => "connect_timeout".into(),
            ErrorKind::SourcePortsExhausted => "source_ports_exhausted".into(),
            ErrorKind::FdLimit => "fd_limit".into(),
            ErrorKind::ConnectFailed => "connect_failed".into(),
            ErrorKind::HandshakeFailed => "handshake_failed".into(),
            ErrorKind::Disconnected => "disconnected".into(),
            ErrorKind::ReadFailed => "read_failed".into(),
            ErrorKind::WriteFailed => "write_failed".into(),
            ErrorKind::WriteBlocked => "write_blocked".into(),
            ErrorKind::BadInput => "bad_input".into(),
            ErrorKind::ReplyDropped => "reply_dropped".into(),
            ErrorKind::Unstamped => "unstamped".into(),
            ErrorKind::Server(code) | ErrorKind::RetryLater { code, .. } => {
                format!("server:{code}")
            }
            ErrorKind::Refused(why) => format!("refused:{why}"),
            ErrorKind::Tls(why) => format!("tls:{why}"),
        }
    }
}

/// Serde for histograms: base64 of the V2 serialization.
pub mod hist_b64 {
    use base64::Engine as _;
    use hdrhistogram::Histogram;
    use hdrhistogram::serialization::{Deserializer as HDe, Serializer as _, V2Serializer};
    use serde::{Deserialize, Deserializer, Serializer};

    /// Encodes a histogram as base64 text.
    pub fn encode(h: &Histogram<u64>) -> String {
        let mut buf = Vec::new();
        V2Serializer::new()
            .serialize(h, &mut buf)
            .expect("serializing into a Vec cannot fail");
        base64::engine::general_purpose::STANDARD.encode(buf)
    }

    /// Decodes base64 text into a histogram.
    pub fn decode(s: &str) -> Result<Histogram<u64>, String> {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(s)
            .map_err(|e| format!("histogram base64: {e}"))?;
        HDe::new()
            .deserialize(&mut &bytes[..])
            .map_err(|e| format!("histogram: {e:?}"))
    }

    pub fn serialize<S: Serializer>(h: &Histogram<u64>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&encode(h))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Histogram<u64>, D::Error> {
        let s = String::deserialize(d)?;
        decode(&s).map_err(serde::de::Error::custom)
    }
}

/// Serde for a list of histograms: base64 of each one's V2 serialization.
pub mod hist_vec_b64 {
    use hdrhistogram::Histogram;
    use serde::{Deserialize, Deserializer, Serializer, ser::SerializeSeq};

    pub fn serialize<S: Serializer>(v: &[Histogram<u64>], s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(v.len()))?;
        for h in v {
            seq.serialize_element(&super::hist_b64::encode(h))?;
        }
        seq.end()
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Histogram<u64>>, D::Error> {
        Vec::<String>::deserialize(d)?
            .iter()
            .map(|t| super::hist_b64::decode(t).map_err(serde::de::Error::custom))
            .collect()
    }
}

fn add_hist(into: &mut Histogram<u64>, from: &Histogram<u64>) {
    // Both have the same bounds, so adding cannot go out of range; fall back to
    // re-recording value by value if it ever does.
    if into.add(from).is_err() {
        for v in from.iter_recorded() {
            into.saturating_record_n(v.value_iterated_to(), v.count_at_value());
        }
    }
}

fn add_vec(into: &mut Vec<u64>, from: &[u64]) {
    if into.len() < from.len() {
        into.resize(from.len(), 0);
    }
    for (a, b) in into.iter_mut().zip(from) {
        *a += b;
    }
}

fn add_errors(into: &mut BTreeMap<String, u64>, from: &BTreeMap<String, u64>) {
    for (k, v) in from {
        *into.entry(k.clone()).or_default() += v;
    }
}

/// Everything measured during one step, for one worker or merged over all.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StepStats {
    /// Data messages written to sockets.
    pub sent: u64,
    /// Data messages received with a stamp of this step.
    pub received: u64,
    /// Receipts the sent messages should produce (sent × recipients per message).
    pub expected: u64,
    /// Messages that arrived stamped with another step (after their step's drain).
    pub late: u64,
    /// One-way (or round-trip, for commands) latency from the intended send time, µs.
    #[serde(with = "hist_b64")]
    pub latency: Histogram<u64>,
    /// The same from the actual send time (the stamp's lag taken off): the server's
    /// share without the generator's scheduling error, µs.
    #[serde(with = "hist_b64")]
    pub latency_sent: Histogram<u64>,
    /// Latency from the intended send time by arrival time: bucket `i` covers seconds
    /// `[i × bucket_s, (i + 1) × bucket_s)` of the step, µs.
    #[serde(with = "hist_vec_b64")]
    pub latency_by_time: Vec<Histogram<u64>>,
    /// Width of one `latency_by_time` bucket, seconds.
    pub time_bucket_s: u32,
    /// Heartbeat round trip (PING→PONG, PINGREQ→PINGRESP) from its intended time, µs.
    #[serde(with = "hist_b64")]
    pub heartbeat: Histogram<u64>,
    /// The tool's own lag: when each message was written minus its intended time, µs.
    /// Large values mean the generator, not the server, was late.
    #[serde(with = "hist_b64")]
    pub send_lag: Histogram<u64>,
    /// Heartbeats sent.
    pub pings: u64,
    /// Heartbeat answers received.
    pub pongs: u64,
    /// Messages sent in each second of the step (by intended time).
    pub sent_per_sec: Vec<u64>,
    /// Messages received in each second of the step (by arrival time).
    pub recv_per_sec: Vec<u64>,
    /// Errors by kind.
    pub errors: BTreeMap<String, u64>,
    /// Connections still open when the step (and its drain) ended. A server that
    /// takes a connection and closes it at once is found here, not at connect time.
    #[serde(default)]
    pub held: u64,
}

impl Default for StepStats {
    fn default() -> Self {
        Self {
            sent: 0,
            received: 0,
            expected: 0,
            late: 0,
            latency: new_hist(),
            latency_sent: new_hist(),
            latency_by_time: Vec::new(),
            time_bucket_s: 1,
            heartbeat: new_hist(),
            send_lag: new_hist(),
            pings: 0,
            pongs: 0,
            sent_per_sec: Vec::new(),
            recv_per_sec: Vec::new(),
            errors: BTreeMap::new(),
            held: 0,
        }
    }
}

impl StepStats {
    /// Adds another worker's stats for the same step.
    pub fn merge(&mut self, o: &StepStats) {
        self.sent += o.sent;
        self.received += o.received;
        self.expected += o.expected;
        self.late += o.late;
        add_hist(&mut self.latency, &o.latency);
        add_hist(&mut self.latency_sent, &o.latency_sent);
        self.time_bucket_s = self.time_bucket_s.max(o.time_bucket_s);
        for (i, h) in o.latency_by_time.iter().enumerate() {
            if self.latency_by_time.len() <= i {
                self.latency_by_time.push(new_time_hist());
            }
            add_hist(&mut self.latency_by_time[i], h);
        }
        add_hist(&mut self.heartbeat, &o.heartbeat);
        add_hist(&mut self.send_lag, &o.send_lag);
        self.pings += o.pings;
        self.pongs += o.pongs;
        add_vec(&mut self.sent_per_sec, &o.sent_per_sec);
        add_vec(&mut self.recv_per_sec, &o.recv_per_sec);
        add_errors(&mut self.errors, &o.errors);
        self.held += o.held;
    }

    /// Receipts that never came: expected − received (never negative).
    pub fn lost(&self) -> u64 {
        self.expected.saturating_sub(self.received)
    }

    /// Lost receipts as a fraction of expected receipts.
    pub fn loss_ratio(&self) -> f64 {
        if self.expected == 0 {
            0.0
        } else {
            self.lost() as f64 / self.expected as f64
        }
    }

    /// Total errors of all kinds.
    pub fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }

    fn bump(v: &mut Vec<u64>, sec: usize, n: u64) {
        let sec = sec.min(MAX_SECONDS - 1);
        if v.len() <= sec {
            v.resize(sec + 1, 0);
        }
        v[sec] += n;
    }

    fn error(&mut self, kind: &ErrorKind) {
        *self.errors.entry(kind.name()).or_default() += 1;
    }
}

/// The connect phase of one worker, or merged over all.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ConnectStats {
    /// Connections this phase tried to open.
    pub planned: u64,
    /// Connections that finished their handshake (and joins).
    pub established: u64,
    /// Connections that failed.
    pub failed: u64,
    /// Time from the start (or, in a storm, the intended start) of a connect to the end
    /// of its handshake, µs.
    #[serde(with = "hist_b64")]
    pub time: Histogram<u64>,
    /// Errors by kind.
    pub errors: BTreeMap<String, u64>,
    /// When the first connect started, ns of CLOCK_MONOTONIC (0 if none).
    pub first_ns: u64,
    /// When the last connect finished, ns of CLOCK_MONOTONIC.
    pub last_ns: u64,
    /// Limit notes from the worker (for instance the open-file cap it hit).
    pub notes: Vec<String>,
    /// Connections the worker holds once the phase is over.
    #[serde(default)]
    pub holding: u64,
    /// Connects the server answered `busy` with a retry hint, retried after it.
    #[serde(default)]
    pub retried: u64,
}

impl Default for ConnectStats {
    fn default() -> Self {
        Self {
            planned: 0,
            established: 0,
            failed: 0,
            time: new_hist(),
            errors: BTreeMap::new(),
            first_ns: 0,
            last_ns: 0,
            notes: Vec::new(),
            holding: 0,
            retried: 0,
        }
    }
}

impl ConnectStats {
    /// Adds another worker's connect phase.
    pub fn merge(&mut self, o: &ConnectStats) {
        self.planned += o.planned;
        self.established += o.established;
        self.failed += o.failed;
        add_hist(&mut self.time, &o.time);
        add_errors(&mut self.errors, &o.errors);
        if o.first_ns != 0 && (self.first_ns == 0 || o.first_ns < self.first_ns) {
            self.first_ns = o.first_ns;
        }
        self.last_ns = self.last_ns.max(o.last_ns);
        self.holding += o.holding;
        self.retried += o.retried;
        for n in &o.notes {
            if !self.notes.contains(n) {
                self.notes.push(n.clone());
            }
        }
    }

    /// Records one finished connect attempt.
    pub fn record(&mut self, started_ns: u64, ended_ns: u64, result: Result<(), ErrorKind>) {
        if self.first_ns == 0 || started_ns < self.first_ns {
            self.first_ns = started_ns;
        }
        self.last_ns = self.last_ns.max(ended_ns);
        match result {
            Ok(()) => {
                self.established += 1;
                self.time
                    .saturating_record((ended_ns.saturating_sub(started_ns) / 1000).max(1));
            }
            Err(kind) => {
                self.failed += 1;
                *self.errors.entry(kind.name()).or_default() += 1;
            }
        }
    }

    /// Connections established per second over the phase.
    pub fn rate(&self) -> f64 {
        let span = self.last_ns.saturating_sub(self.first_ns);
        if span == 0 {
            0.0
        } else {
            self.established as f64 / (span as f64 / 1e9)
        }
    }
}

/// Cumulative counters read by the live progress line.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProgressSnapshot {
    /// Connections currently open.
    pub connected: u64,
    /// Connect attempts finished (success or failure).
    pub connects_done: u64,
    /// Data messages sent since the worker started.
    pub sent: u64,
    /// Data messages received since the worker started.
    pub received: u64,
    /// Errors since the worker started.
    pub errors: u64,
}

impl ProgressSnapshot {
    /// Sum of two workers' counters.
    pub fn add(&mut self, o: &ProgressSnapshot) {
        self.connected += o.connected;
        self.connects_done += o.connects_done;
        self.sent += o.sent;
        self.received += o.received;
        self.errors += o.errors;
    }
}

/// Live counters behind [`ProgressSnapshot`].
#[derive(Debug, Default)]
pub struct Counters {
    pub connected: AtomicU64,
    pub connects_done: AtomicU64,
    pub sent: AtomicU64,
    pub received: AtomicU64,
    pub errors: AtomicU64,
}

impl Counters {
    /// Reads every counter.
    pub fn snapshot(&self) -> ProgressSnapshot {
        ProgressSnapshot {
            connected: self.connected.load(Ordering::Relaxed),
            connects_done: self.connects_done.load(Ordering::Relaxed),
            sent: self.sent.load(Ordering::Relaxed),
            received: self.received.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
        }
    }
}

/// How one receipt is recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Receipt {
    /// Count it and record its latency.
    Measure,
    /// Count it only (a command at its controller: the browser measures the round trip).
    CountOnly,
}

/// The live recorder of one worker, shared by all its connections.
#[derive(Debug)]
pub struct Recorder {
    /// Step stats, sharded so connections on different threads rarely share a lock.
    shards: Box<[Mutex<StepStats>]>,
    /// Current step id, or [`NO_STEP`].
    step: AtomicU32,
    /// Start of the current step, ns of CLOCK_MONOTONIC (bucket 0 of per-second counts).
    step_start_ns: AtomicU64,
    /// End of the current step's sending window: heartbeats intended in
    /// [start, end) belong to the step, so each one's answer is counted with it.
    step_end_ns: AtomicU64,
    /// Counters for the progress line.
    pub counters: Counters,
}

impl Recorder {
    /// A recorder with `shards` independent shards (at least one).
    pub fn new(shards: usize) -> Self {
        let shards = (0..shards.max(1))
            .map(|_| Mutex::new(StepStats::default()))
            .collect();
        Self {
            shards,
            step: AtomicU32::new(NO_STEP),
            step_start_ns: AtomicU64::new(0),
            step_end_ns: AtomicU64::new(0),
            counters: Counters::default(),
        }
    }

    fn shard(&self, key: usize) -> std::sync::MutexGuard<'_, StepStats> {
        let m = &self.shards[key % self.shards.len()];
        m.lock().unwrap_or_else(|poison| poison.into_inner())
    }

    fn second(&self, t_ns: u64) -> usize {
        let start = self.step_start_ns.load(Ordering::Relaxed);
        (t_ns.saturating_sub(start) / 1_000_000_000) as usize
    }

    /// Current step id.
    pub fn step(&self) -> u32 {
        self.step.load(Ordering::Acquire)
    }

    /// Starts step `id`, sending from `start_ns` until `end_ns`, with empty stats.
    pub fn begin_step(&self, id: u32, start_ns: u64, end_ns: u64) {
        let secs = end_ns.saturating_sub(start_ns).div_ceil(1_000_000_000);
        let width = secs.div_ceil(MAX_TIME_BUCKETS).clamp(1, u32::MAX as u64) as u32;
        for s in self.shards.iter() {
            let mut g = s.lock().unwrap_or_else(|p| p.into_inner());
            *g = StepStats::default();
            g.time_bucket_s = width;
        }
        self.step_start_ns.store(start_ns, Ordering::Relaxed);
        self.step_end_ns.store(end_ns, Ordering::Relaxed);
        self.step.store(id, Ordering::Release);
    }

    /// Ends the current step and returns its merged stats; arrivals from now on are late.
    pub fn end_step(&self) -> StepStats {
        self.step.store(NO_STEP, Ordering::Release);
        let mut total = StepStats::default();
        for s in self.shards.iter() {
            let mut g = s.lock().unwrap_or_else(|p| p.into_inner());
            total.merge(&g);
            *g = StepStats::default();
        }
        total.held = self.counters.connected.load(Ordering::Relaxed);
        total
    }

    /// Records data messages intended at `intended` (ascending) and written together
    /// at `written_ns`, each expected to reach `recipients` clients; each one's send
    /// lag (written − intended) goes into the send-lag histogram.
    pub fn sent_scheduled(&self, key: usize, intended: &[u64], written_ns: u64, recipients: u64) {
        let Some(&first) = intended.first() else {
            return;
        };
        let n = intended.len() as u64;
        let sec = self.second(first);
        let mut s = self.shard(key);
        for &t in intended {
            s.send_lag
                .saturating_record((written_ns.saturating_sub(t) / 1000).max(1));
        }
        s.sent += n;
        s.expected += n * recipients;
        StepStats::bump(&mut s.sent_per_sec, sec, n);
        drop(s);
        self.counters.sent.fetch_add(n, Ordering::Relaxed);
    }

    /// Records `n` unscheduled data messages (command replies) written at `now_ns`,
    /// each expected to reach `recipients` clients: no send lag for them.
    pub fn sent(&self, key: usize, now_ns: u64, n: u64, recipients: u64) {
        if n == 0 {
            return;
        }
        let sec = self.second(now_ns);
        let mut s = self.shard(key);
        s.sent += n;
        s.expected += n * recipients;
        StepStats::bump(&mut s.sent_per_sec, sec, n);
        drop(s);
        self.counters.sent.fetch_add(n, Ordering::Relaxed);
    }

    /// Records data messages received at `now_ns`.
    pub fn received(&self, key: usize, stamps: &[Stamp], now_ns: u64, how: Receipt) {
        if stamps.is_empty() {
            return;
        }
        let step = self.step();
        let sec = self.second(now_ns);
        let mut on_time = 0;
        let mut s = self.shard(key);
        for st in stamps {
            if st.step != step || step == NO_STEP {
                s.late += 1;
                continue;
            }
            on_time += 1;
            if how == Receipt::Measure {
                let us = (now_ns.saturating_sub(st.intended_ns) / 1000).max(1);
                s.latency.saturating_record(us);
                let from_sent = now_ns.saturating_sub(st.sent_ns()) / 1000;
                s.latency_sent.saturating_record(from_sent.max(1));
                let bucket =
                    (sec / s.time_bucket_s.max(1) as usize).min(MAX_TIME_BUCKETS as usize * 2);
                while s.latency_by_time.len() <= bucket {
                    s.latency_by_time.push(new_time_hist());
                }
                s.latency_by_time[bucket].saturating_record(us);
            }
        }
        s.received += on_time;
        StepStats::bump(&mut s.recv_per_sec, sec, on_time);
        drop(s);
        self.counters.received.fetch_add(on_time, Ordering::Relaxed);
    }

    fn in_window(&self, t_ns: u64) -> bool {
        self.step() != NO_STEP
            && t_ns >= self.step_start_ns.load(Ordering::Relaxed)
            && t_ns < self.step_end_ns.load(Ordering::Relaxed)
    }

    /// Records a heartbeat intended at `intended_ns` (counted when inside the step).
    pub fn ping(&self, key: usize, intended_ns: u64) {
        if self.in_window(intended_ns) {
            self.shard(key).pings += 1;
        }
    }

    /// Records the answer, at `now_ns`, to the heartbeat intended at `intended_ns`
    /// (counted when that heartbeat was inside the step).
    pub fn pong(&self, key: usize, intended_ns: u64, now_ns: u64) {
        if !self.in_window(intended_ns) {
            return;
        }
        let mut s = self.shard(key);
        s.pongs += 1;
        let rtt = now_ns.saturating_sub(intended_ns);
        s.heartbeat.saturating_record((rtt / 1000).max(1));
    }

    /// Records an error.
    pub fn error(&self, key: usize, kind: &ErrorKind) {
        self.shard(key).error(kind);
        self.counters.errors.fetch_add(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
// Tests build values field by field from the defaults, which reads clearer here.
#[allow(clippy::field_reassign_with_default)]
mod tests {
    use super::*;

    fn stamp(t: u64, step: u32) -> Stamp {
        Stamp {
            intended_ns: t,
            step,
            lag_ns: 0,
        }
    }

    #[test]
    fn latency_is_measured_from_the_intended_time() {
        let r = Recorder::new(2);
        r.begin_step(1, 1_000_000_000, u64::MAX);
        r.sent_scheduled(0, &[1_000_000_000, 1_000_200_000], 1_000_300_000, 1);
        // Intended at 1.000 s and 1.001 s, received at 1.005 s; the first was written
        // 300 µs late.
        let mut late = stamp(1_000_000_000, 1);
        late.lag_ns = 300_000;
        r.received(
            1,
            &[late, stamp(1_001_000_000, 1)],
            1_005_000_000,
            Receipt::Measure,
        );
        let s = r.end_step();
        assert_eq!((s.sent, s.received, s.expected, s.lost()), (2, 2, 2, 0));
        assert_eq!(s.latency.len(), 2);
        assert_eq!(s.latency.max(), s.latency.highest_equivalent(5000));
        assert_eq!(s.latency.min(), s.latency.lowest_equivalent(4000));
        // From the actual send: 4.7 ms and 4 ms.
        assert_eq!(
            s.latency_sent.max(),
            s.latency_sent.highest_equivalent(4700)
        );
        assert_eq!(s.latency_sent.min(), s.latency_sent.lowest_equivalent(4000));
        // One lag per message: 300 µs and 100 µs.
        assert_eq!(s.send_lag.len(), 2);
        assert_eq!(s.send_lag.max(), s.send_lag.highest_equivalent(300));
        assert_eq!(s.send_lag.min(), s.send_lag.lowest_equivalent(100));
        // Both arrived in the first second: one latency-over-time bucket.
        assert_eq!(s.latency_by_time.len(), 1);
        assert_eq!(s.latency_by_time[0].len(), 2);
    }

    #[test]
    fn other_steps_count_as_late_not_received() {
        let r = Recorder::new(1);
        r.begin_step(2, 0, u64::MAX);
        r.received(0, &[stamp(0, 1), stamp(0, 2)], 10, Receipt::Measure);
        let s = r.end_step();
        assert_eq!((s.received, s.late), (1, 1));
        // Between steps everything is late.
        r.received(0, &[stamp(0, 2)], 10, Receipt::Measure);
        r.begin_step(3, 0, u64::MAX);
        let s = r.end_step();
        assert_eq!(
            s.received, 0,
            "the reset at begin_step discards between-step arrivals"
        );
    }

    #[test]
    fn count_only_receipts_record_no_latency() {
        let r = Recorder::new(1);
        r.begin_step(0, 0, u64::MAX);
        r.received(0, &[stamp(0, 0)], 5_000, Receipt::CountOnly);
        let s = r.end_step();
        assert_eq!(s.received, 1);
        assert_eq!(s.latency.len(), 0);
    }

    #[test]
    fn throughput_lands_in_per_second_buckets() {
        let r = Recorder::new(4);
        r.begin_step(0, 10_000_000_000, u64::MAX);
        r.sent(0, 10_100_000_000, 5, 3);
        r.sent(1, 12_500_000_000, 7, 3);
        r.received(
            2,
            &[stamp(11_000_000_000, 0)],
            11_900_000_000,
            Receipt::Measure,
        );
        let s = r.end_step();
        assert_eq!(s.sent_per_sec, vec![5, 0, 7]);
        assert_eq!(s.recv_per_sec, vec![0, 1]);
        assert_eq!(s.expected, 36);
        assert_eq!(s.send_lag.len(), 0, "no lag without a write time");
        assert_eq!(s.lost(), 35);
    }

    #[test]
    fn heartbeats_count_by_their_intended_time() {
        let r = Recorder::new(1);
        r.begin_step(1, 1_000, 2_000);
        r.ping(0, 999); // before the step: not counted
        r.ping(0, 1_500);
        r.ping(0, 2_000); // at the end: belongs to no step
        r.pong(0, 999, 1_600);
        r.pong(0, 1_500, 1_700_000);
        let s = r.end_step();
        assert_eq!((s.pings, s.pongs), (1, 1));
        assert_eq!(s.heartbeat.len(), 1);
        assert_eq!(s.heartbeat.max(), s.heartbeat.highest_equivalent(1_698));
    }

    #[test]
    fn errors_are_counted_by_kind() {
        let r = Recorder::new(2);
        r.begin_step(0, 0, u64::MAX);
        r.error(0, &ErrorKind::Server("no_route".into()));
        r.error(1, &ErrorKind::Server("no_route".into()));
        r.error(1, &ErrorKind::Disconnected);
        let s = r.end_step();
        assert_eq!(s.errors["server:no_route"], 2);
        assert_eq!(s.errors["disconnected"], 1);
        assert_eq!(s.error_count(), 3);
        assert_eq!(r.counters.snapshot().errors, 3);
    }

    #[test]
    fn step_stats_survive_serialization_and_merge() {
        let mut a = StepStats::default();
        a.sent = 3;
        a.latency.saturating_record(100);
        a.latency.saturating_record(2_000);
        a.sent_per_sec = vec![1, 2];
        let json = serde_json::to_string(&a).unwrap();
        let b: StepStats = serde_json::from_str(&json).unwrap();
        assert_eq!(b.latency.len(), 2);
        assert_eq!(b.latency.max(), a.latency.max());
        let mut m = a.clone();
        m.merge(&b);
        assert_eq!(m.sent, 6);
        assert_eq!(m.latency.len(), 4);
        assert_eq!(m.sent_per_sec, vec![2, 4]);
    }

    #[test]
    fn connect_stats_merge_spans_and_rates() {
        let mut a = ConnectStats::default();
        a.record(1_000_000_000, 1_001_000_000, Ok(()));
        a.record(1_500_000_000, 1_600_000_000, Err(ErrorKind::ConnectRefused));
        let mut b = ConnectStats::default();
        b.record(2_000_000_000, 3_000_000_000, Ok(()));
        a.merge(&b);
        assert_eq!((a.established, a.failed), (2, 1));
        assert_eq!(a.errors["connect_refused"], 1);
        assert_eq!(a.first_ns, 1_000_000_000);
        assert_eq!(a.last_ns, 3_000_000_000);
        assert!((a.rate() - 1.0).abs() < 1e-9);
        let back: ConnectStats = serde_json::from_str(&serde_json::to_string(&a).unwrap()).unwrap();
        assert_eq!(back.time.len(), 2);
    }
}
