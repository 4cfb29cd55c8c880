//! A field source's MQTT client: MQTT 5 over the in-process pipe of
//! [`Server::connect_internal`], with our own codec. What a source publishes takes the whole
//! path of a client's publish in the broker (ACL, outbox and its budget, retained messages,
//! flow control), and the commands it subscribes to arrive as any subscriber's do.
//!
//! Publishes at QoS 1 are pipelined up to the broker's receive maximum: [`Client::publish`]
//! waits only for room in that window, not for the acknowledgement, so a source is held back
//! exactly when the broker holds its publishes (a full subscriber) and not by each commit.
//! What the broker answers is counted in the source's [`SourceStats`] (`published`, or
//! `refused` with the outbox full or the ACL's no; a QoS 0 publish, which the broker does
//! not answer, is `published` once it is written to the broker).

use std::collections::HashMap;
use std::sync::Arc;

use bytes::BytesMut;
use ferry_protocol::mqtt::{
    self, Connect, Packet, Properties, ProtocolVersion, PubResponse, Publish, QoS, ReasonCode,
    Subscribe, Subscription, SubscriptionOptions,
};
use ferry_protocol::topic::TopicFilter;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream, ReadHalf, WriteHalf};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tracing::{debug, warn};

use super::stats::SourceStats;
use crate::server::Server;

/// The most QoS 1 publishes in flight when the broker names no receive maximum.
const DEFAULT_WINDOW: usize = 64;
/// Commands waiting for their source.
const COMMAND_QUEUE: usize = 64;
/// The largest packet the client takes from the broker.
const MAX_PACKET: usize = 1024 * 1024;

/// Why the client could not connect or went away.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ClientError {
    #[error("the broker has no room for another connection (max_connections)")]
    NoRoom,
    #[error("the broker refused the connection: {0:?}")]
    Refused(ReasonCode),
    #[error("the broker closed the connection")]
    Closed,
    #[error("protocol error from the broker: {0}")]
    Protocol(String),
}

/// A command for a source: a message on one of its subscriptions.
pub(crate) type Command = Publish;

/// Sends publishes into the broker. Cheap to clone; the connection ends when every clone and
/// the command receiver are dropped, or with the broker.
#[derive(Clone)]
pub(crate) struct Client {
    requests: mpsc::Sender<Request>,
    window: Arc<Semaphore>,
}

enum Request {
    Publish(Publish, Option<OwnedSemaphorePermit>),
    Subscribe(Vec<TopicFilter>, oneshot::Sender<Result<(), ClientError>>),
}

impl Client {
    /// Connects as `client_id` (clean start, no session kept). The broker takes `username`
    /// as verified (see [`Server::connect_internal`]). Returns the client and the commands
    /// that arrive on its subscriptions.
    pub(crate) async fn connect(
        server: &Server,
        client_id: &str,
        username: &str,
        stats: Arc<SourceStats>,
    ) -> Result<(Client, mpsc::Receiver<Command>), ClientError> {
        let pipe = server
            .connect_internal(username.to_owned())
            .ok_or(ClientError::NoRoom)?;
        let (mut rd, mut wr) = tokio::io::split(pipe);
        let mut connect = Connect::new(ProtocolVersion::V5, client_id);
        connect.keep_alive_secs = 0;
        connect.username = Some(username.to_owned());
        let mut buf = BytesMut::new();
        write(&mut wr, &Packet::Connect(Box::new(connect))).await?;
        let window = match read(&mut rd, &mut buf).await? {
            Packet::ConnAck(ack) if ack.code == ReasonCode::Success => ack
                .properties
                .receive_maximum
                .map_or(DEFAULT_WINDOW, |m| usize::from(m.get())),
            Packet::ConnAck(ack) => return Err(ClientError::Refused(ack.code)),
            other => {
                return Err(ClientError::Protocol(format!(
                    "{:?} before CONNACK",
                    other.packet_type()
                )))
            }
        };
        let (requests, requests_rx) = mpsc::channel(16);
        let (commands_tx, commands) = mpsc::channel(COMMAND_QUEUE);
        let window = Arc::new(Semaphore::new(window));
        tokio::spawn(drive(rd, wr, buf, requests_rx, commands_tx, stats));
        Ok((Client { requests, window }, commands))
    }

    /// Publishes `p` (its packet id is the client's to set). A QoS 1 publish waits for room
    /// in the window of publishes the broker has not acknowledged yet.
    pub(crate) async fn publish(&self, p: Publish) -> Result<(), ClientError> {
        let permit = if p.qos == QoS::AtMostOnce {
            None
        } else {
            Some(
                self.window
                    .clone()
                    .acquire_owned()
                    .await
                    .map_err(|_| ClientError::Closed)?,
            )
        };
        self.requests
            .send(Request::Publish(p, permit))
            .await
            .map_err(|_| ClientError::Closed)
    }

    /// Subscribes to `filters` at QoS 1 and waits for the SUBACK; an error if the broker
    /// refused any of them (the ACL).
    pub(crate) async fn subscribe(&self, filters: Vec<TopicFilter>) -> Result<(), ClientError> {
        let (tx, rx) = oneshot::channel();
        self.requests
            .send(Request::Subscribe(filters, tx))
            .await
            .map_err(|_| ClientError::Closed)?;
        rx.await.map_err(|_| ClientError::Closed)?
    }
}

/// The connection's task: requests out, acknowledgements and commands in.
async fn drive(
    mut rd: ReadHalf<DuplexStream>,
    mut wr: WriteHalf<DuplexStream>,
    mut buf: BytesMut,
    mut requests: mpsc::Receiver<Request>,
    commands: mpsc::Sender<Command>,
    stats: Arc<SourceStats>,
) {
    let mut next_id: u16 = 0;
    let mut in_flight: HashMap<u16, OwnedSemaphorePermit> = HashMap::new();
    let mut subscribing: HashMap<u16, oneshot::Sender<Result<(), ClientError>>> = HashMap::new();
    let mut out = BytesMut::new();
    let result: Result<(), ClientError> = async {
        loop {
            tokio::select! {
                request = requests.recv() => {
                    let Some(request) = request else { return Ok(()) };
                    // A QoS 0 publish is not acknowledged: it counts once it is written.
                    let unacknowledged = matches!(&request, Request::Publish(_, None));
                    let packet = match request {
                        Request::Publish(mut p, permit) => {
                            if let Some(permit) = permit {
                                let id = take_id(&mut next_id, |id| {
                                    in_flight.contains_key(&id) || subscribing.contains_key(&id)
                                });
                                p.packet_id = Some(id.try_into().expect("ids start at 1"));
                                in_flight.insert(id, permit);
                            }
                            Packet::Publish(p)
                        }
                        Request::Subscribe(filters, done) => {
                            let id = take_id(&mut next_id, |id| {
                                in_flight.contains_key(&id) || subscribing.contains_key(&id)
                            });
                            subscribing.insert(id, done);
                            Packet::Subscribe(Subscribe {
                                packet_id: id.try_into().expect("ids start at 1"),
                                properties: Properties::default(),
                                subscriptions: filters
                                    .into_iter()
                                    .map(|filter| Subscription {
                                        filter,
                                        options: SubscriptionOptions::new(QoS::AtLeastOnce),
                                    })
                                    .collect(),
                            })
                        }
                    };
                    out.clear();
                    packet
                        .encode(ProtocolVersion::V5, &mut out)
                        .map_err(|e| ClientError::Protocol(e.to_string()))?;
                    wr.write_all(&out).await.map_err(|_| ClientError::Closed)?;
                    if unacknowledged {
                        stats.published();
                    }
                }
                packet = read(&mut rd, &mut buf) => match packet? {
                    Packet::PubAck(ack) => {
                        in_flight.remove(&ack.packet_id.get());
                        if ack.reason.is_error() {
                            stats.refused(ack.reason);
                        } else {
                            stats.published();
                        }
                    }
                    Packet::SubAck(ack) => {
                        if let Some(done) = subscribing.remove(&ack.packet_id.get()) {
                            let refused = ack.reasons.iter().find(|r| r.is_error()).copied();
                            let _ = done.send(match refused {
                                Some(code) => Err(ClientError::Refused(code)),
                                None => Ok(()),
                            });
                        }
                    }
                    Packet::Publish(p) => {
                        let id = p.packet_id;
                        if commands.send(p).await.is_err() {
                            return Ok(());
                        }
                        if let Some(id) = id {
                            write(&mut wr, &Packet::PubAck(PubResponse::new(id))).await?;
                        }
                    }
                    Packet::Disconnect(d) => {
                        debug!(reason = ?d.reason, "the broker disconnected a field source");
                        return Err(ClientError::Closed);
                    }
                    _ => {}
                },
            }
        }
    }
    .await;
    if let Err(e) = result {
        warn!(source = %stats.name, error = %e, "a field source's connection to the broker ended");
    }
}

/// The next free packet id (1..=65535).
fn take_id(next: &mut u16, taken: impl Fn(u16) -> bool) -> u16 {
    loop {
        *next = next.wrapping_add(1).max(1);
        if !taken(*next) {
            return *next;
        }
    }
}

async fn write(wr: &mut WriteHalf<DuplexStream>, packet: &Packet) -> Result<(), ClientError> {
    let mut out = BytesMut::new();
    packet
        .encode(ProtocolVersion::V5, &mut out)
        .map_err(|e| ClientError::Protocol(e.to_string()))?;
    wr.write_all(&out).await.map_err(|_| ClientError::Closed)
}

async fn read(rd: &mut ReadHalf<DuplexStream>, buf: &mut BytesMut) -> Result<Packet, ClientError> {
    loop {
        if let Some(packet) = mqtt::decode(buf, ProtocolVersion::V5, MAX_PACKET)
            .map_err(|e| ClientError::Protocol(e.to_string()))?
        {
            return Ok(packet);
        }
        buf.reserve(4096);
        if rd.read_buf(buf).await.map_err(|_| ClientError::Closed)? == 0 {
            return Err(ClientError::Closed);
        }
    }
}
