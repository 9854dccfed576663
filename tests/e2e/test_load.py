"""Load against a real `loraswap serve` on a tiny BERT with four adapters (2, 3, 4 and 2 labels):

1. 64 concurrent clients for 20 s over mixed adapters and the base: zero errors, and every answer equals the
   answer the same server gives to that (adapter, text) alone (mixed batches never mix adapters up);
2. overload beyond the queue (`max_queue` = 64, 256 clients sending 16 texts each): only 200 and 429, every
   429 with Retry-After and the error shape;
3. recovery: afterwards a normal request answers 200 and the server is ready.

The numbers (requests, errors, 429s, p50/p99 latency) are printed (`pytest -s`).
"""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from e2e.tiny_world import CLS_ADAPTERS, build_world, env_for, percentile
from live import live_server

CLIENTS, SECONDS = 64, 20.0
OVERLOAD_CLIENTS, OVERLOAD_SECONDS, OVERLOAD_INPUTS = 256, 6.0, 16
MAX_QUEUE = 64  # >= CLIENTS: each client has one request out, so phase 1 can never fill the queue
TEXTS = ["great movie", "dull boring w1 w2", "w5 w6 w7 w8 w9 w10", "loved w9", "w3", "movie w40 w41 great dull"]


def _limits(connections: int) -> httpx.Limits:
    # Idle connections are dropped before uvicorn's 5 s keep-alive timeout closes them from its side, so a
    # request is never sent on a connection the server is closing at that moment (a client-side race).
    return httpx.Limits(max_connections=connections, max_keepalive_connections=connections, keepalive_expiry=2)


class Stats:
    def __init__(self):
        self.latencies: dict[int, list[float]] = {}  # status -> seconds
        self.errors: list[str] = []
        self.missing_retry_after = 0

    def record(self, status: int, seconds: float) -> None:
        self.latencies.setdefault(status, []).append(seconds)

    @property
    def statuses(self) -> dict[int, int]:
        return {status: len(values) for status, values in sorted(self.latencies.items())}

    @property
    def sent(self) -> int:
        return sum(self.statuses.values()) + len(self.errors)

    def line(self, what: str, seconds: float) -> str:
        parts = [f"{what}: {self.sent} requests in {seconds:.1f} s ({self.sent / seconds:.0f} req/s), "
                 f"transport errors {len(self.errors)}"]
        for status, values in sorted(self.latencies.items()):
            ms = [x * 1e3 for x in values]
            parts.append(f"{status}: {len(ms)} (p50 {percentile(ms, 50):.1f} ms, p99 {percentile(ms, 99):.1f} ms)")
        return "; ".join(parts)


async def _reference(http: httpx.AsyncClient, url: str, refs: list[str]) -> dict:
    """What each (adapter, text) answers alone, one request at a time."""
    out = {}
    for ref in refs:
        for t, text in enumerate(TEXTS):
            resp = await http.post(f"{url}/v1/classify", json={"adapter": ref, "inputs": [text]})
            assert resp.status_code == 200, resp.text
            out[ref, t] = resp.json()["results"][0]["scores"]
    return out


async def _steady(url: str, refs: list[str], stats: Stats, wrong: list[str]) -> float:
    async with httpx.AsyncClient(timeout=30, limits=_limits(CLIENTS)) as http:
        expected = await _reference(http, url, refs)

        async def client(c: int, deadline: float):
            i = c
            while time.monotonic() < deadline:
                i += 1
                ref, t = refs[i % len(refs)], (i * 7 + c) % len(TEXTS)
                started = time.perf_counter()
                try:
                    resp = await http.post(f"{url}/v1/classify", json={"adapter": ref, "inputs": [TEXTS[t]]})
                except httpx.HTTPError as exc:
                    stats.errors.append(f"{ref}: {exc!r}")
                    continue
                stats.record(resp.status_code, time.perf_counter() - started)
                if resp.status_code != 200:
                    stats.errors.append(f"{ref}: {resp.status_code} {resp.text[:200]}")
                    continue
                scores, want = resp.json()["results"][0]["scores"], expected[ref, t]
                if scores.keys() != want.keys() or any(abs(scores[k] - want[k]) > 1e-3 for k in want):
                    wrong.append(f"{ref} {TEXTS[t]!r}: {scores} != {want}")

        started = time.monotonic()
        await asyncio.gather(*(client(c, started + SECONDS) for c in range(CLIENTS)))
        return time.monotonic() - started


async def _overload(url: str, refs: list[str], stats: Stats, bad: list[str]) -> float:
    async with httpx.AsyncClient(timeout=60, limits=_limits(OVERLOAD_CLIENTS)) as http:

        async def client(c: int, deadline: float):
            i = c
            while time.monotonic() < deadline:
                i += 1
                body = {"adapter": refs[i % len(refs)], "inputs": [TEXTS[(i + k) % len(TEXTS)] * 3
                                                                   for k in range(OVERLOAD_INPUTS)]}
                started = time.perf_counter()
                try:
                    resp = await http.post(f"{url}/v1/classify", json=body)
                except httpx.HTTPError as exc:
                    stats.errors.append(f"{repr(exc)} at {time.monotonic() - (deadline - OVERLOAD_SECONDS):.2f} s")
                    continue
                stats.record(resp.status_code, time.perf_counter() - started)
                if resp.status_code == 429:
                    if resp.headers.get("retry-after") != "1":
                        stats.missing_retry_after += 1
                    err = resp.json().get("error", {})
                    if err.get("type") != "rate_limit_error":
                        bad.append(resp.text[:200])
                    await asyncio.sleep(0.05)  # a client that honours Retry-After a little
                elif resp.status_code != 200:
                    bad.append(f"{resp.status_code} {resp.text[:200]}")

        started = time.monotonic()
        await asyncio.gather(*(client(c, started + OVERLOAD_SECONDS) for c in range(OVERLOAD_CLIENTS)))
        return time.monotonic() - started


@pytest.mark.slow
def test_steady_load_overload_and_recovery(tmp_path):
    world = build_world(tmp_path, generation=False)
    refs = [*CLS_ADAPTERS, "intent@1", str(world["encoder"])]
    env = env_for(world, LORASWAP_MAX_QUEUE=str(MAX_QUEUE), LORASWAP_DECODER_BASE="")
    with live_server(world["registry_dir"], env=env) as url:
        steady, wrong = Stats(), []
        steady_s = asyncio.run(_steady(url, refs, steady, wrong))
        print("\n" + steady.line(f"steady {CLIENTS} clients", steady_s))

        over, bad = Stats(), []
        over_s = asyncio.run(_overload(url, refs, over, bad))
        print(over.line(f"overload {OVERLOAD_CLIENTS} clients x {OVERLOAD_INPUTS} inputs", over_s))

        recovered = httpx.post(f"{url}/v1/classify", json={"adapter": "topic", "inputs": TEXTS}, timeout=30)
        ready = httpx.get(f"{url}/ready", timeout=10)
        adapters = {row["name"]: row for row in httpx.get(f"{url}/v1/adapters", timeout=10).json()["data"]}

    assert steady.errors == [], steady.errors[:5]
    assert wrong == [], wrong[:5]
    assert steady.statuses == {200: steady.sent} and steady.sent >= 4 * CLIENTS, steady.statuses
    for name in CLS_ADAPTERS:  # every adapter really served traffic (tier device = resident in a slot)
        assert adapters[name]["tier"] == "device" and adapters[name]["requests"] > 0, adapters[name]

    assert over.errors == [] and bad == [], (over.errors[:3], bad[:3])
    assert set(over.statuses) <= {200, 429}, over.statuses
    assert over.statuses.get(429, 0) > 0, f"the queue never overflowed: {over.statuses}"
    assert over.statuses.get(200, 0) > 0, f"nothing was served under overload: {over.statuses}"
    assert over.missing_retry_after == 0

    assert recovered.status_code == 200 and len(recovered.json()["results"]) == len(TEXTS), recovered.text
    assert ready.status_code == 200, ready.text
