//! Test helpers: a relay on port 0 and blocking clients in both wire forms.
#![allow(dead_code)]

pub mod proc;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use relay_config::Config;
use relay_core::codec::{self, Decoder};
use relay_core::frame::{Flags, Frame, FrameType};
use relay_core::json;
use relay_shards::Relay;

/// A config for tests: loopback, port 0, two unpinned shards.
pub fn test_config() -> Config {
    let mut cfg = Config::default();
    cfg.listeners.tcp = "127.0.0.1:0".parse().unwrap();
    cfg.listeners.http = "127.0.0.1:0".parse().unwrap();
    cfg.shards.count = 2;
    cfg.shards.pin = false;
    cfg.plugins.enabled = false;
    cfg.shards.io_memory_kib = 256;
    cfg.shards.io = io_backend();
    cfg
}

/// The I/O backend the suite runs on: `RELAY__SHARDS__IO` (the variable a
/// relay process reads too), else the built-in default.
pub fn io_backend() -> relay_config::IoBackend {
    match std::env::var("RELAY__SHARDS__IO").as_deref() {
        Ok("uring") => relay_config::IoBackend::Uring,
        Ok("epoll") => relay_config::IoBackend::Epoll,
        Ok(other) => panic!("RELAY__SHARDS__IO={other}: expected uring or epoll"),
        Err(_) => relay_config::IoBackend::default(),
    }
}

/// Starts a relay with `tweak` applied to the test config.
pub fn start(tweak: impl FnOnce(&mut Config)) -> Relay {
    let mut cfg = test_config();
    tweak(&mut cfg);
    Relay::start(&cfg).expect("relay starts")
}

/// Owner shard of an address under `shards` shards.
pub fn shard(addr: &str, shards: usize) -> usize {
    relay_core::shard_of(addr.as_bytes(), shards)
}

/// Finds `n` addresses with `prefix` that land on `shard`.
pub fn addrs_on(prefix: &str, shard_idx: usize, shards: usize, n: usize) -> Vec<String> {
    (0..)
        .map(|i| format!("{prefix}{i}"))
        .filter(|a| shard(a, shards) == shard_idx)
        .take(n)
        .collect()
}

/// `n` addresses `<prefix>0`, `<prefix>1`, ...
pub fn names(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}{i}")).collect()
}

/// What one read gave.
enum Got {
    Some,
    Nothing,
    Closed,
    Failed(std::io::Error),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Form {
    Binary,
    Json,
}

/// A blocking client speaking one form.
pub struct Client {
    pub stream: TcpStream,
    pub form: Form,
    pub addr: String,
    buf: BytesMut,
}

impl Client {
    pub fn connect(relay: SocketAddr, form: Form) -> Client {
        Client::from_stream(TcpStream::connect(relay).expect("connect"), form)
    }

    /// A client over a socket connected elsewhere (with its own options).
    pub fn from_stream(stream: TcpStream, form: Form) -> Client {
        stream.set_nodelay(true).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        Client {
            stream,
            form,
            addr: String::new(),
            buf: BytesMut::new(),
        }
    }

    /// Connects and says hello as `addr` (empty: let the server assign one).
    pub fn hello(relay: SocketAddr, form: Form, addr: &str) -> Client {
        Self::hello_with(relay, form, addr, serde_json::json!({}))
    }

    pub fn hello_with(
        relay: SocketAddr,
        form: Form,
        addr: &str,
        fields: serde_json::Value,
    ) -> Client {
        let mut c = Client::connect(relay, form);
        let mut f = Frame::new(FrameType::Hello);
        f.src = Bytes::copy_from_slice(addr.as_bytes());
        f.payload = fields.to_string().into();
        f.flags = Flags(Flags::JSON);
        c.send(&f);
        let w = c.expect(FrameType::Welcome);
        let v: serde_json::Value = serde_json::from_slice(&w.payload).unwrap();
        c.addr = v["addr"].as_str().unwrap().to_owned();
        if !addr.is_empty() {
            assert_eq!(c.addr, addr);
        }
        c
    }

    /// `hello` as a client does during an upgrade: a hello the draining
    /// process still took (its shards stop accepting within one sweep) is
    /// answered `going_away`; connect again, as the retry hint says, until
    /// the new process welcomes it (at most 20 tries).
    pub fn hello_through_upgrade(relay: SocketAddr, form: Form, addr: &str) -> Client {
        for _ in 0..20 {
            let mut c = Client::connect(relay, form);
            let mut f = Frame::new(FrameType::Hello);
            f.src = Bytes::copy_from_slice(addr.as_bytes());
            f.payload = b"{}".as_slice().into();
            f.flags = Flags(Flags::JSON);
            c.send(&f);
            let w = c.recv();
            match w.kind {
                FrameType::Welcome => {
                    c.addr = addr.to_owned();
                    return c;
                }
                FrameType::Error
                    if w.error_parts().is_some_and(|(code, _)| {
                        code == relay_core::ErrorCode::GoingAway as u16
                    }) =>
                {
                    std::thread::sleep(Duration::from_millis(50));
                }
                _ => panic!("{addr}: expected Welcome or going_away, got {w:?}"),
            }
        }
        panic!("{addr}: still told going_away after 20 tries");
    }

    pub fn send(&mut self, f: &Frame) {
        let mut out = BytesMut::new();
        match self.form {
            Form::Binary => codec::encode(f, &mut out),
            Form::Json => {
                json::write_json(f, &mut out);
                out.extend_from_slice(b"\n");
            }
        }
        self.stream.write_all(&out).expect("write");
    }

    pub fn send_raw(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes)
    }

    pub fn data(&mut self, dst: &str, seq: u32, ack: bool, payload: &[u8]) {
        let mut f = Frame::data(
            Bytes::new(),
            Bytes::copy_from_slice(dst.as_bytes()),
            Bytes::copy_from_slice(payload),
        );
        f.seq = seq;
        f.flags = Flags(if ack { Flags::ACK_REQ } else { 0 });
        self.send(&f);
    }

    fn try_decode(&mut self) -> Option<Frame> {
        match self.form {
            Form::Binary => Decoder::new(1 << 24)
                .decode(&mut self.buf)
                .expect("server sent a valid frame"),
            Form::Json => {
                let i = self.buf.iter().position(|&b| b == b'\n')?;
                let line = self.buf.split_to(i + 1);
                Some(json::parse_json(&line).unwrap_or_else(|e| panic!("bad line {line:?}: {e}")))
            }
        }
    }

    /// Next frame within `timeout`; `None` on timeout; panics on EOF.
    pub fn recv_timeout(&mut self, timeout: Duration) -> Option<Frame> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(f) = self.try_decode() {
                return Some(f);
            }
            if Instant::now() >= deadline {
                return None;
            }
            match self.fill() {
                Got::Closed => {
                    panic!("{}: connection closed while waiting for a frame", self.addr)
                }
                Got::Failed(e) => panic!("read: {e}"),
                Got::Some | Got::Nothing => {}
            }
        }
    }

    pub fn recv(&mut self) -> Frame {
        self.recv_timeout(Duration::from_secs(5))
            .unwrap_or_else(|| panic!("{}: no frame within 5 s", self.addr))
    }

    /// Next frame, which must be of `kind`.
    pub fn expect(&mut self, kind: FrameType) -> Frame {
        let f = self.recv();
        assert_eq!(f.kind, kind, "{}: expected {kind:?}, got {f:?}", self.addr);
        f
    }

    /// Next frame must be ERROR with `code`; returns its seq.
    pub fn expect_error(&mut self, code: relay_core::ErrorCode) -> u32 {
        let f = self.expect(FrameType::Error);
        let (c, msg) = f.error_parts().unwrap();
        assert_eq!(
            c, code as u16,
            "{}: expected {code:?}, got {c} {msg:?}",
            self.addr
        );
        f.seq
    }

    /// Reads what is there (waiting at most the socket's read timeout).
    fn fill(&mut self) -> Got {
        let mut tmp = [0u8; 65536];
        match self.stream.read(&mut tmp) {
            Ok(0) => Got::Closed,
            Ok(n) => {
                self.buf.extend_from_slice(&tmp[..n]);
                Got::Some
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                Got::Nothing
            }
            Err(e) => Got::Failed(e),
        }
    }

    /// Reads until EOF (or `timeout`), returning the frames seen; true if closed.
    pub fn drain_until_closed(&mut self, timeout: Duration) -> (Vec<Frame>, bool) {
        let deadline = Instant::now() + timeout;
        let mut frames = Vec::new();
        loop {
            while let Some(f) = self.try_decode() {
                frames.push(f);
            }
            if Instant::now() >= deadline {
                return (frames, false);
            }
            match self.fill() {
                Got::Closed => {
                    while let Some(f) = self.try_decode() {
                        frames.push(f);
                    }
                    return (frames, true);
                }
                Got::Failed(_) => return (frames, true),
                Got::Some | Got::Nothing => {}
            }
        }
    }

    /// Nothing arrives within `d`.
    pub fn expect_silence(&mut self, d: Duration) {
        if let Some(f) = self.recv_timeout(d) {
            panic!("{}: expected nothing, got {f:?}", self.addr);
        }
    }
}

/// GET `path` without a token: (status, body as JSON or text).
/// The sum over shards of counter `name` in the relay's `/metrics`.
pub fn counter(relay: &Relay, name: &str) -> u64 {
    counter_at(relay.http_addr().expect("an HTTP listener"), name)
}

/// The same, from the relay (or relay process) whose HTTP listener is `http`.
pub fn counter_at(http: SocketAddr, name: &str) -> u64 {
    let (_, body) = http_at(http, "GET", "/metrics", None, None);
    let text = body.as_str().unwrap_or_default().to_owned();
    text.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

pub fn get(relay: &Relay, path: &str) -> (u16, serde_json::Value) {
    http(relay, "GET", path, None, None)
}

/// Polls GET `path` until it answers 200 with a body for which `ok` holds
/// (at most 15 s; the assertion names the last answer).
pub fn wait_for(
    relay: &Relay,
    path: &str,
    ok: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let until = Instant::now() + Duration::from_secs(15);
    loop {
        let (s, v) = get(relay, path);
        if s == 200 && ok(&v) {
            return v;
        }
        assert!(
            Instant::now() < until,
            "{path}: never got there; last {s} {v}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A blocking HTTP/1.1 request; returns (status, body as JSON or text).
pub fn http(
    relay: &Relay,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&serde_json::Value>,
) -> (u16, serde_json::Value) {
    http_at(
        relay.http_addr().expect("http enabled"),
        method,
        path,
        token,
        body,
    )
}

/// An HTTP request to the relay whose HTTP port is `addr`: (status, JSON body).
pub fn http_at(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&serde_json::Value>,
) -> (u16, serde_json::Value) {
    let mut s = TcpStream::connect(addr).expect("connect http");
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: relay\r\nConnection: close\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let value =
        serde_json::from_str(body).unwrap_or_else(|_| serde_json::Value::String(body.to_owned()));
    (status, value)
}

/// A WebSocket client of `/ws` (tungstenite, blocking, short read timeout).
pub struct Browser {
    pub ws: tungstenite::WebSocket<TcpStream>,
}

impl Browser {
    /// Connects to `/ws` with `query` (may be empty).
    pub fn connect(relay: &Relay, query: &str) -> Browser {
        let addr = relay.http_addr().expect("http enabled");
        let stream = TcpStream::connect(addr).unwrap();
        let url = if query.is_empty() {
            format!("ws://{addr}/ws")
        } else {
            format!("ws://{addr}/ws?{query}")
        };
        let (ws, resp) = tungstenite::client(url, stream).expect("websocket handshake");
        assert_eq!(resp.status().as_u16(), 101);
        ws.get_ref()
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        Browser { ws }
    }

    pub fn send_text(&mut self, v: serde_json::Value) {
        self.ws
            .send(tungstenite::Message::text(v.to_string()))
            .unwrap();
    }

    pub fn send_binary(&mut self, f: &Frame) {
        self.ws
            .send(tungstenite::Message::binary(codec::body_bytes(f)))
            .unwrap();
    }

    /// Next protocol message (text as JSON, binary decoded), or a close.
    pub fn recv_timeout(&mut self, timeout: Duration) -> Option<WsIn> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.ws.read() {
                Ok(tungstenite::Message::Text(t)) => {
                    return Some(WsIn::Json(serde_json::from_str(t.as_str()).unwrap()));
                }
                Ok(tungstenite::Message::Binary(b)) => {
                    return Some(WsIn::Frame(codec::parse_body(b).unwrap()));
                }
                Ok(tungstenite::Message::Close(c)) => {
                    return Some(WsIn::Close(c.map(|c| u16::from(c.code))));
                }
                Ok(_) => {}
                Err(tungstenite::Error::Io(e))
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed) => {
                    return Some(WsIn::Close(None));
                }
                Err(e) => panic!("websocket read: {e}"),
            }
            if Instant::now() >= deadline {
                return None;
            }
        }
    }

    pub fn recv(&mut self) -> WsIn {
        self.recv_timeout(Duration::from_secs(5))
            .expect("a websocket message within 5 s")
    }

    pub fn recv_json(&mut self) -> serde_json::Value {
        match self.recv() {
            WsIn::Json(v) => v,
            other => panic!("expected a JSON text message, got {other:?}"),
        }
    }
}

#[derive(Debug)]
pub enum WsIn {
    Json(serde_json::Value),
    Frame(Frame),
    Close(Option<u16>),
}

/// A `relay` process started from the built binary, its log (stderr) read
/// line by line into a channel; killed if a test ends before stopping it.
pub struct RelayProc {
    pub child: std::process::Child,
    pub log: std::sync::mpsc::Receiver<String>,
    pub tcp: SocketAddr,
    pub http: SocketAddr,
    /// The MQTT listener, when `[listeners] mqtt` is set.
    pub mqtt: Option<SocketAddr>,
}

impl RelayProc {
    /// Runs `relay --config cfg` (with `env` added) and waits until it logs
    /// where it listens.
    pub fn spawn(cfg: &std::path::Path, env: &[(&str, &str)]) -> RelayProc {
        use std::io::BufRead;
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_relay"));
        cmd.arg("--config")
            .arg(cfg)
            .env("RELAY_LOG", "info")
            .stderr(std::process::Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn relay");
        let stderr = child.stderr.take().unwrap();
        let (tx, log) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                // Once nobody listens, keep draining so the relay never blocks.
                let _ = tx.send(line);
            }
        });
        let mut p = RelayProc {
            child,
            log,
            tcp: "0.0.0.0:0".parse().unwrap(),
            http: "0.0.0.0:0".parse().unwrap(),
            mqtt: None,
        };
        // The MQTT listener is logged before the others.
        let deadline = Instant::now() + Duration::from_secs(20);
        let line = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match p.log.recv_timeout(left) {
                Ok(l) if l.contains("relay listening") => break l,
                Ok(l) if l.contains("mqtt_addr=") => {
                    p.mqtt = l
                        .split("mqtt_addr=")
                        .nth(1)
                        .and_then(|r| r.split(|c: char| c.is_whitespace() || c == '"').next())
                        .and_then(|a| a.parse().ok());
                }
                Ok(_) => {}
                Err(_) => panic!("the relay did not log \"relay listening\" within 20 s"),
            }
        };
        let field = |key: &str| -> SocketAddr {
            line.split(key)
                .nth(1)
                .and_then(|r| {
                    r.chars()
                        .take_while(|c| !c.is_whitespace() && *c != '"')
                        .collect::<String>()
                        .parse()
                        .ok()
                })
                .unwrap_or_else(|| panic!("no {key} in {line}"))
        };
        p.tcp = field("tcp_addr=");
        p.http = field("http_addr=");
        p
    }

    /// The next log line containing `needle` (earlier lines are consumed);
    /// panics after `timeout`.
    pub fn wait_log(&self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.log.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return line,
                Ok(_) => {}
                Err(_) => panic!("the relay did not log {needle:?} within {timeout:?}"),
            }
        }
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child.
        let r = unsafe { libc::kill(self.child.id() as i32, sig) };
        assert_eq!(r, 0, "kill {sig}");
    }

    /// SIGTERM, then waits (at most `timeout`) for the exit status.
    pub fn stop(&mut self, timeout: Duration) -> std::process::ExitStatus {
        self.signal(libc::SIGTERM);
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(Instant::now() < deadline, "the relay did not stop");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// GET `path` on the HTTP port: (status, body).
    pub fn get(&self, path: &str) -> (u16, String) {
        let mut s = TcpStream::connect(self.http).expect("connect http");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: relay\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).unwrap();
        let text = String::from_utf8_lossy(&raw).into_owned();
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        (status, body.to_owned())
    }

    /// The value of an unlabelled series in `/metrics`.
    pub fn metric(&self, name: &str) -> Option<f64> {
        let (_, body) = self.get("/metrics");
        body.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .and_then(|v| v.trim().parse().ok())
    }
}

impl Drop for RelayProc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Keeps a shard's input steady (the busy loop's regime: two readiness
/// events a millisecond or more): the controllers `tx` take turns sending
/// one binary DATA frame each to `rx`, 100 µs apart, until dropped (or for
/// 60 s); `rx` is drained. Eight controllers stay well under the default
/// rate limit (2,000 frames a second each).
pub struct Steady {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    threads: Vec<std::thread::JoinHandle<u64>>,
}

impl Steady {
    pub fn start(relay: SocketAddr, tx: &[String], rx: &str) -> Steady {
        use std::sync::atomic::Ordering::Relaxed;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut sink = Client::hello(relay, Form::Binary, rx);
        let mut sources: Vec<Client> = tx
            .iter()
            .map(|a| Client::hello(relay, Form::Binary, a))
            .collect();
        let dst = rx.to_owned();
        let until = Instant::now() + Duration::from_secs(60);
        let s = stop.clone();
        let reader = std::thread::spawn(move || {
            let mut n = 0;
            while !s.load(Relaxed) && Instant::now() < until {
                if sink.recv_timeout(Duration::from_millis(100)).is_some() {
                    n += 1;
                }
            }
            n
        });
        let s = stop.clone();
        let writer = std::thread::spawn(move || {
            let mut n = 0u64;
            while !s.load(Relaxed) && Instant::now() < until {
                let i = n as usize % sources.len();
                let c = &mut sources[i];
                c.data(&dst, n as u32, false, &[7u8; 32]);
                n += 1;
                std::thread::sleep(Duration::from_micros(100));
            }
            n
        });
        Steady {
            stop,
            threads: vec![writer, reader],
        }
    }
    /// Stops the stream: (frames sent, frames received).
    pub fn stop(mut self) -> (u64, u64) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let mut t = self.threads.drain(..).map(|t| t.join().unwrap_or(0));
        (t.next().unwrap_or(0), t.next().unwrap_or(0))
    }
}

impl Drop for Steady {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}
