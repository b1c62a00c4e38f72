"""Effective limits: global defaults, overridden per owner by quotas."""

from __future__ import annotations

from datetime import timedelta

from stacyvm_server.config import DefaultsConfig
from stacyvm_server.durations import DurationError, format_go_duration, parse_go_duration
from stacyvm_server.errors import BadRequest, ResourceLimit
from stacyvm_server.store.db import Store


class Limits:
    def __init__(self, defaults: DefaultsConfig, store: Store) -> None:
        self.defaults = defaults
        self.store = store

    @staticmethod
    def parse_duration(text: str, field: str) -> timedelta:
        try:
            return parse_go_duration(text)
        except DurationError as exc:
            raise BadRequest(f"{field}: {exc} (use a Go duration like 30s, 10m or 1h30m)") from None

    def max_ttl(self, owner: str | None) -> timedelta:
        q = self.store.get_quota(owner) if owner else None
        if q and q.max_ttl_s:
            return timedelta(seconds=q.max_ttl_s)
        return parse_go_duration(self.defaults.max_ttl)

    def max_exec_timeout(self, owner: str | None) -> timedelta:
        q = self.store.get_quota(owner) if owner else None
        if q and q.max_exec_timeout_s:
            return timedelta(seconds=q.max_exec_timeout_s)
        return parse_go_duration(self.defaults.max_exec_timeout)

    def max_sandboxes_per_owner(self, owner: str | None) -> int:
        if owner is None:
            return 0
        q = self.store.get_quota(owner)
        if q and q.max_sandboxes:
            return q.max_sandboxes
        return self.defaults.max_sandboxes_per_owner

    def check_ttl(self, ttl: timedelta, owner: str | None) -> None:
        if ttl <= timedelta(0):
            raise BadRequest("ttl must be positive")
        cap = self.max_ttl(owner)
        if cap and ttl > cap:
            raise ResourceLimit(f"ttl {format_go_duration(ttl)} exceeds max ttl {format_go_duration(cap)}")

    def exec_timeout(self, requested: str | None, owner: str | None) -> float | None:
        """Seconds, or None for no timeout. Explicit values are capped; the default is not."""
        if requested:
            value = self.parse_duration(requested, "timeout")
            if value < timedelta(0):
                raise BadRequest("timeout cannot be negative")
            cap = self.max_exec_timeout(owner)
            if cap and value > cap:
                raise ResourceLimit(
                    f"exec timeout {format_go_duration(value)} exceeds max exec timeout {format_go_duration(cap)}"
                )
        else:
            value = parse_go_duration(self.defaults.default_exec_timeout)
        seconds = value.total_seconds()
        return seconds if seconds > 0 else None
