#!/usr/bin/env bash
# The link, measured: a ferry-edge and a ferry-cloud (release builds, default fsync on
# both) on this machine, over QUIC on loopback.
#
#   scripts/bench-link.sh [BACKLOG_MESSAGES]      (default 1000000)
#
# 1. Backlog drain: BACKLOG 100-byte QoS 1 messages are published to the edge while the
#    cloud is down (ferry-bench fill); then the cloud starts. Reported: the time from the
#    link coming up to the edge's outbox being empty (every record durable in the cloud's
#    log, acknowledged and deleted on the edge), and bytes on the wire per message.
# 2. The same with 1 KB messages (BACKLOG / 5 of them).
# 3. Latency from an MQTT publish on the edge to a subscriber on the cloud at 5,000 msg/s
#    (QoS 1 both sides; ferry-bench latency with --sub-port), 20 s after a 5-s warm-up.
set -euo pipefail
cd "$(dirname "$0")/.."
backlog=${1:-1000000}
# FERRY_BIN=DIR: the binaries in DIR (built elsewhere, e.g. an older commit), no build.
if [ -z "${FERRY_BIN:-}" ]; then
  cargo build --release -q -p ferry-edge -p ferry-cloud -p ferry-tests \
    --bin ferry-edge --bin ferry-cloud --bin ferry-bench
fi
bin=${FERRY_BIN:-target/release}
work=$(mktemp -d)
pids=()
trap 'kill "${pids[@]}" 2>/dev/null; wait 2>/dev/null; rm -rf "$work"' EXIT
$bin/ferry-cloud pki init --dir "$work/pki" >/dev/null
$bin/ferry-cloud pki issue-edge --dir "$work/pki" gw-1 >/dev/null
$bin/ferry-cloud pki issue-node --dir "$work/pki" localhost >/dev/null
cat >"$work/cloud.toml" <<TOML
[server]
listen = ["127.0.0.1:18840"]
[link]
listen = "127.0.0.1:17883"
ca_file = "$work/pki/ca.crt"
cert_file = "$work/pki/nodes/localhost.crt"
key_file = "$work/pki/nodes/localhost.key"
TOML
cat >"$work/edge.toml" <<TOML
[server]
listen = ["127.0.0.1:18841"]
metrics_listen = "127.0.0.1:19841"
[uplink]
cloud = "127.0.0.1:17883"
server_name = "localhost"
ca_file = "$work/pki/ca.crt"
cert_file = "$work/pki/edges/gw-1.crt"
key_file = "$work/pki/edges/gw-1.key"
max_outbox_bytes = 1073741824
reconnect_max_secs = 1
[[uplink.route]]
filter = "up/#"
TOML

metric() { curl -s http://127.0.0.1:19841/metrics | awk -v m="$1" '$1 == m {print $2}'; }
wait_for_port() { for _ in $(seq 100); do (echo >/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return; sleep 0.1; done; echo "port $1 never opened" >&2; exit 1; }
start_edge() {
  $bin/ferry-edge --config "$work/edge.toml" --data-dir "$work/edge" >"$work/edge.log" 2>&1 &
  edge=$!; pids+=("$edge"); wait_for_port 18841
}
start_cloud() {
  $bin/ferry-cloud --config "$work/cloud.toml" --data-dir "$work/cloud" >"$work/cloud.log" 2>&1 &
  cloud=$!; pids+=("$cloud"); wait_for_port 18840
}
stop() { kill "$1"; wait "$1" 2>/dev/null || true; }

drain() { # drain PAYLOAD COUNT
  rm -rf "$work/edge" "$work/cloud"
  start_edge
  $bin/ferry-bench fill --port 18841 --publishers 4 --qos 1 --payload "$1" --count "$2" --topic up/bench
  echo "outbox: $(metric ferry_edge_outbox_records) records, $(metric ferry_edge_outbox_bytes) bytes"
  connects=$(metric ferry_edge_link_connects_total)
  start_cloud
  until [ "$(metric ferry_edge_link_connects_total)" != "$connects" ]; do sleep 0.01; done
  up=$(date +%s.%N)
  until [ "$(metric ferry_edge_outbox_records)" = 0 ]; do sleep 0.05; done
  done_at=$(date +%s.%N)
  sent=$(metric ferry_edge_link_records_sent_total)
  bytes=$(metric ferry_edge_link_batch_bytes_sent_total)
  awk -v n="$2" -v p="$1" -v a="$up" -v b="$done_at" -v s="$sent" -v w="$bytes" 'BEGIN {
    t = b - a
    printf "drain %d x %d B: %.2f s after the link came up (%.0f msg/s, %.1f MB/s of payload); %.1f bytes on the wire per message (lz4 record batches, before QUIC/UDP/IP headers)\n", n, p, t, n / t, n * p / t / 1e6, w / s
  }'
  stop "$edge"; stop "$cloud"
}

drain 100 "$backlog"
drain 1000 "$((backlog / 5))"

rm -rf "$work/edge" "$work/cloud"
# Let the disk write back what the drains left in the page cache first.
sync; sleep 5
start_cloud; start_edge
sleep 2
lat() { $bin/ferry-bench latency --port 18841 --sub-port 18840 --topic up/lat --sub-filter gw-1/up/lat \
  --qos 1 --rate 5000 --secs "$1"; }
lat 5 >/dev/null     # warm-up: the databases' files grow to their working size
lat 20
