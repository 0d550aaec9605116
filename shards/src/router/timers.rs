//! Deadlines: when each connection must be looked at again (its hello
//! deadline, idle or slow-consumer deadline, or the end of its close grace).
//!
//! A shard holds thousands of idle connections whose deadlines are tens of
//! seconds away, so the sweeper must not visit all of them on every tick.
//! Each connection sits in one slot of `SLOT_MS` (its `due` slot); a tick
//! takes only the slots that have come, looks at those connections, and puts
//! each back at its next deadline. Deadlines that move later (every frame a
//! client sends pushes its idle deadline) are left where they are and found
//! to be early when their slot comes, so activity costs nothing here; those
//! that move earlier (a hello accepted with a short heartbeat, a queue that
//! filled, a close) are re-armed by [`Router::arm`] when the connection is
//! woken or refused a frame. Idle cost is one visit per connection per idle
//! period instead of one per tick.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering::Relaxed;

use relay_core::conn::{Event, Now};

use super::Router;
use crate::cell::{ConnCell, ConnId};

/// Width of one slot: deadlines are met within one slot plus one tick.
pub const SLOT_MS: u64 = 100;
/// `ConnCell::due` of a connection in no slot.
pub const NOT_DUE: u32 = u32::MAX;
/// The queue-bytes gauge is summed once per this many ticks.
const GAUGE_EVERY: u32 = 10;

/// Connection ids by the slot of their next deadline.
#[derive(Debug, Default)]
pub(super) struct Deadlines {
    slots: BTreeMap<u32, Vec<ConnId>>,
    /// Every slot up to this one has been taken.
    done: u32,
    ticks: u32,
    /// Connections looked at so far.
    visits: u64,
}

fn slot_of(t_ms: u64) -> u32 {
    t_ms.div_ceil(SLOT_MS).min(u64::from(NOT_DUE - 1)) as u32
}

impl Router {
    /// Makes sure the connection is looked at by its next deadline: puts it
    /// in an earlier slot if its deadline moved before the one it is in.
    pub fn arm(&self, cell: &ConnCell) {
        let next = match cell.conn.try_borrow() {
            Ok(c) => c
                .poll_timeout(&self.cfg.borrow().conn)
                .or_else(|| c.close_deadline()),
            // In use further up the stack: look at it on the next tick, which
            // arms it properly.
            Err(_) => Some(0),
        };
        let next = match (next, self.mqtt_timeout(cell)) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let Some(t) = next else { return };
        let cur = cell.due.get();
        // The usual case on every delivery: already due by then.
        if cur != NOT_DUE && cur <= slot_of(t) {
            return;
        }
        let mut d = self.deadlines.borrow_mut();
        let slot = slot_of(t).max(d.done + 1);
        if cur != NOT_DUE && cur <= slot {
            return;
        }
        cell.due.set(slot);
        d.slots.entry(slot).or_default().push(cell.id);
    }

    /// Applies the deadlines that have passed by `now`: the connections in
    /// the slots that have come are closed if their deadline passed (or
    /// woken to finish a close) and put back at their next deadline.
    pub fn sweep(&self, now: Now) {
        let upto = (now.mono_ms / SLOT_MS) as u32;
        let mut due: Vec<(u32, ConnId)> = Vec::new();
        let count_gauge = {
            let mut d = self.deadlines.borrow_mut();
            while let Some(e) = d.slots.first_entry() {
                if *e.key() > upto {
                    break;
                }
                let (slot, ids) = e.remove_entry();
                due.extend(ids.into_iter().map(|id| (slot, id)));
            }
            d.done = d.done.max(upto);
            d.ticks = d.ticks.wrapping_add(1);
            d.ticks.is_multiple_of(GAUGE_EVERY)
        };
        self.mqtt_sweep_offline(now);
        for (slot, id) in due {
            let Some(cell) = self.cell(id) else {
                continue;
            };
            if cell.due.get() != slot {
                // Moved to an earlier slot since, and looked at there.
                continue;
            }
            cell.due.set(NOT_DUE);
            self.deadlines.borrow_mut().visits += 1;
            self.mqtt_deadline(&cell, now);
            self.apply_deadline(&cell, now);
            self.arm(&cell);
        }
        if count_gauge {
            let queued: u64 = self
                .conns
                .borrow()
                .values()
                .map(|c| c.conn.borrow().queued_bytes() as u64)
                .sum();
            self.stats.queue_bytes.store(queued, Relaxed);
        }
    }

    /// Closes the connection if a deadline of its state passed, or wakes it
    /// if its close grace is over (the write pass then closes it).
    fn apply_deadline(&self, cell: &ConnCell, now: Now) {
        let ev = {
            let cfg = self.cfg.borrow();
            let mut c = cell.conn.borrow_mut();
            match c.poll_timeout(&cfg.conn) {
                Some(t) if t <= now.mono_ms => c.handle_timeout(&cfg.conn, now),
                _ => None,
            }
        };
        if let Some(Event::Closed(reason)) = ev {
            cell.closing(reason, now.mono_ms + self.cfg().close_grace_ms);
            self.wake(cell);
        } else if cell
            .conn
            .borrow()
            .close_deadline()
            .is_some_and(|d| d <= now.mono_ms)
        {
            self.wake(cell);
        }
    }

    /// Re-arms every connection (settings that shorten deadlines changed).
    pub(super) fn arm_all(&self) {
        let cells: Vec<_> = self.conns.borrow().values().cloned().collect();
        for cell in cells {
            self.arm(&cell);
        }
    }

    /// Connections the sweeps have looked at so far.
    #[cfg(test)]
    pub(super) fn deadline_visits(&self) -> u64 {
        self.deadlines.borrow().visits
    }
}
