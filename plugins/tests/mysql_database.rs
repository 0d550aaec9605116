//! The MySQL database named in the URL does not exist: the relay creates it and
//! writes its tables there. When it cannot (a name it will not quote), it says why
//! once, not on every retry.
mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use relay_plugins::PluginHost;
use serde_json::json;

const RULES: &str = r#"
fn on_message(msg) { alarm_raise(`${msg.src}/door`, "minor", "door open"); }
"#;

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn capture() -> Captured {
    static LOG: std::sync::OnceLock<Captured> = std::sync::OnceLock::new();
    LOG.get_or_init(|| {
        let c = Captured::default();
        let w = c.clone();
        tracing_subscriber::fmt()
            .with_env_filter("info")
            .with_ansi(false)
            .with_writer(move || w.clone())
            .init();
        c
    })
    .clone()
}

#[test]
fn a_missing_database_is_created() {
    require_services();
    let _log = capture();
    let (mut cfg, id) = config("newdb", &[("d.rhai", RULES)], vec![]);
    let db = format!("{id}_db");
    let _ = mysql_rows_opt(&format!("DROP DATABASE IF EXISTS `{db}`"));
    cfg.mysql.url = format!("mysql://root@127.0.0.1:3306/{db}");
    let (host, _a) = PluginHost::start_with(cfg).unwrap();
    host.events().try_send(msg("d1", json!({})));
    let rows = wait_for(
        Duration::from_secs(20),
        "the alarm row in the new database",
        || {
            mysql_rows_opt(&format!(
                "SELECT alarm_key, transition FROM `{db}`.`{id}_alarms`"
            ))
            .filter(|r| !r.is_empty())
        },
    );
    assert_eq!(rows, [["d1/door", "raised"]]);
    host.shutdown();
    let _ = mysql_rows_opt(&format!("DROP DATABASE IF EXISTS `{db}`"));
    cleanup(&id, &[]);
}

#[test]
fn a_database_that_cannot_be_created_is_reported_once() {
    require_services();
    let log = capture();
    let (mut cfg, id) = config("baddb", &[("d.rhai", RULES)], vec![]);
    let db = format!("{id}-no-such-db");
    cfg.mysql.url = format!("mysql://root@127.0.0.1:3306/{db}");
    cfg.mysql.retry_ms = 50;
    let (host, _a) = PluginHost::start_with(cfg).unwrap();
    host.events().try_send(msg("d1", json!({})));
    std::thread::sleep(Duration::from_millis(1500));
    let text = String::from_utf8_lossy(&log.0.lock().unwrap()).into_owned();
    let lines: Vec<&str> = text.lines().filter(|l| l.contains(&db)).collect();
    assert_eq!(lines.len(), 1, "one line, not one per retry: {lines:#?}");
    assert!(
        lines[0].contains("does not exist") && lines[0].contains("create it yourself"),
        "{}",
        lines[0]
    );
    assert!(lines[0].contains("WARN"), "{}", lines[0]);
    // The write is kept for when the database exists.
    assert!(host.stats().sink_spooled >= 1);
    host.shutdown();
    cleanup(&id, &[]);
}
