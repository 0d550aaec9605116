//! MQTT clients on the shard's I/O loop: the listener, and the parts of the
//! loop that read and write through a connection's MQTT session instead of
//! the relay protocol (`router::mqtt` holds the routing).

use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::rc::Rc;

use bytes::{Bytes, BytesMut};
use relay_core::conn::Hello;

use super::io::Entry;
use super::{Shard, now};
use crate::cell::ConnCell;
use crate::router::{MqttConn, Outcome};

/// This shard's MQTT listener (`tls`: the MQTT over TLS one), inherited
/// from the previous process on an upgrade or bound anew (SO_REUSEPORT,
/// like the controllers'), and watched.
pub(super) fn listen(
    shard: &Shard,
    addr: SocketAddr,
    tls: bool,
) -> anyhow::Result<socket2::Socket> {
    let l = super::upgrade::mqtt_listener(&shard.shared, addr, tls)
        .map_err(|e| anyhow::anyhow!("shard {}: binding MQTT {addr}: {e}", shard.router.shard))?;
    shard
        .poller
        .watch_mqtt_listener(l.as_raw_fd(), tls)
        .map_err(|e| {
            anyhow::anyhow!(
                "shard {}: watching the MQTT listener: {e}",
                shard.router.shard
            )
        })?;
    Ok(l)
}

/// Makes a freshly accepted connection an MQTT one.
pub(super) fn init(shard: &Shard, cell: &ConnCell) {
    let cfg = shard.router.cfg();
    *cell.mqtt.borrow_mut() = Some(Box::new(MqttConn::new(&cfg.mqtt.session, now())));
}

/// A connection handed over with its CONNECT: answer it here, its owner.
pub(super) fn on_attach(shard: &Rc<Shard>, cell: &Rc<ConnCell>, t: relay_core::Now) {
    let connect = cell
        .mqtt
        .borrow_mut()
        .as_mut()
        .and_then(|m| m.connect.take());
    if let Some(c) = connect {
        // The owner's shard: no second handover.
        let _ = shard.router.mqtt_connect(cell, c, t);
    }
}

/// Feeds `rbuf` to the session and routes each event; keeps what is left.
/// Returns the owner shard when the connection must move there.
pub(super) fn process_input(
    shard: &Shard,
    entry: &mut Entry<'_>,
    t: relay_core::Now,
    mut rbuf: BytesMut,
) -> Option<(usize, Hello)> {
    let token = entry.token();
    let Entry { cell, io, .. } = entry;
    let router = &shard.router;
    let mcfg = router.cfg().mqtt.clone();
    let mut moving = None;
    let mut pause = false;
    // Each turn consumes a packet or stops: bounded by `rbuf`.
    loop {
        if cell.conn.borrow().is_closing() {
            break;
        }
        let ev = {
            let mut m = cell.mqtt.borrow_mut();
            let Some(m) = m.as_mut().filter(|m| !m.detached) else {
                break;
            };
            if m.session.should_pause(&mcfg.session) {
                pause = true;
                break;
            }
            let whole = complete_packets(&rbuf, mcfg.session.max_packet_size as usize);
            let before = rbuf.len();
            let ev = m.session.handle_input(&mcfg.session, t, &mut rbuf);
            count_packets(&router.stats, &whole, before - rbuf.len());
            ev
        };
        let Some(ev) = ev else { break };
        if let Outcome::Handover { owner, hello } = router.on_mqtt_event(cell, ev, t) {
            moving = Some((owner, hello));
            break;
        }
    }
    if moving.is_none() {
        router.mqtt_poll_events(cell, t);
    }
    if pause && !io.paused {
        io.paused = true;
        if let Some(fd) = io.raw_fd() {
            let _ = shard.poller.rearm_io(fd, token, io);
        }
    }
    if !rbuf.is_empty() {
        io.part().rbuf = rbuf;
    }
    io.tidy();
    moving
}

/// Most packets looked ahead at for counting per session call.
const COUNT_AHEAD: usize = 64;

/// (end offset, packet type) of the whole packets at the head of `buf`.
fn complete_packets(buf: &[u8], max: usize) -> Vec<(usize, u8)> {
    let mut out = Vec::new();
    let mut off = 0;
    while out.len() < COUNT_AHEAD && off < buf.len() {
        match relay_core::mqtt::check(&buf[off..], max) {
            Ok(relay_core::mqtt::Check::Complete {
                header_len,
                body_len,
            }) => {
                off += header_len + body_len;
                out.push((off, buf[off - header_len - body_len] >> 4));
            }
            _ => break,
        }
    }
    out
}

/// Counts the packets among `whole` that the session consumed.
fn count_packets(stats: &crate::stats::ShardStats, whole: &[(usize, u8)], consumed: usize) {
    for &(end, kind) in whole {
        if end > consumed {
            break;
        }
        crate::stats::ShardStats::add(&stats.mqtt_packets_in[kind as usize & 15], 1);
    }
}

/// The session's output is at its bound: do not read the client.
pub(super) fn should_pause(shard: &Shard, cell: &ConnCell) -> bool {
    let cfg = shard.router.cfg();
    cell.mqtt
        .borrow()
        .as_ref()
        .is_some_and(|m| m.session.should_pause(&cfg.mqtt.session))
}

/// The next chunk of an MQTT connection's output (`None`: not MQTT).
pub(super) fn poll_transmit(cell: &ConnCell, max: usize) -> Option<Option<Bytes>> {
    cell.mqtt
        .borrow_mut()
        .as_mut()
        .map(|m| m.session.poll_transmit(max))
}

/// `n` bytes reached the socket; false when the connection is not MQTT.
pub(super) fn on_transmitted(shard: &Shard, cell: &ConnCell, t: relay_core::Now, n: usize) -> bool {
    let cfg = shard.router.cfg();
    match cell.mqtt.borrow_mut().as_mut() {
        Some(m) => {
            m.session.on_transmitted(&cfg.mqtt.session, t, n);
            true
        }
        None => false,
    }
}
