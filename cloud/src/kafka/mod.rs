//! The Kafka front: the Kafka wire protocol over the node's log, so that Kafka consumers
//! (librdkafka, kcat, the Java client) read what MQTT clients and edges wrote, and Kafka
//! producers write into the same log. Requests and responses are coded by the
//! `kafka-protocol` crate; record batches pass through as the bytes the log stores.
//!
//! A stream is a Kafka topic, its partitions Kafka's partitions, on one broker (node id 0).
//! Records that came from MQTT carry key = MQTT topic, value = payload, headers = the MQTT
//! metadata (`docs/routes.md`). The other way, every stream is read back to MQTT: a record
//! a Kafka client produced whose key is an MQTT topic name (UTF-8, no wildcards) reaches the
//! cloud's MQTT subscribers of that topic (QoS 1 unless an `mqtt.qos` header says
//! otherwise); other records are for Kafka consumers only. A record produced to the stream
//! `downlink` with key `$edge/<edge-id>/<topic>` goes down the link to that edge.
//!
//! | API | versions | what it does |
//! |---|---|---|
//! | ApiVersions | 0–3 | the list below; an unknown version gets the v0 answer with UNSUPPORTED_VERSION (KIP-511) |
//! | Metadata | 0–12 | this broker, every stream (or those asked for); with `auto_create_topics`, a missing topic asked for is created (`[log.streams]` settings and partition count) |
//! | Produce | 3–9 | whole v2 batches, CRC checked, offsets assigned by the log; acks 0, 1 and -1 (all = this node: the append is durable before the answer); a request's partitions appended at once; requests without idempotent batches pipelined (up to 8 per connection (`PIPELINE`) wait for their commit, answers in order) |
//! | Fetch | 4–12 | the stored batches as they are, from the one holding the offset asked for; max_wait_ms, min_bytes, max_bytes and partition_max_bytes honoured |
//! | ListOffsets | 1–7 | earliest (-2), latest (-1), or the first offset at or after a timestamp |
//! | InitProducerId | 0–4 | a producer id for an idempotent producer (the Java client's default); transactions are refused |
//!
//! Idempotent producers: per producer id and partition the epoch and the sequence numbers
//! of the last five batches are kept ([`crate::log::sequence`]). A batch resent after a
//! lost answer (same sequence) is not appended again: the answer is the first append's
//! offset. A gap in the sequence gets OUT_OF_ORDER_SEQUENCE_NUMBER, an old epoch
//! INVALID_PRODUCER_EPOCH. On the local log the front keeps this state; the log keeps
//! batches as producers sent them, producer id, epoch and sequence included, so at start
//! the state is rebuilt from the last [`PRODUCER_SCAN_OFFSETS`] offsets of every partition
//! ([`producers_from_log`]): a batch resent across a restart of the node is still found
//! (limit: a producer whose last batch lies further back starts over), and a resend on a
//! new connection while the same producer's append to that partition is still waiting is
//! refused with REQUEST_TIMED_OUT (retriable) until that append is answered. The object
//! log checks each batch itself, in the PostgreSQL transaction that commits it
//! ([`Storage::checks_producers`]), so a producer moving between cluster nodes, or resending
//! to another node while its first copy still waits for the store, is appended exactly
//! once; the chaos test (`tests/tests/cluster_chaos.rs`) checks it. Producer ids are unique
//! across restarts (time-based).
//!
//! | FindCoordinator | 0–4 | this node, for every group |
//! | JoinGroup, SyncGroup, Heartbeat, LeaveGroup | 0–9, 0–5, 0–4, 0–5 | consumer groups ([`groups`]): rebalance on join, leave and session timeout, generations fenced |
//! | OffsetCommit, OffsetFetch | 2–8, 1–8 | committed offsets, durable in the metadata (v8: several groups per request) |
//! | DescribeGroups, ListGroups | 0–5, 0–4 | the groups, their state and members |
//! | CreateTopics, DeleteTopics, DescribeConfigs | 2–7, 1–6, 1–4 | streams made, deleted and described with Kafka's topic settings ([`topics`]; a stream MQTT routes write to is not deleted) |
//!
//! A request for an API or version not
//! listed is answered with UNSUPPORTED_VERSION where the protocol allows, else the
//! connection is closed; a frame over `max_request_bytes`, a truncated or undecodable one
//! closes the connection. Nothing a client sends panics the node.

pub mod cluster;
mod group_requests;
pub mod groups;
mod topics;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use kafka_protocol::messages::api_versions_response::ApiVersion;
use kafka_protocol::messages::fetch_response::{FetchableTopicResponse, PartitionData};
use kafka_protocol::messages::list_offsets_response::{
    ListOffsetsPartitionResponse, ListOffsetsTopicResponse,
};
use kafka_protocol::messages::metadata_response::{
    MetadataResponseBroker, MetadataResponsePartition, MetadataResponseTopic,
};
use kafka_protocol::messages::produce_response::{PartitionProduceResponse, TopicProduceResponse};
use kafka_protocol::messages::{
    ApiKey, ApiVersionsResponse, BrokerId, FetchRequest, FetchResponse, InitProducerIdResponse,
    ListOffsetsRequest, ListOffsetsResponse, MetadataRequest, MetadataResponse, ProduceRequest,
    ProduceResponse, ProducerId, RequestHeader, RequestKind, ResponseHeader, ResponseKind,
    TopicName,
};
use kafka_protocol::protocol::{Decodable, Encodable, StrBytes};
use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, info, warn};

use ferry_protocol::kafka::{records, uncompressed};

use crate::log::sequence::{ProducerState, Sequence, SequenceError};
use crate::log::{AppendData, LogError, Storage, StreamConfig, READ_BUDGET_BYTES};
use crate::meta::{Command, Meta};

/// `[kafka]`: the Kafka listener. Off unless the section is present.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KafkaConfig {
    /// Where Kafka clients connect. Default `127.0.0.1:9092`.
    pub listen: SocketAddr,
    /// `host:port` clients are told to connect to (Metadata). Default: `listen`, with
    /// `localhost` for an unspecified address.
    pub advertised: Option<String>,
    /// The largest request taken; a larger one closes the connection. Default 100 MiB.
    pub max_request_bytes: usize,
    /// Create a topic (with the `[log.streams]` settings, its partition count included) when
    /// a client asks for a missing one in Metadata or produces to it. Default true.
    pub auto_create_topics: bool,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 9092)),
            advertised: None,
            max_request_bytes: 100 << 20,
            auto_create_topics: true,
        }
    }
}

/// The most a compressed batch may take once uncompressed, to be searched by time.
const MAX_UNCOMPRESSED_BYTES: usize = 64 << 20;

/// Kafka error codes used by the front, by name; the numbers come from kafka-protocol's table.
mod code {
    use kafka_protocol::ResponseError as E;

    pub(super) const NONE: i16 = 0;
    pub(super) const OFFSET_OUT_OF_RANGE: i16 = E::OffsetOutOfRange.code();
    pub(super) const CORRUPT_MESSAGE: i16 = E::CorruptMessage.code();
    pub(super) const UNKNOWN_TOPIC_OR_PARTITION: i16 = E::UnknownTopicOrPartition.code();
    pub(super) const COORDINATOR_NOT_AVAILABLE: i16 = E::CoordinatorNotAvailable.code();
    pub(super) const INVALID_TOPIC_EXCEPTION: i16 = E::InvalidTopicException.code();
    pub(super) const ILLEGAL_GENERATION: i16 = E::IllegalGeneration.code();
    pub(super) const INCONSISTENT_GROUP_PROTOCOL: i16 = E::InconsistentGroupProtocol.code();
    pub(super) const UNKNOWN_MEMBER_ID: i16 = E::UnknownMemberId.code();
    pub(super) const REBALANCE_IN_PROGRESS: i16 = E::RebalanceInProgress.code();
    pub(super) const UNSUPPORTED_VERSION: i16 = E::UnsupportedVersion.code();
    pub(super) const TOPIC_ALREADY_EXISTS: i16 = E::TopicAlreadyExists.code();
    pub(super) const INVALID_PARTITIONS: i16 = E::InvalidPartitions.code();
    pub(super) const INVALID_REPLICATION_FACTOR: i16 = E::InvalidReplicationFactor.code();
    pub(super) const INVALID_CONFIG: i16 = E::InvalidConfig.code();
    pub(super) const POLICY_VIOLATION: i16 = E::PolicyViolation.code();
    pub(super) const OUT_OF_ORDER_SEQUENCE_NUMBER: i16 = E::OutOfOrderSequenceNumber.code();
    pub(super) const INVALID_PRODUCER_EPOCH: i16 = E::InvalidProducerEpoch.code();
    pub(super) const TRANSACTIONAL_ID_AUTHORIZATION_FAILED: i16 =
        E::TransactionalIdAuthorizationFailed.code();
    pub(super) const KAFKA_STORAGE_ERROR: i16 = E::KafkaStorageError.code();
    pub(super) const REQUEST_TIMED_OUT: i16 = E::RequestTimedOut.code();
    pub(super) const MEMBER_ID_REQUIRED: i16 = E::MemberIdRequired.code();
    pub(super) const UNKNOWN_TOPIC_ID: i16 = E::UnknownTopicId.code();
    pub(super) const NOT_COORDINATOR: i16 = E::NotCoordinator.code();
}

/// The APIs served and their version ranges (what ApiVersions advertises).
const SUPPORTED: &[(ApiKey, i16, i16)] = &[
    (ApiKey::Produce, 3, 9),
    (ApiKey::Fetch, 4, 12),
    (ApiKey::ListOffsets, 1, 7),
    (ApiKey::Metadata, 0, 12),
    (ApiKey::ApiVersions, 0, 3),
    (ApiKey::InitProducerId, 0, 4),
    (ApiKey::FindCoordinator, 0, 4),
    (ApiKey::JoinGroup, 0, 9),
    (ApiKey::SyncGroup, 0, 5),
    (ApiKey::Heartbeat, 0, 4),
    (ApiKey::LeaveGroup, 0, 5),
    (ApiKey::OffsetCommit, 2, 8),
    (ApiKey::OffsetFetch, 1, 8),
    (ApiKey::DescribeGroups, 0, 5),
    (ApiKey::ListGroups, 0, 4),
    (ApiKey::CreateTopics, 2, 7),
    (ApiKey::DeleteTopics, 1, 6),
    (ApiKey::DescribeConfigs, 1, 4),
];

/// Why the front closed a client's connection (logged; the client sees the close).
#[derive(Debug, thiserror::Error)]
pub enum ConnectionError {
    #[error("negative frame size {0}")]
    NegativeSize(i32),
    #[error("request of {len} bytes over max_request_bytes ({max})")]
    TooLarge { len: usize, max: usize },
    #[error("truncated request: {0}")]
    Truncated(#[source] std::io::Error),
    #[error("write: {0}")]
    Write(#[source] std::io::Error),
    #[error("request shorter than its header")]
    Short,
    #[error("unknown API key {0}")]
    UnknownApi(i16),
    #[error("{api:?} version {version} is not served")]
    NotServed { api: ApiKey, version: i16 },
    /// The request did not decode (kafka-protocol's message).
    #[error("bad {what}: {why}")]
    Malformed { what: String, why: String },
    /// A response did not encode: a bug, the connection cannot go on in order.
    #[error("encode {what}: {why}")]
    Encode { what: &'static str, why: String },
}

/// What the front needs of the node.
#[derive(Debug, Clone)]
pub struct KafkaFront {
    pub log: Arc<dyn Storage>,
    pub meta: Arc<Meta>,
    pub config: KafkaConfig,
    /// Settings of topics it creates.
    pub stream_defaults: StreamConfig,
    /// Idempotent producers' state, per (producer id, stream, partition).
    pub producers: Arc<std::sync::Mutex<Producers>>,
    /// Consumer groups.
    pub groups: Arc<groups::Groups>,
    /// The MQTT routes in force: the streams they write to are not deleted.
    pub routes: Arc<crate::routes::RouteTable>,
    /// The other nodes, when this one is in a cluster ([`cluster`]).
    pub cluster: Arc<cluster::ClusterView>,
}

/// Idempotent producers' recent batches, per (producer id, stream, partition), kept by the
/// front over a log that does not check them itself ([`Storage::checks_producers`]).
#[derive(Debug, Default)]
pub struct Producers {
    batches: std::collections::HashMap<(i64, String, u32), ProducerState>,
    /// (producer id, stream, partition) with a batch being appended: another batch of the
    /// same producer and partition (a resend on a new connection while the first still
    /// waits for the log) is refused, retriable, until that append is answered.
    appending: std::collections::HashSet<(i64, String, u32)>,
}

impl Producers {
    /// How many (producer, partition) states are kept.
    pub fn len(&self) -> usize {
        self.batches.len()
    }

    /// True when no producer's batch is known.
    pub fn is_empty(&self) -> bool {
        self.batches.is_empty()
    }

    /// Forgets a deleted stream's producers.
    pub fn forget_stream(&mut self, name: &str) {
        self.batches.retain(|(_, stream, _), _| stream != name);
    }

    /// A batch appended at `offset`, found in the log or appended here.
    fn fold(&mut self, key: (i64, String, u32), epoch: i16, first: i32, last: i32, offset: i64) {
        self.batches
            .entry(key)
            .or_default()
            .appended(epoch, first, last, offset);
    }
}

/// Offsets at the end of each partition read at start for idempotent producers' last
/// batches: a producer retries only the few batches it had in flight, which are there.
pub const PRODUCER_SCAN_OFFSETS: i64 = 50_000;

/// Idempotent producers' state rebuilt from the last [`PRODUCER_SCAN_OFFSETS`] offsets of
/// every partition of `log` (Kafka rebuilds it from its log too); nothing for a log that
/// checks them itself. Blocking file IO.
pub fn producers_from_log(log: &dyn Storage) -> Producers {
    let mut producers = Producers::default();
    if log.checks_producers() {
        return producers;
    }
    for stream in log.streams() {
        for (p, info) in stream.partitions.iter().enumerate() {
            let p = p as u32;
            let from =
                (info.offsets.high_watermark - PRODUCER_SCAN_OFFSETS).max(info.offsets.log_start);
            match producer_batches(log, &stream.name, p, from) {
                Ok(found) => {
                    for (key, epoch, first, last, offset) in found {
                        producers.fold(key, epoch, first, last, offset);
                    }
                }
                Err(e) => {
                    warn!(stream = %stream.name, partition = p, error = %e, "cannot read idempotent producers back");
                }
            }
        }
    }
    producers
}

/// A producer's batch as the log holds it: (key, epoch, first and last sequence, offset).
type FoundBatch = ((i64, String, u32), i16, i32, i32, i64);

/// The idempotent producers' batches of a partition from `from` to its end. Blocking IO.
fn producer_batches(
    log: &dyn Storage,
    stream: &str,
    partition: u32,
    from: i64,
) -> Result<Vec<FoundBatch>, LogError> {
    let mut found = Vec::new();
    crate::log::for_each_batch(log, stream, partition, from, |h, _| {
        if h.producer_id < 0 {
            return;
        }
        let last = h.base_sequence.wrapping_add(h.records_count.max(1) - 1);
        found.push((
            (h.producer_id, stream.to_owned(), partition),
            h.producer_epoch,
            h.base_sequence,
            last,
            h.base_offset,
        ));
    })?;
    Ok(found)
}

impl KafkaFront {
    /// Binds the listener and serves in the background; returns the bound address.
    pub async fn serve(self) -> std::io::Result<SocketAddr> {
        let listener = TcpListener::bind(self.config.listen).await?;
        let addr = listener.local_addr()?;
        info!(%addr, "listening for Kafka clients");
        let groups = Arc::downgrade(&self.groups);
        tokio::spawn(async move {
            // Sessions that ran out, and rebalances whose time is up.
            let mut tick = tokio::time::interval(Duration::from_millis(250));
            loop {
                tick.tick().await;
                let Some(groups) = groups.upgrade() else {
                    return;
                };
                groups.expire(std::time::Instant::now());
            }
        });
        let front = Arc::new(KafkaFront {
            config: KafkaConfig {
                listen: addr,
                ..self.config.clone()
            },
            ..self
        });
        tokio::spawn(async move {
            loop {
                let (stream, peer) = match listener.accept().await {
                    Ok(x) => x,
                    Err(e) => {
                        warn!(error = %e, "Kafka accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let front = front.clone();
                tokio::spawn(async move {
                    if let Err(why) = front.connection(stream).await {
                        debug!(%peer, %why, "Kafka connection closed");
                    }
                });
            }
        });
        Ok(addr)
    }

    /// One client: requests in, responses out, in order. Produce requests without
    /// idempotent batches are pipelined (see [`PIPELINE`]): the next requests are read and
    /// their appends queued while earlier ones wait for their commit. Every other request
    /// waits until those before it are answered, then is answered alone.
    async fn connection(&self, stream: TcpStream) -> Result<(), ConnectionError> {
        use futures_util::stream::{FuturesOrdered, StreamExt};
        use std::future::Future;
        let _ = stream.set_nodelay(true);
        let (mut rd, mut wr) = stream.into_split();
        let mut buf = BytesMut::with_capacity(64 << 10);
        let mut in_flight = FuturesOrdered::new();
        let mut eof = false;
        loop {
            while in_flight.len() < PIPELINE {
                let Some(frame) = self.take_frame(&mut buf)? else {
                    break;
                };
                let decoded = decode(frame)?;
                if decoded.pipelined() && self.topics_exist(&decoded) {
                    let mut answer = Box::pin(self.respond(decoded));
                    // Polled once now: its appends are queued behind those of the requests
                    // before it (the log keeps the order appends are first polled in).
                    let first =
                        std::future::poll_fn(|cx| std::task::Poll::Ready(answer.as_mut().poll(cx)))
                            .await;
                    in_flight.push_back(match first {
                        std::task::Poll::Ready(r) => {
                            futures_util::future::Either::Left(std::future::ready(r))
                        }
                        std::task::Poll::Pending => futures_util::future::Either::Right(answer),
                    });
                } else {
                    while let Some(answer) = in_flight.next().await {
                        write_answer(&mut wr, answer?).await?;
                    }
                    write_answer(&mut wr, self.respond(decoded).await?).await?;
                }
            }
            if eof {
                while let Some(answer) = in_flight.next().await {
                    write_answer(&mut wr, answer?).await?;
                }
                let _ = wr.shutdown().await;
                return Ok(());
            }
            tokio::select! {
                biased;
                Some(answer) = in_flight.next(), if !in_flight.is_empty() => {
                    write_answer(&mut wr, answer?).await?;
                }
                read = rd.read_buf(&mut buf), if in_flight.len() < PIPELINE => {
                    match read {
                        Ok(0) if buf.is_empty() => eof = true,
                        Ok(0) => {
                            return Err(ConnectionError::Truncated(
                                std::io::ErrorKind::UnexpectedEof.into(),
                            ))
                        }
                        Ok(_) => {}
                        Err(e) if in_flight.is_empty() && buf.is_empty() => {
                            debug!(error = %e, "Kafka connection read failed");
                            return Ok(());
                        }
                        Err(e) => return Err(ConnectionError::Truncated(e)),
                    }
                }
            }
        }
    }

    /// The next whole request frame in `buf` (without its size), if it is all there; room
    /// is made for the rest of one that is not.
    fn take_frame(&self, buf: &mut BytesMut) -> Result<Option<Bytes>, ConnectionError> {
        let Some(size) = buf.get(..4) else {
            return Ok(None);
        };
        let len = i32::from_be_bytes(size.try_into().expect("4 bytes"));
        let len = usize::try_from(len).map_err(|_| ConnectionError::NegativeSize(len))?;
        if len > self.config.max_request_bytes {
            return Err(ConnectionError::TooLarge {
                len,
                max: self.config.max_request_bytes,
            });
        }
        if buf.len() < 4 + len {
            buf.reserve(4 + len - buf.len());
            return Ok(None);
        }
        let mut frame = buf.split_to(4 + len);
        let _ = frame.split_to(4);
        Ok(Some(frame.freeze()))
    }

    /// The response frame to a decoded request; None when it takes none (acks=0).
    async fn respond(&self, decoded: Decoded) -> Result<Option<BytesMut>, ConnectionError> {
        let (api, version, header, request) = match decoded {
            Decoded::Answer(out) => return Ok(Some(out)),
            Decoded::Request {
                api,
                version,
                header,
                request,
            } => (api, version, header, request),
        };
        // In a cluster, a group request first takes or renews the group's lease here (see
        // [`cluster`]); the handlers then answer NOT_COORDINATOR if another node holds it.
        let group = match &*request {
            RequestKind::JoinGroup(r) => Some(r.group_id.as_str()),
            RequestKind::SyncGroup(r) => Some(r.group_id.as_str()),
            RequestKind::Heartbeat(r) => Some(r.group_id.as_str()),
            RequestKind::LeaveGroup(r) => Some(r.group_id.as_str()),
            RequestKind::OffsetCommit(r) => Some(r.group_id.as_str()),
            _ => None,
        };
        if let Some(group) = group.filter(|_| self.cluster.brokers().is_some()) {
            let group = group.to_owned();
            self.off_runtime(move |f| f.cluster.ensure(&group)).await;
        }
        let response = match *request {
            RequestKind::ApiVersions(_) => ResponseKind::ApiVersions(api_versions(code::NONE)),
            RequestKind::Metadata(r) => {
                ResponseKind::Metadata(self.off_runtime(move |f| f.metadata(r)).await)
            }
            RequestKind::FindCoordinator(r) => ResponseKind::FindCoordinator(
                self.off_runtime(move |f| f.find_coordinator(r, version))
                    .await,
            ),
            RequestKind::JoinGroup(r) => {
                let client = header.client_id.as_ref().map_or("", |c| c.as_str());
                ResponseKind::JoinGroup(self.join_group(r, version, client).await)
            }
            RequestKind::SyncGroup(r) => ResponseKind::SyncGroup(self.sync_group(r).await),
            RequestKind::Heartbeat(r) => ResponseKind::Heartbeat(self.heartbeat(r)),
            RequestKind::LeaveGroup(r) => ResponseKind::LeaveGroup(self.leave_group(r, version)),
            RequestKind::OffsetCommit(r) => ResponseKind::OffsetCommit(self.offset_commit(r).await),
            RequestKind::OffsetFetch(r) => ResponseKind::OffsetFetch(
                self.off_runtime(move |f| f.offset_fetch(r, version)).await,
            ),
            RequestKind::DescribeGroups(r) => ResponseKind::DescribeGroups(self.describe_groups(r)),
            RequestKind::ListGroups(_) => ResponseKind::ListGroups(self.list_groups()),
            RequestKind::CreateTopics(r) => {
                ResponseKind::CreateTopics(self.off_runtime(move |f| f.create_topics(r)).await)
            }
            RequestKind::DeleteTopics(r) => {
                ResponseKind::DeleteTopics(self.off_runtime(move |f| f.delete_topics(r)).await)
            }
            RequestKind::DescribeConfigs(r) => {
                ResponseKind::DescribeConfigs(self.describe_configs(r))
            }
            RequestKind::InitProducerId(r) => {
                let mut response = InitProducerIdResponse::default();
                if r.transactional_id.is_some() {
                    // Transactions are not served.
                    response.error_code = code::TRANSACTIONAL_ID_AUTHORIZATION_FAILED;
                    response.producer_id = ProducerId(-1);
                    response.producer_epoch = -1;
                } else {
                    response.producer_id = ProducerId(new_producer_id());
                    response.producer_epoch = 0;
                }
                ResponseKind::InitProducerId(response)
            }
            RequestKind::ListOffsets(r) => ResponseKind::ListOffsets(self.list_offsets(r).await),
            RequestKind::Fetch(r) => ResponseKind::Fetch(self.fetch(r).await),
            RequestKind::Produce(r) => {
                let acks = r.acks;
                let response = self.produce(r).await;
                if acks == 0 {
                    return Ok(None);
                }
                ResponseKind::Produce(response)
            }
            _ => return Err(ConnectionError::NotServed { api, version }),
        };
        // ApiVersions answers with header v0 whatever its version (KIP-511).
        let header_version = if api == ApiKey::ApiVersions {
            0
        } else {
            api.response_header_version(version)
        };
        let mut out = BytesMut::new();
        write_response(
            &mut out,
            header.correlation_id,
            header_version,
            &response,
            version,
        )?;
        Ok(Some(out))
    }

    fn advertised(&self) -> (String, i32) {
        if let Some(a) = &self.config.advertised {
            if let Some((host, port)) = a.rsplit_once(':') {
                if let Ok(port) = port.parse() {
                    return (host.to_owned(), port);
                }
            }
        }
        let l = self.config.listen;
        let host = if l.ip().is_unspecified() {
            "localhost".to_owned()
        } else {
            l.ip().to_string()
        };
        (host, i32::from(l.port()))
    }

    /// Runs `f`, whose work blocks (streams and metadata: on the object backend they wait
    /// for PostgreSQL), on the blocking pool rather than a runtime worker.
    async fn off_runtime<T: Default + Send + 'static>(
        &self,
        f: impl FnOnce(&KafkaFront) -> T + Send + 'static,
    ) -> T {
        let front = self.clone();
        tokio::task::spawn_blocking(move || f(&front))
            .await
            .unwrap_or_default()
    }

    /// True when every topic `decoded` (a Produce request) writes to exists, so that its
    /// appends are all queued by its first poll.
    fn topics_exist(&self, decoded: &Decoded) -> bool {
        let Decoded::Request { request, .. } = decoded else {
            return true;
        };
        let RequestKind::Produce(r) = &**request else {
            return true;
        };
        r.topic_data
            .iter()
            .all(|t| self.has_topic(t.name.0.as_str()))
    }

    /// True if the stream `name` exists: a lookup of its first partition, not a listing of
    /// every stream (this runs for every Produce request).
    fn has_topic(&self, name: &str) -> bool {
        self.log.offsets(name, 0).is_ok()
    }

    /// Creates `name` (the `[log.streams]` settings and partition count, as Kafka's
    /// `num.partitions`) if topics may be created and the name is valid.
    fn create_topic(&self, name: &str) -> bool {
        if !self.config.auto_create_topics || !crate::log::valid_stream_name(name) {
            return false;
        }
        let config = StreamConfig {
            partitions: self.stream_defaults.partitions.max(1),
            ..self.stream_defaults.clone()
        };
        let created = self
            .meta
            .apply(&[Command::CreateStream {
                name: name.to_owned(),
                config: config.clone(),
            }])
            .is_ok()
            && self.log.create_stream(name, &config).is_ok();
        if created {
            info!(topic = name, "Kafka: topic created");
        }
        created
    }

    fn metadata(&self, r: MetadataRequest) -> MetadataResponse {
        let (host, port) = self.advertised();
        let mut streams = self.log.streams();
        let wanted: Option<Vec<String>> = r.topics.map(|ts| {
            ts.into_iter()
                .filter_map(|t| t.name.map(|n| n.0.as_str().to_owned()))
                .collect()
        });
        if let Some(names) = &wanted {
            if r.allow_auto_topic_creation
                && names
                    .iter()
                    .any(|n| !streams.iter().any(|s| &s.name == n) && self.create_topic(n))
            {
                streams = self.log.streams();
            }
        }
        let topic = |name: &str, error_code: i16, partitions: usize| {
            MetadataResponseTopic::default()
                .with_error_code(error_code)
                .with_name(Some(TopicName(StrBytes::from_string(name.to_owned()))))
                .with_partitions(
                    (0..partitions as i32)
                        .map(|p| {
                            let leader = self
                                .cluster
                                .leader(name, p as u32)
                                .map_or(BrokerId(0), |b| BrokerId(b.id));
                            MetadataResponsePartition::default()
                                .with_partition_index(p)
                                .with_leader_id(leader)
                                .with_replica_nodes(vec![leader])
                                .with_isr_nodes(vec![leader])
                        })
                        .collect(),
                )
        };
        let topics = match wanted {
            None => streams
                .iter()
                .map(|s| topic(&s.name, code::NONE, s.partitions.len()))
                .collect(),
            Some(names) => names
                .iter()
                .map(|n| match streams.iter().find(|s| &s.name == n) {
                    Some(s) => topic(n, code::NONE, s.partitions.len()),
                    None if !crate::log::valid_stream_name(n) => {
                        topic(n, code::INVALID_TOPIC_EXCEPTION, 0)
                    }
                    None => topic(n, code::UNKNOWN_TOPIC_OR_PARTITION, 0),
                })
                .collect(),
        };
        // Alone, this node is broker 0; in a cluster every live node is a broker.
        let brokers = self.cluster.brokers().map_or_else(
            || vec![(0, host, port)],
            |bs| bs.into_iter().map(|b| (b.id, b.host, b.port)).collect(),
        );
        MetadataResponse::default()
            .with_controller_id(BrokerId(brokers[0].0))
            .with_brokers(
                brokers
                    .into_iter()
                    .map(|(id, host, port)| {
                        MetadataResponseBroker::default()
                            .with_node_id(BrokerId(id))
                            .with_host(StrBytes::from_string(host))
                            .with_port(port)
                    })
                    .collect(),
            )
            .with_cluster_id(Some(StrBytes::from_static_str("ferry")))
            .with_topics(topics)
    }

    async fn list_offsets(&self, r: ListOffsetsRequest) -> ListOffsetsResponse {
        let log = self.log.clone();
        let topics = tokio::task::spawn_blocking(move || {
            r.topics
                .into_iter()
                .map(|t| {
                    let name = t.name.0.as_str().to_owned();
                    let partitions = t
                        .partitions
                        .into_iter()
                        .map(|p| {
                            let partition = p.partition_index;
                            let answer = u32::try_from(partition)
                                .map_err(|_| code::UNKNOWN_TOPIC_OR_PARTITION)
                                .and_then(|pi| {
                                    let offsets =
                                        log.offsets(&name, pi).map_err(|e| log_error_code(&e))?;
                                    Ok(match p.timestamp {
                                        -2 => (-1, offsets.log_start),
                                        -1 => (-1, offsets.high_watermark),
                                        ts => record_for_time(&*log, &name, pi, ts)
                                            .map_err(|e| log_error_code(&e))?
                                            .unwrap_or((-1, -1)),
                                    })
                                });
                            let (error_code, (timestamp, offset)) = match answer {
                                Ok(found) => (code::NONE, found),
                                Err(error_code) => (error_code, (-1, -1)),
                            };
                            ListOffsetsPartitionResponse::default()
                                .with_partition_index(partition)
                                .with_error_code(error_code)
                                .with_timestamp(timestamp)
                                .with_offset(offset)
                        })
                        .collect();
                    ListOffsetsTopicResponse::default()
                        .with_name(t.name)
                        .with_partitions(partitions)
                })
                .collect()
        })
        .await
        .unwrap_or_default();
        ListOffsetsResponse::default().with_topics(topics)
    }

    async fn fetch(&self, r: FetchRequest) -> FetchResponse {
        let deadline = tokio::time::Instant::now()
            + Duration::from_millis(r.max_wait_ms.clamp(0, 60_000) as u64);
        let min_bytes = r.min_bytes.max(0) as usize;
        let mut commits = self.log.watch_commits();
        loop {
            commits.borrow_and_update();
            let log = self.log.clone();
            let request = r.clone();
            let (responses, bytes) =
                tokio::task::spawn_blocking(move || read_fetch(&*log, &request))
                    .await
                    .unwrap_or_default();
            let now = tokio::time::Instant::now();
            // As Kafka: enough bytes (min_bytes 0 answers at once), the wait is over, or a
            // partition's answer is an error (offset out of range, unknown partition...),
            // which waiting would not change.
            let failed = responses
                .iter()
                .any(|t| t.partitions.iter().any(|p| p.error_code != code::NONE));
            if bytes >= min_bytes || now >= deadline || failed {
                return FetchResponse::default().with_responses(responses);
            }
            // Not enough yet: wait for a commit, up to max_wait_ms.
            let _ = tokio::time::timeout_at(deadline, commits.changed()).await;
            if tokio::time::Instant::now() >= deadline && bytes > 0 {
                return FetchResponse::default().with_responses(responses);
            }
        }
    }

    /// Every partition's append queued at once, in the request's order (so that they share
    /// the log's commits, and a pipelined request's are all queued by its first poll); then
    /// their answers.
    async fn produce(&self, r: ProduceRequest) -> ProduceResponse {
        let mut appends = Vec::new();
        let mut topics = Vec::new();
        for t in r.topic_data {
            let name = t.name.0.as_str().to_owned();
            if !self.has_topic(&name) {
                let n = name.clone();
                self.off_runtime(move |f| f.create_topic(&n)).await;
            }
            let mut indexes = Vec::new();
            for p in t.partition_data {
                let index = p.index;
                let name = name.clone();
                appends.push(async move {
                    match (u32::try_from(index), p.records) {
                        (Ok(partition), Some(records)) => {
                            self.append_batches(&name, partition, records).await
                        }
                        (Err(_), _) => Err(code::UNKNOWN_TOPIC_OR_PARTITION),
                        (_, None) => Err(code::CORRUPT_MESSAGE),
                    }
                });
                indexes.push(index);
            }
            topics.push((t.name, name, indexes));
        }
        let mut results = futures_util::future::join_all(appends).await.into_iter();
        let mut responses = Vec::new();
        for (topic, name, indexes) in topics {
            let mut partition_responses = Vec::new();
            for index in indexes {
                let Some(result) = results.next() else { break };
                let response = PartitionProduceResponse::default()
                    .with_index(index)
                    .with_log_append_time_ms(-1);
                partition_responses.push(match result {
                    Ok(base_offset) => response
                        .with_base_offset(base_offset)
                        .with_log_start_offset(
                            self.log
                                .offsets(&name, index as u32)
                                .map_or(-1, |o| o.log_start),
                        ),
                    Err(error_code) => response
                        .with_error_code(error_code)
                        .with_base_offset(-1)
                        .with_log_start_offset(-1),
                });
            }
            responses.push(
                TopicProduceResponse::default()
                    .with_name(topic)
                    .with_partition_responses(partition_responses),
            );
        }
        ProduceResponse::default().with_responses(responses)
    }
}

impl KafkaFront {
    /// Appends a producer's batches to a partition (CRC checked); an idempotent producer's
    /// batch is checked against its sequence first, here or by the log itself
    /// ([`Storage::checks_producers`]). The base offset, or an error code.
    async fn append_batches(
        &self,
        stream: &str,
        partition: u32,
        records: Bytes,
    ) -> Result<i64, i16> {
        let header =
            ferry_protocol::kafka::verify_crc(&records).map_err(|_| code::CORRUPT_MESSAGE)?;
        let data = AppendData::Batches(BytesMut::from(&records[..]));
        // Idempotence applies to a request of one batch (what producers send per partition).
        let idempotent = header.producer_id >= 0 && header.total_len() == records.len();
        if !idempotent || self.log.checks_producers() {
            let appended = self.log.append(stream, partition, data).await.map_err(|e| {
                if let LogError::Sequence(_) = e {
                    info!(stream, partition, producer = header.producer_id, epoch = header.producer_epoch, first = header.base_sequence, error = %e, "an idempotent batch refused");
                }
                log_error_code(&e)
            })?;
            return Ok(appended.base_offset);
        }
        let key = (header.producer_id, stream.to_owned(), partition);
        let (epoch, first) = (header.producer_epoch, header.base_sequence);
        let last = first.wrapping_add(header.records_count.max(1) - 1);
        {
            let mut producers = self.producers.lock().unwrap_or_else(|e| e.into_inner());
            match producers.batches.get(&key).map(|s| s.check(epoch, first)) {
                None | Some(Sequence::Next) => {}
                Some(Sequence::Duplicate(offset)) => return Ok(offset),
                Some(Sequence::Refused(e)) => {
                    info!(stream, partition, producer = key.0, epoch, first, error = %e, "an idempotent batch refused");
                    return Err(log_error_code(&LogError::Sequence(e)));
                }
            }
            if !producers.appending.insert(key.clone()) {
                return Err(code::REQUEST_TIMED_OUT);
            }
        }
        // On a task of its own, so that the producer's state takes the outcome even if this
        // request is dropped meanwhile (the append goes on in the log anyway).
        let producers = self.producers.clone();
        let appending = self.log.append(stream, partition, data);
        let outcome = tokio::spawn(async move {
            let appended = appending.await;
            let mut producers = producers.lock().unwrap_or_else(|e| e.into_inner());
            producers.appending.remove(&key);
            if let Ok(a) = &appended {
                producers.fold(key, epoch, first, last, a.base_offset);
            }
            appended
        })
        .await
        .map_err(|_| code::KAFKA_STORAGE_ERROR)?;
        Ok(outcome.map_err(|e| log_error_code(&e))?.base_offset)
    }
}

/// A producer id not given before, even across restarts: the time in ms, shifted, and a
/// counter.
fn new_producer_id() -> i64 {
    static NEXT: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(0);
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed) & 0xfff;
    ((ms << 12) | n) & i64::MAX
}

/// The first record at or after `timestamp`: (its timestamp, its offset). The log's time
/// index finds the batch; its records are scanned for the record itself, as Kafka does.
fn record_for_time(
    log: &dyn Storage,
    stream: &str,
    partition: u32,
    timestamp: i64,
) -> Result<Option<(i64, i64)>, LogError> {
    let Some(mut offset) = log.offset_for_time(stream, partition, timestamp)? else {
        return Ok(None);
    };
    let end = log.offsets(stream, partition)?.high_watermark;
    while offset < end {
        let read = log.read(stream, partition, offset, READ_BUDGET_BYTES)?;
        if read.batches.is_empty() {
            break;
        }
        for batch in read.iter() {
            let (h, whole) = batch?;
            offset = h.last_offset() + 1;
            if h.max_timestamp < timestamp {
                continue;
            }
            let plain = uncompressed(whole, MAX_UNCOMPRESSED_BYTES)
                .map_err(|e| LogError::BadBatch(e.to_string()))?;
            for r in records(&plain).map_err(|e| LogError::BadBatch(e.to_string()))? {
                let r = r.map_err(|e| LogError::BadBatch(e.to_string()))?;
                if r.timestamp >= timestamp {
                    return Ok(Some((r.timestamp, r.offset)));
                }
            }
        }
    }
    Ok(None)
}

/// Reads what a Fetch asks for; the responses and the bytes of records in them.
fn read_fetch(log: &dyn Storage, r: &FetchRequest) -> (Vec<FetchableTopicResponse>, usize) {
    let mut budget = if r.max_bytes > 0 {
        r.max_bytes as usize
    } else {
        usize::MAX
    };
    let mut total = 0;
    let responses = r
        .topics
        .iter()
        .map(|t| {
            let name = t.topic.0.as_str();
            let partitions = t
                .partitions
                .iter()
                .map(|p| {
                    let Ok(partition) = u32::try_from(p.partition) else {
                        return partition_error(p.partition, code::UNKNOWN_TOPIC_OR_PARTITION);
                    };
                    let offsets = match log.offsets(name, partition) {
                        Ok(o) => o,
                        Err(e) => return partition_error(p.partition, log_error_code(&e)),
                    };
                    let mut data = PartitionData::default()
                        .with_partition_index(p.partition)
                        .with_high_watermark(offsets.high_watermark)
                        .with_last_stable_offset(offsets.high_watermark)
                        .with_log_start_offset(offsets.log_start);
                    if p.fetch_offset < offsets.log_start || p.fetch_offset > offsets.high_watermark
                    {
                        data.error_code = code::OFFSET_OUT_OF_RANGE;
                        return data;
                    }
                    // Kafka returns at least one whole batch even over the limits, so that a
                    // consumer always progresses; the first partition with data gets that.
                    let max = (p.partition_max_bytes.max(0) as usize).min(budget);
                    if p.fetch_offset == offsets.high_watermark || (max == 0 && total > 0) {
                        data.records = Some(Bytes::new());
                        return data;
                    }
                    match log.read(name, partition, p.fetch_offset, max.max(1)) {
                        Ok(read) => {
                            let n = read.batches.len();
                            total += n;
                            budget = budget.saturating_sub(n);
                            data.records = Some(read.batches);
                        }
                        Err(e) => data.error_code = log_error_code(&e),
                    }
                    data
                })
                .collect();
            FetchableTopicResponse::default()
                .with_topic(t.topic.clone())
                .with_partitions(partitions)
        })
        .collect();
    (responses, total)
}

fn partition_error(partition: i32, error_code: i16) -> PartitionData {
    PartitionData::default()
        .with_partition_index(partition)
        .with_error_code(error_code)
        .with_high_watermark(-1)
        .with_last_stable_offset(-1)
        .with_log_start_offset(-1)
}

/// The Kafka error code for a log error.
fn log_error_code(e: &LogError) -> i16 {
    match e {
        LogError::UnknownStream(_) | LogError::UnknownPartition { .. } => {
            code::UNKNOWN_TOPIC_OR_PARTITION
        }
        LogError::OffsetOutOfRange { .. } => code::OFFSET_OUT_OF_RANGE,
        LogError::BadBatch(_) => code::CORRUPT_MESSAGE,
        LogError::Sequence(SequenceError::OutOfOrder) => code::OUT_OF_ORDER_SEQUENCE_NUMBER,
        LogError::Sequence(SequenceError::StaleEpoch) => code::INVALID_PRODUCER_EPOCH,
        _ => code::KAFKA_STORAGE_ERROR,
    }
}

fn api_versions(error_code: i16) -> ApiVersionsResponse {
    ApiVersionsResponse::default()
        .with_error_code(error_code)
        .with_api_keys(
            SUPPORTED
                .iter()
                .map(|(k, lo, hi)| {
                    ApiVersion::default()
                        .with_api_key(*k as i16)
                        // Produce is advertised from 0 (clients pick the highest both speak).
                        .with_min_version(if *k == ApiKey::Produce { 0 } else { *lo })
                        .with_max_version(*hi)
                })
                .collect(),
        )
}

/// A response frame: size, header, body.
/// Requests of one connection whose answers may wait at once: pipelined Produce requests
/// (librdkafka sends up to `max.in.flight.requests.per.connection` of them without waiting),
/// each holding up to `max_request_bytes`.
const PIPELINE: usize = 8;

/// A request as read off the wire.
enum Decoded {
    /// Answered without more: the ApiVersions of a version not served (KIP-511).
    Answer(BytesMut),
    Request {
        api: ApiKey,
        version: i16,
        header: RequestHeader,
        request: Box<RequestKind>,
    },
}

impl Decoded {
    /// A Produce request none of whose batches is an idempotent producer's: it may wait
    /// for its commit while later requests are read and queued. An idempotent producer's
    /// requests go one at a time, so that one whose append failed is never followed in the
    /// log by a later batch of the same producer.
    fn pipelined(&self) -> bool {
        let Decoded::Request { request, .. } = self else {
            return false;
        };
        let RequestKind::Produce(r) = &**request else {
            return false;
        };
        r.transactional_id.is_none()
            && r.topic_data.iter().all(|t| {
                t.partition_data.iter().all(|p| {
                    p.records.as_ref().is_none_or(|b| {
                        ferry_protocol::kafka::batch::BatchHeader::parse(b)
                            .is_ok_and(|h| h.producer_id < 0)
                    })
                })
            })
    }
}

/// Decodes one request frame (without its size).
fn decode(mut frame: Bytes) -> Result<Decoded, ConnectionError> {
    if frame.len() < 4 {
        return Err(ConnectionError::Short);
    }
    let key = i16::from_be_bytes([frame[0], frame[1]]);
    let version = i16::from_be_bytes([frame[2], frame[3]]);
    let api = ApiKey::try_from(key).map_err(|_| ConnectionError::UnknownApi(key))?;
    let supported = SUPPORTED.iter().find(|(k, _, _)| *k == api);
    let in_range = supported.is_some_and(|(_, lo, hi)| (*lo..=*hi).contains(&version));
    if api == ApiKey::ApiVersions && !in_range {
        // KIP-511: the v0 answer, UNSUPPORTED_VERSION and the full list, header v0.
        let correlation_id = frame
            .get(4..8)
            .map_or(0, |b| i32::from_be_bytes(b.try_into().expect("4 bytes")));
        let body = api_versions(code::UNSUPPORTED_VERSION);
        let mut out = BytesMut::new();
        write_response(
            &mut out,
            correlation_id,
            0,
            &ResponseKind::ApiVersions(body),
            0,
        )?;
        return Ok(Decoded::Answer(out));
    }
    if !in_range {
        return Err(ConnectionError::NotServed { api, version });
    }
    let header =
        RequestHeader::decode(&mut frame, api.request_header_version(version)).map_err(|e| {
            ConnectionError::Malformed {
                what: "request header".into(),
                why: e.to_string(),
            }
        })?;
    let request =
        RequestKind::decode(api, &mut frame, version).map_err(|e| ConnectionError::Malformed {
            what: format!("{api:?} v{version} request"),
            why: e.to_string(),
        })?;
    Ok(Decoded::Request {
        api,
        version,
        header,
        request: Box::new(request),
    })
}

/// Writes one answer (nothing for a request that takes none).
async fn write_answer(
    wr: &mut tokio::net::tcp::OwnedWriteHalf,
    answer: Option<BytesMut>,
) -> Result<(), ConnectionError> {
    match answer {
        Some(bytes) => wr.write_all(&bytes).await.map_err(ConnectionError::Write),
        None => Ok(()),
    }
}

fn write_response(
    out: &mut BytesMut,
    correlation_id: i32,
    header_version: i16,
    body: &ResponseKind,
    version: i16,
) -> Result<(), ConnectionError> {
    let start = out.len();
    out.put_i32(0);
    let failed = |what| {
        move |e: anyhow::Error| ConnectionError::Encode {
            what,
            why: e.to_string(),
        }
    };
    ResponseHeader::default()
        .with_correlation_id(correlation_id)
        .encode(out, header_version)
        .map_err(failed("response header"))?;
    body.encode(out, version).map_err(failed("response"))?;
    let size = (out.len() - start - 4) as i32;
    out[start..start + 4].copy_from_slice(&size.to_be_bytes());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::SegmentLog;

    /// A batch of `count` records from producer 77, epoch 3, first sequence `first`.
    fn producer_batch(first: i32, count: i32) -> BytesMut {
        let mut b = ferry_protocol::kafka::batch::BatchBuilder::new(1_000).producer(77, 3, first);
        for i in 0..count {
            b.push(
                1_000,
                Some(b"k"),
                Some(format!("v{}", first + i).as_bytes()),
                &[],
            );
        }
        BytesMut::from(&b.finish(0)[..])
    }

    #[tokio::test]
    async fn idempotent_producers_are_found_again_in_the_log_after_a_restart() {
        let dir = std::env::temp_dir().join(format!("ferry-producers-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        {
            let log = SegmentLog::open(&dir, true, 64).expect("open");
            log.create_stream("p", &StreamConfig::default())
                .expect("create");
            let mqtt = vec![crate::log::NewRecord {
                timestamp: 1_000,
                key: None,
                value: Some(Bytes::from_static(b"not a producer's")),
                headers: Vec::new(),
            }];
            log.append("p", 0, AppendData::Records(mqtt))
                .await
                .expect("append");
            for (first, count) in [(0, 10), (10, 5)] {
                let data = AppendData::Batches(producer_batch(first, count));
                log.append("p", 0, data).await.expect("append");
            }
        }
        let log = SegmentLog::open(&dir, true, 64).expect("reopen");
        let producers = producers_from_log(&*log);
        assert_eq!(producers.len(), 1, "one producer, one partition");
        let state = &producers.batches[&(77, "p".to_owned(), 0)];
        // The resend of either batch is a duplicate, answered with its first offset.
        assert!(matches!(state.check(3, 0), Sequence::Duplicate(1)));
        assert!(matches!(state.check(3, 10), Sequence::Duplicate(11)));
        assert!(matches!(state.check(3, 15), Sequence::Next));
        assert!(matches!(
            state.check(3, 16),
            Sequence::Refused(SequenceError::OutOfOrder)
        ));
        assert!(matches!(
            state.check(2, 15),
            Sequence::Refused(SequenceError::StaleEpoch)
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
