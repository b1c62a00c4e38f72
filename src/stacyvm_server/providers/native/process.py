"""A command running in a sandbox through `<runtime> exec`.

Killing the whole tree: the runtime puts every exec'd process into a new
session (setsid), and children inherit that session id unless they call
setsid() themselves. kill() freezes the sandbox's freezer cgroup (so nothing
can fork while we look), SIGKILLs every task of the sandbox whose session is
the exec's, then thaws. The session id is read from /proc as soon as the
runtime writes the exec's pid file. Sessions are never reused while a member
lives, so this cannot hit another exec's processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

from stacyvm_server.providers.base import ExecProcess, ExitStatus, StreamName
from stacyvm_server.providers.native import cgroups
from stacyvm_server.util.proc import kill_group

READ_SIZE = 64 * 1024


def session_of(pid: int) -> int | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Fields after the ")" that ends comm: state ppid pgrp session ...
    fields = raw[raw.rindex(")") + 2 :].split()
    return int(fields[3])


def kill_session(sandbox_id: str, sid: int) -> int:
    """Blocking. SIGKILL every process of the sandbox in session `sid`; returns how many."""
    frozen = cgroups.set_frozen(sandbox_id, True)
    killed = 0
    try:
        for pid in cgroups.pids(sandbox_id):
            if session_of(pid) == sid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                    killed += 1
    finally:
        if frozen:
            cgroups.set_frozen(sandbox_id, False)
    return killed


class NativeExecProcess(ExecProcess):
    def __init__(
        self,
        proc: asyncio.subprocess.Process,
        sandbox_id: str,
        pid_file: Path,
        cleanup: list[Path],
        exit_reason: Callable[[int], Awaitable[str | None]],
        host_tree_kill: bool = True,
    ) -> None:
        self._host_tree_kill = host_tree_kill
        self._proc = proc
        self._sandbox_id = sandbox_id
        self._pid_file = pid_file
        self._cleanup = cleanup
        self._exit_reason = exit_reason
        self._sid: int | None = None
        self._killed = False
        self._status: ExitStatus | None = None
        self._sid_task = asyncio.ensure_future(self._watch_sid())

    async def _watch_sid(self) -> None:
        """Learn the exec's session id as soon as the runtime reports its pid."""
        delay = 0.001
        while self._proc.returncode is None:
            try:
                pid = int(self._pid_file.read_text())
            except (OSError, ValueError):
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.02)
                continue
            self._sid = session_of(pid)
            return

    async def output(self) -> AsyncIterator[tuple[StreamName, bytes]]:
        queue: asyncio.Queue[tuple[StreamName, bytes] | None] = asyncio.Queue()

        async def pump(name: StreamName, stream: asyncio.StreamReader | None) -> None:
            try:
                while stream is not None:
                    chunk = await stream.read(READ_SIZE)
                    if not chunk:
                        break
                    await queue.put((name, chunk))
            finally:
                await queue.put(None)

        tasks = [
            asyncio.ensure_future(pump("stdout", self._proc.stdout)),
            asyncio.ensure_future(pump("stderr", self._proc.stderr)),
        ]
        open_streams = 2
        try:
            while open_streams:
                item = await queue.get()
                if item is None:
                    open_streams -= 1
                    continue
                yield item
        finally:
            for t in tasks:
                t.cancel()

    async def wait(self) -> ExitStatus:
        if self._status is not None:
            return self._status
        rc = await self._proc.wait()
        sig: int | None = None
        if rc < 0:  # the runtime itself died by a signal (our kill)
            sig, rc = -rc, 128 - rc
        elif rc > 128 and rc <= 128 + 64:  # the runtime reports 128+N for a signalled process
            sig = rc - 128
        reason = await self._exit_reason(rc) if rc == 137 else None
        if reason is None and self._killed:
            reason = "killed"
        self._status = ExitStatus(exit_code=rc, signal=sig, reason=reason)
        self._sid_task.cancel()
        for p in self._cleanup:
            with contextlib.suppress(OSError):
                p.unlink()
        return self._status

    async def kill(self) -> None:
        if self._proc.returncode is not None and self._killed:
            return
        self._killed = True
        if self._host_tree_kill and self._sid is None and self._proc.returncode is None:
            # The runtime has not written the pid file yet; give it a moment.
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(self._sid_task), 2.0)
        if self._host_tree_kill and self._sid is not None:
            sid = self._sid
            # Repeat until no member is left: a task in the middle of fork() when
            # frozen can surface once thawed.
            for _ in range(20):
                if await asyncio.to_thread(kill_session, self._sandbox_id, sid) == 0:
                    break
                await asyncio.sleep(0.005)
        kill_group(self._proc.pid)  # the runtime client (its own session: start_new_session)

    async def write_stdin(self, data: bytes) -> None:
        if self._proc.stdin is None:
            raise BrokenPipeError("stdin was not requested for this exec")
        self._proc.stdin.write(data)
        await self._proc.stdin.drain()

    async def close_stdin(self) -> None:
        if self._proc.stdin is not None and not self._proc.stdin.is_closing():
            self._proc.stdin.close()
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                await self._proc.stdin.wait_closed()
