"""The official `stacyvm` SDK and the preview proxy against a live server with the
microvm provider, plus SIGKILL-and-restart: VMs are adopted and nothing leaks."""

from __future__ import annotations

import os
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from stacyvm import Client, SandboxNotFound

from tests.conftest import (
    BUSYBOX,
    PYTHON,
    ServerProc,
    destroy_all,
    discard_server,
    kill_server,
    start_server,
    stop_server,
)
from tests.preview.conftest import box_factory, start_app
from tests.providers.test_microvm import qemu_pids

MICROVM_ON = {"microvm": {"enabled": True, "assets_dir": "/var/cache/stacyvm/microvm-assets"}}


@pytest.fixture(scope="module")
def microvm_server(test_images: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProc]:
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 is not installed (scripts/setup-microvm.sh installs it)")
    server = start_server(tmp_path_factory.mktemp("microvm-server"), extra=MICROVM_ON)
    yield server
    destroy_all(server)
    stop_server(server)
    shutil.rmtree(server.data_dir, ignore_errors=True)
    # With no VM left, a clean shutdown also removes the provider's parent cgroups.
    assert not Path("/sys/fs/cgroup/memory/stacyvm-microvm").exists()


def test_sdk_spawn_exec_files_destroy(microvm_server: ServerProc) -> None:
    with Client(microvm_server.base_url) as client:
        mvm = [p for p in client.providers() if p["name"] == "microvm"]
        assert mvm and mvm[0]["healthy"] is True
        sb = client.spawn(image=BUSYBOX, provider="microvm", ttl="10m", metadata={"suite": "microvm"})
        try:
            assert sb.provider == "microvm" and sb.state == "running"
            assert qemu_pids(sb.id)
            assert sb.exec("uname -r").stdout.strip() != os.uname().release  # its own kernel
            r = sb.exec("echo hello; echo oops >&2; exit 3")
            assert (r.stdout, r.stderr, r.exit_code) == ("hello\n", "oops\n", 3)
            assert sb.exec("echo", args=["a b", "it's"]).stdout == "a b it's\n"
            assert sb.exec("echo $FOO", env={"FOO": "bar"}).stdout == "bar\n"
            chunks = list(sb.exec_stream("echo one; echo two >&2; echo three"))
            assert "".join(c.data for c in chunks if c.stream == "stdout") == "one\nthree\n"
            assert "".join(c.data for c in chunks if c.stream == "stderr") == "two\n"
            sb.write_file("/workspace/hello.txt", "hello world")
            assert sb.read_file("/workspace/hello.txt") == "hello world"
            assert sb.glob_files("/workspace/*.txt") == ["/workspace/hello.txt"]
        finally:
            sb.destroy()
        with pytest.raises(SandboxNotFound):
            client.get(sb.id)
        assert qemu_pids(sb.id) == []


def test_preview_reaches_a_server_bound_to_guest_loopback(microvm_server: ServerProc) -> None:
    for make in box_factory(microvm_server, provider="microvm"):
        box = make("none")  # no NIC at all: preview goes through the agent
        start_app(box, 8000, bind="127.0.0.1")
        r = box.get(8000, "/", box.token(8000))
        assert r.status_code == 200 and "StacyVM preview" in r.text
        assert box.get(8001, "/", box.token(8001)).status_code == 502  # nothing listens there
        assert box.get(8000, "/", box.token(8001)).status_code in (401, 403)  # token for another port


def test_sigkill_and_restart_adopts_and_leaves_nothing(test_images: dict[str, str],
                                                       tmp_path_factory: pytest.TempPathFactory) -> None:
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 is not installed (scripts/setup-microvm.sh installs it)")
    root = tmp_path_factory.mktemp("microvm-kill")
    server = start_server(root, extra=MICROVM_ON)
    try:
        with Client(server.base_url) as client:
            kept = [client.spawn(image=PYTHON, provider="microvm", ttl="10m") for _ in range(2)]
            kept[0].write_file("/workspace/state.txt", "survives")
        kill_server(server)
        os.kill(qemu_pids(kept[1].id)[0], signal.SIGKILL)  # one VM dies while the server is down

        server = start_server(root, extra=MICROVM_ON)  # same data dir
        with Client(server.base_url) as client:
            again = client.get(kept[0].id)
            assert again.state == "running"
            assert again.read_file("/workspace/state.txt") == "survives"
            assert again.exec("python3 -c 'print(6*7)'").stdout == "42\n"
            gone = [s for s in client.list() if s.id == kept[1].id]
            assert gone == [] or gone[0].state != "running"
        destroy_all(server)
        stop_server(server)
        assert qemu_pids(kept[0].id) == [] and qemu_pids(kept[1].id) == []
        assert not any((server.data_dir / "microvm" / "sandboxes").iterdir())
    finally:
        discard_server(server)
