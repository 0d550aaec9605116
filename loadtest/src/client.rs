//! One simulated connection.
//!
//! [`open`] connects (from the planned source address), upgrades to WebSocket for
//! browsers, says hello, waits for the welcome, and joins its groups (MQTT: subscribes
//! to its inbox and groups), all within the connect timeout. [`Session::spawn`] then
//! runs two tasks:
//! - the writer sleeps until the next tick with something due, then encodes every due
//!   message of the open-loop schedule, the heartbeat if due, and any command replies
//!   into one buffer and writes it with one call;
//! - the reader decodes what arrives, records latency from each message's stamped
//!   intended time, answers heartbeats' round trips, and hands command replies and
//!   WebSocket pongs to the writer.

use std::collections::VecDeque;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};

use crate::clock::{Anchor, mono_ns};
use crate::net;
use crate::payload::Stamp;
use crate::plan::{ClientSpec, Side};
use crate::scenario::{Endpoint, Form};
use crate::schedule::Schedule;
use crate::stats::{ErrorKind, Receipt, Recorder};
use crate::wire::{Decoder, Dest, Encoder, Inbound, WireKind, ws};

/// One step as every connection sees it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct StepPlan {
    /// Step id, stamped into every message of the step.
    pub id: u32,
    /// Messages per second per sending client.
    pub rate: f64,
    /// First intended send time, ns of CLOCK_MONOTONIC.
    pub start_ns: u64,
    /// No message is intended at or after this time.
    pub end_ns: u64,
}

/// What the worker tells its connections.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum StepCmd {
    /// Connected, heartbeating, no step running.
    Wait,
    /// Send on this step's schedule.
    Run(StepPlan),
    /// Say goodbye and close.
    Finish,
}

/// Everything a worker's connections share.
#[derive(Debug, Clone)]
pub struct Env {
    /// Where controllers connect.
    pub controllers: Endpoint,
    /// Where browsers connect.
    pub browsers: Endpoint,
    /// Controllers' protocol.
    pub controller_wire: WireKind,
    /// Browsers' protocol.
    pub browser_wire: WireKind,
    /// Source addresses, used round-robin by client index (`None`: the kernel picks).
    pub sources: Arc<Vec<Ipv4Addr>>,
    /// Where measurements go.
    pub recorder: Arc<Recorder>,
    /// Step commands.
    pub steps: watch::Receiver<StepCmd>,
    /// Maps monotonic ns onto timer instants.
    pub anchor: Anchor,
    /// Payload size of data messages.
    pub payload_len: usize,
    /// Heartbeat interval, ns.
    pub heartbeat_ns: u64,
    /// Writes are rounded up to this many ns.
    pub tick_ns: u64,
    /// Most messages in one write.
    pub max_batch: u64,
    /// Deadline for connect + handshake + joins.
    pub connect_timeout: Duration,
    /// Queue of replies a command controller keeps.
    pub reply_queue: usize,
    /// Largest inbound frame accepted.
    pub max_in: usize,
}

impl Env {
    fn source(&self, index: u64) -> Option<Ipv4Addr> {
        match self.sources.len() {
            0 => None,
            1 if self.sources[0] == Ipv4Addr::LOCALHOST => None,
            n => Some(self.sources[(index % n as u64) as usize]),
        }
    }

    fn side(&self, side: Side) -> (&Endpoint, &WireKind) {
        match side {
            Side::Controller => (&self.controllers, &self.controller_wire),
            Side::Browser => (&self.browsers, &self.browser_wire),
        }
    }
}

/// A connection whose handshake is done.
#[derive(Debug)]
pub struct Session {
    /// The client it plays.
    spec: ClientSpec,
    stream: TcpStream,
    enc: Encoder,
    dec: Decoder,
    /// Bytes read past the handshake.
    rbuf: BytesMut,
    /// Its protocol.
    wire: WireKind,
}

async fn read_more(stream: &mut TcpStream, rbuf: &mut BytesMut) -> Result<(), ErrorKind> {
    rbuf.reserve(4096);
    match stream.read_buf(rbuf).await {
        Ok(0) => Err(ErrorKind::HandshakeFailed),
        Ok(_) => Ok(()),
        Err(e) => Err(net::classify(&e)),
    }
}

/// Reads events until `done` says the awaited answer came (`Some(Ok)`) or failed.
async fn await_event(
    stream: &mut TcpStream,
    dec: &mut Decoder,
    rbuf: &mut BytesMut,
    mut done: impl FnMut(Inbound) -> Option<Result<(), ErrorKind>>,
) -> Result<(), ErrorKind> {
    loop {
        while let Some(ev) = dec.decode(rbuf).map_err(|_| ErrorKind::HandshakeFailed)? {
            if let Some(r) = done(ev) {
                return r;
            }
        }
        read_more(stream, rbuf).await?;
    }
}

/// Connects `spec` and completes its handshake and joins within the connect timeout.
pub async fn open(env: &Env, spec: ClientSpec) -> Result<Session, ErrorKind> {
    match tokio::time::timeout(env.connect_timeout, open_inner(env, spec)).await {
        Ok(r) => r,
        Err(_) => Err(ErrorKind::ConnectTimeout),
    }
}

fn failure(ev: &Inbound) -> Option<ErrorKind> {
    match ev {
        Inbound::Error { code, .. } if code.starts_with("connack_") || code == "suback_failure" => {
            Some(ErrorKind::Refused(code.clone()))
        }
        Inbound::Error { code, .. } => Some(ErrorKind::Server(code.clone())),
        Inbound::Closed => Some(ErrorKind::HandshakeFailed),
        _ => None,
    }
}

async fn open_inner(env: &Env, spec: ClientSpec) -> Result<Session, ErrorKind> {
    let (endpoint, wire) = env.side(spec.side);
    let wire = wire.clone();
    let mut stream = net::connect(env.source(spec.index), endpoint.addr()).await?;
    let mut enc = wire.encoder(spec.index ^ mono_ns());
    let mut dec = wire.decoder(env.max_in);
    let mut rbuf = BytesMut::with_capacity(1024);
    let mut out = BytesMut::with_capacity(256);
    let heartbeat_s = env.heartbeat_ns.div_ceil(1_000_000_000).max(1) as u32;

    let mut hello_in_url = false;
    if let Endpoint::RelayWs { host, path, .. } = endpoint {
        // JSON browsers say hello in the URL (the server then speaks JSON text);
        // binary browsers send a binary HELLO after the upgrade.
        hello_in_url = matches!(
            wire,
            WireKind::Relay {
                form: Form::Json,
                ..
            }
        );
        let target = if hello_in_url {
            let sep = if path.contains('?') { '&' } else { '?' };
            format!(
                "{path}{sep}addr={}&role={}&heartbeat_s={heartbeat_s}",
                spec.addr,
                spec.side.role()
            )
        } else {
            path.clone()
        };
        let key = ws::new_key(&mut ws::Masker::new(spec.index.wrapping_add(mono_ns())));
        stream
            .write_all(&ws::request(host, &target, &key))
            .await
            .map_err(|_| ErrorKind::HandshakeFailed)?;
        loop {
            match ws::parse_answer(&rbuf, &key) {
                Ok(Some(n)) => {
                    rbuf.advance(n);
                    break;
                }
                Ok(None) => read_more(&mut stream, &mut rbuf).await?,
                Err(_) => return Err(ErrorKind::HandshakeFailed),
            }
        }
    }
    if !hello_in_url {
        enc.hello(&mut out, &spec.addr, spec.side.role(), heartbeat_s);
        stream
            .write_all(&out)
            .await
            .map_err(|_| ErrorKind::HandshakeFailed)?;
        out.clear();
    }
    await_event(&mut stream, &mut dec, &mut rbuf, |ev| match ev {
        Inbound::Welcome => Some(Ok(())),
        other => failure(&other).map(Err),
    })
    .await?;

    // Inbox (MQTT) and group joins, each acknowledged by its seq.
    let mut waiting: Vec<u32> = Vec::new();
    let mut seq = 1u32;
    if spec.inbox && enc.inbox(&mut out, &spec.addr, seq) {
        waiting.push(seq);
        seq += 1;
    }
    for g in &spec.joins {
        enc.join(&mut out, g, seq);
        waiting.push(seq);
        seq += 1;
    }
    if !waiting.is_empty() {
        stream
            .write_all(&out)
            .await
            .map_err(|_| ErrorKind::HandshakeFailed)?;
        out.clear();
        await_event(&mut stream, &mut dec, &mut rbuf, |ev| {
            if let Inbound::Ack { seq } = ev {
                waiting.retain(|s| *s != seq);
                return waiting.is_empty().then_some(Ok(()));
            }
            failure(&ev).map(Err)
        })
        .await?;
    }
    Ok(Session {
        spec,
        stream,
        enc,
        dec,
        rbuf,
        wire,
    })
}

/// What the reader hands to the writer.
#[derive(Debug)]
enum Out {
    /// A command to answer: send its stamp back to the browser.
    Echo(Stamp),
    /// A WebSocket ping to answer.
    WsPong(Bytes),
}

/// State both tasks of a connection see.
#[derive(Debug, Default)]
struct Shared {
    /// Set once the tool itself closes the connection, so EOF is not an error.
    closing: AtomicBool,
    /// Intended times of heartbeats awaiting their answer, oldest first.
    pings: Mutex<VecDeque<u64>>,
}

/// Heartbeats awaiting an answer beyond this are forgotten (the oldest first).
const MAX_PINGS_IN_FLIGHT: usize = 64;

impl Session {
    /// The client this session plays.
    pub fn spec(&self) -> &ClientSpec {
        &self.spec
    }

    /// Says goodbye and closes at once (storms that do not hold connections).
    pub async fn close(mut self) {
        let mut out = BytesMut::new();
        self.enc.bye(&mut out);
        let _ = self.stream.write_all(&out).await;
        let _ = self.stream.shutdown().await;
    }

    /// Starts the reader and writer; the returned task ends when both have.
    pub fn spawn(self, env: &Env) -> tokio::task::JoinHandle<()> {
        let Session {
            spec,
            stream,
            enc,
            dec,
            rbuf,
            wire,
        } = self;
        let spec = Arc::new(spec);
        let shared = Arc::new(Shared::default());
        let (rd, wr) = stream.into_split();
        let (tx, rx) = mpsc::channel::<Out>(env.reply_queue.max(1));
        let dest = spec.send.as_ref().map(|s| wire.dest(&s.to, s.group));
        let echo = spec.echo_to.as_ref().map(|a| wire.dest(a, false));
        let reader = tokio::spawn(read_loop(
            env.clone(),
            spec.clone(),
            shared.clone(),
            rd,
            dec,
            rbuf,
            tx,
        ));
        let writer = tokio::spawn(write_loop(
            env.clone(),
            spec,
            shared,
            wr,
            enc,
            rx,
            dest,
            echo,
        ));
        tokio::spawn(async move {
            let _ = writer.await;
            let _ = reader.await;
        })
    }
}

async fn read_loop(
    env: Env,
    spec: Arc<ClientSpec>,
    shared: Arc<Shared>,
    mut rd: tokio::net::tcp::OwnedReadHalf,
    mut dec: Decoder,
    mut rbuf: BytesMut,
    tx: mpsc::Sender<Out>,
) {
    let key = spec.index as usize;
    let rec = &env.recorder;
    let echo = spec.echo_to.is_some();
    let mut stamps: Vec<Stamp> = Vec::with_capacity(64);
    loop {
        let now = mono_ns();
        let mut stop = false;
        loop {
            match dec.decode(&mut rbuf) {
                Ok(Some(ev)) => match ev {
                    Inbound::Data { stamp: Some(st) } => {
                        stamps.push(st);
                        if echo
                            && let Err(mpsc::error::TrySendError::Full(_)) =
                                tx.try_send(Out::Echo(st))
                        {
                            rec.error(key, &ErrorKind::ReplyDropped);
                        }
                    }
                    Inbound::Data { stamp: None } => rec.error(key, &ErrorKind::Unstamped),
                    Inbound::Pong => {
                        let sent = shared
                            .pings
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .pop_front();
                        if let Some(t) = sent {
                            rec.pong(key, t, now);
                        }
                    }
                    Inbound::Error { code, .. } => rec.error(key, &ErrorKind::Server(code)),
                    Inbound::WsPing(p) => {
                        let _ = tx.try_send(Out::WsPong(p));
                    }
                    Inbound::Closed => {
                        if !shared.closing.load(Ordering::Acquire) {
                            rec.error(key, &ErrorKind::Disconnected);
                        }
                        stop = true;
                        break;
                    }
                    Inbound::Welcome | Inbound::Ack { .. } | Inbound::Other => {}
                },
                Ok(None) => break,
                Err(_) => {
                    rec.error(key, &ErrorKind::BadInput);
                    stop = true;
                    break;
                }
            }
        }
        let how = if spec.receipt == Receipt::CountOnly {
            Receipt::CountOnly
        } else {
            Receipt::Measure
        };
        rec.received(key, &stamps, now, how);
        stamps.clear();
        if stop {
            break;
        }
        rbuf.reserve(8192);
        match rd.read_buf(&mut rbuf).await {
            Ok(0) => {
                if !shared.closing.load(Ordering::Acquire) {
                    rec.error(key, &ErrorKind::Disconnected);
                }
                break;
            }
            Ok(_) => {}
            Err(_) => {
                if !shared.closing.load(Ordering::Acquire) {
                    rec.error(key, &ErrorKind::ReadFailed);
                }
                break;
            }
        }
    }
    rec.counters.connected.fetch_sub(1, Ordering::Relaxed);
    // Dropping `tx` tells the writer the connection is gone.
}

#[allow(clippy::too_many_arguments)]
async fn write_loop(
    env: Env,
    spec: Arc<ClientSpec>,
    shared: Arc<Shared>,
    mut wr: tokio::net::tcp::OwnedWriteHalf,
    mut enc: Encoder,
    mut rx: mpsc::Receiver<Out>,
    dest: Option<Dest>,
    echo: Option<Dest>,
) {
    let key = spec.index as usize;
    let rec = env.recorder.clone();
    let mut steps = env.steps.clone();
    let hb = env.heartbeat_ns.max(1);
    // Spread first heartbeats over one interval so the fleet does not ping in bursts.
    let phase = (spec.index.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 11) % hb;
    let mut next_hb = mono_ns() + phase;
    let mut sched = Schedule::idle();
    let mut step_id = crate::stats::NO_STEP;
    let mut buf = BytesMut::with_capacity(4096);
    let (recipients, slot, slots) = spec
        .send
        .as_ref()
        .map(|s| (s.recipients, s.slot, s.slots))
        .unwrap_or((0, 0, 1));
    // A step may already be running when this connection comes up.
    let mut pending_cmd = Some(*steps.borrow_and_update());
    loop {
        if let Some(cmd) = pending_cmd.take() {
            match cmd {
                StepCmd::Wait => sched = Schedule::idle(),
                StepCmd::Run(p) => {
                    if p.id != step_id {
                        step_id = p.id;
                        sched = if dest.is_some() {
                            Schedule::new(p.start_ns, p.end_ns, p.rate, slot, slots)
                        } else {
                            Schedule::idle()
                        };
                    }
                }
                StepCmd::Finish => {
                    shared.closing.store(true, Ordering::Release);
                    buf.clear();
                    enc.bye(&mut buf);
                    let _ = wr.write_all(&buf).await;
                    let _ = wr.shutdown().await;
                    return;
                }
            }
        }
        let wake_ns = match sched.next_wake(env.tick_ns) {
            Some(t) => t.min(next_hb),
            None => next_hb,
        };
        let mut replies = 0u64;
        tokio::select! {
            biased;
            changed = steps.changed() => {
                pending_cmd = Some(if changed.is_err() { StepCmd::Finish } else { *steps.borrow_and_update() });
                continue;
            }
            m = rx.recv() => match m {
                Some(m) => {
                    replies += encode_out(&mut enc, &mut buf, m, echo.as_ref(), env.payload_len);
                    while let Ok(m) = rx.try_recv() {
                        replies += encode_out(&mut enc, &mut buf, m, echo.as_ref(), env.payload_len);
                    }
                }
                None => return, // the reader ended: the connection is gone
            },
            _ = tokio::time::sleep_until(env.anchor.instant_at(wake_ns).into()) => {}
        }
        let now = mono_ns();
        let mut first_ns = 0;
        let mut n = 0u64;
        if let Some(d) = dest.as_ref() {
            let due = sched.take_due(now, env.max_batch);
            for k in due {
                let Some(t) = sched.intended(k) else { break };
                if n == 0 {
                    first_ns = t;
                }
                enc.data(
                    &mut buf,
                    d,
                    Stamp {
                        intended_ns: t,
                        step: step_id,
                    },
                    env.payload_len,
                );
                n += 1;
            }
        }
        let mut pinged = None;
        if now >= next_hb {
            enc.ping(&mut buf);
            let mut q = shared.pings.lock().unwrap_or_else(|p| p.into_inner());
            if q.len() >= MAX_PINGS_IN_FLIGHT {
                q.pop_front();
            }
            q.push_back(next_hb);
            drop(q);
            pinged = Some(next_hb);
            // Next beat on the grid; skip beats missed while blocked.
            next_hb += hb * ((now - next_hb) / hb + 1);
        }
        if buf.is_empty() {
            continue;
        }
        if wr.write_all(&buf).await.is_err() {
            if !shared.closing.load(Ordering::Acquire) {
                rec.error(key, &ErrorKind::WriteFailed);
            }
            return;
        }
        buf.clear();
        rec.sent(key, first_ns, n, recipients, Some(mono_ns()));
        rec.sent(key, now, replies, 1, None);
        if let Some(t) = pinged {
            rec.ping(key, t);
        }
    }
}

fn encode_out(
    enc: &mut Encoder,
    buf: &mut BytesMut,
    m: Out,
    echo: Option<&Dest>,
    len: usize,
) -> u64 {
    match m {
        Out::Echo(stamp) => match echo {
            Some(d) => {
                enc.data(buf, d, stamp, len);
                1
            }
            None => 0,
        },
        Out::WsPong(p) => {
            enc.ws_pong(buf, &p);
            0
        }
    }
}
