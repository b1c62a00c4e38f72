"""Fixtures for the docker provider tests (imported by test_docker.py).

`docker_daemon` makes sure dockerd answers: when the socket is silent it runs
scripts/setup-docker.sh (installs docker.io, starts dockerd) and stops that
dockerd again at the end of the session. Tests skip only when that fails.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import urllib.parse
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
import pytest_asyncio

from stacyvm_server.config import DockerConfig, ServerConfig, Settings
from stacyvm_server.providers.base import Provider

REPO = Path(__file__).resolve().parents[2]
SOCKET = "/var/run/docker.sock"
DOCKER_BUSYBOX = "127.0.0.1:5000/stacyvm/busybox:1.35"
DOCKER_PYTHON = "127.0.0.1:5000/stacyvm/debian-python:3.11"


def docker_api(method: str, path: str, **params: str) -> httpx.Response:
    """A synchronous call to the local Docker Engine API (for assertions)."""
    with httpx.Client(transport=httpx.HTTPTransport(uds=SOCKET), base_url="http://docker/v1.41",
                      timeout=60) as c:
        return c.request(method, path, params=params)


def docker_answers() -> bool:
    try:
        return docker_api("GET", "/_ping").status_code == 200
    except httpx.HTTPError:
        return False


def labelled_containers(label: str = "stacyvm.sandbox_id") -> list[str]:
    """Ids of all containers (any state) with this label: `docker ps -aq --filter label=...`."""
    filters = json.dumps({"label": [label]})
    return [c["Id"] for c in docker_api("GET", "/containers/json", all="1", filters=filters).json()]


def _registry_has_images() -> bool:
    try:
        with httpx.Client(timeout=3) as c:
            return b"stacyvm/busybox" in c.get("http://127.0.0.1:5000/v2/_catalog").content
    except httpx.HTTPError:
        return False


@pytest.fixture(scope="session")
def docker_daemon() -> Iterator[None]:
    """dockerd answering on /var/run/docker.sock (started here when needed, and stopped after)."""
    started = False
    if not docker_answers():
        if shutil.which("bash") is None:
            pytest.skip("no bash to run scripts/setup-docker.sh")
        res = subprocess.run(["bash", str(REPO / "scripts/setup-docker.sh")], capture_output=True, text=True,
                             timeout=900, check=False)
        if res.returncode != 0 or not docker_answers():
            pytest.skip(f"dockerd cannot run here: setup-docker.sh exited {res.returncode}: "
                        f"{(res.stdout + res.stderr)[-1500:]}")
        started = "started" in res.stdout
    if not _registry_has_images():
        subprocess.run(["bash", str(REPO / "scripts/start-registry.sh")], capture_output=True, check=False)
        subprocess.run(["bash", str(REPO / "scripts/build-test-images.sh")], capture_output=True, check=False,
                       timeout=900)
    yield
    if started:
        subprocess.run(["bash", str(REPO / "scripts/stop-docker.sh")], capture_output=True, check=False)


@pytest.fixture(scope="session")
def docker_scratch() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="stacyvm-dtest-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def docker_settings(scratch: Path, runtime: str = "runc", **docker: object) -> Settings:
    return Settings(
        server=ServerConfig(data_dir=scratch / f"data-{runtime}"),
        docker=DockerConfig(enabled=True, runtime=runtime, **docker),  # type: ignore[arg-type]
    )


async def make_docker_provider(scratch: Path, runtime: str = "runc", **docker: object) -> Provider:
    from stacyvm_server.providers.docker import DockerProvider

    p = DockerProvider(docker_settings(scratch, runtime, **docker))
    await p.start()
    return p


async def destroy_everything(p: Provider) -> None:
    for item in await p.inventory():
        await p.destroy(item.handle)


@pytest_asyncio.fixture(scope="class", loop_scope="session")
async def docker_provider(request: pytest.FixtureRequest, docker_daemon: None,
                          docker_scratch: Path) -> AsyncIterator[Provider]:
    """The provider under test; the test class sets `runtime` ("runc", "crun", "runsc")."""
    runtime = getattr(request.cls, "runtime", "runc")
    p = await make_docker_provider(docker_scratch, runtime)
    probe = getattr(request.cls, "probe_runtime", None)
    if probe is not None:
        reason = await probe(p)
        if reason:
            await p.close()
            print(f"\ndocker+{runtime} skipped: {reason}")
            pytest.skip(f"docker with {runtime} does not work here: {reason}")
    yield p
    await destroy_everything(p)
    await p.close()


def image_in_docker(ref: str) -> bool:
    return docker_api("GET", f"/images/{urllib.parse.quote(ref, safe='/:')}/json").status_code == 200
