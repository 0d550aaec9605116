//! The WebSocket frame layer (RFC 6455) for server connections, sans IO:
//! headers are parsed with tungstenite's `FrameHeader`, client payloads
//! unmasked, fragments reassembled up to a bound, control frames surfaced.
//! The HTTP upgrade itself is in `http`; every frame the relay writes is
//! written by `relay_core::ws`.

use std::io::Cursor;

use bytes::{Buf, Bytes, BytesMut};
use thiserror::Error;
use tungstenite::protocol::frame::FrameHeader;
use tungstenite::protocol::frame::coding::{Control, Data, OpCode};

/// One complete message or control frame from the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WsMsg {
    Text(Bytes),
    Binary(Bytes),
    Ping(Bytes),
    Pong,
    /// The client closes, with its status code if it gave one.
    Close(Option<u16>),
}

/// A violation of RFC 6455 by the client; the connection must close with
/// the given status code.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum WsError {
    #[error("client frames must be masked")]
    Unmasked,
    #[error("reserved bits or opcode used")]
    Reserved,
    #[error("control frame is fragmented or longer than 125 bytes")]
    BadControl,
    #[error("continuation without a message, or a new message inside one")]
    BadFragment,
    #[error("message of {0} bytes exceeds the limit")]
    TooBig(u64),
    #[error("text message is not UTF-8")]
    NotUtf8,
    #[error("malformed frame header")]
    Header,
    #[error("close frame with a 1-byte payload or a code RFC 6455 forbids")]
    BadClose,
    #[error("close reason is not UTF-8")]
    CloseNotUtf8,
}

impl WsError {
    /// The close status code for this error (1002 protocol, 1007 data, 1009 size).
    pub fn close_code(&self) -> u16 {
        match self {
            WsError::TooBig(_) => 1009,
            WsError::NotUtf8 | WsError::CloseNotUtf8 => 1007,
            _ => 1002,
        }
    }
}

/// Reassembles client messages. Holds a buffer only while a fragmented
/// message is in progress.
#[derive(Debug, Default)]
pub struct WsDecoder {
    partial: Option<(bool, BytesMut)>,
}

impl WsDecoder {
    /// Takes the next message off `buf`, or `Ok(None)` when more bytes are
    /// needed. `max_message` bounds a message (and each frame) in bytes.
    pub fn decode(
        &mut self,
        buf: &mut BytesMut,
        max_message: usize,
    ) -> Result<Option<WsMsg>, WsError> {
        loop {
            let mut cur = Cursor::new(&buf[..]);
            let (header, len) = match FrameHeader::parse(&mut cur) {
                Ok(Some(h)) => h,
                Ok(None) => return Ok(None),
                Err(_) => return Err(WsError::Header),
            };
            let head_len = cur.position() as usize;
            let Some(mask) = header.mask else {
                return Err(WsError::Unmasked);
            };
            if header.rsv1 || header.rsv2 || header.rsv3 {
                return Err(WsError::Reserved);
            }
            let is_control = matches!(header.opcode, OpCode::Control(_));
            if is_control && (!header.is_final || len > 125) {
                return Err(WsError::BadControl);
            }
            let so_far = self.partial.as_ref().map_or(0, |(_, b)| b.len()) as u64;
            if !is_control && len.saturating_add(so_far) > max_message as u64 {
                return Err(WsError::TooBig(len.saturating_add(so_far)));
            }
            let len = len as usize;
            if buf.len() < head_len + len {
                // Reserve once for the whole frame so reads append in place.
                buf.reserve(head_len + len - buf.len());
                return Ok(None);
            }
            buf.advance(head_len);
            let mut payload = buf.split_to(len);
            for (i, b) in payload.iter_mut().enumerate() {
                *b ^= mask[i & 3];
            }
            match header.opcode {
                OpCode::Control(Control::Ping) => return Ok(Some(WsMsg::Ping(payload.freeze()))),
                OpCode::Control(Control::Pong) => return Ok(Some(WsMsg::Pong)),
                OpCode::Control(Control::Close) => {
                    if payload.len() == 1 {
                        return Err(WsError::BadClose);
                    }
                    let code =
                        (payload.len() >= 2).then(|| u16::from_be_bytes([payload[0], payload[1]]));
                    if code.is_some_and(|c| !valid_close_code(c)) {
                        return Err(WsError::BadClose);
                    }
                    if payload.len() > 2 && std::str::from_utf8(&payload[2..]).is_err() {
                        return Err(WsError::CloseNotUtf8);
                    }
                    return Ok(Some(WsMsg::Close(code)));
                }
                OpCode::Control(Control::Reserved(_)) | OpCode::Data(Data::Reserved(_)) => {
                    return Err(WsError::Reserved);
                }
                OpCode::Data(Data::Continue) => {
                    let Some((_, acc)) = self.partial.as_mut() else {
                        return Err(WsError::BadFragment);
                    };
                    acc.extend_from_slice(&payload);
                    if header.is_final {
                        let (text, acc) = self.partial.take().expect("checked above");
                        return finish(text, acc.freeze()).map(Some);
                    }
                }
                OpCode::Data(d) => {
                    if self.partial.is_some() {
                        return Err(WsError::BadFragment);
                    }
                    let text = d == Data::Text;
                    if header.is_final {
                        return finish(text, payload.freeze()).map(Some);
                    }
                    self.partial = Some((text, payload));
                }
            }
        }
    }
}

/// Whether a peer may send close code `code` (RFC 6455 7.4): the defined
/// codes other than those never sent on the wire (1004, 1005, 1006, 1015),
/// and the registered and private ranges 3000..=4999.
pub fn valid_close_code(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

fn finish(text: bool, payload: Bytes) -> Result<WsMsg, WsError> {
    if text {
        if std::str::from_utf8(&payload).is_err() {
            return Err(WsError::NotUtf8);
        }
        Ok(WsMsg::Text(payload))
    } else {
        Ok(WsMsg::Binary(payload))
    }
}

pub use relay_core::ws::{close_frame, pong_frame};

/// Close status for a connection ending for `reason`: 1000 for BYE, 1001
/// at shutdown, otherwise 4000 + the protocol's error code, so a browser's
/// `onclose` can tell `replaced` (4007) from `idle_timeout` (4013).
pub fn close_code(reason: relay_core::CloseReason) -> u16 {
    use relay_core::{CloseReason as R, ErrorCode as E};
    match reason {
        R::Bye | R::PeerClosed => 1000,
        R::Shutdown => 1001,
        R::ProtocolError => 1002,
        R::IdleTimeout => 4000 + E::IdleTimeout as u16,
        R::HelloTimeout => 4000 + E::HelloRequired as u16,
        R::SlowConsumer => 4000 + E::SlowConsumer as u16,
        R::Replaced => 4000 + E::Replaced as u16,
        R::Kicked => 4000 + E::Forbidden as u16,
        R::Unauthorized => 4000 + E::Unauthorized as u16,
        // "Try Again Later" (RFC 6455 registry).
        R::Busy => 1013,
        // "Service Restart": an upgrade.
        R::GoingAway => 1012,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use relay_core::ws::{Opcode, put_client_frame};

    fn client_frame(fin: bool, opcode: Opcode, payload: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        put_client_frame(&mut v, opcode, fin, payload, [0x37, 0xfa, 0x21, 0x3d]);
        v
    }

    #[test]
    fn upgrade_and_busy_close_with_the_registered_codes() {
        use relay_core::CloseReason;
        assert_eq!(close_code(CloseReason::GoingAway), 1012);
        assert_eq!(close_code(CloseReason::Busy), 1013);
        assert!(valid_close_code(1012) && valid_close_code(1013));
    }

    #[test]
    fn rfc6455_masked_hello_example() {
        // RFC 6455 5.7: a masked text "Hello".
        let mut b = BytesMut::from(
            &[
                0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58,
            ][..],
        );
        let m = WsDecoder::default().decode(&mut b, 1024).unwrap();
        assert_eq!(m, Some(WsMsg::Text(Bytes::from_static(b"Hello"))));
        assert!(b.is_empty());
    }

    #[test]
    fn fragments_are_reassembled_and_control_frames_interleave() {
        let mut raw = client_frame(false, Opcode::Text, b"Hel");
        raw.extend(client_frame(true, Opcode::Ping, b"p"));
        raw.extend(client_frame(true, Opcode::Continuation, b"lo"));
        let mut d = WsDecoder::default();
        let mut b = BytesMut::new();
        let mut out = Vec::new();
        // Feed one byte at a time: any chunking works.
        for byte in raw {
            b.extend_from_slice(&[byte]);
            while let Some(m) = d.decode(&mut b, 1024).unwrap() {
                out.push(m);
            }
        }
        assert_eq!(
            out,
            vec![
                WsMsg::Ping(Bytes::from_static(b"p")),
                WsMsg::Text(Bytes::from_static(b"Hello"))
            ]
        );
    }

    #[test]
    fn protocol_violations_are_errors() {
        let mut d = WsDecoder::default();
        let mut unmasked = BytesMut::from(&[0x81, 0x01, b'a'][..]);
        assert_eq!(d.decode(&mut unmasked, 1024), Err(WsError::Unmasked));
        let mut big = BytesMut::from(&client_frame(true, Opcode::Binary, &[0u8; 300])[..]);
        assert_eq!(
            WsDecoder::default()
                .decode(&mut big, 100)
                .unwrap_err()
                .close_code(),
            1009
        );
        let mut cont = BytesMut::from(&client_frame(true, Opcode::Continuation, b"x")[..]);
        assert_eq!(
            WsDecoder::default().decode(&mut cont, 100),
            Err(WsError::BadFragment)
        );
        let mut bad_utf8 = BytesMut::from(&client_frame(true, Opcode::Text, &[0xff])[..]);
        assert_eq!(
            WsDecoder::default().decode(&mut bad_utf8, 100),
            Err(WsError::NotUtf8)
        );
        let mut long_ping = BytesMut::from(&client_frame(true, Opcode::Ping, &[0u8; 126])[..]);
        assert_eq!(
            WsDecoder::default().decode(&mut long_ping, 1000),
            Err(WsError::BadControl)
        );
    }

    #[test]
    fn close_frames_with_forbidden_codes_or_one_byte_are_protocol_errors() {
        for payload in [&[0x00u8, 0x05][..], &[0x03], &[0x03, 0xed], &[0x13, 0x88]] {
            let mut b = BytesMut::from(&client_frame(true, Opcode::Close, payload)[..]);
            let e = WsDecoder::default().decode(&mut b, 100).unwrap_err();
            assert_eq!(
                (e.clone(), e.close_code()),
                (WsError::BadClose, 1002),
                "{payload:?}"
            );
        }
        let mut b = BytesMut::from(&client_frame(true, Opcode::Close, &[0x03, 0xe8, 0xff])[..]);
        assert_eq!(
            WsDecoder::default()
                .decode(&mut b, 100)
                .unwrap_err()
                .close_code(),
            1007
        );
        for ok in [1000u16, 1001, 1011, 3000, 4999] {
            let mut b = BytesMut::from(&client_frame(true, Opcode::Close, &ok.to_be_bytes())[..]);
            assert_eq!(
                WsDecoder::default().decode(&mut b, 100).unwrap(),
                Some(WsMsg::Close(Some(ok)))
            );
        }
    }

    #[test]
    fn close_frames_carry_the_code() {
        let mut b = BytesMut::from(&client_frame(true, Opcode::Close, &[0x03, 0xe8])[..]);
        assert_eq!(
            WsDecoder::default().decode(&mut b, 100).unwrap(),
            Some(WsMsg::Close(Some(1000)))
        );
        assert_eq!(close_frame(4007, "replaced")[..4], [0x88, 10, 0x0f, 0xa7]);
    }
}

/// Client bytes come from anywhere: whatever arrives, in whatever pieces,
/// the decoder gives the messages a client framed, or an error, never a
/// panic, and the same results however the bytes are cut.
#[cfg(test)]
mod props {
    use super::*;
    use proptest::collection::vec;
    use proptest::prelude::*;
    use relay_core::pieces::decode_in_pieces;
    use relay_core::ws::{Opcode, put_client_frame};

    const MAX: usize = 512;

    fn decode_in(data: &[u8], pieces: &[usize]) -> Vec<Result<WsMsg, WsError>> {
        let mut d = WsDecoder::default();
        decode_in_pieces(data, pieces, |b| d.decode(b, MAX))
    }

    /// A message as a client sends it, and what the decoder gives for it.
    #[derive(Debug, Clone)]
    enum Sent {
        /// Text or binary, cut into fragments at these points, with a ping
        /// after the first fragment when `ping`.
        Data {
            text: bool,
            payload: Vec<u8>,
            cuts: Vec<prop::sample::Index>,
            ping: bool,
        },
        Ping(Vec<u8>),
        Pong,
        Close(Option<u16>),
    }

    fn sent() -> impl Strategy<Value = Sent> {
        prop_oneof![
            (
                any::<bool>(),
                vec(any::<u8>(), 0..300),
                vec(any::<prop::sample::Index>(), 0..4),
                any::<bool>()
            )
                .prop_map(|(text, payload, cuts, ping)| {
                    // Text must be UTF-8: keep the bytes' ASCII half.
                    let payload = if text {
                        payload.into_iter().map(|b| b & 0x7f).collect()
                    } else {
                        payload
                    };
                    Sent::Data {
                        text,
                        payload,
                        cuts,
                        ping,
                    }
                }),
            vec(any::<u8>(), 0..125).prop_map(Sent::Ping),
            Just(Sent::Pong),
            proptest::option::of(prop_oneof![1000..=1003u16, 1007..=1014u16, 3000..=4999u16])
                .prop_map(Sent::Close),
        ]
    }

    /// The bytes of `msgs` as a client frames them, and the messages the
    /// decoder should give.
    fn frame_all(msgs: &[Sent], mask: [u8; 4]) -> (Vec<u8>, Vec<WsMsg>) {
        let mut out = Vec::new();
        let mut want = Vec::new();
        for m in msgs {
            match m {
                Sent::Data {
                    text,
                    payload,
                    cuts,
                    ping,
                } => {
                    let mut at: Vec<usize> =
                        cuts.iter().map(|c| c.index(payload.len() + 1)).collect();
                    at.push(0);
                    at.push(payload.len());
                    at.sort_unstable();
                    at.dedup();
                    let pieces: Vec<&[u8]> = if at.len() < 2 {
                        vec![&payload[..]]
                    } else {
                        at.windows(2).map(|w| &payload[w[0]..w[1]]).collect()
                    };
                    for (i, p) in pieces.iter().enumerate() {
                        let op = match (i, text) {
                            (0, true) => Opcode::Text,
                            (0, false) => Opcode::Binary,
                            _ => Opcode::Continuation,
                        };
                        put_client_frame(&mut out, op, i + 1 == pieces.len(), p, mask);
                        if i == 0 && *ping && pieces.len() > 1 {
                            put_client_frame(&mut out, Opcode::Ping, true, b"p", mask);
                            want.push(WsMsg::Ping(Bytes::from_static(b"p")));
                        }
                    }
                    let p = Bytes::copy_from_slice(payload);
                    want.push(if *text {
                        WsMsg::Text(p)
                    } else {
                        WsMsg::Binary(p)
                    });
                }
                Sent::Ping(p) => {
                    put_client_frame(&mut out, Opcode::Ping, true, p, mask);
                    want.push(WsMsg::Ping(Bytes::copy_from_slice(p)));
                }
                Sent::Pong => {
                    put_client_frame(&mut out, Opcode::Pong, true, b"", mask);
                    want.push(WsMsg::Pong);
                }
                Sent::Close(code) => {
                    let body = code.map(|c| c.to_be_bytes().to_vec()).unwrap_or_default();
                    put_client_frame(&mut out, Opcode::Close, true, &body, mask);
                    want.push(WsMsg::Close(*code));
                }
            }
        }
        (out, want)
    }

    proptest! {
        #[test]
        fn framed_messages_decode_as_sent_in_any_pieces(
            msgs in vec(sent(), 0..8),
            mask in any::<[u8; 4]>(),
            pieces in vec(1..64usize, 1..8),
        ) {
            let (bytes, want) = frame_all(&msgs, mask);
            let got: Vec<WsMsg> = decode_in(&bytes, &pieces)
                .into_iter()
                .collect::<Result<_, _>>()
                .expect("a well-framed stream decodes");
            prop_assert_eq!(got, want);
        }

        #[test]
        fn any_bytes_give_the_same_results_in_any_pieces(
            data in vec(any::<u8>(), 0..600),
            pieces in vec(1..64usize, 1..8),
        ) {
            let whole = decode_in(&data, &[data.len().max(1)]);
            let cut = decode_in(&data, &pieces);
            prop_assert_eq!(&cut, &whole);
            for r in &whole {
                match r {
                    Ok(WsMsg::Text(t)) => {
                        prop_assert!(std::str::from_utf8(t).is_ok());
                        prop_assert!(t.len() <= MAX);
                    }
                    Ok(WsMsg::Binary(b)) => prop_assert!(b.len() <= MAX),
                    Ok(WsMsg::Ping(p)) => prop_assert!(p.len() <= 125),
                    _ => {}
                }
            }
        }
    }
}
