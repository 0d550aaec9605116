//! Counters of one shard, written only by that shard's thread and read by
//! anyone (the HTTP API, `/metrics`). Plain relaxed atomics: no lock on the
//! data path.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use relay_core::Role;

/// Why a frame did not reach a recipient: relay-core owns the list.
pub use relay_core::DropReason;

/// One shard's counters and gauges.
#[derive(Debug, Default)]
pub struct ShardStats {
    /// Open connections by role (after hello), indexed like `Role::ALL`.
    pub conns_by_role: [AtomicU64; 4],
    /// Connections accepted and not yet past hello.
    pub conns_pending: AtomicU64,
    pub frames_in: AtomicU64,
    /// MQTT CONNECTs accepted.
    pub mqtt_connects: AtomicU64,
    /// MQTT PUBLISH (and wills) received from clients.
    pub mqtt_publishes_in: AtomicU64,
    /// MQTT PUBLISH sent (or queued) to sessions.
    pub mqtt_publishes_out: AtomicU64,
    /// Retained messages held (a gauge; every shard holds them all).
    pub mqtt_retained: AtomicU64,
    /// MQTT packets received, by packet type (the fixed header's high nibble).
    pub mqtt_packets_in: [AtomicU64; 16],
    pub frames_out: AtomicU64,
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
    /// Frames dropped, indexed by `DropReason as usize`.
    pub drops: [AtomicU64; DropReason::COUNT],
    /// Frames sent to another shard over the mesh.
    pub cross_frames: AtomicU64,
    /// Connections handed to their owner shard after hello.
    pub handovers: AtomicU64,
    /// Bytes waiting in outbound queues, sampled by the shard's sweeper.
    pub queue_bytes: AtomicU64,
    /// Client sockets the shard's I/O loop holds (entries of its I/O table).
    pub sockets: AtomicU64,
    pub accepted_total: AtomicU64,
    pub closed_total: AtomicU64,
    /// Hellos refused with `busy` by `[admission]`.
    pub hellos_deferred: AtomicU64,
    /// TLS connections closed for a TLS error (a bad record, a refused handshake).
    pub tls_errors: AtomicU64,
    /// TLS connections closed because their handshake outlived its deadline.
    pub tls_handshake_timeouts: AtomicU64,
    /// io_uring: receives the kernel ended because the provided-buffer ring
    /// was empty (each is armed again once buffers are back).
    pub uring_enobufs: AtomicU64,
    /// 1 when `[shards] io = "uring"` was asked for and this shard could not
    /// make its ring, so it runs on epoll (a gauge).
    pub uring_fallbacks: AtomicU64,
    /// Waits the epoll loop took on its sockets itself, input being steady
    /// (`[shards] slice_us`), rather than sleeping through the executor.
    pub busy_waits: AtomicU64,
    /// Those waits ended early for work queued elsewhere (a peer's batch,
    /// another node's frames, a rule's action, an HTTP request).
    pub kicked_waits: AtomicU64,
}

impl ShardStats {
    pub fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Relaxed);
    }
    pub fn dropped(&self, why: DropReason) {
        self.drops[why as usize].fetch_add(1, Relaxed);
    }
    /// Adds the drops a connection counted (`Connection::take_drops`).
    pub fn input_drops(&self, counts: [u16; DropReason::COUNT]) {
        for (c, n) in self.drops.iter().zip(counts) {
            if n > 0 {
                c.fetch_add(u64::from(n), Relaxed);
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
