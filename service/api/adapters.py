"""Adapter management (load, update, unload, aliases), the OpenAI model list, and vLLM's LoRA aliases."""

from __future__ import annotations

import asyncio
import time

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, Field, model_validator

from adapters.errors import AdapterNotFoundError
from adapters.peft import BASE_TASKS
from service import auth
from service.api.errors import APIError
from service.api.inputs import Ref

router = APIRouter(tags=["adapters"])


class LoadRequest(BaseModel):
    adapter: Ref | None = Field(None, description="registry ref: `name`, `name@version` or `name@alias`")
    path: str | None = Field(None, description="a local adapter version folder (with loraswap.json)")

    @model_validator(mode="after")
    def _one_source(self):
        if (self.adapter is None) == (self.path is None):
            raise ValueError("give exactly one of `adapter` or `path`")
        return self


class AliasRequest(BaseModel):
    alias: Ref = Field(..., examples=["stable"])
    version: int = Field(..., ge=1)


class VllmLoadRequest(BaseModel):
    lora_name: Ref
    lora_path: str | None = None


class VllmUnloadRequest(BaseModel):
    lora_name: Ref


def _registry_view(ctx, name: str) -> dict:
    reg = ctx.registry
    versions = reg.versions(name)
    if not versions:
        raise AdapterNotFoundError(f"adapter {name!r} not found in the registry")
    return {"versions": versions, "aliases": reg.aliases(name)}


async def _check_load(request: Request, ref: str | None, path: str | None) -> None:
    """403 unless the key may manage the adapter being loaded (a path's name is read from its manifest)."""
    if ref is not None:
        auth.check_adapter(request, ref)
    elif path is not None and not auth.allowed(request, "*"):  # a key limited to some adapters: check the name
        from adapters.manifest import Manifest

        manifest = await asyncio.to_thread(Manifest.load, path)
        auth.check_adapter(request, manifest.name, param="path")


def _resident(ctx) -> dict[str, dict]:
    return {row["name"]: row for m in ctx.managers.values() for row in m.describe()}


# Admin-only details (auth.sees_internals): how an adapter was trained, on which data, and where it lives.
PRIVATE_MANIFEST_FIELDS = frozenset({"dataset", "training", "files"})
PRIVATE_RESIDENCY_FIELDS = frozenset({"source"})  # a local path when loaded from one


def _shown(request: Request, row: dict | None, private: frozenset[str]) -> dict | None:
    """`row` as the caller may see it: whole for admin keys and auth-off servers, else without `private`."""
    if row is None or auth.sees_internals(request):
        return row
    return {k: v for k, v in row.items() if k not in private}


@router.get("/v1/adapters", summary="Adapters in the registry and their residency",
            dependencies=[Depends(auth.require_key)])
async def list_adapters(request: Request) -> dict:
    ctx = request.app.state.ctx
    resident = _resident(ctx)
    names = sorted(set(await asyncio.to_thread(ctx.registry.names)) | set(resident))
    names = [n for n in names if auth.allowed(request, n)]
    data = []
    for name in names:
        try:
            reg = await asyncio.to_thread(_registry_view, ctx, name)
        except AdapterNotFoundError:
            reg = {"versions": [], "aliases": {}}
        row = resident.get(name, {"name": name, "tier": "registry", "version": None, "requests": 0})
        row = _shown(request, row, PRIVATE_RESIDENCY_FIELDS)
        data.append({**row, **{"registry_" + k: v for k, v in reg.items()}})
    return {"object": "list", "data": data}


@router.get("/v1/adapters/{name}", summary="One adapter: versions, aliases, residency, manifest",
            dependencies=[Depends(auth.require_key)])
async def get_adapter(name: str, request: Request) -> dict:
    auth.check_adapter(request, name, param="name")
    ctx = request.app.state.ctx
    resident = _resident(ctx).get(name)
    try:
        reg = await asyncio.to_thread(_registry_view, ctx, name)
        latest = await asyncio.to_thread(ctx.registry.resolve, name)
        manifest = (await asyncio.to_thread(ctx.registry.manifest, *latest)).model_dump(mode="json")
    except AdapterNotFoundError:
        if resident is None:
            raise
        reg, manifest = {"versions": [], "aliases": {}}, None
    return {"name": name, "resident": _shown(request, resident, PRIVATE_RESIDENCY_FIELDS), **reg,
            "manifest": _shown(request, manifest, PRIVATE_MANIFEST_FIELDS)}


@router.post("/v1/adapters", summary="Load or update an adapter from the registry or a path",
             dependencies=[Depends(auth.require_admin)])
async def load_adapter(body: LoadRequest, request: Request) -> dict:
    ctx = request.app.state.ctx
    await _check_load(request, body.adapter, body.path)
    started = time.perf_counter()
    task, resident = await ctx.load(ref=body.adapter, path=body.path)
    return {"name": resident.name, "version": resident.version, "task": task, "slot": resident.slot,
            "load_ms": round((time.perf_counter() - started) * 1e3, 3)}


@router.delete("/v1/adapters/{name}", summary="Unload an adapter (in-flight requests finish)",
               dependencies=[Depends(auth.require_admin)])
async def unload_adapter(name: str, request: Request) -> dict:
    auth.check_adapter(request, name, param="name")
    ctx = request.app.state.ctx
    for manager in ctx.managers.values():
        try:
            await manager.unload(name)
            return {"name": name, "unloaded": True}
        except AdapterNotFoundError:
            continue
    raise APIError(404, f"adapter {name!r} is not loaded", code="adapter_not_found")


@router.post("/v1/adapters/{name}/aliases", summary="Point an alias (e.g. stable) at a version",
             dependencies=[Depends(auth.require_admin)])
async def set_alias(name: str, body: AliasRequest, request: Request) -> dict:
    auth.check_adapter(request, name, param="name")
    ctx = request.app.state.ctx
    await asyncio.to_thread(ctx.registry.set_alias, name, body.alias, body.version)
    for manager in ctx.managers.values():
        await manager.refresh()
    return {"name": name, "aliases": await asyncio.to_thread(ctx.registry.aliases, name)}


@router.post("/v1/load_lora_adapter", summary="vLLM-compatible load", dependencies=[Depends(auth.require_admin)])
async def vllm_load(body: VllmLoadRequest, request: Request) -> dict:
    ctx = request.app.state.ctx
    auth.check_adapter(request, body.lora_name, param="lora_name")
    await _check_load(request, None if body.lora_path else body.lora_name, body.lora_path)
    if body.lora_path:
        task, resident = await ctx.load(path=body.lora_path)
    else:
        task, resident = await ctx.load(ref=body.lora_name)
    return {"name": resident.name, "version": resident.version, "task": task}


@router.post("/v1/unload_lora_adapter", summary="vLLM-compatible unload",
             dependencies=[Depends(auth.require_admin)])
async def vllm_unload(body: VllmUnloadRequest, request: Request) -> dict:
    return await unload_adapter(body.lora_name, request)


@router.get("/v1/models", summary="Base models and adapters (OpenAI list shape)",
            dependencies=[Depends(auth.require_key)])
async def list_models(request: Request) -> dict:
    ctx = request.app.state.ctx
    created = int(time.time())
    data = []
    for task in sorted(ctx.managers):
        base = ctx.base_id(task)
        if not auth.allowed(request, base):
            continue
        data.append({"id": base, "object": "model", "created": created, "owned_by": "loraswap", "parent": None,
                     "task": task})
    bases = {task: ctx.base_id(task) for task in ctx.managers}
    for name in await asyncio.to_thread(ctx.registry.names):
        if not auth.allowed(request, name):
            continue
        try:
            key = await asyncio.to_thread(ctx.registry.resolve, name)
            manifest = await asyncio.to_thread(ctx.registry.manifest, *key)
        except Exception:  # a broken entry must not hide the others
            continue
        base_task = BASE_TASKS.get(manifest.task, manifest.task)  # embedding adapters run on the encoder
        if base_task in bases:
            data.append({"id": name, "object": "model", "created": int(manifest.created_at.timestamp()),
                         "owned_by": "loraswap", "parent": bases[base_task], "task": manifest.task,
                         "version": key[1]})
    return {"object": "list", "data": data}
