"""Owner quotas (contract §9): reads for every caller, writes for admins only."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from stacyvm_server.core.models import Caller
from stacyvm_server.errors import BadRequest
from stacyvm_server.http.auth import get_caller, require_admin
from stacyvm_server.http.deps import get_core, ok
from stacyvm_server.http.wire import QUOTA_SUMMARY_KEYS, QuotaBody, json_value, parse_body, quota_json

router = APIRouter(tags=["quotas"])
admin = APIRouter(prefix="/admin", tags=["quotas"], dependencies=[Depends(require_admin)])


def _owner(request: Request, raw: str) -> str:
    owner: str | None = get_core(request).owners.normalize(raw)
    if not owner:
        raise BadRequest("owner_id is required")
    return owner


async def list_quotas(request: Request, _: Caller = Depends(get_caller)) -> JSONResponse:
    quotas = await get_core(request).quotas.list()
    return ok([quota_json(q) for q in sorted(quotas, key=lambda q: q.owner_id)])


async def quota_summary(request: Request, _: Caller = Depends(get_caller)) -> JSONResponse:
    summary = await get_core(request).quotas.summary()
    # Only these keys: the Python SDK builds QuotaSummary(**json).
    return ok({k: int(summary.get(k, 0)) for k in QUOTA_SUMMARY_KEYS})


async def get_quota(owner_id: str, request: Request, _: Caller = Depends(get_caller)) -> JSONResponse:
    return ok(quota_json(await get_core(request).quotas.get(_owner(request, owner_id))))


async def quota_usage(owner_id: str, request: Request, _: Caller = Depends(get_caller)) -> JSONResponse:
    return ok(json_value(await get_core(request).quotas.usage(_owner(request, owner_id))))


async def put_quota(owner_id: str, request: Request, _: Caller = Depends(require_admin)) -> JSONResponse:
    owner = _owner(request, owner_id)
    body = parse_body(await request.body(), QuotaBody)
    q = await get_core(request).quotas.put(owner, body.max_sandboxes, body.max_ttl, body.max_exec_timeout)
    return ok(quota_json(q))


async def delete_quota(owner_id: str, request: Request, _: Caller = Depends(require_admin)) -> JSONResponse:
    await get_core(request).quotas.delete(_owner(request, owner_id))
    return ok({"status": "deleted"})


# Same handlers on both trees; /admin/... additionally needs an admin key for reads.
for r in (router, admin):
    r.add_api_route("/quotas", list_quotas, methods=["GET"])
    r.add_api_route("/quotas/summary", quota_summary, methods=["GET"])
    r.add_api_route("/quotas/{owner_id}", get_quota, methods=["GET"])
    r.add_api_route("/quotas/{owner_id}", put_quota, methods=["PUT"])
    r.add_api_route("/quotas/{owner_id}", delete_quota, methods=["DELETE"])
    r.add_api_route("/quotas/{owner_id}/usage", quota_usage, methods=["GET"])
router.include_router(admin)
