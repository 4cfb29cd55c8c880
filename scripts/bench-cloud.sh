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
pid=""
trap '[ -z "$pid" ] || kill "$pid" 2>/dev/null; rm -rf "$work"' EXIT
wait_port() {
  for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0; sleep 0.1; done
  echo "nothing listens on port $1" >&2; exit 1
}
# Each run against a fresh broker (a new data directory): what one run left in the log does
# not slow the next.
run() { # run BINARY LOAD...
  local binary=$1; shift
  rm -rf "$work/data"
  "$bin/$binary" --listen 127.0.0.1:18850 --data-dir "$work/data" >"$work/$binary.log" 2>&1 &
  pid=$!
  wait_port 18850
  printf '%-11s ' "$binary"
  "$bin/ferry-bench" "$@" --port 18850 --secs "$secs"
  kill "$pid"; wait "$pid" 2>/dev/null || true; pid=""
}
run ferry-cloud fan-in --publishers 4 --qos 1
run ferry-cloud fan-in --publishers 16 --qos 1
run ferry-cloud fan-out --subscribers 4 --qos 0
run ferry-edge fan-out --subscribers 4 --qos 0
run ferry-cloud latency --rate 5000 --qos 1
