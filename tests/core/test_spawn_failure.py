"""A spawn that fails inside the provider leaves no running record and nothing on the host."""

from __future__ import annotations

import httpx

from tests.conftest import ServerProc


def test_failed_create_leaves_nothing(open_server: ServerProc, test_images: dict[str, str]) -> None:
    sandboxes_dir = open_server.data_dir / "native" / "sandboxes"
    before = set(sandboxes_dir.iterdir()) if sandboxes_dir.exists() else set()
    with httpx.Client(base_url=open_server.base_url + "/api/v1", timeout=60) as c:
        listed_before = {s["id"] for s in c.get("/sandboxes").json()}
        r = c.post("/sandboxes", json={"image": "127.0.0.1:5000/stacyvm/no-such-image:1"})
        assert r.status_code == 404, r.text
        assert r.json()["code"] == "not_found"
        assert "no-such-image" in r.json()["message"]
        listed_after = {s["id"] for s in c.get("/sandboxes").json()}
    assert listed_after == listed_before
    after = set(sandboxes_dir.iterdir()) if sandboxes_dir.exists() else set()
    assert after == before
