//! The device registry through the HTTP API: every address seen, online and
//! offline, with totals independent of the page, kept in the real Redis and read
//! back by a restarted relay.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Client, Form, get, http, test_config, wait_for};
use relay_core::frame::{Frame, FrameType};
use relay_shards::Relay;
use serde_json::{Value, json};

const REDIS_URL: &str = "redis://127.0.0.1:6379/";

struct Running {
    relay: Option<Relay>,
    host: Option<Arc<relay_plugins::PluginHost>>,
}

impl Running {
    fn relay(&self) -> &Relay {
        self.relay.as_ref().unwrap()
    }

    /// Stops the relay, then the rules engine (which writes the last registry changes).
    fn stop(mut self) {
        self.stop_now();
    }

    fn stop_now(&mut self) {
        drop(self.relay.take());
        if let Some(h) = self.host.take() {
            let until = Instant::now() + Duration::from_secs(10);
            let mut h = h;
            loop {
                match Arc::try_unwrap(h) {
                    Ok(host) => {
                        host.shutdown();
                        break;
                    }
                    Err(back) if Instant::now() < until => {
                        h = back;
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    Err(_) => break,
                }
            }
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop_now();
    }
}

fn dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("relay-devices-{name}-{}", std::process::id()));
    std::fs::create_dir_all(d.join("rules")).unwrap();
    d
}

fn start(dir: &Path, prefix: &str, tweak: impl FnOnce(&mut relay_config::Config)) -> Running {
    let mut cfg = test_config();
    cfg.plugins.enabled = true;
    cfg.plugins.dir = dir.join("rules").display().to_string();
    cfg.plugins.spool_dir = dir.join("spool").display().to_string();
    cfg.plugins.registry_flush_ms = 50;
    cfg.redis.enabled = true;
    cfg.redis.url = REDIS_URL.into();
    cfg.redis.key_prefix = prefix.into();
    tweak(&mut cfg);
    let (ext, host) = relay_shards::rules::attach(&cfg).expect("rules engine starts");
    let relay = Relay::start_with(&cfg, ext).expect("relay starts");
    Running {
        relay: Some(relay),
        host: Some(host),
    }
}

fn redis() -> redis::Connection {
    redis::Client::open(REDIS_URL)
        .unwrap()
        .get_connection()
        .expect("Redis reachable at 127.0.0.1:6379")
}

/// Deletes every key under `prefix`.
fn clean(prefix: &str) {
    let mut c = redis();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}*"))
        .query(&mut c)
        .unwrap();
    if !keys.is_empty() {
        let _: () = redis::cmd("DEL").arg(keys).query(&mut c).unwrap();
    }
}

fn addrs(v: &Value) -> Vec<String> {
    v["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["addr"].as_str().unwrap().to_owned())
        .collect()
}

fn bye(c: &mut Client) {
    c.send(&Frame::new(FrameType::Bye));
    let _ = c.drain_until_closed(Duration::from_secs(5));
}

fn hello_meta(relay: &Relay, addr: &str, meta: Value) -> Client {
    Client::hello_with(relay.tcp_addr(), Form::Json, addr, json!({ "meta": meta }))
}

#[test]
fn the_registry_lists_online_and_offline_devices_with_totals_and_survives_a_restart() {
    let prefix = format!("relay-test-devices-{}:", std::process::id());
    clean(&prefix);
    let d = dir("restart");
    let r = start(&d, &prefix, |_| {});
    let relay = r.relay();

    let mut a = hello_meta(relay, "ctl-a", json!({"site": "north"}));
    let (s, _) = http(
        relay,
        "POST",
        "/api/v1/groups/site-3/members",
        None,
        Some(&json!({"addr": "ctl-a"})),
    );
    assert_eq!(s, 200);
    std::thread::sleep(Duration::from_millis(20));
    let _b = hello_meta(relay, "ctl-b", json!({"fw": "2.1"}));
    let (s, _) = http(
        relay,
        "POST",
        "/api/v1/groups/site-3/members",
        None,
        Some(&json!({"addr": "ctl-b"})),
    );
    assert_eq!(s, 200);
    std::thread::sleep(Duration::from_millis(20));
    let mut c = Client::hello(relay.tcp_addr(), Form::Binary, "web-c");
    bye(&mut a);
    // Messages refresh last seen: web-c talks to ctl-b a second later.
    std::thread::sleep(Duration::from_millis(1_100));
    c.data("ctl-b", 1, false, b"x");

    let all = wait_for(relay, "/api/v1/devices", |v| {
        v["totals"]["offline"] == json!(1)
            && v["total"] == json!(3)
            && v["items"][0]["addr"] == "web-c"
    });
    assert_eq!(
        all["totals"],
        json!({"devices": 3, "online": 2, "offline": 1})
    );
    // Newest last seen first: web-c sent last, ctl-a said bye after ctl-b came.
    assert_eq!(addrs(&all), ["web-c", "ctl-a", "ctl-b"], "{all}");
    let off = &all["items"][1];
    assert_eq!(off["addr"], "ctl-a");
    assert_eq!(off["online"], false);
    assert_eq!(off["last_disconnect_reason"], "bye");
    assert_eq!(off["groups"], json!(["site-3"]));
    assert_eq!(off["meta"], json!({"site": "north"}));
    assert!(off["first_seen_ms"].as_u64().unwrap() <= off["last_seen_ms"].as_u64().unwrap());

    // A page of one still carries the totals of everything.
    let (s, p) = get(relay, "/api/v1/devices?limit=1&offset=1");
    assert_eq!(s, 200);
    assert_eq!(p["items"].as_array().unwrap().len(), 1);
    assert_eq!(p["total"], 3);
    assert_eq!(p["next"], 2);
    assert_eq!(p["totals"]["online"], 2);
    // Filters.
    let (_, on) = get(relay, "/api/v1/devices?status=online");
    assert_eq!(on["total"], 2);
    assert!(addrs(&on).iter().all(|a| a != "ctl-a"));
    let (_, off) = get(relay, "/api/v1/devices?status=offline");
    assert_eq!(addrs(&off), ["ctl-a"]);
    let (_, pre) = get(relay, "/api/v1/devices?prefix=ctl-");
    assert_eq!(pre["total"], 2);
    assert_eq!(pre["totals"]["devices"], 3, "totals ignore the filter");
    // ctl-a was in site-3 when it left; ctl-b is in it now.
    let (_, grp) = get(relay, "/api/v1/devices?group=site-3");
    assert_eq!(addrs(&grp), ["ctl-a", "ctl-b"]);
    let (_, grp) = get(relay, "/api/v1/devices?group=site-3&status=offline");
    assert_eq!(addrs(&grp), ["ctl-a"]);
    // One device; an online one shows its live connection and shadow.
    let (s, one) = get(relay, "/api/v1/devices/ctl-b");
    assert_eq!(s, 200);
    assert_eq!(one["online"], true);
    assert_eq!(one["role"], "controller");
    assert_eq!(one["meta"], json!({"fw": "2.1"}));
    assert_eq!(one["groups"], json!(["site-3"]), "its groups now: {one}");
    assert!(one["shard"].is_u64() && one["state"].is_object(), "{one}");
    // Bad input: clear errors.
    let (s, e) = get(relay, "/api/v1/devices/never-seen");
    assert_eq!(s, 404, "{e}");
    let (s, e) = get(relay, "/api/v1/devices?status=sleeping");
    assert_eq!(s, 400);
    assert!(
        e["message"]
            .as_str()
            .unwrap()
            .contains("online, offline or all")
    );
    let (s, _) = get(relay, "/api/v1/devices?offset=-1");
    assert_eq!(s, 400);

    // Kept in Redis: the hash and the sorted set by last seen.
    let until = Instant::now() + Duration::from_secs(5);
    let mut conn = redis();
    loop {
        let n: usize = redis::cmd("ZCARD")
            .arg(format!("{prefix}devices:seen"))
            .query(&mut conn)
            .unwrap();
        if n == 3 {
            break;
        }
        assert!(Instant::now() < until, "registry never reached redis ({n})");
        std::thread::sleep(Duration::from_millis(20));
    }
    let rec: String = redis::cmd("HGET")
        .arg(format!("{prefix}devices"))
        .arg("ctl-a")
        .query(&mut conn)
        .unwrap();
    let rec: Value = serde_json::from_str(&rec).unwrap();
    assert_eq!(rec["last_disconnect_reason"], "bye");
    let first_a = rec["first_seen_ms"].clone();

    drop(c);
    drop(_b);
    r.stop();

    // A new relay on the same Redis knows every device, all offline now.
    let r2 = start(&d, &prefix, |_| {});
    let relay = r2.relay();
    let (s, all) = get(relay, "/api/v1/devices");
    assert_eq!(s, 200);
    assert_eq!(
        all["totals"],
        json!({"devices": 3, "online": 0, "offline": 3}),
        "{all}"
    );
    let (_, a) = get(relay, "/api/v1/devices/ctl-a");
    assert_eq!(a["first_seen_ms"], first_a);
    assert_eq!(a["groups"], json!(["site-3"]));
    // Coming back keeps first seen and counts the connect.
    let _a = Client::hello(relay.tcp_addr(), Form::Json, "ctl-a");
    let a = wait_for(relay, "/api/v1/devices/ctl-a", |v| {
        v["online"] == json!(true)
    });
    assert_eq!(a["first_seen_ms"], first_a);
    assert_eq!(a["connects"], 2);
    drop(r2);
    clean(&prefix);
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn the_registry_keeps_at_most_registry_max_devices_forgetting_the_oldest_offline() {
    let prefix = format!("relay-test-devices-cap-{}:", std::process::id());
    clean(&prefix);
    let d = dir("cap");
    let r = start(&d, &prefix, |c| c.plugins.registry_max_devices = 5);
    let relay = r.relay();
    for i in 0..8 {
        let mut c = Client::hello(relay.tcp_addr(), Form::Json, &format!("dev-{i}"));
        bye(&mut c);
        // Each one is offline (and seen later than the one before) before the next.
        wait_for(relay, &format!("/api/v1/devices/dev-{i}"), |v| {
            v["online"] == json!(false)
        });
        // Last seen is in ms, and devices seen in the same ms list by
        // address: keep the next one out of this one's millisecond.
        std::thread::sleep(Duration::from_millis(3));
    }
    let all = wait_for(relay, "/api/v1/devices", |v| v["total"] == json!(5));
    assert_eq!(addrs(&all), ["dev-7", "dev-6", "dev-5", "dev-4", "dev-3"]);
    let (s, _) = get(relay, "/api/v1/devices/dev-0");
    assert_eq!(s, 404, "the oldest offline device was forgotten");
    let mut conn = redis();
    let until = Instant::now() + Duration::from_secs(5);
    loop {
        let n: usize = redis::cmd("HLEN")
            .arg(format!("{prefix}devices"))
            .query(&mut conn)
            .unwrap();
        if n == 5 {
            break;
        }
        assert!(Instant::now() < until, "redis holds {n} devices, not 5");
        std::thread::sleep(Duration::from_millis(20));
    }
    let (_, text) = http(relay, "GET", "/metrics", None, None);
    let text = text.as_str().unwrap();
    assert!(text.contains("relay_registry_devices 5"));
    assert!(text.contains("relay_registry_forgotten_total 3"), "{text}");
    assert!(text.contains("relay_registry_refused_total 0"));
    drop(r);
    clean(&prefix);
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn the_device_routes_need_the_rules_engine() {
    let relay = common::start(|_| {});
    let (s, v) = get(&relay, "/api/v1/devices");
    assert_eq!(s, 400, "{v}");
    assert!(
        v["message"]
            .as_str()
            .unwrap()
            .contains("rules are disabled")
    );
}
