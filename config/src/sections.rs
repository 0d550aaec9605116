//! The relay's own configuration sections (`[node]` … `[shutdown]`), each with
//! the defaults that let a newcomer start with no file at all. The sections of
//! the script workers and sinks live in `plugins.rs`.
//!
//! Durations and sizes are plain integers whose unit is in the key name
//! (`_ms`, `_s`, `_kib`, `_bytes`), so an operator never guesses a unit.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};

use serde::{Deserialize, Serialize};

/// `[node]`: who this relay is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NodeConfig {
    /// Name of this node, sent to clients in WELCOME (`"node"`) and used as the
    /// node's key once several nodes share a Redis. Same alphabet as addresses.
    pub name: String,
}

impl Default for NodeConfig {
    fn default() -> Self {
        Self { name: "n1".into() }
    }
}

/// `[listeners]`: where clients connect.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ListenersConfig {
    /// Controllers' TCP port (binary frames, or JSON lines when the first byte
    /// is `{`). Loopback by default so a first start exposes nothing.
    pub tcp: SocketAddr,
    /// HTTP port: console page, `/ws`, `/api`, `/metrics`, `/healthz`.
    pub http: SocketAddr,
    /// Controllers' TLS port (the same protocol inside TLS); off when absent.
    /// Needs `[tls] cert_file` and `key_file`.
    pub tcp_tls: Option<SocketAddr>,
    /// HTTPS port: everything the HTTP port serves (console, `/ws` as wss,
    /// `/api`, `/metrics`) inside TLS; off when absent. Needs `[tls] cert_file`
    /// and `key_file`, and `[http] enabled`.
    pub http_tls: Option<SocketAddr>,
    /// MQTT 3.1.1/5.0 port (docs/mqtt.md); off when absent.
    pub mqtt: Option<SocketAddr>,
    /// MQTT over TLS (conventionally port 8883); off when absent. Uses the
    /// `[tls]` certificate, client certificates, CRL, fragment size, tickets
    /// and handshake deadline like `tcp_tls`; needs `[tls] cert_file` and
    /// `key_file`.
    pub mqtt_tls: Option<SocketAddr>,
    /// Listeners behind a load balancer that sends the PROXY protocol v2
    /// header (`tcp`, `tcp_tls`, `http`, `http_tls`): each connection on them
    /// must start with one, and the client address it names is the one the
    /// relay shows and uses. A connection without a valid header is closed.
    pub proxy_protocol: Vec<String>,
    /// A connection on a `proxy_protocol` listener whose header has not
    /// arrived whole within this time is closed.
    pub proxy_header_timeout_ms: u64,
}

impl Default for ListenersConfig {
    fn default() -> Self {
        Self {
            tcp: SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 7000)),
            http: SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 8080)),
            tcp_tls: None,
            http_tls: None,
            mqtt: None,
            mqtt_tls: None,
            proxy_protocol: Vec::new(),
            proxy_header_timeout_ms: 5000,
        }
    }
}

/// `[shards]`: the thread-per-core runtime.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ShardsConfig {
    /// Number of shards (one executor thread each); 0 means one per available core.
    pub count: usize,
    /// Pin each shard to its own core, so its caches and io_uring stay warm.
    pub pin: bool,
    /// Memory each shard registers with io_uring, in KiB. It is locked memory,
    /// and the locked-memory limit is small (often 8 MiB per process), so keep it low.
    pub io_memory_kib: usize,
    /// Entries of each shard's io_uring submission ring.
    pub ring_depth: u32,
    /// Messages each shard-to-shard channel holds before the sender waits.
    pub mesh_capacity: usize,
    /// Most frames carried by one cross-shard message (batching cuts wakeups).
    pub max_batch: usize,
    /// How each shard drives its client sockets: `uring` (a ring of its own:
    /// multishot receives into provided buffers, batched sends, multishot
    /// accepts) or `epoll` (readiness, then `recv`/`send` calls).
    pub io: IoBackend,
    /// Buffers in each shard's provided-buffer ring (`io = "uring"`).
    pub uring_buffers: u16,
    /// Size of each of those buffers, in bytes.
    pub uring_buffer_size: u32,
    /// Longest time, in µs, a shard lets input wait so that one wake-up
    /// handles the input of many connections, while input arrives steadily
    /// (the pause shrinks as the rate grows). 0: wake for every input.
    pub coalesce_us: u32,
    /// While input is steady (two events or more a millisecond), the
    /// longest time, in µs, a shard's epoll loop keeps the thread waiting on
    /// its sockets itself before it gives the thread back to the executor
    /// (its timers; other shards, other nodes, rules and HTTP end the wait
    /// at once). 0: every wait goes through the executor.
    pub slice_us: u32,
}

/// `[shards] io`: the I/O backend of the shards' client sockets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum IoBackend {
    /// The default: with wake-up batching (`coalesce_us`) it used less CPU
    /// than io_uring in every measured pattern (BENCHMARKS.md).
    #[default]
    Epoll,
    Uring,
}

impl Default for ShardsConfig {
    fn default() -> Self {
        Self {
            count: 0,
            pin: true,
            io_memory_kib: 512,
            ring_depth: 512,
            mesh_capacity: 1024,
            max_batch: 256,
            io: IoBackend::default(),
            uring_buffers: 256,
            uring_buffer_size: 1024,
            coalesce_us: 5000,
            slice_us: 5000,
        }
    }
}

/// `[limits]`: the bounds that keep one client from hurting the others.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// Largest frame body in bytes (PROTOCOL.md `max_frame`; also sent in WELCOME).
    pub max_frame: u32,
    /// Most client connections the whole process accepts; beyond it new
    /// connections are refused. Must leave room under the open-file limit for
    /// listeners, the shard mesh, sinks and the spool.
    pub max_connections: u32,
    /// Bytes one connection's outbound queue may hold before frames to it are dropped.
    pub queue_bytes: usize,
    /// How long a connection's queue may stay full before it is disconnected
    /// as a slow consumer.
    pub slow_consumer_timeout_ms: u64,
    /// Sustained frames per second one connection may send (token bucket rate).
    pub frames_per_sec: u32,
    /// Frames one connection may send in a burst above the rate (bucket size).
    pub burst: u32,
    /// A connection that has not said hello within this time is closed.
    pub hello_timeout_ms: u64,
    /// Most groups one connection may be a member of.
    pub max_groups_per_conn: usize,
    /// Largest hello `meta` object (as JSON text) kept with a session.
    pub max_meta_bytes: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_frame: 65536,
            max_connections: 18000,
            queue_bytes: 262_144,
            slow_consumer_timeout_ms: 5000,
            frames_per_sec: 2000,
            burst: 4000,
            hello_timeout_ms: 10_000,
            max_groups_per_conn: 256,
            max_meta_bytes: 4096,
        }
    }
}

/// `[heartbeat]`: how liveness is judged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HeartbeatConfig {
    /// Heartbeat period offered to clients that do not ask for one.
    pub interval_s: u32,
    /// A connection silent for `idle_factor × heartbeat_s` is closed
    /// (`idle_timeout`), so one or two lost pings do not drop a device.
    pub idle_factor: u32,
    /// Smallest heartbeat a client may ask for (guards the server against ping floods).
    pub min_s: u32,
    /// Largest heartbeat a client may ask for (bounds how long a dead link holds an address).
    pub max_s: u32,
}

impl Default for HeartbeatConfig {
    fn default() -> Self {
        Self {
            interval_s: 30,
            idle_factor: 3,
            min_s: 5,
            max_s: 3600,
        }
    }
}

/// How a hello is authenticated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum AuthMode {
    /// Every hello is accepted: for a first start on loopback and for tests.
    #[default]
    None,
    /// The hello `token` must be an HMAC-SHA256 made with `auth.secret`.
    Hmac,
}

/// `[auth]`: who may connect and what clients may do themselves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// `none` (accept every hello) or `hmac` (check the hello token).
    pub mode: AuthMode,
    /// Key of the HMAC tokens; required when `mode = "hmac"`.
    pub secret: String,
    /// Whether clients may JOIN/LEAVE groups themselves; when false only the
    /// backend manages membership through the HTTP API.
    pub allow_client_join: bool,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            mode: AuthMode::None,
            secret: String::new(),
            allow_client_join: true,
        }
    }
}

/// `[http]`: the HTTP port's features.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpConfig {
    /// Serve HTTP at all (console, WebSocket, API, metrics).
    pub enabled: bool,
    /// Bearer token `/api/*` requires; absent means the API is open (fine on loopback only).
    pub api_token: Option<String>,
    /// Largest request body the API reads, in bytes.
    pub max_body: usize,
    /// Bytes of request bodies one shard holds at once, over all its HTTP
    /// connections; a request whose body would pass it gets 503 before the
    /// body is read. At least `max_body`.
    pub max_bodies_bytes: usize,
    /// Most HTTP connections (API calls, console, WebSocket handshakes) the
    /// whole process holds at once. Its own pool: HTTP never takes the
    /// controllers' `limits.max_connections` slots. A WebSocket moves to
    /// the clients' pool once upgraded.
    pub max_connections: u32,
    /// Connections kept beyond `max_connections` for `/healthz` and
    /// `/metrics` only, so health checks get through a full relay.
    pub health_slots: u32,
    /// A request head must arrive whole within this time of its first byte
    /// (a client dribbling bytes cannot extend it).
    pub head_timeout_ms: u64,
    /// A request body must arrive whole within this time of its head.
    pub body_timeout_ms: u64,
    /// A keep-alive connection with no request for this long is closed.
    pub idle_timeout_ms: u64,
    /// Serve the console page at `/`.
    pub console: bool,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            api_token: None,
            max_body: 1_048_576,
            max_bodies_bytes: 16 * 1_048_576,
            max_connections: 1024,
            health_slots: 4,
            head_timeout_ms: 10_000,
            body_timeout_ms: 30_000,
            idle_timeout_ms: 30_000,
            console: true,
        }
    }
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

/// `[log]`: what is logged and how.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// A tracing `EnvFilter` directive, e.g. `info` or `info,relay_shards=debug`.
    pub level: String,
    /// `text` or `json`.
    pub format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: "info".into(),
            format: LogFormat::Text,
        }
    }
}

/// `[admission]`: how fast new clients are let in, so a whole fleet
/// reconnecting at once (after a network blip or a restart) is spread out
/// instead of taking the relay down. A hello over a limit gets ERROR `busy`
/// with a `retry_after_ms` hint and the connection is closed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdmissionConfig {
    /// Hellos each shard accepts per second, from all sources; 0 turns the
    /// limit off.
    pub hellos_per_sec: u32,
    /// Hellos each shard accepts at once above `hellos_per_sec` (bucket size).
    pub burst: u32,
    /// Hellos each shard accepts per second from one source IP address; 0
    /// (the default) turns the limit off: fleets on cellular or behind a
    /// site's NAT share few public addresses.
    pub per_ip_per_sec: u32,
    /// Hellos from one source address accepted at once above `per_ip_per_sec`.
    pub per_ip_burst: u32,
    /// Source addresses each shard tracks for `per_ip_per_sec`; when all are
    /// in use, addresses not yet tracked are held to the shard limit only.
    pub max_tracked_ips: usize,
    /// Smallest `retry_after_ms` given with `busy`.
    pub retry_min_ms: u64,
    /// `retry_after_ms` is drawn uniformly from `retry_min_ms` to
    /// `retry_min_ms + retry_window_ms`, so refused clients come back spread out.
    pub retry_window_ms: u64,
}

impl Default for AdmissionConfig {
    fn default() -> Self {
        Self {
            hellos_per_sec: 1000,
            burst: 2000,
            per_ip_per_sec: 0,
            per_ip_burst: 50,
            max_tracked_ips: 65_536,
            retry_min_ms: 1000,
            retry_window_ms: 10_000,
        }
    }
}

/// `[upgrade]`: how a running relay hands over to a new process (SIGUSR2)
/// without a reconnect storm.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UpgradeConfig {
    /// Each client of the old process is told to reconnect after a
    /// `retry_after_ms` drawn from 0 to this, so reconnects spread over it.
    pub reconnect_window_ms: u64,
    /// How long the old process keeps serving clients after telling them to
    /// go, so frames already on their way are answered; then the rest are
    /// closed (after `[shutdown] grace_ms` of flushing at most).
    pub drain_ms: u64,
    /// How long the old process waits for the new one to be listening before
    /// it gives up the upgrade and keeps running.
    pub ready_timeout_ms: u64,
}

impl Default for UpgradeConfig {
    fn default() -> Self {
        Self {
            reconnect_window_ms: 30_000,
            drain_ms: 5_000,
            ready_timeout_ms: 30_000,
        }
    }
}

/// `[shutdown]`: how the relay stops.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ShutdownConfig {
    /// Longest time spent draining outbound queues after BYE/`shutting_down`
    /// before connections are closed regardless.
    pub grace_ms: u64,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        Self { grace_ms: 5000 }
    }
}

/// `[tls]`: the certificate and the bounds of the TLS listeners.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// Certificate chain (PEM, leaf first) served on the TLS listeners.
    pub cert_file: Option<String>,
    /// Private key (PEM: PKCS#8, PKCS#1 or SEC1) of the certificate.
    pub key_file: Option<String>,
    /// A connection that has not finished its TLS handshake within this time is closed.
    pub handshake_timeout_ms: u64,
    /// Largest TLS record the relay sends, in bytes (plaintext per record);
    /// 0 means the protocol maximum (16384). Small devices (BearSSL on an
    /// ESP8266) want 512-1024.
    pub max_fragment_size: usize,
    /// Bytes of TLS output one connection may buffer before the relay stops
    /// feeding it (and of input before its handshake completes).
    pub buffer_limit_bytes: usize,
    /// Application protocols offered in ALPN, most preferred first; empty
    /// accepts a client whatever it offers.
    pub alpn: Vec<String>,
    /// Issue session tickets so reconnecting clients skip the full handshake.
    pub session_tickets: bool,
    /// CA certificates (PEM) that sign device certificates: when set,
    /// controllers on `tcp_tls` (and MQTT clients on `mqtt_tls`) present a
    /// client certificate verified against them (mutual TLS), and the
    /// certificate names the device's address (its hello or CONNECT needs
    /// no token or password and can claim no other address or client id).
    pub client_ca_file: Option<String>,
    /// Certificate revocation lists (PEM, one or more CRLs) of the device
    /// CAs: a device certificate whose serial one of them lists is refused.
    /// Needs `client_ca_file`; reloaded with the certificate on SIGHUP.
    pub crl_file: Option<String>,
    /// With `client_ca_file`: refuse a handshake without a client
    /// certificate (false lets such clients in, to authenticate by token).
    pub require_client_cert: bool,
    /// Where a device certificate names the address: `cn` (the subject's
    /// common name) or `san` (its first DNS subject alternative name).
    pub client_address: String,
}

impl Default for TlsConfig {
    fn default() -> Self {
        Self {
            cert_file: None,
            key_file: None,
            handshake_timeout_ms: 10_000,
            max_fragment_size: 0,
            buffer_limit_bytes: 32 * 1024,
            alpn: Vec::new(),
            session_tickets: true,
            client_ca_file: None,
            crl_file: None,
            require_client_cert: true,
            client_address: "cn".into(),
        }
    }
}

/// `[cluster]`: several relay nodes forming one address space over NATS
/// (with JetStream). Off by default: a single relay needs nothing outside itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterConfig {
    /// Join the cluster named by `prefix` on the NATS server at `nats_url`.
    pub enabled: bool,
    /// The NATS server (`nats://host:port`); JetStream must be enabled on it.
    pub nats_url: String,
    /// Names the cluster: the NATS subjects start with `<prefix>.` and the
    /// JetStream buckets with `<prefix>_`. Nodes with the same prefix form one
    /// cluster; another prefix on the same NATS server is another cluster.
    pub prefix: String,
    /// A node that has not been heard of for this long is taken as gone: its
    /// directory entries expire and its addresses are free to be taken. The
    /// node refreshes its entries and says it is alive three times per period.
    pub heartbeat_ms: u64,
    /// Most bytes of frames one NATS message to one node carries (a batch);
    /// below the NATS server's `max_payload` (1 MiB by default).
    pub batch_bytes: usize,
    /// Messages each channel between the shards and the NATS thread holds;
    /// a full channel drops the message and counts it (a shard never waits).
    pub channel_capacity: usize,
    /// Most directory entries (address → node) a node keeps in memory, and
    /// most MQTT topic filters of other nodes (filter, node) it keeps.
    pub cache_size: usize,
    /// How long a frame with ACK_REQ sent to another node waits for that
    /// node's answer before the sender gets `unavailable`.
    pub reply_timeout_ms: u64,
    /// Most API requests under way between this node and the others at once
    /// (each way); more are answered `unavailable` (or `busy`) at once.
    pub api_inflight: usize,
    /// Run the rules engine (rules, alarms, notifiers) on one node of the
    /// cluster at a time: the node holding the rules lease. The others
    /// forward their clients' events to it. Needs `[plugins] enabled`.
    pub rules_lease: bool,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            nats_url: "nats://127.0.0.1:4222".into(),
            prefix: "relay".into(),
            heartbeat_ms: 3000,
            batch_bytes: 256 * 1024,
            channel_capacity: 8192,
            cache_size: 1_000_000,
            reply_timeout_ms: 5000,
            api_inflight: 64,
            rules_lease: false,
        }
    }
}

/// `[mqtt]`: how MQTT clients map onto addresses and groups, and the bounds
/// of their sessions (docs/mqtt.md).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MqttConfig {
    /// DATA sent to an MQTT client's address arrives as PUBLISH on
    /// `<inbox_prefix>/<sender>`.
    pub inbox_prefix: String,
    /// An MQTT client sends DATA to address `<dst>` by publishing to
    /// `<outbox_prefix>/<dst>`.
    pub outbox_prefix: String,
    /// Largest whole packet a client may send (bytes).
    pub max_packet_size: u32,
    /// QoS 1/2 messages in flight to one client.
    pub max_inflight: u16,
    /// QoS 2 publishes a client may leave waiting for PUBREL.
    pub receive_maximum: u16,
    /// Messages queued for one session (window full, or offline).
    pub max_queued_messages: usize,
    /// Bytes queued for one session.
    pub max_queued_bytes: usize,
    /// Longest session expiry granted (seconds); a 3.1.1 persistent session
    /// gets exactly this.
    pub max_session_expiry_s: u32,
    /// Subscriptions one session may hold.
    pub max_subscriptions: usize,
    /// A socket that sends no CONNECT within this is closed.
    pub connect_timeout_ms: u64,
    /// Retained messages kept by each shard.
    pub max_retained_messages: usize,
    /// Bytes of retained messages kept by each shard.
    pub max_retained_bytes: usize,
}

impl Default for MqttConfig {
    fn default() -> Self {
        Self {
            inbox_prefix: "relay/from".into(),
            outbox_prefix: "relay/to".into(),
            max_packet_size: 256 * 1024,
            max_inflight: 64,
            receive_maximum: 64,
            max_queued_messages: 1000,
            max_queued_bytes: 1024 * 1024,
            max_session_expiry_s: 86_400,
            max_subscriptions: 256,
            connect_timeout_ms: 10_000,
            max_retained_messages: 100_000,
            max_retained_bytes: 64 * 1024 * 1024,
        }
    }
}
