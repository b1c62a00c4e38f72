"""200 sandboxes through the API, some with failing execs, some with timed-out execs, some
ended by their TTL, the rest destroyed by DELETE: afterwards nothing of theirs is left
on the host (mounts, cgroups, netns, veths, nft elements, processes, directories)."""

from __future__ import annotations

import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from stacyvm_server.providers.native.network import host_ifname
from tests.conftest import ServerProc, start_server, stop_server

API = "/api/v1"
CYCLES = 200
CGROUP_ROOT = Path("/sys/fs/cgroup")


def host_traces(ids: set[str], data_dir: Path) -> list[str]:
    """Every trace of the given sandbox ids that is visible on the host."""
    found: list[str] = []
    mounts = Path("/proc/self/mountinfo").read_text()
    found += [f"mount of {i}" for i in ids if i in mounts]
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False).stdout
    found += [f"netns of {i}" for i in ids if i in netns]
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=False).stdout
    found += [f"veth of {i}" for i in ids if host_ifname(i) in links]
    nft = subprocess.run(["nft", "list", "ruleset"], capture_output=True, text=True, check=False).stdout
    found += [f"nft entry for {i}" for i in ids if i in nft]
    for hierarchy in CGROUP_ROOT.iterdir():
        base = hierarchy / "stacyvm"
        if base.is_dir():
            found += [f"cgroup {base / i}" for i in ids if (base / i).exists()]
    procs = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=False).stdout
    found += [f"process mentioning {i}" for i in ids if i in procs]
    boxes = data_dir / "native" / "sandboxes"
    found += [f"directory {boxes / i}" for i in ids if (boxes / i).exists()]
    return found


@pytest.fixture
def server(tmp_path: Path, test_images: dict[str, str]) -> ServerProc:
    srv = start_server(tmp_path / "leak")
    yield srv  # type: ignore[misc]
    stop_server(srv)
    shutil.rmtree(srv.data_dir, ignore_errors=True)


@pytest.mark.slow
def test_no_leaks_after_200_sandboxes(server: ServerProc, test_images: dict[str, str]) -> None:
    image = test_images["busybox"]
    ids: set[str] = set()
    ttl_ids: set[str] = set()

    def one(n: int) -> str:
        with httpx.Client(base_url=server.base_url + API, timeout=60) as c:
            ttl = "1s" if n % 5 == 0 else "10m"
            r = c.post("/sandboxes", json={"image": image, "ttl": ttl, "network": "bridge" if n % 4 == 0 else "none"})
            assert r.status_code == 201, r.text
            sid = str(r.json()["id"])
            if n % 5 == 0:
                return sid  # left for the TTL reaper
            if n % 3 == 0:
                r = c.post(f"/sandboxes/{sid}/exec", json={"command": "echo bad >&2; exit 7"})
                assert r.json()["exit_code"] == 7
            if n % 7 == 0:
                r = c.post(
                    f"/sandboxes/{sid}/exec", json={"command": "sleep 60 & sleep 60", "timeout": "200ms"}
                )
                assert r.status_code == 408, r.text
            assert c.delete(f"/sandboxes/{sid}").status_code == 200
            return sid

    with ThreadPoolExecutor(4) as pool:
        for n, sid in enumerate(pool.map(one, range(CYCLES))):
            ids.add(sid)
            if n % 5 == 0:
                ttl_ids.add(sid)
    assert len(ids) == CYCLES
    with httpx.Client(base_url=server.base_url + API, timeout=30) as c:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and any(c.get(f"/sandboxes/{i}").status_code != 404 for i in ttl_ids):
            time.sleep(0.25)
        left = {s["id"] for s in c.get("/sandboxes").json()} & ids
    assert not left, f"still listed: {sorted(left)[:5]}"
    traces = host_traces(ids, server.data_dir)
    assert not traces, "\n".join(traces[:20])
