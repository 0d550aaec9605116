//! One worker's compiled rules: an `Engine` and one `AST` per file, and the calls
//! of the hooks for each event. Live workers and `relay rules test` both use it.
use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;

use relay_config::plugins::PluginsConfig;
use rhai::{AST, CallFnOptions, Dynamic, Engine, Map as RhaiMap, Scope};

use crate::api::{self, CallCtx, Ctx};
use crate::effect::Effect;
use crate::event::{ClientInfo, Event, MessageEvent};
use crate::script::{self, ScriptError, Source};
use crate::shared::Shared;

/// A compiled file and the hooks it defines.
struct Compiled {
    /// File name.
    name: String,
    /// The text it was compiled from (to skip recompiling unchanged files).
    text: String,
    /// Compiled script.
    ast: AST,
    /// Which of `script::HOOKS` it defines.
    hooks: [bool; 4],
}

/// What one event (or tick) produced.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Effects, in the order the scripts asked for them.
    pub effects: Vec<Effect>,
    /// Hook calls that failed (already counted in the stats).
    pub errors: Vec<ScriptError>,
    /// A script touched the alarm book.
    pub touched_alarms: bool,
}

/// The rules of one worker thread.
pub struct Rules {
    /// Sandboxed engine with the relay functions.
    engine: Engine,
    /// Files in name order.
    scripts: Vec<Compiled>,
    /// The call context the functions write into.
    ctx: Ctx,
    /// Bounds each hook call's wall-clock time.
    timer: script::HookTimer,
    /// At most one WARN line of script errors a second per worker.
    warn_gate: WarnGate,
    started: std::time::Instant,
}

/// Lets one log line through per second, counting those left out.
#[derive(Debug, Default)]
struct WarnGate {
    /// When the last line went out (ms on the caller's clock).
    at: Option<u64>,
    left_out: u64,
}

impl WarnGate {
    /// `Some(n)`: write the line, `n` were left out since the last one.
    fn pass(&mut self, now_ms: u64) -> Option<u64> {
        if self.at.is_some_and(|a| now_ms < a.saturating_add(1000)) {
            self.left_out += 1;
            return None;
        }
        self.at = Some(now_ms);
        Some(std::mem::take(&mut self.left_out))
    }
}

impl std::fmt::Debug for Rules {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rules")
            .field(
                "scripts",
                &self.scripts.iter().map(|s| &s.name).collect::<Vec<_>>(),
            )
            .finish()
    }
}

fn client_map(c: &ClientInfo) -> RhaiMap {
    let mut m = RhaiMap::new();
    m.insert("addr".into(), c.addr.clone().into());
    m.insert("role".into(), c.role.clone().into());
    m.insert("meta".into(), api::from_json(&c.meta));
    m.insert("remote".into(), c.remote.clone().into());
    m.insert("shard".into(), (c.shard as i64).into());
    m.insert("time_ms".into(), (c.time_ms as i64).into());
    m
}

/// The payload as a script sees it: parsed JSON when it is JSON, otherwise a blob.
fn payload_value(m: &MessageEvent) -> Dynamic {
    let looks_json = m
        .payload
        .iter()
        .find(|b| !b.is_ascii_whitespace())
        .is_some_and(|b| *b == b'{' || *b == b'[');
    if (m.json || looks_json)
        && let Ok(v) = serde_json::from_slice::<serde_json::Value>(&m.payload)
    {
        return api::from_json(&v);
    }
    Dynamic::from_blob(m.payload.to_vec())
}

fn message_map(m: &MessageEvent) -> RhaiMap {
    let mut map = RhaiMap::new();
    map.insert("src".into(), m.src.clone().into());
    map.insert("dst".into(), m.dst.clone().into());
    map.insert(
        "group".into(),
        m.group.clone().map(Dynamic::from).unwrap_or(Dynamic::UNIT),
    );
    map.insert("payload".into(), payload_value(m));
    map.insert("size".into(), (m.payload.len() as i64).into());
    map.insert("time_ms".into(), (m.time_ms as i64).into());
    map
}

/// The line where `fn name(` is defined in `text` (0 when not found).
fn hook_line(text: &str, name: &str) -> usize {
    text.lines()
        .position(|l| {
            let l = l.trim_start();
            l.strip_prefix("fn").is_some_and(|r| {
                r.trim_start()
                    .strip_prefix(name)
                    .is_some_and(|r| r.trim_start().starts_with('('))
            })
        })
        .map_or(0, |i| i + 1)
}

impl Rules {
    /// An engine with the limits of `cfg` and no scripts yet.
    pub fn new(cfg: &PluginsConfig, shared: Arc<Shared>) -> Rules {
        let (mut engine, timer) = script::sandbox_timed(cfg);
        let ctx: Ctx = Rc::new(RefCell::new(CallCtx {
            now_ms: 0,
            file: String::new(),
            effects: Vec::new(),
            touched_alarms: false,
            shared,
        }));
        api::register(&mut engine, &ctx);
        Rules {
            engine,
            scripts: Vec::new(),
            ctx,
            timer,
            warn_gate: WarnGate::default(),
            started: std::time::Instant::now(),
        }
    }

    /// The engine (to compile with the same settings elsewhere).
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Replaces the scripts with `sources`. A file that fails to compile keeps its
    /// previous version; its error is returned.
    pub fn load(&mut self, sources: &[Source]) -> Vec<ScriptError> {
        let mut errors = Vec::new();
        let mut next = Vec::with_capacity(sources.len());
        let mut old: Vec<Compiled> = std::mem::take(&mut self.scripts);
        for s in sources {
            if let Some(i) = old
                .iter()
                .position(|c| c.name == s.name && c.text == s.text)
            {
                next.push(old.swap_remove(i));
                continue;
            }
            match script::compile(&self.engine, &s.name, &s.text) {
                Ok(ast) => {
                    let mut hooks = [false; 4];
                    for f in ast.iter_functions() {
                        for (i, (h, n)) in script::HOOKS.iter().enumerate() {
                            if f.name == *h && f.params.len() == *n {
                                hooks[i] = true;
                            }
                        }
                    }
                    next.push(Compiled {
                        name: s.name.clone(),
                        text: s.text.clone(),
                        ast,
                        hooks,
                    });
                }
                Err(e) => {
                    errors.push(e);
                    if let Some(i) = old.iter().position(|c| c.name == s.name) {
                        next.push(old.swap_remove(i));
                    }
                }
            }
        }
        self.scripts = next;
        errors
    }

    /// Names of the loaded files.
    pub fn files(&self) -> Vec<String> {
        self.scripts.iter().map(|s| s.name.clone()).collect()
    }

    /// Whether any script defines `on_tick`.
    pub fn has_tick(&self) -> bool {
        self.scripts.iter().any(|s| s.hooks[3])
    }

    /// Calls the hooks for `event` at `now_ms`.
    pub fn handle(&mut self, now_ms: u64, event: &Event) -> Outcome {
        match event {
            Event::Connect(c) => self.call(now_ms, 0, vec![client_map(c).into()]),
            Event::Disconnect(c, reason) => {
                self.call(now_ms, 1, vec![client_map(c).into(), reason.clone().into()])
            }
            Event::Message(m) => self.call(now_ms, 2, vec![message_map(m).into()]),
        }
    }

    /// Calls `on_tick(now_ms)`.
    pub fn tick(&mut self, now_ms: u64) -> Outcome {
        self.call(now_ms, 3, vec![(now_ms as i64).into()])
    }

    fn call(&mut self, now_ms: u64, hook: usize, args: Vec<Dynamic>) -> Outcome {
        let mut out = Outcome::default();
        let name = script::HOOKS[hook].0;
        for s in self.scripts.iter().filter(|s| s.hooks[hook]) {
            {
                let mut cx = self.ctx.borrow_mut();
                cx.now_ms = now_ms;
                cx.file.clone_from(&s.name);
            }
            let mut opts = CallFnOptions::new();
            opts.eval_ast = false;
            let mut scope = Scope::new();
            self.timer.arm();
            let result = self.engine.call_fn_with_options::<Dynamic>(
                opts,
                &mut scope,
                &s.ast,
                name,
                args.clone(),
            );
            self.timer.disarm();
            let mut cx = self.ctx.borrow_mut();
            let effects = std::mem::take(&mut cx.effects);
            out.effects.extend(effects);
            if let Err(e) = result {
                let mut se = ScriptError::from_eval(&s.name, &e);
                if se.limit && se.line > 0 {
                    // A limit trip inside a loop is the loop's doing: point at it.
                    let at = crate::lint::loop_line(&s.text, se.line);
                    if at != se.line {
                        se.line = at;
                        se.column = 0;
                    }
                }
                if se.line == 0 {
                    // Limit trips carry no position: point at the loop of the hook that
                    // was running, or at the hook.
                    let fn_line = hook_line(&s.text, name);
                    se.line = if se.limit {
                        crate::lint::first_loop_in(&s.text, fn_line).unwrap_or(fn_line)
                    } else {
                        fn_line
                    };
                    se.message = format!("{} (in {name})", se.message);
                }
                let shared = &cx.shared;
                shared.count(&shared.stats.script_errors);
                if se.limit {
                    shared.count(&shared.stats.limit_trips);
                }
                // A script failing on every event must not flood the log.
                let at = self.started.elapsed().as_millis() as u64;
                match self.warn_gate.pass(at) {
                    Some(0) => tracing::warn!(target: "relay::rules", "{se}"),
                    Some(n) => {
                        tracing::warn!(target: "relay::rules", "{se} ({n} more script errors left out)")
                    }
                    None => {}
                }
                out.errors.push(se);
            }
        }
        let mut cx = self.ctx.borrow_mut();
        out.touched_alarms = std::mem::take(&mut cx.touched_alarms);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use relay_config::plugins::{MysqlConfig, NotifyConfig};

    #[test]
    fn script_error_lines_are_one_a_second_with_the_count_left_out() {
        let mut g = WarnGate::default();
        assert_eq!(g.pass(0), Some(0));
        for t in 1..1000 {
            assert_eq!(g.pass(t), None);
        }
        assert_eq!(g.pass(1000), Some(999));
        assert_eq!(g.pass(2500), Some(0));
    }

    fn rules(text: &str) -> Rules {
        let cfg = PluginsConfig::default();
        let shared = Shared::new(&cfg, &MysqlConfig::default(), &NotifyConfig::default());
        let mut r = Rules::new(&cfg, shared);
        let errors = r.load(&[Source {
            name: "t.rhai".into(),
            path: "t.rhai".into(),
            text: text.into(),
        }]);
        assert!(errors.is_empty(), "{errors:?}");
        r
    }

    fn message(payload: &[u8], json: bool) -> Event {
        Event::Message(MessageEvent {
            src: "a".into(),
            dst: "b".into(),
            group: None,
            payload: Bytes::copy_from_slice(payload),
            json,
            time_ms: 5,
        })
    }

    fn logs(out: &Outcome) -> Vec<String> {
        out.effects
            .iter()
            .filter_map(|e| match e {
                Effect::Log { text, .. } => Some(text.clone()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn payloads_are_parsed_json_or_blobs() {
        let mut r = rules("fn on_message(msg) { log(`${type_of(msg.payload)} ${msg.size}`); }");
        let cases: [(&[u8], bool, &str); 5] = [
            (b"{\"t\":1}", true, "map 7"),
            (b"{\"t\":1}", false, "map 7"),
            (b"[1,2]", true, "array 5"),
            (b"42", true, "i64 2"),
            (b"\x00\x01{", false, "blob 3"),
        ];
        for (bytes, json, want) in cases {
            assert_eq!(
                logs(&r.handle(0, &message(bytes, json))),
                [want],
                "{bytes:?}"
            );
        }
    }

    #[test]
    fn a_failing_file_does_not_stop_the_next_one() {
        let cfg = PluginsConfig::default();
        let shared = Shared::new(&cfg, &MysqlConfig::default(), &NotifyConfig::default());
        let mut r = Rules::new(&cfg, shared);
        let src = |n: &str, t: &str| Source {
            name: n.into(),
            path: n.into(),
            text: t.into(),
        };
        r.load(&[
            src("a.rhai", "fn on_tick(n) { throw \"boom\"; }"),
            src("b.rhai", "fn on_tick(n) { log(\"b ran\"); }"),
        ]);
        let out = r.tick(1);
        assert_eq!(out.errors.len(), 1);
        assert_eq!(out.errors[0].file, "a.rhai");
        assert_eq!(out.errors[0].line, 1);
        assert_eq!(logs(&out), ["b ran"]);
    }

    #[test]
    fn reload_keeps_a_file_that_no_longer_compiles() {
        let mut r = rules("fn on_tick(n) { log(\"v1\"); }");
        let errors = r.load(&[Source {
            name: "t.rhai".into(),
            path: "t.rhai".into(),
            text: "fn on_tick(n) {".into(),
        }]);
        assert_eq!(errors.len(), 1);
        assert_eq!(logs(&r.tick(1)), ["v1"]);
        assert_eq!(r.files(), ["t.rhai"]);
    }
}
