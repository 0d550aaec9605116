//! The write list: connections with output queued or a close to carry out.

use super::*;
use crate::cell::{ConnCell, ConnId};

impl Router {
    /// Puts `cell` on the write list (once) so the I/O loop flushes its
    /// queue or carries out its close; wakes the loop on the first entry.
    pub fn wake(&self, cell: &ConnCell) {
        // Whatever woke it may have moved a deadline earlier.
        self.arm(cell);
        if cell.dirty.replace(true) {
            return;
        }
        let mut d = self.dirty.borrow_mut();
        d.push(cell.id);
        if d.len() == 1 {
            drop(d);
            self.signals.writes_ready();
        }
    }

    /// Takes the write list (the runtime is told of its next first entry).
    pub fn take_dirty(&self, into: &mut Vec<ConnId>) {
        std::mem::swap(&mut *self.dirty.borrow_mut(), into);
    }

    /// Asks the runtime for a write pass (to notice a shutdown).
    pub fn wake_io(&self) {
        self.signals.writes_ready();
    }

    /// Whether any connection waits on the write list.
    pub fn has_dirty(&self) -> bool {
        !self.dirty.borrow().is_empty()
    }
}
