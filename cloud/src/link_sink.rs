//! The cloud's end of the link (`ferry_bridge::cloud_listener`) wired to ingest: `[link]`
//! in the configuration, and the [`Sink`] that turns an edge's record batches into
//! [`EdgeRecord`]s for [`Ingest`], and reads the downlink: messages published on the cloud to
//! `$edge/<edge-id>/<topic>` are in the `downlink` stream (see [`crate::routes`]) and go to
//! that edge, which publishes them on `<topic>`; each edge's position in it is a metadata
//! cursor, moved when the edge acknowledges.
//!
//! ```toml
//! [link]
//! listen = "0.0.0.0:7883"          # UDP (QUIC)
//! ca_file = "pki/ca.crt"           # edges' certificates must come from this CA
//! cert_file = "pki/nodes/cloud.example.com.crt"
//! key_file = "pki/nodes/cloud.example.com.key"
//! deny_file = "deny.txt"           # revoked edge ids or serials; re-read on SIGHUP
//! ```

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use ferry_bridge::cloud_listener::{Appended, Downlink, ServerConfig, Sink};
use ferry_bridge::quic::{Timeouts, TlsFiles};
use ferry_bridge::{BoxFuture, FailureKind, SinkError};
use ferry_protocol::kafka::batch::{records, uncompressed, BatchBuilder, BatchError};
use ferry_protocol::kafka::mqtt::read_headers;
use ferry_protocol::topic::TopicName;
use serde::Deserialize;

use crate::ingest::{EdgeRecord, Ingest, IngestError};
use crate::kafka::cluster::{ClusterView, LinkClaim, LINK_LEASE};
use crate::log::{LogError, Storage, READ_BUDGET_BYTES};
use crate::meta::{Command, Meta, MetaError};
use crate::routes::{DOWNLINK_PREFIX, DOWNLINK_STREAM};

/// The link's default port (UDP).
pub const DEFAULT_PORT: u16 = 7883;
/// The most a compressed batch from an edge may take once uncompressed.
const MAX_UNCOMPRESSED_BYTES: usize = 64 << 20;

/// `[link]`: where edges connect.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LinkConfig {
    /// UDP address of the QUIC listener. Default `0.0.0.0:7883`.
    pub listen: SocketAddr,
    /// The link CA's certificate (PEM): an edge's certificate must be issued by it.
    pub ca_file: PathBuf,
    /// This node's certificate and key (PEM), `ferry-cloud pki issue-node`.
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// Revoked edges: edge ids or certificate serial numbers (hex), one per line, `#`
    /// comments. Read at start and on SIGHUP; a denied edge's link is closed. Default none.
    pub deny_file: Option<PathBuf>,
    /// Bytes of record batches an edge may have unacknowledged. Default 16 MiB.
    pub credit_bytes: u64,
    /// The largest frame taken from an edge. Default 4 MiB.
    pub max_frame_bytes: u32,
    /// Seconds without traffic before a keepalive (default 10) and before a link is
    /// declared dead (default 30).
    pub keepalive_secs: u64,
    pub idle_timeout_secs: u64,
}

impl Default for LinkConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], DEFAULT_PORT)),
            ca_file: PathBuf::from("pki/ca.crt"),
            cert_file: PathBuf::new(),
            key_file: PathBuf::new(),
            deny_file: None,
            credit_bytes: 16 << 20,
            max_frame_bytes: 4 << 20,
            keepalive_secs: 10,
            idle_timeout_secs: 30,
        }
    }
}

impl LinkConfig {
    /// The server's settings.
    pub fn server_config(&self) -> ServerConfig {
        ServerConfig {
            listen: self.listen,
            tls: TlsFiles {
                ca_file: self.ca_file.clone(),
                cert_file: self.cert_file.clone(),
                key_file: self.key_file.clone(),
            },
            deny_file: self.deny_file.clone(),
            timeouts: Timeouts {
                keepalive: Duration::from_secs(self.keepalive_secs.max(1)),
                idle: Duration::from_secs(self.idle_timeout_secs.max(2)),
            },
            credit_bytes: self.credit_bytes.max(64 << 10),
            max_frame_bytes: self.max_frame_bytes.max(64 << 10) as usize,
        }
    }
}

/// The ingest path and the downlink stream as the link sees them.
#[derive(Debug)]
pub struct IngestSink {
    pub ingest: Arc<Ingest>,
    pub log: Arc<dyn Storage>,
    pub meta: Arc<Meta>,
    /// The cluster this node is part of: one link per edge in it ([`LinkClaim`]).
    pub cluster: Arc<ClusterView>,
}

/// The metadata cursor under which an edge's downlink position is kept (the next offset of
/// the downlink stream it has not acknowledged, which is also its acknowledged sequence).
fn downlink_cursor(edge: &str) -> String {
    format!("$edge:{edge}")
}

impl Sink for IngestSink {
    fn committed(&self, edge: &str) -> Vec<(u8, u64)> {
        self.ingest.committed_classes(edge)
    }

    /// On the object backend: the edge's link lease, and when this node has just taken it,
    /// what other nodes took of the edge meanwhile ([`Ingest::adopt`]); after an append of
    /// the edge failed here, what of it the store has (a commit whose answer was lost).
    fn claim(&self, edge: &str) -> BoxFuture<'static, Result<(), SinkError>> {
        if !self.cluster.is_clustered() {
            return Box::pin(async { Ok(()) });
        }
        let (cluster, ingest, edge) = (self.cluster.clone(), self.ingest.clone(), edge.to_owned());
        Box::pin(async move {
            let unavailable = |e: String| SinkError::new(FailureKind::Storage, e);
            tokio::task::spawn_blocking(move || match cluster.claim_link(&edge) {
                Ok(LinkClaim::Ours { taken }) => {
                    // Also when an append of it failed here: it may be in the log. Until a
                    // read succeeds, the next claim reads again.
                    if ingest.take_unsure(&edge) | taken {
                        if let Err(e) = ingest.adopt(&edge) {
                            ingest.mark_unsure(&edge);
                            return Err(unavailable(e.to_string()));
                        }
                    }
                    Ok(())
                }
                Ok(LinkClaim::Elsewhere(node)) => Err(SinkError::new(
                    FailureKind::Closed,
                    format!("its link is on node {node}"),
                )),
                Err(e) => Err(unavailable(e.to_string())),
            })
            .await
            .map_err(|e| unavailable(e.to_string()))?
        })
    }

    fn claim_every(&self) -> Option<Duration> {
        self.cluster.is_clustered().then_some(LINK_LEASE / 3)
    }

    fn release(&self, edge: &str) {
        if self.cluster.is_clustered() {
            let (cluster, edge) = (self.cluster.clone(), edge.to_owned());
            tokio::task::spawn_blocking(move || cluster.release_link(&edge));
        }
    }

    fn downlink_acked(&self, edge: &str) -> u64 {
        self.meta
            .cursor(&downlink_cursor(edge), DOWNLINK_STREAM, 0)
            .ok()
            .flatten()
            .map_or(0, |o| o.max(0) as u64)
    }

    fn downlink(
        &self,
        edge: String,
        after: u64,
    ) -> BoxFuture<'static, Result<Downlink, SinkError>> {
        let log = self.log.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || read_downlink(&*log, &edge, after))
                .await
                .map_err(unfinished)?
                .map_err(SinkError::from)
        })
    }

    fn downlink_changed(&self) -> tokio::sync::watch::Receiver<u64> {
        self.log.watch_commits()
    }

    fn downlink_ack(&self, edge: String, seq: u64) -> BoxFuture<'static, Result<(), SinkError>> {
        let meta = self.meta.clone();
        Box::pin(async move {
            let command = Command::CommitCursor {
                group: downlink_cursor(&edge),
                stream: DOWNLINK_STREAM.into(),
                partition: 0,
                offset: seq as i64,
            };
            tokio::task::spawn_blocking(move || meta.apply(&[command]))
                .await
                .map_err(unfinished)?
                .map_err(SinkError::from)
        })
    }

    /// On a cluster, under the edge's link lease ([`Ingest::append_fenced`]).
    fn ingest(&self, edge: String, class: u8, batches: Vec<Bytes>) -> BoxFuture<'static, Appended> {
        let ingest = self.ingest.clone();
        let fence = self.cluster.link_fence(&edge);
        let clustered = self.cluster.is_clustered();
        Box::pin(async move {
            if clustered && fence.is_none() {
                return Err(SinkError::new(
                    FailureKind::Closed,
                    format!("edge {edge}: this node does not hold its link's lease"),
                ));
            }
            let mut recs = Vec::new();
            for b in &batches {
                edge_records(b, &mut recs).map_err(|record| {
                    let edge = edge.clone();
                    SinkError::new(FailureKind::BadRecord, BadEdgeBatch { edge, record })
                })?;
            }
            let appended = ingest.append_fenced(&edge, class, recs, fence).await?;
            let commit: BoxFuture<'static, Result<u64, SinkError>> =
                Box::pin(async move { Ok(ingest.commit(appended).await?) });
            Ok(commit)
        })
    }
}

/// The downlink stream after sequence `after` (sequence = offset + 1), up to about 1 MiB:
/// `edge`'s messages, their keys stripped of `$edge/<edge>/`, as one batch.
fn read_downlink(log: &dyn Storage, edge: &str, after: u64) -> Result<Downlink, DownlinkError> {
    let none = Downlink {
        read_to: after,
        batch: None,
    };
    let Some(stream) = log
        .streams()
        .into_iter()
        .find(|s| s.name == DOWNLINK_STREAM)
    else {
        return Ok(none);
    };
    let Some(p) = stream.partitions.first() else {
        return Ok(none);
    };
    let offset = (after as i64).max(p.offsets.log_start);
    if offset >= p.offsets.high_watermark {
        return Ok(none);
    }
    let r = log.read(DOWNLINK_STREAM, 0, offset, READ_BUDGET_BYTES)?;
    let prefix = format!("{DOWNLINK_PREFIX}{edge}/");
    let mut read_to = after;
    let mut builder: Option<(u64, BatchBuilder)> = None;
    for batch in r.iter() {
        let (_, whole) = batch?;
        let plain = uncompressed(whole, MAX_UNCOMPRESSED_BYTES)?;
        for rec in records(&plain)? {
            let rec = rec?;
            let seq = rec.offset as u64 + 1;
            if seq <= after {
                continue;
            }
            read_to = seq;
            let Some(topic) = rec.key.and_then(|k| k.strip_prefix(prefix.as_bytes())) else {
                continue;
            };
            if topic.is_empty() {
                continue;
            }
            let (first, b) = builder.get_or_insert_with(|| (seq, BatchBuilder::new(rec.timestamp)));
            let Ok(delta) = i32::try_from(seq - *first) else {
                break;
            };
            let headers: Vec<_> = rec
                .headers
                .iter()
                .filter(|h| !h.key.starts_with("ferry."))
                .cloned()
                .collect();
            b.push_at(delta, rec.timestamp, Some(topic), rec.value, &headers);
        }
    }
    Ok(Downlink {
        read_to,
        batch: builder.map(|(first, b)| b.finish(first as i64)),
    })
}

/// The records of one batch from an edge: key = topic on the edge, value = payload, offset
/// = sequence number, headers = MQTT metadata (any `ferry.*` header is the cloud's own and
/// is ignored).
fn edge_records(batch: &[u8], out: &mut Vec<EdgeRecord>) -> Result<(), BadRecord> {
    let plain = uncompressed(batch, MAX_UNCOMPRESSED_BYTES)?;
    for r in records(&plain)? {
        let r = r?;
        let offset = r.offset;
        let key = r.key.ok_or(BadRecord::NoKey { offset })?;
        let topic = std::str::from_utf8(key)
            .ok()
            .and_then(|t| TopicName::new(t.to_owned()).ok())
            .ok_or(BadRecord::NotATopic { offset })?;
        let meta = read_headers(&r.headers).ok_or(BadRecord::BadHeaders { offset })?;
        out.push(EdgeRecord {
            seq: u64::try_from(offset).map_err(|_| BadRecord::NegativeSeq { offset })?,
            topic,
            payload: Bytes::copy_from_slice(r.value.unwrap_or_default()),
            qos: meta.qos,
            retain: meta.retain,
            properties: meta.properties,
            timestamp_ms: r.timestamp,
        });
    }
    Ok(())
}

/// A batch from an edge that is not a batch of MQTT records: the link refuses the whole
/// group it came in.
#[derive(Debug, thiserror::Error)]
#[error("edge {edge}: {record}")]
struct BadEdgeBatch {
    edge: String,
    record: BadRecord,
}

/// What is wrong with a batch from an edge, or with the record at `offset` in it (its
/// sequence number).
#[derive(Debug, thiserror::Error)]
enum BadRecord {
    #[error(transparent)]
    Batch(#[from] BatchError),
    #[error("a record without a key (topic) at offset {offset}")]
    NoKey { offset: i64 },
    #[error("a record whose key is not a topic name at offset {offset}")]
    NotATopic { offset: i64 },
    #[error("a record with malformed MQTT headers at offset {offset}")]
    BadHeaders { offset: i64 },
    #[error("a negative sequence number: {offset}")]
    NegativeSeq { offset: i64 },
}

/// Why the downlink stream could not be read.
#[derive(Debug, thiserror::Error)]
enum DownlinkError {
    #[error(transparent)]
    Log(#[from] LogError),
    /// A stored batch of the downlink stream that does not read.
    #[error("a downlink batch does not read: {0}")]
    Batch(#[from] BatchError),
}

impl From<DownlinkError> for SinkError {
    fn from(e: DownlinkError) -> Self {
        match e {
            DownlinkError::Log(e) => e.into(),
            DownlinkError::Batch(_) => SinkError::new(FailureKind::Storage, e),
        }
    }
}

/// What kind of failure a log error is to the link.
fn log_failure(e: &LogError) -> FailureKind {
    match e {
        LogError::Io { .. }
        | LogError::Corrupt { .. }
        | LogError::Failed(_)
        | LogError::Unavailable(_) => FailureKind::Storage,
        LogError::OffsetOutOfRange { .. }
        | LogError::UnknownStream(_)
        | LogError::UnknownPartition { .. }
        | LogError::BadStreamName(_) => FailureKind::Refused,
        LogError::BadBatch(_) | LogError::Sequence(_) => FailureKind::BadRecord,
        LogError::Closed | LogError::Fenced { .. } => FailureKind::Closed,
    }
}

impl From<LogError> for SinkError {
    fn from(e: LogError) -> Self {
        SinkError::new(log_failure(&e), e)
    }
}

/// The metadata's database failed: a storage failure.
impl From<MetaError> for SinkError {
    fn from(e: MetaError) -> Self {
        SinkError::new(FailureKind::Storage, e)
    }
}

impl From<IngestError> for SinkError {
    fn from(e: IngestError) -> Self {
        let kind = match &e {
            IngestError::Log(l) => log_failure(l),
            IngestError::Meta(_) => FailureKind::Storage,
            IngestError::BadTopic { .. } | IngestError::OutOfOrder { .. } => FailureKind::BadRecord,
        };
        SinkError::new(kind, e)
    }
}

/// A blocking task of the sink that panicked or was cancelled (the runtime is shutting
/// down).
fn unfinished(e: tokio::task::JoinError) -> SinkError {
    SinkError::new(FailureKind::Closed, e)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One batch of records from an edge, with base offset (first sequence) `first`.
    fn batch(first: i64, keys: &[Option<&[u8]>]) -> Bytes {
        let mut b = BatchBuilder::new(1_000);
        for key in keys {
            b.push(1_000, *key, Some(b"21.5"), &[]);
        }
        b.finish(first)
    }

    #[test]
    fn an_edge_batch_reads_as_records_numbered_by_offset() {
        let mut out = Vec::new();
        edge_records(
            &batch(7, &[Some(b"sensors/t1"), Some(b"sensors/t2")]),
            &mut out,
        )
        .expect("reads");
        let got: Vec<_> = out.iter().map(|r| (r.seq, r.topic.as_str())).collect();
        assert_eq!(got, [(7, "sensors/t1"), (8, "sensors/t2")]);
    }

    #[test]
    fn a_record_the_cloud_cannot_take_is_a_bad_record_with_its_offset() {
        let no_key = edge_records(&batch(5, &[Some(b"a/b"), None]), &mut Vec::new());
        assert!(matches!(no_key, Err(BadRecord::NoKey { offset: 6 })));
        let wildcard = edge_records(&batch(5, &[Some(b"a/+/b")]), &mut Vec::new());
        assert!(matches!(wildcard, Err(BadRecord::NotATopic { offset: 5 })));
        let negative = edge_records(&batch(-2, &[Some(b"a/b")]), &mut Vec::new());
        assert!(matches!(
            negative,
            Err(BadRecord::NegativeSeq { offset: -2 })
        ));
        let whole = batch(5, &[Some(b"a/b")]);
        let cut = edge_records(&whole[..whole.len() - 1], &mut Vec::new());
        assert!(matches!(cut, Err(BadRecord::Batch(_))));

        let e = SinkError::new(
            FailureKind::BadRecord,
            BadEdgeBatch {
                edge: "gw-1".into(),
                record: BadRecord::NoKey { offset: 6 },
            },
        );
        assert_eq!(
            e.to_string(),
            "bad record: edge gw-1: a record without a key (topic) at offset 6"
        );
    }

    #[test]
    fn the_sink_says_which_kind_of_failure_an_ingest_error_is() {
        let kind = |e: IngestError| SinkError::from(e).kind();
        let out_of_order = IngestError::OutOfOrder {
            edge: "gw-1".into(),
            seq: 3,
            previous: 9,
        };
        assert_eq!(kind(out_of_order), FailureKind::BadRecord);
        assert_eq!(kind(LogError::Closed.into()), FailureKind::Closed);
        assert_eq!(
            kind(LogError::Failed("disk full".into()).into()),
            FailureKind::Storage
        );
        assert_eq!(
            kind(MetaError::Corrupt("edges".into()).into()),
            FailureKind::Storage
        );
        assert_eq!(
            SinkError::from(LogError::UnknownStream("mqtt".into())).kind(),
            FailureKind::Refused
        );
        let corrupt = DownlinkError::Batch(BatchError::Compressed(7));
        assert_eq!(SinkError::from(corrupt).kind(), FailureKind::Storage);
    }
}
