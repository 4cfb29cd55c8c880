#![no_main]
//! Link frame decoder: never panics on any bytes; every frame it decodes encodes to bytes
//! that decode to the same frame.

use bytes::BytesMut;
use ferry_protocol::link_frames::decode;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut buf = BytesMut::from(data);
    while let Ok(Some(frame)) = decode(&mut buf, 1 << 20) {
        let mut out = BytesMut::new();
        frame.encode(&mut out);
        let again = decode(&mut out, 1 << 20).expect("re-encoded frame decodes").expect("whole");
        assert_eq!(again, frame);
        assert!(out.is_empty());
    }
});
