"""POST /v1/classify: each request names its adapter; the batcher mixes adapters in one forward."""

from __future__ import annotations

import asyncio
import logging
import time

import torch
from fastapi import APIRouter, Request
from pydantic import BaseModel, Field

from adapters.errors import EngineError, LoraswapError
from service import auth
from service.api.inputs import Ref, Short, check_text, route_key
from service.engine.classifier import ClassifierEngine
from service.errors import APIError
from service.limits import tenant_of
from service.router import Lease

router = APIRouter(tags=["classify"])
log = logging.getLogger("loraswap.classify")


class ClassifyRequest(BaseModel):
    adapter: Ref = Field(..., description="adapter `name`, `name@version`, `name@alias`, or the base model id",
                         examples=["sentiment"])
    inputs: str | list[str] = Field(..., description="one text or a list of texts")
    top_k: int = Field(1, ge=1, description="how many labels to return in `top` (all are in `scores`)")
    min_score: float | None = Field(None, ge=0, le=1, description="abstain (label null) when the top calibrated"
                                    " score is below this; default: the adapter's manifest, 0 turns it off")
    user: Short | None = Field(None, description="the caller, for canary stickiness (or X-Loraswap-Route-Key)")


class LabelScore(BaseModel):
    label: str
    score: float


class ClassifyResult(BaseModel):
    label: str | None = Field(..., description="null when the adapter abstained")
    abstained: bool = False
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


def check_count(n: int, settings, param: str) -> None:
    """413 past `max_inputs` texts or token arrays in one request."""
    if n > settings.max_inputs:
        raise APIError(413, f"too many inputs: {n} > {settings.max_inputs}", param=param)


def check_limits(texts: list[str], settings, param: str = "inputs") -> None:
    """The input limits of every encoder endpoint (/v1/classify, /v1/embeddings)."""
    if not texts:
        raise APIError(400, f"{param} must not be empty", param=param)
    check_count(len(texts), settings, param)
    for i, text in enumerate(texts):
        if len(text) > settings.max_input_chars:
            raise APIError(413, f"{param}[{i}] has {len(text)} characters > {settings.max_input_chars}",
                           param=param)
        check_text(text, f"{param}[{i}]")


def encoder_engine(ctx, task: str) -> ClassifierEngine:
    """The encoder engine serving `task` ("classification", "embedding"), or a 404 when none is configured."""
    engine = ctx.engines.get(task)
    if not isinstance(engine, ClassifierEngine):
        raise APIError(404, f"this server has no encoder base model for {task}", code="task_unavailable")
    return engine


async def submit_rows(request: Request, engine: ClassifierEngine, rows: list, lease: Lease, name: str, task: str,
                      *, embed: bool = False) -> list[torch.Tensor]:
    """Rows (texts or token ids) of one request of an encoder endpoint through the engine's batcher: its queue
    wait is observed; a failed batch fails only its requests, as a retryable 503."""
    metrics = request.app.state.ctx.metrics

    def waited(seconds: float) -> None:
        metrics.observe_queue_wait(name, task, seconds)

    try:
        return await engine.submit(rows, lease.slot, tenant_of(request), on_start=waited, embed=embed)
    except (LoraswapError, asyncio.CancelledError):  # overloaded, a failed row...: their own status
        raise
    except Exception as exc:  # the batch failed (e.g. out of memory): only its requests fail, retryable
        rid = getattr(request.state, "request_id", None)
        log.exception("%s batch failed (request_id=%s)", task, rid)
        raise EngineError(f"inference failed in the engine; retry (request id {rid})") from exc


@router.post("/v1/classify", response_model=ClassifyResponse)
async def classify(body: ClassifyRequest, request: Request) -> ClassifyResponse:
    ctx = request.app.state.ctx
    engine = encoder_engine(ctx, "classification")
    auth.check_adapter(request, body.adapter)
    texts = [body.inputs] if isinstance(body.inputs, str) else body.inputs
    check_limits(texts, ctx.settings)
    request.state.log_fields = {**(getattr(request.state, "log_fields", None) or {}),
                                "adapter": body.adapter, "task": "classification"}
    started = time.perf_counter()
    async with ctx.lease("classification", body.adapter, route_key(request, body.user)) as lease:
        name = request.state.log_fields["resolved_adapter"] = lease.name or body.adapter
        logits = await submit_rows(request, engine, texts, lease, name, "classification")
    seconds = time.perf_counter() - started
    ctx.shadows.copy(ctx.router("classification"), engine, "classification", lease, texts, logits, seconds)
    request.state.log_fields.update(adapter=name, version=lease.version, inputs=len(texts),
                                    compute_ms=round(seconds * 1e3, 3))
    results = []
    min_score = lease.min_score if body.min_score is None else body.min_score
    for row in logits:
        probs, labels = lease.scores(row)
        order = torch.argsort(probs, descending=True).tolist()
        scores = {labels[i]: float(probs[i]) for i in range(len(labels))}
        top = [LabelScore(label=labels[i], score=float(probs[i])) for i in order[: body.top_k]]
        abstained = top[0].score < min_score
        results.append(ClassifyResult(label=None if abstained else top[0].label, abstained=abstained,
                                      score=top[0].score, scores=scores, top=top))
    return ClassifyResponse(adapter=name, version=lease.version, results=results,
                            usage=ClassifyUsage(inputs=len(texts), characters=sum(map(len, texts))))
