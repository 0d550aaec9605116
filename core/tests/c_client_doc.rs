//! The C client code of docs/protocol.md is real: this test takes the first
//! C block of that page as it stands, compiles it with the system C compiler
//! (`$CC`, else `cc`), and checks that what it encodes is byte for byte what
//! `relay_core::codec` encodes, and that it parses what the relay writes.

use std::path::PathBuf;
use std::process::Command;

use bytes::{Bytes, BytesMut};
use relay_core::codec;
use relay_core::frame::{ErrorCode, Flags, Frame, FrameType};

/// The C driver around the documented functions: encodes three frames, then
/// parses the hex stream given as argv[1], one line per frame.
const DRIVER: &str = r#"
#include <stdio.h>
#include <stdlib.h>

static void hex(const uint8_t *p, size_t n) {
    for (size_t i = 0; i < n; i++) printf("%02x", p[i]);
}

int main(int argc, char **argv) {
    uint8_t out[512];
    size_t n = relay_encode(out, sizeof out, RELAY_DATA, RELAY_ACK_REQ, 5, "web-7f3a", "ctl-42",
                            (const uint8_t *)"on", 2);
    printf("enc "); hex(out, n); printf("\n");
    const char *hello = "{\"role\":\"controller\"}";
    n = relay_encode(out, sizeof out, RELAY_HELLO, RELAY_JSON, 0, "ctl-8266-0042", "",
                     (const uint8_t *)hello, strlen(hello));
    printf("enc "); hex(out, n); printf("\n");
    n = relay_encode_data(out, sizeof out, 7, "web-7f3a", (const uint8_t *)"\x00\xff", 2);
    printf("enc "); hex(out, n); printf("\n");
    n = relay_encode(out, sizeof out, RELAY_DATA, 0, 0, "", "0123456789012345678901234567890123456789012345678901234567890123X", 0, 0);
    printf("toolong %zu\n", n);

    if (argc < 2) return 2;
    size_t len = strlen(argv[1]) / 2;
    uint8_t *buf = malloc(len + 1);
    for (size_t i = 0; i < len; i++) sscanf(argv[1] + 2 * i, "%2hhx", &buf[i]);
    size_t at = 0;
    struct relay_frame f;
    for (;;) {
        long used = relay_parse(buf + at, len - at, &f);
        if (used <= 0) { printf("end %ld %zu\n", used, len - at); break; }
        printf("frame %u %u %u [%s] [%s] ", f.type, f.flags, (unsigned)f.seq, f.src, f.dst);
        hex(f.payload, f.payload_len); printf("\n");
        at += (size_t)used;
    }
    free(buf);
    return 0;
}
"#;

fn c_block(doc: &str) -> &str {
    let start = doc.find("```c\n").expect("docs/protocol.md has a C block") + 5;
    let len = doc[start..].find("```").expect("the C block ends");
    &doc[start..start + len]
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn encoded(f: &Frame) -> Vec<u8> {
    let mut b = BytesMut::new();
    codec::encode(f, &mut b);
    b.to_vec()
}

#[test]
fn the_documented_c_code_matches_the_codec() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let doc =
        std::fs::read_to_string(root.join("docs/protocol.md")).expect("read docs/protocol.md");
    let dir = std::env::temp_dir().join(format!("relay-c-doc-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let src = dir.join("client.c");
    let exe = dir.join("client");
    std::fs::write(&src, format!("{}\n{}", c_block(&doc), DRIVER)).unwrap();
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let built = Command::new(&cc)
        .args(["-std=c99", "-Wall", "-Wextra", "-Werror", "-O1", "-o"])
        .arg(&exe)
        .arg(&src)
        .output()
        .unwrap_or_else(|e| panic!("running the C compiler {cc:?}: {e}"));
    assert!(
        built.status.success(),
        "the C code of docs/protocol.md does not compile:\n{}",
        String::from_utf8_lossy(&built.stderr)
    );

    // What the relay writes: the worked example, a delivered DATA through a
    // group, an ERROR, a PONG, then half a frame.
    let mut example = Frame::data(&b"web-7f3a"[..], &b"ctl-42"[..], &b"on"[..]);
    example.seq = 5;
    example.flags = Flags(Flags::ACK_REQ);
    let mut group = Frame::data(&b"web-7f3a"[..], &b"room-1"[..], &b"\"hi\""[..]);
    group.flags = Flags(Flags::GROUP | Flags::JSON);
    let error = Frame::error(6, ErrorCode::NoRoute, "ctl-0099 is offline");
    let pong = Frame::pong(1_763_800_000_123);
    let mut stream = Vec::new();
    for f in [&example, &group, &error, &pong] {
        stream.extend(encoded(f));
    }
    let partial = encoded(&Frame::new(FrameType::Ping));
    stream.extend_from_slice(&partial[..6]);

    let run = Command::new(&exe).arg(hex(&stream)).output().unwrap();
    // Broken streams: a name length over 64, a name past the end, a length
    // over max_frame. The C parser says -1 (close and reconnect).
    let broken: [&[u8]; 3] = [
        &[0, 0, 0, 9, 1, 3, 0, 0, 0, 0, 0, 65, 0],
        &[0, 0, 0, 10, 1, 3, 0, 0, 0, 0, 0, 0, 5, b'a'],
        &[0, 1, 0, 1],
    ];
    for b in broken {
        let r = Command::new(&exe).arg(hex(b)).output().unwrap();
        let text = String::from_utf8(r.stdout).unwrap();
        assert_eq!(
            text.lines().last(),
            Some(format!("end -1 {}", b.len()).as_str()),
            "{b:?}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
    assert!(run.status.success(), "C client failed: {run:?}");
    let out = String::from_utf8(run.stdout).unwrap();
    let lines: Vec<&str> = out.lines().collect();

    let hello = Frame {
        src: Bytes::from_static(b"ctl-8266-0042"),
        flags: Flags(Flags::JSON),
        payload: Bytes::from_static(br#"{"role":"controller"}"#),
        ..Frame::new(FrameType::Hello)
    };
    let mut data = Frame::data(Bytes::new(), &b"web-7f3a"[..], &b"\x00\xff"[..]);
    data.seq = 7;
    data.flags = Flags(Flags::ACK_REQ);
    let want_enc = [encoded(&example), encoded(&hello), encoded(&data)];
    for (line, want) in lines[..3].iter().zip(&want_enc) {
        assert_eq!(*line, format!("enc {}", hex(want)));
    }
    assert_eq!(lines[3], "toolong 0", "a 65-byte name is refused");
    let frame_line = |f: &Frame| {
        format!(
            "frame {} {} {} [{}] [{}] {}",
            f.kind as u8,
            f.flags.0,
            f.seq,
            String::from_utf8_lossy(&f.src),
            String::from_utf8_lossy(&f.dst),
            hex(&f.payload)
        )
    };
    let want_frames: Vec<String> = [&example, &group, &error, &pong]
        .into_iter()
        .map(frame_line)
        .collect();
    assert_eq!(&lines[4..8], &want_frames[..]);
    assert_eq!(lines[8], "end 0 6", "half a frame waits for more bytes");
    assert_eq!(lines.len(), 9);
}
