#!/bin/sh
# Stop the registry that start-registry.sh started (by its pidfile only).
set -eu

PIDFILE="${STACYVM_CACHE:-/var/cache/stacyvm}/registry/registry.pid"

if [ ! -f "$PIDFILE" ]; then
    echo "registry: no pidfile at $PIDFILE; nothing to stop"
    exit 0
fi
PID=$(cat "$PIDFILE")
# Only kill the pid if it still is docker-registry (pids are reused).
if [ "$(cat "/proc/$PID/comm" 2>/dev/null)" = "docker-registry" ]; then
    kill "$PID"
    i=0
    while kill -0 "$PID" 2>/dev/null && [ "$i" -lt 50 ]; do i=$((i + 1)); sleep 0.1; done
    kill -0 "$PID" 2>/dev/null && kill -9 "$PID"
    echo "registry: stopped pid $PID"
else
    echo "registry: pid $PID is not docker-registry; removing stale pidfile"
fi
rm -f "$PIDFILE"
