//! The open-loop send schedule of one sending connection.
//!
//! Message `k` has an intended send time fixed in advance:
//! `start + phase + k / rate`. The sender never waits for replies before sending the
//! next message; when it wakes up late (a slow tick, a blocked socket) it sends every
//! message whose intended time has passed in one batch, and each carries its own
//! intended time, so latency is measured from when the message *should* have left
//! (no coordinated omission). Wake-ups are rounded up to a tick so a connection
//! writes at most once per tick.

use std::ops::Range;

/// Intended send times of one sender over one step.
#[derive(Debug, Clone)]
pub struct Schedule {
    /// First possible intended time (the step start), ns of CLOCK_MONOTONIC.
    start_ns: u64,
    /// Offset of this sender inside one interval, spreading senders evenly so the
    /// fleet's aggregate stream is smooth rather than bursting every interval.
    phase_ns: f64,
    /// Nanoseconds between two messages; `f64::INFINITY` when the rate is 0.
    interval_ns: f64,
    /// No message is intended at or after this time.
    end_ns: u64,
    /// Index of the next message not yet taken.
    next: u64,
}

impl Schedule {
    /// A schedule of `rate` messages per second from `start_ns` until `end_ns`, with
    /// this sender at position `slot` of `slots` senders sharing the same rate.
    pub fn new(start_ns: u64, end_ns: u64, rate: f64, slot: u64, slots: u64) -> Self {
        let interval_ns = if rate > 0.0 && rate.is_finite() {
            1e9 / rate
        } else {
            f64::INFINITY
        };
        let phase_ns = if interval_ns.is_finite() && slots > 0 {
            interval_ns * ((slot % slots) as f64 / slots as f64)
        } else {
            0.0
        };
        Self {
            start_ns,
            phase_ns,
            interval_ns,
            end_ns,
            next: 0,
        }
    }

    /// An empty schedule (the connection only heartbeats).
    pub fn idle() -> Self {
        Self::new(0, 0, 0.0, 0, 1)
    }

    /// Intended send time of message `k`, or `None` when it falls past the end.
    pub fn intended(&self, k: u64) -> Option<u64> {
        if !self.interval_ns.is_finite() {
            return None;
        }
        let offset = self.phase_ns + k as f64 * self.interval_ns;
        let t = self.start_ns.saturating_add(offset as u64);
        (t < self.end_ns).then_some(t)
    }

    /// Intended time of the next message not yet taken.
    pub fn next_ns(&self) -> Option<u64> {
        self.intended(self.next)
    }

    /// When the sender should wake for its next batch: the next intended time rounded
    /// up to a multiple of `tick_ns` (0 = no rounding).
    pub fn next_wake(&self, tick_ns: u64) -> Option<u64> {
        let t = self.next_ns()?;
        if tick_ns <= 1 {
            return Some(t);
        }
        Some(t.div_ceil(tick_ns).saturating_mul(tick_ns))
    }

    /// Takes every message due at `now_ns` (intended time ≤ now), at most `max` of them,
    /// and returns their indices. The rest stay due for the next call.
    pub fn take_due(&mut self, now_ns: u64, max: u64) -> Range<u64> {
        let first = self.next;
        let mut k = first;
        while k - first < max {
            match self.intended(k) {
                Some(t) if t <= now_ns => k += 1,
                _ => break,
            }
        }
        self.next = k;
        first..k
    }

    /// Messages intended from the start up to the end of the schedule.
    pub fn total(&self) -> u64 {
        if !self.interval_ns.is_finite() || self.end_ns <= self.start_ns {
            return 0;
        }
        let span = (self.end_ns - self.start_ns) as f64 - self.phase_ns;
        if span <= 0.0 {
            return 0;
        }
        // Number of k >= 0 with phase + k*interval < span.
        let n = (span / self.interval_ns).ceil() as u64;
        // Guard against floating-point rounding at the boundary.
        let mut n = n;
        while n > 0 && self.intended(n - 1).is_none() {
            n -= 1;
        }
        while self.intended(n).is_some() {
            n += 1;
        }
        n
    }

    /// True once every message of the schedule has been taken.
    pub fn finished(&self) -> bool {
        self.next_ns().is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    #[test]
    fn intended_times_follow_the_rate() {
        let s = Schedule::new(10 * S, 11 * S, 4.0, 0, 1);
        let times: Vec<u64> = (0..5).filter_map(|k| s.intended(k)).collect();
        assert_eq!(
            times,
            vec![10 * S, 10 * S + S / 4, 10 * S + S / 2, 10 * S + 3 * S / 4]
        );
        assert_eq!(s.total(), 4);
    }

    #[test]
    fn late_wakeup_takes_everything_due_in_one_batch() {
        let mut s = Schedule::new(0, 10 * S, 1000.0, 0, 1);
        // Wake 5 ms late: messages 0..=5 are due (t = 0, 1, ..., 5 ms).
        assert_eq!(s.take_due(5_000_000, u64::MAX), 0..6);
        // Nothing more is due at the same instant.
        assert_eq!(s.take_due(5_000_000, u64::MAX), 6..6);
        // The next intended time did not shift because we were late (open loop).
        assert_eq!(s.next_ns(), Some(6_000_000));
    }

    #[test]
    fn batch_cap_leaves_the_rest_due() {
        let mut s = Schedule::new(0, S, 1000.0, 0, 1);
        assert_eq!(s.take_due(9_000_000, 4), 0..4);
        assert_eq!(s.take_due(9_000_000, 4), 4..8);
        assert_eq!(s.take_due(9_000_000, 4), 8..10);
    }

    #[test]
    fn phases_spread_senders_over_one_interval() {
        let a = Schedule::new(0, S, 10.0, 0, 4);
        let b = Schedule::new(0, S, 10.0, 1, 4);
        let c = Schedule::new(0, S, 10.0, 3, 4);
        assert_eq!(a.intended(0), Some(0));
        assert_eq!(b.intended(0), Some(25_000_000));
        assert_eq!(c.intended(0), Some(75_000_000));
        // Every sender still sends exactly rate × duration messages.
        assert_eq!(a.total(), 10);
        assert_eq!(b.total(), 10);
        assert_eq!(c.total(), 10);
    }

    #[test]
    fn wake_rounds_up_to_the_tick() {
        let s = Schedule::new(1_000_100, S + 1_000_100, 1.0, 0, 1);
        assert_eq!(s.next_wake(1_000_000), Some(2_000_000));
        assert_eq!(s.next_wake(0), Some(1_000_100));
    }

    #[test]
    fn zero_rate_sends_nothing() {
        let mut s = Schedule::new(0, S, 0.0, 0, 1);
        assert_eq!(s.next_ns(), None);
        assert!(s.finished());
        assert_eq!(s.take_due(u64::MAX, u64::MAX), 0..0);
        assert_eq!(s.total(), 0);
        assert!(Schedule::idle().finished());
    }

    #[test]
    fn schedule_ends_at_end_time() {
        let mut s = Schedule::new(0, S, 3.0, 0, 1);
        assert_eq!(s.take_due(u64::MAX, u64::MAX).count(), 3);
        assert!(s.finished());
    }
}
