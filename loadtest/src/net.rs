//! TCP connects for the fleet: from a chosen loopback source address (so one host can
//! open more connections to one server port than one address has ephemeral ports),
//! with Nagle off (the tool batches its own writes), and failures sorted by kind.

use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd;

use tokio::net::{TcpSocket, TcpStream};

use crate::stats::ErrorKind;

/// Sorts a connect failure into the kind the report counts.
pub fn classify(e: &io::Error) -> ErrorKind {
    match e.raw_os_error() {
        Some(libc::EADDRNOTAVAIL) | Some(libc::EADDRINUSE) => ErrorKind::SourcePortsExhausted,
        Some(libc::EMFILE) | Some(libc::ENFILE) => ErrorKind::FdLimit,
        Some(libc::ECONNREFUSED) => ErrorKind::ConnectRefused,
        Some(libc::ETIMEDOUT) => ErrorKind::ConnectTimeout,
        _ => match e.kind() {
            io::ErrorKind::ConnectionRefused => ErrorKind::ConnectRefused,
            io::ErrorKind::TimedOut => ErrorKind::ConnectTimeout,
            _ => ErrorKind::ConnectFailed,
        },
    }
}

/// Lets the kernel pick the source port at connect time (per destination) rather than
/// at bind time, so a bound source address is not limited to one port per socket.
fn bind_address_no_port(sock: &TcpSocket) -> io::Result<()> {
    let one: libc::c_int = 1;
    // SAFETY: the fd is a valid socket owned by `sock`; the option value is a c_int
    // that lives across the call, and its size is passed.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Connects to `dst`, from `src` when given (port chosen by the kernel).
pub async fn connect(src: Option<Ipv4Addr>, dst: SocketAddr) -> Result<TcpStream, ErrorKind> {
    let sock = TcpSocket::new_v4().map_err(|e| classify(&e))?;
    if let Some(ip) = src {
        bind_address_no_port(&sock).map_err(|e| classify(&e))?;
        sock.bind(SocketAddr::new(ip.into(), 0))
            .map_err(|e| classify(&e))?;
    }
    let stream = sock.connect(dst).await.map_err(|e| classify(&e))?;
    stream.set_nodelay(true).map_err(|e| classify(&e))?;
    Ok(stream)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn connects_from_the_chosen_source_address() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dst = listener.local_addr().unwrap();
        let src = Ipv4Addr::new(127, 0, 0, 2);
        let client = connect(Some(src), dst).await.unwrap();
        let (_server, peer) = listener.accept().await.unwrap();
        assert_eq!(peer.ip(), std::net::IpAddr::V4(src));
        assert_eq!(client.local_addr().unwrap().ip(), std::net::IpAddr::V4(src));
        assert!(client.nodelay().unwrap());
        // Without a source the kernel picks one.
        let _c2 = connect(None, dst).await.unwrap();
    }

    #[tokio::test]
    async fn refused_connects_are_classified() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let dst = listener.local_addr().unwrap();
        drop(listener);
        assert_eq!(
            connect(None, dst).await.unwrap_err(),
            ErrorKind::ConnectRefused
        );
    }

    #[test]
    fn errno_values_map_to_kinds() {
        let k = |n| classify(&io::Error::from_raw_os_error(n));
        assert_eq!(k(libc::EMFILE), ErrorKind::FdLimit);
        assert_eq!(k(libc::EADDRNOTAVAIL), ErrorKind::SourcePortsExhausted);
        assert_eq!(k(libc::ETIMEDOUT), ErrorKind::ConnectTimeout);
        assert_eq!(k(libc::EHOSTUNREACH), ErrorKind::ConnectFailed);
    }
}
