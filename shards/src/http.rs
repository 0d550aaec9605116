//! HTTP/1.1 for the API, `/metrics`, the console and the WebSocket upgrade,
//! sans IO: request heads are parsed by `httparse`, bodies delimited by
//! Content-Length, responses rendered to bytes. The runtime owns the socket.

use bytes::{Buf, Bytes, BytesMut};
use thiserror::Error;

/// Largest request head accepted.
pub const MAX_HEAD: usize = 16 * 1024;
const MAX_HEADERS: usize = 48;
/// Most subprotocols one WebSocket upgrade may offer.
const MAX_WS_PROTOCOLS: usize = 16;

/// One parsed request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    /// Path without the query, not yet percent-decoded.
    pub path: String,
    pub query: String,
    pub authorization: Option<String>,
    pub upgrade_websocket: bool,
    pub ws_key: Option<String>,
    pub ws_version: Option<String>,
    /// The subprotocols the client offers (`Sec-WebSocket-Protocol`, every
    /// header and every comma-separated item, in order).
    pub ws_protocols: Vec<String>,
    pub keep_alive: bool,
    pub body: Bytes,
}

/// Why a request could not be read. Each maps to a status and a close.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum HttpError {
    #[error("malformed request: {0}")]
    Malformed(String),
    #[error("request head exceeds {MAX_HEAD} bytes")]
    HeadTooLarge,
    #[error("body of {0} bytes exceeds max_body")]
    BodyTooLarge(usize),
    #[error("a Content-Length is required for a body (chunked bodies are not accepted)")]
    LengthRequired,
}

impl HttpError {
    pub fn status(&self) -> u16 {
        match self {
            HttpError::Malformed(_) => 400,
            HttpError::HeadTooLarge => 431,
            HttpError::BodyTooLarge(_) => 413,
            HttpError::LengthRequired => 411,
        }
    }
}

/// A request head that arrived whole; its body follows in the buffer.
#[derive(Debug, Clone)]
pub struct Head {
    /// The request, its body still empty.
    pub req: Request,
    /// Bytes of the head at the front of the buffer.
    pub len: usize,
    /// Bytes of body that follow.
    pub content_length: usize,
}

/// Parses the request head at the front of `buf` without taking it, or
/// `Ok(None)` when more bytes are needed. The body is not looked at, so
/// the caller can refuse the request (401, 503) before reading it.
pub fn parse_head(buf: &[u8], max_body: usize) -> Result<Option<Head>, HttpError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            return if buf.len() > MAX_HEAD {
                Err(HttpError::HeadTooLarge)
            } else {
                Ok(None)
            };
        }
        Err(e) => return Err(HttpError::Malformed(e.to_string())),
    };
    if head_len > MAX_HEAD {
        return Err(HttpError::HeadTooLarge);
    }
    let target = req.path.unwrap_or("/");
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let mut r = Request {
        method: req.method.unwrap_or("GET").to_owned(),
        path: path.to_owned(),
        query: query.to_owned(),
        keep_alive: req.version == Some(1),
        ..Request::default()
    };
    let mut content_length: Option<usize> = None;
    let mut connection_upgrade = false;
    for h in req.headers.iter() {
        let value = std::str::from_utf8(h.value)
            .map_err(|_| HttpError::Malformed("header is not UTF-8".into()))?;
        match h.name.to_ascii_lowercase().as_str() {
            "content-length" => {
                // One length of plain digits: a second header, a sign or a
                // list is how a request is smuggled past a proxy that reads
                // it differently (RFC 9112 6.3).
                if content_length.is_some() {
                    return Err(HttpError::Malformed("more than one Content-Length".into()));
                }
                let v = value.trim();
                if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(HttpError::Malformed("bad Content-Length".into()));
                }
                content_length = Some(
                    v.parse()
                        .map_err(|_| HttpError::Malformed("bad Content-Length".into()))?,
                );
            }
            "transfer-encoding" if !value.eq_ignore_ascii_case("identity") => {
                return Err(HttpError::LengthRequired);
            }
            "authorization" => r.authorization = Some(value.to_owned()),
            "upgrade" => r.upgrade_websocket = value.eq_ignore_ascii_case("websocket"),
            "connection" => {
                let v = value.to_ascii_lowercase();
                connection_upgrade = v.split(',').any(|t| t.trim() == "upgrade");
                if v.split(',').any(|t| t.trim() == "close") {
                    r.keep_alive = false;
                }
                if v.split(',').any(|t| t.trim() == "keep-alive") {
                    r.keep_alive = true;
                }
            }
            "sec-websocket-key" => r.ws_key = Some(value.trim().to_owned()),
            "sec-websocket-version" => r.ws_version = Some(value.trim().to_owned()),
            "sec-websocket-protocol" => {
                for p in value.split(',').map(str::trim).filter(|p| !p.is_empty()) {
                    if r.ws_protocols.len() >= MAX_WS_PROTOCOLS {
                        return Err(HttpError::Malformed(
                            "too many WebSocket subprotocols offered".into(),
                        ));
                    }
                    r.ws_protocols.push(p.to_owned());
                }
            }
            _ => {}
        }
    }
    r.upgrade_websocket &= connection_upgrade;
    let content_length = content_length.unwrap_or(0);
    if content_length > max_body {
        return Err(HttpError::BodyTooLarge(content_length));
    }
    Ok(Some(Head {
        req: r,
        len: head_len,
        content_length,
    }))
}

/// Takes one whole request (head and body) off `buf`, or `Ok(None)` when
/// more bytes are needed.
pub fn parse_request(buf: &mut BytesMut, max_body: usize) -> Result<Option<Request>, HttpError> {
    let Some(head) = parse_head(buf, max_body)? else {
        return Ok(None);
    };
    let whole = head.len + head.content_length;
    if buf.len() < whole {
        return Ok(None);
    }
    buf.advance(head.len);
    let mut r = head.req;
    r.body = buf.split_to(head.content_length).freeze();
    Ok(Some(r))
}

/// Whether `key` is a valid `Sec-WebSocket-Key`: base64 of 16 bytes
/// (RFC 6455 4.1).
pub fn valid_ws_key(key: &str) -> bool {
    use base64::Engine as _;
    key.len() == 24
        && base64::engine::general_purpose::STANDARD
            .decode(key)
            .is_ok_and(|k| k.len() == 16)
}

/// The answer to HEAD: the GET response's head without its body.
pub fn head_only(mut response: Vec<u8>) -> Vec<u8> {
    if let Some(i) = response.windows(4).position(|w| w == b"\r\n\r\n") {
        response.truncate(i + 4);
    }
    response
}

/// The value of `key` in a query string, percent-decoded.
pub fn query_param(query: &str, key: &str) -> Option<String> {
    query.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        (decode(k) == key).then(|| decode(v))
    })
}

/// Percent-decodes a path segment or query value (`+` is a space in queries,
/// but addresses never contain spaces, so it is left as is).
pub fn decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8_lossy()
        .into_owned()
}

/// A complete response.
pub fn response(status: u16, content_type: &str, body: &[u8], keep_alive: bool) -> Vec<u8> {
    response_with(status, content_type, body, keep_alive, &[])
}

/// A complete response with extra headers.
pub fn response_with(
    status: u16,
    content_type: &str,
    body: &[u8],
    keep_alive: bool,
    headers: &[(&str, &str)],
) -> Vec<u8> {
    let mut out = Vec::with_capacity(160 + body.len());
    out.extend_from_slice(
        format!(
            "HTTP/1.1 {status} {}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\ncache-control: no-store\r\n{}",
            reason(status),
            body.len(),
            if keep_alive { "" } else { "connection: close\r\n" }
        )
        .as_bytes(),
    );
    for (k, v) in headers {
        out.extend_from_slice(format!("{k}: {v}\r\n").as_bytes());
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body);
    out
}

/// A JSON response.
pub fn json(status: u16, value: &serde_json::Value, keep_alive: bool) -> Vec<u8> {
    response(
        status,
        "application/json",
        value.to_string().as_bytes(),
        keep_alive,
    )
}

/// The 101 answer to a WebSocket upgrade.
pub fn switching_protocols(key: &str) -> Vec<u8> {
    switching_protocols_with(key, None)
}

/// The 101 answer to a WebSocket upgrade, naming the chosen subprotocol
/// when there is one.
pub fn switching_protocols_with(key: &str, protocol: Option<&str>) -> Vec<u8> {
    let accept = tungstenite::handshake::derive_accept_key(key.as_bytes());
    let protocol = protocol
        .map(|p| format!("sec-websocket-protocol: {p}\r\n"))
        .unwrap_or_default();
    format!(
        "HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\nsec-websocket-accept: {accept}\r\n{protocol}\r\n"
    )
    .into_bytes()
}

fn reason(status: u16) -> &'static str {
    match status {
        101 => "Switching Protocols",
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        408 => "Request Timeout",
        405 => "Method Not Allowed",
        411 => "Length Required",
        413 => "Payload Too Large",
        426 => "Upgrade Required",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Status",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_request_in_pieces() {
        let raw = b"POST /api/v1/send?x=1 HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer t\r\nContent-Length: 5\r\n\r\nhello";
        let mut buf = BytesMut::new();
        for (i, b) in raw.iter().enumerate() {
            buf.extend_from_slice(&[*b]);
            let r = parse_request(&mut buf, 1024).unwrap();
            if i + 1 < raw.len() {
                assert!(r.is_none());
            } else {
                let r = r.unwrap();
                assert_eq!(
                    (r.method.as_str(), r.path.as_str(), r.query.as_str()),
                    ("POST", "/api/v1/send", "x=1")
                );
                assert_eq!(r.authorization.as_deref(), Some("Bearer t"));
                assert_eq!(&r.body[..], b"hello");
                assert!(r.keep_alive);
            }
        }
        assert!(buf.is_empty());
    }

    #[test]
    fn refuses_large_and_chunked_bodies() {
        let mut b = BytesMut::from(&b"POST / HTTP/1.1\r\nContent-Length: 100\r\n\r\n"[..]);
        assert_eq!(parse_request(&mut b, 10).unwrap_err().status(), 413);
        let mut b = BytesMut::from(&b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"[..]);
        assert_eq!(parse_request(&mut b, 10).unwrap_err().status(), 411);
        let mut b = BytesMut::from(&b"GARBAGE\x01\r\n\r\n"[..]);
        assert_eq!(parse_request(&mut b, 10).unwrap_err().status(), 400);
        let mut b = BytesMut::from(&vec![b'a'; MAX_HEAD + 1][..]);
        assert!(parse_request(&mut b, 10).is_err());
    }

    #[test]
    fn a_second_or_signed_content_length_is_refused() {
        for raw in [
            &b"POST / HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nab"[..],
            &b"POST / HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 5\r\n\r\nab"[..],
            &b"POST / HTTP/1.1\r\nContent-Length: +2\r\n\r\nab"[..],
            &b"POST / HTTP/1.1\r\nContent-Length: 2, 2\r\n\r\nab"[..],
            &b"POST / HTTP/1.1\r\nContent-Length: \r\n\r\nab"[..],
        ] {
            let mut b = BytesMut::from(raw);
            assert_eq!(
                parse_request(&mut b, 100).unwrap_err().status(),
                400,
                "{raw:?}"
            );
        }
    }

    #[test]
    fn the_head_is_parsed_before_any_body_arrives() {
        let raw = b"POST /api/v1/send HTTP/1.1\r\nContent-Length: 1000\r\n\r\n";
        let h = parse_head(raw, 1000).unwrap().unwrap();
        assert_eq!((h.len, h.content_length), (raw.len(), 1000));
        assert_eq!(h.req.path, "/api/v1/send");
    }

    #[test]
    fn websocket_keys_must_be_16_bytes_of_base64() {
        assert!(valid_ws_key("dGhlIHNhbXBsZSBub25jZQ=="));
        assert!(!valid_ws_key(""));
        assert!(!valid_ws_key("not base64 at all!!!!!!!"));
        assert!(!valid_ws_key("dGhlIHNhbXBsZQ=="));
    }

    #[test]
    fn head_only_keeps_the_length_and_drops_the_body() {
        let r = head_only(json(200, &serde_json::json!({"ok": true}), true));
        let text = String::from_utf8(r).unwrap();
        assert!(text.contains("content-length: 11\r\n"));
        assert!(text.ends_with("\r\n\r\n"));
    }

    #[test]
    fn websocket_upgrade_and_accept_key() {
        let mut b = BytesMut::from(
            &b"GET /ws?addr=web-1 HTTP/1.1\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"[..],
        );
        let r = parse_request(&mut b, 0).unwrap().unwrap();
        assert!(r.upgrade_websocket);
        let resp = String::from_utf8(switching_protocols(r.ws_key.as_deref().unwrap())).unwrap();
        // RFC 6455 1.3 example.
        assert!(resp.contains("sec-websocket-accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo="));
        assert_eq!(query_param(&r.query, "addr").as_deref(), Some("web-1"));
    }

    #[test]
    fn websocket_subprotocols_are_listed_and_the_chosen_one_answered() {
        let mut b = BytesMut::from(
            &b"GET /mqtt HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Protocol: mqttv3.1, mqtt\r\nSec-WebSocket-Protocol: x\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"[..],
        );
        let r = parse_request(&mut b, 0).unwrap().unwrap();
        assert_eq!(r.ws_protocols, ["mqttv3.1", "mqtt", "x"]);
        let resp = String::from_utf8(switching_protocols_with(
            r.ws_key.as_deref().unwrap(),
            Some("mqtt"),
        ))
        .unwrap();
        assert!(resp.contains("\r\nsec-websocket-protocol: mqtt\r\n\r\n"));
        assert!(
            !String::from_utf8(switching_protocols("dGhlIHNhbXBsZSBub25jZQ=="))
                .unwrap()
                .contains("protocol")
        );
        let many = format!(
            "GET /mqtt HTTP/1.1\r\nSec-WebSocket-Protocol: {}\r\n\r\n",
            vec!["p"; MAX_WS_PROTOCOLS + 1].join(",")
        );
        let mut b = BytesMut::from(many.as_bytes());
        assert_eq!(parse_request(&mut b, 0).unwrap_err().status(), 400);
    }

    #[test]
    fn percent_decoding_of_php_urlencode() {
        assert_eq!(decode("ctl%3A42%40site"), "ctl:42@site");
        assert_eq!(
            query_param("a=1&prefix=ctl%3A&b", "prefix").as_deref(),
            Some("ctl:")
        );
        assert_eq!(query_param("a=1", "b"), None);
    }
}

/// Request bytes come from anywhere: whatever arrives, in whatever pieces,
/// the parser gives the requests a client sent, or an error, never a panic,
/// and the same results however the bytes are cut.
#[cfg(test)]
mod props {
    use super::*;
    use proptest::collection::vec;
    use proptest::prelude::*;
    use relay_core::pieces::decode_in_pieces;

    const MAX_BODY: usize = 256;

    fn parse_in(data: &[u8], pieces: &[usize]) -> Vec<Result<Request, HttpError>> {
        decode_in_pieces(data, pieces, |b| parse_request(b, MAX_BODY))
    }

    /// A request as a client writes it, and what the parser should give.
    fn request() -> impl Strategy<Value = (Vec<u8>, Request)> {
        (
            prop_oneof![Just("GET"), Just("POST"), Just("DELETE"), Just("HEAD")],
            "/[a-z0-9/_.-]{0,30}",
            "[a-z0-9=&%]{0,20}",
            proptest::option::of("Bearer [A-Za-z0-9]{1,20}"),
            any::<bool>(),
            vec(any::<u8>(), 0..MAX_BODY),
        )
            .prop_map(|(method, path, query, auth, close, body)| {
                let target = if query.is_empty() {
                    path.clone()
                } else {
                    format!("{path}?{query}")
                };
                let mut head = format!("{method} {target} HTTP/1.1\r\nHost: relay\r\n");
                if let Some(a) = &auth {
                    head.push_str(&format!("Authorization: {a}\r\n"));
                }
                if close {
                    head.push_str("Connection: close\r\n");
                }
                if !body.is_empty() {
                    head.push_str(&format!("Content-Length: {}\r\n", body.len()));
                }
                head.push_str("\r\n");
                let mut bytes = head.into_bytes();
                bytes.extend_from_slice(&body);
                let want = Request {
                    method: method.to_owned(),
                    path,
                    query,
                    authorization: auth,
                    keep_alive: !close,
                    body: Bytes::from(body),
                    ..Request::default()
                };
                (bytes, want)
            })
    }

    proptest! {
        #[test]
        fn pipelined_requests_parse_as_sent_in_any_pieces(
            reqs in vec(request(), 0..6),
            pieces in vec(1..80usize, 1..8),
        ) {
            let bytes: Vec<u8> = reqs.iter().flat_map(|(b, _)| b.clone()).collect();
            let want: Vec<Request> = reqs.into_iter().map(|(_, r)| r).collect();
            let got: Vec<Request> = parse_in(&bytes, &pieces)
                .into_iter()
                .collect::<Result<_, _>>()
                .expect("well-formed requests parse");
            prop_assert_eq!(got, want);
        }

        #[test]
        fn any_bytes_give_the_same_results_in_any_pieces(
            data in vec(any::<u8>(), 0..600),
            pieces in vec(1..80usize, 1..8),
        ) {
            let whole = parse_in(&data, &[data.len().max(1)]);
            prop_assert_eq!(parse_in(&data, &pieces), whole.clone());
            for r in whole.iter().flatten() {
                prop_assert!(r.body.len() <= MAX_BODY);
                let _ = query_param(&r.query, "addr");
                let _ = decode(&r.path);
            }
        }
    }
}
