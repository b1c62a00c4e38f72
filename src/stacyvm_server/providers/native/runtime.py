"""The OCI runtime command line: crun (default), runc, or runsc with ptrace.

All three read the same bundle. Differences are kept to this module: flag
spelling (runsc uses `-force`, `-format`), runsc's global platform flags, and
how a terminal exec gets its pty (`tty_mode`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from stacyvm_server.errors import ProviderError
from stacyvm_server.util.proc import run

TtyMode = Literal["console_socket", "relay", "direct"]


@dataclass(frozen=True)
class ContainerInfo:
    id: str
    status: str  # "created", "running", "stopped", ...
    pid: int


class OciRuntime:
    def __init__(self, kind: str, path: str | None, state_root: Path) -> None:
        self.kind = kind
        self.path = path or shutil.which(kind) or f"/usr/bin/{kind}"
        self.state_root = state_root

    @property
    def tty_mode(self) -> TtyMode:
        """How a terminal exec gets its pty (pty.py, docs/interactive.md).

        console_socket (crun): crun creates the pty in the sandbox and sends us
        its master over `--console-socket`. The other two give the runtime
        client a host pty as its stdio and keep its master: relay (runc; it
        takes a console socket only with --detach): runc creates a pty in the
        sandbox and copies between the two; direct (runsc; it uses a console
        socket only with -detach): runsc hands the host pty to the sandbox as
        the process's terminal.
        """
        if self.kind == "crun":
            return "console_socket"
        return "relay" if self.kind == "runc" else "direct"

    def _global(self) -> list[str]:
        argv = [self.path, "--root", str(self.state_root)]
        if self.kind == "runsc":
            # kvm hangs on this host; the sandbox joins our netns and uses it
            # as its "host" network (runsc's own netstack cannot start here).
            # --file-access=shared: the API writes files into the overlay from
            # the host; with the default (exclusive) the Sentry caches the root
            # and keeps serving stale contents.
            argv += ["--platform=ptrace", "--network=host", "--file-access=shared"]
        return argv

    async def run_detached(self, bundle: Path, cid: str, pid_file: Path, log: Path, timeout: float) -> None:
        """`run --detach`: one fork instead of create+start.

        Never capture the runtime's stdio (the container inherits it, host-notes
        §3): the init's stdout/stderr, and any runtime error, go to `log`.
        """
        flag = "-detach" if self.kind == "runsc" else "--detach"
        argv = [*self._global(), "run", flag, "--bundle", str(bundle), "--pid-file", str(pid_file), cid]
        out = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True
            )
        finally:
            os.close(out)
        try:
            rc = await asyncio.wait_for(proc.wait(), timeout)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise ProviderError(f"{self.kind} run timed out after {timeout:g}s") from None
        if rc != 0:
            tail = _tail(log)
            raise ProviderError(f"{self.kind} run failed (rc {rc}): {tail}")

    def exec_argv(
        self, cid: str, process_file: Path, pid_file: Path, inner_pid_file: Path | None = None,
        console_socket: Path | None = None, host_pty: bool = False,
    ) -> list[str]:
        """`exec`; runsc also writes the process's pid inside the sandbox to inner_pid_file.

        A terminal exec (the process file says `terminal: true`) takes one of:
        console_socket (crun): the runtime creates a pty in the sandbox and sends
        its master over that unix socket. host_pty (runc, runsc): the client's
        stdio is a host pty; the client is started as a session leader with it
        as its controlling terminal (`setsid --ctty`), so the kernel sends the
        client SIGWINCH when we resize it (runc and runsc pass the new size on)
        and, under runsc, SIGINT for a typed Ctrl-C (runsc forwards it to the
        sandbox's foreground job).
        """
        extra = ["-internal-pid-file", str(inner_pid_file)] if self.kind == "runsc" and inner_pid_file else []
        if console_socket is not None:
            extra += ["--console-socket", str(console_socket)]
        argv = [*self._global(), "exec", "--process", str(process_file), "--pid-file", str(pid_file), *extra, cid]
        if host_pty:
            argv = [shutil.which("setsid") or "/usr/bin/setsid", "--ctty", *argv]
        return argv

    async def exec_quiet(self, cid: str, process_file: Path, timeout: float) -> int:
        """Run an exec to completion, output discarded; its return code (-1 on timeout)."""
        proc = await asyncio.create_subprocess_exec(
            *self._global(), "exec", "--process", str(process_file), cid,
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL, start_new_session=True,
        )
        try:
            return await asyncio.wait_for(proc.wait(), timeout)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, 9)
            await proc.wait()
            return -1

    async def delete(self, cid: str) -> None:
        flag = "-force" if self.kind == "runsc" else "--force"
        res = await run(*self._global(), "delete", flag, cid, check=False, timeout=30)
        if res.returncode != 0:
            msg = (res.stderr or res.stdout).decode(errors="replace")
            if "does not exist" in msg or "not found" in msg or "No such file" in msg:
                return
            # The state may still be gone (e.g. a concurrent delete); recheck.
            if cid in {c.id for c in await self.list()}:
                raise ProviderError(f"{self.kind} delete {cid} failed: {msg.strip()}")

    async def list(self) -> list[ContainerInfo]:
        if not self.state_root.is_dir():
            return []
        flag = ["-format", "json"] if self.kind == "runsc" else ["--format", "json"]
        res = await run(*self._global(), "list", *flag, check=False, timeout=30)
        if res.returncode != 0 or not res.stdout.strip():
            return []
        items = json.loads(res.stdout) or []
        return [ContainerInfo(str(i["id"]), str(i.get("status", "")), int(i.get("pid") or 0)) for i in items]

    async def version(self) -> str:
        res = await run(self.path, "--version", timeout=10)
        return res.stdout.decode(errors="replace").splitlines()[0] if res.stdout else ""


def _tail(log: Path) -> str:
    try:
        with open(log, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 2000))
            return f.read().decode(errors="replace").strip()
    except OSError:
        return ""
