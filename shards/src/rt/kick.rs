//! Waking a shard whose I/O loop waits on its sockets itself (the busy
//! loop of `conn.rs`), from another shard or another thread (the cluster
//! link, the rules' workers).
//!
//! While its input is steady, a shard's epoll loop blocks in `epoll_wait`
//! instead of going to sleep through glommio, whose own wake-up mechanism
//! (an eventfd it writes only to an executor it knows is asleep) does not
//! reach a thread blocked there. A batch another shard sends would then wait
//! for the end of the slice. So each shard has a [`Kick`]: an eventfd in its
//! epoll set that a sender writes after queueing a batch, when the shard is
//! blocked there.
//!
//! The handshake, both sides sequentially consistent: the sender marks the
//! shard `pending`, then writes the eventfd if the shard is `waiting`; the
//! shard marks itself `waiting`, then does not block if it finds `pending`.
//! Whichever comes second sees the other's mark, so a batch is never left
//! behind a wait that started after it was queued.

use std::io;
use std::ops::Index;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering::SeqCst;

/// One shard's wake-up from whoever queues work for it.
#[derive(Debug)]
pub(crate) struct Kick {
    efd: OwnedFd,
    /// The shard's loop is (about to be) blocked in `epoll_wait`.
    waiting: AtomicBool,
    /// Something was queued for the shard since it last looked.
    pending: AtomicBool,
}

impl Kick {
    pub(crate) fn new() -> io::Result<Kick> {
        // SAFETY: plain syscall; the result is checked and then owned.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Kick {
            // SAFETY: a fresh descriptor nothing else owns.
            efd: unsafe { OwnedFd::from_raw_fd(fd) },
            waiting: AtomicBool::new(false),
            pending: AtomicBool::new(false),
        })
    }

    /// The eventfd, for the shard's epoll set.
    pub(crate) fn fd(&self) -> RawFd {
        self.efd.as_raw_fd()
    }

    /// Called after something was queued for this shard (by a peer, the
    /// cluster link, a rules worker): wakes the shard if its loop is blocked
    /// on its sockets.
    pub(crate) fn kick(&self) {
        self.pending.store(true, SeqCst);
        if self.waiting.load(SeqCst) {
            let one: u64 = 1;
            // SAFETY: writes 8 bytes from a live u64 to our eventfd. A full
            // counter (EAGAIN) still leaves it readable, which is all we need.
            unsafe { libc::write(self.fd(), (&raw const one).cast(), 8) };
        }
    }

    /// The loop is about to block on its sockets: false if a peer queued
    /// something since the last look (then it must let the executor run
    /// instead). Each `true` is followed by [`Kick::end_wait`].
    pub(crate) fn begin_wait(&self) -> bool {
        self.waiting.store(true, SeqCst);
        if self.pending.swap(false, SeqCst) {
            self.waiting.store(false, SeqCst);
            return false;
        }
        true
    }

    /// The loop's wait returned.
    pub(crate) fn end_wait(&self) {
        self.waiting.store(false, SeqCst);
    }

    /// Reads the eventfd back to zero (it woke the loop).
    pub(crate) fn drain(&self) {
        let mut n: u64 = 0;
        // SAFETY: reads at most 8 bytes into a live u64; non-blocking.
        unsafe { libc::read(self.fd(), (&raw mut n).cast(), 8) };
        self.pending.store(false, SeqCst);
    }
}

/// Every shard's [`Kick`], by shard id; shared with the threads that queue
/// work for the shards.
#[derive(Debug, Clone)]
pub(crate) struct Kicks(Arc<[Kick]>);

impl Kicks {
    pub(crate) fn new(shards: usize) -> io::Result<Kicks> {
        Ok(Kicks(
            (0..shards)
                .map(|_| Kick::new())
                .collect::<io::Result<_>>()?,
        ))
    }

    /// After something was queued that any shard may take.
    pub(crate) fn kick_all(&self) {
        for k in self.0.iter() {
            k.kick();
        }
    }
}

impl Index<usize> for Kicks {
    type Output = Kick;

    fn index(&self, shard: usize) -> &Kick {
        &self.0[shard]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn readable(k: &Kick) -> bool {
        let mut p = libc::pollfd {
            fd: k.fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one live pollfd, no timeout.
        unsafe { libc::poll(&mut p, 1, 0) == 1 }
    }

    #[test]
    fn a_kick_while_the_loop_waits_wakes_it() {
        let k = Kick::new().unwrap();
        assert!(k.begin_wait());
        k.kick();
        assert!(readable(&k));
        k.end_wait();
        k.drain();
        assert!(!readable(&k));
    }

    #[test]
    fn a_kick_before_the_wait_keeps_the_loop_from_blocking() {
        let k = Kick::new().unwrap();
        k.kick();
        // Not waiting: no system call, but the mark stays.
        assert!(!readable(&k));
        assert!(!k.begin_wait());
        // Seen once: the next wait may block.
        assert!(k.begin_wait());
        k.end_wait();
    }

    #[test]
    fn a_kick_between_waits_neither_blocks_nor_writes() {
        let k = Kick::new().unwrap();
        assert!(k.begin_wait());
        k.end_wait();
        k.kick();
        assert!(!readable(&k));
        assert!(!k.begin_wait());
    }
}
