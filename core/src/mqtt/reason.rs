//! Reason codes (MQTT 5, spec 2.4) and the MQTT 3.1.1 return codes the
//! relay sends. A code is a plain `u8` on the wire and in the packet types,
//! so a peer's unknown code is carried, not refused.

pub const SUCCESS: u8 = 0x00;
pub const NORMAL_DISCONNECTION: u8 = 0x00;
pub const GRANTED_QOS_0: u8 = 0x00;
pub const GRANTED_QOS_1: u8 = 0x01;
pub const GRANTED_QOS_2: u8 = 0x02;
pub const DISCONNECT_WITH_WILL: u8 = 0x04;
pub const NO_MATCHING_SUBSCRIBERS: u8 = 0x10;
pub const NO_SUBSCRIPTION_EXISTED: u8 = 0x11;
pub const CONTINUE_AUTHENTICATION: u8 = 0x18;
pub const REAUTHENTICATE: u8 = 0x19;
pub const UNSPECIFIED_ERROR: u8 = 0x80;
pub const MALFORMED_PACKET: u8 = 0x81;
pub const PROTOCOL_ERROR: u8 = 0x82;
pub const IMPLEMENTATION_SPECIFIC_ERROR: u8 = 0x83;
pub const UNSUPPORTED_PROTOCOL_VERSION: u8 = 0x84;
pub const CLIENT_IDENTIFIER_NOT_VALID: u8 = 0x85;
pub const BAD_USER_NAME_OR_PASSWORD: u8 = 0x86;
pub const NOT_AUTHORIZED: u8 = 0x87;
pub const SERVER_UNAVAILABLE: u8 = 0x88;
pub const SERVER_BUSY: u8 = 0x89;
pub const BANNED: u8 = 0x8A;
pub const SERVER_SHUTTING_DOWN: u8 = 0x8B;
pub const BAD_AUTHENTICATION_METHOD: u8 = 0x8C;
pub const KEEP_ALIVE_TIMEOUT: u8 = 0x8D;
pub const SESSION_TAKEN_OVER: u8 = 0x8E;
pub const TOPIC_FILTER_INVALID: u8 = 0x8F;
pub const TOPIC_NAME_INVALID: u8 = 0x90;
pub const PACKET_IDENTIFIER_IN_USE: u8 = 0x91;
pub const PACKET_IDENTIFIER_NOT_FOUND: u8 = 0x92;
pub const RECEIVE_MAXIMUM_EXCEEDED: u8 = 0x93;
pub const TOPIC_ALIAS_INVALID: u8 = 0x94;
pub const PACKET_TOO_LARGE: u8 = 0x95;
pub const MESSAGE_RATE_TOO_HIGH: u8 = 0x96;
pub const QUOTA_EXCEEDED: u8 = 0x97;
pub const ADMINISTRATIVE_ACTION: u8 = 0x98;
pub const PAYLOAD_FORMAT_INVALID: u8 = 0x99;
pub const RETAIN_NOT_SUPPORTED: u8 = 0x9A;
pub const QOS_NOT_SUPPORTED: u8 = 0x9B;
pub const USE_ANOTHER_SERVER: u8 = 0x9C;
pub const SERVER_MOVED: u8 = 0x9D;
pub const SHARED_SUBSCRIPTIONS_NOT_SUPPORTED: u8 = 0x9E;
pub const CONNECTION_RATE_EXCEEDED: u8 = 0x9F;
pub const MAXIMUM_CONNECT_TIME: u8 = 0xA0;
pub const SUBSCRIPTION_IDENTIFIERS_NOT_SUPPORTED: u8 = 0xA1;
pub const WILDCARD_SUBSCRIPTIONS_NOT_SUPPORTED: u8 = 0xA2;

/// MQTT 3.1.1 CONNACK return codes (spec 3.1.1, 3.2.2.3).
pub const V3_ACCEPTED: u8 = 0x00;
pub const V3_UNACCEPTABLE_PROTOCOL_VERSION: u8 = 0x01;
pub const V3_IDENTIFIER_REJECTED: u8 = 0x02;
pub const V3_SERVER_UNAVAILABLE: u8 = 0x03;
pub const V3_BAD_USER_NAME_OR_PASSWORD: u8 = 0x04;
pub const V3_NOT_AUTHORIZED: u8 = 0x05;
/// MQTT 3.1.1 SUBACK failure.
pub const V3_SUBACK_FAILURE: u8 = 0x80;

/// The MQTT 3.1.1 CONNACK return code nearest to an MQTT 5 refusal.
pub fn v3_connack(code: u8) -> u8 {
    match code {
        SUCCESS => V3_ACCEPTED,
        UNSUPPORTED_PROTOCOL_VERSION => V3_UNACCEPTABLE_PROTOCOL_VERSION,
        CLIENT_IDENTIFIER_NOT_VALID => V3_IDENTIFIER_REJECTED,
        BAD_USER_NAME_OR_PASSWORD | BAD_AUTHENTICATION_METHOD => V3_BAD_USER_NAME_OR_PASSWORD,
        NOT_AUTHORIZED | BANNED => V3_NOT_AUTHORIZED,
        _ => V3_SERVER_UNAVAILABLE,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v5_refusals_map_to_the_nearest_v3_return_code() {
        assert_eq!(v3_connack(SUCCESS), V3_ACCEPTED);
        assert_eq!(
            v3_connack(CLIENT_IDENTIFIER_NOT_VALID),
            V3_IDENTIFIER_REJECTED
        );
        assert_eq!(
            v3_connack(BAD_USER_NAME_OR_PASSWORD),
            V3_BAD_USER_NAME_OR_PASSWORD
        );
        assert_eq!(v3_connack(NOT_AUTHORIZED), V3_NOT_AUTHORIZED);
        assert_eq!(v3_connack(SERVER_BUSY), V3_SERVER_UNAVAILABLE);
        assert_eq!(
            v3_connack(UNSUPPORTED_PROTOCOL_VERSION),
            V3_UNACCEPTABLE_PROTOCOL_VERSION
        );
    }
}
