//! `relay rules check [DIR]` and `relay rules test SCRIPT --events FILE.jsonl`.
//!
//! `check` compiles every script of a folder and reports each error with file, line
//! and column. `test` replays recorded events against one script on a simulated
//! clock, with the sinks and notifiers faked, and prints every action the script
//! would take with the time it would happen: sends, publishes, state and counter
//! writes, rows, alarm transitions, notifications and escalation steps.
//!
//! # Events file
//! One JSON object per line; blank lines and lines starting with `#` are skipped.
//! `at_ms` is milliseconds since the start of the replay (non-decreasing). The
//! replay clock starts at `start_ms` (ms since the Unix epoch) if a line
//! `{"start_ms": N}` comes first, else at 0 (midnight UTC, which matters only for
//! quiet hours).
//! ```text
//! {"at_ms":0,"event":"connect","addr":"ctl-1","role":"controller","meta":{"fw":"1.2"}}
//! {"at_ms":1000,"event":"message","src":"ctl-1","payload":{"temp":85}}
//! {"at_ms":1500,"event":"message","src":"ctl-1","payload_text":"raw bytes"}
//! {"at_ms":2000,"event":"message","src":"web-1","group":"room-1","payload":"hi"}
//! {"at_ms":70000,"event":"ack","key":"ctl-1/overheat","by":"alice"}
//! {"at_ms":90000,"event":"disconnect","addr":"ctl-1","reason":"idle_timeout"}
//! {"at_ms":95000,"event":"tick"}
//! ```
//! `message` takes `src`, optional `dst`, `group`, and one of `payload` (any JSON),
//! `payload_text` (raw text) or `payload_b64` (raw bytes). `connect`/`disconnect`
//! take `addr`, optional `role`, `meta`, `remote`, `shard`, and `reason`.
//! After the last event the clock runs on (at most `drain_s`, default one hour) until
//! no alarm timer or escalation step is left.
use std::io::{BufRead, Write};
use std::path::Path;
use std::sync::Arc;

use base64::Engine as _;
use bytes::Bytes;
use serde::Deserialize;
use serde_json::Value;

use crate::effect::Effect;
use crate::event::{Action, ClientInfo, Event, MessageEvent};
use crate::host_config::HostConfig;
use crate::rules::{Outcome, Rules};
use crate::script::{self, ScriptError, Source};
use crate::shared::Shared;

/// Why `rules test` could not run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CliError {
    /// A file could not be read or the report written.
    #[error("{0}: {1}")]
    Io(String, #[source] std::io::Error),
    /// The script does not compile.
    #[error("{0}")]
    Compile(ScriptError),
    /// A line of the events file is wrong.
    #[error("{file}:{line}: {reason}")]
    Events {
        file: String,
        line: usize,
        reason: String,
    },
    /// The plugin configuration is invalid.
    #[error("invalid configuration:\n{}", .0.join("\n"))]
    Config(Vec<String>),
}

/// What a replay did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TestSummary {
    /// Events replayed.
    pub events: usize,
    /// Lines printed for actions (everything but errors).
    pub actions: usize,
    /// Script errors (limit trips included).
    pub errors: usize,
}

/// Compiles every `*.rhai` in `dir` with the default limits. `Ok` holds the report
/// when all compile, `Err` the report with the errors.
pub fn check_dir(dir: &Path) -> Result<String, String> {
    check_dir_with(dir, &HostConfig::default())
}

/// Like `check_dir`, with the limits of `cfg`.
pub fn check_dir_with(dir: &Path, cfg: &HostConfig) -> Result<String, String> {
    // The engine of a live worker, so calls are checked against the relay functions.
    let shared = crate::shared::Shared::new(&cfg.plugins, &cfg.mysql, &cfg.notify);
    let rules = crate::rules::Rules::new(&cfg.plugins, shared);
    let engine = rules.engine();
    let known = crate::lint::known_functions(engine);
    let files = script::list_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut report = String::new();
    let mut bad = 0;
    for (path, _, _) in &files {
        let name = script::display_name(path);
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) => {
                bad += 1;
                report.push_str(&format!("error {name}: {e}\n"));
                continue;
            }
        };
        match script::compile(engine, &name, &text) {
            Ok(ast) => {
                let problems = crate::lint::lint(&known, &cfg.plugins, &name, &text, &ast);
                if !problems.is_empty() {
                    bad += 1;
                    for p in problems {
                        report.push_str(&format!("error {p}\n"));
                    }
                    continue;
                }
                let hooks: Vec<&str> = ast
                    .iter_functions()
                    .filter(|f| {
                        script::HOOKS
                            .iter()
                            .any(|(h, n)| *h == f.name && *n == f.params.len())
                    })
                    .map(|f| f.name)
                    .collect();
                let hooks = if hooks.is_empty() {
                    "no hooks".to_string()
                } else {
                    hooks.join(", ")
                };
                report.push_str(&format!("ok    {name} ({hooks})\n"));
            }
            Err(e) => {
                bad += 1;
                report.push_str(&format!("error {e}\n"));
            }
        }
    }
    report.push_str(&format!(
        "{} file(s) in {}, {} with errors\n",
        files.len(),
        dir.display(),
        bad
    ));
    if bad == 0 { Ok(report) } else { Err(report) }
}

#[derive(Debug, Deserialize)]
#[serde(tag = "event", rename_all = "lowercase")]
enum LineKind {
    Connect(ClientLine),
    Disconnect(ClientLine),
    Message(MessageLine),
    Ack { key: String, by: String },
    Tick,
}

#[derive(Debug, Deserialize)]
struct Line {
    at_ms: u64,
    #[serde(flatten)]
    kind: LineKind,
}

#[derive(Debug, Deserialize)]
struct ClientLine {
    addr: String,
    #[serde(default)]
    role: String,
    #[serde(default)]
    meta: Value,
    #[serde(default)]
    remote: Option<String>,
    #[serde(default)]
    shard: usize,
    #[serde(default)]
    reason: Option<String>,
}

#[derive(Debug, Deserialize)]
struct MessageLine {
    src: String,
    #[serde(default)]
    dst: String,
    #[serde(default)]
    group: Option<String>,
    #[serde(default)]
    payload: Option<Value>,
    #[serde(default)]
    payload_text: Option<String>,
    #[serde(default)]
    payload_b64: Option<String>,
}

#[derive(Debug, Deserialize)]
struct StartLine {
    start_ms: u64,
}

/// Replays `events_jsonl` against `script` with the default configuration (no
/// notifiers; `persist` accepts any table) and writes what it would do to `out`.
pub fn test_script(
    script: &Path,
    events_jsonl: &Path,
    out: &mut impl Write,
) -> Result<TestSummary, CliError> {
    test_script_with(&HostConfig::default(), script, events_jsonl, out)
}

/// Like `test_script`, with the relay's plugin configuration: limits, declared
/// tables (checked when any are declared or MySQL is on) and notify routes.
pub fn test_script_with(
    cfg: &HostConfig,
    script_path: &Path,
    events_jsonl: &Path,
    out: &mut impl Write,
) -> Result<TestSummary, CliError> {
    let problems = cfg.problems();
    if !problems.is_empty() {
        return Err(CliError::Config(problems));
    }
    let io = |p: &Path| {
        let p = p.display().to_string();
        move |e| CliError::Io(p.clone(), e)
    };
    let text = std::fs::read_to_string(script_path).map_err(io(script_path))?;
    let name = script::display_name(script_path);

    let mut shared = Shared::new(&cfg.plugins, &cfg.mysql, &cfg.notify);
    if let Some(s) = Arc::get_mut(&mut shared) {
        s.strict_tables = cfg.mysql.enabled || !cfg.mysql.tables.is_empty();
        // Rows are printed, not written: count none as skipped.
        s.mysql_enabled = true;
    }
    let mut rules = Rules::new(&cfg.plugins, shared.clone());
    let source = Source {
        name: name.clone(),
        path: script_path.to_path_buf(),
        text,
    };
    if let Some(e) = rules.load(&[source]).pop() {
        return Err(CliError::Compile(e));
    }
    let events = read_events(events_jsonl)?;
    let mut sim = Sim {
        rules,
        shared,
        out,
        summary: TestSummary::default(),
        start: events.0,
        now: events.0,
    };
    let events = events.1;
    let w = |e| CliError::Io("output".into(), e);
    writeln!(
        sim.out,
        "replaying {} event(s) against {name}",
        events.len()
    )
    .map_err(w)?;
    let tick_ms = if cfg.plugins.tick_s > 0.0 && sim.rules.has_tick() {
        Some(((cfg.plugins.tick_s * 1000.0).round() as u64).max(1))
    } else {
        None
    };
    let mut next_tick = tick_ms;
    let last = events.last().map_or(0, |(at, _)| *at);
    for (at, kind) in events {
        // Timers, escalation steps and ticks due before this event come first.
        sim.run_until(at, &mut next_tick, tick_ms).map_err(w)?;
        sim.event(at, kind).map_err(w)?;
    }
    sim.run_until(last, &mut next_tick, tick_ms).map_err(w)?;
    let drain_until = last + 3_600_000;
    sim.run_until(drain_until, &mut None, None).map_err(w)?;
    let s = sim.summary.clone();
    writeln!(
        sim.out,
        "{} event(s), {} action(s), {} error(s)",
        s.events, s.actions, s.errors
    )
    .map_err(w)?;
    Ok(s)
}

fn read_events(path: &Path) -> Result<(u64, Vec<(u64, LineKind)>), CliError> {
    let file = path.display().to_string();
    let f = std::fs::File::open(path).map_err(|e| CliError::Io(file.clone(), e))?;
    let mut start = 0;
    let mut out = Vec::new();
    let mut last_at = 0;
    for (i, line) in std::io::BufReader::new(f).lines().enumerate() {
        let n = i + 1;
        let line = line.map_err(|e| CliError::Io(file.clone(), e))?;
        let t = line.trim();
        if t.is_empty() || t.starts_with('#') {
            continue;
        }
        let err = |reason: String| CliError::Events {
            file: file.clone(),
            line: n,
            reason,
        };
        if out.is_empty()
            && let Ok(s) = serde_json::from_str::<StartLine>(t)
            && !t.contains("\"event\"")
        {
            start = s.start_ms;
            continue;
        }
        let l: Line = serde_json::from_str(t).map_err(|e| err(e.to_string()))?;
        if l.at_ms < last_at {
            return Err(err(format!(
                "at_ms {} goes back in time (previous {last_at})",
                l.at_ms
            )));
        }
        last_at = l.at_ms;
        out.push((l.at_ms, l.kind));
    }
    Ok((start, out))
}

/// The replay: rules on a simulated clock, printing instead of doing.
struct Sim<'a, W: Write> {
    rules: Rules,
    shared: Arc<Shared>,
    out: &'a mut W,
    summary: TestSummary,
    /// Clock value at `at_ms` 0.
    start: u64,
    /// The simulated clock.
    now: u64,
}

fn client(c: ClientLine, at: u64) -> (ClientInfo, String) {
    let info = ClientInfo {
        addr: c.addr,
        role: c.role,
        meta: c.meta,
        remote: c.remote.unwrap_or_else(|| "127.0.0.1:0".into()),
        shard: c.shard,
        time_ms: at,
        groups: Vec::new(),
    };
    (info, c.reason.unwrap_or_else(|| "bye".into()))
}

fn show_payload(payload: &Bytes, json: bool) -> String {
    if json {
        String::from_utf8_lossy(payload).into_owned()
    } else {
        match std::str::from_utf8(payload) {
            Ok(s) => format!("{:?}", s),
            Err(_) => format!("<{} bytes>", payload.len()),
        }
    }
}

impl<W: Write> Sim<'_, W> {
    fn stamp(&self, now: u64) -> String {
        let rel = now.saturating_sub(self.start);
        format!("[+{}.{:03}s]", rel / 1000, rel % 1000)
    }

    fn line(&mut self, now: u64, text: String) -> std::io::Result<()> {
        let s = self.stamp(now);
        writeln!(self.out, "{s} {text}")
    }

    /// Runs the alarm clock and ticks up to `at_ms` (relative).
    fn run_until(
        &mut self,
        at_ms: u64,
        next_tick: &mut Option<u64>,
        tick_ms: Option<u64>,
    ) -> std::io::Result<()> {
        let until = self.start + at_ms;
        for _ in 0..10_000_000 {
            let due = self.shared.book().next_due(self.now);
            let tick_at = next_tick.map(|t| self.start + t).filter(|t| *t <= until);
            let alarm_at = due.filter(|d| *d <= until);
            let next = match (alarm_at, tick_at) {
                (Some(a), Some(t)) => a.min(t),
                (Some(a), None) => a,
                (None, Some(t)) => t,
                (None, None) => break,
            };
            self.now = next;
            if alarm_at == Some(next) {
                self.shared.book().poll(next);
                self.flush_book(next)?;
            }
            if tick_at == Some(next) {
                let out = self.rules.tick(next);
                self.outcome(next, out)?;
                *next_tick = next_tick.zip(tick_ms).map(|(t, p)| t + p);
            }
        }
        Ok(())
    }

    fn event(&mut self, at: u64, kind: LineKind) -> std::io::Result<()> {
        let now = self.start + at;
        self.now = now;
        let ev = match kind {
            LineKind::Connect(c) => Event::Connect(client(c, now).0),
            LineKind::Disconnect(c) => {
                let (info, reason) = client(c, now);
                Event::Disconnect(info, reason)
            }
            LineKind::Message(m) => {
                let (payload, json) = if let Some(p) = m.payload {
                    (Bytes::from(p.to_string()), true)
                } else if let Some(t) = m.payload_text {
                    (Bytes::from(t), false)
                } else if let Some(b) = m.payload_b64 {
                    match base64::engine::general_purpose::STANDARD.decode(b) {
                        Ok(b) => (Bytes::from(b), false),
                        Err(e) => {
                            return self
                                .line(now, format!("error: bad payload_b64 ({e}); event skipped"));
                        }
                    }
                } else {
                    (Bytes::new(), false)
                };
                Event::Message(MessageEvent {
                    src: m.src,
                    dst: m.dst,
                    group: m.group,
                    payload,
                    json,
                    time_ms: now,
                })
            }
            LineKind::Ack { key, by } => {
                self.summary.events += 1;
                let r = self.shared.book().ack(now, &key, &by);
                if let Err(e) = r {
                    self.line(now, format!("ack {key} by {by}: {e}"))?;
                }
                return self.flush_book(now);
            }
            LineKind::Tick => {
                self.summary.events += 1;
                let out = self.rules.tick(now);
                return self.outcome(now, out);
            }
        };
        self.summary.events += 1;
        let out = self.rules.handle(now, &ev);
        self.outcome(now, out)
    }

    fn outcome(&mut self, now: u64, out: Outcome) -> std::io::Result<()> {
        for e in out.effects {
            self.effect(now, e)?;
        }
        for e in out.errors {
            self.summary.errors += 1;
            self.line(now, format!("error {e}"))?;
        }
        self.flush_book(now)
    }

    fn flush_book(&mut self, now: u64) -> std::io::Result<()> {
        let fx = self.shared.book().take_effects();
        for e in fx {
            self.effect(now, e)?;
        }
        Ok(())
    }

    fn effect(&mut self, now: u64, e: Effect) -> std::io::Result<()> {
        let text = match e {
            Effect::Action(Action::Send { dst, payload, json }) => {
                format!("send {dst} {}", show_payload(&payload, json))
            }
            Effect::Action(Action::Publish {
                group,
                payload,
                json,
            }) => {
                format!("publish {group} {}", show_payload(&payload, json))
            }
            Effect::StateSet { addr, field, value } => {
                format!("state_set {addr} {field} = {value}")
            }
            Effect::CounterAdd { key, n, total } => format!("counter_add {key} {n:+} (= {total})"),
            Effect::Persist { table, row } => {
                let declared = self.shared.tables.contains_key(&table);
                let note = if declared {
                    ""
                } else {
                    " (table not declared in config)"
                };
                format!("persist {table} {}{note}", Value::Object(row))
            }
            Effect::Alarm(a) => {
                let by = a.by.map(|b| format!(" by {b}")).unwrap_or_default();
                format!(
                    "alarm {} {} {}{by}: {}",
                    a.transition.as_str(),
                    a.key,
                    a.severity,
                    a.text
                )
            }
            Effect::Notify(j) => {
                let route = if j.route.is_empty() {
                    String::new()
                } else {
                    format!(" [{}]", j.route)
                };
                format!(
                    "notify {} {}{route} {}: {}",
                    j.channel, j.target, j.event, j.text
                )
            }
            Effect::Log { file, text } => format!("log {file}: {text}"),
            Effect::Presence { .. } | Effect::AlarmStore { .. } | Effect::WatchStore { .. } => {
                return Ok(());
            }
        };
        self.summary.actions += 1;
        self.line(now, text)
    }
}
