"""The one id generator."""

from __future__ import annotations

import re
import secrets

_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789"
SANDBOX_ID_RE = re.compile(r"^sb_[a-z0-9]{12}$")


def new_id(prefix: str, length: int = 12) -> str:
    """`prefix_` + `length` random base36 chars (12 chars = 62 bits)."""
    return prefix + "_" + "".join(secrets.choice(_ALPHABET) for _ in range(length))


def new_sandbox_id() -> str:
    return new_id("sb")


def normalize_sandbox_id(raw: str) -> str:
    """Preview hosts may spell the id with `-`; the canonical form uses `_`."""
    if raw.startswith("sb-"):
        return "sb_" + raw[3:]
    return raw
