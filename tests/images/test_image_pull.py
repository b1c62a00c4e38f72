"""ImageStore against real registries: the Debian one on 127.0.0.1:5000 and a small HTTP one."""

import asyncio
import io
import json
import os
import tarfile
from pathlib import Path

import pytest

from stacyvm_server.config import ImagesConfig, RegistryConfig
from stacyvm_server.errors import ImageError, ImageNotFound
from stacyvm_server.images.store import ImageStore

from .conftest import BUSYBOX, HttpRegistry, sha256

CONFIG = {"architecture": "amd64", "os": "linux",
          "config": {"Env": ["PATH=/bin"], "WorkingDir": "/w", "User": "1000", "Entrypoint": ["/e"],
                     "Cmd": ["c"]}}


def layer(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


async def test_pull_busybox(local_registry: str, tmp_path: Path) -> None:
    store = ImageStore(tmp_path, ImagesConfig())
    img = await store.ensure(BUSYBOX)
    assert img.ref == BUSYBOX and img.digest.startswith("sha256:")
    assert img.config.cmd == ["/bin/sh"] and img.config.workdir == "/"
    assert any(e.startswith("PATH=") for e in img.config.env)
    assert (img.rootfs / "bin/busybox").is_file()
    assert os.readlink(img.rootfs / "bin/sh") == "/bin/busybox"
    assert oct((img.rootfs / "tmp").stat().st_mode & 0o7777) == "0o1777"
    assert "nobody" in (img.rootfs / "etc/passwd").read_text()
    assert img.size > 1_000_000
    assert img.rootfs.name == f"{img.digest.removeprefix('sha256:')}-0"
    assert (tmp_path / "blobs/sha256" / img.digest.removeprefix("sha256:")).is_file()
    assert [i.ref for i in store.list()] == [BUSYBOX]


async def test_concurrent_ensure_pulls_once(local_registry: str, tmp_path: Path) -> None:
    store = ImageStore(tmp_path, ImagesConfig())
    images = await asyncio.gather(*(store.ensure(BUSYBOX, uid_shift=100000) for _ in range(8)))
    assert all(i == images[0] for i in images)
    assert store.registry.blob_fetches == 2  # config + one layer, once
    assert (images[0].rootfs / "bin/busybox").stat().st_uid == 100000
    assert images[0].rootfs.stat().st_uid == 100000  # the root itself too


async def test_cache_survives_restart_and_new_shift_needs_no_download(local_registry: str, tmp_path: Path) -> None:
    first = await ImageStore(tmp_path, ImagesConfig()).ensure(BUSYBOX)
    store = ImageStore(tmp_path, ImagesConfig())  # a "restarted server"
    again = await store.ensure(BUSYBOX)
    assert again == first and store.registry.blob_fetches == 0
    shifted = await store.ensure(BUSYBOX, uid_shift=100000)
    assert store.registry.blob_fetches == 0  # unpacked again from cached blobs
    assert shifted.rootfs != first.rootfs and shifted.digest == first.digest
    assert sorted(i.rootfs.name for i in store.list()) == sorted([first.rootfs.name, shifted.rootfs.name])


async def test_pull_by_digest_and_alias(local_registry: str, tmp_path: Path) -> None:
    store = ImageStore(tmp_path, ImagesConfig(aliases={"bb": BUSYBOX}))
    img = await store.ensure("bb")
    assert img.ref == BUSYBOX
    by_digest = await store.pull(f"127.0.0.1:5000/stacyvm/busybox@{img.digest}")
    assert by_digest.digest == img.digest and by_digest.rootfs == img.rootfs


async def test_unknown_repo_and_tag(local_registry: str, tmp_path: Path) -> None:
    store = ImageStore(tmp_path, ImagesConfig())
    with pytest.raises(ImageNotFound, match=r"NAME_UNKNOWN|MANIFEST_UNKNOWN"):
        await store.ensure("127.0.0.1:5000/stacyvm/no-such-image:1")
    with pytest.raises(ImageNotFound, match="MANIFEST_UNKNOWN"):
        await store.ensure("127.0.0.1:5000/stacyvm/busybox:no-such-tag")
    with pytest.raises(ImageNotFound):
        await store.ensure("127.0.0.1:5000/stacyvm/busybox@sha256:" + "0" * 64)


async def test_unreachable_registry(tmp_path: Path) -> None:
    store = ImageStore(tmp_path, ImagesConfig())
    with pytest.raises(ImageError, match=r"127.0.0.1:1: cannot reach registry"):
        await store.ensure("127.0.0.1:1/x:1")


async def test_mirror_tried_first_then_registry(local_registry: str, tmp_path: Path,
                                                http_registry: HttpRegistry) -> None:
    digest = http_registry.add_image("stacyvm/busybox", "1.35", [layer({"from-mirror": b"m"})], CONFIG)
    cfg = ImagesConfig(registries={"127.0.0.1:5000": RegistryConfig(mirrors=["127.0.0.1:1", http_registry.host])})
    img = await ImageStore(tmp_path, cfg).ensure(BUSYBOX)  # dead mirror skipped, live mirror used
    assert img.digest == digest and (img.rootfs / "from-mirror").exists()


async def test_corrupt_cached_layer_is_detected_and_refetched(local_registry: str, tmp_path: Path) -> None:
    img = await ImageStore(tmp_path, ImagesConfig()).ensure(BUSYBOX)
    manifest = json.loads((tmp_path / "blobs/sha256" / img.digest.removeprefix("sha256:")).read_bytes())
    layer_blob = tmp_path / "blobs/sha256" / manifest["layers"][0]["digest"].removeprefix("sha256:")
    data = bytearray(layer_blob.read_bytes())
    data[100:108] = b"TAMPERED"
    layer_blob.write_bytes(data)
    store = ImageStore(tmp_path, ImagesConfig())
    shifted = await store.ensure(BUSYBOX, uid_shift=5000)  # needs an unpack: finds the bad blob
    assert store.registry.blob_fetches == 1  # only the corrupt layer came again
    assert (shifted.rootfs / "bin/busybox").stat().st_uid == 5000


async def test_registry_serving_wrong_bytes(tmp_path: Path, http_registry: HttpRegistry) -> None:
    good = layer({"a": b"1"})
    http_registry.add_image("x", "1", [good], CONFIG)
    http_registry.blobs[sha256(good)] = layer({"a": b"evil"})
    with pytest.raises(ImageError, match=r"digest mismatch|expected"):
        await ImageStore(tmp_path, ImagesConfig()).ensure(f"{http_registry.host}/x:1")
    assert [p.name for p in (tmp_path / "blobs/sha256").iterdir() if p.name == sha256(good)[7:]] == []
    assert not list((tmp_path / "rootfs").iterdir())


async def test_index_resolves_linux_amd64_and_config(tmp_path: Path, http_registry: HttpRegistry) -> None:
    arm = http_registry.add_image("multi", "arm", [layer({"arm": b"1"})], CONFIG)
    amd = http_registry.add_image("multi", "amd", [layer({"amd": b"1"})], CONFIG)
    http_registry.add_index("multi", "1", {"linux/arm64": arm, "linux/amd64": amd})
    img = await ImageStore(tmp_path, ImagesConfig()).ensure(f"{http_registry.host}/multi:1")
    assert img.digest == amd and (img.rootfs / "amd").exists()
    assert img.config.user == "1000" and img.config.entrypoint == ["/e"] and img.config.cmd == ["c"]
    http_registry.add_index("armonly", "1", {})
    http_registry.manifests["armonly:1"] = http_registry.manifests["multi:1"][0], json.dumps(
        {"schemaVersion": 2, "manifests": [{"digest": arm, "size": 1, "platform":
                                             {"os": "linux", "architecture": "arm64"}}]}).encode()
    with pytest.raises(ImageError, match=r"no linux/amd64 variant.*linux/arm64"):
        await ImageStore(tmp_path, ImagesConfig()).ensure(f"{http_registry.host}/armonly:1")


@pytest.mark.parametrize("auth", ["bearer", "basic"])
async def test_auth(tmp_path: Path, http_registry: HttpRegistry, auth: str) -> None:
    http_registry.auth = auth
    http_registry.add_image("priv", "1", [layer({"p": b"1"})], CONFIG)
    ref = f"{http_registry.host}/priv:1"
    creds = ImagesConfig(registries={http_registry.host: RegistryConfig(username="alice", password="s3cret")})
    img = await ImageStore(tmp_path / "ok", creds).ensure(ref)
    assert (img.rootfs / "p").exists()
    wrong = ImagesConfig(registries={http_registry.host: RegistryConfig(username="alice", password="nope")})
    with pytest.raises(ImageError, match=r"bad credentials|access .* refused"):
        await ImageStore(tmp_path / "wrong", wrong).ensure(ref)


async def test_bearer_anonymous(tmp_path: Path, http_registry: HttpRegistry) -> None:
    http_registry.auth = "bearer"
    http_registry.add_image("pub", "1", [layer({"p": b"1"})], CONFIG)
    img = await ImageStore(tmp_path, ImagesConfig()).ensure(f"{http_registry.host}/pub:1")
    assert (img.rootfs / "p").exists()


async def test_basic_without_credentials(tmp_path: Path, http_registry: HttpRegistry) -> None:
    http_registry.auth = "basic"
    http_registry.add_image("priv", "1", [layer({"p": b"1"})], CONFIG)
    with pytest.raises(ImageError, match="username and password"):
        await ImageStore(tmp_path, ImagesConfig()).ensure(f"{http_registry.host}/priv:1")


async def test_remove_and_prune(local_registry: str, tmp_path: Path, http_registry: HttpRegistry) -> None:
    store = ImageStore(tmp_path, ImagesConfig())
    bb = await store.ensure(BUSYBOX)
    http_registry.add_image("other", "1", [layer({"o": b"x" * 10000})], CONFIG)
    other = await store.ensure(f"{http_registry.host}/other:1")
    assert await store.prune() == 0  # everything is referenced
    await store.remove(f"{http_registry.host}/other:1")
    with pytest.raises(ImageNotFound):
        await store.remove(f"{http_registry.host}/other:1")
    assert other.rootfs.exists()  # remove only forgets the ref
    freed = await store.prune()
    assert freed >= 10000 * 2  # the layer blob and the unpacked file
    assert not other.rootfs.exists() and bb.rootfs.exists()
    assert [i.ref for i in ImageStore(tmp_path, ImagesConfig()).list()] == [BUSYBOX]
    await store.remove(BUSYBOX)
    assert await store.prune(in_use=[bb.rootfs]) > 0
    assert bb.rootfs.exists()  # a running sandbox's lowerdir is kept


async def test_two_stores_share_refs_and_crash_leftovers_go(local_registry: str, tmp_path: Path) -> None:
    a = ImageStore(tmp_path, ImagesConfig())
    b = ImageStore(tmp_path, ImagesConfig())  # e.g. the `stacyvm image` CLI next to the server
    img = await a.ensure(BUSYBOX)
    assert [i.ref for i in b.list()] == [BUSYBOX]
    await b.remove(BUSYBOX)
    assert a.list() == []
    await a.ensure(BUSYBOX)
    assert b.list() and a.registry.blob_fetches == 2
    # A crashed unpack (dead pid) is cleaned up; a live process's temp dir is left alone.
    dead = tmp_path / "rootfs" / f".tmp-999999999-{img.rootfs.name}-x"
    live = tmp_path / "rootfs" / f".tmp-{os.getpid()}-{img.rootfs.name}-y"
    dead.mkdir()
    live.mkdir()
    (tmp_path / "blobs/sha256/.tmp-999999999-partial").write_bytes(b"half")
    c = ImageStore(tmp_path, ImagesConfig())
    assert not dead.exists() and live.exists()
    assert not (tmp_path / "blobs/sha256/.tmp-999999999-partial").exists()
    assert [i.rootfs for i in c.list()] == [img.rootfs]


async def test_corrupt_cached_manifest_is_refetched(local_registry: str, tmp_path: Path) -> None:
    img = await ImageStore(tmp_path, ImagesConfig()).ensure(BUSYBOX)
    (tmp_path / "blobs/sha256" / img.digest.removeprefix("sha256:")).write_bytes(b'{"evil": 1}')
    store = ImageStore(tmp_path, ImagesConfig())
    again = await store.ensure(BUSYBOX, uid_shift=7)
    assert again.digest == img.digest and (again.rootfs / "bin/busybox").stat().st_uid == 7
