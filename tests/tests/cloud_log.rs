//! The cloud log under a real crash: `ferry-log-bench` appends from eight producers with
//! group commit and fsync, printing each acknowledgement; it is killed with SIGKILL mid-stream;
//! the log is opened again and every acknowledged record must be there, once, in order.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use ferry_cloud::log::{SegmentLog, Storage};
use ferry_protocol::kafka::batch::{records, BatchHeader};
use ferry_tests::process::{binary, temp_dir};

const PRODUCERS: u64 = 8;

#[test]
fn every_acknowledged_append_survives_kill_9() {
    let dir = temp_dir("log-kill9");
    let bench = binary("ferry-cloud", "ferry-log-bench");
    for round in 0..2 {
        let mut child = Command::new(&bench)
            .args([
                "append",
                "--records",
                "100000000",
                "--batch",
                "10",
                "--payload",
                "40",
            ])
            .args(["--producers", &PRODUCERS.to_string()])
            .arg("--print-acks")
            .arg("--dir")
            .arg(&dir)
            .stdout(Stdio::piped())
            .spawn()
            .expect("start ferry-log-bench");
        // The highest acknowledged sequence of each producer, read until 20,000 records are
        // acknowledged; then the kill, while appends are in flight.
        let mut acked: HashMap<u64, u64> = HashMap::new();
        let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
        let mut count = 0;
        while count < 2_000 {
            let line = lines.next().expect("an ack line").expect("stdout readable");
            let mut parts = line
                .split_whitespace()
                .skip(1)
                .map(|n| n.parse::<u64>().expect("number"));
            let (p, seq) = (parts.next().expect("producer"), parts.next().expect("seq"));
            acked.insert(p, seq);
            count += 1;
        }
        child.kill().expect("SIGKILL");
        child.wait().expect("reaped");
        // Acks printed after the last one read were durable too; they are not needed.

        let log = SegmentLog::open(&dir, true, 16).expect("the log opens after the kill");
        let hw = log.offsets("bench", 0).expect("offsets").high_watermark;
        let mut next_seq: HashMap<u64, u64> = HashMap::new();
        let mut offset = 0;
        while offset < hw {
            let r = log
                .read("bench", 0, offset, 1 << 20)
                .expect("every batch reads back with its CRC");
            let mut at = 0;
            while at < r.batches.len() {
                let h = BatchHeader::parse(&r.batches[at..]).expect("header");
                for rec in records(&r.batches[at..]).expect("records") {
                    let rec = rec.expect("record");
                    assert_eq!(rec.offset, offset, "offsets are consecutive");
                    offset += 1;
                    let value = std::str::from_utf8(rec.value.expect("value")).expect("utf8");
                    let (p, seq) = value.trim_end_matches('.').split_once(':').expect("p:seq");
                    let (p, seq): (u64, u64) = (p.parse().expect("p"), seq.parse().expect("seq"));
                    // Each restart begins its producers' sequences at 0 again.
                    let expected = next_seq.entry(p).or_insert(0);
                    if seq == 0 && *expected > 0 {
                        *expected = 0;
                    }
                    assert_eq!(
                        seq, *expected,
                        "producer {p}: records in order, none twice, none missing"
                    );
                    *expected += 1;
                }
                at += h.total_len();
            }
        }
        for (p, seq) in &acked {
            let have = next_seq.get(p).copied().unwrap_or(0);
            assert!(
                have > *seq,
                "round {round}: producer {p} had {seq} acknowledged but the log ends at {have}"
            );
        }
        drop(log);
    }
}
