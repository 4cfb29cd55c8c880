//! Exchanges and bindings of one virtual host, and routing: which queues a message
//! published to an exchange with a routing key (and headers) reaches. Routing is evaluated
//! when a queue reads a record from the log (see `queue.rs`), not when it is published: the
//! log holds each message once, whatever number of queues it reaches.

use std::collections::{BTreeMap, HashSet};

use amq_protocol::types::{AMQPValue, FieldTable};
use serde::{Deserialize, Serialize};

/// The four exchange types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum ExchangeKind {
    Direct,
    Fanout,
    Topic,
    Headers,
}

impl ExchangeKind {
    pub(crate) fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "direct" => Self::Direct,
            "fanout" => Self::Fanout,
            "topic" => Self::Topic,
            "headers" => Self::Headers,
            _ => return None,
        })
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Direct => "direct",
            Self::Fanout => "fanout",
            Self::Topic => "topic",
            Self::Headers => "headers",
        }
    }
}

/// A declared exchange.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Exchange {
    pub(crate) kind: ExchangeKind,
    pub(crate) durable: bool,
    pub(crate) auto_delete: bool,
    pub(crate) internal: bool,
}

/// Where a binding leads.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub(crate) enum Destination {
    Queue(String),
    Exchange(String),
}

/// One binding: messages of `source` that match `key` (and `args`, for headers exchanges)
/// go to `destination`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Binding {
    pub(crate) source: String,
    pub(crate) destination: Destination,
    pub(crate) key: String,
    /// `x-match` and the header values, for headers exchanges (JSON-able form).
    pub(crate) args: Vec<(String, HeaderValue)>,
}

/// A header value as a headers exchange compares it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) enum HeaderValue {
    Text(String),
    Int(i64),
    Bool(bool),
    /// Any other type: compared by its debug form.
    Other(String),
}

impl HeaderValue {
    pub(crate) fn of(v: &AMQPValue) -> Self {
        match v {
            AMQPValue::LongString(s) => Self::Text(String::from_utf8_lossy(s.as_bytes()).into()),
            AMQPValue::ShortString(s) => Self::Text(s.as_str().to_owned()),
            AMQPValue::Boolean(b) => Self::Bool(*b),
            AMQPValue::ShortShortInt(n) => Self::Int(i64::from(*n)),
            AMQPValue::ShortShortUInt(n) => Self::Int(i64::from(*n)),
            AMQPValue::ShortInt(n) => Self::Int(i64::from(*n)),
            AMQPValue::ShortUInt(n) => Self::Int(i64::from(*n)),
            AMQPValue::LongInt(n) => Self::Int(i64::from(*n)),
            AMQPValue::LongUInt(n) => Self::Int(i64::from(*n)),
            AMQPValue::LongLongInt(n) => Self::Int(*n),
            AMQPValue::Timestamp(n) => Self::Int(*n as i64),
            other => Self::Other(format!("{other:?}")),
        }
    }

    /// A field table's entries in comparable form.
    pub(crate) fn table(t: &FieldTable) -> Vec<(String, HeaderValue)> {
        t.inner()
            .iter()
            .map(|(k, v)| (k.as_str().to_owned(), Self::of(v)))
            .collect()
    }
}

/// The exchanges every virtual host has, as RabbitMQ declares them.
pub(crate) const PREDECLARED: [(&str, ExchangeKind); 6] = [
    ("amq.direct", ExchangeKind::Direct),
    ("amq.fanout", ExchangeKind::Fanout),
    ("amq.topic", ExchangeKind::Topic),
    ("amq.headers", ExchangeKind::Headers),
    ("amq.match", ExchangeKind::Headers),
    ("amq.rabbitmq.trace", ExchangeKind::Topic),
];

/// The exchanges and bindings of one virtual host.
#[derive(Debug, Clone, Default)]
pub(crate) struct Topology {
    pub(crate) exchanges: BTreeMap<String, Exchange>,
    pub(crate) bindings: Vec<Binding>,
}

impl Topology {
    /// A virtual host's topology with the predeclared exchanges.
    pub(crate) fn new() -> Self {
        let mut t = Self::default();
        for (name, kind) in PREDECLARED {
            t.exchanges.insert(
                name.to_owned(),
                Exchange {
                    kind,
                    durable: true,
                    auto_delete: false,
                    internal: false,
                },
            );
        }
        t
    }

    /// Whether a message published to `exchange` with `key` and `headers` reaches
    /// `queue`. The default exchange (`""`) reaches the queue named `key`.
    pub(crate) fn reaches(
        &self,
        exchange: &str,
        key: &str,
        headers: &[(String, HeaderValue)],
        queue: &str,
    ) -> bool {
        if exchange.is_empty() {
            return key == queue;
        }
        let mut seen = HashSet::new();
        self.reaches_from(exchange, key, headers, queue, &mut seen)
    }

    fn reaches_from<'a>(
        &'a self,
        exchange: &'a str,
        key: &str,
        headers: &[(String, HeaderValue)],
        queue: &str,
        seen: &mut HashSet<&'a str>,
    ) -> bool {
        // Exchange-to-exchange bindings may form cycles: each exchange is visited once.
        if !seen.insert(exchange) {
            return false;
        }
        let Some(kind) = self.exchanges.get(exchange).map(|e| e.kind) else {
            return false;
        };
        for b in self.bindings.iter().filter(|b| b.source == exchange) {
            if !binding_matches(kind, b, key, headers) {
                continue;
            }
            match &b.destination {
                Destination::Queue(q) if q == queue => return true,
                Destination::Queue(_) => {}
                Destination::Exchange(next) => {
                    if self.reaches_from(next, key, headers, queue, seen) {
                        return true;
                    }
                }
            }
        }
        false
    }
}

fn binding_matches(
    kind: ExchangeKind,
    b: &Binding,
    key: &str,
    headers: &[(String, HeaderValue)],
) -> bool {
    match kind {
        ExchangeKind::Direct => b.key == key,
        ExchangeKind::Fanout => true,
        ExchangeKind::Topic => topic_matches(&b.key, key),
        ExchangeKind::Headers => headers_match(&b.args, headers),
    }
}

/// A topic exchange's pattern against a routing key: words split by `.`, `*` one word,
/// `#` zero or more.
pub(crate) fn topic_matches(pattern: &str, key: &str) -> bool {
    let p: Vec<&str> = pattern.split('.').collect();
    let k: Vec<&str> = key.split('.').collect();
    fn go(p: &[&str], k: &[&str]) -> bool {
        match p.split_first() {
            None => k.is_empty(),
            Some((&"#", rest)) => (0..=k.len()).any(|i| go(rest, &k[i..])),
            Some((&w, rest)) => match k.split_first() {
                Some((&kw, krest)) => (w == "*" || w == kw) && go(rest, krest),
                None => false,
            },
        }
    }
    go(&p, &k)
}

/// A headers exchange binding: `x-match` `all` (default) or `any` of the other arguments
/// (those starting `x-` are not compared; `all-with-x`/`any-with-x` compare them too).
fn headers_match(args: &[(String, HeaderValue)], headers: &[(String, HeaderValue)]) -> bool {
    let mode = args
        .iter()
        .find(|(k, _)| k == "x-match")
        .and_then(|(_, v)| match v {
            HeaderValue::Text(t) => Some(t.as_str()),
            _ => None,
        })
        .unwrap_or("all");
    let with_x = mode.ends_with("-with-x");
    let wanted = args
        .iter()
        .filter(|(k, _)| k != "x-match" && (with_x || !k.starts_with("x-")));
    let has = |(k, v): &(String, HeaderValue)| {
        headers.iter().any(|(hk, hv)| {
            hk == k && (matches!(v, HeaderValue::Other(o) if o == "Void") || hv == v)
        })
    };
    if mode.starts_with("any") {
        wanted.clone().any(has)
    } else {
        wanted.clone().all(has)
    }
}

/// An MQTT topic as an `amq.topic` routing key: `/` becomes `.` (RabbitMQ's MQTT plugin
/// mapping). A `.` in the MQTT topic stays a `.`, so it splits a word in AMQP.
pub(crate) fn mqtt_to_routing_key(topic: &str) -> String {
    topic.replace('/', ".")
}

/// An `amq.topic` routing key as an MQTT topic: `.` becomes `/`.
pub(crate) fn routing_key_to_mqtt(key: &str) -> String {
    key.replace('.', "/")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_patterns_match_as_rabbitmq_does() {
        for (pattern, key, expected) in [
            ("a.b.c", "a.b.c", true),
            ("a.*.c", "a.b.c", true),
            ("a.*.c", "a.b.b.c", false),
            ("a.#", "a", true),
            ("a.#", "a.b.c", true),
            ("#", "", true),
            ("#.c", "a.b.c", true),
            ("a.#.c", "a.c", true),
            ("*", "a.b", false),
            ("gw-7.sensors.*.temp", "gw-7.sensors.s1.temp", true),
        ] {
            assert_eq!(topic_matches(pattern, key), expected, "{pattern} vs {key}");
        }
    }

    fn bind(source: &str, to: Destination, key: &str) -> Binding {
        Binding {
            source: source.into(),
            destination: to,
            key: key.into(),
            args: Vec::new(),
        }
    }

    #[test]
    fn routing_follows_exchange_to_exchange_bindings_and_stops_at_cycles() {
        let mut t = Topology::new();
        for name in ["e1", "e2"] {
            t.exchanges.insert(
                name.into(),
                Exchange {
                    kind: ExchangeKind::Direct,
                    durable: false,
                    auto_delete: false,
                    internal: false,
                },
            );
        }
        t.bindings
            .push(bind("e1", Destination::Exchange("e2".into()), "k"));
        t.bindings
            .push(bind("e2", Destination::Exchange("e1".into()), "k"));
        t.bindings
            .push(bind("e2", Destination::Queue("q".into()), "k"));
        t.bindings.push(bind(
            "amq.fanout",
            Destination::Queue("f".into()),
            "ignored",
        ));
        assert!(t.reaches("e1", "k", &[], "q"));
        assert!(!t.reaches("e1", "other", &[], "q"));
        assert!(t.reaches("amq.fanout", "anything", &[], "f"));
        assert!(t.reaches("", "q", &[], "q"), "the default exchange");
        assert!(!t.reaches("nope", "k", &[], "q"));
    }

    #[test]
    fn headers_bindings_match_all_or_any() {
        let text = |s: &str| HeaderValue::Text(s.into());
        let args_all = vec![
            ("x-match".to_owned(), text("all")),
            ("a".to_owned(), text("1")),
            ("b".to_owned(), HeaderValue::Int(2)),
        ];
        let mut args_any = args_all.clone();
        args_any[0].1 = text("any");
        let both = vec![
            ("a".to_owned(), text("1")),
            ("b".to_owned(), HeaderValue::Int(2)),
        ];
        let one = vec![("a".to_owned(), text("1"))];
        assert!(headers_match(&args_all, &both));
        assert!(!headers_match(&args_all, &one));
        assert!(headers_match(&args_any, &one));
        assert!(!headers_match(&args_any, &[("a".to_owned(), text("2"))]));
    }
}
