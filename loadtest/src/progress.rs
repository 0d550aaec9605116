//! The live progress line on stderr (indicatif): phase, connections, sent and received
//! per second, errors. Hidden when disabled or when stderr is not a terminal.

use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::report::{fmt_rate, group};
use crate::stats::ProgressSnapshot;

/// The progress line and the previous snapshot it computes rates from.
#[derive(Debug)]
pub struct Progress {
    bar: ProgressBar,
    /// Last snapshot and when it was taken.
    last: Option<(Instant, ProgressSnapshot)>,
    /// Smoothed per-second rates (sent, received).
    rates: (f64, f64),
}

impl Progress {
    /// A progress line, drawn only when `visible`.
    pub fn new(visible: bool) -> Self {
        let bar = if visible {
            ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr_with_hz(4))
        } else {
            ProgressBar::hidden()
        };
        if let Ok(style) = ProgressStyle::with_template("{spinner} [{elapsed_precise}] {msg}") {
            bar.set_style(style);
        }
        if visible {
            bar.enable_steady_tick(Duration::from_millis(250));
        }
        Self {
            bar,
            last: None,
            rates: (0.0, 0.0),
        }
    }

    /// Updates the line for `phase` with the fleet's summed counters.
    pub fn update(&mut self, phase: &str, snap: ProgressSnapshot) {
        let now = Instant::now();
        if let Some((t, prev)) = self.last {
            let dt = now.duration_since(t).as_secs_f64();
            if dt >= 0.2 {
                let s = snap.sent.saturating_sub(prev.sent) as f64 / dt;
                let r = snap.received.saturating_sub(prev.received) as f64 / dt;
                self.rates = (0.5 * self.rates.0 + 0.5 * s, 0.5 * self.rates.1 + 0.5 * r);
                self.last = Some((now, snap));
            }
        } else {
            self.last = Some((now, snap));
        }
        self.bar.set_message(line(phase, &snap, self.rates));
    }

    /// Prints a line above the progress line.
    pub fn println(&self, text: &str) {
        if self.bar.is_hidden() {
            eprintln!("{text}");
        } else {
            self.bar.println(text);
        }
    }

    /// Removes the line.
    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

/// The text of the line.
pub fn line(phase: &str, s: &ProgressSnapshot, rates: (f64, f64)) -> String {
    format!(
        "{phase} | conns {} | sent {} ({}/s) | recv {} ({}/s) | errors {}",
        group(s.connected),
        group(s.sent),
        fmt_rate(rates.0),
        group(s.received),
        fmt_rate(rates.1),
        group(s.errors)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_line_shows_counts_and_rates() {
        let s = ProgressSnapshot {
            connected: 2000,
            connects_done: 2000,
            sent: 123_456,
            received: 123_400,
            errors: 3,
        };
        let l = line("step 1/1", &s, (20_000.0, 19_990.0));
        assert_eq!(
            l,
            "step 1/1 | conns 2,000 | sent 123,456 (20,000/s) | recv 123,400 (19,990/s) | errors 3"
        );
    }

    #[test]
    fn a_hidden_line_still_tracks_rates() {
        let mut p = Progress::new(false);
        p.update("x", ProgressSnapshot::default());
        std::thread::sleep(Duration::from_millis(210));
        p.update(
            "x",
            ProgressSnapshot {
                sent: 1000,
                ..Default::default()
            },
        );
        assert!(p.rates.0 > 0.0);
        p.finish();
    }
}
