"""Owner id rules (contract §2.4)."""

from __future__ import annotations

from stacyvm_server.errors import BadRequest


def normalize_owner(raw: str | None) -> str | None:
    """Trim; empty means "no owner". Reject what could confuse paths, logs or headers."""
    if raw is None:
        return None
    owner = raw.strip()
    if not owner:
        return None
    if len(owner.encode()) > 128:
        raise BadRequest("owner_id must be 128 characters or fewer")
    if "/" in owner or "\\" in owner:
        raise BadRequest("owner_id cannot contain path separators")
    if any(ord(c) <= 0x20 or ord(c) == 0x7F or c.isspace() for c in owner):
        raise BadRequest("owner_id cannot contain whitespace or control characters")
    return owner


class Owners:
    """Small facade so the HTTP layer reaches owner rules through core."""

    @staticmethod
    def normalize(raw: str | None) -> str | None:
        return normalize_owner(raw)
