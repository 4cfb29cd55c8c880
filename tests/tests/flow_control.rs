//! ferry-edge's queue limits, end to end with rumqttc: what does not fit in a subscriber's
//! queue is dropped and counted (QoS 0 for a subscriber that does not read, QoS 1 for an
//! offline session), and the cap over all sessions holds as well as the per-session one.

use std::time::Duration;

use ferry_tests::clients::next_incoming;
use ferry_tests::process::{temp_dir, wait_until, Edge};
use rumqttc::{AsyncClient, Event, Incoming, MqttOptions, QoS};

/// A queue entry costs its payload and topic (`[mqtt] max_queued_bytes_*`): 100 + 3.
const PAYLOAD: usize = 100;
const COST: usize = PAYLOAD + "q/t".len();

fn edge_with(dir: &std::path::Path, mqtt: &str) -> Edge {
    let config = dir.join("edge.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = [\"127.0.0.1:0\"]\nmetrics_listen = \"127.0.0.1:0\"\n[mqtt]\n{mqtt}"
        ),
    )
    .expect("write config");
    Edge::start_in(
        &dir.join("data"),
        &["--config", config.to_str().expect("utf8")],
    )
}

/// A persistent QoS 1 session on `q/#`, left offline (its SUBACK seen first).
async fn offline_session(port: u16, id: &str) {
    let mut opts = MqttOptions::new(id, "127.0.0.1", port);
    opts.set_clean_session(false);
    let (client, mut events) = AsyncClient::new(opts, 10);
    client
        .subscribe("q/#", QoS::AtLeastOnce)
        .await
        .expect("queue subscribe");
    while !matches!(
        next_incoming(&mut events, "suback").await,
        Incoming::SubAck(_)
    ) {}
    client.disconnect().await.expect("queue disconnect");
    while let Ok(Ok(_)) = tokio::time::timeout(Duration::from_secs(1), events.poll()).await {}
}

/// Resumes session `id` and takes what was queued for it, then a marker published after
/// it resumed (so the read has an end that is an event, not a quiet spell): the payloads
/// before the marker.
async fn resume(port: u16, id: &str) -> Vec<String> {
    let mut opts = MqttOptions::new(id, "127.0.0.1", port);
    opts.set_clean_session(false);
    let (_client, mut events) = AsyncClient::new(opts, 100);
    while !matches!(
        next_incoming(&mut events, "connack").await,
        Incoming::ConnAck(_)
    ) {}
    publish(port, &["end".to_owned()]).await;
    let mut got = Vec::new();
    loop {
        if let Incoming::Publish(p) = next_incoming(&mut events, "queued messages").await {
            let text = String::from_utf8_lossy(&p.payload).into_owned();
            if text == "end" {
                return got;
            }
            got.push(text);
        }
    }
}

/// Publishes `payloads` to `q/t` at QoS 1 and waits for every PUBACK.
async fn publish(port: u16, payloads: &[String]) {
    let mut opts = MqttOptions::new("q-publisher", "127.0.0.1", port);
    opts.set_inflight(10);
    let (client, mut events) = AsyncClient::new(opts, 100);
    let all = payloads.to_vec();
    tokio::spawn(async move {
        for p in all {
            if client
                .publish("q/t", QoS::AtLeastOnce, false, p)
                .await
                .is_err()
            {
                return;
            }
        }
    });
    let mut acked = 0;
    while acked < payloads.len() {
        if let Incoming::PubAck(_) = next_incoming(&mut events, "pubacks").await {
            acked += 1;
        }
    }
}

/// Two offline sessions, each allowed 2,000 bytes, all sessions 3,000: 30 messages of 103
/// bytes each would fit 19 times per session (38 in all) without the total cap, 29 with it.
/// Each session gets a prefix of the messages, in order; the rest is dropped and counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_sessions_keep_what_fits_under_both_caps_and_count_the_rest() {
    let dir = temp_dir("flow-offline");
    let edge = edge_with(
        &dir,
        "max_queued_bytes_per_session = 2000\nmax_queued_bytes_total = 3000\n",
    );
    offline_session(edge.port(), "a").await;
    offline_session(edge.port(), "b").await;
    let payloads: Vec<String> = (0..30)
        .map(|i| format!("{i:0>width$}", width = PAYLOAD))
        .collect();
    publish(edge.port(), &payloads).await;
    let dropped = edge.metric("ferry_edge_messages_dropped_total{reason=\"offline_queue_full\"}");
    let (a, b) = (
        resume(edge.port(), "a").await,
        resume(edge.port(), "b").await,
    );
    for got in [&a, &b] {
        assert!(
            got.len() * COST <= 2000,
            "{} kept in one session",
            got.len()
        );
        assert_eq!(got[..], payloads[..got.len()], "a prefix, in order");
    }
    let kept = a.len() + b.len();
    assert!(
        kept * COST <= 3000,
        "{kept} kept in all: the total cap (3,000 bytes) holds"
    );
    assert!(
        kept >= 3000 / COST - 1,
        "{kept} kept in all: the caps are not undercut"
    );
    assert_eq!(
        dropped as usize,
        2 * payloads.len() - kept,
        "every drop counted"
    );
    drop(edge);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A connected subscriber that stops reading: QoS 0 messages beyond its writer's credit
/// and its queue (10,000 bytes) are dropped and counted; the publisher is never held up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos0_for_a_subscriber_that_does_not_read_is_dropped_and_counted() {
    let dir = temp_dir("flow-qos0");
    let edge = edge_with(&dir, "max_queued_bytes_per_session = 10000\n");
    let (_sub, mut sub_events) =
        AsyncClient::new(MqttOptions::new("slow", "127.0.0.1", edge.port()), 10);
    _sub.subscribe("q/#", QoS::AtMostOnce)
        .await
        .expect("queue subscribe");
    while !matches!(
        next_incoming(&mut sub_events, "suback").await,
        Incoming::SubAck(_)
    ) {}
    // From here nothing polls the subscriber: its socket is not read.
    let mut opts = MqttOptions::new("fast", "127.0.0.1", edge.port());
    opts.set_max_packet_size(1 << 20, 1 << 20);
    let (publisher, mut events) = AsyncClient::new(opts, 1000);
    let payload = vec![b'x'; 4096];
    tokio::spawn(async move {
        for _ in 0..20_000 {
            if publisher
                .publish("q/t", QoS::AtMostOnce, false, payload.clone())
                .await
                .is_err()
            {
                return;
            }
        }
        // A QoS 1 marker: its PUBACK says the broker took every QoS 0 message before it.
        let _ = publisher
            .publish("marker", QoS::AtLeastOnce, false, "done")
            .await;
    });
    loop {
        match tokio::time::timeout(Duration::from_secs(60), events.poll()).await {
            Ok(Ok(Event::Incoming(Incoming::PubAck(_)))) => break,
            Ok(Ok(_)) => {}
            Ok(Err(e)) => panic!("publisher: {e}"),
            Err(_) => panic!("the publisher was held up"),
        }
    }
    let name = "ferry_edge_messages_dropped_total{reason=\"qos0_queue_full\"}";
    wait_until(60, "drops counted", || edge.metric(name) > 0);
    // 80 MB sent; a writer's credit, the socket buffers and 10,000 queued bytes hold a few MB.
    let dropped = edge.metric(name);
    assert!(dropped > 10_000, "{dropped} of 20,000 dropped");
    drop(edge);
    let _ = std::fs::remove_dir_all(&dir);
}
