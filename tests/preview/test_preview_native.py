"""The preview proxy on a live server with the native provider (docs/preview.md)."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import os
import time
from collections.abc import Callable, Iterator

import httpx
import websockets

from tests.conftest import ServerProc
from tests.preview.conftest import PreviewBox, start_app

MB = 1024 * 1024


def _rss(server: ServerProc) -> int:
    for line in open(f"/proc/{server.proc.pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_static_page_by_host(box: PreviewBox) -> None:
    r = box.get(8000, "/", box.token(8000))
    assert r.status_code == 200
    assert "StacyVM preview" in r.text
    assert r.headers["content-type"].startswith("text/html")


def test_path_form_and_forwarded_headers(box: PreviewBox) -> None:
    token = box.token(8000)
    url = f"{box.server.base_url}/preview/{box.id}/8000/headers?a=1"
    r = httpx.get(url, headers={"X-Preview-Token": token, "Cookie": "app=1"}, timeout=10)
    assert r.status_code == 200, r.text
    seen = r.json()
    assert seen["_target"] == "/headers?a=1"
    assert seen["host"] == "localhost:8000"
    assert seen["x-forwarded-for"] == "127.0.0.1"
    assert seen["x-forwarded-proto"] == "http"
    assert seen["x-forwarded-prefix"] == f"/preview/{box.id}/8000"
    assert seen["cookie"] == "app=1"
    assert "x-preview-token" not in seen


def test_query_token_becomes_cookie(box: PreviewBox) -> None:
    token = box.token(8000)
    with httpx.Client(base_url=box.server.base_url, headers={"Host": box.host(8000)}, timeout=10) as c:
        r = c.get(f"/headers?x=1&stacyvm_preview_token={token}")
        assert r.status_code == 302
        assert r.headers["location"] == "/headers?x=1"
        cookie = r.headers["set-cookie"]
        assert cookie.startswith(f"stacyvm_preview={token};")
        for attr in ("HttpOnly", "SameSite=Lax", "Path=/"):
            assert attr in cookie
        r = c.get("/headers?x=1", headers={"Cookie": f"stacyvm_preview={token}; other=2"})
        assert r.status_code == 200
        assert r.json()["cookie"] == "other=2"  # our cookie never reaches the app


def test_download_50mb_bounded_memory(box: PreviewBox) -> None:
    token = box.token(8000)
    before = _rss(box.server)
    for path in ("/big", "/bigchunked"):
        n, _digest = 0, hashlib.sha256()
        t0 = time.monotonic()
        headers = {"Host": box.host(8000), "X-Preview-Token": token}
        with httpx.stream("GET", f"{box.server.base_url}{path}?n={50 * MB}", headers=headers, timeout=60) as r:
            assert r.status_code == 200
            for chunk in r.iter_bytes():
                n += len(chunk)
        assert n == 50 * MB
        print(f"{path}: 50 MB in {time.monotonic() - t0:.2f}s")
    grown = _rss(box.server) - before
    assert grown < 20 * MB, f"server RSS grew by {grown / MB:.1f} MB"


def test_upload_50mb_bounded_memory_and_no_body_limit(box: PreviewBox) -> None:
    token = box.token(8000)
    before = _rss(box.server)
    block = os.urandom(MB)
    expected = hashlib.sha256(block * 50).hexdigest()

    def body() -> Iterator[bytes]:
        for _ in range(50):
            yield block

    headers = {"Host": box.host(8000), "X-Preview-Token": token}
    t0 = time.monotonic()
    r = httpx.post(f"{box.server.base_url}/upload", content=body(), headers=headers, timeout=120)  # chunked
    assert r.status_code == 200, r.text
    assert r.text == f"{50 * MB} {expected}"
    r = httpx.post(f"{box.server.base_url}/upload", content=block * 50, headers=headers, timeout=120)
    assert r.text == f"{50 * MB} {expected}"  # with Content-Length, above max_body_bytes (4 MB)
    print(f"2 x 50 MB up in {time.monotonic() - t0:.2f}s")
    grown = _rss(box.server) - before
    assert grown < 20 * MB, f"server RSS grew by {grown / MB:.1f} MB"


def test_sse_events_arrive_one_by_one(box: PreviewBox) -> None:
    headers = {"Host": box.host(8000), "X-Preview-Token": box.token(8000)}
    stamps = []
    with httpx.stream("GET", f"{box.server.base_url}/sse", headers=headers, timeout=30) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data:"):
                stamps.append(time.monotonic())
    assert len(stamps) == 5
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    assert all(g > 0.2 for g in gaps), gaps  # not buffered into one burst


async def test_websocket_echo(box: PreviewBox) -> None:
    token = box.token(8000)
    url = box.server.base_url.replace("http://", "ws://") + f"/preview/{box.id}/8000/ws"
    async with websockets.connect(url, additional_headers={"X-Preview-Token": token}) as ws:
        await ws.send("ping text")
        assert await ws.recv() == "ping text"
        blob = os.urandom(200_000)
        await ws.send(blob)
        assert await ws.recv() == blob


async def test_websocket_with_query_token(box: PreviewBox) -> None:
    token = box.token(8000)
    url = box.server.base_url.replace("http://", "ws://") + f"/preview/{box.id}/8000/ws?stacyvm_preview_token={token}"
    async with websockets.connect(url) as ws:
        await ws.send("by query")
        assert await ws.recv() == "by query"


def test_server_bound_to_loopback(box: PreviewBox) -> None:
    r = box.get(3000, "/", box.token(3000))
    assert r.status_code == 200
    assert "StacyVM preview" in r.text


def test_token_for_3000_rejected_on_8000(box: PreviewBox) -> None:
    r = box.get(8000, "/", box.token(3000))
    assert r.status_code == 403
    assert "port 3000" in r.json()["message"]


def test_token_of_another_sandbox_rejected(box: PreviewBox, make_box: Callable[[str], PreviewBox]) -> None:
    other = make_box("bridge")
    start_app(other, 8000)
    assert other.get(8000, "/", other.token(8000)).status_code == 200  # bridge mode works too
    r = other.get(8000, "/", box.token(8000))
    assert r.status_code == 403
    assert "another sandbox" in r.json()["message"]
    assert other.get(8000, "/", "x.1.2.forged").status_code == 401


def test_no_token_401_and_public_port(box: PreviewBox) -> None:
    r = box.get(8000, "/")
    assert r.status_code == 401
    assert "private" in r.json()["message"]
    api = f"{box.server.base_url}/api/v1/sandboxes/{box.id}/previews"
    assert httpx.put(f"{api}/8000", json={"public": True}).status_code == 200
    try:
        assert box.get(8000, "/").status_code == 200
        assert box.get(3000, "/").status_code == 401  # public per port
        listed = {p["port"]: p for p in httpx.get(api).json()}
        assert listed[8000]["public"] is True
    finally:
        httpx.put(f"{api}/8000", json={"public": False})
    assert box.get(8000, "/").status_code == 401


def test_unknown_sandbox_404(box: PreviewBox) -> None:
    r = httpx.get(box.server.base_url + "/", headers={"Host": "8000-sb-zzzzzzzzzzzz.localhost"})
    assert r.status_code == 404
    r = httpx.get(box.server.base_url + "/preview/sb_zzzzzzzzzzzz/8000/")
    assert r.status_code == 404


def test_nothing_listening_502(box: PreviewBox) -> None:
    r = box.get(8123, "/", box.token(8123))
    assert r.status_code == 502
    msg = r.json()["message"]
    assert "nothing is listening on port 8123" in msg and box.id in msg


def test_bad_port_and_api_validation(box: PreviewBox) -> None:
    api = f"{box.server.base_url}/api/v1/sandboxes/{box.id}/previews"
    assert httpx.post(api, json={"port": 0}).status_code == 400
    assert httpx.post(api, json={"port": 70000}).status_code == 400
    assert httpx.post(api, json={"port": "80"}).status_code == 400
    r = httpx.post(api, json={"port": 8000, "ttl": "5m"})
    body = r.json()
    assert r.status_code == 201
    assert body["url"].startswith(f"http://8000-{box.id.replace('_', '-')}.localhost:")
    assert set(body) >= {"url", "token", "expires_at", "port", "public"}
    assert httpx.post(f"{box.server.base_url}/api/v1/sandboxes/sb_zzzzzzzzzzzz/previews",
                      json={"port": 1}).status_code == 404
    _ = asyncio  # keep the import for the async tests' loop
