//! Reading the alarm history back (`GET /api/v1/alarms/history`): the rows of
//! `[mysql] alarm_table`, newest first, in pages, queried on a thread of its own so
//! no caller ever waits on MySQL.
use std::time::Duration;

use mysql_async::prelude::Queryable;
use mysql_async::{Conn, Opts, Row, Value as SqlValue};
use relay_config::plugins::MysqlConfig;
use serde_json::{Value, json};

/// Most rows one page returns.
pub const MAX_PAGE: usize = 1000;

/// MySQL's "table does not exist".
const NO_SUCH_TABLE: u16 = 1146;

/// One page of history: rows (newest first) and the `before_id` of the next page.
pub type HistoryPage = (Vec<Value>, Option<u64>);

fn text(v: SqlValue) -> Value {
    match v {
        SqlValue::NULL => Value::Null,
        SqlValue::Bytes(b) => Value::String(String::from_utf8_lossy(&b).into_owned()),
        SqlValue::Int(i) => json!(i),
        SqlValue::UInt(u) => json!(u),
        other => Value::String(format!("{other:?}")),
    }
}

fn number(v: SqlValue) -> Option<u64> {
    match v {
        SqlValue::Int(i) => u64::try_from(i).ok(),
        SqlValue::UInt(u) => Some(u),
        SqlValue::Bytes(b) => std::str::from_utf8(&b).ok()?.parse().ok(),
        _ => None,
    }
}

/// Reads one page: rows with `id < before_id` (all when `None`), newest first, at
/// most `limit` (1 to 1000). A table not created yet reads as empty.
pub async fn alarm_history(
    cfg: &MysqlConfig,
    limit: usize,
    before_id: Option<u64>,
) -> Result<HistoryPage, String> {
    if !cfg.enabled {
        return Err("alarm history needs [mysql] enabled = true".into());
    }
    if !relay_config::plugins::is_identifier(&cfg.alarm_table) {
        return Err(format!(
            "alarm_table {:?} is not a plain identifier",
            cfg.alarm_table
        ));
    }
    let limit = limit.clamp(1, MAX_PAGE);
    let opts = Opts::from_url(&cfg.url).map_err(|e| format!("bad mysql url: {e}"))?;
    let timeout = Duration::from_millis(cfg.connect_timeout_ms + cfg.op_timeout_ms);
    let query = async {
        let mut conn = Conn::new(opts).await.map_err(|e| e.to_string())?;
        // The table name was checked to be [A-Za-z0-9_] by config validation.
        let sql = format!(
            "SELECT id, at_ms, alarm_key, transition, severity, text, acked_by FROM `{}` \
             WHERE id < ? ORDER BY id DESC LIMIT ?",
            cfg.alarm_table
        );
        let rows: Result<Vec<Row>, _> = conn
            .exec(sql, (before_id.unwrap_or(u64::MAX), limit as u64 + 1))
            .await;
        let _ = conn.disconnect().await;
        match rows {
            Ok(r) => Ok(r),
            Err(mysql_async::Error::Server(s)) if s.code == NO_SUCH_TABLE => Ok(Vec::new()),
            Err(e) => Err(e.to_string()),
        }
    };
    let rows = tokio::time::timeout(timeout, query)
        .await
        .map_err(|_| "mysql timed out".to_string())??;
    let more = rows.len() > limit;
    let mut items = Vec::with_capacity(limit);
    let mut last_id = None;
    for row in rows.into_iter().take(limit) {
        let mut cols = row.unwrap().into_iter();
        let mut next = || cols.next().unwrap_or(SqlValue::NULL);
        let id = number(next());
        let at_ms = number(next());
        last_id = id;
        items.push(json!({
            "id": id,
            "at_ms": at_ms,
            "key": text(next()),
            "transition": text(next()),
            "severity": text(next()),
            "text": text(next()),
            "acked_by": text(next()),
        }));
    }
    Ok((items, if more { last_id } else { None }))
}

/// Runs `alarm_history` on a thread of its own and hands the result to `done`.
pub fn alarm_history_in_background(
    cfg: MysqlConfig,
    limit: usize,
    before_id: Option<u64>,
    done: impl FnOnce(Result<HistoryPage, String>) + Send + 'static,
) {
    let spawned = std::thread::Builder::new()
        .name("relay-history".into())
        .spawn(move || {
            let result = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt.block_on(alarm_history(&cfg, limit, before_id)),
                Err(e) => Err(format!("history runtime: {e}")),
            };
            done(result);
        });
    if let Err(e) = spawned {
        tracing::error!("history query thread: {e}");
    }
}
