//! `ferry-edge`: the MQTT broker for gateways, and the library the cloud node embeds.
//!
//! - [`broker`]: the broker core, sans-IO (sessions, subscriptions, retained messages, wills,
//!   QoS flows, flow control, and where an accepted message goes: the edge's outbox or the
//!   cloud's log).
//! - [`outbox`]: the outbox budget, sans-IO: what goes up to the cloud and whether it fits.
//! - [`uplink`]: the `[uplink]` configuration and its routes.
//! - [`outbox_source`]: the link's edge side: the outbox as `ferry_bridge`'s edge dialer
//!   reads it, the downlink, the link started from `[uplink]`.
//! - [`server`]: the tokio driver: listeners, connections, the router thread; graceful stop.
//! - [`store`]: durable state in redb (sessions, queues, retained messages, the outbox).
//! - [`auth`]: Mosquitto's password and ACL files.
//! - [`config`]: the TOML configuration and its defaults.
//! - [`metrics`]: Prometheus metrics and the health API over HTTP.
//! - [`systemd`]: systemd's notify protocol (READY, the watchdog, STOPPING).
//!
//! The `ferry-edge` binary's allocator (mimalloc) is the default feature `mimalloc`.

pub mod auth;
pub mod broker;
pub mod config;
pub mod metrics;
pub mod outbox;
pub mod outbox_source;
pub mod server;
pub mod store;
pub mod systemd;
pub mod uplink;

pub use ferry_protocol::mqtt;
