"""The seed flow of issue 2's acceptance, as plain HTTP (what the curl examples do)."""

from __future__ import annotations

import re
from datetime import datetime, timedelta

import httpx
from api_helpers import assert_error

SANDBOX_KEYS = {
    "id",
    "state",
    "provider",
    "image",
    "memory_mb",
    "vcpus",
    "worker_id",
    "created_at",
    "expires_at",
    "metadata",
    "preview_domain",
    "network",
}
RFC3339_Z = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")


def _ts(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def test_seed_flow(api: httpx.Client, images: dict[str, str]) -> None:
    spawn = {
        "image": images["busybox"],
        "provider": "native",
        "memory_mb": 256,
        "vcpus": 1,
        "ttl": "10m",
        "metadata": {"purpose": "seed", "who": "curl"},
    }
    resp = api.post("/sandboxes", json=spawn)
    assert resp.status_code == 201, resp.text
    assert resp.headers["content-type"] == "application/json"
    sb = resp.json()
    assert set(sb) == SANDBOX_KEYS, sb
    assert re.fullmatch(r"sb_[a-z0-9]{12}", sb["id"])
    assert sb["state"] == "running"
    assert (sb["provider"], sb["image"], sb["memory_mb"], sb["vcpus"]) == ("native", images["busybox"], 256, 1)
    assert sb["metadata"] == {"purpose": "seed", "who": "curl"}
    assert sb["worker_id"] == "local" and sb["preview_domain"] == "localhost" and sb["network"] == "none"
    assert RFC3339_Z.match(sb["created_at"]) and RFC3339_Z.match(sb["expires_at"])
    assert _ts(sb["expires_at"]) - _ts(sb["created_at"]) == timedelta(minutes=10)
    sid = sb["id"]

    try:
        resp = api.post(f"/sandboxes/{sid}/exec", json={"command": "echo $((6 * 7))"})
        assert resp.status_code == 200, resp.text
        result = resp.json()
        assert set(result) == {"exit_code", "stdout", "stderr", "duration"}
        assert (result["exit_code"], result["stdout"], result["stderr"]) == (0, "42\n", "")
        assert re.fullmatch(r"[0-9.]+(ns|µs|ms|s)|[0-9hm.]+s", result["duration"]), result["duration"]

        got = api.get(f"/sandboxes/{sid}").json()
        assert got == sb
        assert sid in [s["id"] for s in api.get("/sandboxes").json()]
    finally:
        first = api.delete(f"/sandboxes/{sid}")
        assert first.status_code == 200 and first.json() == {"status": "destroyed"}

    again = api.delete(f"/sandboxes/{sid}")
    assert again.status_code == 200 and again.json() == {"status": "destroyed"}
    body = assert_error(api.get(f"/sandboxes/{sid}"), 404, "not_found")
    assert sid in body["message"]
    assert sid not in [s["id"] for s in api.get("/sandboxes").json()]


def test_unknown_sandbox(api: httpx.Client) -> None:
    body = assert_error(api.get("/sandboxes/sb_doesnotexist0"), 404, "not_found")
    assert re.fullmatch(r"sandbox .*sb_doesnotexist0.* not found", body["message"]), body


def test_defaults_applied(api: httpx.Client, images: dict[str, str]) -> None:
    resp = api.post("/sandboxes", json={"image": images["busybox"]})
    assert resp.status_code == 201, resp.text
    sb = resp.json()
    try:
        assert "metadata" not in sb and "owner_id" not in sb and "tenant_id" not in sb
        assert _ts(sb["expires_at"]) - _ts(sb["created_at"]) == timedelta(minutes=10)  # test config default
    finally:
        api.delete(f"/sandboxes/{sb['id']}")


def test_exec_stream_ndjson(api: httpx.Client, live_sandbox: str) -> None:
    body = {"command": "echo 1; echo warn >&2; exit 7", "stream": True}
    with api.stream("POST", f"/sandboxes/{live_sandbox}/exec", json=body) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"] == "application/x-ndjson"
        assert resp.headers["cache-control"] == "no-cache"
        lines = [line for line in resp.iter_lines() if line]
    import json

    objs = [json.loads(line) for line in lines]
    assert all(set(o) == {"stream", "data"} for o in objs), objs
    assert "".join(o["data"] for o in objs if o["stream"] == "stdout") == "1\n"
    assert "".join(o["data"] for o in objs if o["stream"] == "stderr") == "warn\n"

    # The opt-in trailer reports the exit code; the SDK never asks for it.
    body["report_exit"] = True
    resp = api.post(f"/sandboxes/{live_sandbox}/exec", json=body)
    last = json.loads(resp.text.strip().splitlines()[-1])
    assert last == {"stream": "exit", "exit_code": 7}


def test_exec_stream_arrives_incrementally(api: httpx.Client, live_sandbox: str) -> None:
    import time

    body = {"command": "echo first; sleep 2; echo second", "stream": True}
    start = time.monotonic()
    with api.stream("POST", f"/sandboxes/{live_sandbox}/exec", json=body) as resp:
        lines = resp.iter_lines()
        first = next(line for line in lines if line)
        first_at = time.monotonic() - start
        rest = [line for line in lines if line]
    assert '"first' in first and first_at < 1.5, (first, first_at)
    assert any("second" in line for line in rest)


def test_logs_and_stats(api: httpx.Client, live_sandbox: str) -> None:
    logs = api.get(f"/sandboxes/{live_sandbox}/logs", params={"lines": "5"})
    assert logs.status_code == 200 and isinstance(logs.json(), list)
    assert len(logs.json()) <= 5
    stats = api.get(f"/sandboxes/{live_sandbox}/stats").json()
    assert stats["supported"] is True
    assert stats["mem_bytes"] > 0 and stats["mem_limit_bytes"] > 0 and stats["pids"] >= 1


def test_extend_returns_full_sandbox(api: httpx.Client, live_sandbox: str) -> None:
    resp = api.post(f"/sandboxes/{live_sandbox}/extend", json={"ttl": "25m"})
    assert resp.status_code == 200, resp.text
    sb = resp.json()
    assert sb["id"] == live_sandbox and sb["state"] == "running"
    left = _ts(sb["expires_at"]) - datetime.now(_ts(sb["expires_at"]).tzinfo)
    assert timedelta(minutes=24) < left <= timedelta(minutes=25)


def test_binary_file_roundtrip(api: httpx.Client, live_sandbox: str) -> None:
    import base64

    data = bytes(range(256)) * 64
    resp = api.post(
        f"/sandboxes/{live_sandbox}/files",
        json={"path": "/tmp/blob.bin", "content": base64.b64encode(data).decode(), "encoding": "base64"},
    )
    assert resp.status_code == 200 and resp.json() == {"status": "written"}
    got = api.get(f"/sandboxes/{live_sandbox}/files", params={"path": "/tmp/blob.bin"})
    assert got.status_code == 200
    assert got.headers["content-type"] == "application/octet-stream"
    assert got.content == data


def test_templates_both_name_sets(api: httpx.Client, images: dict[str, str]) -> None:
    ref = {"name": "ref-names", "image": images["busybox"], "cpu_cores": 2, "ttl_seconds": 90, "memory_mb": 64}
    resp = api.post("/templates", json=ref)
    assert resp.status_code == 201, resp.text
    t = resp.json()
    try:
        assert (t["cpu_cores"], t["vcpus"], t["ttl_seconds"], t["ttl"]) == (2, 2, 90, "1m30s")
        put = api.put("/templates/ref-names", json={"image": images["busybox"], "vcpus": 1, "ttl": "2m"})
        assert put.status_code == 200, put.text
        assert (put.json()["cpu_cores"], put.json()["ttl_seconds"]) == (1, 120)
        assert api.get("/templates/ref-names").json()["ttl"] == "2m0s"
    finally:
        assert api.delete("/templates/ref-names").json() == {"status": "deleted"}
    assert_error(api.get("/templates/ref-names"), 404, "not_found")


def test_quota_routes(api: httpx.Client, admin: httpx.Client) -> None:
    assert_error(api.put("/quotas/q-owner", json={"max_sandboxes": 2}), 403, "forbidden")
    assert_error(api.put("/admin/quotas/q-owner", json={"max_sandboxes": 2}), 403, "forbidden")
    assert_error(api.get("/admin/quotas"), 403, "forbidden")
    resp = admin.put("/quotas/q-owner", json={"max_sandboxes": 2, "max_ttl": "2h", "max_exec_timeout": "1m"})
    assert resp.status_code == 200, resp.text
    q = resp.json()
    assert (q["owner_id"], q["max_sandboxes"], q["max_ttl"], q["max_exec_timeout"]) == ("q-owner", 2, "2h0m0s", "1m0s")
    assert api.get("/quotas/q-owner").json()["max_ttl"] == "2h0m0s"
    assert "q-owner" in [x["owner_id"] for x in api.get("/quotas").json()]
    summary = api.get("/quotas/summary").json()
    assert set(summary) == {"total", "with_max_sandboxes", "with_max_ttl", "with_max_exec_timeout"}
    assert summary["total"] >= 1
    usage = api.get("/quotas/q-owner/usage").json()
    assert usage["owner_id"] == "q-owner" and usage["quota_configured"] is True
    assert admin.get("/admin/quotas/q-owner").status_code == 200
    assert_error(api.delete("/quotas/q-owner"), 403, "forbidden")
    assert admin.delete("/admin/quotas/q-owner").json() == {"status": "deleted"}
    assert_error(api.get("/quotas/q-owner"), 404, "not_found")


def test_providers_routes(api: httpx.Client) -> None:
    detail = api.get("/providers/native").json()
    assert detail["name"] == "native" and detail["healthy"] is True and isinstance(detail["config"], dict)
    assert_error(api.get("/providers/nope"), 404, "not_found")
    assert api.post("/providers/test").json() == {"native": True}
    ready = api.get("/ready")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    assert ready.json()["ready_providers"] == 1


def test_request_id_and_cors(api: httpx.Client, anon: httpx.Client) -> None:
    resp = api.get("/health", headers={"X-Request-ID": "abc-123"})
    assert resp.headers["x-request-id"] == "abc-123"
    assert len(api.get("/health").headers["x-request-id"]) >= 16
    bad = api.get("/health", headers={"X-Request-ID": "bad id\twith spaces"})
    assert bad.headers["x-request-id"] != "bad id\twith spaces"
    # Preflight is answered before auth: no key, still 200.
    pre = anon.options("/sandboxes", headers={"Origin": "https://app.example", "Access-Control-Request-Method": "POST"})
    assert pre.status_code == 200
    assert pre.headers["access-control-allow-origin"] == "*"
    assert "X-API-Key" in pre.headers["access-control-allow-headers"]
