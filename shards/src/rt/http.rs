//! One HTTP connection on a shard: requests in a keep-alive loop, answered
//! by the API, `/metrics`, `/healthz` or the console, until one asks for a
//! WebSocket; then the socket goes to the shard's I/O loop as a browser.

use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use futures_lite::{AsyncReadExt, AsyncWriteExt};
use relay_core::conn::{Connection, Transport};
use serde_json::json;

use super::io::Io;
use super::tls::HttpStream;
use super::{Shard, conn, now};
use crate::api::{self, Api};
use crate::http::{self, Request};
use crate::router::Router;
use crate::stats::ShardStats;

/// Bound on one API request's work (cross-shard calls included).
const API_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves one HTTP connection; `remote`: the client's address a PROXY
/// header named (else the socket's peer is the client).
pub(super) async fn serve(
    shard: Rc<Shard>,
    stream: HttpStream,
    health_only: bool,
    remote: Option<std::net::SocketAddr>,
) {
    // Requests first; a WebSocket upgrade then runs as its own future, so the
    // request buffers are gone before the browser's long life begins.
    if let Some((stream, req, leftover)) = requests(&shard, stream, health_only).await {
        upgrade(shard, stream, req, leftover, remote).await;
    }
}

/// What a read with a deadline gave.
enum Got {
    Data,
    Closed,
    TimedOut,
}

/// Reads what the peer sent into `buf`, waiting at most until `deadline`.
async fn read_more(
    shard: &Shard,
    stream: &mut HttpStream,
    buf: &mut BytesMut,
    tmp: &mut [u8],
    deadline: Instant,
) -> Got {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() || stream.set_read_timeout(Some(left)).is_err() {
        return Got::TimedOut;
    }
    match stream.read(tmp).await {
        Ok(0) => Got::Closed,
        Ok(n) => {
            ShardStats::add(&shard.router.stats.bytes_in, n as u64);
            buf.extend_from_slice(&tmp[..n]);
            Got::Data
        }
        Err(_) if Instant::now() >= deadline => Got::TimedOut,
        Err(_) => Got::Closed,
    }
}

/// Request body bytes held by one request, given back to the shard's
/// budget when the request is done.
struct BodyBudget<'a> {
    shard: &'a Shard,
    n: usize,
}

impl<'a> BodyBudget<'a> {
    fn take(shard: &'a Shard, n: usize) -> Option<BodyBudget<'a>> {
        let held = shard.body_bytes.get();
        if held.saturating_add(n) > shard.shared.max_bodies {
            return None;
        }
        shard.body_bytes.set(held + n);
        Some(BodyBudget { shard, n })
    }
}

impl Drop for BodyBudget<'_> {
    fn drop(&mut self) {
        let b = &self.shard.body_bytes;
        b.set(b.get().saturating_sub(self.n));
    }
}

fn error_json(status: u16, code: &str, message: &str) -> Vec<u8> {
    http::json(status, &json!({"error": code, "message": message}), false)
}

/// Whether a request is a health check (what the health slots serve).
fn is_health(req: &Request) -> bool {
    matches!(req.method.as_str(), "GET" | "HEAD")
        && matches!(req.path.as_str(), "/healthz" | "/metrics")
}

/// Reads one request head: waits up to the idle timeout for its first
/// byte, then up to `head_timeout` for the whole head (a client sending a
/// byte at a time cannot extend it). `None` when the connection is to end;
/// an error has then been answered.
async fn read_head(
    shard: &Shard,
    stream: &mut HttpStream,
    buf: &mut BytesMut,
    tmp: &mut [u8],
) -> Option<http::Head> {
    let shared = &shard.shared;
    let mut head_deadline = (!buf.is_empty()).then(|| Instant::now() + shared.head_timeout);
    loop {
        match http::parse_head(buf, shared.max_body) {
            Ok(Some(h)) => return Some(h),
            Ok(None) => {}
            Err(e) => {
                let _ = stream
                    .write_all(&error_json(e.status(), "bad_frame", &e.to_string()))
                    .await;
                return None;
            }
        }
        let deadline = head_deadline.unwrap_or_else(|| Instant::now() + shared.http_idle);
        match read_more(shard, stream, buf, tmp, deadline).await {
            Got::Data => {
                head_deadline.get_or_insert_with(|| Instant::now() + shared.head_timeout);
            }
            Got::Closed => return None,
            Got::TimedOut => {
                if head_deadline.is_some() {
                    let msg = "the request head did not arrive within http.head_timeout_ms";
                    let _ = stream.write_all(&error_json(408, "timeout", msg)).await;
                }
                return None;
            }
        }
    }
}

/// Whether the request names the API token when the API needs one,
/// compared in constant time. Checked on the head, before any body is read.
fn authorized(shard: &Shard, req: &Request) -> bool {
    let Some(token) = shard.shared.api_token.as_deref() else {
        return true;
    };
    if !req.path.starts_with("/api/") {
        return true;
    }
    let given = req
        .authorization
        .as_deref()
        .and_then(|a| a.strip_prefix("Bearer "))
        .map(str::trim)
        .unwrap_or("");
    relay_core::auth::same_secret(given.as_bytes(), token.as_bytes())
}

/// Serves requests until the connection closes (`None`) or one asks for a
/// WebSocket (the stream, that request and the bytes read after it).
async fn requests(
    shard: &Rc<Shard>,
    mut stream: HttpStream,
    health_only: bool,
) -> Option<(HttpStream, Request, BytesMut)> {
    let shared = &shard.shared;
    let mut buf = BytesMut::new();
    let mut tmp = vec![0u8; 8192];
    let upgrade_req = loop {
        let Some(head) = read_head(shard, &mut stream, &mut buf, &mut tmp).await else {
            break None;
        };
        let mut req = head.req;
        if health_only && !is_health(&req) {
            let msg = "the relay is at http.max_connections; only /healthz and /metrics are served";
            let _ = stream.write_all(&error_json(503, "busy", msg)).await;
            break None;
        }
        if !authorized(shard, &req) {
            // Refused on the head: the body is never read.
            let msg = "missing or wrong API token";
            let _ = stream
                .write_all(&error_json(401, "unauthorized", msg))
                .await;
            break None;
        }
        let len = head.content_length;
        let budget = if len > 0 {
            match BodyBudget::take(shard, len) {
                Some(b) => Some(b),
                None => {
                    let msg = "too many request bodies in flight; retry later";
                    let _ = stream.write_all(&error_json(503, "busy", msg)).await;
                    break None;
                }
            }
        } else {
            None
        };
        buf.advance(head.len);
        let body_deadline = Instant::now() + shared.body_timeout;
        let mut complete = true;
        while buf.len() < len {
            match read_more(shard, &mut stream, &mut buf, &mut tmp, body_deadline).await {
                Got::Data => {}
                Got::Closed => {
                    complete = false;
                    break;
                }
                Got::TimedOut => {
                    let msg = "the request body did not arrive within http.body_timeout_ms";
                    let _ = stream.write_all(&error_json(408, "timeout", msg)).await;
                    complete = false;
                    break;
                }
            }
        }
        if !complete {
            break None;
        }
        req.body = buf.split_to(len).freeze();
        // `/mqtt` is MQTT over WebSocket while MQTT is on; otherwise it is
        // no route (404 below).
        let mqtt = req.path == "/mqtt" && shared.mqtt_addr.is_some();
        if req.path == "/ws" || mqtt {
            if let Some(resp) = websocket(shard, &req, mqtt) {
                let _ = stream.write_all(&resp).await;
                break None;
            }
            // Upgraded, the browser is a client: it takes a client slot.
            if !shared.admit() {
                let msg = "the relay is at limits.max_connections";
                let _ = stream.write_all(&error_json(503, "busy", msg)).await;
                break None;
            }
            break Some(req);
        }
        let keep_alive = req.keep_alive && !health_only && !shard.router.is_shutting_down();
        let resp = if req.method == "HEAD" {
            let mut get = req.clone();
            get.method = "GET".into();
            http::head_only(respond(shard, &get, keep_alive).await)
        } else {
            respond(shard, &req, keep_alive).await
        };
        drop(req);
        drop(budget);
        ShardStats::add(&shard.router.stats.bytes_out, resp.len() as u64);
        if stream.write_all(&resp).await.is_err() || !keep_alive {
            break None;
        }
    };
    shared.release_http();
    match upgrade_req {
        Some(req) => {
            let _ = stream.set_read_timeout(None);
            Some((stream, req, buf))
        }
        None => {
            let _ = stream.close().await;
            ShardStats::add(&shard.router.stats.closed_total, 1);
            None
        }
    }
}

async fn respond(shard: &Rc<Shard>, req: &Request, keep_alive: bool) -> Vec<u8> {
    let shared = &shard.shared;
    match (req.method.as_str(), req.path.as_str()) {
        ("GET", "/healthz") => {
            if shard.router.is_shutting_down() {
                http::json(
                    503,
                    &json!({"ok": false, "status": "shutting_down"}),
                    keep_alive,
                )
            } else {
                http::json(200, &json!({"ok": true}), keep_alive)
            }
        }
        ("GET", "/metrics") => {
            let mut extra = shared.plugin_metrics();
            extra.extend(shared.live.metrics());
            if let Some(c) = &shared.cluster {
                extra.extend(c.metrics());
            }
            let extra: Vec<(&str, &str, u64)> = extra
                .iter()
                .map(|(a, b, c)| (a.as_str(), b.as_str(), *c))
                .collect();
            let mut text = crate::metrics::render(
                &shared.stats,
                shared.started.elapsed().as_secs_f64(),
                &extra,
            );
            shared.live.acl().render(&mut text);
            http::response(
                200,
                "text/plain; version=0.0.4",
                text.as_bytes(),
                keep_alive,
            )
        }
        (_, p) if p.starts_with("/api/") => {
            let api = Api {
                router: &shard.router,
                stats: &shared.stats,
                token: shared.api_token.as_deref(),
                uptime_s: shared.started.elapsed().as_secs_f64(),
                max_frame: shard.router.cfg().conn.max_frame,
                plugins: shared.plugins.as_deref().map(|p| p as &dyn api::PluginApi),
                cluster: shared.cluster.as_deref(),
            };
            let work = api::handle(
                &api,
                &req.method,
                &req.path,
                &req.query,
                req.authorization.as_deref(),
                &req.body,
            );
            match glommio::timer::timeout(API_TIMEOUT, async { Ok(work.await) }).await {
                Ok(r) => http::json(r.status, &r.body, keep_alive),
                Err(_) => http::json(
                    504,
                    &json!({"error": "internal", "message": "the request timed out"}),
                    keep_alive,
                ),
            }
        }
        ("GET", p) if shared.console => match crate::console::asset(p) {
            Some((ctype, body)) => http::response_with(
                200,
                ctype,
                body,
                keep_alive,
                &[
                    ("content-security-policy", crate::console::CSP),
                    ("x-content-type-options", "nosniff"),
                ],
            ),
            None => http::json(
                404,
                &json!({"error": "not_found", "message": format!("no page {p}")}),
                keep_alive,
            ),
        },
        (m, p) => http::json(
            404,
            &json!({"error": "not_found", "message": format!("no route {m} {p}")}),
            keep_alive,
        ),
    }
}

/// The WebSocket subprotocol of MQTT (MQTT 5.0 section 6, 3.1.1 section 6).
const MQTT_SUBPROTOCOL: &str = "mqtt";

/// Checks an upgrade request (`mqtt`: to `/mqtt`, which must offer the
/// `mqtt` subprotocol); `Some(response)` refuses it.
fn websocket(shard: &Shard, req: &Request, mqtt: bool) -> Option<Vec<u8>> {
    if shard.router.is_shutting_down() {
        return Some(error_json(503, "shutting_down", "relay is shutting down"));
    }
    if req.method != "GET" || !req.upgrade_websocket {
        return Some(error_json(
            426,
            "bad_frame",
            "a WebSocket upgrade is required",
        ));
    }
    if !req.ws_key.as_deref().is_some_and(http::valid_ws_key) {
        return Some(error_json(
            400,
            "bad_frame",
            "Sec-WebSocket-Key must be 16 bytes in base64",
        ));
    }
    if req.ws_version.as_deref() != Some("13") {
        return Some(error_json(
            400,
            "unsupported",
            "Sec-WebSocket-Version must be 13",
        ));
    }
    if mqtt && !req.ws_protocols.iter().any(|p| p == MQTT_SUBPROTOCOL) {
        return Some(error_json(
            400,
            "bad_frame",
            "MQTT over WebSocket needs the subprotocol mqtt (Sec-WebSocket-Protocol: mqtt)",
        ));
    }
    None
}

/// Answers 101 and gives the connection to the I/O loop as a browser
/// client, or (`/mqtt`) as an MQTT client.
async fn upgrade(
    shard: Rc<Shard>,
    mut stream: HttpStream,
    req: Request,
    mut leftover: BytesMut,
    remote: Option<std::net::SocketAddr>,
) {
    let mqtt = req.path == "/mqtt";
    let key = req.ws_key.as_deref().unwrap_or_default();
    let protocol = mqtt.then_some(MQTT_SUBPROTOCOL);
    if stream
        .write_all(&http::switching_protocols_with(key, protocol))
        .await
        .is_err()
    {
        shard.shared.release();
        return;
    }
    let remote = remote.unwrap_or_else(|| {
        stream
            .peer_addr()
            .unwrap_or_else(|_| std::net::SocketAddr::from(([0, 0, 0, 0], 0)))
    });
    let cfg = shard.router.cfg();
    let cfg = &cfg.conn;
    let t = now();
    let mut c = Connection::new(cfg, Transport::WebSocket, t);
    let first = if !mqtt
        && req.query.split('&').any(|kv| {
            kv.starts_with("addr=") || kv.starts_with("role=") || kv.starts_with("token=")
        }) {
        c.handle_url_hello(cfg, t, &req.query)
    } else {
        None
    };
    // The request is not needed past this point; don't carry it for the
    // life of the connection.
    drop(req);
    let (stream, tls) = stream.into_parts(&mut leftover);
    // The I/O loop watches it from here on, under its own token.
    shard
        .poller
        .unwatch_executor(std::os::fd::AsRawFd::as_raw_fd(&stream));
    let fd = match conn::take_fd(stream) {
        Ok(fd) => fd,
        Err(e) => {
            crate::warn_every!("WebSocket upgrade failed: {e}");
            shard.shared.release();
            return;
        }
    };
    let cell = shard.router.register(c, Router::session(remote));
    if mqtt {
        super::mqtt::init_ws(&shard, &cell);
    }
    let io = Io::new(fd, tls).carrying(
        leftover,
        bytes::Bytes::new(),
        Some(crate::ws::WsDecoder::default()),
    );
    conn::attach(&shard, cell, io, first);
}
