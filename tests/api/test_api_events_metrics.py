"""SSE events with id lines and Last-Event-ID replay; Prometheus and JSON metrics."""

from __future__ import annotations

import asyncio
import json
import queue
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx

from stacyvm_server.http.streaming import with_keepalive


class SseReader:
    """Reads (id, event) pairs from /events on a thread until stopped."""

    def __init__(self, url: str, key: str, last_event_id: str | None = None) -> None:
        self.events: queue.Queue[tuple[int, dict[str, Any]]] = queue.Queue()
        self.connected = threading.Event()
        headers = {"X-API-Key": key}
        if last_event_id is not None:
            headers["Last-Event-ID"] = last_event_id
        self._client = httpx.Client(timeout=httpx.Timeout(60, read=60))
        self._args = (url + "/api/v1/events", headers)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.content_type = ""
        self._thread.start()
        assert self.connected.wait(10), "no SSE connection"

    def _run(self) -> None:
        url, headers = self._args
        try:
            with self._client.stream("GET", url, headers=headers) as resp:
                self.content_type = resp.headers.get("content-type", "")
                self.connected.set()
                seq = None
                for line in resp.iter_lines():
                    if line.startswith("id: "):
                        seq = int(line[4:])
                    elif line.startswith("data: "):
                        assert seq is not None, "data line without a preceding id line"
                        self.events.put((seq, json.loads(line[6:])))
                        seq = None
        except (httpx.HTTPError, RuntimeError):
            pass  # closed by stop()

    def wait_for(self, sandbox_id: str, types: set[str], timeout: float = 60) -> list[tuple[int, dict[str, Any]]]:
        seen: list[tuple[int, dict[str, Any]]] = []
        missing = set(types)
        deadline = time.monotonic() + timeout
        while missing:
            seq, ev = self.events.get(timeout=max(0.1, deadline - time.monotonic()))
            if ev.get("sandbox_id") == sandbox_id:
                seen.append((seq, ev))
                missing.discard(ev["type"])
        return seen

    def stop(self) -> None:
        self._client.close()


def test_events_stream_and_replay(keyed_server: Any, api: httpx.Client, images: dict[str, str]) -> None:
    key = keyed_server.keys["api"]
    reader = SseReader(keyed_server.base_url, key)
    try:
        assert reader.content_type.startswith("text/event-stream")
        resp = api.post("/sandboxes", json={"image": images["busybox"]})
        assert resp.status_code == 201, resp.text
        sid = resp.json()["id"]
        got = reader.wait_for(sid, {"sandbox.created", "sandbox.running"})
    finally:
        reader.stop()
    api.delete(f"/sandboxes/{sid}")
    by_type = {ev["type"]: (seq, ev) for seq, ev in got}
    created_seq, created = by_type["sandbox.created"]
    running_seq, _ = by_type["sandbox.running"]
    assert created_seq < running_seq
    assert created["id"] == f"evt-{created_seq}"
    assert created["timestamp"].endswith("Z")
    assert set(created) <= {"id", "type", "sandbox_id", "timestamp", "data"}

    # Reconnect from just before the creation: history is replayed, then live events follow.
    replay = SseReader(keyed_server.base_url, key, last_event_id=str(created_seq - 1))
    try:
        again = replay.wait_for(sid, {"sandbox.created", "sandbox.running", "sandbox.destroyed"})
    finally:
        replay.stop()
    assert [seq for seq, ev in again if ev["type"] == "sandbox.created"] == [created_seq]
    seqs = [seq for seq, _ in again]
    assert seqs == sorted(seqs)


def test_bad_last_event_id(api: httpx.Client) -> None:
    resp = api.get("/events", headers={"Last-Event-ID": "banana"})
    assert resp.status_code == 400 and resp.json()["code"] == "bad_request"


async def test_keepalive_during_silence() -> None:
    async def slow() -> AsyncIterator[int]:
        await asyncio.sleep(0.35)
        yield 1

    parts = [p async for p in with_keepalive(slow(), 0.1, lambda i: f"ev{i}".encode(), b":ka", preamble=b":hi")]
    assert parts[0] == b":hi" and parts[-1] == b"ev1"
    assert parts.count(b":ka") >= 2


async def test_keepalive_closes_source_when_abandoned() -> None:
    closed = asyncio.Event()

    async def endless() -> AsyncIterator[int]:
        try:
            while True:
                await asyncio.sleep(0.01)
                yield 1
        finally:
            closed.set()

    gen = with_keepalive(endless(), 1.0, lambda i: b"x", b":ka")
    assert await anext(gen) == b"x"
    await gen.aclose()  # what StreamingResponse does when the client goes away
    assert closed.is_set()


def test_prometheus_counts_spawn_and_exec(api: httpx.Client, live_sandbox: str) -> None:
    assert api.post(f"/sandboxes/{live_sandbox}/exec", json={"command": "true"}).status_code == 200
    resp = api.get("/metrics/prometheus")
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/plain")
    text = resp.text
    for op in ("spawn", "exec"):
        assert any(
            line.startswith("stacyvm_operations_total{") and f'operation="{op}"' in line and 'provider="native"' in line
            for line in text.splitlines()
        ), f"no {op} counter in:\n{text[:3000]}"
    assert "stacyvm_operation_seconds_bucket" in text

    snap = api.get("/metrics").json()
    assert "uptime" in snap and "sandboxes" in snap
    ops = {(o["operation"], o["provider"]) for o in snap["operations"]}
    assert ("spawn", "native") in ops and ("exec", "native") in ops
