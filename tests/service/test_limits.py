"""Request limits and backpressure on tiny models, in process: body size (with and without
Content-Length), per-key concurrency, full queue, per-request timeout, client disconnect, draining."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import uvicorn
from factories import openai_error as _error
from factories import publish_cls_adapter, tiny_bert_base
from fastapi.testclient import TestClient

from adapters.registry import Registry
from service.app import create_app
from service.config import Settings

KEY = "limits-key-0001"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("limits")
    base_dir = tiny_bert_base(root / "base")
    publish_cls_adapter(Registry(root / "registry"), base_dir, root / "work", "sentiment", num_labels=2, seed=1)
    return Settings(registry=str(root / "registry"), encoder_base=str(base_dir), decoder_base="",
                    watch_interval_s=0, max_gpu_adapters=4, max_body_bytes=2048)


class Gate:
    """Blocks the classifier's forward pass until opened (runs in the model thread)."""

    def __init__(self, engine):
        self.engine, self.original = engine, engine.run
        self.opened, self.entered = threading.Event(), threading.Event()
        engine.run = self.run

    def run(self, rows, slots):
        self.entered.set()
        self.opened.wait(30)
        return self.original(rows, slots)

    def restore(self):
        self.opened.set()
        self.engine.run = self.original


@contextlib.contextmanager
def gated(client):
    gate = Gate(client.app.state.ctx.engines["classification"])
    try:
        yield gate
    finally:
        gate.restore()


def classify(client, **kw):
    return client.post("/v1/classify", json={"adapter": "sentiment", "inputs": ["great movie"]}, **kw)


def wait_for(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def idle(ctx) -> bool:
    """Nothing queued, nothing running, no adapter lease held, nothing in flight."""
    batcher = ctx.engines["classification"].batcher
    return (batcher.queue_depth == 0 and batcher.running == 0 and ctx.in_flight == 0
            and all(row.in_flight == 0 for row in ctx.residency()))


@pytest.fixture(scope="module")
def client(world):
    with TestClient(create_app(world)) as c:
        yield c


# ---- body size --------------------------------------------------------------------------------------------


def test_body_over_limit_with_content_length_is_413(client):
    body = json.dumps({"adapter": "sentiment", "inputs": ["x" * 3000]})
    err = _error(client.post("/v1/classify", content=body, headers={"content-type": "application/json"}), 413,
                 "body_too_large")
    assert err["type"] == "request_too_large"
    assert classify(client).status_code == 200  # and the server goes on


def test_chunked_body_over_limit_is_413(client):
    def chunks():
        yield b'{"adapter": "sentiment", "inputs": ["'
        for _ in range(100):
            yield b"x" * 1024
        yield b'"]}'

    resp = client.post("/v1/classify", content=chunks(), headers={"content-type": "application/json"})
    assert "content-length" not in resp.request.headers
    _error(resp, 413, "body_too_large")
    small = client.post("/v1/classify", content=iter([b'{"adapter": "sentiment", ', b'"inputs": "w1"}']),
                        headers={"content-type": "application/json"})
    assert small.status_code == 200, small.text


def test_input_count_and_length_limits_are_4xx(world):
    with TestClient(create_app(world.model_copy(update={"max_inputs": 3, "max_input_chars": 10}))) as c:
        _error(c.post("/v1/classify", json={"adapter": "sentiment", "inputs": ["a"] * 4}), 413)
        _error(c.post("/v1/classify", json={"adapter": "sentiment", "inputs": "a" * 11}), 413)
        assert c.post("/v1/classify", json={"adapter": "sentiment", "inputs": ["a" * 10] * 3}).status_code == 200


# ---- backpressure -----------------------------------------------------------------------------------------


def test_concurrent_requests_per_key_over_the_limit_get_429(world):
    keys = json.dumps([{"key": KEY, "scopes": ["infer"]}, {"key": KEY + "b", "scopes": ["infer"]}])
    settings = world.model_copy(update={"api_keys": keys, "max_concurrent_per_key": 2})
    h = {"Authorization": f"Bearer {KEY}"}
    with TestClient(create_app(settings)) as c, gated(c) as gate, ThreadPoolExecutor(3) as pool:
        active = c.app.state.key_concurrency.active
        held = [pool.submit(classify, c, headers=h) for _ in range(2)]
        wait_for(lambda: sum(active.values()) == 2)
        resp = classify(c, headers=h)
        _error(resp, 429, "concurrency_limit")
        assert resp.headers["retry-after"] == "1"
        other = pool.submit(classify, c, headers={"Authorization": f"Bearer {KEY}b"})  # another key: own budget
        wait_for(lambda: sum(active.values()) == 3)
        gate.opened.set()
        assert [f.result(30).status_code for f in [*held, other]] == [200, 200, 200]
        assert classify(c, headers=h).status_code == 200  # slots are given back
        assert c.app.state.key_concurrency.active == {}


def test_full_queue_gets_429_with_retry_after_then_recovers(world):
    with TestClient(create_app(world.model_copy(update={"max_queue": 1}))) as c, gated(c) as gate, \
            ThreadPoolExecutor(4) as pool:
        first = pool.submit(classify, c)
        gate.entered.wait(10)  # the first batch is in the model thread
        second = pool.submit(classify, c)
        wait_for(lambda: c.app.state.ctx.engines["classification"].batcher.queue_depth == 1)
        resp = classify(c)
        _error(resp, 429)
        assert resp.headers["retry-after"] == "1"
        gate.opened.set()
        assert first.result(30).status_code == 200 and second.result(30).status_code == 200
        assert classify(c).status_code == 200


def test_requests_over_the_in_flight_bound_get_429_at_the_edge(world):
    """With `max_in_flight` requests admitted, the next is refused before its body is read or it waits
    anywhere: 429 + Retry-After in milliseconds, while the admitted ones finish; then it is admitted again."""
    with TestClient(create_app(world.model_copy(update={"max_in_flight": 2}))) as c, gated(c) as gate, \
            ThreadPoolExecutor(2) as pool:
        ctx = c.app.state.ctx
        held = [pool.submit(classify, c) for _ in range(2)]
        wait_for(lambda: ctx.in_flight == 2)
        started = time.perf_counter()
        resp = classify(c)
        took = time.perf_counter() - started
        assert _error(resp, 429, "overloaded")["type"] == "rate_limit_error"
        assert resp.headers["retry-after"] == "1" and took < 0.5, took
        gate.opened.set()
        assert [f.result(30).status_code for f in held] == [200, 200]
        wait_for(lambda: ctx.in_flight == 0)
        assert classify(c).status_code == 200


def test_start_up_objects_are_frozen_out_of_garbage_collection_while_serving(world):
    """Full collections walking the models' objects stalled the event loop (429 p99 in the overload
    benchmark); the server freezes what start-up made once it is ready and unfreezes it when it stops."""
    import gc

    before = gc.get_freeze_count()  # 0 unless an earlier test left a server running
    with TestClient(create_app(world)) as c:
        assert gc.get_freeze_count() > before + 10_000
        assert classify(c).status_code == 200
    assert gc.get_freeze_count() == 0


def test_request_timeout_is_504_and_cancels_the_work(world):
    with TestClient(create_app(world.model_copy(update={"request_timeout_s": 0.5}))) as c:
        ctx = c.app.state.ctx
        assert classify(c).status_code == 200  # adapter resident
        with gated(c):
            started = time.monotonic()
            resp = classify(c)
            assert time.monotonic() - started < 5
            err = _error(resp, 504, "request_timeout")
            assert err["type"] == "timeout_error" and resp.headers["retry-after"] == "1"
            # the lease is given back at once; the batch in the model thread finishes and is dropped
            assert all(row.in_flight == 0 for row in ctx.residency())
        wait_for(lambda: idle(ctx))
        assert classify(c).status_code == 200


# ---- client disconnect (a real socket: uvicorn in a thread) ------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def served(app):
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(lambda: server.started, 60)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


def test_client_disconnect_cancels_the_work(world):
    app = create_app(world)
    with served(app) as url:
        ctx = app.state.ctx
        assert httpx.post(f"{url}/v1/classify", json={"adapter": "sentiment", "inputs": "w1"}).status_code == 200
        gate = Gate(ctx.engines["classification"])
        try:
            # the first request occupies the model thread; the second waits in the queue, then its client leaves
            with ThreadPoolExecutor(1) as pool:
                first = pool.submit(httpx.post, f"{url}/v1/classify", json={"adapter": "sentiment", "inputs": "w1"},
                                    timeout=30)
                gate.entered.wait(10)
                with pytest.raises(httpx.ReadTimeout):
                    httpx.post(f"{url}/v1/classify", json={"adapter": "sentiment", "inputs": ["w2", "w3"]},
                               timeout=httpx.Timeout(5, read=0.5))
                wait_for(lambda: ctx.engines["classification"].batcher.queue_depth == 0 and ctx.in_flight == 1)  # the queued one is gone
                gate.opened.set()
                assert first.result(30).status_code == 200
        finally:
            gate.restore()
        wait_for(lambda: idle(ctx))


def test_chunked_upload_is_answered_413_before_it_is_all_sent(world):
    app = create_app(world)
    with served(app) as url:
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\n")
            chunk = b"x" * 1024
            for _ in range(4):  # 4 KiB of a body that never ends; the limit is 2 KiB
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            answer = b""
            while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
                data = sock.recv(65536)
                if not data:
                    break
                answer += data
        assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
        assert b'"body_too_large"' in answer
        # The answer reaches the client just before the middleware's `finally` runs: wait for it (bounded).
        deadline = time.monotonic() + 5
        while app.state.ctx.in_flight and time.monotonic() < deadline:
            time.sleep(0.01)
        assert app.state.ctx.in_flight == 0
        assert httpx.post(f"{url}/v1/classify", json={"adapter": "sentiment", "inputs": "w1"}).status_code == 200


# ---- draining ---------------------------------------------------------------------------------------------


def test_draining_refuses_new_requests_with_503_and_ready_false(world):
    with TestClient(create_app(world)) as c:
        ctx = c.app.state.ctx
        ctx.draining = True
        resp = classify(c)
        assert _error(resp, 503, "draining") and resp.headers["retry-after"] == "1"
        assert resp.headers["connection"] == "close"
        _error(c.get("/v1/models"), 503, "draining")
        _error(c.get("/ready"), 503, "draining")
        assert c.get("/health").status_code == 200 and c.get("/metrics").status_code == 200
        assert ctx.in_flight == 0
        ctx.draining = False
