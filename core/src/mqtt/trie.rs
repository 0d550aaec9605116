//! The subscription index: a trie of topic filters, one level per node.
//!
//! Finding the subscriptions that match a topic walks only the nodes the
//! topic's levels reach (the level itself, `+` and `#` at each step), never
//! the whole set of subscriptions. Shared subscriptions
//! (`$share/<group>/<filter>`) sit at their filter's node, one group per
//! share name; each message goes to one member of each group, taken in
//! turn (round robin).
//!
//! The trie is generic over the subscriber id (an address, a connection
//! slot...) and the options kept with each subscription.

use std::cell::Cell;
use std::collections::HashMap;
use std::hash::Hash;

use bytes::Bytes;

use super::topic::{TopicError, parse_filter};

/// Subscriptions by topic filter.
#[derive(Debug)]
pub struct SubscriptionTrie<Id, O> {
    root: Node<Id, O>,
    /// (filter, subscriber) pairs held.
    len: usize,
}

#[derive(Debug)]
struct Node<Id, O> {
    /// Next levels by name; `+` and `#` are children like any other level.
    children: HashMap<Bytes, Node<Id, O>>,
    /// Subscriptions whose filter ends at this node.
    subs: HashMap<Id, O>,
    /// Shared subscriptions whose filter ends here, by share name.
    shared: HashMap<Bytes, ShareGroup<Id, O>>,
}

#[derive(Debug)]
struct ShareGroup<Id, O> {
    members: Vec<(Id, O)>,
    /// The member the next message goes to (modulo the member count).
    next: Cell<usize>,
}

impl<Id, O> Default for Node<Id, O> {
    fn default() -> Self {
        Node {
            children: HashMap::new(),
            subs: HashMap::new(),
            shared: HashMap::new(),
        }
    }
}

impl<Id, O> Node<Id, O> {
    fn is_empty(&self) -> bool {
        self.children.is_empty() && self.subs.is_empty() && self.shared.is_empty()
    }
}

impl<Id, O> Default for SubscriptionTrie<Id, O> {
    fn default() -> Self {
        SubscriptionTrie {
            root: Node::default(),
            len: 0,
        }
    }
}

/// One subscription found for a topic.
#[derive(Debug, PartialEq, Eq)]
pub struct Match<'a, Id, O> {
    pub id: &'a Id,
    pub options: &'a O,
    /// The share name when it came through a shared subscription.
    pub group: Option<&'a [u8]>,
}

/// Splits the first level off a topic or filter.
fn split_level(s: &[u8]) -> (&[u8], Option<&[u8]>) {
    match s.iter().position(|&b| b == b'/') {
        Some(i) => (&s[..i], Some(&s[i + 1..])),
        None => (s, None),
    }
}

impl<Id: Clone + Eq + Hash, O> SubscriptionTrie<Id, O> {
    pub fn new() -> Self {
        SubscriptionTrie::default()
    }

    /// (filter, subscriber) pairs held.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Adds `id`'s subscription to `filter` (as sent: a `$share/..` filter
    /// joins its group). A subscription that exists has its options
    /// replaced; the old ones are returned.
    pub fn insert(&mut self, filter: &[u8], id: Id, options: O) -> Result<Option<O>, TopicError> {
        let f = parse_filter(filter)?;
        let mut node = &mut self.root;
        let mut rest = Some(f.filter);
        while let Some(s) = rest {
            let (level, next) = split_level(s);
            node = node
                .children
                .entry(Bytes::copy_from_slice(level))
                .or_default();
            rest = next;
        }
        let old = match f.group {
            None => node.subs.insert(id, options),
            Some(g) => {
                let group = node
                    .shared
                    .entry(Bytes::copy_from_slice(g))
                    .or_insert_with(|| ShareGroup {
                        members: Vec::new(),
                        next: Cell::new(0),
                    });
                match group.members.iter_mut().find(|(m, _)| *m == id) {
                    Some((_, o)) => Some(std::mem::replace(o, options)),
                    None => {
                        group.members.push((id, options));
                        None
                    }
                }
            }
        };
        if old.is_none() {
            self.len += 1;
        }
        Ok(old)
    }

    /// Removes `id`'s subscription to `filter`; returns its options, or
    /// `None` when there was none. Nodes left empty are freed.
    pub fn remove(&mut self, filter: &[u8], id: &Id) -> Option<O> {
        let f = parse_filter(filter).ok()?;
        let old = remove_at(&mut self.root, Some(f.filter), f.group, id);
        if old.is_some() {
            self.len -= 1;
        }
        old
    }

    /// Calls `f` for every subscription matching the topic name `topic`:
    /// each plain subscription whose filter matches, and one member per
    /// matching share group (the next in turn). A subscriber with several
    /// matching filters is reported once per filter.
    pub fn for_each_match<'a>(&'a self, topic: &[u8], mut f: impl FnMut(Match<'a, Id, O>)) {
        let dollar = topic.first() == Some(&b'$');
        walk(&self.root, Some(topic), !dollar, &mut f);
    }

    /// The matches of `topic` as (id, options) pairs, appended to `out`.
    pub fn collect_matches(&self, topic: &[u8], out: &mut Vec<(Id, O)>)
    where
        O: Clone,
    {
        self.for_each_match(topic, |m| out.push((m.id.clone(), m.options.clone())));
    }
}

fn emit<'a, Id, O>(node: &'a Node<Id, O>, f: &mut impl FnMut(Match<'a, Id, O>)) {
    for (id, options) in &node.subs {
        f(Match {
            id,
            options,
            group: None,
        });
    }
    for (name, g) in &node.shared {
        if g.members.is_empty() {
            continue;
        }
        let i = g.next.get() % g.members.len();
        g.next.set(i.wrapping_add(1));
        let (id, options) = &g.members[i];
        f(Match {
            id,
            options,
            group: Some(name),
        });
    }
}

/// `rest`: the topic levels still to match (`None`: all matched);
/// `wild`: whether wildcards may match here (not at the root of a
/// `$`-topic).
fn walk<'a, Id, O>(
    node: &'a Node<Id, O>,
    rest: Option<&[u8]>,
    wild: bool,
    f: &mut impl FnMut(Match<'a, Id, O>),
) {
    if wild && let Some(hash) = node.children.get(&b"#"[..]) {
        // `#` matches the parent level too: `a/#` matches `a`.
        emit(hash, f);
    }
    let Some(s) = rest else {
        emit(node, f);
        return;
    };
    let (level, next) = split_level(s);
    if let Some(child) = node.children.get(level) {
        walk(child, next, true, f);
    }
    if wild
        && level != b"+"
        && let Some(plus) = node.children.get(&b"+"[..])
    {
        walk(plus, next, true, f);
    }
}

fn remove_at<Id: Eq + Hash, O>(
    node: &mut Node<Id, O>,
    rest: Option<&[u8]>,
    group: Option<&[u8]>,
    id: &Id,
) -> Option<O> {
    let Some(s) = rest else {
        return match group {
            None => node.subs.remove(id),
            Some(g) => {
                let members = &mut node.shared.get_mut(g)?.members;
                let i = members.iter().position(|(m, _)| m == id)?;
                let (_, o) = members.remove(i);
                if members.is_empty() {
                    node.shared.remove(g);
                }
                Some(o)
            }
        };
    };
    let (level, next) = split_level(s);
    let child = node.children.get_mut(level)?;
    let old = remove_at(child, next, group, id);
    if child.is_empty() {
        node.children.remove(level);
    }
    old
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mqtt::topic::matches;

    fn ids(t: &SubscriptionTrie<u32, u8>, topic: &[u8]) -> Vec<u32> {
        let mut v = Vec::new();
        t.for_each_match(topic, |m| v.push(*m.id));
        v.sort();
        v
    }

    #[test]
    fn plain_filters() {
        let mut t = SubscriptionTrie::new();
        t.insert(b"a/b", 1, 0).unwrap();
        t.insert(b"a/+", 2, 0).unwrap();
        t.insert(b"a/#", 3, 0).unwrap();
        t.insert(b"#", 4, 0).unwrap();
        t.insert(b"+/b", 5, 0).unwrap();
        t.insert(b"b/c", 6, 0).unwrap();
        assert_eq!(ids(&t, b"a/b"), vec![1, 2, 3, 4, 5]);
        assert_eq!(ids(&t, b"a"), vec![3, 4]);
        assert_eq!(ids(&t, b"a/b/c"), vec![3, 4]);
        assert_eq!(ids(&t, b"b/c"), vec![4, 6]);
        assert_eq!(ids(&t, b"$SYS/b"), Vec::<u32>::new());
        t.insert(b"$SYS/#", 7, 0).unwrap();
        assert_eq!(ids(&t, b"$SYS/b"), vec![7]);
        assert_eq!(t.len(), 7);
    }

    #[test]
    fn insert_replaces_and_remove_prunes() {
        let mut t = SubscriptionTrie::new();
        assert_eq!(t.insert(b"a/b/c", 1, 1), Ok(None));
        assert_eq!(t.insert(b"a/b/c", 1, 2), Ok(Some(1)));
        assert_eq!(t.len(), 1);
        let mut got = Vec::new();
        t.collect_matches(b"a/b/c", &mut got);
        assert_eq!(got, vec![(1, 2)]);
        assert_eq!(t.remove(b"a/b/c", &2), None);
        assert_eq!(t.remove(b"a/b", &1), None);
        assert_eq!(t.remove(b"a/b/c", &1), Some(2));
        assert!(t.is_empty());
        assert!(t.root.is_empty(), "empty nodes are freed");
        assert_eq!(t.insert(b"a/#/b", 1, 0), Err(TopicError::MultiLevel));
    }

    #[test]
    fn shared_groups_take_turns() {
        let mut t = SubscriptionTrie::new();
        for id in [1, 2, 3] {
            t.insert(b"$share/g/s/+", id, 0).unwrap();
        }
        t.insert(b"$share/h/s/#", 9, 0).unwrap();
        t.insert(b"s/x", 10, 0).unwrap();
        let mut seen = Vec::new();
        for _ in 0..6 {
            let mut g = Vec::new();
            t.for_each_match(b"s/x", |m| {
                if m.group == Some(&b"g"[..]) {
                    g.push(*m.id)
                }
            });
            assert_eq!(g.len(), 1, "one member of g per message");
            seen.push(g[0]);
            // h and the plain one get every message.
            assert_eq!(ids(&t, b"s/x").iter().filter(|&&i| i >= 9).count(), 2);
        }
        seen.sort();
        assert_eq!(seen, vec![1, 1, 2, 2, 3, 3]);
        assert_eq!(t.remove(b"$share/g/s/+", &2), Some(0));
        let mut g = Vec::new();
        for _ in 0..4 {
            t.for_each_match(b"s/x", |m| {
                if m.group == Some(&b"g"[..]) {
                    g.push(*m.id)
                }
            });
        }
        g.sort();
        assert_eq!(g, vec![1, 1, 3, 3]);
        // A shared filter does not match through the plain trie path.
        assert_eq!(t.remove(b"s/+", &1), None);
    }

    #[test]
    fn agrees_with_the_reference_matcher() {
        let filters: &[&[u8]] = &[
            b"#", b"+", b"+/+", b"a/#", b"a/+/c", b"a//c", b"/#", b"+/#", b"$x/#", b"a",
        ];
        let topics: &[&[u8]] = &[b"a", b"a/b/c", b"a//c", b"/", b"", b"$x/y", b"$x", b"b/a"];
        let mut t = SubscriptionTrie::new();
        for (i, f) in filters.iter().enumerate() {
            t.insert(f, i as u32, 0).unwrap();
        }
        for topic in topics {
            let want: Vec<u32> = (0..filters.len() as u32)
                .filter(|&i| matches(filters[i as usize], topic))
                .collect();
            assert_eq!(ids(&t, topic), want, "topic {topic:?}");
        }
    }
}
