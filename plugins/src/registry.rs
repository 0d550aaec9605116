//! The device registry: every address ever seen, with first and last seen, the
//! last disconnect reason, meta, groups and whether it is online.
//!
//! The script workers update it from the connect, disconnect and message events
//! they take off their queues (never on a shard's thread). It lives in memory,
//! bounded by `[plugins] registry_max_devices` (past it the offline device seen
//! longest ago is forgotten) and `registry_retention_days` (offline devices not
//! seen for that long are forgotten). A flusher thread writes the changes to Redis
//! every `registry_flush_ms`, in one pipeline: the hash `<prefix>devices`
//! (address → JSON record) and the sorted set `<prefix>devices:seen` (address by
//! last seen, ms). At start the flusher reads both back, so the registry survives
//! a restart; devices that were online when the relay stopped come back offline.
use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use relay_config::plugins::{PluginsConfig, RedisConfig};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::event::ClientInfo;

/// A message refreshes `last_seen_ms` at most this often per device.
const SEEN_GRANULARITY_MS: u64 = 1_000;
/// Reason recorded for a device that was online when the relay stopped without
/// seeing it go.
pub const RESTART_REASON: &str = "relay_restart";
/// Addresses read or written per Redis round trip.
const CHUNK: usize = 1_000;

/// One device as the registry keeps it (and as `GET /api/v1/devices` shows it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Device {
    /// Its address.
    pub addr: String,
    /// Role given in its last HELLO.
    #[serde(default)]
    pub role: String,
    /// Connected now.
    #[serde(default)]
    pub online: bool,
    /// First connect ever recorded, ms since the Unix epoch.
    pub first_seen_ms: u64,
    /// Last connect, disconnect or message, ms since the Unix epoch.
    pub last_seen_ms: u64,
    /// Last connect, ms since the Unix epoch.
    #[serde(default)]
    pub last_connect_ms: Option<u64>,
    /// Last disconnect, ms since the Unix epoch.
    #[serde(default)]
    pub last_disconnect_ms: Option<u64>,
    /// Why it last went offline (`bye`, `idle_timeout`, `replaced`, `error`,
    /// `kicked`, `shutdown`, `relay_restart`).
    #[serde(default)]
    pub last_disconnect_reason: Option<String>,
    /// The `meta` object of its last HELLO.
    #[serde(default)]
    pub meta: Value,
    /// Groups it was a member of when it last disconnected.
    #[serde(default)]
    pub groups: Vec<String>,
    /// Remote socket address of its last connection.
    #[serde(default)]
    pub remote: String,
    /// Connects recorded.
    #[serde(default)]
    pub connects: u64,
}

/// Which devices a listing shows.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceQuery {
    /// `Some(true)`: online only; `Some(false)`: offline only.
    pub online: Option<bool>,
    /// Addresses starting with this.
    pub prefix: String,
    /// Members of this group: as recorded at their last disconnect, or in
    /// `members` (the group's online members now).
    pub group: Option<String>,
    /// With `group`: the addresses in the group now.
    pub members: Option<HashSet<String>>,
    /// Of this role (as given in the last HELLO).
    pub role: Option<String>,
    /// Devices skipped (page start).
    pub offset: usize,
    /// Most devices returned.
    pub limit: usize,
}

/// Counts over the whole registry, whatever the filter.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Totals {
    /// Devices known.
    pub devices: usize,
    /// Online now.
    pub online: usize,
    /// Offline now.
    pub offline: usize,
}

/// One page of devices, newest last seen first.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DevicePage {
    /// The devices of the page.
    pub items: Vec<Device>,
    /// Devices matching the filter (all pages).
    pub total: usize,
    /// Page start.
    pub offset: usize,
    /// Page size asked for.
    pub limit: usize,
    /// Offset of the next page, none on the last page.
    pub next: Option<usize>,
    /// Counts over the whole registry (over the devices of `role` when the query
    /// names one), whatever the status, prefix, group and page.
    pub totals: Totals,
}

/// Sort key: newest last seen first, then by address.
type Order = (u64, String);

fn order(d: &Device) -> Order {
    (u64::MAX - d.last_seen_ms, d.addr.clone())
}

#[derive(Debug, Default)]
struct Inner {
    devices: HashMap<String, Device>,
    /// Every device, by [`order`].
    by_seen: BTreeSet<Order>,
    /// Offline devices by last seen, oldest first (eviction and retention).
    offline: BTreeSet<(u64, String)>,
    online: usize,
    /// Changed since the last flush.
    dirty: HashSet<String>,
    /// Forgotten since the last flush.
    gone: HashSet<String>,
}

impl Inner {
    fn unlink(&mut self, d: &Device) {
        self.by_seen.remove(&order(d));
        if d.online {
            self.online -= 1;
        } else {
            self.offline.remove(&(d.last_seen_ms, d.addr.clone()));
        }
    }

    fn link(&mut self, d: &Device) {
        self.by_seen.insert(order(d));
        if d.online {
            self.online += 1;
        } else {
            self.offline.insert((d.last_seen_ms, d.addr.clone()));
        }
    }

    /// Applies `f` to the device `addr` (inserted by `new` when unknown and there
    /// is room), keeping the indexes right. `false`: unknown and no room.
    fn update(
        &mut self,
        max: usize,
        addr: &str,
        new: impl FnOnce() -> Device,
        f: impl FnOnce(&mut Device),
    ) -> bool {
        let mut d = match self.devices.remove(addr) {
            Some(d) => {
                self.unlink(&d);
                d
            }
            None => {
                if self.devices.len() >= max && !self.evict_one() {
                    return false;
                }
                new()
            }
        };
        f(&mut d);
        self.link(&d);
        self.dirty.insert(addr.to_string());
        self.gone.remove(addr);
        self.devices.insert(addr.to_string(), d);
        true
    }

    /// Forgets the offline device seen longest ago; `false` when every device is online.
    fn evict_one(&mut self) -> bool {
        let Some((_, addr)) = self.offline.first().cloned() else {
            return false;
        };
        self.forget(&addr);
        true
    }

    fn forget(&mut self, addr: &str) {
        if let Some(d) = self.devices.remove(addr) {
            self.unlink(&d);
            self.dirty.remove(addr);
            self.gone.insert(addr.to_string());
        }
    }

    fn totals(&self) -> Totals {
        Totals {
            devices: self.devices.len(),
            online: self.online,
            offline: self.devices.len() - self.online,
        }
    }
}

/// The registry shared by the workers, the flusher and the API.
#[derive(Debug)]
pub struct Registry {
    inner: Mutex<Inner>,
    /// `registry_max_devices`.
    max: usize,
    /// `registry_retention_days` in ms (0: none).
    retention_ms: u64,
    /// New devices refused because every known device is online and the cap is reached.
    pub refused: AtomicU64,
    /// Devices forgotten by the cap or the retention.
    pub forgotten: AtomicU64,
    /// The state of an earlier run was read from Redis (or there is no Redis).
    pub loaded: AtomicBool,
}

fn blank(addr: &str, t: u64) -> Device {
    Device {
        addr: addr.to_string(),
        role: String::new(),
        online: false,
        first_seen_ms: t,
        last_seen_ms: t,
        last_connect_ms: None,
        last_disconnect_ms: None,
        last_disconnect_reason: None,
        meta: Value::Object(Default::default()),
        groups: Vec::new(),
        remote: String::new(),
        connects: 0,
    }
}

impl Registry {
    /// An empty registry with the bounds of `cfg`.
    pub fn new(cfg: &PluginsConfig) -> Registry {
        Registry {
            inner: Mutex::default(),
            max: cfg.registry_max_devices.max(1),
            retention_ms: cfg.registry_retention_days.saturating_mul(86_400_000),
            refused: AtomicU64::new(0),
            forgotten: AtomicU64::new(0),
            loaded: AtomicBool::new(false),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn note(&self, inserted: bool, before: usize, after: usize) {
        if !inserted {
            self.refused.fetch_add(1, Ordering::Relaxed);
        } else if after <= before {
            // A new device pushed an old one out.
            self.forgotten.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// `c` came online.
    pub fn connected(&self, c: &ClientInfo) {
        let mut g = self.lock();
        let before = g.devices.len();
        let known = g.devices.contains_key(&c.addr);
        let ok = g.update(
            self.max,
            &c.addr,
            || blank(&c.addr, c.time_ms),
            |d| {
                d.online = true;
                d.role = c.role.clone();
                d.meta = c.meta.clone();
                d.remote = c.remote.clone();
                d.last_seen_ms = d.last_seen_ms.max(c.time_ms);
                d.first_seen_ms = d.first_seen_ms.min(c.time_ms);
                d.last_connect_ms = Some(c.time_ms);
                d.connects += 1;
            },
        );
        let after = g.devices.len();
        drop(g);
        if !known {
            self.note(ok, before, after);
        }
    }

    /// `c` went offline for `reason`.
    pub fn disconnected(&self, c: &ClientInfo, reason: &str) {
        let mut g = self.lock();
        let before = g.devices.len();
        let known = g.devices.contains_key(&c.addr);
        let ok = g.update(
            self.max,
            &c.addr,
            || blank(&c.addr, c.time_ms),
            |d| {
                // The close of a replaced connection trails the new one's connect.
                if d.online
                    && (reason == "replaced" || d.last_connect_ms.is_some_and(|t| t > c.time_ms))
                {
                    return;
                }
                d.online = false;
                if d.role.is_empty() {
                    d.role = c.role.clone();
                    d.meta = c.meta.clone();
                    d.remote = c.remote.clone();
                }
                d.last_seen_ms = d.last_seen_ms.max(c.time_ms);
                d.last_disconnect_ms = Some(c.time_ms);
                d.last_disconnect_reason = Some(reason.to_string());
                d.groups = c.groups.clone();
            },
        );
        let after = g.devices.len();
        drop(g);
        if !known {
            self.note(ok, before, after);
        }
    }

    /// `addr` sent a message at `t`: refreshes its last seen (at most once a second).
    pub fn seen(&self, addr: &str, t: u64) {
        let mut g = self.lock();
        let stale = g
            .devices
            .get(addr)
            .is_some_and(|d| t >= d.last_seen_ms + SEEN_GRANULARITY_MS);
        if stale {
            g.update(self.max, addr, || blank(addr, t), |d| d.last_seen_ms = t);
        }
    }

    /// Forgets offline devices not seen since `now_ms - retention`; returns how many.
    pub fn purge(&self, now_ms: u64) -> usize {
        if self.retention_ms == 0 {
            return 0;
        }
        let cut = now_ms.saturating_sub(self.retention_ms);
        let mut g = self.lock();
        let old: Vec<String> = g
            .offline
            .iter()
            .take_while(|(t, _)| *t < cut)
            .map(|(_, a)| a.clone())
            .collect();
        for a in &old {
            g.forget(a);
        }
        drop(g);
        self.forgotten
            .fetch_add(old.len() as u64, Ordering::Relaxed);
        old.len()
    }

    /// Counts over the whole registry.
    pub fn totals(&self) -> Totals {
        self.lock().totals()
    }

    /// One device.
    pub fn get(&self, addr: &str) -> Option<Device> {
        self.lock().devices.get(addr).cloned()
    }

    /// One page of the devices matching `q`, newest last seen first.
    pub fn page(&self, q: &DeviceQuery) -> DevicePage {
        let limit = q.limit.clamp(1, 1_000);
        let g = self.lock();
        let mut items = Vec::with_capacity(limit.min(g.devices.len()));
        let mut total = 0usize;
        let filtered = !q.prefix.is_empty() || q.group.is_some() || q.role.is_some();
        let fast_total = match q.online {
            _ if filtered => None,
            None => Some(g.devices.len()),
            Some(true) => Some(g.online),
            Some(false) => Some(g.devices.len() - g.online),
        };
        let mut role_totals = Totals::default();
        for (_, addr) in &g.by_seen {
            let Some(d) = g.devices.get(addr) else {
                continue;
            };
            if q.role.as_ref().is_some_and(|r| *r == d.role) {
                role_totals.devices += 1;
                if d.online {
                    role_totals.online += 1;
                } else {
                    role_totals.offline += 1;
                }
            }
            if q.online.is_some_and(|o| o != d.online)
                || !d.addr.starts_with(&q.prefix)
                || q.group.as_ref().is_some_and(|gr| {
                    !d.groups.contains(gr)
                        && !q.members.as_ref().is_some_and(|m| m.contains(&d.addr))
                })
                || q.role.as_ref().is_some_and(|r| *r != d.role)
            {
                continue;
            }
            if total >= q.offset && items.len() < limit {
                items.push(d.clone());
            }
            total += 1;
            if fast_total.is_some() && items.len() >= limit {
                break;
            }
        }
        let total = fast_total.unwrap_or(total);
        let end = q.offset.saturating_add(items.len());
        DevicePage {
            next: (end < total && !items.is_empty()).then_some(end),
            items,
            total,
            offset: q.offset,
            limit,
            totals: if q.role.is_some() {
                role_totals
            } else {
                g.totals()
            },
        }
    }

    /// Merges what an earlier run stored: devices not known yet come in offline
    /// (`relay_restart` when they were online), known ones keep their newer state
    /// and the older first seen. Returns how many were added.
    pub fn merge_stored(&self, stored: Vec<Device>) -> usize {
        let mut g = self.lock();
        let mut added = 0;
        for mut s in stored {
            if s.addr.is_empty() {
                continue;
            }
            if s.online {
                s.online = false;
                s.last_disconnect_reason = Some(RESTART_REASON.into());
            }
            if let Some(d) = g.devices.get(&s.addr) {
                let first = d.first_seen_ms.min(s.first_seen_ms);
                let keep_reason = d.last_disconnect_reason.is_none();
                let keep_groups = d.groups.is_empty();
                let connects = d.connects + s.connects;
                let addr = s.addr.clone();
                g.update(
                    self.max,
                    &addr,
                    || s.clone(),
                    |d| {
                        d.first_seen_ms = first;
                        d.connects = connects;
                        if keep_reason {
                            d.last_disconnect_reason = s.last_disconnect_reason.clone();
                            d.last_disconnect_ms = s.last_disconnect_ms;
                        }
                        if keep_groups {
                            d.groups = s.groups.clone();
                        }
                    },
                );
            } else if g.devices.len() < self.max {
                let addr = s.addr.clone();
                g.link(&s);
                g.devices.insert(addr, s);
                added += 1;
            }
        }
        added
    }

    /// Takes the changes since the last flush: records to write, addresses to delete.
    fn take_changes(&self) -> (Vec<Device>, Vec<String>) {
        let mut g = self.lock();
        let dirty = std::mem::take(&mut g.dirty);
        let gone: Vec<String> = std::mem::take(&mut g.gone).into_iter().collect();
        let put = dirty
            .iter()
            .filter_map(|a| g.devices.get(a).cloned())
            .collect();
        (put, gone)
    }

    /// Gives back changes a failed flush did not write (unless changed since).
    fn give_back(&self, put: Vec<Device>, gone: Vec<String>) {
        let mut g = self.lock();
        for d in put {
            if g.devices.contains_key(&d.addr) {
                g.dirty.insert(d.addr);
            }
        }
        for a in gone {
            if !g.devices.contains_key(&a) {
                g.gone.insert(a);
            }
        }
    }
}

/// Redis side of the registry: a synchronous connection on the flusher thread.
struct Store {
    cfg: RedisConfig,
    conn: Option<redis::Connection>,
}

impl Store {
    fn key(&self, k: &str) -> String {
        format!("{}{k}", self.cfg.key_prefix)
    }

    fn conn(&mut self) -> redis::RedisResult<&mut redis::Connection> {
        if self.conn.is_none() {
            let client = redis::Client::open(self.cfg.url.as_str())?;
            let c = client
                .get_connection_with_timeout(Duration::from_millis(self.cfg.connect_timeout_ms))?;
            let t = Some(Duration::from_millis(self.cfg.op_timeout_ms));
            c.set_read_timeout(t)?;
            c.set_write_timeout(t)?;
            self.conn = Some(c);
        }
        Ok(self.conn.as_mut().expect("connected above"))
    }

    /// Reads the newest `max` devices an earlier run stored and deletes the rest.
    fn load(&mut self, max: usize) -> redis::RedisResult<Vec<Device>> {
        let (hash, zset) = (self.key("devices"), self.key("devices:seen"));
        let c = self.conn()?;
        let addrs: Vec<String> = redis::cmd("ZREVRANGE")
            .arg(&zset)
            .arg(0)
            .arg(max as i64 - 1)
            .query(c)?;
        let mut out = Vec::with_capacity(addrs.len());
        for chunk in addrs.chunks(CHUNK) {
            let vals: Vec<Option<String>> = redis::cmd("HMGET").arg(&hash).arg(chunk).query(c)?;
            for (a, v) in chunk.iter().zip(vals) {
                match v.map(|v| serde_json::from_str::<Device>(&v)) {
                    Some(Ok(d)) if d.addr == *a => out.push(d),
                    Some(Ok(_)) | Some(Err(_)) => {
                        tracing::warn!(addr = %a, "device registry: unreadable record in redis; skipped")
                    }
                    None => {}
                }
            }
        }
        // Past the cap (a smaller registry_max_devices than before): forget the oldest.
        let extra: Vec<String> = redis::cmd("ZRANGE")
            .arg(&zset)
            .arg(0)
            .arg(-(max as i64) - 1)
            .query(c)?;
        for chunk in extra.chunks(CHUNK) {
            redis::pipe()
                .hdel(&hash, chunk)
                .ignore()
                .zrem(&zset, chunk)
                .ignore()
                .query::<()>(c)?;
        }
        Ok(out)
    }

    fn write(&mut self, put: &[Device], gone: &[String]) -> redis::RedisResult<()> {
        let (hash, zset) = (self.key("devices"), self.key("devices:seen"));
        let c = self.conn()?;
        for chunk in put.chunks(CHUNK) {
            let mut p = redis::pipe();
            for d in chunk {
                let json = serde_json::to_string(d).unwrap_or_default();
                p.hset(&hash, &d.addr, json).ignore();
                p.zadd(&zset, &d.addr, d.last_seen_ms).ignore();
            }
            p.query::<()>(c)?;
        }
        for chunk in gone.chunks(CHUNK) {
            redis::pipe()
                .hdel(&hash, chunk)
                .ignore()
                .zrem(&zset, chunk)
                .ignore()
                .query::<()>(c)?;
        }
        Ok(())
    }
}

/// The flusher thread: loads the earlier run's registry, then writes changes in
/// batches and applies the retention.
#[derive(Debug)]
pub struct Flusher {
    handle: Option<JoinHandle<()>>,
    stop: Arc<AtomicBool>,
}

impl Flusher {
    /// Starts the flusher. With Redis on, waits for the earlier run's registry (at
    /// most `connect_timeout_ms` + 4 × `op_timeout_ms`), so the API lists it from the
    /// start; if Redis is down (or slower) it is merged in once read.
    pub fn start(
        registry: Arc<Registry>,
        plugins: &PluginsConfig,
        redis: &RedisConfig,
    ) -> std::io::Result<Flusher> {
        let stop = Arc::new(AtomicBool::new(false));
        let period = Duration::from_millis(plugins.registry_flush_ms.max(10));
        let mut store = redis.enabled.then(|| Store {
            cfg: redis.clone(),
            conn: None,
        });
        if store.is_none() {
            registry.loaded.store(true, Ordering::Release);
        }
        let retry = Duration::from_millis(redis.retry_ms.max(10));
        let (first_tx, first_rx) = crossbeam_channel::bounded::<()>(1);
        let s = stop.clone();
        let handle = std::thread::Builder::new()
            .name("relay-registry".into())
            .spawn(move || {
                let mut next_try = Instant::now();
                let mut first = Some(first_tx);
                let mut logged_down = false;
                loop {
                    let stopping = s.load(Ordering::Acquire);
                    if let Some(st) = store.as_mut()
                        && Instant::now() >= next_try
                    {
                        let r = flush_once(&registry, st);
                        first.take();
                        match r {
                            Ok(()) => logged_down = false,
                            Err(e) => {
                                st.conn = None;
                                next_try = Instant::now() + retry;
                                if !logged_down {
                                    tracing::warn!("device registry: redis: {e}; will retry");
                                    logged_down = true;
                                }
                            }
                        }
                    } else if store.is_none() {
                        registry.purge(crate::clock::now_ms());
                        registry.take_changes();
                    }
                    if stopping {
                        return;
                    }
                    let until = Instant::now() + period;
                    while Instant::now() < until && !s.load(Ordering::Acquire) {
                        std::thread::sleep(Duration::from_millis(10).min(period));
                    }
                }
            })?;
        if redis.enabled {
            let wait = Duration::from_millis(redis.connect_timeout_ms + redis.op_timeout_ms * 4);
            let _ = first_rx.recv_timeout(wait);
        }
        Ok(Flusher {
            handle: Some(handle),
            stop,
        })
    }

    /// Writes the last changes and stops (bounded).
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(h) = self.handle.take() {
            let until = Instant::now() + Duration::from_secs(10);
            while !h.is_finished() && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(5));
            }
            if h.is_finished() {
                let _ = h.join();
            } else {
                tracing::error!("device registry flusher did not stop within 10 s; left running");
            }
        }
    }
}

impl Drop for Flusher {
    fn drop(&mut self) {
        self.stop();
    }
}

fn flush_once(registry: &Registry, st: &mut Store) -> redis::RedisResult<()> {
    if !registry.loaded.load(Ordering::Acquire) {
        let stored = st.load(registry.max)?;
        let n = registry.merge_stored(stored);
        registry.loaded.store(true, Ordering::Release);
        tracing::info!(
            devices = n,
            "device registry: earlier devices loaded from redis"
        );
    }
    registry.purge(crate::clock::now_ms());
    let (put, gone) = registry.take_changes();
    if put.is_empty() && gone.is_empty() {
        return Ok(());
    }
    if let Err(e) = st.write(&put, &gone) {
        registry.give_back(put, gone);
        return Err(e);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(max: usize, days: u64) -> PluginsConfig {
        PluginsConfig {
            registry_max_devices: max,
            registry_retention_days: days,
            ..PluginsConfig::default()
        }
    }

    fn info(addr: &str, t: u64, groups: &[&str]) -> ClientInfo {
        ClientInfo {
            addr: addr.into(),
            role: "controller".into(),
            meta: serde_json::json!({"site": 3}),
            remote: "127.0.0.1:9".into(),
            shard: 0,
            time_ms: t,
            groups: groups.iter().map(|g| g.to_string()).collect(),
        }
    }

    fn q(online: Option<bool>) -> DeviceQuery {
        DeviceQuery {
            online,
            limit: 100,
            ..DeviceQuery::default()
        }
    }

    #[test]
    fn connect_disconnect_and_messages_keep_first_last_seen_and_reason() {
        let r = Registry::new(&cfg(10, 0));
        r.connected(&info("a", 1_000, &[]));
        r.seen("a", 1_500); // within a second: not recorded
        assert_eq!(r.get("a").unwrap().last_seen_ms, 1_000);
        r.seen("a", 2_500);
        assert_eq!(r.get("a").unwrap().last_seen_ms, 2_500);
        r.disconnected(&info("a", 3_000, &["site-3"]), "idle_timeout");
        let d = r.get("a").unwrap();
        assert!(!d.online);
        assert_eq!(d.first_seen_ms, 1_000);
        assert_eq!(d.last_seen_ms, 3_000);
        assert_eq!(d.last_disconnect_reason.as_deref(), Some("idle_timeout"));
        assert_eq!(d.groups, vec!["site-3".to_string()]);
        r.connected(&info("a", 4_000, &[]));
        let d = r.get("a").unwrap();
        assert!(d.online && d.connects == 2 && d.first_seen_ms == 1_000);
        assert_eq!(
            d.groups,
            vec!["site-3".to_string()],
            "kept until the next disconnect"
        );
    }

    #[test]
    fn the_cap_forgets_the_offline_device_seen_longest_ago_and_never_an_online_one() {
        let r = Registry::new(&cfg(3, 0));
        r.connected(&info("on", 1, &[]));
        r.connected(&info("old", 2, &[]));
        r.disconnected(&info("old", 3, &[]), "bye");
        r.connected(&info("mid", 4, &[]));
        r.disconnected(&info("mid", 5, &[]), "bye");
        r.connected(&info("new", 6, &[]));
        assert!(r.get("old").is_none(), "oldest offline forgotten");
        assert!(r.get("on").is_some() && r.get("mid").is_some());
        r.connected(&info("mid", 7, &[]));
        // All three online now: a fourth is refused, nothing online is dropped.
        r.connected(&info("extra", 8, &[]));
        assert!(r.get("extra").is_none());
        assert_eq!(r.refused.load(Ordering::Relaxed), 1);
        assert_eq!(r.totals().online, 3);
    }

    #[test]
    fn retention_forgets_offline_devices_not_seen_for_the_configured_days() {
        let day = 86_400_000;
        let r = Registry::new(&cfg(10, 2));
        r.connected(&info("stale", day, &[]));
        r.disconnected(&info("stale", day, &[]), "bye");
        r.connected(&info("online-old", day, &[]));
        r.connected(&info("recent", 3 * day, &[]));
        r.disconnected(&info("recent", 3 * day, &[]), "bye");
        assert_eq!(r.purge(4 * day), 1);
        assert!(r.get("stale").is_none());
        assert!(r.get("online-old").is_some(), "online devices are kept");
        assert!(r.get("recent").is_some());
    }

    #[test]
    fn pages_are_sorted_by_last_seen_and_totals_ignore_the_page_and_the_filter() {
        let r = Registry::new(&cfg(100, 0));
        for i in 0..10u64 {
            let a = format!("ctl-{i}");
            r.connected(&info(&a, 1_000 + i, &[]));
            if i % 2 == 0 {
                r.disconnected(
                    &info(&a, 2_000 + i, &[if i < 5 { "g1" } else { "g2" }]),
                    "bye",
                );
            }
        }
        r.connected(&info("web-1", 5_000, &[]));
        let p = r.page(&DeviceQuery {
            limit: 3,
            ..q(None)
        });
        assert_eq!(p.total, 11);
        assert_eq!(p.items[0].addr, "web-1");
        assert_eq!(p.items[1].addr, "ctl-8", "newest last seen first");
        assert_eq!(p.next, Some(3));
        assert_eq!(
            p.totals,
            Totals {
                devices: 11,
                online: 6,
                offline: 5
            }
        );
        let off = r.page(&DeviceQuery {
            offset: 4,
            limit: 3,
            ..q(Some(false))
        });
        assert_eq!(off.total, 5);
        assert_eq!(off.items.len(), 1);
        assert_eq!(off.items[0].addr, "ctl-0");
        assert_eq!(off.next, None);
        let g = r.page(&DeviceQuery {
            group: Some("g1".into()),
            ..q(None)
        });
        let addrs: Vec<&str> = g.items.iter().map(|d| d.addr.as_str()).collect();
        assert_eq!(addrs, ["ctl-4", "ctl-2", "ctl-0"]);
        assert_eq!(g.total, 3);
        // Online members now count too.
        let now = r.page(&DeviceQuery {
            group: Some("g1".into()),
            members: Some(["web-1".to_string()].into()),
            ..q(None)
        });
        assert_eq!(now.total, 4);
        assert_eq!(now.items[0].addr, "web-1");
        assert_eq!(g.totals.devices, 11);
        let pre = r.page(&DeviceQuery {
            prefix: "web".into(),
            online: Some(true),
            ..q(None)
        });
        assert_eq!(pre.total, 1);
        let role = r.page(&DeviceQuery {
            role: Some("browser".into()),
            ..q(None)
        });
        assert_eq!(role.total, 0);
        assert_eq!(
            role.totals,
            Totals::default(),
            "totals of the role asked for"
        );
        let ctl = r.page(&DeviceQuery {
            role: Some("controller".into()),
            online: Some(false),
            ..q(None)
        });
        assert_eq!(ctl.total, 5);
        assert_eq!(
            ctl.totals,
            Totals {
                devices: 11,
                online: 6,
                offline: 5
            }
        );
    }

    #[test]
    fn stored_devices_come_back_offline_and_merge_with_newer_ones() {
        let r = Registry::new(&cfg(10, 0));
        r.connected(&info("both", 5_000, &[]));
        let mut was_online = blank("crashed", 100);
        was_online.online = true;
        let mut older = blank("both", 50);
        older.connects = 4;
        assert_eq!(r.merge_stored(vec![was_online, older]), 1);
        let c = r.get("crashed").unwrap();
        assert!(!c.online);
        assert_eq!(c.last_disconnect_reason.as_deref(), Some(RESTART_REASON));
        let b = r.get("both").unwrap();
        assert!(b.online);
        assert_eq!(b.first_seen_ms, 50);
        assert_eq!(b.connects, 5);
        assert_eq!(
            r.totals(),
            Totals {
                devices: 2,
                online: 1,
                offline: 1
            }
        );
    }
}
