//! The JSON form: one JSON object per line on TCP (first byte `{`), one per
//! text message on WebSocket. Parsing yields the same [`Frame`] as the binary
//! form, so everything past the codec handles one representation.
//!
//! Payload crossing rules (PROTOCOL.md):
//! - JSON sender → any receiver: `"payload": <value>` becomes the compact JSON
//!   text of the value, with flag JSON set. `"payload_b64"` becomes the decoded
//!   bytes, flag JSON clear.
//! - Any sender → JSON receiver: flag JSON and valid JSON text give
//!   `"payload": <value>`; anything else gives `"payload_b64": "<base64>"`.

use std::borrow::Cow;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use bytes::{BufMut, Bytes, BytesMut};
use serde::Deserialize;
use serde_json::value::RawValue;
use thiserror::Error;

use crate::frame::{ErrorCode, Flags, Frame, FrameType};
use crate::name::MAX_NAME_LEN;

/// Why a JSON line was refused. The connection goes on after any of them.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum JsonError {
    #[error("invalid JSON: {0}")]
    Syntax(String),
    #[error("\"type\" is missing")]
    MissingType,
    #[error("unknown type {0:?}")]
    UnknownType(String),
    #[error("{0} is longer than 64 bytes")]
    NameTooLong(&'static str),
    #[error("payload_b64 is not valid base64")]
    BadBase64,
    #[error("both payload and payload_b64 are given")]
    TwoPayloads,
}

impl JsonError {
    /// The ERROR code this failure is reported with.
    pub fn code(&self) -> ErrorCode {
        match self {
            JsonError::UnknownType(_) => ErrorCode::Unsupported,
            JsonError::NameTooLong(_) => ErrorCode::BadAddress,
            _ => ErrorCode::BadFrame,
        }
    }
}

// String fields are `Cow`: borrowed from the line when they hold no escape,
// owned when they do (`"payload_b64":"AA\/8"` from encoders that escape `/`).
#[derive(Deserialize)]
struct Inbound<'a> {
    #[serde(rename = "type", borrow, default)]
    kind: Option<Cow<'a, str>>,
    #[serde(default)]
    seq: u32,
    #[serde(default)]
    ack: bool,
    #[serde(borrow, default)]
    addr: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    src: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    dst: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    group: Option<Cow<'a, str>>,
    /// `Some` for any value, `null` included (a plain `Option` would turn
    /// `"payload":null` into no payload at all).
    #[serde(borrow, default, deserialize_with = "present")]
    payload: Option<&'a RawValue>,
    #[serde(borrow, default)]
    payload_b64: Option<Cow<'a, str>>,
    // hello fields, gathered back into a hello payload object
    #[serde(borrow, default)]
    role: Option<&'a RawValue>,
    #[serde(borrow, default)]
    token: Option<&'a RawValue>,
    #[serde(borrow, default)]
    heartbeat_s: Option<&'a RawValue>,
    #[serde(borrow, default)]
    meta: Option<&'a RawValue>,
    // server-sent fields, accepted so a client library can parse what we send
    #[serde(borrow, default)]
    code: Option<&'a RawValue>,
    #[serde(borrow, default)]
    message: Option<&'a RawValue>,
    #[serde(default)]
    server_time_ms: Option<u64>,
    #[serde(default)]
    max_frame: Option<u64>,
    #[serde(borrow, default)]
    node: Option<&'a RawValue>,
}

fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&'de RawValue>::deserialize(d).map(Some)
}

fn name_field(v: Option<&Cow<'_, str>>, field: &'static str) -> Result<Bytes, JsonError> {
    let s = v.map(|c| c.as_ref()).unwrap_or("");
    if s.len() > MAX_NAME_LEN {
        return Err(JsonError::NameTooLong(field));
    }
    Ok(Bytes::copy_from_slice(s.as_bytes()))
}

/// Parses one JSON line or text message (surrounding whitespace allowed).
pub fn parse_json(line: &[u8]) -> Result<Frame, JsonError> {
    let m: Inbound<'_> =
        serde_json::from_slice(line).map_err(|e| JsonError::Syntax(e.to_string()))?;
    let kind_name = m.kind.as_deref().ok_or(JsonError::MissingType)?;
    let kind = FrameType::from_name(kind_name)
        .ok_or_else(|| JsonError::UnknownType(kind_name.to_owned()))?;
    let mut f = Frame::new(kind);
    f.seq = m.seq;
    f.flags = f.flags.with(Flags::ACK_REQ, m.ack);
    match kind {
        FrameType::Hello => {
            f.src = name_field(m.addr.as_ref().or(m.src.as_ref()), "addr")?;
            let mut obj = Vec::with_capacity(64);
            obj.push(b'{');
            for (k, v) in [
                ("role", m.role),
                ("token", m.token),
                ("heartbeat_s", m.heartbeat_s),
                ("meta", m.meta),
            ] {
                if let Some(v) = v {
                    if obj.len() > 1 {
                        obj.push(b',');
                    }
                    obj.extend_from_slice(b"\"");
                    obj.extend_from_slice(k.as_bytes());
                    obj.extend_from_slice(b"\":");
                    minify_into(v.get().as_bytes(), &mut obj);
                }
            }
            obj.push(b'}');
            f.payload = obj.into();
            f.flags = f.flags.with(Flags::JSON, true);
            return Ok(f);
        }
        FrameType::Welcome => {
            f.dst = name_field(m.addr.as_ref(), "addr")?;
            let mut obj = Vec::with_capacity(96);
            obj.push(b'{');
            let addr = serde_json::to_string(m.addr.as_deref().unwrap_or("")).unwrap_or_default();
            obj.extend_from_slice(format!("\"addr\":{addr}").as_bytes());
            if let Some(t) = m.server_time_ms {
                obj.extend_from_slice(format!(",\"server_time_ms\":{t}").as_bytes());
            }
            if let Some(h) = m.heartbeat_s {
                obj.extend_from_slice(b",\"heartbeat_s\":");
                minify_into(h.get().as_bytes(), &mut obj);
            }
            if let Some(mf) = m.max_frame {
                obj.extend_from_slice(format!(",\"max_frame\":{mf}").as_bytes());
            }
            if let Some(n) = m.node {
                obj.extend_from_slice(b",\"node\":");
                minify_into(n.get().as_bytes(), &mut obj);
            }
            obj.push(b'}');
            f.payload = obj.into();
            f.flags = f.flags.with(Flags::JSON, true);
            return Ok(f);
        }
        FrameType::Pong => {
            if m.server_time_ms.is_some() {
                f.payload = Bytes::copy_from_slice(&m.server_time_ms.unwrap_or(0).to_be_bytes());
            }
            return Ok(f);
        }
        FrameType::Error => {
            let code = match m.code {
                Some(raw) => match serde_json::from_str::<serde_json::Value>(raw.get()) {
                    Ok(serde_json::Value::String(s)) => {
                        ErrorCode::from_name(&s).map(|c| c as u16).unwrap_or(0)
                    }
                    Ok(serde_json::Value::Number(n)) => {
                        n.as_u64().unwrap_or(0).min(u16::MAX as u64) as u16
                    }
                    _ => 0,
                },
                None => 0,
            };
            let msg = m
                .message
                .and_then(|raw| serde_json::from_str::<String>(raw.get()).ok())
                .unwrap_or_default();
            let mut p = Vec::with_capacity(2 + msg.len());
            p.extend_from_slice(&code.to_be_bytes());
            p.extend_from_slice(msg.as_bytes());
            f.payload = p.into();
            return Ok(f);
        }
        _ => {}
    }
    f.src = name_field(m.src.as_ref(), "src")?;
    match kind {
        FrameType::Join | FrameType::Leave | FrameType::Publish => {
            f.dst = name_field(m.group.as_ref().or(m.dst.as_ref()), "group")?;
        }
        _ => {
            if let Some(g) = &m.group {
                f.dst = name_field(Some(g), "group")?;
                f.flags = f.flags.with(Flags::GROUP, true);
            } else {
                f.dst = name_field(m.dst.as_ref(), "dst")?;
            }
        }
    }
    match (m.payload, m.payload_b64.as_deref()) {
        (Some(_), Some(_)) => return Err(JsonError::TwoPayloads),
        (Some(raw), None) => {
            let mut v = Vec::with_capacity(raw.get().len());
            minify_into(raw.get().as_bytes(), &mut v);
            f.payload = v.into();
            f.flags = f.flags.with(Flags::JSON, true);
        }
        (None, Some(b)) => {
            f.payload = B64.decode(b).map_err(|_| JsonError::BadBase64)?.into();
        }
        (None, None) => {}
    }
    Ok(f)
}

/// Appends `json` with the whitespace between tokens removed. `json` must be
/// valid JSON text (as `RawValue` guarantees); strings are copied unchanged.
pub fn minify_into(json: &[u8], out: &mut Vec<u8>) {
    minify_runs(json, |run| out.extend_from_slice(run));
}

/// Feeds `emit` the runs of `json` that remain once the whitespace between
/// tokens is dropped. Inside strings nothing is dropped; valid JSON has no raw
/// newline there, so the result is always one line.
fn minify_runs(json: &[u8], mut emit: impl FnMut(&[u8])) {
    let mut in_str = false;
    let mut escaped = false;
    let mut start = 0;
    for (i, &b) in json.iter().enumerate() {
        if in_str {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_str = false;
            }
        } else if matches!(b, b' ' | b'\t' | b'\n' | b'\r') {
            if start < i {
                emit(&json[start..i]);
            }
            start = i + 1;
        } else if b == b'"' {
            in_str = true;
        }
    }
    if start < json.len() {
        emit(&json[start..]);
    }
}

/// The `seq` of a JSON line that failed to parse as a frame, when the line is
/// at least a JSON object with a valid `seq` (so its ERROR can carry it).
pub fn seq_of(line: &[u8]) -> u32 {
    #[derive(Deserialize)]
    struct SeqOnly {
        #[serde(default)]
        seq: u32,
    }
    serde_json::from_slice::<SeqOnly>(line)
        .map(|s| s.seq)
        .unwrap_or(0)
}

/// True when `payload` is a complete JSON value in UTF-8. (The UTF-8 check is
/// explicit: serde_json skips the bytes of strings it ignores unchecked, and a
/// JSON receiver must never get a line that is not UTF-8.)
pub fn is_json(payload: &[u8]) -> bool {
    match std::str::from_utf8(payload) {
        Ok(text) => serde_json::from_str::<serde::de::IgnoredAny>(text).is_ok(),
        Err(_) => false,
    }
}

fn put_name(out: &mut BytesMut, key: &str, name: &[u8]) {
    out.put_slice(b",\"");
    out.put_slice(key.as_bytes());
    out.put_slice(b"\":");
    // Names are validated to a JSON-safe alphabet, but a frame built in code
    // may hold anything: escape through serde in that case.
    if name.iter().all(|&b| crate::name::is_name_byte(b)) {
        out.put_u8(b'"');
        out.put_slice(name);
        out.put_u8(b'"');
    } else {
        let s = String::from_utf8_lossy(name);
        out.put_slice(serde_json::to_string(&*s).unwrap_or_default().as_bytes());
    }
}

/// Appends `,"key":value` without going through a formatter.
fn put_uint(out: &mut BytesMut, key: &str, mut v: u64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    out.put_slice(b",\"");
    out.put_slice(key.as_bytes());
    out.put_slice(b"\":");
    out.put_slice(&digits[at..]);
}

fn put_payload(out: &mut BytesMut, frame: &Frame) {
    if frame.payload.is_empty() && !frame.flags.json() {
        return;
    }
    if frame.flags.json() && is_json(&frame.payload) {
        out.put_slice(b",\"payload\":");
        // A binary sender's JSON may be pretty-printed: one line is required.
        if frame
            .payload
            .iter()
            .any(|&b| matches!(b, b' ' | b'\t' | b'\n' | b'\r'))
        {
            minify_runs(&frame.payload, |run| out.put_slice(run));
        } else {
            out.put_slice(&frame.payload);
        }
    } else {
        out.put_slice(b",\"payload_b64\":\"");
        let start = out.len();
        let n = base64::encoded_len(frame.payload.len(), true).unwrap_or(0);
        out.resize(start + n, 0);
        let written = B64
            .encode_slice(&frame.payload, &mut out[start..])
            .unwrap_or(0);
        out.truncate(start + written);
        out.put_u8(b'"');
    }
}

/// Splices the members of a JSON object payload after what is already written.
/// An object with no members (`{}`, `{ }`) adds nothing.
fn put_object_members(out: &mut BytesMut, payload: &[u8]) {
    let t = payload.trim_ascii();
    if t.len() > 2 && t[0] == b'{' && t[t.len() - 1] == b'}' && is_json(t) {
        let members = t[1..t.len() - 1].trim_ascii();
        if !members.is_empty() {
            out.put_u8(b',');
            out.put_slice(members);
        }
    }
}

/// Appends `frame` in the JSON form, without a line terminator.
pub fn write_json(frame: &Frame, out: &mut BytesMut) {
    out.reserve(48 + frame.src.len() + frame.dst.len() + frame.payload.len() * 4 / 3);
    out.put_slice(b"{\"type\":\"");
    out.put_slice(frame.kind.name().as_bytes());
    out.put_u8(b'"');
    match frame.kind {
        FrameType::Hello => {
            if !frame.src.is_empty() {
                put_name(out, "addr", &frame.src);
            }
            put_object_members(out, &frame.payload);
        }
        FrameType::Welcome => put_object_members(out, &frame.payload),
        FrameType::Pong => {
            if frame.seq != 0 {
                put_uint(out, "seq", frame.seq.into());
            }
            if let Some(t) = frame.pong_time() {
                put_uint(out, "server_time_ms", t);
            }
        }
        FrameType::Error => {
            if frame.seq != 0 {
                put_uint(out, "seq", frame.seq.into());
            }
            let (code, msg) = match frame.payload.len() {
                0 | 1 => (0u16, String::new()),
                _ => (
                    u16::from_be_bytes([frame.payload[0], frame.payload[1]]),
                    String::from_utf8_lossy(&frame.payload[2..]).into_owned(),
                ),
            };
            match ErrorCode::from_u16(code) {
                Some(c) => out.put_slice(format!(",\"code\":\"{}\"", c.name()).as_bytes()),
                None => put_uint(out, "code", code.into()),
            }
            out.put_slice(b",\"message\":");
            out.put_slice(serde_json::to_string(&msg).unwrap_or_default().as_bytes());
            out.put_u8(b'}');
            return;
        }
        _ => {
            if !frame.src.is_empty() {
                put_name(out, "src", &frame.src);
            }
            let group_key = matches!(
                frame.kind,
                FrameType::Join | FrameType::Leave | FrameType::Publish
            ) || frame.flags.group();
            if !frame.dst.is_empty() {
                put_name(out, if group_key { "group" } else { "dst" }, &frame.dst);
            }
            if frame.seq != 0 {
                put_uint(out, "seq", frame.seq.into());
            }
            if frame.flags.ack_req() {
                out.put_slice(b",\"ack\":true");
            }
            put_payload(out, frame);
        }
    }
    out.put_u8(b'}');
}

/// `frame` in the JSON form as a `String` (a WebSocket text message).
pub fn to_json_string(frame: &Frame) -> String {
    let mut b = BytesMut::new();
    write_json(frame, &mut b);
    // write_json emits only UTF-8: names are ASCII, strings come from serde.
    String::from_utf8(b.to_vec()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn v(s: &str) -> Value {
        serde_json::from_str(s).unwrap()
    }

    #[test]
    fn data_with_json_payload_becomes_compact_text_with_json_flag() {
        let f = parse_json(br#"{"type":"data","dst":"ctl-8266-0042","seq":5,"ack":true,"payload":{ "cmd" : "relay_on", "ch":2 }}"#).unwrap();
        assert_eq!(f.kind, FrameType::Data);
        assert_eq!(&f.dst[..], b"ctl-8266-0042");
        assert_eq!(f.seq, 5);
        assert!(f.flags.ack_req() && f.flags.json());
        assert_eq!(&f.payload[..], br#"{"cmd":"relay_on","ch":2}"#);
    }

    #[test]
    fn payload_b64_gives_raw_bytes() {
        let f = parse_json(br#"{"type":"data","dst":"a","payload_b64":"AAEC/w=="}"#).unwrap();
        assert_eq!(&f.payload[..], &[0, 1, 2, 255]);
        assert!(!f.flags.json());
        assert_eq!(
            parse_json(br#"{"type":"data","dst":"a","payload_b64":"!!"}"#),
            Err(JsonError::BadBase64)
        );
        assert_eq!(
            parse_json(br#"{"type":"data","dst":"a","payload":1,"payload_b64":""}"#),
            Err(JsonError::TwoPayloads)
        );
    }

    #[test]
    fn binary_payload_to_json_receiver() {
        let mut f = Frame::data(&b"ctl-1"[..], &b"web-1"[..], &[0xffu8, 0x00][..]);
        assert_eq!(
            v(&to_json_string(&f)),
            json!({"type":"data","src":"ctl-1","dst":"web-1","payload_b64":"/wA="})
        );
        // JSON flag but not JSON text: still base64
        f.flags = Flags(Flags::JSON);
        assert_eq!(v(&to_json_string(&f))["payload_b64"], json!("/wA="));
        // JSON flag and JSON text: the value
        f.payload = Bytes::from_static(br#"{"temp":81.5}"#);
        assert_eq!(v(&to_json_string(&f))["payload"], json!({"temp": 81.5}));
        // JSON text without the flag stays opaque
        f.flags = Flags(0);
        assert_eq!(
            v(&to_json_string(&f))["payload_b64"],
            json!(B64.encode(br#"{"temp":81.5}"#))
        );
    }

    #[test]
    fn group_delivery_names_the_group() {
        let mut f = Frame::data(&b"ctl-1"[..], &b"room-1"[..], &b"\"hello\""[..]);
        f.flags = Flags(Flags::GROUP | Flags::JSON);
        assert_eq!(
            v(&to_json_string(&f)),
            json!({"type":"data","src":"ctl-1","group":"room-1","payload":"hello"})
        );
        let back = parse_json(to_json_string(&f).as_bytes()).unwrap();
        assert_eq!(back, f);
    }

    #[test]
    fn every_example_line_of_the_protocol_parses() {
        let lines = [
            r#"{"type":"hello","addr":"web-7f3a","role":"browser","token":"..."}"#,
            r#"{"type":"welcome","addr":"web-7f3a","server_time_ms":1763800000000,"heartbeat_s":30,"max_frame":65536,"node":"n1"}"#,
            r#"{"type":"data","dst":"ctl-8266-0042","seq":5,"ack":true,"payload":{"cmd":"relay_on","ch":2}}"#,
            r#"{"type":"data","src":"web-7f3a","dst":"ctl-8266-0042","seq":5,"payload":{"cmd":"relay_on","ch":2}}"#,
            r#"{"type":"ack","seq":5}"#,
            r#"{"type":"error","seq":5,"code":"no_route","message":"ctl-8266-0042 is offline"}"#,
            r#"{"type":"ping"}"#,
            r#"{"type":"pong","server_time_ms":1763800000123}"#,
            r#"{"type":"join","group":"room-1"}"#,
            r#"{"type":"leave","group":"room-1"}"#,
            r#"{"type":"publish","group":"room-1","payload":"hello"}"#,
            r#"{"type":"bye"}"#,
        ];
        for line in lines {
            let f = parse_json(line.as_bytes()).unwrap_or_else(|e| panic!("{line}: {e}"));
            // Writing it back gives the same JSON value.
            assert_eq!(v(&to_json_string(&f)), v(line), "{line}");
        }
    }

    #[test]
    fn hello_fields_become_the_hello_payload() {
        let f = parse_json(br#"{"type":"hello","addr":"ctl-1","role":"controller","heartbeat_s":10,"meta":{"fw": "1.2"}}"#)
            .unwrap();
        assert_eq!(&f.src[..], b"ctl-1");
        assert_eq!(
            v(std::str::from_utf8(&f.payload).unwrap()),
            json!({"role":"controller","heartbeat_s":10,"meta":{"fw":"1.2"}})
        );
    }

    /// A hello or welcome whose payload is an object without members (with
    /// whitespace inside: `{\n\n}`) is written as valid JSON, not with a
    /// dangling comma (found by the `decode` fuzz target).
    #[test]
    fn an_object_payload_without_members_adds_nothing() {
        for payload in [&b"{}"[..], b"{ }", b"{\n\n}", b" {\t} "] {
            let mut hello = Frame::data(&b"ctl-1"[..], &b""[..], payload);
            hello.kind = FrameType::Hello;
            let s = to_json_string(&hello);
            assert_eq!(v(&s), json!({"type":"hello","addr":"ctl-1"}), "{s}");
            let mut welcome = hello.clone();
            welcome.kind = FrameType::Welcome;
            let s = to_json_string(&welcome);
            assert_eq!(v(&s), json!({"type":"welcome"}), "{s}");
        }
    }

    #[test]
    fn error_frames_both_ways() {
        let e = Frame::error(5, ErrorCode::NoRoute, "ctl \"x\" is offline");
        let s = to_json_string(&e);
        assert_eq!(
            v(&s),
            json!({"type":"error","seq":5,"code":"no_route","message":"ctl \"x\" is offline"})
        );
        assert_eq!(parse_json(s.as_bytes()).unwrap(), e);
    }

    #[test]
    fn bad_lines_are_typed_errors() {
        assert!(matches!(parse_json(b"{"), Err(JsonError::Syntax(_))));
        assert!(matches!(parse_json(b"[1,2]"), Err(JsonError::Syntax(_))));
        assert_eq!(parse_json(b"{}"), Err(JsonError::MissingType));
        assert_eq!(
            parse_json(br#"{"type":"teleport"}"#),
            Err(JsonError::UnknownType("teleport".into()))
        );
        assert_eq!(
            parse_json(br#"{"type":"data","seq":-1}"#)
                .map(|_| ())
                .unwrap_err()
                .code(),
            ErrorCode::BadFrame
        );
        let long = format!(r#"{{"type":"data","dst":"{}"}}"#, "a".repeat(65));
        assert_eq!(
            parse_json(long.as_bytes()),
            Err(JsonError::NameTooLong("dst"))
        );
    }

    #[test]
    fn json_flag_on_text_that_is_not_utf8_gives_base64() {
        let mut f = Frame::data(&b"a"[..], &b"b"[..], &b"\"pu\xb9lish\""[..]);
        f.flags = Flags(Flags::JSON);
        assert!(!is_json(&f.payload));
        let mut out = BytesMut::new();
        write_json(&f, &mut out);
        let s = std::str::from_utf8(&out).expect("JSON output is always UTF-8");
        assert_eq!(v(s)["payload_b64"], json!(B64.encode(&f.payload)));
    }

    #[test]
    fn a_null_payload_is_a_payload() {
        let f = parse_json(br#"{"type":"data","dst":"a","payload":null}"#).unwrap();
        assert_eq!(&f.payload[..], b"null");
        assert!(f.flags.json());
        assert_eq!(v(&to_json_string(&f))["payload"], Value::Null);
    }

    #[test]
    fn escaped_strings_are_understood() {
        // Encoders that escape `/` (PHP's json_encode) and names written with
        // \u escapes must parse like their plain forms.
        let f = parse_json(br#"{"type":"d\u0061ta","dst":"ctl\u002d1","payload_b64":"AAEC\/w=="}"#)
            .unwrap();
        assert_eq!(f.kind, FrameType::Data);
        assert_eq!(&f.dst[..], b"ctl-1");
        assert_eq!(&f.payload[..], &[0, 1, 2, 255]);
    }

    #[test]
    fn seq_is_recovered_from_refused_lines() {
        assert_eq!(seq_of(br#"{"type":"teleport","seq":12}"#), 12);
        assert_eq!(seq_of(br#"{"seq":3,"dst":7}"#), 3);
        assert_eq!(seq_of(b"{nope"), 0);
        assert_eq!(seq_of(br#"{"seq":"x"}"#), 0);
    }

    #[test]
    fn numbers_are_written_in_decimal() {
        for n in [0u64, 7, 10, 99, 4_294_967_295, u64::MAX] {
            let mut b = BytesMut::new();
            put_uint(&mut b, "k", n);
            assert_eq!(std::str::from_utf8(&b).unwrap(), format!(",\"k\":{n}"));
        }
    }

    #[test]
    fn pong_keeps_seq_and_time() {
        let mut p = Frame::pong(1_763_800_000_123);
        p.seq = 4;
        let s = to_json_string(&p);
        assert_eq!(
            v(&s),
            json!({"type":"pong","seq":4,"server_time_ms":1_763_800_000_123u64})
        );
        assert_eq!(parse_json(s.as_bytes()).unwrap(), p);
    }

    #[test]
    fn pretty_json_payloads_are_written_on_one_line() {
        let mut f = Frame::data(
            &b"a"[..],
            &b"b"[..],
            &b"{\n \"k\" : [1,\r\n 2],\"s\":\"x y\"\n}\n"[..],
        );
        f.flags = Flags(Flags::JSON);
        let s = to_json_string(&f);
        assert!(!s.contains('\n') && !s.contains('\r'), "{s}");
        assert_eq!(v(&s)["payload"], json!({"k":[1,2],"s":"x y"}));
    }

    #[test]
    fn minify_keeps_strings_intact() {
        let mut out = Vec::new();
        minify_into(br#" { "a b" : [ 1 , "x \" y" ] , "c" :null } "#, &mut out);
        assert_eq!(out, br#"{"a b":[1,"x \" y"],"c":null}"#);
    }
}
