//! The router on its own, through the simulation in `sim`: cross-shard
//! behaviour with the mesh's timing chosen by the test, and property tests
//! over random sequences of joins, leaves, publishes and reconnects.

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;

use super::timers::SLOT_MS;
use relay_core::frame::{ErrorCode, FrameType};
use relay_core::route::shard_of;

use super::sim::Sim;

const SHARDS: usize = 4;

/// `n` names with `prefix` whose owner is `shard`.
fn on_shard(prefix: &str, shard: usize, n: usize) -> Vec<String> {
    (0..)
        .map(|i| format!("{prefix}{i}"))
        .filter(|a| shard_of(a.as_bytes(), SHARDS) == shard)
        .take(n)
        .collect()
}

fn data_payloads(frames: &[relay_core::Frame]) -> Vec<Vec<u8>> {
    frames
        .iter()
        .filter(|f| f.kind == FrameType::Data)
        .map(|f| f.payload.to_vec())
        .collect()
}

#[test]
fn a_join_is_acked_only_once_every_shard_knows_the_member() {
    let mut sim = Sim::new(SHARDS);
    let member = on_shard("m", 0, 1).remove(0);
    let publisher = on_shard("p", 3, 1).remove(0);
    sim.connect(&member);
    sim.connect(&publisher);
    let seq = sim.join(&member, "site-1", true);
    // Nothing has crossed yet: no ACK, and the publisher's shard does not
    // know the group has a member.
    assert!(sim.take(&member).is_empty(), "no ACK before the mesh ran");
    sim.ship();
    assert!(sim.take(&member).is_empty());
    // Every peer learns the mask, then answers; the ACK comes last.
    sim.settle();
    let ack = sim.expect(&member, FrameType::Ack);
    assert_eq!(ack.seq, seq);
    sim.publish(&publisher, "site-1", b"hi", false);
    sim.settle();
    assert_eq!(data_payloads(&sim.take(&member)), vec![b"hi".to_vec()]);
}

#[test]
fn a_publish_before_the_mask_arrives_misses_the_new_member_and_says_so() {
    let mut sim = Sim::new(SHARDS);
    let member = on_shard("m", 1, 1).remove(0);
    let publisher = on_shard("p", 2, 1).remove(0);
    sim.connect(&member);
    sim.connect(&publisher);
    sim.join(&member, "g", false);
    // The publisher's shard has not heard of the member: the publish is
    // accepted and reaches nobody, which the ACK says (0 reached is an ACK).
    let seq = sim.publish(&publisher, "g", b"early", true);
    let ack = sim.expect(&publisher, FrameType::Ack);
    assert_eq!(ack.seq, seq);
    sim.settle();
    assert!(data_payloads(&sim.take(&member)).is_empty());
    sim.publish(&publisher, "g", b"late", false);
    sim.settle();
    assert_eq!(data_payloads(&sim.take(&member)), vec![b"late".to_vec()]);
}

#[test]
fn a_group_spread_over_every_shard_gets_each_publish_once_and_one_ack() {
    let mut sim = Sim::new(SHARDS);
    let mut members = Vec::new();
    for s in 0..SHARDS {
        members.extend(on_shard(&format!("m{s}-"), s, 3));
    }
    for m in &members {
        sim.connect(m);
        sim.join(m, "all", false);
    }
    sim.settle();
    let sender = members[0].clone();
    let seq = sim.publish(&sender, "all", b"x", true);
    sim.settle();
    for m in &members {
        let got = sim.take(m);
        assert_eq!(data_payloads(&got), vec![b"x".to_vec()], "{m}");
        let acks: Vec<_> = got.iter().filter(|f| f.kind == FrameType::Ack).collect();
        if *m == sender {
            assert_eq!(acks.len(), 1, "one answer for one ACK_REQ");
            assert_eq!(acks[0].seq, seq);
        } else {
            assert!(acks.is_empty());
        }
    }
}

#[test]
fn data_to_an_address_on_another_shard_is_delivered_and_acked_from_there() {
    let mut sim = Sim::new(SHARDS);
    let a = on_shard("a", 0, 1).remove(0);
    let b = on_shard("b", 3, 1).remove(0);
    sim.connect(&a);
    sim.connect(&b);
    let seq = sim.data(&a, &b, b"ping", true);
    assert!(
        sim.take(&a).is_empty(),
        "the owner shard answers, after the mesh"
    );
    sim.settle();
    assert_eq!(data_payloads(&sim.take(&b)), vec![b"ping".to_vec()]);
    assert_eq!(sim.expect(&a, FrameType::Ack).seq, seq);
    sim.disconnect(&b);
    let seq = sim.data(&a, &b, b"again", true);
    sim.settle();
    let err = sim.expect(&a, FrameType::Error);
    assert_eq!(err.seq, seq);
    assert_eq!(
        err.error_parts().map(|e| e.0),
        Some(ErrorCode::NoRoute as u16)
    );
}

#[test]
fn the_last_member_leaving_a_shard_clears_its_bit_everywhere() {
    let mut sim = Sim::new(SHARDS);
    let m = on_shard("m", 2, 1).remove(0);
    let p = on_shard("p", 0, 1).remove(0);
    sim.connect(&m);
    sim.connect(&p);
    sim.join(&m, "g", false);
    sim.settle();
    sim.leave(&m, "g");
    sim.settle();
    for r in &sim.routers {
        assert!(
            r.indexes[0].borrow().get(b"g".as_slice()).is_none(),
            "shard {} still lists the group",
            r.shard
        );
    }
    sim.publish(&p, "g", b"x", false);
    sim.settle();
    assert!(data_payloads(&sim.take(&m)).is_empty());
}

#[test]
fn a_silent_client_is_closed_at_its_deadline_and_leaves_its_groups_everywhere() {
    let mut sim = Sim::new(SHARDS);
    let quiet = on_shard("q", 1, 1).remove(0);
    let talker = on_shard("t", 2, 1).remove(0);
    sim.connect(&quiet);
    sim.connect(&talker);
    sim.join(&quiet, "g", false);
    sim.settle();
    let idle_ms = {
        let c = &sim.routers[0].cfg().conn;
        u64::from(c.heartbeat_default_s) * u64::from(c.idle_factor) * 1000
    };
    sim.tick(idle_ms / 2);
    sim.sweep();
    assert!(sim.online(&quiet), "still inside its deadline");
    // The talker keeps itself alive; the quiet one passes its deadline.
    sim.send(&talker, relay_core::Frame::new(FrameType::Ping));
    sim.expect(&talker, FrameType::Pong);
    sim.tick(idle_ms / 2 + 1_000);
    sim.sweep();
    assert!(!sim.online(&quiet), "closed at its deadline");
    assert!(sim.online(&talker));
    for r in &sim.routers {
        assert!(r.indexes[0].borrow().get(b"g".as_slice()).is_none());
    }
}

#[test]
fn during_an_upgrade_a_hello_is_told_to_come_back_not_that_the_relay_shuts_down() {
    let mut sim = Sim::new(SHARDS);
    for r in &sim.routers {
        r.going_away(10_000);
    }
    let answer = sim.hello("late-1");
    assert_eq!(answer.kind, FrameType::Error);
    assert_eq!(
        answer.error_parts().map(|e| e.0),
        Some(ErrorCode::GoingAway as u16),
        "{answer:?}"
    );
    let hint = answer.retry_after_ms().expect("a retry hint");
    assert!(hint <= 10_000, "{hint}");
}

/// One step of a random history.
#[derive(Debug, Clone)]
enum Op {
    Join(usize, usize),
    Leave(usize, usize),
    Publish(usize, usize),
    Disconnect(usize),
    Connect(usize),
}

fn op(clients: usize, groups: usize) -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0..clients, 0..groups).prop_map(|(c, g)| Op::Join(c, g)),
        1 => (0..clients, 0..groups).prop_map(|(c, g)| Op::Leave(c, g)),
        3 => (0..clients, 0..groups).prop_map(|(c, g)| Op::Publish(c, g)),
        1 => (0..clients).prop_map(Op::Disconnect),
        1 => (0..clients).prop_map(Op::Connect),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Every publish reaches exactly the group's members at that moment
    /// (its sender included when a member), once each, whichever shards
    /// they live on; leaving or disconnecting takes a client out.
    #[test]
    fn every_publish_reaches_exactly_the_members_of_that_moment(
        ops in proptest::collection::vec(op(8, 3), 1..60)
    ) {
        let clients: Vec<String> = (0..8).map(|i| format!("c{i}")).collect();
        let groups = ["g0", "g1", "g2"];
        let mut sim = Sim::new(SHARDS);
        for c in &clients {
            sim.connect(c);
        }
        let mut members: BTreeMap<usize, BTreeSet<usize>> = BTreeMap::new();
        let mut payload = 0u32;
        for op in ops {
            match op {
                Op::Join(c, g) if sim.online(&clients[c]) => {
                    sim.join(&clients[c], groups[g], false);
                    members.entry(g).or_default().insert(c);
                }
                Op::Leave(c, g) if sim.online(&clients[c]) => {
                    sim.leave(&clients[c], groups[g]);
                    members.entry(g).or_default().remove(&c);
                }
                Op::Publish(c, g) if sim.online(&clients[c]) => {
                    payload += 1;
                    let body = payload.to_be_bytes();
                    sim.publish(&clients[c], groups[g], &body, false);
                    sim.settle();
                    let expected = members.get(&g).cloned().unwrap_or_default();
                    for (i, name) in clients.iter().enumerate() {
                        if !sim.online(name) {
                            continue;
                        }
                        let got = data_payloads(&sim.take(name));
                        let want = if expected.contains(&i) { vec![body.to_vec()] } else { vec![] };
                        prop_assert_eq!(got, want, "{} after a publish to {}", name, groups[g]);
                    }
                }
                Op::Disconnect(c) if sim.online(&clients[c]) => {
                    sim.disconnect(&clients[c]);
                    for m in members.values_mut() {
                        m.remove(&c);
                    }
                }
                Op::Connect(c) if !sim.online(&clients[c]) => sim.connect(&clients[c]),
                _ => {}
            }
            sim.settle();
            // Anything else a client got (ACKs, errors) would be a surprise.
            for name in &clients {
                let extra = sim.take(name);
                prop_assert!(extra.is_empty(), "{} got {:?}", name, extra);
            }
        }
    }

    /// Whatever the order in which the mesh delivers, each ACK_REQ gets
    /// exactly one answer and every member gets the publish once.
    #[test]
    fn acks_are_answered_once_whatever_the_mesh_order(
        per_shard in 1usize..4,
        delays in proptest::collection::vec(0u8..3, 0..40)
    ) {
        let mut sim = Sim::new(SHARDS);
        let mut names = Vec::new();
        for s in 0..SHARDS {
            names.extend(on_shard(&format!("n{s}-"), s, per_shard));
        }
        for n in &names {
            sim.connect(n);
            sim.join(n, "g", true);
        }
        // Deliver in bursts of the chosen sizes, shipping in between.
        for d in delays {
            sim.ship();
            for _ in 0..d {
                sim.deliver_one();
            }
        }
        sim.settle();
        for n in &names {
            let got = sim.take(n);
            prop_assert_eq!(got.iter().filter(|f| f.kind == FrameType::Ack).count(), 1);
        }
        let seq = sim.publish(&names[0], "g", b"all", true);
        sim.settle();
        for n in &names {
            let got = sim.take(n);
            prop_assert_eq!(data_payloads(&got), vec![b"all".to_vec()]);
            let acks = got.iter().filter(|f| f.kind == FrameType::Ack && f.seq == seq).count();
            prop_assert_eq!(acks, usize::from(*n == names[0]));
        }
    }
}

#[test]
fn an_idle_fleet_is_not_looked_at_on_every_tick() {
    let mut sim = Sim::new(SHARDS);
    for i in 0..1_000 {
        sim.connect(&format!("idle-{i}"));
    }
    // Five seconds of ticks, far inside every connection's idle deadline.
    for _ in 0..50 {
        sim.tick(100);
        sim.sweep();
    }
    let visits: u64 = sim.routers.iter().map(|r| r.deadline_visits()).sum();
    assert_eq!(visits, 0, "no deadline came, so no connection was visited");
    // At the idle deadline every one is looked at once, and closed.
    let idle_ms = {
        let c = &sim.routers[0].cfg().conn;
        u64::from(c.heartbeat_default_s) * u64::from(c.idle_factor) * 1000
    };
    sim.tick(idle_ms);
    sim.sweep();
    let visits: u64 = sim.routers.iter().map(|r| r.deadline_visits()).sum();
    assert_eq!(visits, 1_000);
    assert!((0..1_000).all(|i| !sim.online(&format!("idle-{i}"))));
}

/// What a client does in the deadline model.
#[derive(Debug, Clone)]
enum Life {
    /// Connects and says hello.
    Connect(usize),
    /// Opens a socket and never says hello.
    Silent(usize),
    /// Sends a PING (activity).
    Ping(usize),
    Disconnect(usize),
    /// The clock moves on by this many ms and the sweeper runs.
    Tick(u64),
}

fn life(clients: usize) -> impl Strategy<Value = Life> {
    prop_oneof![
        2 => (0..clients).prop_map(Life::Connect),
        1 => (0..clients).prop_map(Life::Silent),
        3 => (0..clients).prop_map(Life::Ping),
        1 => (0..clients).prop_map(Life::Disconnect),
        4 => (1u64..40_000).prop_map(Life::Tick),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// The sweeper closes a connection once its deadline (hello or idle) is
    /// past by one slot, and never before the deadline, however its activity
    /// moved it: the same verdicts a scan of every connection gives.
    #[test]
    fn deadlines_close_exactly_the_connections_whose_time_came(
        ops in proptest::collection::vec(life(6), 1..80)
    ) {
        use std::collections::HashMap;
        let names: Vec<String> = (0..6).map(|i| format!("d{i}")).collect();
        let mut sim = Sim::new(SHARDS);
        let (hello_ms, idle_ms) = {
            let c = &sim.routers[0].cfg().conn;
            (c.hello_timeout_ms, u64::from(c.heartbeat_default_s) * u64::from(c.idle_factor) * 1000)
        };
        // The model: each live connection's deadline.
        let mut deadline: HashMap<usize, u64> = HashMap::new();
        for op in ops {
            match op {
                Life::Connect(i) if !sim.online(&names[i]) => {
                    sim.connect(&names[i]);
                    deadline.insert(i, sim.now_ms() + idle_ms);
                }
                Life::Silent(i) if !sim.online(&names[i]) => {
                    sim.open_silent(&names[i]);
                    deadline.insert(i, sim.now_ms() + hello_ms);
                }
                Life::Ping(i) if sim.online(&names[i]) && deadline[&i] > sim.now_ms() => {
                    let said_hello = sim.routers.iter().any(|r| r.lookup(names[i].as_bytes()).is_some());
                    if said_hello {
                        sim.send(&names[i], relay_core::Frame::new(FrameType::Ping));
                        deadline.insert(i, sim.now_ms() + idle_ms);
                    }
                }
                Life::Disconnect(i) if sim.online(&names[i]) => {
                    sim.disconnect(&names[i]);
                    deadline.remove(&i);
                }
                Life::Tick(ms) => {
                    sim.tick(ms);
                    sim.sweep();
                    let now = sim.now_ms();
                    for (i, name) in names.iter().enumerate() {
                        match deadline.get(&i) {
                            Some(&d) if d.div_ceil(SLOT_MS) * SLOT_MS <= now => {
                                prop_assert!(!sim.online(name), "{name}: deadline {d} passed by now {now}");
                                deadline.remove(&i);
                            }
                            Some(&d) if d > now => {
                                prop_assert!(sim.online(name), "{name}: closed before its deadline {d} (now {now})");
                            }
                            // Within the slot after its deadline: either way.
                            Some(_) => {
                                if !sim.online(name) {
                                    deadline.remove(&i);
                                }
                            }
                            None => prop_assert!(!sim.online(name)),
                        }
                    }
                }
                _ => {}
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    /// Paging through a shard's clients (any page size, any prefix) gives
    /// every matching address once, in order, as a sorted copy would.
    #[test]
    fn client_listing_pages_in_address_order(
        names in proptest::collection::btree_set("[a-c]{1,4}", 1..40),
        limit in 1usize..7,
        prefix in "[a-c]{0,2}",
    ) {
        use std::cell::RefCell;
        use std::rc::Rc;
        use super::{Call, CallResult};
        let mut sim = Sim::new(1);
        for n in &names {
            sim.connect(n);
        }
        let want: Vec<String> = names.iter().filter(|n| n.starts_with(&prefix)).cloned().collect();
        let mut got: Vec<String> = Vec::new();
        let mut after = None;
        for _ in 0..100 {
            let page = Rc::new(RefCell::new(Vec::new()));
            let into = page.clone();
            let call = Call::List { role: None, prefix: prefix.clone(), after: after.clone(), limit };
            sim.routers[0].exec(call, Box::new(move |r| {
                if let CallResult::List(v) = r {
                    *into.borrow_mut() = v.into_iter().map(|c| String::from_utf8_lossy(&c.addr).into_owned()).collect();
                }
            }), relay_core::conn::Now { mono_ms: 1, wall_ms: 1 });
            let page = page.borrow().clone();
            prop_assert!(page.len() <= limit);
            let Some(last) = page.last().cloned() else { break };
            got.extend(page);
            after = Some(bytes::Bytes::from(last));
        }
        prop_assert_eq!(got, want);
    }
}
