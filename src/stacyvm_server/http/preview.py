"""The preview reverse proxy: plain ASGI, outermost, so nothing buffers and no API key applies.

Two address forms reach port P of sandbox sb_x (docs/preview.md):
  host  `P-sb-x.<preview_domain>` (or `P-sb_x...`) on the API port, any path
  path  `/preview/sb_x/P/...` on the API host (absolute links in the app break)

HTTP is spoken to the sandbox with h11 over connections from `Provider.connect`,
kept alive and reused per (sandbox, port) (UpstreamPool), bodies streamed both ways
chunk by chunk (the ASGI server's flow control gives the backpressure), so memory
stays constant for any body size, SSE and long polls pass unbuffered, and the API's
body limit does not apply. WebSockets are accepted from the client, upgraded
upstream with the `websockets` sans-I/O client protocol, and pumped message by message.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Awaitable, Callable, Coroutine
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
# Requests that may go over a reused upstream connection, and be sent again on a new one when the
# reused one turns out closed by the app before any answer: idempotent (RFC 9110 9.2.2) and bodyless.
_REUSABLE_METHODS = {"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"}
# Idle upstream connections: how many per (sandbox, port), and for how long. Below the usual
# keep-alive timeouts of dev servers (Node and uvicorn 5 s), so the app rarely closes one first.
POOL_MAX_IDLE = 16
POOL_IDLE_SECONDS = 4.0
_POOL_SWEEP_SECONDS = 1.0


class _ClientGone(Exception):
    pass


class _Stale(Exception):
    """A reused upstream connection ended before any byte of the answer: send again on a new one."""


class _Upstream:
    """One keep-alive connection to a port in a sandbox."""

    __slots__ = ("idle_since", "reader", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.idle_since = 0.0

    def usable(self) -> bool:
        """Not closed by either side, and nothing unasked-for waiting to be read."""
        return not (self.writer.is_closing() or self.reader.at_eof() or self.reader.exception() is not None
                    or getattr(self.reader, "_buffer", None))

    def close(self) -> None:
        self.writer.close()


PoolKey = tuple[str, str, int]  # (provider, sandbox id, port)


class UpstreamPool:
    """Idle upstream connections, reused for later requests to the same (provider, sandbox, port).

    A connection is only ever reused for the sandbox and port it was opened to; every request is
    authorized (token, port, sandbox state) before it may take one. A sweep every second closes
    connections idle for POOL_IDLE_SECONDS or closed by the app (when a sandbox is destroyed its
    processes die and their ends close), so no socket keeps a destroyed sandbox's netns alive
    for more than about a second.
    """

    def __init__(self, max_idle: int = POOL_MAX_IDLE, idle_seconds: float = POOL_IDLE_SECONDS) -> None:
        self.max_idle = max_idle
        self.idle_seconds = idle_seconds
        self._idle: dict[PoolKey, list[_Upstream]] = {}
        self._sweeper: asyncio.TimerHandle | None = None

    def __len__(self) -> int:
        return sum(len(v) for v in self._idle.values())

    def take(self, key: PoolKey) -> _Upstream | None:
        conns = self._idle.get(key)
        now = time.monotonic()
        while conns:
            up = conns.pop()  # the most recently used: the least likely to have timed out
            if now - up.idle_since < self.idle_seconds and up.usable():
                return up
            up.close()
        self._idle.pop(key, None)
        return None

    def give(self, key: PoolKey, up: _Upstream) -> None:
        conns = self._idle.setdefault(key, [])
        if len(conns) >= self.max_idle or not up.usable():
            up.close()
            return
        up.idle_since = time.monotonic()
        conns.append(up)
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().call_later(_POOL_SWEEP_SECONDS, self._sweep)

    def _sweep(self) -> None:
        self._sweeper = None
        now = time.monotonic()
        for key, conns in list(self._idle.items()):
            keep = []
            for up in conns:
                if now - up.idle_since < self.idle_seconds and up.usable():
                    keep.append(up)
                else:
                    up.close()
            if keep:
                self._idle[key] = keep
            else:
                del self._idle[key]
        if self._idle:
            self._sweeper = asyncio.get_running_loop().call_later(_POOL_SWEEP_SECONDS, self._sweep)

    def drop(self, sandbox_id: str) -> None:
        """Close every idle connection to this sandbox."""
        for key in [k for k in self._idle if k[1] == sandbox_id]:
            for up in self._idle.pop(key):
                up.close()


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
        self.pool = UpstreamPool()

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
            self.pool.drop(sb.id)
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
        handle = sb.handle

        async def connect() -> _Upstream:
            return _Upstream(*await provider.connect(handle, port))

        if scope["type"] == "http":
            key = (sb.provider, sb.id, port)
            await _HttpExchange(self, scope, receive, send, target, key, connect).run(upstream_target)
            return
        reader, writer = await provider.connect(handle, port)
        try:
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
    """One proxied HTTP request and its answer, over a pooled or a new upstream connection."""

    def __init__(self, proxy: PreviewProxy, scope: Scope, receive: Receive, send: Send, target: Target,
                 key: PoolKey, connect: Callable[[], Awaitable[_Upstream]]) -> None:
        self.proxy, self.scope, self.receive, self.send, self.target = proxy, scope, receive, send, target
        self.key, self.connect = key, connect
        self.started = False

    async def run(self, upstream_target: bytes) -> None:
        scope = self.scope
        headers = self.proxy.upstream_headers(scope, self.target, _DROP_UP)
        length = _header(scope, b"content-length")
        chunked = "chunked" in (_header(scope, b"transfer-encoding") or "").lower()
        if length is not None:
            headers.append((b"content-length", length.encode()))
        elif chunked:
            headers.append((b"transfer-encoding", b"chunked"))
        request = h11.Request(method=scope["method"], target=upstream_target, headers=headers)
        bodyless = not chunked and (length is None or length.strip() == "0")
        if not bodyless:
            # The body streams from the client as it comes, so it cannot be sent twice: a new connection.
            up = await self.connect()
            conn = h11.Connection(h11.CLIENT)
            up.writer.write(conn.send(request) or b"")
            await self._exchange(self._pump_request(conn, up.writer), conn, up, reused=False)
            return
        up_or_none = self.proxy.pool.take(self.key) if scope["method"] in _REUSABLE_METHODS else None
        watch = asyncio.create_task(self._watch_client())
        try:
            while True:
                reused = up_or_none is not None
                up = up_or_none if up_or_none is not None else await self.connect()
                conn = h11.Connection(h11.CLIENT)
                up.writer.write((conn.send(request) or b"") + (conn.send(h11.EndOfMessage()) or b""))
                try:
                    await self._exchange(watch, conn, up, reused)
                    return
                except _Stale:
                    up_or_none = None  # the app had closed it: once more on a new connection
        finally:
            watch.cancel()
            with contextlib.suppress(BaseException):
                await watch

    async def _exchange(self, client: Coroutine[Any, Any, None] | asyncio.Task[None], conn: h11.Connection,
                        up: _Upstream, reused: bool) -> None:
        """Pump the answer while `client` reads the client side; pool the connection if it ended cleanly."""
        pump = client if isinstance(client, asyncio.Task) else asyncio.create_task(client)
        answer = asyncio.create_task(self._pump_response(conn, up, reused))
        clean = False
        try:
            done, _ = await asyncio.wait({pump, answer}, return_when=asyncio.FIRST_COMPLETED)
            if answer in done:
                answer.result()
                clean = (conn.our_state is h11.DONE and conn.their_state is h11.DONE
                         and conn.trailing_data == (b"", False))
            else:
                exc = pump.exception()
                if exc is not None and not isinstance(exc, _ClientGone):
                    raise exc
        finally:
            tasks = (answer,) if pump is client else (pump, answer)
            for t in tasks:
                t.cancel()
            for t in tasks:
                with contextlib.suppress(BaseException):
                    await t
            if clean:
                self.proxy.pool.give(self.key, up)
            else:
                up.close()

    async def _watch_client(self) -> None:
        """A bodyless request: read its (empty) body, then wait for the client to leave."""
        while True:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                raise _ClientGone

    async def _pump_request(self, conn: h11.Connection, writer: asyncio.StreamWriter) -> None:
        while True:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                raise _ClientGone
            body = message.get("body", b"")
            if body and conn.our_state is h11.SEND_BODY:
                writer.write(conn.send(h11.Data(data=body)) or b"")
                await writer.drain()
            if not message.get("more_body", False):
                break
        if conn.our_state is h11.SEND_BODY:
            writer.write(conn.send(h11.EndOfMessage()) or b"")
            await writer.drain()
        while (await self.receive())["type"] != "http.disconnect":
            pass
        raise _ClientGone  # the client left: the response task is cancelled with us

    async def _pump_response(self, conn: h11.Connection, up: _Upstream, reused: bool) -> None:
        answered = False  # any byte from the app yet
        try:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data = await up.reader.read(_CHUNK)
                    if not data and reused and not answered:
                        raise _Stale
                    answered = answered or bool(data)
                    conn.receive_data(data)
                    continue
                if event is h11.PAUSED:  # a 101 to a request that asked for no upgrade
                    raise h11.RemoteProtocolError("the server switched protocols unasked")
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
            if reused and not answered:
                raise _Stale from None
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
