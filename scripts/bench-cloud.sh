#!/usr/bin/env bash
# ferry-cloud's MQTT front on its defaults (every publish appended to the log and fsynced
# before its PUBACK, every delivery read back from the log), with ferry-edge beside it as the
# anchor for QoS 0 fan-out, on the same machine in the same run, with the same load tool
# (ferry-bench, MQTT 3.1.1 over TCP).
#
#   scripts/bench-cloud.sh [SECS]                      # 10 s per run by default
#   FERRY_BIN=/path/to/bins scripts/bench-cloud.sh     # binaries built elsewhere (no build)
#
# For each QoS 1 fan-in run ferry-bench prints the acknowledged rate, what the subscriber
# received during the run, and the largest lag it saw (acknowledged minus received).
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-10}
if [ -z "${FERRY_BIN:-}" ]; then
  cargo build --release -q -p ferry-edge -p ferry-cloud -p ferry-tests \
    --bin ferry-edge --bin ferry-cloud --bin ferry-bench
fi
bin=${FERRY_BIN:-target/release}
work=$(mktemp -d)
pids=()
trap 'kill "${pids[@]}" 2>/dev/null; rm -rf "$work"' EXIT
"$bin/ferry-cloud" --listen 127.0.0.1:18850 --data-dir "$work/cloud" >"$work/cloud.log" 2>&1 &
pids+=($!)
"$bin/ferry-edge" --listen 127.0.0.1:18851 --data-dir "$work/edge" >"$work/edge.log" 2>&1 &
pids+=($!)
for port in 18850 18851; do
  for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null && break; sleep 0.1; done
done
run() {
  printf '%-11s ' "$1"
  # shellcheck disable=SC2086
  "$bin/ferry-bench" $3 --port "$2" --secs "$secs"
}
run ferry-cloud 18850 "fan-in --publishers 4 --qos 1"
run ferry-cloud 18850 "fan-in --publishers 16 --qos 1"
run ferry-cloud 18850 "fan-out --subscribers 4 --qos 0"
run ferry-edge 18851 "fan-out --subscribers 4 --qos 0"
run ferry-cloud 18850 "latency --rate 5000 --qos 1"
