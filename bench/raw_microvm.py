"""Raw baseline for the microvm provider: QEMU driven directly, no server, no HTTP.

Same building blocks as the provider (so both sides run the identical machine):
`vm.qemu_argv` with the same guest assets, kernel arguments (including
`tsc_early_khz` under TCG), guest RAM, vCPUs and accelerator; `disk.make_overlay`
on the same ext4 image disk the server built; `vm.save` for the snapshot; and
`channel.AgentConnection` for the agent protocol (the agent is part of the guest,
so the raw side speaks its protocol too). What it leaves out, and the provider
does: the host cgroup, the store and events, the `init` request (hostname, clock,
entropy, limits; the raw side sends `ping`), and HTTP.

The class is synchronous like `RawCrun` (the runner calls it between awaits): its
coroutines run on a private event loop in a thread of its own.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from bench.raw import RawError, UpTiming
from stacyvm_server.config import MicroVMConfig
from stacyvm_server.providers.microvm import assets as assets_mod
from stacyvm_server.providers.microvm import disk, vm
from stacyvm_server.providers.microvm.channel import AgentConnection
from stacyvm_server.providers.microvm.provider import guest_mem_mb, host_tsc_khz

T = TypeVar("T")
TIMEOUT = 180.0


def _ms(t0: float) -> float:
    return (time.perf_counter() - t0) * 1000.0


@dataclass
class _VM:
    pid: int
    files: vm.VMFiles
    conn: AgentConnection | None = None


@dataclass(frozen=True)
class ColdBoot:
    boot_ms: float  # overlay + spawn -> first agent reply (ping)
    save_ms: float  # QMP stop + migrate to a file (0 when not saved)


class RawMicroVM:
    def __init__(self, work: Path, assets_dir: Path, accel: str, memory_mb: int = 256, vcpus: int = 1) -> None:
        cfg = MicroVMConfig()
        self.qemu = shutil.which(cfg.qemu_path) or cfg.qemu_path
        loaded = assets_mod.load(assets_dir)
        if loaded is None:
            raise RawError(f"no usable guest assets in {assets_dir} (scripts/setup-microvm.sh)")
        self.assets = loaded
        self.accel = accel
        self.kernel_args = cfg.kernel_args
        if accel == "tcg" and (khz := host_tsc_khz()):
            self.kernel_args += f" tsc_early_khz={khz}"  # what the provider adds under TCG
        self.mem_mb = guest_mem_mb(memory_mb, cfg.guest_overhead_mb)
        self.vcpus = vcpus
        self.work = work
        self.work.mkdir(parents=True, exist_ok=True)
        self.snapshots: dict[Path, Path] = {}  # image disk -> snapshot dir (mem.state + disk.qcow2)
        self.vms: dict[str, _VM] = {}
        self._seq = 0
        self._lock = threading.Lock()
        self.version = subprocess.run([self.qemu, "--version"], capture_output=True, text=True,
                                      check=False).stdout.splitlines()[0:1]
        self.bundle_source = (f"stacyvm_server.providers.microvm.vm.qemu_argv ({self.accel}, {self.mem_mb} MiB guest "
                              f"RAM, {vcpus} vCPU, network none, assets {self.assets.assets_id}, kernel "
                              f"{self.assets.kernel_release}, {' '.join(self.version)})")
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="raw-microvm", daemon=True)
        self._thread.start()

    # plumbing ------------------------------------------------------------------------------
    def _run(self, coro: Coroutine[Any, Any, T], timeout: float = TIMEOUT) -> T:
        try:
            return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)
        except RawError:
            raise
        except Exception as exc:  # ProviderError, AgentGone, TimeoutError, OSError
            raise RawError(f"{type(exc).__name__}: {exc}") from None

    def _shape(self, base: Path) -> vm.Shape:
        return vm.Shape(str(base), self.mem_mb, self.vcpus, False, self.accel, self.assets.assets_id,
                        self.kernel_args)

    def _new_dir(self, kind: str) -> tuple[str, vm.VMFiles]:
        with self._lock:
            self._seq += 1
            cid = f"raw-{kind}-{self._seq}"
        d = self.work / cid
        d.mkdir(parents=True)
        return cid, vm.VMFiles(d)

    def _spawn(self, shape: vm.Shape, files: vm.VMFiles, incoming: Path | None) -> int:
        return vm.spawn(vm.qemu_argv(self.qemu, self.assets, shape, files, incoming), files, [], None)

    async def _ping(self, files: vm.VMFiles) -> AgentConnection:
        conn = await AgentConnection.open(str(files.agent), 60)
        try:
            await conn.request("ping", timeout=TIMEOUT)
        except BaseException:
            await conn.close()
            raise
        return conn

    # cold boot and snapshot ---------------------------------------------------------------
    async def _cold_boot(self, base: Path, save_to: Path | None) -> tuple[vm.VMFiles, ColdBoot]:
        _cid, files = self._new_dir("cold")
        t0 = time.perf_counter()
        await asyncio.to_thread(disk.make_overlay, base, files.disk, "raw")
        pid = await asyncio.to_thread(self._spawn, self._shape(base), files, None)
        try:
            conn = await self._ping(files)
            boot = _ms(t0)
            save = 0.0
            if save_to is not None:
                t1 = time.perf_counter()
                await vm.save(files, save_to, TIMEOUT)
                save = _ms(t1)
            await conn.close()
        except BaseException as exc:
            raise RawError(f"cold boot: {exc}; {vm.qemu_error(files)}") from None
        finally:
            await asyncio.to_thread(vm.kill, pid, files)
        return files, ColdBoot(boot, save)

    def cold_boot(self, base: Path | str) -> float:
        """ms from overlay creation + QEMU spawn to the agent's first reply; then the VM is killed."""
        files, t = self._run(self._cold_boot(Path(base), None))
        shutil.rmtree(files.dir, ignore_errors=True)
        return t.boot_ms

    def prepare(self, base: Path | str) -> ColdBoot:
        """Boot `base` cold and save a snapshot of it, as the provider does for a new shape."""
        base = Path(base)
        snap = self.work / f"snapshot-{len(self.snapshots)}"
        snap.mkdir()
        files, t = self._run(self._cold_boot(base, snap / "mem.state"))
        os.replace(files.disk, snap / "disk.qcow2")  # the overlay the saved RAM belongs to
        shutil.rmtree(files.dir, ignore_errors=True)
        self.snapshots[base] = snap
        return t

    # the baseline's create / exec / destroy ---------------------------------------------------
    async def _restore(self, base: Path) -> tuple[str, UpTiming]:
        snap = self.snapshots.get(base)
        if snap is None:
            raise RawError(f"no snapshot prepared for {base}")
        cid, files = self._new_dir("vm")
        t0 = time.perf_counter()
        await asyncio.to_thread(disk.make_overlay, snap / "disk.qcow2", files.disk, "qcow2")
        overlay_ms = _ms(t0)
        t1 = time.perf_counter()
        pid = await asyncio.to_thread(self._spawn, self._shape(base), files, snap / "mem.state")
        box = self.vms[cid] = _VM(pid, files)
        try:
            restore_ms = _ms(t1)  # QEMU started; it loads the state and resumes by itself
            t2 = time.perf_counter()
            box.conn = await self._ping(files)
        except BaseException as exc:
            await self._down(cid)
            raise RawError(f"restore: {exc}; {vm.qemu_error(files)}") from None
        return cid, UpTiming(overlay_ms, restore_ms, _ms(t2), _ms(t0))

    def up(self, base: Path | str) -> tuple[str, UpTiming]:
        """qcow2 overlay on the snapshot's disk + QEMU -incoming (resumes by itself) + agent ping.

        UpTiming: mount_ms = overlay, create_ms = spawn -> restored and running (QMP),
        start_ms = agent socket connect + ping answered.
        """
        return self._run(self._restore(Path(base)))

    async def _exec(self, cid: str, argv: list[str], first_byte: bool = False) -> tuple[float, float]:
        conn = self.vms[cid].conn
        assert conn is not None
        t0 = time.perf_counter()
        ch = conn.channel("exec", argv=argv, env={}, workdir=None, user=None, stdin=False, tty=False,
                          rows=24, cols=80)
        ttfb = 0.0
        try:
            while True:
                kind, ev = await asyncio.wait_for(ch.next(), TIMEOUT)
                if kind == "msg":
                    if ev.get("ev") == "exit":
                        if ev.get("code") != 0:
                            raise RawError(f"exec {argv[0]}: exit {ev.get('code')}")
                        break
                    if ev.get("ev") == "error":
                        raise RawError(f"exec {argv[0]}: {ev.get('message')}")
                    continue
                _stream, chunk = ev
                if chunk:
                    if not ttfb:
                        ttfb = _ms(t0)
                    ch.consumed(len(chunk))
        finally:
            ch.close()
        if first_byte and not ttfb:
            raise RawError("exec (stream): no output")
        return ttfb, _ms(t0)

    def exec(self, cid: str, argv: list[str]) -> float:
        """An exec channel on the open agent connection -> started -> exit (code 0)."""
        return self._run(self._exec(cid, argv))[1]

    def exec_ttfb(self, cid: str, argv: list[str]) -> tuple[float, float]:
        return self._run(self._exec(cid, argv, first_byte=True))

    async def _write(self, cid: str, path: str, data: bytes) -> float:
        conn = self.vms[cid].conn
        assert conn is not None
        t0 = time.perf_counter()
        ch = conn.channel("write", path=path, mode=0o644)
        try:
            await ch.send_data(data)
            await ch.send_data(b"")
            while True:
                kind, ev = await asyncio.wait_for(ch.next(), TIMEOUT)
                if kind == "msg":
                    if ev.get("ev") != "done" or int(ev.get("size", -1)) != len(data):
                        raise RawError(f"write {path}: {ev}")
                    return _ms(t0)
        finally:
            ch.close()

    async def _read(self, cid: str, path: str) -> tuple[float, bytes]:
        conn = self.vms[cid].conn
        assert conn is not None
        t0 = time.perf_counter()
        ch = conn.channel("read", path=path)
        parts: list[bytes] = []
        try:
            while True:
                kind, ev = await asyncio.wait_for(ch.next(), TIMEOUT)
                if kind == "msg":
                    if ev.get("ev") == "error":
                        raise RawError(f"read {path}: {ev.get('message')}")
                    break
                chunk = ev[1]
                if chunk:
                    parts.append(chunk)
                    ch.consumed(len(chunk))
        finally:
            ch.close()
        return _ms(t0), b"".join(parts)

    def pipe_in(self, cid: str, path: str, data: bytes) -> float:
        """The agent's `write` op: DATA frames within the credit window, EOF, `done`."""
        return self._run(self._write(cid, path, data))

    def pipe_out(self, cid: str, path: str) -> tuple[float, bytes]:
        """The agent's `read` op to its final message."""
        return self._run(self._read(cid, path))

    async def _down(self, cid: str) -> float:
        box = self.vms.pop(cid, None)
        if box is None:
            return 0.0
        t0 = time.perf_counter()
        if box.conn is not None:
            await box.conn.close()
        await asyncio.to_thread(vm.kill, box.pid, box.files)
        await asyncio.to_thread(shutil.rmtree, box.files.dir, True)
        return _ms(t0)

    def down(self, cid: str) -> float:
        """Close the agent connection, SIGKILL QEMU until gone, remove the VM's directory."""
        return self._run(self._down(cid))

    def cleanup(self) -> None:
        for cid in list(self.vms):
            try:
                self.down(cid)
            except RawError:
                pass
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        if not self.loop.is_running():
            self.loop.close()
        shutil.rmtree(self.work, ignore_errors=True)

