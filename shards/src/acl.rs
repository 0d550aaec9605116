//! The access rules in force (`[acl]`) with their denial counters.
//!
//! One [`AclRules`] is built per configuration load and shared read-only by
//! every shard (through the router's settings). Each connection's view of
//! it (the rules that can apply to that client) is computed once, at hello,
//! and kept on the connection; per frame the router walks that short list.
//! Denials are counted per rule in `relay_acl_denied_total{rule}`, with
//! counters that keep their value across reloads for rules of the same name.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use relay_config::acl::AclConfig;
use relay_core::acl::Acl;

/// The label of denials by the default (no rule matched).
pub const DEFAULT_RULE: &str = "default";

/// The compiled rules and one denial counter per rule, then the default's.
#[derive(Debug, Default)]
pub struct AclRules {
    pub acl: Acl,
    /// Whether a rule looks at the client's groups.
    pub uses_groups: bool,
    names: Vec<String>,
    denied: Vec<Arc<AtomicU64>>,
}

impl AclRules {
    /// Compiles `cfg` (validated when the file loaded; a list that does not
    /// compile leaves no rule and is logged). Counters of `previous` carry
    /// over to rules of the same name.
    pub fn build(cfg: &AclConfig, previous: Option<&AclRules>) -> AclRules {
        let acl = cfg.compile().unwrap_or_else(|problems| {
            for (key, why) in problems {
                tracing::error!("{key}: {why}; the access rules are off");
            }
            Acl::default()
        });
        let mut names: Vec<String> = acl.rules().iter().map(|r| r.name.clone()).collect();
        names.push(DEFAULT_RULE.to_owned());
        let denied = names
            .iter()
            .map(|n| {
                previous
                    .and_then(|p| {
                        p.names
                            .iter()
                            .position(|m| m == n)
                            .map(|i| p.denied[i].clone())
                    })
                    .unwrap_or_default()
            })
            .collect();
        AclRules {
            uses_groups: acl.uses_groups(),
            acl,
            names,
            denied,
        }
    }

    /// The name of rule `rule` (`None`: the default).
    pub fn name(&self, rule: Option<u16>) -> &str {
        let i = rule.map_or(self.names.len() - 1, usize::from);
        self.names.get(i).map_or(DEFAULT_RULE, String::as_str)
    }

    /// Counts a denial by `rule` (`None`: the default).
    pub fn count_denied(&self, rule: Option<u16>) {
        let i = rule.map_or(self.denied.len() - 1, usize::from);
        if let Some(c) = self.denied.get(i) {
            c.fetch_add(1, Relaxed);
        }
    }

    /// Denials so far, per rule name (the default last).
    pub fn denied(&self) -> Vec<(&str, u64)> {
        self.names
            .iter()
            .zip(&self.denied)
            .map(|(n, c)| (n.as_str(), c.load(Relaxed)))
            .collect()
    }

    /// The `relay_acl_denied_total` family in the Prometheus text format.
    pub fn render(&self, out: &mut String) {
        let _ = writeln!(
            out,
            "# HELP relay_acl_denied_total Actions refused by the access rules, by rule (default: no rule matched).\n\
             # TYPE relay_acl_denied_total counter"
        );
        for (name, n) in self.denied() {
            let _ = writeln!(out, "relay_acl_denied_total{{rule=\"{name}\"}} {n}");
        }
    }
}
