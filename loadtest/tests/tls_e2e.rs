//! TLS targets end to end, with certificates made here by rcgen: a real `relay`
//! process with its `tcp_tls` and `http_tls` listeners on port 0 (controllers over
//! `tcps://`, browsers over `wss://`), a relay whose certificate the tool does not
//! trust (a clear connect error and exit 2), and a Mosquitto started here with a
//! TLS listener on an ephemeral port (`mqtts://`, also with client certificates).
//!
//! The relay binary is found as in `relay_e2e.rs` (`RELAY_BIN`, or this test's
//! target directory: `cargo build -p relay-shards --bin relay`).

#![allow(clippy::field_reassign_with_default)]

use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

mod common;

use common::{assert_no_loss, field, relay_bin, run_binary, run_ok};
use relay_loadtest::scenario::{Form, Pattern, Scenario};

/// A fresh directory, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "lt-tls-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A CA and a server certificate for `localhost` and 127.0.0.1 it signed, and a
/// client certificate it signed, as PEM files.
struct Pki {
    ca_file: PathBuf,
    cert_file: PathBuf,
    key_file: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
}

impl Pki {
    fn new(dir: &Path, tag: &str) -> Pki {
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, format!("loadtest CA {tag}"));
        let ca =
            rcgen::CertifiedIssuer::self_signed(ca_params, rcgen::KeyPair::generate().unwrap())
                .unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()])
            .unwrap()
            .signed_by(&key, &ca)
            .unwrap();
        let client_key = rcgen::KeyPair::generate().unwrap();
        let mut cp = rcgen::CertificateParams::new(vec!["device".into()]).unwrap();
        cp.distinguished_name
            .push(rcgen::DnType::CommonName, "device");
        let client = cp.signed_by(&client_key, &ca).unwrap();
        let p = |f: &str| dir.join(format!("{tag}-{f}"));
        let pki = Pki {
            ca_file: p("ca.pem"),
            cert_file: p("cert.pem"),
            key_file: p("key.pem"),
            client_cert: p("client.pem"),
            client_key: p("client-key.pem"),
        };
        std::fs::write(&pki.ca_file, ca.pem()).unwrap();
        std::fs::write(&pki.cert_file, cert.pem()).unwrap();
        std::fs::write(&pki.key_file, key.serialize_pem()).unwrap();
        std::fs::write(&pki.client_cert, client.pem()).unwrap();
        std::fs::write(&pki.client_key, client_key.serialize_pem()).unwrap();
        pki
    }
}

/// A child process killed (by its pid) when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A relay with its TLS listeners on port 0; returns it and its `tcp_tls` and
/// `http_tls` addresses.
fn start_tls_relay(dir: &Path, pki: &Pki) -> (Proc, String, String) {
    let cfg = dir.join("relay.toml");
    std::fs::write(
        &cfg,
        format!(
            "[listeners]\ntcp = \"127.0.0.1:0\"\nhttp = \"127.0.0.1:0\"\n\
             tcp_tls = \"127.0.0.1:0\"\nhttp_tls = \"127.0.0.1:0\"\n\
             [tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\n\
             [shards]\ncount = 2\npin = false\nio_memory_kib = 256\n\
             [plugins]\nenabled = false\n",
            pki.cert_file.display(),
            pki.key_file.display()
        ),
    )
    .unwrap();
    let mut child = Command::new(relay_bin())
        .arg("--config")
        .arg(&cfg)
        .env("RELAY_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start relay");
    let stderr = child.stderr.take().unwrap();
    let proc = Proc(child);
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if let Some(a) = field(&line, "tcp_tls_addr=") {
                let _ = tx.send(("tcp", a));
            } else if let Some(a) = field(&line, "http_tls_addr=") {
                let _ = tx.send(("http", a));
            }
        }
    });
    let (mut tcp, mut http) = (None, None);
    while tcp.is_none() || http.is_none() {
        let (k, a) = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("the relay reports its TLS addresses within 30 s");
        if k == "tcp" {
            tcp = Some(a);
        } else {
            http = Some(a);
        }
    }
    (proc, tcp.unwrap(), http.unwrap())
}

fn tls_scenario(tcp: &str, http: &str, pki: &Pki, pattern: Pattern) -> Scenario {
    let mut s = common::small_scenario(
        "tls",
        pattern,
        format!("tcps://{tcp}"),
        format!("wss://{http}/ws"),
    );
    s.target.ca_file = Some(pki.ca_file.clone());
    // Judged on counts only: latency on a shared machine is not what these tests
    // check.
    s.find_max.slo_p99 = relay_loadtest::scenario::Dur::secs(60);
    s
}

#[test]
fn telemetry_and_commands_over_tcps_and_wss_lose_nothing() {
    let dir = TempDir::new("relay");
    let pki = Pki::new(&dir.0, "good");
    let (relay, tcp, http) = start_tls_relay(&dir.0, &pki);

    // Binary controllers over tcps:// to JSON browsers over wss://, through the
    // binary: exit 0, verdict PASS, nothing lost, every heartbeat answered.
    let mut s = tls_scenario(&tcp, &http, &pki, Pattern::Telemetry);
    s.load.rate = Some(20.0);
    let (code, stdout, r) = run_binary(&s, "tls-telemetry");
    assert_eq!(code, Some(0), "{stdout}");
    assert!(r.verdict.passed, "{stdout}");
    assert_no_loss(&r, 1);
    let st = &r.steps[0];
    assert_eq!(st.sent, 200);
    assert_eq!(st.latency.count, 200);
    assert_eq!(st.pongs, st.pings, "every heartbeat answered");
    assert!(st.pings > 0);
    assert!(st.send_lag.count > 0, "send lag is measured over TLS too");
    // The relay was found from its TLS port and sampled.
    assert_eq!(r.server.as_ref().expect("server sampled").pid, relay.0.id());

    // The other forms, and command round trips: the reader writes replies into the
    // same TLS session the sender thread writes scheduled messages into.
    let mut s = tls_scenario(&tcp, &http, &pki, Pattern::Command);
    s.target.controller_form = Form::Json;
    s.target.browser_form = Form::Binary;
    s.load.rate = Some(20.0);
    let r = run_ok(&s);
    assert_no_loss(&r, 1);
    assert_eq!(r.steps[0].latency.count, 200, "one round trip per command");

    // A higher rate with bigger payloads: many records in flight each way while
    // the sender thread and the readers share every session.
    let mut s = tls_scenario(&tcp, &http, &pki, Pattern::Telemetry);
    s.load.controllers = 20;
    s.load.rate = Some(200.0);
    s.load.payload_bytes = 2000;
    // A debug build on a busy machine can be a second behind: wait for it.
    s.load.drain = relay_loadtest::scenario::Dur::secs(5);
    let r = run_ok(&s);
    assert_no_loss(&r, 1);
    assert_eq!(r.steps[0].sent, 4000);

    // The server name can differ from the URL's host: 127.0.0.1 in the URL,
    // `localhost` verified.
    let mut s = tls_scenario(&tcp, &http, &pki, Pattern::Idle);
    s.target.tls_server_name = Some("localhost".into());
    let r = run_ok(&s);
    assert_eq!(r.connect.established, 10, "{:?}", r.connect.errors);
    // And a name the certificate does not hold fails.
    let mut s = tls_scenario(&tcp, &http, &pki, Pattern::Idle);
    s.target.tls_server_name = Some("elsewhere.example".into());
    let r = run(&s);
    assert_eq!(r.connect.established, 0);
    assert!(
        r.connect.errors.contains_key("tls:not_valid_for_name"),
        "{:?}",
        r.connect.errors
    );
}

fn run(s: &Scenario) -> relay_loadtest::report::Report {
    relay_loadtest::coordinator::run(s, &Default::default()).unwrap()
}

#[test]
fn a_server_signed_by_another_ca_fails_to_connect_and_the_report_says_why() {
    let dir = TempDir::new("wrongca");
    let pki = Pki::new(&dir.0, "server");
    let other = Pki::new(&dir.0, "other");
    let (_relay, tcp, http) = start_tls_relay(&dir.0, &pki);
    let mut s = tls_scenario(&tcp, &http, &other, Pattern::Telemetry);
    s.load.rate = Some(10.0);
    let (code, stdout, r) = run_binary(&s, "tls-wrong-ca");
    assert_eq!(code, Some(2), "{stdout}");
    assert!(!r.verdict.passed);
    assert_eq!(r.connect.established, 0);
    assert_eq!(
        r.connect.errors.get("tls:unknown_issuer"),
        Some(&20),
        "{:?}",
        r.connect.errors
    );
    let why = r.verdict.failures.join("; ");
    assert!(
        why.contains("connections failed (tls:unknown_issuer=20)"),
        "{why}"
    );
    assert!(stdout.contains("tls:unknown_issuer"), "{stdout}");
}

/// A Mosquitto with a TLS listener on a free loopback port; `require_cert` asks
/// clients for a certificate signed by the CA.
fn start_mosquitto_tls(dir: &Path, pki: &Pki, require_cert: bool) -> (Proc, u16) {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let conf = dir.join(format!("mosquitto-{port}.conf"));
    std::fs::write(
        &conf,
        format!(
            "listener {port} 127.0.0.1\ncertfile {}\nkeyfile {}\ncafile {}\n\
             require_certificate {require_cert}\nallow_anonymous true\n\
             persistence false\nlog_type none\n",
            pki.cert_file.display(),
            pki.key_file.display(),
            pki.ca_file.display()
        ),
    )
    .unwrap();
    let child = Command::new("mosquitto")
        .arg("-c")
        .arg(&conf)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("mosquitto is installed");
    let proc = Proc(child);
    let until = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < until, "mosquitto listens on {port}");
        std::thread::sleep(Duration::from_millis(50));
    }
    (proc, port)
}

#[test]
fn mqtt_over_tls_against_mosquitto_with_and_without_client_certificates() {
    let dir = TempDir::new("mosq");
    let pki = Pki::new(&dir.0, "mosq");

    let (mosq, port) = start_mosquitto_tls(&dir.0, &pki, false);
    let mut s = common::small_scenario(
        "mqtts",
        Pattern::Telemetry,
        format!("mqtts://127.0.0.1:{port}"),
        String::new(),
    );
    s.target.ca_file = Some(pki.ca_file.clone());
    s.load.rate = Some(20.0);
    let r = run_ok(&s);
    assert_no_loss(&r, 1);
    assert_eq!(r.steps[0].sent, 200);
    assert_eq!(r.target.kind, "mqtt");
    assert_eq!(r.steps[0].pongs, r.steps[0].pings);
    assert_eq!(r.server.as_ref().expect("server sampled").pid, mosq.0.id());
    drop(mosq);

    // Mutual TLS: a broker that requires a client certificate refuses the tool
    // without one and takes it with --client-cert/--client-key.
    let (_mosq, port) = start_mosquitto_tls(&dir.0, &pki, true);
    let mut s = common::small_scenario(
        "mqtts-mtls",
        Pattern::Telemetry,
        format!("mqtts://127.0.0.1:{port}"),
        String::new(),
    );
    s.target.ca_file = Some(pki.ca_file.clone());
    s.load.rate = Some(20.0);
    let r = run(&s);
    assert_eq!(r.connect.established, 0, "{:?}", r.connect.errors);
    assert!(
        r.connect.errors.keys().all(|k| k.starts_with("tls:")),
        "{:?}",
        r.connect.errors
    );
    s.target.client_cert = Some(pki.client_cert.clone());
    s.target.client_key = Some(pki.client_key.clone());
    let r = run_ok(&s);
    assert_no_loss(&r, 1);
}
