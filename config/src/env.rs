//! Environment overrides: `RELAY__<SECTION>__<KEY>=value` sets one key of the
//! document before it is decoded, so containers and systemd units can change a
//! setting without editing the file.
//!
//! Naming: the prefix `RELAY__` (upper case, two underscores), then the path of
//! the key with `__` between its parts; parts are matched case-insensitively
//! (they are lower-cased), and a part that is a number indexes an array of
//! tables (`RELAY__NOTIFY__ROUTE__0__SEVERITY`). The value is read as a TOML
//! value when it is one (`131072`, `true`, `"text"`, `["a", "b"]`,
//! `{ enabled = true }`); otherwise, or when the TOML value has the wrong type
//! for the key, it is taken as the raw string (`hmac`, `0.0.0.0:7000`).

use toml::Value;

use crate::Problem;
use crate::path::{KeyPath, Seg, type_name};

/// Variables that start with this are overrides; all others are ignored.
pub const ENV_PREFIX: &str = "RELAY__";
/// Separates the parts of a key path in a variable name.
pub const ENV_SEPARATOR: &str = "__";

/// One override that was applied to the document.
#[derive(Debug, Clone)]
pub(crate) struct Applied {
    /// `env RELAY__LIMITS__MAX_FRAME`: the `file` of problems at this key.
    pub(crate) origin: String,
    /// Where it landed in the document.
    pub(crate) path: KeyPath,
    /// The variable's text, used when its TOML reading has the wrong type.
    pub(crate) raw: String,
    /// The outermost table or key this override brought into being (absent
    /// from the file), so a problem with it names the variable, not the file.
    pub(crate) created: Option<KeyPath>,
}

impl Applied {
    /// Whether a problem at `key` is this override's doing; the length of
    /// the matched path ranks overlapping overrides.
    pub(crate) fn covers(&self, key: &str) -> Option<usize> {
        let own = self.path.to_string();
        if crate::path::key_within(key, &own) {
            return Some(own.len());
        }
        let created = self.created.as_ref()?.to_string();
        crate::path::key_within(key, &created).then_some(created.len())
    }
}

/// The origin name of a variable in problems.
pub(crate) fn origin_of(name: &str) -> String {
    format!("env {name}")
}

/// Applies every `RELAY__` variable of `env` to `doc` (in name order, so the
/// result does not depend on the order the environment lists them), and
/// reports variables that cannot be applied.
pub(crate) fn apply(
    doc: &mut Value,
    env: impl IntoIterator<Item = (String, String)>,
    problems: &mut Vec<Problem>,
) -> Vec<Applied> {
    let mut vars: Vec<(String, String)> = env
        .into_iter()
        .filter(|(name, _)| name.starts_with(ENV_PREFIX))
        .collect();
    vars.sort();
    let mut applied = Vec::with_capacity(vars.len());
    for (name, raw) in vars {
        let origin = origin_of(&name);
        let parts: Vec<String> = name[ENV_PREFIX.len()..]
            .split(ENV_SEPARATOR)
            .map(str::to_ascii_lowercase)
            .collect();
        if parts.iter().any(String::is_empty) {
            problems.push(Problem::new(
                origin,
                "",
                "the variable name has an empty key part; use RELAY__SECTION__KEY with `__` between parts",
            ));
            continue;
        }
        match set(doc, &parts, parse_value(&raw)) {
            Ok((path, created)) => applied.push(Applied {
                origin,
                path,
                raw,
                created,
            }),
            Err((key, reason)) => problems.push(Problem::new(origin, key, reason)),
        }
    }
    applied
}

/// Reads an override's text as a TOML value, or as a plain string when it is not one.
pub(crate) fn parse_value(raw: &str) -> Value {
    match toml::from_str::<toml::Table>(&format!("v = {raw}")) {
        Ok(mut table) if table.len() == 1 => table
            .remove("v")
            .unwrap_or_else(|| Value::String(raw.to_owned())),
        _ => Value::String(raw.to_owned()),
    }
}

/// Puts `value` at `parts` in `doc`, creating missing tables on the way.
/// Returns the path it landed on and the outermost node it created, or the
/// key and reason it could not.
fn set(
    doc: &mut Value,
    parts: &[String],
    value: Value,
) -> Result<(KeyPath, Option<KeyPath>), (String, String)> {
    let mut path = KeyPath::default();
    let mut created: Option<KeyPath> = None;
    let mut node = doc;
    let Some((last, parents)) = parts.split_last() else {
        return Err((String::new(), "the variable names no key".into()));
    };
    for part in parents {
        let at = path.to_string();
        node = match node {
            Value::Table(table) => {
                path.0.push(Seg::Key(part.clone()));
                if created.is_none() && !table.contains_key(part) {
                    created = Some(path.clone());
                }
                table
                    .entry(part.clone())
                    .or_insert_with(|| Value::Table(toml::Table::new()))
            }
            Value::Array(items) => {
                let index = array_index(part, items.len(), &at)?;
                path.0.push(Seg::Index(index));
                &mut items[index]
            }
            other => return Err(not_a_table(&at, other, part)),
        };
    }
    let at = path.to_string();
    match node {
        Value::Table(table) => {
            path.0.push(Seg::Key(last.clone()));
            if table.insert(last.clone(), value).is_none() && created.is_none() {
                created = Some(path.clone());
            }
        }
        Value::Array(items) => {
            let index = array_index(last, items.len(), &at)?;
            path.0.push(Seg::Index(index));
            items[index] = value;
        }
        other => return Err(not_a_table(&at, other, last)),
    }
    Ok((path, created))
}

fn array_index(part: &str, len: usize, at: &str) -> Result<usize, (String, String)> {
    match part.parse::<usize>() {
        Ok(index) if index < len => Ok(index),
        _ => Err((
            format!("{at}.{part}"),
            format!("`{at}` is an array of {len} entries; `{part}` is not an index into it"),
        )),
    }
}

fn not_a_table(at: &str, node: &Value, part: &str) -> (String, String) {
    (
        format!("{at}.{part}"),
        format!(
            "`{at}` holds a value of type {}, not a table, so it has no key `{part}`",
            type_name(node)
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(doc: &str, vars: &[(&str, &str)]) -> (Value, Vec<Applied>, Vec<Problem>) {
        let mut doc = Value::Table(toml::from_str(doc).unwrap());
        let mut problems = Vec::new();
        let env = vars.iter().map(|(k, v)| (k.to_string(), v.to_string()));
        let applied = apply(&mut doc, env, &mut problems);
        (doc, applied, problems)
    }

    #[test]
    fn values_are_toml_when_they_parse_and_strings_otherwise() {
        assert_eq!(parse_value("131072"), Value::Integer(131072));
        assert_eq!(parse_value("true"), Value::Boolean(true));
        assert_eq!(parse_value("\"12345\""), Value::String("12345".into()));
        assert_eq!(parse_value("hmac"), Value::String("hmac".into()));
        assert_eq!(
            parse_value("0.0.0.0:7000"),
            Value::String("0.0.0.0:7000".into())
        );
        assert_eq!(parse_value(""), Value::String(String::new()));
        assert_eq!(
            parse_value("[1, 2]"),
            Value::Array(vec![Value::Integer(1), Value::Integer(2)])
        );
        // A value that smuggles a second key is not a value: it stays text.
        assert_eq!(
            parse_value("1\nother = 2"),
            Value::String("1\nother = 2".into())
        );
    }

    #[test]
    fn names_are_case_insensitive_and_create_missing_tables() {
        let (doc, applied, problems) = run(
            "",
            &[
                ("RELAY__Limits__MAX_FRAME", "100"),
                ("RELAY__redis__url", "redis://x"),
            ],
        );
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(doc["limits"]["max_frame"], Value::Integer(100));
        assert_eq!(doc["redis"]["url"], Value::String("redis://x".into()));
        assert_eq!(applied[0].origin, "env RELAY__Limits__MAX_FRAME");
        assert_eq!(applied[0].path.to_string(), "limits.max_frame");
        assert_eq!(
            applied[0]
                .created
                .as_ref()
                .map(ToString::to_string)
                .as_deref(),
            Some("limits")
        );
        assert_eq!(
            applied[0].covers("limits.max_frame"),
            Some("limits.max_frame".len())
        );
        assert_eq!(applied[0].covers("limits"), Some("limits".len()));
        assert_eq!(applied[0].covers("node.name"), None);
    }

    #[test]
    fn an_override_of_a_key_in_the_file_created_nothing() {
        let (_, applied, _) = run(
            "[limits]\nmax_frame = 1\n",
            &[("RELAY__LIMITS__MAX_FRAME", "2")],
        );
        assert!(applied[0].created.is_none());
        assert_eq!(applied[0].covers("limits"), None);
    }

    #[test]
    fn other_variables_are_ignored() {
        let (doc, applied, problems) = run(
            "",
            &[("PATH", "/bin"), ("RELAY_LOG", "debug"), ("relay__x", "1")],
        );
        assert!(applied.is_empty() && problems.is_empty());
        assert_eq!(doc, Value::Table(toml::Table::new()));
    }

    #[test]
    fn numeric_parts_index_arrays_of_tables() {
        let (doc, applied, problems) = run(
            "[[route]]\nx = 1\n[[route]]\nx = 2\n",
            &[("RELAY__ROUTE__1__X", "5"), ("RELAY__ROUTE__7__X", "5")],
        );
        assert_eq!(doc["route"][1]["x"], Value::Integer(5));
        assert_eq!(applied.len(), 1);
        assert_eq!(applied[0].path.to_string(), "route[1].x");
        assert_eq!(problems.len(), 1);
        assert_eq!(problems[0].file, "env RELAY__ROUTE__7__X");
        assert_eq!(problems[0].key, "route.7");
        assert!(
            problems[0].reason.contains("array of 2 entries"),
            "{}",
            problems[0].reason
        );
    }

    #[test]
    fn keys_below_a_scalar_and_empty_parts_are_problems() {
        let (_, applied, problems) = run(
            "[limits]\nmax_frame = 10\n",
            &[
                ("RELAY__LIMITS__MAX_FRAME__X", "1"),
                ("RELAY__", "1"),
                ("RELAY__LIMITS____X", "1"),
            ],
        );
        assert!(applied.is_empty());
        assert_eq!(problems.len(), 3, "{problems:?}");
        let below = problems
            .iter()
            .find(|p| p.file == "env RELAY__LIMITS__MAX_FRAME__X")
            .unwrap();
        assert_eq!(below.key, "limits.max_frame.x");
        assert!(
            below.reason.contains("type integer, not a table"),
            "{}",
            below.reason
        );
        assert!(
            problems
                .iter()
                .filter(|p| p.reason.contains("empty key part"))
                .count()
                == 2
        );
    }
}
