"""Lifecycle across time and crashes, on a real server with the native provider:
TTL timers, restarts that lose nothing, and startup reconcile after SIGKILL."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import ServerProc, kill_server, start_server, stop_server

API = "/api/v1"


def _spawn(c: httpx.Client, image: str, ttl: str = "10m") -> dict[str, object]:
    r = c.post(f"{API}/sandboxes", json={"image": image, "ttl": ttl})
    assert r.status_code == 201, r.text
    body: dict[str, object] = r.json()
    return body


def _native_ids(server: ServerProc) -> set[str]:
    """Sandbox ids that still have state on the host (their directory under the native state dir)."""
    root = server.data_dir / "native" / "sandboxes"
    if not root.is_dir():
        return set()
    return {p.name for p in root.iterdir() if p.name.startswith("sb_")}


def _crun_ids(server: ServerProc) -> set[str]:
    state = server.data_dir / "native" / "runtime"
    out = subprocess.run(["crun", "--root", str(state), "list", "-q"], capture_output=True, text=True, check=False)
    return {line.strip() for line in out.stdout.splitlines() if line.strip()}


def _wait_gone(c: httpx.Client, sid: str, timeout: float) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if c.get(f"{API}/sandboxes/{sid}").status_code == 404:
            return time.monotonic() - start
        time.sleep(0.1)
    raise AssertionError(f"{sid} still present after {timeout}s")


def _events(server: ServerProc, sid: str) -> list[dict[str, object]]:
    """Replay the event history for one sandbox through SSE (Last-Event-ID: 0)."""
    found: list[dict[str, object]] = []
    with (
        httpx.Client(base_url=server.base_url, timeout=httpx.Timeout(5, read=1.5)) as c,
        c.stream("GET", f"{API}/events", headers={"Last-Event-ID": "0"}) as resp,
    ):
        try:
            for line in resp.iter_lines():
                if line.startswith("data:"):
                    ev = json.loads(line[5:])
                    if ev.get("sandbox_id") == sid:
                        found.append(ev)
        except httpx.ReadTimeout:
            pass  # history replayed; nothing live is expected
    return found


@pytest.fixture
def server(tmp_path: Path, test_images: dict[str, str]) -> ServerProc:
    srv = start_server(tmp_path / "srv")
    yield srv  # type: ignore[misc]
    if srv.proc.poll() is None:
        stop_server(srv)
    shutil.rmtree(srv.data_dir, ignore_errors=True)


def test_ttl_destroys_within_a_second(server: ServerProc, test_images: dict[str, str]) -> None:
    with httpx.Client(base_url=server.base_url, timeout=60) as c:
        sb = _spawn(c, test_images["busybox"], ttl="2s")
        sid = str(sb["id"])
        assert sid in _native_ids(server)
        gone_after = _wait_gone(c, sid, timeout=10)
        # created_at + 2s is the deadline; allow one second of slack plus request time.
        assert gone_after < 3.5, gone_after
        assert sid not in _native_ids(server)
        assert sid not in _crun_ids(server)
    destroyed = [e for e in _events(server, sid) if e["type"] == "sandbox.destroyed"]
    assert destroyed and destroyed[-1]["data"] == {"reason": "ttl"}


def test_restart_keeps_sandboxes(server: ServerProc, test_images: dict[str, str], tmp_path: Path) -> None:
    with httpx.Client(base_url=server.base_url, timeout=60) as c:
        sid = str(_spawn(c, test_images["busybox"])["id"])
        assert c.post(f"{API}/sandboxes/{sid}/files", json={"path": "/tmp/keep", "content": "still here"}).is_success
    stop_server(server)
    again = start_server(tmp_path / "srv")
    try:
        with httpx.Client(base_url=again.base_url, timeout=60) as c:
            got = c.get(f"{API}/sandboxes/{sid}")
            assert got.status_code == 200 and got.json()["state"] == "running"
            r = c.post(f"{API}/sandboxes/{sid}/exec", json={"command": "cat /tmp/keep"})
            assert r.json()["stdout"] == "still here"
            assert c.delete(f"{API}/sandboxes/{sid}").status_code == 200
    finally:
        stop_server(again)


def test_expired_while_down_is_destroyed_at_startup(
    server: ServerProc, test_images: dict[str, str], tmp_path: Path
) -> None:
    with httpx.Client(base_url=server.base_url, timeout=60) as c:
        sid = str(_spawn(c, test_images["busybox"], ttl="3s")["id"])
    kill_server(server)
    time.sleep(3.5)
    assert sid in _native_ids(server)  # nobody was there to reap it
    again = start_server(tmp_path / "srv")
    try:
        with httpx.Client(base_url=again.base_url, timeout=60) as c:
            _wait_gone(c, sid, timeout=5)
        assert sid not in _native_ids(again)
        assert sid not in _crun_ids(again)
    finally:
        stop_server(again)


def test_sigkill_mid_spawn_leaves_no_orphans(
    server: ServerProc, test_images: dict[str, str], tmp_path: Path
) -> None:
    """SIGKILL the server while spawns are in flight; after restart nothing unknown survives."""
    results: list[int] = []

    def spawner() -> None:
        with httpx.Client(base_url=server.base_url, timeout=30) as c:
            for _ in range(10):
                try:
                    results.append(c.post(f"{API}/sandboxes", json={"image": test_images["busybox"]}).status_code)
                except httpx.HTTPError:
                    return

    threads = [threading.Thread(target=spawner) for _ in range(3)]
    for t in threads:
        t.start()
    time.sleep(0.6)
    kill_server(server)
    for t in threads:
        t.join(30)
    again = start_server(tmp_path / "srv")
    try:
        with httpx.Client(base_url=again.base_url, timeout=60) as c:
            listed = {sb["id"] for sb in c.get(f"{API}/sandboxes").json()}
            # Everything the host still has is a sandbox the store lists as alive, and vice versa.
            assert _native_ids(again) == listed
            assert _crun_ids(again) == listed
            for sid in listed:
                r = c.post(f"{API}/sandboxes/{sid}/exec", json={"command": "true"})
                assert r.status_code == 200, r.text
                assert c.delete(f"{API}/sandboxes/{sid}").status_code == 200
        assert _native_ids(again) == set()
    finally:
        stop_server(again)


def test_dead_sandbox_is_cleaned_up(server: ServerProc, test_images: dict[str, str]) -> None:
    """When the sandbox's init dies under us, the watchdog ends it with reason `crashed`."""
    with httpx.Client(base_url=server.base_url, timeout=60) as c:
        sid = str(_spawn(c, test_images["busybox"])["id"])
        pid = int((server.data_dir / "native" / "sandboxes" / sid / "init.pid").read_text())
        os.kill(pid, signal.SIGKILL)
        _wait_gone(c, sid, timeout=12)
    assert sid not in _native_ids(server)
    assert sid not in _crun_ids(server)
    destroyed = [e for e in _events(server, sid) if e["type"] == "sandbox.destroyed"]
    assert destroyed and destroyed[-1]["data"] == {"reason": "crashed"}
