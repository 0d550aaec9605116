//! The socket state of a shard's client connections: the descriptor, the TLS
//! session, what is half-read or half-written, the WebSocket frame state and
//! the epoll flags. The runtime keeps it here, in one table per shard; the
//! router's records ([`ConnCell`]) hold none of it.
//!
//! - The table is a slab: a vector of slots, each holding a connection's
//!   record and its [`Io`], and a list of free slots. A record knows its slot
//!   (`ConnCell::io_slot`), so the write pass reaches the state of a listed
//!   connection by index.
//! - A socket's epoll token is its slot with the low 32 bits of its
//!   connection id above ([`Entry::token`]): an event goes straight to its
//!   slot, with no lookup by id, and a stale event (for a connection that
//!   closed earlier in the same pass, its slot taken by a new one) finds
//!   nothing, as a stale id would.
//! - Borrowing: the I/O loop takes a connection's state out of its slot as an
//!   [`Entry`], which owns it and puts it back when it drops. Every borrow of
//!   the table begins and ends inside one method of this file, which calls
//!   nothing outside it and lets nothing drop while it holds the borrow, so
//!   routing (which reaches other connections' records, never this table)
//!   cannot meet a borrowed table; and a slot whose state is out is simply
//!   not found again until it is back.
//!
//! Memory per connection (x86_64, glibc malloc; `a_slot_is_32_bytes`
//! holds the slot to it): a slot is 32 B (the record's `Rc` 8 B, `Io`
//! 24 B). The vector's pages are touched only up to its highest slot in
//! use, so its spare capacity costs address space, not resident memory; a
//! hash map by id would touch every bucket. The table keeps its highest size
//! after connections close and reuses the free slots first. What else an
//! idle connection holds is in BENCHMARKS.md ("Memory per idle connection
//! after the router's indexes and the smaller session").

use std::cell::{Cell, RefCell};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use bytes::{Bytes, BytesMut};

use crate::cell::{ConnCell, ConnId, NO_SLOT};
use crate::stats::ShardStats;
use crate::ws::WsDecoder;

/// Slots stop here: the reserved epoll tokens (the listeners' and the
/// kick's, `u64::MAX - 4..=u64::MAX`, see `conn.rs`) name slots beyond it,
/// and so does `NO_SLOT`.
const MAX_SLOTS: usize = (u32::MAX - 8) as usize;

/// A connection's socket state: a descriptor and four flags while nothing
/// is pending. Input is read into the shard's shared buffer; what must
/// outlive a pass (an incomplete frame, a write the socket took only part
/// of, a browser's frame state) lives in `part`, allocated only then.
#[derive(Debug, Default)]
pub(super) struct Io {
    /// The socket (`None` only in the empty value an [`Entry`] leaves behind
    /// once it is closed).
    pub fd: Option<OwnedFd>,
    /// [`CLOSE_SENT`], and the io_uring backend's marks ([`ARMED`],
    /// [`MULTI`], [`CANCELLING`]).
    pub marks: u8,
    /// epoll: the socket is registered for writability (its send buffer was
    /// full). io_uring: a send is in flight.
    pub want_out: bool,
    /// The peer closed or reset the connection: close without flushing.
    pub eof: bool,
    /// Input is not read: the connection's queue (with the answers it is
    /// still owed) is at `queue_bytes`; reading resumes once it drains.
    pub paused: bool,
    pub part: Option<Box<Partial>>,
    /// The TLS session of a connection on a TLS listener.
    pub tls: Option<Box<rustls::ServerConnection>>,
}

/// A WebSocket close frame has been queued.
pub(super) const CLOSE_SENT: u8 = 1;
/// io_uring: a receive is in flight.
pub(super) const ARMED: u8 = 2;
/// io_uring: the receive in flight is multishot.
pub(super) const MULTI: u8 = 4;
/// io_uring: its cancellation has been asked for.
pub(super) const CANCELLING: u8 = 8;

/// What a connection holds between passes of the I/O loop, when anything.
#[derive(Debug, Default)]
pub(super) struct Partial {
    /// Input not yet parsed (an incomplete frame).
    pub rbuf: BytesMut,
    /// A write the socket took only part of: the chunk and how far it went.
    pub writing: Option<(Bytes, usize)>,
    /// The WebSocket frame state of a browser (None on plain TCP).
    pub ws: Option<WsDecoder>,
    /// On a `proxy_protocol` listener, until its PROXY header is whole: the
    /// header's bytes so far (nothing else is read before it).
    pub proxy: Option<Vec<u8>>,
}

impl Io {
    /// The state of a socket the I/O loop takes, with its TLS session when
    /// it came through a TLS listener.
    pub fn new(fd: OwnedFd, tls: Option<Box<rustls::ServerConnection>>) -> Io {
        Io {
            fd: Some(fd),
            tls,
            ..Io::default()
        }
    }

    /// With what was done before the I/O loop took the socket: `rbuf` input
    /// already read, `pending` output already taken off the queue, `ws` the
    /// frame state of a browser.
    pub fn carrying(mut self, rbuf: BytesMut, pending: Bytes, ws: Option<WsDecoder>) -> Io {
        if !rbuf.is_empty() || !pending.is_empty() || ws.is_some() {
            let p = self.part();
            p.rbuf = rbuf;
            p.writing = (!pending.is_empty()).then_some((pending, 0));
            p.ws = ws;
        }
        self
    }

    /// Whether mark `m` is set.
    pub fn has(&self, m: u8) -> bool {
        self.marks & m != 0
    }

    /// Sets or clears mark `m`.
    pub fn mark(&mut self, m: u8, on: bool) {
        if on {
            self.marks |= m;
        } else {
            self.marks &= !m;
        }
    }

    /// The socket's descriptor.
    pub fn raw_fd(&self) -> Option<RawFd> {
        self.fd.as_ref().map(AsRawFd::as_raw_fd)
    }

    /// The partial state, allocated on first use.
    pub fn part(&mut self) -> &mut Partial {
        self.part.get_or_insert_with(Box::default)
    }

    /// A write is half done (or TLS records wait to be sent).
    pub fn writing(&self) -> bool {
        self.part.as_ref().is_some_and(|p| p.writing.is_some())
            || self.tls.as_ref().is_some_and(|t| t.wants_write())
    }

    /// The connection is a browser's.
    pub fn is_ws(&self) -> bool {
        self.part.as_ref().is_some_and(|p| p.ws.is_some())
    }

    /// Takes the unparsed input (to add a read to it).
    pub fn take_rbuf(&mut self) -> BytesMut {
        self.part
            .as_mut()
            .map(|p| std::mem::take(&mut p.rbuf))
            .unwrap_or_default()
    }

    /// Frees the partial state once nothing is left in it.
    /// The PROXY header read so far, while it is awaited.
    pub fn proxy(&mut self) -> Option<&mut Vec<u8>> {
        self.part.as_mut().and_then(|p| p.proxy.as_mut())
    }

    /// The PROXY header is whole (or none is expected).
    pub fn proxy_done(&mut self) {
        if let Some(p) = self.part.as_mut() {
            p.proxy = None;
        }
        self.tidy();
    }

    pub fn tidy(&mut self) {
        if self.part.as_ref().is_some_and(|p| {
            p.rbuf.is_empty() && p.writing.is_none() && p.ws.is_none() && p.proxy.is_none()
        }) {
            self.part = None;
        }
    }
}

/// One slot: vacant (no record), or a connection whose state is in place
/// (`io` set) or out in an [`Entry`] (`io` empty).
#[derive(Debug, Default)]
struct Slot {
    cell: Option<Rc<ConnCell>>,
    io: Option<Io>,
}

/// The socket state of every client connection of one shard, by slot.
#[derive(Debug)]
pub(super) struct IoTable {
    slots: RefCell<Vec<Slot>>,
    /// Vacant slots, reused before the vector grows.
    free: RefCell<Vec<u32>>,
    /// Occupied slots.
    live: Cell<usize>,
    /// Where the number of occupied slots is published (`relay_sockets`).
    stats: Arc<ShardStats>,
}

/// A connection's socket state, taken out of its slot: it goes back when
/// the entry drops, or leaves the table with [`Entry::close`].
#[derive(Debug)]
pub(super) struct Entry<'t> {
    table: &'t IoTable,
    slot: u32,
    pub cell: Rc<ConnCell>,
    pub io: Io,
}

impl IoTable {
    pub fn new(stats: Arc<ShardStats>) -> IoTable {
        IoTable {
            slots: RefCell::default(),
            free: RefCell::default(),
            live: Cell::new(0),
            stats,
        }
    }

    /// Gives `cell` a slot for `io` and returns it as an entry (to watch the
    /// socket with [`Entry::token`]); `io` back when the table is full.
    pub fn insert(&self, cell: &Rc<ConnCell>, io: Io) -> Result<Entry<'_>, Io> {
        let reused = self.free.borrow_mut().pop();
        let slot = {
            let mut slots = self.slots.borrow_mut();
            let slot = match reused {
                Some(s) => s,
                None if slots.len() < MAX_SLOTS => {
                    slots.push(Slot::default());
                    (slots.len() - 1) as u32
                }
                None => return Err(io),
            };
            match slots.get_mut(slot as usize) {
                Some(s) if s.cell.is_none() => s.cell = Some(cell.clone()),
                _ => return Err(io),
            }
            slot
        };
        cell.io_slot.set(slot);
        self.live.set(self.live.get() + 1);
        self.publish();
        Ok(Entry {
            table: self,
            slot,
            cell: cell.clone(),
            io,
        })
    }

    /// The entry an epoll token names, if its connection is still here.
    pub fn by_token(&self, token: u64) -> Option<Entry<'_>> {
        self.take(token as u32, |c| c.id as u32 == (token >> 32) as u32)
    }

    /// The entry of `cell`, if its socket is on this shard.
    pub fn of(&self, cell: &ConnCell) -> Option<Entry<'_>> {
        self.take(cell.io_slot.get(), |c| c.id == cell.id)
    }

    /// Takes the state out of `slot` when the slot's record passes `is`.
    fn take(&self, slot: u32, is: impl Fn(&ConnCell) -> bool) -> Option<Entry<'_>> {
        let mut slots = self.slots.borrow_mut();
        let s = slots.get_mut(slot as usize)?;
        let (Some(cell), Some(_)) = (&s.cell, &s.io) else {
            return None;
        };
        if !is(cell) {
            return None;
        }
        let cell = cell.clone();
        let io = s.io.take()?;
        drop(slots);
        Some(Entry {
            table: self,
            slot,
            cell,
            io,
        })
    }

    /// Puts an entry's state back in its slot.
    fn put_back(&self, slot: u32, id: ConnId, io: Io) {
        let stray = {
            let mut slots = self.slots.borrow_mut();
            match slots.get_mut(slot as usize) {
                Some(s) if s.io.is_none() && s.cell.as_ref().is_some_and(|c| c.id == id) => {
                    s.io = Some(io);
                    None
                }
                // The entry was closed (its slot is `NO_SLOT`).
                _ => Some(io),
            }
        };
        drop(stray);
    }

    /// Empties `slot` (its state is out, in the entry being closed).
    fn vacate(&self, slot: u32, id: ConnId) {
        let gone = {
            let mut slots = self.slots.borrow_mut();
            match slots.get_mut(slot as usize) {
                Some(s) if s.cell.as_ref().is_some_and(|c| c.id == id) => std::mem::take(s),
                _ => return,
            }
        };
        self.free.borrow_mut().push(slot);
        self.live.set(self.live.get().saturating_sub(1));
        self.publish();
        if let Some(c) = &gone.cell {
            c.io_slot.set(NO_SLOT);
        }
        drop(gone);
    }

    fn publish(&self) {
        self.stats.sockets.store(self.live.get() as u64, Relaxed);
    }
}

impl Entry<'_> {
    /// The socket's epoll token: the slot, and the low 32 bits of the
    /// connection id above it.
    pub fn token(&self) -> u64 {
        u64::from(self.slot) | (u64::from(self.cell.id as u32) << 32)
    }

    /// Takes the connection out of the table: its record and its socket
    /// state, which the caller closes or hands over.
    pub fn close(mut self) -> (Rc<ConnCell>, Io) {
        let io = std::mem::take(&mut self.io);
        self.table.vacate(self.slot, self.cell.id);
        self.slot = NO_SLOT;
        (self.cell.clone(), io)
    }
}

impl Drop for Entry<'_> {
    fn drop(&mut self) {
        let io = std::mem::take(&mut self.io);
        self.table.put_back(self.slot, self.cell.id, io);
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::os::unix::net::UnixStream;

    use relay_core::conn::{ConnConfig, Now, Transport};

    use super::*;
    use crate::cell::{Session, conn_id};

    fn cell(n: u64) -> Rc<ConnCell> {
        let conn = relay_core::Connection::new(
            &ConnConfig::default(),
            Transport::Tcp,
            Now {
                mono_ms: 1,
                wall_ms: 1,
            },
        );
        let remote = SocketAddr::from(([127, 0, 0, 1], 1));
        Rc::new(ConnCell::new(conn_id(0, n), conn, Session::new(remote)))
    }

    /// The state of one end of a socket pair (the other end is returned to
    /// keep it open).
    fn socket() -> (Io, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        (Io::new(OwnedFd::from(a), None), b)
    }

    fn table() -> IoTable {
        IoTable::new(Arc::new(ShardStats::default()))
    }

    #[test]
    fn an_entry_goes_back_when_it_drops_and_leaves_when_closed() {
        let t = table();
        let c = cell(1);
        let (io, _peer) = socket();
        let fd = io.raw_fd();
        let e = t.insert(&c, io).unwrap();
        let token = e.token();
        drop(e);
        assert_eq!(t.live.get(), 1);
        assert_eq!(t.stats.sockets.load(Relaxed), 1);
        let e = t.of(&c).unwrap();
        assert_eq!(e.io.raw_fd(), fd);
        drop(e);
        let e = t.by_token(token).unwrap();
        assert!(Rc::ptr_eq(&e.cell, &c));
        let (closed, io) = e.close();
        assert!(Rc::ptr_eq(&closed, &c));
        assert_eq!(io.raw_fd(), fd);
        assert_eq!(t.live.get(), 0);
        assert_eq!(t.stats.sockets.load(Relaxed), 0);
        assert_eq!(c.io_slot.get(), NO_SLOT);
        assert!(t.of(&c).is_none());
        assert!(t.by_token(token).is_none());
        // Only this test's handle is left on the record: the table let go.
        drop(closed);
        assert_eq!(Rc::strong_count(&c), 1);
    }

    #[test]
    fn a_slot_whose_state_is_out_is_not_found_again() {
        let t = table();
        let c = cell(1);
        let (io, _peer) = socket();
        let e = t.insert(&c, io).unwrap();
        let token = e.token();
        assert!(t.of(&c).is_none());
        assert!(t.by_token(token).is_none());
        drop(e);
        let mut e = t.of(&c).unwrap();
        e.io.paused = true;
        // Another connection comes and goes while this one's state is out.
        let other = cell(2);
        let (io2, _peer2) = socket();
        let e2 = t.insert(&other, io2).unwrap();
        assert_ne!(e2.token(), token);
        let _ = e2.close();
        drop(e);
        assert!(t.of(&c).unwrap().io.paused);
    }

    #[test]
    fn a_stale_token_finds_nothing_when_its_slot_is_reused() {
        let t = table();
        let (old, new) = (cell(1), cell(2));
        let (io, _peer) = socket();
        let stale = t.insert(&old, io).unwrap().token();
        let _ = t.by_token(stale).unwrap().close();
        let (io, _peer2) = socket();
        let e = t.insert(&new, io).unwrap();
        // The same slot, a different connection.
        assert_eq!(e.token() as u32, stale as u32);
        drop(e);
        assert!(t.by_token(stale).is_none());
        assert!(t.of(&old).is_none());
        assert!(t.of(&new).is_some());
        assert_eq!(t.live.get(), 1);
    }

    /// The table's share of an idle connection's memory (see the module's
    /// comment): a slot is no larger than the `RefCell<Io>` it replaced.
    #[test]
    fn a_slot_is_32_bytes() {
        assert_eq!(std::mem::size_of::<Io>(), 24);
        assert_eq!(std::mem::size_of::<Slot>(), 32);
    }
}
