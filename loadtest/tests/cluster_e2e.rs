//! The tool against two real relay processes forming one cluster over the
//! local NATS server (127.0.0.1:4222, JetStream on): the clients are placed
//! on the two nodes round-robin, so every browser-controller pair crosses
//! nodes, and the report says how the fleet lay. A test that finds NATS down
//! fails.
//!
//! The relay binary comes from `RELAY_BIN` or this test's target directory
//! (`cargo build -p relay-shards --bin relay`).

// Scenarios are built field by field from the defaults, which reads clearer here.
#![allow(clippy::field_reassign_with_default)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::Child;
use std::time::{Duration, Instant};

mod common;

use common::spawn_relay;

use relay_loadtest::scenario::Pattern;

const NATS: &str = "127.0.0.1:4222";

struct Node {
    child: Child,
    tcp: String,
    http: String,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The test's directory and NATS streams, removed when dropped.
struct Cluster {
    dir: PathBuf,
    prefix: String,
    nodes: Vec<Node>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.nodes.clear();
        let _ = std::fs::remove_dir_all(&self.dir);
        // The buckets' streams, deleted in the plain NATS protocol.
        if let Ok(mut s) = TcpStream::connect(NATS) {
            let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
            let mut cmd = String::from("CONNECT {\"verbose\":false}\r\n");
            for b in ["dir", "interest"] {
                cmd.push_str(&format!(
                    "PUB $JS.API.STREAM.DELETE.KV_{}_{b} 0\r\n\r\n",
                    self.prefix
                ));
            }
            cmd.push_str("PING\r\n");
            if s.write_all(cmd.as_bytes()).is_ok() {
                let mut got = Vec::new();
                let mut buf = [0u8; 4096];
                while !String::from_utf8_lossy(&got).contains("PONG") {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
            }
        }
    }
}

fn start_node(dir: &std::path::Path, prefix: &str, name: &str) -> Node {
    let cfg = dir.join(format!("{name}.toml"));
    std::fs::write(
        &cfg,
        format!(
            "[node]\nname = \"{name}\"\n\
             [listeners]\ntcp = \"127.0.0.1:0\"\nhttp = \"127.0.0.1:0\"\n\
             [shards]\ncount = 2\npin = false\nio_memory_kib = 256\n\
             [plugins]\nenabled = false\n\
             [cluster]\nenabled = true\nnats_url = \"nats://{NATS}\"\nprefix = \"{prefix}\"\n\
             heartbeat_ms = 1500\n"
        ),
    )
    .unwrap();
    let (child, rx) = spawn_relay(&cfg);
    let mut node = Node {
        child,
        tcp: String::new(),
        http: String::new(),
    };
    let (tcp, http) = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("the relay reports its listening addresses within 30 s");
    node.tcp = tcp.expect("tcp_addr");
    node.http = http.expect("http_addr");
    node
}

fn http_get(addr: &str, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: relay\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    (status, body.to_owned())
}

fn metric(node: &Node, name: &str) -> f64 {
    let (_, body) = http_get(&node.http, "/metrics");
    body.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} "))?.trim().parse().ok())
        .unwrap_or(0.0)
}

fn two_nodes(test: &str) -> Cluster {
    assert!(
        TcpStream::connect_timeout(&NATS.parse().unwrap(), Duration::from_secs(3)).is_ok(),
        "NATS is not running on {NATS}; this test needs it"
    );
    let prefix = format!("lt{}_{test}", std::process::id());
    let dir = std::env::temp_dir().join(&prefix);
    std::fs::create_dir_all(&dir).unwrap();
    let nodes = vec![
        start_node(&dir, &prefix, "lt1"),
        start_node(&dir, &prefix, "lt2"),
    ];
    let c = Cluster { dir, prefix, nodes };
    // Each node sees the other before the run.
    let deadline = Instant::now() + Duration::from_secs(20);
    for n in &c.nodes {
        loop {
            let (s, body) = http_get(&n.http, "/api/v1/nodes");
            let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
            if s == 200 && v["items"].as_array().is_some_and(|a| a.len() == 2) {
                break;
            }
            assert!(Instant::now() < deadline, "the nodes did not meet: {body}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    c
}

#[test]
fn clients_spread_round_robin_over_two_nodes_and_every_pair_crosses() {
    let c = two_nodes("spread");
    let (a, b) = (&c.nodes[0], &c.nodes[1]);
    let mut s = common::small_scenario(
        "cluster",
        Pattern::Command,
        format!("tcp://{},tcp://{}", a.tcp, b.tcp),
        format!("ws://{}/ws,ws://{}/ws", a.http, b.http),
    );
    s.load.rate = Some(10.0);
    let r = common::run_ok(&s);
    common::assert_no_loss(&r, 1);
    assert_eq!(r.steps[0].latency.count, 100, "one round trip per command");
    let sp = r
        .target
        .spread
        .as_ref()
        .expect("the report states the spread");
    let per: Vec<(String, u64)> = sp
        .targets
        .iter()
        .map(|t| (t.url.clone(), t.clients))
        .collect();
    assert_eq!(
        per,
        [
            (format!("tcp://{}", a.tcp), 10),
            (format!("tcp://{}", b.tcp), 10)
        ]
    );
    assert_eq!((sp.pairs, sp.cross_pairs), (20, 20));
    assert!(
        r.human()
            .contains("20 of 20 sender-recipient pairs cross targets")
    );
    // The frames really crossed: each node received frames from the other.
    for n in [a, b] {
        assert!(
            metric(n, "relay_cluster_remote_frames_in_total") >= 100.0,
            "{}",
            http_get(&n.http, "/metrics").1
        );
    }
}

#[test]
fn the_binary_takes_repeated_targets() {
    let c = two_nodes("cli");
    let (a, b) = (&c.nodes[0], &c.nodes[1]);
    let dir = std::env::temp_dir().join(format!("{}-out", c.prefix));
    std::fs::create_dir_all(&dir).unwrap();
    let json = dir.join("r.json");
    let html = dir.join("r.html");
    let out = common::loadtest()
        .args(["--pattern", "telemetry", "-n", "6", "--rate", "10"])
        .args(["--duration", "1s", "--no-progress"])
        .args(["--target", &format!("tcp://{}", a.tcp)])
        .args(["--target", &format!("tcp://{}", b.tcp)])
        .args(["--browsers", &format!("ws://{}/ws", a.http)])
        .args(["--browsers", &format!("ws://{}/ws", b.http)])
        .arg("--json")
        .arg(&json)
        .arg("--html")
        .arg(&html)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let r = common::read_report(&json, &stdout);
    let page = std::fs::read_to_string(&html).unwrap();
    assert!(
        page.contains("6 of 6 sender-recipient pairs cross targets"),
        "the HTML report states the spread"
    );
    let _ = std::fs::remove_dir_all(&dir);
    let sp = r
        .target
        .spread
        .as_ref()
        .expect("the report states the spread");
    assert_eq!(
        sp.targets.iter().map(|t| t.clients).collect::<Vec<_>>(),
        [6, 6]
    );
    assert_eq!((sp.pairs, sp.cross_pairs), (6, 6));
    assert!(stdout.contains("round-robin over 2 targets"), "{stdout}");
    common::assert_no_loss(&r, 1);
}
