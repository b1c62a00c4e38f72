"""Core: wires store, providers, services, reaper and events. No HTTP here."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from datetime import datetime

from stacyvm_server import __version__
from stacyvm_server.config import Settings
from stacyvm_server.core.events import EventBus
from stacyvm_server.core.keys import KeyRing
from stacyvm_server.core.limits import Limits
from stacyvm_server.core.metrics import Metrics
from stacyvm_server.core.models import utcnow
from stacyvm_server.core.owners import Owners
from stacyvm_server.core.previews import PreviewService
from stacyvm_server.core.processes import ProcessService
from stacyvm_server.core.quotas import QuotaService
from stacyvm_server.core.reaper import Reaper
from stacyvm_server.core.reconcile import reconcile
from stacyvm_server.core.sandboxes import SandboxService
from stacyvm_server.core.templates import TemplateService
from stacyvm_server.errors import NotFound
from stacyvm_server.images.store import ImageStore
from stacyvm_server.providers.base import Provider, ProviderHealth
from stacyvm_server.providers.registry import build_providers
from stacyvm_server.store.db import Store

log = logging.getLogger("stacyvm")

_HEALTH_BUDGET = 2.0


@dataclass
class ProviderInfo:
    name: str
    healthy: bool
    default: bool
    latency_ms: float
    last_checked: datetime
    capabilities: list[str]
    error: str | None = None
    sandbox_count: int = 0
    config: dict[str, str] = field(default_factory=dict)


class Core:
    def __init__(self, settings: Settings, providers: dict[str, Provider] | None = None) -> None:
        self.settings = settings
        self.version = __version__
        self.started_at = time.monotonic()
        settings.server.data_dir.mkdir(parents=True, exist_ok=True)
        self.store = Store(settings.db_path)
        self.store.migrate()
        self.keys = KeyRing(settings.auth, self.store)
        self.owners = Owners()
        self.events = EventBus(self.store, settings.events.history)
        self.metrics = Metrics(self.store.counts_by_state_provider)
        self.images = ImageStore(settings.images_dir, settings.images)
        self.providers = providers if providers is not None else build_providers(settings, self.images)
        self.limits = Limits(settings.defaults, self.store)
        self.reaper: Reaper | None = None
        self.sandboxes = SandboxService(
            settings, self.store, self.providers, self.events, self.metrics, self.limits, self._wake_reaper
        )
        self.processes = ProcessService(self.sandboxes, self.events, settings.server.data_dir)
        self.templates = TemplateService(self.store)
        self.quotas = QuotaService(self.store, self.limits, self.events)
        self.previews = PreviewService(settings.preview, settings.server.preview_domain, settings.server.data_dir,
                                       self.sandboxes)
        self._failed_providers: dict[str, str] = {}

    def _wake_reaper(self) -> None:
        if self.reaper is not None:
            self.reaper.wake()

    async def start(self) -> None:
        for name, provider in self.providers.items():
            try:
                await provider.start()
                await reconcile(self.store, self.sandboxes, self.events, name, provider)
            except Exception as exc:
                # The server still serves the other providers; /ready and /providers show why.
                self._failed_providers[name] = str(exc)
                log.error("provider %s is unavailable: %s", name, exc)
        self.reaper = Reaper(self.store, self.sandboxes)
        self.reaper.start()
        self.processes.start_watching()

    async def stop(self) -> None:
        if self.reaper is not None:
            await self.reaper.stop()
        await self.processes.close()  # background processes are not kept across restarts
        self.events.close()
        for provider in self.providers.values():
            try:
                await provider.close()
            except Exception:
                log.exception("closing provider %s", provider.name)
        self.store.close()

    # providers -------------------------------------------------------------------
    async def _health(self, name: str) -> ProviderHealth:
        if name in self._failed_providers:
            return ProviderHealth(False, self._failed_providers[name])
        start = time.perf_counter()
        try:
            h = await asyncio.wait_for(self.providers[name].health(), _HEALTH_BUDGET)
        except Exception as exc:
            return ProviderHealth(False, f"health check failed: {exc}")
        return ProviderHealth(h.healthy, h.error, round((time.perf_counter() - start) * 1000, 3))

    async def provider_info(self, name: str) -> ProviderInfo:
        provider = self.providers.get(name)
        if provider is None:
            raise NotFound(f"provider not found: {name}")
        h = await self._health(name)
        return ProviderInfo(
            name=name,
            healthy=h.healthy,
            default=name == self.settings.defaults.provider,
            latency_ms=h.latency_ms,
            last_checked=utcnow(),
            capabilities=list(provider.capabilities),
            error=h.error,
            sandbox_count=len(self.store.active_sandboxes(provider=name)),
            config=provider.describe(),
        )

    async def providers_info(self) -> list[ProviderInfo]:
        return [await self.provider_info(n) for n in sorted(self.providers)]

    async def test_providers(self) -> dict[str, bool]:
        return {n: (await self._health(n)).healthy for n in sorted(self.providers)}
