"""Host prerequisites of the native provider: check them, and fix what we can.

`check_host` is synchronous and forks nothing (safe in `health()` and doctor).
`fix_host` is async (it loads our nft table through the subprocess helper);
`stacyvm doctor --fix` calls `asyncio.run(fix_host(settings))`. The same fixes
are applied by scripts/setup-host.sh.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from stacyvm_server.config import Settings
from stacyvm_server.providers.native import bundle, nft, syscalls

CGROUP = Path("/sys/fs/cgroup")
HUGETLB = CGROUP / "hugetlb"
UNIFIED_CONTROLLERS = CGROUP / "unified" / "cgroup.controllers"
IP_FORWARD = Path("/proc/sys/net/ipv4/ip_forward")
NEEDED_CONTROLLERS = ("memory", "pids", "cpu", "cpuacct", "freezer", "devices")
PACKAGES = "crun runc runsc tini nftables iproute2 busybox-static uidmap"


@dataclass(frozen=True)
class Problem:
    name: str
    ok: bool
    detail: str
    fix_description: str = ""


def runtime_path(settings: Settings) -> str | None:
    n = settings.native
    return n.runtime_path or shutil.which(n.runtime) or shutil.which(n.runtime, path="/usr/sbin:/usr/bin:/sbin:/bin")


def _hybrid_hugetlb() -> bool:
    """crun refuses hybrid mode while a v1-capable controller sits in cgroup2."""
    try:
        return bool(UNIFIED_CONTROLLERS.read_text().split())
    except OSError:
        return False


def check_host(settings: Settings) -> list[Problem]:
    out: list[Problem] = []
    apt = f"apt-get install -y --no-install-recommends {PACKAGES} (or scripts/setup-host.sh)"
    rt = runtime_path(settings)
    out.append(Problem(f"runtime:{settings.native.runtime}", bool(rt and os.access(rt, os.X_OK)),
                       rt or "not found", apt))
    for name, path in (("tini-static", bundle.HOST_TINI), ("busybox-static", bundle.HOST_BUSYBOX)):
        out.append(Problem(name, os.access(path, os.X_OK), path, apt))
    nft_bin = shutil.which("nft") or shutil.which("nft", path="/usr/sbin:/sbin")
    out.append(Problem("nftables", nft_bin is not None, nft_bin or "nft not found", apt))
    out.append(Problem("root", os.geteuid() == 0, f"euid {os.geteuid()}", "run the server as root"))
    try:
        has_overlay = "overlay" in Path("/proc/filesystems").read_text()
    except OSError:
        has_overlay = False
    out.append(Problem("overlayfs", has_overlay, "overlay in /proc/filesystems", "a kernel with overlayfs"))
    try:
        userns = int(Path("/proc/sys/user/max_user_namespaces").read_text())
    except (OSError, ValueError):
        userns = 0
    out.append(Problem("user-namespaces", userns > 0, f"max_user_namespaces={userns}",
                       "sysctl -w user.max_user_namespaces=15000"))
    missing = [c for c in NEEDED_CONTROLLERS if not (CGROUP / c / "cgroup.procs").exists()]
    out.append(Problem("cgroup-v1", not missing, "missing: " + ", ".join(missing) if missing else "ok",
                       "mount the cgroup v1 hierarchies (memory, pids, cpu, cpuacct, freezer, devices)"))
    if settings.native.runtime == "crun":
        bad = _hybrid_hugetlb()
        out.append(Problem("cgroup-hybrid", not bad,
                           "cgroup2 holds controllers: " + UNIFIED_CONTROLLERS.read_text().strip() if bad else "ok",
                           "mkdir -p /sys/fs/cgroup/hugetlb && mount -t cgroup -o hugetlb cgroup "
                           "/sys/fs/cgroup/hugetlb (once per boot; stacyvm doctor --fix)"))
    try:
        fwd = IP_FORWARD.read_text().strip() == "1"
    except OSError:
        fwd = False
    out.append(Problem("ip-forward", fwd, f"net.ipv4.ip_forward={'1' if fwd else '0'}",
                       "sysctl -w net.ipv4.ip_forward=1 (bridge network egress)"))
    try:
        os.close(syscalls.openat2(-100, "/", os.O_PATH, 0, syscalls.RESOLVE_IN_ROOT))
        ok2 = True
    except OSError:
        ok2 = False
    out.append(Problem("openat2", ok2, "kernel >= 5.6 needed for safe file access", "upgrade the kernel"))
    if settings.native.runtime != "runsc":
        shut = untraversable(settings.native_dir)
        out.append(Problem("data-dir-traversable", not shut,
                           f"{shut} (mode {shut.stat().st_mode & 0o777:04o}) blocks the sandboxes' mapped root "
                           f"(uid {bundle.UID_SHIFT}) on the way to {settings.native_dir}" if shut else "ok",
                           f"chmod o+x {shut}, or set server.data_dir under a directory others may traverse"
                           if shut else ""))
    return out


def untraversable(path: Path) -> Path | None:
    """The first existing directory on the way to `path` that others may not search (no o+x).

    Sandboxes run in a user namespace whose root is uid 100000 on the host: to "others"
    of every host directory. The runtime opens the bundle's rootfs as that uid, so a
    0700 parent (mkdtemp, /root) would make every create fail with EACCES.
    """
    for d in [*reversed(path.absolute().parents), path.absolute()]:
        try:
            mode = d.stat().st_mode
        except FileNotFoundError:
            return None  # created later with mode 0755/0711 by the provider
        if not mode & 0o001:
            return d
    return None


async def fix_host(settings: Settings) -> list[Problem]:
    """Apply the fixes that need no package installation; return the new check."""
    await asyncio.to_thread(_fix_kernel, settings)
    if shutil.which("nft") or shutil.which("nft", path="/usr/sbin:/sbin"):
        await nft.ensure_table(settings.native.bridge_subnet, settings.native.allow_inter_sandbox)
    return check_host(settings)


def _fix_kernel(settings: Settings) -> None:
    if settings.native.runtime == "crun" and _hybrid_hugetlb():
        HUGETLB.mkdir(exist_ok=True)
        if not (HUGETLB / "cgroup.procs").exists():
            syscalls.mount("cgroup", str(HUGETLB), "cgroup", 0, "hugetlb")
    if IP_FORWARD.read_text().strip() != "1":
        IP_FORWARD.write_text("1\n")
    settings.native_dir.mkdir(parents=True, exist_ok=True)
