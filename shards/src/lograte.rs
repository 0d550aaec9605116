//! Rate-limited log lines. A line an outsider can cause (a refused
//! connection, a failed accept) is written at most once per period per call
//! site, with the number of like lines left out since: a log flood is an
//! outage of its own (disk, shipper, the operator's attention).

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Instant;

/// How often one call site may write.
pub const PERIOD_MS: u64 = 1000;

/// The state of one call site: when it last wrote, and how many lines it
/// left out since.
#[derive(Debug)]
pub struct Every {
    /// Milliseconds since the process's first limited line, plus one (0: never).
    last: AtomicU64,
    suppressed: AtomicU64,
}

impl Every {
    pub const fn new() -> Every {
        Every {
            last: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// Whether a line may be written at `now_ms` (milliseconds on any
    /// monotonic clock, above 0): `Some(n)` with the lines left out since
    /// the last one, `None` to leave this one out.
    pub fn check(&self, now_ms: u64, period_ms: u64) -> Option<u64> {
        let last = self.last.load(Relaxed);
        if last != 0 && now_ms < last.saturating_add(period_ms) {
            self.suppressed.fetch_add(1, Relaxed);
            return None;
        }
        // One thread wins the slot; the others count as left out.
        if self
            .last
            .compare_exchange(last, now_ms.max(1), Relaxed, Relaxed)
            .is_err()
        {
            self.suppressed.fetch_add(1, Relaxed);
            return None;
        }
        Some(self.suppressed.swap(0, Relaxed))
    }
}

impl Default for Every {
    fn default() -> Self {
        Every::new()
    }
}

/// Milliseconds since the first call (at least 1).
pub fn mono_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1
}

/// `tracing::warn!`, at most once a second from this call site; the next
/// line says how many were left out.
#[macro_export]
macro_rules! warn_every {
    ($($arg:tt)+) => {{
        static EVERY: $crate::lograte::Every = $crate::lograte::Every::new();
        if let Some(n) = EVERY.check($crate::lograte::mono_ms(), $crate::lograte::PERIOD_MS) {
            if n == 0 {
                ::tracing::warn!($($arg)+);
            } else {
                ::tracing::warn!(
                    "{} ({n} more like it left out)",
                    format_args!($($arg)+)
                );
            }
        }
    }};
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_period_then_the_count_of_lines_left_out() {
        let e = Every::new();
        assert_eq!(e.check(5, 1000), Some(0));
        for t in 6..1005 {
            assert_eq!(e.check(t, 1000), None);
        }
        assert_eq!(e.check(1005, 1000), Some(999));
        assert_eq!(e.check(1006, 1000), None);
        assert_eq!(e.check(5000, 1000), Some(1));
        assert_eq!(e.check(6000, 1000), Some(0));
    }
}
