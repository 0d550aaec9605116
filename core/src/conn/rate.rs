//! The per-connection frame rate limit: a token bucket on the passed-in
//! monotonic clock.

/// Frames a client may still send right now, refilled at `frames_per_sec`
/// up to `burst`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct TokenBucket {
    /// Frames the client may still send right now.
    tokens: u32,
    /// When `tokens` was last refilled (monotonic ms).
    at: u64,
}

impl TokenBucket {
    /// A full bucket at `now_ms`.
    pub(super) fn new(burst: u32, now_ms: u64) -> TokenBucket {
        TokenBucket {
            tokens: burst.max(1),
            at: now_ms,
        }
    }

    /// Takes one token at `now_ms`; `false` when the bucket is empty. A
    /// `frames_per_sec` of 0 is no limit.
    pub(super) fn take(&mut self, frames_per_sec: u32, burst: u32, now_ms: u64) -> bool {
        if frames_per_sec == 0 {
            return true;
        }
        let elapsed = now_ms.saturating_sub(self.at);
        let add = elapsed.saturating_mul(frames_per_sec as u64) / 1000;
        if add > 0 {
            self.tokens = (self.tokens as u64 + add).min(burst.max(1) as u64) as u32;
            // Advance only by the time the whole tokens account for.
            self.at += add * 1000 / frames_per_sec as u64;
            if self.tokens as u64 >= burst as u64 {
                self.at = now_ms;
            }
        }
        // A bucket never holds more than the current burst (it may have
        // been lowered by a configuration reload).
        self.tokens = self.tokens.min(burst.max(1));
        if self.tokens == 0 {
            return false;
        }
        self.tokens -= 1;
        true
    }
}
