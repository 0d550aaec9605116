//! Client side of RFC 6455 over a byte stream: the upgrade request and its answer,
//! masked frames out, whole messages in. Frame headers are read and written with
//! tungstenite's frame codec; the socket and batching stay ours, so a browser's
//! messages due in one tick leave in one write like any other connection's.

use std::io::Cursor;

use base64::Engine as _;
use bytes::{Buf, BufMut, Bytes, BytesMut};
use tungstenite::protocol::frame::FrameHeader;
use tungstenite::protocol::frame::coding::{Control, Data, OpCode};

/// What can go wrong on the WebSocket layer.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum WsError {
    /// The server answered the upgrade with something other than 101.
    #[error("upgrade refused: {0}")]
    Refused(String),
    /// The answer's Sec-WebSocket-Accept does not match the key.
    #[error("upgrade answer has a wrong Sec-WebSocket-Accept")]
    BadAccept,
    /// The answer's headers are longer than the tool accepts.
    #[error("upgrade answer is longer than {0} bytes")]
    AnswerTooLong(usize),
    /// A frame header does not parse.
    #[error("bad frame: {0}")]
    BadFrame(String),
    /// A message is larger than the limit.
    #[error("message of {len} bytes exceeds {max}")]
    TooLarge { len: u64, max: usize },
}

/// Longest upgrade answer accepted.
pub const MAX_ANSWER: usize = 16 * 1024;

/// A fresh random `Sec-WebSocket-Key`.
pub fn new_key(rng: &mut Masker) -> String {
    let mut raw = [0u8; 16];
    raw[..8].copy_from_slice(&rng.next_u64().to_le_bytes());
    raw[8..].copy_from_slice(&rng.next_u64().to_le_bytes());
    base64::engine::general_purpose::STANDARD.encode(raw)
}

/// The HTTP/1.1 upgrade request for `path_and_query` on `host`.
pub fn request(host: &str, path_and_query: &str, key: &str) -> Vec<u8> {
    format!(
        "GET {path_and_query} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    .into_bytes()
}

/// Checks the upgrade answer at the front of `buf`: `Ok(None)` until the headers are
/// complete, then the number of bytes they take (what follows is already frames).
pub fn parse_answer(buf: &[u8], key: &str) -> Result<Option<usize>, WsError> {
    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        if buf.len() > MAX_ANSWER {
            return Err(WsError::AnswerTooLong(MAX_ANSWER));
        }
        return Ok(None);
    };
    let head = String::from_utf8_lossy(&buf[..end]);
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap_or("");
    let code = status.split_whitespace().nth(1).unwrap_or("");
    if code != "101" {
        return Err(WsError::Refused(status.to_string()));
    }
    let expected = tungstenite::handshake::derive_accept_key(key.as_bytes());
    let accept = lines.find_map(|l| {
        let (name, value) = l.split_once(':')?;
        name.trim()
            .eq_ignore_ascii_case("sec-websocket-accept")
            .then(|| value.trim().to_string())
    });
    if accept.as_deref() != Some(expected.as_str()) {
        return Err(WsError::BadAccept);
    }
    Ok(Some(end + 4))
}

/// Cheap per-connection source of frame masks and keys (xorshift64*). Masks only need
/// to be unpredictable to intermediaries, not cryptographic.
#[derive(Debug, Clone)]
pub struct Masker {
    state: u64,
}

impl Masker {
    /// Seeds from `seed` (any value; 0 is remapped).
    pub fn new(seed: u64) -> Self {
        Self {
            state: seed ^ 0x9E37_79B9_7F4A_7C15 | 1,
        }
    }

    /// Next pseudo-random u64.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.state;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.state = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Next 4-byte mask.
    pub fn mask(&mut self) -> [u8; 4] {
        (self.next_u64() as u32).to_le_bytes()
    }
}

/// Appends one final, masked client frame.
pub fn put_frame(out: &mut BytesMut, opcode: OpCode, payload: &[u8], mask: [u8; 4]) {
    let header = FrameHeader {
        is_final: true,
        rsv1: false,
        rsv2: false,
        rsv3: false,
        opcode,
        mask: Some(mask),
    };
    let len = payload.len() as u64;
    out.reserve(header.len(len) + payload.len());
    let mut w = out.writer();
    header
        .format(len, &mut w)
        .expect("writing a frame header into memory cannot fail");
    let out = w.into_inner();
    let start = out.len();
    out.put_slice(payload);
    apply_mask(&mut out[start..], mask);
}

fn apply_mask(data: &mut [u8], mask: [u8; 4]) {
    for (i, b) in data.iter_mut().enumerate() {
        *b ^= mask[i & 3];
    }
}

/// Opcode of a binary data message.
pub const BINARY: OpCode = OpCode::Data(Data::Binary);
/// Opcode of a text data message.
pub const TEXT: OpCode = OpCode::Data(Data::Text);
/// Opcode of a pong.
pub const PONG: OpCode = OpCode::Control(Control::Pong);
/// Opcode of a close.
pub const CLOSE: OpCode = OpCode::Control(Control::Close);

/// One whole message from the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// A text message (UTF-8 is the codec's concern).
    Text(Bytes),
    /// A binary message.
    Binary(Bytes),
    /// A ping the client must answer with a pong carrying the same bytes.
    Ping(Bytes),
    /// A pong.
    Pong,
    /// A close frame: the server is going away.
    Close,
}

/// Reassembles server frames (possibly fragmented) into messages.
#[derive(Debug)]
pub struct Deframer {
    /// Largest message accepted.
    max: usize,
    /// A fragmented data message being reassembled: its opcode and bytes so far.
    partial: Option<(Data, BytesMut)>,
}

impl Deframer {
    /// A deframer accepting messages up to `max` bytes.
    pub fn new(max: usize) -> Self {
        Self { max, partial: None }
    }

    /// Takes the next whole message off `buf`, or `Ok(None)` when more bytes are needed.
    pub fn next(&mut self, buf: &mut BytesMut) -> Result<Option<Message>, WsError> {
        loop {
            let mut cur = Cursor::new(&buf[..]);
            let Some((header, len)) =
                FrameHeader::parse(&mut cur).map_err(|e| WsError::BadFrame(e.to_string()))?
            else {
                return Ok(None);
            };
            if len > self.max as u64 {
                return Err(WsError::TooLarge { len, max: self.max });
            }
            let head = cur.position() as usize;
            let len = len as usize;
            if buf.len() < head + len {
                buf.reserve(head + len - buf.len());
                return Ok(None);
            }
            buf.advance(head);
            let mut payload = buf.split_to(len);
            if let Some(mask) = header.mask {
                apply_mask(&mut payload, mask);
            }
            match header.opcode {
                OpCode::Control(Control::Ping) => return Ok(Some(Message::Ping(payload.freeze()))),
                OpCode::Control(Control::Pong) => return Ok(Some(Message::Pong)),
                OpCode::Control(Control::Close) => return Ok(Some(Message::Close)),
                OpCode::Control(c) => {
                    return Err(WsError::BadFrame(format!("reserved control opcode {c:?}")));
                }
                OpCode::Data(Data::Continue) => {
                    let Some((kind, mut acc)) = self.partial.take() else {
                        return Err(WsError::BadFrame("continuation without a start".into()));
                    };
                    if acc.len() + payload.len() > self.max {
                        return Err(WsError::TooLarge {
                            len: (acc.len() + payload.len()) as u64,
                            max: self.max,
                        });
                    }
                    acc.extend_from_slice(&payload);
                    if header.is_final {
                        return Ok(Some(Self::message(kind, acc.freeze())));
                    }
                    self.partial = Some((kind, acc));
                }
                OpCode::Data(kind @ (Data::Text | Data::Binary)) => {
                    if self.partial.is_some() {
                        return Err(WsError::BadFrame(
                            "new message inside a fragmented one".into(),
                        ));
                    }
                    if header.is_final {
                        return Ok(Some(Self::message(kind, payload.freeze())));
                    }
                    self.partial = Some((kind, payload));
                }
                OpCode::Data(d) => {
                    return Err(WsError::BadFrame(format!("reserved data opcode {d:?}")));
                }
            }
        }
    }

    fn message(kind: Data, payload: Bytes) -> Message {
        match kind {
            Data::Text => Message::Text(payload),
            _ => Message::Binary(payload),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server_frame(fin: bool, opcode: OpCode, payload: &[u8]) -> Vec<u8> {
        let h = FrameHeader {
            is_final: fin,
            opcode,
            ..FrameHeader::default()
        };
        let mut v = Vec::new();
        h.format(payload.len() as u64, &mut v).unwrap();
        v.extend_from_slice(payload);
        v
    }

    #[test]
    fn answer_with_the_right_accept_is_taken() {
        // RFC 6455 section 1.3 example.
        let key = "dGhlIHNhbXBsZSBub25jZQ==";
        let ans = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n\x81\x00";
        assert_eq!(parse_answer(&ans[..20], key), Ok(None));
        assert_eq!(parse_answer(ans, key), Ok(Some(ans.len() - 2)));
        let wrong = b"HTTP/1.1 101 OK\r\nSec-WebSocket-Accept: nope\r\n\r\n";
        assert_eq!(parse_answer(wrong, key), Err(WsError::BadAccept));
        let refused = b"HTTP/1.1 404 Not Found\r\n\r\n";
        assert!(matches!(
            parse_answer(refused, key),
            Err(WsError::Refused(_))
        ));
    }

    #[test]
    fn client_frames_are_masked_and_parse_back() {
        let mut out = BytesMut::new();
        put_frame(&mut out, BINARY, b"hello", [1, 2, 3, 4]);
        assert_eq!(out[0], 0x82);
        assert_eq!(out[1], 0x80 | 5);
        assert_ne!(&out[6..], b"hello");
        let mut d = Deframer::new(1024);
        assert_eq!(
            d.next(&mut out).unwrap(),
            Some(Message::Binary(Bytes::from_static(b"hello")))
        );
        assert!(out.is_empty());
    }

    #[test]
    fn messages_reassemble_from_any_chunking_and_fragments() {
        let mut stream = Vec::new();
        stream.extend(server_frame(false, TEXT, b"{\"a\":"));
        stream.extend(server_frame(true, OpCode::Control(Control::Ping), b"p"));
        stream.extend(server_frame(true, OpCode::Data(Data::Continue), b"1}"));
        stream.extend(server_frame(true, BINARY, &[7u8; 300]));
        for chunk in [1, 2, 3, 7, 1000] {
            let mut d = Deframer::new(4096);
            let mut buf = BytesMut::new();
            let mut got = Vec::new();
            for c in stream.chunks(chunk) {
                buf.extend_from_slice(c);
                while let Some(m) = d.next(&mut buf).unwrap() {
                    got.push(m);
                }
            }
            assert_eq!(
                got,
                vec![
                    Message::Ping(Bytes::from_static(b"p")),
                    Message::Text(Bytes::from_static(b"{\"a\":1}")),
                    Message::Binary(Bytes::from(vec![7u8; 300])),
                ],
                "chunk {chunk}"
            );
        }
    }

    #[test]
    fn oversized_messages_are_refused() {
        let mut buf = BytesMut::from(&server_frame(true, BINARY, &[0u8; 100])[..]);
        let mut d = Deframer::new(50);
        assert!(matches!(d.next(&mut buf), Err(WsError::TooLarge { .. })));
    }

    #[test]
    fn masks_and_keys_vary() {
        let mut m = Masker::new(1);
        assert_ne!(m.mask(), m.mask());
        let k = new_key(&mut m);
        assert_eq!(
            base64::engine::general_purpose::STANDARD
                .decode(&k)
                .unwrap()
                .len(),
            16
        );
    }
}
