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
use ferry_bridge::BoxFuture;
use ferry_protocol::kafka::batch::{records, uncompressed, BatchBuilder};
use ferry_protocol::kafka::mqtt::read_headers;
use ferry_protocol::topic::TopicName;
use serde::Deserialize;

use crate::ingest::{EdgeRecord, Ingest};
use crate::log::{Storage, READ_BUDGET_BYTES};
use crate::meta::{Command, Meta};
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

    fn downlink_acked(&self, edge: &str) -> u64 {
        self.meta
            .cursor(&downlink_cursor(edge), DOWNLINK_STREAM, 0)
            .ok()
            .flatten()
            .map_or(0, |o| o.max(0) as u64)
    }

    fn downlink(&self, edge: String, after: u64) -> BoxFuture<'static, Result<Downlink, String>> {
        let log = self.log.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || read_downlink(&*log, &edge, after))
                .await
                .map_err(|e| e.to_string())?
        })
    }

    fn downlink_changed(&self) -> tokio::sync::watch::Receiver<u64> {
        self.log.watch_commits()
    }

    fn downlink_ack(&self, edge: String, seq: u64) -> BoxFuture<'static, Result<(), String>> {
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
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())
        })
    }

    fn ingest(&self, edge: String, class: u8, batches: Vec<Bytes>) -> BoxFuture<'static, Appended> {
        let ingest = self.ingest.clone();
        Box::pin(async move {
            let mut recs = Vec::new();
            for b in &batches {
                edge_records(b, &mut recs).map_err(|e| format!("edge {edge}: {e}"))?;
            }
            let appended = ingest
                .append(&edge, class, recs)
                .await
                .map_err(|e| e.to_string())?;
            let commit: BoxFuture<'static, Result<u64, String>> =
                Box::pin(async move { ingest.commit(appended).await.map_err(|e| e.to_string()) });
            Ok(commit)
        })
    }
}

/// The downlink stream after sequence `after` (sequence = offset + 1), up to about 1 MiB:
/// `edge`'s messages, their keys stripped of `$edge/<edge>/`, as one batch.
fn read_downlink(log: &dyn Storage, edge: &str, after: u64) -> Result<Downlink, String> {
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
    let r = log
        .read(DOWNLINK_STREAM, 0, offset, READ_BUDGET_BYTES)
        .map_err(|e| e.to_string())?;
    let prefix = format!("{DOWNLINK_PREFIX}{edge}/");
    let mut read_to = after;
    let mut builder: Option<(u64, BatchBuilder)> = None;
    for batch in r.iter() {
        let (_, whole) = batch.map_err(|e| e.to_string())?;
        let plain = uncompressed(whole, MAX_UNCOMPRESSED_BYTES).map_err(|e| e.to_string())?;
        for rec in records(&plain).map_err(|e| e.to_string())? {
            let rec = rec.map_err(|e| e.to_string())?;
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
fn edge_records(batch: &[u8], out: &mut Vec<EdgeRecord>) -> Result<(), String> {
    let plain = uncompressed(batch, MAX_UNCOMPRESSED_BYTES).map_err(|e| e.to_string())?;
    for r in records(&plain).map_err(|e| e.to_string())? {
        let r = r.map_err(|e| e.to_string())?;
        let key = r.key.ok_or("a record without a key (topic)")?;
        let topic = std::str::from_utf8(key)
            .ok()
            .and_then(|t| TopicName::new(t.to_owned()).ok())
            .ok_or("a record whose key is not a topic name")?;
        let meta = read_headers(&r.headers).ok_or("a record with malformed MQTT headers")?;
        out.push(EdgeRecord {
            seq: u64::try_from(r.offset).map_err(|_| "a negative sequence number")?,
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
