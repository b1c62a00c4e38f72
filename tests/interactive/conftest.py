"""Interactive exec fixtures: sandboxes on the open server and a WebSocket session helper."""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect

from tests import conftest as base
from tests.conftest import BUSYBOX, KEYS, PYTHON, ServerProc

ALLOWED_ORIGIN = "https://good.example"


def api(server: ServerProc, key: str | None = None, user: str | None = None) -> httpx.Client:
    headers = {}
    if key:
        headers["X-API-Key"] = key
    if user:
        headers["X-User-ID"] = user
    return httpx.Client(base_url=server.base_url + "/api/v1", headers=headers, timeout=60)


def spawn(server: ServerProc, image: str = BUSYBOX, key: str | None = None, user: str | None = None) -> str:
    with api(server, key, user) as c:
        r = c.post("/sandboxes", json={"image": image, "ttl": "30m"})
        assert r.status_code == 201, r.text
        return str(r.json()["id"])


def ws_url(server: ServerProc, sid: str) -> str:
    return server.base_url.replace("http://", "ws://") + f"/api/v1/sandboxes/{sid}/exec/ws"


@dataclass
class Session:
    """The client side of one interactive exec: collects output until `exit`."""

    ws: ClientConnection
    out: bytearray = field(default_factory=bytearray)
    err: bytearray = field(default_factory=bytearray)
    messages: list[dict[str, Any]] = field(default_factory=list)
    exit: dict[str, Any] | None = None

    async def send(self, **msg: Any) -> None:
        await self.ws.send(json.dumps(msg))

    async def stdin(self, data: str | bytes) -> None:
        if isinstance(data, bytes):
            await self.send(type="stdin", data_b64=base64.b64encode(data).decode())
        else:
            await self.send(type="stdin", data=data)

    async def _recv(self, timeout: float) -> dict[str, Any]:
        m: dict[str, Any] = json.loads(await asyncio.wait_for(self.ws.recv(), timeout))
        self.messages.append(m)
        kind = m.get("type")
        data = base64.b64decode(m["data_b64"]) if "data_b64" in m else m.get("data", "").encode()
        if kind in ("stdout", "output"):
            self.out += data
        elif kind == "stderr":
            self.err += data
        elif kind == "exit":
            self.exit = m
        return m

    async def until(self, needle: bytes, timeout: float = 15) -> bytes:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while needle not in self.out:
            left = deadline - loop.time()
            if left <= 0 or self.exit is not None:
                raise AssertionError(f"{needle!r} not in output {bytes(self.out)!r} ({self.messages[-3:]})")
            try:
                await self._recv(left)
            except TimeoutError:
                continue
        return bytes(self.out)

    async def wait_exit(self, timeout: float = 20) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.exit is None:
            await self._recv(max(0.01, deadline - loop.time()))
        return self.exit


class session:
    """Used like a function: `async with session(server, sid, command=...) as s`."""

    def __init__(self, server: ServerProc, sid: str, headers: dict[str, str] | None = None, **start: Any) -> None:
        self.cm = connect(ws_url(server, sid), additional_headers=headers or {}, max_size=None)
        self.start = {"type": "start", **start}

    async def __aenter__(self) -> Session:
        ws = await self.cm.__aenter__()
        await ws.send(json.dumps(self.start))
        return Session(ws)

    async def __aexit__(self, *exc: object) -> None:
        await self.cm.__aexit__(*exc)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def box(open_server: ServerProc) -> Iterator[str]:
    sid = spawn(open_server)
    yield sid
    with api(open_server) as c:
        c.delete(f"/sandboxes/{sid}")


@pytest.fixture(scope="module")
def pybox(open_server: ServerProc) -> Iterator[str]:
    sid = spawn(open_server, PYTHON)
    yield sid
    with api(open_server) as c:
        c.delete(f"/sandboxes/{sid}")


@pytest.fixture(scope="session")
def cors_server(test_images: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProc]:
    """A keyed server whose CORS allow-list names one origin."""
    orig = base._config

    def config(data_dir: Path, port: int, auth: dict[str, object] | None) -> dict[str, object]:
        cfg = orig(data_dir, port, auth)
        cfg["server"] = {**cfg["server"], "cors_allowed_origins": [ALLOWED_ORIGIN]}  # type: ignore[dict-item]
        return cfg

    base._config = config
    try:
        auth = {"keys": [{"key": KEYS["api"], "name": "api", "role": "api"},
                         {"key": KEYS["viewer"], "name": "viewer", "role": "viewer"},
                         {"key": KEYS["admin"], "name": "admin", "role": "admin"},
                         {"key": KEYS["owned"], "name": "owned", "role": "api", "owner": base.FIXED_OWNER}]}
        server = base.start_server(tmp_path_factory.mktemp("cors-server"), auth)
    finally:
        base._config = orig
    server.keys = dict(KEYS)
    yield server
    base.destroy_all(server)
    base.stop_server(server)
    shutil.rmtree(server.data_dir, ignore_errors=True)
