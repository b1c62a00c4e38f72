"""Manifest and image-config parsing shared by registry pulls and archive imports."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from stacyvm_server.errors import ImageError
from stacyvm_server.images.model import ImageConfig

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
INDEX_TYPES = (OCI_INDEX, DOCKER_LIST)
MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
ACCEPT = ", ".join((*MANIFEST_TYPES, *INDEX_TYPES))
PLATFORM = ("linux", "amd64")


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int


@dataclass(frozen=True)
class Manifest:
    digest: str
    raw: bytes
    config: Descriptor
    layers: list[Descriptor]


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def check_digest(digest: str) -> str:
    """Only sha256 digests are accepted; return the hex part."""
    algo, _, hexpart = digest.partition(":")
    if algo != "sha256" or len(hexpart) != 64 or not all(c in "0123456789abcdef" for c in hexpart):
        raise ImageError(f"unsupported or malformed digest {digest!r}")
    return hexpart


def load_json(raw: bytes, what: str) -> dict[str, Any]:
    try:
        doc = json.loads(raw)
    except ValueError as exc:
        raise ImageError(f"{what} is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise ImageError(f"{what} is not a JSON object")
    return doc


def _descriptor(d: Any, what: str) -> Descriptor:
    try:
        desc = Descriptor(str(d.get("mediaType", "")), str(d["digest"]), int(d["size"]))
    except (AttributeError, KeyError, TypeError, ValueError):
        raise ImageError(f"{what}: malformed descriptor {d!r}") from None
    check_digest(desc.digest)
    return desc


def media_type(raw: bytes, header: str | None) -> str:
    doc = load_json(raw, "manifest")
    mt = doc.get("mediaType") or (header or "").split(";")[0].strip()
    if not mt and "manifests" in doc:
        mt = OCI_INDEX
    elif not mt and "layers" in doc:
        mt = OCI_MANIFEST
    if doc.get("schemaVersion") == 1:
        raise ImageError("Docker schema 1 manifests are not supported (deprecated; re-push the image)")
    return str(mt)


def pick_platform(raw: bytes) -> Descriptor:
    """From an index / manifest list, the manifest for linux/amd64."""
    doc = load_json(raw, "image index")
    found = []
    for entry in doc.get("manifests") or []:
        plat = entry.get("platform") or {}
        found.append(f"{plat.get('os')}/{plat.get('architecture')}")
        if (plat.get("os"), plat.get("architecture")) == PLATFORM:
            return _descriptor(entry, "image index")
    raise ImageError(f"image has no linux/amd64 variant (has: {', '.join(found) or 'none'})")


def parse_manifest(raw: bytes, digest: str) -> Manifest:
    doc = load_json(raw, "manifest")
    if "config" not in doc or "layers" not in doc:
        raise ImageError("manifest has no config or layers")
    layers = [_descriptor(d, "manifest layer") for d in doc["layers"] or []]
    return Manifest(digest, raw, _descriptor(doc["config"], "manifest config"), layers)


def parse_config(raw: bytes) -> ImageConfig:
    doc = load_json(raw, "image config")
    c = doc.get("config") or {}
    return ImageConfig(
        env=list(c.get("Env") or []),
        workdir=str(c.get("WorkingDir") or ""),
        user=str(c.get("User") or ""),
        entrypoint=list(c.get("Entrypoint") or []),
        cmd=list(c.get("Cmd") or []),
    )
