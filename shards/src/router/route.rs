//! Delivery: a client's DATA and PUBLISH, unicast to one address and
//! fan-out to a group or uid, wherever the recipients live.

use std::rc::Rc;

use bytes::{Bytes, BytesMut};
use relay_core::conn::{Now, SendError};
use relay_core::frame::{Flags, Frame, FrameType};
use relay_core::route::shard_of;

use super::*;
use crate::cell::ConnCell;
use crate::stats::{DropReason, ShardStats};

impl Router {
    /// Routes a client's DATA (to `dst`) or PUBLISH (to group `dst`).
    pub(super) fn route_client_frame(
        &self,
        cell: &Rc<ConnCell>,
        mut frame: Frame,
        group: bool,
        now: Now,
    ) {
        ShardStats::add(&self.stats.frames_in, 1);
        if group && frame.dst.starts_with(WATCH_PREFIX) {
            // Only the relay writes to a watch group (its tap).
            self.stats.dropped(DropReason::Forbidden);
            self.reply_conn(
                cell,
                frame.seq,
                frame.flags.ack_req(),
                Err(failure::watch_publish()),
            );
            return;
        }
        let action = if group {
            relay_core::acl::Action::Publish
        } else {
            relay_core::acl::Action::Send
        };
        if let Err(e) = self.access(cell, action, &frame.dst) {
            self.stats.dropped(DropReason::Forbidden);
            self.reply_conn(cell, frame.seq, frame.flags.ack_req(), Err(e));
            return;
        }
        // ACK_REQ comes off once, here: an ACK is the relay's answer to the
        // sender and never forwarded, so no recipient copies the frame for it.
        let target = frame.flags.ack_req().then_some(AckTarget::Conn {
            id: cell.id,
            seq: frame.seq,
        });
        frame.flags = frame.flags.with(Flags::ACK_REQ, false);
        self.tap(&frame, now);
        if !group && frame.dst[..] == *relay_core::name::RULES_DST {
            // Meant for the rules only: no client gets it, nothing echoes back.
            if self.hooks.borrow().is_none() {
                self.stats.dropped(DropReason::NoRoute);
                self.reply_conn(cell, frame.seq, target.is_some(), Err(failure::no_rules()));
                return;
            }
            self.reply_conn(cell, frame.seq, target.is_some(), Ok(1));
            self.hook_message(&frame, false, now);
            return;
        }
        // The rules engine sees the frame as the client sent it; the copy
        // (three reference counts) is made only when it listens.
        let hooked = self.hooks.borrow().is_some().then(|| frame.clone());
        if group {
            let name = frame.dst.clone();
            self.fanout(Index::Group, &name, frame, Vec::new(), target, now);
        } else {
            self.unicast(frame, target, now);
        }
        if let Some(f) = hooked {
            self.hook_message(&f, group, now);
        }
    }

    pub(super) fn hook_message(&self, frame: &Frame, group: bool, now: Now) {
        if let Some(h) = self.hooks.borrow().as_ref() {
            h.message(frame, group, now);
        }
    }

    /// Copies a frame sent by a watched address to its `watch:` group.
    pub(super) fn tap(&self, frame: &Frame, now: Now) {
        if self.watched.borrow().is_empty() || !self.watched.borrow().contains(&frame.src) {
            return;
        }
        let mut name = BytesMut::with_capacity(WATCH_PREFIX.len() + frame.src.len());
        name.extend_from_slice(WATCH_PREFIX);
        name.extend_from_slice(&frame.src);
        let name = name.freeze();
        if name.len() > relay_core::name::MAX_NAME_LEN {
            return;
        }
        let mut copy = frame.clone();
        copy.flags = copy.flags.with(Flags::ACK_REQ, false);
        self.fanout(Index::Group, &name, copy, Vec::new(), None, now);
    }

    /// Queues `frame` for one recipient on this shard.
    pub(super) fn deliver_local(
        &self,
        cell: &ConnCell,
        frame: &Frame,
        now: Now,
    ) -> Result<(), Failure> {
        if cell.mqtt.borrow().is_some() {
            return self.mqtt_deliver_frame(cell, frame, now);
        }
        // Once per recipient: borrow the settings rather than clone their handle
        // (a reload swaps them only from the sweeper, never inside a delivery).
        let r = cell
            .conn
            .borrow_mut()
            .send(&self.cfg.borrow().conn, now, frame);
        match r {
            Ok(()) => {
                ShardStats::add(&self.stats.frames_out, 1);
                self.wake(cell);
                Ok(())
            }
            Err(SendError::Full) => {
                // The slow-consumer clock may just have started.
                self.arm(cell);
                self.stats.dropped(DropReason::SlowConsumer);
                Err(failure::slow_consumer(cell.conn.borrow().addr()))
            }
            Err(SendError::Closed) => {
                self.stats.dropped(DropReason::NoRoute);
                Err(failure::offline(&frame.dst))
            }
        }
    }

    pub(super) fn deliver_owned(&self, frame: &Frame, now: Now) -> Result<u32, Failure> {
        match self.lookup(&frame.dst) {
            Some(dst) => self.deliver_local(&dst, frame, now).map(|()| 1),
            None => {
                self.stats.dropped(DropReason::NoRoute);
                Err(failure::offline(&frame.dst))
            }
        }
    }

    /// DATA to one address, wherever it lives.
    pub fn unicast(&self, frame: Frame, ack: Option<AckTarget>, now: Now) {
        let owner = shard_of(&frame.dst, self.shards);
        if owner == self.shard {
            let result = match self.lookup(&frame.dst) {
                Some(dst) => self.deliver_local(&dst, &frame, now).map(|()| 1),
                None if self.clustered() => return self.unicast_remote(frame, ack),
                None => {
                    self.stats.dropped(DropReason::NoRoute);
                    Err(failure::offline(&frame.dst))
                }
            };
            if let Some(t) = ack {
                self.resolve(t, result);
            }
        } else {
            let reply = ack.map(|t| self.pending_for(t, 1));
            ShardStats::add(&self.stats.cross_frames, 1);
            self.push(owner, Cross::Deliver { frame, reply });
        }
    }

    /// To every member of group or uid `name`, on every shard that has one.
    /// Group deliveries are DATA with flag GROUP and dst = the group; uid
    /// deliveries are DATA with dst = the uid.
    pub fn fanout(
        &self,
        index: Index,
        name: &Bytes,
        frame: Frame,
        exclude: Vec<Bytes>,
        ack: Option<AckTarget>,
        now: Now,
    ) {
        let cluster = self.clustered();
        self.fanout_to(index, name, frame, exclude, ack, cluster, now);
    }

    /// A fan-out over this node's shards and, when `cluster`, the other nodes
    /// (the cluster link answers once for all of them). A group publish
    /// reaches the MQTT subscribers whose filters match the group too.
    #[allow(clippy::too_many_arguments)]
    fn fanout_to(
        &self,
        index: Index,
        name: &Bytes,
        frame: Frame,
        exclude: Vec<Bytes>,
        ack: Option<AckTarget>,
        cluster: bool,
        now: Now,
    ) {
        let shared = if index == Index::Group {
            self.mqtt_from_group(name, &frame, None, now)
        } else {
            Vec::new()
        };
        self.fanout_native(index, name, frame, exclude, ack, cluster, None, shared, now);
    }

    /// The fan-out to the members of `name` (native clients). With
    /// `cluster`, the other nodes get it too; `mqtt`: the MQTT message the
    /// other nodes' MQTT subscriptions get, when an MQTT client published it
    /// (else they make one of the frame, as this node does); `shared`: the
    /// `$share` filters whose group got the message on this node.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn fanout_native(
        &self,
        index: Index,
        name: &Bytes,
        mut frame: Frame,
        exclude: Vec<Bytes>,
        ack: Option<AckTarget>,
        cluster: bool,
        mqtt: Option<Box<MqttMsg>>,
        shared: Vec<Bytes>,
        now: Now,
    ) {
        frame.dst = name.clone();
        frame.flags = frame.flags.with(Flags::GROUP, index == Index::Group);
        frame.kind = FrameType::Data;
        let mask = self.indexes[index as usize]
            .borrow()
            .get(name)
            .map(|g| g.mask)
            .unwrap_or(0);
        let (mut delivered, mut error) = (0, None);
        if mask & (1 << self.shard) != 0 {
            (delivered, error) = self.deliver_index_local(index, name, &frame, &exclude, now);
        }
        let remote: Vec<usize> = (0..self.shards)
            .filter(|&s| s != self.shard && mask & (1 << s) != 0)
            .collect();
        let parts = remote.len() + usize::from(cluster);
        let token = match ack {
            Some(t) if parts > 0 => {
                let token = self.pending_for(t, parts);
                if let Some(p) = self.pending.borrow_mut().get_mut(&token) {
                    p.delivered = delivered;
                    p.error = error.clone();
                }
                Some(token)
            }
            Some(t) => {
                self.finish(t, delivered, error);
                None
            }
            None => None,
        };
        if cluster {
            self.push_remote(Remote::Fanout {
                index,
                name: name.clone(),
                frame: frame.clone(),
                exclude: exclude.clone(),
                reply: token,
                mqtt,
                shared,
            });
        }
        for s in remote {
            ShardStats::add(&self.stats.cross_frames, 1);
            self.push(
                s,
                Cross::Fanout {
                    index,
                    name: name.clone(),
                    frame: frame.clone(),
                    exclude: exclude.clone(),
                    reply: token,
                },
            );
        }
    }

    pub(super) fn deliver_index_local(
        &self,
        index: Index,
        name: &Bytes,
        frame: &Frame,
        exclude: &[Bytes],
        now: Now,
    ) -> (u32, Option<Failure>) {
        // Delivering touches only the members' own cells, never the index,
        // so the members are walked in place: no list per publish.
        let idx = self.indexes[index as usize].borrow();
        let Some(entry) = idx.get(name) else {
            return (0, None);
        };
        let mut n = 0;
        let mut err = None;
        for m in entry.local.values() {
            if !exclude.is_empty() && exclude.iter().any(|x| x == m.conn.borrow().addr()) {
                continue;
            }
            match self.deliver_local(m, frame, now) {
                Ok(()) => n += 1,
                Err(e) => err = err.or(Some(e)),
            }
        }
        (n, err)
    }
}
