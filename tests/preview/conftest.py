"""Preview fixtures: sandboxes running tests/preview/sandbox_app.py, and proxy helpers."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.conftest import PYTHON, ServerProc

APP = (Path(__file__).parent / "sandbox_app.py").read_text()


@dataclass
class PreviewBox:
    id: str
    server: ServerProc

    def host(self, port: int) -> str:
        return f"{port}-{self.id.replace('_', '-')}.localhost"

    def token(self, port: int, **extra: object) -> str:
        r = httpx.post(f"{self.server.base_url}/api/v1/sandboxes/{self.id}/previews", json={"port": port, **extra})
        assert r.status_code == 201, r.text
        return str(r.json()["token"])

    def get(self, port: int, path: str, token: str | None = None, **kw: object) -> httpx.Response:
        headers = {"Host": self.host(port)}
        if token:
            headers["X-Preview-Token"] = token
        return httpx.get(self.server.base_url + path, headers=headers, timeout=30, **kw)  # type: ignore[arg-type]


def _api(server: ServerProc) -> httpx.Client:
    return httpx.Client(base_url=server.base_url + "/api/v1", timeout=60)


def start_app(box: PreviewBox, port: int, bind: str = "0.0.0.0") -> None:
    with _api(box.server) as c:
        r = c.post(f"/sandboxes/{box.id}/files", json={"path": "/app.py", "content": APP})
        assert r.status_code == 200, r.text
        r = c.post(f"/sandboxes/{box.id}/exec",
                   json={"command": f"nohup python3 /app.py {port} {bind} >/tmp/app-{port}.log 2>&1 &"})
        assert r.status_code == 200, r.text
    token = box.token(port)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if box.get(port, "/headers", token).status_code == 200:
            return
        time.sleep(0.1)
    raise AssertionError(f"app on port {port} did not start")


def box_factory(server: ServerProc, **spawn: object) -> Iterator[Callable[[str], PreviewBox]]:
    """make(network) -> a new sandbox on `server` (spawn adds fields, e.g. provider); all destroyed after."""
    made: list[str] = []

    def make(network: str = "none") -> PreviewBox:
        with _api(server) as c:
            r = c.post("/sandboxes", json={"image": PYTHON, "network": network, "memory_mb": 256, **spawn})
            assert r.status_code == 201, r.text
            made.append(r.json()["id"])
            return PreviewBox(r.json()["id"], server)

    yield make
    with _api(server) as c:
        for sid in made:
            c.delete(f"/sandboxes/{sid}")


@pytest.fixture(scope="module")
def make_box(open_server: ServerProc) -> Iterator[Callable[[str], PreviewBox]]:
    yield from box_factory(open_server)


@pytest.fixture(scope="module")
def box(make_box: Callable[[str], PreviewBox]) -> PreviewBox:
    """One sandbox (network none) with the app on 8000 (0.0.0.0) and 3000 (127.0.0.1)."""
    b = make_box("none")
    start_app(b, 8000)
    start_app(b, 3000, "127.0.0.1")
    return b
