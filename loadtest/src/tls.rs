//! TLS for `tcps://`, `wss://` and `mqtts://` targets: the client configuration
//! (trusted CAs from `target.ca_file`, an optional client certificate for mutual
//! TLS, the server name), the async handshake of a fresh connection, and the
//! record layer that sealing and opening go through once the link runs.
//!
//! A link keeps its `rustls::ClientConnection` inside the same mutex as its encoder
//! and pending bytes ([`crate::client::Outbox`]): the sender thread encodes,
//! encrypts and writes under that lock, and the reader task decrypts under it, so
//! records leave in the order their plaintext was written and the reader's
//! decryption never sees a half-updated session.

use std::io::{Read, Write};
use std::path::Path;
use std::sync::Arc;

use bytes::BytesMut;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::net;
use crate::scenario::TargetSpec;
use crate::stats::ErrorKind;

/// What every TLS connection of one side shares.
#[derive(Debug, Clone)]
pub struct TlsClient {
    /// The client configuration (roots, client certificate, session cache).
    pub config: Arc<ClientConfig>,
    /// The name the server's certificate is verified for and sent as SNI.
    pub name: ServerName<'static>,
}

impl TlsClient {
    /// The configuration of `target` for a server whose URL names `host`.
    pub fn new(target: &TargetSpec, host: &str) -> Result<Self, String> {
        let config = client_config(target)?;
        let name = target.tls_server_name.as_deref().unwrap_or(host);
        let name = ServerName::try_from(name.to_string())
            .map_err(|e| format!("`{name}` is not a TLS server name: {e}"))?;
        Ok(Self { config, name })
    }

    /// A fresh client session.
    pub fn session(&self) -> Result<ClientConnection, ErrorKind> {
        ClientConnection::new(self.config.clone(), self.name.clone())
            .map_err(|e| ErrorKind::Tls(reason(&e)))
    }
}

fn read_certs(path: &Path, key: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("{key} {}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{key} {}: no certificate in it", path.display()));
    }
    Ok(certs)
}

/// Builds the client configuration of `target`: `ca_file` is required, the client
/// certificate and key come together or not at all. Errors name the key.
pub fn client_config(target: &TargetSpec) -> Result<Arc<ClientConfig>, String> {
    let ca = target
        .ca_file
        .as_deref()
        .ok_or("target.ca_file: a TLS target needs the CA certificates to trust (--ca-file)")?;
    let mut roots = RootCertStore::empty();
    for c in read_certs(ca, "target.ca_file")? {
        roots
            .add(c)
            .map_err(|e| format!("target.ca_file {}: {e}", ca.display()))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?
        .with_root_certificates(roots);
    let config = match (&target.client_cert, &target.client_key) {
        (None, None) => builder.with_no_client_auth(),
        (Some(cert), Some(key)) => {
            let chain = read_certs(cert, "target.client_cert")?;
            let key = PrivateKeyDer::from_pem_file(key)
                .map_err(|e| format!("target.client_key {}: {e}", key.display()))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| format!("target.client_key: {e}"))?
        }
        _ => {
            return Err(
                "target.client_cert, target.client_key: give both (mutual TLS) or neither".into(),
            );
        }
    };
    Ok(Arc::new(config))
}

/// A short, stable name for a TLS failure, as the report's error key uses it:
/// `unknown_issuer`, `not_valid_for_name`, `alert_handshake_failure`, ...
pub fn reason(e: &rustls::Error) -> String {
    let raw = match e {
        rustls::Error::InvalidCertificate(c) => format!("{c:?}"),
        rustls::Error::AlertReceived(a) => format!("Alert{a:?}"),
        other => format!("{other:?}"),
    };
    // First identifier of the Debug form, CamelCase to snake_case.
    let ident: String = raw
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric())
        .collect();
    let mut out = String::with_capacity(ident.len() + 4);
    for (i, c) in ident.chars().enumerate() {
        if c.is_ascii_uppercase() {
            if i > 0 {
                out.push('_');
            }
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    // `NotValidForNameContext { .. }` and the like: the context is not the reason.
    let out = out.strip_suffix("_context").unwrap_or(&out);
    if out.is_empty() {
        "error".into()
    } else {
        out.into()
    }
}

/// Sends everything the session has to send (handshake records, sealed data).
async fn send_all(stream: &mut TcpStream, tls: &mut ClientConnection) -> Result<(), ErrorKind> {
    let mut out = Vec::new();
    while tls.wants_write() {
        tls.write_tls(&mut out)
            .map_err(|_| ErrorKind::HandshakeFailed)?;
    }
    if !out.is_empty() {
        stream
            .write_all(&out)
            .await
            .map_err(|_| ErrorKind::HandshakeFailed)?;
    }
    Ok(())
}

/// Feeds bytes read from the socket to the session and moves the plaintext they
/// complete into `plain`. `Ok(false)`: the server closed the session (close_notify).
pub fn open_records(
    tls: &mut ClientConnection,
    mut raw: &[u8],
    plain: &mut BytesMut,
) -> Result<bool, ErrorKind> {
    let mut open = true;
    while !raw.is_empty() {
        tls.read_tls(&mut raw)
            .map_err(|e| ErrorKind::Tls(format!("read_{:?}", e.kind()).to_lowercase()))?;
        let state = tls
            .process_new_packets()
            .map_err(|e| ErrorKind::Tls(reason(&e)))?;
        let mut n = state.plaintext_bytes_to_read();
        while n > 0 {
            let at = plain.len();
            plain.resize(at + n, 0);
            let got = tls
                .reader()
                .read(&mut plain[at..])
                .map_err(|_| ErrorKind::ReadFailed)?;
            plain.truncate(at + got);
            if got == 0 {
                break;
            }
            n -= got;
        }
        if state.peer_has_closed() {
            open = false;
        }
    }
    Ok(open)
}

/// Reads from the socket until the session yields plaintext (or the server closes).
pub async fn read_more(
    stream: &mut TcpStream,
    tls: &mut ClientConnection,
    plain: &mut BytesMut,
) -> Result<(), ErrorKind> {
    let mut raw = vec![0u8; 16 * 1024 + 256];
    loop {
        let n = match stream.read(&mut raw).await {
            Ok(0) => return Err(ErrorKind::HandshakeFailed),
            Ok(n) => n,
            Err(e) => return Err(net::classify(&e)),
        };
        let before = plain.len();
        let open = open_records(tls, &raw[..n], plain)?;
        // Post-handshake messages may want an answer (a key update).
        send_all(stream, tls).await?;
        if plain.len() > before {
            return Ok(());
        }
        if !open {
            return Err(ErrorKind::HandshakeFailed);
        }
    }
}

/// Runs the TLS handshake on a fresh connection.
pub async fn handshake(
    stream: &mut TcpStream,
    tls: &mut ClientConnection,
) -> Result<(), ErrorKind> {
    let mut raw = vec![0u8; 16 * 1024 + 256];
    let mut early = BytesMut::new();
    while tls.is_handshaking() {
        send_all(stream, tls).await?;
        if !tls.is_handshaking() {
            break;
        }
        let n = match stream.read(&mut raw).await {
            // Closed mid-handshake: the server refused us without an alert.
            Ok(0) => return Err(ErrorKind::Tls("closed_during_handshake".into())),
            Ok(n) => n,
            Err(e) => return Err(net::classify(&e)),
        };
        if let Err(e) = open_records(tls, &raw[..n], &mut early) {
            // Tell the server why (the alert rustls queued), then fail.
            let _ = send_all(stream, tls).await;
            return Err(e);
        }
    }
    // The client's Finished (TLS 1.3) or anything left.
    send_all(stream, tls).await?;
    debug_assert!(
        early.is_empty(),
        "no application data before the handshake ends"
    );
    Ok(())
}

/// Seals `plain` into records appended to `out`.
pub fn seal(tls: &mut ClientConnection, plain: &[u8], out: &mut Vec<u8>) -> std::io::Result<()> {
    tls.writer().write_all(plain)?;
    while tls.wants_write() {
        tls.write_tls(out)?;
    }
    Ok(())
}

/// Records the session has to send on its own (a close_notify, an answer to a key
/// update), appended to `out`.
pub fn pending_records(tls: &mut ClientConnection, out: &mut Vec<u8>) -> std::io::Result<()> {
    while tls.wants_write() {
        tls.write_tls(out)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failure_reasons_are_short_snake_case_names() {
        use rustls::{AlertDescription, CertificateError};
        assert_eq!(
            reason(&rustls::Error::InvalidCertificate(
                CertificateError::UnknownIssuer
            )),
            "unknown_issuer"
        );
        assert_eq!(
            reason(&rustls::Error::AlertReceived(
                AlertDescription::HandshakeFailure
            )),
            "alert_handshake_failure"
        );
        assert_eq!(
            reason(&rustls::Error::InvalidCertificate(
                CertificateError::NotValidForNameContext {
                    expected: ServerName::try_from("a.example").unwrap(),
                    presented: vec!["b.example".into()],
                }
            )),
            "not_valid_for_name"
        );
        assert_eq!(reason(&rustls::Error::DecryptError), "decrypt_error");
    }

    #[test]
    fn a_tls_target_needs_a_ca_file_and_both_halves_of_a_client_identity() {
        let mut t = TargetSpec::default();
        let e = client_config(&t).unwrap_err();
        assert!(e.contains("target.ca_file"), "{e}");
        t.ca_file = Some("/nonexistent/ca.pem".into());
        let e = client_config(&t).unwrap_err();
        assert!(e.contains("/nonexistent/ca.pem"), "{e}");
        let dir = std::env::temp_dir().join(format!("lt-tls-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ca = dir.join("ca.pem");
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        std::fs::write(&ca, cert.pem()).unwrap();
        t.ca_file = Some(ca.clone());
        client_config(&t).unwrap();
        t.client_cert = Some(ca);
        let e = client_config(&t).unwrap_err();
        assert!(e.contains("give both"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
