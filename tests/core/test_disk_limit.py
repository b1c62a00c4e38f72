"""The writable layer can be capped per sandbox (disk_mb); the cap holds and leaves nothing behind."""

from __future__ import annotations

import httpx

from tests.conftest import ServerProc


def test_disk_limit_holds(open_server: ServerProc, test_images: dict[str, str]) -> None:
    with httpx.Client(base_url=open_server.base_url + "/api/v1", timeout=60) as c:
        r = c.post("/sandboxes", json={"image": test_images["busybox"], "disk_mb": 16})
        assert r.status_code == 201, r.text
        sb = r.json()
        assert sb["disk_mb"] == 16
        sid = sb["id"]
        try:
            small = c.post(f"/sandboxes/{sid}/exec", json={"command": "dd if=/dev/zero of=/ok bs=1M count=8"})
            assert small.json()["exit_code"] == 0, small.text
            big = c.post(f"/sandboxes/{sid}/exec", json={"command": "dd if=/dev/zero of=/big bs=1M count=32"})
            assert big.json()["exit_code"] != 0
            assert "No space left on device" in big.json()["stderr"]
            # The layer is full now; the API's own writes land in the same capped layer.
            api = c.post(f"/sandboxes/{sid}/files", json={"path": "/api.bin", "content": "x" * (3 << 20)})
            assert api.status_code == 400, api.text
        finally:
            assert c.delete(f"/sandboxes/{sid}").status_code == 200
    assert sid not in open("/proc/self/mountinfo").read()


def test_disk_limit_validated(open_server: ServerProc, test_images: dict[str, str]) -> None:
    with httpx.Client(base_url=open_server.base_url + "/api/v1", timeout=60) as c:
        for bad in (0, -5, "10", 10**9):
            r = c.post("/sandboxes", json={"image": test_images["busybox"], "disk_mb": bad})
            assert r.status_code == 400, (bad, r.text)
            assert "disk_mb" in r.json()["message"]
