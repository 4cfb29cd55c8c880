//! What a server runs on the edge only (feature `edge`): the broker's outbox (its budget
//! restored from the store), the lanes from the link into the router, the link itself when
//! `[uplink] cloud` is set, and what the server tells of them.

use std::sync::Arc;
use std::time::Duration;

use ferry_bridge::edge_dialer::{LinkStats, LinkStatus};
use tokio::sync::{mpsc, watch, Notify};

use super::router::cloud_lanes::CloudLanes;
use super::{RouterHandle, Server, StartError};
use crate::broker::Broker;
use crate::outbox::OutboxBudget;
use crate::outbox_source::EdgeOutbox;
use crate::store::Store;
use crate::uplink::{UplinkConfig, UplinkRules};

/// The cloud's acknowledgements of the outbox waiting for the router: the link sends at
/// most one per priority class per acknowledgement round (every 10 ms). They are
/// cumulative, so one that finds the lane full is not needed: a later one covers it, and
/// the next link's WELCOME says what the cloud has at the latest.
const OUTBOX_ACK_LANE: usize = 1024;

/// Downlink batches waiting for the router: a link hands over the next only once the
/// router has applied the last (and one the link before it dropped may still be here), so
/// a few are enough.
const DOWNLINK_LANE: usize = 16;

/// The edge's side of a running server.
#[derive(Debug, Clone)]
pub(super) struct EdgeSide {
    /// The outbox as the link reads it.
    outbox: Arc<EdgeOutbox>,
    /// The link's status, once it is started.
    link: Option<Arc<LinkStatus>>,
}

impl EdgeSide {
    /// At start-up: gives `broker` its outbox under the rules of `[uplink]`, with what the
    /// store holds of it, and makes the lanes between the link and the router.
    pub(super) fn open(
        uplink: &UplinkConfig,
        store: &Store,
        broker: &mut Broker,
    ) -> Result<(Self, CloudLanes), StartError> {
        let mut budget = OutboxBudget::new(UplinkRules::new(uplink)?);
        budget.restore(store.outbox_totals()?);
        broker.set_outbox(budget);
        let (acks, outbox_acks) = mpsc::channel(OUTBOX_ACK_LANE);
        let (downlink_tx, downlink) = mpsc::channel(DOWNLINK_LANE);
        let added = Arc::new(Notify::new());
        let outbox = Arc::new(EdgeOutbox {
            reader: store.outbox_reader(),
            acks,
            added: added.clone(),
            downlink: downlink_tx,
            router: std::sync::OnceLock::new(),
        });
        let edge = Self { outbox, link: None };
        Ok((edge, CloudLanes::new(outbox_acks, added, downlink)))
    }

    /// Starts the link if `[uplink] cloud` is set; it runs until `stop` turns true, and
    /// asks `router` for the figures it tells the cloud.
    pub(super) fn start_link(
        &mut self,
        uplink: &UplinkConfig,
        router: RouterHandle,
        stop: watch::Receiver<bool>,
    ) {
        let Some(config) = crate::outbox_source::client_config(uplink) else {
            return;
        };
        let _ = self.outbox.router.set(router);
        self.link = Some(crate::outbox_source::start(
            config,
            self.outbox.clone(),
            stop,
        ));
    }
}

impl Server {
    /// How long ago the oldest record still in the outbox was accepted; zero if it is
    /// empty, None if the store cannot be read.
    pub async fn outbox_oldest_age(&self) -> Option<Duration> {
        let reader = self.edge.outbox.reader.clone();
        let oldest = tokio::task::spawn_blocking(move || reader.oldest_accepted_unix_ms())
            .await
            .ok()?
            .ok()?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        Some(Duration::from_millis(
            oldest.map_or(0, |t| now.saturating_sub(t)),
        ))
    }

    /// The link to the cloud, if `[uplink] cloud` is set.
    pub fn link_status(&self) -> Option<LinkStats> {
        self.edge.link.as_ref().map(|l| l.get())
    }
}
