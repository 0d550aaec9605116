//! The capacity search behind `--find-max`: run steps at growing total rates
//! (× factor each), and once a step fails the SLO (p99 at or over the bound, or loss at
//! or over the bound), bisect between the last passing and the first failing rate.
//! When even the first rate fails, the ramp walks down (÷ factor) until one passes.
//! The answer is the highest passing rate. The logic is pure: the caller runs steps.

use serde::{Deserialize, Serialize};

/// The search's parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RampConfig {
    /// First total rate, msg/s.
    pub start: f64,
    /// Growth (and, below the first rate, shrink) factor per step.
    pub factor: f64,
    /// Most ramp steps (up or down).
    pub max_steps: u32,
    /// Bisection steps once bracketed.
    pub refine_steps: u32,
    /// Upper bound of the rate (0 = none).
    pub max_rate: f64,
    /// A passing step's p99 is under this, µs.
    pub slo_p99_us: u64,
    /// A passing step's loss ratio is under this.
    pub max_loss: f64,
}

/// One finished step of the search.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Outcome {
    /// Total rate of the step, msg/s.
    pub rate: f64,
    /// Its p99 latency, µs.
    pub p99_us: u64,
    /// Its loss ratio.
    pub loss: f64,
    /// Messages received (a step with none cannot pass).
    pub received: u64,
    /// Whether it met the SLO.
    pub passed: bool,
}

/// The search state.
#[derive(Debug, Clone)]
pub struct Ramp {
    cfg: RampConfig,
    /// Highest passing rate so far.
    lo: Option<Outcome>,
    /// Lowest failing rate so far.
    hi: Option<f64>,
    /// Ramp steps taken.
    ramp_steps: u32,
    /// Bisection steps taken.
    refine_steps: u32,
    /// Every step, in order.
    history: Vec<Outcome>,
}

impl Ramp {
    /// A new search.
    pub fn new(cfg: RampConfig) -> Self {
        Self {
            cfg,
            lo: None,
            hi: None,
            ramp_steps: 0,
            refine_steps: 0,
            history: Vec::new(),
        }
    }

    fn cap(&self, r: f64) -> f64 {
        if self.cfg.max_rate > 0.0 {
            r.min(self.cfg.max_rate)
        } else {
            r
        }
    }

    /// The first rate to run.
    pub fn first(&self) -> f64 {
        self.cap(self.cfg.start)
    }

    /// Whether a step with these numbers meets the SLO.
    pub fn passes(&self, p99_us: u64, loss: f64, received: u64) -> bool {
        received > 0 && p99_us < self.cfg.slo_p99_us && loss < self.cfg.max_loss
    }

    /// Records the step just run at `rate`; returns the next rate, or `None` when done.
    pub fn observe(&mut self, rate: f64, p99_us: u64, loss: f64, received: u64) -> Option<f64> {
        let passed = self.passes(p99_us, loss, received);
        self.observe_judged(rate, p99_us, loss, received, passed)
    }

    /// Like [`Ramp::observe`], for a step the caller judged itself (connections that
    /// did not come up or errors can fail a step whose latency and loss are fine).
    pub fn observe_judged(
        &mut self,
        rate: f64,
        p99_us: u64,
        loss: f64,
        received: u64,
        passed: bool,
    ) -> Option<f64> {
        let o = Outcome {
            rate,
            p99_us,
            loss,
            received,
            passed,
        };
        self.history.push(o);
        if passed {
            if self.lo.is_none_or(|l| rate > l.rate) {
                self.lo = Some(o);
            }
        } else if self.hi.is_none_or(|h| rate < h) {
            self.hi = Some(rate);
        }
        match (self.lo, self.hi) {
            // Still climbing.
            (Some(l), None) => {
                self.ramp_steps += 1;
                let at_cap = self.cfg.max_rate > 0.0 && l.rate >= self.cfg.max_rate;
                if at_cap || self.ramp_steps >= self.cfg.max_steps {
                    return None;
                }
                Some(self.cap(l.rate * self.cfg.factor))
            }
            // Nothing passes yet: walk down.
            (None, Some(h)) => {
                self.ramp_steps += 1;
                if self.ramp_steps >= self.cfg.max_steps {
                    return None;
                }
                Some(h / self.cfg.factor)
            }
            // Bracketed: bisect.
            (Some(l), Some(h)) => {
                if self.refine_steps >= self.cfg.refine_steps || h <= l.rate {
                    return None;
                }
                self.refine_steps += 1;
                Some((l.rate + h) / 2.0)
            }
            (None, None) => None,
        }
    }

    /// The highest passing step, if any.
    pub fn best(&self) -> Option<Outcome> {
        self.lo
    }

    /// The lowest failing rate, if any.
    pub fn first_failure(&self) -> Option<f64> {
        self.hi
    }

    /// Every step in the order run.
    pub fn history(&self) -> &[Outcome] {
        &self.history
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> RampConfig {
        RampConfig {
            start: 1000.0,
            factor: 2.0,
            max_steps: 20,
            refine_steps: 3,
            max_rate: 0.0,
            slo_p99_us: 10_000,
            max_loss: 0.001,
        }
    }

    /// Drives the search against a server whose p99 crosses the SLO at `limit` msg/s.
    fn search(c: RampConfig, limit: f64) -> Ramp {
        let mut r = Ramp::new(c);
        let mut rate = r.first();
        for _ in 0..100 {
            let p99 = if rate <= limit { 2_000 } else { 50_000 };
            match r.observe(rate, p99, 0.0, 100) {
                Some(next) => rate = next,
                None => return r,
            }
        }
        panic!("the search did not end");
    }

    #[test]
    fn ramps_up_then_bisects_to_the_limit() {
        let r = search(cfg(), 5000.0);
        let rates: Vec<f64> = r.history().iter().map(|o| o.rate).collect();
        // 1000, 2000, 4000 pass; 8000 fails; then 6000 (fail), 5000 (pass), 5500 (fail).
        assert_eq!(
            rates,
            vec![1000.0, 2000.0, 4000.0, 8000.0, 6000.0, 5000.0, 5500.0]
        );
        assert_eq!(r.best().unwrap().rate, 5000.0);
        assert_eq!(r.first_failure(), Some(5500.0));
    }

    #[test]
    fn walks_down_when_the_first_rate_fails() {
        let r = search(cfg(), 300.0);
        assert_eq!(r.history()[0].rate, 1000.0);
        assert_eq!(r.history()[1].rate, 500.0);
        assert_eq!(r.history()[2].rate, 250.0);
        let best = r.best().unwrap().rate;
        assert!((250.0..=300.0).contains(&best), "{best}");
    }

    #[test]
    fn loss_fails_a_step_like_latency() {
        let r = Ramp::new(cfg());
        assert!(r.passes(9_999, 0.0009, 1));
        assert!(!r.passes(10_000, 0.0, 1), "the SLO is strict");
        assert!(!r.passes(1, 0.001, 1), "0.1% loss is not under 0.1%");
        assert!(
            !r.passes(1, 0.0, 0),
            "a step that delivered nothing cannot pass"
        );
    }

    #[test]
    fn max_rate_and_max_steps_bound_the_search() {
        let mut c = cfg();
        c.max_rate = 3000.0;
        let r = search(c, 1e12);
        let rates: Vec<f64> = r.history().iter().map(|o| o.rate).collect();
        assert_eq!(rates, vec![1000.0, 2000.0, 3000.0]);
        let mut c = cfg();
        c.max_steps = 2;
        let r = search(c, 1e12);
        assert_eq!(r.history().len(), 2);
    }
}
