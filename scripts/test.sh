#!/bin/bash
# One command, as root on a fresh Debian 12: install everything the tests need, start
# the local image registry, build the test images (cached), then lint, type-check and
# run the whole test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh --test
bash scripts/setup-browser.sh

started_registry=""
if ! curl -fsS -m 2 -o /dev/null http://127.0.0.1:5000/v2/ 2>/dev/null; then
    started_registry=1
fi
bash scripts/start-registry.sh
cleanup() { [ -n "$started_registry" ] && bash scripts/stop-registry.sh || true; }
trap cleanup EXIT
bash scripts/build-test-images.sh

echo "== ruff"; .venv/bin/ruff check src tests bench
echo "== mypy"; .venv/bin/mypy
echo "== pytest"; .venv/bin/pytest "$@"
