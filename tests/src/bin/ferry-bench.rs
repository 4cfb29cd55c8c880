//! `ferry-bench`: a load tool for any MQTT broker, built on Ferry's codec over plain TCP.
//!
//! ```text
//! ferry-bench fan-in  --port 1883 --publishers 4 --qos 1 --payload 100 --secs 10
//! ferry-bench fan-out --port 1883 --subscribers 4 --qos 0 --payload 100 --secs 10
//! ferry-bench latency --port 1883 --rate 5000 --qos 0 --payload 100 --secs 10
//! ferry-bench idle    --port 1883 --connections 1000 --pid $(pidof ferry-edge) --secs 5
//! ferry-bench fill    --port 1883 --publishers 4 --count 1000000 --qos 1 --topic up/bench   # random text payloads
//! ferry-bench latency --port 1883 --qos 1 --topic up/lat --sub-port 1884 --sub-filter gw-1/up/lat
//! ```
//!
//! `--persistent` (fan-in): the subscriber's session outlives its connection, so a broker
//! that persists sessions has each QoS ≥ 1 message on disk before it acknowledges it.
//!
//! fan-in: N publishers to one subscriber. Reports what the publishers sent (QoS 0) or had
//! acknowledged (QoS 1/2), what the subscriber received, and for QoS ≥ 1 how many
//! acknowledged messages never arrived (after the subscriber has drained).
//! fan-out: one publisher to N subscribers on the same topic. latency: one publisher at a
//! fixed rate, one subscriber; the payload carries the send time; percentiles of the
//! one-way delay (same machine, same clock). idle: N clients connect, subscribe to a topic
//! each and stay quiet; with `--pid` the broker's resident memory (VmRSS) is read before they
//! connect and after they have been idle for `--secs`. fill: N publishers send `--count`
//! messages in all to `--topic` as fast as they are acknowledged, then stop (to make a
//! backlog). latency with `--sub-port`/`--sub-filter`: the subscriber is on another broker
//! (an edge's messages read on the cloud). Every client sets TCP_NODELAY; MQTT 3.1.1.

use std::num::NonZeroU16;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use ferry_protocol::mqtt::{
    decode, Connect, Packet, Properties, ProtocolVersion, PubResponse, Publish, QoS, Subscribe,
    Subscription, SubscriptionOptions, MAX_PACKET_SIZE,
};
use ferry_protocol::topic::{TopicFilter, TopicName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const V: ProtocolVersion = ProtocolVersion::V311;
/// QoS 1/2 messages a publisher keeps unacknowledged (the usual client default).
const WINDOW: usize = 64;

struct Args {
    mode: String,
    host: String,
    port: u16,
    clients: usize,
    qos: QoS,
    payload: usize,
    secs: u64,
    rate: u64,
    /// fan-in: the subscriber keeps a persistent session (clean session 0), so a broker that
    /// persists sessions writes every QoS ≥ 1 message to disk before acknowledging it.
    persistent: bool,
    /// idle: the broker's process id, to read its resident memory from /proc.
    pid: Option<u32>,
    /// fill: messages in all.
    count: u64,
    /// fill, latency: the topic published to.
    topic: Option<String>,
    /// latency: the subscriber's broker port (default `port`) and filter (default the topic).
    sub_port: Option<u16>,
    sub_filter: Option<String>,
}

fn parse() -> Result<Args, String> {
    let mut it = std::env::args().skip(1);
    let mode = it.next().ok_or("usage: ferry-bench fan-in|fan-out|latency|idle|fill [--host H] [--port P] [--publishers N|--subscribers N|--connections N] [--pid BROKER_PID] [--qos Q] [--payload BYTES] [--secs S] [--rate MSG_PER_SEC] [--count N] [--topic T] [--sub-port P] [--sub-filter F]")?;
    let mut a = Args {
        mode,
        host: "127.0.0.1".into(),
        port: 1883,
        clients: 4,
        qos: QoS::AtMostOnce,
        payload: 100,
        secs: 10,
        rate: 5000,
        persistent: false,
        pid: None,
        count: 100_000,
        topic: None,
        sub_port: None,
        sub_filter: None,
    };
    while let Some(flag) = it.next() {
        if flag == "--persistent" {
            a.persistent = true;
            continue;
        }
        let value = it.next().ok_or(format!("{flag} needs a value"))?;
        let num = |v: &str| v.parse::<u64>().map_err(|e| format!("{flag}: {e}"));
        match flag.as_str() {
            "--host" => a.host = value,
            "--port" => a.port = num(&value)? as u16,
            "--pid" => a.pid = Some(num(&value)? as u32),
            "--publishers" | "--subscribers" | "--connections" => a.clients = num(&value)? as usize,
            "--qos" => a.qos = QoS::from_u8(num(&value)? as u8).map_err(|e| e.to_string())?,
            "--payload" => a.payload = num(&value)? as usize,
            "--secs" => a.secs = num(&value)?,
            "--rate" => a.rate = num(&value)?,
            "--count" => a.count = num(&value)?,
            "--topic" => a.topic = Some(value),
            "--sub-port" => a.sub_port = Some(num(&value)? as u16),
            "--sub-filter" => a.sub_filter = Some(value),
            other => return Err(format!("unknown flag {other}")),
        }
    }
    Ok(a)
}

#[tokio::main]
async fn main() {
    let args = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    let result = match args.mode.as_str() {
        "fan-in" => fan_in(&args).await,
        "fan-out" => fan_out(&args).await,
        "latency" => latency(&args).await,
        "idle" => idle(&args).await,
        "fill" => fill(&args).await,
        other => Err(format!("unknown mode {other}")),
    };
    if let Err(e) = result {
        eprintln!("ferry-bench: {e}");
        std::process::exit(1);
    }
}

struct Conn {
    stream: TcpStream,
    buf: BytesMut,
}

impl Conn {
    async fn open(args: &Args, client_id: &str) -> Result<Self, String> {
        Self::open_with(args, client_id, true).await
    }

    async fn open_with(args: &Args, client_id: &str, clean: bool) -> Result<Self, String> {
        Self::open_port(args, args.port, client_id, clean).await
    }

    async fn open_port(
        args: &Args,
        port: u16,
        client_id: &str,
        clean: bool,
    ) -> Result<Self, String> {
        let stream = TcpStream::connect((args.host.as_str(), port))
            .await
            .map_err(|e| format!("connect: {e}"))?;
        stream.set_nodelay(true).map_err(|e| e.to_string())?;
        let mut conn = Self {
            stream,
            buf: BytesMut::new(),
        };
        let mut connect = Connect::new(V, client_id);
        connect.keep_alive_secs = 0;
        connect.clean_start = clean;
        conn.send(&[Packet::Connect(Box::new(connect))]).await?;
        match conn.next().await? {
            Packet::ConnAck(ack) if !ack.code.is_error() => Ok(conn),
            other => Err(format!("connect refused: {other:?}")),
        }
    }

    async fn send(&mut self, packets: &[Packet]) -> Result<(), String> {
        let mut out = BytesMut::new();
        for p in packets {
            p.encode(V, &mut out).map_err(|e| e.to_string())?;
        }
        self.stream.write_all(&out).await.map_err(|e| e.to_string())
    }

    async fn next(&mut self) -> Result<Packet, String> {
        loop {
            if let Some(p) = decode(&mut self.buf, V, MAX_PACKET_SIZE).map_err(|e| e.to_string())? {
                return Ok(p);
            }
            if self
                .stream
                .read_buf(&mut self.buf)
                .await
                .map_err(|e| e.to_string())?
                == 0
            {
                return Err("connection closed".into());
            }
        }
    }

    async fn subscribe(&mut self, filter: &str, qos: QoS) -> Result<(), String> {
        let sub = Subscribe {
            packet_id: NonZeroU16::MIN,
            properties: Properties::default(),
            subscriptions: vec![Subscription {
                filter: TopicFilter::new(filter).map_err(|e| e.to_string())?,
                options: SubscriptionOptions::new(qos),
            }],
        };
        self.send(&[Packet::Subscribe(sub)]).await?;
        loop {
            if let Packet::SubAck(_) = self.next().await? {
                return Ok(());
            }
        }
    }
}

/// Counts what a subscriber receives (acknowledging QoS 1) until `stop` and then until the
/// flow has been quiet for a second. Returns the count and the instant of the last message.
async fn receive(
    mut conn: Conn,
    stop: Arc<AtomicBool>,
    count: Arc<AtomicU64>,
    mut on_msg: impl FnMut(&Publish),
) -> Result<(), String> {
    loop {
        let next = tokio::time::timeout(Duration::from_secs(1), conn.next()).await;
        let packet = match next {
            Err(_) if stop.load(Ordering::Relaxed) => return Ok(()),
            Err(_) => continue,
            Ok(p) => p?,
        };
        if let Packet::Publish(p) = packet {
            count.fetch_add(1, Ordering::Relaxed);
            on_msg(&p);
            let ack = match (p.qos, p.packet_id) {
                (QoS::AtLeastOnce, Some(id)) => Some(Packet::PubAck(PubResponse::new(id))),
                (QoS::ExactlyOnce, Some(id)) => Some(Packet::PubRec(PubResponse::new(id))),
                _ => None,
            };
            if let Some(ack) = ack {
                conn.send(&[ack]).await?;
            }
        } else if let Packet::PubRel(r) = packet {
            conn.send(&[Packet::PubComp(PubResponse::new(r.packet_id))])
                .await?;
        }
    }
}

/// Publishes as fast as the broker takes them until `stop`: QoS 0 in batches, QoS ≥ 1 with a
/// window of [`WINDOW`] unacknowledged messages. Counts what was sent (QoS 0) or
/// acknowledged (QoS ≥ 1).
async fn publish_flat_out(
    mut conn: Conn,
    topic: TopicName,
    args_qos: QoS,
    payload: usize,
    stop: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
) -> Result<(), String> {
    let body = vec![b'x'; payload];
    let mut next_id: u16 = 1;
    let mut inflight = 0usize;
    let mut out = BytesMut::new();
    while !stop.load(Ordering::Relaxed) {
        out.clear();
        let batch = if args_qos == QoS::AtMostOnce {
            64
        } else {
            WINDOW - inflight
        };
        for _ in 0..batch {
            let mut p = Publish::new(topic.clone(), body.clone());
            p.qos = args_qos;
            if args_qos != QoS::AtMostOnce {
                p.packet_id = NonZeroU16::new(next_id);
                next_id = next_id.checked_add(1).unwrap_or(1);
                inflight += 1;
            }
            Packet::Publish(p)
                .encode(V, &mut out)
                .map_err(|e| e.to_string())?;
        }
        if !out.is_empty() {
            conn.stream
                .write_all(&out)
                .await
                .map_err(|e| e.to_string())?;
        }
        if args_qos == QoS::AtMostOnce {
            done.fetch_add(batch as u64, Ordering::Relaxed);
            continue;
        }
        // Wait for at least one acknowledgement, then take all that arrived.
        let packet = conn.next().await?;
        let mut acks = Vec::new();
        acks.push(packet);
        while conn.buf.has_remaining() {
            match decode(&mut conn.buf, V, MAX_PACKET_SIZE).map_err(|e| e.to_string())? {
                Some(p) => acks.push(p),
                None => break,
            }
        }
        for p in acks {
            match p {
                Packet::PubAck(_) | Packet::PubComp(_) => {
                    inflight -= 1;
                    done.fetch_add(1, Ordering::Relaxed);
                }
                Packet::PubRec(r) => {
                    conn.send(&[Packet::PubRel(PubResponse::new(r.packet_id))])
                        .await?
                }
                _ => {}
            }
        }
    }
    Ok(())
}

async fn fan_in(args: &Args) -> Result<(), String> {
    let stop = Arc::new(AtomicBool::new(false));
    let received = Arc::new(AtomicU64::new(0));
    let mut sub = Conn::open_with(args, "bench-sub", !args.persistent).await?;
    sub.subscribe("bench/#", args.qos).await?;
    let receiver = tokio::spawn(receive(sub, stop.clone(), received.clone(), |_| {}));
    let sent = Arc::new(AtomicU64::new(0));
    let stop_pub = Arc::new(AtomicBool::new(false));
    let mut pubs = Vec::new();
    for i in 0..args.clients {
        let conn = Conn::open(args, &format!("bench-pub-{i}")).await?;
        let topic = TopicName::new(format!("bench/{i}")).map_err(|e| e.to_string())?;
        pubs.push(tokio::spawn(publish_flat_out(
            conn,
            topic,
            args.qos,
            args.payload,
            stop_pub.clone(),
            sent.clone(),
        )));
    }
    let start = Instant::now();
    // The subscriber's lag (sent or acknowledged, minus received), sampled every 100 ms.
    let mut max_lag = 0u64;
    let end = start + Duration::from_secs(args.secs);
    while Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(100).min(end - Instant::now())).await;
        let lag = sent
            .load(Ordering::Relaxed)
            .saturating_sub(received.load(Ordering::Relaxed));
        max_lag = max_lag.max(lag);
    }
    stop_pub.store(true, Ordering::Relaxed);
    let elapsed = start.elapsed().as_secs_f64();
    let sent_n = sent.load(Ordering::Relaxed);
    let received_at_stop = received.load(Ordering::Relaxed);
    for p in pubs {
        let _ = tokio::time::timeout(Duration::from_secs(5), p).await;
    }
    let sent_n = sent_n.max(sent.load(Ordering::Relaxed));
    stop.store(true, Ordering::Relaxed);
    let _ = tokio::time::timeout(Duration::from_secs(30), receiver).await;
    let received_n = received.load(Ordering::Relaxed);
    let what = if args.qos == QoS::AtMostOnce {
        "sent"
    } else {
        "acknowledged"
    };
    println!(
        "fan-in qos={} publishers={} payload={}B secs={:.1}{}: {what} {:.0} msg/s, received {:.0} msg/s during the run (largest lag {max_lag}; {} of {} after drain){}",
        args.qos as u8,
        args.clients,
        args.payload,
        elapsed,
        if args.persistent { " persistent" } else { "" },
        sent_n as f64 / elapsed,
        received_at_stop as f64 / elapsed,
        received_n,
        sent_n,
        if args.qos == QoS::AtMostOnce {
            String::new()
        } else {
            format!(", acknowledged but not delivered: {}", sent_n.saturating_sub(received_n))
        }
    );
    Ok(())
}

async fn fan_out(args: &Args) -> Result<(), String> {
    let stop = Arc::new(AtomicBool::new(false));
    let received = Arc::new(AtomicU64::new(0));
    let mut receivers = Vec::new();
    for i in 0..args.clients {
        let mut sub = Conn::open(args, &format!("bench-sub-{i}")).await?;
        sub.subscribe("bench/out", args.qos).await?;
        receivers.push(tokio::spawn(receive(
            sub,
            stop.clone(),
            received.clone(),
            |_| {},
        )));
    }
    let sent = Arc::new(AtomicU64::new(0));
    let stop_pub = Arc::new(AtomicBool::new(false));
    let conn = Conn::open(args, "bench-pub").await?;
    let topic = TopicName::new("bench/out").map_err(|e| e.to_string())?;
    let publisher = tokio::spawn(publish_flat_out(
        conn,
        topic,
        args.qos,
        args.payload,
        stop_pub.clone(),
        sent.clone(),
    ));
    let start = Instant::now();
    tokio::time::sleep(Duration::from_secs(args.secs)).await;
    stop_pub.store(true, Ordering::Relaxed);
    let elapsed = start.elapsed().as_secs_f64();
    let received_at_stop = received.load(Ordering::Relaxed);
    let sent_n = sent.load(Ordering::Relaxed);
    let _ = tokio::time::timeout(Duration::from_secs(5), publisher).await;
    stop.store(true, Ordering::Relaxed);
    for r in receivers {
        let _ = tokio::time::timeout(Duration::from_secs(30), r).await;
    }
    println!(
        "fan-out qos={} subscribers={} payload={}B secs={:.1}: published {:.0} msg/s, delivered {:.0} msg/s in total during the run ({} of {} after drain)",
        args.qos as u8,
        args.clients,
        args.payload,
        elapsed,
        sent_n as f64 / elapsed,
        received_at_stop as f64 / elapsed,
        received.load(Ordering::Relaxed),
        sent_n * args.clients as u64,
    );
    Ok(())
}

async fn latency(args: &Args) -> Result<(), String> {
    let origin = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let received = Arc::new(AtomicU64::new(0));
    let topic = args.topic.clone().unwrap_or_else(|| "bench/lat".into());
    let mut sub = Conn::open_port(
        args,
        args.sub_port.unwrap_or(args.port),
        "bench-lat-sub",
        true,
    )
    .await?;
    sub.subscribe(args.sub_filter.as_deref().unwrap_or(&topic), args.qos)
        .await?;
    let samples = Arc::new(std::sync::Mutex::new(Vec::<u64>::new()));
    let collected = samples.clone();
    let receiver = tokio::spawn(receive(sub, stop.clone(), received.clone(), move |p| {
        if p.payload.len() >= 8 {
            let sent_ns = (&p.payload[..8]).get_u64();
            let now_ns = origin.elapsed().as_nanos() as u64;
            collected
                .lock()
                .expect("not poisoned")
                .push(now_ns.saturating_sub(sent_ns));
        }
    }));
    let mut conn = Conn::open(args, "bench-lat-pub").await?;
    let topic = TopicName::new(topic).map_err(|e| e.to_string())?;
    let total = args.rate * args.secs;
    let interval = Duration::from_nanos(1_000_000_000 / args.rate.max(1));
    let start = tokio::time::Instant::now();
    let mut next_id: u16 = 1;
    for n in 0..total {
        tokio::time::sleep_until(start + interval * n as u32).await;
        let mut body = vec![b'x'; args.payload.max(8)];
        body[..8].copy_from_slice(&(origin.elapsed().as_nanos() as u64).to_be_bytes());
        let mut p = Publish::new(topic.clone(), body);
        p.qos = args.qos;
        if args.qos != QoS::AtMostOnce {
            p.packet_id = NonZeroU16::new(next_id);
            next_id = next_id.checked_add(1).unwrap_or(1);
        }
        let mut out = BytesMut::new();
        Packet::Publish(p)
            .encode(V, &mut out)
            .map_err(|e| e.to_string())?;
        conn.stream
            .write_all(&out)
            .await
            .map_err(|e| e.to_string())?;
        // Acknowledgements are read and dropped; the window is never full at these rates.
        let _ = conn.stream.try_read_buf(&mut conn.buf);
        conn.buf.clear();
    }
    stop.store(true, Ordering::Relaxed);
    let _ = tokio::time::timeout(Duration::from_secs(30), receiver).await;
    let mut s = samples.lock().expect("not poisoned").clone();
    s.sort_unstable();
    let pct = |q: f64| {
        s.get(((s.len() as f64 * q) as usize).min(s.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0) as f64
            / 1000.0
    };
    println!(
        "latency qos={} rate={}/s payload={}B secs={}: received {} of {}; p50 {:.0} µs, p99 {:.0} µs, p99.9 {:.0} µs, max {:.0} µs",
        args.qos as u8,
        args.rate,
        args.payload,
        args.secs,
        s.len(),
        total,
        pct(0.50),
        pct(0.99),
        pct(0.999),
        s.last().copied().unwrap_or(0) as f64 / 1000.0,
    );
    Ok(())
}

/// fill: `--count` messages in all from `--publishers` connections, each waiting for its
/// acknowledgements within a window; reports the rate.
async fn fill(args: &Args) -> Result<(), String> {
    let topic = TopicName::new(args.topic.clone().unwrap_or_else(|| "bench/fill".into()))
        .map_err(|e| e.to_string())?;
    let started = Instant::now();
    let n = args.clients.max(1) as u64;
    let mut tasks = Vec::new();
    for i in 0..n {
        let share = args.count / n + u64::from(i < args.count % n);
        let conn = Conn::open(args, &format!("bench-fill-{i}")).await?;
        tasks.push(tokio::spawn(publish_count(
            conn,
            topic.clone(),
            args.qos,
            args.payload,
            share,
            i,
        )));
    }
    for t in tasks {
        t.await.map_err(|e| e.to_string())??;
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "fill qos={} publishers={} payload={}B: {} messages acknowledged in {:.2} s ({:.0} msg/s)",
        args.qos as u8,
        n,
        args.payload,
        args.count,
        secs,
        args.count as f64 / secs
    );
    Ok(())
}

/// Publishes exactly `count` messages, at most [`WINDOW`] unacknowledged, and waits for
/// every acknowledgement.
async fn publish_count(
    mut conn: Conn,
    topic: TopicName,
    qos: QoS,
    payload: usize,
    count: u64,
    publisher: u64,
) -> Result<(), String> {
    // Letters and digits drawn at random, a new payload per message and per publisher:
    // compressible about as much as sensor text is, not as much as a run of one byte.
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = ((publisher + 1) << 40) ^ (count << 17) ^ 0x9e37_79b9_7f4a_7c15 ^ payload as u64;
    let mut body = || {
        (0..payload)
            .map(|_| {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                ALPHABET[(rng % ALPHABET.len() as u64) as usize]
            })
            .collect::<Vec<u8>>()
    };
    let mut next_id: u16 = 1;
    let (mut sent, mut acked, mut inflight) = (0u64, 0u64, 0usize);
    let mut out = BytesMut::new();
    while acked < count {
        out.clear();
        while sent < count && (qos == QoS::AtMostOnce || inflight < WINDOW) {
            let mut p = Publish::new(topic.clone(), body());
            p.qos = qos;
            if qos != QoS::AtMostOnce {
                p.packet_id = NonZeroU16::new(next_id);
                next_id = next_id.checked_add(1).unwrap_or(1);
                inflight += 1;
            } else {
                acked += 1;
            }
            sent += 1;
            Packet::Publish(p)
                .encode(V, &mut out)
                .map_err(|e| e.to_string())?;
            if out.len() > 64 << 10 {
                break;
            }
        }
        if !out.is_empty() {
            conn.stream
                .write_all(&out)
                .await
                .map_err(|e| e.to_string())?;
        }
        if qos == QoS::AtMostOnce {
            continue;
        }
        // At least one acknowledgement, then all that arrived with it.
        let mut packets = vec![conn.next().await?];
        while let Some(p) = decode(&mut conn.buf, V, MAX_PACKET_SIZE).map_err(|e| e.to_string())? {
            packets.push(p);
        }
        for p in packets {
            match p {
                Packet::PubAck(_) | Packet::PubComp(_) => {
                    inflight -= 1;
                    acked += 1;
                }
                Packet::PubRec(r) => {
                    conn.send(&[Packet::PubRel(PubResponse::new(r.packet_id))])
                        .await?
                }
                _ => {}
            }
        }
    }
    Ok(())
}

/// The resident memory of process `pid` in kB, from /proc (Linux).
fn rss_kb(pid: u32) -> Result<u64, String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|e| format!("/proc/{pid}/status: {e}"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| format!("no VmRSS in /proc/{pid}/status"))
}

async fn idle(args: &Args) -> Result<(), String> {
    let before = args.pid.map(rss_kb).transpose()?;
    let mut conns = Vec::with_capacity(args.clients);
    for i in 0..args.clients {
        let mut conn = Conn::open(args, &format!("bench-idle-{i}")).await?;
        conn.subscribe(&format!("bench/idle/{i}"), QoS::AtLeastOnce)
            .await?;
        conn.buf = BytesMut::new();
        conns.push(conn);
    }
    tokio::time::sleep(Duration::from_secs(args.secs)).await;
    let with = args.pid.map(rss_kb).transpose()?;
    let mib = |kb: Option<u64>| {
        kb.map_or("-".to_string(), |kb| {
            format!("{:.1} MiB", kb as f64 / 1024.0)
        })
    };
    println!(
        "idle connections={} secs={}: broker RSS before {}, with them {}",
        conns.len(),
        args.secs,
        mib(before),
        mib(with),
    );
    Ok(())
}
