"""Preview access: signed tokens scoped to (sandbox, port), and public ports.

Tokens are stateless HMAC-SHA256 signatures, not store rows:

    <sandbox_id>.<port>.<expires unix seconds>.<base64url signature>

The key is 32 random bytes in `<data_dir>/preview.key` (0600), made on first use.
Why not the store: checking a token then costs one HMAC and no database read on
every proxied request (a page load is dozens of requests), tokens survive a
restart, and no migration is needed. Revocation is coarse but real: a token dies
with its expiry or its sandbox, and deleting the key file revokes every token.

Public ports and the list of issued previews (without tokens) are kept in
`<data_dir>/previews.json`, written atomically, and dropped with the sandbox.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import os
import secrets
import threading
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from stacyvm_server.config import PreviewConfig
from stacyvm_server.core.models import Caller, Sandbox, State, utcnow
from stacyvm_server.core.sandboxes import SandboxService
from stacyvm_server.errors import BadRequest, Forbidden, Unauthorized
from stacyvm_server.ids import normalize_sandbox_id

KEY_FILE = "preview.key"
# The proxy looks sandboxes up unscoped: the preview token, not an API key, is the credential.
_PROXY = Caller(role="viewer", key_name="preview-proxy")
STATE_FILE = "previews.json"


@dataclass(frozen=True)
class Preview:
    sandbox_id: str
    port: int
    url: str
    public: bool
    token: str | None = None  # only when just issued
    expires_at: datetime | None = None  # of the token; None for a public port without one


def check_port(port: object) -> int:
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise BadRequest("port: must be an integer between 1 and 65535")
    return port


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def load_key(path: Path) -> bytes:
    """The per-server secret: created once with mode 0600, never logged or served."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    except FileExistsError:
        key = path.read_bytes()
        if len(key) < 32:
            raise ValueError(f"{path}: preview key is too short; delete it to make a new one") from None
        return key
    key = secrets.token_bytes(32)
    with os.fdopen(fd, "wb") as f:
        f.write(key)
    return key


class PreviewService:
    def __init__(self, config: PreviewConfig, preview_domain: str, data_dir: Path,
                 sandboxes: SandboxService) -> None:
        self.config = config
        self.domain = preview_domain
        self.sandboxes = sandboxes
        self._key = load_key(data_dir / KEY_FILE)
        self._state_path = data_dir / STATE_FILE
        self._lock = threading.Lock()
        # sandbox id -> port -> {"public": bool, "expires_at": iso or None}
        self._state: dict[str, dict[int, dict[str, object]]] = self._read_state()

    # persistence ---------------------------------------------------------------------
    def _read_state(self) -> dict[str, dict[int, dict[str, object]]]:
        try:
            raw = json.loads(self._state_path.read_text())
        except (OSError, ValueError):
            return {}
        return {str(sid): {int(p): dict(v) for p, v in ports.items()} for sid, ports in raw.items()}

    def _write_state(self) -> None:
        tmp = self._state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({sid: {str(p): v for p, v in ports.items()} for sid, ports in self._state.items()}))
        os.replace(tmp, self._state_path)

    def _prune(self) -> None:
        """Forget sandboxes that are gone (called on writes; cheap)."""
        for sid in list(self._state):
            sb = self.sandboxes.store.get_sandbox(sid)
            if sb is None or sb.state == State.DESTROYED:
                del self._state[sid]

    # tokens ----------------------------------------------------------------------------
    def _sign(self, sid: str, port: int, exp: int) -> str:
        mac = hmac.new(self._key, f"v1:{sid}:{port}:{exp}".encode(), hashlib.sha256).digest()
        return _b64(mac)

    def issue_token(self, sid: str, port: int, ttl: timedelta) -> tuple[str, datetime]:
        exp = int((utcnow() + ttl).timestamp())
        return f"{sid}.{port}.{exp}.{self._sign(sid, port, exp)}", datetime.fromtimestamp(exp, UTC)

    def check_token(self, token: str, sid: str, port: int) -> None:
        """Raise Unauthorized (bad or expired) or Forbidden (valid, but for another scope)."""
        parts = token.split(".")
        if len(parts) != 4 or not parts[1].isdigit() or not parts[2].isdigit():
            raise Unauthorized("malformed preview token")
        tsid, tport, texp, sig = parts[0], int(parts[1]), int(parts[2]), parts[3]
        if not hmac.compare_digest(sig, self._sign(tsid, tport, texp)):
            raise Unauthorized("invalid preview token")
        if texp <= int(utcnow().timestamp()):
            raise Unauthorized("preview token expired: ask the sandbox owner for a new one")
        if tsid != sid:
            raise Forbidden(f"this preview token is for another sandbox, not {sid}")
        if tport != port:
            raise Forbidden(f"this preview token is for port {tport}, not port {port}")

    # API -------------------------------------------------------------------------------
    def url(self, sid: str, port: int, base_port: int | None = None) -> str:
        host = f"{port}-{sid.replace('_', '-')}.{self.domain}"
        if self.config.public_url:
            return self.config.public_url.replace("{host}", host).rstrip("/") + "/"
        suffix = f":{base_port}" if base_port else ""
        return f"http://{host}{suffix}/"

    async def create(self, caller: Caller, sandbox_id: str, port: int, ttl: str | None = None,
                     public: bool | None = None, base_port: int | None = None) -> Preview:
        if not caller.can_write():
            raise Forbidden("this API key may only read")
        sb = await self.sandboxes.get(caller, sandbox_id)
        check_port(port)
        span = self.sandboxes.limits.parse_duration(ttl or self.config.token_ttl, "ttl")
        if span <= timedelta(0):
            raise BadRequest("ttl: must be positive")
        max_span = self.sandboxes.limits.parse_duration(self.config.max_token_ttl, "max_token_ttl")
        if span > max_span:
            raise BadRequest(f"ttl: at most {self.config.max_token_ttl}")
        token, expires = self.issue_token(sb.id, port, span)
        with self._lock:
            self._prune()
            entry = self._state.setdefault(sb.id, {}).setdefault(port, {"public": False})
            if public is not None:
                entry["public"] = bool(public)
            entry["expires_at"] = expires.isoformat()
            is_public = bool(entry["public"])
            self._write_state()
        return Preview(sb.id, port, self.url(sb.id, port, base_port), is_public, token, expires)

    async def set_public(self, caller: Caller, sandbox_id: str, port: int, public: bool) -> None:
        if not caller.can_write():
            raise Forbidden("this API key may only read")
        sb = await self.sandboxes.get(caller, sandbox_id)
        check_port(port)
        with self._lock:
            self._prune()
            self._state.setdefault(sb.id, {}).setdefault(port, {"public": False})["public"] = public
            self._write_state()

    async def list(self, caller: Caller, sandbox_id: str, base_port: int | None = None) -> list[Preview]:
        sb = await self.sandboxes.get(caller, sandbox_id)
        out = []
        for port, entry in sorted(self._state.get(sb.id, {}).items()):
            exp = entry.get("expires_at")
            out.append(Preview(sb.id, port, self.url(sb.id, port, base_port), bool(entry.get("public")),
                               None, datetime.fromisoformat(str(exp)) if exp else None))
        return out

    def is_public(self, sid: str, port: int) -> bool:
        return bool(self._state.get(sid, {}).get(port, {}).get("public"))

    async def authorize(self, raw_id: str, port: int, token: str | None) -> Sandbox:
        """The proxy's check. 404 unknown or ended sandbox; 401/403 for tokens; API keys do not apply."""
        check_port(port)
        sid = normalize_sandbox_id(raw_id)
        sb = await self.sandboxes.get(_PROXY, sid)  # NotFound for unknown and destroyed
        if self.is_public(sid, port):
            return sb
        if not token:
            raise Unauthorized(
                f"preview of port {port} in sandbox {sid} is private: send a token as the X-Preview-Token header "
                "or the stacyvm_preview_token query parameter (POST /api/v1/sandboxes/{id}/previews makes one)"
            )
        self.check_token(token, sid, port)
        return sb

    def forget(self, sid: str) -> None:
        with self._lock, contextlib.suppress(OSError):
            if self._state.pop(sid, None) is not None:
                self._write_state()
