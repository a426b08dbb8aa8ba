#!/usr/bin/env bash
# Makes the services the tests use available on 127.0.0.1: PostgreSQL with PostGIS on
# 5432 and Redis on 6379, and the binaries the fault and cluster tests start privately
# (initdb/pg_ctl, redis-server, redis-cli). Installs what is missing and starts what is
# not running; every step is skipped when its part is already there. Where a step
# cannot be done (no root, no network), it says so, and the tests that need the
# service report it (under TRACKING_REQUIRE_SERVICES they fail rather than skip).
# Also installs Prometheus: tests run promtool and start their own server on loopback.
set -uo pipefail

PG_PORT=${TRACKING_TEST_PG_PORT:-5432}
REDIS_PORT=${TRACKING_TEST_REDIS_PORT:-6379}
APT_UPDATED=0

say() { echo "test_services: $*" >&2; }

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
    say "need root for: $*"; return 1; fi
}

apt_install() {
  if [ "$APT_UPDATED" = 0 ]; then
    as_root apt-get update -qq || say "apt-get update failed"
    APT_UPDATED=1
  fi
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null \
    || say "could not install $*"
}

pg_version() {
  ls /usr/lib/postgresql 2>/dev/null | sort -n | tail -n 1
}

# PostgreSQL server and client.
if [ -z "$(pg_version)" ] || ! command -v pg_ctlcluster >/dev/null 2>&1; then
  say "installing PostgreSQL"
  apt_install postgresql postgresql-contrib
fi
ver=$(pg_version)

# PostGIS for that PostgreSQL version.
if [ -n "$ver" ] && [ ! -f "/usr/share/postgresql/$ver/extension/postgis.control" ]; then
  say "installing PostGIS for PostgreSQL $ver"
  apt_install "postgresql-$ver-postgis-3"
fi

# The shared server on $PG_PORT.
if ! pg_isready -q -h 127.0.0.1 -p "$PG_PORT" 2>/dev/null; then
  say "starting PostgreSQL $ver"
  if ! as_root pg_ctlcluster --skip-systemctl-redirect "$ver" main start; then
    say "no cluster 'main' to start: creating one"
    as_root pg_createcluster "$ver" main --port "$PG_PORT" -- --auth=trust \
      && as_root pg_ctlcluster --skip-systemctl-redirect "$ver" main start
  fi
  for _ in $(seq 1 30); do pg_isready -q -h 127.0.0.1 -p "$PG_PORT" && break; sleep 1; done
fi
if ! psql -h 127.0.0.1 -p "$PG_PORT" -U postgres -d postgres -Atqc \
  "SELECT 1 FROM pg_available_extensions WHERE name = 'postgis'" 2>/dev/null | grep -q 1; then
  say "PostGIS is not available in the server on port $PG_PORT"
fi

# Redis: the server, the CLI (cluster creation) and the shared instance on $REDIS_PORT.
if ! command -v redis-server >/dev/null 2>&1 || ! command -v redis-cli >/dev/null 2>&1; then
  say "installing Redis"
  apt_install redis-server redis-tools
fi
if ! redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping >/dev/null 2>&1; then
  say "starting Redis"
  mkdir -p /tmp/tracking-redis
  redis-server --daemonize yes --bind 127.0.0.1 --port "$REDIS_PORT" --save "" \
    --appendonly no --dir /tmp/tracking-redis --logfile /tmp/tracking-redis/redis.log
  for _ in $(seq 1 30); do
    redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping >/dev/null 2>&1 && break; sleep 0.5
  done
fi

# Prometheus.
if ! command -v promtool >/dev/null 2>&1 || ! command -v prometheus >/dev/null 2>&1; then
  say "installing Prometheus (promtool checks the shipped rules)"
  apt_install prometheus
fi

pg_isready -q -h 127.0.0.1 -p "$PG_PORT" || say "PostgreSQL is not reachable on $PG_PORT"
redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping >/dev/null 2>&1 \
  || say "Redis is not reachable on $REDIS_PORT"
exit 0
