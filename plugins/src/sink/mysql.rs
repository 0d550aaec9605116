//! The MySQL/MariaDB sink: rows from `persist`, the alarm history and the notifier
//! attempts. Tables come from config (names and column types from a fixed list),
//! are created when missing, and get any column added to config since; values are
//! always statement parameters, never SQL text.
//!
//! Every table has `id` (insertion order) and `relay_seq` (unique): writes are
//! `INSERT IGNORE`, so a write replayed after a connection cut lands exactly once.
use std::collections::HashMap;
use std::time::Duration;

use mysql_async::prelude::Queryable;
use mysql_async::{Conn, Opts, OptsBuilder, Value as SqlValue};
use relay_config::plugins::{ColumnConfig, ColumnType, MysqlConfig, TableConfig};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{Backend, BackendError};

/// One row to append, as queued and spooled.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MysqlOp {
    /// Declared table.
    pub table: String,
    /// Column → value; columns were checked against the declaration.
    pub row: serde_json::Map<String, Value>,
}

fn col(name: &str, kind: ColumnType) -> ColumnConfig {
    ColumnConfig {
        name: name.into(),
        kind,
    }
}

/// The relay's own tables (alarm history, notifier attempts) with their names from config.
pub fn builtin_tables(cfg: &MysqlConfig) -> Vec<TableConfig> {
    use ColumnType::{Int, String as Str, Text};
    vec![
        TableConfig {
            name: cfg.alarm_table.clone(),
            columns: vec![
                col("at_ms", Int),
                col("alarm_key", Str),
                col("transition", Str),
                col("severity", Str),
                col("text", Text),
                col("acked_by", Str),
            ],
        },
        TableConfig {
            name: cfg.notify_table.clone(),
            columns: vec![
                col("at_ms", Int),
                col("channel", Str),
                col("target", Str),
                col("route", Str),
                col("event", Str),
                col("alarm_key", Str),
                col("attempt", Int),
                col("status", Str),
                col("http_status", Int),
                col("error", Text),
                col("response", Text),
            ],
        },
    ]
}

/// Connection state of the MySQL sink.
pub struct MysqlBackend {
    /// Settings.
    cfg: MysqlConfig,
    /// Every table: declared plus built-in, by name.
    tables: HashMap<String, Vec<ColumnConfig>>,
    /// Live connection, if any.
    conn: Option<Conn>,
}

impl std::fmt::Debug for MysqlBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MysqlBackend")
            .field("up", &self.conn.is_some())
            .finish()
    }
}

/// Server errors worth a retry (the server is busy or going away), by code.
const TRANSIENT: [u16; 8] = [1040, 1053, 1205, 1213, 1317, 1927, 2006, 2013];

fn classify(e: mysql_async::Error) -> BackendError {
    match &e {
        mysql_async::Error::Server(s) if !TRANSIENT.contains(&s.code) => {
            BackendError::Rejected(e.to_string())
        }
        mysql_async::Error::Url(_) => BackendError::Rejected(e.to_string()),
        _ => BackendError::Down(e.to_string()),
    }
}

fn quote(ident: &str) -> String {
    // Identifiers were checked to be [A-Za-z0-9_]; quoting keeps reserved words usable.
    format!("`{ident}`")
}

fn sql_value(kind: ColumnType, v: &Value) -> SqlValue {
    match (kind, v) {
        (_, Value::Null) => SqlValue::NULL,
        (ColumnType::Int, Value::Number(n)) => {
            n.as_i64().map(SqlValue::Int).unwrap_or(SqlValue::NULL)
        }
        (ColumnType::Float, Value::Number(n)) => {
            n.as_f64().map(SqlValue::Double).unwrap_or(SqlValue::NULL)
        }
        (ColumnType::Bool, Value::Bool(b)) => SqlValue::Int(i64::from(*b)),
        (ColumnType::String | ColumnType::Text, Value::String(s)) => {
            SqlValue::Bytes(s.clone().into_bytes())
        }
        (ColumnType::String | ColumnType::Text, other) => {
            SqlValue::Bytes(other.to_string().into_bytes())
        }
        (ColumnType::Json, other) => SqlValue::Bytes(other.to_string().into_bytes()),
        (_, other) => SqlValue::Bytes(other.to_string().into_bytes()),
    }
}

impl MysqlBackend {
    /// A backend for `cfg`; nothing is connected yet.
    pub fn new(cfg: &MysqlConfig) -> MysqlBackend {
        let mut tables = HashMap::new();
        for t in cfg.tables.iter().cloned().chain(builtin_tables(cfg)) {
            tables.insert(t.name, t.columns);
        }
        MysqlBackend {
            cfg: cfg.clone(),
            tables,
            conn: None,
        }
    }

    async fn timed<T>(
        &self,
        f: impl Future<Output = mysql_async::Result<T>>,
    ) -> Result<T, BackendError> {
        match tokio::time::timeout(Duration::from_millis(self.cfg.op_timeout_ms), f).await {
            Ok(r) => r.map_err(classify),
            Err(_) => Err(BackendError::Down("mysql statement timed out".into())),
        }
    }

    /// Creates missing tables and adds columns declared since a table was made.
    async fn ensure_tables(&mut self) -> Result<(), BackendError> {
        let mut conn = self
            .conn
            .take()
            .ok_or_else(|| BackendError::Down("not connected".into()))?;
        let result = self.ensure_tables_on(&mut conn).await;
        self.conn = Some(conn);
        result
    }

    async fn ensure_tables_on(&self, conn: &mut Conn) -> Result<(), BackendError> {
        let mut names: Vec<&String> = self.tables.keys().collect();
        names.sort();
        for name in names {
            let cols = &self.tables[name];
            let mut ddl = format!(
                "CREATE TABLE IF NOT EXISTS {} (`id` BIGINT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY, \
                 `relay_seq` BIGINT UNSIGNED NOT NULL UNIQUE",
                quote(name)
            );
            for c in cols {
                ddl.push_str(&format!(", {} {}", quote(&c.name), c.kind.sql()));
            }
            ddl.push_str(") CHARACTER SET utf8mb4");
            self.timed(conn.query_drop(ddl)).await?;
            let existing: Vec<String> = self
                .timed(conn.exec(
                    "SELECT COLUMN_NAME FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = ?",
                    (name.as_str(),),
                ))
                .await?;
            for c in cols {
                if !existing.iter().any(|e| e.eq_ignore_ascii_case(&c.name)) {
                    let alter = format!(
                        "ALTER TABLE {} ADD COLUMN {} {}",
                        quote(name),
                        quote(&c.name),
                        c.kind.sql()
                    );
                    self.timed(conn.query_drop(alter)).await?;
                    tracing::info!(table = %name, column = %c.name, "added column declared in config");
                }
            }
        }
        Ok(())
    }
}

/// `ER_BAD_DB_ERROR`: the database named in the URL does not exist.
const UNKNOWN_DATABASE: u16 = 1049;

impl MysqlBackend {
    /// One connection attempt within `connect_timeout_ms`.
    async fn open(&self, opts: OptsBuilder) -> mysql_async::Result<Conn> {
        match tokio::time::timeout(
            Duration::from_millis(self.cfg.connect_timeout_ms),
            Conn::new(opts),
        )
        .await
        {
            Ok(r) => r,
            Err(_) => Err(mysql_async::Error::Io(mysql_async::IoError::Io(
                std::io::Error::new(std::io::ErrorKind::TimedOut, "mysql connect timed out"),
            ))),
        }
    }

    /// Creates the database named in the URL (`utf8mb4`), connected without one.
    async fn create_database(&self, opts: OptsBuilder) -> Result<(), BackendError> {
        let db = Opts::from(opts.clone())
            .db_name()
            .unwrap_or_default()
            .to_string();
        if !relay_config::plugins::is_identifier(&db) {
            return Err(BackendError::Down(format!(
                "mysql database `{db}` does not exist, and its name is not letters, digits and _: create it yourself"
            )));
        }
        let mut conn = self
            .open(opts.db_name(None::<String>))
            .await
            .map_err(|e| BackendError::Down(e.to_string()))?;
        let made = self
            .timed(conn.query_drop(format!(
                "CREATE DATABASE IF NOT EXISTS {} CHARACTER SET utf8mb4",
                quote(&db)
            )))
            .await;
        let _ = conn.disconnect().await;
        match made {
            Ok(()) => {
                tracing::info!(database = %db, "mysql database did not exist; created it");
                Ok(())
            }
            Err(e) => Err(BackendError::Down(format!(
                "mysql database `{db}` does not exist and could not be created ({e}); create it, or grant CREATE to the relay's user"
            ))),
        }
    }
}

impl Backend for MysqlBackend {
    fn name(&self) -> &'static str {
        "mysql"
    }

    fn connected(&self) -> bool {
        self.conn.is_some()
    }

    fn disconnect(&mut self) {
        // Dropping the connection closes it; nothing waits on the server.
        self.conn = None;
    }

    async fn connect(&mut self) -> Result<(), BackendError> {
        let opts = Opts::from_url(&self.cfg.url)
            .map_err(|e| BackendError::Down(format!("bad mysql url: {e}")))?;
        let opts = OptsBuilder::from_opts(opts)
            .tcp_keepalive(Some(Duration::from_secs(30)))
            .prefer_socket(false);
        let conn = match self.open(opts.clone()).await {
            Err(mysql_async::Error::Server(e)) if e.code == UNKNOWN_DATABASE => {
                // The database of the URL does not exist yet: create it, then connect.
                self.create_database(opts.clone()).await?;
                self.open(opts).await
            }
            other => other,
        }
        .map_err(|e| BackendError::Down(e.to_string()))?;
        self.conn = Some(conn);
        if let Err(e) = self.ensure_tables().await {
            self.conn = None;
            // A table that cannot be created is a configuration problem; retrying later
            // is still the right move (the operator may fix grants meanwhile).
            return Err(BackendError::Down(format!("creating tables: {e}")));
        }
        Ok(())
    }

    async fn applied_upto(&mut self) -> Result<Option<u64>, BackendError> {
        // Each row carries its relay_seq; INSERT IGNORE makes replays exactly-once.
        Ok(None)
    }

    async fn apply(&mut self, seq: u64, op: &[u8]) -> Result<(), BackendError> {
        let op: MysqlOp = serde_json::from_slice(op)
            .map_err(|e| BackendError::Rejected(format!("bad queued mysql write: {e}")))?;
        let Some(cols) = self.tables.get(&op.table) else {
            return Err(BackendError::Rejected(format!(
                "table `{}` is no longer declared",
                op.table
            )));
        };
        let mut names = vec!["`relay_seq`".to_string()];
        let mut params = vec![SqlValue::UInt(seq)];
        for (k, v) in &op.row {
            match cols.iter().find(|c| &c.name == k) {
                Some(c) => {
                    names.push(quote(&c.name));
                    params.push(sql_value(c.kind, v));
                }
                None => {
                    tracing::warn!(table = %op.table, column = %k, "column no longer declared; value dropped")
                }
            }
        }
        let marks = vec!["?"; names.len()].join(", ");
        let sql = format!(
            "INSERT IGNORE INTO {} ({}) VALUES ({marks})",
            quote(&op.table),
            names.join(", ")
        );
        let t = Duration::from_millis(self.cfg.op_timeout_ms);
        let conn = self
            .conn
            .as_mut()
            .ok_or_else(|| BackendError::Down("not connected".into()))?;
        match tokio::time::timeout(t, conn.exec_drop(sql, params)).await {
            Ok(r) => r.map_err(classify),
            Err(_) => Err(BackendError::Down("mysql insert timed out".into())),
        }
    }
}
