//! API operations that run on the shard owning what they touch, and what
//! they answer.

use std::collections::BinaryHeap;
use std::net::SocketAddr;
use std::rc::Rc;

use bytes::Bytes;
use relay_core::conn::{CloseReason, Now, Role};
use relay_core::frame::{ErrorCode, Frame};

use super::*;
use crate::cell::{ConnCell, Membership};

/// A record ordered by its connection's address (a page of `List`).
struct ByAddress(Rc<ConnCell>);

impl PartialEq for ByAddress {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == std::cmp::Ordering::Equal
    }
}

impl Eq for ByAddress {}

impl PartialOrd for ByAddress {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for ByAddress {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0
            .conn
            .borrow()
            .addr()
            .cmp(other.0.conn.borrow().addr())
    }
}

/// API operations that run on a given shard.
#[derive(Debug, Clone)]
pub enum Call {
    /// Session of an address this shard owns.
    Client(Bytes),
    /// This shard's online addresses after `after`, filtered, sorted, at most `limit`.
    List {
        role: Option<Role>,
        prefix: String,
        after: Option<Bytes>,
        limit: usize,
    },
    /// Add `addr` (owned here) to `name`.
    Bind {
        index: Index,
        name: Bytes,
        addr: Bytes,
    },
    /// Remove `addr` (owned here) from `name`.
    Unbind {
        index: Index,
        name: Bytes,
        addr: Bytes,
    },
    /// Remove every local member of a group.
    Dissolve(Bytes),
    /// Disconnect `addr` (owned here) with ERROR `forbidden`.
    Kick(Bytes),
    /// This shard's members of `name` after `after`, sorted, at most `limit`.
    Members {
        index: Index,
        name: Bytes,
        after: Option<Bytes>,
        limit: usize,
    },
    /// Deliver to every local client (of `role`).
    Broadcast { frame: Frame, role: Option<Role> },
}

/// What a [`Call`] answers.
#[derive(Debug, Clone)]
pub enum CallResult {
    Client(Option<ClientView>),
    List(Vec<ClientView>),
    Members(Vec<Bytes>),
    Done(Result<u32, Failure>),
}

/// What the API shows of a session.
#[derive(Debug, Clone, PartialEq)]
pub struct ClientView {
    pub addr: Bytes,
    pub role: Role,
    pub shard: usize,
    pub connected_at_ms: u64,
    pub remote: SocketAddr,
    pub uids: Vec<Bytes>,
    pub groups: Vec<Bytes>,
    pub meta: Bytes,
    /// `"relay"` (the relay's own protocol) or `"mqtt"`.
    pub protocol: &'static str,
    /// The MQTT version (`"3.1.1"`, `"5.0"`); `None` for the relay protocol.
    pub version: Option<&'static str>,
    /// `"tcp"` or `"websocket"`.
    pub transport: &'static str,
}

/// Called with the result of a [`Call`].
pub type CallCallback = Box<dyn FnOnce(CallResult)>;

impl Router {
    /// Runs `call` on shard `shard`, calling `done` with its result.
    pub fn call(&self, shard: usize, call: Call, done: CallCallback, now: Now) {
        if shard == self.shard {
            self.exec(call, done, now);
        } else {
            let token = self.token();
            self.calls.borrow_mut().insert(token, done);
            self.push(shard, Cross::Call { call, reply: token });
        }
    }

    pub(super) fn exec(&self, call: Call, done: CallCallback, now: Now) {
        match call {
            Call::Client(addr) => done(CallResult::Client(
                self.lookup(&addr).map(|c| self.view(&c)),
            )),
            Call::List {
                role,
                prefix,
                after,
                limit,
            } => {
                // No ordered copy of the addresses is kept (it would cost
                // every connection about 50 bytes for a listing an operator
                // asks for now and then): one pass over the table keeps the
                // `limit` smallest addresses after `after`.
                let by_addr = self.by_addr.borrow();
                let mut page: BinaryHeap<ByAddress> =
                    BinaryHeap::with_capacity(limit.min(1024) + 1);
                for c in by_addr.values() {
                    {
                        let conn = c.conn.borrow();
                        let a = conn.addr();
                        if !a.starts_with(prefix.as_bytes())
                            || after.as_ref().is_some_and(|x| a <= x)
                            || role.is_some_and(|r| conn.role() != r)
                        {
                            continue;
                        }
                        // A full page takes only an address below its last.
                        if page.len() >= limit
                            && page
                                .peek()
                                .is_none_or(|top| a >= top.0.conn.borrow().addr())
                        {
                            continue;
                        }
                    }
                    if page.len() >= limit {
                        page.pop();
                    }
                    page.push(ByAddress(c.clone()));
                }
                let out = page
                    .into_sorted_vec()
                    .into_iter()
                    .map(|c| self.view(&c.0))
                    .collect();
                done(CallResult::List(out))
            }
            Call::Bind { index, name, addr } => match self.lookup(&addr) {
                None => done(CallResult::Done(Err(failure::offline(&addr)))),
                Some(cell) => {
                    let cb: AckCallback =
                        Box::new(move |n, e| done(CallResult::Done(e.map_or(Ok(n), Err))));
                    // A refusal is answered through the callback too.
                    let _ = self.add_member(index, &cell, name, Some(AckTarget::Callback(cb)));
                }
            },
            Call::Unbind { index, name, addr } => match self.lookup(&addr) {
                None => done(CallResult::Done(Err(failure::offline(&addr)))),
                Some(cell) => {
                    let member = {
                        let s = cell.session.borrow();
                        s.list(index.membership()).contains(&name)
                    };
                    self.remove_member(index, &cell, &name);
                    done(CallResult::Done(if member {
                        Ok(1)
                    } else {
                        Err(failure::not_member(&addr, &name))
                    }))
                }
            },
            Call::Dissolve(group) => {
                let members: Vec<Rc<ConnCell>> = self.indexes[0]
                    .borrow()
                    .get(&group)
                    .map(|e| e.local.values().cloned().collect())
                    .unwrap_or_default();
                let n = members.len() as u32;
                for m in members {
                    self.remove_member(Index::Group, &m, &group);
                }
                done(CallResult::Done(Ok(n)))
            }
            Call::Kick(addr) => match self.lookup(&addr) {
                None => done(CallResult::Done(Err(failure::offline(&addr)))),
                Some(cell) => {
                    let why = "disconnected by the server";
                    let deadline = now.mono_ms + self.cfg().close_grace_ms;
                    self.end(
                        &cell,
                        ErrorCode::Forbidden,
                        why,
                        CloseReason::Kicked,
                        deadline,
                    );
                    done(CallResult::Done(Ok(1)))
                }
            },
            Call::Members {
                index,
                name,
                after,
                limit,
            } => {
                let mut v: Vec<Bytes> = self.indexes[index as usize]
                    .borrow()
                    .get(&name)
                    .map(|e| {
                        e.local
                            .values()
                            .map(|c| c.conn.borrow().addr().clone())
                            .collect()
                    })
                    .unwrap_or_default();
                v.retain(|a| after.as_ref().is_none_or(|x| a > x));
                v.sort();
                v.truncate(limit);
                done(CallResult::Members(v))
            }
            Call::Broadcast { frame, role } => {
                let targets: Vec<Rc<ConnCell>> = self
                    .by_addr
                    .borrow()
                    .values()
                    .filter(|c| role.is_none_or(|r| c.conn.borrow().role() == r))
                    .cloned()
                    .collect();
                let mut n = 0;
                for c in targets {
                    let mut f = frame.clone();
                    f.dst = c.conn.borrow().addr().clone();
                    if self.deliver_local(&c, &f, now).is_ok() {
                        n += 1;
                    }
                }
                done(CallResult::Done(Ok(n)))
            }
        }
    }

    pub(super) fn view(&self, c: &ConnCell) -> ClientView {
        let conn = c.conn.borrow();
        let s = c.session.borrow();
        ClientView {
            addr: conn.addr().clone(),
            role: conn.role(),
            shard: self.shard,
            connected_at_ms: s.connected_at_ms,
            remote: s.remote,
            uids: s.list(Membership::Uid).to_vec(),
            groups: s.list(Membership::Group).to_vec(),
            meta: s.meta(),
            protocol: if c.mqtt.borrow().is_some() {
                "mqtt"
            } else {
                "relay"
            },
            version: c.mqtt.borrow().as_ref().map(|m| match m.session.version() {
                relay_core::mqtt::Version::V5 => "5.0",
                _ => "3.1.1",
            }),
            transport: match conn.transport() {
                relay_core::conn::Transport::Tcp => "tcp",
                relay_core::conn::Transport::WebSocket => "websocket",
            },
        }
    }
}
