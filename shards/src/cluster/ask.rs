//! API requests that one node hands to another: the HTTP API of any node
//! acts on the node that holds an address (or runs the rules).
//!
//! - A shard's API handler that cannot settle a request on its own node
//!   hands it to the NATS thread ([`Ask`], through a bounded channel, never
//!   waiting). The thread finds the node (directory, rules lease, or a node
//!   named) and sends the request on that node's subject
//!   `<prefix>.api.<node>` as a NATS request, waiting at most
//!   `reply_timeout_ms` for the answer.
//! - The node asked runs the request through its own HTTP API on its own
//!   listener, on this node only (`local=true`, so it never asks further),
//!   with its own API token, and answers with the status and the JSON body.
//!
//! The answers: the other node's [`Answer::Reply`], [`Answer::Nobody`] when
//! no live node holds the address or the lease, or [`Answer::Unavailable`]
//! when NATS is down, the channel is full, the node has no plain HTTP
//! listener, or no answer came in time.

use std::net::SocketAddr;
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The query parameter that keeps a request on the node it reaches.
pub const LOCAL_PARAM: &str = "local";
/// Largest answer body read back from the local API (the listing of one
/// node is the largest: 1000 clients of at most a few KiB each).
pub const MAX_ANSWER: usize = 16 << 20;

/// Which node a request is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// The node holding this address (in the directory).
    Addr(Bytes),
    /// The node holding the rules lease.
    Rules,
    /// This node, by name.
    Node(String),
}

/// One API request for another node.
#[derive(Debug)]
pub struct Ask {
    pub to: Target,
    pub method: String,
    pub path: String,
    pub query: String,
    pub body: Vec<u8>,
    pub answer: async_channel::Sender<Answer>,
}

/// What came of an [`Ask`].
#[derive(Debug, Clone, PartialEq)]
pub enum Answer {
    /// The node's API answered.
    Reply {
        node: String,
        status: u16,
        body: Value,
    },
    /// No live node (other than this one) holds the address or the lease.
    Nobody,
    /// The request could not be carried or was not answered in time.
    Unavailable(String),
}

/// The request is to stay on the node it reached (`local` given, and not
/// `false`).
pub fn is_local(query: &str) -> bool {
    crate::http::query_param(query, LOCAL_PARAM).is_some_and(|v| v != "false")
}

/// The query with `local=true` added (and any `local` given replaced).
pub fn local_query(query: &str) -> String {
    let mut parts: Vec<&str> = query
        .split('&')
        .filter(|kv| !kv.is_empty() && kv.split('=').next() != Some(LOCAL_PARAM))
        .collect();
    parts.push("local=true");
    parts.join("&")
}

/// The request as it travels on NATS.
pub fn encode_request(method: &str, path: &str, query: &str, body: &[u8]) -> Vec<u8> {
    json!({
        "method": method,
        "path": path,
        "query": query,
        "body": base64::engine::general_purpose::STANDARD.encode(body),
    })
    .to_string()
    .into_bytes()
}

/// A request from NATS: method, path, query, body; `None` when malformed.
pub fn decode_request(payload: &[u8]) -> Option<(String, String, String, Vec<u8>)> {
    let v: Value = serde_json::from_slice(payload).ok()?;
    let s = |k: &str| v[k].as_str().map(str::to_owned);
    let method = s("method")?;
    let path = s("path")?;
    // Only the API travels, and only in a shape the relay's parser takes.
    let plain = |t: &str| !t.chars().any(|c| c.is_whitespace() || c.is_control());
    if !path.starts_with("/api/") || !plain(&path) || !plain(&method) || method.is_empty() {
        return None;
    }
    let query = s("query").unwrap_or_default();
    if !plain(&query) {
        return None;
    }
    let body = base64::engine::general_purpose::STANDARD
        .decode(v["body"].as_str().unwrap_or(""))
        .ok()?;
    Some((method, path, query, body))
}

/// The answer as it travels on NATS.
pub fn encode_answer(status: u16, body: &Value) -> Vec<u8> {
    json!({"status": status, "body": body})
        .to_string()
        .into_bytes()
}

/// An answer from NATS.
pub fn decode_answer(node: &str, payload: &[u8]) -> Answer {
    match serde_json::from_slice::<Value>(payload) {
        Ok(v) if v["status"].as_u64().is_some() => Answer::Reply {
            node: node.to_owned(),
            status: v["status"].as_u64().unwrap_or(500) as u16,
            body: v["body"].clone(),
        },
        _ => Answer::Unavailable(format!("node {node} gave an answer that is not one")),
    }
}

/// Where this node's own API listens, as seen from this host.
pub fn loopback(http: SocketAddr) -> SocketAddr {
    if http.ip().is_unspecified() {
        let ip: std::net::IpAddr = if http.is_ipv4() {
            std::net::Ipv4Addr::LOCALHOST.into()
        } else {
            std::net::Ipv6Addr::LOCALHOST.into()
        };
        SocketAddr::new(ip, http.port())
    } else {
        http
    }
}

/// Runs a request through this node's own HTTP API (plain HTTP/1.1, one
/// connection per request), on this node only; at most `timeout`.
pub async fn run_local(
    http: SocketAddr,
    token: Option<&str>,
    req: (String, String, String, Vec<u8>),
    timeout: Duration,
) -> Result<(u16, Value), String> {
    tokio::time::timeout(timeout, run_local_inner(http, token, req))
        .await
        .unwrap_or_else(|_| Err("the node's API did not answer in time".into()))
}

async fn run_local_inner(
    http: SocketAddr,
    token: Option<&str>,
    (method, path, query, body): (String, String, String, Vec<u8>),
) -> Result<(u16, Value), String> {
    let mut s = tokio::net::TcpStream::connect(loopback(http))
        .await
        .map_err(|e| format!("the node's API at {http}: {e}"))?;
    let mut head = format!(
        "{method} {path}?{} HTTP/1.1\r\nhost: relay\r\nconnection: close\r\n\
         content-type: application/json\r\ncontent-length: {}\r\n",
        local_query(&query),
        body.len()
    );
    if let Some(t) = token {
        head.push_str(&format!("authorization: Bearer {t}\r\n"));
    }
    head.push_str("\r\n");
    let mut out = head.into_bytes();
    out.extend_from_slice(&body);
    s.write_all(&out).await.map_err(|e| e.to_string())?;
    let mut got = Vec::new();
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        if let Some((status, len, at)) = parse_head(&got)?
            && got.len() >= at + len
        {
            let body = &got[at..at + len];
            let v = if body.is_empty() {
                Value::Null
            } else {
                serde_json::from_slice(body).map_err(|e| format!("the node's API: {e}"))?
            };
            return Ok((status, v));
        }
        let n = s.read(&mut buf).await.map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("the node's API closed the connection early".into());
        }
        got.extend_from_slice(&buf[..n]);
        if got.len() > MAX_ANSWER {
            return Err("the node's answer is too large".into());
        }
    }
}

/// Status, content length and where the body starts, once the head is in
/// (parsed by `httparse`).
fn parse_head(got: &[u8]) -> Result<Option<(u16, usize, usize)>, String> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut r = httparse::Response::new(&mut headers);
    let at = match r.parse(got) {
        Ok(httparse::Status::Complete(at)) => at,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(format!("the node's API answered no HTTP: {e}")),
    };
    let status = r.code.ok_or("the node's API gave no status")?;
    let len = r
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
        .and_then(|h| std::str::from_utf8(h.value).ok())
        .and_then(|v| v.trim().parse::<usize>().ok())
        .ok_or("the node's API gave no content-length")?;
    if len > MAX_ANSWER {
        return Err("the node's answer is too large".into());
    }
    Ok(Some((status, len, at)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_is_any_value_but_false() {
        assert!(is_local("local=true"));
        assert!(is_local("a=1&local"));
        assert!(!is_local("local=false"));
        assert!(!is_local("localx=1"));
        assert!(!is_local(""));
    }

    #[test]
    fn the_local_marker_is_added_once() {
        assert_eq!(local_query(""), "local=true");
        assert_eq!(local_query("limit=5&local=false"), "limit=5&local=true");
        assert_eq!(local_query("a=1&localx=2"), "a=1&localx=2&local=true");
    }

    #[test]
    fn requests_round_trip_and_only_the_api_travels() {
        let p = encode_request("POST", "/api/v1/uids/u/bind", "x=1", b"{\"addr\":\"a\"}");
        let (m, path, q, b) = decode_request(&p).unwrap();
        assert_eq!(
            (m.as_str(), path.as_str(), q.as_str()),
            ("POST", "/api/v1/uids/u/bind", "x=1")
        );
        assert_eq!(b, b"{\"addr\":\"a\"}");
        assert!(decode_request(&encode_request("GET", "/metrics", "", b"")).is_none());
        assert!(decode_request(&encode_request("GET", "/api/v1/x y", "", b"")).is_none());
        assert!(decode_request(&encode_request("GET", "/api/v1/x", "a\r\nb", b"")).is_none());
        assert!(decode_request(b"not json").is_none());
    }

    #[test]
    fn answers_round_trip() {
        let a = decode_answer("n1", &encode_answer(404, &json!({"error": "x"})));
        assert_eq!(
            a,
            Answer::Reply {
                node: "n1".into(),
                status: 404,
                body: json!({"error": "x"})
            }
        );
        assert!(matches!(decode_answer("n1", b"[]"), Answer::Unavailable(_)));
    }

    #[test]
    fn heads_are_read_with_their_length() {
        let r = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}";
        assert_eq!(parse_head(r).unwrap(), Some((200, 2, r.len() - 2)));
        assert_eq!(parse_head(b"HTTP/1.1 200 OK\r\n").unwrap(), None);
        assert!(parse_head(b"HTTP/1.1 200 OK\r\n\r\n").is_err());
    }
}
