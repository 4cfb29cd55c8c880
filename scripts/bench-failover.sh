#!/usr/bin/env bash
# Failover of a ferry-cloud cluster (README, "Cluster failover"): three nodes on SeaweedFS
# and PostgreSQL. Kafka: a consumer group of two confluent-kafka consumers reads a topic of
# 3 partitions while an idempotent producer writes to it, and the node coordinating the
# group is killed with SIGKILL; printed, in seconds from the kill, when the group had every
# partition again, when a record sent after the kill was consumed, and when everything
# acknowledged before that was, with what was lost (acknowledged, never consumed)
# (scripts/failover-group.py). MQTT: a paho-mqtt subscriber with a persistent session on
# node 1 gets a QoS 1 message every 20 ms published on node 2; node 1 is killed and the
# subscriber connects to node 3 at once (scripts/failover-session.py). RUNS (default 3)
# times each, a new cluster each.
#
#   scripts/bench-failover.sh [RUNS] [group|session]    # both unless one is named
#
# Uses the services of scripts/services.sh (started here unless FERRY_TEST_PG is set).
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-3}
only=${2:-}
if [ -z "${FERRY_BIN:-}" ]; then
  cargo build --release -q -p ferry-cloud --bin ferry-cloud
fi
bin=${FERRY_BIN:-target/release}
# shellcheck source=scripts/services.sh
source scripts/services.sh
work=$(mktemp -d)
nodes=()
stop_nodes() {
  for p in "${nodes[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
  for p in "${nodes[@]}"; do wait "$p" 2>/dev/null || true; done
  nodes=()
}
started_services=""
if [ -z "${FERRY_TEST_PG:-}" ]; then
  services_start
  started_services=1
fi
trap 'stop_nodes; [ -z "$started_services" ] || services_stop; rm -rf "$work"' EXIT

# A new cluster of three nodes for run $1 (a database of its own): `nodes` their pids,
# `pids` as node-<i>=<pid>, `admins` their admin URLs.
start_cluster() {
  local run=$1 db="bench_failover_${1}_$$"
  psql "$FERRY_TEST_PG" -q -c "CREATE DATABASE $db"
  pids=()
  admins=()
  for i in 1 2 3; do
    mkdir -p "$work/$run-$i"
    services_cluster_node_toml "$work/$run-$i" "$i" 3 "bench-failover-$$-$run" "$db" \
      >"$work/$run-$i/cloud.toml"
    "$bin/ferry-cloud" --config "$work/$run-$i/cloud.toml" >"$work/$run-$i/log" 2>&1 &
    nodes+=($!)
    pids+=("node-$i=$!")
    admins+=("http://127.0.0.1:2910$i")
  done
  for i in 1 2 3; do
    for _ in $(seq 150); do
      curl -sf "http://127.0.0.1:2910$i/api/ready" >/dev/null && break
      sleep 0.2
    done
  done
  sleep 3
}

[ "$only" = session ] || echo "Kafka consumer group, its coordinator killed:"
[ "$only" = session ] || for run in $(seq "$runs"); do
  start_cluster "group_$run"
  echo "run $run:"
  python3 scripts/failover-group.py "127.0.0.1:29091,127.0.0.1:29092,127.0.0.1:29093" \
    failover "$(IFS=,; echo "${admins[*]}")" "${pids[@]}" 2>"$work/$run-clients.log" | sed 's/^/  /'
  stop_nodes
done
[ "$only" = group ] || echo "MQTT persistent session, its node killed:"
[ "$only" = group ] || for run in $(seq "$runs"); do
  start_cluster "session_$run"
  printf 'run %s: ' "$run"
  python3 scripts/failover-session.py 21882 21881 21883 "${nodes[0]}" \
    2>"$work/$run-session.log"
  stop_nodes
done
