"""Property test: random JSON at the write endpoints never yields a 5xx, and errors keep the envelope.

Spawn, admission and template bodies always carry one invalid field, so no
sandbox is created and the fuzz stays on validation paths. Exec and file
bodies run against one live sandbox; exec gets a short timeout so random
commands cannot hang.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

FIELDS = [
    "image", "provider", "memory_mb", "vcpus", "ttl", "owner_id", "template", "metadata", "network", "env",
    "command", "args", "mode", "workdir", "timeout", "stream", "report_exit", "path", "content", "encoding",
    "old_path", "new_path", "name", "cpu_cores", "ttl_seconds", "version", "max_sandboxes", "max_ttl",
    "max_exec_timeout", "setup", "pool_size", "description",
]  # fmt: skip

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=40),
    st.sampled_from(["", "0", "1s", "-1s", "10m", "1h30m", "5x", "\x00", "/tmp/f", "../../etc", "argv", "base64"]),
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
bodies = st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=10), json_values, max_size=8)
# Each is invalid on its own, so a body holding one never reaches the provider.
poison = st.sampled_from(
    [("memory_mb", -1), ("memory_mb", "512"), ("vcpus", 0), ("ttl", "forever"), ("metadata", {"k": 1})]
)
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def fuzz_sandbox(api: httpx.Client, images: dict[str, str]) -> Iterator[str]:
    """Its own sandbox: random moves and commands may wreck it, and no other test cares."""
    resp = api.post("/sandboxes", json={"image": images["busybox"], "ttl": "30m"})
    assert resp.status_code == 201, resp.text
    sid: str = resp.json()["id"]
    yield sid
    api.delete(f"/sandboxes/{sid}")


def check(resp: httpx.Response) -> None:
    assert resp.status_code < 500, (resp.status_code, resp.text)
    if resp.status_code >= 400:
        body = resp.json()
        assert set(body) == {"code", "message"}, body
        assert isinstance(body["code"], str) and isinstance(body["message"], str)


def poisoned(body: dict[str, Any], bad: tuple[str, Any]) -> dict[str, Any]:
    return {**body, bad[0]: bad[1]}


@FUZZ
@given(body=bodies, bad=poison)
def test_fuzz_spawn_and_admission(api: httpx.Client, body: dict[str, Any], bad: tuple[str, Any]) -> None:
    for path in ("/sandboxes", "/sandboxes/admission"):
        resp = api.post(path, json=poisoned(body, bad))
        check(resp)
        assert resp.status_code == 400


@FUZZ
@given(body=bodies)
def test_fuzz_admission_unpoisoned(api: httpx.Client, body: dict[str, Any]) -> None:
    check(api.post("/sandboxes/admission", json=body))


@FUZZ
@given(body=bodies, bad=poison)
def test_fuzz_templates(api: httpx.Client, body: dict[str, Any], bad: tuple[str, Any]) -> None:
    resp = api.post("/templates", json=poisoned(body, bad))
    check(resp)
    assert resp.status_code == 400
    check(api.put("/templates/fuzz-none", json=poisoned(body, bad)))
    check(api.post("/templates/fuzz-none/spawn", json=body))


@FUZZ
@given(body=bodies, owner=st.text(max_size=20).filter(lambda s: s.isprintable() and "/" not in s and "?" not in s))
def test_fuzz_quotas(admin: httpx.Client, body: dict[str, Any], owner: str) -> None:
    resp = admin.put(f"/quotas/fuzz-{owner}", json=body)
    check(resp)
    if resp.status_code == 200:
        check(admin.delete(f"/quotas/fuzz-{owner}"))


@FUZZ
@given(body=bodies)
def test_fuzz_extend_unknown(api: httpx.Client, body: dict[str, Any]) -> None:
    # An unknown id: validation runs first, and no live sandbox gets a random TTL.
    resp = api.post("/sandboxes/sb_fuzz00000000/extend", json=body)
    check(resp)
    assert resp.status_code in (400, 404)


@FUZZ
@given(body=bodies)
def test_fuzz_exec(api: httpx.Client, fuzz_sandbox: str, body: dict[str, Any]) -> None:
    body = {**body, "timeout": "2s"}  # random commands must not hang the suite
    check(api.post(f"/sandboxes/{fuzz_sandbox}/exec", json=body))


@FUZZ
@given(body=bodies)
def test_fuzz_files(api: httpx.Client, fuzz_sandbox: str, body: dict[str, Any]) -> None:
    base = f"/sandboxes/{fuzz_sandbox}/files"
    check(api.post(base, json=body))
    check(api.post(base + "/move", json=body))
    check(api.post(base + "/chmod", json=body))


@FUZZ
@given(path=st.text(max_size=30), raw=st.binary(max_size=64))
def test_fuzz_file_queries_and_raw_bodies(api: httpx.Client, fuzz_sandbox: str, path: str, raw: bytes) -> None:
    base = f"/sandboxes/{fuzz_sandbox}/files"
    for sub in ("", "/stat", "/list"):
        check(api.get(base + sub, params={"path": path}))
    check(api.get(base + "/glob", params={"pattern": path}))
    check(api.post("/sandboxes", content=raw))
    check(api.post(f"/sandboxes/{fuzz_sandbox}/exec", content=raw))


@pytest.mark.parametrize("path", ["/sandboxes", "/templates", "/quotas/{owner_id}", "/events"])
def test_openapi_lists_routes(api: httpx.Client, path: str) -> None:
    spec = api.get("/openapi.json").json()
    assert "/api/v1" + path in spec["paths"] or any(p.startswith("/api/v1" + path) for p in spec["paths"])
