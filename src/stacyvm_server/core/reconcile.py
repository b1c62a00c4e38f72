"""Startup reconcile: make the store and what the providers really run agree."""

from __future__ import annotations

import logging

from stacyvm_server.core.events import EventBus
from stacyvm_server.core.models import Reason, State, utcnow
from stacyvm_server.core.sandboxes import SandboxService
from stacyvm_server.providers.base import Provider
from stacyvm_server.store.db import Store

log = logging.getLogger("stacyvm.reconcile")


async def reconcile(store: Store, sandboxes: SandboxService, events: EventBus, name: str, provider: Provider) -> None:
    """Adopt what is ours and alive, destroy what is ours and orphaned, mark what vanished."""
    found = {item.sandbox_id: item for item in await provider.inventory()}

    def note(sandbox_id: str, action: str, reason: str | None = None) -> None:
        data: dict[str, object] = {"action": action, "provider": name}
        if reason:
            data["reason"] = reason
        events.publish("reconcile.action", sandbox_id, data)
        log.info("reconcile %s: %s %s", sandbox_id, action, reason or "")

    for sb in store.active_sandboxes(provider=name):
        item = found.pop(sb.id, None)
        if item is None:
            sb.state, sb.reason, sb.destroyed_at = State.DESTROYED, Reason.HOST_LOST, utcnow()
            sandboxes.save(sb)
            note(sb.id, "marked_destroyed", Reason.HOST_LOST.value)
            continue
        if sb.handle is None:
            sb.handle = item.handle
            sandboxes.save(sb)
        if sb.state == State.CREATING:
            # The server died mid-spawn: nobody got this sandbox, so it goes.
            await sandboxes.terminate(sb.id, Reason.STARTUP_FAILED)
            note(sb.id, "destroyed_half_created", Reason.STARTUP_FAILED.value)
        elif not item.alive:
            rt = await provider.state(item.handle)
            reason = Reason.OOM if rt.reason == "oom" else Reason.CRASHED
            await sandboxes.terminate(sb.id, reason)
            note(sb.id, "destroyed_dead", reason.value)
        else:
            if sb.state != State.RUNNING:
                sb.state = State.RUNNING
                sandboxes.save(sb)
            note(sb.id, "adopted_runtime")
    for orphan in found.values():
        # Ours (the provider tagged it) but the store does not know it: it would leak.
        await provider.destroy(orphan.handle)
        note(orphan.sandbox_id, "destroyed_orphan")
