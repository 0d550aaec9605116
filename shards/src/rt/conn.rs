//! The driver of one TCP connection: a single task that reads into the
//! shard's shared read buffer, feeds the protocol state machine, and writes
//! whatever the connection's queue holds in one write per wake-up.
//!
//! Reads are readiness-based (glommio's non-buffered stream tries a
//! non-blocking `recv` and otherwise waits for readability), so an idle
//! connection holds no read buffer: bytes are copied out of the shared buffer
//! only while a frame is incomplete.

use std::cell::RefCell;
use std::future::poll_fn;
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::rc::Rc;
use std::task::Poll;

use bytes::{Bytes, BytesMut};
use futures_lite::{AsyncRead, AsyncWrite};
use glommio::net::TcpStream;
use relay_core::conn::{CloseReason, Event, Hello};

use super::{Shard, now};
use crate::cell::ConnCell;
use crate::router::{Handover, Outcome};
use crate::stats::ShardStats;
use crate::ws::{self, WsDecoder, WsMsg};

/// Largest single write; a fuller queue goes out in several.
const MAX_WRITE: usize = 256 * 1024;
/// Reads handled per wake-up before yielding to other connections.
const READ_BUDGET: u32 = 16;

enum End {
    Closed,
    Handover { owner: usize, hello: Hello },
}

/// Runs a connection until it closes or moves to its owner shard. `ws` is
/// the WebSocket frame state of a browser connection (None on plain TCP);
/// `first` an event to route before anything is read (a hello in the URL).
pub(super) async fn drive(
    shard: Rc<Shard>,
    cell: Rc<ConnCell>,
    mut stream: TcpStream,
    mut rbuf: BytesMut,
    mut writing: Option<Bytes>,
    mut ws: Option<WsDecoder>,
    first: Option<Box<Event>>,
) {
    let router = &shard.router;
    let cfg = &router.cfg.conn;
    let rshared: &RefCell<Vec<u8>> = &shard.read_buf;
    let mut off = 0usize;
    let mut fresh = !rbuf.is_empty();
    let mut close_sent = false;

    // A hello from the URL is routed before anything is read.
    if let Some(ev) = first
        && let Outcome::Handover { owner, hello } = router.on_event(&cell, *ev, now())
    {
        let pending_out = writing.unwrap_or_default();
        let moving = Moving {
            hello,
            rbuf,
            pending_out,
            ws,
        };
        return Box::pin(finish_handover(
            shard,
            cell,
            stream,
            owner,
            Box::new(moving),
        ))
        .await;
    }
    let end = poll_fn(|cx| {
        {
            let mut w = cell.waker.borrow_mut();
            if !w.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                *w = Some(cx.waker().clone());
            }
        }
        let mut budget = READ_BUDGET;
        loop {
            let t = now();
            // Input already buffered (handed over, or left by the last read).
            if fresh {
                fresh = false;
                loop {
                    if cell.conn.borrow().is_closing() {
                        break;
                    }
                    let step = match ws.as_mut() {
                        None => cell
                            .conn
                            .borrow_mut()
                            .handle_input(cfg, t, &mut rbuf)
                            .map_or(Step::Stop, Step::Route),
                        Some(dec) => ws_step(&cell, dec, &mut rbuf, cfg, t, &mut close_sent),
                    };
                    let ev = match step {
                        Step::Stop => break,
                        Step::Again => continue,
                        Step::Route(ev) => ev,
                    };
                    if let Outcome::Handover { owner, hello } = router.on_event(&cell, ev, t) {
                        return Poll::Ready(End::Handover { owner, hello });
                    }
                }
                if rbuf.is_empty() && rbuf.capacity() > 0 {
                    rbuf = BytesMut::new();
                }
            }
            if ws.is_some() && !close_sent && cell.reason.get().is_some() {
                // A browser learns why in the close frame too.
                let reason = cell.reason.get().unwrap_or(CloseReason::PeerClosed);
                if reason != CloseReason::PeerClosed {
                    cell.conn
                        .borrow_mut()
                        .send_raw(&ws::close_frame(ws::close_code(reason), reason.name()));
                }
                close_sent = true;
            }
            // Write everything queued.
            loop {
                if writing.is_none() {
                    writing = cell.conn.borrow_mut().poll_transmit(MAX_WRITE);
                    off = 0;
                }
                let Some(chunk) = &writing else { break };
                match Pin::new(&mut stream).poll_write(cx, &chunk[off..]) {
                    Poll::Ready(Ok(n)) if n > 0 => {
                        off += n;
                        ShardStats::add(&router.stats.bytes_out, n as u64);
                        if off == chunk.len() {
                            let len = chunk.len();
                            writing = None;
                            cell.conn.borrow_mut().on_transmitted(cfg, t, len);
                        }
                    }
                    Poll::Ready(_) => {
                        cell.closing(CloseReason::PeerClosed, t.mono_ms);
                        return Poll::Ready(End::Closed);
                    }
                    Poll::Pending => break,
                }
            }
            if cell.conn.borrow().is_closing() || cell.reason.get().is_some() {
                let flushed = writing.is_none();
                let late = cell.close_deadline.get().is_some_and(|d| d <= t.mono_ms);
                return if flushed || late {
                    Poll::Ready(End::Closed)
                } else {
                    Poll::Pending
                };
            }
            if budget == 0 {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            budget -= 1;
            let mut buf = rshared.borrow_mut();
            match Pin::new(&mut stream).poll_read(cx, &mut buf[..]) {
                Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => {
                    cell.closing(CloseReason::PeerClosed, t.mono_ms);
                    return Poll::Ready(End::Closed);
                }
                Poll::Ready(Ok(n)) => {
                    ShardStats::add(&router.stats.bytes_in, n as u64);
                    rbuf.extend_from_slice(&buf[..n]);
                    fresh = true;
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    })
    .await;

    *cell.waker.borrow_mut() = None;
    // The ends are boxed: they run once, and keeping their state (a whole
    // hand-over) out of this future keeps every idle connection small.
    match end {
        End::Closed => Box::pin(finish_closed(shard, cell, stream)).await,
        End::Handover { owner, hello } => {
            let pending_out = match writing {
                Some(w) => w.slice(off..),
                None => Bytes::new(),
            };
            let moving = Moving {
                hello,
                rbuf,
                pending_out,
                ws,
            };
            Box::pin(finish_handover(
                shard,
                cell,
                stream,
                owner,
                Box::new(moving),
            ))
            .await
        }
    }
}

/// What travels with a connection besides its socket and state.
struct Moving {
    hello: Hello,
    rbuf: BytesMut,
    pending_out: Bytes,
    ws: Option<WsDecoder>,
}

async fn finish_closed(shard: Rc<Shard>, cell: Rc<ConnCell>, stream: TcpStream) {
    // Let the last bytes (an ERROR, a BYE) reach the peer before FIN.
    discard_unread(&stream);
    let _ = stream.shutdown(std::net::Shutdown::Write).await;
    shard.router.on_closed(&cell, now());
    shard
        .shared
        .open
        .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    drop(stream);
}

async fn finish_handover(
    shard: Rc<Shard>,
    cell: Rc<ConnCell>,
    stream: TcpStream,
    owner: usize,
    m: Box<Moving>,
) {
    let router = &shard.router;
    router.forget(&cell);
    // SAFETY: dup of an fd we own; the duplicate travels to the owner
    // shard, which takes ownership of it. The original closes with `stream`.
    let fd = unsafe { libc::dup(stream.as_raw_fd()) };
    drop(stream);
    if fd < 0 {
        tracing::warn!("hand-over failed: dup: {}", std::io::Error::last_os_error());
        shard
            .shared
            .open
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        return;
    }
    let cfg = &router.cfg.conn;
    let transport = cell.conn.borrow().transport();
    let fresh_conn = relay_core::Connection::new(cfg, transport, now());
    let conn = std::mem::replace(&mut *cell.conn.borrow_mut(), fresh_conn);
    let session = cell.session.borrow().clone();
    let Moving {
        hello,
        rbuf,
        pending_out,
        ws,
    } = *m;
    let h = Handover {
        fd,
        conn,
        hello,
        rbuf,
        pending_out,
        session,
        ws,
    };
    ShardStats::add(&router.stats.handovers, 1);
    shard.send_handover(owner, h).await;
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
        Ok(Some(WsMsg::Binary(m))) => event(c.handle_message(cfg, t, false, m)),
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
fn discard_unread(stream: &TcpStream) {
    let mut scratch = [0u8; 4096];
    for _ in 0..16 {
        // SAFETY: non-blocking recv into a local buffer of the given length.
        let n = unsafe {
            libc::recv(
                stream.as_raw_fd(),
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
