//! SIGHUP (`systemctl reload relay`) on a real relay process: the file is
//! read again, limits and heartbeat bounds change while clients stay
//! connected, every changed key that needs a restart is named in the log,
//! and a broken file is refused with the running configuration kept.

mod common;

use std::time::Duration;

use common::{Client, Form, RelayProc};
use relay_core::ErrorCode;
use relay_core::frame::FrameType;

fn config(extra: &str) -> String {
    format!(
        "[node]\nname = \"n1\"\n[listeners]\ntcp = \"127.0.0.1:0\"\nhttp = \"127.0.0.1:0\"\n\
         [shards]\ncount = 2\npin = false\nio_memory_kib = 256\n[plugins]\nenabled = false\n{extra}"
    )
}

/// Says hello as `addr` asking for a heartbeat of `heartbeat_s`; returns the
/// client and the WELCOME's heartbeat and node.
fn hello(relay: &RelayProc, addr: &str, heartbeat_s: u32) -> (Client, u32, String) {
    let mut c = Client::connect(relay.tcp, Form::Json);
    let mut f = relay_core::frame::Frame::new(FrameType::Hello);
    f.src = bytes::Bytes::copy_from_slice(addr.as_bytes());
    f.payload = serde_json::json!({ "heartbeat_s": heartbeat_s })
        .to_string()
        .into();
    f.flags = relay_core::frame::Flags(relay_core::frame::Flags::JSON);
    c.send(&f);
    let w = c.expect(FrameType::Welcome);
    let v: serde_json::Value = serde_json::from_slice(&w.payload).unwrap();
    c.addr = addr.to_owned();
    (
        c,
        v["heartbeat_s"].as_u64().unwrap() as u32,
        v["node"].as_str().unwrap().to_owned(),
    )
}

#[test]
fn sighup_applies_live_keys_names_the_rest_and_refuses_a_broken_file() {
    let dir = std::env::temp_dir().join(format!("relay-reload-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("relay.toml");
    std::fs::write(&file, config("")).unwrap();
    // systemd's notification socket (Type=notify): the relay says it is ready.
    let notify_path = dir.join("notify.sock");
    let _ = std::fs::remove_file(&notify_path);
    let notify = std::os::unix::net::UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut relay = RelayProc::spawn(&file, &[("NOTIFY_SOCKET", notify_path.to_str().unwrap())]);
    let mut msg = [0u8; 256];
    let n = notify.recv(&mut msg).expect("a notification");
    let text = String::from_utf8_lossy(&msg[..n]).into_owned();
    assert!(text.contains("READY=1"), "{text}");
    assert!(
        text.contains(&format!("MAINPID={}", relay.child.id())),
        "{text}"
    );

    let (mut a, beat, node) = hello(&relay, "dev-a", 1000);
    assert_eq!((beat, node.as_str()), (1000, "n1"));
    // The default rate (2000/s) lets a burst through.
    for seq in 1..=5 {
        a.data("dev-a", seq, false, b"x");
    }
    for _ in 1..=5 {
        a.expect(FrameType::Data);
    }

    // Tighter limits and heartbeat bounds, and keys that need a restart.
    std::fs::write(
        &file,
        config(
            "[limits]\nmax_connections = 2\nframes_per_sec = 1\nburst = 1\n\
             [heartbeat]\nmax_s = 60\n",
        )
        .replace("name = \"n1\"", "name = \"n2\"")
        .replace("count = 2", "count = 3"),
    )
    .unwrap();
    relay.signal(libc::SIGHUP);
    let line = relay.wait_log("configuration reloaded", Duration::from_secs(10));
    for key in [
        "limits.max_connections",
        "limits.frames_per_sec",
        "limits.burst",
        "heartbeat.max_s",
    ] {
        let applied = line.split("needs_restart").next().unwrap();
        assert!(applied.contains(key), "{key} not applied: {line}");
    }
    let restart = line.split("needs_restart").nth(1).unwrap();
    assert!(
        restart.contains("node.name") && restart.contains("shards.count"),
        "{line}"
    );
    // Shards take the new settings within a sweep.
    std::thread::sleep(Duration::from_millis(400));

    // The connected client is now held to 1 frame/s (with ACK_REQ every
    // refused frame gets its own `rate_limited`).
    for seq in 1..=5 {
        a.data("dev-a", seq, true, b"x");
    }
    let mut limited = 0;
    while let Some(f) = a.recv_timeout(Duration::from_millis(500)) {
        if f.kind == FrameType::Error && f.error_parts().unwrap().0 == ErrorCode::RateLimited as u16
        {
            limited += 1;
        }
    }
    assert!(limited >= 3, "{limited} of 5 frames rate limited");

    // A new hello gets the new heartbeat bound; the node name waits for a restart.
    let (b, beat, node) = hello(&relay, "dev-b", 1000);
    assert_eq!((beat, node.as_str()), (60, "n1"));
    // Two clients are connected: a third is over the new max_connections.
    let mut c = Client::connect(relay.tcp, Form::Json);
    let (frames, closed) = c.drain_until_closed(Duration::from_secs(5));
    assert!(closed && frames.is_empty(), "{frames:?}");

    // A broken file: refused, the running configuration kept.
    std::fs::write(&file, config("[limits]\nmax_frame = 3\n")).unwrap();
    relay.signal(libc::SIGHUP);
    let refused = relay.wait_log("reload refused", Duration::from_secs(10));
    assert!(refused.contains("limits.max_frame"), "{refused}");
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(relay.metric("relay_config_reloads_total"), Some(1.0));
    assert_eq!(
        relay.metric("relay_config_reload_failures_total"),
        Some(1.0)
    );
    let mut d = Client::connect(relay.tcp, Form::Json);
    let (_, closed) = d.drain_until_closed(Duration::from_secs(2));
    assert!(closed, "max_connections = 2 still holds");
    drop(b);
    // b's slot frees once the relay sees it closed.
    std::thread::sleep(Duration::from_millis(300));
    let (_e, beat, _) = hello(&relay, "dev-e", 1000);
    assert_eq!(beat, 60);

    let status = relay.stop(Duration::from_secs(20));
    assert!(status.success(), "{status}");
    std::fs::remove_dir_all(&dir).unwrap();
}
