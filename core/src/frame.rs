//! The frame: one message of the wire protocol, independent of its form
//! (binary or JSON). Payload, source and destination are `Bytes`, so a frame
//! parsed from a socket buffer is forwarded without copying them.

use bytes::Bytes;

/// Protocol version carried in byte 0 of every binary body.
pub const VERSION: u8 = 1;

/// Smallest binary body: version, type, flags, seq (4), src_len, dst_len.
pub const MIN_BODY: usize = 9;

/// Default bound on a body, in bytes (`max_frame`).
pub const DEFAULT_MAX_FRAME: u32 = 65536;

/// Frame types of protocol version 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
#[non_exhaustive]
pub enum FrameType {
    Hello = 1,
    Welcome = 2,
    Data = 3,
    Ack = 4,
    Ping = 5,
    Pong = 6,
    Error = 7,
    Join = 8,
    Leave = 9,
    Publish = 10,
    Bye = 11,
}

impl FrameType {
    /// Every type, in wire order.
    pub const ALL: [FrameType; 11] = [
        FrameType::Hello,
        FrameType::Welcome,
        FrameType::Data,
        FrameType::Ack,
        FrameType::Ping,
        FrameType::Pong,
        FrameType::Error,
        FrameType::Join,
        FrameType::Leave,
        FrameType::Publish,
        FrameType::Bye,
    ];

    /// The type for a wire byte, if it is one of version 1.
    pub fn from_u8(b: u8) -> Option<Self> {
        Self::ALL.get((b as usize).wrapping_sub(1)).copied()
    }

    /// Name used by the JSON form (`"type":"data"`).
    pub fn name(self) -> &'static str {
        match self {
            FrameType::Hello => "hello",
            FrameType::Welcome => "welcome",
            FrameType::Data => "data",
            FrameType::Ack => "ack",
            FrameType::Ping => "ping",
            FrameType::Pong => "pong",
            FrameType::Error => "error",
            FrameType::Join => "join",
            FrameType::Leave => "leave",
            FrameType::Publish => "publish",
            FrameType::Bye => "bye",
        }
    }

    /// The type for a JSON `"type"` name.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.iter().copied().find(|t| t.name() == name)
    }
}

/// The flags byte. Bits 3..7 are reserved: ignored on receipt, 0 when sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct Flags(pub u8);

impl Flags {
    /// The sender wants exactly one ACK or ERROR for this frame.
    pub const ACK_REQ: u8 = 0b001;
    /// The payload is UTF-8 JSON text.
    pub const JSON: u8 = 0b010;
    /// Set by the server on a frame delivered through a group; dst is the group.
    pub const GROUP: u8 = 0b100;
    /// Bits a sender may set; everything else is reserved.
    pub const DEFINED: u8 = 0b111;

    pub fn ack_req(self) -> bool {
        self.0 & Self::ACK_REQ != 0
    }
    pub fn json(self) -> bool {
        self.0 & Self::JSON != 0
    }
    pub fn group(self) -> bool {
        self.0 & Self::GROUP != 0
    }
    /// The flags with reserved bits cleared.
    pub fn defined(self) -> Flags {
        Flags(self.0 & Self::DEFINED)
    }
    pub fn with(self, bits: u8, on: bool) -> Flags {
        if on {
            Flags(self.0 | bits)
        } else {
            Flags(self.0 & !bits)
        }
    }
}

/// How an ERROR message that carries a retry hint begins (`busy`, `going_away`).
pub const RETRY_AFTER_PREFIX: &str = "retry_after_ms=";

/// Error codes carried by ERROR frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
#[non_exhaustive]
pub enum ErrorCode {
    BadFrame = 1,
    TooLarge = 2,
    Unauthorized = 3,
    NoRoute = 4,
    RateLimited = 5,
    SlowConsumer = 6,
    Replaced = 7,
    HelloRequired = 8,
    BadAddress = 9,
    Forbidden = 10,
    ShuttingDown = 11,
    Internal = 12,
    IdleTimeout = 13,
    Unsupported = 14,
    /// The relay takes no more hellos right now; the message starts with
    /// `retry_after_ms=<n>` and the connection is closed.
    Busy = 15,
    /// The relay process is being replaced (an upgrade): reconnect after the
    /// `retry_after_ms` the message starts with, and say hello again.
    GoingAway = 16,
    /// The destination may be on another node of a cluster, but the cluster
    /// link (NATS) is down or did not answer in time: the frame was dropped.
    Unavailable = 17,
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 17] = [
        ErrorCode::BadFrame,
        ErrorCode::TooLarge,
        ErrorCode::Unauthorized,
        ErrorCode::NoRoute,
        ErrorCode::RateLimited,
        ErrorCode::SlowConsumer,
        ErrorCode::Replaced,
        ErrorCode::HelloRequired,
        ErrorCode::BadAddress,
        ErrorCode::Forbidden,
        ErrorCode::ShuttingDown,
        ErrorCode::Internal,
        ErrorCode::IdleTimeout,
        ErrorCode::Unsupported,
        ErrorCode::Busy,
        ErrorCode::GoingAway,
        ErrorCode::Unavailable,
    ];

    pub fn from_u16(v: u16) -> Option<Self> {
        Self::ALL.get((v as usize).wrapping_sub(1)).copied()
    }

    /// Name used by the JSON form and the HTTP API (`"code":"no_route"`).
    pub fn name(self) -> &'static str {
        match self {
            ErrorCode::BadFrame => "bad_frame",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::NoRoute => "no_route",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::SlowConsumer => "slow_consumer",
            ErrorCode::Replaced => "replaced",
            ErrorCode::HelloRequired => "hello_required",
            ErrorCode::BadAddress => "bad_address",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::ShuttingDown => "shutting_down",
            ErrorCode::Internal => "internal",
            ErrorCode::IdleTimeout => "idle_timeout",
            ErrorCode::Unsupported => "unsupported",
            ErrorCode::Busy => "busy",
            ErrorCode::GoingAway => "going_away",
            ErrorCode::Unavailable => "unavailable",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.iter().copied().find(|c| c.name() == name)
    }
}

/// One protocol message.
///
/// `src` and `dst` are empty when absent. For DATA sent by the server, `src`
/// is the sender's address as set by the relay; for frames delivered through a
/// group, `dst` is the group and the GROUP flag is set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub kind: FrameType,
    pub flags: Flags,
    pub seq: u32,
    pub src: Bytes,
    pub dst: Bytes,
    pub payload: Bytes,
}

impl Frame {
    /// A frame of `kind` with everything else empty.
    pub fn new(kind: FrameType) -> Frame {
        Frame {
            kind,
            flags: Flags::default(),
            seq: 0,
            src: Bytes::new(),
            dst: Bytes::new(),
            payload: Bytes::new(),
        }
    }

    /// DATA from `src` to `dst`.
    pub fn data(src: impl Into<Bytes>, dst: impl Into<Bytes>, payload: impl Into<Bytes>) -> Frame {
        Frame {
            src: src.into(),
            dst: dst.into(),
            payload: payload.into(),
            ..Frame::new(FrameType::Data)
        }
    }

    /// ACK for `seq`.
    pub fn ack(seq: u32) -> Frame {
        Frame {
            seq,
            ..Frame::new(FrameType::Ack)
        }
    }

    /// ERROR for `seq`: payload is the u16 code then the UTF-8 message.
    pub fn error(seq: u32, code: ErrorCode, message: &str) -> Frame {
        let mut p = Vec::with_capacity(2 + message.len());
        p.extend_from_slice(&(code as u16).to_be_bytes());
        p.extend_from_slice(message.as_bytes());
        Frame {
            seq,
            payload: p.into(),
            ..Frame::new(FrameType::Error)
        }
    }

    /// An ERROR telling the client to come back after `retry_after_ms`: the
    /// message is `retry_after_ms=<n>` followed by a space and `message`.
    pub fn error_retry(seq: u32, code: ErrorCode, retry_after_ms: u64, message: &str) -> Frame {
        Frame::error(
            seq,
            code,
            &format!("{RETRY_AFTER_PREFIX}{retry_after_ms} {message}"),
        )
    }

    /// The `retry_after_ms` an ERROR carries at the start of its message.
    pub fn retry_after_ms(&self) -> Option<u64> {
        let (_, msg) = self.error_parts()?;
        let rest = msg.strip_prefix(RETRY_AFTER_PREFIX)?;
        let digits = rest.split(|c: char| !c.is_ascii_digit()).next()?;
        digits.parse().ok()
    }

    /// PONG carrying the server's wall-clock time.
    pub fn pong(server_time_ms: u64) -> Frame {
        Frame {
            payload: Bytes::copy_from_slice(&server_time_ms.to_be_bytes()),
            ..Frame::new(FrameType::Pong)
        }
    }

    /// The code and message of an ERROR frame, if its payload holds them.
    pub fn error_parts(&self) -> Option<(u16, &str)> {
        if self.kind != FrameType::Error || self.payload.len() < 2 {
            return None;
        }
        let code = u16::from_be_bytes([self.payload[0], self.payload[1]]);
        let msg = std::str::from_utf8(&self.payload[2..]).ok()?;
        Some((code, msg))
    }

    /// The server time of a PONG frame.
    pub fn pong_time(&self) -> Option<u64> {
        let b: [u8; 8] = self.payload.get(..8)?.try_into().ok()?;
        Some(u64::from_be_bytes(b))
    }

    /// Length of this frame's binary body.
    pub fn body_len(&self) -> usize {
        MIN_BODY + self.src.len() + self.dst.len() + self.payload.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn type_numbers_match_the_protocol() {
        let numbers: Vec<u8> = FrameType::ALL.iter().map(|t| *t as u8).collect();
        assert_eq!(numbers, (1..=11).collect::<Vec<u8>>());
        assert_eq!(FrameType::from_u8(0), None);
        assert_eq!(FrameType::from_u8(12), None);
        assert_eq!(FrameType::from_u8(3), Some(FrameType::Data));
        for t in FrameType::ALL {
            assert_eq!(FrameType::from_name(t.name()), Some(t));
        }
    }

    #[test]
    fn error_codes_match_the_protocol() {
        let expected = [
            (1, "bad_frame"),
            (2, "too_large"),
            (3, "unauthorized"),
            (4, "no_route"),
            (5, "rate_limited"),
            (6, "slow_consumer"),
            (7, "replaced"),
            (8, "hello_required"),
            (9, "bad_address"),
            (10, "forbidden"),
            (11, "shutting_down"),
            (12, "internal"),
            (13, "idle_timeout"),
            (14, "unsupported"),
            (15, "busy"),
            (16, "going_away"),
            (17, "unavailable"),
        ];
        for (n, name) in expected {
            let c = ErrorCode::from_u16(n).unwrap();
            assert_eq!(c as u16, n);
            assert_eq!(c.name(), name);
            assert_eq!(ErrorCode::from_name(name), Some(c));
        }
        assert_eq!(ErrorCode::from_u16(0), None);
        assert_eq!(ErrorCode::from_u16(18), None);
    }

    #[test]
    fn retry_hint_rides_in_the_error_message() {
        let f = Frame::error_retry(3, ErrorCode::Busy, 4217, "too many hellos");
        assert_eq!(
            f.error_parts(),
            Some((15, "retry_after_ms=4217 too many hellos"))
        );
        assert_eq!(f.retry_after_ms(), Some(4217));
        assert_eq!(
            Frame::error(1, ErrorCode::NoRoute, "x is offline").retry_after_ms(),
            None
        );
        assert_eq!(
            Frame::error(1, ErrorCode::Busy, "retry_after_ms=").retry_after_ms(),
            None
        );
    }

    #[test]
    fn flag_bits_match_the_protocol() {
        assert_eq!(Flags::ACK_REQ, 1);
        assert_eq!(Flags::JSON, 2);
        assert_eq!(Flags::GROUP, 4);
        let f = Flags(0xff);
        assert!(f.ack_req() && f.json() && f.group());
        assert_eq!(f.defined(), Flags(7));
    }

    #[test]
    fn error_and_pong_payloads() {
        let e = Frame::error(9, ErrorCode::NoRoute, "gone");
        assert_eq!(&e.payload[..], b"\x00\x04gone");
        assert_eq!(e.error_parts(), Some((4, "gone")));
        let p = Frame::pong(0x0102030405060708);
        assert_eq!(&p.payload[..], &[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(p.pong_time(), Some(0x0102030405060708));
    }
}
