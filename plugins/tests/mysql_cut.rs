//! MariaDB cut off mid-burst by a TCP proxy the test controls, then restored: every
//! row lands exactly once and in order; and rows spooled while it was down survive a
//! restart of the host.
mod common;

use std::time::Duration;

use common::*;
use relay_config::plugins::{ColumnConfig, ColumnType, TableConfig};
use relay_plugins::PluginHost;
use serde_json::json;

fn table(name: &str) -> TableConfig {
    TableConfig {
        name: name.into(),
        columns: vec![ColumnConfig {
            name: "n".into(),
            kind: ColumnType::Int,
        }],
    }
}

fn rules(table: &str) -> String {
    format!("fn on_message(msg) {{ persist(\"{table}\", #{{ n: msg.payload.n }}); }}")
}

fn numbers(table: &str) -> Option<Vec<i64>> {
    mysql_rows_opt(&format!("SELECT n FROM `{table}` ORDER BY id"))
        .map(|rows| rows.iter().map(|r| r[0].parse().unwrap()).collect())
}

#[test]
fn cut_mid_burst_then_restored_keeps_every_row_once_in_order() {
    require_services();
    init_log();
    let proxy = Proxy::start("127.0.0.1:3306");
    let id = unique("cut");
    let t = format!("{id}_rows");
    let (mut cfg, cid) = config("cut", &[("p.rhai", &rules(&t))], vec![table(&t)]);
    cfg.mysql.url = format!("mysql://root@{}/test", proxy.addr);
    cfg.mysql.op_timeout_ms = 1000;
    let (host, _a) = PluginHost::start_with(cfg).unwrap();
    let ev = host.events();
    const N: i64 = 600;
    for n in 0..N {
        assert!(ev.try_send(msg("ctl-1", json!({"n": n}))));
        if n == 200 {
            // Let some rows reach the table, then pull the cable.
            wait_for(Duration::from_secs(10), "first rows", || {
                numbers(&t).filter(|v| !v.is_empty())
            });
            proxy.cut();
        }
        if n == 400 {
            std::thread::sleep(Duration::from_millis(200));
            wait_for(Duration::from_secs(5), "writes spooled", || {
                (host.stats().sink_spooled > 0).then_some(())
            });
            proxy.restore();
        }
    }
    let got = wait_for(Duration::from_secs(30), "all rows", || {
        numbers(&t).filter(|v| v.len() >= N as usize)
    });
    assert_eq!(got, (0..N).collect::<Vec<_>>(), "every row once, in order");
    let s = host.stats();
    assert!(s.sink_spooled > 0 && s.sink_replayed > 0, "{s:?}");
    host.shutdown();
    cleanup(&cid, &[&t]);
}

#[test]
fn spooled_rows_survive_a_restart() {
    require_services();
    init_log();
    let proxy = Proxy::start("127.0.0.1:3306");
    let id = unique("spool");
    let t = format!("{id}_rows");
    let (mut cfg, cid) = config("spoolrestart", &[("p.rhai", &rules(&t))], vec![table(&t)]);
    cfg.mysql.url = format!("mysql://root@{}/test", proxy.addr);
    cfg.mysql.op_timeout_ms = 1000;
    proxy.cut();
    let (host, _a) = PluginHost::start_with(cfg.clone()).unwrap();
    let ev = host.events();
    for n in 0..50 {
        assert!(ev.try_send(msg("ctl-1", json!({"n": n}))));
    }
    wait_for(Duration::from_secs(5), "writes spooled", || {
        (host.stats().sink_spooled >= 50).then_some(())
    });
    host.shutdown();
    assert!(
        numbers(&t).is_none_or(|v| v.is_empty()),
        "nothing reached MariaDB yet"
    );

    // A new host on the same spool, with MariaDB back.
    proxy.restore();
    let (host, _a) = PluginHost::start_with(cfg).unwrap();
    let ev = host.events();
    for n in 50..60 {
        assert!(ev.try_send(msg("ctl-1", json!({"n": n}))));
    }
    let got = wait_for(Duration::from_secs(20), "all rows", || {
        numbers(&t).filter(|v| v.len() >= 60)
    });
    assert_eq!(got, (0..60).collect::<Vec<_>>());
    host.shutdown();
    cleanup(&cid, &[&t]);
}
