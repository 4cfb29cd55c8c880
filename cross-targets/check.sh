#!/usr/bin/env bash
# The boards, checked on an x86_64 machine: ferry-edge built for aarch64 (static, musl) and
# armv7 (static, musl; and glibc) with the `small` profile, each run under qemu-user for an MQTT round trip
# through the ARM binary (mosquitto clients, QoS 1) and its link to an x86_64 ferry-cloud
# (QUIC, mutual TLS: a message published on the ARM edge is read on the cloud). Then the
# footprint: the static aarch64 binary's size (must be <= 5 MB) and idle RSS.
#
#   cross-targets/check.sh            # both targets
#   cross-targets/check.sh aarch64-unknown-linux-musl
#
# Installs what it needs on Debian (qemu-user, the cross compilers, mosquitto-clients).
# Run by scripts/test.sh (and so by CI).
set -euo pipefail
cd "$(dirname "$0")/.."
# Where cargo puts what it builds (CARGO_TARGET_DIR, when set, as an absolute path).
target_dir=$(realpath -m "${CARGO_TARGET_DIR:-target}")
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(aarch64-unknown-linux-musl armv7-unknown-linux-musleabihf armv7-unknown-linux-gnueabihf)

need=()
command -v qemu-aarch64 >/dev/null 2>&1 || need+=(qemu-user)
command -v mosquitto_pub >/dev/null 2>&1 || need+=(mosquitto-clients)
command -v musl-gcc >/dev/null 2>&1 || need+=(musl-tools)
command -v file >/dev/null 2>&1 || need+=(file)
if [ ${#need[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq || true  # a mirror mid-sync fails one index; the install says if it matters
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null
fi

work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

# Waits until something listens on TCP port $1 (up to 30 s: qemu starts slowly).
wait_port() {
  for _ in $(seq 300); do
    (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0
    sleep 0.1
  done
  echo "nothing listens on port $1" >&2
  return 1
}

# A persistent QoS 1 session for client id $2 on port $1 with the filter $3; returns once
# the broker acknowledged the subscription.
subscribe() {
  timeout 30 mosquitto_sub -p "$1" -i "$2" -c -q 1 -t "$3" -E \
    || { echo "could not subscribe to $3 on port $1" >&2; return 1; }
}
# The first message waiting in that session (topic and payload), within 30 s.
read_one() {
  timeout 30 mosquitto_sub -p "$1" -i "$2" -c -q 1 -t "$3" -C 1 -v
}

# The x86_64 cloud, with a link listener, and the link's certificates.
cargo build -q -p ferry-cloud --bin ferry-cloud
cloud_bin=$target_dir/debug/ferry-cloud
$cloud_bin pki init --dir "$work/pki" >/dev/null
$cloud_bin pki issue-node --dir "$work/pki" localhost >/dev/null
cat > "$work/cloud.toml" <<TOML
[server]
listen = ["127.0.0.1:18901"]
data_dir = "$work/cloud"
[link]
listen = "127.0.0.1:18902"
ca_file = "$work/pki/ca.crt"
cert_file = "$work/pki/nodes/localhost.crt"
key_file = "$work/pki/nodes/localhost.key"
TOML
$cloud_bin --config "$work/cloud.toml" >"$work/cloud.log" 2>&1 &
pids+=($!)
wait_port 18901

port=18910
for target in "${targets[@]}"; do
  echo "== $target"
  cross-targets/build.sh "$target" ferry-edge small
  bin=$target_dir/$target/small/ferry-edge
  case "$target" in
    aarch64-*-musl) qemu=(qemu-aarch64) ;;
    aarch64-*) qemu=(qemu-aarch64 -L /usr/aarch64-linux-gnu) ;;
    armv7-*-musl*) qemu=(qemu-arm) ;;
    armv7-*) qemu=(qemu-arm -L /usr/arm-linux-gnueabihf) ;;
  esac
  edge_id="board-${target%%-*}-${target##*-}"
  $cloud_bin pki issue-edge --dir "$work/pki" "$edge_id" >/dev/null
  port=$((port + 1))
  cat > "$work/$edge_id.toml" <<TOML
[server]
listen = ["127.0.0.1:$port"]
data_dir = "$work/$edge_id"
[uplink]
cloud = "127.0.0.1:18902"
server_name = "localhost"
ca_file = "$work/pki/ca.crt"
cert_file = "$work/pki/edges/$edge_id.crt"
key_file = "$work/pki/edges/$edge_id.key"
[[uplink.route]]
filter = "up/#"
qos = 1
TOML
  "${qemu[@]}" "$bin" --config "$work/$edge_id.toml" >"$work/$edge_id.log" 2>&1 &
  pids+=($!)
  wait_port "$port"

  # The round trip through the ARM binary, and what went up, read on the cloud. Each reader
  # first makes a persistent session (mosquitto_sub -E returns once the SUBACK is in), so
  # what is published next waits for it however slowly qemu runs; then it reads it back.
  subscribe "$port" "local-$edge_id" 'local/#'
  subscribe 18901 "up-$edge_id" "$edge_id/up/#"
  mosquitto_pub -p "$port" -t local/check -m "round trip on $target" -q 1
  mosquitto_pub -p "$port" -t up/check -m "from $target" -q 1
  read_one "$port" "local-$edge_id" 'local/#' >"$work/local.out" \
    || { echo "no round trip on $target"; cat "$work/$edge_id.log"; exit 1; }
  read_one 18901 "up-$edge_id" "$edge_id/up/#" >"$work/up.out" \
    || { echo "nothing from $target reached the cloud"; cat "$work/$edge_id.log" "$work/cloud.log"; exit 1; }
  grep -qx "local/check round trip on $target" "$work/local.out" \
    || { echo "the round trip on $target read back: $(cat "$work/local.out")"; exit 1; }
  grep -qx "$edge_id/up/check from $target" "$work/up.out" \
    || { echo "the cloud read from $target: $(cat "$work/up.out")"; exit 1; }
  echo "ok: MQTT round trip through the $target binary under qemu"
  echo "ok: its link to the x86_64 cloud: $(cat "$work/up.out")"
done

echo "== footprint"
measured=0
for target in "${targets[@]}"; do
  case "$target" in *-musl*) ;; *) continue ;; esac  # the size limit is for the static builds
  static=$target_dir/$target/small/ferry-edge
  [ -f "$static" ] || { echo "no $target build at $static to measure" >&2; exit 1; }
  size=$(stat -c %s "$static")
  echo "static ${target%%-*} ferry-edge (small, stripped): $size bytes ($(awk -v s="$size" 'BEGIN { printf "%.2f", s / 1048576 }') MiB)"
  [ "$size" -le 5000000 ] || { echo "over 5 MB"; exit 1; }
  measured=$((measured + 1))
done
[ "$measured" -gt 0 ] || echo "no static (musl) target in this run: binary size not measured"
# Idle RSS: under qemu-user the emulator's own memory is counted too, so it is measured on
# the same code built static for x86_64 (musl, small profile, the same allocator). rustup
# brings that target's standard library when it is missing (a fresh machine has only the
# host's).
rustup target list --installed | grep -qx x86_64-unknown-linux-musl || rustup target add x86_64-unknown-linux-musl
CC_x86_64_unknown_linux_musl=musl-gcc cargo build -q --profile small -p ferry-edge --target x86_64-unknown-linux-musl \
  --no-default-features --features "${FERRY_EDGE_FEATURES:-edge,field,mimalloc}"
native=$target_dir/x86_64-unknown-linux-musl/small/ferry-edge
"$native" --listen 127.0.0.1:18960 --data-dir "$work/idle" >/dev/null 2>&1 &
idle=$!
pids+=($idle)
wait_port 18960
sleep 2
rss=$(awk '/VmRSS/ { print $2 }' /proc/$idle/status)
echo "idle RSS (static x86_64 build of the same code): $rss KiB ($(awk -v r="$rss" 'BEGIN { printf "%.1f", r / 1024 }') MiB)"
[ "$rss" -le 5120 ] || { echo "over 5 MiB"; exit 1; }
echo "boards: OK"
