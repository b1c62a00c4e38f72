"""Host memory accounting for the density milestone (cgroup v1 and /proc)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

MEMORY_CGROUPS = Path("/sys/fs/cgroup/memory/stacyvm")
# Where a sandbox's memory cgroup is: a parent directory holding one per sandbox id
# (native, microvm), or a function of the sandbox id (docker: the container id's).
CgroupLocator = Path | Callable[[str], Path | None]


def _cgroup_dir(cgroups: CgroupLocator, sid: str) -> Path | None:
    return cgroups / sid if isinstance(cgroups, Path) else cgroups(sid)


@dataclass(frozen=True)
class Snapshot:
    sandboxes: int  # of ours whose memory cgroup was found
    cgroup_usage: int  # sum of memory.usage_in_bytes (rss + page cache + kernel memory charged)
    cgroup_rss: int  # sum of memory.stat total_rss (anonymous memory)
    cgroup_cache: int  # sum of memory.stat total_cache (page cache charged to the sandbox)
    procs: int  # processes inside those cgroups
    procs_rss: int  # sum of VmRSS of those processes (shared pages counted once per process)
    procs_pss: int  # sum of Pss (shared pages divided among their users)
    server_rss: int  # the server process and its children (0 when unknown)
    host_used: int  # MemTotal - MemAvailable
    host_slab_unreclaimable: int  # kernel objects (netns, mounts, cgroups) are mostly charged here

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _read_int(path: Path) -> int:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return 0


def _stat(path: Path) -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        for line in path.read_text().splitlines():
            k, _, v = line.partition(" ")
            out[k] = int(v)
    except (OSError, ValueError):
        pass
    return out


def _status_kb(pid: int, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _pss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            raw = (task / "children").read_text()
            out.extend(int(x) for x in raw.split())
    except (OSError, ValueError):
        pass
    return out


def tree_rss(pid: int | None) -> int:
    if not pid:
        return 0
    total, todo, seen = 0, [pid], set()
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        total += _status_kb(p, "VmRSS")
        todo.extend(_children(p))
    return total


def meminfo() -> dict[str, int]:
    info: dict[str, int] = {}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            k, _, rest = line.partition(":")
            info[k] = int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return info


def snapshot(sandbox_ids: Iterable[str], server_pid: int | None, cgroups: CgroupLocator = MEMORY_CGROUPS) -> Snapshot:
    """Only the cgroups of the given sandboxes: other sandboxes on the host are not ours to count.

    `cgroups`: the provider's memory cgroup parent (microvm: stacyvm-microvm, one QEMU per cgroup).
    """
    found = usage = rss = cache = procs = procs_rss = procs_pss = 0
    for sid in sandbox_ids:
        d = _cgroup_dir(cgroups, sid)
        if d is None or not d.is_dir():
            continue
        found += 1
        usage += _read_int(d / "memory.usage_in_bytes")
        st = _stat(d / "memory.stat")
        rss += st.get("total_rss", 0)
        cache += st.get("total_cache", 0)
        try:
            pids = [int(x) for x in (d / "cgroup.procs").read_text().split()]
        except (OSError, ValueError):
            pids = []
        procs += len(pids)
        procs_rss += sum(_status_kb(p, "VmRSS") for p in pids)
        procs_pss += sum(_pss(p) for p in pids)
    info = meminfo()
    return Snapshot(found, usage, rss, cache, procs, procs_rss, procs_pss, tree_rss(server_pid),
                    info.get("MemTotal", 0) - info.get("MemAvailable", 0), info.get("SUnreclaim", 0))


def leftover_cgroups(sandbox_ids: Iterable[str], cgroups: CgroupLocator = MEMORY_CGROUPS) -> list[str]:
    return [sid for sid in sandbox_ids if (d := _cgroup_dir(cgroups, sid)) is not None and d.is_dir()]
