//! The cloud's end of the link (`ferry_bridge::server`) wired to the ingest path: `[link]`
//! in the configuration, and the [`Sink`] that turns an edge's record batches into
//! [`EdgeRecord`]s for [`Ingest`].
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
use ferry_bridge::quic::{Timeouts, TlsFiles};
use ferry_bridge::server::{Appended, BoxFuture, ServerConfig, Sink};
use ferry_protocol::kafka::batch::{records, uncompressed};
use ferry_protocol::kafka::mqtt::read_headers;
use ferry_protocol::topic::TopicName;
use serde::Deserialize;

use crate::ingest::{EdgeRecord, Ingest};

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

/// The ingest path as the link's server sees it.
#[derive(Debug)]
pub struct IngestSink(pub Arc<Ingest>);

impl Sink for IngestSink {
    fn committed(&self, edge: &str) -> Vec<(u8, u64)> {
        self.0.committed_classes(edge)
    }

    fn ingest(&self, edge: String, class: u8, batches: Vec<Bytes>) -> BoxFuture<'static, Appended> {
        let ingest = self.0.clone();
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
