//! The admin HTTP listener (`[admin] listen`): a read-only JSON API and Prometheus metrics.
//!
//! | path | answer |
//! |---|---|
//! | `GET /api/health` | `{"status":"ok"}` while the node serves; 503 once its storage failed |
//! | `GET /api/streams` | every stream: per partition its offsets, bytes, segments |
//! | `GET /api/clients` | MQTT connections and sessions (counts), and each connected client: id, username, protocol level, persistent, queued bytes, subscriptions |
//! | `GET /api/edges` | every edge that sent data or is linked: its highest committed sequence per priority class, and its live link (remote address, certificate serial, records and bytes taken, last acknowledgement) |
//! | `GET /api/fleet` | every edge linked or refused since the start, or known to the metadata: state (linked, offline, denied) and since when, last contact, certificate serial and expiry, the live link, the outbox as the edge told it (records, bytes, budget, oldest age, inflow counter, refused and dropped, clients), rates (inflow, sent, drain), an estimate of an offline edge's backlog, whether its backlog grows or nears its budget, an hour of points; and counts |
//! | `GET /api/fleet/<edge>` | one edge as above, with its link events, committed sequence per class and full history (30 s samples); 404 if unknown |
//! | `GET /api/cluster` | on the object backend: this node's name and every node whose lease has not run out (name, addresses of its fronts, when it registered, lease left); 404 on the local log |
//! | `GET /api/amqp` | with `[amqp]`: connections (user, vhost, channels, consumers, unacked), queues (ready, ready bytes, unacked, consumers, deliveries and settlements since start), exchanges, bindings; refreshed about once a second |
//! | `GET /metrics` | the MQTT front's metrics, the log's (appends, bytes, sync latency) and each partition's offsets; with `[amqp]`, `ferry_cloud_amqp_connections`, `ferry_cloud_amqp_channels`, `ferry_cloud_amqp_published_total` and per queue `ferry_cloud_amqp_queue_{ready,ready_bytes,unacked,consumers,delivered_total,settled_total}`; with `[link]`, `ferry_cloud_link_edges` and per linked edge `ferry_cloud_link_records_total`, `ferry_cloud_link_batch_bytes_total`, `ferry_cloud_link_last_ack_timestamp_ms` |

use std::fmt::Write as _;
use std::net::SocketAddr;

use ferry_edge::metrics::{render, serve_http, Response};
use serde_json::json;

use crate::node::Node;

/// Serves the admin API on `addr` until the process ends; returns the bound address.
pub async fn serve(addr: SocketAddr, node: Node) -> std::io::Result<SocketAddr> {
    serve_http(addr, move |path| {
        let node = node.clone();
        async move { answer(&node, &path).await }
    })
    .await
}

async fn answer(node: &Node, path: &str) -> Response {
    match path {
        "/api/health" => match node.mqtt.metrics().await {
            Some(_) => Response::json(json!({"status": "ok"}).to_string()),
            None => Response::status("503 Service Unavailable"),
        },
        "/api/streams" => {
            let streams: Vec<_> = node
                .log
                .streams()
                .into_iter()
                .map(|s| {
                    let partitions: Vec<_> = s
                        .partitions
                        .iter()
                        .enumerate()
                        .map(|(i, p)| {
                            json!({
                                "partition": i,
                                "log_start_offset": p.offsets.log_start,
                                "high_watermark": p.offsets.high_watermark,
                                "bytes": p.bytes,
                                "segments": p.segments,
                            })
                        })
                        .collect();
                    json!({"name": s.name, "partitions": partitions})
                })
                .collect();
            Response::json(json!({ "streams": streams }).to_string())
        }
        "/api/clients" => match (node.mqtt.stats().await, node.mqtt.clients().await) {
            (Some(s), Some(clients)) => {
                let clients: Vec<_> = clients
                    .into_iter()
                    .map(|c| {
                        json!({
                            "client_id": c.client_id,
                            "username": c.username,
                            "protocol_level": c.protocol_level,
                            "persistent": c.persistent,
                            "queued_bytes": c.queued_bytes,
                            "subscriptions": c.subscriptions,
                        })
                    })
                    .collect();
                Response::json(json!({"connections": s.connections, "sessions": s.sessions, "clients": clients}).to_string())
            }
            _ => Response::status("503 Service Unavailable"),
        },
        "/api/edges" => match node.meta.edges() {
            Ok(committed) => {
                let links = node.link.as_ref().map(|l| l.edges()).unwrap_or_default();
                let mut ids: Vec<&str> = committed.iter().map(|(id, _, _)| id.as_str()).collect();
                ids.extend(links.iter().map(|l| l.edge_id.as_str()));
                ids.sort_unstable();
                ids.dedup();
                let edges: Vec<_> = ids
                    .into_iter()
                    .map(|id| {
                        let classes: Vec<_> = committed
                            .iter()
                            .filter(|(e, _, _)| e == id)
                            .map(|(_, class, seq)| json!({"class": class, "committed_seq": seq}))
                            .collect();
                        let link = links.iter().find(|l| l.edge_id == id).map(|l| {
                            json!({
                                "remote": l.remote.to_string(),
                                "serial": l.serial,
                                "software": l.software,
                                "since_unix_ms": l.since_unix_ms,
                                "records": l.records,
                                "batch_bytes": l.batch_bytes,
                                "last_ack_unix_ms": l.last_ack_unix_ms,
                            })
                        });
                        json!({"edge": id, "connected": link.is_some(), "link": link, "committed": classes})
                    })
                    .collect();
                Response::json(json!({ "edges": edges }).to_string())
            }
            Err(_) => Response::status("500 Internal Server Error"),
        },
        "/api/fleet" => match node.meta.edges() {
            Ok(known) => Response::json(
                crate::fleet::list(node.link.as_deref(), &known, now_ms()).to_string(),
            ),
            Err(_) => Response::status("500 Internal Server Error"),
        },
        p if p.starts_with("/api/fleet/") => match node.meta.edges() {
            Ok(known) => {
                let edge = &p["/api/fleet/".len()..];
                match crate::fleet::one(node.link.as_deref(), &known, edge, now_ms()) {
                    Some(v) => Response::json(v.to_string()),
                    None => Response::status("404 Not Found"),
                }
            }
            Err(_) => Response::status("500 Internal Server Error"),
        },
        "/api/cluster" => match node.object.clone() {
            Some(object) => match tokio::task::spawn_blocking(move || object.members()).await {
                Ok(Ok(members)) => {
                    let me = node.object.as_ref().map(|o| o.node().to_owned());
                    Response::json(json!({ "node": me, "nodes": members }).to_string())
                }
                _ => Response::status("503 Service Unavailable"),
            },
            None => Response::status("404 Not Found"),
        },
        "/api/amqp" => match &node.amqp {
            Some(a) => match serde_json::to_string(&a.overview()) {
                Ok(body) => Response::json(body),
                Err(_) => Response::status("500 Internal Server Error"),
            },
            None => Response::status("404 Not Found"),
        },
        "/metrics" => {
            let Some((stats, commits)) = node.mqtt.metrics().await else {
                return Response::status("503 Service Unavailable");
            };
            let mut page = render(&stats, &commits);
            page.push_str(&render_log(node));
            if let Some(link) = &node.link {
                page.push_str(&render_link(&link.edges()));
            }
            if let Some(amqp) = &node.amqp {
                page.push_str(&render_amqp(&amqp.overview()));
            }
            Response::metrics(page)
        }
        _ => Response::status("404 Not Found"),
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The AMQP front's part of `/metrics`.
fn render_amqp(o: &crate::amqp::Overview) -> String {
    let mut out = String::new();
    let channels: usize = o.connections.iter().map(|c| c.channels).sum();
    for (name, kind, help, value) in [
        (
            "ferry_cloud_amqp_connections",
            "gauge",
            "AMQP connections open.",
            o.connections.len() as u64,
        ),
        (
            "ferry_cloud_amqp_channels",
            "gauge",
            "AMQP channels open.",
            channels as u64,
        ),
        (
            "ferry_cloud_amqp_published_total",
            "counter",
            "Messages AMQP clients published.",
            o.published_total,
        ),
    ] {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
        );
    }
    type Field = fn(&crate::amqp::QueueInfo) -> u64;
    let fields: [(&str, &str, &str, Field); 6] = [
        ("ready", "gauge", "Messages waiting for a consumer.", |q| {
            q.ready
        }),
        (
            "ready_bytes",
            "gauge",
            "Bytes of the messages waiting for a consumer.",
            |q| q.ready_bytes,
        ),
        (
            "unacked",
            "gauge",
            "Deliveries waiting for an acknowledgement.",
            |q| q.unacked,
        ),
        ("consumers", "gauge", "Consumers.", |q| q.consumers),
        (
            "delivered_total",
            "counter",
            "Deliveries since the node started.",
            |q| q.delivered_total,
        ),
        (
            "settled_total",
            "counter",
            "Messages acknowledged, dropped or expired since the node started.",
            |q| q.settled_total,
        ),
    ];
    for (field, kind, help, value) in fields {
        let name = format!("ferry_cloud_amqp_queue_{field}");
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for q in &o.queues {
            let esc = |s: &str| s.replace('\\', "\\\\").replace('"', "\\\"");
            let _ = writeln!(
                out,
                "{name}{{vhost=\"{}\",queue=\"{}\"}} {}",
                esc(&q.vhost),
                esc(&q.name),
                value(q)
            );
        }
    }
    out
}

/// The link listener's metrics: edges connected, and per linked edge what it sent.
fn render_link(edges: &[ferry_bridge::cloud_listener::EdgeLink]) -> String {
    let mut out = format!(
        "# HELP ferry_cloud_link_edges Edges linked now.\n# TYPE ferry_cloud_link_edges gauge\nferry_cloud_link_edges {}\n",
        edges.len()
    );
    for (name, help, value) in [
        (
            "ferry_cloud_link_records_total",
            "Records an edge's current link delivered and the cloud acknowledged.",
            (|e: &ferry_bridge::cloud_listener::EdgeLink| e.records)
                as fn(&ferry_bridge::cloud_listener::EdgeLink) -> u64,
        ),
        (
            "ferry_cloud_link_batch_bytes_total",
            "Bytes of record batches an edge's current link delivered.",
            |e| e.batch_bytes,
        ),
        (
            "ferry_cloud_link_last_ack_timestamp_ms",
            "When the cloud last acknowledged an edge's records (ms since the Unix epoch).",
            |e| e.last_ack_unix_ms,
        ),
    ] {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
        for e in edges {
            let edge = e.edge_id.replace('\\', "\\\\").replace('"', "\\\"");
            let _ = writeln!(out, "{name}{{edge=\"{edge}\"}} {}", value(e));
        }
    }
    out
}

fn render_log(node: &Node) -> String {
    let s = node.log.stats();
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, value: u64| {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
        );
    };
    metric(
        "ferry_log_commits_total",
        "counter",
        "Group commits of the log (one sync per partition file each).",
        s.commits,
    );
    metric(
        "ferry_log_records_total",
        "counter",
        "Records appended to the log.",
        s.records,
    );
    metric(
        "ferry_log_bytes_total",
        "counter",
        "Bytes of record batches appended to the log.",
        s.bytes,
    );
    metric(
        "ferry_log_sync_micros_total",
        "counter",
        "Microseconds spent syncing log files.",
        s.sync_us_total,
    );
    metric(
        "ferry_log_sync_max_micros",
        "gauge",
        "Longest sync of one commit, in microseconds.",
        s.sync_us_max,
    );
    let _ = writeln!(out, "# HELP ferry_log_high_watermark The next offset of each partition.\n# TYPE ferry_log_high_watermark gauge");
    let streams = node.log.streams();
    for st in &streams {
        for (i, p) in st.partitions.iter().enumerate() {
            let _ = writeln!(
                out,
                "ferry_log_high_watermark{{stream=\"{}\",partition=\"{i}\"}} {}",
                st.name, p.offsets.high_watermark
            );
        }
    }
    let _ = writeln!(
        out,
        "# HELP ferry_log_size_bytes Bytes kept per partition.\n# TYPE ferry_log_size_bytes gauge"
    );
    for st in &streams {
        for (i, p) in st.partitions.iter().enumerate() {
            let _ = writeln!(
                out,
                "ferry_log_size_bytes{{stream=\"{}\",partition=\"{i}\"}} {}",
                st.name, p.bytes
            );
        }
    }
    out
}
