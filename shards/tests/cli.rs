//! The `relay` command line: help, config checking and printing, and a run
//! on a config file that shuts down cleanly on SIGTERM.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn relay() -> Command {
    Command::new(env!("CARGO_BIN_EXE_relay"))
}

#[test]
fn help_explains_every_command() {
    let out = relay().arg("--help").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    for word in ["check-config", "config", "--config", "RELAY__"] {
        assert!(text.contains(word), "--help lacks {word}:\n{text}");
    }
}

#[test]
fn config_print_shows_the_commented_defaults() {
    let out = relay().args(["config", "print"]).output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(text, relay_config::DEFAULTS_TOML);
    assert!(text.contains('#'));
}

#[test]
fn check_config_reports_every_problem_with_file_and_key() {
    let dir = std::env::temp_dir().join(format!("relay-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("bad.toml");
    std::fs::write(
        &bad,
        "[limits]\nmax_frame = 3\nbogus = 1\n[auth]\nmode = \"hmac\"\n",
    )
    .unwrap();
    let out = relay().arg("check-config").arg(&bad).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8(out.stderr).unwrap();
    for key in ["limits.max_frame", "limits.bogus", "auth.secret"] {
        assert!(err.contains(key), "missing {key} in:\n{err}");
    }
    assert!(err.contains("bad.toml"));
    let good = dir.join("good.toml");
    std::fs::write(&good, "[limits]\nmax_frame = 4096\n").unwrap();
    let out = relay().arg("check-config").arg(&good).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn runs_on_a_config_file_and_stops_on_sigterm() {
    let dir = std::env::temp_dir().join(format!("relay-cli-run-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("relay.toml");
    std::fs::write(
        &cfg,
        "[listeners]\ntcp = \"127.0.0.1:0\"\nhttp = \"127.0.0.1:0\"\n[shards]\ncount = 2\npin = false\nio_memory_kib = 256\n[plugins]\nenabled = false\n",
    )
    .unwrap();
    let mut child = relay()
        .arg("--config")
        .arg(&cfg)
        .env("RELAY_LOG", "info")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut lines = BufReader::new(stderr).lines();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut tcp = None;
    while Instant::now() < deadline {
        let Some(Ok(line)) = lines.next() else { break };
        if let Some(rest) = line.split("tcp_addr=").nth(1) {
            tcp = rest.split_whitespace().next().map(str::to_owned);
            break;
        }
    }
    let tcp = tcp.expect("the relay logs where it listens");
    let mut s = std::net::TcpStream::connect(&tcp).unwrap();
    std::io::Write::write_all(&mut s, b"{\"type\":\"hello\",\"addr\":\"cli-1\"}\n").unwrap();
    let mut line = String::new();
    BufReader::new(&s).read_line(&mut line).unwrap();
    assert!(line.contains("\"welcome\""), "{line}");
    // SAFETY: signalling the child we spawned.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success());
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "relay did not stop on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
