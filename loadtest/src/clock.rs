//! The time base of every measurement: CLOCK_MONOTONIC in nanoseconds. It is the same
//! clock in every process on one host, so a worker process can stamp an intended send
//! time that another worker process subtracts from its receive time.

use std::time::{Duration, Instant};

/// Nanoseconds of CLOCK_MONOTONIC (shared by all processes on this machine).
pub fn mono_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec and CLOCK_MONOTONIC always exists on Linux.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    debug_assert_eq!(rc, 0);
    (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64
}

/// Milliseconds since the Unix epoch (wall clock), for report headers only.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Maps monotonic nanoseconds onto `std::time::Instant`, so timers can sleep until a
/// stamped intended time.
#[derive(Debug, Clone, Copy)]
pub struct Anchor {
    /// The instant taken together with `ns`.
    instant: Instant,
    /// `mono_ns()` read right after `instant`.
    ns: u64,
}

impl Anchor {
    /// Takes a fresh pair of readings.
    pub fn now() -> Self {
        let instant = Instant::now();
        let ns = mono_ns();
        Self { instant, ns }
    }

    /// The `Instant` that corresponds to monotonic time `ns`.
    pub fn instant_at(&self, ns: u64) -> Instant {
        if ns >= self.ns {
            self.instant + Duration::from_nanos(ns - self.ns)
        } else {
            self.instant
                .checked_sub(Duration::from_nanos(self.ns - ns))
                .unwrap_or(self.instant)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mono_ns_never_goes_back() {
        let a = mono_ns();
        let b = mono_ns();
        assert!(b >= a);
        assert!(a > 0);
    }

    #[test]
    fn anchor_maps_offsets_both_ways() {
        let anchor = Anchor::now();
        let later = anchor.instant_at(anchor.ns + 5_000_000);
        assert_eq!(later - anchor.instant, Duration::from_millis(5));
        let earlier = anchor.instant_at(anchor.ns.saturating_sub(1_000));
        assert!(earlier <= anchor.instant);
    }
}
