//! The router's side of a cluster: what a shard hands to the cluster link
//! (the NATS thread) and what the link hands back. Used only when
//! `[cluster] enabled`; a single relay never builds these.
//!
//! A shard gives an item to the link only where a single relay would have
//! answered `no_route` (no shard of this node holds the address), or where a
//! fan-out or an MQTT publish may have recipients on other nodes, so the
//! local path is unchanged.

use std::sync::Arc;

use bytes::Bytes;
use relay_core::conn::Now;
use relay_core::frame::{ErrorCode, Frame};

use super::*;
use crate::cell::ConnId;
use crate::stats::DropReason;

/// Where the answer to an item that came from another node goes: that
/// node, and the token it gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplyTo {
    pub node: Arc<str>,
    pub token: u64,
}

/// An MQTT message crossing nodes: the message with its QoS, RETAIN flag
/// and properties, and what is left of its expiry (`ttl_ms`), since
/// monotonic clocks differ between nodes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MqttMsg {
    pub msg: relay_core::mqtt::Message,
    pub ttl_ms: Option<u64>,
}

impl MqttMsg {
    /// `msg` as it leaves this node at `now_ms` (monotonic).
    pub fn leaving(mut msg: relay_core::mqtt::Message, now_ms: u64) -> MqttMsg {
        let ttl_ms = msg.expires_at.take().map(|t| t.saturating_sub(now_ms));
        MqttMsg { msg, ttl_ms }
    }

    /// The message as it arrives on this node at `now_ms` (monotonic).
    pub fn arrived(self, now_ms: u64) -> relay_core::mqtt::Message {
        let mut msg = self.msg;
        msg.expires_at = self.ttl_ms.map(|t| now_ms + t);
        msg
    }
}

/// What a shard asks of the cluster link.
#[derive(Debug)]
pub enum Remote {
    /// DATA for an address no shard of this node holds: to the node that
    /// does, or `no_route`. `reply`: the router's pending token.
    Deliver { frame: Frame, reply: Option<u64> },
    /// A group publish or uid send, for the members on other nodes. A
    /// group publish also goes to the nodes whose MQTT subscriptions match
    /// the group (a topic); `mqtt`: the MQTT message when an MQTT client
    /// published it (its QoS and properties travel with it).
    Fanout {
        index: Index,
        name: Bytes,
        frame: Frame,
        exclude: Vec<Bytes>,
        reply: Option<u64>,
        mqtt: Option<Box<MqttMsg>>,
        /// The `$share` filters whose group got the message on this node.
        shared: Vec<Bytes>,
    },
    /// An MQTT publish whose topic is no group name: to the nodes whose MQTT
    /// subscriptions match it (to every node when retained). `shared`: the
    /// `$share` filters whose group got it on this node.
    MqttPublish {
        src: Bytes,
        msg: Box<MqttMsg>,
        shared: Vec<Bytes>,
    },
    /// This shard now has (or no longer has) MQTT subscribers of the topic
    /// filter `filter` (as sent: `$share/<g>/<f>` for a shared one).
    MqttFilter { filter: Bytes, has: bool },
    /// This shard now has (or no longer has) members of `name`.
    Interest {
        index: Index,
        name: Bytes,
        has: bool,
    },
    /// This shard accepted a hello for `addr` (connection `conn`) at
    /// `at_ms` (wall clock): the node holds it now.
    Claim {
        addr: Bytes,
        conn: ConnId,
        at_ms: u64,
    },
    /// The connection `conn` holding `addr` has gone.
    Release { addr: Bytes, conn: ConnId },
    /// The answer to an item from another node.
    Reply {
        to: ReplyTo,
        delivered: u32,
        error: Option<Failure>,
    },
}

/// What the cluster link asks of a shard.
#[derive(Debug)]
pub enum Inbound {
    /// DATA from another node for an address this shard owns.
    Deliver {
        frame: Frame,
        reply: Option<ReplyTo>,
    },
    /// A publish or uid send from another node, for this node's members
    /// (and, for a group, this node's matching MQTT subscriptions).
    Fanout {
        index: Index,
        name: Bytes,
        frame: Frame,
        exclude: Vec<Bytes>,
        reply: Option<ReplyTo>,
        mqtt: Option<Box<MqttMsg>>,
        /// The `$share` filters whose group this node serves this time.
        shared: Vec<Bytes>,
    },
    /// An MQTT publish from another node, for this node's matching MQTT
    /// subscriptions (not forwarded again) and the share groups of the
    /// `$share` filters in `shared`.
    MqttPublish {
        src: Bytes,
        msg: Box<MqttMsg>,
        shared: Vec<Bytes>,
    },
    /// The answer to a [`Remote`] item that carried `reply: Some(token)`.
    Reply {
        token: u64,
        delivered: u32,
        error: Option<Failure>,
    },
    /// A newer hello for `addr` was accepted on another node: the local
    /// connection `conn` is closed with `replaced`.
    Takeover { addr: Bytes, conn: ConnId },
}

/// The cluster link is down or full.
pub fn unavailable() -> Failure {
    (
        ErrorCode::Unavailable,
        "the cluster link is down; frame for another node dropped".into(),
    )
}

impl Router {
    /// Whether this shard hands what it cannot deliver to the cluster.
    pub fn clustered(&self) -> bool {
        self.cfg.borrow().cluster
    }

    pub(super) fn push_remote(&self, item: Remote) {
        let mut q = self.remote.borrow_mut();
        q.push(item);
        if q.len() == 1 {
            drop(q);
            self.signals.remote_ready();
        }
    }

    /// Takes what waits for the cluster link.
    pub fn take_remote(&self) -> Vec<Remote> {
        std::mem::take(&mut *self.remote.borrow_mut())
    }

    /// The link could not take `items` (its channel is full): every answer
    /// they owe is settled here with `unavailable`.
    pub fn remote_refused(&self, items: Vec<Remote>) {
        for item in items {
            match item {
                Remote::Deliver { reply, .. } | Remote::Fanout { reply, .. } => {
                    self.stats.dropped(DropReason::Unavailable);
                    if let Some(t) = reply {
                        self.on_reply(t, 0, Some(unavailable()));
                    }
                }
                _ => {}
            }
        }
    }

    /// DATA for an address this shard would own but does not hold: to the
    /// cluster, with the answer owed to `ack`.
    pub(super) fn unicast_remote(&self, frame: Frame, ack: Option<AckTarget>) {
        let reply = ack.map(|t| self.pending_for(t, 1));
        self.push_remote(Remote::Deliver { frame, reply });
    }

    /// Applies one item from the cluster link.
    pub fn on_inbound(&self, item: Inbound, now: Now) {
        match item {
            Inbound::Deliver { frame, reply } => {
                let result = self.deliver_owned(&frame, now);
                if let Some(to) = reply {
                    self.resolve(AckTarget::Remote(to), result);
                }
            }
            Inbound::Fanout {
                index,
                name,
                frame,
                exclude,
                reply,
                mqtt,
                shared,
            } => {
                let ack = reply.map(AckTarget::Remote);
                if index == Index::Group {
                    match mqtt {
                        Some(m) => self.mqtt_from_node(&frame.src, *m, &shared, now),
                        None => {
                            self.mqtt_from_group(&name, &frame, Some(&shared), now);
                        }
                    }
                }
                let none = Vec::new();
                self.fanout_native(index, &name, frame, exclude, ack, false, None, none, now);
            }
            Inbound::MqttPublish { src, msg, shared } => {
                self.mqtt_from_node(&src, *msg, &shared, now)
            }
            Inbound::Reply {
                token,
                delivered,
                error,
            } => self.on_reply(token, delivered, error),
            Inbound::Takeover { addr, conn } => self.taken_over(&addr, conn, now),
        }
    }

    /// Another node accepted a newer hello for `addr`: the connection here
    /// gets ERROR `replaced` and is closed, as on one node.
    fn taken_over(&self, addr: &Bytes, conn: ConnId, now: Now) {
        let Some(cell) = self.lookup(addr) else {
            return;
        };
        if cell.id != conn {
            return;
        }
        self.by_addr.borrow_mut().remove(&cell);
        let why = "address taken over by a new connection on another node";
        self.end(
            &cell,
            ErrorCode::Replaced,
            why,
            relay_core::CloseReason::Replaced,
            now.mono_ms + self.cfg().close_grace_ms,
        );
        self.drop_memberships(&cell);
    }
}
