//! ferry-cloud's AMQP front as a process: pika's suite (tests/clients/amqp_pika.py), and
//! kill -9 of the node during a confirmed publish flood and during consumption: every
//! confirmed message is delivered at least once after the restart, none acknowledged
//! before the kill comes back, and order holds but for redeliveries.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ferry_tests::process::{python_client, temp_dir, Edge};
use futures_util::StreamExt;
use lapin::options::*;
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};

/// ferry-cloud with AMQP on an ephemeral port over the data directory `dir`.
fn cloud(dir: &std::path::Path) -> Edge {
    let config = dir.join("cloud.toml");
    std::fs::create_dir_all(dir).expect("dir");
    std::fs::write(
        &config,
        "[server]\nlisten = [\"127.0.0.1:0\"]\n[amqp]\nlisten = \"127.0.0.1:0\"\n",
    )
    .expect("config");
    Edge::cloud_in(
        &dir.join("data"),
        &["--config", config.to_str().expect("utf8")],
    )
}

fn uri(cloud: &Edge) -> String {
    format!(
        "amqp://127.0.0.1:{}/%2f",
        cloud.amqp_addr().expect("amqp listener").port()
    )
}

#[test]
fn pika_publishes_consumes_dead_letters_and_is_refused_as_by_rabbitmq() {
    let dir = temp_dir("amqp-pika");
    let cloud = cloud(&dir);
    let port = cloud.amqp_addr().expect("amqp").port().to_string();
    python_client("amqp_pika.py", &[&port]);
}

#[test]
fn amqp_over_tls_with_the_clouds_certificate_and_a_client_that_verifies_it() {
    let dir = temp_dir("amqp-tls");
    std::fs::create_dir_all(&dir).expect("dir");
    let pki = ferry_tests::site::pki(&dir, &[]);
    let p = |rel: &str| pki.join(rel).display().to_string();
    let config = dir.join("cloud.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = [\"127.0.0.1:0\"]\n[amqp]\nlisten = \"127.0.0.1:0\"\n\
             [amqp.tls]\nlisten = [\"127.0.0.1:0\"]\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
            p("nodes/localhost.crt"),
            p("nodes/localhost.key")
        ),
    )
    .expect("config");
    let cloud = Edge::cloud_in(
        &dir.join("data"),
        &["--config", config.to_str().expect("utf8")],
    );
    let port = cloud
        .amqps_addr()
        .expect("an amqps listener")
        .port()
        .to_string();
    python_client("amqp_tls.py", &[&port, &p("ca.crt")]);
}

#[test]
fn users_and_acls_from_the_mosquitto_files_apply_to_amqp() {
    let dir = temp_dir("amqp-auth");
    std::fs::create_dir_all(&dir).expect("dir");
    let passwd = dir.join("passwd");
    let status = std::process::Command::new("mosquitto_passwd")
        .args(["-b", "-c"])
        .arg(&passwd)
        .args(["alice", "secret"])
        .status()
        .expect("mosquitto_passwd must be installed (apt-get install mosquitto)");
    assert!(status.success());
    let acl = dir.join("acl");
    std::fs::write(
        &acl,
        "user alice\ntopic read amqp/queue/allowed\ntopic write amqp/exchange/amq.direct\n\
         topic write alice/#\n",
    )
    .expect("acl");
    let config = dir.join("cloud.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = [\"127.0.0.1:0\"]\n[auth]\npassword_file = \"{}\"\n\
             acl_file = \"{}\"\n[amqp]\nlisten = \"127.0.0.1:0\"\n",
            passwd.display(),
            acl.display()
        ),
    )
    .expect("config");
    let cloud = Edge::cloud_in(
        &dir.join("data"),
        &["--config", config.to_str().expect("utf8")],
    );
    let port = cloud.amqp_addr().expect("amqp").port().to_string();
    python_client("amqp_auth.py", &[&port]);
}

#[test]
fn aio_pika_publishes_to_a_topic_exchange_and_consumes_what_its_binding_matches() {
    let dir = temp_dir("amqp-aio-pika");
    let cloud = cloud(&dir);
    let port = cloud.amqp_addr().expect("amqp").port().to_string();
    python_client("amqp_aio_pika.py", &[&port]);
}

#[test]
fn kombu_simple_queue_and_a_celery_worker_run_tasks_sent_with_delay() {
    let dir = temp_dir("amqp-celery");
    let cloud = cloud(&dir);
    let port = cloud.amqp_addr().expect("amqp").port().to_string();
    let work = dir.join("celery");
    python_client(
        "amqp_kombu_celery.py",
        &[&port, work.to_str().expect("utf8")],
    );
}

#[test]
fn amqplib_fans_out_to_two_queues_and_routes_by_headers() {
    let dir = temp_dir("amqp-amqplib");
    let cloud = cloud(&dir);
    let port = cloud.amqp_addr().expect("amqp").port().to_string();
    let script = format!("{}/clients/amqp_amqplib.js", env!("CARGO_MANIFEST_DIR"));
    let out = std::process::Command::new("node")
        .arg(&script)
        .arg(&port)
        .output()
        .expect("node runs (scripts/test.sh installs amqplib)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.ends_with("OK\n"),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_loses_no_confirmed_message_and_redelivers_no_acked_one() {
    const FLOOD: usize = 20_000;
    let dir = temp_dir("amqp-kill");
    let node = cloud(&dir);
    let conn = Connection::connect(&uri(&node), ConnectionProperties::default())
        .await
        .expect("connect");
    let ch = conn.create_channel().await.expect("channel");
    ch.queue_declare(
        "durable".into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .expect("declare");
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    // A flood of confirmed publishes; the node is killed once 2,000 are confirmed.
    let confirmed = Arc::new(std::sync::Mutex::new(BTreeSet::new()));
    let count = Arc::new(AtomicUsize::new(0));
    let flood = {
        let (ch, confirmed, count) = (ch.clone(), confirmed.clone(), count.clone());
        tokio::spawn(async move {
            let mut waiting = Vec::new();
            for i in 0..FLOOD {
                let props = BasicProperties::default().with_delivery_mode(2);
                let Ok(confirm) = ch
                    .basic_publish(
                        "".into(),
                        "durable".into(),
                        BasicPublishOptions::default(),
                        i.to_string().as_bytes(),
                        props,
                    )
                    .await
                else {
                    break;
                };
                waiting.push((i, confirm));
                if waiting.len() == 100 {
                    for (i, c) in waiting.drain(..) {
                        match c.await {
                            Ok(c) if c.is_ack() => {
                                confirmed.lock().expect("lock").insert(i);
                                count.fetch_add(1, Ordering::Relaxed);
                            }
                            _ => return,
                        }
                    }
                }
            }
        })
    };
    ferry_tests::process::wait_until(60, "2,000 confirmed publishes", || {
        count.load(Ordering::Relaxed) >= 2_000
    });
    node.kill();
    let _ = flood.await;
    let confirmed: BTreeSet<usize> = confirmed.lock().expect("lock").clone();
    assert!(
        confirmed.len() >= 2_000 && confirmed.len() < FLOOD,
        "{}",
        confirmed.len()
    );

    // Restarted: a consumer acks the first 500 it gets; a synchronous method after them
    // makes sure the node took the acks; then the node is killed again.
    let node = cloud(&dir);
    let conn = Connection::connect(&uri(&node), ConnectionProperties::default())
        .await
        .expect("connect");
    let ch = conn.create_channel().await.expect("channel");
    ch.basic_qos(100, BasicQosOptions::default())
        .await
        .expect("qos");
    let mut consumer = ch
        .basic_consume(
            "durable".into(),
            "c".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");
    let mut acked = BTreeSet::new();
    let mut first = Vec::new();
    while acked.len() < 500 {
        let d = tokio::time::timeout(Duration::from_secs(10), consumer.next())
            .await
            .expect("a delivery")
            .expect("open")
            .expect("delivery");
        let i: usize = String::from_utf8_lossy(&d.data).parse().expect("a number");
        first.push(i);
        // Out of order: every other one is acked at once, the rest in a second pass.
        acked.insert(i);
        d.ack(BasicAckOptions::default()).await.expect("ack");
    }
    ch.queue_declare(
        "durable".into(),
        QueueDeclareOptions {
            passive: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .expect("the node answered after the acks");
    let mut sorted = first.clone();
    sorted.sort_unstable();
    assert_eq!(first, sorted, "in order");
    node.kill();

    // Restarted again: everything confirmed and not acked arrives, none of the acked.
    let node = cloud(&dir);
    let conn = Connection::connect(&uri(&node), ConnectionProperties::default())
        .await
        .expect("connect");
    let ch = conn.create_channel().await.expect("channel");
    let mut consumer = ch
        .basic_consume(
            "durable".into(),
            "c".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("consume");
    let mut rest = Vec::new();
    // Until nothing more comes for 3 s.
    while let Ok(Some(Ok(d))) = tokio::time::timeout(Duration::from_secs(3), consumer.next()).await
    {
        let i = String::from_utf8_lossy(&d.data).parse::<usize>();
        rest.push(i.expect("a number"));
    }
    let again: Vec<_> = rest.iter().filter(|i| acked.contains(i)).collect();
    assert!(
        again.is_empty(),
        "acked before the kill, delivered again: {again:?}"
    );
    let got: BTreeSet<usize> = rest.iter().copied().collect();
    let missing: Vec<_> = confirmed
        .difference(&acked)
        .filter(|i| !got.contains(i))
        .take(10)
        .collect();
    assert!(
        missing.is_empty(),
        "confirmed, never delivered: {missing:?}"
    );
    let mut sorted = rest.clone();
    sorted.sort_unstable();
    assert_eq!(rest, sorted, "in order");
}
