//! MQTT 3.1.1 at QoS 0 on the client side, over rumqttc's packet codec
//! (`rumqttc::mqttbytes::v4`). Addresses and groups map onto topics:
//! `<prefix>/a/<address>` is a client's inbox, `<prefix>/g/<group>` a group.

use bytes::BytesMut;
use rumqttc::ConnectReturnCode;
use rumqttc::mqttbytes::v4::{
    ConnAck, Connect, Packet, Publish, SubAck, Subscribe, SubscribeReasonCode,
};
use rumqttc::mqttbytes::{Error as MqttError, QoS};

use super::{Dest, Inbound, WireError};
use crate::payload::Stamp;

/// Largest packet the encoder writes (the broker's limit is its own business).
const MAX_OUT: usize = 256 * 1024;

/// The topic of an address inbox or a group under `prefix`.
pub fn topic(prefix: &str, name: &str, group: bool) -> String {
    format!("{prefix}/{}/{name}", if group { "g" } else { "a" })
}

/// Encodes client packets.
#[derive(Debug)]
pub struct MqttEncoder {
    /// Topic prefix of this run.
    pub prefix: String,
    /// Reused buffer payloads are built in.
    payload: BytesMut,
    /// The JSON payload template, if the run has one.
    template: Option<std::sync::Arc<crate::payload::Template>>,
    /// Random state and message count for the template.
    rng: u64,
    seq: u64,
}

impl MqttEncoder {
    /// An encoder whose topics start with `prefix`.
    pub fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.to_string(),
            payload: BytesMut::new(),
            template: None,
            rng: 0x9E37_79B9_7F4A_7C15 ^ prefix.len() as u64,
            seq: 0,
        }
    }

    fn put(out: &mut BytesMut, p: Packet) {
        // Only oversized packets fail, and the scenario bounds payloads far below.
        if let Err(e) = p.write(out, MAX_OUT) {
            debug_assert!(false, "mqtt encode: {e}");
        }
    }

    /// CONNECT with a clean session and `keep_alive` seconds.
    pub fn connect(&mut self, out: &mut BytesMut, client_id: &str, keep_alive: u32) {
        let mut c = Connect::new(client_id);
        c.keep_alive = keep_alive.clamp(1, u16::MAX as u32) as u16;
        c.clean_session = true;
        Self::put(out, Packet::Connect(c));
    }

    /// SUBSCRIBE to `topic` at QoS 0 with packet id `seq` (never 0 on the wire).
    pub fn subscribe(&mut self, out: &mut BytesMut, topic: &str, seq: u32) {
        let mut s = Subscribe::new(topic, QoS::AtMostOnce);
        s.pkid = pkid(seq);
        Self::put(out, Packet::Subscribe(s));
    }

    /// Publishes data messages as this JSON template instead of padded stamps.
    pub fn set_template(&mut self, t: std::sync::Arc<crate::payload::Template>) {
        self.rng ^= (std::sync::Arc::as_ptr(&t) as u64).rotate_left(17);
        self.template = Some(t);
    }

    /// PUBLISH at QoS 0 carrying `stamp` (binary payload, or the template's JSON).
    pub fn publish(&mut self, out: &mut BytesMut, dest: &Dest, stamp: Stamp, payload_len: usize) {
        match &self.template {
            Some(t) => {
                t.render(&mut self.payload, stamp, &mut self.rng, self.seq);
                self.seq += 1;
            }
            None => stamp.put_binary(&mut self.payload, payload_len),
        }
        let p = Publish::from_bytes(
            dest.text.clone(),
            QoS::AtMostOnce,
            self.payload.split().freeze(),
        );
        Self::put(out, Packet::Publish(p));
    }

    /// PINGREQ.
    pub fn ping(&mut self, out: &mut BytesMut) {
        Self::put(out, Packet::PingReq);
    }

    /// DISCONNECT.
    pub fn disconnect(&mut self, out: &mut BytesMut) {
        Self::put(out, Packet::Disconnect);
    }
}

/// The MQTT packet id used for request `seq`: `seq` itself for 1..=65535, wrapped
/// past that, and never 0 (which MQTT forbids).
pub fn pkid(seq: u32) -> u16 {
    if seq == 0 {
        1
    } else {
        ((seq - 1) % u16::MAX as u32 + 1) as u16
    }
}

/// Decodes broker packets.
#[derive(Debug)]
pub struct MqttDecoder {
    /// Largest packet accepted.
    max: usize,
}

impl MqttDecoder {
    /// A decoder refusing packets over `max` bytes.
    pub fn new(max: usize) -> Self {
        Self { max }
    }

    /// Next event from `buf`.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Inbound>, WireError> {
        match Packet::read(buf, self.max) {
            Ok(p) => Ok(Some(from_packet(p))),
            Err(MqttError::InsufficientBytes(_)) => Ok(None),
            Err(e) => Err(WireError::Mqtt(e.to_string())),
        }
    }
}

fn from_packet(p: Packet) -> Inbound {
    match p {
        Packet::ConnAck(ConnAck {
            code: ConnectReturnCode::Success,
            ..
        }) => Inbound::Welcome,
        Packet::ConnAck(ConnAck { code, .. }) => Inbound::Error {
            code: format!("connack_{code:?}").to_lowercase(),
            seq: 0,
        },
        Packet::SubAck(SubAck { pkid, return_codes }) => {
            if return_codes
                .iter()
                .all(|c| matches!(c, SubscribeReasonCode::Success(_)))
            {
                Inbound::Ack { seq: pkid as u32 }
            } else {
                Inbound::Error {
                    code: "suback_failure".into(),
                    seq: pkid as u32,
                }
            }
        }
        Packet::Publish(p) => Inbound::Data {
            stamp: Stamp::from_payload(&p.payload, false),
        },
        Packet::PingResp => Inbound::Pong,
        Packet::Disconnect => Inbound::Closed,
        _ => Inbound::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::WireKind;

    #[test]
    fn client_packets_round_trip_through_the_codec() {
        let mut e = MqttEncoder::new("lt");
        let mut out = BytesMut::new();
        e.connect(&mut out, "ctl-1", 30);
        e.subscribe(&mut out, "lt/a/ctl-1", 0);
        let dest = WireKind::Mqtt {
            prefix: "lt".into(),
        }
        .dest("web-1", false);
        assert_eq!(dest.text, "lt/a/web-1");
        e.publish(
            &mut out,
            &dest,
            Stamp {
                intended_ns: 5,
                step: 2,
                lag_ns: 9,
            },
            64,
        );
        e.ping(&mut out);
        let Packet::Connect(c) = Packet::read(&mut out, 1 << 20).unwrap() else {
            panic!()
        };
        assert_eq!(
            (c.client_id.as_str(), c.keep_alive, c.clean_session),
            ("ctl-1", 30, true)
        );
        let Packet::Subscribe(s) = Packet::read(&mut out, 1 << 20).unwrap() else {
            panic!()
        };
        assert_eq!(s.pkid, 1, "seq 0 is sent as packet id 1");
        assert_eq!(s.filters[0].path, "lt/a/ctl-1");
        let Packet::Publish(p) = Packet::read(&mut out, 1 << 20).unwrap() else {
            panic!()
        };
        assert_eq!(p.topic, "lt/a/web-1");
        assert_eq!(p.qos, QoS::AtMostOnce);
        assert_eq!(p.payload.len(), 64);
        assert_eq!(
            Stamp::from_binary(&p.payload),
            Some(Stamp {
                intended_ns: 5,
                step: 2,
                lag_ns: 9,
            })
        );
        assert_eq!(Packet::read(&mut out, 1 << 20).unwrap(), Packet::PingReq);
    }

    #[test]
    fn broker_packets_decode_to_events() {
        let mut buf = BytesMut::new();
        Packet::ConnAck(ConnAck::new(ConnectReturnCode::Success, false))
            .write(&mut buf, 1024)
            .unwrap();
        Packet::ConnAck(ConnAck::new(ConnectReturnCode::NotAuthorized, false))
            .write(&mut buf, 1024)
            .unwrap();
        Packet::SubAck(SubAck::new(
            4,
            vec![SubscribeReasonCode::Success(QoS::AtMostOnce)],
        ))
        .write(&mut buf, 1024)
        .unwrap();
        Packet::SubAck(SubAck::new(5, vec![SubscribeReasonCode::Failure]))
            .write(&mut buf, 1024)
            .unwrap();
        Packet::PingResp.write(&mut buf, 1024).unwrap();
        let mut d = MqttDecoder::new(1 << 20);
        let mut got = Vec::new();
        // Feed one byte at a time: incomplete packets wait for more.
        let all = buf.split();
        for b in all.iter() {
            buf.extend_from_slice(&[*b]);
            while let Some(ev) = d.decode(&mut buf).unwrap() {
                got.push(ev);
            }
        }
        assert_eq!(
            got,
            vec![
                Inbound::Welcome,
                Inbound::Error {
                    code: "connack_notauthorized".into(),
                    seq: 0
                },
                Inbound::Ack { seq: 4 },
                Inbound::Error {
                    code: "suback_failure".into(),
                    seq: 5
                },
                Inbound::Pong,
            ]
        );
    }

    #[test]
    fn packet_ids_are_never_zero() {
        assert_eq!(pkid(0), 1);
        assert_eq!(pkid(7), 7);
        assert_eq!(pkid(u16::MAX as u32), u16::MAX);
        assert_eq!(pkid(u16::MAX as u32 + 1), 1);
    }
}
