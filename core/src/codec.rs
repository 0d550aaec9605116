//! The binary form: `u32 length` (big-endian, body only) then the body.
//!
//! Decoding is two steps (`check`, then `parse_body`): `check` looks at the
//! length prefix only, so a length over `max_frame` is refused before a single
//! byte of the body is buffered. The decoder accepts any chunking of a TCP
//! stream: it returns `Ok(None)` until a whole frame is there.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use thiserror::Error;

use crate::frame::{ErrorCode, Flags, Frame, FrameType, MIN_BODY, VERSION};
use crate::name::MAX_NAME_LEN;

/// Why a binary frame was refused. Every variant but `UnknownType` loses the
/// framing: the connection must be closed after the ERROR is sent.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum DecodeError {
    #[error("frame length {len} exceeds max_frame {max}")]
    TooLarge { len: usize, max: usize },
    #[error("frame length {0} is below the 9-byte minimum")]
    TooShort(usize),
    #[error("protocol version {0} is not supported (expected 1)")]
    Version(u8),
    #[error("{field} length {len} exceeds 64")]
    NameTooLong { field: &'static str, len: usize },
    #[error("{field} runs past the end of the frame")]
    Truncated { field: &'static str },
    #[error("frame type {kind} is not supported")]
    UnknownType { kind: u8, seq: u32 },
}

impl DecodeError {
    /// The ERROR code this failure is reported with.
    pub fn code(&self) -> ErrorCode {
        match self {
            DecodeError::TooLarge { .. } => ErrorCode::TooLarge,
            DecodeError::UnknownType { .. } | DecodeError::Version(_) => ErrorCode::Unsupported,
            _ => ErrorCode::BadFrame,
        }
    }

    /// True when the stream can go on after this error (the body was whole
    /// and well-delimited, only its type is unknown).
    pub fn recoverable(&self) -> bool {
        matches!(self, DecodeError::UnknownType { .. })
    }

    /// The seq of the offending frame, when it could be read.
    pub fn seq(&self) -> u32 {
        match self {
            DecodeError::UnknownType { seq, .. } => *seq,
            _ => 0,
        }
    }
}

/// What `check` found at the front of a buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    /// `needed` more bytes are required before a frame can be parsed.
    Incomplete { needed: usize },
    /// A whole frame is there: `body_len` bytes after the 4-byte prefix.
    Complete { body_len: usize },
}

/// Looks at the length prefix of `buf` without consuming anything.
pub fn check(buf: &[u8], max_frame: usize) -> Result<Check, DecodeError> {
    if buf.len() < 4 {
        return Ok(Check::Incomplete {
            needed: 4 - buf.len(),
        });
    }
    let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if len > max_frame {
        return Err(DecodeError::TooLarge {
            len,
            max: max_frame,
        });
    }
    if len < MIN_BODY {
        return Err(DecodeError::TooShort(len));
    }
    if buf.len() < 4 + len {
        return Ok(Check::Incomplete {
            needed: 4 + len - buf.len(),
        });
    }
    Ok(Check::Complete { body_len: len })
}

/// Parses one body (no length prefix): a whole WebSocket binary message, or
/// what `check` delimited. Slices of `body` become the frame's fields.
pub fn parse_body(mut body: Bytes) -> Result<Frame, DecodeError> {
    if body.len() < MIN_BODY {
        return Err(DecodeError::TooShort(body.len()));
    }
    let version = body[0];
    if version != VERSION {
        return Err(DecodeError::Version(version));
    }
    let kind = body[1];
    let flags = Flags(body[2]);
    let seq = u32::from_be_bytes([body[3], body[4], body[5], body[6]]);
    let src_len = body[7] as usize;
    if src_len > MAX_NAME_LEN {
        return Err(DecodeError::NameTooLong {
            field: "src",
            len: src_len,
        });
    }
    body.advance(8);
    if body.len() < src_len + 1 {
        return Err(DecodeError::Truncated { field: "src" });
    }
    let src = body.split_to(src_len);
    let dst_len = body.get_u8() as usize;
    if dst_len > MAX_NAME_LEN {
        return Err(DecodeError::NameTooLong {
            field: "dst",
            len: dst_len,
        });
    }
    if body.len() < dst_len {
        return Err(DecodeError::Truncated { field: "dst" });
    }
    let dst = body.split_to(dst_len);
    let Some(kind) = FrameType::from_u8(kind) else {
        return Err(DecodeError::UnknownType { kind, seq });
    };
    Ok(Frame {
        kind,
        flags,
        seq,
        src,
        dst,
        payload: body,
    })
}

/// Incremental decoder of length-prefixed frames.
#[derive(Debug, Clone, Copy)]
pub struct Decoder {
    /// Largest body accepted; larger lengths fail before buffering.
    pub max_frame: usize,
}

impl Decoder {
    pub fn new(max_frame: usize) -> Decoder {
        Decoder { max_frame }
    }

    /// Takes the next whole frame off the front of `buf`, or `Ok(None)` when
    /// more bytes are needed. On a recoverable error the bad frame has been
    /// consumed; on any other the stream is unusable.
    pub fn decode(&self, buf: &mut BytesMut) -> Result<Option<Frame>, DecodeError> {
        match check(buf, self.max_frame)? {
            Check::Incomplete { .. } => Ok(None),
            Check::Complete { body_len } => {
                buf.advance(4);
                let body = buf.split_to(body_len).freeze();
                parse_body(body).map(Some)
            }
        }
    }
}

/// Appends the body of `frame` (no length prefix). Reserved flag bits are
/// cleared; names longer than 64 bytes are a caller bug and are cut to 64.
pub fn encode_body(frame: &Frame, out: &mut impl BufMut) {
    let src = &frame.src[..frame.src.len().min(MAX_NAME_LEN)];
    let dst = &frame.dst[..frame.dst.len().min(MAX_NAME_LEN)];
    out.put_u8(VERSION);
    out.put_u8(frame.kind as u8);
    out.put_u8(frame.flags.defined().0);
    out.put_u32(frame.seq);
    out.put_u8(src.len() as u8);
    out.put_slice(src);
    out.put_u8(dst.len() as u8);
    out.put_slice(dst);
    out.put_slice(&frame.payload);
}

/// Length of the body `encode_body` writes for `frame` (names cut to 64).
#[inline]
pub fn body_len(frame: &Frame) -> usize {
    MIN_BODY
        + frame.src.len().min(MAX_NAME_LEN)
        + frame.dst.len().min(MAX_NAME_LEN)
        + frame.payload.len()
}

/// Appends `frame` with its length prefix.
pub fn encode(frame: &Frame, out: &mut BytesMut) {
    let body = body_len(frame);
    out.reserve(4 + body);
    out.put_u32(body as u32);
    encode_body(frame, out);
}

/// The body of `frame` as its own buffer (a WebSocket binary message).
pub fn body_bytes(frame: &Frame) -> Bytes {
    let mut b = BytesMut::with_capacity(frame.body_len());
    encode_body(frame, &mut b);
    b.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The worked example of docs/protocol.md, byte by byte.
    #[test]
    fn documented_data_frame_bytes() {
        let mut f = Frame::data(&b"web-7f3a"[..], &b"ctl-42"[..], &b"on"[..]);
        f.seq = 5;
        f.flags = Flags(Flags::ACK_REQ);
        let mut out = BytesMut::new();
        encode(&f, &mut out);
        let expected: &[u8] = &[
            0x00, 0x00, 0x00, 0x19, // length 25
            0x01, // version
            0x03, // DATA
            0x01, // ACK_REQ
            0x00, 0x00, 0x00, 0x05, // seq 5
            0x08, b'w', b'e', b'b', b'-', b'7', b'f', b'3', b'a', // src
            0x06, b'c', b't', b'l', b'-', b'4', b'2', // dst
            b'o', b'n', // payload
        ];
        assert_eq!(&out[..], expected);
        let back = Decoder::new(65536).decode(&mut out).unwrap().unwrap();
        assert_eq!(back, f);
        assert!(out.is_empty());
    }

    #[test]
    fn too_large_is_refused_before_the_body_arrives() {
        let mut buf = BytesMut::from(&[0x00, 0x01, 0x00, 0x01][..]); // 65537, nothing else
        let err = Decoder::new(65536).decode(&mut buf).unwrap_err();
        assert_eq!(
            err,
            DecodeError::TooLarge {
                len: 65537,
                max: 65536
            }
        );
        assert_eq!(err.code(), ErrorCode::TooLarge);
        assert!(!err.recoverable());
    }

    #[test]
    fn max_frame_itself_is_accepted() {
        let f = Frame::data(Bytes::new(), &b"d"[..], vec![7u8; 100 - 10]);
        assert_eq!(f.body_len(), 100);
        let mut buf = BytesMut::new();
        encode(&f, &mut buf);
        assert_eq!(Decoder::new(100).decode(&mut buf).unwrap(), Some(f));
    }

    #[test]
    fn short_bodies_and_bad_layouts_are_errors() {
        let d = Decoder::new(65536);
        let mut b = BytesMut::from(&[0, 0, 0, 8, 1, 3, 0, 0, 0, 0, 0, 0][..]);
        assert_eq!(d.decode(&mut b), Err(DecodeError::TooShort(8)));
        // version 2
        let mut b = BytesMut::from(&[0, 0, 0, 9, 2, 3, 0, 0, 0, 0, 0, 0, 0][..]);
        assert_eq!(d.decode(&mut b), Err(DecodeError::Version(2)));
        // src_len 65
        let mut b = BytesMut::from(&[0, 0, 0, 9, 1, 3, 0, 0, 0, 0, 0, 65, 0][..]);
        assert_eq!(
            d.decode(&mut b),
            Err(DecodeError::NameTooLong {
                field: "src",
                len: 65
            })
        );
        // src_len 5 with 1 byte left
        let mut b = BytesMut::from(&[0, 0, 0, 9, 1, 3, 0, 0, 0, 0, 0, 5, 0][..]);
        assert_eq!(
            d.decode(&mut b),
            Err(DecodeError::Truncated { field: "src" })
        );
        // dst_len 3 with nothing after
        let mut b = BytesMut::from(&[0, 0, 0, 9, 1, 3, 0, 0, 0, 0, 0, 0, 3][..]);
        assert_eq!(
            d.decode(&mut b),
            Err(DecodeError::Truncated { field: "dst" })
        );
    }

    #[test]
    fn unknown_type_is_consumed_and_recoverable() {
        let d = Decoder::new(65536);
        let mut b = BytesMut::from(&[0, 0, 0, 9, 1, 99, 0, 0, 0, 0, 7, 0, 0][..]);
        let ping = Frame::new(FrameType::Ping);
        encode(&ping, &mut b);
        let err = d.decode(&mut b).unwrap_err();
        assert_eq!(err, DecodeError::UnknownType { kind: 99, seq: 7 });
        assert!(err.recoverable());
        assert_eq!(err.seq(), 7);
        assert_eq!(d.decode(&mut b).unwrap(), Some(ping));
    }

    #[test]
    fn reserved_flags_are_cleared_on_send_and_kept_on_receipt() {
        let mut f = Frame::new(FrameType::Ping);
        f.flags = Flags(0xf9);
        let body = body_bytes(&f);
        assert_eq!(body[2], 0x01);
        let mut raw = body.to_vec();
        raw[2] = 0xf8;
        let back = parse_body(Bytes::from(raw)).unwrap();
        assert_eq!(back.flags.defined(), Flags(0));
    }

    #[test]
    fn incomplete_reports_what_is_missing() {
        assert_eq!(check(&[0, 0], 100), Ok(Check::Incomplete { needed: 2 }));
        assert_eq!(
            check(&[0, 0, 0, 10, 1], 100),
            Ok(Check::Incomplete { needed: 9 })
        );
    }
}
