//! TLS for controllers (`[listeners] tcp_tls`) and MQTT clients
//! (`[listeners] mqtt_tls`), driven inside the shard's I/O loop as a
//! sans-IO `rustls::ServerConnection` per socket.
//!
//! - The I/O loop reads ciphertext with `read_tls`, decrypts it with
//!   `process_new_packets` and hands the plaintext to the connection exactly
//!   as it hands a plaintext socket's bytes; on the way out, the connection's
//!   queue goes into the TLS writer and `write_tls` sends the records.
//! - The handshake and the hello complete on the shard that accepted the
//!   socket (the hello names the address, which picks the owner shard); the
//!   `ServerConnection` then moves to the owner inside the hand-over, with
//!   the descriptor, so the session keeps its keys and nothing is redone.
//! - Bounds: `set_buffer_limit` caps what one connection buffers (TLS
//!   output, and input before the handshake ends); a handshake that has not
//!   finished by `[tls] handshake_timeout_ms` is closed by the sweeper.
//! - The server configuration is built once (certificate, key, ALPN,
//!   fragment size, ticketer) and shared read-only by every shard through an
//!   `Arc`; a reload publishes a new one with a generation number, which each
//!   shard picks up on its next accept (an atomic load on the accept path,
//!   a lock only when the generation changed).
//! - Session resumption uses stateless tickets (no server-side session
//!   cache, so no mutex shared by the shards on the handshake path).

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{Context as _, bail};
use relay_config::Config;
use relay_core::CloseReason;
use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};

use super::io::Io;
use crate::cell::{ConnCell, ConnId};
use crate::stats::ShardStats;

/// The TLS state the shards share: the server configuration in force and
/// the settings read at accept.
pub(crate) struct TlsShared {
    /// Where controllers connect over TLS (resolved: port 0 replaced).
    pub(crate) tcp_addr: Option<std::net::SocketAddr>,
    /// Where HTTPS is served (resolved).
    pub(crate) http_addr: Option<std::net::SocketAddr>,
    /// Where MQTT clients connect over TLS (resolved).
    pub(crate) mqtt_addr: Option<std::net::SocketAddr>,
    generation: AtomicU64,
    config: Mutex<Option<Arc<ServerConfig>>>,
    /// The MQTT listener's configuration (the controllers' without ALPN).
    mqtt_config: Mutex<Option<Arc<ServerConfig>>>,
    /// The HTTPS listener's configuration (ALPN `http/1.1`).
    http_config: Mutex<Option<Arc<ServerConfig>>>,
    handshake_timeout_ms: u64,
    buffer_limit: usize,
    /// Device addresses come from the certificate's first DNS SAN (else its CN).
    address_from_san: bool,
}

impl TlsShared {
    /// Loads the certificate and key when a TLS listener is configured;
    /// a file that does not load is a start-up error naming it.
    pub(crate) fn new(
        cfg: &Config,
        tcp_addr: Option<std::net::SocketAddr>,
        http_addr: Option<std::net::SocketAddr>,
        mqtt_addr: Option<std::net::SocketAddr>,
    ) -> anyhow::Result<TlsShared> {
        let (config, http_config, mqtt_config) =
            if tcp_addr.is_some() || http_addr.is_some() || mqtt_addr.is_some() {
                let (c, h) = server_configs(cfg)?;
                let m = mqtt_server_config(&c);
                (Some(c), Some(h), Some(m))
            } else {
                (None, None, None)
            };
        Ok(TlsShared {
            tcp_addr,
            http_addr,
            mqtt_addr,
            generation: AtomicU64::new(0),
            config: Mutex::new(config),
            mqtt_config: Mutex::new(mqtt_config),
            http_config: Mutex::new(http_config),
            handshake_timeout_ms: cfg.tls.handshake_timeout_ms,
            buffer_limit: cfg.tls.buffer_limit_bytes,
            address_from_san: cfg.tls.client_address == "san",
        })
    }
}

impl TlsShared {
    /// Loads the certificate and key again (a reload): new handshakes use
    /// them, open connections keep theirs. On error nothing changes and the
    /// running certificate stays. `Ok(false)` when no TLS listener is on.
    pub(crate) fn reload(&self, cfg: &Config) -> anyhow::Result<bool> {
        if self.tcp_addr.is_none() && self.http_addr.is_none() && self.mqtt_addr.is_none() {
            return Ok(false);
        }
        let (tcp, http) = server_configs(cfg)?;
        if let Ok(mut c) = self.mqtt_config.lock() {
            *c = Some(mqtt_server_config(&tcp));
        }
        if let Ok(mut c) = self.config.lock() {
            *c = Some(tcp);
        }
        if let Ok(mut c) = self.http_config.lock() {
            *c = Some(http);
        }
        self.generation.fetch_add(1, Ordering::Release);
        Ok(true)
    }
}

impl std::fmt::Debug for TlsShared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsShared")
            .field("tcp_addr", &self.tcp_addr)
            .finish()
    }
}

/// Builds the server configurations from `[tls]`: the controllers' (with
/// `[tls] alpn`) and the HTTPS listener's (ALPN `http/1.1`).
pub(crate) fn server_configs(
    cfg: &Config,
) -> anyhow::Result<(Arc<ServerConfig>, Arc<ServerConfig>)> {
    let tcp = server_config(cfg, true)?;
    let mut http = (*server_config(cfg, false)?).clone();
    http.alpn_protocols = vec![b"http/1.1".to_vec()];
    // Browsers send large records and headers; the fragment size is for devices.
    http.max_fragment_size = None;
    Ok((tcp, Arc::new(http)))
}

/// The MQTT listener's configuration: the controllers' (client
/// certificates, CRL, fragment size, tickets) without ALPN, so a client
/// offering any protocol name (or none) is served.
fn mqtt_server_config(controllers: &Arc<ServerConfig>) -> Arc<ServerConfig> {
    let mut m = (**controllers).clone();
    m.alpn_protocols = Vec::new();
    Arc::new(m)
}

/// The verifier of device certificates, when `[tls] client_ca_file` is set.
fn client_verifier(
    cfg: &Config,
    provider: &Arc<rustls::crypto::CryptoProvider>,
) -> anyhow::Result<Option<Arc<dyn rustls::server::danger::ClientCertVerifier>>> {
    let Some(path) = cfg.tls.client_ca_file.as_deref().filter(|p| !p.is_empty()) else {
        return Ok(None);
    };
    let mut roots = rustls::RootCertStore::empty();
    for cert in load_certs(path).map_err(|e| {
        anyhow::anyhow!(
            "{}",
            e.to_string().replace("tls.cert_file", "tls.client_ca_file")
        )
    })? {
        roots
            .add(cert)
            .map_err(|e| anyhow::anyhow!("tls.client_ca_file {path}: {e}"))?;
    }
    let builder = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    );
    let builder = if cfg.tls.require_client_cert {
        builder
    } else {
        builder.allow_unauthenticated()
    };
    let builder = match cfg.tls.crl_file.as_deref().filter(|p| !p.is_empty()) {
        // Device certificates come straight from the device CAs: the leaf's
        // status is what a CRL decides, and a leaf whose issuer has no CRL
        // in the file is refused (its status is unknown).
        Some(crl) => builder
            .with_crls(load_crls(crl)?)
            .only_check_end_entity_revocation(),
        None => builder,
    };
    let v = builder.build().map_err(|e| match e {
        rustls::server::VerifierBuilderError::InvalidCrl(e) => anyhow::anyhow!(
            "tls.crl_file {}: invalid certificate revocation list ({e:?})",
            cfg.tls.crl_file.as_deref().unwrap_or("")
        ),
        e => anyhow::anyhow!("tls.client_ca_file {path}: {e}"),
    })?;
    Ok(Some(v))
}

fn server_config(cfg: &Config, client_auth: bool) -> anyhow::Result<Arc<ServerConfig>> {
    let t = &cfg.tls;
    let cert_file = t.cert_file.as_deref().unwrap_or("");
    let key_file = t.key_file.as_deref().unwrap_or("");
    let certs = load_certs(cert_file)?;
    let key = PrivateKeyDer::from_pem_file(key_file)
        .map_err(|e| anyhow::anyhow!("tls.key_file {key_file}: no usable private key: {e}"))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = if client_auth {
        client_verifier(cfg, &provider)?
    } else {
        None
    };
    let builder = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .context("TLS protocol versions")?;
    let builder = match verifier {
        Some(v) => builder.with_client_cert_verifier(v),
        None => builder.with_no_client_auth(),
    };
    let mut sc = builder
        .with_single_cert(certs, key)
        .with_context(|| format!("tls.cert_file {cert_file} and tls.key_file {key_file}"))?;
    if t.max_fragment_size != 0 {
        // The record's header and tag come on top of the plaintext.
        sc.max_fragment_size = Some(t.max_fragment_size + 5);
    }
    sc.alpn_protocols = t.alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    sc.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    if t.session_tickets {
        sc.ticketer = rustls::crypto::ring::Ticketer::new().context("TLS session ticketer")?;
        sc.send_tls13_tickets = 1;
    } else {
        sc.send_tls13_tickets = 0;
    }
    Ok(Arc::new(sc))
}

/// Reads every CRL of a PEM file; an unreadable file, or one without a CRL,
/// is an error naming `tls.crl_file`.
fn load_crls(path: &str) -> anyhow::Result<Vec<CertificateRevocationListDer<'static>>> {
    let crls = CertificateRevocationListDer::pem_file_iter(path)
        .map_err(|e| anyhow::anyhow!("tls.crl_file {path}: {e}"))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow::anyhow!("tls.crl_file {path}: {e}"))?;
    if crls.is_empty() {
        bail!("tls.crl_file {path}: no certificate revocation list (X509 CRL) in the file");
    }
    Ok(crls)
}

fn load_certs(path: &str) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| anyhow::anyhow!("tls.cert_file {path}: {e}"))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow::anyhow!("tls.cert_file {path}: {e}"))?;
    if certs.is_empty() {
        bail!("tls.cert_file {path}: no certificate in the file");
    }
    Ok(certs)
}

/// One shard's TLS state: its copy of the configuration in force and the
/// handshakes it waits for, oldest first.
#[derive(Default)]
pub(crate) struct ShardTls {
    config: std::cell::RefCell<Option<(u64, Arc<ServerConfig>)>>,
    /// The MQTT listener's configuration in force, with its generation.
    mqtt_config: std::cell::RefCell<Option<(u64, Arc<ServerConfig>)>>,
    /// (deadline in monotonic ms, connection), in accept order, so
    /// deadlines come in order.
    handshakes: std::cell::RefCell<VecDeque<(u64, ConnId)>>,
    /// The TLS listener, while it accepts.
    pub(crate) listen_fd: std::cell::Cell<Option<RawFd>>,
    /// Accepts paused after running out of descriptors.
    pub(crate) accept_paused: std::cell::Cell<bool>,
}

impl ShardTls {
    /// A server connection for a socket just accepted (`mqtt`: on the MQTT
    /// listener), with its handshake deadline recorded; `None` when TLS is
    /// off or rustls refused.
    pub(crate) fn accept(
        &self,
        shared: &TlsShared,
        id: ConnId,
        now_ms: u64,
        mqtt: bool,
    ) -> Option<Box<rustls::ServerConnection>> {
        let generation = shared.generation.load(Ordering::Acquire);
        let (mine, theirs) = if mqtt {
            (&self.mqtt_config, &shared.mqtt_config)
        } else {
            (&self.config, &shared.config)
        };
        let stale = mine.borrow().as_ref().is_none_or(|(g, _)| *g != generation);
        if stale {
            let fresh = theirs.lock().ok()?.clone()?;
            *mine.borrow_mut() = Some((generation, fresh));
        }
        let config = mine.borrow().as_ref()?.1.clone();
        match rustls::ServerConnection::new(config) {
            Ok(mut c) => {
                c.set_buffer_limit(Some(shared.buffer_limit));
                self.handshakes
                    .borrow_mut()
                    .push_back((now_ms + shared.handshake_timeout_ms, id));
                Some(Box::new(c))
            }
            Err(e) => {
                crate::warn_every!("TLS connection refused: {e}");
                None
            }
        }
    }

    /// The connections whose handshake deadline has passed and that are
    /// still on this shard: the caller closes those still handshaking.
    pub(crate) fn expired(&self, now_ms: u64, out: &mut Vec<ConnId>) {
        let mut q = self.handshakes.borrow_mut();
        while let Some(&(deadline, id)) = q.front() {
            if deadline > now_ms {
                break;
            }
            q.pop_front();
            out.push(id);
        }
    }
}

/// Closes `cell` when its handshake (in `io`) is still under way (its
/// deadline passed).
pub(crate) fn handshake_expired(cell: &ConnCell, io: &mut Io, now_ms: u64) -> bool {
    if !io.tls.as_ref().is_some_and(|t| t.is_handshaking()) {
        return false;
    }
    cell.closing(CloseReason::HelloTimeout, now_ms);
    io.eof = true;
    true
}

/// Gives a connection that presented a verified client certificate (in
/// `io`'s session) the address the certificate names (before its hello). A
/// certificate that names no valid address closes the connection.
pub(crate) fn certify(shared: &TlsShared, cell: &ConnCell, io: &mut Io, now_ms: u64) {
    {
        let c = cell.conn.borrow();
        if c.is_open() || c.certified().is_some() {
            return;
        }
    }
    let Some(leaf) = io
        .tls
        .as_ref()
        .and_then(|t| t.peer_certificates())
        .and_then(|c| c.first())
    else {
        return;
    };
    match certificate_address(leaf, shared.address_from_san) {
        Ok(addr) => cell.conn.borrow_mut().set_certified(addr),
        Err(why) => {
            crate::warn_every!("client certificate refused: {why}");
            cell.closing(CloseReason::Unauthorized, now_ms);
            io.eof = true;
        }
    }
}

/// The device address a certificate names: its subject's common name, or
/// its first DNS subject alternative name.
fn certificate_address(der: &CertificateDer<'_>, san: bool) -> Result<bytes::Bytes, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref())
        .map_err(|e| format!("unreadable certificate: {e}"))?;
    let name = if san {
        let ext = cert
            .subject_alternative_name()
            .map_err(|e| format!("bad subject alternative names: {e}"))?
            .ok_or("the certificate has no subject alternative name")?;
        ext.value
            .general_names
            .iter()
            .find_map(|n| match n {
                x509_parser::extensions::GeneralName::DNSName(d) => Some(d.to_string()),
                _ => None,
            })
            .ok_or("the certificate has no DNS subject alternative name")?
    } else {
        cert.subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .map(str::to_owned)
            .ok_or("the certificate's subject has no common name")?
    };
    relay_core::validate_name(name.as_bytes())
        .map_err(|e| format!("the certificate names {name:?}, not an address: {e}"))?;
    Ok(bytes::Bytes::from(name))
}

/// A socket as `Read`/`Write` for rustls: non-blocking, no SIGPIPE.
struct Fd(RawFd);

impl Read for Fd {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: non-blocking recv into a live buffer of the given length.
        let n = unsafe {
            libc::recv(
                self.0,
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }
}

impl Write for Fd {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // SAFETY: non-blocking send of a live slice of the given length.
        let n = unsafe {
            libc::send(
                self.0,
                buf.as_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Reads from the socket until plaintext is available and copies it into
/// `buf`, like `recv`: `Ok(0)` is the end of the stream, `WouldBlock` means
/// nothing more for now, `InvalidData` a TLS error (an alert is queued for
/// the peer). `buf` holds all a read can decrypt (rustls keeps at most
/// 16 KiB of plaintext, `buf` is larger), so nothing stays behind in rustls.
pub(crate) fn recv(
    tls: &mut rustls::ServerConnection,
    fd: RawFd,
    buf: &mut [u8],
    stats: &ShardStats,
) -> io::Result<usize> {
    loop {
        match tls.reader().read(buf) {
            Ok(0) => return Ok(0),
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            // The peer closed without close_notify: a truncation, the end.
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(0),
            Err(e) => return Err(e),
        }
        let n = tls.read_tls(&mut Fd(fd))?;
        if n == 0 {
            return Ok(0);
        }
        ShardStats::add(&stats.bytes_in, n as u64);
        if let Err(e) = tls.process_new_packets() {
            crate::warn_every!("TLS error from a client: {e}");
            return Err(io::Error::new(io::ErrorKind::InvalidData, e));
        }
    }
}

/// Sends what TLS holds: `WouldBlock` while the socket is full.
pub(crate) fn flush(
    tls: &mut rustls::ServerConnection,
    fd: RawFd,
    stats: &ShardStats,
) -> io::Result<()> {
    while tls.wants_write() {
        match tls.write_tls(&mut Fd(fd)) {
            Ok(n) => ShardStats::add(&stats.bytes_out, n as u64),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Encrypts what `data` it can and sends it: returns the plaintext bytes
/// taken, `WouldBlock` while earlier records still wait for room.
pub(crate) fn send(
    tls: &mut rustls::ServerConnection,
    fd: RawFd,
    data: &[u8],
    stats: &ShardStats,
) -> io::Result<usize> {
    flush(tls, fd, stats)?;
    let n = tls.writer().write(data)?;
    if n == 0 {
        // Nothing taken although nothing waits: the handshake is not done.
        return Err(io::ErrorKind::WouldBlock.into());
    }
    match flush(tls, fd, stats) {
        Err(e) if e.kind() != io::ErrorKind::WouldBlock => Err(e),
        _ => Ok(n),
    }
}

/// Tells the peer the session ends (best effort, before the socket closes).
pub(crate) fn close_notify(tls: &mut rustls::ServerConnection, fd: RawFd, stats: &ShardStats) {
    tls.send_close_notify();
    let _ = flush(tls, fd, stats);
}

/// An HTTP connection's stream: plain, or TLS over the same socket
/// (`[listeners] http_tls`). Writes over TLS finish only once their records
/// are on the socket, so a response never waits inside rustls while the
/// server waits for the next request.
pub(crate) enum HttpStream {
    Plain(glommio::net::TcpStream),
    Tls {
        stream: Box<futures_rustls::server::TlsStream<glommio::net::TcpStream>>,
        /// Plaintext taken by the last write whose records are still going out.
        owed: usize,
    },
}

impl HttpStream {
    fn tcp(&self) -> &glommio::net::TcpStream {
        match self {
            HttpStream::Plain(s) => s,
            HttpStream::Tls { stream, .. } => stream.get_ref().0,
        }
    }

    pub(crate) fn set_read_timeout(&self, d: Option<std::time::Duration>) -> io::Result<()> {
        self.tcp().set_read_timeout(d).map_err(io::Error::from)
    }

    pub(crate) fn peer_addr(&self) -> io::Result<std::net::SocketAddr> {
        self.tcp().peer_addr().map_err(io::Error::from)
    }

    /// The socket and, over TLS, its session for the I/O loop; plaintext
    /// rustls decrypted but nobody read yet is appended to `leftover`.
    pub(crate) fn into_parts(
        self,
        leftover: &mut bytes::BytesMut,
    ) -> (
        glommio::net::TcpStream,
        Option<Box<rustls::ServerConnection>>,
    ) {
        match self {
            HttpStream::Plain(s) => (s, None),
            HttpStream::Tls { stream, .. } => {
                let (tcp, mut session) = stream.into_inner();
                let mut tmp = [0u8; 4096];
                while let Ok(n) = session.reader().read(&mut tmp) {
                    if n == 0 {
                        break;
                    }
                    leftover.extend_from_slice(&tmp[..n]);
                }
                (tcp, Some(Box::new(session)))
            }
        }
    }
}

impl futures_lite::AsyncRead for HttpStream {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut [u8],
    ) -> std::task::Poll<io::Result<usize>> {
        match self.get_mut() {
            HttpStream::Plain(s) => std::pin::Pin::new(s).poll_read(cx, buf),
            HttpStream::Tls { stream, .. } => std::pin::Pin::new(&mut **stream).poll_read(cx, buf),
        }
    }
}

impl futures_lite::AsyncWrite for HttpStream {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        use std::task::{Poll, ready};
        match self.get_mut() {
            HttpStream::Plain(s) => std::pin::Pin::new(s).poll_write(cx, buf),
            HttpStream::Tls { stream, owed } => {
                if *owed == 0 {
                    let n = ready!(std::pin::Pin::new(&mut **stream).poll_write(cx, buf))?;
                    if n == 0 {
                        return Poll::Ready(Ok(0));
                    }
                    *owed = n;
                }
                ready!(std::pin::Pin::new(&mut **stream).poll_flush(cx))?;
                Poll::Ready(Ok(std::mem::take(owed)))
            }
        }
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        match self.get_mut() {
            HttpStream::Plain(s) => std::pin::Pin::new(s).poll_flush(cx),
            HttpStream::Tls { stream, .. } => std::pin::Pin::new(&mut **stream).poll_flush(cx),
        }
    }

    fn poll_close(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        match self.get_mut() {
            HttpStream::Plain(s) => std::pin::Pin::new(s).poll_close(cx),
            HttpStream::Tls { stream, .. } => std::pin::Pin::new(&mut **stream).poll_close(cx),
        }
    }
}

/// Runs the TLS handshake of an HTTPS connection, bounded by
/// `[tls] handshake_timeout_ms`; `None` when it failed or took too long.
pub(crate) async fn https_handshake(
    shared: &TlsShared,
    stats: &ShardStats,
    tcp: glommio::net::TcpStream,
) -> Option<HttpStream> {
    let config = shared.http_config.lock().ok()?.clone()?;
    let timeout = std::time::Duration::from_millis(shared.handshake_timeout_ms);
    let accept = async {
        match futures_rustls::TlsAcceptor::from(config).accept(tcp).await {
            Ok(s) => Some(Ok(s)),
            Err(e) => Some(Err(e)),
        }
    };
    let expired = async {
        glommio::timer::sleep(timeout).await;
        None
    };
    match futures_lite::future::or(accept, expired).await {
        Some(Ok(stream)) => Some(HttpStream::Tls {
            stream: Box::new(stream),
            owed: 0,
        }),
        Some(Err(e)) => {
            ShardStats::add(&stats.tls_errors, 1);
            crate::warn_every!("TLS error from an HTTPS client: {e}");
            None
        }
        None => {
            ShardStats::add(&stats.tls_handshake_timeouts, 1);
            None
        }
    }
}
