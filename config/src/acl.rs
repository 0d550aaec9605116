//! `[acl]`: access rules, as written in the file, and their compilation into
//! the rule list the relay checks ([`relay_core::acl::Acl`]). Compiling is
//! also the validation: every bad pattern, unknown role, authentication or
//! action becomes one problem with its key, and all are reported together.

use relay_core::acl::{Acl, Action, Auth, Pattern, Rule, Who};
use serde::{Deserialize, Serialize};

/// What happens to an action no rule matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum AclEffect {
    /// Let it through.
    #[default]
    Allow,
    /// Refuse it with ERROR `forbidden`.
    Deny,
}

/// `[acl]`: who may send to which addresses, join or publish to which
/// groups, and watch whom (docs/acl.md).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AclConfig {
    /// What an action no rule matches gets: `allow` (the default, so a
    /// configuration without rules behaves as before) or `deny`.
    pub default: AclEffect,
    /// The rules, tried in order: the first that matches decides.
    pub rule: Vec<AclRuleConfig>,
}

/// One `[[acl.rule]]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AclRuleConfig {
    /// Names the rule in `relay_acl_denied_total{rule=…}` and in the ERROR
    /// message; `rule-<index>` when absent. Unique.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// `allow` or `deny` what the rule matches. (Text, checked when the
    /// rules compile, so a wrong value is reported with the rule's index in
    /// the file like every other problem of the rule.)
    #[serde(default)]
    pub effect: String,
    /// `send`, `join`, `publish`, `watch`, or `*` for all of them.
    #[serde(default)]
    pub actions: Vec<String>,
    /// Roles the rule applies to: `controller`, `browser`, `tool`,
    /// `service`, `api` (HTTP API calls); empty: any.
    #[serde(default)]
    pub roles: Vec<String>,
    /// How the client authenticated: `certificate`, `token`,
    /// `service_token`, `none`; empty: any.
    #[serde(default)]
    pub auth: Vec<String>,
    /// Patterns of the client's own address; empty: any.
    #[serde(default)]
    pub from: Vec<String>,
    /// Patterns of groups the client is a member of (one is enough); empty: any.
    #[serde(default)]
    pub member_of: Vec<String>,
    /// Patterns of the target: the destination address (`send`), the group
    /// (`join`, `publish`) or the watched address (`watch`); empty: any.
    #[serde(default)]
    pub to: Vec<String>,
}

impl AclConfig {
    /// The rule list the relay checks, or every problem as (key, reason).
    pub fn compile(&self) -> Result<Acl, Vec<(String, String)>> {
        let mut problems = Vec::new();
        let mut rules = Vec::new();
        if self.rule.len() > Acl::MAX_RULES {
            problems.push((
                "acl.rule".to_owned(),
                format!(
                    "holds {} rules, at most {} are allowed",
                    self.rule.len(),
                    Acl::MAX_RULES
                ),
            ));
        }
        let mut names: Vec<String> = Vec::new();
        for (i, r) in self.rule.iter().enumerate() {
            let key = |field: &str| format!("acl.rule[{i}].{field}");
            let name = r.name.clone().unwrap_or_else(|| format!("rule-{i}"));
            if name.is_empty()
                || name.len() > 64
                || !name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
            {
                problems.push((
                    key("name"),
                    format!("{name:?} must be 1-64 bytes of A-Z a-z 0-9 - _ . :"),
                ));
            } else if names.contains(&name) {
                problems.push((
                    key("name"),
                    format!("{name:?} names an earlier rule too; names are unique"),
                ));
            }
            names.push(name.clone());

            let allow = match r.effect.as_str() {
                "allow" => true,
                "deny" => false,
                other => {
                    problems.push((
                        key("effect"),
                        format!("is {other:?}, must be \"allow\" or \"deny\""),
                    ));
                    false
                }
            };
            let mut actions = Vec::new();
            if r.actions.is_empty() {
                problems.push((
                    key("actions"),
                    "is empty; name send, join, publish, watch, or \"*\"".to_owned(),
                ));
            }
            for (j, a) in r.actions.iter().enumerate() {
                match a.as_str() {
                    "*" => actions.extend(Action::ALL),
                    s => match Action::from_name(s) {
                        Some(a) => actions.push(a),
                        None => problems.push((
                            format!("acl.rule[{i}].actions[{j}]"),
                            format!(
                                "unknown action {s:?}; expected send, join, publish, watch or \"*\""
                            ),
                        )),
                    },
                }
            }
            let mut roles = Vec::new();
            for (j, s) in r.roles.iter().enumerate() {
                match Who::from_name(s) {
                    Some(w) => roles.push(w),
                    None => problems.push((
                        format!("acl.rule[{i}].roles[{j}]"),
                        format!(
                            "unknown role {s:?}; expected one of {}",
                            Who::NAMES.join(", ")
                        ),
                    )),
                }
            }
            let mut auths = Vec::new();
            for (j, s) in r.auth.iter().enumerate() {
                match Auth::from_name(s) {
                    Some(a) => auths.push(a),
                    None => problems.push((
                        format!("acl.rule[{i}].auth[{j}]"),
                        format!(
                            "unknown authentication {s:?}; expected certificate, token, service_token or none"
                        ),
                    )),
                }
            }
            let mut patterns = |field: &str, list: &[String]| -> Vec<Pattern> {
                let mut out = Vec::new();
                for (j, s) in list.iter().enumerate() {
                    match Pattern::parse(s) {
                        Ok(p) => out.push(p),
                        Err(why) => problems.push((format!("acl.rule[{i}].{field}[{j}]"), why)),
                    }
                }
                out
            };
            let from = patterns("from", &r.from);
            let member_of = patterns("member_of", &r.member_of);
            let to = patterns("to", &r.to);
            rules.push(
                Rule::new(name, allow, &actions)
                    .with_roles(&roles)
                    .with_auth(&auths)
                    .with_from(from)
                    .with_member_of(member_of)
                    .with_to(to),
            );
        }
        if problems.is_empty() {
            Ok(Acl::new(rules, self.default == AclEffect::Allow))
        } else {
            Err(problems)
        }
    }

    /// Problems as (key, reason), for validation.
    pub fn check(&self) -> Vec<(String, String)> {
        self.compile().err().unwrap_or_default()
    }
}
