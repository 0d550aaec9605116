//! The alarm book: active alarms, `alarm_when` / `alarm_repeat` timers, and the
//! escalation chains of the notify routes, as a plain state machine on a clock
//! that is passed in (`now_ms`).
//!
//! Every change leaves effects in an outbox (`take_effects`): transitions for the
//! history table, stored records for Redis (so alarms and timers survive a restart)
//! and notifier jobs. The live host drains it from its alarm clock; `rules test`
//! drains it on a simulated clock.
//!
//! Storms: alarms of one kind (the key's part after its last `/`) raised within
//! `[notify.storm] window_s` open one incident, `incident/<kind>`, once there are
//! `threshold` of them. The incident notifies with a digest; its members are still
//! recorded one by one, without notifications of their own. When the book is full
//! (`max_alarms`), further alarms are recorded as `untracked` and summed up in one
//! critical alarm, `relay/max_alarms`.
use std::collections::{BTreeMap, HashMap, VecDeque};

use relay_config::plugins::{NotifyConfig, QuietHours, Severity, StormConfig};
use serde::{Deserialize, Serialize};

use crate::effect::{AlarmEvent, Effect, NotifyJob, Transition};

/// Why an alarm call was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AlarmError {
    /// The book already holds `[plugins] max_alarms` alarms and timers.
    #[error("too many alarms and timers (max_alarms = {0})")]
    TooMany(usize),
    /// Empty or over-long key.
    #[error("alarm key must be 1 to 200 characters")]
    BadKey,
    /// Duration out of range.
    #[error("duration must be between 0 and 30 days")]
    BadDuration,
}

/// Why an acknowledge failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AckError {
    /// No active alarm has that key (HTTP 404).
    #[error("no active alarm `{0}`")]
    NotFound(String),
}

/// One pending or done step of an escalation chain.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Step {
    /// Route name (for records).
    pub route: String,
    /// Notifier name.
    pub channel: String,
    /// Who is reached.
    pub target: String,
    /// When the step is due, ms since the epoch.
    pub due_ms: u64,
    /// Already sent.
    pub done: bool,
    /// Send a `cleared` notice through this channel once the alarm clears.
    pub notify_clear: bool,
    /// Quiet period (minutes of the local day) during which the step waits.
    pub quiet: Option<(u32, u32)>,
}

/// An active alarm, as stored in Redis.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Alarm {
    /// Unique key chosen by the rule (`ctl-1/overheat`).
    pub key: String,
    /// Current severity.
    pub severity: Severity,
    /// Latest text.
    pub text: String,
    /// When it was raised.
    pub raised_at_ms: u64,
    /// Last raise call, escalation or acknowledge.
    pub updated_at_ms: u64,
    /// How many times it was raised while active (1 at first).
    pub count: u64,
    /// Who acknowledged it.
    pub acked_by: Option<String>,
    /// When it was acknowledged.
    pub acked_at_ms: Option<u64>,
    /// Escalation chain steps.
    pub steps: Vec<Step>,
    /// Its severity was raised while active (steps then say `escalated`).
    #[serde(default)]
    pub escalated: bool,
    /// Shelved (silenced) until then: no escalation step is sent before it.
    #[serde(default)]
    pub shelved_until_ms: Option<u64>,
    /// Who shelved it.
    #[serde(default)]
    pub shelved_by: Option<String>,
    /// The incident this alarm was folded into (it then notifies no one itself).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub incident: Option<String>,
    /// For an incident: what it groups.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<Digest>,
}

/// What an incident groups: alarms of one kind raised together.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Digest {
    /// The alarm kind (`offline`).
    pub kind: String,
    /// Alarms of the kind folded in (tracked or not).
    pub total: u64,
    /// Those of them still active.
    pub active: u64,
    /// When the first of them was raised.
    pub since_ms: u64,
    /// The first addresses, in the order raised.
    pub first: Vec<String>,
    /// Members per group of their device (when devices name one), at most 100 groups.
    pub groups: BTreeMap<String, u64>,
    /// Group sizes as known when the text was last written.
    #[serde(default)]
    pub group_sizes: BTreeMap<String, u64>,
}

/// The key prefix of incidents.
pub const INCIDENT_PREFIX: &str = "incident/";
/// The alarm raised when the book is full.
pub const MAX_ALARMS_KEY: &str = "relay/max_alarms";

/// The kind of an alarm key: the part after its last `/` (the whole key without one).
pub fn kind_of(key: &str) -> &str {
    key.rsplit_once('/').map_or(key, |(_, k)| k)
}

/// The address part of an alarm key: before its last `/` (the whole key without one).
pub fn addr_of(key: &str) -> &str {
    key.rsplit_once('/').map_or(key, |(a, _)| a)
}

/// Keys the book raises itself: they never count against `max_alarms` nor make storms.
fn reserved(key: &str) -> bool {
    key.starts_with(INCIDENT_PREFIX) || key == MAX_ALARMS_KEY
}

/// `1234567` → `1,234,567`.
pub fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::with_capacity(s.len() + s.len() / 3);
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// `1 alarm`, `1,234 alarms`.
fn alarms(n: u64) -> String {
    if n == 1 {
        "1 alarm".into()
    } else {
        format!("{} alarms", thousands(n))
    }
}

impl Digest {
    /// The incident's text: count, kind, since when, the first addresses, and the
    /// share of a group when most of the devices name the same one.
    pub fn text(&self, utc_offset_min: i32) -> String {
        let m = local_minute(self.since_ms, utc_offset_min);
        let mut t = format!(
            "{} of kind {} since {:02}:{:02}",
            alarms(self.total),
            self.kind,
            m / 60,
            m % 60
        );
        if self.active != self.total {
            t.push_str(&format!(" ({} still active)", thousands(self.active)));
        }
        if !self.first.is_empty() {
            t.push_str(": ");
            t.push_str(&self.first.join(", "));
            let more = self.total.saturating_sub(self.first.len() as u64);
            if more > 0 {
                t.push_str(&format!(" and {} more", thousands(more)));
            }
        }
        if let Some((g, n)) = self.groups.iter().max_by_key(|(_, n)| **n)
            && n * 2 >= self.total
            && let Some(size) = self.group_sizes.get(g).filter(|s| **s > 0)
        {
            let pct = (n * 100 / size).min(100);
            t.push_str(&format!(
                "; {pct} % of group {g} ({} of {})",
                thousands(*n),
                thousands(*size)
            ));
        }
        t
    }
}

/// An active alarm as shown by the HTTP API.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AlarmView {
    pub key: String,
    pub severity: Severity,
    pub text: String,
    pub raised_at_ms: u64,
    pub updated_at_ms: u64,
    pub count: u64,
    pub acked_by: Option<String>,
    pub acked_at_ms: Option<u64>,
    /// When the next escalation step is due (none once acknowledged).
    pub next_step_ms: Option<u64>,
    /// Shelved (silenced) until then.
    pub shelved_until_ms: Option<u64>,
    /// Who shelved it.
    pub shelved_by: Option<String>,
}

impl Alarm {
    fn view(&self) -> AlarmView {
        let next_step_ms = if self.acked_by.is_some() {
            None
        } else {
            self.steps
                .iter()
                .filter(|s| !s.done)
                .map(|s| s.due_ms)
                .min()
        };
        AlarmView {
            key: self.key.clone(),
            severity: self.severity,
            text: self.text.clone(),
            raised_at_ms: self.raised_at_ms,
            updated_at_ms: self.updated_at_ms,
            count: self.count,
            acked_by: self.acked_by.clone(),
            acked_at_ms: self.acked_at_ms,
            next_step_ms,
            shelved_until_ms: self.shelved_until_ms,
            shelved_by: self.shelved_by.clone(),
        }
    }

    /// Shelved at `now`.
    pub fn shelved(&self, now: u64) -> bool {
        self.shelved_until_ms.is_some_and(|t| t > now)
    }
}

/// A timer watching a condition, as stored in Redis.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Watch {
    /// `alarm_when`: raise once true for `for_ms`, clear once false for `for_ms`.
    When {
        for_ms: u64,
        severity: Severity,
        text: String,
        /// Condition true since (while the alarm is not active).
        true_since: Option<u64>,
        /// Condition false since (while the alarm is active).
        false_since: Option<u64>,
    },
    /// `alarm_repeat`: raise after `n` true readings in a row, clear after `n` false.
    Repeat {
        n: u32,
        severity: Severity,
        text: String,
        true_run: u32,
        false_run: u32,
    },
}

/// A notify route with its quiet hours parsed.
#[derive(Debug, Clone)]
struct Route {
    name: String,
    severities: Vec<Severity>,
    key_prefix: String,
    chain: Vec<(String, String, u64)>,
    quiet: Option<QuietHours>,
    notify_clear: bool,
}

/// `[notify.storm]` in ms.
#[derive(Debug, Clone)]
struct Storm {
    enabled: bool,
    threshold: usize,
    window_ms: u64,
    hold_ms: u64,
    digest_ms: u64,
    digest_addrs: usize,
    max_kinds: usize,
}

impl Storm {
    fn new(c: &StormConfig) -> Storm {
        let ms = |s: f64| secs_to_ms(s).unwrap_or(0);
        Storm {
            enabled: c.enabled,
            threshold: c.threshold.max(2) as usize,
            window_ms: ms(c.window_s).max(1),
            hold_ms: if c.enabled { ms(c.hold_s) } else { 0 },
            digest_ms: ms(c.digest_s),
            digest_addrs: c.digest_addrs,
            max_kinds: c.max_kinds.max(1),
        }
    }
}

/// Alarms refused because the book was full, for the `relay/max_alarms` summary.
#[derive(Debug, Default)]
struct Overflow {
    /// How many since the book filled up.
    total: u64,
    /// Since when.
    since_ms: u64,
    /// Per kind (at most 20 kinds; the rest under `other`).
    kinds: BTreeMap<String, u64>,
    /// The refused keys and their severity (at most `MAX_UNTRACKED_KEYS`), so a
    /// condition repeated on every reading is recorded once and its clear is recorded too.
    keys: HashMap<String, Severity>,
}

/// Most refused keys remembered while the book is full.
const MAX_UNTRACKED_KEYS: usize = 100_000;

/// Most devices whose group is remembered for incident digests.
const MAX_GROUP_ADDRS: usize = 1_000_000;

/// Groups devices named in their HELLO meta, to tell what share of a group an
/// incident covers.
#[derive(Debug, Default)]
struct Groups {
    /// Address → group.
    of: HashMap<String, String>,
    /// Group → addresses in it.
    sizes: HashMap<String, u64>,
}

/// Active alarms, timers and escalation state.
#[derive(Debug)]
pub struct AlarmBook {
    /// Active alarms by key (ordered so listings are stable).
    alarms: BTreeMap<String, Alarm>,
    /// Condition timers by alarm key; only kept while they hold state.
    watches: HashMap<String, Watch>,
    /// Routes from config, in order.
    routes: Vec<Route>,
    /// Local time offset for quiet hours.
    utc_offset_min: i32,
    /// Cap on `alarms.len() + watches.len()`.
    max_alarms: usize,
    /// Effects not yet taken by the driver.
    outbox: Vec<Effect>,
    /// Storm settings.
    storm: Storm,
    /// Recent raises per kind (at most `threshold` each), for storm detection.
    windows: HashMap<String, VecDeque<(u64, String)>>,
    /// Incidents changed since the outbox was last taken (stored once per batch).
    dirty: Vec<String>,
    /// Alarms refused while the book was full.
    overflow: Overflow,
    /// Device groups, for digests.
    groups: Groups,
    /// `{{link}}` of alarm notifications.
    link: String,
    /// Alarms recorded as `untracked` since the start (never reset).
    untracked_total: u64,
    /// Nothing is due before this time (ms): `poll` returns at once until then, so
    /// the clock does not scan every alarm on each event of a storm.
    wake: u64,
}

const MAX_DURATION_MS: u64 = 30 * 86_400_000;

/// Converts seconds (fractions allowed) to ms, refusing negatives and huge values.
pub fn secs_to_ms(s: f64) -> Result<u64, AlarmError> {
    if !s.is_finite() || s < 0.0 || s * 1000.0 > MAX_DURATION_MS as f64 {
        return Err(AlarmError::BadDuration);
    }
    Ok((s * 1000.0).round() as u64)
}

fn local_minute(now_ms: u64, offset_min: i32) -> u32 {
    let m = (now_ms / 60_000) as i64 + i64::from(offset_min);
    m.rem_euclid(1440) as u32
}

/// If `now_ms` is inside the quiet period, when it ends.
fn quiet_until(q: (u32, u32), now_ms: u64, offset_min: i32) -> Option<u64> {
    let qh = QuietHours {
        from_min: q.0,
        to_min: q.1,
    };
    let minute = local_minute(now_ms, offset_min);
    if !qh.contains(minute) {
        return None;
    }
    let left = (q.1 + 1440 - minute) % 1440;
    let minute_start = now_ms - now_ms % 60_000;
    Some(minute_start + u64::from(left) * 60_000)
}

/// The routes of `notify`, resolved (names, chains in ms, quiet hours).
fn routes_of(notify: &NotifyConfig) -> Vec<Route> {
    notify
        .route
        .iter()
        .enumerate()
        .map(|(i, r)| Route {
            name: if r.name.is_empty() {
                format!("route{i}")
            } else {
                r.name.clone()
            },
            severities: r.severities.clone(),
            key_prefix: r.key_prefix.clone(),
            chain: r
                .chain
                .iter()
                .map(|s| {
                    (
                        s.channel.clone(),
                        s.target.clone(),
                        secs_to_ms(s.after_s).unwrap_or(0),
                    )
                })
                .collect(),
            quiet: r
                .quiet_hours
                .as_deref()
                .and_then(|q| QuietHours::parse(q).ok()),
            notify_clear: r.notify_clear,
        })
        .collect()
}

impl AlarmBook {
    /// Follows the routes of `notify` from now on: alarms raised later take
    /// their chains from them; active ones keep the chain they started with.
    pub fn set_routes(&mut self, notify: &NotifyConfig) {
        self.routes = routes_of(notify);
        self.utc_offset_min = notify.utc_offset_min;
    }

    /// An empty book with the routes of `notify`.
    pub fn new(notify: &NotifyConfig, max_alarms: usize) -> AlarmBook {
        let routes = routes_of(notify);
        AlarmBook {
            alarms: BTreeMap::new(),
            watches: HashMap::new(),
            routes,
            utc_offset_min: notify.utc_offset_min,
            max_alarms,
            outbox: Vec::new(),
            storm: Storm::new(&notify.storm),
            windows: HashMap::new(),
            dirty: Vec::new(),
            overflow: Overflow::default(),
            groups: Groups::default(),
            link: if notify.console_url.is_empty() {
                String::new()
            } else {
                format!("{}/#/alarms", notify.console_url.trim_end_matches('/'))
            },
            untracked_total: 0,
            wake: u64::MAX,
        }
    }

    /// Remembers that device `addr` belongs to `group` (from its HELLO meta), so a
    /// digest can say which share of the group an incident covers.
    pub fn note_group(&mut self, addr: &str, group: &str) {
        if self.groups.of.get(addr).is_some_and(|g| g == group) {
            return;
        }
        if !self.groups.of.contains_key(addr) && self.groups.of.len() >= MAX_GROUP_ADDRS {
            return;
        }
        if let Some(old) = self.groups.of.insert(addr.to_string(), group.to_string())
            && let Some(n) = self.groups.sizes.get_mut(&old)
        {
            *n = n.saturating_sub(1);
        }
        *self.groups.sizes.entry(group.to_string()).or_insert(0) += 1;
    }

    /// Alarms recorded as `untracked` (the book was full) since the start.
    pub fn untracked_count(&self) -> u64 {
        self.untracked_total
    }

    /// Restores alarms and timers saved by an earlier run (no effects are produced).
    /// Keys already in the book are kept as they are: they are newer.
    pub fn restore(&mut self, alarms: Vec<Alarm>, watches: Vec<(String, Watch)>) {
        self.wake = 0;
        for a in alarms {
            self.alarms.entry(a.key.clone()).or_insert(a);
        }
        for (k, w) in watches {
            self.watches.entry(k).or_insert(w);
        }
    }

    /// Takes the effects produced since the last call, oldest first.
    pub fn take_effects(&mut self) -> Vec<Effect> {
        for k in std::mem::take(&mut self.dirty) {
            self.store_alarm(&k);
        }
        std::mem::take(&mut self.outbox)
    }

    /// The active alarms, by key.
    pub fn views(&self) -> Vec<AlarmView> {
        self.alarms.values().map(Alarm::view).collect()
    }

    /// Active alarms with keys after `after` (all when `None`), in key order.
    pub fn views_after<'a>(&'a self, after: Option<&str>) -> impl Iterator<Item = AlarmView> + 'a {
        use std::ops::Bound;
        let lower = match after {
            Some(k) => Bound::Excluded(k.to_string()),
            None => Bound::Unbounded,
        };
        self.alarms
            .range((lower, Bound::Unbounded))
            .map(|(_, a)| a.view())
    }

    /// One active alarm.
    pub fn get(&self, key: &str) -> Option<AlarmView> {
        self.alarms.get(key).map(Alarm::view)
    }

    /// Whether `key` is active.
    pub fn is_active(&self, key: &str) -> bool {
        self.alarms.contains_key(key)
    }

    /// Number of active alarms.
    pub fn active_count(&self) -> usize {
        self.alarms.len()
    }

    /// Number of condition timers holding state.
    pub fn watch_count(&self) -> usize {
        self.watches.len()
    }

    /// Alarms and timers counted against `max_alarms` (the book's own keys are not).
    fn tracked_len(&self) -> usize {
        let own = self
            .alarms
            .range(INCIDENT_PREFIX.to_string()..)
            .take_while(|(k, _)| k.starts_with(INCIDENT_PREFIX))
            .count()
            + usize::from(self.alarms.contains_key(MAX_ALARMS_KEY));
        (self.alarms.len() + self.watches.len()).saturating_sub(own)
    }

    fn check_key(&self, key: &str, new_entry: bool) -> Result<(), AlarmError> {
        if key.is_empty() || key.len() > 200 {
            return Err(AlarmError::BadKey);
        }
        if new_entry && !reserved(key) && self.tracked_len() >= self.max_alarms {
            return Err(AlarmError::TooMany(self.max_alarms));
        }
        Ok(())
    }

    fn store_alarm(&mut self, key: &str) {
        let record = self
            .alarms
            .get(key)
            .and_then(|a| serde_json::to_value(a).ok());
        self.outbox.push(Effect::AlarmStore {
            key: key.to_string(),
            record,
        });
    }

    fn store_watch(&mut self, key: &str) {
        let watch = self
            .watches
            .get(key)
            .and_then(|w| serde_json::to_value(w).ok());
        self.outbox.push(Effect::WatchStore {
            key: key.to_string(),
            watch,
        });
    }

    fn event(&mut self, now: u64, a: &Alarm, transition: Transition, by: Option<String>) {
        self.outbox.push(Effect::Alarm(AlarmEvent {
            at_ms: now,
            key: a.key.clone(),
            transition,
            severity: a.severity,
            text: a.text.clone(),
            by,
        }));
    }

    /// The chain steps of every route taking `severity` for `key`, due from `from_ms`.
    fn steps_for(&mut self, key: &str, severity: Severity, from_ms: u64) -> Vec<Step> {
        let mut steps = Vec::new();
        for r in &self.routes {
            if !r.severities.is_empty() && !r.severities.contains(&severity) {
                continue;
            }
            if !key.starts_with(&r.key_prefix) {
                continue;
            }
            for (channel, target, after) in &r.chain {
                steps.push(Step {
                    route: r.name.clone(),
                    channel: channel.clone(),
                    target: target.clone(),
                    due_ms: from_ms + after,
                    done: false,
                    notify_clear: r.notify_clear,
                    quiet: r.quiet.map(|q| (q.from_min, q.to_min)),
                });
            }
        }
        if let Some(first) = steps.iter().map(|s| s.due_ms).min() {
            self.wake = self.wake.min(first);
        }
        steps
    }

    /// `alarm_raise`: raises `key`, escalates it when `severity` is worse, or counts a
    /// repeat. Returns the transition that happened, if any. When the book is full,
    /// a new alarm is recorded as `untracked` and summed up in `relay/max_alarms`.
    pub fn raise(
        &mut self,
        now: u64,
        key: &str,
        severity: Severity,
        text: &str,
    ) -> Result<Option<Transition>, AlarmError> {
        let exists = self.alarms.contains_key(key);
        match self.check_key(key, !exists && !self.watches.contains_key(key)) {
            Err(AlarmError::TooMany(_)) => {
                self.record_untracked(now, key, severity, text);
                return Ok(Some(Transition::Untracked));
            }
            r => r?,
        }
        if let Some(a) = self.alarms.get_mut(key) {
            a.count += 1;
            a.text = text.to_string();
            a.updated_at_ms = now;
            if severity <= a.severity {
                return Ok(None);
            }
            a.severity = severity;
            a.escalated = true;
            a.acked_by = None;
            a.acked_at_ms = None;
            let a = a.clone();
            let mut steps: Vec<Step> = a.steps.iter().filter(|s| s.done).cloned().collect();
            if a.incident.is_none() {
                steps.extend(self.steps_for(key, severity, now));
            }
            if let Some(a) = self.alarms.get_mut(key) {
                a.steps = steps;
            }
            self.event(now, &a, Transition::Escalated, None);
            if let Some(ik) = &a.incident {
                self.incident_severity(now, ik, severity);
            }
            self.fire_steps(now, key, "escalated");
            self.store_alarm(key);
            return Ok(Some(Transition::Escalated));
        }
        // The full-book summary waits like a digest, so it reports the whole overflow.
        let hold = if key == MAX_ALARMS_KEY {
            self.storm.digest_ms
        } else if reserved(key) {
            0
        } else {
            self.storm.hold_ms
        };
        let a = Alarm {
            key: key.to_string(),
            severity,
            text: text.to_string(),
            raised_at_ms: now,
            updated_at_ms: now,
            count: 1,
            acked_by: None,
            acked_at_ms: None,
            steps: self.steps_for(key, severity, now + hold),
            escalated: false,
            shelved_until_ms: None,
            shelved_by: None,
            incident: None,
            digest: None,
        };
        self.event(now, &a, Transition::Raised, None);
        self.alarms.insert(key.to_string(), a);
        if !reserved(key) {
            self.storm_note(now, key, severity);
        }
        self.fire_steps(now, key, "raised");
        self.store_alarm(key);
        Ok(Some(Transition::Raised))
    }

    /// Records alarm `key` that the full book cannot hold, and raises or updates the
    /// `relay/max_alarms` summary.
    fn record_untracked(&mut self, now: u64, key: &str, severity: Severity, text: &str) {
        if self.overflow.keys.contains_key(key) {
            return; // already recorded
        }
        if self.overflow.keys.len() < MAX_UNTRACKED_KEYS {
            self.overflow.keys.insert(key.to_string(), severity);
        }
        self.outbox.push(Effect::Alarm(AlarmEvent {
            at_ms: now,
            key: key.to_string(),
            transition: Transition::Untracked,
            severity,
            text: text.to_string(),
            by: None,
        }));
        self.untracked_total += 1;
        let o = &mut self.overflow;
        if o.total == 0 {
            o.since_ms = now;
        }
        o.total += 1;
        let kind = kind_of(key);
        if o.kinds.contains_key(kind) || o.kinds.len() < 20 {
            *o.kinds.entry(kind.to_string()).or_insert(0) += 1;
        } else {
            *o.kinds.entry("other".into()).or_insert(0) += 1;
        }
        let m = local_minute(o.since_ms, self.utc_offset_min);
        let kinds: Vec<String> = o
            .kinds
            .iter()
            .map(|(k, n)| format!("{k}: {}", thousands(*n)))
            .collect();
        let summary = format!(
            "max_alarms ({}) reached: {} recorded but not tracked since {:02}:{:02} ({})",
            thousands(self.max_alarms as u64),
            alarms(o.total),
            m / 60,
            m % 60,
            kinds.join(", ")
        );
        if let Some(a) = self.alarms.get_mut(MAX_ALARMS_KEY) {
            a.text = summary;
            a.count += 1;
            a.updated_at_ms = now;
            if !self.dirty.iter().any(|k| k == MAX_ALARMS_KEY) {
                self.dirty.push(MAX_ALARMS_KEY.to_string());
            }
        } else {
            let _ = self.raise(now, MAX_ALARMS_KEY, Severity::Critical, &summary);
        }
        if !reserved(key) {
            self.storm_note(now, key, severity);
        }
    }

    /// Clears `relay/max_alarms` once the book is below 90 % of `max_alarms` again.
    fn overflow_over(&mut self, now: u64) {
        if self.overflow.total > 0 && self.tracked_len() * 10 < self.max_alarms * 9 {
            self.overflow = Overflow::default();
            self.clear(now, MAX_ALARMS_KEY);
        }
    }

    /// Counts a raise of `key` towards a storm of its kind: it joins the open
    /// incident of the kind, or opens one when `threshold` were raised within the window.
    fn storm_note(&mut self, now: u64, key: &str, severity: Severity) {
        if !self.storm.enabled {
            return;
        }
        let kind = kind_of(key).to_string();
        let ikey = format!("{INCIDENT_PREFIX}{kind}");
        if self.alarms.contains_key(&ikey) {
            self.join(now, &ikey, key, severity);
            return;
        }
        let window = self.storm.window_ms;
        if !self.windows.contains_key(&kind) && self.windows.len() >= self.storm.max_kinds {
            self.windows.retain(|_, w| {
                w.back()
                    .is_some_and(|(t, _)| now.saturating_sub(*t) < window)
            });
            if self.windows.len() >= self.storm.max_kinds {
                return;
            }
        }
        let w = self.windows.entry(kind.clone()).or_default();
        while w
            .front()
            .is_some_and(|(t, _)| now.saturating_sub(*t) >= window)
        {
            w.pop_front();
        }
        w.push_back((now, key.to_string()));
        if w.len() > self.storm.threshold {
            w.pop_front();
        }
        if w.len() < self.storm.threshold {
            return;
        }
        let members: Vec<(u64, String)> = self.windows.remove(&kind).unwrap_or_default().into();
        let since = members.first().map_or(now, |(t, _)| *t);
        let first_key = members.first().map_or(key.to_string(), |(_, k)| k.clone());
        let worst = members
            .iter()
            .filter_map(|(_, k)| self.alarms.get(k).map(|a| a.severity))
            .max()
            .unwrap_or(severity)
            .max(severity);
        let digest = Digest {
            kind: kind.clone(),
            since_ms: since,
            ..Default::default()
        };
        // Routes see the incident as an alarm of its first member's key.
        let steps = self.steps_for(&first_key, worst, now + self.storm.digest_ms);
        let inc = Alarm {
            key: ikey.clone(),
            severity: worst,
            text: digest.text(self.utc_offset_min),
            raised_at_ms: now,
            updated_at_ms: now,
            count: 1,
            acked_by: None,
            acked_at_ms: None,
            steps,
            escalated: false,
            shelved_until_ms: None,
            shelved_by: None,
            incident: None,
            digest: Some(digest),
        };
        self.event(now, &inc, Transition::Raised, None);
        self.alarms.insert(ikey.clone(), inc);
        for (_, m) in &members {
            let sev = self.alarms.get(m).map_or(severity, |a| a.severity);
            self.join(now, &ikey, m, sev);
            if m != key && self.alarms.contains_key(m) {
                self.store_alarm(m);
            }
        }
        self.fire_steps(now, &ikey, "raised");
    }

    /// Folds alarm `key` into incident `ikey`: its pending notifications are dropped
    /// (the incident's digest speaks for it) and the digest counts it.
    fn join(&mut self, now: u64, ikey: &str, key: &str, severity: Severity) {
        let tracked = match self.alarms.get_mut(key) {
            Some(a) => {
                // Stored by the caller (once, with the rest of the raise).
                a.incident = Some(ikey.to_string());
                a.steps.retain(|s| s.done);
                true
            }
            None => false,
        };
        let group = self.groups.of.get(addr_of(key)).cloned();
        let (offset, max_first) = (self.utc_offset_min, self.storm.digest_addrs);
        let Some(inc) = self.alarms.get_mut(ikey) else {
            return;
        };
        let Some(d) = inc.digest.as_mut() else {
            return;
        };
        d.total += 1;
        if tracked {
            d.active += 1;
        }
        if d.first.len() < max_first {
            d.first.push(addr_of(key).to_string());
        }
        if let Some(g) = group
            && (d.groups.contains_key(&g) || d.groups.len() < 100)
        {
            let size = self.groups.sizes.get(&g).copied().unwrap_or(0);
            d.group_sizes.insert(g.clone(), size);
            *d.groups.entry(g).or_insert(0) += 1;
        }
        inc.text = d.text(offset);
        inc.updated_at_ms = now;
        inc.count = d.total;
        if !self.dirty.iter().any(|k| k == ikey) {
            self.dirty.push(ikey.to_string());
        }
        self.incident_severity(now, ikey, severity);
    }

    /// Escalates incident `ikey` when a member is worse than it.
    fn incident_severity(&mut self, now: u64, ikey: &str, severity: Severity) {
        let Some(inc) = self.alarms.get(ikey) else {
            return;
        };
        if severity <= inc.severity {
            return;
        }
        let first = inc
            .digest
            .as_ref()
            .and_then(|d| d.first.first().cloned())
            .map(|a| {
                format!(
                    "{a}/{}",
                    inc.digest.as_ref().map_or("", |d| d.kind.as_str())
                )
            })
            .unwrap_or_else(|| ikey.to_string());
        let new_steps = self.steps_for(&first, severity, now);
        let Some(inc) = self.alarms.get_mut(ikey) else {
            return;
        };
        inc.severity = severity;
        inc.escalated = true;
        inc.acked_by = None;
        inc.acked_at_ms = None;
        inc.steps.retain(|s| s.done);
        inc.steps.extend(new_steps);
        let inc = inc.clone();
        self.event(now, &inc, Transition::Escalated, None);
        self.fire_steps(now, ikey, "escalated");
    }

    /// `alarm_clear`: ends `key` if active. Also forgets its condition timer.
    pub fn clear(&mut self, now: u64, key: &str) -> bool {
        self.clear_as(now, key, None)
    }

    /// Ends `key` if active, on behalf of `by` (an operator; `None` for a rule).
    pub fn clear_as(&mut self, now: u64, key: &str, by: Option<&str>) -> bool {
        if self.watches.remove(key).is_some() {
            self.store_watch(key);
        }
        let Some(mut a) = self.alarms.remove(key) else {
            if let Some(severity) = self.overflow.keys.remove(key) {
                self.outbox.push(Effect::Alarm(AlarmEvent {
                    at_ms: now,
                    key: key.to_string(),
                    transition: Transition::Cleared,
                    severity,
                    text: "cleared (was not tracked: max_alarms reached)".into(),
                    by: None,
                }));
            }
            self.overflow_over(now);
            return false;
        };
        a.updated_at_ms = now;
        self.event(now, &a, Transition::Cleared, by.map(str::to_string));
        let mut told = Vec::new();
        for s in a.steps.iter().filter(|s| s.done && s.notify_clear) {
            if told.contains(&(s.channel.clone(), s.target.clone())) {
                continue;
            }
            told.push((s.channel.clone(), s.target.clone()));
            self.outbox.push(Effect::Notify(NotifyJob {
                at_ms: now,
                channel: s.channel.clone(),
                target: s.target.clone(),
                route: s.route.clone(),
                event: "cleared".into(),
                key: Some(a.key.clone()),
                severity: Some(a.severity),
                text: a.text.clone(),
                raised_at_ms: Some(a.raised_at_ms),
                link: self.link.clone(),
            }));
        }
        self.store_alarm(key);
        self.dirty.retain(|k| k != key);
        if let Some(ik) = &a.incident {
            self.leave(now, ik);
        }
        self.overflow_over(now);
        true
    }

    /// A member of incident `ikey` cleared; the incident clears with its last member.
    fn leave(&mut self, now: u64, ikey: &str) {
        let offset = self.utc_offset_min;
        let Some(inc) = self.alarms.get_mut(ikey) else {
            return;
        };
        let Some(d) = inc.digest.as_mut() else {
            return;
        };
        d.active = d.active.saturating_sub(1);
        if d.active == 0 {
            self.clear(now, ikey);
            return;
        }
        inc.text = d.text(offset);
        inc.updated_at_ms = now;
        if !self.dirty.iter().any(|k| k == ikey) {
            self.dirty.push(ikey.to_string());
        }
    }

    /// Acknowledges `key`: its escalation chain stops. Acknowledging twice keeps the
    /// first acknowledger and produces no second transition.
    pub fn ack(&mut self, now: u64, key: &str, by: &str) -> Result<AlarmView, AckError> {
        let a = self
            .alarms
            .get_mut(key)
            .ok_or_else(|| AckError::NotFound(key.to_string()))?;
        if a.acked_by.is_some() {
            return Ok(a.view());
        }
        a.acked_by = Some(by.to_string());
        a.acked_at_ms = Some(now);
        a.updated_at_ms = now;
        let a = a.clone();
        self.event(now, &a, Transition::Acknowledged, Some(by.to_string()));
        self.store_alarm(key);
        Ok(a.view())
    }

    /// Shelves `key` for `for_ms` on behalf of `by`: no escalation step is sent until
    /// then (steps due meanwhile go out when the shelf ends, unless acknowledged or
    /// cleared). Shelving again replaces the end time; `for_ms` 0 unshelves.
    pub fn shelve(
        &mut self,
        now: u64,
        key: &str,
        by: &str,
        for_ms: u64,
    ) -> Result<AlarmView, AckError> {
        let a = self
            .alarms
            .get_mut(key)
            .ok_or_else(|| AckError::NotFound(key.to_string()))?;
        let (until, transition) = if for_ms == 0 {
            (None, Transition::Unshelved)
        } else {
            (Some(now.saturating_add(for_ms)), Transition::Shelved)
        };
        a.shelved_until_ms = until;
        a.shelved_by = until.map(|_| by.to_string());
        a.updated_at_ms = now;
        // Steps that fell due on the shelf are due now; a new shelf end is
        // a new time to look again: the next poll recomputes its wake-up.
        self.wake = self.wake.min(now);
        let a = a.clone();
        self.event(now, &a, transition, Some(by.to_string()));
        self.store_alarm(key);
        Ok(a.view())
    }

    /// `alarm_when`: debounce and hysteresis in one call.
    pub fn when(
        &mut self,
        now: u64,
        key: &str,
        cond: bool,
        for_ms: u64,
        severity: Severity,
        text: &str,
    ) -> Result<(), AlarmError> {
        if for_ms > MAX_DURATION_MS {
            return Err(AlarmError::BadDuration);
        }
        let active = self.alarms.contains_key(key);
        let has_watch = self.watches.contains_key(key);
        if !has_watch && !active && !cond {
            return Ok(()); // nothing to remember
        }
        if let Err(AlarmError::TooMany(_)) = self.check_key(key, !has_watch && !active) {
            self.record_untracked(now, key, severity, text);
            return Ok(());
        }
        self.check_key(key, false)?;
        let w = self
            .watches
            .entry(key.to_string())
            .or_insert_with(|| Watch::When {
                for_ms,
                severity,
                text: text.to_string(),
                true_since: None,
                false_since: None,
            });
        if !matches!(w, Watch::When { .. }) {
            *w = Watch::When {
                for_ms,
                severity,
                text: text.to_string(),
                true_since: None,
                false_since: None,
            };
        }
        let Watch::When {
            for_ms: f,
            severity: s,
            text: t,
            true_since,
            false_since,
        } = w
        else {
            unreachable!("set to When above")
        };
        *f = for_ms;
        *s = severity;
        *t = text.to_string();
        let before = (*true_since, *false_since);
        if cond {
            *false_since = None;
            if !active {
                true_since.get_or_insert(now);
            } else {
                *true_since = None;
            }
        } else {
            *true_since = None;
            if active {
                false_since.get_or_insert(now);
            } else {
                *false_since = None;
            }
        }
        let after = (*true_since, *false_since);
        if let Some(t) = after.0.or(after.1) {
            self.wake = self.wake.min(t.saturating_add(for_ms));
        }
        if cond && active {
            // Still true: keep the text fresh and escalate if the severity got worse.
            self.raise(now, key, severity, text)?;
        }
        if after == (None, None) && !active && !cond {
            self.watches.remove(key);
            self.store_watch(key);
            return Ok(());
        }
        if before != after {
            self.store_watch(key);
        }
        self.poll_watch(now, key);
        Ok(())
    }

    /// `alarm_repeat`: raise after `n` true readings in a row, clear after `n` false ones.
    pub fn repeat(
        &mut self,
        now: u64,
        key: &str,
        cond: bool,
        n: u32,
        severity: Severity,
        text: &str,
    ) -> Result<(), AlarmError> {
        let n = n.max(1);
        let active = self.alarms.contains_key(key);
        let has_watch = self.watches.contains_key(key);
        if !has_watch && !active && !cond {
            return Ok(());
        }
        if let Err(AlarmError::TooMany(_)) = self.check_key(key, !has_watch && !active) {
            self.record_untracked(now, key, severity, text);
            return Ok(());
        }
        self.check_key(key, false)?;
        let w = self
            .watches
            .entry(key.to_string())
            .or_insert_with(|| Watch::Repeat {
                n,
                severity,
                text: text.to_string(),
                true_run: 0,
                false_run: 0,
            });
        if !matches!(w, Watch::Repeat { .. }) {
            *w = Watch::Repeat {
                n,
                severity,
                text: text.to_string(),
                true_run: 0,
                false_run: 0,
            };
        }
        let Watch::Repeat {
            n: wn,
            severity: ws,
            text: wt,
            true_run,
            false_run,
        } = w
        else {
            unreachable!("set to Repeat above")
        };
        *wn = n;
        *ws = severity;
        *wt = text.to_string();
        let (raise, clear) = if cond {
            *false_run = 0;
            *true_run = true_run.saturating_add(1);
            (!active && *true_run >= n, false)
        } else {
            *true_run = 0;
            *false_run = false_run.saturating_add(1);
            (false, active && *false_run >= n)
        };
        let idle = !cond && !active;
        if raise {
            self.watches.remove(key);
            self.store_watch(key);
            self.raise(now, key, severity, text)?;
        } else if clear || idle {
            self.clear(now, key);
        } else if active && cond {
            self.raise(now, key, severity, text)?;
            self.store_watch(key);
        } else {
            self.store_watch(key);
        }
        Ok(())
    }

    /// Fires the due timer of one `alarm_when` watch.
    fn poll_watch(&mut self, now: u64, key: &str) {
        let Some(Watch::When {
            for_ms,
            severity,
            text,
            true_since,
            false_since,
        }) = self.watches.get(key).cloned()
        else {
            return;
        };
        let active = self.alarms.contains_key(key);
        if let Some(t) = true_since
            && !active
            && now >= t + for_ms
        {
            if let Some(Watch::When { true_since, .. }) = self.watches.get_mut(key) {
                *true_since = None;
            }
            self.store_watch(key);
            if let Err(e) = self.raise(now, key, severity, &text) {
                tracing::warn!(key, error = %e, "alarm_when could not raise");
            }
        } else if let Some(f) = false_since
            && active
            && now >= f + for_ms
        {
            self.clear(now, key);
        }
    }

    /// Sends the due, not yet sent steps of `key` (unless acknowledged or quiet).
    fn fire_steps(&mut self, now: u64, key: &str, event: &str) {
        let Some(a) = self.alarms.get_mut(key) else {
            return;
        };
        if a.acked_by.is_some() || a.shelved(now) {
            return;
        }
        // A step held by its route's quiet hours moves to the end of the quiet
        // period, and the later steps of its route move with it, so the chain keeps
        // its gaps (SMS at 07:00, the call 20 s later; not both at 07:00).
        let mut shifted = false;
        let mut i = 0;
        while i < a.steps.len() {
            let s = &a.steps[i];
            if !s.done
                && s.due_ms <= now
                && let Some(q) = s.quiet
                && let Some(end) = quiet_until(q, now, self.utc_offset_min)
            {
                let (route, from) = (s.route.clone(), s.due_ms);
                let delta = end.saturating_sub(from);
                for t in a
                    .steps
                    .iter_mut()
                    .filter(|t| !t.done && t.route == route && t.due_ms >= from)
                {
                    t.due_ms = t.due_ms.saturating_add(delta);
                }
                shifted = true;
            }
            i += 1;
        }
        let mut jobs = Vec::new();
        for s in a.steps.iter_mut().filter(|s| !s.done && s.due_ms <= now) {
            s.done = true;
            jobs.push(NotifyJob {
                at_ms: now,
                channel: s.channel.clone(),
                target: s.target.clone(),
                route: s.route.clone(),
                event: event.to_string(),
                key: Some(a.key.clone()),
                severity: Some(a.severity),
                text: a.text.clone(),
                raised_at_ms: Some(a.raised_at_ms),
                link: self.link.clone(),
            });
        }
        let fired = !jobs.is_empty();
        self.outbox.extend(jobs.into_iter().map(Effect::Notify));
        if fired || shifted {
            self.store_alarm(key);
        }
    }

    /// Runs every timer and escalation step due at `now`.
    pub fn poll(&mut self, now: u64) {
        if now < self.wake {
            return;
        }
        let keys: Vec<String> = self.watches.keys().cloned().collect();
        for k in keys {
            self.poll_watch(now, &k);
        }
        let keys: Vec<String> = self
            .alarms
            .values()
            .filter(|a| {
                a.acked_by.is_none()
                    && !a.shelved(now)
                    && a.steps.iter().any(|s| !s.done && s.due_ms <= now)
            })
            .map(|a| a.key.clone())
            .collect();
        for k in keys {
            let event = match self.alarms.get(&k) {
                Some(a) if a.escalated => "escalated",
                _ => "raised",
            };
            self.fire_steps(now, &k, event);
        }
        self.wake = self.next_due(now).unwrap_or(u64::MAX);
    }

    /// The earliest time after `now` at which `poll` has something to do.
    pub fn next_due(&self, now: u64) -> Option<u64> {
        let mut next: Option<u64> = None;
        let mut consider = |t: u64| {
            let t = t.max(now + 1);
            next = Some(next.map_or(t, |n| n.min(t)));
        };
        for (k, w) in &self.watches {
            if let Watch::When {
                for_ms,
                true_since,
                false_since,
                ..
            } = w
            {
                let active = self.alarms.contains_key(k);
                if let (Some(t), false) = (true_since, active) {
                    consider(t + for_ms);
                }
                if let (Some(f), true) = (false_since, active) {
                    consider(f + for_ms);
                }
            }
        }
        for a in self.alarms.values().filter(|a| a.acked_by.is_none()) {
            if let Some(until) = a.shelved_until_ms.filter(|_| a.shelved(now))
                && a.steps.iter().any(|s| !s.done)
            {
                consider(until);
                continue;
            }
            for s in a.steps.iter().filter(|s| !s.done) {
                let due = s.due_ms.max(now);
                match s
                    .quiet
                    .and_then(|q| quiet_until(q, due, self.utc_offset_min))
                {
                    Some(end) => consider(end),
                    None => consider(s.due_ms),
                }
            }
        }
        next
    }

    /// Whether a job for alarm `key` still should be delivered (retries stop once the
    /// alarm is acknowledged or cleared).
    pub fn still_wanted(&self, job: &NotifyJob) -> bool {
        match (&job.key, job.event.as_str()) {
            (Some(k), "raised" | "escalated") => {
                let now = crate::clock::now_ms();
                self.alarms
                    .get(k)
                    .is_some_and(|a| a.acked_by.is_none() && !a.shelved(now))
            }
            _ => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn notify_cfg(toml_text: &str) -> NotifyConfig {
        toml::from_str(toml_text).unwrap()
    }

    fn transitions(fx: &[Effect]) -> Vec<(String, Transition)> {
        fx.iter()
            .filter_map(|e| match e {
                Effect::Alarm(a) => Some((a.key.clone(), a.transition)),
                _ => None,
            })
            .collect()
    }

    fn jobs(fx: &[Effect]) -> Vec<(String, String, String)> {
        fx.iter()
            .filter_map(|e| match e {
                Effect::Notify(j) => Some((j.channel.clone(), j.target.clone(), j.event.clone())),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn raise_once_until_cleared() {
        let mut b = AlarmBook::new(&NotifyConfig::default(), 10);
        assert_eq!(
            b.raise(0, "k", Severity::Major, "t").unwrap(),
            Some(Transition::Raised)
        );
        assert_eq!(b.raise(5, "k", Severity::Major, "t2").unwrap(), None);
        assert_eq!(b.raise(6, "k", Severity::Minor, "t3").unwrap(), None);
        assert_eq!(b.get("k").unwrap().count, 3);
        assert_eq!(
            b.raise(7, "k", Severity::Critical, "hot").unwrap(),
            Some(Transition::Escalated)
        );
        assert!(b.clear(9, "k"));
        assert!(!b.clear(10, "k"));
        assert_eq!(
            b.raise(11, "k", Severity::Minor, "again").unwrap(),
            Some(Transition::Raised)
        );
        let t = transitions(&b.take_effects());
        let names: Vec<Transition> = t.into_iter().map(|(_, t)| t).collect();
        assert_eq!(
            names,
            [
                Transition::Raised,
                Transition::Escalated,
                Transition::Cleared,
                Transition::Raised
            ]
        );
    }

    #[test]
    fn when_waits_for_duration_both_ways() {
        let mut b = AlarmBook::new(&NotifyConfig::default(), 10);
        b.when(0, "k", true, 1000, Severity::Critical, "hot")
            .unwrap();
        b.when(500, "k", true, 1000, Severity::Critical, "hot")
            .unwrap();
        assert!(!b.is_active("k"));
        // A flap resets the timer.
        b.when(600, "k", false, 1000, Severity::Critical, "ok")
            .unwrap();
        b.when(700, "k", true, 1000, Severity::Critical, "hot")
            .unwrap();
        b.poll(1600);
        assert!(!b.is_active("k"));
        assert_eq!(b.next_due(1600), Some(1700));
        // The timer fires without a new reading.
        b.poll(1700);
        assert!(b.is_active("k"));
        // Clearing needs the condition false for the whole duration too.
        b.when(2000, "k", false, 1000, Severity::Critical, "ok")
            .unwrap();
        b.when(2500, "k", true, 1000, Severity::Critical, "hot")
            .unwrap();
        b.when(2600, "k", false, 1000, Severity::Critical, "ok")
            .unwrap();
        b.poll(3500);
        assert!(b.is_active("k"));
        b.poll(3600);
        assert!(!b.is_active("k"));
        let t = transitions(&b.take_effects());
        assert_eq!(t.len(), 2);
        assert_eq!(b.watch_count(), 0, "idle timers are forgotten");
    }

    #[test]
    fn when_with_zero_duration_is_immediate() {
        let mut b = AlarmBook::new(&NotifyConfig::default(), 10);
        b.when(0, "k", true, 0, Severity::Info, "x").unwrap();
        assert!(b.is_active("k"));
        b.when(1, "k", false, 0, Severity::Info, "x").unwrap();
        assert!(!b.is_active("k"));
    }

    #[test]
    fn repeat_counts_readings_in_a_row() {
        let mut b = AlarmBook::new(&NotifyConfig::default(), 10);
        for (i, c) in [true, true, false, true, true].into_iter().enumerate() {
            b.repeat(i as u64, "k", c, 3, Severity::Minor, "x").unwrap();
        }
        assert!(!b.is_active("k"));
        b.repeat(10, "k", true, 3, Severity::Minor, "x").unwrap();
        assert!(b.is_active("k"));
        b.repeat(11, "k", false, 3, Severity::Minor, "x").unwrap();
        b.repeat(12, "k", false, 3, Severity::Minor, "x").unwrap();
        assert!(b.is_active("k"));
        b.repeat(13, "k", false, 3, Severity::Minor, "x").unwrap();
        assert!(!b.is_active("k"));
        assert_eq!(b.watch_count(), 0);
    }

    #[test]
    fn chain_escalates_and_stops_on_ack() {
        let cfg = notify_cfg(
            r#"
            [[notifier]]
            name = "webhook"
            url = "http://127.0.0.1:1/hook"
            [[notifier]]
            name = "sms"
            url = "http://127.0.0.1:1/sms"
            [[route]]
            name = "oncall"
            severities = ["critical"]
            chain = [{ channel = "webhook", target = "ops" }, { channel = "sms", target = "+1", after_s = 120 }, { channel = "log", after_s = 300 }]
            "#,
        );
        let mut b = AlarmBook::new(&cfg, 10);
        b.raise(1000, "k", Severity::Critical, "hot").unwrap();
        assert_eq!(
            jobs(&b.take_effects()),
            [("webhook".into(), "ops".into(), "raised".into())]
        );
        b.poll(100_000);
        assert!(jobs(&b.take_effects()).is_empty());
        assert_eq!(b.next_due(100_000), Some(121_000));
        b.poll(121_000);
        assert_eq!(
            jobs(&b.take_effects()),
            [("sms".into(), "+1".into(), "raised".into())]
        );
        b.ack(130_000, "k", "alice").unwrap();
        b.poll(400_000);
        let fx = b.take_effects();
        assert!(jobs(&fx).is_empty(), "acknowledged: the chain stops");
        assert_eq!(transitions(&fx), [("k".into(), Transition::Acknowledged)]);
        assert_eq!(b.next_due(400_000), None);
        // Clearing tells the channels already reached.
        b.clear(500_000, "k");
        assert_eq!(
            jobs(&b.take_effects()),
            [
                ("webhook".into(), "ops".into(), "cleared".into()),
                ("sms".into(), "+1".into(), "cleared".into())
            ]
        );
        // Minor alarms do not take the critical route.
        b.raise(600_000, "m", Severity::Minor, "meh").unwrap();
        assert!(jobs(&b.take_effects()).is_empty());
    }

    #[test]
    fn quiet_hours_defer_steps() {
        let cfg = notify_cfg(
            r#"
            [[notifier]]
            name = "sms"
            url = "http://127.0.0.1:1/sms"
            [[route]]
            chain = [{ channel = "sms", target = "+1" }]
            quiet_hours = "22:00-07:00"
            "#,
        );
        let mut b = AlarmBook::new(&cfg, 10);
        let at_23h = 23 * 3_600_000;
        b.raise(at_23h, "k", Severity::Minor, "x").unwrap();
        assert!(jobs(&b.take_effects()).is_empty());
        let at_7h_next_day = 86_400_000 + 7 * 3_600_000;
        assert_eq!(b.next_due(at_23h), Some(at_7h_next_day));
        b.poll(at_7h_next_day - 1);
        assert!(jobs(&b.take_effects()).is_empty());
        b.poll(at_7h_next_day);
        assert_eq!(jobs(&b.take_effects()).len(), 1);
    }

    #[test]
    fn quiet_hours_keep_the_gaps_of_the_chain() {
        let cfg = notify_cfg(
            r#"
            [[notifier]]
            name = "sms"
            url = "http://127.0.0.1:1/sms"
            [[notifier]]
            name = "phone"
            url = "http://127.0.0.1:1/call"
            [[route]]
            chain = [{ channel = "sms", target = "+1" }, { channel = "phone", target = "+1", after_s = 20 }]
            quiet_hours = "22:00-07:00"
            "#,
        );
        let mut b = AlarmBook::new(&cfg, 10);
        let at_23h = 23 * 3_600_000;
        let at_7h = 86_400_000 + 7 * 3_600_000;
        b.raise(at_23h, "k", Severity::Major, "x").unwrap();
        // Both steps come due during the night; neither fires.
        b.poll(at_23h + 60_000);
        assert!(jobs(&b.take_effects()).is_empty());
        assert_eq!(b.next_due(at_23h + 60_000), Some(at_7h));
        b.poll(at_7h);
        assert_eq!(
            jobs(&b.take_effects()),
            [("sms".into(), "+1".into(), "raised".into())],
            "the SMS at 07:00, alone"
        );
        assert_eq!(
            b.next_due(at_7h),
            Some(at_7h + 20_000),
            "the call 20 s later"
        );
        b.poll(at_7h + 19_000);
        assert!(jobs(&b.take_effects()).is_empty());
        b.poll(at_7h + 20_000);
        assert_eq!(
            jobs(&b.take_effects()),
            [("phone".into(), "+1".into(), "raised".into())]
        );
    }

    #[test]
    fn views_page_in_key_order() {
        let mut b = AlarmBook::new(&NotifyConfig::default(), 10);
        for k in ["c", "a", "b"] {
            b.raise(0, k, Severity::Info, "").unwrap();
        }
        let keys = |it: Vec<AlarmView>| it.into_iter().map(|a| a.key).collect::<Vec<_>>();
        assert_eq!(keys(b.views_after(None).collect()), ["a", "b", "c"]);
        assert_eq!(keys(b.views_after(Some("a")).collect()), ["b", "c"]);
        assert_eq!(
            keys(b.views_after(Some("c")).collect()),
            Vec::<String>::new()
        );
    }

    #[test]
    fn ack_of_unknown_alarm_is_not_found() {
        let mut b = AlarmBook::new(&NotifyConfig::default(), 10);
        assert_eq!(
            b.ack(0, "nope", "x"),
            Err(AckError::NotFound("nope".into()))
        );
    }

    #[test]
    fn the_book_is_bounded() {
        let mut b = AlarmBook::new(&NotifyConfig::default(), 2);
        b.raise(0, "a", Severity::Info, "").unwrap();
        b.when(0, "b", true, 1000, Severity::Info, "").unwrap();
        assert_eq!(
            b.raise(0, "c", Severity::Info, ""),
            Ok(Some(Transition::Untracked)),
            "recorded, not tracked"
        );
        assert!(!b.is_active("c"));
        assert!(
            b.raise(0, "a", Severity::Info, "").is_ok(),
            "known keys still work"
        );
    }

    #[test]
    fn stored_records_restore() {
        let mut b = AlarmBook::new(&NotifyConfig::default(), 10);
        b.raise(0, "a", Severity::Major, "t").unwrap();
        b.when(0, "w", true, 5000, Severity::Minor, "pending")
            .unwrap();
        let mut alarms = Vec::new();
        let mut watches = Vec::new();
        for e in b.take_effects() {
            match e {
                Effect::AlarmStore {
                    record: Some(r), ..
                } => alarms.push(serde_json::from_value(r).unwrap()),
                Effect::WatchStore {
                    key,
                    watch: Some(w),
                } => watches.push((key, serde_json::from_value(w).unwrap())),
                _ => {}
            }
        }
        let mut c = AlarmBook::new(&NotifyConfig::default(), 10);
        c.restore(alarms, watches);
        assert!(c.is_active("a"));
        c.poll(4999);
        assert!(!c.is_active("w"));
        c.poll(5000);
        assert!(c.is_active("w"), "a pending timer survives");
    }

    fn storm_cfg(extra: &str) -> NotifyConfig {
        notify_cfg(&format!(
            r#"
            console_url = "https://relay.example.com/"
            [[notifier]]
            name = "sms"
            url = "http://127.0.0.1:1/sms"
            [[route]]
            name = "oncall"
            chain = [{{ channel = "sms", target = "+1" }}, {{ channel = "sms", target = "+2", after_s = 20 }}]
            [storm]
            threshold = 3
            window_s = 10
            digest_s = 5
            digest_addrs = 2
            {extra}
            "#
        ))
    }

    fn notify_jobs(fx: &[Effect]) -> Vec<NotifyJob> {
        fx.iter()
            .filter_map(|e| match e {
                Effect::Notify(j) => Some(j.clone()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_storm_of_one_kind_becomes_one_incident_with_a_digest() {
        let mut b = AlarmBook::new(&storm_cfg(""), 10_000);
        b.note_group("ctl-1", "site-3");
        b.note_group("ctl-2", "site-3");
        b.note_group("ctl-3", "site-3");
        b.note_group("ctl-4", "site-4");
        // Two alarms: below the threshold, each notifies on its own.
        b.raise(0, "ctl-1/offline", Severity::Major, "ctl-1 offline")
            .unwrap();
        b.raise(100, "ctl-2/offline", Severity::Major, "ctl-2 offline")
            .unwrap();
        let fx = b.take_effects();
        assert_eq!(notify_jobs(&fx).len(), 2);
        // Another kind does not count towards this one.
        b.raise(150, "ctl-1/overheat", Severity::Major, "hot")
            .unwrap();
        b.take_effects();
        // The third opens the incident; it and later ones notify no one themselves.
        for i in 3..=300 {
            b.raise(
                200 + i,
                &format!("ctl-{i}/offline"),
                Severity::Major,
                "offline",
            )
            .unwrap();
        }
        let fx = b.take_effects();
        assert!(notify_jobs(&fx).is_empty(), "{:?}", notify_jobs(&fx));
        let raised = transitions(&fx)
            .into_iter()
            .filter(|(k, t)| k.starts_with("ctl-") && *t == Transition::Raised)
            .count();
        assert_eq!(raised, 298, "every alarm is still recorded");
        let inc = b.get("incident/offline").expect("incident open");
        assert_eq!(inc.count, 300);
        assert!(
            inc.text
                .starts_with("300 alarms of kind offline since 00:00: ctl-1, ctl-2 and 298 more"),
            "{}",
            inc.text
        );
        // The pending steps of the first two were taken over by the incident.
        b.ack(1_000, "ctl-1/overheat", "op").unwrap();
        b.poll(30_000);
        let jobs = notify_jobs(&b.take_effects());
        let keys: Vec<_> = jobs.iter().map(|j| j.key.clone().unwrap()).collect();
        assert_eq!(keys, ["incident/offline", "incident/offline"], "{jobs:?}");
        assert_eq!(jobs[0].target, "+1");
        assert_eq!(jobs[1].target, "+2", "the incident keeps the chain");
        assert_eq!(jobs[0].link, "https://relay.example.com/#/alarms");
        assert!(jobs[0].text.contains("300 alarms"), "{}", jobs[0].text);
        // The incident clears with its last member, and says so once.
        for i in 1..=300 {
            b.clear(40_000, &format!("ctl-{i}/offline"));
        }
        assert!(!b.is_active("incident/offline"));
        let fx = b.take_effects();
        let cleared: Vec<_> = notify_jobs(&fx)
            .into_iter()
            .filter(|j| j.key.as_deref() == Some("incident/offline"))
            .map(|j| j.event)
            .collect();
        assert_eq!(cleared, ["cleared", "cleared"]);
    }

    #[test]
    fn a_digest_gives_the_share_of_a_group() {
        let mut b = AlarmBook::new(&storm_cfg(""), 10_000);
        for i in 0..10 {
            b.note_group(&format!("d{i}"), if i < 8 { "site-3" } else { "site-4" });
        }
        for i in 0..7 {
            b.raise(i, &format!("d{i}/offline"), Severity::Minor, "x")
                .unwrap();
        }
        let t = b.get("incident/offline").unwrap().text;
        assert!(t.ends_with("; 87 % of group site-3 (7 of 8)"), "{t}");
    }

    #[test]
    fn hold_lets_the_incident_take_over_the_first_alarms() {
        let mut b = AlarmBook::new(&storm_cfg("hold_s = 2"), 10_000);
        for i in 0..50 {
            b.raise(i * 10, &format!("c{i}/offline"), Severity::Major, "x")
                .unwrap();
        }
        b.poll(60_000);
        let jobs = notify_jobs(&b.take_effects());
        assert!(
            jobs.iter()
                .all(|j| j.key.as_deref() == Some("incident/offline")),
            "{jobs:?}"
        );
        assert_eq!(jobs.len(), 2);
        // A lone alarm later waits for the hold, then notifies itself.
        b.raise(200_000, "x/overheat", Severity::Major, "hot")
            .unwrap();
        assert!(notify_jobs(&b.take_effects()).is_empty());
        assert_eq!(b.next_due(200_000), Some(202_000));
        b.poll(202_000);
        assert_eq!(notify_jobs(&b.take_effects()).len(), 1);
    }

    #[test]
    fn alarms_spread_over_more_than_the_window_are_no_storm() {
        let mut b = AlarmBook::new(&storm_cfg(""), 10_000);
        for i in 0..5 {
            b.raise(i * 6_000, &format!("c{i}/offline"), Severity::Major, "x")
                .unwrap();
        }
        assert!(!b.is_active("incident/offline"));
        let off = AlarmBook::new(&storm_cfg("enabled = false"), 10_000);
        let mut off = off;
        for i in 0..10 {
            off.raise(i, &format!("c{i}/offline"), Severity::Major, "x")
                .unwrap();
        }
        assert!(!off.is_active("incident/offline"));
        assert_eq!(notify_jobs(&off.take_effects()).len(), 10);
    }

    #[test]
    fn a_full_book_records_every_alarm_and_raises_one_critical_alarm() {
        let mut b = AlarmBook::new(&storm_cfg("enabled = false"), 10);
        for i in 0..25 {
            let r = b.raise(i, &format!("c{i}/offline"), Severity::Major, "x");
            assert!(r.is_ok(), "no error for the script: {r:?}");
        }
        // Timers too: a full book does not fail alarm_when.
        b.when(30, "t/hot", true, 1000, Severity::Minor, "x")
            .unwrap();
        let fx = b.take_effects();
        let t = transitions(&fx);
        assert_eq!(
            t.iter().filter(|(_, t)| *t == Transition::Raised).count(),
            11,
            "10 + relay/max_alarms"
        );
        assert_eq!(
            t.iter()
                .filter(|(_, t)| *t == Transition::Untracked)
                .count(),
            16
        );
        let m = b.get(MAX_ALARMS_KEY).expect("relay/max_alarms raised");
        assert_eq!(m.severity, Severity::Critical);
        assert!(
            m.text.starts_with("max_alarms (10) reached: 16 alarms recorded but not tracked since 00:00 (hot: 1, offline: 15)"),
            "{}",
            m.text
        );
        assert_eq!(b.untracked_count(), 16);
        assert!(
            notify_jobs(&fx)
                .iter()
                .all(|j| j.key.as_deref() != Some(MAX_ALARMS_KEY)),
            "the summary waits digest_s"
        );
        b.poll(5_010);
        let jobs: Vec<_> = notify_jobs(&b.take_effects())
            .into_iter()
            .filter(|j| j.target == "+1")
            .collect();
        assert_eq!(
            jobs.len(),
            1,
            "one notification for the full book: {jobs:?}"
        );
        assert_eq!(jobs[0].key.as_deref(), Some(MAX_ALARMS_KEY));
        assert!(jobs[0].text.contains("16 alarms"), "{}", jobs[0].text);
        // Repeating a refused condition records it once.
        b.when(40, "t/hot", true, 1000, Severity::Minor, "x")
            .unwrap();
        assert_eq!(b.untracked_count(), 16);
        // The clear of a refused alarm is recorded too.
        assert!(!b.clear(50, "c20/offline"));
        let t = transitions(&b.take_effects());
        assert_eq!(t, [("c20/offline".to_string(), Transition::Cleared)]);
        // Below 90 % again: relay/max_alarms clears.
        b.clear(60, "c0/offline");
        assert!(b.is_active(MAX_ALARMS_KEY));
        b.clear(60, "c1/offline");
        assert!(!b.is_active(MAX_ALARMS_KEY));
    }

    #[test]
    fn an_incident_survives_a_restart_and_clears_with_its_last_alarm() {
        let mut b = AlarmBook::new(&storm_cfg(""), 10_000);
        for i in 0..4 {
            b.raise(i, &format!("c{i}/offline"), Severity::Major, "x")
                .unwrap();
        }
        let mut stored: BTreeMap<String, serde_json::Value> = BTreeMap::new();
        for e in b.take_effects() {
            if let Effect::AlarmStore { key, record } = e {
                match record {
                    Some(r) => stored.insert(key, r),
                    None => stored.remove(&key),
                };
            }
        }
        assert_eq!(stored.len(), 5, "four alarms and the incident");
        assert_eq!(stored["c0/offline"]["incident"], "incident/offline");
        let alarms = stored
            .into_values()
            .map(|v| serde_json::from_value(v).unwrap())
            .collect();
        let mut c = AlarmBook::new(&storm_cfg(""), 10_000);
        c.restore(alarms, Vec::new());
        assert_eq!(c.get("incident/offline").unwrap().count, 4);
        // A fifth alarm of the kind joins the restored incident.
        c.raise(100, "c4/offline", Severity::Major, "x").unwrap();
        assert_eq!(c.get("incident/offline").unwrap().count, 5);
        for i in 0..5 {
            c.clear(200, &format!("c{i}/offline"));
            assert_eq!(c.is_active("incident/offline"), i < 4);
        }
    }

    #[test]
    fn thousands_are_grouped() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(1234567), "1,234,567");
    }
}
