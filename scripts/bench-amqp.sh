#!/usr/bin/env bash
# ferry-cloud's AMQP front and RabbitMQ side by side, same machine, same run, same load tool
# (ferry-amqp-bench, on lapin): 100-byte persistent messages (delivery mode 2) to a durable
# queue, publisher confirms (a window of 1,000 per publisher), manual acks with prefetch 200.
#
#   scripts/bench-amqp.sh [SECS]                      # 10 s per timed run by default
#   FERRY_BIN=/path/to/bins scripts/bench-amqp.sh     # binaries built elsewhere (no build)
#
# RabbitMQ is Debian's rabbitmq-server (installed with apt-get if missing), started by this
# script as a process of its own (no systemd) on its defaults, its data in a temporary
# directory; ferry-cloud on its defaults with [amqp] on another port. Both run for the whole
# script, each measured in turn:
#   1. RSS of each broker idle and with 1,000 idle connections (a channel each);
#   2. confirmed publish rate with 1 and with 4 publishers while one consumer drains;
#   3. consume-ack rate of a 200,000-message backlog (published first, then drained);
#   4. confirm latency (publish -> its confirm) at 5,000 msg/s, one publisher, with a
#      consumer draining and without one;
#   5. RSS after a 1,000,000-message backlog was published and consumed;
#   6. kill -9 mid-flood (4 confirmed publishers for 3 s), restart on the same data, drain:
#      confirmed messages that never came back (and how long the first delivery took).
# Then one table with both side by side. Not run in CI (benchmarks run outside CI).
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-10}
if [ -z "${FERRY_BIN:-}" ]; then
  cargo build --release -q -p ferry-cloud -p ferry-tests --bin ferry-cloud --bin ferry-amqp-bench
fi
bin=${FERRY_BIN:-target/release}
if [ ! -x /usr/lib/rabbitmq/bin/rabbitmq-server ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq rabbitmq-server >/dev/null
fi
rabbit_version=$(dpkg-query -W -f '${Version}' rabbitmq-server | cut -d- -f1)
ferry_port=15680 ferry_mqtt=18860 rabbit_port=15681
ferry_uri="amqp://127.0.0.1:$ferry_port/%2f" rabbit_uri="amqp://guest:guest@127.0.0.1:$rabbit_port/%2f"
work=$(mktemp -d)
ferry="" rabbit=""
pgrep -x epmd >/dev/null && epmd_was_running=1 || epmd_was_running=""
cleanup() {
  for p in $ferry $rabbit; do kill "$p" 2>/dev/null && wait "$p" 2>/dev/null; done
  # The Erlang port mapper that RabbitMQ started, unless one was running before.
  [ -n "$epmd_was_running" ] || epmd -kill >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

wait_port() {
  for _ in $(seq 600); do (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0; sleep 0.1; done
  echo "nothing listens on port $1" >&2; exit 1
}
start_ferry() {
  printf '[server]\nlisten = ["127.0.0.1:%s"]\n[amqp]\nlisten = "127.0.0.1:%s"\n' \
    "$ferry_mqtt" "$ferry_port" >"$work/cloud.toml"
  "$bin/ferry-cloud" --config "$work/cloud.toml" --data-dir "$work/ferry" >>"$work/ferry.log" 2>&1 &
  ferry=$!
  wait_port "$ferry_port"
}
# RabbitMQ's own start script (not Debian's wrapper, which switches to the rabbitmq user);
# RUNNING_UNDER_SYSTEMD makes it exec the Erlang VM, so $! is the broker's pid.
start_rabbit() {
  mkdir -p "$work/rabbit"
  echo "[]." >"$work/rabbit/enabled_plugins"
  HOME="$work/rabbit" RUNNING_UNDER_SYSTEMD=true RABBITMQ_NODENAME=ferry-bench@localhost \
    RABBITMQ_NODE_PORT=$rabbit_port RABBITMQ_DIST_PORT=$((rabbit_port + 10000)) \
    RABBITMQ_MNESIA_BASE="$work/rabbit/mnesia" RABBITMQ_LOG_BASE="$work/rabbit/log" \
    RABBITMQ_ENABLED_PLUGINS_FILE="$work/rabbit/enabled_plugins" \
    RABBITMQ_CONFIG_FILE="$work/rabbit/rabbitmq" RABBITMQ_PID_FILE="$work/rabbit/pid" \
    /usr/lib/rabbitmq/bin/rabbitmq-server >>"$work/rabbit.log" 2>&1 </dev/null &
  rabbit=$!
  wait_port "$rabbit_port"
}
# run NAME BROKER ARGS...: one ferry-amqp-bench run against BROKER (ferry|rabbit); its line
# is shown, its `= name=value` pairs kept as NAME.BROKER.name in $work/results. A run that
# fails (e.g. the broker closed one of its connections) is tried again, twice at most, and
# each failure is listed under the table.
run() {
  local name=$1 broker=$2; shift 2
  local uri=$ferry_uri out attempt
  [ "$broker" = ferry ] || uri=$rabbit_uri
  for attempt in 1 2 3; do
    if out=$("$bin/ferry-amqp-bench" "$@" --uri "$uri" 2>"$work/stderr"); then
      printf '%-6s %s\n' "$broker" "$(grep -v '^= ' <<<"$out")"
      grep '^= ' <<<"$out" | tr ' ' '\n' | grep '=.' | sed "s/^/$name.$broker./" >>"$work/results"
      return 0
    fi
    echo "$broker: $1 (attempt $attempt of 3) failed: $(tail -1 "$work/stderr")" | tee -a "$work/failures"
  done
}
get() { sed -n "s/^$1=//p" "$work/results" | tail -1; }
val() { local v; v=$(get "$1"); echo "${v:--}"; }

start_ferry
start_rabbit
echo "ferry-cloud pid $ferry on $ferry_port, RabbitMQ $rabbit_version pid $rabbit on $rabbit_port; $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg)"
sleep 5 # RabbitMQ's memory settles after boot
for b in ferry rabbit; do
  pid=$ferry; [ $b = ferry ] || pid=$rabbit
  run idle $b idle --connections 1000 --pid "$pid" --secs 5
done
for b in ferry rabbit; do run flood1 $b flood --publishers 1 --secs "$secs"; done
for b in ferry rabbit; do run flood4 $b flood --publishers 4 --secs "$secs"; done
for b in ferry rabbit; do run backlog $b backlog --count 200000; done
for b in ferry rabbit; do run latency $b latency --rate 5000 --secs "$secs"; done
for b in ferry rabbit; do run latency0 $b latency --rate 5000 --secs "$secs" --no-consumer; done
for b in ferry rabbit; do
  pid=$ferry; [ $b = ferry ] || pid=$rabbit
  run million $b backlog --count 1000000 --pid "$pid"
done
for b in ferry rabbit; do
  pid=$ferry; [ $b = ferry ] || pid=$rabbit
  run killed $b kill-flood --publishers 4 --secs 3 --pid "$pid" --out "$work/confirmed.$b"
  # kill-flood sent the SIGKILL; should it have failed before, the broker dies here.
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  if [ $b = ferry ]; then start_ferry; else start_rabbit; fi
  run kill $b kill-check --confirmed "$work/confirmed.$b"
done

# Each prints "-" for a figure that a failed run left out.
kib() { awk -v k="$1" 'BEGIN { if (k == "") print "-"; else printf "%.1f MiB", k / 1024 }'; }
rate() { # thousands separated by commas, as in the README
  awk -v v="$1" 'BEGIN { if (v == "") { print "-"; exit } s = sprintf("%d", v)
    while (s ~ /[0-9][0-9][0-9][0-9]/) sub(/[0-9][0-9][0-9]($|,)/, ",&", s); print s " msg/s" }'
}
us() { awk -v v="$1" 'BEGIN { if (v == "") print "-"; else if (v >= 10000) printf "%.1f ms", v / 1000; else printf "%d µs", v }'; }
ratio() { awk -v f="$1" -v r="$2" 'BEGIN { if (f != "" && r > 0) printf "%.2f×", f / r; else print "-" }'; }
row() { printf '| %s | %s | %s | %s |\n' "$1" "$2" "$3" "${4:-}"; }
rates() { # rates LABEL NAME KEY
  local f r; f=$(get "$2.ferry.$3") r=$(get "$2.rabbit.$3")
  row "$1" "$(rate "$f")" "$(rate "$r")" "$(ratio "$f" "$r")"
}
lat() { # lat LABEL NAME
  local f50 f99 r50 r99
  f50=$(get "$2.ferry.p50_us") f99=$(get "$2.ferry.p99_us") r50=$(get "$2.rabbit.p50_us") r99=$(get "$2.rabbit.p99_us")
  row "$1" "$(us "$f50") / $(us "$f99")" "$(us "$r50") / $(us "$r99")" "$(ratio "$f50" "$r50") / $(ratio "$f99" "$r99")"
}
echo
echo "load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "100 B persistent messages, durable queue, confirms (window 1,000 per publisher), manual acks, prefetch 200; ${secs} s per timed run"
echo
row "run" "ferry-cloud" "RabbitMQ $rabbit_version" "Ferry / RabbitMQ"
row "---" "---" "---" "---"
rates "1 publisher + 1 consumer: confirmed" flood1 confirmed
rates "1 publisher + 1 consumer: consumed" flood1 consumed
rates "4 publishers + 1 consumer: confirmed" flood4 confirmed
rates "4 publishers + 1 consumer: consumed" flood4 consumed
rates "200,000-message backlog: consumed and acked by 1 consumer" backlog consumed
rates "(its publishing first: 4 publishers, confirmed)" backlog published
lat "confirm latency at 5,000 msg/s, consumer draining: p50 / p99" latency
lat "confirm latency at 5,000 msg/s, no consumer: p50 / p99" latency0
row "RSS idle / with 1,000 idle connections" \
  "$(kib "$(get idle.ferry.before_kb)") / $(kib "$(get idle.ferry.with_kb)")" \
  "$(kib "$(get idle.rabbit.before_kb)") / $(kib "$(get idle.rabbit.with_kb)")"
row "RSS after a 1,000,000-message backlog was published and consumed (peak)" \
  "$(kib "$(get million.ferry.rss_kb)") ($(kib "$(get million.ferry.peak_kb)"))" \
  "$(kib "$(get million.rabbit.rss_kb)") ($(kib "$(get million.rabbit.peak_kb)"))"
rates "(the 1,000,000 consumed and acked)" million consumed
row "kill -9 mid-flood: confirmed before the kill / confirmed but lost after the restart" \
  "$(val kill.ferry.confirmed) / $(val kill.ferry.lost)" "$(val kill.rabbit.confirmed) / $(val kill.rabbit.lost)"
row "(first delivery, from connecting after the restart)" "$(val kill.ferry.first_secs) s" "$(val kill.rabbit.first_secs) s"
if [ -s "$work/failures" ]; then
  echo
  echo "Failed attempts (each tried again):"
  sed 's/^/  /' "$work/failures"
fi
closed=$(grep -c "not reading; closed" "$work/ferry.log" || true)
[ "$closed" = 0 ] || echo "ferry-cloud's log: $closed connections closed as \"not reading\""
