//! relay-core: the relay's wire protocol, sans IO.
//!
//! No sockets, no executor, no clock: pure functions and state machines over
//! byte buffers, so every rule of the protocol is tested and fuzzed alone.
//!
//! # Layout
//! - [`name`]: address, group and uid validation.
//! - [`frame`]: frame types, flags, error codes and the [`Frame`] struct.
//! - [`codec`]: the binary form (length prefix, two-step decoding).
//! - [`json`]: the JSON form and the payload crossing rules.
//! - [`conn`]: one connection's protocol state machine (hello, heartbeats,
//!   deadlines, limits, the bounded outbound queue).
//! - [`drops`]: [`DropReason`], every reason a frame is dropped and counted.
//! - [`mqtt`]: MQTT 3.1.1 and 5.0: codec, topics, the subscription trie,
//!   retained messages and the session state machine.
//! - [`route`]: address → shard hashing and server-assigned addresses.
//! - [`auth`]: HMAC client tokens.
//! - [`acl`]: access rules (who may send, join, publish or watch what),
//!   reduced per client at hello and checked per frame.
//! - [`proxy`]: the PROXY protocol v2 header a load balancer sends first.
//! - [`procstat`]: a process's CPU time and memory, parsed from `/proc` text.
//! - [`ws`]: WebSocket frame writing (server frames, close and pong, named
//!   opcodes).
//! - [`pieces`]: feeding a byte stream to a decoder in pieces, for tests and
//!   fuzz targets.

pub mod acl;
pub mod auth;
pub mod codec;
pub mod conn;
pub mod drops;
pub mod frame;
pub mod json;
pub mod mqtt;
pub mod name;
pub mod pieces;
pub mod procstat;
pub mod proxy;
pub mod route;
pub mod ws;

pub use codec::{DecodeError, Decoder};
pub use conn::{
    CloseReason, ConnConfig, Connection, Event, Hello, Now, Role, SendError, Transport, Wire,
};
pub use drops::DropReason;
pub use frame::{ErrorCode, Flags, Frame, FrameType};
pub use json::JsonError;
pub use name::{NameError, validate_name};
pub use route::shard_of;
