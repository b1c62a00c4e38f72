"""The official `stacyvm` SDK against a live server with the docker provider enabled, plus
the SIGKILL-and-restart check: sandboxes are adopted, orphans destroyed, nothing leaks."""

from __future__ import annotations

import asyncio
import hashlib
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from stacyvm import Client, SandboxNotFound

from stacyvm_server.config import DockerConfig, ServerConfig, Settings
from stacyvm_server.ids import new_sandbox_id
from stacyvm_server.providers.base import SandboxSpec
from stacyvm_server.providers.docker import DockerProvider
from stacyvm_server.providers.docker.provider import disk_quota_support
from tests.conftest import ServerProc, destroy_all, discard_server, kill_server, start_server, stop_server
from tests.providers import docker_fixtures
from tests.providers.docker_fixtures import DOCKER_BUSYBOX, docker_api, labelled_containers

docker_daemon = docker_fixtures.docker_daemon

DOCKER_ON = {"docker": {"enabled": True}}


@pytest.fixture(scope="module")
def docker_server(docker_daemon: None, test_images: dict[str, str],
                  tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProc]:
    server = start_server(tmp_path_factory.mktemp("docker-server"), extra=DOCKER_ON)
    yield server
    destroy_all(server)
    stop_server(server)
    shutil.rmtree(server.data_dir, ignore_errors=True)


def test_sdk_spawn_exec_files_destroy(docker_server: ServerProc) -> None:
    with Client(docker_server.base_url) as client:
        docker = [p for p in client.providers() if p["name"] == "docker"]
        assert docker and docker[0]["healthy"] is True
        sb = client.spawn(image=DOCKER_BUSYBOX, provider="docker", ttl="10m", metadata={"suite": "docker"})
        try:
            assert sb.provider == "docker" and sb.state == "running"
            assert labelled_containers(f"stacyvm.sandbox_id={sb.id}")
            r = sb.exec("echo hello; echo oops >&2; exit 3")
            assert (r.stdout, r.stderr, r.exit_code) == ("hello\n", "oops\n", 3)
            assert sb.exec("echo", args=["a b", "it's"]).stdout == "a b it's\n"
            assert sb.exec("echo $FOO", env={"FOO": "bar"}).stdout == "bar\n"
            assert sb.exec("pwd", workdir="/tmp").stdout == "/tmp\n"
            chunks = list(sb.exec_stream("echo one; echo two >&2; echo three"))
            assert "".join(c.data for c in chunks if c.stream == "stdout") == "one\nthree\n"
            assert "".join(c.data for c in chunks if c.stream == "stderr") == "two\n"
            sb.write_file("/workspace/hello.txt", "hello world")
            assert sb.read_file("/workspace/hello.txt") == "hello world"
            sb.write_file("/workspace/sub/nested.log", "nested", mode="0600")
            names = {f["path"] for f in sb.list_files("/workspace")}
            assert {"/workspace/hello.txt", "/workspace/sub"} <= names
            assert sb.glob_files("/workspace/*/*.log") == ["/workspace/sub/nested.log"]
            assert sb.exec("cat /workspace/sub/nested.log").stdout == "nested"
            with pytest.raises(Exception):  # noqa: B017 - the SDK's file error class varies by status
                sb.read_file("/workspace/missing.txt")
        finally:
            sb.destroy()
        with pytest.raises(SandboxNotFound):
            client.get(sb.id)
        assert labelled_containers(f"stacyvm.sandbox_id={sb.id}") == []


def _orphan(data_dir: Path) -> str:
    """A container of this server that its store does not know (as if created before a crash)."""
    settings = Settings(server=ServerConfig(data_dir=data_dir), docker=DockerConfig(enabled=True))

    async def make() -> str:
        p = DockerProvider(settings)
        try:
            h = await p.create(SandboxSpec(new_sandbox_id(), DOCKER_BUSYBOX, 64, 1))
            return h.sandbox_id
        finally:
            await p.close()

    return asyncio.run(make())


def test_sigkill_and_restart_adopts_and_leaves_nothing(docker_daemon: None, test_images: dict[str, str],
                                                       tmp_path_factory: pytest.TempPathFactory) -> None:
    root = tmp_path_factory.mktemp("docker-kill")
    server = start_server(root, extra=DOCKER_ON)
    try:
        with Client(server.base_url) as client:
            kept = [client.spawn(image=DOCKER_BUSYBOX, provider="docker", ttl="10m") for _ in range(3)]
            kept[0].write_file("/workspace/state.txt", "survives")
        kill_server(server)
        orphan = _orphan(server.data_dir)
        assert len(labelled_containers()) >= 4

        server = start_server(root, extra=DOCKER_ON)  # same data dir: the store survives
        with Client(server.base_url) as client:
            for sb in kept:
                again = client.get(sb.id)
                assert again.state == "running"
                assert again.exec("echo adopted").stdout == "adopted\n"
            assert client.get(kept[0].id).read_file("/workspace/state.txt") == "survives"
            assert labelled_containers(f"stacyvm.sandbox_id={orphan}") == []  # reconcile removed it
        destroy_all(server)
        stop_server(server)
        assert labelled_containers() == []  # docker ps -aq --filter label=stacyvm.sandbox_id
    finally:
        discard_server(server)


def test_disk_mb_refused_where_docker_cannot_cap_it(docker_server: ServerProc) -> None:
    """A disk cap the storage driver cannot enforce is a 400 before anything is made, never a
    silently unlimited sandbox (this host: overlay2 on ext4)."""
    why = disk_quota_support(docker_api("GET", "/info").json())
    if not why:
        pytest.skip("this dockerd can cap a container's writable layer, so disk_mb is enforced, not refused")
    with httpx.Client(base_url=docker_server.base_url + "/api/v1", timeout=60) as api:
        before = api.get("/sandboxes").json()
        r = api.post("/sandboxes", json={"provider": "docker", "image": DOCKER_BUSYBOX, "disk_mb": 64})
        assert r.status_code == 400, r.text
        assert r.json()["code"] == "bad_request", r.text
        assert r.json()["message"].startswith(f"disk_mb cannot be enforced by this docker host: {why}"), r.text
        assert api.get("/sandboxes").json() == before  # nothing stored
        r = api.post("/sandboxes", json={"provider": "native", "disk_mb": 64})  # native caps it
        assert r.status_code == 201, r.text
        assert api.delete(f"/sandboxes/{r.json()['id']}").status_code == 200


def test_disk_quota_support_follows_the_storage_driver() -> None:
    def info(driver: str, backing: str = "") -> dict[str, Any]:
        return {"Driver": driver, "DriverStatus": [["Backing Filesystem", backing]] if backing else []}

    assert disk_quota_support(info("overlay2", "xfs")) == ""  # dockerd itself checks pquota at create
    assert disk_quota_support(info("btrfs")) == "" and disk_quota_support(info("zfs")) == ""
    assert disk_quota_support(info("overlay2", "extfs")) == \
        "storage driver overlay2 on extfs (size limits need xfs with pquota)"
    assert "no per-container size limit" in disk_quota_support(info("vfs"))


def test_spawn_runtime_field(docker_daemon: None, test_images: dict[str, str],
                             tmp_path_factory: pytest.TempPathFactory) -> None:
    """`runtime` on spawn: allowed runtimes are used, the rest is a 400 before anything is made."""
    if "runsc" not in (docker_api("GET", "/info").json().get("Runtimes") or {}):
        pytest.skip("runsc is not registered in dockerd here (scripts/setup-docker.sh registers it)")
    server = start_server(tmp_path_factory.mktemp("docker-runtime"),
                          extra={"docker": {"enabled": True, "allowed_runtimes": ["runsc"]}})
    ours = f"stacyvm.instance={hashlib.sha256(str(server.data_dir.resolve()).encode()).hexdigest()[:16]}"
    try:
        with httpx.Client(base_url=server.base_url + "/api/v1", timeout=60) as api:
            body = {"provider": "docker", "image": DOCKER_BUSYBOX, "ttl": "10m"}
            for runtime, says in (("crun", "is not allowed here (allowed: runc, runsc"),
                                  ("nope", "is unknown"), (7, "runtime: must be a string")):
                r = api.post("/sandboxes", json={**body, "runtime": runtime})
                assert r.status_code == 400, r.text
                assert r.json()["code"] == "bad_request" and says in r.json()["message"], r.text
            r = api.post("/sandboxes", json={"provider": "native", "runtime": "runc"})
            assert r.status_code == 400 and "no per-spawn runtime choice" in r.json()["message"], r.text
            assert api.get("/sandboxes").json() == []  # nothing stored for the refused spawns
            assert labelled_containers(ours) == []
            made = {}
            for runtime in ("runsc", None):
                r = api.post("/sandboxes", json={**body, **({"runtime": runtime} if runtime else {})})
                assert r.status_code == 201, r.text
                made[runtime or "runc"] = r.json()["id"]
            assert len(labelled_containers(ours)) == 2
            for runtime, sid in made.items():
                info = docker_api("GET", f"/containers/stacyvm-{sid}/json").json()
                assert info["HostConfig"]["Runtime"] == runtime
                out = api.post(f"/sandboxes/{sid}/exec", json={"command": "cat /proc/version"}).json()["stdout"]
                assert ("4.4.0" in out) == (runtime == "runsc")  # gVisor's kernel version
    finally:
        destroy_all(server)
        stop_server(server)
        shutil.rmtree(server.data_dir, ignore_errors=True)
    assert labelled_containers(ours) == []
