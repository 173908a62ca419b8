#!/usr/bin/env bash
# Start (or reuse) the PostgreSQL and Redis servers the test suite needs, on private loopback ports.
# Prints `export` lines; use as: eval "$(scripts/services.sh start)". `stop` stops both.
set -euo pipefail
PG_PORT=${MCP_FHIR_PG_PORT:-55432}
REDIS_PORT=${MCP_FHIR_REDIS_PORT:-56379}
STATE=${MCP_FHIR_SERVICES_DIR:-/tmp/mcp-fhir-services}
PG_DATA=$STATE/pg
log() { echo "services: $*" >&2; }

install_missing() {
  local need=()
  command -v redis-server >/dev/null || need+=(redis-server)
  ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
  if ((${#need[@]})); then
    log "installing ${need[*]} from Debian's packages"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2 && apt-get install -y -qq "${need[@]}" >&2
  fi
}

pg_bin() { ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n1; }

start_pg() {
  local bin; bin=$(pg_bin)
  mkdir -p "$STATE"
  if ! id postgres >/dev/null 2>&1; then useradd --system --home "$STATE" postgres; fi
  if [ ! -f "$PG_DATA/PG_VERSION" ]; then
    mkdir -p "$PG_DATA" && chown -R postgres "$STATE"
    runuser -u postgres -- "$bin/initdb" -D "$PG_DATA" -A trust -U postgres >/dev/null
  fi
  chown -R postgres "$STATE"
  if ! runuser -u postgres -- "$bin/pg_ctl" -D "$PG_DATA" status >/dev/null 2>&1; then
    runuser -u postgres -- "$bin/pg_ctl" -D "$PG_DATA" -l "$STATE/pg.log" -w \
      -o "-p $PG_PORT -c listen_addresses=127.0.0.1 -k $STATE -c fsync=on" start >/dev/null
  fi
  runuser -u postgres -- "$bin/psql" -h 127.0.0.1 -p "$PG_PORT" -U postgres -tAc \
    "SELECT 1 FROM pg_database WHERE datname='mcpfhir'" | grep -q 1 ||
    runuser -u postgres -- "$bin/psql" -h 127.0.0.1 -p "$PG_PORT" -U postgres -qc "CREATE DATABASE mcpfhir" >&2
}

start_redis() {
  if ! redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1; then
    redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --daemonize yes --save "" --appendonly no \
      --logfile "$STATE/redis.log" >/dev/null
    for _ in $(seq 50); do redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && break; sleep 0.1; done
  fi
}

case "${1:-start}" in
  start)
    install_missing
    start_pg
    start_redis
    echo "export MCP_FHIR_TEST_POSTGRES_DSN=postgresql://postgres@127.0.0.1:$PG_PORT/mcpfhir"
    echo "export MCP_FHIR_TEST_REDIS_URL=redis://127.0.0.1:$REDIS_PORT/0"
    ;;
  stop)
    runuser -u postgres -- "$(pg_bin)/pg_ctl" -D "$PG_DATA" stop -m fast >/dev/null 2>&1 || true
    redis-cli -p "$REDIS_PORT" shutdown nosave >/dev/null 2>&1 || true
    ;;
  *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
