//! `/metrics` in the Prometheus text exposition format, from every shard's
//! counters and the process's own RSS and CPU time (read from /proc).

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use relay_core::conn::Role;
use relay_core::procstat;

use crate::stats::{DropReason, ShardStats};

/// Resident set size and CPU seconds (user + system) of this process.
pub fn process_usage() -> (u64, f64) {
    let page = 4096u64;
    let rss = std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| procstat::resident_pages(&s))
        .map_or(0, |pages| pages * page);
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    let cpu = std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| procstat::cpu_ticks(&s))
        .map_or(0.0, |t| procstat::ticks_to_us(t, ticks) as f64 / 1e6);
    (rss, cpu)
}

/// MQTT packet type names by the fixed header's high nibble.
const MQTT_TYPES: [&str; 16] = [
    "",
    "connect",
    "connack",
    "publish",
    "puback",
    "pubrec",
    "pubrel",
    "pubcomp",
    "subscribe",
    "suback",
    "unsubscribe",
    "unsuback",
    "pingreq",
    "pingresp",
    "disconnect",
    "auth",
];

/// Renders all metrics. `extra` holds (name, help, value) of other parts
/// (the rules engine).
pub fn render(stats: &[Arc<ShardStats>], uptime_s: f64, extra: &[(&str, &str, u64)]) -> String {
    let mut out = String::with_capacity(4096);
    let mut family = |name: &str, kind: &str, help: &str| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    };
    family(
        "relay_connections",
        "gauge",
        "Open connections by role and shard (pending: before hello).",
    );
    let mut lines = String::new();
    for (i, s) in stats.iter().enumerate() {
        for (r, role) in Role::ALL.iter().enumerate() {
            let _ = writeln!(
                lines,
                "relay_connections{{role=\"{}\",shard=\"{i}\"}} {}",
                role.name(),
                s.conns_by_role[r].load(Relaxed)
            );
        }
        let _ = writeln!(
            lines,
            "relay_connections{{role=\"pending\",shard=\"{i}\"}} {}",
            s.conns_pending.load(Relaxed)
        );
    }
    out.push_str(&lines);
    type Counter = (&'static str, &'static str, fn(&ShardStats) -> u64);
    let counters: [Counter; 14] = [
        (
            "relay_frames_in_total",
            "Frames received from clients.",
            |s| s.frames_in.load(Relaxed),
        ),
        ("relay_frames_out_total", "Frames queued to clients.", |s| {
            s.frames_out.load(Relaxed)
        }),
        (
            "relay_bytes_in_total",
            "Bytes read from client sockets.",
            |s| s.bytes_in.load(Relaxed),
        ),
        (
            "relay_bytes_out_total",
            "Bytes written to client sockets.",
            |s| s.bytes_out.load(Relaxed),
        ),
        (
            "relay_cross_shard_frames_total",
            "Frames forwarded to another shard.",
            |s| s.cross_frames.load(Relaxed),
        ),
        (
            "relay_handovers_total",
            "Connections handed to their owner shard after hello.",
            |s| s.handovers.load(Relaxed),
        ),
        ("relay_accepted_total", "Connections accepted.", |s| {
            s.accepted_total.load(Relaxed)
        }),
        (
            "relay_admission_deferred_total",
            "Hellos refused with busy and a retry_after_ms by [admission].",
            |s| s.hellos_deferred.load(Relaxed),
        ),
        ("relay_closed_total", "Connections closed.", |s| {
            s.closed_total.load(Relaxed)
        }),
        (
            "relay_busy_waits_total",
            "Waits the shard's epoll loop took on its sockets itself while input was steady ([shards] slice_us).",
            |s| s.busy_waits.load(Relaxed),
        ),
        (
            "relay_busy_waits_kicked_total",
            "Of those waits, the ones ended early for work queued elsewhere: another shard's batch, frames from another node, a rule's action, an HTTP request.",
            |s| s.kicked_waits.load(Relaxed),
        ),
        (
            "relay_uring_enobufs_total",
            "Receives ended because the shard's io_uring buffer ring ran dry (armed again at once).",
            |s| s.uring_enobufs.load(Relaxed),
        ),
        (
            "relay_tls_errors_total",
            "TLS connections closed for a TLS error.",
            |s| s.tls_errors.load(Relaxed),
        ),
        (
            "relay_tls_handshake_timeouts_total",
            "TLS connections closed because the handshake did not finish in time.",
            |s| s.tls_handshake_timeouts.load(Relaxed),
        ),
    ];
    let mut lines = String::new();
    for (name, help, get) in counters {
        let _ = writeln!(lines, "# HELP {name} {help}\n# TYPE {name} counter");
        for (i, s) in stats.iter().enumerate() {
            let _ = writeln!(lines, "{name}{{shard=\"{i}\"}} {}", get(s));
        }
    }
    out.push_str(&lines);
    let _ = writeln!(
        out,
        "# HELP relay_mqtt_packets_in_total MQTT packets received from clients, by packet type.\n# TYPE relay_mqtt_packets_in_total counter"
    );
    for (i, s) in stats.iter().enumerate() {
        for (t, name) in MQTT_TYPES.iter().enumerate() {
            if !name.is_empty() {
                let _ = writeln!(
                    out,
                    "relay_mqtt_packets_in_total{{type=\"{name}\",shard=\"{i}\"}} {}",
                    s.mqtt_packets_in[t].load(Relaxed)
                );
            }
        }
    }
    type Family = (
        &'static str,
        &'static str,
        &'static str,
        fn(&ShardStats) -> u64,
    );
    let per_shard: [Family; 7] = [
        (
            "relay_mqtt_connects_total",
            "counter",
            "MQTT CONNECTs accepted.",
            |s| s.mqtt_connects.load(Relaxed),
        ),
        (
            "relay_mqtt_publishes_in_total",
            "counter",
            "MQTT PUBLISH and wills received from clients.",
            |s| s.mqtt_publishes_in.load(Relaxed),
        ),
        (
            "relay_mqtt_publishes_out_total",
            "counter",
            "MQTT PUBLISH sent or queued to sessions.",
            |s| s.mqtt_publishes_out.load(Relaxed),
        ),
        (
            "relay_mqtt_retained",
            "gauge",
            "Retained MQTT messages held (every shard holds them all).",
            |s| s.mqtt_retained.load(Relaxed),
        ),
        (
            "relay_queue_bytes",
            "gauge",
            "Bytes waiting in outbound queues.",
            |s| s.queue_bytes.load(Relaxed),
        ),
        (
            "relay_sockets",
            "gauge",
            "Client sockets held by the shard's I/O loop.",
            |s| s.sockets.load(Relaxed),
        ),
        (
            "relay_uring_fallback",
            "gauge",
            "1 when the shard was to use io_uring but could not make its ring and uses epoll.",
            |s| s.uring_fallbacks.load(Relaxed),
        ),
    ];
    for (name, kind, help, get) in per_shard {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (i, s) in stats.iter().enumerate() {
            let _ = writeln!(out, "{name}{{shard=\"{i}\"}} {}", get(s));
        }
    }
    let _ = writeln!(
        out,
        "# HELP relay_dropped_frames_total Frames not delivered, by reason.\n# TYPE relay_dropped_frames_total counter"
    );
    for d in DropReason::ALL {
        let n: u64 = stats
            .iter()
            .map(|s| s.drops[d as usize].load(Relaxed))
            .sum();
        let _ = writeln!(
            out,
            "relay_dropped_frames_total{{reason=\"{}\"}} {n}",
            d.name()
        );
    }
    let (rss, cpu) = process_usage();
    let _ = writeln!(
        out,
        "# HELP process_resident_memory_bytes Resident memory size in bytes.\n# TYPE process_resident_memory_bytes gauge\nprocess_resident_memory_bytes {rss}"
    );
    let _ = writeln!(
        out,
        "# HELP process_cpu_seconds_total User and system CPU time spent in seconds.\n# TYPE process_cpu_seconds_total counter\nprocess_cpu_seconds_total {cpu}"
    );
    let _ = writeln!(
        out,
        "# HELP relay_uptime_seconds Time since the relay started.\n# TYPE relay_uptime_seconds gauge\nrelay_uptime_seconds {uptime_s}"
    );
    for (name, help, v) in extra {
        let kind = if name.ends_with("_total") {
            "counter"
        } else {
            "gauge"
        };
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}"
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_family_with_help_and_type() {
        let s = Arc::new(ShardStats::default());
        s.frames_in.store(7, Relaxed);
        s.sockets.store(3, Relaxed);
        s.dropped(DropReason::NoRoute);
        let extra = [
            ("relay_rules_errors_total", "Script errors.", 3),
            ("relay_alarms_active", "Alarms.", 2),
        ];
        let text = render(&[s.clone(), Arc::new(ShardStats::default())], 1.5, &extra);
        assert!(text.contains("# TYPE relay_alarms_active gauge\n"));
        assert!(text.contains("# TYPE relay_rules_errors_total counter\n"));
        assert!(text.contains("relay_frames_in_total{shard=\"0\"} 7\n"));
        assert!(text.contains("relay_frames_in_total{shard=\"1\"} 0\n"));
        assert!(text.contains("relay_sockets{shard=\"0\"} 3\n"));
        assert!(text.contains("relay_dropped_frames_total{reason=\"no_route\"} 1\n"));
        assert!(text.contains("relay_connections{role=\"controller\",shard=\"0\"} 0\n"));
        assert!(text.contains("relay_rules_errors_total 3\n"));
        // Every sample line belongs to a family announced with TYPE.
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let name = line.split(['{', ' ']).next().unwrap();
            assert!(
                text.contains(&format!("# TYPE {name} ")),
                "{name} has no TYPE"
            );
        }
        let (rss, _) = process_usage();
        assert!(rss > 0);
    }
}
