#!/usr/bin/env bash
# The log on object storage (SeaweedFS as the S3 server, PostgreSQL for the index), measured
# on this machine beside the local log (release build; all of it on the same cores).
#
#   scripts/bench-object.sh [RECORDS]           (default 2000000 × 100 B)
#
# 1. Durable appends: ferry-log-bench appends RECORDS 100-byte records with 2,048 producers
#    × 16 records in flight (an append is answered once its flush is committed).
# 2. Latency: one-record appends at 5,000/s for 10 s with the default flush_ms (100), on the
#    object log, then on the local log.
# 3. Reads: ferry-log-bench reads the stream from the start, cold (a new process) and again.
# 4. kcat through a ferry-cloud node on the object log reads the stream to its end, twice;
#    confluent-kafka produces 1,000,000 × 100 B with acks=all (librdkafka's defaults, then
#    requests of up to 10 MB), then with its defaults to a node on the local log.
# The object store's requests are printed after each ferry-log-bench run.
# Uses the services of scripts/services.sh (started here unless FERRY_TEST_PG is set).
set -euo pipefail
cd "$(dirname "$0")/.."
records=${1:-2000000}
if [ -z "${FERRY_BIN:-}" ]; then
  cargo build --release -q -p ferry-cloud --bin ferry-cloud --bin ferry-log-bench
fi
bin=${FERRY_BIN:-target/release}
# shellcheck source=scripts/services.sh
source scripts/services.sh
work=$(mktemp -d)
cloud=""
trap '[ -n "$cloud" ] && kill $cloud 2>/dev/null; services_stop; rm -rf "$work"' EXIT
services_start
db="bench_$$"
psql "$FERRY_TEST_PG" -q -c "CREATE DATABASE $db"
cat >"$work/cloud.toml" <<TOML
[server]
listen = ["127.0.0.1:18851"]
[kafka]
listen = "127.0.0.1:19093"
[log]
backend = "object"
$(services_object_tables "bench-$$" "$db")
TOML
echo "== object log (SeaweedFS + PostgreSQL), flush_ms 100"
$bin/ferry-log-bench append --object "$work/cloud.toml" --records "$records" --producers 2048 --batch 16 --payload 100
$bin/ferry-log-bench latency --object "$work/cloud.toml" --rate 5000 --secs 10
echo "== local log (fsync on)"
$bin/ferry-log-bench latency --dir "$work/local" --rate 5000 --secs 10
echo "== reads from the object log"
$bin/ferry-log-bench read --object "$work/cloud.toml"
$bin/ferry-cloud --config "$work/cloud.toml" --data-dir "$work/data" >"$work/cloud.log" 2>&1 &
cloud=$!
for _ in $(seq 100); do (echo >/dev/tcp/127.0.0.1/19093) 2>/dev/null && break; sleep 0.1; done
for pass in cold warm; do
  start=$(date +%s.%N)
  got=$(kcat -b 127.0.0.1:19093 -C -t bench -o beginning -e -q -f '%S\n' | awk '{n++; b += $1} END {print n, b}')
  end=$(date +%s.%N)
  awk -v g="$got" -v a="$start" -v e="$end" -v p="$pass" 'BEGIN {
    split(g, x, " "); t = e - a
    printf "consume (kcat, %s): %d records, %.0f MB of values in %.2f s: %.0f records/s\n", p, x[1], x[2] / 1e6, t, x[1] / t }'
done
# librdkafka's defaults (1 MB requests, several in flight per connection: the front
# pipelines them), then requests of up to 10 MB; then the same node on the local log.
echo "== produce to the object log"
python3 scripts/kafka-produce.py 127.0.0.1:19093
python3 scripts/kafka-produce.py 127.0.0.1:19093 linger.ms=20 message.max.bytes=10000000 \
  batch.size=8000000 batch.num.messages=100000 queue.buffering.max.messages=2000000
kill $cloud
wait $cloud 2>/dev/null || true
printf '[server]\nlisten = ["127.0.0.1:18851"]\n[kafka]\nlisten = "127.0.0.1:19093"\n' >"$work/local.toml"
$bin/ferry-cloud --config "$work/local.toml" --data-dir "$work/local-node" >"$work/local.log" 2>&1 &
cloud=$!
for _ in $(seq 100); do (echo >/dev/tcp/127.0.0.1/19093) 2>/dev/null && break; sleep 0.1; done
echo "== produce to the local log"
python3 scripts/kafka-produce.py 127.0.0.1:19093
