"""API keys: configured in plain text or as sha256, stored hashed, checked by hash."""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from stacyvm_server.config import AuthConfig
from stacyvm_server.core.models import Role, utcnow
from stacyvm_server.store.db import Store
from stacyvm_server.store.tables import ApiKeyRow


@dataclass(frozen=True)
class KeyInfo:
    name: str
    role: Role
    tenant: str | None = None
    owner: str | None = None


def hash_key(raw: str) -> str:
    return hashlib.sha256(raw.encode()).hexdigest()


class KeyRing:
    def __init__(self, auth: AuthConfig, store: Store) -> None:
        rows: list[ApiKeyRow] = []

        def add(digest: str, name: str, role: str, tenant: str | None, owner: str | None) -> None:
            rows.append(
                ApiKeyRow(
                    key_sha256=digest.lower(), name=name, role=role, tenant=tenant, owner=owner,
                    source="config", created_at=utcnow(),
                )
            )

        if auth.api_key:
            add(hash_key(auth.api_key), "api_key", "api", None, None)
        if auth.admin_api_key:
            add(hash_key(auth.admin_api_key), "admin_api_key", "admin", None, None)
        for i, k in enumerate(auth.keys):
            if not (k.key or k.key_sha256):
                raise ValueError(f"auth.keys[{i}]: needs key or key_sha256")
            add(k.key_sha256 or hash_key(k.key or ""), k.name or f"key{i}", k.role, k.tenant, k.owner)
        store.replace_config_keys(rows)
        self._keys = {
            r.key_sha256: KeyInfo(r.name, r.role, r.tenant, r.owner)  # type: ignore[arg-type]
            for r in store.list_keys()
        }

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def authenticate(self, raw_key: str) -> KeyInfo | None:
        digest = hash_key(raw_key)
        for known, info in self._keys.items():
            if hmac.compare_digest(known, digest):
                return info
        return None
