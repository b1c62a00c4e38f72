"""One QEMU `microvm` process per sandbox: its command line, files, cgroup and QMP.

A VM's files live in one directory (disk overlay, agent and QMP sockets, serial
console log, QEMU's own log). The command line is the same for a cold boot, a
snapshot save and every restore from that snapshot, except for the disk file and
`-incoming`: QEMU restores only onto an identical machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qemu.qmp import QMPClient

from stacyvm_server.errors import ProviderError
from stacyvm_server.providers.microvm.assets import Assets
from stacyvm_server.util.proc import kill_until_gone

# We wrap and report QMP failures ourselves; its logger would print every retry
# of a connect to a socket QEMU has not made yet.
logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)

CGROUP_ROOT = Path("/sys/fs/cgroup")
CGROUP_PARENT = "stacyvm-microvm"
QEMU_OVERHEAD_MB = 192  # QEMU's own memory (TCG translation cache, device state) above guest RAM


@dataclass(frozen=True)
class Shape:
    """What a snapshot is made for: restores must match it exactly."""

    disk: str  # the base disk's name: image digest and free space
    mem_mb: int
    vcpus: int
    network: bool
    accel: str
    assets_id: str
    kernel_args: str

    @property
    def key(self) -> str:
        raw = "|".join(str(v) for v in (self.disk, self.mem_mb, self.vcpus, self.network, self.accel,
                                         self.assets_id, self.kernel_args))
        return hashlib.sha256(raw.encode()).hexdigest()[:20]


@dataclass(frozen=True)
class VMFiles:
    dir: Path

    @property
    def disk(self) -> Path:
        return self.dir / "disk.qcow2"

    @property
    def agent(self) -> Path:
        return self.dir / "agent.sock"

    @property
    def qmp(self) -> Path:
        return self.dir / "qmp.sock"

    @property
    def console(self) -> Path:
        return self.dir / "console.log"

    @property
    def qemu_log(self) -> Path:
        return self.dir / "qemu.log"


def qemu_argv(qemu: str, assets: Assets, shape: Shape, files: VMFiles, incoming: Path | None = None) -> list[str]:
    accel = ["-accel", "kvm", "-cpu", "host"] if shape.accel == "kvm" else ["-accel", "tcg", "-cpu", "max"]
    argv = [
        qemu, "-M", "microvm", *accel, "-m", str(shape.mem_mb), "-smp", str(shape.vcpus),
        "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
        "-kernel", str(assets.kernel), "-initrd", str(assets.initrd), "-append", shape.kernel_args,
        "-serial", f"file:{files.console}",
        "-drive", f"id=root,file={files.disk},format=qcow2,if=none,discard=unmap",
        "-device", "virtio-blk-device,drive=root",
        "-device", "virtio-serial-device",
        "-chardev", f"socket,id=agent,path={files.agent},server=on,wait=off",
        "-device", "virtserialport,chardev=agent,name=stacyvm.agent",
        "-qmp", f"unix:{files.qmp},server=on,wait=off",
    ]
    if shape.network:
        # User-mode networking: QEMU itself makes the guest's connections, from the
        # network namespace it runs in (the provider puts it in the sandbox's own).
        argv += ["-netdev", "user,id=net0", "-device", "virtio-net-device,netdev=net0"]
    if incoming is not None:
        argv += ["-incoming", f"exec:cat {incoming}"]
    return argv


# host cgroups (v1 here; one directory per controller) ------------------------------------
_CONTROLLERS = ("memory", "cpu", "cpuacct", "pids")


def _cg_dirs(sandbox_id: str) -> dict[str, Path]:
    return {c: CGROUP_ROOT / c / CGROUP_PARENT / sandbox_id for c in _CONTROLLERS}


def cgroup_create(sandbox_id: str, mem_mb: int, vcpus: int) -> list[Path]:
    """Blocking. Limit the QEMU process: guest RAM plus QEMU's overhead, and its vCPUs
    (plus half a CPU for QEMU's I/O threads)."""
    dirs = _cg_dirs(sandbox_id)
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    (dirs["memory"] / "memory.limit_in_bytes").write_text(str((mem_mb + QEMU_OVERHEAD_MB) << 20))
    (dirs["cpu"] / "cpu.cfs_period_us").write_text("100000")
    (dirs["cpu"] / "cpu.cfs_quota_us").write_text(str(vcpus * 100000 + 50000))
    (dirs["pids"] / "pids.max").write_text("256")
    return [d / "cgroup.procs" for d in dirs.values()]


def cgroup_pids(sandbox_id: str) -> list[int]:
    try:
        return [int(x) for x in (_cg_dirs(sandbox_id)["pids"] / "cgroup.procs").read_text().split()]
    except OSError:
        return []


def cgroup_remove(sandbox_id: str) -> None:
    """Blocking, idempotent: kill what is left in the cgroup, then remove it."""
    kill_until_gone(lambda: cgroup_pids(sandbox_id), timeout=5)
    for d in _cg_dirs(sandbox_id).values():
        with contextlib.suppress(FileNotFoundError):
            d.rmdir()


def cgroup_remove_parent() -> None:
    """Blocking. Drop the shared parent cgroups when no VM is left in them (EBUSY otherwise)."""
    for c in _CONTROLLERS:
        with contextlib.suppress(OSError):
            (CGROUP_ROOT / c / CGROUP_PARENT).rmdir()


def cgroup_leftovers(sandbox_id: str) -> list[str]:
    return [str(d) for d in _cg_dirs(sandbox_id).values() if d.exists()]


def cgroup_oom_kills(sandbox_id: str) -> int:
    with contextlib.suppress(OSError):
        for line in (_cg_dirs(sandbox_id)["memory"] / "memory.oom_control").read_text().splitlines():
            if line.startswith("oom_kill "):
                return int(line.split()[1])
    return 0


# the process -----------------------------------------------------------------------------
def spawn(argv: list[str], files: VMFiles, cgroup_procs: list[Path], netns: str | None) -> int:
    """Blocking. Start QEMU in its own session (it outlives a server restart), inside
    its cgroup from the first instruction, and inside `netns` when given."""

    def join_cgroup() -> None:  # runs in the child between fork and exec
        for procs in cgroup_procs:
            with open(procs, "w") as f:
                f.write("0")

    if netns:
        argv = ["nsenter", f"--net={netns}", "--", *argv]
    with open(files.qemu_log, "ab") as log:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, preexec_fn=join_cgroup, close_fds=True)
    # Reap it when it exits; after a server restart init does that instead.
    threading.Thread(target=proc.wait, name=f"qemu-{proc.pid}", daemon=True).start()
    return proc.pid


def alive(pid: int, files: VMFiles) -> bool:
    """Is `pid` still this VM's QEMU (not a zombie, not a reused pid)?"""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
    except (OSError, IndexError):
        return False
    return state not in (b"Z", b"X") and str(files.agent).encode() in cmdline


def kill(pid: int, files: VMFiles) -> None:
    """Blocking. SIGKILL the VM and wait until it is gone."""
    kill_until_gone(lambda: [pid] if alive(pid, files) else [], timeout=10)


def qemu_error(files: VMFiles) -> str:
    try:
        text = files.qemu_log.read_text(errors="replace").strip()
    except OSError:
        return ""
    return text[-500:]


# QMP ---------------------------------------------------------------------------------------
async def qmp(files: VMFiles, *commands: tuple[str, dict[str, Any] | None], timeout: float = 60) -> list[Any]:
    """Run QMP commands in order on a fresh connection; their results."""
    client = QMPClient(f"stacyvm-{files.dir.name}")
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        try:
            await client.connect(str(files.qmp))
            break
        except Exception as exc:  # qemu.qmp wraps socket errors in ConnectError
            if asyncio.get_running_loop().time() > deadline:
                raise ProviderError(f"QMP socket {files.qmp} unreachable: {exc}; {qemu_error(files)}") from None
            await asyncio.sleep(0.02)
    try:
        return [await asyncio.wait_for(client.execute(cmd, args), timeout) for cmd, args in commands]
    finally:
        with contextlib.suppress(Exception):
            await client.disconnect()


async def status(files: VMFiles) -> str:
    """QEMU's run state ("running", "inmigrate", "paused", ...), for error messages."""
    try:
        (st,) = await qmp(files, ("query-status", None), timeout=5)
        return str(st["status"])
    except Exception as exc:  # a dead or wedged QEMU: say so instead
        return f"unknown ({exc})"


async def save(files: VMFiles, state_file: Path, timeout: float) -> None:
    """Write the running VM's RAM and device state to `state_file` (a live migration:
    the idle guest converges at once). Saved running, a restore resumes by itself
    once `-incoming` has loaded it: no QMP round trips on the create path."""
    await qmp(files, ("migrate", {"uri": f"exec:cat > {state_file}"}))
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        (info,) = await qmp(files, ("query-migrate", None))
        status = info.get("status")
        if status == "completed":
            return
        if status in ("failed", "cancelled") or loop.time() > deadline:
            raise ProviderError(f"saving the microVM snapshot failed: {info}")
        await asyncio.sleep(0.05)
