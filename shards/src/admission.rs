//! Admission: how many hellos a shard accepts per second, in all and from one
//! source address (`[admission]`). A hello over a limit is refused with ERROR
//! `busy` and a `retry_after_ms` drawn from a window, so a fleet that
//! reconnects at once comes back spread out. State is per shard (one thread),
//! and the table of source addresses is bounded.

use std::collections::HashMap;
use std::net::IpAddr;

use relay_config::AdmissionConfig;

/// How often (at most) a full address table is pruned of idle entries.
const PRUNE_EVERY_MS: u64 = 1000;

/// A token bucket refilled at `rate` per second up to `burst`.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at_ms: u64,
}

impl Bucket {
    fn full(burst: u32, now_ms: u64) -> Bucket {
        Bucket {
            tokens: f64::from(burst.max(1)),
            at_ms: now_ms,
        }
    }

    fn refill(&mut self, rate: u32, burst: u32, now_ms: u64) {
        let elapsed = now_ms.saturating_sub(self.at_ms) as f64 / 1000.0;
        self.tokens = (self.tokens + elapsed * f64::from(rate)).min(f64::from(burst.max(1)));
        self.at_ms = now_ms;
    }

    fn take(&mut self) -> bool {
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Which limit refused a hello.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    Shard,
    SourceAddress,
}

/// What to do with a hello.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Admit,
    /// Refuse with `busy`, telling the client to come back after this long.
    Busy {
        retry_after_ms: u64,
        limit: Limit,
    },
}

/// One shard's admission state.
#[derive(Debug)]
pub struct Gate {
    shard: Option<Bucket>,
    ips: HashMap<IpAddr, Bucket>,
    pruned_at_ms: u64,
    rng: fastrand::Rng,
}

impl Gate {
    pub fn new(seed: u64) -> Gate {
        Gate {
            shard: None,
            ips: HashMap::new(),
            pruned_at_ms: 0,
            rng: fastrand::Rng::with_seed(seed),
        }
    }

    /// Decides on a hello from `ip` at `now_ms`.
    pub fn check(&mut self, cfg: &AdmissionConfig, ip: IpAddr, now_ms: u64) -> Verdict {
        if cfg.per_ip_per_sec > 0 && !self.take_ip(cfg, ip, now_ms) {
            return self.busy(cfg, Limit::SourceAddress);
        }
        if cfg.hellos_per_sec > 0 {
            let b = self
                .shard
                .get_or_insert_with(|| Bucket::full(cfg.burst, now_ms));
            b.refill(cfg.hellos_per_sec, cfg.burst, now_ms);
            if !b.take() {
                return self.busy(cfg, Limit::Shard);
            }
        }
        Verdict::Admit
    }

    /// Source addresses tracked now.
    pub fn tracked(&self) -> usize {
        self.ips.len()
    }

    fn take_ip(&mut self, cfg: &AdmissionConfig, ip: IpAddr, now_ms: u64) -> bool {
        if !self.ips.contains_key(&ip) && self.ips.len() >= cfg.max_tracked_ips {
            self.prune(cfg, now_ms);
            if self.ips.len() >= cfg.max_tracked_ips {
                // No room: this address is held to the shard limit only.
                return true;
            }
        }
        let b = self
            .ips
            .entry(ip)
            .or_insert_with(|| Bucket::full(cfg.per_ip_burst, now_ms));
        b.refill(cfg.per_ip_per_sec, cfg.per_ip_burst, now_ms);
        b.take()
    }

    /// Forgets addresses whose bucket has refilled (they are as good as new).
    fn prune(&mut self, cfg: &AdmissionConfig, now_ms: u64) {
        if now_ms.saturating_sub(self.pruned_at_ms) < PRUNE_EVERY_MS && self.pruned_at_ms != 0 {
            return;
        }
        self.pruned_at_ms = now_ms;
        let (rate, burst) = (cfg.per_ip_per_sec, cfg.per_ip_burst);
        self.ips.retain(|_, b| {
            b.refill(rate, burst, now_ms);
            b.tokens < f64::from(burst.max(1))
        });
    }

    /// A delay drawn uniformly from 0 to `window_ms`.
    pub fn jitter(&mut self, window_ms: u64) -> u64 {
        self.rng.u64(0..=window_ms)
    }

    fn busy(&mut self, cfg: &AdmissionConfig, limit: Limit) -> Verdict {
        let jitter = if cfg.retry_window_ms == 0 {
            0
        } else {
            self.rng.u64(0..=cfg.retry_window_ms)
        };
        Verdict::Busy {
            retry_after_ms: cfg.retry_min_ms + jitter,
            limit,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(n: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, n])
    }

    #[test]
    fn shard_bucket_admits_the_burst_then_the_rate() {
        let cfg = AdmissionConfig {
            hellos_per_sec: 10,
            burst: 5,
            ..AdmissionConfig::default()
        };
        let mut g = Gate::new(1);
        let admitted = (0..20)
            .filter(|i| g.check(&cfg, ip(*i as u8), 1000) == Verdict::Admit)
            .count();
        assert_eq!(admitted, 5);
        // 100 ms later: one more token.
        assert_eq!(g.check(&cfg, ip(1), 1100), Verdict::Admit);
        assert!(matches!(
            g.check(&cfg, ip(1), 1100),
            Verdict::Busy {
                limit: Limit::Shard,
                ..
            }
        ));
    }

    #[test]
    fn per_address_limit_and_jittered_retry_hint() {
        let cfg = AdmissionConfig {
            hellos_per_sec: 0,
            per_ip_per_sec: 1,
            per_ip_burst: 2,
            retry_min_ms: 500,
            retry_window_ms: 1000,
            ..AdmissionConfig::default()
        };
        let mut g = Gate::new(7);
        assert_eq!(g.check(&cfg, ip(1), 0), Verdict::Admit);
        assert_eq!(g.check(&cfg, ip(1), 0), Verdict::Admit);
        let mut hints = Vec::new();
        for _ in 0..200 {
            match g.check(&cfg, ip(1), 0) {
                Verdict::Busy {
                    retry_after_ms,
                    limit: Limit::SourceAddress,
                } => hints.push(retry_after_ms),
                v => panic!("{v:?}"),
            }
        }
        // Another address is not affected.
        assert_eq!(g.check(&cfg, ip(2), 0), Verdict::Admit);
        assert!(hints.iter().all(|h| (500..=1500).contains(h)));
        let (lo, hi) = (hints.iter().min().unwrap(), hints.iter().max().unwrap());
        assert!(hi - lo > 800, "spread over the window: {lo}..{hi}");
    }

    #[test]
    fn the_address_table_is_bounded() {
        let cfg = AdmissionConfig {
            hellos_per_sec: 0,
            per_ip_per_sec: 1,
            per_ip_burst: 1,
            max_tracked_ips: 4,
            ..AdmissionConfig::default()
        };
        let mut g = Gate::new(3);
        for n in 0..50 {
            assert_eq!(g.check(&cfg, ip(n), 5000), Verdict::Admit);
            assert!(g.tracked() <= 4);
        }
        // Seconds later the idle entries are pruned and new ones tracked.
        assert_eq!(g.check(&cfg, ip(200), 9000), Verdict::Admit);
        assert!(g.tracked() <= 4);
        assert!(matches!(g.check(&cfg, ip(200), 9000), Verdict::Busy { .. }));
    }
}
