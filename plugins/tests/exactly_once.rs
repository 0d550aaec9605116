//! Writes whose answer is lost: the sink applied them but the relay never heard, so
//! it spools and replays them. Each still lands exactly once (MySQL by `relay_seq`,
//! Redis by the applied-sequence mark written in the same transaction).
mod common;

use std::time::Duration;

use common::*;
use redis::Commands;
use relay_config::plugins::{ColumnConfig, ColumnType, TableConfig};
use relay_plugins::PluginHost;
use serde_json::json;

const RULES: &str = r#"
fn on_message(msg) {
    persist("TABLE", #{ n: msg.payload.n });
    counter_add("n", 1);
}
"#;

fn numbers(table: &str) -> Option<Vec<i64>> {
    mysql_rows_opt(&format!("SELECT n FROM `{table}` ORDER BY id"))
        .map(|rows| rows.iter().map(|r| r[0].parse().unwrap()).collect())
}

#[test]
fn lost_answers_do_not_duplicate_writes() {
    require_services();
    init_log();
    let my = Proxy::start("127.0.0.1:3306");
    let rd = Proxy::start("127.0.0.1:6379");
    let id = unique("once");
    let t = format!("{id}_rows");
    let table = TableConfig {
        name: t.clone(),
        columns: vec![ColumnConfig {
            name: "n".into(),
            kind: ColumnType::Int,
        }],
    };
    let (mut cfg, cid) = config(
        "once",
        &[("o.rhai", &RULES.replace("TABLE", &t))],
        vec![table],
    );
    cfg.mysql.url = format!("mysql://root@{}/test", my.addr);
    cfg.mysql.op_timeout_ms = 300;
    cfg.mysql.connect_timeout_ms = 300;
    cfg.redis.url = format!("redis://{}/", rd.addr);
    cfg.redis.op_timeout_ms = 300;
    cfg.redis.connect_timeout_ms = 300;
    let prefix = cfg.redis.key_prefix.clone();
    let (host, _a) = PluginHost::start_with(cfg).unwrap();
    let ev = host.events();
    let mut r = redis();
    let counter = |r: &mut redis::Connection| -> i64 {
        let v: Option<i64> = r.hget(format!("{prefix}counters"), "n").unwrap();
        v.unwrap_or(0)
    };

    for n in 0..5 {
        ev.try_send(msg("c", json!({"n": n})));
    }
    wait_for(Duration::from_secs(10), "first rows", || {
        numbers(&t).filter(|v| v.len() == 5)
    });
    wait_for(Duration::from_secs(10), "first counts", || {
        (counter(&mut r) == 5).then_some(())
    });

    // The next write is applied by both servers, but its answer is swallowed.
    my.mute_replies(true);
    rd.mute_replies(true);
    ev.try_send(msg("c", json!({"n": 5})));
    wait_for(Duration::from_secs(10), "both writes applied", || {
        (numbers(&t).is_some_and(|v| v.len() == 6) && counter(&mut r) == 6).then_some(())
    });
    wait_for(
        Duration::from_secs(10),
        "both sinks gave up and spooled",
        || (host.stats().sink_spooled >= 2).then_some(()),
    );
    // Drop the muted connections and let the relay reconnect and replay.
    my.cut();
    rd.cut();
    my.mute_replies(false);
    rd.mute_replies(false);
    my.restore();
    rd.restore();
    for n in 6..10 {
        ev.try_send(msg("c", json!({"n": n})));
    }
    let got = wait_for(Duration::from_secs(20), "all rows", || {
        numbers(&t).filter(|v| v.len() >= 10)
    });
    wait_for(Duration::from_secs(20), "all counts", || {
        (counter(&mut r) >= 10).then_some(())
    });
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        numbers(&t).unwrap(),
        (0..10).collect::<Vec<_>>(),
        "row 5 once, in order: {got:?}"
    );
    assert_eq!(
        counter(&mut r),
        10,
        "the replayed increment was not applied twice"
    );
    assert!(host.stats().sink_replayed >= 2);
    host.shutdown();
    cleanup(&cid, &[&t]);
}
