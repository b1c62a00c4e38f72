"""What the numbers were measured on."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Machine:
    cpu_model: str
    nproc: int
    memory_gib: float
    kernel: str
    os: str
    crun: str
    runsc: str
    python: str
    load_avg: str
    git_commit: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _first(cmd: list[str]) -> str:
    if shutil.which(cmd[0]) is None:
        return "not installed"
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.splitlines()[0].strip() if out else "unknown"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    return 0.0


def _os_name() -> str:
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip('"')
    except OSError:
        pass
    return platform.system()


def _git_commit(repo: Path) -> str:
    head = _first(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"])
    dirty = subprocess.run(
        ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
        capture_output=True, text=True, timeout=10, check=False,
    ).stdout.strip()
    return f"{head}{' (uncommitted changes)' if dirty else ''}"


def describe(repo: Path) -> Machine:
    return Machine(
        cpu_model=_cpu_model(),
        nproc=os.cpu_count() or 0,
        memory_gib=_memory_gib(),
        kernel=platform.release(),
        os=_os_name(),
        crun=_first(["crun", "--version"]),
        runsc=_first(["runsc", "--version"]),
        python=platform.python_version(),
        load_avg=" ".join(f"{x:.2f}" for x in os.getloadavg()),
        git_commit=_git_commit(repo),
    )
