//! MQTT clients in the address space: a client id is an address owned by
//! the shard it hashes to, topics are groups (docs/mqtt.md, "Mapping").
//!
//! Each shard keeps:
//! - `local`: a [`SubscriptionTrie`] of the subscriptions of the sessions it
//!   owns (address → the filter as sent, its options and identifier);
//! - `remote`: a trie of (filter, shard) pairs, one per filter a shard has
//!   subscribers of, replicated to every shard (`Cross::MqttFilter`) like
//!   the group masks. A publish walks it once to learn which shards have a
//!   matching filter (and, for each `$share` group, the one shard whose
//!   turn it is) and sends the message only there; each shard then matches
//!   its local trie;
//! - `retained`: the retained messages, replicated to every shard
//!   (`Cross::MqttRetain`), so a new subscription is answered locally;
//! - `offline`: the persistent sessions whose client is away, kept until
//!   their expiry, receiving (queueing) what their subscriptions match.
//!
//! In a cluster, a shard also tells the link when it gets its first (or
//! loses its last) subscriber of a filter (`Remote::MqttFilter`); the
//! link announces the node's filters and sends each publish once to each
//! node with a matching filter: with the group fan-out when the topic is a
//! group (`Remote::Fanout`, carrying the MQTT message when an MQTT client
//! published it), else on its own (`Remote::MqttPublish`). What arrives is
//! routed here as a local publish ([`Router::mqtt_from_node`]) and never
//! forwarded again. A share group is served here when this node has
//! members (the filters served travel with the item, so the link skips
//! them), else the link picks one node with members, and only that node
//! serves it.

use std::collections::HashMap;
use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;

use bytes::{Bytes, BytesMut};
use relay_core::conn::{CloseReason, Hello, Now, Role};
use relay_core::frame::{Flags, Frame};
use relay_core::mqtt::session::{
    CloseReason as MqttClose, Delivery, Event as MqttEvent, Session, SessionConfig, Subscription,
};
use relay_core::mqtt::{
    Connect, Message, QoS, RetainConfig, RetainedStore, SubOptions, SubscriptionTrie, reason,
};
use relay_core::route::{assign_address, shard_of};

use super::*;
use crate::cell::ConnCell;
use crate::stats::{DropReason, ShardStats};

/// The `[mqtt]` settings the router uses.
#[derive(Debug, Clone)]
pub struct MqttSettings {
    pub session: SessionConfig,
    pub retain: RetainConfig,
    /// `<inbox>/<src>`: the topic DATA to an MQTT client arrives on.
    pub inbox: Bytes,
    /// `<outbox>/<dst>`: the topic an MQTT client sends DATA to `<dst>` on.
    pub outbox: Bytes,
}

impl MqttSettings {
    pub fn from_config(m: &relay_config::MqttConfig) -> MqttSettings {
        let session = SessionConfig {
            max_packet_size: m.max_packet_size,
            receive_maximum: m.receive_maximum,
            max_inflight: m.max_inflight,
            max_queued_messages: m.max_queued_messages,
            max_queued_bytes: m.max_queued_bytes,
            max_session_expiry_s: m.max_session_expiry_s,
            connect_timeout_ms: m.connect_timeout_ms,
            max_subscriptions: m.max_subscriptions,
            client_id_is_address: true,
            ..SessionConfig::default()
        };
        MqttSettings {
            session,
            retain: RetainConfig {
                max_messages: m.max_retained_messages,
                max_bytes: m.max_retained_bytes,
            },
            inbox: Bytes::from(m.inbox_prefix.clone().into_bytes()),
            outbox: Bytes::from(m.outbox_prefix.clone().into_bytes()),
        }
    }
}

impl Default for MqttSettings {
    fn default() -> Self {
        MqttSettings::from_config(&relay_config::MqttConfig::default())
    }
}

/// One MQTT connection's state, kept in its [`ConnCell`].
#[derive(Debug)]
pub struct MqttConn {
    pub session: Session,
    /// The CONNECT waiting to be answered (it travels with a handover).
    pub connect: Option<Box<Connect>>,
    /// Another connection took the session over: this one only flushes its
    /// last bytes and closes; its close touches nothing.
    pub detached: bool,
    /// The client came over WebSocket (`/mqtt`): the runtime's framing
    /// state, which travels with the session on a handover.
    pub ws: Option<Box<MqttWs>>,
}

/// What the runtime keeps for an MQTT client over WebSocket, between the
/// WebSocket messages and the session's byte stream.
#[derive(Debug, Default)]
pub struct MqttWs {
    /// MQTT bytes taken out of binary messages and not yet a whole packet
    /// (a packet may span messages, a message may hold several).
    pub input: BytesMut,
    /// The pong owed for the latest ping, not yet written (one at most: a
    /// newer ping replaces it, RFC 6455 5.5.3), so pings cannot pile up
    /// output.
    pub pong: Option<Bytes>,
    /// The close frame to write after what the session has queued.
    pub control: BytesMut,
    /// Session bytes in the frame being written: confirmed to the session
    /// once the frame is out.
    pub sent: usize,
}

impl MqttConn {
    pub fn new(cfg: &SessionConfig, now: Now) -> MqttConn {
        MqttConn {
            session: Session::new(cfg, now),
            connect: None,
            detached: false,
            ws: None,
        }
    }
}

/// A local subscription: what the trie keeps per (filter, address).
#[derive(Debug, Clone)]
pub(super) struct LocalSub {
    /// The filter as sent (`$share/<g>/<f>` for a shared one).
    filter: Bytes,
    options: SubOptions,
    id: Option<u32>,
}

impl LocalSub {
    fn as_subscription(&self) -> Subscription {
        Subscription {
            filter: self.filter.clone(),
            options: self.options,
            id: self.id,
            is_new: false,
        }
    }
}

/// The MQTT state of one shard.
#[derive(Default)]
pub(super) struct MqttIndex {
    local: SubscriptionTrie<Bytes, LocalSub>,
    /// Local subscriptions per filter (as sent): the shard is in `remote`
    /// for the filter while this is above 0.
    counts: HashMap<Bytes, u32>,
    /// (filter as sent, shard) for every shard with subscribers; the
    /// options are the filter again (a share group's members are shards).
    remote: SubscriptionTrie<u16, Bytes>,
    retained: RetainedStore,
    offline: HashMap<Bytes, Box<MqttConn>>,
}

/// Most persistent sessions one shard keeps for clients that are away; a
/// session closing beyond it ends at once.
const MAX_OFFLINE_SESSIONS: usize = 100_000;

/// The relay's close reason for an MQTT one.
fn close_reason(r: MqttClose) -> CloseReason {
    match r {
        MqttClose::Disconnect(_) => CloseReason::Bye,
        MqttClose::KeepAliveTimeout => CloseReason::IdleTimeout,
        MqttClose::ConnectTimeout => CloseReason::HelloTimeout,
        MqttClose::Refused(reason::BAD_USER_NAME_OR_PASSWORD | reason::NOT_AUTHORIZED) => {
            CloseReason::Unauthorized
        }
        MqttClose::Refused(_) | MqttClose::ProtocolError(_) => CloseReason::ProtocolError,
        MqttClose::TakenOver => CloseReason::Replaced,
        MqttClose::Server(_) => CloseReason::Kicked,
        MqttClose::PeerClosed => CloseReason::PeerClosed,
    }
}

/// A message from an MQTT client as the rules see it: MQTT has no JSON
/// flag, so a payload that is JSON text is marked JSON (the rules get it
/// parsed, as from a native client that sent JSON).
fn for_rules(mut f: Frame) -> Frame {
    let json = serde_json::from_slice::<serde::de::IgnoredAny>(&f.payload).is_ok();
    f.flags = f.flags.with(Flags::JSON, json);
    f
}

/// The DISCONNECT reason code for a connection the relay ends.
fn disconnect_code(r: CloseReason) -> u8 {
    match r {
        CloseReason::Replaced => reason::SESSION_TAKEN_OVER,
        CloseReason::Shutdown | CloseReason::GoingAway => reason::SERVER_SHUTTING_DOWN,
        CloseReason::Busy => reason::SERVER_BUSY,
        CloseReason::Unauthorized => reason::NOT_AUTHORIZED,
        CloseReason::IdleTimeout => reason::KEEP_ALIVE_TIMEOUT,
        _ => reason::ADMINISTRATIVE_ACTION,
    }
}

impl Router {
    fn mqtt_cfg(&self) -> Arc<MqttSettings> {
        self.cfg.borrow().mqtt.clone()
    }

    /// The relay ends an MQTT connection (kick, takeover, shutdown,
    /// upgrade): an MQTT 5 client gets DISCONNECT with the reason code of
    /// `reason` (a connection already told, taken over, only closes); 3.1.1
    /// is just closed. The will goes out, as on any close the client did not
    /// ask for. False when the connection is not MQTT.
    pub(super) fn mqtt_end(
        &self,
        cell: &Rc<ConnCell>,
        reason: CloseReason,
        deadline_ms: u64,
    ) -> bool {
        if cell.mqtt.borrow().is_none() {
            return false;
        }
        // The relay's reason first: the session's own (`close_reason`) is
        // coarser and must not win.
        cell.closing(reason, deadline_ms);
        let now = crate::rt::now();
        if let Some(m) = cell.mqtt.borrow_mut().as_mut().filter(|m| !m.detached) {
            m.session.disconnect(now, disconnect_code(reason));
        }
        self.mqtt_poll_events(cell, now);
        self.wake(cell);
        true
    }

    /// Routes one event of an MQTT connection's session.
    pub fn on_mqtt_event(&self, cell: &Rc<ConnCell>, ev: MqttEvent, now: Now) -> Outcome {
        ShardStats::add(&self.stats.frames_in, 1);
        match ev {
            MqttEvent::Connect(c) => return self.mqtt_connect(cell, c, now),
            MqttEvent::Publish(msg) => {
                let src = cell.conn.borrow().addr().clone();
                self.mqtt_client_publish(Some(cell), &src, msg, now);
            }
            MqttEvent::Subscribe(subs) => {
                let addr = cell.conn.borrow().addr().clone();
                self.mqtt_subscribe(&addr, subs, now);
            }
            MqttEvent::Unsubscribe(filters) => {
                let addr = cell.conn.borrow().addr().clone();
                for f in filters {
                    self.mqtt_unsubscribe(&addr, &f);
                }
            }
            other => self.mqtt_other_event(cell, other, now),
        }
        Outcome::Continue
    }

    /// Events not tied to input: the close, the will, the end.
    fn mqtt_other_event(&self, cell: &Rc<ConnCell>, ev: MqttEvent, now: Now) {
        match ev {
            MqttEvent::Closed(r) => {
                cell.closing(close_reason(r), now.mono_ms + self.cfg().close_grace_ms);
                self.wake(cell);
            }
            MqttEvent::Will(msg) => {
                let src = cell.conn.borrow().addr().clone();
                self.mqtt_client_publish(None, &src, msg, now);
            }
            MqttEvent::SessionEnded => {
                let addr = cell.conn.borrow().addr().clone();
                if !addr.is_empty() {
                    self.mqtt_drop_subscriptions(&addr);
                }
            }
            _ => {}
        }
    }

    /// Takes the events the session queued outside input (after input, a
    /// deadline or a takeover).
    pub fn mqtt_poll_events(&self, cell: &Rc<ConnCell>, now: Now) {
        for _ in 0..64 {
            let ev = match cell.mqtt.borrow_mut().as_mut() {
                Some(m) if !m.detached => m.session.poll_event(),
                _ => None,
            };
            let Some(ev) = ev else { break };
            if let Outcome::Handover { .. } = self.on_mqtt_event(cell, ev, now) {
                break;
            }
        }
    }

    /// A CONNECT: authenticate, find the owner shard (hand the connection
    /// over when it is another), take over or resume an earlier session.
    pub fn mqtt_connect(&self, cell: &Rc<ConnCell>, c: Box<Connect>, now: Now) -> Outcome {
        let mcfg = self.mqtt_cfg();
        let refuse = |code: u8| {
            if let Some(m) = cell.mqtt.borrow_mut().as_mut() {
                m.session.refuse(code);
            }
            self.mqtt_poll_events(cell, now);
            Outcome::Continue
        };
        if self.shutting_down.get() {
            return refuse(reason::SERVER_UNAVAILABLE);
        }
        // A device certificate (`[listeners] mqtt_tls` with mutual TLS) is
        // the identity: it names the client id (an empty one becomes it), a
        // CONNECT naming another id is not authorized, and no password is
        // needed. The certificate travels with the connection on a handover.
        let cert = cell.conn.borrow().certified().cloned();
        let client_id = match cert.as_ref() {
            Some(name) if c.client_id.is_empty() || *name == c.client_id => name.clone(),
            Some(_) => return refuse(reason::NOT_AUTHORIZED),
            None => c.client_id.clone(),
        };
        let cfg = self.cfg();
        let password = c.password.as_deref().unwrap_or_default();
        let privileged = match (&cfg.conn.service_token, &cfg.conn.auth_secret) {
            (Some(s), _) => relay_core::auth::same_secret(password, s),
            (None, None) => true,
            (None, Some(_)) => false,
        };
        let device = cert.is_some()
            || cfg.conn.auth_secret.as_ref().is_some_and(|secret| {
                !c.client_id.is_empty()
                    && std::str::from_utf8(password)
                        .is_ok_and(|p| relay_core::auth::verify_token(secret, &c.client_id, p))
            });
        if cfg.conn.auth_secret.is_some() && !privileged && !device {
            return refuse(reason::BAD_USER_NAME_OR_PASSWORD);
        }
        let auth = if cert.is_some() {
            relay_core::acl::Auth::Certificate
        } else if privileged && cfg.conn.service_token.is_some() {
            relay_core::acl::Auth::ServiceToken
        } else if device {
            relay_core::acl::Auth::Token
        } else {
            relay_core::acl::Auth::None
        };
        let hello = Hello {
            addr: client_id.clone(),
            role: if privileged && cfg.conn.service_token.is_some() {
                Role::Service
            } else {
                Role::Controller
            },
            // MQTT keep alive is the session's; the relay's idle clock never fires.
            heartbeat_s: u32::MAX,
            meta: Bytes::new(),
            seq: 0,
            ack_req: false,
            privileged,
            auth,
        };
        if client_id.is_empty() {
            // The session refuses an empty id without clean start itself.
            let mut counter = self.assign_counter.get();
            let prefix = format!("{}-mqtt-", cfg.node);
            let addr = assign_address(&prefix, self.shard, self.shards, &mut counter);
            self.assign_counter.set(counter);
            let addr = Bytes::from(addr);
            self.mqtt_accept(cell, &hello, addr, true, now, &mcfg);
            return Outcome::Continue;
        }
        let owner = shard_of(&client_id, self.shards);
        if owner != self.shard {
            if let Some(m) = cell.mqtt.borrow_mut().as_mut() {
                m.connect = Some(c);
            }
            return Outcome::Handover { owner, hello };
        }
        // Its own allocation, not a slice of the read that carried the
        // CONNECT (which it would keep alive).
        let client_id = Bytes::copy_from_slice(&client_id);
        self.mqtt_accept(cell, &hello, client_id, c.clean_start, now, &mcfg);
        Outcome::Continue
    }

    /// The owner accepts: an earlier connection of the id is taken over,
    /// an offline session resumed (unless clean start) or discarded.
    #[allow(clippy::too_many_arguments)]
    fn mqtt_accept(
        &self,
        cell: &Rc<ConnCell>,
        hello: &Hello,
        addr: Bytes,
        clean: bool,
        now: Now,
        mcfg: &MqttSettings,
    ) {
        let mut resumed = None;
        // An earlier MQTT connection of this id: taken over (DISCONNECT
        // 0x8E, its will); its session, if persistent, is resumed here.
        if let Some(old) = self.lookup(&addr)
            && old.id != cell.id
        {
            let took = match old.mqtt.borrow_mut().as_mut() {
                Some(m) if !m.detached => {
                    m.session.take_over(now);
                    true
                }
                _ => false,
            };
            if took {
                self.mqtt_poll_events(&old, now);
                let mut m = old.mqtt.borrow_mut();
                if let Some(m) = m.as_mut() {
                    m.detached = true;
                    resumed = self.mqtt_resume(&addr, &mut m.session, clean, now);
                }
            }
        }
        let offline = self.mqtt.borrow_mut().offline.remove(&addr);
        if let Some(mut old) = offline {
            resumed = self.mqtt_resume(&addr, &mut old.session, clean, now);
        }
        // The connection and the session share the address's allocation.
        self.accept_hello_owned(cell, hello, addr.clone(), now);
        // The session writes this client's bytes: the WELCOME the native
        // protocol state queued would be held, never sent.
        cell.conn.borrow_mut().discard_output();
        ShardStats::add(&self.stats.mqtt_connects, 1);
        if let Some(m) = cell.mqtt.borrow_mut().as_mut() {
            m.connect = None;
            // The session's client id shares the address's allocation; a
            // client that sent none is told the one it was given.
            m.session.accept(&mcfg.session, now, resumed, Some(addr));
        }
        self.mqtt_poll_events(cell, now);
        self.wake(cell);
    }

    /// The state of an offline session for a new connection, or (clean
    /// start) the session discarded: its pending will goes out and its
    /// subscriptions go.
    fn mqtt_resume(
        &self,
        addr: &Bytes,
        session: &mut Session,
        clean: bool,
        now: Now,
    ) -> Option<relay_core::mqtt::SessionState> {
        if !session.is_offline() {
            return None;
        }
        if !clean {
            return session.take_state();
        }
        session.discard(now);
        while let Some(ev) = session.poll_event() {
            match ev {
                MqttEvent::Will(msg) => self.mqtt_client_publish(None, addr, msg, now),
                MqttEvent::SessionEnded => self.mqtt_drop_subscriptions(addr),
                _ => {}
            }
        }
        None
    }

    /// Events of an offline session (its will, its end).
    fn mqtt_offline_events(&self, addr: &Bytes, m: &mut MqttConn, now: Now) {
        while let Some(ev) = m.session.poll_event() {
            match ev {
                MqttEvent::Will(msg) => self.mqtt_client_publish(None, addr, msg, now),
                MqttEvent::SessionEnded => self.mqtt_drop_subscriptions(addr),
                _ => {}
            }
        }
    }

    /// An MQTT connection's socket closed: its will, and its session kept
    /// offline if persistent.
    pub fn mqtt_closed(&self, cell: &Rc<ConnCell>, now: Now) {
        let Some(mut m) = cell.mqtt.borrow_mut().take() else {
            return;
        };
        if m.detached {
            return;
        }
        m.session.handle_closed(now);
        let addr = cell.conn.borrow().addr().clone();
        if addr.is_empty() {
            return;
        }
        self.mqtt_offline_events(&addr, &mut m, now);
        if m.session.is_offline() {
            let mut idx = self.mqtt.borrow_mut();
            if idx.offline.len() < MAX_OFFLINE_SESSIONS {
                idx.offline.insert(addr, m);
                return;
            }
            drop(idx);
            self.mqtt_drop_subscriptions(&addr);
        }
    }

    /// Deadlines of the offline sessions (will delay, expiry).
    pub(super) fn mqtt_sweep_offline(&self, now: Now) {
        let due: Vec<Bytes> = self
            .mqtt
            .borrow()
            .offline
            .iter()
            .filter(|(_, m)| m.session.poll_timeout().is_some_and(|t| t <= now.mono_ms))
            .map(|(a, _)| a.clone())
            .collect();
        for addr in due {
            let Some(mut m) = self.mqtt.borrow_mut().offline.remove(&addr) else {
                continue;
            };
            m.session.handle_timeout(now);
            self.mqtt_offline_events(&addr, &mut m, now);
            if m.session.is_offline() {
                self.mqtt.borrow_mut().offline.insert(addr, m);
            }
        }
    }

    /// The session's next deadline (keep alive, connect timeout).
    pub(super) fn mqtt_timeout(&self, cell: &ConnCell) -> Option<u64> {
        match cell.mqtt.try_borrow() {
            Ok(m) => m
                .as_ref()
                .filter(|m| !m.detached)
                .and_then(|m| m.session.poll_timeout()),
            Err(_) => Some(0),
        }
    }

    pub(super) fn mqtt_deadline(&self, cell: &Rc<ConnCell>, now: Now) {
        let due = match cell.mqtt.borrow_mut().as_mut() {
            Some(m)
                if !m.detached && m.session.poll_timeout().is_some_and(|t| t <= now.mono_ms) =>
            {
                m.session.handle_timeout(now);
                true
            }
            _ => false,
        };
        if due {
            self.mqtt_poll_events(cell, now);
            self.wake(cell);
        }
    }

    /// A message an MQTT client published (or its will): to the native
    /// members of group `topic`, to the MQTT subscribers, and to address
    /// `<dst>` when the topic is `<outbox>/<dst>`.
    fn mqtt_client_publish(
        &self,
        cell: Option<&Rc<ConnCell>>,
        src: &Bytes,
        msg: Message,
        now: Now,
    ) {
        let mcfg = self.mqtt_cfg();
        ShardStats::add(&self.stats.mqtt_publishes_in, 1);
        if let Some(dst) = msg
            .topic
            .strip_prefix(&mcfg.outbox[..])
            .and_then(|r| r.strip_prefix(b"/"))
        {
            let to_rules = dst == relay_core::name::RULES_DST;
            if !to_rules && relay_core::validate_name(dst).is_err() {
                self.stats.dropped(DropReason::NoRoute);
                return;
            }
            let dst = msg.topic.slice_ref(dst);
            if let Some(c) = cell
                && self.access(c, relay_core::acl::Action::Send, &dst).is_err()
            {
                self.stats.dropped(DropReason::Forbidden);
                return;
            }
            let frame = Frame::data(src.clone(), dst, msg.payload.clone());
            self.tap(&frame, now);
            if to_rules {
                // Meant for the rules only, as from a native client.
                if self.hooks.borrow().is_none() {
                    self.stats.dropped(DropReason::NoRoute);
                    return;
                }
                self.hook_message(&for_rules(frame), false, now);
                return;
            }
            let hooked = self
                .hooks
                .borrow()
                .is_some()
                .then(|| for_rules(frame.clone()));
            self.unicast(frame, None, now);
            if let Some(f) = hooked {
                self.hook_message(&f, false, now);
            }
            return;
        }
        if let Some(c) = cell
            && self
                .access(c, relay_core::acl::Action::Publish, &msg.topic)
                .is_err()
        {
            self.stats.dropped(DropReason::Forbidden);
            return;
        }
        if msg.retain {
            self.mqtt_retain(msg.clone(), true);
        }
        let watch = msg.topic.starts_with(WATCH_PREFIX);
        let native = !watch && relay_core::validate_name(&msg.topic).is_ok();
        let as_group = || {
            let mut f = Frame::data(src.clone(), msg.topic.clone(), msg.payload.clone());
            f.flags = f.flags.with(Flags::GROUP, true);
            f
        };
        let frame = native.then(as_group);
        if let Some(f) = &frame {
            self.tap(f, now);
        }
        // The rules see every topic, `/` and all, as the group.
        let hooked = (!watch && self.hooks.borrow().is_some()).then(|| for_rules(as_group()));
        let cluster = self.clustered();
        // Other nodes get the message once each: with the group publish when
        // the topic is a group name, else on its own.
        let remote = cluster.then(|| Box::new(MqttMsg::leaving(msg.clone(), now.mono_ms)));
        let shared = self.mqtt_route(src, msg, None, now);
        match (frame, remote) {
            (Some(f), remote) => {
                let name = f.dst.clone();
                self.fanout_native(
                    Index::Group,
                    &name,
                    f,
                    Vec::new(),
                    None,
                    cluster,
                    remote,
                    shared,
                    now,
                );
            }
            (None, Some(msg)) => self.push_remote(Remote::MqttPublish {
                src: src.clone(),
                msg,
                shared,
            }),
            (None, None) => {}
        }
        if let Some(f) = hooked {
            self.hook_message(&f, true, now);
        }
    }

    /// An MQTT message from another node: kept when retained, and delivered
    /// to this node's matching subscriptions and the share groups of
    /// `shared` (never forwarded again).
    pub(super) fn mqtt_from_node(&self, src: &Bytes, m: MqttMsg, shared: &[Bytes], now: Now) {
        let msg = m.arrived(now.mono_ms);
        if msg.retain {
            self.mqtt_retain(msg.clone(), true);
        }
        self.mqtt_route(src, msg, Some(shared), now);
    }

    /// A native group publish seen by the MQTT subscribers of topic `name`
    /// (`only`: see [`Router::mqtt_route`]); returns the `$share` filters
    /// whose group got it.
    pub(super) fn mqtt_from_group(
        &self,
        name: &Bytes,
        frame: &Frame,
        only: Option<&[Bytes]>,
        now: Now,
    ) -> Vec<Bytes> {
        if name.starts_with(WATCH_PREFIX) || self.mqtt.borrow().remote.is_empty() {
            return Vec::new();
        }
        let msg = Message::new(name.clone(), frame.payload.clone(), QoS::AtLeastOnce);
        self.mqtt_route(&frame.src, msg, only, now)
    }

    /// Sends `msg` to the shards whose subscriptions match its topic: every
    /// plain subscription, and one member of each matching share group (of
    /// the groups whose filter is in `only`, when given: a message from
    /// another node). Returns the `$share` filters whose group got it.
    fn mqtt_route(
        &self,
        src: &Bytes,
        msg: Message,
        only: Option<&[Bytes]>,
        now: Now,
    ) -> Vec<Bytes> {
        let mut mask: u64 = 0;
        let mut shared: HashMap<u16, Vec<Bytes>> = HashMap::new();
        let mut served = Vec::new();
        self.mqtt.borrow().remote.for_each_match(&msg.topic, |m| {
            if m.group.is_some() {
                if only.is_some_and(|o| !o.contains(m.options)) {
                    return;
                }
                served.push(m.options.clone());
                shared.entry(*m.id).or_default().push(m.options.clone());
            } else {
                mask |= 1 << *m.id;
            }
        });
        for s in shared.keys() {
            mask |= 1 << *s;
        }
        for s in 0..self.shards {
            if mask & (1 << s) == 0 || s == self.shard {
                continue;
            }
            ShardStats::add(&self.stats.cross_frames, 1);
            self.push(
                s,
                Cross::MqttPublish {
                    src: src.clone(),
                    msg: msg.clone(),
                    shared: shared.remove(&(s as u16)).unwrap_or_default(),
                },
            );
        }
        if mask & (1 << self.shard) != 0 {
            let mine = shared.remove(&(self.shard as u16)).unwrap_or_default();
            self.mqtt_deliver_matches(src, &msg, &mine, now);
        }
        served
    }

    /// Delivers `msg` to this shard's matching subscriptions: every plain
    /// one, and the shared ones whose filter is in `shared` (this shard's
    /// turn for that group).
    pub(super) fn mqtt_deliver_matches(
        &self,
        src: &Bytes,
        msg: &Message,
        shared: &[Bytes],
        now: Now,
    ) {
        let mut hits: Vec<(Bytes, LocalSub)> = Vec::new();
        self.mqtt.borrow().local.for_each_match(&msg.topic, |m| {
            if m.group.is_some() && !shared.contains(&m.options.filter) {
                return;
            }
            if m.options.options.no_local && m.id == src {
                return;
            }
            hits.push((m.id.clone(), m.options.clone()));
        });
        for (addr, sub) in hits {
            let d = Delivery::routed(&sub.as_subscription(), msg);
            self.mqtt_deliver_to(&addr, msg, &d, now);
        }
    }

    /// Delivers to the session of `addr` (connected or offline).
    fn mqtt_deliver_to(&self, addr: &Bytes, msg: &Message, d: &Delivery, now: Now) -> bool {
        let scfg = &self.mqtt_cfg().session;
        if let Some(cell) = self.lookup(addr) {
            let r = match cell.mqtt.borrow_mut().as_mut() {
                Some(m) if !m.detached => m.session.deliver(scfg, now, msg, d),
                _ => return false,
            };
            self.wake(&cell);
            return self.mqtt_counted(r);
        }
        let r = match self.mqtt.borrow_mut().offline.get_mut(addr) {
            Some(m) => m.session.deliver(scfg, now, msg, d),
            None => return false,
        };
        self.mqtt_counted(r)
    }

    fn mqtt_counted(&self, r: Result<(), relay_core::mqtt::DeliverError>) -> bool {
        match r {
            Ok(()) => {
                ShardStats::add(&self.stats.frames_out, 1);
                ShardStats::add(&self.stats.mqtt_publishes_out, 1);
                true
            }
            Err(_) => {
                self.stats.dropped(DropReason::SlowConsumer);
                false
            }
        }
    }

    /// DATA (or a uid send) to an MQTT client: PUBLISH on `<inbox>/<src>`
    /// (a group member gets the group as topic), at the QoS of a matching
    /// subscription when it has one, else QoS 1.
    pub(super) fn mqtt_deliver_frame(
        &self,
        cell: &ConnCell,
        frame: &Frame,
        now: Now,
    ) -> Result<(), Failure> {
        let mcfg = self.mqtt_cfg();
        let topic = if frame.flags.group() {
            frame.dst.clone()
        } else {
            let mut t = BytesMut::with_capacity(mcfg.inbox.len() + 1 + frame.src.len());
            t.extend_from_slice(&mcfg.inbox);
            t.extend_from_slice(b"/");
            t.extend_from_slice(&frame.src);
            t.freeze()
        };
        let msg = Message::new(topic, frame.payload.clone(), QoS::AtLeastOnce);
        let r = {
            let mut m = cell.mqtt.borrow_mut();
            let Some(m) = m.as_mut().filter(|m| !m.detached) else {
                self.stats.dropped(DropReason::NoRoute);
                return Err(failure::offline(&frame.dst));
            };
            let sub = m
                .session
                .subscriptions()
                .find(|(f, _, _)| {
                    relay_core::mqtt::parse_filter(f).is_ok_and(|p| {
                        p.group.is_none() && relay_core::mqtt::matches(p.filter, &msg.topic)
                    })
                })
                .map(|(_, o, id)| (o.qos, id));
            let d = Delivery {
                qos: sub.map_or(QoS::AtLeastOnce, |s| s.0),
                retain: false,
                subscription_id: sub.and_then(|s| s.1),
            };
            m.session.deliver(&mcfg.session, now, &msg, &d)
        };
        self.wake(cell);
        if self.mqtt_counted(r) {
            Ok(())
        } else {
            Err(failure::slow_consumer(&frame.dst))
        }
    }

    /// New or changed subscriptions of `addr`: indexed, told to the other
    /// shards when a filter is new here, answered with retained messages.
    fn mqtt_subscribe(&self, addr: &Bytes, subs: Vec<Subscription>, now: Now) {
        let scfg = self.mqtt_cfg().session.clone();
        for sub in subs {
            let entry = LocalSub {
                filter: sub.filter.clone(),
                options: sub.options,
                id: sub.id,
            };
            let old = self
                .mqtt
                .borrow_mut()
                .local
                .insert(&sub.filter, addr.clone(), entry);
            match old {
                Ok(None) => self.mqtt_count(&sub.filter, true),
                Ok(Some(_)) => {}
                Err(_) => continue,
            }
            let shared = relay_core::mqtt::parse_filter(&sub.filter)
                .map(|f| f.group.is_some())
                .unwrap_or(true);
            let send = match sub.options.retain_handling {
                relay_core::mqtt::RetainHandling::SendAtSubscribe => true,
                relay_core::mqtt::RetainHandling::SendIfNew => sub.is_new,
                relay_core::mqtt::RetainHandling::DontSend => false,
            };
            if shared || !send {
                continue;
            }
            let mut msgs = Vec::new();
            self.mqtt
                .borrow()
                .retained
                .for_each_match(&sub.filter, now.mono_ms, |m: &Message| msgs.push(m.clone()));
            let d = Delivery::retained(&sub);
            if let Some(cell) = self.lookup(addr) {
                if let Some(m) = cell.mqtt.borrow_mut().as_mut() {
                    for msg in &msgs {
                        let _ = m.session.deliver(&scfg, now, msg, &d);
                    }
                }
                self.wake(&cell);
            }
        }
    }

    fn mqtt_unsubscribe(&self, addr: &Bytes, filter: &Bytes) {
        let removed = self.mqtt.borrow_mut().local.remove(filter, addr).is_some();
        if removed {
            self.mqtt_count(filter, false);
        }
    }

    /// Removes every subscription of `addr` (its session ended).
    fn mqtt_drop_subscriptions(&self, addr: &Bytes) {
        // The session's own list is gone with it; the trie is walked by the
        // filters this shard holds (each at most once).
        let filters: Vec<Bytes> = self.mqtt.borrow().counts.keys().cloned().collect();
        for f in filters {
            self.mqtt_unsubscribe(addr, &f);
        }
    }

    /// One more (or one less) local subscription to `filter`.
    fn mqtt_count(&self, filter: &Bytes, add: bool) {
        let changed = {
            let mut idx = self.mqtt.borrow_mut();
            let n = idx.counts.entry(filter.clone()).or_insert(0);
            if add {
                *n += 1;
                *n == 1
            } else {
                *n = n.saturating_sub(1);
                let gone = *n == 0;
                if gone {
                    idx.counts.remove(filter);
                }
                gone
            }
        };
        if !changed {
            return;
        }
        // Other nodes learn of every filter, `$share` ones included.
        if self.clustered() {
            self.push_remote(Remote::MqttFilter {
                filter: filter.clone(),
                has: add,
            });
        }
        self.mqtt_filter(self.shard, filter.clone(), add);
        for s in 0..self.shards {
            if s != self.shard {
                self.push(
                    s,
                    Cross::MqttFilter {
                        filter: filter.clone(),
                        has: add,
                    },
                );
            }
        }
    }

    /// Shard `shard` has (or no longer has) subscribers of `filter`.
    pub(super) fn mqtt_filter(&self, shard: usize, filter: Bytes, has: bool) {
        let mut idx = self.mqtt.borrow_mut();
        if has {
            let _ = idx.remote.insert(&filter.clone(), shard as u16, filter);
        } else {
            idx.remote.remove(&filter, &(shard as u16));
        }
    }

    /// Stores (or with an empty payload deletes) a retained message, here
    /// and, when `spread`, on every other shard.
    pub(super) fn mqtt_retain(&self, msg: Message, spread: bool) {
        let rcfg = self.mqtt_cfg().retain.clone();
        {
            let mut idx = self.mqtt.borrow_mut();
            if msg.payload.is_empty() {
                idx.retained.remove(&msg.topic);
            } else if idx.retained.set(&rcfg, &msg).is_err() {
                self.stats.dropped(DropReason::SlowConsumer);
            }
            self.stats
                .mqtt_retained
                .store(idx.retained.len() as u64, Relaxed);
        }
        if spread {
            for s in 0..self.shards {
                if s != self.shard {
                    self.push(s, Cross::MqttRetain { msg: msg.clone() });
                }
            }
        }
    }

    /// Number of sessions this shard keeps for clients that are away.
    pub fn mqtt_offline_count(&self) -> usize {
        self.mqtt.borrow().offline.len()
    }
}
