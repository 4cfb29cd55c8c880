#!/usr/bin/env bash
# ferry-edge's footprint: the static (musl) binary of the `small` profile, its size, its
# resident memory idle and with 1,000 idle MQTT connections (ferry-bench idle).
#
#   scripts/footprint.sh [TARGET]     # default x86_64-unknown-linux-musl
#
# Needs the rustup target and a C compiler for it (x86_64: Debian's musl-tools, musl-gcc).
set -euo pipefail
cd "$(dirname "$0")/.."
target=${1:-x86_64-unknown-linux-musl}
export CC_x86_64_unknown_linux_musl=${CC_x86_64_unknown_linux_musl:-musl-gcc}
# The boards' feature set (cross-targets/build.sh): no OPC UA.
cargo build -q --profile small -p ferry-edge --target "$target" \
  --no-default-features --features "${FERRY_EDGE_FEATURES:-edge,field,mimalloc}"
cargo build -q --release -p ferry-tests --bin ferry-bench
bin=target/$target/small/ferry-edge
echo "binary: $bin, $(stat -c %s "$bin") bytes ($(file -b "$bin" | cut -d, -f1-2))"
data=$(mktemp -d)
"$bin" --listen 127.0.0.1:18860 --data-dir "$data" >/dev/null 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null; rm -rf "$data"' EXIT
sleep 2
awk '/VmRSS/ {printf "idle RSS: %.1f MiB\n", $2 / 1024}' /proc/$pid/status
target/release/ferry-bench idle --connections 1000 --port 18860 --pid "$pid" --secs 3
