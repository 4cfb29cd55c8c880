#![no_main]
//! MQTT 5.0 decoder: never panics; what it decodes re-encodes to the same packet.

use ferry_protocol::mqtt::ProtocolVersion;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| ferry_fuzz::decode_reencode(data, ProtocolVersion::V5));
