"""The preview reverse proxy: plain ASGI, outermost, so nothing buffers and no API key applies.

Two address forms reach port P of sandbox sb_x (docs/preview.md):
  host  `P-sb-x.<preview_domain>` (or `P-sb_x...`) on the API port, any path
  path  `/preview/sb_x/P/...` on the API host (absolute links in the app break)

HTTP is spoken to the sandbox with h11 over a connection from `Provider.connect`:
one upstream connection per request, bodies streamed both ways chunk by chunk
(the ASGI server's flow control gives the backpressure), so memory stays constant
for any body size, SSE and long polls pass unbuffered, and the API's body limit
does not apply. WebSockets are accepted from the client, upgraded upstream with
the `websockets` sans-I/O client protocol, and pumped message by message.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from dataclasses import dataclass
from http.cookies import SimpleCookie
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlencode

import h11
from starlette.types import ASGIApp, Receive, Scope, Send
from websockets.client import ClientProtocol
from websockets.frames import Close, Opcode
from websockets.http11 import Response as WsResponse
from websockets.uri import parse_uri

from stacyvm_server.core.previews import check_port
from stacyvm_server.errors import BadGateway, StacyError, Unavailable
from stacyvm_server.http.middleware import send_json_error

if TYPE_CHECKING:
    from stacyvm_server.core.server import Core

log = logging.getLogger("stacyvm.preview")

TOKEN_HEADER = b"x-preview-token"
TOKEN_QUERY = "stacyvm_preview_token"
HOST_COOKIE = "stacyvm_preview"
_CHUNK = 64 * 1024
_WS_MAX_MESSAGE = 16 * 1024 * 1024
# Hop-by-hop headers (RFC 9110 7.6.1) and ours: never forwarded either way.
_HOP = {b"connection", b"keep-alive", b"proxy-connection", b"proxy-authenticate", b"proxy-authorization",
        b"te", b"trailer", b"transfer-encoding", b"upgrade"}
_DROP_UP = _HOP | {b"host", TOKEN_HEADER, b"expect", b"content-length", b"x-forwarded-proto", b"x-forwarded-host"}
_DROP_WS = _DROP_UP | {b"sec-websocket-key", b"sec-websocket-version", b"sec-websocket-extensions",
                       b"sec-websocket-protocol"}


class _ClientGone(Exception):
    pass


@dataclass(frozen=True)
class Target:
    sandbox_id: str  # as written in the address (`-` or `_`)
    port: int
    path: bytes  # upstream request target: path and query (token removed)
    query: str
    prefix: str = ""  # path form: "/preview/<id>/<port>"

    @property
    def cookie_name(self) -> str:
        if not self.prefix:
            return HOST_COOKIE
        return f"{HOST_COOKIE}_{self.sandbox_id.replace('-', '_')}_{self.port}"


def _header(scope: Scope, name: bytes) -> str | None:
    for k, v in scope["headers"]:
        if k == name:
            return str(v.decode("latin-1"))
    return None


class PreviewProxy:
    def __init__(self, app: ASGIApp, core: Core) -> None:
        self.app = app
        self.core = core
        self.config = core.settings.preview
        domain = re.escape(core.settings.server.preview_domain.lower())
        self._host_re = re.compile(rf"^(\d{{1,5}})-([a-z0-9][a-z0-9_-]*)\.{domain}(?::\d+)?$")

    # routing ---------------------------------------------------------------------------
    def _match(self, scope: Scope) -> Target | None:
        raw = scope.get("raw_path") or scope["path"].encode()
        raw = raw.split(b"?", 1)[0]
        query = scope.get("query_string", b"").decode("latin-1")
        host = (_header(scope, b"host") or "").lower()
        m = self._host_re.match(host)
        if m:
            return Target(m.group(2), int(m.group(1)), raw, query)
        if raw.startswith(b"/preview/"):
            parts = raw.split(b"/", 4)  # "", "preview", id, port, rest
            if len(parts) >= 4 and parts[3].isdigit():
                rest = b"/" + (parts[4] if len(parts) == 5 else b"")
                prefix = b"/".join(parts[:4]).decode("latin-1")
                return Target(parts[2].decode("latin-1"), int(parts[3]), rest, query, prefix)
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or not self.config.enabled:
            await self.app(scope, receive, send)
            return
        target = self._match(scope)
        if target is None:
            await self.app(scope, receive, send)
            return
        try:
            await self._serve(scope, receive, send, target)
        except StacyError as exc:
            await self._deny(scope, receive, send, exc.status, exc.code, exc.message)

    async def _deny(self, scope: Scope, receive: Receive, send: Send, status: int, code: str, message: str) -> None:
        if scope["type"] == "http":
            await send_json_error(send, status, code, message)
            return
        if "websocket.http.response" in scope.get("extensions", {}):
            await send_json_error(_WsDenial(send), status, code, message)
        else:
            await send({"type": "websocket.close", "code": 1008, "reason": message[:120]})

    # access ------------------------------------------------------------------------------
    def _token(self, scope: Scope, target: Target) -> tuple[str | None, str | None, str]:
        """(token, token from the query or None, query without our parameter)."""
        pairs = parse_qsl(target.query, keep_blank_values=True)
        from_query = next((v for k, v in pairs if k == TOKEN_QUERY), None)
        rest = urlencode([(k, v) for k, v in pairs if k != TOKEN_QUERY]) if from_query is not None else target.query
        if from_query:
            return from_query, from_query, rest
        token = _header(scope, TOKEN_HEADER)
        if not token:
            cookie = _header(scope, b"cookie")
            if cookie:
                jar: SimpleCookie = SimpleCookie()
                with contextlib.suppress(Exception):
                    jar.load(cookie)
                morsel = jar.get(target.cookie_name)
                token = morsel.value if morsel is not None else None
        return token, None, rest

    async def _serve(self, scope: Scope, receive: Receive, send: Send, target: Target) -> None:
        port = check_port(target.port)
        token, from_query, query = self._token(scope, target)
        sb = await self.core.previews.authorize(target.sandbox_id, port, token)
        if sb.handle is None or sb.state != "running":
            raise Unavailable(f"sandbox {sb.id} is {sb.state}, not running")
        if scope["type"] == "http":
            if target.prefix and target.path == b"/" and not scope["path"].endswith("/"):
                await self._redirect(send, target.prefix + "/" + (f"?{query}" if query else ""), None, target)
                return
            if from_query and scope["method"] in ("GET", "HEAD"):
                # Exchange the URL token for a cookie on this host, and drop it from the URL.
                location = (target.prefix or "") + target.path.decode("latin-1") + (f"?{query}" if query else "")
                await self._redirect(send, location, from_query, target)
                return
        upstream_target = target.path + (b"?" + query.encode("latin-1") if query else b"")
        provider = self.core.sandboxes.provider(sb.provider)
        reader, writer = await provider.connect(sb.handle, port)
        try:
            if scope["type"] == "http":
                await _HttpExchange(self, scope, receive, send, target, reader, writer).run(upstream_target)
            else:
                await _WsBridge(self, scope, receive, send, target, reader, writer).run(upstream_target)
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _redirect(self, send: Send, location: str, token: str | None, target: Target) -> None:
        headers = [(b"location", location.encode("latin-1")), (b"content-length", b"0"),
                   (b"cache-control", b"no-store")]
        if token is not None:
            exp = token.split(".")[2] if token.count(".") == 3 else "0"
            max_age = max(0, int(exp) - int(time.time())) if exp.isdigit() else 0
            cookie = (f"{target.cookie_name}={token}; Path={target.prefix or '/'}; Max-Age={max_age}; "
                      "HttpOnly; SameSite=Lax")
            headers.append((b"set-cookie", cookie.encode("latin-1")))
        await send({"type": "http.response.start", "status": 302, "headers": headers})
        await send({"type": "http.response.body", "body": b""})

    # upstream request headers ----------------------------------------------------------
    def upstream_headers(self, scope: Scope, target: Target, drop: set[bytes]) -> list[tuple[bytes, bytes]]:
        named = {n.strip().lower().encode() for n in (_header(scope, b"connection") or "").split(",") if n.strip()}
        out: list[tuple[bytes, bytes]] = []
        original_host = _header(scope, b"host") or ""
        if self.config.host_header == "original" and original_host:
            out.append((b"host", original_host.encode("latin-1")))
        else:
            out.append((b"host", f"localhost:{target.port}".encode()))
        forwarded_for = None
        for k, v in scope["headers"]:
            if k in drop or k in named:
                continue
            if k == b"cookie":
                v = _strip_cookie(v, target.cookie_name)
                if not v:
                    continue
            if k == b"x-forwarded-for":
                forwarded_for = v
                continue
            out.append((k, v))
        client = scope.get("client")
        if client:
            addr = str(client[0]).encode()
            out.append((b"x-forwarded-for", forwarded_for + b", " + addr if forwarded_for else addr))
        out.append((b"x-forwarded-proto", ("https" if scope.get("scheme") in ("https", "wss") else "http").encode()))
        if original_host:
            out.append((b"x-forwarded-host", original_host.encode("latin-1")))
        if target.prefix:
            out.append((b"x-forwarded-prefix", target.prefix.encode("latin-1")))
        return out


def _strip_cookie(value: bytes, name: str) -> bytes:
    parts = [p for p in value.split(b";") if p.strip().split(b"=", 1)[0] != name.encode()]
    return b";".join(parts).strip()


class _WsDenial:
    """Send an HTTP error answer to a WebSocket handshake (ASGI websocket.http.response)."""

    def __init__(self, send: Send) -> None:
        self.send = send

    async def __call__(self, message: Any) -> None:
        kind = message["type"].replace("http.response", "websocket.http.response")
        await self.send({**message, "type": kind})


class _HttpExchange:
    def __init__(self, proxy: PreviewProxy, scope: Scope, receive: Receive, send: Send, target: Target,
                 reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.proxy, self.scope, self.receive, self.send, self.target = proxy, scope, receive, send, target
        self.reader, self.writer = reader, writer
        self.conn = h11.Connection(h11.CLIENT)
        self.started = False

    async def run(self, upstream_target: bytes) -> None:
        headers = self.proxy.upstream_headers(self.scope, self.target, _DROP_UP)
        length = _header(self.scope, b"content-length")
        if length is not None:
            headers.append((b"content-length", length.encode()))
        elif "chunked" in (_header(self.scope, b"transfer-encoding") or "").lower():
            headers.append((b"transfer-encoding", b"chunked"))
        headers.append((b"connection", b"close"))
        self.writer.write(self.conn.send(h11.Request(method=self.scope["method"], target=upstream_target,
                                                     headers=headers)) or b"")
        pump = asyncio.create_task(self._pump_request())
        answer = asyncio.create_task(self._pump_response())
        try:
            done, _ = await asyncio.wait({pump, answer}, return_when=asyncio.FIRST_COMPLETED)
            if answer in done:
                answer.result()
            else:
                exc = pump.exception()
                if exc is not None and not isinstance(exc, _ClientGone):
                    raise exc
        finally:
            for t in (pump, answer):
                t.cancel()
            for t in (pump, answer):
                with contextlib.suppress(BaseException):
                    await t

    async def _pump_request(self) -> None:
        while True:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                raise _ClientGone
            body = message.get("body", b"")
            if body and self.conn.our_state is h11.SEND_BODY:
                self.writer.write(self.conn.send(h11.Data(data=body)) or b"")
                await self.writer.drain()
            if not message.get("more_body", False):
                break
        if self.conn.our_state is h11.SEND_BODY:
            self.writer.write(self.conn.send(h11.EndOfMessage()) or b"")
            await self.writer.drain()
        while (await self.receive())["type"] != "http.disconnect":
            pass
        raise _ClientGone  # the client left: the response task is cancelled with us

    async def _pump_response(self) -> None:
        try:
            while True:
                event = self.conn.next_event()
                if event is h11.NEED_DATA:
                    data = await self.reader.read(_CHUNK)
                    self.conn.receive_data(data)
                    continue
                if isinstance(event, h11.InformationalResponse):
                    continue
                if isinstance(event, h11.Response):
                    headers = [(k, v) for k, v in event.headers if k not in _HOP]
                    await self.send({"type": "http.response.start", "status": event.status_code,
                                     "headers": headers})
                    self.started = True
                elif isinstance(event, h11.Data):
                    await self.send({"type": "http.response.body", "body": bytes(event.data), "more_body": True})
                elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                    await self.send({"type": "http.response.body", "body": b""})
                    return
        except (h11.RemoteProtocolError, ConnectionError) as exc:
            if self.started:
                raise  # half sent: the ASGI server drops the connection
            raise BadGateway(f"the server on port {self.target.port} in the sandbox sent a bad answer: {exc}") from None


class _WsBridge:
    def __init__(self, proxy: PreviewProxy, scope: Scope, receive: Receive, send: Send, target: Target,
                 reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.proxy, self.scope, self.receive, self.send, self.target = proxy, scope, receive, send, target
        self.reader, self.writer = reader, writer

    def _flush(self, proto: ClientProtocol) -> None:
        for data in proto.data_to_send():
            if data:
                self.writer.write(data)
            elif self.writer.can_write_eof():
                with contextlib.suppress(OSError):
                    self.writer.write_eof()

    async def run(self, upstream_target: bytes) -> None:
        first = await self.receive()
        if first["type"] != "websocket.connect":
            return
        uri = parse_uri(f"ws://localhost:{self.target.port}{upstream_target.decode('latin-1')}")
        proto = ClientProtocol(uri, subprotocols=list(self.scope.get("subprotocols") or []) or None,
                               max_size=_WS_MAX_MESSAGE)
        request = proto.connect()
        for name in ("Host", "User-Agent"):  # ours replace the library's
            if name in request.headers:
                del request.headers[name]
        for k, v in self.proxy.upstream_headers(self.scope, self.target, _DROP_WS):
            request.headers[k.decode("latin-1")] = v.decode("latin-1")
        proto.send_request(request)
        self._flush(proto)
        await self.writer.drain()
        response: WsResponse | None = None
        pending: list[Any] = []
        while response is None:
            data = await self.reader.read(_CHUNK)
            if data:
                proto.receive_data(data)
            else:
                proto.receive_eof()
            for ev in proto.events_received():
                if isinstance(ev, WsResponse):
                    response = ev
                else:
                    pending.append(ev)
            if not data and response is None:
                break
        if response is None or proto.handshake_exc is not None:
            status = response.status_code if response is not None else 0
            raise BadGateway(f"the server on port {self.target.port} refused the WebSocket upgrade"
                             + (f" (HTTP {status})" if status else ""))
        await self.send({"type": "websocket.accept", "subprotocol": proto.subprotocol})
        up = asyncio.create_task(self._client_to_upstream(proto))
        down = asyncio.create_task(self._upstream_to_client(proto, pending))
        try:
            await asyncio.wait({up, down}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (up, down):
                t.cancel()
            for t in (up, down):
                with contextlib.suppress(BaseException):
                    await t

    async def _client_to_upstream(self, proto: ClientProtocol) -> None:
        while True:
            message = await self.receive()
            if message["type"] == "websocket.receive":
                if message.get("text") is not None:
                    proto.send_text(message["text"].encode())
                else:
                    proto.send_binary(message.get("bytes") or b"")
            elif message["type"] == "websocket.disconnect":
                code = int(message.get("code", 1000))
                with contextlib.suppress(Exception):
                    if code in (1005, 1006, 1015):
                        proto.send_close()
                    else:
                        proto.send_close(code, str(message.get("reason") or ""))
                    self._flush(proto)
                    await self.writer.drain()
                return
            self._flush(proto)
            await self.writer.drain()

    async def _upstream_to_client(self, proto: ClientProtocol, pending: list[Any]) -> None:
        parts: list[bytes] = []
        kind = Opcode.TEXT
        events = pending
        while True:
            for frame in events:
                if frame.opcode in (Opcode.TEXT, Opcode.BINARY):
                    kind, parts = frame.opcode, [bytes(frame.data)]
                elif frame.opcode == Opcode.CONT:
                    parts.append(bytes(frame.data))
                elif frame.opcode == Opcode.CLOSE:
                    close = Close.parse(bytes(frame.data)) if frame.data else None
                    code = close.code if close is not None and close.code not in (1005, 1006) else 1000
                    await self.send({"type": "websocket.close", "code": code,
                                     "reason": close.reason if close is not None else ""})
                    return
                else:
                    continue  # ping/pong: the protocol object answers pings itself
                if frame.fin:
                    data = b"".join(parts)
                    parts = []
                    if kind == Opcode.TEXT:
                        await self.send({"type": "websocket.send", "text": data.decode()})
                    else:
                        await self.send({"type": "websocket.send", "bytes": data})
            self._flush(proto)
            data = await self.reader.read(_CHUNK)
            if not data:
                proto.receive_eof()
                await self.send({"type": "websocket.close", "code": 1001, "reason": "upstream closed"})
                return
            proto.receive_data(data)
            events = proto.events_received()
