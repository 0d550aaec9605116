//! A fleet-wide outage against real Redis, MariaDB and a local HTTP server standing
//! in for the SMS provider: 5,000 controllers drop at once. One incident
//! notification goes out (with the digest), every alarm is recorded in Redis and in
//! the alarm table, and the log stays small. With a full book, the alarms past
//! `max_alarms` are recorded as `untracked` and one critical `relay/max_alarms`
//! alarm sums them up.
mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use relay_config::plugins::NotifyConfig;
use relay_plugins::{Event, PluginHost};

const RULES: &str = r#"
fn on_disconnect(client, reason) {
    if client.role != "controller" { return; }
    alarm_raise(`${client.addr}/offline`, "major", `Controller ${client.addr} offline (${reason})`);
}
fn on_connect(client) {
    if client.role != "controller" { return; }
    alarm_clear(`${client.addr}/offline`);
}
"#;

/// Every log line of this test binary, at INFO and above.
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

impl Captured {
    fn install() -> Captured {
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

    fn lines(&self) -> Vec<String> {
        String::from_utf8_lossy(&self.0.lock().unwrap())
            .lines()
            .map(String::from)
            .collect()
    }
}

fn notify_cfg(port: u16, storm: &str) -> NotifyConfig {
    toml::from_str(&format!(
        r#"
        console_url = "https://relay.example.com"
        [[notifier]]
        name = "sms"
        url = "http://127.0.0.1:{port}/sms"
        body = '{{"to":{{{{target|json}}}},"text":{{{{text|json}}}},"event":"{{{{event}}}}","key":{{{{key|json}}}},"link":{{{{link|json}}}}}}'
        retries = 0
        [[route]]
        name = "oncall"
        chain = [{{ channel = "sms", target = "+100" }}]
        [storm]
        {storm}
        "#
    ))
    .unwrap()
}

fn controller(i: usize, group: &str) -> relay_plugins::ClientInfo {
    let mut c = client(&format!("ctl-{i:05}"), "controller");
    c.meta = serde_json::json!({"group": group});
    c
}

fn sms_bodies(server: &HttpServer) -> Vec<serde_json::Value> {
    server
        .requests()
        .into_iter()
        .map(|r| serde_json::from_str(&r.body).unwrap())
        .collect()
}

#[test]
fn five_thousand_controllers_dropping_make_one_incident_notification() {
    require_services();
    let log = Captured::install();
    let server = HttpServer::start(vec![200]);
    let (mut cfg, id) = config("storm", &[("offline.rhai", RULES)], vec![]);
    cfg.notify = notify_cfg(server.addr.port(), "hold_s = 2\ndigest_s = 10");
    let (host, _a) = PluginHost::start_with(cfg).unwrap();
    let ev = host.events();

    // 5,750 controllers of site-3 and 250 of site-4 are online; the 5,000 first drop.
    let fleet: Vec<_> = (0..6000)
        .map(|i| controller(i, if i < 5750 { "site-3" } else { "site-4" }))
        .collect();
    for c in &fleet {
        assert!(ev.try_send(Event::Connect(c.clone())), "connect queued");
    }
    let lines_before = log.lines().len();
    let storm_start = std::time::Instant::now();
    for c in &fleet[..5000] {
        assert!(
            ev.try_send(Event::Disconnect(c.clone(), "error".into())),
            "disconnect queued"
        );
    }
    wait_for(Duration::from_secs(30), "5,000 alarms in the book", || {
        (host.stats().alarms_active == 5001).then_some(())
    });

    // One notification: the incident's digest, once the storm has settled.
    let sent = wait_for(Duration::from_secs(20), "the incident notification", || {
        let b = sms_bodies(&server);
        (!b.is_empty()).then_some(b)
    });
    std::thread::sleep(Duration::from_secs(3)); // nothing else follows
    let sent_later = sms_bodies(&server);
    assert_eq!(sent_later.len(), 1, "{sent_later:#?}");
    let digest = &sent[0];
    assert_eq!(digest["key"], "incident/offline");
    assert_eq!(digest["event"], "raised");
    assert_eq!(digest["link"], "https://relay.example.com/#/alarms");
    let text = digest["text"].as_str().unwrap();
    assert!(
        text.starts_with("5,000 alarms of kind offline since "),
        "digest text: {text}"
    );
    // The first ten addresses raised (the workers interleave), then a count.
    assert_eq!(text.matches("ctl-0").count(), 10, "{text}");
    assert!(text.contains(" and 4,990 more"), "{text}");
    assert!(
        text.ends_with("; 86 % of group site-3 (5,000 of 5,750)"),
        "{text}"
    );

    // Every alarm is recorded: 5,000 rows in MariaDB, 5,000 records in Redis.
    let rows = wait_for(Duration::from_secs(120), "5,000 alarm rows", || {
        let r = mysql_rows_opt(&format!(
            "SELECT COUNT(*), COUNT(DISTINCT alarm_key) FROM `{id}_alarms` \
             WHERE transition = 'raised' AND alarm_key LIKE 'ctl-%/offline'"
        ))?;
        (r[0][0] == "5000").then_some(r)
    });
    assert_eq!(rows, [["5000", "5000"]]);
    let mut r = redis();
    let stored: Vec<String> = wait_for(Duration::from_secs(60), "alarms in Redis", || {
        let keys: Vec<String> = redis::cmd("HKEYS")
            .arg(format!("{id}:alarms"))
            .query(&mut r)
            .ok()?;
        (keys.len() == 5001).then_some(keys)
    });
    assert!(stored.iter().any(|k| k == "incident/offline"));
    let member: String = redis::cmd("HGET")
        .arg(format!("{id}:alarms"))
        .arg("ctl-04999/offline")
        .query(&mut r)
        .unwrap();
    let member: serde_json::Value = serde_json::from_str(&member).unwrap();
    assert_eq!(member["incident"], "incident/offline");

    // No log line per alarm: at most 10 a second, then a count of those left out.
    let storm_lines: Vec<String> = log.lines()[lines_before..].to_vec();
    let bound = 10 * (storm_start.elapsed().as_secs() as usize + 2);
    let per_alarm = storm_lines
        .iter()
        .filter(|l| l.contains("ctl-0") && l.contains("offline"))
        .count();
    assert!(
        per_alarm <= bound && per_alarm < 500,
        "{per_alarm} lines about single alarms:\n{}",
        storm_lines.join("\n")
    );
    // No warning or error about single alarms (a loaded machine may log a sink
    // timeout or two, never one line per alarm).
    let bad: Vec<&String> = storm_lines
        .iter()
        .filter(|l| l.contains("ERROR") || l.contains("WARN"))
        .collect();
    assert!(
        bad.len() < 10 && !bad.iter().any(|l| l.contains("ctl-0")),
        "{bad:#?}"
    );
    assert!(
        storm_lines
            .iter()
            .any(|l| l.contains("more alarm transitions not logged")),
        "the log says how many lines it left out"
    );

    // The fleet comes back: the incident clears with its last member, told once.
    for c in &fleet[..5000] {
        assert!(ev.try_send(Event::Connect(c.clone())));
    }
    let bodies = wait_for(Duration::from_secs(30), "the cleared notice", || {
        let b = sms_bodies(&server);
        (b.len() >= 2).then_some(b)
    });
    assert_eq!(bodies.len(), 2, "{bodies:#?}");
    assert_eq!(bodies[1]["event"], "cleared");
    assert_eq!(bodies[1]["key"], "incident/offline");
    assert_eq!(host.stats().alarms_active, 0);
    host.shutdown();
    cleanup(&id, &[]);
}

#[test]
fn a_full_book_records_every_alarm_and_raises_relay_max_alarms() {
    require_services();
    let _log = Captured::install();
    let server = HttpServer::start(vec![200]);
    let (mut cfg, id) = config("maxalarms", &[("offline.rhai", RULES)], vec![]);
    cfg.plugins.max_alarms = 1000;
    cfg.notify = notify_cfg(server.addr.port(), "enabled = false\ndigest_s = 1");
    cfg.notify.route[0].severities = vec![relay_config::plugins::Severity::Critical];
    let (host, _a) = PluginHost::start_with(cfg).unwrap();
    let ev = host.events();
    for i in 0..3000 {
        let c = client(&format!("box-{i:05}"), "controller");
        assert!(ev.try_send(Event::Disconnect(c, "error".into())));
    }
    let summary = wait_for(Duration::from_secs(30), "relay/max_alarms", || {
        host.alarms()
            .into_iter()
            .find(|a| a.key == "relay/max_alarms" && a.text.contains("2,000 alarms"))
    });
    assert_eq!(summary.severity, relay_config::plugins::Severity::Critical);
    assert!(
        summary
            .text
            .starts_with("max_alarms (1,000) reached: 2,000 alarms recorded but not tracked"),
        "{}",
        summary.text
    );
    assert_eq!(host.stats().alarms_untracked, 2000);
    assert_eq!(host.stats().script_errors, 0, "no script sees an error");
    let rows = wait_for(Duration::from_secs(120), "3,000 alarm rows", || {
        let r = mysql_rows_opt(&format!(
            "SELECT transition, COUNT(*) FROM `{id}_alarms` \
             WHERE alarm_key LIKE 'box-%/offline' GROUP BY transition ORDER BY transition"
        ))?;
        (r.iter().map(|x| x[1].parse::<u64>().unwrap()).sum::<u64>() == 3000).then_some(r)
    });
    assert_eq!(rows, [["raised", "1000"], ["untracked", "2000"]]);
    // One notification, for relay/max_alarms (the single alarms are major).
    let sent = wait_for(
        Duration::from_secs(10),
        "the max_alarms notification",
        || {
            let b = sms_bodies(&server);
            (!b.is_empty()).then_some(b)
        },
    );
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(sms_bodies(&server).len(), 1);
    assert_eq!(sent[0]["key"], "relay/max_alarms");
    host.shutdown();
    cleanup(&id, &[]);
}
