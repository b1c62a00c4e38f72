#!/bin/sh
# Stop the registry that start-registry.sh started (by its pidfile only).
set -eu

PIDFILE="${STACYVM_CACHE:-/var/cache/stacyvm}/registry/registry.pid"

. "$(dirname "$0")/lib-daemon.sh"
stop_pidfile registry "$PIDFILE" docker-registry 50
