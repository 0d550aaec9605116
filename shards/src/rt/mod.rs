//! The glommio runtime: one executor per shard, each with its own listener
//! (SO_REUSEPORT), its I/O loop (`conn`) over the client sockets whose state
//! it keeps in its own table (`io`), the cross-shard mesh, a flusher that
//! batches what crosses, and a sweeper that applies deadlines. Every
//! `use glommio` of the relay, and every client socket, lives under this
//! module.

mod conn;
mod http;
mod io;
pub(crate) mod kick;
mod mqtt;
mod pace;
mod proxy;
mod reload;
mod tls;
mod upgrade;
mod uring;

pub use reload::ReloadReport;
pub use upgrade::{Inherited, UPGRADE_FD_ENV, notify_main_pid, ready, receive_from_env};

use std::cell::{Cell, RefCell};
use std::future::poll_fn;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::Poll;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, bail};
use glommio::channels::channel_mesh::{MeshBuilder, Senders};
use glommio::net::TcpListener;
use glommio::{LocalExecutorPoolBuilder, PoolPlacement, PoolThreadHandles};
use relay_config::{AuthMode, Config};
use relay_core::conn::{ConnConfig, Event, Now};

use crate::router::{Cross, MAX_SHARDS, Router, RouterConfig, Signals};
use crate::stats::ShardStats;

/// Size of each shard's shared read buffer.
const READ_BUF: usize = 64 * 1024;
/// Pending connections the kernel holds per shard (capped by somaxconn).
const LISTEN_BACKLOG: i32 = 4096;
/// How often each shard applies deadlines.
const SWEEP_MS: u64 = 100;

/// What crosses between shards.
#[derive(Debug)]
pub enum MeshMsg {
    Batch(Vec<Cross>),
    Handover(Box<Handover>),
}

/// A connection moving to the shard that owns its address, with everything
/// read and queued so far; the receiving shard takes over the socket `fd`.
#[derive(Debug)]
pub struct Handover {
    pub fd: std::os::fd::OwnedFd,
    pub conn: relay_core::Connection,
    pub hello: relay_core::conn::Hello,
    pub rbuf: bytes::BytesMut,
    /// Bytes already taken for writing but not yet written.
    pub pending_out: bytes::Bytes,
    pub session: crate::cell::Session,
    /// WebSocket frame state, for browser connections.
    pub ws: Option<crate::ws::WsDecoder>,
    /// The TLS session, for connections on a TLS listener.
    pub tls: Option<Box<rustls::ServerConnection>>,
    /// The MQTT session (with its CONNECT), for MQTT clients.
    pub mqtt: Option<Box<crate::router::MqttConn>>,
}

/// The wakers behind the router's [`Signals`]: the I/O loop's (write list)
/// and the flusher's (outboxes). Each task registers itself before it takes
/// its list, so a signal after the take wakes it.
#[derive(Default)]
pub(crate) struct Wakers {
    io: RefCell<Option<std::task::Waker>>,
    flush: RefCell<Option<std::task::Waker>>,
    /// Another task of the shard was woken since the I/O loop last looked:
    /// the loop must let the executor run it before it blocks on its
    /// sockets.
    other: Cell<bool>,
}

impl Wakers {
    fn register(slot: &RefCell<Option<std::task::Waker>>, waker: &std::task::Waker) {
        let mut w = slot.borrow_mut();
        if !w.as_ref().is_some_and(|w| w.will_wake(waker)) {
            *w = Some(waker.clone());
        }
    }

    /// The I/O loop waits for the write list.
    pub(crate) fn io(&self, waker: &std::task::Waker) {
        Self::register(&self.io, waker);
    }

    /// The flusher waits for the outboxes.
    pub(crate) fn flush(&self, waker: &std::task::Waker) {
        Self::register(&self.flush, waker);
    }

    /// A task other than the I/O loop has work (the loop yields before it
    /// blocks on its sockets).
    pub(crate) fn woke_other(&self) {
        self.other.set(true);
    }

    /// Whether another task was woken since the last call.
    pub(crate) fn take_other(&self) -> bool {
        self.other.replace(false)
    }
}

impl Signals for Wakers {
    fn writes_ready(&self) {
        if let Some(w) = self.io.borrow().as_ref() {
            w.wake_by_ref();
        }
    }

    fn outbox_ready(&self) {
        if let Some(w) = self.flush.borrow().as_ref() {
            w.wake_by_ref();
            self.woke_other();
        }
    }
}

/// The clock every shard uses: monotonic ms since start, and wall ms since
/// the epoch derived from it (one clock read per call; the wall offset is
/// taken once at start, so PONG times never jump backwards).
pub fn now() -> Now {
    static START: OnceLock<(Instant, u64)> = OnceLock::new();
    let (start, wall0) = *START.get_or_init(|| {
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        (Instant::now(), wall)
    });
    let mono = start.elapsed().as_millis() as u64;
    Now {
        mono_ms: mono + 1,
        wall_ms: wall0 + mono,
    }
}

/// State shared by all shards of one relay (thread-safe, off the data path).
pub struct Shared {
    pub stop: Arc<AtomicBool>,
    /// Open TCP connections across shards, against `live.max_connections`.
    pub open: AtomicUsize,
    /// What a configuration reload may change.
    pub(crate) live: reload::Live,
    /// Listening sockets to hand to a new process, or taken from the old one.
    pub(crate) handoff: upgrade::Handoff,
    /// The TLS listeners' configuration.
    pub(crate) tls: tls::TlsShared,
    /// Which listeners expect a PROXY protocol header first.
    pub(crate) proxy: proxy::ProxyOn,
    pub stats: Vec<Arc<ShardStats>>,
    pub started: Instant,
    /// `[http] api_token`: required as a bearer token on `/api/*` when set.
    pub api_token: Option<String>,
    pub max_body: usize,
    /// `[http] max_bodies_bytes`: request body bytes one shard holds at once.
    pub max_bodies: usize,
    /// Open HTTP connections (not yet upgraded), against `http_max`.
    pub http_open: AtomicUsize,
    pub http_max: usize,
    /// HTTP connections beyond `http_max` kept for `/healthz` and `/metrics`.
    pub health_slots: usize,
    pub head_timeout: Duration,
    pub body_timeout: Duration,
    pub http_idle: Duration,
    /// Serve the console page at `/`.
    pub console: bool,
    /// The rules engine, when enabled.
    pub plugins: Option<Arc<dyn crate::api::PluginApi + Send + Sync>>,
    /// Extra counters for `/metrics` (the rules engine's).
    pub plugin_metrics: MetricsSource,
    /// The cluster link (`[cluster] enabled`).
    pub cluster: Option<Arc<crate::cluster::Cluster>>,
    /// `[listeners] mqtt`, its port resolved.
    pub mqtt_addr: Option<SocketAddr>,
    /// `[shards] io = "uring"`: each shard's ring.
    pub(crate) ring: Option<uring::RingSettings>,
    /// `[shards] coalesce_us`: the I/O loop's longest pause (`pace.rs`).
    coalesce: Duration,
    /// `[shards] slice_us`: how long the busy epoll loop may keep the thread
    /// (`conn.rs`).
    slice: Duration,
    /// Each shard's wake-up for its peers while its loop waits on its
    /// sockets itself, by shard id.
    kicks: kick::Kicks,
    ready: AtomicUsize,
    /// Shards that have cut every tie to their peers (see `quiesce`).
    quiet: AtomicUsize,
    shards: usize,
    errors: Mutex<Vec<String>>,
}

impl Shared {
    /// Counts a new connection against `max_connections`; false (and a
    /// warning) when the relay is full and the connection must be refused.
    fn admit(&self) -> bool {
        let max = self.live.max_connections.load(Ordering::Relaxed);
        if self.open.fetch_add(1, Ordering::Relaxed) >= max {
            self.open.fetch_sub(1, Ordering::Relaxed);
            crate::warn_every!("limits.max_connections ({max}) reached; connection refused");
            return false;
        }
        true
    }

    /// Counts a new HTTP connection against `[http] max_connections`:
    /// `Some(false)` admitted, `Some(true)` admitted to a health slot
    /// (`/healthz` and `/metrics` only), `None` refused.
    fn admit_http(&self) -> Option<bool> {
        let n = self.http_open.fetch_add(1, Ordering::Relaxed);
        if n < self.http_max {
            return Some(false);
        }
        if n < self.http_max + self.health_slots {
            return Some(true);
        }
        self.http_open.fetch_sub(1, Ordering::Relaxed);
        crate::warn_every!(
            "http.max_connections ({}) and its {} health slots reached; connection refused",
            self.http_max,
            self.health_slots
        );
        None
    }

    /// An HTTP connection counted by `admit_http` has gone (or was upgraded).
    fn release_http(&self) {
        self.http_open.fetch_sub(1, Ordering::Relaxed);
    }

    /// A connection counted by `admit` has gone.
    fn release(&self) {
        self.open.fetch_sub(1, Ordering::Relaxed);
    }

    fn plugin_metrics(&self) -> Vec<(String, String, u64)> {
        self.plugin_metrics
            .as_ref()
            .map(|f| f())
            .unwrap_or_default()
    }
}

/// One shard's runtime state.
pub(crate) struct Shard {
    pub router: Router,
    /// Wakes the I/O loop and the flusher when the router has work for them.
    pub wakers: Rc<Wakers>,
    pub read_buf: RefCell<Vec<u8>>,
    /// The epoll set of every client socket on this shard.
    poller: conn::Poller,
    /// The state of every client socket on this shard (descriptor, TLS
    /// session, partial buffers), by slot; the router's records hold none.
    sockets: io::IoTable,
    /// The controllers' listener, while it accepts.
    listen_fd: Cell<Option<RawFd>>,
    /// Accepts paused after running out of descriptors; the sweeper resumes.
    accept_paused: Cell<bool>,
    /// The TLS listener and the handshakes under way.
    tls: tls::ShardTls,
    /// MQTT listeners whose accepts are paused (out of descriptors), with
    /// their epoll tokens; the sweeper resumes them.
    mqtt_paused: RefCell<Vec<(RawFd, u64)>>,
    /// Connections waiting for their PROXY header: (deadline, id), oldest first.
    proxy_waits: RefCell<std::collections::VecDeque<(u64, crate::cell::ConnId)>>,
    senders: Senders<MeshMsg>,
    shared: Arc<Shared>,
    /// Where items for the cluster link go (`[cluster] enabled`).
    link: Option<crate::cluster::LinkSender>,
    max_batch: usize,
    /// Woken when the shard starts shutting down (stops the accept loops).
    stop_wakers: RefCell<Vec<std::task::Waker>>,
    /// Request body bytes this shard's HTTP connections hold or wait for,
    /// against `Shared::max_bodies`.
    body_bytes: Cell<usize>,
}

impl Shard {
    async fn send_handover(&self, owner: usize, h: Handover) {
        match self
            .senders
            .send_to(owner, MeshMsg::Handover(Box::new(h)))
            .await
        {
            Ok(()) => self.shared.kicks[owner].kick(),
            Err(glommio::GlommioError::Closed(glommio::ResourceType::Channel(
                MeshMsg::Handover(h),
            ))) => {
                // The owner is gone (shutdown): close the connection here.
                drop(h);
                self.shared.release();
            }
            Err(_) => {}
        }
    }
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared").field("open", &self.open).finish()
    }
}

/// A running relay.
pub struct Relay {
    tcp_addr: SocketAddr,
    http_addr: Option<SocketAddr>,
    shared: Arc<Shared>,
    handles: Option<PoolThreadHandles<()>>,
}

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay")
            .field("tcp_addr", &self.tcp_addr)
            .finish()
    }
}

impl Relay {
    /// Starts the shards and returns once every one of them is listening.
    pub fn start(cfg: &Config) -> anyhow::Result<Relay> {
        Self::start_with(cfg, Extensions::default())
    }

    /// Starts with the rules engine (or other extensions) attached.
    pub fn start_with(cfg: &Config, ext: Extensions) -> anyhow::Result<Relay> {
        let shards = cfg.shard_count().clamp(1, MAX_SHARDS);
        // Every shard binds with SO_REUSEPORT, which would let a second relay
        // started with the same config share the ports and split the
        // address space: make sure nobody listens there first (unless this
        // is an upgrade, whose predecessor listens there).
        if ext.inherited.is_none() {
            ensure_free(cfg.listeners.tcp)?;
            if cfg.http.enabled {
                ensure_free(cfg.listeners.http)?;
            }
        }
        let reserve = reserve_port(cfg.listeners.tcp)
            .with_context(|| format!("binding {}", cfg.listeners.tcp))?;
        let tcp_addr = reserve
            .local_addr()?
            .as_socket()
            .context("tcp listener address")?;
        let http_reserve = if cfg.http.enabled {
            Some(
                reserve_port(cfg.listeners.http)
                    .with_context(|| format!("binding {}", cfg.listeners.http))?,
            )
        } else {
            None
        };
        let http_addr = match &http_reserve {
            Some(r) => Some(
                r.local_addr()?
                    .as_socket()
                    .context("http listener address")?,
            ),
            None => None,
        };
        // An upgrade listens where its predecessor listened.
        let (tcp_addr, http_addr) = match &ext.inherited {
            Some(inh) => {
                let (tcp, http) = inh.addrs()?;
                (tcp, http_addr.and(http.or(http_addr)))
            }
            None => (tcp_addr, http_addr),
        };
        let https = cfg.listeners.http_tls.filter(|_| cfg.http.enabled);
        // An upgrade takes the TLS listeners of its predecessor too: same
        // sockets, same addresses (a port 0 in the file resolved as before).
        let (inh_tls, inh_https) = ext
            .inherited
            .as_ref()
            .map_or((None, None), |i| i.tls_addrs());
        let (tls_reserve, tls_addr) = match (cfg.listeners.tcp_tls, inh_tls) {
            (Some(_), Some(a)) => (None, Some(a)),
            (want, _) => reserve_optional(want)?,
        };
        let (https_reserve, https_addr) = match (https, inh_https) {
            (Some(_), Some(a)) => (None, Some(a)),
            (want, _) => reserve_optional(want)?,
        };
        // And its MQTT listeners, plain and TLS.
        let (inh_mqtt, inh_mqtts) = ext
            .inherited
            .as_ref()
            .map_or((None, None), |i| i.mqtt_addrs());
        let (mqtt_reserve, mqtt_addr) = match (cfg.listeners.mqtt, inh_mqtt) {
            (Some(_), Some(a)) => (None, Some(a)),
            (want, _) => reserve_optional(want)?,
        };
        let (mqtts_reserve, mqtts_addr) = match (cfg.listeners.mqtt_tls, inh_mqtts) {
            (Some(_), Some(a)) => (None, Some(a)),
            (want, _) => reserve_optional(want)?,
        };
        let tls = tls::TlsShared::new(cfg, tls_addr, https_addr, mqtts_addr)?;
        let stats: Vec<Arc<ShardStats>> = (0..shards)
            .map(|_| Arc::new(ShardStats::default()))
            .collect();
        let kicks = kick::Kicks::new(shards).map_err(|e| anyhow::anyhow!("eventfd: {e}"))?;
        let cluster = if cfg.cluster.enabled {
            let facts = crate::cluster::NodeFacts {
                tcp: Some(tcp_addr),
                http: http_addr,
            };
            Some(crate::cluster::Cluster::start(
                cfg,
                shards,
                stats.clone(),
                facts,
                ext.rules_lease.clone(),
                kicks.clone(),
            )?)
        } else {
            None
        };
        let shared = Arc::new(Shared {
            stop: Arc::new(AtomicBool::new(false)),
            open: AtomicUsize::new(0),
            live: reload::Live::new(cfg),
            handoff: upgrade::Handoff::new(ext.inherited.clone(), cfg.shutdown.grace_ms),
            tls,
            proxy: proxy::ProxyOn::new(&cfg.listeners),
            stats,
            started: Instant::now(),
            api_token: cfg.http.api_token.clone(),
            max_body: cfg.http.max_body,
            max_bodies: cfg.http.max_bodies_bytes,
            http_open: AtomicUsize::new(0),
            http_max: cfg.http.max_connections as usize,
            health_slots: cfg.http.health_slots as usize,
            head_timeout: Duration::from_millis(cfg.http.head_timeout_ms),
            body_timeout: Duration::from_millis(cfg.http.body_timeout_ms),
            http_idle: Duration::from_millis(cfg.http.idle_timeout_ms),
            console: cfg.http.console,
            plugins: ext.plugins,
            plugin_metrics: ext.plugin_metrics,
            cluster,
            mqtt_addr,
            ring: (cfg.shards.io == relay_config::IoBackend::Uring).then_some(
                uring::RingSettings {
                    entries: cfg.shards.ring_depth,
                    buffers: cfg.shards.uring_buffers,
                    buffer_size: cfg.shards.uring_buffer_size,
                },
            ),
            coalesce: Duration::from_micros(u64::from(cfg.shards.coalesce_us)),
            slice: Duration::from_micros(u64::from(cfg.shards.slice_us)),
            kicks: kicks.clone(),
            ready: AtomicUsize::new(0),
            quiet: AtomicUsize::new(0),
            shards,
            errors: Mutex::new(Vec::new()),
        });
        let rcfg = router_config(cfg);
        shared.live.set_acl(rcfg.acl.clone());
        // glommio's MeshBuilder holds an `Rc` yet is `Send`: cloning or
        // dropping it on several threads at once races on a non-atomic
        // count, and a lost increment frees the peer list while shards still
        // use it (heap corruption seen as a broken allocation much later).
        // So every clone is made here, on one thread, before any shard runs,
        // and each shard takes its own out of a mutex. The only count changes
        // left on shard threads are the drops at the end of `join`, and a lost
        // decrement can only keep the list alive, never free it early.
        let mesh = {
            let one = MeshBuilder::<MeshMsg, _>::full(shards, cfg.shards.mesh_capacity.max(1));
            let all: Vec<_> = (0..shards).map(|_| one.clone()).collect();
            drop(one);
            Arc::new(Mutex::new(all))
        };
        let placement = if cfg.shards.pin {
            PoolPlacement::MaxSpread(shards, None)
        } else {
            PoolPlacement::Unbound(shards)
        };
        let max_batch = cfg.shards.max_batch.max(1);
        let grace = cfg.shutdown.grace_ms;
        let sh = shared.clone();
        let hooks = ext.hooks;
        let actions = ext.actions;
        if let Some(a) = &actions {
            // A shard in its busy loop is not polling the channel: wake them
            // all (any of them may take the action).
            let kicks = kicks.clone();
            a.on_send(Some(Arc::new(move || kicks.kick_all())));
        }
        let handles = LocalExecutorPoolBuilder::new(placement)
            .name("relay-shard")
            .io_memory(cfg.shards.io_memory_kib.max(64) * 1024)
            .ring_depth(cfg.shards.ring_depth.max(8) as usize)
            .on_all_shards(move || {
                let mesh = mesh.lock().ok().and_then(|mut v| v.pop());
                let (rcfg, sh) = (rcfg.clone(), sh.clone());
                let hooks = hooks.clone();
                let actions = actions.clone();
                async move {
                    let Some(mesh) = mesh else {
                        sh.errors
                            .lock()
                            .map(|mut v| v.push("no mesh left for a shard".into()))
                            .ok();
                        sh.stop.store(true, Ordering::SeqCst);
                        return;
                    };
                    let addrs = (tcp_addr, http_addr);
                    let r = shard_main(
                        mesh,
                        rcfg,
                        sh.clone(),
                        addrs,
                        shards,
                        max_batch,
                        grace,
                        hooks,
                        actions,
                    );
                    if let Err(e) = r.await {
                        sh.errors.lock().map(|mut v| v.push(format!("{e:#}"))).ok();
                        sh.stop.store(true, Ordering::SeqCst);
                    }
                }
            })
            .map_err(|e| anyhow::anyhow!("starting shard executors: {e}"))?;
        let deadline = Instant::now() + Duration::from_secs(20);
        while shared.ready.load(Ordering::SeqCst) < shards {
            if let Some(e) = shared.errors.lock().ok().and_then(|v| v.first().cloned()) {
                shared.stop.store(true, Ordering::SeqCst);
                let _ = handles.join_all();
                bail!("shard failed to start: {e}");
            }
            if Instant::now() > deadline {
                shared.stop.store(true, Ordering::SeqCst);
                bail!("shards did not start within 20 s");
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        drop(reserve);
        drop(http_reserve);
        drop(tls_reserve);
        drop(https_reserve);
        drop(mqtt_reserve);
        drop(mqtts_reserve);
        if let Some(a) = mqtt_addr {
            tracing::info!("MQTT listening mqtt_addr={a}");
        }
        if let Some(a) = mqtts_addr {
            tracing::info!("MQTT listening mqtt_tls_addr={a}");
        }
        match http_addr {
            Some(h) => {
                tracing::info!("relay listening tcp_addr={tcp_addr} http_addr={h} shards={shards}")
            }
            None => tracing::info!("relay listening tcp_addr={tcp_addr} shards={shards}"),
        }
        if let Some(a) = tls_addr {
            tracing::info!("TLS listening tcp_tls_addr={a}");
        }
        if let Some(a) = https_addr {
            tracing::info!("TLS listening http_tls_addr={a}");
        }
        Ok(Relay {
            tcp_addr,
            http_addr,
            shared,
            handles: Some(handles),
        })
    }

    /// Where controllers connect.
    pub fn tcp_addr(&self) -> SocketAddr {
        self.tcp_addr
    }

    /// Where controllers connect over TLS, when `[listeners] tcp_tls` is set.
    pub fn tcp_tls_addr(&self) -> Option<SocketAddr> {
        self.shared.tls.tcp_addr
    }

    /// Where HTTPS (the console, wss, the API) is served, when
    /// `[listeners] http_tls` is set.
    pub fn http_tls_addr(&self) -> Option<SocketAddr> {
        self.shared.tls.http_addr
    }

    /// Where MQTT clients connect, when `[listeners] mqtt` is set.
    pub fn mqtt_addr(&self) -> Option<SocketAddr> {
        self.shared.mqtt_addr
    }

    /// Where MQTT clients connect over TLS, when `[listeners] mqtt_tls` is set.
    pub fn mqtt_tls_addr(&self) -> Option<SocketAddr> {
        self.shared.tls.mqtt_addr
    }

    /// Where the HTTP API, `/ws`, `/metrics` and the console are served.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http_addr
    }

    /// Per-shard counters.
    pub fn stats(&self) -> &[Arc<ShardStats>] {
        &self.shared.stats
    }

    /// Time since the relay started.
    pub fn uptime(&self) -> Duration {
        self.shared.started.elapsed()
    }

    /// The flag that stops the relay (for signal handlers).
    pub fn stop_flag(&self) -> Arc<AtomicBool> {
        self.shared.stop.clone()
    }

    /// Begins a graceful shutdown; `join` waits for it.
    pub fn stop(&self) {
        self.shared.stop.store(true, Ordering::SeqCst);
    }

    /// Waits until every shard has exited.
    pub fn join(mut self) -> anyhow::Result<()> {
        if let Some(h) = self.handles.take() {
            let results = h.join_all();
            if let Some(c) = &self.shared.cluster {
                c.stop();
            }
            for r in results {
                if let Err(e) = r {
                    bail!("shard exited with an error: {e:?}");
                }
            }
        }
        Ok(())
    }

    /// The cluster link, when `[cluster] enabled`.
    pub fn cluster(&self) -> Option<&Arc<crate::cluster::Cluster>> {
        self.shared.cluster.as_ref()
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        if let Some(h) = self.handles.take() {
            self.shared.stop.store(true, Ordering::SeqCst);
            let _ = h.join_all();
        }
        if let Some(c) = &self.shared.cluster {
            c.stop();
        }
    }
}

/// Fails when another socket listens on `addr` (port 0 is always free):
/// a bind without SO_REUSEPORT is refused then, whoever holds it. The
/// error names the process that listens there when it can be found.
fn ensure_free(addr: SocketAddr) -> anyhow::Result<()> {
    if addr.port() == 0 {
        return Ok(());
    }
    let domain = if addr.is_ipv6() {
        socket2::Domain::IPV6
    } else {
        socket2::Domain::IPV4
    };
    let probe = socket2::Socket::new(domain, socket2::Type::STREAM, Some(socket2::Protocol::TCP))
        .with_context(|| format!("checking {addr}"))?;
    // SO_REUSEADDR only: connections in TIME_WAIT from a previous run do
    // not count, a listener does.
    probe.set_reuse_address(true)?;
    match probe.bind(&addr.into()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            let who = listener_pid(addr.port())
                .map(|pid| format!("process {pid}"))
                .unwrap_or_else(|| "another process".into());
            bail!(
                "{addr} is in use by {who}; is another relay running with this configuration? \
                 Stop it or change [listeners]"
            )
        }
        Err(e) => Err(e).with_context(|| format!("binding {addr}")),
    }
}

/// The pid of a process with a TCP socket listening on `port`, from
/// /proc (Linux; only processes this user may inspect).
fn listener_pid(port: u16) -> Option<u32> {
    let mut inodes = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            // sl local rem st tx:rx tr:when retrnsmt uid timeout inode
            let (Some(local), Some(state), Some(inode)) = (f.get(1), f.get(3), f.get(9)) else {
                continue;
            };
            let listening = *state == "0A";
            let same_port = local
                .rsplit(':')
                .next()
                .and_then(|p| u16::from_str_radix(p, 16).ok())
                == Some(port);
            if listening && same_port {
                inodes.push(format!("socket:[{inode}]"));
            }
        }
    }
    if inodes.is_empty() {
        return None;
    }
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if let Ok(target) = std::fs::read_link(fd.path())
                && inodes.iter().any(|i| target.as_os_str() == i.as_str())
            {
                return Some(pid);
            }
        }
    }
    None
}

/// Binds (without listening) to learn the port when 0 is asked, and to hold
/// it while every shard binds the same address with SO_REUSEPORT.
fn reserve_port(addr: SocketAddr) -> std::io::Result<socket2::Socket> {
    let domain = if addr.is_ipv6() {
        socket2::Domain::IPV6
    } else {
        socket2::Domain::IPV4
    };
    let s = socket2::Socket::new(domain, socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
    s.set_reuse_port(true)?;
    s.set_reuse_address(true)?;
    s.bind(&addr.into())?;
    Ok(s)
}

/// Checks and reserves an optional listener's address (port 0 resolved).
fn reserve_optional(
    addr: Option<SocketAddr>,
) -> anyhow::Result<(Option<socket2::Socket>, Option<SocketAddr>)> {
    let Some(a) = addr else {
        return Ok((None, None));
    };
    ensure_free(a)?;
    let r = reserve_port(a).with_context(|| format!("binding {a}"))?;
    let resolved = r
        .local_addr()?
        .as_socket()
        .with_context(|| format!("address of {a}"))?;
    Ok((Some(r), Some(resolved)))
}

/// The controllers' listener of one shard: SO_REUSEPORT on the shared
/// address (the kernel spreads connections over the shards), non-blocking
/// for the I/O loop.
fn bind_listener(addr: SocketAddr) -> std::io::Result<socket2::Socket> {
    let s = reserve_port(addr)?;
    s.set_nonblocking(true)?;
    s.set_cloexec(true)?;
    s.listen(LISTEN_BACKLOG)?;
    Ok(s)
}

/// Resolves the router's settings from the config.
pub fn router_config(cfg: &Config) -> RouterConfig {
    let l = &cfg.limits;
    RouterConfig {
        conn: ConnConfig {
            max_frame: l.max_frame as usize,
            hello_timeout_ms: l.hello_timeout_ms,
            heartbeat_default_s: cfg.heartbeat.interval_s,
            heartbeat_min_s: cfg.heartbeat.min_s,
            heartbeat_max_s: cfg.heartbeat.max_s,
            idle_factor: cfg.heartbeat.idle_factor,
            queue_bytes: l.queue_bytes,
            slow_consumer_timeout_ms: l.slow_consumer_timeout_ms,
            frames_per_sec: l.frames_per_sec,
            burst: l.burst,
            max_meta_bytes: l.max_meta_bytes,
            auth_secret: match cfg.auth.mode {
                AuthMode::Hmac => Some(cfg.auth.secret.as_bytes().to_vec()),
                _ => None,
            },
            service_token: match cfg.auth.mode {
                AuthMode::Hmac => cfg.http.api_token.as_ref().map(|t| t.as_bytes().to_vec()),
                _ => None,
            },
        },
        node: cfg.node.name.clone(),
        allow_client_join: cfg.auth.allow_client_join,
        max_groups_per_conn: l.max_groups_per_conn,
        outbox_limit: cfg.shards.mesh_capacity.max(1) * cfg.shards.max_batch.max(1),
        close_grace_ms: 2000,
        admission: cfg.admission.clone(),
        acl: Arc::new(crate::acl::AclRules::build(&cfg.acl, None)),
        cluster: cfg.cluster.enabled,
        mqtt: Arc::new(crate::router::MqttSettings::from_config(&cfg.mqtt)),
    }
}

/// Extra parts attached to a relay at start.
#[derive(Default, Clone)]
pub struct Extensions {
    /// Answers the alarm and device-shadow routes of the API.
    pub plugins: Option<Arc<dyn crate::api::PluginApi + Send + Sync>>,
    /// Makes each shard's event observer (the rules engine's feed).
    pub hooks: HooksFactory,
    /// Extra counters for `/metrics`.
    pub plugin_metrics: MetricsSource,
    /// Sends and publishes from rules; every shard drains this channel.
    pub actions: Option<relay_plugins::ActionReceiver>,
    /// Listening sockets handed over by a previous relay process (upgrade).
    pub inherited: Option<Arc<Inherited>>,
    /// The rules lease the cluster link keeps (`[cluster] rules_lease`).
    pub rules_lease: Option<Arc<crate::cluster::RulesLease>>,
}

impl std::fmt::Debug for Extensions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Extensions")
            .field("plugins", &self.plugins.is_some())
            .finish()
    }
}

/// Extra `/metrics` counters: (name, help, value).
pub type MetricsSource = Option<Arc<dyn Fn() -> Vec<(String, String, u64)> + Send + Sync>>;

/// Builds one shard's event observer, given the shard index.
pub type HooksFactory =
    Option<Arc<dyn Fn(usize, Arc<ShardStats>) -> Box<dyn crate::router::Hooks> + Send + Sync>>;

#[allow(clippy::too_many_arguments)]
async fn shard_main(
    mesh: MeshBuilder<MeshMsg, glommio::channels::channel_mesh::Full>,
    rcfg: RouterConfig,
    shared: Arc<Shared>,
    (tcp_addr, http_addr): (SocketAddr, Option<SocketAddr>),
    shards: usize,
    max_batch: usize,
    grace_ms: u64,
    hooks: HooksFactory,
    actions: Option<relay_plugins::ActionReceiver>,
) -> anyhow::Result<()> {
    let (senders, mut receivers) = mesh
        .join()
        .await
        .map_err(|_| anyhow::anyhow!("mesh join failed"))?;
    let id = senders.peer_id();
    let wakers = Rc::new(Wakers::default());
    let router = Router::new(id, shards, rcfg, shared.stats[id].clone(), wakers.clone());
    if let Some(make) = &hooks {
        *router.hooks.borrow_mut() = Some(make(id, shared.stats[id].clone()));
    }
    let listener = upgrade::tcp_listener(&shared, tcp_addr)
        .map_err(|e| anyhow::anyhow!("shard {id}: binding {tcp_addr}: {e}"))?;
    let http_listener = match http_addr {
        Some(a) => Some(
            upgrade::http_listener(&shared, a)
                .map_err(|e| anyhow::anyhow!("shard {id}: binding {a}: {e}"))?,
        ),
        None => None,
    };
    let ring = match shared.ring.map(uring::Ring::new) {
        Some(Ok(r)) => Some(r),
        Some(Err(e)) => {
            tracing::warn!(
                "shard {id}: no io_uring ring ({e}; it needs Linux 6.0 and io_uring enabled): \
                 this shard uses epoll"
            );
            ShardStats::add(&shared.stats[id].uring_fallbacks, 1);
            None
        }
        None => None,
    };
    let poller = conn::Poller::new(ring, shared.kicks[id].fd())
        .map_err(|e| anyhow::anyhow!("shard {id}: epoll: {e}"))?;
    let shard = Rc::new(Shard {
        router,
        wakers,
        read_buf: RefCell::new(vec![0; READ_BUF]),
        poller,
        sockets: io::IoTable::new(shared.stats[id].clone()),
        listen_fd: Cell::new(None),
        accept_paused: Cell::new(false),
        tls: tls::ShardTls::default(),
        mqtt_paused: RefCell::default(),
        proxy_waits: RefCell::default(),
        senders,
        shared: shared.clone(),
        link: shared.cluster.as_ref().map(|c| c.sender()),
        max_batch,
        stop_wakers: RefCell::new(Vec::new()),
        body_bytes: Cell::new(0),
    });

    // Long-lived tasks; dropping their handles when the shard ends cancels
    // them, so nothing keeps the shard's state (and the relay's) alive.
    let mut tasks = Vec::new();
    for (peer, rx) in receivers.streams() {
        let shard = shard.clone();
        tasks.push(glommio::spawn_local(async move {
            while let Some(msg) = rx.recv().await {
                match msg {
                    MeshMsg::Batch(items) => shard.router.on_cross(peer, items, now()),
                    MeshMsg::Handover(h) => adopt(&shard, *h),
                }
            }
        }));
    }
    tasks.push(glommio::spawn_local(flusher(shard.clone())));
    if let Some(rx) = shared.cluster.as_ref().and_then(|c| c.receiver(id)) {
        tasks.push(glommio::spawn_local(cluster_inbound(shard.clone(), rx)));
    }
    if let Some(rx) = actions {
        tasks.push(glommio::spawn_local(rule_actions(shard.clone(), rx)));
    }
    shard
        .poller
        .watch_listener(listener.as_raw_fd())
        .map_err(|e| anyhow::anyhow!("shard {id}: watching the listener: {e}"))?;
    shard.listen_fd.set(Some(listener.as_raw_fd()));
    let tls_listener = match shared.tls.tcp_addr {
        Some(a) => {
            let l = upgrade::tcp_tls_listener(&shared, a)
                .map_err(|e| anyhow::anyhow!("shard {id}: binding {a}: {e}"))?;
            shard
                .poller
                .watch_tls_listener(l.as_raw_fd())
                .map_err(|e| anyhow::anyhow!("shard {id}: watching the TLS listener: {e}"))?;
            shard.tls.listen_fd.set(Some(l.as_raw_fd()));
            Some(l)
        }
        None => None,
    };
    let mqtt_listener = match shared.mqtt_addr {
        Some(a) => Some(mqtt::listen(&shard, a, false)?),
        None => None,
    };
    let mqtt_tls_listener = match shared.tls.mqtt_addr {
        Some(a) => Some(mqtt::listen(&shard, a, true)?),
        None => None,
    };
    let listeners = [mqtt_listener, mqtt_tls_listener];
    tasks.push(if shard.poller.ring().is_some() {
        glommio::spawn_local(conn::run_uring(
            shard.clone(),
            listener,
            tls_listener,
            listeners,
        ))
    } else {
        glommio::spawn_local(conn::run(shard.clone(), listener, tls_listener, listeners))
    });
    if let Some((l, fd)) = http_listener {
        shard.poller.watch_executor(fd);
        tasks.push(glommio::spawn_local(accept_http(shard.clone(), l, false)));
    }
    if let Some(a) = shared.tls.http_addr {
        let (l, fd) = upgrade::https_listener(&shared, a)
            .map_err(|e| anyhow::anyhow!("shard {id}: binding {a}: {e}"))?;
        shard.poller.watch_executor(fd);
        tasks.push(glommio::spawn_local(accept_http(shard.clone(), l, true)));
    }
    shared.ready.fetch_add(1, Ordering::SeqCst);

    // The sweeper is the shard's main task: it ends the shard.
    let mut shutdown_deadline = None;
    loop {
        glommio::timer::sleep(Duration::from_millis(SWEEP_MS)).await;
        let t = now();
        shard.router.sweep(t);
        reload::apply(&shard);
        upgrade::apply(&shard);
        conn::sweep_tls(&shard, t);
        conn::sweep_proxy(&shard, t);
        if shard.accept_paused.replace(false)
            && let Some(fd) = shard.listen_fd.get()
            && let Err(e) = shard.poller.watch_listener(fd)
        {
            crate::warn_every!("cannot resume accepts: {e}");
            shard.accept_paused.set(true);
        }
        if shard.tls.accept_paused.replace(false)
            && let Some(fd) = shard.tls.listen_fd.get()
            && let Err(e) = shard.poller.watch_tls_listener(fd)
        {
            crate::warn_every!("cannot resume TLS accepts: {e}");
            shard.tls.accept_paused.set(true);
        }
        conn::resume_mqtt_accepts(&shard);
        if shared.stop.load(Ordering::Relaxed) && shutdown_deadline.is_none() {
            let deadline = t.mono_ms + grace_ms;
            shutdown_deadline = Some(deadline);
            shard.router.shutdown(deadline);
            shard.router.wake_io();
            for w in shard.stop_wakers.borrow_mut().drain(..) {
                w.wake();
            }
        }
        if let Some(d) = shutdown_deadline
            && (shard.router.conn_count() == 0 || t.mono_ms >= d + SWEEP_MS)
        {
            break;
        }
    }
    quiesce(&shard, tasks).await;
    tracing::debug!(shard = id, "shard stopped");
    Ok(())
}

/// How long a stopping shard waits for its peers to cut their ties too.
const QUIESCE_WAIT: Duration = Duration::from_secs(2);

/// Cuts every tie that lets another thread wake this shard, and waits until
/// every peer has done the same, before the shard's executor is dropped.
///
/// glommio keeps an io_uring read armed on each executor's eventfd, with its
/// 8-byte target inside the reactor. A peer that notifies that eventfd
/// (closing a mesh channel does) after the executor has freed its reactor,
/// but before the kernel has cancelled the read, would have the kernel write
/// into freed memory. So: close our mesh senders while the peers still run,
/// cancel the shard's tasks and wait for their futures to be dropped (the
/// mesh receivers, the rules' channel listener), then meet the other shards.
/// Past that point nothing notifies any shard, and each executor can go.
async fn quiesce(shard: &Rc<Shard>, tasks: Vec<glommio::Task<()>>) {
    shard.senders.close();
    for t in tasks {
        t.cancel().await;
    }
    let shared = &shard.shared;
    shared.quiet.fetch_add(1, Ordering::SeqCst);
    let deadline = Instant::now() + QUIESCE_WAIT;
    while shared.quiet.load(Ordering::SeqCst) < shared.shards && Instant::now() < deadline {
        glommio::timer::sleep(Duration::from_millis(1)).await;
    }
}

/// Accepts HTTP connections (API requests, WebSocket upgrades, the console).
/// (`tls`: the HTTPS listener's, whose connections start with a handshake).
async fn accept_http(shard: Rc<Shard>, listener: TcpListener, tls: bool) {
    loop {
        let stopped = poll_fn(|cx| {
            if shard.router.is_shutting_down() || shard.shared.stop.load(Ordering::Relaxed) {
                Poll::Ready(None)
            } else {
                let mut w = shard.stop_wakers.borrow_mut();
                if !w.iter().any(|x| x.will_wake(cx.waker())) {
                    w.push(cx.waker().clone());
                }
                Poll::Pending
            }
        });
        let accepted =
            futures_lite::future::or(async { Some(listener.accept().await) }, stopped).await;
        let stream = match accepted {
            None => break,
            Some(Ok(s)) => s,
            Some(Err(e)) => {
                crate::warn_every!("HTTP accept failed: {e}");
                glommio::timer::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        // HTTP has its own pool: it never takes the controllers' slots.
        let Some(health_only) = shard.shared.admit_http() else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        // Its requests end the busy loop's wait (until the I/O loop takes
        // it over as a WebSocket, or it closes).
        shard.poller.watch_executor(stream.as_raw_fd());
        ShardStats::add(&shard.router.stats.accepted_total, 1);
        let shard = shard.clone();
        glommio::spawn_local(async move {
            let shared = shard.shared.clone();
            let mut stream = stream;
            // Behind a balancer: its PROXY header names the client.
            let remote = if shared.proxy.http(tls) {
                match proxy::read_header(&mut stream, shared.proxy.timeout).await {
                    Ok(remote) => remote,
                    Err(why) => {
                        crate::warn_every!("HTTP connection closed: {why}");
                        shared.release_http();
                        ShardStats::add(&shard.router.stats.closed_total, 1);
                        return;
                    }
                }
            } else {
                None
            };
            if tls {
                match tls::https_handshake(&shared.tls, &shard.router.stats, stream).await {
                    Some(s) => http::serve(shard.clone(), s, health_only, remote).await,
                    None => {
                        shared.release_http();
                        ShardStats::add(&shard.router.stats.closed_total, 1);
                    }
                }
            } else {
                let stream = tls::HttpStream::Plain(stream);
                http::serve(shard.clone(), stream, health_only, remote).await;
            }
        })
        .detach();
    }
}

/// Takes a connection handed over by another shard.
fn adopt(shard: &Rc<Shard>, h: Handover) {
    let cell = shard.router.register(h.conn, h.session);
    // An MQTT client's CONNECT is answered from its session (`mqtt::on_attach`).
    let first = if h.mqtt.is_some() {
        None
    } else {
        Some(Event::Hello(h.hello))
    };
    *cell.mqtt.borrow_mut() = h.mqtt;
    let io = io::Io::new(h.fd, h.tls).carrying(h.rbuf, h.pending_out, h.ws);
    conn::attach(shard, cell, io, first);
}

/// Routes what rules send (src `$rules`). Every shard pulls from the same
/// channel, so the work spreads; routing takes each frame to its owner.
async fn rule_actions(shard: Rc<Shard>, rx: relay_plugins::ActionReceiver) {
    use relay_core::frame::{Flags, Frame};
    while let Ok(action) = rx.recv().await {
        let (target, payload, json, group) = match action {
            relay_plugins::Action::Send { dst, payload, json } => (dst, payload, json, false),
            relay_plugins::Action::Publish {
                group,
                payload,
                json,
            } => (group, payload, json, true),
            other => {
                tracing::warn!("rules asked for an action this relay does not know: {other:?}");
                continue;
            }
        };
        if let Err(e) = relay_core::validate_name(target.as_bytes()) {
            crate::warn_every!("a rule sent to {target:?}: {e}; dropped");
            continue;
        }
        let mut f = Frame::data(
            relay_plugins::RULES_SRC.as_bytes(),
            target.clone().into_bytes(),
            payload,
        );
        f.flags = Flags(if json { Flags::JSON } else { 0 });
        let t = now();
        if group {
            let name = bytes::Bytes::from(target.into_bytes());
            shard
                .router
                .fanout(crate::router::Index::Group, &name, f, Vec::new(), None, t);
        } else {
            shard.router.unicast(f, None, t);
        }
    }
}

/// Applies what the cluster link hands this shard.
async fn cluster_inbound(shard: Rc<Shard>, rx: crate::cluster::ShardReceiver) {
    while let Ok(items) = rx.recv().await {
        let t = now();
        for item in items {
            shard.router.on_inbound(item, t);
        }
    }
}

/// Ships each peer's waiting items as batches of at most `max_batch`, and
/// what waits for the cluster link as one message per pass.
async fn flusher(shard: Rc<Shard>) {
    loop {
        let (batches, remote) = poll_fn(|cx| {
            shard.wakers.flush(cx.waker());
            let b = shard.router.take_outbox();
            let r = match shard.link {
                Some(_) => shard.router.take_remote(),
                None => Vec::new(),
            };
            if b.is_empty() && r.is_empty() {
                Poll::Pending
            } else {
                Poll::Ready((b, r))
            }
        })
        .await;
        if let (Some(tx), Some(c)) = (&shard.link, &shard.shared.cluster)
            && !remote.is_empty()
            && let Err(items) = crate::cluster::offer(tx, &c.stats, shard.router.shard, remote)
        {
            shard.router.remote_refused(items);
        }
        for (peer, mut items) in batches {
            while !items.is_empty() {
                let rest = if items.len() > shard.max_batch {
                    items.split_off(shard.max_batch)
                } else {
                    Vec::new()
                };
                let batch = std::mem::replace(&mut items, rest);
                if shard
                    .senders
                    .send_to(peer, MeshMsg::Batch(batch))
                    .await
                    .is_err()
                {
                    // The peer has stopped; nothing more can reach it.
                    break;
                }
                shard.shared.kicks[peer].kick();
            }
        }
    }
}
