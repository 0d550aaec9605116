//! The sandboxed Rhai engine, the rules folder as a set of sources, and script
//! errors with file, line and column.
//!
//! The engine has no module resolver (no `import` of files), no `eval`, and the
//! limits of `[plugins]` on operations, call depth, expression depth and the sizes
//! of strings, arrays and maps, so a script can neither stall nor exhaust the relay.
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use relay_config::plugins::PluginsConfig;
use rhai::{Engine, EvalAltResult, ParseError, Position};

/// Hooks a script may define, with their arity.
pub const HOOKS: [(&str, usize); 4] = [
    ("on_connect", 1),
    ("on_disconnect", 2),
    ("on_message", 1),
    ("on_tick", 1),
];

/// The source text of one rules file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    /// File name shown in errors (`overheat.rhai`).
    pub name: String,
    /// Full path.
    pub path: PathBuf,
    /// The text that compiled last.
    pub text: String,
}

/// An error in a script, where it happened and whether a sandbox limit stopped it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScriptError {
    /// File name.
    pub file: String,
    /// 1-based line (0: unknown).
    pub line: usize,
    /// 1-based column (0: unknown).
    pub column: usize,
    /// What went wrong.
    pub message: String,
    /// The call was stopped by a limit (operations, call depth, data size).
    pub limit: bool,
}

impl fmt::Display for ScriptError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.line, self.column) {
            (0, _) => write!(f, "{}: {}", self.file, self.message),
            (l, 0) => write!(f, "{}:{l}: {}", self.file, self.message),
            (l, c) => write!(f, "{}:{l}:{c}: {}", self.file, self.message),
        }
    }
}

impl std::error::Error for ScriptError {}

fn pos(p: Position) -> (usize, usize) {
    (p.line().unwrap_or(0), p.position().unwrap_or(0))
}

impl ScriptError {
    /// A compile error.
    pub fn from_parse(file: &str, e: &ParseError) -> ScriptError {
        let (line, column) = pos(e.1);
        ScriptError {
            file: file.to_string(),
            line,
            column,
            message: e.0.to_string(),
            limit: false,
        }
    }

    /// A runtime error; the position is that of the innermost failing call.
    pub fn from_eval(file: &str, e: &EvalAltResult) -> ScriptError {
        let mut inner = e;
        let mut trail = Vec::new();
        while let EvalAltResult::ErrorInFunctionCall(name, _, next, _)
        | EvalAltResult::ErrorInModule(name, next, _) = inner
        {
            trail.push(name.clone());
            inner = next;
        }
        let limit = matches!(
            inner,
            EvalAltResult::ErrorTerminated(..)
                | EvalAltResult::ErrorTooManyOperations(_)
                | EvalAltResult::ErrorStackOverflow(_)
                | EvalAltResult::ErrorDataTooLarge(..)
                | EvalAltResult::ErrorTooManyVariables(_)
                | EvalAltResult::ErrorTooManyModules(_)
        );
        let mut p = inner.position();
        if p.is_none() {
            p = e.position();
        }
        let (line, column) = pos(p);
        let mut message = match inner {
            // The token is the reason the wall-clock bound gave.
            EvalAltResult::ErrorTerminated(why, _) => why.to_string(),
            // A relay function called with the wrong types: say which argument.
            EvalAltResult::ErrorFunctionNotFound(sig, _) => {
                crate::lint::explain_call(sig).unwrap_or_else(|| inner.to_string())
            }
            _ => inner.to_string(),
        };
        if !inner.position().is_none()
            && let Some(cut) = message.rfind(&format!(" ({})", inner.position()))
        {
            message.truncate(cut);
        }
        if let Some(f) = trail.iter().rev().find(|n| !n.is_empty()) {
            message = format!("{message} (in {f})");
        }
        ScriptError {
            file: file.to_string(),
            line,
            column,
            message,
            limit,
        }
    }
}

/// The wall-clock bound on hook calls of one engine: armed before a call,
/// checked every few hundred operations, so a call that runs past
/// `max_hook_ms` is stopped (as a limit trip) however cheap its operations.
#[derive(Debug, Clone)]
pub struct HookTimer {
    deadline: Arc<Mutex<Option<Instant>>>,
    max: Duration,
}

impl HookTimer {
    /// Starts the clock of one call.
    pub fn arm(&self) {
        if let Ok(mut d) = self.deadline.lock() {
            *d = Some(Instant::now() + self.max);
        }
    }

    /// The call is over.
    pub fn disarm(&self) {
        if let Ok(mut d) = self.deadline.lock() {
            *d = None;
        }
    }

    fn passed(&self) -> bool {
        self.deadline
            .lock()
            .ok()
            .and_then(|d| *d)
            .is_some_and(|d| Instant::now() >= d)
    }
}

/// Operations between two looks at the clock.
const CLOCK_EVERY: u64 = 256;

/// A sandboxed engine with the limits of `cfg` and no script functions registered yet.
pub fn sandbox(cfg: &PluginsConfig) -> Engine {
    sandbox_timed(cfg).0
}

/// [`sandbox`], with the timer that bounds each hook call to
/// `max_hook_ms` of wall-clock time once armed.
pub fn sandbox_timed(cfg: &PluginsConfig) -> (Engine, HookTimer) {
    let timer = HookTimer {
        deadline: Arc::new(Mutex::new(None)),
        max: Duration::from_millis(cfg.max_hook_ms.max(1)),
    };
    let mut e = Engine::new();
    let t = timer.clone();
    let max_ms = cfg.max_hook_ms;
    e.on_progress(move |ops| {
        (ops % CLOCK_EVERY == 0 && t.passed())
            .then(|| format!("ran longer than max_hook_ms ({max_ms} ms)").into())
    });
    e.set_module_resolver(rhai::module_resolvers::DummyModuleResolver::new());
    e.disable_symbol("eval");
    e.set_max_operations(cfg.max_operations);
    e.set_max_call_levels(cfg.max_call_levels);
    e.set_max_expr_depths(cfg.max_expr_depth, cfg.max_expr_depth.div_ceil(2).max(4));
    e.set_max_string_size(cfg.max_string_size);
    e.set_max_array_size(cfg.max_array_size);
    e.set_max_map_size(cfg.max_map_size);
    e.set_max_variables(1_000);
    e.set_max_functions(1_000);
    e.set_max_modules(0);
    e.on_print(|s| tracing::info!(target: "relay::rules", "{s}"));
    e.on_debug(|s, src, p| tracing::debug!(target: "relay::rules", "{}:{}: {s}", src.unwrap_or("?"), p.line().unwrap_or(0)));
    (e, timer)
}

/// Compiles `text` as file `name`, with the source set so runtime errors name the file.
pub fn compile(engine: &Engine, name: &str, text: &str) -> Result<rhai::AST, ScriptError> {
    let mut ast = engine
        .compile(text)
        .map_err(|e| ScriptError::from_parse(name, &e))?;
    ast.set_source(name);
    for f in ast.iter_functions() {
        if let Some((hook, arity)) = HOOKS.iter().find(|(h, _)| *h == f.name)
            && f.params.len() != *arity
        {
            return Err(ScriptError {
                file: name.to_string(),
                line: 0,
                column: 0,
                message: format!(
                    "hook `{hook}` takes {arity} parameter(s), found {}",
                    f.params.len()
                ),
                limit: false,
            });
        }
    }
    Ok(ast)
}

/// What is in the rules folder: every `*.rhai` file, in name order, with its
/// modification stamp (to notice edits).
pub fn list_dir(dir: &Path) -> std::io::Result<Vec<(PathBuf, Option<SystemTime>, u64)>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        if path.extension().is_some_and(|x| x == "rhai") && path.is_file() {
            let meta = entry.metadata()?;
            files.push((path, meta.modified().ok(), meta.len()));
        }
    }
    files.sort();
    Ok(files)
}

/// File name of `path` for messages.
pub fn display_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string())
}

/// Loads the folder. Each file that compiles replaces its entry in `previous`; a file
/// that fails keeps its previous version (if any) and its error is returned.
pub fn load_dir(
    engine: &Engine,
    dir: &Path,
    previous: &[Source],
) -> std::io::Result<(Vec<Source>, Vec<ScriptError>)> {
    let mut sources = Vec::new();
    let mut errors = Vec::new();
    for (path, _, _) in list_dir(dir)? {
        let name = display_name(&path);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) => {
                errors.push(ScriptError {
                    file: name.clone(),
                    line: 0,
                    column: 0,
                    message: e.to_string(),
                    limit: false,
                });
                if let Some(old) = previous.iter().find(|s| s.path == path) {
                    sources.push(old.clone());
                }
                continue;
            }
        };
        match compile(engine, &name, &text) {
            Ok(_) => sources.push(Source { name, path, text }),
            Err(e) => {
                errors.push(e);
                if let Some(old) = previous.iter().find(|s| s.path == path) {
                    sources.push(old.clone());
                }
            }
        }
    }
    Ok((sources, errors))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn engine() -> Engine {
        sandbox(&PluginsConfig {
            max_operations: 10_000,
            ..Default::default()
        })
    }

    #[test]
    fn compile_errors_name_file_line_and_column() {
        let e = compile(&engine(), "bad.rhai", "fn on_tick(now) {\n  let x = ;\n}").unwrap_err();
        assert_eq!((e.file.as_str(), e.line), ("bad.rhai", 2));
        assert!(e.column > 0);
        assert!(e.to_string().starts_with("bad.rhai:2:"), "{e}");
    }

    #[test]
    fn hooks_must_have_their_arity() {
        let e = compile(&engine(), "h.rhai", "fn on_message(a, b) {}").unwrap_err();
        assert!(e.message.contains("on_message"), "{e}");
    }

    /// Calls `on_tick(1)` of a compiled script, which must fail.
    fn on_tick_error(en: &rhai::Engine, ast: &rhai::AST) -> Box<rhai::EvalAltResult> {
        let mut opts = rhai::CallFnOptions::new();
        opts.eval_ast = false;
        en.call_fn_with_options::<rhai::Dynamic>(
            opts,
            &mut rhai::Scope::new(),
            ast,
            "on_tick",
            (1_i64,),
        )
        .unwrap_err()
    }

    #[test]
    fn runtime_errors_point_inside_the_function() {
        let en = engine();
        let ast = compile(&en, "r.rhai", "fn on_tick(now) {\n\n  let x = 1 / 0;\n}").unwrap();
        let err = on_tick_error(&en, &ast);
        let se = ScriptError::from_eval("r.rhai", &err);
        assert_eq!(se.line, 3, "{se}");
        assert!(!se.limit);
    }

    #[test]
    fn endless_loop_trips_the_operation_limit() {
        let en = engine();
        let ast = compile(&en, "l.rhai", "fn on_tick(now) {\n  loop { now += 1; }\n}").unwrap();
        let err = on_tick_error(&en, &ast);
        let se = ScriptError::from_eval("l.rhai", &err);
        assert!(se.limit, "{se}");
    }

    #[test]
    fn a_call_past_max_hook_ms_is_stopped_as_a_limit_trip() {
        let (en, timer) = sandbox_timed(&PluginsConfig {
            max_operations: u64::MAX,
            max_hook_ms: 50,
            ..Default::default()
        });
        let ast = compile(
            &en,
            "slow.rhai",
            "fn on_tick(now) {\n  loop { now += 1; }\n}",
        )
        .unwrap();
        timer.arm();
        let started = Instant::now();
        let err = on_tick_error(&en, &ast);
        timer.disarm();
        assert!(started.elapsed() < Duration::from_secs(5));
        let se = ScriptError::from_eval("slow.rhai", &err);
        assert!(se.limit, "{se}");
        assert!(se.message.contains("max_hook_ms (50 ms)"), "{se}");
    }

    #[test]
    fn no_imports_and_no_eval() {
        let en = engine();
        assert!(compile(&en, "e.rhai", "fn on_tick(n) { eval(\"1\") }").is_err());
        let ast = compile(&en, "i.rhai", "import \"/etc/passwd\" as p;").unwrap();
        assert!(en.run_ast(&ast).is_err());
    }
}
