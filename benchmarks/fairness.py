"""fairness suite: one API key floods classification (three requests of 256 texts x 4,000 characters, within
every limit) while another sends one-word requests every 100 ms; the small requests' latency with the
batcher's per-key deficit round robin ("fair") against the same traffic as one queue ("fifo", what the
batcher did before it knew keys). Same engine (the embedded MiniLM), same batcher settings as the service.
"""

from __future__ import annotations

import asyncio
import time

import torch

from benchmarks.common import encoder_base, machine_info, machine_markdown, percentile, set_threads


async def _scenario(engine, fair: bool, big: tuple[int, int, int], period: float) -> dict:
    from service.config import Settings
    from service.engine.batcher import ClassifyBatcher

    s = Settings()
    batcher = ClassifyBatcher(engine, max_batch_size=s.max_batch_size, max_batch_tokens=s.max_batch_tokens,
                              max_wait_ms=s.max_wait_ms, max_queue=s.max_queue,
                              max_tenant_tokens=s.max_tenant_tokens, shared_batch_tokens=s.shared_batch_tokens)
    await batcher.start()
    requests, texts, chars = big
    flood = ["lorem ipsum " * (chars // 12)] * texts
    started = time.perf_counter()
    heavy = [asyncio.create_task(batcher.submit(flood, 0, "big" if fair else None)) for _ in range(requests)]
    latencies = []
    while not all(t.done() for t in heavy):
        t0 = time.perf_counter()
        await batcher.submit(["hello"], 0, "small" if fair else None)
        latencies.append(time.perf_counter() - t0)
        await asyncio.sleep(max(0.0, period - (time.perf_counter() - t0)))
    await asyncio.gather(*heavy)
    flood_s = time.perf_counter() - started
    await batcher.stop()
    return {"case": "fair" if fair else "fifo", "small_requests": len(latencies),
            "small_p50_ms": 1e3 * percentile(latencies, 50), "small_p99_ms": 1e3 * percentile(latencies, 99),
            "small_max_ms": 1e3 * max(latencies), "flood_s": flood_s,
            "small_latencies_ms": [round(1e3 * x, 1) for x in latencies]}  # fmt: skip


def run(device: str, quick: bool) -> tuple[dict, str]:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from service.engine.classifier import ClassifierEngine

    set_threads(device, quick)
    path, described = encoder_base()
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2, local_files_only=True)
    engine = ClassifierEngine(model, AutoTokenizer.from_pretrained(path), object(), num_slots=2, max_rank=8,
                              device=device)  # fmt: skip
    big = (3, 8, 400) if quick else (3, 256, 4000)
    period = 0.1
    rows = [asyncio.run(_scenario(engine, fair, big, period)) for fair in (False, True)]
    result = {"suite": "fairness", "quick": quick, "machine": machine_info(device),
              "setup": {"model": described, "dtype": "float32", "flood": {"requests": big[0], "texts": big[1],
                        "characters": big[2]}, "small_period_s": period, "max_length": engine.max_length},
              "cases": rows}  # fmt: skip
    return result, _markdown(result)


def _markdown(result: dict) -> str:
    s = result["setup"]
    flood = s["flood"]
    lines = [
        f"# fairness benchmark ({'quick' if result['quick'] else 'full'})",
        "",
        machine_markdown(result["machine"], s["dtype"]),
        f"- {s['model']}; key A sends {flood['requests']} requests of {flood['texts']} texts x"
        f" {flood['characters']} characters at once (truncated to {s['max_length']} tokens), key B one word every"
        f" {s['small_period_s'] * 1e3:.0f} ms until A is served; the service's batcher defaults",
        "",
        "| case | B's requests | B p50 ms | B p99 ms | B max ms | A's flood done in s |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["cases"]:
        lines.append(f"| {r['case']} | {r['small_requests']} | {r['small_p50_ms']:.0f} | {r['small_p99_ms']:.0f} |"
                     f" {r['small_max_ms']:.0f} | {r['flood_s']:.1f} |")
    return "\n".join(lines) + "\n"
