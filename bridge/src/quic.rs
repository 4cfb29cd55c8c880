//! The link's QUIC endpoints, both ends: TLS 1.3 with certificates from the link's CA on
//! both sides (made by `pki`), ALPN `ferry-link/1`, keepalive and idle timeout, and the
//! frames read and written on the link's one bidirectional stream. The edge's endpoint
//! ([`client`]) comes with the feature `client`, the cloud's ([`server`], [`peer_identity`])
//! with `server`.

// Without either end, the helpers that set up an endpoint have no caller.
#![cfg_attr(not(any(feature = "client", feature = "server")), allow(dead_code))]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use ferry_protocol::link_frames::{self, Frame, LinkError};
#[cfg(feature = "client")]
use quinn::crypto::rustls::QuicClientConfig;
#[cfg(feature = "server")]
use quinn::crypto::rustls::QuicServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// The files of one end: the link CA's certificate (to check the peer), and this end's
/// certificate and key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub ca_file: PathBuf,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

/// How long a quiet link lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// A keepalive is sent after this long without traffic.
    pub keepalive: Duration,
    /// The connection is closed after this long without hearing from the peer.
    pub idle: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            keepalive: Duration::from_secs(10),
            idle: Duration::from_secs(30),
        }
    }
}

/// Why an endpoint could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("{path}: {why}")]
    File { path: PathBuf, why: String },
    #[error("TLS: {0}")]
    Tls(#[from] rustls::Error),
    #[error("TLS verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    #[error("QUIC: {0}")]
    Quic(String),
    #[error("cannot bind the link's UDP socket: {0}")]
    Bind(#[from] std::io::Error),
}

fn file_error(path: &Path, why: impl ToString) -> SetupError {
    SetupError::File {
        path: path.to_owned(),
        why: why.to_string(),
    }
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, SetupError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_error(path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error(path, e))?;
    if certs.is_empty() {
        return Err(file_error(path, "no certificate in the file"));
    }
    Ok(certs)
}

fn key(path: &Path) -> Result<PrivateKeyDer<'static>, SetupError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| file_error(path, e))
}

fn roots(path: &Path) -> Result<Arc<rustls::RootCertStore>, SetupError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in certs(path)? {
        roots.add(cert).map_err(|e| file_error(path, e))?;
    }
    Ok(Arc::new(roots))
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn transport(t: Timeouts) -> Arc<quinn::TransportConfig> {
    let mut config = quinn::TransportConfig::default();
    config.keep_alive_interval(Some(t.keepalive));
    config.max_idle_timeout(quinn::IdleTimeout::try_from(t.idle).ok());
    // Room for a backlog to drain at the link's speed, not at one window per round trip.
    config.stream_receive_window(quinn::VarInt::from_u32(8 << 20));
    config.receive_window(quinn::VarInt::from_u32(16 << 20));
    config.send_window(16 << 20);
    Arc::new(config)
}

/// The cloud's endpoint on `listen`: it requires a client certificate from the CA (the
/// edge's identity, read with [`peer_identity`]).
#[cfg(feature = "server")]
pub fn server(
    listen: std::net::SocketAddr,
    files: &TlsFiles,
    timeouts: Timeouts,
) -> Result<quinn::Endpoint, SetupError> {
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        roots(&files.ca_file)?,
        provider(),
    )
    .build()?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs(&files.cert_file)?, key(&files.key_file)?)?;
    tls.alpn_protocols = vec![link_frames::ALPN.to_vec()];
    let crypto = QuicServerConfig::try_from(tls).map_err(|e| SetupError::Quic(e.to_string()))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(transport(timeouts));
    Ok(quinn::Endpoint::server(config, listen)?)
}

/// The edge's endpoint (an ephemeral UDP port) and the configuration to connect with: the
/// cloud's certificate must come from the CA and name the host connected to.
#[cfg(feature = "client")]
pub fn client(
    files: &TlsFiles,
    timeouts: Timeouts,
) -> Result<(quinn::Endpoint, quinn::ClientConfig), SetupError> {
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots(&files.ca_file)?)
        .with_client_auth_cert(certs(&files.cert_file)?, key(&files.key_file)?)?;
    tls.alpn_protocols = vec![link_frames::ALPN.to_vec()];
    let crypto = QuicClientConfig::try_from(tls).map_err(|e| SetupError::Quic(e.to_string()))?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(transport(timeouts));
    let endpoint = quinn::Endpoint::client((std::net::Ipv6Addr::UNSPECIFIED, 0).into())
        .or_else(|_| quinn::Endpoint::client((std::net::Ipv4Addr::UNSPECIFIED, 0).into()))?;
    Ok((endpoint, config))
}

/// Who is at the other end: the edge id (the certificate's common name) and the
/// certificate's serial number (lowercase hex), as the TLS handshake verified them.
#[cfg(feature = "server")]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerIdentity {
    pub edge_id: String,
    pub serial: String,
    /// When the certificate expires (its notAfter, seconds since the Unix epoch).
    pub not_after_unix_secs: Option<u64>,
}

/// The verified identity of the peer of `conn`; None if it has no certificate or one
/// without a common name.
#[cfg(feature = "server")]
pub fn peer_identity(conn: &quinn::Connection) -> Option<PeerIdentity> {
    let chain = conn
        .peer_identity()?
        .downcast::<Vec<CertificateDer<'static>>>()
        .ok()?;
    let leaf = chain.first()?;
    Some(PeerIdentity {
        edge_id: crate::pki::common_name(leaf)?,
        serial: crate::pki::serial_hex(leaf)?,
        not_after_unix_secs: crate::pki::not_after_unix_secs(leaf),
    })
}

/// Why the link's stream failed.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("bad frame: {0}")]
    Frame(#[from] LinkError),
    #[error("read: {0}")]
    Read(#[from] quinn::ReadError),
    #[error("write: {0}")]
    Write(#[from] quinn::WriteError),
}

/// Frames off the receiving half of the link's stream.
#[derive(Debug)]
pub struct FrameReader {
    recv: quinn::RecvStream,
    buf: BytesMut,
    max_frame_bytes: usize,
}

impl FrameReader {
    pub fn new(recv: quinn::RecvStream, max_frame_bytes: usize) -> Self {
        Self {
            recv,
            buf: BytesMut::with_capacity(64 << 10),
            max_frame_bytes,
        }
    }

    /// The next frame; None when the peer finished the stream. Not cancel safe: run it in
    /// a task of its own.
    pub async fn next(&mut self) -> Result<Option<Frame>, StreamError> {
        loop {
            if let Some(frame) = link_frames::decode(&mut self.buf, self.max_frame_bytes)? {
                return Ok(Some(frame));
            }
            match self.recv.read_chunk(256 << 10, true).await? {
                Some(chunk) => self.buf.extend_from_slice(&chunk.bytes),
                None => return Ok(None),
            }
        }
    }
}

/// Frames onto the sending half of the link's stream.
#[derive(Debug)]
pub struct FrameWriter {
    send: quinn::SendStream,
    buf: BytesMut,
}

impl FrameWriter {
    pub fn new(send: quinn::SendStream) -> Self {
        Self {
            send,
            buf: BytesMut::new(),
        }
    }

    /// Writes one frame; returns its size on the wire (before QUIC's own overhead).
    pub async fn send(&mut self, frame: &Frame) -> Result<usize, StreamError> {
        self.buf.clear();
        frame.encode(&mut self.buf);
        self.send.write_all(&self.buf).await?;
        Ok(self.buf.len())
    }

    /// Ends the stream after what was written.
    pub fn finish(&mut self) {
        let _ = self.send.finish();
    }
}

/// Takes frames off the stream until it ends or fails, or the driver is gone.
pub(crate) async fn read_frames(
    mut reader: FrameReader,
    frames: tokio::sync::mpsc::Sender<Result<Option<Frame>, StreamError>>,
) {
    loop {
        let next = reader.next().await;
        let end = !matches!(next, Ok(Some(_)));
        if frames.send(next).await.is_err() || end {
            return;
        }
    }
}
