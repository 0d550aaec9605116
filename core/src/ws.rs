//! Writing WebSocket frames (RFC 6455 section 5.2), sans IO.
//!
//! Every WebSocket frame the relay writes goes through here: the messages a
//! [`Connection`](crate::Connection) queues for a browser, and the close and
//! pong frames the runtime answers with. Server frames are final and unmasked;
//! [`put_client_frame`] writes the masked form a client sends, for tools and
//! tests that play the client. Reading client frames is the runtime's job.

use bytes::BytesMut;

/// A frame's opcode (RFC 6455 section 5.2, "Opcode").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Opcode {
    /// A later fragment of a message.
    Continuation = 0x0,
    /// A UTF-8 text message (the JSON form).
    Text = 0x1,
    /// A binary message (one binary frame body).
    Binary = 0x2,
    /// A status code and a reason; the end of the connection.
    Close = 0x8,
    Ping = 0x9,
    Pong = 0xA,
}

impl Opcode {
    pub const ALL: [Opcode; 6] = [
        Opcode::Continuation,
        Opcode::Text,
        Opcode::Binary,
        Opcode::Close,
        Opcode::Ping,
        Opcode::Pong,
    ];

    /// The opcode in the low four bits of a frame's first byte; `None` for
    /// the reserved ones.
    pub fn from_u8(b: u8) -> Option<Opcode> {
        Opcode::ALL.into_iter().find(|o| *o as u8 == b & 0x0f)
    }
}

/// Longest server frame header: 2 bytes and a 64-bit length.
pub const MAX_HEADER: usize = 10;

/// Longest reason a close frame carries: a control frame's payload is at
/// most 125 bytes, 2 of them the status code.
pub const MAX_CLOSE_REASON: usize = 123;

/// Writes the header of a final, unmasked (server to client) frame whose
/// payload is `len` bytes.
pub fn put_header(opcode: Opcode, len: usize, out: &mut BytesMut) {
    let (h, n) = header(opcode, len);
    out.extend_from_slice(&h[..n]);
}

/// The header of [`put_header`] in a fixed array, with its length.
fn header(opcode: Opcode, len: usize) -> ([u8; MAX_HEADER], usize) {
    let mut h = [0u8; MAX_HEADER];
    h[0] = 0x80 | opcode as u8;
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

/// Writes a final, unmasked frame whose payload `write` appends to `out`,
/// for a payload whose length is known only once it is written (JSON text):
/// room is left for the longest header, then the gap is closed.
pub fn put_frame_with(opcode: Opcode, out: &mut BytesMut, write: impl FnOnce(&mut BytesMut)) {
    let start = out.len();
    out.resize(start + MAX_HEADER, 0);
    write(out);
    let len = out.len() - start - MAX_HEADER;
    let (h, n) = header(opcode, len);
    let gap = MAX_HEADER - n;
    out[start + gap..start + MAX_HEADER].copy_from_slice(&h[..n]);
    if gap > 0 {
        out.copy_within(start + gap.., start);
        out.truncate(out.len() - gap);
    }
}

/// A server close frame with status `code` and `reason`, cut to
/// [`MAX_CLOSE_REASON`] bytes.
pub fn close_frame(code: u16, reason: &str) -> Vec<u8> {
    let reason = &reason.as_bytes()[..reason.len().min(MAX_CLOSE_REASON)];
    let mut out = BytesMut::new();
    put_header(Opcode::Close, 2 + reason.len(), &mut out);
    out.extend_from_slice(&code.to_be_bytes());
    out.extend_from_slice(reason);
    out.to_vec()
}

/// A server pong echoing `payload`.
pub fn pong_frame(payload: &[u8]) -> Vec<u8> {
    let mut out = BytesMut::new();
    put_header(Opcode::Pong, payload.len(), &mut out);
    out.extend_from_slice(payload);
    out.to_vec()
}

/// Appends a client-to-server frame: masked with `mask`, final when `fin`.
pub fn put_client_frame(
    out: &mut Vec<u8>,
    opcode: Opcode,
    fin: bool,
    payload: &[u8],
    mask: [u8; 4],
) {
    let (mut h, n) = header(opcode, payload.len());
    if !fin {
        h[0] &= 0x7f;
    }
    h[1] |= 0x80;
    out.extend_from_slice(&h[..n]);
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i & 3]));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_matches_rfc6455_examples() {
        // RFC 6455 section 5.7: unmasked "Hello".
        let mut h = BytesMut::new();
        put_header(Opcode::Text, 5, &mut h);
        assert_eq!(&h[..], &[0x81, 0x05]);
        // 256 bytes binary: 0x82 0x7E 0x0100.
        let mut h = BytesMut::new();
        put_header(Opcode::Binary, 256, &mut h);
        assert_eq!(&h[..], &[0x82, 0x7e, 0x01, 0x00]);
        // 64 KiB binary: 0x82 0x7F 0x0000000000010000.
        let mut h = BytesMut::new();
        put_header(Opcode::Binary, 65536, &mut h);
        assert_eq!(&h[..], &[0x82, 0x7f, 0, 0, 0, 0, 0, 1, 0, 0]);
        // Edges of the 7-bit and 16-bit forms.
        let mut h = BytesMut::new();
        put_header(Opcode::Text, 125, &mut h);
        put_header(Opcode::Text, 126, &mut h);
        put_header(Opcode::Text, 65535, &mut h);
        assert_eq!(
            &h[..],
            &[0x81, 125, 0x81, 126, 0, 126, 0x81, 126, 0xff, 0xff]
        );
    }

    #[test]
    fn a_frame_written_before_its_length_is_known_has_the_shortest_header() {
        for n in [0usize, 125, 126, 65535, 65536] {
            let mut out = BytesMut::from(&b"before"[..]);
            put_frame_with(Opcode::Text, &mut out, |o| o.resize(o.len() + n, b'z'));
            let mut want = BytesMut::from(&b"before"[..]);
            put_header(Opcode::Text, n, &mut want);
            want.resize(want.len() + n, b'z');
            assert_eq!(out, want, "{n}");
        }
    }

    #[test]
    fn client_frames_match_rfc6455_examples() {
        // RFC 6455 section 5.7: a masked text "Hello", and a fragment start.
        let mask = [0x37, 0xfa, 0x21, 0x3d];
        let mut v = Vec::new();
        put_client_frame(&mut v, Opcode::Text, true, b"Hello", mask);
        assert_eq!(
            v,
            [
                0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58
            ]
        );
        let mut v = Vec::new();
        put_client_frame(&mut v, Opcode::Text, false, b"Hel", mask);
        assert_eq!(v[..2], [0x01, 0x83]);
        let mut v = Vec::new();
        put_client_frame(&mut v, Opcode::Binary, true, &[0; 300], mask);
        assert_eq!(v[..4], [0x82, 0x80 | 126, 0x01, 0x2c]);
    }

    #[test]
    fn control_frames() {
        assert_eq!(close_frame(4007, "replaced")[..4], [0x88, 10, 0x0f, 0xa7]);
        let long = close_frame(1000, &"r".repeat(200));
        assert_eq!((long[1], long.len()), (125, 127));
        assert_eq!(pong_frame(b"p"), [0x8a, 1, b'p']);
        assert_eq!(Opcode::from_u8(0x8a), Some(Opcode::Pong));
        assert_eq!(Opcode::from_u8(0x83), None);
    }
}
