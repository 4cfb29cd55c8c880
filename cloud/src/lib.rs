//! `ferry-cloud`: the multi-protocol cloud node.
//!
//! - [`ingest`]: an edge's records, appended exactly once by (edge, sequence).
//! - [`log`]: the durable partitioned log of Kafka v2 record batches, group-committed.
//! - [`meta`]: streams, consumer cursors and edge sequences in redb, changed only by commands.
//! - [`routes`]: which stream and partition an MQTT message goes to, and the record it becomes.
//!
//! Still to come (see the README's status table): the
//! MQTT front (the broker of `ferry-edge`), the admin API, then the
//! Kafka and AMQP fronts.

pub mod ingest;
pub mod log;
pub mod meta;
pub mod routes;
