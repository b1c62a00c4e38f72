"""Per-owner quotas (contract §9)."""

from __future__ import annotations

from datetime import timedelta

from stacyvm_server.core.events import EventBus
from stacyvm_server.core.limits import Limits
from stacyvm_server.core.models import Quota, utcnow
from stacyvm_server.core.owners import normalize_owner
from stacyvm_server.durations import format_go_duration
from stacyvm_server.errors import BadRequest, NotFound
from stacyvm_server.store.db import Store


def _owner(raw: str) -> str:
    owner = normalize_owner(raw)
    if owner is None:
        raise BadRequest("owner_id is required")
    return owner


class QuotaService:
    def __init__(self, store: Store, limits: Limits, events: EventBus) -> None:
        self.store = store
        self.limits = limits
        self.events = events

    def _seconds(self, text: str, field: str) -> int:
        if text in ("", "0", "0s"):
            return 0
        value = self.limits.parse_duration(text, field)
        if value < timedelta(0):
            raise BadRequest(f"{field}: duration cannot be negative")
        if value < timedelta(seconds=1):
            raise BadRequest(f"{field}: duration must be at least 1s")
        if value.microseconds:
            raise BadRequest(f"{field}: duration must use whole seconds")
        return int(value.total_seconds())

    async def list(self) -> list[Quota]:
        return self.store.list_quotas()

    async def summary(self) -> dict[str, int]:
        qs = self.store.list_quotas()
        return {
            "total": len(qs),
            "with_max_sandboxes": sum(1 for q in qs if q.max_sandboxes),
            "with_max_ttl": sum(1 for q in qs if q.max_ttl_s),
            "with_max_exec_timeout": sum(1 for q in qs if q.max_exec_timeout_s),
        }

    async def get(self, owner_id: str) -> Quota:
        owner = _owner(owner_id)
        q = self.store.get_quota(owner)
        if q is None:
            raise NotFound(f'quota for owner "{owner}" not found')
        return q

    async def put(self, owner_id: str, max_sandboxes: int, max_ttl: str, max_exec_timeout: str) -> Quota:
        owner = _owner(owner_id)
        if max_sandboxes < 0:
            raise BadRequest("max_sandboxes cannot be negative")
        q = Quota(
            owner_id=owner,
            max_sandboxes=max_sandboxes,
            max_ttl_s=self._seconds(max_ttl, "max_ttl"),
            max_exec_timeout_s=self._seconds(max_exec_timeout, "max_exec_timeout"),
            updated_at=utcnow(),
        )
        saved = self.store.put_quota(q)
        self.events.publish(
            "quota.saved",
            None,
            {
                "owner_id": owner,
                "max_sandboxes": q.max_sandboxes,
                "max_ttl": format_go_duration(timedelta(seconds=q.max_ttl_s)),
                "max_exec_timeout": format_go_duration(timedelta(seconds=q.max_exec_timeout_s)),
            },
        )
        return saved

    async def delete(self, owner_id: str) -> None:
        owner = _owner(owner_id)
        self.store.delete_quota(owner)
        self.events.publish("quota.deleted", None, {"owner_id": owner})

    async def usage(self, owner_id: str) -> dict[str, object]:
        owner = _owner(owner_id)
        return {
            "owner_id": owner,
            "active_sandboxes": self.store.count_active(owner),
            "max_sandboxes": self.limits.max_sandboxes_per_owner(owner),
            "max_ttl": format_go_duration(self.limits.max_ttl(owner)),
            "max_exec_timeout": format_go_duration(self.limits.max_exec_timeout(owner)),
            "quota_configured": self.store.get_quota(owner) is not None,
        }
