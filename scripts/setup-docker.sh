#!/bin/bash
# Install Debian's docker.io (with containerd) and make sure dockerd answers on
# /var/run/docker.sock. There is no systemd here: we start dockerd ourselves, with a
# pidfile and a log, and never let the package's init script start it.
# Idempotent. Registers gVisor's runsc as a Docker runtime when runsc is installed
# (and restarts a dockerd we started when daemon.json changed).
# Prints "setup-docker: started" when this run started dockerd (scripts/test.sh uses it).
set -euo pipefail

[ "$(id -u)" = 0 ] || { echo "setup-docker.sh: run as root" >&2; exit 1; }

SOCK=/var/run/docker.sock
PIDFILE=/var/run/stacyvm-dockerd.pid
LOG=/var/log/stacyvm-dockerd.log
DAEMON_JSON=/etc/docker/daemon.json
export DEBIAN_FRONTEND=noninteractive

log() { echo "setup-docker: $*"; }
answers() { curl -fsS -m 3 --unix-socket "$SOCK" -o /dev/null http://localhost/_ping 2>/dev/null; }

# 1. Packages, without the package scripts starting the daemons.
. "$(dirname "$0")/lib-apt.sh"
need_pkgs docker.io iptables

# 2. daemon.json: runsc and crun as extra runtimes when installed.
want=$(python3 - "$DAEMON_JSON" <<'PY'
import json, os, sys
path = sys.argv[1]
try:
    cfg = json.load(open(path))
except (OSError, ValueError):
    cfg = {}
runtimes = cfg.setdefault("runtimes", {})
if os.path.exists("/usr/bin/runsc"):
    # --network=host: the netns Docker made for the container (the default, "sandbox",
    # fails on this kernel: host-notes 4b). ptrace: the kvm platform hangs here.
    runtimes["runsc"] = {"path": "/usr/bin/runsc", "runtimeArgs": ["--platform=ptrace", "--network=host"]}
if os.path.exists("/usr/bin/crun"):
    runtimes["crun"] = {"path": "/usr/bin/crun"}
if not runtimes:
    cfg.pop("runtimes")
print(json.dumps(cfg, indent=2, sort_keys=True))
PY
)
changed=""
if [ "$want" != "$(cat "$DAEMON_JSON" 2>/dev/null || echo '{}')" ]; then
    mkdir -p /etc/docker
    printf '%s\n' "$want" > "$DAEMON_JSON"
    changed=1
    log "wrote $DAEMON_JSON"
fi

ours_running() { [ -f "$PIDFILE" ] && [ "$(cat "/proc/$(cat "$PIDFILE")/comm" 2>/dev/null)" = "dockerd" ]; }

if answers && [ -n "$changed" ]; then
    if ours_running; then
        log "daemon.json changed: restarting our dockerd"
        bash "$(dirname "$0")/stop-docker.sh"
    else
        log "daemon.json changed, but dockerd was not started by us: reload it to pick up runtimes" >&2
        kill -HUP "$(pidof dockerd)" 2>/dev/null || true
    fi
fi

# 3. Start dockerd when the socket does not answer.
if answers; then
    log "dockerd already answering on $SOCK"
    exit 0
fi
rm -f "$SOCK"
# With ip_forward already on, dockerd leaves the FORWARD policy at ACCEPT (it sets DROP
# when it has to turn forwarding on itself), so the native provider's routing keeps working.
sysctl -qw net.ipv4.ip_forward=1
log "starting dockerd (log $LOG)"
# setsid: dockerd must outlive the shell (and test session) that started it.
setsid dockerd --pidfile "$PIDFILE.dockerd" -H "unix://$SOCK" >>"$LOG" 2>&1 </dev/null &
echo $! > "$PIDFILE"
i=0
while ! answers; do
    i=$((i + 1))
    if ! kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then
        echo "setup-docker: dockerd exited; last log lines:" >&2
        tail -n 30 "$LOG" >&2
        exit 1
    fi
    if [ "$i" -ge 300 ]; then
        echo "setup-docker: dockerd gave no answer on $SOCK after 30 s; see $LOG" >&2
        exit 1
    fi
    sleep 0.1
done
docker info --format '{{.ServerVersion}} runtimes: {{range $k, $v := .Runtimes}}{{$k}} {{end}}' 2>/dev/null \
    | sed 's/^/setup-docker: dockerd /' || true
log "started (pid $(cat "$PIDFILE"))"
