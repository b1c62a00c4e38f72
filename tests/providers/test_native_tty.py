"""Terminal execs of the native provider (console socket -> pty master), per runtime."""

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

    async def test_interactive_shell_and_resize(self, provider: Provider, sandbox: SandboxHandle) -> None:
        proc = await provider.exec(sandbox, ExecSpec(["/bin/sh"], stdin=True, tty=True, tty_size=(30, 90)))
        r = _Reader(proc)
        await proc.write_stdin(b"stty size; tty\n")
        out = await r.until(b"30 90")
        await proc.resize(50, 132)
        await proc.write_stdin(b"stty size\n")
        await r.until(b"50 132")
        assert b"/dev/pts/" in out
        await proc.write_stdin(b"exit 42\n")
        status = await asyncio.wait_for(proc.wait(), 10)
        await asyncio.wait_for(r.task, 10)
        assert status.exit_code == 42

    async def test_ctrl_c_interrupts_foreground(self, provider: Provider, sandbox: SandboxHandle) -> None:
        proc = await provider.exec(sandbox, ExecSpec(["sleep", "100"], stdin=True, tty=True))
        r = _Reader(proc)
        await asyncio.sleep(0.3)
        await proc.write_stdin(b"\x03")
        status = await asyncio.wait_for(proc.wait(), 10)
        await asyncio.wait_for(r.task, 10)
        assert status.signal == signal.SIGINT
        assert status.exit_code == 130

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



class TestTtyOtherRuntimes:
    """runc and runsc: a terminal exec is refused with a clear 400 (they never connect to the console socket)."""

    runtime = "runc"
    probe_runtime = staticmethod(_probe_runtime)

    async def test_tty_refused(self, provider: Provider, sandbox: SandboxHandle) -> None:
        from stacyvm_server.errors import BadRequest

        with pytest.raises(BadRequest, match="crun"):
            await provider.exec(sandbox, ExecSpec(["/bin/sh"], stdin=True, tty=True))


class SignalChecks:
    share_sandbox = True

    async def test_signal_main_process(self, provider: Provider, sandbox: SandboxHandle) -> None:
        await TtyChecks.test_signal_main_process(self, provider, sandbox)  # type: ignore[arg-type]


class TestSignalRunc(SignalChecks):
    runtime = "runc"
    probe_runtime = staticmethod(_probe_runtime)


class TestSignalRunsc(SignalChecks):
    runtime = "runsc"
    probe_runtime = staticmethod(_probe_runtime)
