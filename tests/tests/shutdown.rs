//! SIGTERM in the middle of a QoS 1 flood: each binary exits 0 within its shutdown deadline,
//! and after a restart nothing it acknowledged is missing.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_tests::process::{temp_dir, wait_until, Edge};
use rumqttc::{AsyncClient, Event, Incoming, MqttOptions, QoS};

/// Publishers flooding at once.
const PUBLISHERS: usize = 4;

/// The binaries' own deadline is 10 s; what the test allows on a loaded machine.
const EXIT_WITHIN: Duration = Duration::from_secs(20);

/// `PUBLISHERS` rumqttc clients publishing `<prefix><i>` with payloads "0", "1", ... at
/// QoS 1 as fast as their window allows, until their connection ends. Each counter holds
/// how many of its client's messages were acknowledged: PUBACKs come in order, so those are
/// the payloads 0..n.
fn flood(port: u16, prefix: &'static str) -> (Vec<Arc<AtomicU64>>, Arc<AtomicBool>) {
    let ended = Arc::new(AtomicBool::new(false));
    let acked: Vec<_> = (0..PUBLISHERS)
        .map(|_| Arc::new(AtomicU64::new(0)))
        .collect();
    for (i, count) in acked.iter().enumerate() {
        let mut opts = MqttOptions::new(format!("flood-{i}"), "127.0.0.1", port);
        opts.set_inflight(64);
        let (client, mut events) = AsyncClient::new(opts, 128);
        tokio::spawn(async move {
            for n in 0u64.. {
                let topic = format!("{prefix}{i}");
                if client
                    .publish(topic, QoS::AtLeastOnce, false, n.to_string())
                    .await
                    .is_err()
                {
                    return;
                }
            }
        });
        let (count, ended) = (count.clone(), ended.clone());
        tokio::spawn(async move {
            loop {
                match events.poll().await {
                    Ok(Event::Incoming(Incoming::PubAck(_))) => {
                        count.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(_) => {}
                    Err(_) => {
                        ended.store(true, Ordering::Relaxed);
                        return;
                    }
                }
            }
        });
    }
    (acked, ended)
}

/// SIGTERM: the process must exit 0 within [`EXIT_WITHIN`]; then the publishers see the end.
async fn terminate_in_time(process: Edge, ended: &AtomicBool) {
    let started = Instant::now();
    let status = tokio::task::spawn_blocking(move || process.terminate())
        .await
        .expect("terminate");
    let took = started.elapsed();
    assert!(status.success(), "exit status {status:?}");
    assert!(took < EXIT_WITHIN, "took {took:?}");
    wait_until(60, "the publishers see the end", || {
        ended.load(Ordering::Relaxed)
    });
}

fn total(acked: &[Arc<AtomicU64>]) -> u64 {
    acked.iter().map(|a| a.load(Ordering::Relaxed)).sum()
}

/// ferry-edge keeps what goes to the cloud in its outbox: every message acknowledged before
/// and during the shutdown is there after the restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_a_flood_exits_0_and_the_edge_keeps_every_acknowledged_message() {
    let dir = temp_dir("shutdown-edge");
    let config = dir.join("edge.toml");
    std::fs::write(
        &config,
        "[server]\nlisten = [\"127.0.0.1:0\"]\nmetrics_listen = \"127.0.0.1:0\"\n\
         [uplink]\n[[uplink.route]]\nfilter = \"up/#\"\n",
    )
    .expect("write config");
    let data = dir.join("data");
    let args = ["--config", config.to_str().expect("utf8")];
    let edge = Edge::start_in(&data, &args);
    let (acked, ended) = flood(edge.port(), "up/");
    wait_until(60, "2,000 acknowledged", || total(&acked) >= 2_000);
    terminate_in_time(edge, &ended).await;
    let acked = total(&acked);

    let edge = Edge::start_in(&data, &args);
    let kept = edge.metric("ferry_edge_outbox_records");
    assert!(
        kept >= acked,
        "{acked} acknowledged, {kept} in the outbox after the restart"
    );
    drop(edge);
    let _ = std::fs::remove_dir_all(&dir);
}

/// ferry-cloud appends every publish to its log before the PUBACK: after a SIGTERM in the
/// middle of a flood and a restart, each publisher's acknowledged messages are all in the
/// log, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_a_flood_exits_0_and_the_cloud_log_has_every_acknowledged_message() {
    let dir = temp_dir("shutdown-cloud");
    let cloud = Edge::cloud_in(&dir, &["--listen", "127.0.0.1:0"]);
    let (acked, ended) = flood(cloud.port(), "t/");
    wait_until(60, "2,000 acknowledged", || total(&acked) >= 2_000);
    terminate_in_time(cloud, &ended).await;

    // The log, read with the node stopped (the restart recovered it, and it stopped again).
    let cloud = Edge::cloud_in(&dir, &["--listen", "127.0.0.1:0"]);
    assert!(cloud.terminate().success());
    let records = ferry_tests::log::records(&dir.join("log"), "mqtt", 0);
    for (i, count) in acked.iter().enumerate() {
        let topic = format!("t/{i}");
        let logged: Vec<u64> = records
            .iter()
            .filter(|(key, _, _)| *key == topic)
            .map(|(_, value, _)| value.parse().expect("a number"))
            .collect();
        let n = count.load(Ordering::Relaxed);
        // In order, each acknowledged one there; a resend of an unacknowledged one may
        // follow, but nothing before the acknowledged prefix is missing or doubled.
        let prefix: Vec<u64> = (0..n).collect();
        assert!(
            logged.len() as u64 >= n && logged[..n as usize] == prefix[..],
            "{topic}: {n} acknowledged, the log has {} starting {:?}",
            logged.len(),
            &logged[..logged.len().min(5)]
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// SIGTERM tells an MQTT 5 client why it is disconnected: DISCONNECT 0x8B (Server shutting
/// down), with no server to go to (a single node).
#[test]
fn sigterm_tells_mqtt5_clients_the_server_is_shutting_down() {
    for name in ["ferry-edge", "ferry-cloud"] {
        let dir = temp_dir("shutdown-told");
        let process = match name {
            "ferry-edge" => Edge::start_in(&dir, &["--listen", "127.0.0.1:0"]),
            _ => Edge::cloud_in(&dir, &["--listen", "127.0.0.1:0"]),
        };
        let client = ferry_tests::process::ToldToGo::connect(process.port());
        assert!(process.terminate().success());
        assert_eq!(client.told(), (0x8B, "-".to_owned()), "{name}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
