//! Key paths inside a TOML document (`notify.route[0].severity`): how problems
//! name a key, and how overrides and the decoder find a node.

use std::fmt;

use toml::Value;

/// One step down a TOML document.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum Seg {
    /// A key of a table.
    Key(String),
    /// An element of an array (of tables).
    Index(usize),
}

/// A whole path from the document root; prints as `a.b[0].c`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub(crate) struct KeyPath(pub(crate) Vec<Seg>);

impl fmt::Display for KeyPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, seg) in self.0.iter().enumerate() {
            match seg {
                Seg::Key(k) if i == 0 => write!(f, "{k}")?,
                Seg::Key(k) => write!(f, ".{k}")?,
                Seg::Index(n) => write!(f, "[{n}]")?,
            }
        }
        Ok(())
    }
}

impl KeyPath {
    /// The node at this path, if the document has one.
    pub(crate) fn get<'a>(&self, root: &'a Value) -> Option<&'a Value> {
        self.0.iter().try_fold(root, |node, seg| match (node, seg) {
            (Value::Table(t), Seg::Key(k)) => t.get(k),
            (Value::Array(a), Seg::Index(i)) => a.get(*i),
            _ => None,
        })
    }

    /// Mutable access to the node at this path, if the document has one.
    pub(crate) fn get_mut<'a>(&self, root: &'a mut Value) -> Option<&'a mut Value> {
        self.0.iter().try_fold(root, |node, seg| match (node, seg) {
            (Value::Table(t), Seg::Key(k)) => t.get_mut(k),
            (Value::Array(a), Seg::Index(i)) => a.get_mut(*i),
            _ => None,
        })
    }

    /// Takes the node at this path out of the document; false when there is none
    /// (or the path is the root, which cannot be removed).
    pub(crate) fn remove(&self, root: &mut Value) -> bool {
        let Some((last, parent)) = self.0.split_last() else {
            return false;
        };
        let parent = KeyPath(parent.to_vec());
        match (parent.get_mut(root), last) {
            (Some(Value::Table(t)), Seg::Key(k)) => t.remove(k).is_some(),
            (Some(Value::Array(a)), Seg::Index(i)) if *i < a.len() => {
                a.remove(*i);
                true
            }
            _ => false,
        }
    }
}

/// True when the dotted key `key` is `prefix` or names a node inside it.
pub(crate) fn key_within(key: &str, prefix: &str) -> bool {
    match key.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || rest.starts_with('.') || rest.starts_with('['),
        None => false,
    }
}

/// The TOML type of a value, as an operator reads it.
pub(crate) fn type_name(value: &Value) -> &'static str {
    match value {
        Value::String(_) => "string",
        Value::Integer(_) => "integer",
        Value::Float(_) => "float",
        Value::Boolean(_) => "boolean",
        Value::Datetime(_) => "datetime",
        Value::Array(_) => "array",
        Value::Table(_) => "table",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc() -> Value {
        Value::Table(toml::from_str("[a]\nb = 1\n[[r]]\nx = 1\n[[r]]\nx = 2\n").unwrap())
    }

    fn p(segs: &[Seg]) -> KeyPath {
        KeyPath(segs.to_vec())
    }

    #[test]
    fn display_uses_dots_and_brackets() {
        let path = p(&[Seg::Key("r".into()), Seg::Index(1), Seg::Key("x".into())]);
        assert_eq!(path.to_string(), "r[1].x");
        assert_eq!(KeyPath::default().to_string(), "");
    }

    #[test]
    fn get_and_remove_follow_tables_and_arrays() {
        let mut d = doc();
        let x1 = p(&[Seg::Key("r".into()), Seg::Index(1), Seg::Key("x".into())]);
        assert_eq!(x1.get(&d), Some(&Value::Integer(2)));
        assert!(p(&[Seg::Key("a".into()), Seg::Index(0)]).get(&d).is_none());
        assert!(p(&[Seg::Key("r".into()), Seg::Index(0)]).remove(&mut d));
        assert_eq!(
            p(&[Seg::Key("r".into()), Seg::Index(0), Seg::Key("x".into())]).get(&d),
            Some(&Value::Integer(2))
        );
        assert!(p(&[Seg::Key("a".into()), Seg::Key("b".into())]).remove(&mut d));
        assert!(!p(&[Seg::Key("a".into()), Seg::Key("b".into())]).remove(&mut d));
        assert!(!KeyPath::default().remove(&mut d));
    }

    #[test]
    fn key_within_respects_segment_boundaries() {
        assert!(key_within("limits.max_frame", "limits"));
        assert!(key_within("limits", "limits"));
        assert!(key_within("notify.route[0]", "notify.route"));
        assert!(!key_within("limitsx.y", "limits"));
    }
}
