"""The one helper for running a host command with a timeout and a clean kill."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from stacyvm_server.errors import ProviderError


@dataclass(frozen=True)
class RunResult:
    returncode: int
    stdout: bytes
    stderr: bytes


async def run(
    *argv: str,
    timeout: float = 30.0,
    check: bool = True,
    input: bytes | None = None,
    env: dict[str, str] | None = None,
) -> RunResult:
    """Run argv to completion; kill its whole process group on timeout.

    Only for commands whose stdio we may capture. Never use it for
    `crun create`/`crun run -d`: the container inherits the pipes and the
    read would never end (host-notes §3).
    """
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.PIPE if input is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
        start_new_session=True,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(input), timeout)
    except (TimeoutError, asyncio.CancelledError):
        kill_group(proc.pid)
        await proc.wait()
        if isinstance(asyncio.current_task(), asyncio.Task) and asyncio.current_task().cancelling():  # type: ignore[union-attr]
            raise
        raise ProviderError(f"{argv[0]} timed out after {timeout:g}s") from None
    rc = proc.returncode if proc.returncode is not None else -1
    if check and rc != 0:
        msg = err.decode(errors="replace").strip() or out.decode(errors="replace").strip()
        raise ProviderError(f"{os.path.basename(argv[0])} {argv[1] if len(argv) > 1 else ''} failed: {msg}")
    return RunResult(rc, out, err)


def kill_group(pid: int) -> None:
    """SIGKILL a process group led by pid; ignore if it is already gone."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def kill_until_gone(members: Callable[[], Iterable[int]], timeout: float) -> None:
    """Blocking. SIGKILL every pid `members()` lists until it lists none, for at most
    `timeout` seconds: a process in the middle of fork() can leave a child the previous
    pass did not see."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids = list(members())
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.01)
