//! Fuzz target `proxy`: arbitrary bytes into the PROXY protocol v2 reader
//! of relay-core, read the way the relay reads a socket (`needed` bytes at a
//! time, in chunks whose size the first input byte picks) and whole
//! (`parse`). Nothing may panic; `needed` never asks for a byte past the
//! header; `parse` accepts exactly the header that `needed` completed, and
//! what it reads re-encodes to a header that reads back the same addresses.

#![no_main]

use libfuzzer_sys::fuzz_target;
use relay_core::proxy;

fuzz_target!(|data: &[u8]| {
    let Some((&first, input)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(first % 32) + 1;
    let mut got: Vec<u8> = Vec::new();
    let complete = loop {
        match proxy::needed(&got) {
            Ok(0) => break true,
            Ok(n) => {
                assert!(got.len() + n <= proxy::MAX_LEN);
                let take = n.min(chunk).min(input.len() - got.len());
                if take == 0 {
                    break false;
                }
                got.extend_from_slice(&input[got.len()..got.len() + take]);
            }
            Err(_) => break false,
        }
    };
    let whole = proxy::parse(input);
    if complete {
        let h = match proxy::parse(&got) {
            Ok(h) => h,
            // Whole but bad (addresses shorter than their family needs).
            Err(e) => {
                assert_eq!(whole, Err(e));
                return;
            }
        };
        assert_eq!(h.len, got.len());
        assert_eq!(whole, Ok(h));
        if let (Some(s), Some(d)) = (h.source, h.destination) {
            let again = proxy::parse(&proxy::encode(s, d)).unwrap();
            assert_eq!(again.source.map(|a| a.port()), Some(s.port()));
        }
    } else if let Ok(h) = whole {
        panic!("parse accepted {h:?} that the reader did not complete");
    }
});
