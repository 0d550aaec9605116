//! A fleet-wide outage through the real relay: 5,000 controllers connect over TCP,
//! then all drop at once. With real Redis and MariaDB, and a local HTTP server as
//! the SMS provider: one incident notification with the digest, 5,000 alarm rows,
//! 5,000 alarm records in Redis, and no log line per alarm.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Client, Form, test_config};
use relay_shards::Relay;

const FLEET: usize = 5000;

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

/// Every log line of this test binary.
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

/// A local HTTP/1.1 server standing in for the SMS provider: records each body.
struct Provider {
    port: u16,
    bodies: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
}

impl Provider {
    fn start() -> Provider {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let bodies = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (b2, s2) = (bodies.clone(), stop.clone());
        std::thread::spawn(move || {
            let until = Instant::now() + Duration::from_secs(300);
            while !s2.load(Ordering::Relaxed) && Instant::now() < until {
                let Ok((sock, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                };
                sock.set_nonblocking(false).unwrap();
                sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                let mut r = BufReader::new(sock.try_clone().unwrap());
                let mut len = 0usize;
                let mut line = String::new();
                while r.read_line(&mut line).is_ok_and(|n| n > 0) && !line.trim().is_empty() {
                    if let Some((k, v)) = line.trim().split_once(':')
                        && k.eq_ignore_ascii_case("content-length")
                    {
                        len = v.trim().parse().unwrap_or(0);
                    }
                    line.clear();
                }
                let mut body = vec![0u8; len];
                let _ = r.read_exact(&mut body);
                b2.lock()
                    .unwrap()
                    .push(String::from_utf8_lossy(&body).into_owned());
                let mut sock = sock;
                let _ = sock.write_all(
                    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok",
                );
            }
        });
        Provider { port, bodies, stop }
    }

    fn bodies(&self) -> Vec<serde_json::Value> {
        self.bodies
            .lock()
            .unwrap()
            .iter()
            .map(|b| serde_json::from_str(b).unwrap())
            .collect()
    }
}

impl Drop for Provider {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn wait_for<T>(within: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let until = Instant::now() + within;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < until, "timed out after {within:?}: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn mysql(sql: &str) -> Option<Vec<Vec<String>>> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        use mysql_async::prelude::Queryable;
        let url = "mysql://root@127.0.0.1:3306/test";
        let mut conn = mysql_async::Conn::new(mysql_async::Opts::from_url(url).unwrap())
            .await
            .expect("MariaDB on 127.0.0.1:3306");
        let rows: Result<Vec<mysql_async::Row>, _> = conn.query(sql).await;
        let _ = conn.disconnect().await;
        rows.ok().map(|rows| {
            rows.into_iter()
                .map(|r| {
                    r.unwrap()
                        .into_iter()
                        .map(|v| match v {
                            mysql_async::Value::Bytes(b) => String::from_utf8_lossy(&b).into(),
                            mysql_async::Value::Int(i) => i.to_string(),
                            mysql_async::Value::UInt(u) => u.to_string(),
                            other => format!("{other:?}"),
                        })
                        .collect()
                })
                .collect()
        })
    })
}

#[test]
fn five_thousand_controllers_dropping_at_once_page_once() {
    let log = Captured::default();
    let w = log.clone();
    tracing_subscriber::fmt()
        .with_env_filter("info")
        .with_ansi(false)
        .with_writer(move || w.clone())
        .init();
    let provider = Provider::start();
    let id = format!("t{}_fleet", std::process::id());
    let dir = std::env::temp_dir().join(format!("relay-{id}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("rules")).unwrap();
    std::fs::write(dir.join("rules/offline.rhai"), RULES).unwrap();

    let mut cfg = test_config();
    cfg.plugins.enabled = true;
    cfg.plugins.dir = dir.join("rules").display().to_string();
    cfg.plugins.spool_dir = dir.join("spool").display().to_string();
    cfg.plugins.timer_ms = 10;
    cfg.plugins.tick_s = 0.0;
    cfg.redis.enabled = true;
    cfg.redis.key_prefix = format!("{id}:");
    cfg.mysql.enabled = true;
    cfg.mysql.url = "mysql://root@127.0.0.1:3306/test".into();
    cfg.mysql.alarm_table = format!("{id}_alarms");
    cfg.mysql.notify_table = format!("{id}_notify");
    cfg.notify = toml::from_str(&format!(
        r#"
        console_url = "http://127.0.0.1:8080"
        [[notifier]]
        name = "sms"
        url = "http://127.0.0.1:{}/sms"
        retries = 0
        [[route]]
        chain = [{{ channel = "sms", target = "+100" }}]
        [storm]
        hold_s = 2
        digest_s = 10
        "#,
        provider.port
    ))
    .unwrap();
    let (ext, host) = relay_shards::rules::attach(&cfg).expect("rules engine starts");
    let relay = Relay::start_with(&cfg, ext).expect("relay starts");

    // The fleet comes online over real sockets, all of group site-3.
    let hello = serde_json::json!({"role": "controller", "meta": {"group": "site-3"}});
    let fleet: Vec<Client> = (0..FLEET)
        .map(|i| {
            Client::hello_with(
                relay.tcp_addr(),
                Form::Binary,
                &format!("ctl-{i:05}"),
                hello.clone(),
            )
        })
        .collect();
    let lines_before = log.0.lock().unwrap().len();
    let dropped = Instant::now();
    drop(fleet); // every socket closes at once

    let sent = wait_for(Duration::from_secs(60), "the incident notification", || {
        let b = provider.bodies();
        (!b.is_empty()).then_some(b)
    });
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(provider.bodies().len(), 1, "{:#?}", provider.bodies());
    let msg = sent[0]["message"].as_str().unwrap();
    assert_eq!(sent[0]["key"], "incident/offline");
    assert!(
        msg.starts_with("RAISED major: 5,000 alarms of kind offline since "),
        "{msg}"
    );
    assert!(
        msg.contains(" and 4,990 more; 100 % of group site-3 (5,000 of 5,000)"),
        "{msg}"
    );
    assert!(msg.ends_with(" http://127.0.0.1:8080/#/alarms"), "{msg}");

    // Every alarm recorded: 5,000 rows, 5,000 records in Redis.
    let rows = wait_for(Duration::from_secs(180), "5,000 alarm rows", || {
        let r = mysql(&format!(
            "SELECT COUNT(DISTINCT alarm_key) FROM `{id}_alarms` \
             WHERE transition = 'raised' AND alarm_key LIKE 'ctl-%/offline'"
        ))?;
        (r[0][0] == FLEET.to_string()).then_some(r)
    });
    assert_eq!(rows[0][0], "5000");
    let mut r = redis::Client::open("redis://127.0.0.1:6379/")
        .unwrap()
        .get_connection()
        .expect("Redis on 127.0.0.1:6379");
    let n: usize = wait_for(Duration::from_secs(60), "alarms in Redis", || {
        let n: usize = redis::cmd("HLEN")
            .arg(format!("{id}:alarms"))
            .query(&mut r)
            .ok()?;
        (n == FLEET + 1).then_some(n)
    });
    assert_eq!(n, FLEET + 1, "5,000 alarms and the incident");

    // The log: no line per alarm, no warning or error about one.
    let text = String::from_utf8_lossy(&log.0.lock().unwrap()[lines_before..]).into_owned();
    let bound = 10 * (dropped.elapsed().as_secs() as usize + 2);
    let per_alarm = text
        .lines()
        .filter(|l| l.contains("ctl-0") && l.contains("offline"))
        .count();
    assert!(per_alarm <= bound && per_alarm < 500, "{per_alarm} lines");
    let bad: Vec<&str> = text
        .lines()
        .filter(|l| (l.contains("WARN") || l.contains("ERROR")) && l.contains("ctl-0"))
        .collect();
    assert!(bad.is_empty(), "{bad:#?}");
    assert_eq!(host.stats().events_dropped, 0);

    drop(relay);
    if let Ok(h) = Arc::try_unwrap(host) {
        h.shutdown();
    }
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{id}:*"))
        .query(&mut r)
        .unwrap_or_default();
    for k in keys {
        let _: Result<(), _> = redis::cmd("DEL").arg(k).query(&mut r);
    }
    let _ = mysql(&format!(
        "DROP TABLE IF EXISTS `{id}_alarms`, `{id}_notify`"
    ));
    let _ = std::fs::remove_dir_all(&dir);
}
