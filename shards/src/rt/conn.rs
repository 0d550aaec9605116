//! The shard's I/O loop: one task per shard drives every client socket it
//! owns (controllers over TCP and browsers over WebSocket) through one epoll
//! set, instead of one task and one io_uring poll per connection.
//!
//! - Readiness is level-triggered on input. A readable socket is read into
//!   the shard's shared read buffer, and bytes are copied into the
//!   connection's own buffer only while a frame is incomplete, so an idle
//!   connection holds no buffer at all.
//! - Routing queues frames on the recipients' `Connection`s and puts them on
//!   the router's write list; after each pass over the ready sockets the loop
//!   writes every listed connection once, so all that was queued for a
//!   connection during the pass leaves in one `send`.
//! - The epoll set itself is awaited through glommio's ring, so timers, the
//!   cross-shard mesh and the HTTP tasks share the thread fairly: after each
//!   busy pass the loop yields its task queue and the executor polls its I/O.
//! - Each socket's state (descriptor, TLS session, partial buffers, epoll
//!   flags) lives in the shard's I/O table (`io.rs`), not in the router's
//!   record: an event's token names its slot, and the loop works on the
//!   state taken out of the slot (an `Entry`) while it reads, routes and
//!   writes.

use std::future::poll_fn;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::task::Poll;

use bytes::BytesMut;
use futures_lite::AsyncRead;
use glommio::net::TcpStream;
use relay_core::conn::{CloseReason, Event, Hello, Transport};
use relay_core::frame::ErrorCode;

use super::Handover;
use super::io::{ARMED, CANCELLING, CLOSE_SENT, Entry, Io, MULTI, Partial};
use super::pace::Pacer;
use super::tls;
use super::uring::{self, Ring};
use super::{Shard, now};
use crate::cell::{ConnCell, ConnId};
use crate::router::{Outcome, Router};
use crate::stats::ShardStats;
use crate::ws::{self, WsDecoder, WsMsg};

/// Largest single write; a fuller queue goes out in several.
const MAX_WRITE: usize = 256 * 1024;
/// Reads of one socket per pass before the others get their turn.
const READ_BUDGET: u32 = 4;
/// Connections accepted per pass.
const ACCEPT_BUDGET: u32 = 64;
/// Events taken from the epoll set per pass.
const EVENTS: usize = 256;
/// How often the loop polls when it cannot arm its wait (no descriptor free).
const FALLBACK_POLL: std::time::Duration = std::time::Duration::from_millis(2);

/// What the I/O loop does after the passes of one wake-up.
enum Next {
    /// More is ready: let the executor run its other tasks, then go on.
    Busy,
    /// Let the executor look at its ring, its timers and other threads'
    /// wake-ups, run what they woke, then go on (the end of a busy slice).
    /// A task that merely yields would be run again at once: glommio polls
    /// its ring only when no task is runnable, or when its preemption timer
    /// (100 ms) fires. A timer already due makes the loop not runnable until
    /// that poll, without the executor going to sleep.
    Look,
    /// Take the next pass after this long (batching steady input, or no
    /// way to wait on input).
    Pause(std::time::Duration),
}

/// Runs what `next` asks for.
async fn after(next: Next) {
    match next {
        Next::Busy => glommio::executor().yield_task_queue_now().await,
        Next::Look => {
            glommio::timer::sleep(std::time::Duration::from_micros(1)).await;
        }
        Next::Pause(d) => glommio::timer::sleep(d).await,
    }
}
/// Room counted against a sender's queue for each answer other shards still
/// owe it (an ERROR with a 64-byte address in the JSON form over WebSocket
/// stays under this).
const ANSWER_RESERVE: usize = 256;
/// The listener's token in the epoll set (connections' tokens never reach
/// it, see `Entry::token`).
const LISTENER: u64 = u64::MAX;
/// The TLS listener's token.
const TLS_LISTENER: u64 = u64::MAX - 1;
/// The MQTT listener's token.
const MQTT_LISTENER: u64 = u64::MAX - 2;
/// The MQTT over TLS listener's token.
const MQTT_TLS_LISTENER: u64 = u64::MAX - 3;
/// The busy loop runs while the pacer expects two events or more in this
/// long.
const STEADY_WINDOW: std::time::Duration = std::time::Duration::from_millis(1);
/// The token of the shard's [`Kick`](super::kick::Kick) eventfd.
const KICK: u64 = u64::MAX - 4;
/// The token of the sockets the executor drives (HTTP), watched only so
/// that their input ends the busy loop's wait (see `Poller::watch_executor`).
const EXECUTOR: u64 = u64::MAX - 5;
const IN: u32 = (libc::EPOLLIN | libc::EPOLLRDHUP) as u32;

#[path = "conn_uring.rs"]
mod on_ring;
pub(super) use on_ring::run as run_uring;

/// The shard's epoll set, or its io_uring ring (`[shards] io`).
#[derive(Debug)]
pub(super) struct Poller {
    epfd: OwnedFd,
    ring: Option<Ring>,
}

/// The listener kind a listener token names (the ring's accept slots).
fn listener_kind(token: u64) -> usize {
    (u64::MAX - token) as usize
}

impl Poller {
    /// The epoll set, watching the shard's `kick` eventfd, and the ring
    /// when `ring` is given.
    pub(super) fn new(ring: Option<Ring>, kick: RawFd) -> io::Result<Poller> {
        // SAFETY: plain syscall; the returned fd is checked and then owned.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh fd that nothing else owns.
        let poller = Poller {
            epfd: unsafe { OwnedFd::from_raw_fd(fd) },
            ring,
        };
        poller.add(kick, KICK)?;
        Ok(poller)
    }

    /// The ring, on the io_uring backend.
    pub(super) fn ring(&self) -> Option<&Ring> {
        self.ring.as_ref()
    }

    /// Watches a listener (its token names which): an epoll entry, or a
    /// multishot accept on the ring.
    fn watch(&self, fd: RawFd, token: u64) -> io::Result<()> {
        match &self.ring {
            Some(r) => {
                r.accept(fd, listener_kind(token));
                Ok(())
            }
            None => self.add(fd, token),
        }
    }

    fn ctl(&self, op: libc::c_int, fd: RawFd, events: u32, token: u64) -> io::Result<()> {
        let mut ev = libc::epoll_event { events, u64: token };
        // SAFETY: `ev` outlives the call; the kernel copies it.
        let r = unsafe { libc::epoll_ctl(self.epfd.as_raw_fd(), op, fd, &mut ev) };
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    fn add(&self, fd: RawFd, token: u64) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_ADD, fd, IN, token)
    }

    /// Watches `fd`, a socket that the executor drives (the HTTP listener,
    /// an HTTP connection), so that new input ends the busy loop's wait:
    /// the executor, not this set, sees to it. Edge-triggered, each arrival
    /// is reported once. Epoll only (the ring's loop does not block outside
    /// the executor). Nothing is lost when it cannot be watched: the input
    /// then waits for the end of the slice.
    pub(super) fn watch_executor(&self, fd: RawFd) {
        if self.ring.is_none() {
            let events = IN | libc::EPOLLET as u32;
            let _ = self.ctl(libc::EPOLL_CTL_ADD, fd, events, EXECUTOR);
        }
    }

    /// Stops watching `fd` for the executor; called while `fd` is open
    /// (epoll drops an entry by itself only when the socket's last
    /// descriptor closes, and a duplicate would keep it).
    pub(super) fn unwatch_executor(&self, fd: RawFd) {
        if self.ring.is_none() {
            let _ = self.ctl(libc::EPOLL_CTL_DEL, fd, 0, 0);
        }
    }

    /// Watches the controllers' listener (again, after a pause).
    pub(super) fn watch_listener(&self, fd: RawFd) -> io::Result<()> {
        self.watch(fd, LISTENER)
    }

    /// Watches the controllers' TLS listener (again, after a pause).
    pub(super) fn watch_tls_listener(&self, fd: RawFd) -> io::Result<()> {
        self.watch(fd, TLS_LISTENER)
    }

    /// Watches an MQTT listener (`tls`: the MQTT over TLS one).
    pub(super) fn watch_mqtt_listener(&self, fd: RawFd, tls: bool) -> io::Result<()> {
        self.watch(
            fd,
            if tls {
                MQTT_TLS_LISTENER
            } else {
                MQTT_LISTENER
            },
        )
    }

    /// Watches `fd` (under `token`) for what `io` needs: input unless it is
    /// paused, output while a write waits for room. On the ring: arms the
    /// receive, or cancels it while the connection is paused.
    pub(super) fn rearm(
        &self,
        fd: RawFd,
        token: u64,
        io: &mut Io,
        cell: &ConnCell,
    ) -> io::Result<()> {
        if let Some(ring) = &self.ring {
            sync_recv(ring, fd, token, io, cell);
            return Ok(());
        }
        let mut events = if io.paused { 0 } else { IN };
        if io.want_out {
            events |= libc::EPOLLOUT as u32;
        }
        self.ctl(libc::EPOLL_CTL_MOD, fd, events, token)
    }

    /// Stops watching `fd` (a listener's accept on the ring).
    fn remove(&self, fd: RawFd) {
        match &self.ring {
            Some(r) => r.stop_accept(fd),
            None => {
                let _ = self.ctl(libc::EPOLL_CTL_DEL, fd, 0, 0);
            }
        }
    }

    /// Takes what is ready without blocking.
    fn ready(&self, events: &mut [libc::epoll_event]) -> usize {
        self.ready_within(events, 0)
    }

    fn ready_within(&self, events: &mut [libc::epoll_event], ms: libc::c_int) -> usize {
        // SAFETY: the kernel writes at most `events.len()` entries.
        let n = unsafe {
            libc::epoll_wait(
                self.epfd.as_raw_fd(),
                events.as_mut_ptr(),
                events.len() as libc::c_int,
                ms,
            )
        };
        n.max(0) as usize
    }

    /// Waits up to `timeout` for something to be ready (the busy loop).
    fn wait(&self, events: &mut [libc::epoll_event], timeout: std::time::Duration) -> usize {
        let ts = libc::timespec {
            tv_sec: timeout.as_secs() as libc::time_t,
            tv_nsec: timeout.subsec_nanos() as libc::c_long,
        };
        // SAFETY: the kernel writes at most `events.len()` entries and only
        // reads `ts`; no signal mask.
        let n = unsafe {
            libc::epoll_pwait2(
                self.epfd.as_raw_fd(),
                events.as_mut_ptr(),
                events.len() as libc::c_int,
                &ts,
                std::ptr::null(),
            )
        };
        if n < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::ENOSYS) {
            // Before Linux 5.11: whole milliseconds, rounded up.
            let ms = timeout.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32;
            return self.ready_within(events, ms);
        }
        n.max(0) as usize
    }

    /// A glommio stream over a duplicate of the epoll fd: glommio arms an
    /// io_uring poll for readability when it is made, so polling it for a
    /// read reports "ready" (as an error, since it is no socket) once the
    /// set has events. Made afresh for each wait; dropping it closes only
    /// the duplicate (the set lives on in `epfd`).
    fn waiter(&self) -> io::Result<TcpStream> {
        // SAFETY: plain syscall on an fd we own; the result is checked.
        let fd = unsafe { libc::fcntl(self.epfd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the duplicate is ours alone and closes with the stream.
        Ok(unsafe { TcpStream::from_raw_fd(fd) })
    }
}

/// Brings the ring's receive for a connection in line with what it needs:
/// one in flight unless it is paused or at its end (multishot once its
/// hello is accepted, see `uring`), none while paused (a multishot one is
/// cancelled; what it still delivers waits in the connection's buffer).
fn sync_recv(ring: &Ring, fd: RawFd, token: u64, io: &mut Io, cell: &ConnCell) {
    let want = !io.paused && !io.eof;
    if want && !io.has(ARMED) {
        let multishot = cell.conn.borrow().is_open();
        ring.recv(fd, token, multishot);
        io.mark(ARMED, true);
        io.mark(MULTI, multishot);
        io.mark(CANCELLING, false);
    } else if !want && io.has(ARMED) && io.has(MULTI) && !io.has(CANCELLING) {
        ring.cancel(uring::OP_RECV, token);
        io.mark(CANCELLING, true);
    }
}

/// Runs the shard's I/O loop: accepts controllers on `listener` (already
/// watched, see `Poller::watch_listener`) and drives every client connection
/// of the shard. Ends when the shard drops it.
///
/// Waiting for input, two ways:
/// - Sparse input (heartbeats): the loop arms a poll of its epoll set on
///   glommio's ring and returns; the executor sleeps until something is
///   ready, whatever it is (sockets, HTTP, timers, other threads).
/// - Steady input (two events or more expected per millisecond, see
///   [`Pacer::steady`]): going to sleep through glommio and waking from it
///   takes several io_uring submissions, timer arms and cancellations, which
///   cost more than the one message each wake-up handles. The loop then
///   blocks in `epoll_pwait2` itself, for what is left of its slice, and gives
///   the thread back to the executor when the slice ends, when it woke
///   another of the shard's tasks (the flusher), or when it is kicked (its
///   eventfd is in the set, see `kick.rs`) by another shard, the cluster link
///   or a rules worker, or when an HTTP socket (driven by the executor) has
///   input. Its pauses (`coalesce_us`) that fit the slice are taken in
///   place too. The shard's timers wait at most one slice.
pub(super) async fn run(
    shard: Rc<Shard>,
    listener: socket2::Socket,
    mut tls_listener: Option<socket2::Socket>,
    mut mqtt: [Option<socket2::Socket>; 2],
) {
    let mut listener = Some(listener);
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; EVENTS];
    let mut dirty: Vec<ConnId> = Vec::new();
    let mut waiter: Option<TcpStream> = None;
    let mut degraded = false;
    let mut pacer = Pacer::new(shard.shared.coalesce);
    // Until then the loop sleeps through the executor: HTTP is under way.
    let mut http_until: Option<std::time::Instant> = None;
    let slice = shard.shared.slice;
    let kick = &shard.shared.kicks[shard.router.shard];
    loop {
        let next = poll_fn(|cx| {
            let mut handled = 0;
            // The executor handed the thread over: a slice begins.
            let slice_began = std::time::Instant::now();
            let mut block = None;
            loop {
                let router = &shard.router;
                stop_accepting(&shard, &mut listener, &mut tls_listener, &mut mqtt);
                let waited = block.is_some();
                let n = match block.take() {
                    Some(d) => {
                        let n = shard.poller.wait(&mut events, d);
                        kick.end_wait();
                        n
                    }
                    None => shard.poller.ready(&mut events),
                };
                let began = std::time::Instant::now();
                // Work queued elsewhere wants the executor to run.
                let mut look = false;
                handled += n;
                let t = now();
                for ev in &events[..n] {
                    let token = ev.u64;
                    if token == KICK || token == EXECUTOR {
                        if token == KICK {
                            kick.drain();
                        } else {
                            // Input for the executor's sockets (HTTP): for
                            // one slice more sleep through the executor, not
                            // in the busy wait: each step of the exchange
                            // (the read, the answer, the close) is a
                            // submission on its ring that it completes only
                            // when it runs.
                            http_until = Some(began + slice);
                        }
                        if waited {
                            ShardStats::add(&router.stats.kicked_waits, 1);
                        }
                        look = true;
                        handled -= 1;
                        continue;
                    }
                    if token == LISTENER {
                        if let Some(l) = &listener {
                            accept_ready(&shard, l, false, false);
                        }
                        continue;
                    }
                    if token == TLS_LISTENER {
                        if let Some(l) = &tls_listener {
                            accept_ready(&shard, l, true, false);
                        }
                        continue;
                    }
                    if token == MQTT_LISTENER {
                        if let Some(l) = &mqtt[0] {
                            accept_ready(&shard, l, false, true);
                        }
                        continue;
                    }
                    if token == MQTT_TLS_LISTENER {
                        if let Some(l) = &mqtt[1] {
                            accept_ready(&shard, l, true, true);
                        }
                        continue;
                    }
                    let Some(entry) = shard.sockets.by_token(token) else {
                        continue;
                    };
                    let e = ev.events;
                    if e & libc::EPOLLOUT as u32 != 0 {
                        router.wake(&entry.cell);
                    }
                    if e & (IN | (libc::EPOLLHUP | libc::EPOLLERR) as u32) != 0 {
                        on_readable(&shard, entry, t);
                    }
                }
                write_pass(&shard, cx.waker(), &mut dirty);
                if n == events.len() {
                    // More may be ready: let the executor poll its ring
                    // before the next pass (counted in the rate all the same).
                    pacer.after_pass(std::mem::take(&mut handled), began);
                    return Poll::Ready(Next::Busy);
                }
                let pause = pacer.after_pass(std::mem::take(&mut handled), began);
                // The busy loop (see above): while input is steady, and
                // nothing else of the shard waits for the thread, stay.
                // Steady: two events or more a millisecond (2,000 a second),
                // whatever the slice. An idle fleet's heartbeats (600 a
                // second for 18,000 controllers) stay below it and sleep
                // through glommio, with the pacer's pauses.
                let http = http_until.is_some_and(|u| began < u);
                let steady = !slice.is_zero() && !http && pacer.steady(STEADY_WINDOW);
                let left = slice.saturating_sub(slice_began.elapsed());
                let other = shard.wakers.take_other();
                let stay = steady
                    && !other
                    && !look
                    && !left.is_zero()
                    && !glommio::executor().need_preempt();
                if let Some(d) = pause {
                    if stay && d < left {
                        std::thread::sleep(d);
                        continue;
                    }
                    return Poll::Ready(Next::Pause(d));
                }
                if stay && kick.begin_wait() {
                    ShardStats::add(&router.stats.busy_waits, 1);
                    block = Some(left);
                    continue;
                }
                if steady && other && !look && !left.is_zero() {
                    // Another of the shard's tasks (the flusher) was woken:
                    // it runs, then the loop goes on.
                    return Poll::Ready(Next::Busy);
                }
                if steady || look {
                    // The slice is over, or work queued elsewhere (a peer's
                    // batch, another node's frames, a rule's action, HTTP)
                    // waits behind a wake-up that glommio takes from its
                    // ring.
                    return Poll::Ready(Next::Look);
                }
                // Everything ready was taken: arm the wait now rather than
                // yield and ask the set again (one syscall and one executor
                // round less per wake-up; a socket still readable makes the
                // wait ready at once).
                if waiter.is_none() {
                    match shard.poller.waiter() {
                        Ok(w) => waiter = Some(w),
                        Err(e) => {
                            // Out of descriptors: poll on a short timer until
                            // one is free, rather than spin.
                            if !degraded {
                                tracing::warn!(
                                    "shard {}: cannot wait on epoll ({e}); polling every {} ms",
                                    router.shard,
                                    FALLBACK_POLL.as_millis()
                                );
                                degraded = true;
                            }
                            return Poll::Ready(Next::Pause(FALLBACK_POLL));
                        }
                    }
                }
                degraded = false;
                let Some(w) = waiter.as_mut() else {
                    return Poll::Ready(Next::Pause(FALLBACK_POLL));
                };
                match Pin::new(w).poll_read(cx, &mut []) {
                    Poll::Pending => {
                        if router.has_dirty() {
                            continue;
                        }
                        return Poll::Pending;
                    }
                    // Readable (reported as an error: it is not a socket).
                    Poll::Ready(_) => waiter = None,
                }
            }
        })
        .await;
        after(next).await;
    }
}

/// Once the shard is shutting down, stops accepting: the listeners are no
/// longer watched and close (`None` from then on).
fn stop_accepting(
    shard: &Rc<Shard>,
    listener: &mut Option<socket2::Socket>,
    tls_listener: &mut Option<socket2::Socket>,
    mqtt: &mut [Option<socket2::Socket>; 2],
) {
    if listener.is_none()
        || !(shard.router.is_shutting_down() || shard.shared.stop.load(Ordering::Relaxed))
    {
        return;
    }
    if let Some(l) = listener.take() {
        shard.poller.remove(l.as_raw_fd());
        shard.listen_fd.set(None);
    }
    if let Some(l) = tls_listener.take() {
        shard.poller.remove(l.as_raw_fd());
        shard.tls.listen_fd.set(None);
    }
    for l in mqtt.iter_mut().filter_map(Option::take) {
        shard.poller.remove(l.as_raw_fd());
    }
    // Nothing paused is resumed: those sockets close now.
    shard.mqtt_paused.borrow_mut().clear();
}

/// Writes every connection the router listed, once each; writes can list
/// more (a close routes a last frame), so it goes until none is left. The
/// loop's `waker` is registered first, so a listing after the take wakes it.
fn write_pass(shard: &Rc<Shard>, waker: &std::task::Waker, dirty: &mut Vec<ConnId>) {
    let router = &shard.router;
    loop {
        shard.wakers.io(waker);
        router.take_dirty(dirty);
        if dirty.is_empty() {
            return;
        }
        let t = now();
        for id in dirty.drain(..) {
            if let Some(cell) = router.cell(id) {
                cell.dirty.set(false);
                if let Some(entry) = shard.sockets.of(&cell) {
                    flush(shard, entry, t);
                }
            }
        }
    }
}

/// Gives a connection's socket to the shard's I/O loop: `io` is its state
/// (with what was read or queued before, see `Io::carrying`), `first` an
/// event to route before anything is read (a hello in the URL, or the hello
/// of a connection handed over).
pub(super) fn attach(shard: &Rc<Shard>, cell: Rc<ConnCell>, io: Io, first: Option<Event>) {
    let mut entry = match shard.sockets.insert(&cell, io) {
        Ok(e) => e,
        Err(io) => {
            crate::warn_every!("cannot take a connection: the shard's socket table is full");
            drop(io);
            shard.router.on_closed(&cell, now());
            shard.shared.release();
            return;
        }
    };
    drop(cell);
    let ring = shard.poller.ring();
    let watched = match (entry.io.raw_fd(), ring) {
        (Some(_), Some(_)) if entry.token() as u32 >= uring::MAX_SLOT => {
            Err(io::ErrorKind::OutOfMemory.into())
        }
        (Some(fd), Some(r)) => {
            r.register(entry.token() as u32, fd);
            Ok(())
        }
        (Some(fd), None) => shard.poller.add(fd, entry.token()),
        (None, _) => Err(io::ErrorKind::NotFound.into()),
    };
    if let Err(e) = watched {
        crate::warn_every!("cannot watch a connection: {e}");
        let (cell, io) = entry.close();
        drop(io);
        shard.router.on_closed(&cell, now());
        shard.shared.release();
        return;
    }
    let t = now();
    if let Some(ev) = first
        && let Outcome::Handover { owner, hello } = shard.router.on_event(&entry.cell, ev, t)
    {
        handover(shard, entry, owner, hello);
        return;
    }
    super::mqtt::on_attach(shard, &entry.cell, t);
    let rbuf = entry.io.take_rbuf();
    if (!rbuf.is_empty() || super::mqtt::has_input(&entry.cell))
        && let Some((owner, hello)) = process_input(shard, &mut entry, t, rbuf)
    {
        handover(shard, entry, owner, hello);
        return;
    }
    if let (Some(ring), Some(fd)) = (ring, entry.io.raw_fd()) {
        // Input is received only now: a connection handed over above never
        // had a receive in flight on this ring.
        let token = entry.token();
        let Entry { cell, io, .. } = &mut entry;
        sync_recv(ring, fd, token, io, cell);
    }
    shard.router.wake(&entry.cell);
}

/// Accepts what the listener holds, up to a budget per pass.
/// (`tls`: the TLS listener's, whose connections start a handshake;
/// `mqtt`: the MQTT listener's).
fn accept_ready(shard: &Rc<Shard>, listener: &socket2::Socket, tls: bool, mqtt: bool) {
    for _ in 0..ACCEPT_BUDGET {
        let (sock, addr) = match listener.accept() {
            Ok(a) => a,
            Err(e) => match e.raw_os_error() {
                Some(libc::EAGAIN) => return,
                Some(libc::EINTR) | Some(libc::ECONNABORTED) => continue,
                Some(libc::EMFILE) | Some(libc::ENFILE) | Some(libc::ENOBUFS)
                | Some(libc::ENOMEM) => {
                    // Out of descriptors: stop watching the listener until
                    // the sweeper resumes it, instead of spinning on it.
                    crate::warn_every!("accept failed: {e}; pausing accepts");
                    shard.poller.remove(listener.as_raw_fd());
                    if mqtt {
                        let token = if tls {
                            MQTT_TLS_LISTENER
                        } else {
                            MQTT_LISTENER
                        };
                        shard
                            .mqtt_paused
                            .borrow_mut()
                            .push((listener.as_raw_fd(), token));
                    } else if tls {
                        shard.tls.accept_paused.set(true);
                    } else {
                        shard.accept_paused.set(true);
                    }
                    return;
                }
                _ => {
                    crate::warn_every!("accept failed: {e}");
                    return;
                }
            },
        };
        let remote = addr
            .as_socket()
            .unwrap_or_else(|| std::net::SocketAddr::from(([0, 0, 0, 0], 0)));
        accepted(shard, sock, remote, tls, mqtt);
    }
}

/// Takes a connection a listener accepted (`tls`, `mqtt`: which listener).
fn accepted(
    shard: &Rc<Shard>,
    sock: socket2::Socket,
    remote: std::net::SocketAddr,
    tls: bool,
    mqtt: bool,
) {
    if !shard.shared.admit() {
        return;
    }
    let _ = sock.set_tcp_nodelay(true);
    ShardStats::add(&shard.router.stats.accepted_total, 1);
    let fd = OwnedFd::from(sock);
    let conn = relay_core::Connection::new(&shard.router.cfg().conn, Transport::Tcp, now());
    let cell = shard.router.register(conn, Router::session(remote));
    if mqtt {
        super::mqtt::init(shard, &cell);
    }
    let session = if tls {
        let Some(session) = shard
            .tls
            .accept(&shard.shared.tls, cell.id, now().mono_ms, mqtt)
        else {
            shard.router.on_closed(&cell, now());
            shard.shared.release();
            return;
        };
        Some(session)
    } else {
        None
    };
    let mut io = Io::new(fd, session);
    if !mqtt && shard.shared.proxy.controllers(tls) {
        // Nothing is read before the balancer's PROXY header.
        io.part().proxy = Some(Vec::new());
        let deadline = now().mono_ms + shard.shared.proxy.timeout.as_millis() as u64;
        shard
            .proxy_waits
            .borrow_mut()
            .push_back((deadline, cell.id));
    }
    attach(shard, cell, io, None);
}

/// Reads what a readable socket holds and routes what it completes.
fn on_readable(shard: &Rc<Shard>, mut entry: Entry<'_>, t: relay_core::Now) {
    let router = &shard.router;
    let Some(fd) = entry.io.raw_fd() else {
        return;
    };
    if entry.io.paused {
        // Only a hang-up or an error reaches a paused connection: let the
        // write pass find out.
        router.wake(&entry.cell);
        return;
    }
    if entry.io.proxy().is_some()
        && !read_proxy_header(shard, &mut entry, &mut |b| sys_recv(fd, b), t)
    {
        router.wake(&entry.cell);
        return;
    }
    let is_tls = entry.io.tls.is_some();
    let mut buf = shard.read_buf.borrow_mut();
    for _ in 0..READ_BUDGET {
        let got = match entry.io.tls.as_mut() {
            Some(s) => tls::recv(s, fd, &mut buf, &router.stats),
            None => sys_recv(fd, &mut buf),
        };
        let n = match got {
            Ok(0) => {
                peer_gone(&mut entry, t);
                break;
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if is_tls && e.kind() == io::ErrorKind::InvalidData => {
                // The alert rustls queued goes out before the close. A failed
                // session answers every later record with its error again:
                // counted once.
                if !entry.cell.conn.borrow().is_closing() {
                    ShardStats::add(&router.stats.tls_errors, 1);
                    entry
                        .cell
                        .closing(CloseReason::ProtocolError, t.mono_ms + TLS_ALERT_GRACE_MS);
                }
                break;
            }
            Err(_) => {
                peer_gone(&mut entry, t);
                break;
            }
        };
        if is_tls {
            tls::certify(&shard.shared.tls, &entry.cell, &mut entry.io, t.mono_ms);
        } else {
            ShardStats::add(&router.stats.bytes_in, n as u64);
        }
        // A closing connection's input is read and dropped, so the socket
        // stops being readable and the close does not turn into a reset.
        let closing = entry.cell.conn.borrow().is_closing();
        if !closing {
            let mut rbuf = entry.io.take_rbuf();
            rbuf.extend_from_slice(&buf[..n]);
            if let Some((owner, hello)) = process_input(shard, &mut entry, t, rbuf) {
                drop(buf);
                handover(shard, entry, owner, hello);
                return;
            }
        }
        if (!is_tls && n < buf.len()) || entry.io.paused {
            break;
        }
    }
    // Replies (PONG, ACK, ERROR) and closes are carried out by the write pass.
    router.wake(&entry.cell);
}

/// Reads the PROXY header (exactly its bytes, so the connection's own stay
/// in the socket); true once it is whole and the session has the client's
/// address, false while it is not (more to come, or the connection is
/// closing for a bad one).
fn read_proxy_header(
    shard: &Shard,
    entry: &mut Entry<'_>,
    recv: &mut dyn FnMut(&mut [u8]) -> io::Result<usize>,
    t: relay_core::Now,
) -> bool {
    let mut tmp = [0u8; 512];
    loop {
        let Some(buf) = entry.io.proxy() else {
            return true;
        };
        let need = match relay_core::proxy::needed(buf) {
            Ok(0) => match relay_core::proxy::parse(buf) {
                Ok(h) => {
                    entry.io.proxy_done();
                    if let Some(remote) = h.source {
                        entry.cell.session.borrow_mut().remote = remote;
                    }
                    return true;
                }
                Err(e) => Err(e),
            },
            other => other,
        };
        let need = match need {
            Ok(n) => n,
            Err(e) => {
                let peer = entry.cell.session.borrow().remote;
                crate::warn_every!("connection from {peer} closed: bad PROXY header: {e}");
                peer_gone(entry, t);
                return false;
            }
        };
        let take = need.min(tmp.len());
        match recv(&mut tmp[..take]) {
            Ok(0) => {
                peer_gone(entry, t);
                return false;
            }
            Ok(n) => {
                if let Some(buf) = entry.io.proxy() {
                    buf.extend_from_slice(&tmp[..n]);
                }
                ShardStats::add(&shard.router.stats.bytes_in, n as u64);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => {
                peer_gone(entry, t);
                return false;
            }
        }
    }
}

/// Closes the connections whose PROXY header did not arrive in time.
pub(super) fn sweep_proxy(shard: &Rc<Shard>, t: relay_core::Now) {
    loop {
        let Some(&(deadline, id)) = shard.proxy_waits.borrow().front() else {
            return;
        };
        if deadline > t.mono_ms {
            return;
        }
        shard.proxy_waits.borrow_mut().pop_front();
        if let Some(cell) = shard.router.cell(id)
            && let Some(mut entry) = shard.sockets.of(&cell)
            && entry.io.proxy().is_some()
        {
            crate::warn_every!("connection closed: no PROXY header in time");
            entry.cell.closing(CloseReason::HelloTimeout, t.mono_ms);
            entry.io.eof = true;
            shard.router.wake(&entry.cell);
        }
    }
}

/// How long a TLS alert may take to leave before the socket closes.
const TLS_ALERT_GRACE_MS: u64 = 1000;

/// `recv` on a non-blocking socket.
fn sys_recv(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: non-blocking recv into a live buffer of the given length.
    let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// `send` on a non-blocking socket.
fn sys_send(fd: RawFd, data: &[u8]) -> io::Result<usize> {
    // SAFETY: non-blocking send of a live slice of the given length.
    let n = unsafe {
        libc::send(
            fd,
            data.as_ptr().cast(),
            data.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// The peer closed or reset: close now, without waiting to flush.
fn peer_gone(entry: &mut Entry<'_>, t: relay_core::Now) {
    entry.cell.closing(CloseReason::PeerClosed, t.mono_ms);
    entry.io.eof = true;
}

/// Feeds `rbuf` to the connection and routes each event; keeps what is left
/// of it. Returns the owner shard when the connection must move there.
/// Routing reaches other connections' records, never the I/O table, so the
/// entry stays out of its slot meanwhile.
fn process_input(
    shard: &Shard,
    entry: &mut Entry<'_>,
    t: relay_core::Now,
    mut rbuf: BytesMut,
) -> Option<(usize, Hello)> {
    if entry.cell.mqtt.borrow().is_some() {
        return super::mqtt::process_input(shard, entry, t, rbuf);
    }
    let router = &shard.router;
    let cfg = router.cfg();
    let cfg = &cfg.conn;
    let token = entry.token();
    let Entry { cell, io, .. } = entry;
    let mut dec = io.part.as_mut().and_then(|p| p.ws.take());
    let mut moving = None;
    let mut pause = false;
    loop {
        if cell.conn.borrow().is_closing() {
            break;
        }
        // Every reply is queued, never dropped: a client whose queue is at
        // the bound is not read until the queue drains.
        let owed = cell.owed.get() as usize * ANSWER_RESERVE;
        if cell.conn.borrow_mut().should_pause(cfg, t, owed) {
            pause = true;
            break;
        }
        let step = match dec.as_mut() {
            None => cell
                .conn
                .borrow_mut()
                .handle_input(cfg, t, &mut rbuf)
                .map_or(Step::Stop, Step::Route),
            Some(d) => {
                let mut close_sent = io.has(CLOSE_SENT);
                let step = ws_step(cell, d, &mut rbuf, cfg, t, &mut close_sent);
                io.mark(CLOSE_SENT, close_sent);
                step
            }
        };
        let ev = match step {
            Step::Stop => break,
            Step::Again => continue,
            Step::Route(ev) => ev,
        };
        if let Outcome::Handover { owner, hello } = router.on_event(cell, ev, t) {
            moving = Some((owner, hello));
            break;
        }
    }
    if let Some(d) = cell.conn.borrow_mut().take_drops() {
        router.stats.input_drops(d);
    }
    if pause && !io.paused {
        io.paused = true;
        if let Some(fd) = io.raw_fd() {
            let _ = shard.poller.rearm(fd, token, io, cell);
        }
    }
    if !rbuf.is_empty() || dec.is_some() {
        let p = io.part();
        // An empty buffer gives its allocation back: idle connections hold none.
        p.rbuf = if rbuf.is_empty() {
            BytesMut::new()
        } else {
            rbuf
        };
        p.ws = dec;
    }
    io.tidy();
    moving
}

/// Writes what the connection has queued and carries out its close once
/// everything is out (or its deadline passed).
fn flush(shard: &Rc<Shard>, mut entry: Entry<'_>, t: relay_core::Now) {
    let Some(fd) = entry.io.raw_fd() else {
        return;
    };
    let token = entry.token();
    let Entry { cell, io, .. } = &mut entry;
    let gone = io.eof;
    let reason = cell.conn.borrow().close_reason();
    if io.is_ws()
        && !io.has(CLOSE_SENT)
        && !gone
        && let Some(reason) = reason
    {
        // A browser learns why in the close frame too.
        if reason != CloseReason::PeerClosed {
            let frame = ws::close_frame(ws::close_code(reason), reason.name());
            // An MQTT client's close follows its session's last packets.
            if !super::mqtt::send_ws_raw(cell, &frame) {
                cell.conn.borrow_mut().send_raw(&frame);
            }
        }
        io.mark(CLOSE_SENT, true);
    }
    let ring = shard.poller.ring();
    let failed = !gone
        && match ring {
            Some(r) => on_ring::write_out(shard, r, cell, io, (fd, token), t),
            None => write_out(shard, cell, io, (fd, token), t),
        };
    if ring.is_none() && io.want_out && !io.writing() {
        io.want_out = false;
        if shard.poller.rearm(fd, token, io, cell).is_err() {
            io.want_out = true;
        }
    }
    if failed {
        cell.closing(CloseReason::PeerClosed, t.mono_ms);
    }
    let closing = cell.conn.borrow().is_closing();
    if gone || failed || closing {
        // On the ring, a send in flight is not out yet.
        let in_flight = ring.is_some() && io.want_out;
        let flushed = !io.writing() && !in_flight;
        let late = cell
            .conn
            .borrow()
            .close_deadline()
            .is_some_and(|d| d <= t.mono_ms);
        if gone || failed || flushed || late {
            close(shard, entry);
        }
        return;
    }
    if io.paused {
        let cfg = shard.router.cfg();
        let cfg = &cfg.conn;
        let owed = cell.owed.get() as usize * ANSWER_RESERVE;
        if !cell.conn.borrow_mut().should_pause(cfg, t, owed)
            && !super::mqtt::should_pause(shard, cell)
        {
            // Drained: read again, starting with what is already buffered.
            io.paused = false;
            let _ = shard.poller.rearm(fd, token, io, cell);
            let rbuf = io.take_rbuf();
            if (!rbuf.is_empty() || super::mqtt::has_input(cell))
                && let Some((owner, hello)) = process_input(shard, &mut entry, t, rbuf)
            {
                handover(shard, entry, owner, hello);
                return;
            }
            shard.router.wake(&entry.cell);
        }
    }
}

/// Writes the connection's queue until it is empty or the socket is full
/// (its descriptor and epoll token). Returns whether the socket failed.
fn write_out(
    shard: &Shard,
    cell: &ConnCell,
    io: &mut Io,
    (fd, token): (RawFd, u64),
    t: relay_core::Now,
) -> bool {
    let router = &shard.router;
    let cfg = router.cfg();
    let cfg = &cfg.conn;
    let mut cur = io.part.as_mut().and_then(|p| p.writing.take());
    let failed = loop {
        if cur.is_none() {
            cur = super::mqtt::poll_transmit(cell, MAX_WRITE)
                .unwrap_or_else(|| cell.conn.borrow_mut().poll_transmit(MAX_WRITE))
                .map(|b| (b, 0));
        }
        let sent = match (cur.as_mut(), io.tls.as_mut()) {
            // Nothing queued: TLS records (handshake, alerts) still go out.
            (None, Some(s)) => tls::flush(s, fd, &router.stats).map(|()| 0),
            (None, None) => break false,
            (Some((chunk, off)), Some(s)) => tls::send(s, fd, &chunk[*off..], &router.stats),
            (Some((chunk, off)), None) => sys_send(fd, &chunk[*off..]),
        };
        let err = match sent {
            Ok(0) => break false,
            Ok(n) => {
                let Some((chunk, off)) = cur.as_mut() else {
                    break false;
                };
                *off += n;
                if io.tls.is_none() {
                    ShardStats::add(&router.stats.bytes_out, n as u64);
                }
                if *off == chunk.len() {
                    let len = chunk.len();
                    cur = None;
                    if !super::mqtt::on_transmitted(shard, cell, t, len) {
                        cell.conn.borrow_mut().on_transmitted(cfg, t, len);
                    }
                }
                continue;
            }
            Err(e) => e,
        };
        match err.kind() {
            io::ErrorKind::WouldBlock => {
                // The peer is not reading: wait for room.
                if !io.want_out {
                    io.want_out = true;
                    if shard.poller.rearm(fd, token, io, cell).is_err() {
                        io.want_out = false;
                    }
                }
                break false;
            }
            io::ErrorKind::Interrupted => continue,
            _ => break true,
        }
    };
    if cur.is_some() {
        io.part().writing = cur;
    }
    io.tidy();
    failed
}

/// Closes the socket after letting the last bytes (an ERROR, a BYE) reach
/// the peer, and tells the router the connection has gone.
fn close(shard: &Rc<Shard>, entry: Entry<'_>) {
    let token = entry.token();
    let (cell, io) = entry.close();
    let (armed, sending) = (io.has(ARMED), io.want_out);
    if let Some(fd) = io.fd {
        match shard.poller.ring() {
            Some(r) => {
                // The kernel holds the socket while an operation is in
                // flight: end them, so it closes now.
                if armed {
                    r.cancel(uring::OP_RECV, token);
                }
                if sending {
                    r.cancel(uring::OP_SEND, token);
                }
                r.unregister(token as u32);
            }
            None => shard.poller.remove(fd.as_raw_fd()),
        }
        if let Some(mut s) = io.tls
            && !io.eof
        {
            tls::close_notify(&mut s, fd.as_raw_fd(), &shard.router.stats);
        }
        discard_unread(fd.as_raw_fd());
        // SAFETY: plain syscall on a socket we own.
        unsafe { libc::shutdown(fd.as_raw_fd(), libc::SHUT_WR) };
    }
    shard.router.on_closed(&cell, now());
    shard.shared.release();
}

/// Moves the connection, with everything read or queued, to `owner`.
fn handover(shard: &Rc<Shard>, entry: Entry<'_>, owner: usize, hello: Hello) {
    let router = &shard.router;
    if let Some(r) = shard.poller.ring() {
        r.forget(entry.token(), entry.io.has(ARMED));
    }
    let (cell, Io { fd, part, tls, .. }) = entry.close();
    router.forget(&cell);
    let Partial {
        rbuf, writing, ws, ..
    } = part.map(|p| *p).unwrap_or_default();
    let Some(fd) = fd else {
        shard.shared.release();
        return;
    };
    shard.poller.remove(fd.as_raw_fd());
    let cfg = router.cfg();
    let cfg = &cfg.conn;
    let transport = cell.conn.borrow().transport();
    let fresh = relay_core::Connection::new(cfg, transport, now());
    let conn = std::mem::replace(&mut *cell.conn.borrow_mut(), fresh);
    let session = cell.session.borrow().clone();
    let h = Handover {
        fd,
        conn,
        hello,
        rbuf,
        pending_out: writing.map(|(b, off)| b.slice(off..)).unwrap_or_default(),
        session,
        ws,
        tls,
        mqtt: cell.mqtt.borrow_mut().take(),
    };
    ShardStats::add(&router.stats.handovers, 1);
    let shard = shard.clone();
    shard.wakers.woke_other();
    glommio::spawn_local(async move { shard.send_handover(owner, h).await }).detach();
}

/// What one pass over the input produced.
enum Step {
    /// Nothing more to do until more bytes arrive.
    Stop,
    /// Handled internally (a WebSocket ping); look again.
    Again,
    Route(Event),
}

/// Takes one WebSocket message off `rbuf` and feeds it to the connection.
fn ws_step(
    cell: &ConnCell,
    dec: &mut WsDecoder,
    rbuf: &mut BytesMut,
    cfg: &relay_core::ConnConfig,
    t: relay_core::Now,
    close_sent: &mut bool,
) -> Step {
    let mut c = cell.conn.borrow_mut();
    let event = |ev: Option<Event>| ev.map_or(Step::Again, Step::Route);
    match dec.decode(rbuf, cfg.max_line()) {
        Ok(None) => Step::Stop,
        Ok(Some(WsMsg::Text(m))) => event(c.handle_message(cfg, t, true, m)),
        Ok(Some(WsMsg::Binary(m))) => {
            let too_large = m.len() > cfg.max_frame;
            let ev = c.handle_message(cfg, t, false, m);
            if let Some(Event::Closed(CloseReason::ProtocolError)) = ev {
                // A broken relay frame: the browser learns which, as
                // 4000 + the protocol's error code (docs/protocol.md).
                let code = if too_large {
                    ErrorCode::TooLarge
                } else {
                    ErrorCode::BadFrame
                };
                c.send_raw(&ws::close_frame(4000 + code as u16, code.name()));
                *close_sent = true;
            }
            event(ev)
        }
        Ok(Some(WsMsg::Ping(p))) => {
            c.send_raw(&ws::pong_frame(&p));
            c.touch(t);
            Step::Again
        }
        Ok(Some(WsMsg::Pong)) => {
            c.touch(t);
            Step::Again
        }
        Ok(Some(WsMsg::Close(_))) => Step::Route(c.close(CloseReason::Bye)),
        Err(e) => {
            c.send_raw(&ws::close_frame(e.close_code(), &e.to_string()));
            *close_sent = true;
            Step::Route(c.close(CloseReason::ProtocolError))
        }
    }
}

/// Reads and drops what the peer sent and we will never process, so closing
/// does not turn into a reset that could discard our last frames.
fn discard_unread(fd: RawFd) {
    let mut scratch = [0u8; 4096];
    for _ in 0..16 {
        // SAFETY: non-blocking recv into a local buffer of the given length.
        let n = unsafe {
            libc::recv(
                fd,
                scratch.as_mut_ptr().cast(),
                scratch.len(),
                libc::MSG_DONTWAIT,
            )
        };
        if n <= 0 {
            break;
        }
    }
}

/// Turns a socket the relay got from glommio (a WebSocket after its
/// upgrade) into a plain fd for the I/O loop.
pub(super) fn take_fd(stream: TcpStream) -> io::Result<OwnedFd> {
    // SAFETY: dup of an fd we own; the original closes with `stream`.
    let fd = unsafe { libc::fcntl(stream.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) };
    drop(stream);
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh duplicate, owned from here on.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Watches again the MQTT listeners whose accepts were paused (out of
/// descriptors); one that still cannot be watched stays paused.
pub(super) fn resume_mqtt_accepts(shard: &Shard) {
    let paused = std::mem::take(&mut *shard.mqtt_paused.borrow_mut());
    for (fd, token) in paused {
        if let Err(e) = shard.poller.watch(fd, token) {
            crate::warn_every!("cannot resume MQTT accepts: {e}");
            shard.mqtt_paused.borrow_mut().push((fd, token));
        }
    }
}

/// Closes the TLS connections whose handshake outlived its deadline.
pub(super) fn sweep_tls(shard: &Rc<Shard>, t: relay_core::Now) {
    let mut expired = Vec::new();
    shard.tls.expired(t.mono_ms, &mut expired);
    for id in expired {
        if let Some(cell) = shard.router.cell(id)
            && let Some(mut entry) = shard.sockets.of(&cell)
            && tls::handshake_expired(&entry.cell, &mut entry.io, t.mono_ms)
        {
            ShardStats::add(&shard.router.stats.tls_handshake_timeouts, 1);
            shard.router.wake(&entry.cell);
        }
    }
}
