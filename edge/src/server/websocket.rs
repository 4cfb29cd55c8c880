//! MQTT over WebSocket: the handshake (answering the `mqtt` subprotocol, as MQTT 5.0
//! §6 asks), then a bridge task between binary frames and a byte pipe, so that the
//! connection code reads and writes bytes as on TCP. MQTT packets may span frames and
//! frames may hold several packets; the pipe does not care.

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream};
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;

/// Bytes buffered in each direction of the pipe.
const PIPE_BYTES: usize = 64 * 1024;

// The callback's error type is tungstenite's HTTP response, large by its API's design.
#[allow(clippy::result_large_err)]
pub(super) async fn accept<S>(
    stream: S,
) -> Result<DuplexStream, tokio_tungstenite::tungstenite::Error>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let ws = tokio_tungstenite::accept_hdr_async(stream, |req: &Request, mut resp: Response| {
        let wants_mqtt = req
            .headers()
            .get_all("Sec-WebSocket-Protocol")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|p| p.trim() == "mqtt");
        if wants_mqtt {
            resp.headers_mut()
                .insert("Sec-WebSocket-Protocol", HeaderValue::from_static("mqtt"));
        }
        Ok(resp)
    })
    .await?;
    let (ours, theirs) = tokio::io::duplex(PIPE_BYTES);
    tokio::spawn(bridge(ws, theirs));
    Ok(ours)
}

async fn bridge<S>(ws: tokio_tungstenite::WebSocketStream<S>, pipe: DuplexStream)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut ws_tx, mut ws_rx) = ws.split();
    let (mut pipe_rx, mut pipe_tx) = tokio::io::split(pipe);
    let inbound = async {
        while let Some(Ok(msg)) = ws_rx.next().await {
            let data = match msg {
                Message::Binary(data) => data,
                // Text frames are not MQTT (MQTT 5.0 §6.0): close.
                Message::Close(_) | Message::Text(_) => break,
                _ => continue,
            };
            if pipe_tx.write_all(&data).await.is_err() {
                break;
            }
        }
        let _ = pipe_tx.shutdown().await;
    };
    let outbound = async {
        let mut buf = vec![0u8; PIPE_BYTES];
        loop {
            match pipe_rx.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if ws_tx
                        .send(Message::binary(buf[..n].to_vec()))
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
            }
        }
        let _ = ws_tx.close().await;
    };
    tokio::join!(inbound, outbound);
}
