#!/bin/bash
# Prepare this host for the microvm provider (root, idempotent): QEMU and the disk
# tools, then the guest kernel and initramfs, built from Debian packages into
# $STACYVM_CACHE/microvm-assets (reused while the agent and packages are unchanged).
# Point microvm.assets_dir there, or let the server build its own at start.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib-apt.sh
need_pkgs qemu-system-x86 qemu-utils e2fsprogs
DEST="${STACYVM_CACHE:-/var/cache/stacyvm}/microvm-assets"
.venv/bin/stacyvm microvm build-assets --dest "$DEST"
