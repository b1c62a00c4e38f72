#!/bin/bash
# Prepare a Debian 12 host for the native provider (run as root; idempotent).
#  1. install the runtimes and helpers the provider uses,
#  2. apply the per-boot host fixes: the hugetlb cgroup v1 mount crun needs on
#     hybrid hosts, net.ipv4.ip_forward=1 (bridge egress), and our nft table.
# Step 2 is the same code as `stacyvm doctor --fix` (providers/native/host.py)
# when the package is importable; otherwise the shell equivalent below runs.
set -euo pipefail
cd "$(dirname "$0")/.."

[ "$(id -u)" = 0 ] || { echo "setup-host: run as root" >&2; exit 1; }

. scripts/lib-apt.sh
need_pkgs crun runc runsc tini nftables iproute2 busybox-static uidmap

PY=""
for cand in .venv/bin/python python3; do
    if command -v "$cand" >/dev/null && "$cand" -c "import stacyvm_server.providers.native.host" 2>/dev/null; then
        PY=$cand; break
    fi
done

if [ -n "$PY" ]; then
    "$PY" - <<'PYEOF'
import asyncio, sys
from stacyvm_server.config import load_settings
from stacyvm_server.providers.native.host import fix_host
problems = [p for p in asyncio.run(fix_host(load_settings())) if not p.ok]
for p in problems:
    print(f"setup-host: still failing: {p.name}: {p.detail} -> {p.fix_description}", file=sys.stderr)
sys.exit(1 if problems else 0)
PYEOF
    echo "setup-host: native provider host checks pass"
    exit 0
fi

# Without the Python package: the same fixes in shell.
if [ -s /sys/fs/cgroup/unified/cgroup.controllers ] && ! [ -e /sys/fs/cgroup/hugetlb/cgroup.procs ]; then
    mkdir -p /sys/fs/cgroup/hugetlb
    mount -t cgroup -o hugetlb cgroup /sys/fs/cgroup/hugetlb
fi
sysctl -qw net.ipv4.ip_forward=1
echo "setup-host: host fixed (the nft table is created when the server starts)"
