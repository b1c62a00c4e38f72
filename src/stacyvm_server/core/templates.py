"""Templates: named spawn presets (contract §7, with the SDK's field names applied)."""

from __future__ import annotations

import re

from stacyvm_server.core.models import Template, utcnow
from stacyvm_server.errors import BadRequest
from stacyvm_server.store.db import Store

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def validate_template(t: Template) -> None:
    if not t.name:
        raise BadRequest("name is required")
    if not _NAME.match(t.name):
        raise BadRequest("name must be 1-128 characters of letters, digits, '.', '_' or '-'")
    if not t.image or not t.image.strip():
        raise BadRequest("image is required")
    if t.memory_mb <= 0:
        raise BadRequest("memory_mb must be positive")
    if t.vcpus <= 0:
        raise BadRequest("vcpus must be positive")
    if t.ttl_seconds <= 0:
        raise BadRequest("ttl must be positive")


class TemplateService:
    def __init__(self, store: Store) -> None:
        self.store = store

    async def list(self) -> list[Template]:
        return self.store.list_templates()

    async def get(self, name: str) -> Template:
        return self.store.get_template(name)

    async def create(self, t: Template) -> Template:
        validate_template(t)
        t.created_at = t.updated_at = utcnow()
        return self.store.put_template(t, create=True)

    async def update(self, name: str, t: Template) -> Template:
        t.name = name
        validate_template(t)
        t.updated_at = utcnow()
        return self.store.put_template(t, create=False)

    async def delete(self, name: str) -> None:
        self.store.delete_template(name)
