//! The MQTT data representations (spec 1.5): integers, the variable byte
//! integer, UTF-8 strings, binary data, and the decode and encode errors.
//!
//! [`Reader`] reads them off a [`Bytes`] body with every length checked, so
//! no input can index out of bounds; strings and binary data come out as
//! slices of the body (no copy).

use bytes::{BufMut, Bytes};
use thiserror::Error;

use super::reason;

/// Largest value of a variable byte integer (four bytes).
pub const MAX_VARINT: u32 = 268_435_455;

/// Why a packet was refused. Each variant maps to the spec's reaction
/// ([`DecodeError::reason_code`]): an MQTT 5 peer gets DISCONNECT (or
/// CONNACK, before the connection is accepted) with that reason code; an
/// MQTT 3.1.1 peer is disconnected (a CONNACK return code exists only for
/// an unsupported protocol version). The stream cannot go on after any of
/// them.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The whole packet (fixed header included) is larger than the
    /// maximum packet size; found from the fixed header alone. 0x95.
    #[error("packet of {size} bytes exceeds the maximum packet size {max}")]
    TooLarge { size: usize, max: usize },
    /// A variable byte integer runs past four bytes. 0x81.
    #[error("variable byte integer longer than 4 bytes")]
    VarInt,
    /// The packet breaks the layout of the spec. 0x81.
    #[error("malformed packet: {0}")]
    Malformed(&'static str),
    /// The packet is well-formed but breaks a rule the spec calls a
    /// protocol error. 0x82.
    #[error("protocol error: {0}")]
    Protocol(&'static str),
    /// A topic name with a wildcard, a U+0000, or empty where it may not
    /// be. 0x90.
    #[error("invalid topic name: {0}")]
    TopicName(&'static str),
    /// CONNECT with a protocol level other than 4 (3.1.1) or 5. 0x84;
    /// MQTT 3.1.1 return code 0x01.
    #[error("unsupported protocol level {0}")]
    UnsupportedVersion(u8),
    /// CONNECT whose protocol name is not `MQTT`. 0x84; return code 0x01.
    #[error("protocol name is not MQTT")]
    ProtocolName,
}

impl DecodeError {
    /// The MQTT 5 reason code of the DISCONNECT (or CONNACK) this failure is
    /// answered with.
    pub fn reason_code(&self) -> u8 {
        match self {
            DecodeError::TooLarge { .. } => reason::PACKET_TOO_LARGE,
            DecodeError::VarInt | DecodeError::Malformed(_) => reason::MALFORMED_PACKET,
            DecodeError::Protocol(_) => reason::PROTOCOL_ERROR,
            DecodeError::TopicName(_) => reason::TOPIC_NAME_INVALID,
            DecodeError::UnsupportedVersion(_) | DecodeError::ProtocolName => {
                reason::UNSUPPORTED_PROTOCOL_VERSION
            }
        }
    }

    /// The MQTT 3.1.1 CONNACK return code owed for a refused CONNECT, when
    /// the spec gives one (an unacceptable protocol version); `None`: close
    /// without a CONNACK.
    pub fn v3_connack_code(&self) -> Option<u8> {
        match self {
            DecodeError::UnsupportedVersion(_) | DecodeError::ProtocolName => {
                Some(reason::V3_UNACCEPTABLE_PROTOCOL_VERSION)
            }
            _ => None,
        }
    }
}

/// A packet that cannot be written.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum EncodeError {
    /// The remaining length would pass 268,435,455 bytes.
    #[error("packet body of {0} bytes exceeds the MQTT limit")]
    TooLarge(usize),
    /// The packet type does not exist in this protocol version (AUTH in
    /// 3.1.1).
    #[error("{0} does not exist in MQTT 3.1.1")]
    Unsupported(&'static str),
}

/// Reads the data representations off a packet body.
#[derive(Debug)]
pub(crate) struct Reader {
    buf: Bytes,
    pos: usize,
}

const SHORT: DecodeError = DecodeError::Malformed("packet shorter than its fields");

impl Reader {
    pub(crate) fn new(buf: Bytes) -> Reader {
        Reader { buf, pos: 0 }
    }

    pub(crate) fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.remaining() == 0
    }

    pub(crate) fn u8(&mut self) -> Result<u8, DecodeError> {
        let b = *self.buf.get(self.pos).ok_or(SHORT)?;
        self.pos += 1;
        Ok(b)
    }

    pub(crate) fn u16(&mut self) -> Result<u16, DecodeError> {
        let s = self.take(2)?;
        Ok(u16::from_be_bytes([s[0], s[1]]))
    }

    pub(crate) fn u32(&mut self) -> Result<u32, DecodeError> {
        let s = self.take(4)?;
        Ok(u32::from_be_bytes([s[0], s[1], s[2], s[3]]))
    }

    /// A variable byte integer; more than four bytes is malformed.
    pub(crate) fn varint(&mut self) -> Result<u32, DecodeError> {
        match read_varint(&self.buf[self.pos..])? {
            Some((v, n)) => {
                self.pos += n;
                Ok(v)
            }
            None => Err(SHORT),
        }
    }

    fn take(&mut self, n: usize) -> Result<&[u8], DecodeError> {
        let end = self.pos.checked_add(n).ok_or(SHORT)?;
        let s = self.buf.get(self.pos..end).ok_or(SHORT)?;
        self.pos = end;
        Ok(s)
    }

    /// The next `n` bytes as a slice of the body.
    pub(crate) fn bytes(&mut self, n: usize) -> Result<Bytes, DecodeError> {
        if n > self.remaining() {
            return Err(SHORT);
        }
        let b = self.buf.slice(self.pos..self.pos + n);
        self.pos += n;
        Ok(b)
    }

    /// The rest of the body (a PUBLISH payload).
    pub(crate) fn rest(&mut self) -> Bytes {
        let b = self.buf.slice(self.pos..);
        self.pos = self.buf.len();
        b
    }

    /// Binary data: a two-byte length, then the bytes.
    pub(crate) fn binary(&mut self) -> Result<Bytes, DecodeError> {
        let n = self.u16()? as usize;
        self.bytes(n)
    }

    /// A UTF-8 encoded string: valid UTF-8 without U+0000 (spec 1.5.4).
    pub(crate) fn string(&mut self) -> Result<Bytes, DecodeError> {
        let s = self.binary()?;
        check_string(&s)?;
        Ok(s)
    }

    /// A sub-reader over the next `n` bytes (a property block).
    pub(crate) fn sub(&mut self, n: usize) -> Result<Reader, DecodeError> {
        Ok(Reader::new(self.bytes(n)?))
    }
}

/// Checks the rules of a UTF-8 encoded string: well-formed UTF-8 (no
/// surrogates) and no U+0000.
pub fn check_string(s: &[u8]) -> Result<(), DecodeError> {
    if std::str::from_utf8(s).is_err() {
        return Err(DecodeError::Malformed("string is not valid UTF-8"));
    }
    if s.contains(&0) {
        return Err(DecodeError::Malformed("string contains U+0000"));
    }
    Ok(())
}

/// Reads a variable byte integer from the front of `b`: `Ok(None)` when
/// `b` ends before it does, else the value and its length in bytes.
pub fn read_varint(b: &[u8]) -> Result<Option<(u32, usize)>, DecodeError> {
    let mut value: u32 = 0;
    for i in 0..4 {
        let Some(&byte) = b.get(i) else {
            return Ok(None);
        };
        value |= u32::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Ok(Some((value, i + 1)));
        }
    }
    Err(DecodeError::VarInt)
}

/// Bytes a variable byte integer takes (`v` at most [`MAX_VARINT`]).
pub fn varint_len(v: usize) -> usize {
    match v {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    }
}

pub(crate) fn put_varint(out: &mut impl BufMut, mut v: usize) {
    loop {
        let mut byte = (v & 0x7f) as u8;
        v >>= 7;
        if v > 0 {
            byte |= 0x80;
        }
        out.put_u8(byte);
        if v == 0 {
            return;
        }
    }
}

/// Writes binary data or a string: two-byte length, then the bytes (longer
/// than 65,535 is a caller bug and is cut).
pub(crate) fn put_binary(out: &mut impl BufMut, b: &[u8]) {
    let b = &b[..b.len().min(u16::MAX as usize)];
    out.put_u16(b.len() as u16);
    out.put_slice(b);
}

/// Length of [`put_binary`]'s output.
pub(crate) fn binary_len(b: &[u8]) -> usize {
    2 + b.len().min(u16::MAX as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varint_boundaries_round_trip() {
        for v in [
            0usize,
            127,
            128,
            16_383,
            16_384,
            2_097_151,
            2_097_152,
            268_435_455,
        ] {
            let mut b = Vec::new();
            put_varint(&mut b, v);
            assert_eq!(b.len(), varint_len(v));
            assert_eq!(read_varint(&b), Ok(Some((v as u32, b.len()))));
            // Cut short: incomplete, never an error.
            assert_eq!(read_varint(&b[..b.len() - 1]), Ok(None));
        }
    }

    #[test]
    fn five_byte_varint_is_refused() {
        assert_eq!(
            read_varint(&[0x80, 0x80, 0x80, 0x80, 0x01]),
            Err(DecodeError::VarInt)
        );
        assert_eq!(DecodeError::VarInt.reason_code(), reason::MALFORMED_PACKET);
    }

    #[test]
    fn strings_refuse_bad_utf8_surrogates_and_nul() {
        assert!(check_string("a/é/😀".as_bytes()).is_ok());
        assert!(check_string(&[0xc3]).is_err());
        // U+D800 encoded as if it were a scalar value (CESU style).
        assert!(check_string(&[0xed, 0xa0, 0x80]).is_err());
        assert!(check_string(b"a\0b").is_err());
        let mut r = Reader::new(Bytes::from_static(&[0, 3, b'a', 0, b'b']));
        assert_eq!(
            r.string(),
            Err(DecodeError::Malformed("string contains U+0000"))
        );
    }

    #[test]
    fn reader_never_reads_past_the_end() {
        let mut r = Reader::new(Bytes::from_static(&[0, 5, b'a']));
        assert_eq!(r.binary(), Err(SHORT));
        let mut r = Reader::new(Bytes::from_static(&[1]));
        assert_eq!(r.u16(), Err(SHORT));
        assert_eq!(r.u8(), Ok(1));
        assert_eq!(r.u8(), Err(SHORT));
        assert_eq!(r.u32(), Err(SHORT));
        assert_eq!(r.varint(), Err(SHORT));
        assert_eq!(r.bytes(usize::MAX), Err(SHORT));
    }
}
