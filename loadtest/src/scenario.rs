//! The scenario: what to simulate and how to measure it, read from a TOML file
//! (`config/loadtest/*.toml`) and overridden by command-line flags. Validation returns
//! every problem at once, each naming its key and the reason.

use std::fmt;
use std::net::{Ipv4Addr, SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Why a scenario cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ScenarioError {
    /// The file could not be read.
    #[error("cannot read scenario {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The TOML does not parse or has unknown keys or wrong types.
    #[error("scenario {origin}: {message}")]
    Parse { origin: String, message: String },
    /// The values parse but break one or more rules.
    #[error("scenario {origin} is not valid:\n  - {}", problems.join("\n  - "))]
    Invalid {
        origin: String,
        problems: Vec<String>,
    },
}

/// A duration written as `"250ms"`, `"10s"`, `"2m"`, `"1h"` or a number of seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Dur(pub Duration);

/// A duration string that does not parse.
#[derive(Debug, Clone, thiserror::Error, PartialEq)]
#[error("`{0}` is not a duration (write e.g. 250ms, 10s, 2m, 1h)")]
pub struct BadDuration(pub String);

impl Dur {
    /// Whole seconds.
    pub const fn secs(s: u64) -> Self {
        Dur(Duration::from_secs(s))
    }
    /// Milliseconds.
    pub const fn millis(ms: u64) -> Self {
        Dur(Duration::from_millis(ms))
    }
    /// Nanoseconds, saturating at u64::MAX.
    pub fn as_nanos(&self) -> u64 {
        u64::try_from(self.0.as_nanos()).unwrap_or(u64::MAX)
    }
    /// Seconds as a float.
    pub fn as_secs_f64(&self) -> f64 {
        self.0.as_secs_f64()
    }
}

impl FromStr for Dur {
    type Err = BadDuration;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim();
        let bad = || BadDuration(s.to_string());
        let split = t
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let value: f64 = num.parse().map_err(|_| bad())?;
        let scale = match unit.trim() {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "" | "s" => 1.0,
            "m" | "min" => 60.0,
            "h" => 3600.0,
            _ => return Err(bad()),
        };
        let secs = value * scale;
        if !secs.is_finite() || !(0.0..=1e9).contains(&secs) {
            return Err(bad());
        }
        Ok(Dur(Duration::from_secs_f64(secs)))
    }
}

impl fmt::Display for Dur {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ns = self.0.as_nanos();
        if ns == 0 {
            write!(f, "0s")
        } else if ns.is_multiple_of(1_000_000_000) {
            write!(f, "{}s", ns / 1_000_000_000)
        } else if ns.is_multiple_of(1_000_000) {
            write!(f, "{}ms", ns / 1_000_000)
        } else if ns.is_multiple_of(1_000) {
            write!(f, "{}us", ns / 1_000)
        } else {
            write!(f, "{ns}ns")
        }
    }
}

impl Serialize for Dur {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(u64),
            Float(f64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Int(n) => Ok(Dur(Duration::from_secs(n))),
            Raw::Float(x) if x.is_finite() && (0.0..=1e9).contains(&x) => {
                Ok(Dur(Duration::from_secs_f64(x)))
            }
            Raw::Float(x) => Err(serde::de::Error::custom(BadDuration(x.to_string()))),
            Raw::Text(t) => t.parse().map_err(serde::de::Error::custom),
        }
    }
}

/// The traffic pattern a scenario drives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum Pattern {
    /// Each controller sends to its own browser(s) at `rate`.
    #[default]
    Telemetry,
    /// Each browser sends a command to its controller, which replies; latency is the
    /// round trip.
    Command,
    /// One publishing controller per group, `members` browsers in each group.
    #[serde(alias = "fan-out")]
    Fanout,
    /// Many controllers send to few dashboards.
    #[serde(alias = "fan-in")]
    Fanin,
    /// Connected controllers that only heartbeat.
    Idle,
    /// Controllers connect at `connect_rate` per second and hold the connection.
    Storm,
}

impl Pattern {
    /// All patterns, in documentation order.
    pub const ALL: [Pattern; 6] = [
        Pattern::Telemetry,
        Pattern::Command,
        Pattern::Fanout,
        Pattern::Fanin,
        Pattern::Idle,
        Pattern::Storm,
    ];

    /// Lower-case name as written in scenarios.
    pub fn as_str(&self) -> &'static str {
        match self {
            Pattern::Telemetry => "telemetry",
            Pattern::Command => "command",
            Pattern::Fanout => "fanout",
            Pattern::Fanin => "fanin",
            Pattern::Idle => "idle",
            Pattern::Storm => "storm",
        }
    }

    /// True for patterns that send data at a rate (and so can be ramped).
    pub fn sends_data(&self) -> bool {
        matches!(
            self,
            Pattern::Telemetry | Pattern::Command | Pattern::Fanout | Pattern::Fanin
        )
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Pattern {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "telemetry" => Ok(Pattern::Telemetry),
            "command" => Ok(Pattern::Command),
            "fanout" | "fan-out" => Ok(Pattern::Fanout),
            "fanin" | "fan-in" => Ok(Pattern::Fanin),
            "idle" => Ok(Pattern::Idle),
            "storm" => Ok(Pattern::Storm),
            _ => Err(format!(
                "unknown pattern `{s}` (telemetry, command, fanout, fanin, idle, storm)"
            )),
        }
    }
}

/// Wire form of the relay protocol a client speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Form {
    /// Binary frames (length-prefixed on TCP, binary messages on WebSocket).
    #[default]
    Binary,
    /// JSON (one object per line on TCP, text messages on WebSocket).
    Json,
}

impl FromStr for Form {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "binary" => Ok(Form::Binary),
            "json" => Ok(Form::Json),
            _ => Err(format!("unknown form `{s}` (binary, json)")),
        }
    }
}

/// Where a group of clients connects, parsed from a URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// `tcp://host:port` (`tcps://`: over TLS): relay controllers over TCP.
    RelayTcp {
        addr: SocketAddr,
        /// `Some(host of the URL)` over TLS.
        tls: Option<String>,
    },
    /// `ws://host:port/path` (`wss://`: over TLS): relay browsers over WebSocket.
    RelayWs {
        addr: SocketAddr,
        host: String,
        path: String,
        /// `Some(host of the URL)` over TLS.
        tls: Option<String>,
    },
    /// `mqtt://host:port` (`mqtts://`: over TLS): an MQTT 3.1.1 broker.
    Mqtt {
        addr: SocketAddr,
        /// `Some(host of the URL)` over TLS.
        tls: Option<String>,
    },
    /// `echo://host:port`: a server that sends every byte back (calibration): no
    /// handshake, each controller receives its own binary DATA frames.
    Echo { addr: SocketAddr },
}

/// The URLs of a comma-separated list (one URL: a list of one).
pub fn split_urls(list: &str) -> Vec<&str> {
    list.split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .collect()
}

/// The host part of `host:port` (brackets of an IPv6 literal removed).
fn host_of(hostport: &str) -> &str {
    let host = match hostport.rsplit_once(':') {
        Some((h, p)) if !p.contains(']') => h,
        _ => hostport,
    };
    host.trim_start_matches('[').trim_end_matches(']')
}

impl Endpoint {
    /// Parses and resolves a URL of the forms above.
    pub fn parse(url: &str) -> Result<Self, String> {
        let (scheme, rest) = url.split_once("://").ok_or_else(|| {
            format!("`{url}` is not a URL (tcp://, tcps://, ws://, wss://, mqtt:// or mqtts://)")
        })?;
        let (hostport, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        let default_port = match scheme {
            "tcp" => 7000,
            "tcps" => 7443,
            "ws" => 80,
            "wss" => 443,
            "mqtt" => 1883,
            "mqtts" => 8883,
            "echo" => 7,
            _ => {
                return Err(format!(
                    "`{url}`: unknown scheme `{scheme}` (tcp, tcps, ws, wss, mqtt, mqtts, echo)"
                ));
            }
        };
        let with_port = if hostport
            .rsplit_once(':')
            .is_some_and(|(_, p)| !p.contains(']'))
        {
            hostport.to_string()
        } else {
            format!("{hostport}:{default_port}")
        };
        let addr = with_port
            .to_socket_addrs()
            .map_err(|e| format!("`{url}`: cannot resolve `{with_port}`: {e}"))?
            .find(|a| a.is_ipv4())
            .ok_or_else(|| format!("`{url}`: `{with_port}` has no IPv4 address"))?;
        let tls = matches!(scheme, "tcps" | "wss" | "mqtts").then(|| host_of(hostport).to_string());
        match scheme {
            "tcp" | "tcps" => Ok(Endpoint::RelayTcp { addr, tls }),
            "mqtt" | "mqtts" => Ok(Endpoint::Mqtt { addr, tls }),
            "echo" => Ok(Endpoint::Echo { addr }),
            _ => Ok(Endpoint::RelayWs {
                addr,
                host: hostport.to_string(),
                path: if path.is_empty() {
                    "/ws".into()
                } else {
                    path.into()
                },
                tls,
            }),
        }
    }

    /// The socket address to connect to.
    pub fn addr(&self) -> SocketAddr {
        match self {
            Endpoint::RelayTcp { addr, .. }
            | Endpoint::Mqtt { addr, .. }
            | Endpoint::Echo { addr }
            | Endpoint::RelayWs { addr, .. } => *addr,
        }
    }

    /// The host name TLS verifies (the URL's host), `None` without TLS.
    pub fn tls_host(&self) -> Option<&str> {
        match self {
            Endpoint::RelayTcp { tls, .. }
            | Endpoint::Mqtt { tls, .. }
            | Endpoint::RelayWs { tls, .. } => tls.as_deref(),
            Endpoint::Echo { .. } => None,
        }
    }

    /// True for MQTT targets.
    pub fn is_mqtt(&self) -> bool {
        matches!(self, Endpoint::Mqtt { .. })
    }

    /// True for an echo server (calibration of the generator itself).
    pub fn is_echo(&self) -> bool {
        matches!(self, Endpoint::Echo { .. })
    }
}

/// `[target]`: where the clients connect and in which form they speak.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TargetSpec {
    /// URL controllers connect to: `tcp://host:port` (relay), `mqtt://host:port`, or
    /// `echo://host:port` (a byte echo server: calibrates the generator itself).
    /// Several URLs separated by commas (nodes of one relay cluster): clients are
    /// placed on them round-robin by their position in the fleet.
    pub controllers: String,
    /// URL browsers connect to: `ws://host:port/ws` (relay); empty means the same
    /// broker as `controllers` when that is MQTT. With several controllers' URLs,
    /// as many browsers' URLs, in the same order (one per node).
    pub browsers: String,
    /// Form controllers speak on TCP.
    pub controller_form: Form,
    /// Form browsers speak on WebSocket (`json`: text messages, hello in the URL).
    pub browser_form: Form,
    /// Prefix of every address, group and topic the run uses, so concurrent runs do
    /// not collide; empty means a fresh one per run.
    pub prefix: String,
    /// Pid of the server to sample from /proc (0: find the process listening on the
    /// controllers' port).
    pub server_pid: u32,
    /// Other processes whose CPU every report gives, such as the relay's Redis and
    /// MySQL: `name=pid` or `name=:port` (the process listening on that port).
    pub watch: Vec<String>,
    /// PEM file of the CA certificates that TLS targets (`tcps://`, `wss://`,
    /// `mqtts://`) are verified against.
    pub ca_file: Option<PathBuf>,
    /// PEM certificate chain presented to the server (mutual TLS); needs `client_key`.
    pub client_cert: Option<PathBuf>,
    /// PEM private key of `client_cert`.
    pub client_key: Option<PathBuf>,
    /// Name the server's certificate is verified for and sent as SNI (default: the
    /// host of the URL).
    pub tls_server_name: Option<String>,
}

/// A process to watch: its name and how to find it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchSpec {
    /// A given pid.
    Pid(String, u32),
    /// The process listening on this TCP port.
    Port(String, u16),
}

impl WatchSpec {
    /// Parses `name=pid` or `name=:port`.
    pub fn parse(item: &str) -> Result<Self, String> {
        let (name, what) = item
            .split_once('=')
            .ok_or_else(|| format!("`{item}`: write name=pid or name=:port"))?;
        let name = name.trim();
        if name.is_empty()
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(format!(
                "`{item}`: the name must be letters, digits, - or _"
            ));
        }
        let what = what.trim();
        if let Some(port) = what.strip_prefix(':') {
            let port: u16 = port
                .parse()
                .map_err(|_| format!("`{item}`: `{port}` is not a port"))?;
            return Ok(WatchSpec::Port(name.to_string(), port));
        }
        let pid: u32 = what
            .parse()
            .map_err(|_| format!("`{item}`: `{what}` is neither a pid nor :port"))?;
        Ok(WatchSpec::Pid(name.to_string(), pid))
    }

    /// The name it is reported under.
    pub fn name(&self) -> &str {
        match self {
            WatchSpec::Pid(n, _) | WatchSpec::Port(n, _) => n,
        }
    }
}

impl Default for TargetSpec {
    fn default() -> Self {
        Self {
            controllers: "tcp://127.0.0.1:7000".into(),
            browsers: "ws://127.0.0.1:8080/ws".into(),
            controller_form: Form::Binary,
            browser_form: Form::Json,
            prefix: String::new(),
            server_pid: 0,
            watch: Vec::new(),
            ca_file: None,
            client_cert: None,
            client_key: None,
            tls_server_name: None,
        }
    }
}

/// `[load]`: the fleet and the traffic it makes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoadSpec {
    /// Controllers (telemetry, command, fanin, idle, storm).
    pub controllers: u32,
    /// Browsers watching each controller (telemetry; >1 uses a group per controller).
    pub browsers_per_controller: u32,
    /// Groups, each with one publishing controller (fanout).
    pub groups: u32,
    /// Browsers in each group (fanout).
    pub members: u32,
    /// Dashboards receiving everything (fanin).
    pub dashboards: u32,
    /// Messages per second per sending client.
    pub rate: Option<f64>,
    /// Messages per second for the whole fleet (divided among the senders); use this
    /// or `rate`.
    pub total_rate: Option<f64>,
    /// Connections opened per second (storm: the measured rate; others: pacing of the
    /// connect phase, 0 = as fast as `connect_concurrency` allows).
    pub connect_rate: f64,
    /// Storm only: close each connection right after its handshake instead of holding.
    pub storm_close: bool,
    /// Payload size in bytes (≥ 16: the timestamp stamp).
    pub payload_bytes: u32,
    /// A JSON payload template instead of padding, e.g.
    /// `{"temp": {{rand 20..90}}}`, so that rules see real values: every message is
    /// the object with the stamp's fields first; `{{rand A..B}}` and `{{seq}}` are
    /// filled in per message. Sent with the JSON flag in every form, not padded.
    pub payload_template: Option<String>,
    /// Heartbeat interval of every client.
    pub heartbeat: Dur,
    /// How long each step sends.
    pub duration: Dur,
    /// How long to wait after sending stops for messages still in flight.
    pub drain: Dur,
    /// Sends are rounded up to a grid of this step (everything due leaves in one
    /// batch per tick); 0 sends at the intended times themselves.
    pub tick: Dur,
}

impl Default for LoadSpec {
    fn default() -> Self {
        Self {
            controllers: 100,
            browsers_per_controller: 1,
            groups: 1,
            members: 100,
            dashboards: 1,
            rate: None,
            total_rate: None,
            connect_rate: 0.0,
            storm_close: false,
            payload_bytes: 64,
            payload_template: None,
            heartbeat: Dur::secs(30),
            duration: Dur::secs(10),
            drain: Dur::secs(2),
            tick: Dur::millis(0),
        }
    }
}

/// `[run]`: how the tool spreads the fleet over processes and sockets.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RunSpec {
    /// Worker processes (0: as many as the open-file limit requires).
    pub workers: u32,
    /// Runtime threads per worker (0: the machine's cores divided among workers).
    pub threads: u32,
    /// Source addresses to connect from: `127.0.0.2`, or ranges `127.0.0.2..127.0.0.9`
    /// (empty: 127.0.0.1, plus more loopback addresses when one runs out of ports).
    pub source_addrs: Vec<String>,
    /// Handshakes in flight at once per worker during the connect phase.
    pub connect_concurrency: u32,
    /// Give up on one connection's TCP connect + handshake after this long.
    pub connect_timeout: Dur,
    /// Times one connection is retried after the server answered `busy` with a
    /// `retry_after_ms` (waiting that long first, as a device does); 0 = never.
    pub busy_retries: u32,
    /// Most messages one connection writes in one batch.
    pub max_batch: u32,
    /// Open files kept free in each process for everything but connections.
    pub fd_reserve: u32,
    /// Delay between announcing a step and its start, so every worker starts together.
    pub start_lead: Dur,
    /// Interval of /proc samples of the server.
    pub sample_interval: Dur,
    /// Bytes one connection keeps queued while its socket is full; past this, command
    /// replies are dropped (counted as `reply_dropped`) and scheduled messages are
    /// counted as `write_blocked`.
    pub max_pending: u32,
    /// Most the sender thread spins on the clock before a message is due (it sleeps
    /// until then). Within it, the spin follows how late this machine's sleeps
    /// actually end (their 90th percentile), so a quiet machine spins a few µs.
    /// 0 = sleep all the way: cheaper, less precise.
    pub spin: Dur,
}

impl Default for RunSpec {
    fn default() -> Self {
        Self {
            workers: 0,
            threads: 0,
            source_addrs: Vec::new(),
            connect_concurrency: 256,
            connect_timeout: Dur::secs(10),
            busy_retries: 10,
            max_batch: 1024,
            fd_reserve: 256,
            start_lead: Dur::millis(200),
            sample_interval: Dur::millis(500),
            max_pending: 4 << 20,
            spin: Dur(Duration::from_micros(50)),
        }
    }
}

/// What `--find-max` ramps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum RampBy {
    /// The total message rate over a fixed fleet.
    #[default]
    Rate,
    /// The number of connected controllers (groups for fanout), each at `load.rate`.
    Fleet,
}

impl FromStr for RampBy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "rate" => Ok(RampBy::Rate),
            "fleet" => Ok(RampBy::Fleet),
            _ => Err(format!("unknown ramp `{s}` (rate, fleet)")),
        }
    }
}

impl fmt::Display for RampBy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RampBy::Rate => "rate",
            RampBy::Fleet => "fleet",
        })
    }
}

/// `[find_max]`: the SLO every step is judged by, and the ramp that reports the
/// highest rate (or largest fleet) that meets it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FindMaxSpec {
    /// Run the ramp instead of one fixed-rate step.
    pub enabled: bool,
    /// What the ramp grows: `rate` (total msg/s) or `fleet` (connected controllers).
    pub by: RampBy,
    /// The p99 latency a passing step must stay under (fixed runs are judged by it
    /// too).
    pub slo_p99: Dur,
    /// The loss ratio a passing step must stay under (0.001 = 0.1%).
    pub max_loss: f64,
    /// Fleet ramp: the first fleet size (controllers, or groups for fanout); default
    /// a tenth of `load.controllers` (`load.groups`), which is the ramp's ceiling.
    pub start_fleet: Option<u32>,
    /// First total rate (msg/s for the fleet); default: `total_rate`, or `rate` × senders,
    /// or 1 msg/s per sender.
    pub start_rate: Option<f64>,
    /// Each ramp step multiplies the rate by this.
    pub factor: f64,
    /// Most ramp steps before giving up growing.
    pub max_steps: u32,
    /// Bisection steps between the last passing and the first failing rate.
    pub refine_steps: u32,
    /// Upper bound of the total rate; 0 = none.
    pub max_rate: f64,
    /// Length of each step (the drain comes on top).
    pub step_duration: Dur,
}

impl Default for FindMaxSpec {
    fn default() -> Self {
        Self {
            enabled: false,
            by: RampBy::Rate,
            slo_p99: Dur::millis(10),
            max_loss: 0.001,
            start_fleet: None,
            start_rate: None,
            factor: 1.5,
            max_steps: 20,
            refine_steps: 3,
            max_rate: 0.0,
            step_duration: Dur::secs(5),
        }
    }
}

/// `[report]`: where the reports go (the human summary always goes to stdout).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct ReportSpec {
    /// JSON report path.
    pub json: Option<PathBuf>,
    /// HTML report path.
    pub html: Option<PathBuf>,
}

/// A complete scenario.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Scenario {
    /// Short name shown in reports.
    pub name: String,
    /// One line on what the scenario measures.
    pub description: String,
    /// Traffic pattern.
    pub pattern: Pattern,
    pub target: TargetSpec,
    pub load: LoadSpec,
    pub run: RunSpec,
    pub find_max: FindMaxSpec,
    pub report: ReportSpec,
}

impl Default for Scenario {
    fn default() -> Self {
        Self {
            name: "adhoc".into(),
            description: String::new(),
            pattern: Pattern::Telemetry,
            target: TargetSpec::default(),
            load: LoadSpec::default(),
            run: RunSpec::default(),
            find_max: FindMaxSpec::default(),
            report: ReportSpec::default(),
        }
    }
}

/// Highest payload the tool will send (a relay frame is at most 65536 bytes with headers).
pub const MAX_PAYLOAD: u32 = 60_000;
/// Smallest payload: the binary stamp takes 12 bytes.
pub const MIN_PAYLOAD: u32 = 16;
/// Longest address prefix, so that every generated address stays within 64 bytes.
pub const MAX_PREFIX: usize = 40;

impl Scenario {
    /// Reads and parses a scenario file (not yet validated: flags may still override).
    pub fn load(path: &std::path::Path) -> Result<Self, ScenarioError> {
        let text = std::fs::read_to_string(path).map_err(|source| ScenarioError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_toml(&text, &path.display().to_string())
    }

    /// Parses scenario TOML; `origin` names it in errors.
    pub fn from_toml(text: &str, origin: &str) -> Result<Self, ScenarioError> {
        toml::from_str(text).map_err(|e| ScenarioError::Parse {
            origin: origin.to_string(),
            message: e.to_string(),
        })
    }

    /// The controllers' endpoint (the first one when there are several).
    pub fn controller_endpoint(&self) -> Result<Endpoint, String> {
        Endpoint::parse(
            split_urls(&self.target.controllers)
                .first()
                .copied()
                .unwrap_or(""),
        )
    }

    /// Number of targets clients are spread over (the controllers' URLs).
    pub fn targets(&self) -> usize {
        split_urls(&self.target.controllers).len().max(1)
    }

    /// Every controllers' endpoint, in the order given.
    pub fn controller_endpoints(&self) -> Result<Vec<Endpoint>, String> {
        let urls = split_urls(&self.target.controllers);
        if urls.is_empty() {
            return Ok(vec![Endpoint::parse("")?]);
        }
        urls.into_iter().map(Endpoint::parse).collect()
    }

    /// Every browsers' endpoint: one per controllers' endpoint (the controllers'
    /// again for MQTT or an echo server).
    pub fn browser_endpoints(&self) -> Result<Vec<Endpoint>, String> {
        let ctl = self.controller_endpoint()?;
        if ctl.is_echo()
            || (ctl.is_mqtt()
                && (self.target.browsers.is_empty()
                    || self.target.browsers == TargetSpec::default().browsers))
        {
            return self.controller_endpoints();
        }
        let urls = split_urls(&self.target.browsers);
        if urls.len() > 1 || self.targets() > 1 {
            if urls.len() != self.targets() {
                return Err(format!(
                    "{} controllers' URLs need as many browsers' URLs (one per node, same order), not {}",
                    self.targets(),
                    urls.len()
                ));
            }
            return urls.into_iter().map(Endpoint::parse).collect();
        }
        Ok(vec![self.browser_endpoint()?])
    }

    /// The browsers' endpoint (the MQTT broker again when controllers use MQTT and no
    /// browser URL is given).
    pub fn browser_endpoint(&self) -> Result<Endpoint, String> {
        let ctl = self.controller_endpoint()?;
        if ctl.is_echo() {
            return Ok(ctl);
        }
        if ctl.is_mqtt()
            && (self.target.browsers.is_empty()
                || self.target.browsers == TargetSpec::default().browsers)
        {
            return Ok(ctl);
        }
        Endpoint::parse(
            split_urls(&self.target.browsers)
                .first()
                .copied()
                .unwrap_or(""),
        )
    }

    /// The pattern connects browsers.
    pub fn plan_has_browsers(&self) -> bool {
        !matches!(self.pattern, Pattern::Idle | Pattern::Storm) && !self.is_echo()
    }

    /// True when the controllers' target is an echo server.
    pub fn is_echo(&self) -> bool {
        self.controller_endpoint().is_ok_and(|e| e.is_echo())
    }

    /// Whether the run is a find-max ramp over the connected fleet (not the rate).
    pub fn ramps_fleet(&self) -> bool {
        self.find_max.enabled && self.find_max.by == RampBy::Fleet
    }

    /// Number of clients that send data at the pattern's rate.
    pub fn senders(&self) -> u64 {
        let l = &self.load;
        if self.is_echo() {
            return l.controllers as u64;
        }
        match self.pattern {
            Pattern::Telemetry | Pattern::Fanin => l.controllers as u64,
            Pattern::Command => l.controllers as u64,
            Pattern::Fanout => l.groups as u64,
            Pattern::Idle | Pattern::Storm => 0,
        }
    }

    /// Total number of connections the scenario opens.
    pub fn connections(&self) -> u64 {
        let l = &self.load;
        if self.is_echo() {
            return l.controllers as u64;
        }
        match self.pattern {
            Pattern::Telemetry => l.controllers as u64 * (1 + l.browsers_per_controller as u64),
            Pattern::Command => l.controllers as u64 * 2,
            Pattern::Fanout => l.groups as u64 * (1 + l.members as u64),
            Pattern::Fanin => l.controllers as u64 + l.dashboards as u64,
            Pattern::Idle | Pattern::Storm => l.controllers as u64,
        }
    }

    /// Messages per second per sender for a fleet-wide `total` rate.
    pub fn per_sender_rate(&self, total: f64) -> f64 {
        let n = self.senders();
        if n == 0 { 0.0 } else { total / n as f64 }
    }

    /// The configured fleet-wide rate, from `total_rate` or `rate` × senders.
    pub fn total_rate(&self) -> Option<f64> {
        match (self.load.total_rate, self.load.rate) {
            (Some(t), _) => Some(t),
            (None, Some(r)) => Some(r * self.senders() as f64),
            (None, None) => None,
        }
    }

    /// Source addresses from `run.source_addrs` (ranges expanded), empty when unset.
    pub fn source_addrs(&self) -> Result<Vec<Ipv4Addr>, String> {
        let mut out = Vec::new();
        for item in &self.run.source_addrs {
            out.extend(parse_addr_range(item)?);
        }
        Ok(out)
    }

    /// Checks every rule and returns all problems at once.
    pub fn validate(&self, origin: &str) -> Result<(), ScenarioError> {
        let mut p: Vec<String> = Vec::new();
        let l = &self.load;
        let ctl = self.controller_endpoint();
        match &ctl {
            Err(e) => p.push(format!("target.controllers: {e}")),
            Ok(Endpoint::RelayWs { .. }) => p.push(
                "target.controllers: controllers connect over tcp:// or tcps:// (relay), or mqtt:// or mqtts://".into(),
            ),
            Ok(_) => {}
        }
        if let Ok(c) = &ctl
            && c.is_echo()
            && self.pattern != Pattern::Telemetry
        {
            p.push("target.controllers: an echo:// target runs the telemetry pattern only (each controller receives its own messages)".into());
        }
        if let Ok(c) = &ctl
            && !c.is_echo()
        {
            match self.browser_endpoint() {
                Err(e) => p.push(format!("target.browsers: {e}")),
                Ok(b) => {
                    if c.is_mqtt() != b.is_mqtt() {
                        p.push("target.browsers: controllers and browsers must both be MQTT or both be the relay".into());
                    } else if matches!(b, Endpoint::RelayTcp { .. }) {
                        p.push("target.browsers: browsers connect over ws://host:port/ws or wss://host:port/ws".into());
                    }
                }
            }
        }
        if self.targets() > 1 {
            match self.controller_endpoints() {
                Err(e) => p.push(format!("target.controllers: {e}")),
                Ok(all) => {
                    if all.iter().any(|e| e.is_echo()) {
                        p.push("target.controllers: an echo:// target takes one URL".into());
                    }
                    if all.iter().any(|e| {
                        std::mem::discriminant(e) != std::mem::discriminant(&all[0])
                            || e.tls_host().is_some() != all[0].tls_host().is_some()
                    }) {
                        p.push("target.controllers: several URLs must all be of one scheme".into());
                    }
                }
            }
            if self.plan_has_browsers()
                && let Err(e) = self.browser_endpoints()
            {
                p.push(format!("target.browsers: {e}"));
            }
        }
        // TLS: the CA file (and client identity) must load, the server name parse.
        let tls_hosts: Vec<String> = [ctl.clone().ok(), self.browser_endpoint().ok()]
            .into_iter()
            .flatten()
            .filter_map(|e| e.tls_host().map(str::to_string))
            .collect();
        if let Some(host) = tls_hosts.first()
            && let Err(e) = crate::tls::TlsClient::new(&self.target, host)
        {
            p.push(e);
        }
        let prefix = &self.target.prefix;
        if prefix.len() > MAX_PREFIX {
            p.push(format!("target.prefix: at most {MAX_PREFIX} bytes"));
        }
        if !prefix.bytes().all(relay_core::name::is_name_byte) {
            p.push("target.prefix: only A-Z a-z 0-9 . _ : @ - are allowed".into());
        }
        let nonzero = |p: &mut Vec<String>, key: &str, v: u32| {
            if v == 0 {
                p.push(format!(
                    "load.{key}: must be at least 1 for pattern {}",
                    self.pattern
                ));
            }
        };
        match self.pattern {
            Pattern::Telemetry => {
                nonzero(&mut p, "controllers", l.controllers);
                nonzero(&mut p, "browsers_per_controller", l.browsers_per_controller);
            }
            Pattern::Command | Pattern::Idle => nonzero(&mut p, "controllers", l.controllers),
            Pattern::Fanout => {
                nonzero(&mut p, "groups", l.groups);
                nonzero(&mut p, "members", l.members);
            }
            Pattern::Fanin => {
                nonzero(&mut p, "controllers", l.controllers);
                nonzero(&mut p, "dashboards", l.dashboards);
            }
            Pattern::Storm => {
                nonzero(&mut p, "controllers", l.controllers);
                if !(l.connect_rate > 0.0 && l.connect_rate.is_finite()) {
                    p.push("load.connect_rate: a storm needs a connect rate above 0".into());
                }
            }
        }
        if !(l.connect_rate >= 0.0 && l.connect_rate.is_finite()) {
            p.push("load.connect_rate: must be a finite number ≥ 0".into());
        }
        if self.connections() > 10_000_000 {
            p.push("load: more than 10,000,000 connections".into());
        }
        if l.rate.is_some() && l.total_rate.is_some() {
            p.push("load.rate / load.total_rate: give one of them, not both".into());
        }
        for (key, v) in [("rate", l.rate), ("total_rate", l.total_rate)] {
            if let Some(v) = v
                && !(v > 0.0 && v.is_finite() && v <= 1e9)
            {
                p.push(format!("load.{key}: must be above 0 and at most 1e9"));
            }
        }
        let fleet_ramp = self.ramps_fleet();
        if fleet_ramp && self.pattern.sends_data() && l.rate.is_none() {
            p.push(format!(
                "load.rate: a fleet ramp keeps each {}'s rate fixed; give load.rate (per sender), not load.total_rate",
                if self.pattern == Pattern::Fanout { "publisher" } else { "controller" }
            ));
        }
        if self.pattern.sends_data() && !self.find_max.enabled && self.total_rate().is_none() {
            p.push(format!(
                "load.rate: pattern {} sends data; give load.rate (per sender) or load.total_rate",
                self.pattern
            ));
        }
        if !(MIN_PAYLOAD..=MAX_PAYLOAD).contains(&l.payload_bytes) {
            p.push(format!(
                "load.payload_bytes: must be {MIN_PAYLOAD}..={MAX_PAYLOAD}"
            ));
        }
        if let Some(t) = &l.payload_template {
            if let Err(e) = crate::payload::Template::parse(t) {
                p.push(format!("load.payload_template: {e}"));
            }
            if self.is_echo() {
                p.push("load.payload_template: an echo target measures the generator with plain stamps".into());
            }
        }
        if l.heartbeat.0 < Duration::from_millis(10) || l.heartbeat.0 > Duration::from_secs(3600) {
            p.push("load.heartbeat: must be between 10ms and 1h".into());
        }
        if l.duration.0.is_zero() || l.duration.0 > Duration::from_secs(86_400) {
            p.push("load.duration: must be above 0 and at most 24h".into());
        }
        if l.drain.0 > Duration::from_secs(600) {
            p.push("load.drain: at most 10m".into());
        }
        if l.tick.0 > Duration::from_secs(1) {
            p.push("load.tick: at most 1s".into());
        }
        let r = &self.run;
        if r.workers > 256 {
            p.push("run.workers: at most 256".into());
        }
        if r.threads > 256 {
            p.push("run.threads: at most 256".into());
        }
        if r.connect_concurrency == 0 || r.connect_concurrency > 100_000 {
            p.push("run.connect_concurrency: must be 1..=100000".into());
        }
        if r.connect_timeout.0.is_zero() {
            p.push("run.connect_timeout: must be above 0".into());
        }
        if r.max_batch == 0 {
            p.push("run.max_batch: must be at least 1".into());
        }
        if r.start_lead.0 > Duration::from_secs(60) {
            p.push("run.start_lead: at most 60s".into());
        }
        if r.sample_interval.0 < Duration::from_millis(10) {
            p.push("run.sample_interval: at least 10ms".into());
        }
        if r.max_pending < 65_536 {
            p.push("run.max_pending: at least 65536 bytes".into());
        }
        if r.spin.0 > Duration::from_millis(1) {
            p.push("run.spin: at most 1ms".into());
        }
        if let Err(e) = self.source_addrs() {
            p.push(format!("run.source_addrs: {e}"));
        }
        for w in &self.target.watch {
            if let Err(e) = WatchSpec::parse(w) {
                p.push(format!("target.watch: {e}"));
            }
        }
        let f = &self.find_max;
        if f.enabled {
            if f.by == RampBy::Rate && !self.pattern.sends_data() {
                p.push(format!(
                    "find_max.enabled: pattern {} sends no data; the rate ramp needs telemetry, command, fanout or fanin (a fleet ramp takes idle too)",
                    self.pattern
                ));
            }
            if f.by == RampBy::Fleet && self.pattern == Pattern::Storm {
                p.push("find_max.by: a storm has no steady fleet to ramp".into());
            }
            if let Some(n) = f.start_fleet
                && n == 0
            {
                p.push("find_max.start_fleet: must be at least 1".into());
            }
            if f.slo_p99.0.is_zero() {
                p.push("find_max.slo_p99: must be above 0".into());
            }
            if !(0.0..1.0).contains(&f.max_loss) {
                p.push("find_max.max_loss: must be in [0, 1)".into());
            }
            if !(f.factor > 1.0 && f.factor.is_finite() && f.factor <= 100.0) {
                p.push("find_max.factor: must be above 1 and at most 100".into());
            }
            if f.max_steps == 0 || f.max_steps > 100 {
                p.push("find_max.max_steps: must be 1..=100".into());
            }
            if f.refine_steps > 20 {
                p.push("find_max.refine_steps: at most 20".into());
            }
            if let Some(s) = f.start_rate
                && !(s > 0.0 && s.is_finite())
            {
                p.push("find_max.start_rate: must be above 0".into());
            }
            if !(f.max_rate >= 0.0 && f.max_rate.is_finite()) {
                p.push("find_max.max_rate: must be ≥ 0 (0 = no bound)".into());
            }
            if f.step_duration.0.is_zero() {
                p.push("find_max.step_duration: must be above 0".into());
            }
        }
        if p.is_empty() {
            Ok(())
        } else {
            Err(ScenarioError::Invalid {
                origin: origin.to_string(),
                problems: p,
            })
        }
    }
}

/// Parses `a.b.c.d` or `a.b.c.d..a.b.c.e` (inclusive, at most 65536 addresses).
pub fn parse_addr_range(item: &str) -> Result<Vec<Ipv4Addr>, String> {
    let parse = |s: &str| {
        s.trim()
            .parse::<Ipv4Addr>()
            .map_err(|_| format!("`{s}` is not an IPv4 address"))
    };
    match item.split_once("..") {
        None => Ok(vec![parse(item)?]),
        Some((a, b)) => {
            let (a, b) = (u32::from(parse(a)?), u32::from(parse(b)?));
            if b < a {
                return Err(format!("`{item}`: the range ends before it starts"));
            }
            if b - a >= 65_536 {
                return Err(format!("`{item}`: more than 65536 addresses"));
            }
            Ok((a..=b).map(Ipv4Addr::from).collect())
        }
    }
}

#[cfg(test)]
// Tests build values field by field from the defaults, which reads clearer here.
#[allow(clippy::field_reassign_with_default)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_in_every_unit() {
        assert_eq!("250ms".parse::<Dur>().unwrap(), Dur::millis(250));
        assert_eq!("10s".parse::<Dur>().unwrap(), Dur::secs(10));
        assert_eq!("2m".parse::<Dur>().unwrap(), Dur::secs(120));
        assert_eq!("1h".parse::<Dur>().unwrap(), Dur::secs(3600));
        assert_eq!("1.5s".parse::<Dur>().unwrap(), Dur::millis(1500));
        assert_eq!("7".parse::<Dur>().unwrap(), Dur::secs(7));
        assert!("ten seconds".parse::<Dur>().is_err());
        assert!("5 parsecs".parse::<Dur>().is_err());
        assert!("-1s".parse::<Dur>().is_err());
        assert_eq!(Dur::millis(1500).to_string(), "1500ms");
        assert_eq!(Dur::secs(30).to_string(), "30s");
    }

    #[test]
    fn toml_durations_accept_strings_and_numbers() {
        let s = Scenario::from_toml(
            "[load]\nduration = \"3s\"\ndrain = 1\nheartbeat = 0.5\nrate = 2.0\n",
            "t",
        )
        .unwrap();
        assert_eq!(s.load.duration, Dur::secs(3));
        assert_eq!(s.load.drain, Dur::secs(1));
        assert_eq!(s.load.heartbeat, Dur::millis(500));
    }

    #[test]
    fn unknown_keys_are_rejected_with_their_name() {
        let e = Scenario::from_toml("[load]\ncontrolers = 5\n", "x.toml").unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("controlers"), "{msg}");
        assert!(msg.contains("x.toml"), "{msg}");
    }

    #[test]
    fn validation_lists_every_problem_with_its_key() {
        let mut s = Scenario::default();
        s.load.controllers = 0;
        s.load.payload_bytes = 4;
        s.load.rate = Some(-1.0);
        s.target.controllers = "http://x".into();
        let e = s.validate("bad.toml").unwrap_err();
        let ScenarioError::Invalid { problems, .. } = &e else {
            panic!("{e}")
        };
        let all = problems.join("\n");
        for key in [
            "load.controllers",
            "load.payload_bytes",
            "load.rate",
            "target.controllers",
        ] {
            assert!(all.contains(key), "missing {key} in {all}");
        }
    }

    #[test]
    fn sending_patterns_need_a_rate_unless_ramping() {
        let mut s = Scenario::default();
        assert!(s.validate("t").is_err());
        s.find_max.enabled = true;
        s.validate("t").unwrap();
        s.pattern = Pattern::Idle;
        assert!(s.validate("t").is_err(), "idle cannot be ramped");
        s.find_max.enabled = false;
        s.validate("t").unwrap();
    }

    #[test]
    fn endpoints_parse_and_default_ports() {
        assert_eq!(
            Endpoint::parse("tcp://127.0.0.1:7001").unwrap(),
            Endpoint::RelayTcp {
                addr: "127.0.0.1:7001".parse().unwrap(),
                tls: None
            }
        );
        assert_eq!(
            Endpoint::parse("tcps://localhost").unwrap(),
            Endpoint::RelayTcp {
                addr: "127.0.0.1:7443".parse().unwrap(),
                tls: Some("localhost".into())
            }
        );
        let mqtts = Endpoint::parse("mqtts://127.0.0.1").unwrap();
        assert_eq!(mqtts.addr(), "127.0.0.1:8883".parse().unwrap());
        assert!(mqtts.is_mqtt());
        assert_eq!(mqtts.tls_host(), Some("127.0.0.1"));
        let Endpoint::RelayWs {
            path, host, tls, ..
        } = Endpoint::parse("wss://localhost:8443/ws").unwrap()
        else {
            panic!()
        };
        assert_eq!((path.as_str(), host.as_str()), ("/ws", "localhost:8443"));
        assert_eq!(tls.as_deref(), Some("localhost"));
        assert_eq!(
            Endpoint::parse("mqtt://127.0.0.1").unwrap().tls_host(),
            None
        );
        assert_eq!(
            Endpoint::parse("mqtt://127.0.0.1").unwrap().addr(),
            "127.0.0.1:1883".parse().unwrap()
        );
        let Endpoint::RelayWs { path, host, .. } = Endpoint::parse("ws://localhost:8080").unwrap()
        else {
            panic!()
        };
        assert_eq!(path, "/ws");
        assert_eq!(host, "localhost:8080");
        assert_eq!(
            Endpoint::parse("ws://localhost:8080").unwrap().tls_host(),
            None
        );
        assert!(Endpoint::parse("https://x:1").is_err());
        assert!(Endpoint::parse("nope").is_err());
    }

    #[test]
    fn tls_targets_need_a_ca_file() {
        let mut s = Scenario::default();
        s.target.controllers = "tcps://127.0.0.1:7443".into();
        s.target.browsers = "wss://127.0.0.1:8443/ws".into();
        s.load.rate = Some(1.0);
        let e = s.validate("t").unwrap_err().to_string();
        assert!(e.contains("target.ca_file"), "{e}");
        s.target.ca_file = Some("/nonexistent/ca.pem".into());
        let e = s.validate("t").unwrap_err().to_string();
        assert!(e.contains("/nonexistent/ca.pem"), "{e}");
    }

    #[test]
    fn mqtt_controllers_imply_mqtt_browsers() {
        let mut s = Scenario::default();
        s.target.controllers = "mqtt://127.0.0.1:1883".into();
        assert!(s.browser_endpoint().unwrap().is_mqtt());
        s.load.rate = Some(1.0);
        s.validate("t").unwrap();
    }

    #[test]
    fn rates_convert_between_total_and_per_sender() {
        let mut s = Scenario::default();
        s.pattern = Pattern::Fanin;
        s.load.controllers = 1000;
        s.load.total_rate = Some(20_000.0);
        assert_eq!(s.total_rate(), Some(20_000.0));
        assert_eq!(s.per_sender_rate(20_000.0), 20.0);
        s.load.total_rate = None;
        s.load.rate = Some(5.0);
        assert_eq!(s.total_rate(), Some(5000.0));
        assert_eq!(s.connections(), 1001);
    }

    #[test]
    fn address_ranges_expand() {
        let v = parse_addr_range("127.0.0.2..127.0.0.4").unwrap();
        assert_eq!(v.len(), 3);
        assert_eq!(v[2], Ipv4Addr::new(127, 0, 0, 4));
        assert!(parse_addr_range("127.0.0.4..127.0.0.2").is_err());
        assert!(parse_addr_range("localhost").is_err());
    }
}
