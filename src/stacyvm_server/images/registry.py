"""Pull images through the registry HTTP API v2 into the blob store.

Bearer-token and Basic auth, manifest lists / OCI indexes resolved to linux/amd64,
every manifest and blob checked against its sha256 digest while it streams to disk.
Mirrors are tried before the registry itself.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import re
from dataclasses import dataclass, field

import httpx

from stacyvm_server.config import ImagesConfig, RegistryConfig
from stacyvm_server.errors import ImageError, ImageNotFound
from stacyvm_server.images.blobs import BlobStore
from stacyvm_server.images.manifest import (
    ACCEPT,
    INDEX_TYPES,
    MANIFEST_TYPES,
    Descriptor,
    Manifest,
    media_type,
    parse_manifest,
    pick_platform,
    sha256_digest,
)
from stacyvm_server.images.reference import DOCKER_HUB, Reference

_HUB_API = "registry-1.docker.io"
_MAX_MANIFEST = 4 << 20  # manifests are small; refuse to buffer anything huge
_PARALLEL_BLOBS = 3
_CHALLENGE_PARAM = re.compile(r'(\w+)="([^"]*)"')


@dataclass
class _Endpoint:
    host: str  # as configured: "127.0.0.1:5000", "docker.io"
    base: str  # "http://127.0.0.1:5000"
    creds: RegistryConfig
    auth: dict[str, str] = field(default_factory=dict)


def is_loopback(host: str) -> bool:
    """Docker's rule: localhost and 127.0.0.0/8 (and ::1) speak plain HTTP by default."""
    name = host[1 : host.find("]")] if host.startswith("[") else host.split(":", 1)[0]
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def registry_words(resp: httpx.Response) -> str:
    """The registry's own explanation of an error response."""
    try:
        errors = resp.json().get("errors") or []
        words = "; ".join(f"{e.get('code', '')}: {e.get('message', '')}".strip(": ") for e in errors)
    except (ValueError, AttributeError):
        words = ""
    return words or f"HTTP {resp.status_code} {resp.reason_phrase}".strip()


class RegistryClient:
    def __init__(self, config: ImagesConfig, blobs: BlobStore, *, timeout: float = 60.0) -> None:
        self.config = config
        self.blobs = blobs
        self.timeout = timeout
        self.blob_fetches = 0  # blobs actually downloaded (shared layers are fetched once)
        self._blob_locks: dict[str, asyncio.Lock] = {}

    def endpoints(self, registry: str) -> list[_Endpoint]:
        cfg = self.config.registries.get(registry, RegistryConfig())
        out = []
        for host in [*cfg.mirrors, registry]:
            # A mirror has its own settings (and credentials), if it is configured at all.
            own = self.config.registries.get(host, RegistryConfig())
            insecure = own.insecure or is_loopback(host)
            api_host = _HUB_API if host == DOCKER_HUB else host
            out.append(_Endpoint(host, f"{'http' if insecure else 'https'}://{api_host}", own))
        return out

    async def pull(self, ref: Reference) -> Manifest:
        """Resolve ref to a linux/amd64 manifest and make sure all its blobs are cached."""
        async with httpx.AsyncClient(timeout=self.timeout, follow_redirects=True) as client:
            endpoints = self.endpoints(ref.registry)
            for i, ep in enumerate(endpoints):
                try:
                    manifest = await self._manifest(client, ep, ref)
                    await self._fetch_blobs(client, ep, ref, [manifest.config, *manifest.layers])
                    return manifest
                except ImageError:
                    if i == len(endpoints) - 1:
                        raise
                    # A mirror failing is not fatal: fall through to the next one.
        raise AssertionError("unreachable: the registry itself is always the last endpoint")

    async def _manifest(self, client: httpx.AsyncClient, ep: _Endpoint, ref: Reference) -> Manifest:
        raw, mt = await self._get_manifest(client, ep, ref, ref.selector)
        digest = sha256_digest(raw)
        if ref.digest and digest != ref.digest:
            raise ImageError(f"{ep.host}: manifest digest mismatch: asked {ref.digest}, got {digest}")
        if mt in INDEX_TYPES:
            desc = pick_platform(raw)
            raw, mt = await self._get_manifest(client, ep, ref, desc.digest)
            digest = sha256_digest(raw)
            if digest != desc.digest:
                raise ImageError(f"{ep.host}: manifest digest mismatch: asked {desc.digest}, got {digest}")
        if mt not in MANIFEST_TYPES:
            raise ImageError(f"{ep.host}: unsupported manifest media type {mt!r}")
        self.blobs.put_bytes(raw, digest)
        return parse_manifest(raw, digest)

    async def _get_manifest(
        self, client: httpx.AsyncClient, ep: _Endpoint, ref: Reference, selector: str
    ) -> tuple[bytes, str]:
        url = f"{ep.base}/v2/{ref.repository}/manifests/{selector}"
        resp = await self._send(client, ep, ref, url, {"Accept": ACCEPT})
        try:
            if resp.status_code == 404:
                await resp.aread()
                raise ImageNotFound(f"{ref}: not found on {ep.host} ({registry_words(resp)})")
            await self._raise_for_status(resp, ep, ref)
            raw = b""
            async for chunk in resp.aiter_bytes():
                raw += chunk
                if len(raw) > _MAX_MANIFEST:
                    raise ImageError(f"{ep.host}: manifest for {ref} is larger than {_MAX_MANIFEST} bytes")
        finally:
            await resp.aclose()
        return raw, media_type(raw, resp.headers.get("content-type"))

    async def _fetch_blobs(
        self, client: httpx.AsyncClient, ep: _Endpoint, ref: Reference, descs: list[Descriptor]
    ) -> None:
        sem = asyncio.Semaphore(_PARALLEL_BLOBS)

        async def one(desc: Descriptor) -> None:
            lock = self._blob_locks.setdefault(desc.digest, asyncio.Lock())
            async with sem, lock:
                if not self.blobs.has(desc.digest):
                    await self._fetch_blob(client, ep, ref, desc)

        try:
            async with asyncio.TaskGroup() as tg:
                for desc in descs:
                    tg.create_task(one(desc))
        except ExceptionGroup as group:
            # Callers expect one ImageError (the first failing blob), not a group.
            first = group.exceptions[0]
            while isinstance(first, ExceptionGroup):
                first = first.exceptions[0]
            raise first from None

    async def _fetch_blob(
        self, client: httpx.AsyncClient, ep: _Endpoint, ref: Reference, desc: Descriptor
    ) -> None:
        url = f"{ep.base}/v2/{ref.repository}/blobs/{desc.digest}"
        resp = await self._send(client, ep, ref, url, {})
        try:
            if resp.status_code == 404:
                await resp.aread()
                raise ImageError(f"{ep.host}: blob {desc.digest} of {ref} is missing ({registry_words(resp)})")
            await self._raise_for_status(resp, ep, ref)
            self.blob_fetches += 1
            writer = self.blobs.writer(desc.digest, desc.size)
            try:
                async for chunk in resp.aiter_bytes(1 << 20):
                    writer.write(chunk)
            except BaseException:
                writer.abort()
                raise
            try:
                writer.commit()
            except ImageError as exc:
                raise ImageError(f"{ep.host}: {ref}: {exc}") from None
        except httpx.HTTPError as exc:
            raise ImageError(f"{ep.host}: download of {desc.digest} failed: {exc}") from None
        finally:
            await resp.aclose()

    async def _send(
        self, client: httpx.AsyncClient, ep: _Endpoint, ref: Reference, url: str, headers: dict[str, str]
    ) -> httpx.Response:
        """GET (streamed), answering one auth challenge if the registry sends one."""
        for attempt in range(2):
            try:
                req = client.build_request("GET", url, headers={**headers, **ep.auth})
                resp = await client.send(req, stream=True)
            except httpx.HTTPError as exc:
                raise ImageError(f"{ep.host}: cannot reach registry: {exc}") from None
            if resp.status_code != 401 or attempt == 1:
                return resp
            challenge = resp.headers.get("www-authenticate", "")
            await resp.aread()
            await resp.aclose()
            if not challenge:
                raise ImageError(f"{ep.host}: authentication required ({registry_words(resp)})")
            await self._authenticate(client, ep, ref, challenge)
        raise AssertionError("unreachable")

    async def _authenticate(
        self, client: httpx.AsyncClient, ep: _Endpoint, ref: Reference, challenge: str
    ) -> None:
        scheme, _, params_text = challenge.partition(" ")
        params = dict(_CHALLENGE_PARAM.findall(params_text))
        creds = (ep.creds.username, ep.creds.password or "") if ep.creds.username else None
        if scheme.lower() == "basic":
            if creds is None:
                raise ImageError(f"{ep.host}: registry requires a username and password (none configured)")
            basic = base64.b64encode(f"{creds[0]}:{creds[1]}".encode()).decode()
            ep.auth = {"Authorization": f"Basic {basic}"}
            return
        if scheme.lower() != "bearer" or "realm" not in params:
            raise ImageError(f"{ep.host}: unsupported auth challenge {challenge!r}")
        query = {"service": params.get("service", ""), "scope": f"repository:{ref.repository}:pull"}
        try:
            resp = await client.get(params["realm"], params=query, auth=creds)
        except httpx.HTTPError as exc:
            raise ImageError(f"{ep.host}: token server {params['realm']} unreachable: {exc}") from None
        if resp.status_code != 200:
            raise ImageError(f"{ep.host}: token request refused: {registry_words(resp)}")
        token: str | None
        try:
            body = resp.json()
            token = body.get("token") or body.get("access_token")
        except (ValueError, AttributeError):
            token = None
        if not token:
            raise ImageError(f"{ep.host}: token server answered without a token")
        ep.auth = {"Authorization": f"Bearer {token}"}

    @staticmethod
    async def _raise_for_status(resp: httpx.Response, ep: _Endpoint, ref: Reference) -> None:
        if resp.status_code == 200:
            return
        await resp.aread()
        if resp.status_code in (401, 403):
            raise ImageError(f"{ep.host}: access to {ref} refused: {registry_words(resp)}")
        raise ImageError(f"{ep.host}: {ref}: {registry_words(resp)}")
