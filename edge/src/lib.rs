//! `ferry-edge`: the MQTT broker for gateways, and the library the cloud node embeds.
//!
//! - [`broker`]: the broker core, sans-IO (sessions, subscriptions, retained messages, wills,
//!   QoS flows, flow control, and where an accepted message goes: the edge's outbox or the
//!   cloud's log).
//! - `outbox` (feature `edge`): the outbox budget, sans-IO: what goes up to the cloud and whether it fits.
//! - `uplink` (feature `edge`): the `[uplink]` configuration and its routes.
//! - `outbox_source` (feature `edge`): the link's edge side: the outbox as `ferry_bridge`'s edge dialer
//!   reads it, the downlink, the link started from `[uplink]`.
//! - [`server`]: the tokio driver: listeners, connections, the router thread; graceful stop.
//! - [`store`]: durable state in redb (sessions, queues, retained messages; the outbox with
//!   `edge`).
//! - [`auth`]: Mosquitto's password and ACL files.
//! - `field` (feature `field`): field sources (serial lines, Modbus TCP/RTU) read by the
//!   edge and published through its own broker; commands written back to the devices.
//! - [`config`]: the TOML configuration and its defaults.
//! - [`metrics`]: Prometheus metrics and the health API over HTTP.
//! - [`systemd`]: systemd's notify protocol (READY, the watchdog, STOPPING).
//!
//! Features, both default:
//!
//! - `edge`: what only a gateway runs: `outbox`, `uplink`, `outbox_source` and the outbox's
//!   tables in the store, the link's lanes into the router, ferry-bridge's client end, and
//!   the `ferry-edge` binary. Without it the broker has no outbox (what clients publish goes
//!   to local subscribers, or in log mode to the log) and nothing starts a link: that is how
//!   ferry-cloud embeds it.
//! - `mimalloc`: the `ferry-edge` binary's allocator.

pub mod auth;
pub mod broker;
pub mod config;
#[cfg(feature = "field")]
pub mod field;
pub mod metrics;
#[cfg(feature = "edge")]
pub mod outbox;
#[cfg(feature = "edge")]
pub mod outbox_source;
pub mod server;
pub mod store;
pub mod systemd;
#[cfg(feature = "edge")]
pub mod uplink;

pub use ferry_protocol::mqtt;
