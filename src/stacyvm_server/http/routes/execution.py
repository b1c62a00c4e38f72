"""POST /sandboxes/{id}/exec: synchronous JSON, or NDJSON streaming with `stream: true`."""

from __future__ import annotations

import json

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse

from stacyvm_server.core.models import Caller, StreamChunk
from stacyvm_server.http.auth import require_write
from stacyvm_server.http.deps import get_core, ok
from stacyvm_server.http.streaming import encode_stream
from stacyvm_server.http.wire import ExecBody, exec_result_json, parse_body

router = APIRouter(tags=["exec"])


def ndjson_line(chunk: StreamChunk) -> bytes:
    if chunk.stream == "exit":
        # Opt-in trailer (report_exit): the SDKs never ask for it, so they never see it.
        return (json.dumps({"stream": "exit", "exit_code": int(chunk.data)}) + "\n").encode()
    # Exactly these two keys: the SDK parsers treat anything else as an empty stdout chunk.
    return (json.dumps({"stream": chunk.stream, "data": chunk.data}) + "\n").encode()


@router.post("/sandboxes/{sandbox_id}/exec", response_model=None)
async def exec_command(
    sandbox_id: str, request: Request, caller: Caller = Depends(require_write)
) -> JSONResponse | StreamingResponse:
    core = get_core(request)
    body = parse_body(await request.body(), ExecBody)
    req = body.to_core()
    if body.stream:
        # Errors (404, bad timeout, start failure) are raised here, before any byte is sent.
        chunks = await core.sandboxes.exec_stream(caller, sandbox_id, req)
        return StreamingResponse(
            encode_stream(chunks, ndjson_line),
            media_type="application/x-ndjson",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    return ok(exec_result_json(await core.sandboxes.exec(caller, sandbox_id, req)))
