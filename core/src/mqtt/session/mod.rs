//! One MQTT client's session as a sans-IO state machine.
//!
//! A [`Session`] is created for each accepted socket that speaks MQTT and
//! lives on after the socket when the client asked for a persistent
//! session. The runtime owns the socket and the clock ([`Now`], monotonic
//! ms for every deadline); the router owns the subscriptions index and the
//! retained store. The driver loop, compiled and run as a test:
//!
//! ```
//! use bytes::BytesMut;
//! use relay_core::conn::Now;
//! use relay_core::mqtt::session::{Event, Session, SessionConfig};
//!
//! let cfg = SessionConfig::default();
//! let now = Now { mono_ms: 0, wall_ms: 1_700_000_000_000 };
//! let mut s = Session::new(&cfg, now);
//! // CONNECT (3.1.1, clean session, keep alive 10 s, client id "ctl-1").
//! let mut rbuf = BytesMut::from(
//!     &b"\x10\x11\x00\x04MQTT\x04\x02\x00\x0a\x00\x05ctl-1"[..],
//! );
//! while let Some(ev) = s.handle_input(&cfg, now, &mut rbuf) {
//!     match ev {
//!         // The router looks the client id up, takes over or resumes an
//!         // older session, then answers.
//!         Event::Connect(_) => s.accept(&cfg, now, None, None),
//!         other => panic!("unexpected {other:?}"),
//!     }
//! }
//! assert!(s.is_open());
//! // Write what is queued (CONNACK), confirming what the socket took.
//! while let Some(chunk) = s.poll_transmit(64 * 1024) {
//!     assert_eq!(&chunk[..], b"\x20\x02\x00\x00");
//!     s.on_transmitted(&cfg, now, chunk.len());
//! }
//! // Sleep until the next deadline (keep alive: 1.5 x 10 s), apply it.
//! let at = s.poll_timeout().expect("an open session has a deadline");
//! assert_eq!(at, 15_000);
//! s.handle_timeout(Now { mono_ms: at, ..now });
//! assert!(matches!(s.poll_event(), Some(Event::Closed(_))));
//! ```
//!
//! Input is consumed packet by packet until one yields an event, so the
//! router answers a CONNECT before the packets pipelined behind it are
//! read. Events that do not come from input (deadlines, the will, the end
//! of the session) are taken with [`Session::poll_event`].
//!
//! # Session life
//! 1. `Connect` event: the router answers [`Session::accept`] (with the
//!    state of an earlier session to resume, taken from it with
//!    [`Session::take_state`] after [`Session::take_over`] if it is still
//!    connected) or [`Session::refuse`].
//! 2. Open: `Publish`, `Subscribe`, `Unsubscribe` events; the router
//!    delivers messages with [`Session::deliver`]. QoS 1/2 flows, the
//!    in-flight window, topic aliases and packet ids are handled here.
//! 3. The connection ends (`Closed`): the will becomes due at once or after
//!    its delay (`Will`); a persistent session stays, offline, queueing
//!    what is delivered to it until it is resumed or its expiry passes
//!    (`SessionEnded`, after which the router drops it and its
//!    subscriptions). [`Session::discard`] ends it early (a new connection
//!    with clean start).
//!
//! # Layout
//! - this module: [`Session`] and the types it exchanges.
//! - `tests`: every flow, on a simulated clock.

mod thin;

use std::collections::HashMap;

use thin::ThinDeque;

use bytes::{Bytes, BytesMut};

use super::codec::{self, Check};
use super::message::{Message, PublishHeader, publish_len, write_publish};
use super::packet::{
    ConnAck, Connect, Disconnect, Packet, Properties, PubResp, Publish, QoS, SubAck, SubOptions,
    UnsubAck, Version, Will,
};
use super::reason;
use super::topic::{has_wildcard, parse_filter};
use super::wire::DecodeError;
pub use crate::conn::Now;

/// Limits and policy shared by the MQTT sessions of a shard. The defaults
/// are safe for a large fleet of small devices.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// Largest whole packet accepted from a client, checked from the fixed
    /// header; told to MQTT 5 clients as Maximum Packet Size.
    pub max_packet_size: u32,
    /// QoS 2 publishes a client may leave waiting for PUBREL (MQTT 5:
    /// Receive Maximum told in CONNACK; more is 0x93). 3.1.1 clients are
    /// held to the same bound.
    pub receive_maximum: u16,
    /// Most QoS 1/2 messages in flight to one client, whatever Receive
    /// Maximum it asks for.
    pub max_inflight: u16,
    /// Topic aliases a client may set (Topic Alias Maximum in CONNACK).
    pub topic_alias_maximum: u16,
    /// Most topic aliases the relay sets toward one client (also capped by
    /// the client's Topic Alias Maximum).
    pub max_aliases_out: u16,
    /// Messages queued for one session (in-flight window full, or offline).
    pub max_queued_messages: usize,
    /// Bytes (topic + payload + properties) queued for one session.
    pub max_queued_bytes: usize,
    /// Queue QoS 0 messages for an offline session too.
    pub queue_qos0_offline: bool,
    /// Written bytes not yet confirmed by the socket past which QoS 0
    /// messages are dropped and QoS 1/2 wait in the queue; the runtime
    /// stops reading a client at this bound ([`Session::should_pause`]).
    pub max_out_bytes: usize,
    /// Longest session expiry granted, seconds; a 3.1.1 persistent session
    /// (clean session 0) gets exactly this.
    pub max_session_expiry_s: u32,
    /// A socket that sends no CONNECT within this is closed.
    pub connect_timeout_ms: u64,
    /// Highest QoS accepted from MQTT 5 clients and granted to
    /// subscriptions (Maximum QoS).
    pub maximum_qos: QoS,
    /// Retained messages accepted (Retain Available).
    pub retain_available: bool,
    pub wildcard_subscriptions: bool,
    pub shared_subscriptions: bool,
    pub subscription_identifiers: bool,
    /// Keep alive imposed on MQTT 5 clients that ask for 0 or more
    /// (Server Keep Alive); 0 takes what the client asks.
    pub max_keep_alive_s: u16,
    /// Subscriptions one session may hold.
    pub max_subscriptions: usize,
    /// Client ids must be relay addresses (1..64 bytes of
    /// `A-Z a-z 0-9 . _ : @ -`).
    pub client_id_is_address: bool,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            max_packet_size: 256 * 1024,
            receive_maximum: 64,
            max_inflight: 64,
            topic_alias_maximum: 32,
            max_aliases_out: 32,
            max_queued_messages: 1000,
            max_queued_bytes: 1024 * 1024,
            queue_qos0_offline: false,
            max_out_bytes: 256 * 1024,
            max_session_expiry_s: 86_400,
            connect_timeout_ms: 10_000,
            maximum_qos: QoS::ExactlyOnce,
            retain_available: true,
            wildcard_subscriptions: true,
            shared_subscriptions: true,
            subscription_identifiers: true,
            max_keep_alive_s: 0,
            max_subscriptions: 256,
            client_id_is_address: true,
        }
    }
}

/// Why a connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// The client sent DISCONNECT with this reason code (0x04: publish
    /// the will).
    Disconnect(u8),
    KeepAliveTimeout,
    ConnectTimeout,
    /// CONNECT refused with this (MQTT 5) reason code.
    Refused(u8),
    /// The client broke the protocol; the reason code sent to an MQTT 5
    /// client (a 3.1.1 one is just disconnected).
    ProtocolError(u8),
    /// Another connection took the client id over.
    TakenOver,
    /// The relay disconnected the client with this reason code.
    Server(u8),
    /// The socket closed or failed.
    PeerClosed,
}

/// A subscription granted to the client. The router indexes it by
/// `filter`, and sends it the retained messages its filter matches when
/// its retain handling says so (0 always, 1 only if `is_new`, 2 never),
/// never for a shared one (spec 4.8.2), with [`Delivery::retained`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscription {
    /// As sent (`$share/<group>/<filter>` for a shared one): the key of
    /// [`super::SubscriptionTrie::insert`].
    pub filter: Bytes,
    /// Options with the granted QoS.
    pub options: SubOptions,
    /// MQTT 5 subscription identifier.
    pub id: Option<u32>,
    /// It did not exist before (for retain handling 1).
    pub is_new: bool,
}

/// Work for the router.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A valid CONNECT: answer with [`Session::accept`] or
    /// [`Session::refuse`]. An empty client id needs an assigned one.
    Connect(Box<Connect>),
    /// A message to route (topic alias resolved, expiry a deadline). Its
    /// `retain` is the publisher's flag: store it in the retained store.
    Publish(Message),
    /// Subscriptions made or changed (SUBACK is already queued).
    Subscribe(Vec<Subscription>),
    /// Filters (as sent) that were subscribed and are no longer.
    Unsubscribe(Vec<Bytes>),
    /// The will message is due: route it (and retain it if flagged).
    Will(Message),
    /// The connection is over: flush what `poll_transmit` still gives,
    /// then close the socket. The session may live on (offline).
    Closed(CloseReason),
    /// The session is over (expired, discarded, or never persistent):
    /// remove its subscriptions and drop it.
    SessionEnded,
}

/// How the router delivers one message to this client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Delivery {
    /// The subscription's granted QoS (the message goes at the lower of it
    /// and its own).
    pub qos: QoS,
    /// The RETAIN flag to send: see [`Delivery::routed`] and
    /// [`Delivery::retained`].
    pub retain: bool,
    /// The matching subscription's identifier.
    pub subscription_id: Option<u32>,
}

impl Delivery {
    /// A message routed to a subscription as it is published: RETAIN kept
    /// only with retain-as-published (spec 3.3.1.3).
    pub fn routed(sub: &Subscription, msg: &Message) -> Delivery {
        Delivery {
            qos: sub.options.qos,
            retain: sub.options.retain_as_published && msg.retain,
            subscription_id: sub.id,
        }
    }

    /// A retained message sent because of a new subscription: RETAIN set.
    pub fn retained(sub: &Subscription) -> Delivery {
        Delivery {
            qos: sub.options.qos,
            retain: true,
            subscription_id: sub.id,
        }
    }
}

/// Why [`Session::deliver`] did not send or queue a message. Each is
/// counted ([`Session::drops`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliverError {
    /// Over the client's Maximum Packet Size: discarded as the spec says
    /// (as if delivered).
    TooLarge,
    /// The session's queue is at its bound.
    QueueFull,
    /// QoS 0 to a client that is offline or whose output is at its bound.
    Qos0Dropped,
    /// Its message expiry has passed.
    Expired,
    /// The session has ended (or has not been accepted yet).
    NoSession,
}

/// Messages dropped, by reason, since the session began.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Drops {
    pub too_large: u32,
    pub queue_full: u32,
    pub qos0: u32,
    pub expired: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
/// What an outbound QoS 1/2 message waits for.
enum Stage {
    /// QoS 1 sent, PUBACK due.
    Ack,
    /// QoS 2 sent, PUBREC due.
    Rec,
    /// PUBREL sent, PUBCOMP due.
    Comp,
}

#[derive(Debug, Clone)]
struct Outgoing {
    msg: Message,
    qos: QoS,
    retain: bool,
    sub_id: Option<u32>,
}

#[derive(Debug, Clone)]
struct Inflight {
    packet_id: u16,
    stage: Stage,
    out: Outgoing,
}

/// What a persistent session keeps between connections: moved from the
/// old [`Session`] to the new one on resumption.
#[derive(Debug, Default)]
pub struct SessionState {
    client_id: Bytes,
    version: Version,
    /// Filter (as sent) → granted options and identifier.
    /// Sorted by filter; allocated to fit (most devices hold one or two),
    /// so a boxed slice: 16 bytes, not a vector's 24.
    subscriptions: Box<[(Bytes, SubOptions, Option<u32>)]>,
    /// Outbound QoS 1/2 not completed, in the order sent.
    inflight: ThinDeque<Inflight>,
    /// Waiting for the window, or for the client to come back.
    queue: ThinDeque<Outgoing>,
    queue_bytes: usize,
    /// Inbound QoS 2 packet ids whose PUBREL has not come (deduplication).
    /// (A few at most, bounded by the receive maximum.)
    awaiting_rel: ThinDeque<u16>,
    next_packet_id: u16,
    /// Seconds the session outlives its connection.
    expiry_s: u32,
}

impl SessionState {
    pub fn client_id(&self) -> &Bytes {
        &self.client_id
    }
    /// The subscriptions, as (filter as sent, granted options, identifier).
    pub fn subscriptions(&self) -> impl Iterator<Item = (&Bytes, &SubOptions, Option<u32>)> {
        self.subscriptions.iter().map(|(f, o, id)| (f, o, *id))
    }
    /// Removes the subscription to `filter` (as sent); whether there was one.
    fn unsubscribe(&mut self, filter: &Bytes) -> bool {
        match self.subscriptions.binary_search_by(|(x, ..)| x.cmp(filter)) {
            Ok(i) => {
                let mut v = std::mem::take(&mut self.subscriptions).into_vec();
                v.remove(i);
                self.subscriptions = v.into_boxed_slice();
                true
            }
            Err(_) => false,
        }
    }
    /// Messages waiting (queued plus in flight).
    pub fn pending(&self) -> usize {
        self.queue.len() + self.inflight.len()
    }
}

/// Where the session stands. The one time each state needs is
/// [`Session::at`] (one field for all three, not one per state plus the
/// keep-alive clock).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Closed at `at` (monotonic ms) without a CONNECT.
    AwaitConnect,
    /// A `Connect` event is out; the router has not answered.
    AwaitAccept,
    /// The last packet came at `at` (the keep-alive clock).
    Open,
    /// The connection is over, the session lives on until `at`.
    Offline,
    /// Nothing left: refused, expired, discarded or taken.
    Ended,
}

/// The topic aliases of a connection (MQTT 5): most never set one, so they
/// live out of line.
#[derive(Debug, Default)]
struct Aliases {
    /// Set by the client.
    inbound: HashMap<u16, Bytes>,
    /// Set by the relay toward the client.
    outbound: HashMap<Bytes, u16>,
}

/// A will: held while the connection is open (`due` None), then, once
/// the connection closed, waiting for its delay (`due`: monotonic ms).
#[derive(Debug)]
struct PendingWill {
    due: Option<u64>,
    will: Will,
}

/// What few sessions have: topic aliases (MQTT 5, once either side uses
/// one) and counts of dropped messages (once one is dropped).
#[derive(Debug, Default)]
struct Rare {
    aliases: Option<Box<Aliases>>,
    drops: Drops,
}

/// One client's MQTT connection and session. Whatever an idle client does
/// not use (will, aliases, drop counts, flows, the write queue) is out of
/// line or unallocated, so an idle session stays near 150 bytes.
#[derive(Debug)]
pub struct Session {
    state: State,
    /// The time the state needs: the CONNECT deadline (`AwaitConnect`),
    /// the last packet (`Open`), the session's expiry (`Offline`).
    at: u64,
    st: SessionState,
    /// The CONNECT being answered, then `None`.
    pending_connect: Option<Box<Connect>>,
    clean_start: bool,
    /// Keep alive in force, seconds (0: none).
    keep_alive_s: u16,
    /// Client limits (MQTT 5 CONNECT properties); `client_max_packet`
    /// `u32::MAX`: none.
    client_receive_max: u16,
    client_max_packet: u32,
    client_alias_max: u16,
    /// The will, while the connection is open or until it is due.
    will: Option<Box<PendingWill>>,
    rare: Option<Box<Rare>>,
    events: ThinDeque<Event>,
    /// What is queued for the client; `None` while nothing is.
    out: Option<Box<BytesMut>>,
    /// Bytes handed to the socket and not yet confirmed.
    out_inflight: u32,
}

impl Session {
    /// A socket accepted at `now`, waiting for CONNECT.
    pub fn new(cfg: &SessionConfig, now: Now) -> Session {
        Session {
            state: State::AwaitConnect,
            at: now.mono_ms.saturating_add(cfg.connect_timeout_ms),
            st: SessionState {
                next_packet_id: 1,
                ..SessionState::default()
            },
            pending_connect: None,
            clean_start: true,
            keep_alive_s: 0,
            client_receive_max: u16::MAX,
            client_max_packet: u32::MAX,
            client_alias_max: 0,
            will: None,
            rare: None,
            events: ThinDeque::default(),
            out: None,
            out_inflight: 0,
        }
    }

    /// The client's Maximum Packet Size (`usize::MAX`: none).
    fn max_packet(&self) -> usize {
        match self.client_max_packet {
            u32::MAX => usize::MAX,
            n => n as usize,
        }
    }

    fn drops_mut(&mut self) -> &mut Drops {
        &mut self.rare.get_or_insert_with(Box::default).drops
    }

    fn aliases(&self) -> Option<&Aliases> {
        self.rare.as_ref().and_then(|r| r.aliases.as_deref())
    }

    fn aliases_mut(&mut self) -> &mut Aliases {
        self.rare
            .get_or_insert_with(Box::default)
            .aliases
            .get_or_insert_with(Box::default)
    }

    /// The write queue, allocated on first use.
    fn out(&mut self) -> &mut BytesMut {
        self.out.get_or_insert_with(Box::default)
    }

    pub fn client_id(&self) -> &Bytes {
        &self.st.client_id
    }
    pub fn version(&self) -> Version {
        self.st.version
    }
    pub fn is_open(&self) -> bool {
        self.state == State::Open
    }
    /// The connection is over and the session waits for its client.
    pub fn is_offline(&self) -> bool {
        self.state == State::Offline
    }
    pub fn is_ended(&self) -> bool {
        self.state == State::Ended
    }
    /// The client asked for a clean start (3.1.1: clean session).
    pub fn clean_start(&self) -> bool {
        self.clean_start
    }
    pub fn keep_alive_s(&self) -> u16 {
        self.keep_alive_s
    }
    /// Seconds the session outlives its connection.
    pub fn session_expiry_s(&self) -> u32 {
        self.st.expiry_s
    }
    /// Outbound QoS 1/2 messages not yet completed.
    pub fn inflight_len(&self) -> usize {
        self.st.inflight.len()
    }
    /// Messages waiting for the window or for the client.
    pub fn queued_len(&self) -> usize {
        self.st.queue.len()
    }
    pub fn subscriptions(&self) -> impl Iterator<Item = (&Bytes, &SubOptions, Option<u32>)> {
        self.st.subscriptions()
    }
    pub fn drops(&self) -> Drops {
        self.rare.as_ref().map(|r| r.drops).unwrap_or_default()
    }
    /// Bytes written and not yet confirmed by the socket.
    pub fn out_bytes(&self) -> usize {
        self.out.as_ref().map_or(0, |o| o.len()) + self.out_inflight as usize
    }
    /// Whether the runtime must stop reading this client: its output is at
    /// the bound (every packet it sends may owe an answer).
    pub fn should_pause(&self, cfg: &SessionConfig) -> bool {
        self.out_bytes() >= cfg.max_out_bytes
    }

    /// The next event not tied to input (deadlines, the will, the end of
    /// the session, the close after a refusal).
    /// Gives back the room of the queues that are empty (events, in
    /// flight, waiting, QoS 2 ids): call once per read pass, after the
    /// events are taken, so an idle client holds none and a busy one does
    /// not allocate them per packet.
    pub fn tidy(&mut self) {
        self.events.release_if_empty();
        self.st.inflight.release_if_empty();
        self.st.queue.release_if_empty();
        self.st.awaiting_rel.release_if_empty();
    }

    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// Takes packets off `input` until one yields an event. Call until it
    /// returns `None`, then read more. A `Connect` event must be answered
    /// before the next call.
    pub fn handle_input(
        &mut self,
        cfg: &SessionConfig,
        now: Now,
        input: &mut BytesMut,
    ) -> Option<Event> {
        // Each turn consumes a packet or returns: bounded by `input`.
        loop {
            if let Some(ev) = self.events.pop_front() {
                return Some(ev);
            }
            if !matches!(self.state, State::AwaitConnect | State::Open) || input.is_empty() {
                return None;
            }
            let max = cfg.max_packet_size as usize;
            // Whether a CONNECT that fails to parse says it is MQTT 5 (its
            // protocol level, after the 6 bytes of the protocol name).
            let mut v5_connect = false;
            let packet = match codec::check(input, max) {
                Ok(Check::Incomplete { .. }) => return None,
                Ok(Check::Complete {
                    header_len,
                    body_len,
                }) => {
                    let first = input[0];
                    let mut whole = input.split_to(header_len + body_len).freeze();
                    let body = whole.split_off(header_len);
                    v5_connect = first == 0x10 && body.get(6) == Some(&5);
                    codec::parse(first, body, self.st.version)
                }
                Err(e) => Err(e),
            };
            // The keep-alive clock (before the CONNECT, `at` is its deadline).
            if self.state == State::Open {
                self.at = now.mono_ms;
            }
            match packet {
                Ok(p) => self.handle_packet(cfg, now, p),
                Err(e) => self.decode_failed(now, e, v5_connect),
            }
        }
    }

    /// The socket closed or failed under an open (or connecting) session.
    pub fn handle_closed(&mut self, now: Now) {
        match self.state {
            State::Open => self.close(now, CloseReason::PeerClosed, true),
            State::AwaitConnect | State::AwaitAccept => {
                self.state = State::Ended;
                self.events
                    .push_back(Event::Closed(CloseReason::PeerClosed));
            }
            _ => {}
        }
    }

    fn decode_failed(&mut self, now: Now, e: DecodeError, v5_connect: bool) {
        let code = e.reason_code();
        if self.state == State::AwaitConnect {
            // A CONNECT of MQTT 5 that breaks the rules gets a CONNACK
            // with the reason code; an unsupported version the CONNACK of
            // 3.1.1 (0x01), which older clients read; anything else is
            // closed without a word (3.1.1 has no code for it).
            if v5_connect {
                self.st.version = Version::V5;
                self.write(&Packet::ConnAck(ConnAck {
                    code,
                    ..ConnAck::default()
                }));
            } else if let Some(v3) = e.v3_connack_code() {
                self.write(&Packet::ConnAck(ConnAck {
                    code: v3,
                    ..ConnAck::default()
                }));
            }
            self.state = State::Ended;
            self.events
                .push_back(Event::Closed(CloseReason::Refused(code)));
            return;
        }
        self.protocol_error(now, code);
    }

    /// Ends an open connection for a protocol error: MQTT 5 gets
    /// DISCONNECT with `code`, 3.1.1 is just closed. The will goes out.
    fn protocol_error(&mut self, now: Now, code: u8) {
        self.send_disconnect(code);
        self.close(now, CloseReason::ProtocolError(code), true);
    }

    fn send_disconnect(&mut self, code: u8) {
        if self.st.version == Version::V5 && self.state == State::Open {
            self.write(&Packet::Disconnect(Disconnect {
                code,
                props: Properties::default(),
            }));
        }
    }

    fn handle_packet(&mut self, cfg: &SessionConfig, now: Now, p: Packet) {
        match (self.state, p) {
            (State::AwaitConnect, Packet::Connect(c)) => self.connect(cfg, now, c),
            (State::AwaitConnect, _) => {
                // Anything before CONNECT: close without a word.
                self.state = State::Ended;
                self.events
                    .push_back(Event::Closed(CloseReason::ProtocolError(
                        reason::PROTOCOL_ERROR,
                    )));
            }
            (State::Open, p) => self.open_packet(cfg, now, p),
            _ => {}
        }
    }

    fn refuse_now(&mut self, version: Version, code: u8) {
        let code = match version {
            Version::V5 => code,
            Version::V311 => reason::v3_connack(code),
        };
        self.st.version = version;
        self.write(&Packet::ConnAck(ConnAck {
            code,
            ..ConnAck::default()
        }));
        self.state = State::Ended;
        self.events.push_back(Event::Closed(CloseReason::Refused(
            if version == Version::V5 {
                code
            } else {
                match code {
                    reason::V3_IDENTIFIER_REJECTED => reason::CLIENT_IDENTIFIER_NOT_VALID,
                    reason::V3_BAD_USER_NAME_OR_PASSWORD => reason::BAD_USER_NAME_OR_PASSWORD,
                    reason::V3_NOT_AUTHORIZED => reason::NOT_AUTHORIZED,
                    reason::V3_UNACCEPTABLE_PROTOCOL_VERSION => {
                        reason::UNSUPPORTED_PROTOCOL_VERSION
                    }
                    _ => reason::SERVER_UNAVAILABLE,
                }
            },
        )));
    }

    fn connect(&mut self, cfg: &SessionConfig, now: Now, c: Box<Connect>) {
        let v = c.version;
        if c.client_id.is_empty() && !c.clean_start {
            // 3.1.1 [MQTT-3.1.3-8]; MQTT 5 has no session to resume either.
            return self.refuse_now(v, reason::CLIENT_IDENTIFIER_NOT_VALID);
        }
        if cfg.client_id_is_address
            && !c.client_id.is_empty()
            && crate::name::validate_name(&c.client_id).is_err()
        {
            return self.refuse_now(v, reason::CLIENT_IDENTIFIER_NOT_VALID);
        }
        if c.props.authentication_method.is_some() {
            // Enhanced authentication (AUTH exchanges) is not offered.
            return self.refuse_now(v, reason::BAD_AUTHENTICATION_METHOD);
        }
        if let Some(w) = &c.will
            && v == Version::V5
        {
            if w.qos > cfg.maximum_qos {
                return self.refuse_now(v, reason::QOS_NOT_SUPPORTED);
            }
            if w.retain && !cfg.retain_available {
                return self.refuse_now(v, reason::RETAIN_NOT_SUPPORTED);
            }
        }
        self.st.version = v;
        self.at = now.mono_ms;
        self.state = State::AwaitAccept;
        self.events.push_back(Event::Connect(c.clone()));
        self.pending_connect = Some(c);
    }

    /// Accepts the pending CONNECT: CONNACK goes out and the session is
    /// open. `resumed`: the state of this client id's earlier session
    /// ([`Session::take_state`]), used unless the client asked for a clean
    /// start. `assigned_id`: the id the client goes by, when the caller has
    /// it (the one given to a client that sent none, who is told it in
    /// CONNACK; or the caller's copy of the id sent, to share it).
    pub fn accept(
        &mut self,
        cfg: &SessionConfig,
        now: Now,
        resumed: Option<SessionState>,
        assigned_id: Option<Bytes>,
    ) {
        let Some(c) = self.pending_connect.take() else {
            return;
        };
        if self.state != State::AwaitAccept {
            return;
        }
        let v = c.version;
        let resumed = resumed.filter(|_| !c.clean_start);
        let session_present = resumed.is_some();
        if let Some(s) = resumed {
            self.st.subscriptions = s.subscriptions;
            self.st.inflight = s.inflight;
            self.st.queue = s.queue;
            self.st.queue_bytes = s.queue_bytes;
            self.st.awaiting_rel = s.awaiting_rel;
            self.st.next_packet_id = s.next_packet_id.max(1);
        }
        let assigned = c.client_id.is_empty() && assigned_id.is_some();
        // Its own allocation: a slice of the input would keep the whole
        // read that carried the CONNECT alive for the session's life.
        self.st.client_id = match assigned_id {
            Some(id) => id,
            None => Bytes::copy_from_slice(&c.client_id),
        };
        self.clean_start = c.clean_start;
        let mut props = Properties::default();
        // Session expiry: MQTT 5 asks; a 3.1.1 persistent session gets the
        // relay's longest.
        let asked = match v {
            Version::V5 => c.props.session_expiry_interval.unwrap_or(0),
            Version::V311 if c.clean_start => 0,
            Version::V311 => cfg.max_session_expiry_s,
        };
        self.st.expiry_s = asked.min(cfg.max_session_expiry_s);
        if self.st.expiry_s != asked {
            props.session_expiry_interval = Some(self.st.expiry_s);
        }
        self.keep_alive_s = c.keep_alive;
        if v == Version::V5
            && cfg.max_keep_alive_s > 0
            && (c.keep_alive == 0 || c.keep_alive > cfg.max_keep_alive_s)
        {
            self.keep_alive_s = cfg.max_keep_alive_s;
            props.server_keep_alive = Some(cfg.max_keep_alive_s);
        }
        if v == Version::V5 {
            self.client_receive_max = c.props.receive_maximum.unwrap_or(u16::MAX);
            self.client_max_packet = c.props.maximum_packet_size.unwrap_or(u32::MAX);
            self.client_alias_max = c
                .props
                .topic_alias_maximum
                .unwrap_or(0)
                .min(cfg.max_aliases_out);
            props.receive_maximum = Some(cfg.receive_maximum.max(1));
            props.maximum_packet_size = Some(cfg.max_packet_size);
            props.topic_alias_maximum = Some(cfg.topic_alias_maximum);
            if cfg.maximum_qos != QoS::ExactlyOnce {
                props.maximum_qos = Some(cfg.maximum_qos as u8);
            }
            if !cfg.retain_available {
                props.retain_available = Some(0);
            }
            if !cfg.wildcard_subscriptions {
                props.wildcard_subscription_available = Some(0);
            }
            if !cfg.shared_subscriptions {
                props.shared_subscription_available = Some(0);
            }
            if !cfg.subscription_identifiers {
                props.subscription_identifier_available = Some(0);
            }
            if assigned {
                props.assigned_client_identifier = Some(self.st.client_id.clone());
            }
        }
        self.will = c
            .will
            .clone()
            .map(|will| Box::new(PendingWill { due: None, will }));
        self.state = State::Open;
        self.at = now.mono_ms;
        self.write(&Packet::ConnAck(ConnAck {
            session_present,
            code: reason::SUCCESS,
            props,
        }));
        // Resume: unfinished QoS 1/2 go again, in order, PUBLISH with DUP
        // and PUBREL as they were.
        let inflight = std::mem::take(&mut self.st.inflight);
        for mut f in inflight {
            match f.stage {
                Stage::Comp => {
                    self.write(&Packet::PubRel(PubResp {
                        packet_id: f.packet_id,
                        ..PubResp::default()
                    }));
                    self.st.inflight.push_back(f);
                }
                Stage::Ack | Stage::Rec => {
                    let h = PublishHeader {
                        qos: f.out.qos,
                        retain: f.out.retain,
                        dup: true,
                        packet_id: f.packet_id,
                        with_topic: true,
                        topic_alias: None,
                        expiry_s: f.out.msg.expiry_left_s(now.mono_ms),
                        subscription_ids: f.out.sub_id.as_slice(),
                    };
                    if publish_len(&f.out.msg, &h, v) > self.max_packet() {
                        self.drops_mut().too_large += 1;
                        continue;
                    }
                    write_publish(&f.out.msg, &h, v, self.out());
                    f.stage = if f.out.qos == QoS::AtLeastOnce {
                        Stage::Ack
                    } else {
                        Stage::Rec
                    };
                    self.st.inflight.push_back(f);
                }
            }
        }
        self.drain(cfg, now);
    }

    /// Refuses the pending CONNECT with an MQTT 5 reason code (a 3.1.1
    /// client gets the nearest return code) and ends the connection.
    pub fn refuse(&mut self, code: u8) {
        if self.state != State::AwaitAccept {
            return;
        }
        let v = self
            .pending_connect
            .take()
            .map_or(self.st.version, |c| c.version);
        self.refuse_now(v, code);
    }

    fn open_packet(&mut self, cfg: &SessionConfig, now: Now, p: Packet) {
        let v = self.st.version;
        match p {
            Packet::Publish(p) => self.inbound_publish(cfg, now, p),
            Packet::PubAck(r) => {
                if let Some(i) = self.find_inflight(r.packet_id, Stage::Ack) {
                    self.st.inflight.remove(i);
                    self.drain(cfg, now);
                }
            }
            Packet::PubRec(r) => match self.find_inflight(r.packet_id, Stage::Rec) {
                Some(i) if r.code >= 0x80 => {
                    // Refused by the client: the flow ends here.
                    self.st.inflight.remove(i);
                    self.drain(cfg, now);
                }
                Some(i) => {
                    if let Some(f) = self.st.inflight.get_mut(i) {
                        f.stage = Stage::Comp;
                    }
                    self.write(&Packet::PubRel(PubResp {
                        packet_id: r.packet_id,
                        ..PubResp::default()
                    }));
                }
                None => {
                    let known = self.find_inflight(r.packet_id, Stage::Comp).is_some();
                    self.write(&Packet::PubRel(PubResp {
                        packet_id: r.packet_id,
                        code: if known || v == Version::V311 {
                            reason::SUCCESS
                        } else {
                            reason::PACKET_IDENTIFIER_NOT_FOUND
                        },
                        props: Properties::default(),
                    }));
                }
            },
            Packet::PubComp(r) => {
                if let Some(i) = self.find_inflight(r.packet_id, Stage::Comp) {
                    self.st.inflight.remove(i);
                    self.drain(cfg, now);
                }
            }
            Packet::PubRel(r) => {
                let at = self.st.awaiting_rel.iter().position(|&x| x == r.packet_id);
                let known = at.and_then(|i| self.st.awaiting_rel.remove(i)).is_some();
                self.write(&Packet::PubComp(PubResp {
                    packet_id: r.packet_id,
                    code: if known || v == Version::V311 {
                        reason::SUCCESS
                    } else {
                        reason::PACKET_IDENTIFIER_NOT_FOUND
                    },
                    props: Properties::default(),
                }));
            }
            Packet::Subscribe(s) => self.subscribe(cfg, now, s),
            Packet::Unsubscribe(u) => {
                let mut gone = Vec::new();
                let mut codes = Vec::new();
                for f in u.filters {
                    if self.st.unsubscribe(&f) {
                        codes.push(reason::SUCCESS);
                        gone.push(f);
                    } else {
                        codes.push(reason::NO_SUBSCRIPTION_EXISTED);
                    }
                }
                self.write(&Packet::UnsubAck(UnsubAck {
                    packet_id: u.packet_id,
                    props: Properties::default(),
                    codes,
                }));
                if !gone.is_empty() {
                    self.events.push_back(Event::Unsubscribe(gone));
                }
            }
            Packet::PingReq => self.write(&Packet::PingResp),
            Packet::Disconnect(d) => {
                if let Some(e) = d.props.session_expiry_interval {
                    if self.st.expiry_s == 0 && e != 0 {
                        return self.protocol_error(now, reason::PROTOCOL_ERROR);
                    }
                    self.st.expiry_s = e.min(cfg.max_session_expiry_s);
                }
                let with_will = v == Version::V5 && d.code == reason::DISCONNECT_WITH_WILL;
                self.close(now, CloseReason::Disconnect(d.code), with_will);
            }
            Packet::Connect(_) => self.protocol_error(now, reason::PROTOCOL_ERROR),
            // AUTH without an authentication method, and packets only a
            // server sends.
            Packet::Auth(_)
            | Packet::ConnAck(_)
            | Packet::SubAck(_)
            | Packet::UnsubAck(_)
            | Packet::PingResp => self.protocol_error(now, reason::PROTOCOL_ERROR),
        }
    }

    fn inbound_publish(&mut self, cfg: &SessionConfig, now: Now, mut p: Publish) {
        let v = self.st.version;
        if v == Version::V5 {
            if p.qos > cfg.maximum_qos {
                return self.protocol_error(now, reason::QOS_NOT_SUPPORTED);
            }
            if p.retain && !cfg.retain_available {
                return self.protocol_error(now, reason::RETAIN_NOT_SUPPORTED);
            }
            if !p.props.subscription_identifiers.is_empty() {
                return self.protocol_error(now, reason::PROTOCOL_ERROR);
            }
            match p.props.topic_alias.take() {
                Some(a) if a == 0 || a > cfg.topic_alias_maximum => {
                    return self.protocol_error(now, reason::TOPIC_ALIAS_INVALID);
                }
                Some(a) if p.topic.is_empty() => {
                    match self.aliases().and_then(|x| x.inbound.get(&a)) {
                        Some(t) => p.topic = t.clone(),
                        None => return self.protocol_error(now, reason::PROTOCOL_ERROR),
                    }
                }
                Some(a) => {
                    self.aliases_mut().inbound.insert(a, p.topic.clone());
                }
                None if p.topic.is_empty() => {
                    return self.protocol_error(now, reason::PROTOCOL_ERROR);
                }
                None => {}
            }
        }
        let id = p.packet_id;
        match p.qos {
            QoS::AtMostOnce => {}
            QoS::AtLeastOnce => self.write(&Packet::PubAck(PubResp {
                packet_id: id,
                ..PubResp::default()
            })),
            QoS::ExactlyOnce => {
                if self.st.awaiting_rel.iter().any(|&x| x == id) {
                    // A resend of a message already routed: acknowledge it
                    // again, route it once.
                    self.write(&Packet::PubRec(PubResp {
                        packet_id: id,
                        ..PubResp::default()
                    }));
                    return;
                }
                if self.st.awaiting_rel.len() >= usize::from(cfg.receive_maximum.max(1)) {
                    return self.protocol_error(now, reason::RECEIVE_MAXIMUM_EXCEEDED);
                }
                self.st.awaiting_rel.push_back(id);
                self.write(&Packet::PubRec(PubResp {
                    packet_id: id,
                    ..PubResp::default()
                }));
            }
        }
        self.events
            .push_back(Event::Publish(Message::from_publish(&p, now.mono_ms)));
    }

    fn subscribe(&mut self, cfg: &SessionConfig, now: Now, s: super::packet::Subscribe) {
        let v = self.st.version;
        let fail = |code: u8| match v {
            Version::V5 => code,
            Version::V311 => reason::V3_SUBACK_FAILURE,
        };
        let sub_id = s.props.subscription_identifiers.first().copied();
        let mut codes = Vec::with_capacity(s.filters.len());
        let mut made = Vec::new();
        for (filter, opts) in s.filters {
            let parsed = match parse_filter(&filter) {
                Ok(f) => f,
                Err(_) => {
                    codes.push(fail(reason::TOPIC_FILTER_INVALID));
                    continue;
                }
            };
            if parsed.group.is_some() && opts.no_local {
                return self.protocol_error(now, reason::PROTOCOL_ERROR);
            }
            if parsed.group.is_some() && !cfg.shared_subscriptions {
                codes.push(fail(reason::SHARED_SUBSCRIPTIONS_NOT_SUPPORTED));
                continue;
            }
            if has_wildcard(parsed.filter) && !cfg.wildcard_subscriptions {
                codes.push(fail(reason::WILDCARD_SUBSCRIPTIONS_NOT_SUPPORTED));
                continue;
            }
            if sub_id.is_some() && !cfg.subscription_identifiers {
                codes.push(fail(reason::SUBSCRIPTION_IDENTIFIERS_NOT_SUPPORTED));
                continue;
            }
            let at = self
                .st
                .subscriptions
                .binary_search_by(|(x, ..)| x.cmp(&filter));
            let is_new = at.is_err();
            if is_new && self.st.subscriptions.len() >= cfg.max_subscriptions {
                codes.push(fail(reason::QUOTA_EXCEEDED));
                continue;
            }
            // Kept for the session's life: its own allocation, not a slice
            // of the read that carried the SUBSCRIBE.
            let filter = Bytes::copy_from_slice(&filter);
            let granted = SubOptions {
                qos: opts.qos.min(cfg.maximum_qos),
                ..opts
            };
            match at {
                Ok(i) => self.st.subscriptions[i] = (filter.clone(), granted, sub_id),
                Err(i) => {
                    let mut v = std::mem::take(&mut self.st.subscriptions).into_vec();
                    v.reserve_exact(1);
                    v.insert(i, (filter.clone(), granted, sub_id));
                    self.st.subscriptions = v.into_boxed_slice();
                }
            }
            codes.push(granted.qos as u8);
            made.push(Subscription {
                filter,
                options: granted,
                id: sub_id,
                is_new,
            });
        }
        self.write(&Packet::SubAck(SubAck {
            packet_id: s.packet_id,
            props: Properties::default(),
            codes,
        }));
        if !made.is_empty() {
            self.events.push_back(Event::Subscribe(made));
        }
    }

    fn find_inflight(&self, packet_id: u16, stage: Stage) -> Option<usize> {
        self.st
            .inflight
            .iter()
            .position(|f| f.packet_id == packet_id && f.stage == stage)
    }

    /// Delivers a message routed to this client: QoS 0 is written at once
    /// (dropped when the output is at its bound or the client offline);
    /// QoS 1/2 is written when the in-flight window has room, else
    /// queued (bounded), also while the session is offline.
    pub fn deliver(
        &mut self,
        cfg: &SessionConfig,
        now: Now,
        msg: &Message,
        d: &Delivery,
    ) -> Result<(), DeliverError> {
        if !matches!(self.state, State::Open | State::Offline) {
            return Err(DeliverError::NoSession);
        }
        if msg.is_expired(now.mono_ms) {
            self.drops_mut().expired += 1;
            return Err(DeliverError::Expired);
        }
        let out = Outgoing {
            msg: msg.clone(),
            qos: msg.qos.min(d.qos),
            retain: d.retain,
            sub_id: d.subscription_id,
        };
        let open = self.state == State::Open;
        if out.qos == QoS::AtMostOnce {
            if open && self.out_bytes() < cfg.max_out_bytes {
                return self.send_qos0(now, &out);
            }
            if open || !cfg.queue_qos0_offline {
                self.drops_mut().qos0 += 1;
                return Err(DeliverError::Qos0Dropped);
            }
        } else if open
            && self.st.queue.is_empty()
            && self.window_open(cfg)
            && self.out_bytes() < cfg.max_out_bytes
        {
            return self.send_tracked(now, out);
        }
        self.enqueue(cfg, out)
    }

    fn enqueue(&mut self, cfg: &SessionConfig, out: Outgoing) -> Result<(), DeliverError> {
        let size = out.msg.size();
        if self.st.queue.len() >= cfg.max_queued_messages
            || self.st.queue_bytes + size > cfg.max_queued_bytes
        {
            self.drops_mut().queue_full += 1;
            return Err(DeliverError::QueueFull);
        }
        self.st.queue_bytes += size;
        self.st.queue.push_back(out);
        Ok(())
    }

    fn window_open(&self, cfg: &SessionConfig) -> bool {
        let window = cfg.max_inflight.min(self.client_receive_max).max(1);
        self.st.inflight.len() < usize::from(window)
    }

    /// The header for a first send, with a topic alias when the client
    /// takes them: a known topic goes by its alias alone, a new one gets
    /// the next alias while there are any left.
    fn header<'a>(&self, out: &'a Outgoing, now: Now, packet_id: u16) -> (PublishHeader<'a>, bool) {
        let cap = self.client_alias_max;
        let mut h = PublishHeader {
            qos: out.qos,
            retain: out.retain,
            dup: false,
            packet_id,
            with_topic: true,
            topic_alias: None,
            expiry_s: out.msg.expiry_left_s(now.mono_ms),
            subscription_ids: out.sub_id.as_slice(),
        };
        let mut new_alias = false;
        if self.st.version == Version::V5 {
            let outbound = self.aliases().map(|x| &x.outbound);
            let known = outbound.map_or(0, |o| o.len());
            if let Some(&a) = outbound.and_then(|o| o.get(&out.msg.topic)) {
                h.with_topic = false;
                h.topic_alias = Some(a);
            } else if known < usize::from(cap) {
                h.topic_alias = Some(known as u16 + 1);
                new_alias = true;
            }
        }
        (h, new_alias)
    }

    fn send_qos0(&mut self, now: Now, out: &Outgoing) -> Result<(), DeliverError> {
        let (h, new_alias) = self.header(out, now, 0);
        let v = self.st.version;
        if publish_len(&out.msg, &h, v) > self.max_packet() {
            self.drops_mut().too_large += 1;
            return Err(DeliverError::TooLarge);
        }
        if new_alias && let Some(a) = h.topic_alias {
            self.alias_out(&out.msg.topic, a);
        }
        write_publish(&out.msg, &h, v, self.out());
        Ok(())
    }

    fn alias_out(&mut self, topic: &Bytes, a: u16) {
        self.aliases_mut().outbound.insert(topic.clone(), a);
    }

    fn next_packet_id(&mut self) -> u16 {
        // At most `inflight.len() + 1` tries: the window keeps it far
        // below 65,535.
        loop {
            let id = self.st.next_packet_id.max(1);
            self.st.next_packet_id = id.checked_add(1).unwrap_or(1);
            if !self.st.inflight.iter().any(|f| f.packet_id == id) {
                return id;
            }
        }
    }

    fn send_tracked(&mut self, now: Now, out: Outgoing) -> Result<(), DeliverError> {
        let v = self.st.version;
        let (size, new_alias_at) = {
            let (h, new_alias) = self.header(&out, now, 1);
            (
                publish_len(&out.msg, &h, v),
                new_alias.then_some(h.topic_alias).flatten(),
            )
        };
        if size > self.max_packet() {
            self.drops_mut().too_large += 1;
            return Err(DeliverError::TooLarge);
        }
        let packet_id = self.next_packet_id();
        let (h, _) = self.header(&out, now, packet_id);
        write_publish(&out.msg, &h, v, self.out());
        if let Some(a) = new_alias_at {
            self.alias_out(&out.msg.topic, a);
        }
        let stage = if out.qos == QoS::AtLeastOnce {
            Stage::Ack
        } else {
            Stage::Rec
        };
        self.st.inflight.push_back(Inflight {
            packet_id,
            stage,
            out,
        });
        Ok(())
    }

    /// Sends queued messages while the window and the output have room.
    fn drain(&mut self, cfg: &SessionConfig, now: Now) {
        if self.state != State::Open {
            return;
        }
        while let Some(front) = self.st.queue.front() {
            let tracked = front.qos != QoS::AtMostOnce;
            if tracked && !self.window_open(cfg) {
                break;
            }
            if self.out_bytes() >= cfg.max_out_bytes {
                break;
            }
            let Some(out) = self.st.queue.pop_front() else {
                break;
            };
            self.st.queue_bytes -= out.msg.size();
            if out.msg.is_expired(now.mono_ms) {
                self.drops_mut().expired += 1;
                continue;
            }
            let _ = if tracked {
                self.send_tracked(now, out)
            } else {
                self.send_qos0(now, &out)
            };
        }
    }

    fn write(&mut self, p: &Packet) {
        // Packets the session builds are far below the MQTT size limit and
        // never AUTH in 3.1.1: encoding does not fail.
        let v = self.st.version;
        let _ = codec::encode(p, v, self.out());
    }

    /// Ends the connection; the session lives on if it is persistent.
    /// `will`: the will goes out (now, or after its delay).
    fn close(&mut self, now: Now, why: CloseReason, will: bool) {
        if self.state != State::Open {
            return;
        }
        self.events.push_back(Event::Closed(why));
        if let Some(r) = self.rare.as_mut() {
            r.aliases = None;
        }
        let w = self.will.take();
        if let Some(mut w) = w.filter(|_| will) {
            let delay_s = w
                .will
                .props
                .will_delay_interval
                .unwrap_or(0)
                .min(self.st.expiry_s);
            w.due = Some(now.mono_ms.saturating_add(u64::from(delay_s) * 1000));
            self.will = Some(w);
        }
        if self.st.expiry_s == 0 {
            self.end_session(now);
            return;
        }
        self.state = State::Offline;
        self.at = now
            .mono_ms
            .saturating_add(u64::from(self.st.expiry_s) * 1000);
        self.fire_will(now, false);
    }

    /// Publishes the will if it is due at `now` (or at once with `force`).
    fn fire_will(&mut self, now: Now, force: bool) {
        if let Some(due) = self.will_due()
            && (force || now.mono_ms >= due)
            && let Some(w) = self.will.take()
        {
            self.events
                .push_back(Event::Will(Message::from_will(&w.will, now.mono_ms)));
        }
    }

    /// When the will of a closed connection goes out, if it waits.
    fn will_due(&self) -> Option<u64> {
        self.will.as_ref().and_then(|w| w.due)
    }

    fn end_session(&mut self, now: Now) {
        self.fire_will(now, true);
        self.state = State::Ended;
        self.st.inflight.clear();
        self.st.queue.clear();
        self.st.queue_bytes = 0;
        self.st.awaiting_rel.clear();
        self.events.push_back(Event::SessionEnded);
    }

    /// Another connection claims this client id: an open connection gets
    /// DISCONNECT 0x8E (MQTT 5) and is closed (its will goes out as on any
    /// abnormal close). The session itself stays: take it with
    /// [`take_state`](Self::take_state) or end it with
    /// [`discard`](Self::discard).
    pub fn take_over(&mut self, now: Now) {
        self.disconnect(now, reason::SESSION_TAKEN_OVER);
    }

    /// The relay ends the connection (shutdown, kick...): MQTT 5 gets
    /// DISCONNECT with `code`. The will goes out; the session lives on if
    /// persistent.
    pub fn disconnect(&mut self, now: Now, code: u8) {
        if self.state != State::Open {
            return;
        }
        self.send_disconnect(code);
        let why = if code == reason::SESSION_TAKEN_OVER {
            CloseReason::TakenOver
        } else {
            CloseReason::Server(code)
        };
        self.close(now, why, true);
    }

    /// Takes the session state for a new connection of the same client
    /// that resumes it ([`accept`](Self::accept)). A will still waiting
    /// for its delay is cancelled (spec 3.1.3.2.2). This session is over;
    /// nothing more comes from it.
    pub fn take_state(&mut self) -> Option<SessionState> {
        if !self.is_offline() {
            return None;
        }
        self.will = None;
        self.state = State::Ended;
        Some(std::mem::take(&mut self.st))
    }

    /// Ends an offline session now (a new connection with clean start): a
    /// will still waiting goes out, then `SessionEnded`.
    pub fn discard(&mut self, now: Now) {
        if self.is_offline() {
            self.end_session(now);
        }
    }

    /// The next chunk to write, at most `max` bytes; in flight until
    /// [`on_transmitted`](Self::on_transmitted).
    pub fn poll_transmit(&mut self, max: usize) -> Option<Bytes> {
        let out = self.out.as_mut().filter(|o| !o.is_empty())?;
        let n = out.len().min(max.max(1));
        let chunk = out.split_to(n).freeze();
        if out.is_empty() {
            // Give the allocation back: an idle client holds no buffer.
            self.out = None;
        }
        let n = u32::try_from(chunk.len()).unwrap_or(u32::MAX);
        self.out_inflight = self.out_inflight.saturating_add(n);
        Some(chunk)
    }

    /// `n` bytes from `poll_transmit` reached the socket: queued messages
    /// may follow.
    pub fn on_transmitted(&mut self, cfg: &SessionConfig, now: Now, n: usize) {
        self.out_inflight = self
            .out_inflight
            .saturating_sub(u32::try_from(n).unwrap_or(u32::MAX));
        self.drain(cfg, now);
    }

    /// Earliest monotonic ms at which [`handle_timeout`](Self::handle_timeout)
    /// has work.
    pub fn poll_timeout(&self) -> Option<u64> {
        match self.state {
            State::AwaitConnect => Some(self.at),
            State::Open if self.keep_alive_s > 0 => Some(self.keep_alive_deadline()),
            State::Offline => Some(match self.will_due() {
                Some(d) => d.min(self.at),
                None => self.at,
            }),
            _ => None,
        }
    }

    fn keep_alive_deadline(&self) -> u64 {
        // One and a half keep alive periods (spec 3.1.2.10).
        self.at.saturating_add(u64::from(self.keep_alive_s) * 1500)
    }

    /// Applies the deadlines passed at `now`; events come from
    /// [`poll_event`](Self::poll_event).
    pub fn handle_timeout(&mut self, now: Now) {
        match self.state {
            State::AwaitConnect if now.mono_ms >= self.at => {
                self.state = State::Ended;
                self.events
                    .push_back(Event::Closed(CloseReason::ConnectTimeout));
            }
            State::Open if self.keep_alive_s > 0 && now.mono_ms >= self.keep_alive_deadline() => {
                self.send_disconnect(reason::KEEP_ALIVE_TIMEOUT);
                self.close(now, CloseReason::KeepAliveTimeout, true);
            }
            State::Offline => {
                if now.mono_ms >= self.at {
                    self.end_session(now);
                } else {
                    self.fire_will(now, false);
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests;
