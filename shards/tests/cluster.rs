//! Several relay processes as one cluster over the local NATS server
//! (127.0.0.1:4222, JetStream on). Each test names its own cluster prefix,
//! so tests running at once never see each other's nodes. A test that finds
//! NATS down fails: CI starts it (`.ci/run`).

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Client, Form, RelayProc};
use relay_core::ErrorCode;
use relay_core::frame::FrameType;

const NATS: &str = "127.0.0.1:4222";

/// Fails loudly when the NATS server is not there.
fn nats_is_up() {
    let up = TcpStream::connect_timeout(&NATS.parse().unwrap(), Duration::from_secs(3)).is_ok();
    assert!(
        up,
        "NATS is not running on {NATS}; these tests need it (start it as .ci/run does)"
    );
}

/// A prefix no other test (or earlier run) uses.
fn prefix(test: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!("t{}_{test}_{nanos}", std::process::id())
}

struct Fleet {
    dir: PathBuf,
    prefix: String,
    nodes: Vec<RelayProc>,
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            let _ = n.child.kill();
            let _ = n.child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
        drop_buckets(&self.prefix);
    }
}

/// Deletes the test's buckets (their streams) from the NATS server, in the
/// plain NATS protocol.
fn drop_buckets(prefix: &str) {
    let Ok(mut s) = TcpStream::connect(NATS) else {
        return;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let mut cmd = String::from("CONNECT {\"verbose\":false}\r\n");
    for b in ["dir", "interest", "lease"] {
        cmd.push_str(&format!(
            "PUB $JS.API.STREAM.DELETE.KV_{prefix}_{b} 0\r\n\r\n"
        ));
    }
    cmd.push_str("PING\r\n");
    if s.write_all(cmd.as_bytes()).is_err() {
        return;
    }
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&got).contains("PONG") {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
}

/// Writes the config of node `name`, with `sections` (TOML; two unpinned
/// shards unless they have a `[shards]` of their own) and `cluster` (more keys
/// of `[cluster]`), and starts it.
fn spawn_node_with(
    dir: &std::path::Path,
    prefix: &str,
    name: &str,
    nats_url: &str,
    sections: &str,
    cluster: &str,
) -> RelayProc {
    let cfg = dir.join(format!("{name}.toml"));
    let shards = if sections.contains("[shards]") {
        ""
    } else {
        "[shards]\ncount = 2\npin = false\nio_memory_kib = 256\n"
    };
    std::fs::write(
        &cfg,
        format!(
            "[node]\nname = \"{name}\"\n\
             [listeners]\ntcp = \"127.0.0.1:0\"\nhttp = \"127.0.0.1:0\"\nmqtt = \"127.0.0.1:0\"\n\
             {shards}{sections}\
             [cluster]\nenabled = true\nnats_url = \"{nats_url}\"\nprefix = \"{prefix}\"\n\
             heartbeat_ms = 1500\nreply_timeout_ms = 2000\n{cluster}"
        ),
    )
    .unwrap();
    RelayProc::spawn(&cfg, &[])
}

/// Starts `names` as one cluster (NATS at `urls[i]`) and waits until every
/// node sees every other.
fn fleet(test: &str, names: &[&str], urls: &[String]) -> Fleet {
    fleet_with(test, names, urls, "[plugins]\nenabled = false\n")
}

/// The same, every node with `sections` (see `spawn_node_with`).
fn fleet_with(test: &str, names: &[&str], urls: &[String], sections: &str) -> Fleet {
    nats_is_up();
    let p = prefix(test);
    let dir = std::env::temp_dir().join(&p);
    std::fs::create_dir_all(&dir).unwrap();
    let nodes: Vec<RelayProc> = names
        .iter()
        .zip(urls)
        .map(|(n, u)| spawn_node_with(&dir, &p, n, u, sections, ""))
        .collect();
    let f = Fleet {
        dir,
        prefix: p,
        nodes,
    };
    for n in &f.nodes {
        wait_nodes(n, names.len());
    }
    f
}

fn nats_urls(n: usize) -> Vec<String> {
    vec![format!("nats://{NATS}"); n]
}

/// Waits until `node` lists `n` nodes in `/api/v1/nodes`.
fn wait_nodes(node: &RelayProc, n: usize) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, body) = node.get("/api/v1/nodes");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        if status == 200 && v["items"].as_array().is_some_and(|a| a.len() == n) {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "the node did not see {n} nodes within 20 s: {status} {body}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Sends DATA with ACK_REQ from `from` to `dst` until it is acknowledged
/// (the directory reaches every node within milliseconds, but not at once);
/// returns the payload that got through. Every attempt gets one answer.
fn send_until_acked(from: &mut Client, dst: &str, tag: &str) -> Vec<u8> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut seq = 1000;
    loop {
        seq += 1;
        let payload = format!("{tag}-{seq}").into_bytes();
        from.data(dst, seq, true, &payload);
        let f = from.recv();
        assert_eq!(f.seq, seq, "one answer per frame, in order: {f:?}");
        if f.kind == FrameType::Ack {
            return payload;
        }
        assert_eq!(f.kind, FrameType::Error, "{f:?}");
        assert!(
            Instant::now() < deadline,
            "{dst} not reached from {} within 10 s: {:?}",
            from.addr,
            f.error_parts()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The DATA payloads `c` receives within `d`, until one equals `want`.
fn recv_payload(c: &mut Client, want: &[u8]) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if let Some(f) = c.recv_timeout(Duration::from_millis(200))
            && f.kind == FrameType::Data
            && f.payload[..] == *want
        {
            return;
        }
    }
    panic!(
        "{} did not receive {:?}",
        c.addr,
        String::from_utf8_lossy(want)
    );
}

#[test]
fn three_processes_are_one_address_space_with_acks_no_route_and_takeover() {
    let f = fleet("p2p", &["n1", "n2", "n3"], &nats_urls(3));
    let (n1, n2, n3) = (&f.nodes[0], &f.nodes[1], &f.nodes[2]);
    let mut a = Client::hello(n1.tcp, Form::Binary, "ctl-a");
    let mut b = Client::hello(n2.tcp, Form::Binary, "ctl-b");
    let mut c = Client::hello(n3.tcp, Form::Json, "web-c");

    // n1 → n2, with the ACK from n2's answer; the receiver sees the sender.
    let p = send_until_acked(&mut a, "ctl-b", "a2b");
    loop {
        let got = b.expect(FrameType::Data);
        assert_eq!(&got.src[..], b"ctl-a");
        if got.payload[..] == p[..] {
            break;
        }
    }
    // n3 → n1, JSON sender, binary receiver.
    let p = send_until_acked(&mut c, "ctl-a", "c2a");
    recv_payload(&mut a, &p);

    // No node holds it: exactly one no_route, and nothing after it.
    a.data("nobody-here", 7, true, b"x");
    assert_eq!(a.expect_error(ErrorCode::NoRoute), 7);
    a.expect_silence(Duration::from_millis(300));

    // A hello on n3 for ctl-b takes it over from n2: the old connection is
    // told `replaced`, and frames reach the new one.
    let mut b2 = Client::hello(n3.tcp, Form::Binary, "ctl-b");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let f = b
            .recv_timeout(Duration::from_millis(200))
            .unwrap_or_else(|| {
                assert!(Instant::now() < deadline, "ctl-b on n2 was not replaced");
                relay_core::Frame::new(FrameType::Ping)
            });
        if f.kind == FrameType::Error {
            let (code, _) = f.error_parts().unwrap();
            assert_eq!(code, ErrorCode::Replaced as u16);
            break;
        }
    }
    let p = send_until_acked(&mut a, "ctl-b", "a2b2");
    recv_payload(&mut b2, &p);

    // Frames crossed in batches, counted on both sides.
    assert!(n1.metric("relay_cluster_batches_out_total").unwrap() >= 1.0);
    assert!(n2.metric("relay_cluster_remote_frames_in_total").unwrap() >= 1.0);
    assert_eq!(n3.metric("relay_cluster_connected"), Some(1.0));
    assert!(n2.metric("relay_cluster_takeovers_total").unwrap() >= 1.0);
}

/// A TCP proxy in front of NATS that the test can cut and restore.
struct Proxy {
    addr: SocketAddr,
    open: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
}

impl Proxy {
    fn start() -> Proxy {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let open = Arc::new(AtomicBool::new(true));
        let conns = Arc::new(Mutex::new(Vec::new()));
        let (o, cs) = (open.clone(), conns.clone());
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(down) = s else { break };
                if !o.load(Ordering::SeqCst) {
                    let _ = down.shutdown(Shutdown::Both);
                    continue;
                }
                let Ok(up) = TcpStream::connect(NATS) else {
                    continue;
                };
                cs.lock().unwrap().push(down.try_clone().unwrap());
                cs.lock().unwrap().push(up.try_clone().unwrap());
                for (mut from, mut to) in [
                    (down.try_clone().unwrap(), up.try_clone().unwrap()),
                    (up, down),
                ] {
                    std::thread::spawn(move || {
                        let mut buf = [0u8; 16384];
                        loop {
                            match from.read(&mut buf) {
                                Ok(0) | Err(_) => break,
                                Ok(n) => {
                                    if to.write_all(&buf[..n]).is_err() {
                                        break;
                                    }
                                }
                            }
                        }
                        let _ = to.shutdown(Shutdown::Both);
                    });
                }
            }
        });
        Proxy { addr, open, conns }
    }

    /// Cuts every connection and refuses new ones.
    fn cut(&self) {
        self.open.store(false, Ordering::SeqCst);
        for s in self.conns.lock().unwrap().drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }

    fn restore(&self) {
        self.open.store(true, Ordering::SeqCst);
    }
}

#[test]
fn a_node_cut_off_from_nats_answers_unavailable_delivers_locally_and_comes_back() {
    nats_is_up();
    let proxy = Proxy::start();
    let urls = vec![format!("nats://{NATS}"), format!("nats://{}", proxy.addr)];
    let f = fleet("cut", &["m1", "m2"], &urls);
    let (m1, m2) = (&f.nodes[0], &f.nodes[1]);
    let mut far = Client::hello(m1.tcp, Form::Binary, "far-1");
    let mut near = Client::hello(m2.tcp, Form::Binary, "near-1");
    let mut next = Client::hello(m2.tcp, Form::Binary, "near-2");
    let p = send_until_acked(&mut near, "far-1", "before");
    recv_payload(&mut far, &p);

    proxy.cut();
    // Once m2 notices, a frame for m1 gets `unavailable` (one answer).
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut seq = 1;
    loop {
        seq += 1;
        near.data("far-1", seq, true, b"during");
        let f = near.recv();
        assert_eq!(f.seq, seq);
        if f.kind == FrameType::Error && f.error_parts().unwrap().0 == ErrorCode::Unavailable as u16
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no unavailable within 10 s: {f:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // The API of the cut-off node answers `unavailable` for what another
    // node would settle, and goes on for its own clients.
    let (s, v) = common::http_at(m2.http, "GET", "/api/v1/clients/far-1", None, None);
    assert_eq!((s, v["error"].as_str()), (503, Some("unavailable")), "{v}");
    let (s, v) = common::http_at(m2.http, "GET", "/api/v1/clients/near-1", None, None);
    assert_eq!((s, v["node"].as_str()), (200, Some("m2")), "{v}");
    // Local delivery goes on.
    near.data("near-2", 99, true, b"local");
    assert_eq!(near.expect(FrameType::Ack).seq, 99);
    recv_payload(&mut next, b"local");
    assert!(m2.metric("relay_cluster_unavailable_total").unwrap() >= 1.0);
    assert_eq!(m2.metric("relay_cluster_connected"), Some(0.0));

    // NATS is back: m2 reconnects by itself and reaches m1 again.
    proxy.restore();
    let p = send_until_acked(&mut near, "far-1", "after");
    recv_payload(&mut far, &p);
    assert_eq!(m2.metric("relay_cluster_connected"), Some(1.0));
}

fn post(node: &RelayProc, path: &str, body: serde_json::Value) -> (u16, serde_json::Value) {
    common::http_at(node.http, "POST", path, None, Some(&body))
}

/// Runs `f` until it gives `Some` (state reaches other nodes within
/// milliseconds, not at once), at most 10 s.
fn eventually<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "{what} within 10 s");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn groups_and_uids_span_nodes_and_the_api_of_any_node_reaches_the_fleet() {
    let f = fleet("fan", &["g1", "g2", "g3"], &nats_urls(3));
    let (g1, g2, g3) = (&f.nodes[0], &f.nodes[1], &f.nodes[2]);
    let mut m1 = Client::hello(g1.tcp, Form::Binary, "m-1");
    let mut m2 = Client::hello(g2.tcp, Form::Binary, "m-2");
    let mut m3 = Client::hello(g3.tcp, Form::Json, "m-3");
    let mut outsider = Client::hello(g3.tcp, Form::Binary, "out-1");
    for (c, seq) in [(&mut m1, 1), (&mut m2, 2), (&mut m3, 3)] {
        let mut j = relay_core::Frame::new(FrameType::Join);
        j.dst = bytes::Bytes::from_static(b"room-9");
        j.seq = seq;
        j.flags = relay_core::frame::Flags(relay_core::frame::Flags::ACK_REQ);
        c.send(&j);
        assert_eq!(c.expect(FrameType::Ack).seq, seq);
    }
    // A publish from g1 reaches the members on g2 and g3 once, with one ACK.
    let mut n = 0;
    let p = eventually("a publish on g1 reaches g2 and g3", || {
        n += 1;
        let payload = format!("pub-{n}");
        let mut f = relay_core::Frame::new(FrameType::Publish);
        f.dst = bytes::Bytes::from_static(b"room-9");
        f.seq = 100 + n;
        f.flags = relay_core::frame::Flags(relay_core::frame::Flags::ACK_REQ);
        f.payload = payload.clone().into_bytes().into();
        m1.send(&f);
        assert_eq!(m1.expect(FrameType::Data).payload, payload.as_bytes());
        assert_eq!(m1.expect(FrameType::Ack).seq, 100 + n);
        let on2 = m2.recv_timeout(Duration::from_millis(300));
        let on3 = m3.recv_timeout(Duration::from_millis(300));
        (on2.is_some() && on3.is_some()).then_some(payload)
    });
    m2.expect_silence(Duration::from_millis(200));
    m3.expect_silence(Duration::from_millis(200));
    outsider.expect_silence(Duration::from_millis(100));
    assert!(!p.is_empty());

    // A uid bound on g2 and g3 (each by its own node's API) gets a send made
    // through g1's API: every bound address once, and the count says so.
    let (s, _) = post(
        g2,
        "/api/v1/uids/user-7/bind",
        serde_json::json!({"addr": "m-2"}),
    );
    assert_eq!(s, 200);
    let (s, _) = post(
        g3,
        "/api/v1/uids/user-7/bind",
        serde_json::json!({"addr": "m-3"}),
    );
    assert_eq!(s, 200);
    let count = eventually("a uid send on g1 counts both nodes", || {
        let (s, v) = post(
            g1,
            "/api/v1/uids/user-7/send",
            serde_json::json!({"payload": "u"}),
        );
        assert_eq!(s, 200, "{v}");
        (v["count"] == 2).then_some(v)
    });
    assert_eq!(count["count"], 2);

    // HTTP push from any node to an address on another: 200 and delivered,
    // 404 no_route when no node holds it.
    let (s, v) = post(
        g1,
        "/api/v1/send",
        serde_json::json!({"dst": "out-1", "payload": {"k": 1}}),
    );
    assert_eq!((s, &v["count"]), (200, &serde_json::json!(1)), "{v}");
    let got = outsider.expect(FrameType::Data);
    assert_eq!(&got.src[..], b"$api");
    let (s, v) = post(
        g2,
        "/api/v1/send",
        serde_json::json!({"dst": "no-such", "payload": 1}),
    );
    assert_eq!((s, v["error"].as_str()), (404, Some("no_route")), "{v}");

    // /api/v1/nodes on any node: every node with its clients and load.
    let v = wait_nodes(g2, 3);
    let items = v["items"].as_array().unwrap();
    let names: Vec<&str> = items.iter().map(|i| i["node"].as_str().unwrap()).collect();
    assert_eq!(names, ["g1", "g2", "g3"]);
    let g3_info = eventually("g3 reports its two clients", || {
        let v = wait_nodes(g1, 3);
        let i = v["items"][2].clone();
        (i["clients"] == 2).then_some(i)
    });
    assert!(g3_info["frames_in"].as_u64().is_some());
    assert!(g3_info["tcp"].as_str().is_some());
}

fn get_at(node: &RelayProc, path: &str) -> (u16, serde_json::Value) {
    common::http_at(node.http, "GET", path, None, None)
}

#[test]
fn the_api_of_any_node_acts_on_the_node_that_holds_the_address() {
    let f = fleet("api", &["a1", "b1", "c1"], &nats_urls(3));
    let (na, nb, nc) = (&f.nodes[0], &f.nodes[1], &f.nodes[2]);
    let mut dev = Client::hello(na.tcp, Form::Binary, "dev-a");
    let mut pc = Client::hello(nc.tcp, Form::Binary, "pub-c");

    // GET clients/{addr} on b1 answers for the client on a1, with its node.
    let v = eventually("b1 answers for dev-a", || {
        let (s, v) = get_at(nb, "/api/v1/clients/dev-a");
        assert!(s == 200 || s == 404, "{s} {v}");
        (s == 200).then_some(v)
    });
    assert_eq!(v["addr"], "dev-a");
    assert_eq!(v["node"], "a1", "{v}");
    assert_eq!(v["online"], true);
    let (s, v) = get_at(nc, "/api/v1/clients/pub-c");
    assert_eq!((s, v["node"].as_str()), (200, Some("c1")), "{v}");
    // No node holds it: not found, as on one node.
    let (s, v) = get_at(nb, "/api/v1/clients/nobody-1");
    assert_eq!((s, v["error"].as_str()), (404, Some("no_route")), "{v}");
    // `local` keeps the request on the node asked.
    let (s, v) = get_at(nb, "/api/v1/clients/dev-a?local=true");
    assert_eq!((s, v["error"].as_str()), (404, Some("no_route")), "{v}");

    // A bind on b1 for the address held on a1 takes effect there: a group
    // publish from c1 reaches it.
    let (s, v) = post(
        nb,
        "/api/v1/groups/room-b/members",
        serde_json::json!({"addr": "dev-a"}),
    );
    assert_eq!(s, 200, "{v}");
    let (s, v) = get_at(na, "/api/v1/groups/room-b?local=true");
    assert_eq!((s, &v["count"]), (200, &serde_json::json!(1)), "{v}");
    let mut n = 0;
    eventually("a publish on c1 reaches dev-a on a1", || {
        n += 1;
        let payload = format!("grp-{n}");
        let mut fr = relay_core::Frame::new(FrameType::Publish);
        fr.dst = bytes::Bytes::from_static(b"room-b");
        fr.seq = n;
        fr.flags = relay_core::frame::Flags(relay_core::frame::Flags::ACK_REQ);
        fr.payload = payload.clone().into_bytes().into();
        pc.send(&fr);
        let ack = pc.recv();
        assert_eq!(ack.seq, n, "{ack:?}");
        let got = dev.recv_timeout(Duration::from_millis(300))?;
        assert_eq!(got.kind, FrameType::Data);
        assert_eq!(&got.src[..], b"pub-c");
        (got.payload[..] == *payload.as_bytes()).then_some(())
    });
    // A uid bound through c1 for dev-a: a uid send from b1 counts it.
    let (s, v) = post(
        nc,
        "/api/v1/uids/owner-9/bind",
        serde_json::json!({"addr": "dev-a"}),
    );
    assert_eq!(s, 200, "{v}");
    let (s, v) = get_at(na, "/api/v1/uids/owner-9?local=true");
    assert_eq!((s, &v["count"]), (200, &serde_json::json!(1)), "{v}");
    // Unbinding through c1 acts on a1 too.
    let (s, v) = common::http_at(
        nc.http,
        "DELETE",
        "/api/v1/groups/room-b/members/dev-a",
        None,
        None,
    );
    assert_eq!(s, 200, "{v}");
    let (s, v) = get_at(na, "/api/v1/groups/room-b?local=true");
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["count"], 0, "{v}");

    // The listing of any node covers the fleet, each client with its node.
    let v = eventually("b1 lists the fleet", || {
        let (s, v) = get_at(nb, "/api/v1/clients?role=");
        assert_eq!(s, 200, "{v}");
        (v["items"].as_array().unwrap().len() == 2).then_some(v)
    });
    let items: Vec<(&str, &str)> = v["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| (i["addr"].as_str().unwrap(), i["node"].as_str().unwrap()))
        .collect();
    assert_eq!(items, [("dev-a", "a1"), ("pub-c", "c1")], "{v}");
    assert_eq!(v["unreachable"], serde_json::json!([]));
    // Pages cross nodes: one client a page, in address order.
    let (_, p1) = get_at(nc, "/api/v1/clients?limit=1");
    assert_eq!(
        (p1["items"][0]["addr"].as_str(), p1["next"].as_str()),
        (Some("dev-a"), Some("dev-a")),
        "{p1}"
    );
    let (_, p2) = get_at(nc, "/api/v1/clients?limit=1&after=dev-a");
    assert_eq!(p2["items"][0]["addr"], "pub-c", "{p2}");
    assert!(p2["next"].is_null(), "{p2}");
    // `node` keeps one node's clients.
    let (_, v) = get_at(nb, "/api/v1/clients?node=c1");
    let addrs: Vec<&str> = v["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["addr"].as_str().unwrap())
        .collect();
    assert_eq!(addrs, ["pub-c"], "{v}");

    // A kick on c1 closes the client on a1.
    let (s, v) = common::http_at(nc.http, "DELETE", "/api/v1/clients/dev-a", None, None);
    assert_eq!(s, 200, "{v}");
    let (_, closed) = dev.drain_until_closed(Duration::from_secs(5));
    assert!(closed, "dev-a on a1 was not closed by the kick on c1");
    eventually("dev-a is gone from a1", || {
        let (s, _) = get_at(na, "/api/v1/clients/dev-a?local=true");
        (s == 404).then_some(())
    });
}

#[test]
fn a_killed_node_is_noticed_within_a_heartbeat_and_its_devices_come_back_elsewhere() {
    let f = fleet("kill", &["k1", "k2", "k3"], &nats_urls(3));
    let mut a = Client::hello(f.nodes[0].tcp, Form::Binary, "ctl-a");
    let dev = Client::hello(f.nodes[2].tcp, Form::Binary, "dev-3");
    let _ = send_until_acked(&mut a, "dev-3", "before");
    let mut fleet = f;
    let mut k3 = fleet.nodes.pop().unwrap();
    k3.signal(libc::SIGKILL);
    let _ = k3.child.wait();
    drop(dev);
    let killed = Instant::now();
    // Within one heartbeat period (1.5 s) plus a refresh, the others know:
    // frames for its addresses answer no_route at once, and it leaves the
    // node list.
    let mut seq = 5000;
    eventually("no_route for the dead node's device", || {
        seq += 1;
        a.data("dev-3", seq, true, b"x");
        let f = a.recv();
        assert_eq!(f.seq, seq);
        let code = f.error_parts().map(|(c, _)| c);
        (code == Some(ErrorCode::NoRoute as u16)).then_some(())
    });
    wait_nodes(&fleet.nodes[0], 2);
    eprintln!("the killed node was noticed after {:?}", killed.elapsed());
    assert!(
        fleet.nodes[0]
            .metric("relay_cluster_nodes_lost_total")
            .unwrap()
            >= 1.0
    );
    // The device reconnects to k2 and is reached from k1 again.
    let mut dev = Client::hello(fleet.nodes[1].tcp, Form::Binary, "dev-3");
    let p = send_until_acked(&mut a, "dev-3", "after");
    recv_payload(&mut dev, &p);
    fleet.nodes.push(k3);
}

const REDIS: &str = "127.0.0.1:6379";

/// A Redis connection; fails loudly when Redis is not there.
fn redis() -> redis::Connection {
    redis::Client::open(format!("redis://{REDIS}/"))
        .unwrap()
        .get_connection()
        .unwrap_or_else(|e| panic!("Redis is not running on {REDIS}; these tests need it: {e}"))
}

/// Deletes every Redis key under `prefix`.
fn redis_clean(prefix: &str) {
    let mut c = redis();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}*"))
        .query(&mut c)
        .unwrap();
    if !keys.is_empty() {
        let _: () = redis::cmd("DEL").arg(keys).query(&mut c).unwrap();
    }
}

/// Counter `key` of the rules engine, as Redis holds it.
fn redis_counter(prefix: &str, key: &str) -> i64 {
    let v: Option<i64> = redis::cmd("HGET")
        .arg(format!("{prefix}counters"))
        .arg(key)
        .query(&mut redis())
        .unwrap();
    v.unwrap_or(0)
}

/// Removes the test's Redis keys when the test ends, passed or not.
struct RedisKeys(String);

impl Drop for RedisKeys {
    fn drop(&mut self) {
        redis_clean(&self.0);
    }
}

/// A rule counting `fire` messages in Redis, raising an alarm for each and
/// starting a two-second `alarm_when` timer that only a clock can end.
const LEASE_RULE: &str = r#"
fn on_message(msg) {
    let p = msg.payload;
    if type_of(p) != "map" { return; }
    if p.fire == true {
        counter_add(`fired`, 1);
        alarm_raise(`${msg.src}/fired-${p.n}`, "major", `fired ${p.n}`);
    }
    if p.hot == true {
        alarm_when(`${msg.src}/hot`, true, 2, "critical", "hot for two seconds");
    }
}
"#;

/// Which nodes say `"rules": true` in `node`'s `/api/v1/nodes`.
fn rules_holders(node: &RelayProc) -> Vec<String> {
    let (_, body) = node.get("/api/v1/nodes");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    v["items"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|n| n["rules"] == serde_json::json!(true))
                .filter_map(|n| n["node"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// Waits until every node of `nodes` names the same single holder of the
/// rules lease, and returns its index in `nodes`.
fn wait_one_holder(nodes: &[RelayProc], names: &[&str]) -> usize {
    let mut holder = String::new();
    eventually("one node holding the rules lease, seen by all", || {
        let seen: Vec<Vec<String>> = nodes.iter().map(rules_holders).collect();
        // A killed holder stays listed until its presence lapses.
        let one = seen
            .iter()
            .all(|h| h.len() == 1 && h == &seen[0] && names.contains(&h[0].as_str()));
        one.then(|| holder = seen[0][0].clone())
    });
    let i = names
        .iter()
        .position(|n| *n == holder)
        .unwrap_or_else(|| panic!("holder {holder:?} not in {names:?}"));
    let leaders: Vec<f64> = nodes
        .iter()
        .map(|n| {
            n.metric("relay_rules_leader")
                .unwrap_or_else(|| panic!("no relay_rules_leader: {:?}", n.get("/metrics")))
        })
        .collect();
    let want: Vec<f64> = (0..nodes.len())
        .map(|j| f64::from(u8::from(j == i)))
        .collect();
    assert_eq!(leaders, want, "relay_rules_leader is 1 on the holder only");
    i
}

/// The keys of the active alarms `node` serves.
fn alarm_keys(node: &RelayProc) -> Vec<String> {
    alarm_keys_at(node, "/api/v1/alarms")
}

/// The keys of the active alarms of `node`'s answer to `path`.
fn alarm_keys_at(node: &RelayProc, path: &str) -> Vec<String> {
    let (status, body) = node.get(path);
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    v["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["key"].as_str().unwrap().to_owned())
        .collect()
}

/// DATA with the JSON flag from `c` to `dst`, without an answer wanted.
fn json_data(c: &mut Client, dst: &str, v: serde_json::Value) {
    let mut f = relay_core::frame::Frame::data(
        bytes::Bytes::new(),
        dst.to_owned().into_bytes(),
        v.to_string().into_bytes(),
    );
    f.flags = relay_core::frame::Flags(relay_core::frame::Flags::JSON);
    c.send(&f);
}

#[test]
fn rules_run_once_per_fleet_on_the_lease_holder_and_move_when_it_is_killed() {
    nats_is_up();
    let p = prefix("lease");
    let keys = RedisKeys(format!("relay_{p}:"));
    redis_clean(&keys.0);
    let dir = std::env::temp_dir().join(&p);
    std::fs::create_dir_all(&dir).unwrap();
    let names = ["r1", "r2", "r3"];
    let nodes: Vec<RelayProc> = names
        .iter()
        .map(|n| {
            let node_dir = dir.join(n);
            std::fs::create_dir_all(node_dir.join("rules")).unwrap();
            std::fs::write(node_dir.join("rules").join("fire.rhai"), LEASE_RULE).unwrap();
            let sections = format!(
                "[plugins]\nenabled = true\ndir = \"{}\"\nspool_dir = \"{}\"\n\
                 [redis]\nenabled = true\nurl = \"redis://{REDIS}/\"\nkey_prefix = \"{}\"\n",
                node_dir.join("rules").display(),
                node_dir.join("spool").display(),
                keys.0,
            );
            spawn_node_with(
                &dir,
                &p,
                n,
                &format!("nats://{NATS}"),
                &sections,
                "rules_lease = true\n",
            )
        })
        .collect();
    let mut f = Fleet {
        dir,
        prefix: p,
        nodes,
    };
    for n in &f.nodes {
        wait_nodes(n, names.len());
    }
    let leader = wait_one_holder(&f.nodes, &names);
    let other = (leader + 1) % names.len();
    // A device on a node without the lease; its message reaches a device
    // on the third node, and the rule runs once, on the holder.
    let third = 3 - leader - other;
    let mut dev = Client::hello(f.nodes[other].tcp, Form::Json, "dev-1");
    let sink = Client::hello(f.nodes[third].tcp, Form::Binary, "sink-1");
    let _ = send_until_acked(&mut dev, "sink-1", "warm-up");
    json_data(
        &mut dev,
        "sink-1",
        serde_json::json!({"fire": true, "n": 1}),
    );
    eventually("the rule fired for the first message", || {
        (redis_counter(&keys.0, "fired") >= 1).then_some(())
    });
    eventually("the alarm on the holder", || {
        alarm_keys(&f.nodes[leader])
            .contains(&"dev-1/fired-1".to_owned())
            .then_some(())
    });
    assert!(
        alarm_keys_at(&f.nodes[other], "/api/v1/alarms?local=true").is_empty(),
        "no engine without the lease"
    );
    // The alarm routes of any node answer from the holder's engine.
    assert!(
        alarm_keys(&f.nodes[other]).contains(&"dev-1/fired-1".to_owned()),
        "the holder's alarms through another node"
    );
    let (s, body) = f.nodes[third].get("/api/v1/devices/dev-1");
    assert_eq!(s, 200, "{body}");
    let d: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (d["online"].as_bool(), d["node"].as_str()),
        (Some(true), Some(names[other])),
        "the holder's registry, with the node holding the device: {d}"
    );
    assert!(
        f.nodes[other]
            .metric("relay_rules_forwarded_total")
            .unwrap()
            >= 1.0
    );
    assert!(
        f.nodes[leader]
            .metric("relay_rules_received_total")
            .unwrap()
            >= 1.0
    );
    // A timer the rule starts on the holder, kept in Redis.
    json_data(&mut dev, "sink-1", serde_json::json!({"hot": true}));
    eventually("the alarm timer written to Redis", || {
        let n: usize = redis::cmd("HLEN")
            .arg(format!("{}alarm_watch", keys.0))
            .query(&mut redis())
            .unwrap();
        (n >= 1).then_some(())
    });
    // Settled: exactly once.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        redis_counter(&keys.0, "fired"),
        1,
        "the rule ran once per message"
    );

    // The holder is killed: another node takes the lease after it expires,
    // loads the alarms and the timer from Redis, and the timer raises its
    // alarm there with no new message.
    let mut dead = f.nodes.remove(leader);
    let mut alive: Vec<&str> = names.to_vec();
    alive.remove(leader);
    dead.signal(libc::SIGKILL);
    let _ = dead.child.wait();
    let killed = Instant::now();
    let leader2 = wait_one_holder(&f.nodes, &alive);
    eprintln!("the rules lease moved after {:?}", killed.elapsed());
    eventually("the first alarm restored on the new holder", || {
        alarm_keys(&f.nodes[leader2])
            .contains(&"dev-1/fired-1".to_owned())
            .then_some(())
    });
    eventually("the timer's alarm raised on the new holder", || {
        alarm_keys(&f.nodes[leader2])
            .contains(&"dev-1/hot".to_owned())
            .then_some(())
    });
    // The devices on the surviving nodes are still connected: the new
    // holder keeps their presence in Redis.
    let present: bool = redis::cmd("HEXISTS")
        .arg(format!("{}presence", keys.0))
        .arg("dev-1")
        .query(&mut redis())
        .unwrap();
    assert!(present, "dev-1's presence kept across the take-over");
    // The device reconnects to whichever node survives with its sink, and
    // a new message fires the rule once more, once.
    let dev_node = &f.nodes[(leader2 + 1) % f.nodes.len()];
    let sink_node = &f.nodes[leader2];
    drop(dev);
    drop(sink);
    let mut dev = Client::hello(dev_node.tcp, Form::Json, "dev-1");
    let _sink = Client::hello(sink_node.tcp, Form::Binary, "sink-1");
    let _ = send_until_acked(&mut dev, "sink-1", "again");
    json_data(
        &mut dev,
        "sink-1",
        serde_json::json!({"fire": true, "n": 2}),
    );
    eventually("the rule fired for the second message", || {
        alarm_keys(&f.nodes[leader2])
            .contains(&"dev-1/fired-2".to_owned())
            .then_some(())
    });
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(redis_counter(&keys.0, "fired"), 2, "once more, once");
    f.nodes.push(dead);
}

#[test]
fn without_the_lease_every_node_runs_its_own_rules() {
    // The default with the cluster: the node a device is on runs the rule.
    nats_is_up();
    let p = prefix("nolease");
    let dir = std::env::temp_dir().join(&p);
    std::fs::create_dir_all(&dir).unwrap();
    let names = ["s1", "s2"];
    let nodes: Vec<RelayProc> = names
        .iter()
        .map(|n| {
            let node_dir = dir.join(n);
            std::fs::create_dir_all(node_dir.join("rules")).unwrap();
            std::fs::write(node_dir.join("rules").join("fire.rhai"), LEASE_RULE).unwrap();
            let sections = format!(
                "[plugins]\nenabled = true\ndir = \"{}\"\nspool_dir = \"{}\"\n",
                node_dir.join("rules").display(),
                node_dir.join("spool").display(),
            );
            spawn_node_with(&dir, &p, n, &format!("nats://{NATS}"), &sections, "")
        })
        .collect();
    let f = Fleet {
        dir,
        prefix: p,
        nodes,
    };
    for n in &f.nodes {
        wait_nodes(n, names.len());
    }
    assert!(rules_holders(&f.nodes[0]).is_empty());
    assert_eq!(f.nodes[0].metric("relay_rules_leader"), None);
    for (i, n) in f.nodes.iter().enumerate() {
        let mut dev = Client::hello(n.tcp, Form::Json, &format!("dev-{i}"));
        let _sink = Client::hello(n.tcp, Form::Binary, &format!("sink-{i}"));
        json_data(
            &mut dev,
            &format!("sink-{i}"),
            serde_json::json!({"fire": true, "n": i}),
        );
        eventually("the alarm on the device's own node", || {
            alarm_keys(n)
                .contains(&format!("dev-{i}/fired-{i}"))
                .then_some(())
        });
    }
}

#[test]
fn with_no_live_lease_holder_rule_events_are_dropped_and_counted() {
    // A node that cannot reach NATS never holds the lease: nothing runs its
    // rules, and its events are counted as dropped, never queued forever.
    let p = prefix("nolink");
    let dir = std::env::temp_dir().join(&p);
    std::fs::create_dir_all(dir.join("rules")).unwrap();
    std::fs::write(dir.join("rules").join("fire.rhai"), LEASE_RULE).unwrap();
    let closed = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let sections = format!(
        "[plugins]\nenabled = true\ndir = \"{}\"\nspool_dir = \"{}\"\n",
        dir.join("rules").display(),
        dir.join("spool").display(),
    );
    let node = spawn_node_with(
        &dir,
        &p,
        "x1",
        &format!("nats://{closed}"),
        &sections,
        "rules_lease = true\n",
    );
    let f = Fleet {
        dir,
        prefix: p,
        nodes: vec![node],
    };
    let n = &f.nodes[0];
    let mut dev = Client::hello(n.tcp, Form::Json, "dev-x");
    let _sink = Client::hello(n.tcp, Form::Binary, "sink-x");
    json_data(
        &mut dev,
        "sink-x",
        serde_json::json!({"fire": true, "n": 1}),
    );
    eventually("the events counted as dropped", || {
        // Two connects and the message.
        (n.metric("relay_rules_forward_dropped_total").unwrap() >= 3.0).then_some(())
    });
    assert_eq!(n.metric("relay_rules_leader"), Some(0.0));
    assert_eq!(n.metric("relay_rules_forwarded_total"), Some(0.0));
    assert!(
        alarm_keys_at(n, "/api/v1/alarms?local=true").is_empty(),
        "no engine runs without the lease"
    );
    // With no holder to ask, the alarm routes say so.
    let (s, body) = n.get("/api/v1/alarms");
    assert_eq!(s, 503, "{body}");
    assert!(body.contains("\"unavailable\""), "{body}");
}

/// A mosquitto client process whose stdout lines arrive on a channel;
/// killed (by its pid) when dropped.
struct Mosq {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
}

impl Mosq {
    /// mosquitto_sub on `node` printing `topic payload` lines (QoS 1).
    fn sub(node: &RelayProc, id: &str, filter: &str) -> Mosq {
        use std::io::BufRead;
        let port = node.mqtt.expect("mqtt listener").port().to_string();
        let mut child = std::process::Command::new("mosquitto_sub")
            .args(["-h", "127.0.0.1", "-p", &port, "-i", id, "-V", "mqttv5"])
            .args(["-t", filter, "-q", "1", "-v"])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("mosquitto_sub runs");
        let out = child.stdout.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Mosq { child, lines }
    }

    fn line(&self, t: Duration) -> Option<String> {
        self.lines.recv_timeout(t).ok()
    }

    /// The next `n` lines (at most 10 s), then whatever else comes within
    /// `more`.
    fn lines(&self, n: usize, more: Duration) -> Vec<String> {
        let end = Instant::now() + Duration::from_secs(10);
        let mut out = Vec::new();
        while out.len() < n {
            match self.line(end.saturating_duration_since(Instant::now())) {
                Some(l) => out.push(l),
                None => break,
            }
        }
        out.extend(self.lines_for(more));
        out
    }

    /// Every line printed within `t`.
    fn lines_for(&self, t: Duration) -> Vec<String> {
        let end = Instant::now() + t;
        let mut out = Vec::new();
        while let Some(l) = self.line(end.saturating_duration_since(Instant::now())) {
            out.push(l);
        }
        out
    }
}

impl Drop for Mosq {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// mosquitto_pub on `node` (QoS 1, MQTT 5): returns once the relay has
/// acknowledged the message.
fn mqtt_pub(node: &RelayProc, id: &str, topic: &str, payload: &str) {
    mqtt_pub_with(node, id, topic, payload, &[]);
}

fn mqtt_pub_with(node: &RelayProc, id: &str, topic: &str, payload: &str, more: &[&str]) {
    let port = node.mqtt.expect("mqtt listener").port().to_string();
    let s = std::process::Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &port, "-i", id, "-V", "mqttv5"])
        .args(["-t", topic, "-m", payload, "-q", "1"])
        .args(more)
        .status()
        .expect("mosquitto_pub runs");
    assert!(s.success(), "mosquitto_pub {topic}: {s}");
}

/// A native group publish from `c` (acknowledged by the relay).
fn native_publish(c: &mut Client, group: &str, seq: u32, payload: &str) {
    let mut f = relay_core::Frame::new(FrameType::Publish);
    f.dst = bytes::Bytes::copy_from_slice(group.as_bytes());
    f.seq = seq;
    f.flags = relay_core::frame::Flags(relay_core::frame::Flags::ACK_REQ);
    f.payload = bytes::Bytes::copy_from_slice(payload.as_bytes());
    c.send(&f);
    loop {
        let got = c.recv();
        if got.seq == seq && got.kind == FrameType::Ack {
            return;
        }
        assert_ne!(got.kind, FrameType::Error, "{:?}", got.error_parts());
    }
}

/// Publishes (with `publish(n)`) until `sub` prints a line, then returns
/// the line (the subscription reaches the other nodes within
/// milliseconds, but not at once).
fn publish_until_line(sub: &Mosq, what: &str, mut publish: impl FnMut(u32)) -> String {
    for n in 0..40 {
        publish(n);
        if let Some(l) = sub.line(Duration::from_millis(300)) {
            return l;
        }
    }
    panic!("{what}: the subscriber never got a message");
}

/// A counter of `/metrics` on `node`.
fn metric(node: &RelayProc, name: &str) -> u64 {
    let (_, body) = node.get("/metrics");
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in /metrics"))
}

#[test]
fn an_mqtt_subscription_sees_publishes_of_every_node_once_until_it_goes() {
    let f = fleet("mqtt", &["q1", "q2", "q3"], &nats_urls(3));
    let (a, b, c) = (&f.nodes[0], &f.nodes[1], &f.nodes[2]);
    let sub = Mosq::sub(a, "sub-a", "plant/#");

    // An MQTT client on q2: the wildcard subscriber on q1 gets it.
    let first = publish_until_line(&sub, "mqtt from q2", |n| {
        mqtt_pub(b, "pub-b", "plant/k1/temp", &format!("warmup-{n}"));
    });
    assert!(first.starts_with("plant/k1/temp warmup-"), "{first}");
    sub.lines_for(Duration::from_millis(300));
    mqtt_pub(b, "pub-b", "plant/k1/temp", "from-q2");
    // A native controller's group publish on q3 (group `plant` is the
    // topic `plant`, which `plant/#` matches).
    let mut ctl = Client::hello(c.tcp, Form::Binary, "ctl-3");
    native_publish(&mut ctl, "plant", 1, "from-q3");
    let got = sub.lines(2, Duration::from_millis(500));
    let n = |want: &str| got.iter().filter(|l| *l == want).count();
    assert_eq!(n("plant/k1/temp from-q2"), 1, "{got:?}");
    assert_eq!(n("plant from-q3"), 1, "{got:?}");
    assert_eq!(got.len(), 2, "nothing else, nothing twice: {got:?}");

    // While q1 has the subscriber, q2 sends each publish to it.
    let out = "relay_cluster_mqtt_publishes_out_total";
    let before = metric(b, out);
    mqtt_pub(b, "pub-b", "plant/k1/temp", "counted");
    eventually("q2 counts the publish it sends to q1", || {
        (metric(b, out) > before).then_some(())
    });
    assert_eq!(
        sub.line(Duration::from_secs(5)).as_deref(),
        Some("plant/k1/temp counted")
    );

    // The last subscriber on q1 goes: within the interest refresh period
    // q2 sends nothing more there.
    drop(sub);
    eventually("q2 stops sending to q1", || {
        let before = metric(b, out);
        mqtt_pub(b, "pub-b", "plant/k1/temp", "after");
        let end = Instant::now() + Duration::from_millis(500);
        while Instant::now() < end {
            if metric(b, out) > before {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Some(())
    });
}

#[test]
fn a_topic_subscriber_and_a_group_member_on_other_nodes_each_get_a_publish_once() {
    let f = fleet("mqttgrp", &["r1", "r2", "r3"], &nats_urls(3));
    let (a, b, c) = (&f.nodes[0], &f.nodes[1], &f.nodes[2]);
    // A native member of group `room-9` on r1, an MQTT subscriber of topic
    // `room-9` on r2, publishers on r3.
    let mut member = Client::hello(a.tcp, Form::Binary, "member-1");
    let mut j = relay_core::Frame::new(FrameType::Join);
    j.dst = bytes::Bytes::from_static(b"room-9");
    j.seq = 1;
    j.flags = relay_core::frame::Flags(relay_core::frame::Flags::ACK_REQ);
    member.send(&j);
    assert_eq!(member.expect(FrameType::Ack).seq, 1);
    let sub = Mosq::sub(b, "sub-b", "room-9");
    let mut ctl = Client::hello(c.tcp, Form::Binary, "ctl-9");
    let mut seq = 10;
    publish_until_line(&sub, "native publish on r3", |n| {
        seq += 1;
        native_publish(&mut ctl, "room-9", seq, &format!("warmup-{n}"));
    });
    sub.lines_for(Duration::from_millis(300));
    while member.recv_timeout(Duration::from_millis(300)).is_some() {}

    // A native publish and an MQTT publish on r3: each reaches both once.
    native_publish(&mut ctl, "room-9", 100, "native-3");
    mqtt_pub(c, "pub-c", "room-9", "mqtt-3");
    let got = sub.lines(2, Duration::from_millis(500));
    assert_eq!(
        got,
        ["room-9 native-3", "room-9 mqtt-3"],
        "MQTT subscriber on r2"
    );
    let mut payloads = Vec::new();
    let end = Instant::now() + Duration::from_secs(10);
    while payloads.len() < 2 && Instant::now() < end {
        if let Some(f) = member.recv_timeout(Duration::from_millis(200)) {
            assert_eq!(f.kind, FrameType::Data, "{f:?}");
            payloads.push(String::from_utf8_lossy(&f.payload).into_owned());
        }
    }
    while let Some(f) = member.recv_timeout(Duration::from_millis(500)) {
        assert_eq!(f.kind, FrameType::Data, "{f:?}");
        assert_eq!(&f.dst[..], b"room-9");
        payloads.push(String::from_utf8_lossy(&f.payload).into_owned());
    }
    assert_eq!(payloads, ["native-3", "mqtt-3"], "native member on r1");
}

#[test]
fn a_retained_publish_on_one_node_is_retained_on_every_node() {
    let f = fleet("mqttret", &["s1", "s2", "s3"], &nats_urls(3));
    let (b, c) = (&f.nodes[1], &f.nodes[2]);
    mqtt_pub_with(b, "pub-b", "tank/t1/level", "73", &["-r"]);
    // A subscriber arriving later on s3 gets it from s3's own store (the
    // publish reaches s3 within milliseconds; a subscriber too early
    // retries).
    let line = eventually(
        "s3 answers a new subscription with s2's retained message",
        || {
            let sub = Mosq::sub(c, "sub-c", "tank/+/level");
            sub.line(Duration::from_millis(1000))
        },
    );
    assert_eq!(line, "tank/t1/level 73");
    // An empty retained publish on s2 clears it on s3 too.
    mqtt_pub_with(b, "pub-b", "tank/t1/level", "", &["-r"]);
    eventually("the cleared message is gone on s3", || {
        let sub = Mosq::sub(c, "sub-c2", "tank/+/level");
        sub.line(Duration::from_millis(500)).is_none().then_some(())
    });
}

#[test]
fn a_shared_subscription_spread_over_nodes_gets_each_message_once() {
    let f = fleet("mqttshare", &["h1", "h2", "h3"], &nats_urls(3));
    let (a, b, c) = (&f.nodes[0], &f.nodes[1], &f.nodes[2]);
    let sa = Mosq::sub(a, "share-a", "$share/workers/job/#");
    let sb = Mosq::sub(b, "share-b", "$share/workers/job/#");
    // Publishes on h3 (no member there) until each member has had one:
    // h3 hands each message to one of h1 and h2, in turn.
    let mut seen = [false, false];
    for n in 0..60 {
        mqtt_pub(c, "pub-c", "job/x", &format!("warmup-{n}"));
        seen[0] |= sa.line(Duration::from_millis(150)).is_some();
        seen[1] |= sb.line(Duration::from_millis(150)).is_some();
        if seen == [true, true] {
            break;
        }
    }
    assert_eq!(seen, [true, true], "both members were reached from h3");
    sa.lines_for(Duration::from_millis(300));
    sb.lines_for(Duration::from_millis(300));

    for i in 0..6 {
        mqtt_pub(c, "pub-c", "job/x", &format!("m{i}"));
    }
    // Six lines between the two (at most 10 s), then nothing more.
    let (mut ga, mut gb) = (Vec::new(), Vec::new());
    let end = Instant::now() + Duration::from_secs(10);
    while ga.len() + gb.len() < 6 && Instant::now() < end {
        ga.extend(sa.line(Duration::from_millis(50)));
        gb.extend(sb.line(Duration::from_millis(50)));
    }
    ga.extend(sa.lines_for(Duration::from_millis(300)));
    gb.extend(sb.lines_for(Duration::from_millis(300)));
    let mut all: Vec<&String> = ga.iter().chain(&gb).collect();
    all.sort();
    let want: Vec<String> = (0..6).map(|i| format!("job/x m{i}")).collect();
    assert_eq!(
        all,
        want.iter().collect::<Vec<_>>(),
        "each once: {ga:?} {gb:?}"
    );
    assert!(!ga.is_empty() && !gb.is_empty(), "in turn: {ga:?} {gb:?}");

    // Published on h1, which has a member: that member gets each, h2's none.
    for i in 0..3 {
        mqtt_pub(a, "pub-a", "job/y", &format!("l{i}"));
    }
    let ga = sa.lines(3, Duration::from_millis(300));
    assert_eq!(ga, ["job/y l0", "job/y l1", "job/y l2"]);
    assert!(sb.lines_for(Duration::from_millis(300)).is_empty());
}

/// A shard whose input is steady waits on its sockets itself (the busy
/// loop), not on the channel from the cluster link: frames from another node
/// ring its kick, so they are delivered at once rather than at the end of the
/// loop's slice. One shard per node: no other shard kicks it, so every kicked
/// wait is the link's.
#[test]
fn frames_from_another_node_wake_a_shard_that_waits_on_its_sockets() {
    // One shard each, waiting on its sockets up to 20 ms at a time.
    let sections = "[plugins]\nenabled = false\n\
                    [shards]\ncount = 1\npin = false\nio_memory_kib = 256\nio = \"epoll\"\n\
                    slice_us = 20000\ncoalesce_us = 0\n";
    let f = fleet_with("kick", &["ka", "kb"], &nats_urls(2), sections);
    let (a, b) = (&f.nodes[0], &f.nodes[1]);
    let mut far = Client::hello(b.tcp, Form::Binary, "kick-far");
    let mut near = Client::hello(a.tcp, Form::Binary, "kick-near");
    send_until_acked(&mut near, "kick-far", "first");
    let steady = common::Steady::start(b.tcp, &common::names("kick-tx-", 8), "kick-rx");
    std::thread::sleep(Duration::from_millis(200));
    // A frame wakes the loop only if it comes while the loop waits: on a
    // loaded machine that can take more frames (at most 400).
    let kicked = || common::counter_at(b.http, "relay_busy_waits_kicked_total");
    for n in 0..400u32 {
        let payload = format!("cross-{n}").into_bytes();
        near.data("kick-far", n, false, &payload);
        recv_payload(&mut far, &payload);
        std::thread::sleep(Duration::from_millis(5));
        if n % 20 == 19 && kicked() > 0 {
            break;
        }
    }
    let (sent, _) = steady.stop();
    assert!(sent > 100, "the stream ran: {sent} frames");
    assert!(
        common::counter_at(b.http, "relay_busy_waits_total") > 0,
        "the stream kept the loop busy"
    );
    assert!(
        kicked() > 0,
        "no frame from the other node woke the waiting loop"
    );
}
