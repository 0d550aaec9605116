//! The Debian package: built by packaging/build-deb.sh around the test build of
//! `relay`, installed with `dpkg --root` into a throwaway root, its files and
//! maintainer scripts checked, its unit verified by `systemd-analyze verify`,
//! and the installed binary started on the installed config pointed at
//! loopback until it answers /healthz.
//!
//! dpkg, dpkg-deb and systemd-analyze are required: the test fails, naming the
//! missing tool, when one is absent (.ci/run installs them).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Runs `cmd`, panics with its output unless it succeeds, returns (stdout, stderr).
fn run(cmd: &mut Command) -> (String, String) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    (stdout, stderr)
}

fn require(tool: &str) {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "{tool} is required by this test and is not on PATH (apt-get install dpkg systemd)"
    );
}

/// The relay process, killed if the test fails before it stops.
struct Proc(std::process::Child);

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

fn get(addr: &str, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).expect("connect http");
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

/// The value after `key=` in a log line (text or JSON).
fn field(line: &str, key: &str) -> Option<String> {
    let rest = line.split(key).nth(1)?;
    Some(
        rest.chars()
            .take_while(|c| !c.is_whitespace() && *c != '"')
            .collect(),
    )
}

#[test]
fn deb_installs_verifies_and_runs() {
    for tool in ["dpkg", "dpkg-deb", "systemd-analyze", "systemd-sysusers"] {
        require(tool);
    }
    let tmp = std::env::temp_dir().join(format!("relay-package-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).unwrap();

    // 1. Build the package around this build's binary.
    let (stdout, _) = run(Command::new("bash")
        .arg(workspace().join("packaging/build-deb.sh"))
        .args([
            "--binary",
            env!("CARGO_BIN_EXE_relay"),
            "--compression",
            "gzip",
        ])
        .arg("--out")
        .arg(tmp.join("out")));
    let deb = PathBuf::from(stdout.lines().last().expect("the script names the .deb"));
    assert!(deb.is_file(), "{} missing", deb.display());

    let (control, _) = run(Command::new("dpkg-deb").arg("-f").arg(&deb));
    for want in [
        "Package: relay",
        "Version: 0.1.0",
        "Depends: ",
        "Description: ",
    ] {
        assert!(control.contains(want), "control lacks {want}:\n{control}");
    }
    // 2. Install it into an empty root; the maintainer scripts run outside a
    // chroot with DPKG_ROOT set (the root has no shell of its own).
    let root = tmp.join("root");
    for d in ["var/lib/dpkg/info", "var/lib/dpkg/updates", "etc"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::write(root.join("var/lib/dpkg/status"), "").unwrap();
    run(Command::new("dpkg")
        .arg(format!("--root={}", root.display()))
        .args([
            "--force-script-chrootless",
            "--force-depends",
            "--log=/dev/null",
            "-i",
        ])
        .arg(&deb));

    let files = [
        ("usr/bin/relay", 0o755),
        ("usr/lib/systemd/system/relay.service", 0o644),
        ("usr/lib/sysusers.d/relay.conf", 0o644),
        ("etc/relay/relay.toml", 0o640),
        ("etc/default/relay", 0o640),
        ("etc/relay/rules/overheat.rhai", 0o644),
        ("usr/share/doc/relay/operations.md", 0o644),
        ("usr/share/doc/relay/protocol.md", 0o644),
    ];
    for (f, mode) in files {
        let meta = std::fs::metadata(root.join(f)).unwrap_or_else(|e| panic!("{f}: {e}"));
        assert_eq!(meta.permissions().mode() & 0o7777, mode, "mode of {f}");
    }
    let conffiles = std::fs::read_to_string(root.join("var/lib/dpkg/info/relay.conffiles"))
        .expect("dpkg recorded the conffiles");
    for f in ["/etc/relay/relay.toml", "/etc/default/relay"] {
        assert!(
            conffiles.lines().any(|l| l == f),
            "{f} is not a conffile:\n{conffiles}"
        );
    }
    // The postinst made the system user and gave the config to its group.
    let passwd = std::fs::read_to_string(root.join("etc/passwd")).unwrap();
    let user = passwd
        .lines()
        .find(|l| l.starts_with("relay:"))
        .unwrap_or_else(|| panic!("no relay user in the root's passwd:\n{passwd}"));
    assert!(user.contains(":/var/lib/relay:"), "{user}");
    let group = std::fs::read_to_string(root.join("etc/group")).unwrap();
    let gid: u32 = group
        .lines()
        .find_map(|l| l.strip_prefix("relay:x:"))
        .and_then(|r| r.split(':').next())
        .and_then(|g| g.parse().ok())
        .unwrap_or_else(|| panic!("no relay group:\n{group}"));
    let cfg_meta = std::fs::metadata(root.join("etc/relay/relay.toml")).unwrap();
    assert_eq!((cfg_meta.uid(), cfg_meta.gid()), (0, gid));

    let relay = root.join("usr/bin/relay");
    let installed_cfg = root.join("etc/relay/relay.toml");
    let (ok, _) = run(Command::new(&relay).arg("check-config").arg(&installed_cfg));
    assert!(ok.contains(": ok"), "{ok}");

    // 3. The unit, as systemd would load it from this root: the root gets the
    // rest of a system the unit relies on (the base targets and /bin/kill of
    // procps, which the package depends on). Any complaint fails the test.
    let units = root.join("usr/lib/systemd/system");
    for entry in std::fs::read_dir("/usr/lib/systemd/system").unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "target") && path.is_file() {
            std::fs::copy(&path, units.join(path.file_name().unwrap())).unwrap();
        }
    }
    std::fs::copy("/usr/bin/kill", root.join("usr/bin/kill")).expect("procps' /usr/bin/kill");
    std::os::unix::fs::symlink("usr/bin", root.join("bin")).unwrap();
    let (_, complaints) = run(Command::new("systemd-analyze")
        .arg("verify")
        .arg(format!("--root={}", root.display()))
        .arg("/usr/lib/systemd/system/relay.service"));
    assert!(
        complaints.trim().is_empty(),
        "systemd-analyze verify:\n{complaints}"
    );
    let unit = std::fs::read_to_string(units.join("relay.service")).unwrap();
    for key in [
        "User=relay",
        "Restart=on-failure",
        "StateDirectory=relay",
        "LimitNOFILE=",
        "LimitMEMLOCK=",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "PrivateTmp=yes",
    ] {
        assert!(unit.contains(key), "the unit lacks {key}");
    }
    // LimitNOFILE covers the installed max_connections plus the relay's own files.
    let nofile: u32 = unit
        .lines()
        .find_map(|l| l.strip_prefix("LimitNOFILE="))
        .and_then(|v| v.trim().parse().ok())
        .expect("a numeric LimitNOFILE");
    let cfg = relay_config::Config::load(Some(&installed_cfg)).unwrap();
    assert!(cfg.limits.max_connections + relay_config::RESERVED_FILES <= nofile);

    // 4. The installed binary on the installed config, moved to loopback and
    // port 0 and to the paths inside the root.
    let text = std::fs::read_to_string(&installed_cfg).unwrap();
    let r = root.display().to_string();
    let local = text
        .replace("0.0.0.0:7000", "127.0.0.1:0")
        .replace("0.0.0.0:8080", "127.0.0.1:0")
        .replace("\"/etc/relay/", &format!("\"{r}/etc/relay/"))
        .replace("\"/var/lib/relay/", &format!("\"{r}/var/lib/relay/"));
    assert_ne!(local, text, "the installed config has the expected shape");
    let local_cfg = tmp.join("relay.toml");
    std::fs::write(&local_cfg, local).unwrap();
    let mut child = Proc(
        Command::new(&relay)
            .arg("--config")
            .arg(&local_cfg)
            .args(["run"])
            .env("RELAY__SHARDS__COUNT", "2")
            .env("RELAY__SHARDS__PIN", "false")
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut lines = BufReader::new(child.0.stderr.take().unwrap()).lines();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut http = None;
    while Instant::now() < deadline {
        let Some(Ok(line)) = lines.next() else { break };
        if line.contains("relay listening") {
            assert!(line.starts_with('{'), "JSON log as configured: {line}");
            http = field(&line, "http_addr=");
            break;
        }
    }
    std::thread::spawn(move || for _ in lines {});
    let http = http.expect("the installed relay logs where it listens");
    let (status, body) = get(&http, "/healthz");
    assert_eq!(status, 200, "{body}");
    assert!(root.join("var/lib/relay/spool").is_dir(), "spool created");
    // SIGTERM, as `systemctl stop` sends.
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.0.id() as i32, libc::SIGTERM) };
    let until = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = child.0.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < until, "the relay did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status}");

    // 5. Purge: the files and the state go, nothing of the package stays.
    run(Command::new("dpkg")
        .arg(format!("--root={}", root.display()))
        .args([
            "--force-script-chrootless",
            "--log=/dev/null",
            "-P",
            "relay",
        ]));
    for gone in ["usr/bin/relay", "etc/relay/relay.toml", "var/lib/relay"] {
        assert!(!root.join(gone).exists(), "{gone} left after purge");
    }
    std::fs::remove_dir_all(&tmp).unwrap();
}
