"""Keep-alive upstream connections: reused per (sandbox, port), retried when stale, gone with the sandbox.

The app below (written into the sandbox) keeps connections alive and tells each answer which
connection it came over, so the tests can see reuse from outside.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from collections.abc import Callable

import httpx
import pytest

from stacyvm_server.http.preview import UpstreamPool, _Upstream
from stacyvm_server.providers.native.network import netns_path
from tests.preview.conftest import PreviewBox, _api

PORT = 8100
KEEPALIVE_APP = r'''
import asyncio, sys

count = 0

async def handle(reader, writer):
    global count
    count += 1
    conn, served, hangup = count, 0, False
    try:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            if hangup:  # close with the request unanswered, as an app whose idle timeout just fired
                return
            served += 1
            target = head.split(b" ", 2)[1]
            hangup = target.endswith(b"hangup=1")
            body = b"%d %d" % (conn, served)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
            await writer.drain()
    finally:
        writer.close()

async def main():
    async with await asyncio.start_server(handle, "0.0.0.0", int(sys.argv[1])) as server:
        await server.serve_forever()

asyncio.run(main())
'''


def _start(box: PreviewBox) -> str:
    with _api(box.server) as c:
        r = c.post(f"/sandboxes/{box.id}/files", json={"path": "/keepalive.py", "content": KEEPALIVE_APP})
        assert r.status_code == 200, r.text
        r = c.post(f"/sandboxes/{box.id}/exec",
                   json={"command": f"nohup python3 /keepalive.py {PORT} >/tmp/keepalive.log 2>&1 &"})
        assert r.status_code == 200, r.text
    token = box.token(PORT)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if box.get(PORT, "/", token).status_code == 200:
            return token
        time.sleep(0.1)
    raise AssertionError("keep-alive app did not start")


def _conn(box: PreviewBox, token: str, path: str = "/", method: str = "GET") -> tuple[int, int]:
    """(upstream connection number, requests served on it) as the app saw them."""
    r = httpx.request(method, box.server.base_url + path, headers={"Host": box.host(PORT), "X-Preview-Token": token},
                      timeout=10)
    assert r.status_code == 200, r.text
    conn, served = r.text.split()
    return int(conn), int(served)


def _socket_inodes(pid: int) -> set[str]:
    out = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            out.add(target[8:-1])
    return out


def _netns_tcp_inodes(sandbox_id: str) -> set[str]:
    """Inodes of the TCP sockets that live in the sandbox's netns (its /proc/net/tcp, seen from inside)."""
    res = subprocess.run(["nsenter", f"--net={netns_path(sandbox_id)}", "cat", "/proc/net/tcp", "/proc/net/tcp6"],
                         capture_output=True, text=True, check=True, timeout=10)
    return {f[9] for f in (line.split() for line in res.stdout.splitlines()) if len(f) > 9 and f[0] != "sl"}


@pytest.fixture(scope="module")
def keepalive(make_box: Callable[[str], PreviewBox]) -> tuple[PreviewBox, str]:
    box = make_box("none")
    return box, _start(box)


def test_one_upstream_connection_serves_many_requests(keepalive: tuple[PreviewBox, str]) -> None:
    box, token = keepalive
    seen = [_conn(box, token) for _ in range(5)]  # a new client connection each time
    assert len({c for c, _ in seen}) == 1, seen
    assert [s for _, s in seen] == sorted(s for _, s in seen)
    path = box.server.base_url + f"/preview/{box.id}/{PORT}/"
    r = httpx.get(path, headers={"X-Preview-Token": token}, timeout=10)
    assert r.text.split()[0] == str(seen[0][0])  # the path form shares the pool of (sandbox, port)


def test_app_closing_a_pooled_connection_is_retried(keepalive: tuple[PreviewBox, str]) -> None:
    box, token = keepalive
    first, _ = _conn(box, token, "/?hangup=1")  # the app will drop the next request on this connection
    second, served = _conn(box, token)  # sent on the pooled one, dropped, sent again on a new one
    assert second != first and served == 1
    third, _ = _conn(box, token, "/?hangup=1")
    # POST is not idempotent: never sent on a pooled connection, so never sent twice.
    post, _ = _conn(box, token, method="POST")
    assert post != third


def test_destroy_releases_pooled_connections(make_box: Callable[[str], PreviewBox]) -> None:
    box = make_box("none")
    token = _start(box)
    pid = box.server.proc.pid
    for _ in range(3):
        _conn(box, token)
    held = _socket_inodes(pid) & _netns_tcp_inodes(box.id)
    assert held, "no pooled connection into the sandbox's netns"
    with _api(box.server) as c:
        assert c.delete(f"/sandboxes/{box.id}").status_code == 200
    deadline = time.monotonic() + 5
    while _socket_inodes(pid) & held and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _socket_inodes(pid) & held, "a socket still holds the destroyed sandbox's netns"


async def test_pool_unit_expiry_drop_and_limit() -> None:
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]

    async def up() -> _Upstream:
        return _Upstream(*await asyncio.open_connection("127.0.0.1", port))

    pool = UpstreamPool(max_idle=2, idle_seconds=0.3)
    a, b, c = await up(), await up(), await up()
    key, other = ("native", "sb_a", 80), ("native", "sb_a", 81)
    pool.give(key, a)
    pool.give(key, b)
    pool.give(key, c)  # over the limit: closed
    assert len(pool) == 2 and c.writer.is_closing()
    assert pool.take(other) is None  # never another port's connection
    assert pool.take(key) is b  # most recent first
    pool.give(key, b)
    await asyncio.sleep(0.4)
    assert pool.take(key) is None  # expired ones are closed, not handed out
    assert a.writer.is_closing() and b.writer.is_closing()
    d = await up()
    pool.give(other, d)
    pool.drop("sb_a")
    assert len(pool) == 0 and d.writer.is_closing()
    server.close()
    await server.wait_closed()
