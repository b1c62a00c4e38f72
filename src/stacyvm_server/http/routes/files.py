"""The 8 file routes under /sandboxes/{id}/files (contract §6)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, StreamingResponse

from stacyvm_server.core.models import Caller
from stacyvm_server.core.sandboxes import check_path
from stacyvm_server.errors import BadRequest
from stacyvm_server.http.auth import get_caller, require_write
from stacyvm_server.http.deps import get_core, ok
from stacyvm_server.http.streaming import encode_stream
from stacyvm_server.http.wire import (
    ChmodBody,
    MoveBody,
    WriteFileBody,
    file_info_json,
    parse_body,
)

router = APIRouter(prefix="/sandboxes/{sandbox_id}/files", tags=["files"])


def _identity(b: bytes) -> bytes:
    return b


@router.get("", response_model=None)
async def read_file(
    sandbox_id: str, request: Request, path: str | None = Query(default=None), caller: Caller = Depends(get_caller)
) -> StreamingResponse:
    it = await get_core(request).sandboxes.read_file(caller, sandbox_id, check_path(path))
    # Raw bytes, no charset: both SDKs decode the body as text themselves.
    return StreamingResponse(encode_stream(it, _identity), media_type="application/octet-stream")


@router.post("")
async def write_file(sandbox_id: str, request: Request, caller: Caller = Depends(require_write)) -> JSONResponse:
    body = parse_body(await request.body(), WriteFileBody)
    path = check_path(body.path)
    await get_core(request).sandboxes.write_file(caller, sandbox_id, path, body.data(), body.mode)
    return ok({"status": "written"})


@router.delete("")
async def delete_file(
    sandbox_id: str,
    request: Request,
    path: str | None = Query(default=None),
    recursive: str | None = Query(default=None),
    caller: Caller = Depends(require_write),
) -> JSONResponse:
    await get_core(request).sandboxes.delete_file(caller, sandbox_id, check_path(path), recursive == "true")
    return ok({"status": "deleted"})


@router.get("/list")
async def list_files(
    sandbox_id: str, request: Request, path: str | None = Query(default=None), caller: Caller = Depends(get_caller)
) -> JSONResponse:
    # An empty path lists "/" (contract §6.4).
    target = check_path(path) if path else "/"
    infos = await get_core(request).sandboxes.list_files(caller, sandbox_id, target)
    return ok([file_info_json(fi) for fi in infos])


@router.get("/stat")
async def stat_file(
    sandbox_id: str, request: Request, path: str | None = Query(default=None), caller: Caller = Depends(get_caller)
) -> JSONResponse:
    return ok(file_info_json(await get_core(request).sandboxes.stat_file(caller, sandbox_id, check_path(path))))


@router.get("/glob")
async def glob_files(
    sandbox_id: str,
    request: Request,
    pattern: str | None = Query(default=None),
    caller: Caller = Depends(get_caller),
) -> JSONResponse:
    matches = await get_core(request).sandboxes.glob_files(caller, sandbox_id, check_path(pattern, "pattern"))
    return ok(list(matches or []))


@router.post("/move")
async def move_file(sandbox_id: str, request: Request, caller: Caller = Depends(require_write)) -> JSONResponse:
    body = parse_body(await request.body(), MoveBody)
    old, new = check_path(body.old_path, "old_path"), check_path(body.new_path, "new_path")
    await get_core(request).sandboxes.move_file(caller, sandbox_id, old, new)
    return ok({"status": "moved"})


@router.post("/chmod")
async def chmod_file(sandbox_id: str, request: Request, caller: Caller = Depends(require_write)) -> JSONResponse:
    body = parse_body(await request.body(), ChmodBody)
    path = check_path(body.path)
    if not body.mode:
        raise BadRequest("mode is required")
    await get_core(request).sandboxes.chmod_file(caller, sandbox_id, path, body.mode)
    return ok({"status": "chmod applied"})
