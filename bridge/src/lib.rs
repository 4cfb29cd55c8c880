//! `ferry-bridge`: the link between edge and cloud.
//!
//! - [`pki`]: the link's CA, edge and node certificates (rcgen).
//!
//! Step 4 goes on with the QUIC link itself (quinn + rustls), resume, acks and the downlink.

pub mod pki;
