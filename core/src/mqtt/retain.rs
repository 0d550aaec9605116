//! Retained messages: one per topic, in a tree of topic levels, bounded by
//! count and bytes. A retained PUBLISH with an empty payload deletes the
//! topic's message. A subscription finds the retained messages its filter
//! matches by walking the levels the filter names (all children for `+`,
//! a whole subtree for `#`), not by testing every topic.

use std::collections::HashMap;

use bytes::Bytes;
use thiserror::Error;

use super::message::Message;

/// Bounds of a retained store.
#[derive(Debug, Clone)]
pub struct RetainConfig {
    /// Most retained messages held.
    pub max_messages: usize,
    /// Most bytes (topic + payload + properties) held.
    pub max_bytes: usize,
}

impl Default for RetainConfig {
    fn default() -> Self {
        RetainConfig {
            max_messages: 10_000,
            max_bytes: 64 * 1024 * 1024,
        }
    }
}

/// A retained message was not stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum RetainError {
    /// The store is at its bound; the topic keeps its previous message.
    /// MQTT 5 answers a QoS 1/2 publisher with 0x97 (quota exceeded).
    #[error("retained message store is full")]
    Full,
}

#[derive(Debug, Default)]
struct Node {
    children: HashMap<Bytes, Node>,
    msg: Option<Message>,
}

impl Node {
    fn is_empty(&self) -> bool {
        self.children.is_empty() && self.msg.is_none()
    }
}

/// The retained messages of one shard.
#[derive(Debug, Default)]
pub struct RetainedStore {
    root: Node,
    count: usize,
    bytes: usize,
}

fn split_level(s: &[u8]) -> (&[u8], Option<&[u8]>) {
    match s.iter().position(|&b| b == b'/') {
        Some(i) => (&s[..i], Some(&s[i + 1..])),
        None => (s, None),
    }
}

impl RetainedStore {
    pub fn new() -> RetainedStore {
        RetainedStore::default()
    }

    /// Messages held.
    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Bytes held (topic + payload + properties of each).
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Stores `msg` as its topic's retained message (replacing the one
    /// there), or deletes the topic's message when the payload is empty.
    /// The stored copy has its RETAIN flag set.
    pub fn set(&mut self, cfg: &RetainConfig, msg: &Message) -> Result<(), RetainError> {
        if msg.payload.is_empty() {
            self.remove(&msg.topic);
            return Ok(());
        }
        let old = self.get(&msg.topic).map(Message::size);
        let count = self.count + usize::from(old.is_none());
        let bytes = self.bytes - old.unwrap_or(0) + msg.size();
        if count > cfg.max_messages || bytes > cfg.max_bytes {
            return Err(RetainError::Full);
        }
        let mut node = &mut self.root;
        let mut rest = Some(&msg.topic[..]);
        while let Some(s) = rest {
            let (level, next) = split_level(s);
            node = node
                .children
                .entry(Bytes::copy_from_slice(level))
                .or_default();
            rest = next;
        }
        let mut m = msg.clone();
        m.retain = true;
        node.msg = Some(m);
        self.count = count;
        self.bytes = bytes;
        Ok(())
    }

    /// The retained message of `topic`, if any.
    pub fn get(&self, topic: &[u8]) -> Option<&Message> {
        let mut node = &self.root;
        let mut rest = Some(topic);
        while let Some(s) = rest {
            let (level, next) = split_level(s);
            node = node.children.get(level)?;
            rest = next;
        }
        node.msg.as_ref()
    }

    /// Deletes the retained message of `topic`; returns it.
    pub fn remove(&mut self, topic: &[u8]) -> Option<Message> {
        let m = remove_at(&mut self.root, Some(topic))?;
        self.count -= 1;
        self.bytes -= m.size();
        Some(m)
    }

    /// Calls `f` for every retained message whose topic the filter (valid,
    /// not shared) matches and whose expiry has not passed at `now_ms`.
    /// Wildcards at the first level skip `$` topics.
    pub fn for_each_match<'a>(
        &'a self,
        filter: &[u8],
        now_ms: u64,
        mut f: impl FnMut(&'a Message),
    ) {
        walk(&self.root, Some(filter), true, now_ms, &mut f);
    }

    /// Deletes every message whose expiry has passed; returns how many.
    pub fn purge_expired(&mut self, now_ms: u64) -> usize {
        let mut gone = Vec::new();
        collect_expired(&self.root, now_ms, &mut gone);
        for t in &gone {
            self.remove(t);
        }
        gone.len()
    }
}

fn remove_at(node: &mut Node, rest: Option<&[u8]>) -> Option<Message> {
    let Some(s) = rest else {
        return node.msg.take();
    };
    let (level, next) = split_level(s);
    let child = node.children.get_mut(level)?;
    let m = remove_at(child, next);
    if child.is_empty() {
        node.children.remove(level);
    }
    m
}

fn collect_expired(node: &Node, now_ms: u64, out: &mut Vec<Bytes>) {
    if let Some(m) = &node.msg
        && m.is_expired(now_ms)
    {
        out.push(m.topic.clone());
    }
    for c in node.children.values() {
        collect_expired(c, now_ms, out);
    }
}

fn visible(child: &Bytes, root: bool) -> bool {
    !(root && child.first() == Some(&b'$'))
}

fn emit<'a>(node: &'a Node, now_ms: u64, f: &mut impl FnMut(&'a Message)) {
    if let Some(m) = &node.msg
        && !m.is_expired(now_ms)
    {
        f(m);
    }
}

fn emit_all<'a>(node: &'a Node, root: bool, now_ms: u64, f: &mut impl FnMut(&'a Message)) {
    emit(node, now_ms, f);
    for (name, c) in &node.children {
        if visible(name, root) {
            emit_all(c, false, now_ms, f);
        }
    }
}

fn walk<'a>(
    node: &'a Node,
    rest: Option<&[u8]>,
    root: bool,
    now_ms: u64,
    f: &mut impl FnMut(&'a Message),
) {
    let Some(s) = rest else {
        emit(node, now_ms, f);
        return;
    };
    let (level, next) = split_level(s);
    match level {
        b"#" => emit_all(node, root, now_ms, f),
        b"+" => {
            for (name, c) in &node.children {
                if visible(name, root) {
                    walk(c, next, false, now_ms, f);
                }
            }
        }
        _ => {
            if let Some(c) = node.children.get(level) {
                walk(c, next, false, now_ms, f);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mqtt::packet::QoS;
    use crate::mqtt::topic::matches;

    fn msg(topic: &str, payload: &str) -> Message {
        Message::new(
            Bytes::copy_from_slice(topic.as_bytes()),
            Bytes::copy_from_slice(payload.as_bytes()),
            QoS::AtLeastOnce,
        )
    }

    fn topics(s: &RetainedStore, filter: &str, now: u64) -> Vec<String> {
        let mut v = Vec::new();
        s.for_each_match(filter.as_bytes(), now, |m| {
            v.push(String::from_utf8(m.topic.to_vec()).unwrap())
        });
        v.sort();
        v
    }

    #[test]
    fn set_replace_delete() {
        let cfg = RetainConfig::default();
        let mut s = RetainedStore::new();
        s.set(&cfg, &msg("a/b", "1")).unwrap();
        s.set(&cfg, &msg("a/b", "22")).unwrap();
        assert_eq!(s.len(), 1);
        assert_eq!(s.bytes(), 3 + 2);
        let got = s.get(b"a/b").unwrap();
        assert_eq!(&got.payload[..], b"22");
        assert!(got.retain, "stored with RETAIN set");
        s.set(&cfg, &msg("a/b", "")).unwrap();
        assert!(s.is_empty());
        assert_eq!(s.bytes(), 0);
        assert!(s.root.is_empty(), "empty nodes are freed");
        // Deleting what is not there is fine.
        s.set(&cfg, &msg("x", "")).unwrap();
    }

    #[test]
    fn bounded_by_count_and_bytes() {
        let cfg = RetainConfig {
            max_messages: 2,
            max_bytes: 10,
        };
        let mut s = RetainedStore::new();
        s.set(&cfg, &msg("a", "1")).unwrap();
        s.set(&cfg, &msg("b", "1")).unwrap();
        assert_eq!(s.set(&cfg, &msg("c", "1")), Err(RetainError::Full));
        // Replacing within the bounds is fine; past the bytes it is not.
        s.set(&cfg, &msg("a", "12345")).unwrap();
        assert_eq!(s.set(&cfg, &msg("a", "123456789")), Err(RetainError::Full));
        assert_eq!(&s.get(b"a").unwrap().payload[..], b"12345");
        assert_eq!(s.len(), 2);
        assert_eq!(s.bytes(), 6 + 2);
    }

    #[test]
    fn lookup_by_filter() {
        let cfg = RetainConfig::default();
        let mut s = RetainedStore::new();
        for t in ["a", "a/b", "a/b/c", "a/c", "b", "$SYS/x", "/x", "a//b"] {
            s.set(&cfg, &msg(t, "p")).unwrap();
        }
        assert_eq!(topics(&s, "a/+", 0), ["a/b", "a/c"]);
        assert_eq!(topics(&s, "a/#", 0), ["a", "a//b", "a/b", "a/b/c", "a/c"]);
        assert_eq!(
            topics(&s, "#", 0),
            ["/x", "a", "a//b", "a/b", "a/b/c", "a/c", "b"]
        );
        assert_eq!(topics(&s, "+", 0), ["a", "b"]);
        assert_eq!(topics(&s, "$SYS/#", 0), ["$SYS/x"]);
        assert_eq!(topics(&s, "+/x", 0), ["/x"]);
        assert_eq!(topics(&s, "a/+/b", 0), ["a//b"]);
        // Same answers as the reference matcher.
        for f in ["a/+", "#", "+/+", "a/#", "+", "+/+/+", "$SYS/+", "/#"] {
            let mut all = Vec::new();
            s.for_each_match(b"#", 0, |m| all.push(m.topic.clone()));
            s.for_each_match(b"$SYS/#", 0, |m| all.push(m.topic.clone()));
            let mut want: Vec<String> = all
                .iter()
                .filter(|t| matches(f.as_bytes(), t))
                .map(|t| String::from_utf8(t.to_vec()).unwrap())
                .collect();
            want.sort();
            assert_eq!(topics(&s, f, 0), want, "filter {f}");
        }
    }

    #[test]
    fn expired_messages_are_skipped_and_purged() {
        let cfg = RetainConfig::default();
        let mut s = RetainedStore::new();
        let mut m = msg("t/1", "x");
        m.expires_at = Some(1_000);
        s.set(&cfg, &m).unwrap();
        s.set(&cfg, &msg("t/2", "y")).unwrap();
        assert_eq!(topics(&s, "t/#", 999), ["t/1", "t/2"]);
        assert_eq!(topics(&s, "t/#", 1_000), ["t/2"]);
        assert_eq!(s.purge_expired(1_000), 1);
        assert_eq!(s.len(), 1);
        assert!(s.get(b"t/1").is_none());
    }
}
