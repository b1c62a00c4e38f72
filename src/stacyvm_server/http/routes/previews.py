"""Preview routes: issue a token and URL for a sandbox port, list previews, set a port public."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, StrictBool, StrictInt

from stacyvm_server.core.models import Caller
from stacyvm_server.core.previews import Preview
from stacyvm_server.errors import BadRequest
from stacyvm_server.http.auth import get_caller, require_write
from stacyvm_server.http.deps import get_core, ok
from stacyvm_server.http.wire import parse_body, rfc3339

router = APIRouter(prefix="/sandboxes/{sandbox_id}/previews", tags=["previews"])


class PreviewBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    port: StrictInt | None = None
    ttl: str | None = None
    public: StrictBool | None = None


class PublicBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    public: StrictBool


def preview_json(p: Preview, request: Request) -> dict[str, Any]:
    base = str(request.base_url).rstrip("/")
    out: dict[str, Any] = {
        "sandbox_id": p.sandbox_id,
        "port": p.port,
        "url": p.url,
        "path_url": f"{base}/preview/{p.sandbox_id}/{p.port}/",
        "public": p.public,
    }
    if p.token is not None:
        out["token"] = p.token
    if p.expires_at is not None:
        out["expires_at"] = rfc3339(p.expires_at)
    return out


@router.post("", status_code=201)
async def create_preview(sandbox_id: str, request: Request, caller: Caller = Depends(require_write)) -> JSONResponse:
    body = parse_body(await request.body(), PreviewBody)
    if body.port is None:
        raise BadRequest("port is required")
    p = await get_core(request).previews.create(caller, sandbox_id, body.port, body.ttl, body.public,
                                                request.url.port)
    return ok(preview_json(p, request), 201)


@router.get("")
async def list_previews(sandbox_id: str, request: Request, caller: Caller = Depends(get_caller)) -> JSONResponse:
    previews = await get_core(request).previews.list(caller, sandbox_id, request.url.port)
    return ok([preview_json(p, request) for p in previews])


@router.put("/{port}")
async def set_public(sandbox_id: str, port: int, request: Request,
                     caller: Caller = Depends(require_write)) -> JSONResponse:
    body = parse_body(await request.body(), PublicBody)
    await get_core(request).previews.set_public(caller, sandbox_id, port, body.public)
    return ok({"port": port, "public": body.public})
