//! Decodes a TOML document into a typed configuration while collecting every
//! structural problem (unknown key, wrong type, value out of a type's range),
//! not just the first one serde meets.
//!
//! serde stops at the first error. So the decoder records that error with the
//! path `serde_path_to_error` gives it, takes the offending node out of the
//! document (its default then applies), and decodes again, until the document
//! decodes. Each round removes one node, so the number of rounds is bounded by
//! the size of the document. Array elements that were removed are remembered,
//! so later problems still name their index in the file.

use std::collections::HashMap;

use serde::de::DeserializeOwned;
use toml::Value;

use crate::env::Applied;
use crate::path::{KeyPath, Seg, type_name};

/// A structural problem, before its origin (file or variable) is known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Located {
    /// Where, in the coordinates of the document as written.
    pub(crate) path: KeyPath,
    /// Why.
    pub(crate) reason: String,
}

/// Decodes `doc` into `T`, returning it (when the remains of the document
/// decode) and every structural problem found on the way.
pub(crate) fn decode<T: DeserializeOwned>(
    mut doc: Value,
    overrides: &[Applied],
) -> (Option<T>, Vec<Located>) {
    let mut problems = Vec::new();
    // Original indices removed from each array, keyed by the array's original path.
    let mut removed: HashMap<KeyPath, Vec<usize>> = HashMap::new();
    // Tables and arrays something was taken out of: a `missing field` there is
    // a consequence of an earlier problem, not a new one.
    let mut pruned: Vec<KeyPath> = Vec::new();
    let rounds = count_nodes(&doc) + overrides.len() + 1;
    for _ in 0..rounds {
        let err = match serde_path_to_error::deserialize::<_, T>(doc.clone()) {
            Ok(value) => return (Some(value), problems),
            Err(err) => err,
        };
        let here = to_key_path(err.path());
        let original = translate(&here, &removed);
        let message = err.inner().message().to_owned();
        let node = here.get(&doc).cloned();

        // An override whose TOML reading has the wrong type gets its raw text instead
        // (`RELAY__HTTP__API_TOKEN=12345` is a token, not a number).
        if let Some(ov) = overrides.iter().find(|ov| ov.path == original) {
            let raw = Value::String(ov.raw.clone());
            if node.as_ref().is_some_and(|n| *n != raw)
                && let Some(slot) = here.get_mut(&mut doc)
            {
                *slot = raw;
                continue;
            }
        }

        let consequence = message.starts_with("missing field") && pruned.contains(&original);
        if !consequence {
            problems.push(Located {
                path: original.clone(),
                reason: describe(&message, node.as_ref()),
            });
        }
        if !here.remove(&mut doc) {
            // Nothing left to take out (a problem with the document as a whole).
            return (None, problems);
        }
        if let Some((last, parent)) = original.0.split_last() {
            let parent = KeyPath(parent.to_vec());
            if let Seg::Index(index) = last {
                let list = removed.entry(parent.clone()).or_default();
                list.push(*index);
                list.sort_unstable();
            }
            pruned.push(parent);
        }
    }
    (None, problems)
}

/// Turns serde_path_to_error's path into ours.
fn to_key_path(path: &serde_path_to_error::Path) -> KeyPath {
    use serde_path_to_error::Segment;
    KeyPath(
        path.iter()
            .filter_map(|seg| match seg {
                Segment::Map { key } => Some(Seg::Key(key.clone())),
                Segment::Seq { index } => Some(Seg::Index(*index)),
                Segment::Enum { variant } => Some(Seg::Key(variant.clone())),
                // An unknown segment carries no name; the parent path is the best we know.
                _ => None,
            })
            .collect(),
    )
}

/// Maps a path in the current (pruned) document back to the document as written.
fn translate(here: &KeyPath, removed: &HashMap<KeyPath, Vec<usize>>) -> KeyPath {
    let mut original = KeyPath::default();
    for seg in &here.0 {
        let seg = match seg {
            Seg::Index(live) => {
                let gone = removed.get(&original).map(Vec::as_slice).unwrap_or(&[]);
                // The `live`-th index that was not removed; at most `live + gone.len()` steps.
                let mut index = 0;
                let mut seen = 0;
                loop {
                    if !gone.contains(&index) {
                        if seen == *live {
                            break;
                        }
                        seen += 1;
                    }
                    index += 1;
                }
                Seg::Index(index)
            }
            key => key.clone(),
        };
        original.0.push(seg);
    }
    original
}

/// Turns serde's message into an operator's reason.
fn describe(message: &str, node: Option<&Value>) -> String {
    if let Some(rest) = message.strip_prefix("unknown field `") {
        return match rest.split_once("`, ") {
            Some((_, expected)) if expected.starts_with("there are no fields") => {
                "unknown key; this table takes no keys".to_owned()
            }
            Some((_, expected)) => format!("unknown key; {expected}"),
            None => "unknown key".to_owned(),
        };
    }
    if let Some(rest) = message.strip_prefix("unknown variant `") {
        return format!("unknown value `{rest}");
    }
    if message.contains("expected string only") {
        let found = node.map_or("value", type_name);
        return format!("invalid type: {found}, expected a string");
    }
    match node {
        Some(
            value @ (Value::String(_) | Value::Integer(_) | Value::Float(_) | Value::Boolean(_)),
        ) => {
            let shown = value.to_string();
            if message.contains(shown.trim_matches('"')) {
                message.to_owned()
            } else {
                format!("{message} (got {shown})")
            }
        }
        _ => message.to_owned(),
    }
}

fn count_nodes(value: &Value) -> usize {
    1 + match value {
        Value::Table(t) => t.values().map(count_nodes).sum(),
        Value::Array(a) => a.iter().map(count_nodes).sum(),
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;

    use super::*;

    #[derive(Debug, Default, PartialEq, Deserialize)]
    #[serde(default, deny_unknown_fields)]
    struct Root {
        a: Inner,
        list: Vec<Item>,
    }

    #[derive(Debug, Default, PartialEq, Deserialize)]
    #[serde(default, deny_unknown_fields)]
    struct Inner {
        n: u32,
        s: String,
    }

    #[derive(Debug, PartialEq, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Item {
        x: u32,
    }

    fn run(text: &str) -> (Option<Root>, Vec<(String, String)>) {
        let doc = Value::Table(toml::from_str(text).unwrap());
        let (value, problems) = decode::<Root>(doc, &[]);
        (
            value,
            problems
                .into_iter()
                .map(|p| (p.path.to_string(), p.reason))
                .collect(),
        )
    }

    #[test]
    fn every_problem_is_found_and_the_rest_still_decodes() {
        let (value, problems) = run("zz = 1\n[a]\nn = \"x\"\ns = \"ok\"\nq = 2\n");
        let keys: Vec<&str> = problems.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, ["a.n", "a.q", "zz"], "{problems:?}");
        assert_eq!(value.unwrap().a.s, "ok");
        assert!(
            problems[1].1.starts_with("unknown key; expected"),
            "{}",
            problems[1].1
        );
        assert!(problems[0].1.contains("expected u32"), "{}", problems[0].1);
    }

    #[test]
    fn array_problems_keep_the_index_of_the_file() {
        let text = "[[list]]\nx = 1\n[[list]]\ny = 2\n[[list]]\nx = 3\n[[list]]\nx = \"no\"\n";
        let (value, problems) = run(text);
        let keys: Vec<&str> = problems.iter().map(|(k, _)| k.as_str()).collect();
        // The emptied entries are dropped without a second `missing field` report.
        assert_eq!(keys, ["list[1].y", "list[3].x"], "{problems:?}");
        assert_eq!(value.unwrap().list, vec![Item { x: 1 }, Item { x: 3 }]);
    }

    #[test]
    fn a_missing_required_field_is_reported_at_its_table() {
        let (value, problems) = run("[[list]]\n");
        assert_eq!(
            problems,
            [("list[0]".to_owned(), "missing field `x`".to_owned())]
        );
        assert!(value.unwrap().list.is_empty());
    }

    #[test]
    fn a_wrong_table_type_is_one_problem() {
        let (value, problems) = run("a = 5\n");
        assert_eq!(problems.len(), 1);
        assert_eq!(problems[0].0, "a");
        assert_eq!(value.unwrap(), Root::default());
    }

    #[test]
    fn reasons_show_the_value_when_serde_does_not() {
        assert_eq!(
            describe(
                "invalid socket address syntax",
                Some(&Value::String("zz".into()))
            ),
            "invalid socket address syntax (got \"zz\")"
        );
        assert_eq!(
            describe(
                "invalid value: integer `-1`, expected u32",
                Some(&Value::Integer(-1))
            ),
            "invalid value: integer `-1`, expected u32"
        );
        assert_eq!(
            describe("unknown field `x`, there are no fields", None),
            "unknown key; this table takes no keys"
        );
        assert_eq!(
            describe("unknown variant `x`, expected `none` or `hmac`", None),
            "unknown value `x`, expected `none` or `hmac`"
        );
    }

    #[test]
    fn translate_skips_removed_indices() {
        let mut removed = HashMap::new();
        let list = KeyPath(vec![Seg::Key("list".into())]);
        removed.insert(list, vec![0, 2]);
        let here = KeyPath(vec![
            Seg::Key("list".into()),
            Seg::Index(1),
            Seg::Key("x".into()),
        ]);
        assert_eq!(translate(&here, &removed).to_string(), "list[3].x");
    }
}
