//! Configuration of the script workers, the sinks (Redis, MySQL, disk spool) and
//! the notifiers: the `[plugins]`, `[redis]`, `[mysql]` and `[notify]` sections.
//!
//! Every key has a safe default, unknown keys are refused, and each section has a
//! `check` that returns every problem it finds (with its key and the reason)
//! instead of stopping at the first one.
use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// `[plugins]`: the Rhai script workers, their sandbox limits and the spool.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PluginsConfig {
    /// Load and run scripts at all.
    pub enabled: bool,
    /// Folder whose `*.rhai` files are loaded (file-name order).
    pub dir: String,
    /// Script worker threads; events are spread over them by address hash.
    pub workers: usize,
    /// Capacity of each worker's event queue; a full queue drops (and counts) events.
    pub queue: usize,
    /// Seconds between two `on_tick` calls (fractions allowed); 0 turns `on_tick` off.
    pub tick_s: f64,
    /// Most Rhai operations one hook call may run before it is stopped.
    pub max_operations: u64,
    /// Longest wall-clock time (ms) one hook call may run before it is
    /// stopped, whatever it counts as operations.
    pub max_hook_ms: u64,
    /// Deepest function call nesting a script may reach.
    pub max_call_levels: usize,
    /// Deepest expression nesting accepted when a script is compiled.
    pub max_expr_depth: usize,
    /// Longest string (bytes) a script may build.
    pub max_string_size: usize,
    /// Longest array (and blob) a script may build.
    pub max_array_size: usize,
    /// Largest object map a script may build.
    pub max_map_size: usize,
    /// Reload scripts when a file changes or on SIGHUP.
    pub reload: bool,
    /// How often (ms) the rules folder is checked for changed files.
    pub reload_poll_ms: u64,
    /// Alarm clock granularity (ms): timers and escalation steps fire this close to due.
    pub timer_ms: u64,
    /// Most alarms (active plus pending timers) kept at once; more are refused and logged.
    pub max_alarms: usize,
    /// Most addresses whose device shadow is cached in memory.
    pub max_state_addrs: usize,
    /// Capacity of the channel carrying actions (send, publish) back to the shards.
    pub actions_queue: usize,
    /// Capacity of the channel carrying writes to the sink thread.
    pub sink_queue: usize,
    /// Folder of the on-disk spool that keeps writes while a sink is down.
    pub spool_dir: String,
    /// When spool appends reach the disk: every record, every batch, or when the OS decides.
    pub spool_fsync: SpoolFsync,
    /// Most bytes one sink's spool may hold; writes past it are dropped and counted.
    pub spool_max_bytes: u64,
    /// Most devices the registry keeps (every address ever seen); past it the
    /// offline device seen longest ago is forgotten.
    pub registry_max_devices: usize,
    /// Days an offline device stays in the registry after it was last seen (0: no limit
    /// but `registry_max_devices`).
    pub registry_retention_days: u64,
    /// How often (ms) registry changes are written to Redis, in one batch.
    pub registry_flush_ms: u64,
}

impl Default for PluginsConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            dir: "config/rules".into(),
            workers: 2,
            queue: 10_000,
            tick_s: 1.0,
            max_operations: 100_000,
            max_hook_ms: 100,
            max_call_levels: 32,
            max_expr_depth: 64,
            max_string_size: 65_536,
            max_array_size: 10_000,
            max_map_size: 10_000,
            reload: true,
            reload_poll_ms: 1_000,
            timer_ms: 100,
            max_alarms: 10_000,
            max_state_addrs: 1_000_000,
            actions_queue: 10_000,
            sink_queue: 100_000,
            spool_dir: "var/spool".into(),
            spool_fsync: SpoolFsync::Batch,
            spool_max_bytes: 1 << 30,
            registry_max_devices: 100_000,
            registry_retention_days: 90,
            registry_flush_ms: 1_000,
        }
    }
}

/// When appends to the spool are forced to disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum SpoolFsync {
    /// After every record: nothing acknowledged is lost even on power failure.
    Always,
    /// After each batch of records (a few ms of writes at most are at risk).
    Batch,
    /// Never forced; the OS writes back when it likes.
    Never,
}

/// `[redis]`: device shadow, counters, presence, alarm state and timers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RedisConfig {
    /// Use Redis at all (off: state lives in memory only).
    pub enabled: bool,
    /// `redis://host:port/db` URL.
    pub url: String,
    /// Prefix of every key the relay writes, so several relays can share one Redis.
    pub key_prefix: String,
    /// Longest wait (ms) to connect, at start and on reconnect.
    pub connect_timeout_ms: u64,
    /// Longest wait (ms) for one command before the connection is deemed down.
    pub op_timeout_ms: u64,
    /// Pause (ms) between reconnect attempts while Redis is down.
    pub retry_ms: u64,
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            url: "redis://127.0.0.1:6379/".into(),
            key_prefix: "relay:".into(),
            connect_timeout_ms: 2_000,
            op_timeout_ms: 2_000,
            retry_ms: 1_000,
        }
    }
}

/// `[mysql]`: history tables written by `persist`, alarm transitions, notifier attempts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MysqlConfig {
    /// Use MySQL/MariaDB at all.
    pub enabled: bool,
    /// `mysql://user:password@host:port/database` URL.
    pub url: String,
    /// Longest wait (ms) to connect, at start and on reconnect.
    pub connect_timeout_ms: u64,
    /// Longest wait (ms) for one statement before the connection is deemed down.
    pub op_timeout_ms: u64,
    /// Pause (ms) between reconnect attempts while MySQL is down.
    pub retry_ms: u64,
    /// Table receiving every alarm transition (raised, escalated, acknowledged, cleared).
    pub alarm_table: String,
    /// Table receiving every notifier attempt.
    pub notify_table: String,
    /// Tables scripts may `persist` rows into; created when missing.
    pub tables: Vec<TableConfig>,
}

impl Default for MysqlConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            url: "mysql://root@127.0.0.1:3306/relay".into(),
            connect_timeout_ms: 2_000,
            op_timeout_ms: 5_000,
            retry_ms: 1_000,
            alarm_table: "relay_alarm_events".into(),
            notify_table: "relay_notify_attempts".into(),
            tables: Vec::new(),
        }
    }
}

/// `[[mysql.tables]]`: one table a script may append rows to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TableConfig {
    /// Table name (letters, digits, `_`; at most 64).
    pub name: String,
    /// Columns besides the automatic `id` and `relay_seq`.
    pub columns: Vec<ColumnConfig>,
}

/// One column of a declared table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ColumnConfig {
    /// Column name (letters, digits, `_`; at most 64).
    pub name: String,
    /// Column type, from a fixed list so no SQL text comes from config or scripts.
    #[serde(rename = "type")]
    pub kind: ColumnType,
}

/// The column types a declared table may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum ColumnType {
    /// 64-bit integer (`BIGINT`).
    Int,
    /// Double precision float (`DOUBLE`).
    Float,
    /// Boolean (`TINYINT(1)`).
    Bool,
    /// Short text (`VARCHAR(255)`).
    String,
    /// Long text (`TEXT`).
    Text,
    /// Any value, stored as JSON text (`LONGTEXT`).
    Json,
}

impl ColumnType {
    /// The SQL type written in `CREATE TABLE`.
    pub fn sql(self) -> &'static str {
        match self {
            ColumnType::Int => "BIGINT NULL",
            ColumnType::Float => "DOUBLE NULL",
            ColumnType::Bool => "TINYINT(1) NULL",
            ColumnType::String => "VARCHAR(255) NULL",
            ColumnType::Text => "TEXT NULL",
            ColumnType::Json => "LONGTEXT NULL",
        }
    }
}

/// Alarm severity, lowest first (so `Ord` says which is worse).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// Worth a record, nobody is woken.
    Info,
    /// Look at it during working hours.
    Minor,
    /// Look at it soon.
    Major,
    /// Wake someone up.
    Critical,
}

impl Severity {
    /// Parses `info|minor|major|critical`.
    pub fn parse(s: &str) -> Option<Severity> {
        match s {
            "info" => Some(Severity::Info),
            "minor" => Some(Severity::Minor),
            "major" => Some(Severity::Major),
            "critical" => Some(Severity::Critical),
            _ => None,
        }
    }

    /// The lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Info => "info",
            Severity::Minor => "minor",
            Severity::Major => "major",
            Severity::Critical => "critical",
        }
    }
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `[notify]`: HTTP notifiers and the routes from severities to them.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NotifyConfig {
    /// Offset of local time from UTC in minutes, used to read `quiet_hours`.
    pub utc_offset_min: i32,
    /// The notifiers (`[[notify.notifier]]`); the channel `log` always exists.
    pub notifier: Vec<NotifierConfig>,
    /// The routes (`[[notify.route]]`): which severities go through which chain.
    pub route: Vec<RouteConfig>,
    /// Where the web console is reached from outside (`https://relay.example.com`),
    /// for the `{{link}}` of notifications; empty: no link.
    pub console_url: String,
    /// `[notify.storm]`: alarms of one kind raised together become one incident.
    pub storm: StormConfig,
}

/// `[notify.storm]`: correlation of alarms of one kind (the part of the key after
/// its last `/`) raised within a window into one incident, `incident/<kind>`, that
/// notifies with a digest instead of one notification per alarm.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StormConfig {
    /// Correlate at all (off: every alarm notifies on its own).
    pub enabled: bool,
    /// Alarms of one kind raised within `window_s` that open an incident.
    pub threshold: u32,
    /// Seconds over which `threshold` alarms of one kind count as a storm.
    pub window_s: f64,
    /// Seconds an alarm's own notifications wait, so that an incident opened
    /// meanwhile takes them over (0: at once).
    pub hold_s: f64,
    /// Seconds between an incident's opening and its first notification, so the
    /// digest reports the storm once it has settled.
    pub digest_s: f64,
    /// Addresses named in a digest (the first ones raised); the rest are counted.
    pub digest_addrs: usize,
    /// Most alarm kinds watched for storms at once.
    pub max_kinds: usize,
}

impl Default for StormConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            threshold: 5,
            window_s: 60.0,
            hold_s: 0.0,
            digest_s: 10.0,
            digest_addrs: 10,
            max_kinds: 1_000,
        }
    }
}

impl StormConfig {
    /// The problems as `(key, reason)` pairs.
    pub fn check(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        let mut bad = |k: &str, r: &str| out.push((format!("notify.storm.{k}"), r.to_string()));
        if !(2..=1_000_000).contains(&self.threshold) {
            bad("threshold", "must be between 2 and 1000000");
        }
        let secs = |v: f64, lo: f64| v.is_finite() && v >= lo && v <= 86_400.0;
        if !secs(self.window_s, 0.001) {
            bad("window_s", "must be above 0 and at most 86400 seconds");
        }
        if !secs(self.hold_s, 0.0) {
            bad("hold_s", "must be between 0 and 86400 seconds");
        }
        if !secs(self.digest_s, 0.0) {
            bad("digest_s", "must be between 0 and 86400 seconds");
        }
        if self.digest_addrs > 100 {
            bad("digest_addrs", "must be at most 100");
        }
        if !(1..=100_000).contains(&self.max_kinds) {
            bad("max_kinds", "must be between 1 and 100000");
        }
        out
    }
}

/// `[[notify.notifier]]`: one HTTP request template (voice/SMS provider, webhook).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NotifierConfig {
    /// Channel name used by routes and `notify(channel, ...)`.
    pub name: String,
    /// `http://` or `https://` URL; `{{field}}` placeholders are filled.
    pub url: String,
    /// HTTP method: GET, POST, PUT or PATCH.
    pub method: String,
    /// Request headers; values may hold `{{field}}` and `{{env.NAME}}` placeholders.
    pub headers: BTreeMap<String, String>,
    /// Body template; `{{field}}` inserts raw text, `{{field|json}}` a JSON string,
    /// `{{field|url}}` a percent-encoded value.
    pub body: String,
    /// Longest wait (ms) for one request.
    pub timeout_ms: u64,
    /// Further attempts after a failed one.
    pub retries: u32,
    /// Pause (ms) before the first retry; doubled after each failure.
    pub backoff_ms: u64,
    /// Longest pause (ms) between two retries.
    pub backoff_max_ms: u64,
    /// Most requests per minute to one target; more are refused and recorded.
    pub rate_per_min: u32,
}

impl Default for NotifierConfig {
    fn default() -> Self {
        Self {
            name: String::new(),
            url: String::new(),
            method: "POST".into(),
            headers: BTreeMap::new(),
            body: String::new(),
            timeout_ms: 5_000,
            retries: 3,
            backoff_ms: 1_000,
            backoff_max_ms: 60_000,
            rate_per_min: 6,
        }
    }
}

/// `[[notify.route]]`: what happens when an alarm of these severities is raised.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RouteConfig {
    /// Name shown in logs and attempt records.
    pub name: String,
    /// Severities this route takes (empty: all).
    pub severities: Vec<Severity>,
    /// Only alarms whose key starts with this (empty: all).
    pub key_prefix: String,
    /// Escalation chain: each step fires `after_s` after the alarm was raised unless
    /// it was acknowledged or cleared first.
    pub chain: Vec<StepConfig>,
    /// `"HH:MM-HH:MM"` local time during which steps wait until the quiet period ends.
    pub quiet_hours: Option<String>,
    /// Tell the channels already reached when the alarm clears.
    pub notify_clear: bool,
}

impl Default for RouteConfig {
    fn default() -> Self {
        Self {
            name: String::new(),
            severities: Vec::new(),
            key_prefix: String::new(),
            chain: Vec::new(),
            quiet_hours: None,
            notify_clear: true,
        }
    }
}

/// One step of an escalation chain.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StepConfig {
    /// Notifier name (or `log`).
    pub channel: String,
    /// Who is called: phone number, URL path part, user id; inserted as `{{target}}`.
    #[serde(default)]
    pub target: String,
    /// Seconds after the alarm was raised (fractions allowed).
    #[serde(default)]
    pub after_s: f64,
}

/// A quiet period in minutes since local midnight, `from` inclusive, `to` exclusive;
/// it wraps over midnight when `from > to`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuietHours {
    /// First quiet minute of the day.
    pub from_min: u32,
    /// First minute that is no longer quiet.
    pub to_min: u32,
}

impl QuietHours {
    /// Parses `"22:00-07:00"`.
    pub fn parse(s: &str) -> Result<QuietHours, String> {
        let (a, b) = s
            .split_once('-')
            .ok_or_else(|| format!("`{s}` is not HH:MM-HH:MM"))?;
        let hm = |t: &str| -> Result<u32, String> {
            let (h, m) = t
                .trim()
                .split_once(':')
                .ok_or_else(|| format!("`{t}` is not HH:MM"))?;
            let h: u32 = h.parse().map_err(|_| format!("bad hour in `{t}`"))?;
            let m: u32 = m.parse().map_err(|_| format!("bad minute in `{t}`"))?;
            if h > 23 || m > 59 {
                return Err(format!("`{t}` is not a time of day"));
            }
            Ok(h * 60 + m)
        };
        let q = QuietHours {
            from_min: hm(a)?,
            to_min: hm(b)?,
        };
        if q.from_min == q.to_min {
            return Err(format!("`{s}` is an empty period"));
        }
        Ok(q)
    }

    /// Whether `minute` (since local midnight) is quiet.
    pub fn contains(&self, minute: u32) -> bool {
        if self.from_min < self.to_min {
            minute >= self.from_min && minute < self.to_min
        } else {
            minute >= self.from_min || minute < self.to_min
        }
    }
}

/// Whether `s` is a safe SQL identifier (letters, digits, `_`, not starting with a digit).
pub fn is_identifier(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        && !s.as_bytes()[0].is_ascii_digit()
}

/// Appends one problem; the only place that builds `crate::Problem`.
impl PluginsConfig {
    /// The problems as `(key, reason)` pairs.
    pub fn check(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        let mut bad = |k: &str, r: &str| out.push((format!("plugins.{k}"), r.to_string()));
        if self.enabled && self.dir.trim().is_empty() {
            bad("dir", "must name the rules folder");
        }
        if !(1..=256).contains(&self.workers) {
            bad("workers", "must be between 1 and 256");
        }
        if !(1..=10_000_000).contains(&self.queue) {
            bad("queue", "must be between 1 and 10000000");
        }
        if !self.tick_s.is_finite() || self.tick_s < 0.0 || self.tick_s > 86_400.0 {
            bad("tick_s", "must be between 0 (off) and 86400 seconds");
        }
        if self.tick_s > 0.0 && self.tick_s < 0.01 {
            bad("tick_s", "must be at least 0.01 seconds (or 0 for off)");
        }
        if self.max_operations == 0 {
            bad("max_operations", "must be above 0 (a limit is required)");
        }
        if self.max_hook_ms == 0 || self.max_hook_ms > 60_000 {
            bad(
                "max_hook_ms",
                "must be between 1 and 60000 (a limit is required)",
            );
        }
        if self.max_call_levels == 0 || self.max_call_levels > 1_000 {
            bad("max_call_levels", "must be between 1 and 1000");
        }
        if self.max_expr_depth < 8 || self.max_expr_depth > 10_000 {
            bad("max_expr_depth", "must be between 8 and 10000");
        }
        if self.max_string_size == 0 {
            bad("max_string_size", "must be above 0 (a limit is required)");
        }
        if self.max_array_size == 0 {
            bad("max_array_size", "must be above 0 (a limit is required)");
        }
        if self.max_map_size == 0 {
            bad("max_map_size", "must be above 0 (a limit is required)");
        }
        if self.reload_poll_ms < 10 {
            bad("reload_poll_ms", "must be at least 10 ms");
        }
        if !(1..=60_000).contains(&self.timer_ms) {
            bad("timer_ms", "must be between 1 and 60000 ms");
        }
        if self.max_alarms == 0 {
            bad("max_alarms", "must be above 0");
        }
        if self.max_state_addrs == 0 {
            bad("max_state_addrs", "must be above 0");
        }
        if self.actions_queue == 0 {
            bad("actions_queue", "must be above 0");
        }
        if self.sink_queue == 0 {
            bad("sink_queue", "must be above 0");
        }
        if self.spool_dir.trim().is_empty() {
            bad("spool_dir", "must name a folder");
        }
        if self.spool_max_bytes < 4096 {
            bad("spool_max_bytes", "must be at least 4096");
        }
        if !(1..=10_000_000).contains(&self.registry_max_devices) {
            bad("registry_max_devices", "must be between 1 and 10000000");
        }
        if self.registry_retention_days > 36_500 {
            bad(
                "registry_retention_days",
                "must be between 0 (no limit) and 36500 days",
            );
        }
        if !(10..=600_000).contains(&self.registry_flush_ms) {
            bad("registry_flush_ms", "must be between 10 and 600000 ms");
        }
        out
    }
}

fn check_url(out: &mut Vec<(String, String)>, key: String, url: &str, schemes: &[&str]) {
    match url.split_once("://") {
        Some((scheme, rest)) if schemes.contains(&scheme) && !rest.is_empty() => {}
        _ => out.push((
            key,
            format!("must be a URL starting with {}://", schemes.join(":// or ")),
        )),
    }
}

impl RedisConfig {
    /// The problems as `(key, reason)` pairs.
    pub fn check(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        if self.enabled {
            check_url(
                &mut out,
                "redis.url".into(),
                &self.url,
                &["redis", "rediss", "redis+unix"],
            );
        }
        if self.key_prefix.len() > 128 || self.key_prefix.contains(char::is_whitespace) {
            out.push((
                "redis.key_prefix".into(),
                "must be at most 128 characters, no spaces".into(),
            ));
        }
        for (k, v) in [
            ("connect_timeout_ms", self.connect_timeout_ms),
            ("op_timeout_ms", self.op_timeout_ms),
            ("retry_ms", self.retry_ms),
        ] {
            if v == 0 || v > 600_000 {
                out.push((
                    format!("redis.{k}"),
                    "must be between 1 and 600000 ms".into(),
                ));
            }
        }
        out
    }
}

impl MysqlConfig {
    /// The problems as `(key, reason)` pairs.
    pub fn check(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        if self.enabled {
            check_url(&mut out, "mysql.url".into(), &self.url, &["mysql"]);
        }
        for (k, v) in [
            ("connect_timeout_ms", self.connect_timeout_ms),
            ("op_timeout_ms", self.op_timeout_ms),
            ("retry_ms", self.retry_ms),
        ] {
            if v == 0 || v > 600_000 {
                out.push((
                    format!("mysql.{k}"),
                    "must be between 1 and 600000 ms".into(),
                ));
            }
        }
        for (k, v) in [
            ("alarm_table", &self.alarm_table),
            ("notify_table", &self.notify_table),
        ] {
            if !is_identifier(v) {
                out.push((
                    format!("mysql.{k}"),
                    "must be letters, digits and _ (at most 64)".into(),
                ));
            }
        }
        let mut names = Vec::new();
        for (i, t) in self.tables.iter().enumerate() {
            let key = format!("mysql.tables[{i}]");
            if !is_identifier(&t.name) {
                out.push((
                    format!("{key}.name"),
                    format!("`{}` must be letters, digits and _ (at most 64)", t.name),
                ));
            } else if names.contains(&t.name.to_ascii_lowercase())
                || t.name.eq_ignore_ascii_case(&self.alarm_table)
                || t.name.eq_ignore_ascii_case(&self.notify_table)
            {
                out.push((
                    format!("{key}.name"),
                    format!("table `{}` is declared twice", t.name),
                ));
            }
            names.push(t.name.to_ascii_lowercase());
            if t.columns.is_empty() {
                out.push((
                    format!("{key}.columns"),
                    "must list at least one column".into(),
                ));
            }
            let mut cols: Vec<String> = Vec::new();
            for (j, c) in t.columns.iter().enumerate() {
                let ck = format!("{key}.columns[{j}].name");
                let lower = c.name.to_ascii_lowercase();
                if !is_identifier(&c.name) {
                    out.push((
                        ck,
                        format!("`{}` must be letters, digits and _ (at most 64)", c.name),
                    ));
                } else if lower == "id" || lower == "relay_seq" {
                    out.push((
                        ck,
                        format!("`{}` is kept for the relay's own column", c.name),
                    ));
                } else if cols.contains(&lower) {
                    out.push((ck, format!("column `{}` is declared twice", c.name)));
                }
                cols.push(lower);
            }
        }
        out
    }

    /// The declared table named `name`, if any.
    pub fn table(&self, name: &str) -> Option<&TableConfig> {
        self.tables.iter().find(|t| t.name == name)
    }
}

impl NotifyConfig {
    /// The problems as `(key, reason)` pairs.
    pub fn check(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        if !(-14 * 60..=14 * 60).contains(&self.utc_offset_min) {
            out.push((
                "notify.utc_offset_min".into(),
                "must be between -840 and 840".into(),
            ));
        }
        if !self.console_url.is_empty() {
            check_url(
                &mut out,
                "notify.console_url".into(),
                &self.console_url,
                &["http", "https"],
            );
        }
        out.extend(self.storm.check());
        let mut names: Vec<&str> = Vec::new();
        for (i, n) in self.notifier.iter().enumerate() {
            let key = format!("notify.notifier[{i}]");
            if n.name.is_empty()
                || !n
                    .name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
            {
                out.push((
                    format!("{key}.name"),
                    "must be letters, digits, `-` or `_`".into(),
                ));
            } else if n.name == "log" || names.contains(&n.name.as_str()) {
                out.push((
                    format!("{key}.name"),
                    format!("`{}` is already a channel", n.name),
                ));
            }
            names.push(&n.name);
            check_url(&mut out, format!("{key}.url"), &n.url, &["http", "https"]);
            if !["GET", "POST", "PUT", "PATCH"].contains(&n.method.as_str()) {
                out.push((
                    format!("{key}.method"),
                    "must be GET, POST, PUT or PATCH".into(),
                ));
            }
            for h in n.headers.keys() {
                if h.is_empty()
                    || !h
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                {
                    out.push((
                        format!("{key}.headers"),
                        format!("`{h}` is not a header name"),
                    ));
                }
            }
            if n.timeout_ms == 0 || n.timeout_ms > 600_000 {
                out.push((
                    format!("{key}.timeout_ms"),
                    "must be between 1 and 600000".into(),
                ));
            }
            if n.retries > 100 {
                out.push((format!("{key}.retries"), "must be at most 100".into()));
            }
            if n.backoff_ms == 0 || n.backoff_max_ms < n.backoff_ms {
                out.push((
                    format!("{key}.backoff_ms"),
                    "must be above 0 and at most backoff_max_ms".into(),
                ));
            }
            if n.rate_per_min == 0 {
                out.push((format!("{key}.rate_per_min"), "must be above 0".into()));
            }
        }
        for (i, r) in self.route.iter().enumerate() {
            let key = format!("notify.route[{i}]");
            if r.chain.is_empty() {
                out.push((format!("{key}.chain"), "must have at least one step".into()));
            }
            for (j, s) in r.chain.iter().enumerate() {
                if s.channel != "log" && !names.contains(&s.channel.as_str()) {
                    out.push((
                        format!("{key}.chain[{j}].channel"),
                        format!("no notifier named `{}`", s.channel),
                    ));
                }
                if !s.after_s.is_finite() || s.after_s < 0.0 || s.after_s > 30.0 * 86_400.0 {
                    out.push((
                        format!("{key}.chain[{j}].after_s"),
                        "must be between 0 and 2592000".into(),
                    ));
                }
            }
            if let Some(q) = &r.quiet_hours
                && let Err(e) = QuietHours::parse(q)
            {
                out.push((format!("{key}.quiet_hours"), e));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        assert!(PluginsConfig::default().check().is_empty());
        assert!(RedisConfig::default().check().is_empty());
        assert!(MysqlConfig::default().check().is_empty());
        assert!(NotifyConfig::default().check().is_empty());
    }

    #[test]
    fn every_problem_is_reported() {
        let p = PluginsConfig {
            workers: 0,
            queue: 0,
            max_operations: 0,
            ..Default::default()
        };
        let keys: Vec<String> = p.check().into_iter().map(|(k, _)| k).collect();
        assert_eq!(
            keys,
            ["plugins.workers", "plugins.queue", "plugins.max_operations"]
        );
    }

    #[test]
    fn tables_refuse_unsafe_names() {
        let m: MysqlConfig = toml::from_str(
            r#"
            enabled = true
            url = "mysql://root@127.0.0.1/test"
            [[tables]]
            name = "ok_table"
            columns = [{ name = "a", type = "int" }, { name = "b; drop", type = "text" }]
            [[tables]]
            name = "1bad"
            columns = [{ name = "id", type = "int" }]
            "#,
        )
        .unwrap();
        let keys: Vec<String> = m.check().into_iter().map(|(k, _)| k).collect();
        assert_eq!(
            keys,
            [
                "mysql.tables[0].columns[1].name",
                "mysql.tables[1].name",
                "mysql.tables[1].columns[0].name"
            ]
        );
        let bad: Result<MysqlConfig, _> =
            toml::from_str("[[tables]]\nname='t'\ncolumns=[{name='a', type='blob'}]");
        assert!(bad.is_err(), "types come from a fixed list");
    }

    #[test]
    fn storm_settings_are_checked() {
        let n: NotifyConfig = toml::from_str(
            r#"
            console_url = "relay.example.com"
            [storm]
            threshold = 1
            window_s = 0
            hold_s = -1
            digest_s = 1e9
            digest_addrs = 1000
            max_kinds = 0
            "#,
        )
        .unwrap();
        let keys: Vec<String> = n.check().into_iter().map(|(k, _)| k).collect();
        assert_eq!(
            keys,
            [
                "notify.console_url",
                "notify.storm.threshold",
                "notify.storm.window_s",
                "notify.storm.hold_s",
                "notify.storm.digest_s",
                "notify.storm.digest_addrs",
                "notify.storm.max_kinds"
            ]
        );
        let bad: Result<NotifyConfig, _> = toml::from_str(
            "[storm]
threshhold = 3",
        );
        assert!(bad.is_err(), "unknown keys are refused");
        let d = StormConfig::default();
        assert!(d.enabled && d.threshold >= 2 && d.window_s > 0.0);
    }

    #[test]
    fn routes_must_name_notifiers() {
        let n: NotifyConfig = toml::from_str(
            r#"
            [[notifier]]
            name = "sms"
            url = "https://sms.example/send"
            [[route]]
            severities = ["critical"]
            chain = [{ channel = "sms", target = "+100" }, { channel = "phone", after_s = 60 }]
            quiet_hours = "25:00-07:00"
            "#,
        )
        .unwrap();
        let keys: Vec<String> = n.check().into_iter().map(|(k, _)| k).collect();
        assert_eq!(
            keys,
            [
                "notify.route[0].chain[1].channel",
                "notify.route[0].quiet_hours"
            ]
        );
    }

    #[test]
    fn quiet_hours_wrap_midnight() {
        let q = QuietHours::parse("22:00-07:00").unwrap();
        assert!(q.contains(23 * 60));
        assert!(q.contains(0));
        assert!(!q.contains(7 * 60));
        assert!(!q.contains(12 * 60));
        let d = QuietHours::parse("12:00-13:30").unwrap();
        assert!(d.contains(12 * 60 + 59) && !d.contains(13 * 60 + 30));
        assert!(QuietHours::parse("7-8").is_err());
    }

    #[test]
    fn unknown_keys_are_refused() {
        assert!(toml::from_str::<PluginsConfig>("wrokers = 3").is_err());
        assert!(toml::from_str::<RedisConfig>("enabled = true\nurl='redis://x'").is_ok());
    }
}
