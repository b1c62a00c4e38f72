"""Background processes: /sandboxes/{id}/processes (core/processes.py, docs/interactive.md)."""

from __future__ import annotations

import base64
import codecs
import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import StrictBool, StrictInt, StrictStr

from stacyvm_server.core.models import Caller
from stacyvm_server.core.processes import Process, ProcessService, parse_signal
from stacyvm_server.core.ring import Slice
from stacyvm_server.errors import BadRequest
from stacyvm_server.http.auth import get_caller, require_write
from stacyvm_server.http.deps import get_core, ok
from stacyvm_server.http.routes.interactive import StartBody
from stacyvm_server.http.streaming import encode_stream
from stacyvm_server.http.wire import _Body, parse_body, rfc3339_nano

router = APIRouter(tags=["processes"])

MAX_LOG_READ = 1024 * 1024
MAX_STDIN = 1024 * 1024


class ProcessBody(StartBody):
    stdin: bool = False  # a background process reads /dev/null unless asked


class StdinBody(_Body):
    data: StrictStr | None = None
    data_b64: StrictStr | None = None
    close: StrictBool = False


class SignalBody(_Body):
    signal: StrictStr | StrictInt


def process_json(p: Process) -> dict[str, Any]:
    return {
        "id": p.id,
        "sandbox_id": p.sandbox_id,
        "command": p.command,
        "args": p.args,
        "mode": p.mode,
        "tty": p.tty,
        "stdin": p.stdin,
        "status": p.status,
        "exit_code": p.exit_code,
        "signal": p.signal,
        "reason": p.reason,
        "started_at": rfc3339_nano(p.started_at),
        "ended_at": rfc3339_nano(p.ended_at) if p.ended_at else None,
        "output_bytes": p.ring.end,  # everything it ever wrote
        "dropped_bytes": p.ring.start,  # the part no longer kept
    }


def dropped_marker(n: int) -> str:
    return f"[stacyvm: {n} bytes of older output dropped]\n"


def _svc(request: Request) -> ProcessService:
    return get_core(request).processes


@router.post("/sandboxes/{sandbox_id}/processes")
async def start_process(sandbox_id: str, request: Request, caller: Caller = Depends(require_write)) -> JSONResponse:
    body = parse_body(await request.body(), ProcessBody)
    p = await _svc(request).start(caller, sandbox_id, body.to_start())
    return ok(process_json(p), 201)


@router.get("/sandboxes/{sandbox_id}/processes")
async def list_processes(sandbox_id: str, request: Request, caller: Caller = Depends(get_caller)) -> JSONResponse:
    return ok([process_json(p) for p in await _svc(request).list(caller, sandbox_id)])


@router.get("/sandboxes/{sandbox_id}/processes/{process_id}")
async def get_process(
    sandbox_id: str, process_id: str, request: Request, caller: Caller = Depends(get_caller)
) -> JSONResponse:
    return ok(process_json(await _svc(request).get(caller, sandbox_id, process_id)))


@router.get("/sandboxes/{sandbox_id}/processes/{process_id}/logs", response_model=None)
async def process_logs(
    sandbox_id: str,
    process_id: str,
    request: Request,
    follow: bool = False,
    offset: int = Query(0, ge=0),
    format: str = Query("json", pattern="^(json|text|ndjson)$"),
    caller: Caller = Depends(get_caller),
) -> Response:
    """The output kept so far, or (follow=true) a stream of new output until the process exits."""
    svc = _svc(request)
    p = await svc.get(caller, sandbox_id, process_id)
    if follow:
        if format == "json":
            format = "ndjson"
        slices = svc.follow(p, offset)
        if format == "text":
            return StreamingResponse(encode_stream(_text_follow(slices), lambda b: b), media_type="text/plain")
        return StreamingResponse(
            encode_stream(_ndjson_follow(p, slices), lambda b: b),
            media_type="application/x-ndjson",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    s = svc.read(p, offset, MAX_LOG_READ)
    if format == "text":
        text = (dropped_marker(s.dropped) if s.dropped else "") + b"".join(d for _, d in s.chunks).decode(
            errors="replace"
        )
        return PlainTextResponse(text, headers={"X-Next-Offset": str(s.next_offset)})
    streams: dict[str, bytearray] = {}
    for name, data in s.chunks:
        streams.setdefault(name, bytearray()).extend(data)
    return ok(
        {
            "process": process_json(p),
            "offset": s.offset,
            "next_offset": s.next_offset,
            "dropped_bytes": s.dropped,
            "output": (dropped_marker(s.dropped) if s.dropped else "")
            + b"".join(d for _, d in s.chunks).decode(errors="replace"),
            "chunks": [{"stream": n, "data": d.decode(errors="replace")} for n, d in s.chunks],
        }
    )


async def _text_follow(slices: AsyncIterator[Slice]) -> AsyncIterator[bytes]:
    async for s in slices:
        if s.dropped:
            yield ("\n" + dropped_marker(s.dropped)).encode()
        for _, data in s.chunks:
            yield data


async def _ndjson_follow(p: Process, slices: AsyncIterator[Slice]) -> AsyncIterator[bytes]:
    """`{"stream","data"}` lines, `{"stream":"dropped","bytes":N}` when the reader fell behind, then `exit`."""
    decoders: dict[str, codecs.IncrementalDecoder] = {}
    async for s in slices:
        if s.dropped:
            decoders.clear()  # the byte stream is cut: start decoding afresh
            yield (json.dumps({"stream": "dropped", "bytes": s.dropped}) + "\n").encode()
        for name, data in s.chunks:
            dec = decoders.setdefault(name, codecs.getincrementaldecoder("utf-8")(errors="replace"))
            text = dec.decode(data)
            if text:
                yield (json.dumps({"stream": name, "data": text}) + "\n").encode()
    for name, dec in decoders.items():
        tail = dec.decode(b"", final=True)
        if tail:
            yield (json.dumps({"stream": name, "data": tail}) + "\n").encode()
    yield (
        json.dumps({"stream": "exit", "exit_code": p.exit_code, "signal": p.signal, "reason": p.reason}) + "\n"
    ).encode()


@router.post("/sandboxes/{sandbox_id}/processes/{process_id}/stdin")
async def process_stdin(
    sandbox_id: str, process_id: str, request: Request, caller: Caller = Depends(require_write)
) -> JSONResponse:
    body = parse_body(await request.body(), StdinBody)
    if body.data is not None and body.data_b64 is not None:
        raise BadRequest("send data or data_b64, not both")
    if body.data_b64 is not None:
        try:
            data = base64.b64decode(body.data_b64, validate=True)
        except ValueError:
            raise BadRequest("data_b64: invalid base64") from None
    else:
        data = (body.data or "").encode()
    if len(data) > MAX_STDIN:
        raise BadRequest(f"stdin writes are limited to {MAX_STDIN} bytes per request")
    await _svc(request).write_stdin(caller, sandbox_id, process_id, data, body.close)
    return ok({"written": len(data), "closed": body.close})


@router.post("/sandboxes/{sandbox_id}/processes/{process_id}/signal")
async def process_signal(
    sandbox_id: str, process_id: str, request: Request, caller: Caller = Depends(require_write)
) -> JSONResponse:
    body = parse_body(await request.body(), SignalBody)
    p = await _svc(request).signal(caller, sandbox_id, process_id, parse_signal(body.signal))
    return ok(process_json(p))


@router.delete("/sandboxes/{sandbox_id}/processes/{process_id}")
async def kill_process(
    sandbox_id: str, process_id: str, request: Request, caller: Caller = Depends(require_write)
) -> JSONResponse:
    return ok(process_json(await _svc(request).kill(caller, sandbox_id, process_id)))
