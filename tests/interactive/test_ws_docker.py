"""The exec WebSocket's terminal over a live server with the docker provider (runc): typed
lines into `sh`, Ctrl-C, resize, exit codes. Skips (with the reason printed) only when
dockerd cannot run here (tests/providers/docker_fixtures.py)."""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Iterator

import pytest

from tests.conftest import ServerProc, destroy_all, start_server, stop_server
from tests.interactive.conftest import api, session
from tests.providers import docker_fixtures
from tests.providers.docker_fixtures import DOCKER_BUSYBOX

pytestmark = pytest.mark.asyncio(loop_scope="session")

docker_daemon = docker_fixtures.docker_daemon


@pytest.fixture(scope="module")
def docker_server(docker_daemon: None, test_images: dict[str, str],
                  tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProc]:
    server = start_server(tmp_path_factory.mktemp("docker-ws-server"), extra={"docker": {"enabled": True}})
    yield server
    destroy_all(server)
    stop_server(server)
    shutil.rmtree(server.data_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def dbox(docker_server: ServerProc) -> Iterator[str]:
    with api(docker_server) as c:
        r = c.post("/sandboxes", json={"image": DOCKER_BUSYBOX, "provider": "docker", "ttl": "30m"})
        assert r.status_code == 201, r.text
        sid = str(r.json()["id"])
    yield sid
    with api(docker_server) as c:
        c.delete(f"/sandboxes/{sid}")


async def test_sh_typed_lines_resize_and_exit_42(docker_server: ServerProc, dbox: str) -> None:
    t0 = time.monotonic()
    async with session(docker_server, dbox, command="/bin/sh", mode="argv", tty=True, rows=20, cols=70) as s:
        await s.stdin("echo $((6*7))zz; tty\n")
        await s.until(b"42zz")
        await s.until(b"/dev/pts/")
        await s.stdin("stty size\n")
        await s.until(b"20 70")
        await s.send(type="resize", rows=33, cols=111)
        await s.stdin("stty size\n")
        await s.until(b"33 111")
        await s.stdin("exit 42\n")
        ex = await s.wait_exit()
    assert ex["exit_code"] == 42 and ex["signal"] is None and ex["reason"] is None
    assert {m["type"] for m in s.messages} <= {"output", "exit"}  # one stream for a terminal
    print(f"\ndocker ws tty session: {1000 * (time.monotonic() - t0):.0f} ms")


async def test_ctrl_c_interrupts_sleep(docker_server: ServerProc, dbox: str) -> None:
    async with session(docker_server, dbox, command="/bin/sh", mode="argv", tty=True) as s:
        await s.stdin("echo ready; exec sleep 100\n")
        await s.until(b"ready\r\n")
        await asyncio.sleep(0.3)
        t0 = time.monotonic()
        await s.stdin("\x03")
        ex = await s.wait_exit(10)
    took = time.monotonic() - t0
    assert took < 5
    assert ex["signal"] == 2 and ex["exit_code"] == 130
    print(f"\ndocker ws Ctrl-C to exit: {1000 * took:.0f} ms")


async def test_ctrl_c_foreground_job_then_shell_goes_on(docker_server: ServerProc, dbox: str) -> None:
    async with session(docker_server, dbox, command="/bin/sh", mode="argv", tty=True) as s:
        await s.stdin("sleep 100\n")
        await asyncio.sleep(0.5)
        await s.stdin("\x03")
        await s.stdin("echo rc=$?\n")
        await s.until(b"rc=130")
        await s.send(type="close_stdin")  # Ctrl-D: the shell exits
        ex = await s.wait_exit()
    assert ex["exit_code"] == 0


async def test_signal_message(docker_server: ServerProc, dbox: str) -> None:
    async with session(docker_server, dbox, command="sleep", args=["100"], mode="argv", tty=True) as s:
        await asyncio.sleep(0.3)
        await s.send(type="signal", signal="TERM")
        ex = await s.wait_exit(10)
    assert ex["signal"] == 15 and ex["exit_code"] == 143
