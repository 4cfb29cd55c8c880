//! ferry-edge's MQTT 5 features end to end, with paho-mqtt (Python, 2.x) as the client: each
//! test starts a broker and runs one feature of `tests/clients/mqtt5_features.py` against
//! it, which prints a line per check and "OK" when all of them held.

use ferry_tests::process::{python_client, temp_dir, Edge};

/// The broker's `[mqtt] max_packet_size_bytes` in [`maximum_packet_size_both_ways`]; the
/// script's `BROKER_MAX_PACKET` is the same number.
const BROKER_MAX_PACKET_BYTES: u32 = 1024;

/// Runs `feature` of the script against `edge`; it must exit 0 with "OK" as its last line.
fn run(feature: &str, edge: &Edge) {
    python_client("mqtt5_features.py", &[feature, &edge.port().to_string()]);
}

fn edge() -> Edge {
    Edge::start(&["--listen", "127.0.0.1:0"])
}

/// Topic aliases both ways. Client → broker: an alias bound with a topic, then used with an
/// empty topic, then rebound to another topic and used again: a subscriber gets each message
/// on its real topic. Broker → client: to a client whose CONNECT allows 5 aliases, the second
/// delivery on a topic is the alias alone with an empty topic; with 1 allowed, every delivery
/// still resolves and no alias exceeds it; a client that allows none gets full topics only.
#[test]
fn topic_aliases_both_ways() {
    run("topic_alias", &edge());
}

/// Subscription identifiers: a message matching overlapping subscriptions of one session
/// carries the identifiers of all of them (one subscription without an identifier adds
/// none), another session gets its own identifier, and subscribing again to a filter with a
/// new identifier replaces the old one.
#[test]
fn subscription_identifiers() {
    run("subscription_ids", &edge());
}

/// No Local: a client subscribed with no_local does not get its own message back but gets
/// another client's published after it; a client subscribed without it gets its own.
#[test]
fn no_local() {
    run("no_local", &edge());
}

/// Retain Handling: 0 sends the retained message at every SUBSCRIBE, 1 only when the
/// subscription is new (again after UNSUBSCRIBE), 2 never; each "not sent" is bounded by a
/// live message published after the SUBACK.
#[test]
fn retain_handling() {
    run("retain_handling", &edge());
}

/// Retain As Published: a retained message forwarded live keeps its retain flag for a
/// subscription with the option and loses it for one without; a non-retained message has no
/// flag for either.
#[test]
fn retain_as_published() {
    run("retain_as_published", &edge());
}

/// Maximum Packet Size both ways, with the broker's set to 1024. The broker's: CONNACK
/// announces 1024, a PUBLISH of exactly 1024 bytes is accepted and one of 1025 gets
/// DISCONNECT 0x95 (Packet too large) and is not routed. The client's (200): a 200-byte
/// PUBLISH is delivered to it, a 201-byte one is not (while a client without a limit gets
/// both), and the client stays connected.
#[test]
fn maximum_packet_size_both_ways() {
    let dir = temp_dir("mqtt5-max-packet");
    let config = dir.join("edge.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = [\"127.0.0.1:0\"]\n[mqtt]\nmax_packet_size_bytes = {BROKER_MAX_PACKET_BYTES}\n"
        ),
    )
    .expect("write config");
    let edge = Edge::start(&["--config", config.to_str().expect("utf8")]);
    run("max_packet_size", &edge);
    drop(edge);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Enhanced authentication with a method the broker does not know: CONNACK 0x8C (Bad
/// authentication method) and the connection closed; the same client id without a method
/// connects.
#[test]
fn unknown_authentication_method_refused() {
    run("auth_method", &edge());
}

/// A message dropped as bigger than the client's Maximum Packet Size binds no topic alias:
/// the next message on that topic carries the topic again (MQTT 5.0 §3.3.2.3.4,
/// MQTT-3.1.2-25). Found by this script: the alias used to be bound before the size check.
#[test]
fn a_message_too_large_for_the_client_binds_no_topic_alias() {
    run("max_packet_size_alias", &edge());
}
