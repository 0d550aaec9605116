//! Reading a hello: the fields of a HELLO payload, and the hello a browser
//! may put in its WebSocket URL (`/ws?addr=..&role=..&token=..`). Pure
//! parsing; the connection decides what a valid hello is worth
//! (authentication, the pending answer).

use bytes::Bytes;
use percent_encoding::percent_decode_str;

use super::{ConnConfig, Role};
use crate::frame::{Flags, Frame, FrameType};

/// A HELLO that passed validation and authentication.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// Wanted address; empty asks the server to assign one.
    pub addr: Bytes,
    /// Asked for in the hello, else the transport's default.
    pub role: Role,
    /// Heartbeat the client will keep, clamped to the configured bounds.
    pub heartbeat_s: u32,
    /// Compact JSON object kept with the session (`{}` when absent).
    pub meta: Bytes,
    /// The hello's seq, for its ACK or ERROR.
    pub seq: u32,
    /// The hello asked for an ACK: `accept` sends it after WELCOME.
    pub ack_req: bool,
    /// The hello carried the service (HTTP API) token, or the relay has no
    /// authentication at all: the connection may watch any address and take
    /// the `service` role.
    pub privileged: bool,
    /// How the client proved who it is (for the access rules).
    pub auth: crate::acl::Auth,
}

/// The fields of a HELLO payload, each checked for its type.
pub(super) struct HelloFields {
    pub(super) role: Option<Role>,
    pub(super) token: Option<String>,
    pub(super) heartbeat_s: Option<u32>,
    /// Compact JSON text, `{}` when absent.
    pub(super) meta: Bytes,
}

/// Reads a HELLO payload: empty, or a JSON object with optional `role`,
/// `token`, `heartbeat_s` and `meta` (at most `max_meta_bytes` as text).
/// The error is the ERROR message for the client.
pub(super) fn parse_payload(payload: &[u8], cfg: &ConnConfig) -> Result<HelloFields, String> {
    let mut h = HelloFields {
        role: None,
        token: None,
        heartbeat_s: None,
        meta: Bytes::from_static(b"{}"),
    };
    if payload.trim_ascii().is_empty() {
        return Ok(h);
    }
    let v: serde_json::Value =
        serde_json::from_slice(payload).map_err(|e| format!("hello payload: {e}"))?;
    let serde_json::Value::Object(map) = v else {
        return Err("hello payload must be a JSON object".into());
    };
    if let Some(r) = map.get("role") {
        let name = r.as_str().ok_or("role must be a string")?;
        h.role = Some(Role::from_name(name).ok_or_else(|| format!("unknown role {name:?}"))?);
    }
    if let Some(t) = map.get("token") {
        h.token = Some(t.as_str().ok_or("token must be a string")?.to_owned());
    }
    if let Some(hb) = map.get("heartbeat_s") {
        let n = hb
            .as_u64()
            .ok_or("heartbeat_s must be a positive integer")?;
        h.heartbeat_s = Some(n.min(u32::MAX as u64) as u32);
    }
    if let Some(m) = map.get("meta") {
        if !m.is_object() {
            return Err("meta must be a JSON object".into());
        }
        let text = m.to_string();
        if text.len() > cfg.max_meta_bytes {
            return Err(format!(
                "meta is {} bytes, at most {} are kept",
                text.len(),
                cfg.max_meta_bytes
            ));
        }
        h.meta = text.into();
    }
    Ok(h)
}

/// The HELLO frame (JSON form) that a WebSocket URL query asks for:
/// `addr`, `role`, `token` and `heartbeat_s` are read, other keys ignored,
/// and a leading path up to `?` is skipped. `None` when the query holds no
/// hello key.
pub(super) fn url_frame(query: &str) -> Option<Frame> {
    let query = query.split_once('?').map_or(query, |(_, q)| q);
    let mut addr = None;
    let mut fields = serde_json::Map::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let v = percent_decode(v);
        match k {
            "addr" => addr = Some(v),
            "role" | "token" => {
                fields.insert(k.to_owned(), serde_json::Value::String(v));
            }
            "heartbeat_s" => {
                let n = v
                    .parse::<u64>()
                    .map(serde_json::Value::from)
                    .unwrap_or(serde_json::Value::String(v));
                fields.insert(k.to_owned(), n);
            }
            _ => {}
        }
    }
    if addr.is_none() && fields.is_empty() {
        return None;
    }
    Some(Frame {
        src: addr.map(Bytes::from).unwrap_or_default(),
        flags: Flags(Flags::JSON),
        payload: serde_json::Value::Object(fields).to_string().into(),
        ..Frame::new(FrameType::Hello)
    })
}

/// Decodes a URL query value: `+` is a space and `%XX` a byte; bad escapes
/// stay as they are, and bytes that are not UTF-8 are replaced.
pub(super) fn percent_decode(v: &str) -> String {
    // `+` first: an escaped `%2B` is a plus sign, not a space.
    let v = v.replace('+', " ");
    percent_decode_str(&v).decode_utf8_lossy().into_owned()
}
