//! PUBLISH decode and encode, ours side by side with rumqttc's own codec on the same packets
//! (QoS 1, 100 B and 4 KB payloads, MQTT 3.1.1 and 5.0).
//!
//! Run: `cargo bench -p ferry-protocol --bench publish`. Decoding is measured over a buffer
//! of back-to-back packets (made outside the timed part), as a socket read delivers them;
//! encoding appends into a buffer that is cleared and reused, as a connection's write buffer
//! is. Figures are per packet.

use std::hint::black_box;
use std::num::NonZeroU16;

use bytes::{Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput};
use ferry_protocol::mqtt::{decode, Packet, ProtocolVersion, Publish, QoS, MAX_PACKET_SIZE};
use ferry_protocol::topic::TopicName;
use rumqttc::mqttbytes::v4 as r4;
use rumqttc::v5::mqttbytes::v5 as r5;

const TOPIC: &str = "factory/line-3/press-17/temperature";
const SIZES: [(usize, &str); 2] = [(100, "100B"), (4096, "4KB")];

fn ours(payload: &Bytes) -> Packet {
    let mut p = Publish::new(TopicName::new(TOPIC).expect("valid"), payload.clone());
    p.qos = QoS::AtLeastOnce;
    p.packet_id = NonZeroU16::new(42);
    Packet::Publish(p)
}

fn theirs_v4(payload: &Bytes) -> r4::Publish {
    let mut p = r4::Publish::from_bytes(TOPIC, rumqttc::QoS::AtLeastOnce, payload.clone());
    p.pkid = 42;
    p
}

fn theirs_v5(payload: &Bytes) -> r5::Publish {
    let mut p = r5::Publish::new(
        TOPIC,
        rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
        payload.clone(),
        None,
    );
    p.pkid = 42;
    p
}

/// Packets per decode batch: a buffer of back-to-back packets, as a socket read delivers them,
/// so that per-batch setup does not weigh on the per-packet figure.
const BATCH: usize = 256;

fn decode_bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("publish_decode");
    for (size, name) in SIZES {
        let payload = Bytes::from(vec![0xa5u8; size]);
        let packet = ours(&payload);
        let mut v311 = BytesMut::new();
        let mut v5 = BytesMut::new();
        for _ in 0..BATCH {
            packet
                .encode(ProtocolVersion::V311, &mut v311)
                .expect("encodes");
            packet
                .encode(ProtocolVersion::V5, &mut v5)
                .expect("encodes");
        }
        group.throughput(Throughput::Elements(BATCH as u64));

        let input = |bytes: &BytesMut| {
            let bytes = bytes.clone();
            move || bytes.clone()
        };
        group.bench_function(BenchmarkId::new("ferry/v311", name), |b| {
            b.iter_batched(
                input(&v311),
                |mut buf| {
                    while let Ok(Some(p)) = decode(&mut buf, ProtocolVersion::V311, MAX_PACKET_SIZE)
                    {
                        black_box(p);
                    }
                },
                BatchSize::LargeInput,
            )
        });
        group.bench_function(BenchmarkId::new("rumqttc/v311", name), |b| {
            b.iter_batched(
                input(&v311),
                |mut buf| {
                    while let Ok(p) = r4::Packet::read(&mut buf, MAX_PACKET_SIZE) {
                        black_box(p);
                    }
                },
                BatchSize::LargeInput,
            )
        });
        group.bench_function(BenchmarkId::new("ferry/v5", name), |b| {
            b.iter_batched(
                input(&v5),
                |mut buf| {
                    while let Ok(Some(p)) = decode(&mut buf, ProtocolVersion::V5, MAX_PACKET_SIZE) {
                        black_box(p);
                    }
                },
                BatchSize::LargeInput,
            )
        });
        group.bench_function(BenchmarkId::new("rumqttc/v5", name), |b| {
            b.iter_batched(
                input(&v5),
                |mut buf| {
                    while let Ok(p) = r5::Packet::read(&mut buf, None) {
                        black_box(p);
                    }
                },
                BatchSize::LargeInput,
            )
        });
    }
    group.finish();
}

fn encode_bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("publish_encode");
    for (size, name) in SIZES {
        let payload = Bytes::from(vec![0xa5u8; size]);
        let packet = ours(&payload);
        let v4 = r4::Packet::Publish(theirs_v4(&payload));
        let v5 = r5::Packet::Publish(theirs_v5(&payload));
        let mut buf = BytesMut::with_capacity(2 * size + 128);
        group.throughput(Throughput::Elements(1));

        group.bench_function(BenchmarkId::new("ferry/v311", name), |b| {
            b.iter(|| {
                buf.clear();
                black_box(
                    packet
                        .encode(ProtocolVersion::V311, &mut buf)
                        .expect("encodes"),
                );
            })
        });
        group.bench_function(BenchmarkId::new("rumqttc/v311", name), |b| {
            b.iter(|| {
                buf.clear();
                black_box(v4.write(&mut buf, MAX_PACKET_SIZE).expect("encodes"));
            })
        });
        group.bench_function(BenchmarkId::new("ferry/v5", name), |b| {
            b.iter(|| {
                buf.clear();
                black_box(
                    packet
                        .encode(ProtocolVersion::V5, &mut buf)
                        .expect("encodes"),
                );
            })
        });
        group.bench_function(BenchmarkId::new("rumqttc/v5", name), |b| {
            b.iter(|| {
                buf.clear();
                black_box(v5.write(&mut buf, None).expect("encodes"));
            })
        });
    }
    group.finish();
}

criterion_group!(benches, decode_bench, encode_bench);
criterion_main!(benches);
