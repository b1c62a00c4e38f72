"""The native provider: overlayfs root + OCI runtime (crun/runc/runsc) + cgroup v1.

Per sandbox, under `<native_dir>/sandboxes/<id>/`:
  meta.json   labels and handle data (written first, so a half-created
              sandbox is still found by inventory() and cleaned up)
  upper/ work/ rootfs/   overlay upper, work and merged (the bundle root)
  config.json the OCI bundle config;  init.pid / init.log: PID 1 and its output
  exec/       per-exec process.json and pid files
The runtime's state lives in `<native_dir>/runtime`; the netns is
/run/netns/stacyvm-<id>; addresses are reserved host-wide in /run/stacyvm/addresses.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from stacyvm_server.config import Settings
from stacyvm_server.errors import BadRequest, NotFound, ProviderError, SandboxFileError
from stacyvm_server.images.model import Image
from stacyvm_server.providers.base import (
    ExecProcess,
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
from stacyvm_server.providers.native import bundle, cgroups, host, network, nft, syscalls
from stacyvm_server.providers.native.files import CHUNK, SandboxFS
from stacyvm_server.providers.native.process import KILL_SESSION_SCRIPT, NativeExecProcess, parse_inner_pid
from stacyvm_server.providers.native.pty import NativeTtyProcess, console_listen, open_host_pty, receive_master
from stacyvm_server.providers.native.runtime import OciRuntime
from stacyvm_server.providers.native.users import resolve_user
from stacyvm_server.util.proc import kill_group, kill_until_gone

# runsc: host tasks of the gVisor sandbox (see NativeProvider._host_pids_limit).
RUNSC_PIDS_BASE = 64
RUNSC_PIDS_PER_PROCESS = 16

_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
# Characters with meaning in overlayfs mount options.
_BAD_OVERLAY_CHARS = set(",:\\\n")


@dataclass
class _Box:
    """What exec and files need, cached in memory (rebuilt from meta.json)."""

    sandbox_id: str
    dir: Path
    env: list[str]
    workdir: str
    user: str
    fs: SandboxFS


class NativeProvider(Provider):
    name = "native"
    capabilities = ("spawn", "exec", "exec_stream", "stdin", "files", "health", "runtime_inventory",
                    "network_none", "network_bridge", "oom_reason")

    def __init__(self, settings: Settings, images: ImageSource) -> None:
        self.settings = settings
        self.images = images
        self.root = settings.native_dir
        self.boxes_dir = self.root / "sandboxes"
        self.runtime = OciRuntime(settings.native.runtime, host.runtime_path(settings), self.root / "runtime")
        # Addresses are host-wide (like the routes and the nft table), not per
        # data dir: two servers on one host must never hand out the same one.
        self.pool = network.AddressPool(settings.native.bridge_subnet, network.ADDRESS_DIR)
        # Host uid/gid of the sandbox's root (see bundle.BundleParams.user_namespace).
        self.uid_shift = 0 if settings.native.runtime == "runsc" else bundle.UID_SHIFT
        self._boxes: dict[str, _Box] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._exec_seq = 0

    # provider-wide ---------------------------------------------------------------
    async def start(self) -> None:
        bad = [p for p in await asyncio.to_thread(host.check_host, self.settings) if not p.ok]
        if bad:
            lines = "; ".join(f"{p.name}: {p.detail} -> fix: {p.fix_description}" for p in bad)
            raise ProviderError(
                f"native provider: host not ready ({lines}). Run `stacyvm doctor --fix` "
                "or scripts/setup-host.sh as root."
            )
        # 0711: the runtime, already inside the user namespace (uid 100000),
        # must traverse to the bundle's rootfs; it cannot list these dirs.
        self.boxes_dir.mkdir(parents=True, exist_ok=True, mode=0o711)
        os.chmod(self.boxes_dir, 0o711)
        self.runtime.state_root.mkdir(parents=True, exist_ok=True, mode=0o700)
        await nft.ensure_table(self.settings.native.bridge_subnet, self.settings.native.allow_inter_sandbox)
        await asyncio.to_thread(__import__, "pyroute2")  # the first import costs ~100 ms

    def describe(self) -> dict[str, str]:
        n = self.settings.native
        return {"type": self.name, "runtime": n.runtime, "runtime_path": self.runtime.path,
                "subnet": n.bridge_subnet, "allow_inter_sandbox": str(n.allow_inter_sandbox).lower()}

    async def close(self) -> None:
        cgroups.remove_parent()

    async def health(self) -> ProviderHealth:
        t0 = time.perf_counter()
        bad = [p for p in host.check_host(self.settings) if not p.ok and p.name != "ip-forward"]
        try:
            await self.runtime.version()
        except ProviderError as exc:
            return ProviderHealth(False, str(exc), (time.perf_counter() - t0) * 1000)
        err = "; ".join(f"{p.name}: {p.detail}" for p in bad) or None
        return ProviderHealth(not bad, err, (time.perf_counter() - t0) * 1000)

    # lifecycle -------------------------------------------------------------------
    def _lock(self, sid: str) -> asyncio.Lock:
        return self._locks.setdefault(sid, asyncio.Lock())

    async def create(self, spec: SandboxSpec) -> SandboxHandle:
        sid = spec.sandbox_id
        if not _ID_RE.match(sid):
            raise BadRequest(f"invalid sandbox id: {sid!r}")
        if spec.memory_mb < 6 or spec.vcpus < 1 or spec.pids_limit < 8:
            raise BadRequest("memory_mb >= 6, vcpus >= 1 and pids_limit >= 8 are required")
        image = await self.images.ensure(spec.image, uid_shift=self.uid_shift)
        lower = str(image.rootfs)
        if _BAD_OVERLAY_CHARS & set(lower):
            raise ProviderError(f"image rootfs path not usable as overlay lowerdir: {lower}")
        d = self.boxes_dir / sid
        handle = SandboxHandle(sid, self.name, {"dir": str(d), "network": spec.network,
                                                "runtime": self.runtime.kind})
        async with self._lock(sid):
            try:
                d.mkdir(mode=0o711)
            except FileExistsError:
                raise ProviderError(f"sandbox {sid} already exists on this host") from None
            try:
                await self._create(spec, image, d, handle)
            except BaseException:
                await self._teardown(sid, handle.data)
                self._boxes.pop(sid, None)
                raise
        return handle

    async def _create(self, spec: SandboxSpec, image: Image, d: Path, handle: SandboxHandle) -> None:
        sid = spec.sandbox_id
        cfg = image.config
        env = _merge_env(cfg.env, spec.env)
        if spec.network == "bridge":
            addr = await asyncio.to_thread(self.pool.allocate, sid)
            handle.data.update(address=addr, host_if=network.host_ifname(sid))
        handle.data["netns"] = network.netns_path(sid)
        meta = {"handle": handle.data, "labels": spec.labels, "image": image.ref, "digest": image.digest,
                "env": env, "workdir": cfg.workdir, "user": cfg.user}
        _write_json(d / "meta.json", meta)

        rootfs, upper, work = d / "rootfs", d / "upper", d / "work"
        if spec.disk_mb:
            # A size-capped writable layer: upper and work on a tmpfs of disk_mb (overlay
            # needs both on one filesystem). Its pages are charged to the writer's memory
            # cgroup, so written files also count against memory_mb (docs/native-provider.md).
            layer = d / "layer"
            layer.mkdir()
            flags, opts = syscalls.MS_NOSUID | syscalls.MS_NODEV, f"size={spec.disk_mb}m,mode=755"
            await asyncio.to_thread(syscalls.mount, "tmpfs", str(layer), "tmpfs", flags, opts)
            handle.data["disk_mb"] = str(spec.disk_mb)
            upper, work = layer / "upper", layer / "work"
        for p in (rootfs, upper, work):
            p.mkdir()
        # The merged root's owner and mode come from the upper dir: make it the
        # sandbox root's (host uid 100000) so root inside owns "/".
        os.chown(upper, self.uid_shift, self.uid_shift)
        os.chmod(upper, 0o755)
        opts = f"lowerdir={image.rootfs},upperdir={upper},workdir={work}"
        await asyncio.to_thread(syscalls.mount, "overlay", str(rootfs), "overlay", 0, opts)
        handle.data["mounted"] = "1"

        plan = network.NetPlan(handle.data["netns"])
        if spec.network == "bridge":
            plan = network.NetPlan(plan.netns_path, handle.data["host_if"], handle.data["address"],
                                   self.pool.gateway)
            # The binding lands before the interface exists; the prefix rules
            # cover the interface from its first packet anyway.
            await nft.add_binding(plan.host_if, plan.address)
        # runc: the netns must belong to the sandbox's user namespace (network.py).
        own_userns = self.runtime.kind == "runc"
        if own_userns:
            handle.data["userns"] = network.userns_path(sid)
        await asyncio.to_thread(network.create_netns, sid, plan,
                                bundle.UID_SHIFT if own_userns else None, bundle.UID_RANGE)

        box = _Box(sid, d, env, cfg.workdir, cfg.user, SandboxFS(str(rootfs), self.uid_shift, self.uid_shift))
        if spec.network == "bridge":
            await asyncio.to_thread(_write_resolv_conf, box.fs)
        params = bundle.BundleParams(sid, str(rootfs), plan.netns_path, cgroups.cgroups_path(sid),
                                     spec.memory_mb, spec.vcpus, self._host_pids_limit(spec.pids_limit), env,
                                     user_namespace=self.runtime.kind != "runsc",
                                     userns_path=handle.data.get("userns"),
                                     fresh_sysfs=own_userns or self.runtime.kind == "runsc",
                                     tmp_bind=_tmp_bind(rootfs) if self.runtime.kind == "runsc" else None)
        _write_json(d / "config.json", bundle.build_config(params))
        (d / "exec").mkdir()
        # The init's output file belongs to the sandbox's root, so processes in
        # the sandbox may reopen it (e.g. via /proc/1/fd/1) like a console.
        log = d / "init.log"
        log.touch(mode=0o600)
        os.chown(log, self.uid_shift, self.uid_shift)
        await self.runtime.run_detached(d, sid, d / "init.pid", d / "init.log", timeout=60)
        self._boxes[sid] = box

    def _host_pids_limit(self, pids_limit: int) -> int:
        """The pids cgroup value for a sandbox.

        runsc: the sandbox's processes are not host tasks; the cgroup counts the
        Sentry's threads and ptrace stubs (about 40 idle, about 15 more per
        running process here), and runsc 2022 has no pids limit of its own.
        So the cgroup gets a budget scaled to pids_limit; it protects the host,
        and a sandbox that exhausts it dies as a whole (docs/native-provider.md).
        """
        if self.runtime.kind == "runsc":
            return RUNSC_PIDS_BASE + RUNSC_PIDS_PER_PROCESS * pids_limit
        return pids_limit

    async def destroy(self, handle: SandboxHandle) -> None:
        async with self._lock(handle.sandbox_id):
            await self._teardown(handle.sandbox_id, {**self._meta_handle(handle.sandbox_id), **handle.data})
        self._boxes.pop(handle.sandbox_id, None)
        self._locks.pop(handle.sandbox_id, None)

    async def _teardown(self, sid: str, data: dict[str, str]) -> None:
        """Undo everything, in reverse order; each step tolerates "already gone"."""
        errors: list[str] = []
        d = self.boxes_dir / sid
        try:
            await self.runtime.delete(sid)
        except ProviderError as exc:
            errors.append(str(exc))
        # A runtime that failed half-way may leave processes or cgroups behind.
        await asyncio.to_thread(_kill_cgroup, sid)
        await asyncio.to_thread(cgroups.remove, sid)
        for mountpoint in (d / "rootfs", d / "layer"):  # the merged root first, then its tmpfs layer
            with contextlib.suppress(OSError):
                await asyncio.to_thread(syscalls.umount, str(mountpoint))
        try:
            await asyncio.to_thread(network.destroy_netns, sid)
        except Exception as exc:
            errors.append(f"network: {exc}")
        addrs = {data["address"]} if data.get("address") else set()
        addrs |= set(await asyncio.to_thread(self.pool.owned_by, sid))
        for addr in addrs:
            await nft.remove_binding(network.host_ifname(sid), addr)
            self.pool.release(addr)
        try:
            await asyncio.to_thread(shutil.rmtree, d, ignore_errors=False)
        except FileNotFoundError:
            pass
        except OSError as exc:
            errors.append(f"remove {d}: {exc}")
        if errors:
            raise ProviderError(f"destroy {sid} incomplete: {'; '.join(errors)}")

    def _meta_handle(self, sid: str) -> dict[str, str]:
        try:
            data = json.loads((self.boxes_dir / sid / "meta.json").read_text())
            return {str(k): str(v) for k, v in data.get("handle", {}).items()}
        except (OSError, ValueError):
            return {}

    async def state(self, handle: SandboxHandle) -> RuntimeState:
        sid = handle.sandbox_id
        alive = _init_alive(self.boxes_dir / sid)
        if alive:
            return RuntimeState(True)
        return RuntimeState(False, "oom" if cgroups.oom_kills(sid) > 0 else "crashed")

    async def inventory(self) -> list[InventoryItem]:
        running = {c.id: c for c in await self.runtime.list()}
        ids = set(running)
        if self.boxes_dir.is_dir():
            ids |= {p.name for p in self.boxes_dir.iterdir() if p.is_dir()}
        items = []
        for sid in sorted(ids):
            labels: dict[str, str] = {}
            data: dict[str, str] = {}
            with contextlib.suppress(OSError, ValueError):
                meta = json.loads((self.boxes_dir / sid / "meta.json").read_text())
                labels = {str(k): str(v) for k, v in meta.get("labels", {}).items()}
                data = {str(k): str(v) for k, v in meta.get("handle", {}).items()}
            alive = sid in running and running[sid].status == "running" and _init_alive(self.boxes_dir / sid)
            items.append(InventoryItem(sid, alive, SandboxHandle(sid, self.name, data), labels))
        return items

    # exec ------------------------------------------------------------------------
    def _box(self, handle: SandboxHandle) -> _Box:
        sid = handle.sandbox_id
        box = self._boxes.get(sid)
        if box is not None:
            return box
        d = self.boxes_dir / sid
        try:
            meta = json.loads((d / "meta.json").read_text())
        except (OSError, ValueError):
            raise ProviderError(f"sandbox {sid} not found on this host") from None
        fs = SandboxFS(str(d / "rootfs"), self.uid_shift, self.uid_shift)
        box = _Box(sid, d, list(meta.get("env", [])), meta.get("workdir", ""), meta.get("user", ""), fs)
        self._boxes[sid] = box
        return box

    async def exec(self, handle: SandboxHandle, spec: ExecSpec) -> ExecProcess:
        if not spec.argv:
            raise BadRequest("argv must not be empty")
        box = self._box(handle)
        uid, gid = await asyncio.to_thread(resolve_user, box.fs, spec.user or box.user)
        env = _merge_env(box.env, spec.env)
        cwd = spec.workdir or box.workdir or "/"
        self._exec_seq += 1
        base = box.dir / "exec" / f"{os.getpid()}-{self._exec_seq}"
        proc_file, pid_file = base.with_suffix(".json"), base.with_suffix(".pid")
        inner_pid_file = base.with_suffix(".ipid")
        tty_size = (spec.tty_size or (24, 80)) if spec.tty else None
        _write_json(proc_file, bundle.process(list(spec.argv), env, cwd, uid, gid, tty_size))
        oom_before = cgroups.oom_kills(box.sandbox_id)
        # A terminal exec (pty.py): crun sends the pty master over a console
        # socket, in a short private directory (unix socket paths are limited to
        # 108 bytes); runc and runsc get a host pty as their stdio instead.
        tty_mode = self.runtime.tty_mode if tty_size is not None else None
        tty_dir = Path(tempfile.mkdtemp(prefix="stacyvm-tty-")) if tty_mode == "console_socket" else None
        console = tty_dir / "console.sock" if tty_dir is not None else None
        listener = console_listen(console) if console is not None else None
        master: int | None = None
        slave: int | None = None
        if tty_size is not None and tty_mode != "console_socket":
            master, slave = open_host_pty(*tty_size, relay=tty_mode == "relay")
        stdin: int = asyncio.subprocess.PIPE if spec.stdin and not spec.tty else asyncio.subprocess.DEVNULL
        stdout: int = asyncio.subprocess.DEVNULL if spec.tty else asyncio.subprocess.PIPE
        stderr: int = asyncio.subprocess.PIPE
        if slave is not None:
            stdin = stdout = stderr = slave
        try:
            try:
                proc = await asyncio.create_subprocess_exec(
                    *self.runtime.exec_argv(box.sandbox_id, proc_file, pid_file, inner_pid_file, console,
                                            host_pty=slave is not None),
                    stdin=stdin, stdout=stdout, stderr=stderr,
                    # So kill() can take the runtime client's group down; with a
                    # host pty, `setsid --ctty` makes the client a session leader.
                    start_new_session=slave is None,
                )
            except OSError as exc:
                proc_file.unlink(missing_ok=True)
                if master is not None:
                    os.close(master)
                raise ProviderError(f"cannot start {self.runtime.kind} exec: {exc}") from exc
            if listener is not None:
                try:
                    master = await receive_master(listener, proc, timeout=30)
                except BaseException:
                    kill_group(proc.pid)
                    await proc.wait()
                    proc_file.unlink(missing_ok=True)
                    raise
        finally:
            if slave is not None:
                os.close(slave)  # the runtime client holds it now: EIO on the master once it is gone
            if listener is not None:
                listener.close()
            if tty_dir is not None:
                shutil.rmtree(tty_dir, ignore_errors=True)

        async def exit_reason(rc: int) -> str | None:
            return "oom" if cgroups.oom_kills(box.sandbox_id) > oom_before else None

        if self.runtime.kind != "runsc":
            if master is not None:
                return NativeTtyProcess(proc, box.sandbox_id, pid_file, [proc_file, pid_file], exit_reason,
                                        master=master)
            return NativeExecProcess(proc, box.sandbox_id, pid_file, [proc_file, pid_file], exit_reason)

        # Under runsc the exec's processes live inside the Sentry, not on the
        # host: the tree is killed from inside the sandbox (process.py).
        async def inner_kill(inner_sid: int) -> None:
            await self._kill_inner_session(box, inner_sid)

        async def inner_signal(inner_pid: int, sig: int) -> None:
            await self._signal_inner(box, inner_pid, sig)

        cls = NativeExecProcess if master is None else NativeTtyProcess
        extra = {} if master is None else {"master": master}
        return cls(proc, box.sandbox_id, pid_file, [proc_file, pid_file, inner_pid_file], exit_reason,
                   inner_pid_file=inner_pid_file, inner_kill=inner_kill, inner_signal=inner_signal, **extra)

    async def _signal_inner(self, box: _Box, inner_pid: int, sig: int) -> None:
        """Send `sig` to pid `inner_pid` inside the sandbox (runsc), with the host's busybox as root."""
        if parse_inner_pid(str(inner_pid)) is None or not 0 < sig < 65:
            return
        self._exec_seq += 1
        kfile = box.dir / "exec" / f"{os.getpid()}-{self._exec_seq}-signal.json"
        argv = [bundle.BUSYBOX, "kill", f"-{sig}", str(inner_pid)]
        _write_json(kfile, bundle.process(argv, [f"PATH={bundle.PATH_DEFAULT}"], "/", 0, 0))
        try:
            await self.runtime.exec_quiet(box.sandbox_id, kfile, timeout=10)
        finally:
            kfile.unlink(missing_ok=True)

    async def _kill_inner_session(self, box: _Box, inner_sid: int) -> None:
        """SIGKILL every process of session inner_sid inside the sandbox (runsc).

        Runs the host's busybox (read-only bind) as root in the sandbox; the
        kill stays in the sandbox's pid namespace whatever inner_sid is.
        """
        if parse_inner_pid(str(inner_sid)) is None:
            return
        self._exec_seq += 1
        kfile = box.dir / "exec" / f"{os.getpid()}-{self._exec_seq}-kill.json"
        argv = [bundle.BUSYBOX, "sh", "-c", KILL_SESSION_SCRIPT, "stacyvm-kill", str(inner_sid)]
        _write_json(kfile, bundle.process(argv, [f"PATH={bundle.PATH_DEFAULT}"], "/", 0, 0))
        try:
            await self.runtime.exec_quiet(box.sandbox_id, kfile, timeout=10)
        finally:
            kfile.unlink(missing_ok=True)

    # files -----------------------------------------------------------------------
    async def read_file(self, handle: SandboxHandle, path: str) -> AsyncIterator[bytes]:
        fs = self._box(handle).fs
        fd = await asyncio.to_thread(fs.open_read, path)
        try:
            while True:
                chunk = await asyncio.to_thread(os.read, fd, CHUNK)
                if not chunk:
                    break
                yield chunk
        finally:
            os.close(fd)

    async def write_file(
        self, handle: SandboxHandle, path: str, chunks: AsyncIterator[bytes], mode: int = 0o644
    ) -> int:
        fs = self._box(handle).fs
        fd, pfd, tmp, name = await asyncio.to_thread(fs.open_write, path, mode)
        total, ok = 0, False
        try:
            async for chunk in chunks:
                view = memoryview(chunk)
                while view:
                    n = await asyncio.to_thread(os.write, fd, view)
                    view = view[n:]
                    total += n
            ok = True
        except OSError as exc:
            raise SandboxFileError(f"write {path}: {exc.strerror}") from None
        finally:
            await asyncio.to_thread(fs.finish_write, fd, pfd, tmp, name, mode, ok, path)
        return total

    async def list_dir(self, handle: SandboxHandle, path: str) -> list[FileInfo]:
        return await asyncio.to_thread(self._box(handle).fs.list_dir, path)

    async def stat(self, handle: SandboxHandle, path: str) -> FileInfo:
        return await asyncio.to_thread(self._box(handle).fs.stat, path)

    async def move(self, handle: SandboxHandle, src: str, dst: str) -> None:
        await asyncio.to_thread(self._box(handle).fs.move, src, dst)

    async def chmod(self, handle: SandboxHandle, path: str, mode: int) -> None:
        await asyncio.to_thread(self._box(handle).fs.chmod, path, mode)

    async def delete(self, handle: SandboxHandle, path: str, recursive: bool) -> None:
        await asyncio.to_thread(self._box(handle).fs.delete, path, recursive)

    async def glob(self, handle: SandboxHandle, pattern: str) -> list[str]:
        return await asyncio.to_thread(self._box(handle).fs.glob, pattern)

    # observability -----------------------------------------------------------------
    async def stats(self, handle: SandboxHandle) -> SandboxStats:
        sid = handle.sandbox_id
        return SandboxStats(
            cpu_seconds=cgroups.cpu_seconds(sid),
            mem_bytes=cgroups.memory_usage(sid),
            mem_limit_bytes=cgroups.memory_limit(sid),
            pids=cgroups.pids_current(sid),
        )

    async def logs(self, handle: SandboxHandle, lines: int) -> list[str]:
        return await asyncio.to_thread(_tail, self.boxes_dir / handle.sandbox_id / "init.log", lines)


# helpers -----------------------------------------------------------------------------
    # preview -------------------------------------------------------------------------
    async def connect(self, handle: SandboxHandle, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Connect to 127.0.0.1:port inside the sandbox's netns (network.connect_in_netns).

        Works for servers bound to 127.0.0.1 or 0.0.0.0, for "none" and "bridge" alike.
        runsc is the exception: gVisor runs its own network stack (netstack) in the
        Sentry, so its loopback is not the netns's; see docs/preview.md.
        """
        sid = handle.sandbox_id
        path = handle.data.get("netns") or network.netns_path(sid)
        try:
            return await network.connect_in_netns(path, port, sid)
        except FileNotFoundError:
            raise NotFound(f"sandbox {sid} has no network namespace (is it running?)") from None


def _merge_env(*layers: list[str] | dict[str, str]) -> list[str]:
    """Later layers win; PATH gets a default so execs find their programs."""
    env: dict[str, str] = {}
    for layer in layers:
        items = layer.items() if isinstance(layer, dict) else (e.partition("=")[::2] for e in layer)
        for k, v in items:
            if k:
                env[k] = v
    env.setdefault("PATH", bundle.PATH_DEFAULT)
    return [f"{k}={v}" for k, v in env.items()]


def _tmp_bind(rootfs: Path) -> str | None:
    """The merged rootfs's /tmp as a bind source, only if it is a real directory.

    The runtime resolves a bind source on the host, so a /tmp that is a
    symlink (the image's choice) must never become one. Checked before the
    sandbox starts, so nothing inside can swap it.
    """
    import stat

    try:
        st = os.lstat(rootfs / "tmp")
    except OSError:
        return None
    return str(rootfs / "tmp") if stat.S_ISDIR(st.st_mode) else None


def _write_json(path: Path, data: object) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def _init_alive(d: Path) -> bool:
    try:
        pid = int((d / "init.pid").read_text())
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (OSError, ValueError):
        return False
    return stat[stat.rindex(")") + 2] not in "ZX"


def _kill_cgroup(sid: str) -> None:
    kill_until_gone(lambda: cgroups.pids(sid), timeout=1.0)


def _tail(path: Path, lines: int) -> list[str]:
    if lines <= 0:
        return []
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            end = f.tell()
            size = min(end, max(64 * 1024, lines * 256))
            while True:
                f.seek(end - size)
                data = f.read(size)
                if data.count(b"\n") > lines or size == end:
                    break
                size = min(end, size * 4)
    except FileNotFoundError:
        return []
    out = data.decode(errors="replace").splitlines()
    return out[-lines:]


def _write_resolv_conf(fs: SandboxFS) -> None:
    """Copy the host's non-loopback nameservers (loopback ones are unreachable)."""
    try:
        host = Path("/etc/resolv.conf").read_text()
    except OSError:
        return
    servers = [ln for ln in host.splitlines() if ln.startswith("nameserver")
               and ln.split()[1:2] not in (["127.0.0.1"], ["127.0.0.53"], ["::1"])]
    if not servers:
        return
    data = ("\n".join(servers) + "\n").encode()
    try:
        fd, pfd, tmp, name = fs.open_write("/etc/resolv.conf", 0o644)
    except SandboxFileError:
        return
    ok = False
    try:
        os.write(fd, data)
        ok = True
    finally:
        fs.finish_write(fd, pfd, tmp, name, 0o644, ok, "/etc/resolv.conf")
