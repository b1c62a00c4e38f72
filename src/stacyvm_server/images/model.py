"""What the rest of the server sees of an image."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class ImageConfig:
    """The parts of the OCI image config that shape a sandbox."""

    env: list[str] = field(default_factory=list)  # "KEY=value"
    workdir: str = ""
    user: str = ""
    entrypoint: list[str] = field(default_factory=list)
    cmd: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Image:
    ref: str  # normalised reference, e.g. "docker.io/library/alpine:latest"
    digest: str  # manifest digest, "sha256:..."
    config: ImageConfig
    rootfs: Path  # unpacked, read-only root; used as the overlay lowerdir
    size: int  # bytes on disk
