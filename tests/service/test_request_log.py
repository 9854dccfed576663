"""service/request_log.py (access log middleware) and service/tracing.py (optional OpenTelemetry)."""

from __future__ import annotations

import asyncio
import importlib.util
import io
import json
import logging
import socket
import sys
import threading
import time

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from service import tracing
from service.request_log import (
    ACCESS_LOGGER,
    STANDARD_FIELDS,
    JsonFormatter,
    current_request_id,
    install_request_logging,
)


@pytest.fixture
def access_lines():
    """Collects the access logger's output as parsed JSON lines."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger(ACCESS_LOGGER)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)

    def lines():
        return [json.loads(line) for line in stream.getvalue().splitlines()]

    yield lines
    logger.removeHandler(handler)


def make_app() -> FastAPI:
    app = FastAPI()
    install_request_logging(app)

    @app.post("/v1/classify")
    async def classify(request: Request):
        request.state.log_fields.update(
            adapter="sentiment",
            version=3,
            task="classification",
            queue_ms=1.5,
            compute_ms=4.2,
            prompt_tokens=12,
        )
        return {"request_id": request.state.request_id, "context_id": current_request_id()}

    @app.get("/stream")
    async def stream(request: Request):
        fields = request.state.log_fields
        fields.update(adapter="support", task="generation")

        async def events():
            for i in range(3):
                await asyncio.sleep(0.02)
                yield f"data: {i}\n\n"
            fields["generated_tokens"] = 3
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.get("/boom")
    async def boom():
        raise RuntimeError("boom")

    return app


async def request(app, method, url, **kwargs):
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        return await client.request(method, url, **kwargs)


async def test_request_id_is_echoed(access_lines):
    app = make_app()
    response = await request(app, "POST", "/v1/classify", json={}, headers={"X-Request-ID": "abc-123"})
    assert response.headers["x-request-id"] == "abc-123"
    assert response.json() == {"request_id": "abc-123", "context_id": "abc-123"}
    [line] = access_lines()
    assert line["request_id"] == "abc-123"


async def test_request_id_is_generated_when_absent_or_insane(access_lines):
    app = make_app()
    first = await request(app, "POST", "/v1/classify", json={})
    second = await request(app, "POST", "/v1/classify", json={}, headers={"X-Request-ID": "x" * 500})
    ids = [first.headers["x-request-id"], second.headers["x-request-id"]]
    assert all(len(i) == 32 for i in ids) and ids[0] != ids[1]
    assert [line["request_id"] for line in access_lines()] == ids


async def test_one_json_line_with_the_fields(access_lines):
    app = make_app()
    await request(app, "POST", "/v1/classify", json={})
    [line] = access_lines()
    assert set(STANDARD_FIELDS) <= set(line)
    assert line["logger"] == ACCESS_LOGGER and line["level"] == "info"
    assert line["method"] == "POST" and line["path"] == "/v1/classify" and line["status"] == 200
    assert (line["adapter"], line["version"], line["task"]) == ("sentiment", 3, "classification")
    assert (line["queue_ms"], line["compute_ms"], line["prompt_tokens"]) == (1.5, 4.2, 12)
    assert line["generated_tokens"] is None
    assert line["total_ms"] >= 0 and "complete" not in line


async def test_streaming_response_works_and_is_logged_once_at_the_end(access_lines):
    app = make_app()
    response = await request(app, "GET", "/stream", headers={"X-Request-ID": "s1"})
    assert response.text == "data: 0\n\ndata: 1\n\ndata: 2\n\ndata: [DONE]\n\n"
    assert response.headers["x-request-id"] == "s1"
    assert response.headers["content-type"].startswith("text/event-stream")
    [line] = access_lines()
    assert line["status"] == 200 and line["generated_tokens"] == 3
    # Total time covers the body (3 x 20 ms), not just the handler returning the response.
    assert line["total_ms"] >= 55
    assert line["ttfb_ms"] <= line["total_ms"]


@pytest.fixture
def live_server():
    """The app behind a real uvicorn on an ephemeral port (httpx's ASGI transport buffers the
    body, so only a real server shows whether chunks still flow one by one)."""
    uvicorn = pytest.importorskip("uvicorn")
    servers = []

    def start(app):
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off"))
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        servers.append((server, thread))
        deadline = time.monotonic() + 10
        while not server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.01)
        return f"http://127.0.0.1:{sock.getsockname()[1]}"

    yield start
    for server, thread in servers:
        server.should_exit = True
        thread.join(timeout=5)


def test_streaming_chunks_flow_through_a_real_server(access_lines, live_server):
    url = live_server(make_app())
    start = time.perf_counter()
    arrivals = []
    with httpx.stream("GET", url + "/stream", timeout=10) as response:
        assert response.headers["x-request-id"]
        for chunk in response.iter_text():
            arrivals.append((time.perf_counter() - start, chunk))
    assert "".join(c for _, c in arrivals).endswith("data: [DONE]\n\n")
    assert arrivals[-1][0] - arrivals[0][0] >= 0.03  # not buffered into one write
    deadline = time.monotonic() + 5
    while not access_lines() and time.monotonic() < deadline:
        time.sleep(0.01)
    [line] = access_lines()
    assert line["status"] == 200 and line["generated_tokens"] == 3 and line["total_ms"] >= 55


def test_client_disconnect_mid_stream_is_logged_once_as_incomplete(access_lines, live_server):
    app = FastAPI()
    install_request_logging(app)

    @app.get("/long")
    async def long():
        async def events():
            for i in range(100):
                await asyncio.sleep(0.02)
                yield f"data: {i}\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    url = live_server(app)
    with httpx.stream("GET", url + "/long", timeout=10) as response:
        next(response.iter_raw())
    deadline = time.monotonic() + 5
    while not access_lines() and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.1)  # a second line would show up by now
    [line] = access_lines()
    assert line["status"] == 200 and line["complete"] is False and line["total_ms"] < 1500


async def test_failing_handler_is_logged_as_500(access_lines):
    app = make_app()
    response = await request(app, "GET", "/boom")
    assert response.status_code == 500
    [line] = access_lines()
    assert line["status"] == 500 and line["error"] == "RuntimeError" and line["complete"] is False


def test_formatter_handles_odd_values_and_exceptions():
    formatter = JsonFormatter()
    try:
        raise ValueError("bad")
    except ValueError:
        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "m %s", ("é",), sys.exc_info())
    record.fields = {"when": object(), "n": 1}
    line = json.loads(formatter.format(record))
    assert line["msg"] == "m é" and line["n"] == 1 and "ValueError" in line["exc_info"]


# -- tracing ----------------------------------------------------------------------------------


@pytest.fixture
def tracing_off():
    yield
    tracing.setup_tracing(enabled=False)


def test_tracing_is_a_noop_without_endpoint(monkeypatch, tracing_off):
    for var in tracing.ENDPOINT_VARS:
        monkeypatch.delenv(var, raising=False)
    assert tracing.setup_tracing() is False
    assert not tracing.tracing_enabled()
    with tracing.span("engine.step", batch=3) as current:
        assert current is None
    assert tracing.current_trace_id() is None
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318")
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    assert tracing.setup_tracing() is False


def test_tracing_is_a_noop_without_opentelemetry(monkeypatch, tracing_off):
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4317")
    monkeypatch.setitem(sys.modules, "opentelemetry", None)  # import now raises ImportError
    monkeypatch.setitem(sys.modules, "opentelemetry.trace", None)
    app = FastAPI()
    assert tracing.setup_tracing(app) is False
    assert app.user_middleware == []
    with tracing.span("x") as current:
        assert current is None


@pytest.mark.skipif(
    importlib.util.find_spec("opentelemetry") is None, reason="opentelemetry-api is not installed"
)
def test_api_only_gives_nonrecording_spans(tracing_off):
    if importlib.util.find_spec("opentelemetry.sdk") is not None:
        pytest.skip("opentelemetry-sdk is installed: the api-only path is not reachable here")
    assert tracing.setup_tracing(enabled=True) is True
    with tracing.span("engine.step", batch=3) as current:
        assert current is not None and not current.is_recording()


def _sdk_missing() -> bool:
    try:
        return importlib.util.find_spec("opentelemetry.sdk") is None
    except ModuleNotFoundError:
        return True


@pytest.mark.skipif(_sdk_missing(), reason="opentelemetry-sdk is not installed (optional dependency)")
async def test_spans_with_in_memory_exporter(access_lines, tracing_off):
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.trace import SpanKind

    exporter = InMemorySpanExporter()
    app = FastAPI()
    install_request_logging(app)

    @app.get("/work/{item}")
    async def work(item: str):
        with tracing.span("engine.step", batch=2):
            pass
        return {"trace_id": tracing.current_trace_id()}

    assert tracing.setup_tracing(app, exporter=exporter) is True
    assert tracing.fastapi_telemetry_config() is not None
    parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    response = await request(app, "GET", "/work/7", headers={"traceparent": parent})
    spans = exporter.get_finished_spans()
    [server] = [s for s in spans if s.kind == SpanKind.SERVER]  # one server span, not two
    [step] = [s for s in spans if s.name == "engine.step"]
    assert step.attributes["batch"] == 2
    assert step.context.trace_id == server.context.trace_id == 0x0AF7651916CD43DD8448EB211C80319C
    assert server.parent.span_id == 0xB7AD6B7169203331  # continues the caller's trace
    assert response.json()["trace_id"] == "0af7651916cd43dd8448eb211c80319c"
    assert access_lines()[0]["trace_id"] == "0af7651916cd43dd8448eb211c80319c"


@pytest.mark.skipif(_sdk_missing(), reason="opentelemetry-sdk is not installed (optional dependency)")
async def test_fallback_middleware_for_plain_starlette(tracing_off):
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.trace import SpanKind
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    async def hello(request):
        with tracing.span("inner"):
            return PlainTextResponse("hi", status_code=503)

    app = Starlette(routes=[Route("/hello/{who}", hello)])
    exporter = InMemorySpanExporter()
    assert tracing.setup_tracing(app, exporter=exporter) is True
    response = await request(app, "GET", "/hello/x")
    assert response.text == "hi"
    spans = {s.name: s for s in exporter.get_finished_spans()}
    server = spans["GET /hello/{who}"]
    assert server.kind == SpanKind.SERVER
    assert server.attributes["http.response.status_code"] == 503
    assert not server.status.is_ok
    assert spans["inner"].parent.span_id == server.context.span_id
