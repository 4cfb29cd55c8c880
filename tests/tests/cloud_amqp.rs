//! ferry-cloud's AMQP front against lapin (the Rust AMQP client): publisher confirms,
//! manual acks with prefetch, every basic property kept, redelivery of what a closed
//! channel left unacked, refusals with RabbitMQ's reply codes, and the one log seen three
//! ways (MQTT → AMQP through amq.topic, AMQP → MQTT).

use std::time::Duration;

use ferry_cloud::node::{CloudConfig, Node};
use ferry_tests::clients::next_incoming;
use ferry_tests::process::temp_dir;
use futures_util::StreamExt;
use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};

/// A node in this process with MQTT and AMQP on ephemeral ports: (node, AMQP URI).
async fn node(name: &str) -> (Node, String) {
    let mut config = CloudConfig::default();
    config.server.listen = vec!["127.0.0.1:0".parse().expect("addr")];
    config.server.data_dir = temp_dir(name);
    config.amqp = Some(ferry_cloud::amqp::AmqpConfig {
        listen: "127.0.0.1:0".parse().expect("addr"),
        ..Default::default()
    });
    ferry_tests::services::in_process(&mut config);
    let node = Node::start(config, std::future::pending())
        .await
        .expect("the node starts");
    let uri = format!(
        "amqp://127.0.0.1:{}/%2f",
        node.amqp_addr.expect("amqp").port()
    );
    (node, uri)
}

async fn channel(uri: &str) -> (Connection, Channel) {
    let conn = Connection::connect(uri, ConnectionProperties::default())
        .await
        .expect("connect");
    let ch = conn.create_channel().await.expect("channel");
    (conn, ch)
}

/// Waits for the next delivery of `consumer`, at most 10 s.
async fn next(consumer: &mut lapin::Consumer) -> lapin::message::Delivery {
    tokio::time::timeout(Duration::from_secs(10), consumer.next())
        .await
        .expect("a delivery within 10 s")
        .expect("the consumer is open")
        .expect("a delivery")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confirmed_publishes_are_consumed_in_order_with_their_properties_and_acks() {
    let (_node, uri) = node("amqp-confirm").await;
    let (_conn, ch) = channel(&uri).await;
    let q = ch
        .queue_declare(
            "orders".into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("declare");
    assert_eq!(q.message_count(), 0);
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    let mut headers = FieldTable::default();
    headers.insert("site".into(), AMQPValue::LongString("plant-1".into()));
    let props = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_delivery_mode(2)
        .with_correlation_id("corr-1".into())
        .with_message_id("m-0".into())
        .with_app_id("test".into())
        .with_headers(headers);
    let mut confirms = Vec::new();
    for i in 0..500 {
        let confirm = ch
            .basic_publish(
                "".into(),
                "orders".into(),
                BasicPublishOptions::default(),
                format!("order {i}").as_bytes(),
                props.clone(),
            )
            .await
            .expect("publish");
        confirms.push(confirm);
    }
    for c in confirms {
        assert!(
            c.await.expect("confirm").is_ack(),
            "every publish is acked once durable"
        );
    }
    let q = ch
        .queue_declare(
            "orders".into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("passive declare");
    assert_eq!(q.message_count(), 500, "the queue counts what reached it");

    ch.basic_qos(50, BasicQosOptions::default())
        .await
        .expect("qos");
    let mut consumer = ch
        .basic_consume(
            "orders".into(),
            "c1".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");
    for i in 0..500 {
        let d = next(&mut consumer).await;
        assert_eq!(String::from_utf8_lossy(&d.data), format!("order {i}"));
        assert_eq!(d.properties, props, "message {i} keeps its properties");
        assert!(!d.redelivered);
        assert_eq!(d.routing_key.as_str(), "orders");
        d.ack(BasicAckOptions::default()).await.expect("ack");
    }
    // Nothing more: a get finds the queue empty.
    let (_c2, ch2) = channel(&uri).await;
    assert!(ch2
        .basic_get("orders".into(), BasicGetOptions::default())
        .await
        .expect("get")
        .is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_a_closed_channel_left_unacked_is_redelivered_and_nack_requeues() {
    let (_node, uri) = node("amqp-redeliver").await;
    let (conn, ch) = channel(&uri).await;
    ch.queue_declare(
        "jobs".into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("declare");
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    for i in 0..10 {
        ch.basic_publish(
            "".into(),
            "jobs".into(),
            BasicPublishOptions::default(),
            format!("job {i}").as_bytes(),
            BasicProperties::default(),
        )
        .await
        .expect("publish")
        .await
        .expect("confirm");
    }
    // A consumer takes five (prefetch 5) and acks none; its channel closes.
    let c1 = conn.create_channel().await.expect("channel");
    c1.basic_qos(5, BasicQosOptions::default())
        .await
        .expect("qos");
    let mut first = c1
        .basic_consume(
            "jobs".into(),
            "first".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");
    for i in 0..5 {
        let d = next(&mut first).await;
        assert_eq!(String::from_utf8_lossy(&d.data), format!("job {i}"));
    }
    c1.close(200, "bye".into()).await.expect("close");
    // Another gets all ten: the first five again, marked redelivered; a nack with requeue
    // brings one back once more.
    let c2 = conn.create_channel().await.expect("channel");
    let mut second = c2
        .basic_consume(
            "jobs".into(),
            "second".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");
    let mut got = Vec::new();
    for _ in 0..10 {
        let d = next(&mut second).await;
        got.push((String::from_utf8_lossy(&d.data).into_owned(), d.redelivered));
        if got.len() == 10 {
            d.nack(BasicNackOptions {
                requeue: true,
                ..Default::default()
            })
            .await
            .expect("nack");
        } else {
            d.ack(BasicAckOptions::default()).await.expect("ack");
        }
    }
    let expected: Vec<_> = (0..10).map(|i| (format!("job {i}"), i < 5)).collect();
    assert_eq!(got, expected);
    let again = next(&mut second).await;
    assert_eq!(
        (
            String::from_utf8_lossy(&again.data).into_owned(),
            again.redelivered
        ),
        ("job 9".to_owned(), true)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_carry_rabbitmqs_reply_codes() {
    let (_node, uri) = node("amqp-refusals").await;
    let (conn, ch) = channel(&uri).await;
    // A passive declare of a missing queue: 404, the channel closes.
    let e = ch
        .queue_declare(
            "missing".into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect_err("no such queue");
    assert!(
        format!("{e:?}").contains("NOT_FOUND") || format!("{e}").contains("404"),
        "{e}"
    );
    // An unknown argument: 406 PRECONDITION_FAILED.
    let ch = conn.create_channel().await.expect("channel");
    let mut args = FieldTable::default();
    args.insert("x-no-such-thing".into(), AMQPValue::Boolean(true));
    let e = ch
        .queue_declare("q".into(), QueueDeclareOptions::default(), args)
        .await
        .expect_err("unknown argument");
    assert!(format!("{e:?}").contains("PRECONDITION_FAILED"), "{e:?}");
    // Publishing to a missing exchange: 404 on the channel.
    let ch = conn.create_channel().await.expect("channel");
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    let published = ch
        .basic_publish(
            "nope".into(),
            "k".into(),
            BasicPublishOptions::default(),
            b"x",
            BasicProperties::default(),
        )
        .await;
    let failed = match published {
        Err(_) => true,
        Ok(confirm) => confirm.await.is_err() || !ch.status().connected(),
    };
    assert!(failed, "a publish to a missing exchange fails its channel");
    // The connection survived the channel errors.
    let ch = conn
        .create_channel()
        .await
        .expect("the connection is still open");
    ch.queue_declare(
        "fine".into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("declare");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_and_amqp_see_each_others_messages_through_amq_topic() {
    use rumqttc::{AsyncClient, Incoming, MqttOptions, QoS};
    let (node, uri) = node("amqp-mqtt").await;
    let port = node.mqtt_addrs()[0].port();
    let (_conn, ch) = channel(&uri).await;
    ch.queue_declare(
        "temps".into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("declare");
    ch.queue_bind(
        "temps".into(),
        "amq.topic".into(),
        "gw-7.sensors.*.temp".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("bind");
    let mut consumer = ch
        .basic_consume(
            "temps".into(),
            "t".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("consume");

    let (mqtt, mut events) =
        AsyncClient::new(MqttOptions::new("amqp-mqtt", "127.0.0.1", port), 100);
    mqtt.subscribe("plant/#", QoS::AtLeastOnce)
        .await
        .expect("subscribe");
    while !matches!(
        next_incoming(&mut events, "SUBACK").await,
        Incoming::SubAck(_)
    ) {}
    // MQTT → AMQP: only the matching topic reaches the queue.
    let (publisher, mut pub_events) =
        AsyncClient::new(MqttOptions::new("amqp-mqtt-pub", "127.0.0.1", port), 100);
    tokio::spawn(async move { while pub_events.poll().await.is_ok() {} });
    publisher
        .publish("gw-7/sensors/s1/humidity", QoS::AtLeastOnce, false, "55")
        .await
        .expect("publish");
    publisher
        .publish("gw-7/sensors/s1/temp", QoS::AtLeastOnce, false, "21.5")
        .await
        .expect("publish");
    let d = next(&mut consumer).await;
    assert_eq!(
        (d.exchange.as_str(), d.routing_key.as_str()),
        ("amq.topic", "gw-7.sensors.s1.temp")
    );
    assert_eq!(&d.data[..], b"21.5");
    assert_eq!(
        *d.properties.delivery_mode(),
        Some(2),
        "QoS 1 is persistent"
    );

    // AMQP → MQTT: a publish to amq.topic is an MQTT message under the mapped topic.
    ch.exchange_declare(
        "unused".into(),
        ExchangeKind::Fanout,
        ExchangeDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("exchange");
    ch.basic_publish(
        "amq.topic".into(),
        "plant.line1.speed".into(),
        BasicPublishOptions::default(),
        b"7",
        BasicProperties::default().with_delivery_mode(2),
    )
    .await
    .expect("publish");
    loop {
        if let Incoming::Publish(p) = next_incoming(&mut events, "the AMQP publish over MQTT").await
        {
            assert_eq!(
                (p.topic.as_str(), &p.payload[..]),
                ("plant/line1/speed", &b"7"[..])
            );
            break;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_publishes_and_acks_at_commit_and_nothing_at_rollback() {
    let (_node, uri) = node("amqp-tx").await;
    let (_conn, ch) = channel(&uri).await;
    ch.queue_declare(
        "tx".into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("declare");
    ch.tx_select().await.expect("tx.select");
    let publish = |body: &'static str| {
        let ch = ch.clone();
        async move {
            ch.basic_publish(
                "".into(),
                "tx".into(),
                BasicPublishOptions::default(),
                body.as_bytes(),
                BasicProperties::default(),
            )
            .await
            .expect("publish");
        }
    };
    publish("rolled back").await;
    ch.tx_rollback().await.expect("rollback");
    publish("one").await;
    publish("two").await;
    ch.tx_commit().await.expect("commit");
    let (_c2, reader) = channel(&uri).await;
    let mut got = Vec::new();
    for _ in 0..50 {
        match reader
            .basic_get("tx".into(), BasicGetOptions { no_ack: true })
            .await
            .expect("get")
        {
            Some(m) => got.push(String::from_utf8_lossy(&m.delivery.data).into_owned()),
            None if got.len() == 2 => break,
            None => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    assert_eq!(
        got,
        ["one", "two"],
        "what was committed, nothing rolled back"
    );
}

/// The whole answer (head and body) to `GET path`.
fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .expect("request");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("response");
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_and_metrics_show_queues_connections_and_bindings() {
    let (node, uri) = node("amqp-admin").await;
    let admin = ferry_cloud::admin::serve_local("127.0.0.1:0".parse().expect("addr"), node.clone())
        .await
        .expect("admin");
    let (_conn, ch) = channel(&uri).await;
    ch.queue_declare(
        "watched".into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .expect("declare");
    ch.queue_bind(
        "watched".into(),
        "amq.direct".into(),
        "w".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("bind");
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    for _ in 0..7 {
        ch.basic_publish(
            "amq.direct".into(),
            "w".into(),
            BasicPublishOptions::default(),
            b"1234567890",
            BasicProperties::default(),
        )
        .await
        .expect("publish")
        .await
        .expect("confirm");
    }
    let mut body = String::new();
    ferry_tests::process::wait_until(10, "the overview shows 7 ready", || {
        body = http_get(admin, "/api/amqp");
        body.contains("\"ready\":7")
    });
    let json: serde_json::Value =
        serde_json::from_str(body.split("\r\n\r\n").nth(1).expect("a body")).expect("json");
    let q = json["queues"]
        .as_array()
        .expect("queues")
        .iter()
        .find(|q| q["name"] == "watched")
        .expect("the queue")
        .clone();
    assert_eq!(
        (q["ready"].as_u64(), q["ready_bytes"].as_u64()),
        (Some(7), Some(70))
    );
    assert_eq!(json["connections"].as_array().map(Vec::len), Some(1));
    assert!(json["bindings"]
        .as_array()
        .expect("bindings")
        .iter()
        .any(|b| b["source"] == "amq.direct" && b["destination"] == "watched"));
    assert!(json["exchanges"]
        .as_array()
        .expect("exchanges")
        .iter()
        .any(|x| x["name"] == "amq.topic" && x["kind"] == "topic"));
    let metrics = http_get(admin, "/metrics");
    assert!(
        metrics.contains("ferry_cloud_amqp_queue_ready{vhost=\"/\",queue=\"watched\"} 7"),
        "{metrics}"
    );
    assert!(
        metrics.contains("ferry_cloud_amqp_published_total 7"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_consumers_read_what_amqp_clients_published() {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::message::{Headers, Message};
    let mut config = CloudConfig::default();
    config.server.listen = vec!["127.0.0.1:0".parse().expect("addr")];
    config.server.data_dir = temp_dir("amqp-kafka");
    config.amqp = Some(ferry_cloud::amqp::AmqpConfig {
        listen: "127.0.0.1:0".parse().expect("addr"),
        ..Default::default()
    });
    config.kafka = Some(ferry_cloud::kafka::KafkaConfig {
        listen: "127.0.0.1:0".parse().expect("addr"),
        ..Default::default()
    });
    ferry_tests::services::in_process(&mut config);
    let node = Node::start(config, std::future::pending())
        .await
        .expect("the node starts");
    let uri = format!(
        "amqp://127.0.0.1:{}/%2f",
        node.amqp_addr.expect("amqp").port()
    );
    let (_conn, ch) = channel(&uri).await;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    for i in 0..5 {
        ch.basic_publish(
            "amq.direct".into(),
            "orders.new".into(),
            BasicPublishOptions::default(),
            format!("order {i}").as_bytes(),
            BasicProperties::default().with_delivery_mode(2),
        )
        .await
        .expect("publish")
        .await
        .expect("confirm");
    }
    let bootstrap = node.kafka_addr.expect("kafka").to_string();
    let got = tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", &bootstrap)
            .set("group.id", "amqp-readers")
            .set("auto.offset.reset", "earliest")
            .create()
            .expect("consumer");
        consumer
            .subscribe(&[ferry_cloud::amqp::AMQP_STREAM])
            .expect("subscribe");
        let mut got = Vec::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while got.len() < 5 && std::time::Instant::now() < deadline {
            if let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) {
                let exchange = m.headers().and_then(|h| {
                    h.iter()
                        .find(|h| h.key == "amqp.exchange")
                        .and_then(|h| h.value.map(|v| String::from_utf8_lossy(v).into_owned()))
                });
                got.push((
                    String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned(),
                    String::from_utf8_lossy(m.payload().unwrap_or_default()).into_owned(),
                    exchange,
                ));
            }
        }
        got
    })
    .await
    .expect("consumer thread");
    let expected: Vec<_> = (0..5)
        .map(|i| {
            (
                "orders.new".to_owned(),
                format!("order {i}"),
                Some("amq.direct".to_owned()),
            )
        })
        .collect();
    assert_eq!(
        got, expected,
        "key = routing key, value = body, the exchange as a header"
    );
}

/// One AMQP frame as bytes: a method (class, method, arguments) on `channel`.
fn method_frame(channel: u16, class: u16, method: u16, args: &[u8]) -> Vec<u8> {
    let mut f = vec![1u8];
    f.extend_from_slice(&channel.to_be_bytes());
    f.extend_from_slice(&(4 + args.len() as u32).to_be_bytes());
    f.extend_from_slice(&class.to_be_bytes());
    f.extend_from_slice(&method.to_be_bytes());
    f.extend_from_slice(args);
    f.push(0xCE);
    f
}

/// A client's handshake up to channel 1 open, as guest, sent in one go without reading.
fn raw_handshake() -> Vec<u8> {
    let mut out = b"AMQP\x00\x00\x09\x01".to_vec();
    let mut start_ok = 0u32.to_be_bytes().to_vec(); // client properties: an empty table
    start_ok.extend_from_slice(b"\x05PLAIN");
    let response = b"\0guest\0guest";
    start_ok.extend_from_slice(&(response.len() as u32).to_be_bytes());
    start_ok.extend_from_slice(response);
    start_ok.extend_from_slice(b"\x05en_US");
    out.extend(method_frame(0, 10, 11, &start_ok));
    let mut tune_ok = 16u16.to_be_bytes().to_vec();
    tune_ok.extend_from_slice(&131_072u32.to_be_bytes());
    tune_ok.extend_from_slice(&0u16.to_be_bytes());
    out.extend(method_frame(0, 10, 31, &tune_ok));
    out.extend(method_frame(0, 10, 40, b"\x01/\x00\x00"));
    out.extend(method_frame(1, 20, 10, b"\x00"));
    out
}

/// Reads until the peer ends the connection (EOF or reset), at most `secs`: true if it did.
async fn ends_within(stream: &mut tokio::net::TcpStream, secs: u64) -> bool {
    use tokio::io::AsyncReadExt;
    let mut buf = vec![0u8; 1 << 16];
    let read_all = async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(secs), read_all)
        .await
        .is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_stops_reading_stalls_nobody_and_silent_sockets_are_closed() {
    use tokio::io::AsyncWriteExt;
    let (node, uri) = node("amqp-stuck").await;
    let addr = node.amqp_addr.expect("amqp");
    // A socket that sends nothing, and one that sends only its protocol header.
    let mut silent = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let mut header_only = tokio::net::TcpStream::connect(addr).await.expect("connect");
    header_only
        .write_all(b"AMQP\x00\x00\x09\x01")
        .await
        .expect("header");
    // A client that never reads, with a small receive buffer: its replies back up into the
    // server's writer queue.
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("rcvbuf");
    let mut stuck = socket.connect(addr).await.expect("connect");
    let mut flood = raw_handshake();
    // basic.qos (prefetch 10) many times: each is answered with qos-ok, none is read.
    let qos = method_frame(1, 60, 10, &[0, 0, 0, 0, 0, 10, 0]);
    for _ in 0..800_000 {
        flood.extend_from_slice(&qos);
    }
    stuck.write_all(&flood).await.expect("flood");
    tokio::time::sleep(Duration::from_secs(2)).await;
    // Then a frame with a broken end: the server closes the connection, with its close
    // queued behind what the client did not read.
    let mut bad = method_frame(1, 60, 10, &[0, 0, 0, 0, 0, 10, 0]);
    *bad.last_mut().expect("end") = 0x00;
    stuck.write_all(&bad).await.expect("bad frame");
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Everyone else is still served.
    let served = async {
        let (conn, ch) = channel(&uri).await;
        ch.queue_declare(
            "still-served".into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("declare");
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .expect("confirms");
        ch.basic_publish(
            "".into(),
            "still-served".into(),
            BasicPublishOptions::default(),
            b"x",
            BasicProperties::default(),
        )
        .await
        .expect("publish")
        .await
        .expect("confirm");
        conn
    };
    let _conn = tokio::time::timeout(Duration::from_secs(10), served)
        .await
        .expect("another client is served while one does not read");
    // The one that does not read is let go after the send timeout (15 s), without reading
    // a byte of it; the silent ones after the handshake timeout (10 s).
    let amqp = node.amqp.clone().expect("the AMQP front");
    ferry_tests::process::wait_until(30, "only the lapin connection is left", || {
        amqp.overview().connections.len() == 1
    });
    assert!(
        ends_within(&mut silent, 5).await,
        "the silent socket is closed"
    );
    assert!(
        ends_within(&mut header_only, 5).await,
        "the socket that sent only its header is closed"
    );
}
