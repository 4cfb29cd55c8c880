//! Persistent MQTT sessions that move between the nodes of a cluster (Step 10): what a node
//! records of each (see the broker's `resume` module) and how another reads the log again
//! for one it resumes.
//!
//! A session is recorded, beside its client id's claim (`mqtt_clients.session`), as JSON:
//! its expiry, subscriptions, QoS 2 receipts, messages in flight (packet id, released, log
//! position) and `from`: per partition, where a node that resumes it reads the log from, the
//! oldest message the session held or, for a partition it held none of, how far the
//! recording node had routed. Everything after `from` that its subscriptions match is
//! delivered to it again: every message it had not acknowledged, and those acknowledged
//! since the record was made (at least once).

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_edge::broker::{LogPosition, Message, SessionState};
use ferry_protocol::mqtt::{PacketId, QoS, RetainHandling, SubscriptionOptions};
use ferry_protocol::topic::TopicFilter;
use serde::{Deserialize, Serialize};
use tracing::warn;

use super::tailer::{read_messages, to_message};
use crate::log::Storage;

/// The most messages one replay hands the broker; more wait in the log (and are lost to the
/// session: its queue could not hold them either).
const MAX_REPLAY_MESSAGES: usize = 100_000;
/// The most payload bytes one replay holds in memory.
const MAX_REPLAY_BYTES: usize = 64 << 20;
/// How long a replay tries again to read what it cannot read now (every second) before it
/// gives up on the rest of that partition.
const REPLAY_PATIENCE: Duration = Duration::from_secs(600);

#[derive(Serialize, Deserialize)]
struct Recorded {
    expiry: u32,
    subs: Vec<Sub>,
    pubrel: Vec<u16>,
    inflight: Vec<InFlight>,
    from: Vec<At>,
}

#[derive(Serialize, Deserialize)]
struct Sub {
    filter: String,
    qos: u8,
    no_local: bool,
    retain_as_published: bool,
    retain_handling: u8,
    id: Option<u32>,
}

#[derive(Serialize, Deserialize)]
struct InFlight {
    id: u16,
    released: bool,
    at: At,
}

#[derive(Serialize, Deserialize)]
struct At {
    stream: String,
    partition: u32,
    offset: i64,
}

impl From<&LogPosition> for At {
    fn from(p: &LogPosition) -> Self {
        Self {
            stream: p.stream.to_string(),
            partition: p.partition,
            offset: p.offset,
        }
    }
}

impl From<At> for LogPosition {
    fn from(a: At) -> Self {
        Self {
            stream: a.stream.into(),
            partition: a.partition,
            offset: a.offset,
        }
    }
}

/// The record of `state`, its `from` being `routed` (the node's delivery position per
/// partition) where the session holds nothing older.
pub(crate) fn encode(state: &SessionState, routed: &HashMap<(String, u32), i64>) -> Vec<u8> {
    let mut from: HashMap<(String, u32), i64> = routed.clone();
    for p in &state.positions {
        let at = from
            .entry((p.stream.to_string(), p.partition))
            .or_insert(p.offset);
        *at = (*at).min(p.offset);
    }
    let mut from: Vec<At> = from
        .into_iter()
        .map(|((stream, partition), offset)| At {
            stream,
            partition,
            offset,
        })
        .collect();
    from.sort_by(|a, b| (&a.stream, a.partition).cmp(&(&b.stream, b.partition)));
    let recorded = Recorded {
        expiry: state.expiry_secs,
        subs: state
            .subscriptions
            .iter()
            .map(|(filter, o, id)| Sub {
                filter: filter.as_str().to_owned(),
                qos: o.qos as u8,
                no_local: o.no_local,
                retain_as_published: o.retain_as_published,
                retain_handling: o.retain_handling as u8,
                id: id.map(NonZeroU32::get),
            })
            .collect(),
        pubrel: state.awaiting_pubrel.iter().map(|p| p.get()).collect(),
        inflight: state
            .inflight
            .iter()
            .map(|(id, released, at)| InFlight {
                id: id.get(),
                released: *released,
                at: at.into(),
            })
            .collect(),
        from,
    };
    serde_json::to_vec(&recorded).expect("a session record serialises")
}

/// The session recorded as `bytes`, its `positions` where the replay starts; None (with a
/// warning) if the record does not read.
pub(crate) fn decode(client_id: &str, bytes: &[u8]) -> Option<SessionState> {
    let recorded: Recorded = match serde_json::from_slice(bytes) {
        Ok(r) => r,
        Err(e) => {
            warn!(client_id, error = %e, "a recorded MQTT session does not read; not resumed");
            return None;
        }
    };
    let mut subscriptions = Vec::with_capacity(recorded.subs.len());
    for s in recorded.subs {
        let (Ok(filter), Ok(qos)) = (TopicFilter::new(s.filter), QoS::from_u8(s.qos)) else {
            warn!(
                client_id,
                "a recorded MQTT subscription does not read; left out"
            );
            continue;
        };
        let mut options = SubscriptionOptions::new(qos);
        options.no_local = s.no_local;
        options.retain_as_published = s.retain_as_published;
        options.retain_handling = match s.retain_handling {
            1 => RetainHandling::SendAtSubscribeIfNew,
            2 => RetainHandling::DoNotSend,
            _ => RetainHandling::SendAtSubscribe,
        };
        subscriptions.push((filter, options, s.id.and_then(NonZeroU32::new)));
    }
    Some(SessionState {
        client_id: client_id.into(),
        expiry_secs: recorded.expiry,
        subscriptions,
        awaiting_pubrel: recorded
            .pubrel
            .into_iter()
            .filter_map(PacketId::new)
            .collect(),
        inflight: recorded
            .inflight
            .into_iter()
            .filter_map(|i| Some((PacketId::new(i.id)?, i.released, i.at.into())))
            .collect(),
        positions: recorded.from.into_iter().map(LogPosition::from).collect(),
    })
}

/// Reads the log for a session that resumes here: from `from` per partition (a partition not
/// named, from its start) to the end, the messages some of `filters` match, in log order per
/// partition; and per partition the offset the read stopped before. What cannot be read is
/// tried again every second for up to [`REPLAY_PATIENCE`] (the client waits). Blocking IO.
pub(crate) fn replay(
    log: &dyn Storage,
    from: &[LogPosition],
    filters: &[TopicFilter],
) -> (Vec<Arc<Message>>, Vec<LogPosition>) {
    let mut messages = Vec::new();
    let mut until = Vec::new();
    let mut bytes = 0usize;
    let began = Instant::now();
    for stream in log.streams() {
        let name: Arc<str> = Arc::from(stream.name.as_str());
        for (p, info) in stream.partitions.iter().enumerate() {
            let partition = p as u32;
            let start = from
                .iter()
                .find(|f| *f.stream == *stream.name && f.partition == partition)
                .map_or(info.offsets.log_start, |f| f.offset)
                .max(info.offsets.log_start);
            // To the end the store has now, not the one this node has heard of (a read can
            // see another node's commit before its notice comes): the tailer may have routed
            // that far already.
            let end = log
                .offsets_now(&stream.name, partition)
                .map_or(info.offsets.high_watermark, |o| o.high_watermark)
                .max(info.offsets.high_watermark);
            let mut at = start;
            while at < end {
                let full = messages.len() >= MAX_REPLAY_MESSAGES || bytes >= MAX_REPLAY_BYTES;
                if full {
                    break;
                }
                let read = read_messages(log, &stream.name, partition, at, |offset, view| {
                    let Some(view) = view.filter(|v| filters.iter().any(|f| f.matches(&v.topic)))
                    else {
                        return Ok(());
                    };
                    if offset < end {
                        bytes += view.payload.len();
                        messages.push(Arc::new(to_message(view, &name, partition, offset)));
                    }
                    Ok(())
                });
                match read {
                    Ok(next) if next > at => at = next,
                    Ok(_) => break,
                    Err(e) if began.elapsed() < REPLAY_PATIENCE => {
                        // (The object store away, say: the client waits, nothing is skipped.)
                        warn!(stream = %stream.name, partition, offset = at, error = ?e, "cannot read the log for a resumed MQTT session; trying again");
                        std::thread::sleep(Duration::from_secs(1));
                    }
                    Err(e) => {
                        tracing::error!(stream = %stream.name, partition, offset = at, error = ?e, "cannot read the log for a resumed MQTT session; its messages from here on are not replayed");
                        break;
                    }
                }
            }
            until.push(LogPosition {
                stream: name.clone(),
                partition,
                offset: at.min(end),
            });
        }
    }
    (messages, until)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_recorded_session_reads_back_with_its_replay_positions() {
        let at = |s: &str, p, o| LogPosition {
            stream: s.into(),
            partition: p,
            offset: o,
        };
        let mut options = SubscriptionOptions::new(QoS::ExactlyOnce);
        options.no_local = true;
        options.retain_handling = RetainHandling::DoNotSend;
        let state = SessionState {
            client_id: "c-1".into(),
            expiry_secs: 3600,
            subscriptions: vec![(
                TopicFilter::new("gw/+/temp").expect("valid"),
                options,
                NonZeroU32::new(7),
            )],
            awaiting_pubrel: vec![PacketId::new(9).expect("valid")],
            inflight: vec![(PacketId::new(3).expect("valid"), true, at("t", 1, 40))],
            positions: vec![at("t", 1, 40), at("u", 0, 5)],
        };
        let routed: HashMap<(String, u32), i64> = [
            (("t".to_owned(), 0), 100),
            (("t".to_owned(), 1), 90),
            (("u".to_owned(), 0), 2),
        ]
        .into();
        let back = decode("c-1", &encode(&state, &routed)).expect("reads back");
        assert_eq!(back.subscriptions, state.subscriptions);
        assert_eq!(back.awaiting_pubrel, state.awaiting_pubrel);
        assert_eq!(back.inflight, state.inflight);
        assert_eq!(back.expiry_secs, 3600);
        // The oldest held where the session holds any, else how far routing went; never
        // past what was routed.
        assert_eq!(
            back.positions,
            vec![at("t", 0, 100), at("t", 1, 40), at("u", 0, 2)]
        );
        assert!(decode("c-1", b"{not json").is_none());
    }
}
