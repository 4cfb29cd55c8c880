//! `ferry-cloud`: the multi-protocol cloud node.
//!
//! Step 3 of the plan fills this crate (the partitioned log, routes, MQTT front); steps 5
//! and later add the Kafka and AMQP fronts.
