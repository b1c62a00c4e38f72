"""The microVM cache: image disks and per-shape snapshots, trimmed to a size budget.

Both are made on first use and reused by every later create of the same image or
shape. What a sandbox that still exists uses, or a create in progress holds, is
never removed: a sandbox's disk overlay reads from its snapshot's disk, which
reads from the image disk. Beyond that, the least recently used go first until
the cache fits `microvm.cache_max_mb` (every create touches what it uses).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

from stacyvm_server.providers.microvm.disk import tree_size

# Image disks are named <digest prefix>-<free MiB>m.ext4 (provider._disk_path); the KVM
# probe's small empty disk is not an image disk and stays.
DISK_NAME = re.compile(r"^[0-9a-f]{32}-\d+m\.ext4$")
TRASH = "trash"  # under the state dir: discarded entries wait here for deletion


@dataclass(frozen=True)
class Entry:
    path: Path
    name: str  # the disk's file name, or the snapshot's shape key
    size: int  # bytes allocated on the host's disk (files are sparse)
    used: float  # last use: mtime, touched by every create that uses it
    disk: str | None = None  # a snapshot: the image disk its own disk reads from


def allocated(path: Path) -> int:
    return path.stat().st_blocks * 512 if path.is_file() else tree_size(path)


def scan(root: Path) -> list[Entry]:
    """Every finished image disk and snapshot under the provider's state dir."""
    out = []
    disks = root / "disks"
    for f in sorted(disks.iterdir()) if disks.is_dir() else []:
        if DISK_NAME.match(f.name):
            out.append(Entry(f, f.name, allocated(f), f.stat().st_mtime))
    snaps = root / "snapshots"
    for d in sorted(snaps.iterdir()) if snaps.is_dir() else []:
        if not (d / "mem.state").exists():
            continue  # being built (or a crash's leftover, removed at start)
        try:
            disk = str(json.loads((d / "meta.json").read_text())["shape"]["disk"])
        except (OSError, ValueError, KeyError, TypeError):
            disk = None
        out.append(Entry(d, d.name, allocated(d), d.stat().st_mtime, disk))
    return out


def victims(entries: list[Entry], keep: set[str], budget: int) -> list[Entry]:
    """What to remove, least recently used first, until the rest fits `budget` bytes.

    An image disk can go only once no remaining snapshot reads from it; after each
    removal the oldest candidate is looked for again, so a disk freed that way goes
    before anything used more recently.
    """
    total = sum(e.size for e in entries)
    gone: list[Entry] = []
    by_age = sorted(entries, key=lambda e: e.used)
    while total > budget:
        for e in by_age:
            if e in gone or e.name in keep:
                continue
            if e.disk is None and any(s.disk == e.name for s in entries if s not in gone):
                continue
            gone.append(e)
            total -= e.size
            break
        else:
            break  # what is left is in use
    return gone


def discard(entry: Entry, trash: Path) -> Path:
    """Move an entry into `trash` (a rename: instant, so it can run on the event loop)."""
    trash.mkdir(exist_ok=True)
    dest = trash / f"{entry.name}.{uuid.uuid4().hex[:8]}"
    os.rename(entry.path, dest)
    return dest


def purge(paths: list[Path]) -> None:
    for p in paths:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


def remove_partial(root: Path) -> list[Path]:
    """What a run that died left: half-built snapshots and disks, and discarded entries
    not yet deleted (call only when nothing builds)."""
    found = [*(root / "snapshots").glob("*.building"), *(root / "disks").glob(".*.tmp"),
             *((root / TRASH).iterdir() if (root / TRASH).is_dir() else [])]
    purge(found)
    return found
