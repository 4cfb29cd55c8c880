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
//! - [`fleet`]: every edge the cloud's link has seen: its link, history, the figures it
//!   tells in STATUS frames, an hour of samples.
//! - [`records`]: the outbox's records as the record batches of BATCH frames, and the
//!   records of a DOWN frame.
//! - [`error`]: [`LinkError`], why a link ended; [`OutboxError`] and [`SinkError`], what
//!   the edge's outbox and the cloud's ingest path fail with.
//! - [`pki`]: the link's CA, edge and node certificates (rcgen), and an edge's identity
//!   read from its certificate.
//! - [`quic`]: the QUIC endpoints (quinn + rustls, mutual TLS) and the frame stream.
//!
//! Features (both on by default), so that each binary builds only its own end:
//! - `client`, the edge's side: [`edge_end`], [`edge_dialer`], [`backoff`], [`records`]
//!   and the edge's endpoint [`quic::client`]. ferry-edge takes only this one.
//! - `server`, the cloud's side: [`cloud_end`], [`cloud_listener`], [`fleet`], [`pki`] (with rcgen and
//!   x509-cert) and the cloud's endpoint [`quic::server`]. ferry-cloud takes this one, and
//!   gets `client` too through ferry-edge, whose server starts the edge's link.
//!
//! The frames, the errors and the frame stream are in both.

use std::future::Future;
use std::pin::Pin;

#[cfg(feature = "client")]
pub mod backoff;
#[cfg(feature = "server")]
pub mod cloud_end;
#[cfg(feature = "server")]
pub mod cloud_listener;
#[cfg(feature = "client")]
pub mod edge_dialer;
#[cfg(feature = "client")]
pub mod edge_end;
pub mod error;
#[cfg(feature = "server")]
pub mod fleet;
#[cfg(feature = "server")]
pub mod pki;
pub mod quic;
#[cfg(feature = "client")]
pub mod records;

pub use error::{FailureKind, LinkError, OutboxError, SinkError};

/// A boxed future, as the traits the two ends call into (`edge_dialer::Outbox`,
/// `cloud_listener::Sink`) return.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;
