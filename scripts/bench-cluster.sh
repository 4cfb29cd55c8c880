#!/usr/bin/env bash
# Aggregate Kafka ingest of a ferry-cloud cluster of 1, 2 and 3 nodes on this machine (all
# of them, SeaweedFS, PostgreSQL and the producers on the same cores), with the CPU each
# node spent per MB taken, so that N nodes on N machines can be projected (README, "Cluster
# benchmark"). One confluent-kafka producer per node (acks=all, RECORDS × 100 B each,
# bootstrapped on its node); the topic has 6 partitions, whose leaders the nodes share.
#
#   scripts/bench-cluster.sh [RECORDS]          (default 300000 per producer)
#
# Uses the services of scripts/services.sh (started here unless FERRY_TEST_PG is set).
set -euo pipefail
cd "$(dirname "$0")/.."
records=${1:-300000}
if [ -z "${FERRY_BIN:-}" ]; then
  cargo build --release -q -p ferry-cloud --bin ferry-cloud
fi
bin=${FERRY_BIN:-target/release}
# shellcheck source=scripts/services.sh
source scripts/services.sh
work=$(mktemp -d)
nodes=()
stop_nodes() {
  for p in "${nodes[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${nodes[@]}"; do wait "$p" 2>/dev/null || true; done
  nodes=()
}
trap 'stop_nodes; services_stop; rm -rf "$work"' EXIT
services_start
tick=$(getconf CLK_TCK)
# CPU seconds (user + system) a process has used.
cpu() { awk -v t="$tick" '{ printf "%.2f", ($14 + $15) / t }' "/proc/$1/stat"; }

printf '%-6s %-22s %-26s %s\n' nodes "aggregate records/s" "CPU s per MB (all nodes)" "CPU s per node"
for n in 1 2 3; do
  db="bench_cluster_${n}_$$"
  psql "$FERRY_TEST_PG" -q -c "CREATE DATABASE $db"
  for i in $(seq "$n"); do
    mkdir -p "$work/$n-$i"
    services_cluster_node_toml "$work/$n-$i" "$i" 6 "bench-cluster-$$-$n" "$db" \
      >"$work/$n-$i/cloud.toml"
    "$bin/ferry-cloud" --config "$work/$n-$i/cloud.toml" >"$work/$n-$i/log" 2>&1 &
    nodes+=($!)
  done
  for i in $(seq "$n"); do
    for _ in $(seq 150); do
      curl -sf "http://127.0.0.1:2910$i/api/ready" >/dev/null && break
      sleep 0.2
    done
  done
  # Every node sees the others (a second of membership refresh) before the producers start.
  sleep 3
  before=()
  for p in "${nodes[@]}"; do before+=("$(cpu "$p")"); done
  start=$(date +%s.%N)
  producers=()
  for i in $(seq "$n"); do
    FERRY_RECORDS=$records python3 scripts/kafka-produce.py "127.0.0.1:2909$i" \
      >"$work/$n-$i/produce" 2>&1 &
    producers+=($!)
  done
  for p in "${producers[@]}"; do wait "$p"; done
  end=$(date +%s.%N)
  confirmed=$(cat "$work/$n"-*/produce | sed -n 's/.*: \([0-9]*\) of .*/\1/p' | paste -sd+ | bc)
  spent=()
  total=0
  for k in "${!nodes[@]}"; do
    s=$(echo "$(cpu "${nodes[$k]}") - ${before[$k]}" | bc)
    spent+=("$s")
    total=$(echo "$total + $s" | bc)
  done
  mb=$(echo "scale=3; $confirmed * 100 / 1000000" | bc)
  rate=$(echo "$confirmed / ($end - $start)" | bc)
  printf '%-6s %-22s %-26s %s\n' "$n" "$rate" "$(echo "scale=3; $total / $mb" | bc)" "${spent[*]}"
  [ "$confirmed" -eq $((n * records)) ] || echo "  only $confirmed of $((n * records)) confirmed" >&2
  stop_nodes
done
