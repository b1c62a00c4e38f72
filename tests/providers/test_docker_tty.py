"""Terminal execs of the docker provider (runc, crun, runsc): `Tty: true` execs, sized with the exec
resize endpoint, Ctrl-C through the pty's line discipline, signal() to the exec's process.
The same checks as the native provider's (test_native_tty.TtyChecks), plus a shell session."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from stacyvm_server.errors import BadRequest
from stacyvm_server.providers.base import ExecSpec, Provider, SandboxHandle
from tests.providers import docker_fixtures
from tests.providers.docker_fixtures import DOCKER_BUSYBOX
from tests.providers.test_native_tty import TtyChecks, _Reader

pytestmark = pytest.mark.asyncio(loop_scope="session")

docker_daemon = docker_fixtures.docker_daemon
docker_scratch = docker_fixtures.docker_scratch
docker_provider = docker_fixtures.docker_provider


@pytest_asyncio.fixture(scope="class", loop_scope="session")
async def provider(docker_provider: Provider) -> AsyncIterator[Provider]:
    yield docker_provider


@pytest.fixture(scope="session")
def image_ref(docker_daemon: None) -> str:
    return DOCKER_BUSYBOX


class DockerTtyChecks(TtyChecks):
    """TtyChecks plus what a Docker terminal session needs; each subclass names its runtime."""

    async def test_shell_session_ctrl_c_and_exit(self, provider: Provider, sandbox: SandboxHandle) -> None:
        t0 = time.perf_counter()
        proc = await provider.exec(sandbox, ExecSpec(["/bin/sh"], stdin=True, tty=True, tty_size=(25, 100)))
        r = _Reader(proc)
        await proc.write_stdin(b"echo hel''lo; stty size\n")
        await r.until(b"hello")
        await r.until(b"25 100")
        await proc.write_stdin(b"sleep 100\n")
        await asyncio.sleep(0.3)
        t1 = time.perf_counter()
        await proc.write_stdin(b"\x03")  # SIGINT to the foreground job, not to the shell
        await proc.write_stdin(b"echo after=$?\n")
        await r.until(b"after=130")
        interrupted = time.perf_counter() - t1
        await proc.write_stdin(b"exit 42\n")
        status = await asyncio.wait_for(proc.wait(), 10)
        await asyncio.wait_for(r.task, 10)
        assert (status.exit_code, status.signal) == (42, None)
        print(f"\ndocker+{self.runtime} tty: session {1000 * (time.perf_counter() - t0):.0f} ms, "
              f"Ctrl-C to prompt {1000 * interrupted:.0f} ms")

    async def test_close_stdin_types_eof(self, provider: Provider, sandbox: SandboxHandle) -> None:
        proc = await provider.exec(sandbox, ExecSpec(["/bin/sh"], stdin=True, tty=True))
        r = _Reader(proc)
        await proc.write_stdin(b"echo ready\n")
        await r.until(b"ready")
        await proc.close_stdin()  # Ctrl-D at an empty prompt: the shell exits 0
        status = await asyncio.wait_for(proc.wait(), 10)
        await asyncio.wait_for(r.task, 10)
        assert status.exit_code == 0

    async def test_kill_tty_exec(self, provider: Provider, sandbox: SandboxHandle) -> None:
        proc = await provider.exec(sandbox, ExecSpec(["/bin/sh", "-c", "sleep 100"], stdin=True, tty=True))
        r = _Reader(proc)
        await asyncio.sleep(0.3)
        await proc.kill()
        status = await asyncio.wait_for(proc.wait(), 10)
        await asyncio.wait_for(r.task, 10)
        assert (status.exit_code, status.reason) == (137, "killed")


class TestDockerTtyRefusedOtherRuntimes:
    """Terminal execs need a runtime they are tested with (kata is not installed here)."""

    runtime = "runc"

    async def test_refused_for_kata(self, provider: Provider, sandbox: SandboxHandle) -> None:
        from stacyvm_server.providers.docker import DockerProvider

        assert isinstance(provider, DockerProvider)
        # The runtime is the sandbox's (its handle's), not the server's: a kata sandbox's handle.
        as_kata = SandboxHandle(sandbox.sandbox_id, sandbox.provider, {**sandbox.data, "runtime": "kata-runtime"})
        with pytest.raises(BadRequest, match="runc, crun or runsc"):
            await provider.exec(as_kata, ExecSpec(["/bin/sh"], stdin=True, tty=True))


class TestDockerTtyRunc(DockerTtyChecks):
    runtime = "runc"


class TestDockerTtyRunsc(DockerTtyChecks):
    runtime = "runsc"
    pts_name = False  # gVisor's terminal has no /dev/pts name (as with native runsc)


class TestDockerTtyCrun(DockerTtyChecks):
    runtime = "crun"
