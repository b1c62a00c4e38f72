"""Bad input and failure: every one is a clean 4xx with {code, message}, never a 5xx."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from api_helpers import assert_error, role_client

# ----------------------------------------------------------------------------- body decoding


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (b"{not json", "malformed JSON"),
        (b'{"image": "x",}', "malformed JSON"),
        (b"", "body is required"),
        (b"[1, 2]", "JSON object"),
        (b'"just a string"', "JSON object"),
        (b"\xff\xfe", "UTF-8"),
    ],
)
def test_malformed_bodies(api: httpx.Client, content: bytes, needle: str) -> None:
    body = assert_error(api.post("/sandboxes", content=content), 400, "bad_request")
    assert needle in body["message"]


@pytest.mark.parametrize(
    ("payload", "field", "text"),
    [
        ({"memory_mb": "1"}, "memory_mb", "must be an integer"),
        ({"memory_mb": 1.5}, "memory_mb", "must be an integer"),
        ({"memory_mb": True}, "memory_mb", "must be an integer"),
        ({"vcpus": "2"}, "vcpus", "must be an integer"),
        ({"memory_mb": -1}, "memory_mb", "greater than 0"),
        ({"memory_mb": 0}, "memory_mb", "greater than 0"),
        ({"vcpus": -2}, "vcpus", "greater than 0"),
        ({"memory_mb": 10**12}, "memory_mb", "less than"),
        ({"ttl": 600}, "ttl", "must be a string"),
        ({"ttl": "10x"}, "ttl", "invalid duration"),
        ({"ttl": "10"}, "ttl", "missing unit"),
        ({"ttl": "-5m"}, "ttl", "negative"),
        ({"ttl": "0s"}, "ttl", "positive"),
        ({"metadata": {"a": 1}}, "metadata.a", "must be a string"),
        ({"metadata": ["a"]}, "metadata", "must be an object"),
        ({"image": 5}, "image", "must be a string"),
        ({"image": "a\u0000b"}, "image", "NUL"),
        ({"network": "host"}, "network", ""),
    ],
)
def test_spawn_field_errors(api: httpx.Client, payload: dict[str, Any], field: str, text: str) -> None:
    body = assert_error(api.post("/sandboxes", json=payload), 400, "bad_request")
    assert body["message"].startswith(field + ":"), body
    assert text in body["message"], body


def test_unknown_fields_ignored_and_unknown_provider(api: httpx.Client) -> None:
    body = assert_error(api.post("/sandboxes", json={"provider": "nope", "user": "x", "cwd": "/"}), 404, "not_found")
    assert "nope" in body["message"]


def test_ttl_above_max(api: httpx.Client) -> None:
    body = api.post("/sandboxes", json={"ttl": "100h"})
    assert body.status_code in (400, 429), body.text
    assert "ttl" in body.json()["message"]


def test_oversized_body(api: httpx.Client) -> None:
    big = b'{"image": "' + b"x" * (5 * 1024 * 1024) + b'"}'
    assert_error(api.post("/sandboxes", content=big), 413, "payload_too_large")

    def chunks() -> Iterator[bytes]:
        for _ in range(6):
            yield b" " * (1024 * 1024)

    # No Content-Length: the server counts the streamed bytes.
    assert_error(api.post("/sandboxes", content=chunks()), 413, "payload_too_large")


# ----------------------------------------------------------------------------- exec, extend, files


@pytest.mark.parametrize(
    ("payload", "needle"),
    [
        ({"command": "true", "timeout": "abc"}, "timeout:"),
        ({"command": "true", "timeout": "-1s"}, "timeout:"),
        ({"command": "true", "timeout": 5}, "timeout:"),
        ({"command": "true", "mode": "bogus"}, "mode:"),
        ({"command": "", "mode": "argv"}, "command:"),
        ({"command": 1}, "command:"),
        ({"command": "echo", "args": "a"}, "args:"),
        ({"command": "echo", "args": [1]}, "args.0:"),
        ({"command": "echo", "env": {"A": 1}}, "env.A:"),
        ({"command": "echo", "env": {"A=B": "x"}}, "env:"),
        ({"command": "echo\u0000x"}, "command:"),
        ({"command": "echo", "stream": "yes"}, "stream:"),
    ],
)
def test_exec_errors(api: httpx.Client, live_sandbox: str, payload: dict[str, Any], needle: str) -> None:
    body = assert_error(api.post(f"/sandboxes/{live_sandbox}/exec", json=payload), 400, "bad_request")
    assert body["message"].startswith(needle), body


def test_exec_timeout_over_limit(api: httpx.Client, live_sandbox: str) -> None:
    resp = api.post(f"/sandboxes/{live_sandbox}/exec", json={"command": "true", "timeout": "20m", "stream": True})
    assert resp.status_code in (400, 429)
    assert "timeout" in resp.json()["message"]


@pytest.mark.parametrize(
    ("payload", "needle"),
    [({}, "ttl"), ({"ttl": ""}, "ttl"), ({"ttl": "x"}, "ttl:"), ({"ttl": "-5m"}, "ttl:"), ({"ttl": 5}, "ttl:")],
)
def test_extend_errors(api: httpx.Client, live_sandbox: str, payload: dict[str, Any], needle: str) -> None:
    body = assert_error(api.post(f"/sandboxes/{live_sandbox}/extend", json=payload), 400, "bad_request")
    assert body["message"].startswith(needle), body


def test_file_path_errors(api: httpx.Client, live_sandbox: str) -> None:
    base = f"/sandboxes/{live_sandbox}/files"
    for path in (None, "", "   "):
        params = {} if path is None else {"path": path}
        assert assert_error(api.get(base, params=params), 400, "bad_request")["message"].startswith("path")
        assert assert_error(api.get(base + "/stat", params=params), 400)["message"].startswith("path")
        assert assert_error(api.delete(base, params=params), 400)["message"].startswith("path")
    assert assert_error(api.get(base + "/glob"), 400)["message"].startswith("pattern")
    assert assert_error(api.post(base, json={"content": "x"}), 400)["message"].startswith("path")
    assert assert_error(api.post(base, json={"path": "", "content": "x"}), 400)["message"].startswith("path")
    nul = assert_error(api.get(base, params={"path": "/tmp/a\u0000b"}), 400)
    assert "path" in nul["message"] and "NUL" in nul["message"]
    assert_error(api.post(base, json={"path": "/tmp/\u0000", "content": ""}), 400)
    assert_error(api.post(base, json={"path": "/tmp/x", "content": "x", "mode": "rwx"}), 400)
    assert_error(api.post(base, json={"path": "/tmp/x", "content": "!!", "encoding": "base64"}), 400)
    assert_error(api.post(base, json={"path": "/tmp/x", "content": 5}), 400)
    assert_error(api.post(base + "/move", json={"old_path": "/tmp/x"}), 400)
    assert_error(api.post(base + "/chmod", json={"path": "/tmp/x"}), 400)
    assert_error(api.post(base + "/chmod", json={"path": "/tmp/x", "mode": "u+x; rm -rf /"}), 400)
    # A missing file is the caller's mistake (400), never 404 (that would mean the sandbox).
    missing = api.get(base, params={"path": "/no/such/file"})
    assert missing.status_code == 400, missing.text


def test_unicode_and_control_chars_in_paths(api: httpx.Client, live_sandbox: str) -> None:
    base = f"/sandboxes/{live_sandbox}/files"
    name = "/tmp/ünïcødé ☃ 日本.txt"
    assert api.post(base, json={"path": name, "content": "snow ☃"}).status_code == 200
    got = api.get(base, params={"path": name})
    assert got.status_code == 200 and got.content.decode() == "snow ☃"
    assert any(p.endswith("日本.txt") for p in api.get(base + "/glob", params={"pattern": "/tmp/*.txt"}).json())
    for weird in ("/tmp/a\u0001b", "/tmp/line\nbreak", "/tmp/tab\there", "/tmp/\u202eevil"):
        resp = api.post(base, json={"path": weird, "content": "x"})
        assert resp.status_code in (200, 400), (weird, resp.text)
        if resp.status_code == 400:
            assert_error(resp, 400)


@pytest.mark.parametrize(
    "sid",
    ["sb_☃", "sb_%E2%98%83", "%00", "sb_%0Aabc", "sb_%01", "..%2F..%2Fetc", "x" * 300, "SB_ABC", "sb-abc"],
)
def test_unicode_and_control_chars_in_ids(api: httpx.Client, sid: str) -> None:
    for resp in (
        api.get(f"/sandboxes/{sid}"),
        api.post(f"/sandboxes/{sid}/exec", json={"command": "true"}),
        api.get(f"/sandboxes/{sid}/files", params={"path": "/etc/hostname"}),
        api.get(f"/templates/{sid}"),
    ):
        assert resp.status_code in (400, 404), (sid, resp.status_code, resp.text)
        assert_error(resp, resp.status_code)


@pytest.mark.parametrize("owner", ["a/b", "a b", "tab\there", "x" * 129, "back\\slash"])
def test_bad_user_id(api: httpx.Client, owner: str) -> None:
    resp = api.get("/sandboxes", headers={"X-User-ID": owner})
    body = assert_error(resp, 400, "bad_request")
    assert "owner_id" in body["message"]


def test_template_errors(api: httpx.Client) -> None:
    assert assert_error(api.post("/templates", json={"image": "x"}), 400)["message"].startswith("name")
    assert assert_error(api.post("/templates", json={"name": "n"}), 400)["message"].startswith("image")
    assert_error(api.post("/templates", json={"name": "n", "image": "x", "ttl": "soon"}), 400)
    assert_error(api.post("/templates", json={"name": "n", "image": "x", "vcpus": 2, "cpu_cores": 3}), 400)
    assert_error(api.post("/templates", json={"name": "n", "image": "x", "memory_mb": -5}), 400)
    assert_error(api.post("/templates/none-such/spawn"), 404, "not_found")
    assert_error(api.post("/templates/none-such/spawn", content=b"{bad"), 400)
    assert_error(api.put("/templates/none-such", json={"image": "x"}), 404, "not_found")


def test_quota_errors(admin: httpx.Client) -> None:
    for payload, field in (
        ({"max_ttl": "nope"}, "max_ttl"),
        ({"max_exec_timeout": "-1s"}, "max_exec_timeout"),
        ({"max_sandboxes": -1}, "max_sandboxes"),
        ({"max_sandboxes": "3"}, "max_sandboxes"),
    ):
        body = assert_error(admin.put("/quotas/someone", json=payload), 400, "bad_request")
        assert body["message"].startswith(field), body
    assert_error(admin.put("/quotas/a%20b", json={}), 400)


def test_logs_lines_validation(api: httpx.Client, live_sandbox: str) -> None:
    assert_error(api.get(f"/sandboxes/{live_sandbox}/logs", params={"lines": "abc"}), 400)
    assert_error(api.get(f"/sandboxes/{live_sandbox}/logs", params={"lines": "-1"}), 400)


# ----------------------------------------------------------------------------- routing


def test_unknown_route_and_method(api: httpx.Client) -> None:
    assert_error(api.get("/nothing/here"), 404, "not_found")
    assert_error(api.patch("/sandboxes"), 405, "method_not_allowed")
    assert_error(api.put("/health"), 405)


# ----------------------------------------------------------------------------- auth


def test_missing_and_wrong_key(anon: httpx.Client, keyed_server: Any) -> None:
    body = assert_error(anon.get("/sandboxes"), 401, "unauthorized")
    assert body["message"] == "invalid or missing API key"
    assert_error(anon.post("/sandboxes", json={}), 401)
    assert_error(anon.get("/sandboxes", headers={"X-API-Key": "wrong"}), 401)
    assert_error(anon.get("/ready"), 401)
    assert_error(anon.get("/metrics"), 401)
    assert_error(anon.get("/events"), 401)
    # Auth comes before body validation: a bad body without a key is still a 401.
    assert_error(anon.post("/sandboxes", content=b"{bad"), 401)
    with role_client(keyed_server.base_url, None, **{"X-Admin-API-Key": keyed_server.keys["admin"]}) as c:
        assert c.get("/admin/quotas").status_code == 200


def test_health_is_open_and_says_little(anon: httpx.Client) -> None:
    health = anon.get("/health")
    assert health.status_code == 200 and set(health.json()) == {"status", "version", "uptime"}
    live = anon.get("/live")
    assert live.status_code == 200 and set(live.json()) == {"status", "version", "uptime"}
    assert live.json()["status"] == "alive"


def test_viewer_is_read_only(viewer: httpx.Client, live_sandbox: str, images: dict[str, str]) -> None:
    assert viewer.get("/sandboxes").status_code == 200
    assert viewer.get(f"/sandboxes/{live_sandbox}").status_code == 200
    forbidden = [
        viewer.post("/sandboxes", json={"image": images["busybox"]}),
        viewer.post(f"/sandboxes/{live_sandbox}/exec", json={"command": "true"}),
        viewer.post(f"/sandboxes/{live_sandbox}/exec", json={"command": "true", "stream": True}),
        viewer.post(f"/sandboxes/{live_sandbox}/files", json={"path": "/tmp/v", "content": ""}),
        viewer.delete(f"/sandboxes/{live_sandbox}/files", params={"path": "/tmp/v"}),
        viewer.post(f"/sandboxes/{live_sandbox}/files/move", json={"old_path": "/a", "new_path": "/b"}),
        viewer.post(f"/sandboxes/{live_sandbox}/files/chmod", json={"path": "/a", "mode": "644"}),
        viewer.post(f"/sandboxes/{live_sandbox}/extend", json={"ttl": "1h"}),
        viewer.delete(f"/sandboxes/{live_sandbox}"),
        viewer.delete("/sandboxes"),
        viewer.post("/templates", json={"name": "v", "image": "x"}),
        viewer.put("/templates/v", json={"image": "x"}),
        viewer.delete("/templates/v"),
        viewer.post("/templates/v/spawn"),
        viewer.put("/quotas/v", json={}),
    ]
    for resp in forbidden:
        assert_error(resp, 403, "forbidden")
    # Still running: the viewer's destroy did nothing.
    assert viewer.get(f"/sandboxes/{live_sandbox}").json()["state"] == "running"


def test_owner_scoping(keyed_server: Any, images: dict[str, str]) -> None:
    key = keyed_server.keys["api"]
    url = keyed_server.base_url
    with role_client(url, key, **{"X-User-ID": "user-b"}) as b, role_client(url, key, **{"X-User-ID": "user-a"}) as a:
        resp = b.post("/sandboxes", json={"image": images["busybox"]})
        assert resp.status_code == 201, resp.text
        sid = resp.json()["id"]
        assert resp.json()["owner_id"] == "user-b"
        try:
            # Another owner's sandbox answers 404, never 403: ids do not leak.
            assert_error(a.get(f"/sandboxes/{sid}"), 404, "not_found")
            assert_error(a.post(f"/sandboxes/{sid}/exec", json={"command": "true"}), 404)
            assert_error(a.get(f"/sandboxes/{sid}/files", params={"path": "/etc/passwd"}), 404)
            assert_error(a.post(f"/sandboxes/{sid}/extend", json={"ttl": "1h"}), 404)
            assert_error(a.delete(f"/sandboxes/{sid}"), 404)
            assert sid not in [s["id"] for s in a.get("/sandboxes").json()]
            assert sid in [s["id"] for s in b.get("/sandboxes").json()]
            # Without X-User-ID the key sees its whole tenant.
            with role_client(url, key) as whole:
                assert whole.get(f"/sandboxes/{sid}").status_code == 200
            # A key of another tenant does not.
            with role_client(url, keyed_server.keys["tenant"]) as t2:
                assert_error(t2.get(f"/sandboxes/{sid}"), 404)
        finally:
            assert b.delete(f"/sandboxes/{sid}").status_code == 200


def test_fixed_owner_key(keyed_server: Any, images: dict[str, str]) -> None:
    url, key = keyed_server.base_url, keyed_server.keys["owned"]
    with role_client(url, key, **{"X-User-ID": "bob"}) as as_bob:
        assert_error(as_bob.get("/sandboxes"), 403, "forbidden")
    with role_client(url, key) as c:
        resp = c.post("/sandboxes", json={"image": images["busybox"], "owner_id": "mallory"})
        assert resp.status_code == 201, resp.text
        try:
            assert resp.json()["owner_id"] == "alice"
        finally:
            c.delete(f"/sandboxes/{resp.json()['id']}")
