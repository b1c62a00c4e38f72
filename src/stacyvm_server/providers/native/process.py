"""A command running in a sandbox through `<runtime> exec`.

Killing the whole tree: the runtime puts every exec'd process into a new
session (setsid), and children inherit that session id unless they call
setsid() themselves. kill() freezes the sandbox's freezer cgroup (so nothing
can fork while we look), SIGKILLs every task of the sandbox whose session is
the exec's, then thaws. The session id is read from /proc as soon as the
runtime writes the exec's pid file. Sessions are never reused while a member
lives, so this cannot hit another exec's processes.

runsc: the exec's processes live inside the gVisor Sentry and are not host
processes, so the host cannot see or signal them. The Sentry also makes every
exec a session leader; `runsc exec --internal-pid-file` tells us its pid in
the sandbox's pid namespace. kill() then runs a second exec in the sandbox
(the host's static busybox, bind-mounted read-only) that SIGKILLs every
process of that session (`KILL_SESSION_SCRIPT`). The kill happens inside the
sandbox's pid namespace, so whatever the pid file says it can never reach a
host process; the pid is still checked to be an integer > 1 (1 is the
sandbox's init, whose session also holds the keepalive).
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
OUTPUT_QUEUE = 8  # chunks between the pipes and output()'s consumer

# `sh -c KILL_SESSION_SCRIPT stacyvm-kill <sid>`, run by busybox ash inside the
# sandbox: SIGKILL every live process whose session is <sid>, rescanning until
# a pass finds none (a process in the middle of fork() can leave a child that
# the previous pass did not see). Only shell builtins: no fork per process.
# The field after the last ") " in /proc/N/stat is the state, then ppid, pgrp,
# session. The script's own exec is in another session (the runtime makes
# every exec a session leader).
KILL_SESSION_SCRIPT = r"""
s=$1
case $s in ''|*[!0-9]*) exit 2;; esac
[ "$s" -gt 1 ] || exit 2
i=0
while [ $i -lt 100 ]; do
  n=0
  for f in /proc/[0-9]*/stat; do
    read -r l < "$f" 2>/dev/null || continue
    set -- ${l##*) }
    [ "$4" = "$s" ] && [ "$1" != Z ] && [ "$1" != X ] || continue
    p=${f#/proc/}; p=${p%/stat}
    kill -9 "$p" 2>/dev/null && n=$((n+1))
  done
  [ $n -eq 0 ] && exit 0
  i=$((i+1))
done
exit 1
"""


def parse_inner_pid(text: str) -> int | None:
    """The exec's pid inside the sandbox, as runsc reports it; None unless an integer > 1."""
    text = text.strip()
    if not text.isdigit() or len(text) > 9:
        return None
    pid = int(text)
    return pid if pid > 1 else None


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
        inner_pid_file: Path | None = None,
        inner_kill: Callable[[int], Awaitable[None]] | None = None,
        inner_signal: Callable[[int, int], Awaitable[None]] | None = None,
    ) -> None:
        # Either the host-side session kill (crun, runc), or, when inner_kill
        # is given (runsc), a kill of the session run inside the sandbox.
        self._inner_pid_file = inner_pid_file if inner_kill is not None else None
        self._inner_kill = inner_kill
        self._inner_signal = inner_signal  # runsc: (pid in the sandbox, signal)
        self._proc = proc
        self._sandbox_id = sandbox_id
        self._pid_file = pid_file
        self._cleanup = cleanup
        self._exit_reason = exit_reason
        self._sid: int | None = None  # host session id (crun, runc)
        self._pid: int | None = None  # host pid of the exec's main process (crun, runc)
        self._inner_sid: int | None = None  # session id inside the sandbox (runsc)
        self._killed = False
        self._status: ExitStatus | None = None
        self._sid_task = asyncio.ensure_future(self._watch_sid())

    async def _watch_sid(self) -> None:
        """Learn the exec's session id as soon as the runtime reports its pid.

        Kept after the exec ends, so a later kill() still reaches background
        processes it left in its session.
        """
        delay = 0.001
        while self._proc.returncode is None:
            if self._inner_pid_file is not None:
                try:
                    text = self._inner_pid_file.read_text()
                except OSError:
                    text = ""
                if text.strip():
                    # The Sentry makes the exec a session leader: pid == sid.
                    self._inner_sid = parse_inner_pid(text)
                    return
            else:
                try:
                    pid = int(self._pid_file.read_text())
                except (OSError, ValueError):
                    pid = 0
                if pid > 0:
                    self._sid = session_of(pid)
                    self._pid = pid
                    return
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.02)

    async def output(self) -> AsyncIterator[tuple[StreamName, bytes]]:
        # Bounded: a slow consumer stops the pumps, the pipes fill, and the process
        # blocks on write; nothing piles up here.
        queue: asyncio.Queue[tuple[StreamName, bytes] | None] = asyncio.Queue(OUTPUT_QUEUE)

        async def pump(name: StreamName, stream: asyncio.StreamReader | None) -> None:
            try:
                while stream is not None:
                    chunk = await stream.read(READ_SIZE)
                    if not chunk:
                        break
                    await queue.put((name, chunk))
            except asyncio.CancelledError:
                raise  # the consumer is gone: nobody waits for the end marker
            except Exception:  # a broken pipe ends the stream like EOF
                pass
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
        # 137: SIGKILL, maybe the OOM killer's. runsc: an OOM kills the whole
        # Sentry and the client then fails with 128 ("WaitPID ... EOF"); the
        # exec did die of the OOM kill, so report it as one.
        sentry = self._inner_kill is not None  # runsc
        reason = await self._exit_reason(rc) if rc == 137 or (sentry and rc == 128) else None
        if reason == "oom" and rc == 128:
            sig, rc = signal.SIGKILL.value, 137
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
        if self._sid is None and self._inner_sid is None and self._proc.returncode is None:
            # The runtime has not written the pid file yet; give it a moment.
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(self._sid_task), 2.0)
        if self._inner_kill is not None:
            if self._inner_sid is not None:
                await self._inner_kill(self._inner_sid)
        elif self._sid is not None:
            sid = self._sid
            # Repeat until no member is left: a task in the middle of fork() when
            # frozen can surface once thawed.
            for _ in range(20):
                if await asyncio.to_thread(kill_session, self._sandbox_id, sid) == 0:
                    break
                await asyncio.sleep(0.005)
        kill_group(self._proc.pid)  # the runtime client (its own session: start_new_session)

    async def signal(self, sig: int) -> None:
        """Signal the exec's main process: on the host (crun, runc) or inside the sandbox (runsc)."""
        if self._proc.returncode is not None:
            return
        if self._sid is None and self._inner_sid is None:
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(self._sid_task), 2.0)
        if self._inner_signal is not None:
            if self._inner_sid is not None:  # runsc makes the exec a session leader: pid == sid
                await self._inner_signal(self._inner_sid, sig)
        elif self._pid is not None and session_of(self._pid) == self._sid:  # still ours, not a reused pid
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._pid, sig)

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
