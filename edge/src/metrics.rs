//! Prometheus metrics over HTTP: `GET /metrics` in the text exposition format, and
//! `GET /api/link`: the outbox and the link to the cloud as JSON (`outbox`: records, bytes,
//! oldest_age_secs, rejected, dropped; `link`: null without `[uplink] cloud`, else state,
//! connects, records_sent, records_acked, batch_bytes_sent, last_ack_unix_ms, down_applied).
//! Those pages ([`serve`]) are the ferry-edge binary's (feature `edge`); the broker's part of
//! them ([`render`]) is shared.
//!
//! The need is a few fixed pages, so [`serve_http`] answers them directly rather than carrying
//! an HTTP framework; the cloud's admin API uses it too.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tracing::{debug, info};

use crate::broker::Stats;
use crate::server::CommitStats;

/// A request head longer than this is refused: the page needs only a request line.
const MAX_REQUEST_BYTES: usize = 8 * 1024;

/// The status page at `/` (for the technician on site): the figures of `/api/link`,
/// `/api/field` and `/metrics`, read again every 2 s by its script; no other assets.
#[cfg(feature = "edge")]
const STATUS_PAGE: &str = include_str!("status.html");

/// Serves metrics on `addr` until the process ends; returns the bound address.
#[cfg(feature = "edge")]
pub async fn serve(addr: SocketAddr, server: crate::server::Server) -> std::io::Result<SocketAddr> {
    serve_http(addr, move |path| {
        let server = server.clone();
        async move {
            let Some((stats, commits)) = server.metrics().await else {
                return Response::status("503 Service Unavailable");
            };
            let age = server.outbox_oldest_age().await.unwrap_or_default();
            match path.as_str() {
                "/metrics" => {
                    let mut page = render(&stats, &commits);
                    let _ = writeln!(
                        page,
                        "# HELP ferry_edge_outbox_oldest_age_seconds Age of the oldest record waiting for the cloud (0: none).\n# TYPE ferry_edge_outbox_oldest_age_seconds gauge\nferry_edge_outbox_oldest_age_seconds {}",
                        age.as_secs_f64()
                    );
                    if let Some(link) = server.link_status() {
                        page.push_str(&render_link(&link));
                    }
                    #[cfg(feature = "field")]
                    page.push_str(&render_field(&server.field_sources()));
                    Response::metrics(page)
                }
                #[cfg(feature = "field")]
                "/api/field" => Response::json(
                    serde_json::to_string(&server.field_sources()).unwrap_or_default(),
                ),
                "/api/link" => Response::json(link_json(&stats, age, server.link_status())),
                "/" => Response::html(STATUS_PAGE),
                _ => Response::status("404 Not Found"),
            }
        }
    })
    .await
}

/// One answer of [`serve_http`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: &'static str,
    pub content_type: &'static str,
    pub body: String,
}

impl Response {
    /// A Prometheus exposition page.
    pub fn metrics(body: String) -> Self {
        Self {
            status: "200 OK",
            content_type: "text/plain; version=0.0.4",
            body,
        }
    }

    /// A JSON document.
    pub fn json(body: String) -> Self {
        Self {
            status: "200 OK",
            content_type: "application/json",
            body,
        }
    }

    /// An HTML page.
    pub fn html(body: &str) -> Self {
        Self {
            status: "200 OK",
            content_type: "text/html; charset=utf-8",
            body: body.to_owned(),
        }
    }

    /// An empty answer with `status`.
    pub fn status(status: &'static str) -> Self {
        Self {
            status,
            content_type: "text/plain",
            body: String::new(),
        }
    }
}

/// A minimal HTTP/1.1 listener for fixed pages (metrics, a read-only admin API): reads the
/// request head (at most [`MAX_REQUEST_BYTES`], within 5 s), answers `GET <path>` with what
/// `handler` gives for the path (query string dropped), anything else with 405, and closes
/// the connection. Returns the bound address; serves until the process ends.
pub async fn serve_http<F, Fut>(addr: SocketAddr, handler: F) -> std::io::Result<SocketAddr>
where
    F: Fn(String) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Response> + Send + 'static,
{
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    info!(addr = %local, "HTTP on http://{local}/");
    let handler = std::sync::Arc::new(handler);
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, peer)) = listener.accept().await else {
                continue;
            };
            let handler = handler.clone();
            tokio::spawn(async move {
                let mut head = Vec::with_capacity(512);
                let mut chunk = [0u8; 512];
                let read = tokio::time::timeout(Duration::from_secs(5), async {
                    while !head.windows(4).any(|w| w == b"\r\n\r\n")
                        && head.len() < MAX_REQUEST_BYTES
                    {
                        match stream.read(&mut chunk).await {
                            Ok(0) | Err(_) => return false,
                            Ok(n) => head.extend_from_slice(&chunk[..n]),
                        }
                    }
                    true
                })
                .await;
                if !matches!(read, Ok(true)) {
                    debug!(%peer, "HTTP request incomplete");
                    return;
                }
                let line = head.split(|&b| b == b'\r').next().unwrap_or_default();
                let line = String::from_utf8_lossy(line);
                let mut parts = line.split(' ');
                let response = match (parts.next(), parts.next()) {
                    (Some("GET"), Some(target)) => {
                        let path = target.split('?').next().unwrap_or_default().to_owned();
                        handler(path).await
                    }
                    _ => Response::status("405 Method Not Allowed"),
                };
                let text = format!(
                    "HTTP/1.1 {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}",
                    response.status,
                    response.content_type,
                    response.body.len(),
                    response.body
                );
                let _ = stream.write_all(text.as_bytes()).await;
                let _ = stream.shutdown().await;
            });
        }
    });
    Ok(local)
}

/// The exposition text for the broker's counters and the storage commits.
pub fn render(s: &Stats, c: &CommitStats) -> String {
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, samples: &[(&str, u64)]| {
        let _ = writeln!(
            out,
            "# HELP ferry_edge_{name} {help}\n# TYPE ferry_edge_{name} {kind}"
        );
        for (labels, value) in samples {
            if labels.is_empty() {
                let _ = writeln!(out, "ferry_edge_{name} {value}");
            } else {
                let _ = writeln!(out, "ferry_edge_{name}{{{labels}}} {value}");
            }
        }
    };
    metric(
        "connections",
        "gauge",
        "Open client connections.",
        &[("", s.connections as u64)],
    );
    metric(
        "sessions",
        "gauge",
        "Sessions, connected or not.",
        &[("", s.sessions as u64)],
    );
    metric(
        "subscriptions",
        "gauge",
        "Subscriptions of all sessions.",
        &[("", s.subscriptions as u64)],
    );
    metric(
        "retained_messages",
        "gauge",
        "Retained messages.",
        &[("", s.retained as u64)],
    );
    metric(
        "queued_bytes",
        "gauge",
        "Bytes queued or in flight for all sessions.",
        &[("", s.queued_bytes as u64)],
    );
    metric(
        "messages_received_total",
        "counter",
        "PUBLISH packets taken from clients, by QoS.",
        &[
            ("qos=\"0\"", s.received_by_qos[0]),
            ("qos=\"1\"", s.received_by_qos[1]),
            ("qos=\"2\"", s.received_by_qos[2]),
        ],
    );
    metric(
        "messages_sent_total",
        "counter",
        "PUBLISH packets sent to clients, by QoS.",
        &[
            ("qos=\"0\"", s.sent_by_qos[0]),
            ("qos=\"1\"", s.sent_by_qos[1]),
            ("qos=\"2\"", s.sent_by_qos[2]),
        ],
    );
    metric(
        "messages_dropped_total",
        "counter",
        "Messages not delivered, by reason.",
        &[
            ("reason=\"qos0_queue_full\"", s.dropped_qos0_queue_full),
            (
                "reason=\"offline_queue_full\"",
                s.dropped_offline_queue_full,
            ),
            ("reason=\"expired\"", s.dropped_expired),
            (
                "reason=\"too_large_for_client\"",
                s.dropped_too_large_for_client,
            ),
            ("reason=\"not_authorized\"", s.dropped_not_authorized),
            ("reason=\"log_failed\"", s.refused_log_failed),
        ],
    );
    metric(
        "publishers_paused_total",
        "counter",
        "Times a publisher was paused because a subscriber's queue was full.",
        &[("", s.publishers_paused)],
    );
    metric(
        "outbox_records",
        "gauge",
        "Messages in the outbox, waiting for the cloud.",
        &[("", s.outbox_records)],
    );
    metric(
        "outbox_bytes",
        "gauge",
        "Bytes in the outbox (topic, payload and bookkeeping), against max_outbox_bytes.",
        &[("", s.outbox_bytes)],
    );
    metric(
        "outbox_rejected_total",
        "counter",
        "Messages for the cloud refused because the outbox was full (reject_new).",
        &[("", s.outbox_rejected)],
    );
    metric(
        "outbox_dropped_total",
        "counter",
        "Records deleted from the full outbox to make room (drop_oldest).",
        &[("", s.outbox_dropped)],
    );
    metric(
        "store_commits_total",
        "counter",
        "Storage commits (each one fsync when fsync is on).",
        &[("", c.commits)],
    );
    let _ = writeln!(
        out,
        "# HELP ferry_edge_store_commit_seconds Time spent in storage commits.\n# TYPE ferry_edge_store_commit_seconds summary\nferry_edge_store_commit_seconds_sum {}\nferry_edge_store_commit_seconds_count {}",
        c.total.as_secs_f64(),
        c.commits
    );
    let _ = writeln!(
        out,
        "# HELP ferry_edge_store_commit_seconds_max Longest storage commit since start.\n# TYPE ferry_edge_store_commit_seconds_max gauge\nferry_edge_store_commit_seconds_max {}",
        c.max.as_secs_f64()
    );
    out
}

/// `/api/link`: the outbox and the link as one JSON document.
#[cfg(feature = "edge")]
fn link_json(
    s: &Stats,
    oldest_age: Duration,
    link: Option<ferry_bridge::edge_dialer::LinkStats>,
) -> String {
    let mut out = format!(
        "{{\"outbox\":{{\"records\":{},\"bytes\":{},\"oldest_age_secs\":{:.3},\"rejected\":{},\"dropped\":{}}},\"link\":",
        s.outbox_records,
        s.outbox_bytes,
        oldest_age.as_secs_f64(),
        s.outbox_rejected,
        s.outbox_dropped
    );
    match link {
        None => out.push_str("null}"),
        Some(l) => {
            let _ = write!(
                out,
                "{{\"state\":\"{}\",\"connects\":{},\"records_sent\":{},\"records_acked\":{},\"batch_bytes_sent\":{},\"last_ack_unix_ms\":{},\"down_applied\":{}}}}}",
                l.state.name(),
                l.connects,
                l.records_sent,
                l.records_acked,
                l.batch_bytes_sent,
                l.last_ack_unix_ms,
                l.down_applied
            );
        }
    }
    out
}

/// The link's metrics (`[uplink] cloud` set).
#[cfg(feature = "edge")]
pub fn render_link(l: &ferry_bridge::edge_dialer::LinkStats) -> String {
    use ferry_bridge::edge_dialer::LinkState;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# HELP ferry_edge_link_state 1 for the link's current state.\n# TYPE ferry_edge_link_state gauge"
    );
    for state in [
        LinkState::Down,
        LinkState::Connecting,
        LinkState::Up,
        LinkState::Stalled,
    ] {
        let _ = writeln!(
            out,
            "ferry_edge_link_state{{state=\"{}\"}} {}",
            state.name(),
            u8::from(l.state == state)
        );
    }
    for (name, help, value) in [
        ("link_connects_total", "Links established.", l.connects),
        (
            "link_failed_attempts_total",
            "Connection attempts that ended before the cloud welcomed the link (no answer, TLS, denied).",
            l.failed_attempts,
        ),
        (
            "link_batches_sent_total",
            "Record batches sent.",
            l.batches_sent,
        ),
        (
            "link_records_sent_total",
            "Records sent (resends count again).",
            l.records_sent,
        ),
        (
            "link_batch_bytes_sent_total",
            "Bytes of BATCH frames sent (compressed records and framing).",
            l.batch_bytes_sent,
        ),
        (
            "link_records_acked_total",
            "Records the cloud acknowledged as durable (its rate is the drain rate).",
            l.records_acked,
        ),
    ] {
        let _ = writeln!(
            out,
            "# HELP ferry_edge_{name} {help}\n# TYPE ferry_edge_{name} counter\nferry_edge_{name} {value}"
        );
    }
    let _ = writeln!(
        out,
        "# HELP ferry_edge_link_last_ack_timestamp_seconds When the cloud last acknowledged records (0: never).\n# TYPE ferry_edge_link_last_ack_timestamp_seconds gauge\nferry_edge_link_last_ack_timestamp_seconds {}",
        l.last_ack_unix_ms as f64 / 1000.0
    );
    out
}

/// The field sources' figures, one series per source (label `source`).
#[cfg(feature = "field")]
fn render_field(sources: &[crate::field::stats::SourceSnapshot]) -> String {
    let mut out = String::new();
    if sources.is_empty() {
        return out;
    }
    type Get = fn(&crate::field::stats::SourceSnapshot) -> f64;
    let series: [(&str, &str, &str, Get); 9] = [
        (
            "ferry_edge_field_reads_total",
            "counter",
            "Readings taken (frames, polls that answered).",
            |s| s.reads as f64,
        ),
        (
            "ferry_edge_field_errors_total",
            "counter",
            "Failed reads: no answer, an exception, a bad frame, a line that cannot be opened.",
            |s| s.errors as f64,
        ),
        (
            "ferry_edge_field_published_total",
            "counter",
            "Messages the broker took from the source.",
            |s| s.published as f64,
        ),
        (
            "ferry_edge_field_dropped_total",
            "counter",
            "Messages refused by the broker (outbox full, ACL) or over max_per_sec.",
            |s| s.dropped as f64,
        ),
        (
            "ferry_edge_field_writes_total",
            "counter",
            "Commands written to the device.",
            |s| s.writes as f64,
        ),
        (
            "ferry_edge_field_writes_failed_total",
            "counter",
            "Commands refused or failed.",
            |s| s.writes_failed as f64,
        ),
        (
            "ferry_edge_field_up",
            "gauge",
            "1 while the device answers.",
            |s| f64::from(u8::from(s.up)),
        ),
        (
            "ferry_edge_field_last_success_seconds",
            "gauge",
            "When the last read succeeded (Unix time; 0: never).",
            |s| s.last_success_ms as f64 / 1000.0,
        ),
        (
            "ferry_edge_field_read_latency_seconds",
            "gauge",
            "How long the last successful read took.",
            |s| s.last_latency_us as f64 / 1e6,
        ),
    ];
    for (name, kind, help, get) in series {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for s in sources {
            let _ = writeln!(
                out,
                "{name}{{source=\"{}\",kind=\"{}\"}} {}",
                s.name,
                s.kind,
                get(s)
            );
        }
    }
    out
}
