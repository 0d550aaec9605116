//! The HTTP API of API.md: a web backend pushes to clients and manages uids
//! and groups. Handlers are async functions over the shard's [`Router`];
//! work on other shards goes through [`Router::call`] and the answers come
//! back on an executor-agnostic channel, so nothing here knows the runtime.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use base64::Engine as _;
use bytes::Bytes;
use relay_core::acl::Action;
use relay_core::conn::Role;
use relay_core::frame::{ErrorCode, Flags, Frame};
use relay_core::name::{name_str, validate_name};
use relay_core::route::shard_of;
use serde_json::{Value, json};

use crate::router::{AckTarget, Call, CallResult, ClientView, Failure, Index, Router};
use crate::stats::{DropReason, ShardStats};

/// Source address of messages sent by the API (outside the address alphabet,
/// so no client can hold it).
pub const API_SRC: &str = "$api";
/// Default and largest page sizes.
pub const DEFAULT_LIMIT: usize = 100;
pub const MAX_LIMIT: usize = 1000;

/// What the rules engine offers the API (alarms, device shadow).
pub trait PluginApi {
    /// Active alarms matching `f` after the cursor `after` (an alarm key), at most
    /// `limit`: `{"items": [...], "next": <key or null>, "total", "totals"}`.
    fn alarms(&self, f: &relay_plugins::AlarmFilter, after: Option<&str>, limit: usize) -> Value;
    /// Ends an active alarm on behalf of `by`; `false` when not active.
    fn clear(&self, key: &str, by: &str) -> bool;
    /// Takes reloaded `[notify]` notifiers and routes (SIGHUP).
    fn reload_notify(&self, notify: &relay_config::plugins::NotifyConfig);
    /// Shelves an active alarm for `for_ms` (0 unshelves); `None` when not active.
    fn shelve(&self, key: &str, by: &str, for_ms: u64) -> Option<Value>;
    /// Acknowledges `keys`, or every unacknowledged alarm matching `f`.
    fn ack_many(&self, keys: Option<&[String]>, f: &relay_plugins::AlarmFilter, by: &str) -> Value;
    /// The notification log from MySQL, newest first, answered on the channel.
    fn notifications(
        &self,
        f: relay_plugins::records::NotifyFilter,
        limit: usize,
        before_id: Option<u64>,
    ) -> async_channel::Receiver<Result<Value, relay_plugins::records::ReadError>>;
    /// A device's telemetry over time from MySQL, answered on the channel.
    fn series(
        &self,
        addr: &str,
        q: SeriesQuery,
    ) -> async_channel::Receiver<Result<Value, relay_plugins::records::ReadError>>;
    /// `None` when no alarm has that key.
    fn ack(&self, key: &str, by: &str) -> Option<Value>;
    fn state(&self, addr: &str) -> Value;
    /// One page of the device registry matching `q`, newest last seen first, with
    /// `total` (matching devices) and `totals` (the whole registry).
    fn devices(&self, q: &relay_plugins::registry::DeviceQuery) -> Value;
    /// One device of the registry, `None` when never seen.
    fn device(&self, addr: &str) -> Option<Value>;
    /// Alarm history, newest first, answered on the returned channel by the
    /// rules engine's own thread (a shard never waits on MySQL); `Err` when
    /// MySQL is not configured.
    fn history(
        &self,
        limit: usize,
        before_id: Option<u64>,
    ) -> async_channel::Receiver<Result<Value, String>>;
}

/// What `GET /api/v1/devices/{addr}/history` asks for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SeriesQuery {
    pub table: Option<String>,
    pub field: Option<String>,
    pub since_ms: Option<u64>,
    pub limit: usize,
}

/// Everything a request may touch.
pub struct Api<'a> {
    pub router: &'a Router,
    pub stats: &'a [Arc<ShardStats>],
    pub token: Option<&'a str>,
    pub uptime_s: f64,
    pub max_frame: usize,
    pub plugins: Option<&'a dyn PluginApi>,
    /// The cluster link, when this relay is a node of a cluster.
    pub cluster: Option<&'a crate::cluster::Cluster>,
}

/// A response: status and JSON body.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    pub status: u16,
    pub body: Value,
}

fn ok(body: Value) -> Reply {
    Reply { status: 200, body }
}

fn err(code: ErrorCode, message: impl Into<String>) -> Reply {
    let status = match code {
        ErrorCode::NoRoute => 404,
        ErrorCode::Unauthorized => 401,
        ErrorCode::Forbidden => 403,
        ErrorCode::TooLarge => 413,
        ErrorCode::ShuttingDown
        | ErrorCode::SlowConsumer
        | ErrorCode::Busy
        | ErrorCode::GoingAway
        | ErrorCode::Unavailable => 503,
        ErrorCode::Internal => 500,
        _ => 400,
    };
    Reply {
        status,
        body: json!({"error": code.name(), "message": message.into()}),
    }
}

fn failure(f: Failure) -> Reply {
    err(f.0, f.1)
}

fn not_found(what: &str) -> Reply {
    Reply {
        status: 404,
        body: json!({"error": "not_found", "message": format!("no route {what}")}),
    }
}

async fn call(router: &Router, shard: usize, c: Call) -> Option<CallResult> {
    let (tx, rx) = async_channel::bounded(1);
    router.call(
        shard,
        c,
        Box::new(move |r| drop(tx.try_send(r))),
        crate::now(),
    );
    rx.recv().await.ok()
}

async fn call_all(router: &Router, c: Call) -> Vec<CallResult> {
    let (tx, rx) = async_channel::bounded(router.shards.max(1));
    for s in 0..router.shards {
        let tx = tx.clone();
        router.call(
            s,
            c.clone(),
            Box::new(move |r| drop(tx.try_send(r))),
            crate::now(),
        );
    }
    drop(tx);
    let mut out = Vec::with_capacity(router.shards);
    while let Ok(r) = rx.recv().await {
        out.push(r);
    }
    out
}

async fn acked(router: &Router, f: impl FnOnce(AckTarget)) -> Result<u32, Failure> {
    let (tx, rx) = async_channel::bounded(1);
    f(AckTarget::Callback(Box::new(move |n, e| {
        drop(tx.try_send(e.map_or(Ok(n), Err)))
    })));
    let _ = router;
    rx.recv().await.unwrap_or(Err((
        ErrorCode::Internal,
        "the shard did not answer".into(),
    )))
}

fn name(raw: &str, what: &str) -> Result<Bytes, Reply> {
    let s = crate::http::decode(raw);
    validate_name(s.as_bytes()).map_err(|e| err(ErrorCode::BadAddress, format!("{what}: {e}")))?;
    Ok(Bytes::from(s))
}

fn body_json(body: &[u8]) -> Result<serde_json::Map<String, Value>, Reply> {
    if body.is_empty() {
        return Ok(serde_json::Map::new());
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(err(ErrorCode::BadFrame, "body must be a JSON object")),
        Err(e) => Err(err(ErrorCode::BadFrame, format!("body is not JSON: {e}"))),
    }
}

fn body_addr(m: &serde_json::Map<String, Value>, key: &str) -> Result<Bytes, Reply> {
    let s = m
        .get(key)
        .and_then(Value::as_str)
        .ok_or_else(|| err(ErrorCode::BadFrame, format!("\"{key}\" is required")))?;
    validate_name(s.as_bytes()).map_err(|e| err(ErrorCode::BadAddress, format!("{key}: {e}")))?;
    Ok(Bytes::copy_from_slice(s.as_bytes()))
}

/// DATA from the body's `payload` (JSON) or `payload_b64`, src `$api` or `src`.
fn frame_from(m: &serde_json::Map<String, Value>, max_frame: usize) -> Result<Frame, Reply> {
    let mut f = Frame::new(relay_core::FrameType::Data);
    f.src = match m.get("src").and_then(Value::as_str) {
        Some(s) => {
            validate_name(s.as_bytes())
                .map_err(|e| err(ErrorCode::BadAddress, format!("src: {e}")))?;
            Bytes::copy_from_slice(s.as_bytes())
        }
        None => Bytes::from_static(API_SRC.as_bytes()),
    };
    match (m.get("payload"), m.get("payload_b64")) {
        (Some(_), Some(_)) => {
            return Err(err(
                ErrorCode::BadFrame,
                "give payload or payload_b64, not both",
            ));
        }
        (Some(v), None) => {
            f.payload = Bytes::from(v.to_string());
            f.flags = Flags(Flags::JSON);
        }
        (None, Some(Value::String(b))) => {
            f.payload = base64::engine::general_purpose::STANDARD
                .decode(b)
                .map_err(|_| err(ErrorCode::BadFrame, "payload_b64 is not valid base64"))?
                .into();
        }
        (None, Some(_)) => return Err(err(ErrorCode::BadFrame, "payload_b64 must be a string")),
        (None, None) => {
            return Err(err(
                ErrorCode::BadFrame,
                "\"payload\" or \"payload_b64\" is required",
            ));
        }
    }
    if f.body_len() > max_frame {
        return Err(err(
            ErrorCode::TooLarge,
            format!("payload exceeds max_frame ({max_frame} bytes)"),
        ));
    }
    Ok(f)
}

struct Page {
    limit: usize,
    after: Option<Bytes>,
}

fn page(query: &str) -> Result<Page, Reply> {
    let limit = match crate::http::query_param(query, "limit") {
        None => DEFAULT_LIMIT,
        Some(l) => l
            .parse::<usize>()
            .map_err(|_| err(ErrorCode::BadFrame, "limit must be a number"))?
            .clamp(1, MAX_LIMIT),
    };
    let after = crate::http::query_param(query, "after")
        .filter(|a| !a.is_empty())
        .map(Bytes::from);
    Ok(Page { limit, after })
}

fn view_json(v: &ClientView, node: &str) -> Value {
    json!({
        "addr": name_str(&v.addr),
        "node": node,
        "online": true,
        "role": v.role.name(),
        "shard": v.shard,
        "connected_at_ms": v.connected_at_ms,
        "remote": v.remote.to_string(),
        "uids": v.uids.iter().map(|u| name_str(u).into_owned()).collect::<Vec<_>>(),
        "groups": v.groups.iter().map(|g| name_str(g).into_owned()).collect::<Vec<_>>(),
        "meta": serde_json::from_slice::<Value>(&v.meta).unwrap_or(json!({})),
        "protocol": v.protocol,
        "version": v.version,
        "transport": v.transport,
    })
}

fn paged(items: Vec<Value>, limit: usize, key: impl Fn(&Value) -> String, more: bool) -> Value {
    let next = if more {
        items.last().map(|v| Value::String(key(v)))
    } else {
        None
    };
    let _ = limit;
    json!({"items": items, "next": next.unwrap_or(Value::Null)})
}

/// Handles one request to `/api/...`.
pub async fn handle(
    api: &Api<'_>,
    method: &str,
    path: &str,
    query: &str,
    authorization: Option<&str>,
    body: &[u8],
) -> Reply {
    if let Some(token) = api.token {
        let given = authorization
            .and_then(|a| a.strip_prefix("Bearer "))
            .map(str::trim);
        if !given.is_some_and(|g| relay_core::auth::same_secret(g.as_bytes(), token.as_bytes())) {
            return err(ErrorCode::Unauthorized, "missing or wrong API token");
        }
    }
    if api.router.is_shutting_down() {
        return err(ErrorCode::ShuttingDown, "relay is shutting down");
    }
    let segs: Vec<&str> = path.trim_start_matches("/api/v1/").split('/').collect();
    // In a cluster, a request this node cannot settle goes to the node that
    // can: the rules lease holder, or the node holding the address.
    let cluster = api
        .cluster
        .filter(|_| !crate::cluster::ask::is_local(query));
    if let Some(c) = cluster
        && c.rules_leader() == Some(false)
        && rules_route(method, &segs)
    {
        let rx = c.ask(crate::cluster::Target::Rules, method, path, query, body);
        return match rx.recv().await {
            Ok(crate::cluster::Answer::Reply { status, body, .. }) => Reply { status, body },
            Ok(crate::cluster::Answer::Nobody) => err(
                ErrorCode::Unavailable,
                "no live node holds the rules lease now; try again",
            ),
            Ok(crate::cluster::Answer::Unavailable(m)) => err(ErrorCode::Unavailable, m),
            Err(_) => err(ErrorCode::Internal, "the cluster link did not answer"),
        };
    }
    if let Some(c) = cluster
        && c.rules_leader().is_none()
        && let Some(addr) = device_addr(method, &segs)
        && !held_here(api, &addr).await
    {
        let rx = c.ask(
            crate::cluster::Target::Addr(addr),
            method,
            path,
            query,
            body,
        );
        match rx.recv().await {
            Ok(crate::cluster::Answer::Reply { status, body, .. }) => {
                return Reply { status, body };
            }
            Ok(crate::cluster::Answer::Unavailable(m)) => {
                return err(ErrorCode::Unavailable, m);
            }
            // Held by no other node: this node's registry answers.
            _ => {}
        }
    }
    let r = match (method, segs.as_slice()) {
        ("POST", ["send"]) => send(api, body).await,
        ("POST", ["uids", uid, "send"]) => fan(api, Index::Uid, uid, body).await,
        ("POST", ["groups", group, "publish"]) => fan(api, Index::Group, group, body).await,
        ("POST", ["broadcast"]) => broadcast(api, body).await,
        ("POST", ["uids", uid, "bind"]) => bind(api, Index::Uid, uid, body).await,
        ("DELETE", ["uids", uid, "bind", addr]) => unbind(api, Index::Uid, uid, addr).await,
        ("POST", ["groups", group, "members"]) => bind(api, Index::Group, group, body).await,
        ("DELETE", ["groups", group, "members", addr]) => {
            unbind(api, Index::Group, group, addr).await
        }
        ("DELETE", ["groups", group]) => dissolve(api, group).await,
        ("GET", ["clients"]) => list(api, query).await,
        ("GET", ["clients", addr]) => client(api, addr).await,
        ("GET", ["clients", addr, "state"]) => state(api, addr),
        ("DELETE", ["clients", addr]) => kick(api, addr).await,
        ("GET", ["uids", uid]) => members(api, Index::Uid, uid, query).await,
        ("GET", ["groups", group]) => members(api, Index::Group, group, query).await,
        ("GET", ["stats"]) => Ok(stats(api)),
        ("GET", ["nodes"]) => Ok(nodes(api)),
        ("GET", ["devices"]) => devices(api, query).await,
        ("GET", ["devices", addr]) => device(api, addr).await,
        ("GET", ["alarms"]) => alarms(api, query),
        ("GET", ["alarms", "history"]) => history(api, query).await,
        ("POST", ["alarms", "ack"]) => ack_many(api, body),
        // Alarm keys hold `/` (`probe-1/offline`): every segment up to the
        // action is the key.
        ("POST", ["alarms", key @ .., "ack"]) if !key.is_empty() => ack(api, &key.join("/"), body),
        ("POST", ["alarms", key @ .., "clear"]) if !key.is_empty() => {
            clear(api, &key.join("/"), body)
        }
        ("POST", ["alarms", key @ .., "shelve"]) if !key.is_empty() => {
            shelve(api, &key.join("/"), body, false)
        }
        ("POST", ["alarms", key @ .., "unshelve"]) if !key.is_empty() => {
            shelve(api, &key.join("/"), body, true)
        }
        ("GET", ["notifications"]) => notifications(api, query).await,
        ("GET", ["devices", addr, "history"]) => series(api, addr, query).await,
        (_, _) => Err(not_found(&format!("{method} {path}"))),
    };
    let r = r.unwrap_or_else(|e| e);
    // Not held on this node: the node that holds the address acts.
    if let Some(c) = cluster
        && r.status == 404
        && r.body["error"] == "no_route"
        && let Some(addr) = held_addr(method, &segs, body)
    {
        let rx = c.ask(
            crate::cluster::Target::Addr(addr),
            method,
            path,
            query,
            body,
        );
        return match rx.recv().await {
            Ok(crate::cluster::Answer::Reply { status, body, .. }) => Reply { status, body },
            Ok(crate::cluster::Answer::Unavailable(m)) => err(ErrorCode::Unavailable, m),
            Ok(crate::cluster::Answer::Nobody) => r,
            Err(_) => err(ErrorCode::Internal, "the cluster link did not answer"),
        };
    }
    r
}

/// The routes answered by the rules engine: with `rules_lease`, the lease
/// holder's.
fn rules_route(method: &str, segs: &[&str]) -> bool {
    matches!(
        (method, segs),
        (_, ["alarms", ..])
            | ("GET", ["devices", ..])
            | ("GET", ["notifications"])
            | ("GET", ["clients", _, "state"])
    )
}

/// The address of a device route, answered by the node holding it.
fn device_addr(method: &str, segs: &[&str]) -> Option<Bytes> {
    match (method, segs) {
        ("GET", ["devices", addr] | ["devices", addr, "history"] | ["clients", addr, "state"]) => {
            name(addr, "addr").ok()
        }
        _ => None,
    }
}

/// The address a route acts on, when its node must hold it.
fn held_addr(method: &str, segs: &[&str], body: &[u8]) -> Option<Bytes> {
    match (method, segs) {
        ("POST", ["uids", _, "bind"] | ["groups", _, "members"]) => body_json(body)
            .ok()
            .and_then(|m| body_addr(&m, "addr").ok()),
        ("DELETE", ["uids", _, "bind", addr] | ["groups", _, "members", addr])
        | ("GET" | "DELETE", ["clients", addr]) => name(addr, "addr").ok(),
        _ => None,
    }
}

/// A shard of this node holds `addr` now.
async fn held_here(api: &Api<'_>, addr: &Bytes) -> bool {
    let owner = shard_of(addr, api.router.shards);
    matches!(
        call(api.router, owner, Call::Client(addr.clone())).await,
        Some(CallResult::Client(Some(_)))
    )
}

async fn send(api: &Api<'_>, body: &[u8]) -> Result<Reply, Reply> {
    let m = body_json(body)?;
    let dst = body_addr(&m, "dst")?;
    let mut f = frame_from(&m, api.max_frame)?;
    api.router
        .api_access(Action::Send, &f.src, &dst, api.token.is_some())
        .map_err(failure)?;
    f.dst = dst;
    let n = acked(api.router, |t| api.router.unicast(f, Some(t), crate::now()))
        .await
        .map_err(failure)?;
    Ok(ok(json!({"count": n})))
}

async fn fan(api: &Api<'_>, index: Index, raw: &str, body: &[u8]) -> Result<Reply, Reply> {
    let name = name(raw, if index == Index::Uid { "uid" } else { "group" })?;
    let m = body_json(body)?;
    let f = frame_from(&m, api.max_frame)?;
    // A push to a group is a publish; one to a uid a send to that name.
    let action = match index {
        Index::Group => Action::Publish,
        Index::Uid => Action::Send,
    };
    api.router
        .api_access(action, &f.src, &name, api.token.is_some())
        .map_err(failure)?;
    let exclude: Vec<Bytes> = match m.get("exclude") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(Value::as_str)
            .map(|s| Bytes::copy_from_slice(s.as_bytes()))
            .collect(),
        Some(_) => {
            return Err(err(
                ErrorCode::BadFrame,
                "exclude must be an array of addresses",
            ));
        }
    };
    let n = acked(api.router, |t| {
        api.router
            .fanout(index, &name, f, exclude, Some(t), crate::now())
    })
    .await;
    // Reaching nobody is not an error for a group or uid: the count says it.
    Ok(ok(json!({"count": n.unwrap_or(0)})))
}

async fn broadcast(api: &Api<'_>, body: &[u8]) -> Result<Reply, Reply> {
    let m = body_json(body)?;
    let f = frame_from(&m, api.max_frame)?;
    let role = match m.get("role").and_then(Value::as_str) {
        None => None,
        Some(r) => Some(
            Role::from_name(r)
                .ok_or_else(|| err(ErrorCode::BadFrame, format!("unknown role {r:?}")))?,
        ),
    };
    let mut n = 0;
    for r in call_all(api.router, Call::Broadcast { frame: f, role }).await {
        if let CallResult::Done(Ok(k)) = r {
            n += k;
        }
    }
    Ok(ok(json!({"count": n})))
}

async fn bind(api: &Api<'_>, index: Index, raw: &str, body: &[u8]) -> Result<Reply, Reply> {
    let name = name(raw, if index == Index::Uid { "uid" } else { "group" })?;
    let addr = body_addr(&body_json(body)?, "addr")?;
    let owner = shard_of(&addr, api.router.shards);
    match call(api.router, owner, Call::Bind { index, name, addr }).await {
        Some(CallResult::Done(Ok(_))) => Ok(ok(json!({"ok": true}))),
        Some(CallResult::Done(Err(f))) => Err(failure(f)),
        _ => Err(err(ErrorCode::Internal, "the owner shard did not answer")),
    }
}

async fn unbind(api: &Api<'_>, index: Index, raw: &str, addr: &str) -> Result<Reply, Reply> {
    let name = name(raw, if index == Index::Uid { "uid" } else { "group" })?;
    let addr = self::name(addr, "addr")?;
    let owner = shard_of(&addr, api.router.shards);
    match call(api.router, owner, Call::Unbind { index, name, addr }).await {
        Some(CallResult::Done(Ok(_))) => Ok(ok(json!({"ok": true}))),
        Some(CallResult::Done(Err(f))) => Err(failure(f)),
        _ => Err(err(ErrorCode::Internal, "the owner shard did not answer")),
    }
}

async fn dissolve(api: &Api<'_>, raw: &str) -> Result<Reply, Reply> {
    let group = name(raw, "group")?;
    let mut n = 0;
    for r in call_all(api.router, Call::Dissolve(group.clone())).await {
        if let CallResult::Done(Ok(k)) = r {
            n += k;
        }
    }
    if n == 0 {
        return Err(err(
            ErrorCode::NoRoute,
            format!("group {} has no members", name_str(&group)),
        ));
    }
    Ok(ok(json!({"count": n})))
}

async fn client(api: &Api<'_>, raw: &str) -> Result<Reply, Reply> {
    let addr = name(raw, "addr")?;
    let owner = shard_of(&addr, api.router.shards);
    match call(api.router, owner, Call::Client(addr.clone())).await {
        Some(CallResult::Client(Some(v))) => Ok(ok(view_json(&v, &api.router.cfg().node))),
        _ => Err(failure(crate::router::failure::offline(&addr))),
    }
}

fn state(api: &Api<'_>, raw: &str) -> Result<Reply, Reply> {
    let addr = name(raw, "addr")?;
    let p = api.plugins.ok_or_else(|| {
        err(
            ErrorCode::Unsupported,
            "rules are disabled: no device shadow",
        )
    })?;
    Ok(ok(p.state(&name_str(&addr))))
}

async fn kick(api: &Api<'_>, raw: &str) -> Result<Reply, Reply> {
    let addr = name(raw, "addr")?;
    let owner = shard_of(&addr, api.router.shards);
    match call(api.router, owner, Call::Kick(addr)).await {
        Some(CallResult::Done(Ok(_))) => Ok(ok(json!({"ok": true}))),
        Some(CallResult::Done(Err(f))) => Err(failure(f)),
        _ => Err(err(ErrorCode::Internal, "the owner shard did not answer")),
    }
}

async fn list(api: &Api<'_>, query: &str) -> Result<Reply, Reply> {
    let p = page(query)?;
    let role = match crate::http::query_param(query, "role").filter(|r| !r.is_empty()) {
        None => None,
        Some(r) => Some(
            Role::from_name(&r)
                .ok_or_else(|| err(ErrorCode::BadFrame, format!("unknown role {r:?}")))?,
        ),
    };
    let prefix = crate::http::query_param(query, "prefix").unwrap_or_default();
    let mut all: Vec<ClientView> = Vec::new();
    // One more than the page tells whether there is a next one.
    let c = Call::List {
        role,
        prefix,
        after: p.after,
        limit: p.limit + 1,
    };
    for r in call_all(api.router, c).await {
        if let CallResult::List(v) = r {
            all.extend(v);
        }
    }
    let me = api.router.cfg().node.clone();
    // In a cluster, each node lists its own clients and this one merges
    // them (or asks only the node named by `node`).
    let want = crate::http::query_param(query, "node").filter(|n| !n.is_empty());
    let fleet = api
        .cluster
        .filter(|_| !crate::cluster::ask::is_local(query));
    let asked: Vec<(String, async_channel::Receiver<crate::cluster::Answer>)> = match fleet {
        Some(c) => c
            .peers()
            .into_iter()
            .filter(|n| want.as_ref().is_none_or(|w| w == n))
            .map(|n| {
                let rx = c.ask(
                    crate::cluster::Target::Node(n.clone()),
                    "GET",
                    "/api/v1/clients",
                    query,
                    b"",
                );
                (n, rx)
            })
            .collect(),
        None => Vec::new(),
    };
    let mut items: Vec<Value> = Vec::new();
    let mut more = false;
    if want.as_ref().is_none_or(|w| *w == me) {
        all.sort_by(|a, b| a.addr.cmp(&b.addr));
        more = all.len() > p.limit;
        all.truncate(p.limit);
        items.extend(all.iter().map(|v| view_json(v, &me)));
    }
    let mut unreachable = Vec::new();
    for (n, rx) in asked {
        match rx.recv().await {
            Ok(crate::cluster::Answer::Reply {
                status: 200,
                mut body,
                ..
            }) => {
                more |= !body["next"].is_null();
                if let Value::Array(a) = body["items"].take() {
                    items.extend(a);
                }
            }
            Ok(crate::cluster::Answer::Reply { body, .. }) => {
                unreachable.push(json!({"node": n, "message": body["message"].clone()}));
            }
            Ok(crate::cluster::Answer::Unavailable(m)) => {
                unreachable.push(json!({"node": n, "message": m}));
            }
            // Gone since the list of nodes was read: it holds nothing.
            Ok(crate::cluster::Answer::Nobody) | Err(_) => {}
        }
    }
    let key = |v: &Value| v["addr"].as_str().unwrap_or("").to_owned();
    items.sort_by_key(key);
    more |= items.len() > p.limit;
    items.truncate(p.limit);
    let mut body = paged(items, p.limit, key, more);
    if fleet.is_some() {
        body["unreachable"] = Value::Array(unreachable);
    }
    Ok(ok(body))
}

async fn members(api: &Api<'_>, index: Index, raw: &str, query: &str) -> Result<Reply, Reply> {
    let name = name(raw, if index == Index::Uid { "uid" } else { "group" })?;
    let p = page(query)?;
    let mut page_items: Vec<Bytes> = Vec::new();
    let mut count = 0usize;
    for r in call_all(
        api.router,
        Call::Members {
            index,
            name: name.clone(),
            after: None,
            limit: usize::MAX,
        },
    )
    .await
    {
        if let CallResult::Members(v) = r {
            count += v.len();
            page_items.extend(
                v.into_iter()
                    .filter(|a| p.after.as_ref().is_none_or(|x| a > x)),
            );
        }
    }
    page_items.sort();
    let more = page_items.len() > p.limit;
    page_items.truncate(p.limit);
    let items: Vec<Value> = page_items
        .iter()
        .map(|a| json!({"addr": name_str(a)}))
        .collect();
    let mut body = paged(
        items,
        p.limit,
        |v| v["addr"].as_str().unwrap_or("").to_owned(),
        more,
    );
    body["count"] = json!(count);
    body[if index == Index::Uid { "uid" } else { "group" }] = json!(name_str(&name));
    if count == 0 && index == Index::Uid {
        return Err(err(
            ErrorCode::NoRoute,
            format!("uid {} has no bound address", name_str(&name)),
        ));
    }
    Ok(ok(body))
}

/// The nodes of the cluster with their clients and load; a relay outside a
/// cluster lists itself alone.
fn nodes(api: &Api<'_>) -> Reply {
    let items = match api.cluster {
        Some(c) => c.nodes(),
        None => {
            let mut by_role = serde_json::Map::new();
            let mut clients = 0;
            for (i, r) in Role::ALL.iter().enumerate() {
                let n: u64 = api
                    .stats
                    .iter()
                    .map(|s| s.conns_by_role[i].load(Relaxed))
                    .sum();
                clients += n;
                by_role.insert(r.name().to_owned(), json!(n));
            }
            json!([{
                "node": api.router.cfg().node,
                "self": true,
                "clients": clients,
                "by_role": by_role,
                "shards": api.stats.len(),
                "frames_in": api.stats.iter().map(|s| s.frames_in.load(Relaxed)).sum::<u64>(),
                "frames_out": api.stats.iter().map(|s| s.frames_out.load(Relaxed)).sum::<u64>(),
            }])
        }
    };
    ok(json!({"items": items, "clustered": api.cluster.is_some()}))
}

/// Counters of every shard, as `/api/v1/stats` shows them.
pub fn stats(api: &Api<'_>) -> Reply {
    let get = ShardStats::get;
    let mut by_role = serde_json::Map::new();
    for (i, role) in Role::ALL.iter().enumerate() {
        by_role.insert(
            role.name().into(),
            json!(
                api.stats
                    .iter()
                    .map(|s| get(&s.conns_by_role[i]))
                    .sum::<u64>()
            ),
        );
    }
    let shards: Vec<Value> = api
        .stats
        .iter()
        .enumerate()
        .map(|(i, s)| {
            json!({
                "shard": i,
                "connections": s.conns(),
                "frames_in": get(&s.frames_in),
                "frames_out": get(&s.frames_out),
                "queue_bytes": get(&s.queue_bytes),
            })
        })
        .collect();
    let mut drops = serde_json::Map::new();
    for d in DropReason::ALL {
        drops.insert(
            d.name().into(),
            json!(
                api.stats
                    .iter()
                    .map(|s| s.drops[d as usize].load(Relaxed))
                    .sum::<u64>()
            ),
        );
    }
    ok(json!({
        "connections": api.stats.iter().map(|s| s.conns()).sum::<u64>(),
        "connections_by_role": by_role,
        "shards": shards,
        "frames_in": api.stats.iter().map(|s| get(&s.frames_in)).sum::<u64>(),
        "frames_out": api.stats.iter().map(|s| get(&s.frames_out)).sum::<u64>(),
        "drops": drops,
        "uptime_s": api.uptime_s,
    }))
}

fn plugins<'a>(api: &Api<'a>) -> Result<&'a dyn PluginApi, Reply> {
    api.plugins.ok_or_else(|| {
        err(
            ErrorCode::Unsupported,
            "rules are disabled ([plugins] enabled = false)",
        )
    })
}

/// `severity`, `prefix` and `acked` of a query string or a JSON body.
fn alarm_filter(get: impl Fn(&str) -> Option<String>) -> Result<relay_plugins::AlarmFilter, Reply> {
    let severity = match get("severity").filter(|s| !s.is_empty()) {
        None => None,
        Some(s) => Some(relay_config::plugins::Severity::parse(&s).ok_or_else(|| {
            err(
                ErrorCode::BadFrame,
                format!("severity must be critical, major, minor or info, not {s:?}"),
            )
        })?),
    };
    let acked = match get("acked").as_deref() {
        None | Some("") => None,
        Some("true") => Some(true),
        Some("false") => Some(false),
        Some(o) => {
            return Err(err(
                ErrorCode::BadFrame,
                format!("acked must be true or false, not {o:?}"),
            ));
        }
    };
    Ok(relay_plugins::AlarmFilter {
        severity,
        prefix: get("prefix").unwrap_or_default(),
        acked,
    })
}

fn alarms(api: &Api<'_>, query: &str) -> Result<Reply, Reply> {
    let p = page(query)?;
    let after = p
        .after
        .as_ref()
        .map(|a| String::from_utf8_lossy(a).into_owned());
    let f = alarm_filter(|k| crate::http::query_param(query, k))?;
    Ok(ok(plugins(api)?.alarms(&f, after.as_deref(), p.limit)))
}

/// `by` of a body: who acts (defaults to `api`), at most 200 characters.
fn body_by(m: &serde_json::Map<String, Value>) -> Result<String, Reply> {
    match m.get("by") {
        None | Some(Value::Null) => Ok("api".into()),
        Some(Value::String(s)) if !s.trim().is_empty() && s.len() <= 200 => Ok(s.trim().into()),
        Some(_) => Err(err(
            ErrorCode::BadFrame,
            "by must be a name of 1 to 200 characters",
        )),
    }
}

fn no_alarm(key: &str) -> Reply {
    Reply {
        status: 404,
        body: json!({"error": "not_found", "message": format!("no active alarm {key:?}")}),
    }
}

/// Most keys one bulk acknowledge may name.
const MAX_BULK_KEYS: usize = 1000;

fn ack_many(api: &Api<'_>, body: &[u8]) -> Result<Reply, Reply> {
    let p = plugins(api)?;
    let m = body_json(body)?;
    let by = body_by(&m)?;
    let keys = match (m.get("keys"), m.get("all")) {
        (Some(Value::Array(a)), None | Some(Value::Bool(false))) => {
            if a.is_empty() || a.len() > MAX_BULK_KEYS {
                return Err(err(
                    ErrorCode::BadFrame,
                    format!("keys must list 1 to {MAX_BULK_KEYS} alarm keys"),
                ));
            }
            let keys: Option<Vec<String>> =
                a.iter().map(|k| k.as_str().map(str::to_string)).collect();
            Some(keys.ok_or_else(|| err(ErrorCode::BadFrame, "keys must be strings"))?)
        }
        (None, Some(Value::Bool(true))) => None,
        _ => {
            return Err(err(
                ErrorCode::BadFrame,
                "give \"keys\": [alarm keys], or \"all\": true (with \"severity\" or \"prefix\" to narrow it)",
            ));
        }
    };
    let f = alarm_filter(|k| m.get(k).and_then(Value::as_str).map(str::to_string))?;
    Ok(ok(p.ack_many(keys.as_deref(), &f, &by)))
}

fn clear(api: &Api<'_>, raw_key: &str, body: &[u8]) -> Result<Reply, Reply> {
    let p = plugins(api)?;
    let key = crate::http::decode(raw_key);
    let by = body_by(&body_json(body)?)?;
    if p.clear(&key, &by) {
        Ok(ok(json!({"ok": true, "key": key})))
    } else {
        Err(no_alarm(&key))
    }
}

/// Longest shelf: 30 days.
const MAX_SHELVE_S: u64 = 30 * 86_400;

fn shelve(api: &Api<'_>, raw_key: &str, body: &[u8], off: bool) -> Result<Reply, Reply> {
    let p = plugins(api)?;
    let key = crate::http::decode(raw_key);
    let m = body_json(body)?;
    let by = body_by(&m)?;
    let for_ms = if off {
        0
    } else {
        match m.get("for_s").and_then(Value::as_f64) {
            Some(s) if s > 0.0 && s <= MAX_SHELVE_S as f64 => (s * 1000.0) as u64,
            _ => {
                return Err(err(
                    ErrorCode::BadFrame,
                    format!(
                        "for_s must be a number of seconds above 0, at most {MAX_SHELVE_S} (30 days)"
                    ),
                ));
            }
        }
    };
    p.shelve(&key, &by, for_ms)
        .map(ok)
        .ok_or_else(|| no_alarm(&key))
}

fn read_failed(e: relay_plugins::records::ReadError) -> Reply {
    use relay_plugins::records::ReadError;
    match e {
        ReadError::Bad(m) => err(ErrorCode::BadFrame, m),
        ReadError::Unavailable(m) => Reply {
            status: 503,
            body: json!({"error": "unsupported", "message": m}),
        },
    }
}

async fn notifications(api: &Api<'_>, query: &str) -> Result<Reply, Reply> {
    let p = plugins(api)?;
    let limit = page(query)?.limit;
    let before = match crate::http::query_param(query, "after").filter(|a| !a.is_empty()) {
        None => None,
        Some(a) => Some(
            a.parse::<u64>()
                .map_err(|_| err(ErrorCode::BadFrame, "after must be a row id"))?,
        ),
    };
    let param = |k: &str| crate::http::query_param(query, k).filter(|v| !v.is_empty());
    let f = relay_plugins::records::NotifyFilter {
        key: param("key"),
        channel: param("channel"),
        status: param("status"),
    };
    match p.notifications(f, limit, before).recv().await {
        Ok(Ok(v)) => Ok(ok(v)),
        Ok(Err(e)) => Err(read_failed(e)),
        Err(_) => Err(err(ErrorCode::Internal, "the rules engine did not answer")),
    }
}

async fn series(api: &Api<'_>, raw: &str, query: &str) -> Result<Reply, Reply> {
    let p = plugins(api)?;
    let addr = name(raw, "addr")?;
    let param = |k: &str| crate::http::query_param(query, k).filter(|v| !v.is_empty());
    let num = |k: &str| -> Result<Option<u64>, Reply> {
        param(k)
            .map(|v| {
                v.parse::<u64>()
                    .map_err(|_| err(ErrorCode::BadFrame, format!("{k} must be a number")))
            })
            .transpose()
    };
    let limit = num("limit")?
        .unwrap_or(500)
        .clamp(1, relay_plugins::records::MAX_ROWS as u64) as usize;
    let q = SeriesQuery {
        table: param("table"),
        field: param("field"),
        since_ms: num("since_ms")?,
        limit,
    };
    match p.series(&name_str(&addr), q).recv().await {
        Ok(Ok(v)) => Ok(ok(v)),
        Ok(Err(e)) => Err(read_failed(e)),
        Err(_) => Err(err(ErrorCode::Internal, "the rules engine did not answer")),
    }
}

async fn history(api: &Api<'_>, query: &str) -> Result<Reply, Reply> {
    let p = plugins(api)?;
    let limit = page(query)?.limit;
    let before = crate::http::query_param(query, "after").and_then(|a| a.parse().ok());
    let rx = p.history(limit, before);
    match rx.recv().await {
        Ok(Ok(v)) => Ok(ok(v)),
        Ok(Err(msg)) => Err(Reply {
            status: 503,
            body: json!({"error": "unsupported", "message": msg}),
        }),
        Err(_) => Err(err(ErrorCode::Internal, "the rules engine did not answer")),
    }
}

fn ack(api: &Api<'_>, raw_key: &str, body: &[u8]) -> Result<Reply, Reply> {
    let p = plugins(api)?;
    let key = crate::http::decode(raw_key);
    let m = body_json(body)?;
    let by = m.get("by").and_then(Value::as_str).unwrap_or("api");
    match p.ack(&key, by) {
        Some(v) => Ok(ok(v)),
        None => Err(Reply {
            status: 404,
            body: json!({"error": "not_found", "message": format!("no active alarm {key:?}")}),
        }),
    }
}

async fn devices(api: &Api<'_>, query: &str) -> Result<Reply, Reply> {
    let p = plugins(api)?;
    let param = |k: &str| crate::http::query_param(query, k).filter(|v| !v.is_empty());
    let online = match param("status").as_deref() {
        None | Some("all") => None,
        Some("online") => Some(true),
        Some("offline") => Some(false),
        Some(other) => {
            return Err(err(
                ErrorCode::BadFrame,
                format!("status must be online, offline or all, not {other:?}"),
            ));
        }
    };
    let limit = page(query)?.limit;
    let offset = match param("offset") {
        None => 0,
        Some(o) => o
            .parse::<usize>()
            .map_err(|_| err(ErrorCode::BadFrame, "offset must be a number"))?,
    };
    let group = param("group");
    // A group's online members now: the registry records groups at disconnects only.
    let members = match &group {
        None => None,
        Some(g) => {
            let name = name(g, "group")?;
            let mut set = std::collections::HashSet::new();
            for r in call_all(
                api.router,
                Call::Members {
                    index: Index::Group,
                    name,
                    after: None,
                    limit: usize::MAX,
                },
            )
            .await
            {
                if let CallResult::Members(v) = r {
                    set.extend(v.iter().map(|a| name_str(a).into_owned()));
                }
            }
            Some(set)
        }
    };
    let q = relay_plugins::registry::DeviceQuery {
        online,
        prefix: param("prefix").unwrap_or_default(),
        group,
        members,
        role: param("role"),
        offset,
        limit,
    };
    Ok(ok(p.devices(&q)))
}

async fn device(api: &Api<'_>, raw: &str) -> Result<Reply, Reply> {
    let p = plugins(api)?;
    let addr = name(raw, "addr")?;
    let text = name_str(&addr).into_owned();
    let Some(mut d) = p.device(&text) else {
        return Err(Reply {
            status: 404,
            body: json!({"error": "not_found", "message": format!("no device {text:?} was ever seen")}),
        });
    };
    // An online device: its connection as the owner shard sees it now (on
    // the node holding it, in a cluster).
    if d["online"] == json!(true) {
        let owner = shard_of(&addr, api.router.shards);
        let live = match call(api.router, owner, Call::Client(addr.clone())).await {
            Some(CallResult::Client(Some(v))) => Some(view_json(&v, &api.router.cfg().node)),
            _ => match api.cluster {
                Some(c) => {
                    let path = format!(
                        "/api/v1/clients/{}",
                        percent_encoding::utf8_percent_encode(
                            &text,
                            percent_encoding::NON_ALPHANUMERIC
                        )
                    );
                    match c
                        .ask(crate::cluster::Target::Addr(addr), "GET", &path, "", b"")
                        .recv()
                        .await
                    {
                        Ok(crate::cluster::Answer::Reply {
                            status: 200, body, ..
                        }) => Some(body),
                        _ => None,
                    }
                }
                None => None,
            },
        };
        if let Some(live) = live {
            for k in ["groups", "uids", "shard", "node"] {
                d[k] = live[k].clone();
            }
        }
    }
    d["state"] = p.state(&text);
    Ok(ok(d))
}
