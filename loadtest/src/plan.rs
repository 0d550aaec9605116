//! The fleet of a scenario as a numbered list of clients. Client `i` is computed from
//! the scenario alone, so every worker process derives the same addresses and takes
//! its own contiguous range without the list crossing a pipe.
//!
//! Names: controllers `<prefix>-c<n>`, browsers `<prefix>-b<n>`, fan-out groups
//! `<prefix>-g<n>`, telemetry groups (several browsers per controller) `<prefix>-t<n>`.

use std::ops::Range;

use crate::scenario::{Pattern, Scenario};
use crate::stats::Receipt;

/// Which kind of client, and so which endpoint it connects to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// A device on TCP (relay) or an MQTT client.
    Controller,
    /// A web page on WebSocket (relay) or an MQTT client.
    Browser,
}

impl Side {
    /// The role named in the hello.
    pub fn role(&self) -> &'static str {
        match self {
            Side::Controller => "controller",
            Side::Browser => "browser",
        }
    }
}

/// What a sending client sends to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendSpec {
    /// Destination address or group name.
    pub to: String,
    /// True when `to` is a group.
    pub group: bool,
    /// Clients each message should reach (loss accounting).
    pub recipients: u64,
    /// This sender's position among all senders (spreads send phases).
    pub slot: u64,
    /// Number of senders.
    pub slots: u64,
}

/// One simulated client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientSpec {
    /// Position in the fleet (0-based, unique).
    pub index: u64,
    /// Controller or browser.
    pub side: Side,
    /// The client's address.
    pub addr: String,
    /// Data this client sends at the step rate, if any.
    pub send: Option<SendSpec>,
    /// Groups joined before the run.
    pub joins: Vec<String>,
    /// Command controllers reply to this address with the command's stamp.
    pub echo_to: Option<String>,
    /// How this client records what it receives.
    pub receipt: Receipt,
    /// Receives messages sent to its address (MQTT subscribes to its inbox topic).
    pub inbox: bool,
    /// Which target (node) it connects to: its position modulo the targets.
    pub target: usize,
}

/// How a fleet lies over several targets.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Spread {
    /// Clients per target, in the order of the targets.
    pub clients: Vec<u64>,
    /// Sender → recipient pairs of the fleet (a group message to `k` members is
    /// `k` pairs).
    pub pairs: u64,
    /// Pairs whose sender and recipient are on different targets.
    pub cross: u64,
}

/// A scenario's fleet under a name prefix.
#[derive(Debug, Clone)]
pub struct Plan {
    pattern: Pattern,
    prefix: String,
    controllers: u64,
    browsers_per: u64,
    groups: u64,
    members: u64,
    dashboards: u64,
    /// The target echoes bytes back: every controller sends to itself.
    echo: bool,
    /// Targets the clients are spread over, round-robin by position.
    targets: u64,
}

impl Plan {
    /// The fleet of `s` with names under `prefix`.
    pub fn new(s: &Scenario, prefix: &str) -> Self {
        Self {
            pattern: s.pattern,
            prefix: prefix.to_string(),
            controllers: s.load.controllers as u64,
            browsers_per: s.load.browsers_per_controller.max(1) as u64,
            groups: s.load.groups.max(1) as u64,
            members: s.load.members as u64,
            dashboards: s.load.dashboards.max(1) as u64,
            echo: s.is_echo(),
            targets: s.targets().max(1) as u64,
        }
    }

    /// The target client `i` connects to.
    pub fn target_of(&self, i: u64) -> usize {
        (i % self.targets) as usize
    }

    /// Clients per target and the pairs that cross targets, over the whole fleet.
    pub fn spread(&self) -> Spread {
        let n = self.count();
        let mut s = Spread {
            clients: vec![0; self.targets as usize],
            ..Spread::default()
        };
        for i in 0..n {
            s.clients[self.target_of(i)] += 1;
        }
        let mut pair = |from: u64, to: u64| {
            s.pairs += 1;
            if self.target_of(from) != self.target_of(to) {
                s.cross += 1;
            }
        };
        if self.echo {
            for i in 0..n {
                pair(i, i);
            }
            return s;
        }
        match self.pattern {
            Pattern::Telemetry | Pattern::Fanout => {
                let (units, per) = match self.pattern {
                    Pattern::Telemetry => (self.controllers, self.browsers_per),
                    _ => (self.groups, self.members),
                };
                for u in 0..units {
                    let from = u * (1 + per);
                    for j in 1..=per {
                        pair(from, from + j);
                    }
                }
            }
            // A browser's command and the controller's reply.
            Pattern::Command => {
                for u in 0..self.controllers {
                    pair(2 * u, 2 * u + 1);
                    pair(2 * u + 1, 2 * u);
                }
            }
            Pattern::Fanin => {
                for c in 0..self.controllers {
                    pair(self.dashboards + c, c % self.dashboards);
                }
            }
            Pattern::Idle | Pattern::Storm => {}
        }
        s
    }

    /// Number of clients.
    pub fn count(&self) -> u64 {
        if self.echo {
            return self.controllers;
        }
        match self.pattern {
            Pattern::Telemetry => self.controllers * (1 + self.browsers_per),
            Pattern::Command => self.controllers * 2,
            Pattern::Fanout => self.groups * (1 + self.members),
            Pattern::Fanin => self.dashboards + self.controllers,
            Pattern::Idle | Pattern::Storm => self.controllers,
        }
    }

    /// The clients worker `worker` of `workers` runs (contiguous, sizes differ by ≤ 1).
    pub fn range(&self, worker: u32, workers: u32) -> Range<u64> {
        let n = self.count();
        let w = workers.max(1) as u64;
        let k = (worker as u64).min(w);
        (n * k / w)..(n * (k + 1) / w)
    }

    fn ctl(&self, n: u64) -> String {
        format!("{}-c{n}", self.prefix)
    }

    fn br(&self, n: u64) -> String {
        format!("{}-b{n}", self.prefix)
    }

    fn base(&self, index: u64, side: Side, addr: String) -> ClientSpec {
        ClientSpec {
            index,
            side,
            addr,
            send: None,
            joins: Vec::new(),
            echo_to: None,
            receipt: Receipt::Measure,
            inbox: false,
            target: self.target_of(index),
        }
    }

    /// Fleet units (what `--find-max fleet` counts): controllers, or groups for fanout.
    pub fn units(&self) -> u64 {
        match self.pattern {
            Pattern::Fanout => self.groups,
            _ => self.controllers,
        }
    }

    /// The unit client `i` belongs to: a fleet of `n` units is the clients whose unit
    /// is below `n` (a controller with its browsers; fan-in dashboards are unit 0).
    pub fn unit_of(&self, i: u64) -> u64 {
        if self.echo {
            return i;
        }
        match self.pattern {
            Pattern::Telemetry => i / (1 + self.browsers_per),
            Pattern::Command => i / 2,
            Pattern::Fanout => i / (1 + self.members),
            Pattern::Fanin => i.saturating_sub(self.dashboards),
            Pattern::Idle | Pattern::Storm => i,
        }
    }

    /// Clients of a fleet of the first `units` units.
    pub fn clients_in(&self, units: u64) -> u64 {
        let u = units.min(self.units());
        if self.echo {
            return u;
        }
        match self.pattern {
            Pattern::Telemetry => u * (1 + self.browsers_per),
            Pattern::Command => u * 2,
            Pattern::Fanout => u * (1 + self.members),
            Pattern::Fanin => self.dashboards + u,
            Pattern::Idle | Pattern::Storm => u,
        }
    }

    /// Client `i` (`i < count()`).
    pub fn client(&self, i: u64) -> ClientSpec {
        if self.echo {
            let mut c = self.base(i, Side::Controller, self.ctl(i));
            c.send = Some(SendSpec {
                to: self.ctl(i),
                group: false,
                recipients: 1,
                slot: i,
                slots: self.controllers,
            });
            return c;
        }
        match self.pattern {
            Pattern::Telemetry => {
                let unit = 1 + self.browsers_per;
                let (u, j) = (i / unit, i % unit);
                let tgroup = format!("{}-t{u}", self.prefix);
                if j == 0 {
                    let mut c = self.base(i, Side::Controller, self.ctl(u));
                    let single = self.browsers_per == 1;
                    c.send = Some(SendSpec {
                        to: if single { self.br(u) } else { tgroup },
                        group: !single,
                        recipients: self.browsers_per,
                        slot: u,
                        slots: self.controllers,
                    });
                    c
                } else {
                    let mut b = self.base(i, Side::Browser, self.br(u * self.browsers_per + j - 1));
                    if self.browsers_per == 1 {
                        b.inbox = true;
                    } else {
                        b.joins.push(tgroup);
                    }
                    b
                }
            }
            Pattern::Command => {
                let (u, j) = (i / 2, i % 2);
                if j == 0 {
                    let mut b = self.base(i, Side::Browser, self.br(u));
                    b.send = Some(SendSpec {
                        to: self.ctl(u),
                        group: false,
                        recipients: 1,
                        slot: u,
                        slots: self.controllers,
                    });
                    b.inbox = true;
                    b
                } else {
                    let mut c = self.base(i, Side::Controller, self.ctl(u));
                    c.echo_to = Some(self.br(u));
                    c.receipt = Receipt::CountOnly;
                    c.inbox = true;
                    c
                }
            }
            Pattern::Fanout => {
                let unit = 1 + self.members;
                let (g, j) = (i / unit, i % unit);
                let group = format!("{}-g{g}", self.prefix);
                if j == 0 {
                    let mut c = self.base(i, Side::Controller, self.ctl(g));
                    c.send = Some(SendSpec {
                        to: group,
                        group: true,
                        recipients: self.members,
                        slot: g,
                        slots: self.groups,
                    });
                    c
                } else {
                    let mut b = self.base(i, Side::Browser, self.br(g * self.members + j - 1));
                    b.joins.push(group);
                    b
                }
            }
            Pattern::Fanin => {
                if i < self.dashboards {
                    let mut b = self.base(i, Side::Browser, self.br(i));
                    b.inbox = true;
                    b
                } else {
                    let c = i - self.dashboards;
                    let mut s = self.base(i, Side::Controller, self.ctl(c));
                    s.send = Some(SendSpec {
                        to: self.br(c % self.dashboards),
                        group: false,
                        recipients: 1,
                        slot: c,
                        slots: self.controllers,
                    });
                    s
                }
            }
            Pattern::Idle | Pattern::Storm => self.base(i, Side::Controller, self.ctl(i)),
        }
    }

    /// Connections per side: (controllers, browsers).
    pub fn sides(&self) -> (u64, u64) {
        if self.echo {
            return (self.controllers, 0);
        }
        match self.pattern {
            Pattern::Telemetry => (self.controllers, self.controllers * self.browsers_per),
            Pattern::Command => (self.controllers, self.controllers),
            Pattern::Fanout => (self.groups, self.groups * self.members),
            Pattern::Fanin => (self.controllers, self.dashboards),
            Pattern::Idle | Pattern::Storm => (self.controllers, 0),
        }
    }
}

#[cfg(test)]
// Tests build values field by field from the defaults, which reads clearer here.
#[allow(clippy::field_reassign_with_default)]
mod tests {
    use super::*;
    use std::collections::{HashMap, HashSet};

    fn scenario(p: Pattern) -> Scenario {
        let mut s = Scenario::default();
        s.pattern = p;
        s.load.controllers = 5;
        s.load.browsers_per_controller = 1;
        s.load.groups = 2;
        s.load.members = 3;
        s.load.dashboards = 2;
        s
    }

    fn all(p: &Plan) -> Vec<ClientSpec> {
        (0..p.count()).map(|i| p.client(i)).collect()
    }

    #[test]
    fn every_message_destination_is_a_client_of_the_plan() {
        for pattern in Pattern::ALL {
            for k in [1, 3] {
                let mut s = scenario(pattern);
                s.load.browsers_per_controller = k;
                let plan = Plan::new(&s, "lt");
                let clients = all(&plan);
                let addrs: HashSet<&str> = clients.iter().map(|c| c.addr.as_str()).collect();
                assert_eq!(
                    addrs.len(),
                    clients.len(),
                    "{pattern}: addresses are unique"
                );
                let (ctl, br) = plan.sides();
                assert_eq!(ctl + br, plan.count());
                assert_eq!(
                    clients.iter().filter(|c| c.side == Side::Browser).count() as u64,
                    br
                );
                // Members per group, to check each publish's recipient count.
                let mut members: HashMap<&str, u64> = HashMap::new();
                for c in &clients {
                    for g in &c.joins {
                        *members.entry(g.as_str()).or_default() += 1;
                    }
                }
                for c in &clients {
                    if let Some(s) = &c.send {
                        if s.group {
                            assert_eq!(
                                members.get(s.to.as_str()),
                                Some(&s.recipients),
                                "{pattern}"
                            );
                        } else {
                            assert!(addrs.contains(s.to.as_str()), "{pattern}: {} unknown", s.to);
                            assert_eq!(s.recipients, 1);
                            let dst = clients.iter().find(|d| d.addr == s.to).unwrap();
                            assert!(dst.inbox, "{pattern}: {} must take direct messages", s.to);
                        }
                        assert!(s.slot < s.slots);
                    }
                    if let Some(e) = &c.echo_to {
                        assert!(addrs.contains(e.as_str()));
                    }
                }
            }
        }
    }

    #[test]
    fn senders_match_the_scenario() {
        for pattern in Pattern::ALL {
            let s = scenario(pattern);
            let plan = Plan::new(&s, "lt");
            let senders = all(&plan).iter().filter(|c| c.send.is_some()).count() as u64;
            assert_eq!(senders, s.senders(), "{pattern}");
            assert_eq!(plan.count(), s.connections(), "{pattern}");
        }
    }

    #[test]
    fn command_pairs_echo_back_to_their_browser() {
        let plan = Plan::new(&scenario(Pattern::Command), "x");
        let b = plan.client(4);
        let c = plan.client(5);
        assert_eq!(b.send.as_ref().unwrap().to, c.addr);
        assert_eq!(c.echo_to.as_deref(), Some(b.addr.as_str()));
        assert_eq!(c.receipt, Receipt::CountOnly);
        assert_eq!(b.receipt, Receipt::Measure);
    }

    #[test]
    fn worker_ranges_cover_the_fleet_exactly_once() {
        let mut s = scenario(Pattern::Idle);
        s.load.controllers = 10;
        let plan = Plan::new(&s, "x");
        for workers in 1..=12 {
            let mut next = 0;
            for w in 0..workers {
                let r = plan.range(w, workers);
                assert_eq!(r.start, next);
                assert!(r.end - r.start <= 10u64.div_ceil(workers as u64));
                next = r.end;
            }
            assert_eq!(next, 10);
        }
    }
}
