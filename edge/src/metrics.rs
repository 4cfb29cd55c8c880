//! Prometheus metrics over HTTP: `GET /metrics` in the text exposition format.
//!
//! The need is one fixed page, so the listener answers it directly rather than carrying an
//! HTTP framework: it reads the request head (at most [`MAX_REQUEST_BYTES`]), answers
//! `/metrics` with 200 and anything else with 404, and closes the connection.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tracing::{debug, info};

use crate::broker::Stats;
use crate::server::{CommitStats, Server};

/// A request head longer than this is refused: the page needs only a request line.
const MAX_REQUEST_BYTES: usize = 8 * 1024;

/// Serves metrics on `addr` until the process ends; returns the bound address.
pub async fn serve(addr: SocketAddr, server: Server) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    info!(addr = %local, "metrics on http://{local}/metrics");
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, peer)) = listener.accept().await else {
                continue;
            };
            let server = server.clone();
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
                    debug!(%peer, "metrics request incomplete");
                    return;
                }
                let line = head.split(|&b| b == b'\r').next().unwrap_or_default();
                let response = if line.starts_with(b"GET /metrics ") || line == b"GET /metrics" {
                    match server.metrics().await {
                        Some((stats, commits)) => ok(&render(&stats, &commits)),
                        None => status("503 Service Unavailable"),
                    }
                } else {
                    status("404 Not Found")
                };
                let _ = stream.write_all(response.as_bytes()).await;
                let _ = stream.shutdown().await;
            });
        }
    });
    Ok(local)
}

fn ok(body: &str) -> String {
    format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

fn status(code: &str) -> String {
    format!("HTTP/1.1 {code}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
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
        ],
    );
    metric(
        "publishers_paused_total",
        "counter",
        "Times a publisher was paused because a subscriber's queue was full.",
        &[("", s.publishers_paused)],
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
