"""Admission control: body size, draining, per-request timeout, client disconnect, per-key concurrency.

`AdmissionMiddleware` (pure ASGI, streaming-safe) wraps every HTTP request except the probes and the
scrape (`/health`, `/ready`, `/metrics`: they answer while draining; /metrics still needs its key):

- more than `max_in_flight` requests already admitted → 429 + `Retry-After` at once, before the body is
  read: under overload a refusal costs microseconds instead of waiting in the event loop behind the
  accepted requests (`benchmarks/overload.py`);
- body larger than `max_body_bytes` → 413 before the body is read: at once from `Content-Length`,
  else as soon as the counted chunks pass the limit (chunked uploads too);
- while draining (SIGTERM) → 503 + `Retry-After` + `Connection: close`;
- counts requests in flight (`ctx.in_flight`) until their response is finished, so the drain can wait
  for them (streams included);
- `request_timeout_s` → 504 `request_timeout` when no response has *started* by then; the handler is
  cancelled, which frees its queue entry, batch rows or generation sequence and its adapter lease.
  Once a response has started (a stream), the timeout no longer applies: streams are bounded by
  `max_tokens` and end when the client goes away;
- the client disconnecting before the response is finished cancels the handler the same way.

`KeyConcurrency` caps concurrent requests per API key (`max_concurrent_per_key` → 429 + Retry-After);
service.auth takes a slot for every authenticated request.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging

from service.errors import APIError

log = logging.getLogger("loraswap.limits")

OPEN_PATHS = frozenset({"/health", "/ready", "/metrics"})  # not admitted here (auth is service.auth's)


def tenant_of(request) -> str | None:
    """The unit of fair sharing and per-key limits: the caller's API key id (None when auth is off)."""
    key = getattr(request.state, "api_key", None)
    return None if key is None else key.id


class KeyConcurrency:
    def __init__(self, limit: int):
        self.limit = limit
        self.active: dict[str, int] = {}

    @contextlib.asynccontextmanager
    async def slot(self, key: str | None):
        if key is None:  # auth off: the queues bound the load, there is no key to count
            yield
            return
        if self.active.get(key, 0) >= self.limit:
            raise APIError(429, f"too many concurrent requests for this API key (limit {self.limit})",
                           code="concurrency_limit", headers={"Retry-After": "1"})
        self.active[key] = self.active.get(key, 0) + 1
        try:
            yield
        finally:
            self.active[key] -= 1
            if not self.active[key]:
                del self.active[key]

    @staticmethod
    @contextlib.asynccontextmanager
    async def noop():
        yield


def _error_body(status: int, message: str, type_: str, code: str) -> bytes:
    return json.dumps({"error": {"message": message, "type": type_, "param": None, "code": code}}).encode()


async def send_error(send, status: int, message: str, type_: str, code: str,
                     headers: dict[str, str] | None = None) -> None:
    body = _error_body(status, message, type_, code)
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


class AdmissionMiddleware:
    def __init__(self, app, ctx):
        self.app, self.ctx = app, ctx

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("path") in OPEN_PATHS:
            return await self.app(scope, receive, send)
        settings = self.ctx.settings
        if self.ctx.draining:
            return await send_error(send, 503, "server is shutting down; retry on another replica",
                                    "service_unavailable", "draining",
                                    {"Retry-After": "1", "Connection": "close"})
        bound = settings.max_in_flight
        if bound and self.ctx.in_flight >= bound:
            return await send_error(send, 429, f"overloaded: {bound} requests are in flight; retry",
                                    "rate_limit_error", "overloaded", {"Retry-After": "1"})
        limit = settings.max_body_bytes
        length = _content_length(scope)
        if length is not None and length > limit:
            return await send_error(send, 413, f"request body is {length} bytes; the limit is {limit}",
                                    "request_too_large", "body_too_large", {"Connection": "close"})
        self.ctx.in_flight += 1
        try:
            await self._run(scope, receive, send, limit, settings.request_timeout_s)
        finally:
            self.ctx.in_flight -= 1

    async def _run(self, scope, receive, send, limit: int, timeout: float) -> None:
        state = {"received": 0, "too_large": False, "started": False, "finished": False, "replaced": False}
        body_done, disconnected = asyncio.Event(), asyncio.Event()

        async def guarded_receive():
            if body_done.is_set():  # the watcher owns `receive` now
                await disconnected.wait()
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                state["received"] += len(message.get("body", b""))
                if state["received"] > limit:
                    state["too_large"] = True
                    disconnected.set()
                    return {"type": "http.disconnect"}  # the app stops reading; we answer 413
                if not message.get("more_body", False):
                    body_done.set()
            elif message["type"] == "http.disconnect":
                disconnected.set()
            return message

        async def guarded_send(message):
            if state["replaced"]:
                return
            if message["type"] == "http.response.start":
                if state["too_large"]:  # whatever the app answers to a cut body, the answer is 413
                    state["replaced"] = True
                    await self._too_large(send, limit)
                    return
                state["started"] = True
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                state["finished"] = True
            await send(message)

        task = asyncio.ensure_future(self.app(scope, guarded_receive, guarded_send))
        timed_out = False

        def on_timeout():
            nonlocal timed_out
            if not state["started"] and not task.done():
                timed_out = True
                task.cancel()

        async def watch_disconnect():
            await body_done.wait()
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    disconnected.set()
                    if not state["finished"] and not task.done():
                        task.cancel()
                    return

        timer = asyncio.get_running_loop().call_later(timeout, on_timeout)
        watcher = asyncio.ensure_future(watch_disconnect())
        try:
            await task
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and getattr(current, "cancelling", lambda: 0)():
                raise  # we are being cancelled ourselves (server shutdown): so is the handler
            if timed_out and not state["started"]:
                log.warning("request timed out after %.1f s: %s %s", timeout, scope.get("method"), scope.get("path"))
                await send_error(send, 504, f"request timed out after {timeout:g} s", "timeout_error",
                                 "request_timeout", {"Retry-After": "1"})
            elif disconnected.is_set() and not state["too_large"]:
                log.info("client went away; cancelled %s %s", scope.get("method"), scope.get("path"))
        except Exception:
            if not state["too_large"]:
                raise
        finally:
            timer.cancel()
            watcher.cancel()
        if state["too_large"] and not state["replaced"] and not state["started"]:
            state["replaced"] = True
            await self._too_large(send, limit)

    @staticmethod
    async def _too_large(send, limit: int) -> None:
        await send_error(send, 413, f"request body is larger than the limit of {limit} bytes",
                         "request_too_large", "body_too_large", {"Connection": "close"})


def _content_length(scope) -> int | None:
    for key, value in scope.get("headers", []):
        if key == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
