//! Graceful upgrade of a real relay process holding 2,000 controllers that
//! send DATA with ACK_REQ: SIGUSR2 starts a new process on the same
//! listening sockets, every client gets `going_away` with a `retry_after_ms`
//! spread over `[upgrade] reconnect_window_ms`, frames in flight are all
//! answered during the drain, the old process exits, and the clients come
//! back to the new process no faster than its `[admission]` limits allow.

mod common;

use std::collections::HashSet;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use common::RelayProc;
use relay_core::ErrorCode;
use relay_core::codec::{self, Decoder};
use relay_core::frame::{Flags, Frame, FrameType};

const CLIENTS: usize = 2000;
const THREADS: usize = 4;
const SHARDS: u64 = 2;
const WINDOW_MS: u64 = 4000;
/// The new process's admission limits (per shard).
const RATE: u64 = 250;
const BURST: u64 = 50;

fn config(admission: &str) -> String {
    format!(
        "[listeners]\ntcp = \"127.0.0.1:0\"\nhttp = \"127.0.0.1:0\"\n\
         [shards]\ncount = {SHARDS}\npin = false\nio_memory_kib = 256\n\
         [plugins]\nenabled = false\n\
         [upgrade]\nreconnect_window_ms = {WINDOW_MS}\ndrain_ms = 1500\n\
         [admission]\nretry_min_ms = 100\nretry_window_ms = 500\n{admission}"
    )
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum St {
    AwaitWelcome,
    Running,
    /// Told to go: no more sends, waiting for the answers still owed.
    Leaving,
    Waiting,
    Finished,
}

struct C {
    addr: String,
    peer: String,
    sock: Option<TcpStream>,
    buf: BytesMut,
    st: St,
    round: u8,
    seq: u32,
    pending: HashSet<u32>,
    sent_in_gen: u32,
    next_send: Instant,
    reconnect_at: Instant,
    /// Told `going_away` at least once (a reconnect that lands on the old
    /// process while it drains is told again, and reconnects again).
    told: bool,
}

#[derive(Default)]
struct Outcome {
    /// ACK_REQ frames the client never got an answer for.
    lost: usize,
    answered: usize,
    hints: Vec<u64>,
    /// When each reconnect was welcomed by the new process.
    welcomes: Vec<Instant>,
    busy: usize,
}

fn hello(relay: SocketAddr, addr: &str) -> TcpStream {
    let mut s = TcpStream::connect(relay).expect("connect");
    s.set_nodelay(true).unwrap();
    let mut f = Frame::new(FrameType::Hello);
    f.src = Bytes::copy_from_slice(addr.as_bytes());
    f.payload = Bytes::from_static(b"{\"heartbeat_s\":60}");
    f.flags = Flags(Flags::JSON);
    let mut out = BytesMut::new();
    codec::encode(&f, &mut out);
    s.write_all(&out).unwrap();
    s.set_nonblocking(true).unwrap();
    s
}

/// Reads what is there; false at EOF or on an error.
fn fill(c: &mut C) -> bool {
    let Some(s) = c.sock.as_mut() else {
        return false;
    };
    let mut tmp = [0u8; 16384];
    loop {
        match s.read(&mut tmp) {
            Ok(0) => return false,
            Ok(n) => c.buf.extend_from_slice(&tmp[..n]),
            Err(e) if e.kind() == ErrorKind::WouldBlock => return true,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return false,
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn drive(
    clients: &mut [C],
    relay: SocketAddr,
    welcomed: &AtomicUsize,
    goaway_seen: &AtomicUsize,
    out: &Mutex<Outcome>,
    deadline: Instant,
) {
    let dec = Decoder::new(1 << 20);
    let mut o = Outcome::default();
    while Instant::now() < deadline && clients.iter().any(|c| c.st != St::Finished) {
        let mut idle = true;
        for c in clients.iter_mut() {
            let now = Instant::now();
            if c.st == St::Waiting {
                if now >= c.reconnect_at {
                    c.sock = Some(hello(relay, &c.addr));
                    c.buf.clear();
                    c.round = 1;
                    c.sent_in_gen = 0;
                    c.st = St::AwaitWelcome;
                }
                continue;
            }
            if c.st == St::Finished {
                continue;
            }
            // Send: the old process until told to go; then 3 frames on the new one.
            if c.st == St::Running && now >= c.next_send && (c.round == 0 || c.sent_in_gen < 3) {
                c.seq += 1;
                let mut f = Frame::data(
                    Bytes::new(),
                    Bytes::copy_from_slice(c.peer.as_bytes()),
                    Bytes::from_static(b"reading"),
                );
                f.seq = c.seq;
                f.flags = Flags(Flags::ACK_REQ);
                let mut buf = BytesMut::new();
                codec::encode(&f, &mut buf);
                if c.sock.as_mut().unwrap().write_all(&buf).is_ok() {
                    c.pending.insert(c.seq);
                    c.sent_in_gen += 1;
                }
                c.next_send = now + Duration::from_millis(400);
                idle = false;
            }
            let open = fill(c);
            while let Some(f) = dec.decode(&mut c.buf).expect("valid frames") {
                idle = false;
                match f.kind {
                    FrameType::Welcome if c.st == St::AwaitWelcome => {
                        c.st = St::Running;
                        c.next_send = now;
                        if c.round == 0 {
                            welcomed.fetch_add(1, Ordering::SeqCst);
                        } else {
                            o.welcomes.push(now);
                        }
                    }
                    FrameType::Ack if c.pending.remove(&f.seq) => o.answered += 1,
                    FrameType::Error => {
                        let (code, msg) = f.error_parts().unwrap();
                        if f.seq != 0 && c.pending.remove(&f.seq) {
                            // An answer all the same (no_route while peers move).
                            o.answered += 1;
                        } else if code == ErrorCode::GoingAway as u16 {
                            let hint = f.retry_after_ms().expect("going_away carries a hint");
                            if c.st != St::Leaving {
                                o.hints.push(hint);
                                if !c.told {
                                    c.told = true;
                                    goaway_seen.fetch_add(1, Ordering::SeqCst);
                                }
                                c.reconnect_at = now + Duration::from_millis(hint);
                                c.st = St::Leaving;
                            }
                        } else if code == ErrorCode::Busy as u16 && c.st == St::AwaitWelcome {
                            o.busy += 1;
                            let hint = f.retry_after_ms().expect("busy carries a hint");
                            c.reconnect_at = now + Duration::from_millis(hint);
                            c.sock = None;
                            c.st = St::Waiting;
                            break;
                        } else if code != ErrorCode::GoingAway as u16 {
                            panic!(
                                "{}: unexpected error {code} ({:?}) seq {} in state {:?}: {msg}",
                                c.addr,
                                ErrorCode::from_u16(code).map(|e| e.name()),
                                f.seq,
                                c.st
                            );
                        }
                    }
                    _ => {}
                }
            }
            if c.st == St::Leaving && c.pending.is_empty() {
                // Every frame answered: leave, come back after the hint.
                c.sock = None;
                c.st = St::Waiting;
            } else if c.round == 1
                && c.st == St::Running
                && c.sent_in_gen >= 3
                && c.pending.is_empty()
            {
                c.st = St::Finished;
            } else if !open && c.sock.is_some() {
                // Closed by the relay with answers still owed: those are lost.
                o.lost += c.pending.len();
                c.pending.clear();
                c.sock = None;
                if c.st == St::AwaitWelcome && c.round == 1 {
                    panic!("{}: closed before welcome on the new process", c.addr);
                }
                c.st = St::Waiting;
            }
        }
        if idle {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    for c in clients.iter() {
        assert_eq!(c.st, St::Finished, "{} ended as {:?}", c.addr, c.st);
    }
    let mut total = out.lock().unwrap();
    total.lost += o.lost;
    total.answered += o.answered;
    total.hints.extend(o.hints);
    total.welcomes.extend(o.welcomes);
    total.busy += o.busy;
}

/// Kills the new relay process (started by the old one) when the test ends.
struct Pid(Option<i32>);

impl Drop for Pid {
    fn drop(&mut self) {
        if let Some(pid) = self.0 {
            // SAFETY: kill(2) on the relay process this test had started.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

#[test]
fn sigusr2_hands_over_2000_controllers_without_losing_an_ack() {
    let dir = std::env::temp_dir().join(format!("relay-upgrade-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("relay.toml");
    std::fs::write(&file, config("")).unwrap();
    // systemd's notification socket: the new process must claim MAINPID.
    let notify_path = dir.join("notify.sock");
    let _ = std::fs::remove_file(&notify_path);
    let notify = std::os::unix::net::UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut old = RelayProc::spawn(&file, &[("NOTIFY_SOCKET", notify_path.to_str().unwrap())]);
    let relay = old.tcp;

    let welcomed = Arc::new(AtomicUsize::new(0));
    let goaway_seen = Arc::new(AtomicUsize::new(0));
    let out = Arc::new(Mutex::new(Outcome::default()));
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut workers = Vec::new();
    for t in 0..THREADS {
        let (welcomed, goaway_seen, out) = (welcomed.clone(), goaway_seen.clone(), out.clone());
        workers.push(std::thread::spawn(move || {
            let now = Instant::now();
            let mut clients: Vec<C> = (0..CLIENTS / THREADS)
                .map(|k| {
                    let i = t * (CLIENTS / THREADS) + k;
                    let addr = format!("up-{i}");
                    C {
                        sock: Some(hello(relay, &addr)),
                        addr,
                        peer: format!("up-{}", (i + 1) % CLIENTS),
                        buf: BytesMut::new(),
                        st: St::AwaitWelcome,
                        round: 0,
                        seq: 0,
                        pending: HashSet::new(),
                        sent_in_gen: 0,
                        next_send: now,
                        reconnect_at: now,
                        told: false,
                    }
                })
                .collect();
            drive(&mut clients, relay, &welcomed, &goaway_seen, &out, deadline);
        }));
    }
    let until = Instant::now() + Duration::from_secs(40);
    while welcomed.load(Ordering::SeqCst) < CLIENTS {
        assert!(
            Instant::now() < until,
            "only {} connected",
            welcomed.load(Ordering::SeqCst)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // Traffic for a moment, then the upgrade; the new process reads the file
    // and admits reconnects at RATE per shard.
    std::thread::sleep(Duration::from_millis(1000));
    std::fs::write(
        &file,
        config(&format!("hellos_per_sec = {RATE}\nburst = {BURST}\n")),
    )
    .unwrap();
    let t_upgrade = Instant::now();
    old.signal(libc::SIGUSR2);
    let line = old.wait_log("upgrade: the new process listens", Duration::from_secs(30));
    let new_pid: i32 = line
        .split("new_pid=")
        .nth(1)
        .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no new_pid in {line}"));
    let _guard = Pid(Some(new_pid));
    assert_ne!(new_pid as u32, old.child.id());
    let mut msg = [0u8; 256];
    let mut notes = Vec::new();
    while let Ok(n) = notify.recv(&mut msg) {
        let text = String::from_utf8_lossy(&msg[..n]).into_owned();
        let done = text.contains(&format!("MAINPID={new_pid}"));
        notes.push(text);
        if done {
            break;
        }
    }
    assert!(
        notes
            .last()
            .is_some_and(|t| t.contains(&format!("MAINPID={new_pid}")) && t.contains("READY=1")),
        "{notes:?}"
    );

    // The old process drains and exits on its own.
    let exit_by = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = old.child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < exit_by, "the old process did not exit");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status}");
    old.wait_log("relay stopped", Duration::from_secs(5));

    for w in workers {
        w.join().expect("client thread");
    }
    let o = out.lock().unwrap();
    assert_eq!(goaway_seen.load(Ordering::SeqCst), CLIENTS);
    assert_eq!(o.lost, 0, "ACK_REQ frames left without an answer");
    assert!(o.answered >= CLIENTS * 4, "{} answered", o.answered);
    assert_eq!(
        o.welcomes.len(),
        CLIENTS,
        "every client back on the new process"
    );

    // The hints spread over the window: each quarter holds a fair share.
    assert!(o.hints.iter().all(|h| *h <= WINDOW_MS));
    for q in 0..4 {
        let (lo, hi) = (q * WINDOW_MS / 4, (q + 1) * WINDOW_MS / 4);
        let n = o.hints.iter().filter(|h| (lo..hi).contains(*h)).count();
        assert!(n >= CLIENTS / 8, "{n} hints in {lo}..{hi} ms");
    }
    // The accept rate on the new process never beats its limit: in any
    // second, at most shards × (rate + burst) welcomes.
    let mut w: Vec<Duration> = o.welcomes.iter().map(|t| *t - t_upgrade).collect();
    w.sort();
    let cap = (SHARDS * (RATE + BURST)) as usize;
    for (i, start) in w.iter().enumerate() {
        let n = w[i..]
            .iter()
            .take_while(|t| **t < *start + Duration::from_secs(1))
            .count();
        assert!(
            n <= cap,
            "{n} welcomes within a second from {start:?} (cap {cap})"
        );
    }
    drop(o);

    // The new process serves and stops cleanly.
    let http = old.http;
    let mut s = TcpStream::connect(http).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        s,
        "GET /healthz HTTP/1.1\r\nHost: r\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut resp = String::new();
    let _ = s.read_to_string(&mut resp);
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    // SAFETY: kill(2) on the relay process this test had started.
    unsafe { libc::kill(new_pid, libc::SIGTERM) };
    old.wait_log("relay stopped", Duration::from_secs(20));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The hand-over seen from a WebSocket client, and an upgrade whose new
/// process cannot start, which leaves the running relay as it was.
#[test]
fn browsers_get_going_away_then_close_1012_and_a_failed_upgrade_changes_nothing() {
    use common::{Browser, WsIn};
    let relay = common::start(|c| c.upgrade.reconnect_window_ms = 2000);
    let dir = std::env::temp_dir().join(format!("relay-upgrade-ws-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let exe = std::path::Path::new(env!("CARGO_BIN_EXE_relay"));

    // A new process that cannot start (its config is broken): refused, and
    // this relay goes on accepting.
    let broken = dir.join("broken.toml");
    std::fs::write(&broken, "[limits]\nmax_frame = 3\n").unwrap();
    let args = ["--config".into(), broken.clone().into_os_string()];
    let err = relay
        .hand_over(exe, &args, Duration::from_secs(20), 2000)
        .expect_err("a broken new process is refused");
    assert!(err.to_string().contains("did not get ready"), "{err:#}");
    let mut b = Browser::connect(&relay, "addr=web-up-1&role=browser");
    assert_eq!(b.recv_json()["type"], "welcome");

    let good = dir.join("relay.toml");
    std::fs::write(
        &good,
        "[shards]\ncount = 2\npin = false\nio_memory_kib = 256\n[plugins]\nenabled = false\n",
    )
    .unwrap();
    let args = ["--config".into(), good.into_os_string()];
    let pid = relay
        .hand_over(exe, &args, Duration::from_secs(20), 2000)
        .expect("the new process takes over");
    let _guard = Pid(Some(pid as i32));
    let v = b.recv_json();
    assert_eq!(
        (v["type"].as_str(), v["code"].as_str()),
        (Some("error"), Some("going_away"))
    );
    let hint: u64 = v["message"]
        .as_str()
        .and_then(|m| m.strip_prefix("retry_after_ms="))
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("a retry hint in {v}"));
    assert!(hint <= 2000);
    // Still served during the drain.
    b.send_text(serde_json::json!({"type": "ping", "seq": 5, "flags": ["ack_req"]}));
    assert_eq!(b.recv_json()["type"], "pong");

    // The new process answers on the same port.
    let mut c =
        common::Client::hello_through_upgrade(relay.tcp_addr(), common::Form::Json, "ctl-up-2");
    c.expect_silence(Duration::from_millis(200));

    relay.end_drain();
    let deadline = Instant::now() + Duration::from_secs(10);
    let code = loop {
        match b.recv_timeout(Duration::from_millis(200)) {
            Some(WsIn::Close(code)) => break code,
            Some(_) => {}
            None => assert!(Instant::now() < deadline, "no close"),
        }
    };
    assert_eq!(code, Some(1012));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A TLS controller connection and an HTTPS request, with a client that
/// trusts `ca` (DER) for `localhost`.
mod tls_client {
    use std::io::{Read, Write};
    use std::net::{SocketAddr, TcpStream};
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use rustls::pki_types::{CertificateDer, ServerName};

    pub fn config(ca: &CertificateDer<'static>) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.clone()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        Arc::new(
            rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth(),
        )
    }

    /// Connects, handshakes and writes `request`; everything read until the
    /// peer closes or `want` shows up (at most 5 s).
    pub fn exchange(
        addr: SocketAddr,
        config: Arc<rustls::ClientConfig>,
        request: &[u8],
        want: &[u8],
    ) -> Vec<u8> {
        let sock = TcpStream::connect(addr).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let name = ServerName::try_from("localhost").unwrap();
        let conn = rustls::ClientConnection::new(config, name).unwrap();
        let mut tls = rustls::StreamOwned::new(conn, sock);
        tls.write_all(request).unwrap();
        tls.flush().unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut got = Vec::new();
        let mut tmp = [0u8; 4096];
        while Instant::now() < deadline && !got.windows(want.len()).any(|w| w == want) {
            match tls.read(&mut tmp) {
                Ok(0) => break,
                Ok(n) => got.extend_from_slice(&tmp[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(_) => break,
            }
        }
        got
    }
}

/// The TLS listeners go to the new process with the plaintext ones: once
/// the old relay is gone, controllers still connect over TLS and HTTPS is
/// still served on the very same ports (given as port 0 in both files, so
/// only the sockets handed over can be those ports).
#[test]
fn sigusr2_hands_over_the_tls_listeners_too() {
    let dir = std::env::temp_dir().join(format!("relay-upgrade-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".into()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let (cert_file, key_file) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert_file, cert.pem()).unwrap();
    std::fs::write(&key_file, key.serialize_pem()).unwrap();
    let client = tls_client::config(cert.der());
    let tls_section = format!(
        "[tls]\ncert_file = {:?}\nkey_file = {:?}\n",
        cert_file.display().to_string(),
        key_file.display().to_string()
    );
    let relay = common::start(|c| {
        c.upgrade.reconnect_window_ms = 500;
        c.listeners.tcp_tls = Some("127.0.0.1:0".parse().unwrap());
        c.listeners.http_tls = Some("127.0.0.1:0".parse().unwrap());
        c.tls.cert_file = Some(cert_file.display().to_string());
        c.tls.key_file = Some(key_file.display().to_string());
    });
    let (tls_addr, https_addr) = (
        relay.tcp_tls_addr().unwrap(),
        relay.http_tls_addr().unwrap(),
    );
    let hello = |addr: &str| {
        let mut f = Frame::new(FrameType::Hello);
        f.src = Bytes::copy_from_slice(addr.as_bytes());
        f.payload = Bytes::from_static(b"{}");
        f.flags = Flags(Flags::JSON);
        let mut out = BytesMut::new();
        codec::encode(&f, &mut out);
        out.to_vec()
    };
    let welcome = br#""addr":"#;
    let got = tls_client::exchange(tls_addr, client.clone(), &hello("tls-before"), welcome);
    assert!(got.windows(welcome.len()).any(|w| w == welcome), "{got:?}");

    let file = dir.join("relay.toml");
    std::fs::write(
        &file,
        format!(
            "[listeners]\ntcp_tls = \"127.0.0.1:0\"\nhttp_tls = \"127.0.0.1:0\"\n\
             [shards]\ncount = 2\npin = false\nio_memory_kib = 256\n[plugins]\nenabled = false\n\
             {tls_section}"
        ),
    )
    .unwrap();
    let exe = std::path::Path::new(env!("CARGO_BIN_EXE_relay"));
    let args = ["--config".into(), file.into_os_string()];
    let pid = relay
        .hand_over(exe, &args, Duration::from_secs(20), 500)
        .expect("the new process takes over");
    let _guard = Pid(Some(pid as i32));
    relay.end_drain();
    relay.stop();
    relay.join().unwrap();

    // Only the new process is left to answer on these ports.
    let got = tls_client::exchange(tls_addr, client.clone(), &hello("tls-after"), welcome);
    assert!(
        got.windows(welcome.len()).any(|w| w == welcome),
        "no WELCOME over TLS from the new process: {:?}",
        String::from_utf8_lossy(&got)
    );
    let got = tls_client::exchange(
        https_addr,
        client,
        b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
        b"\r\n\r\n",
    );
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// An MQTT 3.1.1 CONNECT (clean session) for `id`.
fn mqtt_connect(id: &str) -> Vec<u8> {
    let mut p = b"\x00\x04MQTT\x04\x02\x00\x1e".to_vec();
    p.extend_from_slice(&(id.len() as u16).to_be_bytes());
    p.extend_from_slice(id.as_bytes());
    let mut pkt = vec![0x10, p.len() as u8];
    pkt.extend(p);
    pkt
}

/// What one MQTT connection attempt during an upgrade met.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Attempt {
    /// CONNACK with this return code.
    ConnAck(u8),
    /// The connection was refused: nobody listened on the port.
    Refused,
    /// Connected, but closed (or silent for 5 s) without a CONNACK.
    NoAnswer,
}

fn mqtt_attempt(addr: SocketAddr, id: &str) -> Attempt {
    let mut s = match TcpStream::connect(addr) {
        Ok(s) => s,
        Err(_) => return Attempt::Refused,
    };
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    if s.write_all(&mqtt_connect(id)).is_err() {
        return Attempt::NoAnswer;
    }
    let mut ack = [0u8; 4];
    match s.read_exact(&mut ack) {
        Ok(()) if ack[..2] == [0x20, 0x02] => Attempt::ConnAck(ack[3]),
        _ => Attempt::NoAnswer,
    }
}

/// The MQTT listeners (`mqtt` and `mqtt_tls`) go to the new process with the
/// others. The new file names the MQTT port the old relay holds (so it must
/// not be taken for "in use") and `mqtt_tls` as port 0 (so only the socket
/// handed over can be the old port). An MQTT client connecting over and
/// over throughout the switch is never refused and always answered, and
/// once the old relay is gone both ports serve from the new process.
#[test]
fn sigusr2_hands_over_the_mqtt_listeners_and_the_port_never_closes() {
    let dir = std::env::temp_dir().join(format!("relay-upgrade-mqtt-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".into()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let (cert_file, key_file) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert_file, cert.pem()).unwrap();
    std::fs::write(&key_file, key.serialize_pem()).unwrap();
    let client = tls_client::config(cert.der());
    let relay = common::start(|c| {
        c.upgrade.reconnect_window_ms = 500;
        c.listeners.mqtt = Some("127.0.0.1:0".parse().unwrap());
        c.listeners.mqtt_tls = Some("127.0.0.1:0".parse().unwrap());
        c.tls.cert_file = Some(cert_file.display().to_string());
        c.tls.key_file = Some(key_file.display().to_string());
    });
    let (mqtt_addr, mqtts_addr) = (relay.mqtt_addr().unwrap(), relay.mqtt_tls_addr().unwrap());
    assert_eq!(mqtt_attempt(mqtt_addr, "before"), Attempt::ConnAck(0));
    let connack = [0x20, 0x02, 0x00, 0x00];
    let got = tls_client::exchange(
        mqtts_addr,
        client.clone(),
        &mqtt_connect("tls-before"),
        &connack,
    );
    assert!(got.ends_with(&connack), "{got:?}");

    // A client connecting again and again, paced, until told to stop.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let log = Arc::new(Mutex::new(Vec::<Attempt>::new()));
    let connector = {
        let (stop, log) = (stop.clone(), log.clone());
        std::thread::spawn(move || {
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                let a = mqtt_attempt(mqtt_addr, &format!("switch-{n}"));
                log.lock().unwrap().push(a);
                n += 1;
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };
    let attempts = || log.lock().unwrap().len();
    let wait_for = |n: usize| {
        let deadline = Instant::now() + Duration::from_secs(20);
        while attempts() < n {
            assert!(Instant::now() < deadline, "the connector stalled");
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    wait_for(20);

    let file = dir.join("relay.toml");
    std::fs::write(
        &file,
        format!(
            "[listeners]\ntcp = \"127.0.0.1:0\"\nhttp = \"127.0.0.1:0\"\n\
             mqtt = \"{mqtt_addr}\"\nmqtt_tls = \"127.0.0.1:0\"\n\
             [shards]\ncount = 2\npin = false\nio_memory_kib = 256\n[plugins]\nenabled = false\n\
             [tls]\ncert_file = {:?}\nkey_file = {:?}\n",
            cert_file.display().to_string(),
            key_file.display().to_string()
        ),
    )
    .unwrap();
    let exe = std::path::Path::new(env!("CARGO_BIN_EXE_relay"));
    let args = ["--config".into(), file.into_os_string()];
    let pid = relay
        .hand_over(exe, &args, Duration::from_secs(20), 500)
        .expect("the new process takes over (the MQTT port is not in use by it)");
    let _guard = Pid(Some(pid as i32));
    // The old relay stops accepting once it sees the handover: wait until
    // its accept count stays put over 30 attempts, all answered by the new
    // process, before it ends.
    let accepted = || -> u64 {
        relay
            .stats()
            .iter()
            .map(|s| s.accepted_total.load(Ordering::Relaxed))
            .sum()
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (before, at) = (accepted(), attempts());
        wait_for(at + 30);
        if accepted() == before {
            break;
        }
        assert!(Instant::now() < deadline, "the old relay kept accepting");
    }
    relay.end_drain();
    relay.stop();
    relay.join().unwrap();
    // Only the new process is left; the client goes on a while longer.
    let after = attempts();
    wait_for(after + 30);
    stop.store(true, Ordering::Relaxed);
    connector.join().unwrap();

    let log = log.lock().unwrap().clone();
    let refused = log.iter().filter(|a| **a == Attempt::Refused).count();
    let unanswered = log.iter().filter(|a| **a == Attempt::NoAnswer).count();
    assert_eq!(
        (refused, unanswered),
        (0, 0),
        "the MQTT port closed during the switch: {} attempts",
        log.len()
    );
    assert!(
        log[after..].iter().all(|a| *a == Attempt::ConnAck(0)),
        "the new process refused MQTT clients: {:?}",
        &log[after..]
    );
    // The TLS port (port 0 in the new file) is the old one, handed over.
    let got = tls_client::exchange(mqtts_addr, client, &mqtt_connect("tls-after"), &connack);
    assert!(
        got.ends_with(&connack),
        "no CONNACK over TLS from the new process: {got:?}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
