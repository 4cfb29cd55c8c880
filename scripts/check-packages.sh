#!/usr/bin/env bash
# The Debian packages, checked: builds the amd64 .debs of ferry-edge and ferry-cloud with
# cargo-deb, installs them with dpkg, and checks what they put on the machine: the `ferry`
# user, the units (`systemd-analyze verify`), the configuration under /etc/ferry, each
# binary's --version, and a short MQTT round trip through each installed binary, run as the
# `ferry` user with the installed configuration. Then packs the static ferry-edge builds that
# cross-targets/check.sh made for arm64 and armhf. Purges the packages at the end.
#
#   scripts/check-packages.sh
#
# Needs root (or sudo) for dpkg; installs cargo-deb and mosquitto-clients when missing.
# Run by scripts/test.sh (and so by CI).
set -euo pipefail
cd "$(dirname "$0")/.."
# Where cargo puts what it builds (CARGO_TARGET_DIR, when set, as an absolute path).
target_dir=$(realpath -m "${CARGO_TARGET_DIR:-target}")
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
command -v cargo-deb >/dev/null 2>&1 || cargo install -q cargo-deb --locked --no-default-features
need=()
command -v mosquitto_pub >/dev/null 2>&1 || need+=(mosquitto-clients)
command -v systemd-analyze >/dev/null 2>&1 || need+=(systemd)
command -v adduser >/dev/null 2>&1 || need+=(adduser)
if [ ${#need[@]} -gt 0 ]; then
  $sudo apt-get update -qq || true  # a mirror mid-sync fails one index; the install says if it matters
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null
fi

work=$(mktemp -d)
chmod 755 "$work" # the ferry user reaches its data directory inside
pid=""
cleanup() {
  [ -z "$pid" ] || kill "$pid" 2>/dev/null || true
  $sudo dpkg --purge ferry-edge ferry-cloud >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

echo "== cargo deb (amd64)"
for p in ferry-edge ferry-cloud; do
  cargo deb -q -p "$p" --strip --output "$work/" >/dev/null
done
ls -l "$work"/*.deb
dpkg-deb --info "$work"/ferry-edge_*_amd64.deb | grep -E "Package|Architecture|Depends"

echo "== dpkg -i"
$sudo dpkg -i "$work"/ferry-edge_*_amd64.deb "$work"/ferry-cloud_*_amd64.deb >/dev/null
getent passwd ferry
for p in ferry-edge ferry-cloud; do
  test -f "/etc/ferry/$p.toml"
  dpkg-query -W -f='${Conffiles}\n' "$p" | grep -q "/etc/ferry/$p.toml"
  "/usr/bin/$p" --version
done
unit_dir=$(dirname "$(dpkg -L ferry-edge | grep '/ferry-edge.service$')")
systemd-analyze verify "$unit_dir/ferry-edge.service" "$unit_dir/ferry-cloud.service"
echo "ok: systemd-analyze verify"

# Each installed binary, as the service runs it (user ferry, the installed config, a data
# directory of its own), answers an MQTT round trip.
round_trip() {
  local p=$1 port=$2 data="$work/$1-data"
  $sudo install -d -o ferry -g ferry "$data"
  $sudo runuser -u ferry -- "/usr/bin/$p" --config "/etc/ferry/$p.toml" --data-dir "$data" \
    --listen "127.0.0.1:$port" >"$work/$p.log" 2>&1 &
  pid=$!
  for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/"$port") 2>/dev/null && break; sleep 0.1; done
  (exec 3<>/dev/tcp/127.0.0.1/"$port") 2>/dev/null || { echo "$p does not listen"; cat "$work/$p.log"; exit 1; }
  # A persistent session first (-E returns once the SUBACK is in), so the publish waits for
  # the reader however slowly the binary starts; then the reader takes it.
  timeout 30 mosquitto_sub -p "$port" -i "check-$p" -c -q 1 -t 'check/#' -E \
    || { echo "could not subscribe on the installed $p"; cat "$work/$p.log"; exit 1; }
  mosquitto_pub -p "$port" -t check/pkg -m "from the $p package" -q 1
  timeout 30 mosquitto_sub -p "$port" -i "check-$p" -c -q 1 -t 'check/#' -C 1 >"$work/$p.out" \
    || { echo "nothing read back from the installed $p"; cat "$work/$p.log"; exit 1; }
  grep -qx "from the $p package" "$work/$p.out" \
    || { echo "the installed $p gave back: $(cat "$work/$p.out")"; exit 1; }
  kill "$pid"
  wait "$pid" 2>/dev/null || true
  pid=""
  echo "ok: MQTT round trip through the installed $p"
}
round_trip ferry-edge 18941
round_trip ferry-cloud 18942

echo "== cargo deb (arm)"
# The static builds that cross-targets/check.sh made (scripts/test.sh runs it first).
for target in aarch64-unknown-linux-musl armv7-unknown-linux-musleabihf; do
  [ -f "$target_dir/$target/small/ferry-edge" ] \
    || { echo "no $target build to pack: run cross-targets/check.sh first"; exit 1; }
  cargo deb -q -p ferry-edge --target "$target" --profile small --no-build --output "$work/" >/dev/null
done
for arch in arm64 armhf; do
  deb=$(ls "$work"/ferry-edge_*_"$arch".deb 2>/dev/null) || { echo "cargo deb made no $arch package"; exit 1; }
  echo "$(basename "$deb"): $(dpkg-deb -f "$deb" Architecture), $(stat -c %s "$deb") bytes"
done
echo "packages: OK"
