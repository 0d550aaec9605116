//! Reading the alarm history back from MySQL for the HTTP API and the
//! console: newest first, paged by row id. Runs on its own short-lived
//! runtime so the caller never blocks a shard.

use mysql_async::prelude::Queryable;
use mysql_async::{Conn, Opts, Row};
use relay_config::plugins::MysqlConfig;
use serde_json::{Value, json};

/// One page of alarm transitions older than `before_id` (newest first), and
/// the cursor for the next page.
pub async fn alarm_history(
    cfg: &MysqlConfig,
    limit: usize,
    before_id: Option<u64>,
) -> Result<(Vec<Value>, Option<u64>), String> {
    if !cfg.enabled {
        return Err("alarm history needs [mysql] enabled = true".into());
    }
    if !crate::history::is_safe_identifier(&cfg.alarm_table) {
        return Err(format!(
            "alarm_table {:?} is not a plain identifier",
            cfg.alarm_table
        ));
    }
    let opts = Opts::from_url(&cfg.url).map_err(|e| format!("mysql url: {e}"))?;
    let mut conn = Conn::new(opts).await.map_err(|e| format!("mysql: {e}"))?;
    let sql = format!(
        "SELECT id, at_ms, alarm_key, transition, severity, text, acked_by FROM `{}` WHERE id < ? ORDER BY id DESC LIMIT ?",
        cfg.alarm_table
    );
    let limit = limit.clamp(1, 1000);
    let rows: Vec<Row> = match conn
        .exec(sql, (before_id.unwrap_or(u64::MAX), limit as u64))
        .await
    {
        Ok(r) => r,
        // No transition was ever written: the table does not exist yet.
        Err(mysql_async::Error::Server(e)) if e.code == 1146 => Vec::new(),
        Err(e) => return Err(format!("mysql: {e}")),
    };
    let _ = conn.disconnect().await;
    let mut items = Vec::with_capacity(rows.len());
    let mut last = None;
    for mut r in rows {
        let id: Option<u64> = r.take_opt(0).and_then(Result::ok);
        last = id;
        items.push(json!({
            "id": id,
            "at_ms": r.take_opt::<Option<i64>, _>(1).and_then(Result::ok).flatten(),
            "key": r.take_opt::<Option<String>, _>(2).and_then(Result::ok).flatten(),
            "transition": r.take_opt::<Option<String>, _>(3).and_then(Result::ok).flatten(),
            "severity": r.take_opt::<Option<String>, _>(4).and_then(Result::ok).flatten(),
            "text": r.take_opt::<Option<String>, _>(5).and_then(Result::ok).flatten(),
            "acked_by": r.take_opt::<Option<String>, _>(6).and_then(Result::ok).flatten().filter(|s: &String| !s.is_empty()),
        }));
    }
    let next = if items.len() == limit { last } else { None };
    Ok((items, next))
}

/// Runs [`alarm_history`] on a thread of its own and calls `done` there.
pub fn alarm_history_in_background(
    cfg: MysqlConfig,
    limit: usize,
    before_id: Option<u64>,
    done: impl FnOnce(Result<(Vec<Value>, Option<u64>), String>) + Send + 'static,
) {
    let spawned = std::thread::Builder::new()
        .name("relay-history".into())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build();
            match rt {
                Ok(rt) => done(rt.block_on(alarm_history(&cfg, limit, before_id))),
                Err(e) => done(Err(format!("runtime: {e}"))),
            }
        });
    if let Err(e) = spawned {
        tracing::warn!("cannot start a history query: {e}");
    }
}

/// True for names usable as a table name without quoting problems.
pub fn is_safe_identifier(s: &str) -> bool {
    !s.is_empty() && s.len() <= 64 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers() {
        assert!(is_safe_identifier("relay_alarm_events"));
        assert!(!is_safe_identifier("x`; drop"));
        assert!(!is_safe_identifier(""));
    }
}
