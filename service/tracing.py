"""Optional OpenTelemetry tracing: real spans when `opentelemetry` is installed and an OTLP endpoint
(or `enabled=True`) is configured, otherwise every function here is a cheap no-op.

Nothing imports opentelemetry at module import time, so it stays an optional dependency.
`service/app.py` calls `setup_tracing(app)` once; engines wrap steps in `span(...)`;
`service/request_log.py` adds `current_trace_id()` to the access log line.

What is used when enabled:
- opentelemetry-api only: spans go to the global tracer provider (set up by someone else, e.g.
  the `opentelemetry-instrument` agent); without one they are non-recording.
- opentelemetry-sdk: our own TracerProvider (resource service.name) with a batch OTLP exporter
  (opentelemetry-exporter-otlp, gRPC or HTTP per OTEL_EXPORTER_OTLP_PROTOCOL), or `exporter=`.
- HTTP server spans: FastAPI's own native telemetry where the installed FastAPI has it (pointed
  at our provider), else opentelemetry-instrumentation-fastapi when installed, else a small ASGI
  middleware here (one SERVER span per request, W3C traceparent extracted).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import Any

log = logging.getLogger("loraswap.tracing")

ENDPOINT_VARS = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
TRACER_NAME = "loraswap"

_tracer: Any = None  # set by setup_tracing when tracing is on; None means no-op
_provider: Any = None  # our SDK TracerProvider, when we made one


def otel_available() -> bool:
    try:
        import opentelemetry.trace  # noqa: F401
    except ImportError:
        return False
    return True


def tracing_enabled() -> bool:
    return _tracer is not None


def setup_tracing(
    app: Any = None,
    *,
    enabled: bool | None = None,
    endpoint: str | None = None,
    service_name: str = "loraswap",
    exporter: Any = None,
) -> bool:
    """Turn tracing on if asked for and possible; returns whether it is on.

    `enabled=None` means: on when `endpoint` or $OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT is set (the
    settings flag can force it either way). `exporter` (an SDK SpanExporter) replaces OTLP, for
    tests. `app` (FastAPI/Starlette) gets HTTP server spans."""
    global _tracer, _provider
    _provider = None
    endpoint = endpoint or next((os.environ[v] for v in ENDPOINT_VARS if os.environ.get(v)), None)
    if enabled is None:
        enabled = bool(endpoint) or exporter is not None
    if not enabled or os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        _tracer = None
        return False
    if not otel_available():
        log.warning("tracing requested but opentelemetry is not installed; tracing stays off")
        _tracer = None
        return False

    from opentelemetry import trace

    provider = _sdk_provider(service_name, endpoint, exporter)
    if provider is not None:
        # The global provider can be set once per process; later apps (tests) keep their own.
        if type(trace.get_tracer_provider()).__name__ == "ProxyTracerProvider":
            trace.set_tracer_provider(provider)
        _tracer = provider.get_tracer(TRACER_NAME)
        _provider = provider
    else:
        _tracer = trace.get_tracer(TRACER_NAME)
    if app is not None:
        _instrument_app(app, provider)
    return True


def _sdk_provider(service_name: str, endpoint: str | None, exporter: Any) -> Any:
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
    except ImportError:
        if exporter is not None:
            raise RuntimeError("an exporter was given but opentelemetry-sdk is not installed") from None
        log.info("opentelemetry-sdk not installed: spans go to the global tracer provider")
        return None
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        return provider
    otlp = _otlp_exporter(endpoint)
    if otlp is None:
        log.warning("no OTLP exporter installed (opentelemetry-exporter-otlp): spans are not exported")
    else:
        provider.add_span_processor(BatchSpanProcessor(otlp))
    return provider


def _otlp_exporter(endpoint: str | None) -> Any:
    # The exporters read OTEL_EXPORTER_OTLP_* themselves; pass the endpoint only when it came
    # from our settings rather than the environment.
    kwargs = {} if endpoint in (os.environ.get(v) for v in ENDPOINT_VARS) else {"endpoint": endpoint}
    protocol = os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")  # the spec's default
    modules = ["grpc", "http"] if protocol == "grpc" else ["http", "grpc"]
    for kind in modules:
        try:
            if kind == "grpc":
                from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
            else:
                from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        except ImportError:
            continue
        return OTLPSpanExporter(**kwargs)
    return None


def _instrument_app(app: Any, provider: Any) -> None:
    native = getattr(app, "_telemetry", None)
    if isinstance(native, dict) and "tracer_provider" in native:
        # FastAPI >= 0.16x traces requests itself (SERVER span, traceparent, semconv attributes)
        # with the global provider or telemetry["tracer_provider"]. Point it at ours: the
        # public way is FastAPI(telemetry={...}) at construction, which create_app may use
        # instead via fastapi_telemetry_config(). Adding another instrumentation would
        # duplicate the server span.
        if provider is not None and native.get("tracing", True):
            native["tracer_provider"] = provider
        return
    try:
        from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
    except ImportError:
        app.add_middleware(TracingMiddleware)
        return
    FastAPIInstrumentor.instrument_app(app, tracer_provider=provider)


def fastapi_telemetry_config() -> dict[str, Any] | None:
    """`FastAPI(telemetry=...)` argument matching setup_tracing() (call that first): None keeps
    FastAPI's defaults, which use the global provider."""
    return {"tracer_provider": _provider} if _provider is not None else None


@contextlib.contextmanager
def span(name: str, **attributes: Any) -> Iterator[Any]:
    """A span around a block (engine step, adapter load...); yields the span, or None when
    tracing is off. Attribute values must be str/bool/int/float (or sequences of them)."""
    tracer = _tracer
    if tracer is None:
        yield None
        return
    with tracer.start_as_current_span(name, attributes=attributes or None) as current:
        yield current


def current_trace_id() -> str | None:
    """Hex trace id of the current span, for log correlation; None when there is none."""
    if _tracer is None:
        return None
    from opentelemetry import trace

    context = trace.get_current_span().get_span_context()
    return format(context.trace_id, "032x") if context.is_valid else None


class TracingMiddleware:
    """Pure ASGI: one SERVER span per HTTP request (fallback when the FastAPI instrumentation
    package is absent). Ends when the response body is finished, so streams are covered."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or _tracer is None:
            await self.app(scope, receive, send)
            return
        from opentelemetry import propagate, trace

        carrier = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope.get("headers", [])}
        method = scope.get("method", "GET")
        path = scope.get("path", "")
        with _tracer.start_as_current_span(
            f"{method} {path}",
            context=propagate.extract(carrier),
            kind=trace.SpanKind.SERVER,
            attributes={"http.request.method": method, "url.path": path},
        ) as current:

            async def traced_send(message: dict) -> None:
                if message["type"] == "http.response.start":
                    status = int(message["status"])
                    current.set_attribute("http.response.status_code", status)
                    if status >= 500:
                        current.set_status(trace.Status(trace.StatusCode.ERROR))
                await send(message)

            await self.app(scope, receive, traced_send)
            route = scope.get("route")
            if route is not None and getattr(route, "path", None):
                current.set_attribute("http.route", route.path)
                current.update_name(f"{method} {route.path}")
