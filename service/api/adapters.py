"""Adapter management (load, update, unload, aliases, shadow summaries), the OpenAI model list, and vLLM's
LoRA aliases. The JSON of every answer is built here, from the routers' `Residency` rows and the registry."""

from __future__ import annotations

import asyncio
import time
from typing import Any, Literal

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, Field, model_validator

from adapters.errors import AdapterNotFoundError
from adapters.registry import SHADOW
from service import auth
from service.api.inputs import Ref
from service.router import Residency

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
    weight: float | None = Field(None, ge=0, le=1, allow_inf_nan=False,
                                 description="a canary: this share of the plain name's requests (sticky per"
                                             " route key); on `shadow`, the share of requests copied")


class VllmLoadRequest(BaseModel):
    lora_name: Ref
    lora_path: str | None = None


class VllmUnloadRequest(BaseModel):
    lora_name: Ref


class AdapterResidency(BaseModel):
    """Where an adapter's served version lives now, and how it is used."""

    name: str
    version: int | None = Field(description="the version its plain name serves")
    task: str | None
    tier: Literal["device", "host", "registry"] = Field(
        description="device: in an engine slot; host: validated in host memory; registry: files only")
    device: str | None = Field(description="device type of the slots (cpu, cuda) when tier is device")
    slot: int | None
    size_bytes: int | None
    load_ms: float | None
    loaded_from: Literal["host", "registry"] | None
    loaded_at: float | None
    last_used: float | None
    requests: int = Field(description="requests served, all versions, since start")
    version_requests: int
    in_flight: int
    resident_versions: list[int]
    follows: str = Field(description="the ref the registry watch follows (a pinned name@v stays)")
    source: str | None = Field(None, description="`registry` or the local folder (admin keys only)")


class AdapterRow(AdapterResidency):
    registry_versions: list[int]
    registry_aliases: dict[str, int]


class AdapterList(BaseModel):
    object: Literal["list"] = "list"
    data: list[AdapterRow]


class AdapterDetail(BaseModel):
    name: str
    resident: AdapterResidency | None
    versions: list[int]
    aliases: dict[str, int]
    weights: dict[str, float] = Field(description="weighted aliases (canaries, the shadow's copied share)")
    manifest: dict[str, Any] | None = Field(description="loraswap.json (dataset/training/files: admin keys only)")


class LoadResponse(BaseModel):
    name: str
    version: int
    task: str
    slot: int
    load_ms: float


class UnloadResponse(BaseModel):
    name: str
    unloaded: bool


class AliasResponse(BaseModel):
    name: str
    aliases: dict[str, int]
    weights: dict[str, float]


class ShadowPair(BaseModel):
    """One (primary version, shadow version) pair of an adapter since the server started (this process)."""

    primary: int
    shadow: int
    task: str
    requests: int = Field(description="copies run and compared")
    dropped: int = Field(description="copies that could not run (overload, a refused load)")
    rows: int = Field(description="inputs compared")
    agreement: float | None = Field(description="share of inputs with the same top label (classification)")
    mean_kl: float | None = Field(description="mean KL(primary || shadow) of the calibrated scores")
    mean_tv: float | None = Field(description="mean total variation between the score vectors")
    mean_cosine: float | None = Field(description="mean cosine between the vectors (embeddings)")
    primary_ms: float | None
    shadow_ms: float | None


class ShadowSummary(BaseModel):
    name: str
    shadow: int | None = Field(description="the version the shadow alias points at now")
    pairs: list[ShadowPair]


class VllmLoadResponse(BaseModel):
    name: str
    version: int
    task: str


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "loraswap"
    parent: str | None
    task: str
    version: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def _registry_view(ctx, name: str) -> dict:
    listing = ctx.registry.listing(name)
    if not listing["versions"]:
        raise AdapterNotFoundError(f"adapter {name!r} not found in the registry")
    return listing


async def _check_load(request: Request, ref: str | None, path: str | None) -> None:
    """403 unless the key may manage the adapter being loaded (a path's name is read from its manifest)."""
    if ref is not None:
        auth.check_adapter(request, ref)
    elif path is not None and not auth.allowed(request, "*"):  # a key limited to some adapters: check the name
        from adapters.manifest import Manifest

        manifest = await asyncio.to_thread(Manifest.load, path)
        auth.check_adapter(request, manifest.name, param="path")


# Admin-only details (auth.sees_internals): how an adapter was trained, on which data, and where it lives.
PRIVATE_MANIFEST_FIELDS = frozenset({"dataset", "training", "files"})


def _residency(request: Request, row: Residency) -> dict:
    """A residency row as the caller may see it: `source` (a local path when loaded from one) only for admin
    keys and auth-off servers (the route leaves unset fields out)."""
    fields = {k: v for k, v in vars(row).items() if k != "source"}
    if auth.sees_internals(request):
        fields["source"] = row.source
    return fields


def _registry_only(name: str) -> dict:
    return dict(name=name, version=None, task=None, tier="registry", device=None, slot=None, size_bytes=None,
                load_ms=None, loaded_from=None, loaded_at=None, last_used=None, requests=0, version_requests=0,
                in_flight=0, resident_versions=[], follows=name)


@router.get("/v1/adapters", summary="Adapters in the registry and their residency", response_model=AdapterList,
            response_model_exclude_unset=True, dependencies=[Depends(auth.require_key)])
async def list_adapters(request: Request) -> AdapterList:
    ctx = request.app.state.ctx
    resident = {row.name: row for row in ctx.residency()}
    names = sorted(set(await asyncio.to_thread(ctx.registry.names)) | set(resident))
    data = []
    for name in [n for n in names if auth.allowed(request, n)]:
        try:
            reg = await asyncio.to_thread(_registry_view, ctx, name)
        except AdapterNotFoundError:
            reg = {"versions": [], "aliases": {}, "weights": {}}
        row = _residency(request, resident[name]) if name in resident else _registry_only(name)
        data.append(AdapterRow(**row, registry_versions=reg["versions"], registry_aliases=reg["aliases"]))
    return AdapterList(object="list", data=data)  # set explicitly: the route leaves unset fields out


@router.get("/v1/adapters/{name}", summary="One adapter: versions, aliases, residency, manifest",
            response_model=AdapterDetail, response_model_exclude_unset=True,
            dependencies=[Depends(auth.require_key)])
async def get_adapter(name: str, request: Request) -> AdapterDetail:
    auth.check_adapter(request, name, param="name")
    ctx = request.app.state.ctx
    resident = next((row for row in ctx.residency() if row.name == name), None)
    try:
        reg = await asyncio.to_thread(_registry_view, ctx, name)
        latest = await asyncio.to_thread(ctx.registry.resolve, name)
        manifest = (await asyncio.to_thread(ctx.registry.manifest, *latest)).model_dump(mode="json")
    except AdapterNotFoundError:
        if resident is None:
            raise
        reg, manifest = {"versions": [], "aliases": {}, "weights": {}}, None
    if manifest is not None and not auth.sees_internals(request):
        manifest = {k: v for k, v in manifest.items() if k not in PRIVATE_MANIFEST_FIELDS}
    return AdapterDetail(name=name, resident=None if resident is None else _residency(request, resident), **reg,
                         manifest=manifest)


@router.post("/v1/adapters", summary="Load or update an adapter from the registry or a path",
             response_model=LoadResponse, dependencies=[Depends(auth.require_admin)])
async def load_adapter(body: LoadRequest, request: Request) -> LoadResponse:
    ctx = request.app.state.ctx
    await _check_load(request, body.adapter, body.path)
    started = time.perf_counter()
    task, resident = await ctx.load(ref=body.adapter, path=body.path)
    return LoadResponse(name=resident.name, version=resident.version, task=task, slot=resident.slot,
                        load_ms=round((time.perf_counter() - started) * 1e3, 3))


@router.delete("/v1/adapters/{name}", summary="Unload an adapter (in-flight requests finish)",
               response_model=UnloadResponse, dependencies=[Depends(auth.require_admin)])
async def unload_adapter(name: str, request: Request) -> UnloadResponse:
    auth.check_adapter(request, name, param="name")
    await request.app.state.ctx.unload(name)
    return UnloadResponse(name=name, unloaded=True)


async def _aliases(ctx, name: str) -> AliasResponse:
    await ctx.refresh()  # this replica serves the change now; others at their next watch step
    listing = await asyncio.to_thread(ctx.registry.listing, name)
    return AliasResponse(name=name, aliases=listing["aliases"], weights=listing["weights"])


@router.post("/v1/adapters/{name}/aliases", summary="Point an alias (e.g. stable) at a version; a weight makes"
             " it a canary", response_model=AliasResponse, dependencies=[Depends(auth.require_admin)])
async def set_alias(name: str, body: AliasRequest, request: Request) -> AliasResponse:
    auth.check_adapter(request, name, param="name")
    ctx = request.app.state.ctx
    await asyncio.to_thread(ctx.registry.set_alias, name, body.alias, body.version, body.weight)
    return await _aliases(ctx, name)


@router.delete("/v1/adapters/{name}/aliases/{alias}", summary="Remove an alias (a canary's traffic returns)",
               response_model=AliasResponse, dependencies=[Depends(auth.require_admin)])
async def remove_alias(name: str, alias: str, request: Request) -> AliasResponse:
    auth.check_adapter(request, name, param="name")
    ctx = request.app.state.ctx
    await asyncio.to_thread(ctx.registry.remove_alias, name, alias)
    return await _aliases(ctx, name)


@router.get("/v1/adapters/{name}/shadow", summary="How the shadow version compares with the served ones",
            response_model=ShadowSummary, dependencies=[Depends(auth.require_key)])
async def shadow_summary(name: str, request: Request) -> ShadowSummary:
    auth.check_adapter(request, name, param="name")
    ctx = request.app.state.ctx
    pairs = ctx.shadows.summary(name)
    listing = await asyncio.to_thread(ctx.registry.listing, name)
    if not pairs and not listing["versions"]:
        raise AdapterNotFoundError(f"adapter {name!r} not found in the registry")
    return ShadowSummary(name=name, shadow=listing["aliases"].get(SHADOW), pairs=[ShadowPair(**p) for p in pairs])


@router.post("/v1/load_lora_adapter", summary="vLLM-compatible load", response_model=VllmLoadResponse,
             dependencies=[Depends(auth.require_admin)])
async def vllm_load(body: VllmLoadRequest, request: Request) -> VllmLoadResponse:
    ctx = request.app.state.ctx
    auth.check_adapter(request, body.lora_name, param="lora_name")
    await _check_load(request, None if body.lora_path else body.lora_name, body.lora_path)
    if body.lora_path:
        task, resident = await ctx.load(path=body.lora_path)
    else:
        task, resident = await ctx.load(ref=body.lora_name)
    return VllmLoadResponse(name=resident.name, version=resident.version, task=task)


@router.post("/v1/unload_lora_adapter", summary="vLLM-compatible unload", response_model=UnloadResponse,
             dependencies=[Depends(auth.require_admin)])
async def vllm_unload(body: VllmUnloadRequest, request: Request) -> UnloadResponse:
    return await unload_adapter(body.lora_name, request)


@router.get("/v1/models", summary="Base models and adapters (OpenAI list shape)", response_model=ModelList,
            dependencies=[Depends(auth.require_key)])
async def list_models(request: Request) -> ModelList:
    ctx = request.app.state.ctx
    created = int(time.time())
    bases = {task: ctx.base_id(task) for task in sorted(ctx.engines)}
    first_task = {base: task for task, base in reversed(bases.items())}  # one card per base (the encoder
    data = [ModelCard(id=base, created=created, parent=None, task=task)  # serves two tasks)
            for base, task in sorted(first_task.items()) if auth.allowed(request, base)]
    for name in await asyncio.to_thread(ctx.registry.names):
        if not auth.allowed(request, name):
            continue
        try:
            key = await asyncio.to_thread(ctx.registry.resolve, name)
            manifest = await asyncio.to_thread(ctx.registry.manifest, *key)
        except Exception:  # a broken entry must not hide the others
            continue
        if manifest.task in bases:
            data.append(ModelCard(id=name, created=int(manifest.created_at.timestamp()),
                                  parent=bases[manifest.task], task=manifest.task, version=key[1]))
    return ModelList(data=data)
