"""TTL enforcement from the store (a timer armed for the next expiry, not a periodic sweep),
and a watchdog that ends sandboxes whose runtime died under us (OOM of the init, crash)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from stacyvm_server.core.models import Reason, State, utcnow
from stacyvm_server.core.sandboxes import SandboxService
from stacyvm_server.store.db import Store

log = logging.getLogger("stacyvm.reaper")

# Upper bound on one sleep, so a clock jump or a missed wake-up costs at most this.
_MAX_SLEEP = 30.0
_RETRY_AFTER = 5.0
_WATCH_EVERY = 5.0


class Reaper:
    def __init__(self, store: Store, sandboxes: SandboxService) -> None:
        self.store = store
        self.sandboxes = sandboxes
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._inflight: dict[str, asyncio.Task[None]] = {}
        self._retry_at: dict[str, float] = {}

    def wake(self) -> None:
        """Called whenever an expiry moves, so the timer is re-armed."""
        self._wake.set()

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._run(), name="stacyvm-reaper"),
            asyncio.create_task(self._watch(), name="stacyvm-watchdog"),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
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
            self._inflight[sb.id] = asyncio.create_task(self._end(sb.id, Reason.TTL))

    async def _end(self, sandbox_id: str, reason: Reason) -> None:
        try:
            await self.sandboxes.terminate(sandbox_id, reason)
            self._retry_at.pop(sandbox_id, None)
        except Exception as exc:
            log.warning("destroy (%s) of %s failed, retrying in %.0fs: %s", reason.value, sandbox_id, _RETRY_AFTER, exc)
            self._retry_at[sandbox_id] = time.monotonic() + _RETRY_AFTER
        finally:
            self._inflight.pop(sandbox_id, None)
            self._wake.set()

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(_WATCH_EVERY)
            for sb in self.store.active_sandboxes():
                provider = self.sandboxes.providers.get(sb.provider)
                if sb.state != State.RUNNING or sb.handle is None or provider is None or sb.id in self._inflight:
                    continue
                try:
                    rt = await provider.state(sb.handle)
                except Exception as exc:
                    log.warning("state of %s unknown: %s", sb.id, exc)
                    continue
                if not rt.alive:
                    reason = Reason.OOM if rt.reason == "oom" else Reason.CRASHED
                    log.info("sandbox %s died (%s); cleaning up", sb.id, reason.value)
                    self._inflight[sb.id] = asyncio.create_task(self._end(sb.id, reason))

