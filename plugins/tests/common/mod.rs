//! Helpers shared by the integration tests: real Redis and MariaDB on 127.0.0.1
//! (a test fails loudly when they are unreachable), a unique namespace per test,
//! a rules folder per test, and bounded waits.
#![allow(dead_code)]

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::Bytes;
use relay_config::plugins::{MysqlConfig, RedisConfig, SpoolFsync, TableConfig};
use relay_plugins::{Action, ActionReceiver, ClientInfo, Event, HostConfig, MessageEvent};

pub const REDIS_URL: &str = "redis://127.0.0.1:6379/";
pub const MYSQL_URL: &str = "mysql://root@127.0.0.1:3306/test";

/// Panics with a clear message when a service the tests need is down.
pub fn require_services() {
    for (name, addr) in [("Redis", "127.0.0.1:6379"), ("MariaDB", "127.0.0.1:3306")] {
        if let Err(e) = TcpStream::connect_timeout(&addr.parse().unwrap(), Duration::from_secs(2)) {
            panic!("{name} is not reachable on {addr} ({e}); these tests need it running");
        }
    }
}

/// Logs to the test output (RUST_LOG=debug for detail).
pub fn init_log() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_test_writer()
        .try_init();
}

/// A unique name for this test run (process id, test name, time).
pub fn unique(name: &str) -> String {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros();
    format!("t{}_{}_{}", std::process::id(), name, t % 1_000_000_000)
}

/// A fresh folder under the temp dir.
pub fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("relay-plugins-{name}"));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Writes `files` (name, text) into `dir`.
pub fn write_rules(dir: &Path, files: &[(&str, &str)]) {
    for (name, text) in files {
        std::fs::write(dir.join(name), text).unwrap();
    }
}

/// Config for a test named `name`: its own rules folder, spool, Redis prefix, and
/// (when `tables` is given) MySQL tables; Redis and MySQL on.
pub fn config(
    name: &str,
    rules: &[(&str, &str)],
    tables: Vec<TableConfig>,
) -> (HostConfig, String) {
    let id = unique(name);
    let dir = temp_dir(&format!("{id}-rules"));
    write_rules(&dir, rules);
    let spool = temp_dir(&format!("{id}-spool"));
    let mut cfg = HostConfig::default();
    cfg.plugins.dir = dir.display().to_string();
    cfg.plugins.spool_dir = spool.display().to_string();
    cfg.plugins.spool_fsync = SpoolFsync::Batch;
    cfg.plugins.timer_ms = 10;
    cfg.plugins.tick_s = 0.0;
    cfg.plugins.reload_poll_ms = 50;
    cfg.redis = RedisConfig {
        enabled: true,
        url: REDIS_URL.into(),
        key_prefix: format!("{id}:"),
        retry_ms: 50,
        ..Default::default()
    };
    cfg.mysql = MysqlConfig {
        enabled: true,
        url: MYSQL_URL.into(),
        alarm_table: format!("{id}_alarms"),
        notify_table: format!("{id}_notify"),
        tables,
        retry_ms: 50,
        ..Default::default()
    };
    (cfg, id)
}

/// Polls `f` every 10 ms until it returns `Some`, or panics after `within`.
pub fn wait_for<T>(within: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let until = Instant::now() + within;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() > until {
            panic!("timed out after {within:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Actions received within `within`, stopping once `n` arrived.
pub fn take_actions(rx: &ActionReceiver, n: usize, within: Duration) -> Vec<Action> {
    let mut out = Vec::new();
    let until = Instant::now() + within;
    while out.len() < n && Instant::now() < until {
        match rx.try_recv() {
            Ok(a) => out.push(a),
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    }
    out
}

pub fn now_ms() -> u64 {
    relay_plugins::clock::now_ms()
}

/// A JSON message from `src`.
pub fn msg(src: &str, payload: serde_json::Value) -> Event {
    Event::Message(MessageEvent {
        src: src.into(),
        dst: "web-1".into(),
        group: None,
        payload: Bytes::from(payload.to_string()),
        json: true,
        time_ms: now_ms(),
    })
}

pub fn client(addr: &str, role: &str) -> ClientInfo {
    ClientInfo {
        addr: addr.into(),
        role: role.into(),
        meta: serde_json::json!({"fw": "1.2"}),
        // The remote address a shard reports for a client; nothing binds it.
        remote: "127.0.0.1:0".into(),
        shard: 0,
        time_ms: now_ms(),
        groups: Vec::new(),
    }
}

/// A synchronous Redis connection for checks.
pub fn redis() -> redis::Connection {
    redis::Client::open(REDIS_URL)
        .unwrap()
        .get_connection()
        .expect("Redis reachable")
}

/// Runs a query against MariaDB and returns the rows as strings (NULL as "NULL").
pub fn mysql_rows(sql: &str) -> Vec<Vec<String>> {
    mysql_rows_opt(sql).unwrap_or_else(|| panic!("query failed: {sql}"))
}

/// Rows of `sql`, or none while the table does not exist yet.
pub fn mysql_rows_opt(sql: &str) -> Option<Vec<Vec<String>>> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        use mysql_async::prelude::Queryable;
        let mut conn = mysql_async::Conn::new(mysql_async::Opts::from_url(MYSQL_URL).unwrap())
            .await
            .expect("MariaDB reachable");
        let rows: Result<Vec<mysql_async::Row>, _> = conn.query(sql).await;
        let _ = conn.disconnect().await;
        rows.ok().map(|rows| {
            rows.into_iter()
                .map(|r| {
                    r.unwrap()
                        .into_iter()
                        .map(|v| match v {
                            mysql_async::Value::NULL => "NULL".to_string(),
                            mysql_async::Value::Bytes(b) => {
                                String::from_utf8_lossy(&b).into_owned()
                            }
                            mysql_async::Value::Int(i) => i.to_string(),
                            mysql_async::Value::UInt(u) => u.to_string(),
                            mysql_async::Value::Double(d) => d.to_string(),
                            mysql_async::Value::Float(f) => f.to_string(),
                            other => format!("{other:?}"),
                        })
                        .collect()
                })
                .collect()
        })
    })
}

/// Drops the tables a test made.
pub fn drop_tables(names: &[String]) {
    for n in names {
        let _ = mysql_rows_opt(&format!("DROP TABLE IF EXISTS `{n}`"));
    }
}

/// Removes what a test left in Redis (keys under its prefix) and MariaDB (its tables).
pub fn cleanup(id: &str, extra_tables: &[&str]) {
    let mut r = redis();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{id}:*"))
        .query(&mut r)
        .unwrap_or_default();
    for k in keys {
        let _: Result<(), _> = redis::cmd("DEL").arg(k).query(&mut r);
    }
    let mut tables = vec![format!("{id}_alarms"), format!("{id}_notify")];
    tables.extend(extra_tables.iter().map(|t| t.to_string()));
    drop_tables(&tables);
}

/// One request seen by `HttpServer`.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: String,
    pub at: std::time::Instant,
}

/// A tiny HTTP/1.1 server on 127.0.0.1:0 that records requests and answers with
/// the next status of `statuses` (the last one repeats).
pub struct HttpServer {
    pub addr: std::net::SocketAddr,
    pub seen: std::sync::Arc<std::sync::Mutex<Vec<Seen>>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl HttpServer {
    pub fn start(statuses: Vec<u16>) -> HttpServer {
        use std::io::{BufRead, BufReader, Read, Write};
        use std::sync::atomic::Ordering;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (seen2, stop2) = (seen.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut n = 0usize;
            let until = Instant::now() + Duration::from_secs(120);
            while !stop2.load(Ordering::Relaxed) && Instant::now() < until {
                let (sock, _) = match listener.accept() {
                    Ok(s) => s,
                    Err(_) => {
                        std::thread::sleep(Duration::from_millis(5));
                        continue;
                    }
                };
                sock.set_nonblocking(false).unwrap();
                sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                let mut reader = BufReader::new(sock.try_clone().unwrap());
                // One request per connection (we answer with Connection: close).
                let mut line = String::new();
                if reader.read_line(&mut line).is_err() {
                    continue;
                }
                let mut parts = line.split_whitespace();
                let method = parts.next().unwrap_or("").to_string();
                let path = parts.next().unwrap_or("").to_string();
                let mut headers = Vec::new();
                let mut len = 0usize;
                loop {
                    let mut h = String::new();
                    if reader.read_line(&mut h).is_err() || h.trim().is_empty() {
                        break;
                    }
                    if let Some((k, v)) = h.trim().split_once(':') {
                        if k.eq_ignore_ascii_case("content-length") {
                            len = v.trim().parse().unwrap_or(0);
                        }
                        headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
                    }
                }
                let mut body = vec![0u8; len];
                let _ = reader.read_exact(&mut body);
                seen2.lock().unwrap().push(Seen {
                    method,
                    path,
                    headers,
                    body: String::from_utf8_lossy(&body).into_owned(),
                    at: Instant::now(),
                });
                let status = statuses.get(n).or(statuses.last()).copied().unwrap_or(200);
                n += 1;
                let mut sock = sock;
                let _ = write!(
                    sock,
                    "HTTP/1.1 {status} X\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
                );
            }
        });
        HttpServer { addr, seen, stop }
    }

    pub fn requests(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// A TCP proxy on 127.0.0.1:0 in front of `upstream` that the test can cut (every
/// open connection closed, new ones refused) and restore.
pub struct Proxy {
    pub addr: std::net::SocketAddr,
    up: std::sync::Arc<std::sync::atomic::AtomicBool>,
    conns: std::sync::Arc<std::sync::Mutex<Vec<std::net::TcpStream>>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    mute: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Proxy {
    pub fn start(upstream: &str) -> Proxy {
        use std::sync::atomic::Ordering;
        let upstream: std::net::SocketAddr = upstream.parse().unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let up = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let conns = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let mute = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (up2, stop2, conns2, mute2) = (up.clone(), stop.clone(), conns.clone(), mute.clone());
        std::thread::spawn(move || {
            let until = Instant::now() + Duration::from_secs(300);
            while !stop2.load(Ordering::Relaxed) && Instant::now() < until {
                let Ok((client, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(2));
                    continue;
                };
                if !up2.load(Ordering::Relaxed) {
                    drop(client); // refused while cut
                    continue;
                }
                client.set_nonblocking(false).unwrap();
                let Ok(server) =
                    std::net::TcpStream::connect_timeout(&upstream, Duration::from_secs(2))
                else {
                    continue;
                };
                {
                    let mut c = conns2.lock().unwrap();
                    c.push(client.try_clone().unwrap());
                    c.push(server.try_clone().unwrap());
                }
                for (mut from, mut to, replies) in [
                    (
                        client.try_clone().unwrap(),
                        server.try_clone().unwrap(),
                        false,
                    ),
                    (server, client, true),
                ] {
                    let mute = mute2.clone();
                    std::thread::spawn(move || {
                        use std::io::{Read, Write};
                        let mut buf = [0u8; 16 * 1024];
                        loop {
                            let n = match from.read(&mut buf) {
                                Ok(0) | Err(_) => break,
                                Ok(n) => n,
                            };
                            if replies && mute.load(Ordering::Relaxed) {
                                continue; // swallowed: the server did it, the client never hears
                            }
                            if to.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                        let _ = to.shutdown(std::net::Shutdown::Both);
                        let _ = from.shutdown(std::net::Shutdown::Both);
                    });
                }
            }
        });
        Proxy {
            addr,
            up,
            conns,
            stop,
            mute,
        }
    }

    /// Keeps forwarding requests but swallows every reply: the server acts, the
    /// client never learns it did.
    pub fn mute_replies(&self, on: bool) {
        self.mute.store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// Closes every connection through the proxy and refuses new ones.
    pub fn cut(&self) {
        self.up.store(false, std::sync::atomic::Ordering::Relaxed);
        for c in self.conns.lock().unwrap().drain(..) {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
    }

    /// Accepts connections again.
    pub fn restore(&self) {
        self.up.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.cut();
    }
}
