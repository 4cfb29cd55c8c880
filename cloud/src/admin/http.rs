//! The admin listener's HTTP/1.1 (hyper), plain or over TLS (rustls): each connection
//! served on its own task, at most [`MAX_CONNECTIONS`] at once, a request's head within
//! 10 s and its body at most [`MAX_BODY_BYTES`]; the handler gets the whole request and
//! gives a whole [`Reply`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::header::{HeaderMap, HeaderName, HeaderValue, CACHE_CONTROL, CONTENT_TYPE};
use hyper::{Method, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tracing::debug;

/// Connections served at once; more wait in the kernel's backlog.
pub const MAX_CONNECTIONS: usize = 256;
/// The largest request body taken (a login, an action's arguments).
pub const MAX_BODY_BYTES: usize = 64 << 10;
/// A TLS handshake or a request head must come within this.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// One request, read whole.
#[derive(Debug)]
pub struct Request {
    pub method: Method,
    pub path: String,
    pub query: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Request {
    /// A header's value as text, if it is there and is text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The value of cookie `name`.
    pub fn cookie(&self, name: &str) -> Option<&str> {
        self.headers
            .get_all(hyper::header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|c| c.trim().split_once('='))
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v)
    }
}

/// One answer.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub content_type: &'static str,
    pub body: Bytes,
    pub headers: Vec<(HeaderName, HeaderValue)>,
}

impl Reply {
    pub fn new(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Self {
        Self {
            status,
            content_type,
            body: body.into(),
            headers: Vec::new(),
        }
    }

    /// A JSON document.
    pub fn json(status: StatusCode, body: &serde_json::Value) -> Self {
        Self::new(status, "application/json", body.to_string())
    }

    /// `{"error": why}` with `status`.
    pub fn error(status: StatusCode, why: &str) -> Self {
        Self::json(status, &serde_json::json!({ "error": why }))
    }

    /// With another header.
    pub fn with(mut self, name: HeaderName, value: &str) -> Self {
        if let Ok(v) = HeaderValue::from_str(value) {
            self.headers.push((name, v));
        }
        self
    }
}

impl From<ferry_edge::metrics::Response> for Reply {
    fn from(r: ferry_edge::metrics::Response) -> Self {
        let status = r
            .status
            .split(' ')
            .next()
            .and_then(|c| c.parse::<u16>().ok())
            .and_then(|c| StatusCode::from_u16(c).ok())
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        Self::new(status, r.content_type, r.body)
    }
}

/// Serves `listener` (over TLS with `tls`) until the process ends, each request answered by
/// `handler`.
pub fn serve<F, Fut>(listener: TcpListener, tls: Option<tokio_rustls::TlsAcceptor>, handler: F)
where
    F: Fn(Request) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Reply> + Send + 'static,
{
    let handler = Arc::new(handler);
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    tokio::spawn(async move {
        loop {
            let Ok(slot) = slots.clone().acquire_owned().await else {
                return;
            };
            let Ok((stream, peer)) = listener.accept().await else {
                continue;
            };
            let (handler, tls) = (handler.clone(), tls.clone());
            tokio::spawn(async move {
                let _slot = slot;
                match tls {
                    Some(tls) => match tokio::time::timeout(READ_TIMEOUT, tls.accept(stream)).await
                    {
                        Ok(Ok(stream)) => connection(stream, peer, handler).await,
                        _ => debug!(%peer, "admin TLS handshake failed"),
                    },
                    None => connection(stream, peer, handler).await,
                }
            });
        }
    });
}

async fn connection<S, F, Fut>(stream: S, peer: SocketAddr, handler: Arc<F>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    F: Fn(Request) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Reply> + Send + 'static,
{
    let service = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
        let handler = handler.clone();
        async move {
            let (parts, body) = req.into_parts();
            let reply = match Limited::new(body, MAX_BODY_BYTES).collect().await {
                Ok(body) => {
                    handler(Request {
                        method: parts.method,
                        path: parts.uri.path().to_owned(),
                        query: parts.uri.query().unwrap_or_default().to_owned(),
                        headers: parts.headers,
                        body: body.to_bytes(),
                    })
                    .await
                }
                Err(_) => Reply::error(StatusCode::PAYLOAD_TOO_LARGE, "request body too large"),
            };
            Ok::<_, std::convert::Infallible>(response(reply))
        }
    });
    let served = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(READ_TIMEOUT)
        .serve_connection(TokioIo::new(stream), service)
        .await;
    if let Err(e) = served {
        debug!(%peer, error = %e, "admin HTTP connection ended");
    }
}

fn response(reply: Reply) -> hyper::Response<Full<Bytes>> {
    let mut r = hyper::Response::new(Full::new(reply.body));
    *r.status_mut() = reply.status;
    let h = r.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static(reply.content_type));
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        HeaderName::from_static("x-content-type-options"),
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        HeaderName::from_static("x-frame-options"),
        HeaderValue::from_static("DENY"),
    );
    for (name, value) in reply.headers {
        h.append(name, value);
    }
    r
}
