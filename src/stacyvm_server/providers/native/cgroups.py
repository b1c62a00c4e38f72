"""cgroup v1 reads for a sandbox: stats, OOM counter, freezer, cleanup.

The runtime creates and limits the cgroups (cgroupsPath in the bundle); we only
read them, freeze them to kill an exec's process tree atomically, and remove
leftovers after a crash.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
PARENT = "stacyvm"


def cgroups_path(sandbox_id: str) -> str:
    return f"/{PARENT}/{sandbox_id}"


def _dir(controller: str, sandbox_id: str) -> Path:
    return CGROUP_ROOT / controller / PARENT / sandbox_id


def _read(controller: str, sandbox_id: str, name: str) -> str | None:
    try:
        return (_dir(controller, sandbox_id) / name).read_text()
    except OSError:
        return None


def _int(controller: str, sandbox_id: str, name: str) -> int:
    raw = _read(controller, sandbox_id, name)
    try:
        return int(raw.strip()) if raw else 0
    except ValueError:
        return 0


def oom_kills(sandbox_id: str) -> int:
    """The kernel's `oom_kill N` counter for the sandbox's memory cgroup."""
    raw = _read("memory", sandbox_id, "memory.oom_control") or ""
    for line in raw.splitlines():
        key, _, value = line.partition(" ")
        if key == "oom_kill":
            return int(value)
    return 0


def cpu_seconds(sandbox_id: str) -> float:
    return _int("cpuacct", sandbox_id, "cpuacct.usage") / 1e9


def memory_usage(sandbox_id: str) -> int:
    return _int("memory", sandbox_id, "memory.usage_in_bytes")


def memory_limit(sandbox_id: str) -> int:
    return _int("memory", sandbox_id, "memory.limit_in_bytes")


def pids_current(sandbox_id: str) -> int:
    return _int("pids", sandbox_id, "pids.current")


def pids(sandbox_id: str) -> list[int]:
    raw = _read("pids", sandbox_id, "cgroup.procs") or ""
    return [int(x) for x in raw.split()]


def exists(sandbox_id: str) -> bool:
    return _dir("memory", sandbox_id).is_dir()


def set_frozen(sandbox_id: str, frozen: bool, timeout: float = 2.0) -> bool:
    """Freeze (or thaw) the whole sandbox; True once the kernel reports the state."""
    path = _dir("freezer", sandbox_id) / "freezer.state"
    want = "FROZEN" if frozen else "THAWED"
    try:
        path.write_text(want)
    except OSError:
        return False
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            if path.read_text().strip() == want:
                return True
        time.sleep(0.001)
    return False


def remove(sandbox_id: str) -> None:
    """Remove the sandbox's cgroup (and any children) in every hierarchy. Idempotent."""
    for controller in _hierarchies():
        base = _dir(controller, sandbox_id)
        if not base.is_dir():
            continue
        # Children first; cgroupfs dirs only contain control files, rmdir removes them.
        for dirpath, _dirs, _files in sorted(os.walk(base), key=lambda t: -len(t[0])):
            with contextlib.suppress(OSError):
                os.rmdir(dirpath)


def remove_parent() -> None:
    """Drop the shared parent cgroups if no sandbox is left (EBUSY otherwise).

    Only when no create can run concurrently (provider shutdown): a create that made
    the parent a moment earlier would otherwise lose it under its feet.
    """
    for hierarchy in _hierarchies():
        with contextlib.suppress(OSError):
            os.rmdir(CGROUP_ROOT / hierarchy / PARENT)


def leftovers(sandbox_id: str) -> list[str]:
    return [str(_dir(c, sandbox_id)) for c in _hierarchies() if _dir(c, sandbox_id).is_dir()]


def _hierarchies() -> list[str]:
    """Where a sandbox's cgroup can exist: every v1 controller, and the cgroup2 mount of the
    hybrid layout, where crun makes one too (the runtime's delete removes it; after a lost
    runtime state only we can)."""
    return [*_controllers(), "unified"]


def _controllers() -> list[str]:
    try:
        return [p.name for p in CGROUP_ROOT.iterdir() if p.name != "unified" and not p.is_symlink()]
    except OSError:
        return []
