#![no_main]
//! AMQP 0-9-1 frame decoder (ferry-cloud's, on amq-protocol): never panics on any bytes;
//! every frame it decodes encodes to bytes that decode to the same frame.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| ferry_cloud::amqp::fuzzing::frames(data));
