//! What is wrong with a configuration: one `Problem` per wrong key, gathered
//! into a `ConfigError` so an operator sees every mistake in one run.

use std::fmt;

/// One thing wrong with the configuration: where it came from, which key, and why.
///
/// Section validators may leave `file` empty (`Problem::at`); the loader fills
/// it in with the file name, or with `env RELAY__…` when the key was set by an
/// environment override.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Problem {
    /// The file the key came from (`config/relay.toml`), the embedded defaults,
    /// or `env RELAY__SECTION__KEY` for an environment override.
    pub file: String,
    /// Dotted path of the key (`limits.max_frame`, `notify.route[0].severity`);
    /// empty when the problem is with the whole document (syntax, unreadable file).
    pub key: String,
    /// Why the value was refused, in words an operator can act on.
    pub reason: String,
}

impl Problem {
    /// A problem with a known origin.
    pub fn new(file: impl Into<String>, key: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            file: file.into(),
            key: key.into(),
            reason: reason.into(),
        }
    }

    /// A problem at `key` whose origin the loader fills in.
    pub fn at(key: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::new(String::new(), key, reason)
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let file = if self.file.is_empty() {
            "<config>"
        } else {
            &self.file
        };
        if self.key.is_empty() {
            write!(f, "{file}: {}", self.reason)
        } else {
            write!(f, "{file}: {}: {}", self.key, self.reason)
        }
    }
}

/// Every problem found in one configuration; never empty when returned as an error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// Problems that stop decoding (unknown keys, wrong types) in key order,
    /// then broken rules (ranges, keys that must agree).
    pub problems: Vec<Problem>,
}

impl ConfigError {
    /// `Ok(())` when there is nothing to report.
    pub fn check(problems: Vec<Problem>) -> Result<(), ConfigError> {
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError { problems })
        }
    }

    /// The problem reported for `key`, if any (handy in tests and tooling).
    pub fn find(&self, key: &str) -> Option<&Problem> {
        self.problems.iter().find(|p| p.key == key)
    }
}

/// One line per problem: `file: key: reason`.
impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, problem) in self.problems.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            // A reason never spans lines, so each problem stays one line.
            write!(f, "{}", problem.to_string().replace('\n', " "))?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_is_one_line_per_problem() {
        let err = ConfigError {
            problems: vec![
                Problem::new("relay.toml", "limits.max_frame", "must be at least 9"),
                Problem::new("relay.toml", "", "TOML syntax error\nat line 3"),
                Problem::at("auth.secret", "must not be empty"),
            ],
        };
        let text = err.to_string();
        assert_eq!(
            text,
            "relay.toml: limits.max_frame: must be at least 9\n\
             relay.toml: TOML syntax error at line 3\n\
             <config>: auth.secret: must not be empty"
        );
        assert_eq!(
            err.find("auth.secret").map(|p| p.reason.as_str()),
            Some("must not be empty")
        );
        assert!(err.find("nope").is_none());
    }

    #[test]
    fn check_is_ok_only_without_problems() {
        assert_eq!(ConfigError::check(Vec::new()), Ok(()));
        let err = ConfigError::check(vec![Problem::at("k", "r")]).unwrap_err();
        assert_eq!(err.problems.len(), 1);
    }
}
