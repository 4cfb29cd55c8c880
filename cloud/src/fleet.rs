//! The fleet as JSON, for `/api/fleet` and the console: every edge the link has seen
//! since the node started (`ferry_bridge::fleet`) and every edge the metadata knows
//! (it sent data before), with its state, its outbox as it told it, its rates and its
//! history.
//!
//! An edge offline cannot tell its figures: the list shows the last it told, and beside
//! them an `estimate` of its backlog now, from its last inflow rate, marked as such; the
//! edge's own figure replaces it in the first STATUS after it is back.

use ferry_bridge::cloud_listener::LinkServer;
use ferry_bridge::fleet::{EdgeRecord, LinkEventKind};
use ferry_protocol::kafka::batch::{records, uncompressed};
use serde_json::{json, Value};

use crate::log::{Storage, READ_BUDGET_BYTES};

/// Records looked at per partition, back from its end, for a peek.
const PEEK_SCAN_RECORDS: i64 = 2_000;
/// Messages a peek shows.
const PEEK_MESSAGES: usize = 20;

/// `/api/fleet/<edge>/peek`: the last messages `edge` sent that are still among the last
/// [`PEEK_SCAN_RECORDS`] records of each partition (of every stream but the downlink), newest
/// first: stream, partition, offset, topic, size, time. The payloads are not shown.
pub fn peek(log: &dyn Storage, edge: &str) -> Result<Value, crate::log::LogError> {
    let mut found: Vec<(i64, Value)> = Vec::new();
    for s in log.streams() {
        if s.name == crate::routes::DOWNLINK_STREAM {
            continue;
        }
        for (p, info) in s.partitions.iter().enumerate() {
            let o = info.offsets;
            let from = (o.high_watermark - PEEK_SCAN_RECORDS).max(o.log_start);
            if from >= o.high_watermark {
                continue;
            }
            let read = log.read(&s.name, p as u32, from, READ_BUDGET_BYTES)?;
            for batch in read.iter() {
                let (_, whole) = batch?;
                let Ok(plain) = uncompressed(whole, 64 << 20) else {
                    continue;
                };
                let Ok(recs) = records(&plain) else {
                    continue;
                };
                for rec in recs.flatten() {
                    let from_edge = rec
                        .headers
                        .iter()
                        .any(|h| h.key == "ferry.edge" && h.value == Some(edge.as_bytes()));
                    if !from_edge || rec.offset < from {
                        continue;
                    }
                    let topic = rec.key.map(String::from_utf8_lossy).unwrap_or_default();
                    found.push((
                        rec.timestamp,
                        json!({
                            "stream": s.name, "partition": p, "offset": rec.offset,
                            "topic": topic, "bytes": rec.value.map_or(0, <[u8]>::len),
                            "timestamp_ms": rec.timestamp,
                        }),
                    ));
                }
            }
        }
    }
    found.sort_by_key(|(t, _)| std::cmp::Reverse(*t));
    found.truncate(PEEK_MESSAGES);
    Ok(json!({"edge": edge, "messages": found.into_iter().map(|(_, v)| v).collect::<Vec<_>>()}))
}

/// What waits in the downlink for `edge`: `acked_seq`, the downlink sequence it
/// acknowledged (as the cloud recorded it), and `waiting`, its messages past that, counted
/// in one read of the downlink (about 1 MiB); `complete` false if more of the downlink lies
/// beyond that read (then `waiting` is a lower bound).
pub fn downlink(log: &dyn Storage, meta: &crate::meta::Meta, edge: &str) -> Result<Value, String> {
    let stream = crate::routes::DOWNLINK_STREAM;
    let acked = meta
        .cursor(&format!("$edge:{edge}"), stream, 0)
        .map_err(|e| e.to_string())?
        .unwrap_or(0);
    let prefix = format!("{}{edge}/", crate::routes::DOWNLINK_PREFIX);
    let Some(offsets) = log
        .streams()
        .into_iter()
        .find(|s| s.name == stream)
        .and_then(|s| s.partitions.first().map(|p| p.offsets))
    else {
        return Ok(json!({"acked_seq": acked, "waiting": 0, "complete": true}));
    };
    // A message's sequence is its offset + 1: the first not acknowledged is at `acked`.
    let from = acked.max(offsets.log_start);
    let (mut waiting, mut read_to) = (0u64, from);
    if from < offsets.high_watermark {
        let read = log
            .read(stream, 0, from, READ_BUDGET_BYTES)
            .map_err(|e| e.to_string())?;
        for batch in read.iter() {
            let (_, whole) = batch.map_err(|e| e.to_string())?;
            let plain = uncompressed(whole, 64 << 20).map_err(|e| e.to_string())?;
            for rec in records(&plain).map_err(|e| e.to_string())?.flatten() {
                read_to = read_to.max(rec.offset + 1);
                if rec.offset >= from && rec.key.is_some_and(|k| k.starts_with(prefix.as_bytes())) {
                    waiting += 1;
                }
            }
        }
    }
    Ok(json!({
        "acked_seq": acked,
        "waiting": waiting,
        "complete": read_to >= offsets.high_watermark,
    }))
}

/// Points of the list's small charts: one every fourth sample (2 minutes), an hour.
const LIST_POINTS_EVERY: usize = 4;
/// An outbox at or over this share of its budget is "near budget".
const NEAR_BUDGET: f64 = 0.8;

/// `/api/fleet`: counts, and every edge with a small history.
pub fn list(link: Option<&LinkServer>, known: &[(String, u8, u64)], now_ms: u64) -> Value {
    let records = link.map(|l| l.fleet_edges()).unwrap_or_default();
    let mut ids: Vec<&str> = known.iter().map(|(id, _, _)| id.as_str()).collect();
    ids.extend(records.iter().map(|r| r.edge_id.as_str()));
    ids.sort_unstable();
    ids.dedup();
    let mut counts = Counts::default();
    let edges: Vec<Value> = ids
        .into_iter()
        .map(|id| {
            let record = records.iter().find(|r| r.edge_id == id);
            let view = EdgeView::new(id, record, link, now_ms);
            counts.add(&view);
            let mut v = view.json();
            if let Some(r) = record {
                let points: Vec<Value> = r
                    .history
                    .iter()
                    .rev()
                    .step_by(LIST_POINTS_EVERY)
                    .rev()
                    .map(|s| json!([s.at_unix_ms, s.outbox_records, s.acked]))
                    .collect();
                v["points"] = Value::Array(points);
            }
            v
        })
        .collect();
    json!({
        "now_unix_ms": now_ms,
        "counts": counts.json(),
        "edges": edges,
    })
}

/// `/api/fleet/<edge>`: one edge with its link history, committed sequences per class and
/// full history; None if no one knows it.
pub fn one(
    link: Option<&LinkServer>,
    known: &[(String, u8, u64)],
    edge: &str,
    now_ms: u64,
) -> Option<Value> {
    let record = link.and_then(|l| l.fleet_edge(edge));
    let committed: Vec<Value> = known
        .iter()
        .filter(|(e, _, _)| e == edge)
        .map(|(_, class, seq)| json!({"class": class, "committed_seq": seq}))
        .collect();
    if record.is_none() && committed.is_empty() {
        return None;
    }
    let mut v = EdgeView::new(edge, record.as_ref(), link, now_ms).json();
    v["committed"] = Value::Array(committed);
    if let Some(r) = &record {
        v["events"] = r
            .events
            .iter()
            .map(|e| {
                let (kind, detail) = match &e.kind {
                    LinkEventKind::Linked { remote, version } => {
                        ("linked", format!("from {remote}, link version {version}"))
                    }
                    LinkEventKind::Unlinked { reason } => ("unlinked", reason.clone()),
                    LinkEventKind::Refused { reason } => ("refused", reason.clone()),
                };
                json!({"at_unix_ms": e.at_unix_ms, "kind": kind, "detail": detail})
            })
            .collect();
        v["history"] = r
            .history
            .iter()
            .map(|s| {
                json!([
                    s.at_unix_ms,
                    s.outbox_records,
                    s.outbox_bytes,
                    s.last_seq,
                    s.acked
                ])
            })
            .collect();
    }
    Some(v)
}

/// What the list and the detail show of one edge.
struct EdgeView<'a> {
    id: &'a str,
    record: Option<&'a EdgeRecord>,
    state: &'static str,
    denied: bool,
    now_ms: u64,
}

impl<'a> EdgeView<'a> {
    fn new(
        id: &'a str,
        record: Option<&'a EdgeRecord>,
        link: Option<&LinkServer>,
        now_ms: u64,
    ) -> Self {
        let serial = record.map_or("", |r| r.serial.as_str());
        let denied = link.is_some_and(|l| l.denied(id, serial));
        let state = match record {
            Some(r) if r.link.is_some() => "linked",
            _ if denied => "denied",
            _ => "offline",
        };
        Self {
            id,
            record,
            state,
            denied,
            now_ms,
        }
    }

    fn growing(&self) -> bool {
        let Some(rates) = self.record.and_then(|r| r.rates()) else {
            return false;
        };
        if self.state == "linked" {
            rates.drain < 0.0
        } else {
            rates.inflow > 0.0
        }
    }

    fn near_budget(&self) -> bool {
        self.record.and_then(|r| r.status).is_some_and(|s| {
            s.outbox_budget_bytes > 0
                && s.outbox_bytes as f64 >= NEAR_BUDGET * s.outbox_budget_bytes as f64
        })
    }

    fn json(&self) -> Value {
        let Some(r) = self.record else {
            return json!({
                "edge": self.id,
                "state": self.state,
                "denied": self.denied,
                "growing": false,
                "near_budget": false,
            });
        };
        let link = r.link.as_ref().map(|l| {
            json!({
                "remote": l.remote.to_string(),
                "software": l.software,
                "version": l.version,
                "since_unix_ms": l.since_unix_ms,
                "records": l.records,
                "batch_bytes": l.batch_bytes,
                "last_ack_unix_ms": l.last_ack_unix_ms,
            })
        });
        let outbox = r.status.map(|s| {
            json!({
                "at_unix_ms": r.status_at_unix_ms,
                "records": s.outbox_records,
                "bytes": s.outbox_bytes,
                "budget_bytes": s.outbox_budget_bytes,
                "oldest_age_ms": s.oldest_age_ms,
                "last_seq": s.last_seq,
                "rejected": s.rejected,
                "dropped": s.dropped,
                "clients": s.clients,
            })
        });
        let rates = r.rates();
        // Offline, the backlog can only be estimated: from what it told and its inflow.
        let estimate = match (self.state, r.status, rates) {
            ("linked", _, _) => None,
            (_, Some(s), Some(rates)) if rates.inflow > 0.0 => {
                let secs = self.now_ms.saturating_sub(r.status_at_unix_ms) as f64 / 1000.0;
                Some(json!({
                    "records": s.outbox_records + (rates.inflow * secs) as u64,
                    "basis": "the last backlog it told, and its inflow rate then",
                }))
            }
            _ => None,
        };
        json!({
            "edge": self.id,
            "state": self.state,
            "state_since_unix_ms": r.state_since_unix_ms,
            "last_contact_unix_ms": r.last_contact_unix_ms,
            "denied": self.denied,
            "serial": r.serial,
            "cert_expires_unix_secs": r.cert_not_after_unix_secs,
            "link": link,
            "outbox": outbox,
            "estimate": estimate,
            "rates": rates.map(|x| json!({"inflow": x.inflow, "sent": x.sent, "drain": x.drain})),
            "acked_records": r.acked_records,
            "acked_bytes": r.acked_bytes,
            "growing": self.growing(),
            "near_budget": self.near_budget(),
        })
    }
}

#[derive(Default)]
struct Counts {
    edges: u64,
    linked: u64,
    offline: u64,
    denied: u64,
    growing: u64,
    near_budget: u64,
}

impl Counts {
    fn add(&mut self, v: &EdgeView<'_>) {
        self.edges += 1;
        match v.state {
            "linked" => self.linked += 1,
            "denied" => self.denied += 1,
            _ => self.offline += 1,
        }
        self.growing += u64::from(v.growing());
        self.near_budget += u64::from(v.near_budget());
    }

    fn json(&self) -> Value {
        json!({
            "edges": self.edges,
            "linked": self.linked,
            "offline": self.offline,
            "denied": self.denied,
            "growing": self.growing,
            "near_budget": self.near_budget,
        })
    }
}
