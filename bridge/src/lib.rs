//! `ferry-bridge`: the link between edge and cloud (`docs/link-protocol.md`).
//!
//! Each end is a state machine without I/O, and an async driver around it (the shape of
//! quinn-proto's `Connection` and quinn's `ConnectionDriver`):
//!
//! - [`edge_end`]: the edge's end: resumes from the cloud's committed sequences, sends
//!   within the credit, deletes what is acknowledged, applies the downlink, detects a stall.
//! - [`cloud_end`]: the cloud's end: checks the version and the credit, groups batches for
//!   the ingest path, coalesces acknowledgements, keeps the downlink within its window.
//! - [`edge_dialer`]: the edge's driver: dials the cloud (with [`backoff`] between
//!   attempts), reads the outbox, runs an [`edge_end::EdgeEnd`] on the QUIC stream.
//! - [`cloud_listener`]: the cloud's driver: accepts edges, takes each edge's identity from
//!   its certificate, applies the deny list, runs a [`cloud_end::CloudEnd`] per link.
//! - [`records`]: the outbox's records as the record batches of BATCH frames, and the
//!   records of a DOWN frame.
//! - [`error`]: [`LinkError`], why a link ended.
//! - [`pki`]: the link's CA, edge and node certificates (rcgen).
//! - [`quic`]: the QUIC endpoints (quinn + rustls, mutual TLS) and the frame stream.

use std::future::Future;
use std::pin::Pin;

pub mod backoff;
pub mod cloud_end;
pub mod cloud_listener;
pub mod edge_dialer;
pub mod edge_end;
pub mod error;
pub mod pki;
pub mod quic;
pub mod records;

/// The former path of [`edge_dialer`], still named by `ferry-edge`'s `src/server/`; to go
/// once that names `edge_dialer`.
pub use edge_dialer as client;
pub use error::{FailureKind, LinkError, OutboxError, SinkError};

/// A boxed future, as the traits the two ends call into ([`edge_dialer::Outbox`],
/// [`cloud_listener::Sink`]) return.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;
