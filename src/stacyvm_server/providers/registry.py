"""Which providers this server runs, built from config."""

from __future__ import annotations

from stacyvm_server.config import Settings
from stacyvm_server.images.store import ImageStore
from stacyvm_server.providers.base import Provider


def build_providers(settings: Settings, images: ImageStore) -> dict[str, Provider]:
    providers: dict[str, Provider] = {}
    if settings.native.enabled:
        # Imported here so a server without the native provider never loads it.
        from stacyvm_server.providers.native.provider import NativeProvider

        providers["native"] = NativeProvider(settings, images)
    if settings.docker.enabled:
        from stacyvm_server.providers.docker.provider import DockerProvider

        providers["docker"] = DockerProvider(settings)
    if settings.microvm.enabled:
        from stacyvm_server.providers.microvm.provider import MicroVMProvider

        providers["microvm"] = MicroVMProvider(settings, images)
    return providers
