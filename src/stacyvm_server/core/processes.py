"""Background processes: commands that run detached in a sandbox and can be revisited.

A process is started by one request and lives on its own: a pump task drains its
output into a bounded `OutputRing` (so the process never blocks on a slow or
absent reader) and records its exit. Any later request, from any connection, can
list it, read or follow its logs, write its stdin, signal or kill it.

Scoping: a process belongs to its sandbox, and every call goes through
`SandboxService.get`/`_running` first, so owners and tenants see only the
processes of sandboxes they can see (404 otherwise). Processes die with their
sandbox: when it is destroyed they are killed and forgotten. They are kept in
memory only; a server restart forgets them (and kills them at shutdown).

Limits: `MAX_PER_SANDBOX` live processes per sandbox; up to `KEEP_EXITED`
finished ones are kept for their logs and exit status (oldest forgotten first).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import signal as signals
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from stacyvm_server.core.exec_tokens import ExecTokens
from stacyvm_server.core.models import Caller, ExecRequest, utcnow
from stacyvm_server.core.ring import OutputRing, Slice
from stacyvm_server.errors import BadRequest, Conflict, NotFound, ResourceLimit
from stacyvm_server.ids import new_id
from stacyvm_server.providers.base import ExecProcess

if TYPE_CHECKING:
    from stacyvm_server.core.events import EventBus
    from stacyvm_server.core.sandboxes import SandboxService

log = logging.getLogger("stacyvm.processes")

RING_BYTES = 1024 * 1024  # output kept per process
MAX_PER_SANDBOX = 32  # running at once
KEEP_EXITED = 32  # finished processes remembered per sandbox
MAX_TTY = 1000  # rows/cols ceiling


def parse_signal(value: str | int) -> int:
    """`"TERM"`, `"SIGTERM"`, `"15"` or 15 -> 15; anything else is a 400."""
    if isinstance(value, bool):
        raise BadRequest("signal: expected a name like SIGTERM or a number")
    if isinstance(value, int) or (isinstance(value, str) and value.strip().isdigit()):
        num = int(value)
        if not 1 <= num <= 64:
            raise BadRequest(f"signal: {num} is not a valid signal number")
        return num
    name = str(value).strip().upper()
    if not name.startswith("SIG"):
        name = "SIG" + name
    try:
        return int(signals.Signals[name])
    except KeyError:
        raise BadRequest(f"signal: unknown signal {value!r}") from None


def check_tty_size(rows: int | None, cols: int | None) -> tuple[int, int] | None:
    if rows is None and cols is None:
        return None
    r, c = rows or 24, cols or 80
    if not (0 < r <= MAX_TTY and 0 < c <= MAX_TTY):
        raise BadRequest(f"rows and cols must be between 1 and {MAX_TTY}")
    return r, c


@dataclass(frozen=True)
class StartRequest:
    exec: ExecRequest
    stdin: bool = False
    tty: bool = False
    rows: int | None = None
    cols: int | None = None


@dataclass
class Process:
    id: str
    sandbox_id: str
    command: str
    args: list[str]
    mode: str
    tty: bool
    stdin: bool
    started_at: datetime
    proc: ExecProcess
    ring: OutputRing
    timeout: float | None = None
    ended_at: datetime | None = None
    exit_code: int | None = None
    signal: int | None = None
    reason: str | None = None
    stdin_closed: bool = False
    task: asyncio.Task[None] | None = field(default=None, repr=False)

    @property
    def running(self) -> bool:
        return self.ended_at is None

    @property
    def status(self) -> str:
        return "running" if self.running else "exited"


class ProcessService:
    def __init__(
        self, sandboxes: SandboxService, events: EventBus, data_dir: Path, ring_bytes: int = RING_BYTES
    ) -> None:
        self.sandboxes = sandboxes
        self.tokens = ExecTokens(data_dir)  # for browsers opening the exec WebSocket
        self.events = events
        self.ring_bytes = ring_bytes
        self._by_sandbox: dict[str, dict[str, Process]] = {}
        self._watcher: asyncio.Task[None] | None = None

    # lifecycle ---------------------------------------------------------------------
    def start_watching(self) -> None:
        """Follow sandbox events so processes die with their sandbox."""
        self._watcher = asyncio.ensure_future(self._watch())

    async def _watch(self) -> None:
        last: int | None = None
        while True:  # a slow subscriber is cut off by the bus: resubscribe from where we were
            async for ev in self.events.subscribe(last):
                last = ev.seq
                if ev.type == "sandbox.destroyed" and ev.sandbox_id:
                    await self.forget_sandbox(ev.sandbox_id)
            await asyncio.sleep(0.1)

    async def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
        for sid in list(self._by_sandbox):
            await self.forget_sandbox(sid)

    async def forget_sandbox(self, sandbox_id: str) -> None:
        procs = self._by_sandbox.pop(sandbox_id, {})
        for p in procs.values():
            if p.running:
                with contextlib.suppress(Exception):
                    await p.proc.kill()
            if p.task is not None:
                p.task.cancel()
                with contextlib.suppress(BaseException):
                    await p.task

    # start -------------------------------------------------------------------------
    async def open_exec(
        self, caller: Caller, sandbox_id: str, req: StartRequest
    ) -> tuple[str, ExecProcess, float | None]:
        """Start an exec for an interactive session (the caller drives it): (sandbox id, process, timeout)."""
        self.sandboxes._require_write(caller)
        sb, provider, handle = await self.sandboxes._running(caller, sandbox_id)
        spec, timeout = self.sandboxes._exec_spec(sb, req.exec)
        spec = dataclasses.replace(
            spec, stdin=req.stdin or req.tty, tty=req.tty,
            tty_size=check_tty_size(req.rows, req.cols) if req.tty else None,
        )
        return sb.id, await provider.exec(handle, spec), timeout

    async def start(self, caller: Caller, sandbox_id: str, req: StartRequest) -> Process:
        sid = (await self.sandboxes.get(caller, sandbox_id)).id
        live = [p for p in self._by_sandbox.get(sid, {}).values() if p.running]
        if len(live) >= MAX_PER_SANDBOX:
            raise ResourceLimit(f"sandbox {sid} already runs {MAX_PER_SANDBOX} background processes")
        # A background process has no timeout unless the request asks for one.
        explicit_timeout = bool(req.exec.timeout)
        sid, proc, timeout = await self.open_exec(caller, sandbox_id, req)
        p = Process(
            id=new_id("proc"), sandbox_id=sid, command=req.exec.command, args=list(req.exec.args),
            mode=req.exec.mode, tty=req.tty, stdin=req.stdin or req.tty, started_at=utcnow(), proc=proc,
            ring=OutputRing(self.ring_bytes), timeout=timeout if explicit_timeout else None,
        )
        procs = self._by_sandbox.setdefault(sid, {})
        procs[p.id] = p
        self._prune(procs)
        p.task = asyncio.ensure_future(self._pump(p))
        self.events.publish("process.started", sid, {"process_id": p.id})
        return p

    def _prune(self, procs: dict[str, Process]) -> None:
        done = sorted((p for p in procs.values() if not p.running), key=lambda p: p.ended_at or p.started_at)
        for p in done[: max(0, len(done) - KEEP_EXITED)]:
            procs.pop(p.id, None)

    async def _pump(self, p: Process) -> None:
        """Drain the output into the ring (never blocking on readers), then record the exit."""
        timed_out = False

        async def drain() -> None:
            async for stream, data in p.proc.output():
                p.ring.append("output" if p.tty else stream, data)

        try:
            try:
                await asyncio.wait_for(drain(), p.timeout)
            except TimeoutError:
                timed_out = True
                await p.proc.kill()
            status = await p.proc.wait()
            p.exit_code, p.signal, p.reason = status.exit_code, status.signal, status.reason
            if timed_out:
                p.reason = "timeout"
        except asyncio.CancelledError:
            p.reason = p.reason or "killed"
            raise
        except Exception as exc:  # the provider failed: make sure nothing keeps running unseen
            log.warning("background process %s failed: %s", p.id, exc)
            p.reason = "error"
            with contextlib.suppress(Exception):
                await p.proc.kill()
        finally:
            p.ended_at = utcnow()
            p.ring.close()
            self.events.publish(
                "process.exited", p.sandbox_id, {"process_id": p.id, "exit_code": p.exit_code, "reason": p.reason}
            )

    # queries -----------------------------------------------------------------------
    async def list(self, caller: Caller, sandbox_id: str) -> list[Process]:
        sid = (await self.sandboxes.get(caller, sandbox_id)).id
        return sorted(self._by_sandbox.get(sid, {}).values(), key=lambda p: p.started_at)

    async def get(self, caller: Caller, sandbox_id: str, process_id: str) -> Process:
        sid = (await self.sandboxes.get(caller, sandbox_id)).id
        p = self._by_sandbox.get(sid, {}).get(process_id)
        if p is None:
            raise NotFound(f"process {process_id} not found in sandbox {sid}")
        return p

    @staticmethod
    def read(p: Process, offset: int, max_bytes: int) -> Slice:
        return p.ring.read(offset, max_bytes)

    @staticmethod
    async def follow(p: Process, offset: int, chunk_bytes: int = 64 * 1024) -> AsyncIterator[Slice]:
        """Slices from `offset` until the process has exited and its output is read.

        A follower reads straight from the ring: when it falls more than the ring's
        size behind, the next slice reports the bytes it missed in `dropped`.
        """
        while True:
            s = p.ring.read(offset, chunk_bytes)
            if s.chunks or s.dropped:
                offset = s.next_offset
                yield s
                continue
            if p.ring.closed:
                return
            await p.ring.wait_beyond(offset)

    # control ---------------------------------------------------------------------------
    async def _live(self, caller: Caller, sandbox_id: str, process_id: str) -> Process:
        self.sandboxes._require_write(caller)
        p = await self.get(caller, sandbox_id, process_id)
        if not p.running:
            raise Conflict(f"process {p.id} has exited")
        return p

    async def write_stdin(self, caller: Caller, sandbox_id: str, process_id: str, data: bytes, close: bool) -> None:
        p = await self._live(caller, sandbox_id, process_id)
        if not p.stdin:
            raise BadRequest(f"process {p.id} was started without stdin (start it with \"stdin\": true)")
        if p.stdin_closed:
            raise Conflict(f"stdin of process {p.id} is closed")
        try:
            if data:
                await asyncio.wait_for(p.proc.write_stdin(data), 30)
            if close:
                p.stdin_closed = True
                await p.proc.close_stdin()
        except TimeoutError:
            raise Conflict(f"process {p.id} is not reading its stdin") from None
        except (BrokenPipeError, ConnectionResetError):
            raise Conflict(f"process {p.id} closed its stdin") from None

    async def signal(self, caller: Caller, sandbox_id: str, process_id: str, sig: int) -> Process:
        p = await self._live(caller, sandbox_id, process_id)
        await p.proc.signal(sig)
        return p

    async def kill(self, caller: Caller, sandbox_id: str, process_id: str) -> Process:
        self.sandboxes._require_write(caller)
        p = await self.get(caller, sandbox_id, process_id)
        if p.running:
            await p.proc.kill()
            if p.task is not None:
                with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                    await asyncio.wait_for(asyncio.shield(p.task), 10)
        return p
