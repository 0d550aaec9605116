//! Codec benchmarks: binary encode and decode of a DATA frame with a 64-byte
//! payload, one at a time and as a batch of 1000 frames in one buffer (the
//! path a socket read takes), the JSON form for comparison, and the
//! connection state machine over the same batch.
//!
//! Run: `cargo bench -p relay-core --bench codec`. Figures are in
//! BENCHMARKS.md ("Codec (relay-core)").

use std::hint::black_box;

use bytes::{Bytes, BytesMut};
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use relay_core::codec::{self, Decoder};
use relay_core::conn::{ConnConfig, Connection, Event, Now, Transport};
use relay_core::frame::{Flags, Frame, FrameType};
use relay_core::json;

const BATCH: usize = 1000;

fn data_frame() -> Frame {
    let mut f = Frame::data(
        Bytes::from_static(b"web-7f3a"),
        Bytes::from_static(b"ctl-8266-0042"),
        Bytes::from(vec![0x5au8; 64]),
    );
    f.seq = 5;
    f.flags = Flags(Flags::ACK_REQ);
    f
}

fn json_frame() -> Frame {
    let mut f = data_frame();
    // 64 bytes of JSON text, so the JSON form carries it as a value.
    f.payload =
        Bytes::from_static(br#"{"cmd":"relay_on","ch":2,"at":1763800000000,"by":"web-7f3a-xyz"}"#);
    assert_eq!(f.payload.len(), 64);
    f.flags = Flags(Flags::ACK_REQ | Flags::JSON);
    f
}

fn now() -> Now {
    Now {
        mono_ms: 0,
        wall_ms: 1_763_800_000_000,
    }
}

fn binary(c: &mut Criterion) {
    let f = data_frame();
    let mut one = BytesMut::new();
    codec::encode(&f, &mut one);
    let one = one.freeze();
    let mut batch = BytesMut::new();
    for _ in 0..BATCH {
        codec::encode(&f, &mut batch);
    }
    let batch = batch.freeze();
    let d = Decoder::new(65536);

    let mut g = c.benchmark_group("binary");
    g.throughput(Throughput::Elements(1));
    g.bench_function("encode_data64", |b| {
        let mut out = BytesMut::with_capacity(4096);
        b.iter(|| {
            out.clear();
            codec::encode(black_box(&f), &mut out);
            black_box(out.len())
        })
    });
    // One frame from a buffer of its own: also pays for that buffer's first
    // split (the allocation becomes shared) and its free. The x1000 batch
    // below is the path a socket read takes.
    g.bench_function("decode_data64", |b| {
        b.iter_batched_ref(
            || BytesMut::from(&one[..]),
            |buf| black_box(d.decode(buf).unwrap().unwrap()),
            BatchSize::SmallInput,
        )
    });
    g.bench_function("parse_body_data64", |b| {
        let body = one.slice(4..);
        b.iter(|| black_box(codec::parse_body(black_box(body.clone())).unwrap()))
    });

    g.throughput(Throughput::Elements(BATCH as u64));
    g.bench_function("encode_data64_x1000", |b| {
        let mut out = BytesMut::with_capacity(batch.len());
        b.iter(|| {
            out.clear();
            for _ in 0..BATCH {
                codec::encode(black_box(&f), &mut out);
            }
            black_box(out.len())
        })
    });
    g.bench_function("decode_data64_x1000", |b| {
        b.iter_batched_ref(
            || BytesMut::from(&batch[..]),
            |buf| {
                let mut n = 0;
                while let Some(fr) = d.decode(buf).unwrap() {
                    n += fr.payload.len();
                }
                black_box(n)
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

fn json_form(c: &mut Criterion) {
    let f = json_frame();
    let line = json::to_json_string(&f);
    let mut g = c.benchmark_group("json");
    g.throughput(Throughput::Elements(1));
    g.bench_function("write_data64", |b| {
        let mut out = BytesMut::with_capacity(4096);
        b.iter(|| {
            out.clear();
            json::write_json(black_box(&f), &mut out);
            black_box(out.len())
        })
    });
    g.bench_function("parse_data64", |b| {
        b.iter(|| black_box(json::parse_json(black_box(line.as_bytes())).unwrap()))
    });
    g.finish();
}

fn connection(c: &mut Criterion) {
    let cfg = ConnConfig {
        frames_per_sec: 0,
        queue_bytes: 1 << 20,
        ..ConnConfig::default()
    };
    let f = data_frame();
    let mut batch = BytesMut::new();
    for _ in 0..BATCH {
        codec::encode(&f, &mut batch);
    }
    let batch = batch.freeze();
    let open = || {
        let mut conn = Connection::new(&cfg, Transport::Tcp, now());
        let hello = Frame {
            src: Bytes::from_static(b"web-7f3a"),
            ..Frame::new(FrameType::Hello)
        };
        let mut b = BytesMut::new();
        codec::encode(&hello, &mut b);
        let Some(Event::Hello(h)) = conn.handle_input(&cfg, now(), &mut b) else {
            panic!("hello refused")
        };
        conn.accept(&cfg, now(), &h, h.addr.clone(), "n1");
        while let Some(chunk) = conn.poll_transmit(usize::MAX) {
            conn.on_transmitted(&cfg, now(), chunk.len());
        }
        conn
    };

    let mut g = c.benchmark_group("connection");
    g.throughput(Throughput::Elements(BATCH as u64));
    g.bench_function("handle_input_data64_x1000", |b| {
        let mut conn = open();
        b.iter_batched_ref(
            || BytesMut::from(&batch[..]),
            |buf| {
                let mut n = 0;
                while let Some(ev) = conn.handle_input(&cfg, now(), buf) {
                    if let Event::Data(fr) = ev {
                        n += fr.payload.len();
                    }
                }
                black_box(n)
            },
            BatchSize::SmallInput,
        )
    });
    g.bench_function("send_and_transmit_data64_x1000", |b| {
        let mut conn = open();
        b.iter(|| {
            for _ in 0..BATCH {
                conn.send(&cfg, now(), black_box(&f)).unwrap();
            }
            let mut n = 0;
            while let Some(chunk) = conn.poll_transmit(64 * 1024) {
                n += chunk.len();
                conn.on_transmitted(&cfg, now(), chunk.len());
            }
            black_box(n)
        })
    });
    g.finish();
}

criterion_group!(benches, binary, json_form, connection);
criterion_main!(benches);
