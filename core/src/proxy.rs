//! The PROXY protocol, version 2 (the binary header a load balancer such as
//! HAProxy, nginx or a cloud TCP balancer puts before a connection's first
//! byte to say whom it carries): sans IO.
//!
//! The header is 16 fixed bytes (a 12-byte signature, version and command,
//! address family and transport, and the length of what follows) and then
//! that many bytes of addresses and TLVs. [`needed`] says how many more
//! bytes to read, never more than the header, so a caller reading exactly
//! that many leaves the connection's own bytes (a TLS ClientHello, a hello)
//! in the socket; [`parse`] reads the whole header.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

use thiserror::Error;

/// The 12 bytes every version 2 header starts with.
pub const SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

/// The fixed part of a header.
pub const FIXED_LEN: usize = 16;

/// The longest header accepted (fixed part, addresses and TLVs): what load
/// balancers send (addresses, a few TLVs) is far shorter.
pub const MAX_LEN: usize = FIXED_LEN + 2048;

/// Why a header was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum ProxyError {
    #[error("no PROXY protocol v2 signature")]
    Signature,
    #[error("PROXY protocol version {0} (only 2 is read)")]
    Version(u8),
    #[error("unknown PROXY command {0}")]
    Command(u8),
    #[error("PROXY header of {0} bytes, at most {MAX_LEN} are accepted")]
    TooLong(usize),
    #[error("PROXY header too short for its address family")]
    Short,
}

/// What a header says about the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// The client's address (`None`: a LOCAL header, such as a balancer's
    /// health check, or an address family other than TCP/UDP over IPv4 or
    /// IPv6: the socket's own peer address stands).
    pub source: Option<SocketAddr>,
    /// Where the client connected (the balancer's front), when given.
    pub destination: Option<SocketAddr>,
    /// The whole header's length in bytes.
    pub len: usize,
}

/// Bytes still to read before the header in `buf` (its first bytes so
/// far) is whole: 0 when it is. An error as soon as the bytes read show the
/// header is bad, so a peer that is not a balancer is cut at once.
pub fn needed(buf: &[u8]) -> Result<usize, ProxyError> {
    let seen = buf.len().min(SIGNATURE.len());
    if buf[..seen] != SIGNATURE[..seen] {
        return Err(ProxyError::Signature);
    }
    if buf.len() < FIXED_LEN {
        if buf.len() > 12 {
            check_version(buf[12])?;
        }
        return Ok(FIXED_LEN - buf.len());
    }
    check_version(buf[12])?;
    let len = FIXED_LEN + u16::from_be_bytes([buf[14], buf[15]]) as usize;
    if len > MAX_LEN {
        return Err(ProxyError::TooLong(len));
    }
    Ok(len.saturating_sub(buf.len()))
}

fn check_version(b: u8) -> Result<(), ProxyError> {
    match (b >> 4, b & 0x0f) {
        (2, 0 | 1) => Ok(()),
        (2, c) => Err(ProxyError::Command(c)),
        (v, _) => Err(ProxyError::Version(v)),
    }
}

/// Reads a whole header from the front of `buf` (which may hold more).
pub fn parse(buf: &[u8]) -> Result<Header, ProxyError> {
    if buf.len() < FIXED_LEN {
        needed(buf)?;
        return Err(ProxyError::Short);
    }
    let more = needed(&buf[..FIXED_LEN])?;
    let len = FIXED_LEN + more;
    if buf.len() < len {
        return Err(ProxyError::Short);
    }
    let body = &buf[FIXED_LEN..len];
    let local = buf[12] & 0x0f == 0;
    let (source, destination) = match buf[13] >> 4 {
        // AF_INET: 4 + 4 + 2 + 2 bytes.
        1 => {
            let a = body.get(..12).ok_or(ProxyError::Short)?;
            let ip = |o: usize| Ipv4Addr::new(a[o], a[o + 1], a[o + 2], a[o + 3]);
            let port = |o: usize| u16::from_be_bytes([a[o], a[o + 1]]);
            (
                Some(SocketAddr::from((ip(0), port(8)))),
                Some(SocketAddr::from((ip(4), port(10)))),
            )
        }
        // AF_INET6: 16 + 16 + 2 + 2 bytes.
        2 => {
            let a = body.get(..36).ok_or(ProxyError::Short)?;
            let ip = |o: usize| {
                let mut b = [0u8; 16];
                b.copy_from_slice(&a[o..o + 16]);
                Ipv6Addr::from(b)
            };
            let port = |o: usize| u16::from_be_bytes([a[o], a[o + 1]]);
            (
                Some(SocketAddr::from((ip(0), port(32)))),
                Some(SocketAddr::from((ip(16), port(34)))),
            )
        }
        // AF_UNSPEC, AF_UNIX, or a family of a later version: no address.
        _ => (None, None),
    };
    if local {
        return Ok(Header {
            source: None,
            destination: None,
            len,
        });
    }
    Ok(Header {
        source,
        destination,
        len,
    })
}

/// A PROXY command header for a TCP connection from `source` to
/// `destination` (both of one family), as a balancer writes it.
pub fn encode(source: SocketAddr, destination: SocketAddr) -> Vec<u8> {
    let mut out = SIGNATURE.to_vec();
    out.push(0x21);
    match (source, destination) {
        (SocketAddr::V4(s), SocketAddr::V4(d)) => {
            out.push(0x11);
            out.extend_from_slice(&12u16.to_be_bytes());
            out.extend_from_slice(&s.ip().octets());
            out.extend_from_slice(&d.ip().octets());
            out.extend_from_slice(&s.port().to_be_bytes());
            out.extend_from_slice(&d.port().to_be_bytes());
        }
        (s, d) => {
            let v6 = |a: SocketAddr| match a {
                SocketAddr::V4(a) => a.ip().to_ipv6_mapped(),
                SocketAddr::V6(a) => *a.ip(),
            };
            out.push(0x21);
            out.extend_from_slice(&36u16.to_be_bytes());
            out.extend_from_slice(&v6(s).octets());
            out.extend_from_slice(&v6(d).octets());
            out.extend_from_slice(&s.port().to_be_bytes());
            out.extend_from_slice(&d.port().to_be_bytes());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The example of the specification's section 2.2: TCP over IPv4.
    #[test]
    fn reads_a_tcp4_header() {
        let mut h = SIGNATURE.to_vec();
        h.extend_from_slice(&[
            0x21, 0x11, 0, 12, 203, 0, 113, 7, 10, 0, 0, 1, 0xc3, 0x50, 0x1b, 0x58,
        ]);
        h.extend_from_slice(b"\x01\x00\x00\x00\x0btail");
        assert_eq!(needed(&h[..5]), Ok(11));
        assert_eq!(needed(&h[..16]), Ok(12));
        assert_eq!(needed(&h[..28]), Ok(0));
        let got = parse(&h).unwrap();
        assert_eq!(got.source, Some("203.0.113.7:50000".parse().unwrap()));
        assert_eq!(got.destination, Some("10.0.0.1:7000".parse().unwrap()));
        assert_eq!(got.len, 28);
    }

    #[test]
    fn local_and_unspec_headers_carry_no_address() {
        let mut h = SIGNATURE.to_vec();
        h.extend_from_slice(&[0x20, 0x00, 0, 0]);
        assert_eq!(parse(&h).unwrap().source, None);
        let mut h = SIGNATURE.to_vec();
        h.extend_from_slice(&[0x21, 0x31, 0, 3, 1, 2, 3]);
        assert_eq!(parse(&h).unwrap().source, None);
    }

    #[test]
    fn bad_headers_are_refused_as_soon_as_they_show() {
        assert_eq!(needed(b"GET / HTTP/1.1"), Err(ProxyError::Signature));
        assert_eq!(needed(b"\x16\x03\x01"), Err(ProxyError::Signature));
        assert_eq!(needed(b"PROXY TCP4 "), Err(ProxyError::Signature));
        let mut h = SIGNATURE.to_vec();
        h.push(0x11);
        assert_eq!(needed(&h), Err(ProxyError::Version(1)));
        h[12] = 0x25;
        assert_eq!(needed(&h), Err(ProxyError::Command(5)));
        h[12] = 0x21;
        h.extend_from_slice(&[0x11, 0xff, 0xff]);
        assert_eq!(needed(&h), Err(ProxyError::TooLong(16 + 0xffff)));
        // TCP over IPv4 with only 4 address bytes.
        let mut h = SIGNATURE.to_vec();
        h.extend_from_slice(&[0x21, 0x11, 0, 4, 1, 2, 3, 4]);
        assert_eq!(parse(&h), Err(ProxyError::Short));
    }

    fn addr() -> impl Strategy<Value = SocketAddr> {
        prop_oneof![
            (any::<[u8; 4]>(), any::<u16>()).prop_map(|(ip, p)| SocketAddr::from((ip, p))),
            (any::<[u8; 16]>(), any::<u16>()).prop_map(|(ip, p)| SocketAddr::from((ip, p))),
        ]
    }

    proptest! {
        /// A header read in any chunking, one `needed` at a time, gives the
        /// addresses it was made from and never asks for a byte past it.
        #[test]
        fn encode_then_read_in_chunks(src in addr(), dst in addr(), chunk in 1usize..40, tail in proptest::collection::vec(any::<u8>(), 0..8)) {
            let header = encode(src, dst);
            let mut stream = header.clone();
            stream.extend_from_slice(&tail);
            let mut got = Vec::new();
            loop {
                let n = needed(&got).unwrap();
                if n == 0 { break; }
                let take = n.min(chunk);
                got.extend_from_slice(&stream[got.len()..got.len() + take]);
            }
            prop_assert_eq!(got.len(), header.len());
            let h = parse(&got).unwrap();
            let same_family = src.is_ipv4() == dst.is_ipv4();
            if src.is_ipv4() && same_family {
                prop_assert_eq!(h.source, Some(src));
            } else {
                prop_assert_eq!(h.source.map(|a| a.port()), Some(src.port()));
            }
        }

        /// Any bytes: an answer, never a panic, and `parse` agrees with `needed`.
        #[test]
        fn any_bytes_are_answered(bytes in proptest::collection::vec(any::<u8>(), 0..64), sig in any::<bool>()) {
            let mut b = if sig { SIGNATURE.to_vec() } else { Vec::new() };
            b.extend_from_slice(&bytes);
            let n = needed(&b);
            let p = parse(&b);
            if let Ok(h) = p {
                prop_assert!(h.len <= b.len());
                prop_assert_eq!(needed(&b[..h.len]), Ok(0));
            }
            if n.is_err() {
                prop_assert!(p.is_err());
            }
        }
    }
}
