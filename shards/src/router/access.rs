//! The access rules at work: each connection's view of them, made once at
//! hello and shared by connections with the same view, and the check of
//! every DATA, PUBLISH, JOIN and API push against it.

use std::rc::Rc;

use relay_core::acl::{Action, Auth, Subject, Verdict, Who};

use super::*;
use crate::cell::{AclList, ConnCell, Membership};

/// A view in the router's set of views, found by its rules.
#[derive(Debug, Clone)]
pub(super) struct SharedView(AclList);

impl PartialEq for SharedView {
    fn eq(&self, other: &Self) -> bool {
        self.0[..] == other.0[..]
    }
}

impl Eq for SharedView {}

impl std::hash::Hash for SharedView {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        self.0[..].hash(h);
    }
}

impl std::borrow::Borrow<[u16]> for SharedView {
    fn borrow(&self) -> &[u16] {
        &self.0[..]
    }
}

impl Router {
    /// Whether `cell` may do `action` on `target`: `Ok(true)` when a rule
    /// allows it explicitly, `Ok(false)` when nothing objects (no rule, or
    /// the default allows), else ERROR `forbidden`, counted for the rule.
    pub(super) fn access(
        &self,
        cell: &ConnCell,
        action: Action,
        target: &[u8],
    ) -> Result<bool, Failure> {
        let cfg = self.cfg.borrow();
        let rules = &cfg.acl;
        if rules.acl.is_open() {
            return Ok(false);
        }
        let view = self.acl_view(cell, rules);
        let session;
        let groups: &[Bytes] = if rules.uses_groups {
            session = cell.session.borrow();
            session.list(Membership::Group)
        } else {
            &[]
        };
        verdict(
            rules,
            rules.acl.check(&view[..], action, target, groups),
            action,
            target,
        )
    }

    /// Whether an HTTP API push (role `api`, src `src`) may do `action` on
    /// `target`; `with_token`: the API requires its token.
    pub fn api_access(
        &self,
        action: Action,
        src: &[u8],
        target: &[u8],
        with_token: bool,
    ) -> Result<(), Failure> {
        let cfg = self.cfg();
        let rules = &cfg.acl;
        if rules.acl.is_open() {
            return Ok(());
        }
        let who = Subject {
            who: Who::Api,
            auth: if with_token {
                Auth::ServiceToken
            } else {
                Auth::None
            },
            addr: src,
        };
        let view = rules.acl.view(&who);
        verdict(
            rules,
            rules.acl.check(&view, action, target, &[]),
            action,
            target,
        )
        .map(|_| ())
    }

    /// The rules that can apply to `cell`: computed once (at hello, and
    /// again after a reload), then kept on the connection.
    pub(super) fn acl_view(&self, cell: &ConnCell, rules: &crate::acl::AclRules) -> AclList {
        let generation = self.cfg_generation.get();
        if cell.acl_generation.get() == generation as u32
            && let Some(v) = cell.acl.get()
        {
            return v;
        }
        let list = {
            let conn = cell.conn.borrow();
            rules.acl.view(&Subject {
                who: Who::Role(conn.role()),
                auth: conn.auth(),
                addr: conn.addr(),
            })
        };
        let mut views = self.acl_views.borrow_mut();
        if views.0 != generation {
            views.1.clear();
            views.0 = generation;
        }
        let view = match views.1.get(&list[..]) {
            Some(v) => v.0.clone(),
            None => {
                let v: AclList = Rc::new(list.into_boxed_slice());
                views.1.insert(SharedView(v.clone()));
                v
            }
        };
        cell.acl.set(view.clone());
        cell.acl_generation.set(generation as u32);
        view
    }
}

/// A verdict as the router reports it; a denial is counted for its rule.
fn verdict(
    rules: &crate::acl::AclRules,
    v: Verdict,
    action: Action,
    target: &[u8],
) -> Result<bool, Failure> {
    match v {
        Verdict::Allow(rule) => Ok(rule.is_some()),
        Verdict::Deny(rule) => {
            rules.count_denied(rule);
            Err(failure::acl_denied(rules.name(rule), action, target))
        }
    }
}
