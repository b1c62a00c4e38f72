#!/bin/bash
# Install everything StacyVM needs on a Debian 12 host, as root: system packages and
# host fixes (scripts/setup-host.sh), then a virtualenv in .venv with the server.
# Usage: scripts/install.sh [--test]   (--test adds the test/lint tools)
set -euo pipefail
cd "$(dirname "$0")/.."

[ "$(id -u)" = 0 ] || { echo "install.sh: run as root (sandboxes need cgroups, mounts and namespaces)" >&2; exit 1; }

. scripts/lib-apt.sh

# Python 3.11 with venv (Debian 12's python3 is 3.11); a python3 already on PATH is used as is.
PYTHON="${PYTHON:-python3}"
if ! command -v "$PYTHON" >/dev/null || ! "$PYTHON" -c 'import venv, ensurepip' 2>/dev/null; then
    need_pkgs python3 python3-venv python3-pip
    PYTHON=python3
fi
need_pkgs curl ca-certificates git

bash scripts/setup-host.sh

if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
extra=""
[ "${1:-}" = "--test" ] && extra="[test]"
.venv/bin/pip install -q --upgrade pip >/dev/null
.venv/bin/pip install -q -e ".$extra"
echo "install.sh: done ($(.venv/bin/stacyvm version))"
