//! The io_uring backend of a shard's I/O loop (`[shards] io = "uring"`): a
//! ring of the shard's own, next to glommio's, that receives, sends and
//! accepts for the shard's client sockets.
//!
//! - **Set-up.** One ring per shard thread, made on that thread with
//!   `SINGLE_ISSUER`, `COOP_TASKRUN` (completing work never interrupts the
//!   running shard; it runs at the shard's next entry into the kernel),
//!   `TASKRUN_FLAG` (the ring says when such work waits, so an idle pass
//!   makes no syscall), and a sparse table of registered files indexed by
//!   the I/O table's slot. Not `DEFER_TASKRUN`: with it the kernel signals
//!   the ring's eventfd from an RCU callback when input arrives for a
//!   sleeping ring, 10-20 ms late, and the sleeping shard is woken only by
//!   that eventfd. Where the kernel refuses these flags (before Linux 6.0)
//!   or io_uring is disabled, no ring is made and the shard runs on epoll.
//! - **Input.** Each connection has one receive in flight, into a provided
//!   buffer ring (`[shards] uring_buffers` buffers of `uring_buffer_size`
//!   bytes): multishot once the connection's hello is accepted, one-shot
//!   before, so a connection that moves to the shard owning its address
//!   (a handover) never has input in flight on this ring. A buffer goes
//!   back to the ring as soon as its bytes are parsed or copied. When the
//!   ring runs dry the kernel ends the receive with `ENOBUFS`; the loop
//!   counts it (`relay_uring_enobufs_total`) and arms it again once the
//!   buffers of the pass are back.
//! - **Output.** A connection has at most one send in flight. The write pass
//!   queues one send per listed connection and the pass ends with one
//!   `io_uring_enter` that submits them all. The bytes of a send stay in
//!   [`Ring::sends`] until its completion, whatever happens to the
//!   connection meanwhile; a short send is resubmitted from where it
//!   stopped.
//! - **Accepts.** One multishot accept per listener.
//! - **Waking.** The ring signals an eventfd that glommio reads: one read in
//!   flight on glommio's ring, kept across passes (no descriptor made or
//!   closed per sleep). The eventfd is signalled only while the loop sleeps
//!   (`IORING_CQ_EVENTFD_DISABLED` is set while it runs), so the loop's own
//!   sends do not wake it again.
//! - **Locked memory.** The buffers themselves are ordinary memory; only the
//!   buffer ring's entries (16 bytes each) are pinned.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU16, Ordering};

use bytes::Bytes;
use io_uring::types::BufRingEntry;
use io_uring::{IoUring, cqueue, opcode, squeue, types};

/// What a completion is for (bits 28..32 of its user data).
pub(super) const OP_RECV: u64 = 1;
pub(super) const OP_SEND: u64 = 2;
pub(super) const OP_ACCEPT: u64 = 3;
pub(super) const OP_CANCEL: u64 = 4;
/// The slot's bits in the user data (the low 32 bits of the connection id
/// are above, as in the epoll token).
const SLOT_BITS: u32 = 28;
const SLOT_MASK: u64 = (1 << SLOT_BITS) - 1;
/// Slots at or past this cannot be named in user data.
pub(super) const MAX_SLOT: u32 = SLOT_MASK as u32;
/// The buffer group of the provided buffers.
const BGID: u16 = 0;
/// Entries of the registered file table (one per slot below it).
const FIXED_FILES: u32 = 1 << 15;

/// The user data of operation `op` for the connection of epoll-style
/// `token` (slot in the low 32 bits, id above).
pub(super) fn user_data(op: u64, token: u64) -> u64 {
    (token & !0xFFFF_FFFF) | (op << SLOT_BITS) | (token & SLOT_MASK)
}

/// The operation and the token of a completion's user data.
pub(super) fn split(data: u64) -> (u64, u64) {
    (
        (data >> SLOT_BITS) & 0xF,
        (data & !0xFFFF_FFFF) | (data & SLOT_MASK),
    )
}

/// The sizes of a shard's ring (`[shards]`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct RingSettings {
    pub entries: u32,
    pub buffers: u16,
    pub buffer_size: u32,
}

/// Builds an operation on `$target`: `$t` is the slot's registered file or
/// the descriptor (two types, hence a macro rather than a function).
macro_rules! on_target {
    ($target:expr, |$t:ident| $build:expr) => {
        match $target {
            Target::Fixed(i) => {
                let $t = types::Fixed(i);
                $build
            }
            Target::Fd(f) => {
                let $t = types::Fd(f);
                $build
            }
        }
    };
}

/// One completion, copied out of the ring so it can be handled while the
/// ring takes new submissions.
#[derive(Debug, Clone, Copy)]
pub(super) struct Done {
    pub data: u64,
    pub result: i32,
    pub flags: u32,
}

/// A shard's ring.
pub(super) struct Ring {
    ring: RefCell<IoUring>,
    bufs: BufRing,
    /// The bytes of every send in flight, by user data.
    sends: RefCell<HashMap<u64, Bytes>>,
    /// Entries of the registered file table (0: none).
    files: u32,
    /// Signalled by the kernel while the loop sleeps.
    event: OwnedFd,
    /// The listeners with an accept armed, by kind.
    listeners: RefCell<[Option<RawFd>; 4]>,
    /// Entries that found the submission ring full while the kernel could
    /// not take more (it answers EBUSY until completions are taken); queued
    /// at the next `submit`. At most the operations the connections have in
    /// flight (a receive, a send and their cancellations each).
    backlog: RefCell<Vec<squeue::Entry>>,
    /// The I/O loop's waker while it sleeps: an entry queued from another
    /// task (the sweeper resuming accepts, a connection handed over) wakes
    /// it, since only the loop submits.
    sleeper: RefCell<Option<std::task::Waker>>,
}

impl std::fmt::Debug for Ring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ring")
            .field("files", &self.files)
            .field("sends", &self.sends.borrow().len())
            .finish()
    }
}

impl Ring {
    /// Makes the calling shard thread's ring.
    pub(super) fn new(s: RingSettings) -> io::Result<Ring> {
        let entries = s.entries.clamp(8, 32_768);
        let cq = (entries * 8).min(65_536);
        // Without SINGLE_ISSUER (Linux 6.0) the ring is not made and the
        // shard uses epoll: multishot receives are as old. No
        // DEFER_TASKRUN: see the module's comment (Waking).
        let ring = IoUring::builder()
            .setup_single_issuer()
            .setup_coop_taskrun()
            .setup_taskrun_flag()
            .setup_cqsize(cq)
            .build(entries)?;
        // A blocking eventfd: glommio's read of it waits in its ring.
        // SAFETY: plain syscall; the result is checked and then owned.
        let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if efd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh fd that nothing else owns.
        let event = unsafe { OwnedFd::from_raw_fd(efd) };
        ring.submitter().register_eventfd(event.as_raw_fd())?;
        // The kernel refuses a table larger than the open-file limit.
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes into the struct we pass.
        let nofile = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 {
            lim.rlim_cur.min(u64::from(FIXED_FILES)) as u32
        } else {
            0
        };
        let files = match ring.submitter().register_files_sparse(nofile) {
            Ok(()) => nofile,
            Err(e) => {
                tracing::info!("io_uring without registered files ({e})");
                0
            }
        };
        let bufs = BufRing::new(s.buffers, s.buffer_size)?;
        // SAFETY: the ring memory lives in `bufs`, which the ring outlives
        // only after `Drop` unregisters it.
        unsafe {
            ring.submitter().register_buf_ring_with_flags(
                bufs.ring.as_ptr() as u64,
                bufs.entries,
                BGID,
                0,
            )?;
        }
        // Disabled while the loop runs; `may_sleep` enables it.
        let mut ring = ring;
        ring.completion().disable_eventfd();
        Ok(Ring {
            ring: RefCell::new(ring),
            bufs,
            sends: RefCell::default(),
            files,
            event,
            listeners: RefCell::new([None; 4]),
            backlog: RefCell::default(),
            sleeper: RefCell::default(),
        })
    }

    /// A duplicate of the eventfd, for glommio to read.
    pub(super) fn event_fd(&self) -> io::Result<OwnedFd> {
        self.event.try_clone()
    }

    /// Queues `sqe`, submitting what is queued first when the ring is full
    /// (or keeping it in the backlog when the kernel takes nothing now).
    fn push(&self, sqe: squeue::Entry) {
        if let Some(w) = self.sleeper.borrow_mut().take() {
            w.wake();
        }
        let mut ring = self.ring.borrow_mut();
        if !self.backlog.borrow().is_empty() {
            self.backlog.borrow_mut().push(sqe);
            return;
        }
        loop {
            // SAFETY: every buffer an entry names outlives its operation:
            // sends keep theirs in `sends`, receives use the buffer ring.
            if unsafe { ring.submission().push(&sqe) }.is_ok() {
                return;
            }
            match ring.submit() {
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Ok(n) if n > 0 => {}
                // EBUSY, or nothing taken: the entry waits for the next
                // pass, after its completions are taken.
                _ => {
                    self.backlog.borrow_mut().push(sqe);
                    return;
                }
            }
        }
    }

    /// Moves what the backlog holds into the submission ring, as room allows.
    fn drain_backlog(&self, ring: &mut IoUring) {
        let mut backlog = self.backlog.borrow_mut();
        let mut taken = 0;
        for sqe in backlog.iter() {
            // SAFETY: as in `push`.
            if unsafe { ring.submission().push(sqe) }.is_err() {
                break;
            }
            taken += 1;
        }
        backlog.drain(..taken);
    }

    /// Submits what is queued and runs the deferred work (input that
    /// arrived), without waiting. No syscall when there is nothing to do.
    pub(super) fn submit(&self) {
        let mut ring = self.ring.borrow_mut();
        self.drain_backlog(&mut ring);
        let queued = !ring.submission().is_empty();
        let work = ring.submission().taskrun() || ring.submission().cq_overflow();
        if !queued && !work {
            return;
        }
        loop {
            match ring.submit() {
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => return,
                Err(e) => {
                    crate::warn_every!("io_uring submit: {e}");
                    return;
                }
                Ok(_) => return,
            }
        }
    }

    /// Takes up to `max` completions.
    pub(super) fn reap(&self, out: &mut Vec<Done>, max: usize) {
        let mut ring = self.ring.borrow_mut();
        for c in ring.completion().take(max) {
            out.push(Done {
                data: c.user_data(),
                result: c.result(),
                flags: c.flags(),
            });
        }
    }

    /// Nothing waits: no completion, no deferred work. Enables the eventfd
    /// first, so work that comes after this check signals it.
    pub(super) fn may_sleep(&self) -> bool {
        let mut ring = self.ring.borrow_mut();
        ring.completion().enable_eventfd();
        std::sync::atomic::fence(Ordering::SeqCst);
        let idle = ring.completion().is_empty()
            && !ring.submission().taskrun()
            && ring.submission().is_empty()
            && self.backlog.borrow().is_empty();
        if !idle {
            ring.completion().disable_eventfd();
        }
        idle
    }

    /// The loop runs: the kernel need not signal, nor a new entry wake it.
    pub(super) fn awake(&self) {
        self.sleeper.borrow_mut().take();
        self.ring.borrow_mut().completion().disable_eventfd();
    }

    /// The loop sleeps: an entry queued meanwhile wakes `waker`.
    pub(super) fn sleeping(&self, waker: &std::task::Waker) {
        *self.sleeper.borrow_mut() = Some(waker.clone());
    }

    /// Completions or deferred work wait.
    pub(super) fn has_work(&self) -> bool {
        let mut ring = self.ring.borrow_mut();
        !ring.completion().is_empty() || ring.submission().taskrun()
    }

    /// The descriptor an operation on `slot` names: its registered file
    /// when the slot has one.
    fn target(&self, fd: RawFd, slot: u32) -> Target {
        if slot < self.files {
            Target::Fixed(slot)
        } else {
            Target::Fd(fd)
        }
    }

    /// Registers `fd` as the file of `slot` (if the table reaches it).
    pub(super) fn register(&self, slot: u32, fd: RawFd) {
        if slot < self.files
            && let Err(e) = self
                .ring
                .borrow()
                .submitter()
                .register_files_update(slot, &[fd])
        {
            crate::warn_every!("io_uring: registering a file: {e}");
        }
    }

    /// Empties `slot`'s entry of the registered file table.
    pub(super) fn unregister(&self, slot: u32) {
        if slot < self.files {
            let _ = self
                .ring
                .borrow()
                .submitter()
                .register_files_update(slot, &[-1]);
        }
    }

    /// Arms the receive of the connection `token` (slot `slot`): multishot
    /// or one read.
    pub(super) fn recv(&self, fd: RawFd, token: u64, multishot: bool) {
        let slot = (token & SLOT_MASK) as u32;
        let data = user_data(OP_RECV, token);
        let target = self.target(fd, slot);
        let sqe = if multishot {
            on_target!(target, |t| opcode::RecvMulti::new(t, BGID).build())
        } else {
            on_target!(target, |t| opcode::Recv::new(
                t,
                std::ptr::null_mut(),
                self.bufs.size
            )
            .buf_group(BGID)
            .build()
            .flags(squeue::Flags::BUFFER_SELECT))
        };
        self.push(sqe.user_data(data));
    }

    /// Sends `bytes` on the connection `token`; they stay here until the
    /// send completes.
    pub(super) fn send(&self, fd: RawFd, token: u64, bytes: Bytes) {
        let slot = (token & SLOT_MASK) as u32;
        let data = user_data(OP_SEND, token);
        let (ptr, len) = (bytes.as_ptr(), bytes.len() as u32);
        let flags = libc::MSG_NOSIGNAL;
        let sqe = on_target!(self.target(fd, slot), |t| opcode::Send::new(t, ptr, len)
            .flags(flags)
            .build());
        if let Some(old) = self.sends.borrow_mut().insert(data, bytes) {
            // Never two sends in flight for one connection; keep the old
            // bytes alive rather than free what the kernel may still read.
            std::mem::forget(old);
            crate::warn_every!("io_uring: a second send in flight for one connection");
        }
        self.push(sqe.user_data(data));
    }

    /// The bytes of the send `data` completed with `result`: what is left
    /// to send (resubmitted by the caller), or `None` once all went (or the
    /// send failed).
    pub(super) fn sent(&self, data: u64, result: i32) -> Option<Bytes> {
        let bytes = self.sends.borrow_mut().remove(&data)?;
        if result <= 0 || result as usize >= bytes.len() {
            return None;
        }
        Some(bytes.slice(result as usize..))
    }

    /// The connection `token` leaves this ring (it moves to another
    /// shard): a receive still in flight (`armed`) is cancelled before the
    /// socket goes, and its registered file is dropped.
    pub(super) fn forget(&self, token: u64, armed: bool) {
        if armed {
            let ring = self.ring.borrow();
            let _ = ring.submit();
            let what = types::CancelBuilder::user_data(user_data(OP_RECV, token));
            let wait = types::Timespec::new().sec(1);
            if let Err(e) = ring.submitter().register_sync_cancel(Some(wait), what)
                && e.kind() != io::ErrorKind::NotFound
            {
                crate::warn_every!("io_uring: cancelling a receive: {e}");
            }
        }
        self.unregister((token & SLOT_MASK) as u32);
    }

    /// Cancels the operation `op` of the connection `token`.
    pub(super) fn cancel(&self, op: u64, token: u64) {
        let sqe = opcode::AsyncCancel::new(user_data(op, token)).build();
        self.push(sqe.user_data(user_data(OP_CANCEL, token)));
    }

    /// Arms a multishot accept on listener `fd` of `kind` (0..4).
    pub(super) fn accept(&self, fd: RawFd, kind: usize) {
        if let Some(l) = self.listeners.borrow_mut().get_mut(kind) {
            *l = Some(fd);
        }
        let sqe = opcode::AcceptMulti::new(types::Fd(fd))
            .flags(libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK)
            .build()
            .user_data(user_data(OP_ACCEPT, kind as u64));
        self.push(sqe);
    }

    /// Cancels the accept of listener `fd`, if one is armed.
    pub(super) fn stop_accept(&self, fd: RawFd) {
        let kind = self
            .listeners
            .borrow_mut()
            .iter_mut()
            .position(|l| *l == Some(fd));
        if let Some(k) = kind {
            self.listeners.borrow_mut()[k] = None;
            self.cancel(OP_ACCEPT, k as u64);
        }
    }

    /// The listener of `kind`, while its accept is armed.
    pub(super) fn listener(&self, kind: usize) -> Option<RawFd> {
        self.listeners.borrow().get(kind).copied().flatten()
    }

    /// The bytes of a receive's buffer.
    pub(super) fn buffer(&self, flags: u32, len: usize) -> Option<(u16, &[u8])> {
        let bid = cqueue::buffer_select(flags)?;
        Some((bid, self.bufs.get(bid, len)))
    }

    /// Gives buffer `bid` back (visible to the kernel at `publish`).
    pub(super) fn recycle(&self, bid: u16) {
        self.bufs.recycle(bid);
    }

    /// Makes the recycled buffers visible to the kernel.
    pub(super) fn publish(&self) {
        self.bufs.publish();
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        let ring = self.ring.get_mut();
        // Every operation still in flight ends before the buffers it names
        // go: receives write into the pool, sends read from `sends`.
        let all = types::CancelBuilder::any();
        let wait = types::Timespec::new().sec(1);
        let cancelled = match ring.submitter().register_sync_cancel(Some(wait), all) {
            Ok(()) => true,
            Err(e) => e.kind() == io::ErrorKind::NotFound,
        };
        let _ = ring.submitter().unregister_buf_ring(BGID);
        if !cancelled {
            // Some operation would not end: its bytes are never freed.
            std::mem::forget(std::mem::take(self.sends.get_mut()));
            std::mem::forget(std::mem::take(&mut self.bufs.pool));
        }
    }
}

/// Where an operation goes: a registered file or a descriptor.
enum Target {
    Fixed(u32),
    Fd(RawFd),
}

/// The provided buffers: a page-aligned ring of entries the kernel takes
/// buffers from, and the buffers.
struct BufRing {
    ring: NonNull<BufRingEntry>,
    ring_bytes: usize,
    entries: u16,
    size: u32,
    pool: Box<[u8]>,
    /// The tail as written so far (published at `publish`).
    tail: Cell<u16>,
}

impl BufRing {
    fn new(entries: u16, size: u32) -> io::Result<BufRing> {
        let entries = entries.clamp(1, 32_768).next_power_of_two();
        let ring_bytes = usize::from(entries) * std::mem::size_of::<BufRingEntry>();
        // SAFETY: anonymous private mapping; checked below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                ring_bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ring = NonNull::new(ptr.cast::<BufRingEntry>()).ok_or(io::ErrorKind::OutOfMemory)?;
        let size = size.max(64);
        let b = BufRing {
            ring,
            ring_bytes,
            entries,
            size,
            pool: vec![0u8; usize::from(entries) * size as usize].into_boxed_slice(),
            tail: Cell::new(0),
        };
        for bid in 0..entries {
            b.recycle(bid);
        }
        b.publish();
        Ok(b)
    }

    fn get(&self, bid: u16, len: usize) -> &[u8] {
        let start = usize::from(bid) * self.size as usize;
        let len = len.min(self.size as usize);
        self.pool.get(start..start + len).unwrap_or(&[])
    }

    fn recycle(&self, bid: u16) {
        if bid >= self.entries {
            return;
        }
        let tail = self.tail.get();
        let i = usize::from(tail & (self.entries - 1));
        let addr = self.pool.as_ptr() as u64 + u64::from(bid) * u64::from(self.size);
        // SAFETY: `i` is below `entries`, inside the mapping; the kernel
        // reads entries only up to the published tail, and this one is
        // past it.
        unsafe {
            let e = &mut *self.ring.as_ptr().add(i);
            e.set_addr(addr);
            e.set_len(self.size);
            e.set_bid(bid);
        }
        self.tail.set(tail.wrapping_add(1));
    }

    fn publish(&self) {
        // SAFETY: the tail field of the first entry, per the uring ABI; the
        // mapping is page-aligned and lives as long as `self`.
        unsafe {
            let tail = BufRingEntry::tail(self.ring.as_ptr()) as *const AtomicU16;
            (*tail).store(self.tail.get(), Ordering::Release);
        }
    }
}

impl Drop for BufRing {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, unregistered by `Ring::drop`.
        unsafe { libc::munmap(self.ring.as_ptr().cast(), self.ring_bytes) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_data_carries_the_operation_and_the_token() {
        let token = 12_345u64 | (0xDEAD_BEEFu64 << 32);
        for op in [OP_RECV, OP_SEND, OP_ACCEPT, OP_CANCEL] {
            assert_eq!(split(user_data(op, token)), (op, token));
        }
    }

    /// Whether `fd` is readable now (poll with no wait).
    fn readable(fd: RawFd) -> bool {
        let mut p = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, no timeout.
        unsafe { libc::poll(&mut p, 1, 0) == 1 }
    }

    /// A receive that completes while the loop sleeps must signal the
    /// eventfd at once: the sleeping shard is woken only by it. (With
    /// DEFER_TASKRUN the kernel defers that signal to an RCU callback,
    /// which left an idle shard asleep for 10-20 ms after input arrived.)
    #[test]
    fn input_for_a_sleeping_ring_signals_its_eventfd_at_once() {
        use std::io::Write;
        use std::os::unix::net::UnixStream;
        let ring = Ring::new(RingSettings {
            entries: 16,
            buffers: 4,
            buffer_size: 256,
        })
        .expect("an io_uring");
        let event = ring.event_fd().unwrap();
        let (ours, mut peer) = UnixStream::pair().unwrap();
        // A slot past the registered table: the descriptor itself is used.
        let token = u64::from(MAX_SLOT) | (7 << 32);
        for round in 0..20u8 {
            ring.recv(ours.as_raw_fd(), token, false);
            ring.submit();
            assert!(ring.may_sleep(), "round {round}: nothing is ready yet");
            assert!(
                !readable(event.as_raw_fd()),
                "round {round}: no signal before input"
            );
            peer.write_all(&[round; 8]).unwrap();
            // The receive completed during the write (same thread): the
            // eventfd is readable now, not after a grace period.
            assert!(
                readable(event.as_raw_fd()),
                "round {round}: input did not signal"
            );
            let mut n = [0u8; 8];
            // SAFETY: reads 8 bytes into a local buffer.
            assert_eq!(
                unsafe { libc::read(event.as_raw_fd(), n.as_mut_ptr().cast(), 8) },
                8
            );
            ring.awake();
            ring.submit();
            let mut done = Vec::new();
            ring.reap(&mut done, 8);
            assert_eq!(done.len(), 1, "round {round}: one receive completed");
            assert_eq!(done[0].result, 8);
            let (bid, got) = ring.buffer(done[0].flags, 8).expect("a provided buffer");
            assert_eq!(got, &[round; 8]);
            ring.recycle(bid);
            ring.publish();
        }
    }
}
