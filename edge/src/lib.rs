//! `ferry-edge`: the MQTT broker for gateways.
//!
//! Step 2 of the plan fills this crate (broker core, persistence, listeners). Until then it
//! only re-exports the codec it will be built on.

pub use ferry_protocol::mqtt;
