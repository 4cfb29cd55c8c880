//! The Kafka front across the nodes of a cluster (Step 10): the nodes on one object store
//! and database ([`crate::log::ObjectLog::members`]) are the brokers. Any node serves
//! Produce and Fetch for any partition (offsets are assigned at commit), so a partition's
//! "leader" only spreads clients over the nodes: partition `p` of topic `t` is led by broker
//! `(hash(t) + p) mod n` of the brokers in name order. A broker's id is a hash of its node's
//! name, the same on every node.
//!
//! A consumer group is coordinated by the node that holds its lease (`kafka-group`, the
//! group id; see [`crate::log::Lease`]): a node takes or renews it when a group request
//! comes (at most every third of [`GROUP_LEASE`]), and answers NOT_COORDINATOR when another
//! node holds it. FindCoordinator names the holder, or, for a group nobody holds, broker
//! `hash(group) mod n`. OffsetCommit is fenced: its transaction checks that this node still
//! holds the lease with the same token, so a node that lost it (paused past the lease) cannot
//! commit for the group after another took over. Committed offsets are in PostgreSQL, so a
//! group that moves rebalances from them.
//!
//! With one node (or on the local log) there is no view: the node is broker 0 and
//! coordinates everything, without leases, as before. Limit: the in-memory group state is
//! not fenced (a node that lost a lease may still answer a heartbeat for up to two thirds of
//! the lease it last saw); its commits are.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use crate::log::{Fence, Lease, ObjectLog};

/// How long a group coordinator's lease lasts from its last renewal.
pub const GROUP_LEASE: Duration = Duration::from_secs(10);
const GROUP_KIND: &str = "kafka-group";
/// How long an edge's link lease lasts from its last renewal; the link renews it every
/// third of that while it lives.
pub const LINK_LEASE: Duration = Duration::from_secs(10);
const LINK_KIND: &str = "edge-link";

/// Whether this node may serve an edge's link ([`ClusterView::claim_link`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkClaim {
    /// This node holds the edge's link lease (or is alone); `taken`: it has just taken it,
    /// rather than renewed it.
    Ours { taken: bool },
    /// The node named holds it: the edge's link is there.
    Elsewhere(String),
}

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
    /// Where the leases are: the log on object storage, once this node joined.
    store: RwLock<Option<Arc<ObjectLog>>>,
    /// On the object backend: leases are needed, and until `store` is set nothing is ours.
    clustered: std::sync::atomic::AtomicBool,
    /// Edge → the token of the link lease this node holds for it.
    links: Mutex<HashMap<String, i64>>,
    /// The group leases this node holds, and when each was last taken or renewed.
    held: Mutex<HashMap<String, (Lease, Instant)>>,
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

    /// This node is on the object backend: edges' links need their lease
    /// ([`ClusterView::claim_link`]), which it cannot take before [`ClusterView::set_store`].
    pub fn set_clustered(&self) {
        self.clustered
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// On the object backend, takes or renews this node's lease on `edge`'s link, so that an
    /// edge has one link in the whole cluster; alone (the local log), always ours. An error
    /// when the database cannot say, or before this node joined. Blocking.
    pub fn claim_link(&self, edge: &str) -> Result<LinkClaim, crate::log::LogError> {
        let Some(store) = self.store() else {
            if self.clustered.load(std::sync::atomic::Ordering::Relaxed) {
                return Err(crate::log::LogError::Failed(
                    "this node has not joined the cluster yet".into(),
                ));
            }
            return Ok(LinkClaim::Ours { taken: false });
        };
        let mut links = self.links.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(token) = store.acquire_lease(LINK_KIND, edge, LINK_LEASE)? {
            let before = links.insert(edge.to_owned(), token);
            return Ok(LinkClaim::Ours {
                taken: before != Some(token),
            });
        }
        links.remove(edge);
        drop(links);
        let holder = store.lease_holder(LINK_KIND, edge)?;
        Ok(LinkClaim::Elsewhere(
            holder.map_or_else(|| "another node".to_owned(), |h| h.owner),
        ))
    }

    /// The fence for appends of `edge`'s records under its link lease, while this node
    /// holds it (None outside a cluster, or when the lease is not held here).
    pub fn link_fence(&self, edge: &str) -> Option<Fence> {
        let store = self.store()?;
        let token = *self
            .links
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(edge)?;
        Some(Fence {
            kind: LINK_KIND.to_owned(),
            key: edge.to_owned(),
            lease: Lease {
                owner: store.node().to_owned(),
                token,
            },
        })
    }

    /// Gives up this node's lease on `edge`'s link (its link here ended), so that the edge
    /// may link to another node at once. Blocking.
    pub fn release_link(&self, edge: &str) {
        self.links
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(edge);
        if let Some(store) = self.store() {
            if let Err(e) = store.release_lease(LINK_KIND, edge) {
                tracing::warn!(error = %e, edge, "cannot give up the link's lease");
            }
        }
    }

    /// True on the object backend, where an edge's records may have been taken by another
    /// node before they come here.
    pub fn is_clustered(&self) -> bool {
        self.clustered.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Where the leases are kept (the node's log on object storage).
    pub fn set_store(&self, log: Arc<ObjectLog>) {
        *self.store.write().unwrap_or_else(|e| e.into_inner()) = Some(log);
    }

    fn store(&self) -> Option<Arc<ObjectLog>> {
        self.store.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn me(&self) -> String {
        self.me.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The broker to name for `group` (None: alone): the node holding its lease, or the
    /// one its hash picks when nobody does. Blocking: may ask the database.
    pub fn coordinator(&self, group: &str) -> Option<Broker> {
        let brokers = self.brokers()?;
        let holder = self
            .store()
            .and_then(|s| s.lease_holder(GROUP_KIND, group).ok().flatten());
        if let Some(b) = holder.and_then(|h| brokers.iter().find(|b| b.name == h.owner)) {
            return Some(b.clone());
        }
        let i = hash(group) as usize % brokers.len();
        brokers.into_iter().nth(i)
    }

    /// In a cluster: takes or renews this node's lease on `group` unless it did within a
    /// third of [`GROUP_LEASE`]. Blocking: may ask the database.
    pub fn ensure(&self, group: &str) {
        if self.brokers().is_none() {
            return;
        }
        let fresh = self
            .held
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(group)
            .is_some_and(|(_, at)| at.elapsed() < GROUP_LEASE / 3);
        if fresh {
            return;
        }
        let Some(store) = self.store() else { return };
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        match store.acquire_lease(GROUP_KIND, group, GROUP_LEASE) {
            Ok(Some(token)) => {
                let lease = Lease {
                    owner: self.me(),
                    token,
                };
                held.insert(group.to_owned(), (lease, Instant::now()));
            }
            Ok(None) => {
                held.remove(group);
            }
            Err(e) => tracing::warn!(error = %e, group, "cannot take the group's lease"),
        }
    }

    /// False when this node is in a cluster and does not hold `group`'s lease (taken or
    /// renewed within two thirds of [`GROUP_LEASE`], by [`ClusterView::ensure`]).
    pub fn coordinates(&self, group: &str) -> bool {
        if self.brokers().is_none() {
            return true;
        }
        self.held
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(group)
            .is_some_and(|(_, at)| at.elapsed() < GROUP_LEASE * 2 / 3)
    }

    /// The fence for work done for `group` under its lease (None outside a cluster).
    pub fn fence(&self, group: &str) -> Option<Fence> {
        self.brokers()?;
        let held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        let (lease, _) = held.get(group)?;
        Some(Fence {
            kind: GROUP_KIND.to_owned(),
            key: group.to_owned(),
            lease: lease.clone(),
        })
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
            // Nobody holds a lease (no store here): both name the broker the hash picks.
            assert_eq!(on_a.coordinator(g), on_b.coordinator(g));
            assert!(
                !on_a.coordinates(g) && !on_b.coordinates(g),
                "no lease, no coordinating"
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
