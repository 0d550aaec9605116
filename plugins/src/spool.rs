//! The on-disk spool of one sink: an append-only log of writes the sink could not
//! take yet, replayed in order once it is back.
//!
//! Files in `[plugins] spool_dir`, per sink `NAME`:
//! - `NAME.log`: records `len u32 LE | crc32 u32 LE | seq u64 LE | payload`, where the
//!   crc covers seq and payload. A torn record at the end (crash mid-append) is cut off;
//!   from a whole record that fails its crc on, the bytes are moved to
//!   `NAME.log.damaged-<unix ms>` instead (damage, not a crash: good writes may follow).
//! - `NAME.head`: offset (u64 LE) of the first record not yet replayed. When every record
//!   is replayed both files are reset to empty.
//! - `NAME.seq`: the highest sequence number reserved so far. Numbers are reserved in
//!   blocks, so each write keeps a unique, increasing `seq` across restarts; the sinks use
//!   it to apply a replayed write exactly once.
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use relay_config::plugins::SpoolFsync;

/// Header bytes before a payload.
const HEADER: usize = 16;
/// Largest payload accepted (a single write is never this big; this guards the reader).
const MAX_RECORD: usize = 64 << 20;
/// Sequence numbers reserved per write of the `.seq` file.
const SEQ_BLOCK: u64 = 100_000;

/// Why a spool operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SpoolError {
    /// Disk error.
    #[error("spool {0}: {1}")]
    Io(String, #[source] io::Error),
    /// `spool_max_bytes` reached.
    #[error("spool {0} is full ({1} bytes)")]
    Full(String, u64),
}

/// Why there is no record at an offset of the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    /// Fewer bytes than a whole record: the end, or a record torn by a crash
    /// mid-append.
    Short,
    /// A whole record that fails its checksum, or an impossible length.
    Damaged,
}

/// One record read back from the spool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Sequence number given when it was written.
    pub seq: u64,
    /// The serialized write.
    pub payload: Vec<u8>,
    /// Offset just past this record (what `advance` takes).
    pub end: u64,
}

/// The spool of one sink.
#[derive(Debug)]
pub struct Spool {
    /// Sink name, used in file names and errors.
    name: String,
    /// The log, opened for append and reads.
    log: File,
    /// Path of the head file.
    head_path: PathBuf,
    /// Path of the seq file.
    seq_path: PathBuf,
    /// Offset of the first record not yet replayed.
    head: u64,
    /// Length of the valid log.
    len: u64,
    /// Next sequence number to give.
    next_seq: u64,
    /// Sequence numbers below this are reserved on disk.
    reserved: u64,
    /// When appends are forced to disk.
    fsync: SpoolFsync,
    /// Cap on the log length.
    max_bytes: u64,
    /// Appends since the last fsync (for `Batch`).
    dirty: bool,
}

fn io_err(name: &str) -> impl Fn(io::Error) -> SpoolError + '_ {
    move |e| SpoolError::Io(name.to_string(), e)
}

fn read_u64(path: &Path) -> io::Result<Option<u64>> {
    match std::fs::read(path) {
        Ok(b) if b.len() == 8 => Ok(Some(u64::from_le_bytes(b.try_into().unwrap_or([0; 8])))),
        Ok(_) => Ok(None),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Writes `v` to `path` through a temporary file and a rename, so a crash leaves
/// either the old or the new value.
fn write_u64(path: &Path, v: u64, sync: bool) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = File::create(&tmp)?;
    f.write_all(&v.to_le_bytes())?;
    if sync {
        f.sync_data()?;
    }
    std::fs::rename(&tmp, path)
}

fn checksum(seq: u64, payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&seq.to_le_bytes());
    h.update(payload);
    h.finalize()
}

impl Spool {
    /// Opens (or creates) the spool `name` in `dir`, cutting off a torn last record.
    pub fn open(
        dir: &Path,
        name: &str,
        fsync: SpoolFsync,
        max_bytes: u64,
    ) -> Result<Spool, SpoolError> {
        let e = io_err(name);
        std::fs::create_dir_all(dir).map_err(&e)?;
        let log_path = dir.join(format!("{name}.log"));
        let head_path = dir.join(format!("{name}.head"));
        let seq_path = dir.join(format!("{name}.seq"));
        let mut log = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(&log_path)
            .map_err(&e)?;
        let file_len = log.metadata().map_err(&e)?.len();
        let mut head = read_u64(&head_path).map_err(&e)?.unwrap_or(0).min(file_len);
        // Walk the records from the head to find the valid end.
        let mut len = head;
        let stop = loop {
            match Self::read_at(&mut log, len, file_len) {
                Ok(Ok(r)) => len = r.end,
                Ok(Err(stop)) => break stop,
                // Unreadable: keep the bytes rather than cut them.
                Err(_) => break Stop::Damaged,
            }
        };
        if len < file_len {
            if stop == Stop::Short {
                tracing::warn!(
                    spool = name,
                    cut = file_len - len,
                    "spool had a torn record at its end; cut it off"
                );
            } else {
                // A whole record that fails its checksum (or an impossible
                // length) is damage, not a crash mid-append: what follows it
                // may be good writes. They are kept aside, not destroyed.
                let kept = Self::keep_aside(&mut log, dir, name, len, file_len).map_err(&e)?;
                tracing::error!(
                    spool = name,
                    bytes = file_len - len,
                    kept = %kept.display(),
                    "spool is damaged at offset {len}: the records from there on are not \
                     replayed and were moved to the file named here"
                );
            }
            log.set_len(len).map_err(&e)?;
        }
        if head == len && len > 0 {
            log.set_len(0).map_err(&e)?;
            head = 0;
            len = 0;
            write_u64(&head_path, 0, true).map_err(&e)?;
        }
        let reserved = read_u64(&seq_path).map_err(&e)?.unwrap_or(0);
        Ok(Spool {
            name: name.to_string(),
            log,
            head_path,
            seq_path,
            head,
            len,
            next_seq: reserved + 1,
            reserved: reserved + 1,
            fsync,
            max_bytes,
            dirty: false,
        })
    }

    /// Copies the log's bytes from `at` to its end into a new file next to
    /// it, `NAME.log.damaged-<unix ms>`; returns its path.
    fn keep_aside(
        log: &mut File,
        dir: &Path,
        name: &str,
        at: u64,
        file_len: u64,
    ) -> io::Result<PathBuf> {
        let ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis());
        let path = dir.join(format!("{name}.log.damaged-{ms}"));
        let mut out = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)?;
        log.seek(SeekFrom::Start(at))?;
        io::copy(&mut log.take(file_len - at), &mut out)?;
        out.sync_all()?;
        Ok(path)
    }

    /// The record at `at`, or why there is none there.
    fn read_at(log: &mut File, at: u64, file_len: u64) -> io::Result<Result<Record, Stop>> {
        if at + HEADER as u64 > file_len {
            return Ok(Err(Stop::Short));
        }
        log.seek(SeekFrom::Start(at))?;
        let mut h = [0u8; HEADER];
        log.read_exact(&mut h)?;
        let len = u32::from_le_bytes([h[0], h[1], h[2], h[3]]) as usize;
        let crc = u32::from_le_bytes([h[4], h[5], h[6], h[7]]);
        let seq = u64::from_le_bytes([h[8], h[9], h[10], h[11], h[12], h[13], h[14], h[15]]);
        if len > MAX_RECORD {
            return Ok(Err(Stop::Damaged));
        }
        let end = at + (HEADER + len) as u64;
        if end > file_len {
            return Ok(Err(Stop::Short));
        }
        let mut payload = vec![0u8; len];
        log.read_exact(&mut payload)?;
        if checksum(seq, &payload) != crc {
            return Ok(Err(Stop::Damaged));
        }
        Ok(Ok(Record { seq, payload, end }))
    }

    /// The next sequence number (unique and increasing across restarts).
    pub fn next_seq(&mut self) -> Result<u64, SpoolError> {
        if self.next_seq >= self.reserved {
            let upto = self.next_seq + SEQ_BLOCK;
            write_u64(&self.seq_path, upto, true).map_err(io_err(&self.name))?;
            self.reserved = upto;
        }
        let s = self.next_seq;
        self.next_seq += 1;
        Ok(s)
    }

    /// Whether records wait for replay.
    pub fn is_empty(&self) -> bool {
        self.head >= self.len
    }

    /// Bytes waiting for replay.
    pub fn pending_bytes(&self) -> u64 {
        self.len - self.head
    }

    /// Appends one record.
    pub fn append(&mut self, seq: u64, payload: &[u8]) -> Result<(), SpoolError> {
        let size = (HEADER + payload.len()) as u64;
        if self.len + size > self.max_bytes {
            return Err(SpoolError::Full(self.name.clone(), self.max_bytes));
        }
        let mut buf = Vec::with_capacity(size as usize);
        buf.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        buf.extend_from_slice(&checksum(seq, payload).to_le_bytes());
        buf.extend_from_slice(&seq.to_le_bytes());
        buf.extend_from_slice(payload);
        let e = io_err(&self.name);
        self.log.write_all(&buf).map_err(&e)?;
        self.len += size;
        match self.fsync {
            SpoolFsync::Always => self.log.sync_data().map_err(&e)?,
            _ => self.dirty = true,
        }
        Ok(())
    }

    /// Forces pending appends to disk (the `batch` policy calls this after each batch).
    pub fn sync(&mut self) -> Result<(), SpoolError> {
        if self.dirty && self.fsync != SpoolFsync::Never {
            self.log.sync_data().map_err(io_err(&self.name))?;
        }
        self.dirty = false;
        Ok(())
    }

    /// Up to `max` records from the head, oldest first.
    pub fn peek(&mut self, max: usize) -> Result<Vec<Record>, SpoolError> {
        let e = io_err(&self.name);
        let mut out = Vec::new();
        let mut at = self.head;
        while out.len() < max {
            match Self::read_at(&mut self.log, at, self.len).map_err(&e)? {
                Ok(r) => {
                    at = r.end;
                    out.push(r);
                }
                Err(_) => break,
            }
        }
        Ok(out)
    }

    /// Marks every record before `end` as replayed.
    pub fn advance(&mut self, end: u64) -> Result<(), SpoolError> {
        self.head = end.min(self.len);
        let sync = self.fsync != SpoolFsync::Never;
        if self.head == self.len {
            self.sync()?;
        }
        let e = io_err(&self.name);
        if self.head == self.len {
            self.log.set_len(0).map_err(&e)?;
            self.head = 0;
            self.len = 0;
        }
        write_u64(&self.head_path, self.head, sync).map_err(&e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("relay-spool-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn replays_in_order_across_reopen() {
        let d = dir("order");
        let mut s = Spool::open(&d, "t", SpoolFsync::Batch, 1 << 20).unwrap();
        for i in 0..10u64 {
            let seq = s.next_seq().unwrap();
            s.append(seq, format!("w{i}").as_bytes()).unwrap();
        }
        s.sync().unwrap();
        let first = s.peek(3).unwrap();
        s.advance(first[2].end).unwrap();
        drop(s);
        let mut s = Spool::open(&d, "t", SpoolFsync::Batch, 1 << 20).unwrap();
        let rest = s.peek(100).unwrap();
        let texts: Vec<String> = rest
            .iter()
            .map(|r| String::from_utf8(r.payload.clone()).unwrap())
            .collect();
        assert_eq!(texts, (3..10).map(|i| format!("w{i}")).collect::<Vec<_>>());
        assert!(rest.windows(2).all(|w| w[0].seq < w[1].seq));
        // New numbers never repeat old ones.
        let seq = s.next_seq().unwrap();
        assert!(seq > rest.last().unwrap().seq);
        s.advance(rest.last().unwrap().end).unwrap();
        assert!(s.is_empty());
        assert_eq!(
            std::fs::metadata(d.join("t.log")).unwrap().len(),
            0,
            "drained spool is reset"
        );
    }

    #[test]
    fn torn_tail_is_cut() {
        let d = dir("torn");
        let mut s = Spool::open(&d, "t", SpoolFsync::Always, 1 << 20).unwrap();
        s.append(1, b"good").unwrap();
        s.append(2, b"also good").unwrap();
        drop(s);
        let path = d.join("t.log");
        let len = std::fs::metadata(&path).unwrap().len();
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.set_len(len - 3).unwrap();
        let mut s = Spool::open(&d, "t", SpoolFsync::Always, 1 << 20).unwrap();
        let r = s.peek(10).unwrap();
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].payload, b"good");
        s.append(3, b"after").unwrap();
        assert_eq!(s.peek(10).unwrap().len(), 2);
        let names: Vec<_> = std::fs::read_dir(&d)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(!names.iter().any(|n| n.contains("damaged")), "{names:?}");
    }

    /// A record that fails its checksum in the middle of the log is damage:
    /// the records from it on are not replayed, but kept in a file of their
    /// own rather than cut off. A torn tail leaves no such file.
    #[test]
    fn damaged_records_are_kept_aside_not_destroyed() {
        let d = dir("damaged");
        let mut s = Spool::open(&d, "t", SpoolFsync::Always, 1 << 20).unwrap();
        s.append(1, b"first").unwrap();
        let second_at = s.peek(10).unwrap()[0].end;
        s.append(2, b"second").unwrap();
        s.append(3, b"third").unwrap();
        drop(s);
        let path = d.join("t.log");
        let mut bytes = std::fs::read(&path).unwrap();
        // One bit of the second record's payload flips.
        bytes[second_at as usize + HEADER] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        let mut s = Spool::open(&d, "t", SpoolFsync::Always, 1 << 20).unwrap();
        let r = s.peek(10).unwrap();
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].payload, b"first");
        let kept: Vec<_> = std::fs::read_dir(&d)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.to_string_lossy().contains("t.log.damaged-"))
            .collect();
        assert_eq!(kept.len(), 1, "{kept:?}");
        assert_eq!(
            std::fs::read(&kept[0]).unwrap(),
            bytes[second_at as usize..]
        );
        // The spool goes on after the good records.
        s.append(4, b"after").unwrap();
        assert_eq!(s.peek(10).unwrap().len(), 2);
    }

    #[test]
    fn full_spool_refuses() {
        let d = dir("full");
        let mut s = Spool::open(&d, "t", SpoolFsync::Never, 64).unwrap();
        s.append(1, &[0u8; 30]).unwrap();
        assert!(matches!(s.append(2, &[0u8; 30]), Err(SpoolError::Full(..))));
    }
}
