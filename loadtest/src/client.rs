//! One simulated connection.
//!
//! [`open`] connects (from the planned source address), upgrades to WebSocket for
//! browsers, says hello, waits for the welcome, and joins its groups (MQTT: subscribes
//! to its inbox and groups), all within the connect timeout; an echo target needs no
//! handshake. [`Session::spawn`] then makes the connection a [`Link`]:
//! - scheduled writes (data on the open-loop schedule, heartbeats) come from the
//!   worker's sender thread ([`crate::sender`]), which writes straight to the socket
//!   at the intended time;
//! - the reader task decodes what arrives, records latency from each message's stamp,
//!   matches heartbeat answers, and writes command replies and WebSocket pongs itself;
//! - a small flusher task sleeps until a write found the socket full, then sends the
//!   rest as the socket drains, and says goodbye when the link is closed.
//!
//! Every write goes through the link's [`Outbox`] lock, so bytes from the sender
//! thread and from the reader never interleave inside a message.

use std::collections::VecDeque;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use rustls::ClientConnection;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::TcpStream;
use tokio::sync::Notify;

use crate::clock::mono_ns;
use crate::net;
use crate::payload::Stamp;
use crate::plan::{ClientSpec, Side};
use crate::scenario::{Endpoint, Form};
use crate::stats::{ErrorKind, Recorder};
use crate::tls::{self, TlsClient};
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

/// Everything a worker's connections share.
#[derive(Debug, Clone)]
pub struct Env {
    /// Where controllers connect: one endpoint per target (node), used by
    /// `ClientSpec::target`.
    pub controllers: Vec<Endpoint>,
    /// Where browsers connect, one endpoint per target.
    pub browsers: Vec<Endpoint>,
    /// Controllers' protocol.
    pub controller_wire: WireKind,
    /// Browsers' protocol.
    pub browser_wire: WireKind,
    /// Source addresses, used round-robin by client index (`None`: the kernel picks).
    pub sources: Arc<Vec<Ipv4Addr>>,
    /// Where measurements go.
    pub recorder: Arc<Recorder>,
    /// Payload size of data messages.
    pub payload_len: usize,
    /// Heartbeat interval, ns.
    pub heartbeat_ns: u64,
    /// Deadline for connect + handshake + joins.
    pub connect_timeout: Duration,
    /// Retries of a connect answered `busy` with a `retry_after_ms`.
    pub busy_retries: u32,
    /// Bytes a connection keeps queued while its socket is full.
    pub max_pending: usize,
    /// Largest inbound frame accepted.
    pub max_in: usize,
    /// JSON payload template of data messages, if any.
    pub template: Option<Arc<crate::payload::Template>>,
    /// TLS of the controllers' connections (`tcps://`, `mqtts://`).
    pub controller_tls: Option<TlsClient>,
    /// TLS of the browsers' connections (`wss://`, `mqtts://`).
    pub browser_tls: Option<TlsClient>,
}

impl Env {
    fn source(&self, index: u64) -> Option<Ipv4Addr> {
        match self.sources.len() {
            0 => None,
            1 if self.sources[0] == Ipv4Addr::LOCALHOST => None,
            n => Some(self.sources[(index % n as u64) as usize]),
        }
    }

    fn side(&self, side: Side, target: usize) -> (&Endpoint, &WireKind, Option<&TlsClient>) {
        let pick = |v: &'_ [Endpoint]| -> usize { target.min(v.len().saturating_sub(1)) };
        match side {
            Side::Controller => (
                &self.controllers[pick(&self.controllers)],
                &self.controller_wire,
                self.controller_tls.as_ref(),
            ),
            Side::Browser => (
                &self.browsers[pick(&self.browsers)],
                &self.browser_wire,
                self.browser_tls.as_ref(),
            ),
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
    /// Its TLS session (`tcps://`, `wss://`, `mqtts://`), handshake done.
    tls: Option<ClientConnection>,
}

async fn read_more(
    stream: &mut TcpStream,
    tls: Option<&mut ClientConnection>,
    rbuf: &mut BytesMut,
) -> Result<(), ErrorKind> {
    if let Some(tls) = tls {
        return tls::read_more(stream, tls, rbuf).await;
    }
    rbuf.reserve(4096);
    match stream.read_buf(rbuf).await {
        Ok(0) => Err(ErrorKind::HandshakeFailed),
        Ok(_) => Ok(()),
        Err(e) => Err(net::classify(&e)),
    }
}

/// Connects `spec` and completes its handshake and joins within the connect timeout.
pub async fn open(env: &Env, spec: ClientSpec) -> Result<Session, ErrorKind> {
    match tokio::time::timeout(env.connect_timeout, open_inner(env, spec)).await {
        Ok(r) => r,
        Err(_) => Err(ErrorKind::ConnectTimeout),
    }
}

/// Like [`open`], but a connect the server answers `busy` with a
/// `retry_after_ms` is tried again after that long, up to `busy_retries`
/// times. Returns the result and the number of retries.
pub async fn open_retrying(env: &Env, spec: ClientSpec) -> (Result<Session, ErrorKind>, u32) {
    let mut retries = 0;
    loop {
        match open(env, spec.clone()).await {
            Err(ErrorKind::RetryLater { retry_after_ms, .. }) if retries < env.busy_retries => {
                retries += 1;
                tokio::time::sleep(Duration::from_millis(retry_after_ms)).await;
            }
            r => return (r, retries),
        }
    }
}

fn failure(ev: &Inbound) -> Option<ErrorKind> {
    match ev {
        Inbound::RetryLater {
            code,
            retry_after_ms,
        } => Some(ErrorKind::RetryLater {
            code: code.clone(),
            retry_after_ms: *retry_after_ms,
        }),
        Inbound::Error { code, .. } if code.starts_with("connack_") || code == "suback_failure" => {
            Some(ErrorKind::Refused(code.clone()))
        }
        Inbound::Error { code, .. } => Some(ErrorKind::Server(code.clone())),
        Inbound::Closed => Some(ErrorKind::HandshakeFailed),
        _ => None,
    }
}

async fn open_inner(env: &Env, spec: ClientSpec) -> Result<Session, ErrorKind> {
    let (endpoint, wire, tls_client) = env.side(spec.side, spec.target);
    let mut stream = net::connect(env.source(spec.index), endpoint.addr()).await?;
    let tls = match tls_client {
        Some(c) => {
            let mut conn = c.session()?;
            tls::handshake(&mut stream, &mut conn).await?;
            Some(conn)
        }
        None => None,
    };
    let mut enc = wire.encoder(spec.index ^ mono_ns());
    if let Some(t) = &env.template {
        enc.set_template(t.clone());
    }
    let mut session = Session {
        spec,
        stream,
        enc,
        dec: wire.decoder(env.max_in),
        rbuf: BytesMut::with_capacity(1024),
        wire: wire.clone(),
        tls,
    };
    // An echo server has no handshake: the connection is ready once connected.
    if !endpoint.is_echo() {
        let heartbeat_s = env.heartbeat_ns.div_ceil(1_000_000_000).max(1) as u32;
        session.handshake(endpoint, heartbeat_s).await?;
    }
    Ok(session)
}

impl Session {
    /// Upgrades to WebSocket (browsers), says hello, waits for the welcome, then
    /// subscribes the inbox (MQTT) and joins the groups.
    async fn handshake(&mut self, endpoint: &Endpoint, heartbeat_s: u32) -> Result<(), ErrorKind> {
        let mut out = BytesMut::with_capacity(256);
        let mut hello_in_url = false;
        if let Endpoint::RelayWs { host, path, .. } = endpoint {
            // JSON browsers say hello in the URL (the server then speaks JSON text);
            // binary browsers send a binary HELLO after the upgrade.
            hello_in_url = matches!(
                self.wire,
                WireKind::Relay {
                    form: Form::Json,
                    ..
                }
            );
            let target = if hello_in_url {
                let sep = if path.contains('?') { '&' } else { '?' };
                format!(
                    "{path}{sep}addr={}&role={}&heartbeat_s={heartbeat_s}",
                    self.spec.addr,
                    self.spec.side.role()
                )
            } else {
                path.clone()
            };
            let key = ws::new_key(&mut ws::Masker::new(
                self.spec.index.wrapping_add(mono_ns()),
            ));
            self.write(&ws::request(host, &target, &key)).await?;
            loop {
                match ws::parse_answer(&self.rbuf, &key) {
                    Ok(Some(n)) => {
                        self.rbuf.advance(n);
                        break;
                    }
                    Ok(None) => {
                        read_more(&mut self.stream, self.tls.as_mut(), &mut self.rbuf).await?
                    }
                    Err(_) => return Err(ErrorKind::HandshakeFailed),
                }
            }
        }
        if !hello_in_url {
            self.enc.hello(
                &mut out,
                &self.spec.addr,
                self.spec.side.role(),
                heartbeat_s,
            );
            self.write(&out).await?;
            out.clear();
        }
        self.await_event(|ev| match ev {
            Inbound::Welcome => Some(Ok(())),
            other => failure(&other).map(Err),
        })
        .await?;

        // Inbox (MQTT) and group joins, each acknowledged by its seq.
        let mut waiting: Vec<u32> = Vec::new();
        let mut seq = 1u32;
        if self.spec.inbox && self.enc.inbox(&mut out, &self.spec.addr, seq) {
            waiting.push(seq);
            seq += 1;
        }
        for g in &self.spec.joins {
            self.enc.join(&mut out, g, seq);
            waiting.push(seq);
            seq += 1;
        }
        if waiting.is_empty() {
            return Ok(());
        }
        self.write(&out).await?;
        self.await_event(|ev| {
            if let Inbound::Ack { seq } = ev {
                waiting.retain(|s| *s != seq);
                return waiting.is_empty().then_some(Ok(()));
            }
            failure(&ev).map(Err)
        })
        .await
    }

    /// Writes handshake bytes whole (sealed first over TLS).
    async fn write(&mut self, bytes: &[u8]) -> Result<(), ErrorKind> {
        let mut sealed = Vec::new();
        let bytes = match self.tls.as_mut() {
            Some(t) => {
                tls::seal(t, bytes, &mut sealed).map_err(|_| ErrorKind::HandshakeFailed)?;
                &sealed[..]
            }
            None => bytes,
        };
        self.stream
            .write_all(bytes)
            .await
            .map_err(|_| ErrorKind::HandshakeFailed)
    }

    /// Reads events until `done` says the awaited answer came (`Some(Ok)`) or failed.
    async fn await_event(
        &mut self,
        mut done: impl FnMut(Inbound) -> Option<Result<(), ErrorKind>>,
    ) -> Result<(), ErrorKind> {
        loop {
            while let Some(ev) = self
                .dec
                .decode(&mut self.rbuf)
                .map_err(|_| ErrorKind::HandshakeFailed)?
            {
                if let Some(r) = done(ev) {
                    return r;
                }
            }
            read_more(&mut self.stream, self.tls.as_mut(), &mut self.rbuf).await?;
        }
    }
}

/// What a link's writers share: the encoder and the bytes the socket has not taken.
#[derive(Debug)]
pub struct Outbox {
    /// The connection's encoder (WebSocket masks and MQTT state live in it).
    pub enc: Encoder,
    /// Scratch buffer one write is encoded into.
    buf: BytesMut,
    /// Bytes waiting for the socket to drain (empty almost always).
    pending: BytesMut,
    /// The TLS session: plaintext is sealed under this lock, and the reader opens
    /// records under it too.
    tls: Option<ClientConnection>,
    /// Scratch buffer the TLS records of one write are sealed into.
    sealed: Vec<u8>,
}

impl Outbox {
    /// The bytes of `buf` as they go on the wire: `buf` itself, or its TLS records.
    fn wire_bytes(&mut self) -> std::io::Result<&[u8]> {
        match self.tls.as_mut() {
            None => Ok(&self.buf),
            Some(t) => {
                self.sealed.clear();
                tls::seal(t, &self.buf, &mut self.sealed)?;
                Ok(&self.sealed)
            }
        }
    }
}

/// How a write went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wrote {
    /// Sent, or queued behind bytes the socket has not taken yet.
    Ok,
    /// Not written: the queue of a full socket is at its bound.
    Full,
    /// The connection is closed or broken.
    Closed,
}

/// One established connection, shared by the sender thread, its reader and its
/// flusher.
#[derive(Debug)]
pub struct Link {
    /// The client it plays.
    pub spec: ClientSpec,
    /// Recorder shard key.
    pub key: usize,
    stream: TcpStream,
    out: Mutex<Outbox>,
    /// Wakes the flusher: bytes are pending, or the link is closing.
    flush: Notify,
    /// Set once the tool itself closes the connection, so EOF is not an error.
    closing: AtomicBool,
    /// Cleared when the connection is gone.
    alive: AtomicBool,
    /// Intended times of heartbeats awaiting their answer, oldest first.
    pings: Mutex<VecDeque<u64>>,
    /// Where this client's data messages go.
    pub dest: Option<Dest>,
    /// Where a command controller's replies go.
    echo: Option<Dest>,
    /// Payload size of data messages.
    pub payload_len: usize,
    /// Bound of `pending`.
    max_pending: usize,
    /// Where this link's errors are counted.
    rec: Arc<Recorder>,
}

/// Heartbeats awaiting an answer beyond this are forgotten (the oldest first).
const MAX_PINGS_IN_FLIGHT: usize = 64;

/// Sends as much of `data` as the socket takes now, without blocking (the sender
/// thread writes from outside the runtime, so it calls the socket directly).
fn send_now(sock: &TcpStream, data: &[u8]) -> std::io::Result<usize> {
    let sock = socket2::SockRef::from(sock);
    let mut done = 0;
    while done < data.len() {
        match sock.send_with_flags(&data[done..], libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) {
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(done),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

impl Link {
    fn lock(&self) -> MutexGuard<'_, Outbox> {
        self.out.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// True while the connection is up.
    pub fn alive(&self) -> bool {
        self.alive.load(Ordering::Acquire)
    }

    /// Encodes with `f` and writes the result at once (behind any pending bytes).
    /// `f` is not called when the pending queue is already at its bound.
    pub fn write(&self, f: impl FnOnce(&mut Encoder, &mut BytesMut)) -> Wrote {
        if !self.alive() {
            return Wrote::Closed;
        }
        let mut g = self.lock();
        let o = &mut *g;
        if o.pending.len() >= self.max_pending {
            return Wrote::Full;
        }
        o.buf.clear();
        f(&mut o.enc, &mut o.buf);
        if o.buf.is_empty() {
            return Wrote::Ok;
        }
        let r = match o.wire_bytes() {
            Ok(_) => self.send_or_queue(g),
            Err(_) => Err(g),
        };
        match r {
            Ok(()) => Wrote::Ok,
            Err(g) => {
                drop(g);
                self.fail(&ErrorKind::WriteFailed);
                Wrote::Closed
            }
        }
    }

    /// Sends the wire bytes of the last encode (`sealed` over TLS, else `buf`) now,
    /// or queues them behind pending bytes (and what the socket did not take).
    /// Gives the guard back when the socket failed.
    fn send_or_queue<'a>(
        &'a self,
        mut g: MutexGuard<'a, Outbox>,
    ) -> Result<(), MutexGuard<'a, Outbox>> {
        let o = &mut *g;
        let bytes: &[u8] = if o.tls.is_some() { &o.sealed } else { &o.buf };
        if bytes.is_empty() {
            return Ok(());
        }
        if !o.pending.is_empty() {
            o.pending.extend_from_slice(bytes);
            return Ok(());
        }
        match send_now(&self.stream, bytes) {
            Ok(n) if n == bytes.len() => Ok(()),
            Ok(n) => {
                o.pending.extend_from_slice(&bytes[n..]);
                drop(g);
                self.flush.notify_one();
                Ok(())
            }
            Err(_) => Err(g),
        }
    }

    /// Sends what the TLS session has to send on its own (an answer to a key
    /// update, a close_notify).
    fn send_tls_records(&self) {
        let mut g = self.lock();
        let o = &mut *g;
        let Some(t) = o.tls.as_mut() else { return };
        o.sealed.clear();
        if tls::pending_records(t, &mut o.sealed).is_err() {
            return;
        }
        if self.send_or_queue(g).is_err() {
            self.fail(&ErrorKind::WriteFailed);
        }
    }

    /// Records that a heartbeat intended at `t` is being sent.
    pub fn ping_sent(&self, t: u64) {
        let mut q = self.pings.lock().unwrap_or_else(|p| p.into_inner());
        if q.len() >= MAX_PINGS_IN_FLIGHT {
            q.pop_front();
        }
        q.push_back(t);
    }

    /// Takes back the heartbeat just queued by [`Link::ping_sent`] (it was not written).
    pub fn ping_unsent(&self) {
        self.pings
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop_back();
    }

    /// Says goodbye and closes (the flusher does it, after what is pending).
    pub fn close(&self) {
        self.closing.store(true, Ordering::Release);
        self.flush.notify_one();
    }

    /// Marks the link broken; only its first failure counts, and none once the tool
    /// itself is closing it.
    fn fail(&self, kind: &ErrorKind) {
        if self.alive.swap(false, Ordering::AcqRel) && !self.closing.load(Ordering::Acquire) {
            self.rec.error(self.key, kind);
        }
        self.flush.notify_one();
    }
}

impl Session {
    /// The client this session plays.
    pub fn spec(&self) -> &ClientSpec {
        &self.spec
    }

    /// Says goodbye and closes at once (storms that do not hold connections).
    pub async fn close(mut self) {
        let mut out = BytesMut::new();
        self.enc.bye(&mut out);
        let mut sealed = Vec::new();
        let out: &[u8] = match self.tls.as_mut() {
            Some(t) => {
                let _ = tls::seal(t, &out, &mut sealed);
                t.send_close_notify();
                let _ = tls::pending_records(t, &mut sealed);
                &sealed
            }
            None => &out,
        };
        let _ = self.stream.write_all(out).await;
        let _ = self.stream.shutdown().await;
    }

    /// Starts the reader and the flusher; returns the link and a task that ends when
    /// both have.
    pub fn spawn(self, env: &Env) -> (Arc<Link>, tokio::task::JoinHandle<()>) {
        let Session {
            spec,
            stream,
            enc,
            dec,
            rbuf,
            wire,
            tls,
        } = self;
        let is_tls = tls.is_some();
        let dest = spec.send.as_ref().map(|s| wire.dest(&s.to, s.group));
        let echo = spec.echo_to.as_ref().map(|a| wire.dest(a, false));
        let link = Arc::new(Link {
            key: spec.index as usize,
            spec,
            stream,
            out: Mutex::new(Outbox {
                enc,
                buf: BytesMut::with_capacity(4096),
                pending: BytesMut::new(),
                tls,
                sealed: Vec::new(),
            }),
            flush: Notify::new(),
            closing: AtomicBool::new(false),
            alive: AtomicBool::new(true),
            pings: Mutex::new(VecDeque::new()),
            dest,
            echo,
            payload_len: env.payload_len,
            max_pending: env.max_pending.max(1),
            rec: env.recorder.clone(),
        });
        let reader = tokio::spawn(read_loop(env.clone(), link.clone(), dec, rbuf, is_tls));
        let flusher = tokio::spawn(flush_loop(link.clone()));
        let task = tokio::spawn(async move {
            let _ = reader.await;
            let _ = flusher.await;
        });
        (link, task)
    }
}

/// Reads what the socket has now: plaintext into `rbuf`, or over TLS records into
/// `raw` that are opened (under the link's lock) into `rbuf`. `Ok(Some(0))`: the
/// server closed the connection (or its TLS session); `Ok(None)`: nothing to read.
fn try_read(
    link: &Link,
    raw: Option<&mut BytesMut>,
    rbuf: &mut BytesMut,
) -> Result<Option<usize>, ErrorKind> {
    let read = |buf: &mut BytesMut| match link.stream.try_read_buf(buf) {
        Ok(n) => Ok(Some(n)),
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(None),
        Err(_) => Err(ErrorKind::ReadFailed),
    };
    let Some(raw) = raw else {
        return read(rbuf);
    };
    raw.clear();
    let n = match read(raw)? {
        Some(0) => return Ok(Some(0)),
        Some(n) => n,
        None => return Ok(None),
    };
    let open = {
        let mut g = link.lock();
        let t = g.tls.as_mut().expect("a TLS link has its session");
        tls::open_records(t, raw, rbuf)?
    };
    link.send_tls_records();
    Ok(Some(if open { n } else { 0 }))
}

async fn read_loop(env: Env, link: Arc<Link>, mut dec: Decoder, mut rbuf: BytesMut, tls: bool) {
    let mut raw = tls.then(|| BytesMut::with_capacity(16 * 1024 + 256));
    let key = link.key;
    let rec = &env.recorder;
    let how = link.spec.receipt;
    let mut stamps: Vec<Stamp> = Vec::with_capacity(64);
    loop {
        let now = mono_ns();
        let mut stop = false;
        let mut replies = 0u64;
        loop {
            match dec.decode(&mut rbuf) {
                Ok(Some(ev)) => match ev {
                    Inbound::Data { stamp: Some(st) } => {
                        stamps.push(st);
                        if let Some(d) = link.echo.as_ref() {
                            let len = link.payload_len;
                            match link.write(|enc, buf| enc.data(buf, d, st, len)) {
                                Wrote::Ok => replies += 1,
                                Wrote::Full => rec.error(key, &ErrorKind::ReplyDropped),
                                Wrote::Closed => {}
                            }
                        }
                    }
                    Inbound::Data { stamp: None } => rec.error(key, &ErrorKind::Unstamped),
                    Inbound::Pong => {
                        let sent = link
                            .pings
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .pop_front();
                        if let Some(t) = sent {
                            rec.pong(key, t, now);
                        }
                    }
                    Inbound::Error { code, .. } | Inbound::RetryLater { code, .. } => {
                        rec.error(key, &ErrorKind::Server(code))
                    }
                    Inbound::WsPing(p) => {
                        let _ = link.write(|enc, buf| enc.ws_pong(buf, &p));
                    }
                    Inbound::Closed => {
                        if !link.closing.load(Ordering::Acquire) {
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
        rec.received(key, &stamps, now, how);
        stamps.clear();
        rec.sent(key, now, replies, 1);
        if stop {
            break;
        }
        if rbuf.capacity() - rbuf.len() < 4096 {
            rbuf.reserve(16 * 1024);
        }
        let r = match link.stream.readable().await {
            Ok(()) => match try_read(&link, raw.as_mut(), &mut rbuf) {
                Ok(None) => continue,
                Ok(Some(n)) => Ok(n),
                Err(e) => Err(e),
            },
            Err(_) => Err(ErrorKind::ReadFailed),
        };
        match r {
            Ok(0) => {
                if !link.closing.load(Ordering::Acquire) {
                    rec.error(key, &ErrorKind::Disconnected);
                }
                break;
            }
            Ok(_) => {}
            Err(e) => {
                if !link.closing.load(Ordering::Acquire) {
                    rec.error(key, &e);
                }
                break;
            }
        }
    }
    link.alive.store(false, Ordering::Release);
    link.flush.notify_one();
    rec.counters.connected.fetch_sub(1, Ordering::Relaxed);
}

/// How long a closing link waits for its pending bytes and goodbye to leave.
const CLOSE_GRACE: Duration = Duration::from_secs(2);

async fn flush_loop(link: Arc<Link>) {
    loop {
        link.flush.notified().await;
        if link.closing.load(Ordering::Acquire) {
            let _ = link.write(|enc, buf| enc.bye(buf));
            if let Some(t) = link.lock().tls.as_mut() {
                t.send_close_notify();
            }
            link.send_tls_records();
            let _ = tokio::time::timeout(CLOSE_GRACE, drain(&link)).await;
            link.alive.store(false, Ordering::Release);
            let _ = socket2::SockRef::from(&link.stream).shutdown(std::net::Shutdown::Write);
            return;
        }
        if !link.alive() {
            return;
        }
        if drain(&link).await.is_err() {
            link.fail(&ErrorKind::WriteFailed);
            return;
        }
    }
}

/// Sends the pending bytes as the socket drains.
async fn drain(link: &Link) -> std::io::Result<()> {
    loop {
        if link.lock().pending.is_empty() {
            return Ok(());
        }
        link.stream.writable().await?;
        let r = link.stream.try_io(Interest::WRITABLE, || {
            let mut g = link.lock();
            let n = send_now(&link.stream, &g.pending)?;
            g.pending.advance(n);
            if g.pending.is_empty() {
                Ok(())
            } else {
                Err(std::io::ErrorKind::WouldBlock.into())
            }
        });
        match r {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
}
