#!/usr/bin/env bash
# ferry-edge and Mosquitto side by side, same machine, same run, same load tool
# (ferry-bench, MQTT 3.1.1 over TCP with TCP_NODELAY on the clients).
#
#   scripts/bench-brokers.sh [SECS]
#
# Needs the mosquitto broker (Debian package mosquitto). Mosquitto runs with its defaults
# (in memory, TCP_NODELAY off on its side); ferry-edge with its defaults (TCP_NODELAY on,
# fsync on). With a clean subscriber session nothing is written to disk; with --persistent
# ferry-edge commits every QoS 1 message (and its acknowledgement state) before the PUBACK.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-5}
command -v mosquitto >/dev/null || { echo "install the mosquitto package first" >&2; exit 1; }
# FERRY_BIN=DIR: the binaries in DIR (built elsewhere, e.g. an older commit), no build.
[ -n "${FERRY_BIN:-}" ] || cargo build --release -q -p ferry-edge -p ferry-tests --bin ferry-edge --bin ferry-bench
bin=${FERRY_BIN:-target/release}
data=$(mktemp -d)
"$bin"/ferry-edge --listen 127.0.0.1:18830 --data-dir "$data" >/dev/null 2>&1 &
ferry=$!
mosquitto -p 18831 >/dev/null 2>&1 &
mosq=$!
trap 'kill $ferry $mosq 2>/dev/null; rm -rf "$data"' EXIT
sleep 1
rss() { awk '/VmRSS/ {printf "%.1f MiB", $2 / 1024}' /proc/$1/status; }
echo "idle RSS: ferry-edge $(rss $ferry), mosquitto $(rss $mosq)"
for broker in "ferry-edge 18830 $ferry" "mosquitto 18831 $mosq"; do
  set -- $broker
  printf '%-10s ' "$1"
  "$bin"/ferry-bench idle --connections 1000 --port "$2" --pid "$3" --secs 3
done
for run in "fan-in --publishers 4 --qos 0" "fan-in --publishers 16 --qos 0" "fan-in --publishers 4 --qos 1" \
           "fan-in --publishers 4 --qos 1 --persistent" \
           "fan-out --subscribers 4 --qos 0" "latency --rate 5000 --qos 0" "latency --rate 20000 --qos 0"; do
  for broker in "ferry-edge 18830" "mosquitto 18831"; do
    set -- $broker
    printf '%-10s ' "$1"
    # shellcheck disable=SC2086
    "$bin"/ferry-bench $run --port "$2" --secs "$secs"
  done
done
# Memory a burst took should be given back once it is over.
sleep 5
echo "RSS after all runs: ferry-edge $(rss $ferry), mosquitto $(rss $mosq)"
