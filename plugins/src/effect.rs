//! What running a script (or the alarm clock) asks the outside world to do.
//!
//! Scripts and the alarm book only produce `Effect`s; the live host turns them into
//! shard actions, sink writes and notifier requests, while `relay rules test` prints
//! them. That split keeps the rule logic free of IO and testable on a fake clock.
use std::collections::BTreeMap;

use relay_config::plugins::Severity;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::event::Action;

/// One thing a script or the alarm clock wants done.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Effect {
    /// A message from `$rules` to a client or group.
    Action(Action),
    /// Device shadow field written (`state_set`).
    StateSet {
        addr: String,
        field: String,
        value: Value,
    },
    /// Counter incremented (`counter_add`); `total` is the value after it.
    CounterAdd { key: String, n: i64, total: i64 },
    /// Presence of an address: `Some(info)` online, `None` offline.
    Presence { addr: String, info: Option<Value> },
    /// Row appended to a declared MySQL table (`persist`).
    Persist {
        table: String,
        row: serde_json::Map<String, Value>,
    },
    /// An alarm changed state; recorded in the alarm history.
    Alarm(AlarmEvent),
    /// The stored form of an alarm (`None`: gone), kept in Redis across restarts.
    AlarmStore { key: String, record: Option<Value> },
    /// The stored form of an alarm timer (`alarm_when` / `alarm_repeat`).
    WatchStore { key: String, watch: Option<Value> },
    /// A notifier request to make (alarm route step or `notify()`).
    Notify(NotifyJob),
    /// A `log()` line from a script.
    Log { file: String, text: String },
}

/// What happened to an alarm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Transition {
    /// First raised (or raised again after a clear).
    Raised,
    /// Raised again with a worse severity while active.
    Escalated,
    /// Someone took it; escalation stops.
    Acknowledged,
    /// Condition gone (or cleared by an operator); the alarm is over.
    Cleared,
    /// An operator silenced it for a while.
    Shelved,
    /// An operator ended the silence early.
    Unshelved,
    /// Raised while the book was full (`max_alarms`): recorded and counted in the
    /// `relay/max_alarms` alarm, but not tracked (no timer, no notification).
    Untracked,
}

impl Transition {
    /// Lowercase name, as stored and shown.
    pub fn as_str(self) -> &'static str {
        match self {
            Transition::Raised => "raised",
            Transition::Escalated => "escalated",
            Transition::Acknowledged => "acknowledged",
            Transition::Cleared => "cleared",
            Transition::Shelved => "shelved",
            Transition::Unshelved => "unshelved",
            Transition::Untracked => "untracked",
        }
    }
}

/// One alarm transition, as persisted to the history table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AlarmEvent {
    /// When, ms since the Unix epoch.
    pub at_ms: u64,
    /// Alarm key.
    pub key: String,
    /// Which transition.
    pub transition: Transition,
    /// Severity after the transition.
    pub severity: Severity,
    /// Alarm text at that moment.
    pub text: String,
    /// Who acknowledged (for `acknowledged`).
    pub by: Option<String>,
}

/// One notification to deliver through a channel.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NotifyJob {
    /// When it was decided, ms since the Unix epoch.
    pub at_ms: u64,
    /// Notifier name, or `log`.
    pub channel: String,
    /// Who is reached (`{{target}}`).
    pub target: String,
    /// Route that produced it (empty for `notify()` from a script).
    pub route: String,
    /// `raised`, `escalated`, `cleared` for alarms; `message` for `notify()`.
    pub event: String,
    /// The alarm, when this is about one.
    pub key: Option<String>,
    /// Its severity.
    pub severity: Option<Severity>,
    /// The text to deliver.
    pub text: String,
    /// When the alarm was raised.
    pub raised_at_ms: Option<u64>,
    /// Where the console shows the alarm (empty without `[notify] console_url`).
    #[serde(default)]
    pub link: String,
}

impl NotifyJob {
    /// The fields a notifier template may use.
    pub fn fields(&self) -> BTreeMap<&'static str, String> {
        let mut f = BTreeMap::new();
        f.insert("channel", self.channel.clone());
        f.insert("target", self.target.clone());
        f.insert("route", self.route.clone());
        f.insert("event", self.event.clone());
        f.insert("key", self.key.clone().unwrap_or_default());
        f.insert(
            "severity",
            self.severity
                .map(|s| s.as_str().to_string())
                .unwrap_or_default(),
        );
        f.insert("text", self.text.clone());
        f.insert("time_ms", self.at_ms.to_string());
        f.insert(
            "raised_at_ms",
            self.raised_at_ms.map(|t| t.to_string()).unwrap_or_default(),
        );
        f.insert("link", self.link.clone());
        f.insert("state", self.state().to_string());
        f.insert("message", self.message());
        f
    }

    /// `RAISED`, `ESCALATED` or `CLEARED` for alarms (empty for `notify()`), so a
    /// template can make the clear notice read differently from the alarm.
    pub fn state(&self) -> &'static str {
        match self.event.as_str() {
            "raised" => "RAISED",
            "escalated" => "ESCALATED",
            "cleared" => "CLEARED",
            _ => "",
        }
    }

    /// The notification as one line for people (`{{message}}`, the default text):
    /// `RAISED major: <text>`, `CLEARED after 12 min (was major): <text>`, then the
    /// console link when there is one. For `notify()` it is the text itself.
    pub fn message(&self) -> String {
        let sev = self.severity.map(|s| s.as_str()).unwrap_or("");
        let mut m = match self.state() {
            "" => self.text.clone(),
            "CLEARED" => {
                let lasted = self
                    .raised_at_ms
                    .map(|r| self.at_ms.saturating_sub(r))
                    .map(|ms| format!(" after {}", human_duration(ms)))
                    .unwrap_or_default();
                format!("CLEARED{lasted} (was {sev}): {}", self.text)
            }
            state => format!("{state} {sev}: {}", self.text),
        };
        if !self.link.is_empty() {
            m.push(' ');
            m.push_str(&self.link);
        }
        m
    }
}

/// `45 s`, `12 min`, `3 h 5 min`, `2 d 4 h`.
pub fn human_duration(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        0..60 => format!("{s} s"),
        60..3600 => format!("{} min", s / 60),
        3600..86_400 => match (s / 3600, s % 3600 / 60) {
            (h, 0) => format!("{h} h"),
            (h, m) => format!("{h} h {m} min"),
        },
        _ => match (s / 86_400, s % 86_400 / 3600) {
            (d, 0) => format!("{d} d"),
            (d, h) => format!("{d} d {h} h"),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(event: &str) -> NotifyJob {
        NotifyJob {
            at_ms: 12 * 60_000 + 5_000,
            channel: "sms".into(),
            target: "+1".into(),
            route: "oncall".into(),
            event: event.into(),
            key: Some("ctl-1/offline".into()),
            severity: Some(Severity::Major),
            text: "ctl-1 offline".into(),
            raised_at_ms: Some(5_000),
            link: String::new(),
        }
    }

    #[test]
    fn the_clear_notice_reads_differently_from_the_alarm() {
        assert_eq!(job("raised").message(), "RAISED major: ctl-1 offline");
        assert_eq!(
            job("cleared").message(),
            "CLEARED after 12 min (was major): ctl-1 offline"
        );
        assert_eq!(job("escalated").fields()["state"], "ESCALATED");
        let mut m = job("message");
        m.severity = None;
        m.key = None;
        assert_eq!(m.message(), "ctl-1 offline");
        assert_eq!(m.fields()["state"], "");
        let mut l = job("raised");
        l.link = "https://r.example/#/alarms".into();
        assert_eq!(
            l.fields()["message"],
            "RAISED major: ctl-1 offline https://r.example/#/alarms"
        );
    }

    #[test]
    fn durations_read_like_people_say_them() {
        assert_eq!(human_duration(45_000), "45 s");
        assert_eq!(human_duration(12 * 60_000), "12 min");
        assert_eq!(human_duration(3 * 3_600_000), "3 h");
        assert_eq!(human_duration(3 * 3_600_000 + 5 * 60_000), "3 h 5 min");
        assert_eq!(human_duration(2 * 86_400_000 + 4 * 3_600_000), "2 d 4 h");
    }
}
