"""Providers and the (disabled) pool (contract §8)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from stacyvm_server.core.models import Caller
from stacyvm_server.http.auth import get_caller, require_admin
from stacyvm_server.http.deps import get_core, ok
from stacyvm_server.http.wire import provider_detail_json, provider_json

router = APIRouter(tags=["providers"])


async def _list(request: Request) -> JSONResponse:
    infos = await get_core(request).providers_info()
    return ok([provider_json(p) for p in sorted(infos, key=lambda p: p.name)])


async def _test(request: Request) -> JSONResponse:
    results = await get_core(request).test_providers()
    return ok({name: bool(results[name]) for name in sorted(results)})


async def _detail(name: str, request: Request) -> JSONResponse:
    return ok(provider_detail_json(await get_core(request).provider_info(name)))


@router.get("/providers")
async def list_providers(request: Request, _: Caller = Depends(get_caller)) -> JSONResponse:
    return await _list(request)


@router.post("/providers/test")
async def test_providers(request: Request, _: Caller = Depends(get_caller)) -> JSONResponse:
    return await _test(request)


@router.get("/providers/{name}")
async def provider_detail(name: str, request: Request, _: Caller = Depends(get_caller)) -> JSONResponse:
    return await _detail(name, request)


@router.get("/admin/providers")
async def admin_list_providers(request: Request, _: Caller = Depends(require_admin)) -> JSONResponse:
    return await _list(request)


@router.post("/admin/providers/test")
async def admin_test_providers(request: Request, _: Caller = Depends(require_admin)) -> JSONResponse:
    return await _test(request)


@router.get("/admin/providers/{name}")
async def admin_provider_detail(name: str, request: Request, _: Caller = Depends(require_admin)) -> JSONResponse:
    return await _detail(name, request)


@router.get("/pool/status")
async def pool_status(_: Caller = Depends(get_caller)) -> JSONResponse:
    # Pool mode does not exist yet; the SDK only needs `enabled`.
    return ok({"enabled": False})
