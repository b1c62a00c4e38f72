"""Fixtures for the provider conformance suite and the native provider tests.

Images come from the real ImageStore and the local registry on 127.0.0.1:5000
(scripts/start-registry.sh + scripts/build-test-images.sh). Without a registry,
a busybox root is built from the host's busybox-static and Python tests skip.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio

from stacyvm_server.config import ImagesConfig, NativeConfig, RegistryConfig, ServerConfig, Settings
from stacyvm_server.images.model import Image, ImageConfig
from stacyvm_server.providers.base import Provider

REGISTRY = "127.0.0.1:5000"
BUSYBOX_REF = f"{REGISTRY}/stacyvm/busybox:1.35"
PYTHON_REF = f"{REGISTRY}/stacyvm/debian-python:3.11"
LOCAL_BUSYBOX = "local/busybox-from-host"
UID_SHIFT = 100000


def _registry_up() -> bool:
    try:
        with urllib.request.urlopen(f"http://{REGISTRY}/v2/_catalog", timeout=2) as r:
            return b"stacyvm/busybox" in r.read()
    except OSError:
        return False


class _HostBusyboxImages:
    """Fallback image source: a root made of the host's static busybox."""

    def __init__(self, root: Path) -> None:
        self.rootfs = root / "busybox-rootfs"
        b = self.rootfs
        for d in ("bin", "etc", "tmp", "root", "usr/bin", "usr/sbin", "sbin"):
            (b / d).mkdir(parents=True, exist_ok=True)
        shutil.copy2("/bin/busybox", b / "bin/busybox")
        for applet in os.popen("/bin/busybox --list").read().split():
            if not (b / "bin" / applet).exists():
                os.symlink("busybox", b / "bin" / applet)
        (b / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n")
        (b / "etc/group").write_text("root:x:0:\nnogroup:x:65534:\n")
        os.chmod(b / "tmp", 0o1777)
        for dirpath, dirnames, filenames in os.walk(b):
            for n in [*dirnames, *filenames, "."]:
                os.lchown(os.path.join(dirpath, n), UID_SHIFT, UID_SHIFT)

    async def ensure(self, ref: str, uid_shift: int = 0) -> Image:
        from stacyvm_server.errors import ImageNotFound

        if ref != LOCAL_BUSYBOX:
            raise ImageNotFound(f"no registry: {ref}")
        env = ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]
        return Image(ref, "sha256:local", ImageConfig(env=env, workdir="/"), self.rootfs, 0)


@pytest.fixture(scope="session")
def native_scratch() -> Iterator[Path]:
    """A host dir for images and provider state, removed at the end.

    0711: the OCI runtime runs as uid 100000 inside the user namespace and
    must traverse into the bundle; pytest's tmp dirs are 0700.
    """
    d = Path(tempfile.mkdtemp(prefix="stacyvm-ptest-"))
    os.chmod(d, 0o711)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def native_images(native_scratch: Path) -> object:
    if _registry_up():
        from stacyvm_server.images.store import ImageStore

        cfg = ImagesConfig(registries={REGISTRY: RegistryConfig(insecure=True)})
        return ImageStore(native_scratch / "images", cfg)
    return _HostBusyboxImages(native_scratch)


@pytest.fixture(scope="session")
def image_ref() -> str:
    return BUSYBOX_REF if _registry_up() else LOCAL_BUSYBOX


@pytest.fixture(scope="session")
def python_image_ref() -> str:
    if not _registry_up():
        pytest.skip("no local registry with stacyvm/debian-python:3.11 (scripts/start-registry.sh)")
    return PYTHON_REF


def native_settings(scratch: Path, runtime: str, **native: object) -> Settings:
    state = scratch / f"native-{runtime}"
    return Settings(
        server=ServerConfig(data_dir=scratch / "data"),
        native=NativeConfig(runtime=runtime, state_dir=state, **native),  # type: ignore[arg-type]
    )


@pytest_asyncio.fixture(scope="class", loop_scope="session")
async def provider(
    request: pytest.FixtureRequest, native_scratch: Path, native_images: object
) -> AsyncIterator[Provider]:
    """The provider under test; the test class sets `runtime` ("crun", "runc", "runsc")."""
    from stacyvm_server.providers.native import NativeProvider
    from stacyvm_server.providers.native.host import check_host, fix_host

    runtime = getattr(request.cls, "runtime", "crun")
    settings = native_settings(native_scratch, runtime)
    if os.geteuid() != 0:
        pytest.skip("the native provider needs root")
    bad = [p for p in check_host(settings) if not p.ok]
    if bad:
        await fix_host(settings)  # what `.ci/run` / setup-host.sh do before the suite
    p = NativeProvider(settings, native_images)  # type: ignore[arg-type]
    await p.start()
    probe = getattr(request.cls, "probe_runtime", None)
    if probe is not None:
        reason = await probe(p)
        if reason:
            pytest.skip(f"{runtime} does not work here: {reason}")
    yield p
    # Whatever a failed test left behind.
    for item in await p.inventory():
        await p.destroy(item.handle)
    await p.close()


@pytest_asyncio.fixture(loop_scope="session")
async def make_sandbox(provider: Provider, image_ref: str) -> AsyncIterator[object]:
    """Factory: `await make_sandbox(memory_mb=..., network=...)`; destroys what it made."""
    from stacyvm_server.ids import new_sandbox_id
    from stacyvm_server.providers.base import SandboxSpec

    made = []

    async def make(**kw: object) -> object:
        spec_kw: dict[str, object] = {"sandbox_id": new_sandbox_id(), "image": image_ref, "memory_mb": 256,
                                      "vcpus": 1}
        spec_kw.update(kw)
        handle = await provider.create(SandboxSpec(**spec_kw))  # type: ignore[arg-type]
        made.append(handle)
        return handle

    yield make
    for h in made:
        await provider.destroy(h)


@pytest_asyncio.fixture(scope="class", loop_scope="session")
async def class_sandbox(provider: Provider, image_ref: str) -> AsyncIterator[object]:
    """One sandbox for a whole test class (see `sandbox`)."""
    from stacyvm_server.ids import new_sandbox_id
    from stacyvm_server.providers.base import SandboxSpec

    handle = await provider.create(SandboxSpec(new_sandbox_id(), image_ref, 256, 1))
    yield handle
    await provider.destroy(handle)


@pytest_asyncio.fixture(loop_scope="session")
async def fresh_sandbox(make_sandbox: object) -> object:
    return await make_sandbox()  # type: ignore[operator]


@pytest.fixture
def sandbox(request: pytest.FixtureRequest) -> object:
    """A default sandbox: fresh per test, or, when the test class sets
    `share_sandbox = True` (runsc: delete takes ~1.7 s), one per class. The
    suite's tests that take `sandbox` use distinct paths and leave no
    processes behind, so they can share one."""
    if getattr(request.cls, "share_sandbox", False):
        return request.getfixturevalue("class_sandbox")
    return request.getfixturevalue("fresh_sandbox")


# Network fixtures ---------------------------------------------------------------------
# An "upstream" server that is not the host: it lives in its own netns with a
# 10.x address that exists only there; the host routes to it over a veth pair.
UPSTREAM_NS = "stacyvm-ptest-up"
UPSTREAM_ADDR = "10.199.77.2"
UPSTREAM_GW = "10.199.77.1"
UPSTREAM_HOST_IF = "sv-ptest-up"


def _serve(sock: object, body: bytes) -> None:
    import socket

    assert isinstance(sock, socket.socket)
    while True:
        try:
            conn, _ = sock.accept()
        except OSError:
            return
        with conn:
            try:
                conn.settimeout(2)
                conn.recv(4096)
                conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            except OSError:
                pass


def _listen_in_netns(ns_path: str | None, addr: str) -> object:
    """A listening TCP socket created inside ns_path (or the host netns)."""
    import socket
    import threading

    from stacyvm_server.providers.native import syscalls

    box: dict[str, object] = {}

    def make() -> None:
        if ns_path:
            fd = os.open(ns_path, os.O_RDONLY)
            syscalls.setns(fd, syscalls.CLONE_NEWNET)  # this short-lived thread only
            os.close(fd)
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((addr, 0))
        s.listen(16)
        box["s"] = s

    t = threading.Thread(target=make)
    t.start()
    t.join()
    return box["s"]


@pytest.fixture(scope="session")
def upstream_server() -> Iterator[tuple[str, int]]:
    """(address, port) of an HTTP server in a separate netns, reachable only by routing."""
    import subprocess
    import threading

    def ip(*args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True)

    subprocess.run(["ip", "netns", "del", UPSTREAM_NS], capture_output=True)
    subprocess.run(["ip", "link", "del", UPSTREAM_HOST_IF], capture_output=True)
    ip("netns", "add", UPSTREAM_NS)
    try:
        ip("link", "add", UPSTREAM_HOST_IF, "type", "veth", "peer", "name", "eth0", "netns", UPSTREAM_NS)
        ip("addr", "add", f"{UPSTREAM_GW}/32", "peer", f"{UPSTREAM_ADDR}/32", "dev", UPSTREAM_HOST_IF)
        ip("link", "set", UPSTREAM_HOST_IF, "up")
        ip("-n", UPSTREAM_NS, "addr", "add", f"{UPSTREAM_ADDR}/32", "peer", f"{UPSTREAM_GW}/32", "dev", "eth0")
        ip("-n", UPSTREAM_NS, "link", "set", "eth0", "up")
        ip("-n", UPSTREAM_NS, "link", "set", "lo", "up")
        ip("-n", UPSTREAM_NS, "route", "add", "default", "via", UPSTREAM_GW)
        sock = _listen_in_netns(f"/run/netns/{UPSTREAM_NS}", UPSTREAM_ADDR)
        threading.Thread(target=_serve, args=(sock, b"hello-from-upstream"), daemon=True).start()
        yield UPSTREAM_ADDR, sock.getsockname()[1]  # type: ignore[attr-defined]
        sock.close()  # type: ignore[attr-defined]
    finally:
        subprocess.run(["ip", "link", "del", UPSTREAM_HOST_IF], capture_output=True)
        subprocess.run(["ip", "netns", "del", UPSTREAM_NS], capture_output=True)


@pytest.fixture(scope="session")
def host_server() -> Iterator[tuple[list[str], int]]:
    """An HTTP server on the host's 0.0.0.0: ([host addresses], port). Sandboxes must not reach it."""
    import socket
    import threading

    sock = _listen_in_netns(None, "0.0.0.0")
    assert isinstance(sock, socket.socket)
    threading.Thread(target=_serve, args=(sock, b"hello-from-host"), daemon=True).start()
    addrs = sorted({a.split("/")[0] for a in _host_ipv4()})
    yield addrs, sock.getsockname()[1]
    sock.close()


def _host_ipv4() -> list[str]:
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        # IFA_LOCAL is the local address on point-to-point links (IFA_ADDRESS is the peer).
        return [str(a.get_attr("IFA_LOCAL") or a.get_attr("IFA_ADDRESS")) for a in ipr.get_addr(family=2)]
