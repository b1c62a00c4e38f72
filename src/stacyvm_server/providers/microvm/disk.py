"""Root disks: one ext4 file per image, one copy-on-write qcow2 overlay per VM.

`mkfs.ext4 -d` turns the unpacked image tree into a filesystem without mounting
anything. The file is sparse, so free space costs nothing until written, and no
journal: a VM's disk never outlives the VM. Every VM (and every snapshot) then
gets a qcow2 overlay backed by it, so creating a sandbox copies nothing.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from stacyvm_server.errors import ProviderError

IMAGE_FREE_MB = 1024  # room for the sandbox's own files above the image's content


def tree_size(root: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        for n in files:
            try:
                total += os.lstat(os.path.join(dirpath, n)).st_blocks * 512
            except OSError:
                pass
    return total


def make_image_disk(rootfs: Path, out: Path, free_mb: int = IMAGE_FREE_MB) -> None:
    """Blocking. Write `out` atomically (concurrent builders race harmlessly)."""
    size_mb = tree_size(rootfs) // (1 << 20) * 5 // 4 + 64 + free_mb
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    cmd = ["mkfs.ext4", "-q", "-F", "-O", "^has_journal", "-L", "stacyvm-root", "-d", str(rootfs), str(tmp),
           f"{size_mb}M"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise ProviderError(f"mkfs.ext4 failed for {rootfs}: {r.stderr.strip()[-300:]}")
    os.replace(tmp, out)


def make_overlay(backing: Path, out: Path, backing_format: str) -> None:
    """Blocking. A qcow2 file whose unwritten blocks read from `backing`."""
    cmd = ["qemu-img", "create", "-q", "-f", "qcow2", "-F", backing_format, "-b", str(backing), str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        raise ProviderError(f"qemu-img create failed: {r.stderr.strip()[-300:]}")
