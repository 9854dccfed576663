"""OpenAI-compatible text generation: POST /v1/completions and /v1/chat/completions (streaming or not).
`model` names the adapter (`name`, `name@version`, `name@alias`) or the base; the GeneratorEngine runs it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field

from adapters.errors import ContextLengthError, EngineError, InvalidInputError, LoraswapError
from service import auth
from service.api.inputs import SEED_MAX, SEED_MIN, TOP_K_MAX, Ref, Short, check_text, route_key
from service.context import ServiceContext
from service.engine.generator import Delta, GeneratorEngine
from service.engine.sampling import SamplingParams
from service.errors import APIError, ErrorBody
from service.limits import tenant_of

router = APIRouter(tags=["openai"])
log = logging.getLogger("loraswap.openai")


# --- request schemas ------------------------------------------------------------------------------------
class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingFields(BaseModel):
    """The sampling options both endpoints share (OpenAI names; `top_k` is vLLM's extension)."""

    model: Ref = Field(..., description="adapter `name`, `name@version`, `name@alias`, or the base model id")
    max_tokens: int | None = Field(
        None,
        ge=1,
        description="tokens to generate (default: 16 for completions, the rest of the context for chat)",
    )
    temperature: float = Field(1.0, ge=0, le=2, description="0 = greedy")
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(-1, ge=-1, le=TOP_K_MAX, description="-1 or 0: off")
    n: int = Field(1, ge=1, le=1, description="only 1 is supported")
    stop: Short | list[Short] | None = Field(
        None, max_length=4, description="up to 4 strings; the text ends before the first one"
    )
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: Short | None = None


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        ..., description="one prompt (text or token ids)"
    )


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="alias of max_tokens")


# --- response schemas -----------------------------------------------------------------------------------
class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: Literal["stop", "length"] | None
    logprobs: None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: Literal["stop", "length"] | None
    logprobs: None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    finish_reason: Literal["stop", "length"] | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


# --- shared plumbing ------------------------------------------------------------------------------------
def _engine(request: Request) -> tuple[ServiceContext, GeneratorEngine]:
    ctx = request.app.state.ctx
    engine = ctx.engines.get("generation")
    if not isinstance(engine, GeneratorEngine):
        raise APIError(404, "this server has no generation base model", code="task_unavailable")
    return ctx, engine


def _params(
    body: SamplingFields, max_tokens: int | None, prompt_len: int, engine, settings
) -> SamplingParams:
    room = engine.max_model_len - prompt_len
    if room < 1:
        raise ContextLengthError(
            f"the prompt has {prompt_len} tokens; this model's context is {engine.max_model_len} "
            "tokens (prompt + at least one generated token)",
            param="messages" if isinstance(body, ChatCompletionRequest) else "prompt",
        )
    if max_tokens is not None and max_tokens > settings.max_tokens:
        raise APIError(
            400,
            f"max_tokens {max_tokens} exceeds this server's limit of {settings.max_tokens}",
            param="max_tokens",
        )
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stop) > 4:
        raise InvalidInputError("at most 4 stop strings", param="stop")
    # Generation stops at the context end anyway (finish_reason "length"), so clamp instead of refusing.
    wanted = max_tokens if max_tokens is not None else min(room, settings.max_tokens)
    return SamplingParams(
        max_tokens=min(wanted, room),
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k,
        stop=stop,
        seed=body.seed,
    )


@functools.cache
def _max_token_chars(tokenizer) -> int:
    """The most characters one token can stand for (the longest vocabulary entry: byte-level, SentencePiece
    and WordPiece entries are at least as long as the text they decode to)."""
    return max(map(len, tokenizer.get_vocab()), default=1)


def _check_length(text: str, tokenizer, context: int, param: str) -> None:
    """Refuse, without tokenizing, a text that must have more tokens than the context holds: tokenizing
    hundreds of KB takes seconds and holds the GIL while its ids become Python ints."""
    if len(text) > context * _max_token_chars(tokenizer):
        raise ContextLengthError(f"the {param} has {len(text)} characters, more than this model's context of"
                                 f" {context} tokens can hold", param=param)


def _prompt_ids(body: CompletionRequest, tokenizer, vocab: int, context: int) -> list[int]:
    prompt = body.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise InvalidInputError("only one prompt per request is supported", param="prompt")
        prompt = prompt[0]
    if isinstance(prompt, str):
        check_text(prompt, "prompt")
        _check_length(prompt, tokenizer, context, "prompt")
        ids = tokenizer(prompt)["input_ids"]
    else:
        ids = list(prompt)
        if any(not 0 <= t < vocab for t in ids):
            raise InvalidInputError(f"token ids must be in [0, {vocab})", param="prompt")
    if not ids:
        raise InvalidInputError("the prompt is empty", param="prompt")
    return ids


def _chat_ids(body: ChatCompletionRequest, tokenizer, context: int) -> list[int]:
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidInputError("the base model has no chat template; use /v1/completions", param="messages")
    messages = []
    for m in body.messages:
        content = m.content
        if isinstance(content, list):  # content parts: only text is supported
            if any(p.get("type") != "text" for p in content):
                raise InvalidInputError("only text content parts are supported", param="messages")
            content = "".join(str(p.get("text", "")) for p in content)
        check_text(content or "", "messages")
        messages.append({"role": m.role, "content": content or ""})
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    _check_length(text, tokenizer, context, "messages")
    # The template already holds the special tokens (BOS etc.): do not add them twice.
    return tokenizer(text, add_special_tokens=False)["input_ids"]


class _Run:
    """One request on the engine under an adapter lease: started eagerly so that errors that happen before
    the first token (unknown model, context, overload) are HTTP errors, not a broken stream."""

    def __init__(self, ctx, engine, model: str, request: Request, user: str | None) -> None:
        self.ctx, self.engine, self.model = ctx, engine, model
        self.tenant, self.route_key = tenant_of(request), route_key(request, user)
        # What the access log and loraswap_requests_total see (service/app.py RequestMetrics).
        self.log_fields = request.state.log_fields = {
            **(getattr(request.state, "log_fields", None) or {}), "adapter": model, "task": "generation"}
        self.stack = contextlib.AsyncExitStack()
        self.first: Delta | None = None
        self.adapter = model
        self.started = time.perf_counter()

    async def start(self, prompt_ids: list[int], params: SamplingParams) -> None:
        try:
            lease = await self.stack.enter_async_context(self.ctx.lease("generation", self.model, self.route_key))
            self.adapter = self.log_fields["resolved_adapter"] = lease.name or self.model
            self.log_fields["version"] = lease.version
            self.deltas = await self.stack.enter_async_context(
                contextlib.aclosing(self.engine.generate(prompt_ids, params, lease.slot, self.tenant))
            )
            self.first = await self.deltas.__anext__()
        except LoraswapError:  # unknown adapter, wrong task, context, overload...: their own status
            await self.stack.aclose()
            raise
        except Exception as exc:  # the engine step failed (e.g. out of memory): only its requests fail, retryable
            await self.stack.aclose()
            log.exception("generation failed before the first token")
            raise EngineError("inference failed in the engine; retry") from exc
        except BaseException:
            await self.stack.aclose()
            raise
        self._observe_first(len(prompt_ids))

    def _observe_first(self, prompt_tokens: int) -> None:
        metrics = self.ctx.metrics
        now = time.perf_counter()
        self.last = now
        if metrics is not None:
            if self.first.queue_wait is not None:
                metrics.observe_queue_wait(self.adapter, "generation", self.first.queue_wait)
            metrics.observe_ttft(self.adapter, now - self.started)
            metrics.add_tokens(self.adapter, "prompt", prompt_tokens)

    async def __aiter__(self) -> AsyncIterator[Delta]:
        """All deltas (the first included); releases the lease and the sequence however iteration ends."""
        metrics = self.ctx.metrics
        try:
            delta = self.first
            while True:
                if metrics is not None and delta.token_ids:
                    metrics.add_tokens(self.adapter, "generated", len(delta.token_ids))
                yield delta
                if delta.finish_reason is not None:
                    return
                delta = await self.deltas.__anext__()
                now = time.perf_counter()
                if metrics is not None:
                    metrics.observe_itl(self.adapter, now - self.last)
                self.last = now
        finally:
            await self.stack.aclose()


def _usage(delta: Delta) -> Usage:
    return Usage(
        prompt_tokens=delta.prompt_tokens,
        completion_tokens=delta.completion_tokens,
        total_tokens=delta.prompt_tokens + delta.completion_tokens,
    )


def _sse(obj: BaseModel | dict) -> str:
    data = obj.model_dump_json(exclude_none=False) if isinstance(obj, BaseModel) else json.dumps(obj)
    return f"data: {data}\n\n"


def _stream(events: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(
        events,
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def _with_errors(events: AsyncIterator[str]) -> AsyncIterator[str]:
    """After the first chunk the status is sent: a failure becomes an error event, then [DONE]."""
    try:
        async for event in events:
            yield event
    except Exception as exc:  # noqa: BLE001 - reported to the client in the documented error shape
        yield _sse(
            {
                "error": {
                    "message": f"generation failed: {exc}",
                    "type": "server_error",
                    "param": None,
                    "code": None,
                }
            }
        )
    yield "data: [DONE]\n\n"


# --- endpoints ------------------------------------------------------------------------------------------
def _inline(model: type[BaseModel]) -> dict:
    """`model`'s JSON schema with its `$defs` inlined (it is embedded in a media type, not in components)."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def walk(node):
        if isinstance(node, dict):
            if "$ref" in node:
                return walk(defs[node["$ref"].rsplit("/", 1)[-1]])
            return {k: walk(v) for k, v in node.items()}
        return [walk(v) for v in node] if isinstance(node, list) else node

    return walk(schema)


def _streamed(chunk: type[BaseModel]) -> dict:
    """OpenAPI for a 200 that is JSON, or with `stream: true` server-sent events: each event's `data` is a
    `chunk` as JSON (or an error object after a failure), the last one is `[DONE]`."""
    payload = {"type": "string", "contentMediaType": "application/json",
               "contentSchema": {"anyOf": [_inline(chunk), _inline(ErrorBody)]}}
    event = {"type": "object", "required": ["data"],
             "properties": {"event": {"type": "string"}, "data": {"anyOf": [{"const": "[DONE]"}, payload]}}}
    return {200: {"description": "The completion; with `stream: true` server-sent events ending with "
                                 "`data: [DONE]`",
                  "content": {"text/event-stream": {"schema": event}}}}


@router.post("/v1/completions", response_model=CompletionResponse, responses=_streamed(CompletionResponse))
async def completions(body: CompletionRequest, request: Request):
    auth.check_adapter(request, body.model, param="model")
    ctx, engine = _engine(request)
    # Tokenizing a long prompt takes long: never on the event loop, where it would stall every request.
    prompt_ids = await asyncio.to_thread(_prompt_ids, body, engine.tokenizer, engine.model.config.vocab_size,
                                         engine.max_model_len)
    params = _params(
        body, 16 if body.max_tokens is None else body.max_tokens, len(prompt_ids), engine, ctx.settings
    )
    run = _Run(ctx, engine, body.model, request, body.user)
    await run.start(prompt_ids, params)
    rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

    if not body.stream:
        text, last = "", None
        async for delta in run:
            text, last = text + delta.text, delta
        return CompletionResponse(
            id=rid,
            created=created,
            model=body.model,
            usage=_usage(last),
            choices=[CompletionChoice(text=text, finish_reason=last.finish_reason)],
        )

    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    async def events() -> AsyncIterator[str]:
        async for delta in run:
            if delta.text or delta.finish_reason:
                choice = CompletionChoice(text=delta.text, finish_reason=delta.finish_reason)
                yield _sse(CompletionResponse(id=rid, created=created, model=body.model, choices=[choice]))
            if delta.finish_reason and include_usage:
                yield _sse(
                    CompletionResponse(
                        id=rid, created=created, model=body.model, choices=[], usage=_usage(delta)
                    )
                )

    return _stream(_with_errors(events()))


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse,
             responses=_streamed(ChatCompletionChunk))
async def chat_completions(body: ChatCompletionRequest, request: Request):
    auth.check_adapter(request, body.model, param="model")
    ctx, engine = _engine(request)
    prompt_ids = await asyncio.to_thread(_chat_ids, body, engine.tokenizer, engine.max_model_len)  # as above
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    params = _params(body, max_tokens, len(prompt_ids), engine, ctx.settings)
    run = _Run(ctx, engine, body.model, request, body.user)
    await run.start(prompt_ids, params)
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

    if not body.stream:
        text, last = "", None
        async for delta in run:
            text, last = text + delta.text, delta
        choice = ChatChoice(message=AssistantMessage(content=text), finish_reason=last.finish_reason)
        return ChatCompletionResponse(
            id=rid, created=created, model=body.model, choices=[choice], usage=_usage(last)
        )

    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    def chunk(delta: ChatDelta, finish: str | None = None, usage: Usage | None = None) -> str:
        choices = [] if usage is not None else [ChatChunkChoice(delta=delta, finish_reason=finish)]
        return _sse(
            ChatCompletionChunk(id=rid, created=created, model=body.model, choices=choices, usage=usage)
        )

    async def events() -> AsyncIterator[str]:
        yield chunk(ChatDelta(role="assistant", content=""))
        async for delta in run:
            if delta.text or delta.finish_reason:
                yield chunk(ChatDelta(content=delta.text or None), delta.finish_reason)
            if delta.finish_reason and include_usage:
                yield chunk(ChatDelta(), usage=_usage(delta))

    return _stream(_with_errors(events()))
