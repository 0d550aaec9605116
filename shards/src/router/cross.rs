//! The cross-shard protocol: the items one shard asks of another, what a
//! shard does with a batch from a peer, and the per-peer outboxes.

use bytes::Bytes;
use relay_core::conn::Now;
use relay_core::frame::Frame;

use super::*;
use crate::stats::DropReason;

/// Work one shard asks of another. Many travel in one mesh message.
#[derive(Debug)]
pub enum Cross {
    /// Deliver DATA to `frame.dst`, which the receiving shard owns.
    Deliver {
        frame: Frame,
        reply: Option<u64>,
    },
    /// Deliver to the receiving shard's local members of `name`.
    Fanout {
        index: Index,
        name: Bytes,
        frame: Frame,
        exclude: Vec<Bytes>,
        reply: Option<u64>,
    },
    /// The sending shard now has (or no longer has) members of `name`.
    Mask {
        index: Index,
        name: Bytes,
        has: bool,
        reply: Option<u64>,
    },
    /// The answer to an item that carried `reply: Some(token)`.
    Reply {
        token: u64,
        delivered: u32,
        error: Option<Failure>,
    },
    /// An API operation to run on the receiving shard.
    Call {
        call: Call,
        reply: u64,
    },
    CallDone {
        token: u64,
        result: CallResult,
    },
    /// The sending shard now has (or no longer has) MQTT subscribers of
    /// `filter` (as sent).
    MqttFilter {
        filter: Bytes,
        has: bool,
    },
    /// An MQTT message for the receiving shard's matching subscriptions;
    /// `shared`: the `$share` filters whose turn is this shard's.
    MqttPublish {
        src: Bytes,
        msg: relay_core::mqtt::Message,
        shared: Vec<Bytes>,
    },
    /// A retained message (an empty payload deletes the topic's).
    MqttRetain {
        msg: relay_core::mqtt::Message,
    },
}

impl Router {
    /// Applies a batch from shard `from`.
    pub fn on_cross(&self, from: usize, items: Vec<Cross>, now: Now) {
        for item in items {
            match item {
                Cross::Deliver { frame, reply } => {
                    if self.clustered() && self.lookup(&frame.dst).is_none() {
                        // Not on this node: the answer comes back from the
                        // cluster and goes on to the asking shard.
                        let ack = reply.map(|token| AckTarget::Peer { shard: from, token });
                        self.unicast_remote(frame, ack);
                        continue;
                    }
                    let result = self.deliver_owned(&frame, now);
                    if let Some(token) = reply {
                        let (delivered, error) = match result {
                            Ok(n) => (n, None),
                            Err(e) => (0, Some(e)),
                        };
                        self.push(
                            from,
                            Cross::Reply {
                                token,
                                delivered,
                                error,
                            },
                        );
                    }
                }
                Cross::Fanout {
                    index,
                    name,
                    frame,
                    exclude,
                    reply,
                } => {
                    let (delivered, error) =
                        self.deliver_index_local(index, &name, &frame, &exclude, now);
                    if let Some(token) = reply {
                        self.push(
                            from,
                            Cross::Reply {
                                token,
                                delivered,
                                error,
                            },
                        );
                    }
                }
                Cross::Mask {
                    index,
                    name,
                    has,
                    reply,
                } => {
                    {
                        let mut idx = self.indexes[index as usize].borrow_mut();
                        if has {
                            idx.entry(name.clone()).or_default().mask |= 1 << from;
                        } else if let Some(e) = idx.get_mut(&name) {
                            e.mask &= !(1 << from);
                            if e.mask == 0 {
                                idx.remove(&name);
                            }
                        }
                    }
                    self.mask_changed(index, &name);
                    if let Some(token) = reply {
                        self.push(
                            from,
                            Cross::Reply {
                                token,
                                delivered: 1,
                                error: None,
                            },
                        );
                    }
                }
                Cross::Reply {
                    token,
                    delivered,
                    error,
                } => self.on_reply(token, delivered, error),
                Cross::Call { call, reply } => {
                    let completed = self.completed.clone();
                    self.exec(
                        call,
                        Box::new(move |r| completed.borrow_mut().push((from, reply, r))),
                        now,
                    );
                }
                Cross::CallDone { token, result } => {
                    if let Some(cb) = self.calls.borrow_mut().remove(&token) {
                        cb(result);
                    }
                }
                Cross::MqttFilter { filter, has } => self.mqtt_filter(from, filter, has),
                Cross::MqttPublish { src, msg, shared } => {
                    self.mqtt_deliver_matches(&src, &msg, &shared, now)
                }
                Cross::MqttRetain { msg } => self.mqtt_retain(msg, false),
            }
        }
        let done: Vec<_> = std::mem::take(&mut *self.completed.borrow_mut());
        for (to, token, result) in done {
            self.push(to, Cross::CallDone { token, result });
        }
    }

    pub(super) fn push(&self, peer: usize, item: Cross) {
        let mut outbox = self.outbox.borrow_mut();
        let q = &mut outbox[peer];
        let droppable = matches!(
            item,
            Cross::Deliver { .. } | Cross::Fanout { .. } | Cross::MqttPublish { .. }
        );
        if droppable && q.len() >= self.cfg().outbox_limit {
            // The peer shard is not keeping up: refuse rather than grow.
            // Control items (masks, replies, calls) are never dropped; they
            // are bounded by the data items that cause them.
            drop(outbox);
            self.stats.dropped(DropReason::MeshFull);
            if let Cross::Deliver { reply: Some(t), .. } | Cross::Fanout { reply: Some(t), .. } =
                item
            {
                // The answer is settled here, as the peer would have.
                self.on_reply(t, 0, Some(failure::mesh_full()));
            }
            return;
        }
        let was_empty = q.is_empty();
        q.push(item);
        drop(outbox);
        if was_empty {
            self.signals.outbox_ready();
        }
    }

    /// Takes the waiting items for every peer (index = shard).
    pub fn take_outbox(&self) -> Vec<(usize, Vec<Cross>)> {
        let mut outbox = self.outbox.borrow_mut();
        outbox
            .iter_mut()
            .enumerate()
            .filter(|(_, q)| !q.is_empty())
            .map(|(i, q)| (i, std::mem::take(q)))
            .collect()
    }
}
