//! The rules a well-typed configuration must still keep: ranges, and keys that
//! must agree with each other. Every broken rule becomes one `Problem`; none
//! panics. Warnings are things that load but deserve an operator's look.

use std::net::SocketAddr;

use crate::{AuthMode, Config, Problem};

/// Smallest `limits.max_frame`: the fixed part of a binary body (PROTOCOL.md).
pub const MIN_FRAME: u32 = relay_core::frame::MIN_BODY as u32;
/// Largest `limits.max_frame` (16 MiB): beyond it one frame could pin a
/// shard's memory and the outbound queues stop meaning anything.
pub const MAX_FRAME_CEILING: u32 = 16 * 1024 * 1024;
/// The per-process open-file limit the relay is sized for.
pub const OPEN_FILES_LIMIT: u32 = 20_000;
/// Descriptors kept for everything that is not a client: listeners and the
/// shard mesh of every shard, io_uring, Redis/MySQL/notifier sockets, the spool.
pub const RESERVED_FILES: u32 = 1_000;
/// Largest `limits.max_connections`.
pub const MAX_CONNECTIONS_CEILING: u32 = OPEN_FILES_LIMIT - RESERVED_FILES;
/// Largest `shards.count`, and the most shards a relay runs: the router keeps
/// the shards a group reaches in a 64-bit mask, one bit per shard.
pub const MAX_SHARDS: usize = 64;
/// Shortest secret that is not reported as weak, in bytes.
pub const MIN_SECRET_BYTES: usize = 16;
/// Longest name of a node (the alphabet and length of addresses).
pub const MAX_NODE_NAME: usize = relay_core::name::MAX_NAME_LEN;

const MIB: u64 = 1024 * 1024;

/// Collects problems for one configuration.
struct Rules {
    problems: Vec<Problem>,
}

impl Rules {
    fn fail(&mut self, key: &str, reason: impl Into<String>) {
        self.problems.push(Problem::at(key, reason));
    }

    /// `value` must lie in `min..=max`.
    fn range(&mut self, key: &str, value: u64, min: u64, max: u64, why: &str) {
        if value < min || value > max {
            let what = if value < min {
                format!("at least {min}")
            } else {
                format!("at most {max}")
            };
            self.fail(key, format!("is {value}, must be {what}{why}"));
        }
    }
}

/// Every rule broken by `config`, with `file` left for the caller to fill in.
pub(crate) fn check(config: &Config) -> Vec<Problem> {
    let mut r = Rules {
        problems: Vec::new(),
    };
    let c = config;

    if let Err(reason) = check_name(&c.node.name) {
        r.fail("node.name", reason);
    }

    if c.http.enabled && c.listeners.tcp == c.listeners.http && c.listeners.tcp.port() != 0 {
        r.fail(
            "listeners.http",
            format!("is the same address as listeners.tcp ({})", c.listeners.tcp),
        );
    }

    for (i, name) in c.listeners.proxy_protocol.iter().enumerate() {
        let on = match name.as_str() {
            "tcp" => true,
            "http" => c.http.enabled,
            "tcp_tls" => c.listeners.tcp_tls.is_some(),
            "http_tls" => c.listeners.http_tls.is_some() && c.http.enabled,
            other => {
                r.fail(
                    &format!("listeners.proxy_protocol[{i}]"),
                    format!("unknown listener {other:?}; expected tcp, tcp_tls, http or http_tls"),
                );
                continue;
            }
        };
        if !on {
            r.fail(
                &format!("listeners.proxy_protocol[{i}]"),
                format!("names {name:?}, which is not listening (set listeners.{name})"),
            );
        }
    }
    r.range(
        "listeners.proxy_header_timeout_ms",
        c.listeners.proxy_header_timeout_ms,
        100,
        600_000,
        "",
    );

    let s = &c.shards;
    r.range(
        "shards.count",
        s.count as u64,
        0,
        MAX_SHARDS as u64,
        " (0 means one shard per core; the router tracks shards in 64-bit masks)",
    );
    r.range(
        "shards.io_memory_kib",
        s.io_memory_kib as u64,
        64,
        1024 * 1024,
        " (locked memory for io_uring buffers, per shard)",
    );
    r.range(
        "shards.ring_depth",
        u64::from(s.ring_depth),
        8,
        32_768,
        " (io_uring allows up to 32768 entries)",
    );
    r.range(
        "shards.uring_buffers",
        u64::from(s.uring_buffers),
        1,
        32_768,
        " (buffers of the provided-buffer ring; the kernel allows up to 32768)",
    );
    r.range(
        "shards.uring_buffer_size",
        u64::from(s.uring_buffer_size),
        64,
        1 << 20,
        " (bytes per provided buffer)",
    );
    r.range(
        "shards.coalesce_us",
        u64::from(s.coalesce_us),
        0,
        100_000,
        " (µs a shard may let steady input wait to batch it; 0 wakes for each input)",
    );
    r.range(
        "shards.slice_us",
        u64::from(s.slice_us),
        0,
        20_000,
        " (µs a busy shard's I/O loop may keep the thread from the executor; 0 = never)",
    );
    r.range(
        "shards.mesh_capacity",
        s.mesh_capacity as u64,
        1,
        1 << 20,
        "",
    );
    r.range("shards.max_batch", s.max_batch as u64, 1, 65_536, "");

    let l = &c.limits;
    r.range(
        "limits.max_frame",
        u64::from(l.max_frame),
        u64::from(MIN_FRAME),
        u64::from(MAX_FRAME_CEILING),
        " (a frame body has 9 fixed bytes; 16 MiB is the ceiling)",
    );
    r.range(
        "limits.max_connections",
        u64::from(l.max_connections),
        1,
        u64::from(MAX_CONNECTIONS_CEILING),
        " (the open-file limit is 20000 and 1000 descriptors are kept for listeners, mesh, sinks and spool)",
    );
    r.range(
        "limits.queue_bytes",
        l.queue_bytes as u64,
        1,
        1024 * MIB,
        "",
    );
    // A queue that cannot hold one largest frame (with its 4-byte length prefix) drops it always.
    let frame_ok = (MIN_FRAME..=MAX_FRAME_CEILING).contains(&l.max_frame);
    if frame_ok && l.queue_bytes >= 1 && l.queue_bytes < l.max_frame as usize + 4 {
        r.fail(
            "limits.queue_bytes",
            format!(
                "is {}, must be at least limits.max_frame + 4 ({}) so one largest frame fits in a queue",
                l.queue_bytes,
                u64::from(l.max_frame) + 4
            ),
        );
    }
    r.range(
        "limits.slow_consumer_timeout_ms",
        l.slow_consumer_timeout_ms,
        1,
        3_600_000,
        "",
    );
    r.range(
        "limits.frames_per_sec",
        u64::from(l.frames_per_sec),
        1,
        10_000_000,
        "",
    );
    r.range(
        "limits.burst",
        u64::from(l.burst),
        1,
        100_000_000,
        " (the token bucket's size)",
    );
    r.range(
        "limits.hello_timeout_ms",
        l.hello_timeout_ms,
        100,
        600_000,
        "",
    );
    r.range(
        "limits.max_groups_per_conn",
        l.max_groups_per_conn as u64,
        0,
        1 << 20,
        "",
    );
    r.range("limits.max_meta_bytes", l.max_meta_bytes as u64, 0, MIB, "");

    let h = &c.heartbeat;
    r.range("heartbeat.min_s", u64::from(h.min_s), 1, 86_400, "");
    r.range(
        "heartbeat.max_s",
        u64::from(h.max_s),
        1,
        86_400,
        " (one day)",
    );
    r.range(
        "heartbeat.idle_factor",
        u64::from(h.idle_factor),
        2,
        100,
        " (a factor of 1 would drop a client whose ping is a moment late)",
    );
    if h.min_s > h.max_s {
        r.fail(
            "heartbeat.min_s",
            format!("is {}, above heartbeat.max_s ({})", h.min_s, h.max_s),
        );
    } else if h.interval_s < h.min_s || h.interval_s > h.max_s {
        r.fail(
            "heartbeat.interval_s",
            format!(
                "is {}, must lie within heartbeat.min_s..=heartbeat.max_s ({}..={})",
                h.interval_s, h.min_s, h.max_s
            ),
        );
    }

    if c.auth.mode == AuthMode::Hmac && c.auth.secret.is_empty() {
        r.fail(
            "auth.secret",
            "must be set when auth.mode is \"hmac\" (tokens are HMACs made with it)",
        );
    }

    match &c.http.api_token {
        Some(token) if token.is_empty() => r.fail(
            "http.api_token",
            "is empty; set a token, or remove the key to leave the API open",
        ),
        Some(token) if !token.bytes().all(|b| b.is_ascii_graphic()) => r.fail(
            "http.api_token",
            "must be printable ASCII without spaces (it travels in an Authorization header)",
        ),
        _ => {}
    }
    r.range("http.max_body", c.http.max_body as u64, 1, 64 * MIB, "");
    r.range(
        "http.max_bodies_bytes",
        c.http.max_bodies_bytes as u64,
        (c.http.max_body as u64).max(1),
        16 * 1024 * MIB,
        " (at least http.max_body, so one largest body fits)",
    );
    r.range(
        "http.max_connections",
        u64::from(c.http.max_connections),
        1,
        u64::from(MAX_CONNECTIONS_CEILING),
        "",
    );
    r.range(
        "http.health_slots",
        u64::from(c.http.health_slots),
        0,
        1024,
        "",
    );
    for (key, v) in [
        ("http.head_timeout_ms", c.http.head_timeout_ms),
        ("http.body_timeout_ms", c.http.body_timeout_ms),
        ("http.idle_timeout_ms", c.http.idle_timeout_ms),
    ] {
        r.range(key, v, 100, 3_600_000, "");
    }

    if let Err(reason) = check_log_filter(&c.log.level) {
        r.fail("log.level", reason);
    }

    r.range(
        "shutdown.grace_ms",
        c.shutdown.grace_ms,
        0,
        600_000,
        " (ten minutes)",
    );

    tls_rules(c, &mut r);

    let a = &c.admission;
    r.range(
        "admission.hellos_per_sec",
        u64::from(a.hellos_per_sec),
        0,
        10_000_000,
        " (0 turns the limit off)",
    );
    r.range(
        "admission.burst",
        u64::from(a.burst),
        1,
        100_000_000,
        " (the token bucket's size)",
    );
    r.range(
        "admission.per_ip_per_sec",
        u64::from(a.per_ip_per_sec),
        0,
        10_000_000,
        " (0 turns the limit off)",
    );
    r.range(
        "admission.per_ip_burst",
        u64::from(a.per_ip_burst),
        1,
        100_000_000,
        " (the token bucket's size)",
    );
    r.range(
        "admission.max_tracked_ips",
        a.max_tracked_ips as u64,
        1,
        10_000_000,
        " (memory: about 64 bytes each per shard)",
    );
    r.range(
        "admission.retry_min_ms",
        a.retry_min_ms,
        0,
        3_600_000,
        " (an hour)",
    );
    r.range(
        "admission.retry_window_ms",
        a.retry_window_ms,
        0,
        3_600_000,
        " (an hour)",
    );

    let u = &c.upgrade;
    r.range(
        "upgrade.reconnect_window_ms",
        u.reconnect_window_ms,
        0,
        3_600_000,
        " (an hour)",
    );
    r.range("upgrade.drain_ms", u.drain_ms, 0, 600_000, " (ten minutes)");
    r.range(
        "upgrade.ready_timeout_ms",
        u.ready_timeout_ms,
        1000,
        600_000,
        " (ten minutes)",
    );

    let k = &c.cluster;
    if k.enabled {
        if !(k.nats_url.starts_with("nats://") || k.nats_url.starts_with("tls://"))
            || k.nats_url.len() <= "nats://".len()
        {
            r.fail(
                "cluster.nats_url",
                "must be a NATS URL such as nats://127.0.0.1:4222",
            );
        }
        let prefix_ok = !k.prefix.is_empty()
            && k.prefix.len() <= 32
            && k.prefix
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !prefix_ok {
            r.fail(
                "cluster.prefix",
                "must be 1 to 32 characters of A-Z a-z 0-9 - _ (it names NATS subjects and buckets)",
            );
        }
        let name_ok = c
            .node
            .name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !name_ok {
            r.fail(
                "node.name",
                "in a cluster must be of A-Z a-z 0-9 - _ only (it names a NATS subject)",
            );
        }
    }
    r.range(
        "cluster.heartbeat_ms",
        k.heartbeat_ms,
        300,
        600_000,
        " (a node unheard of for this long is taken as gone)",
    );
    r.range(
        "cluster.batch_bytes",
        k.batch_bytes as u64,
        1024,
        900 * 1024,
        " (one NATS message; the server's max_payload is 1 MiB by default)",
    );
    r.range(
        "cluster.channel_capacity",
        k.channel_capacity as u64,
        16,
        1_000_000,
        " (messages between the shards and the NATS thread)",
    );
    r.range(
        "cluster.cache_size",
        k.cache_size as u64,
        1,
        100_000_000,
        " (directory entries kept in memory, about 150 bytes each)",
    );
    if c.cluster.enabled && k.rules_lease && !c.plugins.enabled {
        r.fail(
            "cluster.rules_lease",
            "needs [plugins] enabled = true (the lease decides which node runs the rules)",
        );
    }
    r.range(
        "cluster.reply_timeout_ms",
        k.reply_timeout_ms,
        100,
        600_000,
        " (ten minutes)",
    );
    r.range(
        "cluster.api_inflight",
        k.api_inflight as u64,
        1,
        10_000,
        " (API requests under way between nodes)",
    );

    let m = &c.mqtt;
    for (key, prefix) in [
        ("mqtt.inbox_prefix", &m.inbox_prefix),
        ("mqtt.outbox_prefix", &m.outbox_prefix),
    ] {
        let ok = !prefix.is_empty()
            && prefix.len() <= 128
            && !prefix.ends_with('/')
            && relay_core::mqtt::validate_topic_name(prefix.as_bytes()).is_ok();
        if !ok {
            r.fail(
                key,
                "must be a topic name of 1 to 128 bytes without wildcards or a trailing /",
            );
        }
    }
    if m.inbox_prefix == m.outbox_prefix {
        r.fail("mqtt.outbox_prefix", "must differ from mqtt.inbox_prefix");
    }
    r.range(
        "mqtt.max_packet_size",
        u64::from(m.max_packet_size),
        64,
        u64::from(MAX_FRAME_CEILING),
        " (16 MiB)",
    );
    r.range(
        "mqtt.max_inflight",
        u64::from(m.max_inflight),
        1,
        65_535,
        "",
    );
    r.range(
        "mqtt.receive_maximum",
        u64::from(m.receive_maximum),
        1,
        65_535,
        "",
    );
    r.range(
        "mqtt.max_queued_messages",
        m.max_queued_messages as u64,
        1,
        1_000_000,
        "",
    );
    r.range(
        "mqtt.max_queued_bytes",
        m.max_queued_bytes as u64,
        1024,
        1024 * MIB,
        " (1 GiB)",
    );
    r.range(
        "mqtt.max_session_expiry_s",
        u64::from(m.max_session_expiry_s),
        0,
        30 * 86_400,
        " (thirty days)",
    );
    r.range(
        "mqtt.max_subscriptions",
        m.max_subscriptions as u64,
        1,
        100_000,
        "",
    );
    r.range(
        "mqtt.connect_timeout_ms",
        m.connect_timeout_ms,
        100,
        600_000,
        " (ten minutes)",
    );
    r.range(
        "mqtt.max_retained_bytes",
        m.max_retained_bytes as u64,
        0,
        16 * 1024 * MIB,
        " (16 GiB)",
    );

    let sections = [
        c.plugins.check(),
        c.redis.check(),
        c.mysql.check(),
        c.notify.check(),
        c.acl.check(),
    ];
    for (key, reason) in sections.into_iter().flatten() {
        r.fail(&key, reason);
    }

    r.problems
}

/// Things that load but deserve a look before production.
pub(crate) fn warnings(config: &Config) -> Vec<Problem> {
    let c = config;
    let mut out = Vec::new();
    let open = |addr: &SocketAddr| !addr.ip().is_loopback();
    if c.auth.mode == AuthMode::Hmac {
        let lower = c.auth.secret.to_ascii_lowercase();
        if lower.contains("change") && lower.contains("me") {
            out.push(Problem::at(
                "auth.secret",
                "is the shipped placeholder; set your own secret",
            ));
        } else if !c.auth.secret.is_empty() && c.auth.secret.len() < MIN_SECRET_BYTES {
            out.push(Problem::at(
                "auth.secret",
                format!("is shorter than {MIN_SECRET_BYTES} bytes; a short key is guessable"),
            ));
        }
    }
    if c.auth.mode == AuthMode::None
        && (open(&c.listeners.tcp) || (c.http.enabled && open(&c.listeners.http)))
    {
        out.push(Problem::at(
            "auth.mode",
            "is \"none\" while a listener is reachable beyond loopback",
        ));
    }
    if c.auth.mode == AuthMode::None && !c.auth.secret.is_empty() {
        out.push(Problem::at(
            "auth.secret",
            "is set but unused while auth.mode is \"none\"",
        ));
    }
    if c.http.enabled && c.http.api_token.is_none() && open(&c.listeners.http) {
        out.push(Problem::at(
            "http.api_token",
            "is not set while the HTTP API is reachable beyond loopback",
        ));
    }
    if let Some(token) = &c.http.api_token {
        let lower = token.to_ascii_lowercase();
        if lower.contains("change") && lower.contains("me") {
            out.push(Problem::at(
                "http.api_token",
                "is the shipped placeholder; set your own token",
            ));
        }
    }
    out
}

/// A node name follows the address rules: 1 to 64 bytes of `A-Z a-z 0-9 . _ : @ -`.
fn check_name(name: &str) -> Result<(), String> {
    relay_core::validate_name(name.as_bytes()).map_err(|err| err.to_string())
}

/// A light check of a tracing `EnvFilter` directive list: comma-separated
/// directives, each a level, a target, or `target[span{field}]=level`.
fn check_log_filter(filter: &str) -> Result<(), String> {
    const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];
    if filter.trim().is_empty() {
        return Err("must not be empty (e.g. \"info\" or \"info,relay_shards=debug\")".into());
    }
    for directive in filter.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        if directive.contains(char::is_whitespace) {
            return Err(format!("directive `{directive}` contains a space"));
        }
        // `target[span{field=value}]` has an `=` that is not the level's.
        let level = directive
            .rsplit_once('=')
            .filter(|(_, level)| !level.contains(['}', ']']));
        if let Some((_, level)) = level {
            let level = level.to_ascii_lowercase();
            let numeric = matches!(level.as_str(), "0" | "1" | "2" | "3" | "4" | "5");
            if !numeric && !LEVELS.contains(&level.as_str()) {
                return Err(format!(
                    "directive `{directive}` ends in an unknown level; use trace, debug, info, warn, error or off"
                ));
            }
        }
    }
    Ok(())
}

/// `[tls]` and the TLS listeners.
fn tls_rules(c: &Config, r: &mut Rules) {
    let t = &c.tls;
    let l = &c.listeners;
    if l.tcp_tls.is_some() || l.http_tls.is_some() || l.mqtt_tls.is_some() {
        for (key, v) in [
            ("tls.cert_file", &t.cert_file),
            ("tls.key_file", &t.key_file),
        ] {
            if v.as_deref().unwrap_or("").is_empty() {
                r.fail(
                    key,
                    "is required when listeners.tcp_tls, listeners.http_tls or listeners.mqtt_tls is set",
                );
            }
        }
    }
    if let Some(addr) = l.http_tls {
        if !c.http.enabled {
            r.fail("listeners.http_tls", "needs http.enabled = true");
        }
        for (other, name) in [(l.tcp, "listeners.tcp"), (l.http, "listeners.http")]
            .into_iter()
            .chain(l.tcp_tls.map(|a| (a, "listeners.tcp_tls")))
        {
            if addr == other && addr.port() != 0 {
                r.fail(
                    "listeners.http_tls",
                    format!("is the same address as {name} ({addr})"),
                );
            }
        }
    }
    if let Some(addr) = l.tcp_tls {
        if addr == c.listeners.tcp && addr.port() != 0 {
            r.fail(
                "listeners.tcp_tls",
                format!("is the same address as listeners.tcp ({addr})"),
            );
        }
        if c.http.enabled && addr == c.listeners.http && addr.port() != 0 {
            r.fail(
                "listeners.tcp_tls",
                format!("is the same address as listeners.http ({addr})"),
            );
        }
    }
    if let Some(addr) = l.mqtt_tls {
        let others = [
            Some((l.tcp, "listeners.tcp")),
            c.http.enabled.then_some((l.http, "listeners.http")),
            l.tcp_tls.map(|a| (a, "listeners.tcp_tls")),
            l.http_tls
                .filter(|_| c.http.enabled)
                .map(|a| (a, "listeners.http_tls")),
            l.mqtt.map(|a| (a, "listeners.mqtt")),
        ];
        for (other, name) in others.into_iter().flatten() {
            if addr == other && addr.port() != 0 {
                r.fail(
                    "listeners.mqtt_tls",
                    format!("is the same address as {name} ({addr})"),
                );
            }
        }
    }
    r.range(
        "tls.handshake_timeout_ms",
        t.handshake_timeout_ms,
        100,
        600_000,
        " (ten minutes)",
    );
    if t.max_fragment_size != 0 {
        r.range(
            "tls.max_fragment_size",
            t.max_fragment_size as u64,
            512,
            16_384,
            " (0 means 16384, the protocol maximum)",
        );
    }
    r.range(
        "tls.buffer_limit_bytes",
        t.buffer_limit_bytes as u64,
        4096,
        16 * 1024 * 1024,
        " (TLS output buffered per connection)",
    );
    if !matches!(t.client_address.as_str(), "cn" | "san") {
        r.fail(
            "tls.client_address",
            format!("is {:?}, must be \"cn\" or \"san\"", t.client_address),
        );
    }
    let set = |v: &Option<String>| v.as_deref().is_some_and(|p| !p.is_empty());
    if set(&t.crl_file) && !set(&t.client_ca_file) {
        r.fail(
            "tls.crl_file",
            "needs tls.client_ca_file (a CRL revokes device certificates of those CAs)",
        );
    }
    for (i, p) in t.alpn.iter().enumerate() {
        if p.is_empty() || p.len() > 255 {
            r.fail(
                &format!("tls.alpn[{i}]"),
                format!("is {} bytes, must be 1-255", p.len()),
            );
        }
    }
}
