//! The relay protocol on the client side, built on relay-core's codec: binary frames
//! (u32 length prefix on TCP, one binary message on WebSocket) or JSON (one object per
//! line on TCP, one text message on WebSocket).

use bytes::{BufMut, BytesMut};
use relay_core::codec::{self, Decoder as FrameDecoder};
use relay_core::{ErrorCode, Flags, Frame, FrameType, json};

use super::ws::{self, Deframer, Masker};
use super::{Dest, Inbound, WireError};
use crate::payload::Stamp;
use crate::scenario::Form;

/// Encodes client frames in one form.
#[derive(Debug)]
pub struct RelayEncoder {
    /// Binary or JSON.
    form: Form,
    /// Present on WebSocket: source of frame masks.
    ws: Option<Masker>,
    /// Reused buffer for a WebSocket message body before it is framed.
    scratch: BytesMut,
    /// Reused buffer payloads are built in (split off as `Bytes` per frame).
    payload: BytesMut,
    /// The JSON payload template, if the run has one.
    template: Option<std::sync::Arc<crate::payload::Template>>,
    /// Random state and message count for the template.
    rng: u64,
    seq: u64,
}

impl RelayEncoder {
    /// An encoder for `form`, over WebSocket when `ws`.
    pub fn new(form: Form, ws: bool, seed: u64) -> Self {
        Self {
            form,
            ws: ws.then(|| Masker::new(seed)),
            scratch: BytesMut::new(),
            payload: BytesMut::new(),
            template: None,
            rng: seed | 1,
            seq: 0,
        }
    }

    /// Sends data messages as this JSON template instead of padded stamps.
    pub fn set_template(&mut self, t: std::sync::Arc<crate::payload::Template>) {
        self.template = Some(t);
    }

    fn frame(&mut self, out: &mut BytesMut, f: &Frame) {
        match (self.form, self.ws.as_mut()) {
            (Form::Binary, None) => codec::encode(f, out),
            (Form::Json, None) => {
                json::write_json(f, out);
                out.put_u8(b'\n');
            }
            (Form::Binary, Some(m)) => {
                self.scratch.clear();
                codec::encode_body(f, &mut self.scratch);
                ws::put_frame(out, ws::BINARY, &self.scratch, m.mask());
            }
            (Form::Json, Some(m)) => {
                self.scratch.clear();
                json::write_json(f, &mut self.scratch);
                ws::put_frame(out, ws::TEXT, &self.scratch, m.mask());
            }
        }
    }

    /// HELLO as `addr` with role and heartbeat in the JSON payload.
    pub fn hello(&mut self, out: &mut BytesMut, addr: &str, role: &str, heartbeat_s: u32) {
        let mut f = Frame::new(FrameType::Hello);
        f.src = bytes::Bytes::copy_from_slice(addr.as_bytes());
        f.payload = format!("{{\"role\":\"{role}\",\"heartbeat_s\":{heartbeat_s}}}").into();
        f.flags = Flags(Flags::JSON);
        self.frame(out, &f);
    }

    /// JOIN `group` with ACK_REQ and `seq`.
    pub fn join(&mut self, out: &mut BytesMut, group: &str, seq: u32) {
        let mut f = Frame::new(FrameType::Join);
        f.dst = bytes::Bytes::copy_from_slice(group.as_bytes());
        f.seq = seq;
        f.flags = Flags(Flags::ACK_REQ);
        self.frame(out, &f);
    }

    /// DATA to an address, or PUBLISH to a group, carrying `stamp`.
    pub fn data(&mut self, out: &mut BytesMut, dest: &Dest, stamp: Stamp, payload_len: usize) {
        let kind = if dest.group {
            FrameType::Publish
        } else {
            FrameType::Data
        };
        let mut f = Frame::new(kind);
        f.dst = dest.name.clone();
        if let Some(t) = &self.template {
            t.render(&mut self.payload, stamp, &mut self.rng, self.seq);
            self.seq += 1;
            f.flags = Flags(Flags::JSON);
        } else {
            match self.form {
                Form::Binary => stamp.put_binary(&mut self.payload, payload_len),
                Form::Json => {
                    stamp.put_json(&mut self.payload, payload_len);
                    f.flags = Flags(Flags::JSON);
                }
            }
        }
        f.payload = self.payload.split().freeze();
        self.frame(out, &f);
    }

    /// PING.
    pub fn ping(&mut self, out: &mut BytesMut) {
        self.frame(out, &Frame::new(FrameType::Ping));
    }

    /// BYE.
    pub fn bye(&mut self, out: &mut BytesMut) {
        self.frame(out, &Frame::new(FrameType::Bye));
    }

    /// WebSocket pong echoing a server ping.
    pub fn ws_pong(&mut self, out: &mut BytesMut, payload: &[u8]) {
        if let Some(m) = self.ws.as_mut() {
            ws::put_frame(out, ws::PONG, payload, m.mask());
        }
    }
}

/// Decodes server frames in either form.
#[derive(Debug)]
pub struct RelayDecoder {
    /// Form expected on TCP (JSON lines or length-prefixed binary).
    form: Form,
    /// Present on WebSocket: reassembles messages (text = JSON, binary = frame body).
    ws: Option<Deframer>,
    /// Length-prefixed frame decoder for TCP binary.
    frames: FrameDecoder,
    /// Longest frame or line accepted.
    max: usize,
}

impl RelayDecoder {
    /// A decoder for `form`, over WebSocket when `ws`, refusing frames over `max`.
    pub fn new(form: Form, ws: bool, max: usize) -> Self {
        Self {
            form,
            ws: ws.then(|| Deframer::new(max)),
            frames: FrameDecoder::new(max),
            max,
        }
    }

    /// Next event from `buf`.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Inbound>, WireError> {
        if let Some(d) = self.ws.as_mut() {
            return Ok(match d.next(buf)? {
                None => None,
                Some(ws::Message::Text(b)) => Some(from_json(&b)?),
                Some(ws::Message::Binary(b)) => Some(from_binary(codec::parse_body(b))?),
                Some(ws::Message::Ping(p)) => Some(Inbound::WsPing(p)),
                Some(ws::Message::Pong) => Some(Inbound::Other),
                Some(ws::Message::Close) => Some(Inbound::Closed),
            });
        }
        match self.form {
            Form::Binary => match self.frames.decode(buf) {
                Ok(None) => Ok(None),
                r => from_binary(r.map(|f| f.expect("checked above"))).map(Some),
            },
            Form::Json => {
                let Some(nl) = buf.iter().position(|&b| b == b'\n') else {
                    if buf.len() > self.max {
                        return Err(WireError::LineTooLong(self.max));
                    }
                    return Ok(None);
                };
                let line = buf.split_to(nl + 1);
                let text = line[..nl].trim_ascii();
                if text.is_empty() {
                    return Ok(Some(Inbound::Other));
                }
                from_json(text).map(Some)
            }
        }
    }
}

fn from_binary(r: Result<Frame, relay_core::DecodeError>) -> Result<Inbound, WireError> {
    match r {
        Ok(f) => Ok(from_frame(&f)),
        Err(e) if e.recoverable() => Ok(Inbound::Other),
        Err(e) => Err(e.into()),
    }
}

fn from_json(text: &[u8]) -> Result<Inbound, WireError> {
    match json::parse_json(text) {
        Ok(f) => Ok(from_frame(&f)),
        // A newer server's message type: not ours to fail on.
        Err(relay_core::JsonError::UnknownType(_)) => Ok(Inbound::Other),
        Err(e) => Err(e.into()),
    }
}

fn from_frame(f: &Frame) -> Inbound {
    match f.kind {
        FrameType::Welcome => Inbound::Welcome,
        FrameType::Data => Inbound::Data {
            stamp: Stamp::from_payload(&f.payload, f.flags.json()),
        },
        FrameType::Pong => Inbound::Pong,
        FrameType::Ack => Inbound::Ack { seq: f.seq },
        FrameType::Error => {
            let code = match f.error_parts() {
                Some((c, _)) => match ErrorCode::from_u16(c) {
                    Some(ec) => ec.name().to_string(),
                    None => format!("code_{c}"),
                },
                None => "unknown".to_string(),
            };
            match f.retry_after_ms() {
                Some(retry_after_ms) => Inbound::RetryLater {
                    code,
                    retry_after_ms,
                },
                None => Inbound::Error { code, seq: f.seq },
            }
        }
        FrameType::Bye => Inbound::Closed,
        _ => Inbound::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::WireKind;

    fn dest(name: &str, group: bool) -> Dest {
        WireKind::Relay {
            form: Form::Binary,
            ws: false,
        }
        .dest(name, group)
    }

    /// Decodes what a client encoder wrote, the way the relay would (relay-core).
    fn server_reads(form: Form, bytes: &mut BytesMut) -> Frame {
        match form {
            Form::Binary => FrameDecoder::new(65536).decode(bytes).unwrap().unwrap(),
            Form::Json => {
                let nl = bytes.iter().position(|&b| b == b'\n').unwrap();
                let line = bytes.split_to(nl + 1);
                json::parse_json(&line[..nl]).unwrap()
            }
        }
    }

    #[test]
    fn client_frames_are_what_the_protocol_says() {
        for form in [Form::Binary, Form::Json] {
            let mut e = RelayEncoder::new(form, false, 1);
            let mut out = BytesMut::new();
            e.hello(&mut out, "ctl-1", "controller", 30);
            let hello = server_reads(form, &mut out);
            assert_eq!(hello.kind, FrameType::Hello);
            assert_eq!(&hello.src[..], b"ctl-1");
            let p: serde_json::Value = serde_json::from_slice(&hello.payload).unwrap();
            assert_eq!(p, serde_json::json!({"role":"controller","heartbeat_s":30}));

            e.join(&mut out, "room", 9);
            let join = server_reads(form, &mut out);
            assert_eq!(
                (join.kind, join.seq, join.flags.ack_req()),
                (FrameType::Join, 9, true)
            );
            assert_eq!(&join.dst[..], b"room");

            let st = Stamp {
                intended_ns: 42,
                step: 3,
                lag_ns: 9,
            };
            e.data(&mut out, &dest("web-1", false), st, 64);
            let d = server_reads(form, &mut out);
            assert_eq!(d.kind, FrameType::Data);
            assert_eq!(&d.dst[..], b"web-1");
            assert_eq!(Stamp::from_payload(&d.payload, d.flags.json()), Some(st));
            assert_eq!(d.flags.json(), form == Form::Json);

            e.data(&mut out, &dest("g", true), st, 64);
            assert_eq!(server_reads(form, &mut out).kind, FrameType::Publish);
            e.ping(&mut out);
            assert_eq!(server_reads(form, &mut out).kind, FrameType::Ping);
            assert!(out.is_empty());
        }
    }

    #[test]
    fn server_frames_decode_to_events_in_both_forms() {
        let mut data = Frame::data(&b"ctl-1"[..], &b"web-1"[..], {
            let mut v = Vec::new();
            Stamp {
                intended_ns: 7,
                step: 1,
                lag_ns: 9,
            }
            .put_binary(&mut v, 32);
            v
        });
        data.flags = Flags(0);
        let frames = [
            Frame::error(4, ErrorCode::NoRoute, "offline"),
            Frame::ack(3),
            Frame::pong(1),
            data,
            Frame::new(FrameType::Bye),
        ];
        let expect = [
            Inbound::Error {
                code: "no_route".into(),
                seq: 4,
            },
            Inbound::Ack { seq: 3 },
            Inbound::Pong,
            Inbound::Data {
                stamp: Some(Stamp {
                    intended_ns: 7,
                    step: 1,
                    lag_ns: 9,
                }),
            },
            Inbound::Closed,
        ];
        for form in [Form::Binary, Form::Json] {
            let mut buf = BytesMut::new();
            for f in &frames {
                match form {
                    Form::Binary => codec::encode(f, &mut buf),
                    Form::Json => {
                        json::write_json(f, &mut buf);
                        buf.put_u8(b'\n');
                    }
                }
            }
            let mut d = RelayDecoder::new(form, false, 65536);
            let mut got = Vec::new();
            while let Some(ev) = d.decode(&mut buf).unwrap() {
                got.push(ev);
            }
            assert_eq!(got, expect, "{form:?}");
        }
    }

    #[test]
    fn websocket_carries_text_for_json_and_binary_for_frames() {
        for form in [Form::Binary, Form::Json] {
            let mut e = RelayEncoder::new(form, true, 5);
            let mut out = BytesMut::new();
            e.ping(&mut out);
            let mut de = Deframer::new(65536);
            let msg = de.next(&mut out).unwrap().unwrap();
            let f = match (form, msg) {
                (Form::Binary, ws::Message::Binary(b)) => codec::parse_body(b).unwrap(),
                (Form::Json, ws::Message::Text(t)) => json::parse_json(&t).unwrap(),
                (f, m) => panic!("{f:?} gave {m:?}"),
            };
            assert_eq!(f.kind, FrameType::Ping);
        }
    }

    #[test]
    fn a_broken_binary_stream_is_an_error() {
        let mut buf = BytesMut::from(&[0u8, 0, 0, 3, 1, 2, 3][..]);
        let mut d = RelayDecoder::new(Form::Binary, false, 65536);
        assert!(d.decode(&mut buf).is_err());
        let mut line = BytesMut::from(&b"not json\n"[..]);
        let mut d = RelayDecoder::new(Form::Json, false, 65536);
        assert!(d.decode(&mut line).is_err());
    }
}
