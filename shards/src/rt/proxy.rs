//! The PROXY protocol v2 on the listeners that sit behind a load balancer
//! (`[listeners] proxy_protocol`): the header is read before anything else
//! (before TLS, before the hello), exactly as many bytes as it has, so what
//! follows stays in the socket for the connection; the client address it
//! names replaces the socket's peer (the balancer) in the session. A
//! connection whose header is missing, bad, or not whole by
//! `proxy_header_timeout_ms` is closed. The parsing is relay-core's.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use futures_lite::AsyncReadExt as _;
use relay_config::ListenersConfig;
use relay_core::proxy;

/// Which listeners expect the header.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct ProxyOn {
    pub(crate) tcp: bool,
    pub(crate) tcp_tls: bool,
    pub(crate) http: bool,
    pub(crate) http_tls: bool,
    pub(crate) timeout: Duration,
}

impl ProxyOn {
    pub(crate) fn new(l: &ListenersConfig) -> ProxyOn {
        let on = |name: &str| l.proxy_protocol.iter().any(|p| p == name);
        ProxyOn {
            tcp: on("tcp"),
            tcp_tls: on("tcp_tls"),
            http: on("http"),
            http_tls: on("http_tls"),
            timeout: Duration::from_millis(l.proxy_header_timeout_ms),
        }
    }

    /// The controllers' listener (`tls`: the TLS one) expects the header.
    pub(crate) fn controllers(&self, tls: bool) -> bool {
        if tls { self.tcp_tls } else { self.tcp }
    }

    /// The HTTP listener (`tls`: the HTTPS one) expects the header.
    pub(crate) fn http(&self, tls: bool) -> bool {
        if tls { self.http_tls } else { self.http }
    }
}

/// Reads the PROXY header at the start of an HTTP connection (at most
/// `timeout`): the client address it names (`None` for a LOCAL header), or
/// why the connection is to be closed.
pub(super) async fn read_header(
    stream: &mut glommio::net::TcpStream,
    timeout: Duration,
) -> Result<Option<SocketAddr>, String> {
    let deadline = Instant::now() + timeout;
    let mut buf = Vec::with_capacity(proxy::FIXED_LEN + 36);
    loop {
        let need = proxy::needed(&buf).map_err(|e| format!("bad PROXY header: {e}"))?;
        if need == 0 {
            break;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || stream.set_read_timeout(Some(left)).is_err() {
            return Err("no PROXY header in time".into());
        }
        let start = buf.len();
        buf.resize(start + need, 0);
        match stream.read(&mut buf[start..]).await {
            Ok(0) => return Err("closed before its PROXY header".into()),
            Ok(n) => buf.truncate(start + n),
            Err(_) if Instant::now() >= deadline => {
                return Err("no PROXY header in time".into());
            }
            Err(e) => return Err(format!("reading the PROXY header: {e}")),
        }
    }
    let _ = stream.set_read_timeout(None);
    let h = proxy::parse(&buf).map_err(|e| format!("bad PROXY header: {e}"))?;
    Ok(h.source)
}
