//! relay-shards: the relay's runtime and the `relay` binary.
//!
//! # Layout
//! - [`router`]: one shard's routing state (owned addresses, groups, pending
//!   acknowledgements) and every routing decision; no IO, no executor.
//! - [`cell`]: the per-connection record shared by a driver and its router.
//! - [`stats`]: lock-free per-shard counters.
//! - `rt`: the glommio runtime (executors, listeners, connection drivers,
//!   the cross-shard mesh, deadlines, shutdown). All glommio code is there.

pub mod cell;
pub mod router;
mod rt;
pub mod stats;

pub use rt::{MeshMsg, Relay, now, router_config};
