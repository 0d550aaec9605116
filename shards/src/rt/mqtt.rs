//! MQTT clients on the shard's I/O loop: the listener, and the parts of the
//! loop that read and write through a connection's MQTT session instead of
//! the relay protocol (`router::mqtt` holds the routing). A client on the
//! HTTP port's `/mqtt` speaks the same MQTT inside WebSocket binary
//! messages: its bytes are unwrapped before the session reads them, and the
//! session's output is wrapped on the way out.

use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::rc::Rc;

use bytes::{Bytes, BytesMut};
use relay_core::conn::{CloseReason, Hello};
use relay_core::ws as rws;

use super::io::Entry;
use super::{Shard, now};
use crate::cell::ConnCell;
use crate::router::{MqttConn, MqttWs, Outcome};
use crate::ws::{self, WsDecoder, WsMsg};

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

/// Makes a WebSocket connection to `/mqtt` an MQTT one.
pub(super) fn init_ws(shard: &Shard, cell: &ConnCell) {
    let cfg = shard.router.cfg();
    let mut m = Box::new(MqttConn::new(&cfg.mqtt.session, now()));
    m.ws = Some(Box::<MqttWs>::default());
    *cell.mqtt.borrow_mut() = Some(m);
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
/// Returns the owner shard when the connection must move there. Over
/// WebSocket, `rbuf` holds frames: each binary message's bytes join the
/// session's stream first (`ws_input`).
pub(super) fn process_input(
    shard: &Shard,
    entry: &mut Entry<'_>,
    t: relay_core::Now,
    mut rbuf: BytesMut,
) -> Option<(usize, Hello)> {
    let token = entry.token();
    let dec = entry.io.part.as_mut().and_then(|p| p.ws.take());
    let (moving, pause) = match dec {
        None => feed(shard, &entry.cell, t, &mut rbuf),
        Some(mut dec) => {
            let r = ws_input(shard, entry, t, &mut rbuf, &mut dec);
            entry.io.part().ws = Some(dec);
            r
        }
    };
    let io = &mut entry.io;
    if pause && !io.paused {
        io.paused = true;
        if let Some(fd) = io.raw_fd() {
            let _ = shard.poller.rearm(fd, token, io, &entry.cell);
        }
    }
    if !rbuf.is_empty() {
        io.part().rbuf = rbuf;
    }
    io.tidy();
    if let Some(m) = entry.cell.mqtt.borrow_mut().as_mut() {
        m.session.tidy();
    }
    moving
}

/// Feeds MQTT bytes to the session and routes each event, consuming what
/// it takes of `input`. Returns where the connection must move, if it must,
/// and whether reading must pause (the session's output is at its bound).
fn feed(
    shard: &Shard,
    cell: &Rc<ConnCell>,
    t: relay_core::Now,
    input: &mut BytesMut,
) -> (Option<(usize, Hello)>, bool) {
    let router = &shard.router;
    let mcfg = router.cfg().mqtt.clone();
    let mut moving = None;
    let mut pause = false;
    // Each turn consumes a packet or stops: bounded by `input`.
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
            let whole = complete_packets(input, mcfg.session.max_packet_size as usize);
            let before = input.len();
            let ev = m.session.handle_input(&mcfg.session, t, input);
            count_packets(&router.stats, &whole, before - input.len());
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
    (moving, pause)
}

/// MQTT over WebSocket: alternately feeds the session what earlier binary
/// messages carried and takes the next message off `raw`, until the input
/// runs out, the session pauses or moves, or the connection closes. A text
/// message or a broken frame closes the connection (MQTT 5.0 and 3.1.1
/// section 6: only binary messages carry MQTT).
fn ws_input(
    shard: &Shard,
    entry: &mut Entry<'_>,
    t: relay_core::Now,
    raw: &mut BytesMut,
    dec: &mut WsDecoder,
) -> (Option<(usize, Hello)>, bool) {
    let cell = entry.cell.clone();
    let cfg = shard.router.cfg();
    // A message holds at most one whole packet's worth of bytes.
    let max = cfg.mqtt.session.max_packet_size as usize;
    let close_at = t.mono_ms + cfg.close_grace_ms;
    loop {
        let mut input = take_ws_input(&cell);
        if !input.is_empty() {
            let (moving, pause) = feed(shard, &cell, t, &mut input);
            put_ws_input(&cell, input);
            if moving.is_some() || pause {
                return (moving, pause);
            }
        }
        let detached = cell.mqtt.borrow().as_ref().is_none_or(|m| m.detached);
        if detached || cell.conn.borrow().is_closing() {
            break;
        }
        match dec.decode(raw, max) {
            Ok(None) => break,
            Ok(Some(WsMsg::Binary(m))) => {
                if let Some(w) = cell.mqtt.borrow_mut().as_mut().and_then(|m| m.ws.as_mut()) {
                    w.input.extend_from_slice(&m);
                }
            }
            Ok(Some(WsMsg::Ping(p))) => {
                if let Some(w) = cell.mqtt.borrow_mut().as_mut().and_then(|m| m.ws.as_mut()) {
                    w.pong = Some(Bytes::from(ws::pong_frame(&p)));
                }
            }
            Ok(Some(WsMsg::Pong)) => {}
            Ok(Some(WsMsg::Close(_))) => {
                // The client closes: answered with a close by the write
                // pass; without DISCONNECT first, its will goes out.
                cell.closing(CloseReason::Bye, close_at);
                break;
            }
            Ok(Some(WsMsg::Text(_))) => {
                let why = "MQTT over WebSocket takes binary messages only";
                send_ws_raw(&cell, &ws::close_frame(1003, why));
                entry.io.mark(super::io::CLOSE_SENT, true);
                cell.closing(CloseReason::ProtocolError, close_at);
                break;
            }
            Err(e) => {
                send_ws_raw(&cell, &ws::close_frame(e.close_code(), &e.to_string()));
                entry.io.mark(super::io::CLOSE_SENT, true);
                cell.closing(CloseReason::ProtocolError, close_at);
                break;
            }
        }
    }
    (None, false)
}

fn take_ws_input(cell: &ConnCell) -> BytesMut {
    cell.mqtt
        .borrow_mut()
        .as_mut()
        .and_then(|m| m.ws.as_mut())
        .map(|w| std::mem::take(&mut w.input))
        .unwrap_or_default()
}

fn put_ws_input(cell: &ConnCell, input: BytesMut) {
    if let Some(w) = cell.mqtt.borrow_mut().as_mut().and_then(|m| m.ws.as_mut()) {
        // An empty buffer gives its allocation back.
        w.input = if input.is_empty() {
            BytesMut::new()
        } else {
            input
        };
    }
}

/// Whether an MQTT client over WebSocket has bytes its session has not
/// taken yet (input to go on with after a pause or a handover).
pub(super) fn has_input(cell: &ConnCell) -> bool {
    cell.mqtt
        .borrow()
        .as_ref()
        .and_then(|m| m.ws.as_ref())
        .is_some_and(|w| !w.input.is_empty())
}

/// Queues a WebSocket close frame for an MQTT client over WebSocket (after
/// what its session has queued); false when the connection is not one.
pub(super) fn send_ws_raw(cell: &ConnCell, frame: &[u8]) -> bool {
    match cell.mqtt.borrow_mut().as_mut().and_then(|m| m.ws.as_mut()) {
        Some(w) => {
            w.control.extend_from_slice(frame);
            true
        }
        None => false,
    }
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

/// The next chunk of an MQTT connection's output (`None`: not MQTT). Over
/// WebSocket each chunk of the session's output goes in one binary message,
/// then the pong owed, then the close.
pub(super) fn poll_transmit(cell: &ConnCell, max: usize) -> Option<Option<Bytes>> {
    let mut m = cell.mqtt.borrow_mut();
    let MqttConn { session, ws, .. } = &mut **m.as_mut()?;
    let Some(w) = ws.as_mut() else {
        return Some(session.poll_transmit(max));
    };
    if let Some(chunk) = session.poll_transmit(max.saturating_sub(rws::MAX_HEADER)) {
        let mut out = BytesMut::with_capacity(rws::MAX_HEADER + chunk.len());
        rws::put_header(rws::Opcode::Binary, chunk.len(), &mut out);
        out.extend_from_slice(&chunk);
        w.sent = chunk.len();
        return Some(Some(out.freeze()));
    }
    w.sent = 0;
    if let Some(pong) = w.pong.take() {
        return Some(Some(pong));
    }
    if w.control.is_empty() {
        return Some(None);
    }
    Some(Some(std::mem::take(&mut w.control).freeze()))
}

/// A chunk of `n` bytes reached the socket; false when the connection is
/// not MQTT.
pub(super) fn on_transmitted(shard: &Shard, cell: &ConnCell, t: relay_core::Now, n: usize) -> bool {
    let cfg = shard.router.cfg();
    match cell.mqtt.borrow_mut().as_mut() {
        Some(m) => {
            // Over WebSocket: the session's bytes in that frame (none for
            // a control frame).
            let n = m.ws.as_mut().map_or(n, |w| std::mem::take(&mut w.sent));
            m.session.on_transmitted(&cfg.mqtt.session, t, n);
            true
        }
        None => false,
    }
}
