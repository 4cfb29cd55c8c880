//! The invariant both fuzz targets check, for one protocol version.

use bytes::BytesMut;
use ferry_protocol::mqtt::{decode, Packet, ProtocolVersion, MAX_PACKET_SIZE};

/// Decodes packets from `data` until it runs out or an error; every packet decoded must
/// re-encode, to exactly `encoded_len` bytes, and decode again to the same packet. Never
/// panics on any input: a panic here is a bug.
pub fn decode_reencode(data: &[u8], version: ProtocolVersion) {
    let mut buf = BytesMut::from(data);
    while let Ok(Some(packet)) = decode(&mut buf, version, MAX_PACKET_SIZE) {
        // A CONNECT carries its own protocol level.
        let version = match &packet {
            Packet::Connect(c) => c.protocol,
            _ => version,
        };
        let mut out = BytesMut::new();
        let written = packet
            .encode(version, &mut out)
            .unwrap_or_else(|e| panic!("decoded {packet:?} but could not re-encode it: {e}"));
        assert_eq!(written, out.len());
        assert_eq!(packet.encoded_len(version), Ok(written));
        let again = decode(&mut out, version, MAX_PACKET_SIZE);
        assert_eq!(again, Ok(Some(packet)), "re-encoded packet decodes differently");
        assert!(out.is_empty(), "re-encoded packet left bytes over");
    }
}
