"""Big inputs from one client do not stall the server for the others: a real `loraswap serve` process (so
the client's own threads do not share the server's GIL), eight 750 KB chat messages at once while /health
is polled. Prompts are tokenized off the event loop, and a text longer than the context could ever hold
is refused before tokenizing."""

from __future__ import annotations

import concurrent.futures
import time

import httpx
from e2e.tiny_world import build_world, env_for
from live import live_server


def test_eight_750_kb_chats_leave_health_under_100_ms(tmp_path):
    world = build_world(tmp_path, cls_adapters={})
    body = {"model": "alpha", "messages": [{"role": "user", "content": "word " * 150_000}], "max_tokens": 1}
    with live_server(world["registry_dir"], env=env_for(world)) as url:
        latencies: list[float] = []
        with httpx.Client(base_url=url, timeout=120) as probe, concurrent.futures.ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(httpx.post, f"{url}/v1/chat/completions", json=body, timeout=120)
                       for _ in range(8)]  # fmt: skip
            while not all(f.done() for f in futures) or len(latencies) < 5:
                started = time.perf_counter()
                assert probe.get("/health").status_code == 200
                latencies.append(time.perf_counter() - started)
                time.sleep(0.02)
            answers = [f.result() for f in futures]
    assert [a.status_code for a in answers] == [400] * 8
    assert all(a.json()["error"]["code"] == "context_length_exceeded" for a in answers)
    assert max(latencies) < 0.1, sorted(latencies)[-5:]
