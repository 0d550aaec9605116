//! Which shard owns an address, and addresses the server assigns.
//!
//! The owner of an address is `fnv1a_64(address bytes) % shards`. FNV-1a (64
//! bit, offset basis 0xcbf29ce484222325, prime 0x100000001b3) is fixed by this
//! module and covered by a test vector, so the mapping is the same across
//! runs, builds and versions of the relay: a restart with the same shard count
//! puts every address on the same shard.

/// 64-bit FNV-1a of `bytes`.
pub const fn fnv1a_64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut i = 0;
    while i < bytes.len() {
        h ^= bytes[i] as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
        i += 1;
    }
    h
}

/// The shard that owns `name` (an address, or a group/uid index key).
#[inline]
pub fn shard_of(name: &[u8], shards: usize) -> usize {
    if shards <= 1 {
        return 0;
    }
    (fnv1a_64(name) % shards as u64) as usize
}

/// Makes an address for a client that said hello without one. The result is
/// unique for a given (`node`, `shard`, `counter`) and is chosen so that it
/// hashes to `shard`: the accepting shard keeps the connection, no hand-over.
/// `counter` is advanced past every candidate tried.
pub fn assign_address(prefix: &str, shard: usize, shards: usize, counter: &mut u64) -> String {
    loop {
        let n = *counter;
        *counter += 1;
        let candidate = format!("{prefix}{shard:x}-{n:x}");
        if shard_of(candidate.as_bytes(), shards) == shard {
            return candidate;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::name::validate_name;

    #[test]
    fn fnv_test_vectors() {
        // Published FNV-1a 64 vectors.
        assert_eq!(fnv1a_64(b""), 0xcbf29ce484222325);
        assert_eq!(fnv1a_64(b"a"), 0xaf63dc4c8601ec8c);
        assert_eq!(fnv1a_64(b"foobar"), 0x85944171f73967e8);
    }

    /// The examples of docs/protocol.md ("Address to shard").
    #[test]
    fn documented_shard_examples() {
        assert_eq!(fnv1a_64(b"ctl-8266-0042"), 0x0003_f94f_3f20_1ab4);
        assert_eq!(fnv1a_64(b"web-7f3a"), 0x0adc_3aa4_fe37_c9a1);
        assert_eq!(fnv1a_64(b"ctl-42"), 0x3d92_a80c_1dee_7213);
        let at = |a: &[u8]| [1, 2, 4, 8].map(|n| shard_of(a, n));
        assert_eq!(at(b"ctl-8266-0042"), [0, 0, 0, 4]);
        assert_eq!(at(b"web-7f3a"), [0, 1, 1, 1]);
        assert_eq!(at(b"ctl-42"), [0, 1, 3, 3]);
    }

    #[test]
    fn mapping_is_pinned() {
        // If this changes, addresses move between shards across versions.
        assert_eq!(
            shard_of(b"ctl-8266-0042", 2),
            (fnv1a_64(b"ctl-8266-0042") % 2) as usize
        );
        assert_eq!(shard_of(b"anything", 1), 0);
        let spread: Vec<usize> = (0..1000)
            .map(|i| shard_of(format!("ctl-{i}").as_bytes(), 4))
            .collect();
        for s in 0..4 {
            let n = spread.iter().filter(|&&x| x == s).count();
            assert!((150..350).contains(&n), "shard {s} got {n} of 1000");
        }
    }

    #[test]
    fn assigned_addresses_are_valid_unique_and_local() {
        let mut counter = 0;
        let mut seen = std::collections::HashSet::new();
        for _ in 0..200 {
            let a = assign_address("n1-", 3, 4, &mut counter);
            validate_name(a.as_bytes()).unwrap();
            assert_eq!(shard_of(a.as_bytes(), 4), 3);
            assert!(seen.insert(a));
        }
    }
}
