//! The messages that cross the shard / plugin boundary: `Event`s in (connect,
//! disconnect, message), `Action`s out (send, publish from `$rules`).
use bytes::Bytes;

/// A client as scripts see it in `on_connect` / `on_disconnect`.
#[derive(Debug, Clone, PartialEq)]
pub struct ClientInfo {
    /// The client's address.
    pub addr: String,
    /// Role given in HELLO (`controller`, `browser`...).
    pub role: String,
    /// The `meta` object given in HELLO (`null` when none).
    pub meta: serde_json::Value,
    /// Remote socket address, as text.
    pub remote: String,
    /// Shard that owns the connection.
    pub shard: usize,
    /// When the event happened, ms since the Unix epoch.
    pub time_ms: u64,
    /// Groups the connection was a member of (at a disconnect: just before it
    /// left them; at a connect: none yet).
    pub groups: Vec<String>,
}

/// A DATA or PUBLISH frame, after it was forwarded.
#[derive(Debug, Clone, PartialEq)]
pub struct MessageEvent {
    /// Sender address.
    pub src: String,
    /// Destination address (empty for a publish).
    pub dst: String,
    /// Group of a publish.
    pub group: Option<String>,
    /// The payload bytes as received.
    pub payload: Bytes,
    /// The payload is UTF-8 JSON text (frame flag JSON).
    pub json: bool,
    /// When the frame was received, ms since the Unix epoch.
    pub time_ms: u64,
}

/// One event for the scripts.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Event {
    /// An address came online (after WELCOME).
    Connect(ClientInfo),
    /// An address went offline, with the reason (`bye`, `idle_timeout`, `replaced`,
    /// `error`, `kicked`, `shutdown`).
    Disconnect(ClientInfo, String),
    /// A message was forwarded.
    Message(MessageEvent),
}

impl Event {
    /// The address whose worker handles this event (events of one address stay in order).
    pub fn addr(&self) -> &str {
        match self {
            Event::Connect(c) | Event::Disconnect(c, _) => &c.addr,
            Event::Message(m) => &m.src,
        }
    }

    /// The worker (of `workers`) that handles events of `addr`: FNV-1a of the address.
    pub fn worker_of(addr: &str, workers: usize) -> usize {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in addr.bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        (h % workers.max(1) as u64) as usize
    }
}

/// Something a script asks the relay to do; the frame's src is `$rules`.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Action {
    /// Deliver `payload` to address `dst`.
    Send {
        /// Destination address.
        dst: String,
        /// Payload bytes.
        payload: Bytes,
        /// Payload is JSON text.
        json: bool,
    },
    /// Deliver `payload` to every member of `group`.
    Publish {
        /// Group name.
        group: String,
        /// Payload bytes.
        payload: Bytes,
        /// Payload is JSON text.
        json: bool,
    },
}

/// The source address of every action.
pub const RULES_SRC: &str = "$rules";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worker_of_is_stable_and_in_range() {
        for w in 1..8 {
            for a in ["ctl-1", "ctl-2", "web-7f3a", ""] {
                let x = Event::worker_of(a, w);
                assert!(x < w);
                assert_eq!(x, Event::worker_of(a, w));
            }
        }
        let spread: std::collections::HashSet<usize> = (0..100)
            .map(|i| Event::worker_of(&format!("ctl-{i}"), 4))
            .collect();
        assert_eq!(spread.len(), 4, "addresses spread over every worker");
    }
}
