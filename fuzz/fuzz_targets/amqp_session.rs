#![no_main]
//! The AMQP broker core driven by arbitrary frames after a handshake (random method
//! sequences, content out of place, bad frames): never panics; a frame error closes.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| ferry_cloud::amqp::fuzzing::session(data));
