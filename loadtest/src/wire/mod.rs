//! Client-side codecs. Each connection has an [`Encoder`] (used by its writer) and a
//! [`Decoder`] (used by its reader) for one of the wire forms the tool speaks:
//! relay binary or JSON over TCP, relay binary or JSON over WebSocket, or MQTT 3.1.1.
//! Decoders turn server bytes into the few [`Inbound`] events a client cares about.

pub mod mqtt;
pub mod relay;
pub mod ws;

use bytes::{Bytes, BytesMut};

use crate::payload::Stamp;
use crate::scenario::Form;

/// What a client learns from the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inbound {
    /// The session is up (relay WELCOME, MQTT CONNACK accepted).
    Welcome,
    /// A data message; `stamp` is `None` when it was not sent by this tool.
    Data { stamp: Option<Stamp> },
    /// Heartbeat answer (relay PONG, MQTT PINGRESP).
    Pong,
    /// Request `seq` succeeded (relay ACK, MQTT SUBACK granted).
    Ack { seq: u32 },
    /// Request `seq` failed, or the server reports a problem: protocol error name.
    Error { code: String, seq: u32 },
    /// The server refused for now (relay `busy`) and said when to come back.
    RetryLater { code: String, retry_after_ms: u64 },
    /// A WebSocket ping the client must answer.
    WsPing(Bytes),
    /// The server is closing (relay BYE, WebSocket close, MQTT DISCONNECT).
    Closed,
    /// Anything else (ignored).
    Other,
}

/// Bytes from the server that cannot be decoded; the connection cannot go on.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
    #[error("relay frame: {0}")]
    Relay(#[from] relay_core::DecodeError),
    #[error("relay JSON: {0}")]
    Json(#[from] relay_core::JsonError),
    #[error("websocket: {0}")]
    Ws(#[from] ws::WsError),
    #[error("mqtt: {0}")]
    Mqtt(String),
    #[error("line longer than {0} bytes")]
    LineTooLong(usize),
}

/// Where a client's data messages go, resolved once into wire form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dest {
    /// Relay: the address or group name; MQTT: the topic.
    pub name: Bytes,
    /// The same as text (MQTT topics are strings).
    pub text: String,
    /// True when `name` is a group (relay PUBLISH instead of DATA).
    pub group: bool,
}

/// Which protocol a connection speaks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WireKind {
    /// The relay protocol in `form`, over WebSocket when `ws` is set.
    Relay { form: Form, ws: bool },
    /// MQTT 3.1.1; topics start with `prefix`.
    Mqtt { prefix: String },
}

impl WireKind {
    /// The encoder for this kind; `seed` varies WebSocket masks per connection.
    pub fn encoder(&self, seed: u64) -> Encoder {
        match self {
            WireKind::Relay { form, ws } => {
                Encoder::Relay(relay::RelayEncoder::new(*form, *ws, seed))
            }
            WireKind::Mqtt { prefix } => Encoder::Mqtt(mqtt::MqttEncoder::new(prefix)),
        }
    }

    /// The decoder for this kind, refusing messages over `max` bytes.
    pub fn decoder(&self, max: usize) -> Decoder {
        match self {
            WireKind::Relay { form, ws } => {
                Decoder::Relay(relay::RelayDecoder::new(*form, *ws, max))
            }
            WireKind::Mqtt { .. } => Decoder::Mqtt(mqtt::MqttDecoder::new(max)),
        }
    }

    /// Resolves a destination address (`group = false`) or group into wire form.
    pub fn dest(&self, name: &str, group: bool) -> Dest {
        let text = match self {
            WireKind::Relay { .. } => name.to_string(),
            WireKind::Mqtt { prefix } => mqtt::topic(prefix, name, group),
        };
        Dest {
            name: Bytes::from(text.clone().into_bytes()),
            text,
            group,
        }
    }
}

/// The writing half of a codec.
#[derive(Debug)]
pub enum Encoder {
    Relay(relay::RelayEncoder),
    Mqtt(mqtt::MqttEncoder),
}

impl Encoder {
    /// Opens the session as `addr` with `role`, announcing `heartbeat_s`.
    pub fn hello(&mut self, out: &mut BytesMut, addr: &str, role: &str, heartbeat_s: u32) {
        match self {
            Encoder::Relay(e) => e.hello(out, addr, role, heartbeat_s),
            Encoder::Mqtt(e) => e.connect(out, addr, heartbeat_s),
        }
    }

    /// Joins `group` (MQTT: subscribes to its topic), acknowledged with `seq`.
    pub fn join(&mut self, out: &mut BytesMut, group: &str, seq: u32) {
        match self {
            Encoder::Relay(e) => e.join(out, group, seq),
            Encoder::Mqtt(e) => e.subscribe(out, &mqtt::topic(&e.prefix, group, true), seq),
        }
    }

    /// MQTT only: subscribes to the client's own address topic (its inbox); the relay
    /// delivers to addresses without it. Returns false when nothing was written.
    pub fn inbox(&mut self, out: &mut BytesMut, addr: &str, seq: u32) -> bool {
        match self {
            Encoder::Relay(_) => false,
            Encoder::Mqtt(e) => {
                let t = mqtt::topic(&e.prefix, addr, false);
                e.subscribe(out, &t, seq);
                true
            }
        }
    }

    /// One data message carrying `stamp`, padded to `payload_len` bytes.
    pub fn data(&mut self, out: &mut BytesMut, dest: &Dest, stamp: Stamp, payload_len: usize) {
        match self {
            Encoder::Relay(e) => e.data(out, dest, stamp, payload_len),
            Encoder::Mqtt(e) => e.publish(out, dest, stamp, payload_len),
        }
    }

    /// Sends data as this JSON template (see [`crate::payload::Template`]).
    pub fn set_template(&mut self, t: std::sync::Arc<crate::payload::Template>) {
        match self {
            Encoder::Relay(e) => e.set_template(t),
            Encoder::Mqtt(e) => e.set_template(t),
        }
    }

    /// A heartbeat.
    pub fn ping(&mut self, out: &mut BytesMut) {
        match self {
            Encoder::Relay(e) => e.ping(out),
            Encoder::Mqtt(e) => e.ping(out),
        }
    }

    /// Answer to a WebSocket ping (relay over WebSocket only).
    pub fn ws_pong(&mut self, out: &mut BytesMut, payload: &[u8]) {
        if let Encoder::Relay(e) = self {
            e.ws_pong(out, payload);
        }
    }

    /// Graceful goodbye.
    pub fn bye(&mut self, out: &mut BytesMut) {
        match self {
            Encoder::Relay(e) => e.bye(out),
            Encoder::Mqtt(e) => e.disconnect(out),
        }
    }
}

/// The reading half of a codec.
#[derive(Debug)]
pub enum Decoder {
    Relay(relay::RelayDecoder),
    Mqtt(mqtt::MqttDecoder),
}

impl Decoder {
    /// Takes the next event off `buf`, or `Ok(None)` when more bytes are needed.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Inbound>, WireError> {
        match self {
            Decoder::Relay(d) => d.decode(buf),
            Decoder::Mqtt(d) => d.decode(buf),
        }
    }
}
