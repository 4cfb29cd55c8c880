//! `ferry-cloud demo`: the whole path in one process, on embedded defaults. A cloud node, an
//! edge linked to it over QUIC (certificates made in the data directory on first run), and
//! a simulated temperature sensor publishing to the edge once a second.
//!
//! ```text
//! sensor ─MQTT─▶ edge 127.0.0.1:1883 ─outbox─QUIC 127.0.0.1:7883─▶ cloud log ─▶ MQTT 127.0.0.1:1884
//!                                                                              ─▶ Kafka 127.0.0.1:9092
//! ```

use std::net::SocketAddr;
use std::num::NonZeroU16;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use bytes::BytesMut;
use ferry_edge::config::Config as EdgeConfig;
use ferry_edge::server::Server;
use ferry_edge::uplink::UplinkRoute;
use ferry_protocol::mqtt::{decode, Connect, Packet, ProtocolVersion, Publish, QoS};
use ferry_protocol::topic::TopicName;
use tokio::io::AsyncWriteExt;
use tracing::{info, warn};

use crate::link_sink::LinkConfig;
use crate::node::{CloudConfig, Node};

/// The demo edge's id (its certificate's common name).
pub const EDGE_ID: &str = "demo-edge";
/// The topic the simulated sensor publishes on (on the cloud: `demo-edge/<topic>`).
pub const SENSOR_TOPIC: &str = "sensors/demo/temperature";

/// Where the demo keeps its data and where its parts listen (`ferry-cloud demo`'s flags).
#[derive(Debug, Clone, clap::Args)]
pub struct DemoOptions {
    /// Where the demo keeps its certificates and data.
    #[arg(long, value_name = "DIR", default_value = "ferry-demo")]
    pub data_dir: PathBuf,
    /// The edge's MQTT listener (sensors publish here).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:1883")]
    pub edge_listen: SocketAddr,
    /// The cloud's MQTT listener (watch the data here).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:1884")]
    pub cloud_listen: SocketAddr,
    /// The cloud's link listener (QUIC, UDP).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:7883")]
    pub link_listen: SocketAddr,
    /// The cloud's admin HTTP listener.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8080")]
    pub admin_listen: SocketAddr,
    /// The cloud's Kafka listener (consume the data with kcat).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:9092")]
    pub kafka_listen: SocketAddr,
    /// The cloud's AMQP listener (consume the data with any RabbitMQ client).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:5672")]
    pub amqp_listen: SocketAddr,
    /// Milliseconds between two sensor readings.
    #[arg(long, value_name = "MS", default_value_t = 1000)]
    pub interval_ms: u64,
}

/// Runs the demo until `stop` completes.
pub async fn run(
    opts: DemoOptions,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let pki = opts.data_dir.join("pki");
    if !pki.join("ca.crt").exists() {
        ferry_bridge::pki::init(&pki)?;
        ferry_bridge::pki::issue_edge(&pki, EDGE_ID)?;
        ferry_bridge::pki::issue_node(&pki, "localhost")?;
    }
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };

    let mut cloud = CloudConfig::default();
    cloud.server.listen = vec![opts.cloud_listen];
    cloud.server.data_dir = opts.data_dir.join("cloud");
    cloud.link = Some(LinkConfig {
        listen: opts.link_listen,
        ca_file: pki.join("ca.crt"),
        cert_file: pki.join("nodes/localhost.crt"),
        key_file: pki.join("nodes/localhost.key"),
        ..LinkConfig::default()
    });
    cloud.kafka = Some(crate::kafka::KafkaConfig {
        listen: opts.kafka_listen,
        ..Default::default()
    });
    cloud.amqp = Some(crate::amqp::AmqpConfig {
        listen: opts.amqp_listen,
        ..Default::default()
    });
    let node = Node::start(cloud, stopped(stop_rx.clone()))
        .await
        .context("cannot start the cloud node")?;
    let link = node
        .link
        .as_ref()
        .map(|l| l.local_addr())
        .context("the link listener")?;
    let admin = crate::admin::serve_local(opts.admin_listen, node.clone())
        .await
        .context("cannot start the admin listener")?;

    let mut edge = EdgeConfig::default();
    edge.server.listen = vec![opts.edge_listen];
    edge.server.data_dir = opts.data_dir.join("edge");
    edge.uplink.cloud = vec![link.to_string()];
    edge.uplink.server_name = Some("localhost".into());
    edge.uplink.ca_file = Some(pki.join("ca.crt"));
    edge.uplink.cert_file = Some(pki.join(format!("edges/{EDGE_ID}.crt")));
    edge.uplink.key_file = Some(pki.join(format!("edges/{EDGE_ID}.key")));
    edge.uplink.route = vec![UplinkRoute {
        filter: "sensors/#".into(),
        qos: 1,
        priority: 0,
        cloud_topic: None,
    }];
    let edge = Server::start(edge, stopped(stop_rx.clone()))
        .await
        .context("cannot start the edge")?;
    let edge_addr = edge.local_addrs()[0];
    let cloud_addr = node.mqtt_addrs()[0];
    let kafka = node.kafka_addr.context("the Kafka listener")?;
    let amqp = node.amqp_addr.context("the AMQP listener")?;
    info!(
        addrs = ?[cloud_addr],
        edge_addrs = ?[edge_addr],
        link_addrs = ?[link],
        admin_addrs = ?[admin],
        kafka_addrs = ?[kafka],
        amqp_addrs = ?[amqp],
        "ferry-cloud ready (demo)"
    );
    println!(
        "\nFerry demo: a sensor publishes {SENSOR_TOPIC} to the edge, the edge forwards it over QUIC to the cloud.\n\
         \n  edge   MQTT  {edge_addr}\n  cloud  MQTT  {cloud_addr}   link (QUIC) {link}   admin http://{admin}/api/edges\n\
         \nWatch the data arrive in the cloud, over MQTT or Kafka (the stream \"mqtt\"):\n\n  mosquitto_sub -h {} -p {} -t '{EDGE_ID}/#' -v\n  kcat -b {kafka} -C -t mqtt -f '%k %s\\n'\n\
         \nThe edge's link and what the cloud committed of it: curl http://{admin}/api/edges\n\
         Certificates and data live in {}. Ctrl-C stops.\n",
        cloud_addr.ip(),
        cloud_addr.port(),
        opts.data_dir.display()
    );
    let sensor = tokio::spawn(sensor(edge_addr, Duration::from_millis(opts.interval_ms)));
    stop.await;
    sensor.abort();
    let _ = stop_tx.send(true);
    if let Some(l) = &node.link {
        l.close();
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    Ok(())
}

/// A temperature sensor: QoS 1 readings, one per `interval`, reconnecting when the edge is
/// away.
async fn sensor(edge: SocketAddr, interval: Duration) {
    let mut reading: u64 = 0;
    loop {
        if let Err(e) = publish_readings(edge, interval, &mut reading).await {
            warn!(error = %e, "demo sensor: reconnecting");
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

async fn publish_readings(
    edge: SocketAddr,
    interval: Duration,
    reading: &mut u64,
) -> anyhow::Result<()> {
    const V: ProtocolVersion = ProtocolVersion::V5;
    let mut stream = tokio::net::TcpStream::connect(edge).await?;
    let mut out = BytesMut::new();
    let mut connect = Connect::new(V, "demo-sensor");
    connect.keep_alive_secs = 60;
    Packet::Connect(Box::new(connect)).encode(V, &mut out)?;
    stream.write_all(&out).await?;
    let mut inbuf = BytesMut::new();
    let topic = TopicName::new(SENSOR_TOPIC.to_owned())?;
    let mut ticks = tokio::time::interval(interval);
    loop {
        ticks.tick().await;
        *reading += 1;
        // A slow daily wave and some noise, in tenths of a degree.
        let tenths = 215 + ((*reading as f64 / 30.0).sin() * 30.0) as i64 + (*reading % 7) as i64;
        let payload = format!(
            "{{\"sensor\":\"t1\",\"reading\":{},\"celsius\":{}.{}}}",
            reading,
            tenths / 10,
            tenths % 10
        );
        let mut p = Publish::new(topic.clone(), payload);
        p.qos = QoS::AtLeastOnce;
        p.packet_id = NonZeroU16::new((*reading % 60_000 + 1) as u16);
        out.clear();
        Packet::Publish(p).encode(V, &mut out)?;
        stream.write_all(&out).await?;
        // Drain CONNACK and PUBACKs as they come; the sensor does not wait for them.
        while let Ok(n) = stream.try_read_buf(&mut inbuf) {
            if n == 0 {
                anyhow::bail!("the edge closed the connection");
            }
            while decode(&mut inbuf, V, 1 << 20)?.is_some() {}
        }
    }
}
