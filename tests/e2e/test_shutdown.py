"""SIGTERM while a completion is streaming, against a real `loraswap serve` process on tiny models
(tests/e2e/tiny_serve.py: the CLI path with a slowed generator step): the stream in flight runs to its end
(`data: [DONE]`, all its tokens), /ready answers 503 `draining` meanwhile, new API requests get 503 with
Retry-After and `Connection: close`, /health stays 200, and then the process exits 0 on its own.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from e2e.tiny_world import build_world, env_for, free_port, wait_for

REPO = Path(__file__).resolve().parents[2]
LAUNCHER = Path(__file__).with_name("tiny_serve.py")
STEP_S, TOKENS = 0.1, 60  # the stream lasts >= 6 s after SIGTERM is sent at its first chunk


@contextlib.contextmanager
def tiny_serve(world, log: Path):
    port = free_port()
    env = {**os.environ, **env_for(world, LORASWAP_GRACE_PERIOD_S="60", LORASWAP_LOG_LEVEL="info"),
           "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, str(LAUNCHER), str(STEP_S), "serve", "--host", "127.0.0.1", "--port", str(port),
           "--registry", str(world["registry_dir"])]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        assert proc.poll() is None, f"server exited with {proc.returncode}:\n{log.read_text()[-3000:]}"
        with contextlib.suppress(httpx.HTTPError):
            return httpx.get(f"{url}/ready", timeout=2).status_code == 200
        return False

    try:
        wait_for(ready, 180, "server ready")
        yield proc, url
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)


@pytest.mark.slow
def test_sigterm_drains_a_stream_in_flight_then_exits_0(tmp_path):
    world = build_world(tmp_path)
    log = tmp_path / "server.log"
    with tiny_serve(world, log) as (proc, url):
        body = {"model": world["decoder"], "prompt": "hi", "max_tokens": TOKENS, "stream": True,
                "stream_options": {"include_usage": True}}
        events, first = [], threading.Event()
        stream_error: list[BaseException] = []

        def consume():
            try:
                with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as resp:
                    assert resp.status_code == 200, resp.read()
                    for line in resp.iter_lines():
                        if line.startswith("data: "):
                            events.append(line[len("data: "):])
                            first.set()
            except BaseException as exc:  # noqa: BLE001 - reported by the main thread
                stream_error.append(exc)
                first.set()

        reader = threading.Thread(target=consume, daemon=True)
        reader.start()
        assert first.wait(60) and not stream_error, stream_error
        proc.send_signal(signal.SIGTERM)
        sent_at = time.monotonic()

        # While the stream runs: not ready, new requests refused, process alive.
        def draining() -> bool:
            return httpx.get(f"{url}/ready", timeout=5).status_code == 503

        wait_for(draining, 10, "/ready turns 503")
        ready = httpx.get(f"{url}/ready", timeout=5)
        assert ready.json()["error"]["code"] == "draining", ready.text
        refused = [
            httpx.post(f"{url}/v1/classify", json={"adapter": "sentiment", "inputs": "great movie"}, timeout=5),
            httpx.post(f"{url}/v1/completions", json={**body, "max_tokens": 2}, timeout=5),
            httpx.get(f"{url}/v1/models", timeout=5),
        ]
        health = httpx.get(f"{url}/health", timeout=5)
        probes_done_at = time.monotonic()
        still_streaming = reader.is_alive()

        reader.join(60)
        assert not reader.is_alive() and not stream_error, stream_error
        code = proc.wait(60)
        exit_after = time.monotonic() - sent_at

    text = log.read_text()
    assert still_streaming, f"the stream ended before the drain probes ({probes_done_at - sent_at:.1f} s)"
    for resp in refused:
        assert resp.status_code == 503, resp.text
        assert resp.json()["error"]["code"] == "draining" and resp.headers["retry-after"] == "1"
        assert resp.headers["connection"] == "close"
    assert health.status_code == 200

    assert events[-1] == "[DONE]", events[-3:]
    chunks = [json.loads(e) for e in events[:-1]]
    assert not any("error" in c for c in chunks), chunks[-3:]
    finish = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert finish[-1] == "length" and chunks[-1]["usage"]["completion_tokens"] == TOKENS, chunks[-2:]

    assert code == 0, text[-3000:]
    assert "draining" in text and "drained" in text, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    print(f"\nshutdown: SIGTERM at the first chunk; stream finished its {TOKENS} tokens; exit 0 after "
          f"{exit_after:.1f} s")
