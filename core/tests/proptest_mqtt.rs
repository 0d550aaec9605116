//! Property tests of the MQTT layer: codec round trips in both versions,
//! any chunking of a stream, cross-checks against rumqttc's packet code,
//! no panic on arbitrary bytes (decoder and session), the subscription
//! trie and the retained store against the reference matcher, and the
//! session's bounds under random traffic.

use std::collections::HashMap;

use bytes::{Bytes, BytesMut};
use proptest::prelude::*;
use relay_core::conn::Now;
use relay_core::mqtt::packet::PropsOf;
use relay_core::mqtt::session::{Delivery, Event, Session, SessionConfig};
use relay_core::mqtt::{
    Auth, ConnAck, Connect, Decoder, Disconnect, Message, Packet, PacketType, Properties, PubResp,
    Publish, QoS, RetainConfig, RetainHandling, RetainedStore, SubAck, SubOptions, Subscribe,
    SubscriptionTrie, UnsubAck, Unsubscribe, Version, Will, encode, encoded_len, matches,
    parse_filter, validate_topic_filter,
};

// ------------------------------------------------------------ strategies

/// An MQTT string: UTF-8 without U+0000, some of it outside ASCII.
fn text(max: usize) -> impl Strategy<Value = Bytes> {
    prop::collection::vec(
        prop_oneof![
            8 => prop::char::range('a', 'z'),
            1 => Just('/'),
            1 => Just('é'),
            1 => Just('😀'),
            1 => prop::char::range('\u{1}', '\u{7f}'),
        ],
        0..=max,
    )
    .prop_map(|cs| Bytes::from(cs.into_iter().collect::<String>()))
}

fn topic_name() -> impl Strategy<Value = Bytes> {
    "[a-z0-9]{1,4}(/[a-z0-9]{0,4}){0,3}".prop_map(Bytes::from)
}

fn bin(max: usize) -> impl Strategy<Value = Bytes> {
    prop::collection::vec(any::<u8>(), 0..=max).prop_map(Bytes::from)
}

fn qos() -> impl Strategy<Value = QoS> {
    prop_oneof![
        Just(QoS::AtMostOnce),
        Just(QoS::AtLeastOnce),
        Just(QoS::ExactlyOnce)
    ]
}

fn flag() -> impl Strategy<Value = Option<u8>> {
    prop::option::of(0u8..=1)
}

fn any_props() -> impl Strategy<Value = Properties> {
    use prop::option::of;
    let a = (
        flag(),
        of(any::<u32>()),
        of(text(8)),
        of(topic_name()),
        of(bin(8)),
        prop::collection::vec(1u32..=268_435_455, 0..3),
        of(any::<u32>()),
        of(text(8)),
        of(any::<u16>()),
    );
    let b = (
        of(text(8)),
        of(bin(8)),
        flag(),
        of(any::<u32>()),
        flag(),
        of(text(8)),
        of(text(8)),
        of(text(8)),
        of(1u16..),
    );
    let c = (
        of(any::<u16>()),
        of(any::<u16>()),
        flag(),
        flag(),
        prop::collection::vec((text(6), text(6)), 0..3),
        of(1u32..),
        flag(),
        flag(),
        flag(),
    );
    (a, b, c).prop_map(|(a, b, c)| Properties {
        payload_format_indicator: a.0,
        message_expiry_interval: a.1,
        content_type: a.2,
        response_topic: a.3,
        correlation_data: a.4,
        subscription_identifiers: a.5,
        session_expiry_interval: a.6,
        assigned_client_identifier: a.7,
        server_keep_alive: a.8,
        authentication_method: b.0,
        authentication_data: b.1,
        request_problem_information: b.2,
        will_delay_interval: b.3,
        request_response_information: b.4,
        response_information: b.5,
        server_reference: b.6,
        reason_string: b.7,
        receive_maximum: b.8,
        topic_alias_maximum: c.0,
        topic_alias: c.1,
        maximum_qos: c.2,
        retain_available: c.3,
        user_properties: c.4,
        maximum_packet_size: c.5,
        wildcard_subscription_available: c.6,
        subscription_identifier_available: c.7,
        shared_subscription_available: c.8,
    })
}

/// Keeps the properties `of` allows.
fn mask(mut p: Properties, of: PropsOf) -> Properties {
    use relay_core::mqtt::packet::prop::*;
    let a = of.allowed();
    macro_rules! keep {
        ($($id:ident => $field:ident),* $(,)?) => {$(
            if a & (1u64 << $id) == 0 {
                p.$field = Default::default();
            }
        )*};
    }
    keep!(
        PAYLOAD_FORMAT_INDICATOR => payload_format_indicator,
        MESSAGE_EXPIRY_INTERVAL => message_expiry_interval,
        CONTENT_TYPE => content_type,
        RESPONSE_TOPIC => response_topic,
        CORRELATION_DATA => correlation_data,
        SUBSCRIPTION_IDENTIFIER => subscription_identifiers,
        SESSION_EXPIRY_INTERVAL => session_expiry_interval,
        ASSIGNED_CLIENT_IDENTIFIER => assigned_client_identifier,
        SERVER_KEEP_ALIVE => server_keep_alive,
        AUTHENTICATION_METHOD => authentication_method,
        AUTHENTICATION_DATA => authentication_data,
        REQUEST_PROBLEM_INFORMATION => request_problem_information,
        WILL_DELAY_INTERVAL => will_delay_interval,
        REQUEST_RESPONSE_INFORMATION => request_response_information,
        RESPONSE_INFORMATION => response_information,
        SERVER_REFERENCE => server_reference,
        REASON_STRING => reason_string,
        RECEIVE_MAXIMUM => receive_maximum,
        TOPIC_ALIAS_MAXIMUM => topic_alias_maximum,
        TOPIC_ALIAS => topic_alias,
        MAXIMUM_QOS => maximum_qos,
        RETAIN_AVAILABLE => retain_available,
        MAXIMUM_PACKET_SIZE => maximum_packet_size,
        WILDCARD_SUBSCRIPTION_AVAILABLE => wildcard_subscription_available,
        SUBSCRIPTION_IDENTIFIER_AVAILABLE => subscription_identifier_available,
        SHARED_SUBSCRIPTION_AVAILABLE => shared_subscription_available,
    );
    if of == PropsOf::Packet(PacketType::Subscribe) {
        p.subscription_identifiers.truncate(1);
    }
    p
}

/// Properties for `of` in MQTT 5; none in 3.1.1.
fn props(v: Version, of: PropsOf) -> BoxedStrategy<Properties> {
    match v {
        Version::V5 => any_props().prop_map(move |p| mask(p, of)).boxed(),
        Version::V311 => Just(Properties::default()).boxed(),
    }
}

fn code(v: Version) -> BoxedStrategy<u8> {
    match v {
        Version::V5 => any::<u8>().boxed(),
        Version::V311 => Just(0u8).boxed(),
    }
}

fn sub_options(v: Version) -> impl Strategy<Value = SubOptions> {
    let rh = prop_oneof![
        Just(RetainHandling::SendAtSubscribe),
        Just(RetainHandling::SendIfNew),
        Just(RetainHandling::DontSend)
    ];
    (qos(), any::<bool>(), any::<bool>(), rh).prop_map(move |(qos, nl, rap, rh)| match v {
        Version::V5 => SubOptions {
            qos,
            no_local: nl,
            retain_as_published: rap,
            retain_handling: rh,
        },
        Version::V311 => SubOptions::qos(qos),
    })
}

fn will(v: Version) -> impl Strategy<Value = Will> {
    (
        topic_name(),
        bin(16),
        qos(),
        any::<bool>(),
        props(v, PropsOf::Will),
    )
        .prop_map(|(topic, payload, qos, retain, props)| Will {
            topic,
            payload,
            qos,
            retain,
            props,
        })
}

fn connect(v: Version) -> impl Strategy<Value = Packet> {
    (
        any::<bool>(),
        any::<u16>(),
        props(v, PropsOf::Packet(PacketType::Connect)),
        text(23),
        prop::option::of(will(v)),
        prop::option::of(text(8)),
        prop::option::of(bin(8)),
    )
        .prop_map(move |(clean, ka, props, id, will, user, mut pass)| {
            if v == Version::V311 && user.is_none() {
                pass = None;
            }
            Packet::Connect(Box::new(Connect {
                version: v,
                clean_start: clean,
                keep_alive: ka,
                props,
                client_id: id,
                will,
                username: user,
                password: pass,
            }))
        })
}

fn publish(v: Version) -> impl Strategy<Value = Packet> {
    (
        qos(),
        any::<bool>(),
        any::<bool>(),
        topic_name(),
        1u16..,
        props(v, PropsOf::Packet(PacketType::Publish)),
        bin(64),
    )
        .prop_map(|(qos, dup, retain, topic, id, props, payload)| {
            let q0 = qos == QoS::AtMostOnce;
            Packet::Publish(Publish {
                dup: dup && !q0,
                qos,
                retain,
                topic,
                packet_id: if q0 { 0 } else { id },
                props,
                payload,
            })
        })
}

fn resp(v: Version, kind: PacketType) -> impl Strategy<Value = PubResp> {
    (1u16.., code(v), props(v, PropsOf::Packet(kind))).prop_map(|(packet_id, code, props)| {
        PubResp {
            packet_id,
            code,
            props,
        }
    })
}

/// Any packet of version `v`.
fn packet(v: Version) -> impl Strategy<Value = Packet> {
    let p = |k| PropsOf::Packet(k);
    let mut arms: Vec<BoxedStrategy<Packet>> = vec![
        connect(v).boxed(),
        (any::<bool>(), any::<u8>(), props(v, p(PacketType::ConnAck)))
            .prop_map(|(sp, code, props)| {
                Packet::ConnAck(ConnAck {
                    session_present: sp,
                    code,
                    props,
                })
            })
            .boxed(),
        publish(v).boxed(),
        resp(v, PacketType::PubAck).prop_map(Packet::PubAck).boxed(),
        resp(v, PacketType::PubRec).prop_map(Packet::PubRec).boxed(),
        resp(v, PacketType::PubRel).prop_map(Packet::PubRel).boxed(),
        resp(v, PacketType::PubComp)
            .prop_map(Packet::PubComp)
            .boxed(),
        (
            1u16..,
            props(v, p(PacketType::Subscribe)),
            prop::collection::vec((text(12), sub_options(v)), 1..4),
        )
            .prop_map(|(packet_id, props, filters)| {
                Packet::Subscribe(Subscribe {
                    packet_id,
                    props,
                    filters,
                })
            })
            .boxed(),
        (
            1u16..,
            props(v, p(PacketType::SubAck)),
            prop::collection::vec(any::<u8>(), 0..5),
        )
            .prop_map(|(packet_id, props, codes)| {
                Packet::SubAck(SubAck {
                    packet_id,
                    props,
                    codes,
                })
            })
            .boxed(),
        (
            1u16..,
            props(v, p(PacketType::Unsubscribe)),
            prop::collection::vec(text(12), 1..4),
        )
            .prop_map(|(packet_id, props, filters)| {
                Packet::Unsubscribe(Unsubscribe {
                    packet_id,
                    props,
                    filters,
                })
            })
            .boxed(),
        (
            1u16..,
            props(v, p(PacketType::UnsubAck)),
            prop::collection::vec(any::<u8>(), 0..5),
        )
            .prop_map(move |(packet_id, props, codes)| {
                Packet::UnsubAck(UnsubAck {
                    packet_id,
                    props,
                    codes: if v == Version::V5 { codes } else { Vec::new() },
                })
            })
            .boxed(),
        Just(Packet::PingReq).boxed(),
        Just(Packet::PingResp).boxed(),
        (code(v), props(v, p(PacketType::Disconnect)))
            .prop_map(|(code, props)| Packet::Disconnect(Disconnect { code, props }))
            .boxed(),
    ];
    if v == Version::V5 {
        arms.push(
            (code(v), props(v, p(PacketType::Auth)))
                .prop_map(|(code, props)| Packet::Auth(Auth { code, props }))
                .boxed(),
        );
    }
    prop::strategy::Union::new(arms)
}

fn version() -> impl Strategy<Value = Version> {
    prop_oneof![Just(Version::V311), Just(Version::V5)]
}

fn versioned_packets(n: usize) -> impl Strategy<Value = (Version, Vec<Packet>)> {
    version().prop_flat_map(move |v| (Just(v), prop::collection::vec(packet(v), 1..n)))
}

fn enc(p: &Packet, v: Version) -> BytesMut {
    let mut out = BytesMut::new();
    encode(p, v, &mut out).expect("generated packets encode");
    out
}

// ------------------------------------------------------------- the codec

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// encode → decode is the identity, in both versions, and the length
    /// the encoder announces is the length it writes.
    #[test]
    fn codec_round_trip((v, packets) in versioned_packets(2)) {
        for p in &packets {
            let mut buf = enc(p, v);
            prop_assert_eq!(buf.len(), encoded_len(p, v));
            let back = Decoder::new(1 << 20, v).decode(&mut buf);
            prop_assert_eq!(back, Ok(Some(p.clone())));
            prop_assert!(buf.is_empty());
        }
    }

    /// Any chunking of a stream of packets decodes to the same packets.
    #[test]
    fn any_chunking_gives_the_same_packets(
        (v, packets) in versioned_packets(6),
        cuts in prop::collection::vec(any::<usize>(), 0..8),
    ) {
        let mut stream = BytesMut::new();
        for p in &packets {
            stream.extend_from_slice(&enc(p, v));
        }
        let mut at: Vec<usize> = cuts.iter().map(|c| c % (stream.len() + 1)).collect();
        at.push(stream.len());
        at.sort();
        let d = Decoder::new(1 << 20, v);
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        let mut from = 0;
        for to in at {
            buf.extend_from_slice(&stream[from..to]);
            from = to;
            while let Some(p) = d.decode(&mut buf).expect("valid stream") {
                got.push(p);
            }
        }
        prop_assert_eq!(got, packets);
    }

    /// Arbitrary bytes never panic the decoder; what decodes re-encodes
    /// to a packet that decodes the same, within the size bound.
    #[test]
    fn decoder_never_panics(
        bytes in prop::collection::vec(any::<u8>(), 0..600),
        max in 2usize..700,
        v in version(),
    ) {
        let d = Decoder::new(max, v);
        let mut buf = BytesMut::from(&bytes[..]);
        for _ in 0..=bytes.len() {
            match d.decode(&mut buf) {
                Ok(Some(p)) => {
                    let ver = match &p {
                        Packet::Connect(c) => c.version,
                        _ => v,
                    };
                    let mut again = enc(&p, ver);
                    let back = Decoder::new(usize::MAX, ver).decode(&mut again);
                    prop_assert_eq!(back, Ok(Some(p)));
                }
                Ok(None) | Err(_) => break,
            }
        }
    }

    /// Valid packets with one byte changed never panic the decoder.
    #[test]
    fn mutated_packets_never_panic(
        (v, packets) in versioned_packets(2),
        at in any::<usize>(),
        byte in any::<u8>(),
    ) {
        let mut b = enc(&packets[0], v);
        let i = at % b.len();
        b[i] = byte;
        let _ = Decoder::new(1 << 20, v).decode(&mut b);
    }
}

// ------------------------------------------------- rumqttc cross-checks

/// rumqttc reads what we write, and we read what it writes back, as the
/// same packet. Limited to what rumqttc can express: string passwords,
/// non-empty credentials, the reason codes its enums name.
fn rumqttc_v4_agrees(p: &Packet) -> Result<(), TestCaseError> {
    use rumqttc::mqttbytes::v4::Packet as R;
    let mut ours = enc(p, Version::V311);
    let theirs = R::read(&mut ours, 1 << 20)
        .map_err(|e| TestCaseError::fail(format!("rumqttc refused our {p:?}: {e:?}")))?;
    let mut back = BytesMut::new();
    theirs
        .write(&mut back, 1 << 20)
        .map_err(|e| TestCaseError::fail(format!("{e:?}")))?;
    let again = Decoder::new(1 << 20, Version::V311).decode(&mut back);
    prop_assert_eq!(again, Ok(Some(p.clone())));
    Ok(())
}

fn rumqttc_v5_agrees(p: &Packet) -> Result<(), TestCaseError> {
    use rumqttc::v5::mqttbytes::v5::Packet as R;
    let mut ours = enc(p, Version::V5);
    let theirs = R::read(&mut ours, Some(1 << 20))
        .map_err(|e| TestCaseError::fail(format!("rumqttc refused our {p:?}: {e:?}")))?;
    let mut back = BytesMut::new();
    theirs
        .write(&mut back, Some(1 << 20))
        .map_err(|e| TestCaseError::fail(format!("{e:?}")))?;
    let again = Decoder::new(1 << 20, Version::V5).decode(&mut back);
    prop_assert_eq!(again, Ok(Some(p.clone())));
    Ok(())
}

fn credentials() -> impl Strategy<Value = Option<(Bytes, Bytes)>> {
    prop::option::of(
        ("[a-z]{1,8}", "[a-z0-9]{1,8}").prop_map(|(u, p)| (Bytes::from(u), Bytes::from(p))),
    )
}

fn cross_packet(v: Version) -> impl Strategy<Value = Packet> {
    let publish_props = move || props(v, PropsOf::Packet(PacketType::Publish));
    prop_oneof![
        (
            qos(),
            any::<bool>(),
            any::<bool>(),
            topic_name(),
            1u16..,
            publish_props(),
            bin(64)
        )
            .prop_map(|(qos, dup, retain, topic, id, mut props, payload)| {
                let q0 = qos == QoS::AtMostOnce;
                props.topic_alias = None; // rumqttc resolves aliases itself
                props.subscription_identifiers.truncate(1);
                Packet::Publish(Publish {
                    dup: dup && !q0,
                    qos,
                    retain,
                    topic,
                    packet_id: if q0 { 0 } else { id },
                    props,
                    payload,
                })
            }),
        (
            any::<bool>(),
            1u16..,
            "[a-z0-9]{1,12}",
            prop::option::of((topic_name(), bin(16), qos(), any::<bool>())),
            credentials()
        )
            .prop_map(move |(clean, ka, id, will, login)| {
                Packet::Connect(Box::new(Connect {
                    version: v,
                    clean_start: clean,
                    keep_alive: ka,
                    props: Properties::default(),
                    client_id: Bytes::from(id),
                    will: will.map(|(topic, payload, qos, retain)| Will {
                        topic,
                        payload,
                        qos,
                        retain,
                        props: Properties::default(),
                    }),
                    username: login.as_ref().map(|l| l.0.clone()),
                    password: login.map(|l| l.1),
                }))
            }),
        (
            1u16..,
            prop::collection::vec(("[a-z/+#]{1,10}", qos()), 1..4)
        )
            .prop_map(|(packet_id, filters)| {
                Packet::Subscribe(Subscribe {
                    packet_id,
                    props: Properties::default(),
                    filters: filters
                        .into_iter()
                        .map(|(f, q)| (Bytes::from(f), SubOptions::qos(q)))
                        .collect(),
                })
            }),
        (1u16.., prop::collection::vec("[a-z/+#]{1,10}", 1..4)).prop_map(|(packet_id, fs)| {
            Packet::Unsubscribe(Unsubscribe {
                packet_id,
                props: Properties::default(),
                filters: fs.into_iter().map(Bytes::from).collect(),
            })
        }),
        (
            1u16..,
            prop::collection::vec(prop_oneof![Just(0u8), Just(1), Just(2), Just(0x80)], 1..5)
        )
            .prop_map(|(packet_id, codes)| Packet::SubAck(SubAck {
                packet_id,
                props: Properties::default(),
                codes,
            })),
        (1u16..).prop_map(|id| Packet::PubAck(PubResp {
            packet_id: id,
            ..PubResp::default()
        })),
        (1u16..).prop_map(|id| Packet::PubRec(PubResp {
            packet_id: id,
            ..PubResp::default()
        })),
        (1u16..).prop_map(|id| Packet::PubRel(PubResp {
            packet_id: id,
            ..PubResp::default()
        })),
        (1u16..).prop_map(|id| Packet::PubComp(PubResp {
            packet_id: id,
            ..PubResp::default()
        })),
        any::<bool>().prop_map(|sp| Packet::ConnAck(ConnAck {
            session_present: sp,
            ..ConnAck::default()
        })),
        Just(Packet::PingReq),
        Just(Packet::PingResp),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn rumqttc_reads_our_v311_packets_and_we_read_its(p in cross_packet(Version::V311)) {
        rumqttc_v4_agrees(&p)?;
    }

    #[test]
    fn rumqttc_reads_our_v5_packets_and_we_read_its(p in cross_packet(Version::V5)) {
        rumqttc_v5_agrees(&p)?;
    }
}

// ------------------------------------------------- topics, trie, retain

fn level() -> impl Strategy<Value = &'static str> {
    prop::sample::select(vec!["a", "b", "", "$x", "c"])
}

fn filter_level() -> impl Strategy<Value = &'static str> {
    prop::sample::select(vec!["a", "b", "", "$x", "+", "#"])
}

fn random_topic() -> impl Strategy<Value = String> {
    prop::collection::vec(level(), 1..5).prop_map(|l| l.join("/"))
}

fn random_filter() -> impl Strategy<Value = String> {
    prop::collection::vec(filter_level(), 1..5)
        .prop_map(|l| l.join("/"))
        .prop_filter("valid filters", |f| {
            validate_topic_filter(f.as_bytes()).is_ok()
        })
}

#[derive(Debug, Clone)]
enum Op {
    Sub {
        filter: String,
        group: Option<u8>,
        id: u8,
    },
    Unsub {
        filter: String,
        group: Option<u8>,
        id: u8,
    },
}

fn op() -> impl Strategy<Value = Op> {
    let f = || (random_filter(), prop::option::of(0u8..2), 0u8..6);
    prop_oneof![
        3 => f().prop_map(|(filter, group, id)| Op::Sub { filter, group, id }),
        1 => f().prop_map(|(filter, group, id)| Op::Unsub { filter, group, id }),
    ]
}

fn full(filter: &str, group: Option<u8>) -> String {
    match group {
        Some(g) => format!("$share/g{g}/{filter}"),
        None => filter.to_string(),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// After random subscribes and unsubscribes, the trie finds exactly
    /// the plain subscriptions the reference matcher finds, and one member
    /// of each matching share group.
    #[test]
    fn trie_agrees_with_brute_force(
        ops in prop::collection::vec(op(), 0..40),
        topics in prop::collection::vec(random_topic(), 1..8),
    ) {
        // Options kept with a subscription: its filter as sent.
        let mut trie: SubscriptionTrie<u8, String> = SubscriptionTrie::new();
        let mut model: HashMap<(String, u8), ()> = HashMap::new();
        for op in &ops {
            match op {
                Op::Sub { filter, group, id } => {
                    let f = full(filter, *group);
                    let old = trie.insert(f.as_bytes(), *id, f.clone()).unwrap();
                    prop_assert_eq!(old.is_some(), model.insert((f, *id), ()).is_some());
                }
                Op::Unsub { filter, group, id } => {
                    let f = full(filter, *group);
                    let old = trie.remove(f.as_bytes(), id);
                    prop_assert_eq!(old.is_some(), model.remove(&(f, *id)).is_some());
                }
            }
            prop_assert_eq!(trie.len(), model.len());
        }
        for topic in &topics {
            let t = topic.as_bytes();
            // Brute force: plain (filter, id) pairs; shared groups by (group, filter).
            let mut plain_want: Vec<(String, u8)> = Vec::new();
            let mut groups_want: HashMap<String, Vec<u8>> = HashMap::new();
            for (f, id) in model.keys() {
                let parsed = parse_filter(f.as_bytes()).unwrap();
                if !matches(parsed.filter, t) {
                    continue;
                }
                match parsed.group {
                    None => plain_want.push((f.clone(), *id)),
                    Some(_) => groups_want.entry(f.clone()).or_default().push(*id),
                }
            }
            let mut plain_got = Vec::new();
            let mut groups_got: HashMap<String, Vec<u8>> = HashMap::new();
            trie.for_each_match(t, |m| match m.group {
                None => plain_got.push((m.options.clone(), *m.id)),
                Some(_) => groups_got.entry(m.options.clone()).or_default().push(*m.id),
            });
            plain_want.sort();
            plain_got.sort();
            prop_assert_eq!(&plain_got, &plain_want, "topic {}", topic);
            let mut keys_want: Vec<_> = groups_want.keys().cloned().collect();
            let mut keys_got: Vec<_> = groups_got.keys().cloned().collect();
            keys_want.sort();
            keys_got.sort();
            prop_assert_eq!(keys_got, keys_want, "share groups for {}", topic);
            for (f, got) in &groups_got {
                prop_assert_eq!(got.len(), 1, "one member of {} per message", f);
                prop_assert!(groups_want[f].contains(&got[0]));
            }
        }
    }

    /// The retained store finds exactly the topics the reference matcher
    /// accepts, whatever was set and deleted.
    #[test]
    fn retained_lookup_agrees_with_brute_force(
        sets in prop::collection::vec((random_topic(), any::<bool>()), 0..30),
        filters in prop::collection::vec(random_filter(), 1..6),
    ) {
        let cfg = RetainConfig::default();
        let mut store = RetainedStore::new();
        let mut model: HashMap<String, ()> = HashMap::new();
        for (topic, delete) in &sets {
            let payload = if *delete { "" } else { "p" };
            store
                .set(&cfg, &Message::new(Bytes::from(topic.clone()), payload, QoS::AtMostOnce))
                .unwrap();
            if *delete {
                model.remove(topic);
            } else {
                model.insert(topic.clone(), ());
            }
        }
        prop_assert_eq!(store.len(), model.len());
        for f in &filters {
            let mut want: Vec<String> = model
                .keys()
                .filter(|t| matches(f.as_bytes(), t.as_bytes()))
                .cloned()
                .collect();
            let mut got = Vec::new();
            store.for_each_match(f.as_bytes(), 0, |m| {
                got.push(String::from_utf8(m.topic.to_vec()).unwrap())
            });
            want.sort();
            got.sort();
            prop_assert_eq!(got, want, "filter {}", f);
        }
    }
}

// --------------------------------------------------------------- session

fn t(ms: u64) -> Now {
    Now {
        mono_ms: ms,
        wall_ms: 1_763_800_000_000 + ms,
    }
}

fn drive_session(
    cfg: &SessionConfig,
    v: Version,
    rest: &[u8],
    acks: bool,
) -> Result<(), TestCaseError> {
    let mut s = Session::new(cfg, t(0));
    let c = Packet::Connect(Box::new(Connect {
        version: v,
        clean_start: false,
        keep_alive: 5,
        client_id: Bytes::from_static(b"ctl-1"),
        ..Connect::default()
    }));
    let mut input = enc(&c, v);
    input.extend_from_slice(rest);
    let mut closes = 0;
    for step in 0..rest.len() as u64 + 2 {
        let now = t(step * 100);
        for _ in 0..10_000 {
            match s.handle_input(cfg, now, &mut input) {
                Some(Event::Connect(_)) => s.accept(cfg, now, None, None),
                Some(Event::Closed(_)) => closes += 1,
                Some(_) => {}
                None => break,
            }
        }
        let m = Message::new(
            Bytes::from_static(b"a/b"),
            vec![7u8; (step % 50) as usize],
            QoS::ExactlyOnce,
        );
        let _ = s.deliver(
            cfg,
            now,
            &m,
            &Delivery {
                qos: QoS::ExactlyOnce,
                ..Delivery::default()
            },
        );
        prop_assert!(s.inflight_len() <= usize::from(cfg.max_inflight));
        prop_assert!(s.queued_len() <= cfg.max_queued_messages);
        while let Some(chunk) = s.poll_transmit(97) {
            s.on_transmitted(cfg, now, chunk.len());
        }
        if acks {
            // Acknowledge whatever could be in flight.
            for id in 1..=16u16 {
                let mut b = enc(
                    &Packet::PubRec(PubResp {
                        packet_id: id,
                        ..PubResp::default()
                    }),
                    v,
                );
                b.extend_from_slice(&enc(
                    &Packet::PubComp(PubResp {
                        packet_id: id,
                        ..PubResp::default()
                    }),
                    v,
                ));
                input.extend_from_slice(&b);
            }
        }
        s.handle_timeout(now);
        while let Some(ev) = s.poll_event() {
            if matches!(ev, Event::Closed(_)) {
                closes += 1;
            }
        }
    }
    s.handle_closed(t(1_000_000));
    s.handle_timeout(t(u64::MAX / 2));
    while let Some(ev) = s.poll_event() {
        if matches!(ev, Event::Closed(_)) {
            closes += 1;
        }
    }
    prop_assert!(closes <= 1, "Closed reported {} times", closes);
    prop_assert!(s.is_ended() || s.is_offline());
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// A session fed arbitrary bytes after a valid CONNECT (or valid
    /// packets) never panics, keeps its window and queue bounds, and
    /// reports `Closed` at most once.
    #[test]
    fn session_survives_arbitrary_input(
        rest in prop::collection::vec(any::<u8>(), 0..300),
        v in version(),
        acks in any::<bool>(),
    ) {
        let cfg = SessionConfig {
            max_inflight: 4,
            max_queued_messages: 8,
            max_packet_size: 200,
            ..SessionConfig::default()
        };
        drive_session(&cfg, v, &rest, acks)?;
    }

    #[test]
    fn session_survives_valid_packets((v, packets) in versioned_packets(12), acks in any::<bool>()) {
        let cfg = SessionConfig {
            max_inflight: 4,
            max_queued_messages: 8,
            ..SessionConfig::default()
        };
        let mut rest = BytesMut::new();
        for p in &packets {
            rest.extend_from_slice(&enc(p, v));
        }
        drive_session(&cfg, v, &rest, acks)?;
    }
}

/// The cross-checks above compare whole packets; this one shows rumqttc
/// really reads the fields we write (topic, payload, user properties).
#[test]
fn rumqttc_sees_the_fields_we_write() {
    let p = Packet::Publish(Publish {
        qos: QoS::AtLeastOnce,
        topic: Bytes::from_static(b"a/b"),
        packet_id: 7,
        props: Properties {
            user_properties: vec![(Bytes::from_static(b"k"), Bytes::from_static(b"v"))],
            ..Properties::default()
        },
        payload: Bytes::from_static(b"hi"),
        ..Publish::default()
    });
    let mut b = enc(&p, Version::V5);
    let Ok(rumqttc::v5::mqttbytes::v5::Packet::Publish(r)) =
        rumqttc::v5::mqttbytes::v5::Packet::read(&mut b, None)
    else {
        panic!("rumqttc did not read a PUBLISH");
    };
    assert_eq!(&r.topic[..], b"a/b");
    assert_eq!(&r.payload[..], b"hi");
    assert_eq!(r.pkid, 7);
    let props = r.properties.expect("properties");
    assert_eq!(
        props.user_properties,
        vec![("k".to_string(), "v".to_string())]
    );
    let mut b = enc(&p, Version::V311);
    let Ok(rumqttc::mqttbytes::v4::Packet::Publish(r)) =
        rumqttc::mqttbytes::v4::Packet::read(&mut b, 1 << 20)
    else {
        panic!("rumqttc did not read a 3.1.1 PUBLISH");
    };
    assert_eq!(r.topic, "a/b");
    assert_eq!(&r.payload[..], b"hi");
}
