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

/// Extra room in the queue for replies the relay owes the client itself
/// (WELCOME, ACK, ERROR, PONG), so a full queue of DATA does not swallow them.
pub const CONTROL_SLACK: usize = 16 * 1024;

/// Limits and policy shared by every connection of a shard.
#[derive(Debug, Clone)]
pub struct ConnConfig {
    pub max_frame: usize,
    pub hello_timeout_ms: u64,
    pub heartbeat_default_s: u32,
    pub heartbeat_min_s: u32,
    pub heartbeat_max_s: u32,
    /// Idle timeout = idle_factor × the connection's heartbeat.
    pub idle_factor: u32,
    pub queue_bytes: usize,
    pub slow_consumer_timeout_ms: u64,
    /// Token bucket per connection; 0 disables the limit.
    pub frames_per_sec: u32,
    pub burst: u32,
    pub max_meta_bytes: usize,
    /// Shared secret of `[auth] mode = "hmac"`; `None` is mode "none".
    pub auth_secret: Option<Vec<u8>>,
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
        }
    }
}

impl ConnConfig {
    /// Longest JSON line accepted: room for a max_frame payload in base64
    /// plus the envelope.
    pub fn max_line(&self) -> usize {
        self.max_frame + self.max_frame / 3 + 1024
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
    pub role: Role,
    /// Heartbeat the client will keep, clamped to the configured bounds.
    pub heartbeat_s: u32,
    /// Compact JSON object kept with the session (`{}` when absent).
    pub meta: Bytes,
    pub seq: u32,
    pub ack_req: bool,
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
    tokens: u32,
    tokens_at: u64,
    /// Last time a rate_limited ERROR without ACK_REQ was sent (one a second).
    limited_note_at: u64,
    /// An ERROR we owe about the frame being skipped (JSON line too long).
    skipping_line: bool,
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
            hello_deadline: now.mono_ms + cfg.hello_timeout_ms,
            last_activity: now.mono_ms,
            full_since: None,
            out: BytesMut::new(),
            inflight: 0,
            tokens: cfg.burst,
            tokens_at: now.mono_ms,
            limited_note_at: 0,
            skipping_line: false,
        }
    }

    pub fn addr(&self) -> &Bytes {
        &self.addr
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
    /// Call until it returns `None`, then read more.
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
                        input.advance(4);
                        codec::parse_body(input.split_to(body_len).freeze())
                    }
                    Err(e) => Err(e),
                }
                .map_err(|e| self.decode_failed(cfg, now, e)),
                Wire::Json => {
                    let Some(line) = self.next_line(cfg, now, input) else {
                        if self.state == State::Closing {
                            return Some(Event::Closed(CloseReason::ProtocolError));
                        }
                        return None;
                    };
                    let trimmed = line.trim_ascii();
                    if trimmed.is_empty() {
                        continue;
                    }
                    json::parse_json(trimmed).map_err(|e| {
                        self.control(cfg, &Frame::error(0, e.code(), &e.to_string()));
                        None
                    })
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
        self.wire
            .get_or_insert(if text { Wire::Json } else { Wire::Binary });
        if msg.len() > cfg.max_line() || (!text && msg.len() > cfg.max_frame) {
            let e = DecodeError::TooLarge {
                len: msg.len(),
                max: cfg.max_frame,
            };
            return self.decode_failed(cfg, now, e);
        }
        let parsed = if text {
            json::parse_json(&msg).map_err(|e| (e.code(), e.to_string(), true))
        } else {
            codec::parse_body(msg).map_err(|e| (e.code(), e.to_string(), e.recoverable()))
        };
        match parsed {
            Ok(f) => self.handle_frame(cfg, now, f),
            Err((code, msg, true)) => {
                self.control(cfg, &Frame::error(0, code, &msg));
                None
            }
            Err((code, msg, false)) => {
                self.control(cfg, &Frame::error(0, code, &msg));
                Some(self.close(CloseReason::ProtocolError))
            }
        }
    }

    fn decode_failed(&mut self, cfg: &ConnConfig, _now: Now, e: DecodeError) -> Option<Event> {
        self.control(cfg, &Frame::error(e.seq(), e.code(), &e.to_string()));
        if e.recoverable() {
            None
        } else {
            Some(self.close(CloseReason::ProtocolError))
        }
    }

    /// Splits the next line off `input`. A line longer than `max_line` gets
    /// `too_large` and is skipped up to its newline.
    fn next_line(&mut self, cfg: &ConnConfig, _now: Now, input: &mut BytesMut) -> Option<BytesMut> {
        loop {
            match memchr_nl(input) {
                Some(i) => {
                    let line = input.split_to(i + 1);
                    if self.skipping_line {
                        self.skipping_line = false;
                        continue;
                    }
                    if line.len() > cfg.max_line() {
                        self.control(
                            cfg,
                            &Frame::error(0, ErrorCode::TooLarge, "line exceeds max_frame"),
                        );
                        continue;
                    }
                    return Some(line);
                }
                None => {
                    if input.len() > cfg.max_line() {
                        if !self.skipping_line {
                            self.control(
                                cfg,
                                &Frame::error(0, ErrorCode::TooLarge, "line exceeds max_frame"),
                            );
                            self.skipping_line = true;
                        }
                        input.clear();
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
                None
            }
            (_, FrameType::Bye) => {
                self.control(cfg, &Frame::new(FrameType::Bye));
                Some(self.close(CloseReason::Bye))
            }
            (State::AwaitHello, FrameType::Hello) => self.hello(cfg, f),
            (State::AwaitHello, _) => {
                self.control(
                    cfg,
                    &Frame::error(f.seq, ErrorCode::HelloRequired, "say hello first"),
                );
                None
            }
            (State::Open, _) if !self.take_token(cfg, now) => {
                if ack_req {
                    self.control(
                        cfg,
                        &Frame::error(f.seq, ErrorCode::RateLimited, "frame rate limit exceeded"),
                    );
                } else if now.mono_ms >= self.limited_note_at + 1000 {
                    self.limited_note_at = now.mono_ms;
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
                self.control(
                    cfg,
                    &Frame::error(f.seq, ErrorCode::Unsupported, "hello was already accepted"),
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
                    self.control(
                        cfg,
                        &Frame::error(f.seq, ErrorCode::BadAddress, &format!("{what}: {e}")),
                    );
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
                self.control(
                    cfg,
                    &Frame::error(
                        f.seq,
                        ErrorCode::Unsupported,
                        &format!("{} is sent by the server", kind.name()),
                    ),
                );
                None
            }
        }
    }

    fn hello(&mut self, cfg: &ConnConfig, f: Frame) -> Option<Event> {
        let seq = f.seq;
        if !f.src.is_empty()
            && let Err(e) = validate_name(&f.src)
        {
            self.control(
                cfg,
                &Frame::error(seq, ErrorCode::BadAddress, &format!("addr: {e}")),
            );
            return None;
        }
        let fields = match parse_hello_payload(&f.payload, cfg) {
            Ok(h) => h,
            Err(msg) => {
                self.control(cfg, &Frame::error(seq, ErrorCode::BadFrame, &msg));
                return None;
            }
        };
        if let Some(secret) = &cfg.auth_secret {
            let ok = !f.src.is_empty()
                && fields
                    .token
                    .as_deref()
                    .is_some_and(|t| auth::verify_token(secret, &f.src, t));
            if !ok {
                self.control(
                    cfg,
                    &Frame::error(seq, ErrorCode::Unauthorized, "missing or wrong token"),
                );
                return Some(self.close(CloseReason::Unauthorized));
            }
        }
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
        }))
    }

    /// Accepts a HELLO: the connection now holds `addr` and gets WELCOME.
    pub fn accept(&mut self, cfg: &ConnConfig, now: Now, hello: &Hello, addr: Bytes, node: &str) {
        if self.state != State::AwaitHello {
            return;
        }
        self.state = State::Open;
        self.addr = addr;
        self.role = hello.role;
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
        self.control(cfg, &Frame::error(seq, code, message));
        if close {
            let reason = if code == ErrorCode::Unauthorized {
                CloseReason::Unauthorized
            } else {
                CloseReason::ProtocolError
            };
            Some(self.close(reason))
        } else {
            None
        }
    }

    /// Queues a frame for this client (DATA from another client, or a reply).
    /// For DATA, ACK_REQ is cleared: acknowledgements are the relay's job.
    pub fn send(&mut self, cfg: &ConnConfig, now: Now, frame: &Frame) -> Result<(), SendError> {
        if self.state != State::Open {
            return Err(SendError::Closed);
        }
        let before = self.out.len();
        if self.queued_bytes() >= cfg.queue_bytes {
            self.full_since.get_or_insert(now.mono_ms);
            return Err(SendError::Full);
        }
        if frame.kind == FrameType::Data {
            let mut f = frame.clone();
            f.flags = f.flags.with(Flags::ACK_REQ, false);
            self.encode(&f);
        } else {
            self.encode(frame);
        }
        if self.queued_bytes() > cfg.queue_bytes {
            // Over the bound with this frame: undo and report full.
            self.out.truncate(before);
            self.full_since.get_or_insert(now.mono_ms);
            return Err(SendError::Full);
        }
        Ok(())
    }

    /// Queues a reply the relay owes this client (ACK, ERROR, PONG...). Uses
    /// the control slack; dropped only if even that is exhausted.
    pub fn control(&mut self, cfg: &ConnConfig, frame: &Frame) -> bool {
        if self.queued_bytes() > cfg.queue_bytes + CONTROL_SLACK {
            return false;
        }
        self.encode(frame);
        true
    }

    fn encode(&mut self, frame: &Frame) {
        match (self.transport, self.wire.unwrap_or(Wire::Binary)) {
            (Transport::Tcp, Wire::Binary) => codec::encode(frame, &mut self.out),
            (Transport::Tcp, Wire::Json) => {
                json::write_json(frame, &mut self.out);
                self.out.extend_from_slice(b"\n");
            }
            (Transport::WebSocket, wire) => {
                let mut body = BytesMut::new();
                let opcode = match wire {
                    Wire::Json => {
                        json::write_json(frame, &mut body);
                        WS_TEXT
                    }
                    Wire::Binary => {
                        codec::encode_body(frame, &mut body);
                        WS_BINARY
                    }
                };
                ws_header(opcode, body.len(), &mut self.out);
                self.out.extend_from_slice(&body);
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
                let idle = self.last_activity + self.idle_timeout_ms(cfg);
                Some(match self.full_since {
                    Some(t) => idle.min(t + cfg.slow_consumer_timeout_ms),
                    None => idle,
                })
            }
            State::Closing => None,
        }
    }

    /// Idle bound for this connection: idle_factor × its heartbeat.
    pub fn idle_timeout_ms(&self, cfg: &ConnConfig) -> u64 {
        self.heartbeat_s as u64 * cfg.idle_factor.max(1) as u64 * 1000
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
                    && now.mono_ms >= t + cfg.slow_consumer_timeout_ms
                {
                    self.control(
                        cfg,
                        &Frame::error(0, ErrorCode::SlowConsumer, "outbound queue stayed full"),
                    );
                    return Some(self.close(CloseReason::SlowConsumer));
                }
                if now.mono_ms >= self.last_activity + self.idle_timeout_ms(cfg) {
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
        if self.tokens == 0 {
            return false;
        }
        self.tokens -= 1;
        true
    }
}

const WS_TEXT: u8 = 0x1;
const WS_BINARY: u8 = 0x2;

/// Writes an unmasked, final WebSocket frame header (server to client,
/// RFC 6455 section 5.2).
pub fn ws_header(opcode: u8, len: usize, out: &mut BytesMut) {
    out.extend_from_slice(&[0x80 | opcode]);
    if len < 126 {
        out.extend_from_slice(&[len as u8]);
    } else if len <= u16::MAX as usize {
        out.extend_from_slice(&[126]);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.extend_from_slice(&[127]);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
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
