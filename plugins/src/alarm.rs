//! The alarm book: active alarms, `alarm_when` / `alarm_repeat` timers, and the
//! escalation chains of the notify routes, as a plain state machine on a clock
//! that is passed in (`now_ms`).
//!
//! Every change leaves effects in an outbox (`take_effects`): transitions for the
//! history table, stored records for Redis (so alarms and timers survive a restart)
//! and notifier jobs. The live host drains it from its alarm clock; `rules test`
//! drains it on a simulated clock.
use std::collections::{BTreeMap, HashMap};

use relay_config::plugins::{NotifyConfig, QuietHours, Severity};
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

impl AlarmBook {
    /// An empty book with the routes of `notify`.
    pub fn new(notify: &NotifyConfig, max_alarms: usize) -> AlarmBook {
        let routes = notify
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
            .collect();
        AlarmBook {
            alarms: BTreeMap::new(),
            watches: HashMap::new(),
            routes,
            utc_offset_min: notify.utc_offset_min,
            max_alarms,
            outbox: Vec::new(),
        }
    }

    /// Restores alarms and timers saved by an earlier run (no effects are produced).
    /// Keys already in the book are kept as they are: they are newer.
    pub fn restore(&mut self, alarms: Vec<Alarm>, watches: Vec<(String, Watch)>) {
        for a in alarms {
            self.alarms.entry(a.key.clone()).or_insert(a);
        }
        for (k, w) in watches {
            self.watches.entry(k).or_insert(w);
        }
    }

    /// Takes the effects produced since the last call, oldest first.
    pub fn take_effects(&mut self) -> Vec<Effect> {
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

    fn check_key(&self, key: &str, new_entry: bool) -> Result<(), AlarmError> {
        if key.is_empty() || key.len() > 200 {
            return Err(AlarmError::BadKey);
        }
        if new_entry && self.alarms.len() + self.watches.len() >= self.max_alarms {
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
    fn steps_for(&self, key: &str, severity: Severity, from_ms: u64) -> Vec<Step> {
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
        steps
    }

    /// `alarm_raise`: raises `key`, escalates it when `severity` is worse, or counts a
    /// repeat. Returns the transition that happened, if any.
    pub fn raise(
        &mut self,
        now: u64,
        key: &str,
        severity: Severity,
        text: &str,
    ) -> Result<Option<Transition>, AlarmError> {
        let exists = self.alarms.contains_key(key);
        self.check_key(key, !exists && !self.watches.contains_key(key))?;
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
            steps.extend(self.steps_for(key, severity, now));
            if let Some(a) = self.alarms.get_mut(key) {
                a.steps = steps;
            }
            self.event(now, &a, Transition::Escalated, None);
            self.fire_steps(now, key, "escalated");
            self.store_alarm(key);
            return Ok(Some(Transition::Escalated));
        }
        let a = Alarm {
            key: key.to_string(),
            severity,
            text: text.to_string(),
            raised_at_ms: now,
            updated_at_ms: now,
            count: 1,
            acked_by: None,
            acked_at_ms: None,
            steps: self.steps_for(key, severity, now),
            escalated: false,
            shelved_until_ms: None,
            shelved_by: None,
        };
        self.event(now, &a, Transition::Raised, None);
        self.alarms.insert(key.to_string(), a);
        self.fire_steps(now, key, "raised");
        self.store_alarm(key);
        Ok(Some(Transition::Raised))
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
            }));
        }
        self.store_alarm(key);
        true
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
        self.check_key(key, !has_watch && !active)?;
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
        self.check_key(key, !has_watch && !active)?;
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
        let mut jobs = Vec::new();
        for s in a.steps.iter_mut().filter(|s| !s.done && s.due_ms <= now) {
            if let Some(q) = s.quiet
                && quiet_until(q, now, self.utc_offset_min).is_some()
            {
                continue;
            }
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
            });
        }
        let fired = !jobs.is_empty();
        self.outbox.extend(jobs.into_iter().map(Effect::Notify));
        if fired {
            self.store_alarm(key);
        }
    }

    /// Runs every timer and escalation step due at `now`.
    pub fn poll(&mut self, now: u64) {
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
                let now = crate::host::now_ms();
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
            Err(AlarmError::TooMany(2))
        );
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
}
