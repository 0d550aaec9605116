//! Names on the wire: addresses, groups and uids.
//!
//! All three share one alphabet (`A-Z a-z 0-9 . _ : @ -`) and a length of 1 to
//! 64 bytes, so a C controller can keep them in a fixed 65-byte buffer and the
//! relay can put them in URLs, Redis keys and JSON without escaping.

use thiserror::Error;

/// Longest address, group or uid, in bytes.
pub const MAX_NAME_LEN: usize = 64;

/// Why a name was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum NameError {
    #[error("name is empty")]
    Empty,
    #[error("name is {0} bytes, at most 64 are allowed")]
    TooLong(usize),
    #[error("byte 0x{byte:02x} at offset {at} is outside A-Z a-z 0-9 . _ : @ -")]
    BadByte { at: usize, byte: u8 },
}

/// One entry per byte value: may it appear in a name? (A table lookup is a
/// few instructions a byte; the chain of ranges was several times that, and
/// every DATA frame's dst is checked.)
const NAME_BYTES: [bool; 256] = {
    let mut t = [false; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        t[b] =
            matches!(c, b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'.' | b'_' | b':' | b'@' | b'-');
        b += 1;
    }
    t
};

/// True for the bytes an address, group or uid may contain.
#[inline]
pub const fn is_name_byte(b: u8) -> bool {
    NAME_BYTES[b as usize]
}

/// The destination of DATA meant for the relay's rules only (`on_message` sees it;
/// no client receives it). Outside the name alphabet, so no client can own it;
/// it is also the source of what rules send.
pub const RULES_DST: &[u8] = b"$rules";

/// Checks an address, group or uid: 1..=64 bytes of the shared alphabet.
pub fn validate_name(name: &[u8]) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty);
    }
    if name.len() > MAX_NAME_LEN {
        return Err(NameError::TooLong(name.len()));
    }
    if name.iter().all(|&b| is_name_byte(b)) {
        return Ok(());
    }
    let at = name.iter().position(|&b| !is_name_byte(b)).unwrap_or(0);
    Err(NameError::BadByte { at, byte: name[at] })
}

/// Views a validated name as text. Names are ASCII, so this cannot fail for
/// anything `validate_name` accepted; other bytes are shown lossily.
pub fn name_str(name: &[u8]) -> std::borrow::Cow<'_, str> {
    String::from_utf8_lossy(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_whole_alphabet() {
        assert_eq!(validate_name(b"ctl-8266-0042"), Ok(()));
        assert_eq!(validate_name(b"A.z_0:9@-"), Ok(()));
        assert_eq!(validate_name(&[b'a'; 64]), Ok(()));
    }

    #[test]
    fn refuses_empty_long_and_foreign_bytes() {
        assert_eq!(validate_name(b""), Err(NameError::Empty));
        assert_eq!(validate_name(&[b'a'; 65]), Err(NameError::TooLong(65)));
        assert_eq!(
            validate_name(b"a b"),
            Err(NameError::BadByte { at: 1, byte: b' ' })
        );
        assert_eq!(
            validate_name(b"x/y"),
            Err(NameError::BadByte { at: 1, byte: b'/' })
        );
        assert_eq!(
            validate_name("é".as_bytes()),
            Err(NameError::BadByte { at: 0, byte: 0xc3 })
        );
    }

    #[test]
    fn alphabet_is_exactly_the_documented_one() {
        let allowed: Vec<u8> = (0u8..=255).filter(|&b| is_name_byte(b)).collect();
        let mut expected: Vec<u8> = (b'A'..=b'Z')
            .chain(b'a'..=b'z')
            .chain(b'0'..=b'9')
            .collect();
        expected.extend_from_slice(b".:@_-");
        expected.sort();
        assert_eq!(allowed, expected);
    }
}
