//! One client connection as a sans-IO state machine.
//!
//! The runtime owns the socket and the clock; this type owns the protocol.
//! The driver loop, compiled and run as a test so it keeps to the API:
//!
//! ```
//! use bytes::BytesMut;
//! use relay_core::conn::{ConnConfig, Connection, Event, Now, Transport};
//!
//! let cfg = ConnConfig::default();
//! let now = Now { mono_ms: 0, wall_ms: 1_700_000_000_000 };
//! let mut conn = Connection::new(&cfg, Transport::Tcp, now);
//! // Before each read: a client whose queue is full is not read.
//! assert!(!conn.should_pause(&cfg, now, 0));
//! // Bytes read from the socket (a WebSocket message goes to `handle_message`).
//! let mut rbuf = BytesMut::from(&b"{\"type\":\"hello\",\"addr\":\"ctl-1\"}\n"[..]);
//! while let Some(ev) = conn.handle_input(&cfg, now, &mut rbuf) {
//!     // Route the event; the router answers a hello.
//!     if let Event::Hello(h) = ev {
//!         conn.accept(&cfg, now, &h, h.addr.clone(), "node-1");
//!     }
//! }
//! assert!(conn.is_open());
//! // Write what is queued; confirm the bytes the socket took (it keeps the
//! // rest of a chunk and writes it later).
//! while let Some(chunk) = conn.poll_transmit(64 * 1024) {
//!     let written = chunk.len();
//!     conn.on_transmitted(&cfg, now, written);
//! }
//! // Sleep until the next deadline, then apply it.
//! let at = conn.poll_timeout(&cfg).expect("an open connection has a deadline");
//! let later = Now { mono_ms: at, ..now };
//! assert!(matches!(conn.handle_timeout(&cfg, later), Some(Event::Closed(_))));
//! ```
//!
//! Input is consumed one frame per `handle_input` call so that events need no
//! per-connection queue. PING, the pre-hello rules, rate limits, parse errors
//! and timeouts are answered here; HELLO, DATA, JOIN, LEAVE and PUBLISH come
//! out as [`Event`]s for the router, which answers a HELLO with
//! [`Connection::accept`] or [`Connection::refuse`].
//!
//! Output is one byte queue per connection, in the connection's own form
//! (binary or JSON, chosen by its first byte on TCP), bounded by
//! `queue_bytes`. `send` refuses a frame that does not fit; a queue that
//! stays full past `slow_consumer_timeout_ms` closes the connection.
//!
//! # Layout
//! - this module: the state machine ([`Connection`]) and the types it
//!   exchanges with the runtime and the router.
//! - `hello`: reading a HELLO payload and a WebSocket URL hello ([`Hello`]).
//! - `rate`: the per-connection token bucket.
//! - `lines`: the JSON line splitter of TCP streams.
//! - `tests`: the state machine's tests, on a simulated clock.
//!
//! WebSocket frames are written by [`crate::ws`].

use bytes::{Buf, Bytes, BytesMut};

use crate::auth;
use crate::codec::{self, Check, DecodeError};
use crate::drops::DropReason;
use crate::frame::{ErrorCode, Flags, Frame, FrameType};
use crate::json;
use crate::name::validate_name;
use crate::ws::{self, Opcode};

mod hello;
mod lines;
mod rate;

pub use hello::Hello;

use lines::{LineSplitter, Split};
use rate::TokenBucket;

/// How far past `queue_bytes` the replies one input frame owes can take a
/// queue (WELCOME, ACK, ERROR, PONG). Replies are never dropped: the runtime
/// stops reading a client whose queue is at the bound ([`Connection::should_pause`]),
/// so what a client can make the relay queue for it stays bounded.
pub const CONTROL_SLACK: usize = 16 * 1024;

/// Limits and policy shared by every connection of a shard.
#[derive(Debug, Clone)]
pub struct ConnConfig {
    /// Largest binary body accepted and sent (`limits.max_frame`); bounds
    /// what one frame can make the relay buffer.
    pub max_frame: usize,
    /// A connection without an accepted hello after this long is closed, so
    /// idle sockets cannot hold descriptors.
    pub hello_timeout_ms: u64,
    /// Heartbeat for clients that do not ask for one (`heartbeat.interval_s`).
    pub heartbeat_default_s: u32,
    /// Smallest heartbeat a client may ask for: bounds the PING rate it may
    /// claim to need.
    pub heartbeat_min_s: u32,
    /// Largest heartbeat a client may ask for: bounds how long a dead link
    /// keeps its address online.
    pub heartbeat_max_s: u32,
    /// Idle timeout = idle_factor × the connection's heartbeat, so a few
    /// lost PINGs do not disconnect.
    pub idle_factor: u32,
    /// Bound on one connection's queued plus in-flight outbound bytes.
    pub queue_bytes: usize,
    /// A queue that stays full this long closes the connection.
    pub slow_consumer_timeout_ms: u64,
    /// Token bucket refill rate per connection; 0 disables the limit.
    pub frames_per_sec: u32,
    /// Token bucket size: frames a client may send at once above the rate.
    pub burst: u32,
    /// Largest hello `meta` object kept with a session, as JSON text.
    pub max_meta_bytes: usize,
    /// Shared secret of `[auth] mode = "hmac"`; `None` is mode "none".
    pub auth_secret: Option<Vec<u8>>,
    /// In hmac mode, a token that admits any address (the HTTP API token):
    /// the console and backend services hold it instead of per-device tokens.
    pub service_token: Option<Vec<u8>>,
}

impl Default for ConnConfig {
    fn default() -> Self {
        ConnConfig {
            max_frame: 65536,
            hello_timeout_ms: 10_000,
            heartbeat_default_s: 30,
            heartbeat_min_s: 5,
            heartbeat_max_s: 3600,
            idle_factor: 3,
            queue_bytes: 256 * 1024,
            slow_consumer_timeout_ms: 5_000,
            frames_per_sec: 2000,
            burst: 4000,
            max_meta_bytes: 4096,
            auth_secret: None,
            service_token: None,
        }
    }
}

impl ConnConfig {
    /// Longest JSON line accepted: room for a max_frame payload in base64
    /// plus the envelope.
    pub fn max_line(&self) -> usize {
        self.max_frame
            .saturating_add(self.max_frame / 3)
            .saturating_add(1024)
    }
}

/// The clock, passed in by the runtime.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Now {
    /// Monotonic milliseconds, for deadlines.
    pub mono_ms: u64,
    /// Wall-clock milliseconds since the Unix epoch, for PONG and WELCOME.
    pub wall_ms: u64,
}

/// What carries the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// Length-prefixed binary or JSON lines, chosen by the first byte.
    Tcp,
    /// One protocol frame per WebSocket message; the runtime does the framing.
    WebSocket,
}

/// The form the server writes in: the form of the client's hello.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wire {
    Binary,
    Json,
}

/// A client's role. Drives statistics, ACLs and rules, not routing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    Controller,
    Browser,
    Tool,
    Service,
}

impl Role {
    pub const ALL: [Role; 4] = [Role::Controller, Role::Browser, Role::Tool, Role::Service];
    pub fn name(self) -> &'static str {
        match self {
            Role::Controller => "controller",
            Role::Browser => "browser",
            Role::Tool => "tool",
            Role::Service => "service",
        }
    }
    pub fn from_name(s: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.name() == s)
    }
}

/// Why a connection ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    Bye,
    IdleTimeout,
    HelloTimeout,
    /// Broken framing or an oversized frame.
    ProtocolError,
    SlowConsumer,
    Replaced,
    Kicked,
    Shutdown,
    Unauthorized,
    /// Refused with `busy`: too many hellos; the client retries later.
    Busy,
    /// Closed at the end of an upgrade's drain (`going_away`).
    GoingAway,
    /// The peer closed or the socket failed.
    PeerClosed,
}

impl CloseReason {
    /// The reason string of `on_disconnect` and the logs.
    pub fn name(self) -> &'static str {
        match self {
            CloseReason::Bye => "bye",
            CloseReason::IdleTimeout => "idle_timeout",
            CloseReason::HelloTimeout => "hello_timeout",
            CloseReason::ProtocolError => "error",
            CloseReason::SlowConsumer => "slow_consumer",
            CloseReason::Replaced => "replaced",
            CloseReason::Kicked => "kicked",
            CloseReason::Shutdown => "shutdown",
            CloseReason::Unauthorized => "unauthorized",
            CloseReason::Busy => "busy",
            CloseReason::GoingAway => "going_away",
            CloseReason::PeerClosed => "closed",
        }
    }
}

/// Work for the router.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Answer with `accept` or `refuse`.
    Hello(Hello),
    /// DATA with a valid dst; `src` is this connection's address.
    Data(Frame),
    /// PUBLISH with a valid group in `dst`; `src` is this connection's address.
    Publish(Frame),
    Join {
        group: Bytes,
        seq: u32,
        ack_req: bool,
    },
    Leave {
        group: Bytes,
        seq: u32,
        ack_req: bool,
    },
    /// The connection is over: flush what `poll_transmit` still gives, then
    /// close the socket. Emitted once.
    Closed(CloseReason),
}

/// `send` could not queue a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendError {
    /// The outbound queue is at its bound (slow consumer).
    Full,
    /// The connection is closing or closed.
    Closed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Before the hello; closed at `deadline_ms` (monotonic) without one.
    AwaitHello {
        deadline_ms: u64,
    },
    Open,
    /// Closing for `reason`; the runtime closes the socket once the queue is
    /// flushed or at `deadline_ms` (monotonic), whichever comes first.
    Closing {
        reason: CloseReason,
        deadline_ms: u64,
    },
}

/// A monotonic time kept in 8 bytes as an `Option` (ms + 1, never 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Since(std::num::NonZeroU64);

impl Since {
    fn at(ms: u64) -> Since {
        Since(std::num::NonZeroU64::new(ms.saturating_add(1)).unwrap_or(std::num::NonZeroU64::MAX))
    }

    fn ms(self) -> u64 {
        self.0.get() - 1
    }
}

/// Protocol state of one connection, 112 bytes: no read buffer (the runtime
/// owns it), no write queue while nothing is queued, and what few
/// connections ever have (a full queue, dropped frames, a client
/// certificate) out of line in [`Rare`].
#[derive(Debug)]
pub struct Connection {
    transport: Transport,
    /// `None` until the first byte on TCP.
    wire: Option<Wire>,
    state: State,
    addr: Bytes,
    role: Role,
    heartbeat_s: u32,
    last_activity: u64,
    /// What is queued for the client; `None` while nothing is.
    out: Option<Box<BytesMut>>,
    /// Bytes handed to the socket and not yet confirmed written.
    inflight: u32,
    /// The frame rate limit.
    rate: TokenBucket,
    /// Where the JSON lines of a TCP stream stand between reads.
    lines: LineSplitter,
    /// A HELLO went out as an event and the router has not answered it yet.
    hello_pending: bool,
    /// Admitted with the service token (see [`Hello::privileged`]).
    privileged: bool,
    /// How the hello authenticated (see [`Hello::auth`]).
    auth: crate::acl::Auth,
    /// The slow-consumer clock, the rate-limit note, drop counts and the
    /// certificate's address, once any is set (most connections never).
    rare: Option<Box<Rare>>,
}

/// The parts of a [`Connection`] that most connections never have.
#[derive(Debug, Default)]
struct Rare {
    /// Queue full since (monotonic ms): the slow-consumer clock.
    full_since: Option<Since>,
    /// Last time a rate_limited ERROR without ACK_REQ was sent (one a second).
    limited_note_at: Option<Since>,
    /// The address a verified client certificate names (mutual TLS): the
    /// hello needs no token and may claim no other address.
    certified: Option<Bytes>,
    /// Frames dropped since the runtime last took the counts, by
    /// [`DropReason`] (all 0: none).
    drops: [u16; DropReason::COUNT],
}

impl Rare {
    fn is_empty(&self) -> bool {
        self.full_since.is_none()
            && self.limited_note_at.is_none()
            && self.certified.is_none()
            && self.drops.iter().all(|&n| n == 0)
    }
}

impl Connection {
    /// A new connection accepted at `now`.
    pub fn new(cfg: &ConnConfig, transport: Transport, now: Now) -> Connection {
        Connection {
            transport,
            wire: None,
            state: State::AwaitHello {
                deadline_ms: now.mono_ms.saturating_add(cfg.hello_timeout_ms),
            },
            addr: Bytes::new(),
            role: match transport {
                Transport::Tcp => Role::Controller,
                Transport::WebSocket => Role::Browser,
            },
            heartbeat_s: cfg.heartbeat_default_s,
            last_activity: now.mono_ms,
            out: None,
            inflight: 0,
            rate: TokenBucket::new(cfg.burst, now.mono_ms),
            lines: LineSplitter::default(),
            hello_pending: false,
            privileged: false,
            auth: crate::acl::Auth::None,
            rare: None,
        }
    }

    fn rare(&mut self) -> &mut Rare {
        self.rare.get_or_insert_with(Box::default)
    }

    /// Frees the rare parts once nothing is left in them.
    fn tidy_rare(&mut self) {
        if self.rare.as_ref().is_some_and(|r| r.is_empty()) {
            self.rare = None;
        }
    }

    fn full_since(&self) -> Option<Since> {
        self.rare.as_ref().and_then(|r| r.full_since)
    }

    /// Starts the slow-consumer clock unless it runs.
    fn set_full(&mut self, now: Now) {
        self.rare().full_since.get_or_insert(Since::at(now.mono_ms));
    }

    /// The write queue, allocated on first use.
    fn out(&mut self) -> &mut BytesMut {
        self.out.get_or_insert_with(Box::default)
    }

    fn out_len(&self) -> usize {
        self.out.as_ref().map_or(0, |o| o.len())
    }

    pub fn addr(&self) -> &Bytes {
        &self.addr
    }

    /// Records the address a verified client certificate names: the hello
    /// then needs no token, may omit its address (this one is taken) and
    /// cannot claim another.
    pub fn set_certified(&mut self, addr: Bytes) {
        self.rare().certified = Some(addr);
    }

    /// The address of the client certificate, if one was verified.
    pub fn certified(&self) -> Option<&Bytes> {
        self.rare.as_ref().and_then(|r| r.certified.as_ref())
    }
    /// How the accepted hello authenticated.
    pub fn auth(&self) -> crate::acl::Auth {
        self.auth
    }
    pub fn role(&self) -> Role {
        self.role
    }
    pub fn heartbeat_s(&self) -> u32 {
        self.heartbeat_s
    }
    pub fn wire(&self) -> Option<Wire> {
        self.wire
    }
    pub fn transport(&self) -> Transport {
        self.transport
    }
    pub fn is_open(&self) -> bool {
        self.state == State::Open
    }
    pub fn is_closing(&self) -> bool {
        matches!(self.state, State::Closing { .. })
    }
    /// The hello carried the service token (or the relay has no auth).
    pub fn is_privileged(&self) -> bool {
        self.privileged
    }

    /// Frames this connection dropped since the last call, by
    /// [`DropReason`] (index = `DropReason as usize`); the counts restart at 0.
    pub fn take_drops(&mut self) -> Option<[u16; DropReason::COUNT]> {
        let r = self.rare.as_mut()?;
        if r.drops.iter().all(|&n| n == 0) {
            return None;
        }
        let d = std::mem::replace(&mut r.drops, [0; DropReason::COUNT]);
        self.tidy_rare();
        Some(d)
    }

    fn count_drop(&mut self, why: DropReason) {
        let n = &mut self.rare().drops[why as usize];
        *n = n.saturating_add(1);
    }

    fn awaiting_hello(&self) -> bool {
        matches!(self.state, State::AwaitHello { .. })
    }

    /// Whether the runtime must stop reading this client before its next
    /// frame: its queue, plus `owed` bytes of answers still to come from
    /// elsewhere, is at `queue_bytes`. Every reply a frame causes is queued
    /// (never dropped), so this is what bounds them: a client that sends and
    /// never reads stops being read. A queue at the bound also starts the
    /// slow-consumer clock, so such a client is closed after
    /// `slow_consumer_timeout_ms`.
    pub fn should_pause(&mut self, cfg: &ConnConfig, now: Now, owed: usize) -> bool {
        let q = self.queued_bytes();
        if q >= cfg.queue_bytes {
            if self.state == State::Open {
                self.set_full(now);
            }
            return true;
        }
        q.saturating_add(owed) >= cfg.queue_bytes
    }
    /// Bytes queued and in flight.
    pub fn queued_bytes(&self) -> usize {
        self.out_len() + self.inflight as usize
    }
    /// Sets the form of replies for a WebSocket whose hello came in the URL
    /// (JSON text), before any message arrived.
    pub fn set_wire(&mut self, wire: Wire) {
        self.wire = Some(wire);
    }

    /// Marks activity that is not a frame (a WebSocket ping or pong).
    pub fn touch(&mut self, now: Now) {
        self.last_activity = now.mono_ms;
    }

    /// Takes the next event out of the bytes read so far on a TCP stream.
    /// Call until it returns `None`, then read more. A `Hello` event must be
    /// answered with [`accept`](Self::accept) or [`refuse`](Self::refuse)
    /// before the next call, so frames pipelined behind the hello find the
    /// connection open.
    pub fn handle_input(
        &mut self,
        cfg: &ConnConfig,
        now: Now,
        input: &mut BytesMut,
    ) -> Option<Event> {
        loop {
            if self.is_closing() || input.is_empty() {
                return None;
            }
            let wire = *self.wire.get_or_insert(if input[0] == b'{' {
                Wire::Json
            } else {
                Wire::Binary
            });
            let frame = match wire {
                Wire::Binary => match codec::check(input, cfg.max_frame) {
                    Ok(Check::Incomplete { .. }) => return None,
                    Ok(Check::Complete { body_len }) => {
                        let mut body = input.split_to(4 + body_len).freeze();
                        body.advance(4);
                        let seq = body_seq(&body);
                        codec::parse_body(body).map_err(|e| (e, seq))
                    }
                    Err(e) => Err((e, 0)),
                }
                .map_err(|(e, seq)| self.decode_failed(cfg, seq, e)),
                Wire::Json => {
                    let line = self.next_line(cfg, input)?;
                    let trimmed = line.trim_ascii();
                    if trimmed.is_empty() {
                        continue;
                    }
                    self.parse_json_frame(cfg, trimmed).ok_or(None)
                }
            };
            match frame {
                Ok(f) => {
                    if let Some(ev) = self.handle_frame(cfg, now, f) {
                        return Some(ev);
                    }
                }
                Err(Some(ev)) => return Some(ev),
                Err(None) => {}
            }
        }
    }

    /// Handles one WebSocket message: text is the JSON form, binary one body.
    /// Until the hello is accepted, replies follow the form of the latest
    /// message; from then on, the form of the hello.
    pub fn handle_message(
        &mut self,
        cfg: &ConnConfig,
        now: Now,
        text: bool,
        msg: Bytes,
    ) -> Option<Event> {
        if self.is_closing() {
            return None;
        }
        if self.awaiting_hello() && !self.hello_pending {
            self.wire = Some(if text { Wire::Json } else { Wire::Binary });
        }
        if text {
            if msg.len() > cfg.max_line() {
                // The message boundary is kept: refuse it and go on.
                let e = format!(
                    "text message of {} bytes exceeds the {} allowed",
                    msg.len(),
                    cfg.max_line()
                );
                self.reject(cfg, 0, ErrorCode::TooLarge, &e);
                return None;
            }
            let f = self.parse_json_frame(cfg, msg.trim_ascii())?;
            return self.handle_frame(cfg, now, f);
        }
        if msg.len() > cfg.max_frame {
            let e = DecodeError::TooLarge {
                len: msg.len(),
                max: cfg.max_frame,
            };
            return self.decode_failed(cfg, body_seq(&msg), e);
        }
        let seq = body_seq(&msg);
        match codec::parse_body(msg) {
            Ok(f) => self.handle_frame(cfg, now, f),
            Err(e) => self.decode_failed(cfg, seq, e),
        }
    }

    /// Parses one JSON line or text message; a bad one gets its ERROR here
    /// (carrying its seq when that much could be read) and yields `None`.
    fn parse_json_frame(&mut self, cfg: &ConnConfig, text: &[u8]) -> Option<Frame> {
        if let Err(e) = std::str::from_utf8(text) {
            // JSON is UTF-8 text (RFC 8259), in every field, read or not.
            let seq = json::seq_of(text);
            let msg = format!("the line is not UTF-8 (byte {})", e.valid_up_to());
            self.reject(cfg, seq, ErrorCode::BadFrame, &msg);
            return None;
        }
        match json::parse_json(text) {
            Ok(f) if f.body_len() > cfg.max_frame => {
                let e = format!(
                    "frame of {} bytes exceeds max_frame {}",
                    f.body_len(),
                    cfg.max_frame
                );
                self.reject(cfg, f.seq, ErrorCode::TooLarge, &e);
                None
            }
            Ok(f) => Some(f),
            Err(e) => {
                let seq = json::seq_of(text);
                self.reject(cfg, seq, e.code(), &e.to_string());
                None
            }
        }
    }

    fn decode_failed(&mut self, cfg: &ConnConfig, seq: u32, e: DecodeError) -> Option<Event> {
        self.reject(cfg, seq, e.code(), &e.to_string());
        if e.recoverable() {
            None
        } else {
            Some(self.close(CloseReason::ProtocolError))
        }
    }

    /// Splits the next line off `input`. A line longer than `max_line` gets
    /// `too_large` and is skipped up to its newline.
    fn next_line(&mut self, cfg: &ConnConfig, input: &mut BytesMut) -> Option<BytesMut> {
        loop {
            match self.lines.next(input, cfg.max_line()) {
                Split::Line(line) => return Some(line),
                Split::TooLong => self.reject(cfg, 0, ErrorCode::TooLarge, LINE_TOO_LONG),
                Split::Incomplete => return None,
            }
        }
    }

    fn handle_frame(&mut self, cfg: &ConnConfig, now: Now, mut f: Frame) -> Option<Event> {
        self.last_activity = now.mono_ms;
        let ack_req = f.flags.ack_req();
        match (self.state, f.kind) {
            (State::Closing { .. }, _) => None,
            (_, FrameType::Ping) => {
                self.control(cfg, &Frame::pong(now.wall_ms));
                if ack_req {
                    self.control(cfg, &Frame::ack(f.seq));
                }
                None
            }
            (_, FrameType::Bye) => {
                if ack_req {
                    self.control(cfg, &Frame::ack(f.seq));
                }
                self.control(cfg, &Frame::new(FrameType::Bye));
                Some(self.close(CloseReason::Bye))
            }
            (State::AwaitHello { .. }, FrameType::Hello) if self.hello_pending => {
                self.reject(
                    cfg,
                    f.seq,
                    ErrorCode::Unsupported,
                    "a hello is already pending",
                );
                None
            }
            (State::AwaitHello { .. }, FrameType::Hello) => self.hello(cfg, f),
            (State::AwaitHello { .. }, _) => {
                self.reject(cfg, f.seq, ErrorCode::HelloRequired, "say hello first");
                None
            }
            (State::Open, _) if !self.rate.take(cfg.frames_per_sec, cfg.burst, now.mono_ms) => {
                self.count_drop(DropReason::RateLimited);
                if ack_req {
                    self.control(
                        cfg,
                        &Frame::error(f.seq, ErrorCode::RateLimited, "frame rate limit exceeded"),
                    );
                } else if self
                    .rare
                    .as_ref()
                    .and_then(|r| r.limited_note_at)
                    .is_none_or(|t| now.mono_ms >= t.ms().saturating_add(1000))
                {
                    self.rare().limited_note_at = Some(Since::at(now.mono_ms));
                    self.control(
                        cfg,
                        &Frame::error(
                            0,
                            ErrorCode::RateLimited,
                            "frame rate limit exceeded; frames dropped",
                        ),
                    );
                }
                None
            }
            (State::Open, FrameType::Hello) => {
                self.reject(
                    cfg,
                    f.seq,
                    ErrorCode::Unsupported,
                    "hello was already accepted",
                );
                None
            }
            (
                State::Open,
                FrameType::Data | FrameType::Publish | FrameType::Join | FrameType::Leave,
            ) => {
                let to_rules = f.kind == FrameType::Data && f.dst[..] == *crate::name::RULES_DST;
                if !to_rules && let Err(e) = validate_name(&f.dst) {
                    let what = if f.kind == FrameType::Data {
                        "dst"
                    } else {
                        "group"
                    };
                    self.reject(cfg, f.seq, ErrorCode::BadAddress, &format!("{what}: {e}"));
                    return None;
                }
                match f.kind {
                    FrameType::Join => Some(Event::Join {
                        group: f.dst,
                        seq: f.seq,
                        ack_req,
                    }),
                    FrameType::Leave => Some(Event::Leave {
                        group: f.dst,
                        seq: f.seq,
                        ack_req,
                    }),
                    kind => {
                        f.src = self.addr.clone();
                        // Only the server sets GROUP; reserved bits are dropped.
                        f.flags = f.flags.with(Flags::GROUP, false).defined();
                        Some(if kind == FrameType::Data {
                            Event::Data(f)
                        } else {
                            Event::Publish(f)
                        })
                    }
                }
            }
            (State::Open, kind) => {
                let msg = format!("{} is sent by the server", kind.name());
                self.reject(cfg, f.seq, ErrorCode::Unsupported, &msg);
                None
            }
        }
    }

    fn hello(&mut self, cfg: &ConnConfig, mut f: Frame) -> Option<Event> {
        let seq = f.seq;
        if let Some(cert) = self.certified().cloned() {
            if !f.src.is_empty() && f.src != cert {
                self.control(
                    cfg,
                    &Frame::error(
                        seq,
                        ErrorCode::Unauthorized,
                        "the address is not the client certificate's",
                    ),
                );
                return Some(self.close(CloseReason::Unauthorized));
            }
            f.src = cert;
        }
        if !f.src.is_empty()
            && let Err(e) = validate_name(&f.src)
        {
            self.reject(cfg, seq, ErrorCode::BadAddress, &format!("addr: {e}"));
            return None;
        }
        let fields = match hello::parse_payload(&f.payload, cfg) {
            Ok(h) => h,
            Err(msg) => {
                self.reject(cfg, seq, ErrorCode::BadFrame, &msg);
                return None;
            }
        };
        let token = fields.token.as_deref();
        // The service token (the HTTP API's) is what grants more than a
        // device has; a relay without any authentication trusts everyone.
        let privileged = match (&cfg.service_token, &cfg.auth_secret) {
            (Some(s), _) => token.is_some_and(|t| auth::same_secret(t.as_bytes(), s)),
            (None, None) => true,
            (None, Some(_)) => false,
        };
        let device_token = cfg.auth_secret.as_ref().is_some_and(|secret| {
            !f.src.is_empty() && token.is_some_and(|t| auth::verify_token(secret, &f.src, t))
        });
        let how = if self.certified().is_some() {
            crate::acl::Auth::Certificate
        } else if privileged && cfg.service_token.is_some() {
            crate::acl::Auth::ServiceToken
        } else if device_token {
            crate::acl::Auth::Token
        } else {
            crate::acl::Auth::None
        };
        if cfg.auth_secret.is_some() {
            let ok = privileged || self.certified().is_some() || device_token;
            if !ok {
                self.control(
                    cfg,
                    &Frame::error(seq, ErrorCode::Unauthorized, "missing or wrong token"),
                );
                return Some(self.close(CloseReason::Unauthorized));
            }
        }
        if fields.role == Some(Role::Service) && !privileged {
            // A role that grants more comes from the token, never the hello.
            self.reject(
                cfg,
                seq,
                ErrorCode::Forbidden,
                "role service needs the service token",
            );
            return None;
        }
        self.hello_pending = true;
        Some(Event::Hello(Hello {
            addr: f.src,
            role: fields.role.unwrap_or(self.role),
            heartbeat_s: fields.heartbeat_s.unwrap_or(cfg.heartbeat_default_s).clamp(
                cfg.heartbeat_min_s,
                cfg.heartbeat_max_s.max(cfg.heartbeat_min_s),
            ),
            meta: fields.meta,
            seq,
            ack_req: f.flags.ack_req(),
            privileged,
            auth: how,
        }))
    }

    /// Takes a hello from a WebSocket URL query (`addr=..&role=..&token=..`,
    /// optionally `heartbeat_s=..`; a leading path up to `?` is skipped).
    /// Replies become JSON text. Returns the `Hello` event (answer it like any
    /// other), `Closed` when the token is refused, or `None` when the query
    /// holds no hello keys or the hello was refused with an ERROR.
    pub fn handle_url_hello(&mut self, cfg: &ConnConfig, now: Now, query: &str) -> Option<Event> {
        if !self.awaiting_hello() || self.hello_pending {
            return None;
        }
        let f = hello::url_frame(query)?;
        self.wire = Some(Wire::Json);
        self.last_activity = now.mono_ms;
        self.hello(cfg, f)
    }

    /// Accepts a HELLO: the connection now holds `addr` and gets WELCOME.
    pub fn accept(&mut self, cfg: &ConnConfig, now: Now, hello: &Hello, addr: Bytes, node: &str) {
        if !self.awaiting_hello() {
            return;
        }
        self.hello_pending = false;
        self.state = State::Open;
        self.addr = addr;
        self.role = hello.role;
        self.privileged = hello.privileged;
        self.auth = hello.auth;
        self.heartbeat_s = hello.heartbeat_s;
        self.last_activity = now.mono_ms;
        let addr_text = String::from_utf8_lossy(&self.addr);
        let payload = serde_json::json!({
            "addr": addr_text,
            "server_time_ms": now.wall_ms,
            "heartbeat_s": self.heartbeat_s,
            "max_frame": cfg.max_frame,
            "node": node,
        })
        .to_string();
        let welcome = Frame {
            // A copy, freed once encoded: a clone would give the address
            // a shared header (32 bytes) for the connection's life.
            dst: Bytes::copy_from_slice(&self.addr),
            flags: Flags(Flags::JSON),
            payload: payload.into(),
            ..Frame::new(FrameType::Welcome)
        };
        self.control(cfg, &welcome);
        if hello.ack_req {
            self.control(cfg, &Frame::ack(hello.seq));
        }
    }

    /// Refuses a HELLO with an ERROR; `close` ends the connection too.
    pub fn refuse(
        &mut self,
        cfg: &ConnConfig,
        seq: u32,
        code: ErrorCode,
        message: &str,
        close: bool,
    ) -> Option<Event> {
        self.hello_pending = false;
        if self.is_closing() {
            return None;
        }
        self.control(cfg, &Frame::error(seq, code, message));
        if close {
            let reason = match code {
                ErrorCode::Unauthorized => CloseReason::Unauthorized,
                ErrorCode::Busy => CloseReason::Busy,
                _ => CloseReason::ProtocolError,
            };
            Some(self.close(reason))
        } else {
            None
        }
    }

    /// Refuses a hello with an ERROR carrying `retry_after_ms` (`busy`) and
    /// closes the connection.
    pub fn refuse_retry(
        &mut self,
        cfg: &ConnConfig,
        seq: u32,
        code: ErrorCode,
        retry_after_ms: u64,
        message: &str,
    ) -> Option<Event> {
        self.hello_pending = false;
        if self.is_closing() {
            return None;
        }
        self.control(cfg, &Frame::error_retry(seq, code, retry_after_ms, message));
        Some(self.close(CloseReason::Busy))
    }

    /// Queues a frame for this client (DATA from another client, or a reply).
    /// For DATA, ACK_REQ is cleared: acknowledgements are the relay's job.
    ///
    /// Refused with `Full` when queued plus in-flight bytes would pass
    /// `queue_bytes`; the first refusal starts the slow-consumer clock. A
    /// frame larger than the whole bound is still taken into an empty queue,
    /// so one big frame never wedges a reader that keeps up. `Closed` also
    /// before the hello is accepted: nothing is delivered to an anonymous
    /// connection.
    pub fn send(&mut self, cfg: &ConnConfig, now: Now, frame: &Frame) -> Result<(), SendError> {
        if self.state != State::Open {
            return Err(SendError::Closed);
        }
        let queued = self.queued_bytes();
        if queued >= cfg.queue_bytes {
            self.set_full(now);
            return Err(SendError::Full);
        }
        let before = self.out_len();
        if frame.kind == FrameType::Data && frame.flags.ack_req() {
            let mut f = frame.clone();
            f.flags = f.flags.with(Flags::ACK_REQ, false);
            self.encode(&f);
        } else {
            self.encode(frame);
        }
        if queued > 0 && self.queued_bytes() > cfg.queue_bytes {
            // Over the bound with this frame: undo and report full.
            if before == 0 {
                self.out = None;
            } else {
                self.out().truncate(before);
            }
            self.set_full(now);
            return Err(SendError::Full);
        }
        Ok(())
    }

    /// Queues a reply the relay owes this client (ACK, ERROR, PONG...). A
    /// reply is never dropped, whatever the queue holds: the runtime bounds
    /// them by not reading a client whose queue is full (`should_pause`).
    pub fn control(&mut self, _cfg: &ConnConfig, frame: &Frame) {
        self.encode(frame);
    }

    /// Drops a client frame: counts it by `code` and answers ERROR.
    fn reject(&mut self, cfg: &ConnConfig, seq: u32, code: ErrorCode, message: &str) {
        if let Some(why) = DropReason::of_refusal(code) {
            self.count_drop(why);
        }
        self.control(cfg, &Frame::error(seq, code, message));
    }

    fn encode(&mut self, frame: &Frame) {
        let form = (self.transport, self.wire.unwrap_or(Wire::Binary));
        let out = self.out();
        match form {
            (Transport::Tcp, Wire::Binary) => codec::encode(frame, out),
            (Transport::Tcp, Wire::Json) => {
                json::write_json(frame, out);
                out.extend_from_slice(b"\n");
            }
            (Transport::WebSocket, Wire::Binary) => {
                let len = codec::body_len(frame);
                out.reserve(ws::MAX_HEADER + len);
                ws::put_header(Opcode::Binary, len, out);
                codec::encode_body(frame, out);
            }
            (Transport::WebSocket, Wire::Json) => {
                ws::put_frame_with(Opcode::Text, out, |out| json::write_json(frame, out));
            }
        }
    }

    /// Drops what is queued and not yet taken by `poll_transmit`: for a
    /// connection whose bytes another protocol's state writes (an MQTT
    /// client, whose session answers CONNECT), the WELCOME `accept` queued
    /// would never go out, only be held.
    pub fn discard_output(&mut self) {
        self.out = None;
    }

    /// Queues raw bytes already framed for this transport (a WebSocket
    /// close or pong built by the runtime).
    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.out().extend_from_slice(bytes);
    }

    /// Ends the connection with an ERROR first (`replaced`, `forbidden`,
    /// `shutting_down`...). Returns the `Closed` event to report.
    pub fn close_with(
        &mut self,
        cfg: &ConnConfig,
        code: ErrorCode,
        message: &str,
        reason: CloseReason,
    ) -> Option<Event> {
        if self.is_closing() {
            return None;
        }
        self.control(cfg, &Frame::error(0, code, message));
        Some(self.close(reason))
    }

    /// Marks the connection closing; the caller reports the event (and
    /// sets the deadline with [`closing`](Self::closing)).
    pub fn close(&mut self, reason: CloseReason) -> Event {
        self.closing(reason, u64::MAX);
        Event::Closed(reason)
    }

    /// Closing for `reason`, to be closed by `deadline_ms` at the latest. A
    /// connection already closing keeps its first reason; the deadline only
    /// moves earlier.
    pub fn closing(&mut self, reason: CloseReason, deadline_ms: u64) {
        match &mut self.state {
            State::Closing { deadline_ms: d, .. } => *d = (*d).min(deadline_ms),
            _ => {
                self.state = State::Closing {
                    reason,
                    deadline_ms,
                }
            }
        }
    }

    /// Why the connection is closing, once it is.
    pub fn close_reason(&self) -> Option<CloseReason> {
        match self.state {
            State::Closing { reason, .. } => Some(reason),
            _ => None,
        }
    }

    /// When the runtime closes the socket at the latest, once closing.
    pub fn close_deadline(&self) -> Option<u64> {
        match self.state {
            State::Closing { deadline_ms, .. } => Some(deadline_ms),
            _ => None,
        }
    }

    /// The next chunk to write, at most `max` bytes. It counts as in flight
    /// until `on_transmitted`.
    pub fn poll_transmit(&mut self, max: usize) -> Option<Bytes> {
        let out = self.out.as_mut().filter(|o| !o.is_empty())?;
        let n = out.len().min(max.max(1)).min(u32::MAX as usize);
        let chunk = out.split_to(n).freeze();
        if out.is_empty() {
            // Give the allocation back: idle connections hold no buffer.
            self.out = None;
        }
        self.inflight = self.inflight.saturating_add(chunk.len() as u32);
        Some(chunk)
    }

    /// `n` bytes from `poll_transmit` reached the socket.
    pub fn on_transmitted(&mut self, cfg: &ConnConfig, _now: Now, n: usize) {
        self.inflight = self
            .inflight
            .saturating_sub(u32::try_from(n).unwrap_or(u32::MAX));
        if self.queued_bytes() < cfg.queue_bytes
            && let Some(r) = self.rare.as_mut()
            && r.full_since.is_some()
        {
            r.full_since = None;
            self.tidy_rare();
        }
    }

    /// Earliest monotonic time at which `handle_timeout` has work.
    pub fn poll_timeout(&self, cfg: &ConnConfig) -> Option<u64> {
        match self.state {
            State::AwaitHello { deadline_ms } => Some(deadline_ms),
            State::Open => {
                let idle = self.last_activity.saturating_add(self.idle_timeout_ms(cfg));
                Some(match self.full_since() {
                    Some(t) => idle.min(t.ms().saturating_add(cfg.slow_consumer_timeout_ms)),
                    None => idle,
                })
            }
            State::Closing { .. } => None,
        }
    }

    /// Idle bound for this connection: idle_factor × its heartbeat.
    pub fn idle_timeout_ms(&self, cfg: &ConnConfig) -> u64 {
        (self.heartbeat_s as u64)
            .saturating_mul(cfg.idle_factor.max(1) as u64)
            .saturating_mul(1000)
    }

    /// Applies deadlines that have passed.
    pub fn handle_timeout(&mut self, cfg: &ConnConfig, now: Now) -> Option<Event> {
        match self.state {
            State::AwaitHello { deadline_ms } if now.mono_ms >= deadline_ms => {
                self.control(
                    cfg,
                    &Frame::error(0, ErrorCode::HelloRequired, "no hello within hello_timeout"),
                );
                Some(self.close(CloseReason::HelloTimeout))
            }
            State::Open => {
                if let Some(t) = self.full_since()
                    && now.mono_ms >= t.ms().saturating_add(cfg.slow_consumer_timeout_ms)
                {
                    self.control(
                        cfg,
                        &Frame::error(0, ErrorCode::SlowConsumer, "outbound queue stayed full"),
                    );
                    return Some(self.close(CloseReason::SlowConsumer));
                }
                if now.mono_ms >= self.last_activity.saturating_add(self.idle_timeout_ms(cfg)) {
                    self.control(
                        cfg,
                        &Frame::error(0, ErrorCode::IdleTimeout, "no frame within idle_timeout"),
                    );
                    return Some(self.close(CloseReason::IdleTimeout));
                }
                None
            }
            _ => None,
        }
    }
}

const LINE_TOO_LONG: &str = "line exceeds max_frame";

/// The seq of a binary body, readable once 7 bytes are there (0 otherwise).
fn body_seq(body: &[u8]) -> u32 {
    match body.get(3..7) {
        Some(b) => u32::from_be_bytes([b[0], b[1], b[2], b[3]]),
        None => 0,
    }
}

#[cfg(test)]
mod tests;
