//! The record of one connection on its shard, shared (`Rc`) between the
//! shard's I/O loop and its router. Single-threaded: interior mutability with
//! `RefCell`/`Cell`, never a lock.

use std::cell::{Cell, RefCell};
use std::net::SocketAddr;
use std::os::fd::OwnedFd;

use bytes::{Bytes, BytesMut};
use relay_core::{CloseReason, Connection};

use crate::ws::WsDecoder;

/// Identifies a connection for the life of the process: the shard in the low
/// 8 bits, a per-shard counter above. Never reused, so a stale id (an ACK
/// for a connection that has gone) finds nothing instead of the wrong peer.
pub type ConnId = u64;

pub fn conn_id(shard: usize, counter: u64) -> ConnId {
    (counter << 8) | (shard as u64 & 0xff)
}

/// What the API and rules know about a session. The parts most idle
/// controllers never have (hello meta, groups, uids) live out of line, so
/// the record of an idle connection stays small.
#[derive(Debug, Clone)]
pub struct Session {
    pub remote: SocketAddr,
    pub connected_at_ms: u64,
    more: Option<Box<SessionMore>>,
}

#[derive(Debug, Clone, Default)]
struct SessionMore {
    /// Compact JSON object from the hello (empty: `{}`).
    meta: Bytes,
    /// Groups this connection is a member of.
    groups: Vec<Bytes>,
    /// Uids bound to this connection's address (through the API).
    uids: Vec<Bytes>,
}

/// The two lists a connection can be a member of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Membership {
    Group,
    Uid,
}

impl Session {
    pub fn new(remote: SocketAddr) -> Session {
        Session {
            remote,
            connected_at_ms: 0,
            more: None,
        }
    }

    /// The hello's meta as a compact JSON object (`{}` when it had none).
    pub fn meta(&self) -> Bytes {
        match &self.more {
            Some(m) if !m.meta.is_empty() => m.meta.clone(),
            _ => Bytes::from_static(b"{}"),
        }
    }

    pub fn set_meta(&mut self, meta: Bytes) {
        if meta.is_empty() || meta.as_ref() == b"{}" {
            if let Some(m) = self.more.as_mut() {
                m.meta = Bytes::new();
            }
        } else {
            self.more.get_or_insert_with(Box::default).meta = meta;
        }
    }

    /// The groups or uids of this connection.
    pub fn list(&self, which: Membership) -> &[Bytes] {
        match (&self.more, which) {
            (Some(m), Membership::Group) => &m.groups,
            (Some(m), Membership::Uid) => &m.uids,
            (None, _) => &[],
        }
    }

    /// The groups or uids of this connection, to change.
    pub fn list_mut(&mut self, which: Membership) -> &mut Vec<Bytes> {
        let m = self.more.get_or_insert_with(Box::default);
        match which {
            Membership::Group => &mut m.groups,
            Membership::Uid => &mut m.uids,
        }
    }

    /// Takes every membership (the connection is going).
    pub fn take_lists(&mut self) -> (Vec<Bytes>, Vec<Bytes>) {
        match self.more.as_mut() {
            Some(m) => (std::mem::take(&mut m.groups), std::mem::take(&mut m.uids)),
            None => (Vec::new(), Vec::new()),
        }
    }
}

/// A connection's socket state: a descriptor and three flags while nothing
/// is pending. Input is read into the shard's shared buffer; what must
/// outlive a pass (an incomplete frame, a write the socket took only part
/// of, a browser's frame state) lives in `part`, allocated only then.
#[derive(Debug, Default)]
pub struct Io {
    /// The socket, once the I/O loop has it (closed when the record drops).
    pub fd: Option<OwnedFd>,
    /// A WebSocket close frame has been queued.
    pub close_sent: bool,
    /// The socket is registered for writability (its send buffer was full).
    pub want_out: bool,
    /// The peer closed or reset the connection: close without flushing.
    pub eof: bool,
    /// Input is not read: the connection's queue (with the answers it is
    /// still owed) is at `queue_bytes`; reading resumes once it drains.
    pub paused: bool,
    pub part: Option<Box<Partial>>,
    /// The TLS session of a connection on a TLS listener.
    pub tls: Option<Box<rustls::ServerConnection>>,
    /// On a `proxy_protocol` listener, until its PROXY header is whole: the
    /// header's bytes so far (nothing else is read before it).
    pub proxy: Option<Box<Vec<u8>>>,
}

/// What a connection holds between passes of the I/O loop, when anything.
#[derive(Debug, Default)]
pub struct Partial {
    /// Input not yet parsed (an incomplete frame).
    pub rbuf: BytesMut,
    /// A write the socket took only part of: the chunk and how far it went.
    pub writing: Option<(Bytes, usize)>,
    /// The WebSocket frame state of a browser (None on plain TCP).
    pub ws: Option<WsDecoder>,
}

impl Io {
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

    /// Frees the partial state once nothing is left in it.
    pub fn tidy(&mut self) {
        if self
            .part
            .as_ref()
            .is_some_and(|p| p.rbuf.is_empty() && p.writing.is_none() && p.ws.is_none())
        {
            self.part = None;
        }
    }
}

#[derive(Debug)]
pub struct ConnCell {
    pub id: ConnId,
    pub conn: RefCell<Connection>,
    /// The socket and what is half-read or half-written on it.
    pub io: RefCell<Io>,
    /// Set while the connection waits in its shard's write list: everything
    /// queued for it during one pass of the I/O loop leaves in one write.
    pub dirty: Cell<bool>,
    pub session: RefCell<Session>,
    /// Answers (ACK or ERROR) this connection is owed by other shards: room
    /// for them counts against its queue before more of its input is read.
    pub owed: Cell<u32>,
    /// The deadline slot the router will look at this connection in
    /// (`router::timers`; `NOT_DUE`: none).
    pub due: Cell<u32>,
    /// The access rules that can apply to this client (made at hello), with
    /// the settings generation they were made for.
    pub acl: RefCell<Option<(u64, std::rc::Rc<[u16]>)>>,
    /// The MQTT session of a client on the MQTT listener (`None`: native).
    pub mqtt: RefCell<Option<Box<crate::router::MqttConn>>>,
}

impl ConnCell {
    pub fn new(id: ConnId, conn: Connection, session: Session) -> ConnCell {
        ConnCell {
            id,
            conn: RefCell::new(conn),
            io: RefCell::new(Io::default()),
            dirty: Cell::new(false),
            session: RefCell::new(session),
            owed: Cell::new(0),
            due: Cell::new(u32::MAX), // router::timers::NOT_DUE
            acl: RefCell::new(None),
            mqtt: RefCell::new(None),
        }
    }

    /// Records that the connection is closing, to be closed by
    /// `deadline_ms` at the latest (the state lives in the `Connection`:
    /// the first reason wins, the deadline only moves earlier).
    pub fn closing(&self, reason: CloseReason, deadline_ms: u64) {
        self.conn.borrow_mut().closing(reason, deadline_ms);
    }
}
