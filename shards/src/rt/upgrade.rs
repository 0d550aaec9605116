//! Graceful upgrade (SIGUSR2): the running relay starts a new process of the
//! binary it was started from and passes it its listening sockets over a unix
//! socket (SCM_RIGHTS). The new process listens on the very same sockets, so
//! no connection waiting to be accepted is lost and the port is never closed.
//! Once it says it is ready, the old process stops accepting, tells every
//! client ERROR `going_away` with a `retry_after_ms` drawn over
//! `[upgrade] reconnect_window_ms`, keeps serving while clients leave
//! (`drain_ms`), then closes what is left (WebSocket close 1012) and exits.
//!
//! The handshake on the unix socket: the old process sends one message
//! `relay-upgrade tcp=<n> http=<m> tcp_tls=<a> http_tls=<b> mqtt=<c>
//! mqtt_tls=<d>` carrying n + m + a + b + c + d descriptors (the shards'
//! controller listeners, their HTTP listeners, their TLS and HTTPS
//! listeners, then their MQTT and MQTT over TLS listeners; every field
//! after `http` may be absent, meaning 0; past 250 descriptors, the rest
//! follow in one-byte messages of at most 250 each, as one message carries
//! at most 253); the new process answers
//! `ready\n` once every shard listens. The TLS listeners are plain
//! listening TCP sockets like the others (TLS starts per connection), so
//! the new process takes them as they are and loads its own certificate.

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use sendfd::{RecvWithFd, SendWithFd};

use super::{Relay, Shard};

/// The variable naming the new process's end of the unix socket.
pub const UPGRADE_FD_ENV: &str = "RELAY_UPGRADE_FD";

/// Most listening sockets one handover carries.
const MAX_FDS: usize = 6 * crate::router::MAX_SHARDS;
/// Most descriptors one message carries (the kernel takes at most 253,
/// SCM_MAX_FD): more go in further one-byte messages.
const FDS_PER_MESSAGE: usize = 250;

/// Listening sockets handed over by the previous process, taken by the
/// shards as they start.
#[derive(Debug, Default)]
pub struct Inherited {
    tcp: Mutex<Vec<OwnedFd>>,
    http: Mutex<Vec<OwnedFd>>,
    tcp_tls: Mutex<Vec<OwnedFd>>,
    http_tls: Mutex<Vec<OwnedFd>>,
    mqtt: Mutex<Vec<OwnedFd>>,
    mqtt_tls: Mutex<Vec<OwnedFd>>,
    /// Where they listen (from the first of each kind).
    tcp_addr: Option<SocketAddr>,
    http_addr: Option<SocketAddr>,
    tcp_tls_addr: Option<SocketAddr>,
    http_tls_addr: Option<SocketAddr>,
    mqtt_addr: Option<SocketAddr>,
    mqtt_tls_addr: Option<SocketAddr>,
}

impl Inherited {
    /// The addresses the inherited sockets listen on.
    pub(super) fn addrs(&self) -> anyhow::Result<(SocketAddr, Option<SocketAddr>)> {
        let tcp = self
            .tcp_addr
            .context("the previous relay handed over no controller listener")?;
        Ok((tcp, self.http_addr))
    }

    /// The addresses the inherited TLS and HTTPS sockets listen on.
    pub(super) fn tls_addrs(&self) -> (Option<SocketAddr>, Option<SocketAddr>) {
        (self.tcp_tls_addr, self.http_tls_addr)
    }

    /// The addresses the inherited MQTT and MQTT over TLS sockets listen on.
    pub(super) fn mqtt_addrs(&self) -> (Option<SocketAddr>, Option<SocketAddr>) {
        (self.mqtt_addr, self.mqtt_tls_addr)
    }
}

/// Which listener a descriptor is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    Tcp,
    Http,
    TcpTls,
    HttpTls,
    Mqtt,
    MqttTls,
}

/// Upgrade state shared by the shards and the main thread.
#[derive(Debug, Default)]
pub(crate) struct Handoff {
    /// The shards' listening sockets, as (kind, fd), to hand over.
    listeners: Mutex<Vec<(Kind, RawFd)>>,
    /// Sockets from the previous process, for the shards to take.
    inherited: Option<Arc<Inherited>>,
    /// `reconnect_window_ms + 1` once clients are to be told to go (0: not yet).
    going_away: AtomicU64,
    /// Set when the drain is over: the remaining connections are closed.
    end: AtomicBool,
    /// `[shutdown] grace_ms`: how long the last connections may flush.
    grace_ms: u64,
}

impl Handoff {
    pub(super) fn new(inherited: Option<Arc<Inherited>>, grace_ms: u64) -> Handoff {
        Handoff {
            inherited,
            grace_ms,
            ..Handoff::default()
        }
    }
}

/// A shard's controller listener: an inherited one, or a new socket.
pub(super) fn tcp_listener(
    shared: &super::Shared,
    addr: SocketAddr,
) -> std::io::Result<socket2::Socket> {
    controllers_listener(shared, addr, Kind::Tcp)
}

/// A shard's controller TLS listener: an inherited one, or a new socket.
pub(super) fn tcp_tls_listener(
    shared: &super::Shared,
    addr: SocketAddr,
) -> std::io::Result<socket2::Socket> {
    controllers_listener(shared, addr, Kind::TcpTls)
}

/// A shard's MQTT listener (`tls`: MQTT over TLS): an inherited one, or a
/// new socket.
pub(super) fn mqtt_listener(
    shared: &super::Shared,
    addr: SocketAddr,
    tls: bool,
) -> std::io::Result<socket2::Socket> {
    let kind = if tls { Kind::MqttTls } else { Kind::Mqtt };
    controllers_listener(shared, addr, kind)
}

fn controllers_listener(
    shared: &super::Shared,
    addr: SocketAddr,
    kind: Kind,
) -> std::io::Result<socket2::Socket> {
    let s = match take(shared, kind) {
        Some(fd) => {
            let s = socket2::Socket::from(fd);
            s.set_nonblocking(true)?;
            s.set_cloexec(true)?;
            s
        }
        None => super::bind_listener(addr)?,
    };
    publish(shared, kind, s.as_raw_fd());
    Ok(s)
}

/// A shard's HTTP listener: an inherited one, or a new socket bound the way
/// glommio binds (SO_REUSEPORT, backlog 1024).
pub(super) fn http_listener(
    shared: &super::Shared,
    addr: SocketAddr,
) -> std::io::Result<(glommio::net::TcpListener, RawFd)> {
    web_listener(shared, addr, Kind::Http)
}

/// A shard's HTTPS listener: an inherited one, or a new socket.
pub(super) fn https_listener(
    shared: &super::Shared,
    addr: SocketAddr,
) -> std::io::Result<(glommio::net::TcpListener, RawFd)> {
    web_listener(shared, addr, Kind::HttpTls)
}

/// A web listener and its descriptor (which the listener owns).
fn web_listener(
    shared: &super::Shared,
    addr: SocketAddr,
    kind: Kind,
) -> std::io::Result<(glommio::net::TcpListener, RawFd)> {
    let s = match take(shared, kind) {
        Some(fd) => socket2::Socket::from(fd),
        None => {
            let s = super::reserve_port(addr)?;
            s.listen(1024)?;
            s
        }
    };
    s.set_cloexec(true)?;
    publish(shared, kind, s.as_raw_fd());
    let fd = s.into_raw_fd();
    // SAFETY: a bound, listening socket whose ownership moves to the listener.
    Ok((unsafe { glommio::net::TcpListener::from_raw_fd(fd) }, fd))
}

fn take(shared: &super::Shared, kind: Kind) -> Option<OwnedFd> {
    let inh = shared.handoff.inherited.as_ref()?;
    let list = match kind {
        Kind::Tcp => &inh.tcp,
        Kind::Http => &inh.http,
        Kind::TcpTls => &inh.tcp_tls,
        Kind::HttpTls => &inh.http_tls,
        Kind::Mqtt => &inh.mqtt,
        Kind::MqttTls => &inh.mqtt_tls,
    };
    list.lock().ok()?.pop()
}

fn publish(shared: &super::Shared, kind: Kind, fd: RawFd) {
    if let Ok(mut l) = shared.handoff.listeners.lock() {
        l.push((kind, fd));
    }
}

/// Each sweep: tells the clients to go once the main thread says so, and
/// closes what is left when the drain is over.
pub(super) fn apply(shard: &Shard) {
    let h = &shard.shared.handoff;
    let window = h.going_away.load(Ordering::Acquire);
    if window == 0 {
        return;
    }
    let now = super::now();
    if !shard.router.is_going_away() {
        shard.router.going_away(window - 1);
        // The accept loops stop on their next wake.
        shard.router.wake_io();
        for w in shard.stop_wakers.borrow_mut().drain(..) {
            w.wake();
        }
    }
    if h.end.load(Ordering::Acquire) && !shard.router.going_away_ended() {
        shard
            .router
            .end_going_away(window - 1, now.mono_ms + h.grace_ms);
        shard.router.wake_io();
    }
}

/// The new process's side: takes the descriptors the previous process sent
/// on the unix socket named by `RELAY_UPGRADE_FD`. Returns them and the
/// socket to say `ready` on (see [`ready`]).
pub fn receive_from_env() -> anyhow::Result<Option<(Arc<Inherited>, UnixStream)>> {
    let Some(v) = std::env::var_os(UPGRADE_FD_ENV) else {
        return Ok(None);
    };
    // SAFETY: only this process's own environment is changed, before any
    // other thread reads it.
    unsafe { std::env::remove_var(UPGRADE_FD_ENV) };
    let fd: RawFd = v
        .to_str()
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("{UPGRADE_FD_ENV}={v:?} is not a descriptor number"))?;
    // SAFETY: the previous process passed this descriptor for us to own.
    let sock = unsafe { UnixStream::from_raw_fd(fd) };
    sock.set_read_timeout(Some(Duration::from_secs(30)))?;
    let inherited = receive_sockets(&sock)?;
    Ok(Some((Arc::new(inherited), sock)))
}

/// Receives one message and the descriptors it carries (at most
/// `FDS_PER_MESSAGE`; the kernel ends a read at a message with descriptors).
fn recv_chunk(sock: &UnixStream, buf: &mut [u8]) -> anyhow::Result<(usize, Vec<OwnedFd>)> {
    let mut fds = vec![-1 as RawFd; FDS_PER_MESSAGE + 3];
    let (n, nfds) = sock
        .recv_with_fd(buf, &mut fds)
        .context("receiving the listening sockets")?;
    // SAFETY: every received descriptor is new in this process and ours.
    let owned = fds[..nfds]
        .iter()
        .map(|&fd| unsafe { OwnedFd::from_raw_fd(fd) })
        .collect();
    Ok((n, owned))
}

/// Sends the handover message `msg` with the descriptors `fds`: the first
/// `FDS_PER_MESSAGE` with it, the rest in further one-byte messages.
fn send_sockets(sock: &UnixStream, msg: &str, fds: &[RawFd]) -> std::io::Result<()> {
    let mut chunks = fds.chunks(FDS_PER_MESSAGE);
    sock.send_with_fd(msg.as_bytes(), chunks.next().unwrap_or(&[]))?;
    for chunk in chunks {
        sock.send_with_fd(b"+", chunk)?;
    }
    Ok(())
}

/// The receiving side of [`send_sockets`]: the descriptors sorted by kind.
fn receive_sockets(sock: &UnixStream) -> anyhow::Result<Inherited> {
    let mut buf = [0u8; 256];
    let (n, mut owned) = recv_chunk(sock, &mut buf)?;
    let text = std::str::from_utf8(&buf[..n]).context("handover message")?;
    let field = |key: &str| -> Option<usize> {
        text.split_whitespace()
            .find_map(|w| w.strip_prefix(key))
            .and_then(|v| v.parse().ok())
    };
    let count = |key: &str| -> anyhow::Result<usize> {
        field(key).with_context(|| format!("handover message {text:?} lacks {key}"))
    };
    if !text.starts_with("relay-upgrade ") {
        bail!("unexpected handover message {text:?}");
    }
    let (ntcp, nhttp) = (count("tcp=")?, count("http=")?);
    // A previous relay without TLS or MQTT listeners to pass says nothing
    // of them.
    let (ntls, nhttps) = (
        field("tcp_tls=").unwrap_or(0),
        field("http_tls=").unwrap_or(0),
    );
    let (nmqtt, nmqtts) = (field("mqtt=").unwrap_or(0), field("mqtt_tls=").unwrap_or(0));
    let total = ntcp + nhttp + ntls + nhttps + nmqtt + nmqtts;
    if total > MAX_FDS {
        bail!("handover announced {total} sockets, more than {MAX_FDS}");
    }
    while owned.len() < total {
        let (_, more) = recv_chunk(sock, &mut [0u8; 1])?;
        if more.is_empty() {
            bail!(
                "handover ended after {} of the {total} sockets it announced",
                owned.len()
            );
        }
        owned.extend(more);
    }
    if ntcp + nhttp + ntls + nhttps + nmqtt + nmqtts != owned.len() || ntcp == 0 {
        bail!(
            "handover announced {ntcp} + {nhttp} + {ntls} + {nhttps} + {nmqtt} + {nmqtts} \
             sockets and carried {}",
            owned.len()
        );
    }
    let mut owned = owned.into_iter();
    let tcp: Vec<OwnedFd> = owned.by_ref().take(ntcp).collect();
    let http: Vec<OwnedFd> = owned.by_ref().take(nhttp).collect();
    let tcp_tls: Vec<OwnedFd> = owned.by_ref().take(ntls).collect();
    let http_tls: Vec<OwnedFd> = owned.by_ref().take(nhttps).collect();
    let mqtt: Vec<OwnedFd> = owned.by_ref().take(nmqtt).collect();
    let mqtt_tls: Vec<OwnedFd> = owned.collect();
    let addr_of = |fd: &OwnedFd| -> Option<SocketAddr> {
        socket2::SockRef::from(fd).local_addr().ok()?.as_socket()
    };
    let inherited = Inherited {
        tcp_addr: tcp.first().and_then(addr_of),
        http_addr: http.first().and_then(addr_of),
        tcp_tls_addr: tcp_tls.first().and_then(addr_of),
        http_tls_addr: http_tls.first().and_then(addr_of),
        mqtt_addr: mqtt.first().and_then(addr_of),
        mqtt_tls_addr: mqtt_tls.first().and_then(addr_of),
        tcp: Mutex::new(tcp),
        http: Mutex::new(http),
        tcp_tls: Mutex::new(tcp_tls),
        http_tls: Mutex::new(http_tls),
        mqtt: Mutex::new(mqtt),
        mqtt_tls: Mutex::new(mqtt_tls),
    };
    Ok(inherited)
}

/// Tells the previous process that this one listens (it then lets go), and
/// tells systemd, when it runs the service, that this is the main process.
pub fn ready(mut sock: UnixStream) -> std::io::Result<()> {
    sock.write_all(b"ready\n")?;
    notify_main_pid();
    Ok(())
}

/// `MAINPID=` and `READY=1` to systemd (nothing without `NOTIFY_SOCKET`).
pub fn notify_main_pid() {
    let pid = std::process::id();
    let _ = sd_notify::notify(
        false,
        &[
            sd_notify::NotifyState::MainPid(pid),
            sd_notify::NotifyState::Ready,
        ],
    );
}

impl Relay {
    /// Starts `exe` with `args` as the new relay process, hands it the
    /// listening sockets and waits (at most `ready_timeout`) until it says it
    /// listens. Then this process stops accepting and tells every client to
    /// go with a `retry_after_ms` over `reconnect_window_ms`. Returns the new
    /// process's pid. On failure nothing changes here: the new process is
    /// ended and this one goes on.
    pub fn hand_over(
        &self,
        exe: &Path,
        args: &[std::ffi::OsString],
        ready_timeout: Duration,
        reconnect_window_ms: u64,
    ) -> anyhow::Result<u32> {
        let h = &self.shared.handoff;
        if h.going_away.load(Ordering::Acquire) != 0 {
            bail!("an upgrade is already under way");
        }
        let listeners = h.listeners.lock().map(|l| l.clone()).unwrap_or_default();
        let of = |kind: Kind| -> Vec<RawFd> {
            listeners
                .iter()
                .filter(|(k, _)| *k == kind)
                .map(|(_, fd)| *fd)
                .collect()
        };
        let (tcp, http) = (of(Kind::Tcp), of(Kind::Http));
        let (tcp_tls, http_tls) = (of(Kind::TcpTls), of(Kind::HttpTls));
        let (mqtt, mqtt_tls) = (of(Kind::Mqtt), of(Kind::MqttTls));
        let (ours, theirs) = UnixStream::pair().context("socketpair")?;
        let child_fd = theirs.as_raw_fd();
        let mut cmd = std::process::Command::new(exe);
        cmd.args(args).env(UPGRADE_FD_ENV, child_fd.to_string());
        // SAFETY: only fcntl (async-signal-safe) runs between fork and exec:
        // the child keeps its end of the socket across exec.
        unsafe {
            cmd.pre_exec(move || {
                if libc::fcntl(child_fd, libc::F_SETFD, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting {}", exe.display()))?;
        drop(theirs);
        let pid = child.id();
        let result = (|| -> anyhow::Result<()> {
            let all: Vec<RawFd> = tcp
                .iter()
                .chain(&http)
                .chain(&tcp_tls)
                .chain(&http_tls)
                .chain(&mqtt)
                .chain(&mqtt_tls)
                .copied()
                .collect();
            let msg = format!(
                "relay-upgrade tcp={} http={} tcp_tls={} http_tls={} mqtt={} mqtt_tls={}",
                tcp.len(),
                http.len(),
                tcp_tls.len(),
                http_tls.len(),
                mqtt.len(),
                mqtt_tls.len()
            );
            send_sockets(&ours, &msg, &all).context("passing the listening sockets")?;
            ours.set_read_timeout(Some(ready_timeout))?;
            let mut line = String::new();
            let got = BufReader::new(&ours).read_line(&mut line);
            if matches!(got, Ok(n) if n > 0) && line.trim() == "ready" {
                return Ok(());
            }
            // Its exit status says most; give it a moment to be reaped.
            let deadline = Instant::now() + Duration::from_secs(2);
            let status = loop {
                match child.try_wait() {
                    Ok(Some(status)) => break Some(status),
                    Ok(None) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(20))
                    }
                    _ => break None,
                }
            };
            let why = match (status, got) {
                (Some(status), _) => format!("it exited with {status}"),
                (None, Err(e)) => format!("no answer ({e}; waited at most {ready_timeout:?})"),
                (None, Ok(_)) => format!("it answered {:?}", line.trim()),
            };
            bail!("the new process (pid {pid}) did not get ready: {why}");
        })();
        if let Err(e) = result {
            let _ = child.kill();
            let _ = child.wait();
            return Err(e);
        }
        // The new process now runs on its own (it outlives this one).
        drop(child);
        h.going_away
            .store(reconnect_window_ms + 1, Ordering::Release);
        Ok(pid)
    }

    /// Closes the inherited sockets no shard took (the previous process had
    /// more shards); returns how many. Connections waiting on them are reset
    /// once the previous process closes its copies too.
    pub fn close_unused_inherited(&self) -> usize {
        let Some(inh) = self.shared.handoff.inherited.as_ref() else {
            return 0;
        };
        let mut n = 0;
        for list in [
            &inh.tcp,
            &inh.http,
            &inh.tcp_tls,
            &inh.http_tls,
            &inh.mqtt,
            &inh.mqtt_tls,
        ] {
            if let Ok(mut l) = list.lock() {
                n += l.len();
                l.clear();
            }
        }
        n
    }

    /// Ends the drain of an upgrade: every connection still here is closed
    /// (ERROR `going_away`, WebSocket close 1012) within `[shutdown] grace_ms`.
    pub fn end_drain(&self) {
        self.shared.handoff.end.store(true, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// More listening sockets than one message can carry (as many shards
    /// times six listeners give) all arrive, each sorted to its kind.
    #[test]
    fn more_sockets_than_one_message_carries_all_arrive() {
        let listen = || {
            let s = super::super::bind_listener("127.0.0.1:0".parse().unwrap()).unwrap();
            let a = s.local_addr().unwrap().as_socket().unwrap();
            (s, a)
        };
        let (tcp, tcp_addr) = listen();
        let (mqtt, mqtt_addr) = listen();
        let (mqtts, mqtts_addr) = listen();
        let per_kind = 60;
        let mut fds = Vec::new();
        for s in [&tcp, &tcp, &tcp, &tcp, &mqtt, &mqtts] {
            fds.extend(std::iter::repeat_n(s.as_raw_fd(), per_kind));
        }
        assert!(fds.len() > 253);
        let (a, b) = UnixStream::pair().unwrap();
        b.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let msg = format!(
            "relay-upgrade tcp={per_kind} http={per_kind} tcp_tls={per_kind} \
             http_tls={per_kind} mqtt={per_kind} mqtt_tls={per_kind}"
        );
        send_sockets(&a, &msg, &fds).unwrap();
        let inh = receive_sockets(&b).unwrap();
        for list in [&inh.tcp, &inh.http, &inh.tcp_tls, &inh.http_tls] {
            assert_eq!(list.lock().unwrap().len(), per_kind);
        }
        assert_eq!(inh.addrs().unwrap(), (tcp_addr, Some(tcp_addr)));
        assert_eq!(inh.mqtt_addrs(), (Some(mqtt_addr), Some(mqtts_addr)));
        assert_eq!(inh.mqtt.lock().unwrap().len(), per_kind);
        assert_eq!(inh.mqtt_tls.lock().unwrap().len(), per_kind);

        // Fewer sockets than announced: a clear error, not a hang.
        send_sockets(&a, "relay-upgrade tcp=1 http=0 mqtt=300", &fds[..1]).unwrap();
        drop(a);
        let err = format!("{:#}", receive_sockets(&b).unwrap_err());
        assert!(err.contains("301"), "{err}");
    }
}
