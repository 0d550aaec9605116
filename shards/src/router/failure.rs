//! Every failure the router reports, one constructor each. A failure goes
//! back to whoever asked: as an ERROR frame to a client that set ACK_REQ (or
//! whose frame was refused), or as an HTTP status to an API caller.

use relay_core::frame::ErrorCode;
use relay_core::name::name_str;

/// A failure reported to whoever asked (ERROR frame or HTTP status).
pub type Failure = (ErrorCode, String);

/// No connection holds `addr` (on the shard that owns it).
pub fn offline(addr: &[u8]) -> Failure {
    (ErrorCode::NoRoute, format!("{} is offline", name_str(addr)))
}

/// `addr` is connected but its queue is full: the frame was dropped.
pub fn slow_consumer(addr: &[u8]) -> Failure {
    (
        ErrorCode::SlowConsumer,
        format!("{} is not reading; frame dropped", name_str(addr)),
    )
}

/// An unbind of an address that is not in `name`.
pub fn not_member(addr: &[u8], name: &[u8]) -> Failure {
    (
        ErrorCode::NoRoute,
        format!("{} is not a member of {}", name_str(addr), name_str(name)),
    )
}

/// The peer shard's outbox is at `outbox_limit`: the frame was dropped.
pub fn mesh_full() -> Failure {
    (
        ErrorCode::Internal,
        "shard mesh is full; frame dropped".into(),
    )
}

/// A connection already in `max` groups asked for one more.
pub fn too_many_groups(max: usize) -> Failure {
    (
        ErrorCode::Forbidden,
        format!("at most {max} groups per connection"),
    )
}

/// A client without the service token asked to watch another address.
pub fn watch_needs_token(target: &[u8]) -> Failure {
    (
        ErrorCode::Forbidden,
        format!("watching {} needs the service token", name_str(target)),
    )
}

/// A client JOIN while `allow_client_join` is off.
pub fn join_not_allowed() -> Failure {
    (ErrorCode::Forbidden, "clients may not join groups".into())
}

/// DATA to `$rules` on a relay that runs no rules.
pub fn no_rules() -> Failure {
    (
        ErrorCode::NoRoute,
        "no rules run on this relay ([plugins] enabled = false)".into(),
    )
}

/// A client PUBLISH to a `watch:` group (only the relay's tap writes there).
pub fn watch_publish() -> Failure {
    (
        ErrorCode::Forbidden,
        "watch groups carry what the relay taps; clients may not publish to them".into(),
    )
}

/// The access rules refuse `action` on `target` (by rule `rule`, or by the
/// default when no rule matched).
pub fn acl_denied(rule: &str, action: relay_core::acl::Action, target: &[u8]) -> Failure {
    let by = if rule == crate::acl::DEFAULT_RULE {
        "no access rule allows it (default deny)".to_owned()
    } else {
        format!("denied by access rule {rule}")
    };
    (
        ErrorCode::Forbidden,
        format!("{} {}: {by}", action.name(), name_str(target)),
    )
}
