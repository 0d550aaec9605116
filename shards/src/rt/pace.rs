//! When the I/O loop takes its next pass: at once when input wakes it, or
//! after a short pause while input arrives steadily (`[shards] coalesce_us`).
//!
//! A wake-up costs the shard more than the input it handles when arrivals
//! are sparse: the executor leaves its sleep, runs the loop, and goes back
//! to sleep, for one heartbeat. An idle fleet of 18,000 controllers with
//! 30 s heartbeats is 600 wake-ups a second of one event each. While the
//! loop sees input arriving often enough that a pause would collect several
//! events, it pauses instead of sleeping on input: one timer wake-up then
//! handles everything that came meanwhile, in one pass whose sends go out in
//! one submission. The pause aims at [`BATCH`] events and never exceeds the
//! configured bound, so it shrinks as the rate grows (a tenth of a
//! millisecond at 80,000 events a second); a pass that found nothing, or a
//! rate too low to fill a pause, returns the loop to sleeping on input,
//! which answers at once.

use std::time::{Duration, Instant};

/// Events a pause aims to collect.
const BATCH: f64 = 8.0;
/// The rate estimate forgets with this time constant (seconds): a count of
/// events decaying exponentially, so passes close together (one wake-up
/// often takes two) weigh by the time they cover, not by their number.
const TAU: f64 = 0.05;

/// The loop's estimate of its input rate, and its bound on a pause.
#[derive(Debug)]
pub(super) struct Pacer {
    max: Duration,
    /// Events per second, smoothed over the last [`TAU`] or so.
    rate: f64,
    /// When the previous pass began.
    last: Option<Instant>,
}

impl Pacer {
    /// A pacer whose pauses last at most `max` (zero: never pause).
    pub(super) fn new(max: Duration) -> Pacer {
        Pacer {
            max,
            rate: 0.0,
            last: None,
        }
    }

    /// A pass began at `now` and handled `events` (completions, ready
    /// sockets): how long the loop should pause before its next pass, or
    /// `None` to sleep until input arrives.
    pub(super) fn after_pass(&mut self, events: usize, now: Instant) -> Option<Duration> {
        let since = self
            .last
            .replace(now)
            .map(|t| now.saturating_duration_since(t));
        let dt = since.map_or(TAU, |d| d.as_secs_f64());
        self.rate = self.rate * (-dt / TAU).exp() + events as f64 / TAU;
        if events == 0 || self.max.is_zero() {
            return None;
        }
        let max = self.max.as_secs_f64();
        // Fewer than two events expected in the longest pause: waiting
        // would mostly add latency, not batch anything.
        if self.rate * max < 2.0 {
            return None;
        }
        Some(Duration::from_secs_f64((BATCH / self.rate).min(max)))
    }

    /// Whether input is steady enough that two events or more are expected
    /// within `window` (the busy loop's threshold, see `conn.rs`). Never with a
    /// zero window.
    pub(super) fn steady(&self, window: Duration) -> bool {
        self.rate * window.as_secs_f64() >= 2.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs passes every `gap` with `per_pass` events; the last decision.
    fn steady(p: &mut Pacer, gap: Duration, per_pass: usize, passes: u32) -> Option<Duration> {
        let start = Instant::now();
        let mut last = None;
        for i in 0..passes {
            last = p.after_pass(per_pass, start + gap * i);
        }
        last
    }

    #[test]
    fn zero_never_pauses() {
        let mut p = Pacer::new(Duration::ZERO);
        assert_eq!(steady(&mut p, Duration::from_micros(50), 20, 50), None);
        // The rate is still estimated: the busy loop decides on it.
        assert!(p.steady(Duration::from_millis(1)));
    }

    #[test]
    fn steady_input_is_told_from_sparse_input() {
        let slice = Duration::from_millis(1);
        // 20,000 events a second: 20 expected per millisecond.
        let mut p = Pacer::new(Duration::from_millis(5));
        steady(&mut p, Duration::from_micros(100), 2, 2000);
        assert!(p.steady(slice));
        assert!(!p.steady(Duration::ZERO));
        // 600 heartbeats a second: under one per millisecond.
        let mut p = Pacer::new(Duration::from_millis(5));
        steady(&mut p, Duration::from_millis(5), 3, 200);
        assert!(!p.steady(slice));
    }

    #[test]
    fn input_that_stops_is_no_longer_steady() {
        let slice = Duration::from_millis(1);
        let mut p = Pacer::new(Duration::ZERO);
        let t = Instant::now();
        steady(&mut p, Duration::from_micros(100), 2, 2000);
        assert!(p.steady(slice));
        // 200 ms later with nothing: the estimate has decayed by e^-4.
        p.after_pass(0, t + Duration::from_millis(400));
        assert!(!p.steady(slice));
    }

    #[test]
    fn sparse_input_wakes_the_loop_at_once() {
        // One event every 10 ms: fewer than two would fit a 5 ms pause.
        let mut p = Pacer::new(Duration::from_millis(5));
        assert_eq!(steady(&mut p, Duration::from_millis(10), 1, 100), None);
    }

    #[test]
    fn steady_input_pauses_at_most_the_bound() {
        // 1,200 events a second: BATCH of them take 6.7 ms, so the bound.
        let mut p = Pacer::new(Duration::from_millis(5));
        let d = steady(&mut p, Duration::from_millis(5), 6, 100).expect("a pause");
        assert_eq!(d, Duration::from_millis(5));
    }

    #[test]
    fn the_pause_shrinks_as_the_rate_grows() {
        // 80,000 events a second: BATCH of them arrive in 100 µs.
        let mut p = Pacer::new(Duration::from_millis(5));
        let d = steady(&mut p, Duration::from_micros(100), 8, 5000).expect("a pause");
        assert!(
            d >= Duration::from_micros(95) && d <= Duration::from_micros(105),
            "{d:?}"
        );
    }

    #[test]
    fn a_pass_that_found_nothing_sleeps_on_input() {
        let mut p = Pacer::new(Duration::from_millis(5));
        let t = Instant::now();
        assert!(steady(&mut p, Duration::from_millis(1), 10, 50).is_some());
        assert_eq!(p.after_pass(0, t + Duration::from_millis(51)), None);
    }
}
