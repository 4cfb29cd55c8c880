//! Runs one codec operation many times, for counting instructions under callgrind, which
//! unlike wall time does not move with whatever else the machine is doing:
//!
//! ```text
//! cargo build --release -p ferry-protocol --example codec_instructions
//! valgrind --tool=callgrind --callgrind-out-file=/dev/null \
//!     target/release/examples/codec_instructions encode-ferry-v5 100 100000
//! ```
//!
//! Subtract the count for 0 iterations to remove setup. Operations: `{encode,decode}-{ferry,
//! rumqttc}-{v311,v5}`; then the payload size in bytes and the iteration count.

use std::hint::black_box;
use std::num::NonZeroU16;

use bytes::{Bytes, BytesMut};
use ferry_protocol::mqtt::{decode, Packet, ProtocolVersion, Publish, QoS, MAX_PACKET_SIZE};
use ferry_protocol::topic::TopicName;
use rumqttc::mqttbytes::v4 as r4;
use rumqttc::v5::mqttbytes::v5 as r5;

const TOPIC: &str = "factory/line-3/press-17/temperature";

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, op, size, n] = &args[..] else {
        eprintln!("usage: codec_instructions OP PAYLOAD_BYTES ITERATIONS");
        std::process::exit(2);
    };
    let size: usize = size.parse().expect("payload size");
    let n: usize = n.parse().expect("iterations");
    let payload = Bytes::from(vec![0xa5u8; size]);
    let mut p = Publish::new(TopicName::new(TOPIC).expect("valid"), payload.clone());
    p.qos = QoS::AtLeastOnce;
    p.packet_id = NonZeroU16::new(42);
    let ours = Packet::Publish(p);
    let mut t4 = r4::Publish::from_bytes(TOPIC, rumqttc::QoS::AtLeastOnce, payload.clone());
    t4.pkid = 42;
    let t4 = r4::Packet::Publish(t4);
    let mut t5 = r5::Publish::new(
        TOPIC,
        rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
        payload,
        None,
    );
    t5.pkid = 42;
    let t5 = r5::Packet::Publish(t5);

    let (version, ferry) = match op.as_str() {
        s if s.ends_with("v311") => (ProtocolVersion::V311, s.contains("ferry")),
        s => (ProtocolVersion::V5, s.contains("ferry")),
    };
    let mut buf = BytesMut::with_capacity(2 * size + 128);
    if op.starts_with("encode") {
        for _ in 0..n {
            buf.clear();
            match (ferry, version) {
                (true, v) => drop(black_box(ours.encode(v, &mut buf))),
                (false, ProtocolVersion::V311) => {
                    drop(black_box(t4.write(&mut buf, MAX_PACKET_SIZE)))
                }
                (false, ProtocolVersion::V5) => drop(black_box(t5.write(&mut buf, None))),
            }
        }
    } else {
        let mut one = BytesMut::new();
        ours.encode(version, &mut one).expect("encodes");
        let mut all = BytesMut::with_capacity(one.len() * n);
        for _ in 0..n {
            all.extend_from_slice(&one);
        }
        match (ferry, version) {
            (true, v) => {
                while let Ok(Some(p)) = decode(&mut all, v, MAX_PACKET_SIZE) {
                    black_box(p);
                }
            }
            (false, ProtocolVersion::V311) => {
                while let Ok(p) = r4::Packet::read(&mut all, MAX_PACKET_SIZE) {
                    black_box(p);
                }
            }
            (false, ProtocolVersion::V5) => {
                while let Ok(p) = r5::Packet::read(&mut all, None) {
                    black_box(p);
                }
            }
        }
    }
}
