//! The accept loops: one per listener, each connection in a task of its own, within
//! `max_connections`; TLS and WebSocket handshakes run in that task, under the connect
//! timeout.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch, Semaphore};
use tracing::{debug, warn};

use super::connection::{connection, ConnSettings};
use super::router::ToRouter;
use super::{tls, websocket};

/// How a listener's connections carry MQTT.
#[derive(Clone)]
pub(super) enum Transport {
    Tcp,
    /// With whether the client certificate's CN becomes the username.
    Tls(tokio_rustls::TlsAcceptor, bool),
    /// MQTT over WebSocket (binary frames, subprotocol `mqtt`).
    WebSocket,
    /// MQTT over WebSocket over TLS (`wss://`), with the TLS listener's settings.
    WebSocketTls(tokio_rustls::TlsAcceptor, bool),
}

impl Transport {
    pub(super) fn name(&self) -> &'static str {
        match self {
            Transport::Tcp => "tcp",
            Transport::Tls(..) => "tls",
            Transport::WebSocket => "websocket",
            Transport::WebSocketTls(..) => "websocket+tls",
        }
    }
}

pub(super) async fn accept_loop(
    listener: TcpListener,
    transport: Transport,
    to_router: mpsc::Sender<ToRouter>,
    next_id: Arc<AtomicU64>,
    limit: Arc<Semaphore>,
    settings: Arc<ConnSettings>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(x) => x,
                Err(e) => {
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = stop.changed() => return,
        };
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            warn!(%peer, "connection refused: max_connections reached");
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let conn = next_id.fetch_add(1, Ordering::Relaxed);
        let to_router = to_router.clone();
        let settings = settings.clone();
        let stop = stop.clone();
        let transport = transport.clone();
        // One spawn per transport, so that a plain TCP connection's task is not sized for a
        // TLS handshake's state.
        match transport {
            Transport::Tcp => {
                tokio::spawn(async move {
                    connection(stream, None, peer, conn, to_router, settings, stop).await;
                    drop(permit);
                });
            }
            Transport::WebSocket => {
                tokio::spawn(async move {
                    let upgraded =
                        tokio::time::timeout(settings.connect_timeout, websocket::accept(stream))
                            .await;
                    match upgraded {
                        Ok(Ok(stream)) => {
                            connection(stream, None, peer, conn, to_router, settings, stop).await
                        }
                        Ok(Err(e)) => debug!(%peer, error = %e, "WebSocket handshake failed"),
                        Err(_) => debug!(%peer, "WebSocket handshake timed out"),
                    }
                    drop(permit);
                });
            }
            Transport::WebSocketTls(acceptor, identity_as_username) => {
                tokio::spawn(async move {
                    // Both handshakes count against the connect timeout.
                    let upgraded = tokio::time::timeout(settings.connect_timeout, async {
                        let tls = acceptor.accept(stream).await.map_err(|e| e.to_string())?;
                        let identity = identity_as_username
                            .then(|| tls::peer_common_name(&tls))
                            .flatten();
                        let ws = websocket::accept(tls).await.map_err(|e| e.to_string())?;
                        Ok::<_, String>((ws, identity))
                    })
                    .await;
                    match upgraded {
                        Ok(Ok((stream, identity))) => {
                            connection(stream, identity, peer, conn, to_router, settings, stop)
                                .await
                        }
                        Ok(Err(e)) => {
                            debug!(%peer, error = %e, "TLS or WebSocket handshake failed")
                        }
                        Err(_) => debug!(%peer, "TLS or WebSocket handshake timed out"),
                    }
                    drop(permit);
                });
            }
            Transport::Tls(acceptor, identity_as_username) => {
                tokio::spawn(async move {
                    // The handshake counts against the connect timeout.
                    let accepted =
                        tokio::time::timeout(settings.connect_timeout, acceptor.accept(stream))
                            .await;
                    match accepted {
                        Ok(Ok(stream)) => {
                            let identity = identity_as_username
                                .then(|| tls::peer_common_name(&stream))
                                .flatten();
                            connection(stream, identity, peer, conn, to_router, settings, stop)
                                .await
                        }
                        Ok(Err(e)) => debug!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => debug!(%peer, "TLS handshake timed out"),
                    }
                    drop(permit);
                });
            }
        }
    }
}
