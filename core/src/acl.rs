//! Access rules (`[acl]`): who may send to which addresses, join or publish
//! to which groups, and watch whom. Pure data and matching, no I/O.
//!
//! - A [`Rule`] says *who* (roles, how the client authenticated, its own
//!   address, groups it is a member of), *what* (actions) and *to which
//!   targets* (address or group patterns), and whether that is allowed or
//!   denied. Rules are tried in order; the first that matches decides
//!   (first match, like a firewall). When none matches, the default does.
//! - Everything about the client except its groups is known at hello, so
//!   [`Acl::view`] reduces the rule list once per connection to the few
//!   rules that can apply to it (a list of indices). Per frame,
//!   [`Acl::check`] walks only those, matching the target against glob
//!   patterns: no parsing, no allocation.
//! - Patterns are globs over names: `*` is any run of bytes (empty too),
//!   `?` exactly one; every other byte is itself (the address alphabet, and
//!   `$` for the relay's own names such as `$rules`).

use bytes::Bytes;

use crate::conn::Role;
use crate::name::{MAX_NAME_LEN, is_name_byte};

/// What a client does that a rule can allow or deny.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
#[non_exhaustive]
pub enum Action {
    /// DATA to an address (the target is the destination address).
    Send = 1,
    /// JOIN of a group (the target is the group).
    Join = 2,
    /// PUBLISH to a group (the target is the group).
    Publish = 4,
    /// JOIN of `watch:<addr>` (the target is the watched address).
    Watch = 8,
}

impl Action {
    pub const ALL: [Action; 4] = [Action::Send, Action::Join, Action::Publish, Action::Watch];

    /// The name used in the configuration.
    pub fn name(self) -> &'static str {
        match self {
            Action::Send => "send",
            Action::Join => "join",
            Action::Publish => "publish",
            Action::Watch => "watch",
        }
    }

    pub fn from_name(s: &str) -> Option<Action> {
        Action::ALL.into_iter().find(|a| a.name() == s)
    }

    fn bit(self) -> u8 {
        self as u8
    }
}

/// How a client proved who it is (at hello).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[repr(u8)]
#[non_exhaustive]
pub enum Auth {
    /// Nothing: the relay runs without authentication (`[auth] mode = "none"`).
    #[default]
    None = 0,
    /// A device token (HMAC of its address).
    Token = 1,
    /// The service (HTTP API) token, in a hello or on an API call.
    ServiceToken = 2,
    /// A verified client certificate (mutual TLS).
    Certificate = 3,
}

impl Auth {
    pub const ALL: [Auth; 4] = [
        Auth::None,
        Auth::Token,
        Auth::ServiceToken,
        Auth::Certificate,
    ];

    /// The name used in the configuration.
    pub fn name(self) -> &'static str {
        match self {
            Auth::None => "none",
            Auth::Token => "token",
            Auth::ServiceToken => "service_token",
            Auth::Certificate => "certificate",
        }
    }

    pub fn from_name(s: &str) -> Option<Auth> {
        Auth::ALL.into_iter().find(|a| a.name() == s)
    }

    fn bit(self) -> u8 {
        1 << self as u8
    }
}

/// Who a rule names: a protocol role, or `api` (calls to the HTTP API).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Who {
    Role(Role),
    /// The HTTP API (pushes made with the API token).
    Api,
}

impl Who {
    /// Every name a rule's `roles` may hold.
    pub const NAMES: [&'static str; 5] = ["controller", "browser", "tool", "service", "api"];

    pub fn from_name(s: &str) -> Option<Who> {
        if s == "api" {
            return Some(Who::Api);
        }
        Role::from_name(s).map(Who::Role)
    }

    fn bit(self) -> u8 {
        match self {
            Who::Role(r) => 1 << (r as u8),
            Who::Api => 1 << 4,
        }
    }
}

/// A glob over names: `*` any run, `?` one byte, anything else itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern(Box<[u8]>);

impl Pattern {
    /// Parses a pattern; the error says what is wrong with it.
    pub fn parse(s: &str) -> Result<Pattern, String> {
        if s.is_empty() {
            return Err("is empty; use \"*\" for any name".into());
        }
        if let Some(c) = s.chars().find(|&c| {
            !(c == '*' || c == '?' || c == '$' || (c.is_ascii() && is_name_byte(c as u8)))
        }) {
            return Err(format!(
                "{s:?} holds {c:?}; a pattern is made of A-Z a-z 0-9 . _ : @ - $ and the wildcards * and ?"
            ));
        }
        let fixed = s.bytes().filter(|&b| b != b'*').count();
        if fixed > MAX_NAME_LEN {
            return Err(format!(
                "{s:?} can only match names longer than {MAX_NAME_LEN} bytes"
            ));
        }
        Ok(Pattern(s.as_bytes().into()))
    }

    /// Whether `name` matches. Linear in `name` for each star (greedy with
    /// one backtrack point), so a pattern never costs more than a few
    /// passes over a 64-byte name.
    pub fn matches(&self, name: &[u8]) -> bool {
        let p = &self.0;
        let (mut i, mut j) = (0, 0);
        let mut star: Option<(usize, usize)> = None;
        while j < name.len() {
            if i < p.len() && (p[i] == b'?' || p[i] == name[j]) {
                i += 1;
                j += 1;
            } else if i < p.len() && p[i] == b'*' {
                star = Some((i, j));
                i += 1;
            } else if let Some((si, sj)) = star {
                i = si + 1;
                j = sj + 1;
                star = Some((si, sj + 1));
            } else {
                return false;
            }
        }
        p[i..].iter().all(|&b| b == b'*')
    }

    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0).unwrap_or("")
    }
}

/// One access rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// Named in metrics (`relay_acl_denied_total{rule=…}`) and in the ERROR.
    pub name: String,
    /// Allow (true) or deny what it matches.
    pub allow: bool,
    /// Bits of [`Action`]; 0 never matches.
    actions: u8,
    /// Bits of [`Who`]; 0 is any.
    roles: u8,
    /// Bits of [`Auth`]; 0 is any.
    auths: u8,
    /// The client's own address; empty is any.
    from: Vec<Pattern>,
    /// Groups the client is a member of (one match is enough); empty is any.
    member_of: Vec<Pattern>,
    /// The target (address, group, or watched address); empty is any.
    to: Vec<Pattern>,
}

impl Rule {
    /// A rule that allows or denies `actions` to anyone, for any target;
    /// narrow it with the `with_*` methods.
    pub fn new(name: impl Into<String>, allow: bool, actions: &[Action]) -> Rule {
        Rule {
            name: name.into(),
            allow,
            actions: actions.iter().fold(0, |m, a| m | a.bit()),
            roles: 0,
            auths: 0,
            from: Vec::new(),
            member_of: Vec::new(),
            to: Vec::new(),
        }
    }

    pub fn with_roles(mut self, roles: &[Who]) -> Rule {
        self.roles = roles.iter().fold(0, |m, r| m | r.bit());
        self
    }

    pub fn with_auth(mut self, auths: &[Auth]) -> Rule {
        self.auths = auths.iter().fold(0, |m, a| m | a.bit());
        self
    }

    pub fn with_from(mut self, from: Vec<Pattern>) -> Rule {
        self.from = from;
        self
    }

    pub fn with_member_of(mut self, groups: Vec<Pattern>) -> Rule {
        self.member_of = groups;
        self
    }

    pub fn with_to(mut self, to: Vec<Pattern>) -> Rule {
        self.to = to;
        self
    }

    /// Whether the rule can apply to `who` at all (everything but groups
    /// and the target is known at hello).
    fn applies_to(&self, who: &Subject<'_>) -> bool {
        (self.roles == 0 || self.roles & who.who.bit() != 0)
            && (self.auths == 0 || self.auths & who.auth.bit() != 0)
            && (self.from.is_empty() || self.from.iter().any(|p| p.matches(who.addr)))
    }

    fn matches(&self, action: Action, target: &[u8], groups: &[Bytes]) -> bool {
        self.actions & action.bit() != 0
            && (self.to.is_empty() || self.to.iter().any(|p| p.matches(target)))
            && (self.member_of.is_empty()
                || groups
                    .iter()
                    .any(|g| self.member_of.iter().any(|p| p.matches(g))))
    }
}

/// A client as the rules see it.
#[derive(Debug, Clone, Copy)]
pub struct Subject<'a> {
    pub who: Who,
    pub auth: Auth,
    /// Its address (for an API call: the message's src, `$api` by default).
    pub addr: &'a [u8],
}

/// What the rules decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Allowed: by rule `Some(index)`, or by the default.
    Allow(Option<u16>),
    /// Denied: by rule `Some(index)`, or by the default.
    Deny(Option<u16>),
}

/// The rule list in force.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Acl {
    rules: Vec<Rule>,
    default_allow: bool,
}

impl Default for Acl {
    /// No rules, everything allowed.
    fn default() -> Acl {
        Acl::new(Vec::new(), true)
    }
}

impl Acl {
    /// Most rules a list holds (a view indexes them with `u16`).
    pub const MAX_RULES: usize = 4096;

    pub fn new(mut rules: Vec<Rule>, default_allow: bool) -> Acl {
        rules.truncate(Self::MAX_RULES);
        Acl {
            rules,
            default_allow,
        }
    }

    /// No rules and a default of allow: nothing to check.
    pub fn is_open(&self) -> bool {
        self.rules.is_empty() && self.default_allow
    }

    pub fn default_allow(&self) -> bool {
        self.default_allow
    }

    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// Whether any rule looks at the client's groups (then the caller
    /// passes them to `check`).
    pub fn uses_groups(&self) -> bool {
        self.rules.iter().any(|r| !r.member_of.is_empty())
    }

    /// The rules that can apply to `who`, in order: computed once per
    /// connection (at hello), then passed to every `check`.
    pub fn view(&self, who: &Subject<'_>) -> Vec<u16> {
        self.rules
            .iter()
            .enumerate()
            .filter(|(_, r)| r.applies_to(who))
            .map(|(i, _)| i as u16)
            .collect()
    }

    /// Decides `action` on `target` for a client whose view is `view` and
    /// whose groups are `groups` (only read when a rule names groups).
    pub fn check(&self, view: &[u16], action: Action, target: &[u8], groups: &[Bytes]) -> Verdict {
        for &i in view {
            let Some(r) = self.rules.get(i as usize) else {
                continue;
            };
            if r.matches(action, target, groups) {
                return if r.allow {
                    Verdict::Allow(Some(i))
                } else {
                    Verdict::Deny(Some(i))
                };
            }
        }
        if self.default_allow {
            Verdict::Allow(None)
        } else {
            Verdict::Deny(None)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn p(s: &str) -> Pattern {
        Pattern::parse(s).unwrap()
    }

    #[test]
    fn patterns_match_globs() {
        assert!(p("sensor-*").matches(b"sensor-1"));
        assert!(p("sensor-*").matches(b"sensor-"));
        assert!(!p("sensor-*").matches(b"sensor"));
        assert!(p("*-42").matches(b"ctl-8266-42"));
        assert!(p("ctl-?").matches(b"ctl-7"));
        assert!(!p("ctl-?").matches(b"ctl-77"));
        assert!(p("a*b*c").matches(b"aXXbYYbc"));
        assert!(!p("a*b*c").matches(b"aXXbYY"));
        assert!(p("*").matches(b"anything"));
        assert!(p("$rules").matches(b"$rules"));
        assert!(!p("room-1").matches(b"room-10"));
    }

    #[test]
    fn bad_patterns_say_why() {
        assert!(Pattern::parse("").unwrap_err().contains("empty"));
        assert!(Pattern::parse("sen sor").unwrap_err().contains("' '"));
        assert!(Pattern::parse("a/b").unwrap_err().contains("'/'"));
        assert!(Pattern::parse(&"x".repeat(65)).is_err());
        assert!(Pattern::parse(&format!("{}*", "x".repeat(64))).is_ok());
    }

    fn subject(who: Who, auth: Auth, addr: &str) -> (Who, Auth, String) {
        (who, auth, addr.to_owned())
    }

    #[test]
    fn first_match_decides_and_the_default_follows() {
        let acl = Acl::new(
            vec![
                Rule::new("sensors-to-collectors", true, &[Action::Send])
                    .with_from(vec![p("sensor-*")])
                    .with_to(vec![p("collector-*")]),
                Rule::new("sensors-nothing-else", false, &Action::ALL)
                    .with_from(vec![p("sensor-*")]),
                Rule::new("browsers-rooms", true, &[Action::Join, Action::Publish])
                    .with_roles(&[Who::Role(Role::Browser)])
                    .with_to(vec![p("room-*")]),
                Rule::new("certified-anything", true, &Action::ALL).with_auth(&[Auth::Certificate]),
            ],
            false,
        );
        let (w, a, addr) = subject(Who::Role(Role::Controller), Auth::Token, "sensor-1");
        let s = Subject {
            who: w,
            auth: a,
            addr: addr.as_bytes(),
        };
        let v = acl.view(&s);
        assert_eq!(v, [0, 1]);
        assert_eq!(
            acl.check(&v, Action::Send, b"collector-a", &[]),
            Verdict::Allow(Some(0))
        );
        assert_eq!(
            acl.check(&v, Action::Send, b"other", &[]),
            Verdict::Deny(Some(1))
        );

        let b = Subject {
            who: Who::Role(Role::Browser),
            auth: Auth::Token,
            addr: b"web-1",
        };
        let v = acl.view(&b);
        assert_eq!(v, [2]);
        assert_eq!(
            acl.check(&v, Action::Join, b"room-9", &[]),
            Verdict::Allow(Some(2))
        );
        assert_eq!(
            acl.check(&v, Action::Send, b"room-9", &[]),
            Verdict::Deny(None)
        );

        let c = Subject {
            who: Who::Role(Role::Controller),
            auth: Auth::Certificate,
            addr: b"dev-1",
        };
        assert_eq!(
            acl.check(&acl.view(&c), Action::Watch, b"x", &[]),
            Verdict::Allow(Some(3))
        );
        let api = Subject {
            who: Who::Api,
            auth: Auth::ServiceToken,
            addr: b"$api",
        };
        assert!(acl.view(&api).is_empty());
    }

    #[test]
    fn group_membership_is_read_per_check() {
        let acl = Acl::new(
            vec![Rule::new("staff-send", true, &[Action::Send]).with_member_of(vec![p("staff")])],
            false,
        );
        assert!(acl.uses_groups());
        let s = Subject {
            who: Who::Role(Role::Tool),
            auth: Auth::None,
            addr: b"t-1",
        };
        let v = acl.view(&s);
        assert_eq!(acl.check(&v, Action::Send, b"x", &[]), Verdict::Deny(None));
        let groups = [Bytes::from_static(b"room-1"), Bytes::from_static(b"staff")];
        assert_eq!(
            acl.check(&v, Action::Send, b"x", &groups),
            Verdict::Allow(Some(0))
        );
    }

    #[test]
    fn names_round_trip() {
        for a in Action::ALL {
            assert_eq!(Action::from_name(a.name()), Some(a));
        }
        for a in Auth::ALL {
            assert_eq!(Auth::from_name(a.name()), Some(a));
        }
        for n in Who::NAMES {
            assert!(Who::from_name(n).is_some(), "{n}");
        }
        assert_eq!(Who::from_name("device"), None);
        assert!(Acl::default().is_open());
    }

    /// A reference matcher: the obvious recursive definition of a glob.
    fn reference(p: &[u8], n: &[u8]) -> bool {
        match (p.first(), n.first()) {
            (None, _) => n.is_empty(),
            (Some(b'*'), _) => reference(&p[1..], n) || (!n.is_empty() && reference(p, &n[1..])),
            (Some(_), None) => false,
            (Some(&c), Some(&d)) => (c == b'?' || c == d) && reference(&p[1..], &n[1..]),
        }
    }

    proptest! {
        #[test]
        fn matching_agrees_with_the_reference(
            pat in "[ab*?]{1,8}",
            name in "[ab]{0,12}",
        ) {
            let got = Pattern::parse(&pat).unwrap().matches(name.as_bytes());
            prop_assert_eq!(got, reference(pat.as_bytes(), name.as_bytes()));
        }
    }
}
