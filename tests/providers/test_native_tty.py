"""Terminal execs of the native provider, the same checks for every runtime.

crun sends the pty master over its console socket; runc relays a host pty;
runsc hands a host pty to the sandbox (pty.py). Issue #6's acceptance: an
interactive shell and `python3 -i`, Ctrl-C interrupting `sleep 100` with
the signal reported, a resize seen by `stty size`, exit code 42; bytes
through `cat` on a raw terminal here (through a pipe: conformance test_stdin).
"""

from __future__ import annotations

import asyncio
import signal

import pytest

from stacyvm_server.providers.base import ExecProcess, ExecSpec, Provider, SandboxHandle

from .test_native import _probe_runtime

pytestmark = pytest.mark.asyncio(loop_scope="session")


class _Reader:
    """Collects a tty exec's output in the background; `until` waits for a substring."""

    def __init__(self, proc: ExecProcess) -> None:
        self.buf = bytearray()
        self.task = asyncio.ensure_future(self._pump(proc))

    async def _pump(self, proc: ExecProcess) -> None:
        async for name, data in proc.output():
            assert name == "stdout"
            self.buf += data

    async def until(self, needle: bytes, timeout: float = 10) -> bytes:
        deadline = asyncio.get_running_loop().time() + timeout
        while needle not in self.buf:
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"{needle!r} not seen in {bytes(self.buf)!r}")
            await asyncio.sleep(0.02)
        return bytes(self.buf)


class TtyChecks:
    runtime = "crun"
    share_sandbox = True
    # What `tty` prints: runsc's terminal is a host fd imported into the
    # Sentry, with no /dev/pts name (`tty` says "not a tty"; isatty() is true).
    pts_name = True
    # A raw terminal's "\n" as it reaches us: runc keeps output post-processing
    # (onlcr) on its host side even when the program turns it off inside.
    raw_newline = b"\n"

    async def test_interactive_shell_and_resize(self, provider: Provider, sandbox: SandboxHandle) -> None:
        proc = await provider.exec(sandbox, ExecSpec(["/bin/sh"], stdin=True, tty=True, tty_size=(30, 90)))
        r = _Reader(proc)
        await proc.write_stdin(b"stty size; [ -t 0 ] && [ -t 1 ] && echo on-a-$((6*7))-tty; tty\n")
        out = await r.until(b"on-a-42-tty")
        assert b"30 90" in out
        await proc.resize(50, 132)
        await proc.write_stdin(b"stty size\n")
        await r.until(b"50 132")
        out = await r.until(b"/ # ", 5)
        if self.pts_name:
            assert b"/dev/pts/" in out
        await proc.write_stdin(b"exit 42\n")
        status = await asyncio.wait_for(proc.wait(), 10)
        await asyncio.wait_for(r.task, 10)
        assert status.exit_code == 42 and status.signal is None

    async def test_ctrl_c_interrupts_foreground(self, provider: Provider, sandbox: SandboxHandle) -> None:
        proc = await provider.exec(sandbox, ExecSpec(["sleep", "100"], stdin=True, tty=True))
        r = _Reader(proc)
        await asyncio.sleep(0.3)
        await proc.write_stdin(b"\x03")
        status = await asyncio.wait_for(proc.wait(), 10)
        await asyncio.wait_for(r.task, 10)
        assert status.signal == signal.SIGINT
        assert status.exit_code == 130

    async def test_ctrl_c_interrupts_a_shell_job(self, provider: Provider, sandbox: SandboxHandle) -> None:
        """Job control: Ctrl-C stops the shell's foreground `sleep`, the shell goes on."""
        proc = await provider.exec(sandbox, ExecSpec(["/bin/sh"], stdin=True, tty=True))
        r = _Reader(proc)
        await proc.write_stdin(b"echo sl''eeping; sleep 100\n")
        await r.until(b"sleeping")
        await asyncio.sleep(0.3)
        await proc.write_stdin(b"\x03")
        await proc.write_stdin(b"echo rc=$?\n")
        await r.until(b"rc=130")
        await proc.close_stdin()  # Ctrl-D: the shell exits
        status = await asyncio.wait_for(proc.wait(), 10)
        await asyncio.wait_for(r.task, 10)
        assert status.exit_code == 0

    async def test_bytes_through_raw_terminal(self, provider: Provider, sandbox: SandboxHandle) -> None:
        proc = await provider.exec(sandbox, ExecSpec(
            ["/bin/sh", "-c", "stty raw -echo -iexten && echo raw-$((1+1)) && exec cat"], stdin=True, tty=True))
        r = _Reader(proc)
        await r.until(b"raw-2")
        start = len(r.buf)
        data = bytes(b for b in range(256) if b != 0x0A) * 4
        await proc.write_stdin(data)
        await r.until(data)
        await proc.write_stdin(b"end\n")
        await r.until(b"end" + self.raw_newline)
        assert bytes(r.buf[start:]) == data + b"end" + self.raw_newline
        await proc.kill()
        status = await asyncio.wait_for(proc.wait(), 10)
        await asyncio.wait_for(r.task, 10)
        assert status.reason == "killed"

    async def test_python_interactive(self, provider: Provider, make_sandbox: object, python_image_ref: str) -> None:
        box = await make_sandbox(image=python_image_ref)  # type: ignore[operator]
        proc = await provider.exec(box, ExecSpec(["python3", "-i", "-q"], stdin=True, tty=True))
        r = _Reader(proc)
        await r.until(b">>> ", 30)
        await proc.write_stdin(b"import os; print(6 * 7, os.isatty(0))\n")
        await r.until(b"42 True")
        await proc.write_stdin(b"def f():\n    return 'in' + 'dented'\n\n")
        await r.until(b"... ")
        await proc.write_stdin(b"f()\n")
        await r.until(b"'indented'")
        await proc.write_stdin(b"raise SystemExit(42)\n")
        status = await asyncio.wait_for(proc.wait(), 10)
        await asyncio.wait_for(r.task, 10)
        assert status.exit_code == 42

    async def test_signal_main_process(self, provider: Provider, sandbox: SandboxHandle) -> None:
        proc = await provider.exec(sandbox, ExecSpec(["sleep", "100"]))
        drain = asyncio.ensure_future(_drain(proc))
        await asyncio.sleep(0.2)
        await proc.signal(signal.SIGTERM)
        status = await asyncio.wait_for(proc.wait(), 10)
        await drain
        assert status.signal == signal.SIGTERM


async def _drain(proc: ExecProcess) -> None:
    async for _ in proc.output():
        pass


class TestTtyCrun(TtyChecks):
    runtime = "crun"


class TestTtyRunc(TtyChecks):
    runtime = "runc"
    probe_runtime = staticmethod(_probe_runtime)
    raw_newline = b"\r\n"


class TestTtyRunsc(TtyChecks):
    runtime = "runsc"
    probe_runtime = staticmethod(_probe_runtime)
    pts_name = False
