"""Shared assertions and clients for the API tests (imported by file name: tests/ is no package)."""

from __future__ import annotations

from typing import Any

import httpx

API = "/api/v1"


def assert_error(resp: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    """The error envelope: exactly {code, message}, JSON, the expected status."""
    assert resp.status_code == status, (resp.status_code, resp.text)
    assert resp.headers["content-type"].startswith("application/json"), resp.headers
    body = resp.json()
    assert set(body) == {"code", "message"}, body
    assert isinstance(body["message"], str) and body["message"]
    if code is not None:
        assert body["code"] == code, body
    return body


def role_client(base_url: str, key: str | None, **headers: str) -> httpx.Client:
    h = dict(headers)
    if key is not None:
        h["X-API-Key"] = key
    return httpx.Client(base_url=base_url + API, headers=h, timeout=60)
