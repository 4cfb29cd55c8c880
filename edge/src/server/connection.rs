//! One connection: its reader (CONNECT, then packets to the router, paused by flow control)
//! and its writer (what the router queued on its [`Wire`], with the send credit given
//! back). Keep alive is the broker's (`Broker::poll_timeout`): it closes a silent client
//! through the router like any other close.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use ferry_protocol::mqtt::{self, DecodeError, Packet, ProtocolVersion};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, watch};
use tracing::{debug, warn};

use super::router::ToRouter;
use crate::broker::{ConnId, Input};

/// Packets a writer may have queued for PUBLISH flow: the send credit. A queued packet shares
/// its payload with the broker's queues; what it adds is its header (~100 bytes). Deep
/// enough that a fast subscriber is never waiting for credit to come back.
const SEND_CREDIT: usize = 256;
/// Room above the credit for control packets (acks, SUBACK, PINGRESP), which the broker
/// sends without credit. A client that fills this without reading is closed.
const CONTROL_SLACK: usize = 64;
/// Room made in a connection's read buffer before a read: it starts small, so that an idle
/// connection costs little, doubles while reads fill it (a busy publisher) up to the
/// maximum, and halves when they use little of it. A packet larger than this gets its whole
/// size reserved by the decoder once its header is in.
const READ_CHUNK_MIN: usize = 512;
const READ_CHUNK_MAX: usize = 64 * 1024;
/// How long a connection whose reading ended waits for its writer to flush and close.
const WRITER_GRACE: Duration = Duration::from_secs(5);
/// A read or write buffer that grew past this during a burst is given back once empty.
const BUFFER_KEEP: usize = 64 * 1024;

/// What every connection task gets from the server: the router's side lanes and the limits
/// from the configuration.
pub(super) struct ConnSettings {
    /// Where writers give send credit back to the router.
    pub(super) credit: mpsc::Sender<(ConnId, usize)>,
    /// Where readers send a subscriber's acknowledgements (PUBACK, PUBREC, PUBCOMP): a lane
    /// the router serves before publishes, so that deliveries are not starved by a flood of
    /// publishers (an acknowledgement is about a message we sent; its order relative to the
    /// client's own publishes does not matter).
    pub(super) acks: mpsc::Sender<(ConnId, Packet)>,
    pub(super) connect_timeout: Duration,
    pub(super) max_packet_size: usize,
}

/// Serves one connection: CONNECT, then reading and writing until either side ends it.
pub(super) async fn connection<S>(
    stream: S,
    identity: Option<String>,
    peer: SocketAddr,
    conn: ConnId,
    to_router: mpsc::Sender<ToRouter>,
    settings: Arc<ConnSettings>,
    mut stop: watch::Receiver<bool>,
) where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (mut rd, mut wr) = tokio::io::split(stream);
    let mut buf = BytesMut::new();
    let mut chunk = READ_CHUNK_MIN;

    // CONNECT first, within the connect timeout.
    let first = tokio::time::timeout(
        settings.connect_timeout,
        read_packet(
            &mut rd,
            &mut buf,
            &mut chunk,
            ProtocolVersion::V5,
            settings.max_packet_size,
        ),
    )
    .await;
    let connect = match first {
        Ok(Ok(Some(Packet::Connect(c)))) => c,
        Ok(Ok(Some(other))) => {
            debug!(%peer, packet = ?other.packet_type(), "first packet is not CONNECT; closing");
            return;
        }
        Ok(Ok(None)) => return,
        Ok(Err(ReadError::Decode(e))) => {
            debug!(%peer, error = %e, "bad CONNECT; closing");
            refuse_connect(&mut wr, &e).await;
            return;
        }
        Ok(Err(ReadError::Io(_))) => return,
        Err(_) => {
            debug!(%peer, "no CONNECT within the connect timeout; closing");
            return;
        }
    };
    let mut connect = connect;
    let identity_verified = identity.is_some();
    if let Some(cn) = identity {
        // The certificate, verified against the CA, is the credential (Mosquitto's
        // use_identity_as_username): its CN is the username, any password is ignored.
        connect.username = Some(cn);
        connect.password = None;
    }
    let version = connect.protocol;
    debug!(%peer, conn, client_id = %connect.client_id, ?version, "CONNECT");

    let wire = Wire::new();
    if to_router
        .send(ToRouter::Register {
            conn,
            wire: wire.clone(),
        })
        .await
        .is_err()
    {
        return;
    }
    let connect_input = Input::Connect {
        conn,
        connect,
        credit: SEND_CREDIT,
        identity_verified,
    };
    if to_router
        .send(ToRouter::Input(connect_input))
        .await
        .is_err()
    {
        return;
    }
    let writer = tokio::spawn(write_loop(
        wr,
        wire.clone(),
        conn,
        version,
        settings.credit.clone(),
    ));

    loop {
        // A paused publisher is not read from until the broker resumes it.
        let paused = {
            let state = wire.lock();
            if state.writer_gone {
                break;
            }
            state.paused
        };
        if paused {
            tokio::select! {
                _ = wire.to_reader.notified() => continue,
                _ = stop.changed() => break,
            }
        }
        if *stop.borrow() {
            break;
        }
        let read = read_packet(
            &mut rd,
            &mut buf,
            &mut chunk,
            version,
            settings.max_packet_size,
        );
        // A wake-up for the reader (paused, or the writer gone) abandons the read, which
        // loses nothing: what was read stays in `buf`.
        let next = tokio::select! {
            r = read => r,
            _ = wire.to_reader.notified() => continue,
            _ = stop.changed() => break,
        };
        match next {
            Ok(Some(packet)) => {
                let sent = match packet {
                    Packet::PubAck(_) | Packet::PubRec(_) | Packet::PubComp(_) => {
                        settings.acks.send((conn, packet)).await.is_ok()
                    }
                    packet => to_router
                        .send(ToRouter::Input(Input::Packet { conn, packet }))
                        .await
                        .is_ok(),
                };
                if !sent {
                    break;
                }
            }
            Ok(None) => break,
            Err(ReadError::Io(error)) => {
                debug!(%peer, conn, %error, "read failed");
                break;
            }
            Err(ReadError::Decode(error)) => {
                debug!(%peer, conn, %error, "malformed packet; closing");
                // The broker sends the DISCONNECT, after what it already queued.
                let _ = to_router
                    .send(ToRouter::Input(Input::Malformed { conn, error }))
                    .await;
                break;
            }
        }
    }
    // Whatever ended it, the broker detaches the session (it ignores a connection it has
    // already closed itself).
    let _ = to_router.send(ToRouter::Input(Input::Lost { conn })).await;
    // A writer stuck on a client that does not read is not waited for long.
    let mut writer = writer;
    if tokio::time::timeout(WRITER_GRACE, &mut writer)
        .await
        .is_err()
    {
        writer.abort();
    }
    debug!(%peer, conn, "connection closed");
}

/// Answers a CONNECT that could not be decoded with the CONNACK the spec asks for, where
/// there is one (an unsupported protocol level, MQTT-3.1.2-2).
async fn refuse_connect(wr: &mut (impl AsyncWrite + Unpin), e: &DecodeError) {
    if let DecodeError::UnsupportedProtocolVersion { .. } = e {
        let mut out = BytesMut::new();
        let ack = mqtt::ConnAck::new(mqtt::ReasonCode::UnsupportedProtocolVersion, false);
        // 3.1.1's CONNACK is what an old client can read.
        if Packet::ConnAck(ack)
            .encode(ProtocolVersion::V311, &mut out)
            .is_ok()
        {
            let _ = wr.write_all(&out).await;
        }
    }
}

enum ReadError {
    Io(std::io::Error),
    Decode(DecodeError),
}

/// Reads until one whole packet is decoded; `Ok(None)` at a clean end of stream.
async fn read_packet(
    rd: &mut (impl AsyncRead + Unpin),
    buf: &mut BytesMut,
    chunk: &mut usize,
    version: ProtocolVersion,
    max_packet_size: usize,
) -> Result<Option<Packet>, ReadError> {
    loop {
        if let Some(packet) =
            mqtt::decode(buf, version, max_packet_size).map_err(ReadError::Decode)?
        {
            return Ok(Some(packet));
        }
        if buf.is_empty() && buf.capacity() > BUFFER_KEEP {
            *buf = BytesMut::new();
        }
        buf.reserve((*chunk).min(max_packet_size));
        let spare = buf.capacity() - buf.len();
        match rd.read_buf(buf).await {
            Ok(0) => return Ok(None),
            Ok(n) if n == spare => *chunk = (*chunk * 2).min(READ_CHUNK_MAX),
            Ok(n) if n < spare / 4 => *chunk = (*chunk / 2).max(READ_CHUNK_MIN),
            Ok(_) => {}
            Err(e) => return Err(ReadError::Io(e)),
        }
    }
}

/// Encodes what the router queues, writes it in batches, and gives the credit back.
async fn write_loop(
    mut wr: impl AsyncWrite + Unpin,
    wire: Arc<Wire>,
    conn: ConnId,
    version: ProtocolVersion,
    credit: mpsc::Sender<(ConnId, usize)>,
) {
    let mut out = BytesMut::new();
    let mut batch = std::collections::VecDeque::new();
    loop {
        let close = {
            let mut state = wire.lock();
            std::mem::swap(&mut state.queue, &mut batch);
            state.close
        };
        if batch.is_empty() && !close {
            wire.to_writer.notified().await;
            continue;
        }
        let packets = batch.len();
        for p in batch.drain(..) {
            if let Err(e) = p.encode(version, &mut out) {
                warn!(conn, error = %e, "dropping a packet that cannot be encoded");
            }
        }
        if batch.capacity() > QUEUE_KEEP {
            batch = std::collections::VecDeque::new();
        }
        if !out.is_empty() && wr.write_all(&out).await.is_err() {
            break;
        }
        out.clear();
        if out.capacity() > BUFFER_KEEP {
            out = BytesMut::new();
        }
        if close {
            break;
        }
        if packets > 0 && credit.send((conn, packets)).await.is_err() {
            break;
        }
    }
    let _ = wr.shutdown().await;
    wire.lock().writer_gone = true;
    wire.to_reader.notify_one();
}

/// What the router shares with one connection's reader and writer: the writer's queue and
/// the reader's pause flag. A plain mutex-guarded queue rather than a channel, so that an
/// idle connection holds no buffer at all (a channel keeps a block of slots) and the writer
/// takes everything queued in one lock.
pub(super) struct Wire {
    state: std::sync::Mutex<WireState>,
    /// Wakes the writer: packets queued, or close.
    to_writer: tokio::sync::Notify,
    /// Wakes the reader: pause or resume, or the writer is gone.
    to_reader: tokio::sync::Notify,
}

#[derive(Default)]
struct WireState {
    /// Packets for the writer, in order. At most `SEND_CREDIT + CONTROL_SLACK`.
    queue: std::collections::VecDeque<Packet>,
    /// The writer sends what is queued, then closes the connection.
    close: bool,
    /// The broker's flow control holds this connection's reads.
    paused: bool,
    /// The writer has ended (closed or failed); the reader stops.
    writer_gone: bool,
}

/// The largest queue a writer keeps between bursts; a larger one is given back once drained.
const QUEUE_KEEP: usize = 64;

impl Wire {
    pub(super) fn new() -> Arc<Self> {
        Arc::new(Self {
            state: std::sync::Mutex::new(WireState::default()),
            to_writer: tokio::sync::Notify::new(),
            to_reader: tokio::sync::Notify::new(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, WireState> {
        // The lock guards plain data with no invariant a panic could break.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues `packet` for the writer; false if the queue is full (a client that sends but
    /// does not read) or the writer is gone.
    pub(super) fn send(&self, packet: Packet) -> bool {
        let mut state = self.lock();
        if state.writer_gone || state.close || state.queue.len() >= SEND_CREDIT + CONTROL_SLACK {
            return false;
        }
        state.queue.push_back(packet);
        drop(state);
        self.to_writer.notify_one();
        true
    }

    pub(super) fn close(&self) {
        self.lock().close = true;
        self.to_writer.notify_one();
    }

    /// Drops what is queued and ends the connection now: the reader stops at once, the
    /// writer as soon as it gets back to the queue.
    pub(super) fn abort(&self) {
        let mut state = self.lock();
        state.queue.clear();
        state.close = true;
        state.writer_gone = true;
        drop(state);
        self.to_writer.notify_one();
        self.to_reader.notify_one();
    }

    pub(super) fn set_paused(&self, paused: bool) {
        self.lock().paused = paused;
        self.to_reader.notify_one();
    }
}

/// What the router's tests (feature `edge`) read of a wire that has no writer behind it.
#[cfg(all(test, feature = "edge"))]
impl Wire {
    /// The packets the router queued, in order, and whether it asked to close.
    pub(super) fn queued(&self) -> (Vec<Packet>, bool) {
        let state = self.lock();
        (state.queue.iter().cloned().collect(), state.close)
    }

    /// Waits until the router queues a packet or closes the wire (at once if it did since
    /// the last wait).
    pub(super) async fn changed(&self) {
        self.to_writer.notified().await;
    }
}
