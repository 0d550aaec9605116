//! TLS for controllers: real TLS clients (rustls, `openssl s_client`) on
//! `[listeners] tcp_tls`, with certificates made here by rcgen.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use common::{Client, Form, addrs_on, start};
use relay_config::Config;
use relay_core::codec::{self, Decoder};
use relay_core::frame::{Flags, Frame, FrameType};
use relay_core::json;
use relay_shards::Relay;
use rustls::pki_types::{CertificateDer, ServerName};

/// A CA and a server certificate for `localhost` and 127.0.0.1 it signed,
/// written as PEM files in a fresh directory.
struct Pki {
    dir: PathBuf,
    ca: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
    ca_pem: String,
    cert_file: PathBuf,
    key_file: PathBuf,
}

impl Pki {
    fn new(tag: &str) -> Pki {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "relay-tls-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, format!("relay test CA {tag}"));
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let params =
            rcgen::CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
        let cert = params.signed_by(&key, &ca).unwrap();
        let cert_file = dir.join("cert.pem");
        let key_file = dir.join("key.pem");
        std::fs::write(&cert_file, cert.pem()).unwrap();
        std::fs::write(&key_file, key.serialize_pem()).unwrap();
        std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
        Pki {
            ca_pem: ca.pem(),
            ca,
            dir,
            cert_file,
            key_file,
        }
    }

    /// Turns the TLS listener on, with this certificate.
    fn apply(&self, cfg: &mut Config) {
        cfg.listeners.tcp_tls = Some("127.0.0.1:0".parse().unwrap());
        cfg.tls.cert_file = Some(self.cert_file.display().to_string());
        cfg.tls.key_file = Some(self.key_file.display().to_string());
    }

    /// A client certificate signed by this CA naming `cn` (and `san` as its DNS name).
    fn client_cert(
        &self,
        cn: &str,
        san: &str,
    ) -> (
        Vec<CertificateDer<'static>>,
        rustls::pki_types::PrivateKeyDer<'static>,
    ) {
        self.client_cert_with(cn, san, |_| {})
    }

    fn client_cert_with(
        &self,
        cn: &str,
        san: &str,
        tweak: impl FnOnce(&mut rcgen::CertificateParams),
    ) -> (
        Vec<CertificateDer<'static>>,
        rustls::pki_types::PrivateKeyDer<'static>,
    ) {
        let mut params = rcgen::CertificateParams::new(vec![san.to_owned()]).unwrap();
        tweak(&mut params);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn.to_owned());
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.ca).unwrap();
        let der = rustls::pki_types::PrivateKeyDer::from_pem_slice(key.serialize_pem().as_bytes())
            .unwrap();
        (vec![cert.der().clone()], der)
    }

    fn client_config(
        &self,
        version: &'static rustls::SupportedProtocolVersion,
        alpn: &[&str],
    ) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        let ca = CertificateDer::from_pem_slice(self.ca_pem.as_bytes()).unwrap();
        roots.add(ca).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut c = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[version])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        c.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
        Arc::new(c)
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

use rustls::pki_types::pem::PemObject;

/// A blocking controller speaking binary frames over rustls.
struct TlsClient {
    tls: rustls::StreamOwned<rustls::ClientConnection, TcpStream>,
    buf: BytesMut,
}

impl TlsClient {
    fn connect(addr: SocketAddr, config: Arc<rustls::ClientConfig>) -> TlsClient {
        TlsClient {
            tls: tls_connect(addr, config),
            buf: BytesMut::new(),
        }
    }

    fn hello(addr: SocketAddr, config: Arc<rustls::ClientConfig>, name: &str) -> TlsClient {
        let mut c = TlsClient::connect(addr, config);
        let mut f = Frame::new(FrameType::Hello);
        f.src = Bytes::copy_from_slice(name.as_bytes());
        f.payload = Bytes::from_static(b"{}");
        f.flags = Flags(Flags::JSON);
        c.send(&f);
        let w = c.recv();
        assert_eq!(w.kind, FrameType::Welcome, "{w:?}");
        c
    }

    fn send(&mut self, f: &Frame) {
        let mut out = BytesMut::new();
        codec::encode(f, &mut out);
        self.tls.write_all(&out).unwrap();
        self.tls.flush().unwrap();
    }

    fn recv(&mut self) -> Frame {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(f) = Decoder::new(1 << 24).decode(&mut self.buf).unwrap() {
                return f;
            }
            assert!(Instant::now() < deadline, "no frame within 5 s");
            let mut tmp = [0u8; 16384];
            match self.tls.read(&mut tmp) {
                Ok(0) => panic!("closed while waiting for a frame"),
                Ok(n) => self.buf.extend_from_slice(&tmp[..n]),
                Err(e) if is_timeout(&e) => {}
                Err(e) => panic!("read: {e}"),
            }
        }
    }
}

type TlsStream = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

/// Connects to `addr` as `localhost` and finishes the handshake.
fn tls_connect(addr: SocketAddr, config: Arc<rustls::ClientConfig>) -> TlsStream {
    try_tls_connect(addr, config).unwrap_or_else(|e| panic!("handshake: {e}"))
}

/// Connects and handshakes; the error when the handshake fails.
fn try_tls_connect(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
) -> Result<TlsStream, std::io::Error> {
    let sock = TcpStream::connect(addr).unwrap();
    sock.set_nodelay(true).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let name = ServerName::try_from("localhost").unwrap();
    let conn = rustls::ClientConnection::new(config, name).unwrap();
    let mut tls = rustls::StreamOwned::new(conn, sock);
    let deadline = Instant::now() + Duration::from_secs(5);
    while tls.conn.is_handshaking() {
        assert!(Instant::now() < deadline, "handshake did not finish");
        match tls.conn.complete_io(&mut tls.sock) {
            Ok(_) => {}
            Err(e) if is_timeout(&e) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(tls)
}

/// One HTTPS request (`Connection: close`): status and body.
fn https_get(addr: SocketAddr, config: Arc<rustls::ClientConfig>, path: &str) -> (u16, String) {
    let mut tls = tls_connect(addr, config);
    assert_eq!(tls.conn.alpn_protocol(), Some(&b"http/1.1"[..]));
    let req = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    tls.write_all(req.as_bytes()).unwrap();
    tls.flush().unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut got = Vec::new();
    let mut tmp = [0u8; 16384];
    loop {
        assert!(Instant::now() < deadline, "no complete response within 5 s");
        match tls.read(&mut tmp) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&tmp[..n]),
            Err(e) if is_timeout(&e) => {}
            // The server may close without close_notify once it has answered.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(e) => panic!("read: {e}"),
        }
    }
    let text = String::from_utf8_lossy(&got).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {text:?}"));
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

fn is_timeout(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    )
}

fn data(dst: &str, payload: &[u8]) -> Frame {
    Frame::data(
        Bytes::new(),
        Bytes::copy_from_slice(dst.as_bytes()),
        Bytes::copy_from_slice(payload),
    )
}

fn tls_addr(relay: &Relay) -> SocketAddr {
    relay.tcp_tls_addr().expect("TLS listener")
}

fn tls_errors(relay: &Relay) -> u64 {
    relay
        .stats()
        .iter()
        .map(|s| s.tls_errors.load(Ordering::Relaxed))
        .sum()
}

/// Frames both ways between a TLS controller and a plaintext one whose
/// addresses are owned by different shards, over TLS 1.3 and TLS 1.2; the
/// negotiated ALPN protocol is the relay's.
#[test]
fn rustls_clients_exchange_frames_with_plaintext_clients_on_other_shards() {
    let pki = Pki::new("rustls");
    let relay = start(|c| {
        pki.apply(c);
        c.tls.alpn = vec!["relay".into()];
    });
    let versions: [(&'static rustls::SupportedProtocolVersion, &str); 2] = [
        (&rustls::version::TLS13, "13"),
        (&rustls::version::TLS12, "12"),
    ];
    for (version, tag) in versions {
        let secure = addrs_on(&format!("tls{tag}-"), 0, 2, 1).remove(0);
        let plain = addrs_on(&format!("plain{tag}-"), 1, 2, 1).remove(0);
        let config = pki.client_config(version, &["relay"]);
        let mut t = TlsClient::hello(tls_addr(&relay), config, &secure);
        assert_eq!(t.tls.conn.protocol_version(), Some(version.version));
        assert_eq!(t.tls.conn.alpn_protocol(), Some(&b"relay"[..]));
        let mut p = Client::hello(relay.tcp_addr(), Form::Binary, &plain);

        // A payload larger than one TLS record each way.
        let big: Vec<u8> = (0..40_000u32).map(|i| i as u8).collect();
        t.send(&data(&plain, b"from tls"));
        t.send(&data(&plain, &big));
        let f = p.expect(FrameType::Data);
        assert_eq!(
            (&f.src[..], &f.payload[..]),
            (secure.as_bytes(), &b"from tls"[..])
        );
        assert_eq!(&p.expect(FrameType::Data).payload[..], &big[..]);

        p.data(&secure, 0, false, b"from plaintext");
        p.data(&secure, 0, false, &big);
        let f = t.recv();
        assert_eq!(f.kind, FrameType::Data);
        assert_eq!(
            (&f.src[..], &f.payload[..]),
            (plain.as_bytes(), &b"from plaintext"[..])
        );
        assert_eq!(&t.recv().payload[..], &big[..]);
    }
    assert_eq!(tls_errors(&relay), 0);
}

/// `openssl s_client` carries JSON lines both ways.
#[test]
fn openssl_s_client_speaks_the_json_form() {
    let pki = Pki::new("openssl");
    let relay = start(|c| pki.apply(c));
    let mut child = Command::new("openssl")
        .args(["s_client", "-quiet", "-connect"])
        .arg(tls_addr(&relay).to_string())
        .args([
            "-servername",
            "localhost",
            "-verify_return_error",
            "-CAfile",
        ])
        .arg(pki.dir.join("ca.pem"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("openssl runs");
    let mut stdin = child.stdin.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let next = |what: &str| -> Frame {
        let line = rx
            .recv_timeout(Duration::from_secs(10))
            .unwrap_or_else(|_| panic!("s_client printed no {what}"));
        json::parse_json(line.as_bytes()).unwrap()
    };
    let secure = addrs_on("ossl-", 0, 2, 1).remove(0);
    let plain = addrs_on("plain-", 1, 2, 1).remove(0);
    let mut hello = Frame::new(FrameType::Hello);
    hello.src = Bytes::copy_from_slice(secure.as_bytes());
    hello.payload = Bytes::from_static(b"{}");
    hello.flags = Flags(Flags::JSON);
    let mut out = BytesMut::new();
    json::write_json(&hello, &mut out);
    out.extend_from_slice(b"\n");
    stdin.write_all(&out).unwrap();
    stdin.flush().unwrap();
    assert_eq!(next("welcome").kind, FrameType::Welcome);

    let mut p = Client::hello(relay.tcp_addr(), Form::Json, &plain);
    p.data(&secure, 0, false, b"to openssl");
    let f = next("data");
    assert_eq!(
        (&f.src[..], &f.payload[..]),
        (plain.as_bytes(), &b"to openssl"[..])
    );

    let mut out = BytesMut::new();
    json::write_json(&data(&plain, b"from openssl"), &mut out);
    out.extend_from_slice(b"\n");
    stdin.write_all(&out).unwrap();
    stdin.flush().unwrap();
    let f = p.expect(FrameType::Data);
    assert_eq!(
        (&f.src[..], &f.payload[..]),
        (secure.as_bytes(), &b"from openssl"[..])
    );
    drop(stdin);
    let _ = child.kill();
    let _ = child.wait();
}

/// A plaintext hello on the TLS port gets a TLS alert and an orderly close
/// (no reset), and the listener goes on serving TLS clients.
#[test]
fn a_plaintext_client_on_the_tls_port_is_closed_cleanly() {
    let pki = Pki::new("plain");
    let relay = start(|c| pki.apply(c));
    let mut c = Client::connect(tls_addr(&relay), Form::Json);
    c.send_raw(b"{\"type\":\"hello\",\"src\":\"dev-p\"}\n")
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut got = Vec::new();
    let mut tmp = [0u8; 1024];
    loop {
        assert!(Instant::now() < deadline, "not closed within 5 s");
        match c.stream.read(&mut tmp) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&tmp[..n]),
            Err(e) if is_timeout(&e) => {}
            Err(e) => panic!("closed with an error (a reset?): {e}"),
        }
    }
    // Content type 21: a TLS alert record.
    assert_eq!(got.first(), Some(&21), "got {got:?}");
    assert_eq!(tls_errors(&relay), 1);
    let config = pki.client_config(&rustls::version::TLS13, &[]);
    TlsClient::hello(tls_addr(&relay), config, "after-plain");
}

/// A connection that never finishes its handshake is closed at
/// `[tls] handshake_timeout_ms`, long before the hello timeout; one that
/// finished it is left to the hello timeout.
#[test]
fn a_stalled_handshake_is_closed_at_its_deadline() {
    let pki = Pki::new("stall");
    let relay = start(|c| {
        pki.apply(c);
        c.tls.handshake_timeout_ms = 300;
        c.limits.hello_timeout_ms = 30_000;
    });
    let started = Instant::now();
    let mut silent = Client::connect(tls_addr(&relay), Form::Binary);
    // Half a record header: the handshake starts and stalls.
    silent.send_raw(&[22, 3, 1]).unwrap();
    let config = pki.client_config(&rustls::version::TLS13, &[]);
    let mut done = TlsClient::connect(tls_addr(&relay), config);
    let (_, closed) = silent.drain_until_closed(Duration::from_secs(5));
    let took = started.elapsed();
    assert!(closed, "a stalled handshake stays open");
    assert!(
        took >= Duration::from_millis(250) && took < Duration::from_secs(3),
        "closed after {took:?}"
    );
    let timeouts: u64 = relay
        .stats()
        .iter()
        .map(|s| s.tls_handshake_timeouts.load(Ordering::Relaxed))
        .sum();
    assert_eq!(timeouts, 1);
    // The finished handshake is still open and can say hello.
    std::thread::sleep(Duration::from_millis(400));
    let mut f = Frame::new(FrameType::Hello);
    f.src = Bytes::from_static(b"late-hello");
    f.payload = Bytes::from_static(b"{}");
    f.flags = Flags(Flags::JSON);
    done.send(&f);
    assert_eq!(done.recv().kind, FrameType::Welcome);
}

/// A missing certificate file stops the start with an error naming it.
#[test]
fn a_missing_certificate_file_is_a_clear_start_error() {
    let pki = Pki::new("missing");
    let mut cfg = common::test_config();
    pki.apply(&mut cfg);
    cfg.tls.cert_file = Some(pki.dir.join("nope.pem").display().to_string());
    let err = Relay::start(&cfg).unwrap_err().to_string();
    assert!(
        err.contains("tls.cert_file") && err.contains("nope.pem"),
        "{err}"
    );
}

/// HTTPS serves the API and `/metrics`, and `/ws` upgrades to wss whose
/// browser exchanges frames with a plaintext controller on another shard.
#[test]
fn https_serves_the_api_and_wss_carries_frames() {
    let pki = Pki::new("https");
    let relay = start(|c| {
        pki.apply(c);
        c.listeners.http_tls = Some("127.0.0.1:0".parse().unwrap());
    });
    let https = relay.http_tls_addr().expect("HTTPS listener");
    let http11 = pki.client_config(&rustls::version::TLS13, &["http/1.1"]);
    let (status, body) = https_get(https, http11.clone(), "/healthz");
    assert_eq!(status, 200, "{body}");
    let (status, body) = https_get(https, http11.clone(), "/metrics");
    assert_eq!(status, 200);
    assert!(
        body.contains("relay_tls_handshake_timeouts_total"),
        "{body}"
    );

    let web = addrs_on("wss-", 0, 2, 1).remove(0);
    let ctl = addrs_on("ctl-", 1, 2, 1).remove(0);
    let stream = tls_connect(https, http11);
    let url = format!("wss://localhost/ws?addr={web}");
    let (mut ws, resp) = tungstenite::client(url, stream).expect("websocket handshake");
    assert_eq!(resp.status().as_u16(), 101);
    let mut recv_json = || -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            assert!(Instant::now() < deadline, "no message within 5 s");
            match ws.read() {
                Ok(tungstenite::Message::Text(t)) => {
                    return serde_json::from_str(t.as_str()).unwrap();
                }
                Ok(_) => {}
                Err(tungstenite::Error::Io(e)) if is_timeout(&e) => {}
                Err(e) => panic!("websocket read: {e}"),
            }
        }
    };
    let w = recv_json();
    assert_eq!(w["type"], "welcome");
    let mut c = Client::hello(relay.tcp_addr(), Form::Binary, &ctl);
    c.data(&web, 0, false, &[1, 2, 3]);
    let got = recv_json();
    assert_eq!(got["src"], ctl.as_str());
    assert_eq!(got["payload_b64"], "AQID");
    let msg = serde_json::json!({"type":"data","dst":ctl,"payload":{"cmd":"on"}});
    ws.send(tungstenite::Message::text(msg.to_string()))
        .unwrap();
    let f = c.expect(FrameType::Data);
    assert_eq!(&f.src[..], web.as_bytes());
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&f.payload).unwrap(),
        serde_json::json!({"cmd":"on"})
    );
}

/// SIGHUP on a relay process: new handshakes get the new certificate while
/// an open connection keeps its session; a broken key file is refused with
/// an error naming it, and the running certificate stays.
#[test]
fn sighup_reloads_the_certificate_and_refuses_a_broken_one() {
    let old = Pki::new("reload-old");
    let new = Pki::new("reload-new");
    let file = old.dir.join("relay.toml");
    std::fs::write(
        &file,
        format!(
            "[node]\nname = \"n1\"\n[listeners]\ntcp = \"127.0.0.1:0\"\nhttp = \"127.0.0.1:0\"\n\
             tcp_tls = \"127.0.0.1:0\"\n[shards]\ncount = 2\npin = false\nio_memory_kib = 256\n\
             [plugins]\nenabled = false\n[tls]\ncert_file = {:?}\nkey_file = {:?}\n",
            old.cert_file.display().to_string(),
            old.key_file.display().to_string()
        ),
    )
    .unwrap();
    let mut relay = common::RelayProc::spawn(&file, &[]);
    let line = relay.wait_log("tcp_tls_addr=", Duration::from_secs(10));
    let addr: SocketAddr = line
        .split("tcp_tls_addr=")
        .nth(1)
        .unwrap()
        .chars()
        .take_while(|c| !c.is_whitespace() && *c != '"')
        .collect::<String>()
        .parse()
        .unwrap();
    let trusts_old = old.client_config(&rustls::version::TLS13, &[]);
    let trusts_new = new.client_config(&rustls::version::TLS13, &[]);
    let mut open = TlsClient::hello(addr, trusts_old.clone(), "kept-session");
    assert!(try_tls_connect(addr, trusts_new.clone()).is_err());

    // The new certificate is written over the old files.
    std::fs::copy(&new.cert_file, &old.cert_file).unwrap();
    std::fs::copy(&new.key_file, &old.key_file).unwrap();
    relay.signal(libc::SIGHUP);
    relay.wait_log("TLS certificate reloaded", Duration::from_secs(10));
    let err = try_tls_connect(addr, trusts_old.clone())
        .map(|_| ())
        .unwrap_err();
    assert!(err.to_string().contains("UnknownIssuer"), "{err}");
    let mut fresh = TlsClient::hello(addr, trusts_new.clone(), "fresh-session");
    // The connection opened before the reload keeps working.
    open.send(&data("fresh-session", b"still here"));
    let f = fresh.recv();
    assert_eq!(
        (&f.src[..], &f.payload[..]),
        (&b"kept-session"[..], &b"still here"[..])
    );

    // A broken key file: refused, named, and the new certificate stays.
    std::fs::write(&old.key_file, "not a key\n").unwrap();
    relay.signal(libc::SIGHUP);
    let line = relay.wait_log("TLS certificate refused", Duration::from_secs(10));
    assert!(line.contains("tls.key_file"), "{line}");
    TlsClient::hello(addr, trusts_new, "after-refusal");
    assert!(try_tls_connect(addr, trusts_old).is_err());
    assert!(relay.stop(Duration::from_secs(10)).success());
}

/// A relay that requires device certificates from `devices` and HMAC tokens
/// from everyone else.
fn mtls_relay(server: &Pki, devices: &Pki, require: bool) -> Relay {
    start(|c| {
        server.apply(c);
        c.auth.mode = relay_config::AuthMode::Hmac;
        c.auth.secret = "0123456789abcdef0123456789abcdef".into();
        c.tls.client_ca_file = Some(devices.dir.join("ca.pem").display().to_string());
        c.tls.require_client_cert = require;
    })
}

/// A client config trusting `server` and presenting `cert`.
fn device_config(
    server: &Pki,
    cert: (
        Vec<CertificateDer<'static>>,
        rustls::pki_types::PrivateKeyDer<'static>,
    ),
) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(server.ca_pem.as_bytes()).unwrap())
        .unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let c = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(cert.0, cert.1)
        .unwrap();
    Arc::new(c)
}

fn hello_frame(src: &str) -> Frame {
    let mut f = Frame::new(FrameType::Hello);
    f.src = Bytes::copy_from_slice(src.as_bytes());
    f.payload = Bytes::from_static(b"{}");
    f.flags = Flags(Flags::JSON);
    f
}

/// Reads until the relay closes the connection; the frames seen before.
fn until_closed(c: &mut TlsClient) -> Vec<Frame> {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut frames = Vec::new();
    let mut tmp = [0u8; 4096];
    loop {
        while let Ok(Some(f)) = Decoder::new(1 << 24).decode(&mut c.buf) {
            frames.push(f);
        }
        assert!(Instant::now() < deadline, "not closed within 5 s");
        match c.tls.read(&mut tmp) {
            Ok(0) => return frames,
            Ok(n) => c.buf.extend_from_slice(&tmp[..n]),
            Err(e) if is_timeout(&e) => {}
            // A TLS alert (the certificate refused) or a reset.
            Err(_) => return frames,
        }
    }
}

/// Device certificates: the CN is the address, so a hello needs no token
/// and may omit its address; another address is refused; a certificate from
/// another CA, or none, gets no session.
#[test]
fn device_certificates_name_the_address_and_other_cas_are_refused() {
    let server = Pki::new("mtls-server");
    let devices = Pki::new("mtls-devices");
    let stranger = Pki::new("mtls-stranger");
    let relay = mtls_relay(&server, &devices, true);
    let addr = tls_addr(&relay);
    let a = addrs_on("devc-", 0, 2, 1).remove(0);
    let b = addrs_on("devc-", 1, 2, 1).remove(0);

    // No token; `a` names itself, `b` leaves the address to its certificate.
    let mut ca = TlsClient::connect(
        addr,
        device_config(&server, devices.client_cert(&a, "x.example")),
    );
    ca.send(&hello_frame(&a));
    assert_eq!(ca.recv().kind, FrameType::Welcome);
    let mut cb = TlsClient::connect(
        addr,
        device_config(&server, devices.client_cert(&b, "y.example")),
    );
    cb.send(&hello_frame(""));
    let w = cb.recv();
    assert_eq!(w.kind, FrameType::Welcome);
    let v: serde_json::Value = serde_json::from_slice(&w.payload).unwrap();
    assert_eq!(v["addr"], b.as_str());
    ca.send(&data(&b, b"signed"));
    let f = cb.recv();
    assert_eq!((&f.src[..], &f.payload[..]), (a.as_bytes(), &b"signed"[..]));

    // A certificate for `a` cannot claim `b`.
    let mut liar = TlsClient::connect(
        addr,
        device_config(&server, devices.client_cert(&a, "x.example")),
    );
    liar.send(&hello_frame(&b));
    let frames = until_closed(&mut liar);
    assert_eq!(frames.len(), 1, "{frames:?}");
    let (code, _) = frames[0].error_parts().unwrap();
    assert_eq!(code, relay_core::ErrorCode::Unauthorized as u16);

    // Another CA's certificate: no welcome, the connection is closed.
    let wrong = device_config(&server, stranger.client_cert("devc-wrong", "z.example"));
    if let Ok(tls) = try_tls_connect(addr, wrong) {
        let mut c = TlsClient {
            tls,
            buf: BytesMut::new(),
        };
        let _ = c.tls.write_all(&{
            let mut out = BytesMut::new();
            codec::encode(&hello_frame("devc-wrong"), &mut out);
            out
        });
        assert!(until_closed(&mut c).is_empty());
    }
    // No certificate at all: refused too.
    let none = pki_client(&server);
    if let Ok(tls) = try_tls_connect(addr, none) {
        let mut c = TlsClient {
            tls,
            buf: BytesMut::new(),
        };
        let _ = c.tls.write_all(&{
            let mut out = BytesMut::new();
            codec::encode(&hello_frame("devc-none"), &mut out);
            out
        });
        assert!(until_closed(&mut c).is_empty());
    }
    assert!(tls_errors(&relay) >= 2);
    // The devices still talk.
    cb.send(&data(&a, b"after"));
    assert_eq!(&ca.recv().payload[..], b"after");
}

/// With `require_client_cert = false`, a client without a certificate is let
/// in but needs its token like on the plaintext port.
#[test]
fn optional_client_certificates_leave_token_auth_to_the_rest() {
    let server = Pki::new("mtls-opt");
    let devices = Pki::new("mtls-opt-devices");
    let relay = mtls_relay(&server, &devices, false);
    let mut c = TlsClient::connect(tls_addr(&relay), pki_client(&server));
    c.send(&hello_frame("no-cert"));
    let frames = until_closed(&mut c);
    let (code, _) = frames[0].error_parts().unwrap();
    assert_eq!(code, relay_core::ErrorCode::Unauthorized as u16);
    let name = "opt-device";
    let mut d = TlsClient::connect(
        tls_addr(&relay),
        device_config(&server, devices.client_cert(name, "x.example")),
    );
    d.send(&hello_frame(name));
    assert_eq!(d.recv().kind, FrameType::Welcome);
}

/// With `client_address = "san"`, the first DNS SAN names the address.
#[test]
fn the_address_can_come_from_the_subject_alternative_name() {
    let server = Pki::new("mtls-san");
    let devices = Pki::new("mtls-san-devices");
    let relay = start(|c| {
        server.apply(c);
        c.tls.client_ca_file = Some(devices.dir.join("ca.pem").display().to_string());
        c.tls.client_address = "san".into();
    });
    let cert = devices.client_cert("cn-name", "san-name");
    let mut d = TlsClient::connect(tls_addr(&relay), device_config(&server, cert));
    d.send(&hello_frame(""));
    let w = d.recv();
    let v: serde_json::Value = serde_json::from_slice(&w.payload).unwrap();
    assert_eq!(v["addr"], "san-name");
}

fn pki_client(server: &Pki) -> Arc<rustls::ClientConfig> {
    server.client_config(&rustls::version::TLS13, &[])
}

/// A socket that keeps a copy of every byte read from it.
struct Tap {
    sock: TcpStream,
    seen: Vec<u8>,
}

impl Read for Tap {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.sock.read(buf)?;
        self.seen.extend_from_slice(&buf[..n]);
        Ok(n)
    }
}

impl Write for Tap {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.sock.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.sock.flush()
    }
}

/// With `max_fragment_size = 512`, every record the relay sends (the
/// handshake's certificate included) carries at most 512 plaintext bytes, as
/// a BearSSL client with small buffers needs; frames still arrive whole.
#[test]
fn max_fragment_size_bounds_every_record_the_relay_sends() {
    let pki = Pki::new("frag");
    let relay = start(|c| {
        pki.apply(c);
        c.tls.max_fragment_size = 512;
    });
    for version in [&rustls::version::TLS12, &rustls::version::TLS13] {
        let sock = TcpStream::connect(tls_addr(&relay)).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let conn = rustls::ClientConnection::new(
            pki.client_config(version, &[]),
            ServerName::try_from("localhost").unwrap(),
        )
        .unwrap();
        let mut tls = rustls::StreamOwned::new(
            conn,
            Tap {
                sock,
                seen: Vec::new(),
            },
        );
        let mut hello = BytesMut::new();
        codec::encode(&hello_frame(""), &mut hello);
        tls.write_all(&hello).unwrap();
        let mut buf = BytesMut::new();
        // Read the welcome, then a 4000-byte frame to our own address.
        let mut frames = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut tmp = [0u8; 8192];
        let mut me = String::new();
        while frames.len() < 2 {
            assert!(
                Instant::now() < deadline,
                "frames did not arrive: {frames:?}"
            );
            match tls.read(&mut tmp) {
                Ok(0) => panic!("closed"),
                Ok(n) => buf.extend_from_slice(&tmp[..n]),
                Err(e) if is_timeout(&e) => {}
                Err(e) => panic!("read: {e}"),
            }
            while let Some(f) = Decoder::new(1 << 24).decode(&mut buf).unwrap() {
                if f.kind == FrameType::Welcome {
                    let v: serde_json::Value = serde_json::from_slice(&f.payload).unwrap();
                    me = v["addr"].as_str().unwrap().to_owned();
                    let mut out = BytesMut::new();
                    codec::encode(&data(&me, &[7u8; 4000]), &mut out);
                    tls.write_all(&out).unwrap();
                }
                frames.push(f);
            }
        }
        assert!(!me.is_empty());
        assert_eq!(&frames[1].payload[..], &[7u8; 4000][..]);
        // Every record: 5-byte header, then at most 512 plaintext bytes plus
        // the cipher's nonce, tag and (TLS 1.3) content type.
        let seen = &tls.sock.seen;
        let (mut at, mut records) = (0, 0);
        while at + 5 <= seen.len() {
            let len = u16::from_be_bytes([seen[at + 3], seen[at + 4]]) as usize;
            assert!(len <= 512 + 40, "a record of {len} bytes ({version:?})");
            at += 5 + len;
            records += 1;
        }
        assert!(records > 8, "{records} records ({version:?})");
    }
}

/// Session tickets: a device that reconnects resumes without the full
/// handshake, whichever shard takes the new connection; with
/// `session_tickets = false` every handshake is full.
#[test]
fn reconnecting_clients_resume_with_session_tickets() {
    let pki = Pki::new("resume");
    for tickets in [true, false] {
        let relay = start(|c| {
            pki.apply(c);
            c.tls.session_tickets = tickets;
            c.shards.count = 4;
        });
        let config = pki.client_config(&rustls::version::TLS13, &[]);
        let mut kinds = Vec::new();
        for i in 0..6 {
            let c = TlsClient::hello(tls_addr(&relay), config.clone(), &format!("resume-{i}"));
            kinds.push(c.tls.conn.handshake_kind());
        }
        let resumed = kinds
            .iter()
            .filter(|k| **k == Some(rustls::HandshakeKind::Resumed))
            .count();
        if tickets {
            assert_eq!(resumed, 5, "{kinds:?}");
        } else {
            assert_eq!(resumed, 0, "{kinds:?}");
        }
    }
}

/// A TLS client on the plaintext port gets no session and is closed.
#[test]
fn a_tls_client_on_the_plaintext_port_is_refused() {
    let pki = Pki::new("wrong-port");
    let relay = start(|c| pki.apply(c));
    let config = pki.client_config(&rustls::version::TLS13, &[]);
    assert!(try_tls_connect(relay.tcp_addr(), config).is_err());
}

/// Python's `ssl` module speaks JSON lines to the TLS port.
#[test]
fn python_ssl_speaks_the_json_form() {
    let pki = Pki::new("python");
    let relay = start(|c| pki.apply(c));
    let plain = addrs_on("py-plain-", 1, 2, 1).remove(0);
    let script = r#"
import socket, ssl, sys
ctx = ssl.create_default_context(cafile=sys.argv[1])
host, port = sys.argv[2].rsplit(":", 1)
s = ctx.wrap_socket(socket.create_connection((host, int(port)), timeout=10), server_hostname="localhost")
s.sendall(b'{"type":"hello","src":"py-device"}\n')
f = s.makefile("rb")
print(f.readline().decode().strip(), flush=True)
sys.stdin.readline()
s.sendall(('{"type":"data","dst":"%s","payload":{"from":"python"}}\n' % sys.argv[3]).encode())
print(f.readline().decode().strip(), flush=True)
"#;
    let mut child = Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(pki.dir.join("ca.pem"))
        .arg(tls_addr(&relay).to_string())
        .arg(&plain)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3 runs");
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(
        json::parse_json(line.trim().as_bytes()).unwrap().kind,
        FrameType::Welcome,
        "{line}"
    );
    let mut p = Client::hello(relay.tcp_addr(), Form::Json, &plain);
    child.stdin.as_mut().unwrap().write_all(b"go\n").unwrap();
    let f = p.expect(FrameType::Data);
    assert_eq!(&f.src[..], b"py-device");
    p.data("py-device", 0, false, b"to python");
    line.clear();
    out.read_line(&mut line).unwrap();
    let f = json::parse_json(line.trim().as_bytes()).unwrap();
    assert_eq!(&f.payload[..], b"to python");
    assert!(child.wait().unwrap().success());
}

fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap();
    kb * 1024
}

/// An idle TLS connection (handshake done, hello answered) holds a bounded,
/// small amount of the relay's memory: measured on a relay process, next to
/// idle plaintext connections.
#[test]
fn idle_tls_connections_hold_little_memory() {
    const N: usize = 400;
    let pki = Pki::new("rss");
    let file = pki.dir.join("relay.toml");
    std::fs::write(
        &file,
        format!(
            "[node]\nname = \"n1\"\n[listeners]\ntcp = \"127.0.0.1:0\"\nhttp = \"127.0.0.1:0\"\n\
             tcp_tls = \"127.0.0.1:0\"\n[shards]\ncount = 2\npin = false\nio_memory_kib = 256\n\
             [plugins]\nenabled = false\n[tls]\ncert_file = {:?}\nkey_file = {:?}\n",
            pki.cert_file.display().to_string(),
            pki.key_file.display().to_string()
        ),
    )
    .unwrap();
    let mut relay = common::RelayProc::spawn(&file, &[]);
    let line = relay.wait_log("tcp_tls_addr=", Duration::from_secs(10));
    let addr: SocketAddr = line
        .split("tcp_tls_addr=")
        .nth(1)
        .unwrap()
        .chars()
        .take_while(|c| !c.is_whitespace() && *c != '"')
        .collect::<String>()
        .parse()
        .unwrap();
    let pid = relay.child.id();
    let config = pki.client_config(&rustls::version::TLS13, &[]);
    // Warm up (allocator arenas, first handshakes) before measuring.
    let warm: Vec<_> = (0..50)
        .map(|i| TlsClient::hello(addr, config.clone(), &format!("warm-{i}")))
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let before = rss_bytes(pid);
    let tls: Vec<_> = (0..N)
        .map(|i| TlsClient::hello(addr, config.clone(), &format!("idle-tls-{i}")))
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let mid = rss_bytes(pid);
    let plain: Vec<_> = (0..N)
        .map(|i| Client::hello(relay.tcp, Form::Binary, &format!("idle-plain-{i}")))
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let after = rss_bytes(pid);
    let per_tls = mid.saturating_sub(before) / N as u64;
    let per_plain = after.saturating_sub(mid) / N as u64;
    eprintln!("RSS per idle connection: TLS {per_tls} B, plaintext {per_plain} B ({N} each)");
    // rustls' session state and the buffers it keeps, bounded.
    assert!(per_tls < 24 * 1024, "TLS {per_tls} B per idle connection");
    drop((warm, tls, plain));
    assert!(relay.stop(Duration::from_secs(10)).success());
}

/// An expired device certificate from the right CA gets no session.
#[test]
fn an_expired_device_certificate_is_refused() {
    let server = Pki::new("mtls-expired");
    let devices = Pki::new("mtls-expired-devices");
    let relay = mtls_relay(&server, &devices, true);
    let expired = devices.client_cert_with("dev-old", "old.example", |p| {
        p.not_before = rcgen::date_time_ymd(2020, 1, 1);
        p.not_after = rcgen::date_time_ymd(2021, 1, 1);
    });
    let mut refused = false;
    match try_tls_connect(tls_addr(&relay), device_config(&server, expired)) {
        Err(_) => refused = true,
        Ok(tls) => {
            let mut c = TlsClient {
                tls,
                buf: BytesMut::new(),
            };
            let mut out = BytesMut::new();
            codec::encode(&hello_frame("dev-old"), &mut out);
            let _ = c.tls.write_all(&out);
            if until_closed(&mut c).is_empty() {
                refused = true;
            }
        }
    }
    assert!(refused);
    assert_eq!(tls_errors(&relay), 1);
}

/// A flood of stalled handshakes is closed at the deadline while a real
/// client still gets through.
#[test]
fn a_handshake_flood_is_cut_at_the_deadline_and_real_clients_get_through() {
    let pki = Pki::new("flood");
    let relay = start(|c| {
        pki.apply(c);
        c.tls.handshake_timeout_ms = 500;
        c.limits.hello_timeout_ms = 30_000;
    });
    let addr = tls_addr(&relay);
    let mut flood: Vec<TcpStream> = (0..300)
        .map(|_| {
            let mut s = TcpStream::connect(addr).unwrap();
            // The start of a record header, then nothing.
            s.write_all(&[22, 3, 1]).unwrap();
            s
        })
        .collect();
    let config = pki.client_config(&rustls::version::TLS13, &[]);
    let mut c = TlsClient::hello(addr, config, "through-the-flood");
    c.send(&data("through-the-flood", b"echo"));
    assert_eq!(&c.recv().payload[..], b"echo");
    let deadline = Instant::now() + Duration::from_secs(5);
    for s in &mut flood {
        s.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let mut tmp = [0u8; 64];
        loop {
            assert!(Instant::now() < deadline, "the flood was not closed");
            match s.read(&mut tmp) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if is_timeout(&e) => {}
                Err(_) => break,
            }
        }
    }
    let timeouts: u64 = relay
        .stats()
        .iter()
        .map(|s| s.tls_handshake_timeouts.load(Ordering::Relaxed))
        .sum();
    assert_eq!(timeouts, 300);
}

impl Pki {
    /// A device certificate with serial `serial`, naming `cn`.
    fn serial_cert(
        &self,
        cn: &str,
        serial: u64,
    ) -> (
        Vec<CertificateDer<'static>>,
        rustls::pki_types::PrivateKeyDer<'static>,
    ) {
        self.client_cert_with(cn, "device.example", |p| {
            p.serial_number = Some(rcgen::SerialNumber::from(serial));
        })
    }

    /// A CRL of this CA listing `revoked` serials, as PEM.
    fn crl(&self, number: u64, revoked: &[u64]) -> String {
        let params = rcgen::CertificateRevocationListParams {
            this_update: rcgen::date_time_ymd(2024, 1, 1),
            next_update: rcgen::date_time_ymd(2099, 1, 1),
            crl_number: rcgen::SerialNumber::from(number),
            issuing_distribution_point: None,
            revoked_certs: revoked
                .iter()
                .map(|&s| rcgen::RevokedCertParams {
                    serial_number: rcgen::SerialNumber::from(s),
                    revocation_time: rcgen::date_time_ymd(2024, 6, 1),
                    reason_code: Some(rcgen::RevocationReason::KeyCompromise),
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: rcgen::KeyIdMethod::Sha256,
        };
        params.signed_by(&self.ca).unwrap().pem().unwrap()
    }
}

/// Connects with `cert` and says hello as `name`: whether it was welcomed
/// (a refused certificate gets no session: a failed handshake, or a close
/// before any frame).
fn device_welcomed(
    addr: SocketAddr,
    server: &Pki,
    cert: (
        Vec<CertificateDer<'static>>,
        rustls::pki_types::PrivateKeyDer<'static>,
    ),
    name: &str,
) -> bool {
    let Ok(tls) = try_tls_connect(addr, device_config(server, cert)) else {
        return false;
    };
    let mut c = TlsClient {
        tls,
        buf: BytesMut::new(),
    };
    let mut out = BytesMut::new();
    codec::encode(&hello_frame(name), &mut out);
    if c.tls.write_all(&out).and_then(|()| c.tls.flush()).is_err() {
        return false;
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut tmp = [0u8; 4096];
    loop {
        if let Ok(Some(f)) = Decoder::new(1 << 24).decode(&mut c.buf) {
            return f.kind == FrameType::Welcome;
        }
        assert!(Instant::now() < deadline, "no answer within 5 s");
        match c.tls.read(&mut tmp) {
            Ok(0) => return false,
            Ok(n) => c.buf.extend_from_slice(&tmp[..n]),
            Err(e) if is_timeout(&e) => {}
            Err(_) => return false,
        }
    }
}

/// `tls.crl_file`: a device certificate the CRL of its CA lists gets no
/// session; one from the same CA that it does not list is welcomed, and so
/// is a certificate with the revoked serial from another device CA (the
/// file holds one CRL per CA). A file that holds no CRL stops the start with
/// an error naming the key and the file.
#[test]
fn a_revoked_device_certificate_is_refused_and_its_sibling_accepted() {
    let server = Pki::new("crl-server");
    let devices = Pki::new("crl-devices");
    let other = Pki::new("crl-other-devices");
    let cas = devices.dir.join("cas.pem");
    std::fs::write(&cas, format!("{}{}", devices.ca_pem, other.ca_pem)).unwrap();
    let crl_file = devices.dir.join("devices.crl.pem");
    let pem = format!("{}{}", other.crl(1, &[]), devices.crl(2, &[7, 1001]));
    std::fs::write(&crl_file, pem).unwrap();
    let relay = start(|c| {
        server.apply(c);
        c.tls.client_ca_file = Some(cas.display().to_string());
        c.tls.crl_file = Some(crl_file.display().to_string());
    });
    let addr = tls_addr(&relay);
    assert!(!device_welcomed(
        addr,
        &server,
        devices.serial_cert("dev-revoked", 1001),
        "dev-revoked"
    ));
    assert!(device_welcomed(
        addr,
        &server,
        devices.serial_cert("dev-good", 1002),
        "dev-good"
    ));
    assert!(device_welcomed(
        addr,
        &server,
        other.serial_cert("dev-other", 1001),
        "dev-other"
    ));
    assert_eq!(tls_errors(&relay), 1);
    drop(relay);

    let mut cfg = common::test_config();
    server.apply(&mut cfg);
    cfg.tls.client_ca_file = Some(devices.dir.join("ca.pem").display().to_string());
    let bad = devices.dir.join("not-a-crl.pem");
    std::fs::write(&bad, devices.ca_pem.as_bytes()).unwrap();
    cfg.tls.crl_file = Some(bad.display().to_string());
    let err = format!("{:#}", Relay::start(&cfg).unwrap_err());
    assert!(
        err.contains("tls.crl_file") && err.contains("not-a-crl.pem"),
        "{err}"
    );
}

/// SIGHUP reads the CRL again with the certificate: a device revoked after
/// the start is refused from then on, and a broken CRL is refused with an
/// error naming `tls.crl_file` while the running one stays in force.
#[test]
fn sighup_reloads_the_crl_and_refuses_a_broken_one() {
    let server = Pki::new("crl-reload");
    let devices = Pki::new("crl-reload-devices");
    let crl_file = devices.dir.join("devices.crl.pem");
    std::fs::write(&crl_file, devices.crl(1, &[])).unwrap();
    let file = server.dir.join("relay.toml");
    std::fs::write(
        &file,
        format!(
            "[listeners]\ntcp = \"127.0.0.1:0\"\nhttp = \"127.0.0.1:0\"\n\
             tcp_tls = \"127.0.0.1:0\"\n[shards]\ncount = 2\npin = false\nio_memory_kib = 256\n\
             [plugins]\nenabled = false\n[tls]\ncert_file = {:?}\nkey_file = {:?}\n\
             client_ca_file = {:?}\ncrl_file = {:?}\n",
            server.cert_file.display().to_string(),
            server.key_file.display().to_string(),
            devices.dir.join("ca.pem").display().to_string(),
            crl_file.display().to_string(),
        ),
    )
    .unwrap();
    let mut relay = common::RelayProc::spawn(&file, &[]);
    let line = relay.wait_log("tcp_tls_addr=", Duration::from_secs(10));
    let addr: SocketAddr = line
        .split("tcp_tls_addr=")
        .nth(1)
        .unwrap()
        .chars()
        .take_while(|c| !c.is_whitespace() && *c != '"')
        .collect::<String>()
        .parse()
        .unwrap();
    let lost = || devices.serial_cert("dev-lost", 501);
    let kept = || devices.serial_cert("dev-kept", 502);
    assert!(device_welcomed(addr, &server, lost(), "dev-lost"));

    std::fs::write(&crl_file, devices.crl(2, &[501])).unwrap();
    relay.signal(libc::SIGHUP);
    relay.wait_log("TLS certificate reloaded", Duration::from_secs(10));
    assert!(!device_welcomed(addr, &server, lost(), "dev-lost"));
    assert!(device_welcomed(addr, &server, kept(), "dev-kept"));

    std::fs::write(
        &crl_file,
        "-----BEGIN X509 CRL-----\nbm90IGEgQ1JM\n-----END X509 CRL-----\n",
    )
    .unwrap();
    relay.signal(libc::SIGHUP);
    let line = relay.wait_log("TLS certificate refused", Duration::from_secs(10));
    assert!(
        line.contains("tls.crl_file") && line.contains("devices.crl.pem"),
        "{line}"
    );
    assert!(!device_welcomed(addr, &server, lost(), "dev-lost"));
    assert!(device_welcomed(addr, &server, kept(), "dev-kept"));
    assert!(relay.stop(Duration::from_secs(10)).success());
}

/// `tcp_tls` behind a balancer: the PROXY header comes before the TLS
/// handshake, and the client's `remote` is the header's source.
#[test]
fn a_proxy_header_before_the_handshake_names_the_client() {
    let pki = Pki::new("proxy");
    let relay = start(|c| {
        pki.apply(c);
        c.listeners.proxy_protocol = vec!["tcp_tls".into()];
    });
    let addr = tls_addr(&relay);
    let fake: SocketAddr = "203.0.113.50:61000".parse().unwrap();
    let mut sock = TcpStream::connect(addr).unwrap();
    sock.write_all(&relay_core::proxy::encode(fake, addr))
        .unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let name = ServerName::try_from("localhost").unwrap();
    let config = pki.client_config(&rustls::version::TLS13, &[]);
    let conn = rustls::ClientConnection::new(config.clone(), name).unwrap();
    let mut tls = rustls::StreamOwned::new(conn, sock);
    let deadline = Instant::now() + Duration::from_secs(5);
    while tls.conn.is_handshaking() {
        assert!(Instant::now() < deadline, "handshake did not finish");
        match tls.conn.complete_io(&mut tls.sock) {
            Ok(_) => {}
            Err(e) if is_timeout(&e) => {}
            Err(e) => panic!("handshake: {e}"),
        }
    }
    let mut c = TlsClient {
        tls,
        buf: BytesMut::new(),
    };
    c.send(&hello_frame("tls-behind-lb"));
    assert_eq!(c.recv().kind, FrameType::Welcome);
    let (status, v) = common::get(&relay, "/api/v1/clients/tls-behind-lb");
    assert_eq!(
        (status, v["remote"].as_str()),
        (200, Some("203.0.113.50:61000"))
    );
    // Without the header, the TLS port closes the connection.
    assert!(try_tls_connect(addr, config).is_err());
}

/// An MQTT CONNECT (clean start, keep alive 30 s) for `id`: 3.1.1 or 5.
fn mqtt_connect_packet(id: &str, v5: bool) -> Vec<u8> {
    let mut p = b"\x00\x04MQTT".to_vec();
    p.extend_from_slice(&[if v5 { 5 } else { 4 }, 0x02, 0, 30]);
    if v5 {
        p.push(0);
    }
    p.extend_from_slice(&(id.len() as u16).to_be_bytes());
    p.extend_from_slice(id.as_bytes());
    let mut pkt = vec![0x10, p.len() as u8];
    pkt.extend(p);
    pkt
}

/// Reads one MQTT packet (fixed header and body) off `s` within 5 s;
/// `None` when the connection ends first.
fn mqtt_packet(s: &mut impl Read, buf: &mut Vec<u8>) -> Option<Vec<u8>> {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut tmp = [0u8; 8192];
    loop {
        if buf.len() >= 2 {
            let (mut len, mut mult, mut at) = (0usize, 1usize, 1);
            let mut whole = false;
            while at < buf.len() && at < 5 {
                len += (buf[at] & 0x7f) as usize * mult;
                mult *= 128;
                at += 1;
                if buf[at - 1] & 0x80 == 0 {
                    whole = true;
                    break;
                }
            }
            if whole && buf.len() >= at + len {
                return Some(buf.drain(..at + len).collect());
            }
        }
        assert!(Instant::now() < deadline, "no MQTT packet within 5 s");
        match s.read(&mut tmp) {
            Ok(0) => return None,
            Ok(n) => buf.extend_from_slice(&tmp[..n]),
            Err(e) if is_timeout(&e) => {}
            Err(_) => return None,
        }
    }
}

/// `[listeners] mqtt_tls` alone (no other TLS listener) takes every `[tls]`
/// setting of `tcp_tls`: a stalled handshake is closed at its deadline, a
/// device certificate its CA's CRL lists gets no session while its sibling
/// is welcomed as the client its certificate names (an empty client id
/// becomes that name), every record the relay sends carries at most
/// `max_fragment_size` bytes, and a reconnecting device resumes with a
/// session ticket.
#[test]
fn mqtt_tls_takes_the_deadline_crl_fragment_size_and_tickets_of_tls() {
    let server = Pki::new("mqtts-server");
    let devices = Pki::new("mqtts-devices");
    let crl_file = devices.dir.join("devices.crl.pem");
    std::fs::write(&crl_file, devices.crl(1, &[1001])).unwrap();
    let relay = start(|c| {
        c.listeners.mqtt_tls = Some("127.0.0.1:0".parse().unwrap());
        c.tls.cert_file = Some(server.cert_file.display().to_string());
        c.tls.key_file = Some(server.key_file.display().to_string());
        c.tls.handshake_timeout_ms = 300;
        c.tls.max_fragment_size = 512;
        c.tls.client_ca_file = Some(devices.dir.join("ca.pem").display().to_string());
        c.tls.crl_file = Some(crl_file.display().to_string());
    });
    assert!(relay.tcp_tls_addr().is_none() && relay.mqtt_addr().is_none());
    let addr = relay.mqtt_tls_addr().expect("mqtt_tls listener");

    // A handshake that never starts: closed at the TLS deadline (300 ms),
    // long before MQTT's connect timeout.
    let started = Instant::now();
    let mut idle = TcpStream::connect(addr).unwrap();
    idle.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut b = [0u8; 64];
    assert!(matches!(idle.read(&mut b), Ok(0) | Err(_)));
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );

    // The revoked certificate: no CONNACK.
    let revoked = device_config(&server, devices.serial_cert("dev-revoked", 1001));
    if let Ok(mut tls) = try_tls_connect(addr, revoked) {
        let _ = tls.write_all(&mqtt_connect_packet("dev-revoked", true));
        let _ = tls.flush();
        assert_eq!(mqtt_packet(&mut tls, &mut Vec::new()), None);
    }

    // Its sibling, with an empty client id, twice (the second resumes).
    let good = device_config(&server, devices.serial_cert("dev-good", 1002));
    let mut ctl = Client::hello(relay.tcp_addr(), Form::Binary, "ctl-mqtts");
    let mut kinds = Vec::new();
    for round in 0..2u8 {
        let sock = TcpStream::connect(addr).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let conn =
            rustls::ClientConnection::new(good.clone(), ServerName::try_from("localhost").unwrap())
                .unwrap();
        let mut tls = rustls::StreamOwned::new(
            conn,
            Tap {
                sock,
                seen: Vec::new(),
            },
        );
        tls.write_all(&mqtt_connect_packet("", true)).unwrap();
        tls.flush().unwrap();
        let mut buf = Vec::new();
        let ack = mqtt_packet(&mut tls, &mut buf).expect("CONNACK");
        assert_eq!(&ack[..4], &[0x20, ack[1], 0x00, 0x00], "{ack:?}");
        // Assigned Client Identifier (0x12): the certificate's name.
        assert!(
            ack.windows(11).any(|w| w == b"\x12\x00\x08dev-good"),
            "{ack:?}"
        );
        kinds.push(tls.conn.handshake_kind());
        // A 4000-byte DATA to the certificate's name arrives as a PUBLISH.
        ctl.data("dev-good", u32::from(round) + 1, true, &[7u8; 4000]);
        assert_eq!(ctl.expect(FrameType::Ack).seq, u32::from(round) + 1);
        let publish = mqtt_packet(&mut tls, &mut buf).expect("PUBLISH");
        assert_eq!(publish[0] >> 4, 3);
        assert!(publish.ends_with(&[7u8; 4000]));
        let seen = &tls.sock.seen;
        let (mut at, mut records) = (0, 0);
        while at + 5 <= seen.len() {
            let len = u16::from_be_bytes([seen[at + 3], seen[at + 4]]) as usize;
            assert!(len <= 512 + 40, "a record of {len} bytes");
            at += 5 + len;
            records += 1;
        }
        assert!(records > 8, "{records} records");
    }
    assert_eq!(
        kinds,
        vec![
            Some(rustls::HandshakeKind::Full),
            Some(rustls::HandshakeKind::Resumed)
        ]
    );
    assert!(tls_errors(&relay) >= 1);

    // A reload with a new server certificate reaches mqtt_tls too.
    let renewed = Pki::new("mqtts-renewed");
    let mut cfg = common::test_config();
    cfg.listeners.mqtt_tls = Some(addr);
    cfg.tls.cert_file = Some(renewed.cert_file.display().to_string());
    cfg.tls.key_file = Some(renewed.key_file.display().to_string());
    // The controllers' ALPN is not MQTT's: a client offering another
    // protocol name is served all the same.
    cfg.tls.alpn = vec!["relay".into()];
    let report = relay.reload(&cfg);
    assert_eq!(report.tls_refused, None, "{report:?}");
    assert!(try_tls_connect(addr, server.client_config(&rustls::version::TLS13, &[])).is_err());
    let mut tls = try_tls_connect(
        addr,
        renewed.client_config(&rustls::version::TLS13, &["x-amzn-mqtt-ca"]),
    )
    .expect("the renewed certificate is served");
    assert_eq!(tls.conn.alpn_protocol(), None);
    tls.write_all(&mqtt_connect_packet("after-reload", false))
        .unwrap();
    tls.flush().unwrap();
    assert_eq!(
        mqtt_packet(&mut tls, &mut Vec::new()),
        Some(vec![0x20, 0x02, 0x00, 0x00])
    );
}
