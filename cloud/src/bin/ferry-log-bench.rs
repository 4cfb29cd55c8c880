//! `ferry-log-bench`: durable appends to, and reads from, Ferry's cloud log.
//!
//! ```text
//! ferry-log-bench append --dir /tmp/log --records 2000000 --producers 256 --batch 1 --payload 100
//! ferry-log-bench read   --dir /tmp/log
//! ```
//!
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
use ferry_cloud::log::{
    now_ms, AppendData, NewRecord, SegmentLog, Storage, StreamConfig, READ_BUDGET_BYTES,
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
        /// The log's directory (created if new).
        #[arg(long)]
        dir: PathBuf,
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
        /// Answer appends once written, without waiting for the disk.
        #[arg(long)]
        no_fsync: bool,
        /// Print `ack PRODUCER SEQ` lines as appends become durable.
        #[arg(long)]
        print_acks: bool,
    },
    /// Reads stream `bench` from the start.
    Read {
        #[arg(long)]
        dir: PathBuf,
    },
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let runtime = tokio::runtime::Runtime::new()?;
    match args.mode {
        Mode::Append {
            dir,
            records,
            producers,
            batch,
            payload,
            no_fsync,
            print_acks,
        } => runtime.block_on(append(
            dir,
            records,
            producers.max(1),
            batch.max(1),
            payload,
            !no_fsync,
            print_acks,
        )),
        Mode::Read { dir } => read(dir),
    }
}

async fn append(
    dir: PathBuf,
    total: u64,
    producers: u64,
    batch: u64,
    payload: usize,
    fsync: bool,
    print_acks: bool,
) -> anyhow::Result<()> {
    let log = SegmentLog::open(&dir, fsync, 4096).context("opening the log")?;
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
    let bytes = log
        .streams()
        .iter()
        .map(|s| s.partitions.iter().map(|p| p.bytes).sum::<u64>())
        .sum::<u64>();
    println!(
        "append: {n} records of {payload} B, {producers} producers x {batch} per append, fsync {}: {:.0} records/s, {:.1} MB/s on disk ({} bytes in the log), {secs:.2} s",
        if fsync { "on" } else { "off" },
        n as f64 / secs,
        bytes as f64 / secs / 1e6,
        bytes,
    );
    Ok(())
}

fn read(dir: PathBuf) -> anyhow::Result<()> {
    let log = SegmentLog::open(&dir, true, 16).context("opening the log")?;
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
        "read: {count} records, {bytes} bytes in {secs:.2} s: {:.0} MB/s, {:.0} records/s",
        bytes as f64 / secs / 1e6,
        count as f64 / secs
    );
    Ok(())
}
