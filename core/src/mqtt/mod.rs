//! MQTT 3.1.1 and 5.0, sans IO: the codec, topics, the subscription index,
//! retained messages and one client's session state machine.
//!
//! MQTT clients join the relay's address space: a client id is an address
//! and topics are groups. This module holds only the protocol; the shard
//! drives it with the bytes it reads and writes, and the router with the
//! events it gets.
//!
//! # Why a codec of our own
//! The Rust MQTT codecs on crates.io were weighed against what the relay
//! needs (bounded, zero-panic, fuzzable, zero-copy, no runtime in
//! `relay-core`):
//! - `rumqttc` (already in the workspace for the load tester) exposes its
//!   packet modules (`rumqttc::mqttbytes::v4`, `rumqttc::v5::mqttbytes::v5`),
//!   but it is a client crate: depending on it puts tokio, flume and
//!   tokio-util under `relay-core`. Its reader is written for a client: it
//!   bounds the remaining length, not the whole packet (MQTT 5 counts the
//!   fixed header), copies 3.1.1 topics into `String`s, and does not refuse
//!   U+0000 in strings, wildcards in PUBLISH topic names, reserved flag
//!   bits, or properties a packet may not carry.
//! - `mqttbytes` (the same code, standalone) has had no release since 2021;
//!   `mqttrs` speaks 3.1.1 only; `rmqtt-codec` decodes through
//!   `tokio_util::codec` and brings `bytestring`, `chrono` and
//!   `rmqtt-utils` with it.
//!
//! So the codec is written here, and checked against `rumqttc`'s in a property test
//! (`tests/proptest_mqtt.rs`: each decodes the other's bytes).
//!
//! # Bounds the decoder keeps
//! - The maximum packet size counts the whole packet and is checked from
//!   the fixed header, before a byte of the body is buffered.
//! - A remaining length of more than 4 bytes, reserved flag bits, QoS 3,
//!   packet id 0, bad UTF-8 or U+0000 in a string, a wildcard in a topic
//!   name, an unknown property or one the packet may not carry are errors
//!   ([`DecodeError`]) with the reason code the spec answers them with.
//! - Strings, topics and payloads are slices of the received buffer.
//!
//! # Layout
//! - [`wire`]: integers, variable byte integers, strings, the errors.
//! - [`packet`]: the packet structs, [`Properties`], versions, QoS.
//! - [`codec`]: the fixed header check, [`Decoder`], `encode`.
//! - [`reason`]: reason codes and 3.1.1 return codes.
//! - [`topic`]: topic name and filter rules, matching, `$share` filters.
//! - [`trie`]: [`SubscriptionTrie`], the subscription index.
//! - [`message`]: [`Message`], an application message as routed, and how
//!   it is written as a PUBLISH.
//! - [`retain`]: the retained messages ([`RetainedStore`]).
//! - [`session`]: [`Session`], one client's connection and session state
//!   machine (CONNECT, QoS flows, in-flight window, queue, aliases, will,
//!   expiry).

pub mod codec;
pub mod message;
pub mod packet;
pub mod reason;
pub mod retain;
pub mod session;
pub mod topic;
pub mod trie;
pub mod wire;

pub use codec::{Check, Decoder, check, encode, encoded_len, parse};
pub use message::Message;
pub use packet::{
    Auth, ConnAck, Connect, Disconnect, Packet, PacketType, Properties, PubResp, Publish, QoS,
    RetainHandling, SubAck, SubOptions, Subscribe, UnsubAck, Unsubscribe, Version, Will,
};
pub use retain::{RetainConfig, RetainError, RetainedStore};
pub use session::{
    CloseReason, DeliverError, Delivery, Drops, Event, Session, SessionConfig, SessionState,
    Subscription,
};
pub use topic::{TopicError, matches, parse_filter, validate_topic_filter, validate_topic_name};
pub use trie::SubscriptionTrie;
pub use wire::{DecodeError, EncodeError};
