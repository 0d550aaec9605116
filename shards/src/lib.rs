//! relay-shards: the relay's runtime and the `relay` binary.
//!
//! # Layout
//! - [`router`]: one shard's routing state (owned addresses, groups, pending
//!   acknowledgements) and every routing decision; no IO, no executor.
//! - [`acl`]: the access rules in force and their denial counters.
//! - [`cluster`]: several nodes as one over NATS (`[cluster]`): the NATS
//!   thread and the link's state, without IO, in `cluster::link`.
//! - [`cell`]: the per-connection record shared by the I/O loop and the router
//!   (protocol state and session; no descriptor, TLS session or socket buffer).
//! - [`stats`]: lock-free per-shard counters; [`metrics`] renders them.
//! - [`http`]: HTTP/1.1 request parsing and responses (httparse).
//! - [`ws`]: the WebSocket frame layer (tungstenite headers).
//! - [`api`]: the HTTP API routes over the router.
//! - [`lograte`]: log lines an outsider can cause, at most one a second.
//! - `rt`: the glommio runtime (executors, listeners, the per-shard I/O loop
//!   and its table of socket state, the cross-shard mesh, deadlines,
//!   shutdown). All glommio code and every client socket are there.

pub mod acl;
pub mod admission;
pub mod api;
pub mod cell;
pub mod cluster;
pub mod console;
pub mod http;
pub mod lograte;
pub mod metrics;
pub mod router;
mod rt;
pub mod rules;
pub mod stats;
pub mod ws;

pub use rt::{
    Extensions, HooksFactory, Inherited, MeshMsg, MetricsSource, Relay, ReloadReport,
    UPGRADE_FD_ENV, notify_main_pid, now, ready, receive_from_env, router_config,
};
