"""Templates CRUD and spawn-from-template (contract §7, both field-name sets)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from stacyvm_server.core.models import Caller
from stacyvm_server.http.auth import get_caller, require_write
from stacyvm_server.http.deps import get_core, ok
from stacyvm_server.http.wire import TemplateBody, TemplateSpawnBody, parse_body, sandbox_json, template_json

router = APIRouter(prefix="/templates", tags=["templates"])


@router.get("")
async def list_templates(request: Request, _: Caller = Depends(get_caller)) -> JSONResponse:
    return ok([template_json(t) for t in await get_core(request).templates.list()])


@router.post("", status_code=201)
async def create_template(request: Request, _: Caller = Depends(require_write)) -> JSONResponse:
    tpl = parse_body(await request.body(), TemplateBody).to_core()
    return ok(template_json(await get_core(request).templates.create(tpl)), 201)


@router.get("/{name}")
async def get_template(name: str, request: Request, _: Caller = Depends(get_caller)) -> JSONResponse:
    return ok(template_json(await get_core(request).templates.get(name)))


@router.put("/{name}")
async def update_template(name: str, request: Request, _: Caller = Depends(require_write)) -> JSONResponse:
    tpl = parse_body(await request.body(), TemplateBody).to_core(name=name)
    return ok(template_json(await get_core(request).templates.update(name, tpl)))


@router.delete("/{name}")
async def delete_template(name: str, request: Request, _: Caller = Depends(require_write)) -> JSONResponse:
    await get_core(request).templates.delete(name)
    return ok({"status": "deleted"})


@router.post("/{name}/spawn", status_code=201)
async def spawn_template(name: str, request: Request, caller: Caller = Depends(require_write)) -> JSONResponse:
    core = get_core(request)
    # The Python SDK sends no body and no Content-Type at all.
    body = parse_body(await request.body(), TemplateSpawnBody, optional=True)
    sb = await core.sandboxes.spawn_template(caller, name, body.provider or None, body.ttl or None)
    return ok(sandbox_json(sb, core.settings.server.preview_domain), 201)
