"""Fixtures for the image tests: the local registry, a tar builder, a small HTTP registry."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import subprocess
import tarfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BUSYBOX = "127.0.0.1:5000/stacyvm/busybox:1.35"
DEBIAN_PYTHON = "127.0.0.1:5000/stacyvm/debian-python:3.11"


@pytest.fixture(scope="session")
def local_registry() -> str:
    """The Debian registry on 127.0.0.1:5000 holding the test images. Fails loudly if it cannot."""
    for script in ("start-registry.sh", "build-test-images.sh"):
        proc = subprocess.run(
            [str(REPO / "scripts" / script)], capture_output=True, text=True, timeout=600, check=False
        )
        if proc.returncode != 0:
            pytest.fail(
                f"scripts/{script} failed (rc {proc.returncode}); the image tests need the local "
                f"registry on 127.0.0.1:5000.\n{proc.stdout}\n{proc.stderr}",
                pytrace=False,
            )
    return "127.0.0.1:5000"


@dataclass
class Entry:
    """One tar member for make_tar."""

    name: str
    data: bytes = b""
    type: bytes = tarfile.REGTYPE
    linkname: str = ""
    mode: int = 0o644
    uid: int = 0
    gid: int = 0


def make_tar(path: Path, entries: list[Entry], gzip: bool = False) -> Path:
    with tarfile.open(path, "w:gz" if gzip else "w") as tar:
        for e in entries:
            info = tarfile.TarInfo(e.name)
            info.type, info.linkname, info.mode, info.uid, info.gid = e.type, e.linkname, e.mode, e.uid, e.gid
            if e.type == tarfile.DIRTYPE and e.mode == 0o644:
                info.mode = 0o755
            info.size = len(e.data) if e.type == tarfile.REGTYPE else 0
            tar.addfile(info, io.BytesIO(e.data) if e.type == tarfile.REGTYPE else None)
    return path


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass
class HttpRegistry:
    """A tiny real registry (HTTP API v2 read side) serving in-memory blobs and manifests.

    It lets the tests reach paths the Debian registry cannot: token and Basic auth,
    manifest lists and blobs whose bytes do not match their digest.
    """

    host: str = ""
    manifests: dict[str, tuple[str, bytes]] = field(default_factory=dict)  # "repo:ref" -> (type, body)
    blobs: dict[str, bytes] = field(default_factory=dict)
    auth: str = ""  # "", "bearer" or "basic"
    user: str = "alice"
    password: str = "s3cret"
    token: str = "tok-123"
    blob_gets: int = 0

    def add_image(self, repo: str, tag: str, layers: list[bytes], config: dict[str, object]) -> str:
        """Store a one-platform image; return its manifest digest."""
        cfg = json.dumps(config).encode()
        self.blobs[sha256(cfg)] = cfg
        for layer in layers:
            self.blobs[sha256(layer)] = layer
        doc = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": sha256(cfg),
                       "size": len(cfg)},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": sha256(x),
                        "size": len(x)} for x in layers],
        }
        raw = json.dumps(doc).encode()
        self.manifests[f"{repo}:{tag}"] = ("application/vnd.oci.image.manifest.v1+json", raw)
        self.manifests[f"{repo}:{sha256(raw)}"] = ("application/vnd.oci.image.manifest.v1+json", raw)
        return sha256(raw)

    def add_index(self, repo: str, tag: str, platforms: dict[str, str]) -> None:
        """An OCI index pointing at manifests already added, keyed "os/arch" -> digest."""
        entries = []
        for plat, digest in platforms.items():
            os_, arch = plat.split("/")
            size = len(self.manifests[f"{repo}:{digest}"][1])
            entries.append({"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": digest,
                            "size": size, "platform": {"os": os_, "architecture": arch}})
        raw = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                          "manifests": entries}).encode()
        self.manifests[f"{repo}:{tag}"] = ("application/vnd.oci.image.index.v1+json", raw)


@pytest.fixture
def http_registry() -> Iterator[HttpRegistry]:
    reg = HttpRegistry()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def _send(self, code: int, body: bytes, headers: dict[str, str] | None = None) -> None:
            self.send_response(code)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _error(self, code: int, err: str, msg: str, headers: dict[str, str] | None = None) -> None:
            self._send(code, json.dumps({"errors": [{"code": err, "message": msg}]}).encode(), headers)

        def do_GET(self) -> None:
            if self.path.startswith("/token"):
                basic = "Basic " + base64.b64encode(f"{reg.user}:{reg.password}".encode()).decode()
                if self.headers.get("Authorization") not in (None, basic):
                    return self._error(401, "DENIED", "bad credentials for token")
                return self._send(200, json.dumps({"token": reg.token}).encode())
            if not self._authorised():
                return
            parts = self.path.split("/")  # /v2/<repo...>/(manifests|blobs)/<ref>
            kind, ref, repo = parts[-2], parts[-1], "/".join(parts[2:-2])
            if kind == "manifests" and f"{repo}:{ref}" in reg.manifests:
                mt, raw = reg.manifests[f"{repo}:{ref}"]
                return self._send(200, raw, {"Content-Type": mt})
            if kind == "blobs" and ref in reg.blobs:
                reg.blob_gets += 1
                return self._send(200, reg.blobs[ref])
            if kind == "manifests":
                return self._error(404, "MANIFEST_UNKNOWN", f"manifest unknown: {repo}:{ref}")
            return self._error(404, "BLOB_UNKNOWN", "blob unknown to registry")

        def _authorised(self) -> bool:
            got = self.headers.get("Authorization")
            if reg.auth == "bearer" and got != f"Bearer {reg.token}":
                realm = f"http://{reg.host}/token"
                self._error(401, "UNAUTHORIZED", "authentication required",
                            {"WWW-Authenticate": f'Bearer realm="{realm}",service="test"'})
                return False
            basic = "Basic " + base64.b64encode(f"{reg.user}:{reg.password}".encode()).decode()
            if reg.auth == "basic" and got != basic:
                self._error(401, "UNAUTHORIZED", "access denied",
                            {"WWW-Authenticate": 'Basic realm="test"'})
                return False
            return True

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    reg.host = f"127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield reg
    server.shutdown()
    server.server_close()


@pytest.fixture
def oci_busybox(local_registry: str, tmp_path: Path) -> Path:
    """The busybox test image as an OCI layout directory (via skopeo)."""
    dest = tmp_path / "busybox-oci"
    subprocess.run(
        ["skopeo", "copy", "--quiet", "--src-tls-verify=false", f"docker://{BUSYBOX}", f"oci:{dest}:1.35"],
        check=True, timeout=120,
    )
    return dest


@pytest.fixture
def docker_save_busybox(local_registry: str, tmp_path: Path) -> Path:
    """The busybox test image as a `docker save` style tar (via skopeo docker-archive:)."""
    dest = tmp_path / "busybox-save.tar"
    subprocess.run(
        ["skopeo", "copy", "--quiet", "--src-tls-verify=false", f"docker://{BUSYBOX}",
         f"docker-archive:{dest}:stacyvm/busybox:1.35"],
        check=True, timeout=120,
    )
    return dest
