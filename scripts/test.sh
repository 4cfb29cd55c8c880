#!/usr/bin/env bash
# Runs every test of the workspace. The end-to-end tests drive real clients, so this first
# installs the ones that come from Debian's packages when they are missing (as root, or with
# sudo), then runs `cargo test --workspace`.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v mosquitto_pub >/dev/null 2>&1 || need+=(mosquitto-clients)
if [ ${#need[@]} -gt 0 ]; then
  echo "installing: ${need[*]}"
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null
fi

cargo test --workspace "$@"
