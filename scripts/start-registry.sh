#!/bin/sh
# Start Debian's docker-registry on 127.0.0.1:5000 for local test images.
# Our own config: the packaged one listens on every interface and turns on htpasswd.
set -eu

ADDR=127.0.0.1:5000
DIR="${STACYVM_CACHE:-/var/cache/stacyvm}/registry"
PIDFILE="$DIR/registry.pid"

answers() { curl -fsS -m 2 -o /dev/null "http://$ADDR/v2/" 2>/dev/null; }

if answers; then
    echo "registry: already answering on $ADDR"
    exit 0
fi

. "$(dirname "$0")/lib-apt.sh"
need_pkgs docker-registry

mkdir -p "$DIR/data"
cat > "$DIR/config.yml" <<YAML
version: 0.1
log: {level: warn, fields: {service: registry}}
storage:
  cache: {blobdescriptor: inmemory}
  filesystem: {rootdirectory: $DIR/data}
  delete: {enabled: true}
http:
  addr: $ADDR
  headers: {X-Content-Type-Options: [nosniff]}
YAML

echo "registry: starting docker-registry on $ADDR (storage $DIR/data)"
# setsid: the registry must outlive the shell (and test session) that started it.
setsid docker-registry serve "$DIR/config.yml" >"$DIR/registry.log" 2>&1 </dev/null &
echo $! > "$PIDFILE"

i=0
while ! answers; do
    i=$((i + 1))
    if ! kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then
        echo "registry: docker-registry exited; log follows" >&2
        cat "$DIR/registry.log" >&2
        exit 1
    fi
    if [ "$i" -ge 100 ]; then
        echo "registry: no answer on http://$ADDR/v2/ after 10 s; see $DIR/registry.log" >&2
        exit 1
    fi
    sleep 0.1
done
echo "registry: ready (pid $(cat "$PIDFILE"))"
