"""Helpers for API tests: httpx clients per role and a shared live sandbox."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from api_helpers import role_client


@pytest.fixture(scope="session")
def api(keyed_server: Any) -> Iterator[httpx.Client]:
    with role_client(keyed_server.base_url, keyed_server.keys["api"]) as c:
        yield c


@pytest.fixture(scope="session")
def admin(keyed_server: Any) -> Iterator[httpx.Client]:
    with role_client(keyed_server.base_url, keyed_server.keys["admin"]) as c:
        yield c


@pytest.fixture(scope="session")
def viewer(keyed_server: Any) -> Iterator[httpx.Client]:
    with role_client(keyed_server.base_url, keyed_server.keys["viewer"]) as c:
        yield c


@pytest.fixture(scope="session")
def anon(keyed_server: Any) -> Iterator[httpx.Client]:
    with role_client(keyed_server.base_url, None) as c:
        yield c


@pytest.fixture(scope="session")
def live_sandbox(api: httpx.Client, images: dict[str, str]) -> Iterator[str]:
    """One busybox sandbox shared by tests that only need somewhere to run."""
    resp = api.post("/sandboxes", json={"image": images["busybox"], "ttl": "30m"})
    assert resp.status_code == 201, resp.text
    sid: str = resp.json()["id"]
    yield sid
    api.delete(f"/sandboxes/{sid}")
