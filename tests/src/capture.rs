//! A scripted MQTT server for interop tests: it decodes what a client sends with
//! `ferry-protocol`, records it, and answers just enough for the client to go on.
//!
//! Answers: CONNACK (Success) to CONNECT, PUBACK / PUBREC / PUBCOMP along the QoS flows,
//! SUBACK granting the requested QoS and then one PUBLISH per new subscription (to a topic
//! made from the filter, so the client has something to receive), UNSUBACK, PINGRESP. It
//! closes the connection on DISCONNECT or on a decode error, which it records too.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::mpsc::{self, Receiver, Sender};
use std::thread;
use std::time::Duration;

use bytes::BytesMut;
use ferry_protocol::mqtt::{
    decode, ConnAck, DecodeError, Packet, Properties, ProtocolVersion, PubResponse, Publish,
    ReasonCode, SubAck, UnsubAck, MAX_PACKET_SIZE,
};
use ferry_protocol::topic::TopicName;

/// The payload of the PUBLISH sent to each new subscription.
pub const GREETING: &str = "hello from ferry";

/// What the server saw on one connection, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seen {
    Packet(Packet),
    DecodeError(DecodeError),
    Closed,
}

/// A listening capture server on 127.0.0.1; every accepted connection is served on its own
/// thread and reports what it saw on the channel returned by [`CaptureServer::events`].
#[derive(Debug)]
pub struct CaptureServer {
    addr: SocketAddr,
    events: Receiver<Seen>,
}

impl CaptureServer {
    /// Binds an ephemeral port on 127.0.0.1 and starts accepting.
    pub fn start() -> std::io::Result<Self> {
        Self::bind("127.0.0.1:0")
    }

    /// Binds `addr` and starts accepting.
    pub fn bind(addr: impl std::net::ToSocketAddrs) -> std::io::Result<Self> {
        let listener = TcpListener::bind(addr)?;
        let addr = listener.local_addr()?;
        let (tx, events) = mpsc::channel();
        thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let tx = tx.clone();
                thread::spawn(move || serve(stream, tx));
            }
        });
        Ok(Self { addr, events })
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Waits up to `timeout` for the next thing seen on any connection.
    pub fn next(&self, timeout: Duration) -> Option<Seen> {
        self.events.recv_timeout(timeout).ok()
    }

    /// Collects packets until a connection closes (or `timeout` passes between two events).
    pub fn until_closed(&self, timeout: Duration) -> Vec<Seen> {
        let mut seen = Vec::new();
        while let Some(event) = self.next(timeout) {
            let closed = event == Seen::Closed;
            seen.push(event);
            if closed {
                break;
            }
        }
        seen
    }
}

fn serve(mut stream: TcpStream, tx: Sender<Seen>) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
    let mut version = ProtocolVersion::V5;
    let mut buf = BytesMut::with_capacity(4096);
    let mut chunk = [0u8; 4096];
    let mut next_id: u16 = 1;
    loop {
        match decode(&mut buf, version, MAX_PACKET_SIZE) {
            Ok(Some(packet)) => {
                if let Packet::Connect(c) = &packet {
                    version = c.protocol;
                }
                let replies = answer(&packet, &mut next_id);
                let done = matches!(packet, Packet::Disconnect(_));
                let _ = tx.send(Seen::Packet(packet));
                let mut out = BytesMut::new();
                for reply in replies {
                    reply
                        .encode(version, &mut out)
                        .expect("the capture server only encodes valid replies");
                }
                if stream.write_all(&out).is_err() || done {
                    break;
                }
                continue;
            }
            Ok(None) => {}
            Err(e) => {
                let _ = tx.send(Seen::DecodeError(e));
                break;
            }
        }
        match stream.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    let _ = tx.send(Seen::Closed);
}

fn answer(packet: &Packet, next_id: &mut u16) -> Vec<Packet> {
    match packet {
        Packet::Connect(_) => vec![Packet::ConnAck(ConnAck::new(ReasonCode::Success, false))],
        Packet::Publish(p) => match (p.qos as u8, p.packet_id) {
            (1, Some(id)) => vec![Packet::PubAck(PubResponse::new(id))],
            (2, Some(id)) => vec![Packet::PubRec(PubResponse::new(id))],
            _ => vec![],
        },
        Packet::PubRel(r) => vec![Packet::PubComp(PubResponse::new(r.packet_id))],
        Packet::PubRec(r) => vec![Packet::PubRel(PubResponse::new(r.packet_id))],
        Packet::Subscribe(s) => {
            let reasons = s
                .subscriptions
                .iter()
                .map(|sub| match sub.options.qos as u8 {
                    0 => ReasonCode::Success,
                    1 => ReasonCode::GrantedQoS1,
                    _ => ReasonCode::GrantedQoS2,
                })
                .collect();
            let mut replies = vec![Packet::SubAck(SubAck {
                packet_id: s.packet_id,
                properties: Properties::default(),
                reasons,
            })];
            for sub in &s.subscriptions {
                let mut publish = Publish::new(topic_for(sub.filter.filter()), GREETING);
                publish.qos = sub.options.qos;
                if publish.qos as u8 > 0 {
                    publish.packet_id = std::num::NonZeroU16::new(*next_id);
                    *next_id = next_id.wrapping_add(1).max(1);
                }
                publish.properties.user_properties = vec![("from".into(), "ferry".into())];
                publish.properties.content_type = Some("text/plain".into());
                replies.push(Packet::Publish(publish));
            }
            replies
        }
        Packet::Unsubscribe(u) => vec![Packet::UnsubAck(UnsubAck {
            packet_id: u.packet_id,
            properties: Properties::default(),
            reasons: vec![ReasonCode::Success; u.filters.len()],
        })],
        Packet::PingReq => vec![Packet::PingResp],
        _ => vec![],
    }
}

/// A concrete topic matched by `filter`: each wildcard level becomes `x`.
fn topic_for(filter: &str) -> TopicName {
    let levels: Vec<&str> = filter
        .split('/')
        .map(|l| if l == "+" || l == "#" { "x" } else { l })
        .collect();
    TopicName::new(levels.join("/")).expect("a filter with its wildcards replaced is a valid name")
}
