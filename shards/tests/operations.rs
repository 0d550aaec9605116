//! What an operator does with alarms and looks up, through the HTTP API of a real
//! relay: pages of alarms with totals, clear, shelve and bulk acknowledge; the
//! notification log with the provider's answer (a real HTTP provider on
//! loopback, real MariaDB); a device's telemetry over time from MariaDB.

mod common;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Client, Form, get, http, test_config, wait_for};
use relay_config::plugins::{
    ColumnConfig, ColumnType, NotifierConfig, RouteConfig, Severity, StepConfig, TableConfig,
};
use relay_core::frame::{Flags, Frame};
use relay_shards::Relay;
use serde_json::{Value, json};

const MYSQL_URL: &str = "mysql://root@127.0.0.1:3306/test";

struct Running {
    relay: Option<Relay>,
    host: Option<Arc<relay_plugins::PluginHost>>,
    dir: PathBuf,
}

impl Running {
    fn relay(&self) -> &Relay {
        self.relay.as_ref().unwrap()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        drop(self.relay.take());
        if let Some(h) = self.host.take().and_then(|h| Arc::try_unwrap(h).ok()) {
            h.shutdown();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn start(name: &str, rule: &str, tweak: impl FnOnce(&mut relay_config::Config)) -> Running {
    let dir = std::env::temp_dir().join(format!("relay-ops-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("rules")).unwrap();
    std::fs::write(dir.join("rules").join("ops.rhai"), rule).unwrap();
    let mut cfg = test_config();
    cfg.plugins.enabled = true;
    cfg.plugins.dir = dir.join("rules").display().to_string();
    cfg.plugins.spool_dir = dir.join("spool").display().to_string();
    cfg.plugins.timer_ms = 20;
    // These tests are about single alarms; storms have their own tests.
    cfg.notify.storm.enabled = false;
    tweak(&mut cfg);
    let (ext, host) = relay_shards::rules::attach(&cfg).expect("rules engine starts");
    let relay = Relay::start_with(&cfg, ext).expect("relay starts");
    Running {
        relay: Some(relay),
        host: Some(host),
        dir,
    }
}

fn json_to(dst: &str, v: Value) -> Frame {
    let mut f = Frame::data(
        bytes::Bytes::new(),
        dst.as_bytes().to_vec(),
        v.to_string().into_bytes(),
    );
    f.flags = Flags(Flags::JSON);
    f
}

fn post(relay: &Relay, path: &str, body: Value) -> (u16, Value) {
    http(relay, "POST", path, None, Some(&body))
}

const MANY_ALARMS: &str = r#"
fn on_message(msg) {
    let p = msg.payload;
    if type_of(p) != "map" || !("n" in p) { return; }
    for i in 0..p.n {
        alarm_raise(`${p.prefix}-${i}/offline`, p.sev, `${p.prefix}-${i} offline`);
    }
}
"#;

#[test]
fn alarm_pages_carry_totals_and_operators_clear_shelve_and_bulk_acknowledge() {
    let r = start("alarms", MANY_ALARMS, |_| {});
    let relay = r.relay();
    let _sink = Client::hello(relay.tcp_addr(), Form::Binary, "sink");
    let mut c = Client::hello(relay.tcp_addr(), Form::Json, "ctl-x");
    c.send(&json_to(
        "sink",
        json!({"n": 150, "sev": "major", "prefix": "site"}),
    ));
    c.send(&json_to(
        "sink",
        json!({"n": 30, "sev": "critical", "prefix": "core"}),
    ));
    wait_for(relay, "/api/v1/alarms?limit=1", |v| {
        v["total"] == json!(180)
    });

    // A page of 100 carries the totals of all 180.
    let (s, p) = get(relay, "/api/v1/alarms?limit=100");
    assert_eq!(s, 200);
    assert_eq!(p["items"].as_array().unwrap().len(), 100);
    assert_eq!(p["total"], 180);
    assert!(p["next"].is_string());
    let t = &p["totals"];
    assert_eq!(
        (
            t["active"].clone(),
            t["unacked"].clone(),
            t["major"].clone(),
            t["critical"].clone()
        ),
        (json!(180), json!(180), json!(150), json!(30))
    );
    let (_, crit) = get(relay, "/api/v1/alarms?severity=critical");
    assert_eq!(crit["total"], 30);
    assert_eq!(crit["items"].as_array().unwrap().len(), 30);
    assert_eq!(crit["totals"]["active"], 180, "totals ignore the filter");
    let (s, e) = get(relay, "/api/v1/alarms?severity=urgent");
    assert_eq!(s, 400);
    assert!(
        e["message"]
            .as_str()
            .unwrap()
            .contains("critical, major, minor or info")
    );

    // Bulk acknowledge by keys, then every major one.
    let (s, b) = post(
        relay,
        "/api/v1/alarms/ack",
        json!({"keys": ["core-0/offline", "core-1/offline", "core-1/offline", "no/such"], "by": "Ada"}),
    );
    assert_eq!(s, 200, "{b}");
    assert_eq!(
        b,
        json!({"acked": 2, "already": 1, "not_found": ["no/such"]})
    );
    let (s, b) = post(
        relay,
        "/api/v1/alarms/ack",
        json!({"all": true, "severity": "major", "by": "Ada"}),
    );
    assert_eq!(s, 200);
    assert_eq!(b["acked"], 150);
    let (_, p) = get(relay, "/api/v1/alarms?acked=false");
    assert_eq!(p["total"], 28);
    assert_eq!(p["totals"]["unacked"], 28);
    let (_, a) = get(relay, "/api/v1/alarms?prefix=core-0/");
    assert_eq!(a["items"][0]["acked_by"], "Ada");
    for bad in [
        json!({}),
        json!({"keys": []}),
        json!({"keys": [1]}),
        json!({"all": "yes"}),
    ] {
        let (s, e) = post(relay, "/api/v1/alarms/ack", bad.clone());
        assert_eq!(s, 400, "{bad} → {e}");
    }

    // Clear: gone from the active list; a second clear finds nothing.
    let (s, _) = post(
        relay,
        "/api/v1/alarms/core-5%2Foffline/clear",
        json!({"by": "Ada"}),
    );
    assert_eq!(s, 200);
    let (s, _) = post(
        relay,
        "/api/v1/alarms/core-5%2Foffline/clear",
        json!({"by": "Ada"}),
    );
    assert_eq!(s, 404);
    let (_, p) = get(relay, "/api/v1/alarms?limit=1");
    assert_eq!(p["totals"]["active"], 179);

    // Shelve for a minute, then unshelve.
    let before = relay_plugins::clock::now_ms();
    let (s, a) = post(
        relay,
        "/api/v1/alarms/core-6%2Foffline/shelve",
        json!({"by": "Ada", "for_s": 60}),
    );
    assert_eq!(s, 200, "{a}");
    let until = a["shelved_until_ms"].as_u64().unwrap();
    assert!(until >= before + 59_000 && until <= before + 61_000 + 5_000);
    assert_eq!(a["shelved_by"], "Ada");
    let (_, p) = get(relay, "/api/v1/alarms?limit=1");
    assert_eq!(p["totals"]["shelved"], 1);
    assert_eq!(p["totals"]["open"], 26, "unacked 27 less the shelved one");
    for bad in [
        json!({"for_s": 0}),
        json!({"for_s": -5}),
        json!({"for_s": 31 * 86400}),
        json!({}),
    ] {
        let (s, _) = post(relay, "/api/v1/alarms/core-6%2Foffline/shelve", bad.clone());
        assert_eq!(s, 400, "{bad}");
    }
    let (s, _) = post(
        relay,
        "/api/v1/alarms/no%2Fsuch/shelve",
        json!({"for_s": 5}),
    );
    assert_eq!(s, 404);
    let (s, a) = post(
        relay,
        "/api/v1/alarms/core-6%2Foffline/unshelve",
        json!({"by": "Ada"}),
    );
    assert_eq!(s, 200);
    assert!(a["shelved_until_ms"].is_null());

    // Without MySQL the log and the telemetry say what they need.
    let (s, e) = get(relay, "/api/v1/notifications");
    assert_eq!(s, 503);
    assert!(e["message"].as_str().unwrap().contains("mysql"), "{e}");
    let (s, _) = get(relay, "/api/v1/devices/ctl-x/history");
    assert_eq!(s, 503);
}

/// A voice/SMS provider on loopback: answers each request with 200 and
/// `{"sid": "SM<n>"}`, and keeps the bodies it got.
struct Provider {
    url: String,
    got: Arc<Mutex<Vec<Value>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Provider {
    fn start() -> Provider {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.set_nonblocking(true).unwrap();
        let url = format!("http://{}/send", l.local_addr().unwrap());
        let got = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (g, s) = (got.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut n = 0;
            // Bounded: stops when told, or after 2 minutes whatever happens.
            let until = Instant::now() + Duration::from_secs(120);
            while !s.load(Ordering::Relaxed) && Instant::now() < until {
                let Ok((mut sock, _)) = l.accept() else {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                };
                sock.set_nonblocking(false).unwrap();
                sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                let body = loop {
                    let Ok(k) = sock.read(&mut chunk) else {
                        break None;
                    };
                    if k == 0 {
                        break None;
                    }
                    buf.extend_from_slice(&chunk[..k]);
                    let text = String::from_utf8_lossy(&buf).to_string();
                    if let Some((head, body)) = text.split_once("\r\n\r\n") {
                        let len = head
                            .lines()
                            .find_map(|l| {
                                let (k, v) = l.split_once(':')?;
                                k.eq_ignore_ascii_case("content-length")
                                    .then(|| v.trim().parse::<usize>().ok())?
                            })
                            .unwrap_or(0);
                        if body.len() >= len {
                            break Some(body.to_string());
                        }
                    }
                };
                n += 1;
                if let Some(b) = body {
                    g.lock()
                        .unwrap()
                        .push(serde_json::from_str(&b).unwrap_or(json!(b)));
                }
                let answer = format!("{{\"sid\": \"SM{n}\"}}");
                let _ = write!(
                    sock,
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{answer}",
                    answer.len()
                );
            }
        });
        Provider {
            url,
            got,
            stop,
            thread: Some(thread),
        }
    }

    fn calls(&self, key: &str, to: &str) -> usize {
        self.got
            .lock()
            .unwrap()
            .iter()
            .filter(|v| v["key"] == key && v["to"] == to)
            .count()
    }
}

impl Drop for Provider {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn mysql_exec(sql: &str) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        use mysql_async::prelude::Queryable;
        let mut c = mysql_async::Conn::new(mysql_async::Opts::from_url(MYSQL_URL).unwrap())
            .await
            .expect("MariaDB reachable at 127.0.0.1:3306");
        c.query_drop(sql).await.unwrap();
        let _ = c.disconnect().await;
    });
}

fn col(name: &str, kind: ColumnType) -> ColumnConfig {
    ColumnConfig {
        name: name.into(),
        kind,
    }
}

#[test]
fn shelving_holds_escalation_and_the_log_and_telemetry_come_from_mysql() {
    let pid = std::process::id();
    let (alarms, notify, readings, status) = (
        format!("ops_test_alarms_{pid}"),
        format!("ops_test_notify_{pid}"),
        format!("ops_test_readings_{pid}"),
        format!("ops_test_status_{pid}"),
    );
    let drop_tables = || {
        mysql_exec(&format!(
            "DROP TABLE IF EXISTS {alarms}, {notify}, {readings}, {status}"
        ))
    };
    drop_tables();
    let provider = Provider::start();
    let rule = format!(
        r#"
fn on_message(msg) {{
    let p = msg.payload;
    if type_of(p) != "map" {{ return; }}
    if "raise" in p {{ alarm_raise(p.raise, "critical", `${{p.raise}} is hot`); }}
    if "temp" in p {{
        persist("{readings}", #{{ addr: msg.src, at_ms: p.at, temp: p.temp, rssi: p.rssi }});
        persist("{status}", #{{ addr: msg.src, time_ms: p.at, temp: p.temp, note: "x" }});
    }}
}}
"#
    );
    let url = provider.url.clone();
    let (a_t, n_t, r_t, s_t) = (
        alarms.clone(),
        notify.clone(),
        readings.clone(),
        status.clone(),
    );
    let r = start("log", &rule, move |cfg| {
        cfg.mysql.enabled = true;
        cfg.mysql.url = MYSQL_URL.into();
        cfg.mysql.alarm_table = a_t;
        cfg.mysql.notify_table = n_t;
        cfg.mysql.tables = vec![
            TableConfig {
                name: r_t,
                columns: vec![
                    col("addr", ColumnType::String),
                    col("at_ms", ColumnType::Int),
                    col("temp", ColumnType::Float),
                    col("rssi", ColumnType::Int),
                ],
            },
            // Timed by `time_ms`, as the shipped controller_status table is.
            TableConfig {
                name: s_t,
                columns: vec![
                    col("addr", ColumnType::String),
                    col("time_ms", ColumnType::Int),
                    col("temp", ColumnType::Float),
                    col("note", ColumnType::String),
                ],
            },
        ];
        cfg.notify.notifier = vec![NotifierConfig {
            name: "sms".into(),
            url,
            method: "POST".into(),
            body: r#"{"to": {{target|json}}, "key": {{key|json}}, "event": {{event|json}}}"#.into(),
            retries: 0,
            ..NotifierConfig::default()
        }];
        cfg.notify.route = vec![RouteConfig {
            name: "on-call".into(),
            severities: vec![Severity::Critical],
            chain: vec![
                StepConfig {
                    channel: "sms".into(),
                    target: "+1000".into(),
                    after_s: 0.0,
                },
                StepConfig {
                    channel: "sms".into(),
                    target: "+2000".into(),
                    after_s: 2.0,
                },
            ],
            notify_clear: false,
            ..RouteConfig::default()
        }];
    });
    let relay = r.relay();
    let _sink = Client::hello(relay.tcp_addr(), Form::Binary, "sink");
    let mut c = Client::hello(relay.tcp_addr(), Form::Json, "ctl-t");
    c.send(&json_to("sink", json!({"raise": "pump-a/hot"})));
    c.send(&json_to("sink", json!({"raise": "pump-b/hot"})));
    wait_for(relay, "/api/v1/alarms", |v| v["total"] == json!(2));
    let (s, _) = post(
        relay,
        "/api/v1/alarms/pump-a%2Fhot/shelve",
        json!({"by": "Ada", "for_s": 600}),
    );
    assert_eq!(s, 200);

    // The escalation step of b goes out after 2 s; a's waits on the shelf.
    let until = Instant::now() + Duration::from_secs(15);
    while provider.calls("pump-b/hot", "+2000") == 0 {
        assert!(
            Instant::now() < until,
            "b's second step never reached the provider"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        provider.calls("pump-a/hot", "+1000"),
        1,
        "the first step went out at the raise"
    );
    assert_eq!(
        provider.calls("pump-a/hot", "+2000"),
        0,
        "shelved: no escalation"
    );

    // The notification log: who, through which notifier, when, the provider's answer.
    let log = wait_for(relay, "/api/v1/notifications?key=pump-b%2Fhot", |v| {
        v["items"].as_array().is_some_and(|i| i.len() == 2)
    });
    let newest = &log["items"][0];
    assert_eq!(newest["target"], "+2000");
    assert_eq!(newest["channel"], "sms");
    assert_eq!(newest["status"], "sent");
    assert_eq!(newest["http_status"], 200);
    assert!(
        newest["response"]
            .as_str()
            .unwrap()
            .contains("\"sid\": \"SM"),
        "{newest}"
    );
    assert!(newest["at_ms"].as_u64().unwrap() >= log["items"][1]["at_ms"].as_u64().unwrap());
    let (_, page) = get(relay, "/api/v1/notifications?limit=1");
    assert_eq!(page["items"].as_array().unwrap().len(), 1);
    let next = page["next"].as_u64().expect("a next page");
    let (_, older) = get(
        relay,
        &format!("/api/v1/notifications?limit=10&after={next}"),
    );
    assert_eq!(
        older["items"].as_array().unwrap().len(),
        2,
        "3 attempts in all"
    );
    let (s, _) = get(relay, "/api/v1/notifications?after=abc");
    assert_eq!(s, 400);

    // Unshelving lets a's escalation go out.
    let (s, _) = post(
        relay,
        "/api/v1/alarms/pump-a%2Fhot/unshelve",
        json!({"by": "Ada"}),
    );
    assert_eq!(s, 200);
    let until = Instant::now() + Duration::from_secs(15);
    while provider.calls("pump-a/hot", "+2000") == 0 {
        assert!(
            Instant::now() < until,
            "a's step never went out after the unshelve"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // The shelve is in the alarm history with who did it.
    let h = wait_for(relay, "/api/v1/alarms/history", |v| {
        v["items"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["transition"] == "unshelved")
    });
    assert!(
        h["items"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["transition"] == "shelved"
                && e["acked_by"] == "Ada"
                && e["key"] == "pump-a/hot")
    );

    // Telemetry over time, oldest first.
    for (i, t) in [20.5, 21.0, 22.5, 21.5, 23.0].iter().enumerate() {
        c.send(&json_to(
            "sink",
            json!({"temp": t, "rssi": -60 - i as i64, "at": 1_700_000_000_000u64 + i as u64 * 60_000}),
        ));
    }
    let s = wait_for(relay, "/api/v1/devices/ctl-t/history", |v| {
        v["items"].as_array().is_some_and(|i| i.len() == 5)
    });
    assert_eq!(s["table"], readings.as_str());
    assert_eq!(s["fields"], json!(["temp", "rssi"]));
    let temps: Vec<f64> = s["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["temp"].as_f64().unwrap())
        .collect();
    assert_eq!(temps, [20.5, 21.0, 22.5, 21.5, 23.0]);
    assert_eq!(s["items"][0]["at_ms"], 1_700_000_000_000u64);
    assert_eq!(s["items"][4]["rssi"], -64);
    let (_, one) = get(relay, "/api/v1/devices/ctl-t/history?field=temp&limit=2");
    assert_eq!(one["fields"], json!(["temp"]));
    let temps: Vec<f64> = one["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["temp"].as_f64().unwrap())
        .collect();
    assert_eq!(temps, [21.5, 23.0], "the newest two, oldest first");
    let (_, since) = get(
        relay,
        "/api/v1/devices/ctl-t/history?since_ms=1700000180000",
    );
    assert_eq!(since["items"].as_array().unwrap().len(), 2);
    let (s, st) = get(
        relay,
        &format!("/api/v1/devices/ctl-t/history?table={status}"),
    );
    assert_eq!(s, 200, "{st}");
    assert_eq!(
        st["fields"],
        json!(["temp"]),
        "the time and text columns are no series"
    );
    assert_eq!(st["items"].as_array().unwrap().len(), 5);
    assert_eq!(st["items"][4]["at_ms"], 1_700_000_240_000u64);
    let (_, other) = get(relay, "/api/v1/devices/ctl-none/history");
    assert_eq!(other["items"], json!([]));
    for bad in ["table=nope", "field=addr", "limit=x"] {
        let (s, e) = get(relay, &format!("/api/v1/devices/ctl-t/history?{bad}"));
        assert_eq!(s, 400, "{bad}: {e}");
    }
    drop(c);
    drop(r);
    drop(provider);
    drop_tables();
}

const RAISE: &str = r#"
fn on_message(msg) {
    let p = msg.payload;
    if type_of(p) == "map" && "raise" in p { alarm_raise(p.raise, "critical", `${p.raise} is hot`); }
}
"#;

#[test]
fn a_reload_brings_new_notifiers_and_routes_without_a_restart() {
    let provider = Provider::start();
    let r = start("reload-notify", RAISE, |_| {});
    let relay = r.relay();
    let _sink = Client::hello(relay.tcp_addr(), Form::Binary, "sink");
    let mut c = Client::hello(relay.tcp_addr(), Form::Json, "ctl-r");
    // No notifier and no route yet: the alarm pages nobody.
    c.send(&json_to("sink", json!({"raise": "pump-y/hot"})));
    wait_for(relay, "/api/v1/alarms", |v| v["total"] == json!(1));

    // The operator adds a notifier and an on-call route, then reloads.
    let mut new = test_config();
    new.plugins.enabled = true;
    new.notify.storm.enabled = false;
    new.notify.notifier = vec![NotifierConfig {
        name: "sms".into(),
        url: provider.url.clone(),
        method: "POST".into(),
        body: r#"{"to": {{target|json}}, "key": {{key|json}}, "event": {{event|json}}}"#.into(),
        retries: 0,
        ..NotifierConfig::default()
    }];
    new.notify.route = vec![RouteConfig {
        name: "on-call".into(),
        severities: vec![Severity::Critical],
        chain: vec![StepConfig {
            channel: "sms".into(),
            target: "+3000".into(),
            after_s: 0.0,
        }],
        ..RouteConfig::default()
    }];
    let report = relay.reload(&new);
    assert!(
        report.applied.iter().any(|k| k == "notify.route")
            && report.applied.iter().any(|k| k == "notify.notifier"),
        "{report:?}"
    );
    assert!(
        !report
            .needs_restart
            .iter()
            .any(|k| k.starts_with("notify.")),
        "{report:?}"
    );

    // An alarm raised after the reload follows the new route.
    c.send(&json_to("sink", json!({"raise": "pump-z/hot"})));
    let until = Instant::now() + Duration::from_secs(15);
    while provider.calls("pump-z/hot", "+3000") == 0 {
        assert!(Instant::now() < until, "the reloaded route never paged");
        std::thread::sleep(Duration::from_millis(50));
    }
    // The alarm raised before keeps the (empty) chain it started with.
    assert_eq!(provider.calls("pump-y/hot", "+3000"), 0);
}
