//! Routing across nodes, in memory: each node is a [`Sim`] of its shards
//! plus the real cluster [`Link`]; a bus stands in for NATS (node subjects,
//! the directory and interest buckets and their watches), and the test
//! decides when it moves.

use std::collections::VecDeque;
use std::sync::Arc;

use relay_core::frame::{ErrorCode, FrameType};

use super::sim::Sim;
use crate::cluster::{ClusterStats, Effect, Link, LinkConfig};

const SHARDS: usize = 2;

struct Node {
    sim: Sim,
    link: Link,
    name: String,
}

struct Net {
    nodes: Vec<Node>,
    /// Batches in flight: (to node, payload).
    wire: VecDeque<(usize, bytes::Bytes)>,
    /// Nodes whose outgoing batches are lost (a node that stopped answering).
    mute: Vec<usize>,
    ms: u64,
}

impl Net {
    fn new(names: &[&str]) -> Net {
        let nodes: Vec<Node> = names
            .iter()
            .map(|n| {
                let cfg = LinkConfig {
                    node: (*n).into(),
                    shards: SHARDS,
                    heartbeat_ms: 3000,
                    reply_timeout_ms: 1000,
                    batch_bytes: 64 * 1024,
                    cache_size: 1000,
                };
                let mut link = Link::new(cfg, Arc::new(ClusterStats::default()), 1);
                link.set_up(true, 1);
                Node {
                    sim: Sim::node(SHARDS, n),
                    link,
                    name: (*n).to_owned(),
                }
            })
            .collect();
        let mut net = Net {
            nodes,
            wire: VecDeque::new(),
            mute: Vec::new(),
            ms: 1,
        };
        net.beat();
        net
    }

    /// Every node hears every node's heartbeat.
    fn beat(&mut self) {
        let names: Vec<String> = self.nodes.iter().map(|n| n.name.clone()).collect();
        for node in &mut self.nodes {
            for n in &names {
                node.link
                    .handle_presence(n, serde_json::json!({"node": n}), self.ms);
            }
        }
    }

    fn index(&self, name: &str) -> usize {
        self.nodes.iter().position(|n| n.name == name).unwrap()
    }

    /// Runs shards, links and the bus until nothing moves.
    fn settle(&mut self) {
        for _ in 0..1000 {
            let mut moved = false;
            let mut watch: Vec<Effect> = Vec::new();
            for i in 0..self.nodes.len() {
                let node = &mut self.nodes[i];
                node.sim.settle();
                for (shard, r) in node.sim.routers.iter().enumerate() {
                    let items = r.take_remote();
                    if !items.is_empty() {
                        moved = true;
                        node.link.handle_items(shard, items, self.ms);
                    }
                }
                node.link.flush();
                for e in node.link.take_effects() {
                    moved = true;
                    match e {
                        Effect::Publish { node: to, payload } => {
                            if !self.mute.contains(&i) {
                                let to = self.nodes.iter().position(|n| *n.name == *to).unwrap();
                                self.wire.push_back((to, payload));
                            }
                        }
                        Effect::ToShard { shard, items } => {
                            let now = self.nodes[i].sim.now();
                            for item in items {
                                self.nodes[i].sim.routers[shard].on_inbound(item, now);
                            }
                        }
                        other => watch.push(other),
                    }
                }
            }
            // Bucket writes reach every node's watch, the writer's included.
            for e in watch {
                for node in &mut self.nodes {
                    match &e {
                        Effect::DirPut { key, value } => {
                            node.link.handle_dir(key, Some(value), self.ms)
                        }
                        Effect::DirDelete { key } => node.link.handle_dir(key, None, self.ms),
                        Effect::InterestPut { key, value } => {
                            node.link.handle_interest(key, Some(value), self.ms)
                        }
                        Effect::InterestDelete { key } => {
                            node.link.handle_interest(key, None, self.ms)
                        }
                        _ => {}
                    }
                }
            }
            while let Some((to, payload)) = self.wire.pop_front() {
                moved = true;
                self.nodes[to].link.handle_batch(&payload, self.ms);
            }
            if !moved {
                return;
            }
        }
        panic!("the cluster never went quiet");
    }

    fn sim(&mut self, node: &str) -> &mut Sim {
        let i = self.index(node);
        &mut self.nodes[i].sim
    }
}

fn payloads(frames: &[relay_core::Frame]) -> Vec<Vec<u8>> {
    frames
        .iter()
        .filter(|f| f.kind == FrameType::Data)
        .map(|f| f.payload.to_vec())
        .collect()
}

#[test]
fn data_crosses_nodes_with_one_ack_and_no_route_when_no_node_holds_it() {
    let mut net = Net::new(&["n1", "n2"]);
    net.sim("n1").connect("a");
    net.sim("n2").connect("b");
    net.settle();
    let seq = net.sim("n1").data("a", "b", b"hi", true);
    assert!(
        net.sim("n1").take("a").is_empty(),
        "the answer comes from n2"
    );
    net.settle();
    assert_eq!(payloads(&net.sim("n2").take("b")), vec![b"hi".to_vec()]);
    let got = net.sim("n1").take("a");
    assert_eq!(got.len(), 1, "exactly one answer: {got:?}");
    assert_eq!((got[0].kind, got[0].seq), (FrameType::Ack, seq));

    let seq = net.sim("n1").data("a", "nobody", b"x", true);
    net.settle();
    let got = net.sim("n1").take("a");
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].seq, seq);
    assert_eq!(got[0].error_parts().unwrap().0, ErrorCode::NoRoute as u16);
}

#[test]
fn a_group_spread_over_nodes_gets_each_publish_once_and_one_ack() {
    let mut net = Net::new(&["n1", "n2", "n3"]);
    let members = [("n1", "m1"), ("n2", "m2"), ("n2", "m3"), ("n3", "m4")];
    for (n, m) in members {
        net.sim(n).connect(m);
        net.sim(n).join(m, "room", false);
    }
    net.sim("n3").connect("lonely");
    net.settle();
    let seq = net.sim("n1").publish("m1", "room", b"all", true);
    net.settle();
    for (n, m) in members {
        let got = net.sim(n).take(m);
        assert_eq!(payloads(&got), vec![b"all".to_vec()], "{m} on {n}");
        let acks: Vec<_> = got.iter().filter(|f| f.kind == FrameType::Ack).collect();
        assert_eq!(acks.len(), usize::from(m == "m1"), "{m}: {got:?}");
        if m == "m1" {
            assert_eq!(acks[0].seq, seq);
        }
    }
    assert!(payloads(&net.sim("n3").take("lonely")).is_empty());
    // The last member of n3 leaves: n3 is no longer sent the group's frames.
    net.sim("n3").leave("m4", "room");
    net.settle();
    net.sim("n1").publish("m1", "room", b"again", false);
    net.settle();
    assert!(payloads(&net.sim("n3").take("m4")).is_empty());
    assert_eq!(payloads(&net.sim("n2").take("m2")), vec![b"again".to_vec()]);
}

#[test]
fn a_newer_hello_on_another_node_replaces_the_connection() {
    let mut net = Net::new(&["n1", "n2"]);
    net.sim("n1").connect("dev");
    net.settle();
    net.sim("n1").take("dev");
    net.sim("n2").tick(5);
    net.sim("n2").connect("dev");
    net.settle();
    let old = net.sim("n1").take("dev");
    assert!(
        old.iter().any(|f| f.kind == FrameType::Error
            && f.error_parts().unwrap().0 == ErrorCode::Replaced as u16),
        "{old:?}"
    );
    net.sim("n1").connect("peer");
    net.settle();
    net.sim("n1").data("peer", "dev", b"to-new", false);
    net.settle();
    assert_eq!(
        payloads(&net.sim("n2").take("dev")),
        vec![b"to-new".to_vec()]
    );
}

#[test]
fn a_node_that_never_answers_costs_one_unavailable_after_the_timeout() {
    let mut net = Net::new(&["n1", "n2"]);
    net.sim("n1").connect("a");
    net.sim("n2").connect("b");
    net.settle();
    net.mute.push(1);
    let seq = net.sim("n1").data("a", "b", b"lost", true);
    net.settle();
    assert!(net.sim("n1").take("a").is_empty());
    net.ms += 1001;
    net.nodes[0].link.handle_tick(net.ms);
    net.settle();
    let got = net.sim("n1").take("a");
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].seq, seq);
    assert_eq!(
        got[0].error_parts().unwrap().0,
        ErrorCode::Unavailable as u16
    );
    // A late answer changes nothing.
    net.mute.clear();
    net.settle();
    assert!(net.sim("n1").take("a").is_empty());
}
