#!/usr/bin/env bash
# The field sources under load, on ferry-edge's `small` build (the boards' profile, built
# for this machine):
#
#  1. Modbus TCP polling: DEVICES pymodbus devices (tests/clients/modbus_device.py, one
#     process, one port each) of 50 holding registers, every one polled every POLL_MS (1 s);
#     after a
#     warm-up, over SECS seconds: the reads per second the edge sustained (from /api/field),
#     its CPU (utime + stime from /proc) and its resident memory.
#  2. Serial ingest: a writer sends LINES_PER_SEC key=value lines a second into a socat pty
#     pair for SECS seconds; the edge parses each into JSON and publishes it; a
#     mosquitto_sub counts what arrives. Lines written, published, received, CPU, memory.
#
#   scripts/bench-field.sh                 # DEVICES=100 LINES_PER_SEC=10000 SECS=60
#   FERRY_BIN=DIR scripts/bench-field.sh   # a ferry-edge built elsewhere
#
# Needs python3 with pymodbus (scripts/test.sh installs it), socat and mosquitto-clients.
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICES=${DEVICES:-100}
LINES_PER_SEC=${LINES_PER_SEC:-10000}
SECS=${SECS:-60}
POLL_MS=${POLL_MS:-1000}
WARMUP=${WARMUP:-10}
if [ -n "${FERRY_BIN:-}" ]; then
  bin=$FERRY_BIN/ferry-edge
else
  # The boards' build: the small profile and their feature set (cross-targets/build.sh).
  cargo build -q --profile small -p ferry-edge \
    --no-default-features --features "${FERRY_EDGE_FEATURES:-edge,field,mimalloc}"
  bin=target/small/ferry-edge
fi
work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
ticks=$(getconf CLK_TCK)
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
rss_mib() { awk '/VmRSS/ {printf "%.1f", $2 / 1024}' "/proc/$1/status"; }
hwm_mib() { awk '/VmHWM/ {printf "%.1f", $2 / 1024}' "/proc/$1/status"; }
# The sum of one counter over the sources of /api/field.
field_sum() {
  curl -s "http://127.0.0.1:$metrics/api/field" |
    python3 -c "import json,sys; print(sum(s['$1'] for s in json.load(sys.stdin)))"
}
start_edge() { # config file
  "$bin" --config "$1" --data-dir "$work/data-$(basename "$1" .toml)" > "$work/edge.log" 2>&1 &
  edge=$!
  pids+=("$edge")
  for _ in $(seq 100); do
    grep -q "ferry-edge ready" "$work/edge.log" && return 0
    sleep 0.1
  done
  echo "ferry-edge did not start:"; cat "$work/edge.log"; exit 1
}
free_port() { python3 -c "import socket; s=socket.socket(); s.bind(('127.0.0.1',0)); print(s.getsockname()[1])"; }
# A window of SECS seconds: the edge's CPU over it, as a share of one core.
measure_cpu() {
  local t0 t1
  t0=$(cpu_ticks "$edge")
  sleep "$SECS"
  t1=$(cpu_ticks "$edge")
  python3 -c "print(f'{100 * ($t1 - $t0) / $ticks / $SECS:.1f}')"
}

echo "== ferry-edge: $bin ($(stat -c %s "$bin") bytes)"

echo "== Modbus TCP: $DEVICES devices x 50 registers, polled every $POLL_MS ms, ${SECS} s after ${WARMUP} s"
base=31000
points=$(python3 -c "import json; print(json.dumps([['holding_register', i, 'u16', 'big', 'big', i * 3] for i in range(50)]))")
python3 tests/clients/modbus_device.py --tcp "$base" --count "$DEVICES" --points "$points" \
  > "$work/devices.log" 2>&1 &
pids+=("$!")
for _ in $(seq 300); do grep -q READY "$work/devices.log" && break; sleep 0.1; done
metrics=$(free_port)
{
  printf '[server]\nlisten = ["127.0.0.1:0"]\nmetrics_listen = "127.0.0.1:%s"\n' "$metrics"
  for d in $(seq 0 $((DEVICES - 1))); do
    printf '[[field.modbus]]\nname = "plc%s"\naddress = "127.0.0.1:%s"\npoll_ms = %s\n' "$d" $((base + d)) "$POLL_MS"
    for i in $(seq 0 49); do
      printf '[[field.modbus.points]]\nname = "r%s"\ntable = "holding_register"\naddress = %s\n' "$i" "$i"
    done
  done
} > "$work/modbus.toml"
start_edge "$work/modbus.toml"
sleep "$WARMUP"
errors0=$(field_sum errors)
reads0=$(field_sum reads)
t0=$(date +%s.%N)
cpu=$(measure_cpu)
reads1=$(field_sum reads)
t1=$(date +%s.%N)
errors1=$(field_sum errors)
python3 -c "r = ($reads1 - $reads0) / ($t1 - $t0); print(f'reads/s: {r:.1f} (target {$DEVICES * 1000 / $POLL_MS:.0f}: every device every poll), registers/s: {50 * r:.0f}, errors: {$errors1 - $errors0}')"
echo "ferry-edge CPU: $cpu % of one core; RSS $(rss_mib "$edge") MiB (peak $(hwm_mib "$edge") MiB)"
kill "$edge" "${pids[0]}"
wait "$edge" "${pids[0]}" 2>/dev/null || true
pids=()

echo "== serial: $LINES_PER_SEC lines/s for ${SECS} s through a pty pair, parsed (kv), published"
socat "pty,raw,echo=0,link=$work/tty-a" "pty,raw,echo=0,link=$work/tty-b" &
pids+=("$!")
for _ in $(seq 100); do [ -e "$work/tty-a" ] && [ -e "$work/tty-b" ] && break; sleep 0.1; done
metrics=$(free_port)
port=$(free_port)
printf '[server]\nlisten = ["127.0.0.1:%s"]\nmetrics_listen = "127.0.0.1:%s"\n[[field.serial]]\nname = "meter"\npath = "%s"\nparse = "kv"\nqos = 0\n' \
  "$port" "$metrics" "$work/tty-b" > "$work/serial.toml"
start_edge "$work/serial.toml"
for _ in $(seq 100); do [ "$(field_sum up)" = 1 ] && break; sleep 0.1; done
mosquitto_sub -p "$port" -t field/meter > "$work/received" &
sub=$!
pids+=("$sub")
sleep 1
total=$((LINES_PER_SEC * SECS))
python3 - "$work/tty-a" "$LINES_PER_SEC" "$SECS" > "$work/writer.log" <<'PY' &
import os, sys, time
path, rate, secs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
fd = os.open(path, os.O_WRONLY)
batch = max(1, rate // 100)  # every 10 ms
start, n = time.monotonic(), 0
while n < rate * secs:
    lines = b"".join(b"v=%d t=21.5 unit=C\n" % (n + i) for i in range(batch))
    os.write(fd, lines)
    n += batch
    delay = start + n / rate - time.monotonic()
    if delay > 0:
        time.sleep(delay)
print(f"wrote {n} lines in {time.monotonic() - start:.1f} s")
PY
writer=$!
cpu=$(measure_cpu)
wait "$writer"
sleep 3
published=$(field_sum published) # and the source's status message
dropped=$(field_sum dropped)
received=$(wc -l < "$work/received")
cat "$work/writer.log"
echo "published: $((published - 1)) of $total (dropped over max_per_sec: $dropped), received by mosquitto_sub: $received"
echo "ferry-edge CPU: $cpu % of one core; RSS $(rss_mib "$edge") MiB (peak $(hwm_mib "$edge") MiB)"
