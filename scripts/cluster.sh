#!/usr/bin/env bash
# A three-node ferry-cloud cluster on one machine: SeaweedFS (S3) and PostgreSQL (started as
# scripts/test.sh starts them), three nodes on them, an edge that knows all three, and a
# simulated sensor publishing to the edge once a second. Runs until Ctrl-C, then stops
# everything and removes its data.
#
#   scripts/cluster.sh                 # release build
#   FERRY_PROFILE=dev scripts/cluster.sh
#
# Node i (1..3) listens on 127.0.0.1: MQTT 1188i, Kafka 1909i, AMQP 1567i, the link 1788i
# (UDP), the console and admin API 1910i (user ops, password ops). The edge's MQTT is 11880.
set -euo pipefail
cd "$(dirname "$0")/.."
profile=${FERRY_PROFILE:-release}
cargo build --profile "$profile" -p ferry-cloud -p ferry-edge --bins
target=target/$([ "$profile" = dev ] && echo debug || echo "$profile")

source scripts/services.sh
dir=$(mktemp -d /tmp/ferry-cluster.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  services_stop
  rm -rf "$dir"
}
trap cleanup EXIT INT TERM
services_start
psql "$FERRY_TEST_PG" -qc "CREATE DATABASE ferry_cluster" >/dev/null 2>&1 || true

"$target/ferry-cloud" pki init --dir "$dir/pki" >/dev/null
"$target/ferry-cloud" pki issue-node localhost --dir "$dir/pki" >/dev/null
"$target/ferry-cloud" pki issue-edge gw-1 --dir "$dir/pki" >/dev/null
printf 'ops:ops\n' >"$dir/passwd"
mosquitto_passwd -U "$dir/passwd"

for i in 1 2 3; do
  mkdir -p "$dir/node-$i"
  cat >"$dir/node-$i/cloud.toml" <<EOF
[server]
listen = ["127.0.0.1:1188$i"]
data_dir = "$dir/node-$i/data"
allow_anonymous = true
[log]
backend = "object"
$(services_object_tables cluster ferry_cluster "node-$i")
[admin]
listen = "127.0.0.1:1910$i"
password_file = "$dir/passwd"
admins = ["ops"]
[link]
listen = "127.0.0.1:1788$i"
ca_file = "$dir/pki/ca.crt"
cert_file = "$dir/pki/nodes/localhost.crt"
key_file = "$dir/pki/nodes/localhost.key"
[kafka]
listen = "127.0.0.1:1909$i"
[amqp]
listen = "127.0.0.1:1567$i"
EOF
  "$target/ferry-cloud" --config "$dir/node-$i/cloud.toml" >"$dir/node-$i/log" 2>&1 &
  pids+=($!)
done

cat >"$dir/edge.toml" <<EOF
[server]
listen = ["127.0.0.1:11880"]
data_dir = "$dir/edge"
[uplink]
cloud = ["127.0.0.1:17881", "127.0.0.1:17882", "127.0.0.1:17883"]
server_name = "localhost"
ca_file = "$dir/pki/ca.crt"
cert_file = "$dir/pki/edges/gw-1.crt"
key_file = "$dir/pki/edges/gw-1.key"
idle_timeout_secs = 5
[[uplink.route]]
filter = "sensors/#"
EOF
for i in 1 2 3; do
  for _ in $(seq 100); do
    curl -sf "http://127.0.0.1:1910$i/api/ready" >/dev/null && break
    sleep 0.2
  done
done
"$target/ferry-edge" --config "$dir/edge.toml" >"$dir/edge.log" 2>&1 &
pids+=($!)
for _ in $(seq 50); do
  mosquitto_pub -p 11880 -t sensors/hello -m up -q 1 2>/dev/null && break
  sleep 0.2
done
(
  n=0
  while true; do
    n=$((n + 1))
    mosquitto_pub -p 11880 -q 1 -t sensors/t1 \
      -m "{\"sensor\":\"t1\",\"n\":$n,\"celsius\":$((18 + n % 7))}" || true
    sleep 1
  done
) &
pids+=($!)

cat <<EOF
ferry cluster: three nodes on SeaweedFS and PostgreSQL, edge gw-1 linked to one of them.
  mosquitto_sub -p 11882 -t 'gw-1/#' -v           # the sensor's data, from any node
  kcat -b 127.0.0.1:19093 -C -t mqtt -f '%k %s\n'  # the same as Kafka records
  curl -s -u ops:ops http://127.0.0.1:19101/api/cluster   # nodes and leases
  http://127.0.0.1:19101/  (ops / ops)             # the console of node 1
Kill the node that holds gw-1's link (its pid is in /api/cluster's edge-link lease owner:
node-1 ${pids[0]}, node-2 ${pids[1]}, node-3 ${pids[2]}) and watch the edge move.
Logs in $dir. Ctrl-C stops everything.
EOF
wait
