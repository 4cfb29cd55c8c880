//! `ferry-cloud`: the multi-protocol cloud node.
//!
//! - [`admin`]: the admin HTTP listener: a JSON API and Prometheus metrics.
//! - [`ingest`]: an edge's records, appended exactly once by (edge, sequence).
//! - [`log`]: the durable partitioned log of Kafka v2 record batches, group-committed.
//! - [`meta`]: streams, consumer cursors and edge sequences in redb, changed only by commands.
//! - [`node`]: a node: the log, the metadata, the routes and the MQTT front wired together.
//! - [`routes`]: which stream and partition an MQTT message goes to, and the record it becomes.
//!
//! Still to come (see the README's status table): the link (step 4), then the Kafka and
//! AMQP fronts.

pub mod admin;
pub mod demo;
pub mod ingest;
pub mod kafka;
pub mod link;
pub mod log;
pub mod meta;
pub mod node;
pub mod routes;
