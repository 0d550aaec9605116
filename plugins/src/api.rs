//! The functions the relay gives scripts (PLUGINS.md): alarms, notify, device
//! shadow, counters, persist, send/publish, log, now_ms.
//!
//! Each function records `Effect`s in the worker's call context; nothing here does
//! IO. Bad arguments become script errors (with the caller's line), never panics.
use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;

use bytes::Bytes;
use relay_config::plugins::{ColumnType, Severity};
use rhai::{Dynamic, Engine, EvalAltResult, Map as RhaiMap};
use serde_json::Value;

use crate::alarm::secs_to_ms;
use crate::effect::{Effect, NotifyJob};
use crate::event::Action;
use crate::shared::Shared;

type Res<T> = Result<T, Box<EvalAltResult>>;

/// What the functions of one worker need during a hook call.
#[derive(Debug)]
pub struct CallCtx {
    /// The clock of the current call (real or simulated), ms since the epoch.
    pub now_ms: u64,
    /// File of the script being called, for `log`.
    pub file: String,
    /// Effects recorded during the call.
    pub effects: Vec<Effect>,
    /// An alarm function ran (the alarm clock should look at its outbox).
    pub touched_alarms: bool,
    /// State shared with the other workers.
    pub shared: Arc<Shared>,
}

/// The call context of one worker.
pub type Ctx = Rc<RefCell<CallCtx>>;

fn err<T>(msg: impl Into<String>) -> Res<T> {
    Err(msg.into().into())
}

/// Converts a script value to JSON (blobs become arrays of bytes).
pub fn to_json(v: &Dynamic) -> Res<Value> {
    rhai::serde::from_dynamic::<Value>(v)
}

/// Converts JSON to a script value.
pub fn from_json(v: &Value) -> Dynamic {
    rhai::serde::to_dynamic(v).unwrap_or(Dynamic::UNIT)
}

fn severity(s: &str) -> Res<Severity> {
    Severity::parse(s)
        .ok_or_else(|| format!("unknown severity `{s}` (info, minor, major, critical)").into())
}

/// Payload of `send` / `publish`: blobs and strings go as they are, anything else as JSON.
fn payload(v: &Dynamic) -> Res<(Bytes, bool)> {
    if v.is_blob() {
        let b = v.clone().into_blob().unwrap_or_default();
        return Ok((Bytes::from(b), false));
    }
    if v.is_string() {
        let s = v.clone().into_immutable_string().unwrap_or_default();
        return Ok((Bytes::copy_from_slice(s.as_bytes()), false));
    }
    let j = to_json(v)?;
    Ok((
        Bytes::from(serde_json::to_vec(&j).unwrap_or_default()),
        true,
    ))
}

fn secs(v: &Dynamic) -> Res<u64> {
    let s = if let Ok(i) = v.as_int() {
        i as f64
    } else if let Ok(f) = v.as_float() {
        f
    } else {
        return err(format!(
            "duration must be a number of seconds, found {}",
            v.type_name()
        ));
    };
    secs_to_ms(s).map_err(|e| e.to_string().into())
}

fn column_value(table: &str, col: &str, kind: ColumnType, v: &Value) -> Res<()> {
    let ok = match kind {
        ColumnType::Int => v.is_i64() || v.is_u64() || v.is_null(),
        ColumnType::Float => v.is_number() || v.is_null(),
        ColumnType::Bool => v.is_boolean() || v.is_null(),
        ColumnType::String | ColumnType::Text => true,
        ColumnType::Json => true,
        _ => true,
    };
    if ok {
        Ok(())
    } else {
        err(format!("column `{table}.{col}` takes {kind:?}, found {v}"))
    }
}

/// Registers every relay function on `engine`, bound to `ctx`.
pub fn register(engine: &mut Engine, ctx: &Ctx) {
    // ---- alarms
    let c = ctx.clone();
    engine.register_fn(
        "alarm_when",
        move |key: &str, cond: bool, for_s: Dynamic, sev: &str, text: &str| -> Res<()> {
            let sev = severity(sev)?;
            let for_ms = secs(&for_s)?;
            let mut cx = c.borrow_mut();
            cx.touched_alarms = true;
            let now = cx.now_ms;
            cx.shared
                .book()
                .when(now, key, cond, for_ms, sev, text)
                .map_err(|e| e.to_string().into())
        },
    );
    let c = ctx.clone();
    engine.register_fn(
        "alarm_repeat",
        move |key: &str, cond: bool, n: i64, sev: &str, text: &str| -> Res<()> {
            let sev = severity(sev)?;
            if !(1..=1_000_000).contains(&n) {
                return err("alarm_repeat: times must be between 1 and 1000000");
            }
            let mut cx = c.borrow_mut();
            cx.touched_alarms = true;
            let now = cx.now_ms;
            cx.shared
                .book()
                .repeat(now, key, cond, n as u32, sev, text)
                .map_err(|e| e.to_string().into())
        },
    );
    let c = ctx.clone();
    engine.register_fn(
        "alarm_raise",
        move |key: &str, sev: &str, text: &str| -> Res<()> {
            let sev = severity(sev)?;
            let mut cx = c.borrow_mut();
            cx.touched_alarms = true;
            let now = cx.now_ms;
            cx.shared
                .book()
                .raise(now, key, sev, text)
                .map(|_| ())
                .map_err(|e| e.to_string().into())
        },
    );
    let c = ctx.clone();
    engine.register_fn("alarm_clear", move |key: &str| -> bool {
        let mut cx = c.borrow_mut();
        cx.touched_alarms = true;
        let now = cx.now_ms;
        cx.shared.book().clear(now, key)
    });
    let c = ctx.clone();
    engine.register_fn("alarm_active", move |key: &str| -> bool {
        c.borrow().shared.book().is_active(key)
    });

    // ---- notify
    let c = ctx.clone();
    engine.register_fn(
        "notify",
        move |channel: &str, target: &str, text: &str| -> Res<()> {
            let mut cx = c.borrow_mut();
            let known = cx.shared.channels.read().is_ok_and(|c| c.contains(channel));
            if !known {
                return err(format!("no notifier named `{channel}`"));
            }
            let now = cx.now_ms;
            cx.effects.push(Effect::Notify(NotifyJob {
                at_ms: now,
                channel: channel.to_string(),
                target: target.to_string(),
                route: String::new(),
                event: "message".into(),
                key: None,
                severity: None,
                text: text.to_string(),
                raised_at_ms: None,
                link: String::new(),
            }));
            Ok(())
        },
    );

    // ---- device shadow
    let c = ctx.clone();
    engine.register_fn(
        "state_set",
        move |addr: &str, field: &str, value: Dynamic| -> Res<()> {
            if addr.is_empty() || field.is_empty() || field.len() > 200 {
                return err(
                    "state_set: address and field must not be empty (field at most 200 chars)",
                );
            }
            let value = to_json(&value)?;
            let mut cx = c.borrow_mut();
            {
                let mut st = cx.shared.state_write();
                if !st.shadows.contains_key(addr) && st.shadows.len() >= cx.shared.max_state_addrs {
                    return err(format!(
                        "state_set: shadow cache full (max_state_addrs = {})",
                        cx.shared.max_state_addrs
                    ));
                }
                st.shadows
                    .entry(addr.to_string())
                    .or_default()
                    .insert(field.to_string(), value.clone());
            }
            cx.effects.push(Effect::StateSet {
                addr: addr.to_string(),
                field: field.to_string(),
                value,
            });
            Ok(())
        },
    );
    let c = ctx.clone();
    engine.register_fn("state_get", move |addr: &str, field: &str| -> Dynamic {
        let cx = c.borrow();
        let st = cx.shared.state_read();
        st.shadows
            .get(addr)
            .and_then(|m| m.get(field))
            .map(from_json)
            .unwrap_or(Dynamic::UNIT)
    });
    let c = ctx.clone();
    engine.register_fn("state_get", move |addr: &str| -> RhaiMap {
        let cx = c.borrow();
        let st = cx.shared.state_read();
        st.shadows
            .get(addr)
            .map(|m| {
                m.iter()
                    .map(|(k, v)| (k.as_str().into(), from_json(v)))
                    .collect()
            })
            .unwrap_or_default()
    });

    // ---- counters
    let c = ctx.clone();
    engine.register_fn("counter_add", move |key: &str, n: i64| -> Res<i64> {
        if key.is_empty() || key.len() > 200 {
            return err("counter_add: key must be 1 to 200 characters");
        }
        let mut cx = c.borrow_mut();
        let total = {
            let mut st = cx.shared.state_write();
            let v = st.counters.entry(key.to_string()).or_insert(0);
            *v = v.saturating_add(n);
            *v
        };
        cx.effects.push(Effect::CounterAdd {
            key: key.to_string(),
            n,
            total,
        });
        Ok(total)
    });
    let c = ctx.clone();
    engine.register_fn("counter_get", move |key: &str| -> i64 {
        c.borrow()
            .shared
            .state_read()
            .counters
            .get(key)
            .copied()
            .unwrap_or(0)
    });

    // ---- persist
    let c = ctx.clone();
    engine.register_fn("persist", move |table: &str, row: RhaiMap| -> Res<()> {
        let mut cx = c.borrow_mut();
        let shared = cx.shared.clone();
        let Some(cols) = shared.tables.get(table) else {
            if shared.strict_tables {
                return err(format!(
                    "persist: no table `{table}` declared in [[mysql.tables]]"
                ));
            }
            if !shared.mysql_enabled {
                shared.count(&shared.stats.persist_skipped);
            }
            // Not checked (MySQL off, no tables declared): kept for dry runs to show.
            let mut out = serde_json::Map::new();
            for (k, v) in row {
                out.insert(k.to_string(), to_json(&v)?);
            }
            cx.effects.push(Effect::Persist {
                table: table.to_string(),
                row: out,
            });
            return Ok(());
        };
        let mut out = serde_json::Map::new();
        for (k, v) in row {
            let Some((_, kind)) = cols.iter().find(|(n, _)| n.as_str() == k.as_str()) else {
                return err(format!("persist: table `{table}` has no column `{k}`"));
            };
            let v = to_json(&v)?;
            column_value(table, &k, *kind, &v)?;
            out.insert(k.to_string(), v);
        }
        if !shared.mysql_enabled {
            shared.count(&shared.stats.persist_skipped);
        }
        cx.effects.push(Effect::Persist {
            table: table.to_string(),
            row: out,
        });
        Ok(())
    });

    // ---- messages
    let c = ctx.clone();
    engine.register_fn("send", move |dst: &str, p: Dynamic| -> Res<()> {
        if dst.is_empty() {
            return err("send: empty destination");
        }
        let (payload, json) = payload(&p)?;
        c.borrow_mut().effects.push(Effect::Action(Action::Send {
            dst: dst.to_string(),
            payload,
            json,
        }));
        Ok(())
    });
    let c = ctx.clone();
    engine.register_fn("publish", move |group: &str, p: Dynamic| -> Res<()> {
        if group.is_empty() {
            return err("publish: empty group");
        }
        let (payload, json) = payload(&p)?;
        c.borrow_mut().effects.push(Effect::Action(Action::Publish {
            group: group.to_string(),
            payload,
            json,
        }));
        Ok(())
    });

    // ---- misc
    let c = ctx.clone();
    engine.register_fn("log", move |text: Dynamic| {
        let text = if text.is_string() {
            text.into_immutable_string().unwrap_or_default().to_string()
        } else {
            text.to_string()
        };
        let mut cx = c.borrow_mut();
        let file = cx.file.clone();
        cx.effects.push(Effect::Log { file, text });
    });
    let c = ctx.clone();
    engine.register_fn("now_ms", move || -> i64 { c.borrow().now_ms as i64 });
}
