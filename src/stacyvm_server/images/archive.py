"""Import images from files: an OCI layout (directory or tar), a `docker save` tar, or a rootfs tar.

Everything lands in the blob store as a normal image (a manifest, a config and
layers), with digests checked where the archive states them, so imports and
pulls share one cache and one unpack path.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import tarfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from stacyvm_server.errors import ImageError
from stacyvm_server.images.blobs import BlobStore
from stacyvm_server.images.manifest import (
    DOCKER_MANIFEST,
    INDEX_TYPES,
    OCI_CONFIG,
    OCI_LAYER,
    OCI_LAYER_GZIP,
    OCI_MANIFEST,
    Descriptor,
    Manifest,
    check_digest,
    load_json,
    media_type,
    parse_manifest,
    pick_platform,
)
from stacyvm_server.images.reference import Reference

DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar"
_REF_NAME = "org.opencontainers.image.ref.name"
_DEFAULT_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class _Source:
    """Read files of an archive by relative path, whether it is a directory or a tar."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.tar: tarfile.TarFile | None = None
        self.members: dict[str, tarfile.TarInfo] = {}
        if path.is_dir():
            return
        try:
            self.tar = tarfile.open(path)
            for m in self.tar.getmembers():
                self.members[m.name.removeprefix("./")] = m
        except (tarfile.TarError, OSError) as exc:
            raise ImageError(f"{path.name}: not a directory or readable tar: {exc}") from None

    def has(self, rel: str) -> bool:
        return (self.path / rel).is_file() if self.tar is None else rel in self.members

    @contextmanager
    def open(self, rel: str) -> Iterator[IO[bytes]]:
        if self.tar is None:
            try:
                with open(self.path / rel, "rb") as plain:
                    yield plain
            except FileNotFoundError:
                raise ImageError(f"{self.path.name}: {rel} is missing") from None
            return
        m = self.members.get(rel)
        f = self.tar.extractfile(m) if m is not None and m.isreg() else None
        if f is None:
            raise ImageError(f"{self.path.name}: {rel} is missing or not a file")
        with f:
            yield f

    def read(self, rel: str) -> bytes:
        with self.open(rel) as f:
            return f.read()

    def close(self) -> None:
        if self.tar is not None:
            self.tar.close()


def import_archive(path: Path, ref: Reference, blobs: BlobStore) -> Manifest:
    """Detect the archive kind, copy its blobs into the store, return the image manifest."""
    if not path.exists():
        raise ImageError(f"{path}: no such file or directory")
    src = _Source(path)
    try:
        if src.has("index.json") and (src.tar is None or src.has("oci-layout")):
            return _from_oci_layout(src, ref, blobs)
        if src.tar is None:
            raise ImageError(f"{path}: a directory must be an OCI layout (no index.json)")
        if src.has("manifest.json"):
            return _from_docker_save(src, ref, blobs)
        return _from_rootfs_tar(path, blobs)
    finally:
        src.close()


def _from_oci_layout(src: _Source, ref: Reference, blobs: BlobStore) -> Manifest:
    index = load_json(src.read("index.json"), "index.json")
    entries = index.get("manifests") or []
    names = [e.get("annotations", {}).get(_REF_NAME) for e in entries]
    wanted = [e for e, n in zip(entries, names, strict=True) if n and n in (ref.tag, str(ref))]
    if not wanted and len(entries) == 1:
        wanted = entries
    if len(wanted) != 1:
        raise ImageError(
            f"{src.path.name}: cannot tell which image to import as {ref} "
            f"(tags in the layout: {', '.join(n for n in names if n) or 'none'})"
        )
    digest = str(wanted[0].get("digest", ""))
    raw = _copy_small(src, digest, blobs)
    if media_type(raw, wanted[0].get("mediaType")) in INDEX_TYPES:
        digest = pick_platform(raw).digest
        raw = _copy_small(src, digest, blobs)
    manifest = parse_manifest(raw, digest)
    for desc in [manifest.config, *manifest.layers]:
        with src.open(_blob_path(desc.digest)) as f:
            blobs.put_file(f, desc.digest, desc.size)
    return manifest


def _from_docker_save(src: _Source, ref: Reference, blobs: BlobStore) -> Manifest:
    entries = json.loads(src.read("manifest.json"))
    if not isinstance(entries, list) or not entries:
        raise ImageError(f"{src.path.name}: manifest.json lists no images")
    tags = {f"{ref.repository.removeprefix('library/')}:{ref.tag}", f"{ref.name}:{ref.tag}"}
    wanted = [e for e in entries if tags & set(e.get("RepoTags") or [])] or entries
    if len(wanted) != 1:
        raise ImageError(f"{src.path.name}: several images inside and none tagged {ref}")
    entry = wanted[0]
    config_raw = src.read(entry["Config"])
    config = Descriptor(DOCKER_CONFIG, blobs.put_bytes(config_raw), len(config_raw))
    diff_ids = (load_json(config_raw, "image config").get("rootfs") or {}).get("diff_ids") or []
    layers = []
    for i, name in enumerate(entry.get("Layers") or []):
        with src.open(name) as f:
            gz = f.read(2) == b"\x1f\x8b"
            f.seek(0)
            # An uncompressed layer's digest is its diff_id: check it against the config.
            expected = diff_ids[i] if not gz and i < len(diff_ids) else None
            digest = blobs.put_file(f, expected)
        size = blobs.path(digest).stat().st_size
        layers.append(Descriptor(OCI_LAYER_GZIP if gz else DOCKER_LAYER, digest, size))
    return _store_manifest(DOCKER_MANIFEST, config, layers, blobs)


def _from_rootfs_tar(path: Path, blobs: BlobStore) -> Manifest:
    with open(path, "rb") as f:
        gz = f.read(2) == b"\x1f\x8b"
        f.seek(0)
        digest = blobs.put_file(f)
    diff_id = digest
    if gz:
        h = hashlib.sha256()  # the config's diff_id names the uncompressed tar
        with gzip.open(blobs.path(digest), "rb") as g:
            while chunk := g.read(1 << 20):
                h.update(chunk)
        diff_id = "sha256:" + h.hexdigest()
    config_doc: dict[str, Any] = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Env": [_DEFAULT_PATH], "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
    }
    config_raw = json.dumps(config_doc, separators=(",", ":")).encode()
    config = Descriptor(OCI_CONFIG, blobs.put_bytes(config_raw), len(config_raw))
    layer = Descriptor(OCI_LAYER_GZIP if gz else OCI_LAYER, digest, path.stat().st_size)
    return _store_manifest(OCI_MANIFEST, config, [layer], blobs)


def _store_manifest(mt: str, config: Descriptor, layers: list[Descriptor], blobs: BlobStore) -> Manifest:
    def desc(d: Descriptor) -> dict[str, Any]:
        return {"mediaType": d.media_type, "digest": d.digest, "size": d.size}

    doc = {"schemaVersion": 2, "mediaType": mt, "config": desc(config), "layers": [desc(d) for d in layers]}
    raw = json.dumps(doc, separators=(",", ":")).encode()
    return parse_manifest(raw, blobs.put_bytes(raw))


def _blob_path(digest: str) -> str:
    return f"blobs/sha256/{check_digest(digest)}"


def _copy_small(src: _Source, digest: str, blobs: BlobStore) -> bytes:
    raw = src.read(_blob_path(digest))
    blobs.put_bytes(raw, digest)  # raises ImageError on a tampered blob
    return raw
