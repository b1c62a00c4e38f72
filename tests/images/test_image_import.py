"""import_archive: rootfs tars, `docker save` tars and OCI layouts (directory and tar)."""

import hashlib
import json
import tarfile
from pathlib import Path

import pytest

from stacyvm_server.config import ImagesConfig
from stacyvm_server.errors import ImageError
from stacyvm_server.images.store import ImageStore

from .conftest import BUSYBOX, Entry, make_tar

D, S = tarfile.DIRTYPE, tarfile.SYMTYPE


@pytest.mark.parametrize("gzip", [False, True])
async def test_rootfs_tar(tmp_path: Path, gzip: bool) -> None:
    tar = make_tar(tmp_path / "rootfs.tar", [
        Entry("./", type=D), Entry("./bin/", type=D), Entry("./bin/tool", b"#!/bin/sh\n", mode=0o755),
        Entry("./home/", type=D), Entry("./home/u/", type=D, uid=1000, gid=1000),
        Entry("./home/u/f", b"x", uid=1000, gid=1000), Entry("./link", type=S, linkname="bin/tool"),
    ], gzip=gzip)
    store = ImageStore(tmp_path / "cache", ImagesConfig())
    img = await store.import_archive(tar, "local/tools:1", uid_shift=100000)
    assert img.ref == "docker.io/local/tools:1"
    assert (img.rootfs / "bin/tool").read_bytes() == b"#!/bin/sh\n"
    assert (img.rootfs / "home/u/f").stat().st_uid == 101000
    assert img.config.env and img.config.workdir == "/"
    # The synthesised image is a normal cached image: a restart finds it without the tar.
    tar.unlink()
    again = await ImageStore(tmp_path / "cache", ImagesConfig()).ensure("local/tools:1", uid_shift=100000)
    assert again == img


async def test_docker_save_tar(docker_save_busybox: Path, tmp_path: Path) -> None:
    with tarfile.open(docker_save_busybox) as t:
        assert "manifest.json" in t.getnames()
    store = ImageStore(tmp_path / "cache", ImagesConfig())
    img = await store.import_archive(docker_save_busybox, "stacyvm/busybox:1.35")
    assert (img.rootfs / "bin/busybox").is_file()
    assert img.config.cmd == ["/bin/sh"]


async def test_docker_save_tampered_layer(tmp_path: Path) -> None:
    layer = make_tar(tmp_path / "layer.tar", [Entry("f", b"good")])
    diff_id = "sha256:" + hashlib.sha256(layer.read_bytes()).hexdigest()
    config = {"architecture": "amd64", "os": "linux", "config": {"Cmd": ["/f"]},
              "rootfs": {"type": "layers", "diff_ids": [diff_id]}}
    tampered = make_tar(tmp_path / "evil-layer.tar", [Entry("f", b"evil")])
    archive = make_tar(tmp_path / "save.tar", [
        Entry("manifest.json", json.dumps([{"Config": "c.json", "RepoTags": ["x:1"],
                                            "Layers": ["l/layer.tar"]}]).encode()),
        Entry("c.json", json.dumps(config).encode()),
        Entry("l/layer.tar", tampered.read_bytes()),
    ])
    with pytest.raises(ImageError, match="digest mismatch"):
        await ImageStore(tmp_path / "cache", ImagesConfig()).import_archive(archive, "x:1")


async def test_oci_layout_dir_and_tar(oci_busybox: Path, tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "cache", ImagesConfig())
    from_dir = await store.import_archive(oci_busybox, "stacyvm/busybox:1.35")
    assert (from_dir.rootfs / "bin/busybox").is_file()
    layout_tar = tmp_path / "layout.tar"
    with tarfile.open(layout_tar, "w") as t:
        t.add(oci_busybox, arcname=".")
    from_tar = await store.import_archive(layout_tar, "other/name:1.35")
    assert from_tar.digest == from_dir.digest and from_tar.rootfs == from_dir.rootfs
    pulled = await store.ensure(BUSYBOX)
    assert pulled.digest == from_dir.digest  # one content-addressed cache for pulls and imports


async def test_oci_layout_tampered_blob(oci_busybox: Path, tmp_path: Path) -> None:
    index = json.loads((oci_busybox / "index.json").read_text())
    manifest = json.loads((oci_busybox / "blobs/sha256" / index["manifests"][0]["digest"][7:]).read_text())
    blob = oci_busybox / "blobs/sha256" / manifest["layers"][0]["digest"][7:]
    data = bytearray(blob.read_bytes())
    data[-100] ^= 0xFF
    blob.write_bytes(data)
    store = ImageStore(tmp_path / "cache", ImagesConfig())
    with pytest.raises(ImageError, match="digest mismatch"):
        await store.import_archive(oci_busybox, "stacyvm/busybox:1.35")
    assert store.list() == []


async def test_oci_layout_picks_tag(oci_busybox: Path, tmp_path: Path) -> None:
    index = json.loads((oci_busybox / "index.json").read_text())
    second = dict(index["manifests"][0], annotations={"org.opencontainers.image.ref.name": "other"})
    index["manifests"].append(second)
    (oci_busybox / "index.json").write_text(json.dumps(index))
    store = ImageStore(tmp_path / "cache", ImagesConfig())
    with pytest.raises(ImageError, match=r"tags in the layout: 1\.35, other"):
        await store.import_archive(oci_busybox, "stacyvm/busybox:latest")
    assert (await store.import_archive(oci_busybox, "x:other")).ref == "docker.io/library/x:other"


async def test_not_an_archive(tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "cache", ImagesConfig())
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"\x00not a tar" * 10)
    with pytest.raises(ImageError, match="not a directory or readable tar"):
        await store.import_archive(junk, "x:1")
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(ImageError, match="OCI layout"):
        await store.import_archive(tmp_path / "emptydir", "x:1")
    with pytest.raises(ImageError, match="no such file"):
        await store.import_archive(tmp_path / "missing.tar", "x:1")
