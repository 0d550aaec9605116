//! Counters of one shard, written only by that shard's thread and read by
//! anyone (the HTTP API, `/metrics`). Plain relaxed atomics: no lock on the
//! data path.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use relay_core::Role;

/// Why a frame did not reach a recipient.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    NoRoute = 0,
    SlowConsumer = 1,
    RateLimited = 2,
    MeshFull = 3,
    BadFrame = 4,
    PluginQueueFull = 5,
    TooLarge = 6,
    HelloRequired = 7,
    BadAddress = 8,
    Unsupported = 9,
    Forbidden = 10,
}

impl DropReason {
    pub const ALL: [DropReason; 11] = [
        DropReason::NoRoute,
        DropReason::SlowConsumer,
        DropReason::RateLimited,
        DropReason::MeshFull,
        DropReason::BadFrame,
        DropReason::PluginQueueFull,
        DropReason::TooLarge,
        DropReason::HelloRequired,
        DropReason::BadAddress,
        DropReason::Unsupported,
        DropReason::Forbidden,
    ];

    /// The counter of a frame a connection dropped itself.
    pub fn of_input(d: relay_core::InputDrop) -> DropReason {
        use relay_core::InputDrop as I;
        match d {
            I::BadFrame => DropReason::BadFrame,
            I::TooLarge => DropReason::TooLarge,
            I::RateLimited => DropReason::RateLimited,
            I::HelloRequired => DropReason::HelloRequired,
            I::BadAddress => DropReason::BadAddress,
            I::Unsupported => DropReason::Unsupported,
            I::Forbidden => DropReason::Forbidden,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            DropReason::NoRoute => "no_route",
            DropReason::SlowConsumer => "slow_consumer",
            DropReason::RateLimited => "rate_limited",
            DropReason::MeshFull => "mesh_full",
            DropReason::BadFrame => "bad_frame",
            DropReason::PluginQueueFull => "plugin_queue_full",
            DropReason::TooLarge => "too_large",
            DropReason::HelloRequired => "hello_required",
            DropReason::BadAddress => "bad_address",
            DropReason::Unsupported => "unsupported",
            DropReason::Forbidden => "forbidden",
        }
    }
}

/// One shard's counters and gauges.
#[derive(Debug, Default)]
pub struct ShardStats {
    /// Open connections by role (after hello), indexed like `Role::ALL`.
    pub conns_by_role: [AtomicU64; 4],
    /// Connections accepted and not yet past hello.
    pub conns_pending: AtomicU64,
    pub frames_in: AtomicU64,
    pub frames_out: AtomicU64,
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
    pub drops: [AtomicU64; 11],
    /// Frames sent to another shard over the mesh.
    pub cross_frames: AtomicU64,
    /// Connections handed to their owner shard after hello.
    pub handovers: AtomicU64,
    /// Bytes waiting in outbound queues, sampled by the shard's sweeper.
    pub queue_bytes: AtomicU64,
    pub accepted_total: AtomicU64,
    pub closed_total: AtomicU64,
    /// Hellos refused with `busy` by `[admission]`.
    pub hellos_deferred: AtomicU64,
    /// TLS connections closed for a TLS error (a bad record, a refused handshake).
    pub tls_errors: AtomicU64,
    /// TLS connections closed because their handshake outlived its deadline.
    pub tls_handshake_timeouts: AtomicU64,
}

impl ShardStats {
    pub fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Relaxed);
    }
    pub fn dropped(&self, why: DropReason) {
        self.drops[why as usize].fetch_add(1, Relaxed);
    }
    /// Adds the drops a connection counted (`Connection::take_drops`).
    pub fn input_drops(&self, counts: [u16; 7]) {
        for d in relay_core::InputDrop::ALL {
            let n = counts[d as usize];
            if n > 0 {
                self.drops[DropReason::of_input(d) as usize].fetch_add(u64::from(n), Relaxed);
            }
        }
    }
    pub fn role_index(role: Role) -> usize {
        Role::ALL.iter().position(|r| *r == role).unwrap_or(0)
    }
    pub fn conns(&self) -> u64 {
        self.conns_by_role
            .iter()
            .map(|c| c.load(Relaxed))
            .sum::<u64>()
            + self.conns_pending.load(Relaxed)
    }
    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Relaxed)
    }
}
