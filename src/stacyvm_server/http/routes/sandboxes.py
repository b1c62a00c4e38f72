"""Sandbox lifecycle routes: spawn, admission, list, get, destroy, prune, extend, logs, stats."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse

from stacyvm_server.core.models import Caller
from stacyvm_server.errors import BadRequest
from stacyvm_server.http.auth import get_caller, require_write
from stacyvm_server.http.deps import get_core, ok
from stacyvm_server.http.wire import (
    ExtendBody,
    SpawnBody,
    admission_json,
    parse_body,
    sandbox_json,
    stats_json,
)

router = APIRouter(tags=["sandboxes"])


def _owner(request: Request, caller: Caller, body: SpawnBody) -> str | None:
    # X-User-ID (already in caller) wins over the body's owner_id (contract §2.4).
    if caller.owner_id:
        return caller.owner_id
    owner: str | None = get_core(request).owners.normalize(body.owner_id)
    return owner


@router.post("/sandboxes", status_code=201)
async def spawn(request: Request, caller: Caller = Depends(require_write)) -> JSONResponse:
    core = get_core(request)
    body = parse_body(await request.body(), SpawnBody)
    sb = await core.sandboxes.spawn(caller, body.to_core(_owner(request, caller, body)))
    return ok(sandbox_json(sb, core.settings.server.preview_domain), 201)


@router.post("/sandboxes/admission")
async def admission(request: Request, caller: Caller = Depends(get_caller)) -> JSONResponse:
    core = get_core(request)
    body = parse_body(await request.body(), SpawnBody, optional=True)
    decision = await core.sandboxes.admission(caller, body.to_core(_owner(request, caller, body)))
    return ok(admission_json(decision))


@router.get("/sandboxes")
async def list_sandboxes(request: Request, caller: Caller = Depends(get_caller)) -> JSONResponse:
    core = get_core(request)
    domain = core.settings.server.preview_domain
    return ok([sandbox_json(sb, domain) for sb in await core.sandboxes.list(caller)])


@router.delete("/sandboxes")
async def prune(request: Request, caller: Caller = Depends(require_write)) -> JSONResponse:
    return ok({"pruned": await get_core(request).sandboxes.prune(caller)})


@router.get("/sandboxes/{sandbox_id}")
async def get_sandbox(sandbox_id: str, request: Request, caller: Caller = Depends(get_caller)) -> JSONResponse:
    core = get_core(request)
    sb = await core.sandboxes.get(caller, sandbox_id)
    return ok(sandbox_json(sb, core.settings.server.preview_domain))


@router.delete("/sandboxes/{sandbox_id}")
async def destroy(sandbox_id: str, request: Request, caller: Caller = Depends(require_write)) -> JSONResponse:
    await get_core(request).sandboxes.destroy(caller, sandbox_id)
    return ok({"status": "destroyed"})


@router.post("/sandboxes/{sandbox_id}/extend")
async def extend(sandbox_id: str, request: Request, caller: Caller = Depends(require_write)) -> JSONResponse:
    core = get_core(request)
    body = parse_body(await request.body(), ExtendBody)
    if not body.ttl:
        raise BadRequest("ttl is required")
    sb = await core.sandboxes.extend(caller, sandbox_id, body.ttl)
    return ok(sandbox_json(sb, core.settings.server.preview_domain))


@router.get("/sandboxes/{sandbox_id}/logs")
async def logs(
    sandbox_id: str,
    request: Request,
    lines: str | None = Query(default=None),
    caller: Caller = Depends(get_caller),
) -> JSONResponse:
    n = 100
    if lines is not None and lines != "":
        if not lines.isdigit() or not 0 < int(lines) <= 100_000:
            raise BadRequest("lines: must be an integer between 1 and 100000")
        n = int(lines)
    return ok(list(await get_core(request).sandboxes.logs(caller, sandbox_id, n)))


@router.get("/sandboxes/{sandbox_id}/stats")
async def stats(sandbox_id: str, request: Request, caller: Caller = Depends(get_caller)) -> JSONResponse:
    return ok(stats_json(await get_core(request).sandboxes.stats(caller, sandbox_id)))
