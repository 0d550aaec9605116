//! One client connection as a sans-IO state machine.
//!
//! The runtime owns the socket and the clock; this type owns the protocol.
//! The driver loop is:
//!
//! ```text
//! read bytes → while let Some(ev) = conn.handle_input(&cfg, now, &mut rbuf) { route ev }
//! while let Some(chunk) = conn.poll_transmit(max) { write chunk; conn.on_transmitted(now, chunk.len()) }
//! at conn.poll_timeout(): conn.handle_timeout(&cfg, now)
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

use bytes::{Buf, Bytes, BytesMut};

use crate::auth;
use crate::codec::{self, Check, DecodeError};
use crate::frame::{ErrorCode, Flags, Frame, FrameType};
use crate::json;
use crate::name::validate_name;

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

/// A HELLO that passed validation and authentication.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// Wanted address; empty asks the server to assign one.
    pub addr: Bytes,
    /// Asked for in the hello, else the transport's default.
    pub role: Role,
    /// Heartbeat the client will keep, clamped to the configured bounds.
    pub heartbeat_s: u32,
    /// Compact JSON object kept with the session (`{}` when absent).
    pub meta: Bytes,
    /// The hello's seq, for its ACK or ERROR.
    pub seq: u32,
    /// The hello asked for an ACK: `accept` sends it after WELCOME.
    pub ack_req: bool,
    /// The hello carried the service (HTTP API) token, or the relay has no
    /// authentication at all: the connection may watch any address and take
    /// the `service` role.
    pub privileged: bool,
}

/// Why the connection itself dropped a client's frame (counted by the
/// runtime through [`Connection::take_drops`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputDrop {
    /// Broken layout, bad JSON, a malformed hello payload.
    BadFrame = 0,
    /// Over `max_frame`, or a JSON line over the line limit.
    TooLarge = 1,
    /// Over the connection's frame rate.
    RateLimited = 2,
    /// A frame other than HELLO, PING or BYE before hello.
    HelloRequired = 3,
    /// A dst or group that is not a valid name.
    BadAddress = 4,
    /// An unknown type or a frame only the relay sends.
    Unsupported = 5,
    /// Refused by an access rule (a hello asking for a role its token does not grant).
    Forbidden = 6,
}

impl InputDrop {
    pub const ALL: [InputDrop; 7] = [
        InputDrop::BadFrame,
        InputDrop::TooLarge,
        InputDrop::RateLimited,
        InputDrop::HelloRequired,
        InputDrop::BadAddress,
        InputDrop::Unsupported,
        InputDrop::Forbidden,
    ];

    fn of(code: ErrorCode) -> Option<InputDrop> {
        Some(match code {
            ErrorCode::BadFrame => InputDrop::BadFrame,
            ErrorCode::TooLarge => InputDrop::TooLarge,
            ErrorCode::RateLimited => InputDrop::RateLimited,
            ErrorCode::HelloRequired => InputDrop::HelloRequired,
            ErrorCode::BadAddress => InputDrop::BadAddress,
            ErrorCode::Unsupported => InputDrop::Unsupported,
            ErrorCode::Forbidden => InputDrop::Forbidden,
            _ => return None,
        })
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
    AwaitHello,
    Open,
    Closing,
}

/// Protocol state of one connection. About 150 bytes when idle: no read
/// buffer (the runtime owns it) and an unallocated write queue.
#[derive(Debug)]
pub struct Connection {
    transport: Transport,
    /// `None` until the first byte on TCP.
    wire: Option<Wire>,
    state: State,
    addr: Bytes,
    role: Role,
    heartbeat_s: u32,
    hello_deadline: u64,
    last_activity: u64,
    /// Queue full since (monotonic ms): the slow-consumer clock.
    full_since: Option<u64>,
    out: BytesMut,
    /// Bytes handed to the socket and not yet confirmed written.
    inflight: usize,
    /// Token bucket: frames the client may still send right now.
    tokens: u32,
    /// When `tokens` was last refilled (monotonic ms).
    tokens_at: u64,
    /// Last time a rate_limited ERROR without ACK_REQ was sent (one a second).
    limited_note_at: Option<u64>,
    /// A JSON line over `max_line` is being dropped up to its newline.
    skipping_line: bool,
    /// Bytes at the front of the read buffer already searched for a newline,
    /// so a long JSON line arriving in many reads is scanned once.
    line_scanned: usize,
    /// A HELLO went out as an event and the router has not answered it yet.
    hello_pending: bool,
    /// Admitted with the service token (see [`Hello::privileged`]).
    privileged: bool,
    /// The address a verified client certificate names (mutual TLS): the
    /// hello needs no token and may claim no other address.
    certified: Option<Box<Bytes>>,
    /// Frames dropped since the runtime last took the counts, by `InputDrop`.
    drops: [u16; 7],
}

impl Connection {
    /// A new connection accepted at `now`.
    pub fn new(cfg: &ConnConfig, transport: Transport, now: Now) -> Connection {
        Connection {
            transport,
            wire: None,
            state: State::AwaitHello,
            addr: Bytes::new(),
            role: match transport {
                Transport::Tcp => Role::Controller,
                Transport::WebSocket => Role::Browser,
            },
            heartbeat_s: cfg.heartbeat_default_s,
            hello_deadline: now.mono_ms.saturating_add(cfg.hello_timeout_ms),
            last_activity: now.mono_ms,
            full_since: None,
            out: BytesMut::new(),
            inflight: 0,
            tokens: cfg.burst.max(1),
            tokens_at: now.mono_ms,
            limited_note_at: None,
            skipping_line: false,
            line_scanned: 0,
            hello_pending: false,
            privileged: false,
            certified: None,
            drops: [0; 7],
        }
    }

    pub fn addr(&self) -> &Bytes {
        &self.addr
    }

    /// Records the address a verified client certificate names: the hello
    /// then needs no token, may omit its address (this one is taken) and
    /// cannot claim another.
    pub fn set_certified(&mut self, addr: Bytes) {
        self.certified = Some(Box::new(addr));
    }

    /// The address of the client certificate, if one was verified.
    pub fn certified(&self) -> Option<&Bytes> {
        self.certified.as_deref()
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
        self.state == State::Closing
    }
    /// The hello carried the service token (or the relay has no auth).
    pub fn is_privileged(&self) -> bool {
        self.privileged
    }

    /// Frames this connection dropped since the last call, by
    /// [`InputDrop`] (index = `InputDrop as usize`); the counts restart at 0.
    pub fn take_drops(&mut self) -> Option<[u16; 7]> {
        if self.drops.iter().all(|&n| n == 0) {
            return None;
        }
        Some(std::mem::take(&mut self.drops))
    }

    fn count_drop(&mut self, why: InputDrop) {
        let n = &mut self.drops[why as usize];
        *n = n.saturating_add(1);
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
                self.full_since.get_or_insert(now.mono_ms);
            }
            return true;
        }
        q.saturating_add(owed) >= cfg.queue_bytes
    }
    /// Bytes queued and in flight.
    pub fn queued_bytes(&self) -> usize {
        self.out.len() + self.inflight
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
            if self.state == State::Closing || input.is_empty() {
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
        if self.state == State::Closing {
            return None;
        }
        if self.state == State::AwaitHello && !self.hello_pending {
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
        let max = cfg.max_line();
        loop {
            let from = self.line_scanned.min(input.len());
            match memchr_nl(&input[from..]) {
                Some(i) => {
                    self.line_scanned = 0;
                    let line = input.split_to(from + i + 1);
                    if self.skipping_line {
                        self.skipping_line = false;
                        continue;
                    }
                    if line.len() > max {
                        self.reject(cfg, 0, ErrorCode::TooLarge, LINE_TOO_LONG);
                        continue;
                    }
                    return Some(line);
                }
                None => {
                    if input.len() > max {
                        if !self.skipping_line {
                            self.reject(cfg, 0, ErrorCode::TooLarge, LINE_TOO_LONG);
                            self.skipping_line = true;
                        }
                        input.clear();
                        self.line_scanned = 0;
                    } else {
                        self.line_scanned = input.len();
                    }
                    return None;
                }
            }
        }
    }

    fn handle_frame(&mut self, cfg: &ConnConfig, now: Now, mut f: Frame) -> Option<Event> {
        self.last_activity = now.mono_ms;
        let ack_req = f.flags.ack_req();
        match (self.state, f.kind) {
            (State::Closing, _) => None,
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
            (State::AwaitHello, FrameType::Hello) if self.hello_pending => {
                self.reject(
                    cfg,
                    f.seq,
                    ErrorCode::Unsupported,
                    "a hello is already pending",
                );
                None
            }
            (State::AwaitHello, FrameType::Hello) => self.hello(cfg, f),
            (State::AwaitHello, _) => {
                self.reject(cfg, f.seq, ErrorCode::HelloRequired, "say hello first");
                None
            }
            (State::Open, _) if !self.take_token(cfg, now) => {
                self.count_drop(InputDrop::RateLimited);
                if ack_req {
                    self.control(
                        cfg,
                        &Frame::error(f.seq, ErrorCode::RateLimited, "frame rate limit exceeded"),
                    );
                } else if self
                    .limited_note_at
                    .is_none_or(|t| now.mono_ms >= t.saturating_add(1000))
                {
                    self.limited_note_at = Some(now.mono_ms);
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
                if let Err(e) = validate_name(&f.dst) {
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
        if let Some(cert) = self.certified.as_deref() {
            if !f.src.is_empty() && f.src != *cert {
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
            f.src = cert.clone();
        }
        if !f.src.is_empty()
            && let Err(e) = validate_name(&f.src)
        {
            self.reject(cfg, seq, ErrorCode::BadAddress, &format!("addr: {e}"));
            return None;
        }
        let fields = match parse_hello_payload(&f.payload, cfg) {
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
        if let Some(secret) = &cfg.auth_secret {
            let ok = privileged
                || self.certified.is_some()
                || (!f.src.is_empty()
                    && token.is_some_and(|t| auth::verify_token(secret, &f.src, t)));
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
        }))
    }

    /// Takes a hello from a WebSocket URL query (`addr=..&role=..&token=..`,
    /// optionally `heartbeat_s=..`; a leading path up to `?` is skipped).
    /// Replies become JSON text. Returns the `Hello` event (answer it like any
    /// other), `Closed` when the token is refused, or `None` when the query
    /// holds no hello keys or the hello was refused with an ERROR.
    pub fn handle_url_hello(&mut self, cfg: &ConnConfig, now: Now, query: &str) -> Option<Event> {
        if self.state != State::AwaitHello || self.hello_pending {
            return None;
        }
        let query = query.split_once('?').map_or(query, |(_, q)| q);
        let mut addr = None;
        let mut fields = serde_json::Map::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let v = percent_decode(v);
            match k {
                "addr" => addr = Some(v),
                "role" | "token" => {
                    fields.insert(k.to_owned(), serde_json::Value::String(v));
                }
                "heartbeat_s" => {
                    let n = v
                        .parse::<u64>()
                        .map(serde_json::Value::from)
                        .unwrap_or(serde_json::Value::String(v));
                    fields.insert(k.to_owned(), n);
                }
                _ => {}
            }
        }
        if addr.is_none() && fields.is_empty() {
            return None;
        }
        self.wire = Some(Wire::Json);
        self.last_activity = now.mono_ms;
        let f = Frame {
            src: addr.map(Bytes::from).unwrap_or_default(),
            flags: Flags(Flags::JSON),
            payload: serde_json::Value::Object(fields).to_string().into(),
            ..Frame::new(FrameType::Hello)
        };
        self.hello(cfg, f)
    }

    /// Accepts a HELLO: the connection now holds `addr` and gets WELCOME.
    pub fn accept(&mut self, cfg: &ConnConfig, now: Now, hello: &Hello, addr: Bytes, node: &str) {
        if self.state != State::AwaitHello {
            return;
        }
        self.hello_pending = false;
        self.state = State::Open;
        self.addr = addr;
        self.role = hello.role;
        self.privileged = hello.privileged;
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
            dst: self.addr.clone(),
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
        if self.state == State::Closing {
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
        if self.state == State::Closing {
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
            self.full_since.get_or_insert(now.mono_ms);
            return Err(SendError::Full);
        }
        let before = self.out.len();
        if frame.kind == FrameType::Data && frame.flags.ack_req() {
            let mut f = frame.clone();
            f.flags = f.flags.with(Flags::ACK_REQ, false);
            self.encode(&f);
        } else {
            self.encode(frame);
        }
        if queued > 0 && self.queued_bytes() > cfg.queue_bytes {
            // Over the bound with this frame: undo and report full.
            self.out.truncate(before);
            self.full_since.get_or_insert(now.mono_ms);
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
        if let Some(why) = InputDrop::of(code) {
            self.count_drop(why);
        }
        self.control(cfg, &Frame::error(seq, code, message));
    }

    fn encode(&mut self, frame: &Frame) {
        match (self.transport, self.wire.unwrap_or(Wire::Binary)) {
            (Transport::Tcp, Wire::Binary) => codec::encode(frame, &mut self.out),
            (Transport::Tcp, Wire::Json) => {
                json::write_json(frame, &mut self.out);
                self.out.extend_from_slice(b"\n");
            }
            (Transport::WebSocket, Wire::Binary) => {
                let len = codec::body_len(frame);
                self.out.reserve(WS_MAX_HEADER + len);
                ws_header(WS_BINARY, len, &mut self.out);
                codec::encode_body(frame, &mut self.out);
            }
            (Transport::WebSocket, Wire::Json) => {
                // The length is known only once the text is written: leave
                // room for the longest header, then close the gap.
                let start = self.out.len();
                self.out.resize(start + WS_MAX_HEADER, 0);
                json::write_json(frame, &mut self.out);
                let len = self.out.len() - start - WS_MAX_HEADER;
                let (header, n) = ws_header_array(WS_TEXT, len);
                let gap = WS_MAX_HEADER - n;
                self.out[start + gap..start + WS_MAX_HEADER].copy_from_slice(&header[..n]);
                if gap > 0 {
                    self.out.copy_within(start + gap.., start);
                    self.out.truncate(self.out.len() - gap);
                }
            }
        }
    }

    /// Queues raw bytes already framed for this transport (a WebSocket
    /// close or pong built by the runtime).
    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.out.extend_from_slice(bytes);
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
        if self.state == State::Closing {
            return None;
        }
        self.control(cfg, &Frame::error(0, code, message));
        Some(self.close(reason))
    }

    /// Marks the connection closing; the caller reports the event.
    pub fn close(&mut self, reason: CloseReason) -> Event {
        self.state = State::Closing;
        Event::Closed(reason)
    }

    /// The next chunk to write, at most `max` bytes. It counts as in flight
    /// until `on_transmitted`.
    pub fn poll_transmit(&mut self, max: usize) -> Option<Bytes> {
        if self.out.is_empty() {
            return None;
        }
        let n = self.out.len().min(max.max(1));
        let chunk = self.out.split_to(n).freeze();
        self.inflight += chunk.len();
        if self.out.is_empty() && self.out.capacity() > 0 {
            // Give the allocation back: idle connections hold no buffer.
            self.out = BytesMut::new();
        }
        Some(chunk)
    }

    /// `n` bytes from `poll_transmit` reached the socket.
    pub fn on_transmitted(&mut self, cfg: &ConnConfig, _now: Now, n: usize) {
        self.inflight = self.inflight.saturating_sub(n);
        if self.queued_bytes() < cfg.queue_bytes {
            self.full_since = None;
        }
    }

    /// Earliest monotonic time at which `handle_timeout` has work.
    pub fn poll_timeout(&self, cfg: &ConnConfig) -> Option<u64> {
        match self.state {
            State::AwaitHello => Some(self.hello_deadline),
            State::Open => {
                let idle = self.last_activity.saturating_add(self.idle_timeout_ms(cfg));
                Some(match self.full_since {
                    Some(t) => idle.min(t.saturating_add(cfg.slow_consumer_timeout_ms)),
                    None => idle,
                })
            }
            State::Closing => None,
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
            State::AwaitHello if now.mono_ms >= self.hello_deadline => {
                self.control(
                    cfg,
                    &Frame::error(0, ErrorCode::HelloRequired, "no hello within hello_timeout"),
                );
                Some(self.close(CloseReason::HelloTimeout))
            }
            State::Open => {
                if let Some(t) = self.full_since
                    && now.mono_ms >= t.saturating_add(cfg.slow_consumer_timeout_ms)
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

    fn take_token(&mut self, cfg: &ConnConfig, now: Now) -> bool {
        if cfg.frames_per_sec == 0 {
            return true;
        }
        let elapsed = now.mono_ms.saturating_sub(self.tokens_at);
        let add = elapsed.saturating_mul(cfg.frames_per_sec as u64) / 1000;
        if add > 0 {
            self.tokens = (self.tokens as u64 + add).min(cfg.burst.max(1) as u64) as u32;
            // Advance only by the time the whole tokens account for.
            self.tokens_at += add * 1000 / cfg.frames_per_sec as u64;
            if self.tokens as u64 >= cfg.burst as u64 {
                self.tokens_at = now.mono_ms;
            }
        }
        // A bucket never holds more than the current burst (it may have
        // been lowered by a configuration reload).
        self.tokens = self.tokens.min(cfg.burst.max(1));
        if self.tokens == 0 {
            return false;
        }
        self.tokens -= 1;
        true
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

const WS_TEXT: u8 = 0x1;
const WS_BINARY: u8 = 0x2;
/// Longest server-to-client WebSocket header: 2 bytes and a 64-bit length.
const WS_MAX_HEADER: usize = 10;

/// Writes an unmasked, final WebSocket frame header (server to client,
/// RFC 6455 section 5.2).
pub fn ws_header(opcode: u8, len: usize, out: &mut BytesMut) {
    let (h, n) = ws_header_array(opcode, len);
    out.extend_from_slice(&h[..n]);
}

/// The header of `ws_header` in a fixed array, with its length.
fn ws_header_array(opcode: u8, len: usize) -> ([u8; WS_MAX_HEADER], usize) {
    let mut h = [0u8; WS_MAX_HEADER];
    h[0] = 0x80 | (opcode & 0x0f);
    if len < 126 {
        h[1] = len as u8;
        (h, 2)
    } else if len <= u16::MAX as usize {
        h[1] = 126;
        h[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        (h, 4)
    } else {
        h[1] = 127;
        h[2..10].copy_from_slice(&(len as u64).to_be_bytes());
        (h, 10)
    }
}

/// Decodes `%XX` escapes and `+` of a URL query value; bad escapes stay as
/// they are, and bytes that are not UTF-8 are replaced.
fn percent_decode(v: &str) -> String {
    let b = v.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                let hex = |c: u8| (c as char).to_digit(16);
                match (hex(b[i + 1]), hex(b[i + 2])) {
                    (Some(h), Some(l)) => {
                        out.push((h * 16 + l) as u8);
                        i += 3;
                        continue;
                    }
                    _ => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn memchr_nl(b: &[u8]) -> Option<usize> {
    b.iter().position(|&c| c == b'\n')
}

struct HelloFields {
    role: Option<Role>,
    token: Option<String>,
    heartbeat_s: Option<u32>,
    meta: Bytes,
}

fn parse_hello_payload(payload: &[u8], cfg: &ConnConfig) -> Result<HelloFields, String> {
    let mut h = HelloFields {
        role: None,
        token: None,
        heartbeat_s: None,
        meta: Bytes::from_static(b"{}"),
    };
    if payload.trim_ascii().is_empty() {
        return Ok(h);
    }
    let v: serde_json::Value =
        serde_json::from_slice(payload).map_err(|e| format!("hello payload: {e}"))?;
    let serde_json::Value::Object(map) = v else {
        return Err("hello payload must be a JSON object".into());
    };
    if let Some(r) = map.get("role") {
        let name = r.as_str().ok_or("role must be a string")?;
        h.role = Some(Role::from_name(name).ok_or_else(|| format!("unknown role {name:?}"))?);
    }
    if let Some(t) = map.get("token") {
        h.token = Some(t.as_str().ok_or("token must be a string")?.to_owned());
    }
    if let Some(hb) = map.get("heartbeat_s") {
        let n = hb
            .as_u64()
            .ok_or("heartbeat_s must be a positive integer")?;
        h.heartbeat_s = Some(n.min(u32::MAX as u64) as u32);
    }
    if let Some(m) = map.get("meta") {
        if !m.is_object() {
            return Err("meta must be a JSON object".into());
        }
        let text = m.to_string();
        if text.len() > cfg.max_meta_bytes {
            return Err(format!(
                "meta is {} bytes, at most {} are kept",
                text.len(),
                cfg.max_meta_bytes
            ));
        }
        h.meta = text.into();
    }
    Ok(h)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{Decoder, encode};
    use serde_json::{Value, json};

    const WALL0: u64 = 1_763_800_000_000;

    /// Simulated clock: `ms` since the connection's accept.
    fn t(ms: u64) -> Now {
        Now {
            mono_ms: ms,
            wall_ms: WALL0.saturating_add(ms),
        }
    }

    fn bin(f: &Frame) -> BytesMut {
        let mut b = BytesMut::new();
        encode(f, &mut b);
        b
    }

    fn hello(addr: &str, payload: &str) -> Frame {
        Frame {
            src: Bytes::copy_from_slice(addr.as_bytes()),
            payload: Bytes::copy_from_slice(payload.as_bytes()),
            ..Frame::new(FrameType::Hello)
        }
    }

    fn with(mut f: Frame, seq: u32, flags: u8) -> Frame {
        f.seq = seq;
        f.flags = Flags(flags);
        f
    }

    /// Every event `input` yields now.
    fn events(c: &mut Connection, cfg: &ConnConfig, now: Now, input: &mut BytesMut) -> Vec<Event> {
        let mut v = Vec::new();
        for _ in 0..10_000 {
            match c.handle_input(cfg, now, input) {
                Some(ev) => v.push(ev),
                None => return v,
            }
        }
        panic!("handle_input never returned None");
    }

    /// Like `events`, answering each hello with `accept` at once, as the
    /// router does.
    fn pump(c: &mut Connection, cfg: &ConnConfig, now: Now, input: &mut BytesMut) -> Vec<Event> {
        let mut v = Vec::new();
        for _ in 0..10_000 {
            match c.handle_input(cfg, now, input) {
                Some(Event::Hello(h)) => {
                    c.accept(cfg, now, &h, h.addr.clone(), "n1");
                    v.push(Event::Hello(h));
                }
                Some(ev) => v.push(ev),
                None => return v,
            }
        }
        panic!("handle_input never returned None");
    }

    /// Everything queued for the client, confirmed written.
    fn drain(c: &mut Connection, cfg: &ConnConfig, now: Now) -> BytesMut {
        let mut all = BytesMut::new();
        while let Some(chunk) = c.poll_transmit(usize::MAX) {
            all.extend_from_slice(&chunk);
            c.on_transmitted(cfg, now, chunk.len());
        }
        all
    }

    fn bin_frames(mut out: BytesMut) -> Vec<Frame> {
        let d = Decoder::new(1 << 20);
        let mut v = Vec::new();
        while let Some(f) = d.decode(&mut out).expect("server output decodes") {
            v.push(f);
        }
        assert!(out.is_empty(), "trailing bytes in server output");
        v
    }

    fn json_lines(out: &[u8]) -> Vec<Value> {
        let text = std::str::from_utf8(out).expect("JSON output is UTF-8");
        assert!(text.is_empty() || text.ends_with('\n'));
        text.lines()
            .map(|l| serde_json::from_str(l).expect("each line is JSON"))
            .collect()
    }

    /// (opcode, payload) of each server WebSocket frame (unmasked, final).
    fn ws_frames(out: &[u8]) -> Vec<(u8, Vec<u8>)> {
        let mut v = Vec::new();
        let mut i = 0;
        while i < out.len() {
            assert_eq!(out[i] & 0xf0, 0x80, "FIN set, RSV clear");
            let op = out[i] & 0x0f;
            assert_eq!(out[i + 1] & 0x80, 0, "server frames are unmasked");
            let (len, hl) = match out[i + 1] {
                126 => (u16::from_be_bytes([out[i + 2], out[i + 3]]) as usize, 4),
                127 => (
                    u64::from_be_bytes(out[i + 2..i + 10].try_into().unwrap()) as usize,
                    10,
                ),
                n => (n as usize, 2),
            };
            v.push((op, out[i + hl..i + hl + len].to_vec()));
            i += hl + len;
        }
        v
    }

    fn err_of(f: &Frame) -> (u32, ErrorCode) {
        let (code, _) = f.error_parts().expect("an ERROR frame");
        (f.seq, ErrorCode::from_u16(code).expect("a known code"))
    }

    fn expect_hello(ev: Vec<Event>) -> Hello {
        match &ev[..] {
            [Event::Hello(h)] => h.clone(),
            other => panic!("expected one Hello, got {other:?}"),
        }
    }

    /// A binary TCP connection that said hello as `addr` and read its WELCOME.
    fn open_bin(cfg: &ConnConfig, addr: &str) -> Connection {
        let mut c = Connection::new(cfg, Transport::Tcp, t(0));
        let h = expect_hello(events(&mut c, cfg, t(0), &mut bin(&hello(addr, ""))));
        c.accept(cfg, t(0), &h, h.addr.clone(), "n1");
        let out = bin_frames(drain(&mut c, cfg, t(0)));
        assert_eq!(out[0].kind, FrameType::Welcome);
        c
    }

    #[test]
    fn before_hello_only_hello_ping_and_bye_are_accepted() {
        let cfg = ConnConfig::default();
        let mut c = Connection::new(&cfg, Transport::Tcp, t(0));
        let mut input = BytesMut::new();
        input.extend(bin(&with(Frame::data("", "ctl-1", "x"), 1, Flags::ACK_REQ)));
        input.extend(bin(&with(
            Frame {
                dst: Bytes::from_static(b"room"),
                ..Frame::new(FrameType::Join)
            },
            2,
            0,
        )));
        input.extend(bin(&with(Frame::new(FrameType::Leave), 3, 0)));
        input.extend(bin(&with(Frame::new(FrameType::Publish), 4, 0)));
        input.extend(bin(&with(Frame::new(FrameType::Ping), 5, 0)));
        assert_eq!(events(&mut c, &cfg, t(10), &mut input), vec![]);
        assert!(!c.is_closing() && !c.is_open());
        let out = bin_frames(drain(&mut c, &cfg, t(10)));
        assert_eq!(out.len(), 5);
        for (i, f) in out[..4].iter().enumerate() {
            assert_eq!(err_of(f), (i as u32 + 1, ErrorCode::HelloRequired));
        }
        assert_eq!(out[4].kind, FrameType::Pong);
        // The connection goes on: a HELLO now succeeds.
        let h = expect_hello(events(&mut c, &cfg, t(20), &mut bin(&hello("ctl-1", ""))));
        assert_eq!(&h.addr[..], b"ctl-1");
        c.accept(&cfg, t(20), &h, h.addr.clone(), "n1");
        assert!(c.is_open());
        let out = bin_frames(drain(&mut c, &cfg, t(20)));
        assert_eq!(out[0].kind, FrameType::Welcome);
        assert_eq!(&out[0].dst[..], b"ctl-1");
        let w: Value = serde_json::from_slice(&out[0].payload).unwrap();
        assert_eq!(
            w,
            json!({"addr":"ctl-1","server_time_ms":WALL0 + 20,"heartbeat_s":30,"max_frame":65536,"node":"n1"})
        );
        assert!(out[0].flags.json());
    }

    #[test]
    fn bye_before_hello_closes() {
        let cfg = ConnConfig::default();
        let mut c = Connection::new(&cfg, Transport::Tcp, t(0));
        let ev = events(&mut c, &cfg, t(1), &mut bin(&Frame::new(FrameType::Bye)));
        assert_eq!(ev, vec![Event::Closed(CloseReason::Bye)]);
        let out = bin_frames(drain(&mut c, &cfg, t(1)));
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].kind, FrameType::Bye);
    }

    #[test]
    fn hello_timeout_closes_a_silent_connection() {
        let cfg = ConnConfig {
            hello_timeout_ms: 2_000,
            ..ConnConfig::default()
        };
        let mut c = Connection::new(&cfg, Transport::Tcp, t(100));
        assert_eq!(c.poll_timeout(&cfg), Some(2_100));
        // Activity that is not a hello does not move the deadline.
        events(&mut c, &cfg, t(500), &mut bin(&Frame::new(FrameType::Ping)));
        assert_eq!(c.poll_timeout(&cfg), Some(2_100));
        assert_eq!(c.handle_timeout(&cfg, t(2_099)), None);
        assert_eq!(
            c.handle_timeout(&cfg, t(2_100)),
            Some(Event::Closed(CloseReason::HelloTimeout))
        );
        assert!(c.is_closing());
        assert_eq!(c.poll_timeout(&cfg), None);
        let out = bin_frames(drain(&mut c, &cfg, t(2_100)));
        assert_eq!(err_of(out.last().unwrap()), (0, ErrorCode::HelloRequired));
        // A hello that arrives now is ignored.
        assert_eq!(
            events(&mut c, &cfg, t(2_200), &mut bin(&hello("a", ""))),
            vec![]
        );
    }

    #[test]
    fn extreme_limits_do_not_overflow() {
        let cfg = ConnConfig {
            hello_timeout_ms: u64::MAX,
            heartbeat_default_s: u32::MAX,
            heartbeat_min_s: u32::MAX,
            heartbeat_max_s: u32::MAX,
            idle_factor: u32::MAX,
            slow_consumer_timeout_ms: u64::MAX,
            frames_per_sec: u32::MAX,
            burst: u32::MAX,
            queue_bytes: 1,
            ..ConnConfig::default()
        };
        let mut c = Connection::new(&cfg, Transport::Tcp, t(5));
        assert_eq!(c.poll_timeout(&cfg), Some(u64::MAX));
        let h = expect_hello(events(&mut c, &cfg, t(5), &mut bin(&hello("a", ""))));
        c.accept(&cfg, t(5), &h, h.addr.clone(), "n1");
        drain(&mut c, &cfg, t(5));
        assert_eq!(c.idle_timeout_ms(&cfg), u64::MAX);
        c.send(&cfg, t(6), &Frame::data("b", "a", "x")).unwrap();
        assert_eq!(
            c.send(&cfg, t(6), &Frame::data("b", "a", "x")),
            Err(SendError::Full)
        );
        assert_eq!(c.poll_timeout(&cfg), Some(u64::MAX));
        assert_eq!(c.handle_timeout(&cfg, t(u64::MAX - 1)), None);
        let mut input = BytesMut::new();
        for _ in 0..10 {
            input.extend(bin(&Frame::data("", "b", "x")));
        }
        assert_eq!(events(&mut c, &cfg, t(u64::MAX - 1), &mut input).len(), 10);
    }

    #[test]
    fn no_hello_timeout_once_open() {
        let cfg = ConnConfig::default();
        let mut c = open_bin(&cfg, "ctl-1");
        assert_eq!(c.poll_timeout(&cfg), Some(90_000));
        assert_eq!(c.handle_timeout(&cfg, t(10_000)), None);
        assert!(c.is_open());
    }

    #[test]
    fn idle_timeout_is_factor_times_heartbeat_and_moves_with_activity() {
        let cfg = ConnConfig::default();
        let mut c = open_bin(&cfg, "ctl-1");
        assert_eq!(c.idle_timeout_ms(&cfg), 90_000);
        events(
            &mut c,
            &cfg,
            t(50_000),
            &mut bin(&Frame::new(FrameType::Ping)),
        );
        assert_eq!(c.poll_timeout(&cfg), Some(140_000));
        c.touch(t(60_000));
        assert_eq!(c.poll_timeout(&cfg), Some(150_000));
        assert_eq!(c.handle_timeout(&cfg, t(149_999)), None);
        assert_eq!(
            c.handle_timeout(&cfg, t(150_000)),
            Some(Event::Closed(CloseReason::IdleTimeout))
        );
        let out = bin_frames(drain(&mut c, &cfg, t(150_000)));
        assert_eq!(err_of(out.last().unwrap()), (0, ErrorCode::IdleTimeout));
    }

    #[test]
    fn requested_heartbeat_is_clamped_and_sets_the_idle_timeout() {
        let cfg = ConnConfig {
            idle_factor: 2,
            ..ConnConfig::default()
        };
        for (asked, kept) in [
            (Some(20), 20),
            (Some(1), 5),
            (Some(0), 5),
            (Some(99_999), 3600),
            (None, 30),
        ] {
            let mut c = Connection::new(&cfg, Transport::Tcp, t(0));
            let payload = match asked {
                Some(n) => format!(r#"{{"heartbeat_s":{n}}}"#),
                None => String::new(),
            };
            let h = expect_hello(events(&mut c, &cfg, t(0), &mut bin(&hello("a", &payload))));
            assert_eq!(h.heartbeat_s, kept);
            c.accept(&cfg, t(0), &h, h.addr.clone(), "n1");
            assert_eq!(c.heartbeat_s(), kept);
            assert_eq!(c.idle_timeout_ms(&cfg), kept as u64 * 2_000);
            assert_eq!(c.poll_timeout(&cfg), Some(kept as u64 * 2_000));
            let w = &bin_frames(drain(&mut c, &cfg, t(0)))[0];
            let w: Value = serde_json::from_slice(&w.payload).unwrap();
            assert_eq!(w["heartbeat_s"], json!(kept));
        }
    }

    #[test]
    fn ping_gets_pong_with_server_time_and_ack_when_asked() {
        let cfg = ConnConfig::default();
        let mut c = open_bin(&cfg, "ctl-1");
        events(
            &mut c,
            &cfg,
            t(1234),
            &mut bin(&Frame::new(FrameType::Ping)),
        );
        let out = bin_frames(drain(&mut c, &cfg, t(1234)));
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].kind, FrameType::Pong);
        assert_eq!(out[0].pong_time(), Some(WALL0 + 1234));
        events(
            &mut c,
            &cfg,
            t(1300),
            &mut bin(&with(Frame::new(FrameType::Ping), 77, Flags::ACK_REQ)),
        );
        let out = bin_frames(drain(&mut c, &cfg, t(1300)));
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].pong_time(), Some(WALL0 + 1300));
        assert_eq!(out[1], Frame::ack(77));
    }

    #[test]
    fn bye_is_answered_with_bye_and_closes() {
        let cfg = ConnConfig::default();
        let mut c = open_bin(&cfg, "ctl-1");
        let mut input = bin(&with(Frame::new(FrameType::Bye), 3, Flags::ACK_REQ));
        input.extend(bin(&Frame::data("", "ctl-2", "late")));
        let ev = events(&mut c, &cfg, t(5), &mut input);
        assert_eq!(ev, vec![Event::Closed(CloseReason::Bye)]);
        assert!(c.is_closing());
        let out = bin_frames(drain(&mut c, &cfg, t(5)));
        assert_eq!(out, vec![Frame::ack(3), Frame::new(FrameType::Bye)]);
        // Nothing more comes out, and nothing more can be sent.
        assert_eq!(events(&mut c, &cfg, t(6), &mut input), vec![]);
        assert_eq!(
            c.send(&cfg, t(6), &Frame::data("x", "ctl-1", "")),
            Err(SendError::Closed)
        );
        assert_eq!(c.poll_timeout(&cfg), None);
    }

    #[test]
    fn binary_layout_errors_get_an_error_and_close() {
        let cfg = ConnConfig {
            max_frame: 1000,
            ..ConnConfig::default()
        };
        // (bytes, seq carried, code)
        let cases: Vec<(Vec<u8>, u32, ErrorCode)> = vec![
            // version 2
            (
                vec![0, 0, 0, 9, 2, 3, 0, 0, 0, 0, 4, 0, 0],
                4,
                ErrorCode::Unsupported,
            ),
            // src_len 65
            (
                vec![0, 0, 0, 9, 1, 3, 1, 0, 0, 0, 5, 65, 0],
                5,
                ErrorCode::BadFrame,
            ),
            // src runs past the end
            (
                vec![0, 0, 0, 9, 1, 3, 1, 0, 0, 0, 6, 3, 0],
                6,
                ErrorCode::BadFrame,
            ),
            // dst runs past the end
            (
                vec![0, 0, 0, 10, 1, 3, 1, 0, 0, 0, 7, 0, 5, b'a'],
                7,
                ErrorCode::BadFrame,
            ),
            // body shorter than 9 bytes
            (vec![0, 0, 0, 3, 1, 3, 0], 0, ErrorCode::BadFrame),
            // length over max_frame, refused before the body arrives
            (vec![0, 0, 0x03, 0xe9], 0, ErrorCode::TooLarge),
        ];
        for (bytes, seq, code) in cases {
            let mut c = open_bin(&cfg, "ctl-1");
            let mut input = BytesMut::from(&bytes[..]);
            input.extend(bin(&Frame::new(FrameType::Ping)));
            let ev = events(&mut c, &cfg, t(1), &mut input);
            assert_eq!(
                ev,
                vec![Event::Closed(CloseReason::ProtocolError)],
                "{bytes:?}"
            );
            let out = bin_frames(drain(&mut c, &cfg, t(1)));
            // One ERROR, and the PING behind the bad frame is not answered.
            assert_eq!(out.len(), 1, "{bytes:?}");
            assert_eq!(err_of(&out[0]), (seq, code), "{bytes:?}");
        }
    }

    #[test]
    fn unknown_binary_type_is_refused_and_the_stream_goes_on() {
        let cfg = ConnConfig::default();
        let mut c = open_bin(&cfg, "ctl-1");
        let mut input = BytesMut::from(&[0, 0, 0, 9, 1, 99, 1, 0, 0, 0, 8, 0, 0][..]);
        input.extend(bin(&Frame::new(FrameType::Ping)));
        assert_eq!(events(&mut c, &cfg, t(1), &mut input), vec![]);
        let out = bin_frames(drain(&mut c, &cfg, t(1)));
        assert_eq!(err_of(&out[0]), (8, ErrorCode::Unsupported));
        assert_eq!(out[1].kind, FrameType::Pong);
        assert!(c.is_open());
    }

    #[test]
    fn frames_a_client_may_not_send_are_unsupported() {
        let cfg = ConnConfig::default();
        let mut c = open_bin(&cfg, "ctl-1");
        let mut input = BytesMut::new();
        for (i, k) in [
            FrameType::Welcome,
            FrameType::Ack,
            FrameType::Pong,
            FrameType::Error,
            FrameType::Hello,
        ]
        .into_iter()
        .enumerate()
        {
            input.extend(bin(&with(Frame::new(k), i as u32 + 1, Flags::ACK_REQ)));
        }
        assert_eq!(events(&mut c, &cfg, t(1), &mut input), vec![]);
        let out = bin_frames(drain(&mut c, &cfg, t(1)));
        let got: Vec<_> = out.iter().map(err_of).collect();
        assert_eq!(
            got,
            (1..=5)
                .map(|s| (s, ErrorCode::Unsupported))
                .collect::<Vec<_>>()
        );
        assert!(c.is_open());
    }

    #[test]
    fn bad_json_lines_get_an_error_and_the_connection_goes_on() {
        let cfg = ConnConfig::default();
        let mut c = Connection::new(&cfg, Transport::Tcp, t(0));
        let mut input = BytesMut::from(
            &b"{\"type\":\"hello\",\"addr\":\"web-1\"}\r\n\
               {\"type\":\n\
               {\"type\":\"teleport\",\"seq\":4,\"ack\":true}\n\
               {\"type\":\"data\",\"seq\":-1}\n\
               \n\
               {\"type\":\"data\",\"dst\":\"ctl-1\",\"seq\":6,\"payload_b64\":\"!\"}\n\
               {\"type\":\"ping\"}\n"[..],
        );
        let ev = pump(&mut c, &cfg, t(0), &mut input);
        assert!(matches!(&ev[..], [Event::Hello(_)]), "{ev:?}");
        assert_eq!(c.wire(), Some(Wire::Json));
        assert!(c.is_open());
        let out = json_lines(&drain(&mut c, &cfg, t(0)));
        assert_eq!(out[0]["type"], "welcome");
        assert_eq!(out[0]["addr"], "web-1");
        assert_eq!(
            (&out[1]["type"], &out[1]["code"]),
            (&json!("error"), &json!("bad_frame"))
        );
        assert_eq!(out[2]["code"], "unsupported");
        assert_eq!(out[2]["seq"], 4);
        assert_eq!(out[3]["code"], "bad_frame");
        assert_eq!(out[4]["code"], "bad_frame");
        assert_eq!(out[4]["seq"], 6);
        assert_eq!(out[5]["type"], "pong");
        assert_eq!(out[5]["server_time_ms"], WALL0);
        assert_eq!(out.len(), 6);
    }

    #[test]
    fn json_lines_split_across_reads() {
        let cfg = ConnConfig::default();
        let mut c = open_json(&cfg);
        let line = b"{\"type\":\"data\",\"dst\":\"ctl-1\",\"payload\":{\"a\": 1}}\n";
        let mut input = BytesMut::new();
        let mut got = Vec::new();
        for chunk in line.chunks(3) {
            input.extend_from_slice(chunk);
            got.extend(events(&mut c, &cfg, t(1), &mut input));
        }
        assert_eq!(got.len(), 1);
        let Event::Data(f) = &got[0] else {
            panic!("{got:?}")
        };
        assert_eq!(&f.payload[..], br#"{"a":1}"#);
        assert_eq!(&f.src[..], b"web-1");
        assert!(input.is_empty());
    }

    fn open_json(cfg: &ConnConfig) -> Connection {
        let mut c = Connection::new(cfg, Transport::Tcp, t(0));
        let mut input = BytesMut::from(&b"{\"type\":\"hello\",\"addr\":\"web-1\"}\n"[..]);
        let h = expect_hello(events(&mut c, cfg, t(0), &mut input));
        c.accept(cfg, t(0), &h, h.addr.clone(), "n1");
        drain(&mut c, cfg, t(0));
        c
    }

    #[test]
    fn too_long_json_lines_are_refused_and_skipped() {
        let cfg = ConnConfig {
            max_frame: 100,
            ..ConnConfig::default()
        };
        let max = cfg.max_line();
        // Whole line present at once.
        let mut c = open_json(&cfg);
        let mut input = BytesMut::new();
        input.extend_from_slice(
            format!("{{\"type\":\"ping\",\"x\":\"{}\"}}\n", "a".repeat(max)).as_bytes(),
        );
        input.extend_from_slice(b"{\"type\":\"ping\"}\n");
        assert_eq!(events(&mut c, &cfg, t(1), &mut input), vec![]);
        let out = json_lines(&drain(&mut c, &cfg, t(1)));
        assert_eq!(out[0]["code"], "too_large");
        assert_eq!(out[1]["type"], "pong");
        assert_eq!(out.len(), 2);
        // Line arriving in pieces: the buffer never holds more than max_line.
        let mut input = BytesMut::new();
        for _ in 0..10 {
            input.extend_from_slice(&vec![b'x'; max / 3]);
            assert_eq!(events(&mut c, &cfg, t(2), &mut input), vec![]);
            assert!(input.len() <= max);
        }
        input.extend_from_slice(b"tail}\n{\"type\":\"ping\"}\n");
        assert_eq!(events(&mut c, &cfg, t(2), &mut input), vec![]);
        let out = json_lines(&drain(&mut c, &cfg, t(2)));
        assert_eq!(out.len(), 2, "{out:?}");
        assert_eq!(out[0]["code"], "too_large");
        assert_eq!(out[1]["type"], "pong");
        assert!(c.is_open());
        // A line whose payload makes a frame over max_frame.
        let line = format!(
            "{{\"type\":\"data\",\"dst\":\"a\",\"seq\":3,\"payload\":\"{}\"}}\n",
            "b".repeat(100)
        );
        assert!(line.len() < max);
        let mut input = BytesMut::from(line.as_bytes());
        assert_eq!(events(&mut c, &cfg, t(3), &mut input), vec![]);
        let out = json_lines(&drain(&mut c, &cfg, t(3)));
        assert_eq!(
            (&out[0]["code"], &out[0]["seq"]),
            (&json!("too_large"), &json!(3))
        );
    }

    #[test]
    fn hello_with_ack_req_gets_welcome_then_ack() {
        let cfg = ConnConfig::default();
        let mut c = Connection::new(&cfg, Transport::Tcp, t(0));
        let h = expect_hello(events(
            &mut c,
            &cfg,
            t(0),
            &mut bin(&with(hello("ctl-9", ""), 42, Flags::ACK_REQ)),
        ));
        assert!(h.ack_req);
        assert_eq!(h.seq, 42);
        c.accept(&cfg, t(0), &h, h.addr.clone(), "n1");
        let out = bin_frames(drain(&mut c, &cfg, t(0)));
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].kind, FrameType::Welcome);
        assert_eq!(out[1], Frame::ack(42));
        // Same in the JSON form.
        let mut c = Connection::new(&cfg, Transport::Tcp, t(0));
        let mut input = BytesMut::from(&b"{\"type\":\"hello\",\"seq\":7,\"ack\":true}\n"[..]);
        let h = expect_hello(events(&mut c, &cfg, t(0), &mut input));
        assert!(h.addr.is_empty());
        c.accept(&cfg, t(0), &h, Bytes::from_static(b"n1-0-1"), "n1");
        assert_eq!(c.addr(), &Bytes::from_static(b"n1-0-1"));
        let out = json_lines(&drain(&mut c, &cfg, t(0)));
        assert_eq!(out[0]["type"], "welcome");
        assert_eq!(out[0]["addr"], "n1-0-1");
        assert_eq!(out[1], json!({"type":"ack","seq":7}));
    }

    #[test]
    fn hello_fields_role_and_meta() {
        let cfg = ConnConfig::default();
        let mut c = Connection::new(&cfg, Transport::Tcp, t(0));
        let h = expect_hello(events(
            &mut c,
            &cfg,
            t(0),
            &mut bin(&hello("svc-1", r#"{"role":"service","meta":{"fw":"1.2"}}"#)),
        ));
        assert_eq!(h.role, Role::Service);
        assert_eq!(&h.meta[..], br#"{"fw":"1.2"}"#);
        c.accept(&cfg, t(0), &h, h.addr.clone(), "n1");
        assert_eq!(c.role(), Role::Service);
        // Defaults: controller on TCP, browser on WebSocket, meta {}.
        let mut c = Connection::new(&cfg, Transport::Tcp, t(0));
        let h = expect_hello(events(&mut c, &cfg, t(0), &mut bin(&hello("a", ""))));
        assert_eq!((h.role, &h.meta[..]), (Role::Controller, &b"{}"[..]));
        let mut w = Connection::new(&cfg, Transport::WebSocket, t(0));
        let Some(Event::Hello(h)) =
            w.handle_message(&cfg, t(0), true, Bytes::from_static(br#"{"type":"hello"}"#))
        else {
            panic!()
        };
        assert_eq!(h.role, Role::Browser);
        // Bad payloads are refused and the connection goes on.
        for bad in [
            r#"{"role":"king"}"#,
            r#"{"role":1}"#,
            r#"{"heartbeat_s":-3}"#,
            r#"{"meta":[1]}"#,
            r#"[1]"#,
            "not json",
        ] {
            let mut c = Connection::new(&cfg, Transport::Tcp, t(0));
            assert_eq!(
                events(&mut c, &cfg, t(0), &mut bin(&with(hello("a", bad), 2, 0))),
                vec![]
            );
            let out = bin_frames(drain(&mut c, &cfg, t(0)));
            assert_eq!(err_of(&out[0]), (2, ErrorCode::BadFrame), "{bad}");
            assert!(!c.is_closing());
        }
        let cfg_small = ConnConfig {
            max_meta_bytes: 10,
            ..ConnConfig::default()
        };
        let mut c = Connection::new(&cfg_small, Transport::Tcp, t(0));
        let big = r#"{"meta":{"k":"0123456789"}}"#;
        assert_eq!(
            events(&mut c, &cfg_small, t(0), &mut bin(&hello("a", big))),
            vec![]
        );
        assert_eq!(
            err_of(&bin_frames(drain(&mut c, &cfg_small, t(0)))[0]).1,
            ErrorCode::BadFrame
        );
    }

    #[test]
    fn a_second_hello_while_one_is_pending_is_refused() {
        let cfg = ConnConfig::default();
        let mut c = Connection::new(&cfg, Transport::Tcp, t(0));
        let mut input = bin(&hello("a", ""));
        input.extend(bin(&with(hello("b", ""), 2, 0)));
        let first = c.handle_input(&cfg, t(0), &mut input);
        assert!(matches!(first, Some(Event::Hello(_))));
        assert_eq!(c.handle_input(&cfg, t(0), &mut input), None);
        let out = bin_frames(drain(&mut c, &cfg, t(0)));
        assert_eq!(err_of(&out[0]), (2, ErrorCode::Unsupported));
        // After a refusal without close, a new hello is taken.
        assert_eq!(c.refuse(&cfg, 0, ErrorCode::Forbidden, "no", false), None);
        assert!(matches!(
            events(&mut c, &cfg, t(0), &mut bin(&hello("c", "")))[..],
            [Event::Hello(_)]
        ));
    }

    #[test]
    fn refuse_with_close_ends_the_connection() {
        let cfg = ConnConfig::default();
        let mut c = Connection::new(&cfg, Transport::Tcp, t(0));
        let h = expect_hello(events(
            &mut c,
            &cfg,
            t(0),
            &mut bin(&with(hello("a", ""), 5, 0)),
        ));
        assert_eq!(
            c.refuse(&cfg, h.seq, ErrorCode::Forbidden, "not here", true),
            Some(Event::Closed(CloseReason::ProtocolError))
        );
        let out = bin_frames(drain(&mut c, &cfg, t(0)));
        assert_eq!(err_of(&out[0]), (5, ErrorCode::Forbidden));
        assert!(c.is_closing());
    }

    #[test]
    fn hmac_auth_refuses_wrong_or_missing_tokens_and_closes() {
        let cfg = ConnConfig {
            auth_secret: Some(b"s3cret".to_vec()),
            ..ConnConfig::default()
        };
        let good = auth::token_for(b"s3cret", b"ctl-8266-0042");
        let other = auth::token_for(b"s3cret", b"ctl-8266-0043");
        let refused = [
            hello("ctl-8266-0042", &format!(r#"{{"token":"{other}"}}"#)),
            hello("ctl-8266-0042", r#"{"token":"zz"}"#),
            hello("ctl-8266-0042", ""),
            hello("", &format!(r#"{{"token":"{good}"}}"#)),
        ];
        for f in refused {
            let mut c = Connection::new(&cfg, Transport::Tcp, t(0));
            let mut input = bin(&with(f, 11, Flags::ACK_REQ));
            input.extend(bin(&Frame::new(FrameType::Ping)));
            let ev = events(&mut c, &cfg, t(0), &mut input);
            assert_eq!(ev, vec![Event::Closed(CloseReason::Unauthorized)]);
            let out = bin_frames(drain(&mut c, &cfg, t(0)));
            assert_eq!(out.len(), 1);
            assert_eq!(err_of(&out[0]), (11, ErrorCode::Unauthorized));
        }
        let mut c = Connection::new(&cfg, Transport::Tcp, t(0));
        let h = expect_hello(events(
            &mut c,
            &cfg,
            t(0),
            &mut bin(&hello(
                "ctl-8266-0042",
                &format!(r#"{{"token":"{}"}}"#, good.to_uppercase()),
            )),
        ));
        assert_eq!(&h.addr[..], b"ctl-8266-0042");
        // Mode "none" ignores tokens.
        let open = ConnConfig::default();
        let mut c = Connection::new(&open, Transport::Tcp, t(0));
        expect_hello(events(
            &mut c,
            &open,
            t(0),
            &mut bin(&hello("a", r#"{"token":"x"}"#)),
        ));
    }

    #[test]
    fn a_certified_address_needs_no_token_and_admits_no_other() {
        let cfg = ConnConfig {
            auth_secret: Some(b"s3cret".to_vec()),
            ..ConnConfig::default()
        };
        let certified = |c: &mut Connection| c.set_certified(Bytes::from_static(b"dev-7"));
        // Its own address, or none, without a token.
        for src in ["dev-7", ""] {
            let mut c = Connection::new(&cfg, Transport::Tcp, t(0));
            certified(&mut c);
            let h = expect_hello(events(&mut c, &cfg, t(0), &mut bin(&hello(src, ""))));
            assert_eq!(&h.addr[..], b"dev-7");
            assert!(!h.privileged);
        }
        // Another address, even with that address's valid token.
        let token = auth::token_for(b"s3cret", b"dev-8");
        let mut c = Connection::new(&cfg, Transport::Tcp, t(0));
        certified(&mut c);
        let mut input = bin(&with(
            hello("dev-8", &format!(r#"{{"token":"{token}"}}"#)),
            4,
            Flags::ACK_REQ,
        ));
        let ev = events(&mut c, &cfg, t(0), &mut input);
        assert_eq!(ev, vec![Event::Closed(CloseReason::Unauthorized)]);
        let out = bin_frames(drain(&mut c, &cfg, t(0)));
        assert_eq!(err_of(&out[0]), (4, ErrorCode::Unauthorized));
    }

    #[test]
    fn hmac_mode_admits_the_service_token_for_any_address() {
        let cfg = ConnConfig {
            auth_secret: Some(b"s3cret".to_vec()),
            service_token: Some(b"api-tok-1".to_vec()),
            ..ConnConfig::default()
        };
        for addr in ["svc-1", "ctl-8266-0042", ""] {
            let mut c = Connection::new(&cfg, Transport::Tcp, t(0));
            let h = expect_hello(events(
                &mut c,
                &cfg,
                t(0),
                &mut bin(&hello(addr, r#"{"token":"api-tok-1"}"#)),
            ));
            assert_eq!(&h.addr[..], addr.as_bytes());
        }
        // A near miss, or the service token where none is configured, is refused.
        let no_service = ConnConfig {
            service_token: None,
            ..cfg.clone()
        };
        for (cfg, tok) in [
            (&cfg, "api-tok-2"),
            (&cfg, "api-tok-1 "),
            (&no_service, "api-tok-1"),
        ] {
            let mut c = Connection::new(cfg, Transport::Tcp, t(0));
            let payload = format!(r#"{{"token":"{tok}"}}"#);
            let ev = events(&mut c, cfg, t(0), &mut bin(&hello("svc-1", &payload)));
            assert_eq!(
                ev,
                vec![Event::Closed(CloseReason::Unauthorized)],
                "{tok:?}"
            );
        }
    }

    #[test]
    fn bad_addresses_get_bad_address_and_the_connection_goes_on() {
        let cfg = ConnConfig::default();
        let mut c = Connection::new(&cfg, Transport::Tcp, t(0));
        assert_eq!(
            events(&mut c, &cfg, t(0), &mut bin(&with(hello("a b", ""), 1, 0))),
            vec![]
        );
        let out = bin_frames(drain(&mut c, &cfg, t(0)));
        assert_eq!(err_of(&out[0]), (1, ErrorCode::BadAddress));
        let h = expect_hello(events(&mut c, &cfg, t(0), &mut bin(&hello("ctl-1", ""))));
        c.accept(&cfg, t(0), &h, h.addr.clone(), "n1");
        drain(&mut c, &cfg, t(0));
        let mut input = BytesMut::new();
        input.extend(bin(&with(Frame::data("", "x/y", "p"), 2, 0)));
        input.extend(bin(&with(Frame::data("", "", "p"), 3, 0)));
        for (i, k) in [FrameType::Join, FrameType::Leave, FrameType::Publish]
            .into_iter()
            .enumerate()
        {
            let f = Frame {
                dst: Bytes::from_static(b"room 1"),
                ..Frame::new(k)
            };
            input.extend(bin(&with(f, 4 + i as u32, 0)));
        }
        assert_eq!(events(&mut c, &cfg, t(1), &mut input), vec![]);
        let out: Vec<_> = bin_frames(drain(&mut c, &cfg, t(1)))
            .iter()
            .map(err_of)
            .collect();
        assert_eq!(
            out,
            (2..=6)
                .map(|s| (s, ErrorCode::BadAddress))
                .collect::<Vec<_>>()
        );
        assert!(c.is_open());
        // JSON names over 64 bytes are bad addresses too.
        let mut j = open_json(&cfg);
        let line = format!(
            "{{\"type\":\"data\",\"seq\":9,\"dst\":\"{}\"}}\n",
            "a".repeat(65)
        );
        assert_eq!(
            events(&mut j, &cfg, t(1), &mut BytesMut::from(line.as_bytes())),
            vec![]
        );
        let out = json_lines(&drain(&mut j, &cfg, t(1)));
        assert_eq!(
            (&out[0]["code"], &out[0]["seq"]),
            (&json!("bad_address"), &json!(9))
        );
    }

    #[test]
    fn client_frames_become_events_with_the_server_setting_src_and_flags() {
        let cfg = ConnConfig::default();
        let mut c = open_bin(&cfg, "ctl-1");
        let mut input = BytesMut::new();
        let f = Frame {
            flags: Flags(0xff),
            ..with(Frame::data("spoofed", "web-1", "on"), 9, 0)
        };
        input.extend(bin(&f));
        let mut p = with(
            Frame::data("x", "room-1", "\"hi\""),
            10,
            Flags::GROUP | Flags::JSON,
        );
        p.kind = FrameType::Publish;
        input.extend(bin(&p));
        let j = with(
            Frame {
                dst: Bytes::from_static(b"room-1"),
                ..Frame::new(FrameType::Join)
            },
            11,
            Flags::ACK_REQ,
        );
        input.extend(bin(&j));
        let mut l = j.clone();
        l.kind = FrameType::Leave;
        l.seq = 12;
        l.flags = Flags(0);
        input.extend(bin(&l));
        let ev = events(&mut c, &cfg, t(1), &mut input);
        assert_eq!(ev.len(), 4);
        let Event::Data(d) = &ev[0] else {
            panic!("{ev:?}")
        };
        // The client's src is replaced; GROUP and reserved bits are cleared;
        // ACK_REQ and JSON are kept for the router.
        assert_eq!(&d.src[..], b"ctl-1");
        assert_eq!(d.flags, Flags(Flags::ACK_REQ | Flags::JSON));
        assert_eq!(
            (d.seq, &d.dst[..], &d.payload[..]),
            (9, &b"web-1"[..], &b"on"[..])
        );
        let Event::Publish(p) = &ev[1] else {
            panic!("{ev:?}")
        };
        assert_eq!(
            (&p.src[..], &p.dst[..], p.flags),
            (&b"ctl-1"[..], &b"room-1"[..], Flags(Flags::JSON))
        );
        assert_eq!(
            ev[2],
            Event::Join {
                group: Bytes::from_static(b"room-1"),
                seq: 11,
                ack_req: true
            }
        );
        assert_eq!(
            ev[3],
            Event::Leave {
                group: Bytes::from_static(b"room-1"),
                seq: 12,
                ack_req: false
            }
        );
    }

    #[test]
    fn sent_frames_have_ack_req_and_reserved_bits_cleared() {
        let cfg = ConnConfig::default();
        let mut c = open_bin(&cfg, "web-1");
        let mut f = Frame::data("ctl-1", "web-1", "x");
        f.flags = Flags(0xff);
        f.seq = 4;
        c.send(&cfg, t(1), &f).unwrap();
        c.send(
            &cfg,
            t(1),
            &Frame {
                flags: Flags(0xf8),
                ..Frame::new(FrameType::Ping)
            },
        )
        .unwrap();
        let mut raw = drain(&mut c, &cfg, t(1));
        // flags byte of the DATA body: JSON | GROUP only.
        assert_eq!(raw[4 + 2], Flags::JSON | Flags::GROUP);
        let out = bin_frames(raw.split());
        assert_eq!(out[0].flags, Flags(Flags::JSON | Flags::GROUP));
        assert_eq!(out[1].flags, Flags(0));
    }

    #[test]
    fn the_writer_form_follows_the_first_byte_on_tcp() {
        let cfg = ConnConfig::default();
        let b = open_bin(&cfg, "ctl-1");
        assert_eq!(b.wire(), Some(Wire::Binary));
        let mut j = open_json(&cfg);
        assert_eq!(j.wire(), Some(Wire::Json));
        j.send(&cfg, t(1), &Frame::data("ctl-1", "web-1", &[0xffu8, 0][..]))
            .unwrap();
        let out = json_lines(&drain(&mut j, &cfg, t(1)));
        assert_eq!(
            out,
            vec![json!({"type":"data","src":"ctl-1","dst":"web-1","payload_b64":"/wA="})]
        );
        // A pretty-printed JSON payload from a binary sender stays on one line.
        let mut pretty = Frame::data("ctl-1", "web-1", "{\n  \"t\": 1\n}\n");
        pretty.flags = Flags(Flags::JSON);
        j.send(&cfg, t(1), &pretty).unwrap();
        let out = json_lines(&drain(&mut j, &cfg, t(1)));
        assert_eq!(
            out,
            vec![json!({"type":"data","src":"ctl-1","dst":"web-1","payload":{"t":1}})]
        );
    }

    #[test]
    fn websocket_messages_text_is_json_binary_is_one_body() {
        let cfg = ConnConfig::default();
        // Text hello: replies are text frames holding JSON.
        let mut w = Connection::new(&cfg, Transport::WebSocket, t(0));
        let ev = w.handle_message(
            &cfg,
            t(0),
            true,
            Bytes::from_static(br#"{"type":"hello","addr":"web-1","seq":1,"ack":true}"#),
        );
        let Some(Event::Hello(h)) = ev else {
            panic!("{ev:?}")
        };
        w.accept(&cfg, t(0), &h, h.addr.clone(), "n1");
        assert_eq!(w.wire(), Some(Wire::Json));
        let ev = w.handle_message(
            &cfg,
            t(1),
            true,
            Bytes::from_static(br#"{"type":"data","dst":"ctl-1","payload":[1, 2]}"#),
        );
        let Some(Event::Data(d)) = ev else {
            panic!("{ev:?}")
        };
        assert_eq!((&d.src[..], &d.payload[..]), (&b"web-1"[..], &b"[1,2]"[..]));
        let frames = ws_frames(&drain(&mut w, &cfg, t(1)));
        assert_eq!(frames.len(), 2);
        assert!(frames.iter().all(|(op, _)| *op == 1));
        let welcome: Value = serde_json::from_slice(&frames[0].1).unwrap();
        assert_eq!(welcome["type"], "welcome");
        assert_eq!(
            serde_json::from_slice::<Value>(&frames[1].1).unwrap(),
            json!({"type":"ack","seq":1})
        );
        // A bad text message gets an ERROR and the socket goes on.
        assert_eq!(
            w.handle_message(&cfg, t(2), true, Bytes::from_static(b"{nope")),
            None
        );
        assert!(w.is_open());
        // A binary message in a JSON session is still understood.
        let ev = w.handle_message(
            &cfg,
            t(3),
            false,
            crate::codec::body_bytes(&Frame::data("", "ctl-2", "b")),
        );
        assert!(matches!(ev, Some(Event::Data(_))));
        let frames = ws_frames(&drain(&mut w, &cfg, t(3)));
        assert_eq!(frames.len(), 1);
        assert_eq!(
            serde_json::from_slice::<Value>(&frames[0].1).unwrap()["code"],
            "bad_frame"
        );

        // Binary hello: replies are binary frames holding one body each.
        let mut b = Connection::new(&cfg, Transport::WebSocket, t(0));
        let ev = b.handle_message(
            &cfg,
            t(0),
            false,
            crate::codec::body_bytes(&hello("ctl-1", "")),
        );
        let Some(Event::Hello(h)) = ev else {
            panic!("{ev:?}")
        };
        b.accept(&cfg, t(0), &h, h.addr.clone(), "n1");
        let big = Frame::data("web-1", "ctl-1", vec![7u8; 300]);
        b.send(&cfg, t(1), &big).unwrap();
        let frames = ws_frames(&drain(&mut b, &cfg, t(1)));
        assert!(frames.iter().all(|(op, _)| *op == 2));
        let bodies: Vec<Frame> = frames
            .into_iter()
            .map(|(_, body)| crate::codec::parse_body(body.into()).unwrap())
            .collect();
        assert_eq!(bodies[0].kind, FrameType::Welcome);
        assert_eq!(bodies[1], big);
        // A broken binary body closes; an oversized one too.
        let ev = b.handle_message(
            &cfg,
            t(2),
            false,
            Bytes::from_static(&[1, 3, 0, 0, 0, 0, 5, 9, 0]),
        );
        assert_eq!(ev, Some(Event::Closed(CloseReason::ProtocolError)));
        let frames = ws_frames(&drain(&mut b, &cfg, t(2)));
        let e = crate::codec::parse_body(frames[0].1.clone().into()).unwrap();
        assert_eq!(err_of(&e), (5, ErrorCode::BadFrame));
        let mut b2 = Connection::new(&cfg, Transport::WebSocket, t(0));
        let ev = b2.handle_message(&cfg, t(0), false, Bytes::from(vec![0u8; cfg.max_frame + 1]));
        assert_eq!(ev, Some(Event::Closed(CloseReason::ProtocolError)));
        let frames = ws_frames(&drain(&mut b2, &cfg, t(0)));
        assert_eq!(
            err_of(&crate::codec::parse_body(frames[0].1.clone().into()).unwrap()).1,
            ErrorCode::TooLarge
        );
        // An oversized text message is refused and the socket goes on.
        let mut w2 = Connection::new(&cfg, Transport::WebSocket, t(0));
        let ev = w2.handle_message(
            &cfg,
            t(0),
            true,
            Bytes::from(vec![b' '; cfg.max_line() + 1]),
        );
        assert_eq!(ev, None);
        assert!(!w2.is_closing());
        let frames = ws_frames(&drain(&mut w2, &cfg, t(0)));
        assert_eq!(
            serde_json::from_slice::<Value>(&frames[0].1).unwrap()["code"],
            "too_large"
        );
    }

    #[test]
    fn websocket_replies_before_hello_follow_the_message_form() {
        let cfg = ConnConfig::default();
        let mut w = Connection::new(&cfg, Transport::WebSocket, t(0));
        w.handle_message(
            &cfg,
            t(0),
            false,
            crate::codec::body_bytes(&Frame::new(FrameType::Ping)),
        );
        assert_eq!(ws_frames(&drain(&mut w, &cfg, t(0)))[0].0, 2);
        let ev = w.handle_message(&cfg, t(0), true, Bytes::from_static(br#"{"type":"hello"}"#));
        let Some(Event::Hello(h)) = ev else { panic!() };
        w.accept(&cfg, t(0), &h, Bytes::from_static(b"web-9"), "n1");
        // After a text hello everything is text, even replies to binary.
        w.handle_message(
            &cfg,
            t(0),
            false,
            crate::codec::body_bytes(&Frame::new(FrameType::Ping)),
        );
        let frames = ws_frames(&drain(&mut w, &cfg, t(0)));
        assert!(frames.iter().all(|(op, _)| *op == 1), "{frames:?}");
    }

    #[test]
    fn ws_header_matches_rfc6455_examples() {
        // RFC 6455 section 5.7: unmasked "Hello".
        let mut h = BytesMut::new();
        ws_header(0x1, 5, &mut h);
        assert_eq!(&h[..], &[0x81, 0x05]);
        // 256 bytes binary: 0x82 0x7E 0x0100.
        let mut h = BytesMut::new();
        ws_header(0x2, 256, &mut h);
        assert_eq!(&h[..], &[0x82, 0x7e, 0x01, 0x00]);
        // 64 KiB binary: 0x82 0x7F 0x0000000000010000.
        let mut h = BytesMut::new();
        ws_header(0x2, 65536, &mut h);
        assert_eq!(&h[..], &[0x82, 0x7f, 0, 0, 0, 0, 0, 1, 0, 0]);
        // Edges of the 7-bit and 16-bit forms.
        let mut h = BytesMut::new();
        ws_header(0x1, 125, &mut h);
        ws_header(0x1, 126, &mut h);
        ws_header(0x1, 65535, &mut h);
        assert_eq!(
            &h[..],
            &[0x81, 125, 0x81, 126, 0, 126, 0x81, 126, 0xff, 0xff]
        );
    }

    #[test]
    fn json_text_frames_of_every_header_size() {
        let cfg = ConnConfig {
            max_frame: 1 << 20,
            queue_bytes: 1 << 22,
            ..ConnConfig::default()
        };
        let mut w = Connection::new(&cfg, Transport::WebSocket, t(0));
        assert!(w.handle_url_hello(&cfg, t(0), "addr=web-1").is_some());
        let h = Hello {
            addr: Bytes::from_static(b"web-1"),
            role: Role::Browser,
            heartbeat_s: 30,
            meta: Bytes::from_static(b"{}"),
            seq: 0,
            ack_req: false,
            privileged: false,
        };
        w.accept(&cfg, t(0), &h, h.addr.clone(), "n1");
        drain(&mut w, &cfg, t(0));
        for n in [10usize, 200, 70_000] {
            let mut f = Frame::data("ctl-1", "web-1", format!("\"{}\"", "z".repeat(n)));
            f.flags = Flags(Flags::JSON);
            w.send(&cfg, t(1), &f).unwrap();
            let frames = ws_frames(&drain(&mut w, &cfg, t(1)));
            assert_eq!(frames.len(), 1);
            let v: Value = serde_json::from_slice(&frames[0].1).unwrap();
            assert_eq!(v["payload"].as_str().unwrap().len(), n);
        }
    }

    #[test]
    fn hello_in_the_websocket_url() {
        let cfg = ConnConfig {
            auth_secret: Some(b"k".to_vec()),
            ..ConnConfig::default()
        };
        let tok = auth::token_for(b"k", b"web-7f3a");
        let mut w = Connection::new(&cfg, Transport::WebSocket, t(0));
        let ev = w.handle_url_hello(
            &cfg,
            t(0),
            &format!("/ws?addr=web-7f3a&role=tool&token={tok}&heartbeat_s=10&x=1"),
        );
        let Some(Event::Hello(h)) = ev else {
            panic!("{ev:?}")
        };
        assert_eq!(
            (&h.addr[..], h.role, h.heartbeat_s),
            (&b"web-7f3a"[..], Role::Tool, 10)
        );
        w.accept(&cfg, t(0), &h, h.addr.clone(), "n1");
        // WELCOME at once, as JSON text.
        let frames = ws_frames(&drain(&mut w, &cfg, t(0)));
        assert_eq!(frames[0].0, 1);
        let v: Value = serde_json::from_slice(&frames[0].1).unwrap();
        assert_eq!(
            (&v["type"], &v["addr"]),
            (&json!("welcome"), &json!("web-7f3a"))
        );
        // Percent-escapes are decoded; a wrong token closes.
        let mut w = Connection::new(&cfg, Transport::WebSocket, t(0));
        let ev = w.handle_url_hello(&cfg, t(0), "addr=web%2D7f3a&token=00");
        assert_eq!(ev, Some(Event::Closed(CloseReason::Unauthorized)));
        let frames = ws_frames(&drain(&mut w, &cfg, t(0)));
        assert_eq!(
            serde_json::from_slice::<Value>(&frames[0].1).unwrap()["code"],
            "unauthorized"
        );
        // No hello keys: nothing happens, the client will hello by message.
        let mut w = Connection::new(&cfg, Transport::WebSocket, t(0));
        assert_eq!(w.handle_url_hello(&cfg, t(0), "/ws"), None);
        assert_eq!(w.wire(), None);
        assert_eq!(percent_decode("a%2fb+c%zz%4"), "a/b c%zz%4");
    }

    #[test]
    fn rate_limit_with_ack_req_gets_an_error_per_frame() {
        let cfg = ConnConfig {
            frames_per_sec: 10,
            burst: 3,
            ..ConnConfig::default()
        };
        let mut c = open_bin(&cfg, "ctl-1");
        let mut input = BytesMut::new();
        for seq in 1..=5 {
            input.extend(bin(&with(
                Frame::data("", "web-1", "x"),
                seq,
                Flags::ACK_REQ,
            )));
        }
        let ev = events(&mut c, &cfg, t(1000), &mut input);
        assert_eq!(ev.len(), 3);
        let out: Vec<_> = bin_frames(drain(&mut c, &cfg, t(1000)))
            .iter()
            .map(err_of)
            .collect();
        assert_eq!(
            out,
            vec![(4, ErrorCode::RateLimited), (5, ErrorCode::RateLimited)]
        );
        // 100 ms later one token is back (10 per second), not two.
        let mut input = BytesMut::new();
        for seq in 6..=7 {
            input.extend(bin(&with(
                Frame::data("", "web-1", "x"),
                seq,
                Flags::ACK_REQ,
            )));
        }
        assert_eq!(events(&mut c, &cfg, t(1100), &mut input).len(), 1);
        let out: Vec<_> = bin_frames(drain(&mut c, &cfg, t(1100)))
            .iter()
            .map(err_of)
            .collect();
        assert_eq!(out, vec![(7, ErrorCode::RateLimited)]);
        // A long pause refills up to the burst only.
        let mut input = BytesMut::new();
        for _ in 0..5 {
            input.extend(bin(&Frame::data("", "web-1", "x")));
        }
        assert_eq!(events(&mut c, &cfg, t(60_000), &mut input).len(), 3);
    }

    #[test]
    fn rate_limit_without_ack_req_drops_with_one_note_a_second() {
        let cfg = ConnConfig {
            frames_per_sec: 1,
            burst: 1,
            ..ConnConfig::default()
        };
        let mut c = open_bin(&cfg, "ctl-1");
        let mut input = BytesMut::new();
        for _ in 0..6 {
            input.extend(bin(&Frame::data("", "web-1", "x")));
        }
        let ev = events(&mut c, &cfg, t(10), &mut input);
        assert_eq!(ev.len(), 1);
        let out = bin_frames(drain(&mut c, &cfg, t(10)));
        assert_eq!(out.len(), 1, "one note for five dropped frames");
        assert_eq!(err_of(&out[0]), (0, ErrorCode::RateLimited));
        // Within the same second: dropped silently.
        events(
            &mut c,
            &cfg,
            t(500),
            &mut bin(&Frame::data("", "web-1", "x")),
        );
        assert!(drain(&mut c, &cfg, t(500)).is_empty());
        // A second later a token is back.
        assert_eq!(
            events(
                &mut c,
                &cfg,
                t(1010),
                &mut bin(&Frame::data("", "web-1", "x"))
            )
            .len(),
            1
        );
        // Disabled limit: everything passes.
        let off = ConnConfig {
            frames_per_sec: 0,
            burst: 0,
            ..ConnConfig::default()
        };
        let mut c = open_bin(&off, "ctl-1");
        let mut input = BytesMut::new();
        for _ in 0..100 {
            input.extend(bin(&Frame::data("", "web-1", "x")));
        }
        assert_eq!(events(&mut c, &off, t(1), &mut input).len(), 100);
    }

    #[test]
    fn the_queue_is_bounded_replies_are_never_dropped_and_a_full_queue_pauses_input() {
        let cfg = ConnConfig {
            queue_bytes: 1000,
            ..ConnConfig::default()
        };
        let mut c = open_bin(&cfg, "web-1");
        let f = Frame::data("ctl-1", "web-1", vec![1u8; 100]);
        let per = 4 + f.body_len();
        let mut sent = 0;
        while c.send(&cfg, t(1), &f).is_ok() {
            sent += 1;
            assert!(sent < 100);
        }
        assert_eq!(sent, 1000 / per);
        assert!(c.queued_bytes() <= 1000);
        assert_eq!(c.send(&cfg, t(2), &f), Err(SendError::Full));
        // Not full yet: input goes on, unless answers still owed fill it.
        assert!(!c.should_pause(&cfg, t(2), 0));
        assert!(c.should_pause(&cfg, t(2), 1000 - c.queued_bytes()));
        // Replies the relay owes are queued whatever the queue holds...
        let before = c.queued_bytes();
        for i in 0..100 {
            c.control(&cfg, &Frame::error(i, ErrorCode::NoRoute, "x"));
        }
        let out = bin_frames(drain(&mut c, &cfg, t(3)));
        assert_eq!(out.len(), sent + 100, "every reply is there");
        assert!(before < 1000);
        // ...and a queue at the bound tells the runtime to stop reading,
        // which starts the slow-consumer clock.
        for i in 0..100 {
            c.control(&cfg, &Frame::ack(i));
        }
        assert!(c.should_pause(&cfg, t(10), 0));
        assert_eq!(
            c.poll_timeout(&cfg),
            Some(10 + cfg.slow_consumer_timeout_ms)
        );
    }

    #[test]
    fn every_dropped_input_frame_is_counted_by_reason() {
        let cfg = ConnConfig {
            frames_per_sec: 1,
            burst: 1,
            max_frame: 64,
            ..ConnConfig::default()
        };
        let mut c = Connection::new(&cfg, Transport::Tcp, t(0));
        let mut input = BytesMut::new();
        // hello_required, then a hello with a malformed payload (bad_frame)
        // and one with a bad address.
        input.extend(bin(&Frame::data("", "x", "a")));
        input.extend(bin(&hello("web-1", "[1]")));
        input.extend(bin(&hello("bad addr", "")));
        let got = events(&mut c, &cfg, t(0), &mut input);
        assert!(got.is_empty());
        let d = c.take_drops().unwrap();
        assert_eq!(d[InputDrop::HelloRequired as usize], 1);
        assert_eq!(d[InputDrop::BadFrame as usize], 1);
        assert_eq!(d[InputDrop::BadAddress as usize], 1);
        assert_eq!(c.take_drops(), None, "the counts restart");
        let mut c = open_bin(&cfg, "web-1");
        let mut input = BytesMut::new();
        input.extend(bin(&Frame::data("", "ctl-1", "a"))); // the one token
        input.extend(bin(&Frame::data("", "ctl-1", "b"))); // rate_limited
        input.extend(bin(&Frame::data("", "ctl-1", "c"))); // rate_limited
        events(&mut c, &cfg, t(0), &mut input);
        let d = c.take_drops().unwrap();
        assert_eq!(d[InputDrop::RateLimited as usize], 2);
        // A frame over max_frame closes the stream: too_large.
        let mut input = BytesMut::from(&[0u8, 0, 1, 0][..]);
        events(&mut c, &cfg, t(5000), &mut input);
        assert_eq!(c.take_drops().unwrap()[InputDrop::TooLarge as usize], 1);
    }

    #[test]
    fn json_that_is_not_utf8_is_bad_frame_even_in_an_ignored_field() {
        let cfg = ConnConfig::default();
        let mut c = open_json(&cfg);
        let mut input = BytesMut::from(&b"{\"type\":\"ping\",\"seq\":7,\"x\":\"\xff\xfe\"}\n"[..]);
        assert!(events(&mut c, &cfg, t(1), &mut input).is_empty());
        let out = json_lines(&drain(&mut c, &cfg, t(1)));
        assert_eq!(out.len(), 1, "{out:?}");
        assert_eq!(out[0]["type"], "error");
        assert_eq!(out[0]["code"], "bad_frame");
        assert_eq!(out[0]["seq"], 7);
        assert_eq!(c.take_drops().unwrap()[InputDrop::BadFrame as usize], 1);
    }

    #[test]
    fn the_service_role_comes_from_the_token_not_the_hello() {
        let cfg = ConnConfig {
            auth_secret: Some(b"s3cret".to_vec()),
            service_token: Some(b"api-token".to_vec()),
            ..ConnConfig::default()
        };
        let device = crate::auth::token_for(b"s3cret", b"dev-4");
        // A device token with role service: forbidden, the hello may be retried.
        let mut c = Connection::new(&cfg, Transport::Tcp, t(0));
        let p = json!({"token": device, "role": "service"}).to_string();
        let mut input = bin(&with(hello("dev-4", &p), 3, 0));
        assert!(events(&mut c, &cfg, t(0), &mut input).is_empty());
        let out = bin_frames(drain(&mut c, &cfg, t(0)));
        assert_eq!(err_of(&out[0]), (3, ErrorCode::Forbidden));
        assert!(!c.is_closing());
        // The same device without the role: admitted, not privileged.
        let p = json!({"token": device}).to_string();
        let mut input = bin(&hello("dev-4", &p));
        let h = expect_hello(events(&mut c, &cfg, t(0), &mut input));
        assert!(!h.privileged);
        assert_eq!(h.role, Role::Controller);
        // The service token grants the role and the privilege.
        let mut c = Connection::new(&cfg, Transport::Tcp, t(0));
        let p = json!({"token": "api-token", "role": "service"}).to_string();
        let mut input = bin(&hello("svc-1", &p));
        let h = expect_hello(events(&mut c, &cfg, t(0), &mut input));
        assert!(h.privileged);
        assert_eq!(h.role, Role::Service);
        // Without any auth every hello is trusted; with only an API token
        // set, the role still needs that token.
        let open = ConnConfig::default();
        let mut c = Connection::new(&open, Transport::Tcp, t(0));
        let mut input = bin(&hello("svc-2", r#"{"role":"service"}"#));
        assert!(expect_hello(events(&mut c, &open, t(0), &mut input)).privileged);
        let api_only = ConnConfig {
            service_token: Some(b"api-token".to_vec()),
            ..ConnConfig::default()
        };
        let mut c = Connection::new(&api_only, Transport::Tcp, t(0));
        let mut input = bin(&hello("svc-3", r#"{"role":"service"}"#));
        assert!(events(&mut c, &api_only, t(0), &mut input).is_empty());
    }

    #[test]
    fn a_queue_that_stays_full_closes_as_slow_consumer() {
        let cfg = ConnConfig {
            queue_bytes: 500,
            slow_consumer_timeout_ms: 3_000,
            ..ConnConfig::default()
        };
        let mut c = open_bin(&cfg, "web-1");
        let f = Frame::data("ctl-1", "web-1", vec![1u8; 200]);
        c.send(&cfg, t(1_000), &f).unwrap();
        c.send(&cfg, t(1_000), &f).unwrap();
        assert_eq!(c.send(&cfg, t(1_000), &f), Err(SendError::Full));
        assert_eq!(c.poll_timeout(&cfg), Some(4_000));
        // The writer takes a chunk but the socket never confirms it.
        let chunk = c.poll_transmit(100).unwrap();
        assert_eq!(chunk.len(), 100);
        assert_eq!(c.send(&cfg, t(2_000), &f), Err(SendError::Full));
        assert_eq!(c.handle_timeout(&cfg, t(3_999)), None);
        assert_eq!(
            c.handle_timeout(&cfg, t(4_000)),
            Some(Event::Closed(CloseReason::SlowConsumer))
        );
        assert!(c.is_closing());
        // The ERROR is queued behind the rest for a last flush.
        let mut rest = BytesMut::from(&chunk[..]);
        rest.extend(drain(&mut c, &cfg, t(4_000)));
        let out = bin_frames(rest);
        assert_eq!(err_of(out.last().unwrap()), (0, ErrorCode::SlowConsumer));
    }

    #[test]
    fn progress_on_the_socket_clears_the_slow_consumer_clock() {
        let cfg = ConnConfig {
            queue_bytes: 500,
            slow_consumer_timeout_ms: 3_000,
            ..ConnConfig::default()
        };
        let mut c = open_bin(&cfg, "web-1");
        let f = Frame::data("ctl-1", "web-1", vec![1u8; 200]);
        c.send(&cfg, t(0), &f).unwrap();
        c.send(&cfg, t(0), &f).unwrap();
        assert_eq!(c.send(&cfg, t(0), &f), Err(SendError::Full));
        let chunk = c.poll_transmit(usize::MAX).unwrap();
        c.on_transmitted(&cfg, t(2_000), chunk.len());
        assert_eq!(c.queued_bytes(), 0);
        assert_eq!(c.poll_timeout(&cfg), Some(90_000));
        assert_eq!(c.handle_timeout(&cfg, t(3_000)), None);
        assert!(c.send(&cfg, t(2_001), &f).is_ok());
    }

    #[test]
    fn a_frame_bigger_than_the_queue_fits_an_empty_queue_only() {
        let cfg = ConnConfig {
            queue_bytes: 100,
            ..ConnConfig::default()
        };
        let mut c = open_bin(&cfg, "web-1");
        let big = Frame::data("ctl-1", "web-1", vec![0u8; 300]);
        assert!(c.send(&cfg, t(0), &big).is_ok());
        assert_eq!(
            c.send(&cfg, t(0), &Frame::data("a", "web-1", "x")),
            Err(SendError::Full)
        );
        let mut small = Connection::new(&cfg, Transport::Tcp, t(0));
        assert_eq!(
            small.send(&cfg, t(0), &big),
            Err(SendError::Closed),
            "no send before hello"
        );
        let mut c2 = open_bin(&cfg, "web-2");
        c2.send(&cfg, t(0), &Frame::data("a", "web-2", "x"))
            .unwrap();
        assert_eq!(c2.send(&cfg, t(0), &big), Err(SendError::Full));
        // The refused frame left nothing behind.
        let out = bin_frames(drain(&mut c2, &cfg, t(0)));
        assert_eq!(out.len(), 1);
    }

    #[test]
    fn poll_transmit_chunks_and_gives_the_buffer_back() {
        let cfg = ConnConfig::default();
        let mut c = open_bin(&cfg, "web-1");
        assert_eq!(c.poll_transmit(10), None);
        let frames: Vec<Frame> = (0..5u8)
            .map(|i| Frame::data("ctl-1", "web-1", vec![i; 37]))
            .collect();
        let mut expected = BytesMut::new();
        for f in &frames {
            c.send(&cfg, t(1), f).unwrap();
            encode(f, &mut expected);
        }
        assert_eq!(c.queued_bytes(), expected.len());
        let mut got = BytesMut::new();
        let mut chunks = 0;
        while let Some(chunk) = c.poll_transmit(16) {
            assert!(chunk.len() <= 16 && !chunk.is_empty());
            got.extend_from_slice(&chunk);
            chunks += 1;
            // In flight until confirmed.
            assert_eq!(c.queued_bytes(), expected.len() - got.len() + chunk.len());
            c.on_transmitted(&cfg, t(1), chunk.len());
            assert!(chunks < 1000);
        }
        assert_eq!(got, expected);
        assert_eq!(chunks, expected.len().div_ceil(16));
        assert_eq!(c.queued_bytes(), 0);
        assert_eq!(c.out.capacity(), 0, "a drained queue holds no buffer");
        // max 0 still makes progress.
        c.send(&cfg, t(1), &frames[0]).unwrap();
        assert_eq!(c.poll_transmit(0).map(|b| b.len()), Some(1));
    }

    #[test]
    fn close_with_sends_the_error_once() {
        let cfg = ConnConfig::default();
        let mut c = open_bin(&cfg, "ctl-1");
        assert_eq!(
            c.close_with(
                &cfg,
                ErrorCode::Replaced,
                "replaced by a new connection",
                CloseReason::Replaced
            ),
            Some(Event::Closed(CloseReason::Replaced))
        );
        assert_eq!(
            c.close_with(&cfg, ErrorCode::Replaced, "again", CloseReason::Replaced),
            None
        );
        let out = bin_frames(drain(&mut c, &cfg, t(0)));
        assert_eq!(out.len(), 1);
        assert_eq!(err_of(&out[0]), (0, ErrorCode::Replaced));
        assert_eq!(
            out[0].error_parts().unwrap().1,
            "replaced by a new connection"
        );
    }

    #[test]
    fn any_chunking_of_the_input_gives_the_same_events() {
        let cfg = ConnConfig::default();
        let mut stream = bin(&hello("ctl-1", r#"{"heartbeat_s":10}"#));
        for i in 0..20u32 {
            stream.extend(bin(&with(
                Frame::data("", "web-1", vec![i as u8; i as usize * 7]),
                i,
                0,
            )));
        }
        let run = |chunk: usize| {
            let mut c = Connection::new(&cfg, Transport::Tcp, t(0));
            let mut input = BytesMut::new();
            let mut evs = Vec::new();
            for piece in stream.chunks(chunk) {
                input.extend_from_slice(piece);
                evs.extend(pump(&mut c, &cfg, t(0), &mut input));
            }
            evs
        };
        let whole = run(stream.len());
        assert_eq!(whole.len(), 21);
        for chunk in [1, 2, 3, 7, 64] {
            assert_eq!(run(chunk), whole, "chunk {chunk}");
        }
    }
}
