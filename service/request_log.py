"""Access log: one JSON line per HTTP request on the `loraswap.access` logger.

A pure ASGI middleware (streaming-safe: the line is written when the response body is finished,
or when the app gives up, never twice). Routers add fields through `request.state.log_fields`
(a dict): adapter, version, task, queue_ms, compute_ms, prompt_tokens, generated_tokens, or any
other JSON-serialisable key. `X-Request-ID` is accepted (if sane) or generated, echoed on the
response, and available as `request.state.request_id` and `current_request_id()`.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
import time
import uuid
from datetime import datetime, timezone
from typing import Any

from service import tracing

ACCESS_LOGGER = "loraswap.access"
REQUEST_ID_HEADER = "x-request-id"
# Fields every line carries (null when unknown), so that log queries see one schema.
STANDARD_FIELDS = (
    "request_id",
    "method",
    "path",
    "status",
    "adapter",
    "version",
    "task",
    "queue_ms",
    "compute_ms",
    "total_ms",
    "prompt_tokens",
    "generated_tokens",
)
_SANE_ID = re.compile(r"^[A-Za-z0-9._:/+=-]{1,128}$")
_request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("loraswap_request_id", default=None)


def current_request_id() -> str | None:
    """The id of the request being handled in this context (None outside a request)."""
    return _request_id.get()


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, then the record's `fields`
    (passed as `extra={"fields": {...}}`) and any exception."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, tz=timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            line.update(fields)
        if record.exc_info:
            line["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str, ensure_ascii=False, separators=(",", ":"))


def configure_access_logger(stream: Any = None, level: int = logging.INFO) -> logging.Logger:
    """Give `loraswap.access` a JSON handler (stderr by default) unless it already has one;
    it then stops propagating, so the lines are not printed twice by the root logger."""
    logger = logging.getLogger(ACCESS_LOGGER)
    if not logger.handlers:
        handler = logging.StreamHandler(stream or sys.stderr)
        handler.setFormatter(JsonFormatter())
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(level)
    return logger


class RequestLogMiddleware:
    """Pure ASGI middleware; see the module doc."""

    def __init__(self, app: Any, logger: logging.Logger | None = None) -> None:
        self.app = app
        self.logger = logger or logging.getLogger(ACCESS_LOGGER)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        request_id = _incoming_request_id(scope) or uuid.uuid4().hex
        state = scope.setdefault("state", {})  # what request.state reads and writes
        state["request_id"] = request_id
        fields: dict[str, Any] = {}
        state["log_fields"] = fields
        token = _request_id.set(request_id)
        outcome: dict[str, Any] = {"status": None, "ttfb": None, "end": None, "trace_id": None}
        logged = False

        def write_line(error: BaseException | None = None) -> None:
            nonlocal logged
            if logged:
                return
            logged = True
            end = outcome["end"] or time.perf_counter()
            line = dict.fromkeys(STANDARD_FIELDS)
            line.update(request_id=request_id, method=scope.get("method"), path=scope.get("path"))
            # Handlers may have replaced the dict rather than filled it.
            attached = state.get("log_fields", fields)
            if isinstance(attached, dict):
                line.update(attached)
            line["status"] = outcome["status"] if outcome["status"] is not None else (500 if error else None)
            line["total_ms"] = round((end - start) * 1000, 3)
            if outcome["ttfb"] is not None:
                line["ttfb_ms"] = round((outcome["ttfb"] - start) * 1000, 3)
            if outcome["end"] is None:
                line["complete"] = False  # body never finished: client gone or app failed
            if outcome["trace_id"]:
                line["trace_id"] = outcome["trace_id"]
            if error is not None:
                line["error"] = type(error).__name__
            self.logger.info("%s %s %s", line["method"], line["path"], line["status"], extra={"fields": line})

        async def logging_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                outcome["status"] = message["status"]
                outcome["ttfb"] = time.perf_counter()
                outcome["trace_id"] = tracing.current_trace_id()
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-request-id"]
                headers.append((b"x-request-id", request_id.encode("latin-1")))
                message = {**message, "headers": headers}
                await send(message)
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                await send(message)
                outcome["end"] = time.perf_counter()
                write_line()
            else:
                await send(message)

        try:
            await self.app(scope, receive, logging_send)
        except BaseException as exc:
            write_line(exc)
            raise
        finally:
            write_line()
            _request_id.reset(token)


def _incoming_request_id(scope: dict) -> str | None:
    for key, value in scope.get("headers", []):
        if key.lower() == b"x-request-id":
            text = value.decode("latin-1").strip()
            # Refuse ids that would make log lines huge or odd; a fresh one is used instead.
            return text if _SANE_ID.match(text) else None
    return None


def install_request_logging(app: Any, *, configure_logger: bool = True) -> None:
    """Add the access-log middleware to a FastAPI/Starlette app (call in create_app, before
    startup). With `configure_logger`, `loraswap.access` gets a JSON stderr handler unless it
    already has handlers. Run uvicorn with `access_log=False` to avoid a second access line."""
    if configure_logger:
        configure_access_logger()
    app.add_middleware(RequestLogMiddleware)
