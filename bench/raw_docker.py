"""Raw baseline for the docker provider: Docker Engine API calls over the unix socket.

No server in between: HTTP/1.1 on the same socket the provider uses, with the
container body the provider sends (`_container_body` in
src/stacyvm_server/providers/docker/provider.py): the same image, entrypoint
(`/.stacyvm/busybox sleep`), Init, CapDrop ALL + the default CapAdd set,
no-new-privileges, memory = memory-swap, NanoCpus, PidsLimit, the read-only
busybox bind mount, json-file log limits, network none, the same runtime.
What the raw side does not send: the provider's labels and its hostname
(measured: the same create + start time with and without them).

The JSON calls (create, start, exec create and inspect, delete) go through
bench/http1.py on one kept-alive connection, the same client code that times
the calls to our server: httpx's sync client costs ~0.25 ms more per call here,
which would pad the baseline. Pulls and archives stream through httpx.

An exec is what `docker exec` does: `POST /containers/{id}/exec`, `POST
/exec/{id}/start` on a hijacked connection read to EOF, then `GET
/exec/{id}/json` for the exit code. Files go through the archive API (a tar of
one file PUT into /tmp, and GET back), as the provider's do.

The interface mirrors RawCrun (bench/raw.py), so the runner drives both alike.
"""

from __future__ import annotations

import io
import json
import os
import socket
import struct
import tarfile
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx

from bench.http1 import Http1Conn
from bench.raw import RawError, UpTiming

API_VERSION = "v1.41"
SOCKET = "/var/run/docker.sock"
TIMEOUT = 120.0
HELPER = "/.stacyvm/busybox"
MAIN_CMD = [HELPER, "sleep", "2147483647"]
DEFAULT_CAPS = ["CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "SETGID", "SETUID", "NET_BIND_SERVICE"]
RUNSC_PIDS_BASE, RUNSC_PIDS_PER_PROCESS = 64, 16
NAME_PREFIX = "stacyvm-bench-raw"


def _ms(t0: float) -> float:
    return (time.perf_counter() - t0) * 1000.0


def _provider_constants() -> tuple[list[str], list[str], int, int, str]:
    """MAIN_CMD, cap_add, runsc pids base/per-process from the provider itself when importable."""
    try:
        from stacyvm_server.config import DOCKER_DEFAULT_CAPS
        from stacyvm_server.providers.docker import provider as dp

        return (list(dp.MAIN_CMD), list(DOCKER_DEFAULT_CAPS), dp.RUNSC_PIDS_BASE, dp.RUNSC_PIDS_PER_PROCESS,
                "the docker provider's constants (MAIN_CMD, DOCKER_DEFAULT_CAPS, runsc pids budget)")
    except Exception as exc:  # the provider is being written concurrently; never let that stop the baseline
        return MAIN_CMD, DEFAULT_CAPS, RUNSC_PIDS_BASE, RUNSC_PIDS_PER_PROCESS, f"bench copies ({exc!r})"


def container_body(image: str, runtime: str, memory_mb: int = 256, vcpus: int = 1, pids: int = 256,
                   helper_busybox: str = "/bin/busybox") -> tuple[dict[str, Any], str]:
    """The provider's create body for network none (without its labels and hostname)."""
    main_cmd, caps, base, per, source = _provider_constants()
    mem = memory_mb * 1024 * 1024
    host: dict[str, Any] = {
        "NetworkMode": "none",
        "Runtime": runtime,
        "Init": True,
        "CapDrop": ["ALL"],
        "CapAdd": caps,
        "SecurityOpt": ["no-new-privileges:true"],
        "Privileged": False,
        "Memory": mem,
        "MemorySwap": mem,
        "NanoCpus": vcpus * 1_000_000_000,
        "PidsLimit": base + per * pids if runtime == "runsc" else pids,
        "ReadonlyRootfs": False,
        "Mounts": [{"Type": "bind", "Source": helper_busybox, "Target": HELPER, "ReadOnly": True}],
        "LogConfig": {"Type": "json-file", "Config": {"max-size": "10m", "max-file": "1"}},
        "RestartPolicy": {"Name": "no"},
    }
    body: dict[str, Any] = {
        "Image": image,
        "Entrypoint": main_cmd[:1],
        "Cmd": main_cmd[1:],
        "Env": [],
        "Labels": {"stacyvm.bench": "raw"},
        "HostConfig": host,
        "AttachStdin": False, "AttachStdout": False, "AttachStderr": False, "Tty": False,
        "NetworkDisabled": True,
    }
    if runtime == "runsc":
        body["Volumes"] = {"/tmp": {}}  # as the provider: a real /tmp for the archive API under gVisor
    return body, source


class _Hijacked:
    """`POST /exec/{id}/start` on a raw unix socket, as the provider (and the docker CLI) does it."""

    def __init__(self, socket_path: str, exec_id: str, stdin: bytes | None = None) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(TIMEOUT)
        self.sock.connect(socket_path)
        body = b'{"Detach": false, "Tty": false}'
        self.sock.sendall(
            f"POST /{API_VERSION}/exec/{exec_id}/start HTTP/1.1\r\nHost: docker\r\n"
            f"Content-Type: application/json\r\nConnection: Upgrade\r\nUpgrade: tcp\r\n"
            f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        self.buf = b""
        while b"\r\n\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise RawError("docker exec start: connection closed before the response header")
            self.buf += chunk
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        status = head.split(b"\r\n", 1)[0].decode(errors="replace")
        if status.split(" ")[1:2] not in (["101"], ["200"]):
            self.sock.close()
            raise RawError(f"docker exec start: {status}")
        if stdin is not None:
            self.sock.sendall(stdin)
            self.sock.shutdown(socket.SHUT_WR)

    def recv(self) -> bytes:
        if self.buf:
            out, self.buf = self.buf, b""
            return out
        return self.sock.recv(1 << 20)

    def read_all(self) -> bytes:
        parts: list[bytes] = []
        while chunk := self.recv():
            parts.append(chunk)
        self.sock.close()
        return b"".join(parts)


def demux(data: bytes) -> tuple[bytes, bytes]:
    """(stdout, stderr) of Docker's multiplexed stream."""
    out: list[bytes] = []
    err: list[bytes] = []
    i = 0
    while i + 8 <= len(data):
        kind, size = data[i], struct.unpack(">I", data[i + 4:i + 8])[0]
        (out if kind == 1 else err).append(data[i + 8:i + 8 + size])
        i += 8 + size
    return b"".join(out), b"".join(err)


class RawDocker:
    """Containers made with the Docker Engine API directly, one instance per run and runtime."""

    def __init__(self, work: Path, runtime: str = "runc", socket_path: str = SOCKET,
                 memory_mb: int = 256, vcpus: int = 1, pids: int = 256) -> None:
        self.kind = f"docker-{runtime}"
        self.runtime = runtime
        self.work = work
        self.socket_path = socket_path
        self.memory_mb, self.vcpus, self.pids = memory_mb, vcpus, pids
        self.http = httpx.Client(transport=httpx.HTTPTransport(uds=socket_path, retries=0),
                                 base_url=f"http://docker/{API_VERSION}", timeout=TIMEOUT,
                                 limits=httpx.Limits(max_connections=128, max_keepalive_connections=64),
                                 headers={"Accept-Encoding": "identity"})
        self._local = threading.local()  # one kept-alive connection per thread (bursts use threads)
        self._conns: list[Http1Conn] = []
        self._seq = 0
        _, source = container_body("x", runtime)
        self.bundle_source = f"Docker Engine API {API_VERSION} on {socket_path}, runtime {runtime}; body: {source}"
        try:
            self.version = str(self.http.get("/version").json().get("Version", "?"))
        except (httpx.HTTPError, ValueError) as exc:
            raise RawError(f"dockerd at {socket_path}: {exc}") from exc

    def _req(self, method: str, path: str, **kw: Any) -> httpx.Response:
        resp = self.http.request(method, path, **kw)
        if resp.status_code >= 400:
            raise RawError(f"docker {method} {path}: HTTP {resp.status_code} {resp.text[-300:]}")
        return resp

    @property
    def api(self) -> Http1Conn:
        conn: Http1Conn | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = Http1Conn(unix_path=self.socket_path, host="docker",
                                                prefix=f"/{API_VERSION}", timeout=TIMEOUT)
            self._conns.append(conn)
        return conn

    def _json(self, method: str, path: str, body: Any = None, params: dict[str, str] | None = None,
              ok: tuple[int, ...] = ()) -> Any:
        """One JSON call on the kept-alive connection; RawError on >= 400 unless in `ok`."""
        status, data = self.api.call(method, path + (f"?{urlencode(params)}" if params else ""), body)
        if status >= 400 and status not in ok:
            raise RawError(f"docker {method} {path}: HTTP {status} {data[-300:]!r}")
        return json.loads(data) if data and status < 300 else None

    def up(self, image: Path | str) -> tuple[str, UpTiming]:
        self._seq += 1
        name = f"{NAME_PREFIX}-{os.getpid()}-{self._seq}"
        body, _ = container_body(str(image), self.runtime, self.memory_mb, self.vcpus, self.pids)
        t0 = time.perf_counter()
        status, data = self.api.call("POST", f"/containers/create?{urlencode({'name': name})}", body)
        if status == 404 and b"No such image" in data:
            # Another user of this dockerd removed the image: pull it again, off the clock
            # (the provider pulls on the same answer).
            self.pull(str(image))
            t0 = time.perf_counter()
            status, data = self.api.call("POST", f"/containers/create?{urlencode({'name': name})}", body)
        if status >= 400:
            raise RawError(f"docker POST /containers/create: HTTP {status} {data[-300:]!r}")
        cid = str(json.loads(data)["Id"])
        create_ms = _ms(t0)
        t1 = time.perf_counter()
        try:
            self._json("POST", f"/containers/{cid}/start")
        except (RawError, OSError):
            self._down_quietly(cid)
            raise
        start_ms = _ms(t1)
        return cid, UpTiming(0.0, create_ms, start_ms, _ms(t0))

    def pull(self, image: str) -> None:
        name, _, tag = image.rpartition(":")
        if "/" in tag or not name:
            name, tag = image, "latest"
        with self.http.stream("POST", "/images/create", params={"fromImage": name, "tag": tag},
                              timeout=600.0) as resp:
            body = b"".join(resp.iter_raw())
        if resp.status_code >= 400 or b'"error"' in body:
            raise RawError(f"docker pull {image}: HTTP {resp.status_code} {body[-300:]!r}")

    def _exec_create(self, cid: str, argv: list[str], stdin: bool = False) -> str:
        body = {"AttachStdin": stdin, "AttachStdout": True, "AttachStderr": True, "Tty": False,
                "Cmd": argv, "Env": [], "WorkingDir": "", "User": "", "Privileged": False}
        return str(self._json("POST", f"/containers/{cid}/exec", body)["Id"])

    def _exit_code(self, exec_id: str) -> int:
        code = self._json("GET", f"/exec/{exec_id}/json").get("ExitCode")
        return -1 if code is None else int(code)

    def _run(self, cid: str, argv: list[str], stdin: bytes | None = None) -> bytes:
        exec_id = self._exec_create(cid, argv, stdin is not None)
        data = _Hijacked(self.socket_path, exec_id, stdin).read_all()
        rc = self._exit_code(exec_id)
        if rc != 0:
            raise RawError(f"docker exec {argv[:3]} rc {rc}: {demux(data)[1][-300:]!r}")
        return data

    def exec(self, cid: str, argv: list[str]) -> float:
        t0 = time.perf_counter()
        self._run(cid, argv)
        return _ms(t0)

    def exec_ttfb(self, cid: str, argv: list[str]) -> tuple[float, float]:
        t0 = time.perf_counter()
        exec_id = self._exec_create(cid, argv)
        h = _Hijacked(self.socket_path, exec_id)
        first = h.recv()
        ttfb = _ms(t0)
        rest = h.read_all()
        rc = self._exit_code(exec_id)
        if rc != 0 or not first:
            raise RawError(f"docker exec (stream) rc {rc}, {len(first) + len(rest)} bytes")
        return ttfb, _ms(t0)

    def pipe_in(self, cid: str, path: str, data: bytes) -> float:
        """PUT one file as a tar into its directory (the tar is built before the clock starts)."""
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            info = tarfile.TarInfo(os.path.basename(path))
            info.size, info.mode, info.mtime = len(data), 0o644, int(time.time())
            tar.addfile(info, io.BytesIO(data))
        body = buf.getvalue()
        t0 = time.perf_counter()
        self._req("PUT", f"/containers/{cid}/archive", params={"path": os.path.dirname(path)}, content=body,
                  headers={"Content-Type": "application/x-tar"})
        return _ms(t0)

    def pipe_out(self, cid: str, path: str) -> tuple[float, bytes]:
        """GET the file's tar to the last byte; it is unpacked after the clock stops."""
        t0 = time.perf_counter()
        with self.http.stream("GET", f"/containers/{cid}/archive", params={"path": path}) as resp:
            if resp.status_code >= 400:
                raise RawError(f"docker GET archive {path}: HTTP {resp.status_code}")
            raw = b"".join(resp.iter_raw())
        ms = _ms(t0)
        try:
            with tarfile.open(fileobj=io.BytesIO(raw), mode="r") as tar:
                member = tar.next()
                f = tar.extractfile(member) if member else None
                if f is None:
                    raise RawError(f"docker GET archive {path}: no file in the tar")
                return ms, f.read()
        except tarfile.TarError as exc:
            raise RawError(f"docker GET archive {path}: {exc}") from exc

    def down(self, cid: str) -> float:
        t0 = time.perf_counter()
        self._json("DELETE", f"/containers/{cid}", params={"force": "1", "v": "1"}, ok=(404,))
        return _ms(t0)

    def _down_quietly(self, cid: str) -> None:
        try:
            self.down(cid)
        except (RawError, OSError):
            pass

    def cleanup(self) -> None:
        """Remove every container this process made (by name prefix and label), then close."""
        try:
            filters = json.dumps({"label": ["stacyvm.bench=raw"], "name": [f"{NAME_PREFIX}-{os.getpid()}-"]})
            for c in self.http.get("/containers/json", params={"all": "1", "filters": filters}).json():
                self._down_quietly(str(c["Id"]))
        except (httpx.HTTPError, ValueError, KeyError):
            pass
        self.http.close()
        for conn in self._conns:
            conn.close()


class DockerCgroups:
    """Density: a docker sandbox's memory cgroup. dockerd (cgroupfs driver, cgroup v1)
    puts container <id> in /sys/fs/cgroup/memory/docker/<id>; the id is found once by
    our label, then remembered so the leftover check after destroy looks at the same path."""

    def __init__(self, socket_path: str = SOCKET) -> None:
        self.http = httpx.Client(transport=httpx.HTTPTransport(uds=socket_path), base_url="http://docker",
                                 timeout=10)
        self.ids: dict[str, str] = {}

    def __call__(self, sandbox_id: str) -> Path | None:
        if sandbox_id not in self.ids:
            filters = json.dumps({"label": [f"stacyvm.sandbox_id={sandbox_id}"]})
            found = self.http.get(f"/{API_VERSION}/containers/json", params={"all": "1", "filters": filters}).json()
            if not found:
                return None
            self.ids[sandbox_id] = str(found[0]["Id"])
        return Path("/sys/fs/cgroup/memory/docker") / self.ids[sandbox_id]
