//! The Kafka front across the nodes of a cluster (Step 10, first part): the nodes on one
//! object store and database ([`crate::log::ObjectLog::members`]) are the brokers. Any node
//! serves Produce and Fetch for any partition (offsets are assigned at commit), so a
//! partition's "leader" only spreads clients over the nodes: partition `p` of topic `t` is
//! led by broker `(hash(t) + p) mod n` of the brokers in name order. A consumer group's
//! coordinator is broker `hash(group) mod n`; the group requests (JoinGroup, SyncGroup,
//! Heartbeat, LeaveGroup, OffsetCommit) for a group another node coordinates are answered
//! NOT_COORDINATOR, so clients look it up again. Committed offsets are in PostgreSQL, so a
//! group that moves to another node (a node joined or its lease ran out) rebalances from
//! them. A broker's id is a hash of its node's name, the same on every node.
//!
//! With one node (or on the local log) there is no view: the node is broker 0 and
//! coordinates everything, as before. Limits: the view is each node's own, refreshed every
//! second, so while the nodes' views differ (for up to a second around a change) a group
//! may be coordinated by two nodes at once; no lease fences it yet.

use std::sync::{Arc, RwLock};

/// A broker of the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Broker {
    pub id: i32,
    pub name: String,
    pub host: String,
    pub port: i32,
}

/// The brokers this node sees (none: it is alone), and its own name.
#[derive(Debug, Default)]
pub struct ClusterView {
    me: RwLock<String>,
    brokers: RwLock<Vec<Broker>>,
}

/// FNV-1a, 32 bits: the same everywhere (unlike the standard library's hasher).
fn hash(s: &str) -> u32 {
    s.bytes().fold(0x811c_9dc5, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

impl ClusterView {
    pub fn new() -> Arc<Self> {
        Arc::default()
    }

    /// Puts the live nodes in force: this node's name and each node's name and Kafka
    /// address (`host:port`; nodes without one are not brokers).
    pub fn set(&self, me: &str, nodes: &[(String, Option<String>)]) {
        let mut brokers: Vec<Broker> = nodes
            .iter()
            .filter_map(|(name, addr)| {
                let (host, port) = addr.as_deref()?.rsplit_once(':')?;
                Some(Broker {
                    // Positive and never 0 (0 is the lone node's id).
                    id: (hash(name) & 0x7fff_ffff).max(1) as i32,
                    name: name.clone(),
                    host: host.to_owned(),
                    port: port.parse().ok()?,
                })
            })
            .collect();
        brokers.sort_by(|a, b| a.name.cmp(&b.name));
        *self.me.write().unwrap_or_else(|e| e.into_inner()) = me.to_owned();
        *self.brokers.write().unwrap_or_else(|e| e.into_inner()) = brokers;
    }

    /// The brokers, when this node is one of two or more; None when it is alone.
    pub fn brokers(&self) -> Option<Vec<Broker>> {
        let brokers = self.brokers.read().unwrap_or_else(|e| e.into_inner());
        let me = self.me.read().unwrap_or_else(|e| e.into_inner());
        (brokers.len() >= 2 && brokers.iter().any(|b| b.name == *me)).then(|| brokers.clone())
    }

    /// The broker that leads partition `p` of `topic` (None: alone).
    pub fn leader(&self, topic: &str, p: u32) -> Option<Broker> {
        let brokers = self.brokers()?;
        let i = (hash(topic) as usize + p as usize) % brokers.len();
        brokers.into_iter().nth(i)
    }

    /// The broker that coordinates `group` (None: alone).
    pub fn coordinator(&self, group: &str) -> Option<Broker> {
        let brokers = self.brokers()?;
        let i = hash(group) as usize % brokers.len();
        brokers.into_iter().nth(i)
    }

    /// False when another node coordinates `group`.
    pub fn coordinates(&self, group: &str) -> bool {
        let me = self.me.read().unwrap_or_else(|e| e.into_inner()).clone();
        self.coordinator(group).is_none_or(|c| c.name == me)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_node_sees_the_same_leaders_and_coordinators_and_one_node_is_alone() {
        let nodes = vec![
            ("b".to_owned(), Some("10.0.0.2:9092".to_owned())),
            ("a".to_owned(), Some("10.0.0.1:9092".to_owned())),
            ("c".to_owned(), None),
        ];
        let (on_a, on_b) = (ClusterView::new(), ClusterView::new());
        on_a.set("a", &nodes);
        on_b.set("b", &nodes);
        let brokers = on_a.brokers().expect("two brokers");
        assert_eq!(
            brokers.iter().map(|b| b.name.as_str()).collect::<Vec<_>>(),
            ["a", "b"],
            "a node without a Kafka address is no broker"
        );
        assert!(brokers.iter().all(|b| b.id > 0) && brokers[0].id != brokers[1].id);
        assert_eq!(on_a.brokers(), on_b.brokers());
        for p in 0..8 {
            assert_eq!(on_a.leader("t", p), on_b.leader("t", p));
        }
        let led: std::collections::HashSet<String> = (0..2)
            .filter_map(|p| on_a.leader("t", p))
            .map(|b| b.name)
            .collect();
        assert_eq!(led.len(), 2, "two partitions, two leaders");
        for g in ["g1", "g2", "orders"] {
            assert_eq!(on_a.coordinator(g), on_b.coordinator(g));
            assert_ne!(
                on_a.coordinates(g),
                on_b.coordinates(g),
                "exactly one coordinates {g}"
            );
        }
        let alone = ClusterView::new();
        alone.set("a", &nodes[1..2]);
        assert!(alone.brokers().is_none() && alone.coordinates("g1"));
        assert!(
            ClusterView::new().coordinates("g1"),
            "no view: everything here"
        );
    }
}
