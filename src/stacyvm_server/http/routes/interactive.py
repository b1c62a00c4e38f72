"""GET /sandboxes/{id}/exec/ws: interactive exec over a WebSocket (docs/interactive.md).

Two dialects, told apart by the first message:
- with `"type": "start"`: the interactive protocol (stdin, resize, signal,
  close_stdin in; stdout/stderr or output, exit, error out);
- without `type`: the reference server's behaviour (contract §5.5): one exec
  request, `{"stream","data"}` chunks, then `{"type":"done"}`.

Auth happens before the upgrade is accepted: normal API-key headers, or a
short-lived exec token (query `token`, or a `stacyvm-token.<token>`
subprotocol) for browsers. Origin is checked against the CORS allow-list.
"""

from __future__ import annotations

import asyncio
import base64
import codecs
import contextlib
import json
import logging
import time
from datetime import UTC, datetime
from typing import Any, cast

from fastapi import APIRouter, Depends, Request, WebSocket
from fastapi.responses import JSONResponse
from pydantic import StrictInt, ValidationError
from starlette.websockets import WebSocketDisconnect

from stacyvm_server.core.models import Caller
from stacyvm_server.core.processes import StartRequest, check_tty_size, parse_signal
from stacyvm_server.errors import BadRequest, Forbidden, StacyError
from stacyvm_server.http.auth import get_caller, require_write
from stacyvm_server.http.deps import get_core, ok
from stacyvm_server.http.wire import ExecBody, describe_errors, rfc3339
from stacyvm_server.ids import normalize_sandbox_id
from stacyvm_server.providers.base import ExecProcess

log = logging.getLogger("stacyvm.http")
router = APIRouter(tags=["exec"])

TOKEN_PROTOCOL = "stacyvm-token."
PROTOCOL = "stacyvm.v1"
MAX_MESSAGE = 1024 * 1024  # one stdin message, decoded


class StartBody(ExecBody):
    """The `start` message (also the body of POST /processes)."""

    stdin: bool = True
    tty: bool = False
    rows: StrictInt | None = None
    cols: StrictInt | None = None
    binary: bool = False  # output as data_b64 instead of UTF-8 text

    def to_start(self) -> StartRequest:
        if self.tty:
            check_tty_size(self.rows, self.cols)
        return StartRequest(
            exec=self.to_core(), stdin=self.stdin, tty=self.tty, rows=self.rows, cols=self.cols
        )


def parse_start(data: dict[str, Any], model: type[StartBody] = StartBody) -> StartBody:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise BadRequest(describe_errors(list(exc.errors()))) from exc


# token ---------------------------------------------------------------------------------
@router.post("/sandboxes/{sandbox_id}/exec/token")
async def exec_token(sandbox_id: str, request: Request, caller: Caller = Depends(require_write)) -> JSONResponse:
    """A 60-second token for one sandbox's exec WebSocket, acting as this caller."""
    core = get_core(request)
    sb = await core.sandboxes.get(caller, sandbox_id)
    token, exp = core.processes.tokens.issue(caller, sb.id)
    return ok(
        {
            "token": token,
            "expires_at": rfc3339(datetime.fromtimestamp(exp, UTC)),
            "url": f"/api/v1/sandboxes/{sb.id}/exec/ws?token={token}",
            "subprotocol": TOKEN_PROTOCOL + token,
        },
        201,
    )


# handshake ------------------------------------------------------------------------------
def _origin_allowed(origin: str | None, allowed: list[str]) -> bool:
    if origin is None:  # not a browser
        return True
    return not allowed or "*" in allowed or origin in allowed


def _offered_protocols(ws: WebSocket) -> list[str]:
    raw = ws.headers.get("sec-websocket-protocol", "")
    return [p.strip() for p in raw.split(",") if p.strip()]


def _authenticate(ws: WebSocket, sandbox_id: str) -> Caller:
    core = ws.app.state.core
    token = ws.query_params.get("token")
    for proto in _offered_protocols(ws):
        if proto.startswith(TOKEN_PROTOCOL):
            token = proto[len(TOKEN_PROTOCOL):]
    if token:
        caller: Caller = core.processes.tokens.check(token, normalize_sandbox_id(sandbox_id))
        return caller
    return get_caller(cast(Request, ws))  # X-API-Key and X-User-ID headers, like any route


async def _deny(ws: WebSocket, status: int, code: str, message: str) -> None:
    """Refuse the upgrade with an HTTP error (or close 1008 if the server cannot send one)."""
    try:
        await ws.send_denial_response(JSONResponse({"code": code, "message": message}, status_code=status))
    except RuntimeError:
        await ws.close(code=1008, reason=message[:120])


@router.websocket("/sandboxes/{sandbox_id}/exec/ws")
async def exec_ws(ws: WebSocket, sandbox_id: str) -> None:
    core = ws.app.state.core
    if not _origin_allowed(ws.headers.get("origin"), list(core.settings.server.cors_allowed_origins)):
        await _deny(ws, 403, "forbidden", "WebSocket origin is not allowed")
        return
    try:
        caller = _authenticate(ws, sandbox_id)
        if not caller.can_write():
            raise Forbidden("this API key is read-only (viewer role)")
        await core.sandboxes.get(caller, sandbox_id)
    except StacyError as exc:
        await _deny(ws, exc.status, exc.code, exc.message)
        return
    offered = _offered_protocols(ws)
    chosen = PROTOCOL if PROTOCOL in offered else next((p for p in offered if p.startswith(TOKEN_PROTOCOL)), None)
    await ws.accept(subprotocol=chosen)
    try:
        first = await ws.receive_text()
    except (WebSocketDisconnect, KeyError):
        return
    try:
        msg = json.loads(first)
        if not isinstance(msg, dict):
            raise ValueError("not an object")
    except ValueError:
        await ws.close(code=1007, reason="invalid request")
        return
    if "type" not in msg:
        await _reference_exec(ws, caller, sandbox_id, msg)
    elif msg.get("type") == "start":
        await Session(ws, caller, sandbox_id).run(msg)
    else:
        await ws.send_json({"type": "error", "message": 'the first message must be {"type": "start", ...}'})
        await ws.close(code=1008, reason="expected start")


# the reference dialect ------------------------------------------------------------------
async def _reference_exec(ws: WebSocket, caller: Caller, sandbox_id: str, msg: dict[str, Any]) -> None:
    core = ws.app.state.core
    try:
        req = parse_start(msg, StartBody).to_core()
        chunks = await core.sandboxes.exec_stream(caller, sandbox_id, req)
    except StacyError as exc:
        await ws.send_json({"error": exc.message})
        await ws.close(code=1011, reason="exec failed")
        return
    try:
        async for chunk in chunks:
            await ws.send_json({"stream": chunk.stream, "data": chunk.data})
        await ws.send_json({"type": "done"})
        await ws.close(code=1000)
    except (WebSocketDisconnect, RuntimeError):
        pass
    finally:
        with contextlib.suppress(Exception):
            await chunks.aclose()


# the interactive dialect ----------------------------------------------------------------
class Session:
    """One interactive exec: the process lives exactly as long as the connection."""

    def __init__(self, ws: WebSocket, caller: Caller, sandbox_id: str) -> None:
        self.ws = ws
        self.caller = caller
        self.sandbox_id = sandbox_id
        self.proc: ExecProcess | None = None
        self.tty = False
        self.binary = False
        self._send_lock = asyncio.Lock()
        self._timed_out = False
        self._exit_sent = False

    async def send(self, msg: dict[str, Any]) -> None:
        async with self._send_lock:
            await self.ws.send_text(json.dumps(msg))

    async def run(self, start: dict[str, Any]) -> None:
        core = self.ws.app.state.core
        try:
            body = parse_start(start)
            self.tty, self.binary = body.tty, body.binary
            _, proc, timeout = await core.processes.open_exec(self.caller, self.sandbox_id, body.to_start())
        except StacyError as exc:
            with contextlib.suppress(Exception):
                await self.send({"type": "error", "code": exc.code, "message": exc.message})
                await self.ws.close(code=1011, reason="exec failed")
            return
        self.proc = proc
        pump = asyncio.ensure_future(self._pump(proc, timeout))
        reader = asyncio.ensure_future(self._read(proc))
        try:
            await asyncio.wait({pump, reader}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not self._exit_sent:  # the client went away first: the process must not outlive it
                await proc.kill()
                pump.cancel()
            reader.cancel()
            for t in (pump, reader):
                with contextlib.suppress(BaseException):
                    await t
        with contextlib.suppress(Exception):
            await self.ws.close(code=1000)

    async def _pump(self, proc: ExecProcess, timeout: float | None) -> None:
        """Output to the client (a slow client slows the process: no unbounded buffer), then `exit`."""
        decoders = {s: codecs.getincrementaldecoder("utf-8")(errors="replace") for s in ("stdout", "stderr")}

        async def forward() -> None:
            async for stream, data in proc.output():
                name = "output" if self.tty else stream
                if self.binary:
                    await self.send({"type": name, "data_b64": base64.b64encode(data).decode()})
                    continue
                text = decoders[stream].decode(data)
                if text:
                    await self.send({"type": name, "data": text})
            for key, dec in decoders.items():
                tail = dec.decode(b"", final=True)
                if tail:
                    await self.send({"type": "output" if self.tty else key, "data": tail})

        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            await asyncio.wait_for(forward(), timeout)
            status = await asyncio.wait_for(
                proc.wait(), None if deadline is None else max(0.0, deadline - time.monotonic())
            )
        except TimeoutError:
            self._timed_out = True
            await proc.kill()
            status = await proc.wait()
        reason = "timeout" if self._timed_out else status.reason
        await self.send({"type": "exit", "exit_code": status.exit_code, "signal": status.signal, "reason": reason})
        self._exit_sent = True

    async def _read(self, proc: ExecProcess) -> None:
        """Client messages until it disconnects. A bad message is answered with `error`, not fatal."""
        while True:
            try:
                raw = await self.ws.receive_text()
            except (WebSocketDisconnect, KeyError, RuntimeError):
                return
            try:
                msg = json.loads(raw)
                if not isinstance(msg, dict):
                    raise BadRequest("each message must be a JSON object")
                await self._handle(proc, msg)
            except ValueError:
                await self.send({"type": "error", "message": "invalid JSON message"})
            except StacyError as exc:
                await self.send({"type": "error", "code": exc.code, "message": exc.message})
            except (BrokenPipeError, ConnectionResetError):
                await self.send({"type": "error", "message": "stdin is closed"})

    async def _handle(self, proc: ExecProcess, msg: dict[str, Any]) -> None:
        kind = msg.get("type")
        if kind == "stdin":
            await proc.write_stdin(_stdin_bytes(msg))
        elif kind == "resize":
            size = check_tty_size(_int(msg, "rows"), _int(msg, "cols"))
            if size is None:
                raise BadRequest("resize needs rows and cols")
            if not self.tty:
                raise BadRequest("resize: this exec has no terminal (start it with \"tty\": true)")
            await proc.resize(*size)
        elif kind == "signal":
            value = msg.get("signal")
            if not isinstance(value, str | int):
                raise BadRequest("signal: expected a name like SIGINT or a number")
            await proc.signal(parse_signal(value))
        elif kind == "close_stdin":
            await proc.close_stdin()
        else:
            raise BadRequest(f"unknown message type {kind!r} (stdin, resize, signal, close_stdin)")


def _int(msg: dict[str, Any], key: str) -> int | None:
    v = msg.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise BadRequest(f"{key}: must be an integer")
    return v


def _stdin_bytes(msg: dict[str, Any]) -> bytes:
    if "data_b64" in msg:
        raw = msg["data_b64"]
        if not isinstance(raw, str):
            raise BadRequest("data_b64: must be a base64 string")
        try:
            data = base64.b64decode(raw, validate=True)
        except ValueError:
            raise BadRequest("data_b64: invalid base64") from None
    else:
        text = msg.get("data", "")
        if not isinstance(text, str):
            raise BadRequest("data: must be a string (use data_b64 for bytes)")
        data = text.encode()
    if len(data) > MAX_MESSAGE:
        raise BadRequest(f"stdin messages are limited to {MAX_MESSAGE} bytes")
    return data
