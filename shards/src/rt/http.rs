//! One HTTP connection on a shard: requests in a keep-alive loop, answered
//! by the API, `/metrics`, `/healthz` or the console, until one asks for a
//! WebSocket; then the socket goes to the shard's I/O loop as a browser.

use std::rc::Rc;
use std::time::Duration;

use bytes::BytesMut;
use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::TcpStream;
use relay_core::conn::{Connection, Transport};
use serde_json::json;

use super::{Shard, conn, now};
use crate::api::{self, Api};
use crate::http::{self, Request};
use crate::router::Router;
use crate::stats::ShardStats;

/// An idle keep-alive connection is closed after this long.
const IDLE: Duration = Duration::from_secs(30);
/// Bound on one API request's work (cross-shard calls included).
const API_TIMEOUT: Duration = Duration::from_secs(10);

pub(super) async fn serve(shard: Rc<Shard>, stream: TcpStream) {
    // Requests first; a WebSocket upgrade then runs as its own future, so the
    // request buffers are gone before the browser's long life begins.
    if let Some((stream, req, leftover)) = requests(&shard, stream).await {
        upgrade(shard, stream, req, leftover).await;
    }
}

/// Serves requests until the connection closes (`None`) or one asks for a
/// WebSocket (the stream, that request and the bytes read after it).
async fn requests(
    shard: &Rc<Shard>,
    mut stream: TcpStream,
) -> Option<(TcpStream, Request, BytesMut)> {
    let _ = stream.set_read_timeout(Some(IDLE));
    let mut buf = BytesMut::new();
    let mut tmp = vec![0u8; 8192];
    let upgrade_req = loop {
        let req = loop {
            match http::parse_request(&mut buf, shard.shared.max_body) {
                Ok(Some(r)) => break Some(r),
                Ok(None) => {}
                Err(e) => {
                    let body = json!({"error": "bad_frame", "message": e.to_string()});
                    let _ = stream
                        .write_all(&http::json(e.status(), &body, false))
                        .await;
                    break None;
                }
            }
            match stream.read(&mut tmp).await {
                Ok(0) | Err(_) => break None,
                Ok(n) => {
                    ShardStats::add(&shard.router.stats.bytes_in, n as u64);
                    buf.extend_from_slice(&tmp[..n]);
                }
            }
        };
        let Some(req) = req else { break None };
        if req.path == "/ws" {
            if let Some(resp) = websocket(shard, &mut stream, &req).await {
                let _ = stream.write_all(&resp).await;
                break None;
            }
            break Some(req);
        }
        let keep_alive = req.keep_alive && !shard.router.is_shutting_down();
        let resp = respond(shard, &req, keep_alive).await;
        ShardStats::add(&shard.router.stats.bytes_out, resp.len() as u64);
        if stream.write_all(&resp).await.is_err() || !keep_alive {
            break None;
        }
    };
    match upgrade_req {
        Some(req) => {
            let _ = stream.set_read_timeout(None);
            Some((stream, req, buf))
        }
        None => {
            let _ = stream.close().await;
            shard.shared.release();
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
            let extra = shared.plugin_metrics();
            let extra: Vec<(&str, &str, u64)> = extra
                .iter()
                .map(|(a, b, c)| (a.as_str(), b.as_str(), *c))
                .collect();
            let text = crate::metrics::render(
                &shared.stats,
                shared.started.elapsed().as_secs_f64(),
                &extra,
            );
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
                max_frame: shard.router.cfg.conn.max_frame,
                plugins: shared.plugins.as_deref().map(|p| p as &dyn api::PluginApi),
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

/// Checks an upgrade request; `Some(response)` refuses it.
async fn websocket(shard: &Rc<Shard>, _stream: &mut TcpStream, req: &Request) -> Option<Vec<u8>> {
    if shard.router.is_shutting_down() {
        return Some(http::json(
            503,
            &json!({"error": "shutting_down", "message": "relay is shutting down"}),
            false,
        ));
    }
    if req.method != "GET" || !req.upgrade_websocket || req.ws_key.is_none() {
        return Some(http::json(
            426,
            &json!({"error": "bad_frame", "message": "a WebSocket upgrade is required"}),
            false,
        ));
    }
    if req.ws_version.as_deref() != Some("13") {
        return Some(http::json(
            400,
            &json!({"error": "unsupported", "message": "Sec-WebSocket-Version must be 13"}),
            false,
        ));
    }
    None
}

/// Answers 101 and gives the connection to the I/O loop as a browser client.
async fn upgrade(shard: Rc<Shard>, mut stream: TcpStream, req: Request, leftover: BytesMut) {
    let key = req.ws_key.as_deref().unwrap_or_default();
    if stream
        .write_all(&http::switching_protocols(key))
        .await
        .is_err()
    {
        shard.shared.release();
        return;
    }
    let remote = stream
        .peer_addr()
        .unwrap_or_else(|_| std::net::SocketAddr::from(([0, 0, 0, 0], 0)));
    let cfg = &shard.router.cfg.conn;
    let t = now();
    let mut c = Connection::new(cfg, Transport::WebSocket, t);
    let first =
        if req.query.split('&').any(|kv| {
            kv.starts_with("addr=") || kv.starts_with("role=") || kv.starts_with("token=")
        }) {
            c.handle_url_hello(cfg, t, &req.query)
        } else {
            None
        };
    // The request is not needed past this point; don't carry it for the
    // life of the connection.
    drop(req);
    let fd = match conn::take_fd(stream) {
        Ok(fd) => fd,
        Err(e) => {
            tracing::warn!("WebSocket upgrade failed: {e}");
            shard.shared.release();
            return;
        }
    };
    let cell = shard.router.register(c, Router::session(remote));
    conn::attach(
        &shard,
        cell,
        fd,
        leftover,
        bytes::Bytes::new(),
        Some(crate::ws::WsDecoder::default()),
        first,
    );
}
