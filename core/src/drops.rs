//! Why a frame did not reach a recipient: the one list of reasons the relay
//! counts, whether a connection refused a client's frame itself or the
//! runtime could not deliver it (`relay_dropped_frames_total{reason}`, the
//! HTTP API's statistics).

use crate::frame::ErrorCode;

/// Why a frame was dropped. `as usize` indexes per-reason counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// The destination is not connected.
    NoRoute = 0,
    /// The recipient's outbound queue is full.
    SlowConsumer = 1,
    /// Over the sender's frame rate.
    RateLimited = 2,
    /// The channel to another shard is full.
    MeshFull = 3,
    /// Broken layout, bad JSON, a malformed hello payload.
    BadFrame = 4,
    /// The rules engine's event queue is full.
    PluginQueueFull = 5,
    /// Over `max_frame`, or a JSON line over the line limit.
    TooLarge = 6,
    /// A frame other than HELLO, PING or BYE before hello.
    HelloRequired = 7,
    /// A dst or group that is not a valid name.
    BadAddress = 8,
    /// An unknown type or a frame only the relay sends.
    Unsupported = 9,
    /// Refused by an access rule.
    Forbidden = 10,
    /// For another node of a cluster while the cluster link is down, full or
    /// did not answer in time.
    Unavailable = 11,
}

impl DropReason {
    /// How many reasons there are: the length of a counter array.
    pub const COUNT: usize = 12;

    /// Every reason, in counter order.
    pub const ALL: [DropReason; DropReason::COUNT] = [
        DropReason::NoRoute,
        DropReason::SlowConsumer,
        DropReason::RateLimited,
        DropReason::MeshFull,
        DropReason::BadFrame,
        DropReason::PluginQueueFull,
        DropReason::TooLarge,
        DropReason::HelloRequired,
        DropReason::BadAddress,
        DropReason::Unsupported,
        DropReason::Forbidden,
        DropReason::Unavailable,
    ];

    /// The `reason` label of the metrics and the key of the API's statistics.
    pub fn name(self) -> &'static str {
        match self {
            DropReason::NoRoute => "no_route",
            DropReason::SlowConsumer => "slow_consumer",
            DropReason::RateLimited => "rate_limited",
            DropReason::MeshFull => "mesh_full",
            DropReason::BadFrame => "bad_frame",
            DropReason::PluginQueueFull => "plugin_queue_full",
            DropReason::TooLarge => "too_large",
            DropReason::HelloRequired => "hello_required",
            DropReason::BadAddress => "bad_address",
            DropReason::Unsupported => "unsupported",
            DropReason::Forbidden => "forbidden",
            DropReason::Unavailable => "unavailable",
        }
    }

    /// The reason a connection counts when it refuses a client's frame with
    /// an ERROR of `code`; `None` for codes that do not drop a client frame.
    pub fn of_refusal(code: ErrorCode) -> Option<DropReason> {
        Some(match code {
            ErrorCode::BadFrame => DropReason::BadFrame,
            ErrorCode::TooLarge => DropReason::TooLarge,
            ErrorCode::RateLimited => DropReason::RateLimited,
            ErrorCode::HelloRequired => DropReason::HelloRequired,
            ErrorCode::BadAddress => DropReason::BadAddress,
            ErrorCode::Unsupported => DropReason::Unsupported,
            ErrorCode::Forbidden => DropReason::Forbidden,
            _ => return None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_is_in_counter_order_and_names_are_distinct() {
        for (i, d) in DropReason::ALL.into_iter().enumerate() {
            assert_eq!(d as usize, i);
        }
        let mut names: Vec<_> = DropReason::ALL.iter().map(|d| d.name()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), DropReason::COUNT);
    }

    #[test]
    fn a_refused_frame_is_counted_under_the_name_of_its_error_code() {
        for code in ErrorCode::ALL {
            if let Some(d) = DropReason::of_refusal(code) {
                assert_eq!(d.name(), code.name());
            }
        }
        assert_eq!(DropReason::of_refusal(ErrorCode::Replaced), None);
        assert_eq!(DropReason::of_refusal(ErrorCode::NoRoute), None);
    }
}
