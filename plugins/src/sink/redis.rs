//! The Redis sink: device shadow, counters, presence, alarms and their timers.
//!
//! Keys (all under `[redis] key_prefix`): `state:<addr>` (hash field → JSON),
//! `counters` (hash key → integer), `presence` (hash addr → JSON), `alarms`
//! (hash key → JSON record), `alarm_watch` (hash key → JSON timer), and
//! `applied:<spool id>` (last write applied, so a replayed write is applied once).
use std::sync::Arc;
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use relay_config::plugins::RedisConfig;
use serde::{Deserialize, Serialize};

use super::{Backend, BackendError};
use crate::shared::Shared;

/// One Redis write, as queued and spooled (keys without the prefix).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum RedisOp {
    /// `HSET key field value`.
    HSet {
        key: String,
        field: String,
        value: String,
    },
    /// `HDEL key field`.
    HDel { key: String, field: String },
    /// `HINCRBY key field n`.
    HIncrBy { key: String, field: String, n: i64 },
    /// `DEL key`.
    Del { key: String },
}

/// What an earlier run left in Redis.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// `alarms` hash.
    pub alarms: Vec<(String, String)>,
    /// `alarm_watch` hash.
    pub watches: Vec<(String, String)>,
    /// `counters` hash.
    pub counters: Vec<(String, i64)>,
    /// `state:*` hashes.
    pub shadows: Vec<(String, Vec<(String, String)>)>,
}

/// Connection state of the Redis sink.
pub struct RedisBackend {
    /// Settings.
    cfg: RedisConfig,
    /// Spool identity, part of the applied-sequence key.
    spool_id: String,
    /// Live connection, if any.
    conn: Option<MultiplexedConnection>,
    /// Set when the state of an earlier run could not be read at start: it is read
    /// (and merged) once Redis is up and the spool replayed.
    pub late_load: Option<(Arc<Shared>, usize)>,
}

impl std::fmt::Debug for RedisBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisBackend")
            .field("url", &self.cfg.url)
            .field("up", &self.conn.is_some())
            .finish()
    }
}

fn classify(e: redis::RedisError) -> BackendError {
    if e.is_io_error()
        || e.is_connection_dropped()
        || e.is_timeout()
        || e.is_connection_refusal()
        || e.is_unrecoverable_error()
    {
        BackendError::Down(e.to_string())
    } else {
        BackendError::Rejected(e.to_string())
    }
}

impl RedisBackend {
    /// A backend for `cfg`; nothing is connected yet.
    pub fn new(cfg: &RedisConfig, spool_id: &str) -> RedisBackend {
        RedisBackend {
            cfg: cfg.clone(),
            spool_id: spool_id.to_string(),
            conn: None,
            late_load: None,
        }
    }

    fn key(&self, k: &str) -> String {
        format!("{}{k}", self.cfg.key_prefix)
    }

    fn op_timeout(&self) -> Duration {
        Duration::from_millis(self.cfg.op_timeout_ms)
    }

    async fn run<T: redis::FromRedisValue>(&mut self, cmd: redis::Cmd) -> Result<T, BackendError> {
        let t = self.op_timeout();
        let conn = self
            .conn
            .as_mut()
            .ok_or_else(|| BackendError::Down("not connected".into()))?;
        match tokio::time::timeout(t, cmd.query_async::<T>(conn)).await {
            Ok(r) => r.map_err(classify),
            Err(_) => Err(BackendError::Down("redis command timed out".into())),
        }
    }

    /// Forgets the presence hash (the connections of an earlier run are gone).
    pub async fn clear_presence(&mut self) -> Result<(), BackendError> {
        self.run::<()>(redis::cmd("DEL").arg(self.key("presence")).clone())
            .await
    }

    /// Reads what an earlier run stored, capping the shadows at `max_addrs` addresses.
    pub async fn load(&mut self, max_addrs: usize) -> Result<Snapshot, BackendError> {
        let mut snap = Snapshot {
            alarms: self
                .run(redis::cmd("HGETALL").arg(self.key("alarms")).clone())
                .await?,
            watches: self
                .run(redis::cmd("HGETALL").arg(self.key("alarm_watch")).clone())
                .await?,
            counters: self
                .run(redis::cmd("HGETALL").arg(self.key("counters")).clone())
                .await?,
            shadows: Vec::new(),
        };
        let prefix = self.key("state:");
        let mut cursor: u64 = 0;
        for _ in 0..1_000_000 {
            let (next, keys): (u64, Vec<String>) = self
                .run(
                    redis::cmd("SCAN")
                        .arg(cursor)
                        .arg("MATCH")
                        .arg(format!("{prefix}*"))
                        .arg("COUNT")
                        .arg(500)
                        .clone(),
                )
                .await?;
            for k in keys {
                if snap.shadows.len() >= max_addrs {
                    break;
                }
                let fields: Vec<(String, String)> =
                    self.run(redis::cmd("HGETALL").arg(&k).clone()).await?;
                snap.shadows.push((k[prefix.len()..].to_string(), fields));
            }
            cursor = next;
            if cursor == 0 || snap.shadows.len() >= max_addrs {
                break;
            }
        }
        Ok(snap)
    }
}

impl Backend for RedisBackend {
    fn name(&self) -> &'static str {
        "redis"
    }

    fn connected(&self) -> bool {
        self.conn.is_some()
    }

    fn disconnect(&mut self) {
        self.conn = None;
    }

    async fn connect(&mut self) -> Result<(), BackendError> {
        let client = redis::Client::open(self.cfg.url.as_str())
            .map_err(|e| BackendError::Down(e.to_string()))?;
        let cfg = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(Duration::from_millis(self.cfg.connect_timeout_ms)))
            .set_response_timeout(Some(self.op_timeout()));
        let connect = client.get_multiplexed_async_connection_with_config(&cfg);
        let conn =
            tokio::time::timeout(Duration::from_millis(self.cfg.connect_timeout_ms), connect)
                .await
                .map_err(|_| BackendError::Down("redis connect timed out".into()))?
                .map_err(|e| BackendError::Down(e.to_string()))?;
        self.conn = Some(conn);
        Ok(())
    }

    async fn applied_upto(&mut self) -> Result<Option<u64>, BackendError> {
        let k = self.key(&format!("applied:{}", self.spool_id));
        self.run(redis::cmd("GET").arg(k).clone()).await
    }

    async fn caught_up(&mut self) {
        let Some((shared, max_addrs)) = self.late_load.take() else {
            return;
        };
        match self.load(max_addrs).await {
            Ok(snap) => {
                tracing::info!("redis is back: state of the earlier run loaded");
                super::restore(&shared, snap);
            }
            Err(e) => {
                tracing::warn!("reading state from redis: {e}; will try again");
                self.late_load = Some((shared, max_addrs));
            }
        }
    }

    async fn apply(&mut self, seq: u64, op: &[u8]) -> Result<(), BackendError> {
        let op: RedisOp = serde_json::from_slice(op)
            .map_err(|e| BackendError::Rejected(format!("bad queued redis write: {e}")))?;
        let mut pipe = redis::pipe();
        pipe.atomic();
        match &op {
            RedisOp::HSet { key, field, value } => pipe.hset(self.key(key), field, value).ignore(),
            RedisOp::HDel { key, field } => pipe.hdel(self.key(key), field).ignore(),
            RedisOp::HIncrBy { key, field, n } => pipe.hincr(self.key(key), field, *n).ignore(),
            RedisOp::Del { key } => pipe.del(self.key(key)).ignore(),
        };
        pipe.set(self.key(&format!("applied:{}", self.spool_id)), seq)
            .ignore();
        let t = self.op_timeout();
        let conn = self
            .conn
            .as_mut()
            .ok_or_else(|| BackendError::Down("not connected".into()))?;
        match tokio::time::timeout(t, pipe.query_async::<()>(conn)).await {
            Ok(r) => r.map_err(classify),
            Err(_) => Err(BackendError::Down("redis write timed out".into())),
        }
    }
}
