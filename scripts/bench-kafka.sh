#!/usr/bin/env bash
# The Kafka front, measured with librdkafka clients on this machine (release build, fsync on).
#
#   scripts/bench-kafka.sh [RECORDS]          (default 9000000 × 100 B ≈ 1 GB of batches)
#
# 1. Consume: ferry-log-bench writes RECORDS 100-byte records to the stream "bench" (16
#    producers × 100 records per append); ferry-cloud starts on that data directory; kcat
#    reads the whole stream from the beginning (`-e`: to its end). Reported: MB/s and records/s.
# 2. Produce: confluent-kafka (librdkafka) produces 1,000,000 × 100 B records with acks=all
#    (linger 5 ms); reported: records/s once every delivery is confirmed.
# Needs kcat (apt) and confluent-kafka (pip), as scripts/test.sh installs them.
set -euo pipefail
cd "$(dirname "$0")/.."
records=${1:-9000000}
# FERRY_BIN=DIR: the binaries in DIR (built elsewhere, e.g. an older commit), no build.
if [ -z "${FERRY_BIN:-}" ]; then
  cargo build --release -q -p ferry-cloud --bin ferry-cloud --bin ferry-log-bench
fi
bin=${FERRY_BIN:-target/release}
work=$(mktemp -d)
trap 'kill $cloud 2>/dev/null; rm -rf "$work"' EXIT
$bin/ferry-log-bench append --dir "$work/data/log" --records "$records" --producers 16 --batch 100 --payload 100
printf '[server]\nlisten = ["127.0.0.1:18850"]\n[kafka]\nlisten = "127.0.0.1:19092"\n' >"$work/cloud.toml"
$bin/ferry-cloud --config "$work/cloud.toml" --data-dir "$work/data" >"$work/cloud.log" 2>&1 &
cloud=$!
for _ in $(seq 100); do (echo >/dev/tcp/127.0.0.1/19092) 2>/dev/null && break; sleep 0.1; done
bytes=$(du -sb "$work/data/log/bench-0" | cut -f1)
start=$(date +%s.%N)
got=$(kcat -b 127.0.0.1:19092 -C -t bench -o beginning -e -q -f '\n' | wc -l)
end=$(date +%s.%N)
awk -v n="$got" -v b="$bytes" -v a="$start" -v e="$end" 'BEGIN {
  t = e - a; printf "consume (kcat): %d records, %.0f MB of log in %.2f s: %.0f MB/s, %.0f records/s\n", n, b / 1e6, t, b / 1e6 / t, n / t }'
python3 scripts/kafka-produce.py 127.0.0.1:19092
