//! What the end-to-end suites share: a small, short scenario of one pattern,
//! a run that must succeed, and the counts every data pattern must show.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};

use relay_loadtest::coordinator::{RunOptions, run};
use relay_loadtest::report::Report;
use relay_loadtest::scenario::{Dur, Pattern, Scenario};

/// Ten controllers for a second against `controllers` (and `browsers`, when
/// not empty), under a prefix of their own so runs never see each other.
pub fn small_scenario(
    name: &str,
    pattern: Pattern,
    controllers: String,
    browsers: String,
) -> Scenario {
    static N: AtomicU32 = AtomicU32::new(0);
    let mut s = Scenario::default();
    s.name = format!("{name}-{pattern}");
    s.pattern = pattern;
    s.target.controllers = controllers;
    s.target.browsers = browsers;
    s.target.prefix = format!(
        "lt{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    );
    s.load.controllers = 10;
    s.load.duration = Dur::secs(1);
    s.load.drain = Dur::millis(800);
    s.load.heartbeat = Dur::millis(250);
    s.run.threads = 2;
    s.run.connect_timeout = Dur::secs(5);
    s
}

pub fn run_ok(s: &Scenario) -> Report {
    run(s, &RunOptions::default()).unwrap_or_else(|e| panic!("{}: {e}", s.name))
}

/// The relay-loadtest binary, to be given its arguments.
pub fn loadtest() -> Command {
    Command::new(env!("CARGO_BIN_EXE_relay-loadtest"))
}

/// The binary set to run the scenario file `scenario` without the progress line
/// and write its JSON report to `json`; more arguments may follow.
pub fn loadtest_on(scenario: &Path, json: &Path) -> Command {
    let mut c = loadtest();
    c.arg("--scenario")
        .arg(scenario)
        .arg("--no-progress")
        .arg("--json")
        .arg(json);
    c
}

/// Reads the JSON report a run wrote; `stdout`, the run's output, explains a
/// report that is missing or unreadable.
pub fn read_report(json: &Path, stdout: &str) -> Report {
    let text = std::fs::read_to_string(json).unwrap_or_else(|e| panic!("{e}\n{stdout}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}\n{stdout}"))
}

/// Runs the binary on `s` with JSON and HTML reports, checks that the HTML page
/// leads with the verdict, and returns the exit code, stdout and JSON report.
pub fn run_binary(s: &Scenario, tag: &str) -> (Option<i32>, String, Report) {
    let dir = std::env::temp_dir().join(format!("lt-bin-{}-{tag}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let scenario = dir.join("s.toml");
    let json = dir.join("r.json");
    let html = dir.join("r.html");
    std::fs::write(&scenario, toml::to_string(s).unwrap()).unwrap();
    let out = loadtest_on(&scenario, &json)
        .arg("--html")
        .arg(&html)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let r = read_report(&json, &stdout);
    let page = std::fs::read_to_string(&html).unwrap();
    assert!(
        page.contains(&format!(
            "RESULT: {}",
            r.verdict.headline().replace('>', "&gt;")
        )),
        "the HTML report leads with the verdict"
    );
    let _ = std::fs::remove_dir_all(&dir);
    (out.status.code(), stdout, r)
}

/// Every connection up, every message sent reached each of its `recipients`,
/// nothing lost or late, no errors.
pub fn assert_no_loss(r: &Report, recipients: u64) {
    assert_eq!(r.connect.failed, 0, "{:?}", r.connect.errors);
    assert_eq!(r.connect.established, r.fleet.connections);
    let s = &r.steps[0];
    assert!(s.sent > 0, "nothing was sent");
    assert_eq!(s.expected, s.sent * recipients);
    assert_eq!(
        s.received, s.expected,
        "received = expected, errors {:?}",
        s.errors
    );
    assert_eq!((s.lost, s.late), (0, 0));
    assert_eq!(s.loss_ratio, 0.0);
    assert!(s.errors.is_empty(), "{:?}", s.errors);
}

/// A plain blocking-socket server on 127.0.0.1:0, a thread per connection: it echoes
/// every byte (or, with `echo` false, reads and discards them), and closes every
/// connection over `max` open at once.
pub struct EchoServer {
    pub port: u16,
    stop: Arc<AtomicBool>,
}

impl EchoServer {
    pub fn start(max: usize, echo: bool) -> Self {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let taken = Arc::new(AtomicUsize::new(0));
        std::thread::spawn(move || {
            for c in l.incoming() {
                if stop2.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(mut c) = c else { continue };
                // At most `max` connections at once: one over it is accepted and
                // closed at once, as a server out of slots does.
                if taken.fetch_add(1, Ordering::SeqCst) >= max {
                    taken.fetch_sub(1, Ordering::SeqCst);
                    drop(c);
                    continue;
                }
                let taken = taken.clone();
                let _ = std::thread::Builder::new()
                    .stack_size(64 * 1024)
                    .spawn(move || {
                        serve(&mut c, echo);
                        // The slot is free before the peer can see the close.
                        taken.fetch_sub(1, Ordering::SeqCst);
                        drop(c);
                    });
            }
        });
        Self { port, stop }
    }

    pub fn url(&self) -> String {
        format!("echo://127.0.0.1:{}", self.port)
    }
}

fn serve(c: &mut TcpStream, echo: bool) {
    let _ = c.set_nodelay(true);
    let mut buf = [0u8; 16 * 1024];
    loop {
        match c.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if echo && c.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        }
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

/// The relay binary the end-to-end suites start: `RELAY_BIN`, or the one
/// built beside the test executable (target/<profile>/relay).
pub fn relay_bin() -> std::path::PathBuf {
    if let Some(p) = std::env::var_os("RELAY_BIN") {
        return std::path::PathBuf::from(p);
    }
    // target/<profile>/deps/<test>-… → target/<profile>/relay
    let exe = std::env::current_exe().expect("test executable path");
    let bin = exe
        .parent()
        .and_then(|deps| deps.parent())
        .map(|dir| dir.join("relay"))
        .expect("target directory");
    assert!(
        bin.exists(),
        "no relay binary at {}: build it with `cargo build -p relay-shards --bin relay` or set RELAY_BIN",
        bin.display()
    );
    bin
}

/// Value of `key=` in a relay log line (digits, dots and colons: a port, an
/// address; ANSI colour codes before it are skipped).
pub fn field(line: &str, key: &str) -> Option<String> {
    let at = line.find(key)? + key.len();
    let v: String = line[at..]
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.' || *c == ':')
        .collect();
    (!v.is_empty()).then_some(v)
}

/// A started relay's `tcp_addr` and `http_addr`, once it says it listens.
pub type Listening = std::sync::mpsc::Receiver<(Option<String>, Option<String>)>;

/// Starts the relay with the config file `cfg` (logging at info).
pub fn spawn_relay(cfg: &Path) -> (std::process::Child, Listening) {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;
    let mut child = Command::new(relay_bin())
        .arg("--config")
        .arg(cfg)
        .env("RELAY_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start relay");
    let stderr = child.stderr.take().expect("piped stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if line.contains("relay listening") {
                let _ = tx.send((field(&line, "tcp_addr="), field(&line, "http_addr=")));
            }
        }
    });
    (child, rx)
}
