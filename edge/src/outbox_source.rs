//! The edge's link to the cloud (feature `edge`): its outbox (the `outbox` table of
//! [`crate::store`]) as `ferry_bridge::edge_dialer` reads it, and the link started from
//! `[uplink]`.
//!
//! The link reads committed records in its own read transactions; what the cloud
//! acknowledged goes to the router, which deletes it in its next group commit (and takes it
//! off the outbox's budget). The router wakes the link when a commit added records.
//!
//! Downlink messages from the cloud go to the router too: it publishes them to the edge's
//! subscribers (as messages without a publisher) and records a batch's sequence as applied
//! in the commit that routes the last of its messages (a subscriber without room holds them
//! until it has room), and only then does the link acknowledge it; after a restart the edge
//! tells the cloud where it stands, and a batch the cloud sends again while the router still
//! holds it (a new link) is not published twice, so each is published once. They are not
//! sent back up, whatever the uplink routes say.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_bridge::edge_dialer::{ClientConfig, Cursors, LinkStatus, OutRecord, Outbox};
use ferry_bridge::quic::{Timeouts, TlsFiles};
use ferry_bridge::{BoxFuture, FailureKind, OutboxError};
use ferry_protocol::kafka::mqtt::{message_headers, read_headers};
use ferry_protocol::kafka::Compression;
use ferry_protocol::link_frames::EdgeStatus;
use ferry_protocol::topic::TopicName;
use tokio::sync::{mpsc, watch, Notify};

use crate::broker::Message;
use crate::server::RouterHandle;
use crate::store::outbox_tables::OutboxReader;
use crate::store::StoreError;
use crate::uplink::{LinkCompression, UplinkConfig};

/// The outbox as the link sees it.
#[derive(Debug)]
pub(crate) struct EdgeOutbox {
    pub(crate) reader: OutboxReader,
    /// (class, seq) acknowledged by the cloud, to the router.
    pub(crate) acks: mpsc::Sender<(u8, u64)>,
    pub(crate) added: Arc<Notify>,
    /// Downlink messages to publish, the last one's sequence, and who waits for the commit.
    pub(crate) downlink: mpsc::Sender<Downlink>,
    /// Where the broker's figures come from, for STATUS (set when the link starts).
    pub(crate) router: std::sync::OnceLock<RouterHandle>,
}

/// Downlink messages for the router: publish them, record `seq` as applied in the commit
/// that routes the last of them (and of every batch before), then answer `done`.
#[derive(Debug)]
pub(crate) struct Downlink {
    /// The messages to publish, in order, each with its downlink sequence (expired ones are
    /// left out). The router skips those it has already taken, from an earlier link.
    pub(crate) messages: Vec<(u64, Arc<Message>)>,
    /// The batch's last sequence.
    pub(crate) seq: u64,
    /// Answered once `seq` is durable as applied.
    pub(crate) done: tokio::sync::oneshot::Sender<()>,
}

impl Outbox for EdgeOutbox {
    fn read(
        &self,
        after: &Cursors,
        max_bytes: usize,
    ) -> Result<Option<(u8, Vec<OutRecord>)>, OutboxError> {
        let Some((class, entries)) = self.reader.read(after, max_bytes)? else {
            return Ok(None);
        };
        let records = entries
            .into_iter()
            .map(|e| {
                let mut properties = e.msg.properties.clone();
                properties.message_expiry_interval_secs = e.expiry_secs;
                OutRecord {
                    seq: e.seq,
                    timestamp_ms: e.accepted_unix_ms as i64,
                    topic: e.msg.topic.as_str().to_owned(),
                    payload: e.msg.payload.clone(),
                    headers: message_headers(e.msg.qos, e.msg.retain, &properties),
                }
            })
            .collect();
        Ok(Some((class, records)))
    }

    fn acked(&self, class: u8, seq: u64) {
        // The router is gone only when the broker stopped; the cloud resends nothing that
        // is committed, so a lost delete is redone after the next WELCOME.
        // A full lane drops this one: acknowledgements are cumulative (see OUTBOX_ACK_LANE).
        let _ = self.acks.try_send((class, seq));
    }

    fn added(&self) -> Arc<Notify> {
        self.added.clone()
    }

    fn down_applied(&self) -> u64 {
        // Unreadable storage stops the broker too; resending from 0 is what is left.
        self.reader.down_applied().unwrap_or(0)
    }

    /// The figures of a STATUS frame: the broker's count of the outbox and its clients, and
    /// the age of the oldest record from the store.
    fn status(&self) -> BoxFuture<'static, Option<EdgeStatus>> {
        let router = self.router.get().cloned();
        let reader = self.reader.clone();
        Box::pin(async move {
            let (stats, _) = router?.metrics().await?;
            let oldest = tokio::task::spawn_blocking(move || reader.oldest_accepted_unix_ms())
                .await
                .ok()?
                .ok()?;
            let now_ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64);
            Some(EdgeStatus {
                outbox_records: stats.outbox_records,
                outbox_bytes: stats.outbox_bytes,
                outbox_budget_bytes: stats.outbox_budget_bytes,
                oldest_age_ms: oldest.map_or(0, |t| now_ms.saturating_sub(t)),
                last_seq: stats.outbox_last_seq,
                rejected: stats.outbox_rejected,
                dropped: stats.outbox_dropped,
                clients: stats.connections as u64,
            })
        })
    }

    fn apply_down(
        &self,
        seq: u64,
        messages: Vec<OutRecord>,
    ) -> BoxFuture<'static, Result<(), OutboxError>> {
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        let now = Instant::now();
        let msgs: Vec<(u64, Arc<Message>)> = messages
            .into_iter()
            .filter_map(|r| {
                let seq = r.seq;
                let meta = read_headers(&r.header_refs())?;
                let topic = TopicName::new(r.topic).ok()?;
                let mut properties = meta.properties;
                // The expiry counts from when the cloud took the message; an expired one is
                // not published (but counts as applied).
                let expires_at = match properties.message_expiry_interval_secs.take() {
                    Some(secs) => {
                        let left = i64::from(secs) * 1000 - (now_ms - r.timestamp_ms).max(0);
                        if left <= 0 {
                            return None;
                        }
                        Some(now + Duration::from_millis(left as u64))
                    }
                    None => None,
                };
                let msg = Message {
                    topic,
                    payload: r.payload,
                    qos: meta.qos,
                    retain: meta.retain,
                    properties,
                    expires_at,
                    publisher: None,
                    position: None,
                };
                Some((seq, Arc::new(msg)))
            })
            .collect();
        let (done, applied) = tokio::sync::oneshot::channel();
        let downlink = self.downlink.clone();
        Box::pin(async move {
            let stopped = |why| OutboxError::new(FailureKind::Closed, why);
            let down = Downlink {
                messages: msgs,
                seq,
                done,
            };
            downlink
                .send(down)
                .await
                .map_err(|_| stopped(BrokerStopped::BeforeTaking))?;
            applied
                .await
                .map_err(|_| stopped(BrokerStopped::BeforeCommit))
        })
    }
}

/// The outbox's storage failed: to the link, any [`StoreError`] is a storage failure.
impl From<StoreError> for OutboxError {
    fn from(e: StoreError) -> Self {
        OutboxError::new(FailureKind::Storage, e)
    }
}

/// Why downlink messages were not applied: the router, which publishes them and records
/// them as applied, is gone.
#[derive(Debug, thiserror::Error)]
enum BrokerStopped {
    #[error("the broker has stopped")]
    BeforeTaking,
    #[error("the broker stopped before the commit")]
    BeforeCommit,
}

/// The link's settings from `[uplink]`; None without `cloud`.
pub fn client_config(uplink: &UplinkConfig) -> Option<ClientConfig> {
    if uplink.cloud.is_empty() {
        return None;
    }
    let tls = TlsFiles {
        ca_file: uplink.ca_file.clone()?,
        cert_file: uplink.cert_file.clone()?,
        key_file: uplink.key_file.clone()?,
    };
    let mut config = ClientConfig::new(uplink.cloud.clone(), tls);
    config.server_name = uplink.server_name.clone();
    config.compression = match uplink.compression {
        LinkCompression::None => Compression::None,
        LinkCompression::Lz4 => Compression::Lz4,
        LinkCompression::Zstd => Compression::Zstd,
    };
    config.timeouts = Timeouts {
        keepalive: Duration::from_secs(uplink.keepalive_secs.max(1)),
        idle: Duration::from_secs(uplink.idle_timeout_secs.max(2)),
    };
    config.stall_timeout = Duration::from_secs(uplink.stall_timeout_secs.max(1));
    config.backoff_max = Duration::from_secs(uplink.reconnect_max_secs.max(1));
    config.status_interval = Duration::from_secs(uplink.status_secs.max(1));
    Some(config)
}

/// Starts the link in the background; it runs until `stop` turns true.
pub(crate) fn start(
    config: ClientConfig,
    outbox: Arc<EdgeOutbox>,
    stop: watch::Receiver<bool>,
) -> Arc<LinkStatus> {
    let status = Arc::new(LinkStatus::default());
    tokio::spawn(ferry_bridge::edge_dialer::run(
        config,
        outbox,
        status.clone(),
        stop,
    ));
    status
}
