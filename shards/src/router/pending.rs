//! Answers owed: the ACK or ERROR a client asked for with ACK_REQ, or the
//! callback an API request waits on, across every shard a fan-out reaches.

use relay_core::frame::Frame;

use super::*;
use crate::cell::{ConnCell, ConnId};

/// Called with (recipients reached, first error) when a fan-out completes.
pub type AckCallback = Box<dyn FnOnce(u32, Option<Failure>)>;

/// Who waits for the answer to a fan-out.
pub enum AckTarget {
    /// ACK or ERROR to a client frame.
    Conn { id: ConnId, seq: u32 },
    /// A caller inside the relay (the HTTP API).
    Callback(AckCallback),
    /// Another shard of this node, which waits under `token`.
    Peer { shard: usize, token: u64 },
    /// Another node (through the cluster link).
    Remote(ReplyTo),
}

impl std::fmt::Debug for AckTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AckTarget::Conn { id, seq } => write!(f, "Conn({id}, {seq})"),
            AckTarget::Callback(_) => write!(f, "Callback"),
            AckTarget::Peer { shard, token } => write!(f, "Peer({shard}, {token})"),
            AckTarget::Remote(to) => write!(f, "Remote({}, {})", to.node, to.token),
        }
    }
}

#[derive(Debug)]
pub(super) struct Pending {
    pub(super) target: AckTarget,
    pub(super) remaining: usize,
    pub(super) delivered: u32,
    pub(super) error: Option<Failure>,
}

impl Router {
    /// One shard's answer to an item that carried `token`; the last one
    /// settles the answer owed.
    pub(super) fn on_reply(&self, token: u64, delivered: u32, error: Option<Failure>) {
        let done = {
            let mut pending = self.pending.borrow_mut();
            let Some(p) = pending.get_mut(&token) else {
                return;
            };
            p.delivered += delivered;
            if p.error.is_none() {
                p.error = error;
            }
            p.remaining -= 1;
            if p.remaining == 0 {
                pending.remove(&token)
            } else {
                None
            }
        };
        if let Some(p) = done {
            self.settle(&p.target);
            self.finish(p.target, p.delivered, p.error);
        }
    }

    pub(super) fn token(&self) -> u64 {
        let t = self.next_token.get();
        self.next_token.set(t + 1);
        t
    }

    pub(super) fn pending_for(&self, target: AckTarget, remaining: usize) -> u64 {
        if let AckTarget::Conn { id, .. } = &target
            && let Some(c) = self.conns.borrow().get(*id)
        {
            // Room for the answer counts against the sender's queue.
            c.owed.set(c.owed.get().saturating_add(1));
        }
        let token = self.token();
        self.pending.borrow_mut().insert(
            token,
            Pending {
                target,
                remaining,
                delivered: 0,
                error: None,
            },
        );
        token
    }

    /// A pending answer is about to be queued: it is owed no more.
    pub(super) fn settle(&self, target: &AckTarget) {
        if let AckTarget::Conn { id, .. } = target
            && let Some(c) = self.conns.borrow().get(*id)
        {
            c.owed.set(c.owed.get().saturating_sub(1));
        }
    }

    pub(super) fn resolve(&self, target: AckTarget, result: Result<u32, Failure>) {
        match result {
            Ok(n) => self.finish(target, n, None),
            Err(e) => self.finish(target, 0, Some(e)),
        }
    }

    /// Answers a fan-out. A unicast that failed reports its error; a group
    /// publish is accepted once every shard queued it for its members, and
    /// reports an error only when it reached nobody because of one.
    pub(super) fn finish(&self, target: AckTarget, delivered: u32, error: Option<Failure>) {
        match target {
            AckTarget::Conn { id, seq } => {
                let Some(cell) = self.conns.borrow().get(id).cloned() else {
                    return;
                };
                let frame = match error {
                    Some((code, msg)) if delivered == 0 => Frame::error(seq, code, &msg),
                    _ => Frame::ack(seq),
                };
                cell.conn.borrow_mut().control(&self.cfg().conn, &frame);
                self.wake(&cell);
            }
            AckTarget::Callback(f) => f(delivered, error.filter(|_| delivered == 0)),
            // Whoever asked applies the rules above to the sum of answers.
            AckTarget::Peer { shard, token } => self.push(
                shard,
                Cross::Reply {
                    token,
                    delivered,
                    error,
                },
            ),
            AckTarget::Remote(to) => self.push_remote(Remote::Reply {
                to,
                delivered,
                error,
            }),
        }
    }

    pub(super) fn reply_conn(
        &self,
        cell: &ConnCell,
        seq: u32,
        ack_req: bool,
        result: Result<u32, Failure>,
    ) {
        let frame = match result {
            Ok(_) if ack_req => Frame::ack(seq),
            Ok(_) => return,
            Err((code, msg)) => Frame::error(seq, code, &msg),
        };
        cell.conn.borrow_mut().control(&self.cfg().conn, &frame);
        self.wake(cell);
    }
}
