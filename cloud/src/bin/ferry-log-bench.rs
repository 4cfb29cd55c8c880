//! `ferry-log-bench`: durable appends to, and reads from, Ferry's cloud log.
//!
//! ```text
//! ferry-log-bench append  --dir /tmp/log --records 2000000 --producers 256 --batch 1 --payload 100
//! ferry-log-bench read    --dir /tmp/log
//! ferry-log-bench latency --dir /tmp/log --rate 5000 --secs 10
//! ```
//!
//! Each mode runs on the local segment log in `--dir`, or with `--object cloud.toml` on the
//! object backend that file's `[log.object]` names (then the object store's requests are
//! printed too: PUT, GET, DELETE, LIST).
//!
//! latency: one-record appends issued at `--rate` per second on a fixed schedule for
//! `--secs`, each timed from when it was due (so a stall counts against every append it
//! held up); prints p50, p99, p99.9 and the maximum.
//! append: P producers, each appending B records at a time and waiting for the log's answer
//! (durable: fsync'd unless --no-fsync) before the next; prints records/s and MB/s.
//! read: reads stream `bench` partition 0 from the start to the end, 1 MiB per read (every
//! batch's CRC checked), and prints MB/s and records/s.
//! With --print-acks, each producer prints `ack PRODUCER SEQ` once its records up to SEQ are
//! durable (for the kill -9 test); record values are `PRODUCER:SEQ` padded to the payload.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use bytes::Bytes;
use clap::{Parser, Subcommand};
use ferry_cloud::config::CloudConfig;
use ferry_cloud::log::{
    now_ms, AppendData, NewRecord, ObjectLog, SegmentLog, Storage, StreamConfig, READ_BUDGET_BYTES,
};
use ferry_protocol::kafka::batch::records;

#[derive(Debug, Parser)]
#[command(about = "Benchmarks Ferry's cloud log: durable appends, then reads")]
struct Args {
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Debug, Subcommand)]
enum Mode {
    /// Appends records with group commit.
    Append {
        #[command(flatten)]
        log: LogArgs,
        /// Records to append in all.
        #[arg(long, default_value_t = 1_000_000)]
        records: u64,
        /// Producers appending at once, each waiting for its previous append.
        #[arg(long, default_value_t = 256)]
        producers: u64,
        /// Records per append.
        #[arg(long, default_value_t = 1)]
        batch: u64,
        /// Bytes of each record's value.
        #[arg(long, default_value_t = 100)]
        payload: usize,
        /// Print `ack PRODUCER SEQ` lines as appends become durable.
        #[arg(long)]
        print_acks: bool,
    },
    /// Reads stream `bench` from the start (on the object backend twice: cold, then with
    /// what the node's cache kept).
    Read {
        #[command(flatten)]
        log: LogArgs,
    },
    /// Appends at a fixed rate and reports their acknowledgement latency.
    Latency {
        #[command(flatten)]
        log: LogArgs,
        /// Appends per second (one record each).
        #[arg(long, default_value_t = 5000)]
        rate: u64,
        /// For how long.
        #[arg(long, default_value_t = 10)]
        secs: u64,
        /// Bytes of each record's value.
        #[arg(long, default_value_t = 100)]
        payload: usize,
    },
}

/// Which log: a directory, or the object backend of a ferry-cloud config.
#[derive(Debug, clap::Args)]
struct LogArgs {
    /// The local log's directory (created if new).
    #[arg(long, required_unless_present = "object")]
    dir: Option<PathBuf>,
    /// A ferry-cloud config whose `[log.object]` (with `[log.object.s3]`) names the object
    /// store and PostgreSQL.
    #[arg(long, conflicts_with = "dir")]
    object: Option<PathBuf>,
    /// Local log: answer appends once written, without waiting for the disk.
    #[arg(long)]
    no_fsync: bool,
}

/// The log opened, and the object log itself when it is one (for its request counts).
struct Opened {
    log: Arc<dyn Storage>,
    object: Option<Arc<ObjectLog>>,
    fsync: bool,
}

impl LogArgs {
    fn open(&self, queue: usize) -> anyhow::Result<Opened> {
        if let Some(file) = &self.object {
            let text = std::fs::read_to_string(file)
                .with_context(|| format!("reading {}", file.display()))?;
            let config: CloudConfig =
                toml::from_str(&text).with_context(|| format!("parsing {}", file.display()))?;
            let object = config
                .log
                .object
                .with_context(|| format!("{} has no [log.object]", file.display()))?;
            let log = ObjectLog::open(&object).context("opening the object log")?;
            return Ok(Opened {
                log: log.clone(),
                object: Some(log),
                fsync: true,
            });
        }
        let dir = self.dir.as_ref().context("--dir or --object")?;
        let log = SegmentLog::open(dir, !self.no_fsync, queue).context("opening the log")?;
        Ok(Opened {
            log,
            object: None,
            fsync: !self.no_fsync,
        })
    }
}

impl Opened {
    /// The object store's requests so far, and per GB of `bytes` (if any).
    fn print_requests(&self, bytes: u64) {
        let Some(object) = &self.object else { return };
        let r = object.requests();
        let per_gb = |n: u64| {
            if bytes == 0 {
                0.0
            } else {
                n as f64 / (bytes as f64 / 1e9)
            }
        };
        println!(
            "object store requests: {} PUT, {} GET, {} DELETE, {} LIST; per GB: {:.0} PUT, {:.0} GET",
            r.put,
            r.get,
            r.delete,
            r.list,
            per_gb(r.put),
            per_gb(r.get)
        );
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let runtime = tokio::runtime::Runtime::new()?;
    match args.mode {
        Mode::Append {
            log,
            records,
            producers,
            batch,
            payload,
            print_acks,
        } => runtime.block_on(append(
            log.open(4096)?,
            records,
            producers.max(1),
            batch.max(1),
            payload,
            print_acks,
        )),
        Mode::Read { log } => read(log.open(16)?),
        Mode::Latency {
            log,
            rate,
            secs,
            payload,
        } => runtime.block_on(latency(log.open(4096)?, rate.max(1), secs.max(1), payload)),
    }
}

fn record(payload: usize, label: String) -> NewRecord {
    let mut value = label.into_bytes();
    value.resize(payload.max(value.len()), b'.');
    NewRecord {
        timestamp: now_ms(),
        key: None,
        value: Some(Bytes::from(value)),
        headers: Vec::new(),
    }
}

async fn latency(opened: Opened, rate: u64, secs: u64, payload: usize) -> anyhow::Result<()> {
    let log = opened.log.clone();
    log.create_stream("bench", &StreamConfig::default())?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Result<u64, String>>();
    let start = tokio::time::Instant::now();
    let total = rate * secs;
    let collector = tokio::spawn(async move {
        let mut micros = Vec::with_capacity(total as usize);
        let mut errors = 0u64;
        while let Some(r) = rx.recv().await {
            match r {
                Ok(m) => micros.push(m),
                Err(_) => errors += 1,
            }
        }
        (micros, errors)
    });
    for i in 0..total {
        // Due at i / rate seconds from the start.
        let due = start + std::time::Duration::from_nanos(i * 1_000_000_000 / rate);
        tokio::time::sleep_until(due).await;
        let log = log.clone();
        let tx = tx.clone();
        tokio::spawn(async move {
            let r = log
                .append(
                    "bench",
                    0,
                    AppendData::Records(vec![record(payload, i.to_string())]),
                )
                .await;
            let _ = tx.send(
                r.map(|_| due.elapsed().as_micros() as u64)
                    .map_err(|e| e.to_string()),
            );
        });
    }
    drop(tx);
    let (mut micros, errors) = collector.await?;
    let elapsed = start.elapsed().as_secs_f64();
    micros.sort_unstable();
    let at = |q: f64| {
        micros
            .get(((micros.len() as f64 * q) as usize).min(micros.len().saturating_sub(1)))
            .map_or(0.0, |m| *m as f64 / 1000.0)
    };
    println!(
        "latency: {} appends at {rate}/s for {secs} s ({:.0}/s done, {errors} failed), fsync {}: p50 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, max {:.2} ms",
        micros.len(),
        micros.len() as f64 / elapsed,
        if opened.fsync { "on" } else { "off" },
        at(0.50),
        at(0.99),
        at(0.999),
        micros.last().map_or(0.0, |m| *m as f64 / 1000.0),
    );
    opened.print_requests(log_bytes(&*log));
    Ok(())
}

/// Bytes in the log, all streams.
fn log_bytes(log: &dyn Storage) -> u64 {
    log.streams()
        .iter()
        .map(|s| s.partitions.iter().map(|p| p.bytes).sum::<u64>())
        .sum()
}

async fn append(
    opened: Opened,
    total: u64,
    producers: u64,
    batch: u64,
    payload: usize,
    print_acks: bool,
) -> anyhow::Result<()> {
    let log = opened.log.clone();
    let fsync = opened.fsync;
    log.create_stream("bench", &StreamConfig::default())?;
    let done = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let per_producer = total.div_ceil(producers);
    let mut tasks = Vec::new();
    for p in 0..producers {
        let log = log.clone();
        let done = done.clone();
        tasks.push(tokio::spawn(async move {
            let mut seq = 0u64;
            while seq < per_producer {
                let n = batch.min(per_producer - seq);
                let recs = (seq..seq + n)
                    .map(|s| {
                        let mut value = format!("{p}:{s}").into_bytes();
                        value.resize(payload.max(value.len()), b'.');
                        NewRecord {
                            timestamp: now_ms(),
                            key: Some(Bytes::from(format!("bench/{p}"))),
                            value: Some(Bytes::from(value)),
                            headers: Vec::new(),
                        }
                    })
                    .collect();
                log.append("bench", 0, AppendData::Records(recs)).await?;
                seq += n;
                done.fetch_add(n, Ordering::Relaxed);
                if print_acks {
                    println!("ack {p} {}", seq - 1);
                }
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let secs = start.elapsed().as_secs_f64();
    let n = done.load(Ordering::Relaxed);
    let bytes = log_bytes(&*log);
    println!(
        "append: {n} records of {payload} B, {producers} producers x {batch} per append, fsync {}: {:.0} records/s, {:.1} MB/s on disk ({} bytes in the log), {secs:.2} s",
        if fsync { "on" } else { "off" },
        n as f64 / secs,
        bytes as f64 / secs / 1e6,
        bytes,
    );
    opened.print_requests(bytes);
    Ok(())
}

fn read(opened: Opened) -> anyhow::Result<()> {
    read_once(&*opened.log, "read")?;
    if opened.object.is_some() {
        // The first read was cold (a new process); the second gets what the cache kept.
        opened.print_requests(0);
        read_once(&*opened.log, "read again (warm cache)")?;
        opened.print_requests(0);
    }
    Ok(())
}

fn read_once(log: &dyn Storage, what: &str) -> anyhow::Result<()> {
    let offsets = log.offsets("bench", 0)?;
    let start = Instant::now();
    let (mut offset, mut bytes, mut count) = (offsets.log_start, 0u64, 0u64);
    while offset < offsets.high_watermark {
        let r = log.read("bench", 0, offset, READ_BUDGET_BYTES)?;
        for batch in r.iter() {
            let (h, whole) = batch?;
            // Count the records by reading them, as a consumer would.
            count += records(whole)?.count() as u64;
            offset = h.last_offset() + 1;
        }
        bytes += r.batches.len() as u64;
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{what}: {count} records, {bytes} bytes in {secs:.2} s: {:.0} MB/s, {:.0} records/s",
        bytes as f64 / secs / 1e6,
        count as f64 / secs
    );
    Ok(())
}
