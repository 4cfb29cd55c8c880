//! `ferry-cloud`: the multi-protocol cloud node.
//!
//! - [`node`]: a node: the log, the metadata, the routes, the link and the fronts wired
//!   together; which threads and runtimes it runs, and why.
//! - [`config`]: the configuration file and its defaults.
//! - [`log`]: the durable partitioned log of Kafka v2 record batches, group-committed,
//!   behind the [`log::Storage`] trait.
//! - [`meta`]: streams, consumer cursors and edge sequences in redb, changed only by commands.
//! - [`routes`]: which stream and partition an MQTT message goes to, and the record it becomes.
//! - [`mqtt`]: the MQTT front: the broker of `ferry-edge` in log mode, and the tailer that
//!   delivers from the log.
//! - [`kafka`]: the Kafka front (the Kafka wire protocol over the log).
//! - [`amqp`]: the AMQP 0-9-1 front (RabbitMQ clients; queues are cursors over the log).
//! - [`link_sink`] and [`ingest`]: the link's cloud side (`ferry_bridge`'s cloud listener):
//!   an edge's records appended exactly once by (edge, class, sequence), the downlink.
//! - [`admin`]: the admin HTTP listener: a JSON API and Prometheus metrics.
//! - [`fleet`]: the edges as JSON (`/api/fleet`): state, outbox as each edge tells it,
//!   rates, history.
//! - `demo` (feature `demo`, default): `ferry-cloud demo`, a cloud, an edge and a sensor in
//!   one process; the only part of the node that builds ferry-edge's edge parts (the outbox,
//!   the link's edge end).
//!
//! Still to come (see the README's status table): most of clustering (Step 10).

pub mod admin;
pub mod amqp;
pub mod config;
#[cfg(feature = "demo")]
pub mod demo;
pub mod fleet;
pub mod ingest;
pub mod kafka;
pub mod link_sink;
pub mod log;
pub mod meta;
pub mod mqtt;
pub mod node;
pub mod routes;
