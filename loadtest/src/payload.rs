//! The stamp every load-test message carries: its intended send time (CLOCK_MONOTONIC
//! ns, shared by all processes on the host), the step it belongs to, and how late the
//! generator actually wrote it (ns after the intended time). Binary form: the payload's
//! first 16 bytes (u64 BE time, u32 BE step, u32 BE lag), padded to the payload size.
//! JSON form: `{"t":<ns>,"s":<step>,"l":<lag>,"p":"xxxx"}` padded the same way.

use bytes::BufMut;
use serde::Deserialize;

/// Bytes the binary stamp takes at the start of a payload.
pub const STAMP_LEN: usize = 16;

/// What a message carries to measure it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    /// When the message was meant to be sent (not when it was), ns of CLOCK_MONOTONIC.
    pub intended_ns: u64,
    /// Step the message belongs to; a message arriving during another step is late.
    pub step: u32,
    /// How long after `intended_ns` the generator wrote it, ns (saturating at ~4.3 s),
    /// so the receiver also knows the actual send time.
    pub lag_ns: u32,
}

#[derive(Deserialize)]
struct JsonStamp {
    t: u64,
    s: u32,
    #[serde(default)]
    l: u32,
}

impl Stamp {
    /// Writes the binary payload: stamp, then `b'x'` up to `payload_len` bytes.
    pub fn put_binary(&self, out: &mut impl BufMut, payload_len: usize) {
        out.put_u64(self.intended_ns);
        out.put_u32(self.step);
        out.put_u32(self.lag_ns);
        out.put_bytes(b'x', payload_len.saturating_sub(STAMP_LEN));
    }

    /// Length of the JSON payload for these numbers without padding.
    fn json_base_len(&self) -> usize {
        // {"t":N,"s":N,"l":N,"p":""}
        23 + digits(self.intended_ns) + digits(self.step as u64) + digits(self.lag_ns as u64)
    }

    /// Opens a JSON object with the stamp's fields: `{"t":N,"s":N,"l":N`.
    fn put_json_fields(&self, out: &mut impl BufMut) {
        out.put_slice(b"{\"t\":");
        put_decimal(out, self.intended_ns);
        out.put_slice(b",\"s\":");
        put_decimal(out, self.step as u64);
        out.put_slice(b",\"l\":");
        put_decimal(out, self.lag_ns as u64);
    }

    /// Writes the JSON payload object, padded towards `payload_len` bytes.
    pub fn put_json(&self, out: &mut impl BufMut, payload_len: usize) {
        self.put_json_fields(out);
        out.put_slice(b",\"p\":\"");
        out.put_bytes(b'x', payload_len.saturating_sub(self.json_base_len()));
        out.put_slice(b"\"}");
    }

    /// Length `put_json` writes for `payload_len`.
    pub fn json_len(&self, payload_len: usize) -> usize {
        self.json_base_len().max(payload_len)
    }

    /// Reads a binary stamp from the start of a payload.
    pub fn from_binary(b: &[u8]) -> Option<Stamp> {
        if b.len() < STAMP_LEN {
            return None;
        }
        Some(Stamp {
            intended_ns: u64::from_be_bytes(b[0..8].try_into().ok()?),
            step: u32::from_be_bytes(b[8..12].try_into().ok()?),
            lag_ns: u32::from_be_bytes(b[12..16].try_into().ok()?),
        })
    }

    /// Reads a JSON stamp from JSON payload text.
    pub fn from_json_bytes(b: &[u8]) -> Option<Stamp> {
        let j: JsonStamp = serde_json::from_slice(b).ok()?;
        Some(Stamp {
            intended_ns: j.t,
            step: j.s,
            lag_ns: j.l,
        })
    }

    /// Reads a JSON stamp from a parsed payload value.
    pub fn from_json_value(v: &serde_json::Value) -> Option<Stamp> {
        Some(Stamp {
            intended_ns: v.get("t")?.as_u64()?,
            step: u32::try_from(v.get("s")?.as_u64()?).ok()?,
            lag_ns: v
                .get("l")
                .and_then(|l| l.as_u64())
                .map_or(0, |l| u32::try_from(l).unwrap_or(u32::MAX)),
        })
    }

    /// The actual send time: the intended time plus the lag.
    pub fn sent_ns(&self) -> u64 {
        self.intended_ns.saturating_add(self.lag_ns as u64)
    }

    /// Reads either form: JSON when flagged as JSON or when it starts with `{`.
    pub fn from_payload(b: &[u8], json: bool) -> Option<Stamp> {
        if json || b.first() == Some(&b'{') {
            Self::from_json_bytes(b)
        } else {
            Self::from_binary(b)
        }
    }
}

fn digits(mut n: u64) -> usize {
    let mut d = 1;
    while n >= 10 {
        n /= 10;
        d += 1;
    }
    d
}

fn put_decimal(out: &mut impl BufMut, n: u64) {
    let mut buf = [0u8; 20];
    let mut i = buf.len();
    let mut n = n;
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.put_slice(&buf[i..]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binary_stamp_round_trips_and_pads() {
        let s = Stamp {
            intended_ns: 123_456_789_012,
            step: 7,
            lag_ns: 41_000,
        };
        let mut v = Vec::new();
        s.put_binary(&mut v, 64);
        assert_eq!(v.len(), 64);
        assert_eq!(Stamp::from_binary(&v), Some(s));
        assert_eq!(Stamp::from_payload(&v, false), Some(s));
        assert_eq!(Stamp::from_binary(&v[..15]), None);
    }

    #[test]
    fn json_stamp_round_trips_and_pads() {
        let s = Stamp {
            intended_ns: 9_000_000_000_000_000_000,
            step: 0,
            lag_ns: u32::MAX,
        };
        let mut v = Vec::new();
        s.put_json(&mut v, 64);
        assert_eq!(v.len(), 64);
        assert_eq!(v.len(), s.json_len(64));
        let value: serde_json::Value = serde_json::from_slice(&v).unwrap();
        assert_eq!(Stamp::from_json_value(&value), Some(s));
        assert_eq!(Stamp::from_payload(&v, true), Some(s));
        // A payload shorter than the stamp text is not truncated.
        let mut short = Vec::new();
        s.put_json(&mut short, 16);
        assert_eq!(Stamp::from_json_bytes(&short), Some(s));
    }

    #[test]
    fn foreign_payloads_have_no_stamp() {
        assert_eq!(Stamp::from_payload(b"{\"cmd\":\"on\"}", true), None);
        assert_eq!(Stamp::from_payload(b"hi", false), None);
    }
}

/// A JSON payload template such as `{"temp": {{rand 20..90}}, "n": {{seq}}}`, so that
/// a run carries the data operators' rules look at. Every message is the template's
/// object with the stamp's fields put first (`{"t":…,"s":…,"l":…, "temp": 57}`);
/// `{{rand A..B}}` is a random integer from A to B (inclusive), `{{seq}}` counts the
/// sender's messages. Templated payloads are sent as JSON and not padded.
#[derive(Debug, Clone, PartialEq)]
pub struct Template {
    /// The pieces after the object's opening `{`.
    parts: Vec<Part>,
}

#[derive(Debug, Clone, PartialEq)]
enum Part {
    Text(String),
    Rand(i64, i64),
    Seq,
}

impl Template {
    /// Parses and checks a template: it must render to a JSON object.
    pub fn parse(text: &str) -> Result<Self, String> {
        let t = text.trim();
        let Some(rest) = t.strip_prefix('{') else {
            return Err("the template must be a JSON object (start with `{`)".into());
        };
        let mut parts = Vec::new();
        let mut s = rest;
        while let Some(i) = s.find("{{") {
            parts.push(Part::Text(s[..i].to_string()));
            let end = s[i..]
                .find("}}")
                .ok_or_else(|| format!("`{}` is not closed with }}}}", &s[i..]))?;
            let inner = s[i + 2..i + end].trim();
            let part = if inner == "seq" {
                Part::Seq
            } else if let Some(range) = inner.strip_prefix("rand ") {
                let (a, b) = range
                    .trim()
                    .split_once("..")
                    .ok_or_else(|| format!("`{{{{{inner}}}}}`: write rand A..B"))?;
                let a: i64 = a
                    .trim()
                    .parse()
                    .map_err(|_| format!("`{a}` is not an integer"))?;
                let b: i64 = b
                    .trim()
                    .parse()
                    .map_err(|_| format!("`{b}` is not an integer"))?;
                if b < a {
                    return Err(format!(
                        "`{{{{{inner}}}}}`: the range ends before it starts"
                    ));
                }
                Part::Rand(a, b)
            } else {
                return Err(format!(
                    "`{{{{{inner}}}}}` is not a placeholder ({{{{rand A..B}}}}, {{{{seq}}}})"
                ));
            };
            parts.push(part);
            s = &s[i + end + 2..];
        }
        parts.push(Part::Text(s.to_string()));
        let tpl = Self { parts };
        let mut probe = Vec::new();
        let stamp = Stamp {
            intended_ns: 1,
            step: 1,
            lag_ns: 1,
        };
        tpl.render(&mut probe, stamp, &mut 1, 7);
        match serde_json::from_slice::<serde_json::Value>(&probe) {
            Ok(v) if v.is_object() => Ok(tpl),
            Ok(_) => Err("the template must render to a JSON object".into()),
            Err(e) => Err(format!("the template does not render to JSON: {e}")),
        }
    }

    /// Writes one message: the stamp's fields, then the template's, as one object.
    /// `rng` is the sender's random state, `seq` its message count.
    pub fn render(&self, out: &mut impl BufMut, stamp: Stamp, rng: &mut u64, seq: u64) {
        stamp.put_json_fields(out);
        // An empty object template adds nothing after the stamp.
        let empty =
            self.parts.len() == 1 && matches!(&self.parts[0], Part::Text(t) if t.trim() == "}");
        if !empty {
            out.put_u8(b',');
        }
        for p in &self.parts {
            match p {
                Part::Text(t) => out.put_slice(t.as_bytes()),
                Part::Seq => put_decimal(out, seq),
                Part::Rand(a, b) => {
                    // xorshift64: cheap, and plenty for sensor-like values.
                    *rng ^= *rng << 13;
                    *rng ^= *rng >> 7;
                    *rng ^= *rng << 17;
                    let span = (b - a) as u64 + 1;
                    let v = *a + (*rng % span) as i64;
                    if v < 0 {
                        out.put_u8(b'-');
                    }
                    put_decimal(out, v.unsigned_abs());
                }
            }
        }
    }
}

#[cfg(test)]
mod template_tests {
    use super::*;

    #[test]
    fn templates_render_json_with_the_stamp_and_values_in_range() {
        let t = Template::parse(r#"{"temp": {{rand 20..90}}, "n": {{seq}}, "unit": "C"}"#).unwrap();
        let mut rng = 0x1234_5678u64;
        let st = Stamp {
            intended_ns: 99,
            step: 2,
            lag_ns: 5,
        };
        for seq in 0..200 {
            let mut v = Vec::new();
            t.render(&mut v, st, &mut rng, seq);
            let j: serde_json::Value = serde_json::from_slice(&v).unwrap();
            let temp = j["temp"].as_i64().unwrap();
            assert!((20..=90).contains(&temp), "{temp}");
            assert_eq!(j["n"].as_u64(), Some(seq));
            assert_eq!(j["unit"], "C");
            assert_eq!(Stamp::from_payload(&v, true), Some(st));
        }
        let mut v = Vec::new();
        Template::parse("{}")
            .unwrap()
            .render(&mut v, st, &mut rng, 0);
        assert_eq!(Stamp::from_payload(&v, true), Some(st));
    }

    #[test]
    fn bad_templates_are_clear_errors() {
        for (t, want) in [
            ("[1]", "JSON object"),
            (r#"{"a": {{rand 9..1}}}"#, "ends before"),
            (r#"{"a": {{now}}}"#, "not a placeholder"),
            (r#"{"a": {{rand 1..2}"#, "not closed"),
            (r#"{"a": }"#, "does not render to JSON"),
        ] {
            let e = Template::parse(t).unwrap_err();
            assert!(e.contains(want), "{t}: {e}");
        }
    }
}
