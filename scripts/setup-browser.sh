#!/bin/bash
# The browser test's tools, as root: Debian's chromium (apt only) and Playwright for
# Python in .venv, which drives that chromium through executable_path. We never run
# `playwright install`: its own browser downloads are not used.
set -euo pipefail
cd "$(dirname "$0")/.."

export DEBIAN_FRONTEND=noninteractive
if ! dpkg-query -W -f='${Status}' chromium 2>/dev/null | grep -q "ok installed"; then
    apt-get update -q
    apt-get install -y -q --no-install-recommends chromium fonts-dejavu-core
fi
if ! .venv/bin/python -c 'import playwright' 2>/dev/null; then
    .venv/bin/pip install -q playwright
fi
echo "setup-browser.sh: $(/usr/bin/chromium --version 2>/dev/null || echo 'chromium missing')"
