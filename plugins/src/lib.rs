//! relay-plugins: operators' Rhai rules and hooks, alarms, notifiers, and the
//! Redis / MySQL sinks with their disk spool, on threads of their own.
//!
//! Shards hand `Event`s to [`PluginHost::events`] with a `try_send` that never
//! blocks; scripts answer with `Action`s on an executor-agnostic channel. Nothing
//! here depends on the shards' runtime.
//!
//! # Layout
//! - `event`: the boundary types (`Event`, `Action`, `ClientInfo`, `MessageEvent`).
//! - `host`: `PluginHost`, which starts and stops everything below.
//! - `host_config`: `HostConfig`, the four configuration sections the plugins use.
//! - `clock`: `now_ms`, the one wall clock every module reads.
//! - `worker`: script worker threads and the rules-folder watcher.
//! - `rules`: one worker's engine and compiled scripts; calls the hooks.
//! - `script`: the sandboxed engine, loading the folder, errors with file and line.
//! - `api`: the functions scripts call (alarms, state, counters, persist, send...).
//! - `effect`: what scripts and alarms ask for, before any IO.
//! - `alarm`: the alarm book: raise/clear/ack, `alarm_when`, escalation chains.
//! - `shared`: state shared by the threads, and the counters.
//! - `sink`: the sink thread (Redis and MySQL writers, alarm clock, notifiers);
//!   its `Dispatch` sends each effect to the writer or notifier it is for.
//! - `spool`: the on-disk spool behind each sink.
//! - `notify`: HTTP notifiers: templates, retries, rate limits, attempt records.
//! - `history`: the alarm history read back from MySQL, in pages.
//! - `records`: the notification log and devices' telemetry read back from MySQL.
//! - `registry`: every device ever seen, kept in Redis, for the fleet view.
//! - `cli`: `relay rules check` and `relay rules test`.
//! - `lint`: what `rules check` finds besides compile errors (unknown functions,
//!   variables functions cannot see, endless loops), and argument types in words.
pub mod actions;
pub mod alarm;
pub mod api;
pub mod cli;
pub mod clock;
pub mod effect;
pub mod event;
pub mod history;
pub mod host;
pub mod host_config;
pub mod lint;
pub mod notify;
pub mod records;
pub mod registry;
pub mod rules;
pub mod script;
pub mod shared;
pub mod sink;
pub mod spool;
pub mod worker;

pub use actions::{ActionReceiver, ActionSender};
pub use alarm::{AckError, AlarmView};
pub use effect::{AlarmEvent, Effect, NotifyJob, Transition};
pub use event::{Action, ClientInfo, Event, MessageEvent, RULES_SRC};
pub use host::{
    AlarmFilter, AlarmPage, AlarmTotals, BulkAck, EventSender, PluginError, PluginHost,
};
pub use host_config::HostConfig;
pub use shared::PluginStats;

#[cfg(test)]
mod tests {
    fn send_sync<T: Send + Sync>() {}

    #[test]
    fn handles_cross_threads() {
        // The shards keep these on their own threads.
        send_sync::<crate::PluginHost>();
        send_sync::<crate::EventSender>();
        send_sync::<crate::ActionReceiver>();
        send_sync::<crate::Event>();
        send_sync::<crate::Action>();
    }
}
