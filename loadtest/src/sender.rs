//! The sender thread: one per worker, it owns every timer of the worker's connections
//! and writes each message at its intended time.
//!
//! A tokio timer is 1 ms coarse and a task woken by it runs whenever a runtime thread
//! gets to it, so a generator built on it measures its own clock: messages leave
//! 0.5–1.5 ms after their intended time whatever the server does. This thread instead
//! keeps two heaps of due times (data on the step's open-loop schedule, heartbeats),
//! sleeps with a 1 ns timer slack until `spin` before the earliest, spins on
//! CLOCK_MONOTONIC for the rest, and then writes everything due straight to the
//! sockets (non-blocking `send`; a full socket hands the rest to the link's flusher).
//! One wake sends every message due at that moment, one write per connection, each
//! message stamped with its own lag so the receiver knows both the intended and the
//! actual send time.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::Arc;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::Duration;

use crate::client::{Link, StepPlan, Wrote};
use crate::clock::mono_ns;
use crate::payload::Stamp;
use crate::schedule::Schedule;
use crate::stats::{ErrorKind, NO_STEP, Recorder};

/// What the worker tells its sender thread.
#[derive(Debug)]
pub enum SchedCmd {
    /// A connection is up: heartbeat it, and send on it during steps if it sends.
    Add(Arc<Link>),
    /// Send this step's schedule on every sending connection.
    Run(StepPlan),
    /// Stop sending data (the step is over or cancelled); heartbeats go on.
    Halt,
    /// End the thread.
    Stop,
}

/// The sender's settings.
#[derive(Debug, Clone, Copy)]
pub struct SenderConfig {
    /// Sends are rounded up to a grid of this many ns (0 or 1: none).
    pub tick_ns: u64,
    /// Spin on the clock for this long before a due time instead of sleeping.
    pub spin_ns: u64,
    /// Most messages one connection writes in one wake.
    pub max_batch: u64,
    /// Heartbeat interval, ns.
    pub heartbeat_ns: u64,
}

/// Starts the sender thread of worker `worker`.
pub fn spawn(
    worker: u32,
    workers: u32,
    cfg: SenderConfig,
    rec: Arc<Recorder>,
) -> std::io::Result<(mpsc::Sender<SchedCmd>, std::thread::JoinHandle<()>)> {
    let (tx, rx) = mpsc::channel();
    let h = std::thread::Builder::new()
        .name(format!("lt-send-{worker}"))
        .spawn(move || Sender::new(worker, workers, cfg, rec).run(rx))?;
    Ok((tx, h))
}

/// Asks the kernel to wake this thread's timed sleeps on time (the default slack of
/// 50 µs would add up to that much to every wake), and, where allowed, to run it
/// ahead of ordinary threads (nice −10) so that a busy machine delays the sends less.
/// The thread sleeps most of the time, so this costs the server little.
fn tight_timer_slack() {
    // SAFETY: PR_SET_TIMERSLACK takes a plain integer and affects only this thread;
    // gettid has no arguments; setpriority on our own thread id changes only its nice
    // value and fails harmlessly without the privilege.
    unsafe {
        libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong, 0, 0, 0);
        let tid = libc::gettid();
        libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, SENDER_NICE);
    }
}

/// Nice value the sender thread asks for.
const SENDER_NICE: libc::c_int = -10;

struct Sender {
    worker: u32,
    workers: u32,
    cfg: SenderConfig,
    rec: Arc<Recorder>,
    links: Vec<Arc<Link>>,
    /// Each link's data schedule (idle outside steps and for non-senders).
    scheds: Vec<Schedule>,
    /// (when to wake for data, link).
    data: BinaryHeap<Reverse<(u64, usize)>>,
    /// (next heartbeat, link).
    beats: BinaryHeap<Reverse<(u64, usize)>>,
    step: u32,
    /// Reused: intended times of the messages of one write.
    intended: Vec<u64>,
    /// Spin budget: nanoseconds spun since `window_start`.
    spun_ns: u64,
    window_start: u64,
    /// How late a timed sleep ends, tracked at its 90th percentile: the sender
    /// spins for this long (bounded by `spin_ns`) before a due time, not more.
    oversleep: Oversleep,
}

/// A running estimate of the 90th percentile of how late a timed sleep wakes
/// (frugal streaming: up by a step when a sample is above it, down by a ninth
/// of a step when below). On a quiet machine it settles at a few µs, on a busy
/// one at tens of µs, so the sender spins only as long as the wake-up is
/// actually uncertain instead of a fixed `spin_ns` before every message: at
/// sparse rates that spin is most of the generator's CPU per message.
#[derive(Debug, Clone, Copy)]
pub struct Oversleep {
    est_ns: u64,
}

/// Step of the estimate, ns.
const OVERSLEEP_STEP_NS: u64 = 1_000;
/// Least spin: below this, the cost of a clock read decides.
const MIN_SPIN_NS: u64 = 2_000;

impl Oversleep {
    /// Starts at `start_ns` (the configured spin), so the first sends are safe.
    pub fn new(start_ns: u64) -> Self {
        Self { est_ns: start_ns }
    }

    /// Records that a sleep meant to end at `target` ended at `woke`.
    pub fn record(&mut self, target: u64, woke: u64) {
        let late = woke.saturating_sub(target);
        if late > self.est_ns {
            self.est_ns += OVERSLEEP_STEP_NS;
        } else {
            self.est_ns = self.est_ns.saturating_sub(OVERSLEEP_STEP_NS / 9);
        }
    }

    /// How long to spin before a due time: the estimate plus a margin, at most
    /// `cap_ns`.
    pub fn spin_ns(&self, cap_ns: u64) -> u64 {
        (self.est_ns + self.est_ns / 4 + MIN_SPIN_NS).min(cap_ns)
    }
}

/// Most of its wall time the sender may spend spinning; past it, it only sleeps
/// until the next window (at high rates it wakes often anyway, and spinning would
/// take a core from the reader threads and the server).
const SPIN_SHARE: u64 = 10;
/// Length of one spin-budget window, ns.
const SPIN_WINDOW_NS: u64 = 100_000_000;

impl Sender {
    fn new(worker: u32, workers: u32, cfg: SenderConfig, rec: Arc<Recorder>) -> Self {
        Self {
            worker,
            workers,
            cfg,
            rec,
            links: Vec::new(),
            scheds: Vec::new(),
            data: BinaryHeap::new(),
            beats: BinaryHeap::new(),
            step: NO_STEP,
            intended: Vec::with_capacity(64),
            spun_ns: 0,
            window_start: mono_ns(),
            oversleep: Oversleep::new(cfg.spin_ns),
        }
    }

    fn run(mut self, rx: mpsc::Receiver<SchedCmd>) {
        tight_timer_slack();
        loop {
            // Commands first.
            loop {
                match rx.try_recv() {
                    Ok(c) => {
                        if !self.command(c) {
                            return;
                        }
                    }
                    Err(mpsc::TryRecvError::Empty) => break,
                    Err(mpsc::TryRecvError::Disconnected) => return,
                }
            }
            let next = match (self.data.peek(), self.beats.peek()) {
                (Some(Reverse((a, _))), Some(Reverse((b, _)))) => Some((*a).min(*b)),
                (Some(Reverse((a, _))), None) => Some(*a),
                (None, Some(Reverse((b, _)))) => Some(*b),
                (None, None) => None,
            };
            let now = mono_ns();
            match next {
                None => match rx.recv_timeout(Duration::from_millis(200)) {
                    Ok(c) => {
                        if !self.command(c) {
                            return;
                        }
                        continue;
                    }
                    Err(RecvTimeoutError::Timeout) => continue,
                    Err(RecvTimeoutError::Disconnected) => return,
                },
                Some(t) if t > now => {
                    let left = t - now;
                    if now - self.window_start > SPIN_WINDOW_NS {
                        self.window_start = now;
                        self.spun_ns = 0;
                    }
                    let spin = if self.spun_ns * SPIN_SHARE
                        > now - self.window_start + SPIN_WINDOW_NS / SPIN_SHARE
                    {
                        0
                    } else {
                        self.oversleep.spin_ns(self.cfg.spin_ns)
                    };
                    if left > spin {
                        // Sleep (but wake for a command) until `spin` before it is due.
                        match rx.recv_timeout(Duration::from_nanos(left - spin)) {
                            Ok(c) => {
                                if !self.command(c) {
                                    return;
                                }
                                continue;
                            }
                            Err(RecvTimeoutError::Timeout) => {
                                self.oversleep.record(t - spin, mono_ns());
                            }
                            Err(RecvTimeoutError::Disconnected) => return,
                        }
                    }
                    let from = mono_ns();
                    let mut at = from;
                    while at < t {
                        std::hint::spin_loop();
                        at = mono_ns();
                    }
                    self.spun_ns += at - from;
                }
                Some(_) => {}
            }
            self.fire(mono_ns());
        }
    }

    /// Applies a command; false ends the thread.
    fn command(&mut self, c: SchedCmd) -> bool {
        match c {
            SchedCmd::Add(link) => {
                let i = self.links.len();
                let hb = self.cfg.heartbeat_ns.max(1);
                // Spread first heartbeats over one interval so the fleet does not ping
                // in bursts.
                let phase = (link.spec.index.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 11) % hb;
                self.beats.push(Reverse((mono_ns() + phase, i)));
                self.links.push(link);
                self.scheds.push(Schedule::idle());
            }
            SchedCmd::Run(p) => self.start_step(p),
            SchedCmd::Halt => self.halt(),
            SchedCmd::Stop => return false,
        }
        true
    }

    fn halt(&mut self) {
        self.data.clear();
        for s in &mut self.scheds {
            *s = Schedule::idle();
        }
        self.step = NO_STEP;
    }

    /// Schedules every live sending link for step `p`, their phases spread evenly
    /// over one interval (this worker's senders interleaved with the other workers').
    fn start_step(&mut self, p: StepPlan) {
        self.halt();
        // Drop links that are gone, so long runs with resizes do not accumulate them.
        if self.links.iter().any(|l| !l.alive()) {
            let keep: Vec<usize> = (0..self.links.len())
                .filter(|&i| self.links[i].alive())
                .collect();
            let mut map = vec![usize::MAX; self.links.len()];
            for (new, &old) in keep.iter().enumerate() {
                map[old] = new;
            }
            self.links = keep.iter().map(|&i| self.links[i].clone()).collect();
            self.scheds = vec![Schedule::idle(); self.links.len()];
            let beats: Vec<_> = self
                .beats
                .drain()
                .filter_map(|Reverse((t, i))| {
                    (map[i] != usize::MAX).then_some(Reverse((t, map[i])))
                })
                .collect();
            self.beats = beats.into();
        }
        self.step = p.id;
        let senders: Vec<usize> = (0..self.links.len())
            .filter(|&i| self.links[i].dest.is_some())
            .collect();
        let n = senders.len() as u64;
        let w = self.workers.max(1) as u64;
        for (rank, &i) in senders.iter().enumerate() {
            // Slot rank·W + worker of n·W: workers interleave, each spread evenly.
            let slot = rank as u64 * w + self.worker as u64;
            self.scheds[i] = Schedule::new(p.start_ns, p.end_ns, p.rate, slot, n * w);
            if let Some(t) = self.scheds[i].next_wake(self.cfg.tick_ns) {
                self.data.push(Reverse((t, i)));
            }
        }
    }

    /// Sends everything due at `now`.
    fn fire(&mut self, now: u64) {
        while let Some(&Reverse((t, i))) = self.data.peek() {
            if t > now {
                break;
            }
            self.data.pop();
            self.send_due(i, now);
            if self.links[i].alive()
                && let Some(t) = self.scheds[i].next_wake(self.cfg.tick_ns)
            {
                self.data.push(Reverse((t, i)));
            }
        }
        let hb = self.cfg.heartbeat_ns.max(1);
        while let Some(&Reverse((t, i))) = self.beats.peek() {
            if t > now {
                break;
            }
            self.beats.pop();
            let link = &self.links[i];
            if !link.alive() {
                continue;
            }
            // Queued before the write: the answer may come back before `write` returns.
            link.ping_sent(t);
            if link.write(|enc, buf| enc.ping(buf)) == Wrote::Ok {
                self.rec.ping(link.key, t);
            } else {
                link.ping_unsent();
            }
            // Next beat on the grid; skip beats missed while blocked.
            let next = t + hb * ((now - t) / hb + 1);
            self.beats.push(Reverse((next, i)));
        }
    }

    fn send_due(&mut self, i: usize, now: u64) {
        let link = self.links[i].clone();
        let Some(dest) = link.dest.as_ref() else {
            return;
        };
        let due = self.scheds[i].take_due(now, self.cfg.max_batch);
        self.intended.clear();
        for k in due {
            match self.scheds[i].intended(k) {
                Some(t) => self.intended.push(t),
                None => break,
            }
        }
        if self.intended.is_empty() {
            return;
        }
        let step = self.step;
        let len = link.payload_len;
        let written = mono_ns();
        let intended = &self.intended;
        let r = link.write(|enc, buf| {
            for &t in intended {
                let lag = written.saturating_sub(t).min(u32::MAX as u64) as u32;
                enc.data(
                    buf,
                    dest,
                    Stamp {
                        intended_ns: t,
                        step,
                        lag_ns: lag,
                    },
                    len,
                );
            }
        });
        match r {
            Wrote::Ok => {
                let recipients = link.spec.send.as_ref().map_or(0, |s| s.recipients);
                self.rec
                    .sent_scheduled(link.key, &self.intended, written, recipients);
            }
            Wrote::Full => {
                for _ in 0..self.intended.len() {
                    self.rec.error(link.key, &ErrorKind::WriteBlocked);
                }
            }
            Wrote::Closed => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sleeps that end late by 0..100 µs, evenly: the estimate settles near
    /// their 90th percentile (90 µs), whatever it started from.
    #[test]
    fn the_oversleep_estimate_settles_at_the_90th_percentile() {
        for start in [0, 50_000, 500_000] {
            let mut o = Oversleep::new(start);
            let mut x: u64 = 12345;
            for _ in 0..200_000 {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let late = (x >> 33) % 100_000;
                o.record(1_000_000, 1_000_000 + late);
            }
            assert!(
                (80_000..=100_000).contains(&o.est_ns),
                "from {start}: {}",
                o.est_ns
            );
        }
    }

    /// A machine that wakes sleepers on time gets a short spin, never more than
    /// the configured one.
    #[test]
    fn the_spin_follows_the_estimate_within_its_cap() {
        let mut o = Oversleep::new(50_000);
        for _ in 0..10_000 {
            o.record(1_000, 1_500);
        }
        assert!(o.spin_ns(50_000) < 5_000, "{}", o.spin_ns(50_000));
        assert!(o.spin_ns(50_000) >= MIN_SPIN_NS);
        let mut late = Oversleep::new(0);
        for _ in 0..10_000 {
            late.record(0, 400_000);
        }
        assert_eq!(late.spin_ns(50_000), 50_000);
    }
}
