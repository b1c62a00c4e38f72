"""TTL enforcement from the store: a timer armed for the next expiry, not a periodic sweep."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from stacyvm_server.core.models import Reason, utcnow
from stacyvm_server.core.sandboxes import SandboxService
from stacyvm_server.store.db import Store

log = logging.getLogger("stacyvm.reaper")

# Upper bound on one sleep, so a clock jump or a missed wake-up costs at most this.
_MAX_SLEEP = 30.0
_RETRY_AFTER = 5.0


class Reaper:
    def __init__(self, store: Store, sandboxes: SandboxService) -> None:
        self.store = store
        self.sandboxes = sandboxes
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._inflight: dict[str, asyncio.Task[None]] = {}
        self._retry_at: dict[str, float] = {}

    def wake(self) -> None:
        """Called whenever an expiry moves, so the timer is re-armed."""
        self._wake.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="stacyvm-reaper")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._inflight:
            await asyncio.gather(*self._inflight.values(), return_exceptions=True)

    async def _run(self) -> None:
        while True:
            self.reap_due()
            nxt = self.store.next_expiry()
            delay = _MAX_SLEEP if nxt is None else (nxt - utcnow()).total_seconds()
            if self._retry_at:
                delay = min(delay, _RETRY_AFTER)
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), min(max(delay, 0.0) + 0.01, _MAX_SLEEP))

    def reap_due(self) -> None:
        now = time.monotonic()
        for sb in self.store.expired(utcnow()):
            if sb.id in self._inflight or self._retry_at.get(sb.id, 0) > now:
                continue
            self._inflight[sb.id] = asyncio.create_task(self._reap(sb.id))

    async def _reap(self, sandbox_id: str) -> None:
        try:
            await self.sandboxes.terminate(sandbox_id, Reason.TTL)
            self._retry_at.pop(sandbox_id, None)
        except Exception as exc:
            log.warning("TTL destroy of %s failed, retrying in %.0fs: %s", sandbox_id, _RETRY_AFTER, exc)
            self._retry_at[sandbox_id] = time.monotonic() + _RETRY_AFTER
        finally:
            self._inflight.pop(sandbox_id, None)
            self._wake.set()
