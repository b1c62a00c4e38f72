"""The sandbox service: the only place that changes sandbox state."""

from __future__ import annotations

import asyncio
import builtins
import codecs
import contextlib
import logging
import shlex
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta
from typing import TypeVar

from stacyvm_server.config import Settings
from stacyvm_server.core.events import EventBus
from stacyvm_server.core.limits import Limits
from stacyvm_server.core.metrics import Metrics
from stacyvm_server.core.models import (
    AdmissionDecision,
    Caller,
    ExecRequest,
    ExecResult,
    Reason,
    Sandbox,
    SpawnRequest,
    State,
    StreamChunk,
    utcnow,
)
from stacyvm_server.core.owners import normalize_owner
from stacyvm_server.durations import format_go_duration
from stacyvm_server.errors import (
    BadRequest,
    Conflict,
    ExecTimeout,
    Forbidden,
    NotFound,
    ProviderError,
    ResourceLimit,
    StacyError,
)
from stacyvm_server.ids import new_sandbox_id, normalize_sandbox_id
from stacyvm_server.providers.base import (
    ExecProcess,
    ExecSpec,
    FileInfo,
    Provider,
    SandboxHandle,
    SandboxSpec,
    SandboxStats,
    StreamName,
)
from stacyvm_server.store.db import Store

log = logging.getLogger("stacyvm.core")
T = TypeVar("T")

_CHUNK = 64 * 1024
# Streamed exec: chunks buffered between the process and a slow client. When full,
# we stop reading the pipes, so the process blocks on write instead of us buffering.
_STREAM_QUEUE = 64


def _truncation_marker(limit: int) -> str:
    return f"\n[stacyvm: output truncated after {limit} bytes]\n"


def parse_mode(mode: str | None, field: str = "mode", default: int = 0o644) -> int:
    if mode is None or mode == "":
        return default
    text = mode.strip()
    try:
        value = int(text, 8)
    except ValueError:
        raise BadRequest(f"{field}: must be an octal permission string like \"0644\"") from None
    if not 0 <= value <= 0o7777:
        raise BadRequest(f"{field}: must be between 0000 and 7777")
    return value


def check_path(path: str | None, field: str = "path") -> str:
    if path is None or not path.strip():
        raise BadRequest(f"{field} is required")
    if "\x00" in path:
        raise BadRequest(f"{field} must not contain NUL bytes")
    if len(path) > 4096:
        raise BadRequest(f"{field} is too long")
    return path


class SandboxService:
    def __init__(
        self,
        settings: Settings,
        store: Store,
        providers: dict[str, Provider],
        events: EventBus,
        metrics: Metrics,
        limits: Limits,
        on_expiry_change: Callable[[], None],
    ) -> None:
        self.settings = settings
        self.store = store
        self.providers = providers
        self.events = events
        self.metrics = metrics
        self.limits = limits
        self._on_expiry_change = on_expiry_change
        self._locks: dict[str, asyncio.Lock] = {}
        # Live records, written through to the store: core is the only writer, and a
        # store read per exec or file call costs about a millisecond.
        self._cache: dict[str, Sandbox] = {}

    # helpers -------------------------------------------------------------------
    def _load(self, sandbox_id: str) -> Sandbox | None:
        sb = self._cache.get(sandbox_id)
        if sb is None:
            sb = self.store.get_sandbox(sandbox_id)
            if sb is not None and sb.state != State.DESTROYED:
                self._cache[sandbox_id] = sb
        return sb

    def save(self, sb: Sandbox) -> None:
        self.store.save_sandbox(sb)
        if sb.state == State.DESTROYED:
            self._cache.pop(sb.id, None)
        else:
            self._cache[sb.id] = sb

    def _lock(self, sandbox_id: str) -> asyncio.Lock:
        return self._locks.setdefault(sandbox_id, asyncio.Lock())

    def provider(self, name: str) -> Provider:
        try:
            return self.providers[name]
        except KeyError:
            raise NotFound(f"provider not found: {name}") from None

    @staticmethod
    def visible(caller: Caller, sb: Sandbox) -> bool:
        if caller.tenant_id is not None and sb.tenant_id != caller.tenant_id:
            return False
        return not (caller.owner_id is not None and sb.owner_id != caller.owner_id)

    def _require_write(self, caller: Caller) -> None:
        if not caller.can_write():
            raise Forbidden("this API key may only read")

    async def _timed(self, op: str, provider: str, fn: Awaitable[T]) -> T:
        start = time.perf_counter()
        try:
            result = await fn
        except BaseException as exc:
            self.metrics.observe(op, provider, time.perf_counter() - start, False, str(exc)[:200])
            raise
        self.metrics.observe(op, provider, time.perf_counter() - start, True)
        return result

    # queries -------------------------------------------------------------------
    async def get(self, caller: Caller, sandbox_id: str) -> Sandbox:
        sid = normalize_sandbox_id(sandbox_id)
        sb = self._load(sid)
        if sb is None or sb.state == State.DESTROYED or not self.visible(caller, sb):
            raise NotFound(f"sandbox {sandbox_id} not found")
        return sb

    async def _running(self, caller: Caller, sandbox_id: str) -> tuple[Sandbox, Provider, SandboxHandle]:
        sb = await self.get(caller, sandbox_id)
        if sb.state != State.RUNNING or sb.handle is None:
            raise Conflict(f"sandbox {sb.id} is {sb.state.value}, not running")
        return sb, self.provider(sb.provider), sb.handle

    async def list(self, caller: Caller) -> list[Sandbox]:
        return [sb for sb in self.store.active_sandboxes() if self.visible(caller, sb)]

    # spawn ---------------------------------------------------------------------
    def _resolve(self, caller: Caller, req: SpawnRequest) -> tuple[Sandbox, dict[str, str]]:
        """Validate a spawn request and build the record (not yet stored)."""
        d = self.settings.defaults
        owner = caller.owner_id if caller.owner_id is not None else normalize_owner(req.owner_id)
        tmpl = self.store.get_template(req.template) if req.template else None
        provider = req.provider or (tmpl.provider if tmpl else "") or d.provider
        self.provider(provider).check_runtime(req.runtime)
        image = req.image or (tmpl.image if tmpl else "") or d.image
        memory = req.memory_mb if req.memory_mb is not None else (tmpl.memory_mb if tmpl else d.memory_mb)
        vcpus = req.vcpus if req.vcpus is not None else (tmpl.vcpus if tmpl else d.vcpus)
        if memory <= 0:
            raise BadRequest("memory_mb must be positive")
        if memory > d.max_memory_mb:
            raise BadRequest(f"memory_mb {memory} exceeds the maximum of {d.max_memory_mb}")
        if vcpus <= 0:
            raise BadRequest("vcpus must be positive")
        if vcpus > d.max_vcpus:
            raise BadRequest(f"vcpus {vcpus} exceeds the maximum of {d.max_vcpus}")
        if req.ttl:
            ttl = self.limits.parse_duration(req.ttl, "ttl")
        elif tmpl:
            ttl = timedelta(seconds=tmpl.ttl_seconds)
        else:
            ttl = self.limits.parse_duration(d.ttl, "ttl")
        self.limits.check_ttl(ttl, owner)
        disk = req.disk_mb if req.disk_mb is not None else d.disk_mb
        if disk < 0:
            raise BadRequest("disk_mb must be positive")
        if disk > d.max_disk_mb:
            raise BadRequest(f"disk_mb {disk} exceeds the maximum of {d.max_disk_mb}")
        self.provider(provider).check_disk(disk or None, req.runtime)
        network = req.network or d.network
        if network not in d.allowed_networks:
            raise BadRequest(f"network {network!r} is not allowed here (allowed: {', '.join(d.allowed_networks)})")
        metadata = dict(req.metadata)
        if tmpl and "template" not in metadata:
            metadata["template"] = tmpl.name
        env = {**(tmpl.env if tmpl else {}), **req.env}
        now = utcnow()
        sb = Sandbox(
            id=new_sandbox_id(),
            provider=provider,
            image=image,
            memory_mb=memory,
            vcpus=vcpus,
            network=network,
            state=State.CREATING,
            created_at=now,
            expires_at=now + ttl,
            owner_id=owner,
            tenant_id=caller.tenant_id,
            metadata=metadata,
            disk_mb=disk or None,
        )
        return sb, env

    async def admission(self, caller: Caller, req: SpawnRequest) -> AdmissionDecision:
        owner = caller.owner_id if caller.owner_id is not None else normalize_owner(req.owner_id)
        max_ttl = self.limits.max_ttl(owner)
        max_ttl_s = format_go_duration(max_ttl) if max_ttl else ""
        max_total = self.settings.defaults.max_sandboxes
        owner_limit = self.limits.max_sandboxes_per_owner(owner)
        if req.ttl:
            ttl = self.limits.parse_duration(req.ttl, "ttl")
            if max_ttl and ttl > max_ttl:
                return AdmissionDecision(False, reason="max_ttl", max_sandboxes=max_total, max_ttl=max_ttl_s)
        active = self.store.count_active()
        owner_active = self.store.count_active(owner) if owner else 0
        reason = ""
        if (req.provider or self.settings.defaults.provider) not in self.providers:
            reason = "provider_unavailable"
        elif max_total and active >= max_total:
            reason = "max_sandboxes"
        elif owner and owner_limit and owner_active >= owner_limit:
            reason = "max_sandboxes_per_owner"
        return AdmissionDecision(
            allowed=not reason,
            queueable=False,
            reason=reason,
            active_sandboxes=active,
            max_sandboxes=max_total,
            active_owner_sandboxes=owner_active,
            max_owner_sandboxes=owner_limit if owner else 0,
            max_ttl=max_ttl_s,
        )

    async def spawn(self, caller: Caller, req: SpawnRequest) -> Sandbox:
        self._require_write(caller)
        sb, env = self._resolve(caller, req)  # runtime checked there (400 before anything is stored)
        denied = self.store.reserve(
            sb, self.settings.defaults.max_sandboxes, self.limits.max_sandboxes_per_owner(sb.owner_id)
        )
        if denied is not None:
            active, _owner_active = denied
            limit = self.settings.defaults.max_sandboxes
            msg = (
                f"max sandboxes reached ({limit})"
                if limit and active >= limit
                else f"max sandboxes per owner reached ({self.limits.max_sandboxes_per_owner(sb.owner_id)})"
            )
            self.events.publish("resource.limit", None, {"operation": "spawn", "provider": sb.provider, "error": msg})
            raise ResourceLimit(msg)
        # Shielded: a client that hangs up mid-create must not leave a half-made sandbox.
        return await asyncio.shield(self._create(sb, env, req.runtime))

    async def _create(self, sb: Sandbox, env: dict[str, str], runtime: str | None = None) -> Sandbox:
        provider = self.provider(sb.provider)
        spec = SandboxSpec(
            sandbox_id=sb.id,
            image=sb.image,
            memory_mb=sb.memory_mb,
            vcpus=sb.vcpus,
            network=sb.network,  # type: ignore[arg-type]
            env=env,
            pids_limit=self.settings.defaults.pids_limit,
            disk_mb=sb.disk_mb,
            labels={"owner": sb.owner_id or "", "expires_at": sb.expires_at.isoformat()},
            runtime=runtime,
        )
        async with self._lock(sb.id):
            self.events.publish("sandbox.created", sb.id)
            try:
                sb.handle = await self._timed("spawn", sb.provider, provider.create(spec))
            except BaseException as exc:
                sb.state = State.DESTROYED
                sb.reason = Reason.STARTUP_FAILED
                sb.error = str(exc)[:1000]
                sb.destroyed_at = utcnow()
                self.save(sb)
                self.events.publish(
                    "provider.failed", sb.id, {"operation": "spawn", "provider": sb.provider, "error": sb.error}
                )
                if isinstance(exc, StacyError | asyncio.CancelledError):
                    raise
                log.exception("spawn of %s failed", sb.id)
                raise ProviderError(f"spawning sandbox failed: {exc}") from exc
            sb.state = State.RUNNING
            self.save(sb)
            self.events.publish("sandbox.running", sb.id)
        self._on_expiry_change()
        return sb

    # destroy -------------------------------------------------------------------
    async def destroy(self, caller: Caller, sandbox_id: str) -> None:
        self._require_write(caller)
        sid = normalize_sandbox_id(sandbox_id)
        sb = self._load(sid)
        if sb is None or not self.visible(caller, sb):
            raise NotFound(f"sandbox {sandbox_id} not found")
        await self.terminate(sb.id, Reason.USER)

    async def terminate(self, sandbox_id: str, reason: Reason) -> bool:
        """Tear a sandbox down for `reason`. Returns False if it was already gone."""
        async with self._lock(sandbox_id):
            sb = self._load(sandbox_id)
            if sb is None or sb.state == State.DESTROYED:
                return False
            sb.state = State.STOPPING
            self.save(sb)
            try:
                if sb.handle is not None and sb.provider in self.providers:
                    await self._timed("destroy", sb.provider, self.providers[sb.provider].destroy(sb.handle))
            except BaseException as exc:
                # Keep the record so the reaper (or a retry) can finish the job: nothing leaks silently.
                sb.state = State.ERROR
                sb.error = f"destroy failed: {exc}"[:1000]
                self.save(sb)
                self.events.publish(
                    "provider.failed", sb.id, {"operation": "destroy", "provider": sb.provider, "error": sb.error}
                )
                if isinstance(exc, StacyError | asyncio.CancelledError):
                    raise
                raise ProviderError(f"destroying sandbox failed: {exc}") from exc
            sb.state = State.DESTROYED
            sb.reason = reason
            sb.destroyed_at = utcnow()
            self.save(sb)
            self.events.publish("sandbox.destroyed", sb.id, {"reason": reason.value})
        self._locks.pop(sandbox_id, None)
        return True

    async def prune(self, caller: Caller) -> int:
        self._require_write(caller)
        count = 0
        for sb in self.store.expired(utcnow()):
            if self.visible(caller, sb) and await self.terminate(sb.id, Reason.TTL):
                count += 1
        return count

    async def extend(self, caller: Caller, sandbox_id: str, ttl: str) -> Sandbox:
        self._require_write(caller)
        if not ttl:
            raise BadRequest("ttl is required")
        delta = self.limits.parse_duration(ttl, "ttl")
        sb = await self.get(caller, sandbox_id)
        self.limits.check_ttl(delta, sb.owner_id)
        async with self._lock(sb.id):
            current = self._load(sb.id)
            if current is None or current.state == State.DESTROYED:
                raise NotFound(f"sandbox {sandbox_id} not found")
            current.expires_at = utcnow() + delta
            self.save(current)
        self._on_expiry_change()
        return current

    async def spawn_template(self, caller: Caller, name: str, provider: str | None, ttl: str | None) -> Sandbox:
        self.store.get_template(name)  # 404 before anything else
        return await self.spawn(caller, SpawnRequest(template=name, provider=provider or None, ttl=ttl or None))

    # exec ----------------------------------------------------------------------
    def _exec_spec(self, sb: Sandbox, req: ExecRequest) -> tuple[ExecSpec, float | None]:
        mode = (req.mode or "shell").strip()
        if mode == "shell":
            script = " ".join([req.command, *(shlex.quote(a) for a in req.args)]) if req.args else req.command
            argv = ["/bin/sh", "-c", script]
        elif mode == "argv":
            if not req.command.strip():
                raise BadRequest("command is required in argv mode")
            argv = [req.command, *req.args]
        else:
            raise BadRequest(f'mode: unsupported exec mode "{req.mode}" (use "shell" or "argv")')
        if "\x00" in "".join(argv):
            raise BadRequest("command must not contain NUL bytes")
        timeout = self.limits.exec_timeout(req.timeout, sb.owner_id)
        if req.workdir is not None:
            check_path(req.workdir, "workdir")
        return ExecSpec(argv=argv, env=dict(req.env), workdir=req.workdir or None), timeout

    async def exec(self, caller: Caller, sandbox_id: str, req: ExecRequest) -> ExecResult:
        self._require_write(caller)
        sb, provider, handle = await self._running(caller, sandbox_id)
        spec, timeout = self._exec_spec(sb, req)
        limit = self.settings.defaults.max_exec_output_bytes
        start = time.perf_counter()
        self.events.publish("exec.started", sb.id)
        proc = await provider.exec(handle, spec)
        bufs: dict[str, bytearray] = {"stdout": bytearray(), "stderr": bytearray()}
        cut = {"stdout": False, "stderr": False}

        async def collect() -> int:
            async for stream, data in proc.output():
                buf = bufs[stream]
                room = limit - len(buf)
                if room > 0:
                    buf += data[:room]
                if len(data) > room:
                    cut[stream] = True  # keep draining so the process is not blocked
            return (await proc.wait()).exit_code

        try:
            async with asyncio.timeout(timeout):  # no extra task per exec, unlike wait_for
                exit_code = await collect()
        except TimeoutError:
            await proc.kill()
            elapsed = time.perf_counter() - start
            self.metrics.observe("exec", sb.provider, elapsed, False, "timeout")
            self.events.publish(
                "exec.timeout", sb.id, {"operation": "exec", "provider": sb.provider, "error": "timeout"}
            )
            raise ExecTimeout(f"exec timeout: {sb.id}") from None
        except BaseException:
            await proc.kill()
            raise
        elapsed = time.perf_counter() - start
        self.metrics.observe("exec", sb.provider, elapsed, True)
        self.events.publish("exec.completed", sb.id, {"exit_code": exit_code})
        out = {
            k: v.decode(errors="replace") + (_truncation_marker(limit) if cut[k] else "") for k, v in bufs.items()
        }
        return ExecResult(exit_code, out["stdout"], out["stderr"], elapsed, truncated=any(cut.values()))

    async def exec_stream(self, caller: Caller, sandbox_id: str, req: ExecRequest) -> AsyncIterator[StreamChunk]:
        self._require_write(caller)
        sb, provider, handle = await self._running(caller, sandbox_id)
        spec, timeout = self._exec_spec(sb, req)
        start = time.perf_counter()
        proc = await provider.exec(handle, spec)
        return self._stream(sb, proc, timeout, req.report_exit, start)

    async def _stream(
        self, sb: Sandbox, proc: ExecProcess, timeout: float | None, report_exit: bool, start: float
    ) -> AsyncIterator[StreamChunk]:
        queue: asyncio.Queue[tuple[StreamName, bytes] | None] = asyncio.Queue(_STREAM_QUEUE)

        async def pump() -> None:
            try:
                async for item in proc.output():
                    await queue.put(item)
            finally:
                await queue.put(None)

        pumper = asyncio.create_task(pump())
        decoders = {s: codecs.getincrementaldecoder("utf-8")(errors="replace") for s in ("stdout", "stderr")}
        deadline = None if timeout is None else time.monotonic() + timeout
        finished = False
        try:
            while True:
                remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
                try:
                    item = await asyncio.wait_for(queue.get(), remaining)
                except TimeoutError:
                    await proc.kill()
                    self.events.publish(
                        "exec.timeout", sb.id, {"operation": "exec_stream", "provider": sb.provider, "error": "timeout"}
                    )
                    self.metrics.observe("exec_stream", sb.provider, time.perf_counter() - start, False, "timeout")
                    yield StreamChunk("stderr", f"exec timeout: {sb.id}")
                    finished = True
                    return
                if item is None:
                    break
                name, data = item
                text = decoders[name].decode(data)
                if text:
                    yield StreamChunk(name, text)
            for key, dec in decoders.items():
                tail = dec.decode(b"", final=True)
                if tail:
                    yield StreamChunk(key, tail)
            status = await proc.wait()
            finished = True
            self.metrics.observe("exec_stream", sb.provider, time.perf_counter() - start, True)
            if report_exit:
                yield StreamChunk("exit", str(status.exit_code))
        finally:
            if not finished:
                await proc.kill()  # the client went away: the process must not outlive the request
            pumper.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await pumper

    # files ---------------------------------------------------------------------
    async def _file_op(
        self, caller: Caller, sandbox_id: str, op: str, write: bool
    ) -> tuple[Sandbox, Provider, SandboxHandle]:
        if write:
            self._require_write(caller)
        return await self._running(caller, sandbox_id)

    async def read_file(self, caller: Caller, sandbox_id: str, path: str) -> AsyncIterator[bytes]:
        check_path(path)
        sb, provider, handle = await self._file_op(caller, sandbox_id, "file_read", False)
        stream = provider.read_file(handle, path)
        # Pull the first chunk now so a missing file is an error response, not a broken body.
        start = time.perf_counter()
        try:
            first = await anext(stream, b"")
        except BaseException as exc:
            self.metrics.observe("file_read", sb.provider, time.perf_counter() - start, False, str(exc)[:200])
            raise
        self.metrics.observe("file_read", sb.provider, time.perf_counter() - start, True)
        self.events.publish("file.read", sb.id)

        async def body() -> AsyncIterator[bytes]:
            try:
                if first:
                    yield first
                async for chunk in stream:
                    yield chunk
            finally:
                await stream.aclose()  # type: ignore[attr-defined]

        return body()

    async def write_file(self, caller: Caller, sandbox_id: str, path: str, data: bytes, mode: str | None) -> None:
        check_path(path)
        perm = parse_mode(mode)
        sb, provider, handle = await self._file_op(caller, sandbox_id, "file_write", True)

        async def chunks() -> AsyncIterator[bytes]:
            view = memoryview(data)
            for i in range(0, len(view), _CHUNK):
                yield bytes(view[i : i + _CHUNK])

        await self._timed("file_write", sb.provider, provider.write_file(handle, path, chunks(), perm))
        self.events.publish("file.written", sb.id)

    async def list_files(self, caller: Caller, sandbox_id: str, path: str) -> builtins.list[FileInfo]:
        check_path(path or "/")
        sb, provider, handle = await self._file_op(caller, sandbox_id, "file_list", False)
        return await self._timed("file_list", sb.provider, provider.list_dir(handle, path or "/"))

    async def stat_file(self, caller: Caller, sandbox_id: str, path: str) -> FileInfo:
        check_path(path)
        sb, provider, handle = await self._file_op(caller, sandbox_id, "file_stat", False)
        return await self._timed("file_stat", sb.provider, provider.stat(handle, path))

    async def glob_files(self, caller: Caller, sandbox_id: str, pattern: str) -> builtins.list[str]:
        check_path(pattern, "pattern")
        sb, provider, handle = await self._file_op(caller, sandbox_id, "file_glob", False)
        return await self._timed("file_glob", sb.provider, provider.glob(handle, pattern))

    async def delete_file(self, caller: Caller, sandbox_id: str, path: str, recursive: bool) -> None:
        check_path(path)
        sb, provider, handle = await self._file_op(caller, sandbox_id, "file_delete", True)
        await self._timed("file_delete", sb.provider, provider.delete(handle, path, recursive))

    async def move_file(self, caller: Caller, sandbox_id: str, old: str, new: str) -> None:
        check_path(old, "old_path")
        check_path(new, "new_path")
        sb, provider, handle = await self._file_op(caller, sandbox_id, "file_move", True)
        await self._timed("file_move", sb.provider, provider.move(handle, old, new))

    async def chmod_file(self, caller: Caller, sandbox_id: str, path: str, mode: str) -> None:
        check_path(path)
        if not mode:
            raise BadRequest("mode is required")
        perm = parse_mode(mode)
        sb, provider, handle = await self._file_op(caller, sandbox_id, "file_chmod", True)
        await self._timed("file_chmod", sb.provider, provider.chmod(handle, path, perm))

    # observability ---------------------------------------------------------------
    async def logs(self, caller: Caller, sandbox_id: str, lines: int) -> builtins.list[str]:
        _sb, provider, handle = await self._running(caller, sandbox_id)
        return await provider.logs(handle, max(1, min(lines, 10_000)))

    async def stats(self, caller: Caller, sandbox_id: str) -> SandboxStats:
        _sb, provider, handle = await self._running(caller, sandbox_id)
        return await provider.stats(handle)
