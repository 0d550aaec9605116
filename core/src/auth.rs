//! Client tokens for `[auth] mode = "hmac"`.
//!
//! A device's token is the lowercase hex of HMAC-SHA256(secret, address): a
//! vendor computes it once per device at provisioning time, the relay only
//! needs the shared secret. See docs/protocol.md for the test vector.

use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// The token for `address` under `secret` (64 lowercase hex digits).
pub fn token_for(secret: &[u8], address: &[u8]) -> String {
    let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC accepts keys of any length");
    mac.update(address);
    hex::encode(mac.finalize().into_bytes())
}

/// Checks `token` (hex, either case) for `address` in constant time.
pub fn verify_token(secret: &[u8], address: &[u8], token: &str) -> bool {
    let Ok(raw) = hex::decode(token.trim()) else {
        return false;
    };
    let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC accepts keys of any length");
    mac.update(address);
    mac.verify_slice(&raw).is_ok()
}

/// Compares a secret the client gave with the configured one in time that
/// depends on neither where they differ nor their lengths: both are hashed
/// (SHA-256) and the digests compared in constant time. For the HTTP API's
/// bearer token and the service token of a hello.
pub fn same_secret(given: &[u8], expected: &[u8]) -> bool {
    use sha2::Digest;
    let a = Sha256::digest(given);
    let b = Sha256::digest(expected);
    same_token(&a, &b)
}

/// Compares two tokens in time independent of where they differ.
pub fn same_token(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_token_compares_whole_tokens() {
        assert!(same_token(b"abc", b"abc"));
        assert!(!same_token(b"abc", b"abd"));
        assert!(!same_token(b"abc", b"abcd"));
        assert!(same_token(b"", b""));
    }

    #[test]
    fn same_secret_needs_the_whole_secret() {
        assert!(same_secret(b"api-token-1", b"api-token-1"));
        assert!(!same_secret(b"api-token-2", b"api-token-1"));
        assert!(!same_secret(b"api-token", b"api-token-1"));
        assert!(!same_secret(b"api-token-12", b"api-token-1"));
        assert!(!same_secret(b"", b"api-token-1"));
    }

    #[test]
    fn rfc4231_case_2_vector() {
        // RFC 4231 test case 2: key "Jefe", data "what do ya want for nothing?"
        assert_eq!(
            token_for(b"Jefe", b"what do ya want for nothing?"),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    /// The test vector of docs/protocol.md ("The HMAC token").
    #[test]
    fn documented_device_vector() {
        let t = token_for(b"s3cret", b"ctl-8266-0042");
        assert_eq!(
            t,
            "9988764a9af4f21a2f99934d56acc425e1a9c03dd4abdc450093f4be20aa1f72"
        );
        assert!(verify_token(b"s3cret", b"ctl-8266-0042", &t));
        assert!(verify_token(b"s3cret", b"ctl-8266-0042", &t.to_uppercase()));
        assert!(!verify_token(b"s3cret", b"ctl-8266-0043", &t));
        assert!(!verify_token(b"other", b"ctl-8266-0042", &t));
        assert!(!verify_token(b"s3cret", b"ctl-8266-0042", "zz"));
        assert!(!verify_token(b"s3cret", b"ctl-8266-0042", ""));
    }
}
