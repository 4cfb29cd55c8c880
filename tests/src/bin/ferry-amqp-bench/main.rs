//! `ferry-amqp-bench`: AMQP 0-9-1 load for any broker (ferry-cloud, RabbitMQ), over lapin.
//!
//! ```text
//! ferry-amqp-bench flood      --uri U --publishers 4 --secs 10
//! ferry-amqp-bench backlog    --uri U --count 200000 [--pid BROKER_PID]
//! ferry-amqp-bench latency    --uri U --rate 5000 --secs 10 [--no-consumer]
//! ferry-amqp-bench idle       --uri U --connections 1000 --pid BROKER_PID --secs 5
//! ferry-amqp-bench kill-flood --uri U --publishers 4 --secs 3 --pid BROKER_PID --out FILE
//! ferry-amqp-bench kill-check --uri U --confirmed FILE
//! ```
//!
//! Every message has a `--payload`-byte body (default 100; its first 8 bytes are the
//! message's id) and delivery mode 2 (persistent), and goes through the default exchange to a
//! durable queue. Publishers are on connections of their own with publisher confirms, each
//! keeping at most `--window` (default 1,000) publishes unconfirmed; the consumer is on its own
//! connection, acknowledges manually (each message, or with `multiple` every `--ack-every`)
//! with prefetch `--prefetch` (default 200).
//!
//! flood: one consumer drains while N publishers publish for `--secs`; reports what was
//! confirmed and what was consumed per second. backlog: `--count` messages published first
//! (4 publishers), then one consumer drains them, timed; with `--pid` the broker's resident
//! memory after the drain (and its peak). latency: one publisher at `--rate` msg/s, each
//! publish's time to its confirm (p50/p99), with a consumer draining unless `--no-consumer`.
//! idle: N connections with a channel each stay open for `--secs`; the broker's resident
//! memory before and with them. kill-flood: N publishers flood the queue `bench-kill`, the
//! broker gets SIGKILL after `--secs`, and the ids of every confirmed message are written to
//! `--out`; kill-check (after the broker was restarted on the same data) drains `bench-kill`
//! and counts the confirmed ids that never arrived.
//!
//! Each run prints one line for a reader and one starting with `= ` (name=value pairs) for
//! scripts. Each run but the kill pair uses a queue of its own and deletes it at the end.

mod load;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lapin::options::*;

use load::{
    close, declare, open, open_retrying, spawn_consumer, spawn_publisher, Consumer, Plan,
    QuietStop, Tally,
};

pub(crate) type Res<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// The queue of the kill pair: kill-check reads what kill-flood left.
const KILL_QUEUE: &str = "bench-kill";
/// kill-check waits this long for a first delivery: a restarted broker may recover its
/// queues before it delivers.
const KILL_CHECK_PATIENCE: Duration = Duration::from_secs(120);
/// kill-check stops once nothing came for this long after a first delivery.
const KILL_CHECK_QUIET: Duration = Duration::from_secs(5);

pub(crate) struct Args {
    pub(crate) mode: String,
    pub(crate) uri: String,
    pub(crate) publishers: usize,
    pub(crate) secs: u64,
    pub(crate) count: u64,
    pub(crate) rate: u64,
    pub(crate) window: usize,
    pub(crate) prefetch: u16,
    pub(crate) ack_every: u64,
    pub(crate) payload: usize,
    pub(crate) consumer: bool,
    pub(crate) pid: Option<u32>,
    pub(crate) path: Option<String>,
}

fn parse() -> Res<Args> {
    let mut it = std::env::args().skip(1);
    let mode = it.next().ok_or("usage: ferry-amqp-bench flood|backlog|latency|idle|kill-flood|kill-check [--uri U] [--publishers N|--connections N] [--secs S] [--count N] [--rate MSG_PER_SEC] [--window N] [--prefetch N] [--ack-every N] [--payload BYTES] [--no-consumer] [--pid BROKER_PID] [--out FILE|--confirmed FILE]")?;
    let mut a = Args {
        mode,
        uri: "amqp://127.0.0.1:5672/%2f".into(),
        publishers: 1,
        secs: 10,
        count: 200_000,
        rate: 5000,
        window: 1000,
        prefetch: 200,
        ack_every: 1,
        payload: 100,
        consumer: true,
        pid: None,
        path: None,
    };
    while let Some(flag) = it.next() {
        if flag == "--no-consumer" {
            a.consumer = false;
            continue;
        }
        let value = it.next().ok_or(format!("{flag} needs a value"))?;
        let num = |v: &str| v.parse::<u64>().map_err(|e| format!("{flag}: {e}"));
        match flag.as_str() {
            "--uri" => a.uri = value,
            "--publishers" | "--connections" => a.publishers = num(&value)? as usize,
            "--secs" => a.secs = num(&value)?,
            "--count" => a.count = num(&value)?,
            "--rate" => a.rate = num(&value)?.max(1),
            "--window" => a.window = num(&value)?.max(1) as usize,
            "--prefetch" => a.prefetch = num(&value)? as u16,
            "--ack-every" => a.ack_every = num(&value)?.max(1),
            "--payload" => a.payload = num(&value)?.max(8) as usize,
            "--pid" => a.pid = Some(num(&value)? as u32),
            "--out" | "--confirmed" => a.path = Some(value),
            other => return Err(format!("unknown flag {other}").into()),
        }
    }
    Ok(a)
}

#[tokio::main]
async fn main() {
    let result = match parse() {
        Ok(args) => run(&args).await,
        Err(e) => Err(e),
    };
    if let Err(e) = result {
        eprintln!("ferry-amqp-bench: {e}");
        std::process::exit(1);
    }
}

async fn run(args: &Args) -> Res<()> {
    let queue = fresh_queue(&args.mode);
    let result = match args.mode.as_str() {
        "flood" => flood(args, &queue).await,
        "backlog" => backlog(args, &queue).await,
        "latency" => latency(args, &queue).await,
        "idle" => return idle(args).await,
        "kill-flood" => return kill_flood(args).await,
        "kill-check" => return kill_check(args).await,
        other => return Err(format!("unknown mode {other}").into()),
    };
    // Also after a failed run: a queue left behind would hold its messages for the runs
    // after it (and a broker may recover it at every restart).
    if let Ok((conn, ch)) = open(&args.uri).await {
        let _ = ch
            .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
            .await;
        close(conn).await;
    }
    result
}

/// flood: one consumer drains while `--publishers` publish flat out for `--secs`.
async fn flood(args: &Args, queue: &str) -> Res<()> {
    let (setup, ch) = open(&args.uri).await?;
    declare(&ch, queue).await?;
    let tally = Arc::new(Tally::default());
    let stop = Arc::new(AtomicBool::new(false));
    let consumer = spawn_consumer(args, queue, None, stop.clone(), tally.clone()).await?;
    let mut publishers = Vec::new();
    for p in 0..args.publishers {
        let plan = Plan::flat_out(args, p as u64, None);
        publishers.push(spawn_publisher(args, queue, plan, stop.clone(), tally.clone()).await?);
    }
    let start = Instant::now();
    tokio::time::sleep(Duration::from_secs(args.secs)).await;
    let secs = start.elapsed().as_secs_f64();
    let (confirmed, consumed) = (tally.confirmed(), tally.consumed());
    stop.store(true, Ordering::Relaxed);
    for p in publishers {
        p.await??;
    }
    consumer.await??;
    close(setup).await;
    println!(
        "flood publishers={} window={} prefetch={} payload={}B secs={secs:.1}: confirmed {:.0} msg/s, consumed {:.0} msg/s (nacked {}, backlog at the end {})",
        args.publishers,
        args.window,
        args.prefetch,
        args.payload,
        confirmed as f64 / secs,
        consumed as f64 / secs,
        tally.nacked.load(Ordering::Relaxed),
        confirmed.saturating_sub(consumed),
    );
    println!(
        "= confirmed={:.0} consumed={:.0}",
        confirmed as f64 / secs,
        consumed as f64 / secs
    );
    Ok(())
}

/// backlog: `--count` published first (4 publishers), then one consumer drains them.
async fn backlog(args: &Args, queue: &str) -> Res<()> {
    const FILLERS: u64 = 4;
    let (setup, ch) = open(&args.uri).await?;
    declare(&ch, queue).await?;
    let tally = Arc::new(Tally::default());
    let never = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let mut fillers = Vec::new();
    for p in 0..FILLERS {
        let share = args.count / FILLERS + u64::from(p < args.count % FILLERS);
        let plan = Plan::flat_out(args, p, Some(share));
        fillers.push(spawn_publisher(args, queue, plan, never.clone(), tally.clone()).await?);
    }
    for f in fillers {
        f.await??;
    }
    let fill_secs = start.elapsed().as_secs_f64();
    let start = Instant::now();
    let consumer = spawn_consumer(args, queue, Some(args.count), never, tally.clone()).await?;
    consumer.await??;
    let drain_secs = start.elapsed().as_secs_f64();
    let memory = args
        .pid
        .map(|pid| Res::Ok((status_kb(pid, "VmRSS")?, status_kb(pid, "VmHWM")?)))
        .transpose()?;
    close(setup).await;
    println!(
        "backlog count={} payload={}B prefetch={}: published (4 publishers, confirmed) in {fill_secs:.2} s ({:.0} msg/s), consumed and acked by one consumer in {drain_secs:.2} s ({:.0} msg/s){}",
        args.count,
        args.payload,
        args.prefetch,
        tally.confirmed() as f64 / fill_secs,
        tally.consumed() as f64 / drain_secs,
        memory.map_or(String::new(), |(rss, peak)| format!(
            "; broker RSS after the drain {}, peak {}",
            mib(rss),
            mib(peak)
        )),
    );
    let mut line = format!(
        "= published={:.0} consumed={:.0}",
        tally.confirmed() as f64 / fill_secs,
        tally.consumed() as f64 / drain_secs
    );
    if let Some((rss, peak)) = memory {
        line += &format!(" rss_kb={rss} peak_kb={peak}");
    }
    println!("{line}");
    Ok(())
}

/// latency: one publisher at `--rate`, each publish timed to its own confirm.
async fn latency(args: &Args, queue: &str) -> Res<()> {
    let (setup, ch) = open(&args.uri).await?;
    declare(&ch, queue).await?;
    let tally = Arc::new(Tally {
        latencies_ns: Some(Mutex::new(Vec::new())),
        ..Default::default()
    });
    let stop = Arc::new(AtomicBool::new(false));
    let consumer = if args.consumer {
        Some(spawn_consumer(args, queue, None, stop.clone(), tally.clone()).await?)
    } else {
        None
    };
    let total = args.rate * args.secs;
    let plan = Plan {
        // The window never binds at a fixed rate: every publish goes at its time.
        window: total.max(1) as usize,
        limit: Some(total),
        interval: Some(Duration::from_nanos(1_000_000_000 / args.rate)),
        id_base: 0,
    };
    let never = Arc::new(AtomicBool::new(false));
    spawn_publisher(args, queue, plan, never, tally.clone())
        .await?
        .await??;
    stop.store(true, Ordering::Relaxed);
    if let Some(c) = consumer {
        c.await??;
    }
    close(setup).await;
    let mut s = tally
        .latencies_ns
        .as_ref()
        .expect("latency mode keeps latencies")
        .lock()
        .expect("not poisoned")
        .clone();
    s.sort_unstable();
    let pct = |q: f64| {
        s.get(((s.len() as f64 * q) as usize).min(s.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0) as f64
            / 1000.0
    };
    println!(
        "latency rate={}/s payload={}B secs={} consumer={}: {} of {} confirmed; publish -> confirm p50 {:.0} µs, p99 {:.0} µs, p99.9 {:.0} µs, max {:.0} µs",
        args.rate,
        args.payload,
        args.secs,
        args.consumer,
        s.len(),
        total,
        pct(0.50),
        pct(0.99),
        pct(0.999),
        s.last().copied().unwrap_or(0) as f64 / 1000.0,
    );
    println!("= p50_us={:.0} p99_us={:.0}", pct(0.50), pct(0.99));
    Ok(())
}

/// idle: `--connections` connections with a channel each, open and quiet for `--secs`.
async fn idle(args: &Args) -> Res<()> {
    let before = args.pid.map(|p| status_kb(p, "VmRSS")).transpose()?;
    let mut conns = Vec::with_capacity(args.publishers);
    for _ in 0..args.publishers {
        conns.push(open(&args.uri).await?);
    }
    tokio::time::sleep(Duration::from_secs(args.secs)).await;
    let with = args.pid.map(|p| status_kb(p, "VmRSS")).transpose()?;
    let show = |kb: Option<u64>| kb.map_or("-".to_string(), mib);
    println!(
        "idle connections={} (a channel each) secs={}: broker RSS before {}, with them {}",
        conns.len(),
        args.secs,
        show(before),
        show(with)
    );
    println!(
        "= before_kb={} with_kb={}",
        before.unwrap_or(0),
        with.unwrap_or(0)
    );
    Ok(())
}

/// kill-flood: a confirmed flood into `bench-kill`, SIGKILL to the broker after `--secs`;
/// the confirmed ids go to `--out`, one per line.
async fn kill_flood(args: &Args) -> Res<()> {
    let pid = args.pid.ok_or("kill-flood needs --pid")?;
    let out = args.path.as_deref().ok_or("kill-flood needs --out")?;
    let (_setup, ch) = open(&args.uri).await?;
    declare(&ch, KILL_QUEUE).await?;
    ch.queue_purge(KILL_QUEUE.into(), QueuePurgeOptions::default())
        .await?;
    let tally = Arc::new(Tally {
        confirmed_ids: Some(Mutex::new(Vec::new())),
        ..Default::default()
    });
    let never = Arc::new(AtomicBool::new(false));
    let mut publishers = Vec::new();
    for p in 0..args.publishers {
        let plan = Plan::flat_out(args, p as u64, None);
        publishers
            .push(spawn_publisher(args, KILL_QUEUE, plan, never.clone(), tally.clone()).await?);
    }
    tokio::time::sleep(Duration::from_secs(args.secs)).await;
    let killed = std::process::Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()?;
    if !killed.success() {
        return Err(format!("kill -KILL {pid} failed").into());
    }
    // The publishers end with the connection's error; what was confirmed before is kept.
    for p in publishers {
        let _ = tokio::time::timeout(Duration::from_secs(10), p).await;
    }
    let ids = tally
        .confirmed_ids
        .as_ref()
        .expect("kill-flood keeps ids")
        .lock()
        .expect("not poisoned")
        .clone();
    let text: String = ids.iter().map(|id| format!("{id}\n")).collect();
    std::fs::write(out, text)?;
    println!(
        "kill-flood publishers={} secs={}: {} confirmed before SIGKILL (ids in {out})",
        args.publishers,
        args.secs,
        ids.len()
    );
    println!("= confirmed={}", ids.len());
    Ok(())
}

/// kill-check: drains `bench-kill` until it has been quiet for [`KILL_CHECK_QUIET`] after
/// a first delivery (which may take up to [`KILL_CHECK_PATIENCE`] after a restart) and
/// counts the ids of `--confirmed` that never came.
async fn kill_check(args: &Args) -> Res<()> {
    let path = args.path.as_deref().ok_or("kill-check needs --confirmed")?;
    let confirmed: HashSet<u64> = std::fs::read_to_string(path)?
        .lines()
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    let tally = Arc::new(Tally {
        consumed_ids: Some(Mutex::new(Vec::new())),
        ..Default::default()
    });
    let (conn, ch) = open_retrying(&args.uri, Duration::from_secs(60)).await?;
    declare(&ch, KILL_QUEUE).await?;
    let consumer = Consumer {
        prefetch: args.prefetch,
        ack_every: args.ack_every,
        until: None,
        quiet_stop: Some(QuietStop {
            first_within: KILL_CHECK_PATIENCE,
            after: KILL_CHECK_QUIET,
        }),
    };
    let started = Instant::now();
    let first = consumer
        .run(
            ch,
            KILL_QUEUE,
            Arc::new(AtomicBool::new(false)),
            tally.clone(),
        )
        .await?;
    close(conn).await;
    let got = tally
        .consumed_ids
        .as_ref()
        .expect("kill-check keeps ids")
        .lock()
        .expect("not poisoned")
        .clone();
    let received: HashSet<u64> = got.iter().copied().collect();
    let lost = confirmed.difference(&received).count();
    let first_secs = first.map(|f| (f - started).as_secs_f64());
    let first = first_secs.map_or("none".to_string(), |f| format!("{f:.1} s"));
    println!(
        "kill-check: {} confirmed before the kill, {} delivered after the restart (first after {first}; {} distinct, {} not confirmed before the kill); confirmed but lost: {lost}",
        confirmed.len(),
        got.len(),
        received.len(),
        received.difference(&confirmed).count(),
    );
    println!(
        "= confirmed={} lost={lost} first_secs={:.1}",
        confirmed.len(),
        first_secs.unwrap_or(-1.0)
    );
    Ok(())
}

/// A queue name no earlier run used.
fn fresh_queue(mode: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("bench-{mode}-{nanos}")
}

/// A field of `/proc/<pid>/status` in kB (`VmRSS`: resident now, `VmHWM`: its peak).
fn status_kb(pid: u32, field: &str) -> Res<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| format!("no {field} in /proc/{pid}/status").into())
}

fn mib(kb: u64) -> String {
    format!("{:.1} MiB", kb as f64 / 1024.0)
}
