//! Fuzz target `cluster_wire`: arbitrary bytes as a batch from another node
//! (`relay_shards::cluster::wire::read`). Nothing may panic, and a batch that
//! reads writes back to a batch that reads, with as many items, and from then
//! on to the same items (the first pass clears reserved flag bits, as the
//! binary codec does, and cuts an error message or node name that reading
//! as lossy UTF-8 made longer than the wire allows).

#![no_main]

use libfuzzer_sys::fuzz_target;
use relay_shards::cluster::wire::{Item, Writer, read};

fn write(from: &str, items: &[Item]) -> Vec<u8> {
    let mut w = Writer::new(from);
    for item in items {
        w.push(item);
    }
    w.finish().to_vec()
}

fuzz_target!(|data: &[u8]| {
    let Ok((from, items)) = read(data) else {
        return;
    };
    let (from1, once) = read(&write(&from, &items)).expect("a rewritten batch reads");
    assert_eq!(once.len(), items.len());
    let (from2, twice) = read(&write(&from1, &once)).expect("it reads again");
    assert_eq!(from2, from1);
    assert_eq!(twice, once);
});
