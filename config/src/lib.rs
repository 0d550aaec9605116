//! relay-config: the relay's TOML schema, its embedded defaults, validation
//! that reports every mistake at once, and environment overrides.
//!
//! With no file at all the relay starts with [`DEFAULTS_TOML`] (the same values
//! as [`Config::default`]): shards = cores, controllers on TCP 127.0.0.1:7000,
//! HTTP on 127.0.0.1:8080, auth off, example rules loaded, Redis and MySQL off.
//! `config/relay.toml` shows the production shape.
//!
//! # Loading
//! [`Config::load`] reads the file (or the embedded defaults), applies the
//! environment overrides, decodes, and checks every rule. Whatever is wrong
//! comes back together in one [`ConfigError`], one line per [`Problem`]:
//!
//! ```text
//! env RELAY__AUTH__MODE: auth.mode: unknown value `hmca`, expected `none` or `hmac`
//! config/relay.toml: limits.bogus: unknown key; expected one of `max_frame`, `max_connections`, …
//! config/relay.toml: limits.max_frame: is 4, must be at least 9 (a frame body has 9 fixed bytes; 16 MiB is the ceiling)
//! ```
//!
//! Problems that serde finds (unknown keys, wrong types) come first, in key
//! order, then the broken rules (ranges, keys that must agree). Keys the schema
//! does not know are refused, in the file and in overrides.
//!
//! # Environment overrides
//! `RELAY__<SECTION>__<KEY>=value` sets one key, e.g.
//! `RELAY__LIMITS__MAX_FRAME=131072`, `RELAY__AUTH__MODE=hmac`,
//! `RELAY__LISTENERS__TCP=0.0.0.0:7000`, `RELAY__REDIS__URL=redis://10.0.0.5/`.
//! - The prefix is `RELAY__` in upper case; parts of the key path are separated
//!   by `__` (two underscores) and matched case-insensitively, so single
//!   underscores inside a key (`MAX_FRAME`) are kept.
//! - Deeper keys take more parts; a numeric part indexes an array of tables
//!   (`RELAY__NOTIFY__ROUTE__0__SEVERITY=critical`).
//! - The value is read as a TOML value when it is one (`131072`, `true`,
//!   `"quoted"`, `[1, 2]`, `{ a = 1 }`); otherwise, or when that value has the
//!   wrong type for the key, the raw text is used as a string.
//! - Overrides win over the file. An override naming an unknown key is a
//!   problem whose file is `env RELAY__…`.
//!
//! # Layout
//! - `sections`: the relay's own sections (`[node]` … `[upgrade]`) and their defaults.
//! - `acl`: the access rules (`[acl]`) and their compilation.
//! - `plugins`: the sections of the script workers, sinks and notifiers.
//! - `problem`: [`Problem`] and [`ConfigError`].
//! - `env`: applying `RELAY__…` overrides to the document.
//! - `decode`: turning the document into [`Config`] while collecting every structural problem.
//! - `rules`: ranges and cross-key rules, and warnings.
//! - `path`: key paths inside a TOML document.

use std::ffi::OsString;
use std::path::Path;

use serde::{Deserialize, Serialize};

pub mod acl;
mod decode;
mod env;
mod path;
pub mod plugins;
mod problem;
mod rules;
mod sections;

pub use env::{ENV_PREFIX, ENV_SEPARATOR};
pub use problem::{ConfigError, Problem};
pub use rules::{
    MAX_CONNECTIONS_CEILING, MAX_FRAME_CEILING, MAX_NODE_NAME, MAX_SHARDS, MIN_FRAME,
    MIN_SECRET_BYTES, OPEN_FILES_LIMIT, RESERVED_FILES,
};
pub use sections::{
    AdmissionConfig, AuthConfig, AuthMode, ClusterConfig, HeartbeatConfig, HttpConfig, IoBackend,
    LimitsConfig, ListenersConfig, LogConfig, LogFormat, MqttConfig, NodeConfig, ShardsConfig,
    ShutdownConfig, TlsConfig, UpgradeConfig,
};

/// The embedded defaults: every key, commented, with its default value.
/// `relay config print` shows it; it decodes to exactly [`Config::default`].
pub const DEFAULTS_TOML: &str = include_str!("../defaults.toml");

/// The origin named in problems when no file is given.
pub const DEFAULTS_ORIGIN: &str = "<embedded defaults.toml>";

/// The whole configuration of one relay process.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Who this relay is.
    pub node: NodeConfig,
    /// Where clients connect.
    pub listeners: ListenersConfig,
    /// The thread-per-core runtime.
    pub shards: ShardsConfig,
    /// Bounds per connection and for the whole process.
    pub limits: LimitsConfig,
    /// Liveness: heartbeat period and idle timeout.
    pub heartbeat: HeartbeatConfig,
    /// Who may connect.
    pub auth: AuthConfig,
    /// Console, WebSocket, API and metrics.
    pub http: HttpConfig,
    /// Log level and format.
    pub log: LogConfig,
    /// How the relay stops.
    pub shutdown: ShutdownConfig,
    /// How fast new clients are let in.
    pub admission: AdmissionConfig,
    /// Handing over to a new process (SIGUSR2).
    pub upgrade: UpgradeConfig,
    /// Certificates and bounds of the TLS listeners.
    pub tls: TlsConfig,
    /// Access rules: who may send, join, publish or watch what.
    pub acl: acl::AclConfig,
    /// Rhai script workers.
    pub plugins: plugins::PluginsConfig,
    /// Redis sink (device state, counters).
    pub redis: plugins::RedisConfig,
    /// MySQL sink (history).
    pub mysql: plugins::MysqlConfig,
    /// Notifiers and alarm routes.
    pub notify: plugins::NotifyConfig,
    /// Several nodes as one relay, over NATS (off by default).
    pub cluster: ClusterConfig,
    /// MQTT clients: mapping and session bounds.
    pub mqtt: MqttConfig,
}

impl Config {
    /// Loads the file at `path` (or the embedded defaults when `None`), applies
    /// the `RELAY__…` variables of this process, and validates the result.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let (text, origin) = match path {
            Some(path) => {
                let origin = path.display().to_string();
                match std::fs::read_to_string(path) {
                    Ok(text) => (text, origin),
                    Err(err) => {
                        return Err(ConfigError {
                            problems: vec![Problem::new(
                                origin,
                                "",
                                format!("cannot read the file: {err}"),
                            )],
                        });
                    }
                }
            }
            None => (DEFAULTS_TOML.to_owned(), DEFAULTS_ORIGIN.to_owned()),
        };
        let (env, env_problems) = process_env(std::env::vars_os());
        match Config::from_toml(&text, &origin, env) {
            Ok(config) if env_problems.is_empty() => Ok(config),
            Ok(_) => Err(ConfigError {
                problems: env_problems,
            }),
            Err(mut err) => {
                err.problems.extend(env_problems);
                Err(err)
            }
        }
    }

    /// Decodes `text` (named `origin` in problems), applies the overrides in
    /// `env` (pairs of variable name and value; names without the `RELAY__`
    /// prefix are ignored, so `std::env::vars()` can be passed as is), and
    /// validates the result.
    pub fn from_toml(
        text: &str,
        origin: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let table = match toml::from_str::<toml::Table>(text) {
            Ok(table) => table,
            Err(err) => {
                return Err(ConfigError {
                    problems: vec![syntax_problem(origin, text, &err)],
                });
            }
        };
        let mut doc = toml::Value::Table(table);
        let mut problems = Vec::new();
        let applied = env::apply(&mut doc, env, &mut problems);
        let origin_of = |key: &str| -> String {
            applied
                .iter()
                .filter_map(|ov| ov.covers(key).map(|rank| (rank, ov)))
                .max_by_key(|(rank, _)| *rank)
                .map_or_else(|| origin.to_owned(), |(_, ov)| ov.origin.clone())
        };

        let (config, located) = decode::decode::<Config>(doc, &applied);
        let structural: Vec<String> = located.iter().map(|l| l.path.to_string()).collect();
        for (l, key) in located.iter().zip(&structural) {
            problems.push(Problem::new(origin_of(key), key.clone(), l.reason.clone()));
        }
        let Some(config) = config else {
            return Err(ConfigError { problems });
        };

        for mut problem in config.rule_problems() {
            // A key that could not be decoded already has its problem; its
            // default may not agree with the rest, which is no news.
            if structural
                .iter()
                .any(|bad| path::key_within(&problem.key, bad))
            {
                continue;
            }
            if problem.file.is_empty() {
                problem.file = origin_of(&problem.key);
            }
            problems.push(problem);
        }
        ConfigError::check(problems).map(|()| config)
    }

    /// Checks every rule a decoded configuration must keep (ranges, keys that
    /// must agree); each problem names `origin` as its file.
    pub fn validate(&self, origin: &str) -> Result<(), ConfigError> {
        let mut problems = self.rule_problems();
        for problem in &mut problems {
            if problem.file.is_empty() {
                problem.file = origin.to_owned();
            }
        }
        ConfigError::check(problems)
    }

    /// Settings that load but deserve an operator's look (a placeholder secret,
    /// auth off on a public address…); the binary logs them at start.
    pub fn warnings(&self, origin: &str) -> Vec<Problem> {
        let mut warnings = rules::warnings(self);
        for warning in &mut warnings {
            warning.file = origin.to_owned();
        }
        warnings
    }

    /// Problems of every section, `file` left empty for the caller.
    fn rule_problems(&self) -> Vec<Problem> {
        rules::check(self)
    }

    /// The heartbeat a client gets: its request (`heartbeat_s` in hello)
    /// clamped to `[heartbeat] min_s..=max_s`, or `interval_s` when it asked
    /// for none (absent or 0).
    pub fn heartbeat_s(&self, requested: Option<u32>) -> u32 {
        let h = &self.heartbeat;
        match requested {
            None | Some(0) => h.interval_s,
            Some(s) => s.max(h.min_s).min(h.max_s),
        }
    }

    /// How long a connection with heartbeat `heartbeat_s` may stay silent:
    /// `idle_factor × heartbeat_s` seconds, in milliseconds. `heartbeat_s` is
    /// clamped to `min_s..=max_s` first, so a client cannot ask for no timeout.
    pub fn idle_timeout_ms(&self, heartbeat_s: u32) -> u64 {
        let h = &self.heartbeat;
        let beat = heartbeat_s.max(h.min_s).min(h.max_s);
        u64::from(h.idle_factor) * u64::from(beat) * 1000
    }

    /// Number of shards to start: `shards.count`, or when it is 0 the available
    /// cores, at most [`MAX_SHARDS`].
    pub fn shard_count(&self) -> usize {
        match self.shards.count {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get().min(MAX_SHARDS)),
            n => n,
        }
    }

    /// The configuration as TOML (what `relay config print --effective` shows).
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self)
            .unwrap_or_else(|err| format!("# cannot render the configuration: {err}\n"))
    }
}

/// Splits the process environment into `RELAY__` overrides and problems
/// with variables that are not valid UTF-8.
fn process_env(
    vars: impl IntoIterator<Item = (OsString, OsString)>,
) -> (Vec<(String, String)>, Vec<Problem>) {
    let mut env = Vec::new();
    let mut problems = Vec::new();
    for (name, value) in vars {
        if !name.as_encoded_bytes().starts_with(ENV_PREFIX.as_bytes()) {
            continue;
        }
        match (name.into_string(), value.into_string()) {
            (Ok(name), Ok(value)) => env.push((name, value)),
            (Ok(name), Err(_)) => problems.push(Problem::new(
                env::origin_of(&name),
                "",
                "the value is not valid UTF-8",
            )),
            (Err(name), _) => problems.push(Problem::new(
                env::origin_of(&name.to_string_lossy()),
                "",
                "the variable name is not valid UTF-8",
            )),
        }
    }
    (env, problems)
}

/// A TOML syntax error as one problem with its line and column.
fn syntax_problem(origin: &str, text: &str, err: &toml::de::Error) -> Problem {
    let at = err.span().map(|span| {
        let before = &text.as_bytes()[..span.start.min(text.len())];
        let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
        let column = before.iter().rev().take_while(|&&b| b != b'\n').count() + 1;
        format!(" at line {line}, column {column}")
    });
    let message = err.message().replace('\n', " ");
    Problem::new(
        origin,
        "",
        format!("TOML syntax error{}: {message}", at.unwrap_or_default()),
    )
}

#[cfg(test)]
mod tests;
