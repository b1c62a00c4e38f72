"""OCI image references, normalised the way Docker does it.

`alpine` -> `docker.io/library/alpine:latest`; `user/x:tag`; `host:port/x`;
`x@sha256:<hex>`; `x:tag@sha256:<hex>` (the digest wins when pulling).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from stacyvm_server.errors import ImageError

DOCKER_HUB = "docker.io"
_HUB_ALIASES = {"index.docker.io", "registry-1.docker.io", "registry.hub.docker.com"}

# Grammar from github.com/distribution/reference.
_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_DOMAIN = re.compile(
    r"(?:localhost|\[[0-9a-fA-F:]+\]|[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?"
    r"(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*)(?::[0-9]{1,5})?"
)
_TAG = re.compile(r"[\w][\w.-]{0,127}")
_SHA256 = re.compile(r"sha256:[0-9a-f]{64}")
_MAX_NAME = 255


@dataclass(frozen=True)
class Reference:
    registry: str  # "docker.io", "127.0.0.1:5000"
    repository: str  # "library/alpine"
    tag: str | None = None
    digest: str | None = None  # "sha256:<hex>"

    @property
    def name(self) -> str:
        return f"{self.registry}/{self.repository}"

    @property
    def selector(self) -> str:
        """What to ask the registry for: the digest when known, else the tag."""
        return self.digest or self.tag or "latest"

    def __str__(self) -> str:
        text = self.name
        if self.tag:
            text += f":{self.tag}"
        if self.digest:
            text += f"@{self.digest}"
        return text


def parse_reference(
    text: str, *, default_registry: str = DOCKER_HUB, aliases: Mapping[str, str] | None = None
) -> Reference:
    """Parse and normalise an image reference; raise ImageError naming what is wrong."""
    if aliases and text in aliases:
        text = aliases[text]
    if not text or text != text.strip():
        raise ImageError(f"invalid image reference {text!r}: empty or surrounded by whitespace")
    rest, digest = text, None
    if "@" in rest:
        rest, digest = rest.split("@", 1)
        if not _SHA256.fullmatch(digest):
            raise ImageError(f"invalid image reference {text!r}: digest must be sha256:<64 lowercase hex>")
    tag = None
    slash = rest.rfind("/")
    colon = rest.rfind(":")
    if colon > slash:  # a colon after the last slash is a tag, not a port
        rest, tag = rest[:colon], rest[colon + 1 :]
        if not _TAG.fullmatch(tag):
            raise ImageError(f"invalid image reference {text!r}: bad tag {tag!r}")
    registry, path = _split_registry(rest, default_registry)
    if not _DOMAIN.fullmatch(registry):
        raise ImageError(f"invalid image reference {text!r}: bad registry host {registry!r}")
    if registry in _HUB_ALIASES:
        registry = DOCKER_HUB
    if registry == DOCKER_HUB and "/" not in path:
        path = f"library/{path}"
    for part in path.split("/"):
        if not _COMPONENT.fullmatch(part):
            hint = " (must be lowercase)" if part.lower() != part else ""
            raise ImageError(f"invalid image reference {text!r}: bad repository component {part!r}{hint}")
    if len(registry) + 1 + len(path) > _MAX_NAME:
        raise ImageError(f"invalid image reference {text!r}: name longer than {_MAX_NAME} characters")
    if tag is None and digest is None:
        tag = "latest"
    return Reference(registry, path, tag, digest)


def _split_registry(rest: str, default_registry: str) -> tuple[str, str]:
    if "/" in rest:
        first, path = rest.split("/", 1)
        # Like Docker: the first part is a host only if it looks like one.
        if "." in first or ":" in first or first == "localhost" or first.startswith("["):
            return first, path
    return default_registry, rest
