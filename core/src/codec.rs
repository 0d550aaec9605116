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
/// what `check` delimited. Slices of `body` become the frame's fields (no
/// copy: two reference-count increments at most, none for empty names).
pub fn parse_body(mut body: Bytes) -> Result<Frame, DecodeError> {
    let b: &[u8] = &body;
    let len = b.len();
    let Some(&[version, kind, flags, s0, s1, s2, s3, src_len]) = b.first_chunk::<8>() else {
        return Err(DecodeError::TooShort(len));
    };
    if len < MIN_BODY {
        return Err(DecodeError::TooShort(len));
    }
    if version != VERSION {
        return Err(DecodeError::Version(version));
    }
    let flags = Flags(flags);
    let seq = u32::from_be_bytes([s0, s1, s2, s3]);
    let src_len = src_len as usize;
    if src_len > MAX_NAME_LEN {
        return Err(DecodeError::NameTooLong {
            field: "src",
            len: src_len,
        });
    }
    // 8 fixed bytes, src, then the dst_len byte must be there.
    let dst_at = 8 + src_len;
    if len < dst_at + 1 {
        return Err(DecodeError::Truncated { field: "src" });
    }
    let dst_len = b[dst_at] as usize;
    if dst_len > MAX_NAME_LEN {
        return Err(DecodeError::NameTooLong {
            field: "dst",
            len: dst_len,
        });
    }
    let payload_at = dst_at + 1 + dst_len;
    if len < payload_at {
        return Err(DecodeError::Truncated { field: "dst" });
    }
    let Some(kind) = FrameType::from_u8(kind) else {
        return Err(DecodeError::UnknownType { kind, seq });
    };
    let src = name_slice(&body, 8, src_len);
    let dst = name_slice(&body, dst_at + 1, dst_len);
    body.advance(payload_at);
    Ok(Frame {
        kind,
        flags,
        seq,
        src,
        dst,
        payload: body,
    })
}

#[inline]
fn name_slice(body: &Bytes, at: usize, len: usize) -> Bytes {
    if len == 0 {
        Bytes::new()
    } else {
        body.slice(at..at + len)
    }
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
                let mut body = buf.split_to(4 + body_len).freeze();
                body.advance(4);
                parse_body(body).map(Some)
            }
        }
    }
}

/// The names as written: longer than 64 bytes is a caller bug, cut to 64.
#[inline]
fn names(frame: &Frame) -> (&[u8], &[u8]) {
    (
        &frame.src[..frame.src.len().min(MAX_NAME_LEN)],
        &frame.dst[..frame.dst.len().min(MAX_NAME_LEN)],
    )
}

/// The 8 fixed bytes before src: version, type, flags (reserved bits
/// cleared), seq, src_len.
#[inline]
fn fixed_head(frame: &Frame, src_len: usize) -> [u8; 8] {
    let s = frame.seq.to_be_bytes();
    [
        VERSION,
        frame.kind as u8,
        frame.flags.defined().0,
        s[0],
        s[1],
        s[2],
        s[3],
        src_len as u8,
    ]
}

/// Appends the body of `frame` (no length prefix). Reserved flag bits are
/// cleared; names longer than 64 bytes are a caller bug and are cut to 64.
pub fn encode_body(frame: &Frame, out: &mut impl BufMut) {
    let (src, dst) = names(frame);
    out.put_slice(&fixed_head(frame, src.len()));
    out.put_slice(src);
    out.put_u8(dst.len() as u8);
    out.put_slice(dst);
    out.put_slice(&frame.payload);
}

/// Length of the body `encode_body` writes for `frame` (names cut to 64).
#[inline]
pub fn body_len(frame: &Frame) -> usize {
    let (src, dst) = names(frame);
    MIN_BODY + src.len() + dst.len() + frame.payload.len()
}

/// Appends `frame` with its length prefix. The frame is written in place
/// into one grown region of `out`, not field by field through `BufMut`.
pub fn encode(frame: &Frame, out: &mut BytesMut) {
    let (src, dst) = names(frame);
    let body = MIN_BODY + src.len() + dst.len() + frame.payload.len();
    let start = out.len();
    out.resize(start + 4 + body, 0);
    let b = &mut out[start..];
    b[..4].copy_from_slice(&(body as u32).to_be_bytes());
    b[4..12].copy_from_slice(&fixed_head(frame, src.len()));
    let (s, rest) = b[12..].split_at_mut(src.len());
    s.copy_from_slice(src);
    rest[0] = dst.len() as u8;
    let (d, p) = rest[1..].split_at_mut(dst.len());
    d.copy_from_slice(dst);
    p.copy_from_slice(&frame.payload);
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
