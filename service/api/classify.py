"""POST /v1/classify: each request names its adapter; the batcher mixes adapters in one forward."""

from __future__ import annotations

import asyncio
import logging
import time

import torch
from fastapi import APIRouter, Request
from pydantic import BaseModel, Field

from adapters.errors import AdapterConflictError, LoraswapError
from service import auth
from service.api.errors import APIError
from service.api.inputs import Ref, check_text
from service.engine.batcher import QueueFullError
from service.limits import tenant_of

router = APIRouter(tags=["classify"])
log = logging.getLogger("loraswap.classify")


class ClassifyRequest(BaseModel):
    adapter: Ref = Field(..., description="adapter `name`, `name@version`, `name@alias`, or the base model id",
                         examples=["sentiment"])
    inputs: str | list[str] = Field(..., description="one text or a list of texts")
    top_k: int = Field(1, ge=1, description="how many labels to return in `top` (all are in `scores`)")


class LabelScore(BaseModel):
    label: str
    score: float


class ClassifyResult(BaseModel):
    label: str
    score: float
    scores: dict[str, float]
    top: list[LabelScore]


class ClassifyUsage(BaseModel):
    inputs: int
    characters: int


class ClassifyResponse(BaseModel):
    adapter: str
    version: int | None
    results: list[ClassifyResult]
    usage: ClassifyUsage


def check_limits(texts: list[str], settings, param: str = "inputs") -> None:
    """The input limits of every encoder endpoint (/v1/classify, /v1/embeddings)."""
    if not texts:
        raise APIError(400, f"{param} must not be empty", param=param)
    if len(texts) > settings.max_inputs:
        raise APIError(413, f"too many inputs: {len(texts)} > {settings.max_inputs}", param=param)
    for i, text in enumerate(texts):
        if len(text) > settings.max_input_chars:
            raise APIError(413, f"{param}[{i}] has {len(text)} characters > {settings.max_input_chars}",
                           param=param)
        check_text(text, f"{param}[{i}]")


async def check_task(ctx, ref: str, task: str, what: str) -> None:
    """409 before anything loads when the registry says `ref` is an adapter of another task (the encoder's
    slots serve classification and embedding adapters alike). Served names skip the registry read (the hot
    path stays in memory): the caller checks `lease.task`, which then costs no load. Refs the registry
    cannot resolve are left to the lease too (404, or an adapter loaded from a path)."""
    manager = ctx.managers["classification"]
    if ref in manager.base_ids or ref.split("@", 1)[0] in manager.resident_names():
        return
    try:
        key = await asyncio.to_thread(ctx.registry.resolve, ref)
        found = (await asyncio.to_thread(ctx.registry.manifest, *key)).task
    except LoraswapError:
        return
    if found != task:
        raise AdapterConflictError(f"{what} {ref!r} is a {found} adapter; this endpoint serves {task} adapters")


@router.post("/v1/classify", response_model=ClassifyResponse)
async def classify(body: ClassifyRequest, request: Request) -> ClassifyResponse:
    ctx = request.app.state.ctx
    if ctx.batcher is None:
        raise APIError(404, "this server has no classification base model", code="task_unavailable")
    auth.check_adapter(request, body.adapter)
    texts = [body.inputs] if isinstance(body.inputs, str) else body.inputs
    check_limits(texts, ctx.settings)
    request.state.log_fields = {**(getattr(request.state, "log_fields", None) or {}),
                                "adapter": body.adapter, "task": "classification"}
    await check_task(ctx, body.adapter, "classification", "adapter")
    started = time.perf_counter()
    async with ctx.managers["classification"].lease(body.adapter) as lease:
        if lease.task not in (None, "classification"):  # None: the base model itself
            raise AdapterConflictError(f"adapter {body.adapter!r} is a {lease.task} adapter; this endpoint"
                                       " serves classification adapters")
        request.state.log_fields["resolved_adapter"] = lease.name or body.adapter
        try:
            logits = await ctx.batcher.submit(texts, lease.slot, tenant_of(request))
        except QueueFullError as exc:
            raise APIError(429, f"overloaded: {exc}", headers={"Retry-After": "1"}) from exc
        except (LoraswapError, asyncio.CancelledError):
            raise
        except Exception as exc:  # the batch failed (e.g. out of memory): only its requests fail, retryable
            rid = getattr(request.state, "request_id", None)
            log.exception("classification batch failed (request_id=%s)", rid)
            raise APIError(503, f"inference failed in the engine; retry (request id {rid})", code="engine_error",
                           headers={"Retry-After": "1"}) from exc
    name = lease.name or body.adapter
    request.state.log_fields.update(adapter=name, version=lease.version, inputs=len(texts),
                                    compute_ms=round((time.perf_counter() - started) * 1e3, 3))
    results = []
    for row in logits:
        labels = lease.labels or [f"LABEL_{i}" for i in range(row.shape[-1])]
        probs = torch.softmax(row.float(), dim=-1)
        order = torch.argsort(probs, descending=True).tolist()
        scores = {labels[i]: float(probs[i]) for i in range(len(labels))}
        top = [LabelScore(label=labels[i], score=float(probs[i])) for i in order[: body.top_k]]
        results.append(ClassifyResult(label=top[0].label, score=top[0].score, scores=scores, top=top))
    return ClassifyResponse(adapter=name, version=lease.version, results=results,
                            usage=ClassifyUsage(inputs=len(texts), characters=sum(map(len, texts))))
