//! Fuzz target `ws_frames`: arbitrary bytes as what a WebSocket client sends
//! (`relay_shards::ws::WsDecoder`). The first byte picks the message bound
//! (16 to 2,048 bytes) and the size of the pieces the rest arrives in. Nothing
//! may panic; the results (messages, then at most one error) are the same
//! whether the bytes come at once or in pieces; text is UTF-8, no message is
//! over the bound, no control frame over 125 bytes.

#![no_main]

use libfuzzer_sys::fuzz_target;
use relay_core::pieces::decode_in_pieces;
use relay_shards::ws::{WsDecoder, WsError, WsMsg};

fn decode_in(data: &[u8], piece: usize, max: usize) -> Vec<Result<WsMsg, WsError>> {
    let mut d = WsDecoder::default();
    decode_in_pieces(data, &[piece], |b| d.decode(b, max))
}

fuzz_target!(|data: &[u8]| {
    let Some((&knob, rest)) = data.split_first() else {
        return;
    };
    let max = 16usize << (knob & 0x7);
    let piece = 1 + (knob >> 3) as usize;
    let whole = decode_in(rest, rest.len(), max);
    assert_eq!(decode_in(rest, piece, max), whole);
    for r in &whole {
        match r {
            Ok(WsMsg::Text(t)) => {
                assert!(std::str::from_utf8(t).is_ok());
                assert!(t.len() <= max);
            }
            Ok(WsMsg::Binary(b)) => assert!(b.len() <= max),
            Ok(WsMsg::Ping(p)) => assert!(p.len() <= 125),
            _ => {}
        }
    }
});
