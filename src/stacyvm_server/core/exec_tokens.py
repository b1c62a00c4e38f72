"""Short-lived tokens that let a browser open one sandbox's exec WebSocket.

Browsers cannot set headers on a WebSocket, so a client with an API key mints
a token (POST /sandboxes/{id}/exec/token) and hands it to the page. The token
names one sandbox and the caller it was minted for (role, tenant, owner), and
expires after `TTL`. It is an HMAC-SHA256 over that payload with the server's
secret (the preview key file: 0600 in the data dir, made once); the "exec-ws"
domain prefix keeps preview tokens and exec tokens from standing in for each other.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from pathlib import Path

from stacyvm_server.core.models import Caller
from stacyvm_server.core.previews import KEY_FILE, load_key
from stacyvm_server.errors import Forbidden, Unauthorized

TTL = 60.0  # seconds
_DOMAIN = b"exec-ws:v1:"


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class ExecTokens:
    def __init__(self, data_dir: Path) -> None:
        self._key = load_key(data_dir / KEY_FILE)

    def _mac(self, payload: bytes) -> str:
        return _b64(hmac.new(self._key, _DOMAIN + payload, hashlib.sha256).digest())

    def issue(self, caller: Caller, sandbox_id: str, ttl: float = TTL) -> tuple[str, float]:
        """(token, expiry as a unix time)."""
        exp = time.time() + ttl
        payload = json.dumps(
            {"sid": sandbox_id, "role": caller.role, "tenant": caller.tenant_id, "owner": caller.owner_id,
             "key": caller.key_name, "exp": int(exp)},
            separators=(",", ":"), sort_keys=True,
        ).encode()
        return f"{_b64(payload)}.{self._mac(payload)}", exp

    def check(self, token: str, sandbox_id: str) -> Caller:
        """The caller the token was minted for; Unauthorized if bad or expired, Forbidden for another sandbox."""
        head, _, mac = token.partition(".")
        try:
            payload = _unb64(head)
        except ValueError:
            raise Unauthorized("malformed exec token") from None
        if not mac or not hmac.compare_digest(mac, self._mac(payload)):
            raise Unauthorized("invalid exec token")
        data = json.loads(payload)
        if int(data["exp"]) <= time.time():
            raise Unauthorized("exec token expired: mint a new one (they last 60 s)")
        if data["sid"] != sandbox_id:
            raise Forbidden("this exec token is for another sandbox")
        return Caller(role=data["role"], tenant_id=data["tenant"], owner_id=data["owner"], key_name=data["key"])
