//! What `relay rules check` finds besides compile errors, before a rule goes live:
//! calls to functions that do not exist (or with the wrong number of arguments),
//! variables defined outside a function and used inside it (functions cannot see
//! them), and loops that can never end. Also the relay functions' parameters, to
//! say a wrong argument type in the rule author's words.
use std::collections::{BTreeSet, HashMap};

use relay_config::plugins::PluginsConfig;
use rhai::{AST, ASTNode, Engine, Expr, Stmt};

use crate::script::{self, ScriptError};

/// What a parameter of a relay function takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Text.
    Text,
    /// `true` or `false`.
    Bool,
    /// An integer.
    Int,
    /// An integer or a fraction.
    Number,
    /// An object map.
    Map,
    /// Anything.
    Any,
}

impl Kind {
    fn wanted(self) -> &'static str {
        match self {
            Kind::Text => "a string",
            Kind::Bool => "a bool (true or false)",
            Kind::Int => "an integer",
            Kind::Number => "a number",
            Kind::Map => "a map (#{...})",
            Kind::Any => "any value",
        }
    }

    /// Whether a value of Rhai type `ty` (as `type_name`) fits.
    fn takes(self, ty: &str) -> bool {
        match self {
            Kind::Text => ty == "string",
            Kind::Bool => ty == "bool",
            Kind::Int => ty == "i64",
            Kind::Number => ty == "i64" || ty == "f64",
            Kind::Map => ty == "map",
            Kind::Any => true,
        }
    }
}

/// The relay functions with the names and kinds of their parameters (one entry
/// per form).
pub const FUNCTIONS: &[(&str, &[(&str, Kind)])] = &[
    (
        "alarm_when",
        &[
            ("key", Kind::Text),
            ("condition", Kind::Bool),
            ("for_s", Kind::Number),
            ("severity", Kind::Text),
            ("text", Kind::Text),
        ],
    ),
    (
        "alarm_repeat",
        &[
            ("key", Kind::Text),
            ("condition", Kind::Bool),
            ("times", Kind::Int),
            ("severity", Kind::Text),
            ("text", Kind::Text),
        ],
    ),
    (
        "alarm_raise",
        &[
            ("key", Kind::Text),
            ("severity", Kind::Text),
            ("text", Kind::Text),
        ],
    ),
    ("alarm_clear", &[("key", Kind::Text)]),
    ("alarm_active", &[("key", Kind::Text)]),
    (
        "notify",
        &[
            ("channel", Kind::Text),
            ("target", Kind::Text),
            ("text", Kind::Text),
        ],
    ),
    (
        "state_set",
        &[
            ("address", Kind::Text),
            ("field", Kind::Text),
            ("value", Kind::Any),
        ],
    ),
    (
        "state_get",
        &[("address", Kind::Text), ("field", Kind::Text)],
    ),
    ("state_get", &[("address", Kind::Text)]),
    ("counter_add", &[("key", Kind::Text), ("n", Kind::Int)]),
    ("counter_get", &[("key", Kind::Text)]),
    ("persist", &[("table", Kind::Text), ("row", Kind::Map)]),
    (
        "send",
        &[("destination", Kind::Text), ("payload", Kind::Any)],
    ),
    ("publish", &[("group", Kind::Text), ("payload", Kind::Any)]),
    ("log", &[("text", Kind::Any)]),
    ("now_ms", &[]),
];

/// Rhai's name of an argument type in a "Function not found" signature, as
/// `type_name` says it.
fn arg_type(t: &str) -> &str {
    match t.trim() {
        "&str | ImmutableString | String" => "string",
        "Map" => "map",
        "Array" => "array",
        "Blob" => "blob",
        other => other,
    }
}

/// A type as people say it.
fn said(ty: &str) -> &str {
    match ty {
        "string" => "string",
        "i64" => "integer",
        "f64" => "number with a fraction",
        "()" => "nothing (())",
        other => other,
    }
}

/// The author's words for a call of a relay function that matched no form
/// (`alarm_when (&str | ImmutableString | String, string, i64, ...)`), or `None`
/// for other functions.
pub fn explain_call(signature: &str) -> Option<String> {
    let (name, rest) = signature.split_once(" (")?;
    let args: Vec<&str> = rest
        .strip_suffix(')')?
        .split(", ")
        .filter(|a| !a.is_empty())
        .map(arg_type)
        .collect();
    let forms: Vec<&[(&str, Kind)]> = FUNCTIONS
        .iter()
        .filter(|(n, _)| *n == name)
        .map(|(_, p)| *p)
        .collect();
    if forms.is_empty() {
        return None;
    }
    let Some(params) = forms.iter().find(|p| p.len() == args.len()) else {
        let list: Vec<String> = forms
            .iter()
            .map(|p| {
                let names: Vec<&str> = p.iter().map(|(n, _)| *n).collect();
                format!("{} ({})", p.len(), names.join(", "))
            })
            .collect();
        return Some(format!(
            "{name}: takes {} argument(s), got {}",
            list.join(" or "),
            args.len()
        ));
    };
    for ((pname, kind), ty) in params.iter().zip(&args) {
        if !kind.takes(ty) {
            return Some(format!(
                "{name}: the {pname} must be {}, got {}",
                kind.wanted(),
                said(ty)
            ));
        }
    }
    None
}

/// Rhai's own functions that are not registered like the others.
const SYNTAX: [&str; 10] = [
    "type_of",
    "print",
    "debug",
    "Fn",
    "call",
    "curry",
    "is_def_var",
    "is_def_fn",
    "is_shared",
    "eval",
];

/// Every function name `engine` knows (relay functions and Rhai's packages), with
/// the numbers of parameters it takes.
pub fn known_functions(engine: &Engine) -> HashMap<String, BTreeSet<usize>> {
    let mut m: HashMap<String, BTreeSet<usize>> = HashMap::new();
    for (name, n) in engine.collect_fn_metadata(
        None,
        |f| Some((f.metadata.name.to_string(), f.metadata.num_params)),
        true,
    ) {
        m.entry(name).or_default().insert(n);
    }
    m
}

/// Finds what compiles but cannot work in `ast` (file `name`, source `text`).
pub fn lint(
    known: &HashMap<String, BTreeSet<usize>>,
    cfg: &PluginsConfig,
    name: &str,
    text: &str,
    ast: &AST,
) -> Vec<ScriptError> {
    let mut out = Vec::new();
    let err = |pos: rhai::Position, message: String| ScriptError {
        file: name.to_string(),
        line: pos.line().unwrap_or(0),
        column: pos.position().unwrap_or(0),
        message,
        limit: false,
    };
    let mut script_fns: HashMap<String, BTreeSet<usize>> = HashMap::new();
    for f in ast.iter_functions() {
        script_fns
            .entry(f.name.to_string())
            .or_default()
            .insert(f.params.len());
    }
    // Loops by position, and whether anything in them leaves them.
    let mut loops: Vec<(rhai::Position, bool)> = Vec::new();
    ast.walk(&mut |path: &[ASTNode]| {
        let Some(node) = path.last() else {
            return true;
        };
        match node {
            ASTNode::Expr(Expr::FnCall(x, pos)) | ASTNode::Stmt(Stmt::FnCall(x, pos))
                if x.op_token.is_none() && !x.is_qualified() =>
            {
                let fname = x.name.as_str();
                let n = x.args.len();
                let arities = script_fns.get(fname).or_else(|| known.get(fname));
                match arities {
                    _ if SYNTAX.contains(&fname) => {}
                    None => out.push(err(
                        *pos,
                        format!("no function `{fname}` (not a relay function, a Rhai function, or one defined in this file)"),
                    )),
                    Some(a) if !a.contains(&n) => {
                        let takes: Vec<String> = a.iter().map(|n| n.to_string()).collect();
                        out.push(err(
                            *pos,
                            format!("`{fname}` takes {} argument(s), got {n}", takes.join(" or ")),
                        ))
                    }
                    Some(_) => {}
                }
            }
            ASTNode::Expr(Expr::MethodCall(x, pos)) => {
                let fname = x.name.as_str();
                if !SYNTAX.contains(&fname)
                    && !script_fns.contains_key(fname)
                    && !known.contains_key(fname)
                {
                    out.push(err(*pos, format!("no method `{fname}`")));
                }
            }
            ASTNode::Stmt(Stmt::While(flow, pos))
                if matches!(flow.expr, Expr::Unit(..) | Expr::BoolConstant(true, ..)) =>
            {
                loops.push((*pos, false));
            }
            ASTNode::Stmt(Stmt::BreakLoop(..)) => {
                // The nearest loop around it ends.
                if let Some(p) = path[..path.len() - 1].iter().rev().find_map(|n| match n {
                    ASTNode::Stmt(Stmt::While(_, p) | Stmt::Do(_, _, p) | Stmt::For(_, p)) => {
                        Some(*p)
                    }
                    _ => None,
                }) && let Some(l) = loops.iter_mut().find(|(lp, _)| *lp == p)
                {
                    l.1 = true;
                }
            }
            ASTNode::Stmt(Stmt::Return(..)) => {
                // `return` and `throw` leave every loop around them.
                for n in &path[..path.len() - 1] {
                    if let ASTNode::Stmt(Stmt::While(_, p)) = n
                        && let Some(l) = loops.iter_mut().find(|(lp, _)| lp == p)
                    {
                        l.1 = true;
                    }
                }
            }
            _ => {}
        }
        true
    });
    for (pos, left) in loops {
        if !left {
            out.push(err(
                pos,
                format!(
                    "endless loop: nothing in it says `break`, `return` or `throw` (every call would be stopped after max_operations = {})",
                    cfg.max_operations
                ),
            ));
        }
    }
    // Variables a function uses but cannot see: compile again with strict variables.
    let mut strict = script::sandbox(cfg);
    strict.set_strict_variables(true);
    if let Err(e) = strict.compile(text)
        && let rhai::ParseErrorType::VariableUndefined(var) = *e.0.clone()
    {
        let top_level = ast.statements().iter().any(|s| match s {
            Stmt::Var(x, ..) => x.0.name == var,
            _ => false,
        });
        let message = if top_level {
            format!(
                "`{var}` is defined outside the function, and functions cannot see it: define it inside, or make it a function (fn {var}() {{ ... }})"
            )
        } else {
            format!("`{var}` is not defined here")
        };
        out.push(err(e.1, message));
    }
    out.sort_by_key(|e| (e.line, e.column));
    out
}

/// The line of the loop around `line` in `text` (a limit trip inside a loop is
/// reported at the loop), or `line` itself when no loop encloses it.
pub fn loop_line(text: &str, line: usize) -> usize {
    let lines: Vec<&str> = text.lines().collect();
    if line == 0 || line > lines.len() {
        return line;
    }
    // Walk back through the blocks that enclose the line, innermost first.
    let mut depth: i64 = 0;
    for i in (0..line).rev() {
        let l = lines[i];
        let l = l.split("//").next().unwrap_or(l);
        let chars: Vec<char> = l.chars().collect();
        for (j, c) in chars.iter().enumerate().rev() {
            match c {
                '}' => depth += 1,
                '{' if depth > 0 => depth -= 1,
                '{' => {
                    let head: String = chars[..j].iter().collect();
                    let words = head
                        .split(|c: char| !c.is_alphanumeric() && c != '_')
                        .collect::<Vec<_>>();
                    if words
                        .iter()
                        .any(|w| matches!(*w, "loop" | "while" | "for" | "do"))
                    {
                        return i + 1;
                    }
                }
                _ => {}
            }
        }
    }
    line
}

/// The first loop in the body of the function that starts at `fn_line` (a limit
/// trip that carries no position is most likely there), if any.
pub fn first_loop_in(text: &str, fn_line: usize) -> Option<usize> {
    let mut depth = 0i64;
    let mut opened = false;
    for (i, l) in text.lines().enumerate().skip(fn_line.saturating_sub(1)) {
        let code = l.split("//").next().unwrap_or(l);
        if opened && depth > 0 {
            let words: Vec<&str> = code
                .split(|c: char| !c.is_alphanumeric() && c != '_')
                .collect();
            if words
                .iter()
                .any(|w| matches!(*w, "loop" | "while" | "for" | "do"))
            {
                return Some(i + 1);
            }
        }
        for c in code.chars() {
            match c {
                '{' => {
                    depth += 1;
                    opened = true;
                }
                '}' => depth -= 1,
                _ => {}
            }
        }
        if opened && depth <= 0 {
            return None;
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrong_argument_types_read_in_the_authors_words() {
        assert_eq!(
            explain_call("alarm_when (&str | ImmutableString | String, &str | ImmutableString | String, i64, &str | ImmutableString | String, &str | ImmutableString | String)").as_deref(),
            Some("alarm_when: the condition must be a bool (true or false), got string")
        );
        assert_eq!(
            explain_call("counter_add (&str | ImmutableString | String, f64)").as_deref(),
            Some("counter_add: the n must be an integer, got number with a fraction")
        );
        assert_eq!(
            explain_call("alarm_raise (&str | ImmutableString | String)").as_deref(),
            Some("alarm_raise: takes 3 (key, severity, text) argument(s), got 1")
        );
        assert_eq!(
            explain_call("persist (&str | ImmutableString | String, ())").as_deref(),
            Some("persist: the row must be a map (#{...}), got nothing (())")
        );
        assert_eq!(explain_call("my_fn (i64)"), None);
    }

    #[test]
    fn the_loop_line_is_found_around_the_failing_one() {
        let t = "fn on_tick(n) {\n  let x = 0;\n  while x < 10 {\n    if n > 0 { x -= 1; }\n    n += 1;\n  }\n}\n";
        assert_eq!(loop_line(t, 5), 3);
        assert_eq!(loop_line(t, 4), 3);
        assert_eq!(loop_line(t, 2), 2, "not in a loop");
        assert_eq!(loop_line("fn f() {\n  loop { }\n}", 2), 2);
        assert_eq!(first_loop_in(t, 1), Some(3));
        assert_eq!(
            first_loop_in("fn a() {\n  1\n}\nfn b() { loop {} }", 1),
            None
        );
    }
}
