//! `ferry-bridge`: the link between edge and cloud (`docs/link-protocol.md`).
//!
//! - [`pki`]: the link's CA, edge and node certificates (rcgen).
//! - [`quic`]: the QUIC endpoints (quinn + rustls, mutual TLS) and the frame stream.
//! - [`client`]: the edge's end: sends its outbox, deletes what the cloud acknowledged,
//!   reconnects with backoff.
//! - [`server`]: the cloud's end: takes each edge's identity from its certificate, hands
//!   its records to the ingest path and acknowledges what is durable.

pub mod client;
pub mod pki;
pub mod quic;
pub mod server;
