"""Start (and stop) a StacyVM server of our own, the way tests/conftest.py does."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import yaml

REGISTRY = "127.0.0.1:5000"
START_TIMEOUT = 90.0
STOP_TIMEOUT = 30.0
# 100 MiB base64-encoded in one JSON body is ~134 MiB; allow it so the file
# milestone can use a single request (the default limit is 64 MiB).
MAX_BODY_BYTES = 192 * 1024 * 1024


class ServerError(RuntimeError):
    pass


@dataclass
class OwnServer:
    url: str
    proc: subprocess.Popen[bytes]
    root: Path
    data_dir: Path
    log_path: Path

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# Guest kernel and initramfs built by scripts/setup-microvm.sh (the server must not build them mid-run).
MICROVM_ASSETS = Path("/var/cache/stacyvm/microvm-assets")


def write_config(root: Path, port: int, image: str, runtime: str, provider: str = "native") -> Path:
    """`runtime` is the OCI runtime (native, docker) or, for microvm, the accelerator (tcg, kvm, auto)."""
    cfg = {
        "server": {
            "host": "127.0.0.1",
            "port": port,
            "data_dir": str(root / "data"),
            "max_body_bytes": MAX_BODY_BYTES,
            # Access logs off: we measure the server, not its terminal.
            "log_level": "warning",
        },
        "defaults": {"provider": provider, "image": image, "ttl": "30m"},
        "images": {"registries": {REGISTRY: {"insecure": True}}},
    }
    if provider == "docker":
        cfg["docker"] = {"enabled": True, "runtime": runtime}
    elif provider == "microvm":
        # A state dir of this run's own: the first create of each shape boots cold and saves its snapshot.
        cfg["microvm"] = {"enabled": True, "accel": runtime, "assets_dir": str(MICROVM_ASSETS),
                          "state_dir": str(root / "microvm"), "build_assets": False}
    else:
        cfg["native"] = {"runtime": runtime}
    path = root / "stacyvm.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def start(root: Path, image: str, runtime: str = "crun", provider: str = "native") -> OwnServer:
    root.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    cfg = write_config(root, port, image, runtime, provider)
    log_path = root / "server.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("STACYVM_")}
    env["PYTHONUNBUFFERED"] = "1"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "stacyvm_server", "serve", "--config", str(cfg)],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=env, cwd=root, start_new_session=True,
        )
    server = OwnServer(f"http://127.0.0.1:{port}", proc, root, root / "data", log_path)
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServerError(f"server exited with {proc.returncode} during start:\n{server.log_tail()}")
        try:
            if httpx.get(server.url + "/api/v1/health", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    stop(server)
    raise ServerError(f"server did not answer /health within {START_TIMEOUT:g}s:\n{server.log_tail()}")


def stop(server: OwnServer) -> None:
    if server.proc.poll() is None:
        server.proc.send_signal(signal.SIGTERM)
        try:
            server.proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            server.proc.kill()  # our own child, by its handle
            server.proc.wait(10)
