//! The machine limits that cap a fleet, and the plan that works within them:
//! open files per process (the hard limit cannot be raised, so the fleet is split
//! over worker processes) and ephemeral ports per source address and destination
//! (so connections come from several 127.0.0.x addresses). Every cap that shrinks a
//! run is said in a note that reaches the report.

use std::io;
use std::net::Ipv4Addr;

use crate::report::{LimitKind, Note};

/// The open-file limit of this process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NoFile {
    /// Current (soft) limit.
    pub soft: u64,
    /// Ceiling the soft limit can be raised to without privileges beyond ours.
    pub hard: u64,
}

/// Reads RLIMIT_NOFILE.
pub fn nofile() -> io::Result<NoFile> {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `r` is a valid, writable rlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(NoFile {
        soft: r.rlim_cur,
        hard: r.rlim_max,
    })
}

/// Raises the soft open-file limit to the hard limit and returns the result.
pub fn raise_nofile() -> io::Result<NoFile> {
    let cur = nofile()?;
    if cur.soft < cur.hard {
        let r = libc::rlimit {
            rlim_cur: cur.hard,
            rlim_max: cur.hard,
        };
        // SAFETY: `r` is a valid rlimit; raising soft up to hard needs no privilege.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &r) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    nofile()
}

/// The kernel's ephemeral port range (`/proc/sys/net/ipv4/ip_local_port_range`).
pub fn port_range() -> (u16, u16) {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| {
            let mut it = s.split_whitespace().map(|x| x.parse::<u16>().ok());
            Some((it.next()??, it.next()??))
        })
        .filter(|(lo, hi)| lo <= hi)
        .unwrap_or((32768, 60999))
}

/// How many worker processes a fleet needs and how many connections each may hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerPlan {
    /// Worker processes to start.
    pub workers: u32,
    /// Connections one process can hold: open-file hard limit minus the reserve.
    pub per_process: u64,
    /// Connections the run will open (less than asked when a limit caps it).
    pub connections: u64,
    /// What limited the plan, in words for the report.
    pub notes: Vec<Note>,
}

/// Plans workers for `connections` under an open-file hard limit of `hard`, keeping
/// `reserve` files free per process. `requested` 0 picks the fewest that fit.
pub fn plan_workers(connections: u64, requested: u32, hard: u64, reserve: u64) -> WorkerPlan {
    let per_process = hard.saturating_sub(reserve).max(1);
    let needed = connections.div_ceil(per_process).max(1);
    let mut notes = Vec::new();
    let workers = if requested == 0 {
        if needed > 1 {
            notes.push(Note::info(format!(
                "the open-file limit ({hard} per process, {reserve} kept free) holds {per_process} connections per process: the fleet of {connections} is split over {needed} worker processes"
            )));
        }
        needed.min(u32::MAX as u64) as u32
    } else {
        requested
    };
    let capacity = per_process.saturating_mul(workers as u64);
    let opened = connections.min(capacity);
    if opened < connections {
        notes.push(Note::limit(
            LimitKind::OpenFiles,
            format!(
                "the open-file limit ({hard} per process) caps this run at {opened} of {connections} connections with {workers} worker(s); use --workers {needed} or more"
            ),
        ));
    }
    WorkerPlan {
        workers,
        per_process,
        connections: opened,
        notes,
    }
}

/// Source addresses for `per_destination` connections to one server port, each source
/// address having `ports` ephemeral ports. `requested` empty: 127.0.0.1, extended to
/// 127.0.0.2.. when one address is not enough and the server is on loopback.
pub fn plan_sources(
    requested: &[Ipv4Addr],
    per_destination: u64,
    ports: u64,
    server_on_loopback: bool,
) -> (Vec<Ipv4Addr>, Vec<Note>) {
    let ports = ports.max(1);
    let needed = per_destination.div_ceil(ports).max(1);
    let mut notes = Vec::new();
    let sources: Vec<Ipv4Addr> = if !requested.is_empty() {
        requested.to_vec()
    } else if needed > 1 && server_on_loopback {
        let n = needed.min(250) as u8;
        notes.push(Note::info(format!(
            "{per_destination} connections to one server port need {needed} source addresses ({ports} ephemeral ports each): connecting from 127.0.0.1..127.0.0.{n}"
        )));
        (1..=n).map(|i| Ipv4Addr::new(127, 0, 0, i)).collect()
    } else {
        vec![Ipv4Addr::LOCALHOST]
    };
    let capacity = sources.len() as u64 * ports;
    if capacity < per_destination {
        notes.push(Note::limit(
            LimitKind::Ports,
            format!(
                "{} source address(es) × {ports} ephemeral ports hold {capacity} connections to one server port, fewer than the {per_destination} planned; connects beyond that fail as source_ports_exhausted (give more with --source-addrs)",
                sources.len()
            ),
        ));
    }
    (sources, notes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raising_reaches_the_hard_limit() {
        let n = raise_nofile().unwrap();
        assert_eq!(n.soft, n.hard);
        assert_eq!(nofile().unwrap(), n);
    }

    #[test]
    fn port_range_is_sane() {
        let (lo, hi) = port_range();
        assert!(lo > 0 && lo <= hi);
    }

    #[test]
    fn small_fleets_use_one_process() {
        let p = plan_workers(1000, 0, 20_000, 256);
        assert_eq!((p.workers, p.connections), (1, 1000));
        assert!(p.notes.is_empty());
    }

    #[test]
    fn large_fleets_split_over_processes_and_say_so() {
        let p = plan_workers(50_000, 0, 20_000, 256);
        assert_eq!(p.per_process, 19_744);
        assert_eq!(p.workers, 3);
        assert_eq!(p.connections, 50_000);
        assert!(
            p.notes[0].text.contains("3 worker processes"),
            "{:?}",
            p.notes
        );
        assert_eq!(p.notes[0].limit, None);
    }

    #[test]
    fn a_forced_worker_count_caps_the_run_and_says_so() {
        let p = plan_workers(50_000, 1, 20_000, 256);
        assert_eq!(p.connections, 19_744);
        assert!(
            p.notes
                .iter()
                .any(|n| n.limit == Some(LimitKind::OpenFiles) && n.text.contains("--workers 3"))
        );
    }

    #[test]
    fn sources_grow_on_loopback_only_when_needed() {
        let (s, notes) = plan_sources(&[], 1000, 28_232, true);
        assert_eq!(s, vec![Ipv4Addr::LOCALHOST]);
        assert!(notes.is_empty());
        let (s, notes) = plan_sources(&[], 60_000, 28_232, true);
        assert_eq!(s.len(), 3);
        assert_eq!(s[2], Ipv4Addr::new(127, 0, 0, 3));
        assert_eq!(notes.len(), 1);
        let (s, notes) = plan_sources(&[], 60_000, 28_232, false);
        assert_eq!(s.len(), 1);
        assert_eq!(notes[0].limit, Some(LimitKind::Ports));
        let given = [Ipv4Addr::new(127, 0, 0, 9)];
        let (s, _) = plan_sources(&given, 10, 28_232, true);
        assert_eq!(s, given.to_vec());
    }
}
