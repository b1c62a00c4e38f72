"""The microvm provider: every sandbox is a QEMU `microvm` with its own kernel.

Create = restore from a snapshot of the sandbox's shape (image, guest RAM,
vCPUs, network), made once by booting that shape cold and saving it; then the
guest agent is told who it is now (hostname, clock, fresh entropy, limits, the
image's env/user/workdir). Without snapshots every create is a cold boot.

State per sandbox in <state_dir>/sandboxes/<id>/ (meta.json, disk overlay,
sockets, logs); image disks in <state_dir>/disks/, snapshots in
<state_dir>/snapshots/<shape key>/. Network "bridge" puts QEMU into the same
kind of network namespace as a native sandbox (routed veth, nft rules: egress,
no host, no other sandbox); the guest's user-mode network stack lives in the
QEMU process, so the guest reaches exactly what that namespace allows.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import shutil
import socket
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from stacyvm_server.config import Settings
from stacyvm_server.errors import BadRequest, PortClosed, ProviderError, SandboxFileError, Unavailable
from stacyvm_server.ids import SANDBOX_ID_RE
from stacyvm_server.images.model import Image
from stacyvm_server.providers.base import (
    ExecSpec,
    FileInfo,
    ImageSource,
    InventoryItem,
    Provider,
    ProviderHealth,
    RuntimeState,
    SandboxHandle,
    SandboxSpec,
    SandboxStats,
)
from stacyvm_server.providers.microvm import assets as assets_mod
from stacyvm_server.providers.microvm import cache, disk, vm
from stacyvm_server.providers.microvm import protocol as P
from stacyvm_server.providers.microvm.channel import AgentConnection, Channel, GuestOSError, raise_for_error
from stacyvm_server.providers.microvm.process import MicroVMExec
from stacyvm_server.providers.native import network, nft
from stacyvm_server.providers.sandboxpath import file_error, normalize

log = logging.getLogger("stacyvm.microvm")
KVM_PROBE_TIMEOUT = 10.0  # a KVM microVM answers in well under a second


def host_tsc_khz() -> int | None:
    """The host's TSC rate. Under TCG the guest's TSC is the host's, and telling the
    guest kernel (tsc_early_khz) spares it a PIT calibration that fails when the host
    is busy, which leaves it without a usable clock, hung in early boot."""
    with contextlib.suppress(OSError, ValueError):
        return int(Path("/sys/devices/system/cpu/cpu0/tsc_freq_khz").read_text())
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("cpu MHz"):
                return int(float(line.split(":")[1]) * 1000)
    return None


def guest_mem_mb(memory_mb: int, overhead_mb: int) -> int:
    """Guest RAM for a sandbox: rounded up to a power of two so snapshots are shared."""
    mem = 256
    while mem < memory_mb + overhead_mb:
        mem *= 2
    return mem


class MicroVMProvider(Provider):
    name = "microvm"
    capabilities = ("spawn", "exec", "exec_stream", "stdin", "pty", "files", "health", "runtime_inventory",
                    "network_none", "network_bridge", "oom_reason", "own_kernel")

    def __init__(self, settings: Settings, images: ImageSource) -> None:
        self.settings = settings
        self.cfg = settings.microvm
        self.images = images
        self.root = settings.microvm_dir
        self.boxes_dir = self.root / "sandboxes"
        self.assets_dir = self.cfg.assets_dir or self.root / "assets"
        self.pool = network.AddressPool(settings.native.bridge_subnet, network.ADDRESS_DIR)
        self.assets: assets_mod.Assets | None = None
        self.accel = "tcg"
        self.kernel_args = self.cfg.kernel_args
        self._conns: dict[str, AgentConnection] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._relays: set[asyncio.Task[None]] = set()
        self._busy: Counter[str] = Counter()  # disk names and shape keys held by creates in progress

    def describe(self) -> dict[str, str]:
        a = self.assets
        return {"type": self.name, "accel": self.accel, "qemu": self.cfg.qemu_path,
                "kernel": a.kernel_release if a else "", "assets_id": a.assets_id if a else "",
                "snapshots": str(self.cfg.snapshots).lower()}

    def _lock(self, key: str) -> asyncio.Lock:
        return self._locks.setdefault(key, asyncio.Lock())

    # startup ----------------------------------------------------------------------------
    async def start(self) -> None:
        if shutil.which(self.cfg.qemu_path) is None:
            raise ProviderError(f"microvm: {self.cfg.qemu_path} not found (fix: apt-get install qemu-system-x86 "
                                "qemu-utils, or `scripts/install.sh`)")
        self.assets = assets_mod.load(self.assets_dir)
        if self.assets is None:
            if not self.cfg.build_assets:
                raise ProviderError(f"microvm: no guest assets in {self.assets_dir} (fix: stacyvm microvm "
                                    "build-assets)")
            log.info("microvm: building guest assets in %s", self.assets_dir)
            self.assets = await asyncio.to_thread(assets_mod.build, self.assets_dir, log.info)
        for d in (self.boxes_dir, self.root / "disks", self.root / "snapshots"):
            d.mkdir(parents=True, exist_ok=True)
        for p in await asyncio.to_thread(cache.remove_partial, self.root):
            log.info("microvm: removed %s, left half-built by an earlier run", p)
        await self._trim()
        self.accel = await self._choose_accel()
        self.kernel_args = self.cfg.kernel_args
        if self.accel == "tcg" and (khz := host_tsc_khz()):
            self.kernel_args += f" tsc_early_khz={khz}"
        await nft.ensure_table(self.settings.native.bridge_subnet, self.settings.native.allow_inter_sandbox)

    async def _choose_accel(self) -> str:
        if self.cfg.accel != "auto":
            return self.cfg.accel
        if not os.access("/dev/kvm", os.R_OK | os.W_OK):
            log.warning("microvm: no usable /dev/kvm; using TCG (software emulation, slow)")
            return "tcg"
        cache = self.root / "accel.json"
        key = f"{self.assets.assets_id if self.assets else ''}|{os.uname().release}|{self.cfg.qemu_path}"
        with contextlib.suppress(OSError, ValueError):
            cached = json.loads(cache.read_text())
            if cached.get("key") == key:
                log.info("microvm: KVM probe result cached in %s: %s", cache, cached["why"] or "works")
                return "kvm" if cached["why"] is None else "tcg"
        why = await self._probe_kvm()
        cache.write_text(json.dumps({"key": key, "why": why}))
        if why is None:
            log.info("microvm: KVM boots our guest; using KVM")
            return "kvm"
        log.warning("microvm: KVM cannot boot our guest (%s); using TCG (software emulation, slow)", why)
        return "tcg"

    async def _probe_kvm(self) -> str | None:
        """Boot the guest under KVM with no disk work to do: None if the agent answers."""
        assert self.assets is not None
        probe = self.root / "kvm-probe"
        shutil.rmtree(probe, ignore_errors=True)
        probe.mkdir(parents=True)
        files = vm.VMFiles(probe)
        base = await self._image_disk_for_probe()
        try:
            await asyncio.to_thread(disk.make_overlay, base, files.disk, "raw")
            shape = vm.Shape("probe", 256, 1, False, "kvm", self.assets.assets_id, self.kernel_args)
            pid = await self._launch(shape, files)
            try:
                conn = await AgentConnection.open(str(files.agent), 5)
                try:
                    await conn.request("ping", timeout=KVM_PROBE_TIMEOUT)
                finally:
                    await conn.close()
                return None
            except ProviderError as exc:
                return vm.qemu_error(files).splitlines()[-1] if vm.qemu_error(files) else str(exc)
            finally:
                await asyncio.to_thread(vm.kill, pid, files)
        finally:
            shutil.rmtree(probe, ignore_errors=True)

    async def _image_disk_for_probe(self) -> Path:
        """An empty ext4 disk: the probe only needs the guest to mount something."""
        path = self.root / "disks" / "empty.ext4"
        if not path.exists():
            empty = self.root / "disks" / "empty-root"
            empty.mkdir(parents=True, exist_ok=True)
            await asyncio.to_thread(disk.make_image_disk, empty, path, 16)
            empty.rmdir()
        return path

    async def _launch(self, shape: vm.Shape, files: vm.VMFiles, incoming: Path | None = None,
                      cgroup_procs: list[Path] | None = None, netns: str | None = None) -> int:
        assert self.assets is not None
        argv = vm.qemu_argv(self.cfg.qemu_path, self.assets, shape, files, incoming)
        return await asyncio.to_thread(vm.spawn, argv, files, cgroup_procs or [], netns)

    async def close(self) -> None:
        """Drop the agent connections (a restarted server reconnects); VMs keep running."""
        conns, self._conns = list(self._conns.values()), {}
        for conn in conns:
            await conn.close()
        await asyncio.to_thread(vm.cgroup_remove_parent)

    async def health(self) -> ProviderHealth:
        t0 = time.monotonic()
        ok = self.assets is not None and shutil.which(self.cfg.qemu_path) is not None
        return ProviderHealth(ok, None if ok else "qemu or guest assets missing", (time.monotonic() - t0) * 1000)

    # images, disks, snapshots ----------------------------------------------------------------
    def _disk_path(self, image: Image, free_mb: int) -> Path:
        return self.root / "disks" / f"{image.digest.removeprefix('sha256:')[:32]}-{free_mb}m.ext4"

    async def _image_disk(self, image: Image, free_mb: int) -> tuple[Path, bool]:
        """The image as an ext4 file with free_mb of room (the sandbox's disk space); True when made now."""
        path = self._disk_path(image, free_mb)
        async with self._lock("disk:" + path.name):
            if path.exists():
                os.utime(path)  # the cache's last use
                return path, False
            await asyncio.to_thread(disk.make_image_disk, image.rootfs, path, free_mb)
        return path, True

    async def _snapshot(self, shape: vm.Shape, base: Path) -> tuple[Path, bool]:
        """The snapshot directory for `shape`, made on first use (one builder per shape); True when made now."""
        final = self.root / "snapshots" / shape.key
        async with self._lock("snap:" + shape.key):
            if (final / "mem.state").exists():
                os.utime(final)
                return final, False
            assert self.assets is not None
            tmp = final.with_name(f"{shape.key}.building")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            files = vm.VMFiles(tmp)
            t0 = time.monotonic()
            try:
                await asyncio.to_thread(disk.make_overlay, base, files.disk, "raw")
                pid = await self._launch(shape, files)
                try:
                    conn = await AgentConnection.open(str(files.agent), 30)
                    try:
                        await conn.request("ping", timeout=self.cfg.boot_timeout)
                    except ProviderError as exc:
                        raise ProviderError(f"microVM did not boot: {exc}; {vm.qemu_error(files)}") from None
                    booted = time.monotonic() - t0
                    await vm.save(files, tmp / "mem.state", self.cfg.boot_timeout)
                    await conn.close()
                finally:
                    await asyncio.to_thread(vm.kill, pid, files)
                for f in (files.agent, files.qmp, files.console, files.qemu_log):
                    f.unlink(missing_ok=True)
                (tmp / "meta.json").write_text(json.dumps({"shape": shape.__dict__, "boot_s": booted}))
                tmp.rename(final)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            log.info("microvm: snapshot %s made (cold boot %.2f s, total %.2f s)", shape.key, booted,
                     time.monotonic() - t0)
            return final, True

    @contextlib.contextmanager
    def _holding(self, *names: str) -> Iterator[None]:
        """Keep these disks/snapshots out of _trim until the create using them has its meta."""
        self._busy.update(names)
        try:
            yield
        finally:
            self._busy.subtract(names)
            self._busy += Counter()  # drop the zeros

    def _in_use(self, entries: list[cache.Entry]) -> set[str]:
        keep = {name for name, n in self._busy.items() if n > 0}
        unknown_disk = False
        for d in self.boxes_dir.iterdir() if self.boxes_dir.is_dir() else []:
            meta = self._meta(d.name)
            keep.update(str(meta[k]) for k in ("shape", "disk") if k in meta)
            # Made before metas named their disk: which one it reads is unknown, keep all.
            unknown_disk |= "shape" in meta and "disk" not in meta
        if unknown_disk:
            keep.update(e.name for e in entries if e.disk is None)
        return keep

    async def _trim(self) -> None:
        """Remove unused disks and snapshots, least recently used first, beyond microvm.cache_max_mb.

        Decided and moved to the trash on the event loop, where creates register what they
        hold: no create can start using an entry between the check and its removal (it then
        finds it missing and builds it again). Only the deletion runs in a thread.
        """
        entries = cache.scan(self.root)
        gone = cache.victims(entries, self._in_use(entries), self.cfg.cache_max_mb << 20)
        trash = [cache.discard(e, self.root / cache.TRASH) for e in gone]
        for e in gone:
            log.info("microvm: cache trimmed: %s %s (%d MiB, unused since %s)",
                     "disk" if cache.DISK_NAME.match(e.name) else "snapshot", e.name, e.size >> 20,
                     datetime.fromtimestamp(e.used, UTC).isoformat(timespec="seconds"))
        await asyncio.to_thread(cache.purge, trash)

    # lifecycle --------------------------------------------------------------------------
    def _files(self, sandbox_id: str) -> vm.VMFiles:
        return vm.VMFiles(self.boxes_dir / sandbox_id)

    def _meta(self, sandbox_id: str) -> dict[str, Any]:
        try:
            return dict(json.loads((self._files(sandbox_id).dir / "meta.json").read_text()))
        except (OSError, ValueError):
            return {}

    def _write_meta(self, sandbox_id: str, meta: dict[str, Any]) -> None:
        path = self._files(sandbox_id).dir / "meta.json"
        path.with_suffix(".tmp").write_text(json.dumps(meta))
        path.with_suffix(".tmp").replace(path)

    async def create(self, spec: SandboxSpec) -> SandboxHandle:
        sid = spec.sandbox_id
        if not SANDBOX_ID_RE.match(sid):
            raise BadRequest(f"invalid sandbox id: {sid!r}")
        if self.assets is None:
            raise Unavailable("the microvm provider is not started")
        image = await self.images.ensure(spec.image)
        # disk_mb is the free space on the sandbox's root filesystem (part of the shape).
        free_mb = spec.disk_mb or self.cfg.disk_free_mb
        bridge = spec.network == "bridge"
        shape = vm.Shape(self._disk_path(image, free_mb).name, guest_mem_mb(spec.memory_mb, self.cfg.guest_overhead_mb),
                         spec.vcpus, bridge, self.accel, self.assets.assets_id, self.kernel_args)
        with self._holding(shape.disk, shape.key):
            base, made_disk = await self._image_disk(image, free_mb)
            snap, made_snap = await self._snapshot(shape, base) if self.cfg.snapshots else (None, False)
            files = self._files(sid)
            files.dir.mkdir(parents=True)
            meta: dict[str, Any] = {"labels": spec.labels, "network": spec.network, "shape": shape.key,
                                    "disk": shape.disk}
            self._write_meta(sid, meta)
        try:
            if snap is not None:
                await asyncio.to_thread(disk.make_overlay, snap / "disk.qcow2", files.disk, "qcow2")
            else:
                await asyncio.to_thread(disk.make_overlay, base, files.disk, "raw")
            netns = await self._network_up(sid, meta) if bridge else None
            procs = await asyncio.to_thread(vm.cgroup_create, sid, shape.mem_mb, spec.vcpus)
            meta["pid"] = await self._launch(shape, files, snap / "mem.state" if snap else None, procs, netns)
            self._write_meta(sid, meta)
            # Restored or booting, the agent answers once the guest runs: QEMU holds
            # our init until then.
            conn = await AgentConnection.open(str(files.agent), 30)
            self._conns[sid] = conn
            env = [*image.config.env, *(f"{k}={v}" for k, v in spec.env.items())]
            try:
                await conn.request("init", timeout=self.cfg.boot_timeout, hostname=sid, time=time.time(),
                                   seed=base64.b64encode(os.urandom(64)).decode(), memory_mb=spec.memory_mb,
                                   pids_limit=spec.pids_limit, vcpus=spec.vcpus, env=env,
                                   workdir=image.config.workdir or "/", user=image.config.user or "root")
            except (ProviderError, OSError) as exc:
                raise ProviderError(f"microVM {sid} did not start: {exc}; QEMU state "
                                    f"{await vm.status(files)}; {vm.qemu_error(files)}") from None
        except BaseException:
            await self._teardown(sid)
            raise
        if made_disk or made_snap:
            await self._trim()  # the cache grew
        return SandboxHandle(sid, self.name, {"dir": str(files.dir)})

    async def _network_up(self, sid: str, meta: dict[str, Any]) -> str:
        addr = await asyncio.to_thread(self.pool.allocate, sid)
        plan = network.NetPlan(network.netns_path(sid), network.host_ifname(sid), addr, self.pool.gateway)
        meta.update(address=addr, netns=plan.netns_path)
        self._write_meta(sid, meta)
        await nft.add_binding(plan.host_if, addr)
        await asyncio.to_thread(network.create_netns, sid, plan)
        return plan.netns_path

    async def destroy(self, handle: SandboxHandle) -> None:
        async with self._lock(handle.sandbox_id):
            await self._teardown(handle.sandbox_id)

    async def _teardown(self, sid: str) -> None:
        conn = self._conns.pop(sid, None)
        if conn is not None:
            await conn.close()
        files = self._files(sid)
        meta = self._meta(sid)
        if "pid" in meta:
            await asyncio.to_thread(vm.kill, int(meta["pid"]), files)
        await asyncio.to_thread(vm.cgroup_remove, sid)
        if "address" in meta or not meta:  # meta names the address before the netns exists
            await asyncio.to_thread(network.destroy_netns, sid)
            for addr in await asyncio.to_thread(self.pool.owned_by, sid):
                await nft.remove_binding(network.host_ifname(sid), addr)
                self.pool.release(addr)
        await asyncio.to_thread(shutil.rmtree, files.dir, True)
        self._locks.pop(sid, None)

    async def state(self, handle: SandboxHandle) -> RuntimeState:
        sid = handle.sandbox_id
        meta = self._meta(sid)
        if not meta:
            return RuntimeState(False)
        if "pid" in meta and vm.alive(int(meta["pid"]), self._files(sid)):
            return RuntimeState(True)
        return RuntimeState(False, "oom" if vm.cgroup_oom_kills(sid) else "crashed")

    async def inventory(self) -> list[InventoryItem]:
        items = []
        for d in sorted(self.boxes_dir.iterdir()) if self.boxes_dir.is_dir() else []:
            meta = self._meta(d.name)
            alive = "pid" in meta and vm.alive(int(meta["pid"]), self._files(d.name))
            items.append(InventoryItem(d.name, alive, SandboxHandle(d.name, self.name, {"dir": str(d)}),
                                       dict(meta.get("labels") or {})))
        return items

    def leftovers(self, sandbox_id: str) -> list[str]:
        """What a destroyed sandbox still holds on the host (for leak checks)."""
        found = vm.cgroup_leftovers(sandbox_id)
        if self._files(sandbox_id).dir.exists():
            found.append(str(self._files(sandbox_id).dir))
        if os.path.exists(network.netns_path(sandbox_id)):
            found.append(network.netns_path(sandbox_id))
        found += [f"address {a}" for a in self.pool.owned_by(sandbox_id)]
        return found

    # the agent ----------------------------------------------------------------------------
    async def _conn(self, handle: SandboxHandle) -> AgentConnection:
        sid = handle.sandbox_id
        conn = self._conns.get(sid)
        if conn is not None and not conn.closed:
            return conn
        async with self._lock(sid):
            conn = self._conns.get(sid)
            if conn is None or conn.closed:
                files = self._files(sid)
                meta = self._meta(sid)
                if "pid" not in meta or not vm.alive(int(meta["pid"]), files):
                    raise ProviderError(f"sandbox {sid} is not running")
                conn = await AgentConnection.open(str(files.agent), 10)
                self._conns[sid] = conn
            return conn

    async def _request(self, handle: SandboxHandle, op: str, err_path: str, **args: Any) -> dict[str, Any]:
        """A one-shot file operation; a guest OSError becomes a SandboxFileError on err_path."""
        conn = await self._conn(handle)
        try:
            return await conn.request(op, **args)
        except GuestOSError as exc:
            raise file_error(exc.errno or 0, exc.strerror or "", err_path) from None

    async def exec(self, handle: SandboxHandle, spec: ExecSpec) -> MicroVMExec:
        conn = await self._conn(handle)
        rows, cols = spec.tty_size or (24, 80)
        ch = conn.channel("exec", argv=spec.argv, env=spec.env, workdir=spec.workdir, user=spec.user,
                          stdin=spec.stdin, tty=spec.tty, rows=rows, cols=cols)
        await ch.opened("started", 30, lambda why: BadRequest(f"cannot start {spec.argv[0]!r}: {why}"))
        return MicroVMExec(ch, spec.tty, spec.stdin)

    # files ---------------------------------------------------------------------------------
    async def read_file(self, handle: SandboxHandle, path: str) -> AsyncIterator[bytes]:
        path = normalize(path)
        ch = (await self._conn(handle)).channel("read", path=path)
        try:
            while True:
                kind, ev = await ch.next()
                if kind == "msg":
                    _raise_file(ev, path)
                    return
                _stream, chunk = ev
                if chunk:
                    yield chunk
                    ch.consumed(len(chunk))
        finally:
            if ch.id in ch.conn.channels:
                ch.send_msg({"op": "cancel"})
            ch.close()

    async def write_file(self, handle: SandboxHandle, path: str, chunks: AsyncIterator[bytes],
                         mode: int = 0o644) -> int:
        path = normalize(path)
        if path == "/":
            raise SandboxFileError("operation not allowed on /")
        ch = (await self._conn(handle)).channel("write", path=path, mode=mode)
        try:
            async for chunk in chunks:
                if not ch.events.empty():  # the guest failed early (bad path): stop sending
                    break
                await ch.send_data(chunk)
            await ch.send_data(b"")
            while True:
                kind, ev = await ch.next()
                if kind == "msg":
                    _raise_file(ev, path)
                    return int(ev["size"])
        finally:
            ch.close()

    async def list_dir(self, handle: SandboxHandle, path: str) -> list[FileInfo]:
        path = normalize(path)
        r = await self._request(handle, "list", path, path=path)
        return [_info(e) for e in r["entries"]]

    async def stat(self, handle: SandboxHandle, path: str) -> FileInfo:
        path = normalize(path)
        r = await self._request(handle, "stat", path, path=path)
        return _info(r["info"])

    async def move(self, handle: SandboxHandle, src: str, dst: str) -> None:
        src, dst = normalize(src), normalize(dst)
        if "/" in (src, dst):
            raise SandboxFileError("operation not allowed on /")
        await self._request(handle, "move", src, src=src, dst=dst)

    async def chmod(self, handle: SandboxHandle, path: str, mode: int) -> None:
        path = normalize(path)
        await self._request(handle, "chmod", path, path=path, mode=mode)

    async def delete(self, handle: SandboxHandle, path: str, recursive: bool) -> None:
        path = normalize(path)
        if path == "/":
            raise SandboxFileError("operation not allowed on /")
        await self._request(handle, "delete", path, path=path, recursive=recursive)

    async def glob(self, handle: SandboxHandle, pattern: str) -> list[str]:
        pattern = normalize(pattern)
        r = await self._request(handle, "glob", pattern, pattern=pattern)
        return list(r["paths"])

    # observability ---------------------------------------------------------------------------
    async def stats(self, handle: SandboxHandle) -> SandboxStats:
        r = await (await self._conn(handle)).request("stats")
        return SandboxStats(r["cpu_usec"] / 1e6, r["mem"], r["mem_limit"], r["pids"])

    async def logs(self, handle: SandboxHandle, lines: int) -> list[str]:
        """The guest's console: what PID 1 and the kernel print (no boot noise: quiet)."""
        def tail() -> list[str]:
            try:
                with open(self._files(handle.sandbox_id).console, "rb") as f:
                    f.seek(0, os.SEEK_END)
                    f.seek(max(0, f.tell() - 256 * 1024))
                    text = f.read().decode(errors="replace")
            except OSError:
                return []
            return [ln.rstrip("\r") for ln in text.splitlines()][-lines:] if lines > 0 else []

        return await asyncio.to_thread(tail)

    # preview -------------------------------------------------------------------------------------
    async def connect(self, handle: SandboxHandle, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Through the agent: it connects to 127.0.0.1:port in the guest, whatever the network."""
        ch = (await self._conn(handle)).channel("connect", port=port)
        await ch.opened("connected", 10, lambda why: PortClosed(
            f"nothing is listening on port {port} in sandbox {handle.sandbox_id} ({why}): "
            "start a server there that listens on 127.0.0.1 or 0.0.0.0"))
        ours, theirs = socket.socketpair()
        ours.setblocking(False)
        task = asyncio.create_task(_relay(ch, ours))
        self._relays.add(task)
        task.add_done_callback(self._relays.discard)
        return await asyncio.open_connection(sock=theirs)


async def _relay(ch: Channel, sock: socket.socket) -> None:
    """Pump bytes between a local socket (the proxy's end) and a connect channel."""
    loop = asyncio.get_running_loop()

    async def up() -> None:
        while data := await loop.sock_recv(sock, P.CHUNK):
            await ch.send_data(data)
        await ch.send_data(b"")

    async def down() -> None:
        while True:
            kind, ev = await ch.next()
            if kind == "msg":
                return
            chunk = ev[1]
            if not chunk:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_WR)
                continue
            await loop.sock_sendall(sock, chunk)
            ch.consumed(len(chunk))

    tasks = [asyncio.create_task(up()), asyncio.create_task(down())]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        for t in tasks:
            t.cancel()
        if ch.id in ch.conn.channels:
            ch.send_msg({"op": "cancel"})
        ch.close()
        sock.close()


def _raise_file(ev: dict[str, Any], path: str) -> None:
    try:
        raise_for_error(ev)
    except GuestOSError as exc:
        raise file_error(exc.errno or 0, exc.strerror or "", path) from None


def _info(e: dict[str, Any]) -> FileInfo:
    return FileInfo(path=e["path"], size=int(e["size"]), mode=int(e["mode"]), is_dir=bool(e["is_dir"]),
                    mod_time=datetime.fromtimestamp(float(e["mtime"]), UTC), is_symlink=bool(e["is_symlink"]))
