//! `ferry-bridge`: the link between edge and cloud (`docs/link-protocol.md`).
//!
//! Each end is a state machine without I/O, and an async driver around it (the shape of
//! quinn-proto's `Connection` and quinn's `ConnectionDriver`):
//!
//! - [`edge_end`]: the edge's end: resumes from the cloud's committed sequences, sends
//!   within the credit, deletes what is acknowledged, applies the downlink, detects a stall.
//! - [`cloud_end`]: the cloud's end: checks the version and the credit, groups batches for
//!   the ingest path, coalesces acknowledgements, keeps the downlink within its window.
//! - [`client`]: the edge's driver: connects (with [`backoff`] between attempts), reads
//!   the outbox, runs an [`edge_end::EdgeEnd`] on the QUIC stream.
//! - [`server`]: the cloud's driver: accepts edges, takes each edge's identity from its
//!   certificate, applies the deny list, runs a [`cloud_end::CloudEnd`] per link.
//! - [`records`]: the outbox's records as the record batches of BATCH frames, and the
//!   records of a DOWN frame.
//! - [`error`]: [`LinkError`], why a link ended.
//! - [`pki`]: the link's CA, edge and node certificates (rcgen).
//! - [`quic`]: the QUIC endpoints (quinn + rustls, mutual TLS) and the frame stream.

pub mod backoff;
pub mod client;
pub mod cloud_end;
pub mod edge_end;
pub mod error;
pub mod pki;
pub mod quic;
pub mod records;
pub mod server;

pub use error::LinkError;
