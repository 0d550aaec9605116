//! The shipped rules folder on a live host with Redis and MariaDB: status messages
//! land in `controller_status`, visits are counted per room, the device shadow is
//! kept, and an offline controller's pending alarm timer is stored in Redis.
mod common;

use std::time::Duration;

use common::*;
use redis::Commands;
use relay_config::plugins::{ColumnConfig, ColumnType, TableConfig};
use relay_plugins::{Event, PluginHost};
use serde_json::json;

#[test]
fn shipped_rules_work_live() {
    require_services();
    init_log();
    let (mut cfg, id) = config("shipped", &[], vec![]);
    cfg.plugins.dir = format!("{}/../config/rules", env!("CARGO_MANIFEST_DIR"));
    cfg.plugins.reload = false;
    let col = |n: &str, kind| ColumnConfig {
        name: n.into(),
        kind,
    };
    cfg.mysql.tables = vec![TableConfig {
        name: "controller_status".into(),
        columns: vec![
            col("addr", ColumnType::String),
            col("time_ms", ColumnType::Int),
            col("temp", ColumnType::Float),
            col("payload", ColumnType::Json),
        ],
    }];
    let (host, actions) = PluginHost::start_with(cfg).unwrap();
    let ev = host.events();
    let ctl = format!("{id}-ctl");
    let room = format!("{id}-room");

    // Status: shadow, row in MySQL, heater command above 95 °C.
    ev.try_send(msg(
        &ctl,
        json!({"type": "status", "temp": 97.5, "hum": 30}),
    ));
    let got = take_actions(&actions, 1, Duration::from_secs(5));
    assert_eq!(got.len(), 1, "heater_off command sent");
    let rows = wait_for(Duration::from_secs(5), "status row", || {
        mysql_rows_opt(&format!(
            "SELECT temp, payload FROM controller_status WHERE addr = '{ctl}'"
        ))
        .filter(|r| !r.is_empty())
    });
    assert_eq!(rows[0][0], "97.5");
    let payload: serde_json::Value = serde_json::from_str(&rows[0][1]).unwrap();
    assert_eq!(payload["hum"], 30);
    assert_eq!(host.state(&ctl).get("temp"), Some(&json!(97.5)));

    // Visits.
    for _ in 0..3 {
        ev.try_send(msg("door-1", json!({"type": "visit", "room": room})));
    }
    let mut r = redis();
    wait_for(Duration::from_secs(5), "visits counted", || {
        let v: Option<i64> = r
            .hget(format!("{id}:counters"), format!("visits/{room}"))
            .unwrap();
        (v == Some(3)).then_some(())
    });

    // Offline: the pending 30 s timer is stored; a reconnect forgets it.
    ev.try_send(Event::Disconnect(
        client(&ctl, "controller"),
        "error".into(),
    ));
    wait_for(Duration::from_secs(5), "offline timer stored", || {
        let v: Option<String> = r
            .hget(format!("{id}:alarm_watch"), format!("{ctl}/offline"))
            .unwrap();
        v
    });
    assert!(host.alarms().is_empty(), "not raised before 30 s");
    ev.try_send(Event::Connect(client(&ctl, "controller")));
    wait_for(Duration::from_secs(5), "offline timer forgotten", || {
        let v: Option<String> = r
            .hget(format!("{id}:alarm_watch"), format!("{ctl}/offline"))
            .unwrap();
        v.is_none().then_some(())
    });
    assert_eq!(host.stats().script_errors, 0);
    host.shutdown();
    let _ = mysql_rows_opt(&format!(
        "DELETE FROM controller_status WHERE addr = '{ctl}'"
    ));
    cleanup(&id, &[]);
}
