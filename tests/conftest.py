"""Session fixtures: the local test registry and real `stacyvm serve` subprocesses.

Servers run the real native provider on 127.0.0.1 with a temporary data dir.
Two servers exist, each started on first use: one without API keys (everything
is allowed) and one with keys of every role.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
REGISTRY = "127.0.0.1:5000"
BUSYBOX = f"{REGISTRY}/stacyvm/busybox:1.35"
PYTHON = f"{REGISTRY}/stacyvm/debian-python:3.11"

# Raw keys of the keyed server, by role.
KEYS = {
    "api": "test-api-key-0123456789",
    "viewer": "test-viewer-key-0123456789",
    "admin": "test-admin-key-0123456789",
    "owned": "test-owned-key-0123456789",  # role api, fixed owner "alice"
    "tenant": "test-tenant-key-0123456789",  # role api, tenant "t2"
}
FIXED_OWNER = "alice"

START_TIMEOUT = 90.0
STOP_TIMEOUT = 30.0


@dataclass
class ServerProc:
    base_url: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    data_dir: Path
    keys: dict[str, str] = field(default_factory=dict)

    def log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _run_script(name: str) -> None:
    res = subprocess.run(
        ["bash", str(REPO / "scripts" / name)], capture_output=True, text=True, timeout=1800, check=False
    )
    if res.returncode != 0:
        pytest.fail(f"scripts/{name} failed ({res.returncode}):\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}")


@pytest.fixture(scope="session")
def test_images() -> dict[str, str]:
    """The loopback registry with the busybox and debian-python test images."""
    _run_script("start-registry.sh")
    _run_script("build-test-images.sh")
    return {"busybox": BUSYBOX, "python": PYTHON}


def _config(data_dir: Path, port: int, auth: dict[str, object] | None) -> dict[str, object]:
    return {
        "server": {
            "host": "127.0.0.1",
            "port": port,
            "data_dir": str(data_dir),
            # Small, so the 413 test does not have to send megabytes.
            "max_body_bytes": 4 * 1024 * 1024,
            "log_level": "info",
        },
        "auth": auth or {},
        "defaults": {"provider": "native", "image": BUSYBOX, "ttl": "10m"},
        "images": {"registries": {REGISTRY: {"insecure": True}}},
        "events": {"history": 500},
    }


def start_server(root: Path, auth: dict[str, object] | None = None,
                 extra: dict[str, dict[str, object]] | None = None) -> ServerProc:
    """Start `stacyvm serve`; `extra` adds config sections or keys (e.g. {"docker": {"enabled": True}})."""
    root.mkdir(parents=True, exist_ok=True)
    # Not under pytest's 0700 tmp tree: the sandbox's mapped root must traverse the path.
    # root/data links to it, so a restart with the same root reuses the same data.
    link = root / "data"
    if link.is_symlink():
        data_dir = link.resolve()
    else:
        data_dir = Path(tempfile.mkdtemp(prefix="stacyvm-test-", dir="/var/tmp"))
        data_dir.chmod(0o755)
        link.symlink_to(data_dir)
    port = _free_port()
    cfg = root / "stacyvm.yaml"
    config = _config(data_dir, port, auth)
    for section, values in (extra or {}).items():
        config[section] = {**dict(config.get(section) or {}), **values}
    cfg.write_text(yaml.safe_dump(config))
    log_path = root / "server.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("STACYVM_")}
    env["PYTHONUNBUFFERED"] = "1"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "stacyvm_server", "serve", "--config", str(cfg)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=root,
            start_new_session=True,
        )
    server = ServerProc(f"http://127.0.0.1:{port}", proc, log_path, data_dir)
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"server exited with {proc.returncode} during start:\n{server.log_tail()}")
        try:
            if httpx.get(server.base_url + "/api/v1/health", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    stop_server(server)
    pytest.fail(f"server did not answer /health within {START_TIMEOUT}s:\n{server.log_tail()}")


def destroy_all(server: ServerProc) -> None:
    """Sandboxes outlive a server stop by design; a test session must not leave any behind."""
    headers = {"X-API-Key": server.keys["admin"]} if server.keys else {}
    try:
        with httpx.Client(base_url=server.base_url + "/api/v1", headers=headers, timeout=30) as c:
            for sb in c.get("/sandboxes").json():
                c.delete(f"/sandboxes/{sb['id']}")
    except httpx.HTTPError:
        pass


def kill_server(server: ServerProc) -> None:
    """SIGKILL: the server crashes; its sandboxes stay, as after a real crash."""
    server.proc.send_signal(signal.SIGKILL)
    server.proc.wait(10)


def discard_server(server: ServerProc) -> None:
    """Test cleanup after whatever happened: destroy what is left, kill, remove the data dir."""
    if server.proc.poll() is None:
        destroy_all(server)
        server.proc.kill()
        server.proc.wait(10)
    shutil.rmtree(server.data_dir, ignore_errors=True)


def stop_server(server: ServerProc) -> None:
    """SIGTERM, then insist that the process exits on its own."""
    if server.proc.poll() is None:
        server.proc.send_signal(signal.SIGTERM)
        try:
            server.proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait(10)
            pytest.fail(f"server ignored SIGTERM for {STOP_TIMEOUT}s:\n{server.log_tail()}")
    # uvicorn shuts down cleanly, then re-raises the signal: -SIGTERM is a clean exit too.
    assert server.proc.returncode in (0, -signal.SIGTERM), (
        f"server exited with {server.proc.returncode}:\n{server.log_tail()}"
    )
    assert "Application shutdown complete" in server.log_path.read_text(errors="replace"), server.log_tail()


@pytest.fixture(scope="session")
def open_server(test_images: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProc]:
    """A server without API keys: every caller is an admin (loopback only)."""
    server = start_server(tmp_path_factory.mktemp("open-server"))
    yield server
    destroy_all(server)
    stop_server(server)
    shutil.rmtree(server.data_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def keyed_server(test_images: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProc]:
    """A server with one key per role, a key with a fixed owner and a key with a tenant."""
    auth = {
        "keys": [
            {"key": KEYS["api"], "name": "api", "role": "api"},
            {"key": KEYS["viewer"], "name": "viewer", "role": "viewer"},
            {"key": KEYS["admin"], "name": "admin", "role": "admin"},
            {"key": KEYS["owned"], "name": "owned", "role": "api", "owner": FIXED_OWNER},
            {"key": KEYS["tenant"], "name": "tenant", "role": "api", "tenant": "t2"},
        ]
    }
    server = start_server(tmp_path_factory.mktemp("keyed-server"), auth)
    server.keys = dict(KEYS)
    yield server
    destroy_all(server)
    stop_server(server)
    shutil.rmtree(server.data_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def base_url(keyed_server: ServerProc) -> str:
    """The keyed server: what production looks like. Send `api_key` with every call."""
    return keyed_server.base_url


@pytest.fixture(scope="session")
def api_key() -> str:
    return KEYS["api"]


@pytest.fixture(scope="session")
def open_url(open_server: ServerProc) -> str:
    return open_server.base_url


@pytest.fixture(scope="session")
def images(test_images: dict[str, str]) -> dict[str, str]:
    return test_images
