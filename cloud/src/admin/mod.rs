//! The admin HTTP listener (`[admin] listen`): the console, a JSON API, the admins'
//! actions and Prometheus metrics, behind users and roles ([`sessions`], over [`http`];
//! `docs/console.md`).
//!
//! | path | answer |
//! |---|---|
//! | `GET /` | the console (one page; it asks for a login when one is needed) |
//! | `POST /api/login`, `GET /api/session`, `POST /api/logout` | a session: its cookie and CSRF token |
//! | `POST /api/fleet/<edge>/{deny,allow,command}` | the admins' actions on an edge |
//! | `GET /api/consumers` | every reader of the log and its lag: Kafka groups per partition (with their state and members), the MQTT front's delivery cursor and its persistent sessions (queued, in flight, offline for, expires in), each edge's downlink, AMQP queues |
//! | `POST /api/consumers/kafka/<group>/reset` | an admin moves a group without members to the earliest or latest offsets |
//! | `GET /api/health` | `{"status":"ok"}` while the node serves; 503 once its storage failed |
//! | `GET /api/ready` | `{"status":"ready"}` while the node serves and, on the object backend, is registered among the nodes (its lease renewed: PostgreSQL reachable); 503 otherwise. Open, as `/api/health` is, for probes |
//! | `GET /api/streams` | every stream: its retention (ms, bytes; null: none) and per partition its offsets, bytes, segments |
//! | `GET /api/clients` | MQTT connections and sessions (counts), and each connected client: id, username, protocol level, persistent, queued bytes, subscriptions |
//! | `GET /api/edges` | every edge that sent data or is linked: its highest committed sequence per priority class, and its live link (remote address, certificate serial, records and bytes taken, last acknowledgement) |
//! | `GET /api/fleet` | every edge linked or refused since the start, or known to the metadata: state (linked, offline, denied) and since when, last contact, certificate serial and expiry, the live link, the outbox as the edge told it (records, bytes, budget, oldest age, inflow counter, refused and dropped, clients), rates (inflow, sent, drain), an estimate of an offline edge's backlog, whether its backlog grows or nears its budget, an hour of points; and counts |
//! | `GET /api/fleet/<edge>` | one edge as above, with its link events, committed sequence per class and full history (30 s samples); 404 if unknown |
//! | `GET /api/fleet/<edge>` | one edge: as in the list, with its link events, committed sequence per class, full history, and its downlink (acknowledged sequence, messages waiting for it) |
//! | `GET /api/fleet/<edge>/peek` | the last 20 messages the edge sent among the last 2,000 records of each partition: stream, partition, offset, topic, size, time (no payloads) |
//! | `GET /api/cluster` | on the object backend: this node's name, every node whose lease has not run out (name, addresses of its fronts, when it registered, lease left) and every lease held now (`kind`: `kafka-group` or `edge-link`, `key`, `owner`, `token`, `left_ms`); 404 on the local log |
//! | `GET /api/amqp` | with `[amqp]`: connections (user, vhost, channels, consumers, unacked), queues (ready, ready bytes, unacked, consumers, deliveries and settlements since start), exchanges, bindings; refreshed about once a second |
//! | `GET /metrics` | the MQTT front's metrics, the log's (appends, bytes, sync latency) and each partition's offsets; with `[amqp]`, `ferry_cloud_amqp_connections`, `ferry_cloud_amqp_channels`, `ferry_cloud_amqp_published_total` and per queue `ferry_cloud_amqp_queue_{ready,ready_bytes,unacked,consumers,delivered_total,settled_total}`; with `[link]`, `ferry_cloud_link_edges` and per linked edge `ferry_cloud_link_records_total`, `ferry_cloud_link_batch_bytes_total`, `ferry_cloud_link_last_ack_timestamp_ms` |

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use ferry_edge::auth::Auth;
use ferry_edge::metrics::{render, Response};
use hyper::header::SET_COOKIE;
use hyper::{Method, StatusCode};
use serde_json::json;

use crate::config::AdminConfig;
use crate::node::Node;
use http::{Reply, Request};
use sessions::{LoginError, Principal, Role, Sessions};

pub mod consumers;
pub mod http;
pub mod sessions;

/// The session cookie.
const COOKIE: &str = "ferry_session";
/// The header a browser's `POST` carries its session's CSRF token in.
const CSRF_HEADER: &str = "x-ferry-csrf";
/// The console: one page, its script and styles inline, reading `/api/`.
const CONSOLE_HTML: &str = include_str!("console.html");

/// Why the admin listener could not start.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error(
        "the admin listener on {0} has no users: set [admin] admins or viewers (users of the \
         password file), or listen on a loopback address"
    )]
    Open(SocketAddr),
    #[error(
        "[admin] has admins or viewers but no password file ([admin] or [auth] password_file)"
    )]
    NoPasswords,
    #[error("the admin listener's password file: {0}")]
    Passwords(#[from] ferry_edge::auth::AuthError),
    #[error("the admin listener's TLS: {0}")]
    Tls(String),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// The admin listener.
struct Admin {
    node: Node,
    sessions: Mutex<Sessions>,
    /// Over TLS: the cookie is `Secure`.
    secure: bool,
    session_secs: u64,
}

impl Admin {
    fn sessions(&self) -> std::sync::MutexGuard<'_, Sessions> {
        self.sessions.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Serves an admin listener without users on `addr` (a loopback address: open to look,
/// closed to act), as `ferry-cloud demo` and the tests run it.
pub async fn serve_local(addr: SocketAddr, node: Node) -> Result<SocketAddr, AdminError> {
    let config = AdminConfig {
        listen: Some(addr),
        ..AdminConfig::default()
    };
    serve(&config, None, node).await
}

/// Serves the admin listener of `config` until the process ends; returns the bound address.
/// Users come from `[admin] password_file`, or else `passwords` (`[auth] password_file`).
pub async fn serve(
    config: &AdminConfig,
    passwords: Option<&Path>,
    node: Node,
) -> Result<SocketAddr, AdminError> {
    let addr = config
        .listen
        .unwrap_or(SocketAddr::from(([127, 0, 0, 1], 9102)));
    let users = !config.admins.is_empty() || !config.viewers.is_empty();
    let sessions = if users {
        let file = config
            .password_file
            .as_deref()
            .or(passwords)
            .ok_or(AdminError::NoPasswords)?;
        Sessions::new(
            Auth::load(Some(file), None, false)?,
            config.admins.iter().cloned(),
            config.viewers.iter().cloned(),
            Duration::from_secs(config.session_secs.max(60)),
        )
    } else if addr.ip().is_loopback() {
        Sessions::off()
    } else {
        return Err(AdminError::Open(addr));
    };
    let tls = match &config.tls {
        Some(t) => Some(
            ferry_edge::server::tls::acceptor(&ferry_edge::config::TlsConfig {
                listen: Vec::new(),
                cert_file: t.cert_file.clone(),
                key_file: t.key_file.clone(),
                client_ca_file: None,
                use_identity_as_username: false,
            })
            .map_err(|e| AdminError::Tls(e.to_string()))?,
        ),
        None => None,
    };
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| AdminError::Bind { addr, source })?;
    let local = listener
        .local_addr()
        .map_err(|source| AdminError::Bind { addr, source })?;
    let scheme = if tls.is_some() { "https" } else { "http" };
    tracing::info!(addr = %local, users, "admin listener on {scheme}://{local}/");
    let admin = Arc::new(Admin {
        node,
        sessions: Mutex::new(sessions),
        secure: tls.is_some(),
        session_secs: config.session_secs.max(60),
    });
    http::serve(listener, tls, move |req| {
        let admin = admin.clone();
        async move { handle(&admin, req).await }
    });
    Ok(local)
}

async fn handle(admin: &Admin, req: Request) -> Reply {
    let now = now_ms();
    // For load balancers and liveness and readiness probes: tell only whether the node
    // serves (and is one of its cluster).
    if req.path == "/api/health" || req.path == "/api/ready" {
        return answer(&admin.node, &req.path).await.into();
    }
    let basic = basic_credentials(&req);
    let principal = admin.sessions().principal(
        req.cookie(COOKIE),
        basic.as_ref().map(|(u, p)| (u.as_str(), p.as_str())),
        now,
    );
    match (&req.method, req.path.as_str()) {
        (&Method::GET, "/") => Reply::new(StatusCode::OK, "text/html; charset=utf-8", CONSOLE_HTML),
        (&Method::GET, "/api/session") => session(admin, &principal),
        (&Method::POST, "/api/login") => login(admin, &req, now),
        (&Method::POST, "/api/logout") => {
            if let Err(refused) = may_post(&principal, &req, None) {
                return refused;
            }
            if let Some(token) = req.cookie(COOKIE) {
                admin.sessions().logout(token);
            }
            Reply::json(StatusCode::OK, &json!({})).with(SET_COOKIE, &cookie(admin, "", 0))
        }
        (&Method::GET, path) if principal.may_view() => answer(&admin.node, path).await.into(),
        (&Method::GET, _) => Reply::error(StatusCode::UNAUTHORIZED, "log in first"),
        (&Method::POST, path) => match may_post(&principal, &req, Some(Role::Admin)) {
            Ok(()) => act(admin, path, &req).await,
            Err(refused) => refused,
        },
        _ => Reply::error(StatusCode::METHOD_NOT_ALLOWED, "GET or POST"),
    }
}

/// `GET /api/session`: who is logged in, with which role, and the CSRF token of the
/// session (`user` and `role` null when no one is); whether logging in is possible
/// (`auth`), and whether the node is one of a cluster (`cluster`: `/api/cluster` has its
/// nodes).
fn session(admin: &Admin, p: &Principal) -> Reply {
    let auth = admin.sessions().is_on();
    let cluster = admin.node.object.is_some();
    Reply::json(
        StatusCode::OK,
        &json!({"auth": auth, "cluster": cluster, "user": p.user, "role": p.role.map(Role::name), "csrf": p.csrf}),
    )
}

/// `POST /api/login` with `{"username": …, "password": …}` (JSON, or a form): a session
/// cookie and `{"user", "role", "csrf"}`.
fn login(admin: &Admin, req: &Request, now: u64) -> Reply {
    let Some((user, password)) = credentials_of(req) else {
        return Reply::error(StatusCode::BAD_REQUEST, "username and password needed");
    };
    let random = || {
        let mut b = [0u8; 32];
        // Without the kernel's random numbers no session can be safe: none is made.
        if getrandom::fill(&mut b).is_err() {
            return String::new();
        }
        b.iter().map(|x| format!("{x:02x}")).collect()
    };
    let result = admin.sessions().login(&user, &password, now, random);
    match result {
        Ok((token, _)) if token.is_empty() => {
            Reply::error(StatusCode::SERVICE_UNAVAILABLE, "no random numbers")
        }
        Ok((token, p)) => Reply::json(
            StatusCode::OK,
            &json!({"user": p.user, "role": p.role.map(Role::name), "csrf": p.csrf}),
        )
        .with(SET_COOKIE, &cookie(admin, &token, admin.session_secs)),
        Err(e @ LoginError::Throttled) => {
            Reply::error(StatusCode::TOO_MANY_REQUESTS, &e.to_string())
        }
        Err(e @ LoginError::Off) => Reply::error(StatusCode::CONFLICT, &e.to_string()),
        Err(e @ LoginError::Wrong) => {
            tracing::warn!(user = %user, "admin login refused");
            Reply::error(StatusCode::UNAUTHORIZED, &e.to_string())
        }
    }
}

fn cookie(admin: &Admin, token: &str, max_age: u64) -> String {
    let secure = if admin.secure { "; Secure" } else { "" };
    format!("{COOKIE}={token}; Path=/; HttpOnly; SameSite=Strict; Max-Age={max_age}{secure}")
}

/// The user name and password of a login: a JSON object or a urlencoded form.
fn credentials_of(req: &Request) -> Option<(String, String)> {
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&req.body) {
        let get = |k: &str| v.get(k).and_then(|x| x.as_str()).map(str::to_owned);
        return Some((get("username")?, get("password")?));
    }
    let form = std::str::from_utf8(&req.body).ok()?;
    let field = |k: &str| {
        form.split('&')
            .filter_map(|kv| kv.split_once('='))
            .find(|(name, _)| *name == k)
            .map(|(_, v)| percent_decode(v))
    };
    Some((field("username")??, field("password")??))
}

/// `application/x-www-form-urlencoded` decoding of one value; None if it is not UTF-8.
fn percent_decode(v: &str) -> Option<String> {
    let bytes = v.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).ok()
}

/// `Authorization: Basic …` as (user, password).
fn basic_credentials(req: &Request) -> Option<(String, String)> {
    let encoded = req.header("authorization")?.strip_prefix("Basic ")?;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (user, password) = text.split_once(':')?;
    Some((user.to_owned(), password.to_owned()))
}

/// Whether `p` may make this `POST`: with `role` if one is needed; from a browser's
/// session only with the session's CSRF token in [`CSRF_HEADER`]; with HTTP Basic only
/// from a script (no `Origin`: a browser sends one with every cross-site `POST`).
fn may_post(p: &Principal, req: &Request, role: Option<Role>) -> Result<(), Reply> {
    if p.user.is_none() {
        return Err(Reply::error(
            StatusCode::FORBIDDEN,
            "actions need a login with the admin role",
        ));
    }
    if role.is_some_and(|r| p.role != Some(r)) {
        return Err(Reply::error(
            StatusCode::FORBIDDEN,
            "the admin role is needed",
        ));
    }
    let ok = match &p.csrf {
        Some(csrf) => req
            .header(CSRF_HEADER)
            .is_some_and(|given| constant_time_eq(given.as_bytes(), csrf.as_bytes())),
        None => req.header("origin").is_none(),
    };
    if ok {
        Ok(())
    } else {
        Err(Reply::error(
            StatusCode::FORBIDDEN,
            "missing or wrong CSRF token",
        ))
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The admin's actions (`POST`, admin role; `docs/console.md`):
/// `/api/fleet/<edge>/deny`, `/api/fleet/<edge>/allow`, `/api/fleet/<edge>/command` and
/// `/api/consumers/kafka/<group>/reset`.
async fn act(admin: &Admin, path: &str, req: &Request) -> Reply {
    let node = &admin.node;
    if let Some(group) = path
        .strip_prefix("/api/consumers/kafka/")
        .and_then(|rest| rest.strip_suffix("/reset"))
    {
        return consumers::reset(node, group, &req.body);
    }
    let Some(rest) = path.strip_prefix("/api/fleet/") else {
        return Reply::error(StatusCode::NOT_FOUND, &format!("no action at {path}"));
    };
    let Some((edge, action)) = rest.split_once('/') else {
        return Reply::error(StatusCode::NOT_FOUND, &format!("no action at {path}"));
    };
    let Some(link) = node.link.as_deref() else {
        return Reply::error(StatusCode::CONFLICT, "the link is off ([link] is not set)");
    };
    let known = node.meta.edges().unwrap_or_default();
    let record = link.fleet_edge(edge);
    if record.is_none() && !known.iter().any(|(e, _, _)| e == edge) {
        return Reply::error(StatusCode::NOT_FOUND, &format!("no edge {edge:?} is known"));
    }
    let who = admin_name(req);
    match action {
        "deny" | "allow" => {
            let serial = record.map(|r| r.serial).unwrap_or_default();
            let names: Vec<&str> = [edge, serial.as_str()]
                .into_iter()
                .filter(|n| !n.is_empty())
                .collect();
            match link.set_denied(&names, action == "deny") {
                Ok(entries) => {
                    tracing::warn!(edge, action, by = %who, "deny list changed from the console");
                    Reply::json(
                        StatusCode::OK,
                        &json!({"edge": edge, "denied": action == "deny", "entries": entries}),
                    )
                }
                Err(e @ ferry_bridge::cloud_listener::DenyEditError::NoFile) => {
                    Reply::error(StatusCode::CONFLICT, &e.to_string())
                }
                Err(e) => Reply::error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
            }
        }
        "command" => command(node, edge, req).await,
        _ => Reply::error(StatusCode::NOT_FOUND, &format!("no action at {path}")),
    }
}

/// Who acts, for the log.
fn admin_name(req: &Request) -> String {
    basic_credentials(req).map_or_else(|| "a session".to_owned(), |(u, _)| u)
}

/// `POST /api/fleet/<edge>/command` with `{"topic", "payload", "qos" (default 1),
/// "retain" (default false)}`: a message for the edge, appended to the downlink as an MQTT
/// publish to `$edge/<edge>/<topic>` would be, and published on the edge under `<topic>`
/// once it has it.
async fn command(node: &Node, edge: &str, req: &Request) -> Reply {
    let Ok(body) = serde_json::from_slice::<serde_json::Value>(&req.body) else {
        return Reply::error(StatusCode::BAD_REQUEST, "a JSON object is needed");
    };
    let Some(topic) = body["topic"].as_str() else {
        return Reply::error(StatusCode::BAD_REQUEST, "topic is needed");
    };
    let payload = bytes::Bytes::from(body["payload"].as_str().unwrap_or_default().to_owned());
    let qos = match body["qos"].as_u64().unwrap_or(1) {
        0 => ferry_protocol::mqtt::QoS::AtMostOnce,
        1 => ferry_protocol::mqtt::QoS::AtLeastOnce,
        2 => ferry_protocol::mqtt::QoS::ExactlyOnce,
        _ => return Reply::error(StatusCode::BAD_REQUEST, "qos is 0, 1 or 2"),
    };
    let full = format!("{}{edge}/{topic}", crate::routes::DOWNLINK_PREFIX);
    let Ok(name) = ferry_protocol::topic::TopicName::new(full) else {
        return Reply::error(StatusCode::BAD_REQUEST, "not an MQTT topic name");
    };
    if topic.is_empty() {
        return Reply::error(StatusCode::BAD_REQUEST, "topic is empty");
    }
    let properties = ferry_protocol::mqtt::Properties::default();
    let record = crate::routes::to_record(&crate::routes::MqttMessage {
        topic: &name,
        payload: &payload,
        qos,
        retain: body["retain"].as_bool().unwrap_or(false),
        properties: &properties,
        edge: None,
        timestamp_ms: now_ms() as i64,
    });
    let appended = node
        .log
        .append(
            crate::routes::DOWNLINK_STREAM,
            0,
            crate::log::AppendData::Records(vec![record]),
        )
        .await;
    match appended {
        Ok(a) => {
            tracing::info!(edge, topic, by = %admin_name(req), "command sent from the console");
            Reply::json(
                StatusCode::OK,
                &json!({"edge": edge, "topic": topic, "seq": a.base_offset + 1}),
            )
        }
        Err(e) => Reply::error(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()),
    }
}

async fn answer(node: &Node, path: &str) -> Response {
    match path {
        "/api/health" => match node.mqtt.metrics().await {
            Some(_) => Response::json(json!({"status": "ok"}).to_string()),
            None => Response::status("503 Service Unavailable"),
        },
        "/api/ready" => {
            if node.mqtt.metrics().await.is_none() {
                return Response::status("503 Service Unavailable");
            }
            let Some(object) = node.object.clone() else {
                return Response::json(json!({"status": "ready"}).to_string());
            };
            let me = object.node().to_owned();
            match tokio::task::spawn_blocking(move || object.members()).await {
                Ok(Ok(members)) if members.iter().any(|m| m.name == me) => {
                    Response::json(json!({"status": "ready", "node": me}).to_string())
                }
                _ => Response::status("503 Service Unavailable"),
            }
        }
        "/api/streams" => {
            let configs = node.meta.streams().unwrap_or_default();
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
                    let retention = configs.iter().find(|(n, _)| *n == s.name).map(|(_, c)| {
                        json!({"retention_ms": c.retention_ms, "retention_bytes": c.retention_bytes})
                    });
                    json!({"name": s.name, "retention": retention, "partitions": partitions})
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
        "/api/consumers" => match consumers::consumers(
            node,
            &node.mqtt.persistent_sessions().await.unwrap_or_default(),
        ) {
            Ok(v) => Response::json(v.to_string()),
            Err(_) => Response::status("500 Internal Server Error"),
        },
        "/api/fleet" => match node.meta.edges() {
            Ok(known) => Response::json(
                crate::fleet::list(node.link.as_deref(), &known, now_ms()).to_string(),
            ),
            Err(_) => Response::status("500 Internal Server Error"),
        },
        p if p.starts_with("/api/fleet/") && p.ends_with("/peek") => {
            let edge = &p["/api/fleet/".len()..p.len() - "/peek".len()];
            let log = node.log.clone();
            let edge = edge.to_owned();
            match tokio::task::spawn_blocking(move || crate::fleet::peek(&*log, &edge)).await {
                Ok(Ok(v)) => Response::json(v.to_string()),
                _ => Response::status("500 Internal Server Error"),
            }
        }
        p if p.starts_with("/api/fleet/") => match node.meta.edges() {
            Ok(known) => {
                let edge = &p["/api/fleet/".len()..];
                match crate::fleet::one(node.link.as_deref(), &known, edge, now_ms()) {
                    Some(mut v) => {
                        let (log, meta, id) =
                            (node.log.clone(), node.meta.clone(), edge.to_owned());
                        let down = tokio::task::spawn_blocking(move || {
                            crate::fleet::downlink(&*log, &meta, &id)
                        })
                        .await;
                        v["downlink"] = match down {
                            Ok(Ok(d)) => d,
                            _ => serde_json::Value::Null,
                        };
                        Response::json(v.to_string())
                    }
                    None => Response::status("404 Not Found"),
                }
            }
            Err(_) => Response::status("500 Internal Server Error"),
        },
        "/api/cluster" => match node.object.clone() {
            Some(object) => match tokio::task::spawn_blocking(move || {
                Ok::<_, crate::log::LogError>((object.members()?, object.leases()?))
            })
            .await
            {
                Ok(Ok((members, leases))) => {
                    let me = node.object.as_ref().map(|o| o.node().to_owned());
                    Response::json(
                        json!({ "node": me, "nodes": members, "leases": leases }).to_string(),
                    )
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
