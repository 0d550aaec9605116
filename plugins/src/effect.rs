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
    /// Condition gone; the alarm is over.
    Cleared,
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
        f
    }
}
