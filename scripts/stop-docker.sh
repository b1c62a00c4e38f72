#!/bin/bash
# Stop the dockerd that setup-docker.sh started (by its pidfile only). Containers
# keep nothing running afterwards: dockerd stops them on shutdown.
set -eu

PIDFILE=/var/run/stacyvm-dockerd.pid

. "$(dirname "$0")/lib-daemon.sh"
stop_pidfile stop-docker "$PIDFILE" dockerd 200
rm -f "$PIDFILE.dockerd"
