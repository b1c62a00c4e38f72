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
started_docker=""
cleanup() {
    [ -n "$started_registry" ] && bash scripts/stop-registry.sh || true
    [ -n "$started_docker" ] && bash scripts/stop-docker.sh || true
}
trap cleanup EXIT
# dockerd for the docker provider tests; stopped again at exit if this run started it.
docker_out=$(bash scripts/setup-docker.sh 2>&1) || echo "test.sh: setup-docker.sh failed; the docker tests will say why they skip"
echo "$docker_out"
if grep -q '^setup-docker: started' <<<"$docker_out"; then started_docker=1; fi
bash scripts/build-test-images.sh
bash scripts/setup-microvm.sh

echo "== ruff"; .venv/bin/ruff check src tests bench
echo "== mypy"; .venv/bin/mypy
echo "== pytest"; .venv/bin/pytest "$@"
