//! Notifiers against a local HTTP server: the request built from the template,
//! an escalation chain stopped by an acknowledge, retries with backoff, the
//! per-target rate limit, and every attempt recorded in MariaDB.
mod common;

use std::time::{Duration, Instant};

use common::*;
use relay_config::plugins::NotifyConfig;
use relay_plugins::PluginHost;
use serde_json::json;

const RULES: &str = r#"
fn on_message(msg) {
    if msg.payload.kind == "raise" { alarm_raise(msg.payload.key, msg.payload.sev, `${msg.src} is on fire`); }
    if msg.payload.kind == "page" { notify("sms", msg.payload.to, "direct page"); }
}
"#;

fn notify_cfg(port: u16, retries: u32, rate: u32) -> NotifyConfig {
    toml::from_str(&format!(
        r#"
        [[notifier]]
        name = "webhook"
        url = "http://127.0.0.1:{port}/hook/{{{{target|url}}}}"
        headers = {{ Content-Type = "application/json", X-Alarm = "{{{{key}}}}" }}
        body = '{{"key":{{{{key|json}}}},"sev":"{{{{severity}}}}","text":{{{{text|json}}}},"event":"{{{{event}}}}"}}'
        timeout_ms = 2000
        retries = {retries}
        backoff_ms = 100
        rate_per_min = {rate}

        [[notifier]]
        name = "sms"
        method = "GET"
        url = "http://127.0.0.1:{port}/sms?to={{{{target|url}}}}&msg={{{{text|url}}}}"
        retries = 0
        rate_per_min = {rate}

        [[route]]
        name = "oncall"
        severities = ["critical"]
        chain = [
            {{ channel = "webhook", target = "ops room" }},
            {{ channel = "sms", target = "+100", after_s = 1.5 }},
        ]
        "#
    ))
    .unwrap()
}

#[test]
fn escalation_reaches_http_and_stops_on_ack() {
    require_services();
    init_log();
    let server = HttpServer::start(vec![200]);
    let (mut cfg, id) = config("esc", &[("n.rhai", RULES)], vec![]);
    cfg.notify = notify_cfg(server.addr.port(), 0, 100);
    let (host, _a) = PluginHost::start_with(cfg).unwrap();
    let ev = host.events();

    // Alarm A: acknowledged before the SMS step; only the webhook is called.
    let t0 = Instant::now();
    ev.try_send(msg(
        "c1",
        json!({"kind": "raise", "key": "c1/fire", "sev": "critical"}),
    ));
    let hook = wait_for(Duration::from_secs(5), "webhook request", || {
        server
            .requests()
            .into_iter()
            .find(|r| r.path.starts_with("/hook"))
    });
    assert_eq!(hook.method, "POST");
    assert_eq!(hook.path, "/hook/ops%20room");
    assert!(
        hook.headers.contains(&("x-alarm".into(), "c1/fire".into())),
        "{:?}",
        hook.headers
    );
    let body: serde_json::Value = serde_json::from_str(&hook.body).unwrap();
    assert_eq!(
        body,
        json!({"key": "c1/fire", "sev": "critical", "text": "c1 is on fire", "event": "raised"})
    );
    let view = host.ack("c1/fire", "bob").unwrap();
    assert_eq!(view.acked_by.as_deref(), Some("bob"));
    assert!(
        t0.elapsed() < Duration::from_millis(1500),
        "ack must come before the SMS step"
    );
    std::thread::sleep(Duration::from_millis(2000));
    assert!(
        !server.requests().iter().any(|r| r.path.starts_with("/sms")),
        "acknowledged: the SMS step must not fire"
    );

    // Alarm B, not acknowledged: the SMS step fires after its delay.
    let t1 = Instant::now();
    ev.try_send(msg(
        "c2",
        json!({"kind": "raise", "key": "c2/fire", "sev": "critical"}),
    ));
    let sms = wait_for(Duration::from_secs(5), "sms request", || {
        server
            .requests()
            .into_iter()
            .find(|r| r.path.starts_with("/sms"))
    });
    assert!(sms.at.duration_since(t1) >= Duration::from_millis(1450));
    assert_eq!(sms.method, "GET");
    assert_eq!(sms.path, "/sms?to=%2B100&msg=c2%20is%20on%20fire");

    // Acknowledging an unknown alarm is NotFound.
    assert!(matches!(
        host.ack("nope", "x"),
        Err(relay_plugins::AckError::NotFound(_))
    ));

    // Every attempt is recorded.
    let rows = wait_for(Duration::from_secs(5), "attempt rows", || {
        mysql_rows_opt(&format!(
            "SELECT channel, target, alarm_key, status, http_status FROM `{id}_notify` ORDER BY id"
        ))
        .filter(|r| r.len() == 3)
    });
    assert_eq!(rows[0], ["webhook", "ops room", "c1/fire", "sent", "200"]);
    assert_eq!(rows[1], ["webhook", "ops room", "c2/fire", "sent", "200"]);
    assert_eq!(rows[2], ["sms", "+100", "c2/fire", "sent", "200"]);
    host.shutdown();
    cleanup(&id, &[]);
}

#[test]
fn retries_back_off_and_rate_limit_holds() {
    require_services();
    init_log();
    // Two failures, then success.
    let server = HttpServer::start(vec![500, 503, 200]);
    let (mut cfg, id) = config("retry", &[("n.rhai", RULES)], vec![]);
    cfg.notify = notify_cfg(server.addr.port(), 3, 2);
    let (host, _a) = PluginHost::start_with(cfg).unwrap();
    let ev = host.events();
    ev.try_send(msg(
        "c1",
        json!({"kind": "raise", "key": "c1/x", "sev": "critical"}),
    ));
    let reqs = wait_for(Duration::from_secs(5), "three attempts", || {
        let r = server.requests();
        (r.len() == 3).then_some(r)
    });
    // Backoff: 100 ms then 200 ms.
    assert!(reqs[1].at.duration_since(reqs[0].at) >= Duration::from_millis(90));
    assert!(reqs[2].at.duration_since(reqs[1].at) >= Duration::from_millis(190));
    let rows = wait_for(Duration::from_secs(5), "attempt rows", || {
        mysql_rows_opt(&format!(
            "SELECT attempt, status, http_status FROM `{id}_notify` ORDER BY id"
        ))
        .filter(|r| r.len() == 3)
    });
    assert_eq!(
        rows,
        [
            ["1", "failed", "500"],
            ["2", "failed", "503"],
            ["3", "sent", "200"]
        ]
    );

    // Rate limit of 2 per minute per target: the webhook target already used one,
    // the sms target "+7" gets two, then is refused.
    for _ in 0..3 {
        ev.try_send(msg("c9", json!({"kind": "page", "to": "+7"})));
    }
    wait_for(Duration::from_secs(5), "rate limited", || {
        (host.stats().notify_rate_limited == 1).then_some(())
    });
    // The two sends admitted before the refusal may still be on their way.
    let sms = wait_for(Duration::from_secs(5), "two sms requests", || {
        let n = server
            .requests()
            .into_iter()
            .filter(|r| r.path.starts_with("/sms"))
            .count();
        (n >= 2).then_some(n)
    });
    std::thread::sleep(Duration::from_millis(200));
    let late = server
        .requests()
        .into_iter()
        .filter(|r| r.path.starts_with("/sms"))
        .count();
    assert_eq!(
        (sms, late),
        (2, 2),
        "two sends, and the refused one never sent"
    );
    // The refusal is recorded at once, the sends when their requests finish.
    let rows = wait_for(Duration::from_secs(5), "rate-limited row", || {
        mysql_rows_opt(&format!(
            "SELECT status FROM `{id}_notify` WHERE target = '+7' ORDER BY status"
        ))
        .filter(|r| r.len() == 3)
    });
    assert_eq!(rows, [["rate_limited"], ["sent"], ["sent"]]);
    host.shutdown();
    cleanup(&id, &[]);
}

#[test]
fn the_clear_notice_reads_differently_and_a_notifier_without_body_sends_every_field() {
    require_services();
    init_log();
    let server = HttpServer::start(vec![200]);
    let rules = r#"
fn on_message(msg) {
    if msg.payload.kind == "raise" { alarm_raise(msg.payload.key, "major", `${msg.src} door open`); }
    if msg.payload.kind == "clear" { alarm_clear(msg.payload.key); }
}
"#;
    let (mut cfg, id) = config("clearmsg", &[("n.rhai", rules)], vec![]);
    cfg.notify = toml::from_str(&format!(
        r#"
        console_url = "https://relay.example.com"
        [[notifier]]
        name = "hook"
        url = "http://127.0.0.1:{}/hook"
        retries = 0
        [[route]]
        chain = [{{ channel = "hook", target = "ops" }}]
        "#,
        server.addr.port()
    ))
    .unwrap();
    let (host, _a) = PluginHost::start_with(cfg).unwrap();
    let ev = host.events();
    ev.try_send(msg("d1", json!({"kind": "raise", "key": "d1/door"})));
    wait_for(Duration::from_secs(5), "the alarm notice", || {
        (server.requests().len() == 1).then_some(())
    });
    ev.try_send(msg("d1", json!({"kind": "clear", "key": "d1/door"})));
    let reqs = wait_for(Duration::from_secs(5), "the clear notice", || {
        let r = server.requests();
        (r.len() == 2).then_some(r)
    });
    let body = |i: usize| -> serde_json::Value { serde_json::from_str(&reqs[i].body).unwrap() };
    let (raised, cleared) = (body(0), body(1));
    assert!(
        reqs[0]
            .headers
            .contains(&("content-type".into(), "application/json".into())),
        "{:?}",
        reqs[0].headers
    );
    assert_eq!(raised["state"], "RAISED");
    assert_eq!(raised["severity"], "major");
    assert_eq!(
        raised["message"],
        "RAISED major: d1 door open https://relay.example.com/#/alarms"
    );
    assert_eq!(cleared["state"], "CLEARED");
    assert_eq!(cleared["event"], "cleared");
    let m = cleared["message"].as_str().unwrap();
    assert!(
        m.starts_with("CLEARED after ") && m.contains("(was major): d1 door open"),
        "{m}"
    );
    assert_ne!(raised["message"], cleared["message"]);
    host.shutdown();
    cleanup(&id, &[]);
}
