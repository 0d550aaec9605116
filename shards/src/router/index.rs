//! The group and uid indexes: each shard's own members of every name, and
//! for each name the mask of shards that have members.

use std::collections::HashMap;
use std::rc::Rc;

use bytes::Bytes;

use super::*;
use crate::cell::{ConnCell, ConnId};

#[derive(Debug, Default)]
pub(super) struct Entry {
    /// Members owned by this shard.
    pub(super) local: HashMap<ConnId, Rc<ConnCell>>,
    /// Bit i: shard i has members (this shard's bit included).
    pub(super) mask: u64,
}

impl Router {
    /// Adds `cell` to `name`. When this shard gains its first member, every
    /// other shard is told, and the ACK waits until they all know, so a
    /// publish right after the ACK reaches the new member from any shard.
    pub fn add_member(
        &self,
        index: Index,
        cell: &Rc<ConnCell>,
        name: Bytes,
        ack: Option<AckTarget>,
    ) -> Result<(), Failure> {
        {
            let mut s = cell.session.borrow_mut();
            let list = s.list_mut(index.membership());
            if !list.contains(&name) {
                if index == Index::Group && list.len() >= self.cfg().max_groups_per_conn {
                    let e = failure::too_many_groups(self.cfg().max_groups_per_conn);
                    drop(s);
                    if let Some(t) = ack {
                        self.finish(t, 0, Some(e.clone()));
                    }
                    return Err(e);
                }
                list.push(name.clone());
            }
        }
        let newly_here = {
            let mut idx = self.indexes[index as usize].borrow_mut();
            let e = idx.entry(name.clone()).or_default();
            e.local.insert(cell.id, cell.clone());
            let was = e.mask & (1 << self.shard) != 0;
            e.mask |= 1 << self.shard;
            !was
        };
        if newly_here {
            self.mask_changed(index, &name);
            if self.clustered() {
                self.push_remote(Remote::Interest {
                    index,
                    name: name.clone(),
                    has: true,
                });
            }
        }
        let peers: Vec<usize> = (0..self.shards).filter(|&s| s != self.shard).collect();
        if newly_here && !peers.is_empty() {
            let token = ack.map(|t| self.pending_for(t, peers.len()));
            for p in peers {
                self.push(
                    p,
                    Cross::Mask {
                        index,
                        name: name.clone(),
                        has: true,
                        reply: token,
                    },
                );
            }
        } else if let Some(t) = ack {
            self.finish(t, 1, None);
        }
        Ok(())
    }

    /// Removes `cell` from `name`.
    pub fn remove_member(&self, index: Index, cell: &Rc<ConnCell>, name: &Bytes) {
        {
            let mut s = cell.session.borrow_mut();
            let list = s.list_mut(index.membership());
            list.retain(|g| g != name);
        }
        self.leave_index(index, cell, name);
    }

    pub(super) fn leave_index(&self, index: Index, cell: &Rc<ConnCell>, name: &Bytes) {
        let now_empty = {
            let mut idx = self.indexes[index as usize].borrow_mut();
            let Some(e) = idx.get_mut(name) else { return };
            if e.local.remove(&cell.id).is_none() || !e.local.is_empty() {
                return;
            }
            e.mask &= !(1 << self.shard);
            if e.mask == 0 {
                idx.remove(name);
            }
            true
        };
        if now_empty {
            self.mask_changed(index, name);
            if self.clustered() {
                self.push_remote(Remote::Interest {
                    index,
                    name: name.clone(),
                    has: false,
                });
            }
            for p in (0..self.shards).filter(|&s| s != self.shard) {
                self.push(
                    p,
                    Cross::Mask {
                        index,
                        name: name.clone(),
                        has: false,
                        reply: None,
                    },
                );
            }
        }
    }

    pub(super) fn mask_changed(&self, index: Index, name: &Bytes) {
        if index != Index::Group || !name.starts_with(WATCH_PREFIX) {
            return;
        }
        let target = name.slice(WATCH_PREFIX.len()..);
        if self.indexes[0].borrow().contains_key(name) {
            self.watched.borrow_mut().insert(target);
        } else {
            self.watched.borrow_mut().remove(&target);
        }
    }
}
