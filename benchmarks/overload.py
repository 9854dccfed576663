"""overload suite: /v1/classify on a real `loraswap serve` (embedded MiniLM base, no adapter) at 4x what it
sustains: open-loop arrivals at 4x the throughput a closed loop of 16 clients measured first. Run three
times in one go: with the shipped edge admission bound (`max_in_flight`'s default), with a tight one, and
without it (0: requests wait in the event loop until the batcher's queue refuses them, as before the
bound). Reports the latency of the 429 answers and of the accepted ones.
"""

from __future__ import annotations

import asyncio
import subprocess
import tempfile
import time
from pathlib import Path

from benchmarks.common import (
    log_tail,
    machine_info,
    machine_markdown,
    percentile,
    set_threads,
    start_server,
    stop_server,
    wait_ready,
)
from service.config import Settings

BASE = "all-MiniLM-L6-v2"
TEXT = "the film was a pleasant surprise, with a clever script and warm performances"


def _start(tmp: Path, max_in_flight: int, log: Path) -> tuple[subprocess.Popen, str]:
    return start_server(tmp, {"LORASWAP_DECODER_BASE": "", "LORASWAP_WATCH_INTERVAL_S": "0",
                              "LORASWAP_MAX_IN_FLIGHT": str(max_in_flight)}, log)  # fmt: skip


async def _closed_loop(url: str, clients: int, seconds: float) -> float:
    """Requests per second that `clients` back-to-back clients get answered (the server's capacity)."""
    import aiohttp

    done = 0

    async def client(http, stop):
        nonlocal done
        while time.perf_counter() < stop:
            async with http.post(f"{url}/v1/classify", json={"adapter": BASE, "inputs": TEXT}) as resp:
                await resp.read()
                done += resp.status == 200

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=clients)) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(http, start + seconds) for _ in range(clients)))
        return done / (time.perf_counter() - start)


async def _open_loop(url: str, rate: float, seconds: float) -> dict:
    """Arrivals at `rate` per second for `seconds`, whatever the answers take (open loop)."""
    import aiohttp

    answers: list[tuple[int, float]] = []

    async def one(http):
        t0 = time.perf_counter()
        try:
            async with http.post(f"{url}/v1/classify", json={"adapter": BASE, "inputs": TEXT}) as resp:
                await resp.read()
                answers.append((resp.status, time.perf_counter() - t0))
        except (aiohttp.ClientError, asyncio.TimeoutError):
            answers.append((0, time.perf_counter() - t0))

    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as http:
        start, tasks, n = time.perf_counter(), [], int(rate * seconds)
        for i in range(n):
            await asyncio.sleep(max(0.0, start + i / rate - time.perf_counter()))
            tasks.append(asyncio.create_task(one(http)))
        await asyncio.gather(*tasks)
    ok = [t for s, t in answers if s == 200]
    refused = [t for s, t in answers if s == 429]
    out = {"sent": n, "ok": len(ok), "refused_429": len(refused), "other": n - len(ok) - len(refused)}
    for kind, times in (("ok", ok), ("refused", refused)):  # a latency only where answers of that kind came
        if times:
            out |= {f"{kind}_p50_ms": 1e3 * percentile(times, 50), f"{kind}_p99_ms": 1e3 * percentile(times, 99)}
    return out


def run(device: str, quick: bool) -> tuple[dict, str]:
    set_threads(device, quick)
    seconds, bound, factor = (2.0, 16, 4) if quick else (15.0, 32, 4)
    default = Settings.model_fields["max_in_flight"].default
    result = {"suite": "overload", "quick": quick, "machine": machine_info(device),
              "setup": {"model": f"{BASE} (embedded), base model, one text per request", "dtype": "float32",
                        "seconds": seconds, "overload_factor": factor, "max_in_flight": bound,
                        "default_max_in_flight": default}}  # fmt: skip
    cases = []
    with tempfile.TemporaryDirectory() as tmp:
        for case, limit in (("default", default), ("bounded", bound), ("unbounded", 0)):
            log = Path(tmp) / f"serve-{limit}.log"
            proc, url = _start(Path(tmp), limit, log)
            try:
                wait_ready(proc, url, log)
                asyncio.run(_closed_loop(url, 4, 1.0))  # warm-up, not recorded
                capacity = asyncio.run(_closed_loop(url, 16, seconds))
                row = asyncio.run(_open_loop(url, factor * capacity, seconds))
            except Exception as exc:
                raise RuntimeError(f"overload run failed: {exc}; {log_tail(log)}") from exc
            finally:
                stop_server(proc)
            cases.append({"case": case, "max_in_flight": limit,
                          "capacity_rps": capacity, "offered_rps": factor * capacity, **row})
    result["cases"] = cases
    return result, _markdown(result)


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def _markdown(r: dict) -> str:
    s = r["setup"]
    lines = [f"# overload benchmark ({'quick' if r['quick'] else 'full'})", "",
             machine_markdown(r["machine"], s["dtype"]),
             f"- {s['model']}; capacity = a closed loop of 16 clients for {s['seconds']:g} s, then open-loop"
             f" arrivals at {s['overload_factor']}x that for {s['seconds']:g} s; default = `max_in_flight`"
             f" {s['default_max_in_flight']} (shipped), bounded = {s['max_in_flight']}, unbounded = 0 (the"
             " batcher's queue refuses, as before the bound)", "",
             "| case | capacity rps | offered rps | sent | ok | 429 | other | ok p50 ms | ok p99 ms |"
             " 429 p50 ms | 429 p99 ms |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in r["cases"]:
        lines.append(f"| {c['case']} | {c['capacity_rps']:.1f} | {c['offered_rps']:.1f} | {c['sent']} | {c['ok']} |"
                     f" {c['refused_429']} | {c['other']} | {_ms(c.get('ok_p50_ms'))} | {_ms(c.get('ok_p99_ms'))} |"
                     f" {_ms(c.get('refused_p50_ms'))} | {_ms(c.get('refused_p99_ms'))} |")
    return "\n".join(lines) + "\n"
