//! The shard's I/O loop on the io_uring backend (`[shards] io = "uring"`):
//! the same passes as the epoll loop (input, then one write per listed
//! connection), driven by the ring's completions instead of readiness. The
//! ring itself is in `uring.rs`.
//!
//! A pass: submit what the last one queued and run the kernel's deferred
//! work (one `io_uring_enter`, none when nothing waits); take the
//! completions (receives, sends, accepts) and handle each; give the
//! receive buffers back; write every listed connection (each queues its
//! send); submit. When nothing is left the loop sleeps on the ring's
//! eventfd, read through glommio.

use std::future::Future;
use std::os::fd::{FromRawFd, IntoRawFd};

use glommio::io::BufferedFile;
use io_uring::cqueue;

use super::*;
use crate::rt::uring::{Done, OP_ACCEPT, OP_RECV, OP_SEND, split};

/// Completions handled per pass before the executor gets a turn.
const REAP: usize = 512;

type Wait = Pin<Box<dyn Future<Output = bool>>>;

/// A read of the ring's eventfd on glommio's ring: ready once the kernel
/// has signalled it (true), or false if the read failed.
fn wait_on(file: &Rc<BufferedFile>) -> Wait {
    let file = file.clone();
    Box::pin(async move { file.read_at(0, 8).await.is_ok() })
}

/// Runs the shard's I/O loop on its ring: accepts on the listeners (already
/// watched) and drives every client connection of the shard.
pub(in crate::rt) async fn run(
    shard: Rc<Shard>,
    listener: socket2::Socket,
    mut tls_listener: Option<socket2::Socket>,
    mut mqtt: [Option<socket2::Socket>; 2],
) {
    let mut listener = Some(listener);
    let file = match shard.poller.ring().map(Ring::event_fd) {
        Some(Ok(fd)) => {
            // SAFETY: a duplicate owned by the file from here on.
            Rc::new(unsafe { BufferedFile::from_raw_fd(fd.into_raw_fd()) })
        }
        other => {
            tracing::error!(
                "shard {}: no io_uring eventfd: {other:?}",
                shard.router.shard
            );
            return;
        }
    };
    let mut done: Vec<Done> = Vec::with_capacity(REAP);
    let mut rearm: Vec<u64> = Vec::new();
    let mut dirty: Vec<ConnId> = Vec::new();
    let mut wait: Option<Wait> = None;
    let mut pacer = Pacer::new(shard.shared.coalesce);
    loop {
        let next = poll_fn(|cx| {
            let mut handled = 0;
            loop {
                let Some(ring) = shard.poller.ring() else {
                    return Poll::Ready(Next::Pause(FALLBACK_POLL));
                };
                ring.awake();
                let router = &shard.router;
                stop_accepting(&shard, &mut listener, &mut tls_listener, &mut mqtt);
                let began = std::time::Instant::now();
                ring.submit();
                done.clear();
                ring.reap(&mut done, REAP);
                handled += done.len();
                let t = now();
                for d in &done {
                    let (op, token) = split(d.data);
                    match op {
                        OP_RECV => {
                            if let Some(tok) = on_recv(&shard, ring, token, d, t) {
                                rearm.push(tok);
                            }
                        }
                        OP_SEND => on_sent(&shard, ring, token, d, t),
                        OP_ACCEPT => on_accept(&shard, ring, token as usize, d),
                        _ => {}
                    }
                }
                ring.publish();
                for token in rearm.drain(..) {
                    if let Some(mut entry) = shard.sockets.by_token(token)
                        && let Some(fd) = entry.io.raw_fd()
                    {
                        let Entry { cell, io, .. } = &mut entry;
                        sync_recv(ring, fd, token, io, cell);
                    }
                }
                write_pass(&shard, cx.waker(), &mut dirty);
                ring.submit();
                if done.len() == REAP {
                    // Counted, so a saturated loop's rate is not
                    // underestimated (a long pause after the burst).
                    pacer.after_pass(std::mem::take(&mut handled), began);
                    return Poll::Ready(Next::Busy);
                }
                if ring.has_work() {
                    continue;
                }
                if let Some(d) = pacer.after_pass(std::mem::take(&mut handled), began) {
                    // The eventfd stays disabled: what arrives meanwhile
                    // waits for the pass after the pause.
                    return Poll::Ready(Next::Pause(d));
                }
                let w = wait.get_or_insert_with(|| wait_on(&file));
                if !ring.may_sleep() {
                    continue;
                }
                match w.as_mut().poll(cx) {
                    Poll::Pending => {
                        if router.has_dirty() {
                            continue;
                        }
                        ring.sleeping(cx.waker());
                        return Poll::Pending;
                    }
                    Poll::Ready(ok) => {
                        wait = None;
                        if !ok {
                            crate::warn_every!("io_uring: reading the eventfd failed");
                            return Poll::Ready(Next::Pause(FALLBACK_POLL));
                        }
                    }
                }
            }
        })
        .await;
        after(next).await;
    }
}

/// A receive completed: routes its bytes. Returns the token to arm again
/// (after the pass's buffers are back) when its receive ended.
fn on_recv(
    shard: &Rc<Shard>,
    ring: &Ring,
    token: u64,
    d: &Done,
    t: relay_core::Now,
) -> Option<u64> {
    let got = ring.buffer(d.flags, d.result.max(0) as usize);
    let rearm = handle_recv(shard, token, d, got.map(|(_, b)| b), t);
    if let Some((bid, _)) = got {
        ring.recycle(bid);
    }
    rearm
}

fn handle_recv(
    shard: &Rc<Shard>,
    token: u64,
    d: &Done,
    data: Option<&[u8]>,
    t: relay_core::Now,
) -> Option<u64> {
    let mut entry = shard.sockets.by_token(token)?;
    if !cqueue::more(d.flags) {
        entry.io.mark(ARMED | MULTI | CANCELLING, false);
    }
    match d.result {
        n if n > 0 => {
            let data = data.unwrap_or_default();
            entry = feed(shard, entry, data, t)?;
        }
        0 => peer_gone(&mut entry, t),
        e if -e == libc::ENOBUFS => {
            ShardStats::add(&shard.router.stats.uring_enobufs, 1);
        }
        e if -e == libc::ECANCELED || -e == libc::EINTR || -e == libc::EAGAIN => {}
        _ => peer_gone(&mut entry, t),
    }
    shard.router.wake(&entry.cell);
    (!entry.io.has(ARMED)).then_some(token)
}

/// Takes `data` the socket delivered: the PROXY header first where one is
/// awaited, then TLS records or plain input. Returns the entry unless the
/// connection moved to another shard.
fn feed<'s>(
    shard: &'s Rc<Shard>,
    mut entry: Entry<'s>,
    mut data: &[u8],
    t: relay_core::Now,
) -> Option<Entry<'s>> {
    if entry.io.proxy().is_some() {
        let mut from = |b: &mut [u8]| -> io::Result<usize> {
            let n = b.len().min(data.len());
            if n == 0 {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            b[..n].copy_from_slice(&data[..n]);
            data = &data[n..];
            Ok(n)
        };
        if !read_proxy_header(shard, &mut entry, &mut from, t) {
            return Some(entry);
        }
    }
    if data.is_empty() {
        return Some(entry);
    }
    if entry.io.tls.is_some() {
        return feed_tls(shard, entry, data, t);
    }
    ShardStats::add(&shard.router.stats.bytes_in, data.len() as u64);
    take(shard, entry, data, t)
}

/// Parses and routes `plain` input (a closing connection's is dropped).
fn take<'s>(
    shard: &'s Rc<Shard>,
    mut entry: Entry<'s>,
    plain: &[u8],
    t: relay_core::Now,
) -> Option<Entry<'s>> {
    if entry.cell.conn.borrow().is_closing() {
        return Some(entry);
    }
    let mut rbuf = entry.io.take_rbuf();
    rbuf.extend_from_slice(plain);
    if let Some((owner, hello)) = process_input(shard, &mut entry, t, rbuf) {
        handover(shard, entry, owner, hello);
        return None;
    }
    Some(entry)
}

/// Gives TLS records to the connection's session and routes the plaintext.
fn feed_tls<'s>(
    shard: &'s Rc<Shard>,
    mut entry: Entry<'s>,
    mut data: &[u8],
    t: relay_core::Now,
) -> Option<Entry<'s>> {
    let stats = &shard.router.stats;
    ShardStats::add(&stats.bytes_in, data.len() as u64);
    if entry.cell.conn.borrow().is_closing() {
        // A failed session answers every record with its error again, and
        // a closing connection's input is dropped anyway: one error counted.
        return Some(entry);
    }
    while !data.is_empty() {
        let Some(s) = entry.io.tls.as_mut() else {
            return Some(entry);
        };
        let before = data.len();
        // A full record buffer refuses more until what it holds is
        // processed below.
        let _ = s.read_tls(&mut data);
        if let Err(e) = s.process_new_packets() {
            crate::warn_every!("TLS error from a client: {e}");
            ShardStats::add(&stats.tls_errors, 1);
            entry
                .cell
                .closing(CloseReason::ProtocolError, t.mono_ms + TLS_ALERT_GRACE_MS);
            return Some(entry);
        }
        tls::certify(&shard.shared.tls, &entry.cell, &mut entry.io, t.mono_ms);
        loop {
            let Some(s) = entry.io.tls.as_mut() else {
                return Some(entry);
            };
            let mut buf = shard.read_buf.borrow_mut();
            let got = std::io::Read::read(&mut s.reader(), &mut buf);
            match got {
                Ok(0) => {
                    drop(buf);
                    peer_gone(&mut entry, t);
                    return Some(entry);
                }
                // Parsed (and copied where a frame is incomplete) while the
                // shared buffer is held: routing never reads it.
                Ok(n) => entry = take(shard, entry, &buf[..n], t)?,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(_) => {
                    drop(buf);
                    peer_gone(&mut entry, t);
                    return Some(entry);
                }
            }
        }
        if data.len() == before {
            // Nothing taken although the records were processed: a session
            // that takes no more input.
            break;
        }
    }
    Some(entry)
}

/// A send completed: the rest of a short one goes again; once all went,
/// the connection's chunk is done and the write pass looks at it again.
fn on_sent(shard: &Rc<Shard>, ring: &Ring, token: u64, d: &Done, t: relay_core::Now) {
    let rest = ring.sent(d.data, d.result);
    let Some(mut entry) = shard.sockets.by_token(token) else {
        return;
    };
    let stats = &shard.router.stats;
    if d.result < 0 {
        entry.io.want_out = false;
        if -d.result != libc::ECANCELED {
            entry.cell.closing(CloseReason::PeerClosed, t.mono_ms);
            entry.io.eof = true;
        }
        shard.router.wake(&entry.cell);
        return;
    }
    ShardStats::add(&stats.bytes_out, d.result as u64);
    if let Some(rest) = rest
        && let Some(fd) = entry.io.raw_fd()
    {
        ring.send(fd, token, rest);
        return;
    }
    entry.io.want_out = false;
    if entry.io.tls.is_none()
        && let Some((chunk, _)) = entry.io.part.as_mut().and_then(|p| p.writing.take())
    {
        transmitted(shard, &entry.cell, t, chunk.len());
        entry.io.tidy();
    }
    shard.router.wake(&entry.cell);
}

/// A listener's accept completed with a new connection (or an error).
fn on_accept(shard: &Rc<Shard>, ring: &Ring, kind: usize, d: &Done) {
    let more = cqueue::more(d.flags);
    let token = u64::MAX - kind as u64;
    let (tls, mqtt) = match token {
        LISTENER => (false, false),
        TLS_LISTENER => (true, false),
        MQTT_LISTENER => (false, true),
        _ => (true, true),
    };
    if d.result >= 0 {
        // SAFETY: the kernel made this descriptor for us alone.
        let sock = unsafe { socket2::Socket::from_raw_fd(d.result) };
        let remote = sock
            .peer_addr()
            .ok()
            .and_then(|a| a.as_socket())
            .unwrap_or_else(|| std::net::SocketAddr::from(([0, 0, 0, 0], 0)));
        accepted(shard, sock, remote, tls, mqtt);
    }
    let Some(fd) = ring.listener(kind) else {
        // Stopped: the cancellation ended it.
        return;
    };
    match -d.result {
        libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM => {
            crate::warn_every!(
                "accept failed: {}; pausing accepts",
                io::Error::from_raw_os_error(-d.result)
            );
            ring.stop_accept(fd);
            if mqtt {
                shard.mqtt_paused.borrow_mut().push((fd, token));
            } else if tls {
                shard.tls.accept_paused.set(true);
            } else {
                shard.accept_paused.set(true);
            }
        }
        _ if !more => ring.accept(fd, kind),
        _ => {}
    }
}

/// The next chunk of the connection's output (MQTT or native).
fn next_chunk(cell: &ConnCell) -> Option<bytes::Bytes> {
    super::super::mqtt::poll_transmit(cell, MAX_WRITE)
        .unwrap_or_else(|| cell.conn.borrow_mut().poll_transmit(MAX_WRITE))
}

/// A chunk of `len` bytes of the connection's output has left.
fn transmitted(shard: &Shard, cell: &ConnCell, t: relay_core::Now, len: usize) {
    if !super::super::mqtt::on_transmitted(shard, cell, t, len) {
        let cfg = shard.router.cfg();
        cell.conn.borrow_mut().on_transmitted(&cfg.conn, t, len);
    }
}

/// Queues the connection's next send, unless one is in flight: the next
/// chunk of its queue, or over TLS the records of all the plaintext the
/// session takes. Returns whether the connection failed.
pub(super) fn write_out(
    shard: &Shard,
    ring: &Ring,
    cell: &ConnCell,
    io: &mut Io,
    (fd, token): (RawFd, u64),
    t: relay_core::Now,
) -> bool {
    if io.want_out {
        return false;
    }
    if io.tls.is_none() {
        let cur = io
            .part
            .as_mut()
            .and_then(|p| p.writing.take())
            .or_else(|| next_chunk(cell).map(|b| (b, 0)));
        if let Some((chunk, off)) = cur {
            ring.send(fd, token, chunk.slice(off..));
            io.part().writing = Some((chunk, off));
            io.want_out = true;
        }
        return false;
    }
    loop {
        let mut cur = io
            .part
            .as_mut()
            .and_then(|p| p.writing.take())
            .or_else(|| next_chunk(cell).map(|b| (b, 0)));
        let Some((chunk, off)) = cur.as_mut() else {
            break;
        };
        let Some(s) = io.tls.as_mut() else {
            break;
        };
        let n = match std::io::Write::write(&mut s.writer(), &chunk[*off..]) {
            Ok(n) => n,
            Err(_) => return true,
        };
        *off += n;
        if *off == chunk.len() {
            transmitted(shard, cell, t, chunk.len());
            continue;
        }
        // The session takes no more for now (its handshake is not done,
        // or its buffer is full): the rest waits.
        io.part().writing = cur;
        break;
    }
    if let Some(s) = io.tls.as_mut()
        && s.wants_write()
    {
        let mut out = Vec::new();
        while s.wants_write() {
            if s.write_tls(&mut out).is_err() {
                return true;
            }
        }
        ring.send(fd, token, bytes::Bytes::from(out));
        io.want_out = true;
    }
    io.tidy();
    false
}
