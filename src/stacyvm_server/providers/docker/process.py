"""One `docker exec`: demultiplexed output, stdin, exit status, and a kill that takes the tree.

runc starts every exec'd process as a session leader (its init calls setsid), and
everything it starts stays in that session unless it calls setsid itself. `exec
inspect` reports the leader's host pid, which is also the session id the host
sees. kill() SIGKILLs, from the host, every process of that session that is in
the container's cgroup, until none is left: orphans re-parented to the
container's init are still found, and nothing outside the container can be hit.

crun leaves an exec's processes in the shim's session (outside the container),
shared by every exec: there the exec is marked with an environment variable
(EXEC_MARKER) and kill() takes the marked processes and their descendants
(kill_marked), again only inside the container's cgroup. Under runsc the host
sees none of them: the provider kills from inside (files.INNER_KILL_SCRIPT).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

from stacyvm_server.errors import ProviderError
from stacyvm_server.providers.base import ExecProcess, ExitStatus, StreamName
from stacyvm_server.providers.docker.client import STDERR, DockerAPIError, DockerClient, ExecStream
from stacyvm_server.util.proc import kill_until_gone

_EOT = b"\x04"  # VEOF in the default line discipline
EXEC_MARKER = "STACYVM_EXEC"  # env var marking an exec's processes where sessions cannot (crun, runsc)
ExitReason = Callable[[int], Awaitable[str | None]]
InnerKill = Callable[[], Awaitable[None]]
InnerSignal = Callable[[int], Awaitable[None]]


class DockerExecProcess(ExecProcess):
    def __init__(self, client: DockerClient, exec_id: str, stream: ExecStream, container_id: str,
                 exit_reason: ExitReason, has_stdin: bool, inner_kill: InnerKill | None = None,
                 inner_signal: InnerSignal | None = None, watch_exit: bool = False, tty: bool = False,
                 marker: str | None = None) -> None:
        self.client = client
        self.exec_id = exec_id
        self.stream = stream
        self.container_id = container_id
        self._exit_reason = exit_reason
        self._has_stdin = has_stdin
        self._inner_kill = inner_kill  # runsc: kill from inside the sandbox (files.INNER_KILL_SCRIPT)
        self._inner_signal = inner_signal  # runsc: signal() likewise (files.INNER_SIGNAL_SCRIPT)
        self._marker = marker  # crun: the exec's EXEC_MARKER value (kill_marked)
        self._status: ExitStatus | None = None
        self._killed = False
        self._output_done = asyncio.Event()
        # runsc: when the whole gVisor sandbox dies (OOM, pids budget), the exec's
        # stream can stay open; a watcher ends it once the exec is reported gone.
        self._watch_exit = watch_exit
        # A TTY exec: one raw stream (the pty). Never half-close it: for a TTY, Docker ends
        # the output streams when stdin closes; EOF is typed (Ctrl-D) instead.
        self.tty = tty
        # Without AttachStdin the process's stdin is /dev/null already: no half-close then
        # (dockerd's handling of it cost ~1.2 ms per exec here; `docker exec` does not send it).

    async def output(self) -> AsyncIterator[tuple[StreamName, bytes]]:
        watcher = asyncio.create_task(self._end_stream_when_gone()) if self._watch_exit else None
        try:
            if self.tty:
                async for chunk in self.stream.raw():
                    yield "stdout", chunk  # as the native provider's pty: one stream, "stdout"
            else:
                async for kind, chunk in self.stream.frames():
                    yield ("stderr" if kind == STDERR else "stdout"), chunk
        finally:
            self._output_done.set()
            if watcher is not None:
                watcher.cancel()

    async def _end_stream_when_gone(self) -> None:
        with contextlib.suppress(ProviderError):
            while True:
                await asyncio.sleep(0.5)
                if not (await self._inspect()).get("Running"):
                    await asyncio.sleep(0.5)  # the normal end of the stream wins when it comes
                    self.stream.reader.feed_eof()
                    return

    async def _inspect(self) -> dict[str, object]:
        try:
            data = await self.client.request("GET", f"/exec/{self.exec_id}/json", timeout=10)
        except DockerAPIError as exc:
            if exc.http_status == 404:  # the container (and its execs) are gone
                return {"Running": False, "ExitCode": 137, "Pid": 0}
            raise
        return dict(data or {})

    async def wait(self) -> ExitStatus:
        if self._status is not None:
            return self._status
        delay = 0.005
        while True:
            info = await self._inspect()
            if not info.get("Running") and info.get("ExitCode") is not None:
                break
            # Once the output has ended the exit code follows within milliseconds.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._output_done.wait(), delay)
            delay = min(delay * 2, 0.1)
        code = int(info.get("ExitCode") or 0)  # type: ignore[call-overload]
        sig = code - 128 if 128 < code < 128 + 65 else None
        reason = await self._exit_reason(code)
        if reason == "oom":
            code, sig = 137, 9
        if reason is None and self._killed:
            reason = "killed"
        self._status = ExitStatus(code, sig, reason)
        self.stream.close()
        return self._status

    async def kill(self) -> None:
        if self._status is not None:
            return
        self._killed = True
        if self._inner_kill is not None:
            await self._inner_kill()
            return
        if self._marker is not None:
            await asyncio.to_thread(kill_marked, self._marker, self.container_id)
            return
        info = await self._inspect()
        pid = int(info.get("Pid") or 0)  # type: ignore[call-overload]
        if pid > 1 and info.get("Running"):
            await asyncio.to_thread(kill_session, pid, self.container_id)

    async def signal(self, sig: int) -> None:
        if self._status is not None:
            return
        if self._inner_signal is not None:
            await self._inner_signal(sig)  # the host cannot see gVisor's processes
            return
        info = await self._inspect()
        pid = int(info.get("Pid") or 0)  # type: ignore[call-overload]
        if pid <= 1 or not info.get("Running"):
            return
        if self._marker is not None:
            ours = await asyncio.to_thread(marked_members, self._marker, self.container_id)
        else:
            ours = await asyncio.to_thread(session_members, pid, self.container_id)
        if pid in ours:  # still that exec's process, not a reused pid
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    async def write_stdin(self, data: bytes) -> None:
        if not self._has_stdin:
            raise ProviderError("exec was started without stdin")
        try:
            await self.stream.write(data)
        except (ConnectionError, OSError) as exc:
            raise ProviderError(f"stdin closed: {exc}") from exc

    async def close_stdin(self) -> None:
        if self.tty:  # a terminal has no stdin to close: type EOF (VEOF, Ctrl-D)
            with contextlib.suppress(ProviderError):
                await self.write_stdin(_EOT)
            return
        with contextlib.suppress(OSError):
            self.stream.close_write()

    async def resize(self, rows: int, cols: int) -> None:
        if not self.tty:
            await super().resize(rows, cols)
        if self._status is not None:
            return
        try:
            await resize_exec(self.client, self.exec_id, rows, cols)
        except DockerAPIError:
            if (await self._inspect()).get("Running"):
                raise
            # it has just exited: nothing to resize


async def resize_exec(client: DockerClient, exec_id: str, rows: int, cols: int, tries: int = 1) -> None:
    """`POST /exec/{id}/resize`. Right after start the exec may not be running yet (Docker
    answers 409/500): retry with a short backoff, as the docker CLI does."""
    for attempt in range(tries):
        try:
            await client.request("POST", f"/exec/{exec_id}/resize", params={"h": rows, "w": cols}, timeout=10)
            return
        except DockerAPIError as exc:
            if exc.http_status == 404 or attempt == tries - 1:
                if exc.http_status == 404:
                    return  # the exec (or its container) is gone: nothing to resize
                raise
            await asyncio.sleep(0.01 * (attempt + 1))


def _container_procs(container_id: str) -> Iterator[tuple[int, list[str]]]:
    """(pid, the fields of /proc/<pid>/stat after the command) of every live process in the
    container's cgroup; zombies (dead, waiting to be reaped) are left out."""
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            if container_id not in Path(f"/proc/{name}/cgroup").read_text():
                continue
            stat = Path(f"/proc/{name}/stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()
        except (OSError, ValueError):
            continue
        if fields and fields[0] not in ("Z", "X"):
            yield int(name), fields


def session_members(sid: int, container_id: str) -> list[int]:
    """Host pids in session `sid` that belong to the container's cgroup."""
    return [pid for pid, fields in _container_procs(container_id) if fields[3] == str(sid)]


def kill_session(sid: int, container_id: str, timeout: float = 5.0) -> None:
    """SIGKILL the session's processes until none is left (forks racing the kill included)."""
    kill_until_gone(lambda: session_members(sid, container_id), timeout)


def marked_members(marker: str, container_id: str) -> list[int]:
    """Host pids in the container's cgroup that belong to the exec marked `marker`: those
    whose environment carries it, and every descendant of one (a child that replaced its
    environment is still found while its marked parent lives)."""
    tag = f"{EXEC_MARKER}={marker}".encode()
    parents: dict[int, int] = {}
    marked: set[int] = set()
    for pid, fields in _container_procs(container_id):
        parents[pid] = int(fields[1])
        with contextlib.suppress(OSError):
            if tag in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                marked.add(pid)
    grew = True
    while grew:
        grew = False
        for pid, ppid in parents.items():
            if pid not in marked and ppid in marked:
                marked.add(pid)
                grew = True
    return sorted(marked)


def kill_marked(marker: str, container_id: str, timeout: float = 5.0) -> None:
    """SIGKILL the marked exec's processes until none is left (forks racing the kill included)."""
    kill_until_gone(lambda: marked_members(marker, container_id), timeout)


class FailedExec(ExecProcess):
    """An exec that could not start because the sandbox is not running: like a runtime's
    `exec` failing, it ends at once with exit code 126 and the reason on stderr."""

    def __init__(self, message: str) -> None:
        self.message = message

    async def output(self) -> AsyncIterator[tuple[StreamName, bytes]]:
        yield "stderr", (self.message + "\n").encode()

    async def wait(self) -> ExitStatus:
        return ExitStatus(126)

    async def kill(self) -> None:
        return None

    async def write_stdin(self, data: bytes) -> None:
        raise ProviderError(self.message)

    async def close_stdin(self) -> None:
        return None
