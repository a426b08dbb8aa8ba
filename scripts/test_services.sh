#!/usr/bin/env bash
# Makes the services the tests use available on 127.0.0.1: PostgreSQL with PostGIS on
# 5432 and Redis on 6379. Installs PostGIS when it is missing and starts what is not
# running. Every step is skipped when its service is already there; where a step cannot
# be done (no root, no apt), it says so and the tests that need the service report it.
# Also installs Prometheus: tests run promtool and start their own server on loopback.
set -uo pipefail

PG_PORT=${TRACKING_TEST_PG_PORT:-5432}
REDIS_PORT=${TRACKING_TEST_REDIS_PORT:-6379}

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
    echo "test_services: need root for: $*" >&2; return 1; fi
}

pg_version() {
  ls /usr/lib/postgresql 2>/dev/null | sort -n | tail -n 1
}

if ! command -v pg_ctlcluster >/dev/null 2>&1; then
  echo "test_services: installing PostgreSQL" >&2
  as_root apt-get update -qq && as_root apt-get install -y -qq postgresql >/dev/null
fi

ver=$(pg_version)
if [ -n "$ver" ] && [ ! -f "/usr/share/postgresql/$ver/extension/postgis.control" ]; then
  echo "test_services: installing PostGIS for PostgreSQL $ver" >&2
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
    "postgresql-$ver-postgis-3" >/dev/null
fi

if ! pg_isready -q -h 127.0.0.1 -p "$PG_PORT"; then
  echo "test_services: starting PostgreSQL $ver" >&2
  as_root pg_ctlcluster --skip-systemctl-redirect "$ver" main start
  for _ in $(seq 1 30); do pg_isready -q -h 127.0.0.1 -p "$PG_PORT" && break; sleep 1; done
fi

if ! command -v redis-server >/dev/null 2>&1; then
  echo "test_services: installing Redis" >&2
  as_root apt-get update -qq && as_root apt-get install -y -qq redis-server >/dev/null
fi

if ! redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping >/dev/null 2>&1; then
  echo "test_services: starting Redis" >&2
  mkdir -p /tmp/tracking-redis
  redis-server --daemonize yes --bind 127.0.0.1 --port "$REDIS_PORT" --save "" \
    --appendonly no --dir /tmp/tracking-redis --logfile /tmp/tracking-redis/redis.log
  for _ in $(seq 1 30); do redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && break; sleep 0.5; done
fi
if ! command -v promtool >/dev/null 2>&1 || ! command -v prometheus >/dev/null 2>&1; then
  echo "test_services: installing Prometheus (promtool checks the shipped rules)" >&2
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null
fi
exit 0
