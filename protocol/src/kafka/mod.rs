//! Kafka formats that Ferry's log stores as they are: the v2 record batch (magic 2,
//! CRC-32C). The cloud's log keeps exactly these bytes on disk, so a Kafka Fetch can serve
//! them without re-encoding. The request/response codec of the Kafka front comes from the
//! `kafka-protocol` crate; this module only owns what the log itself needs, and how an MQTT message rides in a record ([`mqtt`]).

pub mod batch;
pub mod mqtt;

pub use batch::{
    records, set_base_offset, uncompressed, verify_crc, BatchBuilder, BatchError, BatchHeader,
    Compression, Header, RecordRef, Records,
};
