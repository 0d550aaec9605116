//! Reading records back from MySQL for the API and the console, each query on a
//! thread of its own so no caller waits on MySQL:
//! - the notification log: every notifier attempt (`[mysql] notify_table`), newest
//!   first, in pages: who was paged, through which notifier, when, and the
//!   provider's answer;
//! - a device's telemetry over time: the numeric columns of a declared
//!   `[[mysql.tables]]` table that has an `addr` (string) column and a time column
//!   (`at_ms` or `time_ms`, int, ms since the epoch), the rows `persist` wrote for
//!   that address.
use std::time::Duration;

use mysql_async::prelude::Queryable;
use mysql_async::{Conn, Opts, Row, Value as SqlValue};
use relay_config::plugins::{ColumnType, MysqlConfig, TableConfig, is_identifier};
use serde_json::{Map, Value, json};

use crate::history::HistoryPage;

/// Most rows one page or one series returns.
pub const MAX_ROWS: usize = 5_000;
/// MySQL's "table does not exist".
const NO_SUCH_TABLE: u16 = 1146;
/// The columns a telemetry table needs: the address, and a time (the first of these).
const ADDR_COL: &str = "addr";
const TIME_COLS: [&str; 2] = ["at_ms", "time_ms"];
/// The time's name in the answer, whatever the table calls it.
const TIME_OUT: &str = "at_ms";

/// Why a read failed: the caller's mistake (HTTP 400/404) or MySQL (503).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadError {
    /// Bad input, e.g. a table that is not a telemetry table.
    Bad(String),
    /// MySQL off, down or too slow.
    Unavailable(String),
}

impl std::fmt::Display for ReadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReadError::Bad(m) | ReadError::Unavailable(m) => f.write_str(m),
        }
    }
}

fn value(v: SqlValue) -> Value {
    match v {
        SqlValue::NULL => Value::Null,
        SqlValue::Bytes(b) => Value::String(String::from_utf8_lossy(&b).into_owned()),
        SqlValue::Int(i) => json!(i),
        SqlValue::UInt(u) => json!(u),
        SqlValue::Float(f) => json!(f),
        SqlValue::Double(d) => json!(d),
        other => Value::String(format!("{other:?}")),
    }
}

/// A number from a numeric column (MySQL may send DECIMAL or text).
fn number(v: SqlValue) -> Value {
    match value(v) {
        Value::String(s) => s
            .parse::<f64>()
            .ok()
            .and_then(|f| serde_json::Number::from_f64(f).map(Value::Number))
            .unwrap_or(Value::Null),
        other => other,
    }
}

async fn query(
    cfg: &MysqlConfig,
    sql: String,
    params: Vec<SqlValue>,
) -> Result<Vec<Row>, ReadError> {
    let opts = Opts::from_url(&cfg.url)
        .map_err(|e| ReadError::Unavailable(format!("bad mysql url: {e}")))?;
    let timeout = Duration::from_millis(cfg.connect_timeout_ms + cfg.op_timeout_ms);
    let run = async {
        let mut conn = Conn::new(opts)
            .await
            .map_err(|e| ReadError::Unavailable(e.to_string()))?;
        let rows: Result<Vec<Row>, _> = conn.exec(sql, params).await;
        let _ = conn.disconnect().await;
        match rows {
            Ok(r) => Ok(r),
            Err(mysql_async::Error::Server(s)) if s.code == NO_SUCH_TABLE => Ok(Vec::new()),
            Err(e) => Err(ReadError::Unavailable(e.to_string())),
        }
    };
    tokio::time::timeout(timeout, run)
        .await
        .map_err(|_| ReadError::Unavailable("mysql timed out".into()))?
}

/// Which notifier attempts a page shows.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NotifyFilter {
    /// Only this alarm key.
    pub key: Option<String>,
    /// Only this notifier.
    pub channel: Option<String>,
    /// Only this status (`sent`, `failed`, `rate_limited`, `cancelled`).
    pub status: Option<String>,
}

/// One page of notifier attempts, newest first: rows with `id < before_id`.
pub async fn notifications(
    cfg: &MysqlConfig,
    f: &NotifyFilter,
    limit: usize,
    before_id: Option<u64>,
) -> Result<HistoryPage, ReadError> {
    if !cfg.enabled {
        return Err(ReadError::Unavailable(
            "the notification log needs [mysql] enabled = true".into(),
        ));
    }
    if !is_identifier(&cfg.notify_table) {
        return Err(ReadError::Unavailable(format!(
            "notify_table {:?} is not a plain identifier",
            cfg.notify_table
        )));
    }
    let limit = limit.clamp(1, 1000);
    let mut wh = vec!["id < ?".to_string()];
    let mut params: Vec<SqlValue> = vec![before_id.unwrap_or(u64::MAX).into()];
    for (col, v) in [
        ("alarm_key", &f.key),
        ("channel", &f.channel),
        ("status", &f.status),
    ] {
        if let Some(v) = v {
            wh.push(format!("`{col}` = ?"));
            params.push(v.as_str().into());
        }
    }
    params.push((limit as u64 + 1).into());
    // The table name was checked to be [A-Za-z0-9_] above.
    let sql = format!(
        "SELECT id, at_ms, channel, target, route, event, alarm_key, attempt, status, \
         http_status, error, response FROM `{}` WHERE {} ORDER BY id DESC LIMIT ?",
        cfg.notify_table,
        wh.join(" AND ")
    );
    let rows = query(cfg, sql, params).await?;
    let more = rows.len() > limit;
    let mut items = Vec::with_capacity(limit);
    let mut last_id = None;
    let names = [
        "id",
        "at_ms",
        "channel",
        "target",
        "route",
        "event",
        "key",
        "attempt",
        "status",
        "http_status",
        "error",
        "response",
    ];
    for row in rows.into_iter().take(limit) {
        let mut m = Map::new();
        for (name, v) in names.iter().zip(row.unwrap()) {
            m.insert((*name).into(), value(v));
        }
        last_id = m.get("id").and_then(Value::as_u64);
        items.push(Value::Object(m));
    }
    Ok((items, if more { last_id } else { None }))
}

/// The time column of `t` when it can hold telemetry: an `addr` string column and
/// an `at_ms` (or `time_ms`) int column.
fn time_column(t: &TableConfig) -> Option<&'static str> {
    let has = |n: &str, ok: &dyn Fn(ColumnType) -> bool| {
        t.columns.iter().any(|c| c.name == n && ok(c.kind))
    };
    if !has(ADDR_COL, &|k| {
        matches!(k, ColumnType::String | ColumnType::Text)
    }) {
        return None;
    }
    TIME_COLS
        .into_iter()
        .find(|n| has(n, &|k| k == ColumnType::Int))
}

/// The telemetry of `addr` over time from `table` (the first telemetry table
/// declared when `None`): `{"table", "fields", "items": [{"at_ms", <field>: n...}]}`
/// (`at_ms` whatever the table's time column is called),
/// oldest first, the newest `limit` rows since `since_ms`. `field` keeps one column.
pub async fn device_series(
    cfg: &MysqlConfig,
    addr: &str,
    table: Option<&str>,
    field: Option<&str>,
    since_ms: Option<u64>,
    limit: usize,
) -> Result<Value, ReadError> {
    if !cfg.enabled {
        return Err(ReadError::Unavailable(
            "device history needs [mysql] enabled = true".into(),
        ));
    }
    let t = match table {
        Some(name) => {
            let t =
                cfg.tables.iter().find(|t| t.name == name).ok_or_else(|| {
                    ReadError::Bad(format!("no table {name:?} in [[mysql.tables]]"))
                })?;
            if time_column(t).is_none() {
                return Err(ReadError::Bad(format!(
                    "table {name:?} needs an `addr` string column and an `at_ms` (or `time_ms`) int column"
                )));
            }
            t
        }
        None => cfg
            .tables
            .iter()
            .find(|t| time_column(t).is_some())
            .ok_or_else(|| {
                ReadError::Bad(
                    "no telemetry table: declare a [[mysql.tables]] with an `addr` string column, \
                 an `at_ms` (or `time_ms`) int column and numeric columns, and persist() rows to it"
                        .into(),
                )
            })?,
    };
    let time_col = time_column(t).unwrap_or(TIME_COLS[0]);
    let mut fields: Vec<&str> = t
        .columns
        .iter()
        .filter(|c| {
            !TIME_COLS.contains(&c.name.as_str())
                && matches!(c.kind, ColumnType::Int | ColumnType::Float)
        })
        .map(|c| c.name.as_str())
        .collect();
    if let Some(f) = field {
        if !fields.contains(&f) {
            return Err(ReadError::Bad(format!(
                "table {:?} has no numeric column {f:?} (numeric: {})",
                t.name,
                fields.join(", ")
            )));
        }
        fields = vec![f];
    }
    let limit = limit.clamp(1, MAX_ROWS);
    if !is_identifier(&t.name) || fields.iter().any(|f| !is_identifier(f)) {
        return Err(ReadError::Bad(format!(
            "table {:?}: names must be plain identifiers",
            t.name
        )));
    }
    let cols: Vec<String> = fields.iter().map(|f| format!("`{f}`")).collect();
    let sql = format!(
        "SELECT `{time_col}`{}{} FROM `{}` WHERE `{ADDR_COL}` = ? AND `{time_col}` >= ? \
         ORDER BY `{time_col}` DESC, id DESC LIMIT ?",
        if cols.is_empty() { "" } else { ", " },
        cols.join(", "),
        t.name
    );
    let params: Vec<SqlValue> = vec![
        addr.into(),
        since_ms.unwrap_or(0).into(),
        (limit as u64).into(),
    ];
    let rows = query(cfg, sql, params).await?;
    let mut items: Vec<Value> = rows
        .into_iter()
        .map(|row| {
            let mut vals = row.unwrap().into_iter();
            let mut m = Map::new();
            m.insert(
                TIME_OUT.into(),
                number(vals.next().unwrap_or(SqlValue::NULL)),
            );
            for (f, v) in fields.iter().zip(vals) {
                m.insert((*f).into(), number(v));
            }
            Value::Object(m)
        })
        .collect();
    items.reverse();
    Ok(json!({"addr": addr, "table": t.name, "fields": fields, "items": items}))
}

/// Runs `f` (a query) on a thread of its own with a one-thread runtime and hands
/// the result to `done`.
pub fn in_background<T, F, Fut>(f: F, done: impl FnOnce(Result<T, ReadError>) + Send + 'static)
where
    T: Send + 'static,
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<T, ReadError>>,
{
    let spawned = std::thread::Builder::new()
        .name("relay-records".into())
        .spawn(move || {
            let result = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt.block_on(f()),
                Err(e) => Err(ReadError::Unavailable(format!("query runtime: {e}"))),
            };
            done(result);
        });
    if let Err(e) = spawned {
        tracing::error!("records query thread: {e}");
    }
}
