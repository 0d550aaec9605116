//! Configuration reload (SIGHUP, `systemctl reload relay`): what changed
//! between the running configuration and a newly loaded one, which of it is
//! applied while clients stay connected, and which keys wait for a restart.
//!
//! The main thread publishes the new router settings with a generation
//! number; each shard's sweeper picks them up within one sweep (100 ms).
//! Connections read the settings on every frame, timer and hello, so rate
//! limits, queue bounds and timeouts change for connected clients too; the
//! heartbeat bounds apply to each client's next hello.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use relay_config::Config;
use serde_json::Value;

use super::{Relay, Shard, router_config};
use crate::acl::AclRules;
use crate::router::RouterConfig;

/// Keys (or whole sections, ending in `.`) applied without a restart.
const LIVE: &[&str] = &[
    "limits.max_connections",
    "limits.queue_bytes",
    "limits.slow_consumer_timeout_ms",
    "limits.frames_per_sec",
    "limits.burst",
    "limits.hello_timeout_ms",
    "limits.max_groups_per_conn",
    "limits.max_meta_bytes",
    "heartbeat.",
    "admission.",
    "upgrade.",
    "acl.",
    "tls.cert_file",
    "tls.key_file",
    "tls.alpn",
    "tls.max_fragment_size",
    "tls.session_tickets",
    "tls.client_ca_file",
    "tls.crl_file",
    "tls.require_client_cert",
];

/// What a reload did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReloadReport {
    /// Keys whose new value is in force.
    pub applied: Vec<String>,
    /// Keys that changed in the file but keep their running value until a restart.
    pub needs_restart: Vec<String>,
    /// Why the TLS certificate was not reloaded (the running one stays).
    pub tls_refused: Option<String>,
}

/// The reloadable state shared by the shards.
pub(crate) struct Live {
    generation: AtomicU64,
    router: Mutex<Option<RouterConfig>>,
    /// `[limits] max_connections`, read on every accept.
    pub(crate) max_connections: AtomicUsize,
    /// The configuration in force (the file as loaded at start or last reload).
    config: Mutex<Config>,
    reloads: AtomicU64,
    failures: AtomicU64,
    /// The access rules in force (their counters feed `/metrics`).
    acl: Mutex<Arc<AclRules>>,
}

impl Live {
    pub(crate) fn new(cfg: &Config) -> Live {
        Live {
            generation: AtomicU64::new(0),
            router: Mutex::new(None),
            max_connections: AtomicUsize::new(cfg.limits.max_connections as usize),
            config: Mutex::new(cfg.clone()),
            reloads: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            acl: Mutex::default(),
        }
    }

    /// Records the access rules in force.
    pub(crate) fn set_acl(&self, acl: Arc<AclRules>) {
        if let Ok(mut a) = self.acl.lock() {
            *a = acl;
        }
    }

    /// The access rules in force.
    pub(crate) fn acl(&self) -> Arc<AclRules> {
        self.acl.lock().map(|a| a.clone()).unwrap_or_default()
    }

    /// Counters for `/metrics`.
    pub(crate) fn metrics(&self) -> Vec<(String, String, u64)> {
        vec![
            (
                "relay_config_reloads_total".into(),
                "Configuration reloads applied (SIGHUP).".into(),
                self.reloads.load(Ordering::Relaxed),
            ),
            (
                "relay_config_reload_failures_total".into(),
                "Configuration reloads refused: the file did not load.".into(),
                self.failures.load(Ordering::Relaxed),
            ),
        ]
    }
}

/// Takes the published router settings when they are newer than the shard's
/// (called by each shard's sweeper).
pub(super) fn apply(shard: &Shard) {
    let live = &shard.shared.live;
    let generation = live.generation.load(Ordering::Acquire);
    if generation == shard.router.cfg_generation() {
        return;
    }
    let Ok(published) = live.router.lock() else {
        return;
    };
    if let Some(cfg) = published.as_ref() {
        shard.router.set_cfg(generation, cfg.clone());
    }
}

impl Relay {
    /// Applies `new` (already loaded and validated) where it can change
    /// live, and reports every changed key: applied or waiting for a restart.
    /// Each key that needs a restart is logged.
    pub fn reload(&self, new: &Config) -> ReloadReport {
        let live = &self.shared.live;
        let Ok(mut current) = live.config.lock() else {
            return ReloadReport::default();
        };
        let mut report = ReloadReport::default();
        // The certificate files are read again on every reload, changed
        // paths or not (a renewal rewrites them in place).
        let tls_ok = match self.shared.tls.reload(new) {
            Ok(reloaded) => {
                if reloaded {
                    tracing::info!(
                        "TLS certificate reloaded from {}; new handshakes use it",
                        new.tls.cert_file.as_deref().unwrap_or("")
                    );
                }
                true
            }
            Err(e) => {
                tracing::error!("reload: TLS certificate refused, the running one stays: {e:#}");
                live.failures.fetch_add(1, Ordering::Relaxed);
                report.tls_refused = Some(format!("{e:#}"));
                false
            }
        };
        let rules = self.shared.plugins.clone();
        for key in changed_keys(&current, new) {
            if key.starts_with("tls.") && !tls_ok {
                continue;
            }
            if is_live(&key) || (rules.is_some() && LIVE_WITH_RULES.contains(&key.as_str())) {
                report.applied.push(key);
            } else {
                report.needs_restart.push(key);
            }
        }
        // The running values of the keys that need a restart stay; the rest
        // takes the new values.
        let mut next = current.clone();
        next.limits.max_connections = new.limits.max_connections;
        next.limits.queue_bytes = new.limits.queue_bytes;
        next.limits.slow_consumer_timeout_ms = new.limits.slow_consumer_timeout_ms;
        next.limits.frames_per_sec = new.limits.frames_per_sec;
        next.limits.burst = new.limits.burst;
        next.limits.hello_timeout_ms = new.limits.hello_timeout_ms;
        next.limits.max_groups_per_conn = new.limits.max_groups_per_conn;
        next.limits.max_meta_bytes = new.limits.max_meta_bytes;
        next.heartbeat = new.heartbeat.clone();
        next.admission = new.admission.clone();
        next.upgrade = new.upgrade.clone();
        next.acl = new.acl.clone();
        if let Some(rules) = &rules
            && report
                .applied
                .iter()
                .any(|k| LIVE_WITH_RULES.contains(&k.as_str()))
        {
            next.notify.notifier = new.notify.notifier.clone();
            next.notify.route = new.notify.route.clone();
            next.notify.utc_offset_min = new.notify.utc_offset_min;
            rules.reload_notify(&next.notify);
        }
        if tls_ok {
            next.tls.cert_file = new.tls.cert_file.clone();
            next.tls.key_file = new.tls.key_file.clone();
            next.tls.alpn = new.tls.alpn.clone();
            next.tls.max_fragment_size = new.tls.max_fragment_size;
            next.tls.session_tickets = new.tls.session_tickets;
            next.tls.client_ca_file = new.tls.client_ca_file.clone();
            next.tls.crl_file = new.tls.crl_file.clone();
            next.tls.require_client_cert = new.tls.require_client_cert;
        }
        if !report.applied.is_empty() {
            live.max_connections
                .store(next.limits.max_connections as usize, Ordering::Relaxed);
            let mut rc = router_config(&next);
            rc.acl = if report.applied.iter().any(|k| k.starts_with("acl.")) {
                // Denial counters carry over to rules of the same name.
                let acl = Arc::new(AclRules::build(&next.acl, Some(&live.acl())));
                tracing::info!(
                    rules = acl.acl.rules().len(),
                    default_allow = acl.acl.default_allow(),
                    "access rules reloaded"
                );
                live.set_acl(acl.clone());
                acl
            } else {
                live.acl()
            };
            if let Ok(mut r) = live.router.lock() {
                *r = Some(rc);
            }
            live.generation.fetch_add(1, Ordering::Release);
        }
        *current = next;
        live.reloads.fetch_add(1, Ordering::Relaxed);
        for key in &report.needs_restart {
            tracing::warn!("reload: {key} changed; restart to apply it");
        }
        tracing::info!(
            applied = ?report.applied,
            needs_restart = ?report.needs_restart,
            "configuration reloaded"
        );
        report
    }

    /// Counts a reload whose file did not load (the caller logs why).
    pub fn reload_failed(&self) {
        self.shared.live.failures.fetch_add(1, Ordering::Relaxed);
    }
}

/// Keys applied without a restart when the rules engine runs (it takes them).
const LIVE_WITH_RULES: &[&str] = &["notify.notifier", "notify.route", "notify.utc_offset_min"];

fn is_live(key: &str) -> bool {
    LIVE.iter().any(|l| {
        if let Some(section) = l.strip_suffix('.') {
            key.split('.').next() == Some(section)
        } else {
            key == *l
        }
    })
}

/// Every leaf key (`section.key`, arrays as a whole) whose value differs.
fn changed_keys(old: &Config, new: &Config) -> Vec<String> {
    let (Ok(a), Ok(b)) = (serde_json::to_value(old), serde_json::to_value(new)) else {
        return vec!["(configuration)".into()];
    };
    let mut out = Vec::new();
    diff("", &a, &b, &mut out);
    out
}

fn diff(prefix: &str, a: &Value, b: &Value, out: &mut Vec<String>) {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let mut keys: Vec<&String> = x.keys().chain(y.keys()).collect();
            keys.sort();
            keys.dedup();
            for k in keys {
                let path = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                match (x.get(k), y.get(k)) {
                    (Some(p), Some(q)) => diff(&path, p, q, out),
                    _ => out.push(path),
                }
            }
        }
        _ if a != b => out.push(prefix.to_owned()),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changed_keys_are_leaves_and_classified() {
        let a = Config::default();
        let mut b = a.clone();
        b.limits.frames_per_sec = 10;
        b.heartbeat.max_s = 60;
        b.listeners.tcp = "127.0.0.1:1".parse().unwrap();
        let keys = changed_keys(&a, &b);
        assert_eq!(
            keys,
            ["heartbeat.max_s", "limits.frames_per_sec", "listeners.tcp"]
        );
        assert!(is_live("heartbeat.max_s") && is_live("limits.frames_per_sec"));
        assert!(!is_live("listeners.tcp") && !is_live("limits.max_frame"));
        assert!(!is_live("heartbeatx.y"));
    }
}
