#!/bin/bash
# Stop the dockerd that setup-docker.sh started (by its pidfile only). Containers
# keep nothing running afterwards: dockerd stops them on shutdown.
set -eu

PIDFILE=/var/run/stacyvm-dockerd.pid

if [ ! -f "$PIDFILE" ]; then
    echo "stop-docker: no pidfile at $PIDFILE; nothing to stop"
    exit 0
fi
PID=$(cat "$PIDFILE")
if [ "$(cat "/proc/$PID/comm" 2>/dev/null)" = "dockerd" ]; then
    kill "$PID"
    i=0
    while kill -0 "$PID" 2>/dev/null && [ "$i" -lt 200 ]; do i=$((i + 1)); sleep 0.1; done
    kill -0 "$PID" 2>/dev/null && kill -9 "$PID"
    echo "stop-docker: stopped dockerd pid $PID"
else
    echo "stop-docker: pid $PID is not dockerd; removing stale pidfile"
fi
rm -f "$PIDFILE" "$PIDFILE.dockerd"
