//! Tests of the session state machine: every flow driven with encoded
//! packets on a simulated clock, output decoded back from `poll_transmit`.

use super::*;
use crate::mqtt::codec::{Decoder, encode};
use crate::mqtt::packet::{Subscribe, Unsubscribe};

const V3: Version = Version::V311;
const V5: Version = Version::V5;

fn t(ms: u64) -> Now {
    Now {
        mono_ms: ms,
        wall_ms: 1_763_800_000_000 + ms,
    }
}

fn b(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}

fn wire(p: &Packet, v: Version) -> BytesMut {
    let mut out = BytesMut::new();
    encode(p, v, &mut out).unwrap();
    out
}

fn connect(v: Version, id: &str, clean: bool) -> Connect {
    Connect {
        version: v,
        clean_start: clean,
        keep_alive: 10,
        client_id: b(id),
        ..Connect::default()
    }
}

/// Everything the session has written, decoded, confirmed as written.
fn out(s: &mut Session, cfg: &SessionConfig, now: Now) -> Vec<Packet> {
    let mut buf = BytesMut::new();
    while let Some(c) = s.poll_transmit(1 << 20) {
        s.on_transmitted(cfg, now, c.len());
        buf.extend_from_slice(&c);
    }
    let d = Decoder::new(1 << 24, s.version());
    let mut v = Vec::new();
    while let Some(p) = d.decode(&mut buf).unwrap() {
        v.push(p);
    }
    assert!(buf.is_empty(), "output ends on a packet boundary");
    v
}

/// Feeds packets; returns the events from input and from `poll_event`.
fn feed(s: &mut Session, cfg: &SessionConfig, now: Now, ps: &[Packet]) -> Vec<Event> {
    let mut input = BytesMut::new();
    for p in ps {
        input.extend_from_slice(&wire(p, s.version()));
    }
    feed_raw(s, cfg, now, &mut input)
}

fn feed_raw(s: &mut Session, cfg: &SessionConfig, now: Now, input: &mut BytesMut) -> Vec<Event> {
    let mut v = Vec::new();
    for _ in 0..10_000 {
        match s.handle_input(cfg, now, input) {
            Some(ev) => v.push(ev),
            None => break,
        }
    }
    v.extend(events(s));
    v
}

fn events(s: &mut Session) -> Vec<Event> {
    std::iter::from_fn(|| s.poll_event()).collect()
}

/// A session past CONNECT/CONNACK, output drained.
fn open_with(cfg: &SessionConfig, c: Connect) -> Session {
    let mut s = Session::new(cfg, t(0));
    let evs = feed(&mut s, cfg, t(0), &[Packet::Connect(Box::new(c))]);
    assert!(matches!(evs.as_slice(), [Event::Connect(_)]), "{evs:?}");
    s.accept(cfg, t(0), None, None);
    let o = out(&mut s, cfg, t(0));
    assert!(
        matches!(o.as_slice(), [Packet::ConnAck(a)] if a.code == 0),
        "{o:?}"
    );
    s
}

fn open(cfg: &SessionConfig, v: Version) -> Session {
    open_with(cfg, connect(v, "ctl-1", true))
}

fn publish(topic: &str, qos: QoS, id: u16, payload: &str) -> Packet {
    Packet::Publish(Publish {
        qos,
        topic: b(topic),
        packet_id: id,
        payload: b(payload),
        ..Publish::default()
    })
}

fn resp(id: u16) -> PubResp {
    PubResp {
        packet_id: id,
        ..PubResp::default()
    }
}

fn msg(topic: &str, qos: QoS, payload: &str) -> Message {
    Message::new(b(topic), b(payload), qos)
}

fn at(qos: QoS) -> Delivery {
    Delivery {
        qos,
        ..Delivery::default()
    }
}

fn closed(evs: &[Event]) -> Option<CloseReason> {
    evs.iter().find_map(|e| match e {
        Event::Closed(r) => Some(*r),
        _ => None,
    })
}

fn pub_of(p: &Packet) -> &Publish {
    match p {
        Packet::Publish(p) => p,
        other => panic!("expected PUBLISH, got {other:?}"),
    }
}

// ---------------------------------------------------------------- CONNECT

#[test]
fn v311_connect_is_accepted_and_keep_alive_is_one_and_a_half_periods() {
    let cfg = SessionConfig::default();
    let mut s = Session::new(&cfg, t(0));
    assert_eq!(s.poll_timeout(), Some(cfg.connect_timeout_ms));
    let evs = feed(
        &mut s,
        &cfg,
        t(5),
        &[Packet::Connect(Box::new(connect(V3, "ctl-1", true)))],
    );
    let [Event::Connect(c)] = evs.as_slice() else {
        panic!("{evs:?}")
    };
    assert_eq!(c.client_id, b("ctl-1"));
    assert!(!s.is_open(), "open only once the router accepts");
    s.accept(&cfg, t(5), None, None);
    assert!(s.is_open());
    assert_eq!(s.client_id(), &b("ctl-1"));
    let o = out(&mut s, &cfg, t(5));
    assert_eq!(
        o,
        vec![Packet::ConnAck(ConnAck {
            session_present: false,
            code: 0,
            props: Properties::default()
        })]
    );
    assert_eq!(s.poll_timeout(), Some(5 + 15_000));
    // Activity moves the deadline; PINGREQ is answered.
    feed(&mut s, &cfg, t(10_000), &[Packet::PingReq]);
    assert_eq!(out(&mut s, &cfg, t(10_000)), vec![Packet::PingResp]);
    assert_eq!(s.poll_timeout(), Some(25_000));
    s.handle_timeout(t(24_999));
    assert!(s.is_open());
    s.handle_timeout(t(25_000));
    assert_eq!(closed(&events(&mut s)), Some(CloseReason::KeepAliveTimeout));
    assert!(
        out(&mut s, &cfg, t(25_000)).is_empty(),
        "3.1.1: no DISCONNECT"
    );
}

#[test]
fn v5_keep_alive_timeout_sends_disconnect_0x8d() {
    let cfg = SessionConfig::default();
    let mut s = open(&cfg, V5);
    s.handle_timeout(t(15_000));
    assert_eq!(
        out(&mut s, &cfg, t(15_000)),
        vec![Packet::Disconnect(Disconnect {
            code: reason::KEEP_ALIVE_TIMEOUT,
            props: Properties::default()
        })]
    );
}

#[test]
fn keep_alive_0_has_no_deadline_unless_the_server_imposes_one() {
    let cfg = SessionConfig::default();
    let mut c = connect(V5, "ctl-1", true);
    c.keep_alive = 0;
    let s = open_with(&cfg, c.clone());
    assert_eq!(s.poll_timeout(), None);
    let cfg = SessionConfig {
        max_keep_alive_s: 60,
        ..SessionConfig::default()
    };
    let mut s = Session::new(&cfg, t(0));
    feed(&mut s, &cfg, t(0), &[Packet::Connect(Box::new(c))]);
    s.accept(&cfg, t(0), None, None);
    let o = out(&mut s, &cfg, t(0));
    let Packet::ConnAck(a) = &o[0] else { panic!() };
    assert_eq!(a.props.server_keep_alive, Some(60));
    assert_eq!(s.keep_alive_s(), 60);
    assert_eq!(s.poll_timeout(), Some(90_000));
}

#[test]
fn v5_connack_tells_the_limits_and_an_assigned_id() {
    let cfg = SessionConfig {
        maximum_qos: QoS::AtLeastOnce,
        retain_available: false,
        ..SessionConfig::default()
    };
    let mut s = Session::new(&cfg, t(0));
    let mut c = connect(V5, "", true);
    c.props.session_expiry_interval = Some(u32::MAX);
    feed(&mut s, &cfg, t(0), &[Packet::Connect(Box::new(c))]);
    s.accept(&cfg, t(0), None, Some(b("auto-1")));
    assert_eq!(s.client_id(), &b("auto-1"));
    let o = out(&mut s, &cfg, t(0));
    let Packet::ConnAck(a) = &o[0] else { panic!() };
    let p = &a.props;
    assert_eq!(p.assigned_client_identifier, Some(b("auto-1")));
    assert_eq!(p.receive_maximum, Some(cfg.receive_maximum));
    assert_eq!(p.maximum_packet_size, Some(cfg.max_packet_size));
    assert_eq!(p.topic_alias_maximum, Some(cfg.topic_alias_maximum));
    assert_eq!(p.maximum_qos, Some(1));
    assert_eq!(p.retain_available, Some(0));
    // The expiry asked for is capped, and the cap is told.
    assert_eq!(p.session_expiry_interval, Some(cfg.max_session_expiry_s));
    assert_eq!(s.session_expiry_s(), cfg.max_session_expiry_s);
}

#[test]
fn empty_client_id_without_clean_start_is_refused_in_each_version() {
    let cfg = SessionConfig::default();
    for (v, code) in [
        (V3, reason::V3_IDENTIFIER_REJECTED),
        (V5, reason::CLIENT_IDENTIFIER_NOT_VALID),
    ] {
        let mut s = Session::new(&cfg, t(0));
        let evs = feed(
            &mut s,
            &cfg,
            t(0),
            &[Packet::Connect(Box::new(connect(v, "", false)))],
        );
        assert_eq!(
            closed(&evs),
            Some(CloseReason::Refused(reason::CLIENT_IDENTIFIER_NOT_VALID))
        );
        assert!(!evs.iter().any(|e| matches!(e, Event::Connect(_))));
        let o = out(&mut s, &cfg, t(0));
        assert!(
            matches!(&o[..], [Packet::ConnAck(a)] if a.code == code),
            "{o:?}"
        );
        assert!(s.is_ended());
    }
}

#[test]
fn a_client_id_that_is_not_an_address_is_refused() {
    let cfg = SessionConfig::default();
    let mut s = Session::new(&cfg, t(0));
    let evs = feed(
        &mut s,
        &cfg,
        t(0),
        &[Packet::Connect(Box::new(connect(V3, "a b", true)))],
    );
    assert_eq!(
        closed(&evs),
        Some(CloseReason::Refused(reason::CLIENT_IDENTIFIER_NOT_VALID))
    );
    // Allowed when the policy is off.
    let cfg = SessionConfig {
        client_id_is_address: false,
        ..SessionConfig::default()
    };
    open_with(&cfg, connect(V3, "a b", true));
}

#[test]
fn unsupported_protocol_level_gets_connack_0x01() {
    let cfg = SessionConfig::default();
    let mut s = Session::new(&cfg, t(0));
    let mut input = BytesMut::from(&b"\x10\x0d\x00\x04MQTT\x06\x02\x00\x0a\x00\x01c"[..]);
    let evs = feed_raw(&mut s, &cfg, t(0), &mut input);
    assert_eq!(
        closed(&evs),
        Some(CloseReason::Refused(reason::UNSUPPORTED_PROTOCOL_VERSION))
    );
    let mut buf = BytesMut::new();
    while let Some(c) = s.poll_transmit(100) {
        buf.extend_from_slice(&c);
    }
    assert_eq!(
        &buf[..],
        &[0x20, 2, 0, reason::V3_UNACCEPTABLE_PROTOCOL_VERSION]
    );
}

#[test]
fn a_broken_v5_connect_gets_connack_with_the_reason_code() {
    let cfg = SessionConfig::default();
    // MQTT 5 CONNECT whose will topic has a wildcard: CONNACK 0x90.
    let mut c = connect(V5, "ctl-1", true);
    c.will = Some(Will {
        topic: b("a/#"),
        ..Will::default()
    });
    let mut s = Session::new(&cfg, t(0));
    let evs = feed_raw(
        &mut s,
        &cfg,
        t(0),
        &mut wire(&Packet::Connect(Box::new(c)), V5),
    );
    assert_eq!(
        closed(&evs),
        Some(CloseReason::Refused(reason::TOPIC_NAME_INVALID))
    );
    let o = out(&mut s, &cfg, t(0));
    assert!(
        matches!(&o[..], [Packet::ConnAck(a)] if a.code == reason::TOPIC_NAME_INVALID),
        "{o:?}"
    );
    // The same in 3.1.1: closed without a CONNACK.
    let mut c = connect(V3, "ctl-1", true);
    c.will = Some(Will {
        topic: b("a/#"),
        ..Will::default()
    });
    let mut s = Session::new(&cfg, t(0));
    let evs = feed_raw(
        &mut s,
        &cfg,
        t(0),
        &mut wire(&Packet::Connect(Box::new(c)), V3),
    );
    assert!(closed(&evs).is_some());
    assert!(s.poll_transmit(100).is_none());
}

#[test]
fn router_refusal_uses_the_clients_version() {
    let cfg = SessionConfig::default();
    for (v, want) in [
        (V3, reason::V3_BAD_USER_NAME_OR_PASSWORD),
        (V5, reason::BAD_USER_NAME_OR_PASSWORD),
    ] {
        let mut s = Session::new(&cfg, t(0));
        feed(
            &mut s,
            &cfg,
            t(0),
            &[Packet::Connect(Box::new(connect(v, "ctl-1", true)))],
        );
        s.refuse(reason::BAD_USER_NAME_OR_PASSWORD);
        assert_eq!(
            closed(&events(&mut s)),
            Some(CloseReason::Refused(reason::BAD_USER_NAME_OR_PASSWORD))
        );
        let o = out(&mut s, &cfg, t(0));
        assert!(
            matches!(&o[..], [Packet::ConnAck(a)] if a.code == want),
            "{o:?}"
        );
    }
}

#[test]
fn enhanced_authentication_is_refused_with_0x8c() {
    let cfg = SessionConfig::default();
    let mut s = Session::new(&cfg, t(0));
    let mut c = connect(V5, "ctl-1", true);
    c.props.authentication_method = Some(b("SCRAM-SHA-1"));
    let evs = feed(&mut s, &cfg, t(0), &[Packet::Connect(Box::new(c))]);
    assert_eq!(
        closed(&evs),
        Some(CloseReason::Refused(reason::BAD_AUTHENTICATION_METHOD))
    );
}

#[test]
fn anything_before_connect_closes_without_a_word() {
    let cfg = SessionConfig::default();
    let mut s = Session::new(&cfg, t(0));
    let evs = feed(&mut s, &cfg, t(0), &[Packet::PingReq]);
    assert_eq!(
        closed(&evs),
        Some(CloseReason::ProtocolError(reason::PROTOCOL_ERROR))
    );
    assert!(s.poll_transmit(100).is_none());
}

#[test]
fn no_connect_within_the_timeout_closes() {
    let cfg = SessionConfig::default();
    let mut s = Session::new(&cfg, t(0));
    s.handle_timeout(t(cfg.connect_timeout_ms - 1));
    assert!(events(&mut s).is_empty());
    s.handle_timeout(t(cfg.connect_timeout_ms));
    assert_eq!(closed(&events(&mut s)), Some(CloseReason::ConnectTimeout));
}

#[test]
fn second_connect_is_a_protocol_error() {
    let cfg = SessionConfig::default();
    let mut s = open(&cfg, V5);
    let evs = feed(
        &mut s,
        &cfg,
        t(1),
        &[Packet::Connect(Box::new(connect(V5, "ctl-1", true)))],
    );
    assert_eq!(
        closed(&evs),
        Some(CloseReason::ProtocolError(reason::PROTOCOL_ERROR))
    );
    assert_eq!(
        out(&mut s, &cfg, t(1)),
        vec![Packet::Disconnect(Disconnect {
            code: reason::PROTOCOL_ERROR,
            props: Properties::default()
        })]
    );
    // 3.1.1: closed without a DISCONNECT.
    let mut s = open(&cfg, V3);
    let evs = feed(
        &mut s,
        &cfg,
        t(1),
        &[Packet::Connect(Box::new(connect(V3, "ctl-1", true)))],
    );
    assert!(closed(&evs).is_some());
    assert!(out(&mut s, &cfg, t(1)).is_empty());
}

#[test]
fn packets_pipelined_behind_connect_wait_for_the_answer() {
    let cfg = SessionConfig::default();
    let mut s = Session::new(&cfg, t(0));
    let mut input = wire(&Packet::Connect(Box::new(connect(V3, "ctl-1", true))), V3);
    input.extend_from_slice(&wire(&publish("a/b", QoS::AtMostOnce, 0, "x"), V3));
    assert!(matches!(
        s.handle_input(&cfg, t(0), &mut input),
        Some(Event::Connect(_))
    ));
    assert!(s.handle_input(&cfg, t(0), &mut input).is_none());
    assert!(!input.is_empty(), "the PUBLISH waits");
    s.accept(&cfg, t(0), None, None);
    assert!(matches!(
        s.handle_input(&cfg, t(0), &mut input),
        Some(Event::Publish(_))
    ));
}

// ---------------------------------------------------------- decode errors

#[test]
fn decode_errors_get_their_reason_code_in_v5_and_a_close_in_v3() {
    let cfg = SessionConfig {
        max_packet_size: 100,
        ..SessionConfig::default()
    };
    // (bytes, reason code)
    let cases: &[(&[u8], u8)] = &[
        // Remaining length 1000: too large, from the header alone.
        (&[0x30, 0xe8, 0x07], reason::PACKET_TOO_LARGE),
        // Five-byte remaining length.
        (
            &[0x30, 0x80, 0x80, 0x80, 0x80, 0x01],
            reason::MALFORMED_PACKET,
        ),
        // Wildcard in a PUBLISH topic.
        (&[0x30, 4, 0, 2, b'a', b'#'], reason::TOPIC_NAME_INVALID),
        // PINGREQ with reserved flag bits.
        (&[0xc1, 0], reason::MALFORMED_PACKET),
        // QoS 3.
        (&[0x36, 5, 0, 1, b't', 0, 1], reason::MALFORMED_PACKET),
    ];
    for (bytes, code) in cases {
        let mut s = open(&cfg, V5);
        let evs = feed_raw(&mut s, &cfg, t(1), &mut BytesMut::from(*bytes));
        assert_eq!(
            closed(&evs),
            Some(CloseReason::ProtocolError(*code)),
            "{bytes:?}"
        );
        assert_eq!(
            out(&mut s, &cfg, t(1)),
            vec![Packet::Disconnect(Disconnect {
                code: *code,
                props: Properties::default()
            })]
        );
        let mut s = open(&cfg, V3);
        let evs = feed_raw(&mut s, &cfg, t(1), &mut BytesMut::from(*bytes));
        assert!(closed(&evs).is_some());
        assert!(out(&mut s, &cfg, t(1)).is_empty(), "3.1.1: just closed");
    }
}

#[test]
fn packets_only_a_server_sends_are_protocol_errors() {
    let cfg = SessionConfig::default();
    for p in [
        Packet::PingResp,
        Packet::ConnAck(ConnAck::default()),
        Packet::Auth(Auth::default()),
    ] {
        let mut s = open(&cfg, V5);
        let evs = feed(&mut s, &cfg, t(1), &[p]);
        assert_eq!(
            closed(&evs),
            Some(CloseReason::ProtocolError(reason::PROTOCOL_ERROR))
        );
    }
}

use crate::mqtt::packet::Auth;

// ------------------------------------------------------- inbound publish

#[test]
fn inbound_qos0_and_qos1() {
    let cfg = SessionConfig::default();
    let mut s = open(&cfg, V3);
    let evs = feed(
        &mut s,
        &cfg,
        t(1),
        &[publish("a/b", QoS::AtMostOnce, 0, "x")],
    );
    let [Event::Publish(m)] = evs.as_slice() else {
        panic!("{evs:?}")
    };
    assert_eq!((m.topic.clone(), m.payload.clone()), (b("a/b"), b("x")));
    assert!(out(&mut s, &cfg, t(1)).is_empty());
    let evs = feed(
        &mut s,
        &cfg,
        t(1),
        &[publish("a/b", QoS::AtLeastOnce, 7, "y")],
    );
    assert!(matches!(evs.as_slice(), [Event::Publish(m)] if m.qos == QoS::AtLeastOnce));
    assert_eq!(out(&mut s, &cfg, t(1)), vec![Packet::PubAck(resp(7))]);
}

#[test]
fn inbound_qos2_is_routed_once_per_packet_id() {
    let cfg = SessionConfig::default();
    let mut s = open(&cfg, V5);
    let p = publish("a/b", QoS::ExactlyOnce, 9, "x");
    let evs = feed(&mut s, &cfg, t(1), std::slice::from_ref(&p));
    assert_eq!(evs.len(), 1);
    assert_eq!(out(&mut s, &cfg, t(1)), vec![Packet::PubRec(resp(9))]);
    // The client resends (no PUBREC seen): acknowledged, not routed again.
    let mut dup = p.clone();
    if let Packet::Publish(d) = &mut dup {
        d.dup = true;
    }
    assert!(feed(&mut s, &cfg, t(2), &[dup]).is_empty());
    assert_eq!(out(&mut s, &cfg, t(2)), vec![Packet::PubRec(resp(9))]);
    // PUBREL completes; the id is free for a new message.
    feed(&mut s, &cfg, t(3), &[Packet::PubRel(resp(9))]);
    assert_eq!(out(&mut s, &cfg, t(3)), vec![Packet::PubComp(resp(9))]);
    assert_eq!(feed(&mut s, &cfg, t(4), &[p]).len(), 1);
}

#[test]
fn pubrel_for_an_unknown_id_gets_0x92_in_v5() {
    let cfg = SessionConfig::default();
    let mut s = open(&cfg, V5);
    feed(&mut s, &cfg, t(1), &[Packet::PubRel(resp(4))]);
    assert_eq!(
        out(&mut s, &cfg, t(1)),
        vec![Packet::PubComp(PubResp {
            packet_id: 4,
            code: reason::PACKET_IDENTIFIER_NOT_FOUND,
            props: Properties::default()
        })]
    );
    let mut s = open(&cfg, V3);
    feed(&mut s, &cfg, t(1), &[Packet::PubRel(resp(4))]);
    assert_eq!(out(&mut s, &cfg, t(1)), vec![Packet::PubComp(resp(4))]);
}

#[test]
fn inbound_receive_maximum_is_enforced() {
    let cfg = SessionConfig {
        receive_maximum: 2,
        ..SessionConfig::default()
    };
    let mut s = open(&cfg, V5);
    let evs = feed(
        &mut s,
        &cfg,
        t(1),
        &[
            publish("a", QoS::ExactlyOnce, 1, ""),
            publish("a", QoS::ExactlyOnce, 2, ""),
            publish("a", QoS::ExactlyOnce, 3, ""),
        ],
    );
    assert_eq!(
        evs.iter()
            .filter(|e| matches!(e, Event::Publish(_)))
            .count(),
        2
    );
    assert_eq!(
        closed(&evs),
        Some(CloseReason::ProtocolError(reason::RECEIVE_MAXIMUM_EXCEEDED))
    );
}

#[test]
fn inbound_qos_and_retain_beyond_what_the_server_offers() {
    let cfg = SessionConfig {
        maximum_qos: QoS::AtLeastOnce,
        retain_available: false,
        ..SessionConfig::default()
    };
    let mut s = open(&cfg, V5);
    let evs = feed(&mut s, &cfg, t(1), &[publish("a", QoS::ExactlyOnce, 1, "")]);
    assert_eq!(
        closed(&evs),
        Some(CloseReason::ProtocolError(reason::QOS_NOT_SUPPORTED))
    );
    let mut s = open(&cfg, V5);
    let mut p = publish("a", QoS::AtMostOnce, 0, "");
    if let Packet::Publish(p) = &mut p {
        p.retain = true;
    }
    let evs = feed(&mut s, &cfg, t(1), &[p]);
    assert_eq!(
        closed(&evs),
        Some(CloseReason::ProtocolError(reason::RETAIN_NOT_SUPPORTED))
    );
}

#[test]
fn inbound_message_expiry_becomes_a_deadline_and_properties_travel() {
    let cfg = SessionConfig::default();
    let mut s = open(&cfg, V5);
    let p = Packet::Publish(Publish {
        topic: b("a"),
        props: Properties {
            message_expiry_interval: Some(5),
            user_properties: vec![(b("k"), b("v"))],
            ..Properties::default()
        },
        ..Publish::default()
    });
    let evs = feed(&mut s, &cfg, t(1_000), &[p]);
    let [Event::Publish(m)] = evs.as_slice() else {
        panic!("{evs:?}")
    };
    assert_eq!(m.expires_at, Some(6_000));
    assert_eq!(m.properties().user_properties, vec![(b("k"), b("v"))]);
}

#[test]
fn inbound_topic_aliases() {
    let cfg = SessionConfig {
        topic_alias_maximum: 4,
        ..SessionConfig::default()
    };
    let aliased = |topic: &str, alias: u16| {
        Packet::Publish(Publish {
            topic: b(topic),
            props: Properties {
                topic_alias: Some(alias),
                ..Properties::default()
            },
            payload: b("p"),
            ..Publish::default()
        })
    };
    let mut s = open(&cfg, V5);
    let evs = feed(
        &mut s,
        &cfg,
        t(1),
        &[
            aliased("a/b", 1),
            aliased("", 1),
            aliased("c", 1),
            aliased("", 1),
        ],
    );
    let topics: Vec<Bytes> = evs
        .iter()
        .map(|e| match e {
            Event::Publish(m) => m.topic.clone(),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(topics, vec![b("a/b"), b("a/b"), b("c"), b("c")]);
    // Unknown alias with an empty topic; empty topic without alias.
    for bad in [aliased("", 2), publish("", QoS::AtMostOnce, 0, "")] {
        let mut s = open(&cfg, V5);
        assert_eq!(
            closed(&feed(&mut s, &cfg, t(1), &[bad])),
            Some(CloseReason::ProtocolError(reason::PROTOCOL_ERROR))
        );
    }
    // Alias 0 or above the maximum.
    for bad in [aliased("x", 0), aliased("x", 5)] {
        let mut s = open(&cfg, V5);
        assert_eq!(
            closed(&feed(&mut s, &cfg, t(1), &[bad])),
            Some(CloseReason::ProtocolError(reason::TOPIC_ALIAS_INVALID))
        );
    }
}

// --------------------------------------------------------- subscriptions

fn subscribe(id: u16, filters: &[(&str, SubOptions)]) -> Packet {
    Packet::Subscribe(Subscribe {
        packet_id: id,
        props: Properties::default(),
        filters: filters.iter().map(|(f, o)| (b(f), *o)).collect(),
    })
}

#[test]
fn subscribe_grants_capped_qos_and_refuses_bad_filters_per_filter() {
    let cfg = SessionConfig {
        maximum_qos: QoS::AtLeastOnce,
        ..SessionConfig::default()
    };
    for (v, bad) in [
        (V5, reason::TOPIC_FILTER_INVALID),
        (V3, reason::V3_SUBACK_FAILURE),
    ] {
        let mut s = open(&cfg, v);
        let evs = feed(
            &mut s,
            &cfg,
            t(1),
            &[subscribe(
                3,
                &[
                    ("a/+", SubOptions::qos(QoS::ExactlyOnce)),
                    ("a/#/b", SubOptions::qos(QoS::AtMostOnce)),
                    ("$share/g/x", SubOptions::qos(QoS::AtMostOnce)),
                ],
            )],
        );
        let [Event::Subscribe(subs)] = evs.as_slice() else {
            panic!("{evs:?}")
        };
        assert_eq!(subs.len(), 2);
        assert_eq!(subs[0].filter, b("a/+"));
        assert_eq!(subs[0].options.qos, QoS::AtLeastOnce);
        assert!(subs[0].is_new);
        assert_eq!(
            out(&mut s, &cfg, t(1)),
            vec![Packet::SubAck(SubAck {
                packet_id: 3,
                props: Properties::default(),
                codes: vec![1, bad, 0]
            })]
        );
        // Subscribing again replaces: not new.
        let evs = feed(
            &mut s,
            &cfg,
            t(2),
            &[subscribe(4, &[("a/+", SubOptions::qos(QoS::AtMostOnce))])],
        );
        assert!(matches!(&evs[..], [Event::Subscribe(s)] if !s[0].is_new));
        assert_eq!(s.subscriptions().count(), 2);
    }
}

#[test]
fn subscription_identifier_and_options_are_kept() {
    let cfg = SessionConfig::default();
    let mut s = open(&cfg, V5);
    let opts = SubOptions {
        qos: QoS::AtLeastOnce,
        no_local: true,
        retain_as_published: true,
        retain_handling: crate::mqtt::packet::RetainHandling::SendIfNew,
    };
    let p = Packet::Subscribe(Subscribe {
        packet_id: 1,
        props: Properties {
            subscription_identifiers: vec![42],
            ..Properties::default()
        },
        filters: vec![(b("a/#"), opts)],
    });
    let evs = feed(&mut s, &cfg, t(1), &[p]);
    assert_eq!(
        evs,
        vec![Event::Subscribe(vec![Subscription {
            filter: b("a/#"),
            options: opts,
            id: Some(42),
            is_new: true
        }])]
    );
}

#[test]
fn no_local_on_a_shared_subscription_is_a_protocol_error() {
    let cfg = SessionConfig::default();
    let mut s = open(&cfg, V5);
    let opts = SubOptions {
        no_local: true,
        ..SubOptions::default()
    };
    let evs = feed(&mut s, &cfg, t(1), &[subscribe(1, &[("$share/g/a", opts)])]);
    assert_eq!(
        closed(&evs),
        Some(CloseReason::ProtocolError(reason::PROTOCOL_ERROR))
    );
}

#[test]
fn features_turned_off_and_the_subscription_quota() {
    let cfg = SessionConfig {
        wildcard_subscriptions: false,
        shared_subscriptions: false,
        max_subscriptions: 1,
        ..SessionConfig::default()
    };
    let mut s = open(&cfg, V5);
    let q = SubOptions::default();
    feed(
        &mut s,
        &cfg,
        t(1),
        &[subscribe(
            1,
            &[("a/+", q), ("$share/g/a", q), ("a", q), ("b", q), ("a", q)],
        )],
    );
    assert_eq!(
        out(&mut s, &cfg, t(1)),
        vec![Packet::SubAck(SubAck {
            packet_id: 1,
            props: Properties::default(),
            codes: vec![
                reason::WILDCARD_SUBSCRIPTIONS_NOT_SUPPORTED,
                reason::SHARED_SUBSCRIPTIONS_NOT_SUPPORTED,
                0,
                reason::QUOTA_EXCEEDED,
                0
            ]
        })]
    );
}

#[test]
fn unsubscribe_reports_what_existed() {
    let cfg = SessionConfig::default();
    let mut s = open(&cfg, V5);
    feed(
        &mut s,
        &cfg,
        t(1),
        &[subscribe(1, &[("a", SubOptions::default())])],
    );
    out(&mut s, &cfg, t(1));
    let evs = feed(
        &mut s,
        &cfg,
        t(2),
        &[Packet::Unsubscribe(Unsubscribe {
            packet_id: 2,
            props: Properties::default(),
            filters: vec![b("a"), b("b")],
        })],
    );
    assert_eq!(evs, vec![Event::Unsubscribe(vec![b("a")])]);
    assert_eq!(
        out(&mut s, &cfg, t(2)),
        vec![Packet::UnsubAck(UnsubAck {
            packet_id: 2,
            props: Properties::default(),
            codes: vec![0, reason::NO_SUBSCRIPTION_EXISTED]
        })]
    );
    assert_eq!(s.subscriptions().count(), 0);
}

// ------------------------------------------------------ outbound delivery

#[test]
fn outbound_qos1_window_follows_the_clients_receive_maximum() {
    let cfg = SessionConfig::default();
    let mut c = connect(V5, "ctl-1", true);
    c.props.receive_maximum = Some(2);
    let mut s = open_with(&cfg, c);
    for i in 0..4 {
        s.deliver(
            &cfg,
            t(1),
            &msg("a", QoS::AtLeastOnce, &i.to_string()),
            &at(QoS::AtLeastOnce),
        )
        .unwrap();
    }
    let o = out(&mut s, &cfg, t(1));
    assert_eq!(o.len(), 2, "two in flight");
    let ids: Vec<u16> = o.iter().map(|p| pub_of(p).packet_id).collect();
    assert_eq!(ids, vec![1, 2]);
    assert_eq!(s.queued_len(), 2);
    feed(&mut s, &cfg, t(2), &[Packet::PubAck(resp(1))]);
    let o = out(&mut s, &cfg, t(2));
    assert_eq!(o.len(), 1);
    assert_eq!(pub_of(&o[0]).payload, b("2"));
    // An unknown PUBACK changes nothing.
    feed(&mut s, &cfg, t(2), &[Packet::PubAck(resp(99))]);
    assert!(out(&mut s, &cfg, t(2)).is_empty());
    assert_eq!(s.inflight_len(), 2);
}

#[test]
fn outbound_qos2_flow() {
    let cfg = SessionConfig::default();
    let mut s = open(&cfg, V5);
    s.deliver(
        &cfg,
        t(1),
        &msg("a", QoS::ExactlyOnce, "x"),
        &at(QoS::ExactlyOnce),
    )
    .unwrap();
    let o = out(&mut s, &cfg, t(1));
    let id = pub_of(&o[0]).packet_id;
    assert_eq!(pub_of(&o[0]).qos, QoS::ExactlyOnce);
    feed(&mut s, &cfg, t(2), &[Packet::PubRec(resp(id))]);
    assert_eq!(out(&mut s, &cfg, t(2)), vec![Packet::PubRel(resp(id))]);
    assert_eq!(s.inflight_len(), 1);
    feed(&mut s, &cfg, t(3), &[Packet::PubComp(resp(id))]);
    assert_eq!(s.inflight_len(), 0);
    // A PUBREC with an error code ends the flow without PUBREL.
    s.deliver(
        &cfg,
        t(4),
        &msg("a", QoS::ExactlyOnce, "y"),
        &at(QoS::ExactlyOnce),
    )
    .unwrap();
    let id = pub_of(&out(&mut s, &cfg, t(4))[0]).packet_id;
    feed(
        &mut s,
        &cfg,
        t(5),
        &[Packet::PubRec(PubResp {
            packet_id: id,
            code: reason::QUOTA_EXCEEDED,
            props: Properties::default(),
        })],
    );
    assert!(out(&mut s, &cfg, t(5)).is_empty());
    assert_eq!(s.inflight_len(), 0);
}

#[test]
fn delivery_qos_is_the_lower_of_message_and_subscription() {
    let cfg = SessionConfig::default();
    let mut s = open(&cfg, V3);
    s.deliver(
        &cfg,
        t(1),
        &msg("a", QoS::ExactlyOnce, "x"),
        &at(QoS::AtLeastOnce),
    )
    .unwrap();
    s.deliver(
        &cfg,
        t(1),
        &msg("a", QoS::AtMostOnce, "y"),
        &at(QoS::ExactlyOnce),
    )
    .unwrap();
    let o = out(&mut s, &cfg, t(1));
    assert_eq!(pub_of(&o[0]).qos, QoS::AtLeastOnce);
    assert_eq!(pub_of(&o[1]).qos, QoS::AtMostOnce);
}

#[test]
fn retain_flag_follows_the_delivery() {
    let sub = Subscription {
        filter: b("a"),
        options: SubOptions::qos(QoS::AtLeastOnce),
        id: Some(3),
        is_new: true,
    };
    let mut m = msg("a", QoS::AtLeastOnce, "x");
    m.retain = true;
    assert!(!Delivery::routed(&sub, &m).retain);
    let rap = Subscription {
        options: SubOptions {
            retain_as_published: true,
            ..sub.options
        },
        ..sub.clone()
    };
    assert!(Delivery::routed(&rap, &m).retain);
    assert!(Delivery::retained(&sub).retain);
    assert_eq!(Delivery::retained(&sub).subscription_id, Some(3));
    let cfg = SessionConfig::default();
    let mut s = open(&cfg, V5);
    s.deliver(&cfg, t(1), &m, &Delivery::retained(&sub))
        .unwrap();
    let o = out(&mut s, &cfg, t(1));
    assert!(pub_of(&o[0]).retain);
    assert_eq!(pub_of(&o[0]).props.subscription_identifiers, vec![3]);
}

#[test]
fn packet_ids_wrap_and_skip_ids_in_flight() {
    let cfg = SessionConfig::default();
    let mut s = open(&cfg, V3);
    s.st.next_packet_id = 65_535;
    for _ in 0..2 {
        s.deliver(
            &cfg,
            t(1),
            &msg("a", QoS::AtLeastOnce, ""),
            &at(QoS::AtLeastOnce),
        )
        .unwrap();
    }
    let ids: Vec<u16> = out(&mut s, &cfg, t(1))
        .iter()
        .map(|p| pub_of(p).packet_id)
        .collect();
    assert_eq!(ids, vec![65_535, 1]);
    // Id 2 is next; make it busy: it is skipped.
    s.st.next_packet_id = 1;
    s.deliver(
        &cfg,
        t(1),
        &msg("a", QoS::AtLeastOnce, ""),
        &at(QoS::AtLeastOnce),
    )
    .unwrap();
    assert_eq!(pub_of(&out(&mut s, &cfg, t(1))[0]).packet_id, 2);
}

#[test]
fn the_clients_maximum_packet_size_drops_what_does_not_fit() {
    let cfg = SessionConfig::default();
    let mut c = connect(V5, "ctl-1", true);
    c.props.maximum_packet_size = Some(64);
    let mut s = open_with(&cfg, c);
    let big = "x".repeat(100);
    assert_eq!(
        s.deliver(
            &cfg,
            t(1),
            &msg("a", QoS::AtLeastOnce, &big),
            &at(QoS::AtLeastOnce)
        ),
        Err(DeliverError::TooLarge)
    );
    assert_eq!(
        s.deliver(
            &cfg,
            t(1),
            &msg("a", QoS::AtMostOnce, &big),
            &at(QoS::AtMostOnce)
        ),
        Err(DeliverError::TooLarge)
    );
    assert_eq!(s.drops().too_large, 2);
    assert_eq!(s.inflight_len(), 0, "a dropped message takes no packet id");
    s.deliver(
        &cfg,
        t(1),
        &msg("a", QoS::AtLeastOnce, "ok"),
        &at(QoS::AtLeastOnce),
    )
    .unwrap();
    let o = out(&mut s, &cfg, t(1));
    assert_eq!(pub_of(&o[0]).packet_id, 1);
}

#[test]
fn outbound_topic_aliases_within_the_clients_maximum() {
    let cfg = SessionConfig::default();
    let mut c = connect(V5, "ctl-1", true);
    c.props.topic_alias_maximum = Some(1);
    let mut s = open_with(&cfg, c);
    for topic in ["a/b", "a/b", "c", "a/b"] {
        s.deliver(
            &cfg,
            t(1),
            &msg(topic, QoS::AtMostOnce, "p"),
            &at(QoS::AtMostOnce),
        )
        .unwrap();
    }
    let got: Vec<(Bytes, Option<u16>)> = out(&mut s, &cfg, t(1))
        .iter()
        .map(|p| (pub_of(p).topic.clone(), pub_of(p).props.topic_alias))
        .collect();
    assert_eq!(
        got,
        vec![
            (b("a/b"), Some(1)),
            (Bytes::new(), Some(1)),
            (b("c"), None),
            (Bytes::new(), Some(1)),
        ]
    );
    // No aliases for a client that takes none, nor in 3.1.1.
    let mut s = open(&cfg, V5);
    for _ in 0..2 {
        s.deliver(
            &cfg,
            t(1),
            &msg("a", QoS::AtMostOnce, ""),
            &at(QoS::AtMostOnce),
        )
        .unwrap();
    }
    assert!(
        out(&mut s, &cfg, t(1))
            .iter()
            .all(|p| pub_of(p).topic == b("a") && pub_of(p).props.topic_alias.is_none())
    );
}

#[test]
fn message_expiry_is_counted_down_and_expired_messages_are_dropped() {
    let cfg = SessionConfig::default();
    let mut c = connect(V5, "ctl-1", true);
    c.props.receive_maximum = Some(1);
    let mut s = open_with(&cfg, c);
    let mut m = msg("a", QoS::AtLeastOnce, "x");
    m.expires_at = Some(10_000);
    s.deliver(&cfg, t(2_000), &m, &at(QoS::AtLeastOnce))
        .unwrap();
    let o = out(&mut s, &cfg, t(2_000));
    assert_eq!(pub_of(&o[0]).props.message_expiry_interval, Some(8));
    // Queued behind the window, then expired by the time it could go.
    s.deliver(&cfg, t(3_000), &m, &at(QoS::AtLeastOnce))
        .unwrap();
    assert_eq!(s.queued_len(), 1);
    feed(&mut s, &cfg, t(11_000), &[Packet::PubAck(resp(1))]);
    assert!(out(&mut s, &cfg, t(11_000)).is_empty());
    assert_eq!(s.drops().expired, 1);
    assert_eq!(
        s.deliver(&cfg, t(11_000), &m, &at(QoS::AtLeastOnce)),
        Err(DeliverError::Expired)
    );
}

#[test]
fn qos0_is_dropped_when_the_output_is_at_its_bound() {
    let cfg = SessionConfig {
        max_out_bytes: 64,
        ..SessionConfig::default()
    };
    let mut s = open(&cfg, V3);
    let payload = "x".repeat(60);
    s.deliver(
        &cfg,
        t(1),
        &msg("a", QoS::AtMostOnce, &payload),
        &at(QoS::AtMostOnce),
    )
    .unwrap();
    assert!(s.should_pause(&cfg));
    assert_eq!(
        s.deliver(
            &cfg,
            t(1),
            &msg("a", QoS::AtMostOnce, "y"),
            &at(QoS::AtMostOnce)
        ),
        Err(DeliverError::Qos0Dropped)
    );
    // QoS 1 waits in the queue and goes once the socket took the bytes.
    s.deliver(
        &cfg,
        t(1),
        &msg("a", QoS::AtLeastOnce, "z"),
        &at(QoS::AtLeastOnce),
    )
    .unwrap();
    assert_eq!(s.queued_len(), 1);
    let chunk = s.poll_transmit(1 << 20).unwrap();
    assert_eq!(s.queued_len(), 1, "not confirmed yet");
    s.on_transmitted(&cfg, t(2), chunk.len());
    assert_eq!(s.queued_len(), 0);
    assert_eq!(pub_of(&out(&mut s, &cfg, t(2))[0]).payload, b("z"));
}

// ------------------------------------------- will, expiry, resumption

fn with_will(mut c: Connect, delay_s: Option<u32>) -> Connect {
    c.will = Some(Will {
        topic: b("dead/ctl-1"),
        payload: b("gone"),
        qos: QoS::AtLeastOnce,
        retain: true,
        props: Properties {
            will_delay_interval: delay_s,
            ..Properties::default()
        },
    });
    c
}

fn wills(evs: &[Event]) -> usize {
    evs.iter().filter(|e| matches!(e, Event::Will(_))).count()
}

#[test]
fn will_goes_out_on_an_abnormal_close_only() {
    let cfg = SessionConfig::default();
    // Socket lost: will at once; non-persistent session ends.
    let mut s = open_with(&cfg, with_will(connect(V3, "ctl-1", true), None));
    s.handle_closed(t(5));
    let evs = events(&mut s);
    assert_eq!(closed(&evs), Some(CloseReason::PeerClosed));
    let will = evs.iter().find_map(|e| match e {
        Event::Will(m) => Some(m.clone()),
        _ => None,
    });
    let will = will.expect("will due");
    assert_eq!((will.topic, will.payload), (b("dead/ctl-1"), b("gone")));
    assert!(will.retain);
    assert_eq!(evs.last(), Some(&Event::SessionEnded));
    // DISCONNECT: no will.
    let mut s = open_with(&cfg, with_will(connect(V3, "ctl-1", true), None));
    let evs = feed(
        &mut s,
        &cfg,
        t(5),
        &[Packet::Disconnect(Disconnect::default())],
    );
    assert_eq!(closed(&evs), Some(CloseReason::Disconnect(0)));
    assert_eq!(wills(&evs), 0);
    // MQTT 5 DISCONNECT 0x04: the will goes out.
    let mut s = open_with(&cfg, with_will(connect(V5, "ctl-1", true), None));
    let evs = feed(
        &mut s,
        &cfg,
        t(5),
        &[Packet::Disconnect(Disconnect {
            code: reason::DISCONNECT_WITH_WILL,
            props: Properties::default(),
        })],
    );
    assert_eq!(wills(&evs), 1);
    // Keep alive timeout: the will goes out.
    let mut s = open_with(&cfg, with_will(connect(V3, "ctl-1", true), None));
    s.handle_timeout(t(15_000));
    assert_eq!(wills(&events(&mut s)), 1);
}

#[test]
fn will_delay_is_reported_when_due_and_cancelled_by_resumption() {
    let cfg = SessionConfig::default();
    let mut c = with_will(connect(V5, "ctl-1", false), Some(30));
    c.props.session_expiry_interval = Some(600);
    let mut s = open_with(&cfg, c.clone());
    s.handle_closed(t(1_000));
    let evs = events(&mut s);
    assert_eq!(closed(&evs), Some(CloseReason::PeerClosed));
    assert_eq!(wills(&evs), 0, "not yet");
    assert!(s.is_offline());
    assert_eq!(s.poll_timeout(), Some(31_000));
    s.handle_timeout(t(30_999));
    assert!(events(&mut s).is_empty());
    s.handle_timeout(t(31_000));
    assert_eq!(wills(&events(&mut s)), 1);
    assert_eq!(s.poll_timeout(), Some(601_000), "then the session expiry");

    // The client comes back within the delay: no will.
    let mut s = open_with(&cfg, c.clone());
    s.handle_closed(t(1_000));
    events(&mut s);
    let state = s.take_state().expect("offline session");
    assert!(s.is_ended());
    let mut n = Session::new(&cfg, t(2_000));
    feed(&mut n, &cfg, t(2_000), &[Packet::Connect(Box::new(c))]);
    n.accept(&cfg, t(2_000), Some(state), None);
    s.handle_timeout(t(40_000));
    assert_eq!(wills(&events(&mut s)), 0);
}

#[test]
fn session_expiry_shorter_than_the_will_delay_sends_the_will_at_expiry() {
    let cfg = SessionConfig::default();
    let mut c = with_will(connect(V5, "ctl-1", false), Some(60));
    c.props.session_expiry_interval = Some(10);
    let mut s = open_with(&cfg, c);
    s.handle_closed(t(0));
    events(&mut s);
    assert_eq!(s.poll_timeout(), Some(10_000));
    s.handle_timeout(t(10_000));
    let evs = events(&mut s);
    assert_eq!(wills(&evs), 1);
    assert_eq!(evs.last(), Some(&Event::SessionEnded));
    assert!(s.is_ended());
    assert_eq!(s.poll_timeout(), None);
}

#[test]
fn discard_sends_a_waiting_will_then_ends() {
    let cfg = SessionConfig::default();
    let mut c = with_will(connect(V5, "ctl-1", false), Some(60));
    c.props.session_expiry_interval = Some(600);
    let mut s = open_with(&cfg, c);
    s.handle_closed(t(0));
    events(&mut s);
    s.discard(t(5));
    assert_eq!(
        events(&mut s)
            .iter()
            .map(|e| matches!(e, Event::Will(_)))
            .collect::<Vec<_>>(),
        vec![true, false]
    );
    assert!(s.is_ended());
}

#[test]
fn disconnect_may_change_the_session_expiry_but_not_from_zero() {
    let cfg = SessionConfig::default();
    let mut c = connect(V5, "ctl-1", false);
    c.props.session_expiry_interval = Some(60);
    let mut s = open_with(&cfg, c);
    feed(
        &mut s,
        &cfg,
        t(0),
        &[Packet::Disconnect(Disconnect {
            code: 0,
            props: Properties {
                session_expiry_interval: Some(5),
                ..Properties::default()
            },
        })],
    );
    assert_eq!(s.poll_timeout(), Some(5_000));
    let mut s = open(&cfg, V5);
    let evs = feed(
        &mut s,
        &cfg,
        t(0),
        &[Packet::Disconnect(Disconnect {
            code: 0,
            props: Properties {
                session_expiry_interval: Some(5),
                ..Properties::default()
            },
        })],
    );
    assert_eq!(
        closed(&evs),
        Some(CloseReason::ProtocolError(reason::PROTOCOL_ERROR))
    );
}

#[test]
fn offline_session_queues_bounded_and_resumes_with_redelivery() {
    let cfg = SessionConfig {
        max_queued_messages: 3,
        max_queued_bytes: 1000,
        ..SessionConfig::default()
    };
    let c = connect(V3, "ctl-1", false);
    let mut s = open_with(&cfg, c.clone());
    feed(
        &mut s,
        &cfg,
        t(1),
        &[subscribe(1, &[("a/#", SubOptions::qos(QoS::ExactlyOnce))])],
    );
    // One QoS 1 and one QoS 2 in flight; the QoS 2 reaches PUBCOMP-wait.
    s.deliver(
        &cfg,
        t(1),
        &msg("a/1", QoS::AtLeastOnce, "one"),
        &at(QoS::ExactlyOnce),
    )
    .unwrap();
    s.deliver(
        &cfg,
        t(1),
        &msg("a/2", QoS::ExactlyOnce, "two"),
        &at(QoS::ExactlyOnce),
    )
    .unwrap();
    let o = out(&mut s, &cfg, t(1));
    let id2 = pub_of(&o[2]).packet_id;
    feed(&mut s, &cfg, t(2), &[Packet::PubRec(resp(id2))]);
    out(&mut s, &cfg, t(2));
    // The link drops; a 3.1.1 persistent session stays.
    s.handle_closed(t(3));
    let evs = events(&mut s);
    assert_eq!(evs, vec![Event::Closed(CloseReason::PeerClosed)]);
    assert!(s.is_offline());
    assert_eq!(
        s.poll_timeout(),
        Some(3 + u64::from(cfg.max_session_expiry_s) * 1000)
    );
    // Offline: QoS 0 dropped, QoS 1 queued up to the count bound.
    assert_eq!(
        s.deliver(
            &cfg,
            t(4),
            &msg("a/3", QoS::AtMostOnce, "x"),
            &at(QoS::AtLeastOnce)
        ),
        Err(DeliverError::Qos0Dropped)
    );
    for i in 0..3 {
        s.deliver(
            &cfg,
            t(4),
            &msg("a/3", QoS::AtLeastOnce, &format!("q{i}")),
            &at(QoS::AtLeastOnce),
        )
        .unwrap();
    }
    assert_eq!(
        s.deliver(
            &cfg,
            t(4),
            &msg("a/3", QoS::AtLeastOnce, "q3"),
            &at(QoS::AtLeastOnce)
        ),
        Err(DeliverError::QueueFull)
    );
    assert!(s.poll_transmit(100).is_none(), "nothing written offline");
    // The client comes back without clean session.
    let state = s.take_state().unwrap();
    assert_eq!(state.pending(), 5);
    assert_eq!(state.subscriptions().count(), 1);
    let mut n = Session::new(&cfg, t(10));
    feed(&mut n, &cfg, t(10), &[Packet::Connect(Box::new(c))]);
    n.accept(&cfg, t(10), Some(state), None);
    let o = out(&mut n, &cfg, t(10));
    assert!(matches!(&o[0], Packet::ConnAck(a) if a.session_present));
    // Unfinished QoS 1 again with DUP, the QoS 2 past PUBREC as PUBREL,
    // then the queue in order.
    let p1 = pub_of(&o[1]);
    assert!(p1.dup);
    assert_eq!(p1.payload, b("one"));
    assert_eq!(o[2], Packet::PubRel(resp(id2)));
    let queued: Vec<Bytes> = o[3..].iter().map(|p| pub_of(p).payload.clone()).collect();
    assert_eq!(queued, vec![b("q0"), b("q1"), b("q2")]);
    assert!(o[3..].iter().all(|p| !pub_of(p).dup));
    assert_eq!(n.subscriptions().count(), 1);
}

#[test]
fn queue_is_bounded_by_bytes_too() {
    let cfg = SessionConfig {
        max_queued_bytes: 10,
        ..SessionConfig::default()
    };
    let mut s = open_with(&cfg, connect(V3, "ctl-1", false));
    s.handle_closed(t(1));
    s.deliver(
        &cfg,
        t(2),
        &msg("a", QoS::AtLeastOnce, "12345678"),
        &at(QoS::AtLeastOnce),
    )
    .unwrap();
    assert_eq!(
        s.deliver(
            &cfg,
            t(2),
            &msg("a", QoS::AtLeastOnce, "12"),
            &at(QoS::AtLeastOnce)
        ),
        Err(DeliverError::QueueFull)
    );
    assert_eq!(s.drops().queue_full, 1);
}

#[test]
fn queued_qos2_offline_messages_resent_as_dup_after_resume_if_unacknowledged() {
    let cfg = SessionConfig::default();
    let c = connect(V5, "ctl-1", false);
    let mut c5 = c.clone();
    c5.props.session_expiry_interval = Some(100);
    let mut s = open_with(&cfg, c5.clone());
    s.deliver(
        &cfg,
        t(1),
        &msg("a", QoS::ExactlyOnce, "x"),
        &at(QoS::ExactlyOnce),
    )
    .unwrap();
    let id = pub_of(&out(&mut s, &cfg, t(1))[0]).packet_id;
    s.handle_closed(t(2));
    let state = s.take_state().unwrap();
    let mut n = Session::new(&cfg, t(3));
    feed(&mut n, &cfg, t(3), &[Packet::Connect(Box::new(c5))]);
    n.accept(&cfg, t(3), Some(state), None);
    let o = out(&mut n, &cfg, t(3));
    let p = pub_of(&o[1]);
    assert!(p.dup);
    assert_eq!(p.packet_id, id, "same packet id");
    feed(&mut n, &cfg, t(4), &[Packet::PubRec(resp(id))]);
    assert_eq!(out(&mut n, &cfg, t(4)), vec![Packet::PubRel(resp(id))]);
}

#[test]
fn clean_start_ignores_a_previous_session() {
    let cfg = SessionConfig::default();
    let mut s = open_with(&cfg, connect(V3, "ctl-1", false));
    feed(
        &mut s,
        &cfg,
        t(1),
        &[subscribe(1, &[("a", SubOptions::default())])],
    );
    s.handle_closed(t(2));
    let state = s.take_state().unwrap();
    let mut n = Session::new(&cfg, t(3));
    feed(
        &mut n,
        &cfg,
        t(3),
        &[Packet::Connect(Box::new(connect(V3, "ctl-1", true)))],
    );
    n.accept(&cfg, t(3), Some(state), None);
    let o = out(&mut n, &cfg, t(3));
    assert!(matches!(&o[0], Packet::ConnAck(a) if !a.session_present));
    assert_eq!(n.subscriptions().count(), 0);
}

#[test]
fn take_over_sends_0x8e_and_keeps_the_session() {
    let cfg = SessionConfig::default();
    let mut c = connect(V5, "ctl-1", false);
    c.props.session_expiry_interval = Some(60);
    let mut s = open_with(&cfg, with_will(c, None));
    s.take_over(t(1));
    assert_eq!(
        out(&mut s, &cfg, t(1)),
        vec![Packet::Disconnect(Disconnect {
            code: reason::SESSION_TAKEN_OVER,
            props: Properties::default()
        })]
    );
    let evs = events(&mut s);
    assert_eq!(closed(&evs), Some(CloseReason::TakenOver));
    assert_eq!(
        wills(&evs),
        1,
        "will delay 0: the will of the old connection goes out"
    );
    assert!(s.take_state().is_some());
    // Nothing more from a taken session.
    s.handle_timeout(t(1_000_000));
    assert!(events(&mut s).is_empty());
}

#[test]
fn non_persistent_session_ends_with_its_connection() {
    let cfg = SessionConfig::default();
    let mut s = open(&cfg, V5);
    s.disconnect(t(1), reason::SERVER_SHUTTING_DOWN);
    assert_eq!(
        events(&mut s),
        vec![
            Event::Closed(CloseReason::Server(reason::SERVER_SHUTTING_DOWN)),
            Event::SessionEnded
        ]
    );
    assert!(s.take_state().is_none());
    assert_eq!(
        s.deliver(
            &cfg,
            t(2),
            &msg("a", QoS::AtLeastOnce, ""),
            &at(QoS::AtLeastOnce)
        ),
        Err(DeliverError::NoSession)
    );
}

#[test]
fn many_packets_without_events_are_all_answered_in_one_call() {
    let cfg = SessionConfig::default();
    let mut s = open(&cfg, V3);
    let mut input = BytesMut::new();
    for _ in 0..5000 {
        input.extend_from_slice(&wire(&Packet::PingReq, V3));
    }
    assert!(s.handle_input(&cfg, t(1), &mut input).is_none());
    assert!(input.is_empty());
    assert_eq!(out(&mut s, &cfg, t(1)).len(), 5000);
}

/// An idle MQTT client's session is most of what it costs the relay beyond
/// the connection record: the will, the topic aliases, the drop counts and
/// the write queue stay out of line (or unallocated), the subscriptions
/// sized to fit, and one time field serves the CONNECT deadline, the
/// keep-alive clock and the expiry.
#[test]
fn an_idle_session_stays_small() {
    let n = std::mem::size_of::<Session>();
    assert!(n <= 152, "{n}");
}

/// An idle session holds no write queue and no drop counts; they come with
/// use and the queue goes once written.
#[test]
fn an_idle_session_allocates_no_queue_or_counts() {
    let cfg = SessionConfig::default();
    let mut s = open(&cfg, Version::V311);
    let _ = out(&mut s, &cfg, t(1));
    assert!(s.out.is_none(), "CONNACK written: no buffer left");
    assert!(s.rare.is_none());
    assert_eq!(s.drops(), Drops::default());
}

/// The event queue keeps its room while a client is busy (no allocation
/// per packet) and gives it back at `tidy`, once per read pass: an idle
/// client holds none.
#[test]
fn the_event_queue_is_kept_across_packets_and_released_by_tidy() {
    let cfg = SessionConfig::default();
    let mut s = open(&cfg, Version::V311);
    s.tidy();
    assert!(!s.events.is_allocated());
    let evs = feed(&mut s, &cfg, t(1), &[publish("a", QoS::AtMostOnce, 0, "1")]);
    assert_eq!(evs.len(), 1);
    assert!(s.events.is_allocated(), "room kept for the next packet");
    let evs = feed(&mut s, &cfg, t(2), &[publish("a", QoS::AtMostOnce, 0, "2")]);
    assert_eq!(evs.len(), 1);
    s.tidy();
    assert!(!s.events.is_allocated());
}
