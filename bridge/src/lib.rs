//! `ferry-bridge`: the QUIC link between edge and cloud.
//!
//! Step 4 of the plan fills this crate (quinn + rustls, certificates, resume, downlink).
