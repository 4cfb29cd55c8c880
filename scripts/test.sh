#!/usr/bin/env bash
# Runs every test of the workspace. The end-to-end tests drive real clients, so this first
# installs the ones that come from Debian's packages when they are missing (as root, or with
# sudo), starts PostgreSQL and SeaweedFS for the object backend (scripts/services.sh), then
# runs `cargo test --workspace` (and, with no arguments, the fronts' end-to-end suites again
# with their ferry-cloud nodes on the object backend), and prints one line that adds up every test
# binary's result: "N passed, N failed". With no arguments it then checks the boards
# (cross-targets/check.sh: ARM builds under qemu-user, footprint) and the Debian packages
# (scripts/check-packages.sh: built, installed with dpkg, units verified, run); with
# arguments (passed to cargo test) only the cargo tests run.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v mosquitto_pub >/dev/null 2>&1 || need+=(mosquitto-clients)
command -v mosquitto_passwd >/dev/null 2>&1 || need+=(mosquitto)
command -v kcat >/dev/null 2>&1 || need+=(kcat)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
command -v socat >/dev/null 2>&1 || need+=(socat)
# Headless Chromium and its WebDriver for the console's browser test (tests/tests/console.rs).
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v chromedriver >/dev/null 2>&1 || need+=(chromium-driver)
if [ ${#need[@]} -gt 0 ]; then
  echo "installing: ${need[*]}"
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq || true  # a mirror mid-sync fails one index; the install says if it matters
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null
fi

# Python clients and peers (paho-mqtt: MQTT over WebSocket interop; confluent-kafka: librdkafka's
# Python client against the Kafka front; pika: the RabbitMQ client against the AMQP front).
python3 -c "import paho.mqtt" 2>/dev/null || python3 -m pip install -q paho-mqtt
python3 -c "import confluent_kafka" 2>/dev/null || python3 -m pip install -q confluent-kafka
python3 -c "import pika" 2>/dev/null || python3 -m pip install -q pika
python3 -c "import aio_pika" 2>/dev/null || python3 -m pip install -q aio-pika
python3 -c "import kombu, celery" 2>/dev/null || python3 -m pip install -q kombu celery
# pymodbus (with pyserial, for RTU) is the Modbus device of the field tests; its server API
# changes between minor versions, hence the pin.
python3 -c "from pymodbus.simulator import SimDevice; import serial" 2>/dev/null ||
  python3 -m pip install -q "pymodbus[serial]==3.16.*"
# asyncua: the OPC UA server of the field tests (pinned like pymodbus).
python3 -c "import asyncua" 2>/dev/null || python3 -m pip install -q "asyncua==2.1.*"
# selenium drives Chromium in the console's browser test.
python3 -c "import selenium" 2>/dev/null || python3 -m pip install -q "selenium==4.*"
# The Kubernetes manifests' offline check (tests/tests/deploy.rs).
python3 -c "import yaml" 2>/dev/null || python3 -m pip install -q pyyaml
# amqplib (Node.js) for the AMQP front, into tests/clients/node_modules (not committed).
[ -d tests/clients/node_modules/amqplib ] ||
  npm install --no-save --no-package-lock --silent --prefix tests/clients amqplib@0.10

# PostgreSQL and SeaweedFS (S3) for the object-storage backend's tests, for this run only.
source scripts/services.sh
log=$(mktemp)
trap 'services_stop; rm -f "$log"' EXIT
services_start
status=0
cargo test --workspace "$@" 2>&1 | tee "$log" || status=$?
if [ $# -eq 0 ]; then
  # The end-to-end suites of the fronts once more, every ferry-cloud they start (a process,
  # or a node in the test's process) on the object backend (S3 and PostgreSQL above; see
  # ferry_tests::services::on_object_backend).
  again=(link cloud_node cloud_kafka cloud_kafka_api cloud_rdkafka cloud_amqp cloud_amqp_clients)
  echo "== again on the object backend: ${again[*]}"
  FERRY_TEST_BACKEND=object cargo test -p ferry-tests $(printf -- '--test %s ' "${again[@]}") \
    2>&1 | tee -a "$log" || status=$?
fi
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($i ~ /^passed/) p += $(i-1); if ($i ~ /^failed/) f += $(i-1) } }
     END { printf "%d passed, %d failed\n", p, f }' "$log"
if [ $# -eq 0 ] && [ "$status" -eq 0 ]; then
  cross-targets/check.sh
  scripts/check-packages.sh
fi
exit "$status"
