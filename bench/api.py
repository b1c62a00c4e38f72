"""The StacyVM REST API as the benchmark drives it.

Timed JSON calls (create, exec, destroy, the health floor) go through the
blocking client of bench/http1.py, one kept-alive connection per thread: the
same client code that times the raw Docker API calls, so the two sides differ
only by the server. Streams, files and previews use one keep-alive httpx client.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx

from bench.http1 import Http1Conn

PREFIX = "/api/v1"


class ApiError(RuntimeError):
    pass


@dataclass(frozen=True)
class SandboxSpec:
    image: str
    memory_mb: int = 256
    vcpus: int = 1
    ttl: str = "30m"
    network: str = "none"

    def body(self) -> dict[str, object]:
        return {
            "image": self.image, "memory_mb": self.memory_mb, "vcpus": self.vcpus,
            "ttl": self.ttl, "network": self.network,
        }


@dataclass(frozen=True)
class StreamTiming:
    headers_ms: float  # response headers received
    first_byte_ms: float  # first body byte (the first NDJSON line)
    total_ms: float  # last byte


_GO_UNITS = {"h": 3.6e6, "m": 6e4, "s": 1e3, "ms": 1.0, "us": 1e-3, "µs": 1e-3, "ns": 1e-6}
_GO_PART = re.compile(r"([0-9.]+)(h|ms|m|s|us|µs|ns)")


def go_duration_ms(text: str) -> float | None:
    """'1m2.5s', '12.3ms', '40µs' -> milliseconds; None when it does not parse."""
    parts = _GO_PART.findall(text or "")
    if not parts or "".join(n + u for n, u in parts) != text:
        return None
    return sum(float(n) * _GO_UNITS[u] for n, u in parts)


def _ms(t0: float) -> float:
    return (time.perf_counter() - t0) * 1000.0


def _check(resp: httpx.Response, what: str, status: int = 200) -> None:
    if resp.status_code != status:
        raise ApiError(f"{what}: HTTP {resp.status_code}: {resp.text[:300]}")


class Api:
    def __init__(self, url: str, api_key: str | None, max_connections: int = 64) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.AsyncClient(
            base_url=url.rstrip("/") + PREFIX,
            headers=headers,
            timeout=httpx.Timeout(300.0),
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
        )
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"server URL must be http://host:port, not {url!r}")
        self._tcp = (parts.hostname, parts.port or 80)
        self._host = parts.netloc
        self._headers = headers
        self._local = threading.local()  # one kept-alive connection per thread (bursts use threads)
        self._conns: list[Http1Conn] = []

    async def aclose(self) -> None:
        await self.client.aclose()
        for conn in self._conns:
            conn.close()

    def _conn(self) -> Http1Conn:
        conn: Http1Conn | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = Http1Conn(tcp=self._tcp, host=self._host, prefix=PREFIX,
                                                headers=self._headers)
            self._conns.append(conn)
        return conn

    def _json(self, method: str, target: str, what: str, status: int, body: Any = None) -> tuple[Any, float]:
        """One timed JSON call: (decoded body, ms from sending to the last byte)."""
        t0 = time.perf_counter()
        got, data = self._conn().call(method, target, body)
        ms = _ms(t0)
        if got != status:
            raise ApiError(f"{what}: HTTP {got}: {data[:300].decode(errors='replace')}")
        return (json.loads(data) if data else None), ms

    async def health(self) -> dict[str, object]:
        resp = await self.client.get("/health")
        _check(resp, "health")
        data: dict[str, object] = resp.json()
        return data

    def health_ms(self) -> float:
        return self._json("GET", "/health", "health", 200)[1]

    async def health_ms_httpx(self) -> float:
        """The same GET through httpx.AsyncClient: what that client library adds per call."""
        t0 = time.perf_counter()
        resp = await self.client.get("/health")
        ms = _ms(t0)
        _check(resp, "health")
        return ms

    def create(self, spec: SandboxSpec) -> tuple[str, float]:
        data, ms = self._json("POST", "/sandboxes", "create", 201, spec.body())
        if data.get("state") != "running":
            raise ApiError(f"create: state {data.get('state')!r}, not running")
        return str(data["id"]), ms

    def exec(self, sid: str, command: str, args: list[str]) -> tuple[float, float | None]:
        """argv-mode exec, synchronous JSON; raises unless the exit code is 0.

        Returns (round trip ms, the server's own `duration` of the exec in ms).
        """
        data, ms = self._json("POST", f"/sandboxes/{sid}/exec", "exec", 200,
                              {"command": command, "args": args, "mode": "argv"})
        if data.get("exit_code") != 0:
            raise ApiError(f"exec {command}: exit {data.get('exit_code')}: {str(data.get('stderr'))[:200]}")
        return ms, go_duration_ms(str(data.get("duration", "")))

    async def exec_stream(self, sid: str, command: str, args: list[str]) -> StreamTiming:
        t0 = time.perf_counter()
        body = {"command": command, "args": args, "mode": "argv", "stream": True}
        first: float | None = None
        data = b""
        async with self.client.stream("POST", f"/sandboxes/{sid}/exec", json=body) as resp:
            headers = _ms(t0)
            if resp.status_code != 200:
                await resp.aread()
                raise ApiError(f"exec stream: HTTP {resp.status_code}: {resp.text[:300]}")
            async for chunk in resp.aiter_raw():
                if chunk and first is None:
                    first = _ms(t0)
                data += chunk
        total = _ms(t0)
        if first is None or b'"stdout"' not in data:
            raise ApiError(f"exec stream: no stdout line in {data[:200]!r}")
        return StreamTiming(headers, first, total)

    def destroy(self, sid: str) -> float:
        return self._json("DELETE", f"/sandboxes/{sid}", "destroy", 200)[1]

    async def list_ids(self) -> list[str]:
        resp = await self.client.get("/sandboxes")
        _check(resp, "list")
        return [str(s["id"]) for s in resp.json() if s.get("state") not in ("destroyed",)]

    async def write_file(self, sid: str, path: str, encoded_body: bytes) -> float:
        """POST a pre-encoded JSON body (client-side base64/JSON work is not timed)."""
        t0 = time.perf_counter()
        resp = await self.client.post(
            f"/sandboxes/{sid}/files", content=encoded_body, headers={"Content-Type": "application/json"}
        )
        ms = _ms(t0)
        _check(resp, f"write {path}")
        return ms

    async def read_file(self, sid: str, path: str) -> tuple[float, int, str]:
        """Stream the file; returns (ms to last byte, bytes, sha256)."""
        h = hashlib.sha256()
        size = 0
        t0 = time.perf_counter()
        async with self.client.stream("GET", f"/sandboxes/{sid}/files", params={"path": path}) as resp:
            if resp.status_code != 200:
                await resp.aread()
                raise ApiError(f"read {path}: HTTP {resp.status_code}: {resp.text[:300]}")
            async for chunk in resp.aiter_raw():
                h.update(chunk)
                size += len(chunk)
        return _ms(t0), size, h.hexdigest()


def file_body(path: str, data: bytes) -> bytes:
    """The JSON body of a base64 file write, built without a second copy through json.dumps."""
    return b'{"path":"' + path.encode() + b'","encoding":"base64","content":"' + base64.b64encode(data) + b'"}'
