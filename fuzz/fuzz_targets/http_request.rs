//! Fuzz target `http_request`: arbitrary bytes as what an HTTP client sends
//! (`relay_shards::http::parse_request`, pipelined). The first byte picks
//! `max_body` (0 to 1,020 bytes) and the size of the pieces the rest arrives
//! in. Nothing may panic; the results (requests, then at most one error) are
//! the same whether the bytes come at once or in pieces; no body is over
//! `max_body`; the query and path decode.

#![no_main]

use libfuzzer_sys::fuzz_target;
use relay_core::pieces::decode_in_pieces;
use relay_shards::http::{HttpError, Request, decode, parse_request, query_param};

fn parse_in(data: &[u8], piece: usize, max_body: usize) -> Vec<Result<Request, HttpError>> {
    decode_in_pieces(data, &[piece], |b| parse_request(b, max_body))
}

fuzz_target!(|data: &[u8]| {
    let Some((&knob, rest)) = data.split_first() else {
        return;
    };
    let max_body = (knob & 0xf) as usize * 68;
    let piece = 1 + (knob >> 4) as usize * 3;
    let whole = parse_in(rest, rest.len(), max_body);
    assert_eq!(parse_in(rest, piece, max_body), whole);
    for r in whole.iter().flatten() {
        assert!(r.body.len() <= max_body);
        let _ = query_param(&r.query, "addr");
        let _ = decode(&r.path);
    }
});
