"""FastAPI application factory: routers, error shape, lifespan that loads and drains the engines.

`create_app(settings)` is what `loraswap serve` runs; tests pass tiny engines in directly.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import time

import anyio
from fastapi import Depends, FastAPI
from fastapi.middleware.cors import CORSMiddleware

from service.api import adapters, classify, embeddings, health, openai
from service.auth import KeyStore, authenticate, require_infer
from service.config import Settings, load_settings
from service.context import ServiceContext, build_engines
from service.engine import compute
from service.errors import COMMON_ERRORS, error_response, error_responses, install_error_handlers
from service.limits import AdmissionMiddleware, KeyConcurrency
from service.request_log import install_request_logging

VERSION_HEADER = b"x-loraswap-adapter-version"

log = logging.getLogger("loraswap.server")


def create_app(settings: Settings | None = None, *, classifier=None, generator=None, registry=None,
               auth: KeyStore | None = None) -> FastAPI:
    """The service app. `classifier`/`generator`/`registry` replace what `settings` would build (tests,
    benchmarks); an engine passed in keeps its own slot count: `max_gpu_adapters` and `max_rank` size
    only the engines built here."""
    settings = settings or load_settings()
    ctx = ServiceContext(settings=settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        engines = await compute.arun(build_engines, settings, classifier, generator)  # see compute.py
        await ctx.start(engines, registry)
        await _warm_routes(app)
        # What start-up made (models, tokenizers, libraries: millions of objects) lives as long as the server:
        # frozen, a full collection no longer walks it. Unfrozen, that walk stalled the event loop for
        # 200-400 ms at a time under load, the p99 of a 429 (benchmarks/overload.py: 221 -> 10-28 ms).
        gc.collect()
        gc.freeze()
        log.info("ready: tasks=%s registry=%s", sorted(ctx.engines), settings.registry)
        try:
            yield
        finally:
            gc.unfreeze()  # the engines go now: let their cycles be collected (tests start many apps)
            await ctx.stop()

    app = FastAPI(title="loraswap", version="0.1.0", lifespan=lifespan,
                  description="One base model per task, many hot-swappable LoRA adapters.")
    app.state.ctx = ctx
    # Auth (service/auth.py): a bad key configuration refuses to start here, before any model loads.
    app.state.auth = auth if auth is not None else KeyStore.from_settings(settings)
    app.state.key_concurrency = KeyConcurrency(settings.max_concurrent_per_key)
    install_error_handlers(app)
    # Innermost first: admission (body size, drain, timeout, disconnect) sees only real API requests.
    app.add_middleware(AdmissionMiddleware, ctx=ctx)
    app.add_middleware(RequestMetrics, ctx=ctx)
    app.add_middleware(JsonOnly)
    if settings.cors_origins:  # opt-in: a browser app on another origin (its JSON POSTs are preflighted)
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST", "DELETE"],
                           allow_headers=["authorization", "content-type", "x-request-id"])
    install_request_logging(app)
    # /health and /ready are open (probes); everything else needs a key when auth is on (routes add scopes;
    # /metrics takes a `metrics` or `admin` key).
    app.include_router(health.router, responses=error_responses(503))
    app.include_router(classify.router, dependencies=[Depends(require_infer)], responses=COMMON_ERRORS)
    app.include_router(embeddings.router, dependencies=[Depends(require_infer)], responses=COMMON_ERRORS)
    app.include_router(adapters.router, dependencies=[Depends(authenticate)], responses=COMMON_ERRORS)
    app.include_router(openai.router, dependencies=[Depends(require_infer)], responses=COMMON_ERRORS)
    return app


async def _warm_routes(app: FastAPI) -> None:
    """First-request costs, paid at startup instead of by a client (~85 ms on the first POST /v1/adapters
    here): FastAPI builds an included router's route state (fields, validators) on the router's first
    request, and anyio imports its asyncio backend the first time a dependency needs it. Matching one path
    that no route has walks every router; it goes straight to the router, so no middleware, metric or
    access log sees it."""
    await anyio.sleep(0)
    scope = {"type": "http", "method": "GET", "path": "/.warm-up", "raw_path": b"/.warm-up", "root_path": "",
             "query_string": b"", "headers": [], "scheme": "http", "http_version": "1.1",
             "server": ("127.0.0.1", 0), "client": ("127.0.0.1", 0)}  # fmt: skip

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        pass

    await app.router(scope, receive, send)


class JsonOnly:
    """POSTs must say `Content-Type: application/json` (or a `+json` type), else 415. A web page can make a
    browser POST a form or text/plain to any address without asking (no CORS preflight for those types),
    so accepting them would let any page a developer visits load adapters or move aliases on a server
    bound to 127.0.0.1 with auth off. No CORS headers are sent: browsers keep other origins' JSON POSTs out."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] == "POST":
            ctype = dict(scope["headers"]).get(b"content-type", b"").split(b";")[0].strip().lower()
            if ctype != b"application/json" and not (ctype.startswith(b"application/") and ctype.endswith(b"+json")):
                sent = ctype.decode("latin-1")[:100] or "none"
                response = error_response(415, f"send the body as JSON with Content-Type: application/json"
                                               f" (got {sent}); e.g. curl --json '{{...}}'", code="unsupported_media_type")
                return await response(scope, receive, send)
        await self.app(scope, receive, send)


class RequestMetrics:
    """Counts every request that named an adapter (handlers put it in `request.state.log_fields`),
    whatever its outcome, so 4xx/5xx answers are in `loraswap_requests_total` too. The `adapter` label is
    the name the ref resolved to (`resolved_adapter`, set once the key was allowed and the ref found);
    unknown or refused refs all count under `_other_`, so no client can mint label values. The adapter
    version that answered (a canary split decides it per request) goes out as X-Loraswap-Adapter-Version."""

    def __init__(self, app, ctx: ServiceContext):
        self.app, self.ctx = app, ctx

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.perf_counter(), [500]

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                version = (scope.get("state", {}).get("log_fields") or {}).get("version")
                if version is not None:
                    message = {**message, "headers": [*message.get("headers", []),
                                                      (VERSION_HEADER, str(version).encode())]}
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            fields = scope.get("state", {}).get("log_fields") or {}
            if fields.get("adapter") and fields.get("task") and self.ctx.metrics is not None:
                self.ctx.metrics.observe_request(fields.get("resolved_adapter"), fields["task"], status[0],
                                                 time.perf_counter() - started)

