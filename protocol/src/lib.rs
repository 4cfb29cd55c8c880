//! Ferry's wire formats, sans-IO.
//!
//! Nothing in this crate touches a socket, a runtime or a clock: callers hand it bytes and
//! get packets back, or hand it packets and get bytes. The async crates (`ferry-edge`,
//! `ferry-bridge`, `ferry-cloud`) are thin drivers around it.
//!
//! - [`mqtt`]: the MQTT 3.1.1 and 5.0 codec (every packet, property and reason code).
//! - [`topic`]: validated topic names and filters, matching, shared subscriptions.
//! - [`kafka`]: the Kafka v2 record batch, the unit of the cloud's log.
//! - [`link_frames`]: the frames of the edge ↔ cloud link (`docs/link-protocol.md`).

pub mod kafka;
pub mod link_frames;
pub mod mqtt;
pub mod topic;
