//! The server's cost, read from /proc: CPU time (utime + stime) and resident memory
//! of a pid (the text parsed by `relay_core::procstat`), and the pid found from the
//! port it listens on (/proc/net/tcp{,6} gives the listening socket's inode,
//! /proc/<pid>/fd links name it).

use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// One reading of a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcSample {
    /// When, ns of CLOCK_MONOTONIC.
    pub t_ns: u64,
    /// User + system CPU time so far, µs.
    pub cpu_us: u64,
    /// Resident set size, bytes.
    pub rss_bytes: u64,
}

/// Why /proc could not be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProcError {
    #[error("cannot read {path}: {source}")]
    Read { path: String, source: io::Error },
    #[error("{path} has an unexpected format")]
    Format { path: String },
}

fn read(path: &str) -> Result<String, ProcError> {
    std::fs::read_to_string(path).map_err(|source| ProcError::Read {
        path: path.to_string(),
        source,
    })
}

fn sysconf(name: libc::c_int, fallback: u64) -> u64 {
    // SAFETY: sysconf has no memory effects.
    let v = unsafe { libc::sysconf(name) };
    if v > 0 { v as u64 } else { fallback }
}

/// Reads CPU time and RSS of `pid` now.
pub fn sample(pid: u32) -> Result<ProcSample, ProcError> {
    let t_ns = crate::clock::mono_ns();
    let stat_path = format!("/proc/{pid}/stat");
    let stat = read(&stat_path)?;
    let ticks =
        relay_core::procstat::cpu_ticks(&stat).ok_or(ProcError::Format { path: stat_path })?;
    let cpu_us = relay_core::procstat::ticks_to_us(ticks, sysconf(libc::_SC_CLK_TCK, 100));
    let statm_path = format!("/proc/{pid}/statm");
    let statm = read(&statm_path)?;
    let resident = relay_core::procstat::resident_pages(&statm)
        .ok_or(ProcError::Format { path: statm_path })?;
    let rss_bytes = resident * sysconf(libc::_SC_PAGESIZE, 4096);
    Ok(ProcSample {
        t_ns,
        cpu_us,
        rss_bytes,
    })
}

/// Inodes of sockets listening on `port` in one /proc/net/tcp-format table.
pub fn listening_inodes(table: &str, port: u16) -> Vec<u64> {
    let mut out = Vec::new();
    for line in table.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 10 || f[3] != "0A" {
            continue;
        }
        let Some((_, p)) = f[1].rsplit_once(':') else {
            continue;
        };
        if u16::from_str_radix(p, 16) == Ok(port)
            && let Ok(inode) = f[9].parse::<u64>()
            && inode != 0
        {
            out.push(inode);
        }
    }
    out
}

/// Pids of processes holding a socket that listens on TCP `port`.
pub fn pids_listening_on(port: u16) -> Vec<u32> {
    let mut inodes = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        if let Ok(t) = std::fs::read_to_string(table) {
            inodes.extend(listening_inodes(&t, port));
        }
    }
    if inodes.is_empty() {
        return Vec::new();
    }
    let wanted: Vec<String> = inodes.iter().map(|i| format!("socket:[{i}]")).collect();
    let mut pids = Vec::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return pids;
    };
    for entry in procs.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(Path::new("/proc").join(pid.to_string()).join("fd")) else {
            continue;
        };
        let holds = fds.flatten().any(|fd| {
            std::fs::read_link(fd.path())
                .ok()
                .and_then(|l| l.to_str().map(|s| wanted.iter().any(|w| w == s)))
                .unwrap_or(false)
        });
        if holds {
            pids.push(pid);
        }
    }
    pids
}

/// Samples a process on a background thread until stopped.
#[derive(Debug)]
pub struct Sampler {
    /// The sampled pid.
    pub pid: u32,
    /// Readings so far.
    samples: Arc<Mutex<Vec<ProcSample>>>,
    /// Tells the thread to stop.
    stop: Arc<AtomicBool>,
    /// The sampling thread.
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Sampler {
    /// Starts sampling `pid` every `interval` (fails if the pid cannot be read now).
    pub fn start(pid: u32, interval: Duration) -> Result<Self, ProcError> {
        let first = sample(pid)?;
        let samples = Arc::new(Mutex::new(vec![first]));
        let stop = Arc::new(AtomicBool::new(false));
        let (s2, stop2) = (samples.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name("procstat".into())
            .spawn(move || {
                while !stop2.load(Ordering::Relaxed) {
                    std::thread::sleep(interval);
                    match sample(pid) {
                        Ok(x) => s2.lock().unwrap_or_else(|p| p.into_inner()).push(x),
                        Err(_) => break, // the process is gone
                    }
                }
            })
            .map_err(|source| ProcError::Read {
                path: "sampler thread".into(),
                source,
            })?;
        Ok(Self {
            pid,
            samples,
            stop,
            thread: Some(thread),
        })
    }

    /// Takes a reading now and keeps it with the others.
    pub fn mark(&self) -> Option<ProcSample> {
        let s = sample(self.pid).ok()?;
        self.samples
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(s);
        Some(s)
    }

    /// All readings so far, in time order.
    pub fn samples(&self) -> Vec<ProcSample> {
        let mut v = self
            .samples
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        v.sort_by_key(|s| s.t_ns);
        v
    }

    /// Stops the thread and returns every reading.
    pub fn stop(mut self) -> Vec<ProcSample> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.samples()
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process_cpu_grows_and_rss_is_positive() {
        let me = std::process::id();
        let a = sample(me).unwrap();
        let start = std::time::Instant::now();
        let mut x = 0u64;
        while start.elapsed() < Duration::from_millis(60) {
            x = x.wrapping_mul(31).wrapping_add(7);
        }
        std::hint::black_box(x);
        let b = sample(me).unwrap();
        assert!(b.cpu_us > a.cpu_us, "{a:?} {b:?}");
        assert!(b.rss_bytes > 1_000_000);
        assert!(b.t_ns > a.t_ns);
    }

    #[test]
    fn the_listening_process_is_found_by_port() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        assert!(pids_listening_on(port).contains(&std::process::id()));
        drop(l);
        assert!(!pids_listening_on(port).contains(&std::process::id()));
    }

    #[test]
    fn only_listening_rows_of_the_table_count() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
   0: 0100007F:1B58 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4242 1 0 100 0 0 10 0\n\
   1: 0100007F:1B58 0100007F:D431 01 00000000:00000000 00:00000000 00000000     0        0 4343 1 0 100 0 0 10 0\n";
        assert_eq!(listening_inodes(table, 7000), vec![4242]);
        assert!(listening_inodes(table, 7001).is_empty());
    }

    #[test]
    fn sampler_collects_until_stopped() {
        let s = Sampler::start(std::process::id(), Duration::from_millis(10)).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        assert!(s.mark().is_some());
        let v = s.stop();
        assert!(v.len() >= 3, "{}", v.len());
        assert!(v.windows(2).all(|w| w[0].t_ns <= w[1].t_ns));
        assert!(sample(u32::MAX).is_err());
    }
}
