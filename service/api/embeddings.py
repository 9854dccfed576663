"""POST /v1/embeddings (OpenAI shape): sentence embeddings from the encoder base or an embedding adapter.

Rows go through the classify batcher, so embedding rows of many adapters share encoder batches with
classification rows; each row is pooled as the base's sentence-transformers files say (adapters/pooling.py).
"""

from __future__ import annotations

import asyncio
import base64
import time
from typing import Literal

import torch
from fastapi import APIRouter, Request
from pydantic import BaseModel, Field

from service import auth
from service.api.classify import check_count, check_limits, encoder_engine, submit_rows
from service.api.inputs import Ref, Short, route_key
from service.errors import APIError

router = APIRouter(tags=["embeddings"])


class EmbeddingRequest(BaseModel):
    model: Ref = Field(..., description="the encoder base's id, or an embedding adapter (`name`, `name@v`, `name@alias`)",
                       examples=["support-search"])
    input: str | list[str] | list[int] | list[list[int]] = Field(
        ..., description="a text, a list of texts, or token ids (one array or a list of arrays) used as the"
                         " model's input ids, special tokens included")
    encoding_format: Literal["float", "base64"] = Field("float", description="base64: little-endian float32")
    dimensions: int | None = Field(None, ge=1, description="keep the first N values, re-normalised to length 1")
    user: Short | None = None


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


def _token_rows(body: EmbeddingRequest, vocab: int, settings) -> list[list[int]] | None:
    """The input as token-id rows, checked (count, range); None when it is text."""
    given = body.input
    if not isinstance(given, list) or not given or isinstance(given[0], str):
        return None
    rows = [given] if isinstance(given[0], int) else given
    check_count(len(rows), settings, "input")
    for i, row in enumerate(rows):
        if not row:
            raise APIError(400, f"input[{i}] is an empty token array", param="input")
        bad = next((t for t in row if not 0 <= t < vocab), None)
        if bad is not None:
            raise APIError(400, f"input[{i}] has token id {bad} outside the vocabulary [0, {vocab})", param="input")
    return rows


def _encode(vector: torch.Tensor, body: EmbeddingRequest) -> list[float] | str:
    if body.encoding_format == "base64":
        return base64.b64encode(vector.numpy().astype("<f4").tobytes()).decode("ascii")
    return vector.tolist()


@router.post("/v1/embeddings", response_model=EmbeddingResponse)
async def embeddings(body: EmbeddingRequest, request: Request) -> EmbeddingResponse:
    ctx = request.app.state.ctx
    engine = encoder_engine(ctx, "embedding")
    auth.check_adapter(request, body.model, param="model")
    size = engine.model.config.hidden_size * len(engine.pooling.modes)
    if body.dimensions is not None and body.dimensions > size:
        raise APIError(400, f"dimensions {body.dimensions} > the model's {size}", param="dimensions")
    rows = _token_rows(body, len(engine.tokenizer), ctx.settings)
    if rows is None:
        texts = [body.input] if isinstance(body.input, str) else list(body.input)
        check_limits(texts, ctx.settings, param="input")
        rows = await asyncio.get_running_loop().run_in_executor(None, engine.tokenize, texts,
                                                                engine.embedding_length)
    else:
        rows = [row[: engine.embedding_length] for row in rows]
    request.state.log_fields = {**(getattr(request.state, "log_fields", None) or {}),
                                "adapter": body.model, "task": "embedding"}
    started = time.perf_counter()
    async with ctx.lease("embedding", body.model, route_key(request, body.user)) as lease:
        name = request.state.log_fields["resolved_adapter"] = lease.name or body.model
        vectors = await submit_rows(request, engine, rows, lease, name, "embedding", embed=True)
    seconds = time.perf_counter() - started
    ctx.shadows.copy(ctx.router("embedding"), engine, "embedding", lease, rows, vectors, seconds)
    tokens = sum(map(len, rows))
    request.state.log_fields.update(adapter=name, version=lease.version, inputs=len(rows),
                                    compute_ms=round(seconds * 1e3, 3))
    data = []
    for i, vector in enumerate(vectors):
        if body.dimensions is not None:
            vector = torch.nn.functional.normalize(vector[: body.dimensions], dim=0)
        data.append(Embedding(index=i, embedding=_encode(vector, body)))
    return EmbeddingResponse(data=data, model=name, usage=EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens))
