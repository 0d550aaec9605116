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
fn check_config_says_why_a_shard_count_over_the_maximum_is_refused() {
    let dir = std::env::temp_dir().join(format!("relay-cli-shards-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let max = relay_config::MAX_SHARDS;
    let over = dir.join("over.toml");
    std::fs::write(&over, format!("[shards]\ncount = {}\n", max + 1)).unwrap();
    let out = relay().arg("check-config").arg(&over).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        err.contains(&format!(
            "shards.count: is {}, must be at most {max} (0 means one shard per core; the router tracks shards in 64-bit masks)",
            max + 1
        )),
        "{err}"
    );
    let most = dir.join("most.toml");
    std::fs::write(&most, format!("[shards]\ncount = {max}\n")).unwrap();
    let out = relay().arg("check-config").arg(&most).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Starts the relay binary on a config of two shards on port 0; `files`
/// caps its open-file limit (soft and hard). Returns the child and the
/// address it logged for controllers.
fn spawn_relay(name: &str, files: Option<u64>) -> (Proc, String) {
    let dir = std::env::temp_dir().join(format!("relay-cli-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("relay.toml");
    std::fs::write(
        &cfg,
        "[listeners]\ntcp = \"127.0.0.1:0\"\nhttp = \"127.0.0.1:0\"\n[shards]\ncount = 2\npin = false\nio_memory_kib = 256\n[plugins]\nenabled = false\n",
    )
    .unwrap();
    let mut cmd = relay();
    cmd.arg("--config")
        .arg(&cfg)
        .env("RELAY_LOG", "info")
        .stderr(Stdio::piped());
    if let Some(n) = files {
        use std::os::unix::process::CommandExt;
        // SAFETY: only async-signal-safe setrlimit runs between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                let lim = libc::rlimit {
                    rlim_cur: n,
                    rlim_max: n,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    let mut child = cmd.spawn().unwrap();
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
    // Keep draining the log so the relay never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    (Proc(child), tcp.expect("the relay logs where it listens"))
}

/// The relay process, killed if a test fails before stopping it.
struct Proc(std::process::Child);

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Says hello as `addr` and returns the first line the relay answers.
fn hello(tcp: &str, addr: &str) -> std::io::Result<(std::net::TcpStream, String)> {
    let mut s = std::net::TcpStream::connect(tcp)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let hello = format!("{{\"type\":\"hello\",\"addr\":\"{addr}\"}}\n");
    std::io::Write::write_all(&mut s, hello.as_bytes())?;
    let mut line = String::new();
    BufReader::new(&s).read_line(&mut line)?;
    Ok((s, line))
}

/// CPU seconds (user + system) the process has used so far.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let ticks = relay_core::procstat::cpu_ticks(&stat).expect("a /proc/<pid>/stat line");
    // SAFETY: sysconf has no preconditions.
    let per_sec = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    relay_core::procstat::ticks_to_us(ticks, per_sec) as f64 / 1e6
}

fn stop(mut proc: Proc) {
    let child = &mut proc.0;
    // SAFETY: signalling the child we spawned.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success());
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "relay did not stop on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn out_of_descriptors_connected_clients_go_on_and_accepts_resume_without_spinning() {
    let (child, tcp) = spawn_relay("nofile", Some(96));
    // A pair connected before the descriptors run out keeps talking.
    let (mut a, line) = hello(&tcp, "cli-a").unwrap();
    assert!(line.contains("\"welcome\""), "{line}");
    let (b, line) = hello(&tcp, "cli-b").unwrap();
    assert!(line.contains("\"welcome\""), "{line}");
    // Far more clients than descriptors: the first get in, the rest wait in
    // the kernel's accept queue.
    let mut held = Vec::new();
    for _ in 0..150 {
        held.push(std::net::TcpStream::connect(&tcp).unwrap());
    }
    std::thread::sleep(Duration::from_millis(500));
    // Out of descriptors, the relay must not spin on its listener.
    let before = cpu_seconds(child.0.id());
    std::thread::sleep(Duration::from_secs(2));
    let used = cpu_seconds(child.0.id()) - before;
    assert!(
        used < 0.5,
        "relay used {used:.2} s of CPU in 2 s while out of descriptors"
    );
    std::io::Write::write_all(
        &mut a,
        b"{\"type\":\"data\",\"dst\":\"cli-b\",\"payload\":{\"t\":1}}\n",
    )
    .unwrap();
    let mut got = String::new();
    BufReader::new(&b).read_line(&mut got).unwrap();
    assert!(got.contains("\"src\":\"cli-a\""), "{got}");
    // Freeing descriptors lets accepts resume: every waiting client, and a
    // new one, gets served.
    held.truncate(20);
    let (_s, line) = hello(&tcp, "cli-after").unwrap();
    assert!(line.contains("\"welcome\""), "{line}");
    drop(held);
    stop(child);
}

#[test]
fn runs_on_a_config_file_and_stops_on_sigterm() {
    let (child, tcp) = spawn_relay("run", None);
    let (_s, line) = hello(&tcp, "cli-1").unwrap();
    assert!(line.contains("\"welcome\""), "{line}");
    stop(child);
}
