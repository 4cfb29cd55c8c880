//! `ferry-edge`: the MQTT broker for gateways.
//!
//! - [`broker`]: the broker core, sans-IO (sessions, subscriptions, retained messages, wills,
//!   QoS flows, flow control). The cloud node embeds the same core.
//! - [`server`]: the tokio driver: listeners, connections, the router thread.
//! - [`auth`]: Mosquitto's password and ACL files.
//! - [`config`]: the TOML configuration and its defaults.
//! - [`metrics`]: Prometheus metrics over HTTP.
//! - [`store`]: durable state in redb (sessions, queues, retained messages).

pub mod auth;
pub mod broker;
pub mod config;
pub mod link;
pub mod metrics;
pub mod outbox;
pub mod server;
pub mod store;
pub mod systemd;
pub mod uplink;

pub use ferry_protocol::mqtt;
