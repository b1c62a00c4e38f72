"""The docker provider: one container per sandbox through the Docker Engine API.

A sandbox is the container `stacyvm-<sandbox id>`, labelled `stacyvm.sandbox_id`,
`stacyvm.instance` (which server owns it), `stacyvm.runtime` (its OCI runtime:
`docker.runtime`, or one of `docker.allowed_runtimes` a spawn asked for) and
`stacyvm.<label>` for every spec label (`stacyvm.owner`, `stacyvm.expires_at`, ...). Its main process is
`sleep` from our static busybox (bind-mounted read-only at /.stacyvm/busybox)
under Docker's init, so any image works, even one without a shell.
Everything else lives in Docker: no host state of ours per sandbox.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import hashlib
import json
import logging
import os
import posixpath
import tempfile
import time
from collections.abc import AsyncIterator
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

from stacyvm_server.config import Settings
from stacyvm_server.errors import (
    BadRequest,
    ImageError,
    ImageNotFound,
    NotFound,
    ProviderError,
    SandboxFileError,
    Unavailable,
)
from stacyvm_server.providers.base import (
    ExecProcess,
    ExecSpec,
    FileInfo,
    InventoryItem,
    Provider,
    ProviderHealth,
    RuntimeState,
    SandboxHandle,
    SandboxSpec,
    SandboxStats,
)
from stacyvm_server.providers.docker import files, network
from stacyvm_server.providers.docker.client import DockerAPIError, DockerClient, demux_frames
from stacyvm_server.providers.docker.process import (
    EXEC_MARKER,
    DockerExecProcess,
    FailedExec,
    InnerKill,
    InnerSignal,
    resize_exec,
)
from stacyvm_server.providers.native.network import connect_in_netns

log = logging.getLogger(__name__)

LABEL = "stacyvm."
ID_LABEL = "stacyvm.sandbox_id"
INSTANCE_LABEL = "stacyvm.instance"
NETWORK_LABEL = "stacyvm.network_mode"
RUNTIME_LABEL = "stacyvm.runtime"
_INTERNAL = {ID_LABEL, INSTANCE_LABEL, NETWORK_LABEL, RUNTIME_LABEL}
KNOWN_RUNTIMES = ("runc", "crun", "runsc", "kata-runtime")
MAIN_CMD = [files.HELPER, "sleep", "2147483647"]
RW_VOLUMES = ("/tmp", "/workspace")
RUNSC_PIDS_BASE = 64
RUNSC_PIDS_PER_PROCESS = 16  # writable in a read-only root (anonymous volumes)


def disk_quota_support(info: dict[str, Any]) -> str:
    """Why this dockerd cannot cap a container's writable layer (`StorageOpt size`), from
    `GET /info`; "" when its storage driver can (Docker's docs: btrfs, zfs, devicemapper,
    and overlay2 only on xfs mounted with pquota, which dockerd checks at create)."""
    driver = str(info.get("Driver") or "")
    status = {str(k): str(v) for k, v in info.get("DriverStatus") or [] if isinstance(k, str)}
    if driver in ("btrfs", "zfs", "devicemapper"):
        return ""
    if driver == "overlay2":
        backing = status.get("Backing Filesystem", "unknown")
        return "" if backing == "xfs" else f"storage driver overlay2 on {backing} (size limits need xfs with pquota)"
    return f"storage driver {driver or 'unknown'} has no per-container size limit"


def container_name(sandbox_id: str) -> str:
    return f"stacyvm-{sandbox_id}"


def _split_ref(ref: str) -> tuple[str, str]:
    """(fromImage, tag) for the pull API; digests stay in fromImage."""
    if "@" in ref:
        return ref, ""
    name, _, tag = ref.rpartition(":")
    if name and "/" not in tag:
        return name, tag
    return ref, "latest"


# dockerd ends an attached exec when the detach keys pass through its stdin (default
# Ctrl-P Ctrl-Q, two bytes binary stdin or a terminal user types). Docker cannot turn
# detaching off, so this is a 6-byte sequence nobody types and binary data holds with
# a chance of 2^-48 per position.
DETACH_KEYS = "ctrl-@,ctrl-^,ctrl-_,ctrl-@,ctrl-^,ctrl-_"

class DockerProvider(Provider):
    name = "docker"
    capabilities = ("spawn", "exec", "exec_stream", "stdin", "files", "health", "runtime_inventory",
                    "network_none", "network_bridge", "oom_reason")

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.cfg = settings.docker
        self.client = DockerClient(self.cfg.socket)
        # Which server's containers these are: two servers on one dockerd never adopt each other's.
        self.instance = hashlib.sha256(str(settings.server.data_dir.resolve()).encode()).hexdigest()[:16]
        self._pulls: dict[str, asyncio.Future[None]] = {}
        self._ids: dict[str, str] = {}  # sandbox id -> container id
        self._memcg: dict[str, Path | None] = {}
        self.bridge = self.cfg.bridge_name
        self._exec_seq = 0
        # Runtimes a spawn may ask for: docker.runtime plus docker.allowed_runtimes that
        # dockerd has registered (start() drops the others, with a warning).
        self.runtimes: tuple[str, ...] = tuple(dict.fromkeys([self.cfg.runtime, *self.cfg.allowed_runtimes]))
        # Why dockerd cannot cap a container's writable layer ("" when its storage driver can).
        self.disk_quota = "not probed yet (the provider has not started)"

    # provider-wide ---------------------------------------------------------------
    async def start(self) -> None:
        try:
            await self.client.request("GET", "/_ping", timeout=5)
        except ProviderError as exc:
            raise ProviderError(f"docker provider: {exc}. Start dockerd (scripts/setup-docker.sh).") from exc
        info = await self.client.request("GET", "/info")
        self.disk_quota = disk_quota_support(info or {})
        runtimes = set((info or {}).get("Runtimes") or {})
        if self.cfg.runtime not in runtimes:
            raise ProviderError(f"docker provider: runtime {self.cfg.runtime!r} is not registered in dockerd "
                                f"(has {', '.join(sorted(runtimes))}); see /etc/docker/daemon.json")
        missing = [r for r in self.runtimes if r not in runtimes]
        if missing:
            log.warning("docker: allowed_runtimes %s are not registered in dockerd (has %s): spawns asking for "
                        "them are refused", ", ".join(missing), ", ".join(sorted(runtimes)))
            self.runtimes = tuple(r for r in self.runtimes if r in runtimes)
        if "kata-runtime" in self.runtimes:
            log.warning("docker: runtime kata-runtime is untested: kill() of an exec's process tree and "
                        "terminals do not work under it (docs/docker-provider.md)")
        self.bridge = await network.ensure_network(self.client, self.cfg)
        await network.ensure_firewall(self.bridge)

    async def close(self) -> None:
        await self.client.close()

    def describe(self) -> dict[str, str]:
        c = self.cfg
        return {"type": self.name, "socket": c.socket, "runtime": c.runtime,
                "allowed_runtimes": ",".join(self.runtimes), "network": c.network,
                "subnet": c.subnet, "allow_inter_sandbox": str(c.allow_inter_sandbox).lower(),
                "readonly_rootfs": str(c.readonly_rootfs).lower()}

    async def health(self) -> ProviderHealth:
        t0 = time.perf_counter()
        try:
            await self.client.request("GET", "/_ping", timeout=5)
        except ProviderError as exc:
            return ProviderHealth(False, str(exc), (time.perf_counter() - t0) * 1000)
        return ProviderHealth(True, None, (time.perf_counter() - t0) * 1000)

    def check_runtime(self, runtime: str | None) -> None:
        if runtime is None or runtime in self.runtimes:
            return
        allowed = ", ".join(self.runtimes)
        if runtime not in KNOWN_RUNTIMES:
            raise BadRequest(f"runtime {runtime!r} is unknown (known: {', '.join(KNOWN_RUNTIMES)}; "
                             f"allowed here: {allowed})")
        if runtime in self.cfg.allowed_runtimes:
            raise BadRequest(f"runtime {runtime!r} is allowed by docker.allowed_runtimes but not registered "
                             f"in dockerd (allowed here: {allowed})")
        raise BadRequest(f"runtime {runtime!r} is not allowed here (allowed: {allowed}; an operator adds "
                         f"runtimes with docker.allowed_runtimes)")

    def check_disk(self, disk_mb: int | None, runtime: str | None) -> None:
        if disk_mb is None:
            return
        if self.disk_quota:
            raise BadRequest(f"disk_mb cannot be enforced by this docker host: {self.disk_quota} (use the "
                             f"native or microvm provider for a disk cap, or leave disk_mb out)")
        if self.cfg.readonly_rootfs or (runtime or self.cfg.runtime) == "runsc":
            raise BadRequest("disk_mb cannot be enforced here: the sandbox's writable volumes (read-only root, "
                             "or runsc's /tmp) are outside Docker's per-container size limit")

    def _runtime(self, handle: SandboxHandle) -> str:
        """The sandbox's OCI runtime (handles made before per-spawn runtimes: docker.runtime)."""
        return handle.data.get("runtime") or self.cfg.runtime

    # images ------------------------------------------------------------------------
    async def ensure_image(self, ref: str) -> str:
        """The image (after `images.aliases`) present in dockerd, pulled when missing."""
        ref = self.settings.images.aliases.get(ref, ref)
        await self._ensure_pulled(ref)
        return ref

    async def _ensure_pulled(self, ref: str) -> None:
        if await self.client.request("GET", f"/images/{ref}/json", ok=(404,)) is not None:
            return
        fut = self._pulls.get(ref)
        if fut is None:
            fut = asyncio.get_running_loop().create_future()
            self._pulls[ref] = fut
            try:
                await self._pull(ref)
            except asyncio.CancelledError:
                fut.cancel()
                raise
            except BaseException as exc:
                fut.set_exception(exc)
                fut.exception()  # the waiters re-raise it; nobody else has to
                raise
            else:
                fut.set_result(None)
            finally:
                self._pulls.pop(ref, None)
        else:
            await asyncio.shield(fut)

    async def _pull(self, ref: str) -> None:
        image, tag = _split_ref(ref)
        params = {"fromImage": image, **({"tag": tag} if tag else {})}
        t0 = time.monotonic()
        log.info("docker: pulling %s", ref)
        last_status = ""
        try:
            async with self.client.stream("POST", "/images/create", params=params,
                                          timeout=self.cfg.pull_timeout) as resp:
                async for line in resp.aiter_lines():
                    if not line.strip():
                        continue
                    try:
                        msg = json.loads(line)
                    except ValueError:
                        continue
                    if "error" in msg:
                        raise _image_error(ref, str(msg.get("error")))
                    status = str(msg.get("status", ""))
                    if status != last_status and "progress" not in msg:
                        log.info("docker: pull %s: %s %s", ref, msg.get("id", ""), status)
                        last_status = status
        except DockerAPIError as exc:
            raise _image_error(ref, exc.docker_message) from None
        log.info("docker: pulled %s in %.1f s", ref, time.monotonic() - t0)

    # lifecycle -------------------------------------------------------------------
    def _container_body(self, spec: SandboxSpec, image: str, runtime: str) -> dict[str, Any]:
        c = self.cfg
        labels = {ID_LABEL: spec.sandbox_id, INSTANCE_LABEL: self.instance, NETWORK_LABEL: spec.network,
                  RUNTIME_LABEL: runtime}
        labels.update({LABEL + k: v for k, v in spec.labels.items() if LABEL + k not in _INTERNAL})
        mem = spec.memory_mb * 1024 * 1024
        host: dict[str, Any] = {
            "NetworkMode": c.network if spec.network == "bridge" else "none",
            "Runtime": runtime,
            "Init": True,  # docker-init (tini) as PID 1 reaps orphans of execs
            # Security: no capabilities but a documented minimal set (docs/docker-provider.md),
            # no setuid gains, Docker's default seccomp profile (never "unconfined").
            "CapDrop": ["ALL"],
            "CapAdd": list(c.cap_add),
            "SecurityOpt": ["no-new-privileges:true"],
            "Privileged": False,
            "Memory": mem,
            "MemorySwap": mem,  # no swap on top of the limit
            "NanoCpus": spec.vcpus * 1_000_000_000,
            "PidsLimit": self._host_pids_limit(spec.pids_limit, runtime),
            "ReadonlyRootfs": c.readonly_rootfs,
            "Mounts": [{"Type": "bind", "Source": c.helper_busybox, "Target": files.HELPER, "ReadOnly": True}],
            "LogConfig": {"Type": "json-file", "Config": {"max-size": "10m", "max-file": "1"}},
            "RestartPolicy": {"Name": "no"},
        }
        if spec.disk_mb:
            host["StorageOpt"] = {"size": f"{spec.disk_mb}m"}  # admitted by check_disk
        body: dict[str, Any] = {
            "Image": image,
            "Entrypoint": MAIN_CMD[:1],
            "Cmd": MAIN_CMD[1:],
            "Env": [f"{k}={v}" for k, v in spec.env.items()],
            "Hostname": spec.sandbox_id[:63],
            "Labels": labels,
            "HostConfig": host,
            "AttachStdin": False, "AttachStdout": False, "AttachStderr": False, "Tty": False,
            "NetworkDisabled": spec.network == "none",
        }
        if c.readonly_rootfs:
            body["Volumes"] = {v: {} for v in RW_VOLUMES}
        elif runtime == "runsc":
            # runsc mounts a tmpfs of its own on /tmp when nothing is mounted there:
            # invisible to the archive API, and gVisor 2022 resolves paths that reach
            # it through a symlink to "/" wrongly. A volume is a real directory.
            body["Volumes"] = {"/tmp": {}}
        return body

    @staticmethod
    def _host_pids_limit(pids_limit: int, runtime: str) -> int:
        """runsc: the cgroup counts the Sentry's threads and ptrace stubs, not the
        application's processes (about 40 idle, about 15 per running process); the
        budget scales with pids_limit as in the native provider, and a sandbox that
        exhausts it dies as a whole."""
        if runtime == "runsc":
            return RUNSC_PIDS_BASE + RUNSC_PIDS_PER_PROCESS * pids_limit
        return pids_limit

    async def create(self, spec: SandboxSpec) -> SandboxHandle:
        sid = spec.sandbox_id
        if spec.memory_mb < 6 or spec.vcpus < 1 or spec.pids_limit < 8:
            raise BadRequest("memory_mb >= 6, vcpus >= 1 and pids_limit >= 8 are required")
        self.check_runtime(spec.runtime)
        runtime = spec.runtime or self.cfg.runtime
        image = self.settings.images.aliases.get(spec.image, spec.image)
        name = container_name(sid)
        handle = SandboxHandle(sid, self.name, {"container": name, "network": spec.network, "runtime": runtime})
        body = self._container_body(spec, image, runtime)
        # No image check first: `containers/create` says "No such image" itself (as `docker
        # run` relies on), so a cached image costs no extra round trip; a missing one is
        # pulled (once for concurrent spawns) and the create is sent again.
        created = await self._create_container(spec, body, pull=True)
        if created is None:
            await self._ensure_pulled(image)
            created = await self._create_container(spec, body, pull=False)
        assert created is not None
        handle.data["id"] = created["Id"]
        try:
            await self.client.request("POST", f"/containers/{created['Id']}/start", timeout=120)
        except BaseException:
            await self._remove(created["Id"])
            raise
        self._ids[sid] = created["Id"]
        return handle

    async def _create_container(self, spec: SandboxSpec, body: dict[str, Any], pull: bool) -> dict[str, Any] | None:
        """`POST /containers/create`; None when the image is missing and `pull` allows pulling it."""
        try:
            created: dict[str, Any] = await self.client.request(
                "POST", "/containers/create", params={"name": container_name(spec.sandbox_id)}, body=body)
        except DockerAPIError as exc:
            if exc.http_status == 409:
                raise ProviderError(f"sandbox {spec.sandbox_id} already exists on this docker host") from None
            if exc.http_status == 404:
                if pull and "no such image" in exc.docker_message.lower():
                    return None
                raise ImageNotFound(f"image {spec.image}: {exc.docker_message}") from None
            if "storage-opt" in exc.docker_message.lower():  # e.g. overlay2 on xfs without pquota
                raise BadRequest(f"disk_mb cannot be enforced by this docker host: {exc.docker_message}") from None
            raise
        return created

    async def _remove(self, ref: str) -> None:
        await self.client.request("DELETE", f"/containers/{ref}", params={"force": "1", "v": "1"},
                                  timeout=120, ok=(404,))

    async def destroy(self, handle: SandboxHandle) -> None:
        try:
            await self._remove(handle.data.get("id") or container_name(handle.sandbox_id))
        except DockerAPIError as exc:
            if exc.http_status != 409 or "already in progress" not in exc.docker_message:
                raise
            await self._wait_gone(handle)
        self._ids.pop(handle.sandbox_id, None)
        self._memcg.pop(handle.sandbox_id, None)

    async def _wait_gone(self, handle: SandboxHandle) -> None:
        for _ in range(600):
            if await self.client.request("GET", f"/containers/{container_name(handle.sandbox_id)}/json",
                                         ok=(404,)) is None:
                return
            await asyncio.sleep(0.1)
        raise ProviderError(f"destroy {handle.sandbox_id}: container still present after 60 s")

    async def _inspect(self, handle: SandboxHandle) -> dict[str, Any] | None:
        ref = handle.data.get("id") or container_name(handle.sandbox_id)
        data = await self.client.request("GET", f"/containers/{ref}/json", ok=(404,))
        return data if isinstance(data, dict) else None

    async def state(self, handle: SandboxHandle) -> RuntimeState:
        data = await self._inspect(handle)
        if data is None:
            return RuntimeState(False, None)
        st = data.get("State") or {}
        if st.get("Running"):
            return RuntimeState(True)
        return RuntimeState(False, "oom" if st.get("OOMKilled") else "crashed")

    async def inventory(self) -> list[InventoryItem]:
        filters = json.dumps({"label": [ID_LABEL, f"{INSTANCE_LABEL}={self.instance}"]})
        items = []
        for c in await self.client.request("GET", "/containers/json", params={"all": "1", "filters": filters}):
            labels = c.get("Labels") or {}
            sid = labels.get(ID_LABEL)
            if not sid:
                continue
            user_labels = {k[len(LABEL):]: v for k, v in labels.items()
                           if k.startswith(LABEL) and k not in _INTERNAL}
            data = {"container": container_name(sid), "id": c["Id"],
                    "network": labels.get(NETWORK_LABEL, "none"),
                    "runtime": labels.get(RUNTIME_LABEL) or self.cfg.runtime}
            items.append(InventoryItem(sid, c.get("State") == "running",
                                       SandboxHandle(sid, self.name, data), user_labels))
        return sorted(items, key=lambda i: i.sandbox_id)

    # exec ------------------------------------------------------------------------
    async def _container_id(self, handle: SandboxHandle) -> str:
        cid = handle.data.get("id") or self._ids.get(handle.sandbox_id)
        if cid:
            return cid
        data = await self._inspect(handle)
        if data is None:
            raise ProviderError(f"sandbox {handle.sandbox_id} not found on this docker host")
        self._ids[handle.sandbox_id] = data["Id"]
        return str(data["Id"])

    async def _exec_create(self, cid: str, spec: ExecSpec) -> str | None:
        """The exec's id, or None when the container is not running."""
        # Tty: one raw stream, the process's stdio is a pty (runc makes it the controlling
        # terminal of the exec's session). ConsoleSize needs API 1.42: sized after start.
        body = {"AttachStdin": spec.stdin, "AttachStdout": True, "AttachStderr": True, "Tty": spec.tty,
                "Cmd": list(spec.argv), "Env": [f"{k}={v}" for k, v in spec.env.items()],
                "WorkingDir": spec.workdir or "", "User": spec.user or "", "Privileged": False,
                "DetachKeys": DETACH_KEYS}
        try:
            created = await self.client.request("POST", f"/containers/{cid}/exec", body=body)
        except DockerAPIError as exc:
            if exc.http_status == 409:
                return None
            if exc.http_status == 404:
                raise ProviderError(f"sandbox not found on this docker host: {exc.docker_message}") from None
            raise
        return str(created["Id"])

    async def exec(self, handle: SandboxHandle, spec: ExecSpec) -> ExecProcess:
        if not spec.argv:
            raise BadRequest("argv must not be empty")
        runtime = self._runtime(handle)
        if spec.tty and runtime not in ("runc", "crun", "runsc"):
            # Tested with runc, crun and runsc; kata is not installed here (docs/docker-provider.md).
            raise BadRequest(f"terminal execs through docker need runc, crun or runsc (this sandbox runs "
                             f"{runtime})")
        cid = await self._container_id(handle)
        marker = None
        inner_kill = inner_signal = None
        if runtime in ("crun", "runsc"):
            # Neither gives the host the exec's session (crun leaves its processes in the
            # shim's session, gVisor keeps them inside the Sentry): mark them, so kill and
            # signal can find them (process.kill_marked, files.INNER_KILL_SCRIPT).
            self._exec_seq += 1
            marker = f"{os.getpid()}-{self._exec_seq}"
            spec = dataclasses.replace(spec, env={**spec.env, EXEC_MARKER: marker})
            if runtime == "runsc":
                inner_kill, inner_signal = self._inner_controls(handle, marker)

        exec_id = await self._exec_create(cid, spec)
        if exec_id is None:
            return FailedExec(f"sandbox {handle.sandbox_id} is not running")
        memcg = await self._memory_cgroup(handle, cid)
        oom_before = _oom_kills(memcg)
        stream = await self.client.exec_start(exec_id, tty=spec.tty)
        if spec.tty:
            rows, cols = spec.tty_size or (24, 80)
            try:
                await resize_exec(self.client, exec_id, rows, cols, tries=10)
            except BaseException:
                stream.close()
                raise

        async def exit_reason(code: int) -> str | None:
            if code == 137 and memcg is not None and _oom_kills(memcg) > oom_before:
                return "oom"
            if runtime == "runsc" and code in (128, 137):
                # gVisor: an OOM (or the pids budget) ends the whole sandbox; the exec then
                # reports 128 (runsc lost the sandbox) at once, while dockerd may still list
                # the container as running for a moment. After a 128, wait for dockerd to see
                # it stop, so the reason and what state() says next are the end's; a 137 is
                # usually a process killed in a live sandbox, checked once.
                for _ in range(60 if code == 128 else 1):
                    st = await self.state(handle)
                    if not st.alive:
                        return "oom" if st.reason == "oom" else None
                    await asyncio.sleep(0.05)
            return None

        return DockerExecProcess(self.client, exec_id, stream, cid, exit_reason, spec.stdin, inner_kill,
                                 inner_signal, watch_exit=runtime == "runsc", tty=spec.tty,
                                 marker=marker if runtime == "crun" else None)

    def _inner_controls(self, handle: SandboxHandle, marker: str) -> tuple[InnerKill, InnerSignal]:
        """runsc: kill() and signal() of the exec marked `marker`, run inside the sandbox."""

        async def kill() -> None:
            if not (await self.state(handle)).alive:
                return  # the sandbox ended, and its processes with it
            rc, _, err = await self._helper(handle, files.INNER_KILL_SCRIPT, marker)
            if rc != 0:
                raise ProviderError(f"kill inside the sandbox failed ({rc}): {err[-300:]!r}")

        async def signal(sig: int) -> None:
            rc, _, err = await self._helper(handle, files.INNER_SIGNAL_SCRIPT, marker, str(sig))
            if rc != 0:
                raise ProviderError(f"signal inside the sandbox failed ({rc}): {err[-300:]!r}")

        return kill, signal

    async def _memory_cgroup(self, handle: SandboxHandle, cid: str) -> Path | None:
        """The container's memory cgroup dir on this host (None if unknown), for OOM accounting."""
        sid = handle.sandbox_id
        if sid not in self._memcg:
            # Docker's own cgroup paths first (a stat, no round trip); the init pid's
            # cgroup (from an inspect) when dockerd runs with another cgroup parent.
            memcg = _docker_memcg(cid)
            if memcg is None:
                data = await self._inspect(handle)
                pid = int(((data or {}).get("State") or {}).get("Pid") or 0)
                memcg = await asyncio.to_thread(_find_memcg, pid) if pid else None
            self._memcg[sid] = memcg
        return self._memcg[sid]

    async def _helper(self, handle: SandboxHandle, script: str, *args: str) -> tuple[int, bytes, bytes]:
        """Run a busybox script inside the sandbox as root; (rc, stdout, stderr)."""
        proc = await self.exec(handle, ExecSpec(argv=[files.HELPER, "sh", "-c", script, "stacyvm", *args],
                                                user="0:0", workdir="/"))
        out, err = bytearray(), bytearray()
        async for name, chunk in proc.output():
            (out if name == "stdout" else err).extend(chunk)
        status = await proc.wait()
        return status.exit_code, bytes(out), bytes(err)

    async def _helper_checked(self, handle: SandboxHandle, script: str, *args: str) -> bytes:
        rc, out, err = await self._helper(handle, script, *args)
        if rc != 0:
            msg = err.decode(errors="replace").strip().splitlines()
            raise SandboxFileError(msg[-1] if msg else f"file operation failed ({rc})")
        return out

    # files -----------------------------------------------------------------------
    async def _path_stat(self, cid: str, path: str) -> dict[str, object] | None:
        resp = await self.client.head(f"/containers/{cid}/archive", params={"path": path})
        if resp.status_code == 404:
            return None
        if resp.status_code >= 400:
            raise SandboxFileError(f"{path}: docker archive API {resp.status_code}")
        header = resp.headers.get("X-Docker-Container-Path-Stat")
        if not header:
            raise ProviderError("docker archive API returned no path stat")
        return files.parse_path_stat(header)

    async def _resolve(self, cid: str, path: str) -> tuple[str, dict[str, object]]:
        """Follow symlinks (resolved by Docker inside the container) to what they point at."""
        for _ in range(40):
            st = await self._path_stat(cid, path)
            if st is None:
                raise SandboxFileError(f"no such file or directory: {path}")
            if not files.is_symlink(st):
                return path, st
            path = str(st.get("linkTarget") or "")
            if not path.startswith("/"):
                raise SandboxFileError(f"cannot resolve symlink {path!r}")
        raise SandboxFileError(f"too many levels of symbolic links: {path}")

    async def read_file(self, handle: SandboxHandle, path: str) -> AsyncIterator[bytes]:
        cid = await self._container_id(handle)
        real, st = await self._resolve(cid, files.norm(path))
        if files.is_dir(st):
            raise SandboxFileError(f"is a directory: {path}")
        if not files.is_regular(st):
            raise SandboxFileError(f"not a regular file: {path}")
        async with self.client.stream("GET", f"/containers/{cid}/archive", params={"path": real}) as resp:
            async for chunk in files.first_file(resp.aiter_raw(files.CHUNK)):
                yield chunk

    async def write_file(
        self, handle: SandboxHandle, path: str, chunks: AsyncIterator[bytes], mode: int = 0o644
    ) -> int:
        p = files.norm(path)
        parent, name = posixpath.split(p)
        if not name:
            raise SandboxFileError(f"not a file path: {path}")
        if self._runtime(handle) == "runsc":
            return await self._write_via_exec(handle, p, chunks, mode)
        cid = await self._container_id(handle)
        # The deepest existing ancestor; the tar creates the missing directories below it.
        missing: list[str] = []
        base = parent
        while True:
            st = await self._path_stat(cid, base)
            if st is not None:
                if files.is_symlink(st):
                    _, st = await self._resolve(cid, base)
                if not files.is_dir(st):
                    raise SandboxFileError(f"not a directory: {base}")
                break
            base, part = posixpath.split(base)
            missing.insert(0, part)
        rel_dirs = [posixpath.join(*missing[: i + 1]) for i in range(len(missing))]
        with tempfile.TemporaryFile(prefix="stacyvm-upload-") as spool:
            size = 0
            async for chunk in chunks:
                await asyncio.to_thread(spool.write, chunk)
                size += len(chunk)
            await asyncio.to_thread(spool.flush)
            member = posixpath.join(*missing, name) if missing else name
            body = files.tar_stream(rel_dirs, member, spool, size, mode & 0o7777)
            try:
                async with self.client.stream("PUT", f"/containers/{cid}/archive",
                                              params={"path": base, "noOverwriteDirNonDir": "true"},
                                              content=body, headers={"Content-Type": "application/x-tar"},
                                              timeout=600):
                    pass
            except DockerAPIError as exc:
                raise SandboxFileError(f"write {path}: {exc.docker_message}") from None
        return size

    async def _write_via_exec(self, handle: SandboxHandle, path: str, chunks: AsyncIterator[bytes],
                              mode: int) -> int:
        proc = await self.exec(handle, ExecSpec(argv=[files.HELPER, "sh", "-c", files.WRITE_SCRIPT, "stacyvm",
                                                      path, f"{mode & 0o7777:o}"],
                                                user="0:0", workdir="/", stdin=True))
        err = bytearray()

        async def drain() -> None:
            async for name, chunk in proc.output():
                if name == "stderr":
                    err.extend(chunk[:4096])

        drainer = asyncio.create_task(drain())
        size = 0
        try:
            async for chunk in chunks:
                await proc.write_stdin(chunk)
                size += len(chunk)
        except ProviderError:
            pass  # the script gave up early; its stderr says why
        finally:
            await proc.close_stdin()
            await drainer
        status = await proc.wait()
        if status.exit_code != 0:
            msg = err.decode(errors="replace").strip().splitlines()
            raise SandboxFileError(msg[-1] if msg else f"write {path} failed ({status.exit_code})")
        return size

    async def list_dir(self, handle: SandboxHandle, path: str) -> list[FileInfo]:
        p = files.norm(path)
        return files.parse_listing(p, await self._helper_checked(handle, files.LIST_SCRIPT, p))

    async def stat(self, handle: SandboxHandle, path: str) -> FileInfo:
        p = files.norm(path)
        st = await self._path_stat(await self._container_id(handle), p)
        if st is None:
            raise SandboxFileError(f"no such file or directory: {path}")
        return files.info_from_stat(p, st)

    async def move(self, handle: SandboxHandle, src: str, dst: str) -> None:
        await self._helper_checked(handle, files.MOVE_SCRIPT, files.norm(src), files.norm(dst))

    async def chmod(self, handle: SandboxHandle, path: str, mode: int) -> None:
        await self._helper_checked(handle, files.CHMOD_SCRIPT, f"{mode & 0o7777:o}", files.norm(path))

    async def delete(self, handle: SandboxHandle, path: str, recursive: bool) -> None:
        await self._helper_checked(handle, files.DELETE_SCRIPT, files.norm(path), "1" if recursive else "0")

    async def glob(self, handle: SandboxHandle, pattern: str) -> list[str]:
        """Shell-style glob (`*`, `?`, `[..]` per component; no `**`), hidden names only when asked."""
        parts = [x for x in files.norm(pattern).split("/") if x]
        current = ["/"]
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            nxt: list[str] = []
            for d in current:
                try:
                    entries = await self.list_dir(handle, d)
                except SandboxFileError:
                    continue
                for e in entries:
                    base = posixpath.basename(e.path)
                    if base.startswith(".") and not part.startswith("."):
                        continue
                    if fnmatchcase(base, part) and (last or e.is_dir or e.is_symlink):
                        nxt.append(e.path)
            current = nxt
        return sorted(current)

    # observability -----------------------------------------------------------------
    async def stats(self, handle: SandboxHandle) -> SandboxStats:
        cid = await self._container_id(handle)
        try:
            s = await self.client.request("GET", f"/containers/{cid}/stats",
                                          params={"stream": "false", "one-shot": "true"}, timeout=30)
        except DockerAPIError as exc:
            raise ProviderError(f"stats {handle.sandbox_id}: {exc.docker_message}") from None
        cpu = ((s.get("cpu_stats") or {}).get("cpu_usage") or {}).get("total_usage") or 0
        mem = s.get("memory_stats") or {}
        return SandboxStats(cpu_seconds=cpu / 1e9, mem_bytes=int(mem.get("usage") or 0),
                            mem_limit_bytes=int(mem.get("limit") or 0),
                            pids=int((s.get("pids_stats") or {}).get("current") or 0))

    async def logs(self, handle: SandboxHandle, lines: int) -> list[str]:
        if lines <= 0:
            return []
        cid = await self._container_id(handle)
        raw = await self.client.request("GET", f"/containers/{cid}/logs",
                                        params={"stdout": "1", "stderr": "1", "tail": str(lines)}, timeout=30)
        if not raw:
            return []
        data = raw if isinstance(raw, bytes) else json.dumps(raw).encode()
        text = b"".join(chunk for _, chunk in demux_frames(data)).decode(errors="replace")
        return text.splitlines()[-lines:]

    # preview -------------------------------------------------------------------
    _runsc_hostnet: bool | None = None  # runsc runs with --network=host (from /info, once)

    async def connect(self, handle: SandboxHandle, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Connect to 127.0.0.1:port inside the container's netns, as the native provider does.

        The netns is /proc/<State.Pid>/ns/net of the container's init; a socket made
        there by a short-lived thread (native.network.connect_in_netns) reaches servers
        bound to 127.0.0.1 or 0.0.0.0, for network none and bridge, without NAT.
        runsc: only with --network=host in dockerd's runtimeArgs (gVisor then uses the
        netns's kernel stack; with its own netstack the sandbox's loopback is out of
        reach), and only for network bridge: with network none docker leaves `lo` down,
        so the sandbox has no loopback at all. Both cases answer 503 (docs/preview.md).
        """
        sid = handle.sandbox_id
        if self._runtime(handle) == "runsc":
            if self._runsc_hostnet is None:
                info = await self.client.request("GET", "/info")
                args = (((info or {}).get("Runtimes") or {}).get("runsc") or {}).get("runtimeArgs") or []
                self._runsc_hostnet = "--network=host" in args
            if not self._runsc_hostnet:
                raise Unavailable("preview is not supported under runsc with gVisor's own network stack: "
                                  "its loopback cannot be reached from the host; register runsc in dockerd "
                                  "with --network=host (docs/preview.md)")
        data = await self._inspect(handle)
        pid = int(((data or {}).get("State") or {}).get("Pid") or 0)
        if pid <= 0:
            raise NotFound(f"sandbox {sid} has no running container (is it running?)")
        try:
            return await connect_in_netns(f"/proc/{pid}/ns/net", port, sid)
        except FileNotFoundError:
            raise NotFound(f"sandbox {sid} has no running container (is it running?)") from None
        except OSError as exc:
            if exc.errno != errno.ENETUNREACH:
                raise
            raise Unavailable(f"sandbox {sid} has no loopback network (runsc with network none leaves lo "
                              "down): preview needs network bridge here (docs/preview.md)") from None

def _image_error(ref: str, message: str) -> ImageError:
    low = message.lower()
    if any(s in low for s in ("not found", "manifest unknown", "does not exist", "no such image")):
        return ImageNotFound(f"image {ref} not found: {message}")
    return ImageError(f"cannot pull image {ref}: {message}")


def _docker_memcg(cid: str) -> Path | None:
    """The memory cgroup Docker makes for container `cid` with the default cgroup parent:
    cgroupfs or systemd driver, cgroup v1 or v2."""
    for d in (Path("/sys/fs/cgroup/memory/docker") / cid,
              Path("/sys/fs/cgroup/memory/system.slice") / f"docker-{cid}.scope"):
        if (d / "memory.oom_control").exists():
            return d
    for d in (Path("/sys/fs/cgroup/docker") / cid, Path("/sys/fs/cgroup/system.slice") / f"docker-{cid}.scope"):
        if (d / "memory.events").exists():
            return d
    return None


def _find_memcg(pid: int) -> Path | None:
    """The memory cgroup directory of a host pid: cgroup v1 `memory` or the v2 unified dir."""
    try:
        lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            d = Path("/sys/fs/cgroup/memory") / path.lstrip("/")
            return d if d.is_dir() else None
    for line in lines:
        if line.startswith("0::"):
            d = Path("/sys/fs/cgroup") / line[3:].lstrip("/")
            return d if (d / "memory.events").exists() else None
    return None


def _oom_kills(memcg: Path | None) -> int:
    if memcg is None:
        return 0
    for fname in ("memory.oom_control", "memory.events"):
        with contextlib.suppress(OSError):
            for line in (memcg / fname).read_text().splitlines():
                if line.startswith("oom_kill "):
                    return int(line.split()[1])
    return 0
